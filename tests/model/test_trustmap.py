"""TrustMap: the entropy decomposition and CalibHead's fit."""
import math

import numpy as np
import pytest
import torch
from torch import nn

from entrust_nnunet.model.trustmap import (
    STATISTICS,
    CalibHead,
    entropy,
    mutual_information,
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
