"""The summary file of ``entrust evaluate``: its format, its aggregation over cases, reading and writing.

The file keeps nnU-Net's conventions (``metric_per_case`` list with ``prediction_file`` /
``reference_file`` / ``metrics`` keyed by ``str(label_or_region)``, ``mean``, ``foreground_mean``;
``nnunetv2.evaluation.evaluate_predictions.load_summary_json`` reads it) and adds the uncertainty
sections described in :mod:`entrust_nnunet.evaluation.evaluate`. NaN is written as ``null``.
"""
from __future__ import annotations

import json
import math
from pathlib import Path
from typing import Any

import numpy as np

from entrust_nnunet.data.io import MAP_NAMES, InputError, atomic_file
from entrust_nnunet.evaluation import metrics

N_BINS = 15
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
    "<ece, ece_fg_boundary, brier, nll>_perror": "the same of the binary P(error) view of total, written beside the "
                                                 "class-probability view when both a .npz and total exist",
    "ece_fg_boundary": "ECE over foreground of reference or mask plus a 2-voxel band around the reference "
                       "(metrics.foreground_boundary_mask)",
    "error_auroc": "AUROC of total for detecting voxels where mask != reference",
    "aurc": "area under the risk-coverage curve of total (lower is better)",
    "error_rate": "fraction of voxels where mask != reference",
    "entanglement": "Spearman correlation of aleatoric and epistemic over voxels (0 = disentangled)",
    "conflict_auroc_total": "AUROC of total for detecting true conflict voxels",
    "conflict_auroc_conflict": "AUROC of the conflict map for detecting true conflict voxels",
    "<map>_in_conflict / <map>_outside_conflict": "mean of the map inside / outside the true conflict mask",
    "<map>_on_lesion_outside_conflict": "mean of the map over the true lesion (any foreground) outside the true "
                                        "conflict mask",
    "<map>_on_edges": "mean of the map on lesion edges away from conflict (metrics.lesion_edges: 1 voxel either "
                      "side of the reference foreground's boundary, more than 2 voxels from the conflict mask)",
    "conflict_vs_edge_auroc_<total, conflict>": "AUROC of the map for telling true conflict voxels from lesion-edge "
                                                "voxels (among those two only): conflict vs ordinary boundary doubt",
    "error_in_conflict / error_outside_conflict": "fraction of wrong voxels inside / outside the true conflict mask",
    "error_all_labels_in_conflict / ..._outside_conflict": "the same against the reference and every annotator label, "
                                                           "averaged (with --annotators): where the truth is a coin "
                                                           "flip, 1 + A draws of each coin instead of one",
    "foreground_mean": "mean over the evaluated foreground labels (regions, if dataset.json declares regions) "
                       "of the per-label means, as nnU-Net",
    "foreground_names": "the name in dataset.json's labels of each evaluated foreground label or region (BraTS: "
                        "whole tumor, tumor core, enhancing tumor), keyed as mean",
    "HD95": ("95th-percentile symmetric Hausdorff distance in mm (0 if both masks are empty; the image's "
             "diagonal if one is: a structure missed or hallucinated whole)"),
    "coherence": "share of (conflict blob, hypothesis) pairs where the hypothesis marks >= 80 % or <= 20 % of the "
                 "blob as foreground (metrics.hypothesis_coherence)",
    "diversity": "per conflict case 1 if every conflict blob is taken whole by one hypothesis and left whole by "
                 "another, else 0; its mean is the share of conflict cases with both readings",
    "ged2 / ged2_mask_copies": "squared generalized energy distance (d = 1 - IoU of the foreground, empty vs empty "
                               "IoU = 1) of the hypotheses / of K copies of the mask against the annotators",
    "hm_iou": "Hungarian-matched IoU of the hypotheses and the annotators (sets replicated to their lcm)",
}




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
    """Reliability curve and ECE over the voxels of several cases (their calibration statistics summed)."""
    return metrics.calibration_from_statistics(metrics.pool_calibration_statistics(parts))


def _pooled_calibration(pools: list[dict]) -> dict:
    """ECE (with its reliability curve), ECE on foreground + boundary, Brier and NLL over the pools' voxels."""
    curve = _pooled_curve([p["reliability"] for p in pools])
    n = sum(p["n"] for p in pools)
    return {"ece": curve.pop("ece"), "reliability": curve,
            "ece_fg_boundary": _pooled_curve([p["reliability_fg"] for p in pools])["ece"],
            "brier": sum(p["brier_sum"] for p in pools) / n if n else math.nan,
            "nll": sum(p["nll_sum"] for p in pools) / n if n else math.nan}


def _pooled(pools: list[dict], num_voxels: int, fraction: float) -> dict:
    out: dict[str, Any] = {"num_voxels": int(num_voxels), "sampling_fraction": fraction}
    with_probs = [p for p in pools if "reliability" in p]
    if with_probs:
        sources = sorted({p["source"] for p in with_probs})
        out["ece_source"] = sources[0] if len(sources) == 1 else "mixed"
        out.update(_pooled_calibration(with_probs))
    perror = [p["perror"] for p in pools if "perror" in p]
    if perror:  # the P(error) view of total beside the class-probability one
        out.update({f"{k}_perror": v for k, v in _pooled_calibration(perror).items() if k != "reliability"})

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
            if all("edge" in p["sample"] for p in among):
                truth = cat("truth", among)
                either = truth | cat("edge", among)
                out[f"conflict_vs_edge_auroc_{name}"] = metrics.auroc(cat(name, among)[either], truth[either])
    for name in (*MAP_NAMES, "error", "error_all_labels"):
        parts = [p["in_out"][name] for p in with_truth if name in p.get("in_out", {})]
        if parts:
            s_in, n_in, s_out, n_out = (sum(x[i] for x in parts) for i in range(4))
            out[f"{name}_in_conflict"] = s_in / n_in if n_in else math.nan
            out[f"{name}_outside_conflict"] = s_out / n_out if n_out else math.nan
        edges = [p["edges"][name] for p in with_truth if name in p.get("edges", {})]
        if edges:
            n = sum(e[1] for e in edges)
            out[f"{name}_on_edges"] = sum(e[0] for e in edges) / n if n else math.nan
    return out


def summarize(results: list[dict], keys: list, fg_keys: list, pooled_inputs: list[dict], num_voxels: int,
              fraction: float, inputs: dict) -> dict:
    """The summary of per-case ``results``: per label/region means, nnU-Net's foreground mean, the mean and
    pooled uncertainty metrics; ``inputs`` is recorded under ``entrust``."""
    import warnings

    with warnings.catch_warnings():
        warnings.simplefilter("ignore", RuntimeWarning)
        mean = {}
        for key in keys:
            per_case = [r["metrics"][str(key)] for r in results]
            mean[str(key)] = {m: _nanmean(d[m] for d in per_case) for m in per_case[0]}
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
        pooled = _pooled(pooled_inputs, num_voxels, fraction) if pooled_inputs else {"note": "no uncertainty maps"}
        hyps = [r["hypotheses"] for r in results if "hypotheses" in r]
        hypotheses_mean = {k: _nanmean(h.get(k) for h in hyps) for k in _numeric_keys(hyps)}
    return to_json({"metric_per_case": results, "mean": mean, "foreground_mean": foreground_mean,
                    "uncertainty_mean": uncertainty_mean, "uncertainty_pooled": pooled,
                    **({"hypotheses_mean": hypotheses_mean} if hyps else {}),
                    "uncertainty_definitions": DEFINITIONS, "entrust": {**inputs, "n_bins": N_BINS}})


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

