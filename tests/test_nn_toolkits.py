"""convert on DABNets written the way general toolkits write them (tests/toolkit_layouts.py):
nn.Sequential subclasses, activation wrappers, other child names, in-place residuals, a conv
with a bias. convert must find the units by what their forward computes, match the original in
value and gradient (float64), keep the state_dict, and say in fusion_plan why it left a
candidate alone."""
import copy

import pytest
import torch
import torch.nn as nn

from dabnet_kernels.nn import FusedDABModule, FusedSequential, convert, fusion_plan
from nn_helpers import assert_same_steps, randomize_bn_prelu
from toolkit_layouts import Activation, BNAct, DWConvBNAct, NormAct, ToolkitDABNet

F64_STEPS = dict(rtol=1e-10, atol=1e-10)
BLOCK_UNITS = {"pre": "bn_prelu", "init_conv": "bn_prelu", "post": "bn_prelu",
               **{f"{b}.{i}": "dwconv3_bn_prelu" for b in ("left", "right") for i in (0, 1)}}


def expected_swaps(blocks=3, biased=None):
    ops = {"stem.0": "bn_prelu", "stem.1": "bn_prelu", "down": "bn_prelu", "cat_act": "bn_prelu"}
    for i in range(blocks):
        ops.update({f"blocks.{i}.{n}": op for n, op in BLOCK_UNITS.items()})
    if biased is not None:
        ops[f"blocks.{biased}.left.0"] = "bn_prelu"
    return {name: f"Sequential({op} x1)" for name, op in ops.items()}


def net(**kw):
    return randomize_bn_prelu(ToolkitDABNet(**kw)).double()


def test_toolkit_units_are_found_by_what_they_compute(capsys):
    model = net()
    plan = fusion_plan(model)
    assert {s.name: s.op for s in plan} == expected_swaps()
    assert plan.skipped == []
    fused = convert(model, verbose=True)
    assert "25 module(s) swapped" in capsys.readouterr().out
    assert type(fused.blocks[0].left[0]) is FusedSequential
    assert type(fused.blocks[0].post) is FusedSequential  # NormAct: a chain of norm, act
    assert list(fused.state_dict()) == list(model.state_dict())
    assert fusion_plan(fused) == []


@pytest.mark.parametrize("training", [True, False])
def test_toolkit_net_matches_in_value_and_gradient(training):
    model = net(bias_in_block=1)
    fused = convert(model)
    x = torch.randn(2, 3, 32, 40, dtype=torch.float64)
    assert_same_steps(model, fused, x, steps=2, training=training, **F64_STEPS)


def test_fusion_plan_says_why_candidates_were_left_alone():
    plan = fusion_plan(net(bias_in_block=1))
    assert {s.name: s.op for s in plan} == expected_swaps(biased=1)
    assert [(s.name, s.kind) for s in plan.skipped] == [("blocks.1.left.0", "DWConvBNAct")]
    assert "conv has a bias" in plan.skipped[0].reason
    assert "only the BatchNorm + PReLU after it" in plan.skipped[0].reason

    relu = fusion_plan(net(act="relu", blocks=1))
    assert list(relu) == []
    assert len(relu.skipped) == 11  # every BN: stem x2, down, block x7, cat_act
    assert all("is ReLU, not PReLU" in s.reason for s in relu.skipped)


class ScaledActivation(Activation):
    """Wraps a PReLU but does more than call it: not a pass-through."""

    def forward(self, x):
        return self.activation(x) * 2


class AddsInput(NormAct):
    """Has norm and act, but adds its input: not a chain."""

    def forward(self, x):
        return self.act(self.norm(x)) + x


def test_wrappers_and_chains_that_compute_something_else_are_not_fused():
    scaled = BNAct(4)
    scaled[1] = ScaledActivation("prelu", num_parameters=4)
    plan = fusion_plan(nn.Sequential(scaled, AddsInput(4)))
    assert list(plan) == []
    reasons = {s.name: s.reason for s in plan.skipped}
    assert "ScaledActivation, not PReLU" in reasons["0"]
    assert "not its children applied one after the other" in reasons["1"]


def test_a_toolkit_unit_alone_matches_nn_with_inplace_wrapper():
    unit = randomize_bn_prelu(DWConvBNAct(6, (1, 3), dilation=3, inplace=True)).double()
    fused = convert(unit)
    assert type(fused) is FusedSequential and fused.groups() == [("dwconv3_bn_prelu", [0, 1, 2])]
    x = torch.randn(2, 6, 7, 9, dtype=torch.float64)
    assert_same_steps(copy.deepcopy(unit), fused, x, steps=3, training=True, **F64_STEPS)


def test_dab_module_with_wrapped_prelus_fuses_its_neck_and_refolds():
    """The authors' DAB module with each PReLU inside an activation wrapper: one neck kernel in
    eval, and replacing the PReLU inside a wrapper refolds (the kept fold follows wrappers)."""
    from test_nn import AuthorsDAB

    ref = randomize_bn_prelu(AuthorsDAB(8, 2)).double().eval()
    wrapped = copy.deepcopy(ref)
    for m in list(wrapped.modules()):
        if isinstance(getattr(m, "acti", None), nn.PReLU):
            wrapper = Activation("prelu")
            wrapper.activation = m.acti
            m.acti = wrapper
    fused = convert(wrapped)
    assert type(fused) is FusedDABModule
    assert list(fused.state_dict()) == list(wrapped.state_dict())
    x = torch.randn(2, 8, 6, 5, dtype=torch.float64)
    with torch.no_grad():
        for _ in range(2):  # the second call from the kept fold
            torch.testing.assert_close(fused(x), ref(x), rtol=1e-10, atol=1e-10)
        assert "_fold_fast" in fused.__dict__
        slope = nn.PReLU(4).double()
        slope.weight.fill_(0.3)
        fused.bn_relu_2.acti.activation = slope
        ref.bn_relu_2.acti = copy.deepcopy(slope)
        torch.testing.assert_close(fused(x), ref(x), rtol=1e-10, atol=1e-10)
