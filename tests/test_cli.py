import json
import os
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import torch

Image = pytest.importorskip("PIL.Image", reason="pillow is not installed (the CLI reads and writes "
                            "PNG images)")

from dabnet import DABNet  # noqa: E402
from dabnet.cli import main  # noqa: E402
from dabnet.data import (CITYSCAPES_EVAL_LABEL_IDS, CITYSCAPES_PALETTE,  # noqa: E402
                         SYNTHETIC_PALETTE)
from dabnet.info import count_macs  # noqa: E402
from pipeline_utils import fake_cityscapes, write_png  # noqa: E402

ROOT = Path(__file__).resolve().parents[1]


@pytest.mark.parametrize("cmd", ["train", "eval", "predict", "export", "info"])
def test_help(cmd, capsys):
    with pytest.raises(SystemExit) as e:
        main([cmd, "--help"])
    assert e.value.code == 0
    assert f"usage: dabnet {cmd}" in capsys.readouterr().out


def test_python_dash_m_dabnet_help():
    r = subprocess.run([sys.executable, "-m", "dabnet", "--help"], capture_output=True,
                       text=True, cwd=ROOT, env={**os.environ, "PYTHONPATH": str(ROOT)})
    assert r.returncode == 0, r.stderr
    for cmd in ("train", "eval", "predict", "export", "info"):
        assert cmd in r.stdout


@pytest.fixture(scope="module")
def trained(tmp_path_factory):
    out = tmp_path_factory.mktemp("run")
    rc = main(["train", "--out", str(out), "--max-steps", "1", "--batch-size", "2",
               "--crop", "32x32", "--synthetic-length", "2", "--synthetic-size", "32x64",
               "--workers", "0", "--no-progress", "--device", "cpu"])
    assert rc == 0
    return out / "last.pt"


def test_train_eval_predict_export(trained, tmp_path, capsys):
    assert main(["eval", "-c", str(trained), "--synthetic-length", "2", "--synthetic-size",
                 "32x64", "--workers", "0", "--no-progress", "--fps", "--fps-size", "32x64",
                 "--fps-iters", "1", "--json", str(tmp_path / "r.json")]) == 0
    out = capsys.readouterr().out
    assert "mIoU" in out and "FPS" in out and (tmp_path / "r.json").is_file()

    img = write_png(tmp_path / "in" / "street.png",
                    np.random.default_rng(0).integers(0, 256, (32, 48, 3)))
    assert main(["predict", "-c", str(trained), str(tmp_path / "in"), "--out",
                 str(tmp_path / "pred"), "--no-progress"]) == 0
    color = np.asarray(Image.open(tmp_path / "pred" / "street_color.png"))
    over = np.asarray(Image.open(tmp_path / "pred" / "street_overlay.png"))
    assert color.shape == over.shape == (32, 48, 3)
    assert {tuple(c) for c in color.reshape(-1, 3)} <= set(SYNTHETIC_PALETTE)
    src = np.asarray(Image.open(img)).astype(float)
    assert np.abs(over - (src + color) / 2).max() <= 1

    assert main(["export", "-c", str(trained), "-o", str(tmp_path / "m.onnx"), "--size",
                 "32x64"]) == 0
    assert "max diff from the fused model" in capsys.readouterr().out
    assert (tmp_path / "m.onnx").is_file()


def test_eval_and_predict_in_bfloat16_channels_last(trained, tmp_path, capsys):
    """--precision bf16 --channels-last (fused and not): the same files and report, labels
    (nearly) those of fp32, and the FPS line says what ran."""
    args = ["-c", str(trained), "--no-progress", "--device", "cpu"]
    ev = ["eval", *args, "--synthetic-length", "2", "--synthetic-size", "32x64", "--workers", "0"]
    assert main([*ev, "--json", str(tmp_path / "fp32.json")]) == 0
    assert main([*ev, "--fused", "--precision", "bf16", "--channels-last", "--fps", "--fps-size",
                 "32x64", "--fps-iters", "1", "--json", str(tmp_path / "bf16.json")]) == 0
    assert "bf16, channels_last" in capsys.readouterr().out
    fp32, bf16 = (json.loads((tmp_path / f"{n}.json").read_text()) for n in ("fp32", "bf16"))
    assert bf16["precision"] == "bf16" and bf16["channels_last"] is True
    assert abs(bf16["pixel_accuracy"] - fp32["pixel_accuracy"]) < 0.02

    write_png(tmp_path / "in" / "street.png", np.random.default_rng(0).integers(0, 256, (32, 48, 3)))
    colors = {}
    for name, extra in (("fp32", []), ("bf16", ["--precision", "bf16", "--channels-last"]),
                        ("bf16-fused", ["--precision", "bf16", "--channels-last", "--fused"])):
        assert main(["predict", *args, str(tmp_path / "in"), "--out", str(tmp_path / name),
                     *extra]) == 0
        colors[name] = np.asarray(Image.open(tmp_path / name / "street_color.png"))
    for name in ("bf16", "bf16-fused"):
        same = (colors[name] == colors["fp32"]).all(-1).mean()
        assert same > 0.9, (name, same)


def test_unknown_precision_is_a_clear_error():
    from dabnet.evaluate import for_inference

    with pytest.raises(ValueError, match="precision must be one of fp32, bf16"):
        for_inference(DABNet(19), "fp16")


