"""Expert alternatives: where confident experts contradict each other, hypothesis k takes modality m_k's reading."""
import torch

from conftest import arch_kwargs
from entrust_nnunet.model.alternatives import (alternatives_error_floor, expert_alternatives, expert_reading,
                                               van_der_corput)
from entrust_nnunet.model.network import EnTrustUNet
from entrust_nnunet.model.sampling import SamplingSettings
from entrust_nnunet.model.trustmap import expert_conflict


def _experts_disagreeing_on_a_blob(b=1, m=3, c=3, size=8):
    """Expert 0 sees a core blob (class 1) in the centre, the others see background; elsewhere all agree."""
    experts = torch.zeros(b, m, c, size, size)
    experts[:, :, 0] = 1.0
    experts[:, 0, :, 3:5, 3:5] = torch.tensor([0.0, 1.0, 0.0])[:, None, None]
    return experts


def test_hypotheses_follow_each_present_expert_where_they_conflict_and_stay_elsewhere():
    experts = _experts_disagreeing_on_a_blob()
    conflict = expert_conflict(experts)  # JSD of one-hot experts: 0 where they agree, > 0 on the blob
    assert conflict[0, 0, 0, 0] == 0 and conflict[0, 0, 3, 3] > 0.5
    hyps = torch.zeros(6, 1, 3, 8, 8)
    hyps[:, :, 0] = 1.0  # SegDiff's hypotheses: all background
    out = expert_alternatives(hyps, experts, conflict, torch.ones(1, 3), strength=2.0)
    blob = out[:, 0, :, 3, 3]
    # k mod 3: hypotheses 0 and 3 follow expert 0 (core), the others the background experts; whole blob alike
    assert blob.argmax(1).tolist() == [1, 0, 0, 1, 0, 0]
    whole = out[:, 0, :, 3:5, 3:5].argmax(1).flatten(1)
    assert (whole == whole[:, :1]).all()  # each hypothesis takes or leaves the blob whole
    torch.testing.assert_close(out[:, :, :, 0, 0], hyps[:, :, :, 0, 0])  # agreement: unchanged
    torch.testing.assert_close(out.sum(2), torch.ones(6, 1, 8, 8))  # still distributions
    torch.testing.assert_close(expert_alternatives(hyps, experts, conflict, torch.ones(1, 3), 0.0), hyps)


def test_van_der_corput_is_nested_and_stratified():
    u = van_der_corput(torch.arange(7))
    torch.testing.assert_close(u, torch.tensor([1 / 2, 1 / 4, 3 / 4, 1 / 8, 5 / 8, 3 / 8, 7 / 8], dtype=torch.float64))
    assert sorted(van_der_corput(torch.arange(15)).tolist()) == [(i + 1) / 16 for i in range(15)]


def test_a_soft_expert_is_read_whole_per_hypothesis_and_on_average_as_it_is():
    """An expert that gives a blob 0.4 (softmax) or 0.4 per region: each hypothesis takes or leaves the blob
    whole; over a stratified set of draws the readings average back to the expert's probabilities."""
    e = torch.zeros(1, 3, 6, 6)
    e[:, 0] = 1.0
    e[:, :, 2:4, 2:4] = torch.tensor([0.5, 0.4, 0.1])[:, None, None]
    u = van_der_corput(torch.arange(255))[:, None]  # (K, B=1)
    reading = expert_reading(e[None].expand(255, -1, -1, -1, -1), u)
    blob = reading[:, 0, :, 2:4, 2:4].argmax(1).flatten(1)
    assert (blob == blob[:, :1]).all()  # whole, in every hypothesis
    torch.testing.assert_close(reading.mean(0), e, atol=0.01, rtol=0)
    regions = expert_reading(e[None].expand(255, -1, -1, -1, -1), u, regions=True)
    torch.testing.assert_close(regions.mean(0), e, atol=0.01, rtol=0)
    # u = 1/2, 1/4: background (its cumulative 0.5 is not below u); u = 3/4: class 1 (cumulative 0.9)
    assert reading[:3, 0, :, 2, 2].argmax(1).tolist() == [0, 0, 1]


