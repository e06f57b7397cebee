"""dabnet.freeze: the fused model as a fixed sequence of op calls on parameters folded once."""
import pytest
import torch

import dabnet
from dabnet import DABNet


def _model(fused=True, seed=0, **kw):
    torch.manual_seed(seed)
    m = DABNet(fused=fused, **kw)
    with torch.no_grad():  # BatchNorm statistics that are not the identity
        for mod in m.modules():
            if isinstance(mod, torch.nn.BatchNorm2d):
                mod.running_mean.normal_(0, 0.2)
                mod.running_var.uniform_(0.5, 1.5)
                mod.weight.normal_(1, 0.2)
                mod.bias.normal_(0, 0.2)
    return m.eval()


def _image(h, w, n=1, dtype=torch.float32):
    return torch.rand(n, 3, h, w, generator=torch.Generator().manual_seed(1)).to(dtype)


@pytest.mark.parametrize("channels_last", [True, False])
def test_matches_the_fused_model_fp32(channels_last):
    m = _model(classes=7, block_1=2, block_2=3)
    x = _image(64, 96, n=2)
    fmt = torch.channels_last if channels_last else torch.contiguous_format
    ref = m.to(memory_format=fmt)(x.contiguous(memory_format=fmt)).detach()
    frozen = dabnet.freeze(m, channels_last=channels_last)
    out = frozen(x)
    assert out.shape == (2, 7, 64, 96)
    torch.testing.assert_close(out, ref, rtol=1e-5, atol=1e-5)
    assert torch.equal(frozen.predict(x), m.predict(x.contiguous(memory_format=fmt)))


def test_a_plain_model_freezes_to_the_same_network():
    plain, fused = _model(fused=False), _model(fused=True)
    x = _image(32, 64)
    with torch.no_grad():
        ref = plain(x)
    torch.testing.assert_close(dabnet.freeze(plain)(x), ref, rtol=1e-4, atol=1e-4)
    torch.testing.assert_close(dabnet.freeze(plain)(x), dabnet.freeze(fused)(x), rtol=0, atol=0)


def test_bf16_matches_the_fused_bf16_model():
    m = _model().to(torch.bfloat16).to(memory_format=torch.channels_last)
    x = _image(64, 128, dtype=torch.bfloat16).contiguous(memory_format=torch.channels_last)
    with torch.no_grad():
        ref = m(x)
    out = dabnet.freeze(m, torch.bfloat16)(x)
    assert out.dtype == torch.bfloat16
    # The same ops on the same values: equal, but for a rare rounding step where the frozen
    # model forms a BN-PReLU with another kernel (cat_bn_prelu for a block's first module).
    assert (out.float() - ref.float()).abs().max() <= 0.05 * ref.float().abs().max()
    assert (out.argmax(1) == ref.argmax(1)).double().mean() > 0.99


@pytest.mark.parametrize("hw", [(37, 53), (1, 1), (30, 45)])
def test_any_size_is_padded_and_cropped_as_the_model_does(hw):
    m = _model(classes=5, block_1=1, block_2=2)
    x = _image(*hw)
    with torch.no_grad():
        ref = m(x)
    torch.testing.assert_close(dabnet.freeze(m)(x), ref, rtol=1e-5, atol=1e-5)


def test_is_a_snapshot_of_the_parameters():
    m = _model(block_1=1, block_2=1)
    x = _image(32, 32)
    frozen = dabnet.freeze(m)
    before = frozen(x)
    with torch.no_grad():
        for p in m.parameters():
            p.mul_(1.5)
        for b in m.buffers():
            if b.is_floating_point():
                b.add_(0.1)
    torch.testing.assert_close(frozen(x), before, rtol=0, atol=0)
    refrozen = dabnet.freeze(m)(x)
    assert not torch.allclose(refrozen, before)
    with torch.no_grad():
        torch.testing.assert_close(refrozen, m(x), rtol=1e-5, atol=1e-5)


def test_runs_under_inference_mode_and_leaves_no_graph():
    m = _model(block_1=1, block_2=1)
    x = _image(16, 16).requires_grad_()
    out = dabnet.freeze(m)(x)
    assert not out.requires_grad
    with torch.inference_mode():
        frozen = dabnet.freeze(m)
        torch.testing.assert_close(frozen(x.detach()), out)


