"""nnU-Net's post-training toolchain on EnTrust, end to end on tiny 2D phantoms (CPU).

After 5 folds of ``nnUNetTrainerEnTrust_1epochCPU``: ``nnUNetv2_find_best_configuration`` runs on our results
and its printed instructions run with ``entrust predict`` / ``entrust postprocess`` in place of nnU-Net's
commands; ``nnUNetv2_ensemble`` and ``entrust ensemble`` pool two ``entrust predict --save_probabilities``
outputs (two disjoint sets of folds stand in for two configurations: a 2D dataset has no 3d_fullres);
``entrust postprocess`` keeps the maps consistent; ``nnUNetv2_evaluate_folder`` scores every output.
The schedule is one epoch: the test checks the plumbing and the maps' arithmetic, not segmentation quality.
"""
import json
import os
import shlex
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import SimpleITK as sitk
import torch

from conftest import nnunet_bin
from entrust_nnunet.data.io import MAP_NAMES
from entrust_nnunet.nnunet.env import ensure_ext_trainer, set_nnunet_roots
from entrust_nnunet.nnunet.toolchain import member_error_probability

DATASET_ID = 953
NAME = f"Dataset{DATASET_ID}_Phantoms"
TRAINER, PLANS = "nnUNetTrainerEnTrust_1epochCPU", "nnUNetEnTrustPlans"


FOLDS_1_TO_4 = """
import torch
from nnunetv2.run.run_training import run_training
if __name__ == "__main__":
    torch.set_num_threads(2)
    for fold in (1, 2, 3, 4):
        run_training("{dataset}", "2d", fold, "{trainer}", "{plans}", device=torch.device("cpu"))
"""


def _run(env, *cmd, timeout=900):
    exe = nnunet_bin(cmd[0]) if not os.path.isabs(cmd[0]) else cmd[0]
    r = subprocess.run([exe, *cmd[1:]], env=env, capture_output=True, encoding="utf-8", errors="replace",
                       timeout=timeout)
    assert r.returncode == 0, f"{' '.join(cmd)}\n{r.stdout[-3000:]}\n{r.stderr[-3000:]}"
    return r


def _array(path) -> np.ndarray:
    return sitk.GetArrayFromImage(sitk.ReadImage(str(path)))


def _map(folder, case, name) -> np.ndarray:
    return _array(Path(folder) / "uncertainty" / f"{case}_{name}.nii.gz")


def _probabilities(folder, case, shape) -> np.ndarray:
    probs = np.load(Path(folder) / f"{case}.npz")["probabilities"]
    return probs.reshape((probs.shape[0], *shape))


@pytest.fixture(scope="module")
def five_folds(tmp_path_factory):
    """(env, raw folder, model folder): 10 phantoms (32x32), 5 folds of the one-epoch EnTrust variant."""
    from entrust_nnunet.data.phantoms import write_phantom_dataset
    from entrust_nnunet.pipeline import plan_and_preprocess

    root = tmp_path_factory.mktemp("toolchain")
    env = set_nnunet_roots(root, dict(os.environ))
    # one process everywhere, also for the defaults that nnU-Net prints into its instructions (-np, -npp, -nps)
    env.update(nnUNet_def_n_proc="1", nnUNet_n_proc_DA="0", nnUNet_npp="0", nnUNet_nps="1", nnUNet_compile="false")
    ensure_ext_trainer(env)
    raw = Path(env["nnUNet_raw"]) / NAME
    write_phantom_dataset(raw, num_cases=10, num_test=2, dim=2, size=32, seed=3, progress=False)
    old = dict(os.environ)
    os.environ.update({k: env[k] for k in ("nnUNet_raw", "nnUNet_preprocessed", "nnUNet_results")})
    try:
        plan_and_preprocess([DATASET_ID], configurations=["2d"], num_processes=1)
    finally:
        os.environ.clear()
        os.environ.update(old)
    _run(env, "nnUNetv2_train", str(DATASET_ID), "2d", "0", "-tr", TRAINER, "-p", PLANS, "-device", "cpu")
    # folds 1-4 through nnU-Net's own run_training in ONE process: what the stock command runs, without paying
    # its start-up (imports, trainer search) four more times
    _run(env, sys.executable, "-c", FOLDS_1_TO_4.format(dataset=DATASET_ID, trainer=TRAINER, plans=PLANS))
    return env, raw, Path(env["nnUNet_results"]) / NAME / f"{TRAINER}__{PLANS}__2d"


