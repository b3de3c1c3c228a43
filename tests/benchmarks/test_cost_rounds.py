"""benchmarks/cost.py's whole-case rounds: passes interleaved across methods, time ratios paired by round."""
import importlib.util
from pathlib import Path

import pytest

BENCH = Path(__file__).resolve().parents[2] / "benchmarks"
spec = importlib.util.spec_from_file_location("bench_cost", BENCH / "cost.py")
cost = importlib.util.module_from_spec(spec)
spec.loader.exec_module(cost)


def test_rounds_interleave_the_methods_and_pair_each_pass_with_plains_of_its_round(monkeypatch):
    """The machine slows down by half in round 2: per-round ratios stay 1.2, a ratio of medians would not."""
    order, speed = [], {0: 1.0, 1: 1.5, 2: 1.0}
    work = {"plain": 60.0, "entrust": 72.0}

    def fake_measure(cfg, with_memory=True):
        r = len(order) // 2
        order.append((cfg["method"], with_memory))
        assert cfg["repeats"] == 1
        return {"times": [work[cfg["method"]] * speed[r]], "peak_bytes": 100 if cfg["method"] == "plain" else 113,
                "warmup_s": 0.0}

    monkeypatch.setattr(cost, "measure", fake_measure)
    rows = cost.paired_table([("plain", "plain", 1), ("EnTrust K=8", "entrust", 8)], {"mode": "case"}, rounds=3)
    assert order == [("plain", True), ("entrust", True), ("plain", False), ("entrust", False), ("plain", False),
                     ("entrust", False)]  # interleaved; memory measured in the first round only
    entrust = rows["EnTrust K=8"]
    assert entrust["time_ratios"] == pytest.approx([1.2, 1.2, 1.2]) and entrust["time_ratio"] == pytest.approx(1.2)
    assert entrust["times"] == pytest.approx([72.0, 108.0, 72.0]) and entrust["n"] == 3
    assert entrust["memory_ratio"] == pytest.approx(1.13) and rows["plain"]["time_ratio"] == pytest.approx(1.0)


def test_a_failed_pass_leaves_its_round_out_of_the_pairs(monkeypatch):
    """Plain fails in round 2, EnTrust in round 3 (its memory pass in round 1 works): EnTrust's one pair is round 1,
    never its round-2 pass over plain's round-3 pass."""
    calls = []

    def fake_measure(cfg, with_memory=True):
        r = len(calls) // 2
        calls.append(cfg["method"])
        if (cfg["method"], r) in (("plain", 1), ("entrust", 2)):
            return None
        t = {"plain": 60.0, "entrust": 72.0}[cfg["method"]] * (1.0, 1.5, 2.0)[r]
        return {"times": [t], "peak_bytes": (100 if cfg["method"] == "plain" else 113) if with_memory else None,
                "warmup_s": 0.0}

    monkeypatch.setattr(cost, "measure", fake_measure)
    rows = cost.paired_table([("plain", "plain", 1), ("EnTrust K=8", "entrust", 8)], {"mode": "case"}, rounds=3)
    entrust = rows["EnTrust K=8"]
    assert entrust["times"] == pytest.approx([72.0, 108.0]) and entrust["time_ratios"] == pytest.approx([1.2])
    assert entrust["memory_ratio"] == pytest.approx(1.13) and rows["plain"]["n"] == 2
    assert "| EnTrust K=8 |" in cost._row("EnTrust K=8", entrust)
