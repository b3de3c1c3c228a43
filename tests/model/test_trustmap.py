"""TrustMap: the entropy decomposition and CalibHead's fit."""
import math

import numpy as np
import pytest
import torch
from torch import nn

from entrust_nnunet.model.trustmap import (
    STATISTICS,
    CalibHead,
    channel_std,
    entropy,
    mutual_information,
    probe_step,
    projected_perturbation,
    top_label_calibrated,
)


def _calibration_data(n: int, seed: int):
    """Statistics where P(error) = entropy (the other statistics are noise), and errors drawn from it."""
    g = torch.Generator().manual_seed(seed)
    stats = {k: torch.rand(1, n, 1, generator=g) for k in STATISTICS}
    return stats, (torch.rand(1, n, 1, generator=g) < stats["entropy"]).float()


def test_calib_head_learns_probability_of_error():
    stats, error = _calibration_data(4096, 0)
    head = CalibHead(nn.Conv2d)
    torch.testing.assert_close(head(stats), (1 - stats["confidence"]).clamp(0, 1))  # unfitted default
    head.fit_voxels(stats, error, steps=300)
    pred = head(stats).detach()
    assert abs(float(pred.mean()) - float(error.mean())) < 0.03
    assert float(torch.corrcoef(torch.stack([pred.ravel(), stats["entropy"].ravel()]))[0, 1]) > 0.9
    # a refit starts afresh: fitting on other data first changes nothing
    other = CalibHead(nn.Conv2d)
    other.fit_voxels({k: v.flip(1) for k, v in stats.items()}, 1 - error, steps=300)
    other.fit_voxels(stats, error, steps=300)
    torch.testing.assert_close(other(stats), pred)


def test_calib_head_stops_early_on_held_out_cases():
    """Few voxels and many steps overfit; a judge from other cases keeps an earlier, better head."""
    small, small_error = _calibration_data(48, 1)
    judge = _calibration_data(4096, 2)

    def judge_bce(head):
        p = head(judge[0]).detach().clamp(1e-6, 1 - 1e-6)
        return float(torch.nn.functional.binary_cross_entropy(p, judge[1]))

    full = CalibHead(nn.Conv2d)
    _, kept_full = full.fit_voxels(small, small_error, steps=1500)
    stopped = CalibHead(nn.Conv2d)
    _, kept = stopped.fit_voxels(small, small_error, steps=1500, judge=judge, every=50)
    assert kept_full == 1500 and kept % 50 == 0 and kept < 1500
    assert judge_bce(stopped) < judge_bce(full) - 0.01


def _softmax(z, axis=0):
    e = np.exp(z - z.max(axis=axis, keepdims=True))
    return e / e.sum(axis=axis, keepdims=True)


def _entropy_reference(p, axis):
    return -(p * np.log(np.maximum(p, 1e-12))).sum(axis=axis)


def test_entropy_by_hand():
    p = torch.tensor([[0.5, 1.0, 0.2], [0.5, 0.0, 0.8]], dtype=torch.float64)
    expected = [math.log(2), 0.0, -(0.2 * math.log(0.2) + 0.8 * math.log(0.8))]
    np.testing.assert_allclose(entropy(p, axis=0).numpy(), expected, atol=1e-9)
    np.testing.assert_allclose(entropy(p.T, axis=-1).numpy(), expected, atol=1e-9)
    assert isinstance(entropy(p, axis=0), torch.Tensor)
    with pytest.raises(ValueError, match="axis"):
        entropy(p, axis=2)


