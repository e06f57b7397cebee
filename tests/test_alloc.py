"""Large CPU outputs of the kernels are backed by 2 MiB huge pages (csrc/cpu/alloc.cpp): they
must still be ordinary tensors (right values, resizable, picklable, shareable); freed ones are kept
for the next output of their size, as many of each size as were ever live at once."""
import io
import os
import re
import subprocess
import sys

import pytest
import torch
import torch.nn.functional as F

import dabnet_kernels
from dabnet_kernels import ops

BIG = (1, 19, 512, 1024)  # DABNet's upsampled logits: 38 MiB, above the 32 MiB threshold


def _big_output(layout="nchw"):
    x = torch.randn(1, 19, 64, 128)
    if layout == "cl":
        x = x.contiguous(memory_format=torch.channels_last)
    return x, ops.upsample_bilinear(x, BIG[2:])


@pytest.mark.parametrize("layout", ["nchw", "cl"])
def test_large_output_values_and_format(layout):
    x, out = _big_output(layout)
    ref = F.interpolate(x, size=BIG[2:], mode="bilinear", align_corners=False)
    assert out.shape == BIG and out.stride() == ref.stride()
    torch.testing.assert_close(out, ref, rtol=1e-5, atol=1e-5)


def test_large_output_is_an_ordinary_tensor():
    _, out = _big_output()
    keep = out.clone()
    out.resize_(2, *BIG[1:])  # the storage grows through the same allocator
    assert torch.equal(out[0], keep[0])
    out[1] = 3.0
    assert (out[1] == 3.0).all()
    buf = io.BytesIO()
    torch.save(out, buf)
    buf.seek(0)
    assert torch.equal(torch.load(buf), out)
    assert torch.equal(out.share_memory_(), out.clone()) and out.is_shared()


def _thp_mode():
    try:
        text = open("/sys/kernel/mm/transparent_hugepage/enabled").read()
    except OSError:
        return None
    m = re.search(r"\[(\w+)\]", text)
    return m.group(1) if m else None


def _anon_huge_kb(ptr):
    """AnonHugePages of the mapping of this process holding address ptr (from smaps)."""
    lines = open("/proc/self/smaps").read().splitlines()
    inside = False
    for line in lines:
        m = re.match(r"([0-9a-f]+)-([0-9a-f]+) ", line)
        if m:
            inside = int(m.group(1), 16) <= ptr < int(m.group(2), 16)
        elif inside and line.startswith("AnonHugePages:"):
            return int(line.split()[1])
    return 0


@pytest.mark.skipif(_thp_mode() not in ("always", "madvise"),
                    reason="transparent huge pages are off (or not Linux)")
def test_large_output_sits_in_huge_pages():
    _, out = _big_output()
    assert _anon_huge_kb(out.data_ptr()) > 0


def test_switch_off_gives_the_same_values():
    """DABNET_CPU_HUGE_PAGES=0 falls back to at::empty: same numbers, bit for bit."""
    code = ("import torch, dabnet_kernels.ops as o; torch.manual_seed(0); "
            "x = torch.randn(1, 19, 64, 128); y = o.upsample_bilinear(x, (512, 1024)); "
            "print(float(y.double().sum()), float(y.abs().max()))")
    env = dict(os.environ)
    outs = []
    for flag in ("1", "0"):
        env["DABNET_CPU_HUGE_PAGES"] = flag
        outs.append(subprocess.run([sys.executable, "-c", code], env=env, capture_output=True,
                                   text=True, check=True).stdout.split())
    assert outs[0] == outs[1] and len(outs[0]) == 2


def test_freed_block_is_reused_with_fresh_values():
    dabnet_kernels.empty_cpu_cache()
    _, a = _big_output()
    ptr = a.data_ptr()
    del a
    x, b = _big_output()  # the same size: the kept block, every value written anew
    assert b.data_ptr() == ptr
    ref = F.interpolate(x, size=BIG[2:], mode="bilinear", align_corners=False)
    torch.testing.assert_close(b, ref, rtol=1e-5, atol=1e-5)


def _output(classes):
    """An upsampled output of `classes` x 2 MiB (float32, 512x1024)."""
    return ops.upsample_bilinear(torch.randn(1, classes, 64, 128), BIG[2:])


