"""dabnet_kernels.tune_malloc: glibc's mmap and trim thresholds for this process."""
import pytest

import dabnet_kernels
from dabnet_kernels import malloc

GLIBC = malloc.is_glibc()


@pytest.mark.skipif(not GLIBC, reason="glibc only")
def test_tunes_glibc_and_remembers_the_setting():
    assert dabnet_kernels.tune_malloc(512) is True
    assert malloc.malloc_tuned() == 512
    assert dabnet_kernels.tune_malloc() is True
    assert malloc.malloc_tuned() == 1024


def test_without_glibc_nothing_changes(monkeypatch):
    monkeypatch.setattr(malloc, "_libc", lambda: None)
    before = malloc.malloc_tuned()
    assert dabnet_kernels.tune_malloc() is False
    assert malloc.malloc_tuned() == before


@pytest.mark.parametrize("bad", [-1, 2048, 1.5, True, "64"])
def test_bad_retain_is_an_error(bad):
    with pytest.raises(ValueError, match="retain_mib"):
        dabnet_kernels.tune_malloc(bad)


def test_glibc_detection_agrees_with_platform():
    import platform

    assert malloc.is_glibc() == (platform.libc_ver()[0] == "glibc")


@pytest.mark.skipif(not GLIBC, reason="glibc only")
def test_large_blocks_are_reused_without_page_faults():
    """After tune_malloc a freed 64 MiB tensor's memory serves the next one: no fresh mapping to
    fault in page by page (glibc maps blocks of 32 MiB or more afresh by default: 16 thousand
    faults for this one)."""
    import resource

    import torch

    dabnet_kernels.tune_malloc()
    n = 16 << 20  # 64 MiB of float32
    faults = []
    for _ in range(20):  # made, touched, freed; until the heap settles a block may land higher up
        before = resource.getrusage(resource.RUSAGE_SELF).ru_minflt
        y = torch.ones(n)
        faults.append(resource.getrusage(resource.RUSAGE_SELF).ru_minflt - before)
        assert float(y[-1]) == 1.0
        del y
    assert min(faults) < 1000, faults
