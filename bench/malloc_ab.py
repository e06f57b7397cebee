"""What dabnet_kernels.tune_malloc() changes: DABNet CPU inference with glibc's default malloc
settings against the tuned ones, each in fresh processes (a process's heap cannot be untuned),
alternating, so that drift of the machine hits both alike.

    python -m bench.malloc_ab                   # 3 pairs, fused and eager, fp32 channels_last
    python -m bench.malloc_ab --pairs 5 --res 256x512

Per process: warm-up forwards, then timed forwards (median) and the page faults per forward
(getrusage). Writes bench/results/<date>-malloc-ab-<machine>.json.
"""
from __future__ import annotations

import argparse
import datetime as _dt
import json
import os
import statistics
import subprocess
import sys

RESULTS_DIR = os.path.join(os.path.dirname(os.path.abspath(__file__)), "results")

# One measurement, in a child process: argv = tuned(0/1) fused(0/1) H W warmup iters.
_CHILD = """
import resource, sys, time, torch
tuned, fused, H, W, warm, iters = (int(v) for v in sys.argv[1:])
import dabnet, dabnet_kernels
if tuned:
    assert dabnet_kernels.tune_malloc()
m = dabnet.DABNet(fused=bool(fused)).eval().to(memory_format=torch.channels_last)
x = torch.randn(1, 3, H, W).contiguous(memory_format=torch.channels_last)
with torch.inference_mode():
    for _ in range(warm):
        out = m(x)
    f0, ts = resource.getrusage(resource.RUSAGE_SELF).ru_minflt, []
    for _ in range(iters):
        t = time.perf_counter(); out = m(x); ts.append(time.perf_counter() - t)
    faults = (resource.getrusage(resource.RUSAGE_SELF).ru_minflt - f0) / iters
ts.sort()
print(ts[len(ts) // 2] * 1e3, faults)
"""


def _measure(tuned, fused, res, warm, iters):
    out = subprocess.run([sys.executable, "-c", _CHILD, str(int(tuned)), str(int(fused)),
                          str(res[0]), str(res[1]), str(warm), str(iters)],
                         capture_output=True, text=True, check=True)
    ms, faults = (float(v) for v in out.stdout.split()[-2:])
    return ms, faults


def main(argv=None):
    p = argparse.ArgumentParser(prog="python -m bench.malloc_ab", description=__doc__,
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--pairs", type=int, default=3, help="process pairs per model (default 3)")
    p.add_argument("--res", default="512x1024", help="input HxW (default 512x1024)")
    p.add_argument("--warmup", type=int, default=10, help="untimed forwards per process")
    p.add_argument("--iters", type=int, default=20, help="timed forwards per process")
    p.add_argument("--out", default=RESULTS_DIR, help=f"results folder (default {RESULTS_DIR})")
    args = p.parse_args(argv)
    from .run import _parse_res

    resolutions = _parse_res(args.res)
    if len(resolutions) != 1:
        raise SystemExit(f"--res: one HxW, got {args.res!r}")
    res = resolutions[0]
    if args.pairs < 1 or args.iters < 1 or args.warmup < 0:
        raise SystemExit("--pairs and --iters must be >= 1, --warmup >= 0")

    from . import machine

    m = machine.info("cpu")
    rec = {"kind": "malloc_ab",
           "date": _dt.datetime.now(_dt.timezone.utc).strftime("%Y-%m-%d %H:%M UTC"),
           "command": "python -m bench.malloc_ab " + " ".join(sys.argv[1:] if argv is None
                                                              else argv),
           "machine": {k: v for k, v in m.items() if k != "malloc"},
           "resolution": list(res), "warmup": args.warmup, "iters": args.iters,
           "notes": ["each run is a fresh process: median forward ms over iters, minor page "
                     "faults per forward; runs alternate default/tuned", "model fp32, "
                     "channels_last, batch 1; fused = dabnet.DABNet(fused=True)"],
           "models": {}}
    for fused in (True, False):
        name = "fused" if fused else "eager"
        runs = {"default": [], "tuned": []}
        for i in range(args.pairs):
            for tuned in (False, True):
                ms, faults = _measure(tuned, fused, res, args.warmup, args.iters)
                runs["tuned" if tuned else "default"].append({"ms": ms, "faults": faults})
                print(f"{name} pair {i + 1}/{args.pairs} {'tuned' if tuned else 'default'}: "
                      f"{ms:.1f} ms, {faults:.0f} faults/forward", file=sys.stderr, flush=True)
        summary = {k: {"median_ms": statistics.median(r["ms"] for r in v),
                       "median_faults": statistics.median(r["faults"] for r in v)}
                   for k, v in runs.items()}
        summary["speedup"] = summary["default"]["median_ms"] / summary["tuned"]["median_ms"]
        rec["models"][name] = {"runs": runs, "summary": summary}
        print(f"{name}: default {summary['default']['median_ms']:.1f} ms, tuned "
              f"{summary['tuned']['median_ms']:.1f} ms ({summary['speedup']:.2f}x)")
    os.makedirs(args.out, exist_ok=True)
    path = os.path.join(args.out, f"{rec['date'][:10]}-malloc-ab-{m['slug']}.json")
    with open(path, "w") as f:
        json.dump(rec, f, indent=1)
    print(f"wrote {path}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
