"""SegDiff sampling: seeded, bounded, nested across K."""
import torch
from conftest import arch_kwargs

from entrust_nnunet.model.sampling import SamplingSettings
from entrust_nnunet.model.network import EnTrustUNet
from entrust_nnunet.model.segdiff import STATE_CLAMP


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
