"""EnTrustUNet: shapes like PlainConvUNet, gradients, hypotheses, experts, a loss that falls."""
import numpy as np
import pytest
import torch
from conftest import arch_kwargs
from dynamic_network_architectures.architectures.unet import PlainConvUNet
from torch import nn

from entrust_nnunet.model.sampling import SamplingSettings
from entrust_nnunet.model.network import EnTrustUNet, expert_disagreement
from entrust_nnunet.model.segdiff import SegDiffHead
from entrust_nnunet.model.trustmap import hypothesis_statistics


@pytest.mark.parametrize("dim", [2, 3])
@pytest.mark.parametrize("m", [1, 2, 4])
def test_forward_shapes_match_plain_unet(dim, m):
    torch.manual_seed(0)
    size = (32, 32) if dim == 2 else (8, 16, 16)
    x = torch.randn(2, m, *size)
    net = EnTrustUNet(m, num_classes=3, deep_supervision=True, **arch_kwargs(dim))
    plain = PlainConvUNet(m, num_classes=3, deep_supervision=True, **arch_kwargs(dim))
    assert [o.shape for o in net(x)] == [o.shape for o in plain(x)]
    net.decoder.deep_supervision = False
    out = net.eval().sample(x, SamplingSettings(num_hypotheses=3, steps=2))
    assert out["hypotheses"].shape == (3, 2, 3, *size) and out["mean"].shape == (2, 3, *size)
    for key in ("entropy", "aleatoric", "epistemic", "probe", "conflict", "head_confidence", "error"):
        assert out[key].shape == (2, *size) and torch.isfinite(out[key]).all()
    assert (out["conflict"] >= 0).all() and (out["conflict"] <= 1).all()
    assert (out["error"] >= 0).all() and (out["error"] <= 1).all()
    torch.testing.assert_close(out["mean"].sum(1), torch.ones(2, *size))


def test_gradients_reach_every_part():
    torch.manual_seed(0)
    net = EnTrustUNet(3, num_classes=3, deep_supervision=True, **arch_kwargs(2))
    x, target = torch.randn(2, 3, 32, 32), torch.randint(0, 3, (2, 1, 32, 32))
    parts = net(x, return_parts=True)
    loss = sum(o.float().mean() for o in parts["logits"]) + sum(net.auxiliary_losses(parts, target).values())
    loss.backward()
    missing = [n for n, p in net.named_parameters()
               if not n.startswith("calib.") and (p.grad is None or p.grad.abs().sum() == 0)]
    assert missing == []


def test_independence_option_hsic_trains():
    net = EnTrustUNet(2, num_classes=2, deep_supervision=True, independence="hsic", **arch_kwargs(2))
    parts = net(torch.randn(1, 2, 32, 32), return_parts=True)
    aux = net.auxiliary_losses(parts, torch.randint(0, 2, (1, 1, 32, 32)))
    assert torch.isfinite(aux["independence"]) and aux["independence"] > 0
    with pytest.raises(ValueError, match="independence"):
        EnTrustUNet(2, num_classes=2, independence="mutual-info", **arch_kwargs(2))


def test_hypotheses_diverge_only_where_labels_are_ambiguous():
    """Train SegDiff's head alone: left half labels always 1, right half a coin flip per sample."""
    torch.manual_seed(0)
    head = SegDiffHead(nn.Conv2d, num_classes=2, cond_channels=1, hidden=16)
    cond = torch.zeros(1, 1, 8, 16)
    cond[..., :8] = 1.0
    cond[..., 8:] = -1.0
    opt = torch.optim.Adam(head.parameters(), lr=5e-3)
    for _ in range(400):
        target = torch.ones(16, 1, 8, 16, dtype=torch.long)
        target[..., 8:] = torch.randint(0, 2, (16, 1, 1, 1)).expand(16, 1, 8, 8)
        opt.zero_grad()
        loss = sum(head.losses(head.condition(cond.expand(16, -1, -1, -1)), target).values())
        loss.backward()
        opt.step()
    hyps = head.sample(head.condition(cond), num_hypotheses=32, steps=8, seed=0)  # (K, 1, 2, 8, 16)
    stats = hypothesis_statistics(hyps)
    certain, ambiguous = stats["spread"][0, :, :8], stats["spread"][0, :, 8:]
    p1 = stats["mean"][0, 1]
    assert float(p1[:, :8].mean()) > 0.9
    assert 0.3 < float(p1[:, 8:].mean()) < 0.7
    assert float(ambiguous.mean()) > 4 * float(certain.mean())


