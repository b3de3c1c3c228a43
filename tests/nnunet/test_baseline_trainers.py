"""Baseline trainers: CRNP's loss schedule, and both trainers end to end through nnU-Net."""
import subprocess
from pathlib import Path

import numpy as np
import pytest
import SimpleITK as sitk
import torch
from conftest import SESSION_DATASET_ID, arch_kwargs, nnunet_bin
from torch import nn

from entrust_nnunet.data.io import map_path
from entrust_nnunet.model.crnp import CRNPUNet
from entrust_nnunet.nnunet.baseline_trainers import CRNPLoss


def test_crnp_loss_updates_segmentation_every_step_and_predictors_in_addition():
    torch.manual_seed(0)
    net = CRNPUNet(2, num_classes=3, deep_supervision=False, **arch_kwargs(2)).train()
    net.cache_parts = True
    loss = CRNPLoss(nn.CrossEntropyLoss(), net)
    assert not any(p.requires_grad for pair in net.rnp for p in pair.target.parameters())
    x, y = torch.randn(2, 2, 32, 32), torch.randint(0, 3, (2, 32, 32))
    rnp_params = {n for n, _ in net.named_parameters() if ".predictor." in n}
    seg_params = {n for n, p in net.named_parameters() if p.requires_grad} - rnp_params
    for _ in range(2):
        net.zero_grad(set_to_none=True)
        value = loss(net(x), y)
        value.backward()
        with_grad = {n for n, p in net.named_parameters() if p.grad is not None and p.grad.abs().sum() > 0}
        assert rnp_params <= with_grad                      # the predictor step, on every iteration
        assert len(with_grad & seg_params) > 0.9 * len(seg_params)  # and the segmentation step too
        # the value is the segmentation loss; the predictors' gradient is that of the RNP loss alone
        torch.testing.assert_close(value, nn.functional.cross_entropy(net(x), y), rtol=1e-4, atol=1e-4)
    net.zero_grad(set_to_none=True)
    net.rnp_loss(net(x, return_parts=True)).backward()
    only_rnp = {n for n, p in net.named_parameters() if p.grad is not None and p.grad.abs().sum() > 0}
    assert only_rnp == rnp_params
    assert len(loss.history["rnp"]) == 2


@pytest.mark.parametrize("trainer,fold", [("nnUNetTrainerMCDropout_tinyCPU", "3"), ("nnUNetTrainerCRNP_tinyCPU", "4")])
def test_trainer_trains_and_predicts_maps(planned_phantoms, tmp_path, trainer, fold):
    env, name = planned_phantoms
    r = subprocess.run([nnunet_bin("nnUNetv2_train"), str(SESSION_DATASET_ID), "2d", fold, "-tr", trainer,
                        "-device", "cpu"], env=env, capture_output=True, encoding="utf-8", errors="replace", timeout=900)
    assert r.returncode == 0, r.stdout[-3000:] + r.stderr[-3000:]
    model = Path(env["nnUNet_results"]) / name / f"{trainer}__nnUNetPlans__2d"
    assert (model / f"fold_{fold}" / "checkpoint_final.pth").exists()
    if "CRNP" in trainer:
        log = next((model / f"fold_{fold}").glob("training_log_*.txt")).read_text(encoding="utf-8")
        assert "CRNP predictor (RNP) loss" in log
    raw = Path(env["nnUNet_raw"]) / name
    out = tmp_path / "pred"
    r = subprocess.run([nnunet_bin("entrust"), "predict", "-i", str(raw / "imagesTs"), "-o", str(out), "-d",
                        str(SESSION_DATASET_ID), "-c", "2d", "-tr", trainer, "-p", "nnUNetPlans", "-f", fold,
                        "-npp", "0", "-nps", "1", "--num-samples", "3"],
                       env=env, capture_output=True, encoding="utf-8", errors="replace", timeout=600)
    assert r.returncode == 0, r.stdout[-3000:] + r.stderr[-3000:]
    ref = sitk.ReadImage(str(raw / "imagesTs" / "test_000_0000.nii.gz"))
    maps = {}
    for kind in ("total", "aleatoric", "epistemic", "conflict"):
        img = sitk.ReadImage(str(map_path(out, "test_000", kind, ".nii.gz")))
        assert img.GetSize() == ref.GetSize() and np.allclose(img.GetOrigin(), ref.GetOrigin())
        maps[kind] = sitk.GetArrayFromImage(img)
        assert np.isfinite(maps[kind]).all() and maps[kind].min() >= 0
    assert maps["total"].max() <= 1 and maps["conflict"].max() <= 1
    if "MCDropout" in trainer:  # T dropout passes disagree somewhere: epistemic (mutual information) > 0
        assert maps["epistemic"].max() > 0
    else:  # CRNP's modality errors differ, so its conflict map is not empty
        assert maps["conflict"].max() > 0
