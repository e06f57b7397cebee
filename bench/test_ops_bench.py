"""Op micro-benchmarks under pytest-benchmark: every op, inference forward and training
forward+backward, each backend of ours and the reference, NCHW and channels_last, block 1 (C=32,
dilation 2) and block 2 (C=64, dilation 4) necks. Grouped by case, so each group compares ours
with the reference. See conftest.py for the options."""
import pytest
import torch

from bench import cases as C
from bench.ops_bench import _outputs
from dabnet_kernels import ops, reference
from dabnet_kernels.backend import use_backend

TOL = {"fp32": 1e-4}


def _case(op, mode, block, layout, res):
    d = {1: 2, 2: 4}[block]
    return C.OpCase(op, mode, res, block, 1 if mode == "fwd" else 2, 0 if op == "bn_prelu" else d,
                    "3x1" if op in ("dwconv3", "dwconv3_bn_prelu") else "-", "fp32", layout)


def _as64(t):
    """The same inputs in float64 (the reference's oracle)."""
    def c(v):
        return None if v is None else v.detach().double().requires_grad_(v.requires_grad)

    return {"x": c(t["x"]), "w": [c(w) for w in t["w"]],
            "bn": [type(p)(*(c(v) for v in p)) for p in t["bn"]], "gy": c(t["gy"])}


@pytest.mark.parametrize("layout", C.LAYOUTS)
@pytest.mark.parametrize("block", (1, 2))
@pytest.mark.parametrize("mode", C.MODES)
@pytest.mark.parametrize("op", C.OPS)
def test_op(benchmark, op, mode, block, layout, impl, bench_device, bench_res):
    case = _case(op, mode, block, layout, bench_res)
    t = C.prepare(case, C.make_inputs(case, bench_device))
    lib = reference if impl == "reference" else ops
    run = C.runner(case, lambda tt: C.forward(lib, case, tt))
    sync = torch.cuda.synchronize if bench_device == "cuda" else (lambda: None)

    def call():
        out = run(t)
        sync()
        return out

    benchmark.group = f"{op} {mode} {case.label()}"
    benchmark.extra_info.update(case.as_dict())
    with use_backend("reference" if impl == "reference" else impl):
        got = benchmark(call)
        got = [got] if case.mode == "fwd" else [C.forward(lib, case, t).detach(), *got]
    if impl == "reference":  # the baseline itself, against float64
        want = _outputs(case, lambda tt: C.forward(reference, case, tt),
                        C.prepare(case, _as64(t)))
    else:
        want = _outputs(case, lambda tt: C.forward(reference, case, tt), t)
    assert len(got) == len(want)
    for g, w in zip(got, want):
        if w is None:
            continue
        scale = max(1.0, w.abs().max().item())
        err = (g.double() - w.double()).abs().max().item()
        assert err <= TOL[case.dtype] * scale, (
            f"{impl}: max abs error {err:.3g} (scale {scale:.3g})")
