"""Multimodal phantoms with KNOWN inter-modal conflict: the test bed for everything uncertainty-related.

Each case is a body (tissue) holding a lesion made of a ``core`` (label 1) and a surrounding
``ring`` (label 2), seen by every modality with its own contrast:

========  ==================  =====  =====  =====  ======  =================
modality  character           tissue ring   core   noise   range
========  ==================  =====  =====  =====  ======  =================
T1        hyper-intense       100    170    240    8       about 0 .. 300
T2        hypo-intense        600    420    250    35      about 0 .. 800
FLAIR     weak contrast       0.30   0.42   0.52   0.06    about 0 .. 1
========  ==================  =====  =====  =====  ======  =================

(more modalities cycle through these characters with other scales). Images are blurred
(partial-volume edges, i.e. ordinary boundary doubt), multiplied by a smooth bias field and
get Gaussian noise.

**Conflict.** Most cases also hold 1-2 satellite blobs that a random non-empty, proper subset of the
modalities shows (with that modality's core contrast) and the others hide (plain tissue). Whether a
blob is really a lesion (label 1) or nothing (label 0) is a coin flip per blob, drawn independently
of the images, so nothing in the images can tell: the Bayes-optimal probability of "core" there
is 0.5. Every fourth case (index % 4 == 3) has no blob at all, and with one modality there can be
no conflict. The true conflict mask is written per case (``conflictTr/``, ``conflictTs/``, uint8).

``--annotators A`` writes A further label variants per case, each re-drawing the coin of every
blob and moving the lesion boundary by at most one voxel, i.e. sampled from the same ambiguity.

All files of a case share one geometry: anisotropic spacing, a non-zero origin and a rotated
(non-identity) direction. Generation is deterministic per (seed, case index).
"""
from __future__ import annotations

import json
import os
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import SimpleITK as sitk
from scipy import ndimage
from tqdm import tqdm

from entrust_nnunet.data.io import InputError, atomic_directory

LABELS = {"background": 0, "core": 1, "ring": 2}
CONFLICT_LABEL = LABELS["core"]

#: (name, tissue, ring, core, noise sigma, air) per modality character; see the module docstring
MODALITY_TABLE = (
    ("T1", 100.0, 170.0, 240.0, 8.0, 5.0),
    ("T2", 600.0, 420.0, 250.0, 35.0, 20.0),
    ("FLAIR", 0.30, 0.42, 0.52, 0.06, 0.02),
)
FILE_ENDING = ".nii.gz"


@dataclass
class PhantomCase:
    images: list[np.ndarray]  # one float32 array per modality, numpy (z,)y,x order
    label: np.ndarray  # uint8
    conflict: np.ndarray  # uint8, 1 where the modalities disagree
    annotators: list[np.ndarray]  # uint8 label variants
    spacing: tuple[float, ...]  # SimpleITK (x, y[, z]) order
    origin: tuple[float, ...]
    direction: tuple[float, ...]


def modality_names(num_modalities: int) -> list[str]:
    names = []
    for m in range(num_modalities):
        base = MODALITY_TABLE[m % len(MODALITY_TABLE)][0]
        names.append(base if m < len(MODALITY_TABLE) else f"{base}_{m // len(MODALITY_TABLE) + 1}")
    return names


