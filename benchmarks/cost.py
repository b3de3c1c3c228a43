"""Cost at the sizes users train: EnTrust against plain nnU-Net on plans from nnU-Net's own planner.

(a) a BraTS-like 3D plan (4 channels, 1 mm, 240x240x155 volumes generated on the fly) and (b) a 2D plan
at 512x512 (4 channels): one forward of one patch with untrained weights from the same arch kwargs, for
plain nnU-Net, EnTrust K = 1 and K = 8 with all maps; (c) whole-case sliding-window prediction of one
BraTS-sized case (240x240x155, every voxel inside the case) through our predictor against nnU-Net's own
``nnUNetPredictor`` with the plain network (what ``nnUNetv2_predict`` runs), for EnTrust K = 1 and 8,
the 5-fold ensemble and MC dropout T = 8. Times and peak memory are ratios to plain, median and spread;
every measurement runs in a fresh process (memory in a second one, with glibc returning freed memory at once).

    python benchmarks/cost.py                       # (a) + (b), 2 CPU threads
    python benchmarks/cost.py --whole-case          # + (c) (slow on CPU: minutes per pass)
    python benchmarks/cost.py --plans 3d --whole-case --case-repeats 3 --case-methods plain entrust
                                                    # (c) in 3 interleaved rounds, ratios paired by round
    python benchmarks/cost.py --compile 2d          # + the 2D patch jobs under torch.compile (CPU inductor)
    python benchmarks/cost.py --smoke               # tiny volumes, for a quick check of the harness

Writes ``benchmarks/results/cost_large.json`` (``--out``), which ``benchmarks/run.py`` includes in its results.
"""
from __future__ import annotations

import argparse
import json
import math
import os
import statistics
import subprocess
import sys
import tempfile
import threading
import time
from pathlib import Path

REPO = Path(__file__).resolve().parent.parent
#: dataset id, image size (x, y, z for 3D), configuration, label of each plan
PLANS = {"3d": (991, (240, 240, 155), "3d_fullres", "BraTS-like 3D (4 ch, 1 mm)"),
         "2d": (992, (512, 512), "2d", "2D 512x512 (4 ch)")}
SMOKE_SIZES = {"3d": (48, 48, 32), "2d": (96, 96)}
PATCH_JOBS = [("plain nnU-Net forward", "plain", 1), ("EnTrust K=1", "entrust", 1), ("EnTrust K=8", "entrust", 8)]
#: the same patch jobs under ``torch.compile`` (``--compile PLAN``), ratios still to the eager plain forward
COMPILED_JOBS = [(f"{label} (torch.compile)", method, k, True) for label, method, k in PATCH_JOBS]
CASE_JOBS = [("plain nnU-Net prediction", "plain", 1), ("EnTrust K=1", "entrust", 1), ("EnTrust K=8", "entrust", 8),
             ("5-fold deep ensemble", "ensemble", 1), ("MC dropout T=8", "mcdropout", 8)]


# ------------------------------------------------------------------------------------------ plans
def write_volumes(raw: Path, size: tuple, num_cases: int = 2) -> None:
    """``num_cases`` skull-stripped-looking cases: 4 channels of a smooth ellipsoidal 'brain' with a lesion, zeros
    outside, spacing 1 mm, labels 0-3 (nnU-Net raw layout)."""
    import numpy as np
    import SimpleITK as sitk

    (raw / "imagesTr").mkdir(parents=True, exist_ok=True)
    (raw / "labelsTr").mkdir(exist_ok=True)
    shape = tuple(reversed(size))  # numpy (z, y, x)
    grid = np.meshgrid(*[np.linspace(-1, 1, s, dtype=np.float32) for s in shape], indexing="ij")
    r2 = sum(g ** 2 for g in grid)
    brain = r2 < 0.8
    for case in range(num_cases):
        rng = np.random.default_rng(case)
        lesion = sum((g - c) ** 2 for g, c in zip(grid, rng.uniform(-0.3, 0.3, len(shape)))) < 0.05
        label = (brain.astype(np.uint8) * 0 + lesion * 1 + (lesion & (r2 < 0.4)) * 1).astype(np.uint8)
        for m in range(4):
            image = (brain * (100 + 20 * m) + lesion * (60 - 30 * m)).astype(np.int16)
            image += (rng.normal(0, 5, shape) * brain).astype(np.int16)
            img = sitk.GetImageFromArray(image)
            img.SetSpacing([1.0] * len(shape))
            sitk.WriteImage(img, str(raw / "imagesTr" / f"case_{case:03d}_{m:04d}.nii.gz"))
        lab = sitk.GetImageFromArray(label)
        lab.SetSpacing([1.0] * len(shape))
        sitk.WriteImage(lab, str(raw / "labelsTr" / f"case_{case:03d}.nii.gz"))
    (raw / "dataset.json").write_text(json.dumps({
        "channel_names": {"0": "T1", "1": "T1ce", "2": "T2", "3": "FLAIR"},
        "labels": {"background": 0, "edema": 1, "core": 2}, "numTraining": num_cases, "file_ending": ".nii.gz"}))


