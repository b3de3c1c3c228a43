"""Absent modalities: masked inputs never reach the output; CLoE's MEC/REC and gating over present experts."""
import pytest
import torch
from conftest import arch_kwargs
from torch import nn

from entrust_nnunet.model.absence import resolve_mask
from entrust_nnunet.model.cloe import ConsistencyGate, consistency_loss, consistency_scores, pairwise_inconsistency
from entrust_nnunet.model.enfuse import EnFuse
from entrust_nnunet.model.network import LOSS_WEIGHTS, EnTrustUNet
from entrust_nnunet.model.sampling import SamplingSettings
from entrust_nnunet.model.trustmap import expert_conflict


def _net(m=3):
    torch.manual_seed(0)
    net = EnTrustUNet(m, num_classes=3, deep_supervision=False, **arch_kwargs(2))
    return net.eval()


def test_absent_channel_values_never_reach_the_output():
    net = _net()
    x = torch.randn(1, 3, 32, 32)
    poisoned = x.clone()
    poisoned[:, 1] = float("nan")
    settings = SamplingSettings(num_hypotheses=2, steps=1, probe=False)
    with torch.no_grad():
        outs = [net.sample(v, settings, modality_mask=torch.tensor([1, 0, 1])) for v in (x, poisoned)]
    for key in ("mean", "conflict", "error", "head_confidence"):
        torch.testing.assert_close(outs[1][key], outs[0][key])
    assert torch.isfinite(outs[1]["mean"]).all()
    # the attribute (what nnU-Net's plain network(x) calls see) acts like the argument; the deterministic
    # logits (train mode) are enough here
    net.train()
    other = x.clone()
    other[:, 1] = torch.randn(1, 32, 32) * 100 + 7
    net.modality_mask = torch.tensor([1.0, 0.0, 1.0])
    with torch.no_grad():
        torch.testing.assert_close(net(other), net(x))
        # the mask matters: with channel 1 present, the same x gives another prediction
        assert (net(x) - net(x, modality_mask=torch.ones(3))).abs().max() > 1e-4


def test_training_forward_masks_per_sample_and_losses_stay_finite():
    torch.manual_seed(0)
    net = EnTrustUNet(3, num_classes=3, deep_supervision=True, **arch_kwargs(2))
    x, target = torch.randn(2, 3, 32, 32), torch.randint(0, 3, (2, 1, 32, 32))
    mask = torch.tensor([[1, 1, 1], [0, 0, 1]])
    parts = net(x, return_parts=True, modality_mask=mask)
    x2 = x.clone()
    x2[1, :2] = 50.0  # only sample 1's absent channels change
    parts2 = net(x2, return_parts=True, modality_mask=mask)
    torch.testing.assert_close(parts["logits"][0], parts2["logits"][0])
    assert parts["weights"][1].tolist() == [0.0, 0.0, 1.0]  # the one present expert carries all the weight
    assert float(parts["disagreement"][1].detach().abs().max()) == 0.0  # one modality: conflict 0 (pairs undefined)
    aux = net.auxiliary_losses(parts, target)
    assert set(aux) == set(LOSS_WEIGHTS) and all(torch.isfinite(v) for v in aux.values())
    # absent streams are constant: every gradient must stay finite (sqrt at 0 would make it NaN)
    (sum(o.float().mean() for o in parts["logits"]) + sum(aux.values())).backward()
    assert all(torch.isfinite(p.grad).all() for p in net.parameters() if p.grad is not None)
    with pytest.raises(ValueError, match="at least one present"):
        net(x, modality_mask=torch.tensor([[1, 0, 0], [0, 0, 0]]))


def _onehot(labels, c=2):
    """(M, N) labels -> (1, M, C, N) one-hot expert maps."""
    return torch.nn.functional.one_hot(torch.tensor(labels), c).movedim(-1, 1).float()[None]