@pytest.fixture(scope="module")
def best(five_folds):
    env, raw, model = five_folds
    r = _run(env, "nnUNetv2_find_best_configuration", str(DATASET_ID), "-c", "2d", "-tr", TRAINER, "-p", PLANS)
    instructions = Path(env["nnUNet_results"]) / NAME / "inference_instructions.txt"
    return r.stdout, instructions.read_text().splitlines()


@pytest.fixture(scope="module")
def members(five_folds, tmp_path_factory):
    """Two `entrust predict --save_probabilities` outputs of disjoint folds (the ensemble's members)."""
    env, raw, model = five_folds
    out = tmp_path_factory.mktemp("members")
    folders = []
    for name, folds in (("a", ["0", "1"]), ("b", ["2", "3", "4"])):
        _run(env, "entrust", "predict", "-i", str(raw / "imagesTs"), "-o", str(out / name), "-d", str(DATASET_ID),
             "-c", "2d", "-tr", TRAINER, "-p", PLANS, "-f", *folds, "--save_probabilities", "--num-hypotheses", "4")
        folders.append(out / name)
    return env, raw, folders


def test_find_best_configuration_reads_our_cross_validation(five_folds, best):
    """Our validation/uncertainty/ maps stay out of nnU-Net's cross-validation results."""
    env, raw, model = five_folds
    stdout, _ = best
    merged = model / "crossval_results_folds_0_1_2_3_4"
    summary = json.loads((merged / "summary.json").read_text())
    assert len(summary["metric_per_case"]) == 10
    assert sorted(p.name for p in merged.glob("*.nii.gz")) == [f"case_{i:03d}.nii.gz" for i in range(10)]
    assert not (merged / "uncertainty").exists()
    assert (merged / "postprocessing.pkl").is_file() and f"*Best*: {model.name}" in stdout
    for fold in range(5):
        assert len(list((model / f"fold_{fold}" / "validation" / "uncertainty").glob("*_total.nii.gz"))) == 2


def test_entrust_calibrate_fits_on_every_fold_out_of_fold(five_folds):
    """entrust calibrate reads the out-of-fold voxels every fold kept (each training case once) and writes
    one calibrator that entrust predict then uses; the file is removed again for the tests below."""

    from entrust_nnunet.nnunet.calibration import (CALIBRATION_FILE, FOLD_VOXELS_FILE, OTHER_READING_VOXELS_FILE,
                                                   voxels_file_reading)
    from entrust_nnunet.nnunet.predictor import EnTrustPredictor

    env, raw, model = five_folds
    r = _run(env, "entrust", "calibrate", "-d", str(DATASET_ID), "-c", "2d", "-tr", TRAINER, "-p", PLANS)
    content = json.loads((model / CALIBRATION_FILE).read_text())
    try:
        assert content["folds"] == [0, 1, 2, 3, 4] and "wrote" in r.stdout
        # every fold chose a conflict reading and kept the other's voxels: calibrate chose once, on all of them
        assert all((model / f"fold_{f}" / OTHER_READING_VOXELS_FILE).is_file() for f in range(5))
        assert content["conflict_reading"] in ("vote", "showing") and content["conflict_reading_choice"] in r.stdout
        voxels = sum(len(np.load(model / f"fold_{f}" / FOLD_VOXELS_FILE)["error"]) for f in range(5))
        assert content["report"]["voxels"] == voxels > 0
        predictor = EnTrustPredictor(device=torch.device("cpu"), allow_tqdm=False)
        predictor.initialize_from_trained_model_folder(str(model), (0, 1, 2, 3, 4))
        chosen = float(content["conflict_reading"] == "showing")
        assert [float(p["calib.showing_reading"]) for p in predictor.list_of_parameters] == [chosen] * 5
        assert [float(h.showing_reading) for h in predictor.calib_heads] == [chosen] * 5
        # the file's reading, not fold 0's own: a file naming the other one is followed
        own = voxels_file_reading(model / "fold_0" / FOLD_VOXELS_FILE)
        (model / CALIBRATION_FILE).write_text(json.dumps(content | {"conflict_reading": {"vote": "showing", "showing": "vote"}[own]}))
        predictor.initialize_from_trained_model_folder(str(model), (0,))
        assert float(predictor.list_of_parameters[0]["calib.showing_reading"]) == float(own == "vote")
        (model / CALIBRATION_FILE).write_text(json.dumps(content))
        predictor = EnTrustPredictor(device=torch.device("cpu"), allow_tqdm=False)
        predictor.initialize_from_trained_model_folder(str(model), (0,))
        calibrator = predictor.calibrator
        assert calibrator is not None and calibrator.name == content["calibrator"]
        # what predict writes follows the file: its P(error) (never below the alternatives' floor) and its class
        # calibration, not the fold's CalibHead
        assert predictor.class_temperature() == pytest.approx(content["class_temperature"])
        torch.testing.assert_close(predictor.class_conflict_bias(), torch.tensor(content["class_conflict_bias"]))
        torch.manual_seed(0)
        data = torch.randn(3, 1, 32, 32)
        stats = predictor.pooled_statistics(data)
        floor = stats["gate"] * (1 - stats["confidence"])
        c = stats["mean"].shape[0]
        with_file = predictor.predict_case(data)[0][c]
        torch.testing.assert_close(with_file, torch.maximum(calibrator.probability_of_error(stats), floor))
        without = EnTrustPredictor(device=torch.device("cpu"), allow_tqdm=False)
        (model / CALIBRATION_FILE).rename(model / "moved.json")
        try:
            without.initialize_from_trained_model_folder(str(model), (0,))
        finally:
            (model / "moved.json").rename(model / CALIBRATION_FILE)
        assert without.calibrator is None and (without.predict_case(data)[0][c] - with_file).abs().max() > 1e-4
    finally:
        (model / CALIBRATION_FILE).unlink()


