"""Which implementation the ops run: our CPU kernels (src/ops/kernels/, built by `python -m src.ops.build`) or
MindSpore's operators.

The kernels run when the device is CPU, the library for the current sources has been built, MASKRCNN_CPU_KERNELS
is not "mindspore", and no `use_mindspore_kernels()` block is open (export: MINDIR/ONNX hold standard operators).
Nothing here compiles or downloads: a library that is missing or out of date means MindSpore's operators, after
one warning that says how to build it.

oneDNN (inside MindSpore) runs MindSpore's own Conv2D as a reference loop when it may use AVX-512, because
MindSpore hands it plain OIHW weights; capped at AVX2 it uses im2col + AVX2 GEMM. Our convolutions let oneDNN
choose its layouts, so AVX-512 is only capped when they cannot run (`decide_isa`, called when `src` is imported,
before any network runs: oneDNN reads the cap when it creates its first primitive), unless the user chose an ISA.
"""
import contextlib
import hashlib
import os
import warnings
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent.parent
KERNELS_DIR = Path(__file__).resolve().parent / "kernels"
CONSTANTS = Path(__file__).resolve().parent / "constants.py"
BUILD_DIR_ENV = "MASKRCNN_OPS_BUILD_DIR"   # where the library is built and looked for (default build/ops)
ENV_SWITCH = "MASKRCNN_CPU_KERNELS"        # "mindspore" turns the kernels off
LIBRARY_STEM = "libmaskrcnn_ops"

_state = {"forced_off": False, "onnx": False, "warned": False}


def build_dir() -> Path:
    return Path(os.environ.get(BUILD_DIR_ENV) or ROOT / "build" / "ops")


def kernel_sources():
    """The C++ sources and headers of the library, in a fixed order."""
    return sorted(KERNELS_DIR.glob("*.cpp")) + sorted(KERNELS_DIR.glob("*.h"))


def library_path() -> Path:
    """Where the library for the current sources is (the name carries a hash of them and of the constants)."""
    digest = hashlib.sha256()
    for path in kernel_sources() + [CONSTANTS]:
        digest.update(path.name.encode() + b"\0" + path.read_bytes())
    return build_dir() / f"{LIBRARY_STEM}-{digest.hexdigest()[:12]}.so"


def switched_off() -> bool:
    return os.environ.get(ENV_SWITCH, "").lower() == "mindspore"


def library():
    """Path (str) of the built library for the current sources, or None (not built, or switched off)."""
    if switched_off():
        return None
    path = library_path()
    return str(path) if path.is_file() else None


def decide_isa():
    """Cap oneDNN at AVX2 when MindSpore's Conv2D will run (no library); called before any network runs."""
    if library() is None:
        cap_isa_for_mindspore_kernels()


def cap_isa_for_mindspore_kernels():
    """For a process that runs MindSpore's own Conv2D (no library, or an exported graph): cap oneDNN at AVX2,
    unless the user chose an ISA. Effective only before the process's first oneDNN call."""
    os.environ.setdefault("ONEDNN_MAX_CPU_ISA", "AVX2")


@contextlib.contextmanager
def use_mindspore_kernels(onnx: bool = False):
    """Ops built inside run MindSpore's own operators (for export, and as the reference in tests).

    onnx=True: ops whose usual operator MindSpore's ONNX exporter cannot convert are built from operators it
    can (same values); see `onnx_export`.
    """
    previous = dict(_state)
    _state["forced_off"] = True
    _state["onnx"] = _state["onnx"] or onnx
    try:
        yield
    finally:
        _state["forced_off"], _state["onnx"] = previous["forced_off"], previous["onnx"]


def onnx_export() -> bool:
    """True while ops are built for an ONNX export (inside `use_mindspore_kernels(onnx=True)`)."""
    return _state["onnx"]


def enabled() -> bool:
    """True when ops built now run on our kernels: CPU target, library built, not switched off."""
    import mindspore as ms

    if _state["forced_off"] or ms.get_context("device_target") != "CPU" or switched_off():
        return False
    if library() is None:
        if not _state["warned"]:
            _state["warned"] = True
            warnings.warn(f"CPU kernels not built for the current sources ({library_path()} is missing); "
                          "MindSpore's operators run. Build them with: python -m src.ops.build")
        return False
    return True
