"""dabnet.model.DABNet: size and state_dict names of the authors' release, fused=True against
fused=False (outputs, gradients, running statistics), any input size, bad input, torch.compile."""
import copy

import pytest
import torch
import torch.nn.functional as F

from dabnet.model import DABNet
from dabnet_kernels import ops as kernel_ops
from dabnet_kernels.nn import FusedBNPReLU, FusedConvBNPReLU, FusedDABModule
from nn_helpers import assert_as_accurate, assert_same_steps, randomize_bn_prelu

F64 = dict(rtol=1e-7, atol=1e-7)  # float64 rounding, amplified by 60 layers and SGD steps


def pair(dtype=torch.float64, classes=19):
    """An unfused DABNet with random BN/PReLU state and a fused one loaded from it."""
    ref = randomize_bn_prelu(DABNet(classes)).to(dtype)
    fused = DABNet(classes, fused=True).to(dtype)
    fused.load_state_dict(ref.state_dict(), strict=True)
    return ref, fused


@pytest.mark.parametrize("size", [(64, 128), (37, 53)])
@pytest.mark.parametrize("layout", [torch.contiguous_format, torch.channels_last])
def test_input_injection_pyramid_equals_pooling_the_image(size, layout):
    """forward pools each injection level from the one before; the authors pool the image afresh
    each time. Bit-identical, and each level's shape is the one the concatenations expect."""
    model = DABNet(19)
    x = torch.rand(2, 3, *size).contiguous(memory_format=layout)
    levels = model.injections(x)
    for k, (got, down) in enumerate(zip(levels, (model.down_1, model.down_2, model.down_3)), 1):
        want = x
        for _ in range(k):
            want = F.avg_pool2d(want, 3, stride=2, padding=1)
        assert torch.equal(down(x), want)
        assert torch.equal(got, want), f"level {k}"


@pytest.mark.parametrize("dtype", [torch.float64, torch.float32, torch.bfloat16])
@pytest.mark.parametrize("size", [(64, 128), (37, 53), (1, 2)])
@pytest.mark.parametrize("layout", [torch.contiguous_format, torch.channels_last])
def test_injection_pool_of_the_fused_model(layout, size, dtype):
    """ops.avg_pool3x3s2 (a 1/9 depthwise conv on channels_last CPU tensors, else avg_pool2d) is
    F.avg_pool2d(3, 2, 1) to rounding, in values and gradients, and keeps the memory format; the
    fused model's injection levels are those of the unfused one."""
    x = torch.rand(2, 3, *size, dtype=dtype).contiguous(memory_format=layout).requires_grad_()
    got = kernel_ops.avg_pool3x3s2(x)
    want = F.avg_pool2d(x.detach().double(), 3, stride=2, padding=1)
    tol = dict(rtol=0, atol=1e-12 if dtype == torch.float64 else
               1e-6 if dtype == torch.float32 else 8e-3)
    torch.testing.assert_close(got.double(), want, **tol)
    assert got.dtype == dtype and got.shape == want.shape
    if size[0] > 1:
        assert got.is_contiguous(memory_format=layout)
    g = torch.rand_like(got)
    (gx,) = torch.autograd.grad(got, x, g)
    xd = x.detach().double().requires_grad_()
    (want_gx,) = torch.autograd.grad(F.avg_pool2d(xd, 3, stride=2, padding=1), xd, g.double())
    torch.testing.assert_close(gx.double(), want_gx, **tol)
    if dtype == torch.float64:
        ref, fused = pair()
        with torch.no_grad():
            for a, b in zip(fused.injections(x), ref.injections(x)):
                torch.testing.assert_close(a, b, rtol=0, atol=1e-12)


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
@pytest.mark.parametrize("size", [(8, 12), (7, 9), (2, 5)])
@pytest.mark.parametrize("layout", [torch.contiguous_format, torch.channels_last])
def test_downsampling_max_pool_of_the_fused_model(layout, size, dtype):
    """ops.max_pool2x2 equals F.max_pool2d(2, 2) exactly (NaN included), odd sizes floored; with a
    gradient needed it is F.max_pool2d itself (ties: one input gets the gradient)."""
    x = torch.randn(2, 5, *size).to(dtype).contiguous(memory_format=layout)
    x[0, 1, 0, 0] = float("nan")
    with torch.no_grad():
        got = kernel_ops.max_pool2x2(x)
    want = F.max_pool2d(x, 2, stride=2)
    assert got.shape == want.shape and got.dtype == dtype
    torch.testing.assert_close(got, want, rtol=0, atol=0, equal_nan=True)
    t = torch.ones(1, 1, 4, 4, requires_grad=True)  # all ties
    (g,) = torch.autograd.grad(kernel_ops.max_pool2x2(t).sum(), t)
    (want_g,) = torch.autograd.grad(F.max_pool2d(t, 2, stride=2).sum(), t)
    assert torch.equal(g, want_g)


