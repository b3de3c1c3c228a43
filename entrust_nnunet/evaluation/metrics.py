"""Segmentation and uncertainty-quality metrics for voxel maps.

Pure functions in the functional style of ``torchmetrics.functional``: every function takes arrays,
returns a number (or a small tuple / dict of arrays), keeps no state, and raises ``ValueError`` with
a readable message on malformed input. Inputs are numpy arrays (CPU torch tensors are converted with
``np.asarray``). The entropy decomposition the model computes lives with the model
(``entrust_nnunet.model.trustmap``); here are the metrics that score it.

Conventions shared by all functions

* ``probs`` is ``(C, *spatial)`` class probabilities that sum to 1 over ``C``; ``labels`` is
  ``(*spatial)`` integer classes in ``[0, C)``.
* ``mask`` (optional, ``(*spatial)`` boolean) restricts the voxels that enter a metric, e.g. the
  "foreground union boundary band" of :func:`foreground_boundary_mask`. A mask that selects no voxel
  gives ``nan``.
* "Undefined" results (both masks empty for Dice, only one class for AUROC, constant maps for
  Spearman, ...) are ``nan`` rather than an exception, so that per-case values can be aggregated with
  ``np.nanmean`` as nnU-Net does.

Contents

* overlap / distance: :func:`dice`, :func:`hd95`
* calibration: :func:`ece`, :func:`reliability_curve`, :func:`brier_score`, :func:`nll`,
  :func:`foreground_boundary_mask`
* error detection by uncertainty: :func:`auroc`, :func:`error_auroc`, :func:`risk_coverage_curve`,
  :func:`aurc`
* uncertainty decomposition: :func:`au_eu_entanglement`
* multi-annotator: :func:`generalized_energy_distance`, :func:`hungarian_matched_iou`
"""
from __future__ import annotations

import math
import warnings
from typing import Sequence

import numpy as np
import numpy.typing as npt
from nnunetv2.evaluation.evaluate_predictions import compute_tp_fp_fn_tn
from scipy import ndimage
from scipy.optimize import linear_sum_assignment
from scipy.stats import rankdata, spearmanr

__all__ = [
    "dice",
    "hd95",
    "ece",
    "expected_calibration_error",
    "calibration_statistics",
    "pool_calibration_statistics",
    "calibration_from_statistics",
    "reliability_curve",
    "foreground_boundary_mask",
    "brier_score",
    "nll",
    "auroc",
    "error_auroc",
    "risk_coverage_curve",
    "aurc",
    "au_eu_entanglement",
    "generalized_energy_distance",
    "hungarian_matched_iou",
    "hypothesis_coherence",
    "hypothesis_diversity",
]


# --------------------------------------------------------------------------------------------------
# validation helpers
# --------------------------------------------------------------------------------------------------
def _as_binary(x: npt.ArrayLike, name: str) -> np.ndarray:
    """Return ``x`` as a bool array; accept bool or numbers that are all 0/1."""
    a = np.asarray(x)
    if a.dtype == bool:
        return a
    if not (np.issubdtype(a.dtype, np.integer) or np.issubdtype(a.dtype, np.floating)):
        raise ValueError(f"{name} must be a boolean or 0/1 numeric array, got dtype {a.dtype}")
    if not np.all((a == 0) | (a == 1)):
        raise ValueError(f"{name} must be binary (only 0 and 1), got values outside {{0, 1}}")
    return a.astype(bool)


def _same_shape(a: np.ndarray, b: np.ndarray, name_a: str, name_b: str) -> None:
    if a.shape != b.shape:
        raise ValueError(f"{name_a} and {name_b} must have the same shape, got {a.shape} and {b.shape}")


def _check_mask(mask: npt.ArrayLike | None, shape: tuple[int, ...]) -> np.ndarray | None:
    if mask is None:
        return None
    m = _as_binary(mask, "mask")
    if m.shape != shape:
        raise ValueError(f"mask must have the spatial shape {shape}, got {m.shape}")
    return m


