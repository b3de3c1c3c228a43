"""EnTrustUNet: ModEnc -> EnFuse (every resolution) -> U-Net decoder -> deterministic head + SegDiff + TrustMap.

The constructor takes exactly the arch kwargs nnU-Net's planner writes for PlainConvUNet (plus
optional EnTrust kwargs with defaults), so ``get_network_from_plans`` builds it from any nnU-Net
plans, 2D or 3D alike.

``forward(x)`` returns what PlainConvUNet returns, so nnU-Net's loss, validation and sliding-window
inference use it unchanged: deep-supervision logits while training; at inference (eval mode,
deep supervision off) the logits of the calibrated class probabilities: ``log`` of the mean of K SegDiff
hypotheses divided by CalibHead's fitted temperature, plus its fitted biases where the modalities
conflict (:meth:`calibrated_log_probabilities`), so that masks from the stock ``nnUNetv2_predict`` and
from nnU-Net's end-of-training validation follow the fold's calibrated probabilities. They can differ from
``entrust predict``'s where patches, mirrorings or folds disagree: nnU-Net averages these log-probabilities,
``entrust predict`` averages the probabilities and then applies ``entrust calibrate``'s class calibration when
the model folder has one.
``forward(x, return_parts=True)`` additionally returns the fusion parts the trainer needs for the
EnTrust losses (:meth:`auxiliary_losses`). :meth:`sample` runs encoders and EnFuse ONCE and
draws K hypotheses through the light SegDiff head only.

EnFuse runs at every resolution below the full one (stages 1..n-1); at full resolution the M
streams are fused by a 1x1 convolution that also sees F_cf upsampled from stage 1 (conflict regions
are several voxels wide and survive one 2x upsampling).

Per-modality experts (CLoE-style): each modality's own stage-1 features predict the labels on
their own through a 1x1 head. Their conflict ``d`` is an input of D_cf at every EnFuse stage
(area-pooled to that resolution) and, detached, its training target: F_cf says "the modalities say
different things here" without ever using true conflict masks (real data has none). ``d`` is the
experts' generalised Jensen-Shannon divergence ``H(mean_m p_m) - mean_m H(p_m)`` divided by
``log 2`` (:func:`~entrust_nnunet.model.trustmap.expert_conflict`, ``conflict_measure="jsd"``):
it discounts what each expert is unsure of on its own, so it is high where CONFIDENT experts contradict
each other, not on every blurred edge (why not the total-variation distance: docs/design.md).
``sample()`` reports ``d`` itself (upsampled) as the conflict map.

Regions and the ignore label (:meth:`use_regions`, :meth:`auxiliary_losses`' ``valid``): with nnU-Net's
region-based training every output channel is a region with its own sigmoid (regions may overlap); the
deterministic head, SegDiff's start and flow, the experts and TrustMap then all work per region (binary
likelihoods, sigmoid hypotheses, binary entropies summed over regions, the experts' conflict per region
and its maximum kept). Voxels under nnU-Net's ignore label add nothing to any EnTrust loss.

Cascade (nnU-Net's ``3d_cascade_fullres``): the network input is the M image channels followed by the
previous stage's one-hot segmentation (one channel per foreground label). With ``num_modalities`` = M
below ``input_channels``, the remaining channels are a PRIOR, never modalities: no encoder, expert or
conflict of their own. The full-resolution fusion sees the prior beside the M streams, and each EnFuse
stage's output gets a 1x1 projection of the prior area-pooled to that stage, so the decoder sees it at
every resolution (as nnU-Net's cascade, whose encoder sees it from the input on).
"""
from __future__ import annotations

from collections.abc import Collection

import torch
from dynamic_network_architectures.building_blocks.unet_decoder import UNetDecoder
from dynamic_network_architectures.initialization.weight_init import InitWeights_He
from torch import nn
from torch.nn import functional as F

from entrust_nnunet.model.absence import impute_absent, resolve_mask, without_absent
from entrust_nnunet.model.alternatives import (READINGS, alternatives_error_floor, alternatives_gate,
                                               expected_alternative, expert_alternatives)
from entrust_nnunet.model.cloe import ConsistencyGate, RegionProjection, consistency_loss
from entrust_nnunet.model.encoders import ModalityEncoders
from entrust_nnunet.model.enfuse import EnFuse
from entrust_nnunet.model.outputs import (as_logits, decision_confidence, full_resolution, masked_mean,
                                          probabilities)
from entrust_nnunet.model.pointwise import pointwise_conv
from entrust_nnunet.model.sampling import DEFAULT_SAMPLING, SamplingSettings
from entrust_nnunet.model.segdiff import SegDiffHead
from entrust_nnunet.model.trustmap import (CalibHead, calibrated_log_probabilities, channel_std, expert_conflict,
                                          hypothesis_statistics, probe_step, projected_perturbation)
