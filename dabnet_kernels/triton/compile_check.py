"""Compiles every dabnet Triton kernel for a GPU with the real Triton compiler, no GPU needed.

The interpreter (TRITON_INTERPRET=1, how CI runs the kernels) executes Python and never type-checks
a kernel the way the compiler does (loop-carried types, constexpr misuse, dtype mixes). This runs
triton.compile down to a cubin for each kernel in each layout and dtype, with the tile sizes the
launchers would pick. Must run without TRITON_INTERPRET (it starts its own subprocess otherwise).

    python -m dabnet_kernels.triton.compile_check [--arch 90] [--dtypes fp32,fp16,bf16,fp64]
"""
from __future__ import annotations

import argparse
import os
import subprocess
import sys
import time


def _kernels(cm, bn, dw, dn, tl, dt, cl):
    """(kernel, argument types, constexprs, num_warps, compile options, timed) for one dtype and
    layout. timed: an autotune config after the first, which runs only where the autotuner timed
    it against the others."""
    import torch

    P = "*" + dt
    dtype = {"fp32": torch.float32, "fp16": torch.float16, "bf16": torch.bfloat16,
             "fp64": torch.float64}[dt]
    A = "*fp64" if dt == "fp64" else "*fp32"
    acc = tl.float64 if dt == "fp64" else tl.float32
    i = "i32"

    def tiles(configs):  # every config of an autotuned kernel: (constexprs, warps, options, timed)
        out = []
        for k, cfg in enumerate(configs):
            blk = cfg.kwargs["BLOCK"]
            bc, bp, bw = cm._tile(dict(C=32, H=64, W=128, CL=cl, BLOCK=blk))
            out.append((dict(CL=cl, ACC=acc, BLOCK=blk, BC=bc, BP=bp, BW=bw), cfg.num_warps,
                        config_options(cfg), k > 0))
        return out

    x = torch.empty(8, 32, 64, 128, device="meta")
    if cl:
        x = x.contiguous(memory_format=torch.channels_last)
    rbc, rbp, _, _ = cm.reduce_split(x, cl)
    red = dict(CL=cl, ACC=acc, BC=rbc, BP=rbp, ALIGNED=True)
    esize = {"fp64": 8, "fp32": 4}.get(dt, 2)
    gbc, gbp, _, _ = cm.reduce_split(x, cl, dw.grads_tile(esize))  # the tile dwconv3.grads runs
    dims = dict(C=i, H=i, W=i)
    tdims = dict(N=i, **dims)  # the tile kernels also take N (an autotune key)
    tap = dict(x_ptr=P, prm_ptr=A, out_ptr=P, **tdims)
    return [
        *[(cm.tap3_kernel, tap, dict(d=2, AXIS=0, TAPS=3, ACT=True, BN=True, **t), w, o, tm)
          for t, w, o, tm in tiles(cm.CONFIGS)],
        *[(cm.tap3_kernel, tap, dict(d=4, AXIS=1, TAPS=1, ACT=False, BN=False, **t), w, o, tm)
          for t, w, o, tm in tiles(cm.CONFIGS)],
        *[(dn._dab_neck_kernel, dict(x_ptr=P, prm_ptr=A, fin_ptr=A, out_ptr=P, d=i, **tdims), t,
           w, o, tm) for t, w, o, tm in tiles(dn.configs_for(dtype))],
        *[(bn._grad_x_kernel, dict(x_ptr=P, g_ptr=P, prm_ptr=A, gx_ptr=P, **tdims), t, w, o, tm)
          for t, w, o, tm in tiles(cm.CONFIGS)],
        # M = N*H*W is an i64 argument from 2**31 on: one kernel compiled that way
        (bn._stats_kernel, dict(x_ptr=P, prm_ptr=A, part_ptr=A, M="i64", d=i, CHUNK=i, **dims),
         dict(AXIS=1, TAPS=3, **red), 4, {}, False),
        (bn._bwd_sums_kernel, dict(x_ptr=P, g_ptr=P, prm_ptr=A, part_ptr=A, M=i, CHUNK=i, **dims),
         red, 4, {}, False),
        *[(dw._grad_kernel, dict(g_ptr=P, x_ptr=P, prm_ptr=A, gx_ptr=P, part_ptr=A, M=i, d=i,
                                 CHUNK=i, **dims),
           dict(red, AXIS=axis, GX=gx, BC=gbc, BP=gbp), 4, {}, False)
          for axis, gx in ((0, True), (1, False))],
        *[(cm.finish_kernel, dict(part_ptr=A, out_ptr="*fp64", S=i, C=i),
           dict(STATS=stats, BC=bc, BP=bp), 4, {}, False)
          for stats in (True, False) for bc, bp in (cm.finish_tile(32, 32), cm.finish_tile(1024, 64))],
    ]


def config_options(cfg) -> dict:
    """The compile options a triton.Config sets besides num_warps (maxnreg: a register cap)."""
    return {"maxnreg": cfg.maxnreg} if getattr(cfg, "maxnreg", None) else {}


def cuobjdump() -> str:
    """The cuobjdump that ships with triton (backends/nvidia/bin); bench.sass looks in the CUDA
    toolkit first."""
    import triton

    return os.path.join(os.path.dirname(triton.__file__), "backends", "nvidia", "bin", "cuobjdump")


def jit_fn(k):
    """The JITFunction under a kernel's autotuner and heuristics wrappers."""
    import triton

    while not isinstance(k, triton.runtime.jit.JITFunction):
        k = k.fn
    return k