def _check_probs_labels(probs: npt.ArrayLike, labels: npt.ArrayLike,
                        mask: npt.ArrayLike | None) -> tuple[np.ndarray, np.ndarray, np.ndarray | None]:
    """Validate ``probs (C, *spatial)``, ``labels (*spatial)`` and the optional mask."""
    p = np.asarray(probs, dtype=np.float64)
    y = np.asarray(labels)
    if p.ndim < 1 or p.shape[0] < 1:
        raise ValueError(f"probs must have shape (C, *spatial) with C >= 1, got {p.shape}")
    if p.shape[1:] != y.shape:
        raise ValueError(f"labels must have the spatial shape of probs {p.shape[1:]}, got {y.shape}")
    if not np.issubdtype(y.dtype, np.integer):
        if y.dtype == bool or not np.issubdtype(y.dtype, np.floating) or not np.all(np.mod(y, 1) == 0):
            raise ValueError(f"labels must be integer class indices, got dtype {y.dtype}")
        y = y.astype(np.int64)
    if y.size and (y.min() < 0 or y.max() >= p.shape[0]):
        raise ValueError(f"labels must lie in [0, {p.shape[0]}), got range [{y.min()}, {y.max()}]")
    if not np.all(np.isfinite(p)) or p.min(initial=0.0) < 0.0 or p.max(initial=0.0) > 1.0 + 1e-6:
        raise ValueError("probs must be finite and lie in [0, 1]")
    if p.size and not np.allclose(p.sum(axis=0), 1.0, atol=1e-3):
        raise ValueError("probs must sum to 1 over the class axis 0 (did you pass logits, or channels last?)")
    return p, y, _check_mask(mask, y.shape)


def _flat_selected(x: np.ndarray, mask: np.ndarray | None) -> np.ndarray:
    """Spatial voxels of ``x`` as a flat vector (or ``(C, N)`` for a leading class axis)."""
    return x.reshape(-1) if mask is None else x[mask]


def _score_and_target(score: npt.ArrayLike, target: npt.ArrayLike, mask: npt.ArrayLike | None,
                      score_name: str, target_name: str) -> tuple[np.ndarray, np.ndarray]:
    s = np.asarray(score, dtype=np.float64)
    t = _as_binary(target, target_name)
    _same_shape(s, t, score_name, target_name)
    if not np.all(np.isfinite(s)):
        raise ValueError(f"{score_name} must be finite")
    m = _check_mask(mask, s.shape)
    return _flat_selected(s, m), _flat_selected(t, m)


# --------------------------------------------------------------------------------------------------
# overlap and distance
# --------------------------------------------------------------------------------------------------
def dice(pred_mask: npt.ArrayLike, gt_mask: npt.ArrayLike) -> float:
    """Dice similarity coefficient of two binary masks.

    ``Dice = 2 TP / (2 TP + FP + FN)``, with TP/FP/FN counted by nnU-Net's own
    ``nnunetv2.evaluation.evaluate_predictions.compute_tp_fp_fn_tn`` so that values match nnU-Net's
    ``summary.json``. Following nnU-Net, two empty masks (``TP + FP + FN = 0``) give ``nan`` (the
    case is excluded from the mean with ``np.nanmean``); one empty mask gives 0.

    Args:
        pred_mask: predicted binary mask (bool or 0/1), any shape.
        gt_mask: reference binary mask of the same shape.
    """
    pred = _as_binary(pred_mask, "pred_mask")
    gt = _as_binary(gt_mask, "gt_mask")
    _same_shape(pred, gt, "pred_mask", "gt_mask")
    tp, fp, fn, _ = compute_tp_fp_fn_tn(mask_ref=gt, mask_pred=pred)
    if tp + fp + fn == 0:
        return float("nan")
    return float(2 * tp / (2 * tp + fp + fn))


