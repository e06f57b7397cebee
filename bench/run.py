"""Runs every benchmark this machine can run and writes bench/results/<date>-<device>.json plus
PNG plots next to it.

    python -m bench.run                  # default set (CPU: ~10 min on 2 cores)
    python -m bench.run --quick          # a few shapes, under a minute; prints the short table
    python -m bench.run --full           # every shape, dtype and layout (long)
    python -m bench.run --device cuda    # default: cuda when a GPU is visible, else cpu

What runs: the machine's copy bandwidth (a large tensor copy, bytes read + written); the op
micro-benchmarks (dwconv3, bn_prelu, dwconv3_bn_prelu, dab_neck; inference forward and training
forward+backward) of every backend of ours against the reference and torch.compile of it, at
DABNet's real shapes; DABNet inference at the paper's Table 5 resolutions and one training step,
fused against unfused; then every inference variant at 512x1024 once more, interleaved (each
called once per round, rotating order: the fairest comparison on a machine whose speed drifts).
The results file is rewritten after every case, so an interrupted run
leaves what it measured ("complete": false).
"""
from __future__ import annotations

import argparse
import datetime as _dt
import json
import os
import shlex
import sys
import time

import torch

from .machine import MALLOC_HELP

RESULTS_DIR = os.path.join(os.path.dirname(os.path.abspath(__file__)), "results")


