"""DABNet end to end: inference at the paper's Table 5 resolutions and one training step,
fused (dabnet.DABNet(fused=True)) against the plain model (eager, channels_last, torch.compile,
CUDA graphs on GPU).

Whether a "fused" model really runs dabnet kernels is not taken on trust: one forward is traced
with a dispatch mode that counts the dabnet:: / dabnet_triton:: op calls, and the count is stored
with the numbers (0 means the model ran plain PyTorch ops only, and is labelled so).
"""
from __future__ import annotations

import functools
import gc
import time
from collections import Counter

import torch
import torch.nn.functional as F
from torch.utils._python_dispatch import TorchDispatchMode

from .progress import progress_bar
from .timing import (ROUND_ORDER, Budget, Stats, first_call_s, paired_speedup, quantiles,
                     round_order, time_fn)

# DABNet's row of the paper's Table 5 (GTX 1080Ti, batch 1), for context in the report.
PAPER_TABLE5_MS = {"256x512": 6, "512x1024": 10, "1024x2048": 36}
RESOLUTIONS = ((256, 512), (512, 1024), (1024, 2048))
CLASSES = 19


class _KernelCounter(TorchDispatchMode):
    """Counts the dabnet ops that reach the dispatcher during a forward."""

    def __init__(self):
        super().__init__()
        self.counts = Counter()

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        if getattr(func, "namespace", "") in ("dabnet", "dabnet_triton"):
            self.counts[str(func.overloadpacket)] += 1
        return func(*args, **(kwargs or {}))


def dabnet_kernel_calls(model, x) -> dict:
    counter = _KernelCounter()
    with torch.no_grad(), counter:
        model(x)
    return dict(counter.counts)




def build(fused: bool, device: str, dtype=torch.float32, layout="nchw", state=None):
    """DABNet(classes=19, fused=...) with the given weights, on device, in eval mode."""
    from dabnet import DABNet

    torch.manual_seed(0)
    m = DABNet(classes=CLASSES, fused=fused)
    if state is not None:
        m.load_state_dict(state)
    m = m.to(device=device, dtype=dtype).eval()
    if layout == "cl":
        m = m.to(memory_format=torch.channels_last)
    return m


def _image(res, batch, device, dtype, layout, seed=0):
    g = torch.Generator().manual_seed(seed)
    x = torch.rand(batch, 3, *res, generator=g).to(device=device, dtype=dtype)
    return x.contiguous(memory_format=torch.channels_last) if layout == "cl" else x


def _cuda_graph(model, x):
    """model(x) captured in a CUDA graph on a static input; returns the replay function."""
    static_x = x.clone()
    s = torch.cuda.Stream()
    s.wait_stream(torch.cuda.current_stream())
    with torch.cuda.stream(s), torch.no_grad():
        for _ in range(3):  # warm-up outside the capture (allocations, autotuning, lazy init)
            model(static_x)
    torch.cuda.current_stream().wait_stream(s)
    g = torch.cuda.CUDAGraph()
    with torch.cuda.graph(g), torch.no_grad():
        static_y = model(static_x)
    return g.replay, static_y


DTYPES = {"fp32": torch.float32, "bf16": torch.bfloat16}


def inference_variants(device: str, with_compile: bool):
    """(name, fused, layout, how, dtype) for every inference variant this device runs. bfloat16
    runs the whole model in bf16 (our kernels accumulate in fp32), fused and not, in the faster
    layout of each device: on CPUs with AVX512_BF16 or AMX, oneDNN's bf16 convolutions do twice
    the fp32 MACs per cycle."""
    v = [("eager", False, "nchw", "eager", "fp32"), ("eager-cl", False, "cl", "eager", "fp32"),
         ("fused", True, "nchw", "eager", "fp32"), ("fused-cl", True, "cl", "eager", "fp32")]
    layout = "nchw" if device == "cuda" else "cl"
    sfx = "" if device == "cuda" else "-cl"
    v += [(f"eager{sfx}-bf16", False, layout, "eager", "bf16"),
          (f"fused{sfx}-bf16", True, layout, "eager", "bf16")]
    if device == "cuda":
        v += [("eager+cudagraph", False, "nchw", "cudagraph", "fp32"),
              ("fused+cudagraph", True, "nchw", "cudagraph", "fp32")]
    else:  # the fused model frozen for inference (dabnet.freeze): CPU only
        v += [("frozen-cl", True, "cl", "frozen", "fp32"),
              ("frozen-cl-bf16", True, "cl", "frozen", "bf16")]
    if with_compile:
        v += [("compile", False, "nchw", "compile", "fp32")]
        if device != "cuda":  # channels_last is the faster CPU layout: compile that one too
            v += [("compile-cl", False, "cl", "compile", "fp32")]
        v += [("fused+compile", True, "nchw", "compile", "fp32"),
              (f"compile{sfx}-bf16", False, layout, "compile", "bf16")]
        if device == "cuda":
            v += [("compile+cudagraphs", False, "nchw", "reduce-overhead", "fp32")]
    return v