def hd95(pred_mask: npt.ArrayLike, gt_mask: npt.ArrayLike, spacing: float | Sequence[float]) -> float:
    """95th-percentile symmetric Hausdorff distance in mm, computed by MONAI.

    With ``dS`` the set of boundary voxels of a mask (MONAI: the voxels removed by a binary erosion)
    and ``d(x, B) = min_{y in B} ||(x - y) * spacing||_2``::

        HD95 = max( P95_{x in dPred} d(x, dGT),  P95_{y in dGT} d(y, dPred) )

    i.e. ``monai.metrics.compute_hausdorff_distance(..., percentile=95, spacing=spacing)``; the
    distance transform and percentile are MONAI's, not re-implemented here.

    Empty masks (MONAI itself returns nan/inf with a warning), defined here as:

    * both masks empty -> ``0.0`` (the prediction is exactly right: nothing to find, nothing found);
    * exactly one mask empty -> ``nan`` (the distance to an empty set is undefined; callers decide
      on a penalty, e.g. the image diagonal, when aggregating).

    Args:
        pred_mask: predicted binary mask, 2-D or 3-D.
        gt_mask: reference binary mask of the same shape.
        spacing: voxel size in mm, one value per axis in array order (e.g. ``(z, y, x)`` for a
            SimpleITK array), or a single number for isotropic voxels.
    """
    pred = _as_binary(pred_mask, "pred_mask")
    gt = _as_binary(gt_mask, "gt_mask")
    _same_shape(pred, gt, "pred_mask", "gt_mask")
    if pred.ndim not in (2, 3):
        raise ValueError(f"hd95 supports 2-D and 3-D masks, got {pred.ndim}-D")
    sp = np.atleast_1d(np.asarray(spacing, dtype=np.float64))
    if sp.size == 1:
        sp = np.repeat(sp, pred.ndim)
    if sp.ndim != 1 or sp.size != pred.ndim or not np.all(np.isfinite(sp)) or np.any(sp <= 0):
        raise ValueError(f"spacing must be one positive number or {pred.ndim} positive numbers, got {spacing!r}")
    n_pred, n_gt = int(pred.sum()), int(gt.sum())
    if n_pred == 0 and n_gt == 0:
        return 0.0
    if n_pred == 0 or n_gt == 0:
        return float("nan")
    import torch
    from monai.metrics import compute_hausdorff_distance  # heavy import (~4 s): only when used

    with warnings.catch_warnings():
        # MONAI 1.5/1.6 passes a deprecated argument to itself internally; not our concern.
        warnings.filterwarnings("ignore", category=FutureWarning, module=r"monai\..*")
        value = compute_hausdorff_distance(
            torch.from_numpy(pred)[None, None], torch.from_numpy(gt)[None, None],
            include_background=True, distance_metric="euclidean", percentile=95,
            spacing=[float(s) for s in sp],
        )
    return float(value.reshape(-1)[0])


# --------------------------------------------------------------------------------------------------
# calibration
# --------------------------------------------------------------------------------------------------
def calibration_statistics(probs: npt.ArrayLike, labels: npt.ArrayLike, n_bins: int = 15,
                           mask: npt.ArrayLike | None = None) -> dict[str, np.ndarray]:
    """Sufficient statistics of :func:`ece` and :func:`reliability_curve` (the "update" step).

    Per voxel ``conf = max_c p_c`` and ``correct = [argmax_c p_c == label]``; ``n_bins`` equal-width
    bins over [0, 1], right-closed ``(e_b, e_{b+1}]`` (the first bin also holds 0). Returns per bin
    ``count``, ``sum_confidence`` and ``sum_accuracy`` (sum of ``correct``). Statistics of several
    cases add up: :func:`pool_calibration_statistics`, then :func:`calibration_from_statistics`.

    Example:
        >>> p = np.array([[0.9, 0.2], [0.1, 0.8]]); y = np.array([0, 0])
        >>> round(calibration_from_statistics(calibration_statistics(p, y, n_bins=2))["ece"], 4)
        0.35
    """
    if isinstance(n_bins, bool) or not isinstance(n_bins, (int, np.integer)) or n_bins < 1:
        raise ValueError(f"n_bins must be a positive integer, got {n_bins!r}")
    p, y, m = _check_probs_labels(probs, labels, mask)
    p_flat = p.reshape(p.shape[0], -1) if m is None else p[:, m]
    y_flat = _flat_selected(y, m)
    conf = p_flat.max(axis=0)
    correct = (p_flat.argmax(axis=0) == y_flat).astype(np.float64)
    edges = np.linspace(0.0, 1.0, int(n_bins) + 1)
    idx = np.clip(np.searchsorted(edges, conf, side="left") - 1, 0, n_bins - 1)
    return {
        "count": np.bincount(idx, minlength=n_bins).astype(np.int64),
        "sum_confidence": np.bincount(idx, weights=conf, minlength=n_bins),
        "sum_accuracy": np.bincount(idx, weights=correct, minlength=n_bins),
    }


def pool_calibration_statistics(parts: Sequence[dict[str, np.ndarray]]) -> dict[str, np.ndarray]:
    """Bin-wise sum of :func:`calibration_statistics` of several cases (same ``n_bins``)."""
    if not parts:
        raise ValueError("need at least one set of calibration statistics")
    return {k: sum(np.asarray(p[k]) for p in parts) for k in ("count", "sum_confidence", "sum_accuracy")}


def calibration_from_statistics(stats: dict[str, np.ndarray]) -> dict:
    """The "compute" step: reliability curve and ECE from :func:`calibration_statistics`::

        confidence_b = sum_confidence_b / count_b,  accuracy_b = sum_accuracy_b / count_b  (nan if empty)
        ECE = sum_b |sum_accuracy_b - sum_confidence_b| / sum_b count_b  (= sum_b |B_b|/N |acc_b - conf_b|)

    Returns ``bin_edges``, ``confidence``, ``accuracy``, ``count`` and ``ece`` (``nan`` for no voxel).
    """
    count = np.asarray(stats["count"])
    with np.errstate(invalid="ignore", divide="ignore"):
        confidence = np.where(count > 0, stats["sum_confidence"] / count, np.nan)
        accuracy = np.where(count > 0, stats["sum_accuracy"] / count, np.nan)
    n = count.sum()
    ece_value = float(np.abs(stats["sum_accuracy"] - stats["sum_confidence"]).sum() / n) if n > 0 else float("nan")
    return {"bin_edges": np.linspace(0.0, 1.0, count.size + 1), "confidence": confidence, "accuracy": accuracy,
            "count": count.astype(np.int64), "ece": ece_value}


