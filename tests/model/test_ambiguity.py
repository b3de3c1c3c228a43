"""Ambiguity model: SSN start distribution (global latent), MC likelihood, aleatoric/epistemic, JSD conflict."""
import math

import numpy as np
import pytest
import torch
from torch import nn

from conftest import arch_kwargs
from entrust_nnunet.model.network import EnTrustUNet, expert_disagreement
from entrust_nnunet.model.sampling import SamplingSettings
from entrust_nnunet.model.segdiff import SegDiffHead, latent_draws, marginal_probabilities
from entrust_nnunet.model.trustmap import entropy, expert_conflict, hypothesis_statistics, jensen_shannon


def _spread_head(conv=nn.Conv2d, classes=3, cond_channels=4, rank=3, scale=3.0):
    """A SegDiffHead whose start has a clearly visible low-rank spread (random factor, not trained)."""
    torch.manual_seed(0)
    head = SegDiffHead(conv, classes, cond_channels, hidden=8, rank=rank, t_start=0.5)
    with torch.no_grad():
        head.cov[-1].weight.mul_(scale / 0.1)
    return head


@pytest.mark.parametrize("dim", [2, 3])
def test_hypotheses_are_global_across_patches_and_nested_across_k(dim):
    """Hypothesis k is ONE draw for the case: two overlapping patches of the same image get the same
    hypotheses where they overlap (a per-voxel noise field would not), and the first k of K are a draw of k."""
    conv = nn.Conv2d if dim == 2 else nn.Conv3d
    head = _spread_head(conv)
    g = torch.Generator().manual_seed(1)
    size = (8, 32) if dim == 2 else (4, 6, 32)
    cond, logits = torch.randn(1, 4, *size, generator=g), torch.randn(1, 3, *size, generator=g)
    a, b = slice(0, 24), slice(8, 32)
    for steps in (0, 2):
        pa = head.sample(head.condition(cond[..., a]), 6, steps, seed=7, logits=logits[..., a])
        pb = head.sample(head.condition(cond[..., b]), 6, steps, seed=7, logits=logits[..., b])
        # the flow's 3x3 conv sees the patch border: compare the overlap's interior (steps voxels in)
        inner = slice(8 + steps, 24 - steps)
        torch.testing.assert_close(pa[..., inner], pb[..., inner.start - 8:inner.stop - 8])
        assert (pa.argmax(2) != pa[:1].argmax(2)).any()  # the hypotheses do differ from each other
    full = head.sample(head.condition(cond), 5, 0, seed=7, logits=logits, chunk=2)
    torch.testing.assert_close(full[:2], head.sample(head.condition(cond), 2, 0, seed=7, logits=logits, chunk=5))
    torch.testing.assert_close(latent_draws(5, 3, 7)[:2], latent_draws(2, 3, 7))
    assert not torch.allclose(latent_draws(2, 3, 7), latent_draws(2, 3, 8))


def test_network_hypotheses_are_seeded_per_case_not_per_batch_element():
    """The latent is shared by every batch element (patches of one case): the same input in two batch
    positions gets identical hypotheses."""
    net = EnTrustUNet(2, num_classes=3, **arch_kwargs(2)).eval()
    with torch.no_grad():
        net.segdiff.cov[-1].weight.mul_(30.0)
    x = torch.randn(1, 2, 32, 32)
    out = net.sample(torch.cat([x, torch.randn(1, 2, 32, 32), x]), SamplingSettings(num_hypotheses=4, steps=0, seed=3))
    torch.testing.assert_close(out["hypotheses"][:, 0], out["hypotheses"][:, 2])
    # and a batch of one gives the same hypotheses for that input
    torch.testing.assert_close(net.sample(x, SamplingSettings(num_hypotheses=4, steps=0, seed=3))["hypotheses"][:, 0],
                               out["hypotheses"][:, 0])


