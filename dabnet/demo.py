"""End-to-end demo with no download: trains the fused DABNet on the synthetic street scenes,
evaluates it (per-class IoU, mIoU against chance), times it against the unfused model, and writes
a prediction PNG.

    python -m dabnet.demo                # about 3 minutes on a 2-core CPU
    python -m dabnet.demo --steps 20     # a quick check
"""
from __future__ import annotations

import argparse
import time
from pathlib import Path

import numpy as np
import torch
from PIL import Image

from .cli import size_arg
from .data import build_dataset, colorize
from .evaluate import evaluate, predict_logits
from .losses import SegCrossEntropy
from .metrics import measure_fps
from .model import DABNet
from .train import TrainConfig, resolve_device, train


def parse_args(argv=None):
    p = argparse.ArgumentParser(
        prog="python -m dabnet.demo",
        description="Train DABNet (fused kernels) on procedurally drawn street scenes for a few "
                    "minutes, report val mIoU against chance, speed against the unfused model, "
                    "and write a prediction image. The synthetic data has 8 classes (road, "
                    "sidewalk, building, pole, vegetation, sky, person, car).")
    p.add_argument("--minutes", type=float, default=3.0,
                   help="wall-clock budget for the whole demo (default 3); sets the step count "
                        "from a timed trial step")
    p.add_argument("--steps", type=int, help="training steps (overrides --minutes)")
    p.add_argument("--size", type=size_arg, default=(128, 256), help="image size (default "
                   "128x256)")
    p.add_argument("--batch-size", type=int, default=8)
    p.add_argument("--lr", type=float, default=4.5e-2)
    p.add_argument("--val-images", type=int, default=40)
    p.add_argument("--device", default="cpu", help="cpu (default), cuda or auto")
    p.add_argument("--unfused", action="store_true", help="train the unfused model instead")
    p.add_argument("--fps-iters", type=int, default=20, help="frames timed per model")
    p.add_argument("--workers", type=int, default=1,
                   help="DataLoader worker processes drawing the scenes (default 1)")
    p.add_argument("--out", default="runs/demo", help="output folder (default runs/demo)")
    p.add_argument("--seed", type=int, default=0)
    return p.parse_args(argv)


def _step_seconds(size, batch, device, fused, steps=2):
    """Seconds per training step, timed on random data after one untimed step."""
    model = DABNet(8, fused=fused).to(device).train()
    opt = torch.optim.SGD(model.parameters(), lr=1e-3, momentum=0.9)
    loss_fn = SegCrossEntropy()
    x = torch.randn(batch, 3, *size, device=device)
    y = torch.randint(0, 8, (batch, *size), device=device)
    times = []
    for _ in range(steps + 1):
        t = time.perf_counter()
        opt.zero_grad()
        loss_fn(model(x), y).backward()
        opt.step()
        if device.type == "cuda":
            torch.cuda.synchronize()
        times.append(time.perf_counter() - t)
    return float(np.median(times[1:]))


def main(argv=None):
    a = parse_args(argv)
    t0 = time.perf_counter()
    device = resolve_device(a.device)
    fused = not a.unfused
    out = Path(a.out)
    out.mkdir(parents=True, exist_ok=True)
    torch.manual_seed(a.seed)
    print(f"DABNet demo: synthetic streets {a.size[0]}x{a.size[1]}, 8 classes, batch "
          f"{a.batch_size}, {'fused' if fused else 'unfused'} model, device {device}, "
          f"{torch.get_num_threads()} CPU thread(s)")
    steps = a.steps
    if steps is None:
        per_step = _step_seconds(a.size, a.batch_size, device, fused)
        # ~70% of the budget for training; evaluation, timing and the trial step take the rest.
        steps = max(10, int(0.7 * 60 * a.minutes / per_step))
        print(f"trial step: {per_step:.2f} s -> {steps} training steps for a {a.minutes:g}-min "
              "budget")
    cfg = TrainConfig(dataset="synthetic", out_dir=str(out), crop=a.size, batch_size=a.batch_size,
                      max_steps=steps, lr=a.lr, warmup_steps=max(1, steps // 20),
                      fused=fused, device=str(device), workers=a.workers, seed=a.seed, val_every=0,
                      synthetic_length=max(steps * a.batch_size, 64),
                      synthetic_size=a.size, log_every=5,
                      # A safety net if the trial step underestimated (data loading, load).
                      time_limit_s=None if a.steps else 0.8 * 60 * a.minutes)
    r = train(cfg)
    model = r["model"].eval()
    losses = r["losses"]
    k = max(1, len(losses) // 10)
    if r["stopped_early"]:
        print(f"time budget reached: stopped after {r['iteration']} of {steps} steps")
    print(f"trained {r['iteration']} steps in {r['seconds']:.0f} s "
          f"({r['iteration'] / r['seconds']:.2f} steps/s); loss {np.mean(losses[:k]):.3f} "
          f"(first {k}) -> {np.mean(losses[-k:]):.3f} (last {k})")

    val = build_dataset("synthetic", split="val", synthetic_length=a.val_images,
                        synthetic_size=a.size, seed=a.seed)
    cm = evaluate(model, val, device, progress=True, desc="val")
    print(cm.report(list(val.info.classes)))
    chance = cm.chance_miou()
    print(f"chance level: mIoU {100 * chance['majority']:.2f} always predicting the most "
          f"frequent class, {100 * chance['uniform']:.2f} guessing uniformly at random; trained "
          f"model: {100 * cm.miou():.2f}")

    # Speed: the trained (fused) model against the unfused model with the same weights.
    unfused = DABNet(8, fused=False).to(device)
    unfused.load_state_dict(model.state_dict())
    unfused.eval()
    img, label, _ = val[0]
    with torch.no_grad():
        agree = (predict_logits(model, img[None].to(device)).argmax(1)
                 == predict_logits(unfused, img[None].to(device)).argmax(1)).float().mean()
    speeds = {}
    for name, m in (("fused", model), ("unfused", unfused)):
        fps, ms = measure_fps(m, a.size, 1, device, warmup=3, iters=a.fps_iters)
        speeds[name] = fps
        print(f"inference {name:>7}: {fps:7.1f} FPS ({ms:.1f} ms/frame, {a.size[0]}x{a.size[1]}, "
              f"batch 1, mean of {a.fps_iters})")
    print(f"fused / unfused speed: {speeds['fused'] / speeds['unfused']:.2f}x; the two models "
          f"agree on {100 * float(agree):.2f}% of the pixels of a val image")
    if not fused:
        print("(--unfused: both rows run the same modules)")

    # Prediction image: input | ground truth | prediction.
    pred = predict_logits(model, img[None].to(device)).argmax(1)[0].cpu().numpy()
    rgb = (img.permute(1, 2, 0).numpy() + np.asarray(val.mean, np.float32)).clip(0, 255)
    panel = np.concatenate([rgb.astype(np.uint8), colorize(label.numpy(), val.info.palette),
                            colorize(pred, val.info.palette)], 1)
    path = out / "prediction.png"
    Image.fromarray(panel).save(path)
    print(f"wrote {path} (input | ground truth | prediction) and the checkpoint {r['last']}; "
          f"total {time.perf_counter() - t0:.0f} s")
    return {"miou": cm.miou(), "chance": chance, "speeds": speeds, "steps": r["iteration"]}


if __name__ == "__main__":
    main()
