import numpy as np
import pytest
import torch

Image = pytest.importorskip("PIL.Image", reason="pillow is not installed (PNG datasets)")
from dabnet import data  # noqa: E402
from dabnet.data import (CITYSCAPES_EVAL_LABEL_IDS, IGNORE_INDEX, LABELID_TO_TRAINID,  # noqa: E402
                         TRAINID_TO_LABELID, TrainTransform, build_dataset)
from dabnet.synthetic import SYNTHETIC_CLASSES, draw_street  # noqa: E402
from pipeline_utils import fake_camvid, fake_cityscapes, write_png  # noqa: E402


def test_synthetic_is_deterministic_and_covers_all_classes():
    a = draw_street((64, 128), np.random.default_rng((3, 0, 5)))
    b = draw_street((64, 128), np.random.default_rng((3, 0, 5)))
    c = draw_street((64, 128), np.random.default_rng((3, 0, 6)))
    assert np.array_equal(a[0], b[0]) and np.array_equal(a[1], b[1])
    assert not np.array_equal(a[0], c[0])
    seen = set()
    for i in range(12):
        img, label = draw_street((64, 128), np.random.default_rng((0, 0, i)))
        assert img.shape == (64, 128, 3) and img.dtype == np.uint8 and label.shape == (64, 128)
        seen |= set(np.unique(label).tolist())
    assert seen == set(range(len(SYNTHETIC_CLASSES)))


def test_synthetic_dataset_item_and_splits():
    ds = build_dataset("synthetic", split="train", synthetic_length=3, synthetic_size=(32, 64))
    img, label, name = ds[1]
    assert img.shape == (3, 32, 64) and img.dtype == torch.float32
    assert label.shape == (32, 64) and label.dtype == torch.int64
    raw, _ = ds.load(1)
    # The mean is subtracted, channel order stays RGB.
    expect = torch.from_numpy(raw.astype(np.float32)).permute(2, 0, 1) - \
        torch.tensor(ds.mean)[:, None, None]
    assert torch.allclose(img, expect)
    val = build_dataset("synthetic", split="val", synthetic_length=3, synthetic_size=(32, 64))
    assert not torch.equal(val[1][0], img)


def test_label_id_maps_round_trip():
    for tid, lid in enumerate(CITYSCAPES_EVAL_LABEL_IDS):
        assert LABELID_TO_TRAINID[lid] == tid and TRAINID_TO_LABELID[tid] == lid
    others = set(range(256)) - set(CITYSCAPES_EVAL_LABEL_IDS)
    assert all(LABELID_TO_TRAINID[o] == IGNORE_INDEX for o in others)


def test_cityscapes_folder(tmp_path):
    fake_cityscapes(tmp_path, "val", n=2, label_ids=(7, 26, 0, 33))
    ds = build_dataset("cityscapes", str(tmp_path), "val")
    assert len(ds) == 2 and ds.name_of(0) == "testcity_000000_000019"
    _, label, _ = ds[0]
    assert set(label.unique().tolist()) == {LABELID_TO_TRAINID[7], LABELID_TO_TRAINID[26],
                                            IGNORE_INDEX, LABELID_TO_TRAINID[33]}


def test_camvid_folder(tmp_path):
    fake_camvid(tmp_path, "train", n=2)
    ds = build_dataset("camvid", str(tmp_path), "train")
    raw = np.asarray(Image.open(tmp_path / "trainannot" / "0001TP_000000.png"))
    _, label, _ = ds[0]
    assert torch.equal(label == IGNORE_INDEX, torch.from_numpy(raw == 11))
    keep = raw != 11
    assert np.array_equal(label.numpy()[keep], raw[keep])


