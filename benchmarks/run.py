"""EnTrust against softmax nnU-Net (raw and temperature-scaled), the 5-fold deep ensemble, MC dropout and CRNP.

EnTrust is scored on fold 0 (the targets' row) and, beside it, after 5-fold cross-validation and ``entrust
calibrate`` (:data:`CALIBRATED_ROW`, ours, never a baseline).

Every method is trained by the stock ``nnUNetv2_train`` on the same data and folds, once per training
seed (``--seeds``, one nnU-Net results root per seed), predicted by ``entrust predict`` (same sliding
window, same four maps, class probabilities saved) and scored by ``entrust evaluate`` on test phantoms
drawn with the benchmark's own TEST seed (:data:`TEST_SEED`), which no design decision has looked at.
Table numbers are mean ± standard deviation over the training seeds; a target is met only when it
holds beyond the spread (``entrust_nnunet.evaluation.seeds.verdict``). Speed and memory are RATIOS to
one plain nnU-Net forward measured in the same run, on one preprocessed patch, after warm-up, over
several repetitions (median and spread reported). Beside the main phantoms, softmax nnU-Net and EnTrust are
trained on training phantoms of the same seed drawn without any conflict blob (the same labels outside the
blobs; intensities, bias and noise are drawn anew) and scored on the same test phantoms (:data:`UNSEEN_ID`): a
conflict never seen in training.

    python benchmarks/run.py                      # 2D phantoms, CPU, three training seeds
    python benchmarks/run.py --ablations          # + EnTrust without EnFuse / SegDiff steps / ProbeStep / CalibHead
    python benchmarks/run.py --no-unseen          # without the unseen-conflict dataset (conflict in test cases only)
    python benchmarks/run.py --smoke              # tiny sizes and schedules, one seed, for the test suite
    python benchmarks/run.py --subsets            # only the missing-modality table: every subset of the modalities
    python benchmarks/run.py --cost               # only the large-size cost tables (benchmarks/cost.py)
    python benchmarks/run.py --device cuda        # on a GPU (absolute times are in the table and JSON either way)
    python benchmarks/run.py --dataset 501 -c 3d_fullres   # any nnU-Net dataset with imagesTs + labelsTs
    python benchmarks/run.py --update-readme      # rewrite README's Results section from the results JSON
    python benchmarks/run.py --update-readme --refresh-cost   # first embed a newer cost_large.json (cost.py)

Outputs: ``OUT/results.json`` (every raw per-seed number, commit, machine, device, seeds) and
``OUT/results.md``; a default (non-smoke) phantom run also writes ``benchmarks/results/phantoms2d.json``,
the file ``--update-readme`` makes the README table from.
"""
from __future__ import annotations

import argparse
import json
import os
import platform
import shutil
import statistics
import subprocess
import sys
import time
from pathlib import Path

REPO = Path(__file__).resolve().parent.parent
README_BEGIN, README_END = "<!-- results:begin -->", "<!-- results:end -->"
RESULTS_JSON = REPO / "benchmarks" / "results" / "phantoms2d.json"
COST_JSON = REPO / "benchmarks" / "results" / "cost_large.json"

#: the phantoms' seeds. Training cases: DATA_SEED. Test cases: TEST_SEED, never used for a design decision
#: (those are made on the validation folds or on DEVELOPMENT_SEED's test cases: ``--test-seed 1``).
#: The README's tables before issue 11 used seed 0 for both, and seed 0's test cases chose S = 2, the
#: CalibHead inputs and the conflict map's inputs: they are in-sample for those choices.
DATA_SEED, TEST_SEED, DEVELOPMENT_SEED, SMOKE_TEST_SEED = 0, 2026, 1, 99
TEMPERATURE_ROW = "softmax nnU-Net + temperature"
#: label variants per test case (each conflict blob re-flipped, boundaries moved by a voxel): GED^2 and HM-IoU of
#: every method's hypotheses; the training cases keep one label each, as a user's dataset has
TEST_ANNOTATORS = 4

#: the trainer of EnTrust's rows (``--entrust-variant`` names another)
ENTRUST_TRAINER = "nnUNetTrainerEnTrust_demo"
#: method -> (trainer, plans, folds used for prediction, sampling count)
METHODS = {
    "softmax nnU-Net": ("nnUNetTrainer_demo", "nnUNetPlans", [0], 1),
    TEMPERATURE_ROW: ("nnUNetTrainer_demo", "nnUNetPlans", [0], 1),  # the softmax model, T fitted on fold 0's validation
    "5-fold deep ensemble": ("nnUNetTrainer_demo", "nnUNetPlans", [0, 1, 2, 3, 4], 1),
    "MC dropout (T=8)": ("nnUNetTrainerMCDropout_demo", "nnUNetPlans", [0], 8),
    "CRNP": ("nnUNetTrainerCRNP_demo", "nnUNetPlans", [0], 1),
    "EnTrust (K=8)": (ENTRUST_TRAINER, "nnUNetEnTrustPlans", [0], 8),
    "EnTrust 5 folds + entrust calibrate": (ENTRUST_TRAINER, "nnUNetEnTrustPlans", [0, 1, 2, 3, 4], 8),
}
OURS = "EnTrust (K=8)"
#: EnTrust after the toolchain a user runs once 5-fold cross-validation is done: ``entrust calibrate`` on every fold's
#: out-of-fold voxels (class temperature and conflict biases, P(error) calibrator), the five folds ensembled; on a
#: copy of the model folder, so that OURS (fold 0) keeps its one-fold calibration
CALIBRATED_ROW = "EnTrust 5 folds + entrust calibrate"
#: ablation -> (trainer, plans, folds, K); "without CalibHead" is EnTrust's own model with CalibHead unfitted
ABLATIONS = {
    "EnTrust without EnFuse (concatenation)": ("nnUNetTrainerEnTrustNoEnFuse_demo", "nnUNetEnTrustPlans", [0], 8),
    "EnTrust without SegDiff steps (head only)": ("nnUNetTrainerEnTrustNoSteps_demo", "nnUNetEnTrustPlans", [0], 8),
    "EnTrust without expert alternatives": ("nnUNetTrainerEnTrustNoAlternatives_demo", "nnUNetEnTrustPlans", [0], 8),
    "EnTrust without ProbeStep": ("nnUNetTrainerEnTrustNoProbe_demo", "nnUNetEnTrustPlans", [0], 8),
    "EnTrust without CalibHead (1 - max prob.)": ("nnUNetTrainerEnTrust_demo", "nnUNetEnTrustPlans", [0], 8),
}
NO_CALIB = "EnTrust without CalibHead (1 - max prob.)"
#: the unseen-conflict dataset (issue 12): training phantoms of the same seed without any conflict blob (same labels
#: outside the blobs, intensities drawn anew), the same test phantoms (with them); a conflict no training case
#: showed, so CalibHead never saw one either
UNSEEN_ID, UNSEEN_METHODS = 612, ("softmax nnU-Net", OURS)
SMOKE_TRAINERS = {"nnUNetTrainer_demo": "nnUNetTrainer_tinyCPU",
                  "nnUNetTrainerMCDropout_demo": "nnUNetTrainerMCDropout_tinyCPU",
                  "nnUNetTrainerCRNP_demo": "nnUNetTrainerCRNP_tinyCPU",
                  "nnUNetTrainerEnTrust_demo": "nnUNetTrainerEnTrust_tinyCPU",
                  **{t: t.replace("_demo", "_tinyCPU") for t, *_ in ABLATIONS.values()}}
#: the smoke run (a test) keeps the suite short: MC dropout and CRNP are tested through
#: ``entrust predict`` in tests/nnunet/test_baseline_trainers.py, so it runs only these, with K = 1 and 8
SMOKE_METHODS = ("softmax nnU-Net", TEMPERATURE_ROW, "5-fold deep ensemble", OURS)
#: the row keys a method row keeps from ``entrust evaluate``'s pooled summary
POOLED_KEYS = ("ece", "ece_fg_boundary", "brier", "nll", "ece_perror", "ece_fg_boundary_perror", "brier_perror",
               "nll_perror", "error_auroc", "aurc", "error_rate", "conflict_auroc_total", "conflict_auroc_conflict",
               "entanglement", "total_in_conflict", "error_in_conflict", "total_outside_conflict",
               "error_outside_conflict", "conflict_in_conflict", "conflict_outside_conflict",
               "conflict_vs_edge_auroc_conflict", "conflict_vs_edge_auroc_total", "conflict_on_edges", "total_on_edges",
               "error_on_edges", "total_on_lesion", "total_on_lesion_outside_conflict", "error_all_labels_in_conflict")


