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


# ------------------------------------------ the in-place forms: affine_prelu_, add_affine_prelu_
def _folded(C, dtype):
    p = bn_params(C, torch.float32)
    return p, ops.fold_bn_prelu(*p[:4], p.prelu_weight, 1e-3, dtype)


def _low(dtype):  # one rounding step of the output dtype, relative
    return dict(rtol=2 ** -7, atol=2 ** -7) if dtype == torch.bfloat16 else (
        dict(rtol=1e-3, atol=1e-3) if dtype == torch.float16 else tol(dtype))


# C = 1, 5, 33: odd counts and one past a vector width, both layouts, every dtype.
@pytest.mark.parametrize("C", [1, 5, 33])
@pytest.mark.parametrize("layout", ["nchw", "channels_last"])
@pytest.mark.parametrize("dtype", [torch.float64, torch.float32, torch.bfloat16, torch.float16])
def test_affine_prelu_inplace_matches_bn_prelu(dtype, layout, C):
    x = make_input((2, C, 5, 9), layout, dtype)
    p, folded = _folded(C, dtype)
    ref = reference.bn_prelu(x.double(), *[t.double() for t in p[:5]], False)
    y = x.clone()
    ptr = y.data_ptr()
    assert ops.affine_prelu_(y, *folded) is y
    assert y.data_ptr() == ptr and y.stride() == x.stride()
    torch.testing.assert_close(y.double(), ref, **_low(dtype))


@pytest.mark.parametrize("C", [1, 5, 33])
@pytest.mark.parametrize("layout", ["nchw", "channels_last"])
@pytest.mark.parametrize("dtype", [torch.float64, torch.float32, torch.bfloat16, torch.float16])
def test_add_affine_prelu_is_add_then_bn_prelu(dtype, layout, C):
    y, r = make_input((2, C, 5, 9), layout, dtype), make_input((2, C, 5, 9), "nchw", dtype)
    p, folded = _folded(C, dtype)
    y0 = y.clone()
    out = ops.add_affine_prelu_(y, r, *folded)
    torch.testing.assert_close(y, y0 + r, rtol=0, atol=0)  # the sum, rounded as add_ rounds
    ref = reference.bn_prelu((y0 + r).double(), *[t.double() for t in p[:5]], False)
    torch.testing.assert_close(out.double(), ref, **_low(dtype))
    fmt = torch.channels_last if layout == "channels_last" else torch.contiguous_format
    assert out.is_contiguous(memory_format=fmt) and out.data_ptr() != y.data_ptr()


def test_inplace_ops_opcheck():
    x = make_input((2, 6, 5, 7), "channels_last", torch.float32)
    _, folded = _folded(6, torch.float32)
    torch.library.opcheck(torch.ops.dabnet.affine_prelu_, (x.clone(), *folded))
    torch.library.opcheck(torch.ops.dabnet.add_affine_prelu_, (x.clone(), x.clone(), *folded))


@pytest.mark.parametrize("bad,msg", [
    (lambda y: (y[:, :, :, ::2], None), "contiguous"),
    (lambda y: (y.requires_grad_(), None), "requires grad"),
    (lambda y: (y, y), "memory"),
    (lambda y: (y, y[:, :, :3]), "shape"),
    (lambda y: (y, y.double()), "dtype"),
])
def test_inplace_ops_refuse_bad_input(bad, msg):
    _, folded = _folded(4, torch.float32)
    y, r = bad(torch.randn(1, 4, 6, 6))
    with pytest.raises(ValueError, match=msg):
        if r is None:
            ops.affine_prelu_(y, *folded)
        else:
            ops.add_affine_prelu_(y, r, *folded)


def test_inplace_op_names_a_wrong_parameter_length():
    _, folded = _folded(3, torch.float32)
    with pytest.raises(RuntimeError, match=r"scale must have shape \(4\)"):
        torch.ops.dabnet.affine_prelu_(torch.randn(1, 4, 2, 2), *folded)


# add0: a residual added to the first input on the way in (a DAB block's last sum).
@pytest.mark.parametrize("sizes", [(5, 2, 3), (3, 6)])  # a wide and a narrow (<= 4) first input
@pytest.mark.parametrize("layout", ["nchw", "channels_last"])
@pytest.mark.parametrize("dtype", [torch.float64, torch.float32, torch.bfloat16])
def test_add0_is_the_residual_sum_of_the_first_input(dtype, layout, sizes):
    xs = _inputs(layout, dtype, sizes)
    r = make_input(tuple(xs[0].shape), "nchw", dtype)
    p, (s, t, a) = _folded(sum(sizes), dtype)
    out = torch.ops.dabnet.cat_bn_prelu(xs, s, t, a, r)
    ref = torch.ops.dabnet.cat_bn_prelu([xs[0] + r] + xs[1:], s, t, a)
    torch.testing.assert_close(out, ref, rtol=0, atol=0)  # the sum rounded as add_ rounds it
    base = reference.bn_prelu(torch.cat([xs[0] + r] + xs[1:], 1).double(),
                              *[v.double() for v in p[:5]], False)
    torch.testing.assert_close(out.double(), base, **_low(dtype))
    assert not torch.equal(out, torch.ops.dabnet.cat_bn_prelu(xs, s, t, a))


