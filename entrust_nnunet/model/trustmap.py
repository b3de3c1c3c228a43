"""TrustMap: per-voxel uncertainty from SegDiff's K hypotheses, probing, and a learned calibration.

Aleatoric and epistemic as the UQ literature defines them: the spread between one generative
model's samples is ALEATORIC (ambiguity the data leave open, e.g. coin-flip labels), disagreement
between models (folds) is EPISTEMIC. For models f with hypotheses' means ``p_f``::

    aleatoric = mean_f H(p_f),   epistemic = H(mean_f p_f) - aleatoric   (generalised Jensen-Shannon)

Per network and patch (:func:`hypothesis_statistics`, from hypotheses ``p_k`` (K, B, C, *s)):

* ``mean``      = the hypotheses' expectation, the class probabilities (the mask is the argmax of their calibration,
  below): at S = 0 the start's in closed form (:meth:`SegDiffHead.start_mean`), after flow steps (1/K) sum_k p_k;
* ``entropy``   = H(mean) in nats;
* ``aleatoric`` = H(mean) as well: within one model all of it is aleatoric, including the hypotheses'
  spread. The predictor averages it over patches, mirrorings and folds, so that its
  ``H(pooled mean) - pooled aleatoric`` is the folds' disagreement only;
* ``epistemic`` = 0: one network carries no model disagreement. With a single fold the predictor's
  epistemic map is therefore only what overlapping sliding-window patches and mirrorings of the
  same model disagree on (how much its prediction depends on context and orientation), never the
  spread of generative samples;
* ``spread``    = H(mean) - (1/K) sum_k H(p_k): the part of the aleatoric entropy that is spread
  between hypotheses (alternative masks) rather than softness within each (not a CalibHead input);
* ``probe``     (ProbeStep): how far the hypotheses move when the conditioning is perturbed where
  the modalities conflict (see :func:`probe_step`);
* ``conflict``  = the per-modality experts' Jensen-Shannon divergence over ``log 2``, clipped to [0, 1]
  (:func:`expert_conflict`), upsampled to full resolution: high where confident experts contradict
  each other, low where they are unsure alike (blurred edges);
* ``head_confidence`` = max class probability of the deterministic head (nnU-Net's softmax output):
  the hypotheses are sharp, so their entropies alone rank ordinary boundary errors poorly (docs/design.md).

**Regions** (one sigmoid per region, overlapping: :mod:`entrust_nnunet.model.outputs`): every channel is a
Bernoulli variable, so every entropy above is the SUM over regions of the binary entropy
``h(p) = -p log p - (1-p) log(1-p)`` (the entropy of the regions' joint distribution if they were
independent; bounded by R log 2), ``confidence`` and ``head_confidence`` are ``prod_r max(p_r, 1 - p_r)``
(:func:`~entrust_nnunet.model.outputs.decision_confidence`) and ProbeStep's map is the largest change of
any region's probability. The conflict of the experts is taken per region and its maximum over regions
kept (``EnTrustUNet.expert_conflict``).

CalibHead maps the statistics of :data:`STATISTICS` per voxel to the probability that the mask is wrong
there (the exported ``total`` map). It is fitted on cases the network never trained on: the validation
fold (``entrust_nnunet.nnunet.calibration``). On the same cases it holds the calibration of the class
probabilities, a temperature and, where the modalities conflict, per-class biases
(:func:`calibrated_log_probabilities`), which the network's inference output, the mask and
``--save_probabilities`` carry. The mask is the argmax of these calibrated probabilities (the same as the
mean's where the modalities agree), ``confidence`` its top probability and CalibHead's target its error.
"""
from __future__ import annotations

import math

import torch
from torch import nn
from torch.nn import functional as F

from entrust_nnunet.model.outputs import log_probabilities

#: CalibHead's inputs, in this order (its first layer's weights follow it)
STATISTICS = ("confidence", "entropy", "aleatoric", "epistemic", "probe", "conflict", "head_confidence")


def entropy(probs: torch.Tensor, axis: int = 0, eps: float = 1e-12) -> torch.Tensor:
    """Shannon entropy in nats along ``axis``: ``H = -sum_c p_c log(max(p_c, eps))`` (so ``0 log 0 = 0``)."""
    if probs.ndim == 0 or not -probs.ndim <= axis < probs.ndim:
        raise ValueError(f"axis {axis} is out of range for probs of shape {tuple(probs.shape)}")
    p = probs if probs.is_floating_point() else probs.double()
    return -(p * p.clamp_min(eps).log()).sum(dim=axis)


