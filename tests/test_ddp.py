"""DDP on CPU: 2 gloo processes with batch 1 each must take the same step as one process with
batch 2 (gradients averaged, BN statistics synchronised across the ranks)."""
import datetime
import os
import socket

import torch
import torch.distributed as dist
import torch.multiprocessing as mp

from dabnet.train import TrainConfig, train


def _cfg(out, batch, fused=False):
    # Scale 1 and a full-size crop: no padding, so every rank has the same pixel count.
    return TrainConfig(out_dir=str(out), crop=(32, 64), scales=(1.0,), batch_size=batch,
                       synthetic_length=20, synthetic_size=(32, 64), workers=0, progress=False,
                       val_every=1, max_steps=1, seed=3, fused=fused)  # val: 2 images


def _worker(rank, port, out):
    os.environ.update(MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port), RANK=str(rank),
                      LOCAL_RANK=str(rank), WORLD_SIZE="2")
    torch.set_num_threads(1)
    r = train(_cfg(out, 1, fused=True))
    from dabnet.distributed import GlobalBatchNorm2d, cleanup
    n_sync = sum(isinstance(m, GlobalBatchNorm2d) for m in r["model"].modules())
    torch.save({"state": r["model"].state_dict(), "fused": r["fused"], "n_sync": n_sync,
                "miou": r["best_miou"]},
               os.path.join(out, f"rank{rank}.pt"))
    cleanup()


def test_two_process_gloo_matches_single_process(tmp_path):
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    mp.spawn(_worker, args=(port, str(tmp_path)), nprocs=2, join=True)
    r0, r1 = (torch.load(tmp_path / f"rank{i}.pt") for i in range(2))
    assert r0["fused"] is True  # the fused modules, with their BN synchronised
    assert r0["n_sync"] > 0
    ref = train(_cfg(tmp_path / "single", 2))
    single = ref["model"].state_dict()
    # Validation is sharded over the ranks and its confusion matrices summed.
    assert r0["miou"] == r1["miou"] and abs(r0["miou"] - ref["best_miou"]) < 0.02
    saved = torch.load(tmp_path / "last.pt", weights_only=False)["model"]
    for k, v in single.items():
        assert torch.equal(r0["state"][k], r1["state"][k]), k
        assert torch.equal(saved[k], r0["state"][k]), k
        if v.is_floating_point():
            # float32, fused kernels vs ATen's, one SGD step at lr 4.5e-2: rounding alone moved
            # the first conv's weights by up to 3e-5. (Synchronisation itself is checked exactly,
            # in float64, by the tests below.)
            assert torch.allclose(r0["state"][k], v, rtol=1e-3, atol=2e-4), k
        else:
            assert torch.equal(r0["state"][k], v), k


# ------------------------------------------------- fused BN-PReLU synchronised across ranks
def _free_port():
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _spawn(fn, *args):
    """Runs fn(rank, *args) in 2 gloo processes; a failed assertion in either fails the test."""
    mp.spawn(_init_and_run, args=(fn, _free_port(), args), nprocs=2, join=True)


def _init_and_run(rank, fn, port, args):
    torch.set_num_threads(1)
    dist.init_process_group("gloo", init_method=f"tcp://127.0.0.1:{port}", rank=rank,
                            world_size=2, timeout=datetime.timedelta(seconds=120))
    try:
        fn(rank, *args)
    finally:
        dist.destroy_process_group()


def _close(a, b, what, tol=1e-11):
    assert a.shape == b.shape, what
    assert torch.allclose(a, b, rtol=tol, atol=tol), f"{what}: max diff {(a - b).abs().max()}"


