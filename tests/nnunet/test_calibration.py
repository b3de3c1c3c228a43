"""entrust calibrate: one low-variance calibrator on every fold's out-of-fold voxels, chosen across folds."""
import json

import numpy as np
import pytest
import torch

from entrust_nnunet.data.io import InputError
from entrust_nnunet.model.trustmap import STATISTICS
from entrust_nnunet.nnunet.calibration import (CALIBRATION_FILE, FOLD_VOXELS_FILE, calibrate_model, fit_logistic,
                                               load_calibrator, save_fold_voxels)


def test_logistic_fit_recovers_a_known_relation():
    g = torch.Generator().manual_seed(0)
    x = torch.randn(20000, 1, generator=g) * 2 + 3
    y = (torch.rand(20000, generator=g) < torch.sigmoid(1.5 * x[:, 0] - 4)).float()
    w, bce = fit_logistic(x, y)
    assert w[0] == pytest.approx(1.5, abs=0.1) and w[1] == pytest.approx(-4.0, abs=0.3) and 0 < bce < 0.7


def _fold_voxels(seed: int, n: int = 6000):
    """Voxels where P(error) follows the head's confidence outside conflict and is a coin flip inside it."""
    g = torch.Generator().manual_seed(seed)
    stats = {k: torch.rand(n, generator=g) * 0.01 for k in STATISTICS}
    stats["head_confidence"] = 0.5 + 0.5 * torch.rand(n, generator=g)
    stats["confidence"] = stats["head_confidence"]
    in_conflict = torch.rand(n, generator=g) < 0.15
    stats["conflict"] = torch.where(in_conflict, 0.7 + 0.3 * torch.rand(n, generator=g), 0.05 * torch.rand(n, generator=g))
    p = torch.where(in_conflict, torch.full((n,), 0.5), 1 - stats["head_confidence"])
    error = (torch.rand(n, generator=g) < p).float()
    return {**stats, "fg_boundary": torch.ones(n)}, error


def _model_folder(tmp_path, folds=(0, 1, 2)):
    model = tmp_path / "nnUNetTrainerEnTrust__nnUNetPlans__2d"
    model.mkdir()
    (model / "plans.json").write_text(json.dumps({"plans_name": "nnUNetPlans", "dataset_name": "Dataset001_A"}))
    for f in folds:
        (model / f"fold_{f}").mkdir()
        save_fold_voxels(model / f"fold_{f}" / FOLD_VOXELS_FILE, _fold_voxels(f))
    return model


def test_calibrator_with_conflict_is_chosen_and_matches_the_error_rate_inside_conflict(tmp_path):
    model = _model_folder(tmp_path)
    path, content = calibrate_model(model)
    assert path == model / CALIBRATION_FILE and content["folds"] == [0, 1, 2]
    scores = content["report"]["held_out_bce_fg_boundary"]
    assert content["calibrator"] == "platt_with_conflict" and scores["platt_with_conflict"] < scores["platt_head_confidence"]
    inside = content["report"]["in_conflict_map"]
    assert abs(inside["mean_p_error"] - inside["error_rate"]) < 0.03 and 0.4 < inside["error_rate"] < 0.6
    calibrator = load_calibrator(model)  # plain JSON, read back exactly
    assert content["class_temperature"] is None and calibrator.class_temperature is None  # files without classes
    stats, _ = _fold_voxels(9)
    p = calibrator.probability_of_error(stats)
    conflict = stats["conflict"] > 0.5
    assert abs(float(p[conflict].mean()) - 0.5) < 0.1 and float(p[~conflict].mean()) < 0.35


