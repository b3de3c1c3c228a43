"""EnTrust against softmax nnU-Net, the 5-fold deep ensemble, MC dropout and CRNP: one run, one table.

Every method is trained by the stock ``nnUNetv2_train`` on the same data and folds, predicted by
``entrust predict`` (same sliding window, same four maps) and scored by ``entrust evaluate``.
Speed and memory are RATIOS to one plain nnU-Net forward measured in the same run, on one
preprocessed patch, after warm-up, over several repetitions (median and spread reported).

    python benchmarks/run.py                      # 2D phantoms, CPU, documented schedule (< 30 min on 2 cores)
    python benchmarks/run.py --smoke              # tiny sizes and schedules, for the test suite
    python benchmarks/run.py --device cuda        # on a GPU (absolute times are in the table and JSON either way)
    python benchmarks/run.py --dataset 501 -c 3d_fullres   # any nnU-Net dataset with imagesTs + labelsTs
    python benchmarks/run.py --update-readme      # rewrite README's Results section from the JSON

Outputs: ``OUT/results.json`` (every raw number, commit, machine, device) and ``OUT/results.md``.
"""
from __future__ import annotations

import argparse
import json
import os
import platform
import statistics
import subprocess
import sys
import time
from pathlib import Path

REPO = Path(__file__).resolve().parent.parent
README_BEGIN, README_END = "<!-- results:begin -->", "<!-- results:end -->"

#: method -> (trainer, plans, folds used for prediction, sampling count)
METHODS = {
    "softmax nnU-Net": ("nnUNetTrainer_demo", "nnUNetPlans", [0], 1),
    "5-fold deep ensemble": ("nnUNetTrainer_demo", "nnUNetPlans", [0, 1, 2, 3, 4], 1),
    "MC dropout (T=8)": ("nnUNetTrainerMCDropout_demo", "nnUNetPlans", [0], 8),
    "CRNP": ("nnUNetTrainerCRNP_demo", "nnUNetPlans", [0], 1),
    "EnTrust (K=8)": ("nnUNetTrainerEnTrust_demo", "nnUNetEnTrustPlans", [0], 8),
}
SMOKE_TRAINERS = {"nnUNetTrainer_demo": "nnUNetTrainer_tinyCPU",
                  "nnUNetTrainerMCDropout_demo": "nnUNetTrainerMCDropout_tinyCPU",
                  "nnUNetTrainerCRNP_demo": "nnUNetTrainerCRNP_tinyCPU",
                  "nnUNetTrainerEnTrust_demo": "nnUNetTrainerEnTrust_tinyCPU"}
TARGETS = [  # (description, metric key in a method row or the speed table, comparison)
    ("K=8 inference <= 1.3x one plain forward", "speed:EnTrust K=8:time_ratio", "<=", 1.3),
    ("K=8 peak memory <= 1.2x", "speed:EnTrust K=8:memory_ratio", "<=", 1.2),
    ("training step <= 1.5x", "train:EnTrust:ratio", "<=", 1.5),
    ("ECE <= 0.6x the best baseline", "rel:ece_all", "<=", 0.6),
    ("error AUROC >= the best baseline", "rel:error_auroc", ">=", 1.0),
    ("Dice >= softmax nnU-Net", "rel:dice_vs_softmax", ">=", 1.0),
    ("conflict AUROC of total >= 0.90", "abs:conflict_auroc_total", ">=", 0.90),
]


#: the smoke run (a test) keeps the suite short: MC dropout and CRNP are tested through
#: ``entrust predict`` in tests/test_baselines.py, so it runs only these, with K = 1 and 8
SMOKE_METHODS = ("softmax nnU-Net", "5-fold deep ensemble", "EnTrust (K=8)")


def methods(smoke: bool) -> dict:
    """METHODS; for the smoke run SMOKE_METHODS with the tiny trainers and a 2-fold ensemble."""
    if not smoke:
        return METHODS
    return {m: (SMOKE_TRAINERS.get(t, t), p, folds[:2], k) for m, (t, p, folds, k) in METHODS.items()
            if m in SMOKE_METHODS}


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


