"""Training as in the paper's Sec. 4.1: SGD (momentum 0.9, weight decay 1e-4), poly learning rate
(base 4.5e-2, power 0.9, optional linear warm-up), random scale / flip / crop, mean subtraction,
cross-entropy with ignore label 255 (optionally class-weighted, optionally OHEM), optional AMP on
CUDA, DDP under torchrun.

Resuming loses nothing: a checkpoint (written atomically) holds the model, optimizer, AMP scaler,
iteration (which fixes the poly LR), epoch, position inside the epoch, best mIoU and the RNG
states, and the data order and augmentation are functions of (seed, epoch, index). SIGINT /
SIGTERM stop at the end of the running step and write the checkpoint first, so ``--resume``
continues exactly where the run stopped.
"""
from __future__ import annotations

import json
import math
import random
import signal
import time
from dataclasses import asdict, dataclass, field
from pathlib import Path

import numpy as np
import torch

from . import distributed as D
from .checkpoint import load_checkpoint, load_weights, save_atomic, state_dict_of
from .data import SCALES, build_dataset, measure_mean
from .evaluate import autocast, evaluate
from .lock import OutputInUseError, OutputLock
from .losses import SegCrossEntropy
from .model import DABNet

CKPT_FORMAT = "dabnet-train-v1"


@dataclass
class TrainConfig:
    dataset: str = "synthetic"
    data_root: str | None = None
    out_dir: str = "runs/dabnet"
    crop: tuple | None = None  # (H, W); None = the dataset's default
    scales: tuple = SCALES
    batch_size: int = 8  # per process
    epochs: int = 1
    max_steps: int | None = None  # total iterations; caps the run and the poly schedule
    lr: float = 4.5e-2
    momentum: float = 0.9
    weight_decay: float = 1e-4
    power: float = 0.9
    warmup_steps: int = 0
    warmup_start: float = 0.1  # LR factor at step 0 of the warm-up
    ohem: bool = False
    ohem_thresh: float = 0.7
    ohem_min_kept: int = 100_000
    class_weights: list | None = None
    amp: bool = False
    fused: bool = False
    sync_bn: bool = True  # under DDP
    device: str = "auto"
    workers: int = 2
    seed: int = 0
    resume: str | None = None  # a checkpoint path, or "auto" = <out_dir>/last.pt if present
    val_every: int = 1  # epochs; 0 = never
    val_split: str = "val"
    eval_scale: float = 1.0
    synthetic_length: int | None = None
    synthetic_size: tuple = (128, 256)
    mean: tuple | None = None
    progress: bool = True
    log_every: int = 10
    stop_after_steps: int | None = None  # stop (as if interrupted) after this many steps
    time_limit_s: float | None = None  # stop (as if interrupted) once training took this long
    extra: dict = field(default_factory=dict)


def poly_lr(cfg: TrainConfig, it: int, total: int) -> float:
    """Poly decay base * (1 - it / total) ** power, after an optional linear warm-up."""
    if cfg.warmup_steps and it < cfg.warmup_steps:
        f = cfg.warmup_start + (1 - cfg.warmup_start) * it / cfg.warmup_steps
        return cfg.lr * f
    return cfg.lr * max(0.0, 1 - it / max(total, 1)) ** cfg.power


def resolve_device(name: str) -> torch.device:
    if name == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    dev = torch.device(name)
    if dev.type == "cuda" and not torch.cuda.is_available():
        raise RuntimeError("--device cuda was asked for but no CUDA GPU is visible")
    return dev


def _rng_state():
    # numpy's state as a tensor and plain numbers: the checkpoint then loads weights-only.
    kind, keys, pos, has_gauss, gauss = np.random.get_state()
    state = {"torch": torch.get_rng_state(),
             "numpy": (kind, torch.from_numpy(keys.astype(np.int64)), pos, has_gauss, gauss),
             "python": random.getstate()}
    if torch.cuda.is_available():
        state["cuda"] = torch.cuda.get_rng_state_all()
    return state


