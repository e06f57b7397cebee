import pytest
import torch

from dabnet_kernels import ops, reference
from helpers import bn_params, make_input, tol


def _inputs(layout, dtype=torch.float64, sizes=(3, 5, 2)):
    return [make_input((2, c, 6, 7), layout, dtype) for c in sizes]


# Channel counts on both sides of the kernel's narrow-input path (<= 4 channels, taken a block of
# pixels at a time in channels_last) and the wide one (a run per pixel).
@pytest.mark.parametrize("sizes", [(3, 5, 2), (4, 1, 17)])
@pytest.mark.parametrize("single_slope", [False, True])
@pytest.mark.parametrize("layout", ["nchw", "channels_last", "strided"])
def test_eval_matches_cat_then_bn_prelu(layout, single_slope, sizes):
    xs = _inputs(layout, sizes=sizes)
    p = bn_params(sum(sizes), single_slope=single_slope)
    with torch.no_grad():
        out = ops.cat_bn_prelu(xs, *p[:5], False)
    ref = reference.bn_prelu(torch.cat(xs, 1), *p[:5], False)
    torch.testing.assert_close(out, ref, **tol(torch.float64))
    fmt = torch.channels_last if layout == "channels_last" else torch.contiguous_format
    assert out.is_contiguous(memory_format=fmt)


def test_mixed_layouts_and_float32():
    xs = _inputs("nchw", torch.float32)
    xs[1] = xs[1].contiguous(memory_format=torch.channels_last)
    p = bn_params(10, torch.float32)
    with torch.no_grad():
        out = ops.cat_bn_prelu(xs, *p[:5], False)
    torch.testing.assert_close(out, reference.bn_prelu(torch.cat(xs, 1), *p[:5], False),
                               rtol=1e-5, atol=1e-5)


def test_training_and_grads_compose_exactly():
    xs = [x.requires_grad_() for x in _inputs("nchw")]
    p, q = bn_params(10, nbt=True), bn_params(10, nbt=True)
    q = type(q)(*[t.clone() if t is not None else None for t in p])
    out = ops.cat_bn_prelu(xs, *p[:5], True, 0.1, 1e-3, p.num_batches_tracked)
    ref = reference.bn_prelu(torch.cat(xs, 1), *q[:5], True, 0.1, 1e-3, q.num_batches_tracked)
    torch.testing.assert_close(out, ref, **tol(torch.float64))
    torch.testing.assert_close(p.running_var, q.running_var, **tol(torch.float64))
    assert torch.autograd.gradcheck(lambda a, b, c: ops.cat_bn_prelu([a, b, c], *p[:5], False),
                                    tuple(xs))


def test_opcheck():
    xs = _inputs("channels_last", torch.float32)
    s = torch.rand(10)
    torch.library.opcheck(torch.ops.dabnet.cat_bn_prelu, (xs, s, torch.randn(10), torch.rand(10)))


@pytest.mark.parametrize("bad,msg", [
    (lambda: [torch.randn(2, 3, 6, 7), torch.randn(2, 3, 6, 8)], "cannot be concatenated"),
    (lambda: [], "non-empty"),
])
def test_bad_inputs(bad, msg):
    p = bn_params(6, torch.float32)
    with pytest.raises(ValueError, match=msg):
        ops.cat_bn_prelu(bad(), *p[:5], False)


def test_mixed_dtypes_promote_like_torch_cat():
    xs = [torch.randn(2, 3, 6, 7, dtype=torch.bfloat16), torch.randn(2, 3, 6, 7)]
    p = bn_params(6, torch.float32)
    with torch.no_grad():
        out = ops.cat_bn_prelu(xs, *p[:5], False)
    assert out.dtype == torch.float32
    torch.testing.assert_close(out, reference.bn_prelu(torch.cat(xs, 1), *p[:5], False))


def test_wrong_parameter_length():
    with pytest.raises(ValueError, match=r"\(10,\)"):
        ops.cat_bn_prelu(_inputs("nchw", torch.float32), *bn_params(9, torch.float32)[:5], False)