def make_plans(root: Path, key: str, size: tuple) -> dict:
    """nnU-Net's fingerprint and default ExperimentPlanner on volumes of ``size``; returns the plans dict."""
    from nnunetv2.experiment_planning.plan_and_preprocess_api import extract_fingerprints, plan_experiments

    dataset_id = PLANS[key][0]
    for var in ("nnUNet_raw", "nnUNet_preprocessed", "nnUNet_results"):
        os.environ[var] = str(root / var)
        (root / var).mkdir(parents=True, exist_ok=True)
    name = f"Dataset{dataset_id:03d}_CostPlan{key.upper()}"
    write_volumes(root / "nnUNet_raw" / name, size)
    extract_fingerprints([dataset_id], num_processes=2, check_dataset_integrity=False, verbose=False)
    plan_experiments([dataset_id])
    return json.loads((root / "nnUNet_preprocessed" / name / "nnUNetPlans.json").read_text())


# ------------------------------------------------------------------------------------------ one measurement
def build(plans: dict, config: str, method: str):
    """(network, predictor or None) with untrained weights from the plans' arch kwargs; eval mode."""
    import torch
    from nnunetv2.utilities.get_network_from_plans import get_network_from_plans
    from nnunetv2.utilities.plans_handling.plans_handler import PlansManager

    from entrust_nnunet.nnunet.baseline_trainers import MCDROPOUT_NETWORK, _build
    from entrust_nnunet.nnunet.trainers import nnUNetTrainerEnTrust

    cm = PlansManager(plans).get_configuration(config)
    torch.manual_seed(0)
    if method == "entrust":
        net = nnUNetTrainerEnTrust.build_network_architecture(None, cm, 4, 3, enable_deep_supervision=False)
    elif method == "mcdropout":
        net = _build(MCDROPOUT_NETWORK, cm, 4, 3, False)
    else:
        net = get_network_from_plans(cm.network_arch_class_name, cm.network_arch_init_kwargs,
                                     cm.network_arch_init_kwargs_req_import, 4, 3, allow_init=True, deep_supervision=False)
    return net.eval(), cm


def predictor(plans: dict, config: str, method: str, k: int, net, cm, mirroring: bool):
    """nnU-Net's own predictor for plain nnU-Net; our EnTrustPredictor for the rest (5 folds for the ensemble)."""
    import torch
    from nnunetv2.inference.predict_from_raw_data import nnUNetPredictor
    from nnunetv2.utilities.plans_handling.plans_handler import PlansManager

    from entrust_nnunet.model.sampling import SamplingSettings
    from entrust_nnunet.nnunet.predictor import EnTrustPredictor

    kwargs = dict(tile_step_size=0.5, use_gaussian=True, use_mirroring=mirroring, perform_everything_on_device=False,
                  device=torch.device("cpu"), allow_tqdm=False)
    p = nnUNetPredictor(**kwargs) if method == "plain" else EnTrustPredictor(**kwargs, sampling=SamplingSettings(k))
    params = [net.state_dict()] * (5 if method == "ensemble" else 1)
    dataset_json = {"labels": {"background": 0, "a": 1, "b": 2}, "channel_names": {str(i): str(i) for i in range(4)},
                    "file_ending": ".nii.gz"}
    axes = tuple(range(len(cm.patch_size)))
    p.manual_initialization(net, PlansManager(plans), cm, params, dataset_json, "cost", axes)
    return p


