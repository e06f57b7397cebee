"""Multi-process training helpers: torchrun environment, per-rank sampling, and batch-norm
statistics synchronised across ranks.

nn.SyncBatchNorm runs on CUDA only; dabnet_kernels.sync.GlobalBatchNorm2d does the same job on any
device and any process-group backend (gloo on CPU included). The fused modules of
dabnet_kernels.nn synchronise their own statistics when their BatchNorm child is either."""
from __future__ import annotations

import os
from dataclasses import dataclass

import torch
import torch.distributed as dist
import torch.nn as nn

from dabnet_kernels.sync import GlobalBatchNorm2d


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


def convert_sync_bn(module: nn.Module, device_type: str) -> nn.Module:
    """Every BatchNorm2d synchronised across ranks: nn.SyncBatchNorm on CUDA, GlobalBatchNorm2d
    elsewhere. This covers the fused modules too (their BatchNorm children are swapped in the
    same way, and they then synchronise their fused BN-PReLU in training). State_dict keys are
    unchanged."""
    if device_type == "cuda":
        return nn.SyncBatchNorm.convert_sync_batchnorm(module)
    if type(module) is nn.BatchNorm2d:
        new = GlobalBatchNorm2d(module.num_features, module.eps, module.momentum, module.affine,
                                module.track_running_stats)
        # The very parameters and buffers (their dtype and device included), as
        # nn.SyncBatchNorm.convert_sync_batchnorm keeps them.
        for name in ("weight", "bias", "running_mean", "running_var", "num_batches_tracked"):
            setattr(new, name, getattr(module, name))
        new.train(module.training)
        return new
    for name, child in module.named_children():
        setattr(module, name, convert_sync_bn(child, device_type))
    return module
