"""A static performance MODEL of the dabnet kernels on sm_90 (H100 / H200): no GPU needed, nothing
measured. See docs/sass-model.md for the method, the constants and their sources, and what the
model cannot see.

    python -m bench.sass                 # writes bench/results/<date>-sm90-static.json
    python -m bench.sass --no-write      # prints the table only
    python -m bench.sass --backends cuda --dtypes fp32

What it does:
1. Compiles every csrc/cuda/*.cu for sm_90 alone (nvcc -cubin, setup.py's flags; cached by content
   hash under build/sass/), and every Triton kernel that the ops launch through Triton's own
   compiler for an sm_90 target (dabnet_kernels.triton.compile_check.compile_call).
2. Reads each kernel's registers and spills (cuobjdump -res-usage) and its SASS (cuobjdump -sass),
   kernel names demangled with c++filt.
3. Finds what each op launches, at DABNet's shapes at batch 8 (bench.cases), from the host code
   itself: the CUDA host code runs under the project's CUDA emulation in record-only mode
   (tests/cuda_emu: every <<<>>> launch is logged with its grid, block and dynamic shared memory,
   and never executed); the Triton launchers run with their launches intercepted.
4. Models each launch (registers, occupancy, loads in flight, instructions per element) and each op
   record (its launches in sequence) by Little's law against documented H100/H200 figures.
"""
from __future__ import annotations

import argparse
import datetime
import functools
import hashlib
import json
import math
import os
import re
import shutil
import subprocess
import sys
from dataclasses import dataclass, field

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
RESULTS_DIR = os.path.join(REPO, "bench", "results")
KIND = "sm90-static"

# --------------------------------------------------------------------------------- constants
# sm_90 limits: CUDA C++ Programming Guide, "Compute Capabilities", table "Technical
# Specifications per Compute Capability" (9.0), and the CUDA Occupancy Calculator's sm_90 data
# (register allocation unit 256 per warp, 1 KB of shared memory reserved per block).
SM90 = dict(regs_per_sm=65536, max_regs_per_thread=255, reg_alloc_unit_per_warp=256,
            max_threads_per_sm=2048, max_blocks_per_sm=32, max_threads_per_block=1024,
            smem_per_sm=228 * 1024, smem_per_block_optin=227 * 1024,
            smem_reserved_per_block=1024, warp_issue_per_clk=4)

# The two GPUs. sms / clock / hbm: NVIDIA's datasheets and the H100 whitepaper (132 SMs on SXM5,
# 1.98 GHz max boost; HBM3 3.35 TB/s on H100 SXM5, HBM3e 4.8 TB/s on H200 SXM). copy_tbs: what a
# large device-to-device copy reaches, which is what "% of copy bandwidth" divides by; no
# first-party measurement is on record yet, so 90% of the datasheet figure is ASSUMED (published
# H100 SXM copy/STREAM runs report ~3.0 TB/s). latency_ns: DRAM latency UNDER LOAD, an ASSUMPTION
# of this model: pointer-chase microbenchmarks on Hopper (Luo et al., "Benchmarking and Dissecting
# the Nvidia Hopper GPU Architecture", arXiv:2402.13499; Chips and Cheese, "Nvidia's H100: Funny
# L2, and Tons of Bandwidth", 2023) measure the unloaded latency at several hundred ns, and queueing
# near full bandwidth raises it; 800 ns makes Little's law ask for ~18 KB (H100) and ~26 KB (H200)
# in flight per SM, the figures of issue 16. Replace both with measurements when a GPU runs
# (bench.run records copy bandwidth; a loaded-latency probe is still to be written).
GPUS = {
    "H100": dict(name="H100 SXM5", sms=132, clock_ghz=1.98, hbm_tbs=3.35, copy_tbs=3.0,
                 latency_ns=800.0),
    "H200": dict(name="H200 SXM", sms=132, clock_ghz=1.98, hbm_tbs=4.8, copy_tbs=4.3,
                 latency_ns=800.0),
}
SOURCES = {
    "sm90_limits": "CUDA C++ Programming Guide, Compute Capabilities, technical specifications "
                   "for 9.0; CUDA Occupancy Calculator (sm_90 allocation granularities)",
    "sms_clock": "NVIDIA H100 Tensor Core GPU Architecture whitepaper (SXM5: 132 SMs, 1.98 GHz "
                 "max boost); NVIDIA H200 datasheet (same GH100, 132 SMs)",
    "hbm_tbs": "NVIDIA H100 SXM5 datasheet: 3.35 TB/s HBM3; NVIDIA H200 datasheet: 4.8 TB/s "
               "HBM3e",
    "copy_tbs": "ASSUMED 90% of the datasheet bandwidth (H100 SXM copy/STREAM runs are reported "
                "at ~3.0 TB/s); to be replaced by bench.run's measured copy bandwidth",
    "latency_ns": "ASSUMED loaded DRAM latency; unloaded pointer-chase latency on Hopper is "
                  "several hundred ns (Luo et al., arXiv:2402.13499; Chips and Cheese, 2023); "
                  "to be replaced by a measurement",
    "issue_rate": "4 warp-instructions per clock per SM (4 schedulers, 1 issue each): an upper "
                  "bound, real kernels issue fewer",
}
# A kernel that gives each thread more than this many elements of the op's tensor does not cover
# the tensor: it works on per-channel partials (the finish/combine stage of a reduction).
SMALL_KERNEL_ELEMS_PER_THREAD = 4096

# The targets of issue 16, judged on the MODEL's estimate (min over H100 and H200).
TARGETS = [
    # (op, modes, dtypes, minimum est % of copy bandwidth, text)
    ("dwconv3", ("fwd",), ("fp32", "bf16"), 80.0, "dwconv3 forward >= 80% of copy bandwidth"),
    ("dab_neck", ("fwd",), ("fp32", "fp16", "bf16"), 50.0, "eval neck >= 50% of copy bandwidth"),
    ("bn_prelu", ("train",), ("fp32", "fp16", "bf16"), 70.0,
     "BN-PReLU training statistics + apply >= 70%"),
]
TRITON_WITHIN = 0.85  # "Triton within 15% of CUDA on every op"


# ------------------------------------------------------------------------------------ tools
def find_tool(name: str):
    """(path, where): the CUDA toolkit's own tool first (CUDA_HOME, /usr/local/cuda, PATH), then
    the copy that ships with triton (backends/nvidia/bin)."""
    homes = [os.environ.get("CUDA_HOME"), os.environ.get("CUDA_PATH"), "/usr/local/cuda"]
    for h in homes:
        if h and os.path.isfile(os.path.join(h, "bin", name)):
            return os.path.join(h, "bin", name), f"CUDA toolkit ({h}/bin)"
    p = shutil.which(name)
    if p:
        return p, "PATH"
    try:
        import triton

        p = os.path.join(os.path.dirname(triton.__file__), "backends", "nvidia", "bin", name)
        if os.path.isfile(p):
            return p, f"triton {triton.__version__} (backends/nvidia/bin)"
    except ImportError:
        pass
    return None, "not found"


def _version(tool, arg="--version"):
    try:
        out = subprocess.run([tool, arg], capture_output=True, text=True).stdout
    except OSError:
        return None
    lines = [ln.strip() for ln in out.splitlines() if ln.strip()]
    rel = [ln for ln in lines if "release" in ln]  # nvcc, cuobjdump: "... release 13.0, V13.0.88"
    return rel[-1] if rel else (lines[0] if lines else None)


@functools.lru_cache(maxsize=None)
def demangle(name: str) -> str:
    return demangle_many((name,))[0]


def demangle_many(names) -> list:
    filt = shutil.which("c++filt")
    if not filt or not names:
        return list(names)
    out = subprocess.run([filt], input="\n".join(names), capture_output=True, text=True).stdout
    res = out.splitlines()
    return res if len(res) == len(names) else list(names)


# ------------------------------------------------------------------------------ SASS parsing
_LINE = re.compile(r"/\*([0-9a-f]{4,})\*/\s+([^;]*?)\s*;")
_FUNC = re.compile(r"^\s*Function\s*:\s*(\S+)")
_REG = re.compile(r"\b(U?R)(\d+)\b")
_CBANK = re.compile(r"c\[0x0\]\[(0x[0-9a-f]+)\]")