def _convs(frozen):
    return ([c for c, _ in frozen.init] + [c for c, _, _ in frozen.down]
            + [conv for blk in frozen.blocks for m in blk for conv in (m.conv3x3, m.conv1x1)]
            + [frozen.classifier])


_PACKED_DTYPES = [torch.float32] + (
    [torch.bfloat16] if torch.backends.mkldnn.is_available()
    and torch.ops.mkldnn._is_mkldnn_bf16_supported() else [])


@pytest.mark.skipif(not torch.backends.mkldnn.is_available(), reason="no oneDNN in this torch")
@pytest.mark.parametrize("dtype", _PACKED_DTYPES)
def test_packed_convolutions_equal_conv2d(dtype):
    """Each dense convolution on its once-reordered weight gives F.conv2d's output bit for bit,
    in the layout the next op expects, for two input shapes (one packed weight each)."""
    frozen = dabnet.freeze(_model(block_1=1, block_2=2), dtype)
    convs = _convs(frozen)
    assert len(convs) == 3 + 2 + 2 * 3 + 1
    g = torch.Generator().manual_seed(2)
    for c in convs:
        for hw in ((12, 20), (9, 7)):
            x = torch.randn(2, c.weight.shape[1], *hw, generator=g).to(dtype)
            x = x.contiguous(memory_format=torch.channels_last)
            out = c(x)
            ref = torch.nn.functional.conv2d(x, c.weight, None, c.stride, c.padding)
            assert torch.equal(out, ref), (c.weight.shape, hw)
            assert out.is_contiguous(memory_format=torch.channels_last)
        assert len(c.packed) == 2


@pytest.mark.skipif(not torch.backends.mkldnn.is_available(), reason="no oneDNN in this torch")
def test_packed_weights_are_bounded_and_optional():
    frozen = dabnet.freeze(_model(block_1=1, block_2=1))
    c = frozen.classifier
    for w in range(1, c.SHAPES + 3):  # more image sizes than it keeps packed weights for
        x = torch.rand(1, c.weight.shape[1], 4, w).contiguous(memory_format=torch.channels_last)
        torch.testing.assert_close(c(x), torch.nn.functional.conv2d(x, c.weight))
        assert 1 <= len(c.packed) <= c.SHAPES
    x = _image(16, 16)
    out = frozen(x)
    torch.backends.mkldnn.enabled = False  # the user turned oneDNN off: F.conv2d
    try:
        c.packed.clear()
        torch.testing.assert_close(frozen(x), out, rtol=1e-5, atol=1e-5)
        assert not c.packed
    finally:
        torch.backends.mkldnn.enabled = True
    # NCHW (kept for comparison) and float64 never pack: oneDNN has no such kernels here
    assert all(c.packed is None for c in _convs(dabnet.freeze(_model(block_1=1, block_2=1),
                                                              channels_last=False)))
    assert all(c.packed is None for c in _convs(dabnet.freeze(_model(block_1=1, block_2=1),
                                                              torch.float64)))


@pytest.mark.parametrize("dtype,channels_last,blocks", [
    (torch.float32, True, (2, 3)), (torch.bfloat16, True, (1, 2)), (torch.float32, False, (1, 1)),
    (torch.float64, True, (0, 1)), (torch.float32, True, (1, 0)),
])
def test_the_cpp_forward_equals_the_python_forward(dtype, channels_last, blocks):
    """From the second call at an input shape on, the forward runs from C++
    (dabnet::frozen_forward): bit for bit the Python sequence's output, logits and labels, packed
    convolutions (channels_last fp32/bf16) or not (NCHW, float64), blocks of any length."""
    m = _model(classes=5, block_1=blocks[0], block_2=blocks[1]).to(dtype)
    frozen = dabnet.freeze(m, dtype, channels_last=channels_last)
    fmt = torch.channels_last if channels_last else torch.contiguous_format
    for hw in ((32, 48), (24, 40)):
        x = _image(*hw, n=2, dtype=dtype)
        first = frozen(x)
        key = ((2, 3) + hw, torch.backends.mkldnn.enabled)
        assert key in frozen._plans  # the first call ran the Python sequence and kept its plan
        xc = x.contiguous(memory_format=fmt)
        ref = frozen._forward_py(xc, False)
        assert torch.equal(frozen(x), ref) and torch.equal(first, ref)
        assert torch.equal(frozen.predict(x), frozen._forward_py(xc, True))


