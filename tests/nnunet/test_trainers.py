"""The stock nnU-Net commands find, train, resume and load our trainers (subprocesses, CPU)."""
import json
import os
import re
import signal
import subprocess
import time
from pathlib import Path

import numpy as np
import pytest
import SimpleITK as sitk
import torch
from conftest import SESSION_DATASET_ID, nnunet_bin, use_nnunet_roots

ID = str(SESSION_DATASET_ID)


def _run(env, *args, timeout=600):
    r = subprocess.run([nnunet_bin(args[0]), *args[1:]], env=env, capture_output=True, encoding="utf-8", errors="replace", timeout=timeout)
    assert r.returncode == 0, f"{args}\n{r.stdout[-3000:]}\n{r.stderr[-3000:]}"
    return r


def _load(path):
    # nnU-Net's checkpoints hold numpy scalars in their logging dict; we trust files our tests just wrote
    return torch.load(path, map_location="cpu", weights_only=False)


def test_entrust_env_prints_the_plugin_folder(planned_phantoms):
    env, _ = planned_phantoms
    r = subprocess.run([nnunet_bin("entrust"), "env"], env=env, capture_output=True, encoding="utf-8", errors="replace")
    line = [ln for ln in r.stdout.splitlines() if ln.startswith("export nnUNet_extTrainer=")][0]
    folders = line.split("=", 1)[1].strip("'").split(":")
    assert any((Path(f) / "nnUNetTrainerEnTrust.py").exists() for f in folders)


def test_planner_names_entrust_network(planned_phantoms):
    env, name = planned_phantoms
    plans = json.loads((Path(env["nnUNet_preprocessed"]) / name / "nnUNetEnTrustPlans.json").read_text())
    cfg = plans["configurations"]["2d"]
    assert cfg["architecture"]["network_class_name"] == "entrust_nnunet.model.network.EnTrustUNet"
    assert cfg["data_identifier"] == "nnUNetPlans_2d"  # shares nnUNetPlans' preprocessed data


def test_stock_train_discovers_placeholder_and_old_plans_still_train_and_predict(planned_phantoms, tmp_path):
    """A test-only plug-in folder on nnUNet_extTrainer is searched; that trainer (exactly nnUNetTrainer) builds
    the network a plans file of the old layout names by its old dotted path, trains it, and predicts with it."""
    env, name = planned_phantoms
    r = _run(env, "nnUNetv2_train", ID, "2d", "0", "-tr", "nnUNetTrainerEnTrustPlaceholder_tinyCPU",
             "-p", "nnUNetEnTrustPlansV0", "-device", "cpu")
    out = Path(env["nnUNet_results"]) / name / "nnUNetTrainerEnTrustPlaceholder_tinyCPU__nnUNetEnTrustPlansV0__2d"
    assert (out / "fold_0" / "checkpoint_final.pth").exists() and "Searching in" in r.stdout
    keys = _load(out / "fold_0" / "checkpoint_final.pth")["network_weights"].keys()
    assert any(k.startswith("segdiff.") for k in keys)  # EnTrustUNet, reached through the old path
    pred = tmp_path / "pred"
    _run(env, "nnUNetv2_predict", "-i", str(Path(env["nnUNet_raw"]) / name / "imagesTs"), "-o", str(pred),
         "-d", ID, "-c", "2d", "-tr", "nnUNetTrainerEnTrustPlaceholder_tinyCPU", "-p", "nnUNetEnTrustPlansV0",
         "-f", "0", "-device", "cpu", "--disable_tta", "-npp", "1", "-nps", "1")
    assert sorted(p.name for p in pred.glob("*.nii.gz")) == ["test_000.nii.gz", "test_001.nii.gz"]


