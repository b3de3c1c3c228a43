"""Fitting TrustMap's CalibHead on cases the network never trained on.

The voxels come from the same prediction path as inference (nnU-Net's sliding window, mirroring,
pooled hypotheses: :meth:`EnTrustPredictor.pooled_statistics`), so the head learns on exactly the
statistics it will see. Which cases: the validation fold of the trained fold; with fold ``all`` a
seeded subset of the training cases held out of training (:func:`calibration_subset`).
"""
from __future__ import annotations

import zlib
from dataclasses import dataclass
from pathlib import Path
from typing import Callable, Iterable

import numpy as np
import torch
from torch.nn import functional as F

from entrust_nnunet.data.io import InputError, atomic_file
from entrust_nnunet.evaluation.metrics import foreground_boundary_mask
from entrust_nnunet.evaluation.temperature import (conflict_temperature_nll, fit_temperature,
                                                   fit_temperature_with_conflict, temperature_nll)
from entrust_nnunet.model.alternatives import READINGS
from entrust_nnunet.model.outputs import MIN_PROBABILITY
from entrust_nnunet.model.trustmap import STATISTICS, CalibHead, calibrated_log_probabilities

#: Adam steps of a fit when no held-out cases choose the number
CALIBRATION_STEPS = 1000

Voxels = tuple[dict[str, torch.Tensor], torch.Tensor]


def calibration_subset(keys, fraction: float, seed: int) -> list:
    """A seeded subset of ``keys`` (at least one, and at least one left for training) for CalibHead."""
    keys = sorted(keys)
    if len(keys) < 2 or fraction <= 0:
        return []
    n = min(len(keys) - 1, max(1, int(round(fraction * len(keys)))))
    return sorted(np.random.RandomState(seed).choice(keys, n, replace=False).tolist())


@torch.no_grad()
def case_voxels(stats: dict[str, torch.Tensor], seg: np.ndarray, key: str, max_voxels: int,
                label_manager=None) -> Voxels:
    """CalibHead's inputs, ``fg_boundary`` (1 on foreground of label or mask plus a 2-voxel band around the
    label, where calibration is judged; ``label_region`` its label's part, so that another mask's flags can be
    derived) and the error indicator (mask != label) of one case's voxels.

    The mask is nnU-Net's: ``label_manager.convert_probabilities_to_segmentation`` of the calibrated probabilities
    (``stats["calibrated"]`` where given, else the mean; regions converted with ``regions_class_order``; argmax
    for labels, also without a label manager), so the error is that of the exported, converted mask. For labels
    the raw mean, the label and the conflict gate are kept too: a new class calibration re-derives the mask's
    confidence and error from them (:func:`class_calibrated_voxels`). Voxels outside nnU-Net's crop mask
    (label < 0) and under its ignore label are skipped; at most ``max_voxels`` are kept, a subset seeded by the
    case name (the same voxels whenever the case is seen again).
    """
    seg = torch.from_numpy(np.asarray(seg)[0]).to(stats["entropy"].device)
    keep = seg >= 0
    ignore = None if label_manager is None else label_manager.ignore_label
    if ignore is not None:
        keep &= seg != ignore
        seg = torch.where(seg == ignore, torch.zeros_like(seg), seg)
    valid = keep.flatten().nonzero()[:, 0].cpu()
    if valid.numel() > max_voxels:
        gen = torch.Generator().manual_seed(zlib.crc32(key.encode("utf-8")))
        valid = valid[torch.randperm(valid.numel(), generator=gen)[:max_voxels]]
    decided = stats.get("calibrated", stats["mean"])
    if label_manager is None:
        pred = decided.argmax(0)
    else:
        pred = torch.as_tensor(label_manager.convert_probabilities_to_segmentation(decided.cpu()))
        pred = pred.to(seg.device).long()
    mask_v, label_v = pred.flatten().cpu()[valid], seg.flatten().cpu()[valid]  # the kept voxels, selected once
    error = (mask_v != label_v).float()
    labels = seg.clamp_min(0).cpu().numpy()
    # the label's part of the foreground + boundary flags, whatever the mask
    label_region = torch.from_numpy(foreground_boundary_mask(labels, np.zeros_like(labels))).flatten()[valid].float()
    columns = {k: stats[k].flatten().float().cpu()[valid] for k in STATISTICS}
    columns["label_region"] = label_region
    columns["fg_boundary"] = foreground_boundary_flags(label_region, mask_v)
    if label_manager is None or not label_manager.has_regions:
        # the class temperature's voxels (a softmax's temperature: region sigmoids keep T = 1)
        columns["label"] = label_v.long()
        columns["probabilities"] = stats["mean"].flatten(1).float().cpu()[:, valid].T
        gate = stats.get("gate", torch.zeros_like(stats["entropy"]))
        columns["gate"] = gate.flatten().float().cpu()[valid]
    return columns, error


