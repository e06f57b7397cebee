"""torch.library.opcheck on every op (schema, fake kernel, autograd registration, AOT dispatch) and
torch.compile(fullgraph=True) through the public functions."""
import pytest
import torch

from dabnet_kernels import ops, reference
from helpers import bn_params, dw_weight, make_input, tol

D = torch.ops.dabnet


def _samples(layout):
    x = make_input((2, 3, 5, 6), layout, requires_grad=True)
    w = dw_weight(3, "h").requires_grad_()
    p = bn_params(3)
    bw, bb, a = (t.clone().requires_grad_() for t in (p.weight, p.bias, p.prelu_weight))
    g = torch.randn(2, 3, 5, 6, dtype=torch.float64)
    fw = torch.randn(4, 3, 3, dtype=torch.float64)
    v = lambda: torch.randn(4, 3, dtype=torch.float64)  # noqa: E731
    c = lambda: torch.rand(3, dtype=torch.float64)  # noqa: E731
    return [
        (D.dwconv3, (x, w, 2)),
        (D.dwconv3_backward, (g, x.detach(), w.detach(), 2, [True, True])),
        (D.bn_prelu, (x, bw, bb, None, None, a, True, 1e-3)),
        (D.bn_prelu, (x, bw, bb, p.running_mean, p.running_var, a, False, 1e-3)),
        (D.bn_prelu_backward, (g, x.detach(), p.weight, p.bias, p.prelu_weight, p.running_mean,
                               p.running_var, True, 1e-3, [True, True, True, True])),
        (D.dwconv3_bn_prelu, (x, w, 3, bw, bb, None, None, a, True, 1e-3)),
        (D.dwconv3_bn_prelu, (x, w, 3, bw, bb, p.running_mean, p.running_var, a, False, 1e-3)),
        (D.dab_neck, (x.detach(), fw, v(), v(), c(), c(), c(), 2)),
    ]


@pytest.mark.parametrize("layout", ["nchw", "channels_last"])
@pytest.mark.parametrize("index", range(8))
def test_opcheck(index, layout):
    op, args = _samples(layout)[index]
    torch.library.opcheck(op, args)


def test_compile_fullgraph_training_step():
    torch._dynamo.reset()
    C = 4
    w = dw_weight(C, "w", torch.float32).requires_grad_()
    p = bn_params(C, torch.float32, nbt=True)

    def f(x, w, rm, rv, nbt):
        y = ops.dwconv3_bn_prelu(x, w, 2, p.weight, p.bias, rm, rv, p.prelu_weight, True, None,
                                 1e-3, nbt)
        return ops.bn_prelu(ops.dwconv3(y, w, 1), p.weight, p.bias, None, None, p.prelu_weight,
                            True)

    compiled = torch.compile(f, fullgraph=True, backend="aot_eager")
    x = make_input((2, C, 6, 7), "channels_last", torch.float32, requires_grad=True)
    x2 = x.detach().clone().requires_grad_()
    w2 = w.detach().clone().requires_grad_()
    s1 = [p.running_mean.clone(), p.running_var.clone(), torch.zeros((), dtype=torch.long)]
    s2 = [t.clone() for t in s1]
    out = compiled(x, w, *s1)
    ref = f(x2, w2, *s2)
    torch.testing.assert_close(out, ref, **tol(torch.float32))
    out.square().sum().backward()
    ref.square().sum().backward()
    torch.testing.assert_close(x.grad, x2.grad, rtol=1e-4, atol=1e-4)
    torch.testing.assert_close(w.grad, w2.grad, rtol=1e-4, atol=1e-4)
    for a, b in zip(s1, s2):
        torch.testing.assert_close(a, b)


def test_compile_fullgraph_inductor_eval_neck():
    torch._dynamo.reset()
    C = 4
    weights = [dw_weight(C, a, torch.float32) for a in "hwhw"]
    bns = [bn_params(C, torch.float32) for _ in range(5)]
    f = torch.compile(lambda x: ops.dab_neck(x, weights, bns, 2), fullgraph=True)
    x = make_input((1, C, 8, 9), "nchw", torch.float32)
    with torch.no_grad():
        torch.testing.assert_close(f(x), reference.dab_neck(x, weights, bns, 2),
                                   rtol=1e-4, atol=1e-4)