def _set_rng_state(state):
    torch.set_rng_state(state["torch"])
    kind, keys, *rest = state["numpy"]  # keys: a tensor, or an array in older checkpoints
    keys = keys.numpy() if isinstance(keys, torch.Tensor) else np.asarray(keys)
    np.random.set_state((kind, keys.astype(np.uint32), *rest))
    random.setstate(state["python"])
    if "cuda" in state and torch.cuda.is_available():
        torch.cuda.set_rng_state_all(state["cuda"])


class _StopFlag:
    """Turns SIGINT / SIGTERM into a flag checked between steps (main thread only)."""

    def __init__(self):
        self.stop = False
        self._old = {}

    def __enter__(self):
        import threading

        if threading.current_thread() is threading.main_thread():
            for sig in (signal.SIGINT, signal.SIGTERM):
                self._old[sig] = signal.signal(sig, self._handle)
        return self

    def _handle(self, signum, frame):
        if self.stop:  # a second signal: give up at once
            raise KeyboardInterrupt
        self.stop = True
        print(f"\n[dabnet] signal {signum}: finishing this step, then writing the checkpoint",
              flush=True)

    def __exit__(self, *exc):
        for sig, old in self._old.items():
            signal.signal(sig, old)


def _worker_init(_):
    # Ctrl-C reaches the whole process group; workers ignore it so that the main process can
    # finish its step and write the checkpoint instead of finding its workers dead.
    signal.signal(signal.SIGINT, signal.SIG_IGN)


def train(cfg: TrainConfig) -> dict:
    """Runs (or resumes) training; returns a summary dict (iteration, epoch, best_miou, last
    checkpoint path, stopped_early, ...). The output folder is locked for the run (dabnet.lock):
    a second run on the same folder raises OutputInUseError."""
    device = resolve_device(cfg.device)
    env = D.setup(device.type)
    if device.type == "cuda" and env.enabled:
        device = torch.device("cuda", env.local_rank)
    lock, error = OutputLock(cfg.out_dir), None
    if env.is_main:  # one lock per run: rank 0 takes it
        try:
            lock.acquire()
        except OutputInUseError as e:
            error = e
    if env.enabled:  # every rank stops when rank 0 could not lock
        refused = torch.tensor([float(error is not None)], device=device)
        torch.distributed.all_reduce(refused)
        if refused.item() and error is None:
            error = OutputInUseError(f"rank 0 could not lock the output folder {cfg.out_dir}")
    if error is not None:
        raise error
    try:
        return _train(cfg, device, env)
    finally:
        lock.release()


