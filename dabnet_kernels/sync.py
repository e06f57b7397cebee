"""BatchNorm statistics synchronised across the ranks of a process group (DDP), on any device and
any backend (gloo on CPU included).

* ``batch_stats``: per-channel mean and biased variance over the batches of every rank, combined
  exactly from each rank's own (count, mean, variance) (no sum-of-squares cancellation).
* ``GlobalBatchNorm2d``: an nn.BatchNorm2d whose training statistics are those, through a
  differentiable all-reduce, so that autograd sums the backward's reductions across ranks too
  (what nn.SyncBatchNorm does on CUDA). Plain PyTorch ops: the oracle of the fused path below.
* ``sync_bn_prelu``: the fused (depthwise conv +) BN-PReLU in training with synchronised
  statistics. The fused kernels run in their eval form with the global batch statistics standing
  in for the running ones; backward is the eval-form backward plus the two per-channel sums of
  the training-mode correction, all-reduced. Used by the fused modules of dabnet_kernels.nn
  whenever their BatchNorm child is an nn.SyncBatchNorm or a GlobalBatchNorm2d in training.
"""
from __future__ import annotations

from typing import Optional

import torch
import torch.distributed as dist
import torch.nn as nn
from torch import Tensor
from torch.autograd.function import once_differentiable

from . import ops
from . import reference as _ref
from .backend import ops_for

__all__ = ["GlobalBatchNorm2d", "SYNC_BN_TYPES", "batch_stats", "spans_ranks", "sync_bn_prelu"]


class _AllReduceSum(torch.autograd.Function):
    """Sum over the ranks of `group`; its gradient is the sum over ranks of the incoming gradients
    (every rank's loss depends on every rank's input through the shared statistics)."""

    @staticmethod
    def forward(ctx, x, group):
        ctx.group = group
        x = x.clone()
        dist.all_reduce(x, group=group)
        return x

    @staticmethod
    def backward(ctx, grad):
        grad = grad.clone()
        dist.all_reduce(grad, group=ctx.group)
        return grad, None


def _acc_dtype(x: Tensor) -> torch.dtype:
    return torch.float64 if x.dtype == torch.float64 else torch.float32


def _channel_view(v: Tensor, x: Tensor) -> Tensor:
    """A per-channel vector shaped to broadcast against x (N, C, ...)."""
    return v.view(1, -1, *([1] * (x.dim() - 2)))


def batch_stats(x: Tensor, group=None, differentiable: bool = False):
    """(mean, biased variance, count) per channel of x (N, C, ...) over the batches of all ranks
    of `group` (None: the default group), the way one BatchNorm would see their concatenation.

    Mean and variance are in float64 for float64 input, float32 otherwise; count is a float64
    scalar tensor. Each rank contributes (count, mean, variance) of its own batch and the global
    variance is sum(n_r * (var_r + (mean_r - mean)^2)) / N: exact, with no E[x^2] - E[x]^2
    cancellation. The rows are gathered by an all-reduce of a (world, 2C + 1) table that is zero
    outside this rank's row (the same traffic as nn.SyncBatchNorm's all-gather).
    differentiable=True lets gradients flow to x through the all-reduce (GlobalBatchNorm2d)."""
    C = x.shape[1]
    count = x.numel() // C if C else 0
    xa = x if x.dtype in (torch.float32, torch.float64) else x.float()
    if count:
        var, mean = torch.var_mean(xa, dim=[0, *range(2, x.dim())], correction=0)
    else:  # an empty batch on this rank contributes nothing
        mean = var = xa.new_zeros(C)
    local = torch.cat([mean.double(), var.double(), mean.new_full((1,), count, dtype=torch.float64)])
    world, rank = dist.get_world_size(group), dist.get_rank(group)
    table = torch.stack([local if r == rank else torch.zeros_like(local) for r in range(world)])
    if differentiable:
        table = _AllReduceSum.apply(table, group)
    else:
        dist.all_reduce(table, group=group)
    means, variances, counts = table[:, :C], table[:, C:2 * C], table[:, 2 * C:]
    n = counts.sum()
    mean = (counts * means).sum(0) / n
    var = (counts * (variances + (means - mean) ** 2)).sum(0) / n
    acc = _acc_dtype(x)
    return mean.to(acc), var.to(acc), n


