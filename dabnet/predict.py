"""Prediction: colourised masks, overlays, and Cityscapes labelId PNGs for the test server."""
from __future__ import annotations

import sys
from pathlib import Path

import numpy as np
import torch
from PIL import Image

from .checkpoint import load_model
from .data import TRAINID_TO_LABELID, colorize, dataset_info, load_image, to_tensor
from .evaluate import for_inference, predict_logits

IMAGE_EXTS = (".png", ".jpg", ".jpeg", ".bmp", ".ppm")


def collect_images(inputs) -> list[Path]:
    """Image files named directly, plus those found (recursively) in named folders."""
    files = []
    for item in inputs:
        p = Path(item)
        if p.is_dir():
            found = sorted(f for f in p.rglob("*") if f.suffix.lower() in IMAGE_EXTS)
            if not found:
                raise FileNotFoundError(f"no images ({', '.join(IMAGE_EXTS)}) in folder {p}")
            files += found
        elif p.is_file():
            files.append(p)
        else:
            raise FileNotFoundError(f"input not found: {p}")
    if not files:
        raise FileNotFoundError("no input images given")
    return files


def overlay(img: np.ndarray, color: np.ndarray, alpha=0.5) -> np.ndarray:
    return (img.astype(np.float32) * (1 - alpha) + color.astype(np.float32) * alpha).round() \
        .astype(np.uint8)


@torch.no_grad()
def predict(checkpoint, inputs, out_dir, dataset=None, device="cpu", label_ids=False,
            input_scale=1.0, fused=False, alpha=0.5, progress=True, model=None, meta=None,
            precision="fp32", channels_last=False, strict=False, skipped=None, frozen=False):
    """Segments every input image; writes <name>_color.png, <name>_overlay.png and, with
    label_ids (Cityscapes only), <name>_labelIds.png. Returns the list of written files.
    precision / channels_last: see evaluate.for_inference (applied to a model loaded here).
    frozen: run dabnet.freeze of the model (CPU; the fastest CPU path, same outputs).
    An image that cannot be read is skipped with a message on stderr and appended to `skipped`
    (a list, if given) as (path, reason); with strict=True it stops the run instead."""
    if model is None:
        model, meta = load_model(checkpoint, fused=fused, device=device)
        model = for_inference(model, precision, channels_last)
    if frozen:
        from .frozen import freeze
        from .evaluate import PRECISIONS

        model = freeze(model, PRECISIONS[precision], channels_last)
    meta = meta or {}
    name = dataset or meta.get("dataset") or "cityscapes"
    info = dataset_info(name)
    if model.classes != info.num_classes:
        raise ValueError(f"the model predicts {model.classes} classes but dataset {name!r} has "
                         f"{info.num_classes}; pass the right --dataset")
    if label_ids and name != "cityscapes":
        raise ValueError("--label-ids maps Cityscapes trainIds back to labelIds; it needs "
                         f"--dataset cityscapes, not {name!r}")
    mean = meta.get("mean") or info.mean
    files = collect_images(inputs)
    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    written = []
    it = files
    if progress:
        from tqdm import tqdm
        it = tqdm(files, desc="predict", unit="img")
    for f in it:
        try:
            img = load_image(f)
        except (RuntimeError, OSError) as e:
            if strict:
                raise
            print(f"[dabnet] skipped {f}: {e}", file=sys.stderr)
            if skipped is not None:
                skipped.append((f, str(e)))
            continue
        x = to_tensor(img, mean)[None].to(device)
        pred = predict_logits(model, x, input_scale).argmax(1)[0].cpu().numpy().astype(np.uint8)
        color = colorize(pred, info.palette)
        targets = {"color": color, "overlay": overlay(img, color, alpha)}
        if label_ids:
            targets["labelIds"] = TRAINID_TO_LABELID[pred]
        stem = f.stem.replace("_leftImg8bit", "")
        for kind, arr in targets.items():
            path = out / f"{stem}_{kind}.png"
            Image.fromarray(arr).save(path)
            written.append(path)
    return written
