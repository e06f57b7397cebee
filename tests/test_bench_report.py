"""bench.report --compare: flags a kernel that got slower, not a machine that did."""
import copy
import json

import pytest
import torch

from bench import report


def _results(ours_ms, ref_ms, eager_ms=100.0, fused_ms=80.0):
    op = dict(op="dwconv3", mode="fwd", label="512x1024 b1 d2 3x1 N1 fp32 nchw",
              impls={"cpu": {"median_ms": ours_ms}, "reference": {"median_ms": ref_ms}})
    inf = [dict(res=[256, 512], variant="eager", median_ms=eager_ms),
           dict(res=[256, 512], variant="fused", median_ms=fused_ms)]
    return {"ops": [op], "model": {"inference": inf}}


def _flagged(old, new, threshold=1.2):
    return {r["key"] for r in report.compare(old, new, threshold) if r["regressed"]}


def test_kernel_slowdown_is_flagged():
    old = _results(1.0, 3.0)
    flagged = _flagged(old, _results(2.0, 3.0))
    assert flagged == {("op", "dwconv3", "fwd", "512x1024 b1 d2 3x1 N1 fp32 nchw", "cpu")}
    assert _flagged(old, _results(1.0, 3.0, fused_ms=120.0)) == {("inference", "256x512",
                                                                    "fused")}


def test_machine_drift_and_noisy_baselines_are_not_flagged():
    old = _results(1.0, 3.0)
    # Everything 1.5x slower: the machine, not the kernel.
    assert _flagged(old, _results(1.5, 4.5, eager_ms=150.0, fused_ms=120.0)) == set()
    # The baseline got faster by noise while ours stayed put.
    assert _flagged(old, _results(1.0, 1.0, eager_ms=50.0)) == set()
    # Small changes stay under the threshold.
    assert _flagged(old, _results(1.1, 3.0)) == set()


def test_cases_missing_from_one_file_are_skipped():
    old, new = _results(1.0, 3.0), _results(5.0, 3.0)
    new["ops"][0]["label"] = "another shape"
    assert {r["key"][0] for r in report.compare(old, new)} == {"inference"}


def test_cli_exit_status_and_table(tmp_path, capsys):
    old, new = tmp_path / "old.json", tmp_path / "new.json"
    base = _results(1.0, 3.0)
    old.write_text(json.dumps(base))
    slow = copy.deepcopy(base)
    slow["ops"][0]["impls"]["cpu"]["median_ms"] = 3.0
    new.write_text(json.dumps(slow))
    assert report.main(["--compare", str(old), str(new)]) == 1
    out = capsys.readouterr().out
    assert "REGRESSED" in out and "3.00x" in out
    assert report.main(["--compare", str(old), str(old)]) == 0
    assert "0 slower" in capsys.readouterr().out
    with pytest.raises(SystemExit, match="cannot read"):
        report.main(["--compare", str(old), str(tmp_path / "missing.json")])


def test_conv_floor_times_every_dense_conv_and_renders():
    """bench_conv_floor runs exactly the model's non-depthwise convolutions (3 init + 2
    downsampling + 9 DAB modules x (3x3 + 1x1) + classifier = 24), and the report sets the
    floor against the model variants of the same input."""
    from bench import model_bench
    from bench.timing import Budget

    recs = model_bench.bench_conv_floor("cpu", [(32, 64)], Budget(cpu_min_run_s=0.01),
                                        progress=False)
    assert [r["layout"] for r in recs] == ["nchw", "cl"]
    for r in recs:
        assert "error" not in r, r.get("error")
        assert r["convs"] == 24
        assert 0.8 < r["macs_share_of_model"] < 1.0  # the paper: depthwise convs are cheap
        assert r["median_ms"] > 0 and r["gmacs_per_s"] > 0 and r["matmul_gmacs_per_s"] > 0
    inf = [dict(res=[32, 64], variant=v, fused=f, median_ms=ms, iqr_ms=0.1)
           for v, f, ms in (("eager", False, 10.0), ("compile", False, 8.0),
                            ("fused-cl", True, 7.0))]
    text = report.model_tables({"model": {"inference": inf, "conv_floor": recs}})
    assert "dense 3x3 and 1x1 convolutions alone" in text
    row = next(line for line in text.splitlines() if "dense convs only-cl" in line)
    assert "| 7.0 |" in row and "| 4.0 |" in row  # fastest fused, half the fastest plain