@dataclass
class Instr:
    addr: int
    pred: str
    op: str          # full opcode with modifiers, e.g. LDG.E.128
    operands: list   # operand strings

    @property
    def base(self):
        return self.op.split(".")[0]

    @property
    def mods(self):
        return self.op.split(".")[1:]


def parse_instr(addr: int, text: str) -> Instr:
    text = text.strip()
    pred = ""
    if text.startswith("@"):
        pred, text = text.split(None, 1)
    parts = text.split(None, 1)
    op = parts[0]
    ops, depth, cur = [], 0, ""
    for ch in (parts[1] if len(parts) > 1 else ""):
        if ch == "," and depth == 0:
            ops.append(cur.strip())
            cur = ""
            continue
        depth += ch in "[("
        depth -= ch in "])"
        cur += ch
    if cur.strip():
        ops.append(cur.strip())
    return Instr(addr, pred, op, ops)


def parse_sass(text: str) -> dict:
    """{mangled function name: [Instr]} from `cuobjdump -sass` (or nvdisasm) output."""
    funcs, cur = {}, None
    for line in text.splitlines():
        m = _FUNC.match(line)
        if m:
            cur = funcs.setdefault(m.group(1), [])
            continue
        m = _LINE.search(line)
        if m and cur is not None:
            cur.append(parse_instr(int(m.group(1), 16), m.group(2)))
    return funcs


def parse_res_usage(text: str) -> dict:
    """{mangled name: {REG, STACK, SHARED, LOCAL, ...}} from `cuobjdump -res-usage`."""
    out, cur = {}, None
    for line in text.splitlines():
        m = re.match(r"\s*Function\s+(\S+?):?\s*$", line)
        if m:
            cur = m.group(1)
            continue
        if cur and "REG:" in line:
            out[cur] = {k: int(v) for k, v in re.findall(r"(\w+(?:\[\d+\])?):(\d+)", line)}
            cur = None
    return out


def mem_width(ins: Instr) -> int:
    """Bytes moved per thread by a load or store instruction."""
    m = ins.mods
    if "128" in m:
        return 16
    if "64" in m:
        return 8
    if "U16" in m or "S16" in m:
        return 2
    if "U8" in m or "S8" in m:
        return 1
    return 4


GLOBAL_LOADS = ("LDG", "LDGSTS")
GLOBAL_STORES = ("STG", "RED", "REDG", "ATOMG")


def _regs(operand: str):
    """Register names read by an operand (R5, UR4, R4.64 -> R4 and R5)."""
    out = []
    for kind, n in _REG.findall(operand):
        out.append(f"{kind}{n}")
    if ".64" in operand:
        for kind, n in _REG.findall(operand.split(".64")[0][-8:]):
            out.append(f"{kind}{int(n) + 1}")
    return out


def dest_regs(ins: Instr) -> list:
    """Registers an instruction writes (its first register operand; 2 or 4 for wide results)."""
    if ins.base in ("STG", "STS", "STL", "ST", "BRA", "EXIT", "BAR", "RED", "REDG", "CALL", "RET",
                    "BSYNC", "BSSY", "NOP", "WARPSYNC", "DEPBAR", "MEMBAR", "LDGSTS", "ISETP",
                    "FSETP", "DSETP", "HSETP2", "PLOP3", "UISETP", "YIELD"):
        return []
    if not ins.operands:
        return []
    m = re.match(r"^(U?R)(\d+)$", ins.operands[0].split(".")[0].lstrip("-|"))
    if not m:
        return []
    n = 1
    if ins.base in ("LDG", "LDS", "LDL", "LD", "LDC", "ULDC", "LDSM"):
        n = mem_width(ins) // 4 or 1
    elif "WIDE" in ins.mods or "64" in ins.mods or ins.base.startswith("D") and ins.base in (
            "DADD", "DMUL", "DFMA", "F2F", "I2F", "MOV64"):
        n = 2
    return [f"{m.group(1)}{int(m.group(2)) + k}" for k in range(n)]


def src_regs(ins: Instr) -> set:
    ops = ins.operands
    srcs = ops if ins.base in ("STG", "STS", "STL", "ST", "RED", "REDG") or not dest_regs(ins) \
        else ops[1:]
    out = set()
    for o in srcs:
        if o.startswith("desc["):  # the memory descriptor, not data
            o = o[o.index("]") + 1:]
        out.update(_regs(o))
    if ins.pred:
        pass  # predicates are not registers
    return out


def address_regs(ins: Instr) -> list:
    """The base registers of a memory instruction's address: [R4.64+0x10] -> R4, R5."""
    for o in ins.operands:
        if "[" in o:
            inner = o[o.rindex("[") + 1:o.rindex("]")]
            return _regs(inner)
    return []


def _cold_ranges(instrs):
    """Address ranges of subroutines (CALL.REL targets up to their RET): slow paths of divisions
    and square roots, not run per element."""
    targets = sorted({int(i.operands[0], 16) for i in instrs
                      if i.base == "CALL" and i.operands and i.operands[0].startswith("0x")})
    out = []
    for t in targets:
        end = next((i.addr for i in instrs if i.addr >= t and i.base == "RET"), None)
        if end is not None:
            out.append((t, end))
    return out


def fallthrough_count(hot, skip: set) -> int:
    """Instructions on one path through the kernel, the loops in `skip` left out: conditional
    branches and exits fall through, unconditional branches are taken (an if/else costs one of
    its sides, not both), until an unconditional EXIT."""
    at = {i.addr: k for k, i in enumerate(hot)}
    k, n, seen = 0, 0, set()
    while 0 <= k < len(hot) and k not in seen:
        seen.add(k)
        ins = hot[k]
        if ins.addr not in skip:
            n += 1
        if ins.base == "EXIT" and not ins.pred:
            break
        if ins.base == "BRA" and not ins.pred and ins.operands and ins.operands[0].startswith("0x"):
            t = int(ins.operands[0], 16)
            if t > ins.addr and t in at:
                k = at[t]
                continue
        k += 1
    return n


def find_loops(instrs):
    """(start, end) address pairs of backward branches: the loops, innermost not resolved."""
    loops = []
    for i in instrs:
        if i.base == "BRA" and i.operands and i.operands[0].startswith("0x"):
            t = int(i.operands[0], 16)
            if t < i.addr:
                loops.append((t, i.addr))
    return loops


def inflight(body, passes=2):
    """Most bytes (and loads) of global loads a thread has in flight while running `body` over and
    over: a load stays in flight until an instruction reads or overwrites one of the registers it
    writes; loads are taken to complete in order (waiting on one retires those issued before it).
    LDGSTS (cp.async) stays in flight until the next DEPBAR or BAR."""
    pending = []  # [(regs, bytes)]
    best_b = best_n = 0
    for _ in range(passes):
        for ins in body:
            used = src_regs(ins) | set(dest_regs(ins))
            hit = max((k for k, (regs, _) in enumerate(pending) if regs & used), default=-1)
            if ins.base in ("DEPBAR", "BAR", "LDGDEPBAR") and ins.base != "LDGDEPBAR":
                hit = max(hit, max((k for k, (regs, _) in enumerate(pending) if not regs),
                                   default=-1))
            if hit >= 0:
                pending = pending[hit + 1:]
            if ins.base in GLOBAL_LOADS:
                pending.append((set(dest_regs(ins)), mem_width(ins)))
                best_b = max(best_b, sum(b for _, b in pending))
                best_n = max(best_n, len(pending))
    return best_b, best_n


# Source operand positions (after the destination and any carry-out predicate) that multiply or
# shift: IMAD d, a, b, c = a*b + c; LEA d, a, b, s = (a << s) + b.
_MULT_POS = {"IMAD": (0, 1), "IMUL": (0, 1), "LEA": (0,), "SHF": (0, 1, 2), "SHL": (0, 1)}


def _def_before(instrs, k, reg):
    for j in range(k - 1, -1, -1):
        if reg in dest_regs(instrs[j]):
            return j
    return -1


