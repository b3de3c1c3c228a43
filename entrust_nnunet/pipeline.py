"""The steps of the pipeline that call nnU-Net (plan/preprocess, train) and the demo, as explicit steps.

Quiet by default: each step prints one line of its own (and progress bars); what nnU-Net prints goes
to a log file per step, whose path is printed. ``verbose`` shows nnU-Net's output instead. A step
that fails prints the last lines of its log and the log's path.
"""
from __future__ import annotations

import contextlib
import json
import os
import re
import shutil
import subprocess
import sys
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Iterator, Sequence

from tqdm import tqdm

from entrust_nnunet.data.io import MAP_FOLDER, TEMP_PREFIX, InputError, dataset_prefix, nnunet_dataset_name
from entrust_nnunet.nnunet.env import ensure_ext_trainer, set_nnunet_roots
from entrust_nnunet.nnunet.planner import ENTRUST_PLANS, SHARED_DATA

#: lines of a failing step's log shown on the terminal
LOG_TAIL_LINES = 15
EPOCH_LINE = re.compile(r": Epoch (\d+)$")


def _require_nnunet_paths(*names: str) -> None:
    missing = [n for n in names if not os.environ.get(n)]
    if missing:
        raise InputError(f"{', '.join(missing)} not set: run `entrust env --root FOLDER` for the lines to export")


def _log_tail(log_file: Path) -> str:
    try:
        lines = log_file.read_text(encoding="utf-8", errors="replace").splitlines()
    except OSError:
        return ""
    return "\n".join(lines[-LOG_TAIL_LINES:])


@contextlib.contextmanager
def step_output(log_file: Path | None, verbose: bool = False) -> Iterator[None]:
    """Send everything this process and its children print (file descriptors 1 and 2) to ``log_file``,
    unless ``verbose`` or no log file is given. On an error the log's last lines go to the terminal."""
    if verbose or log_file is None:
        yield
        return
    log_file.parent.mkdir(parents=True, exist_ok=True)
    sys.stdout.flush()
    sys.stderr.flush()
    saved = [os.dup(1), os.dup(2)]
    try:
        with open(log_file, "a", encoding="utf-8", buffering=1) as log, \
                contextlib.redirect_stdout(log), contextlib.redirect_stderr(log):
            # the file descriptors for child processes and C code, the Python objects for this process
            os.dup2(log.fileno(), 1)
            os.dup2(log.fileno(), 2)
            try:
                yield
            finally:
                log.flush()
                sys.stdout.flush()
                sys.stderr.flush()
                os.dup2(saved[0], 1)
                os.dup2(saved[1], 2)
    except BaseException:
        tail = _log_tail(log_file)
        if tail:
            print(f"--- last lines of {log_file} ---\n{tail}\n---", file=sys.stderr)
        raise
    finally:
        for fd in saved:
            os.close(fd)


def resolve_planner(name: str):
    """EnTrustPlanner, or any planner class nnU-Net finds by name in its own package."""
    if name == "EnTrustPlanner":
        from entrust_nnunet.nnunet.planner import EnTrustPlanner

        return EnTrustPlanner
    import nnunetv2
    from nnunetv2.utilities.find_class_by_name import recursive_find_python_class

    cls = recursive_find_python_class(os.path.join(nnunetv2.__path__[0], "experiment_planning"), name,
                                      "nnunetv2.experiment_planning")
    if cls is None:
        raise InputError(f"-pl {name}: no such experiment planner (EnTrustPlanner or an nnU-Net planner)")
    return cls


def check_labels(dataset_id: int) -> None:
    """One line naming dataset.json when nnU-Net's LabelManager refuses its labels or regions (e.g. regions
    without ``regions_class_order``), before nnU-Net fails deep inside planning or training."""
    from entrust_nnunet.evaluation.evaluate import label_manager

    folders = sorted(Path(os.environ["nnUNet_raw"]).glob(dataset_prefix(dataset_id) + "*"))
    path = folders[0] / "dataset.json" if folders else None
    if path is None or not path.is_file():
        return  # nnU-Net names the missing dataset itself
    try:
        content = json.loads(path.read_text(encoding="utf-8"))
    except (OSError, UnicodeDecodeError, json.JSONDecodeError) as e:
        raise InputError(f"{path}: not valid JSON ({type(e).__name__})") from None
    if not isinstance(content, dict) or not isinstance(content.get("labels"), dict):
        raise InputError(f"{path}: needs a 'labels' object")
    label_manager(content, path)