def test_expert_disagreement_is_max_pairwise_tv():
    p = torch.tensor([[1.0, 0.0], [0.5, 0.5], [0.9, 0.1]]).view(1, 3, 2, 1, 1)
    assert float(expert_disagreement(p)) == pytest.approx(0.5)
    assert float(expert_disagreement(p[:, :1])) == 0.0


def test_loss_falls_on_phantoms(tmp_path):
    """A short training of the whole network (Dice+CE surrogate + EnTrust terms) on 2D phantoms."""
    from entrust_nnunet.data.phantoms import make_case

    rng = np.random.default_rng(0)
    cases = [make_case(rng, 32, 3, 2) for _ in range(8)]
    x = torch.tensor(np.stack([np.stack(c.images) for c in cases]), dtype=torch.float32)
    x = (x - x.mean((2, 3), keepdim=True)) / x.std((2, 3), keepdim=True)
    y = torch.tensor(np.stack([c.label for c in cases]), dtype=torch.long)[:, None]
    torch.manual_seed(0)
    net = EnTrustUNet(3, num_classes=3, deep_supervision=False, **arch_kwargs(2))
    opt = torch.optim.Adam(net.parameters(), lr=3e-3)
    losses = []
    for it in range(40):
        idx = torch.tensor([it % 8, (it + 3) % 8])
        opt.zero_grad()
        parts = net(x[idx], return_parts=True)
        loss = nn.functional.cross_entropy(parts["logits"], y[idx][:, 0])
        loss = loss + sum(net.auxiliary_losses(parts, y[idx]).values())
        loss.backward()
        opt.step()
        losses.append(float(loss))
    assert np.mean(losses[-8:]) < 0.75 * np.mean(losses[:8])


def test_cascade_prior_is_no_modality_and_reaches_every_resolution():
    """3d_cascade_fullres: 2 modalities + 3 one-hot channels of the previous stage. The prior changes no
    modality-count-dependent shape (encoders, experts, EnFuse are those of a 2-modality network), the experts
    never see it, and the output (every deep-supervision level) depends on it."""
    torch.manual_seed(0)
    net = EnTrustUNet(5, num_modalities=2, num_classes=4, deep_supervision=True, **arch_kwargs(3))
    two = EnTrustUNet(2, num_classes=4, deep_supervision=True, **arch_kwargs(3))
    shapes = lambda n, prefix: {k: v.shape for k, v in n.state_dict().items() if k.startswith(prefix)}  # noqa: E731
    for prefix in ("encoders.", "experts.", "fuse.", "decoder.", "segdiff."):
        assert shapes(net, prefix) == shapes(two, prefix)
    assert net.prior_channels == 3 and net.fuse_full[0].in_channels == two.fuse_full[0].in_channels + 3
    x = torch.randn(1, 2, 8, 16, 16)
    prior_a = torch.zeros(1, 3, 8, 16, 16)
    prior_b = torch.zeros_like(prior_a)
    prior_b[:, 1, 2:6, 4:12, 4:12] = 1
    a = net(torch.cat([x, prior_a], 1), return_parts=True)
    b = net(torch.cat([x, prior_b], 1), return_parts=True)
    torch.testing.assert_close(a["experts"], b["experts"])  # the prior is no modality: no expert sees it
    for la, lb in zip(a["logits"], b["logits"]):
        assert (la - lb).abs().amax() > 1e-4
    net.decoder.deep_supervision = False
    out = net.eval().sample(torch.cat([x, prior_b], 1), SamplingSettings(num_hypotheses=2, steps=1))
    assert out["mean"].shape == (1, 4, 8, 16, 16)
    with pytest.raises(ValueError, match="num_modalities"):
        EnTrustUNet(2, num_modalities=3, num_classes=2, **arch_kwargs(2))


def test_probe_noise_is_drawn_once_per_patch_shape_and_seed():
    """ProbeStep's noise is seeded (seed + 1), so every patch of one shape gets the same: it is drawn once and
    reused; the probe map is then the same for the same input, and changes with the seed."""
    torch.manual_seed(0)
    net = EnTrustUNet(3, num_classes=3, **arch_kwargs(2)).eval()
    with torch.no_grad():
        net.experts.weight.mul_(50.0)  # experts that contradict each other: conflict, so something to probe
    x = torch.randn(1, 3, 32, 32)
    first = net.sample(x, SamplingSettings(num_hypotheses=2))
    noise = net._probe_noise[1]
    assert noise.shape == (1, net.segdiff.hidden, 32, 32)
    second = net.sample(x, SamplingSettings(num_hypotheses=2))
    assert net._probe_noise[1] is noise
    torch.testing.assert_close(first["probe"], second["probe"])
    assert first["probe"].max() > 0
    other = net.sample(x, SamplingSettings(num_hypotheses=2, seed=3))
    assert not torch.allclose(other["probe"], first["probe"])
    net.sample(torch.randn(1, 3, 16, 32), SamplingSettings(num_hypotheses=2))
    assert net._probe_noise[1].shape == (1, net.segdiff.hidden, 16, 32)


