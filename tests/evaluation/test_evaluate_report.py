"""entrust evaluate / entrust report on synthetic prediction folders (no model needed).

Phantoms give images, labels and true conflict; the predictions are the labels with chosen voxels
flipped, and the uncertainty maps are constructed so that the expected numbers are known: ``total``
high exactly where the mask is wrong (error AUROC 1), random maps (AUROC ~0.5), a calibrated
``total`` (ECE 0, Brier and NLL by hand), npz probabilities of known confidence.
"""
import json
import math
import shutil
from pathlib import Path

import matplotlib.image as mpimg
import numpy as np
import pytest
import SimpleITK as sitk

from entrust_nnunet.evaluation import metrics
from entrust_nnunet.cli import main
from entrust_nnunet.evaluation.evaluate import evaluate_folder
from entrust_nnunet.evaluation.summary import headline
from entrust_nnunet.data.phantoms import CONFLICT_LABEL, write_phantom_dataset
from entrust_nnunet.evaluation.report import write_report

CASES = [f"test_{j:03d}" for j in range(4)]  # test_003 has no conflict (index % 4 == 3)
END = ".nii.gz"


def _read(path):
    return sitk.GetArrayFromImage(sitk.ReadImage(str(path)))


def _write(array, reference, path):
    image = sitk.GetImageFromArray(array)
    image.CopyInformation(reference)
    sitk.WriteImage(image, str(path))


def _prediction_folder(ds: Path, out: Path, kind: str, seed: int = 0) -> dict:
    """Write masks + maps for every test case; return what was flipped, per case."""
    (out / "uncertainty").mkdir(parents=True)
    shutil.copy(ds / "dataset.json", out / "dataset.json")
    rng = np.random.default_rng(seed)
    info = {}
    for case in CASES:
        ref = sitk.ReadImage(str(ds / "labelsTs" / f"{case}{END}"))
        gt = sitk.GetArrayFromImage(ref)
        truth = _read(ds / "conflictTs" / f"{case}{END}").astype(np.float32)
        pred = gt.copy()
        flat = pred.reshape(-1)
        if kind == "calibrated":
            # voxels [0, 800): total 0.1 and exactly 10 % wrong; [800, 1024): total 0.5 and exactly 50 % wrong
            flip = np.concatenate([rng.choice(800, 80, replace=False), 800 + rng.choice(224, 112, replace=False)])
            flat[flip] = (flat[flip] + 1) % 3
            total = np.where(np.arange(gt.size) < 800, 0.1, 0.5).reshape(gt.shape)
        elif kind == "oracle" and case == "test_000":
            # hand-count case: 5 core voxels -> background (FN of 1), 7 background voxels -> ring (FP of 2)
            core, bg = np.flatnonzero(gt.reshape(-1) == 1), np.flatnonzero(gt.reshape(-1) == 0)
            assert core.size > 5
            fn1, fp2 = rng.choice(core, 5, replace=False), rng.choice(bg, 7, replace=False)
            flat[fn1], flat[fp2] = 0, 2
            info[case] = {"n1": int((gt == 1).sum()), "n2": int((gt == 2).sum())}
        else:
            flip = rng.choice(gt.size, 30 if kind == "oracle" else 100, replace=False)
            flat[flip] = (flat[flip] + 1) % 3
        error = pred != gt
        if kind == "oracle":
            total = np.where(error, 0.95, 0.05)
            aleatoric = rng.random(gt.shape)
            maps = {"total": total, "aleatoric": aleatoric, "epistemic": aleatoric ** 2, "conflict": truth}
        elif kind == "random":
            maps = {n: rng.random(gt.shape) for n in ("total", "aleatoric", "epistemic", "conflict")}
            probs = np.full((3, *gt.shape), 0.05)
            np.put_along_axis(probs, pred[None].astype(np.int64), 0.9, axis=0)
            np.savez_compressed(out / f"{case}.npz", probabilities=probs[:, None].astype(np.float32))  # (C, 1, y, x)
        else:
            maps = {"total": total, "aleatoric": rng.random(gt.shape), "epistemic": rng.random(gt.shape),
                    "conflict": truth}
        _write(pred.astype(np.uint8), ref, out / f"{case}{END}")
        for name, arr in maps.items():
            _write(arr.astype(np.float32), ref, out / "uncertainty" / f"{case}_{name}{END}")
        info.setdefault(case, {})["errors"] = int(error.sum())
    return info


