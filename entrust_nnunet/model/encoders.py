"""ModEnc: one convolutional encoder per modality (input channel).

Width rule. nnU-Net's plain encoder has ``f_s`` features at stage ``s``. Each of the ``M`` modality
encoders gets ``w_s = max(min_width, ceil(f_s / M))`` features, so the *summed* width of the M
encoders equals the plain width (up to rounding and the floor). Consequences, with ``M`` encoders:

* activation memory of the encoders ~ plain (it scales with the summed width),
* parameters and FLOPs of the encoders ~ 1/M of plain (they scale with width squared, times M),
* the floor (default 8 features) keeps single-modality features expressive when M is large.

The decoder keeps nnU-Net's full widths (EnFuse maps the M streams back to ``f_s``), so the total
parameter count ends up at or below plain nnU-Net's (README, "The model").
"""
from __future__ import annotations

import math
from types import SimpleNamespace
from typing import Sequence

import torch
from dynamic_network_architectures.building_blocks.plain_conv_encoder import PlainConvEncoder
from torch import nn


def modality_widths(features_per_stage: Sequence[int], num_modalities: int, min_width: int = 8) -> list[int]:
    """Per-modality encoder width at each stage: ``max(min_width, ceil(f_s / M))`` (capped at f_s)."""
    return [min(int(f), max(min_width, math.ceil(int(f) / num_modalities))) for f in features_per_stage]


def grouped_conv(conv_op: type[nn.Module], groups: int) -> type[nn.Module]:
    """A subclass of ``conv_op`` whose convolutions have ``groups`` groups.

    A subclass (not a partial) because dynamic-network-architectures inspects ``conv_op`` with
    ``issubclass`` to tell 2D from 3D. Cached, so equal arguments give the same class.
    """
    key = (conv_op, groups)
    if key not in _GROUPED:
        def __init__(self, *args, **kwargs):
            conv_op.__init__(self, *args, groups=groups, **kwargs)

        _GROUPED[key] = type(f"{conv_op.__name__}Groups{groups}", (conv_op,), {"__init__": __init__})
    return _GROUPED[key]


_GROUPED: dict = {}


class ModalityEncoders(nn.Module):
    """``M`` independent encoders, one per input channel, run as ONE grouped :class:`PlainConvEncoder`.

    The encoder has ``M * w_s`` features at stage ``s`` and every convolution has ``M`` groups, so
    group ``m`` sees only channel ``m`` and its own features: exactly M separate encoders (norms
    are per channel, nonlinearities per voxel), with the same parameters, but one kernel per layer
    instead of M (faster; docs/design.md).

    ``forward(x)`` with ``x`` of shape (B, M, *spatial) returns, per stage, a tensor of shape
    (B, M, w_s, *spatial_s): the M streams stacked on a modality axis so EnFuse can treat them alike.
    """

    def __init__(self, num_modalities: int, n_stages: int, features_per_stage: Sequence[int], conv_op,
                 kernel_sizes, strides, n_conv_per_stage, conv_bias: bool = False, norm_op=None,
                 norm_op_kwargs: dict | None = None, dropout_op=None, dropout_op_kwargs: dict | None = None,
                 nonlin=None, nonlin_kwargs: dict | None = None, min_width: int = 8):
        super().__init__()
        m = self.num_modalities = num_modalities
        self.widths = modality_widths(features_per_stage, num_modalities, min_width)
        self.encoder = PlainConvEncoder(m, n_stages, [m * w for w in self.widths], grouped_conv(conv_op, m),
                                        kernel_sizes, strides, n_conv_per_stage, conv_bias, norm_op, norm_op_kwargs,
                                        dropout_op, dropout_op_kwargs, nonlin, nonlin_kwargs, return_skips=True)
        self.strides = self.encoder.strides
        # what a decoder of the FUSED features needs (PlainConvEncoder's attribute names)
        self.conv_op, self.kernel_sizes, self.conv_bias = conv_op, self.encoder.kernel_sizes, conv_bias
        self.norm_op, self.norm_op_kwargs, self.nonlin, self.nonlin_kwargs = norm_op, norm_op_kwargs, nonlin, nonlin_kwargs
        self.dropout_op, self.dropout_op_kwargs = dropout_op, dropout_op_kwargs

    def forward(self, x: torch.Tensor) -> list[torch.Tensor]:
        if x.shape[1] != self.num_modalities:
            raise ValueError(f"expected {self.num_modalities} input channels, got {x.shape[1]}")
        return [s.unflatten(1, (self.num_modalities, w)) for s, w in zip(self.encoder(x), self.widths)]

    def decoder_spec(self, fused_channels: Sequence[int]) -> SimpleNamespace:
        """The attributes dynamic-network-architectures' ``UNetDecoder`` reads of its encoder, for a decoder
        of fused features with ``fused_channels`` per stage (a namespace, so the decoder does not register
        this encoder a second time as its sub-module)."""
        return SimpleNamespace(output_channels=list(fused_channels), strides=self.strides,
                               kernel_sizes=self.kernel_sizes, conv_op=self.conv_op, conv_bias=self.conv_bias,
                               norm_op=self.norm_op, norm_op_kwargs=self.norm_op_kwargs, dropout_op=self.dropout_op,
                               dropout_op_kwargs=self.dropout_op_kwargs, nonlin=self.nonlin,
                               nonlin_kwargs=self.nonlin_kwargs)

    def compute_conv_feature_map_size(self, input_size) -> int:
        return int(self.encoder.compute_conv_feature_map_size(input_size))