def plan_and_preprocess(dataset_ids, configurations=("2d",), planner: str = "EnTrustPlanner",
                        num_processes: int = 2, verify: bool = False) -> list[str]:
    """Fingerprint, plan (with ``planner``) and preprocess through nnunetv2's API; returns plans identifiers.

    The default ``nnUNetPlans`` are planned as well, so stock nnU-Net trainers can be compared on the
    same preprocessed data. A dataset's ``labelsTr_annotators/`` go through the same preprocessing
    (:func:`~entrust_nnunet.nnunet.annotators.preprocess_annotators`), for multi-annotator training.
    """
    from nnunetv2.experiment_planning.experiment_planners.default_experiment_planner import ExperimentPlanner
    from nnunetv2.experiment_planning.plan_and_preprocess_api import (extract_fingerprints,
                                                                      plan_experiment_dataset, preprocess)

    _require_nnunet_paths("nnUNet_raw", "nnUNet_preprocessed")
    from entrust_nnunet.nnunet.annotators import preprocess_annotators

    ensure_ext_trainer()
    planner_cls = resolve_planner(planner)
    dataset_ids = [int(d) for d in dataset_ids]
    for d in dataset_ids:
        check_labels(d)
    extract_fingerprints(dataset_ids, num_processes=num_processes, check_dataset_integrity=verify)
    identifiers = []
    for d in dataset_ids:
        for cls in dict.fromkeys([ExperimentPlanner, planner_cls]):
            _, ident = plan_experiment_dataset(d, cls)
            identifiers.append(ident)
    for ident in dict.fromkeys(identifiers):
        # EnTrustPlanner shares nnUNetPlans' preprocessed data of 2d/3d_fullres (same data identifier): those once
        todo = tuple(c for c in configurations if ident != ENTRUST_PLANS or c not in SHARED_DATA)
        if not todo:
            continue
        preprocess(dataset_ids, ident, configurations=todo, num_processes=[num_processes] * len(todo))
        for d in dataset_ids:  # labelsTr_annotators/ through the same preprocessing, for multi-annotator training
            preprocess_annotators(d, ident, todo, num_processes)
    return list(dict.fromkeys(identifiers))


def train_fold(dataset_id: int, configuration: str, fold: str, trainer: str, plans: str, device: str,
               num_epochs: int | None, log_file: Path, verbose: bool = False, npz: bool = False) -> None:
    """Run the stock ``nnUNetv2_train`` in a subprocess with an epoch progress bar; its output goes to
    ``log_file`` (and, with ``verbose``, to the terminal too). ``npz``: nnU-Net's ``--npz`` (the validation's
    class probabilities are kept)."""
    exe = Path(sys.executable).with_name("nnUNetv2_train")
    cmd = [str(exe if exe.exists() else "nnUNetv2_train"), str(dataset_id), configuration, str(fold), "-tr", trainer,
           "-p", plans, "-device", device] + (["--npz"] if npz else [])
    with open(log_file, "w", encoding="utf-8") as log, \
            tqdm(total=num_epochs, desc=f"train fold {fold}", unit="epoch", disable=verbose) as bar:
        # unbuffered: nnU-Net's epoch lines drive the progress bar as they happen, not when a buffer fills
        proc = subprocess.Popen(cmd, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, encoding="utf-8",
                                errors="replace", env={**os.environ, "PYTHONUNBUFFERED": "1"})
        for line in proc.stdout:
            log.write(line)
            if verbose:
                sys.stdout.write(line)
            if match := EPOCH_LINE.search(line.strip()):
                bar.n = int(match.group(1))
                bar.refresh()
            elif "Training done" in line:
                bar.n = num_epochs or bar.n
                bar.set_postfix_str("validation")
                bar.refresh()
    if proc.wait() != 0:
        print(f"--- last lines of {log_file} ---\n{_log_tail(log_file)}\n---", file=sys.stderr)
        raise InputError(f"{log_file}: nnUNetv2_train failed (exit {proc.returncode}); see the log")