MIB = 1 << 20


def test_empty_cpu_cache_frees_what_is_kept_and_the_cache_is_bounded():
    """Freed blocks are kept as many of each size as were ever live at once (at least 256 MiB,
    at most four times the most ever live): what a forward cycles through stays mapped."""
    dabnet_kernels.empty_cpu_cache()
    nbytes = 19 * 512 * 1024 * 4  # a multiple of 2 MiB: kept as is
    outs = [_big_output()[1] for _ in range(8)]  # 304 MiB live at once
    assert dabnet_kernels.empty_cpu_cache() == 0  # all in use: nothing to free
    del outs
    assert dabnet_kernels.empty_cpu_cache() == 8 * nbytes  # all kept: 8 were live at once
    assert dabnet_kernels.empty_cpu_cache() == 0
    # After empty_cpu_cache the counts start again: 8 outputs made and dropped one at a time are
    # one block, reused; 8 live at once, then dropped, keep 304 MiB again; 10 outputs of 38 MiB
    # made one by one while the 8 are kept add none (each is a kept block).
    for _ in range(8):
        _big_output()
    assert dabnet_kernels.empty_cpu_cache() == nbytes
    outs = [_big_output()[1] for _ in range(8)]
    del outs
    for _ in range(10):
        _big_output()
    assert dabnet_kernels.empty_cpu_cache() == 8 * nbytes
    # Blocks of another size are kept beside them: 8 of 38 MiB, then 3 of 40 MiB live at once.
    outs = [_big_output()[1] for _ in range(8)]
    del outs
    other = [_output(20) for _ in range(3)]
    del other
    assert dabnet_kernels.empty_cpu_cache() == 8 * nbytes + 3 * 40 * MIB
    # A stream of ever new sizes, one live at a time (38 MiB at most): kept up to 256 MiB, the
    # oldest going first. 38 + 40 + ... + 48 MiB is 258 MiB: the 38 MiB block goes.
    for classes in range(19, 25):
        _output(classes)
    assert dabnet_kernels.empty_cpu_cache() == sum(range(40, 50, 2)) * MIB


def test_a_repeated_forward_takes_every_block_from_the_cache():
    """A forward whose blocks of one size are freed before its last, larger output is made (as
    DABNet's 160 MB logits at 1024x2048) needs more kept than it ever has live at once: all of
    it is kept, and the logits' block is not the one dropped (a cap of the most ever live
    dropped it every forward, 78 huge pages faulted in afresh)."""
    dabnet_kernels.empty_cpu_cache()

    def forward():
        acts = [_output(20) for _ in range(7)]  # 280 MiB live at once, the peak
        ptrs = {a.data_ptr() for a in acts}
        del acts
        logits = _output(19)  # 38 MiB, made after those are freed
        return ptrs | {logits.data_ptr()}

    first = forward()
    assert forward() == first and forward() == first
    assert dabnet_kernels.empty_cpu_cache() == (7 * 40 + 38) * MIB


@pytest.mark.skipif(not hasattr(os, "fork"), reason="needs fork")
def test_cache_works_in_a_forked_child():
    """A forked child (a DataLoader worker) inherits the kept blocks and can use and free them."""
    code = """
import os, torch, dabnet_kernels
from dabnet_kernels import ops
x = torch.randn(1, 19, 64, 128)
y = ops.upsample_bilinear(x, (512, 1024)); ptr = y.data_ptr(); del y
pid = os.fork()
if pid == 0:
    torch.set_num_threads(1)  # as DataLoader workers do: OpenMP does not survive a fork
    z = ops.upsample_bilinear(x, (512, 1024))
    ok = z.data_ptr() == ptr and torch.allclose(z, torch.nn.functional.interpolate(
        x, size=(512, 1024), mode="bilinear", align_corners=False), rtol=1e-5, atol=1e-5)
    del z
    os._exit(0 if ok and dabnet_kernels.empty_cpu_cache() > 0 else 3)
_, status = os.waitpid(pid, 0)
print(os.waitstatus_to_exitcode(status))
"""
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=120)
    assert out.returncode == 0, out.stderr[-2000:]
    assert out.stdout.split()[-1] == "0"