def test_mc_likelihood_equals_brute_force_reference():
    """start_loss = mean_b -(1/N)[log (1/M) sum_m prod_v softmax(l_m)_v[y_v]], computed here by plain loops."""
    torch.manual_seed(0)
    head = SegDiffHead(nn.Conv2d, 3, 2, hidden=4, rank=2, mc_samples=4)
    with torch.no_grad():
        head.cov[-1].weight.mul_(10.0)
        head.cov[-1].bias[6:] = 0.0  # D = softplus(0) = 0.69: the diagonal part matters
    g = torch.Generator().manual_seed(5)
    cond, mu = torch.randn(2, 2, 2, 3, generator=g), torch.randn(2, 3, 2, 3, generator=g)
    target = torch.randint(0, 3, (2, 1, 2, 3), generator=g)
    cond_h = head.condition(cond)
    head.cov_penalty = 0.0  # the likelihood alone first; the covariance cost is checked below
    loss = float(head.start_loss(cond_h, target, mu, generator=torch.Generator().manual_seed(9)).detach())
    # the same draws, in the order start_loss makes them
    draws = torch.Generator().manual_seed(9)
    eps = torch.randn(4, 2, 2, generator=draws).double()
    eta = torch.randn(4, 2, 3, 2, 3, generator=draws).double()
    factor, diag = (t.detach().double() for t in head.covariance(cond_h))
    per_image = []
    for b in range(2):
        lik = 0.0
        for m in range(4):
            prod = 1.0
            for i in range(2):
                for j in range(3):
                    l = [float(mu[b, c, i, j]) + sum(float(factor[b, c, k, i, j] * eps[m, b, k]) for k in range(2))
                         + math.sqrt(float(diag[b, c, i, j])) * float(eta[m, b, c, i, j]) for c in range(3)]
                    prod *= math.exp(l[int(target[b, 0, i, j])]) / sum(math.exp(v) for v in l)
            lik += prod / 4
        per_image.append(-math.log(lik) / 6)
    assert loss == pytest.approx(np.mean(per_image), rel=1e-4)
    # + lambda * mean over voxels of sum_c (sum_r P^2 + D)
    head.cov_penalty = 0.5
    with_cost = float(head.start_loss(cond_h, target, mu, generator=torch.Generator().manual_seed(9)).detach())
    cost = np.mean([sum(float(factor[b, c, k, i, j]) ** 2 for c in range(3) for k in range(2))
                    + sum(float(diag[b, c, i, j]) for c in range(3)) for b in range(2) for i in range(2) for j in range(3)])
    assert with_cost == pytest.approx(loss + 0.5 * cost, rel=1e-4)


def _train_start(consistent_right: bool, steps: int = 150):
    """Head + a learnable 1x1 'deterministic head' (the start's mean), trained as in the network: the start
    likelihood, plus cross-entropy on the deterministic logits (nnU-Net's loss on its head). The mean
    learns at a higher rate, as nnU-Net's head has converged long before the end of training: the
    covariance can only collapse where the mean is confident (see the segdiff module docstring).

    Left half: label 1 always. Right half: label 1 always too (consistent) or a coin flip per image
    for the whole half (ambiguous). Returns 16 hypotheses (S = 0) and the covariance (P, D)."""
    torch.manual_seed(0)
    head = SegDiffHead(nn.Conv2d, 2, 1, hidden=16, rank=4)
    det = nn.Conv2d(1, 2, 1)
    cond = torch.zeros(1, 1, 8, 16)
    cond[..., :8], cond[..., 8:] = 1.0, -1.0
    opt = torch.optim.Adam([{"params": head.parameters()}, {"params": det.parameters(), "lr": 0.1}], lr=1e-2)
    c = cond.expand(16, -1, -1, -1)
    for _ in range(steps):
        target = torch.ones(16, 1, 8, 16, dtype=torch.long)
        if not consistent_right:
            target[..., 8:] = torch.randint(0, 2, (16, 1, 1, 1)).expand(16, 1, 8, 8)
        opt.zero_grad()
        logits = det(c)
        (head.start_loss(head.condition(c), target, logits) + nn.functional.cross_entropy(logits, target[:, 0])).backward()
        opt.step()
    with torch.no_grad():
        return head.sample(head.condition(cond), 16, 0, seed=0, logits=det(cond)), head.covariance(head.condition(cond))


def test_start_spreads_whole_masks_only_where_labels_split_and_collapses_where_consistent():
    hyps, (factor, diag) = _train_start(consistent_right=False)
    stats = hypothesis_statistics(hyps)
    masks = hyps.argmax(2)[:, 0]  # (K, 8, 16)
    left, right = masks[..., :8], masks[..., 8:]
    assert (left == 1).all()  # consistent half: every hypothesis agrees
    assert float(hyps[:, 0, 1, :, :8].min()) > 0.9  # ... confidently (no diagonal softening)
    frac = right.float().flatten(1).mean(1)  # per hypothesis: share of the ambiguous half called 1
    assert ((frac >= 0.9) | (frac <= 0.1)).all()  # each hypothesis takes or leaves the half WHOLE
    assert 0.15 <= float((frac >= 0.9).float().mean()) <= 0.85  # both readings among 16 hypotheses
    assert float(stats["spread"][0, :, 8:].mean()) > 20 * float(stats["spread"][0, :, :8].mean())
    # the covariance itself (class-difference direction) collapses on the consistent half
    p_diff = (factor[0, 1] - factor[0, 0]).norm(dim=0)  # (8, 16)
    assert float(p_diff[:, :8].mean()) < 0.2 * float(p_diff[:, 8:].mean())
    assert float(diag.max()) < 0.05
    # trained on consistent labels everywhere, the spread collapses everywhere
    calm, (calm_factor, _) = _train_start(consistent_right=True)
    assert (calm.argmax(2) == 1).all()  # every hypothesis is the one consistent mask
    assert float(hypothesis_statistics(calm)["spread"].max()) < 0.01
    # (the cost shrinks P steadily once the mean is confident: 0.12 of the ambiguous half's P after 150 steps)
    assert float((calm_factor[0, 1] - calm_factor[0, 0]).norm(dim=0).max()) < 0.2 * float(p_diff[:, 8:].mean())