@pytest.fixture(scope="module")
def data(tmp_path_factory):
    root = tmp_path_factory.mktemp("evaluate")
    ds = write_phantom_dataset(root / "Dataset990_Phantoms", num_cases=1, num_test=4, dim=2, size=32, seed=5,
                               progress=False)
    folders = {}
    for kind in ("oracle", "random", "calibrated"):
        info = _prediction_folder(ds, root / kind, kind)
        folders[kind] = (root / kind, info)
    summary = evaluate_folder(folders["oracle"][0], ds / "labelsTs", ds / "conflictTs",
                              output_file=root / "oracle_summary.json", num_processes=1, progress=False)
    return {"root": root, "ds": ds, "folders": folders, "oracle": summary,
            "oracle_file": root / "oracle_summary.json"}


def _cli(capsys, *argv):
    rc = main([str(a) for a in argv])
    captured = capsys.readouterr()
    return rc, captured.out, captured.err


def test_oracle_maps_hand_counted_dice_and_perfect_aurocs(data):
    s, info = data["oracle"], data["folders"]["oracle"][1]
    case0 = s["metric_per_case"][0]
    assert Path(case0["prediction_file"]).name == f"test_000{END}"
    n1, n2 = info["test_000"]["n1"], info["test_000"]["n2"]
    assert case0["metrics"]["1"]["Dice"] == pytest.approx(2 * (n1 - 5) / (2 * (n1 - 5) + 5))
    assert case0["metrics"]["2"]["Dice"] == pytest.approx(2 * n2 / (2 * n2 + 7))
    assert (case0["metrics"]["1"]["FN"], case0["metrics"]["1"]["FP"], case0["metrics"]["2"]["FP"]) == (5, 0, 7)
    assert case0["metrics"]["1"]["HD95"] >= 0 and case0["metrics"]["2"]["HD95"] > 0
    for entry in s["metric_per_case"]:
        u = entry["uncertainty"]
        assert u["ece_source"] == "total"
        assert u["error_auroc"] == 1.0 and u["entanglement"] == pytest.approx(1.0)
        assert u["ece"] == pytest.approx(0.05, abs=1e-6)  # confidence 0.95 everywhere, every voxel "right"
        assert u["aurc"] < u["error_rate"]
    u3 = s["metric_per_case"][3]["uncertainty"]
    assert u3["conflict_fraction"] == 0 and u3["conflict_auroc_conflict"] is None  # undefined -> null
    for entry in s["metric_per_case"][:3]:
        assert entry["uncertainty"]["conflict_fraction"] > 0
        assert entry["uncertainty"]["conflict_auroc_conflict"] == 1.0
        assert entry["uncertainty"]["conflict_in_conflict"] == 1.0
        assert entry["uncertainty"]["conflict_outside_conflict"] == 0.0
        # the oracle conflict map is the truth: 1 in conflict, 0 on lesion edges (metrics.lesion_edges)
        assert entry["uncertainty"]["conflict_vs_edge_auroc_conflict"] == 1.0
        assert entry["uncertainty"]["conflict_on_edges"] == 0.0
        u, f = entry["uncertainty"], entry["uncertainty"]["conflict_fraction"]
        # the error rates inside and outside conflict recombine to the case's error rate
        assert u["error_in_conflict"] * f + u["error_outside_conflict"] * (1 - f) == pytest.approx(u["error_rate"])
        # every map's mean over the true lesion (any foreground label), as read from the written files
        case = Path(entry["prediction_file"]).name[: -len(END)]
        lesion = sitk.GetArrayFromImage(sitk.ReadImage(str(data["ds"] / "labelsTs" / f"{case}{END}"))) > 0
        for name in ("total", "conflict"):
            written = data["folders"]["oracle"][0] / "uncertainty" / f"{case}_{name}{END}"
            values = sitk.GetArrayFromImage(sitk.ReadImage(str(written)))
            assert u[f"{name}_on_lesion"] == pytest.approx(values[lesion].mean())
            conflict = sitk.GetArrayFromImage(sitk.ReadImage(str(data["ds"] / "conflictTs" / f"{case}{END}"))) > 0
            assert (lesion & ~conflict).any()
            assert u[f"{name}_on_lesion_outside_conflict"] == pytest.approx(values[lesion & ~conflict].mean())
        assert u["conflict_on_lesion_outside_conflict"] == 0.0  # the oracle conflict map is the truth
    pooled = s["uncertainty_pooled"]
    assert pooled["error_auroc"] == 1.0 and pooled["conflict_auroc_conflict"] == 1.0
    assert pooled["conflict_vs_edge_auroc_conflict"] == 1.0 and pooled["conflict_on_edges"] == 0.0
    assert 0 < pooled["error_on_edges"] < 1  # the oracle's flipped voxels fall on edges too
    assert pooled["num_voxels"] == pooled["num_sampled_voxels"] == 4 * 32 * 32
    assert pooled["error_rate"] == pytest.approx(sum(v["errors"] for v in info.values()) / 4096)
    assert s["uncertainty_mean"]["conflict_auroc_conflict"] == 1.0  # nanmean skips test_003
    assert headline(s) == {"dice": s["foreground_mean"]["Dice"], "ece": pooled["ece"], "error_auroc": 1.0,
                           "conflict_auroc_total": pooled["conflict_auroc_total"], "conflict_auroc_conflict": 1.0}