def test_train_transform_crop_flip_pad():
    img = np.random.default_rng(0).integers(0, 256, (20, 30, 3)).astype(np.uint8)
    label = np.random.default_rng(1).integers(0, 5, (20, 30)).astype(np.uint8)
    t = TrainTransform((16, 16))
    a = t(img, label, np.random.default_rng(7), (100, 100, 100))
    b = t(img, label, np.random.default_rng(7), (100, 100, 100))
    assert a[0].shape == (16, 16, 3) and a[1].shape == (16, 16)
    assert np.array_equal(a[0], b[0]) and np.array_equal(a[1], b[1])
    assert set(np.unique(a[1])) <= set(range(5))
    # A crop larger than the scaled image is padded with the ignore label.
    big = TrainTransform((64, 64), scales=(1.0,), flip=False)
    im2, lab2 = big(img, label, np.random.default_rng(0), (100, 100, 100))
    assert lab2.shape == (64, 64) and (lab2[20:] == IGNORE_INDEX).all()
    assert (lab2[:, 30:] == IGNORE_INDEX).all() and (im2[20:] == 100).all()
    assert np.array_equal(lab2[:20, :30], label)
    # Flip: with scale 1 and an exact-size crop, the output is the input or its mirror.
    flips = set()
    same = TrainTransform((20, 30), scales=(1.0,))
    for s in range(16):
        _, lab3 = same(img, label, np.random.default_rng(s), (0, 0, 0))
        assert np.array_equal(lab3, label) or np.array_equal(lab3, label[:, ::-1])
        flips.add(np.array_equal(lab3, label))
    assert flips == {True, False}


def test_augmentation_depends_on_seed_epoch_index():
    kw = dict(train=True, crop=(24, 48), synthetic_length=2, synthetic_size=(32, 64))
    ds = build_dataset("synthetic", **kw)
    x0 = ds[0][0]
    assert torch.equal(build_dataset("synthetic", **kw)[0][0], x0)
    ds.set_epoch(1)
    different = not torch.equal(ds[0][0], x0)
    ds.set_epoch(2)
    assert different or not torch.equal(ds[0][0], x0)


def test_bad_paths_and_corrupt_files(tmp_path):
    with pytest.raises(FileNotFoundError, match="does not exist"):
        build_dataset("cityscapes", str(tmp_path / "nope"), "train")
    with pytest.raises(ValueError, match="data-root"):
        build_dataset("camvid", None)
    with pytest.raises(ValueError, match="3 values"):
        build_dataset("synthetic", mean=(1.0, 2.0))
    with pytest.raises(ValueError, match="unknown dataset"):
        build_dataset("kitti", str(tmp_path))
    with pytest.raises(FileNotFoundError, match="leftImg8bit"):
        build_dataset("cityscapes", str(tmp_path), "train")
    root = fake_cityscapes(tmp_path / "cs", "train", n=1)
    (next((root / "gtFine").rglob("*.png"))).unlink()
    with pytest.raises(FileNotFoundError, match="label file"):
        build_dataset("cityscapes", str(root), "train")

    cv = fake_camvid(tmp_path / "cv", "val", n=1)
    img_path = cv / "val" / "0001TP_000000.png"
    img_path.write_bytes(b"this is not a png")
    ds = build_dataset("camvid", str(cv), "val")
    with pytest.raises(RuntimeError, match="cannot read image .*0001TP_000000.png"):
        ds[0]
    write_png(img_path, np.zeros((10, 10, 3)))  # size differs from its 24x32 label
    with pytest.raises(RuntimeError, match="label is"):
        ds[0]


def test_measure_mean_is_the_pixel_mean_of_the_split(tmp_path):
    root = fake_camvid(tmp_path, "train", n=3, size=(10, 14))
    files = sorted((root / "train").glob("*.png"))
    pixels = np.concatenate([np.asarray(Image.open(f).convert("RGB")).reshape(-1, 3)
                             for f in files]).astype(np.float64)
    got = data.measure_mean(build_dataset("camvid", str(root), "train"), progress=False)
    np.testing.assert_allclose(got, pixels.mean(0), rtol=1e-12)
    assert got != data.dataset_info("camvid").mean  # really measured, not the placeholder
