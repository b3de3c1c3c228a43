"""Expert alternatives: where the modalities conflict, hypothesis k follows one modality's reading.

SegDiff's low-rank start spreads only where the training labels disagree among themselves. With one
label per case the network learns each training blob's label by heart, the covariance collapses there,
and on new cases every hypothesis agrees on a blob whose truth is a coin flip (docs/design.md, measured:
diversity 0). The per-modality experts, each seeing one modality only, disagree exactly where the
modalities do. So hypothesis k takes expert ``m_k``'s reading in proportion to their conflict::

    p'_k = (1 - g) p_k + g r_k,   g = clamp(strength * d, 0, 1)   (strength 2 by default)

``r_k`` is ONE draw of expert ``m_k``'s reading for the whole case, with ``u_k`` the ``(k // n + 1)``-th term of
the base-2 van der Corput sequence (1/2, 1/4, 3/4, 1/8, ...): per voxel, the one-hot class whose cumulative
probability first exceeds ``u_k`` (per region: ``e > u_k``). Where the experts conflict a structure is read as a
whole instead (:func:`expert_reading` with a ``peak``): an expert trained on coin-flip labels gives a blob
``f(x) = q s(x)``, its peak ``q`` (the chance the blob is lesion) times a shape graded from centre to rim, so a
per-voxel threshold takes a different part of the blob in every hypothesis (measured: 40-70 %, docs/design.md).
The reading takes the blob (``f > EXTENT q``: an expert's blob is more peaked than the structure, docs/design.md)
with probability ``q`` and leaves it otherwise, ``q`` being the largest ``f`` over the connected conflicting
region that holds a strong conflict (:func:`structure_peak`; constants chosen on the development seed). The written
hypotheses carry the draws; the network's mean and maps take the expert's probability ``e`` itself, the per-voxel
draws' expectation (a few draws per expert would only add Monte-Carlo noise to the mean: measured,
docs/design.md). It is not the whole-structure reading's expectation (``q`` over the structure's extent, 0
outside), which the written hypotheses average to: the mean keeps the expert's grading from centre to rim.

with ``d`` the experts' normalised Jensen-Shannon divergence among the present modalities (high only where
confident experts contradict each other: not on blurred edges, where each is unsure alike) and ``m_k`` the
``(k mod n)``-th present modality. One expert per hypothesis for the whole case (every patch), so a
hypothesis takes or leaves a conflicting structure whole; ``k mod n`` keeps the readings balanced and the
hypotheses nested across K. Where the experts agree (``d`` ~ 0) nothing changes. Strength 2: from
``d`` = 0.5 on, the hypothesis takes its expert's reading wholly (a linear mix at ``d`` = 0.5 would not
flip a confident SegDiff hypothesis); chosen on the development seed, with what it costs (docs/design.md).

The same gate bounds the probability of error from below (:func:`alternatives_error_floor`): a calibrator
fitted on cases without conflict has never seen one, so there the hypotheses' own vote is the best estimate.

**Two readings** (``reading``). The above is the ``"vote"``: each modality's expert reads a conflicting structure
for its share of the hypotheses, so a structure one of three modalities shows gets about a third of that
expert's probability. ``"showing"``: every hypothesis reads the expert that shows the most foreground
(:func:`showing_reading`): a modality that hides a structure is silent about it, not evidence against it. Where
the model was trained on such conflicts the showing reading is the better one (development set: Dice 0.935
against 0.896, foreground+boundary ECE 0.028 against 0.048); where it never saw one, the showing expert reads the
structure with full confidence and P(error) inside conflict collapses (0.09 against 0.26, error 0.85;
docs/design.md, "The showing expert's reading"). Which one a model uses is chosen on its calibration cases
(``nnunet.calibration.choose_reading``): the vote unless the showing reading predicts their conflicting voxels
better beyond the cases' noise.
"""
from __future__ import annotations

import torch
import torch.nn.functional as F

#: a voxel belongs to a conflicting structure where the expert's foreground exceeds SUPPORT and the gate
#: STRUCTURE_GATE
SUPPORT = 0.1
STRUCTURE_GATE = 0.1
#: ... and that is connected to a voxel where the gate exceeds STRUCTURE_SEED (lesion edges, where the experts
#: differ a little, are not structures of their own)
STRUCTURE_SEED = 0.8
#: a structure read whole extends to where its expert gives it this share of its peak
EXTENT = 0.3
#: geodesic reach of a structure's peak, in voxels (3x3(x3) max-pool steps)
PEAK_STEPS = 32