def test_random_maps_and_npz_probabilities(data):
    folder, info = data["folders"]["random"]
    ds = data["ds"]
    s = evaluate_folder(folder, ds / "labelsTs", ds / "conflictTs", num_processes=1, progress=False)
    pooled = s["uncertainty_pooled"]
    assert abs(pooled["error_auroc"] - 0.5) < 0.12
    assert abs(pooled["conflict_auroc_conflict"] - 0.5) < 0.15 and abs(pooled["conflict_auroc_total"] - 0.5) < 0.15
    assert abs(pooled["conflict_vs_edge_auroc_conflict"] - 0.5) < 0.15  # random maps tell nothing apart
    assert abs(pooled["entanglement"]) < 0.15
    assert pooled["ece_source"] == s["uncertainty_mean"]["ece_source"] == "probabilities"
    acc = 1 - 100 / 1024
    for entry in s["metric_per_case"]:
        u = entry["uncertainty"]
        assert u["ece"] == pytest.approx(abs(acc - 0.9), abs=1e-6)  # confidence 0.9 everywhere
        assert u["nll"] == pytest.approx((924 * -math.log(0.9) + 100 * -math.log(0.05)) / 1024, rel=1e-5)
    # pooled ECE (bins of metrics.reliability_curve summed over cases) == metrics.ece on all voxels at once
    probs = np.concatenate([np.load(folder / f"{c}.npz")["probabilities"][:, 0] for c in CASES], axis=1)
    labels = np.concatenate([_read(ds / "labelsTs" / f"{c}{END}") for c in CASES], axis=0)
    assert pooled["ece"] == pytest.approx(metrics.ece(probs, labels), abs=1e-6)  # float32 npz, renormalised
    assert sum(pooled["reliability"]["count"]) == 4096
    # beside it, the P(error) view of total, labelled apart: [1 - total, total] against mask != reference
    total = np.concatenate([_read(folder / "uncertainty" / f"{c}_total{END}").reshape(-1) for c in CASES])
    pred = np.concatenate([_read(folder / f"{c}{END}").reshape(-1) for c in CASES])
    error = (pred != labels.reshape(-1)).astype(np.int64)
    view = np.stack([1 - total, total])
    assert pooled["ece_perror"] == pytest.approx(metrics.ece(view, error), abs=1e-5)
    assert pooled["nll_perror"] == pytest.approx(metrics.nll(view, error), rel=1e-4)
    assert pooled["brier_perror"] == pytest.approx(metrics.brier_score(view, error) / 2, rel=1e-4)
    assert "ece_perror" in s["metric_per_case"][0]["uncertainty"] and "ece_perror" in s["uncertainty_mean"]