def test_entrust_trains_on_default_plans(trained_entrust):
    """-p nnUNetPlans (the default) names PlainConvUNet; our trainer still builds and trains EnTrustUNet
    (the session's trained model is this training: stock nnUNetv2_train without -p)."""
    env, name, model = trained_entrust
    fold = model / "fold_2"
    ckpt = _load(fold / "checkpoint_final.pth")
    keys = ckpt["network_weights"].keys()
    assert any(k.startswith("encoders.encoder.stages.") for k in keys) and any(k.startswith("segdiff.") for k in keys)
    assert float(ckpt["network_weights"]["calib.fitted"]) == 1.0
    # the class probabilities' temperature, fitted beside CalibHead (on the validation fold) and logged
    t = float(ckpt["network_weights"]["calib.temperature"])
    assert 0.01 <= t <= 100 and t != 1.0  # fitted within fit_temperature's range, not left at its default
    log = next(fold.glob("training_log_*.txt")).read_text(encoding="utf-8")
    fit = re.search(r"class-probability temperature ([\d.]+) \(NLL ([\d.]+) -> ([\d.]+)", log)
    assert fit and float(fit.group(1)) == pytest.approx(t, abs=1e-3) and float(fit.group(3)) <= float(fit.group(2))
    assert (fold / "progress.png").exists() and (fold / "progress_entrust.png").exists()
    assert json.loads((fold / "validation" / "summary.json").read_text())["foreground_mean"]["Dice"] >= 0


def test_interrupted_training_resumes_with_c_and_predict_loads(planned_phantoms, tmp_path):
    env, name = planned_phantoms
    fold = Path(env["nnUNet_results"]) / name / "nnUNetTrainerEnTrust_tinyCPU__nnUNetEnTrustPlans__2d" / "fold_0"
    cmd = [nnunet_bin("nnUNetv2_train"), ID, "2d", "0", "-tr", "nnUNetTrainerEnTrust_tinyCPU",
           "-p", "nnUNetEnTrustPlans", "-device", "cpu"]
    # own session: killing the group also ends nnU-Net's data-augmentation workers, as Ctrl-C would
    proc = subprocess.Popen(cmd, env=env, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL, start_new_session=True)
    deadline = time.time() + 300
    interrupted = None
    while interrupted is None and time.time() < deadline and proc.poll() is None:
        if not (fold / "checkpoint_latest.pth").exists():
            time.sleep(0.05)
            continue
        # freeze the training so that the file cannot change, then read it; nnU-Net rewrites checkpoint_latest
        # every epoch of this schedule (torch.save in place), so a frozen write is let finish and read again
        # (a file caught mid-write fails torch's reader with RuntimeError, EOFError or, seen once in CI, OSError EINVAL)
        os.killpg(proc.pid, signal.SIGSTOP)
        try:
            interrupted = _load(fold / "checkpoint_latest.pth")
        except (RuntimeError, EOFError, OSError):
            os.killpg(proc.pid, signal.SIGCONT)
            time.sleep(0.05)
    os.killpg(proc.pid, signal.SIGKILL)
    proc.wait()
    assert not (fold / "checkpoint_final.pth").exists(), "training finished before it could be interrupted"
    assert interrupted is not None, "no readable checkpoint_latest.pth before the training ended"
    assert _load(fold / "checkpoint_latest.pth")["current_epoch"] == interrupted["current_epoch"]
    done_before = interrupted["current_epoch"]
    assert 1 <= done_before < 4

    _run(env, *[Path(c).name if i == 0 else c for i, c in enumerate(cmd)], "--c")
    final = _load(fold / "checkpoint_final.pth")
    log = final["logging"]
    assert final["current_epoch"] == 4 and len(log["train_losses"]) == 4 and len(log["entrust_generative"]) == 4
    # the resumed run continued the same curve: the epochs before the interruption are kept verbatim
    np.testing.assert_allclose(log["train_losses"][:done_before], interrupted["logging"]["train_losses"][:done_before])
    assert len(list(fold.glob("training_log_*.txt"))) >= 1

    # the stock predictor loads our checkpoint and writes masks with the input geometry
    raw = Path(env["nnUNet_raw"]) / name
    out = tmp_path / "pred"
    _run(env, "nnUNetv2_predict", "-i", str(raw / "imagesTs"), "-o", str(out), "-d", ID, "-c", "2d",
         "-tr", "nnUNetTrainerEnTrust_tinyCPU", "-p", "nnUNetEnTrustPlans", "-f", "0", "-device", "cpu",
         "--disable_tta", "-npp", "1", "-nps", "1")
    for case in ("test_000", "test_001"):
        ref = sitk.ReadImage(str(raw / "imagesTs" / f"{case}_0000.nii.gz"))
        pred = sitk.ReadImage(str(out / f"{case}.nii.gz"))
        assert pred.GetSize() == ref.GetSize()
        np.testing.assert_allclose(pred.GetSpacing(), ref.GetSpacing(), rtol=1e-6)
        np.testing.assert_allclose(pred.GetOrigin(), ref.GetOrigin(), atol=1e-5)
        np.testing.assert_allclose(pred.GetDirection(), ref.GetDirection(), atol=1e-6)
        assert set(np.unique(sitk.GetArrayFromImage(pred))) <= {0, 1, 2}


