"""benchmarks/heldout/: the held-out generator writes what nnU-Net reads, and the scoring reads it back right."""
import importlib.util
import json
import subprocess
import sys
from pathlib import Path

import numpy as np
import SimpleITK as sitk

HELDOUT = Path(__file__).resolve().parents[2] / "benchmarks" / "heldout"
spec = importlib.util.spec_from_file_location("heldout_score", HELDOUT / "score.py")
score = importlib.util.module_from_spec(spec)
spec.loader.exec_module(score)


def _array(path):
    return sitk.GetArrayFromImage(sitk.ReadImage(str(path)))


def test_generated_cases_share_geometry_and_hold_coin_flip_blobs_apart_from_the_lesion(tmp_path):
    raw = tmp_path / "Dataset701_Heldout"
    subprocess.run([sys.executable, str(HELDOUT / "generate.py"), str(raw), "--seed", "3", "--n-train", "2",
                    "--n-test", "4", "--conflict-in-test", "1.0"], check=True, capture_output=True)
    dataset = json.loads((raw / "dataset.json").read_text())
    assert dataset["channel_names"] == {"0": "T1", "1": "T2", "2": "FLAIR"} and dataset["numTraining"] == 2
    for label in sorted((raw / "labelsTs").glob("*.nii.gz")):
        case = label.name[: -len(".nii.gz")]
        ref = sitk.ReadImage(str(label))
        for c in range(3):
            img = sitk.ReadImage(str(raw / "imagesTs" / f"{case}_{c:04d}.nii.gz"))
            assert img.GetSize() == ref.GetSize() and np.allclose(img.GetSpacing(), ref.GetSpacing())
        gt, blob = _array(label), _array(raw / "conflictTs" / label.name) > 0
        assert set(np.unique(gt)) <= {0, 1, 2} and blob.any()  # every test case holds a blob at this setting
        assert not (blob & (gt == 2)).any()  # a blob is never rim: lesion (its coin says so) or background
        assert (gt[blob] == gt[blob][0]).all()  # one label for the whole blob


def test_scores_of_a_perfect_prediction(tmp_path):
    """The truth as the mask with one-hot probabilities: Dice 1, no error, calibrated, no conflict anywhere."""
    raw, pred = tmp_path / "raw", tmp_path / "pred"
    for d in ("labelsTs", "conflictTs"):
        (raw / d).mkdir(parents=True)
    pred.mkdir()
    gt = np.zeros((1, 16, 16), np.uint8)
    gt[0, 4:10, 4:10], gt[0, 3:11, 3] = 1, 2
    blob = np.zeros_like(gt)
    blob[0, 12:15, 12:15] = 1
    for folder, arr in ((raw / "labelsTs", gt), (raw / "conflictTs", blob), (pred, gt)):
        sitk.WriteImage(sitk.GetImageFromArray(arr), str(folder / "c1.nii.gz"))
    probs = np.moveaxis(np.eye(3)[gt], -1, 0).astype(np.float32)
    np.savez(pred / "c1.npz", probabilities=probs)
    result = score.score(raw, pred, plain=True)
    assert result["dice_lesion"] == result["dice_rim"] == 1.0
    assert result["err_in_conflict"] == result["err_outside"] == 0.0 and result["perr_in_conflict"] == 0.0
    assert result["ece_class_all"] == result["ece_class_fg"] == 0.0 and result["conflict_voxels"] == 9


def test_table_averages_the_runs_of_one_fold_set_only(tmp_path):
    """``table`` reads the metrics of the fold set and schedule it is given (fold 0 alone, short schedule by
    default) and gives mean ± sample std over the training runs (no spread for one run); the five-fold ensemble's
    and the long schedule's files are tables of their own."""
    row = {k: None for k in score.KEYS}
    for tag, run, dice in (("f0", 0, 0.8), ("f0", 1, 0.6), ("f01234", 0, 0.1), ("f0_long", 0, 0.3)):
        metrics = {"plain": {**row, "dice_lesion": dice}, "entrust": {**row, "dice_lesion": dice + 0.1}}
        (tmp_path / f"metrics_701_{tag}_r{run}.json").write_text(json.dumps(metrics))
    single = score.table(tmp_path)
    assert "dataset 701, folds 0, short schedule (2 training runs)" in single
    assert "| dice_lesion | 0.700 ± 0.141 | 0.800 ± 0.141 |" in single  # sqrt(0.02 / (2 - 1))
    assert "| ece_class_fg | n/a | n/a |" in single
    ensemble = score.table(tmp_path, "f01234")
    assert "folds 01234, short schedule (1 training runs)" in ensemble
    assert "| dice_lesion | 0.100 | 0.200 |" in ensemble
    longer = score.table(tmp_path, "f0_long")
    assert "folds 0, long schedule (1 training runs)" in longer and "| dice_lesion | 0.300 | 0.400 |" in longer
