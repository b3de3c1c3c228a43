"""Temperature scaling: the fitted T is the NLL minimiser of a brute-force grid; scaling keeps the argmax."""
import numpy as np
import pytest

from entrust_nnunet.evaluation.temperature import fit_temperature, temperature_nll, temperature_scale


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
