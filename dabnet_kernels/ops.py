"""The dabnet ops: public functions, fake (meta) kernels and autograd formulas.

Schemas live in csrc/ops.cpp (``torch.ops.dabnet.*``); the C++/CUDA kernels register per device.
Every public function validates its arguments first, so bad input is a ValueError that names the
problem rather than an error from deep inside a kernel.
"""
from __future__ import annotations

from typing import Optional, Sequence

import torch
import torch.nn.functional as F
from torch import Tensor

from . import _lib  # noqa: F401  (loads the compiled kernels and their registrations)
from . import reference as _ref
from .backend import ops_for
from .reference import BNPReLUParams

__all__ = ["dwconv3", "bn_prelu", "dwconv3_bn_prelu", "dab_neck", "fold_dab_neck", "cat_bn_prelu",
           "fold_bn_prelu", "affine_prelu_", "add_affine_prelu_", "upsample_bilinear",
           "upsample_argmax", "avg_pool3x3s2", "max_pool2x2", "BNPReLUParams"]

_ops = torch.ops.dabnet


# ----------------------------------------------------------------------------------- validation
def _check_x(x, name="x"):
    if not isinstance(x, Tensor):
        raise TypeError(f"{name} must be a torch.Tensor, got {type(x).__name__}")
    if not x.is_floating_point():
        raise ValueError(f"{name} must be a floating-point tensor, got dtype {x.dtype}")
    if x.dim() != 4:
        raise ValueError(f"{name} must be 4-D (N, C, H, W), got {x.dim()}-D shape {tuple(x.shape)}")


def _check_same(t, x, name):
    if not isinstance(t, Tensor):
        raise TypeError(f"{name} must be a torch.Tensor, got {type(t).__name__}")
    if t.device != x.device:
        raise ValueError(f"{name} is on {t.device} but x is on {x.device}")


def _check_dw_weight(w, x, dilation, name="weight"):
    _check_same(w, x, name)
    if w.dtype != x.dtype:
        raise ValueError(f"{name} has dtype {w.dtype} but x has dtype {x.dtype}")
    C = x.shape[1]
    if tuple(w.shape) not in ((C, 1, 3, 1), (C, 1, 1, 3)):
        raise ValueError(f"{name} must have shape ({C}, 1, 3, 1) or ({C}, 1, 1, 3) for an input "
                         f"with {C} channels, got {tuple(w.shape)}")
    if isinstance(dilation, bool) or not isinstance(dilation, int) or dilation < 1:
        raise ValueError(f"dilation must be an int >= 1, got {dilation!r}")


def _check_vec(v, x, name, allow_single=False):
    _check_same(v, x, name)
    if not v.is_floating_point():
        raise ValueError(f"{name} must be floating-point, got dtype {v.dtype}")
    C = x.shape[1]
    if v.dim() != 1 or (v.shape[0] != C and not (allow_single and v.shape[0] == 1)):
        want = f"({C},)" + (" or (1,)" if allow_single else "")
        raise ValueError(f"{name} must have shape {want}, got {tuple(v.shape)}")


def _bn_args(x, weight, bias, running_mean, running_var, prelu_weight, training):
    """Validates one BN-PReLU's parameters; fills in a missing affine weight/bias."""
    C = x.shape[1]
    if C == 0:
        raise ValueError(f"BatchNorm needs at least one channel, got an input of shape "
                         f"{tuple(x.shape)}")
    weight = torch.ones(C, dtype=x.dtype, device=x.device) if weight is None else weight
    bias = torch.zeros(C, dtype=x.dtype, device=x.device) if bias is None else bias
    _check_vec(weight, x, "weight")
    _check_vec(bias, x, "bias")
    if prelu_weight is None:
        raise ValueError("prelu_weight is required")
    _check_vec(prelu_weight, x, "prelu_weight", allow_single=True)
    if (running_mean is None) != (running_var is None):
        raise ValueError("running_mean and running_var must be given together (or both None)")
    if running_mean is not None:
        _check_vec(running_mean, x, "running_mean")
        _check_vec(running_var, x, "running_var")
    use_batch = bool(training) or running_mean is None
    if use_batch and x.numel() > 0 and x.numel() // C <= 1:
        raise ValueError(f"training-mode BatchNorm needs more than 1 value per channel, got input "
                         f"of shape {tuple(x.shape)}")
    return weight, bias, use_batch