def test_error_floor_is_the_alternatives_vote_where_experts_conflict_and_zero_where_they_agree():
    experts = _experts_disagreeing_on_a_blob()
    conflict = expert_conflict(experts)[:, 0]
    hyps = torch.zeros(6, 1, 3, 8, 8)
    hyps[:, :, 0] = 1.0
    mean = expert_alternatives(hyps, experts, conflict[:, None], torch.ones(1, 3), strength=2.0).mean(0)
    confidence = mean.amax(1)
    floor = alternatives_error_floor(confidence, conflict, strength=2.0)
    # on the blob 2 of 6 hypotheses (expert 0's) disagree with the background mask: P(error) >= 1/3
    torch.testing.assert_close(floor[0, 3, 3], torch.tensor(1 / 3))
    assert floor[0, 0, 0] == 0  # the experts agree: no floor, the calibrator alone decides
    # a weak conflict lifts the floor only in proportion (g = strength * d), and strength 0 switches it off
    half = alternatives_error_floor(torch.full((2,), 0.6), torch.tensor([0.1, 0.4]), strength=2.0)
    torch.testing.assert_close(half, torch.tensor([0.2 * 0.4, 0.8 * 0.4]))
    assert alternatives_error_floor(confidence, conflict, strength=0.0).abs().max() == 0


def test_absent_modalities_are_never_followed():
    experts = _experts_disagreeing_on_a_blob(b=2)
    mask = torch.tensor([[1.0, 1.0, 1.0], [0.0, 1.0, 1.0]])  # sample 1 lacks the modality that shows the blob
    hyps = torch.zeros(4, 2, 3, 8, 8)
    hyps[:, :, 0] = 1.0
    out = expert_alternatives(hyps, experts, torch.ones(2, 1, 8, 8), mask)
    assert out[:, 0, 1, 3, 3].tolist() == [1.0, 0.0, 0.0, 1.0]
    assert (out[:, 1, 1] == 0).all()  # only experts 1 and 2 are followed: never the absent expert 0


def test_network_hypotheses_diverge_only_with_the_alternatives():
    """Through the network: with strength 0 the hypotheses are SegDiff's (a start with no spread: all alike);
    with the alternatives they differ wherever the (untrained, hence disagreeing) experts conflict."""
    torch.manual_seed(0)
    net = EnTrustUNet(3, num_classes=3, **arch_kwargs(2)).eval()
    with torch.no_grad():
        net.experts.weight.mul_(50.0)  # confident experts that contradict each other somewhere
    x = torch.randn(1, 3, 32, 32)
    settings = SamplingSettings(num_hypotheses=6, steps=0, seed=0, probe=False)
    net.expert_alternatives = 0.0
    plain = net.sample(x, settings)
    net.expert_alternatives = 1.0
    mixed = net.sample(x, settings)
    conflict = mixed["conflict"][0]
    high, low = conflict > conflict.quantile(0.9), conflict < conflict.quantile(0.1)
    moved = (mixed["hypotheses"] - plain["hypotheses"]).abs().amax((0, 2))[0]
    assert float(moved[high].mean()) > 3 * float(moved[low].mean())
    assert float(mixed["spread"].mean()) > float(plain["spread"].mean())


def test_inference_forward_is_the_log_of_samples_mean():
    """What nnU-Net's sliding window gets from forward() at inference is sample()'s mean (alternatives included),
    tempered by CalibHead's temperature: masks of the stock nnUNetv2_predict and of entrust predict agree."""
    torch.manual_seed(0)
    net = EnTrustUNet(3, num_classes=3, **arch_kwargs(2)).eval()
    with torch.no_grad():
        net.experts.weight.mul_(50.0)
        net.calib.temperature.fill_(0.7)
    x = torch.randn(2, 3, 32, 32)
    with torch.no_grad():
        logits = net(x)
    mean = net.sample(x, SamplingSettings(num_hypotheses=net.sampling.num_hypotheses, steps=net.sampling.steps,
                                          probe=False))["mean"]
    torch.testing.assert_close(torch.softmax(logits.float(), 1), torch.softmax(mean.clamp_min(1e-6).log() / 0.7, 1),
                               atol=1e-4, rtol=1e-4)
    assert (mean.argmax(1) == logits.argmax(1)).all()