def test_calibrated_total_gives_zero_ece_and_hand_brier_nll(data):
    folder, _ = data["folders"]["calibrated"]
    ds = data["ds"]
    s = evaluate_folder(folder, ds / "labelsTs", num_processes=1, progress=False)  # no conflict folder
    brier = (80 * 0.9 ** 2 + 720 * 0.1 ** 2 + 224 * 0.5 ** 2) / 1024
    nll = (80 * -math.log(0.1) + 720 * -math.log(0.9) + 224 * -math.log(0.5)) / 1024
    for entry in s["metric_per_case"]:
        u = entry["uncertainty"]
        assert u["ece"] < 1e-6 and u["ece_source"] == "total"
        assert u["brier"] == pytest.approx(brier, rel=1e-5) and u["nll"] == pytest.approx(nll, rel=1e-5)
        assert "conflict_auroc_total" not in u
    assert s["uncertainty_pooled"]["ece"] < 1e-6
    assert s["uncertainty_pooled"]["brier"] == pytest.approx(brier, rel=1e-5)
    assert math.isnan(headline(s)["conflict_auroc_conflict"])


def test_json_conventions_and_nnunet_compatibility(data, tmp_path):
    from nnunetv2.evaluation.evaluate_predictions import compute_metrics_on_folder, load_summary_json
    from nnunetv2.imageio.simpleitk_reader_writer import SimpleITKIO

    text = data["oracle_file"].read_text()
    assert "NaN" not in text and "Infinity" not in text and "null" in text
    s = json.loads(text)
    assert s == data["oracle"]
    assert isinstance(s["metric_per_case"], list) and len(s["metric_per_case"]) == 4
    assert all({"prediction_file", "reference_file", "metrics", "uncertainty"} <= set(e) for e in s["metric_per_case"])
    assert set(s["mean"]) == {"1", "2"}
    assert s["foreground_mean"]["Dice"] == pytest.approx(np.mean([s["mean"]["1"]["Dice"], s["mean"]["2"]["Dice"]]))
    assert {"uncertainty_mean", "uncertainty_pooled"} <= set(s)
    assert load_summary_json(str(data["oracle_file"]))["mean"][1]["Dice"] == s["mean"]["1"]["Dice"]

    # nnUNetv2_evaluate_folder's function still works on a folder with uncertainty/ and .npz files, same Dice
    folder = data["folders"]["random"][0]
    ours = evaluate_folder(folder, data["ds"] / "labelsTs", num_processes=1, progress=False)
    theirs = compute_metrics_on_folder(str(data["ds"] / "labelsTs"), str(folder), str(tmp_path / "nnunet.json"),
                                       SimpleITKIO(), END, [1, 2], num_processes=1)
    assert len(theirs["metric_per_case"]) == 4
    for label in (1, 2):
        assert ours["mean"][str(label)]["Dice"] == pytest.approx(theirs["mean"][label]["Dice"])
    assert ours["foreground_mean"]["Dice"] == pytest.approx(theirs["foreground_mean"]["Dice"])


def test_regions_and_missing_maps(data, tmp_path):
    ds = data["ds"]
    pred = tmp_path / "pred"
    shutil.copytree(data["folders"]["oracle"][0], pred, ignore=shutil.ignore_patterns("uncertainty"))
    dj = json.loads((ds / "dataset.json").read_text())
    dj["labels"] = {"background": 0, "lesion": [1, 2], "core": 1}
    dj["regions_class_order"] = [2, 1]
    (tmp_path / "regions.json").write_text(json.dumps(dj))
    s = evaluate_folder(pred, ds / "labelsTs", dataset_json=tmp_path / "regions.json", num_processes=1,
                        progress=False)
    n1, n2 = (data["folders"]["oracle"][1]["test_000"][k] for k in ("n1", "n2"))
    n = n1 + n2  # union: 5 voxels lost (FN), 7 gained (FP)
    assert s["metric_per_case"][0]["metrics"]["(1, 2)"]["Dice"] == pytest.approx(2 * (n - 5) / (2 * (n - 5) + 12))
    assert s["foreground_mean"]["Dice"] == pytest.approx(np.mean([s["mean"]["(1, 2)"]["Dice"], s["mean"]["1"]["Dice"]]))
    # no uncertainty/ folder: segmentation metrics only, with a note
    assert "note" in s["uncertainty_mean"] and "ece" not in s["uncertainty_mean"]
    assert all("note" in e["uncertainty"] for e in s["metric_per_case"])
    assert math.isnan(headline(s)["ece"])