@torch.no_grad()
def _update_running(running_mean, running_var, mean, var, n, momentum, num_batches_tracked):
    """nn.BatchNorm2d's running-statistics update, in place, from the batch mean and biased var."""
    if num_batches_tracked is not None:
        num_batches_tracked.add_(1)
    if momentum is None:
        if num_batches_tracked is None:
            raise ValueError("momentum=None (cumulative average) needs num_batches_tracked")
        factor = 1.0 / num_batches_tracked.to(mean.dtype)
    else:
        factor = momentum
    unbiased = var * (n / (n - 1))
    running_mean.mul_(1 - factor).add_((factor * mean).to(running_mean.dtype))
    running_var.mul_(1 - factor).add_((factor * unbiased).to(running_var.dtype))


# ------------------------------------------------------------------------------- public API
def dwconv3(x: Tensor, weight: Tensor, dilation: int = 1) -> Tensor:
    """Depthwise 3-tap convolution with "same" zero padding (= dilation), stride 1, no bias.

    weight is nn.Conv2d's depthwise weight: (C,1,3,1) convolves along H, (C,1,1,3) along W.
    """
    _check_x(x)
    _check_dw_weight(weight, x, dilation)
    ns = ops_for(x)
    if ns is None:
        return _ref.dwconv3(x, weight, dilation)
    return ns.dwconv3(x, weight, dilation)


def bn_prelu(x: Tensor, weight: Optional[Tensor], bias: Optional[Tensor],
             running_mean: Optional[Tensor], running_var: Optional[Tensor], prelu_weight: Tensor,
             training: bool, momentum: Optional[float] = 0.1, eps: float = 1e-3,
             num_batches_tracked: Optional[Tensor] = None) -> Tensor:
    """BatchNorm2d then PReLU, with nn.BatchNorm2d's semantics.

    Training: batch statistics; running_mean/var (if given) updated in place with the unbiased
    variance; momentum=None is a cumulative average over num_batches_tracked (incremented in place).
    Eval: running statistics (batch statistics if there are none).
    """
    _check_x(x)
    weight, bias, use_batch = _bn_args(x, weight, bias, running_mean, running_var, prelu_weight,
                                       training)
    ns = ops_for(x)
    if ns is None:
        return _ref.bn_prelu(x, weight, bias, running_mean, running_var, prelu_weight, training,
                             momentum, eps, num_batches_tracked)
    out, mean, var = ns.bn_prelu(x, weight, bias, None if use_batch else running_mean,
                                   None if use_batch else running_var, prelu_weight, use_batch, eps)
    if training and running_mean is not None and x.numel() > 0:
        _update_running(running_mean, running_var, mean, var, x.numel() // x.shape[1], momentum,
                        num_batches_tracked)
    return out


def dwconv3_bn_prelu(x: Tensor, conv_weight: Tensor, dilation: int, weight: Optional[Tensor],
                     bias: Optional[Tensor], running_mean: Optional[Tensor],
                     running_var: Optional[Tensor], prelu_weight: Tensor, training: bool,
                     momentum: Optional[float] = 0.1, eps: float = 1e-3,
                     num_batches_tracked: Optional[Tensor] = None) -> Tensor:
    """dwconv3 followed by bn_prelu (the DAB module's depthwise Conv with bn_acti=True)."""
    _check_x(x)
    _check_dw_weight(conv_weight, x, dilation, "conv_weight")
    weight, bias, use_batch = _bn_args(x, weight, bias, running_mean, running_var, prelu_weight,
                                       training)
    ns = ops_for(x)
    if ns is None:
        return _ref.dwconv3_bn_prelu(x, conv_weight, dilation, weight, bias, running_mean,
                                     running_var, prelu_weight, training, momentum, eps,
                                     num_batches_tracked)
    out, mean, var = ns.dwconv3_bn_prelu(x, conv_weight, dilation, weight, bias,
                                           None if use_batch else running_mean,
                                           None if use_batch else running_var, prelu_weight,
                                           use_batch, eps)
    if training and running_mean is not None and x.numel() > 0:
        _update_running(running_mean, running_var, mean, var, x.numel() // x.shape[1], momentum,
                        num_batches_tracked)
    return out


