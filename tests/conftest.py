import os
import shutil
import sys
from pathlib import Path

import pytest

from entrust_nnunet.nnunet.env import ensure_ext_trainer, set_nnunet_roots

# `entrust predict` in the tests preprocesses in its own process and exports inline unless a test says otherwise
# (-npp/-nps): a spawned worker's imports cost seconds, more than a 32x32 phantom's preprocessing. The worker
# and pool paths are run by tests/reliability/test_faults.py (-npp 1, and -nps 2 in one scenario)
os.environ.setdefault("nnUNet_npp", "0")
os.environ.setdefault("nnUNet_nps", "1")
# Idle OpenMP threads sleep instead of spinning: the suite runs on two workers (README: -n 2), and with spinning
# threads two tiny nnU-Net trainings side by side took 47 s, with sleeping ones 20 s (one alone: 22-23 s).
# Set before any test process imports torch; the nnU-Net subprocesses inherit it
os.environ.setdefault("OMP_WAIT_POLICY", "PASSIVE")

def arch_kwargs(dim: int, n_stages: int = 3) -> dict:
    """Small PlainConvUNet arch kwargs (as nnU-Net's planner writes them) for network tests, 2D or 3D."""
    from torch import nn

    conv, norm = (nn.Conv2d, nn.InstanceNorm2d) if dim == 2 else (nn.Conv3d, nn.InstanceNorm3d)
    return dict(n_stages=n_stages, features_per_stage=[16, 32, 64, 128][:n_stages], conv_op=conv,
                kernel_sizes=[[3] * dim] * n_stages, strides=[[1] * dim] + [[2] * dim] * (n_stages - 1),
                n_conv_per_stage=[2] * n_stages, n_conv_per_stage_decoder=[2] * (n_stages - 1), conv_bias=True,
                norm_op=norm, norm_op_kwargs={"eps": 1e-5, "affine": True}, nonlin=nn.LeakyReLU,
                nonlin_kwargs={"inplace": True})


#: a 2D phantom dataset, planned and preprocessed once per test session
SESSION_DATASET_ID = 951
#: test-only trainer plug-ins (the placeholder trainer), found through nnUNet_extTrainer like ours
TEST_PLUGINS = Path(__file__).resolve().parent / "plugins"
#: the dotted path plans files written before the package had rooms name (must keep working)
OLD_NETWORK_PATH = "entrust_nnunet.network.EnTrustUNet"


def nnunet_bin(name: str) -> str:
    """The console script of the interpreter running the tests (works without an activated venv)."""
    exe = Path(sys.executable).with_name(name)
    return str(exe) if exe.exists() else shutil.which(name)


def use_nnunet_roots(env: dict, monkeypatch, *extra: str) -> None:
    """nnU-Net's roots (and the ``extra`` variables) of a fixture's ``env`` for one test only: monkeypatch undoes them,
    so the files xdist runs later on the same worker see the environment they started with."""
    for k in ("nnUNet_raw", "nnUNet_preprocessed", "nnUNet_results", *extra):
        monkeypatch.setenv(k, env[k])