def output_entropy(probs: torch.Tensor, axis: int, regions: bool = False) -> torch.Tensor:
    """:func:`entropy` over the class ``axis``; for region outputs (one sigmoid each) the sum over that axis
    of the binary entropies ``h(p_r)``."""
    if not regions:
        return entropy(probs, axis=axis)
    p = probs if probs.is_floating_point() else probs.double()
    return entropy(torch.stack([p, 1 - p]), axis=0).sum(axis)


def mutual_information(samples_probs: torch.Tensor, eps: float = 1e-12, regions: bool = False) -> dict[str, torch.Tensor]:
    """Entropy decomposition of K probabilistic samples ``p_k`` (K, C, *s), ``pbar = mean_k p_k``::

        entropy   = H(pbar)                    (predictive entropy)
        aleatoric = mean_k H(p_k)              (expected entropy)
        epistemic = max(entropy - aleatoric, 0) (mutual information I(y; k); the clip is against rounding)

    With ``regions`` H is :func:`output_entropy`'s sum of binary entropies over the C region channels.
    """
    sp = samples_probs
    if sp.ndim < 2 or sp.shape[0] < 1 or sp.shape[1] < 1:
        raise ValueError(f"samples_probs must have shape (K, C, *spatial) with K, C >= 1, got {tuple(sp.shape)}")
    if not sp.is_floating_point():
        sp = sp.double()
    if regions:
        total, aleatoric = output_entropy(sp.mean(dim=0), 0, True), output_entropy(sp, 1, True).mean(dim=0)
    else:
        total = entropy(sp.mean(dim=0), axis=0, eps=eps)
        aleatoric = entropy(sp, axis=1, eps=eps).mean(dim=0)
    return {"entropy": total, "aleatoric": aleatoric, "epistemic": (total - aleatoric).clamp_min(0.0)}


def jensen_shannon(probs: torch.Tensor, member_axis: int, class_axis: int) -> torch.Tensor:
    """Generalised Jensen-Shannon divergence ``H(mean_m p_m) - mean_m H(p_m)`` in nats (>= 0).

    High only where members that are each confident contradict each other: members that are equally
    unsure (same soft p) score 0, one-hot members that disagree score H(mean). Bounded by
    ``log(min(M, C))``. The member and class axes are removed / kept as in ``probs.mean(member_axis)``.
    """
    mean = probs.mean(member_axis)
    cls = class_axis - (1 if class_axis > member_axis else 0)
    return (entropy(mean, axis=cls) - entropy(probs, axis=class_axis).mean(member_axis)).clamp_min(0)


def expert_conflict(expert_probs: torch.Tensor, mask: torch.Tensor | None = None) -> torch.Tensor:
    """Conflict of M expert predictions (B, M, C, *s) -> (B, 1, *s) in [0, 1]: their Jensen-Shannon
    divergence divided by ``log 2`` and clipped to 1 (0 for a single expert).

    ``log 2`` is the divergence of confident experts split evenly between two readings (structure there or
    not), so 1 means "the modalities contradict each other" for any M >= 2; the general bound ``log(min(M, C))``
    would put a one-against-two split of three modalities at 0.58 and the same split of two at 1.
    ``mask`` (B, M), 1 = modality present: the divergence is taken among the present experts only
    (``M`` is then their number, per sample), so an absent modality's expert never counts as conflicting."""
    p = expert_probs.float()
    if mask is None:
        mask = p.new_ones(p.shape[:2])
    a = mask.float().view(*mask.shape, *([1] * (p.dim() - 2)))
    n = a.sum(1).clamp_min(1)  # (B, 1, ..., 1)
    mean = (p * a).sum(1) / n
    jsd = (entropy(mean, axis=1) - (entropy(p, axis=2) * a[:, :, 0]).sum(1) / n[:, 0]).clamp_min(0)
    return torch.where(n[:, 0] >= 2, jsd / math.log(2), torch.zeros_like(jsd)).clamp(0, 1).unsqueeze(1)


