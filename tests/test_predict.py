"""entrust predict: masks + uncertainty maps with the input geometry, fold pooling, bad input."""
import json
import re
import shutil
import subprocess
from pathlib import Path

import numpy as np
import pytest
import SimpleITK as sitk
import torch

from conftest import SESSION_DATASET_ID, nnunet_bin, use_nnunet_roots
from entrust_nnunet.model.sampling import SamplingSettings
from entrust_nnunet.data.io import MAP_NAMES
from entrust_nnunet.nnunet.calibration import choose_reading
from entrust_nnunet.nnunet.predictor import EnTrustPredictor

RANGES = {"total": (0, 1), "aleatoric": (0, np.log(3) + 1e-4), "epistemic": (0, np.log(3) + 1e-4), "conflict": (0, 1)}


def _entrust(env, *args):
    return subprocess.run([nnunet_bin("entrust"), *args], env=env, capture_output=True, encoding="utf-8", errors="replace", timeout=600)


def _same_geometry(a, b):
    assert a.GetSize() == b.GetSize()
    np.testing.assert_allclose(a.GetSpacing(), b.GetSpacing(), rtol=1e-6)
    np.testing.assert_allclose(a.GetOrigin(), b.GetOrigin(), atol=1e-5)
    np.testing.assert_allclose(a.GetDirection(), b.GetDirection(), atol=1e-6)


@pytest.fixture(scope="module")
def prediction(trained_entrust, tmp_path_factory):
    env, name, model = trained_entrust
    out = tmp_path_factory.mktemp("pred") / "out"
    raw = Path(env["nnUNet_raw"]) / name
    r = _entrust(env, "predict", "-i", str(raw / "imagesTs"), "-o", str(out), "-d", str(SESSION_DATASET_ID),
                 "-c", "2d", "-tr", "nnUNetTrainerEnTrust_tinyCPU", "-p", "nnUNetPlans", "-f", "2", "--save_probabilities",
                 "-npp", "0", "-nps", "1", "--num-hypotheses", "4", "--save-hypotheses")
    assert r.returncode == 0, r.stdout[-3000:] + r.stderr[-3000:]
    return env, raw, out


def test_maps_have_input_geometry_and_ranges(prediction):
    env, raw, out = prediction
    for case in ("test_000", "test_001"):
        ref = sitk.ReadImage(str(raw / "imagesTs" / f"{case}_0000.nii.gz"))
        mask = sitk.ReadImage(str(out / f"{case}.nii.gz"))
        _same_geometry(ref, mask)
        for name in MAP_NAMES:
            img = sitk.ReadImage(str(out / "uncertainty" / f"{case}_{name}.nii.gz"))
            _same_geometry(ref, img)
            assert img.GetPixelID() == sitk.sitkFloat32
            arr = sitk.GetArrayFromImage(img)
            lo, hi = RANGES[name]
            assert np.isfinite(arr).all() and arr.min() >= lo - 1e-6 and arr.max() <= hi, (name, arr.min(), arr.max())
        probs = np.load(out / f"{case}.npz")["probabilities"]
        np.testing.assert_allclose(probs.sum(0), 1, atol=1e-3)
        # the mask is the argmax of the pooled (calibrated) class probabilities
        np.testing.assert_array_equal(np.argmax(probs, 0).reshape(sitk.GetArrayFromImage(mask).shape),
                                      sitk.GetArrayFromImage(mask))
    assert not list(out.rglob(".tmp-*"))


def test_hypotheses_are_whole_masks_with_the_input_geometry(prediction):
    env, raw, out = prediction
    for case in ("test_000", "test_001"):
        ref = sitk.ReadImage(str(raw / "imagesTs" / f"{case}_0000.nii.gz"))
        files = sorted((out / "hypotheses").glob(f"{case}_h*.nii.gz"))
        assert [f.name for f in files] == [f"{case}_h{k:02d}.nii.gz" for k in range(4)]
        for f in files:
            img = sitk.ReadImage(str(f))
            _same_geometry(ref, img)
            assert set(np.unique(sitk.GetArrayFromImage(img))) <= {0, 1, 2}