def alternatives_gate(conflict: torch.Tensor, strength: float) -> torch.Tensor:
    """``g = clamp(strength * d, 0, 1)``: how far a hypothesis follows its expert at conflict ``d``."""
    return (strength * conflict.float()).clamp(0, 1)


def van_der_corput(index: torch.Tensor) -> torch.Tensor:
    """Base-2 radical inverse of ``index + 1`` (integers >= 0): 1/2, 1/4, 3/4, 1/8, 5/8, 3/8, 7/8, ... Every
    prefix spreads evenly over (0, 1), so the draws stay stratified as K grows (hypotheses nested across K)."""
    i, u, scale = index.long() + 1, torch.zeros(index.shape, dtype=torch.float64, device=index.device), 0.5
    while bool((i > 0).any()):
        u += (i % 2) * scale
        i, scale = i // 2, scale / 2
    return u


def structure_peak(values: torch.Tensor, support: torch.Tensor, steps: int = PEAK_STEPS) -> torch.Tensor:
    """The largest of ``values`` over the connected component of ``support`` each voxel lies in (geodesic
    dilation by 3x3(x3) max-pooling, at most ``steps`` voxels far); ``values`` itself outside the support.
    ``values`` and ``support`` (N, C, *s) with 1-3 spatial dims; channels are separate images."""
    shape = values.shape
    x, inside = values.reshape(-1, 1, *shape[2:]), support.reshape(-1, 1, *shape[2:]).to(values.dtype)
    pool = (F.max_pool1d, F.max_pool2d, F.max_pool3d)[x.dim() - 3]
    peak = x * inside
    for _ in range(steps):
        grown = torch.maximum(pool(peak, 3, 1, 1) * inside, peak)
        if torch.equal(grown, peak):
            break
        peak = grown
    return torch.where(inside > 0, peak, x).reshape(shape)


#: the conflict readings (module doc): index = ``CalibHead.showing_reading``
READINGS = ("vote", "showing")
#: the reading of a conflict that knows no expert (:func:`coin_alternatives`)
COIN = "coin"
#: where the coin is fully open, this share of the network's own probabilities stays: its decision breaks the
#: coin's tie, so the mask keeps the trunk's reading where the images leave the label open (an exact 1/2 - 1/2 would
#: go to whichever class comes first: background)
COIN_KEEPS = 0.02


def structure_mean(values: torch.Tensor, support: torch.Tensor, within: torch.Tensor,
                   steps: int = PEAK_STEPS) -> torch.Tensor:
    """The mean of ``values`` over the voxels of ``within`` (a part of ``support``) in the connected component of
    ``support`` each voxel lies in (the components of :func:`structure_peak`: each voxel's component is named by the
    largest voxel index in it); ``values`` itself where the component holds no ``within`` voxel and outside the
    support. ``values``, ``support``, ``within`` (N, C, *s) with 1-3 spatial dims; channels are separate images."""
    shape, spatial = values.shape, values.shape[2:].numel()
    images = values.numel() // spatial
    index = torch.arange(1, spatial + 1, device=values.device, dtype=torch.float64).expand(images, spatial)
    name = structure_peak(index.reshape(shape), support, steps).reshape(images, spatial).long()  # 1..spatial
    key = (name + torch.arange(images, device=values.device)[:, None] * (spatial + 1)).flatten()
    take = within.reshape(-1)
    flat = values.reshape(-1).double()
    sums = torch.zeros(images * (spatial + 1), dtype=torch.float64, device=values.device)
    counts = torch.zeros_like(sums)
    sums.index_add_(0, key[take], flat[take])
    counts.index_add_(0, key[take], torch.ones_like(flat[take]))
    mean = sums[key] / counts[key].clamp_min(1)
    inside = support.reshape(-1) & (counts[key] > 0)
    return torch.where(inside, mean, flat).to(values.dtype).reshape(shape)