def _cascade_plans(env, name) -> None:
    """``nnUNetCascadePlans``: nnUNetPlans plus a 'lowres' stage and a 'cascade' stage after it, both on the 2d
    configuration's preprocessed data (nnU-Net's planner makes a 3d_lowres only for large images; a plans file
    may name any configuration as another's previous stage)."""
    folder = Path(env["nnUNet_preprocessed"]) / name
    plans = json.loads((folder / "nnUNetPlans.json").read_text())
    plans["plans_name"] = "nnUNetCascadePlans"
    plans["configurations"]["lowres"] = {"inherits_from": "2d", "next_stage": "cascade"}
    plans["configurations"]["cascade"] = {"inherits_from": "2d", "previous_stage": "lowres"}
    (folder / "nnUNetCascadePlans.json").write_text(json.dumps(plans, indent=2))


def _write_previous_stage(env, name, trainer: str) -> Path:
    """The low-resolution stage's 'predictions' of every case (here: the reference segmentations, written as
    nnU-Net's validation writes predicted_next_stage)."""
    from nnunetv2.training.dataloading.nnunet_dataset import infer_dataset_class

    data = Path(env["nnUNet_preprocessed"]) / name / "nnUNetPlans_2d"
    out = Path(env["nnUNet_results"]) / name / f"{trainer}__nnUNetCascadePlans__lowres" / "predicted_next_stage" / "cascade"
    out.mkdir(parents=True)
    dataset_class = infer_dataset_class(str(data))
    dataset = dataset_class(str(data))
    for key in dataset.identifiers:
        seg = np.asarray(dataset.load_case(key)[1][:])[0]
        dataset_class.save_seg(np.clip(seg, 0, None).astype(np.uint8), str(out / key))
    return out


def test_cascade_stage_takes_the_previous_segmentation_as_a_prior(planned_phantoms, tmp_path):
    """Stock nnUNetv2_train of a cascade stage: without the low-resolution predictions one line of ours names the
    folder; with them it trains, the one-hot prior goes beside the modality encoders (not as modalities), and
    validation, calibration and the validation maps run on image + prior."""
    env, name = planned_phantoms
    _cascade_plans(env, name)
    trainer = "nnUNetTrainerEnTrust_1epochCPU"
    args = ["nnUNetv2_train", ID, "cascade", "0", "-tr", trainer, "-p", "nnUNetCascadePlans", "-device", "cpu"]
    r = subprocess.run([nnunet_bin(args[0]), *args[1:]], env=env, capture_output=True, encoding="utf-8",
                       errors="replace", timeout=600)
    assert r.returncode != 0
    assert "predicted_next_stage" in r.stderr and "predictions of 8 case(s) are missing" in r.stderr
    _write_previous_stage(env, name, trainer)
    _run(env, *args, timeout=900)
    fold = Path(env["nnUNet_results"]) / name / f"{trainer}__nnUNetCascadePlans__cascade" / "fold_0"
    weights = _load(fold / "checkpoint_final.pth")["network_weights"]
    dataset = json.loads((Path(env["nnUNet_raw"]) / name / "dataset.json").read_text())
    m, n_fg = len(dataset["channel_names"]), len(dataset["labels"]) - 1
    assert weights["encoders.encoder.stages.0.0.convs.0.conv.weight"].shape[0] % m == 0
    assert weights["experts.weight"].shape[0] == m * (n_fg + 1)  # one expert per modality, none for the prior
    assert weights["prior.0.weight"].shape[1] == n_fg
    assert float(weights["calib.fitted"]) == 1.0
    assert len(list((fold / "validation" / "uncertainty").glob("*"))) > 0
    _entrust_predict_cascade(env, name, trainer, tmp_path)