def _bad_inputs(kind, data, tmp):
    """Return (argv, expected text in the error line) for one kind of bad input."""
    ds, src = data["ds"], data["folders"]["oracle"][0]
    pred, gt = tmp / "pred", tmp / "labels"
    shutil.copytree(src, pred)
    shutil.copytree(ds / "labelsTs", gt)
    shutil.copy(ds / "dataset.json", tmp / "dataset.json")
    if kind == "missing_reference":
        (gt / f"test_001{END}").unlink()
        expect = "test_001"
    elif kind == "missing_prediction":
        (pred / f"test_002{END}").unlink()
        expect = "test_002"
    elif kind == "geometry":
        image = sitk.ReadImage(str(pred / f"test_000{END}"))
        image.SetSpacing((0.5, 0.5))
        sitk.WriteImage(image, str(pred / f"test_000{END}"))
        expect = str(pred / f"test_000{END}")
    elif kind == "undeclared_label":
        image = sitk.ReadImage(str(pred / f"test_001{END}"))
        arr = sitk.GetArrayFromImage(image)
        arr[0, 0] = 7
        _write(arr, image, pred / f"test_001{END}")
        expect = str(pred / f"test_001{END}")
    elif kind == "map_geometry":
        ref = sitk.ReadImage(str(pred / f"test_002{END}"))
        sitk.WriteImage(sitk.Image([16, 16], sitk.sitkFloat32), str(pred / "uncertainty" / f"test_002_total{END}"))
        expect = str(pred / "uncertainty" / f"test_002_total{END}")
        assert ref.GetSize() == (32, 32)
    elif kind == "missing_dataset_json":
        (pred / "dataset.json").unlink()
        (tmp / "dataset.json").unlink()
        expect = "dataset.json"
    return ["evaluate", "--pred", pred, "--gt", gt, "-o", tmp / "s.json", "-np", "1"], expect


@pytest.mark.parametrize("kind", ["missing_reference", "missing_prediction", "geometry", "undeclared_label",
                                  "map_geometry", "missing_dataset_json"])
def test_bad_inputs_exit_2_with_one_line(data, tmp_path, capsys, kind):
    argv, expect = _bad_inputs(kind, data, tmp_path)
    rc, out, err = _cli(capsys, *argv)
    lines = err.strip().splitlines()
    assert rc == 2 and len(lines) == 1, err
    assert lines[0].startswith("entrust: error: ") and expect in lines[0], lines[0]
    assert not (tmp_path / "s.json").exists()


def test_report_files_and_numbers(data, tmp_path):
    ds, s = data["ds"], data["oracle"]
    out = write_report(data["folders"]["oracle"][0], data["oracle_file"], tmp_path / "report",
                       images_dir=ds / "imagesTs", gt_dir=ds / "labelsTs", conflict_dir=ds / "conflictTs")
    html = (out / "index.html").read_text(encoding="utf-8")
    pngs = sorted(p.name for p in out.glob("*.png"))
    # cases with conflict first: test_003 (no conflict) is left out of 3 figures
    assert pngs == ["case_test_000.png", "case_test_001.png", "case_test_002.png", "reliability.png",
                    "risk_coverage.png"]
    for name in pngs:
        assert (out / name).stat().st_size > 1000
        img = mpimg.imread(out / name)
        assert img.ndim == 3 and img.shape[0] > 200 and img.shape[1] > 300 and img.shape[2] in (3, 4)
        assert img[..., :3].std() > 0.01  # not a blank canvas
        assert f"src='{name}'" in html
    assert f"{s['foreground_mean']['Dice']:.4f}" in html
    assert f"{s['mean']['1']['Dice']:.4f}" in html and f"{s['mean']['2']['HD95']:.4f}" in html
    assert f"{s['uncertainty_pooled']['ece']:.4f}" in html and f"{s['uncertainty_pooled']['aurc']:.4f}" in html
    assert json.loads((out / "summary.json").read_text()) == s


