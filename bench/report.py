"""Performance tables, rendered from bench/results/*.json only: README.md and bench/README.md
state no number that a results file does not hold.

    python -m bench.report                      # markdown: full tables, the latest run per device
    python -m bench.report --summary            # markdown: README's one summary table
    python -m bench.report FILE.json ...        # markdown for these files
    python -m bench.report --write README.md bench/README.md
                                                # rewrite each file's marked sections (see below)
    python -m bench.report --write              # the same: README.md and bench/README.md
    python -m bench.report --level all          # every op case (default: a compact table)
    python -m bench.report --compare OLD NEW    # what got slower between two results files

--write rewrites, in each file it is given, what lies between the markers that file has:
<!-- bench:summary:start --> ... <!-- bench:summary:end --> gets the summary table (README.md),
<!-- bench:start --> ... <!-- bench:end --> the full tables (bench/README.md). Every file is
rendered from the same results in one call, so the summary and the full tables cannot disagree;
<!-- bench:history:start --> ... <!-- bench:history:end --> gets one row per run on record.
<!-- sass:summary:start --> ... <!-- sass:summary:end --> (README.md) and <!-- sass:start --> ...
<!-- sass:end --> (bench/README.md) get the static performance MODEL of sm_90 from the newest
kind=sm90-static file (python -m bench.sass): estimates, not measurements.
"""
from __future__ import annotations

import argparse
import glob
import json
import os
import re
import sys

from . import cases as C
from . import sass

START, END = "<!-- bench:start -->", "<!-- bench:end -->"
SUMMARY_START, SUMMARY_END = "<!-- bench:summary:start -->", "<!-- bench:summary:end -->"
HISTORY_START, HISTORY_END = "<!-- bench:history:start -->", "<!-- bench:history:end -->"
# The static performance MODEL of sm_90 (bench.sass, kind=sm90-static files): its compact table in
# README.md, its fuller tables in bench/README.md.
SASS_SUMMARY_START, SASS_SUMMARY_END = "<!-- sass:summary:start -->", "<!-- sass:summary:end -->"
SASS_START, SASS_END = "<!-- sass:start -->", "<!-- sass:end -->"
RESULTS_DIR = os.path.join(os.path.dirname(os.path.abspath(__file__)), "results")
REPO_DIR = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
# What `--write` without file names rewrites: README's summary and bench/README.md's full tables.
DEFAULT_WRITE = (os.path.join(REPO_DIR, "README.md"), os.path.join(REPO_DIR, "bench", "README.md"))
BASELINES = ("reference", "compile")


# ------------------------------------------------------------------------------ loading
def load(path: str) -> dict:
    with open(path) as f:
        res = json.load(f)
    res["_path"] = path
    return res


def all_runs(results_dir: str = RESULTS_DIR) -> list:
    """Every bench.run results file in results_dir, oldest first."""
    out = []
    for p in glob.glob(os.path.join(results_dir, "*.json")):
        try:
            r = load(p)
        except (OSError, ValueError):
            continue
        if r.get("kind", "run") == "run" and "slug" in r.get("machine", {}):
            out.append(r)
    return sorted(out, key=lambda r: (r.get("date", ""), r["_path"]))


def latest(results_dir: str = RESULTS_DIR) -> list:
    """Per device slug, the newest results file, preferring complete default/full runs over quick
    and smoke runs, and runs with the op micro-benchmarks over `--only model` runs (the full
    tables need both parts); then per slug the newest `--only interleaved` run (the floors)."""
    best, floors = {}, {}
    for p in sorted(glob.glob(os.path.join(results_dir, "*.json"))):
        try:
            r = load(p)
        except (OSError, ValueError):
            continue
        if r.get("kind", "run") != "run":  # bench.malloc_ab's A/B files, bench.sass's model
            continue
        slug = r["machine"]["slug"]
        if r.get("only") == "interleaved":  # the floor runs: listed after the full runs
            rank = (not r.get("smoke_resolutions"), r.get("date", ""))
            if slug not in floors or rank > floors[slug][0]:
                floors[slug] = (rank, r)
            continue
        rank = (bool(r.get("complete")), "ops" in r, not r.get("smoke_resolutions"),
                r.get("mode") != "quick", r.get("date", ""))
        if slug not in best or rank > best[slug][0]:
            best[slug] = (rank, r)
    return [v[1] for _, v in sorted(best.items())] + [v[1] for _, v in sorted(floors.items())]