def hypothesis_statistics(hypotheses: torch.Tensor, regions: bool = False, spread: bool = True,
                          mean: torch.Tensor | None = None) -> dict[str, torch.Tensor]:
    """``mean`` (B, C, *s) and the maps (B, *s) ``entropy`` = ``aleatoric`` = H(mean), ``epistemic`` = 0 and,
    with ``spread``, ``spread`` = H(mean) - mean_k H(p_k) of K hypotheses (K, B, C, *s) of ONE model (see the
    module doc); ``regions``: C sigmoid channels, H summed over them. ``mean``: the hypotheses' expectation
    when the sampler knows it (SegDiff's start, :meth:`SegDiffHead.start_mean`), else their average."""
    hyps = hypotheses.float()
    mean = hyps.mean(0) if mean is None else mean.float()
    total = output_entropy(mean, 1, regions)
    out = {"mean": mean, "entropy": total, "aleatoric": total, "epistemic": torch.zeros_like(total)}
    if spread:  # the per-hypothesis entropies only when asked for; (K, C, B, *s): class axis second
        out["spread"] = mutual_information(hyps.transpose(1, 2), regions=regions)["epistemic"]
    return out


def channel_std(x: torch.Tensor) -> torch.Tensor:
    """(B, C, *s) -> (B, C): each channel's sample standard deviation over the voxels,
    ``sqrt((sum x^2 - (sum x)^2 / n) / (n - 1))``, the two sums in one pass each and combined in float64
    (``torch.std`` is slow on CPU: 27 ms against 1.3 ms for 33 channels of 512², docs/design.md)."""
    flat = x.flatten(2).float()
    n = flat.shape[-1]
    total = flat.sum(-1).double()
    squares = torch.linalg.vector_norm(flat, dim=-1).double().square()
    return ((squares - total.square() / n) / max(n - 1, 1)).clamp_min(0).sqrt().to(x.dtype)


def projected_perturbation(weight: torch.Tensor, scale: torch.Tensor, noise: torch.Tensor) -> torch.Tensor:
    """A draw of ``W (scale * xi)``, ``xi ~ N(0, I_c)`` per voxel, from ``hidden``-channel noise:
    ``(W diag(scale^2) W^T)^(1/2) zeta`` with ``zeta ~ N(0, I_h)`` has the same Gaussian law.

    ``weight`` W (h, c): a linear pointwise projection (SegDiff's ``cond_proj``); ``scale`` (B, c);
    ``noise`` zeta (B, h, *s) standard normal -> (B, h, *s). The square root is the symmetric one (eigh).
    """
    with torch.autocast(noise.device.type, enabled=False):  # nnU-Net predicts under autocast; eigh needs float32
        w = weight.float()
        cov = torch.einsum("hc,bc,gc->bhg", w, scale.float().square(), w)
        values, vectors = torch.linalg.eigh(cov)
        root = vectors @ torch.diag_embed(values.clamp_min(0).sqrt()) @ vectors.transpose(1, 2)
    return torch.einsum("bhg,bg...->bh...", root.to(noise.dtype), noise)


def probe_step(sample_fn, cond_h: torch.Tensor, direction: torch.Tensor, conflict: torch.Tensor,
               reference: torch.Tensor, strength: float = 1.0, regions: bool = False) -> torch.Tensor:
    """ProbeStep: sensitivity of the hypotheses to conflict-guided perturbation of the conditioning.

    What is perturbed: SegDiff's conditioning ``cond`` (decoder features at full resolution and F_cf), as
    ``cond' = cond + strength * conflict * std(cond) * xi`` with ``xi ~ N(0, I)`` and ``std`` per channel over
    the patch; voxels with no conflict are not perturbed. The head reads ``cond`` only through its linear
    projection ``cond_h = W cond + b``, so the perturbation is applied there: ``cond_h' = cond_h + strength *
    conflict * direction`` with ``direction`` a draw of ``W (std * xi)``
    (:func:`projected_perturbation`: the same law, drawn in the head's 16 channels instead of the 33 of
    ``cond``, and no second projection). ``sample_fn(cond_h')`` re-runs SegDiff with the SAME start noise
    as ``reference`` (P, B, C, *s), so the returned map (B, *s) = mean_k TV(p_k, p'_k) in [0, 1] measures only
    the effect of the perturbation. P may be fewer than the K hypotheses of the mask
    (``EnTrustUNet.probe_hypotheses``, default 2): the probe then costs P/K of sampling.
    """
    moved = sample_fn(cond_h + strength * conflict.to(cond_h.dtype) * direction)
    change = (moved - reference).abs()
    return (change.amax(2) if regions else 0.5 * change.sum(2)).mean(0)


