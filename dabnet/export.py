"""ONNX export through the unfused model (plain PyTorch ops, which every ONNX runtime knows),
checked against PyTorch with onnxruntime."""
from __future__ import annotations

import warnings
from pathlib import Path

import numpy as np
import torch

from .checkpoint import load_model


def export_onnx(checkpoint, out_path, input_size=(512, 1024), opset=17, dynamic=True,
                check=True, atol=1e-4, model=None):
    """Writes the ONNX file; with check, runs it in onnxruntime on a random input and returns the
    max abs difference from PyTorch's logits (raises if above atol). Returns a dict."""
    if model is None:
        model, _ = load_model(checkpoint, fused=False)  # the export graph uses standard ops only
    model = model.cpu().eval()
    out_path = Path(out_path)
    out_path.parent.mkdir(parents=True, exist_ok=True)
    x = torch.randn(1, 3, *input_size)
    axes = {"image": {0: "batch", 2: "height", 3: "width"},
            "logits": {0: "batch", 2: "height", 3: "width"}} if dynamic else None
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", DeprecationWarning)
        # dynamo=False: the TorchScript exporter, which needs no onnxscript package.
        torch.onnx.export(model, (x,), str(out_path), input_names=["image"],
                          output_names=["logits"], opset_version=opset, dynamic_axes=axes,
                          dynamo=False)
    result = {"path": str(out_path), "input_size": tuple(input_size), "opset": opset}
    if check:
        import onnxruntime as ort

        sess = ort.InferenceSession(str(out_path), providers=["CPUExecutionProvider"])
        with torch.no_grad():
            ref = model(x).numpy()
        got = sess.run(None, {"image": x.numpy()})[0]
        err = float(np.abs(got - ref).max())
        result["max_abs_diff"] = err
        if not err <= atol:
            raise RuntimeError(f"ONNX output differs from PyTorch by {err:.3g} (> {atol})")
    return result
