"""EnTrust model parts: shapes, gradients, independence penalties, SegDiff sampling, TrustMap, training."""
import numpy as np
import pytest
import torch
from dynamic_network_architectures.architectures.unet import PlainConvUNet
from torch import nn

from entrust_nnunet.encoders import modality_widths
from entrust_nnunet.enfuse import cross_covariance_penalty, hsic_penalty
from entrust_nnunet.network import EnTrustUNet, expert_disagreement
from entrust_nnunet.segdiff import STATE_CLAMP, SegDiffHead
from entrust_nnunet.trustmap import STATISTICS, CalibHead, hypothesis_statistics


def arch_kwargs(dim: int, n_stages: int = 3):
    conv, norm = (nn.Conv2d, nn.InstanceNorm2d) if dim == 2 else (nn.Conv3d, nn.InstanceNorm3d)
    return dict(n_stages=n_stages, features_per_stage=[16, 32, 64, 128][:n_stages], conv_op=conv,
                kernel_sizes=[[3] * dim] * n_stages, strides=[[1] * dim] + [[2] * dim] * (n_stages - 1),
                n_conv_per_stage=[2] * n_stages, n_conv_per_stage_decoder=[2] * (n_stages - 1), conv_bias=True,
                norm_op=norm, norm_op_kwargs={"eps": 1e-5, "affine": True}, nonlin=nn.LeakyReLU,
                nonlin_kwargs={"inplace": True})


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
    out = net.eval().sample(x, num_hypotheses=3, steps=2)
    assert out["hypotheses"].shape == (3, 2, 3, *size) and out["mean"].shape == (2, 3, *size)
    for key in ("total", "aleatoric", "epistemic", "probe", "conflict", "head_confidence", "error"):
        assert out[key].shape == (2, *size) and torch.isfinite(out[key]).all()
    assert (out["conflict"] >= 0).all() and (out["conflict"] <= 1).all()
    assert (out["error"] >= 0).all() and (out["error"] <= 1).all()
    torch.testing.assert_close(out["mean"].sum(1), torch.ones(2, *size))


def test_width_rule_keeps_parameters_near_plain():
    assert modality_widths([32, 64, 128], 4) == [8, 16, 32]
    assert modality_widths([32, 64], 8) == [8, 8]  # the floor
    for m in (2, 3, 4):
        ours = sum(p.numel() for p in EnTrustUNet(m, num_classes=3, **arch_kwargs(2, 4)).parameters())
        plain = sum(p.numel() for p in PlainConvUNet(m, num_classes=3, **arch_kwargs(2, 4)).parameters())
        assert 0.5 < ours / plain < 1.1, (m, ours, plain)


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


def test_cross_covariance_reference_and_limits():
    g = torch.Generator().manual_seed(0)
    a, b = torch.randn(2, 4, 64, 64, generator=g), torch.randn(2, 3, 64, 64, generator=g)
    # reference: numpy correlation coefficients between every channel pair, squared, averaged
    ref = np.mean([np.corrcoef(a[i, c].ravel(), b[i, d].ravel())[0, 1] ** 2
                   for i in range(2) for c in range(4) for d in range(3)])
    assert float(cross_covariance_penalty(a, b)) == pytest.approx(ref, rel=1e-3)
    assert float(cross_covariance_penalty(a, b)) < 0.01  # independent
    assert float(cross_covariance_penalty(a[:, :1], a[:, :1])) == pytest.approx(1.0, abs=1e-3)
    assert float(cross_covariance_penalty(a, 3 * a + 0.1 * b[:, :1])) > 0.2  # correlated
    assert float(cross_covariance_penalty(a, 1000 * a)) == pytest.approx(float(cross_covariance_penalty(a, a)), rel=1e-4)


def test_enfuse_independence_penalty_is_the_mean_of_pairwise_penalties():
    """The one-pass xcov penalty of EnFuse equals the mean of cross_covariance_penalty over its 1 + 2M pairs."""
    g = torch.Generator().manual_seed(2)
    m, w = 3, 4
    f_c, f_cf = torch.randn(2, w, 16, 16, generator=g), torch.rand(2, 1, 16, 16, generator=g)
    f_u = torch.randn(2, m, w, 16, 16, generator=g) + 0.5 * f_c[:, None]  # correlated with F_c on purpose
    parts = {"F_c": f_c, "F_u": f_u, "F_cf": f_cf}
    pairs = [(f_c, f_cf)] + [p for i in range(m) for p in ((f_c, f_u[:, i]), (f_u[:, i], f_cf))]
    expected = np.mean([float(cross_covariance_penalty(a, b)) for a, b in pairs])
    fuse = EnTrustUNet(m, num_classes=2, **arch_kwargs(2)).fuse[0]
    assert float(fuse.independence_penalty(parts)) == pytest.approx(expected, rel=1e-5)
    assert expected > 0.02  # the correlated pairs count (independent parts score ~1/256)


def test_hsic_sees_nonlinear_dependence_that_xcov_misses():
    g = torch.Generator().manual_seed(1)
    a = torch.randn(1, 1, 32, 32, generator=g)
    indep = torch.randn(1, 1, 32, 32, generator=g)
    sq = a ** 2  # uncorrelated with a (symmetric a), but fully dependent
    assert float(cross_covariance_penalty(a, sq)) < 0.02
    h_dep = float(hsic_penalty(a, sq, num_voxels=256, generator=torch.Generator().manual_seed(0)))
    h_ind = float(hsic_penalty(a, indep, num_voxels=256, generator=torch.Generator().manual_seed(0)))
    assert h_dep > 0.2 and h_ind < 0.05 and h_dep > 5 * h_ind