def tempered_log_probabilities(probs: torch.Tensor, temperature) -> torch.Tensor:
    """``log(max(p, MIN_PROBABILITY)) / T``: logits whose softmax over the class axis is the temperature-scaled
    ``softmax(log p / T)`` (T < 1 sharpens, T > 1 softens; the argmax never changes)."""
    return log_probabilities(probs.float()) / torch.as_tensor(temperature, dtype=torch.float32, device=probs.device)


def calibrated_log_probabilities(probs: torch.Tensor, temperature, gate: torch.Tensor | None = None,
                                 bias: torch.Tensor | None = None, axis: int = 1) -> torch.Tensor:
    """``log(max(p, MIN_PROBABILITY)) / T + g b``: logits of the calibrated class probabilities, ``softmax`` of
    which over the class ``axis`` of ``probs`` is the temperature-scaled mean moved, where the modalities conflict
    (the gate ``g`` in [0, 1], one value per voxel, broadcastable without the class axis kept as size 1), by
    per-class biases ``b`` (C,) fitted with T (:func:`~entrust_nnunet.evaluation.temperature.
    fit_temperature_with_conflict`). ``g = 0`` or no ``b``: :func:`tempered_log_probabilities`."""
    z = tempered_log_probabilities(probs, temperature)
    if gate is None or bias is None or bias.numel() == 0 or not bool((bias != 0).any()):
        return z
    shape = [1] * z.dim()
    shape[axis] = -1
    return z + gate.float().to(z.device) * bias.float().to(z.device).view(shape)


#: how far below the argmax-keeping bound ``1 / (1 + r)`` a calibrated P(error) is capped
_TOP_LABEL_MARGIN = 1e-4


def top_label_calibrated(probs: torch.Tensor, p_error: torch.Tensor) -> torch.Tensor:
    """Class probabilities (C, *s) whose top label carries the calibrated confidence (top-label calibration,
    Gupta & Ramdas, ICLR 2022): with ``t = argmax_c p_c`` and ``e`` the calibrated P(error) (*s)::

        q_t = 1 - e,   q_c = e * p_c / (1 - p_t)  (c != t; shared alike where the other classes have no mass)

    so ``1 - max_c q_c`` is the calibrated P(error) and the other classes keep their proportions. ``e`` is capped
    just below ``1 / (1 + r)`` (``r`` the largest share of a non-top class), where another class would overtake
    ``t``: the argmax, i.e. nnU-Net's mask, never changes (with two classes: ``e < 0.5``)."""
    p = probs.float()
    c = p.shape[0]
    top = p.argmax(0, keepdim=True)
    rest = p.scatter(0, top, 0.0)
    mass = rest.sum(0, keepdim=True)
    uniform = torch.ones_like(p).scatter(0, top, 0.0) / max(c - 1, 1)
    shares = torch.where(mass > 0, rest / mass.clamp_min(1e-12), uniform)
    bound = 1.0 / (1.0 + shares.amax(0, keepdim=True)) - _TOP_LABEL_MARGIN
    e = torch.minimum(p_error.float().to(p.device).clamp(0, 1).unsqueeze(0), bound)
    return (shares * e).scatter(0, top, 1.0 - e)