def _parse(argv):
    p = argparse.ArgumentParser(prog="python -m bench.run", description=__doc__,
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    size = p.add_mutually_exclusive_group()
    size.add_argument("--quick", action="store_true",
                      help="a few shapes per op, no torch.compile, DABNet inference at one "
                           "resolution; prints the short ops-vs-reference table")
    size.add_argument("--full", action="store_true",
                      help="every resolution, batch, dilation, orientation, dtype and layout")
    p.add_argument("--device", choices=("cpu", "cuda"), default=None,
                   help="where to run (default: cuda if a GPU is visible, else cpu)")
    p.add_argument("--compile", choices=("none", "key", "all"), default=None,
                   help="which op cases also time torch.compile of the reference (default: key "
                        "shapes; none with --quick); none also drops DABNet's compiled runs")
    p.add_argument("--only", choices=("ops", "model", "interleaved"), default=None,
                   help="run one part only; interleaved: the model's target variants (fp32 "
                        "baselines, fused and frozen in fp32 and bf16, the dense-convolution "
                        "floors) in interleaved rounds at each resolution (CPU: 256x512, "
                        "512x1024, 1024x2048; --res to choose)")
    p.add_argument("--time-limit", type=float, default=None, metavar="S",
                   help="stop starting new work after about S seconds: op cases (key shapes "
                        "first) until 55%% of it, DABNet until 95%%; what was skipped is counted "
                        "in the results file")
    p.add_argument("--budget-scale", type=float, default=1.0,
                   help="multiply every timing window by this (e.g. 0.2 for a smoke test)")
    p.add_argument("--res", default=None,
                   help="replace the input resolution(s), e.g. 64x128 or 64x128,128x256 (smoke "
                        "tests; the results file then says so)")
    p.add_argument("--out", default=None, help=f"results folder (default {RESULTS_DIR})")
    p.add_argument("--name", default=None, help="results file stem (default <date>-<device>)")
    p.add_argument("--no-cudnn-benchmark", action="store_true",
                   help="leave torch.backends.cudnn.benchmark off (default on GPU: on, so the "
                        "cuDNN baselines use their fastest algorithm, as a tuned model would)")
    p.add_argument("--dry-run", action="store_true",
                   help="print what would run (case counts per op and mode, compiles, DABNet "
                        "runs) and exit")
    p.add_argument("--no-plots", action="store_true", help="skip the PNG plots")
    p.add_argument("--no-progress", action="store_true", help="no progress bars")
    p.add_argument("--default-malloc", action="store_true", help=MALLOC_HELP)
    return p.parse_args(argv)


def _parse_res(text):
    out = []
    for part in text.split(","):
        try:
            h, w = (int(v) for v in part.lower().split("x"))
        except ValueError:
            raise SystemExit(f"--res: expected HxW[,HxW...] (e.g. 64x128), got {text!r}")
        if h % 8 or w % 8 or h <= 0 or w <= 0:
            raise SystemExit(f"--res: {part} must be positive multiples of 8 (DABNet downsamples "
                             f"by 8)")
        out.append((h, w))
    return out


def _override_res(cases, resolutions):
    """The same cases at other resolutions (deduplicated, order kept)."""
    from dataclasses import replace

    seen, out = set(), []
    for c in cases:
        for r in resolutions:
            c2 = replace(c, res=r)
            if c2 not in seen:
                seen.add(c2)
                out.append(c2)
    return out


def plan(args, device):
    """What to run: op cases, compile setting, model resolutions, training step shape."""
    from . import cases as C

    if args.quick:
        ops_cases = C.quick_cases(device)
        compile_setting = args.compile or "none"
        inf_res = [(512, 1024)] if device == "cuda" else [(256, 512)]
        compile_res, train = [], None
        interleave_res = None
    else:
        ops_cases = C.default_cases(device, full=args.full)
        compile_setting = args.compile or "key"
        if device == "cuda":
            inf_res = list(C.RESOLUTIONS)
            compile_res = list(C.RESOLUTIONS) if args.full else [(512, 1024)]
            train = dict(res=(512, 1024), batch=8, layouts=["nchw", "cl"])
        else:
            # 512x1024 is the resolution the CPU targets are stated at (issue 7).
            inf_res = list(C.RESOLUTIONS) if args.full else [(256, 512), (512, 1024)]
            compile_res = [(256, 512), (512, 1024)]
            train = dict(res=(256, 512), batch=8 if args.full else 2, layouts=["nchw"])
        interleave_res = (512, 1024)  # the resolution of issue 7's whole-model target
    if compile_setting == "none":
        compile_res = []
    if args.res:
        rs = _parse_res(args.res)
        ops_cases = _override_res(ops_cases, rs)
        inf_res, compile_res = rs, (rs[:1] if compile_res else [])
        interleave_res = rs[0] if interleave_res else None
        if train:
            train["res"] = rs[0]
    return dict(ops_cases=ops_cases, compile=compile_setting, inference_res=inf_res,
                compile_res=compile_res, train=train, interleave_res=interleave_res)


def describe_plan(p, device) -> str:
    from collections import Counter

    from .model_bench import inference_variants
    from .ops_bench import wants_compile

    cases = p["ops_cases"]
    per = Counter((c.op, c.mode) for c in cases)
    comp = sum(wants_compile(c, device, p["compile"]) for c in cases)
    lines = [f"op cases on {device}: {len(cases)} ({comp} also with torch.compile, "
             f"setting {p['compile']!r})"]
    lines += [f"  {op:17s} {mode:8s} {n}" for (op, mode), n in per.items()]
    n_inf = sum(len(inference_variants(device, r in p["compile_res"]))
                for r in p["inference_res"])
    lines.append(f"DABNet inference: {n_inf} runs at "
                 + ", ".join(f"{h}x{w}" for h, w in p["inference_res"])
                 + (f" (torch.compile at {', '.join(f'{h}x{w}' for h, w in p['compile_res'])})"
                    if p["compile_res"] else ""))
    if p["interleave_res"]:
        h, w = p["interleave_res"]
        lines.append(f"DABNet inference interleaved at {h}x{w}: every variant once per round, "
                     "rotating order" + (" (no torch.compile variants on GPU)"
                                         if device == "cuda" else ""))
    t = p["train"]
    lines.append("DABNet training step: " + (
        f"batch {t['batch']} at {t['res'][0]}x{t['res'][1]}, layouts {t['layouts']}, fused and "
        "unfused" if t else "none"))
    return "\n".join(lines)


def results_path(args, machine):
    """<date>-<device>[-quick|-full|-smoke].json; a later run the same day gets -<HHMM> (UTC)
    appended instead of overwriting the earlier record (--name overwrites as asked)."""
    now = _dt.datetime.now(_dt.timezone.utc)
    stem = args.name or f"{now:%Y-%m-%d}-{machine['slug']}" + ("-quick" if args.quick else "") + (
        "-full" if args.full else "") + ("-smoke" if args.res else "")
    path = os.path.join(args.out or RESULTS_DIR, stem + ".json")
    if not args.name and os.path.exists(path):
        path = os.path.join(args.out or RESULTS_DIR, f"{stem}-{now:%H%M}.json")
    return path


def save(res, path):
    os.makedirs(os.path.dirname(path), exist_ok=True)
    tmp = path + ".tmp"
    with open(tmp, "w") as f:
        json.dump(res, f, indent=1)
    os.replace(tmp, path)


def main(argv=None):
    args = _parse(sys.argv[1:] if argv is None else argv)
    device = args.device or ("cuda" if torch.cuda.is_available() else "cpu")
    if device == "cuda" and not torch.cuda.is_available():
        raise SystemExit("--device cuda: no CUDA GPU is visible to PyTorch")

    from . import machine, model_bench, ops_bench, report
    from .timing import Budget, copy_bandwidth_gbs

    if args.dry_run:
        print(describe_plan(plan(args, device), device))
        return 0

    machine.apply_malloc(args.default_malloc)
    if device == "cuda":
        torch.backends.cudnn.benchmark = not args.no_cudnn_benchmark
    budget = Budget().scaled(args.budget_scale * (0.5 if args.quick else 1.0))
    m = machine.info(device)
    p = plan(args, device)
    path = results_path(args, m)
    started = time.time()
    res = {
        "schema": 1,
        "date": _dt.datetime.now(_dt.timezone.utc).strftime("%Y-%m-%d %H:%M UTC"),
        "command": "python -m bench.run " + " ".join(shlex.quote(a) for a in (
            sys.argv[1:] if argv is None else argv)),
        "mode": "quick" if args.quick else ("full" if args.full else "default"),
        "only": args.only,
        "smoke_resolutions": args.res,
        "machine": m,
        "budget": vars(budget),
        "compile_setting": p["compile"],
        "cudnn_benchmark": torch.backends.cudnn.benchmark,
        "complete": False,
        # Other work on the machine skews CPU timings badly: the load is kept with the numbers.
        "loadavg_start": list(os.getloadavg()) if hasattr(os, "getloadavg") else None,
        "notes": [
            "times in ms: median and quartiles (IQR = q75 - q25) of per-call times (GPU) or of "
            "per-call means over timed blocks (CPU)",
            "gbs: minimum bytes (each input read once, each output written once) / median time",
            "pct_of_copy: gbs as % of this machine's measured copy bandwidth",
            "speedup_vs_reference / _vs_compile: baseline median / our median",
            "model 'fused' variants: dabnet.DABNet(fused=True); dabnet_kernel_calls is what one "
            "forward actually dispatched to dabnet ops (empty = plain PyTorch ops only)",
        ],
    }
    print(f"bench: {device} ({m['gpu_model'] or m['cpu_model']}), mode {res['mode']}, "
          f"{len(p['ops_cases'])} op cases, results -> {path}", file=sys.stderr)
    copy = copy_bandwidth_gbs(device, budget)
    res["copy_bandwidth"] = copy
    print(f"copy bandwidth: {copy['gbs']:.1f} GB/s", file=sys.stderr)
    save(res, path)

    limit = args.time_limit
    deadline = (lambda frac: None) if limit is None else (lambda frac: started + frac * limit)
    if args.only in (None, "ops"):
        from . import cases as C

        res["ops"] = []

        def on_result(rec):
            res["ops"].append(rec)
            save(res, path)

        # Key shapes first, so a time limit cuts the least telling cases.
        todo = sorted(p["ops_cases"], key=lambda c: not C.is_key(c))
        ops_bench.run_cases(todo, device, budget, p["compile"], m["last_level_cache_bytes"],
                            copy["gbs"], on_result, progress=not args.no_progress,
                            deadline=deadline(0.55 if args.only is None else 0.95))
        res["ops_skipped"] = len(todo) - len(res["ops"])
    if args.only == "interleaved":
        from .cases import RESOLUTIONS

        res["model"] = {"interleaved": []}
        for r in p["inference_res"] if args.res else RESOLUTIONS:
            res["model"]["interleaved"] += model_bench.bench_interleaved(
                device, r, budget.scaled(4.0), with_compile=p["compile"] != "none",
                progress=not args.no_progress, deadline=deadline(0.95),
                names=model_bench.TARGET_VARIANTS)
            save(res, path)
    if args.only in (None, "model"):
        inf = []
        res["model"] = {"inference": inf}

        def on_model(rec):
            inf.append(rec)
            save(res, path)

        common = dict(progress=not args.no_progress, deadline=deadline(0.95), on_result=on_model)
        mbudget = budget.scaled(4.0)
        # Plain runs, the training step, then the (slow to compile) torch.compile runs.
        model_bench.bench_inference(device, p["inference_res"], p["compile_res"], mbudget,
                                    which="plain", **common)
        if p["train"]:
            t = p["train"]
            res["model"]["train"] = model_bench.bench_train_step(
                device, t["res"], t["batch"], t["layouts"], budget.scaled(10.0),
                progress=not args.no_progress, deadline=deadline(0.95))
            save(res, path)
        res["model"]["conv_floor"] = model_bench.bench_conv_floor(
            device, p["inference_res"], mbudget, progress=not args.no_progress,
            deadline=deadline(0.95))
        save(res, path)
        if p["compile_res"]:
            model_bench.bench_inference(device, p["inference_res"], p["compile_res"], mbudget,
                                        which="compile", **common)
        save(res, path)
        if p["interleave_res"]:
            # On GPU without the compiled variants: compiling them again would cost minutes of
            # the GPU suite's ten, and CUDA-event timings drift far less than a shared CPU VM.
            res["model"]["interleaved"] = model_bench.bench_interleaved(
                device, p["interleave_res"], mbudget,
                with_compile=bool(p["compile_res"]) and device != "cuda",
                progress=not args.no_progress, deadline=deadline(0.95))
            save(res, path)
    cut = limit is not None and time.time() > deadline(0.95)
    res["complete"] = not res.get("ops_skipped") and not cut
    res["time_limit_reached"] = cut
    res["loadavg_end"] = list(os.getloadavg()) if hasattr(os, "getloadavg") else None
    res["time_limit_s"] = limit
    res["wall_s"] = time.time() - started
    save(res, path)
    plots = []
    if not args.no_plots:
        try:
            from . import plots as P

            plots = P.plot_all(res, path)
        except Exception as e:  # plots are a convenience; the numbers are saved already
            print(f"plots failed: {type(e).__name__}: {e}", file=sys.stderr)
    if args.quick:
        print(report.quick_table(res))
    elif res.get("ops"):
        print(report.ops_table(res, level="compact"))
    if res.get("model"):
        print(report.model_tables(res))
    print(f"\nwrote {path}" + "".join(f"\nwrote {q}" for q in plots))
    return 0


if __name__ == "__main__":
    sys.exit(main())
