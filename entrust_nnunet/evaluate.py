"""Evaluate a prediction folder: nnU-Net's segmentation metrics plus the quality of the uncertainty maps.

Input layout (what ``entrust predict`` writes)::

    OUT/CASE<ending>                                     mask (labels)
    OUT/uncertainty/CASE_{total,aleatoric,epistemic,conflict}<ending or .nii.gz>
    OUT/CASE.npz ("probabilities", (C, *spatial))         optional, --save_probabilities
    OUT/dataset.json, OUT/plans.json

Output: a ``summary.json`` that keeps nnU-Net's conventions (``metric_per_case`` list with
``prediction_file`` / ``reference_file`` / ``metrics`` keyed by ``str(label_or_region)``, ``mean``,
``foreground_mean``; ``nnunetv2.evaluation.evaluate_predictions.load_summary_json`` reads it) and adds

* ``metric_per_case[i]["uncertainty"]``: per case ECE (all voxels and foreground + boundary band),
  Brier, NLL, error AUROC and AURC of ``total``, AU/EU entanglement and, with a conflict folder,
  the AUROCs of ``total`` and ``conflict`` for detecting conflict voxels and the mean of every map
  inside / outside the true conflict;
* ``uncertainty_mean``: ``nanmean`` of those over cases;
* ``uncertainty_pooled``: the same measured over the voxels of all cases together (per-case AUROCs
  are undefined for cases without conflict or without errors), with the pooled reliability curve and
  risk-coverage curve the report draws;
* ``uncertainty_definitions`` and ``entrust`` (the inputs used).

NaN (undefined, e.g. Dice of a label absent from both masks) is written as ``null``. Every metric
is computed by :mod:`entrust_nnunet.metrics`; this module only selects voxels and aggregates.
"""
from __future__ import annotations

import json
import math
import multiprocessing
import sys
import warnings
from pathlib import Path
from typing import Any

import numpy as np
import SimpleITK as sitk
from tqdm import tqdm

from entrust_nnunet import metrics
from entrust_nnunet.io import (MAP_FOLDER, MAP_NAMES, InputError, atomic_file, geometry_mismatch, map_path,
                               read_header, read_image)
#: bins of ECE and of the reliability diagram
N_BINS = 15
#: at most this many voxels (all cases together) enter the pooled AUROC / AURC / Spearman; more are
#: subsampled uniformly with one fraction for all cases (pooled ECE, Brier and NLL are always exact)
MAX_POOLED_VOXELS = 4_000_000
#: points kept of the pooled risk-coverage curve in the summary
CURVE_POINTS = 201

DEFINITIONS = {
    "ece_source": {
        "probabilities": "OUT/CASE.npz class probabilities: top-label ECE over the C classes, multi-class Brier "
                         "(sum over classes), NLL of the reference label",
        "total": "binary error view from OUT/uncertainty/CASE_total: probabilities [1 - total, total] of "
                 "[mask right, mask wrong] against error = (mask != reference); Brier = mean (total - error)^2, "
                 "NLL = mean -log(probability given to what happened)",
    },
    "ece": f"expected calibration error, {N_BINS} equal-width bins, all voxels",
    "ece_fg_boundary": "ECE over foreground of reference or mask plus a 2-voxel band around the reference "
                       "(metrics.foreground_boundary_mask)",
    "error_auroc": "AUROC of total for detecting voxels where mask != reference",
    "aurc": "area under the risk-coverage curve of total (lower is better)",
    "error_rate": "fraction of voxels where mask != reference",
    "entanglement": "Spearman correlation of aleatoric and epistemic over voxels (0 = disentangled)",
    "conflict_auroc_total": "AUROC of total for detecting true conflict voxels",
    "conflict_auroc_conflict": "AUROC of the conflict map for detecting true conflict voxels",
    "<map>_in_conflict / <map>_outside_conflict": "mean of the map inside / outside the true conflict mask",
    "error_in_conflict / error_outside_conflict": "fraction of wrong voxels inside / outside the true conflict mask",
    "foreground_mean": "mean over the evaluated foreground labels (regions, if dataset.json declares regions) "
                       "of the per-label means, as nnU-Net",
    "HD95": "95th-percentile symmetric Hausdorff distance in mm (0 if both masks are empty, null if one is)",
}


