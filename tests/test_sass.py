"""bench.sass, the static performance MODEL of sm_90: its SASS reading, its arithmetic (occupancy,
Little's law, the launch model), its kernel matching, and one end-to-end compile when nvcc is here.
"""
import os
import shutil
import subprocess

import pytest

from bench import report, sass


def _sass(name, lines):
    """cuobjdump -sass text for one function from (address, instruction) pairs."""
    out = ["\tcode for sm_90", f"\t\tFunction : {name}",
           '\t.headerflags\t@"EF_CUDA_64BIT_ADDRESS EF_CUDA_SM90"']
    for addr, text in lines:
        out.append(f"        /*{addr:04x}*/                   {text} ;"
                   "                         /* 0x000000000000000000000000 */")
        out.append("                                                 /* 0x000000000000000 */")
    return "\n".join(out) + "\n"


def _prog(*instrs):
    return [(16 * k, t) for k, t in enumerate(instrs)]


# A grid-stride loop of two 128-bit loads of one pointer (c[0x0][0x210]) issued before either is
# used, one 128-bit store to another (0x218), a register spilled and reloaded around the loop.
VEC_LOOP = _prog(
    "LDC R1, c[0x0][0x28]",                        # 0x00
    "S2R R0, SR_TID.X",                            # 0x10
    "ULDC.64 UR4, c[0x0][0x208]",                  # 0x20
    "LDC.64 R2, c[0x0][0x210]",                    # 0x30
    "LDC.64 R8, c[0x0][0x218]",                    # 0x40
    "STL [R1], R0",                                # 0x50 (spill)
    "IMAD.WIDE R4, R0, 0x20, R2",                  # 0x60  loop start
    "LDG.E.128 R12, desc[UR4][R4.64]",             # 0x70
    "LDG.E.128 R16, desc[UR4][R4.64+0x10]",        # 0x80
    "IMAD.WIDE R6, R0, 0x20, R8",                  # 0x90
    "FADD R12, R12, R16",                          # 0xa0  first use of both loads
    "FADD R13, R13, R17",                          # 0xb0
    "FADD R14, R14, R18",                          # 0xc0
    "FADD R15, R15, R19",                          # 0xd0
    "STG.E.128 desc[UR4][R6.64], R12",             # 0xe0
    "IADD3 R0, R0, c[0x0][0x0], RZ",               # 0xf0
    "ISETP.GE.AND P0, PT, R0, c[0x0][0x220], PT",  # 0x100
    "@!P0 BRA 0x60",                               # 0x110 back edge
    "LDL R0, [R1]",                                # 0x120 (reload)
    "EXIT",                                        # 0x130
    "BRA 0x140",                                   # 0x140 padding
)

# One scalar load per iteration, used at once (a dependent chain): one load in flight.
SERIAL_LOOP = _prog(
    "ULDC.64 UR4, c[0x0][0x208]",
    "LDC.64 R2, c[0x0][0x210]",
    "IMAD.WIDE R4, R0, 0x4, R2",                   # 0x20 loop start
    "LDG.E R6, desc[UR4][R4.64]",
    "FADD R7, R7, R6",
    "IADD3 R0, R0, 0x100, RZ",
    "ISETP.GE.AND P0, PT, R0, c[0x0][0x220], PT",
    "@!P0 BRA 0x20",
    "EXIT",
)


def _kernel(prog, name="_Z1kPKfPfi", usage=None):
    funcs = sass.parse_sass(_sass(name, prog))
    return sass.analyze_function(name, funcs[name], usage or {"REG": 24})


def test_parser_reads_instructions_predicates_and_operands():
    funcs = sass.parse_sass(_sass("_Z1kv", VEC_LOOP))
    ins = funcs["_Z1kv"]
    assert len(ins) == len(VEC_LOOP)
    ldg = ins[7]
    assert (ldg.base, ldg.mods, ldg.operands) == ("LDG", ["E", "128"],
                                                   ["R12", "desc[UR4][R4.64]"])
    assert sass.dest_regs(ldg) == ["R12", "R13", "R14", "R15"]
    assert sass.address_regs(ldg) == ["R4", "R5"]
    bra = ins[17]
    assert (bra.pred, bra.base, bra.operands) == ("@!P0", "BRA", ["0x60"])
    assert [sass.mem_width(i) for i in (ins[7], ins[14])] == [16, 16]
    assert sass.find_loops(ins) == [(0x60, 0x110)]  # BRA to itself (padding) is no loop


