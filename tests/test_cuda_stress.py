"""GPU stress cases of the CUDA and Triton kernels (bench/gpu_suite.sh runs them first):

- streams: every op, reductions and both neck paths, launched on a side stream whose producer is
  held back by torch.cuda._sleep; an op that launched on another stream reads the NaN poison;
- CUDA graphs: every op captured in one graph, replayed on new input values;
- misaligned input: views at a storage offset of one element (no 16-byte alignment);
- launch grids: N or C above 65535 (CUDA's limit on grid axes y and z);
- large tensors (marked `large`, and skipped below 80 GiB of GPU memory): more than 2**31
  elements, outputs poisoned with NaN, for grad_weight, the BN statistics and backward, and the
  neck's tile and global-memory paths.

Every case runs on each GPU backend: "cuda" (torch.ops.dabnet, when built with CUDA kernels) and
"triton" (torch.ops.dabnet_triton). All are skipped without a GPU.
"""
from __future__ import annotations

import math

import pytest
import torch

import dabnet_kernels._lib as lib
from conftest import requires_cuda
from dabnet_kernels import backend, ops, reference
from dabnet_kernels.reference import BNPReLUParams
from test_cuda import bn_params as cuda_bn_params

pytestmark = requires_cuda

NAN = float("nan")
D_TILE, D_GLOBAL = 2, 17  # the neck's tile path and its global-memory path (dilation > 16)
SHAPE = (2, 16, 40, 48)  # larger than 16x16, so dilation 17 reaches inside the image
TOL = {torch.float32: dict(rtol=1e-5, atol=1e-5), torch.float16: dict(rtol=2e-3, atol=2e-3)}
BIG_GPU = 80 << 30


@pytest.fixture(params=["cuda", "triton"])
def ns(request):
    """The op namespace of one GPU backend."""
    if request.param == "cuda":
        if not lib.has_cuda_kernels():
            pytest.skip("the extension was built without CUDA kernels")
        return torch.ops.dabnet
    if not backend.triton_available():
        pytest.skip("triton is not installed")
    import dabnet_kernels.triton  # noqa: F401  (registers torch.ops.dabnet_triton)

    return torch.ops.dabnet_triton


def bn_params(C, device="cuda"):
    return cuda_bn_params(C, torch.float32, device)


def inputs(shape=SHAPE, dtype=torch.float32, layout="nchw", device="cuda"):
    """x and g in one layout; the conv weights along H and W; BN parameters; the folded neck."""
    fmt = torch.channels_last if layout == "channels_last" else torch.contiguous_format
    C = shape[1]

    def rand(*s, **kw):
        return torch.randn(*s, device=device, **kw).to(dtype)

    weights = [rand(C, 1, 3, 1), rand(C, 1, 1, 3), rand(C, 1, 3, 1), rand(C, 1, 1, 3)]
    bns = [bn_params(C, device) for _ in range(5)]
    return dict(x=rand(shape).contiguous(memory_format=fmt),
                g=rand(shape).contiguous(memory_format=fmt), wh=weights[0], ww=weights[1],
                p=bns[0], neck=ops.fold_dab_neck(weights, bns, 1e-3, dtype))


def _bn(ns, t, training):
    p = t["p"]
    stats = (None, None) if training else (p.running_mean, p.running_var)
    return ns.bn_prelu(t["x"], p.weight, p.bias, *stats, p.prelu_weight, training, 1e-3)


def _conv_bn(ns, t, training):
    p = t["p"]
    stats = (None, None) if training else (p.running_mean, p.running_var)
    return ns.dwconv3_bn_prelu(t["x"], t["wh"], 3, p.weight, p.bias, *stats, p.prelu_weight,
                               training, 1e-3)


def _bn_backward(ns, t):
    p = t["p"]
    return ns.bn_prelu_backward(t["g"], t["x"], p.weight, p.bias, p.prelu_weight, p.running_mean,
                                p.running_var, True, 1e-3, [True, True, True, True])