# ----------------------------------------------------------------------------- formatting
def _ms(r):
    if not r or "median_ms" not in r:
        return "error" if r and "error" in r else "-"
    m = r["median_ms"]
    return (f"{m:.0f}" if m >= 1000 else f"{m:.3g}") + f" ({r['iqr_ms']:.2g})"


def _x(v):
    return f"{v:.2f}x" if v else "-"


def _err(v, rel=None):
    if v is None:
        return "-"
    return f"{v:.1e}" + (f" ({rel:.0e})" if rel is not None else "")


def _table(header, rows):
    out = ["| " + " | ".join(header) + " |", "|" + "|".join("---" for _ in header) + "|"]
    out += ["| " + " | ".join(str(c) for c in row) + " |" for row in rows]
    return "\n".join(out)


def _key(rec):
    return C.is_key(C.OpCase(rec["op"], rec["mode"], tuple(rec["res"]), rec["block"],
                             rec["batch"], rec["dilation"], rec["orient"], rec["dtype"],
                             rec["layout"]))


def machine_line(res) -> str:
    m = res["machine"]
    dev = (f"{m['gpu_model']} (CUDA {m['torch_cuda']})" if m["device"] == "cuda"
           else f"{m['cpu_model']}, {m['cpu_usable_cores']} cores"
           + (f" ({', '.join(m['cpu_vector_flags'])}; ATen kernels: {m['aten_cpu_capability']})"
              if m.get("cpu_vector_flags") else ""))
    bw = res.get("copy_bandwidth", {}).get("gbs")
    load = res.get("loadavg_start")
    return (f"{dev}; torch {m['torch']}, triton {m['triton']}, Python {m['python']}; measured "
            f"copy bandwidth {bw:.0f} GB/s; {res['date']}; `{res['command']}`"
            + (f"; load average at start {load[0]:.1f}" if load else "")
            + (f"; malloc: {m['malloc']}" if m.get("malloc") else "")
            + ("" if res.get("complete") else " (INCOMPLETE run"
               + (f": {res['ops_skipped']} op cases skipped" if res.get("ops_skipped") else "")
               + ")")
            + (f" (smoke test at {res['smoke_resolutions']})" if res.get("smoke_resolutions")
               else ""))


def quick_table(res) -> str:
    """The short table: each op against its reference: max abs error, times, speedup."""
    rows = []
    for r in res.get("ops", []):
        ref = r["impls"].get("reference", {})
        for name, v in r["impls"].items():
            if name in BASELINES:
                continue
            rows.append([r["op"], r["mode"], f"{r['batch']}x{r['C']}x{r['H']}x{r['W']}"
                         + (f" d{r['dilation']}" if r["dilation"] else ""), name,
                         _err(v.get("max_abs_err"), v.get("max_rel_err")), _ms(ref), _ms(v),
                         _x(v.get("speedup_vs_reference"))])
    return _table(["op", "mode", "NxCxHxW", "ours", "max abs err (rel)", "reference ms (IQR)",
                   "ours ms (IQR)", "speedup"], rows)


def _compact(rec):
    """Key shapes in fp32 NCHW at one dilation per block (2 and 4): the README's table."""
    return (_key(rec) and (rec["dtype"], rec["layout"]) == ("fp32", "nchw")
            and rec["dilation"] in (0, 2, 4))


LEVELS = {"compact": _compact, "key": _key, "all": lambda rec: True}


