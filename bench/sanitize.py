"""A small run of every op on CUDA for compute-sanitizer (memcheck, racecheck, initcheck,
synccheck): each GPU backend, inference forward and training forward+backward, NCHW and
channels_last, fp32 and fp16, at odd sizes and dilations up to larger than the image (taps fully
outside), and the neck's global-memory path (dilation 17 > 16 on an 18x26 input). Results are
checked against the reference; exits 1 on a mismatch.

    compute-sanitizer --tool memcheck python -m bench.sanitize [--dtypes fp16] [--layouts cl]
"""
from __future__ import annotations

import itertools
import sys

import torch

from . import cases as C
from .ops_bench import _max_abs_err, _outputs, backends_for
from dabnet_kernels import ops, reference
from dabnet_kernels.backend import use_backend

TOL = {"fp32": 1e-4, "fp16": 2e-2}


def main(argv=None):
    import argparse

    p = argparse.ArgumentParser(prog="python -m bench.sanitize", description=__doc__,
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--device", choices=("cuda", "cpu"), default="cuda",
                   help="cuda (what the sanitizer is for) or cpu (a check of this script)")
    p.add_argument("--quick", action="store_true", help="fp32 only (fewer launches)")
    p.add_argument("--dtypes", default="fp32,fp16", help="comma-separated: fp32, fp16")
    p.add_argument("--layouts", default=",".join(C.LAYOUTS),
                   help=f"comma-separated: {', '.join(C.LAYOUTS)}")
    args = p.parse_args(argv)
    dev = args.device
    if dev == "cuda" and not torch.cuda.is_available():
        raise SystemExit("bench.sanitize --device cuda needs a CUDA GPU")
    bad = 0
    backends = backends_for(dev)
    print(f"backends: {backends}")
    dtypes = args.dtypes.split(",") if dev == "cuda" and not args.quick else ["fp32"]
    for op, mode, dtype, layout, (block, dil) in itertools.product(
            C.OPS, C.MODES, dtypes, args.layouts.split(","), ((1, 2), (2, 16), (1, 17))):
        # 72x104 input -> block-1 neck 18x26, block-2 neck 9x13 (odd; dilation 16 > 9 and 13);
        # dilation 17 at 18x26: the neck's global-memory path (its tile holds dilations <= 16).
        if dil > 16 and op != "dab_neck":
            continue
        conv = op in ("dwconv3", "dwconv3_bn_prelu")
        orient = ("3x1" if block == 1 else "1x3") if conv else "-"
        case = C.OpCase(op, mode, (72, 104), block, 2, 0 if op == "bn_prelu" else dil, orient,
                        dtype, layout)
        t = C.prepare(case, C.make_inputs(case, dev))
        want = _outputs(case, lambda tt: C.forward(reference, case, tt), t)
        for b in backends:
            with use_backend(b):
                got = _outputs(case, lambda tt: C.forward(ops, case, tt), t)
            if dev == "cuda":
                torch.cuda.synchronize()
            err = _max_abs_err(got, want)
            scale = max(1.0, max(w.abs().max().item() for w in want if w is not None))
            ok = err is not None and err <= TOL[dtype] * scale
            bad += not ok
            print(f"{'ok ' if ok else 'BAD'} {b:7s} {op} {mode} {case.label()}: "
                  f"max abs err {err if err is None else f'{err:.2e}'}")
    print(f"{bad} mismatches")
    return 1 if bad else 0


if __name__ == "__main__":
    sys.exit(main())
