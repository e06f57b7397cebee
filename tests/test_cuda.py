"""The CUDA kernels (csrc/cuda/*.cu).

Without a GPU: the built extension must hold a CUDA kernel for every op (when it was built with
CUDA), and the kernels' index math (csrc/cuda/index.h) is run on the host by a small C++ program.
With a GPU: parity with dabnet_kernels.reference (computed in float64 on the CPU), gradcheck,
low-precision accuracy, random shapes, DABNet-sized shapes, determinism, a second GPU.
Without one, the same parity, gradcheck, low-precision and random-shape tests run the very same
CUDA sources on the CPU through the emulation of tests/cuda_emu (marked cuda_emulated; see
docs/cuda-emulation.md): each test takes the fixture `dev`, the GPU or the emulation.

Tolerances (outputs compared with a float64 reference computed from the very same input values):
  float64   rtol 1e-9,  atol 1e-9   (only summation order differs)
  float32   rtol 1e-5,  atol 1e-5   (fp32 accumulation over at most a few hundred thousand terms)
  float16   rtol 2e-3,  atol 2e-3   (output rounding: half an ulp is 2^-11 = 4.9e-4 relative)
  bfloat16  rtol 1.6e-2, atol 1.6e-2 (output rounding: half an ulp is 2^-8 = 3.9e-3 relative)
Low-precision kernels accumulate in float32, so the final rounding dominates; the bounds leave
about 4x headroom over it. Parameter gradients (sums over N*H*W terms) get atol scaled by
sqrt(N*H*W).
"""
from __future__ import annotations

import contextlib
import math
import os
import random
import shutil
import subprocess
import zlib
from pathlib import Path

import pytest
import torch

import cuda_emu
import dabnet_kernels._lib as lib
from conftest import requires_cuda
from dabnet_kernels import ops, reference
from dabnet_kernels.reference import BNPReLUParams

ROOT = Path(__file__).resolve().parents[1]
CUDA_OPS = ("dwconv3", "dwconv3_backward", "bn_prelu", "bn_prelu_backward", "dwconv3_bn_prelu",
            "dab_neck")
LAYOUTS = ("nchw", "channels_last", "strided")
# 17 is past what the dab_neck tile holds (global-memory path); 40 is past H and W.
DILATIONS = (1, 2, 3, 4, 8, 16, 17, 40)
TOL = {
    torch.float64: dict(rtol=1e-9, atol=1e-9),
    torch.float32: dict(rtol=1e-5, atol=1e-5),
    torch.float16: dict(rtol=2e-3, atol=2e-3),
    torch.bfloat16: dict(rtol=1.6e-2, atol=1.6e-2),
}


ORDERS = ("forward", "reverse", "random")


class Gpu:
    """The CUDA kernels on the GPU."""
    device = "cuda"

    @property
    def ops(self):
        return torch.ops.dabnet

    def poison(self):
        """Fills the caching allocator's free memory with 0xFF bytes (NaN in every float dtype),
        so an output element that a kernel never writes shows up as NaN."""
        torch.cuda.synchronize()
        torch.cuda.empty_cache()
        blocks = [torch.full((256 << 20,), 255, dtype=torch.uint8, device="cuda")]  # large pool
        blocks += [torch.full((1 << 20,), 255, dtype=torch.uint8, device="cuda")  # small pool
                   for _ in range(32)]
        del blocks

    @contextlib.contextmanager
    def public_api(self):
        yield  # dabnet_kernels.ops runs CUDA tensors on the CUDA kernels


class Emulated:
    """The CUDA kernels run on the CPU by tests/cuda_emu: torch.ops.dabnet_cuemu on CPU tensors."""
    device = "cpu"

    def __init__(self, ops_):
        self.ops = ops_

    def poison(self):
        pass  # every emulated op NaN-poisons all memory it allocates

    @contextlib.contextmanager
    def public_api(self):
        """dabnet_kernels.ops (validation, autograd) running on the emulated kernels."""
        saved = ops.ops_for
        ops.ops_for = lambda x: self.ops
        try:
            yield
        finally:
            ops.ops_for = saved


_current = [Gpu()]  # the backend of the running test: the helpers' default device


@pytest.fixture(params=[pytest.param("gpu", marks=requires_cuda),
                        pytest.param("emulated", marks=pytest.mark.cuda_emulated)])
def dev(request):
    """The GPU, or the emulation with a schedule (thread and block order) picked per test."""
    if request.param == "gpu":
        _current[0] = Gpu()
    else:
        _current[0] = Emulated(cuda_emu.ops_or_fail())
        key = zlib.crc32(request.node.nodeid.encode())
        order = os.environ.get("CUEMU_ORDER") or ORDERS[key % 3]
        print(f"cuemu schedule: {order}, seed {key}")  # shown when the test fails
        _current[0].ops.set_schedule(order, key)
    yield _current[0]
    _current[0] = Gpu()


# ------------------------------------------------------------------------- without a GPU
def _built_with_cuda() -> bool:
    """Whether the extension was linked as a CUDA extension (it then needs libc10_cuda)."""
    return b"libc10_cuda.so" in Path(lib._ext_path).read_bytes()