def count_streams(keys) -> int:
    """Distinct pointers read: parameter sets that share an offset are one stream (a load's set
    may also hold an offset added on the way); 0 when some load's base was not found."""
    if not keys or not all(keys):
        return 0
    groups = []
    for k in keys:
        hit = [g for g in groups if g & k]
        merged = set(k).union(*hit) if hit else set(k)
        groups = [g for g in groups if not (g & k)] + [merged]
    return len(groups)


def multiplied_params(instrs) -> set:
    """Parameter offsets that some instruction multiplies (sizes, strides): never pointers."""
    out = set()
    for ins in instrs:
        if ins.base not in ("IMAD", "IMUL"):
            continue
        ops = ins.operands[1:]
        if ops and re.match(r"^U?P\d|^U?PT$", ops[0]):
            ops = ops[1:]
        for o in ops[:2]:
            for x in _CBANK.findall(o):
                off = int(x, 16)
                out.update((off, off & ~7))
    return out


def pointer_params(instrs, idx, depth=64, exclude=frozenset()):
    """Kernel parameter offsets (c[0x0][X]) that the address of instrs[idx] takes as its base: a
    backward slice of the address registers through the straight-line order, following only the
    operands that are added (not multiplied or shifted), so that strides and sizes, which reach an
    address through a multiplication, are not taken for pointers."""
    work = [(r, k) for r in address_regs(instrs[idx]) for k in (idx,)]
    found, seen = set(), set()
    while work and len(seen) < depth:
        reg, k = work.pop()
        j = _def_before(instrs, k, reg)
        if j < 0 or (reg, j) in seen:
            continue
        seen.add((reg, j))
        ins = instrs[j]
        ops = ins.operands[1:]
        if ops and re.match(r"^U?P\d|^U?PT$", ops[0]):  # carry-out predicate
            ops = ops[1:]
        mult = _MULT_POS.get(ins.base, ())
        hi = "HI" in ins.mods
        for pos, o in enumerate(ops):
            if pos in mult or (ins.base == "LEA" and hi and pos == 2):
                continue
            for x in _CBANK.findall(o):
                off = int(x, 16)
                found.add(off - 4 if ("X" in ins.mods and hi) or (off % 8 == 4) else off)
            if o.startswith("c["):
                continue
            for r in _regs(o):
                if r.startswith(("R", "UR")) and r not in ("RZ", "URZ"):
                    work.append((r, j))
    return frozenset(o for o in found if o >= 0x210 and o not in exclude)


@dataclass
class Phase:
    kind: str        # "output" (stores to global), "stage" (global -> shared), "reduce", "body"
    start: int
    end: int
    instrs: int
    ldg: list        # widths in bytes of the global loads of one iteration
    stg: list        # widths of the global stores
    streams: int     # distinct pointer parameters the loads read (0: unknown)
    inflight_bytes: int
    inflight_loads: int
    alternatives: int = 1  # loops of the same kind (unswitched copies): the heaviest is taken


@dataclass
class KernelSass:
    name: str
    demangled: str
    regs: int
    stack: int
    local_mem: int
    shared_static: int
    n_instrs: int
    overhead_instrs: int  # outside the phases and the cold subroutines, once per thread
    widest_load: int
    widest_store: int
    spill_instrs: int
    phases: list = field(default_factory=list)
    loop_free: bool = False


def analyze_function(name: str, instrs: list, usage: dict, dem: str = None) -> KernelSass:
    cold = _cold_ranges(instrs)

    def is_cold(a):
        return any(s <= a <= e for s, e in cold)

    hot = [i for i in instrs if not is_cold(i.addr) and i.base != "NOP"]
    # The padding loop at the end (BRA to itself) is not a loop.
    loops = [(s, e) for s, e in find_loops(hot) if s != e]
    index = {i.addr: k for k, i in enumerate(hot)}
    mult = multiplied_params(hot)

    def body(s, e):
        return [i for i in hot if s <= i.addr <= e]

    def has_mem(b):
        return any(i.base in GLOBAL_LOADS + GLOBAL_STORES for i in b)

    inner = [(s, e) for s, e in loops if has_mem(body(s, e))
             and not any((s2, e2) != (s, e) and s <= s2 and e2 <= e and has_mem(body(s2, e2))
                         for s2, e2 in loops)]
    phases = []
    for s, e in inner:
        b = body(s, e)
        ldg = [mem_width(i) for i in b if i.base in GLOBAL_LOADS]
        stg = [mem_width(i) for i in b if i.base in GLOBAL_STORES]
        # Staging copies global to shared memory; a loop with a barrier or shuffles inside
        # (Triton's in-loop tl.sum) reduces through shared memory instead.
        sync = any(i.base in ("BAR", "SHFL") for i in b)
        kind = ("output" if stg else "stage" if not sync and (
            any(i.base == "STS" for i in b) or any(i.base == "LDGSTS" for i in b)) else "reduce")
        keys = [pointer_params(hot, index[i.addr], exclude=mult) for i in b
                if i.base in GLOBAL_LOADS]
        streams = count_streams(keys)
        ib, il = inflight(b)
        phases.append(Phase(kind, s, e, len(b), ldg, stg, streams, ib, il))
    # Unswitched copies of one loop: keep the heaviest of each kind.
    chosen = {}
    for p in phases:
        q = chosen.get(p.kind)
        if q is None or p.instrs > q.instrs:
            p.alternatives = (q.alternatives + 1) if q else 1
            chosen[p.kind] = p
        else:
            q.alternatives += 1
    loop_free = not chosen
    if loop_free:  # one pass over the whole kernel (Triton's elementwise tiles)
        b = hot
        ldg = [mem_width(i) for i in b if i.base in GLOBAL_LOADS]
        stg = [mem_width(i) for i in b if i.base in GLOBAL_STORES]
        keys = [pointer_params(hot, k, exclude=mult) for k, i in enumerate(b)
                if i.base in GLOBAL_LOADS]
        streams = count_streams(keys)
        ib, il = inflight(b, passes=1)
        chosen["body"] = Phase("output" if stg else "reduce", hot[0].addr if hot else 0,
                               hot[-1].addr if hot else 0, len(b), ldg, stg, streams, ib, il)
    in_phase = set()
    for p in phases:  # every loop with memory ops, chosen or alternative, is not overhead
        in_phase.update(a for a in range(p.start, p.end + 1))
    overhead = 0 if loop_free else fallthrough_count(hot, in_phase)
    order = {"stage": 0, "reduce": 1, "output": 2, "body": 3}
    u = usage or {}
    # The widest load and store of the data path: the phase loops' (per-channel parameters are
    # read once per thread, outside them, and may be wider); the whole kernel if it has no loop.
    allmem = hot if loop_free else [i for i in hot if any(p.start <= i.addr <= p.end
                                                          for p in chosen.values())]
    return KernelSass(
        name=name, demangled=dem or name, regs=u.get("REG", 0), stack=u.get("STACK", 0),
        local_mem=u.get("LOCAL", 0), shared_static=u.get("SHARED", 0), n_instrs=len(hot),
        overhead_instrs=overhead,
        widest_load=max((mem_width(i) for i in allmem if i.base in GLOBAL_LOADS), default=0),
        widest_store=max((mem_width(i) for i in allmem if i.base in GLOBAL_STORES), default=0),
        spill_instrs=sum(1 for i in instrs if i.base in ("LDL", "STL")),
        phases=sorted(chosen.values(), key=lambda p: order.get(p.kind, 9)), loop_free=loop_free)


def width_name(b: int) -> str:
    return {0: "-", 1: ".8", 2: ".16", 4: ".32", 8: ".64", 16: ".128"}.get(b, f"{8 * b}b")


