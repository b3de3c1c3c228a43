"""The steps of the pipeline that call nnU-Net: plan/preprocess and the demo driver."""
from __future__ import annotations

import os
import re
from pathlib import Path

from entrust_nnunet.io import InputError
from entrust_nnunet.nnunet_env import ensure_ext_trainer


def _require_nnunet_paths(*names: str) -> None:
    missing = [n for n in names if not os.environ.get(n)]
    if missing:
        raise InputError(f"{', '.join(missing)} not set: run `entrust env --root FOLDER` for the lines to export")


def resolve_planner(name: str):
    """EnTrustPlanner, or any planner class nnU-Net finds by name in its own package."""
    if name == "EnTrustPlanner":
        from entrust_nnunet.plans.entrust_planner import EnTrustPlanner

        return EnTrustPlanner
    from os.path import join

    import nnunetv2
    from nnunetv2.utilities.find_class_by_name import recursive_find_python_class

    cls = recursive_find_python_class(join(nnunetv2.__path__[0], "experiment_planning"), name,
                                      "nnunetv2.experiment_planning")
    if cls is None:
        raise InputError(f"-pl {name}: no such experiment planner (EnTrustPlanner or an nnU-Net planner)")
    return cls


def plan_and_preprocess(dataset_ids, configurations=("2d",), planner: str = "EnTrustPlanner",
                        num_processes: int = 2, verify: bool = False) -> list[str]:
    """Fingerprint, plan (with ``planner``) and preprocess through nnunetv2's API; returns plans identifiers.

    The default ``nnUNetPlans`` are planned as well, so stock nnU-Net trainers can be compared on the
    same preprocessed data.
    """
    from nnunetv2.experiment_planning.experiment_planners.default_experiment_planner import ExperimentPlanner
    from nnunetv2.experiment_planning.plan_and_preprocess_api import (extract_fingerprints,
                                                                      plan_experiment_dataset, preprocess)

    _require_nnunet_paths("nnUNet_raw", "nnUNet_preprocessed")
    ensure_ext_trainer()
    planner_cls = resolve_planner(planner)
    dataset_ids = [int(d) for d in dataset_ids]
    extract_fingerprints(dataset_ids, num_processes=num_processes, check_dataset_integrity=verify)
    identifiers = []
    for d in dataset_ids:
        for cls in dict.fromkeys([ExperimentPlanner, planner_cls]):
            _, ident = plan_experiment_dataset(d, cls)
            identifiers.append(ident)
    # EnTrustPlanner shares nnUNetPlans' preprocessed data (same data identifier): preprocess once
    from entrust_nnunet.plans.entrust_planner import ENTRUST_PLANS

    for ident in dict.fromkeys(i for i in identifiers if i != ENTRUST_PLANS):
        preprocess(dataset_ids, ident, configurations=tuple(configurations),
                   num_processes=[num_processes] * len(configurations))
    return list(dict.fromkeys(identifiers))


DEMO_DATASET_ID = 501
DEMO_TRAINER = "nnUNetTrainerEnTrust_demo"
DEMO_PLANS = "nnUNetEnTrustPlans"
EPOCH_LINE = re.compile(r": Epoch (\d+)$")


def train_fold(dataset_id: int, configuration: str, fold: str, trainer: str, plans: str, device: str,
               num_epochs: int | None, log_file: Path) -> None:
    """Run the stock ``nnUNetv2_train`` in a subprocess with an epoch progress bar; its output goes to ``log_file``."""
    import subprocess
    import sys

    from tqdm import tqdm

    exe = Path(sys.executable).with_name("nnUNetv2_train")
    cmd = [str(exe if exe.exists() else "nnUNetv2_train"), str(dataset_id), configuration, str(fold), "-tr", trainer,
           "-p", plans, "-device", device]
    with open(log_file, "w", encoding="utf-8") as log, \
            tqdm(total=num_epochs, desc=f"train fold {fold}", unit="epoch") as bar:
        proc = subprocess.Popen(cmd, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, encoding="utf-8",
                                errors="replace", env=os.environ)
        for line in proc.stdout:
            log.write(line)
            match = EPOCH_LINE.search(line.strip())
            if match:
                bar.n = int(match.group(1))
                bar.refresh()
            elif "Training done" in line:
                bar.n = num_epochs or bar.n
                bar.set_postfix_str("validation")
                bar.refresh()
        if proc.wait() != 0:
            raise InputError(f"{log_file}: nnUNetv2_train failed (exit {proc.returncode}); see the log")


