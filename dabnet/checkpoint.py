"""Checkpoint files: atomic saving, and loading with clear errors for missing, corrupt or
mismatched files. Accepts this pipeline's checkpoints, bare state_dicts and the authors' release
format ({"model": state_dict, ...}, optionally with DataParallel's "module." prefixes).

Loading never runs code from the file: ``torch.load(weights_only=True)``, which unpickles only
tensors and plain data, plus the numpy array types that older training checkpoints of this
pipeline hold (their numpy RNG state). A file that needs anything else is refused with the names
of the objects it would have built."""
from __future__ import annotations

import os
import pickle
import re
import tempfile
from pathlib import Path

import torch

from .model import DABNet

CLASSIFIER_KEY = "classifier.0.conv.weight"


def save_atomic(obj, path):
    """torch.save to a temporary file in the target folder, then os.replace: a crash mid-write
    leaves the previous checkpoint intact, never a truncated one."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(prefix=f".{path.name}.", suffix=".tmp", dir=path.parent)
    try:
        with os.fdopen(fd, "wb") as f:
            torch.save(obj, f)
            f.flush()
            os.fsync(f.fileno())
        os.replace(tmp, path)
    except BaseException:
        if os.path.exists(tmp):
            os.unlink(tmp)
        raise


def _numpy_array_globals() -> list:
    """What unpickling a plain numpy array needs (it builds the array, runs nothing else)."""
    import numpy as np
    try:
        from numpy._core.multiarray import _reconstruct
    except ImportError:  # numpy < 2
        from numpy.core.multiarray import _reconstruct
    return [_reconstruct, np.ndarray, np.dtype, type(np.dtype(np.uint32))]


class UnsafeCheckpointError(RuntimeError):
    """The file holds pickled Python objects that weights-only loading will not build."""


def _refusal_reason(path, error) -> str:
    """The objects a refused checkpoint would have built, else the unpickler's own reason."""
    try:
        names = torch.serialization.get_unsafe_globals_in_checkpoint(path)
        if names:
            return "it would build " + ", ".join(names)
    except Exception:  # not a zip checkpoint (legacy or raw pickle): use the loader's words
        pass
    found = re.search(r"unsupported global: GLOBAL \S+|unsupported GLOBAL \S+"
                      r"|unsupported operand \S+", str(error), re.IGNORECASE)
    return found.group(0) if found else "content it does not support"


def load_checkpoint(path, map_location="cpu") -> dict:
    path = Path(path)
    if not path.is_file():
        raise FileNotFoundError(f"checkpoint not found: {path}")
    try:
        with torch.serialization.safe_globals(_numpy_array_globals()):
            ckpt = torch.load(path, map_location=map_location, weights_only=True)
    except pickle.UnpicklingError as e:
        raise UnsafeCheckpointError(
            f"cannot read checkpoint {path} safely: weights-only loading refused it "
            f"({_refusal_reason(path, e)}). Besides tensors and plain data the file holds "
            "pickled Python objects (or it is corrupt), and unpickling those can run arbitrary "
            "code, so it is not loaded. If "
            "you trust the file's source, extract its weights yourself (sd = torch.load(path, "
            "weights_only=False)['model']; torch.save(sd, 'weights.pt')) and pass that file "
            "instead") from None
    except Exception as e:
        raise RuntimeError(f"cannot read checkpoint {path}: not a PyTorch checkpoint or the file "
                           f"is corrupt ({type(e).__name__}: {e})") from e
    if not isinstance(ckpt, dict):
        raise RuntimeError(f"checkpoint {path} holds a {type(ckpt).__name__}, expected a dict "
                           "(a state_dict or a training checkpoint)")
    return ckpt


def state_dict_of(ckpt: dict) -> dict:
    """The model weights inside a checkpoint dict, without "module." prefixes."""
    sd = ckpt
    for key in ("model", "state_dict"):
        if isinstance(sd.get(key), dict):
            sd = sd[key]
            break
    if not all(isinstance(v, torch.Tensor) for v in sd.values()):
        raise RuntimeError("checkpoint holds no model state_dict (expected tensors, or a dict "
                           "with a 'model' or 'state_dict' entry)")
    return {k.removeprefix("module."): v for k, v in sd.items()}


def load_weights(model: torch.nn.Module, sd: dict, source="checkpoint"):
    """load_state_dict(strict=True) with a readable error that names what does not match."""
    own = model.state_dict()
    missing = [k for k in own if k not in sd]
    unexpected = [k for k in sd if k not in own]
    wrong = [f"{k}: checkpoint {tuple(sd[k].shape)} vs model {tuple(own[k].shape)}"
             for k in own if k in sd and sd[k].shape != own[k].shape]
    if missing or unexpected or wrong:
        parts = []
        if wrong:
            parts.append(f"{len(wrong)} shape mismatch(es), e.g. {wrong[0]}")
        if missing:
            parts.append(f"{len(missing)} missing key(s), e.g. {missing[0]}")
        if unexpected:
            parts.append(f"{len(unexpected)} unexpected key(s), e.g. {unexpected[0]}")
        raise ValueError(f"{source} does not match the model: " + "; ".join(parts))
    model.load_state_dict(sd, strict=True)
    return model


def load_model(path, classes=None, fused=False, device="cpu"):
    """Builds DABNet from a checkpoint. Returns (model in eval mode, meta dict). The class count
    comes from the checkpoint's metadata or classifier; `classes`, when given, must agree."""
    ckpt = load_checkpoint(path)
    sd = state_dict_of(ckpt)
    meta = dict(ckpt.get("meta") or {})
    if CLASSIFIER_KEY not in sd:
        raise ValueError(f"checkpoint {path} is not a DABNet checkpoint (no {CLASSIFIER_KEY})")
    n = int(sd[CLASSIFIER_KEY].shape[0])
    if classes is not None and classes != n:
        raise ValueError(f"checkpoint {path} has {n} classes but {classes} were asked for "
                         "(wrong --dataset for this checkpoint?)")
    meta.setdefault("classes", n)
    model = DABNet(classes=n, fused=fused)
    load_weights(model, sd, f"checkpoint {path}")
    return model.to(device).eval(), meta