def _entrust_predict_cascade(env, name, trainer, tmp_path):
    """entrust predict of the cascade stage takes the previous stage's masks as nnUNetv2_predict does (here the
    reference labels stand in for them); without them, or with one missing, one line names the flag / file."""
    raw = Path(env["nnUNet_raw"]) / name
    inp, prev, out = tmp_path / "in", tmp_path / "prev", tmp_path / "out"
    inp.mkdir(), prev.mkdir()
    for case in ("case_000", "case_001"):
        for f in raw.glob(f"imagesTr/{case}_*.nii.gz"):
            (inp / f.name).symlink_to(f)
    (prev / "case_000.nii.gz").symlink_to(raw / "labelsTr" / "case_000.nii.gz")
    from entrust_nnunet.data.io import InputError
    from entrust_nnunet.predict import predict_folder

    model = Path(env["nnUNet_results"]) / name / f"{trainer}__nnUNetCascadePlans__cascade"
    for folder, expected in ((None, "give -prev_stage_predictions FOLDER"),
                             (prev, f"{prev / 'case_001.nii.gz'}: the previous stage's mask of case case_001")):
        with pytest.raises(InputError, match=re.escape(expected)):  # the CLI prints it as one line, exit 2
            predict_folder(inp, out, model, folds=[0], prev_stage_predictions=folder)
        assert not out.exists()
    # a mask of another geometry, a corrupt one: one line naming the file (headers are read, not the voxels)
    sitk.WriteImage(sitk.Image([16, 16], sitk.sitkUInt8), str(prev / "case_001.nii.gz"))
    with pytest.raises(InputError, match=re.escape(f"{prev / 'case_001.nii.gz'}: geometry differs")):
        predict_folder(inp, out, model, folds=[0], prev_stage_predictions=prev)
    (prev / "case_001.nii.gz").write_bytes(b"not a nifti")
    with pytest.raises(InputError, match=re.escape(f"{prev / 'case_001.nii.gz'}: unreadable or corrupt image")):
        predict_folder(inp, out, model, folds=[0], prev_stage_predictions=prev)
    assert not out.exists()
    (prev / "case_001.nii.gz").unlink()
    (prev / "case_001.nii.gz").symlink_to(raw / "labelsTr" / "case_001.nii.gz")
    _run(env, "entrust", "predict", "-i", str(inp), "-o", str(out), "-d", ID, "-c", "cascade", "-tr", trainer,
         "-p", "nnUNetCascadePlans", "-f", "0", "--num-hypotheses", "2", "-npp", "0", "-nps", "1",
         "-prev_stage_predictions", str(prev))
    for case in ("case_000", "case_001"):
        image = sitk.ReadImage(str(raw / "imagesTr" / f"{case}_0000.nii.gz"))
        mask = sitk.ReadImage(str(out / f"{case}.nii.gz"))
        assert mask.GetSize() == image.GetSize() and mask.GetSpacing() == image.GetSpacing()
        total = sitk.GetArrayFromImage(sitk.ReadImage(str(out / "uncertainty" / f"{case}_total.nii.gz")))
        assert total.shape == sitk.GetArrayFromImage(image).shape and 0 <= total.min() and total.max() <= 1


def _cascade_plans_manager(num_channels: int = 4):
    """A PlansManager with 3d_lowres and 3d_cascade_fullres as nnU-Net's planner writes them (no dataset needed)."""
    from nnunetv2.utilities.plans_handling.plans_handler import PlansManager

    from conftest import arch_kwargs

    kwargs = {k: (f"{v.__module__}.{v.__name__}" if isinstance(v, type) else v) for k, v in arch_kwargs(3).items()}
    architecture = {"network_class_name": "dynamic_network_architectures.architectures.unet.PlainConvUNet",
                    "arch_kwargs": kwargs, "_kw_requires_import": ["conv_op", "norm_op", "nonlin"]}
    fullres = {"data_identifier": "nnUNetPlans_3d_fullres", "patch_size": [16, 16, 16], "batch_size": 2,
               "spacing": [1, 1, 1], "architecture": architecture}
    return PlansManager({
        "dataset_name": "Dataset999_X", "plans_name": "nnUNetPlans",
        "foreground_intensity_properties_per_channel": {str(c): {} for c in range(num_channels)},
        "configurations": {"3d_fullres": fullres,
                           "3d_lowres": {"inherits_from": "3d_fullres", "data_identifier": "nnUNetPlans_3d_lowres",
                                         "next_stage": "3d_cascade_fullres"},
                           "3d_cascade_fullres": {"inherits_from": "3d_fullres", "previous_stage": "3d_lowres"}}})