def methods(args, table: dict | None = None) -> dict:
    """``table`` (METHODS) with ``args.entrust_variant``'s trainer in EnTrust's rows of METHODS (``CrossModal``:
    nnUNetTrainerEnTrustCrossModal_demo); for the smoke run (``args.smoke``) SMOKE_METHODS (ablations: all) with the
    tiny trainers and a 2-fold ensemble."""
    table = METHODS if table is None else table
    variant = getattr(args, "entrust_variant", None) or ""
    # EnTrust's own rows only: the ablations (the no-CalibHead row included) stay ablations of EnTrust
    swap = {ENTRUST_TRAINER: ENTRUST_TRAINER.replace("EnTrust_", f"EnTrust{variant}_")} if table is METHODS else {}
    rows = {m: (swap.get(t, t), p, folds, k) for m, (t, p, folds, k) in table.items()}
    if not args.smoke:
        return rows
    return {m: (SMOKE_TRAINERS.get(t, t.replace("_demo", "_tinyCPU")), p, folds[:2], k) for m, (t, p, folds, k) in rows.items()
            if m in SMOKE_METHODS or table is not METHODS}


def results_json(args) -> Path:
    """Where a full run's results go: RESULTS_JSON, or beside it per EnTrust variant (phantoms2d_crossmodal.json)."""
    variant = getattr(args, "entrust_variant", None)
    return RESULTS_JSON.with_name(f"{RESULTS_JSON.stem}_{variant.lower()}.json") if variant else RESULTS_JSON


def trainer_exists(name: str) -> bool:
    from nnunetv2.utilities.find_objects import recursive_find_trainer_class_by_name

    try:
        recursive_find_trainer_class_by_name(name)
        return True
    except (RuntimeError, ImportError):
        return False


def git_commit() -> str:
    r = subprocess.run(["git", "rev-parse", "HEAD"], cwd=REPO, capture_output=True, encoding="utf-8", errors="replace")
    dirty = subprocess.run(["git", "status", "--porcelain"], cwd=REPO, capture_output=True, encoding="utf-8", errors="replace").stdout.strip()
    return r.stdout.strip() + ("+dirty" if dirty else "")


def machine() -> dict:
    import torch

    info = {"platform": platform.platform(), "python": platform.python_version(), "cpus": os.cpu_count(),
            "torch": torch.__version__}
    if torch.cuda.is_available():
        info["gpu"] = torch.cuda.get_device_name(0)
    return info


def model_folder(name: str, trainer: str, plans: str, config: str) -> Path:
    """nnU-Net's model folder under the CURRENT ``nnUNet_results`` (one root per training seed)."""
    return Path(os.environ["nnUNet_results"]) / name / f"{trainer}__{plans}__{config}"


# ------------------------------------------------------------------------------------------ training
def use_seed(args, seed: int) -> None:
    """Train and read models of training seed ``seed``: its own nnU-Net results root, the seed for the trainers."""
    os.environ["nnUNet_results"] = str(Path(args.results_root) / f"seed_{seed}")
    os.environ["ENTRUST_TRAIN_SEED"] = str(seed)
    Path(os.environ["nnUNet_results"]).mkdir(parents=True, exist_ok=True)


def trained(model: Path, folds) -> bool:
    """Every fold of ``folds`` has finished training in ``model``."""
    return all((model / f"fold_{f}" / "checkpoint_final.pth").exists() for f in folds)


def train_all(args, dataset_id: int, name: str, config: str, table: dict, log_dir: Path) -> dict[str, float]:
    """Train every needed (trainer, fold) under the current results root; seconds per iteration per trainer."""
    from entrust_nnunet.pipeline import train_fold
    from entrust_nnunet.nnunet.variants import DEMO_SCHEDULE, TINY_SCHEDULE

    schedule = TINY_SCHEDULE if args.smoke else DEMO_SCHEDULE
    needed: dict[tuple[str, str], set[int]] = {}
    for trainer, plans, folds, _ in table.values():
        needed.setdefault((trainer, plans), set()).update(folds)
    per_iteration = {}
    # the temperature row's fold-0 validation keeps its probabilities as it is trained (no second --val run)
    temperature = table.get(TEMPERATURE_ROW, (None, None))[:2]
    for (trainer, plans), folds in needed.items():
        if not trainer_exists(trainer):
            print(f"skipping {trainer}: not found")
            continue
        for fold in sorted(folds):
            if not (model_folder(name, trainer, plans, config) / f"fold_{fold}" / "checkpoint_final.pth").exists():
                train_fold(dataset_id, config, str(fold), trainer, plans, args.device, None,
                           log_dir / f"train_{trainer}_{fold}.log", npz=(trainer, plans) == temperature and fold == 0)
        per_iteration[trainer] = seconds_per_iteration(log_dir / f"train_{trainer}_{min(folds)}.log",
                                                       schedule["num_iterations_per_epoch"])
    return per_iteration


def seconds_per_iteration(log: Path, iterations: int) -> float:
    """Median epoch time / iterations over the epochs after the first (warm-up), from nnU-Net's training log.

    nnU-Net's epoch time includes its few validation iterations; all methods carry the same share.
    """
    if not log.exists():
        return float("nan")
    times = [float(line.rsplit(":", 1)[1].strip().rstrip("s")) for line in log.read_text(encoding="utf-8").splitlines()
             if "Epoch time:" in line]
    times = times[1:] or times
    return statistics.median(times) / iterations if times else float("nan")


# ------------------------------------------------------------------------------------------ temperature
def validation_probabilities(args, dataset_id: int, config: str, trainer: str, plans: str, model: Path, log: Path):
    """nnU-Net's out-of-fold validation probabilities of fold 0: kept by its training (``--npz``), else from
    ``nnUNetv2_train ... --val --npz`` once (a model trained without them)."""
    folder = model / "fold_0" / "validation"
    if not list(folder.glob("*.npz")):
        exe = Path(sys.executable).with_name("nnUNetv2_train")
        cmd = [str(exe if exe.exists() else "nnUNetv2_train"), str(dataset_id), config, "0", "-tr", trainer, "-p", plans,
               "-device", args.device, "--val", "--npz"]
        with open(log, "w", encoding="utf-8") as f:
            subprocess.run(cmd, stdout=f, stderr=subprocess.STDOUT, env=os.environ, check=True)
    return sorted(folder.glob("*.npz"))


def fit_softmax_temperature(npz_files: list[Path], labels_dir: Path, ending: str, max_voxels: int = 2_000_000) -> float:
    """One temperature, NLL-fitted on the validation fold's out-of-fold probabilities (the cases EnTrust's
    CalibHead is fitted on); voxels subsampled uniformly (seeded) above ``max_voxels``. nnU-Net's validation
    probabilities are a plain softmax (down to 1e-15), the test probabilities it is applied to come through our
    predictor with its floor (``MIN_PROBABILITY``): fitted with that floor, on what it is applied to."""
    import numpy as np
    import SimpleITK as sitk

    from entrust_nnunet.evaluation.temperature import fit_temperature
    from entrust_nnunet.model.outputs import MIN_PROBABILITY

    probs, labels = [], []
    for f in npz_files:
        p = np.load(f)["probabilities"]
        y = sitk.GetArrayFromImage(sitk.ReadImage(str(labels_dir / f"{f.stem}{ending}")))
        probs.append(p.reshape(p.shape[0], -1).astype(np.float64))
        labels.append(y.reshape(-1).astype(np.int64))
    p, y = np.concatenate(probs, 1), np.concatenate(labels)
    if y.size > max_voxels:
        keep = np.random.default_rng(0).choice(y.size, max_voxels, replace=False)
        p, y = p[:, keep], y[keep]
    return fit_temperature(p, y, eps=MIN_PROBABILITY)