def _train(cfg: TrainConfig, device: torch.device, env) -> dict:
    torch.manual_seed(cfg.seed)
    np.random.seed(cfg.seed)
    random.seed(cfg.seed)
    out = Path(cfg.out_dir)
    log = print if env.is_main else (lambda *a, **k: None)

    kw = dict(seed=cfg.seed, mean=None if cfg.mean == "auto" else cfg.mean,
              synthetic_size=tuple(cfg.synthetic_size))
    train_set = build_dataset(cfg.dataset, cfg.data_root, "train", train=True, crop=cfg.crop,
                              scales=cfg.scales, synthetic_length=cfg.synthetic_length, **kw)
    if cfg.mean == "auto" or (cfg.mean is None and train_set.info.extra.get("measure_mean")):
        # Every rank measures the same files: the same mean everywhere, no communication.
        train_set.mean = measure_mean(train_set, progress=cfg.progress and env.is_main)
        kw["mean"] = train_set.mean
        log(f"[dabnet] dataset mean (R, G, B) measured on the training split: "
            f"{', '.join(f'{m:.2f}' for m in train_set.mean)}")
    val_set = None
    if cfg.val_every:
        val_set = build_dataset(cfg.dataset, cfg.data_root, cfg.val_split, train=False,
                                synthetic_length=max(1, (cfg.synthetic_length or 500) // 10)
                                if cfg.dataset == "synthetic" else None, **kw)
    info = train_set.info
    per_step = cfg.batch_size * env.world_size
    steps_per_epoch = len(train_set) // per_step
    if steps_per_epoch < 1:
        raise ValueError(f"the training set has {len(train_set)} images, fewer than one batch of "
                         f"{cfg.batch_size} x {env.world_size} process(es)")
    total = cfg.max_steps or cfg.epochs * steps_per_epoch
    epochs = math.ceil(total / steps_per_epoch)

    # Under DDP with sync BN the fused modules synchronise their BN-PReLU statistics too
    # (dabnet_kernels.sync), so --fused trains the fused modules either way.
    fused = cfg.fused
    model = DABNet(info.num_classes, fused=fused).to(device)
    if env.enabled and cfg.sync_bn:
        model = D.convert_sync_bn(model, device.type)
    optimizer = torch.optim.SGD(model.parameters(), lr=cfg.lr, momentum=cfg.momentum,
                                weight_decay=cfg.weight_decay)
    criterion = SegCrossEntropy(cfg.class_weights, ohem=cfg.ohem, thresh=cfg.ohem_thresh,
                                min_kept=cfg.ohem_min_kept).to(device)
    use_amp = cfg.amp and device.type == "cuda"
    if cfg.amp and not use_amp:
        log("[dabnet] --amp needs CUDA; training in fp32")
    scaler = torch.amp.GradScaler("cuda", enabled=use_amp)

    iteration, epoch, step_in_epoch, best = 0, 0, 0, -1.0
    resume = cfg.resume
    if resume == "auto":
        resume = str(out / "last.pt") if (out / "last.pt").is_file() else None
    if resume:
        ck = load_checkpoint(resume)
        if ck.get("format") != CKPT_FORMAT:
            raise ValueError(f"{resume} is not a training checkpoint of this pipeline (no "
                             f"optimizer state); use it with eval/predict, or start afresh")
        if ck["meta"]["dataset"] != cfg.dataset:
            raise ValueError(f"{resume} was trained on {ck['meta']['dataset']!r}, not "
                             f"{cfg.dataset!r}")
        load_weights(model, state_dict_of(ck), f"checkpoint {resume}")
        optimizer.load_state_dict(ck["optimizer"])
        scaler.load_state_dict(ck["scaler"])
        iteration, epoch, step_in_epoch = ck["iteration"], ck["epoch"], ck["step_in_epoch"]
        best = ck["best_miou"]
        if ck["total_steps"] != total:
            log(f"[dabnet] note: the checkpoint planned {ck['total_steps']} steps, this run "
                f"plans {total}; the poly schedule follows the new total")
        _set_rng_state(ck["rng"])
        log(f"[dabnet] resumed {resume}: epoch {epoch}, step {step_in_epoch}, iteration "
            f"{iteration}")

    ddp_model = model
    if env.enabled:
        ddp_model = torch.nn.parallel.DistributedDataParallel(
            model, device_ids=[device.index] if device.type == "cuda" else None)

    meta = {"dataset": cfg.dataset, "classes": info.num_classes, "class_names": list(info.classes),
            "mean": list(train_set.mean), "fused": fused}

    def checkpoint(path):
        if env.is_main:
            save_atomic({"format": CKPT_FORMAT, "model": model.state_dict(),
                         "optimizer": optimizer.state_dict(), "scaler": scaler.state_dict(),
                         "iteration": iteration, "epoch": epoch, "step_in_epoch": step_in_epoch,
                         "total_steps": total, "best_miou": best, "rng": _rng_state(),
                         "meta": meta, "config": asdict(cfg)}, path)

    if env.is_main:
        out.mkdir(parents=True, exist_ok=True)
        (out / "config.json").write_text(json.dumps(asdict(cfg), indent=1, default=str))
    stopped, history = False, []
    steps_this_run = 0
    t_start = time.perf_counter()
    with _StopFlag() as flag:
        while iteration < total and not stopped:
            train_set.set_epoch(epoch)
            sampler = D.EpochSampler(len(train_set), True, cfg.seed, epoch, env.rank,
                                     env.world_size, skip=step_in_epoch * cfg.batch_size)
            loader = torch.utils.data.DataLoader(
                train_set, cfg.batch_size, sampler=sampler, drop_last=True,
                num_workers=cfg.workers, pin_memory=device.type == "cuda",
                worker_init_fn=_worker_init if cfg.workers else None)
            model.train()
            left = min(steps_per_epoch - step_in_epoch, total - iteration)
            bar = None
            if cfg.progress and env.is_main:
                from tqdm import tqdm
                bar = tqdm(total=left, desc=f"epoch {epoch + 1}/{epochs}", unit="step")
            for img, label, _ in loader:
                if iteration >= total or step_in_epoch >= steps_per_epoch:
                    break
                lr = poly_lr(cfg, iteration, total)
                for g in optimizer.param_groups:
                    g["lr"] = lr
                img = img.to(device, non_blocking=True)
                label = label.to(device, non_blocking=True)
                with autocast(device, use_amp):
                    loss = criterion(ddp_model(img), label)
                if not torch.isfinite(loss):
                    raise RuntimeError(f"loss became {loss.item()} at iteration {iteration} "
                                       "(lower --lr, or check the labels)")
                optimizer.zero_grad(set_to_none=True)
                scaler.scale(loss).backward()
                scaler.step(optimizer)
                scaler.update()
                iteration += 1
                step_in_epoch += 1
                steps_this_run += 1
                history.append(loss.item())
                if bar is not None:
                    bar.update(1)
                    if iteration % max(cfg.log_every, 1) == 0:
                        bar.set_postfix(loss=f"{loss.item():.3f}", lr=f"{lr:.2e}")
                stop = flag.stop or (cfg.stop_after_steps is not None
                                     and steps_this_run >= cfg.stop_after_steps) \
                    or (cfg.time_limit_s is not None
                        and time.perf_counter() - t_start > cfg.time_limit_s)
                if env.enabled:  # every rank must stop at the same step
                    t = torch.tensor([float(stop)], device=device)
                    torch.distributed.all_reduce(t)
                    stop = bool(t.item())
                if stop:
                    stopped = True
                    break
            if bar is not None:
                bar.close()
            del loader
            if stopped:
                break
            epoch += 1
            step_in_epoch = 0
            if val_set is not None and (epoch % cfg.val_every == 0 or iteration >= total):
                shard = D.EpochSampler(len(val_set), False, rank=env.rank,
                                       world_size=env.world_size, pad=False)
                cm = evaluate(model, val_set, device, sampler=shard, workers=0,
                              input_scale=cfg.eval_scale, amp=use_amp,
                              progress=cfg.progress and env.is_main, desc="val")
                miou = cm.miou()
                log(f"[dabnet] epoch {epoch}: val mIoU {100 * miou:.2f}")
                if miou > best:
                    best = miou
                    checkpoint(out / "best.pt")
            checkpoint(out / "last.pt")
        if stopped:
            checkpoint(out / "last.pt")
            log(f"[dabnet] stopped at iteration {iteration} (epoch {epoch}, step "
                f"{step_in_epoch}); resume with --resume {out / 'last.pt'}")
    elapsed = time.perf_counter() - t_start
    if env.enabled:
        torch.distributed.barrier()
    return {"iteration": iteration, "epoch": epoch, "total_steps": total, "best_miou": best,
            "stopped_early": stopped, "last": str(out / "last.pt"), "losses": history,
            "seconds": elapsed, "model": model, "fused": fused, "rank": env.rank}