def test_a_new_prediction_into_the_same_folder_leaves_nothing_of_the_old_one(prediction, tmp_path):
    """Predicting again with fewer hypotheses and without --save_probabilities removes the old prediction's extra
    hypotheses and its .npz/.pkl (evaluation, the report and nnU-Net's ensembling would read them as this one's),
    and a killed run's temporaries in hypotheses/ (dead pid)."""
    env, raw, old = prediction
    out = tmp_path / "out"
    shutil.copytree(old, out)
    dead = out / "hypotheses" / ".tmp-999999999-0123abcd-test_000_h00.nii.gz"
    dead.write_bytes(b"")
    r = _entrust(env, "predict", "-i", str(raw / "imagesTs"), "-o", str(out), "-d", str(SESSION_DATASET_ID),
                 "-c", "2d", "-tr", "nnUNetTrainerEnTrust_tinyCPU", "-p", "nnUNetPlans", "-f", "2", "-npp", "0",
                 "-nps", "1", "--num-hypotheses", "2", "--save-hypotheses")
    assert r.returncode == 0, r.stdout[-3000:] + r.stderr[-3000:]
    assert sorted(f.name for f in (out / "hypotheses").iterdir()) == [
        f"{c}_h{k:02d}.nii.gz" for c in ("test_000", "test_001") for k in range(2)]
    assert not list(out.glob("*.npz")) and not list(out.glob("*.pkl"))
    assert sorted(f.name for f in out.glob("*.nii.gz")) == ["test_000.nii.gz", "test_001.nii.gz"]


def test_nnunet_evaluate_folder_still_works(prediction):
    env, raw, out = prediction
    r = subprocess.run([nnunet_bin("nnUNetv2_evaluate_folder"), str(raw / "labelsTs"), str(out), "-djfile",
                        str(out / "dataset.json"), "-pfile", str(out / "plans.json")],
                       env=env, capture_output=True, encoding="utf-8", errors="replace", timeout=300)
    assert r.returncode == 0, r.stderr[-2000:]
    summary = json.loads((out / "summary.json").read_text())
    assert len(summary["metric_per_case"]) == 2


def test_validation_writes_maps_for_every_validation_case(trained_entrust):
    """Every case of the fold's validation split gets every map, with the geometry of nnU-Net's validation mask
    beside it, as float32 within the map's range."""
    env, name, model = trained_entrust
    validation = model / "fold_2" / "validation"
    split = json.loads((Path(env["nnUNet_preprocessed"]) / name / "splits_final.json").read_text())[2]["val"]
    cases = sorted(p.name[: -len(".nii.gz")] for p in validation.glob("*.nii.gz"))
    assert cases == sorted(split)
    for case in cases:
        mask = sitk.ReadImage(str(validation / f"{case}.nii.gz"))
        for map_name in MAP_NAMES:
            img = sitk.ReadImage(str(validation / "uncertainty" / f"{case}_{map_name}.nii.gz"))
            _same_geometry(mask, img)
            arr = sitk.GetArrayFromImage(img)
            lo, hi = RANGES[map_name]
            assert img.GetPixelID() == sitk.sitkFloat32 and arr.min() >= lo - 1e-6 and arr.max() <= hi, map_name