def test_cli_evaluate_with_report_and_report_command(data, tmp_path, capsys):
    ds, pred = data["ds"], data["folders"]["oracle"][0]
    rc, out, err = _cli(capsys, "evaluate", "--pred", pred, "--gt", ds / "labelsTs", "--conflict", ds / "conflictTs",
                        "-o", tmp_path / "sub" / "summary.json", "--report", tmp_path / "rep",
                        "--images", ds / "imagesTs", "-np", "2")
    assert rc == 0, err
    summary = json.loads((tmp_path / "sub" / "summary.json").read_text())
    assert summary["metric_per_case"] == data["oracle"]["metric_per_case"]  # worker pool == in-process loop
    assert f"{summary['foreground_mean']['Dice']:.4f}" in out and str(tmp_path / "sub" / "summary.json") in out
    assert (tmp_path / "rep" / "index.html").is_file()

    rc, _, err = _cli(capsys, "report", pred, "-o", tmp_path / "rep2")
    assert rc == 2 and "--summary" in err and len(err.strip().splitlines()) == 1
    rc, out, err = _cli(capsys, "report", pred, "-o", tmp_path / "rep2", "--gt", ds / "labelsTs", "-np", "1")
    assert rc == 0, err
    assert (tmp_path / "rep2" / "index.html").is_file() and (tmp_path / "rep2" / "reliability.png").is_file()
    rc, out, err = _cli(capsys, "report", pred, "-o", tmp_path / "rep3", "--summary", tmp_path / "sub" / "summary.json")
    assert rc == 0 and (tmp_path / "rep3" / "case_test_000.png").is_file(), err


def test_report_folder_never_replaces_an_input_or_a_foreign_folder(data, tmp_path, capsys):
    """The report folder is built aside and renamed over the old one: the prediction folder itself, a folder above
    it, and a folder holding other files are refused with one line (nothing deleted); an earlier report is
    replaced."""
    import shutil

    ds = data["ds"]
    pred = tmp_path / "pred"
    shutil.copytree(data["folders"]["oracle"][0], pred)
    summary = tmp_path / "summary.json"
    summary.write_text(Path(data["oracle_file"]).read_text())
    before = sorted(p.relative_to(tmp_path) for p in tmp_path.rglob("*"))
    foreign = tmp_path / "notes"
    foreign.mkdir()
    (foreign / "mine.txt").write_text("keep")
    for target in (pred, tmp_path, foreign):
        rc, _, err = _cli(capsys, "report", pred, "-o", target, "--summary", summary, "--gt", ds / "labelsTs")
        assert rc == 2 and len(err.strip().splitlines()) == 1 and str(target) in err, err
    assert sorted(p.relative_to(tmp_path) for p in tmp_path.rglob("*") if "notes" not in p.parts) == before
    assert (foreign / "mine.txt").read_text() == "keep"
    for _ in range(2):  # a new folder, then the earlier report replaced
        rc, _, err = _cli(capsys, "report", pred, "-o", tmp_path / "rep", "--summary", summary, "--gt", ds / "labelsTs")
        assert rc == 0 and (tmp_path / "rep" / "index.html").is_file(), err