#: weights of the EnTrust loss terms added to nnU-Net's Dice+CE (see ``auxiliary_losses``)
LOSS_WEIGHTS = {"generative": 1.0, "start": 1.0, "independence": 0.1, "experts": 0.5, "conflict": 0.5,
                "mec": 0.1, "rec": 0.1, "region": 0.1}


class FeatureUNetDecoder(UNetDecoder):
    """nnU-Net's UNetDecoder that also returns its full-resolution features (SegDiff's conditioning)."""

    def forward(self, skips):
        lres = skips[-1]
        outputs = []
        for s, (up, stage) in enumerate(zip(self.transpconvs, self.stages)):
            lres = stage(torch.cat((up(lres), skips[-(s + 2)]), 1))
            if self.deep_supervision or s == len(self.stages) - 1:
                outputs.append(self.seg_layers[s](lres))
        outputs = outputs[::-1]
        return (outputs if self.deep_supervision else outputs[0]), lres


def _per_sample_mean(values: torch.Tensor, weight: torch.Tensor) -> torch.Tensor:
    """(B,) mean of ``values`` (B, c, *s) per sample over the voxels where ``weight`` (B, 1, *s) is 1."""
    w = weight.expand_as(values)
    return (values * w).flatten(1).sum(1) / w.flatten(1).sum(1).clamp_min(1)


def _area_pool(x: torch.Tensor, size) -> torch.Tensor:
    """Average-pool a (B, 1, *s) map to ``size`` (2D or 3D)."""
    pool = F.adaptive_avg_pool2d if x.dim() == 4 else F.adaptive_avg_pool3d
    return pool(x, tuple(size))


def expert_disagreement(expert_probs: torch.Tensor, mask: torch.Tensor | None = None) -> torch.Tensor:
    """Largest pairwise total-variation distance between M expert predictions (B, M, C, *s) -> (B, 1, *s),
    over pairs of present experts (``mask`` (B, M), 1 = present)."""
    m = expert_probs.shape[1]
    if m < 2:
        return torch.zeros_like(expert_probs[:, 0, :1])
    a = torch.ones(expert_probs.shape[:2], device=expert_probs.device) if mask is None else mask.float()
    ones = (1,) * (expert_probs.dim() - 2)
    d = [0.5 * (expert_probs[:, i] - expert_probs[:, j]).abs().sum(1, keepdim=True) * (a[:, i] * a[:, j]).view(-1, *ones)
         for i in range(m) for j in range(i + 1, m)]
    return torch.stack(d, 0).amax(0)


#: measures of the experts' conflict ``d`` (see the module docstring)
CONFLICT_MEASURES = {"jsd": expert_conflict, "tv": expert_disagreement}


