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
    # aleatoric = the passes' mean entropy (expected entropy), strictly below H(mean) where the passes differ
    passes = a["hypotheses"]
    torch.testing.assert_close(a["mean"], passes.mean(0))
    torch.testing.assert_close(a["aleatoric"], -(passes * passes.clamp_min(1e-12).log()).sum(2).mean(0))
    h_mean = -(a["mean"] * a["mean"].clamp_min(1e-12).log()).sum(1)
    assert (a["aleatoric"] <= h_mean + 1e-5).all() and float((h_mean - a["aleatoric"]).max()) > 1e-3


def test_crnp_networks_are_the_papers():
    """Depth-wise RNP nets (3 hidden layers random, 2 predictor), LeakyReLU 0.25, output width 256, frozen target."""
    from torch import nn

    from entrust_nnunet.model.crnp import RNP_WIDTH

    net = CRNPUNet(3, num_classes=2, **arch_kwargs(2))
    for pair in net.rnp:
        for f, hidden in ((pair.target, 3), (pair.predictor, 2)):
            acts = [m for m in f if isinstance(m, nn.LeakyReLU)]
            assert len(acts) == hidden and all(a.negative_slope == 0.25 for a in acts)
            convs = [m for m in f if isinstance(m, nn.Conv2d)]
            assert all(c.groups == c.in_channels for c in convs[0::2])  # depth-wise, then point-wise
            assert convs[-1].out_channels == RNP_WIDTH
        assert not any(p.requires_grad for p in pair.target.parameters())
    assert net.attention.embed_dim == RNP_WIDTH


def test_crnp_uncertainty_is_the_other_modalities_error_and_fusion_is_residual():
    torch.manual_seed(0)
    net = CRNPUNet(3, num_classes=2, **arch_kwargs(2), rnp_width=8, attention_heads=2)
    e = torch.rand(1, 3, 8, 4, 4)
    e[:, 1] += 5.0  # modality 1 unfamiliar everywhere
    net.rnp_scale.copy_(torch.full((3, 8), 2.0))
    u = net.cross_modal_uncertainty(e)
    torch.testing.assert_close(u[:, 0], (e[:, 1] + e[:, 2]) / 4.0)  # channel-wise, by the others' scales
    assert (u[:, 1] < u[:, 0]).all() and (u[:, 1] < u[:, 2]).all()  # its own error does not count for it
    # residual fusion per modality: with zero uncertainty the fusion sees x_p itself, with û = 1 twice x_p
    h = torch.randn(1, 3, net.encoders.widths[-1], 4, 4)
    x = net.embed(h.flatten(1, 2)).unflatten(1, (3, -1))
    captured = {}
    net.attention_norm.register_forward_hook(lambda m, i, o: captured.setdefault("t", i[0]))
    net.fuse(h, torch.ones(1, 3, 8, 4, 4))
    tokens = x.flatten(3).permute(0, 1, 3, 2).flatten(1, 2)  # per-modality tokens (B, M * N, d)
    torch.testing.assert_close(captured["t"], 2 * tokens)
    assert captured["t"].shape == (1, 3 * 16, 8)


def test_crnp_conflict_map_marks_where_one_modality_is_unfamiliar():
    net = CRNPUNet(3, num_classes=2, **arch_kwargs(2))
    e_bar = torch.ones(1, 3, 4, 4)
    assert net.conflict(e_bar, (8, 8)).abs().max() < 1e-5  # all equally familiar: no conflict
    e_bar[:, 1, :2] = 5.0  # modality 1 unfamiliar in the top half only
    c = net.conflict(e_bar, (8, 8))
    assert c.shape == (1, 8, 8) and (c >= 0).all() and (c <= 1).all()
    assert c[:, :2].min() > 0.6 and c[:, 6:].max() < 1e-5


def test_crnp_conflict_after_fitting_rises_where_one_modality_is_unfamiliar():
    """Predictors fitted on familiar bottleneck features; features of ONE modality pushed off their
    distribution in the left half raise the conflict map there, not in the right half."""
    torch.manual_seed(0)
    net = CRNPUNet(2, num_classes=2, **arch_kwargs(2), rnp_width=64, attention_heads=2).eval()
    h = torch.randn(8, 2, net.encoders.widths[-1], 16, 16)
    opt = torch.optim.Adam([p for pair in net.rnp for p in pair.predictor.parameters()], 3e-3)
    for _ in range(100):
        opt.zero_grad()
        e = net.modality_errors(h)
        e.mean().backward()
        opt.step()
        net._update_scale(e)
    odd = h[:1].clone()
    odd[:, 0, :, :, :4] *= 4.0
    with torch.no_grad():
        c = net.conflict(net.normalised_errors(net.modality_errors(odd)).mean(2), (16, 16))[0]
    # the RNP nets' receptive field is 9 voxels wide: columns 10+ are out of reach of the pushed ones
    assert c[:, :4].mean() > 0.5 and c[:, :4].mean() > 3 * c[:, 10:].mean()


def test_crnp_predictor_training_lowers_its_error():
    torch.manual_seed(0)
    net = CRNPUNet(2, num_classes=2, deep_supervision=False, **arch_kwargs(2)).train()
    x = torch.randn(4, 2, 32, 32)
    h = net.encoders(x)[-1].detach()
    params = [p for pair in net.rnp for p in pair.predictor.parameters()]
    opt = torch.optim.Adam(params, 1e-2)
    first = float(net.modality_errors(h).mean().detach())
    assert net.modality_errors(h).shape == (4, 2, 256, 8, 8)
    for _ in range(60):
        opt.zero_grad()
        net.modality_errors(h).mean().backward()
        opt.step()
    assert float(net.modality_errors(h).mean().detach()) < 0.5 * first


def test_region_outputs_are_read_with_a_sigmoid_per_region():
    """On a region dataset (BraTS' nested regions) every network other than EnTrust is read as nnU-Net reads it:
    a sigmoid per region channel (a softmax across nested regions would split them), entropy = the regions'
    binary entropies summed, head confidence = the probability of every region's decision."""
    from entrust_nnunet.model.sampling import SamplingSettings
    from entrust_nnunet.nnunet.predictor import uncertainty_statistics

    torch.manual_seed(0)
    x = torch.randn(1, 2, 32, 32)
    plain = PlainConvUNet(2, num_classes=3, deep_supervision=False, **arch_kwargs(2)).eval()
    # MC dropout with p = 1e-9: its passes are the eval forward
    for net in (plain, MCDropoutUNet(2, num_classes=3, **arch_kwargs(2), decoder_dropout_p=1e-9).eval(),
                CRNPUNet(2, num_classes=3, **arch_kwargs(2)).eval()):
        with torch.no_grad():
            logits = net(x)
            s = uncertainty_statistics(net, x, SamplingSettings(num_hypotheses=2), regions=True)
        p = torch.sigmoid(logits.float())
        torch.testing.assert_close(s["mean"], p, msg=type(net).__name__)
        h = -(p * p.log() + (1 - p) * (1 - p).log()).sum(1)
        torch.testing.assert_close(s["aleatoric"], h, msg=type(net).__name__)
        torch.testing.assert_close(s["head_confidence"], torch.maximum(p, 1 - p).prod(1))
        labels = uncertainty_statistics(net, x, SamplingSettings(num_hypotheses=2))["mean"]
        torch.testing.assert_close(labels, torch.softmax(logits.float(), 1))
