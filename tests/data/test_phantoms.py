"""Phantoms: geometry, labels, conflict ground truth, real ambiguity, determinism, nnU-Net integrity."""
import json
from pathlib import Path

import numpy as np
import pytest
import SimpleITK as sitk
from scipy import ndimage

from entrust_nnunet.cli import main
from entrust_nnunet.data.io import InputError
from entrust_nnunet.data.phantoms import LABELS, geometry, modality_contrast, write_phantom_dataset


def _arr(path):
    return sitk.GetArrayFromImage(sitk.ReadImage(str(path)))


@pytest.mark.parametrize("dim", [2, 3])
def test_geometry_labels_and_conflict(tmp_path, dim):
    out = write_phantom_dataset(tmp_path / "Dataset900_P", num_cases=8, num_modalities=3, dim=dim, seed=1,
                                num_annotators=2, size=32, progress=False)
    spacing, origin, direction = geometry(dim)
    dj = json.loads((out / "dataset.json").read_text())
    assert dj["labels"] == LABELS and dj["numTraining"] == 8 and len(dj["channel_names"]) == 3
    conflict_voxels = []
    for i in range(8):
        case = f"case_{i:03d}"
        files = [out / "imagesTr" / f"{case}_{m:04d}.nii.gz" for m in range(3)]
        files += [out / "labelsTr" / f"{case}.nii.gz", out / "conflictTr" / f"{case}.nii.gz"]
        files += [out / "labelsTr_annotators" / f"{case}_a{k}.nii.gz" for k in range(2)]
        for f in files:
            img = sitk.ReadImage(str(f))
            assert img.GetDimension() == dim
            np.testing.assert_allclose(img.GetSpacing(), spacing, rtol=1e-6)
            np.testing.assert_allclose(img.GetOrigin(), origin, atol=1e-5)
            np.testing.assert_allclose(img.GetDirection(), direction, atol=1e-6)
        label, conflict = _arr(files[3]), _arr(files[4])
        assert set(np.unique(label)) <= {0, 1, 2} and {1, 2} <= set(np.unique(label))
        assert conflict.dtype == np.uint8 and set(np.unique(conflict)) <= {0, 1}
        conflict_voxels.append(int(conflict.sum()))
        # the images of the modalities differ inside conflict: one shows the blob, another hides it
        if conflict.any():
            from scipy import ndimage

            imgs = [_arr(f) for f in files[:3]]
            contrast = [abs(modality_contrast(m)[2] - modality_contrast(m)[0]) for m in range(3)]
            blobs, n = ndimage.label(conflict > 0)
            for b in range(1, n + 1):
                blob = blobs == b
                # tissue right around the blob (blobs sit inside the body, away from the lesion)
                around = ndimage.binary_dilation(blob, iterations=2) & ~blob & (conflict == 0) & (label == 0)
                # blob-vs-surroundings difference in units of the modality's core-vs-tissue contrast
                z = [abs(im[blob].mean() - np.median(im[around])) / c for im, c in zip(imgs, contrast)]
                assert max(z) > 0.4 and min(z) < 0.4 * max(z), z  # one shows it, another hides it
    assert sum(v == 0 for v in conflict_voxels) >= 2  # every fourth case has no conflict
    assert sum(v > 0 for v in conflict_voxels) >= 4


def test_truth_inside_conflict_is_a_coin_flip(tmp_path):
    out = write_phantom_dataset(tmp_path / "Dataset901_P", num_cases=60, dim=2, size=32, seed=3, num_test=0,
                                progress=False)
    fg_fraction = []
    for i in range(60):
        conflict = _arr(out / "conflictTr" / f"case_{i:03d}.nii.gz") > 0
        if conflict.any():
            fg_fraction.append((_arr(out / "labelsTr" / f"case_{i:03d}.nii.gz")[conflict] > 0).mean())
    assert len(fg_fraction) >= 40
    assert 0.35 < np.mean(fg_fraction) < 0.65
    # not constant: both outcomes happen
    assert min(fg_fraction) < 0.2 and max(fg_fraction) > 0.8


