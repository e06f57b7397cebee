"""The `dabnet` command line: train, eval, predict, export, info (`dabnet <command> --help`)."""
from __future__ import annotations

import argparse
import json
import math
import os
import sys

from .data import DATASETS, SCALES


def size_arg(text: str):
    """'512x1024' (or '512,1024') -> (512, 1024)."""
    try:
        h, w = (int(v) for v in text.lower().replace(",", "x").split("x"))
    except ValueError:
        raise argparse.ArgumentTypeError(f"size must look like HxW (e.g. 512x1024), got {text!r}")
    if h < 8 or w < 8:
        raise argparse.ArgumentTypeError(f"size {text} is too small (at least 8x8)")
    return h, w


def mean_arg(text: str):
    return "auto" if text == "auto" else floats_arg(text)


def floats_arg(text: str):
    try:
        return tuple(float(v) for v in text.split(","))
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected comma-separated numbers, got {text!r}")


def _inference_opts(p, cpu_default=""):
    p.add_argument("--precision", choices=["fp32", "bf16"], default="fp32",
                   help="run the whole network in this precision (default fp32); bf16 is about "
                        "twice as fast on CPUs with AVX512_BF16 or AMX, with a few labels "
                        "changed where classes nearly tie")
    p.add_argument("--channels-last", action=argparse.BooleanOptionalAction, default=None,
                   help="channels_last memory format (faster on CPU, with --fused most of all)"
                        + cpu_default)


def _common(p, checkpoint_required=True):
    p.add_argument("--device", default="auto",
                   help="cpu, cuda, cuda:N or auto (CUDA when visible; default)")
    if checkpoint_required is not None:
        p.add_argument("--checkpoint", "-c", required=checkpoint_required,
                       help="a checkpoint from `dabnet train` (last.pt / best.pt), a bare "
                            "state_dict, or the authors' release file")
    p.add_argument("--no-progress", action="store_true", help="hide the progress bars")
    p.add_argument("--default-malloc", action="store_true",
                   help="keep glibc's malloc settings; by default they are tuned so that freed "
                        "activations stay mapped between forwards instead of being faulted in "
                        "again (dabnet_kernels.tune_malloc; faster CPU inference, see "
                        "docs/design.md)")