def test_bad_inputs_are_one_clear_error(tmp_path):
    model = _model_folder(tmp_path, folds=(0, 1))
    with pytest.raises(InputError, match="fold_4.*fold 4 has no out-of-fold calibration voxels"):
        calibrate_model(model, folds=[0, 4])
    with pytest.raises(InputError, match="no trained model here"):
        calibrate_model(tmp_path / "nowhere")
    calibrate_model(model)
    other = tmp_path / "nnUNetTrainerEnTrust__nnUNetPlans__3d_fullres"
    other.mkdir()
    (other / CALIBRATION_FILE).write_text((model / CALIBRATION_FILE).read_text())
    with pytest.raises(InputError, match="written for nnUNetTrainerEnTrust__nnUNetPlans__2d"):
        load_calibrator(other)
    (other / CALIBRATION_FILE).write_text("{not json")
    with pytest.raises(InputError, match="not a calibration file"):
        load_calibrator(other)
    assert load_calibrator(tmp_path) is None
    # valid JSON that is not a calibrator of ours: no weights, an unknown feature, one weight too few
    good = json.loads((model / CALIBRATION_FILE).read_text())
    for broken, message in (({k: v for k, v in good.items() if k != "weights"}, "not a calibration file"),
                            ({**good, "features": ["bogus"], "weights": [1.0, 0.0]}, r"unknown features \['bogus'\]"),
                            ({**good, "weights": good["weights"][:-1]}, "wrong number of weights")):
        (model / CALIBRATION_FILE).write_text(json.dumps(broken))
        with pytest.raises(InputError, match=message):
            load_calibrator(model)
    # the same trainer, plans and configuration of another dataset: refused
    calibrate_model(model)
    twin = tmp_path / "other_dataset" / model.name
    twin.mkdir(parents=True)
    (twin / "plans.json").write_text(json.dumps({"plans_name": "nnUNetPlans", "dataset_name": "Dataset002_B"}))
    (twin / CALIBRATION_FILE).write_text((model / CALIBRATION_FILE).read_text())
    with pytest.raises(InputError, match="written for dataset Dataset001_A, not for Dataset002_B"):
        load_calibrator(twin)
    # a copy of a fold under another name is no fold
    (model / "fold_0_bak").mkdir()
    (model / "fold_0_bak" / "checkpoint_final.pth").write_bytes(b"")
    assert calibrate_model(model)[1]["folds"] == [0, 1]
    # a trained fold without voxels is named, not left out of the default folds
    (model / "fold_2").mkdir()
    (model / "fold_2" / "checkpoint_final.pth").write_bytes(b"")
    with pytest.raises(InputError, match="fold 2 has no out-of-fold calibration voxels"):
        calibrate_model(model)
    empty = tmp_path / "nnUNetTrainerEnTrust__nnUNetPlans__3d_lowres"
    empty.mkdir()
    (empty / "plans.json").write_text("{}")
    with pytest.raises(InputError, match="no fold has out-of-fold calibration voxels"):
        calibrate_model(empty)


def test_one_fold_keeps_the_calibrator_with_conflict_without_a_choice(tmp_path, monkeypatch):
    """With one fold there is no other fold to judge on: the Platt model with the conflict term, no scores."""
    path, content = calibrate_model(_model_folder(tmp_path, folds=(0,)))
    assert content["calibrator"] == "platt_with_conflict" and content["report"]["held_out_bce_fg_boundary"] == {}
    assert load_calibrator(path.parent).features == tuple(content["features"])
    monkeypatch.chdir(path.parent)  # entrust predict -m . (the folder's name from its absolute path)
    assert load_calibrator(".").features == tuple(content["features"])


def test_calibration_subset_is_seeded_disjoint_from_training_and_never_everything():
    from entrust_nnunet.nnunet.calibration import calibration_subset

    keys = [f"case_{i}" for i in range(8)]
    subset = calibration_subset(keys[::-1], 0.25, seed=1)
    assert len(subset) == 2 and subset == sorted(subset) and set(subset) <= set(keys)
    assert calibration_subset(keys, 0.25, seed=1) == subset and calibration_subset(keys, 0.25, seed=2) != subset
    assert calibration_subset(keys[:1], 0.5, seed=1) == [] and calibration_subset(keys, 0, seed=1) == []
    assert len(calibration_subset(keys[:2], 0.9, seed=1)) == 1  # at least one case is left for training


