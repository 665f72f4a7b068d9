"""Convolution speed on this CPU: MindSpore's own Conv2D (oneDNN capped at AVX2) against ours (src/ops/conv.py).

    python bench/bench_conv.py [--repeats 5]

The layers are the model's heaviest convolution shapes at 384x640, batch 2. Each backend runs in its own process
(oneDNN's ISA cap is per process): "mindspore" with MASKRCNN_CPU_KERNELS=mindspore, "ours" with the defaults
(the kernels built by `python -m src.ops.build`).
Prints ms per call (median) for the forward pass and for the gradients (input and weights; MindSpore
does not run the forward pass for them, a convolution being linear).
"""
import argparse
import json
import os
import subprocess
import sys
import time

import numpy as np

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, ROOT)

# name: (input shape, out channels, kernel, stride, transposed)
LAYERS = {
    "FPN/RPN 3x3 256->256 at P2": ((2, 256, 96, 160), 256, 3, 1, False),
    "ResNet layer1 3x3 64->64": ((2, 64, 96, 160), 64, 3, 1, False),
    "ResNet layer1 1x1 64->256": ((2, 64, 96, 160), 256, 1, 1, False),
    "ResNet layer3 3x3 256->256 stride 2": ((2, 256, 48, 80), 256, 3, 2, False),
    "ResNet layer3 1x1 1024->256": ((2, 1024, 24, 40), 256, 1, 1, False),
    "mask head 3x3 256->256, 96 RoIs": ((96, 256, 14, 14), 256, 3, 1, False),
    "mask head deconv 2x2 256->256, 96 RoIs": ((96, 256, 14, 14), 256, 2, 2, True),
}
BACKENDS = ("mindspore", "ours")


def _median_ms(run, repeats):
    run()
    times = []
    for _ in range(repeats):
        start = time.perf_counter()
        run()
        times.append(time.perf_counter() - start)
    return float(np.median(times)) * 1000


def measure(repeats):
    """This process's backend: {layer: (forward ms, gradients ms)}."""
    import mindspore as ms
    from mindspore import nn, ops

    from src.ops import backend, conv
    ms.set_context(mode=ms.GRAPH_MODE)
    ms.set_device("CPU")
    if not backend.switched_off() and not backend.enabled():
        sys.exit("the CPU kernels are not built: run python -m src.ops.build")

    class Gradients(nn.Cell):
        def __init__(self, layer):
            super().__init__()
            self.layer = layer
            self.grad = ops.GradOperation(get_all=True, get_by_list=True)
            self.params = ms.ParameterTuple(layer.trainable_params())

        def construct(self, x):
            return self.grad(self.layer, self.params)(x)

    results = {}
    for name, (shape, out_channels, kernel, stride, transposed) in LAYERS.items():
        if transposed:
            layer = conv.Conv2dTranspose(shape[1], out_channels, kernel, stride=stride, pad_mode="valid")
        else:
            layer = conv.Conv2d(shape[1], out_channels, kernel, stride=stride, pad_mode="pad", padding=kernel // 2)
        x = ms.Tensor(np.random.default_rng(0).standard_normal(shape).astype(np.float32))
        gradients = Gradients(layer)
        forward = _median_ms(lambda: layer(x).asnumpy(), repeats)
        backward = _median_ms(lambda: [g.asnumpy() for group in gradients(x) for g in group], repeats)
        results[name] = (forward, backward)
    return results


def main():
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--repeats", type=int, default=5)
    parser.add_argument("--backend", choices=BACKENDS, help=argparse.SUPPRESS)   # the child processes
    args = parser.parse_args()
    if args.backend:
        print(json.dumps(measure(args.repeats)))
        return
    results = {}
    for backend in BACKENDS:
        env = dict(os.environ)
        env.pop("ONEDNN_MAX_CPU_ISA", None)
        if backend == "mindspore":
            env["MASKRCNN_CPU_KERNELS"] = "mindspore"      # src/ops/backend.py ENV_SWITCH
        else:
            env.pop("MASKRCNN_CPU_KERNELS", None)
        out = subprocess.run([sys.executable, __file__, "--backend", backend, "--repeats", str(args.repeats)],
                             env=env, check=True, capture_output=True, text=True).stdout
        results[backend] = json.loads(out.strip().splitlines()[-1])
    print(f"load {os.getloadavg()[0]:.1f}; ms per call, median of {args.repeats}")
    print("| layer (batch 2 at 384x640) | forward: MindSpore | forward: ours | gradients: MindSpore "
          "| gradients: ours | ratio (gradients) |")
    print("|---|---|---|---|---|---|")
    for name in LAYERS:
        (fm, gm), (fc, gc) = results["mindspore"][name], results["ours"][name]
        print(f"| {name} | {fm:,.1f} | {fc:,.1f} | {gm:,.1f} | {gc:,.1f} | {gc / gm:.2f} |")


if __name__ == "__main__":
    main()
