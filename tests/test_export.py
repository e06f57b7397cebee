"""dabnet export: the fused model as an AOTInductor package (.pt2) and as ONNX, compared with the
fused eager model at sizes that need the odd-size padding (dynamic H and W must mean every size
the model takes), with logits of magnitude ~100 (the check's tolerance is relative); the C++
runner against Python; clear errors for bad input. One export per format (AOTInductor compiles
take a minute or more on 2 cores)."""
import shutil
import subprocess
import sys
import zipfile
from pathlib import Path

import numpy as np
import pytest
import torch

import dabnet_kernels  # noqa: F401  (registers the ops the package calls)
from dabnet.checkpoint import load_model
from dabnet.cli import main
from dabnet.export import Deployed, export, export_format, load_package, max_rel_diff
from dabnet.model import DABNet
from nn_helpers import randomize_bn_prelu

ROOT = Path(__file__).resolve().parents[1]
MEAN = (70.0, 80.0, 90.0)
# H, W = 0, 1, 2 and 3 mod 4: no padding, 2 rows, 1 row, none (and the 361x481 shape).
SIZES = [(64, 128), (61, 81), (62, 82), (63, 83)]


@pytest.fixture(scope="module")
def ckpt(tmp_path_factory):
    """A 5-class checkpoint with non-trivial BN-PReLU state and logits of magnitude ~100."""
    torch.manual_seed(0)
    model = randomize_bn_prelu(DABNet(5))
    with torch.no_grad():
        model.classifier[0].conv.weight.mul_(300.0)
    path = tmp_path_factory.mktemp("ckpt") / "m.pt"
    torch.save({"model": model.state_dict(), "meta": {"dataset": "synthetic", "mean": MEAN}},
               path)
    return path


@pytest.fixture(scope="module")
def reference(ckpt):
    model, _ = load_model(ckpt, fused=True)
    return Deployed(model, MEAN).eval()


def exported(ckpt, tmp_path_factory, name, *extra):
    out = tmp_path_factory.mktemp("export") / name
    assert main(["export", "-c", str(ckpt), "-o", str(out), "--size", "64x128", "--device",
                 "cpu", "--no-progress", *extra]) == 0
    return out


def assert_matches(run, reference, sizes=SIZES, batch=1, rtol=1e-4):
    for size in sizes:
        x = torch.rand(batch, 3, *size) * 255
        with torch.no_grad():
            ref = reference(x)
        got = run(x)
        got = got[0] if isinstance(got, (list, tuple)) else got
        assert got.shape == ref.shape, size
        assert ref.abs().max() > 30  # logits as large as a trained model's
        assert max_rel_diff(got, ref) < rtol, size


# --------------------------------------------------------------------------------- ONNX
@pytest.fixture(scope="module")
def onnx_file(ckpt, tmp_path_factory):
    for pkg in ("onnx", "onnxscript", "onnxruntime"):  # `make setup` installs them; a GPU image may not
        pytest.importorskip(pkg, reason=f"ONNX export needs {pkg}")
    return exported(ckpt, tmp_path_factory, "m.onnx")


def test_onnx_holds_standard_ops_only_and_runs_at_every_size(onnx_file, reference):
    import onnx
    import onnxruntime as ort

    model = onnx.load(str(onnx_file))
    assert {n.domain for n in model.graph.node} <= {"", "ai.onnx"}
    assert "Conv" in {n.op_type for n in model.graph.node}
    sess = ort.InferenceSession(str(onnx_file), providers=["CPUExecutionProvider"])

    def run(x):
        return torch.from_numpy(sess.run(None, {"image": x.numpy()})[0])

    assert_matches(run, reference)
    assert_matches(run, reference, sizes=[(61, 81)], batch=2)


# ---------------------------------------------------------------------------------- .pt2
@pytest.fixture(scope="module")
def pt2_file(ckpt, tmp_path_factory):
    return exported(ckpt, tmp_path_factory, "m.pt2")


def test_pt2_runs_at_every_size_after_import_dabnet_kernels(pt2_file, reference):
    runner = torch._inductor.aoti_load_package(str(pt2_file))
    assert_matches(runner, reference)
    assert_matches(runner, reference, sizes=[(62, 82)], batch=2)
    package = load_package(pt2_file)
    meta = package.metadata
    assert meta["classes"] == 5 and meta["precision"] == "fp32" and meta["channels_last"] is True
    assert_matches(package, reference, sizes=[(63, 83)])
    with pytest.raises(ValueError, match="at least 8x8, got 4x4"):
        package(torch.rand(1, 3, 4, 4))
    with pytest.raises(ValueError, match=r"float32 \(N, 3, H, W\) RGB batch"):
        package(torch.rand(1, 4, 16, 16))