def foreground_boundary_flags(label_region: torch.Tensor, mask: torch.Tensor) -> torch.Tensor:
    """1 where calibration is judged (:func:`~entrust_nnunet.evaluation.metrics.foreground_boundary_mask`): the
    label's foreground + boundary band (``label_region``) or the mask's foreground; else 0."""
    return ((label_region > 0) | (mask > 0)).float()


def class_calibrated_voxels(voxels: Voxels, temperature, bias) -> Voxels:
    """``voxels`` with the mask of the class calibration (T, b) (labels; regions are returned as they are): the
    calibrated probabilities ``softmax(log mean / T + g b)``, their top probability as ``confidence`` and the
    error of their argmax. CalibHead and the calibrator learn the error of the mask that is exported."""
    columns, error = voxels
    if "probabilities" not in columns:
        return voxels
    gate = columns["gate"] if "gate" in columns else torch.zeros(columns["label"].shape)
    probs = torch.softmax(calibrated_log_probabilities(columns["probabilities"], torch.as_tensor(temperature),
                                                       gate[:, None], torch.as_tensor(bias), axis=1), 1)
    mask = probs.argmax(1)
    columns = {**columns, "confidence": probs.amax(1)}
    if "label_region" in columns:  # the foreground + boundary flags of this mask (files before them keep theirs)
        columns["fg_boundary"] = foreground_boundary_flags(columns["label_region"], mask)
    return columns, (mask != columns["label"]).float()


def calibration_voxels(predictor, cases: Iterable, names, cache: dict, max_voxels_per_case: int,
                       case_keys=None) -> Voxels:
    """Voxels of ``names``: ``cases`` yields (name, data, seg, present) of those not yet in ``cache`` (filled
    here); ``present`` (M flags, None = every modality) masks the absent modalities as inference does. The column
    ``case`` numbers the cases, the unit :func:`choose_reading` resamples: ``case_keys`` gives each name's case
    (one case for the modality sets of one image; default: each name its own)."""
    for name, data, seg, present in cases:
        with predictor.modalities_present(present):
            stats = predictor.pooled_statistics(data)
        cache[name] = case_voxels(stats, seg, name, max_voxels_per_case, predictor.label_manager)
    columns = {k: torch.cat([cache[name][0][k] for name in names]) for k in cache[names[0]][0]}
    number: dict = {}
    columns["case"] = torch.cat([torch.full(cache[name][1].shape, number.setdefault(key, len(number)), dtype=torch.int32)
                                 for name, key in zip(names, names if case_keys is None else case_keys)])
    return columns, torch.cat([cache[name][1] for name in names])


def fit_calib_head(calib: CalibHead, voxels_of: Callable[[list], Voxels], keys, max_steps: int = CALIBRATION_STEPS) -> str:
    """Fit ``calib`` on the voxels of ``keys`` (``voxels_of(keys)``); returns a one-line summary.

    With two cases or more, every other case judges a fit on the rest, which picks the number of
    steps (early stopping: a handful of calibration cases is easy to overfit); the head is then
    fitted on all of ``keys`` for that many steps (at most ``max_steps``).
    """
    keys = sorted(keys)
    steps = max_steps
    if len(keys) >= 2:
        _, steps = calib.fit_voxels(*voxels_of(keys[0::2]), steps=steps, judge=voxels_of(keys[1::2]))
    columns, error = voxels_of(keys)
    bce, _ = calib.fit_voxels(columns, error, steps=steps)
    return (f"{len(keys)} cases ({error.numel()} voxels, error rate {float(error.mean()):.4f}, {steps} steps "
            f"chosen on held-out cases, BCE {bce:.4f})")


