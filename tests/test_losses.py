import pytest
import torch
import torch.nn.functional as F

from dabnet.losses import SegCrossEntropy


def _batch(n=2, c=4, h=5, w=6):
    logits = torch.randn(n, c, h, w) * 3
    target = torch.randint(0, c, (n, h, w))
    target[0, 0, :3] = 255
    return logits, target


def test_plain_ce_matches_torch_and_ignores_255():
    logits, target = _batch()
    wts = torch.tensor([1.0, 2.0, 0.5, 3.0])
    assert torch.allclose(SegCrossEntropy()(logits, target),
                          F.cross_entropy(logits, target, ignore_index=255))
    assert torch.allclose(SegCrossEntropy(wts)(logits, target),
                          F.cross_entropy(logits, target, weight=wts, ignore_index=255))


def test_ohem_keeps_only_hard_pixels():
    logits, target = _batch()
    valid = target != 255
    safe = target.clamp_max(3)
    prob = logits.softmax(1).gather(1, safe[:, None])[:, 0]
    pix = F.cross_entropy(logits, safe, reduction="none")
    hard = valid & (prob <= 0.7)
    assert 0 < int(hard.sum()) < int(valid.sum())
    got = SegCrossEntropy(ohem=True, thresh=0.7, min_kept=1)(logits, target)
    assert torch.allclose(got, pix[hard].mean())
    # thresh 1 keeps every valid pixel: plain cross-entropy, also with class weights.
    wts = torch.tensor([1.0, 2.0, 0.5, 3.0])
    assert torch.allclose(SegCrossEntropy(wts, ohem=True, thresh=1.0, min_kept=0)(logits, target),
                          F.cross_entropy(logits, target, weight=wts, ignore_index=255))


def test_ohem_min_kept_raises_the_threshold():
    logits, target = _batch()
    valid = target != 255
    safe = target.clamp_max(3)
    prob = logits.softmax(1).gather(1, safe[:, None])[:, 0]
    pix = F.cross_entropy(logits, safe, reduction="none")
    k = 20
    lowest = prob[valid].sort().values[:k]
    got = SegCrossEntropy(ohem=True, thresh=1e-9, min_kept=k)(logits, target)
    expect = pix[valid & (prob <= lowest[-1])].mean()
    assert torch.allclose(got, expect)


def test_ohem_gradient_flows_only_through_kept_pixels():
    logits, target = _batch()
    logits.requires_grad_(True)
    SegCrossEntropy(ohem=True, thresh=0.7, min_kept=1)(logits, target).backward()
    prob = logits.detach().softmax(1).gather(1, target.clamp_max(3)[:, None])[:, 0]
    dropped = (target == 255) | (prob > 0.7)
    assert (logits.grad.abs().sum(1)[dropped] == 0).all()
    assert (logits.grad.abs().sum(1)[~dropped] > 0).all()


def test_bad_input():
    with pytest.raises(ValueError, match="same size"):
        SegCrossEntropy()(torch.randn(1, 3, 4, 4), torch.zeros(1, 4, 5, dtype=torch.long))
    with pytest.raises(ValueError, match="class weights"):
        SegCrossEntropy([1.0, 2.0])(torch.randn(1, 3, 4, 4), torch.zeros(1, 4, 4, dtype=torch.long))
    with pytest.raises(ValueError, match="threshold"):
        SegCrossEntropy(ohem=True, thresh=0)