class GlobalBatchNorm2d(nn.BatchNorm2d):
    """BatchNorm2d whose training statistics cover the batch of every rank of ``process_group``
    (None: the default group), like nn.SyncBatchNorm but on any device and process-group backend.
    In eval, or with one rank, it is nn.BatchNorm2d."""

    process_group = None

    def forward(self, x):
        if not spans_ranks(self):
            return super().forward(x)
        self._check_input_dim(x)
        mean, var, n = batch_stats(x, self.process_group, differentiable=True)
        if self.track_running_stats:  # nn.BatchNorm2d's update, with the global count
            ops._update_running(self.running_mean, self.running_var, mean.detach(), var.detach(),
                                n, self.momentum, self.num_batches_tracked)
        y = (x.to(mean.dtype) - _channel_view(mean, x)) * _channel_view(
            torch.rsqrt(var + self.eps), x)
        if self.affine:
            y = y * _channel_view(self.weight, x) + _channel_view(self.bias, x)
        return y.to(x.dtype)


SYNC_BN_TYPES = (nn.SyncBatchNorm, GlobalBatchNorm2d)


def spans_ranks(bn: nn.Module) -> bool:
    """Whether bn's next forward uses statistics over several ranks: a synchronised BatchNorm
    (nn.SyncBatchNorm or GlobalBatchNorm2d) in training, with an initialised process group of more
    than one rank (nn.SyncBatchNorm's own rule; otherwise it is a plain BatchNorm)."""
    return (isinstance(bn, SYNC_BN_TYPES) and bn.training and dist.is_available()
            and dist.is_initialized() and dist.get_world_size(bn.process_group) > 1)


# ------------------------------------------------------------------ fused, synchronised path
def _vjp(fn, inputs, grad, mask):
    """Gradients of fn(*inputs) against `grad` for the inputs selected by mask (None elsewhere)."""
    with torch.enable_grad():
        ins = [t.detach().requires_grad_(m) for t, m in zip(inputs, mask)]
        want = [t for t, m in zip(ins, mask) if m]
        got = iter(torch.autograd.grad(fn(*ins), want, grad))
    return tuple(next(got) if m else None for m in mask)


class _Kernels:
    """The eval-form kernels the synchronised path runs: those of an op namespace (C++/CUDA or
    Triton), or the reference ops (differentiated by autograd) when ns is None."""

    def __init__(self, ns):
        self.ns = ns

    def dwconv3(self, x, w, dilation):
        return _ref.dwconv3(x, w, dilation) if self.ns is None else self.ns.dwconv3(x, w, dilation)

    def dwconv3_backward(self, grad, x, w, dilation, mask):
        if self.ns is None:
            return _vjp(lambda a, b: _ref.dwconv3(a, b, dilation), (x, w), grad, mask)
        return self.ns.dwconv3_backward(grad, x, w, dilation, mask)

    def bn_prelu(self, y, w, b, a, mean, var, eps):
        """BN-PReLU of y normalised with the given statistics (eval form)."""
        if self.ns is None:
            return _ref.bn_prelu(y, w, b, mean, var, a, False, None, eps)
        return self.ns.bn_prelu(y, w, b, mean, var, a, False, eps)[0]

    def bn_prelu_backward(self, grad, y, w, b, a, mean, var, eps, mask):
        """(d/dy with the statistics held constant, d/dw = sum(gy * xhat), d/db = sum(gy),
        d/da): this rank's share, gy being the gradient after the PReLU."""
        if self.ns is None:
            return _vjp(lambda y_, w_, b_, a_: _ref.bn_prelu(y_, w_, b_, mean, var, a_, False,
                                                            None, eps),
                        (y, w, b, a), grad, mask)
        return self.ns.bn_prelu_backward(grad, y, w, b, a, mean, var, False, eps, mask)


