"""Temperature scaling (Guo et al. 2017): one scalar T fitted by NLL on held-out predictions.

Pure functions on numpy arrays. Class probabilities ``p`` (C, N) stand in for logits: ``log p`` differs
from the logits by a per-voxel constant, which a softmax ignores, so ``softmax(log p / T)`` IS
``softmax(logits / T)`` (up to the floor ``eps`` on ``p``; nnU-Net's saved probabilities are float32).
"""
from __future__ import annotations

import numpy as np
import numpy.typing as npt
from scipy.optimize import minimize_scalar

#: search range of the inverse temperature 1/T
BETA_RANGE = (1e-2, 1e2)


def _log_probs(probs: npt.ArrayLike, eps: float) -> np.ndarray:
    p = np.asarray(probs, dtype=np.float64)
    if p.ndim != 2 or p.shape[0] < 2:
        raise ValueError(f"probs must have shape (C, N) with C >= 2, got {p.shape}")
    if not np.all(np.isfinite(p)) or p.min(initial=0.0) < 0.0:
        raise ValueError("probs must be finite and non-negative")
    return np.log(np.maximum(p, eps))


def temperature_scale(probs: npt.ArrayLike, temperature: float, eps: float = 1e-12) -> np.ndarray:
    """``softmax_c(log max(p_c, eps) / T)`` of class probabilities ``p`` (C, N) -> (C, N).

    T > 1 softens, T < 1 sharpens; the argmax (the mask) never changes.
    """
    if not temperature > 0:
        raise ValueError(f"temperature must be > 0, got {temperature}")
    z = _log_probs(probs, eps) / float(temperature)
    z -= z.max(0, keepdims=True)
    e = np.exp(z)
    return e / e.sum(0, keepdims=True)


def temperature_nll(probs: npt.ArrayLike, labels: npt.ArrayLike, temperature: float, eps: float = 1e-12) -> float:
    """Mean NLL of the labels under temperature-scaled probabilities::

        NLL(T) = mean_n [ logsumexp_c(z_cn / T) - z_{y_n n} / T ],   z = log max(p, eps)
    """
    if not temperature > 0:
        raise ValueError(f"temperature must be > 0, got {temperature}")
    z = _log_probs(probs, eps)
    return _nll(z, _labels(labels, z), 1.0 / float(temperature))


def _labels(labels: npt.ArrayLike, z: np.ndarray) -> np.ndarray:
    y = np.asarray(labels).reshape(-1)
    if y.size != z.shape[1] or not np.issubdtype(y.dtype, np.integer) or y.min(initial=0) < 0 \
            or y.max(initial=0) >= z.shape[0]:
        raise ValueError(f"labels must be N = {z.shape[1]} integers in [0, {z.shape[0]}), got {y.size} values")
    return y


def _nll(z: np.ndarray, y: np.ndarray, beta: float) -> float:
    s = z * beta
    m = s.max(0)
    lse = m + np.log(np.exp(s - m).sum(0))
    return float((lse - s[y, np.arange(y.size)]).mean())


def fit_temperature(probs: npt.ArrayLike, labels: npt.ArrayLike, eps: float = 1e-12) -> float:
    """The temperature T minimising :func:`temperature_nll` on held-out ``probs`` (C, N) and ``labels`` (N).

    NLL is convex in the inverse temperature beta = 1/T (a log-sum-exp of functions linear in beta minus
    a linear term), so a bounded scalar search (Brent) over beta in :data:`BETA_RANGE` finds the global
    minimum; T = 1/beta.
    """
    z = _log_probs(probs, eps)
    y = _labels(labels, z)
    if y.size == 0:
        raise ValueError("need at least one voxel to fit a temperature")
    res = minimize_scalar(lambda beta: _nll(z, y, beta), bounds=BETA_RANGE, method="bounded", options={"xatol": 1e-6})
    return float(1.0 / res.x)