def test_export_model_to_zip_carries_the_calibration_into_an_install(five_folds, tmp_path):
    """nnU-Net's export leaves entrust_calibration.json behind; ours adds it, and nnU-Net's own install command
    puts it where entrust predict reads it."""
    import zipfile

    from entrust_nnunet.nnunet.calibration import CALIBRATION_FILE
    from entrust_nnunet.nnunet.predictor import EnTrustPredictor

    env, raw, model = five_folds
    _run(env, "entrust", "calibrate", "-d", str(DATASET_ID), "-c", "2d", "-tr", TRAINER, "-p", PLANS)
    try:
        ours, stock = tmp_path / "ours.zip", tmp_path / "stock.zip"
        common = ["-d", str(DATASET_ID), "-c", "2d", "-tr", TRAINER, "-p", PLANS]
        r = _run(env, "entrust", "export_model_to_zip", "-o", str(ours), *common)
        _run(env, "nnUNetv2_export_model_to_zip", "-o", str(stock), *common)
        relative = f"{NAME}/{model.name}/{CALIBRATION_FILE}"
        with zipfile.ZipFile(ours) as a, zipfile.ZipFile(stock) as b:
            assert sorted(a.namelist()) == sorted([*b.namelist(), relative])
            assert a.read(relative) == (model / CALIBRATION_FILE).read_bytes()
        assert "with the calibration of 2d" in r.stdout and not list(tmp_path.glob(".tmp-*"))
        installed = {**env, "nnUNet_results": str(tmp_path / "installed")}
        _run(installed, "nnUNetv2_install_pretrained_model_from_zip", str(ours))
        folder = tmp_path / "installed" / NAME / model.name
        predictor = EnTrustPredictor(device=torch.device("cpu"), allow_tqdm=False)
        predictor.initialize_from_trained_model_folder(str(folder), (0, 1))
        assert predictor.calibrator is not None
        assert predictor.class_temperature() == pytest.approx(
            json.loads((model / CALIBRATION_FILE).read_text())["class_temperature"])
    finally:
        (model / CALIBRATION_FILE).unlink()


