"""Region outputs (one sigmoid per overlapping region, nnU-Net's region-based training) and ignored voxels
in every EnTrust part: SegDiff, the experts and their conflict, TrustMap's statistics."""
import math

import pytest
import torch
from conftest import arch_kwargs

from entrust_nnunet.model.network import EnTrustUNet
from entrust_nnunet.model.outputs import as_logits, decision_confidence
from entrust_nnunet.model.sampling import SamplingSettings
from entrust_nnunet.model.trustmap import hypothesis_statistics

#: BraTS-like nested regions of labels 1..3: whole tumor (1, 2, 3), tumor core (2, 3), enhancing tumor (3)
REGIONS = ((1, 2, 3), (2, 3), (3,))


def _regions(labels: torch.Tensor) -> torch.Tensor:
    """(B, 1, *s) labels -> (B, 3, *s) membership of the nested regions (what nnU-Net's data loader makes)."""
    return torch.cat([torch.isin(labels, torch.tensor(r)) for r in REGIONS], 1).float()


def _toy_batch(seed: int = 0):
    """Two 16x16 images whose three nested squares are visible in the first modality; labels 0..3."""
    g = torch.Generator().manual_seed(seed)
    labels = torch.zeros(2, 1, 16, 16, dtype=torch.long)
    for lab, (lo, hi) in zip((1, 2, 3), ((2, 14), (4, 12), (6, 10))):
        labels[..., lo:hi, lo:hi] = lab
    x = torch.randn(2, 2, 16, 16, generator=g) * 0.3
    x[:, 0] += labels[:, 0].float()
    return x, labels


def _region_net(**kw) -> EnTrustUNet:
    torch.manual_seed(0)
    return EnTrustUNet(2, num_classes=3, deep_supervision=True, segdiff_mc_samples=4, **arch_kwargs(2), **kw
                       ).use_regions(True)


def test_region_losses_fall_and_hypotheses_are_per_region_probabilities():
    net = _region_net(num_hypotheses=4)
    x, labels = _toy_batch()
    target = _regions(labels)
    opt = torch.optim.Adam(net.parameters(), lr=3e-3)
    history = []
    for _ in range(10):
        opt.zero_grad()
        parts = net(x, return_parts=True)
        aux = net.auxiliary_losses(parts, target)
        bce = torch.nn.functional.binary_cross_entropy_with_logits(parts["logits"][0], target)
        (bce + sum(aux.values())).backward()
        opt.step()
        history.append({k: float(v.detach()) for k, v in aux.items()})
    for key in ("start", "generative", "experts"):
        first, last = history[0][key], sum(h[key] for h in history[-3:]) / 3
        assert math.isfinite(first) and math.isfinite(last) and last < 0.9 * first, (key, first, last)
    net.decoder.deep_supervision = False
    out = net.eval().sample(x, SamplingSettings(num_hypotheses=4, steps=1))
    hyps = out["hypotheses"]
    assert hyps.shape == (4, 2, 3, 16, 16) and out["mean"].shape == (2, 3, 16, 16)
    assert float(hyps.min()) >= 0 and float(hyps.max()) <= 1
    # regions overlap: the channels are not a distribution (inside the enhancing tumor all three are high)
    assert float(out["mean"][:, :, 8, 8].sum(1).min()) > 1.5
    assert float(out["entropy"].max()) <= 3 * math.log(2) + 1e-5 and float(out["entropy"].min()) >= 0
    for key in ("confidence", "head_confidence", "conflict", "probe", "error"):
        assert out[key].shape == (2, 16, 16) and float(out[key].min()) >= 0 and float(out[key].max()) <= 1 + 1e-6
    # stock nnU-Net applies a sigmoid to what forward returns in eval: that gives the hypotheses' mean back
    mean = torch.sigmoid(net(x))
    assert float((mean - net.sample(x)["mean"]).abs().max()) < 1e-3


def test_region_entropy_is_the_sum_of_binary_entropies():
    hyps = torch.full((2, 1, 3, 4, 4), 0.5)
    stats = hypothesis_statistics(hyps, regions=True)
    torch.testing.assert_close(stats["entropy"], torch.full((1, 4, 4), 3 * math.log(2)))
    # two sure hypotheses that disagree on one region: its entropy is the spread between hypotheses
    hyps = torch.zeros(2, 1, 3, 4, 4)
    hyps[0, :, 0] = 1
    stats = hypothesis_statistics(hyps, regions=True)
    torch.testing.assert_close(stats["entropy"], torch.full((1, 4, 4), math.log(2)))
    torch.testing.assert_close(stats["spread"], torch.full((1, 4, 4), math.log(2)), atol=1e-6, rtol=0)
    p = torch.tensor([[0.9, 0.2, 0.5]]).view(1, 3, 1)
    torch.testing.assert_close(decision_confidence(p, True), torch.tensor([[0.9 * 0.8 * 0.5]]))
    torch.testing.assert_close(torch.sigmoid(as_logits(p, True)), p)


def test_region_expert_conflict_is_high_only_where_confident_experts_contradict():
    net = _region_net()
    experts = torch.full((1, 2, 3, 1, 3), 0.02)  # (B, M, R, *s): three voxels
    experts[0, :, :, 0, 0] = 0.5                 # voxel 0: both experts unsure alike
    experts[0, 0, 2, 0, 1] = 0.98                # voxel 1: they contradict on the enhancing tumor only
    d = net.expert_conflict(experts)[0, 0, 0]
    assert float(d[0]) < 1e-5 and float(d[2]) < 1e-5
    assert float(d[1]) > 0.8


@pytest.mark.parametrize("regions", [False, True])
def test_ignored_voxels_do_not_change_any_entrust_loss(regions):
    torch.manual_seed(0)
    net = EnTrustUNet(2, num_classes=3 if regions else 4, deep_supervision=True, segdiff_mc_samples=4,
                      **arch_kwargs(2)).use_regions(regions)
    x, labels = _toy_batch()
    valid = torch.ones_like(labels, dtype=torch.bool)
    valid[..., :, :6] = False  # sparse annotation: the left part is not annotated
    other = labels.clone()
    other[..., :, :6] = torch.randint(0, 4, other[..., :, :6].shape, generator=torch.Generator().manual_seed(1))
    parts = net(x, return_parts=True)

    def losses(lab, mask):
        torch.manual_seed(3)  # the same Monte-Carlo draws in every call
        target = _regions(lab) if regions else lab
        return {k: float(v) for k, v in net.auxiliary_losses(parts, target, mask).items()}

    assert losses(labels, valid) == losses(other, valid)
    # the mask is what makes them equal: without it the changed labels change the data terms
    unmasked, changed = losses(labels, None), losses(other, None)
    for key in ("start", "generative", "experts"):
        assert unmasked[key] != changed[key], key


def test_checkpoints_carry_the_output_space_and_old_ones_load_as_labels():
    regions = _region_net()
    torch.manual_seed(0)
    fresh = EnTrustUNet(2, num_classes=3, deep_supervision=True, **arch_kwargs(2))
    assert not fresh.regions
    fresh.load_state_dict(regions.state_dict())  # what nnUNetv2_predict does with the trained weights
    assert fresh.regions and fresh.segdiff.regions
    old = {k: v for k, v in EnTrustUNet(2, num_classes=3, **arch_kwargs(2)).state_dict().items()
           if k != "region_outputs"}  # a checkpoint from before region support
    fresh.load_state_dict(old)
    assert not fresh.regions and not fresh.segdiff.regions