def test_cascade_network_counts_modalities_from_the_plans():
    """As nnU-Net builds it (determine_num_input_channels: 4 modalities + 3 foreground labels = 7 inputs), the
    cascade stage's network has 4 modality encoders and a 3-channel prior; 3d_lowres is an ordinary 3D stage."""
    from nnunetv2.utilities.label_handling.label_handling import determine_num_input_channels

    from entrust_nnunet.nnunet.trainers import nnUNetTrainerEnTrust

    pm = _cascade_plans_manager(4)
    dataset_json = {"channel_names": {str(c): f"m{c}" for c in range(4)},
                    "labels": {"background": 0, "a": 1, "b": 2, "c": 3}, "file_ending": ".nii.gz"}
    built = {}
    for config in ("3d_lowres", "3d_cascade_fullres"):
        cm = pm.get_configuration(config)
        c_in = determine_num_input_channels(pm, cm, dataset_json)
        built[config] = (c_in, nnUNetTrainerEnTrust.build_network_architecture(pm, cm, c_in, 4, False).eval())
    (c_low, low), (c_cas, cas) = built["3d_lowres"], built["3d_cascade_fullres"]
    assert (c_low, low.num_modalities, low.prior_channels) == (4, 4, 0)
    assert (c_cas, cas.num_modalities, cas.prior_channels) == (7, 4, 3)
    assert cas.experts.out_channels == low.experts.out_channels == 4 * 4
    x = torch.randn(1, 4, 16, 16, 16)
    with torch.no_grad():
        assert low(x).shape == (1, 4, 16, 16, 16)
        prior = torch.zeros(1, 3, 16, 16, 16)
        assert cas(torch.cat([x, prior], 1)).shape == (1, 4, 16, 16, 16)


def test_missing_previous_stage_is_one_line_naming_the_folder(tmp_path):
    from entrust_nnunet.nnunet.trainers import check_previous_stage

    folder = tmp_path / "predicted_next_stage" / "3d_cascade_fullres"
    with pytest.raises(FileNotFoundError, match=f"{folder}: the low-resolution stage's predictions of 2 case") as e:
        check_previous_stage(str(folder), ["a", "b"])
    assert "\n" not in str(e.value)
    folder.mkdir(parents=True)
    (folder / "a.b2nd").write_bytes(b"")
    with pytest.raises(FileNotFoundError, match="1 case.*first: b"):
        check_previous_stage(str(folder), ["a", "b"])
    (folder / "b.b2nd").write_bytes(b"")
    check_previous_stage(str(folder), ["a", "b"])