def fit_class_calibration(probs: np.ndarray, labels: np.ndarray, gate: np.ndarray, conflict_biases: bool
                          ) -> tuple[float, np.ndarray]:
    """T by NLL on every voxel (:func:`~entrust_nnunet.evaluation.temperature.fit_temperature`), then, with
    ``conflict_biases``, the biases b with T kept (:func:`~entrust_nnunet.evaluation.temperature.
    fit_temperature_with_conflict`): fitted jointly, T followed the few conflicting voxels (sharpened to 0.4-0.6
    from 0.7-0.8 on the development seed) and every other voxel's calibration with it (docs/design.md)."""
    # the floor the network's output puts on probabilities: fit what inference applies
    t = fit_temperature(probs, labels, eps=MIN_PROBABILITY)
    if not conflict_biases:
        return t, np.zeros(probs.shape[0])
    return fit_temperature_with_conflict(probs, labels, gate, eps=MIN_PROBABILITY, temperature=t)


#: the showing reading replaces the vote only when it predicts the conflicting voxels better in at least this share
#: of the calibration cases' resamples: one fold's handful of coin-flip structures decides by chance otherwise
#: (docs/design.md, "One fold's choice within its cases' noise")
SHOWING_READING_SUPPORT = 0.95
#: case resamples (with replacement, seeded) behind that share
READING_RESAMPLES = 2000
#: fewer cases with conflicting voxels keep the vote: even all of them favouring the showing reading would happen by
#: chance more often than the support allows (a sign test: 0.5 ** n > 1 - SHOWING_READING_SUPPORT for n < 5), and
#: a resample of one or two cases says nothing about their noise
MIN_READING_CASES = int(np.ceil(np.log(1 - SHOWING_READING_SUPPORT) / np.log(0.5)))


def choose_reading(candidates: dict[str, dict]) -> tuple[str, str]:
    """The conflict reading (``model.alternatives.READINGS``) to keep, given each reading's calibration columns
    (``probabilities`` (N, C), ``label``, ``gate``, ``case``): the vote unless the showing reading's class
    probabilities, each reading with its own NLL-fitted temperature, predict the labels of the conflicting voxels
    better (lower mean NLL, each voxel weighted by its conflict gate:
    :func:`~entrust_nnunet.evaluation.temperature.temperature_nll`) in at least :data:`SHOWING_READING_SUPPORT` of
    :data:`READING_RESAMPLES` resamples of the cases (:func:`resampled_share_lower`). The vote is the cautious
    reading on conflicts the model never saw (docs/design.md, "The showing expert's reading"), so it is kept where
    no voxel conflicts, where the voxels carry no case numbers (no noise to judge the difference by), where fewer
    than :data:`MIN_READING_CASES` cases hold conflicting voxels and where the difference is within the cases'
    noise. Returns (reading, one-line summary)."""
    scores, per_case, conflicting = {}, {}, 0
    for reading, columns in candidates.items():
        probs, labels, gate = _class_columns(columns)
        conflicting = int(np.sum(gate > 0))
        if not conflicting:
            return "vote", "conflict reading: vote (no conflicting voxel on the calibration cases)"
        cases = np.asarray(columns["case"]) if "case" in columns else np.zeros(labels.size, dtype=np.int64)
        t = fit_temperature(probs, labels, eps=MIN_PROBABILITY)
        per_case[reading] = _nll_per_case(probs, labels, gate, cases, t)
        scores[reading] = per_case[reading][1].sum() / per_case[reading][2].sum()  # the pooled gate-weighted mean
    listed = f"gate-weighted NLL on {conflicting} conflicting voxels: " + ", ".join(
        f"{r} {scores[r]:.4f}" for r in READINGS if r in scores)
    if not all("case" in columns for columns in candidates.values()):
        return "vote", f"conflict reading: vote ({listed}; no case numbers to judge the difference's noise by)"
    (ids, _, weights), (other_ids, *_) = per_case["vote"], per_case["showing"]
    if not np.array_equal(ids, other_ids):
        raise ValueError("the readings' calibration voxels number different cases")
    cases = f"{int(np.sum(weights > 0))} of {ids.size} cases with conflicting voxels"
    if np.sum(weights > 0) < MIN_READING_CASES:
        return "vote", f"conflict reading: vote ({listed}; {cases}, fewer than {MIN_READING_CASES} to judge by)"
    share = resampled_share_lower(per_case["vote"][1:], per_case["showing"][1:], READING_RESAMPLES)
    best = "showing" if share >= SHOWING_READING_SUPPORT else "vote"
    return best, (f"conflict reading: {best} ({listed}; {cases}; showing lower in {share:.1%} of "
                  f"{READING_RESAMPLES} case resamples, kept from {SHOWING_READING_SUPPORT:.0%})")