PLAIN_HOWS = ("eager", "cudagraph", "frozen")  # the ways to run a model without torch.compile


def _error(e):
    return f"{type(e).__name__}: {str(e).splitlines()[0] if str(e) else ''}"[:300]


def _callable(model, x, how, device):
    """(fn, first output, compile seconds or None): model(x) run the way `how` says (eager, a
    CUDA graph replay, the frozen model, the dense convolutions alone, or torch.compile with
    that mode), called once."""
    if how == "eager":
        fn = lambda: model(x)  # noqa: E731
        return fn, fn(), None
    if how == "frozen":
        from dabnet import freeze

        frozen = freeze(model, x.dtype, channels_last=not x.is_contiguous())
        fn = lambda: frozen(x)  # noqa: E731
        return fn, fn(), None
    if how in FLOOR_KEYS:
        return floor_fn(dense_convs(model, x), packed=how == "floor-packed"), None, None
    if how == "cudagraph":
        fn, y = _cuda_graph(model, x)
        fn()
        return fn, y, None
    cm = torch.compile(model, mode=None if how == "compile" else how)
    if how == "reduce-overhead":
        def fn():
            torch.compiler.cudagraph_mark_step_begin()
            return cm(x)
    else:
        fn = lambda: cm(x)  # noqa: E731
    compile_s = first_call_s(fn, device)
    return fn, fn(), compile_s


def _bench_state():
    """The weights every benchmarked model loads: the model's, BatchNorm statistics randomized."""
    state = build(False, "cpu").state_dict()
    _randomize_bn_state(state)
    return state


def bench_inference(device: str, resolutions, compile_resolutions, budget: Budget,
                    progress=True, which="all", deadline=None, on_result=None) -> list:
    """Inference variants at each resolution (which: "all", "plain" = no torch.compile, or
    "compile" = the torch.compile variants only). No run starts after `deadline`."""
    state = _bench_state()
    jobs = [(res, v) for res in resolutions
            for v in inference_variants(device, res in compile_resolutions)
            if which == "all" or (v[3] in PLAIN_HOWS) == (which == "plain")]
    out, ref = [], {}
    if which == "compile":  # the eager outputs the compiled ones are compared with
        jobs = [(res, ("eager", False, "nchw", "eager-ref", "fp32")) for res in
                dict.fromkeys(r for r, _ in jobs)] + jobs
    bar = progress_bar(progress, jobs, desc=f"DABNet inference on {device}", unit="run")
    for res, (name, fused, layout, how, dt) in bar:
        if deadline is not None and time.time() > deadline:
            break
        bar.set_postfix_str(f"{res[0]}x{res[1]} {name}", refresh=False)
        dtype = DTYPES[dt]
        rec = {"res": list(res), "batch": 1, "dtype": dt, "variant": name, "fused": fused,
               "layout": layout, "how": how, "paper_1080ti_ms": PAPER_TABLE5_MS.get(
                   f"{res[0]}x{res[1]}")}
        ref_only = how == "eager-ref"
        try:
            model = build(fused, device, dtype, layout, state)
            rec["model_fused_attr"] = getattr(model, "fused", None)
            x = _image(res, 1, device, dtype, layout)
            how = "eager" if ref_only else how  # eager-ref: only the compiled runs' baseline
            rec["how"] = how
            if how in ("eager", "cudagraph"):
                rec["dabnet_kernel_calls"] = dabnet_kernel_calls(model, x)
            if how not in PLAIN_HOWS:
                torch._dynamo.reset()  # compile_s: a compile from scratch
            with torch.no_grad():
                fn, y, compile_s = _callable(model, x, how, device)
                if how == "frozen":
                    rec["dabnet_kernel_calls"] = dabnet_kernel_calls(lambda _: fn(), x)
                if compile_s is not None:
                    rec["compile_s"] = compile_s
                y = y.float().clone()
                if name == "eager":
                    ref[res] = (y, y.argmax(1))
                if res in ref and name != "eager":
                    rec["max_abs_diff_vs_eager"] = (y - ref[res][0]).abs().max().item()
                    # What a lower precision changes where it matters: the predicted labels.
                    rec["label_agreement_vs_eager"] = (
                        (y.argmax(1) == ref[res][1]).double().mean().item())
                st = time_fn(fn, device, budget)
            rec.update(st.as_dict())
            rec["fps"] = 1e3 / st.median_ms
        except Exception as e:  # recorded and reported, the run goes on
            rec["error"] = _error(e)
        if ref_only:
            rec["reference_only"] = True
        out.append(rec)
        if on_result and not ref_only:
            on_result(rec)
        model = None
        gc.collect()
        if device == "cuda":
            torch.cuda.empty_cache()
    eager = {tuple(r["res"]): r.get("median_ms") for r in out if r["variant"] == "eager"}
    for r in out:
        e = eager.get(tuple(r["res"]))
        if e and r.get("median_ms"):
            # Against the eager time of the same pass (the compiled runs time their own).
            r["speedup_vs_eager"] = e / r["median_ms"]
            r["eager_ms_same_pass"] = e
    return [r for r in out if not r.get("reference_only")]