def test_independence_option_hsic_trains():
    net = EnTrustUNet(2, num_classes=2, deep_supervision=True, independence="hsic", **arch_kwargs(2))
    parts = net(torch.randn(1, 2, 32, 32), return_parts=True)
    aux = net.auxiliary_losses(parts, torch.randint(0, 2, (1, 1, 32, 32)))
    assert torch.isfinite(aux["independence"]) and aux["independence"] > 0
    with pytest.raises(ValueError, match="independence"):
        EnTrustUNet(2, num_classes=2, independence="mutual-info", **arch_kwargs(2))


def test_sampling_is_deterministic_for_a_seed_and_bounded():
    torch.manual_seed(0)
    net = EnTrustUNet(2, num_classes=3, **arch_kwargs(2)).eval()
    x = torch.randn(1, 2, 32, 32)
    a, b = net.sample(x, seed=3), net.sample(x, seed=3)
    c = net.sample(x, seed=4)
    torch.testing.assert_close(a["hypotheses"], b["hypotheses"])
    torch.testing.assert_close(a["error"], b["error"])
    assert not torch.allclose(a["hypotheses"], c["hypotheses"])
    # hypotheses are nested across K and do not depend on how many run through the head at once
    net.sampling_chunk = 3
    d = net.sample(x, num_hypotheses=5, seed=3)
    torch.testing.assert_close(d["hypotheses"][:2], net.sample(x, num_hypotheses=2, seed=3)["hypotheses"])
    net.sampling_chunk = 5
    torch.testing.assert_close(net.sample(x, num_hypotheses=5, seed=3)["hypotheses"], d["hypotheses"])
    # states are clamped, so log-probabilities stay finite in half precision
    assert torch.isfinite(a["hypotheses"].clamp_min(1e-4).log().half()).all()
    worst = torch.softmax(torch.tensor([STATE_CLAMP, -STATE_CLAMP]) * net.segdiff.sharpness, 0).min()
    assert float(a["hypotheses"].min()) >= float(worst) - 1e-6


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
        loss = head.loss(head.condition(cond.expand(16, -1, -1, -1)), target)
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


def _calibration_data(n: int, seed: int):
    """Statistics where P(error) = total (the other statistics are noise), and errors drawn from it."""
    g = torch.Generator().manual_seed(seed)
    stats = {k: torch.rand(1, n, 1, generator=g) for k in STATISTICS}
    return stats, (torch.rand(1, n, 1, generator=g) < stats["total"]).float()


def test_calib_head_learns_probability_of_error():
    stats, error = _calibration_data(4096, 0)
    head = CalibHead(nn.Conv2d)
    torch.testing.assert_close(head(stats), (1 - stats["confidence"]).clamp(0, 1))  # unfitted default
    head.fit_voxels(stats, error, steps=300)
    pred = head(stats).detach()
    assert abs(float(pred.mean()) - float(error.mean())) < 0.03
    assert float(torch.corrcoef(torch.stack([pred.ravel(), stats["total"].ravel()]))[0, 1]) > 0.9
    # a refit starts afresh: fitting on other data first changes nothing
    other = CalibHead(nn.Conv2d)
    other.fit_voxels({k: v.flip(1) for k, v in stats.items()}, 1 - error, steps=300)
    other.fit_voxels(stats, error, steps=300)
    torch.testing.assert_close(other(stats), pred)


def test_calib_head_stops_early_on_held_out_cases():
    """Few voxels and many steps overfit; a judge from other cases keeps an earlier, better head."""
    small, small_error = _calibration_data(48, 1)
    judge = _calibration_data(4096, 2)

    def judge_bce(head):
        p = head(judge[0]).detach().clamp(1e-6, 1 - 1e-6)
        return float(torch.nn.functional.binary_cross_entropy(p, judge[1]))

    full = CalibHead(nn.Conv2d)
    _, kept_full = full.fit_voxels(small, small_error, steps=1500)
    stopped = CalibHead(nn.Conv2d)
    _, kept = stopped.fit_voxels(small, small_error, steps=1500, judge=judge, every=50)
    assert kept_full == 1500 and kept % 50 == 0 and kept < 1500
    assert judge_bce(stopped) < judge_bce(full) - 0.01


def test_loss_falls_on_phantoms(tmp_path):
    """A short training of the whole network (Dice+CE surrogate + EnTrust terms) on 2D phantoms."""
    from entrust_nnunet.phantoms import make_case

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


def test_modality_encoders_are_independent_per_modality():
    """The grouped encoder is M separate encoders: changing modality 1 leaves stream 0 untouched."""
    from entrust_nnunet.encoders import ModalityEncoders

    torch.manual_seed(0)
    kw = arch_kwargs(2)
    enc = ModalityEncoders(3, kw["n_stages"], kw["features_per_stage"], kw["conv_op"], kw["kernel_sizes"],
                           kw["strides"], kw["n_conv_per_stage"], True, kw["norm_op"], kw["norm_op_kwargs"],
                           nonlin=kw["nonlin"], nonlin_kwargs=kw["nonlin_kwargs"]).eval()
    x = torch.randn(2, 3, 32, 32)
    y = x.clone()
    y[:, 1] = torch.randn(2, 32, 32)
    a, b = enc(x), enc(y)
    for s, w in enumerate(enc.widths):
        assert a[s].shape == (2, 3, w, 32 // 2 ** s, 32 // 2 ** s)
        torch.testing.assert_close(a[s][:, 0], b[s][:, 0])
        torch.testing.assert_close(a[s][:, 2], b[s][:, 2])
        assert (a[s][:, 1] - b[s][:, 1]).abs().max() > 1e-3
