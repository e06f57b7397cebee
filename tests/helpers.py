"""Shared test helpers: inputs in the three layouts the ops must accept, BN parameter sets."""
import torch

from dabnet_kernels.reference import BNPReLUParams

LAYOUTS = ("nchw", "channels_last", "strided")
DILATIONS = (1, 2, 3, 4, 8, 16)


def make_input(shape, layout="nchw", dtype=torch.float64, device="cpu", requires_grad=False):
    """A random tensor of `shape` in NCHW, channels_last, or a non-contiguous strided view."""
    N, C, H, W = shape
    if layout == "strided":  # every other column of a wider tensor: neither layout is contiguous
        x = torch.randn(N, C, H, 2 * W, dtype=dtype, device=device)[..., ::2]
        assert not x.is_contiguous() and not x.is_contiguous(memory_format=torch.channels_last)
    else:
        x = torch.randn(shape, dtype=dtype, device=device)
        if layout == "channels_last":
            x = x.contiguous(memory_format=torch.channels_last)
    return x.requires_grad_(requires_grad)


def dw_weight(C, along, dtype=torch.float64, device="cpu"):
    shape = (C, 1, 3, 1) if along == "h" else (C, 1, 1, 3)
    return torch.randn(shape, dtype=dtype, device=device)


def bn_params(C, dtype=torch.float64, device="cpu", single_slope=False, nbt=False):
    """Random BN-PReLU parameters with positive running variance and slopes of both signs."""
    kw = dict(dtype=dtype, device=device)
    return BNPReLUParams(
        torch.randn(C, **kw) * 0.5 + 1, torch.randn(C, **kw) * 0.5, torch.randn(C, **kw) * 0.3,
        torch.rand(C, **kw) + 0.5, torch.randn(1 if single_slope else C, **kw) * 0.3,
        torch.zeros((), dtype=torch.long, device=device) if nbt else None)


def bn_list(C, **kw):
    """bn_params' five tensors as a list, to splat into the ops' positional arguments."""
    return list(bn_params(C, **kw)[:5])


def clone_params(p):
    return BNPReLUParams(*[t.clone() if t is not None else None for t in p])


def tol(dtype):
    return dict(float64=dict(rtol=1e-10, atol=1e-10), float32=dict(rtol=1e-4, atol=1e-5))[
        str(dtype).split(".")[-1]]