BASELINES_FP32 = ("eager", "eager-cl", "compile", "compile-cl")  # plain PyTorch, fp32


def floor_variants(device: str):
    """The dense convolutions alone (dense_convs: what no fusion of the other ops can go below),
    as variants of the interleaved rounds, fp32 and bf16, in the faster layout of each device:
    through F.conv2d as the models call them; on CPU also on weights reordered once into
    oneDNN's layout, as the frozen model calls them (its convolutions' own floor)."""
    layout = "nchw" if device == "cuda" else "cl"
    sfx = "" if device == "cuda" else "-cl"
    v = [(f"floor{sfx}", False, layout, "floor", "fp32"),
         (f"floor{sfx}-bf16", False, layout, "floor", "bf16")]
    if device != "cuda":
        v += [("floor-cl-packed", False, layout, "floor-packed", "fp32"),
              ("floor-cl-packed-bf16", False, layout, "floor-packed", "bf16")]
    return v


FLOOR_KEYS = {"floor": "over_floor", "floor-packed": "over_packed_floor"}  # how -> ratio's key


# The variants of issue 17's targets: the fp32 plain baselines, the fused and frozen models in
# fp32 and bf16, and the floors (bench.run --only interleaved).
TARGET_VARIANTS = ("eager", "eager-cl", "compile", "compile-cl", "eager-cl-bf16", "fused-cl",
                   "fused-cl-bf16", "frozen-cl", "frozen-cl-bf16", "floor-cl", "floor-cl-bf16",
                   "floor-cl-packed", "floor-cl-packed-bf16")