def test_class_temperature_recovers_the_sharpening_of_overconfident_probabilities():
    """Labels drawn from q; the model says softmax(3 log q) (overconfident). The NLL-fitted temperature is ~3,
    lowers the NLL, and the tempered probabilities sum to 1 with every argmax kept."""
    from torch import nn

    from entrust_nnunet.model.trustmap import CalibHead, tempered_log_probabilities
    from entrust_nnunet.nnunet.calibration import fit_class_temperature

    gen = torch.Generator().manual_seed(0)
    q = torch.softmax(2 * torch.randn(20000, 3, generator=gen), 1)
    labels = torch.multinomial(q, 1, generator=gen)[:, 0]
    overconfident = torch.softmax(3 * q.log(), 1)
    head = CalibHead(nn.Conv2d, num_classes=3)
    summary = fit_class_temperature(head, ({"probabilities": overconfident, "label": labels}, labels.float()))
    assert torch.equal(head.conflict_bias, torch.zeros(3))  # no conflict gate: nothing to move
    before, after = (float(v) for v in summary.split("NLL ")[1].split(" on")[0].split(" -> "))
    assert float(head.temperature) == pytest.approx(3.0, rel=0.1) and after < before - 0.05
    tempered = torch.softmax(tempered_log_probabilities(overconfident.T, head.temperature), 0)
    torch.testing.assert_close(tempered.sum(0), torch.ones(20000))
    assert torch.equal(tempered.argmax(0), overconfident.argmax(1))
    # T undoes the sharpening (up to the fit and the 1e-4 floor on probabilities)
    assert float((tempered.T - q).abs().mean()) < float((overconfident - q).abs().mean()) / 3


def _overconfident(n: int, seed: int, sharpening: float = 3.0):
    gen = torch.Generator().manual_seed(seed)
    q = torch.softmax(2 * torch.randn(n, 3, generator=gen), 1)
    return torch.softmax(sharpening * q.log(), 1), torch.multinomial(q, 1, generator=gen)[:, 0]


def test_calibrate_fits_one_class_temperature_on_every_folds_voxels(tmp_path):
    model = tmp_path / "nnUNetTrainerEnTrust__nnUNetPlans__2d"
    model.mkdir()
    (model / "plans.json").write_text(json.dumps({"plans_name": "nnUNetPlans"}))
    for f in (0, 1):
        stats, error = _fold_voxels(f)
        probs, labels = _overconfident(error.numel(), f)
        (model / f"fold_{f}").mkdir()
        save_fold_voxels(model / f"fold_{f}" / FOLD_VOXELS_FILE, ({**stats, "probabilities": probs, "label": labels}, error))
    _, content = calibrate_model(model)
    fit = content["class_temperature_fit"]
    assert content["class_temperature"] == pytest.approx(3.0, rel=0.1) and fit["voxels"] == 12000
    assert fit["nll"][1] < fit["nll"][0] - 0.05
    assert load_calibrator(model).class_temperature == pytest.approx(content["class_temperature"])


def test_case_voxels_score_the_region_converted_mask_and_skip_ignored_voxels():
    """CalibHead's error target is nnU-Net's converted mask != label; ignored and cropped-away voxels drop out."""
    from nnunetv2.utilities.label_handling.label_handling import LabelManager

    from entrust_nnunet.nnunet.calibration import case_voxels

    lm = LabelManager({"background": 0, "whole": [1, 2], "core": 2, "ignore": 3}, regions_class_order=[1, 2])
    # four voxels: sigmoid means of (whole, core); converted mask 2, 1, 0, 2
    mean = torch.tensor([[0.9, 0.8, 0.1, 0.7], [0.6, 0.2, 0.3, 0.9]]).view(2, 1, 4)
    stats = {k: torch.rand(1, 4) for k in STATISTICS} | {"mean": mean, "entropy": torch.zeros(1, 4)}
    seg = torch.tensor([[[2, 2, 3, -1]]]).numpy()  # (1, *s): right, wrong, ignored, outside nnU-Net's crop
    columns, error = case_voxels(stats, seg, "case", 100, lm)
    assert error.tolist() == [0.0, 1.0]
    torch.testing.assert_close(columns["confidence"], stats["confidence"].flatten()[:2])