def build_parser() -> argparse.ArgumentParser:
    ds = ", ".join(DATASETS)
    parser = argparse.ArgumentParser(
        prog="dabnet",
        description="DABNet (Li et al., BMVC 2019) real-time semantic segmentation: train, "
                    "evaluate, predict, export to ONNX and inspect the model. The built-in "
                    "'synthetic' dataset needs no download.",
        epilog="Multi-GPU / multi-node: torchrun --nproc-per-node N -m dabnet train ...")
    sub = parser.add_subparsers(dest="command", metavar="command", required=True)

    t = sub.add_parser("train", help="train a model (paper Sec. 4.1 recipe)",
                       description="Trains DABNet with SGD + poly LR, random scale/flip/crop and "
                                   "cross-entropy (optionally OHEM). Writes <out>/last.pt every "
                                   "epoch (atomically) and <out>/best.pt on the best val mIoU. "
                                   "Ctrl-C writes the checkpoint and stops; --resume continues "
                                   "exactly where it stopped.")
    t.add_argument("--dataset", default="synthetic", choices=list(DATASETS), help=f"one of {ds}")
    t.add_argument("--data-root", help="dataset folder (not needed for synthetic)")
    t.add_argument("--out", default="runs/dabnet", help="output folder for checkpoints")
    t.add_argument("--crop", type=size_arg, help="training crop HxW (default: 512x1024 "
                   "Cityscapes, 360x480 CamVid, 128x256 synthetic)")
    t.add_argument("--scales", type=floats_arg, default=SCALES,
                   help="random scale factors (default 0.75,1.0,1.25,1.5,1.75,2.0)")
    t.add_argument("--batch-size", type=int, default=8, help="images per process (default 8)")
    t.add_argument("--epochs", type=int, default=1, help="epochs (default 1; paper: 1000)")
    t.add_argument("--max-steps", type=int, help="total iterations instead of --epochs")
    t.add_argument("--lr", type=float, default=4.5e-2, help="base LR (default 4.5e-2)")
    t.add_argument("--momentum", type=float, default=0.9)
    t.add_argument("--weight-decay", type=float, default=1e-4)
    t.add_argument("--power", type=float, default=0.9, help="poly LR power (default 0.9)")
    t.add_argument("--warmup-steps", type=int, default=0, help="linear LR warm-up iterations")
    t.add_argument("--ohem", action="store_true", help="online hard-example mining")
    t.add_argument("--ohem-thresh", type=float, default=0.7)
    t.add_argument("--ohem-min-kept", type=int, default=100_000)
    t.add_argument("--class-weights", type=floats_arg, help="comma-separated, one per class")
    t.add_argument("--amp", action="store_true", help="mixed precision (CUDA only)")
    t.add_argument("--fused", action="store_true", help="train the fused-kernel model")
    t.add_argument("--no-sync-bn", action="store_true",
                   help="under DDP, keep per-rank BN statistics (default: synchronised)")
    t.add_argument("--workers", type=int, default=2, help="DataLoader workers (default 2)")
    t.add_argument("--seed", type=int, default=0)
    t.add_argument("--resume", help="checkpoint to resume, or 'auto' (<out>/last.pt if any)")
    t.add_argument("--val-every", type=int, default=1, help="validate every N epochs (0: never)")
    t.add_argument("--val-split", default="val")
    t.add_argument("--eval-scale", type=float, default=1.0,
                   help="validation input scale (e.g. 0.5: Cityscapes at 512x1024)")
    t.add_argument("--mean", type=mean_arg,
                   help="R,G,B mean to subtract (0..255), or 'auto' to measure it on the "
                        "training split (default: Cityscapes and synthetic use their known "
                        "means, CamVid is measured); stored in the checkpoint")
    t.add_argument("--synthetic-length", type=int, help="synthetic training images (default 1000)")
    t.add_argument("--synthetic-size", type=size_arg, default=(128, 256))
    _common(t, checkpoint_required=None)

    e = sub.add_parser("eval", help="per-class IoU / mIoU on a split, optional FPS",
                       description="Evaluates a checkpoint: per-class IoU from the confusion "
                                   "matrix and mIoU over the classes present (a class absent "
                                   "from both ground truth and prediction is shown as 'absent' "
                                   "and left out of the mean). --fps also times the model: "
                                   "--fps-warmup untimed runs, synchronize, mean over "
                                   "--fps-iters runs, under torch.no_grad (the authors' "
                                   "eval_fps.py differs: see README, 'FPS').")
    e.add_argument("--dataset", choices=list(DATASETS), help="default: the checkpoint's")
    e.add_argument("--data-root")
    e.add_argument("--split", default="val")
    e.add_argument("--input-scale", type=float, default=1.0,
                   help="resize inputs by this factor (logits resized back)")
    e.add_argument("--fused", action="store_true", help="run the fused-kernel model")
    e.add_argument("--workers", type=int, default=2)
    e.add_argument("--synthetic-length", type=int, default=50)
    e.add_argument("--synthetic-size", type=size_arg, default=(128, 256))
    e.add_argument("--fps", action="store_true", help="also measure FPS")
    e.add_argument("--fps-size", type=size_arg, default=(512, 1024))
    e.add_argument("--fps-iters", type=int, default=100)
    e.add_argument("--fps-warmup", type=int, default=10)
    e.add_argument("--json", help="also write the results to this JSON file")
    _inference_opts(e)
    _common(e)

    p = sub.add_parser("predict", help="segment images, write colour masks and overlays",
                       description="Writes <name>_color.png (palette colours), <name>_overlay.png "
                                   "and with --label-ids <name>_labelIds.png (Cityscapes "
                                   "labelIds, the test server's format) for each input image.")
    p.add_argument("inputs", nargs="+", help="image files and/or folders (searched recursively)")
    p.add_argument("--out", default="predictions", help="output folder (default predictions/)")
    p.add_argument("--dataset", choices=list(DATASETS),
                   help="palette and mean (default: the checkpoint's)")
    p.add_argument("--label-ids", action="store_true", help="also write Cityscapes labelId PNGs")
    p.add_argument("--input-scale", type=float, default=1.0)
    p.add_argument("--alpha", type=float, default=0.5, help="overlay opacity (default 0.5)")
    p.add_argument("--fused", action=argparse.BooleanOptionalAction, default=None,
                   help="run the fused-kernel model (default: on CPU yes, elsewhere no)")
    p.add_argument("--frozen", action=argparse.BooleanOptionalAction, default=None,
                   help="run the fused model frozen for inference (dabnet.freeze: the same "
                        "outputs without the per-layer Python; CPU only; default: on CPU yes "
                        "unless --no-fused)")
    p.add_argument("--strict", action="store_true",
                   help="stop at the first image that cannot be read (default: skip it with a "
                        "message, segment the rest, and exit with status 1 at the end)")
    _inference_opts(p, " (default: on CPU yes, elsewhere no)")
    _common(p)

    x = sub.add_parser(
        "export", help="write the fused model as an AOTInductor package (.pt2) or ONNX",
        description="Exports the fused model (torch.export) to an AOTInductor package (.pt2: "
                    "runs from Python with torch._inductor.aoti_load_package after `import "
                    "dabnet_kernels`, or from C++, see deploy/) or to ONNX (standard ops only; "
                    "runs in onnxruntime), then checks the file's logits against the fused "
                    "model's on random images, with a tolerance relative to the largest logit. "
                    "The file takes RGB pixel values 0-255 (float32, N x 3 x H x W; the "
                    "checkpoint's mean is subtracted inside) and returns float32 logits. Batch, "
                    "H and W are dynamic (any H, W >= 8) unless --static. A .pt2 is built for "
                    "CUDA where a GPU and dabnet_kernels' CUDA kernels are both here (--device "
                    "auto), else for the CPU; ONNX is always exported on the CPU. Details: "
                    "docs/deploy.md.")
    x.add_argument("--out", "-o", default="dabnet.onnx",
                   help="output file; its suffix (.pt2 or .onnx) picks the format")
    x.add_argument("--format", choices=["onnx", "pt2"], help="the format, whatever the suffix")
    x.add_argument("--size", type=size_arg, default=(512, 1024),
                   help="example and check input HxW (default 512x1024)")
    x.add_argument("--static", action="store_true",
                   help="fix batch 1 and --size (default: dynamic batch, H and W)")
    x.add_argument("--precision", choices=["fp32", "bf16"], default="fp32",
                   help="the package's compute precision (default fp32; bf16 for .pt2 only)")
    x.add_argument("--channels-last", action=argparse.BooleanOptionalAction, default=None,
                   help="channels_last inside the package (default: on for CPU .pt2, where the "
                        "fused kernels are fastest with it)")
    x.add_argument("--classes", type=int,
                   help="the class count you expect; an error if the checkpoint has another")
    x.add_argument("--opset", type=int, default=18, help="ONNX opset (default 18)")
    x.add_argument("--no-check", action="store_true", help="skip the comparison with the model")
    _common(x)

    i = sub.add_parser("info", help="parameters, FLOPs, kernel backend",
                       description="Parameter count, convolution MACs/FLOPs at --size, and which "
                                   "dabnet_kernels backend runs on the device.")
    i.add_argument("--classes", type=int, default=19)
    i.add_argument("--size", type=size_arg, default=(512, 1024))
    i.add_argument("--fps", action="store_true", help="also time the model (eval, batch 1)")
    i.add_argument("--fps-iters", type=int, default=100)
    _common(i, checkpoint_required=False)
    return parser