# --------------------------------------------------------------------------------------------------
# inputs
# --------------------------------------------------------------------------------------------------
def load_dataset_json(pred_dir, gt_dir=None, dataset_json=None) -> tuple[Path, dict]:
    """``dataset_json``, else ``pred_dir/dataset.json``, else ``gt_dir/../dataset.json``."""
    if dataset_json is not None:
        candidates = [Path(dataset_json)]
    else:
        candidates = [Path(pred_dir) / "dataset.json"]
        if gt_dir is not None:
            candidates.append(Path(gt_dir).absolute().parent / "dataset.json")
    path = next((c for c in candidates if c.is_file()), None)
    if path is None:
        raise InputError(f"{candidates[0]}: dataset.json not found"
                         + (f" (nor {candidates[1]}); pass -djfile" if len(candidates) > 1 else ""))
    try:
        content = json.loads(path.read_text())
    except (OSError, UnicodeDecodeError, json.JSONDecodeError) as e:
        raise InputError(f"{path}: not a readable JSON file ({str(e).splitlines()[0][:120]})") from None
    if not isinstance(content, dict) or not isinstance(content.get("labels"), dict) \
            or not isinstance(content.get("file_ending"), str):
        raise InputError(f"{path}: dataset.json needs 'labels' and 'file_ending'")
    return path, content


def label_manager(dataset_json: dict, path: Path):
    """nnU-Net's LabelManager for the dataset (regions and ignore label handled as nnU-Net does)."""
    from nnunetv2.utilities.label_handling.label_handling import LabelManager

    try:
        return LabelManager(dataset_json["labels"], dataset_json.get("regions_class_order"))
    except (AssertionError, RuntimeError, ValueError, TypeError) as e:
        raise InputError(f"{path}: invalid labels ({str(e).splitlines()[0][:160]})") from None


def list_cases(folder: Path, file_ending: str) -> dict[str, Path]:
    """``CASE -> file`` for the files of ``folder`` (not sub-folders, no hidden files) ending with ``file_ending``."""
    if not folder.is_dir():
        raise InputError(f"{folder}: folder does not exist")
    return {f.name[: -len(file_ending)]: f for f in sorted(folder.iterdir())
            if f.name.endswith(file_ending) and not f.name.startswith(".") and f.is_file()}


def map_file(pred_dir: Path, case: str, name: str, file_ending: str) -> Path | None:
    """The map file ``entrust predict`` writes for this case (see :func:`entrust_nnunet.io.map_path`), if present."""
    f = map_path(pred_dir, case, name, file_ending)
    return f if f.is_file() else None


def _names(keys) -> str:
    keys = sorted(keys)
    return ", ".join(keys[:5]) + (f" and {len(keys) - 5} more" if len(keys) > 5 else "")


# --------------------------------------------------------------------------------------------------
# one case
# --------------------------------------------------------------------------------------------------
def _read_labels(path: Path, allowed: set[int]) -> tuple[sitk.Image, np.ndarray]:
    image = read_image(path)
    arr = sitk.GetArrayFromImage(image)
    values = np.unique(arr)
    bad = [v for v in values.tolist() if v not in allowed]
    if bad:
        shown = ", ".join(f"{v:g}" for v in bad[:5])
        raise InputError(f"{path}: label value(s) {shown} not declared in dataset.json labels "
                         f"{sorted(allowed)}")
    return image, arr.astype(np.int32)


