"""Baseline networks (MC dropout, CRNP): shapes like PlainConvUNet, seeded sampling, CRNP's fusion."""
import numpy as np
import pytest
import torch
from conftest import arch_kwargs
from dynamic_network_architectures.architectures.unet import PlainConvUNet
from torch.nn.modules.dropout import _DropoutNd

from entrust_nnunet.model.crnp import CRNPUNet
from entrust_nnunet.model.mcdropout import MCDropoutUNet


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
        s = net.eval().sample_statistics(x, num_hypotheses=3, seed=0)
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
