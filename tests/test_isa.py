"""The two builds of the C++ CPU kernels (csrc/cpu/isa.h): baseline x86-64 and AVX2+FMA, one
picked when the library loads. The AVX2 build must be the one that runs on a CPU that has AVX2,
must never leak AVX code into the baseline build (that would crash older CPUs), and the baseline
build must stay correct although this machine normally runs the other one."""
import os
import platform
import re
import shutil
import subprocess
import sys

import pytest
import torch

import dabnet_kernels
from dabnet_kernels import _lib

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
X86 = platform.machine().lower() in ("x86_64", "amd64")


def _cpu_flags():
    try:
        with open("/proc/cpuinfo") as f:
            for line in f:
                if line.startswith("flags"):
                    return set(line.split(":", 1)[1].split())
    except OSError:
        pass
    return set()


def _disassembly():
    objdump = shutil.which("objdump")
    if not (X86 and objdump):
        pytest.skip("needs x86-64 and objdump")
    return subprocess.run([objdump, "-d", "-C", "--no-show-raw-insn", _lib._ext_path],
                          capture_output=True, text=True, check=True).stdout


def _vex_functions(text):
    """(functions in dabnet::cpu::avx2, other functions) that hold VEX-encoded (AVX) instructions."""
    inside, outside, cur = set(), set(), None
    for line in text.splitlines():
        m = re.match(r"^[0-9a-f]+ <(.*)>:$", line)
        if m:
            cur = m.group(1)
            continue
        parts = line.split("\t")
        if cur and len(parts) >= 2 and parts[1].split():
            mnemonic = parts[1].split()[0]
            if mnemonic.startswith("v") and mnemonic not in ("verr", "verw"):
                (inside if "dabnet::cpu::avx2::" in cur else outside).add(cur)
    return inside, outside


def _built_avx2(text):
    return "dabnet::cpu::avx2::" in text


def _run(code, **env):
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, cwd=ROOT,
                         env={**os.environ, "PYTHONPATH": ROOT, **env})
    assert out.returncode == 0, out.stderr[-2000:]
    return out.stdout.strip()


def test_no_avx_code_outside_the_avx2_build():
    text = _disassembly()
    inside, outside = _vex_functions(text)
    assert not outside, f"AVX instructions in baseline code: {sorted(outside)[:5]}"
    if _built_avx2(text):
        assert inside, "the AVX2 build holds no AVX instructions: the target switch did nothing"


AVX512_BF16 = {"avx512f", "avx512bw", "avx512vl", "avx512dq", "avx512_bf16"}


def test_the_avx2_build_runs_where_the_cpu_has_avx2():
    text = _disassembly()
    want = "avx2" if _built_avx2(text) and {"avx2", "fma"} <= _cpu_flags() else "base"
    if want == "avx2" and AVX512_BF16 <= _cpu_flags() and "bf16_store_avx512" in text:
        want = "avx2+avx512bf16"  # bf16 outputs stored with vcvtneps2bf16 (GCC >= 10 builds it)
    assert dabnet_kernels.cpu_isa() == want


def _bf16_special(shape, g):
    """bf16 values with the cases vcvtneps2bf16 rounds differently from c10: denormals and NaNs
    with a payload (and infinities, zeros of both signs), among ordinary values."""
    x = torch.randn(shape, generator=g).to(torch.bfloat16)
    bits = x.view(torch.int16).flatten()
    special = torch.tensor([0x0001, 0x8003, 0x007F, 0x7FC1, 0xFFA5, 0x7F81, 0x7F80, 0xFF80, 0x0000,
                            0x8000], dtype=torch.int32)
    special = torch.where(special >= 0x8000, special - 0x10000, special).to(torch.int16)
    idx = torch.randperm(bits.numel(), generator=g)[:3 * special.numel()]
    bits[idx] = special.repeat(3)
    return x


