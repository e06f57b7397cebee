"""dwconv3_bn_prelu in Triton.

Eval: one pass; the BatchNorm is folded into the taps and the bias, PReLU in the epilogue.
Training: the statistics pass computes the conv on the fly (bn_prelu._stats_kernel with three
taps), then the same one-pass kernel as in eval runs with the batch statistics folded in, so the
conv output never goes to memory.
"""
from __future__ import annotations

import torch

from . import _common as cm
from .bn_prelu import _scale_shift, batch_stats, statistics


def dwconv3_bn_prelu(x_, conv_weight, dilation, weight, bias, running_mean, running_var,
                     prelu_weight, training, eps):
    cm.check_input(x_)
    axis = cm.check_dw_weight(conv_weight, x_, dilation, "conv_weight")
    cm.check_bn_prelu(x_, weight, bias, prelu_weight)
    cm.check_stats(running_mean, running_var, x_, training)
    x, cl = cm.canonical(x_)
    C, acc = x.shape[1], cm.acc_dtype(x)
    conv = cm.tap_params(conv_weight, C, acc)
    mean, var, mean_out, var_out = statistics(
        x, running_mean, running_var, training, lambda: batch_stats(x, cl, conv, dilation, axis))
    scale, shift = _scale_shift(weight, bias, mean, var, eps, C)
    prm = cm.tap_params(conv_weight, C, acc, scale=scale, shift=shift,
                        slope=cm.vec(prelu_weight, C, torch.float64))
    return cm.tap3(x, cl, prm, dilation, axis, taps=3, act=True), mean_out, var_out