@pytest.mark.skipif(torch.version.cuda is None, reason="this PyTorch has no CUDA")
def test_extension_holds_cuda_kernels_for_every_op():
    if not _built_with_cuda():
        pytest.skip("the extension was built without CUDA kernels (DABNET_CUDA=0 or no toolkit)")
    missing = [op for op in CUDA_OPS
               if not torch._C._dispatch_has_kernel_for_dispatch_key(f"dabnet::{op}", "CUDA")]
    assert not missing, f"no CUDA kernel registered for {missing}"
    assert set(CUDA_OPS) == set(ops.OP_NAMES)
    assert lib.has_cuda_kernels()


# C++20-only syntax: torch 2.14 (CI) builds extensions with -std=c++20, torch 2.11 (the GPU
# machine's) with -std=c++17, so what CI compiles may not build there (a requires-expression in
# common.cuh did not, 2026-12-08; make check-device-stack is the full check).
CXX20_ONLY = {
    r"\brequires\b": "requires-expression / clause",
    r"\bconcept\b": "concept",
    r"\bconsteval\b": "consteval",
    r"\bconstinit\b": "constinit",
    r"<=>": "three-way comparison",
    r"\bco_(await|yield|return)\b": "coroutine",
    r"\[\[(un)?likely\]\]": "[[likely]]",
    r"\busing\s+enum\b": "using enum",
    r"std::(span|bit_cast|ranges|format|numbers|is_constant_evaluated)\b": "C++20 library name",
    r"\[\]\s*<": "template lambda",
    r"[{,(]\s*\.[A-Za-z_]\w*\s*=": "designated initializer",
}


def _code_without_comments(text: str) -> str:
    import re

    text = re.sub(r"/\*.*?\*/", " ", text, flags=re.S)
    text = re.sub(r"//[^\n]*", "", text)
    return re.sub(r'"(\\.|[^"\\\n])*"', '""', text)  # string literals


def test_sources_use_no_cxx20_only_syntax():
    import re

    files = sorted(p for p in (ROOT / "csrc").rglob("*")
                   if p.suffix in (".h", ".cuh", ".cu", ".cpp"))
    assert len(files) > 10
    found = []
    for f in files:
        code = _code_without_comments(f.read_text())
        for pattern, what in CXX20_ONLY.items():
            for m in re.finditer(pattern, code):
                line = code.count("\n", 0, m.start()) + 1
                found.append(f"{f.relative_to(ROOT)}:{line}: {what}")
    assert not found, "C++20-only syntax (the GPU machine builds C++17):\n" + "\n".join(found)


def test_cxx20_scan_finds_what_it_looks_for():
    import re

    planted = ("template <class Op> void f() { if constexpr (requires { &Op::load; }) {} }\n"
               "Geo g{.N = 1};  // requires in a comment is fine\n"
               'const char* s = "requires";\n')
    code = _code_without_comments(planted)
    hits = [what for pattern, what in CXX20_ONLY.items() if re.search(pattern, code)]
    assert hits == ["requires-expression / clause", "designated initializer"]


def test_index_math_on_host(tmp_path):
    """csrc/cuda/index.h on the host: coverage of the launch plan, the neck tile and halo."""
    cxx = shutil.which(os.environ.get("CXX", "g++")) or shutil.which("c++")
    if cxx is None:
        pytest.skip("no C++ compiler found")
    exe = tmp_path / "cuda_index_test"
    subprocess.run([cxx, "-std=c++17", "-O1", "-Wall", "-I", str(ROOT / "csrc"),
                    str(ROOT / "tests" / "cpp" / "cuda_index_test.cpp"), "-o", str(exe)],
                   check=True, capture_output=True, timeout=300)
    r = subprocess.run([str(exe)], capture_output=True, text=True, timeout=300)
    assert r.returncode == 0 and r.stdout.strip().endswith("ok"), r.stdout


# ----------------------------------------------------------------------------- helpers
def make_input(shape, layout, dtype=torch.float64, device=None, requires_grad=False):
    N, C, H, W = shape
    device = device or _current[0].device
    if layout == "strided":  # neither NCHW- nor channels_last-contiguous: every other column
        x = torch.randn(N, C, H, 2 * W, dtype=dtype, device=device)[..., 1::2]
    else:
        x = torch.randn(shape, dtype=dtype, device=device)
        if layout == "channels_last":
            x = x.contiguous(memory_format=torch.channels_last)
    return x.requires_grad_(requires_grad)


def dw_weight(C, along, dtype=torch.float64, device=None):
    device = device or _current[0].device
    shape = (C, 1, 3, 1) if along == "h" else (C, 1, 1, 3)
    return torch.randn(shape, dtype=dtype, device=device)


def bn_params(C, dtype=torch.float64, device=None, single_slope=False):
    kw = dict(dtype=dtype, device=device or _current[0].device)
    return BNPReLUParams(torch.rand(C, **kw) + 0.5, torch.randn(C, **kw), torch.randn(C, **kw),
                         torch.rand(C, **kw) + 0.5,
                         0.25 * torch.randn(1 if single_slope else C, **kw))


