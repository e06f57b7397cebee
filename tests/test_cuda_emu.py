"""The CUDA emulation itself (tests/cuda_emu, docs/cuda-emulation.md), on the small kernels of
tests/cuda_emu/selftest.cu: launch limits, barriers, warp shuffles, NaN poisoning, schedules,
and the translator. The CUDA kernels' own emulated tests are in test_cuda.py (dev=emulated)."""
from __future__ import annotations

import math
from pathlib import Path

import pytest
import torch

from cuda_emu import ops_or_fail, translate

pytestmark = pytest.mark.cuda_emulated
ORDERS = ("forward", "reverse", "random")


@pytest.fixture(scope="module")
def emu():
    e = ops_or_fail()
    yield e
    e.set_schedule("forward", 0)


def run(emu, name, args=()):
    return emu.selftest(torch.empty(0), name, list(args))


def launch(emu, grid=(1, 1, 1), block=(1, 1, 1), smem=0, optin=0):
    out = run(emu, "launch", [*grid, *block, smem, optin])
    return int(out[0]), out[1:1025], out[1025:]


@pytest.mark.parametrize("grid,block", [((3, 2, 2), (4, 2, 2)), ((1, 65535, 1), (1, 1, 1)),
                                        ((1, 1, 1), (1024, 1, 1)), ((2, 1, 1), (2, 8, 64))])
def test_every_thread_of_a_valid_launch_runs_once(emu, grid, block):
    n, _, _ = launch(emu, grid, block)
    assert n == math.prod(grid) * math.prod(block)


@pytest.mark.parametrize("grid,block,smem,optin,match", [
    ((2 ** 31, 1, 1), (1, 1, 1), 0, 0, r"grid \(2147483648,1,1\) outside"),
    ((1, 65536, 1), (1, 1, 1), 0, 0, "grid"),
    ((1, 1, 65536), (1, 1, 1), 0, 0, "grid"),
    ((0, 1, 1), (1, 1, 1), 0, 0, "grid"),
    ((1, 1, 1), (1025, 1, 1), 0, 0, "block"),
    ((1, 1, 1), (512, 2, 2), 0, 0, "at most 1024 threads"),
    ((1, 1, 1), (1, 1, 65), 0, 0, "block"),
    ((1, 1, 1), (32, 1, 1), 48 * 1024 + 1, 0, "without a cudaFuncSetAttribute"),
    ((1, 1, 1), (32, 1, 1), 60 * 1024, 50 * 1024, "without a cudaFuncSetAttribute"),
    ((1, 1, 1), (32, 1, 1), 227 * 1024 + 1, 0, "sm_90 allows at most 232448"),
])
def test_launches_outside_sm90_limits_fail_at_the_launch_check(emu, grid, block, smem, optin,
                                                               match):
    with pytest.raises(RuntimeError, match="invalid configuration argument") as e:
        launch(emu, grid, block, smem, optin)
    assert e.match(match) and e.match(r"selftest.cu:\d+")


def test_dynamic_shared_memory_above_48k_needs_the_opt_in(emu):
    assert launch(emu, (1, 1, 1), (32, 1, 1), 100 * 1024, 100 * 1024)[0] == 32
    assert launch(emu, (1, 1, 1), (32, 1, 1), 227 * 1024, 227 * 1024)[0] == 32
    with pytest.raises(RuntimeError, match="invalid argument"):  # opt-in above sm_90's maximum
        launch(emu, (1, 1, 1), (32, 1, 1), 0, 227 * 1024 + 1)


@pytest.mark.parametrize("order", ORDERS)
def test_schedules_order_blocks_and_threads(emu, order):
    emu.set_schedule(order, 5)
    n, threads, blocks = launch(emu, (64, 1, 1), (8, 4, 2))
    threads, blocks = threads[:64].tolist(), blocks[:64].tolist()
    assert sorted(threads) == list(range(64)) and sorted(blocks) == list(range(64))
    want = {"forward": list(range(64)), "reverse": list(range(63, -1, -1))}
    if order == "random":
        assert threads not in want.values() and blocks not in want.values()
    else:
        assert threads == want[order] and blocks == want[order]


def test_schedule_names_are_checked(emu):
    with pytest.raises(RuntimeError, match="forward, reverse or random"):
        emu.set_schedule("backwards", 0)


@pytest.mark.parametrize("order", ORDERS)
def test_barrier_releases_only_when_all_live_threads_arrive(emu, order):
    emu.set_schedule(order, 1)
    assert run(emu, "sync", [0]).tolist() == list(range(63, -1, -1))
    # Threads that exited do not hold the barrier up.
    assert run(emu, "sync", [3])[:32].tolist() == list(range(31, -1, -1))


def test_missing_barrier_reads_nan_poisoned_shared_memory(emu):
    emu.set_schedule("forward", 0)  # thread 0 reads sh[63] before thread 63 has run
    assert torch.isnan(run(emu, "sync", [1])[0])


def test_threads_at_different_barriers_are_an_error(emu):
    with pytest.raises(RuntimeError, match=r"different __syncthreads: .*selftest.cu:\d+.*"
                                           r"selftest.cu:\d+"):
        run(emu, "sync", [2])


def test_write_past_a_shared_array_is_an_error(emu):
    with pytest.raises(RuntimeError, match=r"wrote past the end of the __shared__ array of "
                                           r"tests/cuda_emu/selftest.cu:\d+ \(256 bytes\)"):
        run(emu, "sync", [4])


