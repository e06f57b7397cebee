"""Deployable files of the fused model, checked against it:

* ``.pt2``: an AOTInductor package (torch.export, then Inductor's ahead-of-time compile); Python
  runs it with ``torch._inductor.aoti_load_package`` after ``import dabnet_kernels`` (which
  registers the dabnet ops), C++ with ``AOTIModelPackageLoader`` (deploy/dabnet_run.cpp);
* ``.onnx``: the same exported program through the torch.export-based ONNX exporter, each dabnet
  op translated to standard ONNX by dabnet_kernels.onnx.TRANSLATIONS; runs in onnxruntime.

Both take RGB pixel values (float32, N x 3 x H x W, 0-255; the checkpoint's mean is subtracted
inside) and return float32 logits (N x classes x H x W). Batch, H and W are dynamic (any H, W of
at least MIN_SIDE) unless `dynamic=False` fixes them to `size`.
"""
from __future__ import annotations

import json
import zipfile
from pathlib import Path

import torch
import torch.nn as nn

import dabnet_kernels
from .checkpoint import load_model
from .data import dataset_info
from .evaluate import PRECISIONS, for_inference

FORMATS = {".onnx": "onnx", ".pt2": "pt2"}
MIN_SIDE = 8
MAX_SIDE = 8192
# Relative to the largest |logit| (logits of a trained model reach ~100: an absolute tolerance
# would fail on rounding alone). bf16: the package's bf16 rounding differs from the eager model's.
RTOL = {"fp32": 1e-4, "bf16": 5e-2}


def export_format(path, fmt=None) -> str:
    """"onnx" or "pt2": `fmt` if given, else from the file suffix."""
    if fmt is not None:
        if fmt not in FORMATS.values():
            raise ValueError(f"unknown export format {fmt!r}; choose one of "
                             f"{', '.join(FORMATS.values())}")
        return fmt
    suffix = Path(path).suffix.lower()
    if suffix not in FORMATS:
        raise ValueError(f"cannot tell the export format from the file name {str(path)!r} "
                         f"(suffix {suffix or 'none'!r}): name it *.onnx or *.pt2, or pass "
                         "--format onnx|pt2")
    return FORMATS[suffix]


class Deployed(nn.Module):
    """What is exported: the model on pixel values, in its precision and memory format."""

    def __init__(self, model, mean, dtype=torch.float32, channels_last=False):
        super().__init__()
        self.model, self.dtype, self.channels_last = model, dtype, channels_last
        self.register_buffer("mean", torch.tensor(mean, dtype=torch.float32).view(1, 3, 1, 1))

    def forward(self, image):
        x = (image - self.mean).to(self.dtype)
        if self.channels_last:
            x = x.contiguous(memory_format=torch.channels_last)
        return self.model(x).float()


def _example_side(side: int) -> int:
    """The side to trace a dynamic export at: 3 mod 4. At a multiple of 4 the exporter's shape
    guards take the padding-free case as given and fix H and W to the example."""
    return side | 3


def export_program(model: nn.Module, size, dynamic=True, device="cpu"):
    """torch.export of model (an image -> logits module) at `size`; with dynamic, batch, H and W
    are symbols (the padding for odd sizes is traced, see dabnet.model)."""
    if not dynamic:
        return torch.export.export(model, (torch.zeros(1, 3, *size, device=device),))
    x = torch.zeros(2, 3, *(_example_side(s) for s in size), device=device)
    dims = {0: torch.export.Dim("batch", min=1, max=1024),
            2: torch.export.Dim("height", min=MIN_SIDE, max=MAX_SIDE),
            3: torch.export.Dim("width", min=MIN_SIDE, max=MAX_SIDE)}
    return torch.export.export(model, (x,), dynamic_shapes=(dims,),
                               prefer_deferred_runtime_asserts_over_guards=True)


def write_pt2(program, path, metadata: dict) -> str:
    from torch._inductor import aoti_compile_and_package

    meta = {k: json.dumps(v) if not isinstance(v, str) else v for k, v in metadata.items()}
    return aoti_compile_and_package(program, package_path=str(path),
                                    inductor_configs={"aot_inductor.metadata": meta})