def foreground_mass(probabilities: torch.Tensor, regions: bool = False) -> torch.Tensor:
    """Per-region probabilities (channels in dim 2) as they are; softmax: ``1 - p(background)`` as one channel."""
    return probabilities if regions else 1 - probabilities[:, :, :1]


def expert_reading(expert: torch.Tensor, u: torch.Tensor, regions: bool = False,
                   peak: torch.Tensor | None = None, chance: torch.Tensor | None = None) -> torch.Tensor:
    """One draw of an expert's reading per hypothesis: ``expert`` (K, B, C, *s) probabilities, ``u`` (K, B) in
    (0, 1) shared by every voxel. Softmax: the one-hot class whose cumulative probability first exceeds u;
    regions (independent sigmoids): channel r on where ``e_r > u``; the mean over uniform u is ``expert``.

    ``peak`` (K, B, 1 or R, *s; :func:`structure_peak` of :func:`foreground_mass`): read whole structures.
    Foreground (per region: on) where ``a > 1 - u`` (per region: ``a > u``) and ``f > EXTENT q``, with ``f`` the
    foreground mass, ``q`` its peak and ``a`` the structure's ``chance`` (default ``q``; the showing reading gives
    the mean of ``f`` over that extent, :func:`structure_mean`): a structure is taken with probability ``a``, at
    that extent, in the class the per-voxel reading gives (else the likeliest foreground class). Where
    ``a = q = f`` this is the per-voxel reading."""
    level = u.to(expert.dtype).view(*u.shape, *([1] * (expert.dim() - 2)))
    chance = peak if chance is None else chance
    if regions:
        return (expert > level if peak is None else (chance > level) & (expert > EXTENT * peak)).to(expert.dtype)
    below = (expert.cumsum(2) < level).sum(2, keepdim=True).clamp_max(expert.shape[2] - 1)
    if peak is not None and expert.shape[2] > 1:
        foreground = (chance > 1 - level) & (foreground_mass(expert) > EXTENT * peak)
        likeliest = expert[:, :, 1:].argmax(2, keepdim=True) + 1
        below = torch.where(foreground, torch.where(below > 0, below, likeliest), torch.zeros_like(below))
    return torch.zeros_like(expert).scatter_(2, below, 1.0)


def showing_index(score: torch.Tensor, mask: torch.Tensor) -> torch.Tensor:
    """(B, 1, 1 or R, *s): per voxel (per region: per channel) the PRESENT expert with the largest ``score``
    (B, M, 1 or R, *s; the foreground mass or its structure peak), ``mask`` (B, M) 1 = present."""
    present = (mask > 0).view(*mask.shape, *[1] * (score.dim() - 2))
    return score.float().masked_fill(~present, -1.0).argmax(1, keepdim=True)


def showing_expert(per_expert: torch.Tensor, index: torch.Tensor) -> torch.Tensor:
    """``per_expert`` (B, M, C', *s) taken from the expert :func:`showing_index` names: (B, C', *s)."""
    return per_expert.gather(1, index.expand(-1, -1, per_expert.shape[2], *per_expert.shape[3:]))[:, 0]


def showing_reading(experts: torch.Tensor, mask: torch.Tensor, split: torch.Tensor, regions: bool = False,
                    index: torch.Tensor | None = None) -> torch.Tensor:
    """The showing expert's reading (B, C, *s): the foreground mass ``f`` of the present expert ``index`` names
    (:func:`showing_index`; default: the one with the largest ``f``), split among the foreground classes as ``split`` (B, C, *s; the
    hypotheses' own mean) splits it, ``(1 - f, f p_c / sum_{c>=1} p_c)``: the expert says WHETHER there is a
    structure, the network which class it is (an expert's own split, at half resolution, turned parts of the blobs
    into the rim class: docs/design.md). Regions: each region's largest present reading."""
    mass = foreground_mass(experts, regions)
    index = showing_index(mass, mask) if index is None else index
    shown = showing_expert(mass, index)
    if regions:
        return shown
    # where the mean gives the foreground classes nothing, the expert's own split decides
    own = showing_expert(experts, index)
    classes = split[:, 1:].float().clamp_min(0) + 1e-6 * own[:, 1:] + 1e-12
    return torch.cat([1 - shown, shown * classes / classes.sum(1, keepdim=True)], 1)


