"""EnTrust ablations: each removes exactly its part and still trains (losses) and samples (maps) like EnTrust."""
import pytest
import torch
from conftest import arch_kwargs

from entrust_nnunet.model.ablations import (EnTrustNoAlternativesUNet, EnTrustNoEnFuseUNet, EnTrustNoProbeUNet,
                                            EnTrustNoStepsUNet)
from entrust_nnunet.model.enfuse import EnFuse
from entrust_nnunet.model.network import LOSS_WEIGHTS, EnTrustUNet
from entrust_nnunet.model.sampling import SamplingSettings


@pytest.mark.parametrize("cls", [EnTrustNoEnFuseUNet, EnTrustNoStepsUNet, EnTrustNoProbeUNet, EnTrustNoAlternativesUNet])
def test_ablation_trains_and_samples_like_entrust(cls):
    torch.manual_seed(0)
    x, y = torch.randn(2, 3, 32, 32), torch.randint(0, 3, (2, 1, 32, 32))
    net = cls(3, num_classes=3, deep_supervision=True, **arch_kwargs(2))
    ref = EnTrustUNet(3, num_classes=3, deep_supervision=True, **arch_kwargs(2))
    parts = net(x, return_parts=True)
    assert [o.shape for o in parts["logits"]] == [o.shape for o in ref(x)]
    aux = net.auxiliary_losses(parts, y)
    assert set(aux) == set(LOSS_WEIGHTS)
    assert all(torch.isfinite(v) for v in aux.values())
    sum(aux.values()).backward()
    net.decoder.deep_supervision = False
    s = net.eval().sample(x, SamplingSettings(num_hypotheses=4))
    torch.testing.assert_close(s["mean"].sum(1), torch.ones(2, 32, 32))
    for key in ("aleatoric", "epistemic", "probe", "conflict", "error"):
        assert s[key].shape == (2, 32, 32) and torch.isfinite(s[key]).all()


def test_no_enfuse_concatenates_and_keeps_the_experts_conflict():
    net = EnTrustNoEnFuseUNet(3, num_classes=3, **arch_kwargs(2))
    assert not any(isinstance(m, EnFuse) for m in net.modules())
    assert net.fuse[0].out[0].in_channels == 3 * net.encoders.widths[1]
    x = torch.randn(1, 3, 32, 32)
    parts = net(x, return_parts=True)
    assert float(net.fuse[0].independence_penalty(parts["fused"][0])) == 0.0
    assert (parts["conflict"] >= 0).all() and (parts["conflict"] <= 1).all()
    assert net.compute_conv_feature_map_size([32, 32]) > 0


def test_no_steps_hypotheses_are_the_deterministic_head():
    torch.manual_seed(0)
    net = EnTrustNoStepsUNet(2, num_classes=3, **arch_kwargs(2)).eval()
    net.expert_alternatives = 0.0  # the head alone (tests/model/test_alternatives.py: what the alternatives add)
    x = torch.randn(1, 2, 32, 32)
    s = net.sample(x, SamplingSettings(num_hypotheses=8))
    head = torch.softmax(net(x, return_parts=True)["logits"].float(), 1)
    torch.testing.assert_close(s["mean"], head)
    assert s["epistemic"].abs().max() < 1e-6 and s["probe"].abs().max() < 1e-6


def test_no_probe_never_probes():
    torch.manual_seed(0)
    net = EnTrustNoProbeUNet(2, num_classes=3, **arch_kwargs(2)).eval()
    s = net.sample(torch.randn(1, 2, 32, 32), SamplingSettings(num_hypotheses=4, probe=True))
    assert s["probe"].abs().max() == 0


def test_no_alternatives_hypotheses_are_segdiffs_alone():
    torch.manual_seed(0)
    net = EnTrustNoAlternativesUNet(3, num_classes=3, **arch_kwargs(2)).eval()
    assert net.expert_alternatives == 0.0
    with torch.no_grad():
        net.experts.weight.mul_(50.0)  # experts that contradict each other: the full model's hypotheses would move
    x = torch.randn(1, 3, 32, 32)
    settings = SamplingSettings(num_hypotheses=4, probe=False)
    s = net.sample(x, settings)
    parts = net._trunk(x, keep_all=False, mask=net._mask(x))
    logits = parts["logits"][0] if isinstance(parts["logits"], (list, tuple)) else parts["logits"]
    torch.testing.assert_close(s["hypotheses"], net._segdiff_hypotheses(logits, net.segdiff.condition(parts["cond"]), 4, settings.steps))
    net.expert_alternatives = 1.0
    assert not torch.allclose(net.sample(x, settings)["hypotheses"], s["hypotheses"])
