"""Multi-process training helpers: torchrun environment, per-rank sampling, and batch-norm
statistics synchronised across ranks.

nn.SyncBatchNorm runs on CUDA only; GlobalBatchNorm2d does the same job on any device and any
process-group backend (gloo on CPU included): it all-reduces per-channel sums with a
differentiable all-reduce, so autograd also sums the backward's reductions across ranks."""
from __future__ import annotations

import os
from dataclasses import dataclass

import torch
import torch.distributed as dist
import torch.nn as nn


@dataclass
class DistEnv:
    rank: int = 0
    local_rank: int = 0
    world_size: int = 1

    @property
    def is_main(self):
        return self.rank == 0

    @property
    def enabled(self):
        return self.world_size > 1


def setup(device_type: str) -> DistEnv:
    """Joins the process group described by torchrun's environment (RANK, WORLD_SIZE,
    LOCAL_RANK, MASTER_ADDR/PORT); a single process when WORLD_SIZE is unset or 1."""
    world = int(os.environ.get("WORLD_SIZE", "1"))
    if world <= 1:
        return DistEnv()
    env = DistEnv(int(os.environ["RANK"]), int(os.environ.get("LOCAL_RANK", "0")), world)
    if not dist.is_initialized():
        backend = "nccl" if device_type == "cuda" else "gloo"
        if device_type == "cuda":
            torch.cuda.set_device(env.local_rank)
        dist.init_process_group(backend)
    return env


def cleanup():
    if dist.is_available() and dist.is_initialized():
        dist.destroy_process_group()


class EpochSampler(torch.utils.data.Sampler):
    """Shuffles with a generator seeded by (seed, epoch), gives rank r every world-th index
    (padded by wrapping so that all ranks see the same count when `pad`), and skips the first
    `skip` indices of this rank (to resume an interrupted epoch exactly)."""

    def __init__(self, n, shuffle=True, seed=0, epoch=0, rank=0, world_size=1, skip=0, pad=True):
        if shuffle:
            g = torch.Generator().manual_seed(seed * 100_003 + epoch)
            order = torch.randperm(n, generator=g).tolist()
        else:
            order = list(range(n))
        if pad and world_size > 1 and n % world_size:
            order += order[: world_size - n % world_size]
        self.indices = order[rank::world_size][skip:]

    def __iter__(self):
        return iter(self.indices)

    def __len__(self):
        return len(self.indices)


class _AllReduceSum(torch.autograd.Function):
    """Sum over ranks; its gradient is the sum over ranks of the incoming gradients (every
    rank's loss depends on every rank's input through the shared statistics)."""

    @staticmethod
    def forward(ctx, x):
        x = x.clone()
        dist.all_reduce(x)
        return x

    @staticmethod
    def backward(ctx, grad):
        grad = grad.clone()
        dist.all_reduce(grad)
        return grad


class GlobalBatchNorm2d(nn.BatchNorm2d):
    """BatchNorm2d whose training statistics cover the batch of every rank."""

    def forward(self, x):
        if not (self.training and dist.is_available() and dist.is_initialized()
                and dist.get_world_size() > 1):
            return super().forward(x)
        c = x.shape[1]
        xf = x.float()
        count = xf.new_tensor([x.numel() // c])
        stats = _AllReduceSum.apply(torch.cat([xf.sum((0, 2, 3)), (xf * xf).sum((0, 2, 3)), count]))
        n = stats[-1]
        mean = stats[:c] / n
        var = (stats[c:2 * c] / n - mean * mean).clamp_min(0)  # biased, as BN normalises with
        if self.track_running_stats:
            with torch.no_grad():
                m = self.momentum if self.momentum is not None else 0.1
                self.running_mean.mul_(1 - m).add_(mean.detach(), alpha=m)
                self.running_var.mul_(1 - m).add_(var.detach() * n / (n - 1).clamp_min(1),
                                                  alpha=m)
                self.num_batches_tracked += 1
        y = (xf - mean[:, None, None]) * torch.rsqrt(var + self.eps)[:, None, None]
        if self.affine:
            y = y * self.weight[:, None, None] + self.bias[:, None, None]
        return y.to(x.dtype)


def convert_sync_bn(module: nn.Module, device_type: str) -> nn.Module:
    """Every BatchNorm2d synchronised across ranks: nn.SyncBatchNorm on CUDA, GlobalBatchNorm2d
    elsewhere. State_dict keys are unchanged."""
    if device_type == "cuda":
        return nn.SyncBatchNorm.convert_sync_batchnorm(module)
    if type(module) is nn.BatchNorm2d:
        new = GlobalBatchNorm2d(module.num_features, module.eps, module.momentum, module.affine,
                                module.track_running_stats)
        new.load_state_dict(module.state_dict())
        new.train(module.training)
        return new
    for name, child in module.named_children():
        setattr(module, name, convert_sync_bn(child, device_type))
    return module
