"""Builds dabnet_kernels._C: the CPU kernels always, the CUDA kernels when PyTorch has CUDA and a
CUDA toolkit is found (DABNET_CUDA=0|1 forces either way)."""
import glob
import os
import shutil

from setuptools import find_packages, setup

ROOT = os.path.dirname(os.path.abspath(__file__))


def _cuda_home():
    """CUDA_HOME, else CUDA's standard install folder, else the toolkit around the nvcc on PATH.

    The nvcc on PATH may be a wrapper script outside its toolkit; PyTorch's own guess from it is then
    wrong, so a candidate counts only if it holds bin/nvcc and include/cuda.h.
    """
    def ok(d):
        return d and os.path.isfile(os.path.join(d, "bin", "nvcc")) and os.path.isfile(
            os.path.join(d, "include", "cuda_runtime.h"))

    for d in (os.environ.get("CUDA_HOME"), os.environ.get("CUDA_PATH"), "/usr/local/cuda"):
        if ok(d):
            return d
    nvcc = shutil.which("nvcc")
    if nvcc:
        d = os.path.dirname(os.path.dirname(os.path.realpath(nvcc)))
        if ok(d):
            return d
    return None


_home = _cuda_home()
if _home:
    # torch.utils.cpp_extension reads CUDA_HOME once, at import.
    os.environ["CUDA_HOME"] = _home
# With no GPU visible, cpp_extension would ask the GPU for its architecture and fail.
os.environ.setdefault("TORCH_CUDA_ARCH_LIST", "8.0;9.0")
os.environ.setdefault("MAX_JOBS", str(max(1, min(4, os.cpu_count() or 1))))

import torch  # noqa: E402
from torch.utils.cpp_extension import BuildExtension, CppExtension, CUDAExtension  # noqa: E402


def _want_cuda():
    flag = os.environ.get("DABNET_CUDA")
    if flag == "0":
        return False
    available = torch.version.cuda is not None and _home is not None
    if flag == "1":
        if not available:
            raise RuntimeError(
                "DABNET_CUDA=1 but " + ("this PyTorch has no CUDA" if torch.version.cuda is None
                                        else "no CUDA toolkit was found (set CUDA_HOME)"))
        return True
    return available


def _extension():
    sources = ["csrc/ops.cpp"] + sorted(glob.glob("csrc/cpu/*.cpp"))
    # -fopenmp-simd: honour `#pragma omp simd` (vectorized reductions) without the OpenMP runtime.
    # -fno-trapping-math: lets selects between float values vectorize (no result changes).
    cxx = ["-O3", "-fopenmp-simd", "-fno-trapping-math", "-Wall", "-Wno-unused-function"]
    if _want_cuda():
        sources += sorted(glob.glob("csrc/cuda/*.cu"))
        # --warn-on-spills: a register spill in any kernel is a build warning.
        nvcc = ["-O3", "-lineinfo", "--expt-relaxed-constexpr", "-Xcompiler=-Wall",
                "-Xptxas=--warn-on-spills"]
        if os.environ.get("DABNET_PTXAS_VERBOSE") == "1":
            nvcc.append("-Xptxas=-v")
        return CUDAExtension("dabnet_kernels._C", sources,
                             extra_compile_args={"cxx": cxx + ["-DDABNET_WITH_CUDA"], "nvcc": nvcc})
    return CppExtension("dabnet_kernels._C", sources, extra_compile_args={"cxx": cxx})


setup(
    name="dabnet-kernels",
    packages=find_packages(include=["dabnet_kernels", "dabnet_kernels.*", "dabnet", "dabnet.*"]),
    ext_modules=[_extension()],
    cmdclass={"build_ext": BuildExtension.with_options(use_ninja=True)},
)
