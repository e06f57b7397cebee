import math

import numpy as np
import pytest

Image = pytest.importorskip("PIL.Image", reason="pillow is not installed (the demo writes PNGs)")
from dabnet import demo  # noqa: E402  (imports PIL)


def test_demo_runs_end_to_end_with_a_few_steps(tmp_path, capsys):
    r = demo.main(["--steps", "2", "--size", "32x64", "--batch-size", "2", "--val-images", "2",
                   "--fps-iters", "1", "--workers", "0", "--out", str(tmp_path)])
    out = capsys.readouterr().out
    assert "chance level" in out and "fused / unfused" in out
    assert r["steps"] == 2 and not math.isnan(r["miou"])
    assert 0 < r["chance"]["uniform"] < 1 and set(r["speeds"]) == {"fused", "unfused"}
    panel = np.asarray(Image.open(tmp_path / "prediction.png"))
    assert panel.shape == (32, 3 * 64, 3)
