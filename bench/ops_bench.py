"""Runs the op benchmark cases: each backend of ours against the reference and torch.compile."""
from __future__ import annotations

import gc
import time

import torch

from dabnet_kernels import reference
from dabnet_kernels.backend import triton_available, use_backend

from . import cases as C
from .progress import progress_bar
from .timing import Budget, first_call_s, rotate, time_fn


def backends_for(device: str):
    """Our backends that run on this device: the C++ kernels on CPU; the CUDA kernels (when built)
    and Triton on GPU. (Triton on CPU is only an interpreter: never timed.)"""
    if device != "cuda":
        return ["cpu"]
    from dabnet_kernels import has_cuda_kernels

    out = ["cuda"] if has_cuda_kernels() else []
    if triton_available():
        out.append("triton")
    return out


def wants_compile(case: C.OpCase, device: str, setting: str) -> bool:
    """"all": every case; "none": none; "key": the key shapes (C.is_key), on CPU further narrowed to
    fp32 NCHW at dilations 2 and 4 (one per block), since each compile costs seconds there."""
    if setting == "all":
        return True
    if setting != "key" or not C.is_key(case):
        return False
    if device == "cuda":
        return True
    return (case.dtype, case.layout) == ("fp32", "nchw") and case.dilation in (0, 2, 4)


def _outputs(case, fwd, t):
    """Forward output and, for fwd+bwd, every gradient: what correctness is judged on."""
    res = C.runner(case, fwd)(t)
    if case.mode == "fwd":
        return [res]
    return [fwd(t).detach(), *res]


def _max_abs_err(a, b):
    errs = [(x.float() - y.float()).abs().max().item() for x, y in zip(a, b)
            if x is not None and y is not None]
    return max(errs) if errs else None


def _max_rel_err(a, b):
    """Per tensor, max abs error over max |reference| (gradients summed over a batch are large,
    so their absolute error alone says little); the worst tensor."""
    errs = [(x.float() - y.float()).abs().max().item() / max(y.float().abs().max().item(), 1e-30)
            for x, y in zip(a, b) if x is not None and y is not None]
    return max(errs) if errs else None


def _sync(device):
    if device == "cuda":
        torch.cuda.synchronize()


def run_case(case: C.OpCase, device: str, backends, compiled: bool, budget: Budget,
             cache_bytes: int, copy_gbs: float | None) -> dict:
    rec = case.as_dict()
    rec["impls"] = {}
    sets, nxt = rotate(lambda i: C.prepare(case, C.make_inputs(case, device, seed=i)),
                       C.set_bytes(case), device, cache_bytes)
    rec["input_sets"] = len(sets)
    ref_fwd = lambda t: C.forward(reference, case, t)  # noqa: E731
    ref_out = _outputs(case, ref_fwd, sets[0])
    fwds = C.impl_forwards(case, device, backends, compiled)
    for name, fwd in fwds.items():
        backend = name.split(":")[0] if name not in ("reference", "compile") else "reference"
        r = {}
        try:
            with use_backend(backend):
                if name.endswith(":prefolded"):
                    fwd = C.prefolded(case, sets[0], backend)
                if fwd == "compile":
                    torch._dynamo.reset()  # a fresh compile per case: no recompile-limit fallback
                    fwd = torch.compile(ref_fwd, dynamic=False)
                    run = C.runner(case, fwd)
                    r["compile_s"] = first_call_s(lambda: run(sets[0]), device)
                if name != "reference":
                    got = _outputs(case, fwd, sets[0])
                    r["max_abs_err"] = _max_abs_err(got, ref_out)
                    r["max_rel_err"] = _max_rel_err(got, ref_out)
                    del got
                run = C.runner(case, fwd)
                st = time_fn(lambda: run(nxt()), device, budget)
            r.update(st.as_dict())
            r["gbs"] = case.min_bytes() / (st.median_ms * 1e-3) / 1e9
            if copy_gbs:
                r["pct_of_copy"] = 100.0 * r["gbs"] / copy_gbs
        except Exception as e:  # one failing impl must not end the run: recorded, reported
            r["error"] = f"{type(e).__name__}: {str(e).splitlines()[0] if str(e) else ''}"[:300]
        rec["impls"][name] = r
        _sync(device)
    ref_ms = rec["impls"].get("reference", {}).get("median_ms")
    comp_ms = rec["impls"].get("compile", {}).get("median_ms")
    for name, r in rec["impls"].items():
        if name in ("reference", "compile") or "median_ms" not in r:
            continue
        if ref_ms:
            r["speedup_vs_reference"] = ref_ms / r["median_ms"]
        if comp_ms:
            r["speedup_vs_compile"] = comp_ms / r["median_ms"]
    del sets, ref_out
    gc.collect()
    if device == "cuda":
        torch.cuda.empty_cache()
    return rec


def run_cases(cases, device: str, budget: Budget, compile_setting: str, cache_bytes: int,
              copy_gbs: float | None, on_result=None, progress=True, deadline=None):
    """Runs every case; on_result(rec) is called after each (the caller saves as it goes).
    With a deadline (time.time() value), no case starts after it: fewer records come back."""
    backends = backends_for(device)
    out = []
    bar = progress_bar(progress, cases, desc=f"ops on {device}", unit="case")
    for case in bar:
        if deadline is not None and time.time() > deadline:
            break
        bar.set_postfix_str(f"{case.op} {case.mode} {case.label()}", refresh=False)
        rec = run_case(case, device, backends, wants_compile(case, device, compile_setting),
                       budget, cache_bytes, copy_gbs)
        out.append(rec)
        if on_result:
            on_result(rec)
    return out