def test_sample_computes_only_the_maps_asked_for():
    """The predictor asks for the maps it pools per patch: the same values as a full sample, and neither
    CalibHead's ``error`` (computed once per case on the pooled maps) nor the hypotheses' ``spread``."""
    from entrust_nnunet.nnunet.predictor import SAMPLED_MAPS

    torch.manual_seed(0)
    net = EnTrustUNet(3, num_classes=3, **arch_kwargs(2)).eval()
    net.calib.fitted.fill_(1.0)
    x = torch.randn(1, 3, 32, 32)
    full = net.sample(x, SamplingSettings(num_hypotheses=3))
    some = net.sample(x, SamplingSettings(num_hypotheses=3), maps=(*SAMPLED_MAPS, "hypotheses"))
    assert "error" not in some and "spread" not in some and {"error", "spread"} <= set(full)
    for key in ("mean", "hypotheses", *SAMPLED_MAPS):
        torch.testing.assert_close(some[key], full[key])


def test_sample_draws_only_what_is_read():
    """Without the hypotheses (the predictor's pooled maps at S = 0) only ProbeStep's first hypotheses are drawn,
    not K, and the maps are the same as with all K drawn; the K are drawn when asked for, or after flow steps
    (their average is the mean there)."""
    from entrust_nnunet.nnunet.predictor import SAMPLED_MAPS

    torch.manual_seed(0)
    net = EnTrustUNet(3, num_classes=3, **arch_kwargs(2)).eval()
    drawn = []
    sample = net.segdiff.sample
    net.segdiff.sample = lambda cond_h, k, *a, **kw: drawn.append(k) or sample(cond_h, k, *a, **kw)
    x = torch.randn(1, 3, 32, 32)
    settings = SamplingSettings(num_hypotheses=8, hypotheses=False)
    lean = net.sample(x, settings, maps=SAMPLED_MAPS)
    assert "hypotheses" not in lean and drawn == [net.probe_hypotheses] * 2  # the hypotheses and the probe's
    drawn.clear()
    every = net.sample(x, settings, maps=(*SAMPLED_MAPS, "hypotheses"))
    assert every["hypotheses"].shape[0] == 8 and drawn == [8, net.probe_hypotheses]
    for key in ("mean", *SAMPLED_MAPS):
        torch.testing.assert_close(lean[key], every[key])
    drawn.clear()
    net.sample(x, settings.with_(steps=1, probe=False), maps=SAMPLED_MAPS)
    assert drawn == [8]  # after a flow step the mean is their average
    drawn.clear()
    assert "hypotheses" not in net.sample(x, settings.with_(probe=False), maps=SAMPLED_MAPS) and drawn == []
    # K no larger than ProbeStep's share: drawn all the same, yet not returned (nor read whole) unless asked for
    drawn.clear()
    few = net.sample(x, SamplingSettings(num_hypotheses=1), maps=SAMPLED_MAPS)
    assert "hypotheses" not in few and drawn == [1, 1]


@pytest.mark.parametrize("absent", [False, True])
def test_full_resolution_streams_are_freed_before_the_decoder(absent):
    """At inference the M full-resolution modality streams are fused before the decoder runs (its memory peak):
    like plain nnU-Net, only the one fused skip is held there (docs/design.md, "The whole-case memory peak")."""
    import weakref

    torch.manual_seed(0)
    net = EnTrustUNet(3, num_classes=3, **arch_kwargs(2)).eval()
    streams, alive = [], []
    net.encoders.register_forward_hook(lambda mod, inp, out: streams.append(weakref.ref(out[0])))
    net.decoder.register_forward_pre_hook(lambda mod, inp: alive.append(streams[-1]() is not None))
    mask = torch.tensor([1.0, 0.0, 1.0]) if absent else None
    with torch.no_grad():
        net.sample(torch.randn(1, 3, 32, 32), SamplingSettings(num_hypotheses=2, probe=False), modality_mask=mask)
    assert alive == [False]