def test_mutual_information():
    rng = np.random.default_rng(5)
    p = _softmax(rng.normal(size=(3, 4, 5)))          # (C, *spatial)
    same = torch.tensor(np.stack([p] * 4))             # K = 4 identical samples
    d = mutual_information(same)
    np.testing.assert_allclose(d["epistemic"].numpy(), 0.0, atol=1e-12)
    np.testing.assert_allclose(d["aleatoric"].numpy(), d["entropy"].numpy(), atol=1e-12)
    np.testing.assert_allclose(d["entropy"].numpy(), _entropy_reference(p, 0), atol=1e-12)
    # one-hot samples that disagree: no aleatoric part, everything is epistemic = H(mean)
    onehot = np.zeros((4, 3, 2))
    onehot[[0, 1, 2, 3], [0, 1, 2, 0], 0] = 1.0   # voxel 0: classes 0,1,2,0 -> mean (.5,.25,.25)
    onehot[[0, 1, 2, 3], [1, 1, 1, 1], 1] = 1.0   # voxel 1: all agree -> 0
    d = mutual_information(torch.tensor(onehot))
    h0 = -(0.5 * math.log(0.5) + 2 * 0.25 * math.log(0.25))
    np.testing.assert_allclose(d["aleatoric"].numpy(), 0.0, atol=1e-9)
    np.testing.assert_allclose(d["epistemic"].numpy(), [h0, 0.0], atol=1e-9)
    np.testing.assert_allclose(d["entropy"].numpy(), d["epistemic"].numpy(), atol=1e-12)
    # against an explicit numpy reference, on random samples; differentiable for the model code
    s = _softmax(rng.normal(size=(5, 3, 6, 7)), axis=1)
    reference = {"entropy": _entropy_reference(s.mean(0), 0), "aleatoric": _entropy_reference(s, 1).mean(0)}
    reference["epistemic"] = np.maximum(reference["entropy"] - reference["aleatoric"], 0)
    dt = mutual_information(torch.tensor(s, requires_grad=True))
    for key in ("entropy", "aleatoric", "epistemic"):
        assert isinstance(dt[key], torch.Tensor) and dt[key].shape == (6, 7)
        np.testing.assert_allclose(dt[key].detach().numpy(), reference[key], atol=1e-10)
        assert np.all(reference[key] >= 0)
    dt["epistemic"].sum().backward()
    d32 = mutual_information(torch.tensor(s, dtype=torch.float32))
    assert d32["entropy"].dtype == torch.float32
    np.testing.assert_allclose(d32["entropy"].numpy(), reference["entropy"], atol=1e-5)
    with pytest.raises(ValueError, match="K, C"):
        mutual_information(torch.ones(3))


def test_channel_std_matches_torch_std():
    g = torch.Generator().manual_seed(0)
    x = torch.randn(2, 5, 64, 64, generator=g) * torch.arange(1, 6).view(1, 5, 1, 1) + 3.0
    torch.testing.assert_close(channel_std(x), x.flatten(2).std(-1))
    torch.testing.assert_close(channel_std(torch.ones(1, 2, 4, 4)), torch.zeros(1, 2))


def test_projected_perturbation_has_the_law_of_the_projected_conditioning_noise():
    """ProbeStep draws ``W (std * xi)`` (xi over c channels) as ``root zeta`` (zeta over h channels): per voxel
    both are N(0, W diag(std^2) W^T). Checked on the empirical covariance over many voxels, per sample."""
    g = torch.Generator().manual_seed(0)
    w = torch.randn(4, 9, generator=g)
    scale = torch.rand(2, 9, generator=g) * 2
    n = 200_000
    drawn = projected_perturbation(w, scale, torch.randn(2, 4, n, generator=g))
    direct = torch.einsum("hc,bcn->bhn", w, scale[:, :, None] * torch.randn(2, 9, n, generator=g))
    expected = torch.einsum("hc,bc,gc->bhg", w, scale.square(), w)
    for b in range(2):
        for sample in (drawn[b], direct[b]):
            cov = sample @ sample.T / n
            assert (cov - expected[b]).abs().max() < 0.03 * expected[b].diagonal().max()
    # under autocast (nnU-Net predicts with it on CUDA; CPU's bfloat16 here) the square root stays in float32
    with torch.autocast("cpu", dtype=torch.bfloat16):
        half = projected_perturbation(w, scale, torch.randn(2, 4, 100, generator=g))
    assert torch.isfinite(half).all()
    # a scale of 0 on every channel: no perturbation
    assert projected_perturbation(w, torch.zeros(1, 9), torch.randn(1, 4, 10, generator=g)).abs().max() < 1e-6