def cpu64(t):
    return None if t is None else t.detach().to("cpu", torch.float64)


def bn_map(p, f):
    return BNPReLUParams(*(None if t is None else f(t) for t in p))


def bn_cpu64(p):
    return bn_map(p, cpu64)


def close(out, want, dtype, **kw):
    tol = dict(TOL[dtype])
    tol.update(kw)
    assert out.device.type == _current[0].device
    torch.testing.assert_close(cpu64(out), want.to(torch.float64), **tol)


def out_format(x):
    if not x.is_contiguous() and x.is_contiguous(memory_format=torch.channels_last):
        return torch.channels_last
    return torch.contiguous_format


SHAPES = [(1, 3, 7, 9), (3, 5, 11, 6), (1, 4, 1, 13), (3, 33, 5, 70)]


# ------------------------------------------------------------------------- parity, float64
@pytest.mark.parametrize("along", ["h", "w"])
@pytest.mark.parametrize("layout", LAYOUTS)
@pytest.mark.parametrize("dilation", DILATIONS)
@pytest.mark.parametrize("shape", SHAPES, ids=str)
def test_dwconv3_forward_and_backward(dev, shape, dilation, layout, along):
    x = make_input(shape, layout)
    w = dw_weight(shape[1], along)
    g = make_input(shape, layout)
    dev.poison()
    out = dev.ops.dwconv3(x, w, dilation)
    assert out.is_contiguous(memory_format=out_format(x))
    close(out, reference.dwconv3(cpu64(x), cpu64(w), dilation), torch.float64)
    dev.poison()
    gx, gw = dev.ops.dwconv3_backward(g, x, w, dilation, [True, True])
    xr, wr = cpu64(x).requires_grad_(), cpu64(w).requires_grad_()
    reference.dwconv3(xr, wr, dilation).backward(cpu64(g))
    close(gx, xr.grad, torch.float64)
    close(gw, wr.grad, torch.float64)


@pytest.mark.parametrize("single_slope", [False, True])
@pytest.mark.parametrize("training", [True, False])
@pytest.mark.parametrize("layout", LAYOUTS)
@pytest.mark.parametrize("shape", SHAPES, ids=str)
def test_bn_prelu_forward_and_backward(dev, shape, layout, training, single_slope):
    x = make_input(shape, layout) * 3 + 1
    p = bn_params(shape[1], single_slope=single_slope)
    rm, rv = (None, None) if training else (p.running_mean, p.running_var)
    dev.poison()
    out, mean, var = dev.ops.bn_prelu(x, p.weight, p.bias, rm, rv, p.prelu_weight,
                                      training, 1e-3)
    assert out.is_contiguous(memory_format=out_format(x))
    xc = cpu64(x)
    want_mean = xc.mean((0, 2, 3)) if training else cpu64(p.running_mean)
    want_var = xc.var((0, 2, 3), unbiased=False) if training else cpu64(p.running_var)
    close(mean, want_mean, torch.float64)
    close(var, want_var, torch.float64)
    pc = bn_cpu64(p)
    args = [pc.weight, pc.bias, None if training else pc.running_mean,
            None if training else pc.running_var]
    xr = xc.clone().requires_grad_()
    leaves = [a.requires_grad_() for a in (args[0], args[1], pc.prelu_weight)]
    ref = reference.bn_prelu(xr, *args, pc.prelu_weight, training, eps=1e-3)
    close(out, ref, torch.float64)
    g = make_input(shape, layout)
    ref.backward(cpu64(g))
    dev.poison()
    grads = dev.ops.bn_prelu_backward(g, x, p.weight, p.bias, p.prelu_weight, mean, var,
                                      training, 1e-3, [True, True, True, True])
    for got, want in zip(grads, [xr.grad] + [t.grad for t in leaves]):
        close(got, want, torch.float64)


@pytest.mark.parametrize("training", [True, False])
@pytest.mark.parametrize("along", ["h", "w"])
@pytest.mark.parametrize("layout", LAYOUTS)
@pytest.mark.parametrize("dilation", DILATIONS)
@pytest.mark.parametrize("shape", SHAPES[:3], ids=str)
def test_dwconv3_bn_prelu(dev, shape, dilation, layout, along, training):
    x = make_input(shape, layout)
    cw = dw_weight(shape[1], along)
    p = bn_params(shape[1])
    rm, rv = (None, None) if training else (p.running_mean, p.running_var)
    dev.poison()
    out, mean, var = dev.ops.dwconv3_bn_prelu(x, cw, dilation, p.weight, p.bias, rm, rv,
                                              p.prelu_weight, training, 1e-3)
    assert out.is_contiguous(memory_format=out_format(x))
    pc = bn_cpu64(p)
    want = reference.dwconv3_bn_prelu(cpu64(x), cpu64(cw), dilation, pc.weight, pc.bias,
                                      None if training else pc.running_mean,
                                      None if training else pc.running_var, pc.prelu_weight,
                                      training, eps=1e-3)
    close(out, want, torch.float64)


