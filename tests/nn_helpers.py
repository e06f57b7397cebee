"""Helpers for the module / model tests: random BN-PReLU state and lock-step comparison of two
models (outputs, input and parameter gradients, buffers) over several SGD steps."""
import torch
import torch.nn as nn


@torch.no_grad()
def randomize_bn_prelu(model: nn.Module, kinks: bool = True) -> nn.Module:
    """Non-default BatchNorm affine parameters / running statistics and PReLU slopes of both
    signs, so that the tests see every term (fresh modules have weight 1, bias 0, ...).
    kinks=False sets every PReLU slope to 1 instead, for float32 accuracy tests (see
    assert_as_accurate): PReLU is then the identity in value, with no kink that rounding can move
    a pre-activation across; the slope's gradient is still computed and compared."""
    for m in model.modules():
        if isinstance(m, nn.BatchNorm2d):
            if m.affine:
                m.weight.normal_(1.0, 0.3)
                m.bias.normal_(0.0, 0.3)
            if m.running_mean is not None:
                m.running_mean.normal_(0.0, 0.3)
                m.running_var.uniform_(0.5, 1.5)
        elif isinstance(m, nn.PReLU):
            m.weight.normal_(0.0, 0.4) if kinks else m.weight.fill_(1.0)
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


def accuracy_errors(truth: nn.Module, ref: nn.Module, test: nn.Module, x: torch.Tensor,
                    steps: int = 1, training: bool = True, lr: float = 0.005) -> dict:
    """Runs `ref` and `test` (e.g. unfused and fused float32 copies) in lock step with a float64
    `truth` and returns {"step s, what": (ref's error, test's error)}: the relative error
    (Frobenius norm) against truth of each output, input gradient, parameter gradient and
    buffer, at every step."""
    mods = (truth, ref, test)
    for m in mods:
        m.train(training)
    params = [dict(m.named_parameters()) for m in mods]
    assert params[0].keys() == params[1].keys() == params[2].keys()
    errs = {}

    def record(what, t, r, s):
        t, r, s = t.double(), r.double(), s.double()
        scale = max(t.norm().item(), 1e-30)
        errs[f"step {step}, {what}"] = ((r - t).norm().item() / scale,
                                        (s - t).norm().item() / scale)

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
        record("output", res[0][0], res[1][0], res[2][0])
        record("input gradient", res[0][1], res[1][1], res[2][1])
        for name in params[0]:
            record(f"grad of {name}", *(p[name].grad for p in params))
        for name, buf in res[0][2].items():
            record(f"buffer {name}", buf, res[1][2][name], res[2][2][name])
        with torch.no_grad():
            for p in (q for d in params for q in d.values()):
                p -= lr * p.grad.clamp(-1, 1)
                p.grad = None
    return errs


def assert_as_accurate(make, seeds=range(3), steps: int = 1, training: bool = True,
                       lr: float = 0.005, factor: float = 4.0, rel: float = 1e-5):
    """Low-precision check. make(seed) -> (truth, ref, test, x), see accuracy_errors. For every
    quantity, the median over seeds of test's error must be at most factor * (the median of
    ref's error) + rel.
    Build the models with randomize_bn_prelu(..., kinks=False). With real PReLU slopes the
    comparison is a lottery, not a measure of accuracy: a pre-activation within rounding of the
    kink takes the other slope in one float32 run and not in the other, and the BN backward
    spreads that over the whole channel. Measured on DABNet at 32x64: PyTorch's own float32 input
    gradient was 2e-5 from float64 for some seeds and 1e-2 for others, and which seeds were
    unlucky changed with the order of summation (an AVX2 build of the same kernels). Without
    kinks both are near 8e-7 on every seed. The median covers the rarer ties that remain, such
    as max-pooling. Branch choices themselves are checked in float64 (assert_same_steps) and by
    gradcheck."""
    per_seed = []
    for seed in seeds:
        torch.manual_seed(seed)
        per_seed.append(accuracy_errors(*make(seed), steps=steps, training=training, lr=lr))
    bad = []
    for key in per_seed[0]:
        r = torch.tensor([e[key][0] for e in per_seed]).median().item()
        t = torch.tensor([e[key][1] for e in per_seed]).median().item()
        if not t <= factor * r + rel:
            bad.append(f"{key}: median relative error {t:.3g} > bound {factor * r + rel:.3g}")
    assert not bad, "\n".join(bad)