class EnTrustUNet(nn.Module):
    def __init__(self, input_channels: int, n_stages: int, features_per_stage, conv_op, kernel_sizes, strides,
                 n_conv_per_stage, num_classes: int, n_conv_per_stage_decoder, conv_bias: bool = False,
                 norm_op=None, norm_op_kwargs: dict | None = None, dropout_op=None,
                 dropout_op_kwargs: dict | None = None, nonlin=None, nonlin_kwargs: dict | None = None,
                 deep_supervision: bool = False, nonlin_first: bool = False,
                 num_hypotheses: int = DEFAULT_SAMPLING.num_hypotheses, sampling_steps: int = DEFAULT_SAMPLING.steps,
                 independence: str = "xcov", min_modality_width: int = 8,
                 segdiff_hidden: int = 16, segdiff_t_start: float = 0.5, probe_strength: float = 1.0,
                 probe_hypotheses: int = 2, sampling_chunk: int = 4, segdiff_rank: int = 10,
                 segdiff_mc_samples: int = 20, segdiff_cov_penalty: float = 0.002, conflict_measure: str = "jsd",
                 num_modalities: int | None = None, expert_alternatives: float = 2.0):
        super().__init__()
        features_per_stage, kernel_sizes = ([v] * n_stages if isinstance(v, int) else v
                                            for v in (features_per_stage, kernel_sizes))
        m = self.num_modalities = input_channels if num_modalities is None else num_modalities
        if not 1 <= m <= input_channels:
            raise ValueError(f"num_modalities must be in 1..input_channels ({input_channels}), got {num_modalities}")
        #: channels after the modalities: the cascade's one-hot segmentation of the previous stage
        self.prior_channels = input_channels - m
        self.num_classes = num_classes
        #: the sampling settings :meth:`forward` uses at inference (and :meth:`sample` when given none)
        self.sampling = SamplingSettings(num_hypotheses, sampling_steps)
        self.probe_strength = probe_strength
        self.probe_hypotheses = probe_hypotheses
        self.sampling_chunk = sampling_chunk
        #: strength of the expert alternatives (:mod:`entrust_nnunet.model.alternatives`); 0 = SegDiff's alone
        self.expert_alternatives = expert_alternatives
        self.encoders = ModalityEncoders(m, n_stages, features_per_stage, conv_op, kernel_sizes, strides,
                                         n_conv_per_stage, conv_bias, norm_op, norm_op_kwargs, dropout_op,
                                         dropout_op_kwargs, nonlin, nonlin_kwargs, min_width=min_modality_width)
        if n_stages < 2:
            raise ValueError("EnTrustUNet needs at least two resolution stages")
        if conflict_measure not in CONFLICT_MEASURES:
            raise ValueError(f"conflict_measure must be one of {sorted(CONFLICT_MEASURES)}, got {conflict_measure!r}")
        self.conflict_measure = CONFLICT_MEASURES[conflict_measure]
        widths = self.encoders.widths
        conv_op = pointwise_conv(conv_op)  # our mostly-1x1 heads, not nnU-Net's blocks (model/pointwise.py)
        self.fuse_full = nn.Sequential(conv_op(m * widths[0] + 1 + self.prior_channels, features_per_stage[0], 1),
                                       norm_op(features_per_stage[0], **(norm_op_kwargs or {})),
                                       nonlin(**(nonlin_kwargs or {})))
        self.fuse = nn.ModuleList(
            EnFuse(m, w, f, conv_op, norm_op, norm_op_kwargs, nonlin, nonlin_kwargs, independence)
            for w, f in zip(widths[1:], features_per_stage[1:]))
        self.decoder = FeatureUNetDecoder(self.encoders.decoder_spec(features_per_stage), num_classes, n_conv_per_stage_decoder, deep_supervision,
                                          nonlin_first=nonlin_first)
        self.prior = nn.ModuleList(conv_op(self.prior_channels, f, 1) for f in features_per_stage[1:]) \
            if self.prior_channels else None
        self._build_experts(conv_op, widths[1], num_classes)
        self.segdiff = SegDiffHead(conv_op, num_classes, features_per_stage[0] + 1, segdiff_hidden,
                                   t_start=segdiff_t_start, rank=segdiff_rank, mc_samples=segdiff_mc_samples,
                                   cov_penalty=segdiff_cov_penalty)
        self.calib = CalibHead(conv_op, num_classes=num_classes)
        #: region outputs (one sigmoid per channel, nnU-Net's region-based training) instead of one softmax;
        #: a buffer, so checkpoints carry it and a network built for prediction reads it from the weights
        self.register_buffer("region_outputs", torch.zeros(()))
        self.regions = False
        #: when True, forward() keeps its intermediate parts in ``last_parts`` for :class:`EnTrustLoss` and returns
        #: the head's logits; the trainer sets it around its train and validation steps only
        self.cache_parts = False
        self.last_parts: dict | None = None

    def _build_experts(self, conv_op, width: int, num_classes: int) -> None:
        """The per-modality experts (one 1x1 head per modality's stage-1 features) and CLoE's parts: the region
        map r from their averaged shallow features and the consistency gate's reliability weights."""
        m = self.num_modalities
        self.experts = conv_op(m * width, m * num_classes, 1, groups=m)
        self.region = RegionProjection(conv_op, width)
        self.reliability = ConsistencyGate()
        #: modality mask (M,) or (B, M), 1 = present, for the next forward passes; None = all present. An
        #: attribute because nnU-Net's train_step and sliding window call ``network(x)`` only: the trainer
        #: (modality dropout) and the predictor (absent channel files) set it around their calls
        self.modality_mask = None

    #: :meth:`sample` draws ``num_hypotheses`` hypotheses (the predictor sizes its outputs by it)
    samples_hypotheses = True
    #: ProbeStep's standard normal noise for the last patch shape (key, tensor), set per instance: every patch of a
    #: case, and every case, draws the same seeded noise, so it is drawn once (docs/design.md, ProbeStep's cost)
    _probe_noise: tuple | None = None
    #: state-dict keys that checkpoints written before they existed may lack (they load as 0: label outputs)
    optional_weights = ("region_outputs", "calib.conflict_bias", "calib.showing_reading")

    @property
    def conflict_reading(self) -> str:
        """How the hypotheses read the experts where they conflict (:data:`READINGS`), as CalibHead's fit chose."""
        return READINGS[int(float(self.calib.showing_reading) > 0.5)]

    def use_regions(self, regions: bool) -> "EnTrustUNet":
        """Switch the output space: ``True`` for nnU-Net's regions (a sigmoid per channel; every EnTrust part
        then works per region, see :mod:`entrust_nnunet.model.outputs`), ``False`` for labels (softmax)."""
        self.regions = bool(regions)
        self.segdiff.regions = self.regions
        self.region_outputs.fill_(float(self.regions))
        return self

    def _load_from_state_dict(self, state_dict, prefix, local_metadata, strict, missing_keys, unexpected_keys,
                              error_msgs):
        # checkpoints from before region support hold label outputs (0) instead of failing
        for name in self.optional_weights:
            state_dict.setdefault(prefix + name, torch.zeros_like(self.get_buffer(name)))
        super()._load_from_state_dict(state_dict, prefix, local_metadata, strict, missing_keys, unexpected_keys,
                                      error_msgs)
        self.use_regions(bool(self.region_outputs))

    def initialize(self, module: nn.Module) -> None:
        """nnU-Net's He initialisation (``network.apply(network.initialize)``), then SegDiff's start head is put
        back to its near-deterministic start (``apply`` visits a module after its children)."""
        InitWeights_He(1e-2)(module)
        if isinstance(module, SegDiffHead):
            module.reset_start()

    # ------------------------------------------------------------------ forward
    def forward(self, x: torch.Tensor, return_parts: bool = False, modality_mask=None):
        parts = self._trunk(x, keep_all=return_parts or self.cache_parts, mask=self._mask(x, modality_mask))
        logits = parts["logits"]
        if not (return_parts or self.cache_parts):
            if self.training or self.decoder.deep_supervision:
                return logits
            experts = self._full_resolution_experts(parts, x.shape[2:]) if self.expert_alternatives > 0 else None
            mean = self._mean_probabilities(logits, self.segdiff.condition(parts["cond"]), experts,
                                            self.sampling.num_hypotheses, self.sampling.steps)
            # labels: CalibHead's fitted class calibration, so stock nnU-Net's probabilities and masks are the
            # calibrated ones too; regions keep their sigmoids (the temperature is a softmax's, docs/design.md)
            conflict = None if experts is None else experts["conflict"]
            return (as_logits(mean, True) if self.regions
                    else self.calibrated_log_probabilities(mean, conflict)).to(logits.dtype)
        if self.cache_parts:
            self.last_parts = parts
        return parts if return_parts else logits

    def calibrated_log_probabilities(self, mean: torch.Tensor, conflict: torch.Tensor | None = None, axis: int = 1
                                     ) -> torch.Tensor:
        """Logits of the calibrated class probabilities (labels): ``log mean / T + g b`` with CalibHead's fitted T
        and conflict biases b, ``g`` the expert alternatives' gate of the experts' ``conflict`` (class axis kept
        as size 1; None: g = 0). Their argmax is the mask."""
        gate = None if conflict is None else alternatives_gate(conflict, self.expert_alternatives)
        return calibrated_log_probabilities(mean, self.calib.temperature, gate, self.calib.conflict_bias, axis)

    def mask_confidence(self, mean: torch.Tensor, conflict: torch.Tensor) -> torch.Tensor:
        """(B, *s) probability of the mask's decision, CalibHead's ``confidence``: the top calibrated class
        probability (labels; the mask is their argmax), the regions' :func:`decision_confidence` of ``mean``."""
        if self.regions:
            return decision_confidence(mean, True)
        return torch.softmax(self.calibrated_log_probabilities(mean, conflict), 1).amax(1)

    def _mask(self, x: torch.Tensor, modality_mask=None) -> torch.Tensor:
        """The (B, M) float modality mask of this call: ``modality_mask``, else :attr:`modality_mask`."""
        mask = self.modality_mask if modality_mask is None else modality_mask
        return resolve_mask(mask, x.shape[0], self.num_modalities, x.device)

    def _experts(self, skips: list[torch.Tensor], mask: torch.Tensor) -> dict:
        """Per-modality experts, their conflict ``d`` among the present ones, CLoE's region logit and the
        reliability ``weights`` (B, M) of the present experts (the gate reads the experts detached: MEC/REC
        and the experts' own loss train them, the fusion's loss trains the gate)."""
        experts = self.expert_probabilities(skips)
        region_logit = self.region(skips[1], mask)
        weights = self.reliability(experts.detach(), torch.sigmoid(region_logit.detach().float()), mask)
        return {"experts": experts, "region_logit": region_logit, "weights": weights,
                "disagreement": self.expert_conflict(experts, mask)}

    def _trunk(self, x: torch.Tensor, keep_all: bool, mask: torch.Tensor) -> dict:
        """ModEnc -> EnFuse -> decoder. Returns ``logits``, ``conflict`` and ``cond`` (SegDiff's conditioning:
        decoder features at full resolution and the conflict map); with ``keep_all`` also every
        intermediate part the EnTrust losses need. Without it, each stage's modality features and fusion
        parts are dropped as soon as they are fused, so that inference holds no more than the decoder's
        inputs (as plain nnU-Net holds its skips). Absent modalities (``mask`` (B, M) = 0) are removed from
        the input, from EnFuse's means and gates and, at full resolution, their streams are replaced by the
        reliability-weighted mean of the present ones. Channels after the modalities are the cascade prior."""
        x, prior = x[:, :self.num_modalities], x[:, self.num_modalities:]
        # every modality present (inference, most training samples): the masking below is the identity; skipping
        # it saves full-resolution passes (docs/design.md, the cost of K = 1)
        partial = None if bool(mask.all()) else mask
        skips = self.encoders(x if partial is None else without_absent(x, mask))
        ex = self._experts(skips, mask)
        d, weights = ex["disagreement"], ex["weights"]
        full, streams = skips[0], skips[1:]
        kept = {"skips": skips, **ex, "modality_mask": mask, "fused": []} if keep_all else {}
        del skips
        f_en, conflict = [], None
        for i, fuse in enumerate(self.fuse):
            p = fuse(streams[i], _area_pool(d, streams[i].shape[3:]), partial, weights)
            streams[i] = None
            f_en.append(self._add_prior(p["F_en"], prior, i))
            if conflict is None:
                conflict = self._upsample(p["F_cf"], full.shape[3:])
            if keep_all:
                kept["fused"].append(p)
            del p
        streams_full = full if partial is None else impute_absent(full, mask, weights)
        del full
        f_en.insert(0, self.fuse_full(torch.cat([streams_full.flatten(1, 2), conflict, prior.to(streams_full.dtype)],
                                                1)))
        # the M full-resolution streams are fused: not held through the decoder (its peak; plain nnU-Net holds one
        # skip there, we would hold both)
        del streams_full
        logits, features = self.decoder(f_en)
        del f_en
        return {**kept, "logits": logits, "conflict": conflict, "expert_conflict": d, "experts": ex["experts"],
                "modality_mask": mask, "cond": torch.cat([features, conflict], 1)}

    def _add_prior(self, f_en: torch.Tensor, prior: torch.Tensor, stage: int) -> torch.Tensor:
        """EnFuse's output of ``stage`` (0 = the first below full resolution) plus the cascade prior's projection."""
        if self.prior is None:
            return f_en
        return f_en + self.prior[stage](_area_pool(prior, f_en.shape[2:]).to(f_en.dtype))

    @staticmethod
    def _upsample(x: torch.Tensor, size) -> torch.Tensor:
        return F.interpolate(x, size=tuple(size), mode="bilinear" if x.dim() == 4 else "trilinear", align_corners=False)

    def expert_probabilities(self, skips: list[torch.Tensor]) -> torch.Tensor:
        """(B, M, C, *s1) probabilities of the per-modality experts at stage-1 resolution (softmax over C, or a
        sigmoid per region channel)."""
        s1 = skips[1]
        b, m = s1.shape[:2]
        return probabilities(self.experts(s1.flatten(1, 2)).reshape(b, m, self.num_classes, *s1.shape[3:]),
                             self.regions, axis=2)

    def expert_conflict(self, experts: torch.Tensor, mask: torch.Tensor | None = None) -> torch.Tensor:
        """The experts' conflict ``d`` (B, 1, *s) in [0, 1] among the present ones (``mask`` (B, M)). For regions
        each channel is a two-class distribution ``(p_r, 1 - p_r)``; ``d`` is the largest over regions of the
        per-region measure."""
        if not self.regions:
            return self.conflict_measure(experts, mask)
        b, m, r = experts.shape[:3]
        pairs = torch.stack([experts, 1 - experts], 3).transpose(1, 2).flatten(0, 1)  # (B * R, M, 2, *s)
        mask = None if mask is None else mask.repeat_interleave(r, 0)
        return self.conflict_measure(pairs, mask).unflatten(0, (b, r)).amax(1)

    def auxiliary_losses(self, parts: dict, target: torch.Tensor, valid: torch.Tensor | None = None
                         ) -> dict[str, torch.Tensor]:
        """EnTrust's terms beside nnU-Net's Dice+CE, at full resolution, for ``target``: integer labels
        (B, 1, *s), or with :meth:`use_regions` region membership (B, C, *s) in {0, 1}. ``valid`` (B, 1, *s,
        bool): voxels that count (False where nnU-Net's ignore label is); every term below skips the others.

        start: SegDiff's start likelihood (SSN, M samples, around the detached deterministic logits, its mean);
        generative: SegDiff flow-matching loss (both on detached conditioning: they train SegDiff alone);
        independence: mean EnFuse penalty over stages;
        experts: mean cross-entropy of the per-modality experts (stage-1 resolution); conflict: BCE
        of F_cf (every EnFuse stage, target area-pooled) against the experts' detached conflict ``d``,
        each cell weighted by its share of valid voxels.
        """
        # SegDiff learns the distribution around what the trunk and head give, without reshaping them: its losses
        # see detached conditioning and logits (with its own gradient clip, nnunet/clipping.py; docs/design.md)
        cond_h = self.segdiff.condition(parts["cond"].detach())
        logits = full_resolution(parts["logits"]).detach()
        segdiff = self.segdiff.losses(cond_h, target, logits, valid=valid)
        independence = torch.stack([f.independence_penalty(p) for f, p in zip(self.fuse, parts["fused"])]).mean()
        disagreement = parts["disagreement"].detach().float()
        conflict = []
        for p in parts["fused"]:
            size = p["F_cf_logit"].shape[2:]
            bce = F.binary_cross_entropy_with_logits(p["F_cf_logit"].float(), _area_pool(disagreement, size),
                                                     reduction="none")
            weight = None if valid is None else _area_pool(valid.float(), size)
            conflict.append(bce.mean() if weight is None else (bce * weight).sum() / weight.sum().clamp_min(1e-6))
        return {**segdiff, "independence": independence, **self._expert_losses(parts, target, valid),
                "conflict": torch.stack(conflict).mean()}

    def _expert_losses(self, parts: dict, target: torch.Tensor, valid: torch.Tensor | None) -> dict[str, torch.Tensor]:
        """experts: cross-entropy (per region: binary) of the PRESENT experts on the valid voxels at their (stage-1)
        resolution, averaged; mec / rec: CLoE's consistency of the present experts on their maps / on maps weighted
        by the region map r (detached: r learns where the structure is from ``region``, not to hide
        disagreement); region: BCE of r's logit against the foreground (any region), on the valid voxels."""
        probs, mask = parts["experts"], parts["modality_mask"]
        size = probs.shape[3:]
        # nnU-Net's deep-supervision targets are nearest-downsampled the same way
        tgt = F.interpolate(target.float(), size=size, mode="nearest")
        ok = torch.ones_like(tgt[:, :1]) if valid is None else (F.interpolate(valid.float(), size=size) > 0.5).float()
        ce = torch.stack([_per_sample_mean(self._expert_ce(probs[:, m], tgt), ok) for m in range(probs.shape[1])], 1)
        region_logit = parts["region_logit"].float()
        r = torch.sigmoid(region_logit).detach().unsqueeze(1)
        foreground = (tgt.amax(1, keepdim=True) > 0).float()
        region = F.binary_cross_entropy_with_logits(region_logit, foreground, reduction="none")
        return {"experts": (ce * mask).sum() / mask.sum(), "mec": consistency_loss(probs, mask),
                "rec": consistency_loss(probs * r, mask), "region": masked_mean(region, ok > 0)}

    def _expert_ce(self, p: torch.Tensor, tgt: torch.Tensor) -> torch.Tensor:
        """(B, 1 or R, *s) cross-entropy of one expert's probabilities ``p`` against the downsampled target."""
        if self.regions:
            return F.binary_cross_entropy(p.clamp(1e-6, 1 - 1e-6), tgt, reduction="none")
        return F.nll_loss(p.clamp_min(1e-6).log(), tgt[:, 0].long(), reduction="none")[:, None]

    # ------------------------------------------------------------------ inference
    def _segdiff_hypotheses(self, logits: torch.Tensor, cond_h: torch.Tensor, k: int, s: int, seed: int = 0,
                            hidden: torch.Tensor | None = None) -> torch.Tensor:
        """SegDiff's K hypotheses (K, B, C, *s) from its projected conditioning ``cond_h``
        (``segdiff.condition``): the start around the deterministic logits, then S flow steps. ``hidden``: the
        start's covariance features of ``cond_h`` (``segdiff.start_hidden``) when already computed."""
        return self.segdiff.sample(cond_h, k, s, seed=seed, logits=logits, chunk=self.sampling_chunk, hidden=hidden)

    def _segdiff_mean(self, logits: torch.Tensor, cond_h: torch.Tensor, s: int,
                      hidden: torch.Tensor | None = None) -> torch.Tensor | None:
        """The expectation of :meth:`_segdiff_hypotheses` (B, C, *s) where it is known: SegDiff's start at
        S = 0; None after flow steps (the hypotheses' average stands for it then)."""
        return self.segdiff.start_mean(cond_h, logits, hidden) if s == 0 else None

    def _mean_probabilities(self, logits: torch.Tensor, cond_h: torch.Tensor, experts: dict | None, k: int, s: int,
                            seed: int = 0, hyps: torch.Tensor | None = None,
                            hidden: torch.Tensor | None = None) -> torch.Tensor:
        """The class probabilities (B, C, *s) every map is made of: the hypotheses' expectation where the sampler
        knows it (:meth:`_segdiff_mean`, followed by the experts' expected readings where they conflict), else the
        average of the K hypotheses ``hyps`` (drawn here when not given)."""
        expected = self._segdiff_mean(logits, cond_h, s, hidden)
        if expected is None:
            return (self._hypotheses(logits, cond_h, k, s, seed, experts) if hyps is None else hyps).float().mean(0)
        if experts is None or self.expert_alternatives <= 0:
            return expected
        return expected_alternative(expected, experts["experts"], experts["conflict"], experts["mask"],
                                    self.expert_alternatives, self.conflict_reading, self.regions, experts.get("split"),
                                    experts.get("whole"))

    def _probe_direction(self, cond: torch.Tensor, seed: int) -> torch.Tensor:
        """ProbeStep's perturbation direction in SegDiff's projected conditioning (B, hidden, *s): a draw of
        ``W_proj (std(cond) * xi)`` (:func:`~entrust_nnunet.model.trustmap.projected_perturbation`) from
        standard normal noise seeded with ``seed + 1``, the same for every patch of one shape."""
        weight = self.segdiff.cond_proj.weight.flatten(1)
        shape = (cond.shape[0], weight.shape[0], *cond.shape[2:])
        key = (shape, cond.dtype, cond.device, int(seed))
        if self._probe_noise is None or self._probe_noise[0] != key:
            # drawn on the CPU, as the latents: the same seed gives the same probe on every device
            gen = torch.Generator().manual_seed(int(seed) + 1)
            noise = torch.randn(shape, generator=gen).to(device=cond.device, dtype=cond.dtype)
            self._probe_noise = (key, noise)
        return projected_perturbation(weight, channel_std(cond), self._probe_noise[1])

    def _full_resolution_experts(self, parts: dict, size) -> dict[str, torch.Tensor]:
        """The trunk's experts upsampled once per patch: ``experts`` (B, M, C, *size), their ``conflict``
        (B, 1, *size) in [0, 1] and the modality ``mask`` (B, M)."""
        experts = parts["experts"].float()
        # in place: the upsampled copies are new tensors (a full-resolution allocation less, docs/design.md)
        return {"experts": self._upsample(experts.flatten(1, 2), size).unflatten(1, experts.shape[1:3]).clamp_(0, 1),
                "conflict": self._upsample(parts["expert_conflict"].float(), size).clamp_(0, 1),
                "mask": parts["modality_mask"]}

    def _alternatives(self, hyps: torch.Tensor, experts: dict | None, drawn: bool = False) -> torch.Tensor:
        """SegDiff's hypotheses (K, B, C, *s) following their modality's expert where the experts conflict
        (:func:`~entrust_nnunet.model.alternatives.expert_alternatives`): ``drawn`` one whole-case reading of the
        expert per hypothesis (the masks written as hypotheses), else its expectation (the mean and every map:
        the same mean without the few draws' Monte-Carlo noise)."""
        if experts is None or self.expert_alternatives <= 0:
            return hyps
        return expert_alternatives(hyps, experts["experts"], experts["conflict"], experts["mask"],
                                   self.expert_alternatives, self.regions, drawn=drawn, reading=self.conflict_reading,
                                   split=experts.get("split"), whole=experts.get("whole"))

    def _hypotheses(self, logits: torch.Tensor, cond_h: torch.Tensor, k: int, s: int, seed: int = 0,
                    experts: dict | None = None) -> torch.Tensor:
        """K SegDiff hypotheses (K, B, C, *s) given the deterministic logits (the start's mean) and projected
        conditioning;
        with the full-resolution ``experts`` (:meth:`_full_resolution_experts`), each then follows its
        modality's expert in expectation where the experts conflict (:meth:`_alternatives`)."""
        return self._alternatives(self._segdiff_hypotheses(logits, cond_h, k, s, seed), experts)

    @torch.no_grad()
    def sample(self, x: torch.Tensor, settings: SamplingSettings | None = None,
               modality_mask=None, maps: Collection[str] | None = None) -> dict[str, torch.Tensor]:
        """Encoders + EnFuse + decoder once, then K hypotheses x S steps through the SegDiff head.

        ``settings`` default to the network's own (:attr:`sampling`). Returns ``hypotheses`` (K, B, C, *s; each
        with its drawn expert reading where the experts conflict; with ``settings.hypotheses`` off their
        expectations), ``mean`` (B, C, *s; with the readings'
        expectation, as every map) and the maps (B, *s): ``entropy`` (of the mean, nats), ``aleatoric`` (= entropy:
        within one model the hypotheses' spread is aleatoric), ``epistemic`` (0 within one model; the
        predictor's fold pooling makes it the folds' disagreement), ``spread`` (the hypotheses' share of the
        entropy), ``probe``, ``conflict`` (the experts' normalised Jensen-Shannon divergence, upsampled),
        ``fusion_conflict`` (EnFuse's F_cf), ``confidence`` (max of the calibrated class probabilities,
        :meth:`calibrated_log_probabilities`, whose argmax is the mask), ``head_confidence`` (max softmax of the
        deterministic head) and ``error`` (CalibHead's probability that the mask is wrong). See
        :mod:`entrust_nnunet.model.trustmap`. ``modality_mask``: as in :meth:`forward`. ``maps``:
        the maps wanted beside ``mean`` (default: every one, and ``hypotheses``); the predictor asks for those it
        pools per patch, so ``error`` (CalibHead runs once per case on the pooled maps) and ``spread`` are then
        not computed, and for ``hypotheses`` only when it writes them: without them (and at S = 0, where the mean
        is the start's expectation) only the hypotheses ProbeStep redraws are drawn, not K (the same maps: the
        hypotheses are nested across K).
        """
        wanted = (lambda key: True) if maps is None else set(maps).__contains__
        settings = settings or self.sampling
        k, s, seed = settings.num_hypotheses, settings.steps, settings.seed
        parts = self._trunk(x, keep_all=False, mask=self._mask(x, modality_mask))
        logits = full_resolution(parts["logits"])

        experts = self._full_resolution_experts(parts, x.shape[2:])
        cond_h = self.segdiff.condition(parts["cond"])
        hidden = self.segdiff.start_hidden(cond_h)  # once: the draws and their expectation both start from it
        p = min(k, self.probe_hypotheses) if settings.probe else 0
        # K draws only where something reads them: the hypotheses themselves, their spread, or their average as the
        # mean (after flow steps); otherwise ProbeStep's first p (docs/design.md, "K = 8 at the cost of K = 1")
        drawn = k if (wanted("hypotheses") or wanted("spread") or s > 0) else p
        segdiff = self._segdiff_hypotheses(logits, cond_h, drawn, s, seed, hidden) if drawn else None
        hyps = self._alternatives(segdiff, experts) if drawn else None
        # the class probabilities and every map from the sampler's expectation, not K draws' Monte-Carlo average
        # (docs/design.md, "Maps from the start's expectation")
        mean = self._mean_probabilities(logits, cond_h, experts, k, s, seed, hyps, hidden)
        stats = hypothesis_statistics(mean[None] if hyps is None else hyps, self.regions, spread=wanted("spread"),
                                      mean=mean)
        # the experts' conflict itself, not F_cf, its learned copy: it separates conflict from edges better
        # (docs/design.md)
        conflict = experts["conflict"]
        stats["conflict"], stats["fusion_conflict"] = conflict[:, 0], parts["conflict"].float()[:, 0].clamp(0, 1)
        # ProbeStep redraws only the first few hypotheses (same noise: hypotheses are nested across K)
        stats["probe"] = (probe_step(lambda moved: self._hypotheses(logits, moved, p, s, seed, experts), cond_h,
                                     self._probe_direction(parts["cond"], seed), conflict, hyps[:p],
                                     self.probe_strength, self.regions) if settings.probe
                          else torch.zeros_like(stats["entropy"]))
        if wanted("confidence") or wanted("error"):  # the predictor takes it from the pooled mean, once per case
            stats["confidence"] = self.mask_confidence(stats["mean"], conflict)
        stats["head_confidence"] = decision_confidence(probabilities(logits, self.regions), self.regions)
        if wanted("error"):
            stats["error"] = torch.maximum(self.calib(stats), alternatives_error_floor(
                stats["confidence"], stats["conflict"], self.expert_alternatives))
        if wanted("hypotheses"):
            stats["hypotheses"] = self._alternatives(segdiff, experts, drawn=True) if settings.hypotheses else hyps
        return stats

    def compute_conv_feature_map_size(self, input_size) -> int:
        """Activation estimate nnU-Net's planner compares against its reference (same convention as PlainConvUNet)."""
        total = self.encoders.compute_conv_feature_map_size(input_size)
        size = [i // j for i, j in zip(input_size, self.encoders.strides[0])]
        m = self.num_modalities
        total += int(torch.tensor(size).prod()) * (1 + self.fuse_full[0].out_channels)
        for stride, fuse in zip(self.encoders.strides[1:], self.fuse):
            size = [i // j for i, j in zip(size, stride)]
            w = fuse.E_c.expand.in_channels
            # outputs of E_c and E_u (M streams, two convs each), D_cf, gates and the fused output, per voxel
            total += int(torch.tensor(size).prod()) * (4 * m * w + fuse.D_cf[0].out_channels + 3 * w + m + 2
                                                       + fuse.out[0].out_channels)
        total += int(self.decoder.compute_conv_feature_map_size(input_size))
        total += self.segdiff.compute_conv_feature_map_size(input_size)
        return int(total)