def temperature_folder(src: Path, dst: Path, temperature: float, ending: str) -> Path:
    """The softmax predictions of ``src`` with temperature-scaled probabilities: same masks (T keeps the argmax),
    ``.npz`` and maps from ``softmax(log p / T)``: total = 1 - max, aleatoric = entropy, epistemic 0, conflict 0."""
    import numpy as np
    import SimpleITK as sitk

    from entrust_nnunet.data.io import MAP_FOLDER, map_path, write_image
    from entrust_nnunet.evaluation.temperature import temperature_scale

    (dst / MAP_FOLDER).mkdir(parents=True, exist_ok=True)
    for f in ("dataset.json", "plans.json"):
        shutil.copy(src / f, dst / f)
    for npz in sorted(src.glob("*.npz")):
        case = npz.stem
        p = np.load(npz)["probabilities"]
        q = temperature_scale(p.reshape(p.shape[0], -1), temperature).reshape(p.shape).astype(np.float32)
        np.savez_compressed(dst / f"{case}.npz", probabilities=q)
        for extra in (f"{case}.pkl", f"{case}{ending}"):
            shutil.copy(src / extra, dst / extra)
        mask = sitk.ReadImage(str(src / f"{case}{ending}"))
        shape = sitk.GetArrayViewFromImage(mask).shape
        entropy = -(q * np.log(np.clip(q, 1e-12, None))).sum(0)
        maps = {"total": 1 - q.max(0), "aleatoric": entropy, "epistemic": np.zeros_like(entropy),
                "conflict": np.zeros_like(entropy)}
        for name, values in maps.items():
            image = sitk.GetImageFromArray(np.asarray(values, dtype=np.float32).reshape(shape))
            image.CopyInformation(mask)
            write_image(image, map_path(dst, case, name, ending))
    return dst


def without_calib_head(src: Path, dst: Path, folds) -> Path:
    """A copy of an EnTrust model folder whose checkpoints have CalibHead unfitted (``calib.fitted`` = 0), so
    the predictor exports ``1 - max probability`` as ``total``: the "without CalibHead" inference switch."""
    import torch

    from entrust_nnunet.data.io import temporary_path
    from entrust_nnunet.nnunet.checkpoints import load_checkpoint

    copy_model_folder(src, dst, folds)
    for fold in folds:
        ckpt = load_checkpoint(src / f"fold_{fold}" / "checkpoint_final.pth")  # weights only, as predict loads it
        ckpt["network_weights"]["calib.fitted"] = torch.zeros(())
        final = dst / f"fold_{fold}" / "checkpoint_final.pth"
        tmp = temporary_path(final)  # a killed run leaves no half-written checkpoint under the final name
        torch.save(ckpt, tmp)
        os.replace(tmp, final)
    return dst


def copy_model_folder(src: Path, dst: Path, folds, fold_files: tuple[str, ...] = ()) -> None:
    """``src``'s plans.json and dataset.json into ``dst``, a ``fold_X`` folder per fold with ``fold_files``."""
    dst.mkdir(parents=True, exist_ok=True)
    for f in ("plans.json", "dataset.json"):
        shutil.copy(src / f, dst / f)
    for fold in folds:
        (dst / f"fold_{fold}").mkdir(exist_ok=True)
        for f in fold_files:
            shutil.copy(src / f"fold_{fold}" / f, dst / f"fold_{fold}" / f)


def conflict_readings(model: Path, folds) -> dict | None:
    """The conflict reading each fold's CalibHead chose (the flag of its out-of-fold voxels file) and the one
    ``entrust calibrate`` chose for all of them (None: each fold's own); None for models without the choice."""
    from entrust_nnunet.nnunet.calibration import FOLD_VOXELS_FILE, load_calibrator, voxels_file_reading

    files = {str(f): model / f"fold_{f}" / FOLD_VOXELS_FILE for f in folds}
    chosen = {f: r for f, p in files.items() if p.is_file() and (r := voxels_file_reading(p)) is not None}
    if not chosen:
        return None
    calibrator = load_calibrator(model)
    return {"folds": chosen, "calibrated": calibrator and calibrator.conflict_reading}


def calibrated_copy(src: Path, dst: Path, folds) -> Path:
    """A copy of an EnTrust model folder (``dst`` keeps ``src``'s name: the calibration file is tied to it) with
    ``entrust calibrate`` run on the out-of-fold voxels of ``folds``."""
    from entrust_nnunet.nnunet.calibration import (CALIBRATION_FILE, FOLD_VOXELS_FILE, OTHER_READING_VOXELS_FILE,
                                                   calibrate_model)

    if not (dst / CALIBRATION_FILE).exists():
        for stale in dst.glob(f"fold_*/{OTHER_READING_VOXELS_FILE}"):  # an interrupted copy's, maybe another run's
            stale.unlink()
        copy_model_folder(src, dst, folds, ("checkpoint_final.pth", FOLD_VOXELS_FILE))
        for other in (src / f"fold_{f}" / OTHER_READING_VOXELS_FILE for f in folds):  # folds that chose a reading
            if other.is_file():
                shutil.copy(other, dst / other.parent.name / other.name)
        calibrate_model(dst, list(folds))
    return dst


# ------------------------------------------------------------------------------------------ speed
SPEED_SNIPPET = r"""
import json, statistics, sys, threading, time, torch
from entrust_nnunet.model.sampling import SamplingSettings
from entrust_nnunet.nnunet.predictor import EnTrustPredictor
cfg = json.loads(sys.argv[1])
torch.set_num_threads(cfg["threads"])
device = torch.device(cfg["device"])
p = EnTrustPredictor(device=device, allow_tqdm=False, use_mirroring=False,
                     sampling=SamplingSettings(num_hypotheses=cfg["k"], probe=cfg["probe"]))
p.initialize_from_trained_model_folder(cfg["model"], cfg["folds"])
net = p.network.to(device).eval()
x = torch.randn(1, cfg["channels"], *cfg["patch"], device=device)
def rss():
    with open("/proc/self/statm") as f:
        return int(f.read().split()[1]) * 4096
def once():
    for params in p.list_of_parameters:   # one pass per fold, as nnU-Net's predictor does
        if len(p.list_of_parameters) > 1:
            net.load_state_dict(params)
        out = net(x) if cfg["stats"] else net.net(x)
    if device.type == "cuda":
        torch.cuda.synchronize()
with torch.inference_mode():
    for _ in range(cfg["warmup"]):
        once()
    times = []
    for _ in range(cfg["repeats"] if cfg["time"] else 0):
        t = time.perf_counter(); once(); times.append(time.perf_counter() - t)
    # memory: peak resident memory ABOVE the loaded model during one pass, sampled every 0.2 ms
    # (CPU: torch has no allocator statistics there); CUDA: the allocator's own peak
    if not cfg["memory"]:
        peak = None
    elif device.type == "cuda":
        torch.cuda.empty_cache(); torch.cuda.reset_peak_memory_stats()
        base = torch.cuda.memory_allocated(); once()
        peak = torch.cuda.max_memory_allocated() - base
    else:
        import gc; gc.collect()
        base, high, done = rss(), [0], threading.Event()
        def watch():
            while not done.is_set():
                high[0] = max(high[0], rss()); time.sleep(0.0002)
        w = threading.Thread(target=watch); w.start()
        for _ in range(3):
            once()
        done.set(); w.join()
        peak = max(high[0] - base, 0)
print(json.dumps({"times": times, "peak_bytes": peak}))
"""


def speed_jobs(args, models: dict[str, Path]) -> list[tuple]:
    """(label, model, K, with maps, folds) of every one-patch measurement, plain first."""
    jobs = [("plain nnU-Net forward", "softmax nnU-Net", 1, False, [0])]
    jobs += [(f"EnTrust K={k}", OURS, k, True, [0]) for k in ((8,) if args.smoke else (1, 4, 8, 16))]
    if args.smoke:  # the harness needs one row against plain; every fresh process costs the suite seconds
        return [j for j in jobs if j[1] in models]
    jobs += [("5-fold deep ensemble", "5-fold deep ensemble", 1, True, methods(args)["5-fold deep ensemble"][2]),
             ("MC dropout T=8", "MC dropout (T=8)", 8, True, [0]), ("CRNP", "CRNP", 1, True, [0])]
    jobs += [(f"{a} K=8", a, 8, True, [0]) for a in ABLATIONS]
    return [j for j in jobs if j[1] in models]