@pytest.mark.parametrize("fused", [False, True])
def test_parameter_count_and_authors_state_dict_names(fused):
    model = DABNet(19, fused=fused)
    assert sum(p.numel() for p in model.parameters()) == 756_643
    keys = set(model.state_dict())
    unit = ("conv.weight", "bn_prelu.bn.weight", "bn_prelu.bn.bias", "bn_prelu.bn.running_mean",
            "bn_prelu.bn.running_var", "bn_prelu.bn.num_batches_tracked", "bn_prelu.acti.weight")
    bn_prelu = ("bn.weight", "bn.bias", "bn.running_mean", "bn.running_var",
                "bn.num_batches_tracked", "acti.weight")
    expected = [f"init_conv.{i}.{k}" for i in range(3) for k in unit]
    expected += [f"bn_prelu_{i}.{k}" for i in (1, 2, 3) for k in bn_prelu]
    expected += [f"downsample_{i}.conv3x3.conv.weight" for i in (1, 2)]
    expected += [f"downsample_{i}.bn_prelu.{k}" for i in (1, 2) for k in bn_prelu]
    for block, module in [(1, 0), (1, 2), (2, 0), (2, 5)]:
        prefix = f"DAB_Block_{block}.DAB_Module_{block}_{module}"
        expected += [f"{prefix}.{name}.{k}" for name in ("conv3x3", "dconv3x1", "dconv1x3",
                                                         "ddconv3x1", "ddconv1x3") for k in unit]
        expected += [f"{prefix}.{name}.{k}" for name in ("bn_relu_1", "bn_relu_2")
                     for k in bn_prelu]
        expected.append(f"{prefix}.conv1x1.conv.weight")
    expected.append("classifier.0.conv.weight")
    assert sorted(set(expected) - keys) == []
    assert "DAB_Block_1.DAB_Module_1_3.conv3x3.conv.weight" not in keys
    assert "DAB_Block_2.DAB_Module_2_6.conv3x3.conv.weight" not in keys
    assert model.state_dict()["classifier.0.conv.weight"].shape == (19, 259, 1, 1)


def test_fused_model_holds_fused_modules_and_the_same_keys():
    ref, fused = pair()
    assert list(fused.state_dict()) == list(ref.state_dict())
    kinds = [type(m) for m in fused.modules()]
    assert kinds.count(FusedDABModule) == 9
    assert kinds.count(FusedConvBNPReLU) == 36
    # 3 in init_conv, 3 between stages, 2 downsamplings, 3 per DAB module (the neck's own
    # BN-PReLUs sit inside FusedConvBNPReLU, plus bn_relu_2)
    assert kinds.count(FusedBNPReLU) == 3 + 3 + 2 + 9 * 3 + 36
    dab = fused.DAB_Block_2.DAB_Module_2_4
    assert dab.dilation == 16 and fused.DAB_Block_1.DAB_Module_1_1.dilation == 2
    assert not any(isinstance(m, FusedDABModule) for m in ref.modules())


def test_state_dict_loads_strictly_both_ways():
    ref, fused = pair()
    back = DABNet(19).double()
    back.load_state_dict(fused.state_dict(), strict=True)
    x = torch.randn(1, 3, 32, 64, dtype=torch.float64)
    for m in (ref, fused, back):
        m.eval()
    with torch.no_grad():
        torch.testing.assert_close(back(x), ref(x), rtol=0, atol=0)
        torch.testing.assert_close(fused(x), ref(x), **F64)


@pytest.mark.parametrize("training", [True, False])
def test_fused_matches_unfused_float64(training):
    ref, fused = pair()
    x = torch.randn(2, 3, 32, 64, dtype=torch.float64)
    assert_same_steps(ref, fused, x, steps=3, training=training, **F64)