def run_demo(args) -> dict:
    """phantoms -> plan/preprocess -> train -> predict with maps -> evaluate -> report; finished steps are reused."""
    import json
    import shutil
    import time

    from entrust_nnunet.evaluate import evaluate_folder, headline
    from entrust_nnunet.nnunet_env import set_nnunet_roots
    from entrust_nnunet.phantoms import write_phantom_dataset
    from entrust_nnunet.io import MAP_FOLDER
    from entrust_nnunet.predict import predict_folder
    from entrust_nnunet.report import write_report
    from entrust_nnunet.training import DEMO_SCHEDULE

    started = time.time()
    root = Path(args.dataset_dir).absolute()
    if args.fresh and root.exists():
        shutil.rmtree(root)
    set_nnunet_roots(root)
    ensure_ext_trainer()
    config = "2d" if args.dim == 2 else "3d_fullres"
    name = f"Dataset{DEMO_DATASET_ID}_EnTrustPhantoms{args.dim}D"
    raw = Path(os.environ["nnUNet_raw"]) / name
    for other in Path(os.environ["nnUNet_raw"]).glob(f"Dataset{DEMO_DATASET_ID}_*"):
        if other.name != name:
            raise InputError(f"{other}: the demo uses dataset id {DEMO_DATASET_ID}; use another --dataset-dir or --fresh")
    print(f"[1/6] phantoms ({args.dim}D, {args.n} training cases, {args.num_test} test cases)")
    if not raw.exists():
        write_phantom_dataset(raw, num_cases=args.n, num_test=args.num_test, dim=args.dim, seed=args.seed,
                              size=args.size)
    print("[2/6] nnU-Net fingerprint, plans (nnUNetPlans + nnUNetEnTrustPlans), preprocessing")
    if not (Path(os.environ["nnUNet_preprocessed"]) / name / f"{DEMO_PLANS}.json").exists():
        plan_and_preprocess([DEMO_DATASET_ID], configurations=[config], verify=True)
    model = Path(os.environ["nnUNet_results"]) / name / f"{args.trainer}__{DEMO_PLANS}__{config}"
    epochs = DEMO_SCHEDULE["num_epochs"] if args.trainer == DEMO_TRAINER else None
    for fold in args.folds:
        schedule = (f"{DEMO_SCHEDULE['num_epochs']} epochs x {DEMO_SCHEDULE['num_iterations_per_epoch']} iterations"
                    if epochs else "its own schedule")
        print(f"[3/6] training {args.trainer} fold {fold} ({schedule}) with the stock nnUNetv2_train")
        if not (model / f"fold_{fold}" / "checkpoint_final.pth").exists():
            (root / "logs").mkdir(exist_ok=True)
            train_fold(DEMO_DATASET_ID, config, fold, args.trainer, DEMO_PLANS, args.device, epochs,
                       root / "logs" / f"train_fold_{fold}.log")
    pred = root / "predictions"
    cases = sorted(p.name[: -len("_0000.nii.gz")] for p in (raw / "imagesTs").glob("*_0000.nii.gz"))
    print(f"[4/6] predicting {len(cases)} held-out cases with uncertainty maps (folds {', '.join(args.folds)} pooled)")
    if not all((pred / MAP_FOLDER / f"{c}_total.nii.gz").exists() and (pred / f"{c}.nii.gz").exists()
               for c in cases):
        predict_folder(raw / "imagesTs", pred, model, folds=[f if f == "all" else int(f) for f in args.folds],
                       device=args.device, num_processes_preprocessing=2, num_processes_export=2)
    print("[5/6] evaluating against the true labels and conflict masks")
    summary_file = root / "summary.json"
    summary = evaluate_folder(pred, raw / "labelsTs", conflict_dir=raw / "conflictTs",
                              dataset_json=raw / "dataset.json", output_file=summary_file)
    print("[6/6] writing the report")
    report = write_report(pred, summary, root / "report", images_dir=raw / "imagesTs", gt_dir=raw / "labelsTs",
                          conflict_dir=raw / "conflictTs")
    numbers = headline(summary)
    print(f"\nEnTrust demo finished in {time.time() - started:.0f} s")
    print(f"  data         {raw}")
    print(f"  model        {model}")
    print(f"  predictions  {pred} (maps in {pred / MAP_FOLDER})")
    print(f"  metrics      {summary_file}")
    print(f"  report       {Path(report) / 'index.html'}")
    print("  headline     " + json.dumps({k: (round(v, 4) if isinstance(v, float) else v) for k, v in numbers.items()}))
    return numbers