def _rss() -> int:
    with open("/proc/self/statm") as f:
        return int(f.read().split()[1]) * 4096


def peak_above(fn, repeats: int = 1) -> int:
    """Peak resident memory above the current level while ``fn`` runs ``repeats`` times (sampled every 0.2 ms)."""
    import gc

    gc.collect()
    base, high, done = _rss(), [0], threading.Event()

    def watch():
        while not done.is_set():
            high[0] = max(high[0], _rss())
            time.sleep(0.0002)

    w = threading.Thread(target=watch)
    w.start()
    try:
        for _ in range(repeats):
            fn()
    finally:
        done.set()
        w.join()
    return max(high[0] - base, 0)


def job(cfg: dict) -> dict:
    """One measurement in this process: times of ``repeats`` passes after ``warmup``, or the peak memory of one."""
    import torch

    from entrust_nnunet.model.sampling import SamplingSettings
    from entrust_nnunet.nnunet.predictor import TrustStatistics

    torch.set_num_threads(cfg["threads"])
    plans = json.loads(Path(cfg["plans"]).read_text())
    net, cm = build(plans, cfg["config"], cfg["method"])
    if cfg["mode"] == "patch":
        x = torch.randn(1, 4, *cm.patch_size)
        model = net if cfg["method"] == "plain" else TrustStatistics(net, SamplingSettings(cfg["k"]))
        if cfg.get("compile"):  # inductor compiles on the first call (the warm-up), whose time is reported apart
            model = torch.compile(model)
        fn = lambda: model(x)  # noqa: E731
    else:
        p = predictor(plans, cfg["config"], cfg["method"], cfg["k"], net, cm, cfg["mirroring"])
        data = torch.randn(4, *reversed(cfg["case_size"]))
        fn = lambda: p.predict_logits_from_preprocessed_data(data)  # noqa: E731
    with torch.inference_mode():
        t = time.perf_counter()
        for _ in range(cfg["warmup"]):
            fn()
        first_s = time.perf_counter() - t
        if cfg["memory"]:
            return {"peak_bytes": peak_above(fn)}
        times = []
        for _ in range(cfg["repeats"]):
            t = time.perf_counter()
            fn()
            times.append(time.perf_counter() - t)
    return {"times": times, "warmup_s": first_s}


# ------------------------------------------------------------------------------------------ orchestration
def measure(cfg: dict, with_memory: bool = True) -> dict | None:
    """Times (one process) and, ``with_memory``, peak memory (a second process, glibc returning freed memory at
    once) of one job."""
    memory_env = {**os.environ, "MALLOC_MMAP_THRESHOLD_": "65536", "MALLOC_TRIM_THRESHOLD_": "65536"}
    out = {"peak_bytes": None}
    passes = [(False, os.environ)] + ([(True, memory_env)] if with_memory else [])
    for memory, env in passes:
        r = subprocess.run([sys.executable, __file__, "--job", json.dumps({**cfg, "memory": memory})],
                           capture_output=True, encoding="utf-8", errors="replace", env=env)
        if r.returncode != 0:
            print(f"{cfg['method']} ({cfg['mode']}) failed:\n{r.stderr[-2000:]}", file=sys.stderr)
            return None
        out.update(json.loads(r.stdout.strip().splitlines()[-1]))
    t = out["times"]
    return {"median_s": statistics.median(t), "min_s": min(t), "max_s": max(t), "n": len(t), "times": t,
            "peak_bytes": out["peak_bytes"], "warmup_s": out["warmup_s"]}