def bench_interleaved(device: str, res, budget: Budget, with_compile=True, progress=True,
                      deadline=None, min_rounds: int = 7, names=None) -> list:
    """Every inference variant at one resolution, timed in rounds: each round calls each variant
    once, in an order shuffled from round to round (round_order), so that a machine that speeds
    up or slows down during the run (shared VMs: 20-40% within minutes) moves every variant
    alike. Per variant: median / quartiles / min of its per-call times, and its speedup over the
    fp32 plain-PyTorch baseline with the lowest median, as the median over rounds of the ratio
    of the two calls in the same round; and its time over the dense-convolution floor of its
    dtype (a row of the same rounds), the same way. Rounds go on for 10x budget.cpu_min_run_s
    (CPU) or 10x budget.gpu_rep_ms (GPU) per variant, and at least `min_rounds`. names: the
    variants to run (default all)."""
    state = _bench_state()
    variants = inference_variants(device, with_compile) + floor_variants(device)
    if names is not None:
        variants = [v for v in variants if v[0] in names]
    fns, out = {}, {}
    if with_compile:
        torch._dynamo.reset()
    for name, fused, layout, how, dt in progress_bar(
            progress, variants, desc=f"interleaved {res[0]}x{res[1]}: build"):
        rec = {"res": list(res), "batch": 1, "dtype": dt, "variant": name, "fused": fused,
               "layout": layout, "how": how}
        out[name] = rec
        if deadline is not None and time.time() > deadline:
            rec["error"] = "skipped: time limit"
            continue
        try:
            model = build(fused, device, DTYPES[dt], layout, state)
            x = _image(res, 1, device, DTYPES[dt], layout)
            with torch.no_grad():
                fn, _, _ = _callable(model, x, how, device)
                fn()  # warm
            fns[name] = fn
        except Exception as e:  # recorded, the others go on
            rec["error"] = _error(e)
    names = list(fns)
    per_variant = (budget.cpu_min_run_s if device != "cuda" else budget.gpu_rep_ms / 1e3) * 10
    times = {n: [] for n in names}
    sync = torch.cuda.synchronize if device == "cuda" else (lambda: None)
    t_end = time.perf_counter() + per_variant * len(names)
    rounds = 0
    bar = progress_bar(progress, None, desc=f"interleaved {res[0]}x{res[1]}: rounds", unit="round")
    with torch.no_grad():
        while names and (rounds < min_rounds or time.perf_counter() < t_end):
            if rounds >= min_rounds and deadline is not None and time.time() > deadline:
                break
            for n in round_order(names, rounds):
                sync()
                t0 = time.perf_counter()
                fns[n]()
                sync()
                times[n].append((time.perf_counter() - t0) * 1e3)
            rounds += 1
            bar.update()
    bar.close()
    fns.clear()
    gc.collect()
    for n in names:
        q25, med, q75 = quantiles(times[n])
        timer = "interleaved rounds (perf_counter" + (
            ", cuda synchronize)" if device == "cuda" else ")")
        out[n].update(Stats(med, q25, q75, len(times[n]), timer).as_dict(),
                      min_ms=min(times[n]), rounds=rounds, order=ROUND_ORDER)
    base = [n for n in names if n in BASELINES_FP32]
    if base:
        best = min(base, key=lambda n: out[n]["median_ms"])
        for n in names:
            out[n]["baseline"] = best
            out[n]["speedup_vs_baseline"] = paired_speedup(times[best], times[n])
    floors = {(how, dt): name for name, _, _, how, dt in variants
              if how in FLOOR_KEYS and name in times}
    for n in names:
        if out[n]["how"] in FLOOR_KEYS:
            continue
        for how, key in FLOOR_KEYS.items():
            f = floors.get((how, out[n]["dtype"]))
            if f:  # the median over rounds of n's time / the floor's
                out[n]["floor" if how == "floor" else "packed_floor"] = f
                out[n][key] = paired_speedup(times[n], times[f])
    return list(out.values())


def dense_convs(model, x) -> list:
    """[(conv, its input)] for every Conv2d of the model that is not a depthwise 3-tap one (the
    3x3 init/downsampling/DAB convs and the 1x1 convs: what dabnet does not replace), with the
    activations they see in a forward of x."""
    convs, seen = [], []
    for m in model.modules():
        if isinstance(m, torch.nn.Conv2d) and not (
                m.groups == m.in_channels > 1 and m.kernel_size in ((3, 1), (1, 3))):
            convs.append(m)
    hooks = [m.register_forward_hook(lambda m, i, o: seen.append((m, i[0].clone())))
             for m in convs]
    try:
        with torch.no_grad():
            model(x)
    finally:
        for h in hooks:
            h.remove()
    return seen