def _bn_tuple(p, k):
    if not isinstance(p, (tuple, list)) or len(p) not in (5, 6):
        raise ValueError(f"bn_prelus[{k}] must be (weight, bias, running_mean, running_var, "
                         f"prelu_weight[, num_batches_tracked]), got {type(p).__name__}")
    return BNPReLUParams(*p)


def fold_dab_neck(weights: Sequence[Tensor], bn_prelus: Sequence[BNPReLUParams], eps: float,
                  dtype: torch.dtype):
    """Folds the neck's eval-mode BatchNorms into (weight (4,C,3), bias (4,C), slope (4,C),
    out_scale, out_shift, out_slope (C)): the arguments of torch.ops.dabnet.dab_neck."""
    C = weights[0].shape[0]
    acc = torch.float64 if dtype == torch.float64 else torch.float32
    f64 = dict(dtype=torch.float64, device=weights[0].device)

    def rows(name, fill):
        """The five BNs' `name` vectors as one (5, C) float64 tensor (fill where absent)."""
        vs = [getattr(p, name) for p in bn_prelus]
        if all(v is not None and v.shape == (C,) and v.dtype == vs[0].dtype for v in vs):
            return torch.stack(vs).to(**f64)  # the usual case: two ops
        return torch.stack([torch.full((C,), fill, **f64) if v is None else v.to(**f64).expand(C)
                            for v in vs])

    # All five at once, in float64: a few tensor ops instead of ~50 (the fold is Python overhead
    # on every unfolded call; it was as long as the fused kernel itself at block 2's shape).
    scale = rows("weight", 1.0) * torch.rsqrt(rows("running_var", 1.0) + eps)
    shift = rows("bias", 0.0) - rows("running_mean", 0.0) * scale
    slope = rows("prelu_weight", 0.0).to(acc)
    w = torch.stack([t.reshape(C, 3) for t in weights]).to(**f64) * scale[:4, :, None]
    return (w.to(acc), shift[:4].to(acc), slope[:4].contiguous(), scale[4].to(acc),
            shift[4].to(acc), slope[4].contiguous())


def dab_neck(x: Tensor, weights: Sequence[Tensor], bn_prelus: Sequence[BNPReLUParams],
             dilation: int, training: bool = False, momentum: Optional[float] = 0.1,
             eps: float = 1e-3) -> Tensor:
    """The DAB module's neck: (3x1 -> BN-PReLU -> 1x3 -> BN-PReLU) plus the same dilated by
    `dilation`, summed, then BN-PReLU.

    weights: [3x1, 1x3, dilated 3x1, dilated 1x3] depthwise weights. bn_prelus: 5 BNPReLUParams
    (or tuples): after each conv, then the final one. In eval mode with no gradient needed this is
    one fused kernel (one read of x, one write of the output); otherwise it composes
    dwconv3_bn_prelu and bn_prelu, so autograd and running statistics are exact.
    """
    _check_x(x)
    if len(weights) != 4:
        raise ValueError(f"weights must hold 4 depthwise weights, got {len(weights)}")
    if len(bn_prelus) != 5:
        raise ValueError(f"bn_prelus must hold 5 BN-PReLU parameter sets, got {len(bn_prelus)}")
    bn = [_bn_tuple(p, k) for k, p in enumerate(bn_prelus)]
    shapes = ((3, 1), (1, 3), (3, 1), (1, 3))
    for k, w in enumerate(weights):
        _check_dw_weight(w, x, dilation, f"weights[{k}]")
        if tuple(w.shape[2:]) != shapes[k]:
            raise ValueError(f"weights[{k}] must be a {'x'.join(map(str, shapes[k]))} depthwise "
                             f"weight, got shape {tuple(w.shape)}")
    needs_grad = _needs_grad(x, *weights, *(t for p in bn for t in p[:5]))
    ns = ops_for(x)
    fused = (ns is not None and not training and not needs_grad
             and all(p.running_mean is not None for p in bn))
    if not fused:
        def cbp(t, k, d):
            p = bn[k]
            return dwconv3_bn_prelu(t, weights[k], d, p.weight, p.bias, p.running_mean,
                                    p.running_var, p.prelu_weight, training, momentum, eps,
                                    p.num_batches_tracked)

        s = cbp(cbp(x, 0, 1), 1, 1) + cbp(cbp(x, 2, dilation), 3, dilation)
        p = bn[4]
        return bn_prelu(s, p.weight, p.bias, p.running_mean, p.running_var, p.prelu_weight,
                        training, momentum, eps, p.num_batches_tracked)
    for k, p in enumerate(bn):
        _bn_args(x, p.weight, p.bias, p.running_mean, p.running_var, p.prelu_weight, False)
    return ns.dab_neck(x, *fold_dab_neck(weights, bn, eps, x.dtype), dilation)