def _showing_alternatives(hypotheses: torch.Tensor, experts: torch.Tensor, gate: torch.Tensor, mask: torch.Tensor,
                          regions: bool, drawn: bool) -> torch.Tensor:
    """:func:`expert_alternatives` with the showing reading: every hypothesis reads the showing expert; drawn, it
    takes a conflicting structure (the expert with the highest peak there) where its mean mass over the extent
    taken exceeds ``1 - u_k`` (the hypotheses' expected volume there is the mean's; the peak, the expert's most
    confident voxel, overstated it: all hypotheses took every blob, docs/design.md)."""
    k, split = hypotheses.shape[0], hypotheses.float().mean(0)
    if not drawn:
        return torch.lerp(hypotheses, showing_reading(experts, mask, split, regions)[None].to(hypotheses.dtype), gate)
    mass = foreground_mass(experts, regions)
    inside, peak = _structures(mass, gate, mask)
    extent = inside & (mass > EXTENT * peak)
    chance = structure_mean(mass.flatten(0, 1), inside.flatten(0, 1), extent.flatten(0, 1)).view_as(mass)
    index = showing_index(peak, mask)  # a structure's expert: the one with the highest peak there
    shown = showing_reading(experts, mask, split, regions, index)
    shown_peak, shown_chance, shown_inside = (showing_expert(x, index)[None].expand(k, *peak.shape[:1], *peak.shape[2:])
                                              for x in (peak, chance, inside.to(mass.dtype)))
    u = van_der_corput(torch.arange(k, device=mask.device))[:, None].expand(k, mask.shape[0])
    reading = expert_reading(shown[None].expand(k, *shown.shape), u, regions, shown_peak, shown_chance)
    gate = torch.maximum(gate, (foreground_mass(reading, regions) * shown_inside).to(gate.dtype))
    return torch.lerp(hypotheses, reading.to(hypotheses.dtype), gate)


def coin_reading(mean: torch.Tensor, regions: bool = False) -> tuple[torch.Tensor, torch.Tensor]:
    """The coin's two readings of ``mean`` (B, C, *s): (structure taken, structure left). Softmax: the one-hot
    likeliest foreground class of ``mean`` and the one-hot background; regions: on for every region whose
    probability is at least half the largest one's, and all off."""
    if regions:
        m = mean.float()
        taken = (m >= 0.5 * m.amax(1, keepdim=True)).to(mean.dtype)
        return taken, torch.zeros_like(taken)
    taken = torch.zeros_like(mean).scatter_(1, mean[:, 1:].argmax(1, keepdim=True) + 1, 1.0)
    left = torch.zeros_like(mean)
    left[:, 0] = 1.0
    return taken, left


def coin_gate(gate: torch.Tensor) -> torch.Tensor:
    """The coin's gate (B, 1, *s) from the alternatives gate ``g``: ``g (1 - COIN_KEEPS)`` (the network's decision
    breaks the tie), and ``1 - COIN_KEEPS`` over each connected open region (``g > STRUCTURE_GATE``) that holds a
    voxel with ``g > 1/2``: a drawn hypothesis takes or leaves such a structure whole, not only its core, and the
    expectation is the average of such draws. Computed once per patch by the network (``structure_peak``'s
    geodesic dilation costs ~2 s at 128^3 on 2 CPU threads)."""
    g = gate.float() * (1 - COIN_KEEPS)
    whole = structure_peak((g > 0.5 * (1 - COIN_KEEPS)).float(), g > STRUCTURE_GATE) > 0
    return torch.where(whole, torch.full_like(g, 1 - COIN_KEEPS), g)