def compile_kernel(fn, signature: dict, constexprs: dict, num_warps: int, arch: int = 90,
                   attrs=None, options=None):
    """triton.compile of one JITFunction for sm_`arch`, no GPU needed."""
    import triton
    from triton.backends.compiler import GPUTarget
    from triton.compiler import ASTSource

    opts = dict(options or {}, num_warps=num_warps)
    return triton.compile(ASTSource(fn, signature, constexprs, attrs),
                          target=GPUTarget("cuda", arch, 32), options=opts)


def compile_call(fn, args, kwargs, arch: int = 90):
    """Compiles `fn` for the call fn[grid](*args, **kwargs) exactly as a launch on an sm_`arch`
    GPU would specialize it (argument types, divisibility by 16 of pointers and integers,
    constexprs, num_warps), through the JITFunction's own binder; no GPU needed. Tensors may be on
    the CPU: only their dtype and address alignment count."""
    import triton
    from triton.backends.compiler import GPUTarget
    from triton.compiler import ASTSource, make_backend
    from triton.runtime.jit import create_function_from_signature

    fn = jit_fn(fn)
    target = GPUTarget("cuda", arch, 32)
    backend = make_backend(target)
    binder = create_function_from_signature(fn.signature, fn.params, backend)
    bound, spec, opts = binder(*args, **kwargs)
    options, signature, constexprs, attrs = fn._pack_args(backend, kwargs, bound, spec, opts)
    return triton.compile(ASTSource(fn, signature, constexprs, attrs), target=target,
                          options=options.__dict__)


def _usage(k) -> dict:
    """Registers (REG) and stack bytes (STACK: spills) per thread from the cubin, via the cuobjdump
    Triton bundles; empty without cuobjdump."""
    import tempfile

    tool = cuobjdump()
    if "cubin" not in k.asm or not os.path.exists(tool):
        return {}
    with tempfile.NamedTemporaryFile(suffix=".cubin") as f:
        f.write(k.asm["cubin"])
        f.flush()
        out = subprocess.run([tool, "--dump-resource-usage", f.name], capture_output=True,
                             text=True).stdout
    fields = dict(w.split(":", 1) for line in out.splitlines() if "REG:" in line
                  for w in line.split() if ":" in w)
    return fields


def check(arch: int, dtypes, layouts, verbose=True, spilled=None) -> int:
    """Compiles every kernel in every autotune config; returns the number compiled. Raises on the
    first failure, and on a kernel that spills registers to local memory (a stack frame) where it
    would run untimed: a kernel without autotuning, or an autotuned kernel's first config (the
    one used when autotuning is off). A later config that spills is appended to `spilled` (a
    list) and printed: the autotuner times it against the others, so it runs only if it wins
    (ptxas versions differ here: triton 3.6's spilled two configs that triton 3.8's did not)."""
    import triton.language as tl

    from . import _common as cm, bn_prelu as bn, dab_neck as dn, dwconv3 as dw

    n = 0
    for dt in dtypes:
        for cl in layouts:
            for kernel, types, consts, warps, opts, timed in _kernels(cm, bn, dw, dn, tl, dt, cl):
                fn = jit_fn(kernel)
                sig = {a: ("constexpr" if a in consts else types[a]) for a in fn.arg_names}
                t0 = time.time()
                k = compile_kernel(fn, sig, consts, warps, arch, options=opts)
                n += 1
                use = _usage(k)
                what = (f"{fn.__name__:20s} {dt} {'NHWC' if cl else 'NCHW'} BLOCK "
                        f"{consts.get('BLOCK', consts.get('BP', '-'))!s:5s} warps {warps:2d}")
                spill = (f"{what}: spills ({use.get('STACK')} B of stack, "
                         f"{use.get('REG')} registers)")
                if use.get("STACK", "0") != "0":
                    if not timed:
                        raise RuntimeError(spill)
                    if spilled is not None:
                        spilled.append(spill)
                    print(f"spill {spill}, a config the autotuner times", flush=True)
                elif verbose:
                    print(f"ok  {what} {time.time() - t0:4.1f}s  registers "
                          f"{use.get('REG', '?')}, stack {use.get('STACK', '?')} B", flush=True)
    return n


def main(argv=None):
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0],
                                 formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--arch", type=int, default=90, help="CUDA compute capability x10 (90: H100)")
    ap.add_argument("--dtypes", default="fp32,fp16,bf16,fp64",
                    help="comma-separated input dtypes (fp32, fp16, bf16, fp64)")
    ap.add_argument("--layouts", default="nchw,nhwc", help="comma-separated: nchw, nhwc")
    ap.add_argument("-q", "--quiet", action="store_true", help="print only the summary")
    args = ap.parse_args(argv)
    if os.environ.get("TRITON_INTERPRET") == "1":  # kernels would be interpreted: fresh process
        env = {k: v for k, v in os.environ.items() if k != "TRITON_INTERPRET"}
        return subprocess.call([sys.executable, "-m", __name__, *(argv or sys.argv[1:])], env=env)
    layouts = [{"nchw": False, "nhwc": True}[s] for s in args.layouts.split(",")]
    spilled = []
    n = check(args.arch, args.dtypes.split(","), layouts, verbose=not args.quiet, spilled=spilled)
    print(f"{n} kernels compiled for sm_{args.arch}"
          + (f"; {len(spilled)} later autotune configs spill (listed above)" if spilled else ""))
    return 0


if __name__ == "__main__":
    sys.exit(main())