def floor_fn(seen, packed=False):
    """Runs the (conv, input) pairs of dense_convs back to back, through F.conv2d as the models
    call it, without nn.Module's call overhead: the floor, in the conv-floor table and in the
    interleaved rounds alike. packed: as the frozen model calls them instead (dabnet.frozen's
    FrozenConv: the weight reordered into oneDNN's layout once, not on every call)."""
    if packed:
        from dabnet.frozen import FrozenConv

        for m, _ in seen:
            if (m.bias is not None or m.groups != 1 or m.dilation != (1, 1)
                    or m.padding != (m.kernel_size[0] // 2,) * 2 or len(set(m.stride)) != 1):
                raise ValueError(f"the packed floor runs the frozen model's convolutions; {m} "
                                 f"is not one")
        convs = [(FrozenConv(m.weight.detach(), m.stride[0],
                        inp.is_contiguous(memory_format=torch.channels_last)), inp)
                 for m, inp in seen]
    else:
        convs = [(functools.partial(F.conv2d, weight=m.weight, bias=m.bias, stride=m.stride,
                                    padding=m.padding, dilation=m.dilation, groups=m.groups), inp)
                 for m, inp in seen]

    def fn():
        with torch.no_grad():
            for conv, inp in convs:
                conv(inp)
    return fn


def bench_conv_floor(device: str, resolutions, budget: Budget, progress=True,
                     deadline=None) -> list:
    """The dense convolutions alone: every Conv2d of the fused model that is not a depthwise
    3-tap one (the 3x3 init/downsampling/DAB convs and the 1x1 convs, i.e. what dabnet does not
    replace), run back to back through PyTorch (oneDNN on CPU, cuDNN on GPU) on the activations
    they see in a real forward, per layout. No fusion of the remaining, memory-bound ops can
    bring the model below this time; the fastest fused variant's time over it is how much of
    the model is left to fuse. Also their MACs and the rate they run at."""
    from dabnet.info import count_macs

    state = _bench_state()
    out = []
    # The machine's fp32 matrix-multiply rate, the yardstick for the convolutions' rate.
    n = 2048 if device == "cpu" else 8192
    a, b = (torch.randn(n, n, device=device) for _ in range(2))
    mm = n ** 3 / time_fn(lambda: a @ b, device, budget).median_ms / 1e6
    a = b = None
    jobs = [(res, layout) for res in resolutions for layout in ("nchw", "cl")]
    for res, layout in progress_bar(progress, jobs, unit="run",
                                    desc=f"dense convolutions alone on {device}"):
        if deadline is not None and time.time() > deadline:
            break
        rec = {"res": list(res), "batch": 1, "dtype": "fp32", "layout": layout,
               "variant": "dense convs only" + ("-cl" if layout == "cl" else "")}
        try:
            model = build(True, device, torch.float32, layout, state)
            seen = dense_convs(model, _image(res, 1, device, torch.float32, layout))
            macs = count_macs(build(False, "cpu", state=state), res)
            rec["convs"] = len(seen)
            rec["macs"] = macs["dense"] + macs["pointwise"]
            rec["macs_share_of_model"] = rec["macs"] / macs["total"]
            st = time_fn(floor_fn(seen), device, budget)
            rec.update(st.as_dict())
            rec["gmacs_per_s"] = rec["macs"] / st.median_ms / 1e6
            rec["matmul_gmacs_per_s"] = mm  # a (n x n) @ (n x n), fp32
        except Exception as e:
            rec["error"] = _error(e)
        out.append(rec)
        model = seen = None
        gc.collect()
    return out


def _randomize_bn_state(state):
    g = torch.Generator().manual_seed(0)
    for k, v in state.items():
        if k.endswith("running_mean"):
            v.copy_(torch.rand(v.shape, generator=g) * 0.2 - 0.1)
        elif k.endswith("running_var"):
            v.copy_(torch.rand(v.shape, generator=g) + 0.5)


def _rss_bytes(field):
    with open("/proc/self/status") as f:
        for line in f:
            if line.startswith(field + ":"):
                return int(line.split()[1]) * 1024
    raise OSError(f"{field} not in /proc/self/status")


def _reset_cpu_peak() -> bool:
    """Resets the process's peak RSS (VmHWM) by writing 5 to /proc/self/clear_refs (Linux)."""
    try:
        with open("/proc/self/clear_refs", "w") as f:
            f.write("5")
        return True
    except OSError:
        return False


def _train_setup(fused, device, layout, res, batch):
    """A fresh model in training mode, its SGD optimizer, an image batch with its labels, and
    step(): forward, cross-entropy (ignore 255), backward, update."""
    model = build(fused, device, torch.float32, layout).train()
    opt = torch.optim.SGD(model.parameters(), lr=1e-3, momentum=0.9)
    x = _image(res, batch, device, torch.float32, layout)
    g = torch.Generator().manual_seed(1)
    target = torch.randint(0, CLASSES, (batch, *res), generator=g)
    target[:, :8] = 255  # some ignored pixels, as in Cityscapes
    target = target.to(device)

    def step():
        opt.zero_grad(set_to_none=True)
        loss = F.cross_entropy(model(x), target, ignore_index=255)
        loss.backward()
        opt.step()
        return loss

    return model, step, x


def cpu_train_peak(fused: bool, layout: str, res, batch: int) -> dict:
    """In this process: RSS growth to the peak over the first two CPU training steps."""
    model, step, _x = _train_setup(fused, "cpu", layout, tuple(res), batch)
    gc.collect()
    base = _rss_bytes("VmRSS")
    if not _reset_cpu_peak():
        return {"memory_method": "not measured: /proc/self/clear_refs not writable"}
    step()
    step()
    peak = _rss_bytes("VmHWM")
    return {"peak_bytes": peak, "peak_over_base_bytes": peak - base,
            "memory_method": "peak RSS over 2 steps, fresh process (VmHWM after clear_refs)"}


def _cpu_peak_in_fresh_process(fused, layout, res, batch) -> dict:
    import json
    import os
    import subprocess
    import sys

    root = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
    code = ("import json, bench.model_bench as M; print(json.dumps(M.cpu_train_peak("
            f"{fused!r}, {layout!r}, {tuple(res)!r}, {batch!r})))")
    env = dict(os.environ, PYTHONPATH=root + os.pathsep + os.environ.get("PYTHONPATH", ""))
    try:
        p = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True,
                           timeout=900, cwd=root, env=env)
        return json.loads(p.stdout.strip().splitlines()[-1])
    except (subprocess.SubprocessError, ValueError, IndexError, OSError) as e:
        return {"memory_method": f"not measured: the measuring process failed ({_error(e)})"}


def bench_train_step(device: str, res, batch: int, layouts, budget: Budget,
                     progress=True, deadline=None) -> list:
    """One SGD step (forward, cross-entropy, backward, update) of a fresh model, fused vs not."""
    out = []
    jobs = [(fused, layout) for layout in layouts for fused in (False, True)]
    for fused, layout in progress_bar(progress, jobs, unit="run",
                                      desc=f"DABNet training step on {device}"):
        if deadline is not None and time.time() > deadline:
            break
        rec = {"res": list(res), "batch": batch, "dtype": "fp32", "fused": fused,
               "layout": layout, "variant": ("fused" if fused else "eager") +
               ("-cl" if layout == "cl" else "")}
        try:
            model, step, x = _train_setup(fused, device, layout, res, batch)
            rec["model_fused_attr"] = getattr(model, "fused", None)
            with torch.no_grad():
                rec["dabnet_kernel_calls"] = dabnet_kernel_calls(model.eval(), x[:1])
            model.train()
            # Peak memory of the first two steps of a fresh model (the optimizer's momentum
            # buffers appear in the first). GPU: the allocator's peak over what was allocated
            # before. CPU: in a fresh process per variant (in this one, memory freed by the
            # previous variant would be reused and hide the difference), the peak RSS over the
            # RSS before: coarser, it counts allocator caches too.
            if device == "cuda":
                torch.cuda.synchronize()
                base = torch.cuda.memory_allocated()
                torch.cuda.reset_peak_memory_stats()
                rec["first_loss"] = step().item()
                step()
                torch.cuda.synchronize()
                rec["peak_bytes"] = torch.cuda.max_memory_allocated()
                rec["peak_over_base_bytes"] = rec["peak_bytes"] - base
                rec["memory_method"] = "torch.cuda.max_memory_allocated over 2 steps"
            else:
                rec["first_loss"] = step().item()
                step()
                rec.update(_cpu_peak_in_fresh_process(fused, layout, res, batch))
            st = time_fn(step, device, budget)
            rec.update(st.as_dict())
        except Exception as e:
            rec["error"] = _error(e)
        out.append(rec)
        model = step = None
        gc.collect()
        if device == "cuda":
            torch.cuda.empty_cache()
    return out