def _device(name):
    from .train import resolve_device
    return resolve_device(name)


def cmd_train(a):
    from .train import TrainConfig, train

    cfg = TrainConfig(
        dataset=a.dataset, data_root=a.data_root, out_dir=a.out, crop=a.crop, scales=a.scales,
        batch_size=a.batch_size, epochs=a.epochs, max_steps=a.max_steps, lr=a.lr,
        momentum=a.momentum, weight_decay=a.weight_decay, power=a.power,
        warmup_steps=a.warmup_steps, ohem=a.ohem, ohem_thresh=a.ohem_thresh,
        ohem_min_kept=a.ohem_min_kept,
        class_weights=list(a.class_weights) if a.class_weights else None, amp=a.amp,
        fused=a.fused, sync_bn=not a.no_sync_bn, device=a.device, workers=a.workers,
        seed=a.seed, resume=a.resume, val_every=a.val_every, val_split=a.val_split,
        eval_scale=a.eval_scale, mean=a.mean,
        synthetic_length=a.synthetic_length, synthetic_size=a.synthetic_size,
        progress=not a.no_progress)
    r = train(cfg)
    if r["rank"] != 0:
        return 0
    best = f"{100 * r['best_miou']:.2f}" if r["best_miou"] >= 0 else "n/a"
    print(f"iterations {r['iteration']}/{r['total_steps']}, best val mIoU {best}, "
          f"checkpoint {r['last']}")
    return 0