def write_onnx(program, path, metadata: dict, opset=18) -> str:
    try:
        from dabnet_kernels.onnx import TRANSLATIONS
    except ImportError as e:
        raise RuntimeError(str(e)) from e
    onnx_program = torch.onnx.export(program, dynamo=True, opset_version=opset,
                                     custom_translation_table=TRANSLATIONS,
                                     input_names=["image"], output_names=["logits"],
                                     optimize=True, verbose=False)
    for k, v in metadata.items():
        onnx_program.model.metadata_props[k] = v if isinstance(v, str) else json.dumps(v)
    onnx_program.save(str(path))
    return str(path)


def package_metadata(path) -> dict:
    """What `dabnet export` stored in a .pt2 (classes, precision, device, ...), read from the
    archive without loading the compiled model."""
    path = Path(path)
    if not path.is_file():
        raise FileNotFoundError(f"package not found: {path}")
    try:
        with zipfile.ZipFile(path) as z:
            names = [n for n in z.namelist() if n.endswith("wrapper_metadata.json")]
            if not names:
                raise ValueError("it holds no AOTInductor model")
            raw = json.loads(z.read(names[0]))
    except (zipfile.BadZipFile, ValueError) as e:
        raise RuntimeError(f"{path} is not an AOTInductor package (.pt2): {e}") from e
    return {k: _json_or_str(v) for k, v in raw.items()}


class Package:
    """A loaded .pt2: call it on an image batch for the logits; ``metadata`` is what `dabnet
    export` stored. The input is checked first, so that a wrong one is an error that names the
    problem rather than one from inside the compiled model."""

    def __init__(self, runner, metadata: dict):
        self.runner, self.metadata = runner, metadata

    def check(self, image):
        m = self.metadata
        shape = tuple(image.shape) if isinstance(image, torch.Tensor) else None
        if shape is None or len(shape) != 4 or shape[1] != 3 or image.dtype != torch.float32:
            got = f"shape {shape}, dtype {image.dtype}" if shape else type(image).__name__
            raise ValueError(f"the package takes a float32 (N, 3, H, W) RGB batch, got {got}")
        if m.get("dynamic", True):
            side = int(m.get("min_side", MIN_SIDE))
            if min(shape[2:]) < side:
                raise ValueError(f"the package takes images of at least {side}x{side}, got "
                                 f"{shape[2]}x{shape[3]}")
        elif shape[0] != 1 or list(shape[2:]) != list(m["size"]):
            raise ValueError(f"the package was exported for batch 1 at {m['size'][0]}x"
                             f"{m['size'][1]} (--static), got shape {shape}")

    def __call__(self, image):
        self.check(image)
        out = self.runner(image)
        return out[0] if isinstance(out, (list, tuple)) else out


def load_package(path) -> Package:
    """The .pt2 at path, after checking that the device it was built for is here."""
    from torch._inductor import aoti_load_package  # dabnet_kernels (imported) registered the ops

    meta = package_metadata(path)
    built_for = str(meta.get("device", "cpu"))
    if built_for.startswith("cuda") and not torch.cuda.is_available():
        raise RuntimeError(f"package {path} was built for {built_for}, but no CUDA device is "
                           "visible here: export it again with --device cpu")
    return Package(aoti_load_package(str(path)), meta)


def _json_or_str(v):
    try:
        return json.loads(v)
    except (TypeError, ValueError):
        return v


def onnx_runner(path, spin=True):
    """onnxruntime on the CPU. spin=False: its worker threads sleep between runs instead of
    spinning, so that on a few cores they do not steal time from whatever runs next (a
    benchmark timing several runtimes in turn)."""
    import onnxruntime as ort

    opts = ort.SessionOptions()
    if not spin:
        opts.add_session_config_entry("session.intra_op.allow_spinning", "0")
    sess = ort.InferenceSession(str(path), opts, providers=["CPUExecutionProvider"])
    return lambda x: torch.from_numpy(sess.run(None, {"image": x.cpu().numpy()})[0])


def max_rel_diff(got, ref) -> float:
    """max |got - ref| over max |ref|: the tolerance scales with the logits."""
    scale = max(float(ref.abs().max()), 1e-12)
    return float((got.float() - ref.float()).abs().max()) / scale