# Every op of a backend, each returning its outputs: forward maps, the reductions (grad_weight,
# batch statistics, BN backward sums) and both neck paths.
OPS = {
    "dwconv3": lambda ns, t: ns.dwconv3(t["x"], t["wh"], 3),
    "dwconv3_grad_input": lambda ns, t: ns.dwconv3_backward(t["g"], t["x"], t["ww"], 5,
                                                            [True, False])[0],
    "dwconv3_grad_weight": lambda ns, t: ns.dwconv3_backward(t["g"], t["x"], t["ww"], 5,
                                                             [False, True])[1],
    "bn_prelu_train": lambda ns, t: _bn(ns, t, True),
    "bn_prelu_eval": lambda ns, t: _bn(ns, t, False)[0],
    "bn_prelu_backward": _bn_backward,
    "dwconv3_bn_prelu_train": lambda ns, t: _conv_bn(ns, t, True),
    "dwconv3_bn_prelu_eval": lambda ns, t: _conv_bn(ns, t, False)[0],
    "dab_neck_tile": lambda ns, t: ns.dab_neck(t["x"], *t["neck"], D_TILE),
    "dab_neck_global": lambda ns, t: ns.dab_neck(t["x"], *t["neck"], D_GLOBAL),
}


def flat(out):
    return [o for o in (out if isinstance(out, (tuple, list)) else [out]) if o is not None]


def assert_outputs_close(got, want, dtype=torch.float32):
    got, want = flat(got), flat(want)
    assert len(got) == len(want)
    for a, b in zip(got, want):
        torch.testing.assert_close(a, b, **TOL[dtype])


# ---------------------------------------------------------------------------------- streams
@pytest.mark.parametrize("op", list(OPS))
def test_op_runs_on_the_current_stream(ns, op):
    """The inputs are NaN until a side stream, held back by a sleep, writes them; the op is
    called on that stream. Launched on any other stream it reads the NaNs."""
    t = inputs()
    want = OPS[op](ns, t)
    src = {k: t[k].clone() for k in ("x", "g")}
    for k in src:
        t[k].fill_(NAN)
    torch.cuda.synchronize()
    side = torch.cuda.Stream()
    with torch.cuda.stream(side):
        torch.cuda._sleep(100_000_000)  # ~50 ms of GPU clock before the producer
        for k in src:
            t[k].copy_(src[k])
        got = OPS[op](ns, t)
    torch.cuda.synchronize()
    assert_outputs_close(got, want)


# ------------------------------------------------------------------------------- CUDA graphs
def test_every_op_in_one_cuda_graph(ns):
    t = inputs()
    side = torch.cuda.Stream()
    side.wait_stream(torch.cuda.current_stream())
    with torch.cuda.stream(side):  # warm-up (Triton compiles) outside the capture
        for f in OPS.values():
            f(ns, t)
    torch.cuda.current_stream().wait_stream(side)
    graph = torch.cuda.CUDAGraph()
    with torch.cuda.graph(graph):
        got = {name: f(ns, t) for name, f in OPS.items()}
    fresh = inputs()
    for k in ("x", "g"):
        t[k].copy_(fresh[k])  # new values in the captured buffers
    graph.replay()
    torch.cuda.synchronize()
    for name, f in OPS.items():
        assert_outputs_close(got[name], f(ns, t))


# ----------------------------------------------------------------------------- misaligned
def at_offset(x, k=1):
    """x's values in a new buffer at a storage offset of k elements, with x's strides."""
    buf = torch.empty(x.numel() + k, dtype=x.dtype, device=x.device)
    v = buf[k:].as_strided(x.shape, x.stride())
    v.copy_(x)
    return v


