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
from entrust_nnunet.evaluation.temperature import fit_temperature, temperature_nll
from entrust_nnunet.model.outputs import MIN_PROBABILITY
from entrust_nnunet.model.trustmap import STATISTICS, CalibHead

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
    label, where calibration is judged) and the error indicator (mask != label) of one case's voxels.

    The mask is nnU-Net's: ``label_manager.convert_probabilities_to_segmentation`` of the mean (regions
    converted with ``regions_class_order``; argmax for labels, also without a label manager), so the error
    is that of the exported, converted mask. Voxels outside nnU-Net's crop mask (label < 0) and under its
    ignore label are skipped; at most ``max_voxels`` are kept, a subset seeded by the case name (the same
    voxels whenever the case is seen again).
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
    if label_manager is None:
        pred = stats["mean"].argmax(0)
    else:
        pred = torch.as_tensor(label_manager.convert_probabilities_to_segmentation(stats["mean"].cpu()))
        pred = pred.to(seg.device).long()
    error = (pred != seg).flatten().cpu()[valid].float()
    fg = foreground_boundary_mask(seg.clamp_min(0).cpu().numpy(), pred.cpu().numpy())
    columns = {k: stats[k].flatten().float().cpu()[valid] for k in STATISTICS}
    columns["fg_boundary"] = torch.from_numpy(fg).flatten()[valid].float()
    if label_manager is None or not label_manager.has_regions:
        # the class temperature's voxels (a softmax's temperature: region sigmoids keep T = 1)
        columns["label"] = seg.flatten().cpu()[valid].long()
        columns["probabilities"] = stats["mean"].flatten(1).float().cpu()[:, valid].T
    return columns, error


def calibration_voxels(predictor, cases: Iterable, names, cache: dict, max_voxels_per_case: int) -> Voxels:
    """Voxels of ``names``: ``cases`` yields (name, data, seg, present) of those not yet in ``cache`` (filled
    here); ``present`` (M flags, None = every modality) masks the absent modalities as inference does."""
    for name, data, seg, present in cases:
        with predictor.modalities_present(present):
            stats = predictor.pooled_statistics(data)
        cache[name] = case_voxels(stats, seg, name, max_voxels_per_case, predictor.label_manager)
    columns = {k: torch.cat([cache[name][0][k] for name in names]) for k in cache[names[0]][0]}
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


def fit_class_temperature(calib: CalibHead, voxels: Voxels) -> str:
    """Fit ``calib.temperature``, the temperature of the class probabilities (the hypotheses' mean), by NLL on
    the calibration voxels (every valid voxel, as the benchmark fits softmax nnU-Net's); returns a summary."""
    columns, _ = voxels
    probs, labels = columns["probabilities"].double().numpy().T, columns["label"].numpy()
    # the floor the network's output puts on probabilities: fit what inference applies
    t = fit_temperature(probs, labels, eps=MIN_PROBABILITY)
    before, after = (temperature_nll(probs, labels, x, eps=MIN_PROBABILITY) for x in (1.0, t))
    calib.temperature.fill_(t)
    return f"class-probability temperature {t:.3f} (NLL {before:.4f} -> {after:.4f} on {labels.size} voxels)"


# ------------------------------------------------------------------------------------------------
# one calibrator for all folds (``entrust calibrate``)
# ------------------------------------------------------------------------------------------------
#: what the trainer keeps of its calibration cases, per fold (out-of-fold statistics, error, fg+boundary)
FOLD_VOXELS_FILE = "calibration_voxels.npz"
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

    def logits(self, features: dict[str, torch.Tensor]) -> torch.Tensor:
        w = torch.tensor(self.weights, dtype=torch.float32)
        x = torch.stack([features[f].float().cpu() for f in self.features], -1)
        return x @ w[:-1] + w[-1]

    def probability_of_error(self, stats: dict[str, torch.Tensor]) -> torch.Tensor:
        device = stats["entropy"].device
        return torch.sigmoid(self.logits(calibration_features(stats))).to(device)


#: what the fold voxels file keeps beside the statistics: the class probabilities and labels (class temperature)
CLASS_COLUMNS = ("probabilities", "label")


def save_fold_voxels(path: Path, voxels: Voxels) -> None:
    """The out-of-fold voxels a trained fold was calibrated on (numpy arrays only: loads without pickle)."""
    columns, error = voxels
    keys = (*STATISTICS, "fg_boundary", *(k for k in CLASS_COLUMNS if k in columns))
    with atomic_file(path, "wb") as f:
        np.savez_compressed(f, error=error.numpy(), **{k: columns[k].numpy() for k in keys})


def load_fold_class_voxels(model_folder: Path, fold) -> tuple[np.ndarray, np.ndarray] | None:
    """(C, N) class probabilities and (N,) labels of a fold's out-of-fold voxels; None for files without them."""
    with np.load(Path(model_folder) / f"fold_{fold}" / FOLD_VOXELS_FILE, allow_pickle=False) as f:
        if not all(k in f for k in CLASS_COLUMNS):
            return None
        return f["probabilities"].astype(np.float64).T, f["label"].astype(np.int64)