def table(jobs, base_cfg: dict) -> dict:
    """label -> measurement, with ``time_ratio`` (of medians), ``time_ratios`` (each pass / plain's median) and
    ``memory_ratio``, all to the first job (plain)."""
    rows = {}
    for label, method, k, *compiled in jobs:
        row = measure({**base_cfg, "method": method, "k": k, "compile": bool(compiled)})
        if row is not None:
            rows[label] = row
            print(f"  {label}: median {row['median_s']:.2f} s, peak {row['peak_bytes'] / 2 ** 20:.0f} MiB", flush=True)
    base = rows.get(jobs[0][0])
    for row in rows.values():
        if base:
            row["time_ratio"] = row["median_s"] / base["median_s"]
            row["time_ratios"] = [t / base["median_s"] for t in row["times"]]
            row["memory_ratio"] = row["peak_bytes"] / base["peak_bytes"] if base["peak_bytes"] else None
    return rows


def paired_table(jobs, base_cfg: dict, rounds: int) -> dict:
    """:func:`table` for jobs timed in ``rounds`` interleaved rounds (plain, K = 1, K = 8, plain, ...), one pass
    per job and round, each in a fresh process, peak memory in the first round. ``time_ratios`` are paired by
    round (a pass over plain's pass of the same round) and ``time_ratio`` is their median: the machine's speed
    drifts between minutes, which a ratio of medians timed minutes apart would count as the method's
    (docs/design.md, "Whole case in interleaved rounds")."""
    rows: dict = {}
    for r in range(rounds):
        for label, method, k in jobs:
            one = measure({**base_cfg, "method": method, "k": k, "repeats": 1}, with_memory=r == 0)
            if one is None:  # a failed pass leaves its round out of this job's pairs, not another round's
                continue
            row = rows.setdefault(label, {"by_round": {}, "peak_bytes": None, "warmup_s": one["warmup_s"]})
            row["by_round"][r] = one["times"][0]
            if one.get("peak_bytes") is not None and row["peak_bytes"] is None:
                row["peak_bytes"] = one["peak_bytes"]
            print(f"  round {r + 1}/{rounds} {label}: {one['times'][0]:.2f} s", flush=True)
    for row in rows.values():
        by_round = row.pop("by_round")
        t = row["times"] = list(by_round.values())
        row.update(times_by_round=by_round, median_s=statistics.median(t), min_s=min(t), max_s=max(t), n=len(t))
    base = rows.get(jobs[0][0])
    for row in rows.values() if base else ():
        paired = [r for r in row["times_by_round"] if r in base["times_by_round"]]
        if paired:  # each pass over plain's pass of the same round
            row["time_ratios"] = [row["times_by_round"][r] / base["times_by_round"][r] for r in paired]
            row["time_ratio"] = statistics.median(row["time_ratios"])
        if row["peak_bytes"] and base["peak_bytes"]:
            row["memory_ratio"] = row["peak_bytes"] / base["peak_bytes"]
    return rows


def _fmt(v, digits=2) -> str:
    return f"{v:.{digits}f}" if isinstance(v, (int, float)) and v == v else "n/a"


def markdown(result: dict) -> str:
    lines = [f"Large-size cost (`{result['command']}`, commit `{result['commit']}`, {result['threads']} CPU threads, "
             f"untrained weights from nnU-Net's own plans; ratios to plain nnU-Net measured in the same run):"]
    for key, plan in result["plans"].items():
        lines += ["", f"| {plan['label']}: one patch {plan['patch_size']} | median s | spread (min–max) | time ratio | "
                      f"peak memory MiB | memory ratio |", "|---|---|---|---|---|---|"]
        lines += [_row(label, row) for label, row in plan["patch"].items()]
    if result.get("whole_case"):
        case = result["whole_case_settings"]
        lines += ["", f"| whole case {case['case_size']} (3D plan, mirroring {'on' if case['mirroring'] else 'off'}) | "
                      f"median s | spread (min–max) | time ratio (median of per-round ratios) | peak memory MiB | memory ratio |", "|---|---|---|---|---|---|"]
        lines += [_row(label, row) for label, row in result["whole_case"].items()]
    return "\n".join(lines) + "\n"


def _row(label: str, row: dict) -> str:
    first = f" (first call, compiling: {row['warmup_s']:.0f} s)" if "torch.compile" in label else ""
    return (f"| {label}{first} | {_fmt(row['median_s'], 3)} | {_fmt(row['min_s'], 3)}–{_fmt(row['max_s'], 3)} "
            f"(n={row['n']}) | {_fmt(row.get('time_ratio'))} | {_fmt((row['peak_bytes'] or math.nan) / 2 ** 20, 0)} | "
            f"{_fmt(row.get('memory_ratio'))} |")


