"""Multi-annotator training: annotator labels preprocessed like labelsTr, drawn per training sample."""
import json
import os
import shutil
from pathlib import Path

import blosc2
import numpy as np
import pytest
import torch

from conftest import use_nnunet_roots
from entrust_nnunet.nnunet.annotators import PREPROCESSED_FOLDER, AnnotatorDataset, training_dataset
from entrust_nnunet.nnunet.env import ensure_ext_trainer, set_nnunet_roots

DATASET_ID = 952
NAME = f"Dataset{DATASET_ID}_Annotators"
NUM_ANNOTATORS = 3
#: case_000's annotator 0 is a copy of its labelsTr (its preprocessed seg must equal nnU-Net's exactly);
#: case_005 has no annotator files (it must keep nnU-Net's seg)
COPY_CASE, BARE_CASE = "case_000", "case_005"
ENV_KEYS = ("nnUNet_raw", "nnUNet_preprocessed", "nnUNet_results")


@pytest.fixture(scope="module")
def annotator_phantoms(tmp_path_factory):
    """(env, data folder): 6 2D phantoms (32x32) with 3 annotators each, planned by the plan step of `entrust plan`."""
    from entrust_nnunet.data.phantoms import write_phantom_dataset
    from entrust_nnunet.pipeline import plan_and_preprocess

    root = tmp_path_factory.mktemp("annotators")
    env = set_nnunet_roots(root, dict(os.environ))
    env.update(nnUNet_def_n_proc="1", nnUNet_n_proc_DA="0", nnUNet_compile="false")
    ensure_ext_trainer(env)
    raw = Path(env["nnUNet_raw"]) / NAME
    write_phantom_dataset(raw, num_cases=6, num_test=0, dim=2, size=32, seed=5, num_annotators=NUM_ANNOTATORS,
                          progress=False)
    shutil.copy(raw / "labelsTr" / f"{COPY_CASE}.nii.gz", raw / "labelsTr_annotators" / f"{COPY_CASE}_a0.nii.gz")
    for f in (raw / "labelsTr_annotators").glob(f"{BARE_CASE}_a*"):
        f.unlink()
    old = dict(os.environ)
    os.environ.update({k: env[k] for k in ENV_KEYS})
    try:
        plan_and_preprocess([DATASET_ID], configurations=["2d"], num_processes=1)
    finally:
        os.environ.clear()
        os.environ.update(old)
    return env, Path(env["nnUNet_preprocessed"]) / NAME / "nnUNetPlans_2d"


def _b2nd(path: Path) -> np.ndarray:
    return np.asarray(blosc2.open(urlpath=str(path), mode="r")[:])


def _annotators(folder: Path, case: str) -> list[np.ndarray]:
    return [_b2nd(folder / PREPROCESSED_FOLDER / f"{case}_a{k}.b2nd") for k in range(NUM_ANNOTATORS)]


def test_preprocessing_writes_annotator_segs_like_the_case_seg(annotator_phantoms):
    _, folder = annotator_phantoms
    assert not list(folder.glob("*_a*.b2nd"))  # beside nnU-Net's files they would be taken for cases
    differ = 0
    for case in [f"case_{i:03d}" for i in range(6) if f"case_{i:03d}" != BARE_CASE]:
        seg = _b2nd(folder / f"{case}_seg.b2nd")
        for k, ann in enumerate(_annotators(folder, case)):
            assert ann.shape == seg.shape and ann.dtype == np.int16
            assert set(np.unique(ann)) <= {0, 1, 2}
            assert (ann == seg).mean() > 0.8  # a boundary voxel or a blob apart, not another crop or orientation
            if case == COPY_CASE and k == 0:
                np.testing.assert_array_equal(ann, seg)  # the same label -> exactly nnU-Net's preprocessed seg
            differ += int((ann != seg).any())
    assert differ >= 5
    assert not (folder / PREPROCESSED_FOLDER / f"{BARE_CASE}_a0.b2nd").exists()


def _drawn(dataset, annotators) -> int:
    """Which annotator's seg one ``load_case`` returned."""
    seg = np.asarray(dataset.load_case("case_001")[1][:])
    return next(k for k, a in enumerate(annotators) if np.array_equal(seg, a))


