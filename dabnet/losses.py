"""Segmentation losses: cross-entropy with ignore_index 255, optional class weights, and online
hard-example mining (OHEM)."""
from __future__ import annotations

import torch
import torch.nn as nn
import torch.nn.functional as F

from .data import IGNORE_INDEX


class SegCrossEntropy(nn.Module):
    """Pixel-wise cross-entropy over (N, C, H, W) logits and (N, H, W) targets.

    With ``ohem=True`` only hard pixels count: those whose softmax probability for their target
    class is below ``thresh`` (0.7), and never fewer than ``min_kept`` pixels (the ``min_kept``
    least confident valid pixels are kept even when they are above the threshold). With class
    weights the loss is the weighted mean over the counted pixels, as in F.cross_entropy.
    """

    def __init__(self, weight=None, ignore_index=IGNORE_INDEX, ohem=False, thresh=0.7,
                 min_kept=100_000):
        super().__init__()
        if not 0 < thresh <= 1:
            raise ValueError(f"OHEM threshold must be in (0, 1], got {thresh}")
        if min_kept < 0:
            raise ValueError(f"OHEM min_kept must be >= 0, got {min_kept}")
        self.register_buffer("weight", None if weight is None
                             else torch.as_tensor(weight, dtype=torch.float32))
        self.ignore_index, self.ohem, self.thresh, self.min_kept = ignore_index, ohem, thresh, min_kept

    def forward(self, logits, target):
        if logits.dim() != 4 or target.dim() != 3 or logits.shape[0] != target.shape[0] \
                or logits.shape[2:] != target.shape[1:]:
            raise ValueError(f"loss expects logits (N, C, H, W) and target (N, H, W) of the same "
                             f"size, got {tuple(logits.shape)} and {tuple(target.shape)}")
        if self.weight is not None and self.weight.numel() != logits.shape[1]:
            raise ValueError(f"{self.weight.numel()} class weights for {logits.shape[1]} classes")
        logits = logits.float()
        if not self.ohem:
            return F.cross_entropy(logits, target, weight=self.weight,
                                   ignore_index=self.ignore_index)
        valid = target != self.ignore_index
        safe_target = target.masked_fill(~valid, 0)
        with torch.no_grad():
            prob = logits.softmax(1).gather(1, safe_target.unsqueeze(1)).squeeze(1)
            prob = prob.masked_fill(~valid, 2.0)  # never selected
            n_valid = int(valid.sum())
            thresh = self.thresh
            if 0 < self.min_kept < n_valid:
                # Raise the threshold so that at least min_kept pixels pass it.
                kth = prob.flatten().kthvalue(self.min_kept).values.item()
                thresh = max(thresh, kth)
            keep = valid & (prob <= thresh) if self.min_kept < n_valid else valid
        pixel_loss = F.cross_entropy(logits, safe_target, reduction="none")  # weighted below
        w = keep.float()
        if self.weight is not None:
            w = w * self.weight[safe_target]
        return (pixel_loss * w).sum() / w.sum().clamp_min(1e-12)