def _cascade_setup(tmp_path, monkeypatch, previous: str | None = "nnUNetTrainerEnTrust"):
    """(make(cls) -> an uninitialised 3d_cascade_fullres trainer of ``cls``, a random batch of 4 image channels + 3
    one-hot prior channels with deep-supervision targets), with the previous stage's predictions of trainer
    ``previous`` (None: none). No data loading: the preprocessed folder holds one empty file (the trainer infers
    nnU-Net's dataset class from its ending)."""
    from torch.nn import functional as F

    pm = _cascade_plans_manager(4)
    monkeypatch.setenv("nnUNet_preprocessed", str(tmp_path / "pre"))  # nnU-Net reads its paths when used
    monkeypatch.setenv("nnUNet_results", str(tmp_path / "res"))
    data = tmp_path / "pre" / "Dataset999_X" / "nnUNetPlans_3d_fullres"
    data.mkdir(parents=True)
    (data / "case.b2nd").write_bytes(b"")
    if previous:
        _previous_stage(tmp_path, previous)
    plans = {**pm.plans, "continue_training": False}
    plans["configurations"]["3d_fullres"].update(batch_dice=False, normalization_schemes=["ZScoreNormalization"] * 4,
                                                 use_mask_for_norm=[False] * 4)
    dataset_json = {"channel_names": {str(c): f"m{c}" for c in range(4)},
                    "labels": {"background": 0, "a": 1, "b": 2, "c": 3}, "file_ending": ".nii.gz"}
    torch.manual_seed(0)
    seg = torch.randint(0, 4, (2, 1, 16, 16, 16)).float()
    prior = F.one_hot(seg[:, 0].long(), 4).movedim(-1, 1)[:, 1:].float()
    batch = {"data": torch.cat([torch.randn(2, 4, 16, 16, 16) + seg, prior], 1),
             "target": [F.interpolate(seg, scale_factor=1 / 2 ** i, mode="nearest").to(torch.int16) for i in range(2)]}
    return (lambda cls: cls(dict(plans), "3d_cascade_fullres", 0, dataset_json, torch.device("cpu"))), batch


def _previous_stage(tmp_path, trainer: str):
    prev = tmp_path / "res" / "Dataset999_X" / f"{trainer}__nnUNetPlans__3d_lowres" / "predicted_next_stage"
    (prev / "3d_cascade_fullres").mkdir(parents=True)
    (prev / "3d_cascade_fullres" / "case.b2nd").write_bytes(b"")


def test_cascade_trainer_steps_on_image_plus_prior(tmp_path, monkeypatch):
    """nnU-Net's own initialize and train_step of a 3d_cascade_fullres stage: without the previous stage's
    predictions, one line naming the folder; with them, 4 modality encoders + a 3-channel prior, and the loss
    falls on a repeated batch."""
    from entrust_nnunet.nnunet.trainers import nnUNetTrainerEnTrust

    make, batch = _cascade_setup(tmp_path, monkeypatch, previous=None)
    with pytest.raises(FileNotFoundError, match="predicted_next_stage/3d_cascade_fullres: the low-resolution stage"):
        make(nnUNetTrainerEnTrust).initialize()
    _previous_stage(tmp_path, "nnUNetTrainerEnTrust")
    t = make(nnUNetTrainerEnTrust)
    t.initialize()
    assert (t.num_input_channels, t.network.num_modalities, t.network.prior_channels) == (7, 4, 3)
    losses = [float(t.train_step(batch)["loss"]) for _ in range(4)]
    assert losses[-1] < losses[0]


def test_crossmodal_trainer_steps_without_its_predictors_built_on_the_modalities_not_the_prior(tmp_path, monkeypatch):
    """nnU-Net's own initialize and train_step of the cross-modal variant (3D cascade stage: 4 modalities and a
    3-channel prior): one predictor per modality from the other three, the prior left out; training lowers the loss
    and leaves the predictors alone (frozen, no loss term: they are fitted after training)."""
    from entrust_nnunet.nnunet.trainers import nnUNetTrainerEnTrustCrossModal

    make, batch = _cascade_setup(tmp_path, monkeypatch, previous="nnUNetTrainerEnTrustCrossModal")
    t = make(nnUNetTrainerEnTrustCrossModal)
    t.initialize()
    assert t.network.crossmodal.net[0].in_channels == 4 * 3 and t.network.crossmodal.num_modalities == 4
    before = {k: v.clone() for k, v in t.network.crossmodal.state_dict().items()}
    losses = [float(t.train_step(batch)["loss"]) for _ in range(4)]
    assert losses[-1] < losses[0] and "crossmodal" not in t.loss.history
    assert all(torch.equal(v, t.network.crossmodal.state_dict()[k]) for k, v in before.items())
    assert not any(p.requires_grad for p in t.network.crossmodal.parameters())