def neck_params(C, dtype=torch.float64, device=None):
    weights = [dw_weight(C, a, dtype, device) for a in ("h", "w", "h", "w")]
    bns = [bn_params(C, dtype, device, single_slope=(k == 1)) for k in range(5)]
    return weights, bns


def neck_cuda(x, weights, bns, d, eps=1e-3):
    return _current[0].ops.dab_neck(x, *ops.fold_dab_neck(weights, bns, eps, x.dtype), d)


def neck_reference(x, weights, bns, d, eps=1e-3):
    return reference.dab_neck(cpu64(x), [cpu64(w) for w in weights], [bn_cpu64(p) for p in bns],
                              d, training=False, eps=eps)


@pytest.mark.parametrize("layout", LAYOUTS)
@pytest.mark.parametrize("dilation", DILATIONS)
@pytest.mark.parametrize("shape", SHAPES + [(1, 2, 40, 150)], ids=str)
def test_dab_neck(dev, shape, dilation, layout):
    x = make_input(shape, layout)
    weights, bns = neck_params(shape[1])
    dev.poison()
    out = neck_cuda(x, weights, bns, dilation)
    assert out.is_contiguous(memory_format=out_format(x))
    close(out, neck_reference(x, weights, bns, dilation), torch.float64)


# The ring kernel (csrc/cuda/dab_neck.cu, index.h: NeckRing): every dilation it holds, including
# those between its halos of 2, 4, 8, 16, with H long enough that each block's ring wraps (a
# segment is at least two steps and 8D rows; the ring holds TR + 2D rows), sizes not multiples of
# the ring's 128-column (NCHW) or 32/64/128-pixel x 8/4/2-channel (channels_last) strips, odd C
# (a thread's pair of channels half outside C), odd W (NCHW pairs of columns half outside the
# image), N > 1, and every dtype; last, a view one element off its storage's start (no
# alignment beyond the element's may be assumed).
@pytest.mark.parametrize("dtype", list(TOL), ids=str)
@pytest.mark.parametrize("layout", ["nchw", "channels_last"])
def test_dab_neck_ring(dev, layout, dtype):
    for shape, dilations in [((2, 9, 43, 37), (1, 2, 3, 4, 5)), ((1, 10, 71, 133), (8, 9, 16)),
                             ((2, 3, 23, 5), (7, 16)), ("off", (4,))]:
        if shape == "off":
            shape = (1, 6, 19, 42)
            flat = make_input((1, 1, 1, 6 * 19 * 42 + 1), "nchw", dtype).reshape(-1)[1:]
            x = (flat.view(1, 19, 42, 6).permute(0, 3, 1, 2) if layout == "channels_last"
                 else flat.view(shape))
            assert x.data_ptr() % (2 * x.element_size()) != 0
        else:
            x = make_input(shape, layout, dtype)
        weights, bns = neck_params(shape[1], dtype)
        for d in dilations:
            dev.poison()
            out = neck_cuda(x, weights, bns, d)
            assert out.is_contiguous(memory_format=out_format(x))
            close(out, neck_reference(x, weights, bns, d), dtype)


def test_dab_neck_public_api_uses_fused_kernel_and_matches(dev):
    x = make_input((3, 6, 19, 23), "channels_last")
    weights, bns = neck_params(6)
    with torch.no_grad(), dev.public_api():
        out = ops.dab_neck(x, weights, bns, 4)
    close(out, neck_reference(x, weights, bns, 4), torch.float64)


def test_empty_inputs(dev):
    for shape in [(0, 3, 5, 5), (2, 3, 0, 4)]:
        x = make_input(shape, "nchw")
        w = dw_weight(3, "h")
        assert dev.ops.dwconv3(x, w, 2).shape == x.shape
        p = bn_params(3)
        out, mean, var = dev.ops.bn_prelu(x, p.weight, p.bias, None, None, p.prelu_weight,
                                          True, 1e-3)
        assert out.shape == x.shape and torch.isnan(mean).all() and torch.isnan(var).all()
        weights, bns = neck_params(3)
        assert neck_cuda(x, weights, bns, 2).shape == x.shape
        gx, gw = dev.ops.dwconv3_backward(x, x, w, 2, [True, True])
        assert gx.shape == x.shape and torch.equal(gw, torch.zeros_like(w))


# ------------------------------------------------------------------------------ gradcheck
@pytest.mark.parametrize("layout", ["nchw", "channels_last"])
@pytest.mark.parametrize("dilation", [1, 2, 9])
def test_gradcheck(dev, dilation, layout):
    shape = (2, 3, 5, 7)
    x = make_input(shape, layout, requires_grad=True)
    with dev.public_api():
        for along in ("h", "w"):
            w = dw_weight(3, along).requires_grad_()
            assert torch.autograd.gradcheck(lambda x, w: ops.dwconv3(x, w, dilation), (x, w))
        p = bn_params(3)
        bw, bb, a = (t.clone().requires_grad_() for t in (p.weight, p.bias, p.prelu_weight))
        cw = dw_weight(3, "w").requires_grad_()
        for training in (True, False):
            rm, rv = (None, None) if training else (p.running_mean, p.running_var)
            assert torch.autograd.gradcheck(
                lambda x, bw, bb, a: ops.bn_prelu(x, bw, bb, rm, rv, a, training), (x, bw, bb, a))
            assert torch.autograd.gradcheck(
                lambda x, cw, bw, bb, a: ops.dwconv3_bn_prelu(x, cw, dilation, bw, bb, rm, rv, a,
                                                              training), (x, cw, bw, bb, a))