def cmd_eval(a):
    from .checkpoint import load_model
    from .data import build_dataset
    from .evaluate import evaluate, for_inference
    from .metrics import measure_fps

    device = _device(a.device)
    model, meta = load_model(a.checkpoint, fused=a.fused, device=device)
    model = for_inference(model, a.precision, bool(a.channels_last))
    name = a.dataset or meta.get("dataset")
    if name is None:
        raise ValueError("the checkpoint does not say its dataset: pass --dataset")
    ds = build_dataset(name, a.data_root, a.split, mean=meta.get("mean"),
                       synthetic_length=a.synthetic_length, synthetic_size=a.synthetic_size)
    if model.classes != ds.info.num_classes:
        raise ValueError(f"checkpoint has {model.classes} classes, dataset {name!r} has "
                         f"{ds.info.num_classes}")
    cm = evaluate(model, ds, device, workers=a.workers, input_scale=a.input_scale,
                  progress=not a.no_progress)
    print(f"{name} {a.split}: {len(ds)} images")
    print(cm.report(list(ds.info.classes)))
    iou = cm.iou().tolist()
    res = {"dataset": name, "split": a.split, "images": len(ds), "miou": cm.miou(),
           "pixel_accuracy": cm.pixel_accuracy(),
           "iou": {c: (None if math.isnan(v) else v) for c, v in zip(ds.info.classes, iou)}}
    if a.fps:
        fps, ms = measure_fps(model, a.fps_size, 1, device, a.fps_warmup, a.fps_iters,
                              progress=not a.no_progress)
        print(f"speed at {a.fps_size[0]}x{a.fps_size[1]}, batch 1, {device}, {a.precision}"
              f"{', channels_last' if a.channels_last else ''}: {fps:.1f} FPS "
              f"({ms:.2f} ms/frame, mean of {a.fps_iters})")
        res.update(fps=fps, ms_per_frame=ms, fps_size=list(a.fps_size), device=str(device),
                   precision=a.precision, channels_last=bool(a.channels_last))
    if a.json:
        with open(a.json, "w") as f:
            json.dump(res, f, indent=1)
    return 0


def cmd_predict(a):
    from .predict import predict

    device = _device(a.device)
    # On CPU the fused channels_last model is the fastest fp32 path (bench/README.md); bf16 is
    # faster still on CPUs with AVX512_BF16 or AMX but changes a few labels, so it is asked for.
    cpu = device.type == "cpu"
    fused = cpu if a.fused is None else a.fused
    frozen = (cpu and fused) if a.frozen is None else a.frozen
    if frozen and not cpu:
        raise SystemExit(f"dabnet predict: --frozen runs on CPU only, not on {device}")
    channels_last = cpu if a.channels_last is None else a.channels_last
    what = "frozen fused (dabnet.freeze)" if frozen else ("fused" if fused else "plain")
    print(f"dabnet predict: {what} model, {a.precision}"
          f"{', channels_last' if channels_last else ''}, on {device}"
          + (" (the fastest fp32 path on CPU; --no-frozen / --no-fused / --no-channels-last to "
             "change it)" if cpu and a.fused is None and a.frozen is None
             and a.channels_last is None else ""))
    skipped = []
    files = predict(a.checkpoint, a.inputs, a.out, a.dataset, device, a.label_ids,
                    a.input_scale, fused, a.alpha, progress=not a.no_progress,
                    precision=a.precision, channels_last=channels_last, strict=a.strict,
                    skipped=skipped, frozen=frozen)
    print(f"wrote {len(files)} file(s) to {a.out}")
    if skipped:
        print(f"dabnet predict: {len(skipped)} image(s) could not be read and were skipped: "
              + ", ".join(str(f) for f, _ in skipped), file=sys.stderr)
        return 1
    return 0


