"""dwconv3 in Triton: forward and grad_input are the 3-tap stencil (_common.tap3_kernel, taps
reversed for grad_input); grad_weight is a deterministic per-channel reduction (per-split partial
sums, then a float64 sum; no atomics), which also writes grad_input when both are wanted."""
from __future__ import annotations

import torch
import triton
import triton.language as tl

from . import _common as cm


@triton.jit
def _grad_kernel(g_ptr, x_ptr, prm_ptr, gx_ptr, part_ptr, M, C, H, W, d, CHUNK,
                 AXIS: tl.constexpr, GX: tl.constexpr, CL: tl.constexpr, ACC: tl.constexpr,
                 BC: tl.constexpr, BP: tl.constexpr, ALIGNED: tl.constexpr):
    """part[s, k, c] = sum over split s of g * x shifted by (k - 1) * d along AXIS (M = N*H*W).
    GX: also grad_x at the same positions, the stencil of g with the taps reversed (prm): both
    gradients from one read of g and x, where a separate grad_x launch reads g again."""
    s, c = cm.reduce_coords(C, BC)
    start, end = cm.split_bounds(s, M, CHUNK)
    a0 = tl.zeros([BC, BP], ACC)
    a1 = tl.zeros([BC, BP], ACC)
    a2 = tl.zeros([BC, BP], ACC)
    for m0 in range(start, end, BP):
        n, p, h, w, ok = cm.flat_coords(m0, end, C, H, W, c, BP, ALIGNED)
        g = cm.shifted(g_ptr, n, c, p, h, w, ok, 0, C, H, W, AXIS, CL, ACC)
        a0 += g * cm.shifted(x_ptr, n, c, p, h, w, ok, -d, C, H, W, AXIS, CL, ACC)
        a1 += g * cm.shifted(x_ptr, n, c, p, h, w, ok, 0, C, H, W, AXIS, CL, ACC)
        a2 += g * cm.shifted(x_ptr, n, c, p, h, w, ok, d, C, H, W, AXIS, CL, ACC)
        if GX:
            gx = cm.conv3(g_ptr, prm_ptr, n, c, p, h, w, ok, C, H, W, d, AXIS, 3, False, CL, ACC)
            tl.store(gx_ptr + cm.offsets(n, c, p, C, H * W, CL), gx.to(gx_ptr.dtype.element_ty),
                     mask=ok)
    cm.store_partials(part_ptr, s, c, C, tl.sum(a0, axis=1), tl.sum(a1, axis=1),
                      tl.sum(a2, axis=1))


def flipped_taps(weight, x):
    """grad_x's stencil parameters: d/dx of sum_k w_k x[i + (k-1)d] is the same stencil with the
    taps reversed."""
    return cm.tap_params(weight, x.shape[1], cm.acc_dtype(x), flip=True)


def grads_tile(element_size):
    """Elements per step of _grad_kernel: 4 KB of x. Three accumulators and six tap loads per
    element took ~140 registers at 16 fp32 elements per thread on sm_90 (3 programs per SM);
    16-bit types keep 16 per thread."""
    return cm.REDUCE_TILE * 2 // element_size


def grads(g, x, cl, weight, dilation, axis, want_gx):
    """(grad_x or None, grad_weight in weight's dtype and shape): one pass over g and x."""
    N, C, H, W = x.shape
    gx = cm.empty_as(x, cl) if want_gx else None
    if x.numel() == 0:
        return gx, torch.zeros_like(weight, memory_format=torch.contiguous_format)
    prm = flipped_taps(weight, x)
    bc, bp, chunk, splits = cm.reduce_split(x, cl, grads_tile(x.element_size()))
    part = torch.empty((splits, 3, C), dtype=cm.acc_dtype(x), device=x.device)
    with cm.device_guard(x):
        _grad_kernel[cm.reduce_grid(C, bc, splits)](
            g, x, prm, x if gx is None else gx, part, N * H * W, C, H, W, dilation, chunk,
            AXIS=axis, GX=want_gx, CL=cl, ACC=cm.tl_acc(x), BC=bc, BP=bp,
            ALIGNED=cm.reduce_aligned(x, bp, chunk), num_warps=4)
        sums = cm.combine(part, stats=False)  # (3, C)
    return gx, sums.t().to(weight.dtype).reshape(weight.shape).contiguous()


def dwconv3(x_, weight, dilation):
    cm.check_input(x_)
    axis = cm.check_dw_weight(weight, x_, dilation)
    x, cl = cm.canonical(x_)
    prm = cm.tap_params(weight, x.shape[1], cm.acc_dtype(x))
    return cm.tap3(x, cl, prm, dilation, axis, taps=3, act=False)


def dwconv3_backward(grad_out, x_, weight, dilation, output_mask):
    cm.check_input(x_)
    cm.check_grad_out(grad_out, x_)
    axis = cm.check_dw_weight(weight, x_, dilation)
    x, cl = cm.canonical(x_)
    g = grad_out.contiguous(memory_format=cm.fmt(cl))
    if output_mask[1]:
        return grads(g, x, cl, weight, dilation, axis, bool(output_mask[0]))
    gx = None
    if output_mask[0]:
        gx = cm.tap3(g, cl, flipped_taps(weight, x), dilation, axis, taps=3, act=False)
    return gx, None
