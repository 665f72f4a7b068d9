"""Mixed precision: what MindSpore's amp levels (O0 / O1 / O2 / O3) mean for this model on each device.

Weights, optimizer state, losses, reductions and box math stay float32 at every level; what changes is the
precision the convolutions and matrix products compute in:

- CPU: O1, O2 and O3 are one setting: our oneDNN convolutions (src/ops/conv.py) read bfloat16 inputs in all
  three passes (AVX512-BF16 / AMX) and accumulate and write float32. MindSpore's CPU MatMul has no bfloat16
  or float16 kernel, so the box head's fully connected layers stay float32.
- Ascend / GPU: float16 with MindSpore's amp (`ms.amp.auto_mixed_precision`) on the feature and head cells
  (backbone, neck, RPN head, box and mask heads); their outputs are cast back to float32, so the anchors,
  proposals, targets and losses are float32. O2 casts everything but MindSpore's black list (BatchNorm and the
  like), O3 everything. O1 (white-listed operators only) is refused there: MindSpore builds it by rewriting the
  cells' source, which fails on this model.
- `auto` (the default): on a CPU with bfloat16 instructions (AVX512-BF16 or AMX) O2, since bf16 training
  reaches float32's AP in less time per step (docs/demo_results.md); on other CPUs O0, where oneDNN would only
  emulate bfloat16; O2 on Ascend and GPU (the ModelZoo ran its graph in float16 on Ascend).

The loss scale (`train.loss_scale`, the recipe's fixed 1) and dynamic loss scaling (`train.loss_scale_mode`)
are the training cell's (src/network_define.py).
"""
from __future__ import annotations

from typing import Optional

from src.config import AMP_LEVELS

AUTO = "auto"
DEFAULT_LEVELS = {"CPU": "O0", "CPU with bf16": "O2", "GPU": "O2", "Ascend": "O2"}
BF16_CPU_FLAGS = ("avx512_bf16", "amx_bf16")
CPUINFO = "/proc/cpuinfo"
# The cells computing features and head outputs; the rest of the model is box math and sampling.
COMPUTE_CELLS = ("backbone", "neck", "rpn", "rcnn_cls", "rcnn_mask")


def cpu_has_bf16(cpuinfo: str = CPUINFO) -> bool:
    """Whether the CPU computes in bfloat16 natively: an AVX512-BF16 or AMX-BF16 flag in `cpuinfo` (Linux's
    /proc/cpuinfo). False where that file cannot be read."""
    try:
        with open(cpuinfo) as info:
            flags = set(info.read().split())
    except OSError:
        return False
    return any(flag in flags for flag in BF16_CPU_FLAGS)


def resolve(level: str, device: str, cpu_bf16: Optional[bool] = None) -> str:
    """The amp level a run uses on `device` ("CPU" / "GPU" / "Ascend"): `level`, or with auto that device's
    default (on the CPU, whether it has bfloat16 instructions: `cpu_bf16`, probed when None)."""
    if level != AUTO:
        return level
    if device == "CPU" and (cpu_has_bf16() if cpu_bf16 is None else cpu_bf16):
        return DEFAULT_LEVELS["CPU with bf16"]
    return DEFAULT_LEVELS[device]


def describe(level: str, device: str, kernel_convolutions: int = 1) -> str:
    """One line saying what `level` computes in on `device` (CPU: with this many convolutions on our kernels)."""
    if level == "O0":
        return "precision: float32 (amp O0)"
    if device == "CPU" and kernel_convolutions == 0:
        return (f"precision: float32 (amp {level} on CPU asks for bfloat16 convolutions, but none runs on our "
                "kernels here: MindSpore's CPU operators have no bfloat16)")
    if device == "CPU":
        return f"precision: convolutions on bfloat16 inputs, float32 elsewhere (amp {level} on CPU)"
    return f"precision: float16 in {', '.join(COMPUTE_CELLS)} (amp {level}), float32 elsewhere"


def apply(net, level: str, device: str):
    """Set `net` (MaskRcnnResnet50, before its graph is compiled) to compute at amp `level` on `device`; returns
    the network to run. Parameter names, shapes and types do not change, so checkpoints load and save as at O0."""
    import mindspore as ms

    from src.ops import conv

    if level not in AMP_LEVELS:
        raise ValueError(f"amp level must be one of {', '.join(AMP_LEVELS)}, got '{level}'")
    if device == "CPU":
        conv.set_bf16_math(net, level != "O0")
        return net
    if level == "O0":
        return net
    if level == "O1":
        raise ValueError(f"amp level O1 is not available on {device} (MindSpore's O1 rewrites the cells' source, "
                         "which fails on this model): use O2 or O3")
    for name in COMPUTE_CELLS:
        cell = getattr(net, name)
        wrapped = ms.amp.auto_mixed_precision(cell, level, dtype=ms.float16)
        if wrapped is not cell:                    # O2 / O3: a float32-output wrapper without a name prefix
            net.insert_child_to_cell(name, wrapped)
    return net


def set_precision(net, level: str, device: str, announce: bool = True):
    """`apply` with `level` resolved for `device` (auto: that device's default); prints the choice once."""
    from src.ops import conv

    chosen = resolve(level, device)
    net = apply(net, chosen, device)
    if announce:
        print(describe(chosen, device, conv.kernel_convolutions(net)), flush=True)
    return net
