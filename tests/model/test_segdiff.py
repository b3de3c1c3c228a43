"""SegDiff sampling: seeded, bounded, nested across K."""
import pytest
import torch
from torch import nn
from conftest import arch_kwargs

from entrust_nnunet.model.sampling import SamplingSettings
from entrust_nnunet.model.network import EnTrustUNet
from entrust_nnunet.model.segdiff import STATE_CLAMP, SegDiffHead, latent_draws, low_rank_shift


def test_sampling_is_deterministic_for_a_seed_and_bounded():
    torch.manual_seed(0)
    net = EnTrustUNet(2, num_classes=3, **arch_kwargs(2)).eval()
    x = torch.randn(1, 2, 32, 32)
    a, b = net.sample(x, SamplingSettings(seed=3)), net.sample(x, SamplingSettings(seed=3))
    c = net.sample(x, SamplingSettings(seed=4))
    torch.testing.assert_close(a["hypotheses"], b["hypotheses"])
    torch.testing.assert_close(a["error"], b["error"])
    assert not torch.allclose(a["hypotheses"], c["hypotheses"])
    # hypotheses are nested across K and do not depend on how many run through the head at once
    net.sampling_chunk = 3
    d = net.sample(x, SamplingSettings(num_hypotheses=5, seed=3))
    torch.testing.assert_close(d["hypotheses"][:2], net.sample(x, SamplingSettings(num_hypotheses=2, seed=3))["hypotheses"])
    net.sampling_chunk = 5
    torch.testing.assert_close(net.sample(x, SamplingSettings(num_hypotheses=5, seed=3))["hypotheses"], d["hypotheses"])
    # states are clamped, so log-probabilities stay finite in half precision
    assert torch.isfinite(a["hypotheses"].clamp_min(1e-4).log().half()).all()
    worst = torch.softmax(torch.tensor([STATE_CLAMP, -STATE_CLAMP]) * net.segdiff.sharpness, 0).min()
    assert float(a["hypotheses"].min()) >= float(worst) - 1e-6


@pytest.mark.parametrize("regions", [False, True])
def test_start_sampler_gives_the_start_of_the_covariance_factor(regions):
    """Inference draws ``P eps`` from the covariance head's hidden features with the latents folded into its last
    layer: the same start probabilities as from the factor P and diagonal D themselves."""
    torch.manual_seed(0)
    head = SegDiffHead(nn.Conv2d, 3, 5, hidden=8, rank=4)
    with torch.no_grad():
        head.cov[-1].weight.normal_()  # a spread that matters
        head.cov[-1].bias.normal_()
    head.regions = regions
    cond_h = head.condition(torch.randn(2, 5, 6, 7))
    mu, eps = torch.randn(2, 3, 6, 7), torch.randn(5, 4)
    factor, diag = head.covariance(cond_h)
    d, shift = head.start_sampler(cond_h)
    torch.testing.assert_close(d, diag)
    torch.testing.assert_close(shift(eps), low_rank_shift(factor, eps), rtol=1e-4, atol=1e-5)
    hyps = head.sample(cond_h, 5, 0, seed=3, logits=mu)
    expected = head.start_probabilities(factor, diag, mu, latent_draws(5, 4, 3))
    torch.testing.assert_close(hyps, expected, rtol=1e-4, atol=1e-5)


@pytest.mark.parametrize("regions", [False, True])
def test_start_mean_is_what_many_start_draws_average_to(regions):
    """The maps' class probabilities at S = 0 are the start's expectation: 4000 draws average to it (the
    mean-field approximation's error stays small), while 8 draws, what K = 8 averaged before, are noisier."""
    torch.manual_seed(0)
    head = SegDiffHead(nn.Conv2d, 3, 5, hidden=8, rank=4)
    with torch.no_grad():
        head.cov[-1].weight.normal_(std=1.5)  # a logit variance of about one: not a trivial case
    head.regions = regions
    cond_h = head.condition(torch.randn(1, 5, 6, 7))
    mu = 2 * torch.randn(1, 3, 6, 7)
    mean = head.start_mean(cond_h, mu)
    many = head.sample(cond_h, 4000, 0, seed=1, logits=mu).mean(0)
    few = head.sample(cond_h, 8, 0, seed=1, logits=mu).mean(0)
    factor, diag = head.covariance(cond_h)
    assert float((factor.square().sum(2) + diag).mean()) > 0.5
    assert float((mean - many).abs().mean()) < 0.01 and float((mean - many).abs().max()) < float((few - many).abs().max())
    assert float((mean - many).abs().mean()) < 0.5 * float((few - many).abs().mean())
    if not regions:
        torch.testing.assert_close(mean.sum(1), torch.ones(1, 6, 7))


def test_expected_softmax_is_finite_and_one_hot_at_extreme_logits():
    """Logit gaps far beyond exp's float range (one pair term overflows, its mirror underflows) still give a
    distribution: the dominant class gets 1, the others 0, no NaN."""
    from entrust_nnunet.model.segdiff import expected_softmax

    mu = torch.tensor([[300.0, 0.0, -300.0]]).view(1, 3, 1, 1).expand(1, 3, 2, 2).clone()
    p = expected_softmax(mu, torch.zeros(1, 3, 4, 2, 2), torch.full((1, 3, 2, 2), 1e-6))
    torch.testing.assert_close(p, torch.tensor([1.0, 0.0, 0.0]).view(1, 3, 1, 1).expand(1, 3, 2, 2))


def test_training_losses_run_the_covariance_head_once():
    """The start likelihood and the flow loss share one pass of the covariance head, with the same values as
    each computing its own (same random draws in the same order)."""
    torch.manual_seed(0)
    head = SegDiffHead(nn.Conv2d, 3, 8)
    cond, target, mu = torch.randn(2, 8, 16, 16), torch.randint(0, 3, (2, 1, 16, 16)), torch.randn(2, 3, 16, 16)
    calls = []
    head.cov[0].register_forward_hook(lambda *_: calls.append(1))
    together = head.losses(head.condition(cond), target, mu, torch.Generator().manual_seed(1))
    assert len(calls) == 1
    gen = torch.Generator().manual_seed(1)
    apart = {"start": head.start_loss(head.condition(cond), target, mu, gen),
             "generative": head.flow_loss(head.condition(cond), target, mu, gen)}
    for key in apart:
        torch.testing.assert_close(together[key], apart[key])
