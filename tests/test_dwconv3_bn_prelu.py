import pytest
import torch

from dabnet_kernels import ops, reference
from conftest import requires_cuda
from helpers import DILATIONS, LAYOUTS, bn_params, clone_params, dw_weight, make_input, tol


@pytest.mark.parametrize("training", [True, False])
@pytest.mark.parametrize("along", ["h", "w"])
@pytest.mark.parametrize("layout", LAYOUTS)
@pytest.mark.parametrize("dilation", DILATIONS + (30,))
def test_matches_reference(dilation, layout, along, training):
    x = make_input((3, 4, 9, 11), layout)
    w = dw_weight(4, along)
    p = bn_params(4)
    q = clone_params(p)
    out = ops.dwconv3_bn_prelu(x, w, dilation, *p[:5], training)
    ref = reference.dwconv3_bn_prelu(x, w, dilation, *q[:5], training)
    torch.testing.assert_close(out, ref, **tol(x.dtype))
    torch.testing.assert_close(p.running_var, q.running_var, **tol(x.dtype))


@pytest.mark.parametrize("training", [True, False])
@pytest.mark.parametrize("layout", ["nchw", "channels_last"])
def test_float32_with_grads(layout, training):
    x = make_input((2, 16, 17, 20), layout, torch.float32)
    w = dw_weight(16, "w", torch.float32)
    p = bn_params(16, torch.float32)
    leaves = [x, w, p.weight, p.bias, p.prelu_weight]
    a = [t.clone().requires_grad_() for t in leaves]
    b = [t.clone().requires_grad_() for t in leaves]
    g = torch.randn(2, 16, 17, 20)
    ops.dwconv3_bn_prelu(a[0], a[1], 4, a[2], a[3], p.running_mean.clone(),
                         p.running_var.clone(), a[4], training).backward(g)
    reference.dwconv3_bn_prelu(b[0], b[1], 4, b[2], b[3], p.running_mean.clone(),
                               p.running_var.clone(), b[4], training).backward(g)
    for u, v in zip(a, b):
        torch.testing.assert_close(u.grad, v.grad, rtol=1e-3, atol=1e-4)


@pytest.mark.parametrize("training", [True, False])
@pytest.mark.parametrize("layout", LAYOUTS)
@pytest.mark.parametrize("along", ["h", "w"])
def test_gradcheck(along, layout, training):
    x = make_input((2, 3, 5, 6), layout, requires_grad=True)
    w = dw_weight(3, along).requires_grad_()
    p = bn_params(3)
    bw, bb, a = (t.clone().requires_grad_() for t in (p.weight, p.bias, p.prelu_weight))

    def f(x, w, bw, bb, a):
        return ops.dwconv3_bn_prelu(x, w, 2, bw, bb, p.running_mean.clone(),
                                    p.running_var.clone(), a, training)

    assert torch.autograd.gradcheck(f, (x, w, bw, bb, a))


@pytest.mark.parametrize("device", ["cpu", pytest.param("cuda", marks=requires_cuda)])
@pytest.mark.parametrize("layout", ["nchw", "channels_last"])
@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16, torch.float32])
def test_eval_backward_takes_the_forwards_prelu_branch(dtype, layout, device):
    """In eval (e.g. fine-tuning with frozen BatchNorm) the backward recomputes the conv, then the
    BN output, to pick PReLU's branch; the forward must round and normalize the same way, or
    pre-activations within rounding of 0 get the other branch's gradient (in bfloat16, hundreds
    of pixels per million did when the forward folded BN into the taps). With only the centre
    tap, grad_x = tap * scale * (1 where the output is positive, else the slope)."""
    torch.manual_seed(0)
    C = 16
    x = make_input((1, C, 128, 128), layout, torch.float32).to(device, dtype).requires_grad_()
    w = torch.zeros(C, 1, 1, 3)
    w[:, 0, 0, 1] = torch.rand(C) + 0.5
    w = w.to(device, dtype)
    mean, var = torch.randn(C).to(device, dtype), (torch.rand(C) + 0.5).to(device, dtype)
    opt = dict(dtype=dtype, device=device)
    one, zero, slope = torch.ones(C, **opt), torch.zeros(C, **opt), torch.full((C,), 0.25, **opt)
    y = ops.dwconv3_bn_prelu(x, w, 1, one, zero, mean, var, slope, False)
    y.backward(torch.ones_like(y))
    scale = w[:, 0, 0, 1].float() / torch.sqrt(var.float() + 1e-3)
    factor = x.grad.float() / scale.view(1, C, 1, 1)  # 1 or 0.25 (to rounding)
    nonzero = y.float() != 0  # an output rounded to 0 does not show its branch
    positive = y.float() > 0
    wrong = ((factor > 0.6) != positive) & nonzero
    assert wrong.sum().item() == 0, f"{wrong.sum().item()} pixels took the other branch"