def measure_one(args, cfg: dict) -> dict | None:
    """Times and peak memory of one job, in fresh processes (times without, memory with glibc's trim settings)."""
    # time and memory in separate processes: on CPU, memory is read with glibc told to return every freed
    # tensor to the OS (a fixed mmap threshold), which makes each allocation slower and would skew times.
    # The smoke run only checks the harness, so it does both in one process.
    memory_env = {**os.environ, "MALLOC_MMAP_THRESHOLD_": "65536", "MALLOC_TRIM_THRESHOLD_": "65536"}
    runs = [(True, True, memory_env)] if args.smoke else [(True, False, os.environ), (False, True, memory_env)]
    out = {}
    for timed, memory, env in runs:
        r = subprocess.run([sys.executable, "-c", SPEED_SNIPPET, json.dumps({**cfg, "time": timed, "memory": memory})],
                           capture_output=True, encoding="utf-8", errors="replace", env=env, timeout=1800)
        if r.returncode != 0:
            print(f"speed {cfg['model']} failed:\n{r.stderr[-2000:]}")
            return None
        measured = json.loads(r.stdout.strip().splitlines()[-1])
        out.update({"times": measured["times"]} if timed else {})
        out.update({"peak_bytes": measured["peak_bytes"]} if memory else {})
    t = out["times"]
    return {"median_s": statistics.median(t), "min_s": min(t), "max_s": max(t), "n": len(t), "times": t,
            "peak_bytes": out.get("peak_bytes", 0)}


def measure_speed(args, models: dict[str, Path], channels: int, patch: list[int]) -> dict:
    """Forward time and peak memory per method on one patch, each in a fresh process; ratios to plain."""
    rows = {}
    for label, method, k, stats, folds in speed_jobs(args, models):
        cfg = {"model": str(models[method]), "folds": folds, "k": k, "probe": True, "stats": stats,
               "channels": channels, "patch": patch, "device": args.device, "threads": args.threads,
               "warmup": 2 if args.smoke else 3, "repeats": 3 if args.smoke else args.repeats}
        row = measure_one(args, cfg)
        if row is not None:
            rows[label] = row
    base = rows.get("plain nnU-Net forward")
    for row in rows.values():
        if base:
            row["time_ratio"] = row["median_s"] / base["median_s"]
            row["time_ratios"] = [t / base["median_s"] for t in row["times"]]
            row["memory_ratio"] = row["peak_bytes"] / base["peak_bytes"] if base["peak_bytes"] else float("nan")
    return rows


# ------------------------------------------------------------------------------------------ data
def prepare_dataset(args, out: Path) -> tuple[int, str, str]:
    """(dataset id, dataset name, configuration): phantoms under OUT by default, else ``--dataset`` from nnU-Net's roots."""
    from entrust_nnunet.data.io import InputError
    from entrust_nnunet.nnunet.env import ensure_ext_trainer, set_nnunet_roots
    from entrust_nnunet.data.phantoms import write_phantom_dataset

    if args.dataset is None:
        set_nnunet_roots(out / "nnunet")
        ensure_ext_trainer()
        dataset_id, name = 611, f"Dataset611_BenchPhantomsTest{args.test_seed}"
        raw = Path(os.environ["nnUNet_raw"]) / name
        if not raw.exists():
            write_phantom_dataset(raw, num_cases=8 if args.smoke else args.n,
                                  num_test=3 if args.smoke else args.num_test, dim=2, size=32 if args.smoke else 64,
                                  seed=args.data_seed, test_seed=args.test_seed, num_test_annotators=TEST_ANNOTATORS)
        return dataset_id, name, args.c
    missing = [v for v in ("nnUNet_raw", "nnUNet_preprocessed", "nnUNet_results") if not os.environ.get(v)]
    if missing:
        raise InputError(f"--dataset {args.dataset}: set {', '.join(missing)} (`entrust env --root DIR` prints the lines)")
    ensure_ext_trainer()
    from nnunetv2.utilities.dataset_name_id_conversion import maybe_convert_to_dataset_name

    try:
        name = maybe_convert_to_dataset_name(args.dataset)
    except RuntimeError as e:
        raise InputError(f"--dataset {args.dataset}: {str(e).splitlines()[0]}") from None
    raw = Path(os.environ["nnUNet_raw"]) / name
    for folder in ("imagesTs", "labelsTs"):
        if not (raw / folder).is_dir():
            raise InputError(f"{raw / folder}: missing; the benchmark scores held-out cases against their labels")
    return int(name[7:10]), name, args.c


def unseen_dataset(args, config: str) -> tuple[int, str, str, Path]:
    """(id, name, configuration, raw folder) of the unseen-conflict phantoms, written, planned and preprocessed."""
    from entrust_nnunet.data.phantoms import write_phantom_dataset

    name = f"Dataset{UNSEEN_ID}_BenchUnseenConflictTest{args.test_seed}"
    raw = Path(os.environ["nnUNet_raw"]) / name
    if not raw.exists():
        write_phantom_dataset(raw, num_cases=args.n, num_test=args.num_test, dim=2, size=64, seed=args.data_seed,
                              test_seed=args.test_seed, conflict_in="test")
    plan_if_needed(UNSEEN_ID, name, config)
    return UNSEEN_ID, name, config, raw


def predict_method(args, raw: Path, pred: Path, model: Path, folds, k: int, **absent) -> float:
    """``entrust predict`` of the test cases (class probabilities saved); seconds taken. ``absent``:
    ``drop_modalities`` / ``absent_without_dropout`` of ``predict_folder`` (the --subsets table)."""
    from entrust_nnunet.model.sampling import SamplingSettings
    from entrust_nnunet.predict import predict_folder

    t = time.time()
    if not any(pred.glob("*.npz")):
        predict_folder(raw / "imagesTs", pred, model, folds=folds, device=args.device, save_probabilities=True,
                       sampling=SamplingSettings(num_hypotheses=k), num_processes_preprocessing=0,
                       num_processes_export=1, save_hypotheses=True, **absent)
    return time.time() - t


def evaluate_row(raw: Path, pred: Path) -> dict:
    """``entrust evaluate`` of a prediction folder -> the table row (pooled numbers, per-label Dice/HD95)."""
    from entrust_nnunet.evaluation.evaluate import evaluate_folder
    from entrust_nnunet.evaluation.summary import headline

    conflict_dir = raw / "conflictTs" if (raw / "conflictTs").is_dir() else None
    annotators = raw / "labelsTs_annotators"
    summary = evaluate_folder(pred, raw / "labelsTs", conflict_dir=conflict_dir,
                              dataset_json=raw / "dataset.json", output_file=pred / "summary.json", num_processes=1,
                              annotators_dir=annotators if annotators.is_dir() else None)
    row = dict(headline(summary))
    pooled, mean = summary.get("uncertainty_pooled", {}), summary.get("uncertainty_mean", {})
    for key in POOLED_KEYS:
        row[key] = pooled.get(key, mean.get(key))
    # MC dropout's passes and the ensemble's folds are their hypotheses; GED^2 / HM-IoU against the test annotators
    for key in ("coherence", "diversity", "ged2", "ged2_mask_copies", "hm_iou"):
        row[key] = summary.get("hypotheses_mean", {}).get(key)
    for label, values in summary.get("mean", {}).items():
        row[f"dice_{label}"] = values.get("Dice")
        row[f"hd95_{label}"] = values.get("HD95")
    return row


# ------------------------------------------------------------------------------------------ one seed
def run_seed(args, seed: int, dataset_id: int, name: str, config: str, raw: Path, out: Path) -> tuple[dict, dict]:
    """Train, predict and score every method with training seed ``seed`` under its own results root.

    Returns (the seed's record for the JSON, method -> model folder)."""
    use_seed(args, seed)
    table = methods(args)
    if args.ablations and seed == args.seeds[0]:
        table = {**table, **{a: v for a, v in methods(args, ABLATIONS).items() if a != NO_CALIB}}
    log_dir = out / f"seed_{seed}"
    log_dir.mkdir(parents=True, exist_ok=True)
    started = time.time()
    train = train_all(args, dataset_id, name, config, table, log_dir)
    record, models = {"seed": seed, "results_root": os.environ["nnUNet_results"], "train_s_per_iteration": train,
                      "methods": {}, "ablations": {}}, {}
    for method, (trainer, plans, folds, k) in table.items():
        model = model_folder(name, trainer, plans, config)
        if method == TEMPERATURE_ROW or not trained(model, folds):
            continue
        if method == CALIBRATED_ROW:
            model = calibrated_copy(model, log_dir / "models" / "calibrated" / model.name, folds)
        models[method] = model
        pred = log_dir / "predictions" / method.split(" (")[0].replace(" ", "_")
        seconds = predict_method(args, raw, pred, model, folds, k)
        where = "ablations" if method in ABLATIONS else "methods"
        record[where][method] = {**evaluate_row(raw, pred), "predict_seconds_all_cases": seconds,
                                 "conflict_reading": conflict_readings(model, folds)}
    extra = temperature_row(args, dataset_id, config, name, raw, log_dir, record)
    if args.ablations and seed == args.seeds[0] and OURS in models:
        models[NO_CALIB] = no_calib_row(args, raw, log_dir, models[OURS], record)
    record.update(extra, wall_seconds=time.time() - started)
    return record, models