def ece(probs: npt.ArrayLike, labels: npt.ArrayLike, n_bins: int = 15,
        mask: npt.ArrayLike | None = None) -> float:
    """Expected calibration error (top-label, equal-width bins).

    Per voxel ``conf = max_c p_c`` and ``correct = [argmax_c p_c == label]``. Voxels are put in
    ``n_bins`` equal-width bins ``B_b = (b/n, (b+1)/n]`` over [0, 1] by confidence, and::

        ECE = sum_b |B_b| / N * | acc(B_b) - conf(B_b) |

    with ``acc(B_b)`` / ``conf(B_b)`` the mean correctness / confidence in the bin and ``N`` the
    number of (masked) voxels. Empty bins contribute 0. ``nan`` if the mask selects no voxel.

    Args:
        probs: ``(C, *spatial)`` class probabilities summing to 1 over ``C``.
        labels: ``(*spatial)`` integer reference labels.
        n_bins: number of bins (15 as in Guo et al. 2017).
        mask: optional ``(*spatial)`` boolean voxel selection, e.g. :func:`foreground_boundary_mask`.
    """
    return calibration_from_statistics(calibration_statistics(probs, labels, n_bins, mask))["ece"]


#: Long name of :func:`ece`.
expected_calibration_error = ece


def reliability_curve(probs: npt.ArrayLike, labels: npt.ArrayLike, n_bins: int = 15,
                      mask: npt.ArrayLike | None = None) -> dict[str, np.ndarray]:
    """Per-bin data of a reliability diagram, with exactly the binning of :func:`ece`.

    Returns ``bin_edges`` ``(n_bins + 1,)``, ``confidence`` (mean ``max_c p_c`` per bin, ``nan`` if
    empty), ``accuracy`` (fraction with ``argmax_c p_c == label``, ``nan`` if empty) and ``count``.
    ``ece == nansum(count * |accuracy - confidence|) / sum(count)``; a perfectly calibrated model has
    ``accuracy == confidence`` (the diagonal).

    Args: as :func:`ece`.
    """
    curve = calibration_from_statistics(calibration_statistics(probs, labels, n_bins, mask))
    curve.pop("ece")
    return curve


def foreground_boundary_mask(labels: npt.ArrayLike, pred: npt.ArrayLike, width: int = 2) -> np.ndarray:
    """Voxels where calibration is worth measuring: foreground of GT or prediction plus a GT boundary band.

    ``mask = (labels > 0) | (pred > 0) | dilate(labels > 0, width)``, where ``dilate`` is
    ``scipy.ndimage.binary_dilation`` with the face-connected structuring element iterated ``width``
    times (a city-block ball of radius ``width`` voxels). Because the inner side of the GT boundary is
    foreground already, this is "foreground union a band of ``width`` voxels around every GT
    boundary"; inter-class boundaries inside the foreground are included by construction.

    Why: in medical volumes background is typically > 95 % of the voxels and trivially right with
    confidence ~1, so whole-image ECE/Brier/NLL are dominated by it and tend to 0 for any model.
    Restricting to foreground (either opinion, so neither false positives nor misses are hidden)
    plus the GT boundary band, where the ambiguity lives, makes the calibration metrics informative.

    Args:
        labels: ``(*spatial)`` reference label map (0 = background).
        pred: ``(*spatial)`` predicted label map (0 = background), or a binary mask.
        width: band width in voxels (>= 0; 0 gives just the union of the foregrounds).
    """
    y = np.asarray(labels)
    p = np.asarray(pred)
    _same_shape(y, p, "labels", "pred")
    if isinstance(width, bool) or not isinstance(width, (int, np.integer)) or width < 0:
        raise ValueError(f"width must be a non-negative integer, got {width!r}")
    if y.ndim == 0:
        raise ValueError("labels must have at least one spatial dimension")
    fg_gt = y > 0
    out = fg_gt | (p > 0)
    if width > 0 and fg_gt.any():
        structure = ndimage.generate_binary_structure(y.ndim, 1)
        out |= ndimage.binary_dilation(fg_gt, structure=structure, iterations=int(width))
    return out