def test_results_path_keeps_an_earlier_run_of_the_same_day(tmp_path):
    from argparse import Namespace

    from bench.run import results_path

    args = Namespace(name=None, quick=False, full=False, res=None, out=str(tmp_path))
    machine = {"slug": "cpu-test"}
    first = results_path(args, machine)
    assert first.endswith("-cpu-test.json")
    open(first, "w").close()
    second = results_path(args, machine)
    assert second != first and second.startswith(first[:-len(".json")] + "-")
    assert results_path(Namespace(**{**vars(args), "name": "mine"}), machine).endswith("mine.json")


def test_inference_bench_runs_every_variant_and_checks_the_labels():
    """The model benchmark at a tiny input, as `python -m bench.run` runs it: every plain variant
    (fp32 and the bfloat16 pair) is timed, the fused ones really run dabnet kernels, and each is
    compared with eager fp32, in values and in predicted labels."""
    from bench.model_bench import bench_inference, inference_variants
    from bench.timing import Budget

    recs = bench_inference("cpu", [(32, 64)], [], Budget().scaled(0.05), progress=False,
                           which="plain")
    by = {r["variant"]: r for r in recs}
    assert set(by) == {v[0] for v in inference_variants("cpu", False)}
    for name, r in by.items():
        assert "error" not in r, (name, r.get("error"))
        assert r["median_ms"] > 0
        assert r["dtype"] == ("bf16" if name.endswith("bf16") else "fp32")
        if r["fused"]:
            assert sum(r["dabnet_kernel_calls"].values()) > 0, name
        if name != "eager":
            assert 0.0 <= r["label_agreement_vs_eager"] <= 1.0
    # fp32 variants compute the same function up to rounding: (nearly) every label agrees.
    for name in ("eager-cl", "fused", "fused-cl"):
        assert by[name]["max_abs_diff_vs_eager"] < 1e-3, name
        assert by[name]["label_agreement_vs_eager"] > 0.99, name
    # bfloat16 keeps 8 bits of mantissa: the logits differ visibly.
    assert by["fused-cl-bf16"]["max_abs_diff_vs_eager"] > 1e-4


def test_interleaved_bench_times_every_variant_in_rounds_and_renders():
    """The interleaved model benchmark: every plain variant timed once per round, the same number
    of times; the speedups are paired ratios against the fastest fp32 plain-PyTorch variant,
    which therefore scores exactly 1; the report renders the table."""
    from bench import report
    from bench.model_bench import (BASELINES_FP32, bench_interleaved, floor_variants,
                                   inference_variants)
    from bench.timing import Budget

    recs = bench_interleaved("cpu", (32, 64), Budget().scaled(0.02), with_compile=False,
                             progress=False, min_rounds=4)
    by = {r["variant"]: r for r in recs}
    assert set(by) == {v[0] for v in inference_variants("cpu", False) + floor_variants("cpu")}
    rounds = {r["rounds"] for r in recs}
    assert len(rounds) == 1 and rounds.pop() >= 4
    for name, r in by.items():
        assert "error" not in r, (name, r.get("error"))
        assert r["n"] == r["rounds"] and 0 < r["min_ms"] <= r["q25_ms"] <= r["median_ms"]
        assert r["speedup_vs_baseline"] > 0
    base = by["eager"]["baseline"]
    assert base in BASELINES_FP32
    assert by[base]["speedup_vs_baseline"] == 1.0
    assert by[base]["median_ms"] == min(by[n]["median_ms"] for n in BASELINES_FP32 if n in by)
    text = report.model_tables({"model": {"inference": [], "interleaved": recs}})
    assert "interleaved" in text and f"vs {base}" in text
    assert all(f"| {name} |" in text for name in by)
    # Each variant's time over the floor of its dtype, a row of the same rounds. (Not asserted
    # above 1: at this size and round count it is timing noise, and a loaded CI machine once
    # gave 0.93 for the frozen bf16 model.)
    # And over the packed floor: the same convolutions as the frozen model runs them.
    for name, r in by.items():
        if name.startswith("floor"):
            assert "over_floor" not in r and "over_packed_floor" not in r
        else:
            bf16 = "-bf16" if r["dtype"] == "bf16" else ""
            assert r["floor"] == f"floor-cl{bf16}"
            assert r["packed_floor"] == f"floor-cl-packed{bf16}"
            assert r["over_floor"] > 0 and r["over_packed_floor"] > 0, name
    assert "over floor" in text and "over packed floor" in text
    assert all(r["order"] == "shuffled" for r in recs) and "a shuffled order" in text


