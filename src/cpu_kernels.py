"""CPU kernels of our own (`cpu_kernels.cpp`): convolutions on oneDNN's AVX-512 kernels as drop-in nn.Conv2d /
nn.Conv2dTranspose, RoIAlign read straight from the NCHW pyramid maps, and the step's other hot spots (mask
targets, max-IoU assignment, the FPN merge).

MindSpore's own CPU Conv2D passes oneDNN plain OIHW weights, which leaves it AVX2 at best (AVX-512 falls to a
reference loop, hence the ISA cap in `src/__init__.py`); ours let oneDNN pick its layouts, 1.4-3.7x faster per
convolution (bench/bench_conv.py), run bias, ReLU and a folded frozen BatchNorm inside the call, and can hand
oneDNN's blocked tensors from one convolution to the next (Conv2d). The RoIAlign kernel replaces roi_align.py's
gather table (transposes, a materialised gather and its scatter-add gradient). Built once per source version
into build/cpu_kernels/ with g++ against MindSpore's bundled libdnnl and oneDNN's headers (the `onednn-devel`
wheel, fetched by pip). The layers keep nn.Conv2d's parameters, so checkpoints do not change. Everything falls
back to MindSpore's operators when the device is not CPU, when the library cannot be built (a warning says
why), when MASKRCNN_CPU_KERNELS=mindspore, or inside `mindspore_kernels()` (export: MINDIR/ONNX hold standard
operators).
"""
import contextlib
import hashlib
import importlib.util
import os
import subprocess
import sys
import tempfile
import warnings
import zipfile
from pathlib import Path

import mindspore as ms
import numpy as np
from mindspore import nn, ops
from mindspore.ops.operations._grad_ops import ReluGrad

ROOT = Path(__file__).resolve().parent.parent
SOURCE = Path(__file__).with_suffix(".cpp")
BUILD_DIR = ROOT / "build" / "cpu_kernels"
HEADERS_PACKAGE = "onednn-devel==2026.1.0"
ENV_SWITCH = "MASKRCNN_CPU_KERNELS"       # "mindspore" turns these kernels off
# MindSpore's libdnnl runs on a thread pool its caller provides; the headers must say so.
THREADING_DEFINE = "#define DNNL_CPU_THREADING_RUNTIME"

_state = {"library": None, "tried": False, "forced_off": False}


def _mindspore_lib_dir():
    spec = importlib.util.find_spec("mindspore")
    return Path(spec.submodule_search_locations[0]) / "lib" if spec else None


def library_path() -> Path:
    """Where the library for the current source is (the name carries the source's hash)."""
    digest = hashlib.sha256(SOURCE.read_bytes() + HEADERS_PACKAGE.encode()).hexdigest()[:12]
    return BUILD_DIR / f"libcpu_kernels-{digest}.so"


def _fetch_headers(include_dir: Path):
    """Unpack oneDNN's C/C++ headers from the onednn-devel wheel (headers only; the library is MindSpore's)."""
    with tempfile.TemporaryDirectory(dir=BUILD_DIR) as tmp:
        subprocess.run([sys.executable, "-m", "pip", "download", "--quiet", "--no-deps", "--disable-pip-version-check",
                        "-d", tmp, HEADERS_PACKAGE], check=True, capture_output=True, text=True)
        wheel = next(Path(tmp).glob("*.whl"))
        staging = Path(tmp) / "include"
        with zipfile.ZipFile(wheel) as archive:
            for name in archive.namelist():
                if "/data/include/oneapi/dnnl/" in name and not name.endswith("/"):
                    target = staging / name.split("/data/include/", 1)[1]
                    target.parent.mkdir(parents=True, exist_ok=True)
                    target.write_bytes(archive.read(name))
        config = staging / "oneapi" / "dnnl" / "dnnl_config.h"
        lines = config.read_text().splitlines()
        config.write_text("\n".join(f"{THREADING_DEFINE} DNNL_RUNTIME_THREADPOOL" if line.startswith(THREADING_DEFINE)
                                    else line for line in lines) + "\n")
        try:
            staging.rename(include_dir)       # atomic: a process compiling meanwhile sees all headers or none
        except OSError:
            if not (include_dir / "oneapi" / "dnnl" / "dnnl.hpp").exists():
                raise                         # else another process unpacked them first


