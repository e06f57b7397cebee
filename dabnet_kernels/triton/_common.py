"""Pieces shared by the Triton kernels: layouts, the 3-tap stencil, per-channel reductions with a
deterministic combine, launch helpers and argument checks (mirrors of csrc/checks.h).

Tensors are NCHW- or channels_last-contiguous (``canonical``, as csrc/cpu/loops.h). In both the
pixel (h, w) of image n sits at pixel index q = h*W + w, so an element's offset is
(n*C + c)*HW + q (NCHW) or (n*HW + q)*C + c (NHWC), and a shift along H or W is a shift of q by
W or 1. A tile is [BC channels, BP pixels]; the layout flag CL is a compile-time constant, so the
compiler sees which of the two tile axes is contiguous in memory.
"""
from __future__ import annotations

import contextlib
import os

import torch
import triton
import triton.language as tl

# Triton decides at decoration time whether kernels are interpreted (on CPU tensors).
INTERPRETED = os.environ.get("TRITON_INTERPRET") == "1"
# Autotuning benchmarks every config on the first call of each shape; the interpreter cannot
# benchmark, and DABNET_TRITON_AUTOTUNE=0 skips it (first config only) for quick runs.
AUTOTUNE = not INTERPRETED and os.environ.get("DABNET_TRITON_AUTOTUNE", "1") != "0"


def fix_interpreter_index():
    """Scalars of the interpreter are 1-element arrays; triton 3.6's interpreter makes a Python int
    of one (a range bound: `range(start, end, BP)`, `range(S)`) with int(array), which numpy >= 2.4
    refuses ("only 0-dimensional arrays can be converted to Python scalars"). This wraps the
    interpreter's per-launch patching of tl.tensor so that __index__ takes the array's one item.
    Interpreter only: compiled kernels never run this code."""
    from triton.runtime import interpreter as ti

    patch = getattr(ti, "_patch_lang", None)
    if patch is None or getattr(patch, "dabnet_fixed", False):
        return

    def patched(fn):
        scope = patch(fn)
        scope.set_attr(tl.core.tensor, "__index__", lambda t: int(t.handle.data.item()))
        return scope

    patched.dabnet_fixed = True
    ti._patch_lang = patched


if INTERPRETED:
    fix_interpreter_index()


# ------------------------------------------------------------------------------ layouts, dtypes
def canonical(x: torch.Tensor):
    """(x as NCHW- or channels_last-contiguous, is_channels_last); copies only if it is neither."""
    cl = not x.is_contiguous() and x.is_contiguous(memory_format=torch.channels_last)
    return (x if cl else x.contiguous()), cl


def fmt(cl: bool):
    return torch.channels_last if cl else torch.contiguous_format


def empty_as(x: torch.Tensor, cl: bool) -> torch.Tensor:
    return torch.empty(x.shape, dtype=x.dtype, device=x.device, memory_format=fmt(cl))


def acc_dtype(x: torch.Tensor) -> torch.dtype:
    """Accumulation (and statistics) dtype: float64 for float64 input, float32 otherwise."""
    return torch.float64 if x.dtype == torch.float64 else torch.float32


def tl_acc(x: torch.Tensor):
    return tl.float64 if x.dtype == torch.float64 else tl.float32


def vec(v: torch.Tensor, C: int, dtype: torch.dtype) -> torch.Tensor:
    """A per-channel parameter (length C, or 1 = shared) as a length-C vector of dtype."""
    v = v.detach().to(dtype)
    return v.expand(C) if v.numel() == 1 else v


def device_guard(x: torch.Tensor):
    """Launches go to x's GPU (Triton uses the current device)."""
    return torch.cuda.device(x.device) if x.device.type == "cuda" else contextlib.nullcontext()


def check_device(x: torch.Tensor):
    if x.device.type == "cpu" and not INTERPRETED:
        raise RuntimeError("dabnet_triton: CPU tensors run only under the Triton interpreter; set "
                           "TRITON_INTERPRET=1 before importing dabnet_kernels")


# ------------------------------------------------------------------------------------ checks
def _fail(msg):
    raise RuntimeError("dabnet: " + msg)


