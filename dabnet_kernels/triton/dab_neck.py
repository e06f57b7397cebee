"""Eval-mode DAB neck in one Triton kernel: one read of x, one write of the output.

Each branch is a 3x1 conv (+ folded BN, PReLU) followed by a 1x3 conv (+ folded BN, PReLU). The
second conv needs the first conv's output at w - d, w, w + d; those three values are recomputed in
registers from x (nine loads that hit cache) instead of going through memory. The 1x3 conv zero-pads
its own input, so a first-conv value at a column outside the image is 0, not act(bias). The loads
are the tile's offsets plus a scalar, under row and column masks made once per branch.
"""
from __future__ import annotations

import torch
import triton
import triton.language as tl

from . import _common as cm


@triton.jit
def _branch(x_ptr, base, prm_ptr, c, h, w, ok, C, H, W, d, sH, sW, ACC: tl.constexpr):
    """act(conv 1x3 over act(conv 3x1 over x)), both dilated by d, at the tile's elements; prm:
    two (5, C) blocks [w0, w1, w2, bias, slope]. base: x's offsets at the tile, sH / sW: the
    offset of one row / one column. Each shifted load is base plus a scalar under the and of a
    row and a column mask made once: recomputing the offsets and bounds per load (the stencil
    helpers' way) cost a fifth of this kernel's instructions (sm_90 SASS per element at 4 per
    thread: fp32 channels_last 184 -> 146, bf16 206 -> 166)."""
    cmask = c < C
    w0 = tl.load(prm_ptr + c, mask=cmask, other=0.0)
    w1 = tl.load(prm_ptr + C + c, mask=cmask, other=0.0)
    w2 = tl.load(prm_ptr + 2 * C + c, mask=cmask, other=0.0)
    b = tl.load(prm_ptr + 3 * C + c, mask=cmask, other=0.0)
    a = tl.load(prm_ptr + 4 * C + c, mask=cmask, other=0.0)
    up = h >= d
    down = h + d < H
    acc = tl.load(prm_ptr + 8 * C + c, mask=cmask, other=0.0) + tl.zeros(ok.shape, ACC)
    for k in tl.static_range(3):  # the first conv at column w + (k - 1) d
        if k == 0:
            inside = w >= d
        elif k == 2:
            inside = w + d < W
        m = ok if k == 1 else ok & inside  # the middle column is inside wherever ok is
        o = base + (k - 1) * d * sW
        t = b + w0 * tl.load(x_ptr + (o - d * sH), mask=m & up, other=0.0).to(ACC)
        t += w1 * tl.load(x_ptr + o, mask=m, other=0.0).to(ACC)
        t += w2 * tl.load(x_ptr + (o + d * sH), mask=m & down, other=0.0).to(ACC)
        t = tl.where(t > 0, t, a * t)
        if k != 1:  # the 1x3 conv's zero padding: 0 outside the image, not act(bias)
            t = tl.where(inside, t, 0.0)
        acc += tl.load(prm_ptr + (5 + k) * C + c, mask=cmask, other=0.0) * t
    return cm.prelu(acc, prm_ptr + 9 * C, c, C)


# At most 4 elements per thread: each keeps ~20 live values per element. On sm_90 (compile_check)
# 2 per thread take 40-80 registers and 4 take 120-170 (one or two programs per SM, but half the
# instructions per element: the tile's index and mask arithmetic is shared by more elements);
# 8 per thread took 234-255 and spilled in some dtypes and layouts. 4 per thread are capped at
# 128 registers (two programs of 8 warps per SM): fp32 channels_last took 134 uncapped, and runs
# capped without spilling.
CONFIGS = [triton.Config({"BLOCK": 512}, num_warps=8), triton.Config({"BLOCK": 1024}, num_warps=16),
           triton.Config({"BLOCK": 1024}, num_warps=8, maxnreg=128),
           triton.Config({"BLOCK": 256}, num_warps=8)]


def configs_for(dtype, configs=CONFIGS):
    """The configs worth timing for x of this dtype: float64 values take two registers each, and
    the 128-register cap spilled them (168-232 bytes per thread under triton 3.6's ptxas)."""
    return [c for c in configs if dtype != torch.float64 or not getattr(c, "maxnreg", None)]


def _prune(configs, named_args):
    return configs_for(named_args["x_ptr"].dtype, configs)


@cm.autotuned(["N", "C", "H", "W", "d", "CL"], CONFIGS, prune=_prune)
@triton.heuristics(cm.TILE)
@triton.jit
def _dab_neck_kernel(x_ptr, prm_ptr, fin_ptr, out_ptr, N, C, H, W, d, CL: tl.constexpr,
                     ACC: tl.constexpr, BLOCK: tl.constexpr, BC: tl.constexpr, BP: tl.constexpr,
                     BW: tl.constexpr):
    """prm: (4, 5, C) [w0, w1, w2, bias, slope] of the four convs; fin: (3, C) scale, shift and
    slope of the final BN-PReLU of the branch sum."""
    n, c, p, h, w, ok = cm.tile_coords(C, H, W, BC, BP, BW)
    base = cm.offsets(n, c, p, C, H * W, CL)
    if CL:
        sH = W * C
        sW = C
    else:
        sH = W
        sW = 1
    s = _branch(x_ptr, base, prm_ptr, c, h, w, ok, C, H, W, 1, sH, sW, ACC)
    s += _branch(x_ptr, base, prm_ptr + 10 * C, c, h, w, ok, C, H, W, d, sH, sW, ACC)
    cmask = c < C
    y = (tl.load(fin_ptr + c, mask=cmask, other=0.0) * s
         + tl.load(fin_ptr + C + c, mask=cmask, other=0.0))
    y = cm.prelu(y, fin_ptr + 2 * C, c, C)
    tl.store(out_ptr + base, y.to(out_ptr.dtype.element_ty), mask=ok)


def _check(x, weight, bias, slope, out_scale, out_shift, out_slope, dilation):
    cm.check_input(x)
    C = x.shape[1]
    for t, name, shape in ((weight, "weight", (4, C, 3)), (bias, "bias", (4, C)),
                           (slope, "slope", (4, C))):
        if tuple(t.shape) != shape:
            cm._fail(f"dab_neck {name} must have shape {shape}, got {tuple(t.shape)}")
        if t.device != x.device or not t.is_floating_point():
            cm._fail(f"dab_neck parameters must be floating-point tensors on {x.device}")
    for t, name in ((out_scale, "out_scale"), (out_shift, "out_shift"), (out_slope, "out_slope")):
        cm.check_vec(t, x, name)
    if dilation < 1:
        cm._fail(f"dilation must be >= 1, got {dilation}")


def dab_neck(x_, weight, bias, slope, out_scale, out_shift, out_slope, dilation):
    _check(x_, weight, bias, slope, out_scale, out_shift, out_slope, dilation)
    x, cl = cm.canonical(x_)
    out = cm.empty_as(x, cl)
    if x.numel() == 0:
        return out
    N, C, H, W = x.shape
    acc = cm.acc_dtype(x)
    prm = torch.cat([weight.detach().to(acc).transpose(1, 2), bias.detach().to(acc)[:, None],
                     slope.detach().to(acc)[:, None]], dim=1).contiguous()  # (4, 5, C)
    fin = torch.stack([t.detach().to(acc) for t in (out_scale, out_shift, out_slope)])
    with cm.device_guard(x):
        _dab_neck_kernel[cm.tile_grid(N, C, H, W)](x, prm, fin.contiguous(), out, N, C, H, W,
                                                   dilation, CL=cl, ACC=cm.tl_acc(x))
    return out
