"""Model facts: parameter count, convolution MACs / FLOPs (counted with forward hooks), and which
dabnet_kernels backend runs on a device."""
from __future__ import annotations

import torch
import torch.nn as nn


@torch.no_grad()
def count_macs(model: nn.Module, input_size=(512, 1024)) -> dict:
    """Multiply-accumulates of every Conv2d for one image, by kind (dense / depthwise / 1x1);
    BN, PReLU, pooling and the upsampling are not counted (as in the paper's FLOPs)."""
    totals = {"dense": 0, "depthwise": 0, "pointwise": 0}

    def hook(mod, inp, out):
        k = mod.kernel_size[0] * mod.kernel_size[1]
        macs = out.numel() // out.shape[0] * (mod.in_channels // mod.groups) * k
        if mod.groups > 1 and mod.groups == mod.in_channels:
            totals["depthwise"] += macs
        elif k == 1:
            totals["pointwise"] += macs
        else:
            totals["dense"] += macs

    hooks = [m.register_forward_hook(hook) for m in model.modules() if isinstance(m, nn.Conv2d)]
    was = model.training
    try:
        model.eval()(torch.zeros(1, 3, *input_size))
    finally:
        for h in hooks:
            h.remove()
        model.train(was)
    totals["total"] = sum(totals.values())
    return totals


def backend_for(device) -> str:
    """The dabnet_kernels backend an op on `device` would use, or why none can run."""
    try:
        from dabnet_kernels import backend
    except Exception as e:  # extension not built
        return f"unavailable ({str(e).splitlines()[0]})"
    try:
        return backend.resolve(torch.empty(0, device=device))
    except Exception as e:
        return f"unavailable ({e})"


def model_info(model: nn.Module, input_size=(512, 1024), device="cpu") -> dict:
    params = sum(p.numel() for p in model.parameters())
    macs = count_macs(model, input_size)
    return {"parameters": params, "input_size": tuple(input_size), "macs": macs,
            "gflops": 2 * macs["total"] / 1e9, "gmacs": macs["total"] / 1e9,
            "device": str(device), "backend": backend_for(device)}