def _check_geometry(reference: sitk.Image, image: sitk.Image, path: Path, ref_path: Path) -> None:
    problem = geometry_mismatch(reference, image)
    if problem:
        raise InputError(f"{path}: geometry differs from {ref_path} ({problem})")


def _probabilities(npz: Path, shape: tuple[int, ...], num_classes: int) -> np.ndarray:
    try:
        with np.load(npz) as f:
            probs = np.asarray(f["probabilities"], dtype=np.float64)
    except (OSError, ValueError, KeyError) as e:
        raise InputError(f"{npz}: no readable 'probabilities' array ({str(e).splitlines()[0][:120]})") from None
    squeeze = tuple(s for s in probs.shape[1:] if s != 1)
    if probs.ndim < 2 or probs.shape[0] != num_classes or squeeze != tuple(s for s in shape if s != 1):
        raise InputError(f"{npz}: 'probabilities' has shape {probs.shape}, expected ({num_classes}, *{shape})")
    probs = probs.reshape((num_classes, *shape))
    sums = probs.sum(0)
    if not np.all(np.isfinite(probs)) or probs.min() < -1e-6 or not np.allclose(sums, 1.0, atol=1e-2):
        raise InputError(f"{npz}: 'probabilities' are not class probabilities summing to 1 over axis 0")
    return np.clip(probs, 0.0, None) / np.clip(probs, 0.0, None).sum(0, keepdims=True)


def _reliability_sums(probs, labels, mask) -> dict[str, np.ndarray]:
    """Per-bin voxel count and sums of confidence / correctness from :func:`metrics.reliability_curve`,
    so that the curves (and ECE) of several cases can be pooled exactly."""
    curve = metrics.reliability_curve(probs, labels, n_bins=N_BINS, mask=mask)
    count = curve["count"].astype(np.float64)
    return {"count": count, "sum_conf": np.nan_to_num(curve["confidence"]) * count,
            "sum_acc": np.nan_to_num(curve["accuracy"]) * count}