def test_probe_step_moves_only_where_the_modalities_conflict():
    """A pointwise stand-in for SegDiff (softmax of a linear map of the conditioning): the probe map is 0 where
    the conflict is 0, grows with the conflict and with the strength, and is a total variation (<= 1)."""
    g = torch.Generator().manual_seed(0)
    proj = torch.randn(3, 4, generator=g)

    def sample_fn(cond_h):
        return torch.softmax(torch.einsum("ch,bh...->bc...", proj, cond_h), 1).unsqueeze(0)

    cond_h = torch.randn(1, 4, 16, 16, generator=g)
    direction = torch.randn(1, 4, 16, 16, generator=g)
    conflict = torch.zeros(1, 1, 16, 16)
    conflict[..., :, 8:12] = 0.2
    conflict[..., :, 12:] = 1.0
    reference = sample_fn(cond_h)
    probe = probe_step(sample_fn, cond_h, direction, conflict, reference)
    assert probe.shape == (1, 16, 16)
    assert probe[..., :8].abs().max() == 0
    assert probe[..., 12:].mean() > 2 * probe[..., 8:12].mean() > 0
    assert probe.max() <= 1
    stronger = probe_step(sample_fn, cond_h, direction, conflict, reference, strength=3.0)
    assert stronger[..., 8:].mean() > probe[..., 8:].mean()


def test_top_label_calibrated_by_hand():
    probs = torch.tensor([[0.6, 1.0], [0.3, 0.0], [0.1, 0.0]])  # (C=3, 2 voxels); voxel 1: no mass off the top
    out = top_label_calibrated(probs, torch.tensor([0.2, 0.3]))
    torch.testing.assert_close(out, torch.tensor([[0.8, 0.7], [0.15, 0.15], [0.05, 0.15]]))


def test_top_label_calibrated_keeps_the_argmax_and_carries_the_calibrated_confidence():
    g = torch.Generator().manual_seed(0)
    probs = torch.softmax(3 * torch.randn(4, 500, generator=g), 0)
    p_error = torch.rand(500, generator=g)
    out = top_label_calibrated(probs, p_error)
    torch.testing.assert_close(out.sum(0), torch.ones(500))
    assert torch.equal(out.argmax(0), probs.argmax(0))  # nnU-Net's mask is unchanged
    rest = probs.scatter(0, probs.argmax(0, keepdim=True), 0.0)
    bound = 1 / (1 + (rest / rest.sum(0)).amax(0))
    free = p_error < bound - 1e-3
    assert free.float().mean() > 0.5
    torch.testing.assert_close(1 - out.amax(0)[free], p_error[free])  # 1 - max = P(error) where not capped
    assert (1 - out.amax(0)[~free] < bound[~free]).all()  # capped just below the bound elsewhere
    # the non-top classes keep their proportions
    out_rest = out.scatter(0, probs.argmax(0, keepdim=True), 0.0)
    torch.testing.assert_close(out_rest / out_rest.sum(0), rest / rest.sum(0))


def test_top_label_calibrated_probabilities_are_calibrated_when_p_error_is():
    """Overconfident probabilities, a P(error) that is the true error rate: the top-label ECE falls to ~0."""
    from entrust_nnunet.evaluation.metrics import ece

    g = torch.Generator().manual_seed(1)
    n = 20000
    p_error = 0.5 * torch.rand(n, generator=g) ** 2
    wrong = torch.rand(n, generator=g) < p_error
    probs = torch.stack([torch.full((n,), 0.99), torch.full((n,), 0.01)])  # class 0 predicted, far too sure
    labels = wrong.long()
    before = ece(probs.numpy(), labels.numpy())
    after = ece(top_label_calibrated(probs, p_error).numpy(), labels.numpy())
    assert before > 0.1 and after < 0.01