def test_add0_opcheck_and_bad_shape():
    xs = _inputs("channels_last", torch.float32)
    _, folded = _folded(10, torch.float32)
    torch.library.opcheck(torch.ops.dabnet.cat_bn_prelu, (xs, *folded, xs[0].clone()))
    with pytest.raises(RuntimeError, match="add0 must have xs\\[0\\]'s shape"):
        torch.ops.dabnet.cat_bn_prelu(xs, *folded, xs[1])


# pre0 (xs[0]'s own BN-PReLU on the way in) and pool_last (the last input max-pooled 2x2): the
# frozen model's fusions of DABNet's first block and downsampling. Each must equal the unfused
# sequence of ops bit for bit, in every dtype and layout.
@pytest.mark.parametrize("sizes", [(5, 3), (3, 6, 2), (33,)])  # wide, narrow and single xs[0]
@pytest.mark.parametrize("add0", [False, True])
@pytest.mark.parametrize("layout", ["nchw", "channels_last"])
@pytest.mark.parametrize("dtype", [torch.float64, torch.float32, torch.bfloat16, torch.float16])
def test_pre0_is_xs0s_own_bn_prelu_first(dtype, layout, add0, sizes):
    xs = _inputs(layout, dtype, sizes)
    r = make_input(tuple(xs[0].shape), layout, dtype) if add0 else None
    _, folded = _folded(sum(sizes), dtype)
    _, pre = _folded(sizes[0], dtype)
    out = torch.ops.dabnet.cat_bn_prelu(xs, *folded, r, list(pre))
    y0 = (xs[0] + r if add0 else xs[0]).clone()
    torch.ops.dabnet.affine_prelu_(y0, *pre)
    ref = torch.ops.dabnet.cat_bn_prelu([y0] + xs[1:], *folded)
    torch.testing.assert_close(out, ref, rtol=0, atol=0)
    assert not torch.equal(out, torch.ops.dabnet.cat_bn_prelu(xs, *folded, r))
    fmt = torch.channels_last if layout == "channels_last" else torch.contiguous_format
    assert out.is_contiguous(memory_format=fmt)


@pytest.mark.parametrize("hw", [(6, 7), (5, 9), (3, 2)])  # even, odd (floor), one column
@pytest.mark.parametrize("sizes", [(5, 35), (29, 2, 3), (4, 7)])
@pytest.mark.parametrize("layout", ["nchw", "channels_last"])
@pytest.mark.parametrize("dtype", [torch.float64, torch.float32, torch.bfloat16])
def test_pool_last_is_a_2x2_max_pool_of_the_last_input(dtype, layout, sizes, hw):
    H, W = hw
    xs = [make_input((2, c, H // 2, W // 2), layout, dtype) for c in sizes[:-1]]
    big = make_input((2, sizes[-1], H, W), layout, dtype)
    big[1, 0, 0, 1] = float("nan")  # NaN wins its window, as in torch.maximum / max_pool2d
    _, folded = _folded(sum(sizes), dtype)
    out = torch.ops.dabnet.cat_bn_prelu(xs + [big], *folded, None, None, True)
    ref = torch.ops.dabnet.cat_bn_prelu(xs + [ops.max_pool2x2(big)], *folded)
    torch.testing.assert_close(out, ref, rtol=0, atol=0, equal_nan=True)
    assert out.isnan().sum() == ref.isnan().sum() >= 1
    fmt = torch.channels_last if layout == "channels_last" else torch.contiguous_format
    assert out.is_contiguous(memory_format=fmt)


def test_pre0_and_pool_last_opcheck():
    xs = [make_input((2, 5, 3, 4), "channels_last", torch.float32),
          make_input((2, 3, 7, 9), "channels_last", torch.float32)]
    _, folded = _folded(8, torch.float32)
    _, pre = _folded(5, torch.float32)
    torch.library.opcheck(torch.ops.dabnet.cat_bn_prelu, (xs, *folded, None, list(pre), True))


@pytest.mark.parametrize("args,msg", [
    (lambda xs, f, pre: ([xs[1]], *f, None, None, True), "at least two inputs"),
    (lambda xs, f, pre: ([xs[0], xs[0]], *f, None, None, True), "after its 2x2 max-pool"),
    (lambda xs, f, pre: ([xs[0]] * 2, *f, None, list(pre[:2])), r"\[scale, shift, slope\]"),
    (lambda xs, f, pre: ([xs[0]] * 2, *f, None, [pre[0][:2], pre[1], pre[2]]), "pre0 scale"),
])
def test_pre0_and_pool_last_refuse_bad_input(args, msg):
    xs = [torch.randn(1, 4, 3, 3), torch.randn(1, 4, 6, 7)]
    _, folded = _folded(8, torch.float32)
    _, pre = _folded(4, torch.float32)
    with pytest.raises(RuntimeError, match=msg):
        torch.ops.dabnet.cat_bn_prelu(*args(xs, folded, pre))