# ------------------------------------------------------------------------ low precision
@pytest.mark.parametrize("dtype", [torch.float32, torch.float16, torch.bfloat16], ids=str)
@pytest.mark.parametrize("layout", ["nchw", "channels_last"])
def test_low_precision_against_float64_reference(dev, dtype, layout):
    shape = (3, 24, 33, 45)
    M = shape[0] * shape[2] * shape[3]
    x = make_input(shape, layout, dtype)
    g = make_input(shape, layout, dtype)
    cw = dw_weight(24, "h", dtype)
    p = bn_params(24, torch.float32)
    pc = bn_cpu64(p)
    dev.poison()
    out = dev.ops.dwconv3(x, cw, 4)
    assert out.dtype == dtype
    close(out, reference.dwconv3(cpu64(x), cpu64(cw), 4), dtype)
    gx, gw = dev.ops.dwconv3_backward(g, x, cw, 4, [True, True])
    xr, wr = cpu64(x).requires_grad_(), cpu64(cw).requires_grad_()
    reference.dwconv3(xr, wr, 4).backward(cpu64(g))
    close(gx, xr.grad, dtype)
    close(gw, wr.grad, dtype, atol=TOL[dtype]["atol"] * math.sqrt(M))
    for training in (True, False):
        rm, rv = (None, None) if training else (p.running_mean, p.running_var)
        dev.poison()
        out, mean, var = dev.ops.bn_prelu(x, p.weight, p.bias, rm, rv, p.prelu_weight,
                                          training, 1e-3)
        assert out.dtype == dtype and mean.dtype == torch.float32
        want = reference.bn_prelu(cpu64(x), pc.weight, pc.bias,
                                  None if training else pc.running_mean,
                                  None if training else pc.running_var, pc.prelu_weight, training,
                                  eps=1e-3)
        close(out, want, dtype)
        # The backward, from the statistics the forward returned (float32).
        xr = cpu64(x).requires_grad_()
        leaves = [t.clone().requires_grad_() for t in (pc.weight, pc.bias, pc.prelu_weight)]
        reference.bn_prelu(xr, leaves[0], leaves[1], None if training else pc.running_mean,
                           None if training else pc.running_var, leaves[2], training,
                           eps=1e-3).backward(cpu64(g))
        dev.poison()
        grads = dev.ops.bn_prelu_backward(g, x, p.weight, p.bias, p.prelu_weight, mean, var,
                                          training, 1e-3, [True] * 4)
        close(grads[0], xr.grad, dtype)
        for got, leaf in zip(grads[1:], leaves):
            close(got, leaf.grad, dtype, atol=TOL[dtype]["atol"] * math.sqrt(M))
        out, _, _ = dev.ops.dwconv3_bn_prelu(x, cw, 2, p.weight, p.bias, rm, rv,
                                             p.prelu_weight, training, 1e-3)
        want = reference.dwconv3_bn_prelu(cpu64(x), cpu64(cw), 2, pc.weight, pc.bias,
                                          None if training else pc.running_mean,
                                          None if training else pc.running_var, pc.prelu_weight,
                                          training, eps=1e-3)
        close(out, want, dtype)
    weights, bns = neck_params(24, dtype)
    for d in (2, 16, 17):
        dev.poison()
        close(neck_cuda(x, weights, bns, d), neck_reference(x, weights, bns, d), dtype)


# ------------------------------------------------------------------------ the CPU kernels
@pytest.mark.parametrize("dtype", list(TOL), ids=str)
@pytest.mark.parametrize("layout", ["nchw", "channels_last"])
def test_every_op_matches_the_cpu_kernels(dev, dtype, layout):
    """Each op's outputs against the C++ CPU kernels (torch.ops.dabnet on CPU copies) on the
    same inputs, in the op's own dtype: the two implementations agree within output rounding."""
    shape = (2, 12, 9, 21)
    M = shape[0] * shape[2] * shape[3]
    x, g = make_input(shape, layout, dtype), make_input(shape, layout, dtype)
    cw = dw_weight(12, "w", dtype)
    p = bn_params(12, torch.float64 if dtype == torch.float64 else torch.float32)
    weights, bns = neck_params(12, dtype)
    neck_args = ops.fold_dab_neck(weights, bns, 1e-3, dtype)
    calls = {
        "dwconv3": (x, cw, 3),
        "dwconv3_backward": (g, x, cw, 3, [True, True]),
        "bn_prelu": (x, *p[:4], p.prelu_weight, False, 1e-3),
        "bn_prelu_train": (x, p.weight, p.bias, None, None, p.prelu_weight, True, 1e-3),
        "dwconv3_bn_prelu": (x, cw, 2, *p[:4], p.prelu_weight, False, 1e-3),
        "dab_neck_tile": (x, *neck_args, 4),
        "dab_neck_global": (x, *neck_args, 17),
    }
    _, mean, var = torch.ops.dabnet.bn_prelu(*(t.cpu() if isinstance(t, torch.Tensor) else t
                                               for t in calls["bn_prelu_train"]))
    calls["bn_prelu_backward"] = (g, x, p.weight, p.bias, p.prelu_weight, mean.to(x.device),
                                  var.to(x.device), True, 1e-3, [True] * 4)
    for name, args in calls.items():
        op = name.replace("_train", "").replace("_tile", "").replace("_global", "")
        dev.poison()
        got = getattr(dev.ops, op)(*args)
        want = getattr(torch.ops.dabnet, op)(*(a.cpu() if isinstance(a, torch.Tensor) else a
                                               for a in args))
        got, want = (got, want) if isinstance(got, (tuple, list)) else ((got,), (want,))
        for k, (a, b) in enumerate(zip(got, want)):
            sums = op.endswith("_backward") and k > 0  # parameter gradients: sums over N*H*W
            close(a, cpu64(b), dtype, atol=TOL[dtype]["atol"] * (math.sqrt(M) if sums else 1))