def cat_bn_prelu(xs: Sequence[Tensor], weight: Optional[Tensor], bias: Optional[Tensor],
                 running_mean: Optional[Tensor], running_var: Optional[Tensor],
                 prelu_weight: Tensor, training: bool, momentum: Optional[float] = 0.1,
                 eps: float = 1e-3, num_batches_tracked: Optional[Tensor] = None) -> Tensor:
    """``bn_prelu(torch.cat(xs, 1), ...)``. In eval with no gradient needed on CPU, one kernel
    writes the normalized concatenation directly (no concatenated intermediate)."""
    if not isinstance(xs, (list, tuple)) or len(xs) == 0:
        raise ValueError("xs must be a non-empty list of tensors")
    for k, t in enumerate(xs):
        _check_x(t, f"xs[{k}]")
        _check_same(t, xs[0], f"xs[{k}]")
        if t.shape[0] != xs[0].shape[0] or t.shape[2:] != xs[0].shape[2:]:
            raise ValueError(f"xs[{k}] has shape {tuple(t.shape)}, which cannot be concatenated "
                             f"along channels with {tuple(xs[0].shape)}")
    needs_grad = _needs_grad(*xs, weight, bias, prelu_weight)
    x0 = xs[0]
    mixed = any(t.dtype != x0.dtype for t in xs)  # torch.cat promotes (e.g. under autocast)
    if (training or needs_grad or mixed or running_mean is None or x0.device.type != "cpu"
            or ops_for(x0) is None):
        return bn_prelu(torch.cat(list(xs), 1), weight, bias, running_mean, running_var,
                        prelu_weight, training, momentum, eps, num_batches_tracked)
    C = sum(t.shape[1] for t in xs)
    like = x0.new_empty((1, C, 1, 1))
    weight, bias, _ = _bn_args(like, weight, bias, running_mean, running_var, prelu_weight, False)
    folded = fold_bn_prelu(weight, bias, running_mean, running_var, prelu_weight, eps, x0.dtype)
    return torch.ops.dabnet.cat_bn_prelu(list(xs), *folded)


def fold_bn_prelu(weight: Optional[Tensor], bias: Optional[Tensor], running_mean: Tensor,
                  running_var: Tensor, prelu_weight: Tensor, eps: float, dtype: torch.dtype):
    """An eval BatchNorm + PReLU as (scale, shift, slope) in the accumulation type of dtype
    (float64 for float64, else float32): PReLU(x * scale + shift) is its output. The fold is
    computed in float64, as the CPU kernels fold."""
    C = running_mean.shape[0]
    acc = torch.float64 if dtype == torch.float64 else torch.float32
    w = running_var.new_ones(C, dtype=torch.float64) if weight is None else weight.double()
    b = running_var.new_zeros(C, dtype=torch.float64) if bias is None else bias.double()
    scale = w * torch.rsqrt(running_var.double() + eps)
    shift = b - running_mean.double() * scale
    return scale.to(acc), shift.to(acc), prelu_weight.to(acc).expand(C).contiguous()


def _needs_grad(*tensors) -> bool:
    """Whether autograd would record an op on these (None allowed): the fused eval kernels run
    only where it would not."""
    return torch.is_grad_enabled() and any(t is not None and t.requires_grad for t in tensors)


def _check_inplace(y, name):
    _check_x(y, name)
    if y.dim() != 4:
        raise ValueError(f"{name} must be 4-D (N, C, H, W), got shape {tuple(y.shape)}")
    if not (y.is_contiguous() or y.is_contiguous(memory_format=torch.channels_last)):
        raise ValueError(f"{name} is updated in place, so it must be contiguous (NCHW or "
                         f"channels_last), got strides {y.stride()}")
    if _needs_grad(y):
        raise ValueError(f"{name} requires grad: the in-place eval ops are for inference only "
                         f"(use bn_prelu, which has a backward)")
    if ops_for(y) is None or y.device.type != "cpu":
        raise ValueError(f"{name} is on {y.device}: the in-place eval ops have CPU kernels only")