def test_3d_hd95_uses_physical_spacing_and_report_slices(tmp_path):
    """A block shifted by one slice along z (2.5 mm) and one voxel along x (0.9 mm): SimpleITK's (x, y, z)
    spacing must reach HD95 as numpy's (z, y, x)."""
    gt = np.zeros((8, 16, 16), np.uint8)
    gt[2:5, 4:10, 4:10] = 1
    pred_z, pred_x = np.roll(gt, 1, axis=0), np.roll(gt, 1, axis=2)
    for folder in ("gt", "pred"):
        (tmp_path / folder).mkdir()
    ref = sitk.GetImageFromArray(gt)
    ref.SetSpacing((0.9, 0.9, 2.5))
    _write(gt, ref, tmp_path / "gt" / f"z{END}")
    _write(gt, ref, tmp_path / "gt" / f"x{END}")
    _write(pred_z, ref, tmp_path / "pred" / f"z{END}")
    _write(pred_x, ref, tmp_path / "pred" / f"x{END}")
    _write(gt, ref, tmp_path / "gt" / f"missed{END}")  # the block missed whole: HD95 = the image's diagonal
    _write(np.zeros_like(gt), ref, tmp_path / "pred" / f"missed{END}")
    (tmp_path / "dataset.json").write_text(json.dumps({"labels": {"background": 0, "block": 1}, "file_ending": END,
                                                       "channel_names": {"0": "CT"}}))
    s = evaluate_folder(tmp_path / "pred", tmp_path / "gt", num_processes=1, progress=False)  # ../dataset.json
    hd = {Path(e["prediction_file"]).name: e["metrics"]["1"]["HD95"] for e in s["metric_per_case"]}
    diagonal = float(np.sqrt((8 * 2.5) ** 2 + 2 * (16 * 0.9) ** 2))
    assert hd == {f"x{END}": pytest.approx(0.9), f"z{END}": pytest.approx(2.5), f"missed{END}": pytest.approx(diagonal)}
    assert s["mean"]["1"]["HD95"] == pytest.approx((0.9 + 2.5 + diagonal) / 3)  # counted, not left out
    assert s["uncertainty_mean"]["note"].startswith("no uncertainty/")
    out = write_report(tmp_path / "pred", s, tmp_path / "report")
    for case in ("x", "z"):  # 3D: one axial slice per case, drawn on a blank canvas without --images
        img = mpimg.imread(out / f"case_{case}.png")
        assert img.ndim == 3 and img[..., :3].std() > 0.01
    assert not (out / "reliability.png").exists()  # no maps, no curves


def test_hypotheses_coherence_diversity_and_ged_against_annotators(data, tmp_path):
    """Hypotheses that take or leave every conflict blob whole, half of them each way, against annotators
    that do the same: coherence 1, diversity 1, and GED^2 below that of K copies of the mask."""
    ds = data["ds"]
    pred_dir = tmp_path / "pred"
    shutil.copytree(data["folders"]["oracle"][0], pred_dir)
    (pred_dir / "hypotheses").mkdir()
    annotators = tmp_path / "annotators"
    annotators.mkdir()
    for case in CASES:
        ref = sitk.ReadImage(str(ds / "labelsTs" / f"{case}{END}"))
        gt = sitk.GetArrayFromImage(ref)
        truth = _read(ds / "conflictTs" / f"{case}{END}") > 0
        for k in range(4):  # hypotheses 0, 2 take every blob as lesion, 1, 3 leave it
            h = np.where(truth, CONFLICT_LABEL if k % 2 == 0 else 0, gt).astype(np.uint8)
            _write(h, ref, pred_dir / "hypotheses" / f"{case}_h{k:02d}{END}")
            _write(h, ref, annotators / f"{case}_a{k}{END}")
    s = evaluate_folder(pred_dir, ds / "labelsTs", ds / "conflictTs", annotators_dir=annotators, num_processes=1,
                        progress=False)
    per_case = [c["hypotheses"] for c in s["metric_per_case"]]
    assert all(c["num_hypotheses"] == 4 for c in per_case)
    with_conflict = [c for c in per_case if "coherence" in c]
    assert len(with_conflict) == 3  # test_003 has no conflict
    assert all(c["coherence"] == 1.0 and c["diversity"] == 1.0 for c in with_conflict)
    for c in with_conflict:  # the hypotheses ARE the annotators' distribution: GED^2 = 0, HM-IoU = 1
        assert c["ged2"] == pytest.approx(0.0, abs=1e-9) and c["hm_iou"] == pytest.approx(1.0)
        assert c["ged2_mask_copies"] > 0.05
    assert s["hypotheses_mean"]["coherence"] == 1.0
    # the error rate against every label: outside conflict the annotators agree with the reference, so it is the
    # reference's; inside, two annotators say lesion and two background, so a mask voxel of either class is wrong
    # for exactly two of them (four if it says ring)
    pooled = s["uncertainty_pooled"]
    assert pooled["error_all_labels_outside_conflict"] == pytest.approx(pooled["error_outside_conflict"])
    n_in = wrong = 0
    for case in CASES:
        pred, gt = _read(pred_dir / f"{case}{END}"), _read(ds / "labelsTs" / f"{case}{END}")
        truth = _read(ds / "conflictTs" / f"{case}{END}") > 0
        n_in += truth.sum()
        wrong += (pred != gt)[truth].sum() + np.where(np.isin(pred[truth], (0, CONFLICT_LABEL)), 2, 4).sum()
    assert pooled["error_all_labels_in_conflict"] == pytest.approx(wrong / (5 * n_in))
    assert pooled["error_all_labels_in_conflict"] > pooled["error_in_conflict"] + 0.3
    # the report draws the first hypotheses beside the mask: three more panels than without them
    with_h = write_report(pred_dir, s, tmp_path / "report_h", gt_dir=ds / "labelsTs", conflict_dir=ds / "conflictTs")
    without = write_report(data["folders"]["oracle"][0], data["oracle"], tmp_path / "report",
                           gt_dir=ds / "labelsTs", conflict_dir=ds / "conflictTs")
    width = [mpimg.imread(r / "case_test_000.png").shape[1] for r in (with_h, without)]
    assert width[0] - width[1] == 3 * 310


