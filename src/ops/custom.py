"""MindSpore custom operators (ops.Custom, func_type "aot") on the entry points of the built kernel library."""
from mindspore import ops

from src.ops import backend


def kernel(name, shape, dtype=lambda *types: types[0], bprop=None):
    """The library's entry point `name` as an operator; shape / dtype infer the outputs from the inputs'."""
    return ops.Custom(f"{backend.library()}:{name}", out_shape=shape, out_dtype=dtype, func_type="aot", bprop=bprop)


def relayout_pair(name, inverse):
    """A layout conversion whose gradient is the `inverse` conversion."""
    backward = kernel(inverse, lambda x: x)

    def bprop(x, out, dout):
        return (backward(dout),)
    return kernel(name, lambda x: x, bprop=bprop)