def affine_prelu_(x: Tensor, scale: Tensor, shift: Tensor, slope: Tensor) -> Tensor:
    """In place, ``x = PReLU(x * scale + shift)``: an eval BN-PReLU folded by
    :func:`fold_bn_prelu`, applied to a tensor nothing else needs (a conv's fresh output), where
    a new output would cost a write to fresh memory. Inference only, CPU. Returns x."""
    _check_inplace(x, "x")
    torch.ops.dabnet.affine_prelu_(x, scale, shift, slope)
    return x


def add_affine_prelu_(y: Tensor, r: Tensor, scale: Tensor, shift: Tensor, slope: Tensor) -> Tensor:
    """``y += r`` in place (a residual add), and returns ``PReLU(y * scale + shift)`` of the sum,
    in one pass: what ``y.add_(r)`` followed by an eval BN-PReLU computes. Inference only, CPU."""
    _check_inplace(y, "y")
    _check_x(r, "r")
    _check_same(r, y, "r")
    if r.dtype != y.dtype:
        raise ValueError(f"r has dtype {r.dtype}, y {y.dtype}: they must agree")
    if r.shape != y.shape:
        raise ValueError(f"r has shape {tuple(r.shape)}, y {tuple(y.shape)}: they must agree")
    if r is y or (r.untyped_storage().data_ptr() == y.untyped_storage().data_ptr()):
        raise ValueError("r shares y's memory: add_affine_prelu_ updates y in place")
    return torch.ops.dabnet.add_affine_prelu_(y, r, scale, shift, slope)


def _check_size(size):
    if isinstance(size, int):
        size = (size, size)
    size = tuple(size)
    if len(size) != 2 or any(isinstance(s, bool) or not isinstance(s, (int, torch.SymInt))
                             or s <= 0 for s in size):
        raise ValueError(f"size must be two positive ints (H, W), got {size!r}")
    return size


def _check_upsample_input(x, name):
    _check_x(x, name)
    if x.shape[2] == 0 or x.shape[3] == 0:
        raise ValueError(f"cannot upsample {name} of shape {tuple(x.shape)}: its spatial size is "
                         "empty (no pixels to interpolate from)")


def _symbolic(size) -> bool:
    """A size traced as a symbol (torch.export / torch.compile with dynamic shapes): the ops'
    int arguments would fix it to the example's value, so the composite runs instead."""
    return any(isinstance(s, torch.SymInt) for s in size)


def upsample_bilinear(x: Tensor, size) -> Tensor:
    """``F.interpolate(x, size, mode="bilinear", align_corners=False)``, with a faster CPU kernel
    (values equal to rounding level; gradients by ATen's own backward). Other devices, and
    symbolic sizes (dynamic-shape export), use F.interpolate."""
    _check_upsample_input(x, "x")
    size = _check_size(size)
    if x.device.type != "cpu" or ops_for(x) is None or _symbolic(size):
        return _ref.upsample_bilinear(x, size)
    return torch.ops.dabnet.upsample_bilinear(x, size[0], size[1])


def upsample_argmax(logits: Tensor, size) -> Tensor:
    """Per-pixel class labels (int64, N x H x W) of ``F.interpolate(logits, size, mode="bilinear",
    align_corners=False).argmax(1)``, without materializing the upsampled logits (CPU kernel;
    other devices use that composite). Where two classes tie to rounding level the label may
    differ from the composite's. As torch.argmax, a NaN logit wins (the first NaN, if several).
    Symbolic sizes: the composite, as upsample_bilinear."""
    _check_upsample_input(logits, "logits")
    size = _check_size(size)
    if logits.shape[1] == 0:
        raise ValueError("logits must have at least one class (channel)")
    if logits.device.type != "cpu" or ops_for(logits) is None or _symbolic(size):
        return _ref.upsample_argmax(logits, size)
    return torch.ops.dabnet.upsample_argmax(logits, size[0], size[1])