def test_voxels_an_annotator_or_the_reference_ignores_leave_the_multi_annotator_metrics(tmp_path):
    """The ignore label is no label: annotators that agree with the mask everywhere else give GED^2 0 and HM-IoU 1,
    and an annotator's ignored voxel is not counted as an error against it."""
    from entrust_nnunet.evaluation.evaluate import error_against_labels

    gt = np.zeros((1, 12, 12), np.uint8)
    gt[0, 3:8, 3:8] = 1
    gt[0, 0, :] = 2  # the reference ignores the first row
    pred = np.where(gt == 2, 0, gt).astype(np.uint8)
    ref = sitk.GetImageFromArray(gt)
    for folder in ("gt", "pred", "annotators"):
        (tmp_path / folder).mkdir()
    _write(gt, ref, tmp_path / "gt" / f"c{END}")
    _write(pred, ref, tmp_path / "pred" / f"c{END}")
    for k in range(2):
        a = pred.copy()
        a[0, 3 + k, 3:8] = 2  # each annotator ignores one row of the lesion
        _write(a, ref, tmp_path / "annotators" / f"c_a{k}{END}")
    (tmp_path / "dataset.json").write_text(json.dumps({"labels": {"background": 0, "lesion": 1, "ignore": 2},
                                                       "file_ending": END, "channel_names": {"0": "CT"}}))
    s = evaluate_folder(tmp_path / "pred", tmp_path / "gt", annotators_dir=tmp_path / "annotators", num_processes=1,
                        progress=False)
    h = s["metric_per_case"][0]["hypotheses"]
    assert h["ged2"] == pytest.approx(0.0, abs=1e-12) and h["hm_iou"] == pytest.approx(1.0)
    assert h["ged2_mask_copies"] == pytest.approx(0.0, abs=1e-12)  # the mask agrees with every annotator too
    labels = np.stack([gt, *(_read(tmp_path / "annotators" / f"c_a{k}{END}") for k in range(2))])
    assert error_against_labels(pred, labels, 2).max() == 0.0
    # lesion on annotator 0's ignored row: right for the reference and annotator 1, not wrong for annotator 0
    lesion = np.ones_like(pred)
    assert np.all(error_against_labels(lesion, labels, 2)[0, 3, 3:8] == 0.0)
    assert np.allclose(error_against_labels(lesion, labels, None)[0, 3, 3:8], 1 / 3)  # as a label it would count
