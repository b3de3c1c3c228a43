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
  Brier, NLL (of the class probabilities when a ``.npz`` is there, and then ALSO of the P(error) view
  of ``total`` as ``ece_perror``, ``brier_perror``, ...), error AUROC and AURC of ``total``, AU/EU
  entanglement and, with a conflict folder, the AUROCs of ``total`` and ``conflict`` for detecting conflict voxels and the mean of every map
  inside / outside the true conflict;
* ``uncertainty_mean``: ``nanmean`` of those over cases;
* ``uncertainty_pooled``: the same measured over the voxels of all cases together (per-case AUROCs
  are undefined for cases without conflict or without errors), with the pooled reliability curve and
  risk-coverage curve the report draws;
* ``uncertainty_definitions`` and ``entrust`` (the inputs used).

NaN (undefined, e.g. Dice of a label absent from both masks) is written as ``null``. Every metric
is computed by :mod:`entrust_nnunet.evaluation.metrics`; this module only selects voxels and aggregates.
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

from entrust_nnunet.data.io import (HYPOTHESIS_FOLDER, MAP_FOLDER, MAP_NAMES, POSTPROCESSING_RECORD, InputError,
                                    check_same_geometry, map_path, numbered_files, read_header, read_image)
from entrust_nnunet.evaluation import metrics
from entrust_nnunet.evaluation.summary import CURVE_POINTS, DEFINITIONS, N_BINS, summarize, to_json, write_summary  # noqa: F401

#: at most this many voxels (all cases together) enter the pooled AUROC / AURC / Spearman; more are
#: subsampled uniformly with one fraction for all cases (pooled ECE, Brier and NLL are always exact)
MAX_POOLED_VOXELS = 4_000_000
#: bins of ECE and of the reliability diagram


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
    """The map file ``entrust predict`` writes for this case (see :func:`entrust_nnunet.data.io.map_path`), if present."""
    f = map_path(pred_dir, case, name, file_ending)
    return f if f.is_file() else None


def _read_label_stack(paths: list[Path], reference: sitk.Image, ref_path: Path, allowed: set[int]) -> np.ndarray:
    """(N, *spatial) label maps from ``paths``, each checked against ``reference``'s geometry."""
    arrays = []
    for path in paths:
        image, arr = _read_labels(path, allowed)
        check_same_geometry(reference, ref_path, image, path)
        arrays.append(arr)
    return np.stack(arrays)


def _hypothesis_metrics(job: dict, pred_img: sitk.Image, pred: np.ndarray, truth: np.ndarray | None,
                        annotators: np.ndarray | None) -> dict:
    """Hypotheses as whole alternatives (coherence, diversity: with a conflict mask) and against the
    annotators (GED^2, HM-IoU; and GED^2 of K copies of the mask, the reference a sampler must beat)."""
    out: dict[str, Any] = {}
    hyps = _read_label_stack(job["hypotheses"], pred_img, job["pred_file"], job["allowed_pred"]) \
        if job["hypotheses"] else None
    if hyps is not None:
        out["num_hypotheses"] = len(hyps)
        if truth is not None and truth.any():
            out["coherence"] = metrics.hypothesis_coherence(hyps, truth)
            out["diversity"] = metrics.hypothesis_diversity(hyps, truth)
    if annotators is not None:
        samples, mask = hyps if hyps is not None else pred[None], pred
        if job["ignore_label"] is not None:  # a voxel the reference or an annotator ignores is no label to compare
            ignored = (annotators == job["ignore_label"]).any(0) | (job["reference"] == job["ignore_label"])
            samples, mask, annotators = (np.where(ignored, 0, a) for a in (samples, mask, annotators))
        out["ged2"] = metrics.generalized_energy_distance(samples, annotators)
        out["ged2_mask_copies"] = metrics.generalized_energy_distance(np.repeat(mask[None], len(samples), 0),
                                                                      annotators)
        out["hm_iou"] = metrics.hungarian_matched_iou(samples, annotators)
    return out


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


def _read_maps(job: dict, pred_img: sitk.Image) -> tuple[dict[str, np.ndarray], list[str]]:
    """The case's uncertainty maps (geometry and range checked) and the names of those missing."""
    maps, missing = {}, []
    for name in MAP_NAMES:
        path = job["maps"].get(name)
        if path is None:
            missing.append(name)
            continue
        image = read_image(path)
        check_same_geometry(pred_img, job["pred_file"], image, path)
        arr = sitk.GetArrayFromImage(image).astype(np.float64)
        if name in ("total", "conflict") and (arr.min() < -1e-4 or arr.max() > 1 + 1e-4):
            raise InputError(f"{path}: {name} map must lie in [0, 1], found [{arr.min():.4g}, {arr.max():.4g}]")
        maps[name] = np.clip(arr, 0.0, 1.0) if name in ("total", "conflict") else arr
    return maps, missing