def check_input(x, name="x"):
    if not isinstance(x, torch.Tensor):
        _fail(f"{name} is undefined")
    if x.dim() != 4:
        _fail(f"{name} must be 4-D (N, C, H, W), got {x.dim()}-D")
    if not x.is_floating_point():
        _fail(f"{name} must be a floating-point tensor, got {x.dtype}")
    check_device(x)


def check_like(t, x, name):
    if t.device != x.device:
        _fail(f"{name} is on {t.device} but the input is on {x.device}")
    if t.dtype != x.dtype:
        _fail(f"{name} has dtype {t.dtype} but the input has dtype {x.dtype}")


def check_dw_weight(w, x, dilation, name="weight") -> int:
    """0 for a (C,1,3,1) weight (taps along H), 1 for (C,1,1,3) (taps along W)."""
    check_like(w, x, name)
    C = x.shape[1]
    if w.dim() != 4 or tuple(w.shape) not in ((C, 1, 3, 1), (C, 1, 1, 3)):
        _fail(f"{name} must have shape (C,1,3,1) or (C,1,1,3) with C={C}, got {tuple(w.shape)}")
    if dilation < 1:
        _fail(f"dilation must be >= 1, got {dilation}")
    return 0 if w.shape[2] == 3 else 1


def check_vec(v, x, name, allow_single=False):
    if not isinstance(v, torch.Tensor):
        _fail(f"{name} is undefined")
    if v.device != x.device:
        _fail(f"{name} is on {v.device} but the input is on {x.device}")
    if not v.is_floating_point():
        _fail(f"{name} must be floating-point")
    C = x.shape[1]
    if v.dim() != 1 or not (v.shape[0] == C or (allow_single and v.shape[0] == 1)):
        _fail(f"{name} must have shape ({C})" + (" or (1)" if allow_single else "")
              + f", got {tuple(v.shape)}")


def check_bn_prelu(x, weight, bias, prelu_weight):
    check_vec(weight, x, "weight")
    check_vec(bias, x, "bias")
    check_vec(prelu_weight, x, "prelu_weight", allow_single=True)


def check_stats(rm, rv, x, training):
    if (rm is None) != (rv is None):
        _fail("running_mean and running_var must be given together")
    if not training and rm is None:
        _fail("eval mode needs running_mean and running_var")
    if rm is not None:
        check_vec(rm, x, "running_mean")
        check_vec(rv, x, "running_var")
    if training and x.numel() > 0 and x.numel() // x.shape[1] <= 1:
        _fail(f"training-mode BatchNorm needs more than 1 value per channel, got input "
              f"{list(x.shape)}")


def check_grad_out(g, x):
    check_input(g, "grad_out")
    check_like(g, x, "grad_out")
    if g.shape != x.shape:
        _fail(f"grad_out has shape {list(g.shape)} but the input has shape {list(x.shape)}")