def test_annotators_vary_inside_conflict(tmp_path):
    out = write_phantom_dataset(tmp_path / "Dataset902_P", num_cases=8, dim=2, size=32, seed=5, num_annotators=4,
                                progress=False)
    differs = 0
    for i in range(8):
        conflict = _arr(out / "conflictTr" / f"case_{i:03d}.nii.gz") > 0
        if conflict.any():
            votes = np.stack([_arr(out / "labelsTr_annotators" / f"case_{i:03d}_a{k}.nii.gz")[conflict] > 0
                              for k in range(4)])
            differs += int(votes.any(0).any() and not votes.all(0).all())
    assert differs >= 1


def test_test_annotators_leave_the_cases_unchanged_and_flip_conflict_blobs(tmp_path):
    """labelsTs_annotators only for the test cases; the cases' images and labels are those written without them."""
    plain = write_phantom_dataset(tmp_path / "a", num_cases=2, num_test=4, dim=2, size=32, seed=3, progress=False)
    scored = write_phantom_dataset(tmp_path / "b", num_cases=2, num_test=4, dim=2, size=32, seed=3, progress=False,
                                   num_test_annotators=3)
    assert not (scored / "labelsTr_annotators").exists()
    assert sorted(p.name for p in (scored / "labelsTs_annotators").iterdir()) == \
        [f"test_{j:03d}_a{k}.nii.gz" for j in range(4) for k in range(3)]
    flips = blob_count = 0
    for j in range(4):
        for folder, suffix in (("imagesTs", "_0001"), ("labelsTs", "")):
            np.testing.assert_array_equal(_arr(plain / folder / f"test_{j:03d}{suffix}.nii.gz"),
                                          _arr(scored / folder / f"test_{j:03d}{suffix}.nii.gz"))
        conflict = _arr(scored / "conflictTs" / f"test_{j:03d}.nii.gz") > 0
        label = _arr(scored / "labelsTs" / f"test_{j:03d}.nii.gz")
        blobs, n = ndimage.label(conflict)
        for k in range(3):
            variant = _arr(scored / "labelsTs_annotators" / f"test_{j:03d}_a{k}.nii.gz")
            # away from conflict an annotator moves the boundary by at most one voxel; nothing else changes
            far = ~ndimage.binary_dilation(label > 0, iterations=2) & ~conflict
            assert (variant[far] == label[far]).all()
            for b in range(1, n + 1):  # each blob re-flipped whole: all lesion or all background
                assert len(np.unique(variant[blobs == b] > 0)) == 1
            flips += sum(bool((variant[blobs == b] > 0).any() != (label[blobs == b] > 0).any())
                         for b in range(1, n + 1))
            blob_count += n
    assert blob_count >= 3 and 0 < flips < blob_count  # annotators disagree with the reference on some blobs
    with pytest.raises(InputError, match="--test-annotators"):
        write_phantom_dataset(tmp_path / "c", num_cases=2, dim=2, size=32, progress=False, num_test_annotators=-1)


def test_deterministic_for_a_seed(tmp_path):
    a = write_phantom_dataset(tmp_path / "a", num_cases=3, dim=2, size=32, seed=7, progress=False)
    b = write_phantom_dataset(tmp_path / "b", num_cases=3, dim=2, size=32, seed=7, progress=False)
    c = write_phantom_dataset(tmp_path / "c", num_cases=3, dim=2, size=32, seed=8, progress=False)
    fa, fb, fc = (_arr(d / "imagesTr" / "case_001_0002.nii.gz") for d in (a, b, c))
    np.testing.assert_array_equal(fa, fb)
    assert not np.array_equal(fa, fc)
    np.testing.assert_array_equal(_arr(a / "conflictTs" / "test_000.nii.gz"), _arr(b / "conflictTs" / "test_000.nii.gz"))


def test_test_seed_draws_fresh_test_cases_beside_the_same_training_cases(tmp_path):
    a = write_phantom_dataset(tmp_path / "a", num_cases=2, num_test=2, dim=2, size=32, seed=7, progress=False)
    d = write_phantom_dataset(tmp_path / "d", num_cases=2, num_test=2, dim=2, size=32, seed=7, test_seed=2026,
                              progress=False)
    np.testing.assert_array_equal(_arr(a / "imagesTr" / "case_001_0000.nii.gz"), _arr(d / "imagesTr" / "case_001_0000.nii.gz"))
    assert not np.array_equal(_arr(a / "imagesTs" / "test_000_0000.nii.gz"), _arr(d / "imagesTs" / "test_000_0000.nii.gz"))
    assert json.loads((d / "dataset.json").read_text())["entrust"]["test_seed"] == 2026


