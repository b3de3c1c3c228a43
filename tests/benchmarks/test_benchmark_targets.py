"""benchmarks/run.py's verdicts and tables from a hand-made result (no training): the unseen-conflict rows."""
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