def test_a_new_class_calibration_moves_the_foreground_boundary_flags_with_its_mask():
    """fg+bnd = the label's region (foreground + band) | the mask's foreground: a voxel the conflict biases turn to
    class 1 joins it, one they turn to background leaves it unless the label's region holds it."""
    from entrust_nnunet.nnunet.calibration import case_voxels, class_calibrated_voxels

    # a 1 x 12 row: label foreground at 0-1 (band 2 voxels: up to 3), far background beyond; mean says class 0
    # everywhere except voxel 8 (class 1 at 0.6)
    labels = torch.tensor([[[1, 1] + [0] * 10]])
    p1 = torch.tensor([0.9, 0.9, 0.2, 0.2, 0.2, 0.2, 0.2, 0.2, 0.6, 0.4, 0.2, 0.2])
    mean = torch.stack([1 - p1, p1]).view(2, 1, 12)
    gate = torch.tensor([0.0] * 9 + [1.0, 0.0, 0.0]).view(1, 12)
    stats = {k: torch.rand(1, 12) for k in STATISTICS} | {"mean": mean, "entropy": torch.zeros(1, 12), "gate": gate}
    columns, _ = case_voxels(stats, labels.numpy(), "case", 100)
    assert columns["fg_boundary"].tolist() == [1, 1, 1, 1, 0, 0, 0, 0, 1, 0, 0, 0]  # label region + the mask at 8
    assert columns["label_region"].tolist() == [1, 1, 1, 1] + [0] * 8
    # b = (0, 2) where the gate is 1 (voxel 9): its 0.4 becomes class 1; T = 1 keeps voxel 8's class 1
    moved, error = class_calibrated_voxels((columns, torch.zeros(12)), 1.0, [0.0, 2.0])
    assert moved["fg_boundary"].tolist() == [1, 1, 1, 1, 0, 0, 0, 0, 1, 1, 0, 0]
    assert error.tolist() == [0] * 8 + [1, 1, 0, 0]
    # a negative bias keeps voxel 9 background: the flags stay the trainer's
    kept, _ = class_calibrated_voxels((columns, torch.zeros(12)), 1.0, [0.0, -2.0])
    assert kept["fg_boundary"].tolist() == columns["fg_boundary"].tolist()


