"""glibc malloc settings for CPU inference: keep freed activation memory in the process.

With glibc's defaults, the memory of a forward's activations goes back to the kernel between
forwards: glibc trims the top of its heap whenever more than its trim threshold is free there,
and maps blocks above its (adaptive) mmap threshold afresh on every allocation. The next forward
then page-faults that memory in again, zero-filled page by page: at 512x1024 float32 on a 2-core
VM, a fused DABNet forward faulted 3,600-16,300 pages and an eager one 26,000-35,000 (varying from
process to process with the heap's layout); with the settings below the fused forward took 151
instead of 157 ms and the eager one 227 instead of 288 ms (`python -m bench.malloc_ab`,
bench/results/2026-12-03-malloc-ab-cpu-amd-epyc-2c.json).

tune_malloc() serves every block from the heap (no mmap, so that large activations are reused
from it as the mid-size ones are) and raises the trim threshold to `retain_mib`. Fixing the mmap
threshold at glibc's 64-bit maximum (32 MiB), as it did first, still mapped each block of 32 MiB
or more afresh: at 1024x2048 in fp32, PyTorch's 32 and 64 MiB convolution outputs faulted 16-74
thousand pages per frozen forward, depending on the heap's state in that process (490-496 ms a
forward; 449-461 ms with no mmap, no faults, the same process type, 2026-12-07). It is what
jemalloc or tcmalloc would do for you (LD_PRELOAD): use either instead if you prefer. The `dabnet`
command line and the benchmarks call it; a library import never does (it changes the whole
process).
"""
from __future__ import annotations

import ctypes
import ctypes.util
import os

_M_TRIM_THRESHOLD = -1  # glibc's mallopt parameter numbers (malloc.h)
_M_MMAP_THRESHOLD = -3
_M_MMAP_MAX = -4
_MMAP_THRESHOLD_MAX = 32 << 20  # glibc refuses more on 64-bit

_state = {"tuned": None}


def is_glibc() -> bool:
    try:
        return os.confstr("CS_GNU_LIBC_VERSION").startswith("glibc")
    except (AttributeError, ValueError, OSError):  # no confstr, or not glibc
        return False


def _libc():
    if not is_glibc():
        return None
    try:
        return ctypes.CDLL(ctypes.util.find_library("c") or "libc.so.6")
    except OSError:  # pragma: no cover - a glibc system without a loadable libc
        return None


def tune_malloc(retain_mib: int = 1024) -> bool:
    """Makes glibc serve every allocation of this process from its heap (no mmap; the mmap
    threshold at its 32 MiB maximum, for the threads' arenas, which still map what their heaps
    cannot hold) and sets its trim threshold to `retain_mib` MiB. Returns True if all were set,
    False where the C library is not glibc (nothing is changed there). Freed memory up to
    `retain_mib` MiB at the heap's top then stays mapped in the process for the next forward;
    memory freed below the top stays too (reused by later allocations), so the process keeps
    about its peak footprint until it exits (jemalloc and tcmalloc give idle memory back over
    time; glibc with these settings does not)."""
    if isinstance(retain_mib, bool) or not isinstance(retain_mib, int) or not 0 <= retain_mib < 2048:
        raise ValueError(f"retain_mib must be an int in [0, 2048), got {retain_mib!r}")
    libc = _libc()
    if libc is None:
        return False
    ok = (libc.mallopt(_M_MMAP_THRESHOLD, _MMAP_THRESHOLD_MAX) == 1
          and libc.mallopt(_M_MMAP_MAX, 0) == 1
          and libc.mallopt(_M_TRIM_THRESHOLD, retain_mib << 20) == 1)
    _state["tuned"] = retain_mib if ok else None
    return ok


def malloc_tuned():
    """The retain_mib of the last successful tune_malloc() in this process, else None."""
    return _state["tuned"]