def test_diagonal_part_is_marginalised_not_drawn():
    """A large diagonal D softens each hypothesis identically (no per-voxel draws: no speckle), and the
    closed form matches a Monte-Carlo estimate of E[softmax(l + sqrt(D) eta)]."""
    torch.manual_seed(0)
    head = SegDiffHead(nn.Conv2d, 3, 2, hidden=8, rank=2)
    with torch.no_grad():
        head.cov[-1].weight.zero_()
        head.cov[-1].bias[6:] = 2.0  # D = softplus(2) = 2.1, P = 0
    cond, mu = torch.randn(1, 2, 8, 8), 3 * torch.randn(1, 3, 8, 8)
    hyps = head.sample(head.condition(cond), 4, 0, seed=0, logits=mu)
    torch.testing.assert_close(hyps, hyps[:1].expand_as(hyps))  # identical hypotheses
    assert (hyps[0].argmax(1) == mu.argmax(1)).all()  # the mask is the mean's mask, not speckled
    d = torch.full_like(mu, float(nn.functional.softplus(torch.tensor(2.0))) + 1e-6)
    mc = torch.softmax(mu + d.sqrt() * torch.randn(20000, *mu.shape), 2).mean(0)
    assert float((marginal_probabilities(mu, d) - mc).abs().max()) < 0.06
    torch.testing.assert_close(hyps[0], marginal_probabilities(mu, d))


def test_a_hypothesis_ignores_a_shift_common_to_every_class():
    """A softmax does not change when every logit moves by the same amount, so neither may a hypothesis; with
    unequal diagonal variances the per-class probit approximation did (0.50 -> 0.70 for logits (10, 10), and
    the winning class flipped for (10, 9.5) against a Monte-Carlo estimate of 0.60)."""
    torch.manual_seed(0)
    d = torch.tensor([0.01, 0.5]).view(1, 2, 1, 1)
    for mu in (torch.tensor([0.0, 0.0]), torch.tensor([-3.0, 1.0])):
        mu = mu.view(1, 2, 1, 1)
        torch.testing.assert_close(marginal_probabilities(mu + 10, d), marginal_probabilities(mu, d))
        torch.testing.assert_close(marginal_probabilities(torch.stack([mu, mu + 7]), d),
                                   marginal_probabilities(mu, d).expand(2, 1, 2, 1, 1))  # (K, B, C, *s) too
    mu, d = torch.tensor([10.0, 9.5]).view(1, 2, 1, 1), torch.tensor([1.0, 0.007]).view(1, 2, 1, 1)
    mc = torch.softmax(mu + d.sqrt() * torch.randn(200000, *mu.shape), 2).mean(0)
    assert float((marginal_probabilities(mu, d) - mc).abs().max()) < 0.02 and float(mc[0, 0]) > 0.55


def test_jsd_conflict_discounts_experts_unsure_on_their_own():
    def experts(*ps):
        return torch.tensor(ps, dtype=torch.float32).view(1, len(ps), len(ps[0]), 1, 1)

    # two equally unsure experts: no conflict (TV agrees here)
    assert float(expert_conflict(experts([0.5, 0.5], [0.5, 0.5]))) == pytest.approx(0.0, abs=1e-6)
    # two confident experts that contradict each other: maximal conflict
    assert float(expert_conflict(experts([1.0, 0.0], [0.0, 1.0]))) == pytest.approx(1.0, abs=1e-5)
    assert float(expert_conflict(experts([1, 0, 0], [0, 1, 0], [0, 0, 1]))) == pytest.approx(1.0, abs=1e-5)
    # a blurred edge: one expert sharper than the other. TV calls it conflict, JSD hardly
    edge = experts([0.9, 0.1], [0.6, 0.4])
    assert float(expert_disagreement(edge)) == pytest.approx(0.3)
    assert float(expert_conflict(edge)) < 0.1
    # confident-vs-confident contradiction outranks that edge by far; a single expert has no conflict
    assert float(expert_conflict(experts([0.95, 0.05], [0.05, 0.95]))) > 5 * float(expert_conflict(edge))
    assert float(expert_conflict(experts([0.2, 0.8]))) == 0.0


