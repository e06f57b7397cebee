"""PNG plots next to a results file: op speedups per shape, DABNet inference and training."""
from __future__ import annotations

import os

from .cases import MODES, OPS


def _plt():
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    return plt


def _fmt():
    from matplotlib.ticker import FuncFormatter, NullFormatter

    return FuncFormatter, NullFormatter


def _title(res):
    m = res["machine"]
    dev = (m.get("gpu_model") if m["device"] == "cuda"
           else f"{m['cpu_model']}, {m['cpu_usable_cores']} cores")
    return f"{dev}  (torch {m['torch']}, {res['date']})"


def plot_ops(res: dict, path: str):
    """Speedup over the reference (F.conv2d / F.batch_norm / F.prelu) of each of our backends and
    of torch.compile, one bar group per case; one panel per op and mode."""
    plt = _plt()
    FuncFormatter, NullFormatter = _fmt()
    recs = res.get("ops", [])
    panels = [(op, mode, [r for r in recs if r["op"] == op and r["mode"] == mode])
              for op in OPS for mode in MODES]
    panels = [p for p in panels if p[2]]
    if not panels:
        return None
    rows = [max(len(p[2]) for p in panels if p[0] == op) for op in OPS
            if any(p[0] == op for p in panels)]
    ops_present = [op for op in OPS if any(p[0] == op for p in panels)]
    fig_h = sum(0.28 * n + 1.2 for n in rows)
    fig, axes = plt.subplots(len(ops_present), 2, figsize=(15, fig_h), squeeze=False,
                             gridspec_kw={"height_ratios": [n + 4 for n in rows]})
    for i, op in enumerate(ops_present):
        for j, mode in enumerate(MODES):
            ax = axes[i][j]
            rs = next((p[2] for p in panels if p[0] == op and p[1] == mode), [])
            if not rs:
                ax.axis("off")
                continue
            impls = sorted({k for r in rs for k in r["impls"] if k != "reference"})
            h = 0.8 / max(len(impls), 1)
            lo, hi = 0.8, 1.25
            for k, name in enumerate(impls):
                ys, xs = [], []
                for y, r in enumerate(rs):
                    ref = r["impls"].get("reference", {}).get("median_ms")
                    t = r["impls"].get(name, {}).get("median_ms")
                    if ref and t:
                        ys.append(y + (k - (len(impls) - 1) / 2) * h)
                        xs.append(ref / t)
                # Bars grow from 1x: right of the line is faster than the reference, left slower.
                ax.barh(ys, [x - 1 for x in xs], left=1, height=h, label=name)
                lo, hi = min([lo] + xs), max([hi] + xs)
            ax.axvline(1.0, color="k", lw=0.8)
            ax.set_xscale("log")
            ax.set_xlim(lo / 1.15, hi * 1.15)
            ax.xaxis.set_major_formatter(FuncFormatter(lambda v, _p: f"{v:g}x"))
            ax.xaxis.set_minor_formatter(NullFormatter())
            ax.set_yticks(range(len(rs)))
            ax.set_yticklabels([r["label"] for r in rs], fontsize=6)
            ax.invert_yaxis()
            ax.set_title(f"{op} {mode}: speedup over the reference (x, log)", fontsize=9)
            ax.legend(fontsize=7, loc="lower right")
    fig.suptitle(_title(res), fontsize=10)
    fig.tight_layout()
    fig.savefig(path, dpi=90)
    plt.close(fig)
    return path


def plot_model(res: dict, path: str):
    """DABNet inference time per resolution and variant, and training-step time and memory."""
    plt = _plt()
    inf = [r for r in res.get("model", {}).get("inference", []) if r.get("median_ms")]
    tr = [r for r in res.get("model", {}).get("train", []) if r.get("median_ms")]
    if not inf and not tr:
        return None
    fig, axes = plt.subplots(1, 3 if tr else 1, figsize=(16 if tr else 7, 4.5), squeeze=False)
    axes = axes[0]
    resolutions = sorted({tuple(r["res"]) for r in inf})
    variants = list(dict.fromkeys(r["variant"] for r in inf))
    w = 0.8 / max(len(variants), 1)
    for k, v in enumerate(variants):
        xs, ys = [], []
        for i, rr in enumerate(resolutions):
            r = next((r for r in inf if tuple(r["res"]) == rr and r["variant"] == v), None)
            if r:
                xs.append(i + (k - (len(variants) - 1) / 2) * w)
                ys.append(r["median_ms"])
        axes[0].bar(xs, ys, width=w, label=v)
    axes[0].set_xticks(range(len(resolutions)))
    axes[0].set_xticklabels([f"{a}x{b}" for a, b in resolutions])
    axes[0].set_yscale("log")
    axes[0].set_ylabel("ms per image (batch 1, log)")
    axes[0].set_title("DABNet inference", fontsize=9)
    axes[0].legend(fontsize=7)
    if not tr:
        return _save(fig, res, path)
    names = [r["variant"] for r in tr]
    axes[1].bar(names, [r["median_ms"] for r in tr])
    axes[1].set_ylabel("ms per step")
    axes[1].set_title(f"training step, batch {tr[0]['batch']}, {tr[0]['res'][0]}x"
                      f"{tr[0]['res'][1]}", fontsize=9)
    axes[2].bar(names, [r.get("peak_over_base_bytes", 0) / 2**20 for r in tr])
    axes[2].set_ylabel("MiB")
    axes[2].set_title("training step: peak memory over base", fontsize=9)
    for ax in axes[1:]:
        ax.tick_params(axis="x", labelsize=7, rotation=20)
    return _save(fig, res, path)


def _save(fig, res, path):
    fig.suptitle(_title(res), fontsize=10)
    fig.tight_layout()
    fig.savefig(path, dpi=90)
    _plt().close(fig)
    return path


def plot_all(res: dict, json_path: str):
    stem = os.path.splitext(json_path)[0]
    out = []
    for f, suffix in ((plot_ops, "-ops.png"), (plot_model, "-model.png")):
        p = f(res, stem + suffix)
        if p:
            out.append(p)
    return out
