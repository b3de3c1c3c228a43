"""The --subsets table: every non-empty subset of the modalities, its mean row, seeds aggregated, markdown."""
import importlib.util
import sys
from pathlib import Path

import pytest

BENCH = Path(__file__).resolve().parents[2] / "benchmarks"


def _load(name):
    spec = importlib.util.spec_from_file_location(f"bench_{name}", BENCH / f"{name}.py")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


subsets = _load("subsets")


def test_every_nonempty_subset_once_with_the_flag_that_leaves_it():
    rows = subsets.modality_subsets(["T1", "T2", "FLAIR"])
    assert rows == [("T1", "T2,FLAIR"), ("T2", "T1,FLAIR"), ("FLAIR", "T1,T2"), ("T1+T2", "FLAIR"),
                    ("T1+FLAIR", "T2"), ("T2+FLAIR", "T1"), ("T1+T2+FLAIR", None)]
    assert len(subsets.modality_subsets(["a", "b", "c", "d"])) == 15
    assert len({s for s, _ in subsets.modality_subsets(["a", "b", "c", "d"])}) == 15


def test_mean_row_seed_aggregation_and_markdown():
    seed0 = subsets.with_mean({"T1": {"dice": 0.2, "dice_1": 0.1, "ece_fg_boundary": 0.3},
                               "T1+T2": {"dice": 0.6, "dice_1": 0.5, "ece_fg_boundary": 0.1}})
    assert seed0[subsets.MEAN_ROW] == pytest.approx({"dice": 0.4, "dice_1": 0.3, "ece_fg_boundary": 0.2})
    seed1 = subsets.with_mean({"T1": {"dice": 0.4, "dice_1": 0.3, "ece_fg_boundary": 0.1},
                               "T1+T2": {"dice": 0.8, "dice_1": 0.7, "ece_fg_boundary": 0.1}})
    table = subsets.aggregate_seeds([{"m": seed0}, {"m": seed1}])
    cell = table["m"][subsets.MEAN_ROW]["dice"]
    assert cell["values"] == pytest.approx([0.4, 0.6]) and cell["mean"] == pytest.approx(0.5) and cell["std"] > 0
    md = subsets.subsets_markdown(table, ["1"])
    assert "**m**" in md and "| T1+T2 | 0.600 ±" in md and f"| **{subsets.MEAN_ROW}** | 0.400 ±" in md
    assert md.count("\n| ") == 4  # header, T1, T1+T2, mean


def test_run_accepts_subsets_and_smoke_uses_tiny_trainers():
    sys.path.insert(0, str(BENCH))
    try:
        run = _load("run")
        assert run.parse_args(["--subsets", "--smoke"]).subsets
    finally:
        sys.path.remove(str(BENCH))
    tiny = subsets.subset_methods(smoke=True)
    assert set(tiny) == set(subsets.SUBSET_METHODS)
    assert all(t.endswith("_tinyCPU") and k <= 2 for t, _, _, k, _ in tiny.values())
    # only the model trained without modality dropout is predicted with absent channels zero-filled
    assert [m for m, v in tiny.items() if v[4]] == ["nnU-Net, absent zero-filled"]
