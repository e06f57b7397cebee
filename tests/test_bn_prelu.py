import pytest
import torch
import torch.nn as nn

from dabnet_kernels import ops, reference
from helpers import LAYOUTS, bn_params, clone_params, make_input, tol


@pytest.mark.parametrize("single_slope", [False, True])
@pytest.mark.parametrize("training", [True, False])
@pytest.mark.parametrize("layout", LAYOUTS)
@pytest.mark.parametrize("shape", [(1, 3, 7, 9), (3, 5, 4, 6)])
def test_matches_reference(shape, layout, training, single_slope):
    x = make_input(shape, layout)
    p = bn_params(shape[1], single_slope=single_slope)
    q = clone_params(p)
    out = ops.bn_prelu(x, *p[:5], training)
    ref = reference.bn_prelu(x, *q[:5], training)
    torch.testing.assert_close(out, ref, **tol(x.dtype))
    torch.testing.assert_close(p.running_mean, q.running_mean, **tol(x.dtype))
    torch.testing.assert_close(p.running_var, q.running_var, **tol(x.dtype))


@pytest.mark.parametrize("momentum", [0.1, 0.5, None])
@pytest.mark.parametrize("layout", ["nchw", "channels_last"])
def test_running_stats_follow_batchnorm2d(momentum, layout):
    C = 6
    bn = nn.BatchNorm2d(C, eps=1e-3, momentum=momentum).double()
    rm, rv = bn.running_mean.clone(), bn.running_var.clone()
    nbt = bn.num_batches_tracked.clone()
    prelu = torch.full((C,), 0.25, dtype=torch.float64)
    for step in range(5):
        x = make_input((4, C, 5, 7), layout) * (step + 1) + step
        expected = torch.nn.functional.prelu(bn(x), prelu)
        out = ops.bn_prelu(x, bn.weight, bn.bias, rm, rv, prelu, True, momentum, 1e-3, nbt)
        torch.testing.assert_close(out, expected, **tol(x.dtype))
    torch.testing.assert_close(rm, bn.running_mean, **tol(torch.float64))
    torch.testing.assert_close(rv, bn.running_var, **tol(torch.float64))
    assert int(nbt) == int(bn.num_batches_tracked) == 5


def test_float32_running_stats_and_grads_match_module():
    C = 8
    bn, act = nn.BatchNorm2d(C, eps=1e-3), nn.PReLU(C)
    p = reference.BNPReLUParams(bn.weight.detach().clone().requires_grad_(),
                                bn.bias.detach().clone().requires_grad_(),
                                bn.running_mean.clone(), bn.running_var.clone(),
                                act.weight.detach().clone().requires_grad_())
    for _ in range(3):
        x = make_input((4, C, 9, 11), "channels_last", torch.float32) * 3 + 1
        g = torch.randn(4, C, 9, 11)
        x1, x2 = x.clone().requires_grad_(), x.clone().requires_grad_()
        ops.bn_prelu(x1, *p[:5], True).backward(g)
        act(bn(x2)).backward(g)
        torch.testing.assert_close(x1.grad, x2.grad, rtol=1e-4, atol=1e-5)
    torch.testing.assert_close(p.running_mean, bn.running_mean)
    torch.testing.assert_close(p.running_var, bn.running_var)
    for mine, theirs in ((p.weight, bn.weight), (p.bias, bn.bias), (p.prelu_weight, act.weight)):
        torch.testing.assert_close(mine.grad, theirs.grad, rtol=1e-4, atol=1e-4)


@pytest.mark.parametrize("single_slope", [False, True])
@pytest.mark.parametrize("training", [True, False])
@pytest.mark.parametrize("layout", LAYOUTS)
def test_gradcheck(layout, training, single_slope):
    x = make_input((2, 3, 4, 5), layout, requires_grad=True)
    p = bn_params(3, single_slope=single_slope)
    w, b, a = (t.clone().requires_grad_() for t in (p.weight, p.bias, p.prelu_weight))

    def f(x, w, b, a):
        return ops.bn_prelu(x, w, b, p.running_mean.clone(), p.running_var.clone(), a, training)

    assert torch.autograd.gradcheck(f, (x, w, b, a))


def test_eval_without_running_stats_uses_batch_stats():
    x = make_input((2, 4, 3, 5))
    p = bn_params(4)
    out = ops.bn_prelu(x, p.weight, p.bias, None, None, p.prelu_weight, False)
    ref = reference.bn_prelu(x, p.weight, p.bias, None, None, p.prelu_weight, False)
    torch.testing.assert_close(out, ref, **tol(x.dtype))


def test_no_affine():
    x = make_input((2, 4, 3, 5))
    p = bn_params(4)
    out = ops.bn_prelu(x, None, None, p.running_mean, p.running_var, p.prelu_weight, False)
    ref = reference.bn_prelu(x, None, None, p.running_mean, p.running_var, p.prelu_weight, False)
    torch.testing.assert_close(out, ref, **tol(x.dtype))


@pytest.mark.parametrize("training", [True, False])
def test_empty_batch(training):
    x = torch.empty(0, 4, 5, 6, dtype=torch.float64)
    p = bn_params(4)
    rm = p.running_mean.clone()
    out = ops.bn_prelu(x, *p[:5], training)
    assert out.shape == x.shape
    assert torch.equal(rm, p.running_mean)  # an empty batch does not move the statistics