def _unit(kind, C, momentum, seed):
    """(fused unit, its BN, its PReLU, its conv or None) with random parameters, float64."""
    from dabnet_kernels.nn import FusedBNPReLU, FusedConvBNPReLU

    torch.manual_seed(seed)
    if kind == "conv":
        m = FusedConvBNPReLU(C, (3, 1), dilation=2, momentum=momentum).double()
        bn, acti, conv = m.bn_prelu.bn, m.bn_prelu.acti, m.conv
    else:
        m = FusedBNPReLU(C, momentum=momentum).double()
        bn, acti, conv = m.bn, m.acti, None
    with torch.no_grad():
        for p in m.parameters():
            p.uniform_(-1, 1) if p.dim() == 4 else p.uniform_(0.1, 1.5)
        bn.bias.uniform_(-0.5, 0.5)
    return m, bn, acti, conv


def _run_unit(kind, m, x):
    """forward of a unit; 'cat' feeds forward_cat two channel slices."""
    if kind == "cat":
        c = x.shape[1] // 2
        return m.forward_cat([x[:, :c], x[:, c:]])
    return m(x)


def _bn_worker(rank):
    from dabnet.distributed import convert_sync_bn
    from dabnet_kernels.backend import use_backend
    from dabnet_kernels.sync import GlobalBatchNorm2d

    C = 6
    for backend in ("cpu", "reference"):
        for kind in ("bn", "conv", "cat"):
            for momentum in (0.1, None):
                synced = convert_sync_bn(_unit(kind, C, momentum, 1)[0], "cpu")
                local = _unit(kind, C, momentum, 1)[0]  # per-rank statistics: must differ
                # The oracle: the unfused unit on both ranks' batches concatenated, one process.
                _, bn, acti, conv = _unit(kind, C, momentum, 1)
                # ... and GlobalBatchNorm2d + nn.PReLU (plain autograd through an all-reduce).
                _, gbn, gacti, gconv = _unit(kind, C, momentum, 1)
                gbn = convert_sync_bn(gbn, "cpu")
                assert isinstance(gbn, GlobalBatchNorm2d)
                fused_bn = synced.bn_prelu.bn if kind == "conv" else synced.bn
                assert isinstance(fused_bn, GlobalBatchNorm2d)
                for step in range(3):
                    g = torch.Generator().manual_seed(10 * step)
                    # Different batch sizes, means and spreads per rank (count-weighted stats).
                    xs = [(torch.randn(2 + r, C, 5, 7, generator=g, dtype=torch.float64)
                           * (1 + r) + 3 * r - 1) for r in range(2)]
                    gs = [torch.randn(x.shape, generator=g, dtype=torch.float64) for x in xs]
                    x = xs[rank].clone().requires_grad_()
                    with use_backend(backend):
                        out = _run_unit(kind, synced, x)
                    (out * gs[rank]).sum().backward()

                    xg = xs[rank].clone().requires_grad_()
                    pre = gconv(xg) if gconv is not None else xg
                    out_g = gacti(gbn(pre))
                    (out_g * gs[rank]).sum().backward()

                    xf = torch.cat(xs).requires_grad_()
                    pre = conv(xf) if conv is not None else xf
                    out_f = acti(bn(pre))
                    (out_f * torch.cat(gs)).sum().backward()
                    own = slice(0, 2) if rank == 0 else slice(2, 5)

                    what = f"{backend} {kind} momentum={momentum} step {step}"
                    _close(out, out_g, f"{what}: output vs GlobalBatchNorm2d")
                    _close(out, out_f[own], f"{what}: output vs full batch")
                    _close(x.grad, xg.grad, f"{what}: input grad vs GlobalBatchNorm2d")
                    _close(x.grad, xf.grad[own], f"{what}: input grad vs full batch")
                    with torch.no_grad():
                        out_l = _run_unit(kind, local, xs[rank])
                    assert not torch.allclose(out_l, out), what
                    refs = dict(weight=bn.weight, bias=bn.bias, acti=acti.weight)
                    mine = dict(weight=fused_bn.weight, bias=fused_bn.bias,
                                acti=(synced.bn_prelu.acti if kind == "conv" else synced.acti).weight)
                    theirs = dict(weight=gbn.weight, bias=gbn.bias, acti=gacti.weight)
                    if conv is not None:
                        refs["conv"], mine["conv"], theirs["conv"] = (
                            conv.weight, synced.conv.weight, gconv.weight)
                    for name, p in mine.items():
                        # Local gradients (DDP averages them): equal to GlobalBatchNorm2d's, and
                        # summed over the ranks, to the full batch's.
                        _close(p.grad, theirs[name].grad, f"{what}: {name} grad vs Global")
                        total = p.grad.clone()
                        dist.all_reduce(total)
                        _close(total, refs[name].grad, f"{what}: {name} grad vs full batch")
                    for name in ("running_mean", "running_var", "num_batches_tracked"):
                        a, b = getattr(fused_bn, name), getattr(bn, name)
                        _close(a.double(), getattr(gbn, name).double(), f"{what}: {name}")
                        _close(a.double(), b.double(), f"{what}: {name} vs full batch")
                    # Without synchronisation each rank keeps its own statistics.
                    local_bn = local.bn_prelu.bn if kind == "conv" else local.bn
                    assert not torch.allclose(local_bn.running_mean, fused_bn.running_mean), what
                    for mod in (synced, local, bn, acti, gbn, gacti, conv, gconv):
                        if mod is not None:
                            mod.zero_grad()
                # Eval: the running statistics, on the fused kernels.
                synced.eval(), bn.eval(), acti.eval()
                with torch.no_grad(), use_backend(backend):
                    pre = conv(xs[rank]) if conv is not None else xs[rank]
                    _close(_run_unit(kind, synced, xs[rank]), acti(bn(pre)), f"{what}: eval")


