"""dabnet_kernels.nn: the fused modules against the nn modules they replace, and convert() on a
model written the way the authors' public code is (module names and structure as described in
dabnet/model.py), with plain nn.Sequential units and look-alikes that must not be swapped."""
import copy

import pytest
import torch
import torch.nn as nn

import dabnet_kernels
from dabnet_kernels import ops
from dabnet_kernels.nn import (FusedBNPReLU, FusedConvBNPReLU, FusedDABModule, FusedSequential,
                               convert, fusion_plan)
from nn_helpers import assert_as_accurate, assert_same_steps, randomize_bn_prelu

F64 = dict(rtol=1e-10, atol=1e-10)
# Several SGD steps: float64 rounding differences (summation order differs with the CPU's vector
# width, e.g. AVX-512 in oneDNN's conv backward) compound from step to step.
F64_STEPS = dict(rtol=1e-8, atol=1e-8)
F32 = dict(rtol=1e-4, atol=1e-5)


# ------------------------------------------------------- a model in the authors' style
class AuthorsBNPReLU(nn.Module):
    def __init__(self, n):
        super().__init__()
        self.bn = nn.BatchNorm2d(n, eps=1e-3)
        self.acti = nn.PReLU(n)

    def forward(self, input):
        output = self.bn(input)
        output = self.acti(output)
        return output


class AuthorsConv(nn.Module):
    def __init__(self, n_in, n_out, k, stride, padding, dilation=(1, 1), groups=1, bn_acti=False,
                 bias=False):
        super().__init__()
        self.bn_acti = bn_acti
        self.conv = nn.Conv2d(n_in, n_out, k, stride, padding, dilation, groups, bias=bias)
        if self.bn_acti:
            self.bn_prelu = AuthorsBNPReLU(n_out)

    def forward(self, input):
        output = self.conv(input)
        if self.bn_acti:
            output = self.bn_prelu(output)
        return output


class AuthorsDAB(nn.Module):
    def __init__(self, n, d=1):
        super().__init__()
        h = n // 2
        self.bn_relu_1 = AuthorsBNPReLU(n)
        self.conv3x3 = AuthorsConv(n, h, 3, 1, 1, bn_acti=True)
        self.dconv3x1 = AuthorsConv(h, h, (3, 1), 1, (1, 0), groups=h, bn_acti=True)
        self.dconv1x3 = AuthorsConv(h, h, (1, 3), 1, (0, 1), groups=h, bn_acti=True)
        self.ddconv3x1 = AuthorsConv(h, h, (3, 1), 1, (d, 0), (d, 1), groups=h, bn_acti=True)
        self.ddconv1x3 = AuthorsConv(h, h, (1, 3), 1, (0, d), (1, d), groups=h, bn_acti=True)
        self.bn_relu_2 = AuthorsBNPReLU(h)
        self.conv1x1 = AuthorsConv(h, n, 1, 1, 0)

    def forward(self, input):  # step by step, context branch first, sum written the other way
        output = self.bn_relu_1(input)
        output = self.conv3x3(output)
        context = self.ddconv3x1(output)
        context = self.ddconv1x3(context)
        local = self.dconv3x1(output)
        local = self.dconv1x3(local)
        output = self.bn_relu_2(context + local)
        output = self.conv1x1(output)
        return input + output


class LookAlike(nn.Module):
    """Has bn and acti but computes something else: must not be swapped."""

    def __init__(self, n):
        super().__init__()
        self.bn = nn.BatchNorm2d(n)
        self.acti = nn.PReLU(n)

    def forward(self, x):
        return self.acti(self.bn(x)) + x


class NotADAB(AuthorsDAB):
    """All the DAB module's children, but no residual: must not become a FusedDABModule."""

    def forward(self, input):
        y = self.conv3x3(self.bn_relu_1(input))
        return self.conv1x1(self.bn_relu_2(self.dconv1x3(self.dconv3x1(y))
                                           + self.ddconv1x3(self.ddconv3x1(y))))


def dw(C, k, d=1, **kw):
    pad = (d, 0) if k == (3, 1) else (0, d)
    dil = (d, 1) if k == (3, 1) else (1, d)
    return nn.Conv2d(C, C, k, 1, pad, dil, groups=C, bias=kw.pop("bias", False), **kw)


