"""The short table: each op against its reference on this machine's device (max abs error vs the
reference, time, speedup), at a few of DABNet's real shapes. Under a minute; writes nothing.

    python -m bench.quick [--device cpu|cuda]

(`python -m bench.run --quick` prints the same table and also saves a results file.)
"""
from __future__ import annotations

import argparse
import sys

import torch

from . import machine


def main(argv=None):
    p = argparse.ArgumentParser(prog="python -m bench.quick", description=__doc__,
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--device", choices=("cpu", "cuda"), default=None,
                   help="default: cuda if a GPU is visible, else cpu")
    p.add_argument("--budget-scale", type=float, default=1.0,
                   help="multiply the timing windows by this")
    p.add_argument("--default-malloc", action="store_true", help=machine.MALLOC_HELP)
    args = p.parse_args(argv)
    device = args.device or ("cuda" if torch.cuda.is_available() else "cpu")
    if device == "cuda" and not torch.cuda.is_available():
        raise SystemExit("--device cuda: no CUDA GPU is visible to PyTorch")

    from . import cases, ops_bench, report
    from .timing import Budget

    machine.apply_malloc(args.default_malloc)
    budget = Budget().scaled(0.5 * args.budget_scale)
    m = machine.info(device)
    recs = ops_bench.run_cases(cases.quick_cases(device), device, budget, "none",
                               m["last_level_cache_bytes"], None)
    dev = (m["gpu_model"] if device == "cuda"
           else f"{m['cpu_model']} ({m['cpu_usable_cores']} cores)")
    print(f"\ndabnet ops vs reference (F.conv2d groups=C / F.batch_norm / F.prelu) on {dev}, "
          f"torch {m['torch']}, CPU kernels: {m['dabnet_cpu_isa']}:\n")
    print(report.quick_table({"ops": recs}))
    return 0


if __name__ == "__main__":
    sys.exit(main())
