"""MaskFormer reference model (and matcher sanity for both models), on CPU with tiny configurations."""
import torch

from fastseg.models import HungarianMatcher, build_maskformer
from fastseg.models.maskformer import MaskFormerMatcher

TINY = dict(hidden_dim=32, num_queries=5, nheads=4, dim_feedforward=64, dec_layers=2, conv_dim=32, mask_dim=32)


def _batch(size=64):
    g = torch.Generator().manual_seed(3)
    x = torch.randn(2, 3, size, size, generator=g)
    targets = [{"labels": torch.tensor([1, 3]), "masks": (torch.rand(2, size, size, generator=g) > 0.5).float()},
               {"labels": torch.tensor([2]), "masks": (torch.rand(1, size, size, generator=g) > 0.5).float()}]
    return x, targets


def test_maskformer_train_step_and_semantic_inference():
    torch.manual_seed(0)
    model = build_maskformer("tiny", 4, **TINY)
    x, targets = _batch()
    losses = model(x, targets)
    assert len(losses) == 3 * TINY["dec_layers"]
    assert model.criterion.weight_dict["loss_mask"] == 20.0 and model.criterion.eos_coef == 0.1
    assert all(torch.isfinite(v) for v in losses.values())
    sum(losses.values()).backward()
    grads = [p.grad for p in model.parameters()]
    assert all(g is not None and torch.isfinite(g).all() for g in grads)
    model.eval()
    out = model(x)
    assert out["pred_masks"].shape == (2, 5, 16, 16)
    sem = model.semantic_inference(out, (64, 64))
    assert sem[0].shape == (4, 64, 64) and torch.isfinite(sem[0]).all()


def test_maskformer_overfits_one_batch():
    torch.manual_seed(0)
    model = build_maskformer("tiny", 4, **{**TINY, "dropout": 0.0})
    x, targets = _batch()
    opt = torch.optim.Adam(model.parameters(), lr=2e-3)
    first = None
    for _ in range(6):
        loss = sum(model(x, targets).values())
        first = loss.item() if first is None else first
        opt.zero_grad()
        loss.backward()
        opt.step()
    assert loss.item() < first


def _matching_outputs(Q=5, size=16, key_masks=True):
    """Predictions where query 4 reproduces target 0 and query 1 target 1 (with the right classes)."""
    g = torch.Generator().manual_seed(0)
    t = (torch.rand(2, size, size, generator=g) > 0.5).float()
    logits = torch.full((1, Q, 4), -5.0)
    masks = torch.full((1, Q, size, size), -8.0)
    logits[0, 4, 2] = 5.0
    logits[0, 1, 0] = 5.0
    masks[0, 4] = t[0] * 16 - 8
    masks[0, 1] = t[1] * 16 - 8
    return {"pred_logits": logits, "pred_masks": masks}, [{"labels": torch.tensor([2, 0]), "masks": t}]


def test_matchers_find_the_obvious_assignment():
    outputs, targets = _matching_outputs()
    for matcher in (MaskFormerMatcher(1, 20, 1), HungarianMatcher(2, 5, 5, num_points=256)):
        (q, t), = matcher(outputs, targets)
        assert dict(zip(t.tolist(), q.tolist())) == {0: 4, 1: 1}