# ---------------------------------------------------------------------------------- occupancy
def occupancy(regs: int, threads: int, smem: int, lim: dict = SM90) -> dict:
    """Resident blocks per SM and what limits them (registers, threads, blocks, shared memory)."""
    warps = -(-threads // 32)
    regs = max(regs, 1)
    per_warp = -(-regs * 32 // lim["reg_alloc_unit_per_warp"]) * lim["reg_alloc_unit_per_warp"]
    by = {
        "registers": lim["regs_per_sm"] // (per_warp * warps) if regs <= lim["max_regs_per_thread"]
        else 0,
        "threads": lim["max_threads_per_sm"] // threads if threads else 0,
        "blocks": lim["max_blocks_per_sm"],
        "shared memory": (lim["smem_per_sm"] // (smem + lim["smem_reserved_per_block"]))
        if smem else lim["max_blocks_per_sm"],
    }
    if smem > lim["smem_per_block_optin"] or threads > lim["max_threads_per_block"]:
        by["launch limits"] = 0
    blocks = min(by.values())
    prefer = ["launch limits", "threads", "blocks", "registers", "shared memory"]
    limiter = min(by, key=lambda k: (by[k], prefer.index(k)))
    return dict(blocks_per_sm=blocks, threads_per_sm=blocks * threads, limiter=limiter,
                warps_per_sm=blocks * warps, occupancy=blocks * warps / (lim["max_threads_per_sm"]
                                                                        // 32))


def littles_law_bw(bytes_in_flight_per_sm: float, gpu: dict) -> float:
    """Bytes/s that `bytes_in_flight_per_sm` on every SM sustain at the GPU's loaded latency."""
    return bytes_in_flight_per_sm * gpu["sms"] / (gpu["latency_ns"] * 1e-9)


def needed_in_flight_per_sm(gpu: dict) -> float:
    """Bytes each SM must keep in flight to reach the copy bandwidth (Little's law)."""
    return gpu["copy_tbs"] * 1e12 * gpu["latency_ns"] * 1e-9 / gpu["sms"]


# ------------------------------------------------------------------------------ kernel model
@dataclass
class Launch:
    backend: str
    kernel: str          # mangled name in the cubin
    grid: tuple
    block: tuple
    smem_dyn: int
    site: str = ""
    tile_elems: int = 0   # Triton: elements per program and loop iteration (BLOCK or BC*BP)
    channels_per_block: int = 1
    positions_per_channel: int = 1  # Triton: BP of a [BC, BP] tile (1 for a tile of channels)
    note: str = ""

    @property
    def blocks(self):
        return self.grid[0] * self.grid[1] * self.grid[2]

    @property
    def threads(self):
        return self.block[0] * self.block[1] * self.block[2]


def model_launch(ks: KernelSass, ln: Launch, n: int, esize: int, C: int, gpu: dict,
                 prev: dict = None, max_streams: int = 2) -> dict:
    """The modelled time of one launch over an op whose main tensor has n elements of esize bytes
    and C channels; prev: the model of the launch before it (a small kernel reads its partials)."""
    t, B = ln.threads, ln.blocks
    smem = ks.shared_static + ln.smem_dyn
    occ = occupancy(ks.regs, t, smem)
    per_sm_grid = -(-B // gpu["sms"])
    resident_blocks = min(occ["blocks_per_sm"], per_sm_grid)
    resident = resident_blocks * t
    L = gpu["latency_ns"] * 1e-9
    ept = n / (B * t) if B * t else 0.0
    out = dict(kernel=ks.demangled, regs=ks.regs, spills=ks.stack + ks.local_mem > 0
               or ks.spill_instrs > 0, grid=list(ln.grid), block=list(ln.block),
               smem_bytes=smem, blocks_per_sm=occ["blocks_per_sm"],
               occupancy_limiter=occ["limiter"], resident_threads_per_sm=resident,
               widest_load=width_name(ks.widest_load), widest_store=width_name(ks.widest_store))
    after_reduce = bool(prev and prev.get("reduce") and t * B * 16 <= prev["threads"])
    # A loop-free kernel loads a fixed number of elements per thread: fewer than its share of the
    # tensor, and it cannot be streaming the tensor (a one-round finish over partials).
    short = bool(ks.loop_free and ks.phases and
                 sum(ks.phases[0].ldg) / esize < ept)
    if ept > SMALL_KERNEL_ELEMS_PER_THREAD or after_reduce or short or not ks.phases:
        # Works on per-channel partials: serial reads of the partials per channel, a DRAM
        # latency each round of loads in flight, plus one for the store.
        parts = 1.0
        if prev:
            parts = prev["blocks"] * prev["channels_per_block"] / max(C, 1)
        # Lanes reading one channel's partials at once: CUDA's finish kernels spread a channel
        # over t * B / C threads; a Triton kernel reads BP positions (partials) of each of its
        # channels per step of its [BC, BP] tile, and one per step without BP.
        lanes = (max(1.0, t * B / max(C, 1)) if ln.backend == "cuda"
                 else float(ln.positions_per_channel))
        ph = ks.phases[0] if ks.phases else None
        per_round = 1
        if ph and ph.ldg:
            per_round = max(1, ph.inflight_loads // max(1, len(ph.ldg)))
        rounds = math.ceil(parts / (lanes * per_round))
        out.update(role="partials", time_s=(rounds + 1) * L, bound="latency (serial)",
                   instr_per_elem=None, bytes_in_flight_per_sm=None, serial_rounds=rounds)
        return out
    instr_total = 0.0      # warp instructions
    lat_time = 0.0
    in_flight_sm = 0.0
    ipe = ks.overhead_instrs / ept if ept else 0.0
    reads = writes = 0.0
    staged_per_out = 1.0
    for ph in ks.phases:
        if ks.loop_free:
            e_iter = ept
        elif ln.tile_elems:
            e_iter = ln.tile_elems / t
        elif ph.stg:
            e_iter = sum(ph.stg) / esize
        elif ph.kind == "stage":
            e_iter = sum(ph.ldg) / esize
        else:
            e_iter = (max(ph.ldg) if ph.ldg else esize) / esize
        e_iter = max(e_iter, 1e-9)
        if ph.kind == "stage":
            staged = (ln.smem_dyn or ks.shared_static) / esize * B
            elems = staged
            staged_per_out = staged / n
        else:
            elems = n
        ipe += ph.instrs / e_iter * elems / n
        instr_total += ph.instrs * (elems / e_iter) / 32
        ldg_per_elem = sum(ph.ldg) / e_iter
        e_inflight = ph.inflight_bytes / ldg_per_elem if ldg_per_elem else 0.0
        if ph.ldg:
            rate = gpu["sms"] * resident * e_inflight / L
            lat_time += elems / rate if rate else float("inf")
            in_flight_sm = max(in_flight_sm, ph.inflight_bytes * resident)
        if ph.stg:
            writes = max(writes, sum(ph.stg) / e_iter / esize)
        if ph.ldg and ph.kind != "stage" or (ph.kind == "stage"):
            s = ph.streams or min(len(ph.ldg), max_streams)
            reads = max(reads, min(s, max_streams) if ph.kind != "stage" else 1)
    instr_total += ks.overhead_instrs * (B * t) / 32
    issue_time = instr_total / (gpu["sms"] * SM90["warp_issue_per_clk"] * gpu["clock_ghz"] * 1e9)
    dram_time = n * esize * (reads + writes) / (gpu["copy_tbs"] * 1e12)
    times = {"latency (loads in flight)": lat_time, "issue": issue_time, "DRAM bandwidth":
             dram_time}
    bound = max(times, key=times.get)
    out.update(role="stream", time_s=times[bound], bound=bound, instr_per_elem=round(ipe, 1),
               staged_per_output=round(staged_per_out, 2),
               bytes_in_flight_per_sm=int(in_flight_sm),
               bytes_in_flight_needed_per_sm=int(needed_in_flight_per_sm(gpu)),
               read_streams=reads, write_streams=writes,
               times_us={k: round(v * 1e6, 2) for k, v in times.items()})
    return out


# ------------------------------------------------------------------------------- CUDA build
def nvcc_flags():
    """setup.py's nvcc flags plus torch's (as BuildExtension adds them) for one sm_90 cubin."""
    from torch.utils import cpp_extension

    import torch

    flags = ["-O3", "-lineinfo", "--expt-relaxed-constexpr", "-Xcompiler=-Wall",
             "-Xptxas=--warn-on-spills", "-std=c++20", "-DDABNET_WITH_CUDA",
             f"-D_GLIBCXX_USE_CXX11_ABI={int(torch._C._GLIBCXX_USE_CXX11_ABI)}",
             *cpp_extension.COMMON_NVCC_FLAGS]
    inc = [p for p in cpp_extension.include_paths() if os.path.isdir(p)]
    return flags + [f"-I{p}" for p in inc]


def build_cuda(arch="sm_90", src_dir=None, out_dir=None, log=print) -> list:
    """One cubin per csrc/cuda/*.cu for `arch`, cached by the hash of the sources and flags."""
    src_dir = src_dir or os.path.join(REPO, "csrc", "cuda")
    out_dir = out_dir or os.path.join(REPO, "build", "sass")
    nvcc, _ = find_tool("nvcc")
    if not nvcc:
        raise RuntimeError("bench.sass: nvcc not found (set CUDA_HOME)")
    flags = nvcc_flags()
    h = hashlib.sha256(" ".join([arch, _version(nvcc) or "", *flags]).encode())
    for root in (src_dir, os.path.dirname(src_dir)):
        for f in sorted(os.listdir(root)):
            p = os.path.join(root, f)
            if os.path.isfile(p) and f.endswith((".cu", ".cuh", ".h")):
                h.update(f.encode() + open(p, "rb").read())
    out = os.path.join(out_dir, f"{arch}-{h.hexdigest()[:16]}")
    os.makedirs(out, exist_ok=True)
    cubins = []
    for f in sorted(os.listdir(src_dir)):
        if not f.endswith(".cu"):
            continue
        dst = os.path.join(out, f[:-3] + ".cubin")
        if not os.path.exists(dst):
            log(f"bench.sass: nvcc -cubin -arch={arch} {f}")
            r = subprocess.run([nvcc, "-cubin", f"-arch={arch}", *flags,
                                os.path.join(src_dir, f), "-o", dst + ".tmp"],
                               capture_output=True, text=True)
            if r.returncode != 0:
                raise RuntimeError(f"bench.sass: nvcc failed on {f}:\n{r.stderr[-4000:]}")
            os.replace(dst + ".tmp", dst)
        cubins.append(dst)
    return cubins


def read_cubin(path: str) -> dict:
    """{mangled: KernelSass} for every kernel of a cubin."""
    tool, _ = find_tool("cuobjdump")
    if not tool:
        raise RuntimeError("bench.sass: cuobjdump not found (CUDA toolkit or triton)")
    sass = subprocess.run([tool, "-sass", path], capture_output=True, text=True, check=True).stdout
    res = subprocess.run([tool, "-res-usage", path], capture_output=True, text=True,
                         check=True).stdout
    funcs, usage = parse_sass(sass), parse_res_usage(res)
    names = sorted(funcs)
    dem = dict(zip(names, demangle_many(names)))
    return {n: analyze_function(n, funcs[n], usage.get(n, {}), dem[n]) for n in names}


# ------------------------------------------------------------------------- launch discovery
def _norm(s: str) -> str:
    s = re.sub(r"_GLOBAL__N__\w+", "(anonymous namespace)", s)
    s = s.replace("at::", "c10::")
    return re.sub(r"\s+", "", s)


def _template_args(s: str) -> list:
    """Top-level template arguments of the first templated name in a demangled signature."""
    i = s.find("<")
    if i < 0:
        return []
    depth, cur, out = 0, "", []
    for ch in s[i:]:
        if ch == "<":
            depth += 1
            if depth == 1:
                continue
        elif ch == ">":
            depth -= 1
            if depth == 0:
                out.append(cur)
                break
        elif ch == "," and depth == 1:
            out.append(cur)
            cur = ""
            continue
        cur += ch
    return [a for a in out if a]


def _short_name(dem: str) -> str:
    """'void dabnet::cuda::map_kernel<...>(...)' -> 'map_kernel'."""
    m = re.match(r"^(?:[\w:]+\s+)?([\w:~]+)", dem)
    return m.group(1).split("::")[-1] if m else dem


def match_cuda_kernel(site_kernel: str, enclosing: str, kernels: dict) -> str:
    """The mangled name of the kernel that a launch site runs: the kernel whose template arguments
    all appear in the enclosing host function's (demangled) name, preferring the one the site's
    <<<>>> names. Raises when none matches."""
    enc = _norm(enclosing)
    cands = []
    for mangled, ks in kernels.items():
        args = [_norm(a) for a in _template_args(ks.demangled)]
        if not args or not all(a in enc for a in args):
            continue
        score = (_short_name(ks.demangled) == site_kernel, sum(len(a) for a in args))
        cands.append((score, mangled))
    if not cands:
        raise LookupError(f"no sm_90 kernel matches the launch in {enclosing}")
    return max(cands)[1]


def _site_kernel(site: str) -> str:
    """The kernel expression before <<< at a launch site 'csrc/cuda/file.cu:LINE'."""
    path, line = site.rsplit(":", 1)
    try:
        text = open(os.path.join(REPO, path)).read().splitlines()[int(line) - 1]
    except (OSError, IndexError, ValueError):
        return ""
    m = re.search(r"([A-Za-z_]\w*)\s*(?:<[^<>]*(?:<[^<>]*>[^<>]*)*>)?\s*<<<", text)
    return m.group(1) if m else ""


def cuda_launches(cases, kernels: dict, log=print) -> dict:
    """{(case, phase): [Launch]} by running the CUDA host code under the emulation, record-only."""
    import torch

    sys.path.insert(0, os.path.join(REPO, "tests"))
    from cuda_emu import build

    from dabnet_kernels import ops

    from . import cases as C

    ns = build.load()
    saved = ops.ops_for
    ops.ops_for = lambda x: ns
    torch.ops.dabnet_cuemu.set_record_only(True)
    out = {}
    try:
        for case in cases:
            for phase, recs in _run_case(case, lambda: torch.ops.dabnet_cuemu.launch_log(True)):
                launches = []
                for rec in recs:
                    site, g, b, smem, what = rec.split("|", 4)
                    enclosing = demangle("_Z" + what) if what else ""
                    try:
                        mangled = match_cuda_kernel(_site_kernel(site), enclosing, kernels)
                        note = ""
                    except LookupError as e:  # modelled as unknown, reported in the record
                        log(f"bench.sass: {site}: {e}")
                        mangled, note = "", f"no sm_90 kernel matched the launch at {site}"
                    block = tuple(int(v) for v in b.split(","))
                    launches.append(Launch("cuda", mangled, tuple(int(v) for v in g.split(",")),
                                           block, int(smem), site=site,
                                           channels_per_block=block[0], note=note))
                out[(case, phase)] = launches
    finally:
        torch.ops.dabnet_cuemu.set_record_only(False)
        ops.ops_for = saved
    return out


def _run_case(case, take):
    """Runs one op case through dabnet_kernels.ops (ops_for already redirected); yields (phase,
    what take() returned after it): 'fwd' for inference, 'train' and 'bwd' for a training case."""
    import torch

    from dabnet_kernels import ops

    from . import cases as C

    t = C.make_inputs(case, "cpu")
    take()
    if case.mode == "fwd":
        with torch.no_grad():
            C.forward(ops, case, t)
        yield "fwd", take()
        return
    C.prepare(case, t)
    out = C.forward(ops, case, t)
    yield "train", take()
    torch.autograd.grad(out, C.grad_leaves(case, t), t["gy"], allow_unused=True)
    yield "bwd", take()


def triton_launches(cases, arch: int = 90, log=print):
    """({(case, phase): [Launch]}, {mangled: KernelSass}) for the Triton backend: the launchers run
    on CPU tensors with every launch intercepted, and each launch is compiled for sm_`arch` as the
    real launch would specialize it (every autotune config; the model picks the fastest, as the
    autotuner would)."""
    import tempfile

    import torch
    import triton
    from triton.runtime import autotuner, jit

    from dabnet_kernels import ops
    from dabnet_kernels.triton import _common as cm, compile_check

    from . import cases as C

    recorded = []

    def rec_autotune(self, *args, **kwargs):
        recorded.append(("autotune", self, args, kwargs))

    def rec_jit(self, *args, grid, warmup, **kwargs):
        recorded.append(("jit", self, args, dict(kwargs, grid=grid)))

    saved = (autotuner.Autotuner.run, jit.JITFunction.run, cm.check_device, ops.ops_for)
    autotuner.Autotuner.run = rec_autotune
    jit.JITFunction.run = rec_jit
    cm.check_device = lambda x: None
    ops.ops_for = lambda x: torch.ops.dabnet_triton
    kernels, out, cache = {}, {}, {}
    try:
        for case in cases:
            for phase, recs in _run_case(case, lambda: [recorded.pop(0) for _ in
                                                        range(len(recorded))]):
                launches = []
                for kind, obj, args, kwargs in recs:
                    alts = []
                    for cfg_kw, warps, fn, meta in _triton_variants(kind, obj, args, kwargs):
                        key = (fn.__name__, repr(sorted((k, str(v)) for k, v in cfg_kw.items())),
                               tuple(_arg_key(a) for a in args))
                        if key not in cache:
                            k = compile_check.compile_call(fn, args, cfg_kw, arch=arch)
                            with tempfile.NamedTemporaryFile(suffix=".cubin") as f:
                                f.write(k.asm["cubin"])
                                f.flush()
                                ks = read_cubin(f.name)
                            (mangled, sk), = ks.items()
                            sk.shared_static = max(sk.shared_static, k.metadata.shared)
                            uid = f"{fn.__name__}[{len(kernels)}]"
                            sk.demangled = fn.__name__
                            kernels[uid] = sk
                            cache[key] = uid
                        grid = kwargs["grid"]
                        g = grid(meta) if callable(grid) else grid
                        g = tuple(int(v) for v in g) + (1,) * (3 - len(g))
                        tile = meta.get("BLOCK") or (meta.get("BC", 0) * meta.get("BP", 0))
                        alts.append(Launch("triton", cache[key], g, (32 * warps, 1, 1), 0,
                                           tile_elems=int(tile or 0),
                                           channels_per_block=int(meta.get("BC", 1) or 1),
                                           positions_per_channel=int(meta.get("BP", 1) or 1),
                                           note=_meta_text(cfg_kw, warps)))
                    launches.append(alts)
                out[(case, phase)] = launches
    finally:
        (autotuner.Autotuner.run, jit.JITFunction.run, cm.check_device, ops.ops_for) = saved
    return out, kernels


def _arg_key(a):
    import torch

    if isinstance(a, torch.Tensor):
        return ("t", str(a.dtype), a.data_ptr() % 16 == 0)
    return ("v", a if isinstance(a, (int, float, bool)) else str(a))


def _meta_text(kw, warps):
    keep = {k: v for k, v in kw.items() if k in ("BLOCK", "BC", "BP")}
    return ", ".join(f"{k}={v}" for k, v in keep.items()) + f", {warps} warps"


def _triton_variants(kind, obj, args, kwargs):
    """(kwargs to compile with, num_warps, JITFunction, meta for the grid) for each config the
    launch may run with."""
    import triton

    from dabnet_kernels.triton import compile_check

    kwargs = {k: v for k, v in kwargs.items() if k not in ("grid", "warmup")}
    if kind == "autotune":
        configs = obj.configs
        fn = obj.fn
    else:
        configs, fn = [None], obj
    heur = {}
    while not isinstance(fn, triton.runtime.jit.JITFunction):
        heur.update(getattr(fn, "values", {}) or {})
        fn = fn.fn
    names = fn.arg_names
    prune = getattr(obj, "early_config_prune", None) if kind == "autotune" else None
    if prune:  # the configs the autotuner would time for these arguments
        configs = prune(configs, dict(zip(names, args)))
    for cfg in configs:
        kw = dict(kwargs)
        if cfg is not None:
            kw.update(cfg.kwargs)
            kw["num_warps"] = cfg.num_warps
            if cfg.num_stages:
                kw["num_stages"] = cfg.num_stages
            kw.update(compile_check.config_options(cfg))
        meta = {**dict(zip(names, args)), **kw}
        for v, h in heur.items():
            kw[v] = h(meta)
            meta[v] = kw[v]
        yield kw, kw.get("num_warps", 4), fn, meta


# ------------------------------------------------------------------------------- the records
def model_cases():
    """The op cases the model covers: DABNet at a 512x1024 input, batch 8 (bench.cases' shapes:
    block 1 at C=32, 128x256, dilation 2; block 2 at C=64, 64x128, dilations 4 (and 8, 16 for the
    neck)), every dtype and layout. Training cases give the 'train' and 'bwd' phases."""
    from . import cases as C

    out = []
    for dt in ("fp32", "fp16", "bf16"):
        for lay in C.LAYOUTS:
            for blk, d in ((1, 2), (2, 4)):
                for o in ("3x1", "1x3"):
                    out.append(C.OpCase("dwconv3", "fwd", (512, 1024), blk, 8, d, o, dt, lay))
                    out.append(C.OpCase("dwconv3", "fwd+bwd", (512, 1024), blk, 8, d, o, dt, lay))
                    out.append(C.OpCase("dwconv3_bn_prelu", "fwd", (512, 1024), blk, 8, d, o, dt,
                                        lay))
                    out.append(C.OpCase("dwconv3_bn_prelu", "fwd+bwd", (512, 1024), blk, 8, d, o,
                                        dt, lay))
                out.append(C.OpCase("bn_prelu", "fwd", (512, 1024), blk, 8, 0, "-", dt, lay))
                out.append(C.OpCase("bn_prelu", "fwd+bwd", (512, 1024), blk, 8, 0, "-", dt, lay))
            for blk, d in ((1, 2), (2, 4), (2, 8), (2, 16)):
                out.append(C.OpCase("dab_neck", "fwd", (512, 1024), blk, 8, d, "-", dt, lay))
    return out


# Compulsory traffic per phase, in passes over the tensor (read or write of n elements).
PASSES = {"fwd": 2, "train": 2, "bwd": 3, "fwd+bwd": 5}
MODES = {"fwd": "fwd", "train": "train", "bwd": "bwd", "fwd+bwd": "fwd+bwd"}


def _targets(rec, by_key):
    out = []
    est = rec["est_pct_copy_bw"]
    for op, modes, dtypes, pct, text in TARGETS:
        if rec["op"] == op and rec["mode"] in modes and rec["dtype"] in dtypes:
            out.append(dict(target=text, met=est is not None and est >= pct))
    if rec["backend"] == "triton":
        twin = by_key.get(("cuda",) + _rkey(rec)[1:])
        if twin and twin["est_pct_copy_bw"] and est is not None:
            out.append(dict(target="Triton within 15% of CUDA",
                            met=est >= TRITON_WITHIN * twin["est_pct_copy_bw"]))
    return out


def _rkey(r):
    return (r["backend"], r["op"], r["mode"], r["dtype"], r["layout"], r["dilation"], r["orient"],
            tuple(r["shape"]))


def build_records(launches_by_backend, kernels) -> list:
    """One record per (backend, case, phase), and fwd+bwd = train + bwd for training cases."""
    recs = []
    for backend, launches in launches_by_backend.items():
        per_case = {}
        for (case, phase), lns in launches.items():
            per_case.setdefault(case, {})[phase] = lns
        for case, phases in per_case.items():
            n = case.batch * case.C * case.hw[0] * case.hw[1]
            esize = case.esize
            models = {}
            for phase, lns in phases.items():
                models[phase] = _model_phase(lns, kernels, n, esize, case.C, case.op, phase)
            if "train" in phases and "bwd" in phases and models["train"] and models["bwd"]:
                models["fwd+bwd"] = {g: dict(time_s=models["train"][g]["time_s"] +
                                             models["bwd"][g]["time_s"],
                                             kernels=models["train"][g]["kernels"] +
                                             models["bwd"][g]["kernels"])
                                     for g in GPUS}
            for phase, m in models.items():
                if case.op == "dwconv3" and phase == "train":
                    continue  # the same launches as fwd
                nbytes = PASSES[phase] * n * esize
                rec = dict(backend=backend, op=case.op, mode=MODES[phase], dtype=case.dtype,
                           layout=case.layout, dilation=case.dilation, orient=case.orient,
                           shape=list(case.shape), bytes_compulsory=nbytes)
                if m is None:
                    rec.update(est_pct_copy_bw=None, launches=[], model_error=(
                        "a launch matched no sm_90 kernel: see the bench.sass log"))
                    for g in GPUS:
                        rec[f"est_pct_copy_bw_{g.lower()}"] = None
                    recs.append(rec)
                    continue
                for g, gm in m.items():
                    t = gm["time_s"]
                    rec[f"est_time_us_{g.lower()}"] = round(t * 1e6, 2)
                    rec[f"est_pct_copy_bw_{g.lower()}"] = round(
                        100 * nbytes / t / (GPUS[g]["copy_tbs"] * 1e12), 1)
                rec["est_pct_copy_bw"] = min(rec[f"est_pct_copy_bw_{g.lower()}"] for g in GPUS)
                # fwd+bwd is the train and bwd records' launches in sequence: not repeated.
                rec["launches"] = [] if phase == "fwd+bwd" else m["H100"]["kernels"]
                recs.append(rec)
    by_key = {_rkey(r): r for r in recs}
    for r in recs:
        r["targets"] = _targets(r, by_key)
    return recs


def _model_phase(lns, kernels, n, esize, C, op, phase):
    """{gpu: {time_s, kernels: [per-launch model]}}; Triton alternatives (autotune configs): the
    fastest by the model."""
    # Big tensors the phase reads at most (x; and grad_out in backward): a cap on the streams
    # found in the SASS, which may count a per-channel parameter array as one.
    streams = 2 if phase == "bwd" else 1
    out = {}
    for g, gpu in GPUS.items():
        total, per, prev = 0.0, [], None
        for ln in lns:
            alts = ln if isinstance(ln, list) else [ln]
            best = None
            if any(a.kernel not in kernels for a in alts):
                return None  # a launch the model could not tie to a kernel: no estimate
            for a in alts:
                m = model_launch(kernels[a.kernel], a, n, esize, C, gpu, prev, streams)
                m["config"] = a.note or None
                if best is None or m["time_s"] < best["time_s"]:
                    best = m
                    best_ln = a
            ks = kernels[best_ln.kernel]
            prev = dict(blocks=best_ln.blocks, channels_per_block=best_ln.channels_per_block,
                        threads=best_ln.blocks * best_ln.threads,
                        reduce=bool(ks.phases))
            total += best["time_s"]
            best = dict(best)
            best["time_us"] = round(best.pop("time_s") * 1e6, 2)
            per.append(best)
        out[g] = dict(time_s=total, kernels=per)
    return out


# ------------------------------------------------------------------------------------ output
def summary_rows(recs):
    """(op, mode, dtype, layout) -> {backend: min est % over its dilations/orientations}."""
    rows = {}
    for r in recs:
        if r["est_pct_copy_bw"] is None:
            continue
        k = (r["op"], r["mode"], r["dtype"], r["layout"])
        v = rows.setdefault(k, {})
        cur = v.get(r["backend"])
        v[r["backend"]] = r["est_pct_copy_bw"] if cur is None else min(cur, r["est_pct_copy_bw"])
    return rows


def main(argv=None):
    p = argparse.ArgumentParser(prog="python -m bench.sass",
                                description="A static performance MODEL of the kernels on sm_90 "
                                            "(nothing is measured).")
    p.add_argument("--backends", default="cuda,triton")
    p.add_argument("--dtypes", default="fp32,fp16,bf16")
    p.add_argument("--out", default=None, help="results file (default bench/results/<date>-"
                                               "sm90-static.json)")
    p.add_argument("--no-write", action="store_true", help="print, write nothing")
    args = p.parse_args(argv)
    log = lambda *a: print(*a, file=sys.stderr, flush=True)  # noqa: E731
    os.environ.setdefault("CUDA_HOME", "/usr/local/cuda")
    backends = args.backends.split(",")
    cases = [c for c in model_cases() if c.dtype in args.dtypes.split(",")]
    tools = {}
    for name in ("nvcc", "cuobjdump", "nvdisasm", "c++filt"):
        path, where = find_tool(name)
        tools[name] = dict(path=path, found_in=where, version=_version(path) if path else None)
    log(f"bench.sass: cuobjdump from {tools['cuobjdump']['found_in']}")
    kernels, launches = {}, {}
    if "cuda" in backends:
        for cubin in build_cuda(log=log):
            kernels.update(read_cubin(cubin))
        log(f"bench.sass: {len(kernels)} CUDA kernels in the sm_90 cubins")
        launches["cuda"] = cuda_launches(cases, kernels, log=log)
    if "triton" in backends:
        tl, tk = triton_launches(cases, log=log)
        kernels.update(tk)
        launches["triton"] = tl
    recs = build_records(launches, kernels)
    import torch

    try:
        import triton

        tv = triton.__version__
    except ImportError:
        tv = None
    from .machine import git_commit

    now = datetime.datetime.now(datetime.timezone.utc)
    res = dict(kind=KIND, model="static performance MODEL of sm_90 (not measured)",
               date=now.strftime("%Y-%m-%d %H:%M UTC"),
               command=("python -m bench.sass " + " ".join(argv if argv is not None
                                                           else sys.argv[1:])).strip(),
               git_commit=git_commit(), torch=torch.__version__, triton=tv,
               tools=tools, nvcc_version=tools["nvcc"]["version"], sm90_limits=SM90, gpus=GPUS,
               sources=SOURCES, targets=[dict(op=o, modes=m, dtypes=d, min_pct=v, text=t)
                                         for o, m, d, v, t in TARGETS],
               method="docs/sass-model.md", records=recs)
    print(render_table(res))
    if not args.no_write:
        path = args.out or os.path.join(RESULTS_DIR, f"{now:%Y-%m-%d}-sm90-static.json")
        write_results(res, path)
        log(f"bench.sass: wrote {path}")
    return 0


def compact(res: dict) -> dict:
    """Kernel names shortened in the launches (the full demangled names once, in
    `kernel_names`), and the per-GPU constant of each launch moved to the top."""
    names = dict(res.get("kernel_names", {}))
    for r in res["records"]:
        if r["mode"] == "fwd+bwd":
            r["launches"] = []  # those of the train and bwd records
        for ln in r["launches"]:
            full = ln["kernel"]
            short = _short_kernel(full)
            names.setdefault(short, full)
            ln["kernel"] = short
            ln.pop("bytes_in_flight_needed_per_sm", None)
    res["kernel_names"] = names
    res["bytes_in_flight_needed_per_sm"] = {g: int(needed_in_flight_per_sm(v))
                                            for g, v in res["gpus"].items()}
    return res


def write_results(res: dict, path: str) -> None:
    """The results file: the header indented, one record per line (diffs stay readable)."""
    res = compact(dict(res))
    head = {k: v for k, v in res.items() if k != "records" and not k.startswith("_")}
    text = json.dumps(head, indent=1)[:-2] + ',\n "records": [\n'
    text += ",\n".join("  " + json.dumps(r, separators=(",", ":")) for r in res["records"])
    text += "\n ]\n}\n"
    json.loads(text)  # well-formed
    with open(path, "w") as f:
        f.write(text)


# ------------------------------------------------------------------------- report rendering
SUMMARY_ROWS = [("dwconv3", "fwd"), ("dwconv3", "fwd+bwd"), ("bn_prelu", "fwd"),
                ("bn_prelu", "train"), ("dwconv3_bn_prelu", "fwd"), ("dab_neck", "fwd")]
COLS = [(dt, lay) for dt in ("fp32", "fp16", "bf16") for lay in ("nchw", "cl")]


def latest_static(results_dir: str = RESULTS_DIR):
    """The newest kind=sm90-static results file, or None."""
    import glob

    best = None
    for p in sorted(glob.glob(os.path.join(results_dir, "*.json"))):
        try:
            with open(p) as f:
                r = json.load(f)
        except (OSError, ValueError):
            continue
        if r.get("kind") != KIND:
            continue
        r["_path"] = p
        if best is None or (r.get("date", ""), p) > (best.get("date", ""), best["_path"]):
            best = r
    return best


def _worst(recs, **kw):
    vals = [r["est_pct_copy_bw"] for r in recs if all(r.get(k) == v for k, v in kw.items())
            and r["est_pct_copy_bw"] is not None]
    return min(vals) if vals else None


def _pct(v):
    return "-" if v is None else f"{v:.0f}%"


def _src(res):
    return os.path.relpath(res["_path"], REPO) if "_path" in res else "-"


def summary_markdown(res) -> str:
    """README's compact table: op x dtype x layout, the MODEL's estimated % of copy bandwidth."""
    if not res:
        return "No static model yet: run `python -m bench.sass`.\n"
    recs = res["records"]
    backends = [b for b in ("cuda", "triton") if any(r["backend"] == b for r in recs)]
    head = ["op", "mode", "backend"] + [f"{dt} {lay}" for dt, lay in COLS]
    rows = []
    for op, mode in SUMMARY_ROWS:
        for b in backends:
            rows.append([op, mode, b] + [_pct(_worst(recs, backend=b, op=op, mode=mode, dtype=dt,
                                                       layout=lay)) for dt, lay in COLS])
    return (f"Static performance MODEL of sm_90, not measured ({res['date']}): the estimated % "
            "of copy bandwidth each op would reach on an H100/H200 at DABNet's shapes at batch 8 "
            "(the lower of the two GPUs, and the lowest over the dilations and orientations), "
            "from the kernels' SASS and launch shapes; how it is computed and what it cannot see: "
            "[docs/sass-model.md](docs/sass-model.md).\n\n"
            + _md(head, rows) + f"\n\nSource: `{_src(res)}` (`python -m bench.sass`)\n")


def _md(head, rows):
    out = ["| " + " | ".join(head) + " |", "|" + "---|" * len(head)]
    out += ["| " + " | ".join(str(c) for c in r) + " |" for r in rows]
    return "\n".join(out)


def tables_markdown(res) -> str:
    """bench/README.md's fuller tables of the MODEL: per op row both GPUs and both backends, the
    targets it misses, then one row per kernel."""
    if not res:
        return "No static model yet: run `python -m bench.sass`.\n"
    recs = res["records"]
    g = res["gpus"]
    consts = "; ".join(f"{v['name']}: {v['sms']} SMs, {v['clock_ghz']} GHz, copy "
                       f"{v['copy_tbs']} TB/s (HBM {v['hbm_tbs']}), loaded latency "
                       f"{v['latency_ns']:.0f} ns" for v in g.values())
    tools = res.get("tools", {})
    parts = [f"Static performance MODEL of sm_90 ({res['date']}, commit {res.get('git_commit')}, "
             f"{res.get('nvcc_version')}, cuobjdump from "
             f"{tools.get('cuobjdump', {}).get('found_in')}, "
             f"torch {res.get('torch')}, triton {res.get('triton')}): estimates, not "
             f"measurements. Constants: {consts}. Method and limits: "
             "[../docs/sass-model.md](../docs/sass-model.md).\n"]
    keys = []
    for r in recs:
        k = (r["op"], r["mode"], r["dilation"] if r["op"] == "dab_neck" else None, r["dtype"],
             r["layout"])
        if k not in keys:
            keys.append(k)
    order = {op: i for i, op in enumerate(("dwconv3", "bn_prelu", "dwconv3_bn_prelu",
                                           "dab_neck"))}
    mode_order = {m: i for i, m in enumerate(("fwd", "train", "bwd", "fwd+bwd"))}
    keys.sort(key=lambda k: (order.get(k[0], 9), mode_order.get(k[1], 9), k[2] or 0,
                             [c[0] for c in COLS].index(k[3]) if k[3] in [c[0] for c in COLS]
                             else 9, k[4]))
    rows = []
    for op, mode, d, dt, lay in keys:
        sel = [r for r in recs if r["op"] == op and r["mode"] == mode and r["dtype"] == dt
               and r["layout"] == lay and (d is None or r["dilation"] == d)]
        cells = []
        for b in ("cuda", "triton"):
            bs = [r for r in sel if r["backend"] == b]
            for gg in ("h100", "h200"):
                v = [r[f"est_pct_copy_bw_{gg}"] for r in bs
                     if r[f"est_pct_copy_bw_{gg}"] is not None]
                cells.append(_pct(min(v)) if v else ("no estimate" if bs else "-"))
        missed = sorted({f"{r['backend']}: {t['target']}" for r in sel for t in r["targets"]
                         if not t["met"]})
        rows.append([op + (f" d{d}" if d else ""), mode, dt, lay] + cells
                    + ["; ".join(missed) if missed else "-"])
    parts.append("Estimated % of copy bandwidth per op (lowest over dilations and orientations; "
                 "mode fwd: inference, train: training forward (batch statistics, then apply), "
                 "bwd: backward, fwd+bwd: both; bytes counted: each input read once and each "
                 "output written once):\n\n" + _md(
                     ["op", "mode", "dtype", "layout", "CUDA H100", "CUDA H200", "Triton H100",
                      "Triton H200", "targets not met (model)"], rows) + "\n")
    kern = {}
    for r in recs:
        if r["dtype"] not in ("fp32", "bf16"):
            continue
        for k in r["launches"]:
            key = (r["backend"], k["kernel"], r["dtype"], r["layout"])
            if key in kern:
                continue
            kern[key] = [r["backend"], _short_kernel(k["kernel"]) + (
                f" [{k['config']}]" if k.get("config") else ""), r["dtype"], r["layout"],
                k["regs"], "yes" if k["spills"] else "no", k["widest_load"], k["widest_store"],
                k["instr_per_elem"] if k.get("instr_per_elem") is not None else "-",
                f"{k['blocks_per_sm']} ({k['occupancy_limiter']})",
                f"{k['bytes_in_flight_per_sm'] / 1024:.1f}" if k.get("bytes_in_flight_per_sm")
                is not None else "-", k["bound"]]
    need = " / ".join(f"{needed_in_flight_per_sm(v) / 1024:.0f} KB ({k})" for k, v in g.items())
    parts.append("Per kernel (fp32 and bf16; the first launch of each kernel on record: "
                 "instructions per element and bytes in flight depend a little on the shape). "
                 "Bytes in flight per SM that reach the copy bandwidth at the assumed latency: "
                 f"{need}.\n\n" + _md(
                     ["backend", "kernel", "dtype", "layout", "regs", "spills", "widest LDG",
                      "widest STG", "SASS instr / element", "blocks/SM (limit)",
                      "KB in flight / SM", "bound (H100)"], list(kern.values())) + "\n")
    parts.append(f"Source: `{_src(res)}`\n")
    return "\n".join(parts)


def _short_kernel(dem: str) -> str:
    s = re.sub(r"\(anonymous namespace\)::", "", dem)
    s = re.sub(r"dabnet::cuda::", "", s)
    s = re.sub(r"^void ", "", s)
    s = re.sub(r"c10::", "", s)
    depth, out = 0, ""
    for ch in s:  # drop the parameter list
        if ch == "(" and depth == 0 and out and not out.endswith(" "):
            break
        depth += ch == "<"
        depth -= ch == ">"
        out += ch
    return out.replace("|", "/")


def render_table(res, compact=True) -> str:
    """Markdown: op x mode x dtype x layout, the MODEL's est % of copy bandwidth per backend (the
    lowest over the dilations and orientations of that row)."""
    rows = summary_rows(res["records"])
    backends = sorted({r["backend"] for r in res["records"]})
    out = ["| op | mode | dtype | layout | " + " | ".join(f"{b} est % copy (model)"
                                                         for b in backends) + " |",
           "|" + "---|" * (4 + len(backends))]
    for (op, mode, dt, lay), v in sorted(rows.items()):
        out.append(f"| {op} | {mode} | {dt} | {lay} | "
                   + " | ".join(f"{v[b]:.0f}%" if b in v else "-" for b in backends) + " |")
    return "\n".join(out) + "\n"


if __name__ == "__main__":
    sys.exit(main())
