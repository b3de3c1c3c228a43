"""Temperature scaling: the fitted T is the NLL minimiser of a brute-force grid; scaling keeps the argmax."""
import numpy as np
import pytest

from entrust_nnunet.evaluation.temperature import (conflict_temperature_nll, conflict_temperature_scale, fit_temperature,
                                                   fit_temperature_with_conflict, temperature_nll, temperature_scale)


def _overconfident(n=4000, c=3, sharpen=3.0, seed=0):
    """Labels drawn from softmax(logits); the model reports softmax(sharpen * logits): true T = sharpen."""
    rng = np.random.default_rng(seed)
    logits = rng.normal(0, 1.5, (c, n))
    p_true = np.exp(logits) / np.exp(logits).sum(0)
    y = np.array([rng.choice(c, p=p_true[:, i]) for i in range(n)])
    reported = np.exp(sharpen * logits)
    return reported / reported.sum(0), y


def test_fit_matches_brute_force_grid():
    probs, y = _overconfident()
    t = fit_temperature(probs, y)
    grid = np.exp(np.linspace(np.log(0.2), np.log(20), 4001))
    nll = [temperature_nll(probs, y, g) for g in grid]
    best = grid[int(np.argmin(nll))]
    assert abs(t - best) / best < 2e-3
    assert temperature_nll(probs, y, t) <= min(nll) + 1e-9
    assert 2.5 < t < 3.5  # recovers the over-sharpening it was given


def test_nll_formula_against_direct_computation():
    probs, y = _overconfident(n=50, seed=1)
    scaled = temperature_scale(probs, 2.0)
    direct = -np.log(scaled[y, np.arange(y.size)]).mean()
    assert temperature_nll(probs, y, 2.0) == pytest.approx(direct, rel=1e-10)
    np.testing.assert_allclose(scaled.sum(0), 1.0)
    assert (scaled.argmax(0) == probs.argmax(0)).all()
    np.testing.assert_allclose(temperature_scale(probs, 1.0), probs, atol=1e-12)


def test_calibrated_model_keeps_temperature_one_and_bad_input_fails():
    probs, y = _overconfident(sharpen=1.0, n=6000, seed=2)
    assert fit_temperature(probs, y) == pytest.approx(1.0, abs=0.1)
    with pytest.raises(ValueError):
        fit_temperature(probs, y[:-1])
    with pytest.raises(ValueError):
        temperature_scale(probs, 0.0)


def _conflicting(n=20000, sharpen=3.0, bias=(0.0, 1.5, -1.0), seed=3):
    """Labels drawn from softmax(logits + g b) with a conflict gate g on a third of the voxels; the model reports
    softmax(sharpen * logits): it is overconfident everywhere and, where g > 0, blind to the conflict's shift."""
    rng = np.random.default_rng(seed)
    logits = rng.normal(0, 1.5, (3, n))
    gate = np.where(rng.random(n) < 0.3, rng.random(n), 0.0)
    truth = conflict_temperature_scale(np.exp(logits) / np.exp(logits).sum(0), gate, 1.0, bias)
    u = rng.random(n)
    y = (u[None] > truth.cumsum(0)).sum(0)
    reported = np.exp(sharpen * logits)
    return reported / reported.sum(0), y, gate


def test_conflict_fit_recovers_temperature_and_biases_and_lowers_nll():
    probs, y, gate = _conflicting()
    t, b = fit_temperature_with_conflict(probs, y, gate)
    assert t == pytest.approx(3.0, rel=0.1) and b[0] == 0.0
    np.testing.assert_allclose(b[1:], [1.5, -1.0], atol=0.25)
    # a convex minimum: no step away from it lowers the NLL
    best = conflict_temperature_nll(probs, y, gate, t, b)
    for dt, db in ((1.05, 0.0), (0.95, 0.0), (1.0, 0.1), (1.0, -0.1)):
        assert conflict_temperature_nll(probs, y, gate, t * dt, b + np.array([0, db, 0])) >= best - 1e-9
    assert best < conflict_temperature_nll(probs, y, gate, fit_temperature(probs, y), np.zeros(3)) - 0.01


def test_conflict_scale_formula_and_the_gate_zero_case():
    probs, y, gate = _conflicting(n=60, seed=4)
    bias = np.array([0.0, 2.0, -1.0])
    scaled = conflict_temperature_scale(probs, gate, 2.0, bias)
    direct = np.exp(np.log(probs) / 2.0 + gate[None] * bias[:, None])
    np.testing.assert_allclose(scaled, direct / direct.sum(0), rtol=1e-10)
    assert conflict_temperature_nll(probs, y, gate, 2.0, bias) == pytest.approx(
        -np.log(scaled[y, np.arange(y.size)]).mean(), rel=1e-10)
    # where g = 0 the biases do nothing: plain temperature scaling, argmax kept
    free = gate == 0
    np.testing.assert_allclose(scaled[:, free], temperature_scale(probs, 2.0)[:, free], rtol=1e-10)
    # no conflicting voxel: the biases stay 0 and T is the plain fit
    t, b = fit_temperature_with_conflict(probs, y, np.zeros_like(gate))
    assert t == pytest.approx(fit_temperature(probs, y)) and not b.any()
    with pytest.raises(ValueError, match="gate"):
        fit_temperature_with_conflict(probs, y, gate[:-1])


def test_weighted_nll_is_the_weighted_mean_of_the_per_voxel_nll_by_hand():
    """``sum_n w_n [logsumexp_c(z_cn / T) - z_{y_n n} / T] / sum_n w_n``, z = log p, against a direct evaluation."""
    probs = np.array([[0.7, 0.2, 0.5], [0.3, 0.8, 0.5]])
    y, w, t = np.array([0, 0, 1]), np.array([1.0, 0.5, 0.0]), 2.0
    z = np.log(probs) / t
    per_voxel = np.log(np.exp(z).sum(0)) - z[y, np.arange(3)]
    assert temperature_nll(probs, y, t, weights=w) == pytest.approx((per_voxel * w).sum() / w.sum())
    assert temperature_nll(probs, y, t, weights=np.ones(3)) == pytest.approx(temperature_nll(probs, y, t))