def lesion_edges(labels: npt.ArrayLike, exclude: npt.ArrayLike | None = None, width: int = 1,
                 margin: int = 2) -> np.ndarray:
    """Voxels of ordinary boundary doubt: within ``width`` voxels of the foreground's boundary, on either side,
    away from ``exclude`` (e.g. the true conflict mask)::

        edges = (dilate(fg, width) & ~erode(fg, width)) & ~dilate(exclude, margin),   fg = labels > 0

    (face-connected structuring element, as :func:`foreground_boundary_mask`). The negatives when a conflict
    map is scored for telling "the modalities disagree" from "the edge is fuzzy"."""
    y = np.asarray(labels)
    if y.ndim == 0:
        raise ValueError("labels must have at least one spatial dimension")
    if isinstance(width, bool) or not isinstance(width, (int, np.integer)) or width < 1 or margin < 0:
        raise ValueError(f"need an integer width >= 1 and margin >= 0, got {width!r}, {margin!r}")
    structure = ndimage.generate_binary_structure(y.ndim, 1)
    fg = y > 0
    out = ndimage.binary_dilation(fg, structure, int(width)) & ~ndimage.binary_erosion(fg, structure, int(width),
                                                                                      border_value=1)
    if exclude is not None:
        ex = _as_binary(exclude, "exclude")
        _same_shape(y, ex, "labels", "exclude")
        out &= ~(ndimage.binary_dilation(ex, structure, int(margin)) if margin and ex.any() else ex)
    return out


def brier_score(probs: npt.ArrayLike, labels: npt.ArrayLike, mask: npt.ArrayLike | None = None) -> float:
    """Multi-class Brier score: ``mean_voxels sum_c (p_c - [label == c])^2`` (range [0, 2]).

    ``nan`` if the mask selects no voxel.

    Args:
        probs: ``(C, *spatial)`` class probabilities summing to 1 over ``C``.
        labels: ``(*spatial)`` integer reference labels.
        mask: optional ``(*spatial)`` boolean voxel selection.
    """
    p, y, m = _check_probs_labels(probs, labels, mask)
    p_flat = p.reshape(p.shape[0], -1) if m is None else p[:, m]
    y_flat = _flat_selected(y, m)
    if y_flat.size == 0:
        return float("nan")
    onehot = np.arange(p.shape[0])[:, None] == y_flat[None, :]
    return float(((p_flat - onehot) ** 2).sum(axis=0).mean())


def nll(probs: npt.ArrayLike, labels: npt.ArrayLike, mask: npt.ArrayLike | None = None,
        eps: float = 1e-7) -> float:
    """Mean negative log-likelihood of the reference label: ``mean_voxels -log(max(p_label, eps))`` (nats).

    ``eps`` bounds the penalty of a confidently wrong voxel at ``-log(eps)``. ``nan`` if the mask
    selects no voxel.

    Args:
        probs: ``(C, *spatial)`` class probabilities summing to 1 over ``C``.
        labels: ``(*spatial)`` integer reference labels.
        mask: optional ``(*spatial)`` boolean voxel selection.
        eps: lower clip of the probability, in (0, 1).
    """
    if not 0.0 < eps < 1.0:
        raise ValueError(f"eps must be in (0, 1), got {eps}")
    p, y, m = _check_probs_labels(probs, labels, mask)
    p_flat = p.reshape(p.shape[0], -1) if m is None else p[:, m]
    y_flat = _flat_selected(y, m)
    if y_flat.size == 0:
        return float("nan")
    p_true = p_flat[y_flat, np.arange(y_flat.size)]
    return float(-np.log(np.maximum(p_true, eps)).mean())


# --------------------------------------------------------------------------------------------------
# uncertainty as an error detector
# --------------------------------------------------------------------------------------------------
def auroc(score: npt.ArrayLike, target: npt.ArrayLike, mask: npt.ArrayLike | None = None) -> float:
    """Area under the ROC curve of ``score`` for detecting ``target == 1``, by the rank statistic.

    With ``R_i`` the average ranks of all scores (``scipy.stats.rankdata``, ties get the mean rank),
    ``n1`` positives and ``n0`` negatives (Mann-Whitney U)::

        AUROC = (sum_{i: target_i = 1} R_i - n1 (n1 + 1) / 2) / (n1 n0)
              = P(score_pos > score_neg) + 0.5 P(score_pos == score_neg)

    This equals the trapezoidal ROC area (``sklearn.metrics.roc_auc_score``). ``nan`` if only one
    class is present (or the mask selects no voxel).

    Args:
        score: real-valued scores, any shape (higher = more likely positive).
        target: binary targets of the same shape.
        mask: optional boolean voxel selection of the same shape.
    """
    s, t = _score_and_target(score, target, mask, "score", "target")
    n1 = int(t.sum())
    n0 = t.size - n1
    if n1 == 0 or n0 == 0:
        return float("nan")
    ranks = rankdata(s)  # method="average"
    u = ranks[t].sum() - n1 * (n1 + 1) / 2.0
    return float(u / (n1 * n0))