def test_synced_fused_bn_prelu_matches_global_batch_norm():
    """The fused BN-PReLU (plain, after a depthwise conv, and forward_cat) with a
    GlobalBatchNorm2d child on 2 ranks with different inputs: outputs, input and parameter
    gradients and running statistics (momentum 0.1 and None) equal GlobalBatchNorm2d + nn.PReLU
    and one process on the concatenated batch, on the C++ and the reference backends."""
    _spawn(_bn_worker)


def _model_worker(rank):
    import copy

    from torch.nn.parallel import DistributedDataParallel as DDP

    from dabnet.distributed import convert_sync_bn
    from dabnet.model import DABNet
    from dabnet_kernels import convert

    torch.manual_seed(0)
    base = DABNet(classes=4, block_1=1, block_2=2).double()
    g = torch.Generator().manual_seed(5)
    data = [[(torch.randn(2, 3, 32, 32, generator=g, dtype=torch.float64) + r,
              torch.randint(0, 4, (2, 32, 32), generator=g)) for r in range(2)]
            for _ in range(2)]
    fused = convert(base)
    models = {"fused, per-rank BN": copy.deepcopy(fused),
              "fused": convert_sync_bn(fused, "cpu"),
              "unfused": convert_sync_bn(copy.deepcopy(base), "cpu")}
    results = {}
    for name, model in models.items():
        net = DDP(model)
        opt = torch.optim.SGD(net.parameters(), lr=0.05, momentum=0.9)
        losses = []
        for batches in data:
            x, y = batches[rank]
            loss = torch.nn.functional.cross_entropy(net(x), y)
            opt.zero_grad()
            loss.backward()
            opt.step()
            losses.append(loss.detach())
        results[name] = (torch.stack(losses), model.state_dict())
    # One process on both ranks' batches: the ground truth.
    single = copy.deepcopy(base)
    opt = torch.optim.SGD(single.parameters(), lr=0.05, momentum=0.9)
    for batches in data:
        x = torch.cat([b[0] for b in batches])
        y = torch.cat([b[1] for b in batches])
        loss = torch.nn.functional.cross_entropy(single(x), y)
        opt.zero_grad()
        loss.backward()
        opt.step()
    state = single.state_dict()

    losses, fused = results["fused"]
    losses_u, unfused = results["unfused"]
    _close(losses, losses_u, "losses", 1e-9)
    x = data[0][rank][0]
    with torch.no_grad():  # eval (dab_neck kernel) with the synchronised BatchNorm children
        _close(models["fused"].eval()(x), single.eval()(x), "eval output", 1e-8)
    assert fused.keys() == unfused.keys() == state.keys()
    for k, v in state.items():
        _close(fused[k].double(), unfused[k].double(), f"{k}: fused vs unfused", 1e-8)
        _close(fused[k].double(), v.double(), f"{k}: fused vs one process", 1e-8)
    differs = [k for k in state if k.endswith("running_mean")
               and not torch.allclose(results["fused, per-rank BN"][1][k], v)]
    assert differs, "per-rank statistics should differ from the global ones"


