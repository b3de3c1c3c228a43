"""EnTrust with one part taken out, for the benchmark's ablations (``benchmarks/run.py --ablations``).

Each is a subclass of :class:`EnTrustUNet` that changes only the part it names, so it trains, calibrates
and predicts through the same trainer, predictor and CalibHead code as EnTrust itself:

* :class:`EnTrustNoEnFuseUNet`: no EnFuse; at every stage below full resolution the M modality streams
  are concatenated and mapped to nnU-Net's width by a 1x1 conv + norm + nonlin (what an early/feature
  concatenation network does). The conflict map is then the per-modality experts' disagreement alone
  (EnFuse's D_cf is what refines it), and there is no independence penalty.
* :class:`EnTrustNoStepsUNet`: no SegDiff steps; the deterministic head only. Its softmax is every
  "hypothesis" before the expert alternatives (so ProbeStep's map = 0); its trainer gives the generative loss weight 0.
* :class:`EnTrustNoAlternativesUNet`: SegDiff's hypotheses alone, never following a modality's expert where
  the experts conflict (:mod:`entrust_nnunet.model.alternatives`).
* :class:`EnTrustNoProbeUNet`: sampling without ProbeStep (its map is 0 for CalibHead, in fitting and
  at inference).

"Without CalibHead" needs no network: a checkpoint whose ``calib.fitted`` buffer is 0 makes the
predictor export ``1 - max probability`` as ``total`` (the benchmark writes such a copy).
"""
from __future__ import annotations

import torch
from torch import nn

from entrust_nnunet.model.absence import impute_absent
from entrust_nnunet.model.network import EnTrustUNet
from entrust_nnunet.model.outputs import probabilities
from entrust_nnunet.model.pointwise import pointwise_conv
from entrust_nnunet.model.sampling import SamplingSettings


class ConcatFuse(nn.Module):
    """EnFuse's interface without EnFuse: (B, M, w, *s) -> ``F_en`` = act(norm(1x1 conv(concat_m H_m))).

    ``F_cf`` is the expert disagreement it is handed (``F_cf_logit`` its logit), and
    :meth:`independence_penalty` is 0, so :meth:`EnTrustUNet.auxiliary_losses` works unchanged (its conflict
    term then has a zero gradient: it compares a map with itself).
    """

    def __init__(self, num_modalities: int, width: int, out_channels: int, conv_op, norm_op,
                 norm_op_kwargs: dict | None, nonlin, nonlin_kwargs: dict | None):
        super().__init__()
        self.out = nn.Sequential(conv_op(num_modalities * width, out_channels, 1),
                                 norm_op(out_channels, **(norm_op_kwargs or {})), nonlin(**(nonlin_kwargs or {})))

    def forward(self, h: torch.Tensor, disagreement: torch.Tensor | None = None, mask: torch.Tensor | None = None,
                weights: torch.Tensor | None = None) -> dict[str, torch.Tensor]:
        if mask is not None:  # absent streams become the present ones' weighted mean (as EnTrust's full resolution)
            h = impute_absent(h, mask, mask / mask.sum(1, keepdim=True) if weights is None else weights)
        f_en = self.out(h.flatten(1, 2))
        d = torch.zeros_like(f_en[:, :1]) if disagreement is None else disagreement.to(f_en.dtype)
        d = d.clamp(1e-4, 1 - 1e-4)
        return {"F_en": f_en, "F_cf": d, "F_cf_logit": torch.logit(d)}

    @staticmethod
    def independence_penalty(parts: dict[str, torch.Tensor]) -> torch.Tensor:
        return parts["F_en"].new_zeros(())


class EnTrustNoEnFuseUNet(EnTrustUNet):
    """EnTrustUNet with every EnFuse replaced by :class:`ConcatFuse` (same arch kwargs)."""

    def __init__(self, input_channels: int, n_stages: int, features_per_stage, conv_op, *args, norm_op=None,
                 norm_op_kwargs: dict | None = None, nonlin=None, nonlin_kwargs: dict | None = None, **kwargs):
        super().__init__(input_channels, n_stages, features_per_stage, conv_op, *args, norm_op=norm_op,
                         norm_op_kwargs=norm_op_kwargs, nonlin=nonlin, nonlin_kwargs=nonlin_kwargs, **kwargs)
        features = [features_per_stage] * n_stages if isinstance(features_per_stage, int) else features_per_stage
        self.fuse = nn.ModuleList(
            ConcatFuse(self.num_modalities, w, f, pointwise_conv(conv_op), norm_op, norm_op_kwargs, nonlin, nonlin_kwargs)
            for w, f in zip(self.encoders.widths[1:], features[1:]))

    def compute_conv_feature_map_size(self, input_size) -> int:
        """Encoders, fused outputs per stage, decoder and SegDiff (PlainConvUNet's convention)."""
        total = self.encoders.compute_conv_feature_map_size(input_size)
        size = [i // j for i, j in zip(input_size, self.encoders.strides[0])]
        total += int(torch.tensor(size).prod()) * (1 + self.fuse_full[0].out_channels)
        for stride, fuse in zip(self.encoders.strides[1:], self.fuse):
            size = [i // j for i, j in zip(size, stride)]
            total += int(torch.tensor(size).prod()) * fuse.out[0].out_channels
        total += int(self.decoder.compute_conv_feature_map_size(input_size))
        return int(total + self.segdiff.compute_conv_feature_map_size(input_size))


class EnTrustNoStepsUNet(EnTrustUNet):
    """EnTrustUNet whose hypotheses are all the deterministic head's softmax (no SegDiff steps)."""

    def _segdiff_hypotheses(self, logits: torch.Tensor, cond_h: torch.Tensor, k: int, s: int, seed: int = 0,
                            hidden: torch.Tensor | None = None) -> torch.Tensor:
        probs = probabilities(logits, self.regions)
        return probs.unsqueeze(0).expand(k, *probs.shape)

    def _segdiff_mean(self, logits: torch.Tensor, cond_h: torch.Tensor, s: int,
                      hidden: torch.Tensor | None = None) -> torch.Tensor:
        """Every hypothesis is the head's softmax, so that is their expectation too."""
        return probabilities(logits, self.regions)


class EnTrustNoAlternativesUNet(EnTrustUNet):
    """EnTrustUNet whose hypotheses are SegDiff's alone (expert alternatives strength 0)."""

    def __init__(self, *args, **kwargs):
        super().__init__(*args, **{**kwargs, "expert_alternatives": 0.0})


class EnTrustNoProbeUNet(EnTrustUNet):
    """EnTrustUNet that always samples without ProbeStep."""

    @torch.no_grad()
    def sample(self, x: torch.Tensor, settings: SamplingSettings | None = None,
               modality_mask=None, maps=None) -> dict[str, torch.Tensor]:
        return super().sample(x, (settings or self.sampling).with_(probe=False), modality_mask, maps)
