"""Timing done one way everywhere.

GPU: CUDA events around each call, the L2 cache flushed before each (triton.testing.do_bench when
Triton is there, the same loop by hand otherwise), warm-up first, median and quartiles reported.
CPU: torch.utils.benchmark.Timer.blocked_autorange (all threads torch uses), median and quartiles
of its blocks; inputs rotate over enough copies to overflow the last-level cache (see rotate()).
"""
from __future__ import annotations

import itertools
import math
import random
import time
from dataclasses import asdict, dataclass

import torch
import torch.utils.benchmark as tb


@dataclass
class Stats:
    median_ms: float
    q25_ms: float
    q75_ms: float
    n: int  # timed calls (GPU) or timed blocks (CPU)
    timer: str

    @property
    def iqr_ms(self) -> float:
        return self.q75_ms - self.q25_ms

    def as_dict(self) -> dict:
        d = asdict(self)
        d["iqr_ms"] = self.iqr_ms
        return d


@dataclass
class Budget:
    """How long to spend per measurement: GPU warm-up / repeat windows (ms, do_bench's meaning),
    CPU minimum run time (s)."""
    gpu_warmup_ms: float = 25.0
    gpu_rep_ms: float = 100.0
    cpu_min_run_s: float = 0.2

    def scaled(self, f: float) -> "Budget":
        return Budget(self.gpu_warmup_ms * f, self.gpu_rep_ms * f, self.cpu_min_run_s * f)


def quantiles(xs):
    xs = sorted(xs)

    def q(p):  # linear interpolation, numpy's default
        k = (len(xs) - 1) * p
        lo, hi = math.floor(k), math.ceil(k)
        return xs[lo] + (xs[hi] - xs[lo]) * (k - lo)

    return q(0.25), q(0.5), q(0.75)


ROUND_ORDER = "shuffled"  # what round_order does, as results files record it


def round_order(names, r):
    """The order of round r of an interleaved benchmark: names shuffled, seeded by r (the same
    orders in every run), so that no variant always runs first or right after the same other one.
    A rotation (the order until 2026-12-07) kept each variant behind the same predecessor in
    every round, and what ran just before moves a short memory-bound call more than a long
    compute-bound one (in one A/B at 256x512: the frozen bf16 model at 1.39x its floor when a
    torch.compile'd forward ran before each call, 1.25x when nothing did)."""
    order = list(names)
    random.Random(r).shuffle(order)
    return order


def paired_speedup(base_times, times):
    """The median over rounds of base's time over the variant's, in the same round: a ratio that
    a machine speeding up or slowing down between rounds does not move."""
    return quantiles([b / t for b, t in zip(base_times, times)])[1]


def _gpu_events(fn, warmup_ms, rep_ms):
    """do_bench's method without Triton: estimate, warm up, time each call after an L2 flush."""
    flush = torch.empty(256 << 20, dtype=torch.int8, device="cuda")
    fn()
    torch.cuda.synchronize()
    s, e = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
    s.record()
    for _ in range(5):
        flush.zero_()
        fn()
    e.record()
    torch.cuda.synchronize()
    est = max(s.elapsed_time(e) / 5, 1e-3)
    for _ in range(max(1, int(warmup_ms / est))):
        fn()
    n = max(5, int(rep_ms / est))
    starts = [torch.cuda.Event(enable_timing=True) for _ in range(n)]
    ends = [torch.cuda.Event(enable_timing=True) for _ in range(n)]
    for i in range(n):
        flush.zero_()  # each call starts with a cold L2, as in a real network
        starts[i].record()
        fn()
        ends[i].record()
    torch.cuda.synchronize()
    return [a.elapsed_time(b) for a, b in zip(starts, ends)]