def ops_table(res, key_only=True, level=None) -> str:
    """One row per case and backend of ours: time, achieved bandwidth, speedups, error.
    level: "compact" (README), "key" (every key shape) or "all"; key_only=True means "key"."""
    rows = []
    recs = res.get("ops", [])
    keep = LEVELS[level or ("key" if key_only else "all")]
    if any(keep(r) for r in recs):  # (a smoke run at other shapes has none: show them all)
        recs = [r for r in recs if keep(r)]
    for r in recs:
        ref, comp = r["impls"].get("reference"), r["impls"].get("compile")
        for name, v in r["impls"].items():
            if name in BASELINES:
                continue
            rows.append([r["op"], r["mode"], r["label"], name, _ms(v),
                         f"{v['gbs']:.1f}" if "gbs" in v else "-",
                         f"{v['pct_of_copy']:.0f}%" if "pct_of_copy" in v else "-",
                         _ms(ref), _x(v.get("speedup_vs_reference")), _ms(comp),
                         _x(v.get("speedup_vs_compile")),
                         _err(v.get("max_abs_err"), v.get("max_rel_err"))])
    return _table(["op", "mode", "case (input, block, dilation, N, dtype, layout)", "ours",
                   "ms (IQR)", "GB/s", "% copy", "reference ms", "vs ref", "compile ms",
                   "vs compile", "max abs err (rel)"], rows)


def _variant(r):
    calls = r.get("dabnet_kernel_calls")
    if r.get("fused") and calls is not None and not calls:
        return f"{r['variant']} (ran no dabnet kernels)"
    return r["variant"]


def _calls(r):
    c = r.get("dabnet_kernel_calls")
    return "-" if c is None else str(sum(c.values()))


def _by_res(recs) -> list:
    """Interleaved records grouped by resolution (a run may hold several), in their order."""
    groups = {}
    for r in recs:
        groups.setdefault(tuple(r["res"]), []).append(r)
    return [g for g in groups.values() if any(r.get("median_ms") for r in g)]


def model_tables(res) -> str:
    model = res.get("model", {})
    out = []
    inf = model.get("inference", [])
    if inf:
        rows = [[f"{r['res'][0]}x{r['res'][1]}", _variant(r), r.get("dtype", "fp32"), _calls(r),
                 _ms(r), f"{r['fps']:.1f}" if r.get("fps") else "-",
                 _x(r.get("speedup_vs_eager")), _err(r.get("max_abs_diff_vs_eager")),
                 f"{100 * r['label_agreement_vs_eager']:.2f}%"
                 if r.get("label_agreement_vs_eager") is not None else "-",
                 f"{r['compile_s']:.0f}" if r.get("compile_s") else "-",
                 r.get("paper_1080ti_ms") or "-"] for r in inf]
        out.append("DABNet inference, batch 1 (vs eager: against eager fp32 NCHW; labels: pixels "
                   "whose argmax class equals eager fp32's):\n\n" + _table(
                       ["input", "variant", "dtype", "dabnet kernel calls", "ms (IQR)", "FPS",
                        "vs eager", "max diff vs eager", "labels as eager", "compile s",
                        "paper, GTX 1080Ti ms"], rows))
    floor = [r for r in model.get("conv_floor", []) if r.get("median_ms")]
    if floor:
        rows = []
        for r in floor:
            same = [v for v in inf if v["res"] == r["res"] and v.get("median_ms")
                    and v.get("dtype", "fp32") == "fp32"]  # the floor is fp32 convolutions
            fused = min((v["median_ms"] for v in same if v.get("fused")), default=None)
            base = min((v["median_ms"] for v in same if not v.get("fused")), default=None)
            rows.append([f"{r['res'][0]}x{r['res'][1]}", r["variant"], str(r["convs"]),
                         f"{r['macs'] / 1e9:.2f} ({100 * r['macs_share_of_model']:.0f}%)",
                         _ms(r), f"{r['gmacs_per_s']:.1f}",
                         f"{r['matmul_gmacs_per_s']:.1f}" if r.get("matmul_gmacs_per_s") else "-",
                         f"{fused:.1f}" if fused else "-",
                         f"{base / 2:.1f}" if base else "-"])
        out.append("The dense 3x3 and 1x1 convolutions alone (through PyTorch, on the "
                   "activations of a real forward): a floor for the whole model that fusing "
                   "the other ops cannot go below:\n\n" + _table(
                       ["input", "run", "convs", "GMACs (share of model)", "ms (IQR)",
                        "GMAC/s", "fp32 matmul GMAC/s", "fastest fused variant ms",
                        "half the fastest plain variant ms"],
                       rows))
    for il in _by_res(model.get("interleaved", [])):
        r0 = il[0]
        floor = any("over_floor" in r for r in il)
        packed = any("over_packed_floor" in r for r in il)
        rows = [[_variant(r), r.get("dtype", "fp32"), _ms(r), f"{r['min_ms']:.3g}",
                 _x(r.get("speedup_vs_baseline"))]
                + ([_x(r.get("over_floor"))] if floor else [])
                + ([_x(r.get("over_packed_floor"))] if packed else [])
                for r in il if r.get("median_ms")]
        skipped = [f"{r['variant']} ({r['error']})" for r in il if r.get("error")]
        out.append(
            f"DABNet inference at {r0['res'][0]}x{r0['res'][1]}, batch 1, interleaved: "
            f"{r0.get('rounds', '-')} rounds, each calling every variant once in a "
            f"{r0.get('order', 'rotated')} order, so that drift in the machine's speed hits all "
            f"alike; vs baseline: the median over rounds of {r0.get('baseline', '-')}'s time "
            f"(the fp32 plain-PyTorch variant with the lowest median) over the variant's, in the "
            f"same round"
            + ("; over floor: the median over rounds of the variant's time over the "
               "dense-convolution floor of its dtype (floor rows: the model's dense 3x3 and 1x1 "
               "convolutions alone, on a forward's activations)" if floor else "")
            + (f"; over packed floor: the same over {PACKED_FLOOR_WORDS}" if packed else "")
            + (f"; not run: {', '.join(skipped)}" if skipped else "") + ":\n\n"
            + _table(["variant", "dtype", "ms (IQR)", "min ms",
                      f"vs {r0.get('baseline', 'baseline')}"]
                     + (["over floor"] if floor else [])
                     + (["over packed floor"] if packed else []), rows))
    tr = model.get("train", [])
    if tr:
        rows = [[f"{r['batch']}x3x{r['res'][0]}x{r['res'][1]}", _variant(r), _calls(r), _ms(r),
                 f"{r['peak_over_base_bytes'] / 2**20:.0f}" if "peak_over_base_bytes" in r
                 else "-", r.get("memory_method", "-")] for r in tr]
        out.append("One training step (SGD, fp32):\n\n" + _table(
            ["input", "variant", "dabnet kernel calls (1 image)", "ms (IQR)",
             "peak memory over base, MiB", "memory measured by"], rows))
    return "\n\n".join(out)