def _uncertainty(job: dict, pred_img: sitk.Image, pred: np.ndarray, gt: np.ndarray, valid: np.ndarray | None,
                 gt_img: sitk.Image) -> tuple[dict, dict]:
    """Per-case uncertainty metrics and the pieces the pooled metrics are built from."""
    out: dict[str, Any] = {}
    pool: dict[str, Any] = {}
    maps: dict[str, np.ndarray] = {}
    missing = []
    for name in MAP_NAMES:
        path = job["maps"].get(name)
        if path is None:
            missing.append(name)
            continue
        image = read_image(path)
        _check_geometry(pred_img, image, path, job["pred_file"])
        arr = sitk.GetArrayFromImage(image).astype(np.float64)
        if name in ("total", "conflict") and (arr.min() < -1e-4 or arr.max() > 1 + 1e-4):
            raise InputError(f"{path}: {name} map must lie in [0, 1], found [{arr.min():.4g}, {arr.max():.4g}]")
        maps[name] = np.clip(arr, 0.0, 1.0) if name in ("total", "conflict") else arr
    if missing:
        out["note"] = f"missing map(s) {', '.join(missing)} in {job['pred_dir'] / MAP_FOLDER}"
    error = pred != gt
    n_valid = int(error.size if valid is None else valid.sum())
    out["error_rate"] = float(error[valid].mean() if valid is not None else error.mean()) if n_valid else math.nan
    sample = (np.ones(error.shape, bool) if valid is None else valid.copy())
    if job["sample_fraction"] < 1.0:
        sample &= np.random.default_rng(job["index"]).random(error.shape) < job["sample_fraction"]
    pool["n"] = n_valid
    pool["sample"] = {"error": error[sample]}
    gt_fg = np.where(valid, gt, 0) if valid is not None else gt
    fg_mask = metrics.foreground_boundary_mask(gt_fg, pred)
    if valid is not None:
        fg_mask &= valid

    total = maps.get("total")
    probs = None
    if job["npz"] is not None and job["has_regions"]:
        out["probabilities_note"] = "npz holds per-region sigmoid outputs, not a class distribution: not used"
    elif job["npz"] is not None:
        probs = _probabilities(job["npz"], gt.shape, len(job["all_labels"]))
        labels = np.searchsorted(np.asarray(job["all_labels"]), np.where(valid, gt, 0) if valid is not None else gt)
        source = "probabilities"
    if probs is None and total is not None:
        probs = np.stack([1.0 - total, total])
        labels = error.astype(np.int64)
        source = "total"
    if probs is not None:
        out["ece_source"] = source
        out["ece"] = metrics.ece(probs, labels, n_bins=N_BINS, mask=valid)
        out["ece_fg_boundary"] = metrics.ece(probs, labels, n_bins=N_BINS, mask=fg_mask)
        brier = metrics.brier_score(probs, labels, mask=valid)
        out["brier"] = brier / 2.0 if source == "total" else brier  # binary view: mean (total - error)^2
        out["nll"] = metrics.nll(probs, labels, mask=valid)
        pool["source"] = source
        pool["reliability"] = _reliability_sums(probs, labels, valid)
        pool["reliability_fg"] = _reliability_sums(probs, labels, fg_mask)
        pool["brier_sum"], pool["nll_sum"] = out["brier"] * n_valid, out["nll"] * n_valid
    if total is not None:
        out["error_auroc"] = metrics.error_auroc(total, error, mask=valid)
        out["aurc"] = metrics.aurc(total, error, mask=valid)
    if "aleatoric" in maps and "epistemic" in maps:
        out["entanglement"] = metrics.au_eu_entanglement(maps["aleatoric"], maps["epistemic"], mask=valid)
    for name, arr in maps.items():
        pool["sample"][name] = arr[sample].astype(np.float32)

    if job["conflict_file"] is not None:
        image = read_image(job["conflict_file"])
        _check_geometry(gt_img, image, job["conflict_file"], job["gt_file"])
        truth = sitk.GetArrayFromImage(image)
        if not np.all((truth == 0) | (truth == 1)):
            raise InputError(f"{job['conflict_file']}: conflict mask must contain only 0 and 1")
        truth = truth.astype(bool)
        inside = truth if valid is None else truth & valid
        outside = ~truth if valid is None else ~truth & valid
        out["conflict_fraction"] = float(inside.sum() / n_valid) if n_valid else math.nan
        pool["sample"]["truth"] = truth[sample]
        pool["in_out"] = {}
        if total is not None:
            out["conflict_auroc_total"] = metrics.auroc(total, truth, mask=valid)
        if "conflict" in maps:
            out["conflict_auroc_conflict"] = metrics.auroc(maps["conflict"], truth, mask=valid)
        # the realized error rate beside the maps, so "P(error) in conflict" can be checked against it
        for name, arr in {**maps, "error": error}.items():
            s_in, n_in = float(arr[inside].sum()), int(inside.sum())
            s_out, n_out = float(arr[outside].sum()), int(outside.sum())
            out[f"{name}_in_conflict"] = s_in / n_in if n_in else math.nan
            out[f"{name}_outside_conflict"] = s_out / n_out if n_out else math.nan
            pool["in_out"][name] = (s_in, n_in, s_out, n_out)
    return out, pool