def avg_pool3x3s2(x: Tensor) -> Tensor:
    """``F.avg_pool2d(x, 3, stride=2, padding=1)`` (padding counted, floor): DABNet's input-injection
    pool. On CPU with no gradient needed, dabnet::avg_pool3x3s2 (csrc/cpu/avg_pool.cpp), equal to
    rounding (the window is summed in another order): ATen's avg_pool2d and oneDNN vectorize over
    channels, of which the image has 3 (one pool of 1x3x512x1024 channels_last on 2 cores, fp32:
    ATen 6.7 ms, a depthwise conv with taps 1/9 1.0 ms; the three cascaded pools of DABNet there:
    the conv 0.76-1.12 ms, this kernel 0.50-0.52 ms, bf16 0.53-0.91 against 0.48-0.56, alternating
    in one process). With a gradient, or on other devices, F.avg_pool2d."""
    _check_x(x)
    if x.device.type != "cpu" or _needs_grad(x) or ops_for(x) is None or 0 in x.shape[2:]:
        return F.avg_pool2d(x, 3, stride=2, padding=1)
    return torch.ops.dabnet.avg_pool3x3s2(x)


def max_pool2x2(x: Tensor) -> Tensor:
    """``F.max_pool2d(x, 2, stride=2)`` (floor), DABNet's downsampling max-pool. On CPU with no
    gradient needed, the elementwise maximum of the window's four strided views: the same values
    (max is exact, NaN propagates in both), while ATen's CPU max_pool2d also writes int64
    indices (1x35x256x512 channels_last: fp32 3.3 -> 1.2 ms, bf16 3.3 -> 1.0 ms). With a
    gradient, F.max_pool2d, whose backward sends a tie's gradient to one input, not half to each."""
    _check_x(x)
    if x.device.type != "cpu" or _needs_grad(x) or x.shape[2] < 2 or x.shape[3] < 2:
        return F.max_pool2d(x, 2, stride=2)
    H, W = x.shape[2] // 2 * 2, x.shape[3] // 2 * 2
    v = x[:, :, :H, :W]
    return torch.maximum(torch.maximum(v[:, :, 0::2, 0::2], v[:, :, 0::2, 1::2]),
                         torch.maximum(v[:, :, 1::2, 0::2], v[:, :, 1::2, 1::2]))


# ---------------------------------------------------------------------- fake (meta) kernels
# Fake kernels and autograd formulas are written once and registered for every namespace that
# implements the dabnet schemas: "dabnet" (C++/CUDA) here, "dabnet_triton" by dabnet_kernels.triton.
def _out_format(x):
    """The memory format of the kernels' outputs (mirrors csrc/cpu/loops.h: canonical)."""
    if not x.is_contiguous() and x.is_contiguous(memory_format=torch.channels_last):
        return torch.channels_last
    return torch.contiguous_format


def _like(x):
    return torch.empty(x.shape, dtype=x.dtype, device=x.device, memory_format=_out_format(x))


def _stats(x):
    dt = torch.float64 if x.dtype == torch.float64 else torch.float32
    C = x.shape[1]
    return x.new_empty((C,), dtype=dt), x.new_empty((C,), dtype=dt)


def _fake_dwconv3(x, weight, dilation):
    return _like(x)


def _fake_dwconv3_backward(grad_out, x, weight, dilation, output_mask):
    return (_like(x) if output_mask[0] else None,
            torch.empty_like(weight, memory_format=torch.contiguous_format)
            if output_mask[1] else None)


def _fake_bn_prelu(x, weight, bias, running_mean, running_var, prelu_weight, training, eps):
    return (_like(x), *_stats(x))


def _fake_bn_prelu_backward(grad_out, x, weight, bias, prelu_weight, mean, var, training, eps,
                            output_mask):
    makers = (lambda: _like(x), lambda: torch.empty_like(weight), lambda: torch.empty_like(bias),
              lambda: torch.empty_like(prelu_weight))
    return tuple(f() if m else None for m, f in zip(output_mask, makers))


def _fake_dwconv3_bn_prelu(x, conv_weight, dilation, weight, bias, running_mean, running_var,
                           prelu_weight, training, eps):
    return (_like(x), *_stats(x))


def _fake_dab_neck(x, weight, bias, slope, out_scale, out_shift, out_slope, dilation):
    return _like(x)


