"""dabnet::avg_pool3x3s2 (csrc/cpu/avg_pool.cpp), DABNet's input-injection pool: F.avg_pool2d(x, 3,
stride=2, padding=1) to rounding, in both layouts, with the same NaN and infinity propagation."""
import pytest
import torch
import torch.nn.functional as F

from dabnet_kernels import ops

D = torch.ops.dabnet
TOL = {torch.float64: 1e-12, torch.float32: 1e-6, torch.bfloat16: 8e-3, torch.float16: 1e-3}


def _ref(x):
    return F.avg_pool2d(x.double(), 3, stride=2, padding=1)


@pytest.mark.parametrize("dtype", list(TOL))
@pytest.mark.parametrize("shape", [(2, 3, 64, 128), (1, 3, 37, 53), (2, 3, 1, 1), (1, 3, 1, 2),
                                   (1, 3, 2, 1), (1, 3, 5, 4), (2, 19, 9, 16), (1, 1, 7, 8)])
@pytest.mark.parametrize("layout", [torch.contiguous_format, torch.channels_last])
def test_values_and_format(layout, shape, dtype):
    x = torch.randn(shape, dtype=torch.float64).to(dtype).contiguous(memory_format=layout)
    got = D.avg_pool3x3s2(x)
    want = _ref(x)
    assert got.shape == want.shape and got.dtype == dtype
    torch.testing.assert_close(got.double(), want, rtol=0, atol=TOL[dtype])
    if shape[1] > 1 and shape[2] * shape[3] > 1:
        assert got.is_contiguous(memory_format=layout)


@pytest.mark.parametrize("layout", [torch.contiguous_format, torch.channels_last])
def test_layouts_agree_bit_for_bit(layout):
    x = torch.randn(2, 3, 33, 47)
    assert torch.equal(D.avg_pool3x3s2(x.contiguous(memory_format=layout)), D.avg_pool3x3s2(x))


def test_nan_and_infinity_reach_their_windows_only():
    x = torch.zeros(1, 3, 9, 9).contiguous(memory_format=torch.channels_last)
    x[0, 0, 3, 3] = float("nan")  # an odd row and column: in 2 x 2 windows
    x[0, 1, 0, 8] = float("inf")
    got, want = D.avg_pool3x3s2(x), F.avg_pool2d(x, 3, stride=2, padding=1)
    torch.testing.assert_close(got, want, equal_nan=True)
    assert got[0, 0].isnan().sum() == 4 and got[0, 1].isinf().sum() == 1
    assert not got[0, 2].isnan().any()


def test_the_public_function_uses_the_kernel_without_gradient_only():
    x = torch.rand(1, 3, 16, 20).contiguous(memory_format=torch.channels_last)
    assert torch.equal(ops.avg_pool3x3s2(x), D.avg_pool3x3s2(x))
    xg = x.clone().requires_grad_()
    y = ops.avg_pool3x3s2(xg)
    assert y.grad_fn is not None  # ATen's avg_pool2d, differentiable
    (g,) = torch.autograd.grad(y.sum(), xg)
    (want,) = torch.autograd.grad(F.avg_pool2d(xg, 3, stride=2, padding=1).sum(), xg)
    torch.testing.assert_close(g, want)


@pytest.mark.parametrize("layout", [torch.contiguous_format, torch.channels_last])
def test_opcheck(layout):
    x = torch.randn(2, 3, 7, 10, dtype=torch.float64).contiguous(memory_format=layout)
    torch.library.opcheck(D.avg_pool3x3s2, (x,))


@pytest.mark.parametrize("x, match", [
    (torch.rand(3, 8, 8), "4-D"),
    (torch.ones(1, 3, 8, 8, dtype=torch.int32), "floating-point"),
    (torch.rand(1, 3, 0, 8), "non-empty image"),
])
def test_bad_input_is_an_error(x, match):
    with pytest.raises(RuntimeError, match=match):
        D.avg_pool3x3s2(x)