def test_another_backend_keeps_the_python_forward():
    """dabnet_kernels' reference backend changes the frozen model's pools and upsampling (the
    Python sequence routes them through dabnet_kernels.ops): every call then runs that sequence,
    so the first and later calls agree bit for bit; none runs the compiled kernels' C++ plan."""
    import dabnet_kernels

    frozen = dabnet.freeze(_model(block_1=1, block_2=1))
    x = _image(24, 40)
    with dabnet_kernels.backend.use_backend("reference"):
        first = frozen(x)
        assert not frozen._plans
        assert torch.equal(frozen(x), first) and not frozen._plans
    torch.testing.assert_close(frozen(x), first)  # the compiled kernels: equal to rounding
    assert frozen._plans


def test_a_plan_holds_the_weights_of_its_own_call():
    """A first call records the weights it ran on in its own dict, so another shape's first call
    in between (another thread) cannot put its packed weights into this shape's plan."""
    frozen = dabnet.freeze(_model(block_1=1, block_2=1))
    fmt = torch.channels_last
    xa = _image(24, 40).contiguous(memory_format=fmt)
    xb = _image(32, 16).contiguous(memory_format=fmt)
    ran = {}
    frozen._forward_py(xa, False, ran)
    frozen._forward_py(xb, False, {})
    ts, plan = frozen._plan(ran)
    conv0 = frozen.init[0][0]
    if conv0.packed is not None:
        assert ts[0] is conv0.packed[tuple(xa.shape)] is not conv0.packed[tuple(xb.shape)]
    out = torch.ops.dabnet.frozen_forward(xa, ts, plan, False)
    assert torch.equal(out, frozen._forward_py(xa, False))


def test_the_cpp_forward_names_a_wrong_plan():
    frozen = dabnet.freeze(_model(block_1=1, block_2=1))
    x = _image(16, 16).contiguous(memory_format=torch.channels_last)
    frozen(x)
    ts, plan = frozen._plans[(tuple(x.shape), torch.backends.mkldnn.enabled)]
    F = torch.ops.dabnet.frozen_forward
    torch.testing.assert_close(F(x, ts, plan, False), frozen._forward_py(x, False), rtol=0, atol=0)
    with pytest.raises(RuntimeError, match="expects 58 tensors for this plan, got 57"):
        F(x, ts[:-1], plan, False)
    with pytest.raises(RuntimeError, match="plan has 9 entries, expected 10"):
        F(x, ts, plan[:-1], False)
    with pytest.raises(RuntimeError, match="0 initial convs"):
        F(x, ts, [0] + plan[1:], False)
    with pytest.raises(RuntimeError, match="CPU tensor"):
        F(x[0], ts, plan, False)


@pytest.mark.parametrize("bad,exc,msg", [
    (lambda: _image(16, 16, dtype=torch.float64), ValueError, "float32 on CPU"),
    (lambda: torch.rand(1, 4, 16, 16), ValueError, r"\(N, 3, H, W\)"),
    (lambda: torch.rand(3, 16, 16), ValueError, r"\(N, 3, H, W\)"),
    (lambda: "image.png", ValueError, "image batch"),
    (lambda: torch.rand(1, 3, 0, 16), ValueError, "at least 1x1"),
])
def test_bad_input_is_named(bad, exc, msg):
    frozen = dabnet.freeze(_model(block_1=1, block_2=1))
    with pytest.raises(exc, match=msg):
        frozen(bad())


def test_refuses_what_it_cannot_freeze():
    with pytest.raises(TypeError, match="dabnet.DABNet"):
        dabnet.freeze(torch.nn.Conv2d(3, 3, 1))
    with pytest.raises(ValueError, match="dtype"):
        dabnet.freeze(_model(block_1=1, block_2=1), torch.int8)