def unseen_seed(args, seed: int, unseen: tuple, out: Path) -> dict:
    """method -> row on the unseen-conflict dataset for training seed ``seed`` (same results root as the seed's)."""
    dataset_id, name, config, raw = unseen
    use_seed(args, seed)
    table = {m: v for m, v in methods(args).items() if m in UNSEEN_METHODS}
    log_dir = out / f"seed_{seed}" / "unseen_conflict"
    log_dir.mkdir(parents=True, exist_ok=True)
    train_all(args, dataset_id, name, config, table, log_dir)
    rows = {}
    for method, (trainer, plans, folds, k) in table.items():
        model = model_folder(name, trainer, plans, config)
        if trained(model, folds):
            pred = log_dir / "predictions" / method.split(" (")[0].replace(" ", "_")
            predict_method(args, raw, pred, model, folds, k)
            rows[method] = evaluate_row(raw, pred)
    return rows


def temperature_row(args, dataset_id: int, config: str, name: str, raw: Path, log_dir: Path, record: dict) -> dict:
    """The temperature-scaled softmax row: T from fold 0's out-of-fold validation probabilities."""
    trainer, plans, _, _ = methods(args)["softmax nnU-Net"]
    src = log_dir / "predictions" / "softmax_nnU-Net"
    dataset_json = json.loads((raw / "dataset.json").read_text())
    if "softmax nnU-Net" not in record["methods"] or dataset_json.get("regions_class_order"):
        return {}  # with regions nnU-Net saves per-region sigmoids, not a softmax to scale
    model = model_folder(name, trainer, plans, config)
    ending = dataset_json["file_ending"]
    npz = validation_probabilities(args, dataset_id, config, trainer, plans, model, log_dir / "validation_npz.log")
    temperature = fit_softmax_temperature(npz, raw / "labelsTr", ending)
    dst = temperature_folder(src, log_dir / "predictions" / "softmax_temperature", temperature, ending)
    record["methods"][TEMPERATURE_ROW] = {**evaluate_row(raw, dst), "temperature": temperature}
    return {"temperature": temperature, "temperature_fitted_on": [p.stem for p in npz]}


def no_calib_row(args, raw: Path, log_dir: Path, entrust_model: Path, record: dict) -> Path:
    """EnTrust's own model with CalibHead switched off: total = 1 - max pooled probability."""
    model = without_calib_head(entrust_model, log_dir / "models" / "entrust_no_calib", [0])
    pred = log_dir / "predictions" / "EnTrust_no_calib"
    seconds = predict_method(args, raw, pred, model, [0], 8)
    record["ablations"][NO_CALIB] = {**evaluate_row(raw, pred), "predict_seconds_all_cases": seconds}
    return model


# ------------------------------------------------------------------------------------------ modality subsets
def subsets_seed(args, seed: int, dataset_id: int, name: str, config: str, raw: Path, out: Path) -> dict:
    """method -> subset -> numbers (plus their mean over subsets) for training seed ``seed``."""
    from subsets import modality_subsets, subset_methods, subset_row, with_mean

    from entrust_nnunet.data.modalities import channel_list

    use_seed(args, seed)
    table = subset_methods(args.smoke)
    log_dir = out / f"seed_{seed}"
    log_dir.mkdir(parents=True, exist_ok=True)
    train_all(args, dataset_id, name, config, {m: v[:4] for m, v in table.items()}, log_dir)
    names = channel_list(json.loads((raw / "dataset.json").read_text())["channel_names"])
    record = {}
    for method, (trainer, plans, folds, k, zero_fill) in table.items():
        model = model_folder(name, trainer, plans, config)
        if not trained(model, folds):
            continue
        rows = {}
        for subset, drop in modality_subsets(names):
            pred = log_dir / "subsets" / method.split(" (")[0].replace(" ", "_").replace(",", "") / subset
            predict_method(args, raw, pred, model, folds, k, drop_modalities=drop, absent_without_dropout=zero_fill)
            rows[subset] = subset_row(evaluate_row(raw, pred))
        record[method] = with_mean(rows)
    return record


def run_subsets(args) -> dict:
    """``--subsets``: the missing-modality table (benchmarks/subsets.py) over the training seeds."""
    from subsets import aggregate_seeds, subsets_markdown

    started = time.time()
    out = Path(args.out).absolute()
    dataset_id, name, config, raw, _ = prepared(args, out)
    per_seed = [subsets_seed(args, seed, dataset_id, name, config, raw, out) for seed in args.seeds]
    table = aggregate_seeds(per_seed)
    labels = sorted({k[len("dice_"):] for rows in table.values() for row in rows.values() for k in row
                     if k.startswith("dice_")})
    result = header(args, name, config, started) | {"subsets": table, "per_seed_subsets": per_seed,
                                                    "wall_seconds": time.time() - started}
    md = (f"Command: `{result['command']}` — commit `{result['commit']}`, data: {result['data']}, schedule: "
          f"{result['schedule']}, seeds {', '.join(map(str, args.seeds))} (mean ± std over seeds).\n\n"
          + subsets_markdown(table, labels))
    write_atomically(out / "subsets.json", json.dumps(result, indent=2, default=float))
    write_atomically(out / "subsets.md", md)
    print(md)
    return result


# ------------------------------------------------------------------------------------------ aggregate
def aggregate(per_seed: list[dict], where: str) -> dict:
    """method -> key -> {"mean", "std", "values" (one per seed, in seed order)} over the seeds that have it."""
    from entrust_nnunet.evaluation.seeds import mean_std

    out: dict = {}
    for record in per_seed:
        for method, row in record.get(where, {}).items():
            for key, value in row.items():
                if isinstance(value, (int, float)) and not isinstance(value, bool):
                    out.setdefault(method, {}).setdefault(key, {"values": []})["values"].append(value)
                elif value is None:
                    out.setdefault(method, {}).setdefault(key, {"values": []})["values"].append(None)
    for rows in out.values():
        for cell in rows.values():
            cell["mean"], cell["std"] = mean_std(cell["values"])
    return out


def train_ratios(per_seed: list[dict], smoke: bool) -> dict:
    """trainer -> {"s_per_iteration", "ratio"} each as mean/std/values over seeds (ratio to plain nnU-Net)."""
    from entrust_nnunet.evaluation.seeds import mean_std

    plain = SMOKE_TRAINERS["nnUNetTrainer_demo"] if smoke else "nnUNetTrainer_demo"
    out: dict = {}
    for record in per_seed:
        times = record["train_s_per_iteration"]
        for trainer, value in times.items():
            row = out.setdefault(trainer, {"s_per_iteration": {"values": []}, "ratio": {"values": []}})
            row["s_per_iteration"]["values"].append(value)
            row["ratio"]["values"].append(value / times[plain] if times.get(plain) else None)
    for row in out.values():
        for cell in row.values():
            cell["mean"], cell["std"] = mean_std(cell["values"])
    return out


def prepared(args, out: Path) -> tuple[int, str, str, Path, Path]:
    """(dataset id, name, configuration, raw folder, preprocessed folder), planned and preprocessed; sets
    ``args.results_root``."""
    out.mkdir(parents=True, exist_ok=True)
    dataset_id, name, config = prepare_dataset(args, out)
    args.results_root = (str(Path(os.environ["nnUNet_results"]) / "entrust_benchmark") if args.dataset is not None
                         else str(out / "nnunet" / "results_per_seed"))
    return dataset_id, name, config, Path(os.environ["nnUNet_raw"]) / name, plan_if_needed(dataset_id, name, config)


def plan_if_needed(dataset_id: int, name: str, config: str) -> Path:
    """nnU-Net's (and EnTrust's) plans and preprocessed data of a dataset, made once; its preprocessed folder."""
    from entrust_nnunet.pipeline import plan_and_preprocess

    preprocessed = Path(os.environ["nnUNet_preprocessed"]) / name
    if not ((preprocessed / "nnUNetEnTrustPlans.json").exists() and (preprocessed / f"nnUNetPlans_{config}").is_dir()):
        plan_and_preprocess([dataset_id], configurations=[config])
    return preprocessed


