"""Helpers for the module / model tests: random BN-PReLU state and lock-step comparison of two
models (outputs, input and parameter gradients, buffers) over several SGD steps."""
import torch
import torch.nn as nn


@torch.no_grad()
def randomize_bn_prelu(model: nn.Module) -> nn.Module:
    """Non-default BatchNorm affine parameters / running statistics and PReLU slopes of both
    signs, so that the tests see every term (fresh modules have weight 1, bias 0, ...)."""
    for m in model.modules():
        if isinstance(m, nn.BatchNorm2d):
            if m.affine:
                m.weight.normal_(1.0, 0.3)
                m.bias.normal_(0.0, 0.3)
            if m.running_mean is not None:
                m.running_mean.normal_(0.0, 0.3)
                m.running_var.uniform_(0.5, 1.5)
        elif isinstance(m, nn.PReLU):
            m.weight.normal_(0.0, 0.4)
    return model


def _named(items, by_order):
    return {(i if by_order else n): t for i, (n, t) in enumerate(items)}


def assert_same_steps(a: nn.Module, b: nn.Module, x: torch.Tensor, steps: int = 3,
                      training: bool = True, rtol: float = 1e-9, atol: float = 1e-9,
                      lr: float = 0.05, by_order: bool = False):
    """Runs a and b side by side for `steps` forward/backward/SGD steps and asserts equal
    outputs, input gradients, parameter gradients and buffers at every step, matched by name
    (by registration order with by_order=True, for modules whose children are named apart)."""
    a.train(training)
    b.train(training)
    pa, pb = _named(a.named_parameters(), by_order), _named(b.named_parameters(), by_order)
    assert pa.keys() == pb.keys()
    for step in range(steps):
        xa = x.detach().clone().requires_grad_()
        xb = x.detach().clone().requires_grad_()
        oa, ob = a(xa), b(xb)
        torch.testing.assert_close(oa, ob, rtol=rtol, atol=atol, msg=lambda m: f"step {step}: {m}")
        g = torch.randn_like(oa)
        oa.backward(g)
        ob.backward(g)
        torch.testing.assert_close(xa.grad, xb.grad, rtol=rtol, atol=atol)
        for name in pa:
            torch.testing.assert_close(pa[name].grad, pb[name].grad, rtol=rtol, atol=atol,
                                       msg=lambda m: f"step {step}, grad of {name}: {m}")
        ba, bb = _named(a.named_buffers(), by_order), _named(b.named_buffers(), by_order)
        assert ba.keys() == bb.keys()
        for name in ba:
            torch.testing.assert_close(ba[name], bb[name], rtol=rtol, atol=atol,
                                       msg=lambda m: f"step {step}, buffer {name}: {m}")
        with torch.no_grad():
            for p in list(pa.values()) + list(pb.values()):
                p -= lr * p.grad.clamp(-1, 1)  # clipped: the next step stays well conditioned
                p.grad = None


def assert_as_accurate(truth: nn.Module, ref: nn.Module, test: nn.Module, x: torch.Tensor,
                       steps: int = 1, training: bool = True, lr: float = 0.005,
                       factor: float = 4.0, rel: float = 1e-5):
    """Low-precision check: `test` and `ref` (e.g. fused and unfused float32 copies) run in lock
    step with a float64 `truth`; at every step the relative error (Frobenius norm) of each
    output, input gradient, parameter gradient and buffer of `test` must be at most
    factor * (ref's relative error) + rel. Comparing two float32 runs directly says little: BN
    backward cancels heavily, and training steps amplify rounding (see tests/test_model.py)."""
    mods = (truth, ref, test)
    for m in mods:
        m.train(training)
    params = [dict(m.named_parameters()) for m in mods]
    assert params[0].keys() == params[1].keys() == params[2].keys()

    def check(what, t, r, s):
        t, r, s = t.double(), r.double(), s.double()
        scale = max(t.norm().item(), 1e-30)
        bound = factor * (r - t).norm().item() / scale + rel
        err = (s - t).norm().item() / scale
        assert err <= bound, f"step {step}, {what}: relative error {err:.3g} > bound {bound:.3g}"

    for step in range(steps):
        g = None
        res = []
        for m in mods:
            dtype = next(m.parameters()).dtype
            xx = x.to(dtype).clone().requires_grad_()
            out = m(xx)
            g = torch.randn(out.shape, dtype=torch.float64, device=out.device) if g is None else g
            out.backward(g.to(dtype))
            res.append((out, xx.grad, dict(m.named_buffers())))
        check("output", res[0][0], res[1][0], res[2][0])
        check("input gradient", res[0][1], res[1][1], res[2][1])
        for name in params[0]:
            check(f"grad of {name}", *(p[name].grad for p in params))
        for name, buf in res[0][2].items():
            check(f"buffer {name}", buf, res[1][2][name], res[2][2][name])
        with torch.no_grad():
            for p in (q for d in params for q in d.values()):
                p -= lr * p.grad.clamp(-1, 1)
                p.grad = None