def test_calibration_uses_the_validation_fold_and_cross_fits_its_maps(trained_entrust, tmp_path):
    """The network trains on every training case of the fold; CalibHead is fitted on the validation fold;
    the fold's own maps come from CalibHeads fitted on the other half, so they differ from the final head's."""
    env, name, model = trained_entrust
    fold = model / "fold_2"
    log = next(fold.glob("training_log_*.txt")).read_text(encoding="utf-8")
    cases = sorted(p.name[: -len(".nii.gz")] for p in (fold / "validation").glob("*.nii.gz"))
    num_train = len(list((Path(env["nnUNet_raw"]) / name / "labelsTr").glob("*.nii.gz")))
    split = re.search(r"This split has (\d+) training and (\d+) validation cases", log)
    assert (int(split[1]), int(split[2])) == (num_train - len(cases), len(cases))
    assert f"CalibHead fitted on {len(cases)} cases" in log and "cross-fitted CalibHead" in log
    # the conflict reading was chosen on the same cases, and the checkpoint carries the choice
    chosen = re.search(r"conflict reading: (vote|showing) \(", log)
    assert chosen, log[-2000:]
    weights = torch.load(fold / "checkpoint_final.pth", weights_only=False, map_location="cpu")["network_weights"]
    assert float(weights["calib.showing_reading"]) == float(chosen[1] == "showing")
    # ... and its out-of-fold voxels are kept under both readings (for entrust calibrate's choice over all folds)
    with np.load(fold / "calibration_voxels.npz") as kept, np.load(fold / "calibration_voxels_other_reading.npz") as other:
        assert (float(kept["showing_reading"]), float(other["showing_reading"])) == ((1.0, 0.0) if chosen[1] == "showing"
                                                                                  else (0.0, 1.0))
        assert np.array_equal(kept["label"], other["label"])  # the same voxels of the same cases
        files = {"kept": kept, "other": other}
        readings = {("showing" if float(f["showing_reading"]) else "vote"): {k: f[k] for k in ("probabilities", "label", "gate", "case")}
                    for f in files.values()}
        assert choose_reading(readings)[0] == chosen[1]  # the logged choice, from the files' own voxels
        conflicting = kept["gate"] > 0
        if conflicting.any():  # the readings differ only where the experts conflict
            assert not np.allclose(kept["probabilities"][conflicting], other["probabilities"][conflicting])
        np.testing.assert_allclose(kept["probabilities"][~conflicting], other["probabilities"][~conflicting], atol=1e-4)
    # the same cases through entrust predict with the final checkpoint (its one, fully fitted CalibHead)
    images = tmp_path / "images"
    images.mkdir()
    for case in cases:
        for f in (Path(env["nnUNet_raw"]) / name / "imagesTr").glob(f"{case}_*.nii.gz"):
            shutil.copy(f, images / f.name)
    out = tmp_path / "out"
    r = _entrust(env, "predict", "-i", str(images), "-o", str(out), "-m", str(model), "-f", "2", "-npp", "0", "-nps", "1")
    assert r.returncode == 0, r.stdout[-3000:] + r.stderr[-3000:]

    def read(folder, case, m):
        return sitk.GetArrayFromImage(sitk.ReadImage(str(folder / "uncertainty" / f"{case}_{m}.nii.gz")))

    totals_differ = []
    for case in cases:
        np.testing.assert_allclose(read(out, case, "aleatoric"), read(fold / "validation", case, "aleatoric"), atol=1e-4)
        totals_differ.append(np.abs(read(out, case, "total") - read(fold / "validation", case, "total")).max() > 1e-4)
    assert all(totals_differ)


def _model_copy(model, tmp_path):
    """A copy of a trained model folder (checkpoints, plans, dataset.json) that a test may add checkpoints to."""
    copy = tmp_path / model.name
    shutil.copytree(model, copy, ignore=shutil.ignore_patterns("validation", "*.png", "*.txt", "*.npz"))
    return copy


def _warnings_loading(copy, checkpoint: str, capsys) -> list[str]:
    """The lines EnTrustPredictor writes to stderr while loading fold 2's ``checkpoint`` of ``copy``."""
    EnTrustPredictor(device=torch.device("cpu")).initialize_from_trained_model_folder(str(copy), [2], checkpoint)
    return capsys.readouterr().err.strip().splitlines()


def test_a_checkpoint_without_a_fitted_calib_head_is_named_in_one_warning(trained_entrust, tmp_path, capsys):
    """checkpoint_best.pth is saved while training, before CalibHead is fitted (at the end, into
    checkpoint_final.pth): predicting with it says so; with the final checkpoint nothing is said."""
    from entrust_nnunet.nnunet.checkpoints import load_checkpoint

    env, name, model = trained_entrust
    copy = _model_copy(model, tmp_path)
    ckpt = load_checkpoint(copy / "fold_2" / "checkpoint_final.pth")
    assert float(ckpt["network_weights"]["calib.fitted"]) == 1.0
    ckpt["network_weights"]["calib.fitted"].zero_()
    torch.save(ckpt, copy / "fold_2" / "checkpoint_unfitted.pth")
    assert not any("warning" in line for line in _warnings_loading(copy, "checkpoint_final.pth", capsys))
    lines = _warnings_loading(copy, "checkpoint_unfitted.pth", capsys)
    assert len(lines) == 1 and lines[0].startswith(f"entrust: warning: {copy / 'fold_2' / 'checkpoint_unfitted.pth'}: "
                                                   "CalibHead not fitted")