def test_predict_label_ids_for_the_cityscapes_server(tmp_path):
    torch.save(DABNet(19).state_dict(), tmp_path / "cs.pt")
    write_png(tmp_path / "a_leftImg8bit.png", np.random.default_rng(1).integers(0, 256, (32, 64, 3)))
    assert main(["predict", "-c", str(tmp_path / "cs.pt"), str(tmp_path / "a_leftImg8bit.png"),
                 "--dataset", "cityscapes", "--label-ids", "--out", str(tmp_path / "p"),
                 "--no-progress"]) == 0
    ids = np.asarray(Image.open(tmp_path / "p" / "a_labelIds.png"))
    color = np.asarray(Image.open(tmp_path / "p" / "a_color.png"))
    for lid in np.unique(ids):
        assert lid in CITYSCAPES_EVAL_LABEL_IDS
        tid = CITYSCAPES_EVAL_LABEL_IDS.index(lid)
        assert (color[ids == lid] == CITYSCAPES_PALETTE[tid]).all()


def test_clear_errors(trained, tmp_path, capsys):
    def err(argv):
        assert main(argv) == 2
        return capsys.readouterr().err

    assert "checkpoint not found" in err(["eval", "-c", str(tmp_path / "none.pt")])
    (tmp_path / "junk.pt").write_bytes(b"\x00garbage" * 10)
    assert "cannot read checkpoint" in err(["eval", "-c", str(tmp_path / "junk.pt")])
    torch.save(DABNet(19).state_dict(), tmp_path / "cs.pt")
    assert "19 classes" in err(["eval", "-c", str(tmp_path / "cs.pt"), "--dataset", "synthetic",
                                "--no-progress"])
    sd = DABNet(8).state_dict()
    sd.pop("init_conv.0.conv.weight")
    torch.save(sd, tmp_path / "partial.pt")
    assert "missing key" in err(["predict", "-c", str(tmp_path / "partial.pt"), str(tmp_path)])
    assert "input not found" in err(["predict", "-c", str(trained), str(tmp_path / "x.png")])
    (tmp_path / "bad.png").write_bytes(b"not an image")
    assert "cannot read image" in err(["predict", "-c", str(trained), str(tmp_path / "bad.png"),
                                       "--out", str(tmp_path / "o"), "--no-progress", "--strict"])
    assert "needs --dataset cityscapes" in err(["predict", "-c", str(trained), "--label-ids",
                                                str(tmp_path / "bad.png")])
    assert "does not exist" in err(["eval", "-c", str(tmp_path / "cs.pt"), "--dataset",
                                    "cityscapes", "--data-root", str(tmp_path / "nowhere")])
    fake_cityscapes(tmp_path / "cs", "val", n=1)
    assert "8 classes" in err(["eval", "-c", str(trained), "--dataset", "cityscapes",
                               "--data-root", str(tmp_path / "cs")])
    with pytest.raises(SystemExit):
        main(["train", "--crop", "12xab"])
    assert "HxW" in capsys.readouterr().err


def test_info_counts_parameters_macs_and_backend(capsys):
    assert main(["info", "--size", "32x64", "--device", "cpu"]) == 0
    out = capsys.readouterr().out
    n = sum(p.numel() for p in DABNet(19).parameters())
    assert f"parameters: {n:,}" in out and "backend on cpu:" in out
    conv = torch.nn.Sequential(torch.nn.Conv2d(3, 8, 3, padding=1),
                               torch.nn.Conv2d(8, 8, 3, padding=1, groups=8),
                               torch.nn.Conv2d(8, 4, 1))
    macs = count_macs(conv, (16, 16))
    assert macs["dense"] == 16 * 16 * 8 * 3 * 9
    assert macs["depthwise"] == 16 * 16 * 8 * 9
    assert macs["pointwise"] == 16 * 16 * 4 * 8


@pytest.mark.parametrize("flag", [[], ["--default-malloc"]])
def test_malloc_is_tuned_unless_asked_not_to(flag, monkeypatch, capsys):
    import dabnet_kernels.malloc as malloc

    calls = []
    monkeypatch.setattr(malloc, "tune_malloc", lambda *a: calls.append(a) or True)
    assert main(["info", "--size", "32x64", "--device", "cpu", *flag]) == 0
    assert len(calls) == (0 if flag else 1)


def test_predict_takes_the_fastest_cpu_path_by_default_and_says_so(trained, tmp_path, capsys):
    write_png(tmp_path / "in" / "s.png", np.random.default_rng(2).integers(0, 256, (32, 48, 3)))
    args = ["predict", "-c", str(trained), str(tmp_path / "in"), "--no-progress", "--device", "cpu"]
    assert main([*args, "--out", str(tmp_path / "auto")]) == 0
    assert ("frozen fused (dabnet.freeze) model, fp32, channels_last, on cpu (the fastest"
            in capsys.readouterr().out)
    assert main([*args, "--out", str(tmp_path / "fused"), "--no-frozen"]) == 0
    assert "fused model, fp32, channels_last, on cpu\n" in capsys.readouterr().out
    assert main([*args, "--out", str(tmp_path / "plain"), "--no-fused", "--no-channels-last"]) == 0
    out = capsys.readouterr().out
    assert "plain model, fp32, on cpu\n" in out
    auto, fused, plain = (np.asarray(Image.open(tmp_path / d / "s_color.png"))
                          for d in ("auto", "fused", "plain"))
    assert (auto == fused).all()  # the frozen model computes the fused model's labels
    assert (auto == plain).all(-1).mean() > 0.99
