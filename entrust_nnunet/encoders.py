"""ModEnc: one convolutional encoder per modality (input channel).

Width rule. nnU-Net's plain encoder has ``f_s`` features at stage ``s``. Each of the ``M`` modality
encoders gets ``w_s = max(min_width, ceil(f_s / M))`` features, so the *summed* width of the M
encoders equals the plain width (up to rounding and the floor). Consequences, with ``M`` encoders:

* activation memory of the encoders ~ plain (it scales with the summed width),
* parameters and FLOPs of the encoders ~ 1/M of plain (they scale with width squared, times M),
* the floor (default 8 features) keeps single-modality features expressive when M is large.

The decoder keeps nnU-Net's full widths (EnFuse maps the M streams back to ``f_s``), so the total
parameter count ends up at or below plain nnU-Net's; ``entrust_nnunet.network`` reports both.
"""
from __future__ import annotations

import math
from typing import Sequence

import torch
from dynamic_network_architectures.building_blocks.plain_conv_encoder import PlainConvEncoder
from torch import nn


def modality_widths(features_per_stage: Sequence[int], num_modalities: int, min_width: int = 8) -> list[int]:
    """Per-modality encoder width at each stage: ``max(min_width, ceil(f_s / M))`` (capped at f_s)."""
    return [min(int(f), max(min_width, math.ceil(int(f) / num_modalities))) for f in features_per_stage]


class ModalityEncoders(nn.Module):
    """``M`` independent :class:`PlainConvEncoder` s, one per input channel.

    ``forward(x)`` with ``x`` of shape (B, M, *spatial) returns, per stage, a tensor of shape
    (B, M, w_s, *spatial_s): the M streams stacked on a modality axis so EnFuse can treat them alike.
    """

    def __init__(self, num_modalities: int, n_stages: int, features_per_stage: Sequence[int], conv_op,
                 kernel_sizes, strides, n_conv_per_stage, conv_bias: bool = False, norm_op=None,
                 norm_op_kwargs: dict | None = None, dropout_op=None, dropout_op_kwargs: dict | None = None,
                 nonlin=None, nonlin_kwargs: dict | None = None, min_width: int = 8):
        super().__init__()
        self.num_modalities = num_modalities
        self.widths = modality_widths(features_per_stage, num_modalities, min_width)
        self.encoders = nn.ModuleList(
            PlainConvEncoder(1, n_stages, self.widths, conv_op, kernel_sizes, strides, n_conv_per_stage, conv_bias,
                             norm_op, norm_op_kwargs, dropout_op, dropout_op_kwargs, nonlin, nonlin_kwargs,
                             return_skips=True)
            for _ in range(num_modalities))
        self.strides = self.encoders[0].strides

    def forward(self, x: torch.Tensor) -> list[torch.Tensor]:
        if x.shape[1] != self.num_modalities:
            raise ValueError(f"expected {self.num_modalities} input channels, got {x.shape[1]}")
        per_modality = [enc(x[:, m:m + 1]) for m, enc in enumerate(self.encoders)]
        return [torch.stack([skips[s] for skips in per_modality], dim=1) for s in range(len(self.widths))]

    def compute_conv_feature_map_size(self, input_size) -> int:
        return int(sum(enc.compute_conv_feature_map_size(input_size) for enc in self.encoders))