def history_table(results) -> str:
    """One row per run: when, where, and the machine's own speed (copy bandwidth, fp32 matmul
    rate), which moves from run to run on shared VMs."""
    rows = []
    for res in sorted(results, key=lambda r: r.get("date", "")):
        m = res["machine"]
        dev = (m["gpu_model"] if m["device"] == "cuda"
               else f"{m['cpu_model']}, {m['cpu_usable_cores']} cores")
        bw = res.get("copy_bandwidth", {}).get("gbs")
        mm = next((r["matmul_gmacs_per_s"] for r in res.get("model", {}).get("conv_floor", [])
                   if r.get("matmul_gmacs_per_s")), None)
        flags = m.get("cpu_vector_flags")
        rows.append([res.get("date", "-"),
                     f"`{os.path.basename(res['_path'])}`" if "_path" in res else "-", dev,
                     ", ".join(flags) if flags else "(not recorded)",
                     f"{bw:.3g}" if bw else "-", f"{mm:.0f}" if mm else "-",
                     m.get("malloc") or "glibc defaults (not recorded)",
                     ("complete" if res.get("complete") else "incomplete")
                     + (f", {res['mode']}" if res.get("mode") else "")])
    return _table(["date", "file", "machine", "CPU vector flags", "copy GB/s",
                   "fp32 matmul GMAC/s", "malloc", "run"], rows) + "\n"


# The variants of bench.model_bench in words, for the summary table.
VARIANT_WORDS = {
    "eager": "PyTorch, NCHW",
    "eager-cl": "PyTorch, channels_last",
    "fused": "dabnet kernels (`fused=True`), NCHW",
    "fused-cl": "dabnet kernels (`fused=True`), channels_last",
    "eager-cl-bf16": "PyTorch, channels_last, whole network in bfloat16",
    "fused-cl-bf16": "dabnet kernels, channels_last, whole network in bfloat16",
    "compile": "`torch.compile` of the PyTorch model, NCHW",
    "compile-cl": "`torch.compile` of the PyTorch model, channels_last",
    "fused+compile": "`torch.compile` of the dabnet model",
    "compile-cl-bf16": "`torch.compile`, channels_last, bfloat16",
    "frozen-cl": "`dabnet.freeze` of the fused model, channels_last",
    "frozen-cl-bf16": "`dabnet.freeze`, channels_last, bfloat16",
    "floor-cl": "the dense convolutions alone, channels_last",
    "floor-cl-bf16": "the dense convolutions alone, channels_last, bfloat16",
    "floor-cl-packed": "the same on weights reordered once, as `dabnet.freeze` runs them",
    "floor-cl-packed-bf16": "the same, bfloat16",
}

