"""Loads the compiled extension (dabnet_kernels._C), whose static initializers register the
dabnet:: schemas and the CPU/CUDA kernels with PyTorch's dispatcher."""
import torch  # noqa: F401  (the extension links against libtorch: load it first)

try:
    from . import _C  # noqa: F401
except ImportError as e:  # pragma: no cover - depends on the installation
    raise ImportError(
        "dabnet_kernels._C is not built or does not match this PyTorch "
        f"({torch.__version__}): {e}. Build it with `pip install --no-build-isolation -e .` "
        "(see docs/building.md)."
    ) from e

_ext_path = _C.__file__


def cpu_isa() -> str:
    """The build of the C++ CPU kernels this process runs: "avx2" (AVX2+FMA), "avx2+avx512bf16"
    (the same, storing bf16 outputs with AVX512_BF16's vcvtneps2bf16, bit for bit the same
    rounding) or "base" (picked when the library loads; DABNET_CPU_ISA=base in the environment
    forces the baseline, DABNET_CPU_BF16=0 the AVX2 stores)."""
    return torch.ops.dabnet.cpu_isa()


def has_cuda_kernels() -> bool:
    """Whether the built extension holds the CUDA kernels (true even with no GPU visible)."""
    return torch._C._dispatch_has_kernel_for_dispatch_key("dabnet::dwconv3", "CUDA")


def empty_cpu_cache() -> int:
    """Frees the large CPU output blocks (32 MiB or more, at most 256 MiB in all) that the C++
    kernels keep for their next outputs of the same size; returns how many bytes it freed.
    As torch.cuda.empty_cache(): for other processes' sake; the next large output allocates and
    faults its pages in again."""
    return torch.ops.dabnet.empty_cpu_cache()