def error_auroc(uncertainty: npt.ArrayLike, error_mask: npt.ArrayLike,
                mask: npt.ArrayLike | None = None) -> float:
    """AUROC of an uncertainty map for detecting segmentation errors.

    ``error_auroc = auroc(score=uncertainty, target=error_mask)`` with ``error_mask = (prediction !=
    ground truth)``: the probability that a randomly chosen wrong voxel is more uncertain than a
    randomly chosen right voxel (ties count 1/2). 0.5 = uninformative, 1 = errors perfectly ranked
    first. ``nan`` if there are no errors or only errors.

    Args:
        uncertainty: uncertainty map, any shape (higher = less certain).
        error_mask: binary map of wrong voxels, same shape.
        mask: optional boolean voxel selection.
    """
    return auroc(uncertainty, error_mask, mask=mask)


def risk_coverage_curve(uncertainty: npt.ArrayLike, error_mask: npt.ArrayLike,
                        mask: npt.ArrayLike | None = None) -> tuple[np.ndarray, np.ndarray]:
    """Selective-prediction risk-coverage curve of an uncertainty map.

    Voxels are sorted by increasing uncertainty. With ``e_(i)`` the error indicator of the i-th most
    certain voxel and ``N`` voxels, for ``k = 1..N``::

        coverage_k = k / N,    risk_k = (1 / k) sum_{i <= k} e_(i)

    i.e. ``risk_k`` is the error rate among the ``k`` most certain voxels. ``risk_N`` is the overall
    error rate. Ties are averaged: a map cannot order voxels it gives the same value (softmax's
    ``1 - max p`` is exactly 0 on many confident voxels), so inside a group of ``n`` tied voxels holding
    ``m`` errors the j-th counts ``j m / n`` errors, the expectation over every order of the group
    (without ties this is the sum above). Empty arrays (or masks) give empty curves.

    Args:
        uncertainty: uncertainty map, any shape.
        error_mask: binary map of wrong voxels, same shape.
        mask: optional boolean voxel selection.

    Returns:
        ``(coverage, risk)``, two float64 arrays of length ``N``.
    """
    u, e = _score_and_target(uncertainty, error_mask, mask, "uncertainty", "error_mask")
    order = np.argsort(u, kind="stable")
    u, errors = u[order], np.cumsum(e[order], dtype=np.float64)
    k = np.arange(1, u.size + 1, dtype=np.float64)
    if u.size:
        starts = np.r_[True, u[1:] != u[:-1]]  # where a tie group begins
        first = np.flatnonzero(starts)
        last = np.r_[first[1:], u.size] - 1
        group = np.cumsum(starts) - 1
        before = np.r_[0.0, errors[last[:-1]]]  # errors ranked before each group
        within = (np.arange(u.size) - first[group] + 1) / (last - first + 1)[group]
        errors = before[group] + (errors[last] - before)[group] * within
    return k / max(u.size, 1), errors / k


def aurc(uncertainty: npt.ArrayLike, error_mask: npt.ArrayLike, mask: npt.ArrayLike | None = None) -> float:
    """Area under the risk-coverage curve: ``AURC = (1 / N) sum_{k=1..N} risk_k``.

    ``risk_k`` as in :func:`risk_coverage_curve` (error rate among the ``k`` most certain voxels,
    ties averaged): a right-Riemann sum of the curve over coverage steps of ``1 / N``. Lower is
    better; the minimum for an error rate ``r`` is reached when all errors are ranked last (about
    ``r + (1 - r) log(1 - r)``), a random ranking gives about ``r``. ``nan`` for no voxels.

    Args: as :func:`risk_coverage_curve`.
    """
    _, risk = risk_coverage_curve(uncertainty, error_mask, mask=mask)
    if risk.size == 0:
        return float("nan")
    return float(risk.mean())


