"""src/ops/upsample_add.py: the FPN merge kernel against ops.interpolate + add, values and gradients."""
import mindspore as ms
import numpy as np
import pytest
from mindspore import nn, ops

from src.ops import backend
from src.ops.upsample_add import UpsampleAdd


class _Merge(nn.Cell):
    """The FPN merge lateral + nearest upsampling of coarse, and the gradients of sum(merge * weights) with
    respect to both inputs."""

    def __init__(self, merge):
        super().__init__()
        self.merge = merge
        self.grad = ops.GradOperation(get_all=True)

    def construct(self, coarse, lateral, weights):
        return self.merge(coarse, lateral), self.grad(lambda c, l: (self.merge(c, l) * weights).sum())(coarse, lateral)


@pytest.mark.parametrize("coarse_hw, fine_hw", [((3, 5), (6, 10)), ((3, 5), (5, 9)), ((4, 4), (7, 11))])
def test_upsample_add_matches_nearest_interpolate_and_its_gradient(coarse_hw, fine_hw):
    """Exact 2x (even sizes) and the uneven sizes of inputs that are not multiples of the coarsest stride."""
    rng = np.random.default_rng(1)
    coarse = ms.Tensor(rng.standard_normal((2, 3) + coarse_hw).astype(np.float32))
    lateral = ms.Tensor(rng.standard_normal((2, 3) + fine_hw).astype(np.float32))
    weights = ms.Tensor(rng.standard_normal((2, 3) + fine_hw).astype(np.float32))
    fast = UpsampleAdd()
    with backend.use_mindspore_kernels():
        reference = UpsampleAdd()
    assert fast.uses_kernel and not reference.uses_kernel
    (merged, (d_coarse, d_lateral)), (merged_ref, (d_coarse_ref, d_lateral_ref)) = (
        _Merge(fast)(coarse, lateral, weights), _Merge(reference)(coarse, lateral, weights))
    np.testing.assert_array_equal(merged.asnumpy(), merged_ref.asnumpy())
    np.testing.assert_allclose(d_coarse.asnumpy(), d_coarse_ref.asnumpy(), rtol=1e-5, atol=1e-6)
    np.testing.assert_array_equal(d_lateral.asnumpy(), d_lateral_ref.asnumpy())


@pytest.mark.parametrize("coarse_hw, fine_hw", [((3, 5), (6, 10)), ((3, 5), (5, 9)), ((4, 4), (7, 11))])
def test_onnx_export_variant_gives_the_same_merge(coarse_hw, fine_hw):
    """ResizeNearestNeighbor (built for ONNX export) picks the cells ops.interpolate picks, also at uneven sizes."""
    rng = np.random.default_rng(2)
    coarse = ms.Tensor(rng.standard_normal((1, 3) + coarse_hw).astype(np.float32))
    lateral = ms.Tensor(rng.standard_normal((1, 3) + fine_hw).astype(np.float32))
    with backend.use_mindspore_kernels():
        reference = UpsampleAdd()
    with backend.use_mindspore_kernels(onnx=True):
        exported = UpsampleAdd()
    assert exported.onnx_export and not reference.onnx_export and not backend.onnx_export()
    np.testing.assert_array_equal(exported(coarse, lateral).asnumpy(), reference(coarse, lateral).asnumpy())
