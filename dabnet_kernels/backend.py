"""Which implementation runs an op: ``set_backend``, ``use_backend`` and ``DABNET_BACKEND``.

Backends: "cuda" (the compiled CUDA kernels), "triton" (dabnet_kernels.triton), "cpu" (the
compiled C++ kernels), "reference" (pure PyTorch, dabnet_kernels.reference) and "auto", the
default: the CUDA kernels for CUDA tensors when built, else Triton, else the reference; the C++
kernels for CPU tensors. Triton runs CPU tensors only under the interpreter (TRITON_INTERPRET=1).
"""
from __future__ import annotations

import contextlib
import os

import torch

from . import _lib  # its has_cuda_kernels is looked up per call (tests replace it)

BACKENDS = ("auto", "cuda", "triton", "cpu", "reference")
_state = {"name": None}


def _check(name):
    if name not in BACKENDS:
        raise ValueError(f"unknown dabnet backend {name!r}; choose one of {', '.join(BACKENDS)}")
    return name


def get_backend() -> str:
    """The backend in force: set_backend's, else $DABNET_BACKEND, else "auto"."""
    if _state["name"] is not None:
        return _state["name"]
    return _check(os.environ.get("DABNET_BACKEND", "auto") or "auto")


def set_backend(name: str) -> None:
    """Selects the backend for all later calls ("auto" restores the default)."""
    _state["name"] = _check(name)


@contextlib.contextmanager
def use_backend(name: str):
    """Context manager: the backend `name` inside the block, the previous one after it."""
    prev = _state["name"]
    _state["name"] = _check(name)
    try:
        yield
    finally:
        _state["name"] = prev


def _triton_module():
    """dabnet_kernels.triton, or None when it cannot be imported (triton missing)."""
    try:
        from . import triton as _t
    except ImportError:
        return None
    return _t


def triton_available() -> bool:
    t = _triton_module()
    return t is not None and t.AVAILABLE


def _triton_why_not() -> str:
    t = _triton_module()
    err = None if t is None else t.ERROR
    return f"triton cannot be imported ({err})" if err is not None else "triton is not installed"


def _triton_interpreted() -> bool:
    """Whether the Triton kernels run on the interpreter: decided when they were first imported
    (TRITON_INTERPRET=1 then), not by the environment now."""
    t = _triton_module()
    return bool(t is not None and getattr(t, "INTERPRETED", False))


def resolve(x: torch.Tensor) -> str:
    """The concrete backend ("cuda", "triton", "cpu" or "reference") for a tensor on x's device."""
    name = get_backend()
    dev = x.device.type
    if name == "auto":
        if dev == "cpu":
            return "cpu"
        if dev == "cuda":
            if _lib.has_cuda_kernels():
                return "cuda"
            return "triton" if triton_available() else "reference"
        return "reference"
    if name == "cuda" and (dev != "cuda" or not _lib.has_cuda_kernels()):
        why = "this build has no CUDA kernels" if dev == "cuda" else f"x is on {x.device}"
        raise RuntimeError(f"dabnet backend 'cuda' is not available: {why}")
    if name == "cpu" and dev != "cpu":
        raise RuntimeError(f"dabnet backend 'cpu' is not available: x is on {x.device}")
    if name == "triton":
        if not triton_available():
            raise RuntimeError(f"dabnet backend 'triton' is not available: {_triton_why_not()}")
        if dev == "cpu" and not _triton_interpreted():
            raise RuntimeError("dabnet backend 'triton' runs CPU tensors only under the Triton "
                               "interpreter (set TRITON_INTERPRET=1 before importing triton "
                               "and dabnet_kernels)")
        if dev not in ("cpu", "cuda"):
            raise RuntimeError(f"dabnet backend 'triton' is not available for {x.device} tensors")
    return name


def ops_for(x: torch.Tensor):
    """The op namespace that implements the dabnet ops for x, or None for the reference."""
    name = resolve(x)
    if name == "reference":
        return None
    if name == "triton":
        return torch.ops.dabnet_triton
    return torch.ops.dabnet