def test_round_order_is_a_permutation_with_varying_predecessors():
    """Each round calls every variant once; across rounds a variant follows different others
    (a rotation kept every variant behind the same one) and runs first in different rounds; the
    orders are reproducible."""
    from bench.timing import round_order

    names = [f"v{i}" for i in range(11)]
    orders = [round_order(names, r) for r in range(40)]
    assert all(sorted(o) == sorted(names) for o in orders)
    assert orders == [round_order(names, r) for r in range(40)]
    for n in names:
        before = {o[o.index(n) - 1] for o in orders if o.index(n) > 0}
        assert len(before) >= 3, (n, before)
    assert len({o[0] for o in orders}) >= 5


def test_floor_run_renders_per_resolution_and_is_listed_after_the_full_run(tmp_path):
    from bench import report

    def rec(res, variant, dtype, ms, floor=None):
        r = {"res": list(res), "variant": variant, "dtype": dtype, "median_ms": ms,
             "iqr_ms": 1.0, "min_ms": ms, "rounds": 9, "baseline": "compile-cl",
             "speedup_vs_baseline": 100.0 / ms}
        return dict(r, floor=floor, over_floor=ms / 50.0) if floor else r

    inter = [rec(hw, v, dt, ms, f) for hw in ((256, 512), (512, 1024)) for v, dt, ms, f in (
        ("compile-cl", "fp32", 100.0, "floor-cl"), ("frozen-cl-bf16", "bf16", 64.5, "floor-cl-bf16"),
        ("floor-cl-bf16", "bf16", 50.0, None))]
    machine = {"slug": "cpu-x-2c", "device": "cpu", "cpu_model": "X", "cpu_usable_cores": 2,
               "torch": "2.14"}
    full = {"complete": True, "mode": "default", "date": "2026-12-03 10:00 UTC", "ops": [],
            "machine": machine, "model": {"inference": []}}
    floors = {"only": "interleaved", "complete": True, "mode": "default", "machine": machine,
              "date": "2026-12-03 11:00 UTC", "model": {"interleaved": inter}}
    (tmp_path / "a.json").write_text(json.dumps(full))
    (tmp_path / "b.json").write_text(json.dumps(floors))
    got = report.latest(str(tmp_path))
    assert [r.get("only") for r in got] == [None, "interleaved"]
    text = report.summary_table(got)
    # README: the 512x1024 table, a pointer to the others; the full run adds no second table.
    assert "At 512x1024 (9 rounds)" in text and "At 256x512" not in text
    assert "The same rows at 256x512" in text
    assert "| `frozen-cl-bf16` |" in text and "1.29x" in text  # 64.5 / 50
    assert text.count("| variant |") == 1
    full_tables = report.model_tables(got[1])  # bench/README.md: every resolution
    assert "at 256x512, batch 1, interleaved" in full_tables and "over floor" in full_tables


