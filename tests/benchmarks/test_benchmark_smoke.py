"""A tiny run of benchmarks/run.py: every stage runs and the table holds real, finite numbers."""
import json
import subprocess
import sys
from pathlib import Path

REPO = Path(__file__).resolve().parents[2]  # tests/benchmarks/ -> the repository


def test_benchmark_smoke(tmp_path):
    import os

    out = tmp_path / "bench"
    # one worker per nnU-Net pool (fingerprint, preprocessing, validation export): each spawned worker imports
    # torch and nnU-Net, which costs more than 8 phantoms of 32x32
    env = {**os.environ, "nnUNet_def_n_proc": "1", "nnUNet_n_proc_DA": "1"}
    r = subprocess.run([sys.executable, str(REPO / "benchmarks" / "run.py"), "--smoke", "--out", str(out)], env=env,
                       capture_output=True, encoding="utf-8", errors="replace", timeout=1500)
    assert r.returncode == 0, r.stdout[-3000:] + r.stderr[-3000:]
    result = json.loads((out / "results.json").read_text())
    assert result["seeds"] == [0] and result["test_seed"] == 99 and result["commit"] and result["machine"]["cpus"]
    assert {"softmax nnU-Net", "softmax nnU-Net + temperature", "5-fold deep ensemble", "EnTrust (K=8)"} <= set(result["methods"])
    for row in result["methods"].values():
        assert 0 <= row["dice"]["mean"] <= 1 and 0 <= row["ece"]["mean"] <= 1 and row["dice"]["values"]
        assert 0 <= row["ece_perror"]["mean"] <= 1  # both calibration views, from the .npz and from total
    ours = result["methods"]["EnTrust (K=8)"]  # hypotheses scored against the test cases' annotators
    assert 0 <= ours["ged2"]["mean"] <= 2 and 0 <= ours["hm_iou"]["mean"] <= 1 and ours["ged2_mask_copies"]["values"]
    assert any(t["target"].startswith("GED^2 <= 0.7x") and t["verdict"] for t in result["targets"])
    seed = result["per_seed"][0]
    assert seed["seed"] == 0 and seed["temperature"] > 0 and seed["temperature_fitted_on"]
    assert seed["results_root"].endswith("seed_0")
    # which conflict reading fold 0 chose is recorded, and named in the markdown
    reading = seed["methods"]["EnTrust (K=8)"]["conflict_reading"]
    assert list(reading["folds"]) == ["0"] and reading["folds"]["0"] in ("vote", "showing")
    assert seed["methods"]["softmax nnU-Net"]["conflict_reading"] is None
    log = next((Path(seed["results_root"])).rglob("training_log_*.txt")).read_text(encoding="utf-8")
    assert "training seed: 0" in log
    # the temperature row keeps the softmax masks (same Dice), only the probabilities change
    assert result["methods"]["softmax nnU-Net + temperature"]["dice"]["mean"] == result["methods"]["softmax nnU-Net"]["dice"]["mean"]
    speed = result["speed"]
    assert speed["plain nnU-Net forward"]["time_ratio"] == 1.0
    # measured, not assumed (no comparison of times here: a loaded machine reorders them; the ratios are the benchmark's)
    assert all(row["median_s"] > 0 and row["n"] >= 3 for row in speed.values())
    assert {t["verdict"] for t in result["targets"]} <= {"met", "missed", "within noise", None}
    md = (out / "results.md").read_text(encoding="utf-8")
    assert f"seed 0 EnTrust (K=8): folds {{'0': '{reading['folds']['0']}'}}" in md
    assert "| EnTrust (K=8) |" in md and "ratio to one plain forward" in md and "AURC x1000" in md
    assert not (REPO / "benchmarks" / "results" / "phantoms2d.json").exists() or \
        json.loads((REPO / "benchmarks" / "results" / "phantoms2d.json").read_text())["schedule"] != "smoke"


def test_benchmark_dataset_needs_nnunet_roots_and_test_labels(tmp_path):
    """--dataset: one clear line and exit 2 when nnU-Net's roots are unset or the dataset has no labelsTs."""
    import os

    env = {k: v for k, v in os.environ.items() if not k.startswith("nnUNet_")}
    cmd = [sys.executable, str(REPO / "benchmarks" / "run.py"), "--dataset", "612", "--out", str(tmp_path / "o")]
    r = subprocess.run(cmd, env=env, capture_output=True, encoding="utf-8", errors="replace", timeout=300)
    assert r.returncode == 2 and "nnUNet_raw" in r.stderr and "Traceback" not in r.stderr
    raw = tmp_path / "raw" / "Dataset612_NoTestLabels"
    (raw / "imagesTs").mkdir(parents=True)
    env.update(nnUNet_raw=str(tmp_path / "raw"), nnUNet_preprocessed=str(tmp_path / "pre"),
               nnUNet_results=str(tmp_path / "res"))
    r = subprocess.run(cmd, env=env, capture_output=True, encoding="utf-8", errors="replace", timeout=300)
    assert r.returncode == 2 and "labelsTs" in r.stderr and len(r.stderr.strip().splitlines()) == 1