PACKED_FLOOR_WORDS = ("the packed floor of its dtype (`floor-cl-packed*`: the same convolutions "
                      "on weights reordered into oneDNN's layout once, as the frozen model runs "
                      "them; F.conv2d reorders them on every call)")


def _short_machine(res) -> str:
    m = res["machine"]
    dev = (f"{m['gpu_model']}" if m["device"] == "cuda"
           else f"{m['cpu_model']} CPU, {m['cpu_usable_cores']} cores")
    return f"{dev}, torch {m['torch']}, {res['date']}"


def summary_table(results) -> str:
    """README's one table: DABNet inference per variant, from the interleaved rounds of each
    results file where it has them (the figures least exposed to the machine's drift), else from
    the plain inference table at its largest input; plus one line on the training step."""
    out, tail = [], []
    # A device with a floor run (`--only interleaved`) shows that run's table; its full run
    # then adds only the training step's line.
    floored = {r["machine"]["slug"] for r in results if r.get("only") == "interleaved"}
    for res in results:
        if res.get("only") == "interleaved":
            out.append(floor_summary(res))
            continue
        model = res.get("model", {})
        if res["machine"]["slug"] in floored:
            line = _train_line(model)
            if line:
                tail.append(line + f" Source: `{os.path.relpath(res['_path'], REPO_DIR)}`"
                            if "_path" in res else line)
            continue
        inf = [r for r in model.get("inference", []) if r.get("median_ms")]
        il = [r for r in model.get("interleaved", []) if r.get("median_ms")]
        if il:
            hw = il[0]["res"]
            base = il[0].get("baseline", "baseline")
            recs = [(r, r.get("speedup_vs_baseline")) for r in il]
            how = (f"{il[0]['rounds']} rounds, each calling every variant once in a "
                   f"{il[0].get('order', 'rotated')} order; vs {base}: the median over rounds of "
                   f"the ratio of {base}'s time (the fastest plain-PyTorch fp32 variant) to the "
                   f"variant's, in the same round")
        elif inf:
            hw = max((r["res"] for r in inf), key=lambda v: v[0] * v[1])
            base = "eager"
            recs = [(r, r.get("speedup_vs_eager")) for r in inf if r["res"] == hw]
            how = "vs eager: eager fp32 NCHW's time over the variant's, timed in the same pass"
        else:
            continue
        labels = {r["variant"]: r.get("label_agreement_vs_eager") for r in inf
                  if r["res"] == hw}
        rows = [[f"`{r['variant']}`", VARIANT_WORDS.get(r["variant"], "-"),
                 r.get("dtype", "fp32"), _ms(r), _x(x),
                 f"{100 * labels[r['variant']]:.1f}%"
                 if labels.get(r["variant"]) is not None else "-"] for r, x in recs]
        text = (f"DABNet inference at {hw[0]}x{hw[1]}, batch 1, on {_short_machine(res)} "
                f"({how}; labels: pixels whose class is eager fp32's):\n\n"
                + _table(["variant", "model", "dtype", "ms, median (IQR)", f"vs {base}",
                          "labels as eager"], rows))
        line = _train_line(model)
        if line:
            text += "\n\n" + line
        if "_path" in res:
            text += f"\n\nSource: `{os.path.relpath(res['_path'], REPO_DIR)}`"
        out.append(text)
    if not out:
        return "No DABNet inference results yet: run `python -m bench.run`.\n"
    return "\n\n".join(out + tail).rstrip() + "\n"