# --------------------------------------------------------------------------- packed access
def offset_input(shape, layout, dtype, offset):
    """A tensor in NCHW or channels_last whose data starts `offset` elements into its storage (an
    odd offset breaks the 16-byte alignment the packed kernels need)."""
    N, C, H, W = shape
    base = torch.randn(N * C * H * W + offset, dtype=torch.float64,
                       device=_current[0].device).to(dtype)[offset:]
    if layout == "nchw":
        return base.view(N, C, H, W)
    return base.view(N, H, W, C).permute(0, 3, 1, 2)


@pytest.mark.parametrize("offset", [0, 1, 8])
@pytest.mark.parametrize("shape", [(2, 16, 3, 24), (1, 12, 4, 20), (2, 8, 2, 9)], ids=str)
@pytest.mark.parametrize("layout", ["nchw", "channels_last"])
@pytest.mark.parametrize("dtype", list(TOL), ids=str)
def test_packed_access(dev, dtype, layout, shape, offset):
    """The kernels move 16-byte packs when the layout and alignment allow (W, or C in
    channels_last, a multiple of the pack; 16-byte aligned data) and elements otherwise: every op
    against float64, with aligned and misaligned storage offsets, sizes that are and are not
    multiples of the pack (8 in fp16/bf16, 4 in fp32, 2 in fp64), along both axes, with
    dilations giving every shift of a tap within a pack, grad_out aliasing x."""
    C = shape[1]
    M = shape[0] * shape[2] * shape[3]
    x = offset_input(shape, layout, dtype, offset)
    g = offset_input(shape, layout, dtype, 1 - offset % 2)  # the other alignment than x
    assert x.is_contiguous(memory_format=torch.channels_last if layout != "nchw" else
                           torch.contiguous_format)
    p = bn_params(C, torch.float64 if dtype == torch.float64 else torch.float32)
    pc = bn_cpu64(p)
    atol_sum = TOL[dtype]["atol"] * math.sqrt(M)
    for along, dilations in (("w", range(1, 10)), ("h", (1, 2))):
        w = dw_weight(C, along, dtype)
        for d in dilations:
            dev.poison()
            close(dev.ops.dwconv3(x, w, d), reference.dwconv3(cpu64(x), cpu64(w), d), dtype)
            for grad in (g, x):  # x: grad_out is the very tensor x
                gx, gw = dev.ops.dwconv3_backward(grad, x, w, d, [True, True])
                xr, wr = cpu64(x).requires_grad_(), cpu64(w).requires_grad_()
                reference.dwconv3(xr, wr, d).backward(cpu64(grad))
                close(gx, xr.grad, dtype)
                close(gw, wr.grad, dtype, atol=atol_sum)
                gx_only, _ = dev.ops.dwconv3_backward(grad, x, w, d, [True, False])
                close(gx_only, xr.grad, dtype)
                _, gw_only = dev.ops.dwconv3_backward(grad, x, w, d, [False, True])
                close(gw_only, wr.grad, dtype, atol=atol_sum)
            for training in (True, False):
                rm, rv = (None, None) if training else (p.running_mean, p.running_var)
                out, mean, var = dev.ops.dwconv3_bn_prelu(x, w, d, p.weight, p.bias, rm, rv,
                                                          p.prelu_weight, training, 1e-3)
                want = reference.dwconv3_bn_prelu(
                    cpu64(x), cpu64(w), d, pc.weight, pc.bias,
                    None if training else pc.running_mean, None if training else pc.running_var,
                    pc.prelu_weight, training, eps=1e-3)
                close(out, want, dtype)
    for training in (True, False):
        rm, rv = (None, None) if training else (p.running_mean, p.running_var)
        dev.poison()
        out, mean, var = dev.ops.bn_prelu(x, p.weight, p.bias, rm, rv, p.prelu_weight, training,
                                          1e-3)
        close(out, reference.bn_prelu(cpu64(x), pc.weight, pc.bias,
                                      None if training else pc.running_mean,
                                      None if training else pc.running_var, pc.prelu_weight,
                                      training, eps=1e-3), dtype)
        if training:
            close(mean, cpu64(x).mean((0, 2, 3)), dtype)
            close(var, cpu64(x).var((0, 2, 3), unbiased=False), dtype)
        xr = cpu64(x).requires_grad_()
        leaves = [t.clone().requires_grad_() for t in (pc.weight, pc.bias, pc.prelu_weight)]
        reference.bn_prelu(xr, leaves[0], leaves[1], None if training else pc.running_mean,
                           None if training else pc.running_var, leaves[2], training,
                           eps=1e-3).backward(cpu64(g))
        grads = dev.ops.bn_prelu_backward(g, x, p.weight, p.bias, p.prelu_weight, mean, var,
                                          training, 1e-3, [True] * 4)
        close(grads[0], xr.grad, dtype)
        for got, leaf in zip(grads[1:], leaves):
            close(got, leaf.grad, dtype, atol=atol_sum)