def test_a_crossmodal_checkpoint_without_fitted_predictors_is_named_in_one_warning(trained_entrust, tmp_path, capsys):
    """The cross-modal variant's predictors are fitted at the end of training (into checkpoint_final.pth): a checkpoint
    saved before (checkpoint_best.pth) predicts without a conflict map, and says so in one line."""
    from entrust_nnunet.model.crossmodal import CrossModalPredictor
    from entrust_nnunet.nnunet.checkpoints import load_checkpoint

    env, name, model = trained_entrust
    copy = _model_copy(model, tmp_path)
    ckpt = load_checkpoint(copy / "fold_2" / "checkpoint_final.pth")
    ckpt["trainer_name"] = "nnUNetTrainerEnTrustCrossModal_tinyCPU"  # the same trunk, with its predictors
    predictors = CrossModalPredictor(torch.nn.Conv2d, 3).state_dict()
    for fitted, file in ((0.0, "checkpoint_unfitted.pth"), (1.0, "checkpoint_fitted.pth")):
        predictors["fitted"].fill_(fitted)
        ckpt["network_weights"].update({f"crossmodal.{k}": v.clone() for k, v in predictors.items()})
        torch.save(ckpt, copy / "fold_2" / file)
    assert not any("warning" in line for line in _warnings_loading(copy, "checkpoint_fitted.pth", capsys))
    lines = _warnings_loading(copy, "checkpoint_unfitted.pth", capsys)
    assert len(lines) == 1 and lines[0].startswith(f"entrust: warning: {copy / 'fold_2' / 'checkpoint_unfitted.pth'}: "
                                                   "the cross-modal predictors are not fitted")


def test_a_checkpoint_from_before_the_reading_choice_predicts_with_the_vote(trained_entrust, tmp_path):
    """Checkpoints written before CalibHead held the conflict reading load (network and the predictor's per-fold
    CalibHeads alike) and read conflict by the vote."""
    from entrust_nnunet.nnunet.checkpoints import load_checkpoint

    env, name, model = trained_entrust
    copy = _model_copy(model, tmp_path)
    ckpt = load_checkpoint(copy / "fold_2" / "checkpoint_final.pth")
    del ckpt["network_weights"]["calib.showing_reading"]
    torch.save(ckpt, copy / "fold_2" / "checkpoint_old.pth")
    predictor = EnTrustPredictor(device=torch.device("cpu"), allow_tqdm=False)
    predictor.initialize_from_trained_model_folder(str(copy), [2], "checkpoint_old.pth")
    assert [float(h.showing_reading) for h in predictor.calib_heads] == [0.0]
    out = predictor.predict_logits_from_preprocessed_data(torch.randn(3, 1, 32, 32))
    assert torch.isfinite(out).all() and predictor.network.net.conflict_reading == "vote"


