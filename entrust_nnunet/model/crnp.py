"""Cross-modal random network prediction (CRNP) as an nnU-Net network: the CRNP uncertainty baseline,
as its paper defines it.

Built from the arch kwargs nnU-Net's planner writes for PlainConvUNet (plus CRNP options); ``forward``
returns what PlainConvUNet returns; ``sample_statistics`` gives the maps ``entrust predict`` pools.
The trainer and its loss (predictor step IN ADDITION to every segmentation update) live in
``entrust_nnunet.nnunet.baseline_trainers``.
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
from entrust_nnunet.model.outputs import full_resolution, probabilities
from entrust_nnunet.model.trustmap import output_entropy

#: the paper's RNP networks: LeakyReLU slope, output width, hidden layers of the random target / the predictor
RNP_SLOPE, RNP_WIDTH, TARGET_HIDDEN_LAYERS, PREDICTOR_HIDDEN_LAYERS = 0.25, 256, 3, 2


def depthwise_net(conv_op, cin: int, hidden: int, cout: int, hidden_layers: int, kernel_size) -> nn.Sequential:
    """A depth-wise convolutional net: ``hidden_layers`` x [depth-wise conv k (groups = channels), 1x1 conv
    -> ``hidden``, LeakyReLU(0.25)], then depth-wise conv k and 1x1 conv -> ``cout`` (no nonlinearity)."""
    k = [kernel_size] * convert_conv_op_to_dim(conv_op) if isinstance(kernel_size, int) else list(kernel_size)
    pad = [(i - 1) // 2 for i in k]
    layers, c = [], cin
    for _ in range(hidden_layers):
        layers += [conv_op(c, c, k, padding=pad, groups=c), conv_op(c, hidden, 1), nn.LeakyReLU(RNP_SLOPE)]
        c = hidden
    layers += [conv_op(c, c, k, padding=pad, groups=c), conv_op(c, cout, 1)]
    return nn.Sequential(*layers)


class RandomNetworkPair(nn.Module):
    """One modality's random network prediction pair on its bottleneck features h (B, w, *s).

    ``target`` f_phi: :func:`depthwise_net` with 3 hidden layers, randomly initialised and frozen
    (``requires_grad=False``; its weights are parameters, so they are in the state dict and travel
    with the checkpoint). ``predictor`` f_psi: the same with 2 hidden layers, trained. Both output
    ``width`` (256) channels. ``forward`` gives the channel-wise squared error
    ``(f_phi(h) - f_psi(h))^2`` (B, width, *s), in float32.
    """

    def __init__(self, conv_op, cin: int, width: int, kernel_size):
        super().__init__()
        self.target = depthwise_net(conv_op, cin, width, width, TARGET_HIDDEN_LAYERS, kernel_size)
        self.predictor = depthwise_net(conv_op, cin, width, width, PREDICTOR_HIDDEN_LAYERS, kernel_size)
        self.target.requires_grad_(False)

    def forward(self, h: torch.Tensor) -> torch.Tensor:
        with torch.no_grad():
            t = self.target(h)
        return (self.predictor(h) - t).float().pow(2)


class CRNPUNet(nn.Module):
    """Cross-modal random network prediction U-Net, built from PlainConvUNet's arch kwargs (+ CRNP options).

    With ``h_q`` (B, w_L, *s_L) modality q's bottleneck features (one :class:`ModalityEncoders` encoder
    per input channel), ``sg`` stop-gradient, M modalities, d = ``rnp_width`` (256):

    1. RNP error per modality, channel-wise: ``e_q = (f_phi_q(sg h_q) - f_psi_q(sg h_q))^2`` (B, d, *s);
       ``sg`` keeps the predictors' loss ``mean(e)`` out of the encoders, and the fusion reads ``sg(e)``,
       so the segmentation loss never trains the predictors.
    2. modality p's uncertainty is the OTHER modalities' error, ``u_p = sum_{q != p} e_q`` (so
       ``||.||^2`` kept per channel), channel-wise normalised: ``û_p,c = u_p,c / sum_{q != p} s_q,c`` with
       ``s`` (M, d) a buffer holding the running mean of ``e_q,c`` over training batches (first batch, then
       EMA with momentum ``rnp_momentum``), i.e. u divided by its own running mean: û ~ 1 where the other
       modalities' features look familiar. M = 1 gives û = 0.
    3. ``x_p = P_p(h_p)``, a per-modality 1x1 conv to d channels, and the residual fusion per modality
       ``x̃_p = x_p + û_p ⊙ x_p``: where the OTHER modalities are unfamiliar, modality p's features count more.
    4. self-attention with Q = K = V = the concatenation of all modalities' x̃ as per-modality tokens
       (B, M * N_L, d): ``z = t + MHA(LN(t))`` (torch.nn.MultiheadAttention, no positional encoding:
       the convolutional features carry position through padding); the M token maps are concatenated
       on channels and a 1x1 conv (M d -> f_L) + norm + nonlin gives the decoder's bottleneck.
    5. skips at stages s < L: the M streams concatenated, 1x1 conv (M w_s -> f_s) + norm + nonlin; then
       nnU-Net's UNetDecoder with nnU-Net's widths, so deep supervision works like PlainConvUNet's.

    Conflict map (:meth:`conflict`): per voxel, the contrast between the most and the least familiar
    modality, ``(max_q ē_q - min_q ē_q) / (max_q ē_q + min_q ē_q)`` in [0, 1] with ``ē_q = mean_c e_q,c / s_q,c``
    modality q's own normalised error; 0 where all modalities are equally (un)familiar, -> 1 where one is
    far less familiar than another. Up-sampled to the input size; 0 for M = 1.
    """

    def __init__(self, input_channels: int, n_stages: int, features_per_stage, conv_op, kernel_sizes, strides,
                 n_conv_per_stage, num_classes: int, n_conv_per_stage_decoder, conv_bias: bool = False,
                 norm_op=None, norm_op_kwargs: dict | None = None, dropout_op=None,
                 dropout_op_kwargs: dict | None = None, nonlin=None, nonlin_kwargs: dict | None = None,
                 deep_supervision: bool = False, nonlin_first: bool = False, min_modality_width: int = 8,
                 rnp_width: int = RNP_WIDTH, rnp_momentum: float = 0.05, attention_heads: int = 4):
        super().__init__()
        if n_stages < 2:
            raise ValueError("CRNPUNet needs at least two resolution stages")
        features_per_stage = [features_per_stage] * n_stages if isinstance(features_per_stage, int) else features_per_stage
        kernel_sizes = [kernel_sizes] * n_stages if isinstance(kernel_sizes, int) else kernel_sizes
        nonlin = nonlin or nn.LeakyReLU
        self.num_modalities = m = input_channels
        self.num_classes = num_classes
        self.rnp_momentum = rnp_momentum
        self.encoders = ModalityEncoders(m, n_stages, features_per_stage, conv_op, kernel_sizes, strides,
                                         n_conv_per_stage, conv_bias, norm_op, norm_op_kwargs, dropout_op,
                                         dropout_op_kwargs, nonlin, nonlin_kwargs, min_width=min_modality_width)
        widths, d = self.encoders.widths, rnp_width

        def project(cin, cout, groups=1):
            norm = [norm_op(cout, **(norm_op_kwargs or {}))] if norm_op is not None else []
            return nn.Sequential(conv_op(cin, cout, 1, bias=True, groups=groups), *norm, nonlin(**(nonlin_kwargs or {})))

        self.skip_fusion = nn.ModuleList(project(m * w, f) for w, f in zip(widths[:-1], features_per_stage[:-1]))
        self.rnp = nn.ModuleList(RandomNetworkPair(conv_op, widths[-1], d, kernel_sizes[-1]) for _ in range(m))
        self.register_buffer("rnp_scale", torch.ones(m, d))
        self.register_buffer("rnp_updates", torch.zeros((), dtype=torch.long))
        self.embed = conv_op(m * widths[-1], m * d, 1, groups=m)  # x_p = P_p(h_p), one 1x1 conv per modality
        heads = attention_heads if d % attention_heads == 0 else 1
        self.attention_norm = nn.LayerNorm(d)
        self.attention = nn.MultiheadAttention(d, heads, batch_first=True)
        self.bottleneck_fusion = project(m * d, features_per_stage[-1])
        self.decoder = UNetDecoder(self.encoders.decoder_spec(features_per_stage), num_classes, n_conv_per_stage_decoder,
                                   deep_supervision, nonlin_first=nonlin_first)
        #: when True, training-mode forward() keeps its parts in ``last_parts`` for :class:`CRNPLoss`
        self.cache_parts = False
        self.last_parts: dict | None = None

    initialize = InitWeights_He(1e-2)

    # ------------------------------------------------------------------ forward
    def modality_errors(self, h: torch.Tensor) -> torch.Tensor:
        """Channel-wise RNP errors e (B, M, d, *s_L) of bottleneck features h (B, M, w_L, *s_L); gradients
        reach the predictors only."""
        h = h.detach()
        return torch.stack([pair(h[:, i]) for i, pair in enumerate(self.rnp)], 1)

    def normalised_errors(self, e: torch.Tensor) -> torch.Tensor:
        """ê (B, M, d, *s) = e / s channel-wise, ``s`` (M, d) the running mean of e per modality and channel (detached)."""
        shape = (1, *self.rnp_scale.shape) + (1,) * (e.dim() - 3)
        return e.detach() / (self.rnp_scale.view(shape) + 1e-6)

    def cross_modal_uncertainty(self, e: torch.Tensor) -> torch.Tensor:
        """û (B, M, d, *s): ``u_p = sum_{q != p} e_q`` (the OTHER modalities' errors, detached), divided channel-wise
        by its running mean ``sum_{q != p} s_q`` (a mean is linear, so that IS the running mean of u_p)."""
        e = e.detach()
        u = e.sum(1, keepdim=True) - e
        scale = self.rnp_scale.sum(0, keepdim=True) - self.rnp_scale
        return u / (scale.view((1, *scale.shape) + (1,) * (e.dim() - 3)) + 1e-6)

    @torch.no_grad()
    def _update_scale(self, e: torch.Tensor) -> None:
        batch = e.detach().float().transpose(0, 2).flatten(2).mean(2).transpose(0, 1)  # (M, d)
        if int(self.rnp_updates) == 0:
            self.rnp_scale.copy_(batch)
        else:
            self.rnp_scale.lerp_(batch, self.rnp_momentum)
        self.rnp_updates += 1

    def fuse(self, h: torch.Tensor, u_hat: torch.Tensor) -> torch.Tensor:
        """Residual fusion per modality and self-attention over per-modality tokens -> (B, f_L, *s_L)."""
        b, m, w = h.shape[:3]
        spatial = h.shape[3:]
        x = self.embed(h.flatten(1, 2)).unflatten(1, (m, -1))           # (B, M, d, *s)
        x = x + u_hat.to(x.dtype) * x                                    # x̃_p = x_p + û_p ⊙ x_p
        tokens = x.flatten(3).permute(0, 1, 3, 2).flatten(1, 2)         # (B, M * N, d)
        q = self.attention_norm(tokens)
        tokens = tokens + self.attention(q, q, q, need_weights=False)[0]
        z = tokens.unflatten(1, (m, -1)).permute(0, 1, 3, 2).reshape(b, m * x.shape[2], *spatial)
        return self.bottleneck_fusion(z)

    def forward(self, x: torch.Tensor, return_parts: bool = False):
        skips = self.encoders(x)
        h = skips[-1]
        e = self.modality_errors(h)
        if self.training:
            self._update_scale(e)
        u_hat = self.cross_modal_uncertainty(e) if self.num_modalities > 1 else torch.zeros_like(e)
        z = self.fuse(h, u_hat)
        logits = self.decoder([f(s.flatten(1, 2)) for f, s in zip(self.skip_fusion, skips[:-1])] + [z])
        if return_parts or (self.cache_parts and self.training):
            parts = {"logits": logits, "errors": e, "uncertainty": u_hat}
            if self.cache_parts and self.training:
                self.last_parts = parts
            if return_parts:
                return parts
        return logits

    @staticmethod
    def rnp_loss(parts: dict) -> torch.Tensor:
        """The predictors' loss: mean RNP error over batch, modalities, channels and voxels (reaches f_psi only)."""
        return parts["errors"].mean()

    def conflict(self, e: torch.Tensor, size) -> torch.Tensor:
        """(max_q ē_q - min_q ē_q) / (max_q ē_q + min_q ē_q) (B, *size) of the modalities' normalised errors
        ē (B, M, *s) (channel means of :meth:`normalised_errors`), bottleneck map up-sampled to ``size``."""
        if e.shape[1] < 2:
            return torch.zeros((e.shape[0], *size), device=e.device)
        hi, lo = e.float().amax(1, keepdim=True), e.float().amin(1, keepdim=True)
        c = (hi - lo) / (hi + lo + 1e-6)
        mode = "bilinear" if c.dim() == 4 else "trilinear"
        return F.interpolate(c, size=tuple(size), mode=mode, align_corners=False)[:, 0].clamp(0, 1)

    @torch.no_grad()
    def sample_statistics(self, x: torch.Tensor, num_hypotheses: int = 1, seed: int = 0,
                          regions: bool = False) -> dict[str, torch.Tensor]:
        """One deterministic forward (``num_hypotheses`` and ``seed`` are unused): ``mean`` = softmax of the logits
        (B, C, *s; a sigmoid per channel with ``regions``), ``aleatoric`` = its entropy (nats; the regions' binary
        entropies summed), ``conflict`` = :meth:`conflict` of the modalities' errors."""
        parts = self.forward(x, return_parts=True)
        mean = probabilities(full_resolution(parts["logits"]), regions)
        return {"mean": mean, "aleatoric": output_entropy(mean, 1, regions),
                "conflict": self.conflict(self.normalised_errors(parts["errors"]).mean(2), x.shape[2:])}

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
                d = self.rnp_scale.shape[1]
                # RNP layers (target 3 + predictor 2 hidden, outputs), embedding, attention, fusion
                total += n * self.num_modalities * (9 * d + 4 * d) + n * self.bottleneck_fusion[0].out_channels
        return int(total + self.decoder.compute_conv_feature_map_size(input_size))
