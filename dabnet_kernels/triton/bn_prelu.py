"""bn_prelu in Triton: BatchNorm2d (batch or running statistics) then PReLU, and its backward.

Training statistics: each program walks one split of the (N, H, W) positions tile by tile,
summing v - K and (v - K)^2 per lane (K: the split's first value), and turns them into the
split's (mean, M2, count); the splits are combined in float64 (_common.finish_kernel): one read
of x, no E[x^2] - E[x]^2 cancellation, deterministic.
The output pass is the stencil kernel with one tap (x * scale + shift, then PReLU).
"""
from __future__ import annotations

import torch
import triton
import triton.language as tl

from . import _common as cm


@triton.jit
def _stats_kernel(x_ptr, prm_ptr, part_ptr, M, C, H, W, d, CHUNK, AXIS: tl.constexpr,
                  TAPS: tl.constexpr, CL: tl.constexpr, ACC: tl.constexpr, BC: tl.constexpr,
                  BP: tl.constexpr, ALIGNED: tl.constexpr):
    """part[s] = (mean, M2, count) per channel of v = conv3(x) over split s (TAPS=1: v = x), from
    per-lane sums of v - K and (v - K)^2, K = v at the split's first position: shifted sums stay
    accurate in float32 for data far from 0 (a plain sum of squares of 1024 values near 1000 would
    lose the variance); the split's mean and M2 follow from them once, after the loop."""
    s, c = cm.reduce_coords(C, BC)
    start, end = cm.split_bounds(s, M, CHUNK)
    n, p, h, w, ok = cm.flat_coords(start, start + 1, C, H, W, c, BP, ALIGNED)
    ok = ok & (tl.arange(0, BP)[None, :] == 0)
    shift = tl.sum(cm.conv3(x_ptr, prm_ptr, n, c, p, h, w, ok, C, H, W, d, AXIS, TAPS, False, CL,
                            ACC), axis=1)[:, None]
    s1 = tl.zeros([BC, BP], ACC)
    s2 = tl.zeros([BC, BP], ACC)
    for m0 in range(start, end, BP):
        n, p, h, w, ok = cm.flat_coords(m0, end, C, H, W, c, BP, ALIGNED)
        v = cm.conv3(x_ptr, prm_ptr, n, c, p, h, w, ok, C, H, W, d, AXIS, TAPS, False, CL, ACC)
        v = tl.where(ok, v - shift, 0.0)
        s1 += v
        s2 += v * v
    cnt = (end - start).to(ACC)
    t1 = tl.sum(s1, axis=1)
    t2 = tl.sum(s2, axis=1)
    m2 = tl.maximum(t2 - t1 * (t1 / cnt), 0.0)
    cm.store_partials(part_ptr, s, c, C, tl.sum(shift, axis=1) + t1 / cnt, m2,
                      tl.zeros([BC], ACC) + cnt)


def batch_stats(x, cl, prm=None, dilation=1, axis=0):
    """(mean, biased var), float64 (C,), of x per channel, or of conv3(x) with taps prm."""
    N, C, H, W = x.shape
    taps = 1 if prm is None else 3
    if prm is None:
        prm = cm.tap_params(cm.identity_weight(C, x.device), C, cm.acc_dtype(x))
    bc, bp, chunk, splits = cm.reduce_split(x, cl)
    part = torch.empty((splits, 3, C), dtype=cm.acc_dtype(x), device=x.device)
    with cm.device_guard(x):
        _stats_kernel[cm.reduce_grid(C, bc, splits)](
            x, prm, part, N * H * W, C, H, W, dilation, chunk, AXIS=axis, TAPS=taps, CL=cl,
            ACC=cm.tl_acc(x), BC=bc, BP=bp, ALIGNED=cm.reduce_aligned(x, bp, chunk),
            num_warps=4)
        mean, var = cm.combine(part, stats=True)
    return mean, var


def _scale_shift(weight, bias, mean, var, eps, C):
    """BatchNorm as y = x * scale + shift, in float64."""
    scale = cm.vec(weight, C, torch.float64) * torch.rsqrt(var.double() + eps)
    return scale, cm.vec(bias, C, torch.float64) - mean.double() * scale