def test_conflict_only_in_test_cases(tmp_path):
    """--conflict-in test: no training case holds a conflict blob (nor a coin-flip label), the test cases do as usual."""
    out = tmp_path / "Dataset904_Unseen"
    assert main(["phantoms", str(out), "-n", "6", "--num-test", "6", "--size", "32", "--conflict-in", "test"]) == 0
    assert all(_arr(p).sum() == 0 for p in (out / "conflictTr").glob("*.nii.gz"))
    assert sum(_arr(p).sum() > 0 for p in (out / "conflictTs").glob("*.nii.gz")) >= 3
    assert json.loads((out / "dataset.json").read_text())["entrust"]["conflict_in"] == "test"
    usual = write_phantom_dataset(tmp_path / "usual", num_cases=6, num_test=6, size=32, progress=False)
    assert sum(_arr(p).sum() > 0 for p in (usual / "conflictTr").glob("*.nii.gz")) >= 3


def test_cli_refuses_existing_output_and_leaves_no_partial(tmp_path, capsys):
    out = tmp_path / "Dataset903_P"
    assert main(["phantoms", str(out), "-n", "2", "--size", "16"]) == 0
    before = sorted(p.name for p in out.rglob("*"))
    capsys.readouterr()
    assert main(["phantoms", str(out), "-n", "3", "--size", "16"]) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and str(out) in err[0] and "already exists" in err[0]
    assert sorted(p.name for p in out.rglob("*")) == before
    assert main(["phantoms", str(tmp_path / "x"), "-n", "0"]) == 2
    assert not (tmp_path / "x").exists() and not list(tmp_path.glob(".tmp-*"))


@pytest.mark.parametrize("dim", [2, 3])
def test_nnunet_verify_dataset_integrity(tmp_path, dim):
    from nnunetv2.experiment_planning.verify_dataset_integrity import verify_dataset_integrity

    out = write_phantom_dataset(tmp_path / "Dataset904_P", num_cases=4, dim=dim, size=24 if dim == 3 else 32,
                                progress=False)
    verify_dataset_integrity(str(out), num_processes=1)  # raises on any problem


def test_stock_plan_and_preprocess_verifies_phantoms(planned_phantoms):
    """The stock nnU-Net command with --verify_dataset_integrity accepts our phantoms (2D): the session's
    dataset is planned and preprocessed by it (tests/conftest.py)."""
    env, name = planned_phantoms
    pre = Path(env["nnUNet_preprocessed"]) / name
    assert (pre / "nnUNetPlans.json").exists() and (pre / "nnUNetPlans_2d").is_dir()
    assert "verify_dataset_integrity Done" in (pre.parent.parent / "stock_plan_output.txt").read_text()


def test_overwrite_replaces_only_a_phantom_dataset(tmp_path):
    """--overwrite on a folder that is not a phantom dataset (nnUNet_raw itself, a real dataset) is refused with
    one line and deletes nothing; an earlier phantom dataset and an empty folder are replaced."""
    raw = tmp_path / "nnUNet_raw"
    (raw / "Dataset001_Real").mkdir(parents=True)
    (raw / "Dataset001_Real" / "dataset.json").write_text('{"labels": {"background": 0}}')
    for target in (raw, raw / "Dataset001_Real"):
        with pytest.raises(InputError, match="not a phantom dataset") as e:
            write_phantom_dataset(target, num_cases=2, size=16, progress=False, overwrite=True)
        assert len(str(e.value).splitlines()) == 1
    assert (raw / "Dataset001_Real" / "dataset.json").is_file()
    out = raw / "Dataset902_P"
    write_phantom_dataset(out, num_cases=2, size=16, progress=False)
    write_phantom_dataset(out, num_cases=3, size=16, progress=False, overwrite=True)
    assert len(list((out / "labelsTr").iterdir())) == 3
    (tmp_path / "empty").mkdir()
    write_phantom_dataset(tmp_path / "empty", num_cases=2, size=16, progress=False, overwrite=True)
