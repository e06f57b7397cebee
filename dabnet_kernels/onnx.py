"""ONNX translations of the dabnet ops, for ``torch.onnx.export(..., dynamo=True)``: each op as
standard ONNX (Conv, PRelu, Concat, Resize, ArgMax, Mul/Add), BatchNorm folded into the
depthwise conv before it where the op has one (exact in real arithmetic; the exporter's optimizer
folds the constant parameters into the weights) and into a scale and shift elsewhere.

    onnx_program = torch.onnx.export(exported_program, dynamo=True,
                                     custom_translation_table=dabnet_kernels.onnx.TRANSLATIONS)

Eval mode only: a training-mode op (batch statistics) has no ONNX equivalent here and is an
error naming the op. Needs the onnxscript package.
"""
from __future__ import annotations

import torch

from . import _lib  # noqa: F401  (registers the dabnet ops that the table names)

try:
    from onnxscript import opset18 as op
except ImportError as e:  # pragma: no cover - depends on the installation
    raise ImportError(f"dabnet_kernels.onnx needs the onnxscript package ({e}); install it with "
                      "`pip install onnxscript`") from e

__all__ = ["TRANSLATIONS"]


def _eval_only(name, training):
    if training:
        raise ValueError(f"dabnet::{name} in training mode (batch statistics) cannot be exported "
                         "to ONNX: put the model in eval mode")


def _per_channel(v):
    """(C,) -> (C, 1, 1): broadcasts over an NCHW tensor's channels."""
    return op.Reshape(v, op.Constant(value_ints=[-1, 1, 1]))


def _prelu(x, slope):
    return op.PRelu(x, _per_channel(slope))


def _affine_prelu(x, scale, shift, slope):
    """PReLU(x * scale + shift), per channel: an eval BatchNorm folded into scale and shift."""
    return _prelu(op.Add(op.Mul(x, _per_channel(scale)), _per_channel(shift)), slope)


def _scale_shift(weight, bias, running_mean, running_var, eps):
    """Eval-mode BatchNorm as y = x * scale + shift."""
    scale = op.Div(weight, op.Sqrt(op.Add(running_var, op.CastLike(eps, running_var))))
    return scale, op.Sub(bias, op.Mul(running_mean, scale))


def _dwconv(x, weight, bias, kernel, dilation, channels):
    """Depthwise 3-tap conv with "same" zero padding; weight (C, 1, 3, 1) or (C, 1, 1, 3)."""
    along_h = kernel == (3, 1)
    d = int(dilation)
    pads = [d, 0, d, 0] if along_h else [0, d, 0, d]
    dil = [d, 1] if along_h else [1, d]
    args = (x, weight) if bias is None else (x, weight, bias)
    return op.Conv(*args, group=channels, kernel_shape=list(kernel), pads=pads, dilations=dil)


def _kernel_of(weight):
    return tuple(weight.shape[2:])


def dwconv3(x, weight, dilation):
    return _dwconv(x, weight, None, _kernel_of(weight), dilation, weight.shape[0])


def bn_prelu(x, weight, bias, running_mean, running_var, prelu_weight, training, eps):
    _eval_only("bn_prelu", training)
    scale, shift = _scale_shift(weight, bias, running_mean, running_var, eps)
    y = _affine_prelu(x, scale, shift, prelu_weight)
    return y, op.Identity(running_mean), op.Identity(running_var)  # eval: the running ones


def dwconv3_bn_prelu(x, conv_weight, dilation, weight, bias, running_mean, running_var,
                     prelu_weight, training, eps):
    _eval_only("dwconv3_bn_prelu", training)
    scale, shift = _scale_shift(weight, bias, running_mean, running_var, eps)
    folded = op.Mul(conv_weight, op.Reshape(scale, op.Constant(value_ints=[-1, 1, 1, 1])))
    y = _prelu(_dwconv(x, folded, shift, _kernel_of(conv_weight), dilation,
                       conv_weight.shape[0]), prelu_weight)
    return y, op.Identity(running_mean), op.Identity(running_var)


def dab_neck(x, weight, bias, slope, out_scale, out_shift, out_slope, dilation):
    """Folded parameters: weight (4, C, 3), bias and slope (4, C) for [3x1, 1x3, dilated 3x1,
    dilated 1x3], then the final BN-PReLU's scale, shift and slope (C)."""
    def unit(t, k, d):
        kernel = (3, 1) if k % 2 == 0 else (1, 3)
        w = op.Reshape(op.Gather(weight, op.Constant(value_int=k), axis=0),
                       op.Constant(value_ints=[-1, 1, *kernel]))
        b = op.Gather(bias, op.Constant(value_int=k), axis=0)
        s = op.Gather(slope, op.Constant(value_int=k), axis=0)
        return _prelu(_dwconv(t, w, b, kernel, d, weight.shape[1]), s)

    local = unit(unit(x, 0, 1), 1, 1)
    context = unit(unit(x, 2, dilation), 3, dilation)
    return _affine_prelu(op.Add(local, context), out_scale, out_shift, out_slope)


def cat_bn_prelu(xs, scale, shift, slope, add0=None, pre0=None, pool_last=False):
    xs = list(xs)
    if add0 is not None:
        xs[0] = op.Add(xs[0], add0)
    if pre0 is not None:
        xs[0] = _affine_prelu(xs[0], *pre0)
    if pool_last:
        xs[-1] = op.MaxPool(xs[-1], kernel_shape=[2, 2], strides=[2, 2])
    return _affine_prelu(op.Concat(*xs, axis=1), scale, shift, slope)


def _resize(x, out_h, out_w):
    """Bilinear, align_corners=False (PyTorch's half-pixel rule) to (out_h, out_w)."""
    size = op.Concat(op.Slice(op.Shape(x), op.Constant(value_ints=[0]),
                              op.Constant(value_ints=[2])),
                     *(op.Reshape(op.Cast(v, to=7) if not isinstance(v, int)
                                  else op.Constant(value_int=v), op.Constant(value_ints=[1]))
                       for v in (out_h, out_w)), axis=0)
    return op.Resize(x, None, None, size, mode="linear",
                     coordinate_transformation_mode="pytorch_half_pixel")


def upsample_bilinear(x, out_h, out_w):
    return _resize(x, out_h, out_w)


def upsample_argmax(logits, out_h, out_w):
    return op.ArgMax(_resize(logits, out_h, out_w), axis=1, keepdims=0)


def avg_pool3x3s2(x):
    return op.AveragePool(x, kernel_shape=[3, 3], strides=[2, 2], pads=[1, 1, 1, 1],
                          count_include_pad=1)


TRANSLATIONS = {getattr(torch.ops.dabnet, name).default: fn for name, fn in (
    ("dwconv3", dwconv3), ("bn_prelu", bn_prelu), ("dwconv3_bn_prelu", dwconv3_bn_prelu),
    ("dab_neck", dab_neck), ("cat_bn_prelu", cat_bn_prelu),
    ("upsample_bilinear", upsample_bilinear), ("upsample_argmax", upsample_argmax),
    ("avg_pool3x3s2", avg_pool3x3s2))}
