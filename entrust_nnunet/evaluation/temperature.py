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


def temperature_nll(probs: npt.ArrayLike, labels: npt.ArrayLike, temperature: float, eps: float = 1e-12,
                    weights: npt.ArrayLike | None = None) -> float:
    """Mean NLL of the labels under temperature-scaled probabilities (with ``weights`` w (N,): weighted)::

        NLL(T) = sum_n w_n [ logsumexp_c(z_cn / T) - z_{y_n n} / T ] / sum_n w_n,   z = log max(p, eps)
    """
    if not temperature > 0:
        raise ValueError(f"temperature must be > 0, got {temperature}")
    z = _log_probs(probs, eps)
    return _nll(z, _labels(labels, z), 1.0 / float(temperature), weights)


def _labels(labels: npt.ArrayLike, z: np.ndarray) -> np.ndarray:
    y = np.asarray(labels).reshape(-1)
    if y.size != z.shape[1] or not np.issubdtype(y.dtype, np.integer) or y.min(initial=0) < 0 \
            or y.max(initial=0) >= z.shape[0]:
        raise ValueError(f"labels must be N = {z.shape[1]} integers in [0, {z.shape[0]}), got {y.size} values")
    return y


def _nll(z: np.ndarray, y: np.ndarray, beta: float, weights: npt.ArrayLike | None = None) -> float:
    s = z * beta
    m = s.max(0)
    lse = m + np.log(np.exp(s - m).sum(0))
    return float(np.average(lse - s[y, np.arange(y.size)], weights=weights))


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


# ------------------------------------------------------------------------------------------------
# temperature with a conflict term
# ------------------------------------------------------------------------------------------------
#: bound on each conflict bias |b_c| (a factor e^8 on a class's odds at full conflict), so that calibration cases
#: whose conflicting voxels all hold one class cannot drive a bias to infinity
BIAS_BOUND = 8.0


def _conflict_inputs(probs, labels, gate, eps):
    z = _log_probs(probs, eps)
    y = _labels(labels, z)
    g = np.asarray(gate, dtype=np.float64).reshape(-1)
    if g.size != z.shape[1] or not np.all(np.isfinite(g)):
        raise ValueError(f"gate must hold N = {z.shape[1]} finite values, got {g.size}")
    return z, y, g


def conflict_temperature_scale(probs: npt.ArrayLike, gate: npt.ArrayLike, temperature: float, bias: npt.ArrayLike,
                               eps: float = 1e-12) -> np.ndarray:
    """``softmax_c(log max(p_c, eps) / T + g b_c)`` of ``p`` (C, N) with the conflict gate ``g`` (N,) in [0, 1]
    and per-class biases ``b`` (C,) -> (C, N). Where ``g = 0`` this is :func:`temperature_scale`; where the
    modalities conflict (``g`` > 0) the classes' odds move by ``exp(g (b_c - b_c'))``, so the argmax may change."""
    if not temperature > 0:
        raise ValueError(f"temperature must be > 0, got {temperature}")
    z = _log_probs(probs, eps) / float(temperature)
    z = z + np.asarray(gate, dtype=np.float64).reshape(1, -1) * np.asarray(bias, dtype=np.float64).reshape(-1, 1)
    z -= z.max(0, keepdims=True)
    e = np.exp(z)
    return e / e.sum(0, keepdims=True)


def _conflict_nll(z, y, g, params, with_grad: bool = False):
    """NLL of ``softmax(beta z + g b)``, b = (0, params[1:]), and its gradient in (beta, b_1 ...)."""
    b = np.concatenate([[0.0], params[1:]])
    s = params[0] * z + g[None] * b[:, None]
    s -= s.max(0, keepdims=True)
    e = np.exp(s)
    total = e.sum(0)
    idx = np.arange(y.size)
    nll = float((np.log(total) - s[y, idx]).mean())
    if not with_grad:
        return nll
    p = e / total
    p[y, idx] -= 1.0  # softmax - onehot
    grad_beta = float((p * z).sum(0).mean())
    grad_b = (p[1:] * g[None]).mean(1)
    return nll, np.concatenate([[grad_beta], grad_b])


def conflict_temperature_nll(probs: npt.ArrayLike, labels: npt.ArrayLike, gate: npt.ArrayLike, temperature: float,
                             bias: npt.ArrayLike, eps: float = 1e-12) -> float:
    """Mean NLL of the labels under :func:`conflict_temperature_scale`::

        NLL(T, b) = mean_n [ logsumexp_c(z_cn / T + g_n b_c) - z_{y_n n} / T - g_n b_{y_n} ],  z = log max(p, eps)
    """
    if not temperature > 0:
        raise ValueError(f"temperature must be > 0, got {temperature}")
    z, y, g = _conflict_inputs(probs, labels, gate, eps)
    b = np.asarray(bias, dtype=np.float64).reshape(-1)
    return _conflict_nll(z, y, g, np.concatenate([[1.0 / float(temperature)], b[1:] - b[0]]))


def fit_temperature_with_conflict(probs: npt.ArrayLike, labels: npt.ArrayLike, gate: npt.ArrayLike,
                                  eps: float = 1e-12, temperature: float | None = None) -> tuple[float, np.ndarray]:
    """T and biases ``b`` (C,; ``b_0 = 0``: a softmax ignores a shift common to all classes) minimising
    :func:`conflict_temperature_nll` on held-out ``probs`` (C, N), ``labels`` (N) and conflict gate ``gate`` (N).

    The logits ``z / T + g b`` are linear in (1/T, b), so the NLL is convex in them and L-BFGS-B (exact gradient)
    finds the global minimum within the bounds (1/T in :data:`BETA_RANGE`, ``|b_c|`` <= :data:`BIAS_BOUND`).
    Without conflicting voxels (``g = 0`` everywhere) ``b`` stays 0 and T is :func:`fit_temperature`'s. A given
    ``temperature`` is kept and only ``b`` fitted.
    """
    from scipy.optimize import minimize

    z, y, g = _conflict_inputs(probs, labels, gate, eps)
    if y.size == 0:
        raise ValueError("need at least one voxel to fit a temperature")
    if not np.any(g > 0):
        return (fit_temperature(probs, labels, eps) if temperature is None else float(temperature)), np.zeros(z.shape[0])
    beta = 1.0 if temperature is None else 1.0 / float(temperature)
    start = np.concatenate([[beta], np.zeros(z.shape[0] - 1)])
    bounds = [BETA_RANGE if temperature is None else (beta, beta)] + [(-BIAS_BOUND, BIAS_BOUND)] * (z.shape[0] - 1)
    res = minimize(lambda x: _conflict_nll(z, y, g, x, with_grad=True), start, jac=True, method="L-BFGS-B",
                   bounds=bounds, options={"maxiter": 500, "ftol": 1e-12, "gtol": 1e-9})
    return float(1.0 / res.x[0]), np.concatenate([[0.0], res.x[1:]])