def _evaluate_case(job: dict) -> dict:
    """Segmentation metrics per label/region and uncertainty quality of one case (runs in a worker)."""
    from nnunetv2.evaluation.evaluate_predictions import (compute_tp_fp_fn_tn, label_or_region_to_key,
                                                          region_or_label_to_mask)

    with warnings.catch_warnings():
        warnings.simplefilter("ignore", RuntimeWarning)
        gt_img, gt = _read_labels(job["gt_file"], job["allowed_gt"])
        pred_img, pred = _read_labels(job["pred_file"], job["allowed_pred"])
        _check_geometry(gt_img, pred_img, job["pred_file"], job["gt_file"])
        spacing = tuple(reversed(gt_img.GetSpacing()))  # SimpleITK (x, y, z) -> numpy (z, y, x)
        ignore = None if job["ignore_label"] is None else gt == job["ignore_label"]
        valid = None if ignore is None else ~ignore

        seg = {}
        for key in job["keys"]:
            ref = region_or_label_to_mask(gt, key)
            prd = region_or_label_to_mask(pred, key)
            if valid is not None:  # ignored voxels become true negatives: Dice / HD95 do not see them
                ref, prd = ref & valid, prd & valid
            tp, fp, fn, tn = compute_tp_fp_fn_tn(ref, prd, ignore)
            seg[label_or_region_to_key(key)] = {
                "Dice": metrics.dice(prd, ref), "HD95": metrics.hd95(prd, ref, spacing),
                "TP": int(tp), "FP": int(fp), "FN": int(fn), "TN": int(tn), "n_pred": int(tp + fp),
                "n_ref": int(tp + fn)}
        result = {"prediction_file": str(job["pred_file"]), "reference_file": str(job["gt_file"]), "metrics": seg}
        if job["maps_folder"]:
            result["uncertainty"], result["_pool"] = _uncertainty(job, pred_img, pred, gt, valid, gt_img)
        else:
            result["uncertainty"] = {"note": f"no {MAP_FOLDER}/ folder in {job['pred_dir']}: uncertainty not evaluated"}
    return result


# --------------------------------------------------------------------------------------------------
# aggregation
# --------------------------------------------------------------------------------------------------
def _nanmean(values) -> float:
    vals = [math.nan if v is None else float(v) for v in values]
    if not vals or all(math.isnan(v) for v in vals):
        return math.nan
    return float(np.nanmean(vals))


def _numeric_keys(dicts) -> list[str]:
    keys: dict[str, None] = {}
    for d in dicts:
        for k, v in d.items():
            if isinstance(v, (int, float)) and not isinstance(v, bool):
                keys[k] = None
    return list(keys)


def _pooled_curve(parts: list[dict]) -> dict:
    count = sum(p["count"] for p in parts)
    sum_conf, sum_acc = sum(p["sum_conf"] for p in parts), sum(p["sum_acc"] for p in parts)
    with np.errstate(invalid="ignore", divide="ignore"):
        conf = np.where(count > 0, sum_conf / count, np.nan)
        acc = np.where(count > 0, sum_acc / count, np.nan)
    n = count.sum()
    # metrics.reliability_curve: ece == nansum(count * |accuracy - confidence|) / sum(count)
    ece = float(np.abs(sum_acc - sum_conf).sum() / n) if n > 0 else math.nan
    return {"bin_edges": np.linspace(0.0, 1.0, N_BINS + 1), "confidence": conf, "accuracy": acc,
            "count": count.astype(np.int64), "ece": ece}