def _train_line(model) -> str:
    """One sentence on the training step (fused against eager), or "" where it did not run."""
    tr = {r["variant"]: r for r in model.get("train", []) if r.get("median_ms")}
    if "eager" not in tr or "fused" not in tr:
        return ""
    e, f = tr["eager"], tr["fused"]
    text = (f"One SGD training step on {f['batch']}x3x{f['res'][0]}x{f['res'][1]}, fp32: "
            f"{f['median_ms']:.3g} ms fused against {e['median_ms']:.3g} ms eager "
            f"({e['median_ms'] / f['median_ms']:.2f}x)")
    if "peak_over_base_bytes" in e and "peak_over_base_bytes" in f:
        text += (f", peak memory {f['peak_over_base_bytes'] / 2**20:.0f} MiB against "
                 f"{e['peak_over_base_bytes'] / 2**20:.0f} MiB")
    return text + "."


# The resolution of the README's floor table (issue 17's targets are stated at it); the others
# are in bench/README.md.
SUMMARY_RES = [512, 1024]


def floor_summary(res, only_res=SUMMARY_RES) -> str:
    """README's table of an `--only interleaved` run: per resolution, each variant's time, its
    speed against the fastest fp32 plain-PyTorch variant and its time over the dense-convolution
    floor of its dtype, all from the same interleaved rounds."""
    parts = []
    groups = _by_res(res.get("model", {}).get("interleaved", []))
    if only_res is not None and any(g[0]["res"] == only_res for g in groups):
        others = [f"{g[0]['res'][0]}x{g[0]['res'][1]}" for g in groups
                  if g[0]["res"] != only_res]
        groups = [g for g in groups if g[0]["res"] == only_res]
    else:
        others = []
    for il in groups:
        il = [r for r in il if r.get("median_ms")]
        hw, base = il[0]["res"], il[0].get("baseline", "baseline")
        packed = any("over_packed_floor" in r for r in il)
        rows = [[f"`{r['variant']}`", VARIANT_WORDS.get(r["variant"], "-"), r["dtype"], _ms(r),
                 _x(r.get("speedup_vs_baseline")), _x(r.get("over_floor"))]
                + ([_x(r.get("over_packed_floor"))] if packed else []) for r in il]
        parts.append(f"At {hw[0]}x{hw[1]} ({il[0]['rounds']} rounds):\n\n" + _table(
            ["variant", "model", "dtype", "ms, median (IQR)", f"vs {base}", "over its floor"]
            + (["over packed floor"] if packed else []), rows))
    text = (f"DABNet inference against its floor, batch 1, on {_short_machine(res)}: each "
            f"variant and the dense convolutions alone (`floor-*`: the model's 3x3 and 1x1 "
            f"convolutions on a forward's activations, what fusing the other ops cannot go "
            f"below) timed in the same interleaved rounds; vs: the median over rounds of the "
            f"fastest plain-PyTorch fp32 variant's time over the variant's; over its floor: the "
            f"median over rounds of the variant's time over the floor of its dtype"
            + (f"; over packed floor: the same over {PACKED_FLOOR_WORDS}" if any(
                "over_packed_floor" in r for g in groups for r in g) else "")
            + ".\n\n" + "\n\n".join(parts))
    if others:
        text += (f"\n\nThe same rows at {' and '.join(others)}: "
                 f"[bench/README.md](bench/README.md).")
    if "_path" in res:
        text += f"\n\nSource: `{os.path.relpath(res['_path'], REPO_DIR)}`"
    return text


def render(results, level="compact") -> str:
    parts = []
    for res in results:
        m = res["machine"]
        name = m["gpu_model"] if m["device"] == "cuda" else f"CPU: {m['cpu_model']}"
        parts.append(f"#### {name}\n\n{machine_line(res)}\n")
        if res.get("ops"):
            lv = level if any(LEVELS[level](r) for r in res["ops"]) else "all"
            what = {"compact": "at the key shapes in fp32 NCHW, dilation 2 (block 1) and 4 "
                               "(block 2)", "key": "at the key shapes", "all": ""}[lv]
            parts.append(f"Op micro-benchmarks {what} (key shapes: input 512x1024; batch 1 for "
                         "inference, 8 for training on GPU and 2 on CPU; ms: median (IQR)):"
                         + "\n\n" + ops_table(res, level=lv) + "\n")
        if res.get("model"):
            parts.append(model_tables(res) + "\n")
        parts.append(f"Source: `{os.path.relpath(res['_path'], REPO_DIR)}`\n" if "_path" in res
                     else "")
    return "\n".join(parts).rstrip() + "\n"