def fit_pooled_temperature(model_folder: Path, folds: list) -> dict | None:
    """One class-probability temperature NLL-fitted on every fold's out-of-fold voxels (None when a fold's file
    predates them); with its NLL at T = 1 and at T."""
    parts = [load_fold_class_voxels(model_folder, f) for f in folds]
    if any(p is None for p in parts):
        return None
    probs, labels = np.concatenate([p[0] for p in parts], 1), np.concatenate([p[1] for p in parts])
    t = fit_temperature(probs, labels, eps=MIN_PROBABILITY)
    return {"temperature": t, "voxels": int(labels.size),
            "nll": [temperature_nll(probs, labels, x, eps=MIN_PROBABILITY) for x in (1.0, t)]}


def load_fold_voxels(model_folder: Path, fold) -> tuple[dict[str, torch.Tensor], torch.Tensor, torch.Tensor]:
    path = Path(model_folder) / f"fold_{fold}" / FOLD_VOXELS_FILE
    if not path.is_file():
        raise InputError(f"{path}: fold {fold} has no out-of-fold calibration voxels (train it to the end with "
                         f"nnUNetTrainerEnTrust; its validation writes them)")
    with np.load(path, allow_pickle=False) as f:
        stats = {k: torch.from_numpy(f[k]) for k in STATISTICS}
        return calibration_features(stats), torch.from_numpy(f["error"]).float(), torch.from_numpy(f["fg_boundary"]).bool()


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


def fit_calibrator(model_folder: Path, folds: list) -> tuple[Calibrator, dict]:
    """Choose and fit the calibrator on the out-of-fold voxels of ``folds`` (each training case is out of fold
    once). With two folds or more the candidates of :data:`CALIBRATORS` are compared by leave-one-fold-out
    BCE on foreground + boundary voxels; the winner is refitted on all of them."""
    data = [load_fold_voxels(model_folder, f) for f in folds]
    scores = {name: _held_out_bce(names, data) for name, names in CALIBRATORS.items()} if len(data) > 1 else {}
    name = min(scores, key=scores.get) if scores else "platt_with_conflict"
    names = CALIBRATORS[name]
    feats = {n: torch.cat([d[0][n] for d in data]) for n in names}
    error, fg = torch.cat([d[1] for d in data]), torch.cat([d[2] for d in data])
    w, bce = fit_logistic(torch.stack([feats[n] for n in names], -1), error)
    calibrator = Calibrator(name, names, tuple(float(v) for v in w))
    p = torch.sigmoid(calibrator.logits(feats))
    conflict = torch.cat([d[0]["conflict"] for d in data]) > 0.5
    report = {"voxels": int(error.numel()), "error_rate": float(error.mean()), "bce": bce,
              "held_out_bce_fg_boundary": scores,
              "in_conflict_map": {"voxels": int(conflict.sum()), "mean_p_error": float(p[conflict].mean()),
                                  "error_rate": float(error[conflict].mean())} if conflict.any() else None,
              "fg_boundary": {"mean_p_error": float(p[fg].mean()), "error_rate": float(error[fg].mean())}}
    return calibrator, report


def calibrate_model(model_folder, folds=None) -> tuple[Path, dict]:
    """``entrust calibrate``: fit the calibrator on the out-of-fold voxels of ``folds`` (default: every
    ``fold_N`` with its voxels file) and store it as ``model_folder/entrust_calibration.json`` (plain JSON:
    loading it runs no code). Returns the file and the fit report."""
    import json

    model_folder = Path(model_folder)
    if not (model_folder / "plans.json").is_file():
        raise InputError(f"{model_folder}: no trained model here (plans.json missing)")
    if folds is None:
        folds = sorted(int(p.parent.name[5:]) for p in model_folder.glob(f"fold_[0-9]*/{FOLD_VOXELS_FILE}"))
        if not folds:
            raise InputError(f"{model_folder}: no fold has out-of-fold calibration voxels ({FOLD_VOXELS_FILE})")
    calibrator, report = fit_calibrator(model_folder, list(folds))
    temperature = fit_pooled_temperature(model_folder, list(folds))
    plans = json.loads((model_folder / "plans.json").read_text())
    content = {"trainer_plans_configuration": model_folder.name, "plans_name": plans.get("plans_name"),
               "folds": list(folds), "calibrator": calibrator.name, "features": list(calibrator.features),
               "weights": list(calibrator.weights), "report": report,
               "class_temperature": temperature and temperature["temperature"], "class_temperature_fit": temperature}
    path = model_folder / CALIBRATION_FILE
    with atomic_file(path) as f:
        json.dump(content, f, indent=2)
    return path, content


def load_calibrator(model_folder) -> Calibrator | None:
    """The calibrator ``entrust calibrate`` stored for this model folder, or None; a file written for another
    trainer, plans or configuration is refused."""
    import json

    path = Path(model_folder) / CALIBRATION_FILE
    if not path.is_file():
        return None
    try:
        content = json.loads(path.read_text())
        t = content.get("class_temperature")
        calibrator = Calibrator(content["calibrator"], tuple(content["features"]),
                                tuple(float(w) for w in content["weights"]), None if t is None else float(t))
    except (OSError, ValueError, KeyError, TypeError) as e:
        raise InputError(f"{path}: not a calibration file of entrust calibrate ({e})") from None
    if content.get("trainer_plans_configuration") != Path(model_folder).name:
        raise InputError(f"{path}: written for {content.get('trainer_plans_configuration')}, not for "
                         f"{Path(model_folder).name}; run entrust calibrate for this model")
    unknown = set(calibrator.features) - set(CALIBRATORS["platt_with_conflict"])
    if unknown or len(calibrator.weights) != len(calibrator.features) + 1:
        raise InputError(f"{path}: unknown features {sorted(unknown)} or wrong number of weights")
    return calibrator