def test_latest_takes_the_newest_complete_run_and_skips_other_kinds(tmp_path):
    def write(name, **rec):
        rec.setdefault("machine", {"slug": "cpu-x-2c"})
        (tmp_path / name).write_text(json.dumps(rec))

    write("a.json", complete=True, mode="default", date="2026-12-01 10:00 UTC", ops=[])
    write("b.json", complete=True, mode="default", date="2026-12-02 10:00 UTC", ops=[])
    write("c.json", complete=False, mode="default", date="2026-12-03 10:00 UTC", ops=[])
    write("d.json", kind="malloc_ab", date="2026-12-04 10:00 UTC")
    write("e.json", kind="malloc_ab", machine={"slug": "cpu-y-4c"})  # not a bench.run file
    write("f.json", kind="deploy", date="2026-12-05 10:00 UTC")
    write("g.json", complete=True, mode="default", date="2026-12-06 10:00 UTC")  # --only model
    write("h.json", kind="sm90-static", date="2026-12-07 10:00 UTC", records=[])  # the model
    (got,) = report.latest(str(tmp_path))
    assert got["date"] == "2026-12-02 10:00 UTC"


def _run_results(tmp_path, eager_ms=300.0, fused_ms=100.0):
    """A bench.run results file with just what the summary and the full model tables read."""
    inter = [dict(res=[64, 128], variant=v, dtype="fp32", median_ms=ms, iqr_ms=1.0, min_ms=ms,
                  rounds=5, baseline="eager", speedup_vs_baseline=eager_ms / ms)
             for v, ms in (("eager", eager_ms), ("fused-cl", fused_ms))]
    inf = [dict(res=[64, 128], variant=v, fused=v != "eager", dtype="fp32", median_ms=ms,
                iqr_ms=1.0, speedup_vs_eager=eager_ms / ms,
                label_agreement_vs_eager=None if v == "eager" else 0.5)
           for v, ms in (("eager", eager_ms), ("fused-cl", fused_ms))]
    res = {"date": "2026-12-03 12:00 UTC", "command": "python -m bench.run", "complete": True,
           "mode": "default", "copy_bandwidth": {"gbs": 10.0},
           "machine": {"device": "cpu", "cpu_model": "Test CPU", "cpu_usable_cores": 2,
                       "torch": "2.x", "triton": "3.x", "python": "3.x", "slug": "cpu-test-2c"},
           "model": {"inference": inf, "interleaved": inter}}
    path = tmp_path / "results.json"
    path.write_text(json.dumps(res))
    return path


def _between(text, start, end):
    span = report._section(text, start, end)
    assert span, f"no {start} ... {end} section"
    return text[span[0]:span[1]]


def test_write_puts_the_summary_in_readme_and_the_full_tables_in_bench_readme(tmp_path):
    """One --write call renders both files from the same results: README's summary table and
    bench/README.md's full tables name the same source and hold the same timings."""
    results = _run_results(tmp_path, eager_ms=300.0, fused_ms=123.0)
    readme, bench_readme = tmp_path / "README.md", tmp_path / "BENCH.md"
    quoted = f"Prose may quote `{report.SUMMARY_START}` and `{report.SUMMARY_END}`.\n"
    readme.write_text(f"# x\n{quoted}\n{report.SUMMARY_START}\nold numbers\n{report.SUMMARY_END}"
                      "\n\nrest\n")
    bench_readme.write_text(f"# b\n{report.START}\nold tables\n{report.END}\n")
    assert report.main([str(results), "--write", str(readme), str(bench_readme)]) == 0
    summary = _between(readme.read_text(), report.SUMMARY_START, report.SUMMARY_END)
    tables = _between(bench_readme.read_text(), report.START, report.END)
    assert "old" not in summary and "old" not in tables
    assert readme.read_text().endswith("\n\nrest\n") and quoted in readme.read_text()
    assert "| `fused-cl` |" in summary and "123 (1)" in summary and "2.44x" in summary
    assert "interleaved" in tables and "123 (1)" in tables and "2.44x" in tables
    assert "DABNet inference, batch 1" not in summary  # the full tables stay out of README
    src = [line for line in summary.splitlines() if line.startswith("Source:")]
    assert src and src == [line for line in tables.splitlines() if line.startswith("Source:")]
    # A file with neither section is refused before anything is written.
    other = tmp_path / "other.md"
    other.write_text("no markers\n")
    before = readme.read_text()
    with pytest.raises(SystemExit, match="no section"):
        report.main([str(_run_results(tmp_path, fused_ms=50.0)), "--write", str(readme),
                     str(other)])
    assert readme.read_text() == before