# ------------------------------------------------------------------------------ tile choice
def _tile(a):
    """(BC, BP, BW) for a tile of BLOCK elements: pixels along the contiguous axis of NCHW, channels
    along the contiguous axis of NHWC. BW > 0 (NCHW, one channel per tile): the BP pixels are
    BP // BW rows of BW columns (tile_coords)."""
    C, HW, block = a["C"], a["H"] * a["W"], a["BLOCK"]
    cp2 = triton.next_power_of_2(C)
    if a["CL"]:
        bc = min(cp2, 64, block)
        return bc, block // bc, 0
    bp = min(block, max(16, triton.next_power_of_2(HW)))
    bc = min(cp2, block // bp)
    return bc, bp, min(bp, triton.next_power_of_2(a["W"])) if bc == 1 else 0


TILE = {"BC": lambda a: _tile(a)[0], "BP": lambda a: _tile(a)[1], "BW": lambda a: _tile(a)[2]}

# Small on purpose: every config is compiled and timed on the first call of a shape. 8 elements
# per thread, or 16 on 4 warps: two 128-bit loads per tap for 16-bit types, and in channels_last
# each thread's channel parameters serve two pixels. On sm_90 (compile_check, triton 3.8) none
# spills; at 16 per thread the stencil takes 71-168 registers (fp64: 185) and bn_prelu's grad_x
# 91-128, so the autotuner drops it where occupancy suffers (triton 3.6's grad_x spills 40 bytes
# there in fp16 NCHW: docs/building.md). The static model (bench.sass) picks it for
# most 16-bit stencils: dwconv3_bn_prelu eval, bf16 channels_last, 58% -> 95% of copy bandwidth.
CONFIGS = [triton.Config({"BLOCK": 1024}, num_warps=4),
           triton.Config({"BLOCK": 2048}, num_warps=4),
           triton.Config({"BLOCK": 2048}, num_warps=8),
           triton.Config({"BLOCK": 4096}, num_warps=16)]


def autotuned(key, configs=CONFIGS, prune=None):
    """triton.autotune over configs keyed on `key` (+ tensor dtypes); the first config only
    when AUTOTUNE is off (the autotuner then runs no benchmark). Keys name every launch argument
    the best tile depends on: N (grid size: a small batch wants smaller tiles), C, H, W, the
    dilation d where there is one (how far the taps reach, so what hits cache) and the layout.
    prune(configs, named_args): the configs worth timing for these arguments."""
    by = {"early_config_prune": lambda cfgs, named_args, **kw: prune(cfgs, named_args)}
    return triton.autotune(configs=configs if AUTOTUNE else configs[:1], key=key,
                           prune_configs_by=by if prune else None)


def tile_grid(N, C, H, W):
    """Pixel blocks, channel blocks and images all on grid axis 0 (up to 2**31 - 1 programs; axes
    1 and 2 stop at 65535, below the N or C of some batches); tile_coords undoes the folding."""
    def grid(m):
        bw = m["BW"]
        pblocks = (triton.cdiv(H, m["BP"] // bw) * triton.cdiv(W, bw) if bw
                   else triton.cdiv(H * W, m["BP"]))
        return (pblocks * triton.cdiv(C, m["BC"]) * N,)
    return grid


# ------------------------------------------------------------------------------ jit helpers
@triton.jit
def offsets(n, c, q, C, HW, CL: tl.constexpr):
    """Element offsets of image n, channels c ([BC, 1]) and pixels q ([1, BP] or [BC, BP])."""
    n = n.to(tl.int64)  # N*C*H*W may pass 2**31
    if CL:
        return (n * HW + q) * C + c
    else:
        return (n * C + c) * HW + q


@triton.jit
def shifted(x_ptr, n, c, p, h, w, ok, s, C, H, W, AXIS: tl.constexpr, CL: tl.constexpr,
            ACC: tl.constexpr):
    """x at (h, w) shifted by s along AXIS (0: H, 1: W), zero outside the image, in ACC."""
    if AXIS == 0:
        hs = h + s
        inside = (hs >= 0) & (hs < H)
        q = p + s * W
    else:
        ws = w + s
        inside = (ws >= 0) & (ws < W)
        q = p + s
    v = tl.load(x_ptr + offsets(n, c, q, C, H * W, CL), mask=ok & inside, other=0.0)
    return v.to(ACC)


@triton.jit
def conv3(x_ptr, prm_ptr, n, c, p, h, w, ok, C, H, W, d, AXIS: tl.constexpr, TAPS: tl.constexpr,
          ACT: tl.constexpr, CL: tl.constexpr, ACC: tl.constexpr):
    """act(bias + sum_k w_k * x[(h, w) + (k - 1) * d along AXIS]) on a [BC, BP] tile, with zero
    padding. prm holds 5 rows of C: w0, w1, w2, bias, PReLU slope. TAPS=1 reads the center tap
    only (an affine map of x: BatchNorm); ACT applies the PReLU."""
    cm = c < C
    acc = tl.load(prm_ptr + 3 * C + c, mask=cm, other=0.0) + tl.zeros(p.shape, ACC)
    for k in tl.static_range(3):
        if TAPS == 3 or k == 1:
            v = shifted(x_ptr, n, c, p, h, w, ok, (k - 1) * d, C, H, W, AXIS, CL, ACC)
            acc += tl.load(prm_ptr + k * C + c, mask=cm, other=0.0) * v
    if ACT:
        acc = prelu(acc, prm_ptr + 4 * C, c, C)
    return acc


@triton.jit
def prelu(v, slope_ptr, c, C):
    """PReLU of v with the per-channel slopes at slope_ptr."""
    return tl.where(v > 0, v, tl.load(slope_ptr + c, mask=c < C, other=0.0) * v)


@triton.jit
def tile_coords(C, H, W, BC: tl.constexpr, BP: tl.constexpr, BW: tl.constexpr):
    """(n, c, p, h, w, ok) of this program's tile; program ids run over pixel blocks, then channel
    blocks, then images (tile_grid). BW > 0 (one channel): the tile is BP // BW rows of BW columns,
    c is [1, 1] and p, h, w are [BP // BW, BW], so that h and w need no division per element (a
    division by a runtime W is ~20 instructions); otherwise c is [BC, 1] and p [1, BP]."""
    pid = tl.program_id(0)
    if BW > 0:
        wblocks = tl.cdiv(W, BW)
        pblocks = tl.cdiv(H, BP // BW) * wblocks
        n = pid // (pblocks * C)
        c = tl.zeros([1, 1], tl.int32) + pid // pblocks % C
        pb = pid % pblocks
        h = (pb // wblocks) * (BP // BW) + tl.arange(0, BP // BW)[:, None]
        w = (pb % wblocks) * BW + tl.arange(0, BW)[None, :]
        return n, c, h * W + w, h, w, (h < H) & (w < W)
    else:
        pblocks = tl.cdiv(H * W, BP)
        cblocks = tl.cdiv(C, BC)
        n = pid // (pblocks * cblocks)
        p = (pid % pblocks) * BP + tl.arange(0, BP)[None, :]
        c = (pid // pblocks % cblocks) * BC + tl.arange(0, BC)[:, None]
        ok = (c < C) & (p < H * W)
        return n, c, p, p // W, p % W, ok


@autotuned(["N", "C", "H", "W", "d", "AXIS", "TAPS", "ACT", "CL"])
@triton.heuristics(TILE)
@triton.jit
def tap3_kernel(x_ptr, prm_ptr, out_ptr, N, C, H, W, d: tl.constexpr, AXIS: tl.constexpr,
                TAPS: tl.constexpr, ACT: tl.constexpr, BN: tl.constexpr, CL: tl.constexpr,
                ACC: tl.constexpr,
                BLOCK: tl.constexpr, BC: tl.constexpr, BP: tl.constexpr, BW: tl.constexpr):
    """out = conv3(x): the depthwise conv, its grad_input (taps reversed), BN-PReLU (TAPS=1, the
    center tap 1) and conv + BN-PReLU are all this one stencil.

    BN: out = act(conv * scale + shift), scale and shift in prm rows 5 and 6, with the conv first
    rounded to the output dtype: the pre-activation the backward recomputes (dwconv3, then
    bn_prelu's _bn_terms) bit for bit, so both pick the same PReLU branch for values within
    rounding of 0, which folding the BN into the taps did not (csrc/cuda/dwconv3.cu does the same).
    """
    n, c, p, h, w, ok = tile_coords(C, H, W, BC, BP, BW)
    if BN:
        v = conv3(x_ptr, prm_ptr, n, c, p, h, w, ok, C, H, W, d, AXIS, TAPS, False, CL, ACC)
        v = v.to(out_ptr.dtype.element_ty).to(ACC)
        y = (v * tl.load(prm_ptr + 5 * C + c, mask=c < C, other=0.0)
             + tl.load(prm_ptr + 6 * C + c, mask=c < C, other=0.0))
        if ACT:
            y = prelu(y, prm_ptr + 4 * C, c, C)
    else:
        y = conv3(x_ptr, prm_ptr, n, c, p, h, w, ok, C, H, W, d, AXIS, TAPS, ACT, CL, ACC)
    tl.store(out_ptr + offsets(n, c, p, C, H * W, CL), y.to(out_ptr.dtype.element_ty), mask=ok)


def tap3(x, cl, prm, dilation, axis, taps, act, bn=False):
    """Launches tap3_kernel on canonical x (prm: tap_params in the accumulation dtype)."""
    out = empty_as(x, cl)
    if x.numel() == 0:
        return out
    N, C, H, W = x.shape
    with device_guard(x):
        tap3_kernel[tile_grid(N, C, H, W)](x, prm.contiguous(), out, N, C, H, W, dilation,
                                           AXIS=axis, TAPS=taps, ACT=act, BN=bn, CL=cl,
                                           ACC=tl_acc(x))
    return out


def tap_params(weight, C, dtype, slope=None, bn=None, flip=False):
    """(5, C) [w0, w1, w2, bias = 0, slope] from a depthwise weight, and with bn = (scale, shift)
    of a BatchNorm (float64, (C,)) two more rows, for tap3's BN mode."""
    taps = weight.detach().reshape(C, 3).t().to(torch.float64)
    if flip:
        taps = taps.flip(0)
    zero = torch.zeros(1, C, dtype=torch.float64, device=weight.device)
    rows = [taps, zero, zero if slope is None else slope.reshape(1, C).to(torch.float64)]
    rows += [] if bn is None else [t.reshape(1, C) for t in bn]
    return torch.cat(rows).to(dtype).contiguous()


def identity_weight(C, device):
    """A (C, 1, 3, 1) depthwise weight whose conv is the identity (center tap 1)."""
    w = torch.zeros(C, 1, 3, 1, dtype=torch.float64, device=device)
    w[:, 0, 1] = 1
    return w


# --------------------------------------------------------------------------- reductions
# A reduction program walks one split of the M = N*H*W positions for BC channels, a [BC, BP] tile
# at a time, into per-lane [BC, BP] accumulators: nothing crosses threads inside the loop, so each
# tile's loads are all issued before the arithmetic that consumes them. The splits' partials
# (S, 3, C) are summed by finish_kernel, which reads BP splits of its channels per step.
REDUCE_PROGRAMS = 1024  # ~8 programs per SM on an H100/H200: enough loads in flight
REDUCE_TILE = 2048      # elements per program and step: 16 per thread at 4 warps


@triton.jit
def split_bounds(s, M, CHUNK):
    """[start, end) of split s of the M = N*H*W positions, in int64: s * CHUNK and M pass 2**31 on
    large batches, where int32 wrapped and skipped the split's loop."""
    start = s.to(tl.int64) * CHUNK
    return start, tl.minimum(start + CHUNK, M)


@triton.jit
def reduce_coords(C, BC: tl.constexpr):
    """(split, channels [BC, 1]) of this program of a reduce_grid launch: channel blocks vary
    fastest, so programs side by side read neighbouring channels of one split."""
    pid = tl.program_id(0)
    cblocks = tl.cdiv(C, BC)
    return pid // cblocks, (pid % cblocks) * BC + tl.arange(0, BC)[:, None]


@triton.jit
def flat_coords(m0, end, C, H, W, c, BP: tl.constexpr, ALIGNED: tl.constexpr):
    """(n, p, h, w, ok) of positions m0 + [0, BP) of the flattened (N, H*W) index space.
    ALIGNED (reduce_aligned: BP divides H*W and the split's bounds): each tile is whole and lies
    in one image, so n is one scalar division per tile, p runs contiguously from a multiple of 16
    and only the channel mask remains: what lets the compiler vectorize the loads."""
    i = tl.arange(0, BP)[None, :]
    HW = H * W
    if ALIGNED:
        n = m0 // HW
        p = tl.multiple_of((m0 - n * HW).to(tl.int32), 16) + i
        ok = (c < C) & (i < BP)
    else:
        m = m0 + i
        n = m // HW
        p = (m - n * HW).to(tl.int32)
        ok = (c < C) & (m < end)
    return n, p, p // W, p % W, ok


def reduce_split(x, cl, tile=REDUCE_TILE):
    """(BC, BP, chunk, splits) of a per-channel reduction over x: a fixed function of the shape
    (no autotuning), so the order of summation, and with it the result, never changes.
    channels_last: blocks of pixels x (up to 64) channels; NCHW: one channel, a run of pixels."""
    N, C, H, W = x.shape
    M = N * H * W
    cp2 = triton.next_power_of_2(C)
    if cl:
        bc = min(cp2, 64)
        bp = max(16, tile // bc)
    else:
        bc, bp = 1, min(tile, max(16, triton.next_power_of_2(M)))
    cblocks = triton.cdiv(C, bc)
    blocks = triton.cdiv(M, bp)
    splits = min(blocks, max(1, REDUCE_PROGRAMS // cblocks))
    chunk = triton.cdiv(blocks, splits) * bp
    return bc, bp, chunk, triton.cdiv(M, chunk)


def reduce_aligned(x, bp, chunk):
    """flat_coords' ALIGNED for tiles of bp positions in splits of chunk (a multiple of bp) over x:
    bp >= 16 divides H*W, so every tile of every split is whole and inside one image."""
    return bp >= 16 and (x.shape[2] * x.shape[3]) % bp == 0 and chunk % bp == 0


@triton.jit
def store_partials(part_ptr, s, c, C, v0, v1, v2):
    """part[s, k, c] = vk, k = 0, 1, 2 (vk: [BC] per-channel values, c: [BC, 1])."""
    out = part_ptr + s.to(tl.int64) * 3 * C + c
    tl.store(out, v0[:, None], mask=c < C)
    tl.store(out + C, v1[:, None], mask=c < C)
    tl.store(out + 2 * C, v2[:, None], mask=c < C)


def reduce_grid(C, bc, splits):
    """The launch grid of a reduction kernel: splits x channel blocks on axis 0 (reduce_coords)."""
    return (splits * triton.cdiv(C, bc),)


@triton.jit
def finish_kernel(part_ptr, out_ptr, S, C, STATS: tl.constexpr, BC: tl.constexpr,
                  BP: tl.constexpr):
    """Sums the per-split partials part[S, 3, C] in float64, BP splits of BC channels per step
    (one round trip to memory per BP splits, not per split), then across the tile: a fixed order,
    so the result is deterministic. Otherwise out[k*C + c] = sum_s part[s, k, c]; STATS: the
    partials are (mean, M2, count) of each split, and out[0:C] = mean, out[C:2C] = biased variance
    by Chan et al.'s combination taken about split 0's mean K (one pass: with d_s = mean_s - K,
    M2 = sum M2_s + n_s d_s^2 - (sum n_s d_s)^2 / n)."""
    c1 = tl.program_id(0) * BC + tl.arange(0, BC)
    c = c1[None, :]
    srow = tl.arange(0, BP)[:, None]
    k1 = tl.load(part_ptr + c1, mask=c1 < C, other=0.0).to(tl.float64)
    k = k1[None, :]
    a0 = tl.zeros([BP, BC], tl.float64)
    a1 = tl.zeros([BP, BC], tl.float64)
    a2 = tl.zeros([BP, BC], tl.float64)
    for s0 in range(0, S, BP):
        ok = (srow + s0 < S) & (c < C)
        row = part_ptr + (srow + s0) * 3 * C + c
        v0 = tl.load(row, mask=ok, other=0.0).to(tl.float64)
        v1 = tl.load(row + C, mask=ok, other=0.0).to(tl.float64)
        v2 = tl.load(row + 2 * C, mask=ok, other=0.0).to(tl.float64)
        if STATS:
            dm = v0 - k  # masked: count v2 = 0, so every term is 0
            a0 += v2 * dm
            a1 += v1 + v2 * dm * dm
            a2 += v2
        else:
            a0 += v0
            a1 += v1
            a2 += v2
    t0 = tl.sum(a0, axis=0)
    t1 = tl.sum(a1, axis=0)
    t2 = tl.sum(a2, axis=0)
    cm = c1 < C
    if STATS:
        n = tl.where(cm, t2, 1.0)
        tl.store(out_ptr + c1, k1 + t0 / n, mask=cm)
        tl.store(out_ptr + C + c1, tl.maximum(t1 - t0 * t0 / n, 0.0) / n, mask=cm)
    else:
        tl.store(out_ptr + c1, t0, mask=cm)
        tl.store(out_ptr + C + c1, t1, mask=cm)
        tl.store(out_ptr + 2 * C + c1, t2, mask=cm)


def finish_tile(S, C):
    """(BC, BP) of finish_kernel: all S splits in one step up to 1024, channels filling the rest
    of a 1024-element tile."""
    bp = min(1024, triton.next_power_of_2(S))
    return max(1, min(triton.next_power_of_2(C), 1024 // bp)), bp


def combine(part, stats):
    """The float64 combine of partials (S, 3, C): (2, C) mean/var or (3, C) sums."""
    S, _, C = part.shape
    out = torch.empty((2 if stats else 3, C), dtype=torch.float64, device=part.device)
    bc, bp = finish_tile(S, C)
    finish_kernel[(triton.cdiv(C, bc),)](part, out, S, C, STATS=stats, BC=bc, BP=bp,
                                         num_warps=4)
    return out
