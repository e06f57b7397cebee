import os
import signal

import pytest
import torch

pytest.importorskip("PIL", reason="pillow is not installed (dabnet.train reads PNG datasets)")
from dabnet.checkpoint import load_checkpoint, save_atomic  # noqa: E402
from pipeline_utils import fake_camvid, tiny_cfg  # noqa: E402

from dabnet.train import TrainConfig, _StopFlag, poly_lr, train  # noqa: E402


def test_poly_lr_and_warmup():
    cfg = TrainConfig(lr=0.1, power=0.9)
    assert poly_lr(cfg, 0, 100) == pytest.approx(0.1)
    assert poly_lr(cfg, 50, 100) == pytest.approx(0.1 * 0.5 ** 0.9)
    assert poly_lr(cfg, 100, 100) == 0.0
    w = TrainConfig(lr=0.1, warmup_steps=10, warmup_start=0.1)
    ramp = [poly_lr(w, i, 100) for i in range(10)]
    assert ramp[0] == pytest.approx(0.01) and all(a < b for a, b in zip(ramp, ramp[1:]))
    assert poly_lr(w, 10, 100) == pytest.approx(0.1 * 0.9 ** 0.9)


def test_interrupted_run_resumes_exactly(tmp_path):
    """4 steps in one go == 3 steps, stop mid-epoch, resume (twice): identical weights."""
    full = train(tiny_cfg(tmp_path / "full", max_steps=4))
    assert full["iteration"] == 4 and not full["stopped_early"]
    part = tmp_path / "part"
    r1 = train(tiny_cfg(part, max_steps=4, stop_after_steps=1))
    assert r1["stopped_early"] and r1["iteration"] == 1
    ck = load_checkpoint(part / "last.pt")
    assert (ck["epoch"], ck["step_in_epoch"], ck["iteration"]) == (0, 1, 1)
    r2 = train(tiny_cfg(part, max_steps=4, stop_after_steps=2, resume="auto"))
    assert r2["iteration"] == 3 and r2["stopped_early"]
    r3 = train(tiny_cfg(part, max_steps=4, resume=str(part / "last.pt")))
    assert r3["iteration"] == 4 and not r3["stopped_early"]
    assert full["losses"] == r1["losses"] + r2["losses"] + r3["losses"]
    a, b = full["model"].state_dict(), r3["model"].state_dict()
    for k in a:
        assert torch.equal(a[k], b[k]), k
    fa, fb = load_checkpoint(tmp_path / "full" / "last.pt"), load_checkpoint(part / "last.pt")
    for k, v in fa["optimizer"]["state"].items():
        assert torch.equal(v["momentum_buffer"], fb["optimizer"]["state"][k]["momentum_buffer"])


def test_validation_writes_best_and_resume_checks_dataset(tmp_path):
    r = train(tiny_cfg(tmp_path, max_steps=2, val_every=1))
    assert 0 <= r["best_miou"] <= 1
    best = load_checkpoint(tmp_path / "best.pt")
    assert best["best_miou"] == r["best_miou"] and best["meta"]["classes"] == 8
    with pytest.raises(ValueError, match="trained on 'synthetic'"):
        train(tiny_cfg(tmp_path, dataset="camvid", data_root=str(fake_camvid(tmp_path / "cv", n=4)),
                       resume="auto"))
    torch.save(best["model"], tmp_path / "bare.pt")
    with pytest.raises(ValueError, match="not a training checkpoint"):
        train(tiny_cfg(tmp_path, resume=str(tmp_path / "bare.pt")))


def test_ohem_and_class_weights_train(tmp_path):
    r = train(tiny_cfg(tmp_path, max_steps=1, ohem=True, ohem_min_kept=50,
                       class_weights=[1.0] * 7 + [2.0]))
    assert r["iteration"] == 1 and torch.isfinite(torch.tensor(r["losses"])).all()


def test_too_small_dataset_is_a_clear_error(tmp_path):
    with pytest.raises(ValueError, match="fewer than one batch"):
        train(tiny_cfg(tmp_path, synthetic_length=1))


def test_save_atomic_keeps_the_old_file_on_failure(tmp_path):
    path = tmp_path / "ck.pt"
    save_atomic({"a": torch.ones(2)}, path)

    class Unpicklable:
        def __reduce__(self):
            raise RuntimeError("boom")

    with pytest.raises(RuntimeError, match="boom"):
        save_atomic({"a": Unpicklable()}, path)
    assert torch.equal(torch.load(path)["a"], torch.ones(2))
    assert [p.name for p in tmp_path.iterdir()] == ["ck.pt"]  # no temp file left


def test_sigint_sets_the_stop_flag():
    # The handler in place before is restored: Python's default, or SIG_IGN when the process
    # was started in the background by a shell.
    before = signal.getsignal(signal.SIGINT)
    with _StopFlag() as flag:
        os.kill(os.getpid(), signal.SIGINT)
        assert flag.stop
    assert signal.getsignal(signal.SIGINT) is before


def test_sigint_during_training_writes_a_checkpoint_and_stops(tmp_path, monkeypatch):
    import dabnet.train as T

    class InterruptingLoss(T.SegCrossEntropy):
        def forward(self, logits, target):
            os.kill(os.getpid(), signal.SIGINT)  # as if Ctrl-C were pressed during step 1
            return super().forward(logits, target)

    monkeypatch.setattr(T, "SegCrossEntropy", InterruptingLoss)
    r = train(tiny_cfg(tmp_path, max_steps=4, synthetic_length=8))
    assert r["stopped_early"] and r["iteration"] == 1
    ck = load_checkpoint(tmp_path / "last.pt")
    assert (ck["iteration"], ck["step_in_epoch"]) == (1, 1)


def test_time_limit_stops_like_an_interrupt(tmp_path):
    r = train(tiny_cfg(tmp_path, max_steps=4, time_limit_s=0.0))
    assert r["stopped_early"] and r["iteration"] == 1
    assert load_checkpoint(tmp_path / "last.pt")["iteration"] == 1


def test_camvid_mean_is_measured_and_kept_in_the_checkpoint(tmp_path):
    from dabnet.data import build_dataset, measure_mean
    root = fake_camvid(tmp_path / "cv", n=4)
    r = train(tiny_cfg(tmp_path, dataset="camvid", data_root=str(root), max_steps=1, val_every=0))
    want = measure_mean(build_dataset("camvid", str(root), "train"), progress=False)
    meta = load_checkpoint(tmp_path / "last.pt")["meta"]
    assert tuple(meta["mean"]) == pytest.approx(want, rel=1e-12)
    assert r["iteration"] == 1