def _probabilities_and_labels(job: dict, gt, valid, error, total):
    """Class probabilities with their reference labels (from the .npz), else the binary P(error) view of
    ``total`` ([mask right, mask wrong] against the error indicator); and which of the two it is."""
    if job["npz"] is not None and not job["has_regions"]:
        probs = _probabilities(job["npz"], gt.shape, len(job["all_labels"]))
        labels = np.searchsorted(np.asarray(job["all_labels"]), np.where(valid, gt, 0) if valid is not None else gt)
        return probs, labels, "probabilities"
    if total is not None:
        return np.stack([1.0 - total, total]), error.astype(np.int64), "total"
    return None, None, None


def _calibration(out: dict, pool: dict, probs, labels, source: str, valid, fg_mask, n_valid: int) -> None:
    """ECE (all voxels; foreground + boundary), Brier, NLL of one case, and their pooled statistics."""
    out["ece_source"] = pool["source"] = source
    out["ece"] = metrics.ece(probs, labels, n_bins=N_BINS, mask=valid)
    out["ece_fg_boundary"] = metrics.ece(probs, labels, n_bins=N_BINS, mask=fg_mask)
    brier = metrics.brier_score(probs, labels, mask=valid)
    out["brier"] = brier / 2.0 if source == "total" else brier  # binary view: mean (total - error)^2
    out["nll"] = metrics.nll(probs, labels, mask=valid)
    pool["reliability"] = metrics.calibration_statistics(probs, labels, N_BINS, valid)
    pool["reliability_fg"] = metrics.calibration_statistics(probs, labels, N_BINS, fg_mask)
    pool["brier_sum"], pool["nll_sum"] = out["brier"] * n_valid, out["nll"] * n_valid


def _conflict(out: dict, pool: dict, job: dict, gt_img, gt, maps: dict, errors: dict, valid, sample,
              n_valid: int) -> None:
    """Conflict detection by the maps, every map's mean inside / outside the true conflict mask and on lesion
    edges away from it, and how well the maps tell conflict from those edges (AUROC among conflict + edge
    voxels: the two causes of doubt the conflict map must keep apart). ``errors``: ``error`` (mask != reference)
    and, with annotators, ``error_all_labels`` (its mean over the reference and every annotator label)."""
    image = read_image(job["conflict_file"])
    check_same_geometry(gt_img, job["gt_file"], image, job["conflict_file"])
    truth = sitk.GetArrayFromImage(image)
    if not np.all((truth == 0) | (truth == 1)):
        raise InputError(f"{job['conflict_file']}: conflict mask must contain only 0 and 1")
    truth = truth.astype(bool)
    inside = truth if valid is None else truth & valid
    outside = ~truth if valid is None else ~truth & valid
    out["conflict_fraction"] = float(inside.sum() / n_valid) if n_valid else math.nan
    pool["sample"]["truth"] = truth[sample]
    pool["in_out"] = {}
    edges = metrics.lesion_edges(gt if valid is None else np.where(valid, gt, 0), exclude=truth)
    if valid is not None:
        edges &= valid
    pool["sample"]["edge"] = edges[sample]
    for name in ("total", "conflict"):
        if name in maps:
            out[f"conflict_auroc_{name}"] = metrics.auroc(maps[name], truth, mask=valid)
            out[f"conflict_vs_edge_auroc_{name}"] = metrics.auroc(maps[name], truth, mask=inside | edges)
    pool["edges"] = {}
    # the lesion where no modality contradicts another: with a modality missing, total should rise there (in the
    # conflict blobs the truth is a coin flip that only several modalities together reveal)
    clear_lesion = (gt > 0) & outside
    # the realized error rate beside the maps, so "P(error) in conflict" can be checked against it
    for name, arr in {**maps, **errors}.items():
        out[f"{name}_on_lesion_outside_conflict"] = float(arr[clear_lesion].mean()) if clear_lesion.any() else math.nan
        out[f"{name}_on_edges"] = float(arr[edges].mean()) if edges.any() else math.nan
        pool["edges"][name] = (float(arr[edges].sum()), int(edges.sum()))
        s_in, n_in = float(arr[inside].sum()), int(inside.sum())
        s_out, n_out = float(arr[outside].sum()), int(outside.sum())
        out[f"{name}_in_conflict"] = s_in / n_in if n_in else math.nan
        out[f"{name}_outside_conflict"] = s_out / n_out if n_out else math.nan
        pool["in_out"][name] = (s_in, n_in, s_out, n_out)