def statistics(x, running_mean, running_var, training, stats_fn):
    """(mean, var) in the statistics dtype: the batch statistics from stats_fn() in training,
    copies of the running statistics in eval. The forward normalizes with these, the values
    the backward is given, so both compute the same scale and shift."""
    C, sdt = x.shape[1], cm.acc_dtype(x)
    if training:
        if x.numel() == 0:  # statistics of an empty batch are undefined, as in ATen
            nan = torch.full((C,), float("nan"), dtype=torch.float64, device=x.device)
            mean, var = nan, nan.clone()
        else:
            mean, var = stats_fn()
    else:
        mean, var = running_mean.detach(), running_var.detach()
    return mean.to(sdt, copy=True), var.to(sdt, copy=True)


def bn_tap3(x, cl, weight, dilation, axis, taps, bn_weight, bias, mean, var, prelu_weight, eps):
    """act(BN(conv3 of x)) by tap3's BN mode: the pre-activation the backward recomputes."""
    C = x.shape[1]
    prm = cm.tap_params(weight, C, cm.acc_dtype(x), slope=cm.vec(prelu_weight, C, torch.float64),
                        bn=_scale_shift(bn_weight, bias, mean, var, eps, C))
    return cm.tap3(x, cl, prm, dilation, axis, taps=taps, act=True, bn=True)


def bn_prelu(x_, weight, bias, running_mean, running_var, prelu_weight, training, eps):
    cm.check_input(x_)
    cm.check_bn_prelu(x_, weight, bias, prelu_weight)
    cm.check_stats(running_mean, running_var, x_, training)
    x, cl = cm.canonical(x_)
    mean, var = statistics(x, running_mean, running_var, training, lambda: batch_stats(x, cl))
    out = bn_tap3(x, cl, cm.identity_weight(x.shape[1], x.device), 1, 0, 1, weight, bias, mean,
                  var, prelu_weight, eps)
    return out, mean, var


# ----------------------------------------------------------------------------------- backward
# prm rows of the backward kernels: mean, invstd, scale, shift, slope, k1, k2.
@triton.jit
def _bn_terms(x_ptr, g_ptr, prm_ptr, n, c, p, h, w, ok, C, H, W, CL: tl.constexpr,
              ACC: tl.constexpr):
    """(g, gy = dL/dy of the BN output y, xhat, y) on a tile."""
    cm_ = c < C
    x = cm.shifted(x_ptr, n, c, p, h, w, ok, 0, C, H, W, 0, CL, ACC)
    g = cm.shifted(g_ptr, n, c, p, h, w, ok, 0, C, H, W, 0, CL, ACC)
    mean = tl.load(prm_ptr + c, mask=cm_, other=0.0)
    invstd = tl.load(prm_ptr + C + c, mask=cm_, other=0.0)
    scale = tl.load(prm_ptr + 2 * C + c, mask=cm_, other=0.0)
    shift = tl.load(prm_ptr + 3 * C + c, mask=cm_, other=0.0)
    slope = tl.load(prm_ptr + 4 * C + c, mask=cm_, other=0.0)
    y = x * scale + shift
    gy = tl.where(y > 0, g, slope * g)
    return g, gy, (x - mean) * invstd, y


@triton.jit
def _bwd_sums_kernel(x_ptr, g_ptr, prm_ptr, part_ptr, M, C, H, W, CHUNK, CL: tl.constexpr,
                     ACC: tl.constexpr, BC: tl.constexpr, BP: tl.constexpr,
                     ALIGNED: tl.constexpr):
    """part[s] = (sum gy, sum gy * xhat, sum of g * y where y <= 0) per channel over split s."""
    s, c = cm.reduce_coords(C, BC)
    start, end = cm.split_bounds(s, M, CHUNK)
    a0 = tl.zeros([BC, BP], ACC)
    a1 = tl.zeros([BC, BP], ACC)
    a2 = tl.zeros([BC, BP], ACC)
    for m0 in range(start, end, BP):
        n, p, h, w, ok = cm.flat_coords(m0, end, C, H, W, c, BP, ALIGNED)
        g, gy, xhat, y = _bn_terms(x_ptr, g_ptr, prm_ptr, n, c, p, h, w, ok, C, H, W, CL, ACC)
        a0 += gy  # masked positions: g = 0, so every term is 0
        a1 += gy * xhat
        a2 += tl.where(y > 0, 0.0, g * y)
    cm.store_partials(part_ptr, s, c, C, tl.sum(a0, axis=1), tl.sum(a1, axis=1),
                      tl.sum(a2, axis=1))