def test_mec_and_rec_on_hand_made_experts():
    same = _onehot([[0, 1, 1, 0], [0, 1, 1, 0]])
    assert float(pairwise_inconsistency(same, torch.ones(1, 2))) == pytest.approx(0.0, abs=1e-6)
    # orthogonal flattened maps: [1,0 | 0,1] vs [0,1 | 1,0] share no mass
    ortho = _onehot([[0, 1], [1, 0]])
    assert float(pairwise_inconsistency(ortho, torch.ones(1, 2))) == pytest.approx(1.0, abs=1e-6)
    # three experts, one orthogonal to the other two: pairs (1-2)=0, (1-3)=(2-3)=1 -> mean 2/3; absent -> 0
    three = _onehot([[0, 1], [0, 1], [1, 0]])
    assert float(consistency_loss(three, torch.ones(1, 3))) == pytest.approx(2 / 3, abs=1e-6)
    assert float(consistency_loss(three, torch.tensor([[1.0, 1.0, 0.0]]))) == pytest.approx(0.0, abs=1e-6)
    assert float(consistency_loss(three, torch.tensor([[0.0, 0.0, 1.0]]))) == 0.0  # one expert: undefined -> 0
    # REC: r keeps only voxels 0 and 1, where the experts agree, of maps that disagree on voxels 2 and 3
    split = _onehot([[0, 1, 0, 1], [0, 1, 1, 0]])
    r = torch.tensor([1.0, 1.0, 0.0, 0.0]).view(1, 1, 1, 4)
    assert float(consistency_loss(split * r, torch.ones(1, 2))) == pytest.approx(0.0, abs=1e-6)
    assert float(consistency_loss(split, torch.ones(1, 2))) == pytest.approx(0.5, abs=1e-6)


def test_gating_weights_are_zero_on_absent_experts_and_sum_to_one():
    torch.manual_seed(0)
    probs = torch.softmax(torch.randn(3, 4, 2, 8, 8), 2)
    region = torch.rand(3, 1, 8, 8)
    mask = torch.tensor([[1, 1, 1, 1], [1, 0, 1, 0], [0, 0, 0, 1]]).float()
    w = ConsistencyGate()(probs, region, mask)
    assert w.shape == (3, 4) and (w[mask == 0] == 0).all() and (w[mask == 1] > 0).all()
    torch.testing.assert_close(w.sum(1), torch.ones(3))
    assert w[2].tolist() == [0.0, 0.0, 0.0, 1.0]
    # scores read only present experts: an absent expert's map changes nothing
    moved = probs.clone()
    moved[1, 1] = torch.softmax(torch.randn(2, 8, 8) * 9, 0)
    torch.testing.assert_close(consistency_scores(moved, mask)[1], consistency_scores(probs, mask)[1])


def test_enfuse_gives_absent_streams_no_gate_and_conflict_among_present_experts():
    torch.manual_seed(0)
    fuse = EnFuse(3, 8, 16, nn.Conv2d, nn.InstanceNorm2d, {"affine": True}, nn.LeakyReLU, {})
    h = torch.randn(1, 3, 8, 6, 6)
    mask = torch.tensor([[1.0, 0.0, 1.0]])
    out = fuse(h, mask=mask)
    assert float(out["gates"][:, 2].detach().abs().max()) == 0.0  # source 0 is the consensus, 1 + m the stream m
    h2 = h.clone()
    h2[:, 1] = 30.0
    torch.testing.assert_close(fuse(h2, mask=mask)["F_en"], out["F_en"])
    experts = _onehot([[0, 0], [1, 1], [0, 0]])  # expert 1 contradicts the others
    assert float(expert_conflict(experts).max()) > 0.5
    assert float(expert_conflict(experts, mask).max()) == 0.0
    torch.testing.assert_close(expert_conflict(experts, torch.ones(1, 3)), expert_conflict(experts))


def test_resolve_mask_checks_shape():
    assert resolve_mask(None, 2, 3, "cpu").tolist() == [[1.0] * 3] * 2
    assert resolve_mask(torch.tensor([True, False, True]), 2, 3, "cpu")[1].tolist() == [1.0, 0.0, 1.0]
    with pytest.raises(ValueError, match="does not fit"):
        resolve_mask(torch.ones(4), 2, 3, "cpu")