@pytest.mark.parametrize("problem", ["configuration", "fold", "output_folder"])
def test_export_model_to_zip_refuses_in_one_line_and_writes_nothing(five_folds, tmp_path, problem):
    env, raw, model = five_folds
    out = tmp_path / "model.zip"
    flags = {"configuration": ["-c", "3d_fullres"], "fold": ["-c", "2d", "-f", "0", "7"],
             "output_folder": ["-c", "2d"]}[problem]
    if problem == "output_folder":
        out.mkdir()
    r = subprocess.run([nnunet_bin("entrust"), "export_model_to_zip", "-d", str(DATASET_ID), "-o", str(out),
                        "-tr", TRAINER, "-p", PLANS, *flags], env=env, capture_output=True, encoding="utf-8",
                       timeout=300)
    lines = r.stderr.strip().splitlines()
    culprit = {"configuration": "3d_fullres", "fold": "requested folds", "output_folder": "is a folder"}[problem]
    assert r.returncode == 2 and len(lines) == 1 and lines[0].startswith("entrust: error: ") and culprit in lines[0]
    assert sorted(p.name for p in tmp_path.iterdir()) == (["model.zip"] if problem == "output_folder" else [])


def _entrust_command(line: str, replacements: dict[str, str]) -> list[str]:
    """nnU-Net's printed command with its nnUNetv2_* program replaced by our sub-command and placeholders filled."""
    words = [replacements.get(w, w) for w in shlex.split(line)]
    program = {"nnUNetv2_predict": ["entrust", "predict"], "nnUNetv2_apply_postprocessing": ["entrust", "postprocess"],
               "nnUNetv2_ensemble": ["entrust", "ensemble"]}[words[0]]
    return program + words[1:]


def test_printed_instructions_run_with_entrust_commands(five_folds, best, tmp_path):
    """The instructions verbatim, nnUNetv2_predict -> entrust predict, nnUNetv2_apply_postprocessing -> entrust
    postprocess; without --save_probabilities a removed voxel's P(error) is 1 - its old P(error)."""
    env, raw, model = five_folds
    _, lines = best
    commands = [ln for ln in lines if ln.startswith("nnUNetv2_")]
    assert [c.split()[0] for c in commands] == ["nnUNetv2_predict", "nnUNetv2_apply_postprocessing"]
    out, pp = tmp_path / "out", tmp_path / "pp"
    fill = {"INPUT_FOLDER": str(raw / "imagesTs"), "OUTPUT_FOLDER": str(out), "OUTPUT_FOLDER_PP": str(pp)}
    for line in commands:
        _run(env, *_entrust_command(line, fill))
    record = json.loads((pp / "postprocessed_regions.json").read_text())
    for case in ("test_000", "test_001"):
        before, after = _array(out / f"{case}.nii.gz"), _array(pp / f"{case}.nii.gz")
        removed = before != after
        assert record["cases"][case]["removed_voxels"] == int(removed.sum())
        assert record["cases"][case]["p_error_source"] == "total"
        old, new = _map(out, case, "total"), _map(pp, case, "total")
        np.testing.assert_allclose(new[removed], 1 - old[removed], atol=1e-6)
        np.testing.assert_array_equal(new[~removed], old[~removed])
        for name in ("aleatoric", "epistemic", "conflict"):
            np.testing.assert_array_equal(_map(pp, case, name), _map(out, case, name))


def _largest_component_pkl(path: Path) -> Path:
    """nnU-Net's own post-processing file, set to keep only the largest foreground component (removes something)."""
    from batchgenerators.utilities.file_and_folder_operations import save_pickle
    from nnunetv2.postprocessing.remove_connected_components import \
        remove_all_but_largest_component_from_segmentation

    save_pickle(([remove_all_but_largest_component_from_segmentation], [{"labels_or_regions": [1, 2]}]), str(path))
    return path


def _with_a_stray_component(pred: Path, dst: Path) -> Path:
    """A copy of a prediction folder whose masks each get a 2x2 and a 1-voxel foreground speck in two corners,
    so that largest-component post-processing has something to remove whatever the one-epoch model drew."""
    import shutil

    shutil.copytree(pred, dst)
    for case in ("test_000", "test_001"):
        image = sitk.ReadImage(str(dst / f"{case}.nii.gz"))
        mask = sitk.GetArrayFromImage(image)
        lead = (0,) * (mask.ndim - 2)
        mask[lead + (slice(0, 4), slice(0, 4))] = 0
        mask[lead + (slice(-3, None), slice(-3, None))] = 0
        mask[lead + (slice(0, 2), slice(0, 2))] = 1
        mask[lead + (-1, -1)] = 1
        speck = sitk.GetImageFromArray(mask)
        speck.CopyInformation(image)
        sitk.WriteImage(speck, str(dst / f"{case}.nii.gz"))
    return dst