@pytest.mark.parametrize("training", [True, False])
def test_fused_float32_as_accurate_as_unfused(training):
    """Against float64, fused float32 is as accurate as PyTorch's float32 (PReLU slopes 1: see
    assert_as_accurate). Training: one step (at 32x64 with batch 2, SGD steps amplify rounding,
    so later steps would compare noise). Eval: three steps."""
    assert_as_accurate(float32_triple, steps=1 if training else 3, training=training)


def float32_triple(seed, device="cpu"):
    """A float64 DABNet with random BN-PReLU state, its float32 copy, a fused float32 copy and an
    input (see assert_as_accurate)."""
    truth = randomize_bn_prelu(DABNet(19), kinks=False).double().to(device)
    ref = copy.deepcopy(truth).float()
    fused = DABNet(19, fused=True).to(device)
    fused.load_state_dict(ref.state_dict(), strict=True)
    return truth, ref, fused, torch.randn(2, 3, 32, 64, device=device)


CUDA = pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA GPU (none visible)")


@CUDA
@pytest.mark.parametrize("training", [True, False])
def test_fused_matches_unfused_on_cuda(training):
    """The same comparisons on the GPU: float64 through the CUDA kernels (cuDNN for the rest),
    and float32 as accurate as PyTorch's own float32 against float64."""
    ref, fused = pair()
    x = torch.randn(2, 3, 32, 64, dtype=torch.float64)
    assert_same_steps(ref.cuda(), fused.cuda(), x.cuda(), steps=3, training=training, **F64)
    assert_as_accurate(lambda seed: float32_triple(seed, "cuda"), steps=1 if training else 3,
                       training=training)


def test_eval_no_grad_runs_the_fused_neck_and_matches(monkeypatch):
    ref, fused = pair()
    ref.eval()
    fused.eval()
    x = torch.randn(1, 3, 32, 64, dtype=torch.float64)
    calls = []
    real = torch.ops.dabnet.dab_neck

    class Spy:  # the op namespace, recording the dilation of each dab_neck kernel launch
        def __getattr__(self, name):
            return getattr(torch.ops.dabnet, name)

        def dab_neck(self, *args):
            calls.append(args[-1])
            return real(*args)

    with monkeypatch.context() as patch, torch.no_grad():
        patch.setattr(kernel_ops, "ops_for", lambda t: Spy())
        out = fused(x)
    assert calls == [2, 2, 2, 4, 4, 8, 8, 16, 16]
    with torch.no_grad():
        torch.testing.assert_close(out, ref(x), **F64)