def run(args) -> dict:
    started = time.time()
    out = Path(args.out).absolute()
    dataset_id, name, config, raw, preprocessed = prepared(args, out)
    unseen = unseen_dataset(args, config) if args.dataset is None and not (args.smoke or args.no_unseen) else None
    per_seed, models = [], {}
    for seed in args.seeds:
        record, seed_models = run_seed(args, seed, dataset_id, name, config, raw, out)
        if unseen is not None:
            record["unseen_conflict"] = unseen_seed(args, seed, unseen, out)
        per_seed.append(record)
        models = models or seed_models
        models.update({k: v for k, v in seed_models.items() if k in ABLATIONS})
    dataset_json = json.loads((raw / "dataset.json").read_text())
    plans = json.loads((preprocessed / "nnUNetPlans.json").read_text())
    speed = measure_speed(args, models, len(dataset_json["channel_names"]), plans["configurations"][config]["patch_size"])
    result = header(args, name, config, started) | {
        "per_seed": per_seed, "methods": aggregate(per_seed, "methods"), "ablations": aggregate(per_seed, "ablations"),
        "unseen_conflict": aggregate(per_seed, "unseen_conflict"),
        "speed": speed, "train": train_ratios(per_seed, args.smoke)}
    result["wall_seconds"] = time.time() - started
    if COST_JSON.exists() and not args.smoke:
        result["cost_large"] = json.loads(COST_JSON.read_text())
    result["targets"] = check_targets(result)
    write_results(args, out, result)
    return result


def header(args, name: str, config: str, started: float) -> dict:
    data = (f"2D phantoms, {args.n} training cases (seed {args.data_seed}) / {args.num_test} test cases "
            f"(test seed {args.test_seed})" if args.dataset is None else f"{name} ({config}), its imagesTs/labelsTs")
    if args.smoke:
        data = f"smoke: 2D phantoms 32x32, 8 training (seed {args.data_seed}) / 3 test (test seed {args.test_seed})"
    return {"command": " ".join([Path(sys.executable).name, *sys.argv]), "commit": git_commit(), "machine": machine(),
            "device": args.device, "seeds": list(args.seeds), "test_seed": args.test_seed, "data_seed": args.data_seed,
            "schedule": "smoke" if args.smoke else "nnUNetTrainer*_demo (15 epochs x 50 iterations, batch 2)",
            "data": data, "ablations_run": bool(args.ablations), "started_unix": started,
            "coin_flip_conflict": args.dataset is None, "entrust_trainer": methods(args)[OURS][0]}


def write_atomically(path: Path, text: str) -> None:
    """A temporary sibling renamed onto ``path``: a run never leaves half a file, and an output folder copied with
    hard links (``cp -al``, to reuse another run's models) gets a new file instead of rewriting the original's."""
    from entrust_nnunet.data.io import atomic_file

    with atomic_file(path) as f:
        f.write(text)


def write_results(args, out: Path, result: dict) -> None:
    text = json.dumps(result, indent=2, default=float)
    write_atomically(out / "results.json", text)
    write_atomically(out / "results.md", markdown(result))
    if not args.smoke and args.dataset is None:
        results_json(args).parent.mkdir(parents=True, exist_ok=True)
        write_atomically(results_json(args), text)
    print(markdown(result))


# ------------------------------------------------------------------------------------------ targets
#: (description, kind, key, higher is better, bound or factor); the verdict rule: evaluation.seeds.verdict
TARGETS = [
    ("K=8 inference <= 1.3x one plain forward (one patch)", "speed", "EnTrust K=8", False, 1.3),
    ("K=8 peak memory <= 1.2x (one patch)", "memory", "EnTrust K=8", False, 1.2),
    ("K=8 whole-case inference <= 1.3x plain prediction (BraTS-like 3D)", "cost_time", "EnTrust K=8", False, 1.3),
    ("K=8 whole-case peak memory <= 1.2x plain prediction (BraTS-like 3D)", "cost_memory", "EnTrust K=8", False, 1.2),
    ("training step <= 1.5x", "train", "EnTrust", False, 1.5),
    ("ECE of P(error) <= 0.6x the best baseline", "rel", "ece_perror", False, 0.6),
    ("ECE of class probabilities <= 0.6x the best baseline", "rel", "ece", False, 0.6),
    ("error AUROC >= the best baseline", "rel", "error_auroc", True, 1.0),
    ("Dice >= softmax nnU-Net", "softmax nnU-Net", "dice", True, 1.0),
    ("conflict AUROC of total >= 0.90", "abs", "conflict_auroc_total", True, 0.90),
    # issue 12: the mean P(error) where the modalities conflict, and the conflict map against ordinary edges
    ("|mean P(error) - error rate| inside conflict <= 0.10", "gap", ("total_in_conflict", "error_in_conflict"), False, 0.10),
    ("|mean P(error) - error rate| inside conflict <= 0.10, the rate against the test label and its annotators (each "
     "coin drawn 1 + A times)", "gap", ("total_in_conflict", "error_all_labels_in_conflict"), False, 0.10),
    ("|mean P(error) - error rate| outside conflict <= 0.01", "gap", ("total_outside_conflict", "error_outside_conflict"),
     False, 0.01),
    ("conflict vs edge AUROC of the conflict map >= 0.85", "abs", "conflict_vs_edge_auroc_conflict", True, 0.85),
    ("conflict map in conflict >= 2x on lesion edges", "quotient", ("conflict_in_conflict", "conflict_on_edges"), True, 2.0),
    # issue 12: a conflict never seen in training (the unseen-conflict dataset)
    ("unseen conflict: conflict vs edge AUROC of the conflict map >= 0.80", "unseen", "conflict_vs_edge_auroc_conflict",
     True, 0.80),
    ("unseen conflict: mean P(error) inside conflict >= 0.25", "unseen", "total_in_conflict", True, 0.25),
    ("ECE of class probabilities <= softmax nnU-Net", "softmax nnU-Net", "ece", False, 1.0),
    ("ECE fg+bnd of class probabilities <= softmax nnU-Net", "softmax nnU-Net", "ece_fg_boundary", False, 1.0),
    ("ECE fg+bnd of class probabilities <= 0.6x temperature-scaled softmax", TEMPERATURE_ROW, "ece_fg_boundary", False, 0.6),
    ("coherence of the hypotheses >= 0.8", "abs", "coherence", True, 0.8),
    ("diversity of the hypotheses >= 0.6", "abs", "diversity", True, 0.6),
    ("GED^2 <= 0.7x that of K copies of the mask", "quotient", ("ged2", "ged2_mask_copies"), False, 0.7),
    ("GED^2 below MC dropout's", "MC dropout (T=8)", "ged2", False, 1.0),
    ("GED^2 below the 5-fold ensemble's", "5-fold deep ensemble", "ged2", False, 1.0),
]


def _derived(cell_a: dict | None, cell_b: dict | None, how) -> list:
    """Per-seed values of ``how(a, b)`` for two cells of one method (seeds where both exist)."""
    pairs = zip(cell_a["values"], cell_b["values"]) if cell_a and cell_b else []
    return [how(a, b) for a, b in pairs if a is not None and b is not None and a == a and b == b]


def _values(cell: dict | None) -> list:
    return [] if not cell else [v for v in cell["values"] if v is not None]


def target_inputs(result: dict, kind: str, key: str, higher: bool, bound: float):
    """(our values, reference values or bound, factor, reference name) of one target."""
    methods = result["methods"]
    ours = methods.get(OURS, {})
    if kind in ("speed", "memory"):
        row = result["speed"].get(key, {})
        values = (row.get("time_ratios") or []) if kind == "speed" else [row.get("memory_ratio")]
        return [v for v in values if v is not None], bound, 1.0, None
    if kind in ("cost_time", "cost_memory"):
        row = (result.get("cost_large") or {}).get("whole_case", {}).get(key, {})
        values = (row.get("time_ratios") or []) if kind == "cost_time" else [row.get("memory_ratio")]
        return [v for v in values if v is not None], bound, 1.0, None
    if kind == "train":
        # EnTrust's trainer as the run recorded it (a variant's included); older results: the default's name
        ours_trainer = result.get("entrust_trainer")
        cell = next((v["ratio"] for k, v in result["train"].items()
                     if k == ours_trainer or (ours_trainer is None and k.startswith("nnUNetTrainerEnTrust_"))), None)
        return _values(cell), bound, 1.0, None
    if kind == "abs":
        return _values(ours.get(key)), bound, 1.0, None
    if kind == "unseen":
        return _values((result.get("unseen_conflict") or {}).get(OURS, {}).get(key)), bound, 1.0, None
    if kind == "gap":
        return _derived(ours.get(key[0]), ours.get(key[1]), lambda a, b: abs(a - b)), bound, 1.0, None
    if kind == "quotient":
        return _derived(ours.get(key[0]), ours.get(key[1]), lambda a, b: a / b if b else float("inf")), bound, 1.0, None
    if kind != "rel":  # a named baseline row (no verdict when the run did not have it)
        return _values(ours.get(key)), _values(methods.get(kind, {}).get(key)), bound, kind
    baselines = {m: r[key]["mean"] for m, r in methods.items()
                 if m not in (OURS, CALIBRATED_ROW) and key in r and r[key]["mean"] == r[key]["mean"]}
    if not baselines:
        return _values(ours.get(key)), [], bound, None
    best = (max if higher else min)(baselines, key=baselines.get)
    return _values(ours.get(key)), _values(methods[best][key]), bound, best