# ------------------------------------------------------------------------------------------------ demo
DEMO_DATASET_ID = 501
DEMO_TRAINER = "nnUNetTrainerEnTrust_demo"
#: the demo's trainer per dimension (the 3D one has its own CPU schedule)
DEMO_TRAINERS = {2: DEMO_TRAINER, 3: "nnUNetTrainerEnTrust_demo3d"}
DEMO_PLANS = ENTRUST_PLANS


@dataclass(frozen=True)
class DemoPaths:
    root: Path
    raw: Path
    model: Path
    predictions: Path
    summary: Path
    report: Path
    logs: Path


def _demo_paths(root: Path, dim: int, trainer: str, configuration: str) -> DemoPaths:
    from nnunetv2.utilities.file_path_utilities import get_output_folder

    name = nnunet_dataset_name(DEMO_DATASET_ID, f"EnTrustPhantoms{dim}D")
    raw = Path(os.environ["nnUNet_raw"]) / name
    for other in raw.parent.glob(dataset_prefix(DEMO_DATASET_ID) + "*"):
        if other.name != name:
            raise InputError(f"{other}: the demo uses dataset id {DEMO_DATASET_ID}; use another --dataset-dir or --fresh")
    return DemoPaths(root, raw, Path(get_output_folder(name, trainer, DEMO_PLANS, configuration)),
                     root / "predictions", root / "summary.json", root / "report", root / "logs")


def _demo_step(number: int, text: str) -> None:
    print(f"[{number}/6] {text}", flush=True)


#: what the demo writes into its working folder (nnU-Net's three roots, then steps 4-6)
DEMO_ENTRIES = {"nnUNet_raw", "nnUNet_preprocessed", "nnUNet_results", "predictions", "summary.json", "report", "logs"}


def remove_demo_folder(root: Path) -> None:
    """``--fresh``: delete the demo's working folder, but only one that holds nothing the demo did not write
    (a mistyped ``--dataset-dir`` must not delete a user's folder); else one line naming what is there."""
    if not root.is_dir():
        raise InputError(f"{root}: not a folder; give --dataset-dir a demo working folder")
    foreign = sorted(e.name for e in root.iterdir()
                     if e.name not in DEMO_ENTRIES and not e.name.startswith(TEMP_PREFIX))
    if foreign:
        raise InputError(f"{root}: not a demo working folder (it holds {', '.join(foreign[:3])}"
                         f"{', ...' if len(foreign) > 3 else ''}); --fresh deletes only the demo's own folder")
    shutil.rmtree(root)