def _fitting(n):
    """The smallest size >= n whose half (rounded up) is even, found by search."""
    m = n
    while -(-m // 2) % 2:
        m += 1
    return m


@pytest.mark.parametrize("size", [(33, 47), (1, 1), (5, 6), (30, 62), (2, 9)])
def test_any_input_size_is_padded_and_cropped_back(size):
    ref, fused = pair(classes=5)
    H, W = size
    x = torch.randn(1, 3, H, W, dtype=torch.float64)
    seen = []
    ref.init_conv.register_forward_hook(lambda m, i, o: seen.append(tuple(i[0].shape[2:])))
    for m in (ref, fused):
        m.eval()
    with torch.no_grad():
        out = ref(x)
        assert out.shape == (1, 5, H, W)
        assert seen == [(_fitting(H), _fitting(W))]
        padded = F.pad(x, (0, _fitting(W) - W, 0, _fitting(H) - H))
        torch.testing.assert_close(out, ref(padded)[:, :, :H, :W], rtol=0, atol=0)
        torch.testing.assert_close(fused(x), out, **F64)


def test_fitting_sizes_are_not_padded():
    model = DABNet(3).double().eval()
    seen = []
    model.init_conv.register_forward_hook(lambda m, i, o: seen.append(tuple(i[0].shape[2:])))
    with torch.no_grad():
        model(torch.randn(1, 3, 32, 63, dtype=torch.float64))
    assert seen == [(32, 63)]


def test_training_on_odd_sizes_keeps_gradients_equal():
    ref, fused = pair(classes=4)
    assert_same_steps(ref, fused, torch.randn(2, 3, 21, 26, dtype=torch.float64), steps=2,
                      training=True, **F64)


@pytest.mark.parametrize("bad, what", [
    (torch.randn(3, 32, 32), r"\(3, 32, 32\)"),
    (torch.randn(1, 4, 32, 32), r"\(1, 4, 32, 32\)"),
    (torch.randn(1, 1, 3, 32, 32), r"\(1, 1, 3, 32, 32\)"),
    ([[1.0]], "list"),
])
@pytest.mark.parametrize("fused", [False, True])
def test_bad_input_is_a_clear_error(bad, what, fused):
    model = DABNet(3, fused=fused).eval()
    with pytest.raises(ValueError, match=r"\(N, 3, H, W\) image batch, got " + what):
        model(bad)


@pytest.mark.parametrize("bad", [torch.randn(1, 3, 0, 8), torch.randn(1, 3, 8, 0),
                                 torch.zeros(1, 3, 8, 8, dtype=torch.long)])
def test_empty_or_integer_image_is_a_clear_error(bad):
    with pytest.raises(ValueError, match="floating-point image of at least 1x1 pixels"):
        DABNet(3).eval()(bad)


def test_channels_last_input():
    ref, fused = pair()
    for m in (ref, fused):
        m.eval()
    x = torch.randn(1, 3, 32, 64, dtype=torch.float64)
    with torch.no_grad():
        out = fused(x.contiguous(memory_format=torch.channels_last))
        torch.testing.assert_close(out, ref(x), **F64)


def test_compile_fullgraph_fused_eval():
    torch._dynamo.reset()
    ref, fused = pair(torch.float32, classes=4)
    ref.eval()
    fused.eval()
    x = torch.randn(1, 3, 32, 64)
    # aot_eager: Dynamo must capture the whole model (fullgraph) and AOTAutograd must run it on
    # the fake kernels; inductor also passes but spends minutes compiling C++ on a CPU runner.
    compiled = torch.compile(fused, fullgraph=True, backend="aot_eager")
    with torch.no_grad():
        torch.testing.assert_close(compiled(x), ref(x), rtol=1e-4, atol=1e-4)


@pytest.mark.parametrize("training", [True, False])
def test_autocast_bfloat16(training):
    """Under CPU autocast the fused model is as close to float32 as the unfused one (the
    depthwise weights are cast to the activations' dtype, as nn.Conv2d's are)."""
    ref = randomize_bn_prelu(DABNet(4))
    fused = DABNet(4, fused=True)
    fused.load_state_dict(ref.state_dict(), strict=True)
    x = torch.randn(2, 3, 32, 64)
    results = []
    for model, autocast in ((copy.deepcopy(ref), False), (ref, True), (fused, True)):
        model.train(training)
        xx = x.clone().requires_grad_()
        with torch.autocast("cpu", dtype=torch.bfloat16, enabled=autocast):
            out = model(xx)
        out.float().square().mean().backward()
        results.append((out.float(), xx.grad))
    for k in range(2):
        truth = results[0][k]
        err_ref = (results[1][k] - truth).norm() / truth.norm()
        err_fused = (results[2][k] - truth).norm() / truth.norm()
        assert err_fused <= 2 * err_ref + 1e-3, (k, err_fused.item(), err_ref.item())


def test_predict_gives_forward_argmax_labels():
    torch.manual_seed(0)
    plain = DABNet(19).eval()
    fused = DABNet(19, fused=True).eval()
    fused.load_state_dict(plain.state_dict())
    x = torch.randn(2, 3, 37, 50)
    with torch.no_grad():
        logits = plain(x)
    top2 = logits.topk(2, dim=1).values
    decided = top2[:, 0] - top2[:, 1] > 1e-4  # labels of near-ties may differ by rounding
    for model in (plain, fused):
        labels = model.predict(x)
        assert labels.shape == (2, 37, 50) and labels.dtype == torch.long
        assert torch.equal(labels[decided], logits.argmax(1)[decided])


def test_fused_eval_uses_cat_and_upsample_kernels(monkeypatch):
    from dabnet_kernels import ops

    calls = []
    for name in ("cat_bn_prelu", "upsample_bilinear", "upsample_argmax"):
        real = getattr(ops, name)
        monkeypatch.setattr(ops, name, lambda *a, _r=real, _n=name, **k: calls.append(_n) or _r(*a, **k))
    model = DABNet(19, fused=True).eval()
    with torch.no_grad():
        model(torch.randn(1, 3, 32, 64))
        model.predict(torch.randn(1, 3, 32, 64))
    # Per forward: the three concatenations of Table 1 and downsample_1's conv + max-pool.
    assert calls.count("cat_bn_prelu") == 8
    assert calls.count("upsample_bilinear") == 1 and calls.count("upsample_argmax") == 1
