"""Issue 12's table on held-out phantoms: plain nnU-Net (its softmax) against EnTrust (its maps).

    python score.py case RAW_DATASET PLAIN_PRED ENTRUST_PRED OUT.json   # one training run
    python score.py table OUT [TAG]      # mean ± std over OUT/metrics_ID_TAG_rR.json (TAG: the folds, default f0,
                                         # and the schedule when not the short one: f0_long)

Per method, over the voxels of every test case together (``conflictTs`` = the true conflict blobs):

* ``dice_lesion`` / ``dice_rim``: per-case Dice, averaged over the cases where the label is in the truth or the mask;
* ``perr_in_conflict`` / ``err_in_conflict``: mean P(error) and the mask's error rate inside the blobs (P(error):
  EnTrust's ``total``, plain nnU-Net's ``1 - max p``); ``perr_outside`` / ``err_outside`` elsewhere;
* ``conflict_in_conflict`` / ``conflict_on_edges``: the conflict map (plain nnU-Net: ``1 - max p``, its only map)
  inside the blobs / on lesion edges away from them (:func:`~entrust_nnunet.evaluation.metrics.lesion_edges`);
* ``auroc_conflict_vs_edges``: that map as a score for "blob" among blob and edge voxels;
  ``auroc_conflict_among_uncertain``: the same among the voxels whose P(error) is at least 0.05;
* ``error_auroc``, ``ece_perror``: P(error) against the mask's errors; ``ece_class_all`` / ``ece_class_fg``: top-label
  ECE of the saved class probabilities over every voxel / foreground + boundary band.
"""
from __future__ import annotations

import json
import re
import sys
from pathlib import Path

import numpy as np
import SimpleITK as sitk

from entrust_nnunet.evaluation import metrics as M
from entrust_nnunet.evaluation.seeds import format_mean_std, mean_std

UNCERTAIN = 0.05
KEYS = ("dice_lesion", "dice_rim", "perr_in_conflict", "err_in_conflict", "perr_outside", "err_outside",
        "conflict_in_conflict", "conflict_on_edges", "auroc_conflict_vs_edges", "auroc_conflict_among_uncertain",
        "error_auroc", "ece_perror", "ece_class_all", "ece_class_fg")


def _array(path: Path) -> np.ndarray:
    return sitk.GetArrayFromImage(sitk.ReadImage(str(path)))


def _maps(pred: Path, case: str, probs: np.ndarray, plain: bool) -> tuple[np.ndarray, np.ndarray]:
    """(P(error), conflict map) of one case."""
    if plain:
        return 1 - probs.max(0), 1 - probs.max(0)
    return tuple(_array(pred / "uncertainty" / f"{case}_{name}.nii.gz").astype(np.float64)
                 for name in ("total", "conflict"))


def score(raw: Path, pred: Path, plain: bool) -> dict:
    """The numbers above for one prediction folder (masks, ``.npz`` probabilities, EnTrust's ``uncertainty/``)."""
    pooled, dices, cal, cal_fg = {k: [] for k in ("perr", "err", "blob", "conflict", "edge")}, {1: [], 2: []}, [], []
    for label in sorted((raw / "labelsTs").glob("*.nii.gz")):
        case = label.name[: -len(".nii.gz")]
        gt, blob = _array(label).astype(np.int64), _array(raw / "conflictTs" / label.name) > 0
        mask = _array(pred / label.name).astype(np.int64)
        probs = np.load(pred / f"{case}.npz")["probabilities"].astype(np.float64)
        perr, conflict = _maps(pred, case, probs, plain)
        for c in dices:
            if (gt == c).any() or (mask == c).any():
                dices[c].append(M.dice(mask == c, gt == c))
        cal.append(M.calibration_statistics(probs, gt))
        cal_fg.append(M.calibration_statistics(probs, gt, mask=M.foreground_boundary_mask(gt, mask)))
        for k, v in (("perr", perr), ("err", mask != gt), ("blob", blob), ("conflict", conflict),
                     ("edge", M.lesion_edges(gt, exclude=blob))):
            pooled[k].append(v.reshape(-1))
    v = {k: np.concatenate(x) for k, x in pooled.items()}
    blob, edge, uncertain = v["blob"], v["edge"], v["perr"] >= UNCERTAIN
    mean = lambda x, where: float(x[where].mean()) if where.any() else None  # noqa: E731
    return {"dice_lesion": float(np.mean(dices[1])), "dice_rim": float(np.mean(dices[2])),
            "perr_in_conflict": mean(v["perr"], blob), "err_in_conflict": mean(v["err"], blob),
            "perr_outside": mean(v["perr"], ~blob), "err_outside": mean(v["err"], ~blob),
            "conflict_in_conflict": mean(v["conflict"], blob), "conflict_on_edges": mean(v["conflict"], edge),
            "auroc_conflict_vs_edges": M.auroc(v["conflict"], blob, mask=blob | edge) if blob.any() else None,
            "auroc_conflict_among_uncertain": (M.auroc(v["conflict"], blob, mask=uncertain)
                                               if (blob & uncertain).any() else None),
            "error_auroc": M.error_auroc(v["perr"], v["err"]),
            "ece_perror": M.ece(np.stack([1 - v["perr"], v["perr"]]), v["err"].astype(np.int64)),
            "ece_class_all": M.calibration_from_statistics(M.pool_calibration_statistics(cal))["ece"],
            "ece_class_fg": M.calibration_from_statistics(M.pool_calibration_statistics(cal_fg))["ece"],
            "conflict_voxels": int(blob.sum())}


def table(out: Path, tag: str = "f0") -> str:
    """Mean ± std over the repeats of every dataset in ``out`` predicted with the folds ``tag`` names
    (OUT/metrics_ID_TAG_rR.json; ``f0``: fold 0 alone, ``f01234``: the five folds' ensemble; ``_long`` after them:
    trained with run.sh's ``SCHEDULE=Long``)."""
    runs: dict[str, list[dict]] = {}
    for f in sorted(out.glob(f"metrics_*_{tag}_r*.json")):
        runs.setdefault(re.match(r"metrics_(\d+)_", f.name).group(1), []).append(json.loads(f.read_text()))
    folds, _, schedule = tag[1:].partition("_")
    lines = []
    for dataset, rows in runs.items():
        lines += ["", f"dataset {dataset}, folds {folds}, {schedule or 'short'} schedule ({len(rows)} training runs)", "",
                  "| | plain nnU-Net | EnTrust |", "|---|---|---|"]
        for k in KEYS:
            cells = []
            for method in ("plain", "entrust"):
                # the sample std over training runs, as every other table of the project; none for one run
                cells.append(format_mean_std(*mean_std([r[method][k] for r in rows]), 3))
            lines.append(f"| {k} | {cells[0]} | {cells[1]} |")
    return "\n".join(lines)


if __name__ == "__main__":
    if sys.argv[1:2] == ["case"]:
        raw, plain, ours, dst = (Path(a) for a in sys.argv[2:6])
        result = {"plain": score(raw, plain, True), "entrust": score(raw, ours, False)}
        dst.write_text(json.dumps(result, indent=1))
        print(json.dumps(result, indent=1))
    elif sys.argv[1:2] == ["table"]:
        print(table(Path(sys.argv[2]), *sys.argv[3:4]))
    else:
        sys.exit(__doc__)