class _SyncBNPReLU(torch.autograd.Function):
    """(optional depthwise conv, then) BN-PReLU with batch statistics over all ranks.

    With y the BN input, xhat = (y - mean) * invstd and gy the gradient after the PReLU, the
    training-mode input gradient is w * invstd * (gy - S1 / N - xhat * S2 / N), S1 = sum(gy) and
    S2 = sum(gy * xhat) over every rank's batch (N values per channel). The eval-form backward
    gives w * invstd * gy and this rank's shares of S1 and S2 (its bias and weight gradients);
    they are all-reduced and the rest is one pointwise pass. Parameter gradients stay local: DDP
    averages them as it does nn.SyncBatchNorm's."""

    @staticmethod
    def forward(ctx, x, conv_weight, weight, bias, prelu_weight, dilation, eps, group, kernels):
        y = x if conv_weight is None else kernels.dwconv3(x, conv_weight, dilation)
        mean, var, n = batch_stats(y, group)
        out = kernels.bn_prelu(y, weight, bias, prelu_weight, mean, var, eps)
        # The conv output is recomputed in backward (as the fused op does) rather than kept.
        ctx.save_for_backward(x, conv_weight, weight, bias, prelu_weight, mean, var, n)
        ctx.dilation, ctx.eps, ctx.group, ctx.kernels = dilation, eps, group, kernels
        ctx.mark_non_differentiable(mean, var, n)
        return out, mean, var, n

    @staticmethod
    @once_differentiable
    def backward(ctx, grad, _gmean, _gvar, _gn):
        x, conv_weight, weight, bias, prelu_weight, mean, var, n = ctx.saved_tensors
        k, eps = ctx.kernels, ctx.eps
        need_x, need_cw, need_w, need_b, need_a = ctx.needs_input_grad[:5]
        need_y = need_x or need_cw
        y = x if conv_weight is None else k.dwconv3(x, conv_weight, ctx.dilation)
        gy, gw, gb, ga = k.bn_prelu_backward(grad, y, weight, bias, prelu_weight, mean, var, eps,
                                             [need_y, need_w or need_y, need_b or need_y, need_a])
        if need_y:
            C = weight.shape[0]
            sums = torch.cat([gb, gw]).to(mean.dtype)
            dist.all_reduce(sums, group=ctx.group)
            invstd = torch.rsqrt(var + eps)
            scale = weight.to(mean.dtype) * invstd
            k1, k2 = sums[:C] / n, sums[C:] / n
            # gy holds scale * gy already; subtract scale * (k1 + (y - mean) * invstd * k2).
            t = (y - _channel_view(mean, y)) * _channel_view(scale * invstd * k2, y)
            gy = gy - t.add_(_channel_view(scale * k1, y)).to(gy.dtype)
        gx, gcw = None, None
        if conv_weight is None:
            gx = gy if need_x else None
        elif need_y:
            gx, gcw = k.dwconv3_backward(gy, x, conv_weight, ctx.dilation, [need_x, need_cw])
        return (gx, gcw, gw if need_w else None, gb if need_b else None, ga,
                None, None, None, None)


def sync_bn_prelu(x: Tensor, weight: Optional[Tensor], bias: Optional[Tensor],
                  running_mean: Optional[Tensor], running_var: Optional[Tensor],
                  prelu_weight: Tensor, momentum: Optional[float] = 0.1, eps: float = 1e-3,
                  num_batches_tracked: Optional[Tensor] = None, group=None,
                  conv_weight: Optional[Tensor] = None, dilation: int = 1) -> Tensor:
    """Training-mode ``bn_prelu`` (or ``dwconv3_bn_prelu`` when conv_weight is given) whose batch
    statistics span every rank of `group` (None: the default group), with nn.SyncBatchNorm's
    semantics: running statistics (if given) updated from the global mean and the unbiased global
    variance (global count), momentum=None a cumulative average, parameter gradients local.
    Needs an initialised process group; every rank must call it (it all-reduces in forward and,
    when the input needs a gradient, in backward). Runs on the backend ops_for(x) selects."""
    ops._check_x(x)
    if conv_weight is not None:
        ops._check_dw_weight(conv_weight, x, dilation, "conv_weight")
    # training=False: one value per channel on this rank is fine, the count is global.
    weight, bias, _ = ops._bn_args(x, weight, bias, running_mean, running_var, prelu_weight,
                                   False)
    if not (dist.is_available() and dist.is_initialized()):
        raise RuntimeError("sync_bn_prelu needs an initialised torch.distributed process group")
    out, mean, var, n = _SyncBNPReLU.apply(x, conv_weight, weight, bias, prelu_weight, dilation,
                                           eps, group, _Kernels(ops_for(x)))
    if running_mean is not None:
        ops._update_running(running_mean, running_var, mean, var, n, momentum,
                            num_batches_tracked)
    return out