def test_synced_fused_dabnet_ddp_matches_unfused():
    """A fused DABNet (float64, 2x3x32x32 per rank) trained 2 steps under DDP with
    convert_sync_bn takes the steps of the unfused one with GlobalBatchNorm2d and of one process
    on both batches; without sync BN its running statistics differ."""
    _spawn(_model_worker)


def test_sync_bn_prelu_single_rank_is_training_bn_prelu():
    """With one rank the synchronised path is plain training-mode BN-PReLU: the fused module
    does not take it, and sync_bn_prelu itself (forced) equals ops.bn_prelu / dwconv3_bn_prelu
    in outputs, every gradient and running statistics (C++, reference and, where installed,
    Triton backends; NCHW and channels_last)."""
    from dabnet.distributed import convert_sync_bn
    from dabnet_kernels import ops
    from dabnet_kernels.backend import triton_available, use_backend
    from dabnet_kernels.sync import spans_ranks, sync_bn_prelu

    dist.init_process_group("gloo", store=dist.HashStore(), rank=0, world_size=1)
    try:
        m = convert_sync_bn(_unit("bn", 4, 0.1, 2)[0], "cpu")
        assert not spans_ranks(m.bn)
        plain = _unit("bn", 4, 0.1, 2)[0]
        x = torch.randn(3, 4, 5, 6, dtype=torch.float64)
        assert torch.equal(m(x), plain(x))
        assert torch.equal(m.bn.running_var, plain.bn.running_var)
        backends = ["cpu", "reference"] + (["triton"] if triton_available() else [])
        for backend in backends:
            for conv in (False, True):
                for momentum in (0.2, None):
                    f64 = dict(dtype=torch.float64)
                    tensors = [torch.randn(3, 4, 5, 6, **f64), torch.randn(4, 1, 1, 3, **f64),
                               torch.rand(4, **f64) + 0.5, torch.randn(4, **f64),
                               torch.rand(4, **f64) * 0.5]
                    if momentum is None:
                        tensors[0] = tensors[0].to(memory_format=torch.channels_last)
                    grad = torch.randn(3, 4, 5, 6, dtype=torch.float64)
                    running = [torch.rand(4, **f64),
                               torch.rand(4, **f64) + 1, torch.tensor(2)]
                    outs = []
                    for synced in (True, False):
                        x, cw, w, b, a = (t.clone().requires_grad_() for t in tensors)
                        stats = [t.clone() for t in running]
                        with use_backend(backend):
                            if synced:
                                y = sync_bn_prelu(x, w, b, *stats[:2], a, momentum, 1e-3,
                                                  stats[2], conv_weight=cw if conv else None,
                                                  dilation=2)
                            elif conv:
                                y = ops.dwconv3_bn_prelu(x, cw, 2, w, b, *stats[:2], a, True,
                                                         momentum, 1e-3, stats[2])
                            else:
                                y = ops.bn_prelu(x, w, b, *stats[:2], a, True, momentum, 1e-3,
                                                 stats[2])
                        y.backward(grad)
                        outs.append([y, x.grad, w.grad, b.grad, a.grad, *stats]
                                    + ([cw.grad] if conv else []))
                    for k, (s, p) in enumerate(zip(*outs)):
                        _close(s.double(), p.double(), f"{backend} conv={conv} {momentum} [{k}]")
    finally:
        dist.destroy_process_group()