class Toy(nn.Module):
    def __init__(self, C=8):
        super().__init__()
        self.stem = AuthorsConv(3, C, 3, 1, 1, bn_acti=True)
        self.block = nn.Sequential(AuthorsDAB(C, d=2), AuthorsDAB(C, d=3))
        self.seq = nn.Sequential(dw(C, (1, 3), 2), nn.BatchNorm2d(C), nn.PReLU(),
                                 nn.Conv2d(C, C, 1), nn.BatchNorm2d(C, momentum=None),
                                 nn.PReLU(C))
        self.same_pad = nn.Sequential(
            nn.Conv2d(C, C, (3, 1), padding="same", dilation=(3, 1), groups=C, bias=False),
            nn.BatchNorm2d(C, affine=False), nn.PReLU(C))
        self.dense = AuthorsConv(C, C, (3, 1), 1, (1, 0), bn_acti=True)  # groups=1: not dw
        self.biased = nn.Sequential(dw(C, (3, 1), bias=True), nn.BatchNorm2d(C), nn.PReLU(C))
        self.look_alike = LookAlike(C)
        self.not_dab = NotADAB(C, d=2)
        self.head = AuthorsBNPReLU(C)

    def forward(self, x):
        x = self.block(self.stem(x))
        x = self.same_pad(self.seq(x))
        x = self.biased(self.dense(x))
        return self.head(self.not_dab(self.look_alike(x)))


EXPECTED_SWAPS = {
    "stem.bn_prelu": "bn_prelu",
    "block.0": "dab_neck", "block.1": "dab_neck",
    **{f"block.{i}.{n}": "bn_prelu" for i in (0, 1)
       for n in ("bn_relu_1", "conv3x3.bn_prelu", "bn_relu_2")},
    **{f"block.{i}.{n}": "dwconv3_bn_prelu" for i in (0, 1)
       for n in ("dconv3x1", "dconv1x3", "ddconv3x1", "ddconv1x3")},
    "seq": "Sequential(dwconv3_bn_prelu x1, bn_prelu x1)",
    "same_pad": "Sequential(dwconv3_bn_prelu x1)",
    "dense.bn_prelu": "bn_prelu",
    "biased": "Sequential(bn_prelu x1)",
    **{f"not_dab.{n}": "dwconv3_bn_prelu" for n in ("dconv3x1", "dconv1x3", "ddconv3x1",
                                                     "ddconv1x3")},
    **{f"not_dab.{n}": "bn_prelu" for n in ("bn_relu_1", "conv3x3.bn_prelu", "bn_relu_2")},
    "head": "bn_prelu",
}


def toy(dtype=torch.float64):
    return randomize_bn_prelu(Toy()).to(dtype)


# ------------------------------------------------------------------------------ convert
def test_convert_swaps_exactly_the_fusable_units(capsys):
    model = toy()
    swaps = fusion_plan(model)
    assert {s.name: s.op for s in swaps} == EXPECTED_SWAPS
    assert len(swaps) == len(EXPECTED_SWAPS)
    assert all(type(m) not in (FusedBNPReLU, FusedDABModule) for m in model.modules())
    fused = convert(model, verbose=True)
    printed = capsys.readouterr().out
    assert f"{len(EXPECTED_SWAPS)} module(s) swapped" in printed
    assert "block.1: AuthorsDAB -> dab_neck" in printed
    assert type(fused.block[0]) is FusedDABModule and fused.block[0].dilation == 2
    assert type(fused.block[1].ddconv1x3) is FusedConvBNPReLU
    assert type(fused.seq) is FusedSequential and type(fused.biased) is FusedSequential
    assert type(fused.look_alike) is LookAlike and type(fused.not_dab) is NotADAB
    assert type(fused.dense) is AuthorsConv and type(fused.dense.bn_prelu) is FusedBNPReLU
    assert fusion_plan(fused) == []  # converting again changes nothing


@pytest.mark.parametrize("training", [True, False])
def test_converted_model_matches_original(training):
    model = toy()
    fused = convert(model)
    x = torch.randn(2, 3, 12, 10, dtype=torch.float64)
    assert_same_steps(model, fused, x, steps=3, training=training, **F64_STEPS)


