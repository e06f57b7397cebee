"""Proof that the emulated CUDA tests can fail: plants one bug at a time into a copy of csrc, builds
the emulation from it and runs the emulated tests of tests/test_cuda.py that exercise the changed
code, once per schedule (forward, reverse, random thread and block order). Every mutant must make
them fail under at least one schedule; the unchanged sources must pass the same runs.

    python tests/cuda_emu/mutants.py [--only NAME ...]     (make emu-mutants)

Exit status 0 when every mutant is caught and the control passes.
"""
from __future__ import annotations

import argparse
import os
import shutil
import subprocess
import sys
import tempfile
import time
from pathlib import Path

HERE = Path(__file__).resolve().parent
ROOT = HERE.parents[1]
sys.path.insert(0, str(HERE))
import build  # noqa: E402

ORDERS = ("forward", "reverse", "random")
NECK = "test_dab_neck"
REDUCE = "test_bn_prelu_forward_and_backward or test_dwconv3_forward_and_backward"

# name: (bug class, file under csrc/cuda, text, replacement, tests that should catch it)
MUTANTS = {
    "missing_barrier": (
        "a missing barrier: the neck's horizontal phase reads values other threads have not "
        "written yet",
        "dab_neck.cu",
        "    __syncthreads();\n    t.horizontal(mid, out, g, p, d, k, tid);\n",
        "    t.horizontal(mid, out, g, p, d, k, tid);\n", NECK),
    "reduction_race": (
        "a race in a reduction tree: no barrier between the levels of reduce_kernel's tree",
        "common.cuh",
        "R::merge(sh[t][l], sh[t + stride * blockDim.x][l]);\n    __syncthreads();\n",
        "R::merge(sh[t][l], sh[t + stride * blockDim.x][l]);\n", REDUCE),
    "halo_one_short": (
        "a halo one short: the neck's ring holds one row too few (a step's last row overwrites "
        "the first it reads)",
        "index.h",
        "static constexpr int kRows = TR + 2 * D;",
        "static constexpr int kRows = TR + 2 * D - 1;", NECK),
    "ring_halo_one_short": (
        "a halo one short: the neck's ring rows stage one halo column too few",
        "index.h",
        "static constexpr int kRowElems = (TW + 2 * D) * CT;",
        "static constexpr int kRowElems = (TW + 2 * D - 1) * CT;", NECK),
    "tap_halo_one_short": (
        "a halo one short: the 3-tap stencil drops its last in-image neighbour",
        "dwconv3.cu",
        "v[2] = load_pack<scalar_t, V>(x, o + step, pos < lim - reach);",
        "v[2] = load_pack<scalar_t, V>(x, o + step, pos < lim - reach - 1);",
        "test_dwconv3_forward_and_backward"),
    "straddle_halo_one_short": (
        "a halo one short: a 3-tap stencil whose taps straddle two packs drops its last pack",
        "dwconv3.cu",
        "f = load_pack<scalar_t, V>(x, o + reach + 1, pos < lim - reach - 1);",
        "f = load_pack<scalar_t, V>(x, o + reach + 1, pos < lim - reach - 2);",
        "test_dwconv3_forward_and_backward or test_packed_access"),
    "early_exit_before_shuffle": (
        "an early exit before a shuffle: lanes without partials leave finish_kernel",
        "common.cuh",
        "  Vec<T, R::size> v[kFinishLoads];\n",
        "  if (int(threadIdx.x) >= n) return;\n  Vec<T, R::size> v[kFinishLoads];\n", REDUCE),
    "small_shared_tile": (
        "a too-small shared tile: reduce_kernel's array holds half the block",
        "common.cuh",
        "__shared__ V sh[kThreads][L];",
        "__shared__ V sh[kThreads / 2][L];", REDUCE),
    "small_dynamic_tile": (
        "a too-small shared tile: the neck asks for its ring without one branch's phase-A rows",
        "index.h",
        "return 2 * kMid * int64_t(sizeof(T)) + kRing * int64_t(sizeof(S));",
        "return kMid * int64_t(sizeof(T)) + kRing * int64_t(sizeof(S));", NECK),
    "missing_optin": (
        "a launch above 48 KiB of shared memory without the cudaFuncSetAttribute opt-in",
        "dab_neck.cu",
        "if (bytes > 48 * 1024)",
        "if (bytes > 64 * 1024)", NECK),
}


def pytest_run(lib: Path, select: str, order: str) -> tuple[int, str]:
    """pytest's exit status (0 passed, 1 a test failed, else an error or a crash) and a summary
    of the emulated tests matching `select` on `lib` under `order`."""
    env = dict(os.environ, CUEMU_LIB=str(lib), CUEMU_ORDER=order)
    r = subprocess.run([sys.executable, "-m", "pytest", "-q", "-x", "-p", "no:cacheprovider",
                        "-m", "cuda_emulated", "-k", select, str(ROOT / "tests" / "test_cuda.py")],
                       cwd=ROOT, env=env, capture_output=True, text=True)
    lines = [ln for ln in r.stdout.splitlines() if ln.startswith("E ") and "cuemu" in ln]
    lines = lines or [ln for ln in r.stdout.splitlines() if ln.startswith("E ")]
    summary = r.stdout.strip().splitlines()[-1] if r.stdout.strip() else r.stderr[-300:]
    return r.returncode, (lines[0][:300] + " | " if lines else "") + summary


def mutate(name: str, out: Path) -> Path:
    """A copy of csrc with mutant `name` planted; fails if its text is not found exactly once."""
    _, file, old, new, _ = MUTANTS[name]
    src = out / name / "csrc"
    shutil.copytree(ROOT / "csrc", src)
    path = src / "cuda" / file
    text = path.read_text()
    if text.count(old) != 1:
        raise SystemExit(f"mutant {name}: its text occurs {text.count(old)} times in {file} "
                         "(csrc changed: update tests/cuda_emu/mutants.py)")
    path.write_text(text.replace(old, new))
    return src


def main() -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--only", nargs="*", choices=sorted(MUTANTS), help="mutants to run")
    a = p.parse_args()
    names = a.only or list(MUTANTS)
    failed = []
    with tempfile.TemporaryDirectory(prefix="cuemu-mutants-") as tmp:
        clean = build.build()
        selects = sorted({MUTANTS[n][4] for n in names})
        control = " or ".join(f"({s})" for s in selects)
        for order in ORDERS:  # the unchanged kernels pass every test the mutants run
            t = time.time()
            rc, msg = pytest_run(clean, control, order)
            print(f"control {order:8s} {'pass' if rc == 0 else 'FAIL'} ({time.time() - t:.0f} s) "
                  f"{msg}", flush=True)
            if rc != 0:
                failed.append(f"control/{order}")
        for name in names:
            what, *_, select = MUTANTS[name]
            lib = build.build(src=mutate(name, Path(tmp)), out_root=Path(tmp) / "build")
            caught = []
            for order in ORDERS:
                rc, msg = pytest_run(lib, select, order)
                if rc == 1:  # a test failed; a crash (rc < 0) or an error does not count
                    caught.append(order)
                verdict = {0: "passed (not caught)", 1: "caught"}.get(rc, f"ERROR (exit {rc})")
                print(f"{name:26s} {order:8s} {verdict}: {msg}", flush=True)
            print(f"== {name}: {what}: caught under {', '.join(caught) or 'NO schedule'}",
                  flush=True)
            if not caught:
                failed.append(name)
    print("all mutants caught" if not failed else f"NOT caught / failed: {', '.join(failed)}")
    return 1 if failed else 0


if __name__ == "__main__":
    sys.exit(main())
