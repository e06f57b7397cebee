import pytest
import torch
import torch.nn.functional as F

from dabnet_kernels import ops


def _check(logits, size):
    labels = ops.upsample_argmax(logits, size)
    up = F.interpolate(logits.double(), size=size, mode="bilinear", align_corners=False)
    assert labels.shape == (logits.shape[0], *size) and labels.dtype == torch.long
    # Where the top two classes are not tied to rounding level, the label must be the argmax.
    top2 = up.topk(2, dim=1).values if logits.shape[1] > 1 else None
    decided = (top2[:, 0] - top2[:, 1] > 1e-4) if top2 is not None else torch.ones_like(labels, dtype=torch.bool)
    assert decided.float().mean() > 0.9
    assert torch.equal(labels[decided], up.argmax(1)[decided])


@pytest.mark.parametrize("size", [(64, 128), (37, 53), (8, 8), (5, 300)])
@pytest.mark.parametrize("dtype", [torch.float32, torch.float64])
def test_matches_interpolate_argmax(size, dtype):
    _check(torch.randn(2, 7, 8, 16, dtype=dtype), size)


def test_channels_last_and_one_class():
    _check(torch.randn(1, 19, 9, 11).contiguous(memory_format=torch.channels_last), (72, 88))
    assert torch.equal(ops.upsample_argmax(torch.randn(1, 1, 4, 4), (9, 9)),
                       torch.zeros(1, 9, 9, dtype=torch.long))


def test_first_maximum_wins_on_exact_ties():
    logits = torch.zeros(1, 3, 4, 4)
    logits[:, 1:] = 1.0  # classes 1 and 2 tie everywhere
    assert (ops.upsample_argmax(logits, (8, 8)) == 1).all()


@pytest.mark.parametrize("bad,msg", [((0, 4), "positive"), ((4,), "two positive"), ((4.0, 4), "two positive")])
def test_bad_size(bad, msg):
    with pytest.raises(ValueError, match=msg):
        ops.upsample_argmax(torch.randn(1, 3, 4, 4), bad)


def test_bad_logits():
    with pytest.raises(ValueError, match="4-D"):
        ops.upsample_argmax(torch.randn(3, 4, 4), (8, 8))
    with pytest.raises(ValueError, match="floating-point"):
        ops.upsample_argmax(torch.ones(1, 3, 4, 4, dtype=torch.long), (8, 8))


@pytest.mark.parametrize("layout", ["nchw", "channels_last"])
@pytest.mark.parametrize("size", [(64, 128), (13, 7), (9, 40)])
def test_upsample_bilinear_matches_interpolate(size, layout):
    x = torch.randn(2, 5, 8, 16)
    if layout == "channels_last":
        x = x.contiguous(memory_format=torch.channels_last)
    out = ops.upsample_bilinear(x, size)
    ref = F.interpolate(x, size=size, mode="bilinear", align_corners=False)
    torch.testing.assert_close(out, ref, rtol=1e-5, atol=1e-5)
    fmt = torch.channels_last if layout == "channels_last" else torch.contiguous_format
    assert out.is_contiguous(memory_format=fmt)


def test_upsample_bilinear_float64_and_grad():
    x = torch.randn(1, 3, 5, 6, dtype=torch.float64, requires_grad=True)
    torch.testing.assert_close(ops.upsample_bilinear(x, (17, 9)),
                               F.interpolate(x, size=(17, 9), mode="bilinear", align_corners=False))
    assert torch.autograd.gradcheck(lambda x: ops.upsample_bilinear(x, (11, 13)), (x,))


def test_upsample_opcheck():
    x = torch.randn(1, 3, 5, 6, requires_grad=True)
    # Known limitation: the backward (ATen's upsample_bilinear2d_backward) fails to trace with
    # dynamic shapes ("Expected IntList but got GenericList"), so that one check is left out.
    torch.library.opcheck(torch.ops.dabnet.upsample_bilinear, (x, 10, 12),
                          test_utils=("test_schema", "test_autograd_registration",
                                      "test_faketensor", "test_aot_dispatch_static"))
    torch.library.opcheck(torch.ops.dabnet.upsample_argmax, (x.detach(), 10, 12))


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16, torch.float16])
@pytest.mark.parametrize("size", [(512, 1024), (37, 53)])
def test_upsample_bilinear_channels_last_equals_nchw(size, dtype):
    """The channels_last path blends whole pixels (all classes at once; bf16/fp16 through a float
    row rounded in one pass); the NCHW path one class row at a time. Same formulas in the same
    order: bit-identical, at DABNet's 19 classes x8."""
    x = torch.randn(2, 19, 64, 128).to(dtype)
    nchw = ops.upsample_bilinear(x, size)
    cl = ops.upsample_bilinear(x.contiguous(memory_format=torch.channels_last), size)
    assert cl.is_contiguous(memory_format=torch.channels_last)
    assert torch.equal(cl, nchw)
    ref = F.interpolate(x.float(), size=size, mode="bilinear", align_corners=False)
    torch.testing.assert_close(cl.float(), ref, **(dict(rtol=1e-5, atol=1e-5) if dtype ==
                                                   torch.float32 else dict(rtol=1e-2, atol=1e-2)))


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16, torch.float64])
@pytest.mark.parametrize("classes", [1, 7, 19])
@pytest.mark.parametrize("size", [(64, 128), (37, 53), (5, 300), (16, 9)])
def test_argmax_is_the_argmax_of_upsample_bilinear(size, classes, dtype):
    """upsample_argmax computes upsample_bilinear's values (channels_last), 8 pixels at a time,
    without storing them: its labels are their torch.argmax exactly, whatever the input layout
    (runs of fewer than 8 pixels at the image's edges included). For bfloat16, of the float
    values before they are rounded to bfloat16 (where rounding makes ties, argmax would pick the
    first)."""
    x = torch.randn(2, classes, 8, 16, dtype=torch.float64).to(dtype)
    xw = x.float() if dtype == torch.bfloat16 else x
    want = ops.upsample_bilinear(xw.contiguous(memory_format=torch.channels_last), size).argmax(1)
    assert torch.equal(ops.upsample_argmax(x, size), want)
    assert torch.equal(ops.upsample_argmax(x.contiguous(memory_format=torch.channels_last), size),
                       want)