def check_targets(result: dict) -> list[dict]:
    from entrust_nnunet.evaluation.seeds import mean_std, verdict

    rows = []
    for text, kind, key, higher, bound in TARGETS:
        ours, reference, factor, name = target_inputs(result, kind, key, higher, bound)
        v = verdict(ours, reference, higher, factor)
        rows.append({"target": text, "value": mean_std(ours)[0], "reference": name,
                     "reference_value": mean_std(reference)[0] if isinstance(reference, list) else reference, **v})
    return rows


# ------------------------------------------------------------------------------------------ markdown
def _num(v) -> bool:
    return isinstance(v, (int, float)) and v == v


def _fmt(v, digits=3) -> str:
    return f"{v:.{digits}f}" if _num(v) else "n/a"


def _cell(cell: dict | None, digits: int = 3, scale: float = 1.0) -> str:
    """'mean ± std' (std only with two or more seeds)."""
    from entrust_nnunet.evaluation.seeds import format_mean_std

    return format_mean_std(*(cell.get("mean"), cell.get("std")) if cell else (None, None), digits, scale)


QUALITY_COLS = [("dice", "Dice", 3, 1), ("ece", "ECE class prob.", 4, 1), ("ece_perror", "ECE P(error)", 4, 1),
                ("ece_fg_boundary", "ECE fg+bnd class prob.", 3, 1), ("nll", "NLL class prob.", 3, 1),
                ("nll_perror", "NLL P(error)", 4, 1), ("brier_perror", "Brier P(error)", 4, 1),
                ("error_auroc", "err AUROC", 3, 1), ("aurc", "AURC x1000", 2, 1000),
                ("conflict_auroc_total", "conflict AUROC (total)", 3, 1),
                ("conflict_auroc_conflict", "conflict AUROC (conflict map)", 3, 1), ("entanglement", "AU/EU entangl.", 3, 1)]
CONFLICT_COLS = [("total_in_conflict", "mean P(error) in conflict"), ("error_in_conflict", "true error rate in conflict"),
                 ("error_all_labels_in_conflict", "error rate in conflict, test label + annotators"),
                 ("total_outside_conflict", "mean P(error) outside"), ("error_outside_conflict", "true error rate outside"),
                 ("conflict_in_conflict", "conflict map in conflict"), ("conflict_outside_conflict", "conflict map outside"),
                 ("conflict_on_edges", "conflict map on lesion edges"),
                 ("conflict_vs_edge_auroc_conflict", "conflict vs edge AUROC (conflict map)"),
                 ("conflict_vs_edge_auroc_total", "conflict vs edge AUROC (total)"),
                 ("coherence", "coherence"), ("diversity", "diversity"), ("ged2", "GED^2"),
                 ("ged2_mask_copies", "GED^2 of K mask copies"), ("hm_iou", "HM-IoU")]


def _table(title: str, cols: list, rows: dict) -> list[str]:
    lines = ["", f"| {title} | " + " | ".join(c[1] for c in cols) + " |", "|---" * (len(cols) + 1) + "|"]
    for method, row in rows.items():
        lines.append(f"| {method} | " + " | ".join(_cell(row.get(c[0]), *(c[2:] or (3,))) for c in cols) + " |")
    return lines


def quality_markdown(result: dict) -> list[str]:
    lines = _table("method", QUALITY_COLS, result["methods"])
    temperature = [r.get("temperature") for r in result["per_seed"] if r.get("temperature")]
    lines += ["", f"Temperature of `{TEMPERATURE_ROW}` per seed: " + ", ".join(f"{t:.3f}" for t in temperature)
              + " (fitted by NLL on fold 0's out-of-fold validation probabilities, the cases EnTrust's CalibHead is "
                "fitted on). ECE class prob.: top-label ECE of the saved class probabilities; ECE P(error): ECE of the "
                "binary view [1 - total, total] against mask != reference. AURC is x1000 (lower is better)."]
    lines += _table("method", [(k, t, 3, 1) for k, t in CONFLICT_COLS], result["methods"])
    readings = [f"seed {r['seed']} {m}: folds {row['conflict_reading']['folds']}"
                + (f", calibrate {row['conflict_reading']['calibrated']}" if row["conflict_reading"]["calibrated"] else "")
                for r in result["per_seed"] for m, row in r.get("methods", {}).items() if row.get("conflict_reading")]
    if readings:
        lines += ["", "Conflict reading chosen (each fold's CalibHead on its validation cases; `entrust calibrate` "
                      "once on every fold's): " + "; ".join(readings)]
    labels = sorted({k[5:] for row in result["methods"].values() for k in row if k.startswith("dice_")})
    if labels:
        lines += _table("method", [c for l in labels for c in ((f"dice_{l}", f"Dice {l}", 3, 1),
                                                                (f"hd95_{l}", f"HD95 {l} (mm)", 2, 1))], result["methods"])
    return lines


def speed_markdown(result: dict) -> list[str]:
    lines = ["", "| inference (one patch) | median s | spread (min–max) | time ratio to one plain forward | peak memory ratio |",
             "|---|---|---|---|---|"]
    for label, row in result["speed"].items():
        lines.append(f"| {label} | {_fmt(row['median_s'], 4)} | {_fmt(row['min_s'], 4)}–{_fmt(row['max_s'], 4)} "
                     f"(n={row['n']}) | {_fmt(row.get('time_ratio'), 2)} | {_fmt(row.get('memory_ratio'), 2)} |")
    lines += ["", "| training | s / iteration | ratio to nnUNetTrainer |", "|---|---|---|"]
    for trainer, row in result["train"].items():
        lines.append(f"| {trainer} | {_cell(row['s_per_iteration'])} | {_cell(row['ratio'], 2)} |")
    return lines


def ablation_markdown(result: dict) -> list[str]:
    if not result.get("ablations"):
        return []
    seed = result["seeds"][0]
    first = next(r for r in result["per_seed"] if r["seed"] == seed)
    rows = {f"{OURS} (same seed)": {k: {"mean": v, "std": float("nan")} for k, v in first["methods"].get(OURS, {}).items()
                                    if _num(v)}, **result["ablations"]}
    cols = [c for c in QUALITY_COLS if c[0] in ("dice", "ece", "ece_perror", "error_auroc", "aurc", "conflict_auroc_total",
                                                "conflict_auroc_conflict")]
    lines = ["", f"Ablations (training seed {seed}; cost = one patch, ratio to one plain forward):"]
    lines += _table("ablation", cols, rows)
    lines += ["", "| ablation | time ratio (one patch) | peak memory ratio |", "|---|---|---|"]
    for name in [OURS] + list(result["ablations"]):
        row = result["speed"].get("EnTrust K=8" if name == OURS else f"{name} K=8", {})
        lines.append(f"| {name} | {_fmt(row.get('time_ratio'), 2)} | {_fmt(row.get('memory_ratio'), 2)} |")
    return lines


UNSEEN_COLS = [("dice", "Dice", 3, 1), ("total_in_conflict", "mean P(error) in conflict", 3, 1),
               ("error_in_conflict", "true error rate in conflict", 3, 1),
               ("total_outside_conflict", "mean P(error) outside", 4, 1),
               ("error_outside_conflict", "true error rate outside", 4, 1),
               ("conflict_vs_edge_auroc_conflict", "conflict vs edge AUROC (conflict map)", 3, 1),
               ("conflict_in_conflict", "conflict map in conflict", 3, 1),
               ("conflict_on_edges", "conflict map on lesion edges", 3, 1), ("ece_perror", "ECE P(error)", 4, 1)]


