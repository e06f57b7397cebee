"""Datasets (Cityscapes, CamVid, the built-in synthetic streets) and the paper's augmentation.

Every dataset yields ``(image, label, name)``: image a float32 (3, H, W) tensor in RGB order with
the dataset mean subtracted (0..255 scale, no division: the authors' preprocessing), label an
int64 (H, W) tensor of train ids with 255 = ignore.

Augmentation (Sec. 4.1): random scale from {0.75, 1.0, 1.25, 1.5, 1.75, 2.0}, horizontal flip,
random crop (padded with the mean / ignore label when the scaled image is smaller). Its random
numbers come from ``numpy.random.default_rng((seed, epoch, index))``, so a sample's augmentation
depends on nothing but the seed, the epoch and the sample index: resuming training mid-epoch
reproduces the batches an uninterrupted run would have seen, whatever the DataLoader workers did.
"""
from __future__ import annotations

import os
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
import torch

from .synthetic import SYNTHETIC_CLASSES, SYNTHETIC_PALETTE, draw_street

IGNORE_INDEX = 255
SCALES = (0.75, 1.0, 1.25, 1.5, 1.75, 2.0)

CITYSCAPES_CLASSES = (
    "road", "sidewalk", "building", "wall", "fence", "pole", "traffic light", "traffic sign",
    "vegetation", "terrain", "sky", "person", "rider", "car", "truck", "bus", "train",
    "motorcycle", "bicycle")
CITYSCAPES_PALETTE = (
    (128, 64, 128), (244, 35, 232), (70, 70, 70), (102, 102, 156), (190, 153, 153),
    (153, 153, 153), (250, 170, 30), (220, 220, 0), (107, 142, 35), (152, 251, 152),
    (70, 130, 180), (220, 20, 60), (255, 0, 0), (0, 0, 142), (0, 0, 70), (0, 60, 100),
    (0, 80, 100), (0, 0, 230), (119, 11, 32))
# labelIds of the 19 evaluated classes, in trainId order (Cityscapes' labels.py).
CITYSCAPES_EVAL_LABEL_IDS = (7, 8, 11, 12, 13, 17, 19, 20, 21, 22, 23, 24, 25, 26, 27, 28, 31,
                             32, 33)

CAMVID_CLASSES = ("sky", "building", "pole", "road", "sidewalk", "tree", "sign symbol", "fence",
                  "car", "pedestrian", "bicyclist")
CAMVID_PALETTE = ((128, 128, 128), (128, 0, 0), (192, 192, 128), (128, 64, 128), (60, 40, 222),
                  (128, 128, 0), (192, 128, 128), (64, 64, 128), (64, 0, 128), (64, 64, 0),
                  (0, 128, 192))


def _lut(pairs, size=256, fill=IGNORE_INDEX):
    lut = np.full(size, fill, np.uint8)
    for src, dst in pairs:
        lut[src] = dst
    return lut


LABELID_TO_TRAINID = _lut((lid, tid) for tid, lid in enumerate(CITYSCAPES_EVAL_LABEL_IDS))
TRAINID_TO_LABELID = _lut(enumerate(CITYSCAPES_EVAL_LABEL_IDS), fill=0)  # ignore -> 0 (unlabeled)
CAMVID_TO_TRAINID = _lut((i, i) for i in range(11))  # 11 (void) and anything else -> 255


@dataclass(frozen=True)
class DatasetInfo:
    name: str
    classes: tuple
    palette: tuple
    mean: tuple  # RGB, 0..255
    default_crop: tuple  # (H, W) used for training crops
    extra: dict = field(default_factory=dict)

    @property
    def num_classes(self) -> int:
        return len(self.classes)


DATASETS = {
    # Cityscapes mean from the authors' release (given there in BGR order).
    "cityscapes": DatasetInfo("cityscapes", CITYSCAPES_CLASSES, CITYSCAPES_PALETTE,
                              (73.158, 82.909, 72.392), (512, 1024)),
    # CamVid: no published mean; training measures it on the training split (measure_mean, as
    # the authors' data step does) and stores it in the checkpoint. This placeholder only serves
    # a dataset built without a checkpoint or a measurement.
    "camvid": DatasetInfo("camvid", CAMVID_CLASSES, CAMVID_PALETTE,
                          (110.0, 112.0, 108.0), (360, 480), {"measure_mean": True}),
    # Synthetic: measured over 200 generated 128x256 scenes (99.1, 124.0, 106.4).
    "synthetic": DatasetInfo("synthetic", SYNTHETIC_CLASSES, SYNTHETIC_PALETTE,
                             (99.0, 124.0, 106.0), (128, 256)),
}


def dataset_info(name: str) -> DatasetInfo:
    if name not in DATASETS:
        raise ValueError(f"unknown dataset {name!r}; choose one of {', '.join(DATASETS)}")
    return DATASETS[name]


def _pil():
    """PIL.Image, imported when an image is first read or resized: the rest of dabnet (the model,
    losses, metrics) runs without pillow."""
    try:
        from PIL import Image
    except ImportError as e:
        raise ImportError("reading or resizing images needs pillow: pip install pillow") from e
    return Image


