import pytest
import torch

from dabnet_kernels import ops, reference
from helpers import DILATIONS, LAYOUTS, bn_params, clone_params, dw_weight, make_input, tol


def neck_params(C, dtype=torch.float64, single_slope=False):
    weights = [dw_weight(C, a, dtype) for a in ("h", "w", "h", "w")]
    return weights, [bn_params(C, dtype, single_slope=single_slope, nbt=True) for _ in range(5)]


@pytest.mark.parametrize("layout", LAYOUTS)
@pytest.mark.parametrize("dilation", DILATIONS + (25,))
@pytest.mark.parametrize("shape", [(1, 3, 7, 9), (3, 4, 12, 5)])
def test_eval_fused_matches_reference(shape, dilation, layout):
    x = make_input(shape, layout)
    weights, bns = neck_params(shape[1])
    with torch.no_grad():
        out = ops.dab_neck(x, weights, bns, dilation)
        ref = reference.dab_neck(x, weights, bns, dilation)
    torch.testing.assert_close(out, ref, **tol(x.dtype))
    fmt = torch.channels_last if layout == "channels_last" else torch.contiguous_format
    assert out.is_contiguous(memory_format=fmt)


@pytest.mark.parametrize("layout", ["nchw", "channels_last"])
@pytest.mark.parametrize("dilation", [1, 3, 16])
@pytest.mark.parametrize("slopes", ["unit", "mixed"])
def test_eval_fused_slopes_in_and_out_of_unit_interval(slopes, dilation, layout):
    """The CPU kernel runs a cheaper PReLU, max(y, slope*y), for channels whose slopes all lie in
    [0, 1] (the usual case: PReLU starts at 0.25); random slopes of both signs rarely hit it."""
    C = 6
    x = make_input((2, C, 11, 13), layout)
    weights, bns = neck_params(C)
    for k, p in enumerate(bns):
        p.prelu_weight.copy_(torch.rand(C, dtype=torch.float64))
        p.prelu_weight[0], p.prelu_weight[1] = 0.0, 1.0  # the interval's ends
        if slopes == "mixed":  # channels 2 and 3 leave it, each through one of its 5 slopes
            p.prelu_weight[2] = 1.5 if k == 1 else p.prelu_weight[2]
            p.prelu_weight[3] = -0.2 if k == 4 else p.prelu_weight[3]
    with torch.no_grad():
        out = ops.dab_neck(x, weights, bns, dilation)
        ref = reference.dab_neck(x, weights, bns, dilation)
    torch.testing.assert_close(out, ref, **tol(x.dtype))


@pytest.mark.parametrize("layout", ["nchw", "channels_last"])
@pytest.mark.parametrize("dilation", [2, 16])
def test_eval_fused_float32_single_slope(dilation, layout):
    x = make_input((2, 32, 32, 64), layout, torch.float32)
    weights, bns = neck_params(32, torch.float32, single_slope=True)
    with torch.no_grad():
        out = ops.dab_neck(x, weights, bns, dilation)
        ref = reference.dab_neck(x, weights, bns, dilation)
    torch.testing.assert_close(out, ref, rtol=1e-4, atol=1e-4)


@pytest.mark.parametrize("C", [32, 64])
@pytest.mark.parametrize("dilation", [1, 4, 30])
@pytest.mark.parametrize("slopes", ["unit", "mixed"])
def test_eval_fused_channels_last_at_dabnets_widths(C, dilation, slopes):
    """C = 32 and 64 (DABNet's necks) take channels_last code specialised on C; dilation 30
    exceeds both H and W (every shifted tap is padding), and out-of-[0, 1] slopes take the
    general PReLU."""
    x = make_input((2, C, 9, 20), "channels_last", torch.float32)
    weights, bns = neck_params(C, torch.float32)
    for k, p in enumerate(bns):
        p.prelu_weight.copy_(torch.rand(C))
        if slopes == "mixed":
            p.prelu_weight[C - 1] = -0.5 if k == 3 else p.prelu_weight[C - 1]
    with torch.no_grad():
        out = ops.dab_neck(x, weights, bns, dilation)
        ref = reference.dab_neck(x.double(), [w.double() for w in weights],
                                 [type(p)(*(t.double() if t is not None else None for t in p))
                                  for p in bns], dilation)
    torch.testing.assert_close(out.double(), ref, rtol=1e-4, atol=1e-4)
    assert out.is_contiguous(memory_format=torch.channels_last)


def test_fold_mixed_parameter_forms():
    """fold_dab_neck stacks the five BNs' vectors at once; BNs without affine parameters
    (affine=False) and a single PReLU slope next to per-channel ones take the general path of
    that stacking."""
    C = 5
    x = make_input((2, C, 9, 10))
    weights, bns = neck_params(C)
    bns[1] = bns[1]._replace(weight=None, bias=None)
    bns[2] = bns[2]._replace(prelu_weight=torch.tensor([0.3], dtype=torch.float64))
    with torch.no_grad():
        out = ops.dab_neck(x, weights, bns, 2)
        ref = reference.dab_neck(x, weights, bns, 2)
    torch.testing.assert_close(out, ref, rtol=1e-6, atol=1e-6)


def test_fused_kernel_is_used_in_eval(monkeypatch):
    calls = []
    real = torch.ops.dabnet.dab_neck

    class Spy:
        def __getattr__(self, name):
            return getattr(torch.ops.dabnet, name)

        def dab_neck(self, *a):
            calls.append(1)
            return real(*a)

    monkeypatch.setattr(ops, "ops_for", lambda x: Spy())
    x = make_input((1, 4, 6, 6))
    weights, bns = neck_params(4)
    with torch.no_grad():
        ops.dab_neck(x, weights, bns, 2)
    assert calls == [1]
    ops.dab_neck(x, weights, bns, 2, training=True)
    assert calls == [1]  # training composes the differentiable ops instead


@pytest.mark.parametrize("momentum", [0.1, None])
def test_training_composes_exactly(momentum):
    x = make_input((2, 4, 8, 9), requires_grad=True)
    xr = x.detach().clone().requires_grad_()
    weights, bns = neck_params(4)
    wr = [w.clone().requires_grad_() for w in weights]
    weights = [w.requires_grad_() for w in weights]
    bnr = [clone_params(p) for p in bns]
    g = torch.randn(2, 4, 8, 9, dtype=torch.float64)
    for _ in range(2):
        ops.dab_neck(x, weights, bns, 3, training=True, momentum=momentum).backward(g)
        reference.dab_neck(xr, wr, bnr, 3, training=True, momentum=momentum).backward(g)
    torch.testing.assert_close(x.grad, xr.grad, **tol(x.dtype))
    for a, b in zip(weights, wr):
        torch.testing.assert_close(a.grad, b.grad, **tol(x.dtype))
    for p, q in zip(bns, bnr):
        torch.testing.assert_close(p.running_mean, q.running_mean, **tol(x.dtype))
        torch.testing.assert_close(p.running_var, q.running_var, **tol(x.dtype))
        assert int(p.num_batches_tracked) == int(q.num_batches_tracked) == 2


def test_eval_with_grad_is_differentiable():
    x = make_input((1, 3, 6, 7), requires_grad=True)
    weights, bns = neck_params(3)
    assert torch.autograd.gradcheck(lambda x: ops.dab_neck(x, weights, bns, 2), (x,))
