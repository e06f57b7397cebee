"""DDP on CPU: 2 gloo processes with batch 1 each must take the same step as one process with
batch 2 (gradients averaged, BN statistics synchronised across the ranks)."""
import os
import socket

import torch
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
    assert r0["fused"] is False  # fused + synchronised BN falls back to the unfused modules
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
            assert torch.allclose(r0["state"][k], v, rtol=1e-4, atol=1e-5), k
        else:
            assert torch.equal(r0["state"][k], v), k
