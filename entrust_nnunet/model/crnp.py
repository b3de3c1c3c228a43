"""Cross-modal random network prediction (CRNP) as an nnU-Net network: the CRNP uncertainty baseline.

Built from the arch kwargs nnU-Net's planner writes for PlainConvUNet (plus CRNP options); ``forward``
returns what PlainConvUNet returns; ``sample_statistics`` gives the maps ``entrust predict`` pools.
The trainer and its alternating loss live in ``entrust_nnunet.nnunet.baseline_trainers``.
"""
from __future__ import annotations

import numpy as np
import torch
from dynamic_network_architectures.building_blocks.helper import convert_conv_op_to_dim
from dynamic_network_architectures.building_blocks.unet_decoder import UNetDecoder
from dynamic_network_architectures.initialization.weight_init import InitWeights_He
from torch import nn
from torch.nn import functional as F

from entrust_nnunet.model.encoders import ModalityEncoders
from entrust_nnunet.model.outputs import full_resolution
from entrust_nnunet.model.trustmap import entropy


def _conv_block(conv_op, cin: int, cout: int, kernel_size, nonlin, nonlin_kwargs) -> list[nn.Module]:
    k = [kernel_size] * convert_conv_op_to_dim(conv_op) if isinstance(kernel_size, int) else list(kernel_size)
    return [conv_op(cin, cout, k, padding=[(i - 1) // 2 for i in k]), nonlin(**(nonlin_kwargs or {}))]


class RandomNetworkPair(nn.Module):
    """One modality's random network prediction pair on its bottleneck features h (B, w, *s).

    ``target`` g: conv k (w -> 2r) - nonlin - conv k (2r -> 2r) - nonlin - conv 1 (2r -> r), randomly
    initialised and frozen (``requires_grad=False``; its weights are parameters, so they are in the
    state dict and travel with the checkpoint). ``predictor`` f, smaller and trained:
    conv k (w -> r) - nonlin - conv 1 (r -> r). ``forward`` gives the per-voxel error
    ``e = (1/r) sum_c (f(h) - g(h))_c^2`` (B, *s).
    """

    def __init__(self, conv_op, width: int, rnp_width: int, kernel_size, nonlin, nonlin_kwargs):
        super().__init__()
        r = rnp_width
        self.target = nn.Sequential(*_conv_block(conv_op, width, 2 * r, kernel_size, nonlin, nonlin_kwargs),
                                    *_conv_block(conv_op, 2 * r, 2 * r, kernel_size, nonlin, nonlin_kwargs),
                                    conv_op(2 * r, r, 1))
        self.predictor = nn.Sequential(*_conv_block(conv_op, width, r, kernel_size, nonlin, nonlin_kwargs),
                                       conv_op(r, r, 1))
        self.target.requires_grad_(False)

    def forward(self, h: torch.Tensor) -> torch.Tensor:
        with torch.no_grad():
            t = self.target(h)
        return (self.predictor(h) - t).float().pow(2).mean(1)


class CRNPUNet(nn.Module):
    """Cross-modal random network prediction U-Net, built from PlainConvUNet's arch kwargs (+ CRNP options).

    With ``h_m`` (B, w_L, *s_L) modality m's bottleneck features (one :class:`ModalityEncoders`
    encoder per input channel), ``sg`` stop-gradient, M modalities:

    1. error: ``e_m = RandomNetworkPair_m(sg(h_m))`` = (1/r) sum_c (f_m(sg h_m) - g_m(sg h_m))_c^2 per voxel;
       ``sg`` keeps the RNP loss out of the encoders, and the fusion below uses ``sg(e)``, so the
       segmentation loss never trains the predictors: f_m learns only from its RNP loss, ``mean(e_m)``.
    2. normalised error: ``ê_m = e_m / (sigma_m + 1e-6)``, ``sigma_m`` a buffer holding the running mean of
       e_m over training batches (first batch, then EMA with momentum ``rnp_momentum``), so ê ~ 1 on
       familiar features of every modality and > 1 on unfamiliar ones.
    3. fusion weights, per voxel, from the OTHER modalities' errors:
       ``w_n = softmax_n( sum_{m != n} ê_m / tau )`` (tau = ``fusion_temperature``): the more unfamiliar
       the other modalities' features are, the more weight modality n's features get. Because
       ``sum_{m != n} ê_m = sum_m ê_m - ê_n`` and softmax ignores a shared shift, this equals
       ``softmax_n(-ê_n / tau)``. M = 1 gives w = 1.
    4. residual fusion ``b = (1/M) sum_m h_m + sum_m w_m h_m``; 1x1 conv (w_L -> f_L) + norm + nonlin; one pre-norm
       self-attention block over the bottleneck voxels: ``z = b' + MHA(LN(b'))`` (torch.nn.MultiheadAttention,
       no positional encoding: the convolutional features carry position through padding).
    5. skips at stages s < L: the M streams concatenated, 1x1 conv (M w_s -> f_s) + norm + nonlin; then nnU-Net's
       UNetDecoder on [skips..., z] with nnU-Net's widths, so deep supervision works like PlainConvUNet's.

    Conflict map (:meth:`sample_statistics`): ``(max_m ê_m - min_m ê_m) / (max_m ê_m + 1e-6)`` in [0, 1] at the
    bottleneck, up-sampled (bi/trilinear, a convex interpolation, then clamped) to the input size; 0 for M = 1.
    """

    def __init__(self, input_channels: int, n_stages: int, features_per_stage, conv_op, kernel_sizes, strides,
                 n_conv_per_stage, num_classes: int, n_conv_per_stage_decoder, conv_bias: bool = False,
                 norm_op=None, norm_op_kwargs: dict | None = None, dropout_op=None,
                 dropout_op_kwargs: dict | None = None, nonlin=None, nonlin_kwargs: dict | None = None,
                 deep_supervision: bool = False, nonlin_first: bool = False, min_modality_width: int = 8,
                 rnp_width: int = 16, fusion_temperature: float = 1.0, rnp_momentum: float = 0.05,
                 attention_heads: int = 4):
        super().__init__()
        if n_stages < 2:
            raise ValueError("CRNPUNet needs at least two resolution stages")
        if isinstance(features_per_stage, int):
            features_per_stage = [features_per_stage] * n_stages
        if isinstance(kernel_sizes, int):
            kernel_sizes = [kernel_sizes] * n_stages
        nonlin = nonlin or nn.LeakyReLU
        self.num_modalities = m = input_channels
        self.num_classes = num_classes
        self.fusion_temperature = fusion_temperature
        self.rnp_momentum = rnp_momentum
        self.encoders = ModalityEncoders(m, n_stages, features_per_stage, conv_op, kernel_sizes, strides,
                                         n_conv_per_stage, conv_bias, norm_op, norm_op_kwargs, dropout_op,
                                         dropout_op_kwargs, nonlin, nonlin_kwargs, min_width=min_modality_width)
        widths = self.encoders.widths

        def project(cin, cout):
            norm = [norm_op(cout, **(norm_op_kwargs or {}))] if norm_op is not None else []
            return nn.Sequential(conv_op(cin, cout, 1, bias=True), *norm, nonlin(**(nonlin_kwargs or {})))

        self.skip_fusion = nn.ModuleList(project(m * w, f) for w, f in zip(widths[:-1], features_per_stage[:-1]))
        self.rnp = nn.ModuleList(RandomNetworkPair(conv_op, widths[-1], rnp_width, kernel_sizes[-1], nonlin,
                                                   nonlin_kwargs) for _ in range(m))
        self.register_buffer("rnp_scale", torch.ones(m))
        self.register_buffer("rnp_updates", torch.zeros((), dtype=torch.long))
        f_l = features_per_stage[-1]
        self.bottleneck_fusion = project(widths[-1], f_l)
        heads = attention_heads if f_l % attention_heads == 0 else 1
        self.attention_norm = nn.LayerNorm(f_l)
        self.attention = nn.MultiheadAttention(f_l, heads, batch_first=True)
        self.decoder = UNetDecoder(self.encoders.decoder_spec(features_per_stage), num_classes, n_conv_per_stage_decoder, deep_supervision,
                                   nonlin_first=nonlin_first)
        #: when True, training-mode forward() keeps its parts in ``last_parts`` for :class:`CRNPLoss`
        self.cache_parts = False
        self.last_parts: dict | None = None

    initialize = InitWeights_He(1e-2)

    # ------------------------------------------------------------------ forward
    def modality_errors(self, h: torch.Tensor) -> torch.Tensor:
        """RNP errors e (B, M, *s_L) of bottleneck features h (B, M, w_L, *s_L); gradients reach the predictors only."""
        h = h.detach()
        return torch.stack([pair(h[:, i]) for i, pair in enumerate(self.rnp)], 1)

    def normalised_errors(self, e: torch.Tensor) -> torch.Tensor:
        shape = (1, -1) + (1,) * (e.dim() - 2)
        return e.detach() / (self.rnp_scale.view(shape) + 1e-6)

    def fusion_weights(self, e_hat: torch.Tensor) -> torch.Tensor:
        """w (B, M, *s): softmax over modalities of the summed normalised errors of the OTHER modalities."""
        others = e_hat.sum(1, keepdim=True) - e_hat
        return torch.softmax(others / self.fusion_temperature, 1)

    @torch.no_grad()
    def _update_scale(self, e: torch.Tensor) -> None:
        batch = e.detach().float().transpose(0, 1).flatten(1).mean(1)
        if int(self.rnp_updates) == 0:
            self.rnp_scale.copy_(batch)
        else:
            self.rnp_scale.lerp_(batch, self.rnp_momentum)
        self.rnp_updates += 1

    def forward(self, x: torch.Tensor, return_parts: bool = False):
        skips = self.encoders(x)
        h = skips[-1]
        e = self.modality_errors(h)
        if self.training:
            self._update_scale(e)
        e_hat = self.normalised_errors(e)
        w = self.fusion_weights(e_hat)
        fused = h.mean(1) + (w.unsqueeze(2).to(h.dtype) * h).sum(1)
        z = self.bottleneck_fusion(fused)
        tokens = z.flatten(2).transpose(1, 2)
        q = self.attention_norm(tokens)
        tokens = tokens + self.attention(q, q, q, need_weights=False)[0]
        z = tokens.transpose(1, 2).reshape(z.shape)
        logits = self.decoder([f(s.flatten(1, 2)) for f, s in zip(self.skip_fusion, skips[:-1])] + [z])
        if return_parts or (self.cache_parts and self.training):
            parts = {"logits": logits, "errors": e, "normalised_errors": e_hat, "weights": w}
            if self.cache_parts and self.training:
                self.last_parts = parts
            if return_parts:
                return parts
        return logits

    @staticmethod
    def rnp_loss(parts: dict) -> torch.Tensor:
        """The predictors' loss: mean RNP error over batch, modalities and bottleneck voxels (reaches f_m only)."""
        return parts["errors"].mean()

    def conflict(self, e_hat: torch.Tensor, size) -> torch.Tensor:
        """(max_m ê_m - min_m ê_m) / (max_m ê_m + 1e-6) (B, *size), bottleneck map up-sampled to ``size``."""
        if e_hat.shape[1] < 2:
            return torch.zeros((e_hat.shape[0], *size), device=e_hat.device)
        hi, lo = e_hat.float().amax(1, keepdim=True), e_hat.float().amin(1, keepdim=True)
        c = (hi - lo) / (hi + 1e-6)
        mode = "bilinear" if c.dim() == 4 else "trilinear"
        return F.interpolate(c, size=tuple(size), mode=mode, align_corners=False)[:, 0].clamp(0, 1)

    @torch.no_grad()
    def sample_statistics(self, x: torch.Tensor, num_hypotheses: int = 1, seed: int = 0) -> dict[str, torch.Tensor]:
        """One deterministic forward (``num_hypotheses`` and ``seed`` are unused): ``mean`` = softmax of the logits
        (B, C, *s), ``aleatoric`` = its entropy (nats), ``conflict`` = :meth:`conflict` of the normalised RNP errors."""
        parts = self.forward(x, return_parts=True)
        mean = torch.softmax(full_resolution(parts["logits"]).float(), 1)
        return {"mean": mean, "aleatoric": entropy(mean, axis=1),
                "conflict": self.conflict(parts["normalised_errors"], x.shape[2:])}

    def compute_conv_feature_map_size(self, input_size) -> int:
        """Activation estimate in PlainConvUNet's convention (encoders + fusion outputs + decoder)."""
        total = self.encoders.compute_conv_feature_map_size(input_size)
        size = list(input_size)
        for stage, stride in enumerate(self.encoders.strides):
            size = [i // j for i, j in zip(size, stride)]
            n = int(np.prod(size, dtype=np.int64))
            if stage < len(self.skip_fusion):
                total += n * self.skip_fusion[stage][0].out_channels
            else:
                rnp = self.rnp[0].target[0].out_channels
                total += n * self.num_modalities * 3 * rnp + 2 * n * self.bottleneck_fusion[0].out_channels
        return int(total + self.decoder.compute_conv_feature_map_size(input_size))