def modality_contrast(m: int) -> tuple[float, float, float, float, float]:
    """(tissue, ring, core, noise, air) of modality ``m``; repeats of a character get another scale."""
    _, tissue, ring, core, noise, air = MODALITY_TABLE[m % len(MODALITY_TABLE)]
    scale = 1.0 + 0.5 * (m // len(MODALITY_TABLE))
    return tissue * scale, ring * scale, core * scale, noise * scale, air * scale


def geometry(dim: int) -> tuple[tuple[float, ...], tuple[float, ...], tuple[float, ...]]:
    """Anisotropic spacing, non-zero origin and a rotated direction (SimpleITK order)."""
    angle = np.deg2rad(20.0)
    c, s = np.cos(angle), np.sin(angle)
    if dim == 2:
        return (0.8, 1.25), (-31.5, 12.25), (c, -s, s, c)
    return (0.9, 0.9, 2.5), (-40.0, 15.5, 7.25), (c, -s, 0.0, s, c, 0.0, 0.0, 0.0, 1.0)


def _ellipsoid(grid: list[np.ndarray], center: np.ndarray, radii: np.ndarray) -> np.ndarray:
    """Normalised radius r (r<1 inside) of an axis-aligned ellipsoid on a physical-unit grid."""
    return np.sqrt(sum(((g - c) / r) ** 2 for g, c, r in zip(grid, center, radii)))


def _place_blobs(rng, grid, centre, extent, np_spacing, body, label, num_modalities: int) -> list:
    """Satellite blobs shown by some modalities and hidden by the others, away from the lesion and each
    other: a list of (mask, shown-by boolean vector, is_lesion), the truth decided by a coin."""
    dim = len(extent)
    blobs = []
    for _ in range(rng.integers(1, 3)):
        for _try in range(50):
            # at least ~1.6 voxels in every axis, so that thick slices do not blur a blob away
            radii = np.maximum(extent * rng.uniform(0.06, 0.09, dim), 1.6 * np_spacing)
            c = centre + rng.uniform(-0.3, 0.3, dim) * extent
            mask = _ellipsoid(grid, c, radii) < 1
            grown = ndimage.binary_dilation(mask, iterations=2)
            if mask.sum() >= 4 and not (grown & (label > 0)).any() and (mask <= body).all() \
                    and not any((grown & b[0]).any() for b in blobs):
                shown = np.zeros(num_modalities, bool)
                k = rng.integers(1, num_modalities)  # proper, non-empty subset
                shown[rng.choice(num_modalities, size=k, replace=False)] = True
                blobs.append((mask, shown, bool(rng.random() < 0.5)))
                break
    return blobs


def _render_modalities(rng, grid, extent, np_spacing, body, label, blobs, num_modalities: int) -> list[np.ndarray]:
    """One image per modality: tissue contrasts, blobs where that modality shows them, blur, bias, noise."""
    shape = label.shape
    bias_coef = rng.uniform(-0.15, 0.15, len(extent))
    bias = 1.0 + sum(b * (g / e - 0.5) for b, g, e in zip(bias_coef, grid, extent))
    blur = 0.9  # voxels: partial-volume edges everywhere, so boundary doubt exists apart from conflict
    truth = label.copy()
    for mask, _, _ in blobs:
        truth[mask] = 0  # the image never depends on the coin
    images = []
    for m in range(num_modalities):
        tissue, ring, core, noise, air = modality_contrast(m)
        gain = rng.uniform(0.9, 1.1)  # per-case scanner gain: normalisation matters
        img = np.full(shape, air, np.float32)
        img[body] = tissue
        img[truth == LABELS["ring"]] = ring
        img[truth == LABELS["core"]] = core
        for mask, shown, _ in blobs:
            if shown[m]:
                img[mask] = core
        img = ndimage.gaussian_filter(img, blur * np_spacing.min() / np_spacing) * bias * gain  # same blur in mm
        img = img + rng.normal(0.0, noise, shape)
        images.append(img.astype(np.float32))
    return images


def _annotator_variants(rng, label, conflict, blobs, num_annotators: int) -> list[np.ndarray]:
    """Plausible labels: the boundary moved by at most one voxel, each conflict blob re-flipped."""
    annotators = []
    for _ in range(num_annotators):
        variant = np.where(conflict > 0, 0, label).astype(np.uint8)
        lesion = variant > 0
        op = rng.integers(0, 3)
        if op == 1:
            variant[ndimage.binary_dilation(lesion) & ~lesion & (conflict == 0)] = LABELS["ring"]
        elif op == 2:
            variant[lesion & ~ndimage.binary_erosion(lesion) & (variant == LABELS["ring"])] = 0
        for mask, _, _ in blobs:
            if rng.random() < 0.5:
                variant[mask] = CONFLICT_LABEL
        annotators.append(variant)
    return annotators


def make_case(rng: np.random.Generator, size: int, num_modalities: int, dim: int,
              num_annotators: int = 0, allow_conflict: bool = True) -> PhantomCase:
    spacing, origin, direction = geometry(dim)
    # numpy axis order is reversed w.r.t. SimpleITK; in 3D the slice axis (largest spacing) gets fewer voxels
    np_spacing = np.array(spacing[::-1])
    shape = tuple(max(8, int(round(size * np_spacing.min() / sp))) if dim == 3 else size for sp in np_spacing)
    grid = np.meshgrid(*[np.arange(n) * sp for n, sp in zip(shape, np_spacing)], indexing="ij")
    extent = np.array(shape) * np_spacing
    centre = extent / 2

    body = _ellipsoid(grid, centre, extent * 0.45) < 1
    lesion_c = centre + rng.uniform(-0.12, 0.12, dim) * extent
    ring_radii = extent * rng.uniform(0.14, 0.2, dim)
    core_radii = ring_radii * rng.uniform(0.45, 0.65)
    label = np.zeros(shape, np.uint8)
    label[_ellipsoid(grid, lesion_c, ring_radii) < 1] = LABELS["ring"]
    label[_ellipsoid(grid, lesion_c, core_radii) < 1] = LABELS["core"]

    blobs = (_place_blobs(rng, grid, centre, extent, np_spacing, body, label, num_modalities)
             if allow_conflict and num_modalities > 1 else [])
    conflict = np.zeros(shape, np.uint8)
    for mask, _, is_lesion in blobs:
        conflict[mask] = 1
        if is_lesion:
            label[mask] = CONFLICT_LABEL
    images = _render_modalities(rng, grid, extent, np_spacing, body, label, blobs, num_modalities)
    annotators = _annotator_variants(rng, label, conflict, blobs, num_annotators)
    return PhantomCase(images, label, conflict, annotators, spacing, origin, direction)


def _to_sitk(array: np.ndarray, case: PhantomCase) -> sitk.Image:
    image = sitk.GetImageFromArray(array)
    image.SetSpacing(case.spacing)
    image.SetOrigin(case.origin)
    image.SetDirection(case.direction)
    return image


def _checked_sizes(num_cases: int, num_modalities: int, dim: int, num_annotators: int, num_test: int | None,
                   size: int | None) -> tuple[int, int]:
    """One clear line per bad argument; returns the edge length and number of test cases with defaults filled."""
    if num_cases < 1:
        raise InputError(f"-n {num_cases}: need at least one training case")
    if num_modalities < 1:
        raise InputError(f"--modalities {num_modalities}: need at least one modality")
    if dim not in (2, 3):
        raise InputError(f"--dim {dim}: must be 2 or 3")
    if num_annotators < 0:
        raise InputError(f"--annotators {num_annotators}: must be >= 0")
    size = size or (64 if dim == 2 else 32)
    if size < 16:
        raise InputError(f"--size {size}: must be at least 16 voxels")
    num_test = max(2, num_cases // 4) if num_test is None else num_test
    if num_test < 0:
        raise InputError(f"--num-test {num_test}: must be >= 0")
    return size, num_test


def check_replaceable(out: Path) -> None:
    """``--overwrite`` replaces a file, an empty folder or a phantom dataset (its dataset.json says so); any other
    folder (``$nnUNet_raw`` itself, a real dataset, a typo) is refused with one line instead of deleted."""
    if not out.is_dir() or not any(out.iterdir()):
        return
    try:
        kind = json.loads((out / "dataset.json").read_text()).get("entrust", {}).get("kind")
    except (OSError, ValueError, AttributeError):
        kind = None
    if kind != "phantoms":
        raise InputError(f"{out}: not a phantom dataset of entrust phantoms (no such dataset.json); --overwrite "
                         f"replaces only those, choose another folder")


def _write_case(folder: Path, suffix: str, name: str, case: PhantomCase) -> None:
    """One case's images, label, conflict mask and annotator labels into the split ``suffix`` (Tr / Ts)."""
    for m, img in enumerate(case.images):
        sitk.WriteImage(_to_sitk(img, case), str(folder / f"images{suffix}" / f"{name}_{m:04d}{FILE_ENDING}"))
    sitk.WriteImage(_to_sitk(case.label, case), str(folder / f"labels{suffix}" / f"{name}{FILE_ENDING}"))
    sitk.WriteImage(_to_sitk(case.conflict, case), str(folder / f"conflict{suffix}" / f"{name}{FILE_ENDING}"))
    for k, variant in enumerate(case.annotators):
        sitk.WriteImage(_to_sitk(variant, case), str(folder / f"labels{suffix}_annotators" / f"{name}_a{k}{FILE_ENDING}"))


def write_phantom_dataset(out: str | os.PathLike, num_cases: int = 20, num_modalities: int = 3, dim: int = 2,
                          seed: int = 0, num_annotators: int = 0, num_test: int | None = None,
                          size: int | None = None, overwrite: bool = False, progress: bool = True,
                          test_seed: int | None = None, conflict_in: str = "all", num_test_annotators: int = 0) -> Path:
    """Write an nnU-Net v2 raw dataset of phantoms to ``out`` (built in a temporary folder, then renamed).

    Case ``i`` of the training set depends only on ``(seed, i)`` and ``conflict_in``; test case ``j`` on
    ``(test_seed, 100000 + j)`` (``test_seed`` defaults to ``seed``), so a benchmark can draw fresh test cases beside
    the same training cases. ``conflict_in="test"``: the training cases hold no conflict blob, the test cases do (a
    conflict no training case showed: what the model meets must then come from the modalities, not from memory);
    their labels outside the blobs are those of ``conflict_in="all"``, their intensities, bias and noise are drawn
    anew (the blobs' draws are skipped).
    ``num_test_annotators``: label variants of the TEST cases in ``labelsTs_annotators`` (for GED^2 / HM-IoU;
    drawn after each case's images and label, so the cases themselves are the same with or without them).
    """
    if conflict_in not in ("all", "test"):
        raise ValueError(f"conflict_in must be 'all' or 'test', got {conflict_in!r}")
    size, num_test = _checked_sizes(num_cases, num_modalities, dim, num_annotators, num_test, size)
    if num_test_annotators < 0:
        raise InputError(f"--test-annotators {num_test_annotators}: must be >= 0")
    test_seed = seed if test_seed is None else test_seed
    out = Path(out)
    names = modality_names(num_modalities)
    if overwrite:
        check_replaceable(out)

    with atomic_directory(out, overwrite=overwrite) as tmp:
        splits = [("Tr", [f"case_{i:03d}" for i in range(num_cases)], 0, seed),
                  ("Ts", [f"test_{j:03d}" for j in range(num_test)], 100000, test_seed)]
        for sub in ("imagesTr", "labelsTr", "conflictTr", "imagesTs", "labelsTs", "conflictTs"):
            (tmp / sub).mkdir()
        annotators = {"Tr": num_annotators, "Ts": num_test_annotators}
        for suffix, count in annotators.items():
            if count:
                (tmp / f"labels{suffix}_annotators").mkdir()
        jobs = [(suffix, idx, name, offset, s) for suffix, cases, offset, s in splits for idx, name in enumerate(cases)]
        for suffix, idx, name, offset, case_seed in tqdm(jobs, desc=f"phantoms {out.name}", disable=not progress,
                                                         unit="case"):
            rng = np.random.default_rng([case_seed, offset + idx])
            case = make_case(rng, size, num_modalities, dim,
                             num_annotators=annotators[suffix],
                             allow_conflict=(idx % 4 != 3) and (suffix == "Ts" or conflict_in == "all"))
            _write_case(tmp, suffix, name, case)

        dataset_json = {
            "channel_names": {str(m): n for m, n in enumerate(names)},
            "labels": LABELS,
            "numTraining": num_cases,
            "file_ending": FILE_ENDING,
            "name": out.name,
            "description": f"EnTrust phantoms, {dim}D, {num_modalities} modalities, seed {seed}; conflict masks in "
                           f"conflictTr/conflictTs, truth inside conflict is a coin flip",
            "entrust": {"kind": "phantoms", "dim": dim, "seed": seed, "test_seed": test_seed, "num_annotators": num_annotators,
                        "conflict_label": CONFLICT_LABEL, "conflict_in": conflict_in},
        }
        with open(tmp / "dataset.json", "w") as f:
            json.dump(dataset_json, f, indent=2)
    return out