@torch.library.register_fake("dabnet::cat_bn_prelu")
def _fake_cat_bn_prelu(xs, scale, shift, slope, add0=None, pre0=None, pool_last=False):
    x0 = xs[0]  # the output's N, H, W (pool_last: the last input is twice that, floored)
    return torch.empty((x0.shape[0], sum(t.shape[1] for t in xs), *x0.shape[2:]), dtype=x0.dtype,
                       device=x0.device, memory_format=_out_format(x0))


@torch.library.register_fake("dabnet::affine_prelu_")
def _fake_affine_prelu_(x, scale, shift, slope):
    return None


@torch.library.register_fake("dabnet::add_affine_prelu_")
def _fake_add_affine_prelu_(y, r, scale, shift, slope):
    return _like(y)


@torch.library.register_fake("dabnet::upsample_bilinear")
def _fake_upsample_bilinear(x, out_h, out_w):
    return torch.empty((x.shape[0], x.shape[1], out_h, out_w), dtype=x.dtype, device=x.device,
                       memory_format=_out_format(x))


def _upsample_setup(ctx, inputs, output):
    x, out_h, out_w = inputs
    ctx.in_size, ctx.out_size = list(x.shape), [out_h, out_w]


def _upsample_backward(ctx, grad):
    gx = torch.ops.aten.upsample_bilinear2d_backward.default(grad, ctx.out_size, ctx.in_size,
                                                             False, None, None)
    return gx, None, None


torch.library.register_autograd("dabnet::upsample_bilinear", _upsample_backward,
                                setup_context=_upsample_setup)