def test_folds_are_pooled_epistemic_rises_when_folds_disagree(trained_entrust, monkeypatch):
    env, name, model = trained_entrust
    use_nnunet_roots(env, monkeypatch, "nnUNet_extTrainer")
    single = EnTrustPredictor(device=torch.device("cpu"), allow_tqdm=False, use_mirroring=False,
                              sampling=SamplingSettings(num_hypotheses=4))
    single.initialize_from_trained_model_folder(str(model), [2])
    weights = single.list_of_parameters[0]
    # a second 'fold' that disagrees by construction: its deterministic head (the SegDiff start's mean) favours the
    # last class
    other = {k: v.clone() for k, v in weights.items()}
    head = max((k for k in other if k.startswith("decoder.seg_layers.") and k.endswith(".bias")),
               key=lambda k: int(k.split(".")[2]))
    other[head] = other[head] + torch.tensor([-6.0, -6.0, 6.0])
    pooled = EnTrustPredictor(device=torch.device("cpu"), allow_tqdm=False, use_mirroring=False,
                              sampling=SamplingSettings(num_hypotheses=4))
    pooled.initialize_from_trained_model_folder(str(model), [2])
    pooled.list_of_parameters = [weights, other]
    pooled.calib_heads = pooled.calib_heads * 2
    data = torch.randn(3, 1, 32, 32, generator=torch.Generator().manual_seed(0))
    one = single.predict_logits_from_preprocessed_data(data)
    two = pooled.predict_logits_from_preprocessed_data(data)
    c = 3
    epistemic_one, epistemic_two = one[c + 2], two[c + 2]
    assert float(epistemic_two.mean()) > float(epistemic_one.mean()) + 0.1
    # one fold with mirroring: its mirrored passes are averaged into its p_f first, never counted as disagreement
    # (the definition); before, the pooled per-pass entropies left their Jensen gap in the epistemic map
    mirrored = EnTrustPredictor(device=torch.device("cpu"), allow_tqdm=False, use_mirroring=True,
                                sampling=SamplingSettings(num_hypotheses=4))
    mirrored.initialize_from_trained_model_folder(str(model), [2])
    assert mirrored.allowed_mirroring_axes
    out = mirrored.predict_logits_from_preprocessed_data(data)
    assert float(out[c + 2].abs().max()) == 0.0 and float(out[c + 1].mean()) > 0.05  # epistemic 0, aleatoric not
    # CalibHead keeps the inputs it was fitted on: the pooled per-pass entropies, and the rest of the entropy (the
    # mirrorings' disagreement, a signal of error), which the exported epistemic map no longer counts
    stats = mirrored.pooled_statistics(data)
    assert float(stats["epistemic"].max()) > 1e-3 and float(stats["epistemic_map"].abs().max()) == 0.0
    # the two add up to the entropy, but where float16 rounding put the pooled per-pass entropy above it (the image's
    # corners, where the Gaussian weights are tiny) and the rest is clamped at 0
    # (a handful of voxels of 1024; their size grows with the model's sharpness, which an unseeded training varies)
    gap = (stats["aleatoric"] + stats["epistemic"] - stats["entropy"]).abs()
    assert float(gap.max()) < 5e-2 and float((gap > 1e-3).float().mean()) < 0.02
    # the mask is the argmax of the pooled mean, which now leans to the disagreeing fold's class
    assert (two[:c].argmax(0) == 2).float().mean() > (one[:c].argmax(0) == 2).float().mean()
    # with hypotheses: fold-major, K per fold; the same pooled maps; fold 1's hypotheses lean to class 2
    pooled.save_hypotheses = True
    pooled._wrap_network()
    three, hyps = pooled.predict_case(data)
    # same maps (the tolerances below date from when the run without hypotheses went through nnU-Net's fold loop,
    # whose half-precision sum could flip one hypothesis' reading of an expert exactly at its threshold, one voxel in
    # thousands; both runs use our loop now). Compared as probabilities: the first C channels are LOG
    # probabilities, where such a flip of a small probability (1e-3 -> 6e-3) reads as 1.8
    as_probs = lambda out: torch.cat([out[:c].exp(), out[c:]])  # noqa: E731
    diff = (as_probs(three) - as_probs(two)).abs()
    # the class probabilities carry the calibrated P(error) as their top label's confidence, so where the two
    # folds' pooled mean is a near-tie (this 'fold' was built to disagree) the same rounding can flip the top
    # label and move that confidence between two classes: rare, and the only place a large difference may be
    same_label = three[:c].argmax(0) == two[:c].argmax(0)
    assert float((~same_label).float().mean()) < 1e-3
    # the class calibration sharpens the pooled mean (this tiny model: T ~ 0.2), which magnifies that rounding about
    # 1/T times in the mask's confidence, a CalibHead input, and so in P(error) and the top label's probability
    # (measured: up to 0.004-0.014 at <= 0.5 % of the voxels, against 5e-4 when CalibHead read the raw mean's max);
    # the other maps stay within 1e-3
    assert float((diff > 2e-2).float().mean()) < 1e-3 and float(diff[:, same_label].max()) < 0.3
    assert float(diff.mean()) < 1e-3 and float(diff[c + 1:].max()) < 5e-3
    assert hyps.shape == (8, 1, 32, 32) and hyps.dtype == torch.uint8  # fold-major, (F*K, *s)
    assert (hyps[4:] == 2).float().mean() > (hyps[:4] == 2).float().mean()


def _fold2_predictor(trained_entrust, monkeypatch) -> EnTrustPredictor:
    """The trained tiny model's fold 2 in an EnTrustPredictor (K = 2, no probe, no mirroring), nnU-Net's roots set."""
    env, _, model = trained_entrust
    use_nnunet_roots(env, monkeypatch, "nnUNet_extTrainer")
    predictor = EnTrustPredictor(device=torch.device("cpu"), allow_tqdm=False, use_mirroring=False,
                                 sampling=SamplingSettings(num_hypotheses=2, probe=False))
    predictor.initialize_from_trained_model_folder(str(model), [2])
    return predictor


