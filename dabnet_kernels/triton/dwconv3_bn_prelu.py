"""dwconv3_bn_prelu in Triton.

Eval: one pass; the conv, rounded to the output dtype, then the BatchNorm and PReLU in the epilogue
(tap3's BN mode: what the backward recomputes). Training: the statistics pass computes the conv on
the fly (bn_prelu._stats_kernel with three taps), then the same one-pass kernel as in eval runs
with the batch statistics, so the conv output never goes to memory.
"""
from __future__ import annotations

from . import _common as cm
from .bn_prelu import batch_stats, bn_tap3, statistics


def dwconv3_bn_prelu(x_, conv_weight, dilation, weight, bias, running_mean, running_var,
                     prelu_weight, training, eps):
    cm.check_input(x_)
    axis = cm.check_dw_weight(conv_weight, x_, dilation, "conv_weight")
    cm.check_bn_prelu(x_, weight, bias, prelu_weight)
    cm.check_stats(running_mean, running_var, x_, training)
    x, cl = cm.canonical(x_)
    conv = cm.tap_params(conv_weight, x.shape[1], cm.acc_dtype(x))
    mean, var = statistics(x, running_mean, running_var, training,
                           lambda: batch_stats(x, cl, conv, dilation, axis))
    out = bn_tap3(x, cl, conv_weight, dilation, axis, 3, weight, bias, mean, var, prelu_weight,
                  eps)
    return out, mean, var