def test_crossmodal_predictors_are_fitted_on_the_training_cases_as_preprocessed(planned_phantoms, monkeypatch):
    """After training the predictors are fitted on patches of the training cases exactly as preprocessed (no
    augmentation; at most mirrored), never the validation fold's, before the calibration that reads their map and
    only once; their NLL falls; a training start unfits them."""
    from conftest import initialized_trainer

    from entrust_nnunet.nnunet.trainers import nnUNetTrainerEnTrust
    from entrust_nnunet.nnunet.variants import nnUNetTrainerEnTrustCrossModal_tinyCPU

    torch.manual_seed(0)
    t = initialized_trainer(nnUNetTrainerEnTrustCrossModal_tinyCPU, planned_phantoms, monkeypatch)
    t.inference_allowed_mirroring_axes = (0, 1)
    tr_keys, val_keys = t.do_split()
    cases = {key: data[:3].flatten(1) for key, data, _, _ in t._preprocessed_cases(sorted(tr_keys + val_keys))}
    batches = t._unaugmented_images()
    seen = set()
    for _ in range(10):
        x = next(batches)
        assert x.shape == (t.batch_size, 3, *t.configuration_manager.patch_size)
        for sample in x.flatten(2):
            # a crop (nnU-Net's bbox, zero-padded where it leaves the case), perhaps mirrored: each channel's values
            # are the case's own, exactly (intensity augmentation would change them)
            match = [k for k, d in cases.items() if all(torch.isin(v[v != 0], c).all() for v, c in zip(sample, d))]
            assert len(match) == 1, "a patch that is not one case as preprocessed"
            seen.add(match[0])
    assert seen and seen <= set(tr_keys)
    # at the end of training nnU-Net's on_train_end calls fit_calibration: the predictors are fitted first, once
    calibrated_with = []
    monkeypatch.setattr(nnUNetTrainerEnTrust, "fit_calibration",
                        lambda self: calibrated_with.append(float(self.network.crossmodal.fitted)))
    assert float(t.network.crossmodal.fitted) == 0
    t.fit_calibration()
    t.fit_calibration()
    assert calibrated_with == [1.0, 1.0]
    fits = re.findall(r"without augmentation: .* NLL (-?[\d.]+) -> (-?[\d.]+)", Path(t.log_file).read_text())
    assert len(fits) == 1 and float(fits[0][1]) < float(fits[0][0])
    t.own_output_space_unfitted()  # a training start (-pretrained_weights carries another model's fit)
    assert float(t.network.crossmodal.fitted) == 0


def test_validation_after_training_steps_reads_the_calibrated_probabilities(tmp_path, monkeypatch):
    """The parts EnTrust's loss needs are kept only inside nnU-Net's train and validation steps: afterwards the
    network holds none, and nnU-Net's end-of-training validation (eval mode, deep supervision off) gets the logits of
    the calibrated class probabilities, as a network that never trained returns them, not the head's logits."""
    import copy

    from entrust_nnunet.nnunet.trainers import nnUNetTrainerEnTrust

    make, batch = _cascade_setup(tmp_path, monkeypatch)
    t = make(nnUNetTrainerEnTrust)
    t.initialize()
    t.train_step(batch)
    t.validation_step(batch)
    net = t.network
    assert not net.cache_parts and net.last_parts is None
    t.set_deep_supervision_enabled(False)
    net.eval()
    fresh = copy.deepcopy(net)
    fresh.cache_parts = False
    x = batch["data"][:1]
    with torch.no_grad():
        out, expected = net(x), fresh(x)
        head = net._trunk(x, keep_all=False, mask=net._mask(x))["logits"]
    torch.testing.assert_close(out, expected)
    assert (out - head).abs().max() > 1e-3
    assert net.last_parts is None


def test_modality_dropout_of_a_cascade_stage_masks_the_modalities_not_the_prior(tmp_path, monkeypatch):
    """With the previous stage's prior after the 4 image channels, each step's modality mask has 4 columns (the
    network keeps the prior whatever is dropped)."""
    from entrust_nnunet.nnunet.trainers import nnUNetTrainerEnTrustModDrop

    make, batch = _cascade_setup(tmp_path, monkeypatch, previous="nnUNetTrainerEnTrustModDrop")
    t = make(nnUNetTrainerEnTrustModDrop)
    t.initialize()
    seen = []
    t.network.register_forward_pre_hook(lambda mod, args: seen.append(mod.modality_mask))
    losses = [float(t.train_step(batch)["loss"]) for _ in range(4)]
    assert all(v == v for v in losses)
    assert all(m.shape == (2, 4) and (m.sum(1) >= 1).all() for m in seen)