def test_calibrate_fits_conflict_biases_and_scores_the_mask_they_decide(tmp_path):
    """Labels follow softmax(log q + g b): where the experts conflict (g > 0) the model's mean under-weights class 1.
    `entrust calibrate` fits b with T on every fold's voxels, stores them, and its P(error) calibrator learns the
    error of the mask they decide (argmax of the calibrated probabilities), not of the mean's argmax: each fold's
    with the class calibration of the other folds (cross-fitted)."""
    from entrust_nnunet.evaluation.temperature import conflict_temperature_scale
    from entrust_nnunet.nnunet.calibration import class_calibrated_voxels, fit_pooled_temperature

    model = tmp_path / "nnUNetTrainerEnTrust__nnUNetPlans__2d"
    model.mkdir()
    (model / "plans.json").write_text(json.dumps({"plans_name": "nnUNetPlans"}))
    bias = torch.tensor([0.0, 2.0, -1.0])
    folds = []
    for f in (0, 1):
        stats, _ = _fold_voxels(f)
        n = stats["conflict"].numel()
        g = torch.Generator().manual_seed(10 + f)
        q = torch.softmax(2 * torch.randn(n, 3, generator=g), 1)
        gate = (2 * stats["conflict"]).clamp(0, 1)
        truth = torch.from_numpy(conflict_temperature_scale(q.T.double().numpy(), gate.numpy(), 1.0, bias.numpy())).T
        labels = torch.multinomial(truth.float(), 1, generator=g)[:, 0]
        stored_error = (q.argmax(1) != labels).float()  # the mean's mask, as an uncalibrated fold stored it
        columns = {**stats, "probabilities": q, "label": labels, "gate": gate}
        folds.append((columns, stored_error))
        (model / f"fold_{f}").mkdir()
        save_fold_voxels(model / f"fold_{f}" / FOLD_VOXELS_FILE, (columns, stored_error))
    _, content = calibrate_model(model)
    assert content["class_temperature"] == pytest.approx(1.0, abs=0.15)  # T first, alone: it absorbs a little
    assert content["class_conflict_bias"][0] == 0.0
    assert content["class_conflict_bias"][1:] == pytest.approx([2.0, -1.0], abs=0.35)
    assert load_calibrator(model).class_conflict_bias == pytest.approx(tuple(content["class_conflict_bias"]))
    # the calibrator's voxels are the calibrated mask's: confidence its top probability, error its argmax's
    others = [fit_pooled_temperature(model, [1 - f], conflict_biases=True) for f in (0, 1)]
    assert not any(fit_pooled_temperature(model, [0])["conflict_bias"])  # one fold: no biases by default
    assert others[0]["conflict_bias"] != pytest.approx(content["class_conflict_bias"], abs=1e-6)
    recomputed = [class_calibrated_voxels(v, o["temperature"], o["conflict_bias"]) for v, o in zip(folds, others)]
    error = torch.cat([e for _, e in recomputed])
    assert content["report"]["error_rate"] == pytest.approx(float(error.mean()))
    assert float(error.mean()) < float(torch.cat([e for _, e in folds]).mean()) - 0.01  # the better mask
    columns, e = recomputed[0]
    calibrated = torch.softmax(torch.log(folds[0][0]["probabilities"].clamp_min(1e-4)) / others[0]["temperature"]
                               + folds[0][0]["gate"][:, None] * torch.tensor(others[0]["conflict_bias"]), 1)
    torch.testing.assert_close(columns["confidence"], calibrated.amax(1), atol=1e-5, rtol=1e-5)
    assert torch.equal(e, (calibrated.argmax(1) != folds[0][0]["label"]).float())


def test_case_voxels_subset_keeps_columns_and_errors_aligned_and_is_seeded_by_the_case():
    """A case larger than max_voxels keeps a subset: every kept voxel's statistics, label and error are that voxel's
    (confidence holds the voxel's index here), the same case name gives the same subset, another name another."""
    from entrust_nnunet.nnunet.calibration import case_voxels

    g = torch.Generator().manual_seed(0)
    shape = (1, 40, 25)  # 1000 voxels
    stats = {k: torch.rand(shape, generator=g) for k in STATISTICS}
    stats["confidence"] = torch.arange(1000, dtype=torch.float32).view(shape)
    stats["mean"] = torch.softmax(torch.randn(2, *shape, generator=g) * 3, 0)
    seg = torch.randint(0, 2, (1, *shape), generator=g).numpy()
    truth = (stats["mean"].argmax(0).flatten() != torch.from_numpy(seg).flatten()).float()
    columns, error = case_voxels(stats, seg, "case_a", 50)
    index = columns["confidence"].long()
    assert len(index) == 50 == len(set(index.tolist())) and 0.2 < float(truth.mean()) < 0.8
    torch.testing.assert_close(error, truth[index])
    torch.testing.assert_close(columns["label"], torch.from_numpy(seg).flatten()[index].long())
    for k in STATISTICS:
        torch.testing.assert_close(columns[k], stats[k].flatten()[index])
    again, _ = case_voxels(stats, seg, "case_a", 50)
    other, _ = case_voxels(stats, seg, "case_b", 50)
    assert torch.equal(again["confidence"], columns["confidence"])
    assert not torch.equal(other["confidence"], columns["confidence"])


def _conflict_voxels(lesion_probability: torch.Tensor, labels: torch.Tensor, gate: torch.Tensor, case: torch.Tensor):
    """Calibration voxels (softmax over background / lesion / rim) whose lesion probability is given."""
    probs = torch.stack([1 - lesion_probability, lesion_probability, torch.zeros_like(lesion_probability)], 1)
    return {"probabilities": probs.clamp_min(1e-6), "label": labels, "gate": gate, "case": case}, labels.float()


