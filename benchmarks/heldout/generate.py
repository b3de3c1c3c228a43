#!/usr/bin/env python
"""Held-out synthetic multimodal 2D "brain lesion" generator, nnU-Net v2 raw format.

Each case: irregular head/brain region with smooth tissue texture and unlabelled
ventricle-like structures; (usually) one lobulated lesion (label 1) with an
irregular 2-3 px rim (label 2); optionally one "conflict blob" that is visible in
some modalities, invisible in others, and labelled lesion or background by a
fair coin flip. Only numpy, scipy.ndimage and SimpleITK are used.

Written from a description of the task alone, by someone who had not read the project's own phantom generator
(``entrust_nnunet/data/phantoms.py``): the check that a result is not an artefact of our generator. Do not
tune to it either; docs/design.md ("Experts with the whole encoder") says what it showed.
"""
import argparse
import json
import os

import numpy as np
import SimpleITK as sitk
from scipy import ndimage as ndi

SPACING = (0.9, 0.9, 3.0)  # (x, y, z) as SimpleITK expects
MODS = ("T1", "T2", "FLAIR")
# Per-modality intensities (arbitrary scanner scale) and Rician noise sigma.
CONTRAST = {
    "T1":    dict(tissue=600., vent=180., lesion=330., rim=740., noise=18.),
    "T2":    dict(tissue=1100., vent=2700., lesion=2300., rim=1900., noise=75.),
    "FLAIR": dict(tissue=200., vent=310., lesion=290., rim=440., noise=9.),
}


def smooth_noise(rng, shape, sigma):
    """Low-pass filtered Gaussian noise, normalised to zero mean / unit std."""
    f = ndi.gaussian_filter(rng.standard_normal(shape), sigma, mode="wrap")
    return (f - f.mean()) / (f.std() + 1e-8)


def brain_mask(rng, n):
    yy, xx = np.mgrid[0:n, 0:n].astype(float)
    cy, cx = n / 2 + rng.uniform(-2, 2, 2)
    ry, rx = n * rng.uniform(0.36, 0.42), n * rng.uniform(0.30, 0.37)
    rot = rng.uniform(-0.3, 0.3)
    dy, dx = yy - cy, xx - cx
    u = (dx * np.cos(rot) + dy * np.sin(rot)) / rx
    v = (-dx * np.sin(rot) + dy * np.cos(rot)) / ry
    theta = np.arctan2(v, u)
    radius = np.ones_like(theta)  # low-frequency angular jitter of the outline
    for k in (2, 3, 4, 5):
        radius += rng.uniform(0, 0.06 / k ** 0.5) * np.cos(k * theta + rng.uniform(0, 2 * np.pi))
    return np.hypot(u, v) <= radius


def ventricles(rng, n, brain):
    """A few elongated dark/bright structures near the centre (not labelled)."""
    yy, xx = np.mgrid[0:n, 0:n].astype(float)
    inner = ndi.binary_erosion(brain, iterations=int(n * 0.18))
    cys, cxs = np.nonzero(inner)
    out = np.zeros_like(brain)
    for _ in range(rng.integers(1, 4)):
        i = rng.integers(len(cys))
        a, b, ang = rng.uniform(4, 9), rng.uniform(1.2, 2.8), rng.uniform(0, np.pi)
        dy, dx = yy - cys[i], xx - cxs[i]
        u = dx * np.cos(ang) + dy * np.sin(ang)
        v = -dx * np.sin(ang) + dy * np.cos(ang) + 0.04 * u ** 2  # slight bend
        out |= (u / a) ** 2 + (v / b) ** 2 <= 1
    return out & inner