def test_fold_all_holds_its_calibration_cases_out_of_training(planned_phantoms, monkeypatch):
    """Fold 'all' validates on its training cases, so CalibHead gets a seeded subset held out of training instead:
    disjoint from the training keys, together every case; a numbered fold calibrates on its validation fold."""
    from entrust_nnunet.nnunet import variants

    env, name = planned_phantoms
    use_nnunet_roots(env, monkeypatch)
    pre = Path(env["nnUNet_preprocessed"]) / name
    plans, dataset_json = (json.loads((pre / f).read_text()) for f in ("nnUNetPlans.json", "dataset.json"))
    plans["continue_training"] = False
    make = lambda fold: variants.nnUNetTrainerEnTrust_tinyCPU(dict(plans), "2d", fold, dataset_json,  # noqa: E731
                                                              torch.device("cpu"))
    t = make("all")
    train, _ = t.do_split()
    everything = set(t.dataset_class.get_identifiers(t.preprocessed_dataset_folder))
    assert t.calibration_keys and not set(train) & set(t.calibration_keys)
    assert set(train) | set(t.calibration_keys) == everything
    assert make("all").do_split()[0] == train  # seeded: the same subset every time
    numbered = make(0)
    _, val = numbered.do_split()
    assert numbered.calibration_keys == sorted(val)


def test_every_trainer_class_of_the_package_is_found_by_nnunets_search():
    """nnU-Net looks for ``-tr NAME`` only in the plug-in folder's modules (nnUNet_extTrainer): a trainer class
    that no plug-in module re-exports cannot be trained with the stock commands nor loaded for prediction."""
    import importlib
    import inspect

    from nnunetv2.training.nnUNetTrainer.nnUNetTrainer import nnUNetTrainer
    from nnunetv2.utilities.find_class_by_name import recursive_find_python_class

    from entrust_nnunet.nnunet.env import trainer_plugin_dir

    ours = {}
    for module in ("variants", "trainers", "baseline_trainers", "ablation_trainers"):
        mod = importlib.import_module(f"entrust_nnunet.nnunet.{module}")
        ours.update({name: cls for name, cls in inspect.getmembers(mod, inspect.isclass)
                     if issubclass(cls, nnUNetTrainer) and cls.__module__ == mod.__name__})
    assert "nnUNetTrainer_demo3d" in ours and len(ours) > 25
    folder = str(trainer_plugin_dir())
    missing = [name for name, cls in sorted(ours.items())
               if recursive_find_python_class(folder, name, None, base_folder=folder,
                                              cleanup_imports_from_base_folder=True) is not cls]
    assert missing == []


def test_pretrained_weights_keep_this_datasets_output_space_and_no_foreign_calibration(planned_phantoms, monkeypatch,
                                                                                       tmp_path):
    """nnU-Net's -pretrained_weights copies every matching key: another model's region flag and its fitted
    CalibHead come along. Training starts in this dataset's output space with an unfitted calibration."""
    from conftest import initialized_trainer
    from nnunetv2.run.load_pretrained_weights import load_pretrained_weights

    from entrust_nnunet.nnunet import variants
    from entrust_nnunet.nnunet.distributed import unwrap

    t = initialized_trainer(variants.nnUNetTrainerEnTrust_tinyCPU, planned_phantoms, monkeypatch)
    net = unwrap(t.network)
    source = {k: v.clone() for k, v in net.state_dict().items()}
    source["region_outputs"].fill_(1.0)  # a region dataset's model (same number of outputs)
    source["calib.fitted"].fill_(1.0)
    source["calib.temperature"].fill_(2.0)
    torch.save({"network_weights": source}, tmp_path / "pretrained.pth")
    load_pretrained_weights(t.network, str(tmp_path / "pretrained.pth"))
    assert net.regions and float(net.calib.fitted) == 1.0  # what nnU-Net's loader leaves
    t.own_output_space_unfitted()  # on_train_start
    assert not net.regions and not net.segdiff.regions
    assert float(net.calib.fitted) == 0.0 and float(net.calib.temperature) == 1.0
    assert not net.calib.conflict_bias.any()