def error_against_labels(pred: np.ndarray, labels: np.ndarray, ignore_label: int | None) -> np.ndarray:
    """Per voxel the share of ``labels`` (N, *s) that ``pred`` disagrees with, among those that do not ignore it
    (0 where all do)."""
    counted = np.ones(labels.shape, bool) if ignore_label is None else labels != ignore_label
    return ((pred[None] != labels) & counted).sum(0) / np.maximum(counted.sum(0), 1)


def _uncertainty(job: dict, pred_img: sitk.Image, pred: np.ndarray, gt: np.ndarray, valid: np.ndarray | None,
                 gt_img: sitk.Image, annotators: np.ndarray | None) -> tuple[dict, dict]:
    """Per-case uncertainty metrics and the pieces the pooled metrics are built from."""
    out: dict[str, Any] = {}
    maps, missing = _read_maps(job, pred_img)
    if missing:
        out["note"] = f"missing map(s) {', '.join(missing)} in {job['pred_dir'] / MAP_FOLDER}"
    error = pred != gt
    n_valid = int(error.size if valid is None else valid.sum())
    out["error_rate"] = float(error[valid].mean() if valid is not None else error.mean()) if n_valid else math.nan
    sample = (np.ones(error.shape, bool) if valid is None else valid.copy())
    if job["sample_fraction"] < 1.0:
        sample &= np.random.default_rng(job["index"]).random(error.shape) < job["sample_fraction"]
    pool: dict[str, Any] = {"n": n_valid, "sample": {"error": error[sample]}}
    fg_mask = metrics.foreground_boundary_mask(np.where(valid, gt, 0) if valid is not None else gt, pred)
    if valid is not None:
        fg_mask &= valid
    total = maps.get("total")
    if job["npz"] is not None and job["has_regions"]:
        out["probabilities_note"] = "npz holds per-region sigmoid outputs, not a class distribution: not used"
    probs, labels, source = _probabilities_and_labels(job, gt, valid, error, total)
    if probs is not None:
        _calibration(out, pool, probs, labels, source, valid, fg_mask, n_valid)
    if source == "probabilities" and total is not None:  # the P(error) view of total too, under its own keys
        view, pool["perror"] = {}, {"n": n_valid}
        _calibration(view, pool["perror"], np.stack([1.0 - total, total]), error.astype(np.int64), "total", valid,
                     fg_mask, n_valid)
        out.update({f"{k}_perror": v for k, v in view.items() if k != "ece_source"})
    if total is not None:
        out["error_auroc"] = metrics.error_auroc(total, error, mask=valid)
        out["aurc"] = metrics.aurc(total, error, mask=valid)
    if "aleatoric" in maps and "epistemic" in maps:
        out["entanglement"] = metrics.au_eu_entanglement(maps["aleatoric"], maps["epistemic"], mask=valid)
    # the maps over the true lesion (any foreground): with a modality missing, total should rise where it showed
    lesion = (gt > 0) if valid is None else (gt > 0) & valid
    for name, arr in maps.items():
        out[f"{name}_on_lesion"] = float(arr[lesion].mean()) if lesion.any() else math.nan
    for name, arr in maps.items():
        pool["sample"][name] = arr[sample].astype(np.float32)
    if job["conflict_file"] is not None:
        errors = {"error": error}
        if annotators is not None:  # where the truth is a coin flip, one reference is one draw of each coin
            errors["error_all_labels"] = error_against_labels(pred, np.concatenate([gt[None], annotators]),
                                                              job["ignore_label"])
        _conflict(out, pool, job, gt_img, gt, maps, errors, valid, sample, n_valid)
    return out, pool


def hd95_or_diagonal(pred: np.ndarray, ref: np.ndarray, spacing) -> float:
    """:func:`~entrust_nnunet.evaluation.metrics.hd95`, with the image's physical diagonal where exactly one of the
    masks is empty (the metric is undefined there): a structure missed or hallucinated whole counts as the largest
    boundary error the image allows, as BraTS scores it, instead of leaving the case out of the mean."""
    value = metrics.hd95(pred, ref, spacing)
    if value != value:
        return float(np.sqrt(np.sum((np.asarray(pred.shape) * np.asarray(spacing, dtype=np.float64)) ** 2)))
    return value