def coin_alternatives(hypotheses: torch.Tensor, gate: torch.Tensor, regions: bool = False,
                      drawn: bool = True, split: torch.Tensor | None = None,
                      whole: torch.Tensor | None = None) -> torch.Tensor:
    """The coin reading of a conflict that says only THAT the modalities disagree (the cross-modal prediction
    conflict, :mod:`~entrust_nnunet.model.crossmodal`), not which reading is right: ``p'_k = (1 - c) p_k + c r_k``
    with ``r_k`` the structure taken (:func:`coin_reading` of the hypotheses' mean) when ``u_k < 1/2`` and left
    otherwise (``u_k`` the van der Corput term: left, taken, left, taken, ...), or ``drawn`` False its expectation,
    the two readings' average; ``c`` the coin's gate of ``gate`` (K or 1, B, 1, *s) (:func:`coin_gate`), or
    ``whole`` (B, 1, *s) when the caller computed it. ``split`` (B, C, *s): the probabilities whose likeliest
    foreground class is taken (default: the hypotheses' mean; the network passes its head's, one per patch, so that
    ProbeStep's moved hypotheses take the same class)."""
    taken, left = coin_reading(hypotheses.float().mean(0) if split is None else split, regions)
    c = (coin_gate(gate[0]) if whole is None else whole)[None]
    if drawn:
        u = van_der_corput(torch.arange(hypotheses.shape[0], device=hypotheses.device))
        take = (u < 0.5).view(-1, *[1] * (hypotheses.dim() - 1))
        target = torch.where(take, taken[None], left[None])
    else:
        target = (0.5 * (taken + left))[None]
    return torch.lerp(hypotheses, target.to(hypotheses.dtype), c.to(hypotheses.dtype))


