import os
import shutil
import sys
from pathlib import Path

import pytest

from entrust_nnunet.nnunet_env import ensure_ext_trainer, set_nnunet_roots

#: a 2D phantom dataset, planned and preprocessed once per test session
SESSION_DATASET_ID = 951


def nnunet_bin(name: str) -> str:
    """The console script of the interpreter running the tests (works without an activated venv)."""
    exe = Path(sys.executable).with_name(name)
    return str(exe) if exe.exists() else shutil.which(name)


@pytest.fixture(scope="session")
def planned_phantoms(tmp_path_factory):
    """(env, dataset_name): 2D phantoms (8 cases, 32x32) with nnUNetPlans and nnUNetEnTrustPlans preprocessed."""
    from entrust_nnunet.phantoms import write_phantom_dataset
    from entrust_nnunet.pipeline import plan_and_preprocess

    root = tmp_path_factory.mktemp("nnunet")
    env = set_nnunet_roots(root, dict(os.environ))
    env.update(nnUNet_def_n_proc="1", nnUNet_n_proc_DA="1", nnUNet_compile="false")
    ensure_ext_trainer(env)
    name = f"Dataset{SESSION_DATASET_ID}_Phantoms"
    write_phantom_dataset(Path(env["nnUNet_raw"]) / name, num_cases=8, num_test=2, dim=2, size=32, seed=11,
                          progress=False)
    old = dict(os.environ)
    os.environ.update({k: env[k] for k in ("nnUNet_raw", "nnUNet_preprocessed", "nnUNet_results")})
    try:
        plan_and_preprocess([SESSION_DATASET_ID], configurations=["2d"], num_processes=1)
    finally:
        os.environ.clear()
        os.environ.update(old)
    return env, name


@pytest.fixture(scope="session")
def trained_entrust(planned_phantoms):
    """(env, dataset_name, model_folder): nnUNetTrainerEnTrust_tinyCPU trained on fold 2 with nnUNetEnTrustPlans."""
    import subprocess

    env, name = planned_phantoms
    r = subprocess.run([nnunet_bin("nnUNetv2_train"), str(SESSION_DATASET_ID), "2d", "2", "-tr",
                        "nnUNetTrainerEnTrust_tinyCPU", "-p", "nnUNetEnTrustPlans", "-device", "cpu"],
                       env=env, capture_output=True, encoding="utf-8", errors="replace", timeout=900)
    assert r.returncode == 0, r.stdout[-3000:] + r.stderr[-3000:]
    model = Path(env["nnUNet_results"]) / name / "nnUNetTrainerEnTrust_tinyCPU__nnUNetEnTrustPlans__2d"
    return env, name, model
