"""Absent modalities: the (B, M) modality mask (1 = present) and the masked reductions that keep an absent
modality out of every mean, so that whatever its channel holds never reaches the output.

A network is told which modalities are present per sample by a mask rather than by a zero image: nnU-Net's
normalisation would turn zeros into a plausible-looking intensity, and the encoders could not tell
"dark" from "not acquired".
"""
from __future__ import annotations

import torch


def resolve_mask(mask, batch: int, modalities: int, device) -> torch.Tensor:
    """A float (B, M) mask from ``mask``: None (every modality present), (M,) (the same for every sample)
    or (B, M), bool or float. Every sample needs at least one present modality (ValueError otherwise)."""
    if mask is None:
        return torch.ones(batch, modalities, device=device)
    mask = torch.as_tensor(mask, device=device).float()
    if mask.dim() == 1:
        mask = mask.expand(batch, -1)
    if tuple(mask.shape) != (batch, modalities):
        raise ValueError(f"modality mask of shape {tuple(mask.shape)} does not fit {batch} samples of "
                         f"{modalities} modalities")
    mask = (mask > 0).float()
    if (mask.sum(1) < 1).any():
        raise ValueError("modality mask: every sample needs at least one present modality")
    return mask


def _broadcast(mask: torch.Tensor, x: torch.Tensor) -> torch.Tensor:
    """(B, M) -> (B, M, 1, ..., 1) with ``x``'s number of dimensions."""
    return mask.view(*mask.shape, *([1] * (x.dim() - 2)))


def without_absent(x: torch.Tensor, mask: torch.Tensor) -> torch.Tensor:
    """(B, C >= M, *s) input with its first M (image) channels set to 0 where ``mask`` (B, M) marks them absent
    (``where``, so NaN or Inf there is removed too); channels after them (a cascade stage's prior) stay as they are."""
    m = mask.shape[1]
    images = x[:, :m]
    images = torch.where(_broadcast(mask.to(x.device), images) > 0, images, torch.zeros_like(images))
    return images if x.shape[1] == m else torch.cat([images, x[:, m:]], 1)


def mean_over_present(x: torch.Tensor, mask: torch.Tensor) -> torch.Tensor:
    """Mean of (B, M, ...) over the modality axis, counting only modalities with ``mask`` (B, M) = 1."""
    m = _broadcast(mask, x).to(x.dtype)
    return (x * m).sum(1) / m.sum(1).clamp_min(1)


def impute_absent(streams: torch.Tensor, mask: torch.Tensor, weights: torch.Tensor) -> torch.Tensor:
    """(B, M, w, *s) feature streams with each absent modality's stream replaced by the ``weights``-weighted
    mean of the present ones (``weights`` (B, M) are 0 on absent modalities and sum to 1): layers that take
    the M streams concatenated then see features of the present modalities only. Unchanged when all are present."""
    mean = (streams * _broadcast(weights, streams).to(streams.dtype)).sum(1, keepdim=True)
    return torch.where(_broadcast(mask, streams) > 0, streams, mean)