@pytest.mark.parametrize("training", [True, False])
def test_converted_model_float32_as_accurate_as_original(training):
    # Training: one step (later steps compare amplified rounding, see assert_as_accurate).
    def make(seed):
        truth = randomize_bn_prelu(Toy(), kinks=False).double()
        model = copy.deepcopy(truth).float()
        return truth, model, convert(model), torch.randn(2, 3, 12, 10)

    assert_as_accurate(make, steps=1 if training else 3, training=training)


def test_state_dict_round_trips_strictly_both_ways():
    model = toy()
    fused = convert(model)
    assert list(fused.state_dict()) == list(model.state_dict())
    fresh_fused = convert(Toy().double())
    fresh_fused.load_state_dict(model.state_dict(), strict=True)
    fresh = Toy().double()
    fresh.load_state_dict(fresh_fused.state_dict(), strict=True)
    x = torch.randn(1, 3, 8, 8, dtype=torch.float64)
    for m in (model, fresh_fused, fresh):
        m.eval()
    with torch.no_grad():
        torch.testing.assert_close(fresh_fused(x), model(x), **F64)
        torch.testing.assert_close(fresh(x), model(x), **F64)


def test_convert_copies_unless_inplace():
    model = toy()
    copied = convert(model)
    assert type(model.block[0]) is AuthorsDAB
    assert copied.block[0].conv3x3.conv.weight is not model.block[0].conv3x3.conv.weight
    conv_weight = model.block[0].dconv3x1.conv.weight
    same = convert(model, inplace=True)
    assert same is model and type(model.block[0]) is FusedDABModule
    assert model.block[0].dconv3x1.conv.weight is conv_weight  # the very same parameter


def test_convert_replaces_the_root_and_rejects_non_modules():
    bn_prelu = AuthorsBNPReLU(4)
    fused = convert(bn_prelu)
    assert type(fused) is FusedBNPReLU
    assert type(convert(AuthorsDAB(4, 2))) is FusedDABModule
    with pytest.raises(TypeError, match="nn.Module"):
        convert(torch.zeros(3))


def test_fused_dab_module_runs_one_kernel_in_eval(monkeypatch):
    calls = []
    real = torch.ops.dabnet.dab_neck

    class Spy:  # the op namespace, counting dab_neck kernel launches
        def __getattr__(self, name):
            return getattr(torch.ops.dabnet, name)

        def dab_neck(self, *args):
            calls.append(args[-1])
            return real(*args)

    dab = FusedDABModule.from_module(randomize_bn_prelu(AuthorsDAB(8, 3)).double())
    monkeypatch.setattr(ops, "ops_for", lambda x: Spy())
    x = torch.randn(1, 8, 9, 7, dtype=torch.float64)
    dab.eval()
    with torch.no_grad():
        dab(x)
    assert calls == [3]
    dab(x)  # gradients wanted: the differentiable composition instead
    dab.train()
    dab(x)
    assert calls == [3]


def test_fused_dab_module_falls_back_when_bns_differ():
    """One BN still training, or different eps: the composed units, each with its own settings."""
    ref = randomize_bn_prelu(AuthorsDAB(8, 2)).double().eval()
    x = torch.randn(2, 8, 6, 5, dtype=torch.float64)
    for change in (lambda m: m.dconv1x3.bn_prelu.bn.train(),
                   lambda m: setattr(m.bn_relu_2.bn, "eps", 1e-5)):
        a, b = copy.deepcopy(ref), copy.deepcopy(ref)
        change(a)
        change(b)
        fused = FusedDABModule.from_module(b)
        with torch.no_grad():
            torch.testing.assert_close(fused(x), a(x), **F64)
        torch.testing.assert_close(fused.dconv1x3.bn_prelu.bn.running_mean,
                                   a.dconv1x3.bn_prelu.bn.running_mean, **F64)


def test_fused_dab_module_rejects_a_wrong_neck():
    m = AuthorsDAB(8, 2)
    m.dconv3x1, m.dconv1x3 = m.dconv1x3, m.dconv3x1
    with pytest.raises(ValueError, match="dconv3x1 has kernel"):
        FusedDABModule.from_module(m)
    assert all(s.op != "dab_neck" for s in fusion_plan(m))