def static_model(res=None, results_dir: str = RESULTS_DIR):
    """The static model to render: `res` if given, else the newest kind=sm90-static file."""
    return res if res is not None else sass.latest_static(results_dir)


# ----------------------------------------------------------------------------- regressions
def _timings(res):
    """{key: (our median ms, the same pass's baseline median ms)} for every op case and backend
    of ours (baseline: the reference) and every model variant (baseline: eager)."""
    out = {}
    for r in res.get("ops", []):
        ref = (r["impls"].get("reference") or {}).get("median_ms")
        for name, v in r["impls"].items():
            if name not in BASELINES and "median_ms" in v:
                out[("op", r["op"], r["mode"], r["label"], name)] = (v["median_ms"], ref)
    model = res.get("model", {})
    for kind in ("inference", "train"):
        recs = [r for r in model.get(kind, []) if "median_ms" in r]
        eager = {tuple(r["res"]): r["median_ms"] for r in recs if r["variant"] == "eager"}
        for r in recs:
            out[(kind, f"{r['res'][0]}x{r['res'][1]}", r["variant"])] = (
                r["median_ms"], eager.get(tuple(r["res"])))
    return out


def compare(old: dict, new: dict, threshold: float = 1.2) -> list:
    """Cases in both results files, slowest change first. `slower` is new/old of our median;
    `drift` the same ratio for the baseline timed in the same pass (reference or eager), i.e. how
    much the machine itself moved. `regressed`: ours got slower by more than `threshold` and the
    baseline did not slow down with it (slower / drift > threshold too): a noisy baseline that got
    faster does not flag an unchanged kernel, and a machine that got slower does not flag all."""
    a, b = _timings(old), _timings(new)
    rows = []
    for k in a.keys() & b.keys():
        (o, o_base), (n, n_base) = a[k], b[k]
        drift = n_base / o_base if o_base and n_base else None
        slower = n / o
        rows.append(dict(key=k, old_ms=o, new_ms=n, slower=slower, drift=drift,
                         regressed=slower > threshold and slower / (drift or 1.0) > threshold))
    return sorted(rows, key=lambda r: -r["slower"] / (r["drift"] or 1.0))


def compare_table(rows, threshold: float, all_rows: bool = False) -> str:
    shown = rows if all_rows else [r for r in rows if r["regressed"]]
    body = [[" ".join(str(x) for x in r["key"]), f"{r['old_ms']:.3g}", f"{r['new_ms']:.3g}",
             f"{r['slower']:.2f}x", f"{r['drift']:.2f}x" if r["drift"] else "-",
             "REGRESSED" if r["regressed"] else ""] for r in shown]
    n = sum(r["regressed"] for r in rows)
    head = (f"{len(rows)} cases in both files; {n} slower by more than {threshold:.2f}x, also "
            "net of the baseline's own drift")
    if not body:
        return head + "\n"
    return head + ":\n\n" + _table(["case", "old ms", "new ms", "new/old", "baseline new/old",
                                      ""], body) + "\n"


def _marker(name: str) -> re.Pattern:
    """A marker counts only on a line of its own, so that prose may quote it."""
    return re.compile(r"^[ \t]*" + re.escape(name) + r"[ \t]*$", re.M)


def _section(text: str, start: str, end: str):
    """The (start, end) character span of the text between the `start` and `end` marker lines,
    or None when `text` has no such section."""
    a = _marker(start).search(text)
    b = _marker(end).search(text, a.end()) if a else None
    return (a.end(), b.start()) if a and b else None


def write_readme(readme: str, markdown: str, start: str = START, end: str = END) -> None:
    """Replaces what lies between the `start` and `end` marker lines of `readme` with
    `markdown`."""
    with open(readme) as f:
        text = f.read()
    span = _section(text, start, end)
    if span is None:
        raise ValueError(f"{readme} has no '{start}' ... '{end}' section to rewrite (each "
                         "marker on a line of its own)")
    text = text[:span[0]] + f"\n{markdown.rstrip()}\n" + text[span[1]:]
    with open(readme, "w") as f:
        f.write(text)


