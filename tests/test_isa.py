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


def test_the_avx2_build_runs_where_the_cpu_has_avx2():
    text = _disassembly()
    want = "avx2" if _built_avx2(text) and {"avx2", "fma"} <= _cpu_flags() else "base"
    assert dabnet_kernels.cpu_isa() == want


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