@pytest.mark.parametrize("layout", ["nchw", "channels_last"])
@pytest.mark.parametrize("dtype", [torch.float32, torch.float16], ids=str)
@pytest.mark.parametrize("op", list(OPS))
def test_misaligned_input(ns, op, dtype, layout):
    t = inputs(dtype=dtype, layout=layout)
    want = OPS[op](ns, t)
    for k in ("x", "g"):
        t[k] = at_offset(t[k])
        assert t[k].storage_offset() == 1
    assert_outputs_close(OPS[op](ns, t), want, dtype)


# ------------------------------------------------------------------------------ grid limits
def grad_weight_ref(g, x, d, chunk=40):
    """(C, 3) float64 grad of a (C,1,1,3) weight (taps along W), summed over chunks of images."""
    total = 0
    for i in range(0, x.shape[0], chunk):
        gg, xx = g[i:i + chunk].double(), x[i:i + chunk].double()
        total = total + torch.stack([(gg[..., d:] * xx[..., :-d]).sum((0, 2, 3)),
                                     (gg * xx).sum((0, 2, 3)),
                                     (gg[..., :-d] * xx[..., d:]).sum((0, 2, 3))], 1)
    return total


def test_n_above_65535(ns):
    """Images are independent: each map op's first and last images equal the op on those images
    alone; the reductions against float64 sums."""
    t = inputs((70000, 2, 3, 5))
    for cut in (slice(0, 3), slice(-3, None)):
        part = dict(t, x=t["x"][cut], g=t["g"][cut])
        for name in ("dwconv3", "dwconv3_grad_input", "bn_prelu_eval", "dwconv3_bn_prelu_eval",
                     "dab_neck_tile", "dab_neck_global"):
            assert_outputs_close(OPS[name](ns, t)[cut], OPS[name](ns, part))
    gw = OPS["dwconv3_grad_weight"](ns, t).reshape(2, 3).double()
    torch.testing.assert_close(gw, grad_weight_ref(t["g"], t["x"], 5), rtol=1e-4, atol=1e-3)
    _, mean, var = OPS["bn_prelu_train"](ns, t)
    v, m = torch.var_mean(t["x"].double(), (0, 2, 3), unbiased=False)
    torch.testing.assert_close(mean.double(), m, rtol=1e-5, atol=1e-5)
    torch.testing.assert_close(var.double(), v, rtol=1e-5, atol=1e-5)


def test_c_above_65535(ns):
    """Channels are independent: every output of every op, cut to its first 3 channels, equals
    the op on those 3 channels alone."""
    C, cut = 70000, slice(0, 3)
    t = inputs((2, C, 3, 5))
    per_channel = {k: t[k][cut] for k in ("wh", "ww")}
    part = dict(t, x=t["x"][:, cut].contiguous(), g=t["g"][:, cut].contiguous(), **per_channel,
                p=BNPReLUParams(*(v[cut] for v in t["p"][:5])),
                neck=tuple(v[:, cut] if v.dim() > 1 else v[cut] for v in t["neck"]))
    for name, f in OPS.items():
        for a, b in zip(flat(f(ns, t)), flat(f(ns, part))):
            a = a[cut] if a.shape[0] == C else a[:, cut]  # per-channel vectors and weights; maps
            torch.testing.assert_close(a, b, **TOL[torch.float32])


# --------------------------------------------------------------------------- large tensors
BIG = (520, 64, 256, 256)  # 2.18e9 elements > 2**31; 4.4 GB in float16
large = pytest.mark.skipif(
    torch.cuda.is_available() and torch.cuda.get_device_properties(0).total_memory < BIG_GPU,
    reason="needs a GPU with 80 GiB (tensors of more than 2**31 elements)")


def poison():
    """Fills most of the GPU's free memory with 0xFF bytes (NaN) and hands it back to the caching
    allocator: an output element that a kernel never writes shows up as NaN."""
    torch.cuda.synchronize()
    block = torch.empty(int(torch.cuda.mem_get_info()[0] * 0.8), dtype=torch.uint8, device="cuda")
    block.fill_(255)
    del block


def no_nan(t, chunk=40):
    return not any(torch.isnan(t[i:i + chunk]).any().item() for i in range(0, t.shape[0], chunk))