def test_readme_and_bench_readme_are_rendered_from_the_results_on_record():
    """README.md's summary and bench/README.md's tables are what `make bench-report` renders from
    bench/results today: numbers edited by hand, or a new results file not rendered, fail here."""
    import os

    results = report.latest()
    with open(os.path.join(report.REPO_DIR, "README.md")) as f:
        readme = f.read()
    with open(os.path.join(report.REPO_DIR, "bench", "README.md")) as f:
        bench_readme = f.read()
    summary = _between(readme, report.SUMMARY_START, report.SUMMARY_END)
    tables = _between(bench_readme, report.START, report.END)
    assert summary.strip() == report.summary_table(results).strip(), \
        "README.md's benchmark summary is stale: run `make bench-report`"
    assert tables.strip() == report.render(results).strip(), \
        "bench/README.md's benchmark tables are stale: run `make bench-report`"
    history = _between(bench_readme, report.HISTORY_START, report.HISTORY_END)
    assert history.strip() == report.history_table(report.all_runs()).strip(), \
        "bench/README.md's list of runs is stale: run `make bench-report`"
    assert report.START not in readme  # the full tables live in bench/README.md only
    model = report.static_model()
    assert _between(readme, report.SASS_SUMMARY_START, report.SASS_SUMMARY_END).strip() == \
        report.sass.summary_markdown(model).strip(), \
        "README.md's static model table is stale: run `make bench-report`"
    assert _between(bench_readme, report.SASS_START, report.SASS_END).strip() == \
        report.sass.tables_markdown(model).strip(), \
        "bench/README.md's static model tables are stale: run `make bench-report`"


def test_git_commit_marks_uncommitted_changes_to_tracked_files(tmp_path):
    import shutil
    import subprocess

    from bench import machine

    if shutil.which("git") is None:
        pytest.skip("no git")
    git = lambda *a: subprocess.run(["git", "-C", str(tmp_path), "-c", "user.name=t",  # noqa: E731
                                     "-c", "user.email=t@t", *a], check=True,
                                    capture_output=True, text=True).stdout.strip()
    git("init", "-q")
    (tmp_path / "k.py").write_text("a = 1\n")
    git("add", "k.py")
    git("commit", "-qm", "one")
    head = git("rev-parse", "--short", "HEAD")
    assert machine.git_commit(str(tmp_path)) == head
    (tmp_path / "new.txt").write_text("untracked files do not count\n")
    assert machine.git_commit(str(tmp_path)) == head
    (tmp_path / "k.py").write_text("a = 2\n")
    assert machine.git_commit(str(tmp_path)) == head + "-dirty"


def test_packed_floor_runs_only_the_frozen_models_convolutions():
    """The packed floor times convolutions as dabnet.freeze runs them (no bias, no groups or
    dilation, 'same' padding); another convolution is refused by name, not timed as something
    else."""
    from bench.model_bench import floor_fn

    x = torch.rand(1, 8, 6, 6).contiguous(memory_format=torch.channels_last)
    ok = torch.nn.Conv2d(8, 4, 3, padding=1, bias=False)
    floor_fn([(ok, x)], packed=True)()
    for bad in (torch.nn.Conv2d(8, 4, 3, padding=1), torch.nn.Conv2d(8, 4, 3, bias=False),
                torch.nn.Conv2d(8, 8, 3, padding=1, groups=2, bias=False)):
        with pytest.raises(ValueError, match="packed floor"):
            floor_fn([(bad, x)], packed=True)