def test_saved_class_probabilities_carry_p_error_and_keep_the_mask(trained_entrust, monkeypatch):
    """The class channels: the top label (the mask's) gets 1 - P(error) (the exported total map, capped below the
    point where another class would overtake it), the other classes share the rest in the proportions of the
    calibrated softmax(log mean / T + g b), T and b the folds' fitted CalibHead temperatures and conflict biases
    averaged, g the gate of the pooled conflict; they sum to 1 and their argmax is the calibrated one (the mask)."""
    predictor = _fold2_predictor(trained_entrust, monkeypatch)
    fitted = float(predictor.list_of_parameters[0]["calib.temperature"])
    assert fitted != 1.0 and predictor.class_temperature() == pytest.approx(fitted)  # fitted at the end of training
    bias = predictor.list_of_parameters[0]["calib.conflict_bias"]
    # one fold's trainer fits T only (its few conflicting structures cannot tell a coin's chance); entrust calibrate b
    assert bias.shape == (3,) and not bias.any() and torch.equal(predictor.class_conflict_bias(), bias.float())
    data = torch.randn(3, 1, 32, 32)
    stats = predictor.pooled_statistics(data)
    mean, gate = stats["mean"], stats["gate"]
    torch.testing.assert_close(gate, (2 * stats["conflict"]).clamp(0, 1))
    for t, b in ((0.5, (0.0, 0.0, 0.0)), (2.0, (0.0, 2.0, -1.0))):
        for head in predictor.calib_heads:
            head.temperature.fill_(t)
            head.conflict_bias.copy_(torch.tensor(b))
        out = predictor.predict_case(data)[0]
        probs, total = torch.softmax(out[:3], 0), out[3]
        torch.testing.assert_close(probs.sum(0), torch.ones_like(probs[0]))
        calibrated = torch.softmax(mean.clamp_min(1e-4).log() / t + gate[None] * torch.tensor(b).view(3, 1, 1, 1), 0)
        assert torch.equal(probs.argmax(0), calibrated.argmax(0))
        assert any(b) == bool((calibrated.argmax(0) != mean.argmax(0)).any())  # the biases move the mask somewhere
        top = calibrated.argmax(0, keepdim=True)
        free = total < 0.45  # below the cap (1 / (1 + r) >= 0.5 with three classes)
        assert free.sum() > 50  # (the input is noise: a tiny model is unsure of much of it)
        torch.testing.assert_close(1 - probs.amax(0)[free], total[free], atol=1e-4, rtol=0)
        assert (1 - probs.amax(0) <= total + 1e-4).all()  # capped, never above the map
        rest, tempered_rest = probs.scatter(0, top, 0.0), calibrated.scatter(0, top, 0.0)
        shares, tempered_shares = rest / rest.sum(0), tempered_rest / tempered_rest.sum(0)
        # where every written probability is above the floor of the logits handed to nnU-Net (1e-4)
        sel = (total > 0.02) & (tempered_shares.scatter(0, top, 1.0).amin(0) > 0.05)
        assert sel.sum() > 5
        torch.testing.assert_close(shares[:, sel], tempered_shares[:, sel], atol=2e-3, rtol=0)


def test_case_level_maps_slab_by_slab_equal_the_whole(trained_entrust, monkeypatch):
    """predict_case evaluates CalibHead and the class probabilities in slabs of voxels: any slab size gives the
    same output (2D: slabs along H)."""
    import entrust_nnunet.nnunet.predictor as predictor_module

    predictor = _fold2_predictor(trained_entrust, monkeypatch)
    data = torch.randn(3, 1, 32, 32)
    whole = predictor.predict_case(data)[0]
    slabs = []
    monkeypatch.setattr(predictor_module, "CASE_SLAB_VOXELS", 100)  # 3 rows of 32 voxels per slab: 11 slabs
    original = predictor_module.case_slabs
    monkeypatch.setattr(predictor_module, "case_slabs", lambda *a: (slabs.append(w) or (p, w) for p, w in original(*a)))
    sliced = predictor.predict_case(data)[0]
    assert len(slabs) == 11 and slabs[0] == (slice(None), slice(0, 3))
    torch.testing.assert_close(sliced, whole)