def unseen_markdown(result: dict) -> list[str]:
    if not result.get("unseen_conflict"):
        return []
    return ["", f"Unseen conflict (Dataset{UNSEEN_ID}: training phantoms of the same seed without any conflict blob (the "
                "same labels outside the blobs, intensities drawn anew), the same test phantoms; every method trained "
                "anew on it, per seed):"] + \
        _table("method", UNSEEN_COLS, result["unseen_conflict"])


def chance_markdown(result: dict) -> list[str]:
    """How far a perfectly calibrated P(error) would miss the realized error rate inside conflict on this test set:
    the phantoms' conflict label is a fair coin, so there the calibrated chance of error is 0.5 whatever the mask
    says, and ``|0.5 - error rate|`` is what the test set's coins alone put into the inside-conflict gap."""
    if not result.get("coin_flip_conflict"):
        return []
    from entrust_nnunet.evaluation.seeds import mean_std

    parts = []
    for method in (OURS, CALIBRATED_ROW):
        cell = result["methods"].get(method, {})
        for key, against in (("error_in_conflict", "the test label"), ("error_all_labels_in_conflict",
                                                                       "the test label and its annotators")):
            values = [abs(0.5 - v) for v in _values(cell.get(key)) if v == v]
            if values:
                mean, std = mean_std(values)
                parts.append(f"{method} against {against} {_fmt(mean)} ± {_fmt(std)}")
    if not parts:
        return []
    return ["", "Inside conflict the truth is a fair coin, so a perfectly calibrated P(error) there is 0.5 whatever the "
                "mask says; |0.5 − realized error rate| is the part of the inside-conflict gap that this test set's "
                "coins alone put there: " + "; ".join(parts) + "."]


def markdown(result: dict) -> str:
    seeds = result["seeds"]
    lines = [f"Command: `{result['command']}` — commit `{result['commit']}`, device {result['device']}, "
             f"{result['machine'].get('cpus')} CPUs, wall time {result['wall_seconds'] / 60:.1f} min. "
             f"Data: {result['data']}. Schedule: {result['schedule']}. Training seeds {', '.join(map(str, seeds))}: "
             f"every number is mean ± standard deviation over the {len(seeds)} seed(s)."]
    lines += quality_markdown(result) + unseen_markdown(result) + speed_markdown(result) + ablation_markdown(result)
    if result.get("cost_large"):
        lines += ["", result["cost_large"].get("markdown", "").strip()]
    lines += ["", "| target | ours | reference | difference (better > 0) | pooled std | verdict |", "|---|---|---|---|---|---|"]
    for t in result["targets"]:
        ref = t["reference"] or "bound"
        lines.append(f"| {t['target']} | {_fmt(t['value'], 4)} | {ref}: {_fmt(t['reference_value'], 4)} | "
                     f"{_fmt(t['difference'], 4)} | {_fmt(t['pooled_std'], 4)} | "
                     f"{(t['verdict'] or 'n/a') + ('' if t['spread'] or not t['verdict'] else ' (no spread)')} |")
    lines += ["", "Verdict: met when the difference of means is larger than the pooled standard deviation of the "
                  "two groups (of ours alone against a fixed bound), missed when it is that much the other way, "
                  "within noise otherwise."]
    lines += chance_markdown(result)
    return "\n".join(lines) + "\n"


def refresh_cost(results_json: Path) -> None:
    """Embed the current ``benchmarks/results/cost_large.json`` (a later ``cost.py`` run) into a results JSON and
    recompute its targets; the phantom numbers stay those of the run that wrote the JSON."""
    result = json.loads(results_json.read_text(encoding="utf-8"))
    result["cost_large"] = json.loads(COST_JSON.read_text(encoding="utf-8"))
    result["targets"] = check_targets(result)
    write_atomically(results_json, json.dumps(result, indent=2, default=float))


def update_readme(results_json: Path) -> None:
    """Rewrite README's Results block from a results JSON (the committed one by default)."""
    result = json.loads(results_json.read_text(encoding="utf-8"))
    readme = REPO / "README.md"
    text = readme.read_text(encoding="utf-8")
    block = f"{README_BEGIN}\n{markdown(result)}{README_END}"
    if README_BEGIN in text:
        text = text[: text.index(README_BEGIN)] + block + text[text.index(README_END) + len(README_END):]
    else:
        text += f"\n## Results\n\nGenerated by `python benchmarks/run.py --update-readme` from `{RESULTS_JSON.name}`.\n\n{block}\n"
    write_atomically(readme, text)


def parse_args(argv=None):
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--out", default=str(REPO / "benchmarks" / "out"), help="output folder")
    parser.add_argument("--dataset", default=None,
                        help="an nnU-Net dataset (id or name) under $nnUNet_raw with imagesTs + labelsTs "
                             "(default: 2D phantoms generated under OUT); models go to $nnUNet_results/entrust_benchmark/seed_S")
    parser.add_argument("-c", default="2d", help="nnU-Net configuration (default: 2d)")
    parser.add_argument("--device", default="cpu", choices=("cpu", "cuda"))
    parser.add_argument("--seeds", type=int, nargs="+", default=None,
                        help="training seeds; every method is trained once per seed (default 0 1 2; smoke: 0)")
    parser.add_argument("-n", type=int, default=24, help="training phantoms (default 24)")
    parser.add_argument("--num-test", type=int, default=20, help="test phantoms (default 20)")
    parser.add_argument("--data-seed", type=int, default=DATA_SEED, help=f"training phantoms' seed (default {DATA_SEED})")
    parser.add_argument("--test-seed", type=int, default=None,
                        help=f"test phantoms' seed (default {TEST_SEED}, smoke {SMOKE_TEST_SEED}); design choices use "
                             f"{DEVELOPMENT_SEED} (or the validation folds), never {TEST_SEED}")
    parser.add_argument("--entrust-variant", choices=("CrossModal",), default=None,
                        help="EnTrust's rows with nnUNetTrainerEnTrust<VARIANT>_demo (CrossModal: the cross-modal "
                             "prediction conflict); results to benchmarks/results/phantoms2d_<variant>.json")
    parser.add_argument("--ablations", action="store_true", help="also train and score the EnTrust ablations (first seed)")
    parser.add_argument("--no-unseen", action="store_true",
                        help="skip the unseen-conflict dataset (softmax nnU-Net and EnTrust trained on phantoms "
                             "without conflict, tested on phantoms with it; on by default, not in --smoke)")
    parser.add_argument("--repeats", type=int, default=10, help="timed repetitions per method (default 10)")
    parser.add_argument("--threads", type=int, default=2, help="torch threads for the timing (default 2)")
    parser.add_argument("--smoke", action="store_true", help="tiny data and schedules (for the test suite)")
    parser.add_argument("--cost", action="store_true", help="only the large-size cost tables (runs benchmarks/cost.py)")
    parser.add_argument("--subsets", action="store_true",
                        help="only the missing-modality table: Dice per label and ECE_fg for every non-empty subset of "
                             "the modalities (EnTrust with modality dropout, nnU-Net zero-filled, nnU-Net with dropout); "
                             "writes OUT/subsets.json and OUT/subsets.md")
    parser.add_argument("--update-readme", nargs="?", const=str(RESULTS_JSON), default=None, metavar="JSON",
                        help=f"only rewrite README's Results from a results JSON (default {RESULTS_JSON.relative_to(REPO)})")
    parser.add_argument("--refresh-cost", action="store_true",
                        help="with --update-readme: first embed the current benchmarks/results/cost_large.json into "
                             "the results JSON and recompute its targets")
    args = parser.parse_args(argv)
    args.seeds = args.seeds or ([0] if args.smoke else [0, 1, 2])
    args.test_seed = args.test_seed if args.test_seed is not None else (SMOKE_TEST_SEED if args.smoke else TEST_SEED)
    return args


def main(argv=None):
    from entrust_nnunet.data.io import InputError

    args = parse_args(argv)
    if args.update_readme:
        if args.refresh_cost:
            refresh_cost(Path(args.update_readme))
        update_readme(Path(args.update_readme))
        return 0
    os.environ.setdefault("nnUNet_def_n_proc", "2")
    os.environ.setdefault("nnUNet_n_proc_DA", "2")
    if args.cost:
        cmd = [sys.executable, str(REPO / "benchmarks" / "cost.py"), "--threads", str(args.threads), "--device", args.device]
        return subprocess.run(cmd + (["--smoke"] if args.smoke else [])).returncode
    try:
        run_subsets(args) if args.subsets else run(args)
    except InputError as e:
        print(f"benchmarks/run.py: error: {e}", file=sys.stderr)
        return 2
    return 0


if __name__ == "__main__":
    sys.exit(main())