def write_files(paths, results, level="compact", history=None, static=None) -> list:
    """Rewrites, in each file, the sections it has: the summary table between SUMMARY_START and
    SUMMARY_END, the full tables between START and END, both from the same `results`, and the
    list of runs (`history`, default: `results`) between HISTORY_START and HISTORY_END. A file
    with none is an error (before anything is written). Returns [(path, [section names])]."""
    sections = {"summary": (SUMMARY_START, SUMMARY_END, lambda: summary_table(results)),
                "tables": (START, END, lambda: render(results, level=level)),
                "history": (HISTORY_START, HISTORY_END,
                            lambda: history_table(results if history is None else history)),
                "static model summary": (SASS_SUMMARY_START, SASS_SUMMARY_END,
                                         lambda: sass.summary_markdown(static_model(static))),
                "static model tables": (SASS_START, SASS_END,
                                        lambda: sass.tables_markdown(static_model(static)))}
    plan = []
    for path in paths:
        with open(path) as f:
            text = f.read()
        have = [n for n, (a, b, _) in sections.items() if _section(text, a, b)]
        if not have:
            raise ValueError(f"{path} has no section to rewrite: neither '{SUMMARY_START}' ... "
                             f"'{SUMMARY_END}' nor '{START}' ... '{END}' nor '{HISTORY_START}' "
                             f"... '{HISTORY_END}'")
        plan.append((path, have))
    rendered = {n: make() for n, (_, _, make) in sections.items()
                if any(n in have for _, have in plan)}
    for path, have in plan:
        for n in have:
            write_readme(path, rendered[n], *sections[n][:2])
    return plan


def main(argv=None):
    p = argparse.ArgumentParser(prog="python -m bench.report", description=__doc__,
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("files", nargs="*", help="results files (default: the latest per device in "
                                            "bench/results)")
    p.add_argument("--write", nargs="*", metavar="FILE",
                   help="rewrite the marked sections of these files: the summary table between "
                        f"{SUMMARY_START} and {SUMMARY_END}, the full tables between {START} and "
                        f"{END} (default, with no file named: README.md and bench/README.md); put "
                        "results files before --write")
    p.add_argument("--summary", action="store_true",
                   help="print README's summary table instead of the full tables")
    p.add_argument("--level", choices=tuple(LEVELS), default="compact",
                   help="which op cases: compact (README: key shapes, fp32 NCHW, dilation 2/4), "
                        "key (every key shape, dtype and layout) or all")
    p.add_argument("--plots", action="store_true",
                   help="also (re)draw the PNG plots next to each results file")
    p.add_argument("--compare", nargs=2, metavar=("OLD", "NEW"),
                   help="compare two results files instead: list the cases that got slower (exit "
                        "status 1 if any did)")
    p.add_argument("--threshold", type=float, default=1.2,
                   help="with --compare: the slowdown, net of the baseline's drift, that counts "
                        "as a regression (default 1.2)")
    p.add_argument("--all", action="store_true", help="with --compare: list every common case")
    args = p.parse_args(argv)
    if args.threshold <= 0:
        raise SystemExit("bench.report: --threshold must be positive")
    if args.compare:
        try:
            old, new = (load(f) for f in args.compare)
        except (OSError, ValueError) as e:
            raise SystemExit(f"bench.report: cannot read results file: {e}")
        rows = compare(old, new, args.threshold)
        print(compare_table(rows, args.threshold, args.all), end="")
        return 1 if any(r["regressed"] for r in rows) else 0
    results = [load(f) for f in args.files] if args.files else latest()
    if not results:
        raise SystemExit("no results files: run `python -m bench.run` first")
    if args.plots:
        from . import plots

        for r in results:
            for q in plots.plot_all(r, r["_path"]):
                print(f"wrote {q}", file=sys.stderr)
    if args.write is not None:
        try:
            plan = write_files(args.write or DEFAULT_WRITE, results, level=args.level,
                               history=None if args.files else all_runs())
        except (OSError, ValueError) as e:
            raise SystemExit(f"bench.report: {e}")
        for path, have in plan:
            print(f"rewrote {' and '.join(have)} in {path}", file=sys.stderr)
    else:
        print(summary_table(results) if args.summary else render(results, level=args.level))
    return 0


if __name__ == "__main__":
    sys.exit(main())
