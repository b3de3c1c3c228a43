"""Fitting TrustMap's CalibHead on cases the network never trained on.

The voxels come from the same prediction path as inference (nnU-Net's sliding window, mirroring,
pooled hypotheses: :meth:`EnTrustPredictor.pooled_statistics`), so the head learns on exactly the
statistics it will see. Which cases: the validation fold of the trained fold; with fold ``all`` a
seeded subset of the training cases held out of training (:func:`calibration_subset`).
"""
from __future__ import annotations

import zlib
from typing import Callable, Iterable

import numpy as np
import torch

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
def case_voxels(stats: dict[str, torch.Tensor], seg: np.ndarray, key: str, max_voxels: int) -> Voxels:
    """CalibHead's inputs and the error indicator (argmax(mean) != label) of one case's voxels.

    Voxels outside nnU-Net's crop mask (label < 0) are skipped; at most ``max_voxels`` are kept, a
    subset seeded by the case name (the same voxels whenever the case is seen again).
    """
    seg = torch.from_numpy(np.asarray(seg)[0]).to(stats["entropy"].device)
    valid = (seg >= 0).flatten().nonzero()[:, 0].cpu()
    if valid.numel() > max_voxels:
        gen = torch.Generator().manual_seed(zlib.crc32(key.encode("utf-8")))
        valid = valid[torch.randperm(valid.numel(), generator=gen)[:max_voxels]]
    error = (stats["mean"].argmax(0) != seg).flatten().cpu()[valid].float()
    return {k: stats[k].flatten().float().cpu()[valid] for k in STATISTICS}, error


def calibration_voxels(predictor, cases: Iterable, keys, cache: dict, max_voxels_per_case: int) -> Voxels:
    """Voxels of ``keys``: ``cases`` yields (key, data, seg) of those not yet in ``cache`` (filled here)."""
    for key, data, seg in cases:
        cache[key] = case_voxels(predictor.pooled_statistics(data), seg, key, max_voxels_per_case)
    columns = {k: torch.cat([cache[key][0][k] for key in keys]) for k in STATISTICS}
    return columns, torch.cat([cache[key][1] for key in keys])


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