def test_the_showing_reading_is_kept_only_when_it_wins_beyond_the_cases_noise_and_the_vote_otherwise():
    """Ten cases whose conflicting voxels are lesion 70 % of the time: the vote says 0.25 there, the showing expert
    0.7; the showing reading wins in every resample of the cases and is kept. Labels following the vote's 0.25: the
    vote. Where no voxel conflicts (a model never shown a conflict), or the voxels carry no case numbers, the vote."""
    from entrust_nnunet.nnunet.calibration import choose_reading

    gen = torch.Generator().manual_seed(0)
    n = 4000
    gate = (torch.arange(n) % 4 == 0).float()  # a quarter of every case's voxels conflict
    case = torch.arange(n) // 400  # ten cases
    labels = torch.where(gate > 0, (torch.rand(n, generator=gen) < 0.7).long(), torch.zeros(n, dtype=torch.long))
    clear = torch.full((n,), 0.02)
    vote = _conflict_voxels(torch.where(gate > 0, torch.full((n,), 0.25), clear), labels, gate, case)
    showing = _conflict_voxels(torch.where(gate > 0, torch.full((n,), 0.7), clear), labels, gate, case)
    reading, summary = choose_reading({"vote": vote[0], "showing": showing[0]})
    assert reading == "showing" and "1000 conflicting voxels" in summary and "10 of 10 cases with conflicting" in summary
    assert "showing lower in 100.0% of 2000 case resamples" in summary
    # the labels following the vote's 0.25 instead: the vote is kept
    labels_low = torch.where(gate > 0, (torch.rand(n, generator=gen) < 0.25).long(), labels)
    relabelled = {k: v[0] | {"label": labels_low} for k, v in {"vote": vote, "showing": showing}.items()}
    assert choose_reading(relabelled)[0] == "vote"
    none = {k: v[0] | {"gate": torch.zeros(n)} for k, v in {"vote": vote, "showing": showing}.items()}
    assert choose_reading(none) == ("vote", "conflict reading: vote (no conflicting voxel on the calibration cases)")
    unnumbered = {k: {c: x for c, x in v[0].items() if c != "case"} for k, v in {"vote": vote, "showing": showing}.items()}
    reading, summary = choose_reading(unnumbered)
    assert reading == "vote" and "no case numbers" in summary


def test_a_showing_advantage_carried_by_a_few_cases_keeps_the_vote():
    """Five cases, as one fold's validation: in four the blobs are lesion (the showing expert's 0.9 wins), in the
    fifth background (it loses badly). The pooled NLL favours showing, but a resample without the fifth case is
    common and one with it twice too: within the cases' noise, the vote stays. With four cases of each kind
    (twenty in all) the same per-case advantage is kept."""
    from entrust_nnunet.nnunet.calibration import choose_reading

    def readings(lesion_cases: int, background_cases: int):
        k = lesion_cases + background_cases
        case = torch.arange(k * 100) // 100
        labels = (case < lesion_cases).long()
        gate = torch.ones(k * 100)
        return {name: _conflict_voxels(torch.full((k * 100,), p), labels, gate, case)[0]
                for name, p in (("vote", 0.35), ("showing", 0.9))}

    few = readings(4, 1)
    reading, summary = choose_reading(few)
    nll = {r: float(-(torch.log(few[r]["probabilities"][torch.arange(500), few[r]["label"]])).mean()) for r in few}
    assert nll["showing"] < nll["vote"]  # untempered, the showing reading predicts these five cases better ...
    assert reading == "vote", summary  # ... but not beyond what one case more or less changes
    assert choose_reading(readings(16, 4))[0] == "showing"
    # every case favouring showing, but fewer than five: as likely as the coins' 1 in 16, so the vote
    reading, summary = choose_reading(readings(4, 0))
    assert reading == "vote" and "4 of 4 cases with conflicting voxels, fewer than 5" in summary
    assert choose_reading(readings(5, 0))[0] == "showing"
    # a case without conflicting voxels counts as a case, not as one to judge by
    quiet = {r: c | {"gate": torch.where(c["case"] == 4, 0.0, 1.0)} for r, c in readings(5, 0).items()}
    reading, summary = choose_reading(quiet)
    assert reading == "vote" and "4 of 5 cases" in summary
    # readings whose voxels number different cases cannot be compared
    mismatched = {r: c | {"case": c["case"] + (r == "showing")} for r, c in few.items()}
    with pytest.raises(ValueError, match="number different cases"):
        choose_reading(mismatched)


