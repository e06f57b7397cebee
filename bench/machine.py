"""What the benchmarks ran on: CPU, GPU, library versions, and a short slug for file names."""
from __future__ import annotations

import os
import platform
import re
import subprocess
import sys

import torch


def cpu_model() -> str:
    """The CPU's model name from lscpu, else /proc/cpuinfo, else platform.processor()."""
    try:
        out = subprocess.run(["lscpu"], capture_output=True, text=True, timeout=10).stdout
        m = re.search(r"^Model name:\s*(.+)$", out, re.M)
        if m:
            return m.group(1).strip()
    except (OSError, subprocess.SubprocessError):
        pass
    try:
        with open("/proc/cpuinfo") as f:
            m = re.search(r"^model name\s*:\s*(.+)$", f.read(), re.M)
        if m:
            return m.group(1).strip()
    except OSError:
        pass
    return platform.processor() or "unknown CPU"


def last_level_cache_bytes() -> int:
    """Size of CPU 0's largest cache (from sysfs); 32 MiB when it cannot be read."""
    best = 0
    base = "/sys/devices/system/cpu/cpu0/cache"
    try:
        for d in os.listdir(base):
            try:
                with open(os.path.join(base, d, "size")) as f:
                    s = f.read().strip()
            except OSError:
                continue
            mult = {"K": 1 << 10, "M": 1 << 20, "G": 1 << 30}.get(s[-1:], 1)
            best = max(best, int(s.rstrip("KMG")) * mult)
    except (OSError, ValueError):
        pass
    return best or (32 << 20)


# CPU features that change how fast the baselines (oneDNN, ATen's vectorized kernels) and our
# kernels can run: two machines with the same model name can differ in these (e.g. AVX-512).
VECTOR_FLAGS = ("avx2", "fma", "avx512f", "avx512_vnni", "avx512_bf16", "amx_tile", "amx_bf16")


def cpu_vector_flags() -> list:
    """Which of VECTOR_FLAGS /proc/cpuinfo lists (empty where it cannot be read)."""
    try:
        with open("/proc/cpuinfo") as f:
            m = re.search(r"^flags\s*:\s*(.+)$", f.read(), re.M)
    except OSError:
        return []
    have = set(m.group(1).split()) if m else set()
    return [f for f in VECTOR_FLAGS if f in have]


def git_commit(root: str | None = None) -> str | None:
    """HEAD's short hash of the repository at root (default: this checkout), with "-dirty" when
    tracked files differ from it: the results then come from code that no commit holds."""
    try:
        root = root or os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
        git = lambda *a: subprocess.run(["git", "-C", root, *a], capture_output=True,  # noqa: E731
                                        text=True, timeout=10).stdout.strip()
        head = git("rev-parse", "--short", "HEAD")
        if head and git("status", "--porcelain", "--untracked-files=no"):
            head += "-dirty"
        return head or None
    except (OSError, subprocess.SubprocessError):
        return None


def slug(text: str) -> str:
    s = re.sub(r"\(r\)|\(tm\)|cpu @.*$|processor", "", text.lower())
    s = re.sub(r"[^a-z0-9]+", "-", s).strip("-")
    return s[:40].strip("-") or "unknown"


MALLOC_HELP = ("keep the C library's malloc settings; by default the benchmarks run, as the "
               "dabnet command line does, with dabnet_kernels.tune_malloc() (glibc: freed memory "
               "stays mapped between calls), for every variant alike")


def apply_malloc(default: bool) -> None:
    """tune_malloc() unless `default` (the --default-malloc of bench.run and bench.quick)."""
    if not default:
        from dabnet_kernels.malloc import tune_malloc

        tune_malloc()


def malloc_setting() -> str:
    from dabnet_kernels.malloc import malloc_tuned

    retain = malloc_tuned()
    if retain is None:
        return "C library defaults"
    return f"glibc tuned: mmap threshold 32 MiB, trim threshold {retain} MiB"


def memory_reclaim() -> list:
    """The kernel's proactive reclaim schemes (DAMON, /sys/kernel/mm/damon), e.g. ["pageout of
    memory idle >= 12 intervals"]: on a VM that runs one, activation buffers that the scheme
    judges cold are paged out between forwards and fault back in (seen here: ~1,600-1,800 page
    faults per 512x1024 forward, landing on different buffers from process to process)."""
    root = "/sys/kernel/mm/damon/admin/kdamonds"
    out = []
    try:
        for k in sorted(os.listdir(root)):
            if not k.isdigit() or open(f"{root}/{k}/state").read().strip() != "on":
                continue
            for ctx in sorted(os.listdir(f"{root}/{k}/contexts")):
                base = f"{root}/{k}/contexts/{ctx}/schemes"
                for sc in sorted(x for x in os.listdir(base) if x.isdigit()):
                    action = open(f"{base}/{sc}/action").read().strip()
                    age = open(f"{base}/{sc}/access_pattern/age/min").read().strip()
                    out.append(f"{action} of memory idle >= {age} intervals")
    except OSError:
        pass
    return out


def info(device: str) -> dict:
    """Everything about this machine that a reader needs to judge the numbers."""
    try:
        import triton
        triton_version = triton.__version__
    except Exception:  # triton is optional
        triton_version = None
    try:
        import dabnet_kernels
        has_cuda_kernels = dabnet_kernels.has_cuda_kernels()
        cpu_isa = dabnet_kernels.cpu_isa()
    except Exception:
        has_cuda_kernels = cpu_isa = None
    d = {
        "device": device,
        "cpu_model": cpu_model(),
        "cpu_logical_cores": os.cpu_count(),
        "cpu_usable_cores": len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity")
        else os.cpu_count(),
        "torch_threads": torch.get_num_threads(),
        "last_level_cache_bytes": last_level_cache_bytes(),
        "cpu_vector_flags": cpu_vector_flags(),
        # The vector ISA ATen's own CPU kernels dispatch to (the baselines' pointwise ops).
        "aten_cpu_capability": torch.backends.cpu.get_cpu_capability(),
        "python": sys.version.split()[0],
        "platform": platform.platform(),
        "torch": torch.__version__,
        "torch_cuda": torch.version.cuda,
        "cudnn": torch.backends.cudnn.version() if torch.backends.cudnn.is_available() else None,
        "triton": triton_version,
        "dabnet_cuda_kernels_built": has_cuda_kernels,
        "dabnet_cpu_isa": cpu_isa,
        "malloc": malloc_setting(),
        "memory_reclaim": memory_reclaim(),
        "git_commit": git_commit(),
        "gpu_model": None,
    }
    if device == "cuda":
        p = torch.cuda.get_device_properties(0)
        d.update(gpu_model=p.name, gpu_count=torch.cuda.device_count(),
                 gpu_memory_bytes=p.total_memory, gpu_sm_count=p.multi_processor_count,
                 gpu_capability=f"{p.major}.{p.minor}",
                 gpu_l2_bytes=getattr(p, "L2_cache_size", None))
    d["slug"] = slug(d["gpu_model"] if device == "cuda" else d["cpu_model"])
    if device == "cpu":
        d["slug"] = f"cpu-{d['slug']}-{d['cpu_usable_cores']}c"
    return d
