"""CLoE's expert consistency over the AVAILABLE modalities: MEC, REC and consistency-driven gating.

The per-modality experts (``EnTrustUNet.experts``) give probability maps ``p_m`` (B, M, C, *s). A
modality mask ``a`` (B, M) (1 = present) says which of them exist for each sample; everything here is
computed among present experts only, so an absent modality never enters a mean, a pair or a softmax.

* **MEC** (modality expert consistency): ``mean over pairs i < j of present experts of
  1 - cos(vec p_i, vec p_j)`` (flattened over classes and voxels). 0 for identical experts, 1 for
  orthogonal ones (e.g. one-hot maps that never agree).
* **REC** (region expert consistency): the same on ``r * p_m``, where ``r = sigmoid(pi(mean_m f_m))`` is a
  region map projected from the experts' averaged shallow features (:class:`RegionProjection`), so that
  background, where every expert agrees trivially, does not dominate the cosine.
* **gating**: each expert's consistency scores ``u_m`` (mean cosine of ``p_m`` with the other present
  experts) and ``v_m`` (the same on r-weighted maps) go through a small shared MLP to a reliability
  logit; a softmax over the present experts gives fusion weights (zero on absent experts, sum 1).

With one modality left, pairwise consistency is undefined: MEC and REC are 0 for that sample (it adds
nothing to the loss), its scores are ``u = v = 1`` and its weight is 1 (docs/design.md).
"""
from __future__ import annotations

import torch
from torch import nn

from entrust_nnunet.model.absence import mean_over_present


def pairwise_cosines(maps: torch.Tensor, mask: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """Cosine similarity of every pair of flattened expert maps (B, M, ...) -> (B, M, M), and the (B, M, M)
    indicator of pairs i != j of present experts."""
    flat = maps.flatten(2).float()
    flat = flat / flat.norm(dim=2, keepdim=True).clamp_min(1e-8)
    cos = torch.einsum("bin,bjn->bij", flat, flat)
    a = mask.float()
    eye = torch.eye(a.shape[1], device=a.device, dtype=a.dtype)
    return cos, a[:, :, None] * a[:, None, :] * (1 - eye)


def pairwise_inconsistency(maps: torch.Tensor, mask: torch.Tensor) -> torch.Tensor:
    """(B,) mean over pairs of present experts of ``1 - cos``; 0 where fewer than two are present."""
    cos, pairs = pairwise_cosines(maps, mask)
    return ((1 - cos) * pairs).sum((1, 2)) / pairs.sum((1, 2)).clamp_min(1)


def consistency_loss(maps: torch.Tensor, mask: torch.Tensor) -> torch.Tensor:
    """Mean :func:`pairwise_inconsistency` over the samples with at least two present experts (0 if none):
    MEC on expert maps, REC on region-weighted ones."""
    valid = (mask.float().sum(1) >= 2).float()
    return (pairwise_inconsistency(maps, mask) * valid).sum() / valid.sum().clamp_min(1)


def consistency_scores(maps: torch.Tensor, mask: torch.Tensor) -> torch.Tensor:
    """(B, M): each expert's mean cosine with the other present experts; 1 when it is alone."""
    cos, pairs = pairwise_cosines(maps, mask)
    n = pairs.sum(2)
    return torch.where(n > 0, (cos * pairs).sum(2) / n.clamp_min(1), torch.ones_like(n))


class RegionProjection(nn.Module):
    """``r = sigmoid(pi(mean over present m of f_m))``: a one-channel region map from the experts' shallow
    features (B, M, w, *s); ``pi`` is a 1x1 convolution. Returns its logit (B, 1, *s)."""

    def __init__(self, conv_op, width: int):
        super().__init__()
        self.project = conv_op(width, 1, 1)

    def forward(self, features: torch.Tensor, mask: torch.Tensor) -> torch.Tensor:
        return self.project(mean_over_present(features, mask))


class ConsistencyGate(nn.Module):
    """Reliability weights (B, M) of the experts from their scores (u_m, v_m): a shared 2 -> hidden -> 1 MLP
    gives a logit per expert, softmax over the PRESENT experts (absent ones get weight exactly 0)."""

    def __init__(self, hidden: int = 8):
        super().__init__()
        self.net = nn.Sequential(nn.Linear(2, hidden), nn.GELU(), nn.Linear(hidden, 1))

    def forward(self, probs: torch.Tensor, region: torch.Tensor, mask: torch.Tensor) -> torch.Tensor:
        """``probs`` (B, M, C, *s) expert probabilities, ``region`` (B, 1, *s) r in [0, 1], ``mask`` (B, M)."""
        u = consistency_scores(probs, mask)
        v = consistency_scores(probs * region.unsqueeze(1), mask)
        logits = self.net(torch.stack([u, v], -1).to(self.net[0].weight.dtype))[..., 0].float()
        return torch.softmax(logits.masked_fill(mask <= 0, float("-inf")), 1)
