"""Expert alternatives: where confident experts contradict each other, hypothesis k takes modality m_k's reading."""
import pytest
import torch

from conftest import arch_kwargs
from entrust_nnunet.model.alternatives import (alternatives_error_floor, expected_alternative, expert_alternatives,
                                               expert_reading, EXTENT, STRUCTURE_GATE, STRUCTURE_SEED, SUPPORT,
                                               foreground_mass, structure_peak,
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


def _graded_blob(peak=0.6, size=16, centre=(5, 5), radius=4.0):
    """A softmax expert (3 classes) giving a blob class 1 with probability peak * s(x), s = 1 at the centre
    falling linearly to 0 at ``radius``: what an expert trained on coin-flip labels gives a blob it sees."""
    yy, xx = torch.meshgrid(torch.arange(size), torch.arange(size), indexing="ij")
    shape = (1 - ((yy - centre[0]) ** 2 + (xx - centre[1]) ** 2).float().sqrt() / radius).clamp(0, 1)
    e = torch.zeros(1, 3, size, size)
    e[:, 1] = peak * shape
    e[:, 0] = 1 - e[:, 1]
    return e, shape


def _graded_blob_seen_by_expert_0(k: int):
    """(experts (1, 3, 3, 16, 16), K all-background SegDiff hypotheses, the blob's shape): expert 0 sees
    :func:`_graded_blob` (peak 0.6), experts 1 and 2 see background."""
    e, shape = _graded_blob(peak=0.6)
    experts = torch.zeros(1, 3, 3, 16, 16)
    experts[:, :, 0] = 1.0
    experts[:, 0] = e
    hyps = torch.zeros(k, 1, 3, 16, 16)
    hyps[:, :, 0] = 1.0
    return experts, hyps, shape


def test_structure_peak_is_the_largest_value_of_each_connected_region():
    values = torch.zeros(1, 1, 1, 12)
    values[..., 1:4] = torch.tensor([0.2, 0.7, 0.3])
    values[..., 7:10] = torch.tensor([0.4, 0.5, 0.1])
    peak = structure_peak(values, values > 0.05)
    torch.testing.assert_close(peak[0, 0, 0], torch.tensor([0, 0.7, 0.7, 0.7, 0, 0, 0, 0.5, 0.5, 0.5, 0, 0]))
    # in 3D alike; and outside the support the values stay as they are
    cube = torch.zeros(1, 1, 6, 6, 6)
    cube[0, 0, 1:4, 1:4, 1:4], cube[0, 0, 2, 2, 2], cube[0, 0, 5, 5, 5] = 0.3, 0.9, 0.05
    peak3 = structure_peak(cube, cube > 0.1)
    assert torch.all(peak3[0, 0, 1:4, 1:4, 1:4] == 0.9) and peak3[0, 0, 5, 5, 5] == cube[0, 0, 5, 5, 5]


def test_a_graded_blob_is_taken_whole_with_its_peak_probability():
    """Per-voxel thresholds would take a different part of a graded blob in every draw; read as a structure,
    every draw takes all of it (where its expert gives it >= EXTENT of its peak) or none of it, and takes it in a
    share of draws = its peak."""
    e, shape = _graded_blob(peak=0.6)
    mass = foreground_mass(e[:, None])[:, 0]  # (B, 1, *s)
    peak = structure_peak(mass, mass > 0.1)
    k = 64
    u = van_der_corput(torch.arange(k))[:, None]
    reading = expert_reading(e[None].expand(k, -1, -1, -1, -1), u, peak=peak[None].expand(k, -1, -1, -1, -1))
    core = shape > EXTENT  # f > EXTENT q
    lesion = reading[:, 0, 1]  # (K, *s)
    taken = lesion[:, core].float().mean(1)
    assert set(taken.tolist()) == {0.0, 1.0}  # whole or nothing: never a part
    assert lesion[:, ~core & (mass[0, 0] > 0.1)].sum() == 0  # nothing of the structure beyond that extent
    assert abs(float(taken.mean()) - 0.6) < 0.05  # taken in a share of draws = the peak
    per_voxel = expert_reading(e[None].expand(k, -1, -1, -1, -1), u)[:, 0, 1][:, core].float().mean(1)
    assert ((per_voxel > 0.05) & (per_voxel < 0.95)).float().mean() > 0.15  # per voxel: parts, in 22 %
    # per region alike (on where q > u and f > EXTENT q)
    r = e[:, 1:2]
    regions = expert_reading(r[None].expand(k, -1, -1, -1, -1), u, regions=True,
                             peak=structure_peak(r, r > 0.1)[None].expand(k, -1, -1, -1, -1))[:, 0, 0]
    on = regions[:, core].mean(1)
    assert set(on.tolist()) == {0.0, 1.0} and abs(float(on.mean()) - 0.6) < 0.05


def test_drawn_alternatives_take_a_conflicting_graded_blob_whole():
    """Through expert_alternatives: expert 0 sees a graded blob (peak 0.6) the others hide; the drawn hypotheses
    that follow expert 0 take or leave it whole, even where the gate is weak (its rim); those following the
    others leave it."""
    experts, hyps, shape = _graded_blob_seen_by_expert_0(12)
    core = shape > EXTENT
    conflict = (2 * shape).clamp(0, 1)  # strong at the centre, weak at the rim
    out = expert_alternatives(hyps, experts, conflict[None, None], torch.ones(1, 3), strength=1.0, drawn=True)
    fraction = (out[:, 0].argmax(1) > 0)[:, core].float().mean(1)
    assert set(fraction.tolist()) == {0.0, 1.0}
    assert fraction[[1, 2, 4, 5, 7, 8, 10, 11]].sum() == 0  # experts 1 and 2 hide it
    assert 0 < fraction[[0, 3, 6, 9]].sum() < 4  # expert 0's readings: some take it, some leave it


def test_weak_conflict_alone_makes_no_structure():
    """Where the gate never exceeds STRUCTURE_SEED (as on lesion edges, where experts differ a little) nothing is
    read whole: the per-voxel reading, mixed in with the gate as it is."""
    experts, hyps, _ = _graded_blob_seen_by_expert_0(6)
    weak = torch.full((1, 1, 16, 16), (STRUCTURE_GATE + STRUCTURE_SEED) / 2)
    out = expert_alternatives(hyps, experts, weak, torch.ones(1, 3), strength=1.0, drawn=True)
    ks = torch.arange(6)
    per_voxel = expert_reading(experts[0][ks % 3][:, None], van_der_corput(ks // 3)[:, None])
    torch.testing.assert_close(out, (1 - weak) * hyps + weak * per_voxel)


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


def test_expected_alternative_is_the_lerp_towards_the_present_experts_mean():
    """``E_k p'_k = (1 - g) mean + g * (average of the PRESENT experts)``, ``g = clamp(strength d, 0, 1)``: an absent
    expert's output never enters; with K a multiple of the present experts it is the undrawn hypotheses' average."""
    g = torch.Generator().manual_seed(0)
    experts = torch.softmax(torch.randn(1, 3, 3, 6, 6, generator=g) * 2, 2)
    mean = torch.softmax(torch.randn(1, 3, 6, 6, generator=g), 1)
    d = torch.rand(1, 1, 6, 6, generator=g)
    mask = torch.tensor([[1.0, 0.0, 1.0]])
    out = expected_alternative(mean, experts, d, mask, strength=2.0)
    torch.testing.assert_close(out, torch.lerp(mean, (experts[:, 0] + experts[:, 2]) / 2, (2 * d).clamp(0, 1)))
    poisoned = experts.clone()
    poisoned[:, 1] = 1e6  # whatever the absent expert says
    torch.testing.assert_close(expected_alternative(mean, poisoned, d, mask, 2.0), out)
    torch.testing.assert_close(expected_alternative(mean, experts, d, mask, 0.0), mean)
    hyps = mean[None].expand(4, -1, -1, -1, -1)
    undrawn = expert_alternatives(hyps, experts, d, mask, 2.0, drawn=False)
    torch.testing.assert_close(undrawn.mean(0), out)


def test_network_hypotheses_diverge_only_with_the_alternatives():
    """Through the network: with strength 0 the hypotheses are SegDiff's (a start with no spread: all alike);
    with the alternatives they differ wherever the (untrained, hence disagreeing) experts conflict, and where
    the conflict is too weak to make a structure (gate <= SUPPORT) they move by at most the gate."""
    torch.manual_seed(0)
    net = EnTrustUNet(3, num_classes=3, **arch_kwargs(2)).eval()
    with torch.no_grad():
        net.experts.weight.mul_(3.0)  # experts that contradict each other in places
    x = torch.randn(1, 3, 32, 32)
    settings = SamplingSettings(num_hypotheses=6, steps=0, seed=0, probe=False)
    net.expert_alternatives = 0.0
    plain = net.sample(x, settings)
    net.expert_alternatives = 1.0
    mixed = net.sample(x, settings)
    conflict = mixed["conflict"][0]
    high, low = conflict > conflict.quantile(0.9), conflict <= SUPPORT
    moved = (mixed["hypotheses"] - plain["hypotheses"]).abs().amax((0, 2))[0]
    assert float(moved[high].mean()) > 0.3 and low.sum() >= 5
    assert bool((moved[low] <= conflict[low] + 1e-5).all())
    assert float(mixed["spread"].mean()) > float(plain["spread"].mean())


def test_undrawn_hypotheses_are_the_expectations_the_mean_is_made_of():
    """``SamplingSettings(hypotheses=False)`` (the predictor's setting unless hypotheses are written): no drawing,
    the hypotheses are the expected ones, which average to the network's mean; the maps are the same either way."""
    torch.manual_seed(0)
    net = EnTrustUNet(3, num_classes=3, **arch_kwargs(2)).eval()
    with torch.no_grad():
        net.experts.weight.mul_(3.0)
    x = torch.randn(1, 3, 32, 32)
    drawn = net.sample(x, SamplingSettings(num_hypotheses=6, steps=0, probe=False))
    expected = net.sample(x, SamplingSettings(num_hypotheses=6, steps=0, probe=False, hypotheses=False))
    # the mean is the start's expectation (SegDiffHead.start_mean); 6 draws of an untrained start average close to it
    torch.testing.assert_close(expected["hypotheses"].mean(0), expected["mean"], rtol=0, atol=0.02)
    assert not torch.allclose(drawn["hypotheses"], expected["hypotheses"])
    assert set(drawn) == set(expected)
    for key in set(drawn) - {"hypotheses"}:
        torch.testing.assert_close(drawn[key], expected[key], msg=key)


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


# ------------------------------------------------------------------ the showing reading
def test_showing_expert_is_the_present_one_with_the_most_foreground_and_its_mass_takes_the_means_split():
    """Softmax: the present expert with the largest foreground mass says whether there is a structure (its mass
    0.6), the network's mean which class (1 : 2 as 9 : 1), even where the expert splits it otherwise; where the
    mean gives the foreground nothing the expert's own split decides; an absent expert is never chosen; regions
    take each region's largest present reading."""
    from entrust_nnunet.model.alternatives import showing_expert, showing_index, showing_reading

    e = torch.tensor([[[1.0, 0.0, 0.0], [0.4, 0.1, 0.5], [0.0, 1.0, 0.0]]])[..., None]  # (B=1, M=3, C=3, 1)
    mask = torch.tensor([[1.0, 1.0, 0.0]])
    torch.testing.assert_close(showing_expert(e, showing_index(foreground_mass(e), mask)), e[:, 1])
    mean = torch.tensor([[[0.9], [0.09], [0.01]]])
    torch.testing.assert_close(showing_reading(e, mask, mean)[0, :, 0], torch.tensor([0.4, 0.54, 0.06]))
    background = torch.tensor([[[1.0], [0.0], [0.0]]])
    torch.testing.assert_close(showing_reading(e, mask, background)[0, :, 0], torch.tensor([0.4, 0.1, 0.5]))
    r = torch.tensor([[[0.2, 0.7], [0.6, 0.1]]])[..., None]  # two regions, two experts
    torch.testing.assert_close(showing_reading(r, torch.ones(1, 2), r[:, 0], regions=True)[0, :, 0],
                               torch.tensor([0.6, 0.7]))


def test_structure_mean_averages_each_connected_region_over_its_chosen_part():
    from entrust_nnunet.model.alternatives import structure_mean

    values = torch.zeros(1, 1, 1, 12)
    values[..., 1:4] = torch.tensor([0.2, 0.7, 0.3])
    values[..., 7:10] = torch.tensor([0.4, 0.5, 0.1])
    mean = structure_mean(values, values > 0.05, values > 0.25)
    torch.testing.assert_close(mean[0, 0, 0], torch.tensor([0, 0.5, 0.5, 0.5, 0, 0, 0, 0.45, 0.45, 0.45, 0, 0]))
    cube = torch.zeros(1, 2, 5, 5, 5)  # channels and 3D alike; a region with none of the chosen voxels keeps its own
    cube[0, 0, 1:3, 1:3, 1:3], cube[0, 1, 2:4, 2:4, 2:4] = 0.3, 0.6
    cube[0, 0, 1, 1, 1] = 0.9
    out = structure_mean(cube, cube > 0.1, cube > 0.5)
    assert torch.all(out[0, 0, 1:3, 1:3, 1:3] == 0.9) and torch.all(out[0, 1, 2:4, 2:4, 2:4] == 0.6)
    assert torch.equal(structure_mean(cube, cube > 0.1, cube > 0.95), cube)


def test_showing_reading_takes_a_graded_blob_whole_with_its_mean_mass_and_its_expectation_is_the_mean():
    """Expert 0 sees a graded blob (peak 0.6) the others hide. Showing reading: every drawn hypothesis reads expert 0
    and takes or leaves the blob whole, in a share of the draws = the expert's mean mass over the extent taken (not
    its peak: the hypotheses' expected volume is the mean's); with expert 0 absent none takes it. Undrawn, every
    hypothesis is the expected reading, which is expected_alternative's."""
    experts, hyps, shape = _graded_blob_seen_by_expert_0(16)
    core = shape > EXTENT
    conflict = (2 * shape).clamp(0, 1)[None, None]
    out = expert_alternatives(hyps, experts, conflict, torch.ones(1, 3), 1.0, drawn=True, reading="showing")
    fraction = (out[:, 0].argmax(1) > 0)[:, core].float().mean(1)
    assert set(fraction.tolist()) == {0.0, 1.0}
    assert abs(float(fraction.mean()) - float((0.6 * shape)[core].mean())) <= 1 / 16 + 1e-6  # 0.32 for this cone
    hidden = expert_alternatives(hyps, experts, conflict, torch.tensor([[0.0, 1.0, 1.0]]), 1.0, drawn=True,
                                 reading="showing")
    assert (hidden[:, 0].argmax(1) == 0).all()
    undrawn = expert_alternatives(hyps, experts, conflict, torch.ones(1, 3), 1.0, drawn=False, reading="showing")
    torch.testing.assert_close(undrawn.mean(0), expected_alternative(hyps[0], experts, conflict, torch.ones(1, 3), 1.0,
                                                                     reading="showing"))
    vote = expected_alternative(hyps[0], experts, conflict, torch.ones(1, 3), 1.0)
    centre = (slice(None), 1, 5, 5)
    assert float(undrawn.mean(0)[centre]) == pytest.approx(0.6, abs=1e-4) and float(vote[centre]) < 0.25