def test_aleatoric_epistemic_decomposition_by_hand():
    """Per model: aleatoric = H(mean of its hypotheses), epistemic = 0, however far its hypotheses spread.
    Pooled over models as the predictor pools folds (averages of mean and aleatoric): epistemic =
    H(mean_f p_f) - mean_f H(p_f)."""
    torch.manual_seed(0)  # the network and input below: the Monte-Carlo bound holds for most draws, not all

    def h(*p):
        return -sum(x * math.log(x) for x in p if x > 0)

    fold1 = torch.tensor([[0.9, 0.1], [0.1, 0.9]]).view(2, 1, 2, 1)  # K = 2 hypotheses that disagree
    fold2 = torch.tensor([[0.8, 0.2], [0.8, 0.2]]).view(2, 1, 2, 1)  # K = 2 hypotheses that agree
    s1, s2 = hypothesis_statistics(fold1), hypothesis_statistics(fold2)
    assert float(s1["aleatoric"]) == pytest.approx(h(0.5, 0.5), abs=1e-6)
    assert float(s1["epistemic"]) == 0.0  # the spread of generative samples is never epistemic
    assert float(s1["spread"]) == pytest.approx(h(0.5, 0.5) - h(0.9, 0.1), abs=1e-6)
    assert float(s2["aleatoric"]) == pytest.approx(h(0.8, 0.2), abs=1e-6) and float(s2["spread"]) < 1e-6
    # the predictor's pooling: average mean and aleatoric over folds, then epistemic = H(pooled mean) - aleatoric
    pooled_mean = (s1["mean"] + s2["mean"]) / 2
    pooled_aleatoric = (s1["aleatoric"] + s2["aleatoric"]) / 2
    epistemic = entropy(pooled_mean, axis=1) - pooled_aleatoric
    expected = h(0.65, 0.35) - (h(0.5, 0.5) + h(0.8, 0.2)) / 2
    assert float(epistemic) == pytest.approx(expected, abs=1e-6)
    assert float(jensen_shannon(torch.stack([s1["mean"], s2["mean"]]), 0, 2)) == pytest.approx(expected, abs=1e-6)
    # through the network: per patch, aleatoric is the entropy of the hypotheses' mean and epistemic 0
    net = EnTrustUNet(2, num_classes=3, **arch_kwargs(2)).eval()
    with torch.no_grad():
        net.segdiff.cov[-1].weight.mul_(30.0)
    x = torch.randn(1, 2, 32, 32)
    out = net.sample(x, SamplingSettings(num_hypotheses=4, steps=0, seed=0))
    torch.testing.assert_close(out["aleatoric"], entropy(out["mean"], axis=1))
    assert float(out["spread"].max()) > 0.05 and float(out["epistemic"].abs().max()) == 0.0
    # the mean is the hypotheses' expectation: at S = 0 the start's (SegDiffHead.start_mean), which many draws
    # average to whatever K is; after flow steps the hypotheses' average
    net.expert_alternatives = 0.0
    plain = net.sample(x, SamplingSettings(num_hypotheses=4, steps=0, seed=0, probe=False))
    many = net.sample(x, SamplingSettings(num_hypotheses=2000, steps=0, seed=0, probe=False))
    torch.testing.assert_close(plain["mean"], many["mean"])
    gap = (many["hypotheses"].mean(0) - plain["mean"]).abs()
    assert float(gap.mean()) < 0.01 < float((plain["hypotheses"].mean(0) - plain["mean"]).abs().mean())
    stepped = net.sample(x, SamplingSettings(num_hypotheses=4, steps=1, seed=0, probe=False))
    torch.testing.assert_close(stepped["mean"], stepped["hypotheses"].mean(0))


def test_nnunet_initialisation_keeps_the_start_near_the_deterministic_head():
    """nnU-Net applies He initialisation to every conv (``network.apply(network.initialize)``); the start's
    diagonal must stay small and P a tenth of a normal layer, so training starts from the deterministic head."""
    torch.manual_seed(0)  # the bounds hold for any seed (0.008-0.013 max, 0.0064-0.0069 mean over seeds 0-7)
    net = EnTrustUNet(2, num_classes=3, **arch_kwargs(2))
    net.apply(net.initialize)
    _, diag = net.segdiff.covariance(net.segdiff.condition(torch.randn(1, 17, 8, 8)))
    assert float(diag.mean()) < 0.01 and float(diag.max()) < 0.02
    assert float(net.segdiff.cov[-1].weight.std()) < 0.2 * float(net.segdiff.cov[1].weight.std())