def run_demo(dataset_dir: str | os.PathLike = "entrust_demo", dim: int = 2, folds: Sequence[str] = ("0",),
             device: str = "cpu", num_train: int = 24, num_test: int = 20, size: int | None = None, seed: int = 0,
             trainer: str | None = None, fresh: bool = False, verbose: bool = False) -> dict:
    """phantoms -> plan/preprocess -> train -> predict with maps -> evaluate -> report; finished steps are reused."""
    from entrust_nnunet.data.phantoms import write_phantom_dataset
    from entrust_nnunet.nnunet import variants

    started = time.time()
    trainer = trainer or DEMO_TRAINERS[dim]
    root = Path(dataset_dir).absolute()
    if fresh and root.exists():
        remove_demo_folder(root)
    set_nnunet_roots(root)
    ensure_ext_trainer()
    config = "2d" if dim == 2 else "3d_fullres"
    paths = _demo_paths(root, dim, trainer, config)
    _demo_step(1, f"phantoms ({dim}D, {num_train} training cases, {num_test} test cases)")
    if not paths.raw.exists():
        write_phantom_dataset(paths.raw, num_cases=num_train, num_test=num_test, dim=dim, seed=seed, size=size)
    log = paths.logs / "plan_and_preprocess.log"
    _demo_step(2, f"nnU-Net fingerprint, plans (nnUNetPlans + {DEMO_PLANS}), preprocessing (log: {log})")
    if not (Path(os.environ["nnUNet_preprocessed"]) / paths.raw.name / f"{DEMO_PLANS}.json").exists():
        with step_output(log, verbose):
            plan_and_preprocess([DEMO_DATASET_ID], configurations=[config], verify=True)
    known = getattr(variants, trainer, None)  # one of our variants: its schedule is known here
    epochs = known.schedule.get("num_epochs") if known is not None and hasattr(known, "schedule") else None
    schedule = (f"{epochs} epochs x {known.schedule['num_iterations_per_epoch']} iterations" if epochs
                else "its own schedule")
    for fold in folds:
        log = paths.logs / f"train_fold_{fold}.log"
        _demo_step(3, f"training {trainer} fold {fold} ({schedule}) with the stock nnUNetv2_train (log: {log})")
        if not (paths.model / f"fold_{fold}" / "checkpoint_final.pth").exists():
            paths.logs.mkdir(parents=True, exist_ok=True)
            train_fold(DEMO_DATASET_ID, config, fold, trainer, DEMO_PLANS, device, epochs, log, verbose)
    _demo_predict(paths, folds, device, verbose)
    return _demo_evaluate(paths, started, verbose)


def _demo_predict(paths: DemoPaths, folds: Sequence[str], device: str, verbose: bool) -> None:
    from entrust_nnunet.predict import predict_folder

    cases = sorted(p.name[: -len("_0000.nii.gz")] for p in (paths.raw / "imagesTs").glob("*_0000.nii.gz"))
    log = paths.logs / "predict.log"
    _demo_step(4, f"predicting {len(cases)} held-out cases with uncertainty maps (folds {', '.join(folds)} "
                  f"pooled; log: {log})")
    if not all((paths.predictions / MAP_FOLDER / f"{c}_total.nii.gz").exists()
               and (paths.predictions / f"{c}.nii.gz").exists() for c in cases):
        with step_output(log, verbose):
            predict_folder(paths.raw / "imagesTs", paths.predictions, paths.model,
                           folds=[f if f == "all" else int(f) for f in folds], device=device,
                           # phantoms are small: a spawned worker's imports cost more than their preprocessing/export
                           num_processes_preprocessing=0, num_processes_export=1, save_hypotheses=True)


def _demo_evaluate(paths: DemoPaths, started: float, verbose: bool) -> dict:
    from entrust_nnunet.evaluation.evaluate import evaluate_folder
    from entrust_nnunet.evaluation.report import write_report
    from entrust_nnunet.evaluation.summary import headline

    raw = paths.raw
    _demo_step(5, "evaluating against the true labels and conflict masks")
    summary = evaluate_folder(paths.predictions, raw / "labelsTs", conflict_dir=raw / "conflictTs",
                              dataset_json=raw / "dataset.json", output_file=paths.summary)
    _demo_step(6, "writing the report")
    report = write_report(paths.predictions, summary, paths.report, images_dir=raw / "imagesTs",
                          gt_dir=raw / "labelsTs", conflict_dir=raw / "conflictTs")
    numbers = headline(summary)
    print(f"\nEnTrust demo finished in {time.time() - started:.0f} s")
    print(f"  data         {raw}")
    print(f"  model        {paths.model}")
    print(f"  predictions  {paths.predictions} (maps in {paths.predictions / MAP_FOLDER})")
    print(f"  metrics      {paths.summary}")
    print(f"  report       {Path(report) / 'index.html'}")
    print(f"  logs         {paths.logs}")
    print("  headline     " + json.dumps({k: (round(v, 4) if isinstance(v, float) else v) for k, v in numbers.items()}))
    return numbers
