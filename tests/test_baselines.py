"""Baselines: MC dropout and CRNP networks, their loss schedule, and both trainers end to end through nnU-Net."""
import subprocess
from pathlib import Path

import numpy as np
import pytest
import SimpleITK as sitk
import torch
from dynamic_network_architectures.architectures.unet import PlainConvUNet
from torch import nn
from torch.nn.modules.dropout import _DropoutNd

from conftest import SESSION_DATASET_ID, nnunet_bin
from entrust_nnunet.baselines import CRNPLoss, CRNPUNet, MCDropoutUNet
from entrust_nnunet.io import map_path
from test_model import arch_kwargs


@pytest.mark.parametrize("dim", [2, 3])
@pytest.mark.parametrize("m", [1, 2, 4])
def test_shapes_match_plain_unet(dim, m):
    torch.manual_seed(0)
    size = (32, 32) if dim == 2 else (8, 16, 16)
    x = torch.randn(2, m, *size)
    plain = [o.shape for o in PlainConvUNet(m, num_classes=3, deep_supervision=True, **arch_kwargs(dim))(x)]
    for cls in (MCDropoutUNet, CRNPUNet):
        net = cls(m, num_classes=3, deep_supervision=True, **arch_kwargs(dim))
        assert [o.shape for o in net(x)] == plain, cls.__name__
        net.decoder.deep_supervision = False
        s = net.eval().sample_statistics(x, num_samples=3, seed=0)
        assert s["mean"].shape == (2, 3, *size)
        torch.testing.assert_close(s["mean"].sum(1), torch.ones(2, *size))
        for key in ("aleatoric", "conflict"):
            assert s[key].shape == (2, *size) and torch.isfinite(s[key]).all()
        assert (s["aleatoric"] >= 0).all() and (s["aleatoric"] <= np.log(3) + 1e-5).all()
        assert (s["conflict"] >= 0).all() and (s["conflict"] <= 1).all()


def test_mc_dropout_only_in_decoder_and_seeded():
    torch.manual_seed(0)
    net = MCDropoutUNet(2, num_classes=3, **arch_kwargs(2), decoder_dropout_p=0.3).eval()
    assert not any(isinstance(m, _DropoutNd) for m in net.encoder.modules())
    assert len(net.dropout_layers()) > 0 and all(m.p == 0.3 for m in net.dropout_layers())
    x = torch.randn(1, 2, 32, 32)
    torch.testing.assert_close(net(x), net(x))  # eval forward is an ordinary U-Net
    a, b = net.sample_statistics(x, 4, seed=1), net.sample_statistics(x, 4, seed=1)
    torch.testing.assert_close(a["mean"], b["mean"])
    c = net.sample_statistics(x, 4, seed=2)
    assert (a["mean"] - c["mean"]).abs().max() > 1e-4
    assert not any(m.training for m in net.modules())  # sampling restored eval mode
    # T passes differ, so the expected entropy exceeds the entropy of... nothing: it is at most H(mean)
    h_mean = -(a["mean"] * a["mean"].clamp_min(1e-12).log()).sum(1)
    assert (a["aleatoric"] <= h_mean + 1e-5).all()


def test_crnp_fusion_weights_favour_the_familiar_modality():
    net = CRNPUNet(3, num_classes=2, **arch_kwargs(2))
    e_hat = torch.ones(1, 3, 4, 4)
    e_hat[:, 1] = 5.0  # modality 1 unfamiliar everywhere
    w = net.fusion_weights(e_hat)
    torch.testing.assert_close(w.sum(1), torch.ones(1, 4, 4))
    assert (w[:, 1] < w[:, 0]).all() and torch.allclose(w[:, 0], w[:, 2])
    # the softmax of the other modalities' errors equals softmax(-ê_n / tau)
    torch.testing.assert_close(w, torch.softmax(-e_hat / net.fusion_temperature, 1))
    c = net.conflict(e_hat, (8, 8))
    assert c.shape == (1, 8, 8) and torch.allclose(c, torch.full_like(c, 0.8), atol=1e-5)
    assert net.conflict(torch.ones(1, 3, 4, 4), (8, 8)).abs().max() < 1e-5


def test_crnp_loss_alternates_segmentation_and_predictors():
    torch.manual_seed(0)
    net = CRNPUNet(2, num_classes=3, deep_supervision=False, **arch_kwargs(2)).train()
    net.cache_parts = True
    loss = CRNPLoss(nn.CrossEntropyLoss(), net)
    assert not any(p.requires_grad for pair in net.rnp for p in pair.target.parameters())
    x, y = torch.randn(2, 2, 32, 32), torch.randint(0, 3, (2, 32, 32))
    rnp_params = {n for n, _ in net.named_parameters() if ".predictor." in n}
    for step in range(4):
        net.zero_grad(set_to_none=True)
        value = loss(net(x), y)
        value.backward()
        with_grad = {n for n, p in net.named_parameters() if p.grad is not None and p.grad.abs().sum() > 0}
        if step % 2 == 0:  # segmentation: everything but the predictors (and the frozen targets)
            assert with_grad and not with_grad & rnp_params
        else:  # predictors only; the value is still the segmentation loss
            assert with_grad == rnp_params
            torch.testing.assert_close(value, nn.functional.cross_entropy(net(x), y), rtol=1e-4, atol=1e-4)
    assert len(loss.history["rnp"]) == 4


def test_crnp_predictor_training_lowers_its_error():
    torch.manual_seed(0)
    net = CRNPUNet(2, num_classes=2, deep_supervision=False, **arch_kwargs(2)).train()
    x = torch.randn(4, 2, 32, 32)
    h = net.encoders(x)[-1].detach()
    params = [p for pair in net.rnp for p in pair.predictor.parameters()]
    opt = torch.optim.Adam(params, 1e-2)
    first = float(net.modality_errors(h).mean().detach())
    for _ in range(60):
        opt.zero_grad()
        net.modality_errors(h).mean().backward()
        opt.step()
    assert float(net.modality_errors(h).mean().detach()) < 0.5 * first


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
                        "-npp", "1", "-nps", "1", "--num-samples", "3"],
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
