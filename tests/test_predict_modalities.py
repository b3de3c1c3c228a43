"""entrust predict with absent modalities: a missing channel file or --drop-modalities is masked (model trained
with modality dropout), refused by a model trained without it, and bad flags are one line with exit 2."""
import json
import shutil
import subprocess
from pathlib import Path

import numpy as np
import pytest
import SimpleITK as sitk

from conftest import nnunet_bin
from entrust_nnunet.data.io import MAP_NAMES

MODDROP = "nnUNetTrainerEnTrustModDrop_tinyCPU"


def _entrust(env, *args):
    return subprocess.run([nnunet_bin("entrust"), *args], env=env, capture_output=True, encoding="utf-8",
                          errors="replace", timeout=600)


@pytest.fixture(scope="module")
def trained_moddrop(trained_entrust, tmp_path_factory):
    """(env, raw folder, model folder): the session's tiny EnTrust model relabelled as trained by the ModDrop
    variant (same network; only the trainer's ``modality_dropout`` differs). Training the variant once more
    would cost minutes on the 2-core CI machine; its training with dropout is tested in
    tests/nnunet/test_modality_dropout.py, this fixture tests the prediction path."""
    import torch

    from entrust_nnunet.nnunet.checkpoints import load_checkpoint

    env, name, model = trained_entrust
    copy = tmp_path_factory.mktemp("moddrop") / f"{MODDROP}__nnUNetPlans__2d"
    shutil.copytree(model, copy, ignore=shutil.ignore_patterns("validation", "*.png", "*.txt", "*.npz"))
    checkpoint = copy / "fold_2" / "checkpoint_final.pth"
    ckpt = load_checkpoint(checkpoint)
    ckpt["trainer_name"] = MODDROP
    torch.save(ckpt, checkpoint)
    return env, Path(env["nnUNet_raw"]) / name, copy


def _predict(env, src, out, model, *extra):
    return _entrust(env, "predict", "-i", str(src), "-o", str(out), "-m", str(model), "-f", "2", "-npp", "0",
                    "-nps", "1", "--num-hypotheses", "2", *extra)


def _arrays(out, case):
    return [sitk.GetArrayFromImage(sitk.ReadImage(str(p))) for p in
            [out / f"{case}.nii.gz", *(out / "uncertainty" / f"{case}_{n}.nii.gz" for n in MAP_NAMES)]]


def test_absent_file_is_masked_like_a_dropped_modality(trained_moddrop, tmp_path):
    env, raw, model = trained_moddrop
    src = tmp_path / "in"
    shutil.copytree(raw / "imagesTs", src)
    (src / "test_000_0002.nii.gz").unlink()
    r = _predict(env, src, tmp_path / "a", model)
    assert r.returncode == 0, r.stderr[-3000:]
    warnings = [line for line in r.stderr.splitlines() if line.startswith("entrust: warning:")]
    assert warnings == ["entrust: warning: case test_000: predicting without FLAIR (FLAIR: no file); absent "
                        "modalities are masked"]
    record = json.loads((tmp_path / "a" / "uncertainty" / "test_000_modalities.json").read_text())
    assert record == {"case": "test_000", "present": ["T1", "T2"], "absent": ["FLAIR"], "missing_file": ["FLAIR"],
                      "dropped": []}
    assert json.loads((tmp_path / "a" / "uncertainty" / "test_001_modalities.json").read_text())["absent"] == []
    ref = sitk.ReadImage(str(raw / "imagesTs" / "test_000_0000.nii.gz"))
    assert sitk.ReadImage(str(tmp_path / "a" / "test_000.nii.gz")).GetSize() == ref.GetSize()
    # the same case with its FLAIR file present but dropped by the flag: the same mask and maps
    r = _predict(env, raw / "imagesTs", tmp_path / "b", model, "--drop-modalities", "flair")
    assert r.returncode == 0, r.stderr[-3000:]
    assert sum(line.startswith("entrust: warning:") for line in r.stderr.splitlines()) == 2
    for a, b in zip(_arrays(tmp_path / "a", "test_000"), _arrays(tmp_path / "b", "test_000")):
        np.testing.assert_allclose(a, b, atol=1e-6)
    dropped = json.loads((tmp_path / "b" / "uncertainty" / "test_001_modalities.json").read_text())
    assert dropped["absent"] == ["FLAIR"] and dropped["dropped"] == ["FLAIR"]
    # a dropped modality's file is not read: broken, it does not stop the prediction, which is the same
    broken = tmp_path / "broken"
    shutil.copytree(raw / "imagesTs", broken)
    flair = broken / "test_001_0002.nii.gz"
    flair.write_bytes(flair.read_bytes()[: flair.stat().st_size // 2])
    r = _predict(env, broken, tmp_path / "c", model, "--drop-modalities", "flair")
    assert r.returncode == 0, r.stderr[-3000:]
    for a, b in zip(_arrays(tmp_path / "b", "test_001"), _arrays(tmp_path / "c", "test_001")):
        np.testing.assert_allclose(a, b, atol=1e-6)
    # and FLAIR matters: test_001 with every modality differs from test_001 without FLAIR
    assert any(np.abs(a - b).max() > 1e-4 for a, b in zip(_arrays(tmp_path / "a", "test_001"),
                                                          _arrays(tmp_path / "b", "test_001")))


@pytest.mark.parametrize("problem", ["no_dropout", "unknown", "every", "nothing_left"])
def test_bad_modalities_one_line_exit_2_nothing_written(trained_entrust, tmp_path, problem):
    env, name, model = trained_entrust  # trained without modality dropout
    src = tmp_path / "in"
    shutil.copytree(Path(env["nnUNet_raw"]) / name / "imagesTs", src)
    flag, expected = {
        "no_dropout": ("T2", "--drop-modalities T2: the model was trained by nnUNetTrainerEnTrust_tinyCPU without "
                             "modality dropout; it cannot predict with absent modalities"),
        "unknown": ("T2,T3", "--drop-modalities T2,T3: unknown modality 'T3' (the model's modalities: T1, T2, FLAIR)"),
        "every": ("T1,T2,FLAIR", "--drop-modalities T1,T2,FLAIR: drops every modality of the model (T1, T2, FLAIR); "
                                 "at least one must remain"),
        "nothing_left": ("FLAIR", "--drop-modalities FLAIR: case test_001 has no modality left (no file for T1, T2; "
                                  "dropped FLAIR)"),
    }[problem]
    if problem == "nothing_left":
        for c in (0, 1):
            (src / f"test_001_000{c}.nii.gz").unlink()
    out = tmp_path / "out"
    r = _predict(env, src, out, model, "--drop-modalities", flag)
    lines = r.stderr.strip().splitlines()
    assert r.returncode == 2 and lines == [f"entrust: error: {expected}"], r.stderr[-2000:]
    assert not out.exists()
