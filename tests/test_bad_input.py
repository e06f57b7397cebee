"""Bad input gives a clear error that names the problem; never a crash or a silently wrong result."""
import pytest
import torch

from dabnet_kernels import ops
from helpers import bn_list, dw_weight, make_input

X = lambda: make_input((2, 4, 5, 6))  # noqa: E731


def bn(C=4, **kw):
    return bn_list(C, **kw)


CASES = [
    # (description, callable, exception type, message fragment)
    ("integer input", lambda: ops.dwconv3(torch.ones(2, 4, 5, 6, dtype=torch.long), dw_weight(4, "h")),
     ValueError, "floating-point"),
    ("3-D input", lambda: ops.dwconv3(torch.randn(4, 5, 6, dtype=torch.float64), dw_weight(4, "h")),
     ValueError, "4-D"),
    ("5-D input", lambda: ops.bn_prelu(torch.randn(1, 4, 2, 5, 6, dtype=torch.float64), *bn(), True),
     ValueError, "4-D"),
    ("3x3 weight", lambda: ops.dwconv3(X(), torch.randn(4, 1, 3, 3, dtype=torch.float64)),
     ValueError, "(4, 1, 3, 1) or (4, 1, 1, 3)"),
    ("channel mismatch", lambda: ops.dwconv3(X(), dw_weight(5, "h")), ValueError, "4 channels"),
    ("dilation 0", lambda: ops.dwconv3(X(), dw_weight(4, "h"), 0), ValueError, "dilation"),
    ("negative dilation", lambda: ops.dwconv3_bn_prelu(X(), dw_weight(4, "w"), -2, *bn(), False),
     ValueError, "dilation"),
    ("float dilation", lambda: ops.dwconv3(X(), dw_weight(4, "h"), 1.5), ValueError, "dilation"),
    ("dtype mismatch", lambda: ops.dwconv3(X(), dw_weight(4, "h", torch.float32)),
     ValueError, "dtype"),
    ("device mismatch", lambda: ops.dwconv3(X(), dw_weight(4, "h", device="meta")),
     ValueError, "meta"),
    ("bn device mismatch", lambda: ops.bn_prelu(X(), *bn(device="meta"), True), ValueError, "meta"),
    ("short weight", lambda: ops.bn_prelu(X(), *bn(3), True), ValueError, "(4,)"),
    ("prelu wrong length", lambda: ops.bn_prelu(X(), *bn()[:4], torch.ones(2, dtype=torch.float64), True),
     ValueError, "prelu_weight"),
    ("2-D running mean", lambda: ops.bn_prelu(X(), *bn()[:2], torch.zeros(4, 1, dtype=torch.float64),
                                              *bn()[3:], False), ValueError, "running_mean"),
    ("mean without var", lambda: ops.bn_prelu(X(), *bn()[:3], None, bn()[4], False),
     ValueError, "together"),
    ("one value per channel", lambda: ops.bn_prelu(torch.randn(1, 4, 1, 1, dtype=torch.float64), *bn(), True),
     ValueError, "more than 1 value"),
    ("not a tensor", lambda: ops.dwconv3([[1.0]], dw_weight(4, "h")), TypeError, "torch.Tensor"),
    ("neck with 3 weights", lambda: ops.dab_neck(X(), [dw_weight(4, "h")] * 3, [bn()] * 5, 2),
     ValueError, "4 depthwise"),
    ("neck weights out of order", lambda: ops.dab_neck(X(), [dw_weight(4, "w")] * 4, [bn()] * 5, 2),
     ValueError, "3x1"),
    ("neck with 4 BNs", lambda: ops.dab_neck(X(), [dw_weight(4, a) for a in "hwhw"], [bn()] * 4, 2),
     ValueError, "5 BN-PReLU"),
    ("neck dilation 0", lambda: ops.dab_neck(X(), [dw_weight(4, a) for a in "hwhw"], [bn()] * 5, 0),
     ValueError, "dilation"),
]


@pytest.mark.parametrize("name,fn,exc,fragment", CASES, ids=[c[0] for c in CASES])
def test_python_api_rejects(name, fn, exc, fragment):
    with pytest.raises(exc) as info:
        fn()
    assert fragment in str(info.value)


D = torch.ops.dabnet
OP_CASES = [
    ("int input", lambda: D.dwconv3(torch.ones(1, 2, 3, 3, dtype=torch.int32),
                                    torch.ones(2, 1, 3, 1, dtype=torch.int32), 1), "floating-point"),
    ("rank", lambda: D.dwconv3(torch.randn(2, 3, 3), torch.randn(2, 1, 3, 1), 1), "4-D"),
    ("weight shape", lambda: D.dwconv3(torch.randn(1, 2, 3, 3), torch.randn(2, 1, 3, 3), 1), "(C,1,3,1)"),
    ("dilation", lambda: D.dwconv3(torch.randn(1, 2, 3, 3), torch.randn(2, 1, 3, 1), 0), "dilation"),
    ("dtype", lambda: D.dwconv3(torch.randn(1, 2, 3, 3), torch.randn(2, 1, 3, 1).double(), 1), "dtype"),
    ("bn length", lambda: D.bn_prelu(torch.randn(2, 2, 3, 3), torch.ones(3), torch.zeros(2), None, None,
                                     torch.ones(2), True, 1e-3), "weight must have shape (2)"),
    ("eval needs stats", lambda: D.bn_prelu(torch.randn(2, 2, 3, 3), torch.ones(2), torch.zeros(2), None,
                                            None, torch.ones(2), False, 1e-3), "running_mean"),
    ("grad shape", lambda: D.dwconv3_backward(torch.randn(1, 2, 3, 4), torch.randn(1, 2, 3, 3),
                                              torch.randn(2, 1, 3, 1), 1, [True, True]), "grad_out"),
    ("neck weight", lambda: D.dab_neck(torch.randn(1, 2, 3, 3), torch.randn(3, 2, 3), torch.randn(4, 2),
                                       torch.randn(4, 2), torch.ones(2), torch.ones(2), torch.ones(2), 1),
     "(4, 2, 3)"),
]


@pytest.mark.parametrize("name,fn,fragment", OP_CASES, ids=[c[0] for c in OP_CASES])
def test_raw_ops_raise_runtime_error(name, fn, fragment):
    """Callers that bypass the Python wrappers still get an error, not a crash."""
    with pytest.raises(RuntimeError) as info:
        fn()
    assert fragment in str(info.value)


@pytest.mark.parametrize("layout", ["nchw", "channels_last"])
def test_empty_batches_return_empty_outputs(layout):
    x = torch.empty(0, 4, 5, 6, dtype=torch.float64)
    if layout == "channels_last":
        x = x.contiguous(memory_format=torch.channels_last)
    w = dw_weight(4, "h")
    assert ops.dwconv3(x, w, 2).shape == x.shape
    for training in (True, False):
        assert ops.dwconv3_bn_prelu(x, w, 2, *bn(), training).shape == x.shape
    weights = [dw_weight(4, a) for a in "hwhw"]
    with torch.no_grad():
        assert ops.dab_neck(x, weights, [bn() for _ in range(5)], 3).shape == x.shape
    xg = x.clone().requires_grad_()
    ops.dwconv3(xg, w.clone().requires_grad_(), 2).sum().backward()
    assert xg.grad.shape == x.shape


def test_empty_spatial_size():
    x = torch.empty(2, 4, 0, 6, dtype=torch.float64)
    assert ops.dwconv3(x, dw_weight(4, "w"), 1).shape == x.shape