# ------------------------------------------------------------------------------------------ training
def train_all(args, dataset_id: int, name: str, config: str) -> dict[str, float]:
    """Train every needed (trainer, fold); return training seconds per iteration per trainer (median over epochs)."""
    from entrust_nnunet.pipeline import train_fold
    from entrust_nnunet.nnunet.variants import DEMO_SCHEDULE, TINY_SCHEDULE

    schedule = TINY_SCHEDULE if args.smoke else DEMO_SCHEDULE

    needed: dict[tuple[str, str], set[int]] = {}
    for trainer, plans, folds, _ in methods(args.smoke).values():
        needed.setdefault((trainer, plans), set()).update(folds)
    per_iteration = {}
    results_root = Path(os.environ["nnUNet_results"])
    for (trainer, plans), folds in needed.items():
        if not trainer_exists(trainer):
            print(f"skipping {trainer}: not found")
            continue
        for fold in sorted(folds):
            model = results_root / name / f"{trainer}__{plans}__{config}"
            if not (model / f"fold_{fold}" / "checkpoint_final.pth").exists():
                train_fold(dataset_id, config, str(fold), trainer, plans, args.device, None,
                           Path(args.out) / f"train_{trainer}_{fold}.log")
        per_iteration[trainer] = seconds_per_iteration(Path(args.out) / f"train_{trainer}_{min(folds)}.log",
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


def measure_speed(args, models: dict[str, Path], channels: int, patch: list[int]) -> dict:
    """Forward time and peak memory per method on one patch, each in a fresh process; ratios to plain."""
    rows = {}
    jobs = [("plain nnU-Net forward", "softmax nnU-Net", 1, False, [0])]
    jobs += [(f"EnTrust K={k}", "EnTrust (K=8)", k, True, [0]) for k in ((1, 8) if args.smoke else (1, 4, 8, 16))]
    jobs += [("5-fold deep ensemble", "5-fold deep ensemble", 1, True, methods(args.smoke)["5-fold deep ensemble"][2]),
             ("MC dropout T=8", "MC dropout (T=8)", 8, True, [0]), ("CRNP", "CRNP", 1, True, [0])]
    for label, method, k, stats, folds in jobs:
        if method not in models:
            continue
        cfg = {"model": str(models[method]), "folds": folds, "k": k, "probe": True, "stats": stats,
               "channels": channels, "patch": patch, "device": args.device, "threads": args.threads,
               "warmup": 2 if args.smoke else 3, "repeats": 3 if args.smoke else args.repeats}
        # time and memory in separate processes: on CPU, memory is read with glibc told to return every freed
        # tensor to the OS (a fixed mmap threshold), which makes each allocation slower and would skew times.
        # The smoke run only checks the harness, so it does both in one process.
        memory_env = {**os.environ, "MALLOC_MMAP_THRESHOLD_": "65536", "MALLOC_TRIM_THRESHOLD_": "65536"}
        runs = ([(True, True, memory_env)] if args.smoke else
                [(True, False, os.environ), (False, True, memory_env)])
        out = {}
        for timed, memory, env in runs:
            r = subprocess.run([sys.executable, "-c", SPEED_SNIPPET,
                                json.dumps({**cfg, "time": timed, "memory": memory})],
                               capture_output=True, encoding="utf-8", errors="replace", env=env, timeout=1800)
            if r.returncode != 0:
                print(f"speed {label} failed:\n{r.stderr[-2000:]}")
                break
            measured = json.loads(r.stdout.strip().splitlines()[-1])
            out.update({"times": measured["times"]} if timed else {})
            out.update({"peak_bytes": measured["peak_bytes"]} if memory else {})
        else:
            t = out["times"]
            rows[label] = {"median_s": statistics.median(t), "min_s": min(t), "max_s": max(t), "n": len(t),
                           "peak_bytes": out.get("peak_bytes", 0)}
    base = rows.get("plain nnU-Net forward")
    for row in rows.values():
        if base:
            row["time_ratio"] = row["median_s"] / base["median_s"]
            row["memory_ratio"] = row["peak_bytes"] / base["peak_bytes"] if base["peak_bytes"] else float("nan")
    return rows


# ------------------------------------------------------------------------------------------ main
def prepare_dataset(args, out: Path) -> tuple[int, str, str]:
    """(dataset id, dataset name, configuration): phantoms under OUT by default, else ``--dataset`` from nnU-Net's roots."""
    from entrust_nnunet.data.io import InputError
    from entrust_nnunet.nnunet.env import ensure_ext_trainer, set_nnunet_roots
    from entrust_nnunet.data.phantoms import write_phantom_dataset

    if args.dataset is None:
        set_nnunet_roots(out / "nnunet")
        ensure_ext_trainer()
        dataset_id, name = 611, "Dataset611_BenchPhantoms"
        raw = Path(os.environ["nnUNet_raw"]) / name
        if not raw.exists():
            write_phantom_dataset(raw, num_cases=8 if args.smoke else args.n,
                                  num_test=3 if args.smoke else args.num_test, dim=2, size=32 if args.smoke else 64,
                                  seed=args.seed)
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


def method_row(args, raw: Path, out: Path, method: str, model: Path, folds, k: int) -> dict:
    """Predict the test cases with one method, evaluate them, and return its table row."""
    from entrust_nnunet.evaluation.evaluate import evaluate_folder
    from entrust_nnunet.evaluation.summary import headline
    from entrust_nnunet.model.sampling import SamplingSettings
    from entrust_nnunet.predict import predict_folder

    pred = out / "predictions" / method.split(" ")[0].replace("/", "_") / ("ens" if len(folds) > 1 else "f0")
    t = time.time()
    predict_folder(raw / "imagesTs", pred, model, folds=folds, device=args.device,
                   sampling=SamplingSettings(num_hypotheses=k), num_processes_preprocessing=1, num_processes_export=1)
    predict_seconds = time.time() - t
    conflict_dir = raw / "conflictTs" if (raw / "conflictTs").is_dir() else None
    summary = evaluate_folder(pred, raw / "labelsTs", conflict_dir=conflict_dir,
                              dataset_json=raw / "dataset.json", output_file=pred / "summary.json",
                              num_processes=1)
    row = dict(headline(summary))
    pooled = summary.get("uncertainty_pooled", {})
    for key in ("ece_fg_boundary", "brier", "nll", "aurc", "entanglement", "total_in_conflict",
                "error_in_conflict", "total_outside_conflict", "error_outside_conflict", "conflict_in_conflict",
                "conflict_outside_conflict"):
        row[key] = pooled.get(key, summary.get("uncertainty_mean", {}).get(key))
    for label, values in summary.get("mean", {}).items():
        row[f"dice_{label}"] = values.get("Dice")
        row[f"hd95_{label}"] = values.get("HD95")
    row["predict_seconds_all_cases"] = predict_seconds
    return row


def run(args) -> dict:
    from entrust_nnunet.pipeline import plan_and_preprocess

    started = time.time()
    out = Path(args.out).absolute()
    out.mkdir(parents=True, exist_ok=True)
    dataset_id, name, config = prepare_dataset(args, out)
    raw = Path(os.environ["nnUNet_raw"]) / name
    preprocessed = Path(os.environ["nnUNet_preprocessed"]) / name
    if not ((preprocessed / "nnUNetEnTrustPlans.json").exists() and (preprocessed / f"nnUNetPlans_{config}").is_dir()):
        plan_and_preprocess([dataset_id], configurations=[config])
    train_s_per_it = train_all(args, dataset_id, name, config)

    from nnunetv2.utilities.file_path_utilities import get_output_folder

    models, table = {}, {}
    for method, (trainer, plans, folds, k) in methods(args.smoke).items():
        model = Path(get_output_folder(name, trainer, plans, config))
        if all((model / f"fold_{f}" / "checkpoint_final.pth").exists() for f in folds):
            models[method] = model
            table[method] = method_row(args, raw, out, method, model, folds, k)

    dataset_json = json.loads((raw / "dataset.json").read_text())
    plans = json.loads((Path(os.environ["nnUNet_preprocessed"]) / name / "nnUNetPlans.json").read_text())
    patch = plans["configurations"][config]["patch_size"]
    speed = measure_speed(args, models, len(dataset_json["channel_names"]), patch)
    plain_trainer = SMOKE_TRAINERS["nnUNetTrainer_demo"] if args.smoke else "nnUNetTrainer_demo"
    train = {t: {"s_per_iteration": v, "ratio": v / train_s_per_it[plain_trainer]}
             for t, v in train_s_per_it.items() if plain_trainer in train_s_per_it}
    result = {"command": " ".join([Path(sys.executable).name, *sys.argv]), "commit": git_commit(),
              "machine": machine(), "device": args.device, "wall_seconds": time.time() - started,
              "schedule": "smoke" if args.smoke else "nnUNetTrainer*_demo (15 epochs x 50 iterations, batch 2)",
              "data": (f"2D phantoms, {args.n} training / {args.num_test} test cases, seed {args.seed}" if args.dataset is None
                       else f"{name} ({config}), its imagesTs/labelsTs"),
              "methods": table, "speed": speed, "train": train}
    result["targets"] = check_targets(result)
    (out / "results.json").write_text(json.dumps(result, indent=2, default=float))
    (out / "results.md").write_text(markdown(result), encoding="utf-8")
    print(markdown(result))
    return result


def check_targets(result: dict) -> list[dict]:
    methods, speed, train = result["methods"], result["speed"], result["train"]
    ours = methods.get("EnTrust (K=8)", {})
    baselines = {k: v for k, v in methods.items() if k != "EnTrust (K=8)"}
    entrust_train = next((v["ratio"] for k, v in train.items() if "EnTrust" in k), None)
    values = {
        "speed:EnTrust K=8:time_ratio": speed.get("EnTrust K=8", {}).get("time_ratio"),
        "speed:EnTrust K=8:memory_ratio": speed.get("EnTrust K=8", {}).get("memory_ratio"),
        "train:EnTrust:ratio": entrust_train,
        "rel:ece_all": _ratio(ours.get("ece"), min((v.get("ece") for v in baselines.values() if _num(v.get("ece"))), default=None)),
        "rel:error_auroc": _ratio(ours.get("error_auroc"), max((v.get("error_auroc") for v in baselines.values() if _num(v.get("error_auroc"))), default=None)),
        "rel:dice_vs_softmax": _ratio(ours.get("dice"), methods.get("softmax nnU-Net", {}).get("dice")),
        "abs:conflict_auroc_total": ours.get("conflict_auroc_total"),
    }
    rows = []
    for text, key, op, bound in TARGETS:
        v = values.get(key)
        met = None if not _num(v) else (v <= bound if op == "<=" else v >= bound)
        rows.append({"target": text, "value": v, "met": met})
    return rows


def _num(v) -> bool:
    return isinstance(v, (int, float)) and v == v


def _ratio(a, b):
    return a / b if _num(a) and _num(b) and b else None


def _fmt(v, digits=3) -> str:
    return f"{v:.{digits}f}" if _num(v) else "n/a"


def markdown(result: dict) -> str:
    cols = [("dice", "Dice"), ("ece", "ECE"), ("ece_fg_boundary", "ECE fg+bnd"), ("brier", "Brier"), ("nll", "NLL"),
            ("error_auroc", "err AUROC"), ("aurc", "AURC"), ("conflict_auroc_total", "conflict AUROC (total)"),
            ("conflict_auroc_conflict", "conflict AUROC (conflict)"), ("entanglement", "AU/EU entangl.")]
    conflict_cols = [("total_in_conflict", "mean total (P(error)) in conflict"), ("error_in_conflict", "true error rate in conflict"),
                     ("total_outside_conflict", "mean total outside"), ("error_outside_conflict", "true error rate outside"),
                     ("conflict_in_conflict", "conflict map in conflict"), ("conflict_outside_conflict", "conflict map outside")]
    lines = [f"Command: `{result['command']}` — commit `{result['commit']}`, device {result['device']}, "
             f"{result['machine'].get('cpus')} CPUs, wall time {result['wall_seconds'] / 60:.1f} min. "
             f"Data: {result['data']}. Schedule: {result['schedule']}.", "",
             "| method | " + " | ".join(c[1] for c in cols) + " |", "|---" * (len(cols) + 1) + "|"]
    for method, row in result["methods"].items():
        lines.append(f"| {method} | " + " | ".join(_fmt(row.get(k)) for k, _ in cols) + " |")
    lines += ["", "| method | " + " | ".join(c[1] for c in conflict_cols) + " |", "|---" * (len(conflict_cols) + 1) + "|"]
    for method, row in result["methods"].items():
        lines.append(f"| {method} | " + " | ".join(_fmt(row.get(k)) for k, _ in conflict_cols) + " |")
    labels = sorted({k[5:] for row in result["methods"].values() for k in row if k.startswith("dice_")})
    if labels:
        lines += ["", "| method | " + " | ".join(f"Dice {l} | HD95 {l} (mm)" for l in labels) + " |",
                  "|---" * (2 * len(labels) + 1) + "|"]
        for method, row in result["methods"].items():
            lines.append(f"| {method} | " + " | ".join(f"{_fmt(row.get('dice_' + l))} | {_fmt(row.get('hd95_' + l), 2)}"
                                                      for l in labels) + " |")
    lines += ["", "| inference (one patch) | median s | spread (min–max) | time ratio to one plain forward | peak memory ratio |",
              "|---|---|---|---|---|"]
    for label, row in result["speed"].items():
        lines.append(f"| {label} | {_fmt(row['median_s'], 4)} | {_fmt(row['min_s'], 4)}–{_fmt(row['max_s'], 4)} "
                     f"(n={row['n']}) | {_fmt(row.get('time_ratio'), 2)} | {_fmt(row.get('memory_ratio'), 2)} |")
    lines += ["", "| training | s / iteration | ratio to nnUNetTrainer |", "|---|---|---|"]
    for trainer, row in result["train"].items():
        lines.append(f"| {trainer} | {_fmt(row['s_per_iteration'], 3)} | {_fmt(row['ratio'], 2)} |")
    lines += ["", "| target | value | met |", "|---|---|---|"]
    for t in result["targets"]:
        lines.append(f"| {t['target']} | {_fmt(t['value'], 3)} | {'yes' if t['met'] else 'no' if t['met'] is False else 'n/a'} |")
    return "\n".join(lines) + "\n"


def update_readme(results_md: Path) -> None:
    readme = REPO / "README.md"
    text = readme.read_text(encoding="utf-8")
    block = f"{README_BEGIN}\n{results_md.read_text(encoding='utf-8')}{README_END}"
    if README_BEGIN in text:
        text = text[: text.index(README_BEGIN)] + block + text[text.index(README_END) + len(README_END):]
    else:
        text += f"\n## Results\n\nGenerated by `python benchmarks/run.py --update-readme` from `results.json`.\n\n{block}\n"
    readme.write_text(text, encoding="utf-8")


def main(argv=None):
    from entrust_nnunet.data.io import InputError

    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--out", default=str(REPO / "benchmarks" / "out"), help="output folder")
    parser.add_argument("--dataset", default=None,
                        help="an nnU-Net dataset (id or name) under $nnUNet_raw with imagesTs + labelsTs "
                             "(default: 2D phantoms generated under OUT); trained models go to $nnUNet_results")
    parser.add_argument("-c", default="2d", help="nnU-Net configuration (default: 2d)")
    parser.add_argument("--device", default="cpu", choices=("cpu", "cuda"))
    parser.add_argument("-n", type=int, default=24, help="training phantoms (default 24)")
    parser.add_argument("--num-test", type=int, default=20, help="test phantoms (default 20)")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--repeats", type=int, default=10, help="timed repetitions per method (default 10)")
    parser.add_argument("--threads", type=int, default=2, help="torch threads for the timing (default 2)")
    parser.add_argument("--smoke", action="store_true", help="tiny data and schedules (for the test suite)")
    parser.add_argument("--update-readme", action="store_true", help="only rewrite README's Results from OUT/results.md")
    args = parser.parse_args(argv)
    if args.update_readme:
        update_readme(Path(args.out) / "results.md")
        return 0
    os.environ.setdefault("nnUNet_def_n_proc", "2")
    os.environ.setdefault("nnUNet_n_proc_DA", "2")
    try:
        run(args)
    except InputError as e:
        print(f"benchmarks/run.py: error: {e}", file=sys.stderr)
        return 2
    return 0


if __name__ == "__main__":
    sys.exit(main())
