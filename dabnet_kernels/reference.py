"""Pure-PyTorch versions of the dabnet ops, built from F.conv2d / F.batch_norm / F.prelu.

They are the oracle of the tests and the cuDNN/ATen baseline of the benchmarks. Signatures match
:mod:`dabnet_kernels.ops`.
"""
from __future__ import annotations

from typing import NamedTuple, Optional, Sequence

import torch
import torch.nn.functional as F
from torch import Tensor


class BNPReLUParams(NamedTuple):
    """The parameters and buffers of one BatchNorm2d + PReLU pair (nn.BatchNorm2d's names)."""

    weight: Optional[Tensor]
    bias: Optional[Tensor]
    running_mean: Optional[Tensor]
    running_var: Optional[Tensor]
    prelu_weight: Tensor
    num_batches_tracked: Optional[Tensor] = None


def dwconv3(x: Tensor, weight: Tensor, dilation: int = 1) -> Tensor:
    along_h = weight.shape[2] == 3
    padding = (dilation, 0) if along_h else (0, dilation)
    dil = (dilation, 1) if along_h else (1, dilation)
    return F.conv2d(x, weight, None, 1, padding, dil, groups=x.shape[1])


def _momentum(momentum, num_batches_tracked, training):
    """nn.BatchNorm2d's exponential_average_factor (and its num_batches_tracked increment)."""
    if not training or num_batches_tracked is None:
        return 0.0 if momentum is None else momentum
    num_batches_tracked.add_(1)
    return 1.0 / float(num_batches_tracked) if momentum is None else momentum


def bn_prelu(x: Tensor, weight, bias, running_mean, running_var, prelu_weight: Tensor,
             training: bool, momentum: Optional[float] = 0.1, eps: float = 1e-3,
             num_batches_tracked: Optional[Tensor] = None) -> Tensor:
    factor = _momentum(momentum, num_batches_tracked, training and running_mean is not None)
    use_batch = training or running_mean is None
    y = F.batch_norm(x, running_mean if not use_batch or training else None,
                     running_var if not use_batch or training else None, weight, bias,
                     use_batch, factor, eps)
    return F.prelu(y, prelu_weight)


def dwconv3_bn_prelu(x: Tensor, conv_weight: Tensor, dilation: int, weight, bias, running_mean,
                     running_var, prelu_weight: Tensor, training: bool,
                     momentum: Optional[float] = 0.1, eps: float = 1e-3,
                     num_batches_tracked: Optional[Tensor] = None) -> Tensor:
    return bn_prelu(dwconv3(x, conv_weight, dilation), weight, bias, running_mean, running_var,
                    prelu_weight, training, momentum, eps, num_batches_tracked)


def dab_neck(x: Tensor, weights: Sequence[Tensor], bn_prelus: Sequence[BNPReLUParams],
             dilation: int, training: bool = False, momentum: Optional[float] = 0.1,
             eps: float = 1e-3) -> Tensor:
    """The neck of a DAB module: two branches (3x1 -> BN-PReLU -> 1x3 -> BN-PReLU), the second
    dilated by `dilation`, summed, then BN-PReLU.

    weights: [3x1, 1x3, dilated 3x1, dilated 1x3]; bn_prelus: the BN-PReLU after each of them,
    then the final one (5 in all).
    """
    def cbp(t, k, d):
        return dwconv3_bn_prelu(t, weights[k], d, *bn_prelus[k][:4], bn_prelus[k][4], training,
                                momentum, eps, _nbt(bn_prelus[k]))

    br1 = cbp(cbp(x, 0, 1), 1, 1)
    br2 = cbp(cbp(x, 2, dilation), 3, dilation)
    p = bn_prelus[4]
    return bn_prelu(br1 + br2, *p[:5], training, momentum, eps, _nbt(p))


def _nbt(p):
    return p[5] if len(p) > 5 else None


def upsample_bilinear(x: Tensor, size) -> Tensor:
    return F.interpolate(x, size=tuple(size), mode="bilinear", align_corners=False)


def upsample_argmax(logits: Tensor, size) -> Tensor:
    return F.interpolate(logits, size=tuple(size), mode="bilinear", align_corners=False).argmax(1)