def build() -> Path:
    """Compile cpu_kernels.cpp into library_path() (temp file + rename, so concurrent processes are safe)."""
    target = library_path()
    if target.exists():
        return target
    lib_dir = _mindspore_lib_dir()
    if lib_dir is None or not (lib_dir / "libdnnl.so.3").exists():
        raise RuntimeError("MindSpore's libdnnl.so.3 was not found")
    BUILD_DIR.mkdir(parents=True, exist_ok=True)
    include_dir = BUILD_DIR / "include"
    if not (include_dir / "oneapi" / "dnnl" / "dnnl.hpp").exists():
        _fetch_headers(include_dir)
    fd, tmp = tempfile.mkstemp(suffix=".so", dir=BUILD_DIR)
    os.close(fd)
    try:
        result = subprocess.run(["g++", "-O2", "-std=c++17", "-shared", "-fPIC", f"-I{include_dir}", str(SOURCE),
                                 "-o", tmp, str(lib_dir / "libdnnl.so.3"), f"-Wl,-rpath,{lib_dir}", "-lpthread"],
                                capture_output=True, text=True)
        if result.returncode != 0:
            raise RuntimeError(f"g++ failed on {SOURCE}:\n{result.stderr[-2000:]}")
        os.replace(tmp, target)
    finally:
        if os.path.exists(tmp):
            os.remove(tmp)
    return target


def library():
    """Path of the built library, building it on first use; None (after one warning) if that is impossible."""
    if os.environ.get(ENV_SWITCH, "").lower() == "mindspore":
        return None
    if not _state["tried"]:
        _state["tried"] = True
        try:
            _state["library"] = str(build())
        except (OSError, RuntimeError, subprocess.CalledProcessError, StopIteration) as error:
            detail = getattr(error, "stderr", "") or ""
            warnings.warn(f"CPU kernels fall back to MindSpore's operators (convolutions at AVX2): cannot build "
                          f"{SOURCE.name} ({error} {detail.strip()[-500:]})")
    return _state["library"]


def cap_isa_for_mindspore_kernels():
    """For a process that runs MindSpore's own Conv2D (no library, or an exported graph): cap oneDNN at AVX2,
    unless the user chose an ISA. Effective only before the process's first oneDNN call."""
    os.environ.setdefault("ONEDNN_MAX_CPU_ISA", "AVX2")


@contextlib.contextmanager
def mindspore_kernels():
    """Layers built inside use MindSpore's own operators (for export)."""
    previous = _state["forced_off"]
    _state["forced_off"] = True
    try:
        yield
    finally:
        _state["forced_off"] = previous


def enabled() -> bool:
    """True when layers built now run on these kernels: CPU target, library available, not switched off."""
    return (not _state["forced_off"] and ms.get_context("device_target") == "CPU" and library() is not None)


# Geometries the library has entry points for (cpu_kernels.cpp): the same stride on both axes and the same padding on
# every side. Other layers run on MindSpore's kernels.
STRIDES = (1, 2)
PADDINGS = (0, 1, 2, 3)


