"""Builds and loads the CUDA emulation: csrc/cuda translated (translate.py) and compiled with g++
against cuemu.h into build/cuda_emu/<variant>-<hash>/libdabnet_cuemu.so, whose ops are
torch.ops.dabnet_cuemu.<op> on CPU tensors. A build is reused while its inputs (the sources, this
folder, the compiler flags, the torch version) hash the same.

    python tests/cuda_emu/build.py [--asan] [--src DIR]   # builds, prints the library's path

$CUEMU_LIB names a library to load instead of building one (the mutants and the ASan run use it).
"""
from __future__ import annotations

import argparse
import concurrent.futures
import hashlib
import os
import shutil
import subprocess
import sys
from pathlib import Path

HERE = Path(__file__).resolve().parent
ROOT = HERE.parents[1]
NAMESPACE = "dabnet_cuemu"
FLAGS = {
    "plain": ["-O2"],
    # -O1 keeps ASan's reports readable; shared memory canaries are ASan-poisoned (runtime.cpp).
    "asan": ["-O1", "-g", "-fsanitize=address", "-fno-omit-frame-pointer"],
}
_loaded: dict = {}


def _torch_flags():
    import torch
    from torch.utils import cpp_extension

    inc = [f"-I{p}" for p in cpp_extension.include_paths()]
    abi = f"-D_GLIBCXX_USE_CXX11_ABI={int(torch._C._GLIBCXX_USE_CXX11_ABI)}"
    lib = Path(torch.__file__).parent / "lib"
    return torch.__version__, inc + [abi], [f"-L{lib}", f"-Wl,-rpath,{lib}", "-lc10", "-ltorch_cpu"]


def _digest(src: Path, variant: str, extra: str) -> str:
    h = hashlib.sha256(f"{variant} {FLAGS[variant]} {extra}".encode())
    own = [HERE / f for f in ("cuemu.h", "runtime.cpp", "translate.py", "build.py", "selftest.cu")]
    files = sorted(src.glob("*.h")) + sorted((src / "cuda").iterdir()) + own + sorted(
        (HERE / "shim").rglob("*.h"))
    for f in files:
        h.update(f.name.encode() + b"\0" + f.read_bytes())
    return h.hexdigest()[:16]


def build(variant: str = "plain", src: Path = ROOT / "csrc",
          out_root: Path = ROOT / "build" / "cuda_emu", jobs: int | None = None) -> Path:
    """Path of the emulation library for csrc-like folder `src`, built unless it exists."""
    sys.path.insert(0, str(HERE))
    from translate import translate, translate_dir

    version, cflags, ldflags = _torch_flags()
    cxx = os.environ.get("CXX", "g++")
    out = out_root / f"{variant}-{_digest(src, variant, version + cxx)}"
    lib = out / "libdabnet_cuemu.so"
    if lib.exists():
        return lib
    tmp = out.with_name(out.name + f".tmp{os.getpid()}")
    shutil.rmtree(tmp, ignore_errors=True)
    units = translate_dir(src / "cuda", tmp / "csrc" / "cuda")
    units.append(tmp / "selftest.cu")  # kernels that test the emulation (tests/test_cuda_emu.py)
    units[-1].write_text(translate((HERE / "selftest.cu").read_text(), str(HERE / "selftest.cu")))
    # One translation unit for all kernel files: the torch headers are parsed once, not per file.
    unity = tmp / "csrc" / "cuda" / "kernels_unity.cpp"
    unity.write_text("".join(f'#include "{u}"\n' for u in units))
    common = [cxx, "-std=c++20", "-fPIC", *FLAGS[variant], "-Wall", "-Wno-unknown-pragmas",
              "-Wno-unused-function", "-include", str(HERE / "cuemu.h"),
              "-I", str(HERE / "shim"), "-iquote", str(src / "cuda"), *cflags]

    def compile_one(unit: Path) -> Path:
        obj = tmp / (unit.name + ".o")
        r = subprocess.run([*common, "-c", str(unit), "-o", str(obj)], capture_output=True,
                           text=True)
        if r.returncode != 0:
            raise RuntimeError(f"cuemu: compiling {unit.name} failed:\n{r.stderr[-6000:]}")
        return obj

    jobs = jobs or int(os.environ.get("MAX_JOBS", "1"))
    with concurrent.futures.ThreadPoolExecutor(max(1, jobs)) as pool:
        objs = list(pool.map(compile_one, [HERE / "runtime.cpp", unity]))
    r = subprocess.run([cxx, "-shared", *FLAGS[variant], *map(str, objs), "-o",
                        str(tmp / lib.name), *ldflags], capture_output=True, text=True)
    if r.returncode != 0:
        raise RuntimeError(f"cuemu: linking failed:\n{r.stderr[-6000:]}")
    shutil.rmtree(out, ignore_errors=True)
    tmp.rename(out)  # complete builds only: a concurrent or interrupted build never shows up
    return lib


def load(path: str | os.PathLike | None = None):
    """torch.ops.dabnet_cuemu with the emulated ops (schemas, fake kernels and autograd of
    dabnet_kernels.ops), loading $CUEMU_LIB or `path` or a fresh build once per process."""
    if "ops" in _loaded:
        return _loaded["ops"]
    if "error" in _loaded:  # one failed build is reported by every test, not retried by each
        raise RuntimeError(_loaded["error"])
    import torch

    from dabnet_kernels import ops

    try:
        path = path or os.environ.get("CUEMU_LIB") or build()
    except Exception as e:
        _loaded["error"] = str(e)
        raise
    defs = torch.library.Library(NAMESPACE, "FRAGMENT")
    for name in ops.OP_NAMES:
        defs.define(ops.schema(name))
    torch.ops.load_library(str(path))
    ops.register(NAMESPACE)
    _loaded.update(ops=getattr(torch.ops, NAMESPACE), defs=defs, path=str(path))
    return _loaded["ops"]


if __name__ == "__main__":
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--asan", action="store_true", help="AddressSanitizer build")
    p.add_argument("--src", type=Path, default=ROOT / "csrc", help="csrc-like folder")
    p.add_argument("--out", type=Path, default=ROOT / "build" / "cuda_emu")
    a = p.parse_args()
    print(build("asan" if a.asan else "plain", a.src, a.out))