def load_image(path, mode="RGB") -> np.ndarray:
    """Reads an image file into a numpy array; a clear error for a missing or corrupt file."""
    path = Path(path)
    if not path.is_file():
        raise FileNotFoundError(f"image file not found: {path}")
    Image = _pil()
    try:
        with Image.open(path) as im:
            im.load()
            if mode == "L" and im.mode not in ("L", "P", "I", "I;16"):
                raise RuntimeError(f"label image {path} has mode {im.mode}, expected a "
                                   "single-channel PNG")
            return np.asarray(im.convert(mode) if mode == "RGB" else im)
    except RuntimeError:
        raise
    except Exception as e:  # PIL raises UnidentifiedImageError, OSError, SyntaxError, ...
        raise RuntimeError(f"cannot read image {path}: {e}") from e


# ----------------------------------------------------------------------------- transforms
def _resize(arr: np.ndarray, size_hw, nearest: bool) -> np.ndarray:
    h, w = size_hw
    if arr.shape[:2] == (h, w):
        return arr
    Image = _pil()
    resample = Image.NEAREST if nearest else Image.BILINEAR
    return np.asarray(Image.fromarray(arr).resize((w, h), resample))


@dataclass
class TrainTransform:
    """Random scale, pad, random crop, horizontal flip (Sec. 4.1); mean subtraction follows."""
    crop: tuple  # (H, W)
    scales: tuple = SCALES
    flip: bool = True

    def __call__(self, img, label, rng: np.random.Generator, mean):
        s = float(rng.choice(self.scales))
        h, w = label.shape
        nh, nw = max(1, round(h * s)), max(1, round(w * s))
        img, label = _resize(img, (nh, nw), False), _resize(label, (nh, nw), True)
        ch, cw = self.crop
        ph, pw = max(ch - nh, 0), max(cw - nw, 0)
        if ph or pw:  # pad with the mean (0 after subtraction) and the ignore label
            fill = np.asarray(mean, np.float32).round().astype(np.uint8)
            img = np.concatenate([img, np.broadcast_to(fill, (ph, nw, 3))], 0) if ph else img
            img = np.concatenate([img, np.broadcast_to(fill, (nh + ph, pw, 3))], 1) if pw else img
            label = np.pad(label, ((0, ph), (0, pw)), constant_values=IGNORE_INDEX)
        y = int(rng.integers(0, label.shape[0] - ch + 1))
        x = int(rng.integers(0, label.shape[1] - cw + 1))
        img, label = img[y:y + ch, x:x + cw], label[y:y + ch, x:x + cw]
        if self.flip and rng.random() < 0.5:
            img, label = img[:, ::-1], label[:, ::-1]
        return img, label


def to_tensor(img: np.ndarray, mean) -> torch.Tensor:
    """HWC uint8 RGB -> CHW float32 with the mean subtracted."""
    x = torch.from_numpy(np.array(img, np.float32))  # a copy: PIL's arrays are read-only
    x -= torch.tensor(mean, dtype=torch.float32)
    return x.permute(2, 0, 1).contiguous()


# ----------------------------------------------------------------------------- datasets
class SegDataset(torch.utils.data.Dataset):
    """Base: subclasses provide ``__len__``, ``load(i) -> (rgb uint8 HxWx3, train-id uint8 HxW)``
    and ``name_of(i)``."""

    info: DatasetInfo

    def __init__(self, transform=None, seed: int = 0, mean=None):
        self.transform = transform
        self.seed = seed
        self.epoch = 0
        self.mean = tuple(float(m) for m in mean) if mean is not None else self.info.mean
        if len(self.mean) != 3:
            raise ValueError(f"mean must have 3 values (R, G, B), got {len(self.mean)}")

    def set_epoch(self, epoch: int):
        self.epoch = epoch

    def __getitem__(self, i):
        img, label = self.load(i)
        if img.shape[:2] != label.shape:
            raise RuntimeError(f"{self.name_of(i)}: image is {img.shape[1]}x{img.shape[0]} but "
                               f"its label is {label.shape[1]}x{label.shape[0]}")
        if self.transform is not None:
            rng = np.random.default_rng((self.seed, self.epoch, i))
            img, label = self.transform(img, label, rng, self.mean)
        label = torch.from_numpy(np.ascontiguousarray(label).astype(np.int64))
        return to_tensor(img, self.mean), label, self.name_of(i)


def measure_mean(ds: SegDataset, progress: bool = True) -> tuple:
    """Per-channel (R, G, B) mean of every pixel of every image of `ds` (0..255), before any
    augmentation: the statistic the authors' code computes over the training split."""
    from tqdm import tqdm

    total, count = np.zeros(3, np.float64), 0
    for i in tqdm(range(len(ds)), desc="measuring the dataset mean", unit="img",
                  disable=not progress):
        img = ds.load(i)[0]
        total += img.reshape(-1, 3).sum(0, dtype=np.float64)
        count += img.shape[0] * img.shape[1]
    if count == 0:
        raise ValueError("cannot measure the mean of an empty dataset")
    return tuple(float(v) for v in total / count)


