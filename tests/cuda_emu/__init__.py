"""The CUDA kernels of csrc/cuda run on the CPU (docs/cuda-emulation.md)."""


def ops_or_fail():
    """torch.ops.dabnet_cuemu, or the running test fails saying why the emulation is missing."""
    import pytest

    from . import build

    try:
        return build.load()
    except Exception as e:  # no compiler, a build error
        pytest.fail(f"the CUDA emulation could not be built or loaded: {e}")
