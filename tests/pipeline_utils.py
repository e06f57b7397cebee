"""Builders of tiny fake datasets shared by the pipeline tests."""
from pathlib import Path

import numpy as np
import pytest


def write_png(path, arr):
    Image = pytest.importorskip("PIL.Image", reason="pillow is not installed (PNG datasets)")
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    Image.fromarray(np.asarray(arr, np.uint8)).save(path)
    return path


def fake_cityscapes(root, split="train", n=2, size=(32, 64), label_ids=(7, 26, 0, 33), seed=0):
    """n images in city 'testcity'; each label is vertical stripes of the given labelIds."""
    rng = np.random.default_rng(seed)
    h, w = size
    for i in range(n):
        stem = f"testcity_{i:06d}_000019"
        write_png(Path(root) / "leftImg8bit" / split / "testcity" / f"{stem}_leftImg8bit.png",
                  rng.integers(0, 256, (h, w, 3)))
        label = np.zeros((h, w), np.uint8)
        for j, lid in enumerate(label_ids):
            label[:, j * w // len(label_ids):] = lid
        write_png(Path(root) / "gtFine" / split / "testcity" / f"{stem}_gtFine_labelIds.png", label)
    return Path(root)


def fake_camvid(root, split="train", n=2, size=(24, 32), seed=0):
    rng = np.random.default_rng(seed)
    h, w = size
    for i in range(n):
        write_png(Path(root) / split / f"0001TP_{i:06d}.png", rng.integers(0, 256, (h, w, 3)))
        write_png(Path(root) / f"{split}annot" / f"0001TP_{i:06d}.png",
                  rng.integers(0, 12, (h, w)))  # 0..10 classes, 11 void
    return Path(root)


def tiny_cfg(out, **kw):
    """A TrainConfig for a few steps on tiny synthetic images, writing to `out`."""
    from dabnet.train import TrainConfig

    base = dict(out_dir=str(out), crop=(32, 32), batch_size=2, synthetic_length=4,
                synthetic_size=(32, 64), workers=0, progress=False, val_every=0, seed=1)
    base.update(kw)
    return TrainConfig(**base)