def test_shared_memory_and_outputs_start_as_nan(emu):
    assert torch.isnan(run(emu, "sync", [5])).all()  # static shared memory
    assert torch.isnan(run(emu, "smem")).all()  # dynamic shared memory
    assert torch.isnan(run(emu, "untouched")).all()  # an output no kernel writes


def shfl_model(op, mask, arg, width, lane):
    """What a GPU returns to `lane`: the source lane's number, or NaN (undefined) when the
    source lane is not in the mask."""
    base = lane // width * width
    src = {0: base + arg % width,
           1: lane - arg if lane - arg >= base else lane,
           2: lane + arg if lane + arg < base + width else lane,
           3: lane ^ arg if (lane ^ arg) < base + width else lane}[op]
    return float(src) if mask >> src & 1 else math.nan


@pytest.mark.parametrize("order", ORDERS)
@pytest.mark.parametrize("op,mask,arg,width", [
    (0, 0xFFFFFFFF, 5, 32), (0, 0xFFFFFFFF, 3, 8), (1, 0xFFFFFFFF, 1, 32), (1, 0xFFFFFFFF, 2, 4),
    (2, 0xFFFFFFFF, 16, 32), (2, 0xFFFFFFFF, 1, 16), (3, 0xFFFFFFFF, 7, 32), (3, 0xFFFFFFFF, 1, 2),
    (2, 0x0000FFFF, 1, 32), (0, 0x0000FFFF, 20, 32)])
def test_shuffles(emu, order, op, mask, arg, width):
    emu.set_schedule(order, 3)
    out = run(emu, "shfl", [op, mask, arg, width, 0 if mask == 0xFFFFFFFF else 16])
    lanes = [t for t in range(64) if mask >> t % 32 & 1]
    want = torch.tensor([shfl_model(op, mask, arg, width, t % 32) for t in lanes])
    torch.testing.assert_close(out[lanes], want, equal_nan=True, rtol=0, atol=0)


def test_exited_lane_named_in_a_mask_is_an_error(emu):
    with pytest.raises(RuntimeError, match=r"__shfl_down_sync \(tests/cuda_emu/selftest.cu:\d+\)"
                                           r".*lane 31 of its mask 0xffffffff has exited"):
        run(emu, "shfl", [2, 0xFFFFFFFF, 1, 32, 1])


def test_mask_without_the_calling_lane_is_an_error(emu):
    with pytest.raises(RuntimeError, match="does not name its own lane"):
        run(emu, "shfl", [0, 0x0000FFFF, 0, 32, 0])


def test_shuffle_while_other_lanes_wait_at_a_barrier_is_a_deadlock(emu):
    with pytest.raises(RuntimeError, match="deadlock"):
        run(emu, "shfl", [4, 0, 0, 32, 0])


def test_translator_keeps_lines_and_rewrites_only_launches_and_shared():
    src = ("template <typename T>\n__global__ void k(T* p) {\n  __shared__ T s[4][8];\n"
           "  extern __shared__ __align__(16) unsigned char d[];\n}\n"
           "void f(float* p) {\n  k<float><<<dim3(1, 2),\n    32, 0, s>>>(p);  \n}\n")
    out = translate.translate(src, "x.cu").split("\n")
    assert out[0] == '#line 1 "x.cu"' and len(out) == src.count("\n") + 2
    assert out[3] == "  auto& s = *::cuemu::shared<T[4][8]>(__FILE__, __LINE__);"
    assert out[4] == ("  unsigned char* const d = static_cast<unsigned char*>"
                      "(::cuemu::dynamic_shared());")
    assert "[&] { k<float>(p); }, dim3(1, 2),     32, 0, s)" in out[7] and out[8] == ";  "
    assert out[1:3] == src.split("\n")[:2]
    with pytest.raises(translate.TranslateError, match="x.cu:1: a __shared__ declaration"):
        translate.translate("__shared__ int a = 3;\n", "x.cu")


def test_every_launch_site_of_csrc_cuda_runs(emu):
    """Every <<<>>> of csrc/cuda launches when the ops run: dwconv3 and the global neck path (map),
    grad_weight (reduce, finish), the neck tile."""
    root = Path(__file__).resolve().parents[1]
    sites = {f"csrc/cuda/{f.name}:{i}" for f in (root / "csrc" / "cuda").iterdir()
             for i, line in enumerate(f.read_text().split("\n"), 1) if "<<<" in line}
    assert len(sites) >= 4
    emu.launch_counts(True)
    x = torch.randn(2, 3, 20, 20, dtype=torch.float64)
    w = torch.randn(3, 1, 3, 1, dtype=torch.float64)
    emu.dwconv3_backward(x, x, w, 1, [True, True])
    neck = [torch.randn(4, 3, 3), *(torch.randn(4, 3) for _ in range(2)),
            *(torch.randn(3) for _ in range(3))]
    for d in (2, 17):  # the tile, then the global-memory path
        emu.dab_neck(x, *(t.double() for t in neck), d)
    launched = {s.rsplit(" ", 1)[0] for s in emu.launch_counts(True)}
    assert sites <= launched, f"never launched: {sorted(sites - launched)}"


def test_failed_launch_without_a_launch_check_fails_the_op(emu):
    with pytest.raises(RuntimeError, match=r"no launch check caught it: launch at "
                                           r"tests/cuda_emu/selftest.cu:\d+: grid \(1,70000,1\)"):
        run(emu, "unchecked")
    assert run(emu, "sync", [0])[0] == 63  # the next op starts clean