def test_avx512_bf16_stores_are_c10s_rounding_bit_for_bit():
    """Every bf16 output that goes through store_run, with the AVX512_BF16 stores and without:
    equal bits, NaN payloads and denormal results included (the vector's fallback)."""
    D = torch.ops.dabnet
    if "avx512bf16" not in dabnet_kernels.cpu_isa():
        pytest.skip("the AVX512_BF16 stores do not run on this CPU or build")
    g = torch.Generator().manual_seed(0)
    cl = torch.channels_last
    x = _bf16_special((2, 37, 9, 21), g).contiguous(memory_format=cl)
    r = _bf16_special((2, 37, 9, 21), g).contiguous(memory_format=cl)
    n3 = _bf16_special((2, 3, 9, 21), g).contiguous(memory_format=cl)
    one, zero = torch.ones(37), torch.zeros(37)
    p = (torch.rand(37, generator=g) + 0.5, torch.randn(37, generator=g) * 0.1, torch.rand(37, generator=g))
    p77 = tuple(torch.cat([v, v, v[:3]]) for v in p)
    neck = (torch.randn(4, 37, 3, generator=g) * 0.5, torch.randn(4, 37, generator=g) * 0.1,
            torch.rand(4, 37, generator=g)) + p
    cases = {
        "affine_prelu_ (identity: denormals and NaNs pass through)":
            lambda: D.affine_prelu_(x.clone(), one, zero, one) or None,
        "affine_prelu_": lambda: _inplace(D.affine_prelu_, x, *p),
        "add_affine_prelu_": lambda: _add(x, r, p),
        "cat_bn_prelu one input": lambda: D.cat_bn_prelu([x], *p),
        "cat_bn_prelu 37+37+3, add0": lambda: D.cat_bn_prelu([x, r, n3], *p77, r),
        "cat_bn_prelu nchw": lambda: D.cat_bn_prelu([x.contiguous(), r.contiguous()],
                                                    *(torch.cat([v, v]) for v in p)),
        "upsample_bilinear": lambda: D.upsample_bilinear(x, 20, 45),
        "dab_neck": lambda: D.dab_neck(x, *neck, 2),
        "dab_neck nchw": lambda: D.dab_neck(x.contiguous(), *neck, 3),
    }
    ident = x.clone()
    D.affine_prelu_(ident, one, zero, one)
    tiny = (ident.float().abs() < torch.finfo(torch.float32).tiny) & (ident != 0)
    assert tiny.any() and ident.isnan().any()  # the identity case reaches both fallbacks
    try:
        for name, fn in cases.items():
            D.set_cpu_bf16_store(False)
            want = fn()
            D.set_cpu_bf16_store(True)
            got = fn()
            for w, o in zip(want if isinstance(want, tuple) else (want,),
                            got if isinstance(got, tuple) else (got,)):
                if w is None:
                    continue
                assert torch.equal(w.view(torch.int16), o.view(torch.int16)), name
    finally:
        D.set_cpu_bf16_store(True)


def _inplace(op, x, *p):
    y = x.clone()
    op(y, *p)
    return y


def _add(x, r, p):
    y = x.clone()
    out = torch.ops.dabnet.add_affine_prelu_(y, r, *p)
    return y, out


def test_environment_forces_the_baseline():
    code = "import dabnet_kernels; print(dabnet_kernels.cpu_isa())"
    assert _run(code, DABNET_CPU_ISA="base") == "base"


OP_TESTS = ["test_dwconv3.py", "test_bn_prelu.py", "test_dwconv3_bn_prelu.py", "test_dab_neck.py",
            "test_cat_bn_prelu.py", "test_upsample.py"]


def test_baseline_kernels_pass_the_op_tests():
    if dabnet_kernels.cpu_isa() == "base":
        pytest.skip("this process already runs the baseline kernels: the suite covers them")
    # The parity tests (values, layouts, dtypes, gradients against the reference); gradcheck and
    # opcheck exercise the same kernels at far greater cost.
    out = subprocess.run(
        [sys.executable, "-m", "pytest", "-q", "-p", "no:cacheprovider", "-x",
         "-k", "not gradcheck and not opcheck and not deterministic"]
        + [os.path.join(ROOT, "tests", f) for f in OP_TESTS],
        capture_output=True, text=True, cwd=ROOT,
        env={**os.environ, "PYTHONPATH": ROOT, "DABNET_CPU_ISA": "base"})
    assert out.returncode == 0, out.stdout[-3000:]
    assert " passed" in out.stdout
