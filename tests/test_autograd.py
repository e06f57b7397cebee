"""The C++ autograd kernels of the dabnet:: ops (csrc/autograd.cpp).

Gradients for every subset of the differentiable inputs, with the running statistics given or
absent (in eval mode they reach the op and shift the positions of the later tensor inputs),
against the pure-PyTorch reference.
"""
import itertools

import pytest
import torch

from dabnet_kernels import ops, reference
from helpers import bn_params, dw_weight, make_input

DEVICES = ["cpu"] + (["cuda"] if torch.cuda.is_available() else [])


def _subsets(n):
    return [s for r in range(1, n + 1) for s in itertools.combinations(range(n), r)]


def _grads_match(fn, ref_fn, leaves, wanted, g):
    """fn and ref_fn on fresh copies of leaves; grads of the `wanted` ones only must agree."""
    mine = [t.clone().requires_grad_(i in wanted) for i, t in enumerate(leaves)]
    theirs = [t.clone().requires_grad_(i in wanted) for i, t in enumerate(leaves)]
    got = torch.autograd.grad(fn(*mine), [mine[i] for i in wanted], g)
    want = torch.autograd.grad(ref_fn(*theirs), [theirs[i] for i in wanted], g)
    for i, a, b in zip(wanted, got, want):
        assert a is not None, f"no gradient for input {i}"
        torch.testing.assert_close(a, b, rtol=1e-9, atol=1e-9, msg=lambda m: f"input {i}: {m}")


@pytest.mark.parametrize("op", ["dwconv3", "bn_prelu", "dwconv3_bn_prelu"])
def test_autograd_kernel_is_registered(op):
    assert torch._C._dispatch_has_kernel_for_dispatch_key(f"dabnet::{op}", "Autograd")


@pytest.mark.parametrize("device", DEVICES)
@pytest.mark.parametrize("wanted", _subsets(2))
def test_dwconv3_grad_subsets(wanted, device):
    x = make_input((2, 3, 6, 5), device=device)
    w = dw_weight(3, "h", device=device)
    g = torch.randn(2, 3, 6, 5, dtype=x.dtype, device=device)
    _grads_match(lambda x, w: ops.dwconv3(x, w, 2), lambda x, w: reference.dwconv3(x, w, 2),
                 [x, w], wanted, g)


@pytest.mark.parametrize("device", DEVICES)
@pytest.mark.parametrize("training", [True, False])
@pytest.mark.parametrize("running", [True, False])
@pytest.mark.parametrize("wanted", _subsets(4))
def test_bn_prelu_grad_subsets(wanted, running, training, device):
    x = make_input((2, 3, 4, 5), "channels_last", device=device)
    p = bn_params(3, device=device)
    stats = (p.running_mean, p.running_var) if running else (None, None)
    g = torch.randn(2, 3, 4, 5, dtype=x.dtype, device=device)

    def call(impl):
        return lambda x, w, b, a: impl(x, w, b, *stats, a, training)

    _grads_match(call(ops.bn_prelu), call(reference.bn_prelu),
                 [x, p.weight, p.bias, p.prelu_weight], wanted, g)


@pytest.mark.parametrize("device", DEVICES)
@pytest.mark.parametrize("training", [True, False])
@pytest.mark.parametrize("running", [True, False])
@pytest.mark.parametrize("wanted", _subsets(5))
def test_dwconv3_bn_prelu_grad_subsets(wanted, running, training, device):
    x = make_input((2, 3, 5, 4), device=device)
    cw = dw_weight(3, "w", device=device)
    p = bn_params(3, device=device)
    stats = (p.running_mean, p.running_var) if running else (None, None)
    g = torch.randn(2, 3, 5, 4, dtype=x.dtype, device=device)

    def call(impl):
        return lambda x, cw, w, b, a: impl(x, cw, 3, w, b, *stats, a, training)

    _grads_match(call(ops.dwconv3_bn_prelu), call(reference.dwconv3_bn_prelu),
                 [x, cw, p.weight, p.bias, p.prelu_weight], wanted, g)


def test_no_graph_without_grad():
    x, w = make_input((1, 2, 4, 4)), dw_weight(2, "w")
    assert ops.dwconv3(x, w, 1).grad_fn is None
    x.requires_grad_()
    with torch.no_grad():
        assert ops.dwconv3(x, w, 1).grad_fn is None
    assert ops.dwconv3(x, w, 1).grad_fn is not None