def test_sample_runs_the_start_covariance_head_once_per_patch():
    """At S = 0 the K draws and their expectation (the mean every map is made of) share the covariance head's
    hidden features: one pass of it per patch (ProbeStep's moved conditioning needs its own), and the mean is
    the same as from a second, separate pass."""
    torch.manual_seed(0)
    net = EnTrustUNet(3, num_classes=3, **arch_kwargs(2)).eval()
    calls = []
    net.segdiff.cov[0].register_forward_hook(lambda *_: calls.append(1))  # the head's first layer
    x = torch.randn(1, 3, 32, 32)
    out = net.sample(x, SamplingSettings(num_hypotheses=4, probe=False))
    assert len(calls) == 1
    net.sample(x, SamplingSettings(num_hypotheses=4, probe=True))
    assert len(calls) == 3  # + the probe's redraw around the moved conditioning
    with torch.no_grad():
        parts = net._trunk(x, keep_all=False, mask=net._mask(x))
        logits = parts["logits"]
        alone = net.segdiff.start_mean(net.segdiff.condition(parts["cond"]), logits)
    assert net.sampling.steps == 0
    experts = net._full_resolution_experts(parts, x.shape[2:])
    from entrust_nnunet.model.alternatives import expected_alternative
    torch.testing.assert_close(out["mean"], expected_alternative(alone, experts["experts"], experts["conflict"],
                                                                 experts["mask"], net.expert_alternatives))


def test_segdiff_losses_train_segdiff_alone():
    """SegDiff's start likelihood and flow loss see detached conditioning and logits: their gradients reach
    SegDiff's parameters and nothing of the trunk, the head or EnFuse."""
    torch.manual_seed(0)
    net = EnTrustUNet(3, num_classes=3, deep_supervision=True, **arch_kwargs(2))
    x, target = torch.randn(2, 3, 32, 32), torch.randint(0, 3, (2, 1, 32, 32))
    losses = net.auxiliary_losses(net(x, return_parts=True), target)
    (losses["start"] + losses["generative"]).backward()
    reached = {n.split(".")[0] for n, p in net.named_parameters() if p.grad is not None and p.grad.abs().sum() > 0}
    assert reached == {"segdiff"}


def test_conflict_biases_move_the_mask_only_where_the_experts_conflict():
    """CalibHead's class calibration: log mean / T + g b. Where the gate g = clamp(2 d) is 0 the argmax is the mean's;
    where the experts conflict (g = 1) a bias for class 1 takes the voxel. forward(), the stock nnU-Net path, returns
    exactly these calibrated logits, and sample()'s confidence is their top probability."""
    torch.manual_seed(0)
    net = EnTrustUNet(3, num_classes=3, **arch_kwargs(2)).eval()
    mean = torch.tensor([0.6, 0.3, 0.1]).view(1, 3, 1, 1).expand(1, 3, 4, 4)
    conflict = torch.zeros(1, 1, 4, 4)
    conflict[..., :2] = 0.5  # gate 1 in the left half
    net.calib.temperature.fill_(2.0)
    net.calib.conflict_bias.copy_(torch.tensor([0.0, 1.0, -1.0]))
    calibrated = torch.softmax(net.calibrated_log_probabilities(mean, conflict), 1)
    expected_right = torch.softmax(torch.log(mean[:, :, 0, 0]) / 2.0, 1)
    expected_left = torch.softmax(torch.log(mean[:, :, 0, 0]) / 2.0 + torch.tensor([0.0, 1.0, -1.0]), 1)
    torch.testing.assert_close(calibrated[:, :, 0, 3], expected_right)
    torch.testing.assert_close(calibrated[:, :, 0, 0], expected_left)
    assert (calibrated.argmax(1)[..., :2] == 1).all() and (calibrated.argmax(1)[..., 2:] == 0).all()
    net.expert_alternatives = 0.0  # no alternatives: no gate, the biases do nothing
    torch.testing.assert_close(net.calibrated_log_probabilities(mean, conflict), torch.log(mean) / 2.0)
    net.expert_alternatives = 2.0

    x = torch.randn(1, 3, 32, 32)
    net.calib.conflict_bias.copy_(torch.tensor([0.0, 3.0, 0.0]))
    settings = SamplingSettings(num_hypotheses=2, probe=False)
    net.sampling = settings
    s = net.sample(x, settings)
    assert float((s["conflict"] > 0.05).float().mean()) > 0.01  # an untrained net's experts conflict somewhere
    logits = net.calibrated_log_probabilities(s["mean"], s["conflict"][:, None])
    torch.testing.assert_close(net(x).float(), logits, atol=1e-5, rtol=1e-5)
    torch.testing.assert_close(s["confidence"], torch.softmax(logits, 1).amax(1))
    moved = torch.softmax(logits, 1).argmax(1) != s["mean"].argmax(1)
    assert moved.any() and (s["conflict"][moved] > 0).all()