@pytest.fixture(scope="module")
def big():
    """x and g of BIG in float16 (8.7 GB), shared by the large cases."""
    gen = torch.Generator(device="cuda").manual_seed(0)
    x = torch.randn(BIG, dtype=torch.float16, device="cuda", generator=gen)
    g = torch.randn(BIG, dtype=torch.float16, device="cuda", generator=gen)
    yield dict(x=x, g=g)
    del x, g
    torch.cuda.empty_cache()


@pytest.mark.large
@large
def test_large_grad_weight(ns, big):
    x, g = big["x"], big["g"]
    C = x.shape[1]
    w = torch.randn(C, 1, 1, 3, device="cuda").half()
    poison()
    gw = ns.dwconv3_backward(g, x, w, 3, [False, True])[1].reshape(C, 3).double()
    torch.testing.assert_close(gw, grad_weight_ref(g, x, 3), rtol=2e-3,
                               atol=1e-4 * math.sqrt(x.numel() // C))


@pytest.mark.large
@large
def test_large_bn_statistics_and_backward(ns, big):
    x, g = big["x"], big["g"]
    C, M = x.shape[1], x.numel() // x.shape[1]
    p = bn_params(C)
    poison()
    out, mean, var = ns.bn_prelu(x, p.weight, p.bias, None, None, p.prelu_weight, True, 1e-3)
    assert no_nan(out)
    del out
    s1 = sum(x[i:i + 40].double().sum((0, 2, 3)) for i in range(0, BIG[0], 40))
    s2 = sum((x[i:i + 40].double() - (s1 / M)[:, None, None]).pow(2).sum((0, 2, 3))
             for i in range(0, BIG[0], 40))
    torch.testing.assert_close(mean.double(), s1 / M, rtol=1e-4, atol=1e-4)
    torch.testing.assert_close(var.double(), s2 / M, rtol=1e-4, atol=1e-4)
    poison()
    gx, gw, gb, _ = ns.bn_prelu_backward(g, x, p.weight, p.bias, p.prelu_weight, mean, var, True,
                                         1e-3, [True, True, True, False])
    assert no_nan(gx)
    del gx
    scale = (p.weight.double() * torch.rsqrt(var.double() + 1e-3))[:, None, None]
    shift = p.bias.double()[:, None, None] - mean.double()[:, None, None] * scale
    sums = torch.zeros(2, C, dtype=torch.float64, device="cuda")
    for i in range(0, BIG[0], 40):
        xx, gg = x[i:i + 40].double(), g[i:i + 40].double()
        y = xx * scale + shift
        gy = torch.where(y > 0, gg, p.prelu_weight.double()[:, None, None] * gg)
        xhat = (xx - mean.double()[:, None, None]) * torch.rsqrt(var.double() + 1e-3)[:, None, None]
        sums += torch.stack([gy.sum((0, 2, 3)), (gy * xhat).sum((0, 2, 3))])
    atol = 1e-4 * math.sqrt(M)
    torch.testing.assert_close(gb.double(), sums[0], rtol=2e-3, atol=atol)
    torch.testing.assert_close(gw.double(), sums[1], rtol=2e-3, atol=atol)


@pytest.mark.large
@large
@pytest.mark.parametrize("d", [D_TILE, D_GLOBAL])
def test_large_dab_neck(ns, big, d):
    """The neck past 2**31 elements: no element left unwritten, and the first and last images
    as the same op computes them alone."""
    x = big["x"]
    t = inputs(x.shape[:1] + (x.shape[1], 2, 2), torch.float16)  # the folded parameters only
    poison()
    out = ns.dab_neck(x, *t["neck"], d)
    assert no_nan(out)
    for cut in (slice(0, 1), slice(-1, None)):
        torch.testing.assert_close(out[cut], ns.dab_neck(x[cut], *t["neck"], d),
                                   **TOL[torch.float16])