def test_vectorized_loop_phase_widths_streams_and_loads_in_flight():
    k = _kernel(VEC_LOOP)
    (p,) = k.phases
    assert p.kind == "output" and (p.start, p.end) == (0x60, 0x110)
    assert p.ldg == [16, 16] and p.stg == [16]
    assert p.instrs == 12
    assert p.streams == 1  # both loads read the pointer at c[0x0][0x210]
    assert (p.inflight_bytes, p.inflight_loads) == (32, 2)
    assert (k.widest_load, k.widest_store) == (16, 16)
    assert k.spill_instrs == 2 and k.regs == 24
    # One path outside the loop: 6 before it, the reload and the EXIT after it.
    assert k.overhead_instrs == 8


def test_dependent_loads_keep_one_in_flight():
    (p,) = _kernel(SERIAL_LOOP).phases
    assert p.kind == "reduce" and (p.inflight_bytes, p.inflight_loads) == (4, 1)


def test_two_pointers_are_two_streams_and_strides_are_not_pointers():
    prog = _prog(
        "ULDC.64 UR4, c[0x0][0x208]",
        "LDC.64 R2, c[0x0][0x210]",                # x
        "LDC.64 R8, c[0x0][0x218]",                # g
        "IMAD.WIDE.U32 R10, R0, c[0x0][0x230], RZ",  # index * stride (an int64 parameter)
        "IADD3 R4, P0, R2, R10, RZ",               # 0x40 loop start
        "IADD3.X R5, R3, R11, RZ, P0, !PT",
        "IADD3 R6, P1, R8, R10, RZ",
        "IADD3.X R7, R9, R11, RZ, P1, !PT",
        "LDG.E R12, desc[UR4][R4.64]",
        "LDG.E R13, desc[UR4][R6.64]",
        "FFMA R14, R12, R13, R14",
        "ISETP.GE.AND P2, PT, R0, c[0x0][0x220], PT",
        "@!P2 BRA 0x40",
        "EXIT",
    )
    (p,) = _kernel(prog).phases
    assert p.streams == 2 and (p.inflight_bytes, p.inflight_loads) == (8, 2)
    funcs = sass.parse_sass(_sass("k", prog))
    ins = funcs["k"]
    assert sass.pointer_params(ins, 8, exclude=sass.multiplied_params(ins)) == {0x210}
    assert sass.pointer_params(ins, 9, exclude=sass.multiplied_params(ins)) == {0x218}


def test_res_usage_parser():
    text = (" Common:\n  GLOBAL:0\n Function _Z1kPKfPfi:\n  REG:40 STACK:16 SHARED:4096 LOCAL:8 "
            "CONSTANT[0]:560 TEXTURE:0 SURFACE:0 SAMPLER:0\n")
    u = sass.parse_res_usage(text)["_Z1kPKfPfi"]
    assert (u["REG"], u["STACK"], u["SHARED"], u["LOCAL"]) == (40, 16, 4096, 8)


@pytest.mark.parametrize("regs, threads, smem, blocks, limiter", [
    (40, 256, 0, 6, "registers"),      # 40 regs -> 1280 per warp, 8 warps -> 10240 per block
    (32, 256, 0, 8, "threads"),        # 2048 threads per SM
    (16, 32, 0, 32, "blocks"),         # 32 blocks per SM
    (255, 256, 0, 1, "registers"),     # 255 -> 256 per thread: one block of 8 warps fills 65536
    (32, 128, 100 * 1024, 2, "shared memory"),  # 228 KB / (100 KB + 1 KB reserved)
    (32, 256, 228 * 1024, 0, "launch limits"),  # above the 227 KB opt-in maximum
])
def test_occupancy_limits(regs, threads, smem, blocks, limiter):
    occ = sass.occupancy(regs, threads, smem)
    assert occ["blocks_per_sm"] == blocks and occ["limiter"] == limiter
    assert occ["threads_per_sm"] == blocks * threads


def test_littles_law():
    gpu = dict(sms=100, latency_ns=1000.0, copy_tbs=2.0, clock_ghz=2.0)
    # 20 KB in flight on each of 100 SMs for 1 us: 2 GB per ms = 2 TB/s.
    assert sass.littles_law_bw(20e3, gpu) == pytest.approx(2.0e12)
    assert sass.needed_in_flight_per_sm(gpu) == pytest.approx(20e3)
    h100 = sass.GPUS["H100"]
    assert 15e3 < sass.needed_in_flight_per_sm(h100) < 21e3  # issue 16: ~18 KB on an H100


