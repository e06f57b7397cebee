"""Evaluation: per-class IoU / mIoU over a dataset split, and FPS."""
from __future__ import annotations

import contextlib

import torch
import torch.nn.functional as F

from .metrics import ConfusionMatrix


PRECISIONS = {"fp32": torch.float32, "bf16": torch.bfloat16}


def for_inference(model, precision: str = "fp32", channels_last: bool = False):
    """model in eval mode with its weights in `precision` ("fp32" or "bf16": the whole network in
    bfloat16, which on CPUs with AVX512_BF16/AMX runs the dense convolutions at twice the fp32
    rate) and, with channels_last, in that memory format. predict_logits feeds it inputs to
    match."""
    if precision not in PRECISIONS:
        raise ValueError(f"precision must be one of {', '.join(PRECISIONS)}, got {precision!r}")
    model = model.eval().to(PRECISIONS[precision])
    return model.to(memory_format=torch.channels_last) if channels_last else model


def _input_like_model(model, x):
    """x in the dtype of the model's weights, channels_last where its convolutions' weights are."""
    if not isinstance(model, torch.nn.Module):  # a FrozenDABNet: it sets the layout itself
        return x.to(model.dtype)
    w = next((m.weight for m in model.modules() if isinstance(m, torch.nn.Conv2d)), None)
    if w is None:
        return x
    x = x.to(w.dtype)
    if not w.is_contiguous() and w.is_contiguous(memory_format=torch.channels_last):
        x = x.contiguous(memory_format=torch.channels_last)
    return x


def autocast(device: torch.device, enabled: bool):
    if enabled and device.type == "cuda":
        return torch.autocast("cuda", dtype=torch.float16)
    return contextlib.nullcontext()


@torch.no_grad()
def predict_logits(model, x, input_scale=1.0, amp=False):
    """Logits at x's size; with input_scale != 1 the image is resized first and the logits are
    resized back (bilinear)."""
    size = x.shape[2:]
    if input_scale != 1.0:
        x = F.interpolate(x, scale_factor=input_scale, mode="bilinear", align_corners=False)
    x = _input_like_model(model, x)
    with autocast(x.device, amp):
        out = model(x)
    if out.shape[2:] != size:
        out = F.interpolate(out.float(), size, mode="bilinear", align_corners=False)
    return out.float()


@torch.no_grad()
def evaluate(model, dataset, device="cpu", batch_size=1, workers=0, input_scale=1.0, amp=False,
             progress=True, sampler=None, desc="eval") -> ConfusionMatrix:
    """Runs `model` (eval mode) over `dataset` and returns the confusion matrix, summed over the
    ranks when a process group is up (give each rank its own `sampler` shard then)."""
    device = torch.device(device)
    was_training = model.training
    model.eval()
    loader = torch.utils.data.DataLoader(dataset, batch_size=batch_size, shuffle=False,
                                         sampler=sampler, num_workers=workers)
    cm = ConfusionMatrix(dataset.info.num_classes)
    if progress:
        from tqdm import tqdm
        loader = tqdm(loader, desc=desc, unit="batch", leave=False)
    for img, label, _ in loader:
        logits = predict_logits(model, img.to(device), input_scale, amp)
        if logits.shape[1] != cm.num_classes:
            raise ValueError(f"model predicts {logits.shape[1]} classes, the dataset has "
                             f"{cm.num_classes}")
        cm.update(logits.argmax(1), label)
    model.train(was_training)
    return cm.all_reduce()