def _pooled(pools: list[dict], num_voxels: int, fraction: float) -> dict:
    out: dict[str, Any] = {"num_voxels": int(num_voxels), "sampling_fraction": fraction}
    with_probs = [p for p in pools if "reliability" in p]
    if with_probs:
        sources = sorted({p["source"] for p in with_probs})
        out["ece_source"] = sources[0] if len(sources) == 1 else "mixed"
        curve = _pooled_curve([p["reliability"] for p in with_probs])
        out["ece"] = curve.pop("ece")
        out["reliability"] = curve
        out["ece_fg_boundary"] = _pooled_curve([p["reliability_fg"] for p in with_probs])["ece"]
        n = sum(p["n"] for p in with_probs)
        out["brier"] = sum(p["brier_sum"] for p in with_probs) / n if n else math.nan
        out["nll"] = sum(p["nll_sum"] for p in with_probs) / n if n else math.nan

    def cat(name, among):
        return np.concatenate([p["sample"][name] for p in among]) if among else np.zeros(0)

    with_total = [p for p in pools if "total" in p["sample"]]
    if with_total:
        total, error = cat("total", with_total), cat("error", with_total)
        out["num_sampled_voxels"] = int(total.size)
        out["error_rate"] = float(error.mean()) if error.size else math.nan
        out["error_auroc"] = metrics.error_auroc(total, error)
        out["aurc"] = metrics.aurc(total, error)
        coverage, risk = metrics.risk_coverage_curve(total, error)
        if coverage.size:
            keep = np.unique(np.linspace(0, coverage.size - 1, CURVE_POINTS).round().astype(np.int64))
            out["risk_coverage"] = {"coverage": coverage[keep], "risk": risk[keep]}
    both = [p for p in pools if "aleatoric" in p["sample"] and "epistemic" in p["sample"]]
    if both:
        out["entanglement"] = metrics.au_eu_entanglement(cat("aleatoric", both), cat("epistemic", both))
    with_truth = [p for p in pools if "truth" in p["sample"]]
    for name in ("total", "conflict"):
        among = [p for p in with_truth if name in p["sample"]]
        if among:
            out[f"conflict_auroc_{name}"] = metrics.auroc(cat(name, among), cat("truth", among))
    for name in (*MAP_NAMES, "error"):
        parts = [p["in_out"][name] for p in with_truth if name in p.get("in_out", {})]
        if parts:
            s_in, n_in, s_out, n_out = (sum(x[i] for x in parts) for i in range(4))
            out[f"{name}_in_conflict"] = s_in / n_in if n_in else math.nan
            out[f"{name}_outside_conflict"] = s_out / n_out if n_out else math.nan
    return out


def to_json(obj):
    """JSON-safe copy: numpy -> python, NaN/Inf -> None, tuple keys -> nnU-Net's ``str(key)``."""
    if isinstance(obj, dict):
        return {(k if isinstance(k, str) else str(k)): to_json(v) for k, v in obj.items()}
    if isinstance(obj, (list, tuple)):
        return [to_json(v) for v in obj]
    if isinstance(obj, np.ndarray):
        return to_json(obj.tolist())
    if isinstance(obj, np.generic):
        return to_json(obj.item())
    if isinstance(obj, float) and not math.isfinite(obj):
        return None
    if isinstance(obj, Path):
        return str(obj)
    return obj


def write_summary(summary: dict, output_file) -> Path:
    output_file = Path(output_file)
    try:
        output_file.parent.mkdir(parents=True, exist_ok=True)
        with atomic_file(output_file) as f:
            json.dump(to_json(summary), f, indent=4, sort_keys=True, allow_nan=False)
    except OSError as e:
        raise InputError(f"{output_file}: cannot write ({e.strerror or e})") from None
    return output_file


def load_summary(path) -> dict:
    path = Path(path)
    try:
        summary = json.loads(path.read_text())
    except FileNotFoundError:
        raise InputError(f"{path}: summary file does not exist") from None
    except (OSError, UnicodeDecodeError, json.JSONDecodeError) as e:
        raise InputError(f"{path}: not a readable JSON file ({str(e).splitlines()[0][:120]})") from None
    if not isinstance(summary, dict) or not isinstance(summary.get("metric_per_case"), list):
        raise InputError(f"{path}: not an evaluation summary (no metric_per_case list)")
    return summary


# --------------------------------------------------------------------------------------------------
# folder
# --------------------------------------------------------------------------------------------------
def _report_missing_maps(jobs: list[dict]) -> None:
    """Say on the terminal which map files are missing: their cases drop out of those maps' metrics."""
    for job in jobs:
        if job["maps_folder"]:
            for name, path in job["maps"].items():
                if path is None:
                    missing = map_path(job["pred_dir"], job["case"], name, job["ending"])
                    print(f"entrust: warning: {missing}: missing; case {job['case']} is left out of the "
                          f"metrics of the {name} map", file=sys.stderr)