def _nll_per_case(probs: np.ndarray, labels: np.ndarray, gate: np.ndarray, cases: np.ndarray, temperature: float
                  ) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """The case numbers (sorted) and per case the gate-weighted NLL summed over its conflicting voxels and its
    gates' sum (0 and 0 without conflicting voxels)."""
    ids = np.unique(cases)
    sums, weights = np.zeros(ids.size), np.zeros(ids.size)
    for i, c in enumerate(ids):
        k = (cases == c) & (gate > 0)
        if k.any():
            weights[i] = gate[k].sum()
            sums[i] = weights[i] * temperature_nll(probs[:, k], labels[k], temperature, eps=MIN_PROBABILITY,
                                                   weights=gate[k])
    return ids, sums, weights


def resampled_share_lower(a: tuple[np.ndarray, np.ndarray], b: tuple[np.ndarray, np.ndarray], resamples: int,
                          seed: int = 0) -> float:
    """The share of ``resamples`` bootstrap resamples of the cases (drawn with replacement, seeded; the same cases
    for both) in which ``b``'s pooled mean is lower than ``a``'s. Each of ``a``, ``b`` is (per-case sums, per-case
    weights) and its pooled mean over resampled cases ``I`` is ``sum_{i in I} s_i / sum_{i in I} w_i``; a resample
    without weight in either counts as not lower."""
    n = a[0].size
    draws = np.random.default_rng(seed).integers(0, n, (resamples, n))

    def means(x):
        s, w = x[0][draws].sum(1), x[1][draws].sum(1)
        return np.divide(s, w, out=np.full(resamples, np.nan), where=w > 0)

    lower = means(b) < means(a)  # NaN compares False: an empty resample is no evidence
    return float(lower.mean())


def fit_class_temperature(calib: CalibHead, voxels: Voxels) -> str:
    """Fit ``calib.temperature``, the temperature of the class probabilities (the hypotheses' mean), by NLL on
    the calibration voxels of one fold (every valid voxel, as the benchmark fits softmax nnU-Net's); its conflict
    biases stay 0: one fold's calibration cases hold a handful of conflicting structures, too few to tell the
    chance of a coin (docs/design.md, "A conflict term in the class calibration"; ``entrust calibrate`` fits them
    on every fold's). Returns a summary."""
    probs, labels, gate = _class_columns(voxels[0])
    t, bias = fit_class_calibration(probs, labels, gate, conflict_biases=False)
    before, after = (temperature_nll(probs, labels, x, eps=MIN_PROBABILITY) for x in (1.0, t))
    calib.temperature.fill_(t)
    calib.conflict_bias.copy_(torch.from_numpy(bias).to(calib.conflict_bias))
    return f"class-probability temperature {t:.3f} (NLL {before:.4f} -> {after:.4f} on {labels.size} voxels)"


def _class_columns(columns: dict) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """(C, N) mean probabilities, (N,) labels and (N,) conflict gates (0 in files that predate it)."""
    labels = np.asarray(columns["label"]).astype(np.int64)
    gate = np.asarray(columns["gate"], dtype=np.float64) if "gate" in columns else np.zeros(labels.size)
    return np.asarray(columns["probabilities"], dtype=np.float64).T, labels, gate


# ------------------------------------------------------------------------------------------------
# one calibrator for all folds (``entrust calibrate``)
# ------------------------------------------------------------------------------------------------
#: what the trainer keeps of its calibration cases, per fold (out-of-fold statistics, error, fg+boundary)
FOLD_VOXELS_FILE = "calibration_voxels.npz"
#: ... and under the conflict reading the fold did not keep (written when it chose one), so that ``entrust calibrate``
#: chooses the reading once on every fold's out-of-fold cases
OTHER_READING_VOXELS_FILE = "calibration_voxels_other_reading.npz"
#: the calibrator ``entrust calibrate`` fits on all folds' out-of-fold voxels, in the model folder
CALIBRATION_FILE = "entrust_calibration.json"
#: the calibrators tried, each a logistic model on these features (see :func:`calibration_features`)
CALIBRATORS = {
    "platt_head_confidence": ("log_head_uncertainty",),
    "platt_with_conflict": ("log_head_uncertainty", "log_uncertainty", "log_entropy", "log_epistemic", "log_probe",
                            "conflict", "conflict_x_log_head_uncertainty"),
}