def test_resampled_share_lower_matches_the_exact_bootstrap_distribution():
    """Three cases: the 27 equally likely ordered resamples, enumerated, against the seeded draws."""
    import itertools

    from entrust_nnunet.nnunet.calibration import resampled_share_lower

    a = (np.array([1.0, 4.0, 0.0]), np.array([1.0, 2.0, 0.0]))  # the third case has no conflicting voxel
    b = (np.array([0.5, 5.0, 0.0]), np.array([1.0, 2.0, 0.0]))
    exact = np.mean([b[0][list(i)].sum() / b[1][list(i)].sum() < a[0][list(i)].sum() / a[1][list(i)].sum()
                     if a[1][list(i)].sum() > 0 else False for i in itertools.product(range(3), repeat=3)])
    assert exact not in (0.0, 1.0)
    assert abs(resampled_share_lower(a, b, 20000) - exact) < 0.01
    assert resampled_share_lower(a, b, 500, seed=3) == resampled_share_lower(a, b, 500, seed=3)


def test_the_network_reads_conflict_as_its_calibration_chose_and_old_checkpoints_keep_the_vote():
    from conftest import arch_kwargs
    from entrust_nnunet.model.network import EnTrustUNet
    from entrust_nnunet.model.sampling import SamplingSettings

    torch.manual_seed(0)
    net = EnTrustUNet(3, num_classes=3, **arch_kwargs(2)).eval()
    with torch.no_grad():
        net.experts.weight.mul_(3.0)  # experts that contradict each other in places
    x = torch.randn(1, 3, 32, 32)
    settings = SamplingSettings(num_hypotheses=4, steps=0, probe=False)
    assert net.conflict_reading == "vote"
    vote = net.sample(x, settings)
    net.calib.showing_reading.fill_(1.0)
    assert net.conflict_reading == "showing"
    showing = net.sample(x, settings)
    moved = (showing["mean"] - vote["mean"]).abs().amax(1)[0]
    conflict = vote["conflict"][0]
    assert float(moved[conflict > 0.5].mean()) > 0.05
    # both readings mix into the same mean with the same gate g = min(1, strength d): it moves by at most g
    gate = (net.expert_alternatives * conflict).clamp(max=1)
    assert bool((moved <= gate + 1e-5).all())
    old = {k: v for k, v in net.state_dict().items() if k != "calib.showing_reading"}
    fresh = EnTrustUNet(3, num_classes=3, **arch_kwargs(2))
    fresh.calib.showing_reading.fill_(1.0)
    fresh.load_state_dict(old)  # a checkpoint from before the choice: the vote
    assert fresh.conflict_reading == "vote"


def _reading_folds(model, chosen: dict[int, str]) -> None:
    """Fold voxels under both readings, the fold's ``chosen`` one in the main file: conflicting voxels are lesion
    70 % of the time; the vote says 0.25 there, the showing expert 0.7 (the labels are the fold's, for both)."""
    from entrust_nnunet.nnunet.calibration import OTHER_READING_VOXELS_FILE

    for f, kept in chosen.items():
        stats, _ = _fold_voxels(f)
        n = stats["conflict"].numel()
        gate = (stats["conflict"] > 0.5).float()
        g = torch.Generator().manual_seed(100 + f)
        labels = torch.where(gate > 0, (torch.rand(n, generator=g) < 0.7).long(), torch.zeros(n, dtype=torch.long))
        clear = torch.full((n,), 0.02)
        case = torch.arange(n) * 6 // n  # six validation cases per fold
        readings = {r: _conflict_voxels(torch.where(gate > 0, torch.full((n,), p), clear), labels, gate, case)[0]
                    for r, p in (("vote", 0.25), ("showing", 0.7))}
        (model / f"fold_{f}").mkdir()
        for r, name in ((kept, FOLD_VOXELS_FILE), ({"vote": "showing", "showing": "vote"}[kept], OTHER_READING_VOXELS_FILE)):
            columns = stats | readings[r]
            save_fold_voxels(model / f"fold_{f}" / name, (columns, (columns["probabilities"].argmax(1) != labels).float()), r)