class CalibHead(nn.Module):
    """Per-voxel map (statistics -> probability of error): a two-layer 1x1-conv MLP with sigmoid output."""

    def __init__(self, conv_op, hidden: int = 16, num_classes: int = 0):
        super().__init__()
        n = len(STATISTICS)
        self.net = nn.Sequential(conv_op(n, hidden, 1), nn.GELU(), conv_op(hidden, 1, 1))
        # until fitted, behave like 1 - confidence (a sane default, not a hidden constant)
        self.register_buffer("fitted", torch.zeros(()))
        #: temperature T of the class probabilities (``softmax(log mean / T)``), NLL-fitted on the same cases as
        #: the head: the hypotheses' mean is not calibrated by itself (docs/design.md); T keeps every argmax
        self.register_buffer("temperature", torch.ones(()))
        #: per-class biases b of the class probabilities where the modalities conflict (``log mean / T + g b``,
        #: :func:`calibrated_log_probabilities`), fitted with T: there the hypotheses' mean follows the experts' vote,
        #: which is not the chance of each class (docs/design.md, "A conflict term in the class calibration")
        self.register_buffer("conflict_bias", torch.zeros(num_classes))
        #: how the hypotheses read the experts where they conflict: 0 the vote, 1 the showing expert
        #: (:data:`~entrust_nnunet.model.alternatives.READINGS`), chosen on the same cases
        #: (``nnunet.calibration.choose_reading``)
        self.register_buffer("showing_reading", torch.zeros(()))

    def unfit(self) -> "CalibHead":
        """Back to the unfitted head (1 - confidence), an identity class calibration (T = 1, no biases) and the
        vote reading."""
        self.fitted.zero_()
        self.temperature.fill_(1.0)
        self.conflict_bias.zero_()
        self.showing_reading.zero_()
        return self

    @staticmethod
    def features(stats: dict[str, torch.Tensor]) -> torch.Tensor:
        """The statistics on a log scale: ``log(1 - c)`` for confidences, ``log(x + 1e-4)`` for the others,
        because what ranks errors is the difference between 0.999 and 0.99 (docs/design.md)."""
        return torch.stack([torch.log((1 - stats[k].float()).clamp_min(1e-6)) if k.endswith("confidence")
                            else torch.log(stats[k].float().clamp_min(0) + 1e-4) for k in STATISTICS], 1)

    def logits(self, stats: dict[str, torch.Tensor]) -> torch.Tensor:
        return self.net(self.features(stats))[:, 0]

    def forward(self, stats: dict[str, torch.Tensor]) -> torch.Tensor:
        if not bool(self.fitted):
            return (1 - stats["confidence"]).clamp(0, 1)
        return torch.sigmoid(self.logits(stats))

    def _as_voxel_batch(self, maps: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
        """Maps of any shape -> (1, n, 1[, 1]) columns this head's 1x1 convolutions accept."""
        trailing = (1,) * (self.net[0].weight.dim() - 3)
        return {k: v.reshape(1, -1, *trailing) for k, v in maps.items()}

    def predict_voxels(self, stats: dict[str, torch.Tensor]) -> torch.Tensor:
        """Probability of error for statistics maps of any shape (e.g. a whole predicted volume)."""
        shape = stats["entropy"].shape
        return self(self._as_voxel_batch({k: stats[k] for k in STATISTICS})).reshape(shape)

    def fit_voxels(self, stats: dict[str, torch.Tensor], error: torch.Tensor, steps: int = 1000, lr: float = 1e-2,
                   judge: tuple[dict[str, torch.Tensor], torch.Tensor] | None = None, every: int = 50) -> tuple[float, int]:
        """Fit on voxel lists (or maps of any shape) of statistics and error indicators.

        Plain (unweighted) binary cross-entropy: it is a proper scoring rule, so the fitted output is
        a calibrated probability of error on the data it was fitted on. Every fit starts from the same
        seeded initialisation, so a head fitted on some cases carries nothing of an earlier fit on others
        (the trainer's cross-fitted validation maps rely on it).

        ``judge``: statistics and errors of OTHER cases. Then the fit stops early: after ``steps`` Adam
        steps the head is put back to the parameters (checked every ``every`` steps) with the lowest BCE
        on ``judge``, because a handful of calibration cases is easy to overfit. Returns the BCE on the
        fitted voxels and the number of steps kept.
        """
        with torch.random.fork_rng(devices=[]):
            torch.manual_seed(0)
            for layer in self.net:
                if hasattr(layer, "reset_parameters"):
                    layer.reset_parameters()

        def columns(st, e):
            st = self._as_voxel_batch({k: st[k] for k in STATISTICS})
            return self.features(st).detach(), self._as_voxel_batch({"e": e})["e"].float().detach()

        x, y = columns(stats, error)
        x_judge, y_judge = columns(*judge) if judge is not None else (None, None)
        opt = torch.optim.Adam(self.net.parameters(), lr=lr)
        best = (float("inf"), steps, None)
        with torch.enable_grad():
            for step in range(1, steps + 1):
                opt.zero_grad()
                F.binary_cross_entropy_with_logits(self.net(x)[:, 0], y).backward()
                opt.step()
                if x_judge is not None and step % every == 0:
                    with torch.no_grad():
                        bce = float(F.binary_cross_entropy_with_logits(self.net(x_judge)[:, 0], y_judge))
                    if bce < best[0]:
                        best = (bce, step, {k: v.clone() for k, v in self.net.state_dict().items()})
        if best[2] is not None:
            self.net.load_state_dict(best[2])
        self.fitted.fill_(1.0)
        with torch.no_grad():
            return float(F.binary_cross_entropy_with_logits(self.net(x)[:, 0], y)), best[1]
