"""Expert alternatives: where the modalities conflict, hypothesis k follows one modality's reading.

SegDiff's low-rank start spreads only where the training labels disagree among themselves. With one
label per case the network learns each training blob's label by heart, the covariance collapses there,
and on new cases every hypothesis agrees on a blob whose truth is a coin flip (docs/design.md, measured:
diversity 0). The per-modality experts, each seeing one modality only, disagree exactly where the
modalities do. So hypothesis k takes expert ``m_k``'s reading in proportion to their conflict::

    p'_k = (1 - g) p_k + g e_{m_k},   g = clamp(strength * d, 0, 1)   (strength 2 by default)

with ``d`` the experts' normalised Jensen-Shannon divergence among the present modalities (high only where
confident experts contradict each other: not on blurred edges, where each is unsure alike) and ``m_k`` the
``(k mod n)``-th present modality. One expert per hypothesis for the whole case (every patch), so a
hypothesis takes or leaves a conflicting structure whole; ``k mod n`` keeps the readings balanced and the
hypotheses nested across K. Where the experts agree (``d`` ~ 0) nothing changes. Strength 2: from
``d`` = 0.5 on, the hypothesis takes its expert's reading wholly (a linear mix at ``d`` = 0.5 would not
flip a confident SegDiff hypothesis); chosen on the development seed, with what it costs (docs/design.md).
"""
from __future__ import annotations

import torch


def expert_alternatives(hypotheses: torch.Tensor, experts: torch.Tensor, conflict: torch.Tensor,
                        mask: torch.Tensor, strength: float = 1.0) -> torch.Tensor:
    """``p'_k = (1 - g) p_k + g e_{m_k}`` (module doc) for hypotheses (K, B, C, *s), expert probabilities
    (B, M, C, *s) and conflict ``d`` (B, 1, *s) at the hypotheses' resolution, modality ``mask`` (B, M), 1 =
    present. ``strength`` 0 returns the hypotheses unchanged."""
    if strength <= 0:
        return hypotheses
    k, b = hypotheses.shape[:2]
    present = mask > 0
    n = present.sum(1)  # (B,)
    # the (k mod n_b)-th present modality of sample b: rank the present modalities 0..n_b-1
    rank = present.long().cumsum(1) - 1  # (B, M): rank among the present ones (junk where absent)
    which = torch.arange(k, device=mask.device)[:, None] % n.clamp_min(1)[None]  # (K, B)
    chosen = (present[None] & (rank[None] == which[..., None])).to(experts.dtype)  # (K, B, M) one-hot
    followed = torch.einsum("kbm,bm...->kb...", chosen, experts)  # (K, B, C, *s)
    gate = (strength * conflict).clamp(0, 1).to(hypotheses.dtype)[None]
    return (1 - gate) * hypotheses + gate * followed.to(hypotheses.dtype)