def test_launch_model_bounds():
    """Latency bound by Little's law, DRAM bound by bytes over copy bandwidth, issue bound by
    warp instructions over 4 per clock per SM, and the time is the largest."""
    gpu = dict(name="test", sms=100, clock_ghz=1.0, copy_tbs=1.0, latency_ns=1000.0)
    k = _kernel(SERIAL_LOOP, usage={"REG": 32})
    n, esize = 2 ** 24, 4
    ln = sass.Launch("cuda", "k", (256, 1, 1), (256, 1, 1), 0)
    m = sass.model_launch(k, ln, n, esize, C=64, gpu=gpu, max_streams=1)
    # 256 blocks over 100 SMs: 3 resident (of 8 allowed), 768 threads, one element each in flight.
    assert m["resident_threads_per_sm"] == 768
    lat = n / (100 * 768 * 1 / 1e-6)
    assert m["times_us"]["latency (loads in flight)"] == pytest.approx(lat * 1e6, rel=1e-3)
    assert m["times_us"]["DRAM bandwidth"] == pytest.approx(n * esize / 1e12 * 1e6, rel=1e-3)
    e_iter = 1.0
    issue = (6 * n / e_iter / 32 + k.overhead_instrs * 256 * 256 / 32) / (100 * 4 * 1e9)
    assert m["times_us"]["issue"] == pytest.approx(issue * 1e6, rel=1e-2)
    assert m["bound"] == "latency (loads in flight)" and m["time_s"] == pytest.approx(lat)
    # Eight times the threads resident (a grid that fills the SMs): eight times the rate.
    ln8 = sass.Launch("cuda", "k", (800, 1, 1), (256, 1, 1), 0)
    m8 = sass.model_launch(k, ln8, n, esize, C=64, gpu=gpu, max_streams=1)
    assert m8["resident_threads_per_sm"] == 2048
    assert m8["times_us"]["latency (loads in flight)"] == pytest.approx(
        m["times_us"]["latency (loads in flight)"] * 768 / 2048, rel=1e-3)
    # A launch that gives each thread thousands of elements reads per-channel partials.
    tiny = sass.Launch("cuda", "k", (1, 1, 1), (32, 1, 1), 0)
    mt = sass.model_launch(k, tiny, n, esize, C=64, gpu=gpu,
                           prev=dict(blocks=64 * 32, channels_per_block=1, threads=1 << 20,
                                     reduce=True))
    assert mt["role"] == "partials" and mt["serial_rounds"] == 32
    assert mt["time_s"] == pytest.approx(33 * 1e-6)


# Loop-free: four scalar loads of one pointer, all issued before the first add, one store.
FOUR_LOADS = _prog(
    "ULDC.64 UR4, c[0x0][0x208]",
    "LDC.64 R2, c[0x0][0x210]",
    "LDG.E R4, desc[UR4][R2.64]",
    "LDG.E R5, desc[UR4][R2.64+0x400]",
    "LDG.E R6, desc[UR4][R2.64+0x800]",
    "LDG.E R7, desc[UR4][R2.64+0xc00]",
    "FADD R4, R4, R5",
    "FADD R6, R6, R7",
    "FADD R4, R4, R6",
    "STG.E desc[UR4][R2.64], R4",
    "EXIT",
)