# --------------------------------------------------------------------- fused modules alone
@pytest.mark.parametrize("momentum", [0.1, None])
@pytest.mark.parametrize("affine, track, slopes", [(True, True, None), (False, True, 1),
                                                   (True, False, 1), (False, False, None)])
def test_fused_bn_prelu_matches_nn(affine, track, slopes, momentum):
    fused = FusedBNPReLU(5, eps=1e-4, momentum=momentum, affine=affine, track_running_stats=track,
                         num_slopes=slopes)
    randomize_bn_prelu(fused).double()
    ref = nn.Sequential(copy.deepcopy(fused.bn), copy.deepcopy(fused.acti))
    x = torch.randn(3, 5, 4, 6, dtype=torch.float64)
    assert_same_steps(ref, fused, x, steps=3, training=True, by_order=True, **F64_STEPS)
    assert_same_steps(ref, fused, x, steps=2, training=False, by_order=True, **F64_STEPS)
    names = {n for n, _ in fused.state_dict().items()}
    assert names == {"bn." + n for n, _ in ref[0].state_dict().items()} | {"acti.weight"}


def test_fused_bn_prelu_with_tracking_switched_off_later():
    """track_running_stats turned off after construction: the buffers stay, are used in eval and
    left alone in training (nn.BatchNorm2d's rule)."""
    fused = randomize_bn_prelu(FusedBNPReLU(4)).double()
    fused.bn.track_running_stats = False
    ref = nn.Sequential(copy.deepcopy(fused.bn), copy.deepcopy(fused.acti))
    x = torch.randn(2, 4, 5, 5, dtype=torch.float64)
    assert_same_steps(ref, fused, x, steps=2, training=True, by_order=True, **F64_STEPS)
    assert_same_steps(ref, fused, x, steps=1, training=False, by_order=True, **F64_STEPS)
    assert int(fused.bn.num_batches_tracked) == 0


@pytest.mark.parametrize("kernel, dilation", [((3, 1), 1), ((1, 3), 1), ((3, 1), 4),
                                              ((1, 3), 16)])
@pytest.mark.parametrize("momentum", [0.1, None])
def test_fused_conv_bn_prelu_matches_nn(kernel, dilation, momentum):
    fused = randomize_bn_prelu(FusedConvBNPReLU(6, kernel, dilation, momentum=momentum)).double()
    ref = nn.Sequential(copy.deepcopy(fused.conv), copy.deepcopy(fused.bn_prelu.bn),
                        copy.deepcopy(fused.bn_prelu.acti))
    x = torch.randn(2, 6, 7, 9, dtype=torch.float64)
    assert_same_steps(ref, fused, x, steps=3, training=True, by_order=True, **F64_STEPS)
    assert_same_steps(ref, fused, x, steps=2, training=False, by_order=True, **F64_STEPS)
    assert int(fused.bn_prelu.bn.num_batches_tracked) == 3


def test_fused_modules_float32_channels_last():
    fused = randomize_bn_prelu(FusedConvBNPReLU(8, (1, 3), 2))
    ref = nn.Sequential(copy.deepcopy(fused.conv), copy.deepcopy(fused.bn_prelu.bn),
                        copy.deepcopy(fused.bn_prelu.acti))
    x = torch.randn(2, 8, 6, 10).contiguous(memory_format=torch.channels_last)
    assert_same_steps(ref, fused, x, steps=2, training=True, by_order=True, rtol=1e-4,
                      atol=1e-4)


@pytest.mark.parametrize("conv", [
    nn.Conv2d(4, 4, (3, 1), 2, (1, 0), groups=4, bias=False),      # stride 2
    nn.Conv2d(4, 4, (3, 1), 1, (2, 0), groups=4, bias=False),      # padding != dilation
    nn.Conv2d(4, 4, (3, 1), 1, (1, 0), groups=2, bias=False),      # not depthwise
    nn.Conv2d(4, 4, (3, 1), 1, (1, 0), groups=4, bias=True),       # bias
    nn.Conv2d(4, 4, (3, 3), 1, 1, groups=4, bias=False),           # 3x3
    nn.Conv2d(4, 4, (3, 1), 1, (1, 0), groups=4, bias=False, padding_mode="reflect"),
])
def test_convs_the_op_does_not_compute_are_left_alone(conv):
    with pytest.raises(ValueError, match="FusedConvBNPReLU needs"):
        FusedConvBNPReLU.from_modules(conv, nn.BatchNorm2d(4), nn.PReLU(4))
    seq = nn.Sequential(conv, nn.BatchNorm2d(4), nn.PReLU(4))
    assert [s.op for s in fusion_plan(seq)] == ["Sequential(bn_prelu x1)"]


