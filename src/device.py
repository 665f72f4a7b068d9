"""The device a run uses: the one asked for, or with `auto` the best MindSpore can use (Ascend, GPU, CPU).

Availability comes from MindSpore's own probe (the backend plugin loaded and a device present), so an
Ascend host trains on Ascend without a flag and this CPU-only machine falls back to the CPU.
"""
from __future__ import annotations

from typing import Callable, Optional

AUTO = "auto"
PREFERENCE = ("Ascend", "GPU", "CPU")


def is_available(target: str) -> bool:
    """MindSpore's availability check for one backend; False when the probe itself fails."""
    import mindspore as ms

    try:
        if hasattr(ms, "device_context"):               # MindSpore >= 2.5
            return bool(getattr(ms.device_context, target.lower()).is_available())
        return bool(ms.hal.is_available(target))
    except Exception:                                   # a broken plugin means the device cannot be used
        return False


def choose_device(requested: str = AUTO, probe: Callable[[str], bool] = is_available) -> str:
    """`requested` itself unless it is `auto`; then the first available of Ascend, GPU, CPU."""
    if requested != AUTO:
        return requested
    for target in PREFERENCE:
        if target == "CPU" or probe(target):
            return target
    raise AssertionError("unreachable: the CPU is always available")


def describe(requested: str, chosen: str) -> str:
    how = "auto: best available of Ascend, GPU, CPU" if requested == AUTO else "as requested by device_target"
    return f"device: {chosen} ({how})"


def release_free_heap() -> bool:
    """Give the C heap's free pages back to the system (glibc's malloc_trim). Compiling a training graph leaves
    freed heap behind, which MindSpore's memory pool (its own mappings) never reuses. Returns whether anything
    was released (False without glibc)."""
    import ctypes

    try:
        libc = ctypes.CDLL("libc.so.6")
    except OSError:
        return False
    return bool(libc.malloc_trim(0))


def set_device(requested: str, device_id: Optional[int] = None, *, announce: bool = True) -> str:
    """Graph mode on the chosen device; prints the choice once at the start of a run. Returns the device."""
    import mindspore as ms

    chosen = choose_device(requested)
    if announce:
        print(describe(requested, chosen), flush=True)
    ms.set_context(mode=ms.GRAPH_MODE)
    if device_id is not None:
        ms.set_device(chosen, device_id)
    elif ms.get_context("device_target") != chosen:     # set_device fails once kernels ran
        ms.set_device(chosen)
    return chosen