def _evaluate_case(job: dict) -> dict:
    """Segmentation metrics per label/region and uncertainty quality of one case (runs in a worker)."""
    from nnunetv2.evaluation.evaluate_predictions import (compute_tp_fp_fn_tn, label_or_region_to_key,
                                                          region_or_label_to_mask)

    with warnings.catch_warnings():
        warnings.simplefilter("ignore", RuntimeWarning)
        gt_img, gt = _read_labels(job["gt_file"], job["allowed_gt"])
        pred_img, pred = _read_labels(job["pred_file"], job["allowed_pred"])
        check_same_geometry(gt_img, job["gt_file"], pred_img, job["pred_file"])
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
                "Dice": metrics.dice(prd, ref), "HD95": hd95_or_diagonal(prd, ref, spacing),
                "TP": int(tp), "FP": int(fp), "FN": int(fn), "TN": int(tn), "n_pred": int(tp + fp),
                "n_ref": int(tp + fn)}
        result = {"prediction_file": str(job["pred_file"]), "reference_file": str(job["gt_file"]), "metrics": seg}
        annotators = (_read_label_stack(job["annotators"], pred_img, job["pred_file"], job["allowed_gt"])
                      if job["annotators"] else None)
        if job["maps_folder"]:
            result["uncertainty"], result["_pool"] = _uncertainty(job, pred_img, pred, gt, valid, gt_img, annotators)
        else:
            result["uncertainty"] = {"note": f"no {MAP_FOLDER}/ folder in {job['pred_dir']}: uncertainty not evaluated"}
        if job["hypotheses"] or job["annotators"]:
            truth = sitk.GetArrayFromImage(read_image(job["conflict_file"])) > 0 if job["conflict_file"] else None
            result["hypotheses"] = _hypothesis_metrics({**job, "reference": gt}, pred_img, pred, truth, annotators)
    return result


# --------------------------------------------------------------------------------------------------
# folder
# --------------------------------------------------------------------------------------------------
def key_names(labels: dict, keys: list) -> dict[str, str]:
    """``str(label_or_region)`` -> its name in dataset.json's ``labels`` (e.g. ``"(1, 2, 3)": "whole tumor"``),
    for the evaluated foreground ``keys``; a region named nowhere keeps its key."""
    by_key = {str(_plain(v)): name for name, v in labels.items() if name != "ignore"}
    return {str(k): by_key.get(str(k), str(k)) for k in keys}


def _report_missing_maps(jobs: list[dict]) -> None:
    """Say on the terminal which map files are missing: their cases drop out of those maps' metrics."""
    for job in jobs:
        if job["maps_folder"]:
            for name, path in job["maps"].items():
                if path is None:
                    missing = map_path(job["pred_dir"], job["case"], name, job["ending"])
                    print(f"entrust: warning: {missing}: missing; case {job['case']} is left out of the "
                          f"metrics of the {name} map", file=sys.stderr)


def _paired_cases(pred_dir: Path, gt_dir: Path, conflict_dir: Path | None, ending: str):
    """``(predictions, references, conflict masks)`` as ``CASE -> file``; every case must have all three."""
    preds, refs = list_cases(pred_dir, ending), list_cases(gt_dir, ending)
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
    return preds, refs, conflicts


def _plain(k):
    """nnU-Net hands out numpy ints; keys must compare and pickle as python ints / tuples."""
    return tuple(int(x) for x in k) if isinstance(k, (tuple, list)) else int(k)


def _jobs(pred_dir: Path, preds: dict, refs: dict, conflicts: dict, lm, ending: str, fraction: float,
          annotators_dir: Path | None = None):
    """One job per case for :func:`_evaluate_case`, and the label/region keys (all, foreground)."""
    keys = [_plain(k) for k in lm.foreground_labels]
    if lm.has_regions:
        keys += [_plain(r) for r in lm.foreground_regions if _plain(r) not in keys]
    fg_keys = [_plain(k) for k in (lm.foreground_regions if lm.has_regions else lm.foreground_labels)]
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
            "hypotheses": numbered_files(pred_dir / HYPOTHESIS_FOLDER, case, "h", ending),
            "annotators": numbered_files(annotators_dir, case, "a", ending) if annotators_dir else [],
            "ending": ending})
    return jobs, keys, fg_keys


