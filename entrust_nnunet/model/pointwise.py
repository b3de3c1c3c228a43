"""Pointwise (1x1 / 1x1x1) convolutions as one batched matrix product on CPU.

EnFuse, the experts, the full-resolution fusion, SegDiff's conditioning, covariance and flow heads and
CalibHead are mostly 1x1 convolutions at full or half resolution. oneDNN runs them in NCHW by reordering
input and output into its blocked layout, and for the odd channel counts these layers have (33, 17, 7) that
costs 2-10x a plain matrix product over the voxels (measured at 512²: 33 -> 16 channels 17.8 ms as a
convolution, 1.8 ms as ``baddbmm``; docs/design.md). Same parameters, same result up to rounding; CUDA keeps
cuDNN's convolution.
"""
from __future__ import annotations

import torch
from torch import nn


def pointwise_product(x: torch.Tensor, weight: torch.Tensor, bias: torch.Tensor | None, groups: int = 1
                      ) -> torch.Tensor:
    """``y[b, o, v] = sum_c W[o, c] x[b, c, v] + bias[o]`` within each of ``groups`` channel groups: a
    1x1(x1) convolution (``weight`` (O, C / groups, 1, ...)) of ``x`` (B, C, *s) over every voxel v."""
    b, c = x.shape[:2]
    o = weight.shape[0]
    w = weight.reshape(groups, o // groups, c // groups)
    # one copy of the weights per sample; a batch of one (inference) uses them as they are: per-call copies
    # are a large share of these layers' cost on small patches
    w = w if b == 1 else w.repeat(b, 1, 1)  # (B * G, O / G, C / G)
    voxels = x.reshape(b * groups, c // groups, -1)
    if bias is None:
        return torch.bmm(w, voxels).view(b, o, *x.shape[2:])
    shift = bias.reshape(groups, -1, 1)
    shift = shift if b == 1 else shift.repeat(b, 1, 1)
    return torch.baddbmm(shift, w, voxels).view(b, o, *x.shape[2:])


def pointwise_conv(conv_op: type[nn.Module]) -> type[nn.Module]:
    """A subclass of ``conv_op`` (so dynamic-network-architectures still reads its dimension) whose 1x1(x1)
    convolutions with stride 1 run as :func:`pointwise_product` on CPU; any other kernel, and every CUDA
    input, takes ``conv_op``'s own path. Cached: equal arguments give the same class."""
    if conv_op not in _POINTWISE:
        def forward(self, x):
            if not self.pointwise or x.is_cuda:
                return conv_op.forward(self, x)
            return pointwise_product(x, self.weight, self.bias, self.groups)

        def __init__(self, *args, **kwargs):
            conv_op.__init__(self, *args, **kwargs)
            self.pointwise = (all(k == 1 for k in self.kernel_size) and all(s == 1 for s in self.stride)
                              and all(d == 1 for d in self.dilation)
                              and not isinstance(self.padding, str) and not any(self.padding))

        _POINTWISE[conv_op] = type(f"{conv_op.__name__}Pointwise", (conv_op,), {"__init__": __init__,
                                                                                 "forward": forward})
    return _POINTWISE[conv_op]


_POINTWISE: dict = {}