def test_statistics_of_a_channel_far_from_zero(dev):
    """Shifted sums: a channel whose mean is 1e4 times its spread keeps its variance (a plain
    sum of squares in float32 would lose it all)."""
    x = make_input((2, 4, 6, 8), "channels_last", torch.float32) * 0.1 + 1000.0
    p = bn_params(4, torch.float32)
    _, mean, var = dev.ops.bn_prelu(x, p.weight, p.bias, None, None, p.prelu_weight, True, 1e-5)
    close(mean, cpu64(x).mean((0, 2, 3)), torch.float32)
    close(var, cpu64(x).var((0, 2, 3), unbiased=False), torch.float32, rtol=1e-3)


# ------------------------------------------------------------------------- random shapes
def test_random_shapes(dev):
    rng = random.Random(7)
    for _ in range(40):
        shape = (rng.randint(1, 4), rng.randint(1, 40), rng.randint(1, 50), rng.randint(1, 90))
        layout = rng.choice(LAYOUTS)
        d = rng.choice([1, 2, 3, 5, 8, 13, 16, 21, 64])
        x = make_input(shape, layout)
        along = rng.choice("hw")
        w = dw_weight(shape[1], along)
        dev.poison()
        close(dev.ops.dwconv3(x, w, d), reference.dwconv3(cpu64(x), cpu64(w), d),
              torch.float64)
        weights, bns = neck_params(shape[1])
        dev.poison()
        close(neck_cuda(x, weights, bns, d), neck_reference(x, weights, bns, d), torch.float64)
        if shape[0] * shape[2] * shape[3] > 1:
            p = bn_params(shape[1])
            dev.poison()
            out = dev.ops.bn_prelu(x, p.weight, p.bias, None, None, p.prelu_weight, True,
                                   1e-3)[0]
            pc = bn_cpu64(p)
            close(out, reference.bn_prelu(cpu64(x), pc.weight, pc.bias, None, None,
                                          pc.prelu_weight, True, eps=1e-3), torch.float64)


# ------------------------------------------------------------------------ DABNet shapes
@requires_cuda
@pytest.mark.parametrize("dtype", [torch.float32, torch.float16], ids=str)
@pytest.mark.parametrize("layout", ["nchw", "channels_last"])
@pytest.mark.parametrize("shape,dilations", [((8, 32, 128, 256), (2,)),
                                             ((8, 64, 64, 128), (4, 8, 16))],
                         ids=["block1", "block2"])
def test_dabnet_shapes(shape, dilations, layout, dtype):
    C = shape[1]
    M = shape[0] * shape[2] * shape[3]
    x = make_input(shape, layout, dtype)
    g = make_input(shape, layout, dtype)
    # The float64 reference runs on the GPU here (cuDNN float64 has no TF32 shortcut).
    x64, g64 = x.double(), g.double()
    p = bn_params(C, torch.float32)
    p64 = bn_map(p, torch.Tensor.double)
    for d in dilations:
        weights, bns = neck_params(C, dtype)
        Gpu().poison()
        out = neck_cuda(x, weights, bns, d)
        want = reference.dab_neck(x64, [w.double() for w in weights],
                                  [bn_map(b, torch.Tensor.double) for b in bns], d)
        torch.testing.assert_close(out.double(), want, **TOL[dtype])
        cw = weights[2]
        Gpu().poison()
        gx, gw = torch.ops.dabnet.dwconv3_backward(g, x, cw, d, [True, True])
        x64r, cw64 = x64.clone().requires_grad_(), cw.double().requires_grad_()
        reference.dwconv3(x64r, cw64, d).backward(g64)
        torch.testing.assert_close(gx.double(), x64r.grad, **TOL[dtype])
        tol = dict(TOL[dtype])
        tol["atol"] *= math.sqrt(M)
        torch.testing.assert_close(gw.double(), cw64.grad, **tol)
    Gpu().poison()
    out, mean, var = torch.ops.dabnet.bn_prelu(x, p.weight, p.bias, None, None, p.prelu_weight,
                                               True, 1e-3)
    want = reference.bn_prelu(x64, p64.weight, p64.bias, None, None, p64.prelu_weight, True,
                              eps=1e-3)
    torch.testing.assert_close(out.double(), want, **TOL[dtype])
    torch.testing.assert_close(mean.double(), x64.mean((0, 2, 3)), rtol=1e-5, atol=1e-5)
    torch.testing.assert_close(var.double(), x64.var((0, 2, 3), unbiased=False), rtol=1e-5,
                               atol=1e-5)