def _run(jobs: list[dict], num_processes: int, progress: bool | None) -> list[dict]:
    """:func:`_evaluate_case` of every job, in a spawn pool when asked, with a progress bar."""
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
    return results


def add_postprocessing_record(summary: dict, pred_dir: Path, ending: str) -> None:
    """What ``entrust postprocess`` removed (its record beside the masks): per case under ``postprocessing`` and
    in total under ``summary["postprocessing"]``, so the report can say where it removed conflict-marked regions."""
    path = pred_dir / POSTPROCESSING_RECORD
    if not path.is_file():
        return
    try:
        record = json.loads(path.read_text())
        cases = record["cases"]
    except (OSError, UnicodeDecodeError, json.JSONDecodeError, KeyError, TypeError) as e:
        raise InputError(f"{path}: not a post-processing record ({type(e).__name__})") from None
    for entry in summary["metric_per_case"]:
        name = Path(entry["prediction_file"]).name
        entry["postprocessing"] = cases.get(name[: -len(ending)] if name.endswith(ending) else name)
    total = {k: sum((c or {}).get(k, 0) for c in cases.values())
             for k in ("removed_voxels", "removed_regions", "removed_conflict_voxels", "removed_conflict_regions")}
    summary["postprocessing"] = {**total, "cases_with_removed_conflict": sorted(
        c for c, r in cases.items() if r.get("removed_conflict_voxels")), "conflict_mark": record.get("conflict_mark"),
        "postprocessing_fns": record.get("postprocessing_fns"), "record": str(path)}


def evaluate_folder(pred_dir, gt_dir, conflict_dir=None, dataset_json=None, output_file=None,
                    num_processes: int = 2, *, progress: bool | None = None,
                    max_pooled_voxels: int = MAX_POOLED_VOXELS, annotators_dir=None) -> dict:
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
        annotators_dir: optional annotator labels ``CASE_aN<ending>``: GED^2 and HM-IoU of the hypotheses
            (``PRED/hypotheses/CASE_hNN<ending>``, else of the mask alone) against them.

    Returns the summary as written (JSON types: NaN is ``None``). Raises :class:`InputError` for missing
    cases, geometry mismatch, undeclared labels, a missing dataset.json, ...
    """
    pred_dir, gt_dir = Path(pred_dir).absolute(), Path(gt_dir).absolute()
    conflict_dir = None if conflict_dir is None else Path(conflict_dir).absolute()
    if not pred_dir.is_dir():
        raise InputError(f"{pred_dir}: prediction folder does not exist")
    dj_path, dj = load_dataset_json(pred_dir, gt_dir, dataset_json)
    ending = dj["file_ending"]
    preds, refs, conflicts = _paired_cases(pred_dir, gt_dir, conflict_dir, ending)
    # cheap header checks first, so that a wrong folder fails before minutes of work
    num_voxels = 0
    for case, pred_file in preds.items():
        pred_header = read_header(pred_file)
        check_same_geometry(read_header(refs[case]), refs[case], pred_header, pred_file)
        num_voxels += int(np.prod(pred_header.GetSize()))
    fraction = min(1.0, max_pooled_voxels / max(num_voxels, 1))
    annotators_dir = None if annotators_dir is None else Path(annotators_dir).absolute()
    if annotators_dir is not None and not annotators_dir.is_dir():
        raise InputError(f"{annotators_dir}: annotators folder does not exist")
    jobs, keys, fg_keys = _jobs(pred_dir, preds, refs, conflicts, label_manager(dj, dj_path), ending, fraction,
                                annotators_dir)
    results = _run(jobs, num_processes, progress)
    pools = [r.pop("_pool") for r in results if "_pool" in r]
    _report_missing_maps(jobs)
    inputs = {"pred_dir": str(pred_dir), "gt_dir": str(gt_dir), "dataset_json": str(dj_path), "file_ending": ending,
              "conflict_dir": None if conflict_dir is None else str(conflict_dir)}
    summary = summarize(results, keys, fg_keys, pools, num_voxels, fraction, inputs)
    summary["foreground_names"] = key_names(dj["labels"], fg_keys)
    if not (pred_dir / MAP_FOLDER).is_dir():
        summary["uncertainty_mean"]["note"] = f"no {MAP_FOLDER}/ folder in {pred_dir}: uncertainty not evaluated"
    add_postprocessing_record(summary, pred_dir, ending)
    if output_file is not None:
        write_summary(summary, output_file)
    return summary