def test_bad_input_is_a_clear_error():
    fused = FusedBNPReLU(4)
    with pytest.raises(ValueError, match="4-D"):
        fused(torch.randn(4, 5, 5))
    with pytest.raises(ValueError, match=r"shape \(3,\)"):
        fused(torch.randn(1, 3, 5, 5))
    with pytest.raises(ValueError, match="more than 1 value per channel"):
        fused(torch.randn(1, 4, 1, 1))
    with pytest.raises(ValueError, match="kernel must be"):
        FusedConvBNPReLU(4, (3, 3))
    with pytest.raises(ValueError, match="FusedBNPReLU needs"):
        FusedBNPReLU.from_modules(nn.BatchNorm1d(4), nn.PReLU(4))


def test_package_exports():
    assert dabnet_kernels.convert is convert and dabnet_kernels.fusion_plan is fusion_plan


def test_fused_dab_module_refolds_when_parameters_change():
    """The eval kernel's folded parameters are kept between calls; every way of changing a
    parameter or buffer must show in the next output."""
    ref = randomize_bn_prelu(AuthorsDAB(8, 2)).double().eval()
    fused = FusedDABModule.from_module(copy.deepcopy(ref))
    x = torch.randn(2, 8, 6, 5, dtype=torch.float64)

    def check():
        with torch.no_grad():
            torch.testing.assert_close(fused(x), ref(x), **F64)

    check()
    check()  # from the kept fold
    assert "_fold_cache" in fused.__dict__ and "_fold_fast" in fused.__dict__
    changes = [
        lambda m: m.bn_relu_2.bn.weight.mul_(1.5),                      # in place
        lambda m: m.ddconv3x1.conv.weight.add_(0.25),                   # a conv weight
        lambda m: m.dconv1x3.bn_prelu.bn.running_var.mul_(2.0),         # a buffer
        lambda m: setattr(m.dconv3x1.bn_prelu.acti, "weight",           # a replaced parameter
                          nn.Parameter(torch.full((4,), 0.7, dtype=torch.float64))),
        lambda m: setattr(m.ddconv1x3.bn_prelu, "bn",                   # a replaced leaf module
                          copy.deepcopy(other.ddconv1x3.bn_prelu.bn)),
        lambda m: setattr(m, "bn_relu_2", copy.deepcopy(other.bn_relu_2)),  # a replaced unit
        lambda m: setattr(m.dconv1x3.bn_prelu.bn, "eps", 1e-2),         # an eps
        lambda m: m.ddconv3x1.train(),                                  # training mode...
        lambda m: m.eval(),                                             # ...and back
    ]
    other = randomize_bn_prelu(AuthorsDAB(8, 2)).double().eval()
    for change in changes:
        with torch.no_grad():
            change(ref)
            change(fused)
        check()
    state = randomize_bn_prelu(AuthorsDAB(8, 2)).double().state_dict()
    ref.load_state_dict(state)
    fused.load_state_dict(state)
    check()


def test_fused_dab_module_pickles_and_copies_after_an_eval_call():
    """The kept fold holds the op namespace (not picklable): torch.save of a whole module and
    deepcopy must drop it, and the copy must rebuild it and compute the same."""
    import io

    fused = FusedDABModule.from_module(randomize_bn_prelu(AuthorsDAB(8, 2)).double().eval())
    x = torch.randn(2, 8, 6, 5, dtype=torch.float64)
    with torch.no_grad():
        y = fused(x)
    assert "_fold_fast" in fused.__dict__
    buf = io.BytesIO()
    torch.save(fused, buf)
    buf.seek(0)
    for other in (torch.load(buf, weights_only=False), copy.deepcopy(fused)):
        with torch.no_grad():
            torch.testing.assert_close(other(x), y, rtol=0, atol=0)
        assert "_fold_fast" in other.__dict__
