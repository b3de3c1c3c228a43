"""benchmarks/run.py's verdicts and tables from a hand-made result (no training): the unseen-conflict rows."""
import json
import importlib.util
from pathlib import Path

BENCH = Path(__file__).resolve().parents[2] / "benchmarks"
spec = importlib.util.spec_from_file_location("bench_run", BENCH / "run.py")
run = importlib.util.module_from_spec(spec)
spec.loader.exec_module(run)


def _cell(values):
    from entrust_nnunet.evaluation.seeds import mean_std

    mean, std = mean_std(values)
    return {"values": values, "mean": mean, "std": std}


def _result(unseen_rows: dict) -> dict:
    per_seed = [{"seed": s, "methods": {}, "unseen_conflict": {m: {k: v[i] for k, v in row.items()}
                                                                  for m, row in unseen_rows.items()}}
                for i, s in enumerate((0, 1, 2))]
    return {"methods": {}, "ablations": {}, "speed": {}, "train": {}, "per_seed": per_seed,
            "unseen_conflict": run.aggregate(per_seed, "unseen_conflict")}


def _targets(result):
    return {t["target"]: t for t in run.check_targets(result) if t["target"].startswith("unseen conflict")}


def test_unseen_conflict_targets_read_ours_on_the_unseen_dataset():
    result = _result({run.OURS: {"total_in_conflict": [0.40, 0.35, 0.45],
                                 "conflict_vs_edge_auroc_conflict": [0.79, 0.80, 0.81], "dice": [0.9, 0.9, 0.9]},
                      "softmax nnU-Net": {"total_in_conflict": [0.06, 0.05, 0.07], "dice": [0.9, 0.9, 0.9]}})
    targets = _targets(result)
    assert len(targets) == 2
    p_error = targets["unseen conflict: mean P(error) inside conflict >= 0.25"]
    assert p_error["verdict"] == "met" and abs(p_error["value"] - 0.40) < 1e-9  # ours, not the softmax row
    auroc = targets["unseen conflict: conflict vs edge AUROC of the conflict map >= 0.80"]
    assert auroc["verdict"] == "within noise"  # 0.80 ± 0.01 against the bound 0.80
    low = _targets(_result({run.OURS: {"total_in_conflict": [0.10, 0.12, 0.11],
                                       "conflict_vs_edge_auroc_conflict": [0.5, 0.6, 0.55]}}))
    assert {t["verdict"] for t in low.values()} == {"missed"}


def test_unseen_conflict_absent_gives_no_verdict_and_no_table():
    result = _result({})
    assert all(t["verdict"] is None for t in _targets(result).values())
    assert run.unseen_markdown(result) == []
    table = "\n".join(run.unseen_markdown(_result({run.OURS: {"total_in_conflict": [0.4, 0.4, 0.4]}})))
    assert f"Dataset{run.UNSEEN_ID}" in table and "| EnTrust (K=8) | n/a | 0.400 ± 0.000 |" in table


def test_refresh_cost_embeds_the_newer_cost_run_and_recomputes_its_targets(tmp_path, monkeypatch):
    """--refresh-cost: the whole-case targets follow the cost JSON now on disk; the phantom numbers stay."""
    result = _result({run.OURS: {"total_in_conflict": [0.40, 0.35, 0.45]}})
    result["cost_large"] = {"whole_case": {"EnTrust K=8": {"time_ratios": [1.5], "memory_ratio": 1.3}}}
    result["targets"] = run.check_targets(result)
    results_json, cost_json = tmp_path / "results.json", tmp_path / "cost_large.json"
    results_json.write_text(json.dumps(result))
    cost_json.write_text(json.dumps({"whole_case": {"EnTrust K=8": {"time_ratios": [1.1], "memory_ratio": 1.25}},
                                     "markdown": "new cost"}))
    monkeypatch.setattr(run, "COST_JSON", cost_json)
    run.refresh_cost(results_json)
    after = json.loads(results_json.read_text())
    targets = {t["target"]: t for t in after["targets"]}
    assert targets["K=8 whole-case inference <= 1.3x plain prediction (BraTS-like 3D)"]["verdict"] == "met"
    assert targets["K=8 whole-case peak memory <= 1.2x plain prediction (BraTS-like 3D)"]["verdict"] == "missed"
    assert after["cost_large"]["markdown"] == "new cost" and after["unseen_conflict"] == result["unseen_conflict"]