@cm.autotuned(["N", "C", "H", "W", "CL"])
@triton.heuristics(cm.TILE)
@triton.jit
def _grad_x_kernel(x_ptr, g_ptr, prm_ptr, gx_ptr, N, C, H, W, CL: tl.constexpr, ACC: tl.constexpr,
                   BLOCK: tl.constexpr, BC: tl.constexpr, BP: tl.constexpr, BW: tl.constexpr):
    """grad_x = scale * (gy - k1 - xhat * k2) (k1 = k2 = 0 in eval)."""
    n, c, p, h, w, ok = cm.tile_coords(C, H, W, BC, BP, BW)
    g, gy, xhat, y = _bn_terms(x_ptr, g_ptr, prm_ptr, n, c, p, h, w, ok, C, H, W, CL, ACC)
    scale = tl.load(prm_ptr + 2 * C + c, mask=c < C, other=0.0)
    k1 = tl.load(prm_ptr + 5 * C + c, mask=c < C, other=0.0)
    k2 = tl.load(prm_ptr + 6 * C + c, mask=c < C, other=0.0)
    gx = scale * (gy - k1 - xhat * k2)
    tl.store(gx_ptr + cm.offsets(n, c, p, C, H * W, CL), gx.to(gx_ptr.dtype.element_ty), mask=ok)


def bn_prelu_backward(grad_out, x_, weight, bias, prelu_weight, mean, var, training, eps,
                      output_mask):
    cm.check_input(x_)
    cm.check_grad_out(grad_out, x_)
    cm.check_bn_prelu(x_, weight, bias, prelu_weight)
    cm.check_vec(mean, x_, "mean")
    cm.check_vec(var, x_, "var")
    x, cl = cm.canonical(x_)
    g = grad_out.contiguous(memory_format=cm.fmt(cl))
    N, C, H, W = x.shape
    M = N * H * W
    acc = cm.acc_dtype(x)
    invstd = torch.rsqrt(var.detach().double() + eps)
    scale, shift = _scale_shift(weight, bias, mean.detach(), var.detach(), eps, C)
    prm = [mean.detach().double(), invstd, scale, shift, cm.vec(prelu_weight, C, torch.float64)]
    sums = torch.zeros(3, C, dtype=torch.float64, device=x.device)
    if x.numel() > 0 and (training or any(output_mask[1:])):
        bc, bp, chunk, splits = cm.reduce_split(x, cl)
        part = torch.empty((splits, 3, C), dtype=acc, device=x.device)
        with cm.device_guard(x):
            _bwd_sums_kernel[cm.reduce_grid(C, bc, splits)](
                x, g, torch.stack(prm).to(acc), part, M, C, H, W, chunk, CL=cl,
                ACC=cm.tl_acc(x), BC=bc, BP=bp, ALIGNED=cm.reduce_aligned(x, bp, chunk),
                num_warps=4)
            sums = cm.combine(part, stats=False)
    gx = gw = gb = ga = None
    if output_mask[0]:
        k = sums[:2] / M if training and M > 0 else torch.zeros_like(sums[:2])
        gx = cm.empty_as(x, cl)
        if x.numel() > 0:
            with cm.device_guard(x):
                _grad_x_kernel[cm.tile_grid(N, C, H, W)](
                    x, g, torch.cat([torch.stack(prm), k]).to(acc).contiguous(), gx, N, C, H, W,
                    CL=cl, ACC=cm.tl_acc(x))
    if output_mask[1]:
        gw = sums[1].to(weight.dtype)
    if output_mask[2]:
        gb = sums[0].to(bias.dtype)
    if output_mask[3]:
        ga = (sums[2].sum(0, keepdim=True) if prelu_weight.numel() == 1 else sums[2])
        ga = ga.to(prelu_weight.dtype)
    return gx, gw, gb, ga