def time_gpu(fn, budget: Budget) -> Stats:
    try:
        from triton.testing import do_bench
    except Exception:  # no Triton: the same method by hand
        times = _gpu_events(fn, budget.gpu_warmup_ms, budget.gpu_rep_ms)
        q25, med, q75 = quantiles(times)
        return Stats(med, q25, q75, len(times), "cuda-events+l2-flush")
    try:
        times = do_bench(fn, warmup=budget.gpu_warmup_ms, rep=budget.gpu_rep_ms,
                         return_mode="all")
        q25, med, q75 = quantiles(times)
        n = len(times)
    except (AssertionError, TypeError):  # older Triton: no return_mode="all"
        q25, med, q75 = do_bench(fn, warmup=budget.gpu_warmup_ms, rep=budget.gpu_rep_ms,
                                 quantiles=[0.25, 0.5, 0.75])
        n = 0
    return Stats(med, q25, q75, n, "triton.testing.do_bench(l2-flush)")


def time_cpu(fn, budget: Budget) -> Stats:
    """Blocks of `number` calls timed by torch.utils.benchmark.Timer, sized so that the budget
    holds about 20 of them (at least 5, or 3 when a single call outlasts the budget)."""
    timer = tb.Timer(stmt="fn()", globals={"fn": fn}, num_threads=torch.get_num_threads())
    one = timer.timeit(1).times[0]  # warm-up and first estimate
    if one < budget.cpu_min_run_s:  # a second warm-up call only where it is cheap
        one = min(one, timer.timeit(1).times[0])
    number = max(1, int(budget.cpu_min_run_s / 20 / max(one, 1e-7)))
    times, t0 = [], time.perf_counter()
    min_blocks = 3 if one > budget.cpu_min_run_s else 5
    while len(times) < min_blocks or time.perf_counter() - t0 < budget.cpu_min_run_s:
        times.append(timer.timeit(number).times[0] * 1e3)  # per-call ms, averaged over the block
    q25, med, q75 = quantiles(times)
    return Stats(med, q25, q75, len(times), f"torch.utils.benchmark.Timer(blocks of {number})")


def time_fn(fn, device: str, budget: Budget) -> Stats:
    return time_gpu(fn, budget) if device == "cuda" else time_cpu(fn, budget)


def first_call_s(fn, device: str) -> float:
    """Wall time of one call, synchronized: the compile time of a torch.compile'd function."""
    sync = torch.cuda.synchronize if device == "cuda" else (lambda: None)
    sync()
    t0 = time.perf_counter()
    fn()
    sync()
    return time.perf_counter() - t0


def rotate(make, set_bytes: int, device: str, cache_bytes: int, max_sets: int = 16):
    """Input sets to cycle through so that repeated calls do not run from a warm cache.

    On GPU the timer flushes L2 itself, so one set is enough. On CPU, enough sets to hold twice
    the last-level cache (each call then reads data the previous calls evicted).
    make(i) builds set i. Returns (sets, next_set) where next_set() yields them in turn.
    """
    if device == "cuda":
        n = 1
    else:
        n = max(1, min(max_sets, math.ceil(2 * cache_bytes / max(set_bytes, 1))))
    sets = [make(i) for i in range(n)]
    cyc = itertools.cycle(sets)
    return sets, (lambda: next(cyc))


def copy_bandwidth_gbs(device: str, budget: Budget, nbytes: int | None = None) -> dict:
    """The machine's measured copy bandwidth: dst.copy_(src) on a large tensor, counting the bytes
    read plus the bytes written, in GB/s (1e9 bytes)."""
    if nbytes is None:
        nbytes = (1 << 30) if device == "cuda" else (256 << 20)
    src = torch.empty(nbytes // 4, dtype=torch.float32, device=device).uniform_()
    dst = torch.empty_like(src)
    st = time_fn(lambda: dst.copy_(src), device, budget)
    gbs = 2 * nbytes / (st.median_ms * 1e-3) / 1e9
    return {"gbs": gbs, "bytes": nbytes, "stats": st.as_dict()}