def test_dataset_draws_every_annotator_and_keeps_labels_of_cases_without(annotator_phantoms):
    _, folder = annotator_phantoms
    dataset = AnnotatorDataset(str(folder))
    assert "case_001_a0" not in dataset.identifiers and len(dataset.identifiers) == 6
    annotators = _annotators(folder, "case_001")
    assert len({a.tobytes() for a in annotators}) == NUM_ANNOTATORS  # distinguishable, so draws can be told apart
    np.random.seed(0)
    drawn = [_drawn(dataset, annotators) for _ in range(30)]
    assert set(drawn) == set(range(NUM_ANNOTATORS)) and max(np.bincount(drawn)) <= 20
    np.random.seed(0)  # nnU-Net's convention: numpy's global generator, seeded per worker
    again = [_drawn(dataset, annotators) for _ in range(30)]
    assert again == drawn
    bare = np.asarray(dataset.load_case(BARE_CASE)[1][:])
    np.testing.assert_array_equal(bare, _b2nd(folder / f"{BARE_CASE}_seg.b2nd"))


def test_entrust_trainer_trains_on_annotator_labels(annotator_phantoms, monkeypatch):
    from entrust_nnunet.nnunet.variants import nnUNetTrainerEnTrust_tinyCPU

    env, folder = annotator_phantoms
    use_nnunet_roots(env, monkeypatch, "nnUNet_n_proc_DA", "nnUNet_compile")
    pre = folder.parent
    plans = json.loads((pre / "nnUNetEnTrustPlans.json").read_text())
    plans["continue_training"] = False  # nnU-Net >= 2.8 pops it in __init__
    trainer = nnUNetTrainerEnTrust_tinyCPU(plans, "2d", 0, json.loads((pre / "dataset.json").read_text()),
                                           torch.device("cpu"))
    trainer.initialize()
    dataset_tr, dataset_val = trainer.get_tr_and_val_datasets()
    assert isinstance(dataset_tr, AnnotatorDataset) and not isinstance(dataset_val, AnnotatorDataset)
    assert "multi-annotator training" in Path(trainer.log_file).read_text()
    loader, _ = trainer.get_dataloaders()
    trainer.network.train()
    losses = []
    for _ in range(3):
        batch = next(loader)
        assert set(torch.unique(batch["target"][0]).tolist()) <= {0, 1, 2}
        losses.append(trainer.train_step(batch)["loss"])
    assert np.all(np.isfinite(losses))


def test_without_annotator_files_the_dataset_is_nnunets(annotator_phantoms, tmp_path):
    _, folder = annotator_phantoms
    from nnunetv2.training.dataloading.nnunet_dataset import nnUNetDatasetBlosc2

    plain = tmp_path / "plain"
    shutil.copytree(folder, plain, ignore=shutil.ignore_patterns(PREPROCESSED_FOLDER))
    dataset = nnUNetDatasetBlosc2(str(plain))
    assert training_dataset(dataset, log=lambda *a: None) is dataset


def test_an_annotator_label_in_another_geometry_or_with_the_ignore_label(tmp_path):
    """An annotator file flipped or shifted against the case's images (same shape) is refused with one line naming
    it, instead of training misaligned; the dataset's ignore label is an allowed value (as in labelsTr)."""
    import SimpleITK as sitk
    from nnunetv2.imageio.simpleitk_reader_writer import SimpleITKIO
    from nnunetv2.utilities.label_handling.label_handling import LabelManager

    from entrust_nnunet.data.io import InputError, read_header
    from entrust_nnunet.nnunet.annotators import _read_checked, annotator_label_values

    manager = LabelManager({"background": 0, "lesion": 1, "ignore": 2}, None)
    assert annotator_label_values(manager) == {0, 1, 2} and set(manager.all_labels) == {0, 1}
    image = sitk.GetImageFromArray(np.zeros((1, 8, 8), np.float32))
    image.SetSpacing((0.8, 0.8, 1.0))
    sitk.WriteImage(image, str(tmp_path / "case_0000.nii.gz"))
    label = sitk.GetImageFromArray(np.array([[[0, 1, 2, 0, 0, 0, 0, 0]] * 8], np.uint8))
    label.CopyInformation(image)
    sitk.WriteImage(label, str(tmp_path / "good.nii.gz"))
    image_file = str(tmp_path / "case_0000.nii.gz")
    seg = _read_checked(SimpleITKIO(), tmp_path / "good.nii.gz", (1, 8, 8), annotator_label_values(manager),
                        image_file, read_header(image_file))
    assert set(np.unique(seg)) == {0, 1, 2}
    label.SetDirection((-1.0, 0.0, 0.0, 0.0, 1.0, 0.0, 0.0, 0.0, 1.0))  # flipped along x, same shape
    sitk.WriteImage(label, str(tmp_path / "flipped.nii.gz"))
    with pytest.raises(InputError, match=r"flipped.nii.gz: geometry differs from .*case_0000.nii.gz \(direction"):
        _read_checked(SimpleITKIO(), tmp_path / "flipped.nii.gz", (1, 8, 8), {0, 1, 2}, image_file,
                      read_header(image_file))
