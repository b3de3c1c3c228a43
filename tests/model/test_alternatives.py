"""Expert alternatives: where confident experts contradict each other, hypothesis k takes modality m_k's reading."""
import torch

from conftest import arch_kwargs
from entrust_nnunet.model.alternatives import expert_alternatives
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