def test_postprocess_gives_removed_regions_the_foreground_probability(members, tmp_path):
    env, raw, (pred, _) = members
    pred = _with_a_stray_component(pred, tmp_path / "pred")
    pkl = _largest_component_pkl(tmp_path / "postprocessing.pkl")
    out, nnunet_out = tmp_path / "pp", tmp_path / "nnunet_pp"
    (out / "uncertainty").mkdir(parents=True)
    killed = [out / ".tmp-999999999-0badc0de-test_000.nii.gz",  # what a SIGKILLed postprocess leaves
              out / "uncertainty" / ".tmp-999999999-0badc0de-test_000_total.nii.gz"]
    for p in killed:
        p.write_bytes(b"partial")
    r = _run(env, "entrust", "postprocess", "-i", str(pred), "-o", str(out), "-pp_pkl_file", str(pkl), "-np", "1")
    _run(env, "nnUNetv2_apply_postprocessing", "-i", str(pred), "-o", str(nnunet_out), "-pp_pkl_file", str(pkl),
         "-np", "1")
    record = json.loads((out / "postprocessed_regions.json").read_text())
    removed_any = False
    for case in ("test_000", "test_001"):
        mask = _array(out / f"{case}.nii.gz")
        np.testing.assert_array_equal(mask, _array(nnunet_out / f"{case}.nii.gz"))  # nnU-Net's masks exactly
        removed = _array(pred / f"{case}.nii.gz") != mask
        removed_any |= bool(removed.any())
        probs = _probabilities(pred, case, mask.shape)
        total, old = _map(out, case, "total"), _map(pred, case, "total")
        np.testing.assert_allclose(total[removed], 1 - probs[0][removed], atol=1e-5)  # P(foreground)
        np.testing.assert_array_equal(total[~removed], old[~removed])
        marked = removed & (_map(pred, case, "conflict") > 0.5)
        assert record["cases"][case]["removed_conflict_voxels"] == int(marked.sum())
        assert record["cases"][case]["p_error_source"] == "probabilities"
        assert (out / f"{case}.npz").read_bytes() == (pred / f"{case}.npz").read_bytes()
        present = f"uncertainty/{case}_modalities.json"  # which modalities were present: carried over
        assert json.loads((out / present).read_text()) == json.loads((pred / present).read_text())
        if marked.any():
            assert f"{case}: post-processing removed" in r.stdout
    assert removed_any and not any(p.exists() for p in killed)
    _run(env, "nnUNetv2_evaluate_folder", str(raw / "labelsTs"), str(out), "-djfile", str(out / "dataset.json"),
         "-pfile", str(out / "plans.json"))
    assert len(json.loads((out / "summary.json").read_text())["metric_per_case"]) == 2
    _run(env, "entrust", "evaluate", "--pred", str(out), "--gt", str(raw / "labelsTs"), "--conflict",
         str(raw / "conflictTs"), "-o", str(tmp_path / "summary.json"), "-np", "1", "--report", str(tmp_path / "rep"))
    summary = json.loads((tmp_path / "summary.json").read_text())
    assert summary["postprocessing"]["removed_conflict_voxels"] == sum(
        c["removed_conflict_voxels"] for c in record["cases"].values())
    assert "<h2>Post-processing</h2>" in (tmp_path / "rep" / "index.html").read_text()


def test_nnunet_ensemble_on_entrust_outputs_writes_valid_masks(members, tmp_path):
    env, raw, folders = members
    out = tmp_path / "ens"
    _run(env, "nnUNetv2_ensemble", "-i", *map(str, folders), "-o", str(out), "-np", "1")
    for case in ("test_000", "test_001"):
        image = sitk.ReadImage(str(raw / "imagesTs" / f"{case}_0000.nii.gz"))
        mask = sitk.ReadImage(str(out / f"{case}.nii.gz"))
        assert mask.GetSize() == image.GetSize()
        np.testing.assert_allclose(mask.GetOrigin(), image.GetOrigin(), atol=1e-5)
        assert set(np.unique(sitk.GetArrayFromImage(mask)).tolist()) <= {0, 1, 2}