def evaluate_folder(pred_dir, gt_dir, conflict_dir=None, dataset_json=None, output_file=None,
                    num_processes: int = 2, *, progress: bool | None = None,
                    max_pooled_voxels: int = MAX_POOLED_VOXELS) -> dict:
    """Evaluate every mask in ``pred_dir`` against ``gt_dir`` (and its uncertainty maps, if any).

    Args:
        pred_dir: prediction folder (``entrust predict``'s output).
        gt_dir: reference label files ``CASE<ending>``; every case must have a prediction and vice versa.
        conflict_dir: optional true conflict masks ``CASE<ending>`` (0/1).
        dataset_json: dataset.json; default ``pred_dir/dataset.json``, else ``gt_dir/../dataset.json``.
        output_file: where to write the summary (atomically); ``None`` writes nothing.
        num_processes: worker processes (1 = in this process).
        progress: progress bar over cases (``None``: only on a terminal).
        max_pooled_voxels: cap on the voxels entering the pooled AUROC/AURC (see ``MAX_POOLED_VOXELS``).

    Returns:
        the summary as written (JSON types: NaN is ``None``).

    Raises:
        InputError: missing cases, geometry mismatch, undeclared labels, missing dataset.json, ...
    """
    pred_dir, gt_dir = Path(pred_dir).absolute(), Path(gt_dir).absolute()
    conflict_dir = None if conflict_dir is None else Path(conflict_dir).absolute()
    if not pred_dir.is_dir():
        raise InputError(f"{pred_dir}: prediction folder does not exist")
    dj_path, dj = load_dataset_json(pred_dir, gt_dir, dataset_json)
    ending = dj["file_ending"]
    lm = label_manager(dj, dj_path)
    preds = list_cases(pred_dir, ending)
    refs = list_cases(gt_dir, ending)
    if not preds:
        raise InputError(f"{pred_dir}: no predictions ending with {ending}")
    if missing := set(preds) - set(refs):
        raise InputError(f"{gt_dir}: no reference for predicted case(s) {_names(missing)}")
    if missing := set(refs) - set(preds):
        raise InputError(f"{pred_dir}: no prediction for reference case(s) {_names(missing)}")
    conflicts = {}
    if conflict_dir is not None:
        conflicts = list_cases(conflict_dir, ending)
        if missing := set(preds) - set(conflicts):
            first = sorted(missing)[0]
            raise InputError(f"{conflict_dir / (first + ending)}: conflict mask missing "
                             f"(case(s) {_names(missing)})")

    # cheap header checks first, so that a wrong folder fails before minutes of work
    num_voxels = 0
    for case, pred_file in preds.items():
        gt_header, pred_header = read_header(refs[case]), read_header(pred_file)
        _check_geometry(gt_header, pred_header, pred_file, refs[case])
        num_voxels += int(np.prod(pred_header.GetSize()))
    fraction = min(1.0, max_pooled_voxels / max(num_voxels, 1))

    def plain(k):  # nnU-Net hands out numpy ints; keys must compare and pickle as python ints / tuples
        return tuple(int(x) for x in k) if isinstance(k, (tuple, list)) else int(k)

    keys = [plain(k) for k in lm.foreground_labels]
    if lm.has_regions:
        keys += [plain(r) for r in lm.foreground_regions if plain(r) not in keys]
    fg_keys = [plain(k) for k in (lm.foreground_regions if lm.has_regions else lm.foreground_labels)]
    declared = {int(v) for v in lm.all_labels}
    maps_folder = (pred_dir / MAP_FOLDER).is_dir()
    jobs = []
    for index, (case, pred_file) in enumerate(preds.items()):
        npz = pred_dir / f"{case}.npz"
        jobs.append({
            "index": index, "case": case, "pred_dir": pred_dir, "pred_file": pred_file, "gt_file": refs[case],
            "conflict_file": conflicts.get(case), "npz": npz if npz.is_file() else None,
            "maps": {n: map_file(pred_dir, case, n, ending) for n in MAP_NAMES} if maps_folder else {},
            "maps_folder": maps_folder, "keys": keys, "all_labels": [int(v) for v in lm.all_labels],
            "allowed_pred": declared, "allowed_gt": declared | ({lm.ignore_label} if lm.has_ignore_label else set()),
            "ignore_label": lm.ignore_label, "has_regions": lm.has_regions, "sample_fraction": fraction,
            "ending": ending})

    results = []
    with tqdm(total=len(jobs), desc="evaluate", unit="case", disable=None if progress is None else not progress) as bar:
        if num_processes > 1 and len(jobs) > 1:
            with multiprocessing.get_context("spawn").Pool(min(num_processes, len(jobs))) as pool:
                for r in pool.imap(_evaluate_case, jobs):
                    results.append(r)
                    bar.update()
        else:
            for job in jobs:
                results.append(_evaluate_case(job))
                bar.update()

    pools = [r.pop("_pool") for r in results if "_pool" in r]
    _report_missing_maps(jobs)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", RuntimeWarning)
        mean = {}
        for key in keys:
            k = str(key)
            per_case = [r["metrics"][k] for r in results]
            mean[k] = {m: _nanmean(d[m] for d in per_case) for m in per_case[0]}
        metric_names = list(next(iter(mean.values())).keys()) if mean else []
        # like nnU-Net: plain mean over the foreground labels/regions of the per-label means
        foreground_mean = {m: float(np.mean([mean[str(k)][m] for k in fg_keys])) if fg_keys else math.nan
                           for m in metric_names}
        unc = [r["uncertainty"] for r in results]
        uncertainty_mean = {k: _nanmean(u.get(k) for u in unc) for k in _numeric_keys(unc)}
        sources = sorted({u["ece_source"] for u in unc if "ece_source" in u})
        if sources:
            uncertainty_mean["ece_source"] = sources[0] if len(sources) == 1 else "mixed"
        uncertainty_mean["num_cases_with_maps"] = sum("error_auroc" in u for u in unc)
        if not maps_folder:
            uncertainty_mean["note"] = f"no {MAP_FOLDER}/ folder in {pred_dir}: uncertainty not evaluated"
        pooled = _pooled(pools, num_voxels, fraction) if pools else {"note": "no uncertainty maps"}

    summary = {
        "metric_per_case": results, "mean": mean, "foreground_mean": foreground_mean,
        "uncertainty_mean": uncertainty_mean, "uncertainty_pooled": pooled,
        "uncertainty_definitions": DEFINITIONS,
        "entrust": {"pred_dir": str(pred_dir), "gt_dir": str(gt_dir),
                    "conflict_dir": None if conflict_dir is None else str(conflict_dir),
                    "dataset_json": str(dj_path), "file_ending": ending, "n_bins": N_BINS},
    }
    summary = to_json(summary)
    if output_file is not None:
        write_summary(summary, output_file)
    return summary


def headline(summary: dict) -> dict:
    """The numbers worth printing: foreground mean Dice and the pooled ECE / AUROCs (per-case mean if
    a pooled value is missing); ``nan`` where undefined."""
    pooled = summary.get("uncertainty_pooled") or {}
    mean = summary.get("uncertainty_mean") or {}

    def number(v) -> float:
        return math.nan if v is None else float(v)

    def pick(key):
        return number(pooled.get(key, mean.get(key)))

    return {"dice": number((summary.get("foreground_mean") or {}).get("Dice")), "ece": pick("ece"),
            "error_auroc": pick("error_auroc"), "conflict_auroc_total": pick("conflict_auroc_total"),
            "conflict_auroc_conflict": pick("conflict_auroc_conflict")}
