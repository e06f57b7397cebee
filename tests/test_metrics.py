import math

import numpy as np
import pytest
import torch

from dabnet.metrics import ConfusionMatrix, measure_fps


def test_iou_matches_a_direct_count():
    rng = np.random.default_rng(0)
    k = 5
    target = rng.integers(0, k, (3, 7, 9))
    target[0, 0] = 255
    pred = rng.integers(0, k, (3, 7, 9))
    cm = ConfusionMatrix(k)
    cm.update(torch.from_numpy(pred[:2]), torch.from_numpy(target[:2]))
    cm.update(torch.from_numpy(pred[2:]), torch.from_numpy(target[2:]))
    valid = target != 255
    for c in range(k):
        inter = ((pred == c) & (target == c) & valid).sum()
        union = (((pred == c) | (target == c)) & valid).sum()
        assert math.isclose(cm.iou()[c].item(), inter / union)
    assert math.isclose(cm.miou(), float(np.mean([cm.iou()[c].item() for c in range(k)])))
    assert math.isclose(cm.pixel_accuracy(), ((pred == target) & valid).sum() / valid.sum())


def test_absent_class_is_nan_and_left_out_of_the_mean():
    target = torch.tensor([[0, 0, 1, 1]])
    pred = torch.tensor([[0, 1, 1, 1]])
    cm = ConfusionMatrix(3)
    cm.update(pred, target)
    iou = cm.iou()
    assert math.isnan(iou[2].item())
    assert math.isclose(cm.miou(), (iou[0].item() + iou[1].item()) / 2)
    text = cm.report(["a", "b", "c"])
    assert "absent" in text and "over 2 class(es)" in text and "c" in text.splitlines()[-2]


def test_chance_levels():
    target = torch.tensor([[0, 0, 0, 1]])
    cm = ConfusionMatrix(2)
    cm.update(torch.zeros_like(target), target)  # a majority-class predictor
    assert math.isclose(cm.chance_miou()["majority"], cm.miou())
    assert 0 < cm.chance_miou()["uniform"] < 1


def test_bad_labels():
    cm = ConfusionMatrix(3)
    with pytest.raises(ValueError, match="outside"):
        cm.update(torch.zeros(1, 2, dtype=torch.long), torch.tensor([[0, 7]]))
    with pytest.raises(ValueError, match="shape"):
        cm.update(torch.zeros(1, 3, dtype=torch.long), torch.zeros(1, 2, dtype=torch.long))


def test_measure_fps_runs_the_model_the_asked_number_of_times():
    calls = []

    class Probe(torch.nn.Module):
        def forward(self, x):
            calls.append(x.shape)
            return x

    fps, ms = measure_fps(Probe(), (8, 16), batch=2, warmup=3, iters=4)
    assert len(calls) == 7 and calls[0] == (2, 3, 8, 16)
    assert fps > 0 and math.isclose(fps * ms, 1000.0, rel_tol=1e-6)