def test_entrust_ensemble_pools_members_like_folds(members, tmp_path):
    env, raw, folders = members
    out, nnunet_out = tmp_path / "ens", tmp_path / "nnunet_ens"
    _run(env, "entrust", "ensemble", "-i", *map(str, folders), "-o", str(out), "--save_npz", "-np", "1")
    _run(env, "nnUNetv2_ensemble", "-i", *map(str, folders), "-o", str(nnunet_out), "-np", "1")
    for case in ("test_000", "test_001"):
        mask = _array(out / f"{case}.nii.gz")
        np.testing.assert_array_equal(mask, _array(nnunet_out / f"{case}.nii.gz"))
        probs = _probabilities(out, case, mask.shape)
        member_probs = [_probabilities(f, case, mask.shape) for f in folders]
        np.testing.assert_allclose(probs, np.mean(member_probs, 0), atol=1e-6)
        aleatoric = _map(out, case, "aleatoric")
        np.testing.assert_allclose(aleatoric, np.mean([_map(f, case, "aleatoric") for f in folders], 0), atol=1e-6)
        # epistemic: the members' own parts averaged plus the Jensen-Shannon divergence of their written probabilities
        def h(p):
            return -(p * np.log(np.clip(p, 1e-12, None))).sum(0)

        stacked = np.stack(member_probs).astype(np.float64)
        between = np.clip(h(stacked.mean(0)) - np.mean([h(p) for p in stacked], 0), 0, None)
        expected = np.mean([_map(f, case, "epistemic") for f in folders], 0) + between
        epistemic = _map(out, case, "epistemic")
        np.testing.assert_allclose(epistemic, expected, atol=1e-5)
        # the members' disagreement adds to their own epistemic parts (the JSD of their means is >= 0)
        assert epistemic.mean() >= np.mean([_map(f, case, "epistemic").mean() for f in folders]) - 1e-3
        image = sitk.ReadImage(str(raw / "imagesTs" / f"{case}_0000.nii.gz"))
        for name in MAP_NAMES:  # every map, with the input's geometry
            written = sitk.ReadImage(str(out / "uncertainty" / f"{case}_{name}.nii.gz"))
            assert written.GetSize() == image.GetSize() and written.GetPixelID() == sitk.sitkFloat32
            np.testing.assert_allclose(written.GetDirection(), image.GetDirection(), atol=1e-6)
        np.testing.assert_allclose(_map(out, case, "conflict"), np.mean([_map(f, case, "conflict") for f in folders],
                                                                        0), atol=1e-6)
        total = _map(out, case, "total")
        agree = np.all([_array(f / f"{case}.nii.gz") == mask for f in folders], 0)
        np.testing.assert_allclose(total[agree], np.mean([_map(f, case, "total")[agree] for f in folders], 0),
                                   atol=1e-6)
        # everywhere (also where a member's mask is not the ensemble's): each member's P(error) retargeted to the
        # ensemble's label, averaged
        retargeted = [member_error_probability(_map(f, case, "total"), _array(f / f"{case}.nii.gz"), p, mask)
                      for f, p in zip(folders, member_probs)]
        np.testing.assert_allclose(total, np.mean(retargeted, 0), atol=1e-5)
        assert total.min() >= 0 and total.max() <= 1
        present = json.loads((out / "uncertainty" / f"{case}_modalities.json").read_text())
        assert present["case"] == case and present["absent"] == []  # the members agree: their record
    _run(env, "nnUNetv2_evaluate_folder", str(raw / "labelsTs"), str(out), "-djfile", str(out / "dataset.json"),
         "-pfile", str(out / "plans.json"))
    _run(env, "entrust", "evaluate", "--pred", str(out), "--gt", str(raw / "labelsTs"), "-o",
         str(tmp_path / "summary.json"), "-np", "1")