# --------------------------------------------------------------------------------------------------
# uncertainty decomposition
# --------------------------------------------------------------------------------------------------
def au_eu_entanglement(aleatoric: npt.ArrayLike, epistemic: npt.ArrayLike,
                       mask: npt.ArrayLike | None = None) -> float:
    """Entanglement of aleatoric and epistemic maps: Spearman rank correlation over voxels.

    ``rho = Pearson(rank(aleatoric), rank(epistemic))`` (average ranks for ties),
    ``scipy.stats.spearmanr``. Interpretation: ``rho ~ 0`` = disentangled (the maps order voxels
    independently), ``rho = 1`` = the two maps carry the same ranking (one of them adds no
    information), negative = anti-aligned. ``nan`` if either map is constant over the selected voxels
    or fewer than 2 voxels are selected.

    Args:
        aleatoric: aleatoric uncertainty map, any shape.
        epistemic: epistemic uncertainty map, same shape.
        mask: optional boolean voxel selection.
    """
    a = np.asarray(aleatoric, dtype=np.float64)
    b = np.asarray(epistemic, dtype=np.float64)
    _same_shape(a, b, "aleatoric", "epistemic")
    if not (np.all(np.isfinite(a)) and np.all(np.isfinite(b))):
        raise ValueError("aleatoric and epistemic must be finite")
    m = _check_mask(mask, a.shape)
    a, b = _flat_selected(a, m), _flat_selected(b, m)
    if a.size < 2 or np.all(a == a[0]) or np.all(b == b[0]):
        return float("nan")
    return float(spearmanr(a, b).statistic)


# --------------------------------------------------------------------------------------------------
# multi-annotator
# --------------------------------------------------------------------------------------------------
def _stack_of_masks(x: npt.ArrayLike, name: str) -> np.ndarray:
    a = np.asarray(x)
    if a.ndim < 2 or a.shape[0] < 1:
        raise ValueError(f"{name} must have shape (n, *spatial) with n >= 1, got {a.shape}")
    if not (a.dtype == bool or np.issubdtype(a.dtype, np.integer)):
        raise ValueError(f"{name} must be boolean or integer label maps, got dtype {a.dtype}")
    return a


def _pairwise_iou(x: np.ndarray, y: np.ndarray, labels: Sequence[int] | None) -> np.ndarray:
    """``(len(x), len(y))`` IoU matrix; per class mean over ``labels``; IoU(empty, empty) = 1."""
    classes = [None] if labels is None else list(labels)
    out = np.zeros((x.shape[0], y.shape[0]), dtype=np.float64)
    for c in classes:
        xb = (x != 0) if c is None else (x == c)
        yb = (y != 0) if c is None else (y == c)
        xf = xb.reshape(xb.shape[0], -1).astype(np.float64)
        yf = yb.reshape(yb.shape[0], -1).astype(np.float64)
        inter = xf @ yf.T
        union = xf.sum(1)[:, None] + yf.sum(1)[None, :] - inter
        with np.errstate(invalid="ignore", divide="ignore"):
            out += np.where(union > 0, inter / np.maximum(union, 1), 1.0)
    return out / len(classes)


def _check_sets(samples, annotators, labels):
    s = _stack_of_masks(samples, "samples")
    y = _stack_of_masks(annotators, "annotators")
    if s.shape[1:] != y.shape[1:]:
        raise ValueError(f"samples and annotators must share the spatial shape, got {s.shape[1:]} and {y.shape[1:]}")
    if labels is not None:
        labels = [int(c) for c in labels]
        if len(labels) == 0 or any(c == 0 for c in labels):
            raise ValueError("labels must be a non-empty list of foreground (non-zero) classes")
    return s, y, labels


def generalized_energy_distance(samples: npt.ArrayLike, annotators: npt.ArrayLike,
                                labels: Sequence[int] | None = None) -> float:
    """Squared generalized energy distance between predicted samples and annotator segmentations.

    With ``d(a, b) = 1 - IoU(a, b)`` (Kohl et al. 2018, Probabilistic U-Net)::

        GED^2 = 2 E[d(S, Y)] - E[d(S, S')] - E[d(Y, Y')]

    where the expectations are plain means over *all* ordered pairs, including ``S' = S`` and
    ``Y' = Y`` (whose distance is 0), as in the reference implementations (V-statistic; with a single
    sample the middle term is 0). Convention: ``IoU(empty, empty) = 1``, i.e. ``d(empty, empty) = 0``
    (two empty masks agree perfectly); one empty and one non-empty gives ``d = 1``.

    Args:
        samples: ``(S, *spatial)`` predicted masks / label maps.
        annotators: ``(A, *spatial)`` annotator masks / label maps.
        labels: ``None`` for binary foreground (``x != 0``); else a list of foreground classes, and
            ``d = mean_c (1 - IoU_c)`` over them (PHiSeg's multi-class variant).

    Returns:
        ``GED^2`` (a float >= 0 in practice; lower is better).
    """
    s, y, labels = _check_sets(samples, annotators, labels)
    d_sy = 1.0 - _pairwise_iou(s, y, labels)
    d_ss = 1.0 - _pairwise_iou(s, s, labels)
    d_yy = 1.0 - _pairwise_iou(y, y, labels)
    return float(2.0 * d_sy.mean() - d_ss.mean() - d_yy.mean())