def _cuda_package_possible() -> bool:
    import dabnet_kernels
    import torch

    return torch.cuda.is_available() and dabnet_kernels.has_cuda_kernels()


def cmd_export(a):
    from .export import export, export_format

    fmt = export_format(a.out, a.format)  # an unknown suffix fails before the checkpoint loads
    if fmt == "onnx" or (a.device == "auto" and not _cuda_package_possible()):
        device = "cpu"  # auto: a CUDA package where both a GPU and the CUDA kernels are here
    else:
        device = _device(a.device)
    log = (lambda m: None) if a.no_progress else (lambda m: print(m, flush=True))
    r = export(a.checkpoint, a.out, fmt, a.size, a.precision, a.channels_last,
               dynamic=not a.static, device=device, check=not a.no_check, classes=a.classes,
               opset=a.opset, log=log)
    msg = f"wrote {r['path']} ({fmt}, {r['precision']}, {r['classes']} classes)"
    if "max_rel_diff" in r:
        sizes = ", ".join(f"{h}x{w}" for h, w in r["checked_sizes"])
        msg += (f"; max diff from the fused model {r['max_rel_diff']:.2e} of the largest logit "
                f"at {sizes}")
    print(msg)
    return 0


def cmd_info(a):
    from .checkpoint import load_model
    from .info import model_info
    from .metrics import measure_fps
    from .model import DABNet

    device = _device(a.device)
    if a.checkpoint:
        model, _ = load_model(a.checkpoint)
    else:
        model = DABNet(a.classes)
    r = model_info(model, a.size, device)
    m = r["macs"]
    print(f"DABNet, {model.classes} classes")
    print(f"parameters: {r['parameters']:,}")
    print(f"conv MACs at {a.size[0]}x{a.size[1]}: {r['gmacs']:.2f} G ({r['gflops']:.2f} GFLOPs "
          f"at 2 FLOPs per MAC); dense 3x3 {m['dense'] / 1e9:.2f} G, 1x1 "
          f"{m['pointwise'] / 1e9:.2f} G, depthwise {m['depthwise'] / 1e9:.3f} G")
    print(f"dabnet_kernels backend on {device}: {r['backend']}")
    if r["backend"] == "cpu":
        import dabnet_kernels
        print(f"CPU kernels built for: {dabnet_kernels.cpu_isa()}")
    if a.fps:
        fps, ms = measure_fps(model, a.size, 1, device, 10, a.fps_iters,
                              progress=not a.no_progress)
        print(f"speed: {fps:.1f} FPS ({ms:.2f} ms/frame)")
    return 0


COMMANDS = {"train": cmd_train, "eval": cmd_eval, "predict": cmd_predict, "export": cmd_export,
            "info": cmd_info}


def main(argv=None) -> int:
    args = build_parser().parse_args(argv)
    if getattr(args, "default_malloc", True) is False:
        from dabnet_kernels.malloc import tune_malloc

        tune_malloc()
    try:
        return COMMANDS[args.command](args)
    except (ValueError, RuntimeError, FileNotFoundError, OSError) as e:
        if os.environ.get("DABNET_DEBUG"):
            raise
        print(f"dabnet {args.command}: error: {e}", file=sys.stderr)
        return 2
    except KeyboardInterrupt:
        print("interrupted", file=sys.stderr)
        return 130


if __name__ == "__main__":
    sys.exit(main())