def lesion_blob(rng, n, allowed):
    """Thresholded smoothed-noise blob (lobulated), area ~60-400 px at n=72."""
    scale = (n / 72.0) ** 2
    yy, xx = np.mgrid[0:n, 0:n].astype(float)
    cys, cxs = np.nonzero(ndi.binary_erosion(allowed, iterations=max(2, n // 9)))
    for _ in range(100):
        area = int(rng.uniform(60, 400) * scale)
        i = rng.integers(len(cys))
        r0 = np.sqrt(area / np.pi)
        score = -np.hypot(yy - cys[i], xx - cxs[i]) / r0 + 0.9 * smooth_noise(rng, (n, n), rng.uniform(1.5, 2.5))
        score[~allowed] = -np.inf
        thr = np.sort(score.ravel())[-area]
        m, k = ndi.label(score >= thr)
        if k == 0:
            continue
        sizes = ndi.sum(np.ones_like(m), m, range(1, k + 1))
        m = ndi.binary_fill_holes(m == 1 + int(np.argmax(sizes)))
        if 60 * scale <= m.sum() <= 400 * scale:
            return m
    return np.zeros((n, n), bool)


def rim_band(rng, n, lesion, brain):
    """2-3 px dilation ring with irregular width."""
    d2 = ndi.binary_dilation(lesion, iterations=2)
    d3 = ndi.binary_dilation(lesion, iterations=3)
    ring = d2 | (d3 & (smooth_noise(rng, (n, n), 1.5) > 0))
    return ring & ~lesion & brain


def conflict_blob(rng, n, brain, forbidden, lesion):
    yy, xx = np.mgrid[0:n, 0:n].astype(float)
    near = lesion.any() and rng.random() < 0.5
    dist_les = ndi.distance_transform_edt(~lesion) if lesion.any() else None
    for _ in range(300):
        r = rng.uniform(3, 6)
        inside = ndi.binary_erosion(brain, iterations=int(np.ceil(r)) + 2) & ~forbidden
        if near:
            inside &= dist_les < r + 9
        cys, cxs = np.nonzero(inside)
        if len(cys) == 0:
            near = False
            continue
        i = rng.integers(len(cys))
        d = np.hypot(yy - cys[i], xx - cxs[i])
        blob = d <= r * (1 + 0.12 * smooth_noise(rng, (n, n), 2.0))
        blob = ndi.binary_fill_holes(blob & (d <= 1.5 * r))
        if not (blob & forbidden).any() and (blob <= brain).all():
            return blob
    return None


def make_case(rng, n, p_conflict):
    brain = brain_mask(rng, n)
    vent = ventricles(rng, n, brain)
    lesion = lesion_blob(rng, n, brain & ~ndi.binary_dilation(vent, iterations=2)) \
        if rng.random() < 0.9 else np.zeros((n, n), bool)
    rim = rim_band(rng, n, lesion, brain) if lesion.any() else np.zeros_like(lesion)
    label = lesion.astype(np.uint8) + 2 * rim.astype(np.uint8)

    blob, shows, blob_is_lesion = None, set(), False
    if rng.random() < p_conflict:
        forbidden = ndi.binary_dilation(lesion | rim | vent, iterations=2)
        blob = conflict_blob(rng, n, brain, forbidden, lesion)
    if blob is not None:
        perm = rng.permutation(3)
        shows = {int(perm[0])} | ({int(perm[2])} if rng.random() < 0.5 else set())
        blob_is_lesion = bool(rng.random() < 0.5)
        if blob_is_lesion:
            label[blob] = 1

    sig_pv = rng.uniform(0.7, 1.0)
    soft = lambda m: ndi.gaussian_filter(m.astype(float), sig_pv)
    s_brain, s_vent, s_les, s_rim = soft(brain), soft(vent), soft(lesion), soft(rim)
    s_blob = soft(blob) if blob is not None else None
    texture = smooth_noise(rng, (n, n), rng.uniform(2.0, 4.0))
    fine = smooth_noise(rng, (n, n), 0.8)
    les_tex = smooth_noise(rng, (n, n), 1.2)

    images = []
    for mi, mod in enumerate(MODS):
        c = {k: v * rng.uniform(0.92, 1.08) for k, v in CONTRAST[mod].items()}
        img = c["tissue"] * (1 + 0.07 * texture + 0.03 * fine)
        img = img * (1 - s_vent) + c["vent"] * s_vent
        img = img * (1 - s_rim) + c["rim"] * s_rim
        les_val = c["lesion"] * (1 + 0.06 * les_tex)
        img = img * (1 - s_les) + les_val * s_les
        if s_blob is not None and mi in shows:
            img = img * (1 - s_blob) + les_val * rng.uniform(0.9, 1.1) * s_blob
        img = img * s_brain + 0.02 * c["tissue"] * (1 - s_brain)
        bias = np.exp(rng.uniform(0.08, 0.2) * smooth_noise(rng, (n, n), n / 3.0))
        img = img * bias
        n1, n2 = rng.standard_normal((2, n, n)) * c["noise"]
        images.append(np.sqrt((img + n1) ** 2 + n2 ** 2).astype(np.float32))  # Rician
    return images, label, (blob if blob is not None else np.zeros((n, n), bool)), \
        blob is not None, blob_is_lesion


def to_itk(arr2d, dtype):
    img = sitk.GetImageFromArray(np.asarray(arr2d, dtype=dtype)[None])  # (z=1, y, x)
    img.SetSpacing(SPACING)
    img.SetOrigin((0.0, 0.0, 0.0))
    return img


def main():
    ap = argparse.ArgumentParser(description=__doc__)
    ap.add_argument("out_dir")
    ap.add_argument("--seed", type=int, required=True)
    ap.add_argument("--n-train", type=int, default=40)
    ap.add_argument("--n-test", type=int, default=20)
    ap.add_argument("--size", type=int, default=72)
    ap.add_argument("--conflict-in-train", type=float, default=0.5)
    ap.add_argument("--conflict-in-test", type=float, default=0.6)
    a = ap.parse_args()

    dirs = {k: os.path.join(a.out_dir, k) for k in
            ("imagesTr", "labelsTr", "imagesTs", "labelsTs", "conflictTs")}
    for d in dirs.values():
        os.makedirs(d, exist_ok=True)
    stats = {"train": [0, 0], "test": [0, 0]}
    splits = [("train", 0, a.n_train, "heldout_%03d", a.conflict_in_train, "Tr"),
              ("test", 1, a.n_test, "heldout_t%03d", a.conflict_in_test, "Ts")]
    for split, sid, count, fmt, p, sfx in splits:
        for i in range(count):
            # independent stream per (seed, split, case): train/test never share cases
            rng = np.random.default_rng([a.seed, sid, i])
            images, label, blob, has_blob, blob_les = make_case(rng, a.size, p)
            name = fmt % i
            for mi, im in enumerate(images):
                sitk.WriteImage(to_itk(im, np.float32),
                                os.path.join(dirs["images" + sfx], f"{name}_{mi:04d}.nii.gz"))
            sitk.WriteImage(to_itk(label, np.uint8), os.path.join(dirs["labels" + sfx], f"{name}.nii.gz"))
            if sfx == "Ts":
                sitk.WriteImage(to_itk(blob, np.uint8), os.path.join(dirs["conflictTs"], f"{name}.nii.gz"))
            stats[split][0] += has_blob
            stats[split][1] += blob_les

    with open(os.path.join(a.out_dir, "dataset.json"), "w") as f:
        json.dump({"channel_names": {str(i): m for i, m in enumerate(MODS)},
                   "labels": {"background": 0, "lesion": 1, "rim": 2},
                   "numTraining": a.n_train, "file_ending": ".nii.gz"}, f, indent=2)
    (ct, lt), (cs, ls) = stats["train"], stats["test"]
    print(f"wrote {a.n_train} train + {a.n_test} test cases to {a.out_dir}; "
          f"conflict blobs: train {ct} (labelled lesion {lt}), test {cs} (labelled lesion {ls})")


if __name__ == "__main__":
    main()
