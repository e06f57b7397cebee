"""Exported DABNet against the fused eager model on CPU: what deployment removes (Python's
per-op overhead, measured earlier at 6-7 ms a forward) and what it costs.

Rows, all fp32, batch 1, on the same pixel-value input (dabnet.export.Deployed: the mean
subtraction inside): the fused eager model (channels_last), the AOTInductor package (.pt2,
dynamic H/W, run from Python with torch._inductor.aoti_load_package) and onnxruntime on the
.onnx (CPU provider). Timed in interleaved rounds (each row once per round, order shuffled), as
bench.run's interleaved table; the speedup of a row is the median over rounds of fused-eager's
time over the row's time in the same round.

    python -m bench.deploy_bench                           # 512x1024, 30 rounds
    python -m bench.deploy_bench --res 64x128 --rounds 3   # smoke run (still two exports)

glibc's malloc is tuned first (dabnet_kernels.tune_malloc, as bench.run; --default-malloc keeps
its defaults); the results file records the setting.

Writes bench/results/<date>-cpu-deploy.json (or --out). The exports take minutes (AOTInductor).
"""
from __future__ import annotations

import argparse
import datetime as _dt
import json
import os
import tempfile
import time

import torch

from . import machine
from .run import RESULTS_DIR, _parse_res
from .timing import paired_speedup, quantiles, round_order


def _rows(res, workdir, log):
    """{name: callable on the input} for the fused eager model, the .pt2 and the .onnx."""
    from dabnet import DABNet
    from dabnet.data import dataset_info
    from dabnet.export import Deployed, export, load_package, onnx_runner

    torch.manual_seed(0)
    model = DABNet(19, fused=True).eval()
    meta = {"dataset": "cityscapes"}
    eager = Deployed(model, dataset_info("cityscapes").mean, channels_last=True)
    paths = {}
    for fmt in ("pt2", "onnx"):
        paths[fmt] = os.path.join(workdir, f"dabnet.{fmt}")
        export(None, paths[fmt], size=res, model=model, meta=meta, check=False, log=log)
    package = load_package(paths["pt2"])
    return {"fused eager (channels_last)": eager, "AOTInductor package (.pt2)": package,
            "onnxruntime (.onnx)": onnx_runner(paths["onnx"], spin=False)}  # see onnx_runner


def bench(res, rounds, log=print) -> dict:
    x = torch.rand(1, 3, *res) * 255
    with tempfile.TemporaryDirectory() as workdir, torch.no_grad():
        rows = _rows(res, workdir, log)
        for fn in rows.values():
            fn(x)  # warm
        names = list(rows)
        times = {n: [] for n in names}
        for r in range(rounds):
            for n in round_order(names, r):
                t0 = time.perf_counter()
                rows[n](x)
                times[n].append(time.perf_counter() - t0)
    base = times[names[0]]
    out = []
    for n in names:
        q1, med, q3 = quantiles(times[n])
        out.append({"variant": n, "median_ms": med * 1e3, "q1_ms": q1 * 1e3, "q3_ms": q3 * 1e3,
                    "min_ms": min(times[n]) * 1e3,
                    "speedup_vs_fused_eager": paired_speedup(base, times[n])})
    return {"res": list(res), "rounds": rounds, "rows": out}


def main(argv=None):
    p = argparse.ArgumentParser(prog="python -m bench.deploy_bench", description=__doc__,
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--res", type=_parse_res, default=[(512, 1024)],
                   help="HxW (default 512x1024)")
    p.add_argument("--rounds", type=int, default=30, help="timed rounds (default 30)")
    p.add_argument("--out", help="results file (default bench/results/<date>-cpu-deploy.json)")
    p.add_argument("--default-malloc", action="store_true", help=machine.MALLOC_HELP)
    a = p.parse_args(argv)
    machine.apply_malloc(a.default_malloc)  # as bench.run: the eager rows fault far less
    res = bench(a.res[0], a.rounds)
    res["kind"] = "deploy"  # bench.report's tables skip it (they render bench.run's files)
    res["machine"] = machine.info("cpu")
    res["date"] = _dt.datetime.now(_dt.timezone.utc).isoformat(timespec="seconds")
    for row in res["rows"]:
        print(f"{row['variant']:32s} {row['median_ms']:9.2f} ms (q1 {row['q1_ms']:.2f}, q3 "
              f"{row['q3_ms']:.2f})  x{row['speedup_vs_fused_eager']:.2f}")
    path = a.out or os.path.join(RESULTS_DIR, f"{_dt.date.today()}-cpu-deploy.json")
    with open(path, "w") as f:
        json.dump(res, f, indent=1)
    print(f"wrote {path}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