def run(args) -> dict:
    started = time.time()
    commit = subprocess.run(["git", "rev-parse", "HEAD"], cwd=REPO, capture_output=True, text=True).stdout.strip()
    result = {"command": " ".join(["python", *sys.argv]), "commit": commit, "threads": args.threads, "plans": {},
              "device": "cpu", "cpus": os.cpu_count()}
    with tempfile.TemporaryDirectory() as tmp:
        for key in args.plans:
            dataset_id, size, config, label = PLANS[key]
            size = SMOKE_SIZES[key] if args.smoke else size
            plans = make_plans(Path(tmp) / key, key, size)
            plans_file = Path(tmp) / f"{key}_plans.json"
            plans_file.write_text(json.dumps(plans))
            cm = plans["configurations"][config]
            print(f"{label}: patch {cm['patch_size']}, {cm['architecture']['arch_kwargs']['n_stages']} stages", flush=True)
            base = {"plans": str(plans_file), "config": config, "mode": "patch", "threads": args.threads,
                    "warmup": 1, "repeats": args.repeats}
            result["plans"][key] = {"label": label, "patch_size": cm["patch_size"], "image_size": size,
                                    "arch_kwargs": cm["architecture"]["arch_kwargs"],
                                    "patch": table(PATCH_JOBS + (COMPILED_JOBS if key in args.compile else []), base)}
            if key == "3d" and args.whole_case:
                case = list(size)
                result["whole_case_settings"] = {"case_size": case, "mirroring": args.mirroring, "tile_step_size": 0.5}
                base.update(mode="case", case_size=case, mirroring=args.mirroring, warmup=0)
                jobs = [job for job in CASE_JOBS if job[1] in args.case_methods]
                result["whole_case"] = paired_table(jobs, base, args.case_repeats)
    result["wall_seconds"] = time.time() - started
    result["markdown"] = markdown(result)
    return result


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--job", help=argparse.SUPPRESS)
    parser.add_argument("--out", default=str(REPO / "benchmarks" / "results" / "cost_large.json"))
    parser.add_argument("--plans", nargs="+", default=["3d", "2d"], choices=list(PLANS))
    parser.add_argument("--threads", type=int, default=2)
    parser.add_argument("--device", default="cpu", choices=("cpu",), help="CPU only for now")
    parser.add_argument("--repeats", type=int, default=3, help="timed passes per patch measurement (default 3)")
    parser.add_argument("--whole-case", action="store_true", help="(c): whole-case sliding-window prediction")
    parser.add_argument("--case-repeats", type=int, default=1,
                        help="interleaved rounds of (c), one pass of every method each, ratios paired by round "
                             "(default 1)")
    parser.add_argument("--case-methods", nargs="+", default=[m for _, m, _ in CASE_JOBS],
                        choices=[m for _, m, _ in CASE_JOBS], metavar="METHOD",
                        help="methods timed in (c) (default: all; plain is always the reference); the ensemble "
                             "and MC dropout take ~16 of its ~20 min")
    parser.add_argument("--mirroring", action="store_true", help="test-time mirroring in (c) (8x the work in 3D)")
    parser.add_argument("--compile", nargs="*", default=[], choices=list(PLANS), metavar="PLAN",
                        help="also time the patch jobs under torch.compile (inductor) for these plans (e.g. 2d); "
                             "the first call, which compiles, is reported as warmup_s")
    parser.add_argument("--smoke", action="store_true", help="tiny volumes (harness check); writes nothing")
    args = parser.parse_args(argv)
    args.case_methods = ["plain", *[m for m in args.case_methods if m != "plain"]]
    if args.job:
        print(json.dumps(job(json.loads(args.job))))
        return 0
    result = run(args)
    print(result["markdown"])
    if not args.smoke:
        Path(args.out).parent.mkdir(parents=True, exist_ok=True)
        Path(args.out).write_text(json.dumps(result, indent=2))
    return 0


if __name__ == "__main__":
    sys.exit(main())
