"""Confusion matrix, per-class IoU, mIoU, and FPS (timed as the paper's FPS was, except for the
differences the README lists under 'FPS': no_grad, warm-up count, cudnn.benchmark)."""
from __future__ import annotations

import math
import time

import torch

from .data import IGNORE_INDEX


class ConfusionMatrix:
    """Accumulates a (classes x classes) matrix, rows = ground truth, columns = prediction;
    pixels labelled ignore_index are skipped."""

    def __init__(self, num_classes: int, ignore_index: int = IGNORE_INDEX):
        self.num_classes, self.ignore_index = num_classes, ignore_index
        self.mat = torch.zeros(num_classes, num_classes, dtype=torch.int64)

    def update(self, pred: torch.Tensor, target: torch.Tensor):
        if pred.shape != target.shape:
            raise ValueError(f"prediction {tuple(pred.shape)} and target {tuple(target.shape)} "
                             "differ in shape")
        pred, target = pred.reshape(-1).to("cpu", torch.int64), target.reshape(-1).to("cpu", torch.int64)
        valid = target != self.ignore_index
        bad = valid & ((target < 0) | (target >= self.num_classes))
        if bad.any():
            raise ValueError(f"target holds label {int(target[bad][0])}, outside 0..{self.num_classes - 1} "
                             f"and not the ignore label {self.ignore_index}")
        if ((pred < 0) | (pred >= self.num_classes)).any():
            raise ValueError(f"prediction outside 0..{self.num_classes - 1}")
        idx = target[valid] * self.num_classes + pred[valid]
        self.mat += torch.bincount(idx, minlength=self.num_classes ** 2).view_as(self.mat)

    def all_reduce(self):
        """Sums the matrix over the ranks of the default process group (no-op without one)."""
        import torch.distributed as dist

        if dist.is_available() and dist.is_initialized():
            backend = dist.get_backend()
            dev = torch.device("cuda", torch.cuda.current_device()) if backend == "nccl" else "cpu"
            m = self.mat.to(dev)
            dist.all_reduce(m)
            self.mat = m.cpu()
        return self

    def iou(self) -> torch.Tensor:
        """Per-class IoU; NaN for a class absent from both ground truth and prediction."""
        m = self.mat.double()
        tp = m.diag()
        union = m.sum(0) + m.sum(1) - tp
        return torch.where(union > 0, tp / union.clamp_min(1), torch.full_like(tp, math.nan))

    def miou(self) -> float:
        """Mean IoU over the classes present in ground truth or prediction (absent ones excluded)."""
        iou = self.iou()
        present = ~iou.isnan()
        return float(iou[present].mean()) if present.any() else math.nan

    def pixel_accuracy(self) -> float:
        total = self.mat.sum()
        return float(self.mat.diag().sum().double() / total) if total else math.nan

    def report(self, class_names=None) -> str:
        names = class_names or [str(i) for i in range(self.num_classes)]
        iou = self.iou()
        width = max(len(n) for n in names)
        lines = [f"{'class':<{width}}  IoU"]
        absent = []
        for n, v in zip(names, iou.tolist()):
            if math.isnan(v):
                absent.append(n)
                lines.append(f"{n:<{width}}  absent")
            else:
                lines.append(f"{n:<{width}}  {100 * v:5.2f}")
        present = self.num_classes - len(absent)
        lines.append(f"mIoU {100 * self.miou():.2f} over {present} class(es)"
                     + (f"; absent from both ground truth and prediction, excluded from the "
                        f"mean: {', '.join(absent)}" if absent else ""))
        lines.append(f"pixel accuracy {100 * self.pixel_accuracy():.2f}")
        return "\n".join(lines)

    def chance_miou(self) -> dict:
        """Reference levels from the ground-truth class frequencies: the mIoU of always answering
        the most frequent class, and the expected mIoU of uniform random guessing."""
        gt = self.mat.sum(1).double()
        p = gt / gt.sum().clamp_min(1)
        k = self.num_classes
        present = gt > 0
        majority = float(p.max() / present.sum())  # IoU p_max for that class, 0 for the rest
        rand = p / k / (p + 1 / k - p / k)  # E[tp] / E[union] per class under uniform guesses
        return {"majority": majority, "uniform": float(rand[present].mean())}


def _sync(device):
    if device.type == "cuda":
        torch.cuda.synchronize(device)


@torch.no_grad()
def measure_fps(model, input_size=(512, 1024), batch=1, device="cpu", warmup=10, iters=100,
                channels_last=False, progress=False):
    """Frames per second of an eval-mode model: `warmup` untimed runs, synchronize, then the mean
    time of `iters` runs (the paper: 100 frames, batch 1, one GPU). The input takes the dtype and
    memory format of the model's weights. Returns (fps, ms per frame)."""
    device = torch.device(device)
    if iters < 1:
        raise ValueError("iters must be >= 1")
    from .evaluate import _input_like_model

    model = model.eval().to(device)
    if channels_last:
        model = model.to(memory_format=torch.channels_last)
    x = _input_like_model(model, torch.randn(batch, 3, *input_size, device=device))
    for _ in range(warmup):
        model(x)
    _sync(device)
    rng = range(iters)
    if progress:
        from tqdm import tqdm
        rng = tqdm(rng, desc="fps", leave=False)
    t0 = time.perf_counter()
    for _ in rng:
        model(x)
    _sync(device)
    dt = (time.perf_counter() - t0) / (iters * batch)
    return 1.0 / dt, 1000.0 * dt
