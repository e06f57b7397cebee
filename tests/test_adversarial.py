"""Hostile but ordinary use: empty tensors, infinities and NaN, higher-order gradients, untrusted
checkpoints, concurrent runs, TorchScript, unreadable images, huge rows. Each case must end in a
correct result or a clear error: never a crash, a silently wrong value, or code run from a file.
"""
import os
import subprocess
import sys
import textwrap
import time
from pathlib import Path

import numpy as np
import pytest
import torch

import dabnet_kernels
from dabnet_kernels import ops, reference
from dabnet_kernels.backend import triton_available, use_backend
from helpers import bn_list, bn_params, clone_params, dw_weight

ROOT = Path(__file__).resolve().parents[1]
F64 = torch.float64
BACKENDS = ["cpu", "reference"] + (["triton"] if triton_available() else [])


# --------------------------------------------------------------------------- empty tensors
def _neck_args(C):
    return [dw_weight(C, a) for a in "hwhw"], [bn_params(C) for _ in range(5)]


# name -> (call(x), expected output shape from x's shape)
EMPTY_OPS = {
    "dwconv3 3x1": (lambda x: ops.dwconv3(x, dw_weight(x.shape[1], "h"), 2), lambda s: s),
    "dwconv3 1x3": (lambda x: ops.dwconv3(x, dw_weight(x.shape[1], "w"), 3), lambda s: s),
    "bn_prelu train": (lambda x: ops.bn_prelu(x, *bn_list(x.shape[1]), True), lambda s: s),
    "bn_prelu eval": (lambda x: ops.bn_prelu(x, *bn_list(x.shape[1]), False), lambda s: s),
    "dwconv3_bn_prelu train": (lambda x: ops.dwconv3_bn_prelu(
        x, dw_weight(x.shape[1], "h"), 2, *bn_list(x.shape[1]), True), lambda s: s),
    "dwconv3_bn_prelu eval": (lambda x: ops.dwconv3_bn_prelu(
        x, dw_weight(x.shape[1], "w"), 2, *bn_list(x.shape[1]), False), lambda s: s),
    "dab_neck eval": (lambda x: ops.dab_neck(x, *_neck_args(x.shape[1]), 2), lambda s: s),
    "dab_neck train": (lambda x: ops.dab_neck(x, *_neck_args(x.shape[1]), 2, training=True),
                       lambda s: s),
    "cat_bn_prelu eval": (lambda x: ops.cat_bn_prelu([x, x], *bn_list(2 * x.shape[1]), False),
                          lambda s: (s[0], 2 * s[1], *s[2:])),
    "upsample_bilinear": (lambda x: ops.upsample_bilinear(x, (8, 8)),
                          lambda s: (*s[:2], 8, 8)),
    "upsample_argmax": (lambda x: ops.upsample_argmax(x, (8, 8)), lambda s: (s[0], 8, 8)),
    "avg_pool3x3s2": (lambda x: ops.avg_pool3x3s2(x),
                      lambda s: (*s[:2], (s[2] - 1) // 2 + 1, (s[3] - 1) // 2 + 1)),
    "max_pool2x2": (lambda x: ops.max_pool2x2(x), lambda s: (*s[:2], s[2] // 2, s[3] // 2)),
}
EMPTY_SHAPES = [(0, 4, 5, 6), (2, 0, 5, 6), (2, 4, 0, 6), (2, 4, 5, 0), (0, 0, 0, 0)]


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("shape", EMPTY_SHAPES, ids=lambda s: "x".join(map(str, s)))
@pytest.mark.parametrize("op", list(EMPTY_OPS))
@pytest.mark.parametrize("layout", ["nchw", "channels_last"])
def test_empty_inputs_give_an_empty_result_or_a_clear_error(op, shape, backend, layout):
    call, expect = EMPTY_OPS[op]
    x = torch.randn(shape, dtype=F64)
    if layout == "channels_last":
        x = x.contiguous(memory_format=torch.channels_last)
    with use_backend(backend):
        try:
            out = call(x)
        except (ValueError, RuntimeError) as e:
            assert len(str(e)) > 20, f"unclear error: {e!r}"
            return
    assert tuple(out.shape) == tuple(expect(shape)) and out.numel() == 0


@pytest.mark.parametrize("fn", [ops.upsample_bilinear, ops.upsample_argmax])
@pytest.mark.parametrize("shape", [(1, 2, 0, 4), (1, 2, 4, 0), (0, 2, 0, 4)])
def test_upsampling_an_empty_image_is_a_clear_error(fn, shape):
    # It used to read past the input and kill the process (rc 139).
    with pytest.raises(ValueError, match="spatial size is empty"):
        fn(torch.randn(shape), (8, 8))
    op = getattr(torch.ops.dabnet, fn.__name__)  # the kernel itself, past the Python checks
    with pytest.raises(RuntimeError, match="empty spatial size"):
        op(torch.randn(shape), 8, 8)


@pytest.mark.parametrize("size", [(0, 8), (8, 0), (-1, 8)])
def test_an_empty_output_size_is_a_clear_error(size):
    for fn in (ops.upsample_bilinear, ops.upsample_argmax):
        with pytest.raises(ValueError, match="two positive ints"):
            fn(torch.randn(1, 2, 4, 4), size)


# ----------------------------------------------------------------- higher-order gradients
def _second_order(f, x, w):
    gx, = torch.autograd.grad(f(x, w, 2).pow(2).sum(), x, create_graph=True)
    return torch.autograd.grad(gx.pow(2).sum(), w)[0]


@pytest.mark.parametrize("backend", [b for b in BACKENDS if b != "reference"])
@pytest.mark.parametrize("along", ["h", "w"])
def test_dwconv3_second_derivative_is_that_of_conv2d(backend, along):
    """The issue's case: d/dw of |d/dx sum(dwconv3(x, w)^2)|^2 came back as zeros."""
    x = torch.randn(2, 3, 7, 8, dtype=F64, requires_grad=True)
    w = dw_weight(3, along).requires_grad_()
    want = _second_order(reference.dwconv3, x, w)
    with use_backend(backend):
        got = _second_order(ops.dwconv3, x, w)
    assert want.abs().max() > 1e-3
    torch.testing.assert_close(got, want, rtol=1e-10, atol=1e-10)


def test_dab_neck_second_derivative_is_that_of_the_reference():
    """The training neck composes the ops above; its second derivative as the reference's."""
    x = torch.randn(2, 3, 6, 7, dtype=F64, requires_grad=True)
    weights, bns = _neck_args(3)
    w = weights[2].requires_grad_()

    def second(f):
        gx, = torch.autograd.grad(f(x, weights, bns, 2, True).pow(2).sum(), x, create_graph=True)
        return torch.autograd.grad(gx.pow(2).sum(), w)[0]

    bns_ref = [clone_params(p) for p in bns]
    want = second(lambda *a: reference.dab_neck(*a[:3], a[3], training=a[4]))
    bns[:] = bns_ref
    got = second(lambda *a: ops.dab_neck(*a[:3], a[3], training=a[4]))
    assert want.abs().max() > 1e-3
    torch.testing.assert_close(got, want, rtol=1e-8, atol=1e-8)


def _gg_cases(shape):
    """(name, function of the differentiable tensors, those tensors) for gradgradcheck."""
    C = shape[1]
    x = torch.randn(shape, dtype=F64)
    w = dw_weight(C, "h")
    p = bn_params(C)
    single = bn_params(C, single_slope=True)
    aff = [p.weight, p.bias, p.prelu_weight]
    cat_bn = bn_list(2 * C)
    stats = [p.running_mean, p.running_var]

    def with_stats(training, f):  # fresh running statistics per call: training updates them
        return lambda *t: f(*t, *[s.clone() for s in stats], training)

    return [
        ("dwconv3", lambda x, w: ops.dwconv3(x, w, 2), [x, w]),
        ("dwconv3 1x3", lambda x, w: ops.dwconv3(x, w, 1), [x, dw_weight(C, "w")]),
        ("bn_prelu train", with_stats(True, lambda x, g, b, a, rm, rv, t:
                                      ops.bn_prelu(x, g, b, rm, rv, a, t)), [x, *aff]),
        ("bn_prelu eval", with_stats(False, lambda x, g, b, a, rm, rv, t:
                                     ops.bn_prelu(x, g, b, rm, rv, a, t)), [x, *aff]),
        ("bn_prelu no stats", lambda x, g, b, a: ops.bn_prelu(x, g, b, None, None, a, False),
         [x, *aff]),
        ("bn_prelu one slope", lambda x, a: ops.bn_prelu(x, single.weight, single.bias, None,
                                                          None, a, True), [x, single.prelu_weight]),
        ("dwconv3_bn_prelu train", with_stats(True, lambda x, w, g, b, a, rm, rv, t:
                                              ops.dwconv3_bn_prelu(x, w, 2, g, b, rm, rv, a, t)),
         [x, w, *aff]),
        ("dwconv3_bn_prelu eval", with_stats(False, lambda x, w, g, b, a, rm, rv, t:
                                             ops.dwconv3_bn_prelu(x, w, 2, g, b, rm, rv, a, t)),
         [x, w, *aff]),
        ("cat_bn_prelu", lambda x, y: ops.cat_bn_prelu([x, y], *cat_bn, True),
         [x, torch.randn_like(x)]),
        ("upsample_bilinear", lambda x: ops.upsample_bilinear(x, (9, 13)), [x]),
    ]


# The C++ ops on every case; the Triton ops (their Python autograd) on a few tiny ones: under the
# interpreter each of gradgradcheck's hundreds of forward calls takes tens of milliseconds.
GG = [("cpu", c) for c in _gg_cases((2, 2, 4, 5))]
if "triton" in BACKENDS:
    GG += [("triton", c) for c in _gg_cases((1, 2, 3, 4))
           if c[0] in ("dwconv3", "bn_prelu train", "dwconv3_bn_prelu eval")]


@pytest.mark.parametrize("backend,case", GG, ids=[f"{b}-{c[0]}" for b, c in GG])
def test_gradgradcheck(case, backend):
    _, fn, inputs = case
    inputs = [t.detach().clone().requires_grad_() for t in inputs]
    with use_backend(backend):
        assert torch.autograd.gradgradcheck(fn, inputs, eps=1e-6, atol=1e-5, rtol=1e-4)


def test_torch_func_transforms():
    """torch.func.grad / jvp are refused with a clear error by the C++ autograd (it is not a
    functorch-aware autograd.Function); vmap runs the op per sample."""
    x = torch.randn(2, 3, 5, 6, dtype=F64)
    w = dw_weight(3, "h")
    with pytest.raises(RuntimeError, match="(?i)functorch|torch.func|autograd.Function|vmap|"
                                           "not supported|unsupported"):
        torch.func.grad(lambda t: ops.dwconv3(t, w, 2).sum())(x)
    with pytest.raises(RuntimeError, match="(?i)functorch|torch.func|autograd.Function|jvp|"
                                           "forward|not supported|unsupported|not implemented"):
        torch.func.jvp(lambda t: ops.dwconv3(t, w, 2), (x,), (torch.ones_like(x),))
    got = torch.func.vmap(lambda t: ops.dwconv3(t[None], w, 2)[0])(x)
    torch.testing.assert_close(got, reference.dwconv3(x, w, 2))


# ------------------------------------------------------------- argmax with inf and NaN
def _argmax_cases():
    rng = torch.Generator().manual_seed(3)
    base = torch.randn(2, 4, 3, 5, dtype=F64, generator=rng)
    cases = {"finite": base.clone()}
    inf = base.clone()
    inf[0, 1, 1, 2] = float("inf")  # one +inf logit: torch picks its class around it
    inf[1, 2, 0, 0] = float("inf")
    inf[1, 3, 2, 4] = float("-inf")
    cases["inf"] = inf
    nan = base.clone()
    nan[:, 2] = float("nan")  # a class that is NaN everywhere wins everywhere
    cases["all-nan class"] = nan
    spot = base.clone()
    spot[0, 3, 1, 1] = float("nan")
    spot[1, 0, 2, 3] = float("nan")
    spot[1, 1, 2, 3] = float("nan")  # two NaN classes at one pixel: the first wins
    cases["nan spots"] = spot
    ties = base.clone()
    ties[:, 2] = ties[:, 1]  # exact ties: the first index wins
    cases["ties"] = ties
    return cases


ARGMAX = _argmax_cases()


@pytest.mark.parametrize("dtype", [F64, torch.float32])
@pytest.mark.parametrize("name", list(ARGMAX))
@pytest.mark.parametrize("size", [(7, 11), (24, 40), (3, 5), (3, 11), (7, 5)])
def test_upsample_argmax_matches_torch_argmax(name, size, dtype):
    logits = ARGMAX[name].to(dtype)
    want = reference.upsample_argmax(logits, size)
    got = ops.upsample_argmax(logits, size)
    assert torch.equal(got, want), (got != want).nonzero()[:5]
    cl = ops.upsample_argmax(logits.contiguous(memory_format=torch.channels_last), size)
    assert torch.equal(cl, want)


def test_upsample_argmax_examples_of_the_issue():
    x = torch.tensor([[[[0.0, 0.0]], [[float("inf"), 0.0]], [[1.0, 1.0]]]])
    assert torch.equal(ops.upsample_argmax(x, (1, 2)), reference.upsample_argmax(x, (1, 2)))
    y = torch.tensor([[[[0.0, 5.0, 0.0]], [[1.0, 0.0, 0.0]], [[float("nan")] * 3],
                       [[0.0, 0.0, 9.0]]]])
    assert torch.equal(ops.upsample_argmax(y, (1, 3)), torch.full((1, 1, 3), 2))


# --------------------------------------------------------------------------- checkpoints
class _Planted:
    """A pickle that creates a file when unpickled: what a malicious checkpoint would do."""

    def __init__(self, marker):
        self.marker = str(marker)

    def __reduce__(self):
        return (Path.touch, (Path(self.marker),))


@pytest.mark.parametrize("legacy", [False, True])
def test_a_checkpoint_cannot_run_code(tmp_path, legacy, capsys):
    from dabnet import DABNet
    from dabnet.checkpoint import UnsafeCheckpointError, load_checkpoint
    from dabnet.cli import main

    marker = tmp_path / "pwned"
    evil = tmp_path / "evil.pt"
    torch.save({"model": DABNet(8).state_dict(), "x": _Planted(marker)}, evil,
               _use_new_zipfile_serialization=not legacy)
    with pytest.raises(UnsafeCheckpointError, match="cannot read checkpoint .* safely"):
        load_checkpoint(evil)
    assert main(["eval", "-c", str(evil), "--no-progress"]) == 2
    err = capsys.readouterr().err
    assert "arbitrary code" in err and ("pathlib" in err or "GLOBAL" in err or "global" in err)
    assert not marker.exists()


def test_checkpoint_formats_still_load(tmp_path):
    from dabnet import DABNet
    from dabnet.checkpoint import load_checkpoint, load_model

    sd = DABNet(8).state_dict()
    formats = {
        "bare": sd,
        "authors": {"epoch": 7, "model": sd},
        "dataparallel": {"epoch": 7, "model": {f"module.{k}": v for k, v in sd.items()}},
        # an older training checkpoint of this pipeline: numpy's RNG state as an array
        "numpy rng": {"model": sd, "rng": {"numpy": np.random.get_state()}},
    }
    for name, obj in formats.items():
        torch.save(obj, tmp_path / f"{name}.pt")
        model, meta = load_model(tmp_path / f"{name}.pt")
        assert meta["classes"] == 8, name
        for k, v in model.state_dict().items():
            assert torch.equal(v, sd[k]), (name, k)
    keys = load_checkpoint(tmp_path / "numpy rng.pt")["rng"]["numpy"][1]
    assert isinstance(keys, np.ndarray) and keys.dtype == np.uint32


def test_resume_from_an_older_checkpoint_with_a_numpy_rng_state(tmp_path):
    from dabnet.checkpoint import load_checkpoint
    from dabnet.train import train
    from pipeline_utils import tiny_cfg

    train(tiny_cfg(tmp_path, max_steps=2, stop_after_steps=1))
    ck = load_checkpoint(tmp_path / "last.pt")
    kind, keys, *rest = ck["rng"]["numpy"]
    assert isinstance(keys, torch.Tensor)  # written weights-only loadable
    ck["rng"]["numpy"] = (kind, keys.numpy().astype(np.uint32), *rest)  # as older files hold it
    torch.save(ck, tmp_path / "last.pt")
    r = train(tiny_cfg(tmp_path, max_steps=2, resume="auto"))
    assert r["iteration"] == 2


# ---------------------------------------------------------------- one run per output folder
def _tiny_train_args(out):
    return ["train", "--out", str(out), "--max-steps", "1", "--batch-size", "2", "--crop",
            "32x32", "--synthetic-length", "2", "--synthetic-size", "32x64", "--workers", "0",
            "--no-progress", "--device", "cpu", "--val-every", "0"]


def _hold_lock(folder):
    """A separate process that takes the folder's lock and waits to be killed."""
    code = textwrap.dedent(f"""
        import time
        from dabnet.lock import OutputLock
        lock = OutputLock({str(folder)!r}).acquire()  # held while referenced
        print("locked", flush=True)
        time.sleep(120)
    """)
    p = subprocess.Popen([sys.executable, "-c", code], stdout=subprocess.PIPE, text=True,
                         cwd=ROOT, env={**os.environ, "PYTHONPATH": str(ROOT)})
    assert p.stdout.readline().strip() == "locked"
    return p


def test_a_second_run_on_the_same_folder_is_refused(tmp_path, capsys):
    from dabnet.cli import main
    from dabnet.lock import OutputInUseError, OutputLock

    out = tmp_path / "run"
    with OutputLock(out):
        with pytest.raises(OutputInUseError, match=f"{out}.*pid {os.getpid()}"):
            OutputLock(out).acquire()
    holder = _hold_lock(out)
    try:
        assert main(_tiny_train_args(out)) == 2
        err = capsys.readouterr().err
        assert str(out) in err and f"pid {holder.pid}" in err and "in use" in err
        assert not (out / "last.pt").exists() and not (out / "config.json").exists()
    finally:
        holder.kill()  # SIGKILL: no chance to clean up
        holder.wait()
    assert (out / ".dabnet-train.lock").exists()  # the dead holder's file is left behind ...
    assert main(_tiny_train_args(out)) == 0  # ... but its lock died with it
    assert (out / "last.pt").is_file()


# ------------------------------------------------------------------------------ TorchScript
def test_torchscript_of_the_fused_model_is_one_clear_error():
    from dabnet import DABNet

    model = DABNet(8, fused=True).eval()
    x = torch.randn(1, 3, 32, 64)
    with pytest.raises(RuntimeError, match="torch.export"):
        torch.jit.trace(model, x)
    with pytest.raises(RuntimeError, match="torch.export"):
        torch.jit.script(model)
    unit = dabnet_kernels.nn.FusedBNPReLU(4).eval()
    with pytest.raises(RuntimeError, match="TorchScript"):
        torch.jit.trace(unit, torch.randn(1, 4, 3, 3))


# ------------------------------------------------------------------------------ predict
def test_predict_skips_unreadable_images_unless_strict(tmp_path, capsys):
    from dabnet import DABNet
    from dabnet.cli import main
    from pipeline_utils import write_png

    torch.save(DABNet(8).state_dict(), tmp_path / "m.pt")
    imgs = tmp_path / "imgs"
    write_png(imgs / "a.png", np.random.default_rng(0).integers(0, 256, (32, 48, 3)))
    (imgs / "b.png").write_bytes(b"\x89PNG but not really")
    write_png(imgs / "c.png", np.random.default_rng(1).integers(0, 256, (32, 48, 3)))
    args = ["predict", "-c", str(tmp_path / "m.pt"), str(imgs), "--dataset", "synthetic",
            "--no-progress"]
    assert main([*args, "--out", str(tmp_path / "p")]) == 1
    err = capsys.readouterr().err
    assert "b.png" in err and "skipped" in err
    written = sorted(p.name for p in (tmp_path / "p").iterdir())
    assert written == ["a_color.png", "a_overlay.png", "c_color.png", "c_overlay.png"]
    assert main([*args, "--out", str(tmp_path / "s"), "--strict"]) == 2
    assert "cannot read image" in capsys.readouterr().err


# -------------------------------------------------------------------------- huge rows
@pytest.mark.parametrize("along", ["h", "w"])
def test_dwconv3_on_a_long_row_needs_no_row_sized_scratch(along):
    """A 1x1x1xW input: peak memory ~ input + output. The kernel's per-thread scratch was sized
    by the row (3 W elements: 21 GB for a 4.3 GB bf16 row of 2^31 + 7); it is bounded now.
    Measured at W = 2^25 in float32 (128 MiB), in a fresh process."""
    code = textwrap.dedent(f"""
        import resource, torch
        from dabnet_kernels import ops
        W = 1 << 25
        x = torch.randn(1, 1, 1, W)
        w = torch.randn((1, 1, 3, 1) if {along!r} == "h" else (1, 1, 1, 3))
        want = ops.dwconv3(x[..., :4096].contiguous(), w, 2)  # warm up, small
        base = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024
        y = ops.dwconv3(x, w, 2)
        peak = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024
        assert torch.allclose(y[..., 100:4000], want[..., 100:4000], atol=1e-5)
        print(peak - base, x.numel() * 4)
    """)
    r = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, cwd=ROOT,
                       env={**os.environ, "PYTHONPATH": str(ROOT), "OMP_NUM_THREADS": "2"})
    assert r.returncode == 0, r.stderr
    grew, nbytes = map(int, r.stdout.split())
    # the output itself, plus slack; the row-sized scratch added 3x the input
    assert grew < 1.5 * nbytes, f"peak grew by {grew / nbytes:.2f}x the input"


# ------------------------------------------------------------------ deployment patterns
def test_fused_model_built_inside_inference_mode():
    """Built, loaded and moved inside torch.inference_mode(): its parameters are inference
    tensors, which keep no version counter (the kept fold of the neck used to fail on them)."""
    from dabnet import DABNet

    plain = DABNet(8).eval()
    x = torch.randn(1, 3, 32, 64)
    with torch.inference_mode():
        fused = DABNet(8, fused=True).eval()
        fused.load_state_dict(plain.state_dict())
        fused = fused.to("cpu")
        assert next(fused.parameters()).is_inference()
        first, second = fused(x), fused(x)
        want = plain(x)
    torch.testing.assert_close(first, want, rtol=1e-4, atol=1e-4)
    torch.testing.assert_close(second, want, rtol=1e-4, atol=1e-4)
    with torch.inference_mode():  # an in-place update under inference mode is seen
        for p in fused.parameters():
            p.mul_(0.5)
        plain.load_state_dict(fused.state_dict())
        torch.testing.assert_close(fused(x), plain(x), rtol=1e-4, atol=1e-4)


def test_set_backend_is_exported_at_the_top_level():
    before = dabnet_kernels.get_backend()
    try:
        dabnet_kernels.set_backend("reference")
        assert dabnet_kernels.get_backend() == "reference"
        with dabnet_kernels.use_backend("cpu"):
            assert dabnet_kernels.get_backend() == "cpu"
        with pytest.raises(ValueError):
            dabnet_kernels.set_backend("nonsense")
    finally:
        dabnet_kernels.set_backend(before)


# ------------------------------------------------------------------------ CLI subcommands
@pytest.mark.parametrize("cmd", ["eval", "predict", "export", "info"])
@pytest.mark.parametrize("kind", ["missing", "garbage", "empty", "a tensor"])
def test_every_subcommand_refuses_a_bad_checkpoint_clearly(cmd, kind, tmp_path, capsys):
    from dabnet.cli import main

    path = tmp_path / "ck.pt"
    if kind == "garbage":
        path.write_bytes(os.urandom(256))
    elif kind == "empty":
        path.write_bytes(b"")
    elif kind == "a tensor":
        torch.save(torch.ones(3), path)
    extra = [str(tmp_path)] if cmd == "predict" else []
    t0 = time.perf_counter()
    assert main([cmd, "-c", str(path), "--no-progress", *extra]) == 2
    err = capsys.readouterr().err
    assert err.startswith(f"dabnet {cmd}: error:") and str(path) in err
    assert "Traceback" not in err and time.perf_counter() - t0 < 60