def _structures(mass: torch.Tensor, gate: torch.Tensor, mask: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """Per expert (``mass`` (B, M, 1 or R, *s), ``gate`` (1, B, 1, *s)): the voxels of its conflicting structures
    (mass > SUPPORT, gate > STRUCTURE_GATE, connected to a gate > STRUCTURE_SEED) and the peak over each."""
    present = (mask > 0).view(*mask.shape, *[1] * (mass.dim() - 2))
    inside = (mass > SUPPORT) & (gate[0, :, None] > STRUCTURE_GATE) & present
    seeds = (inside & (gate[0, :, None] > STRUCTURE_SEED)).to(mass.dtype)
    inside &= structure_peak(seeds.flatten(0, 1), inside.flatten(0, 1)).view_as(mass) > 0
    return inside, structure_peak(mass.flatten(0, 1), inside.flatten(0, 1)).view_as(mass)


def expert_alternatives(hypotheses: torch.Tensor, experts: torch.Tensor, conflict: torch.Tensor,
                        mask: torch.Tensor, strength: float = 1.0, regions: bool = False,
                        drawn: bool = True, reading: str = "vote", split: torch.Tensor | None = None,
                        whole: torch.Tensor | None = None) -> torch.Tensor:
    """``p'_k = (1 - g) p_k + g r_k`` (module doc) for hypotheses (K, B, C, *s), expert probabilities
    (B, M, C, *s) and conflict ``d`` (B, 1, *s) at the hypotheses' resolution, modality ``mask`` (B, M), 1 =
    present; ``regions``: C sigmoid channels. ``drawn``: each conflicting structure read whole (its peak over the
    voxels where the expert gives > SUPPORT and the gate is > STRUCTURE_GATE, connected to one where the gate is
    > STRUCTURE_SEED: :func:`structure_peak`), and a hypothesis
    that takes one follows its reading there with gate 1. ``drawn`` False: ``r_k`` is replaced by its expectation
    over the draws, ``e_{m_k}`` (what the network's mean and maps use: the same mean without the noise of a few
    draws). ``strength`` 0 returns the hypotheses unchanged. ``reading`` "showing": :func:`_showing_alternatives`;
    :data:`COIN`: :func:`coin_alternatives` with ``split`` and ``whole`` (the experts are not read)."""
    if strength <= 0:
        return hypotheses
    if reading == COIN:
        return coin_alternatives(hypotheses, alternatives_gate(conflict, strength)[None], regions, drawn, split, whole)
    if reading == "showing":
        gate = alternatives_gate(conflict, strength).to(hypotheses.dtype)[None]
        return _showing_alternatives(hypotheses, experts, gate, mask, regions, drawn)
    k, b = hypotheses.shape[:2]
    present = mask > 0
    n = present.sum(1).clamp_min(1)  # (B,)
    # the (k mod n_b)-th present modality of sample b: rank the present modalities 0..n_b-1
    rank = present.long().cumsum(1) - 1  # (B, M): rank among the present ones (junk where absent)
    ks = torch.arange(k, device=mask.device)[:, None]
    which = ks % n[None]  # (K, B)
    chosen = (present[None] & (rank[None] == which[..., None])).to(experts.dtype)  # (K, B, M) one-hot

    def follow(per_expert: torch.Tensor) -> torch.Tensor:  # (B, M, ...) -> (K, B, ...): hypothesis k's expert
        return torch.einsum("kbm,bm...->kb...", chosen, per_expert)

    followed = follow(experts)  # (K, B, C, *s)
    gate = alternatives_gate(conflict, strength).to(hypotheses.dtype)[None]  # (1, B, 1, *s)
    if drawn:  # whole structures where the experts conflict: peaks per expert, then followed like the experts
        inside, peak = _structures(foreground_mass(experts, regions), gate, mask)  # (B, M, 1 or R, *s) each
        target = expert_reading(followed, van_der_corput(ks // n[None]), regions, follow(peak))
        # a structure a hypothesis takes, it takes wholly: where the gate is weak (its rim) SegDiff's hypothesis
        # would keep the rim and a taken blob lose much of its area (measured, docs/design.md)
        taken = foreground_mass(target, regions) * follow(inside.to(chosen.dtype))
        gate = torch.maximum(gate, taken.to(gate.dtype))
    else:
        target = followed
    # (1 - g) p_k + g r_k in one fused pass over the K hypotheses
    return torch.lerp(hypotheses, target.to(hypotheses.dtype), gate.to(hypotheses.dtype))


def expected_alternative(mean: torch.Tensor, experts: torch.Tensor, conflict: torch.Tensor, mask: torch.Tensor,
                         strength: float = 1.0, reading: str = "vote", regions: bool = False,
                         split: torch.Tensor | None = None, whole: torch.Tensor | None = None) -> torch.Tensor:
    """``E_k p'_k = (1 - g) E p_k + g r``: what the hypotheses of :func:`expert_alternatives` (``drawn`` False)
    average to when ``mean`` (B, C, *s) is their expectation; ``experts`` (B, M, C, *s), ``conflict`` (B, 1, *s),
    ``mask`` (B, M). ``r``: the vote, ``mean_m e_m`` over the present experts (each followed with equal chance),
    or the showing expert's reading split as ``mean`` splits the foreground (:func:`showing_reading`), or
    :data:`COIN`'s two readings' average (:func:`coin_reading` of ``split``, default ``mean``; ``whole``: its gate,
    :func:`coin_alternatives`)."""
    if strength <= 0:
        return mean
    if reading == COIN:  # the coin's expectation, as one "hypothesis" whose mean is ``mean``
        return coin_alternatives(mean[None], alternatives_gate(conflict, strength)[None], regions, False, split,
                                 whole)[0]
    if reading == "showing":
        target = showing_reading(experts, mask, mean, regions)
        return torch.lerp(mean, target.to(mean.dtype), alternatives_gate(conflict, strength).to(mean.dtype))
    present = (mask > 0).to(experts.dtype)
    weights = present / present.sum(1, keepdim=True).clamp_min(1)
    target = torch.einsum("bm,bm...->b...", weights, experts)
    return torch.lerp(mean, target.to(mean.dtype), alternatives_gate(conflict, strength).to(mean.dtype))


def alternatives_error_floor(confidence: torch.Tensor, conflict: torch.Tensor, strength: float = 1.0) -> torch.Tensor:
    """``P(error) >= g (1 - confidence)``, ``g = clamp(strength * d, 0, 1)`` (maps of one shape).

    Where the experts conflict (g = 1) hypothesis k IS expert m_k's reading, so ``1 - confidence`` (the share of
    hypothesis mass that disagrees with the mask) is the probability of error if each modality's reading is as
    likely to be the truth. A calibrator knows better only where it saw such voxels; fitted on cases without
    conflict it extrapolates (measured: 0.01 where the mask was wrong half the time, docs/design.md), so the
    exported P(error) is the larger of the two. Where the experts agree (g = 0) the floor is 0.
    ``strength`` 0 (no expert alternatives) gives 0 everywhere."""
    if strength <= 0:
        return torch.zeros_like(confidence, dtype=torch.float32)
    return gated_error_floor(confidence, alternatives_gate(conflict, strength))


def gated_error_floor(confidence: torch.Tensor, gate: torch.Tensor) -> torch.Tensor:
    """:func:`alternatives_error_floor` from the gate ``g`` itself: ``g (1 - confidence)``."""
    return gate.float() * (1 - confidence.float()).clamp(0, 1)