def test_a_loop_free_kernel_that_loads_less_than_its_share_reads_partials():
    """A loop-free kernel with 4 elements' loads per thread: a stream when a thread's share of the
    tensor is 4 elements, per-channel partials (one round when every partial has a lane) when the
    share is larger, however many threads it has next to the reduction before it."""
    gpu = dict(name="test", sms=100, clock_ghz=1.0, copy_tbs=1.0, latency_ns=1000.0)
    k = _kernel(FOUR_LOADS)
    assert k.loop_free and k.phases[0].ldg == [4, 4, 4, 4]
    n, C = 2 ** 22, 64
    prev = dict(blocks=512, channels_per_block=1, threads=512 * 256, reduce=True)
    stream = sass.Launch("cuda", "k", (n // 4 // 256, 1, 1), (256, 1, 1), 0)
    assert sass.model_launch(k, stream, n, 4, C=C, gpu=gpu, prev=prev)["role"] == "stream"
    # One block of 256 threads per channel: 1/8 of the reduction's threads, 256 elements each.
    finish = sass.Launch("cuda", "k", (C, 1, 1), (256, 1, 1), 0)
    m = sass.model_launch(k, finish, n, 4, C=C, gpu=gpu, prev=prev)
    assert m["role"] == "partials" and m["serial_rounds"] == 1
    assert m["time_s"] == pytest.approx(2 * 1e-6)


def test_staging_phase_counts_halo_elements():
    """A tile kernel that stages (global -> shared) before computing: the staged elements per
    output come from the launch's dynamic shared memory and grid, as the NeckTile halo does."""
    prog = _prog(
        "ULDC.64 UR4, c[0x0][0x208]",
        "LDC.64 R2, c[0x0][0x210]",
        "LDC.64 R8, c[0x0][0x218]",
        "IMAD.WIDE R4, R0, 0x4, R2",              # 0x30 staging loop
        "LDG.E R6, desc[UR4][R4.64]",
        "STS [R10], R6",
        "ISETP.GE.AND P0, PT, R0, c[0x0][0x220], PT",
        "@!P0 BRA 0x30",
        "BAR.SYNC.DEFER_BLOCKING 0x0",
        "LDS R7, [R10]",                          # 0x90 output loop
        "IMAD.WIDE R4, R0, 0x4, R8",
        "STG.E desc[UR4][R4.64], R7",
        "ISETP.GE.AND P1, PT, R0, c[0x0][0x224], PT",
        "@!P1 BRA 0x90",
        "EXIT",
    )
    k = _kernel(prog)
    assert [p.kind for p in k.phases] == ["stage", "output"]
    gpu = sass.GPUS["H100"]
    n = 64 * 1024 * 4
    # 1024 outputs per block staged from (16 + 2*2) x (64 + 2*2) = 1360 elements (dilation 2).
    ln = sass.Launch("cuda", "k", (n // 1024, 1, 1), (256, 1, 1), 1360 * 4)
    m = sass.model_launch(k, ln, n, 4, C=64, gpu=gpu)
    assert m["staged_per_output"] == pytest.approx(1360 / 1024, rel=1e-2)


def test_cuda_kernel_matching_by_template_arguments():
    def ks(dem):
        return sass.KernelSass(dem, dem, 32, 0, 0, 0, 10, 0, 4, 4, 0)

    kernels = {
        "a": ks("void dabnet::cuda::reduce_kernel<dabnet::cuda::Welford, dabnet::cuda::"
                "(anonymous namespace)::StatsOp<float> >(dabnet::cuda::(anonymous namespace)::"
                "StatsOp<float>, dabnet::cuda::Geo)"),
        "b": ks("void dabnet::cuda::finish_kernel<dabnet::cuda::Welford, float, dabnet::cuda::"
                "(anonymous namespace)::StoreMeanVar<float> >(int)"),
        "c": ks("void dabnet::cuda::reduce_kernel<dabnet::cuda::Welford, dabnet::cuda::"
                "(anonymous namespace)::StatsOp<c10::Half> >(int)"),
        "d": ks("void dabnet::cuda::(anonymous namespace)::neck_tile_kernel<float, dabnet::cuda::"
                "NeckTile<1, 16, 64> >(float const*)"),
    }
    enc = ("void dabnet::cuda::launch_reduce<dabnet::cuda::Welford, dabnet::cuda::(anonymous "
           "namespace)::StatsOp<float>, dabnet::cuda::(anonymous namespace)::StoreMeanVar<float> >"
           "(int)::{lambda()#1}")
    assert sass.match_cuda_kernel("reduce_kernel", enc, kernels) == "a"
    assert sass.match_cuda_kernel("finish_kernel", enc, kernels) == "b"
    tile = ("bool dabnet::cuda::(anonymous namespace)::launch_tile<float, dabnet::cuda::"
            "NeckTile<1, 16, 64> >(float const*)::{lambda()#1}")
    assert sass.match_cuda_kernel("kernel", tile, kernels) == "d"
    with pytest.raises(LookupError):
        sass.match_cuda_kernel("map_kernel", "void f<double>()", kernels)


def _rec(backend, op, mode, dtype, pct, layout="nchw", dilation=2):
    return dict(backend=backend, op=op, mode=mode, dtype=dtype, layout=layout, dilation=dilation,
                orient="3x1", shape=[8, 32, 128, 256], est_pct_copy_bw=pct,
                est_pct_copy_bw_h100=pct, est_pct_copy_bw_h200=pct, launches=[], targets=[])


def test_targets_met_and_not_met():
    recs = [_rec("cuda", "dwconv3", "fwd", "fp32", 85.0), _rec("cuda", "dwconv3", "fwd", "bf16",
                                                              40.0),
            _rec("triton", "dwconv3", "fwd", "fp32", 70.0),
            _rec("cuda", "bn_prelu", "bwd", "fp32", 10.0)]
    by = {sass._rkey(r): r for r in recs}
    got = [[(t["target"], t["met"]) for t in sass._targets(r, by)] for r in recs]
    assert got[0] == [("dwconv3 forward >= 80% of copy bandwidth", True)]
    assert got[1] == [("dwconv3 forward >= 80% of copy bandwidth", False)]
    assert got[2] == [("dwconv3 forward >= 80% of copy bandwidth", False),
                      ("Triton within 15% of CUDA", False)]  # 70 < 0.85 * 85
    assert got[3] == []


def test_render_labels_the_model_and_latest_skips_other_files(tmp_path):
    res = dict(kind=sass.KIND, date="2026-12-03 17:00 UTC", gpus=sass.GPUS, tools={},
               records=[_rec("cuda", "dwconv3", "fwd", "fp32", 33.4),
                        _rec("cuda", "dwconv3", "fwd", "fp32", 41.0, dilation=4),
                        _rec("triton", "dab_neck", "fwd", "bf16", 12.0, layout="cl")])
    text = sass.summary_markdown(res)
    assert "MODEL" in text and "not measured" in text
    row = next(ln for ln in text.splitlines() if ln.startswith("| dwconv3 | fwd | cuda"))
    assert row.split(" | ")[3] == "33%"  # the lowest over the dilations
    full = sass.tables_markdown(res)
    assert "MODEL" in full and "dab_neck d2" in full
    (tmp_path / "a.json").write_text('{"kind": "malloc_ab", "date": "2026-12-09"}')
    import json

    (tmp_path / "b.json").write_text(json.dumps(res))
    assert sass.latest_static(str(tmp_path))["date"] == res["date"]
    assert report.latest(str(tmp_path)) == []  # the model is never a bench.run file


KERNEL = r"""
__global__ void __launch_bounds__(256) scale(const float4* __restrict__ x, float4* __restrict__ y,
                                             int n) {
  for (int i = blockIdx.x * blockDim.x + threadIdx.x; i < n; i += gridDim.x * blockDim.x) {
    float4 v = x[i];
    v.x *= 2.f; v.y *= 2.f; v.z *= 2.f; v.w *= 2.f;
    y[i] = v;
  }
}
"""


@pytest.mark.skipif(sass.find_tool("nvcc")[0] is None or sass.find_tool("cuobjdump")[0] is None,
                    reason="needs nvcc and cuobjdump (CUDA toolkit or triton's copy)")
def test_end_to_end_compile_of_a_small_kernel(tmp_path):
    nvcc, _ = sass.find_tool("nvcc")
    src = tmp_path / "k.cu"
    src.write_text(KERNEL)
    cubin = tmp_path / "k.cubin"
    subprocess.run([nvcc, "-cubin", "-arch=sm_90", "-O3", str(src), "-o", str(cubin)],
                   check=True, capture_output=True)
    (ks,) = sass.read_cubin(str(cubin)).values()
    assert ks.demangled.startswith("scale(") or "scale" in ks.demangled
    assert 0 < ks.regs <= 64 and ks.stack == 0 and ks.spill_instrs == 0
    assert (ks.widest_load, ks.widest_store) == (16, 16)
    out = [p for p in ks.phases if p.stg]
    assert out and out[0].streams == 1 and out[0].inflight_bytes >= 16
    ln = sass.Launch("cuda", "scale", (132 * 8, 1, 1), (256, 1, 1), 0)
    m = sass.model_launch(ks, ln, 1 << 26, 4, C=1, gpu=sass.GPUS["H100"])
    assert m["role"] == "stream" and m["widest_load"] == ".128" and m["time_s"] > 0


def test_the_tool_is_found_and_named():
    path, where = sass.find_tool("cuobjdump")
    if path is None:
        pytest.skip("no cuobjdump here")
    assert os.path.isfile(path) and where
    assert shutil.which("c++filt") is None or sass.demangle("_Z1fv") == "f()"


def test_emulation_records_launches_without_running_them():
    """Record-only mode of tests/cuda_emu, through which bench.sass reads each op's launch shapes
    from the host code: the launch is logged (site, grid, block, shared memory, the launching
    host function) and not executed, so the output keeps its NaN poison; off again, it computes."""
    import sys

    import torch

    sys.path.insert(0, os.path.join(os.path.dirname(__file__)))
    from cuda_emu import build

    try:
        ns = build.load()
    except Exception as e:  # no compiler here: test_cuda_emu reports the build itself
        pytest.skip(f"the CUDA emulation does not build here: {e}")
    x = torch.randn(2, 3, 5, 7)
    w = torch.randn(3, 1, 3, 1)
    emu = torch.ops.dabnet_cuemu
    emu.launch_log(True)
    emu.set_record_only(True)
    try:
        y = ns.dwconv3(x, w, 2)
    finally:
        emu.set_record_only(False)
    (rec,) = emu.launch_log(True)
    site, grid, block, smem, what = rec.split("|", 4)
    assert site.startswith("csrc/cuda/") and int(smem) >= 0
    assert all(int(v) > 0 for v in grid.split(",") + block.split(","))
    # The launching host function, demangled: a float instance of the map launcher (not a
    # functor's name, which kernel rewrites change).
    host = sass.demangle("_Z" + what)
    assert "launch_map" in host and "float" in host and "double" not in host, host
    assert torch.isnan(y).all()
    from dabnet_kernels import reference

    torch.testing.assert_close(ns.dwconv3(x, w, 2), reference.dwconv3(x, w, 2))
    assert emu.launch_log(True) == []


def test_a_launch_without_a_kernel_gives_no_estimate_not_a_crash():
    """A redesigned launch that the model cannot tie to a kernel: the record says so."""
    from bench import cases as C

    case = C.OpCase("dwconv3", "fwd", (512, 1024), 1, 8, 2, "3x1", "fp32", "nchw")
    k = _kernel(VEC_LOOP)
    ok = sass.Launch("cuda", "k", (256, 1, 1), (256, 1, 1), 0)
    lost = sass.Launch("cuda", "", (256, 1, 1), (256, 1, 1), 0, note="no sm_90 kernel matched")
    recs = sass.build_records({"cuda": {(case, "fwd"): [ok]}}, {"k": k})
    assert recs[0]["est_pct_copy_bw"] > 0 and recs[0]["launches"][0]["regs"] == 24
    (rec,) = sass.build_records({"cuda": {(case, "fwd"): [ok, lost]}}, {"k": k})
    assert rec["est_pct_copy_bw"] is None and "model_error" in rec
    assert rec["targets"] == [dict(target="dwconv3 forward >= 80% of copy bandwidth", met=False)]
    res = dict(kind=sass.KIND, date="d", gpus=sass.GPUS, tools={}, records=[rec])
    assert "no estimate" in sass.tables_markdown(res)
    assert "| dwconv3 | fwd | cuda | - |" in sass.summary_markdown(res)


def test_triton_configs_register_cap_reaches_the_compile():
    """A triton.Config's maxnreg (the Triton neck caps 4 elements per thread at 128 registers) is
    among the options each config is compiled with, for the model (_triton_variants) and for
    compile_check (config_options); configs without one get none."""
    triton = pytest.importorskip("triton")
    from triton.runtime.jit import JITFunction

    from dabnet_kernels.triton import compile_check, dab_neck as dn

    assert 128 in [compile_check.config_options(c).get("maxnreg") for c in dn.CONFIGS]

    def kernel(x_ptr, BLOCK: triton.language.constexpr):
        pass

    class Tuned:  # what the model finds under an autotuned launch
        configs = [triton.Config({"BLOCK": 4}, num_warps=2, maxnreg=64),
                   triton.Config({"BLOCK": 8}, num_warps=4)]
        fn = JITFunction(kernel)

    kws = [kw for kw, _, _, _ in sass._triton_variants("autotune", Tuned, (None,), {"grid": None})]
    assert [(kw["BLOCK"], kw["num_warps"], kw.get("maxnreg")) for kw in kws] == [(4, 2, 64),
                                                                                (8, 4, None)]
    assert [compile_check.config_options(c) for c in Tuned.configs] == [{"maxnreg": 64}, {}]