def test_calibrate_chooses_the_conflict_reading_once_on_every_folds_voxels_and_predict_follows_it(tmp_path):
    """Both folds kept the vote on their own cases; on both folds' out-of-fold voxels the showing reading predicts
    the conflicting labels better: calibrate keeps it for every fold and fits temperature and calibrator on its
    voxels (the folds' other files); the weights a predictor loads carry it. A fold without voxels under both
    readings: each fold's own."""
    from entrust_nnunet.nnunet.calibration import (OTHER_READING_VOXELS_FILE, fit_calibrator, fit_pooled_temperature,
                                                   fold_voxels_path, with_conflict_reading)

    model = tmp_path / "nnUNetTrainerEnTrust__nnUNetPlans__2d"
    model.mkdir()
    (model / "plans.json").write_text(json.dumps({"plans_name": "nnUNetPlans"}))
    _reading_folds(model, {0: "vote", 1: "vote"})
    assert fold_voxels_path(model, 1, "showing").name == OTHER_READING_VOXELS_FILE
    assert fold_voxels_path(model, 1, "vote").name == FOLD_VOXELS_FILE
    _, content = calibrate_model(model)
    assert content["conflict_reading"] == "showing" and "folds [0, 1]" in content["conflict_reading_choice"]
    assert "12 of 12 cases" in content["conflict_reading_choice"]  # each fold's cases numbered apart
    fit = content["class_temperature_fit"]
    assert fit["nll"] == pytest.approx(fit_pooled_temperature(model, [0, 1], reading="showing")["nll"])
    assert fit["nll"] != pytest.approx(fit_pooled_temperature(model, [0, 1])["nll"])
    assert content["report"]["bce"] == pytest.approx(fit_calibrator(model, [0, 1], "showing")[1]["bce"])
    assert content["report"]["bce"] != pytest.approx(fit_calibrator(model, [0, 1])[1]["bce"])
    calibrator = load_calibrator(model)
    assert calibrator.conflict_reading == "showing"
    weights = {"calib.showing_reading": torch.tensor(0.0), "w": torch.ones(2)}
    assert float(with_conflict_reading(weights, calibrator)["calib.showing_reading"]) == 1.0
    assert float(weights["calib.showing_reading"]) == 0.0  # the checkpoint's own weights are not changed
    # a fold whose two files carry the same reading (a left-over file), or only one file: each fold's own
    other = model / "fold_1" / OTHER_READING_VOXELS_FILE
    with np.load(other) as f:
        np.savez_compressed(other, **{k: f[k] for k in f.files} | {"showing_reading": np.float32(0.0)})
    assert calibrate_model(model)[1]["conflict_reading"] is None
    # files saved before the voxels carried case numbers: each fold's own (not judged again, not forced to the vote)
    with np.load(other) as f:
        np.savez_compressed(other, **{k: f[k] for k in f.files if k != "case"} | {"showing_reading": np.float32(1.0)})
    _, content = calibrate_model(model)
    assert content["conflict_reading"] is None and "carry no case numbers" in content["conflict_reading_choice"]
    other.unlink()
    _, content = calibrate_model(model)
    assert content["conflict_reading"] is None and "each fold's own" in content["conflict_reading_choice"]
    assert content["class_temperature_fit"]["nll"] == pytest.approx(fit_pooled_temperature(model, [0, 1])["nll"])
    assert with_conflict_reading(weights, load_calibrator(model)) is weights
