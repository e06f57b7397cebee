"""README performance tables, rendered from bench/results/*.json only: README states no number
that a results file does not hold.

    python -m bench.report                      # markdown for the latest results per device
    python -m bench.report FILE.json ...        # markdown for these files
    python -m bench.report --write README.md    # rewrite README between the bench markers
    python -m bench.report --level all          # every op case (default: a compact table)
    python -m bench.report --compare OLD NEW    # what got slower between two results files
"""
from __future__ import annotations

import argparse
import glob
import json
import os
import re
import sys

from . import cases as C

START, END = "<!-- bench:start -->", "<!-- bench:end -->"
RESULTS_DIR = os.path.join(os.path.dirname(os.path.abspath(__file__)), "results")
BASELINES = ("reference", "compile")


# ------------------------------------------------------------------------------ loading
def load(path: str) -> dict:
    with open(path) as f:
        res = json.load(f)
    res["_path"] = path
    return res


def latest(results_dir: str = RESULTS_DIR) -> list:
    """Per device slug, the newest results file, preferring complete default/full runs over quick
    and smoke runs."""
    best = {}
    for p in sorted(glob.glob(os.path.join(results_dir, "*.json"))):
        try:
            r = load(p)
        except (OSError, ValueError):
            continue
        if r.get("kind", "run") != "run":  # e.g. bench.malloc_ab's A/B files
            continue
        rank = (bool(r.get("complete")), not r.get("smoke_resolutions"),
                r.get("mode") != "quick", r.get("date", ""))
        slug = r["machine"]["slug"]
        if slug not in best or rank > best[slug][0]:
            best[slug] = (rank, r)
    return [v[1] for _, v in sorted(best.items())]


# ----------------------------------------------------------------------------- formatting
def _ms(r):
    if not r or "median_ms" not in r:
        return "error" if r and "error" in r else "-"
    return f"{r['median_ms']:.3g} ({r['iqr_ms']:.2g})"


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
    il = [r for r in model.get("interleaved", []) if r.get("median_ms")]
    if il:
        r0 = il[0]
        rows = [[_variant(r), r.get("dtype", "fp32"), _ms(r), f"{r['min_ms']:.3g}",
                 _x(r.get("speedup_vs_baseline"))] for r in il]
        skipped = [f"{r['variant']} ({r['error']})" for r in model.get("interleaved", [])
                   if r.get("error")]
        out.append(
            f"DABNet inference at {r0['res'][0]}x{r0['res'][1]}, batch 1, interleaved: "
            f"{r0['rounds']} rounds, each calling every variant once in a rotated order, so "
            f"that drift in the machine's speed hits all alike; vs baseline: the median over "
            f"rounds of {r0.get('baseline', '-')}'s time (the fp32 plain-PyTorch variant with "
            f"the lowest median) over the variant's, in the same round"
            + (f"; not run: {', '.join(skipped)}" if skipped else "") + ":\n\n"
            + _table(["variant", "dtype", "ms (IQR)", "min ms",
                      f"vs {r0.get('baseline', 'baseline')}"], rows))
    tr = model.get("train", [])
    if tr:
        rows = [[f"{r['batch']}x3x{r['res'][0]}x{r['res'][1]}", _variant(r), _calls(r), _ms(r),
                 f"{r['peak_over_base_bytes'] / 2**20:.0f}" if "peak_over_base_bytes" in r
                 else "-", r.get("memory_method", "-")] for r in tr]
        out.append("One training step (SGD, fp32):\n\n" + _table(
            ["input", "variant", "dabnet kernel calls (1 image)", "ms (IQR)",
             "peak memory over base, MiB", "memory measured by"], rows))
    return "\n\n".join(out)


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
        parts.append(f"Source: `{os.path.relpath(res['_path'])}`\n" if "_path" in res else "")
    return "\n".join(parts).rstrip() + "\n"


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


def write_readme(readme: str, markdown: str) -> None:
    """Replaces what lies between START and END in `readme` with `markdown`."""
    with open(readme) as f:
        text = f.read()
    if START not in text or END not in text or text.index(START) > text.index(END):
        raise ValueError(f"{readme} has no '{START}' ... '{END}' section to rewrite")
    pat = re.compile(re.escape(START) + ".*?" + re.escape(END), re.S)
    text = pat.sub(lambda _m: f"{START}\n{markdown.rstrip()}\n{END}", text, count=1)
    with open(readme, "w") as f:
        f.write(text)


def main(argv=None):
    p = argparse.ArgumentParser(prog="python -m bench.report", description=__doc__,
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("files", nargs="*", help="results files (default: the latest per device in "
                                            "bench/results)")
    p.add_argument("--write", metavar="README", help="rewrite the section between "
                                                     f"{START} and {END} of this file")
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
    md = render(results, level=args.level)
    if args.write:
        try:
            write_readme(args.write, md)
        except (OSError, ValueError) as e:
            raise SystemExit(f"bench.report: {e}")
        print(f"rewrote the benchmark section of {args.write}", file=sys.stderr)
    else:
        print(md)
    return 0


if __name__ == "__main__":
    sys.exit(main())