def _geometry(layer):
    """(stride, padding) of an nn.Conv2d / nn.Conv2dTranspose if the library has kernels for it, else None."""
    if not enabled() or layer.group != 1 or layer.data_format != "NCHW" or set(layer.dilation) != {1}:
        return None
    if layer.pad_mode == "valid":
        pads = {0}
    elif layer.pad_mode == "same":             # with stride 1 and an odd kernel: (k - 1) / 2 on every side
        if set(layer.stride) != {1} or not all(k % 2 for k in layer.kernel_size):
            return None
        pads = {(k - 1) // 2 for k in layer.kernel_size}
    else:
        pads = {layer.padding} if isinstance(layer.padding, int) else set(layer.padding)
    strides = set(layer.stride)
    if len(strides) != 1 or len(pads) != 1 or not strides <= set(STRIDES) or not pads <= set(PADDINGS):
        return None
    return strides.pop(), pads.pop()


def _kernel(name, shape, dtype=lambda *types: types[0], bprop=None):
    return ops.Custom(f"{library()}:{name}", out_shape=shape, out_dtype=dtype, func_type="aot", bprop=bprop)


def _backward_weights_kernel(stride, pad):
    """(x, dy, w, s, layout) -> (dw, db): the weight and bias gradients of conv(x, w * s) + b (w gives dw's
    shape; layout: how x and dy are held, see Conv2d)."""
    return _kernel(f"ConvBackwardWeightsS{stride}P{pad}", lambda x, dy, w, s, layout: [w, [w[0]]],
                   lambda x, dy, w, s, layout: [w, w])


_relu_gradient = ReluGrad()


def _conv_forward(stride, pad, relu):
    """Convolution with filters scaled per output channel, + bias (+ ReLU): (x, w, b, s, layout) ->
    conv(x, w * s) + b, with its gradient (none to s); layout (2,) int32: whether x and y are held blocked."""
    geometry = f"S{stride}P{pad}"
    backward_data = _kernel("ConvBackwardData" + geometry, lambda dy, w, x, s, layout: x)
    backward_weights = _backward_weights_kernel(stride, pad)

    def shape(x, w, b, s, layout):
        return [x[0], w[0], (x[2] + 2 * pad - w[2]) // stride + 1, (x[3] + 2 * pad - w[3]) // stride + 1]

    def bprop(x, w, b, s, layout, out, dout):
        if relu:
            dout = _relu_gradient(dout, out)   # from the ReLU's output (the same layout: elementwise)
        dw, db = backward_weights(x, dout, w, s, layout)
        return backward_data(dout, w, x, s, layout), dw, db, ops.zeros_like(s), ops.zeros_like(layout)
    return _kernel(("ConvReluForward" if relu else "ConvForward") + geometry, shape, bprop=bprop)


def _deconv_forward(stride, pad, relu):
    """Transposed convolution + bias (+ ReLU) (x, w, b) -> y, i.e. a convolution's backward-data pass: dx is a
    convolution of dy, and dw is a convolution's weight gradient with dy as its source."""
    conv_forward = _conv_forward(stride, pad, relu=False)
    backward_weights = _backward_weights_kernel(stride, pad)
    bias_gradient = _kernel("BiasGrad", lambda dy: [dy[1]])        # dy (N, C, H, W) summed per channel

    def shape(x, w, b):
        return [x[0], w[1], (x[2] - 1) * stride - 2 * pad + w[2], (x[3] - 1) * stride - 2 * pad + w[3]]

    def bprop(x, w, b, out, dout):
        if relu:
            dout = _relu_gradient(dout, out)   # from the ReLU's output
        as_conv = ops.ones((w.shape[0],), ms.float32)               # w as a convolution's filters: w[0] outputs
        plain = ops.zeros((2,), ms.int32)
        dw, _ = backward_weights(dout, x, w, as_conv, plain)
        return conv_forward(dout, w, ops.zeros_like(as_conv), as_conv, plain), dw, bias_gradient(dout)
    return _kernel(f"{'DeconvReluForward' if relu else 'DeconvForward'}S{stride}P{pad}", shape, bprop=bprop)


# A convolution's layout flags (input held blocked, output held blocked), indexed 2 * input + output.
_LAYOUTS = tuple(ms.Tensor(np.array(flags, np.int32)) for flags in ((0, 0), (0, 1), (1, 0), (1, 1)))


class Conv2d(nn.Conv2d):
    """nn.Conv2d (same arguments, parameters and checkpoints) on the oneDNN kernels when `enabled()`.

    Beyond nn.Conv2d: `relu(x)` = ReLU(self(x)) and `affine(x, scale, shift, relu)` = [ReLU](conv(x) * scale +
    shift) with per-output-channel scale and shift (a frozen BatchNorm folded in, the layer's bias ignored),
    each one oneDNN call with the bias and the ReLU fused into it. On the kernels, `affine` and `from_blocked`
    also take and give tensors held blocked (oneDNN's nChw16c under the NCHW shape, channels a multiple of
    16): a chain of these convolutions skips the reorders to and from NCHW between them; only elementwise
    operators may touch such a tensor, and `to_plain` / `to_blocked` convert.
    """

    def __init__(self, *args, **kwargs):
        super().__init__(*args, **kwargs)
        geometry = _geometry(self)
        self.onednn = None if geometry is None else _conv_forward(*geometry, relu=False)
        self.onednn_relu = None if geometry is None else _conv_forward(*geometry, relu=True)
        self.no_bias = ms.Tensor(np.zeros((self.out_channels,), np.float32))
        self.unit_scale = ms.Tensor(np.ones((self.out_channels,), np.float32))

    def _run(self, x, bias, scale, relu, blocked_input=False, blocked_output=False):
        if self.onednn is None:
            weight = self.weight if scale is None else self.weight * scale.reshape(-1, 1, 1, 1)
            output = self.conv2d(x, weight)
            if bias is not None:
                output = self.bias_add(output, bias)
            return ops.relu(output) if relu else output
        bias = self.no_bias if bias is None else bias
        scale = self.unit_scale if scale is None else scale
        layout = _LAYOUTS[(2 if blocked_input else 0) + (1 if blocked_output else 0)]
        if relu:
            return self.onednn_relu(x, self.weight, bias, scale, layout)
        return self.onednn(x, self.weight, bias, scale, layout)

    def construct(self, x):
        return self._run(x, self.bias if self.has_bias else None, None, False)

    def relu(self, x):
        return self._run(x, self.bias if self.has_bias else None, None, True)

    def affine(self, x, scale, shift, relu, blocked_input=False, blocked_output=False):
        """[ReLU](conv(x) * scale + shift), scale and shift (out_channels,): the scale is folded into the weights
        (conv(x, w * scale) + shift; on the kernels while they are reordered), so it reaches the weight gradient
        (dw * scale) but gets none itself."""
        return self._run(x, shift, ops.stop_gradient(scale), relu, blocked_input, blocked_output)

    def from_blocked(self, x):
        """self(x) for an x held blocked (kernels only), as NCHW."""
        return self._run(x, self.bias if self.has_bias else None, None, False, True, False)


class Conv2dTranspose(nn.Conv2dTranspose):
    """nn.Conv2dTranspose (same arguments, parameters and checkpoints) on the oneDNN kernels when `enabled()`;
    `relu(x)` = ReLU(self(x)), fused."""

    def __init__(self, *args, **kwargs):
        super().__init__(*args, **kwargs)
        geometry = _geometry(self) if self.pad_mode != "same" and self.output_padding == 0 else None
        self.onednn = None if geometry is None else _deconv_forward(*geometry, relu=False)
        self.onednn_relu = None if geometry is None else _deconv_forward(*geometry, relu=True)
        self.no_bias = ms.Tensor(np.zeros((self.out_channels,), np.float32))

    def _run(self, x, relu):
        if self.onednn is None:
            output = super().construct(x)
            return ops.relu(output) if relu else output
        bias = self.bias if self.has_bias else self.no_bias
        return self.onednn_relu(x, self.weight, bias) if relu else self.onednn(x, self.weight, bias)

    def construct(self, x):
        return self._run(x, False)

    def relu(self, x):
        return self._run(x, True)


ROI_ALIGN_SIZES = (7, 14)     # output sizes the library has RoIAlign entry points for
ROI_ALIGN_LEVELS = 4          # pyramid levels it takes (a graph-mode bprop cannot take *args)


def roi_align_kernel(out_size: int, levels: int):
    """(rois (R, 5), level (R,) int32, settings (1 + L,) = (sample_ratio, stride per level), L maps (B, C, h, w))
    -> (R, C, out_size, out_size), with its gradient to the maps; None where the library cannot run it."""
    if not enabled() or out_size not in ROI_ALIGN_SIZES or levels != ROI_ALIGN_LEVELS:
        return None
    backward = ops.Custom(f"{library()}:RoiAlignBackward{out_size}",
                          out_shape=lambda dout, rois, level, settings, m0, m1, m2, m3: [m0, m1, m2, m3],
                          out_dtype=lambda dout, rois, level, settings, m0, m1, m2, m3: [m0, m1, m2, m3],
                          func_type="aot")

    def bprop(rois, level, settings, m0, m1, m2, m3, out, dout):
        grads = backward(dout, rois, level, settings, m0, m1, m2, m3)
        return ops.zeros_like(rois), ops.zeros_like(level), ops.zeros_like(settings), grads[0], grads[1], grads[2], \
            grads[3]

    return ops.Custom(f"{library()}:RoiAlignForward{out_size}",
                      out_shape=lambda rois, level, settings, m0, m1, m2, m3: [rois[0], m0[1], out_size, out_size],
                      out_dtype=lambda rois, level, settings, m0, m1, m2, m3: m0, func_type="aot", bprop=bprop)


def mask_targets_kernel(out_size: int):
    """(rois (R, 5) = (mask row, x1, y1, x2, y2), settings (2,) = (sample_ratio, stride), masks uint8 (B, M, H, W))
    -> (R, out_size, out_size) float32: 1 where the RoIAlign of mask row b * M + m over the RoI is >= 0.5, else 0
    (roi_align.py's conventions; no gradient). None where the library cannot run it (out_size other than 28)."""
    if not enabled() or out_size != 28:
        return None
    return _kernel(f"MaskTargets{out_size}", lambda rois, settings, masks: [rois[0], out_size, out_size],
                   lambda rois, settings, masks: ms.float32)


def max_iou_assign_kernel():
    """(gt (M, 4), gt_valid (M,) bool, boxes (N, 4), box_valid (N,) bool, thresholds (3,) = (pos_iou, neg_iou,
    min_pos_iou)) -> (assigned_gt (N,) int32, positive (N,) bool, negative (N,) bool): MaxIoUAssigner's result
    (bbox_assign_sample.py, same arithmetic) without the (M, N) IoU matrix; no gradient. None where the library
    cannot run it."""
    if not enabled():
        return None
    return _kernel("MaxIoUAssign", lambda gt, gt_valid, boxes, box_valid, thresholds: [[boxes[0]]] * 3,
                   lambda *types: [ms.int32, ms.bool_, ms.bool_])


def upsample_add_kernel():
    """(coarse (N, C, h, w), lateral (N, C, H, W)) -> lateral + ops.interpolate(coarse, (H, W), mode="nearest"),
    with its gradient; None where the library cannot run it."""
    if not enabled():
        return None
    backward = _kernel("UpsampleAddGrad", lambda dmerged, coarse: coarse)

    def bprop(coarse, lateral, out, dout):
        return backward(dout, coarse), dout
    return _kernel("UpsampleAdd", lambda coarse, lateral: lateral, bprop=bprop)


def _relayout_kernel(name, inverse):
    backward = _kernel(inverse, lambda x: x)

    def bprop(x, out, dout):
        return (backward(dout),)
    return _kernel(name, lambda x: x, bprop=bprop)


def to_plain():
    """(N, C, H, W) held blocked -> the same tensor as NCHW (see Conv2d), with its gradient."""
    return _relayout_kernel("BlockedToPlain", "PlainToBlocked")


def to_blocked():
    """(N, C, H, W) NCHW -> the same tensor held blocked, with its gradient."""
    return _relayout_kernel("PlainToBlocked", "BlockedToPlain")