class Cityscapes(SegDataset):
    """<root>/leftImg8bit/<split>/<city>/*_leftImg8bit.png with
    <root>/gtFine/<split>/<city>/*_gtFine_labelIds.png; labelIds -> the 19 trainIds, rest 255."""

    info = DATASETS["cityscapes"]

    def __init__(self, root, split="train", **kw):
        super().__init__(**kw)
        root = Path(root)
        img_dir = root / "leftImg8bit" / split
        if not img_dir.is_dir():
            raise FileNotFoundError(f"Cityscapes: {img_dir} does not exist (expected "
                                    "<root>/leftImg8bit/<split>/<city>/*_leftImg8bit.png)")
        self.images = sorted(img_dir.glob("*/*_leftImg8bit.png"))
        if not self.images:
            raise FileNotFoundError(f"Cityscapes: no *_leftImg8bit.png files under {img_dir}")
        self.labels = [root / "gtFine" / split / p.parent.name /
                       p.name.replace("_leftImg8bit.png", "_gtFine_labelIds.png")
                       for p in self.images]
        missing = [str(p) for p in self.labels if not p.is_file()]
        if missing:
            raise FileNotFoundError(f"Cityscapes: {len(missing)} label file(s) missing, e.g. "
                                    f"{missing[0]}")

    def __len__(self):
        return len(self.images)

    def name_of(self, i):
        return self.images[i].name.replace("_leftImg8bit.png", "")

    def load(self, i):
        return load_image(self.images[i]), LABELID_TO_TRAINID[load_image(self.labels[i], "L")]


class CamVid(SegDataset):
    """The SegNet layout: <root>/<split>/*.png with <root>/<split>annot/*.png (11 = void)."""

    info = DATASETS["camvid"]

    def __init__(self, root, split="train", **kw):
        super().__init__(**kw)
        root = Path(root)
        img_dir, ann_dir = root / split, root / f"{split}annot"
        for d in (img_dir, ann_dir):
            if not d.is_dir():
                raise FileNotFoundError(f"CamVid: {d} does not exist (expected <root>/<split>/ "
                                        "and <root>/<split>annot/)")
        self.images = sorted(p for p in img_dir.iterdir() if p.suffix.lower() == ".png")
        if not self.images:
            raise FileNotFoundError(f"CamVid: no .png images in {img_dir}")
        self.labels = [ann_dir / p.name for p in self.images]
        missing = [str(p) for p in self.labels if not p.is_file()]
        if missing:
            raise FileNotFoundError(f"CamVid: {len(missing)} annotation(s) missing, e.g. "
                                    f"{missing[0]}")

    def __len__(self):
        return len(self.images)

    def name_of(self, i):
        return self.images[i].stem

    def load(self, i):
        return load_image(self.images[i]), CAMVID_TO_TRAINID[load_image(self.labels[i], "L")]


class SyntheticStreets(SegDataset):
    """Procedurally drawn street scenes with exact masks (see dabnet.synthetic); sample i of a
    split is a pure function of (seed, split, i)."""

    info = DATASETS["synthetic"]
    SPLITS = {"train": 0, "val": 1, "test": 2}

    def __init__(self, length=1000, size=(128, 256), split="train", scene_seed=0, **kw):
        super().__init__(**kw)
        if split not in self.SPLITS:
            raise ValueError(f"synthetic split must be one of {', '.join(self.SPLITS)}")
        if length < 1 or min(size) < 16:
            raise ValueError("synthetic dataset needs length >= 1 and images of at least 16x16")
        self.length, self.size, self.split, self.scene_seed = length, tuple(size), split, scene_seed

    def __len__(self):
        return self.length

    def name_of(self, i):
        return f"synthetic_{self.split}_{i:05d}"

    def load(self, i):
        rng = np.random.default_rng((self.scene_seed, self.SPLITS[self.split], i))
        return draw_street(self.size, rng)


def build_dataset(name, root=None, split="train", train=False, crop=None, scales=SCALES,
                  seed=0, mean=None, synthetic_length=None, synthetic_size=(128, 256)):
    """The dataset `name` ("cityscapes", "camvid", "synthetic") for `split`; with train=True it
    applies the random scale / crop / flip augmentation."""
    info = dataset_info(name)
    transform = TrainTransform(tuple(crop or info.default_crop), tuple(scales)) if train else None
    kw = dict(transform=transform, seed=seed, mean=mean)
    if name == "synthetic":
        n = synthetic_length or (1000 if split == "train" else 50)
        return SyntheticStreets(n, synthetic_size, split, **kw)
    if root is None:
        raise ValueError(f"dataset {name!r} needs --data-root (the folder holding it)")
    if not os.path.isdir(root):
        raise FileNotFoundError(f"data root {root} does not exist")
    return (Cityscapes if name == "cityscapes" else CamVid)(root, split, **kw)


def colorize(label: np.ndarray, palette) -> np.ndarray:
    """(H, W) train ids -> (H, W, 3) uint8 colours; ignore / unknown ids are black."""
    lut = np.zeros((256, 3), np.uint8)
    lut[:len(palette)] = np.asarray(palette, np.uint8)
    return lut[label.astype(np.uint8)]
