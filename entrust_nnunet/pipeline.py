"""The steps of the pipeline that call nnU-Net: plan/preprocess and the demo driver."""
from __future__ import annotations

import os

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


def run_demo(args) -> None:
    """phantoms -> plan/preprocess (training, prediction and evaluation follow in later steps)."""
    import shutil
    from pathlib import Path

    from entrust_nnunet.nnunet_env import set_nnunet_roots
    from entrust_nnunet.phantoms import write_phantom_dataset

    root = Path(args.dataset_dir).absolute()
    if args.fresh and root.exists():
        shutil.rmtree(root)
    set_nnunet_roots(root)
    ensure_ext_trainer()
    raw = Path(os.environ["nnUNet_raw"]) / f"Dataset{DEMO_DATASET_ID}_EnTrustPhantoms{args.dim}D"
    if not raw.exists():
        write_phantom_dataset(raw, num_cases=args.n, dim=args.dim, seed=args.seed)
    config = "2d" if args.dim == 2 else "3d_fullres"
    plans = Path(os.environ["nnUNet_preprocessed"]) / raw.name / "nnUNetEnTrustPlans.json"
    if not plans.exists():
        plan_and_preprocess([DEMO_DATASET_ID], configurations=[config], verify=True)
    print(f"demo data: {raw}\nplans: {plans}")
