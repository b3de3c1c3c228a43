"""What the networks return, read the same way everywhere.

Two output spaces, as nnU-Net has them: **labels** (one softmax over C classes, the mask is the argmax) and
**regions** (one sigmoid per region, regions may overlap, e.g. the BraTS whole tumor / tumor core /
enhancing tumor; nnU-Net turns them into a mask with ``regions_class_order``). ``regions`` says which.
"""
from __future__ import annotations

import torch

#: floor of probabilities before taking logs: log(1e-4) = -9.2 is finite in fp16
MIN_PROBABILITY = 1e-4


def full_resolution(logits) -> torch.Tensor:
    """The full-resolution output of a network that may return a deep-supervision list."""
    return logits[0] if isinstance(logits, (list, tuple)) else logits


def log_probabilities(probs: torch.Tensor) -> torch.Tensor:
    """``log(max(p, MIN_PROBABILITY))``: probabilities handed to nnU-Net as logits (its softmax undoes the log)."""
    return probs.clamp_min(MIN_PROBABILITY).log()


def probabilities(logits: torch.Tensor, regions: bool, axis: int = 1) -> torch.Tensor:
    """nnU-Net's inference nonlinearity: sigmoid per region channel, else softmax over ``axis``."""
    return torch.sigmoid(logits.float()) if regions else torch.softmax(logits.float(), axis)


def as_logits(probs: torch.Tensor, regions: bool) -> torch.Tensor:
    """Probabilities as the logits nnU-Net expects, so that its nonlinearity gives them back: ``logit(p)``
    per region (clamped to [1e-4, 1 - 1e-4]), else :func:`log_probabilities`."""
    if not regions:
        return log_probabilities(probs)
    return torch.logit(probs.clamp(MIN_PROBABILITY, 1 - MIN_PROBABILITY))


def decision_confidence(probs: torch.Tensor, regions: bool, axis: int = 1) -> torch.Tensor:
    """Probability of the decision the mask takes: ``max_c p_c`` for labels; for regions
    ``prod_r max(p_r, 1 - p_r)``, the probability that every region's decision is right (independent
    sigmoids), a lower bound on P(the converted label is right)."""
    if not regions:
        return probs.amax(axis)
    return torch.maximum(probs, 1 - probs).prod(axis)


def masked_mean(values: torch.Tensor, valid: torch.Tensor | None) -> torch.Tensor:
    """Mean of ``values`` over the voxels where ``valid`` (broadcastable, e.g. (B, 1, *s)) is true; plain
    mean without a mask; 0 when nothing is valid. Ignored voxels (nnU-Net's ignore label) thus carry no
    loss and no gradient."""
    if valid is None:
        return values.mean()
    weight = valid.to(values.dtype).expand_as(values)
    return (values * weight).sum() / weight.sum().clamp_min(1)