@pytest.fixture(scope="session")
def planned_phantoms(tmp_path_factory):
    """(env, dataset_name): 2D phantoms (8 cases, 32x32) with nnUNetPlans and nnUNetEnTrustPlans preprocessed.

    nnUNetPlans come from the stock ``nnUNetv2_plan_and_preprocess --verify_dataset_integrity`` (so nnU-Net's
    own checks accept our phantoms; its output is kept in ``stock_plan_output``), nnUNetEnTrustPlans from
    EnTrustPlanner through nnU-Net's planning API (they share nnUNetPlans' preprocessed data).
    """
    import subprocess

    from nnunetv2.experiment_planning.plan_and_preprocess_api import plan_experiment_dataset

    from entrust_nnunet.data.phantoms import write_phantom_dataset
    from entrust_nnunet.nnunet.planner import EnTrustPlanner

    root = tmp_path_factory.mktemp("nnunet")
    env = set_nnunet_roots(root, dict(os.environ))
    env.update(nnUNet_def_n_proc="1", nnUNet_n_proc_DA="1", nnUNet_compile="false")
    ensure_ext_trainer(env)
    env["nnUNet_extTrainer"] += os.pathsep + str(TEST_PLUGINS)
    name = f"Dataset{SESSION_DATASET_ID}_Phantoms"
    write_phantom_dataset(Path(env["nnUNet_raw"]) / name, num_cases=8, num_test=2, dim=2, size=32, seed=11,
                          progress=False)
    # -npfp 1: its default spawns 8 fingerprint processes, each importing nnU-Net, for 8 tiny cases
    r = subprocess.run([nnunet_bin("nnUNetv2_plan_and_preprocess"), "-d", str(SESSION_DATASET_ID), "-c", "2d", "-npfp", "1",
                        "-np", "1", "--verify_dataset_integrity"], env=env, capture_output=True, encoding="utf-8",
                       errors="replace", timeout=900)
    assert r.returncode == 0, r.stdout[-3000:] + r.stderr[-3000:]
    (root / "stock_plan_output.txt").write_text(r.stdout, encoding="utf-8")
    old = dict(os.environ)
    os.environ.update({k: env[k] for k in ("nnUNet_raw", "nnUNet_preprocessed", "nnUNet_results")})
    try:
        plan_experiment_dataset(SESSION_DATASET_ID, EnTrustPlanner)
    finally:
        os.environ.clear()
        os.environ.update(old)
    _write_old_plans(Path(env["nnUNet_preprocessed"]) / name)
    return env, name


def _write_old_plans(folder: Path) -> None:
    """``nnUNetEnTrustPlansV0``: the EnTrust plans as the main before the rooms wrote them (old class path)."""
    import json

    plans = json.loads((folder / "nnUNetEnTrustPlans.json").read_text())
    plans["plans_name"] = "nnUNetEnTrustPlansV0"
    for cfg in plans["configurations"].values():
        if "architecture" in cfg:
            cfg["architecture"]["network_class_name"] = OLD_NETWORK_PATH
    (folder / "nnUNetEnTrustPlansV0.json").write_text(json.dumps(plans, indent=2))


@pytest.fixture(scope="session")
def trained_entrust(planned_phantoms):
    """(env, dataset_name, model_folder): nnUNetTrainerEnTrust_tinyCPU trained on fold 2 with nnU-Net's default
    nnUNetPlans (which name PlainConvUNet: our trainer builds EnTrustUNet from the same arch kwargs)."""
    import subprocess

    env, name = planned_phantoms
    r = subprocess.run([nnunet_bin("nnUNetv2_train"), str(SESSION_DATASET_ID), "2d", "2", "-tr",
                        "nnUNetTrainerEnTrust_tinyCPU", "-device", "cpu"],
                       env=env, capture_output=True, encoding="utf-8", errors="replace", timeout=900)
    assert r.returncode == 0, r.stdout[-3000:] + r.stderr[-3000:]
    model = Path(env["nnUNet_results"]) / name / "nnUNetTrainerEnTrust_tinyCPU__nnUNetPlans__2d"
    return env, name, model


def initialized_trainer(cls, planned_phantoms, monkeypatch):
    """An initialized ``cls`` (a trainer class) for fold 0 of the session's planned phantoms, on the CPU."""
    import json

    import torch

    env, name = planned_phantoms
    use_nnunet_roots(env, monkeypatch)
    monkeypatch.setenv("nnUNet_compile", "false")
    pre = Path(env["nnUNet_preprocessed"]) / name
    plans = json.loads((pre / "nnUNetPlans.json").read_text())
    plans["continue_training"] = False
    t = cls(plans, "2d", 0, json.loads((pre / "dataset.json").read_text()), torch.device("cpu"))
    t.initialize()
    return t