def _case_copy(raw, tmp_path):
    src = tmp_path / "in"
    shutil.copytree(raw / "imagesTs", src)
    return src


@pytest.mark.parametrize("problem", ["missing_channel", "extra_channel", "geometry", "same_folder",
                                     "unwritable_output", "corrupt_checkpoint", "no_model"])
def test_bad_input_one_line_error_and_nothing_written(trained_entrust, tmp_path, problem):
    env, name, model = trained_entrust
    raw = Path(env["nnUNet_raw"]) / name
    src = _case_copy(raw, tmp_path)
    out = tmp_path / "out"
    args = ["-d", str(SESSION_DATASET_ID), "-c", "2d", "-tr", "nnUNetTrainerEnTrust_tinyCPU", "-p", "nnUNetPlans",
            "-f", "2"]
    culprit = None
    if problem == "missing_channel":
        culprit = src / "test_001_0001.nii.gz"
        culprit.unlink()
    elif problem == "extra_channel":
        culprit = src / "test_000_0003.nii.gz"
        shutil.copy(src / "test_000_0000.nii.gz", culprit)
    elif problem == "geometry":
        culprit = src / "test_000_0002.nii.gz"
        img = sitk.ReadImage(str(culprit))
        img.SetSpacing([s * 2 for s in img.GetSpacing()])
        sitk.WriteImage(img, str(culprit))
    elif problem == "same_folder":
        out = culprit = src
    elif problem == "unwritable_output":
        blocker = tmp_path / "a_file"
        blocker.write_text("not a folder")
        out = culprit = blocker / "out"
    elif problem == "corrupt_checkpoint":
        fake = tmp_path / "model"
        shutil.copytree(model, fake, ignore=shutil.ignore_patterns("validation", "*.png", "*.txt"))
        culprit = fake / "fold_2" / "checkpoint_final.pth"
        culprit.write_bytes(b"\x80\x04garbage")
        args = ["-m", str(fake), "-f", "2"]
    elif problem == "no_model":
        args = ["-m", str(tmp_path / "nothing"), "-f", "0"]
        culprit = tmp_path / "nothing"
    before = {p.name: p.read_bytes() for p in src.iterdir()}
    r = _entrust(env, "predict", "-i", str(src), "-o", str(out), *args)
    lines = r.stderr.strip().splitlines()
    assert r.returncode == 2 and lines and lines[-1].startswith("entrust: error: "), r.stderr[-2000:]
    assert str(culprit) in lines[-1], lines[-1]
    assert {p.name: p.read_bytes() for p in src.iterdir()} == before  # inputs untouched
    if out != src and out.exists():
        assert not list(out.glob("*.nii.gz")) and not list(out.rglob(".tmp-*"))


def test_demo_end_to_end_at_tiny_size(tmp_path):
    """`entrust demo` at a tiny size: every step runs, every artefact exists, a rerun reuses finished steps."""
    import os

    env = {**os.environ, "nnUNet_def_n_proc": "1", "nnUNet_n_proc_DA": "1"}
    args = ["demo", "--dataset-dir", str(tmp_path / "demo"), "-n", "6", "--num-test", "2", "--size", "32",
            "--trainer", "nnUNetTrainerEnTrust_tinyCPU"]
    r = _entrust(env, *args)
    assert r.returncode == 0, r.stdout[-3000:] + r.stderr[-3000:]
    root = tmp_path / "demo"
    summary = json.loads((root / "summary.json").read_text())
    assert len(summary["metric_per_case"]) == 2
    assert (root / "report" / "index.html").exists() and list((root / "report").glob("*.png"))
    assert len(list((root / "predictions" / "uncertainty").glob("*.nii.gz"))) == 2 * len(MAP_NAMES)
    assert "headline" in r.stdout and "report" in r.stdout
    checkpoint = next(root.glob("nnUNet_results/*/*/fold_0/checkpoint_final.pth"))
    stamp = checkpoint.stat().st_mtime
    r = _entrust(env, *args)  # finished steps are reused: no retraining
    assert r.returncode == 0 and checkpoint.stat().st_mtime == stamp