def test_member_error_probability_retargets_to_the_ensemble_label():
    probs = np.array([[0.7, 0.2], [0.2, 0.5], [0.1, 0.3]])  # (C=3, 2 voxels)
    member_label = np.array([0, 1])
    total = np.array([0.4, 0.6])
    label = np.array([0, 2])  # voxel 0: member agrees; voxel 1: ensemble chose class 2
    out = member_error_probability(total, member_label, probs, label)
    np.testing.assert_allclose(out, [0.4, 1 - 0.6 * 0.3 / 0.5])
    # one foreground class: the member's P(right) is the ensemble label's P(wrong)
    binary = member_error_probability(np.array([0.3]), np.array([1]), np.array([[0.2], [0.8]]), np.array([0]))
    np.testing.assert_allclose(binary, [0.7])


@pytest.mark.parametrize("problem", ["one_member", "missing_case", "no_pkl_file", "member_without_npz",
                                     "output_is_an_input", "labels_differ"])
def test_bad_input_one_line_and_nothing_written(members, tmp_path, problem):
    import shutil

    env, raw, folders = members
    out = tmp_path / "out"
    if problem == "one_member":
        args, culprit = ["ensemble", "-i", str(folders[0]), "-o", str(out)], "-i"
    elif problem == "missing_case":
        partial = tmp_path / "partial"
        shutil.copytree(folders[1], partial)
        (partial / "test_001.nii.gz").unlink()
        args, culprit = ["ensemble", "-i", str(folders[0]), str(partial), "-o", str(out)], str(partial)
    elif problem == "member_without_npz":
        partial = tmp_path / "partial"
        shutil.copytree(folders[1], partial)
        (partial / "test_000.npz").unlink()
        args, culprit = ["ensemble", "-i", str(folders[0]), str(partial), "-o", str(out)], "--save_probabilities"
    elif problem == "output_is_an_input":
        out = tmp_path / "member"
        shutil.copytree(folders[1], out)
        before = sorted((p.name, p.stat().st_mtime_ns) for p in out.rglob("*"))
        args, culprit = ["ensemble", "-i", str(folders[0]), str(out), "-o", str(out)], "input folder"
    elif problem == "labels_differ":
        partial = tmp_path / "partial"
        shutil.copytree(folders[1], partial)
        dj = json.loads((partial / "dataset.json").read_text())
        dj["labels"] = {name: value for name, value in reversed(list(dj["labels"].items()))}
        dj["labels"] = {**dj["labels"], "other": max(dj["labels"].values()) + 1}
        (partial / "dataset.json").write_text(json.dumps(dj))
        args, culprit = ["ensemble", "-i", str(folders[0]), str(partial), "-o", str(out)], "labels differ"
    else:
        args, culprit = ["postprocess", "-i", str(folders[0]), "-o", str(out), "-pp_pkl_file",
                         str(tmp_path / "nothing.pkl")], str(tmp_path / "nothing.pkl")
    r = subprocess.run([nnunet_bin("entrust"), *args], env=env, capture_output=True, encoding="utf-8", timeout=300)
    lines = r.stderr.strip().splitlines()
    assert r.returncode == 2 and len(lines) == 1 and lines[0].startswith("entrust: error: ") and culprit in lines[0]
    if problem == "output_is_an_input":
        assert sorted((p.name, p.stat().st_mtime_ns) for p in out.rglob("*")) == before
    else:
        assert not out.exists()


def test_modality_record_of_an_output_made_from_several_folders(tmp_path):
    """Post-processing and ensembling keep the record of which modalities were present: the inputs' record when
    they agree, every input's when they differ, none when no input has one."""
    from entrust_nnunet.nnunet.toolchain import modality_record

    a, b, c = (tmp_path / n for n in "abc")
    for folder, absent in ((a, []), (b, ["FLAIR"])):
        (folder / "uncertainty").mkdir(parents=True)
        (folder / "uncertainty" / "x_modalities.json").write_text(json.dumps({"case": "x", "absent": absent}))
    c.mkdir()
    assert modality_record([a], "x") == {"case": "x", "absent": []}
    assert modality_record([a, a], "x") == {"case": "x", "absent": []}
    assert modality_record([a, b, c], "x") == {"case": "x", "members": {
        str(a): {"case": "x", "absent": []}, str(b): {"case": "x", "absent": ["FLAIR"]}, str(c): None}}
    assert modality_record([c], "x") is None