@torch.library.register_fake("dabnet::avg_pool3x3s2")
def _fake_avg_pool3x3s2(x):
    H, W = x.shape[2], x.shape[3]
    return torch.empty((x.shape[0], x.shape[1], (H - 1) // 2 + 1, (W - 1) // 2 + 1),
                       dtype=x.dtype, device=x.device, memory_format=_out_format(x))


@torch.library.register_fake("dabnet::upsample_argmax")
def _fake_upsample_argmax(logits, out_h, out_w):
    return logits.new_empty((logits.shape[0], out_h, out_w), dtype=torch.long)


# --------------------------------------------------------------------------------- autograd
def _graph_wanted(ctx, grad):
    """Whether this backward is itself to be differentiated (create_graph=True turns grad mode on
    during backward, and some input of the backward requires grad). The backward kernels have no
    autograd of their own, so such a backward differentiates the op's ATen composite instead
    (_composite_grads): its second derivative is then exact, where it came back as zeros."""
    return _needs_grad(grad, *ctx.saved_tensors)


def _composite_grads(ctx, out, grad, inputs):
    """Gradients of out (with incoming grad) as a graph; inputs: one tensor (or None) per input of
    the op, in order."""
    want = [k for k, t in enumerate(inputs) if t is not None and ctx.needs_input_grad[k]]
    got = torch.autograd.grad(out, [inputs[k] for k in want], grad, create_graph=True,
                              allow_unused=True)
    result = [None] * len(inputs)
    for k, g in zip(want, got):
        result[k] = g
    return tuple(result)


def _bn_composite(ctx, y, weight, bias, prelu_weight, mean, var):
    """BN-PReLU of y as dabnet_kernels.reference computes it: batch statistics in training, else
    the saved running ones."""
    if ctx.training:
        return _ref.bn_prelu(y, weight, bias, None, None, prelu_weight, True, eps=ctx.eps)
    return _ref.bn_prelu(y, weight, bias, mean, var, prelu_weight, False, eps=ctx.eps)


def _autograd(ns):
    """(setup_context, backward) pairs of the differentiable ops, calling the kernels of ns.

    csrc/autograd.cpp mirrors these for dabnet::*: a change here is a change there."""

    def dwconv3_setup(ctx, inputs, output):
        x, weight, dilation = inputs
        ctx.save_for_backward(x, weight)
        ctx.dilation = dilation

    def dwconv3_backward(ctx, grad):
        x, weight = ctx.saved_tensors
        if _graph_wanted(ctx, grad):
            return _composite_grads(ctx, _ref.dwconv3(x, weight, ctx.dilation), grad,
                                    (x, weight, None))
        gx, gw = ns.dwconv3_backward(grad, x, weight, ctx.dilation,
                                     list(ctx.needs_input_grad[:2]))
        return gx, gw, None

    def bn_prelu_setup(ctx, inputs, output):
        x, weight, bias, _rm, _rv, prelu_weight, training, eps = inputs
        _, mean, var = output
        ctx.save_for_backward(x, weight, bias, prelu_weight, mean, var)
        ctx.training, ctx.eps = training, eps
        ctx.mark_non_differentiable(mean, var)

    def bn_prelu_backward(ctx, grad, _gmean, _gvar):
        x, weight, bias, prelu_weight, mean, var = ctx.saved_tensors
        if _graph_wanted(ctx, grad):
            out = _bn_composite(ctx, x, weight, bias, prelu_weight, mean, var)
            return _composite_grads(ctx, out, grad,
                                    (x, weight, bias, None, None, prelu_weight, None, None))
        n = ctx.needs_input_grad
        gx, gw, gb, ga = ns.bn_prelu_backward(grad, x, weight, bias, prelu_weight, mean, var,
                                              ctx.training, ctx.eps, [n[0], n[1], n[2], n[5]])
        return gx, gw, gb, None, None, ga, None, None

    def dwconv3_bn_prelu_setup(ctx, inputs, output):
        x, conv_weight, dilation, weight, bias, _rm, _rv, prelu_weight, training, eps = inputs
        _, mean, var = output
        # The conv output is recomputed in backward (one cheap pass) instead of being kept alive.
        ctx.save_for_backward(x, conv_weight, weight, bias, prelu_weight, mean, var)
        ctx.dilation, ctx.training, ctx.eps = dilation, training, eps
        ctx.mark_non_differentiable(mean, var)

    def dwconv3_bn_prelu_backward(ctx, grad, _gmean, _gvar):
        x, conv_weight, weight, bias, prelu_weight, mean, var = ctx.saved_tensors
        if _graph_wanted(ctx, grad):
            out = _bn_composite(ctx, _ref.dwconv3(x, conv_weight, ctx.dilation), weight, bias,
                                prelu_weight, mean, var)
            return _composite_grads(ctx, out, grad, (x, conv_weight, None, weight, bias, None,
                                                     None, prelu_weight, None, None))
        n = ctx.needs_input_grad
        y = ns.dwconv3(x, conv_weight, ctx.dilation)
        need_conv = n[0] or n[1]
        gy, gw, gb, ga = ns.bn_prelu_backward(grad, y, weight, bias, prelu_weight, mean, var,
                                              ctx.training, ctx.eps, [need_conv, n[3], n[4], n[7]])
        gx = gcw = None
        if need_conv:
            gx, gcw = ns.dwconv3_backward(gy, x, conv_weight, ctx.dilation, [n[0], n[1]])
        return gx, gcw, None, gw, gb, None, None, ga, None, None

    return {
        "dwconv3": (dwconv3_setup, dwconv3_backward),
        "bn_prelu": (bn_prelu_setup, bn_prelu_backward),
        "dwconv3_bn_prelu": (dwconv3_bn_prelu_setup, dwconv3_bn_prelu_backward),
    }


OP_NAMES = ("dwconv3", "dwconv3_backward", "bn_prelu", "bn_prelu_backward", "dwconv3_bn_prelu",
            "dab_neck")


def register(namespace: str, autograd: bool = True) -> None:
    """Registers the fake kernels of namespace::<op> (all of OP_NAMES), and unless autograd is
    False its autograd formulas."""
    fakes = globals()
    for name in OP_NAMES:
        torch.library.register_fake(f"{namespace}::{name}", fakes[f"_fake_{name}"])
    if not autograd:
        return
    for name, (setup, backward) in _autograd(getattr(torch.ops, namespace)).items():
        torch.library.register_autograd(f"{namespace}::{name}", backward, setup_context=setup)


def schema(name: str) -> str:
    """The schema of dabnet::<name> without its namespace (for backends that define their own)."""
    s = str(getattr(torch.ops.dabnet, name).default._schema)
    return s.split("::", 1)[1]


# dabnet::* has its autograd in C++ (csrc/autograd.cpp: the same formulas, without the Python round
# trips); the Python formulas serve dabnet_triton::*.
register("dabnet", autograd=False)