def _write_ppm(path, img):
    h, w, _ = img.shape
    path.write_bytes(f"P6\n{w} {h}\n255\n".encode() + img.astype(np.uint8).tobytes())


def _read_pgm(path):
    data = path.read_bytes()
    magic, w, h, maxval, pixels = data.split(maxsplit=4)
    assert magic == b"P5" and maxval == b"255"
    return np.frombuffer(pixels, np.uint8).reshape(int(h), int(w))


def test_cpp_runner_writes_the_labels_python_computes(pt2_file, reference, tmp_path):
    if shutil.which("make") is None or shutil.which("g++") is None:
        pytest.skip("the C++ runner needs make and g++ (not found on PATH)")
    build = subprocess.run(["make", "-s", "deploy/build/dabnet_run", f"PY={sys.executable}"],
                           cwd=ROOT, capture_output=True, text=True)
    if build.returncode != 0:
        pytest.skip(f"the C++ runner did not build here (libtorch headers or toolchain): "
                    f"{build.stderr[-500:]}")
    img = np.random.default_rng(3).integers(0, 256, (61, 83, 3))
    _write_ppm(tmp_path / "in.ppm", img)
    ops_lib = dabnet_kernels._lib._ext_path
    r = subprocess.run([str(ROOT / "deploy/build/dabnet_run"), str(pt2_file), ops_lib,
                        str(tmp_path / "in.ppm"), str(tmp_path / "out.pgm")],
                       capture_output=True, text=True)
    assert r.returncode == 0, r.stderr
    labels = _read_pgm(tmp_path / "out.pgm")
    x = torch.from_numpy(img).float().permute(2, 0, 1)[None]
    with torch.no_grad():
        logits = reference(x)[0]
    expected = logits.argmax(0).numpy()
    top2 = logits.topk(2, 0).values
    clear = (top2[0] - top2[1] > 1e-3 * logits.abs().max()).numpy()  # not a near tie
    assert labels.shape == expected.shape
    assert (labels[clear] == expected[clear]).all()
    _write_ppm(tmp_path / "tiny.ppm", img[:4, :4])
    for image, why in (("out.pgm", "not a binary PPM"), ("tiny.ppm", "takes at least 8x8")):
        bad = subprocess.run([str(ROOT / "deploy/build/dabnet_run"), str(pt2_file), ops_lib,
                              str(tmp_path / image), str(tmp_path / "x.pgm")],
                             capture_output=True, text=True)
        assert bad.returncode == 1 and why in bad.stderr, bad.stderr


# ------------------------------------------------------------------------------ bad input
def test_bad_input_is_a_clear_error(ckpt, tmp_path, capsys, monkeypatch):
    def err(*argv):
        assert main(["export", "-c", str(ckpt), "--no-progress", *argv]) == 2
        return capsys.readouterr().err

    assert "name it *.onnx or *.pt2" in err("-o", str(tmp_path / "m.tflite"))
    assert "has 5 classes but 19" in err("-o", str(tmp_path / "m.pt2"), "--classes", "19")
    assert "ONNX export is fp32 only" in err("-o", str(tmp_path / "m.onnx"), "--precision",
                                             "bf16")
    with pytest.raises(SystemExit):
        main(["export", "-c", str(ckpt), "-o", str(tmp_path / "m.pt2"), "--size", "4x4"])
    assert "too small" in capsys.readouterr().err
    with pytest.raises(SystemExit):
        main(["export", "-c", str(ckpt), "-o", str(tmp_path / "m"), "--format", "tflite"])
    assert "invalid choice: 'tflite'" in capsys.readouterr().err
    assert export_format(tmp_path / "m.bin", "pt2") == "pt2"
    with pytest.raises(ValueError, match="too small"):
        export(ckpt, tmp_path / "m.pt2", size=(4, 64))

    with zipfile.ZipFile(tmp_path / "cuda.pt2", "w") as z:  # the metadata of a CUDA package
        z.writestr("m/data/aotinductor/model/x.wrapper_metadata.json", '{"device": "cuda"}')
    monkeypatch.setattr(torch.cuda, "is_available", lambda: False)
    with pytest.raises(RuntimeError, match="built for cuda, but no CUDA device"):
        load_package(tmp_path / "cuda.pt2")
    (tmp_path / "junk.pt2").write_bytes(b"not a zip")
    with pytest.raises(RuntimeError, match="is not an AOTInductor package"):
        load_package(tmp_path / "junk.pt2")