@requires_cuda
@pytest.mark.parametrize("layout", ["nchw", "channels_last"])
def test_reductions_are_deterministic(layout):
    shape = (8, 64, 64, 128)
    x = make_input(shape, layout, torch.float32)
    g = make_input(shape, layout, torch.float32)
    w = dw_weight(64, "w", torch.float32)
    p = bn_params(64, torch.float32)
    runs = []
    for _ in range(3):
        gw = torch.ops.dabnet.dwconv3_backward(g, x, w, 8, [False, True])[1]
        _, mean, var = torch.ops.dabnet.bn_prelu(x, p.weight, p.bias, None, None, p.prelu_weight,
                                                 True, 1e-3)
        grads = torch.ops.dabnet.bn_prelu_backward(g, x, p.weight, p.bias, p.prelu_weight, mean,
                                                   var, True, 1e-3, [True, True, True, True])
        runs.append([gw, mean, var, *grads])
    for other in runs[1:]:
        for a, b in zip(runs[0], other):
            assert torch.equal(a, b)


@requires_cuda
@pytest.mark.skipif(torch.cuda.is_available()
                    and torch.cuda.get_device_properties(0).total_memory < 24 << 30,
                    reason="needs a GPU with 24 GiB")
@pytest.mark.parametrize("layout", ["nchw", "channels_last"])
def test_more_than_2_pow_31_elements(layout):
    """64-bit offsets: the last rows of the last channel of a tensor past 2^31 elements."""
    shape = (1, 4, 16384, 32769)  # 2^31 + 65536 elements
    x = torch.empty(shape, dtype=torch.float16, device="cuda",
                    memory_format=torch.channels_last if layout == "channels_last"
                    else torch.contiguous_format)
    x.normal_()
    w = dw_weight(4, "h", torch.float16)
    out = torch.ops.dabnet.dwconv3(x, w, 3)
    tail = x[:, 3:, -8:, :].float()
    want = reference.dwconv3(tail, w[3:].float(), 3)[:, :, -5:, :]
    torch.testing.assert_close(out[:, 3:, -5:, :].float(), want, **TOL[torch.float16])
    del out
    p = bn_params(4, torch.float32)
    out, mean, var = torch.ops.dabnet.bn_prelu(x, p.weight, p.bias, None, None, p.prelu_weight,
                                               True, 1e-3)
    last = x[:, 3].float()
    torch.testing.assert_close(mean[3], last.mean(), rtol=1e-5, atol=1e-5)
    torch.testing.assert_close(var[3], last.var(unbiased=False), rtol=1e-5, atol=1e-5)
    assert not torch.isnan(out[:, 3, -2:, :]).any()


# ------------------------------------------------------------------ devices and streams
@requires_cuda
def test_side_stream():
    x = make_input((2, 8, 30, 40), "channels_last")
    w = dw_weight(8, "h")
    s = torch.cuda.Stream()
    s.wait_stream(torch.cuda.current_stream())
    with torch.cuda.stream(s):
        y = x * 2
        out = torch.ops.dabnet.dwconv3(y, w, 3)
    torch.cuda.current_stream().wait_stream(s)
    close(out, reference.dwconv3(cpu64(x) * 2, cpu64(w), 3), torch.float64)


@requires_cuda
@pytest.mark.skipif(torch.cuda.device_count() < 2, reason="needs 2 GPUs")
def test_second_gpu():
    dev = "cuda:1"
    x = make_input((2, 5, 17, 21), "channels_last", device=dev)
    w = dw_weight(5, "w", device=dev)
    out = torch.ops.dabnet.dwconv3(x, w, 2)
    assert out.device == torch.device(dev)
    close(out, reference.dwconv3(cpu64(x), cpu64(w), 2), torch.float64)
    weights, bns = neck_params(5, device=dev)
    out = neck_cuda(x, weights, bns, 3)
    assert out.device == torch.device(dev)
    close(out, neck_reference(x, weights, bns, 3), torch.float64)
    p = bn_params(5, device=dev)
    out, mean, _ = torch.ops.dabnet.bn_prelu(x, p.weight, p.bias, None, None, p.prelu_weight, True,
                                             1e-3)
    assert out.device == mean.device == torch.device(dev)


@requires_cuda
def test_parameters_on_another_device_are_rejected():
    x = make_input((1, 3, 5, 5), "nchw")
    with pytest.raises(RuntimeError, match="weight is on cpu"):
        torch.ops.dabnet.dwconv3(x, dw_weight(3, "h", device="cpu"), 1)