def test_five_fold_calibrated_row_is_ours_not_the_best_baseline():
    """The calibrated five-fold EnTrust row, however good, is never the reference of a 'best baseline' target."""
    result = _result({})
    result["methods"] = {run.OURS: _cell_row({"ece": [0.004, 0.004, 0.004]}),
                         run.CALIBRATED_ROW: _cell_row({"ece": [0.001, 0.001, 0.001]}),
                         "5-fold deep ensemble": _cell_row({"ece": [0.006, 0.006, 0.006]})}
    target = next(t for t in run.check_targets(result) if t["target"] == "ECE of class probabilities <= 0.6x the best baseline")
    assert target["reference"] == "5-fold deep ensemble"


def _cell_row(values: dict) -> dict:
    return {k: _cell(v) for k, v in values.items()}


def test_calibrated_copy_calibrates_a_copy_and_leaves_the_model_folder_alone(tmp_path):
    import torch

    from entrust_nnunet.model.trustmap import STATISTICS
    from entrust_nnunet.nnunet.calibration import CALIBRATION_FILE, FOLD_VOXELS_FILE, load_calibrator, save_fold_voxels

    src = tmp_path / "results" / "nnUNetTrainerEnTrust_demo__nnUNetEnTrustPlans__2d"
    src.mkdir(parents=True)
    for f in ("plans.json", "dataset.json"):
        (src / f).write_text(json.dumps({"plans_name": "nnUNetEnTrustPlans"}))
    g = torch.Generator().manual_seed(0)
    for fold in range(3):
        (src / f"fold_{fold}").mkdir()
        (src / f"fold_{fold}" / "checkpoint_final.pth").write_bytes(b"weights")
        stats = {k: torch.rand(500, generator=g) for k in STATISTICS}
        error = (torch.rand(500, generator=g) < 1 - stats["head_confidence"]).float()
        save_fold_voxels(src / f"fold_{fold}" / FOLD_VOXELS_FILE, ({**stats, "fg_boundary": torch.ones(500)}, error))
    dst = run.calibrated_copy(src, tmp_path / "copy" / src.name, [0, 1, 2])
    assert not (src / CALIBRATION_FILE).exists() and load_calibrator(src) is None  # the one-fold row stays as trained
    assert load_calibrator(dst) is not None and json.loads((dst / CALIBRATION_FILE).read_text())["folds"] == [0, 1, 2]
    assert (dst / "fold_2" / "checkpoint_final.pth").read_bytes() == b"weights"
    before = (dst / CALIBRATION_FILE).stat().st_mtime_ns
    assert run.calibrated_copy(src, dst, [0, 1, 2]) == dst and (dst / CALIBRATION_FILE).stat().st_mtime_ns == before


def test_inside_conflict_gap_against_every_label_and_the_coins_share_of_it():
    """The inside-conflict gap is checked against the test label (the issue's row) and against the test label
    with its annotators; the chance line gives |0.5 - error rate| per seed, only for coin-flip phantoms."""
    per_seed = [{"seed": s, "methods": {run.OURS: {"total_in_conflict": p, "error_in_conflict": e,
                                                   "error_all_labels_in_conflict": a}}}
                for s, p, e, a in ((0, 0.47, 0.61, 0.55), (1, 0.50, 0.63, 0.56), (2, 0.49, 0.60, 0.54))]
    result = {"methods": run.aggregate(per_seed, "methods"), "ablations": {}, "speed": {}, "train": {},
              "per_seed": per_seed, "coin_flip_conflict": True}
    targets = {t["target"]: t for t in run.check_targets(result)}
    one = targets["|mean P(error) - error rate| inside conflict <= 0.10"]
    every = next(t for k, t in targets.items() if k.startswith("|mean P(error) - error rate| inside conflict <= 0.10, "))
    assert one["verdict"] == "missed" and abs(one["value"] - (0.14 + 0.13 + 0.11) / 3) < 1e-9
    assert every["verdict"] == "met" and abs(every["value"] - (0.08 + 0.06 + 0.05) / 3) < 1e-9
    line = run.chance_markdown(result)[-1]
    assert f"{run.OURS} against the test label 0.113 ± " in line  # |0.5 - e|: 0.11, 0.13, 0.10
    assert f"{run.OURS} against the test label and its annotators 0.050 ± " in line
    assert run.chance_markdown({**result, "coin_flip_conflict": False}) == []