def calibration_features(stats: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    """Per-voxel features of a calibrator: the statistics on a log scale (``log(1 - c)`` for confidences,
    ``log(x + 1e-4)`` otherwise), the conflict map as it is, and conflict x the head's log-uncertainty (so
    that conflict can change the slope, not only the offset)."""
    def log_u(c):
        return torch.log((1 - c.float()).clamp_min(1e-6))

    def log_x(x):
        return torch.log(x.float().clamp_min(0) + 1e-4)

    head = log_u(stats["head_confidence"])
    return {"log_head_uncertainty": head, "log_uncertainty": log_u(stats["confidence"]),
            "log_entropy": log_x(stats["entropy"]), "log_epistemic": log_x(stats["epistemic"]),
            "log_probe": log_x(stats["probe"]), "conflict": stats["conflict"].float(),
            "conflict_x_log_head_uncertainty": stats["conflict"].float() * head}


def fit_logistic(x: torch.Tensor, y: torch.Tensor, steps: int = 200) -> tuple[torch.Tensor, float]:
    """Logistic regression ``P = sigmoid(x w + b)`` by L-BFGS on the mean binary cross-entropy (a proper
    scoring rule: the fit is calibrated on its data). Features are standardised inside; returns the
    (w, b) of the raw features as one vector ``[w..., b]``."""
    mu, sd = x.mean(0), x.std(0).clamp_min(1e-6)
    z = (x - mu) / sd
    params = torch.zeros(x.shape[1] + 1, dtype=torch.float64, requires_grad=True)
    opt = torch.optim.LBFGS([params], max_iter=steps, line_search_fn="strong_wolfe")
    zd, yd = z.double(), y.double()

    def closure():
        opt.zero_grad()
        loss = F.binary_cross_entropy_with_logits(zd @ params[:-1] + params[-1], yd)
        loss.backward()
        return loss

    with torch.enable_grad():
        opt.step(closure)
    with torch.no_grad():
        bce = float(F.binary_cross_entropy_with_logits(zd @ params[:-1] + params[-1], yd))
    w = params[:-1].detach() / sd.double()
    b = params[-1].detach() - (w * mu.double()).sum()
    return torch.cat([w, b[None]]).float(), bce


@dataclass(frozen=True)
class Calibrator:
    """``P(error) = sigmoid(sum_i w_i f_i + b)`` on the :func:`calibration_features` named in ``features``."""

    name: str
    features: tuple[str, ...]
    weights: tuple[float, ...]  # w_1 ... w_n, b
    #: the class probabilities' temperature fitted on the same voxels (None: the folds' CalibHead temperatures)
    class_temperature: float | None = None
    #: ... and their biases where the modalities conflict (with ``class_temperature``)
    class_conflict_bias: tuple[float, ...] | None = None
    #: the conflict reading chosen on every fold's out-of-fold voxels (None: each fold's own choice)
    conflict_reading: str | None = None

    def logits(self, features: dict[str, torch.Tensor]) -> torch.Tensor:
        w = torch.tensor(self.weights, dtype=torch.float32)
        x = torch.stack([features[f].float().cpu() for f in self.features], -1)
        return x @ w[:-1] + w[-1]

    def probability_of_error(self, stats: dict[str, torch.Tensor]) -> torch.Tensor:
        device = stats["entropy"].device
        return torch.sigmoid(self.logits(calibration_features(stats))).to(device)


#: what the fold voxels file keeps beside the statistics: class probabilities, labels and conflict gates (the
#: class calibration)
CLASS_COLUMNS = ("probabilities", "label", "gate")


def save_fold_voxels(path: Path, voxels: Voxels, reading: str | None = None) -> None:
    """The out-of-fold voxels a trained fold was calibrated on (numpy arrays only: loads without pickle), with the
    conflict reading they were predicted under when the fold chose one."""
    columns, error = voxels
    keys = (*STATISTICS, "fg_boundary", *(k for k in (*CLASS_COLUMNS, "label_region", "case") if k in columns))
    flag = {} if reading is None else {"showing_reading": np.float32(READINGS.index(reading))}
    with atomic_file(path, "wb") as f:
        np.savez_compressed(f, error=error.numpy(), **{k: columns[k].numpy() for k in keys}, **flag)


def voxels_file_reading(path: Path) -> str | None:
    """The conflict reading a fold voxels file was predicted under (None: written without the choice)."""
    with np.load(path, allow_pickle=False) as f:
        return READINGS[int(float(f["showing_reading"]) > 0.5)] if "showing_reading" in f else None


def fold_voxels_path(model_folder: Path, fold, reading: str | None = None) -> Path:
    """A fold's out-of-fold voxels file (under ``reading``; None: the one the fold kept); one clear error when the
    fold has none."""
    path = Path(model_folder) / f"fold_{fold}" / FOLD_VOXELS_FILE
    if not path.is_file():
        raise InputError(f"{path}: fold {fold} has no out-of-fold calibration voxels (train it to the end with "
                         f"nnUNetTrainerEnTrust; a finished fold writes them again with nnUNetv2_train ... --c)")
    if reading is None or voxels_file_reading(path) == reading:
        return path
    other = path.with_name(OTHER_READING_VOXELS_FILE)
    if other.is_file() and voxels_file_reading(other) == reading:
        return other
    raise InputError(f"{path}: fold {fold} has no out-of-fold calibration voxels under the {reading} reading")


def _load_class_columns(path: Path) -> dict[str, np.ndarray] | None:
    """A voxels file's class columns and case numbers (where kept); None without class probabilities."""
    with np.load(path, allow_pickle=False) as f:
        keys = (*CLASS_COLUMNS, "case")
        return {k: f[k] for k in keys if k in f} if all(k in f for k in CLASS_COLUMNS[:2]) else None


def load_fold_class_voxels(model_folder: Path, fold, reading: str | None = None
                           ) -> tuple[np.ndarray, np.ndarray, np.ndarray] | None:
    """(C, N) class probabilities, (N,) labels and (N,) conflict gates of a fold's out-of-fold voxels (gates 0 in
    files that predate them); None for files without classes."""
    columns = _load_class_columns(fold_voxels_path(model_folder, fold, reading))
    return None if columns is None else _class_columns(columns)


def choose_pooled_reading(model_folder: Path, folds: list) -> tuple[str | None, str]:
    """The conflict reading :func:`choose_reading` keeps on every fold's out-of-fold voxels at once (each fold's own
    choice judged five coin-flip structures on the development seed and flipped between folds; docs/design.md);
    None, each fold keeping its own, when a fold has no voxels of the other reading (trained without the choice,
    or without classes) or none with case numbers (saved before the choice resampled cases). Returns (reading,
    one-line summary)."""
    folder = Path(model_folder)
    for f in folds:
        files = [folder / f"fold_{f}" / name for name in (FOLD_VOXELS_FILE, OTHER_READING_VOXELS_FILE)]
        if not all(p.is_file() for p in files) or {voxels_file_reading(p) for p in files} != set(READINGS):
            return None, f"conflict reading: each fold's own (fold {f} has no voxels under both readings)"
    candidates = {}
    for reading in READINGS:
        parts = [_load_class_columns(fold_voxels_path(folder, f, reading)) for f in folds]
        if any(p is None or "gate" not in p for p in parts):
            return None, "conflict reading: each fold's own (a fold's voxels hold no class probabilities)"
        if any("case" not in p for p in parts):  # saved before the choice resampled cases: not judged again
            return None, "conflict reading: each fold's own (a fold's voxels carry no case numbers)"
        offsets = np.cumsum([0] + [int(p["case"].max(initial=-1)) + 1 for p in parts[:-1]])  # each fold's apart
        candidates[reading] = {k: np.concatenate([p[k] for p in parts]) for k in CLASS_COLUMNS}
        candidates[reading]["case"] = np.concatenate([p["case"] + o for p, o in zip(parts, offsets)])
    reading, summary = choose_reading(candidates)
    return reading, f"{summary}, on the out-of-fold voxels of folds {list(folds)}"


def fit_pooled_temperature(model_folder: Path, folds: list, conflict_biases: bool | None = None,
                           reading: str | None = None) -> dict | None:
    """One class calibration NLL-fitted on every fold's out-of-fold voxels (under ``reading``; None: each fold's
    own; None returned when a fold's file predates them): the temperature and, with ``conflict_biases`` (default:
    with two folds or more), the conflict biases (:func:`fit_class_calibration`); with its NLL before (T = 1,
    b = 0) and after."""
    if conflict_biases is None:
        conflict_biases = len(folds) > 1
    return _pooled_class_calibration([load_fold_class_voxels(model_folder, f, reading) for f in folds],
                                     conflict_biases)


def _pooled_class_calibration(parts: list, conflict_biases: bool) -> dict | None:
    """:func:`fit_pooled_temperature` on folds' loaded class voxels (:func:`load_fold_class_voxels`)."""
    if any(p is None for p in parts):
        return None
    probs, labels, gate = (np.concatenate([p[i] for p in parts], -1) for i in range(3))
    t, bias = fit_class_calibration(probs, labels, gate, conflict_biases)
    return {"temperature": t, "conflict_bias": bias.tolist(), "voxels": int(labels.size),
            "conflict_voxels": int((gate >= 0.5).sum()),
            "nll": [conflict_temperature_nll(probs, labels, gate, *x, eps=MIN_PROBABILITY)
                    for x in ((1.0, np.zeros_like(bias)), (t, bias))]}


def load_fold_voxels(model_folder: Path, fold, class_calibration: dict | None = None, reading: str | None = None
                     ) -> tuple[dict[str, torch.Tensor], torch.Tensor, torch.Tensor]:
    """A fold's out-of-fold calibration features, errors and foreground + boundary flags; with
    ``class_calibration`` (:func:`fit_pooled_temperature`'s fit) the mask's confidence, error and foreground +
    boundary flags are those of that class calibration (:func:`class_calibrated_voxels`; the flags only in files
    that keep ``label_region``); under ``reading`` (None: the fold's own)."""
    with np.load(fold_voxels_path(model_folder, fold, reading), allow_pickle=False) as f:
        columns = {k: torch.from_numpy(f[k]) for k in (*STATISTICS, *CLASS_COLUMNS, "fg_boundary", "label_region")
                   if k in f}
        error = torch.from_numpy(f["error"]).float()
    if class_calibration is not None:
        columns, error = class_calibrated_voxels((columns, error), class_calibration["temperature"],
                                                 class_calibration["conflict_bias"])
    return calibration_features(columns), error, columns["fg_boundary"].bool()


def _held_out_bce(names: tuple[str, ...], folds: list) -> float:
    """Mean over folds of the BCE on the fold's foreground + boundary voxels of a fit on the other folds."""
    scores = []
    for i, (feats, err, fg) in enumerate(folds):
        rest = [f for j, f in enumerate(folds) if j != i]
        x = torch.cat([torch.stack([r[0][n] for n in names], -1) for r in rest])
        w, _ = fit_logistic(x, torch.cat([r[1] for r in rest]))
        logits = torch.stack([feats[n] for n in names], -1)[fg] @ w[:-1] + w[-1]
        scores.append(float(F.binary_cross_entropy_with_logits(logits, err[fg])))
    return float(np.mean(scores))


def fit_calibrator(model_folder: Path, folds: list, reading: str | None = None) -> tuple[Calibrator, dict]:
    """Choose and fit the calibrator on the out-of-fold voxels of ``folds`` (each training case is out of fold
    once), each fold's for the mask of the class calibration fitted on the other folds (:func:`load_fold_voxels`;
    cross-fitted because a calibration fitted on the very cases it decides is right about their coin flips by
    construction, docs/design.md). With two folds or more the candidates of
    :data:`CALIBRATORS` are compared by leave-one-fold-out BCE on foreground + boundary voxels; the winner is
    refitted on all of them. Under the conflict ``reading`` (None: each fold's own)."""
    classes = {f: load_fold_class_voxels(model_folder, f, reading) for f in folds}  # each fold's file read once
    data = [load_fold_voxels(model_folder, f, _pooled_class_calibration(
        [classes[o] for o in folds if o != f] or [classes[f]], conflict_biases=len(folds) > 1), reading)
        for f in folds]
    scores = {name: _held_out_bce(names, data) for name, names in CALIBRATORS.items()} if len(data) > 1 else {}
    name = min(scores, key=scores.get) if scores else "platt_with_conflict"
    names = CALIBRATORS[name]
    feats = {n: torch.cat([d[0][n] for d in data]) for n in names}
    error, fg = torch.cat([d[1] for d in data]), torch.cat([d[2] for d in data])
    w, bce = fit_logistic(torch.stack([feats[n] for n in names], -1), error)
    calibrator = Calibrator(name, names, tuple(float(v) for v in w), conflict_reading=reading)
    p = torch.sigmoid(calibrator.logits(feats))
    conflict = torch.cat([d[0]["conflict"] for d in data]) > 0.5
    report = {"voxels": int(error.numel()), "error_rate": float(error.mean()), "bce": bce,
              "held_out_bce_fg_boundary": scores,
              "in_conflict_map": {"voxels": int(conflict.sum()), "mean_p_error": float(p[conflict].mean()),
                                  "error_rate": float(error[conflict].mean())} if conflict.any() else None,
              "fg_boundary": {"mean_p_error": float(p[fg].mean()), "error_rate": float(error[fg].mean())}}
    return calibrator, report


def calibrate_model(model_folder, folds=None) -> tuple[Path, dict]:
    """``entrust calibrate``: fit the calibrator on the out-of-fold voxels of ``folds`` (default: every trained
    ``fold_N``, i.e. with its final checkpoint or its voxels file; one without voxels is an error naming it, never
    left out quietly) and store it as ``model_folder/entrust_calibration.json`` (plain JSON: loading it runs no
    code). Returns the file and the fit report."""
    import json

    model_folder = Path(model_folder).resolve()
    if not (model_folder / "plans.json").is_file():
        raise InputError(f"{model_folder}: no trained model here (plans.json missing)")
    if folds is None:
        folds = sorted({int(p.parent.name[5:]) for name in ("checkpoint_final.pth", FOLD_VOXELS_FILE)
                        for p in model_folder.glob(f"fold_*/{name}") if p.parent.name[5:].isdigit()})
        if not folds:
            raise InputError(f"{model_folder}: no fold has out-of-fold calibration voxels ({FOLD_VOXELS_FILE})")
        for fold in folds:
            fold_voxels_path(model_folder, fold)
    reading, choice = choose_pooled_reading(model_folder, list(folds))
    temperature = fit_pooled_temperature(model_folder, list(folds), reading=reading)
    calibrator, report = fit_calibrator(model_folder, list(folds), reading)
    plans = json.loads((model_folder / "plans.json").read_text())
    content = {"trainer_plans_configuration": model_folder.name, "plans_name": plans.get("plans_name"),
               "dataset_name": plans.get("dataset_name"),
               "folds": list(folds), "calibrator": calibrator.name, "features": list(calibrator.features),
               "weights": list(calibrator.weights), "report": report,
               "class_temperature": temperature and temperature["temperature"],
               "class_conflict_bias": temperature and temperature["conflict_bias"],
               "class_temperature_fit": temperature, "conflict_reading": reading, "conflict_reading_choice": choice}
    path = model_folder / CALIBRATION_FILE
    with atomic_file(path) as f:
        json.dump(content, f, indent=2)
    return path, content


def _plans_dataset_name(model_folder: Path) -> str | None:
    import json

    try:
        return json.loads((model_folder / "plans.json").read_text()).get("dataset_name")
    except (OSError, ValueError, AttributeError):
        return None  # the predictor reports a broken plans.json itself


def with_conflict_reading(weights: dict, calibrator: Calibrator | None) -> dict:
    """A fold's network weights with the conflict reading ``entrust calibrate`` chose for every fold (CalibHead's
    ``showing_reading``); ``weights`` themselves (the fold's own choice) without such a calibrator."""
    if calibrator is None or calibrator.conflict_reading is None:
        return weights
    return {**weights, "calib.showing_reading": torch.tensor(float(READINGS.index(calibrator.conflict_reading)))}


def load_calibrator(model_folder) -> Calibrator | None:
    """The calibrator ``entrust calibrate`` stored for this model folder, or None; a file written for another
    trainer, plans, configuration or dataset is refused."""
    import json

    model_folder = Path(model_folder).resolve()  # "-m ." and "-m .." have no name of their own
    path = model_folder / CALIBRATION_FILE
    if not path.is_file():
        return None
    try:
        content = json.loads(path.read_text())
        t, bias = content.get("class_temperature"), content.get("class_conflict_bias")
        reading = content.get("conflict_reading")
        if reading is not None and reading not in READINGS:
            raise ValueError(f"unknown conflict reading {reading!r}")
        calibrator = Calibrator(content["calibrator"], tuple(content["features"]),
                                tuple(float(w) for w in content["weights"]), None if t is None else float(t),
                                None if bias is None else tuple(float(b) for b in bias), reading)
    except (OSError, ValueError, KeyError, TypeError) as e:
        raise InputError(f"{path}: not a calibration file of entrust calibrate ({e})") from None
    if content.get("trainer_plans_configuration") != model_folder.name:
        raise InputError(f"{path}: written for {content.get('trainer_plans_configuration')}, not for "
                         f"{model_folder.name}; run entrust calibrate for this model")
    dataset = _plans_dataset_name(model_folder)
    if content.get("dataset_name") and dataset and content["dataset_name"] != dataset:
        raise InputError(f"{path}: written for dataset {content['dataset_name']}, not for {dataset}; run entrust "
                         f"calibrate for this model")
    unknown = set(calibrator.features) - set(CALIBRATORS["platt_with_conflict"])
    if unknown or len(calibrator.weights) != len(calibrator.features) + 1:
        raise InputError(f"{path}: unknown features {sorted(unknown)} or wrong number of weights")
    return calibrator