def hungarian_matched_iou(samples: npt.ArrayLike, annotators: npt.ArrayLike,
                          labels: Sequence[int] | None = None) -> float:
    """Mean IoU of the optimal one-to-one matching between samples and annotators.

    Both sets are replicated to ``L = lcm(S, A)`` elements (each sample ``L / S`` times, each
    annotator ``L / A`` times), so that every sample and every annotator carries equal weight, as in
    Kohl et al. 2019 (Hierarchical Probabilistic U-Net) and follow-ups. The ``L x L`` IoU matrix is
    solved with ``scipy.optimize.linear_sum_assignment(maximize=True)`` and::

        matched_IoU = (1 / L) max_{pi} sum_i IoU(S_i, Y_pi(i))

    IoU conventions as in :func:`generalized_energy_distance` (``IoU(empty, empty) = 1``). Higher is
    better; 1 means the sample set reproduces the annotator set. Cost: the assignment is ``O(L^3)``,
    fine for the usual counts (e.g. 16 samples vs 4 annotators -> L = 16).

    Args: as :func:`generalized_energy_distance`.
    """
    s, y, labels = _check_sets(samples, annotators, labels)
    iou = _pairwise_iou(s, y, labels)
    n_s, n_a = iou.shape
    big = n_s * n_a // math.gcd(n_s, n_a)
    tiled = np.tile(iou, (big // n_s, big // n_a))  # row i -> sample i % S, column j -> annotator j % A
    rows, cols = linear_sum_assignment(tiled, maximize=True)
    return float(tiled[rows, cols].mean())


# --------------------------------------------------------------------------------------------------
# hypotheses as whole alternatives
# --------------------------------------------------------------------------------------------------
def _blob_fractions(hypotheses: npt.ArrayLike, conflict: npt.ArrayLike) -> np.ndarray:
    """(K, B) lesion fraction of each hypothesis inside each connected conflict blob."""
    h = np.asarray(hypotheses)
    c = _as_binary(conflict, "conflict")
    if h.ndim < 2 or h.shape[1:] != c.shape:
        raise ValueError(f"hypotheses must be (K, *spatial) with spatial {c.shape}, got {h.shape}")
    blobs, n = ndimage.label(c)
    lesion = (h != 0).reshape(h.shape[0], -1).astype(np.float64)
    flat = blobs.reshape(-1)
    sizes = np.bincount(flat, minlength=n + 1)[1:]
    inside = np.stack([np.bincount(flat, weights=row, minlength=n + 1)[1:] for row in lesion]) if n else \
        np.zeros((h.shape[0], 0))
    return inside / np.maximum(sizes, 1)


def hypothesis_coherence(hypotheses: npt.ArrayLike, conflict: npt.ArrayLike, whole: float = 0.8) -> float:
    """Share of (conflict blob, hypothesis) pairs in which the hypothesis takes or leaves the blob WHOLE.

    Blobs are the connected components of ``conflict``; with ``f_kb`` the lesion (non-zero) fraction of
    hypothesis k inside blob b::

        coherence = mean_{k, b} [ f_kb >= whole  or  f_kb <= 1 - whole ]

    ``nan`` when there is no conflict blob. Args: ``hypotheses`` (K, *spatial) label maps;
    ``conflict`` (*spatial) binary.
    """
    f = _blob_fractions(hypotheses, conflict)
    if f.size == 0:
        return float("nan")
    return float(((f >= whole) | (1 - f >= whole)).mean())  # not f <= 1 - whole: 1 - 0.8 is 0.19999999999999996


def hypothesis_diversity(hypotheses: npt.ArrayLike, conflict: npt.ArrayLike, whole: float = 0.8) -> float:
    """Whether the hypotheses hold BOTH readings of every conflict blob: 1.0 if each blob is taken whole
    (``f_kb >= whole``) by some hypothesis and left whole (``f_kb <= 1 - whole``) by another, else 0.0;
    ``nan`` without conflict. Averaged over conflict cases it is the share of cases with both readings."""
    f = _blob_fractions(hypotheses, conflict)
    if f.size == 0:
        return float("nan")
    return float(((f >= whole).any(0) & (1 - f >= whole).any(0)).all())