def check_sizes(size, dynamic):
    """Where to compare the file with the model: the example size and, when dynamic, a size that
    needs the padding for odd sizes (H, W = 1 mod 4)."""
    if not dynamic:
        return [tuple(size)]
    return [tuple(size), tuple(s + (1 - s % 4) % 4 for s in size)]


def export(checkpoint, out, fmt=None, size=(512, 1024), precision="fp32", channels_last=None,
           dynamic=True, device="cpu", check=True, classes=None, opset=18, log=print,
           model=None, meta=None):
    """Writes the fused model to `out` (format from fmt or the suffix) and, with check, compares
    the file's logits with the fused eager model's on random images. Returns a dict."""
    fmt = export_format(out, fmt)
    if precision not in PRECISIONS:
        raise ValueError(f"precision must be one of {', '.join(PRECISIONS)}, got {precision!r}")
    if fmt == "onnx" and precision != "fp32":
        raise ValueError("ONNX export is fp32 only (onnxruntime's CPU kernels have no bfloat16 "
                         "convolution); use --precision fp32 or a .pt2 package")
    if min(size) < MIN_SIDE:
        raise ValueError(f"size {size[0]}x{size[1]} is too small: the model takes at least "
                         f"{MIN_SIDE}x{MIN_SIDE}")
    device = torch.device(device)
    if device.type == "cuda" and not dabnet_kernels.has_cuda_kernels():
        raise RuntimeError("a CUDA package needs dabnet_kernels built with its CUDA kernels (this "
                           "build has none): rebuild with a CUDA toolkit, or pass --device cpu")
    if model is None:
        model, meta = load_model(checkpoint, classes=classes, fused=True, device=device)
    meta = dict(meta or {})
    if channels_last is None:  # the fused CPU kernels are fastest on channels_last
        channels_last = fmt == "pt2" and device.type == "cpu"
    mean = meta.get("mean") or dataset_info(meta.get("dataset") or "cityscapes").mean
    model = for_inference(model, precision, channels_last)
    deployed = Deployed(model, mean, PRECISIONS[precision], channels_last).to(device)
    metadata = {"format_version": "1", "classes": model.classes, "precision": precision,
                "channels_last": channels_last, "device": device.type,
                "mean": [float(m) for m in mean], "input": "RGB 0-255 float32 NCHW",
                "dynamic": dynamic, "size": list(size), "min_side": MIN_SIDE}
    out = Path(out)
    out.parent.mkdir(parents=True, exist_ok=True)
    log(f"exporting the fused model ({model.classes} classes, {precision}"
        f"{', channels_last' if channels_last else ''}, {device.type}, "
        f"{'dynamic batch/H/W' if dynamic else f'fixed {size[0]}x{size[1]}'}) ...")
    with torch.no_grad():
        program = export_program(deployed, size, dynamic, device)
    log(f"writing {fmt} to {out} ..." + (" (AOTInductor compiles: a minute or more)"
                                         if fmt == "pt2" else ""))
    with torch.no_grad():
        if fmt == "pt2":
            write_pt2(program, out, metadata)
        else:
            write_onnx(program, out, metadata, opset)
    result = {"path": str(out), "format": fmt, "precision": precision,
              "channels_last": channels_last, "dynamic": dynamic, "classes": model.classes}
    if check:
        run = load_package(out) if fmt == "pt2" else onnx_runner(out)
        sizes, errs = check_sizes(size, dynamic), []
        for s in sizes:
            x = torch.rand(1, 3, *s, device=device) * 255
            with torch.no_grad():
                got, ref = run(x), deployed(x)
            errs.append(max_rel_diff(got.to(ref.device), ref))
            if errs[-1] > RTOL[precision]:
                raise RuntimeError(f"the {fmt} file's logits differ from the fused model's by "
                                   f"{errs[-1]:.3g} of the largest logit at {s[0]}x{s[1]} "
                                   f"(> {RTOL[precision]})")
        result["checked_sizes"] = sizes
        result["max_rel_diff"] = max(errs)
    return result
