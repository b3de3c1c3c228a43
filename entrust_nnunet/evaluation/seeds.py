"""Numbers over training seeds: mean ± standard deviation, and whether a target holds beyond the spread.

Pure functions on lists of per-seed values (one value per training seed; ``None``/NaN are dropped).
"""
from __future__ import annotations

import math
from typing import Sequence

MET, MISSED, WITHIN_NOISE = "met", "missed", "within noise"


def _clean(values: Sequence[float | None]) -> list[float]:
    return [float(v) for v in values if v is not None and not math.isnan(float(v))]


def mean_std(values: Sequence[float | None]) -> tuple[float, float]:
    """``(mean, s)`` with ``s = sqrt(sum_i (x_i - mean)^2 / (n - 1))`` the sample standard deviation;
    ``s = nan`` for one value, both ``nan`` for none."""
    x = _clean(values)
    if not x:
        return math.nan, math.nan
    m = sum(x) / len(x)
    return m, (math.sqrt(sum((v - m) ** 2 for v in x) / (len(x) - 1)) if len(x) > 1 else math.nan)


def format_mean_std(mean, std, digits: int = 3, scale: float = 1.0) -> str:
    """``"m ± s"`` of :func:`mean_std`'s pair (times ``scale``), ``"m"`` without a spread (one value: ``s`` is nan),
    ``"n/a"`` without a mean."""
    def number(v) -> bool:
        return isinstance(v, (int, float)) and v == v

    if not number(mean):
        return "n/a"
    text = f"{mean * scale:.{digits}f}"
    return f"{text} ± {std * scale:.{digits}f}" if number(std) else text


def verdict(ours: Sequence[float | None], reference: Sequence[float | None] | float, higher_is_better: bool,
            factor: float = 1.0) -> dict:
    """Is ``mean(ours)`` better than ``factor * mean(reference)`` by more than the spread?

    ``d = mean(ours) - factor * mean(reference)``, signed so that ``d > 0`` is better (flipped when lower
    is better). The spread is the pooled standard deviation of the two groups,
    ``s = sqrt((s_ours^2 + factor^2 s_ref^2) / 2)`` (equal group sizes), or ``s = s_ours`` when
    ``reference`` is a fixed bound (a number). Verdict: ``met`` if ``d > s``, ``missed`` if ``d < -s``,
    else ``within noise``. With fewer than two values a side there is no spread (``s`` is ``nan``): the
    verdict is then the plain comparison (``d >= 0``: met) and ``spread`` says ``False``.

    Returns ``{"verdict", "difference" (d, signed as above), "pooled_std" (s), "spread" (bool)}``.
    """
    m_ours, s_ours = mean_std(ours)
    if isinstance(reference, (int, float)):
        m_ref, s = float(reference), s_ours
    else:
        m_ref, s_ref = mean_std(reference)
        s = math.sqrt((s_ours ** 2 + factor ** 2 * s_ref ** 2) / 2)
    d = (m_ours - factor * m_ref) * (1 if higher_is_better else -1)
    if math.isnan(d):
        return {"verdict": None, "difference": d, "pooled_std": s, "spread": False}
    if math.isnan(s):
        return {"verdict": MET if d >= 0 else MISSED, "difference": d, "pooled_std": s, "spread": False}
    result = MET if d > s or (s == 0 and d >= 0) else MISSED if d < -s else WITHIN_NOISE
    return {"verdict": result, "difference": d, "pooled_std": s, "spread": True}
