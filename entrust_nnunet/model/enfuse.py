"""EnFuse: split M modality feature streams into consensus, specific and conflict parts, then fuse.

At one resolution, with modality features ``H_m`` (m = 1..M, ``w`` channels each):

* ``Z_m = E_c(H_m)``   one shared pointwise MLP maps every modality into a common space;
  the consensus is ``F_c = mean_m Z_m``.
* ``F_u,m = E_u,m(H_m)`` per-modality pointwise MLPs (grouped convolutions, one group per
  modality) keep what only that modality carries.
* ``F_cf = sigmoid(D_cf([var_m Z_m, F_c, d]))`` a one-channel spatial conflict map in [0, 1] computed
  from how far the modalities' common-space projections spread around their mean and, when given,
  ``d``: the disagreement of per-modality expert predictions at this resolution (see
  ``entrust_nnunet.model.network``).
* gated fusion: gate logits ``G = W_g [F_c, F_cf] + a * logit(F_cf)`` over the M+1 sources
  (consensus, specific_1..M), softmax over sources, ``F = g_c F_c + sum_m g_m F_u,m`` and
  ``F_en = act(norm(W_o [F, F_cf]))`` with nnU-Net's width. The conflict map enters the gate
  logits directly (one learned weight ``a`` per source), so high conflict moves weight between
  consensus and the modality-specific streams.

The parts are kept apart by :func:`cross_covariance_penalty` (linear decorrelation) or, selectable,
:func:`hsic_penalty` (a kernel dependence measure: decorrelation is not independence).
"""
from __future__ import annotations

import torch
from torch import nn
from torch.nn import functional as F


#: voxels per sample the cross-covariance penalty looks at (a random subset above it)
MAX_VOXELS = 4096


def _flatten_voxels(x: torch.Tensor) -> torch.Tensor:
    """(B, C, *spatial) -> (B, C, N)."""
    return x.flatten(2)


def _subsample_voxels(tensors: list[torch.Tensor], max_voxels: int, generator: torch.Generator | None = None):
    """Same random voxel subset (per call) for all tensors of shape (B, C, N)."""
    n = tensors[0].shape[-1]
    if n <= max_voxels:
        return tensors
    idx = torch.randperm(n, device=tensors[0].device, generator=generator)[:max_voxels]
    return [t[..., idx] for t in tensors]


def cross_covariance_penalty(a: torch.Tensor, b: torch.Tensor, max_voxels: int = MAX_VOXELS, eps: float = 1e-5) -> torch.Tensor:
    r"""Mean squared cross-correlation between the channels of ``a`` and ``b`` over voxels.

    For feature maps ``a`` (B, Ca, *s) and ``b`` (B, Cb, *s), each channel is standardised over the
    N voxels of its sample (:math:`\tilde a_i = (a_i - \bar a_i)/\sigma(a_i)`), then

    .. math:: P(a, b) = \frac{1}{B\,C_a C_b} \sum_{\text{batch}} \big\| \tfrac{1}{N} \tilde A \tilde B^\top \big\|_F^2

    P is 0 when every channel of ``a`` is uncorrelated with every channel of ``b`` (for independent
    inputs its expectation is about 1/N), and 1 when ``a`` and ``b`` are the same single channel.
    Standardising makes the penalty scale-free, so it cannot be lowered by shrinking features. It
    removes LINEAR correlation only (``b = a**2`` with symmetric ``a`` scores ~0).
    """
    if a.shape[0] != b.shape[0] or a.shape[2:] != b.shape[2:]:
        raise ValueError(f"shapes {tuple(a.shape)} and {tuple(b.shape)} do not share batch and spatial size")
    a, b = _subsample_voxels([_flatten_voxels(a.float()), _flatten_voxels(b.float())], max_voxels)
    return _mean_squared_correlation(_standardize(a, eps), _standardize(b, eps))


def _standardize(x: torch.Tensor, eps: float = 1e-5) -> torch.Tensor:
    """Each channel of (B, C, N) to zero mean and unit (population) standard deviation over its N voxels.
    ``sqrt(var + eps^2)``, not ``sqrt(var) + eps``: a constant channel (an absent modality's stream) must get
    a finite gradient, and sqrt has an infinite one at 0."""
    x = x - x.mean(-1, keepdim=True)
    return x / (x.square().mean(-1, keepdim=True) + eps * eps).sqrt()


def _mean_squared_correlation(a: torch.Tensor, b: torch.Tensor, weight: torch.Tensor | None = None) -> torch.Tensor:
    """Mean over batch and channel pairs of the squared correlation of standardised (B, Ca, N), (B, Cb, N);
    with ``weight`` (B,) a weighted mean over the batch (0 where a stream is absent; 0 if all are)."""
    per_sample = (torch.einsum("bin,bjn->bij", a, b) / a.shape[-1]).square().mean((1, 2))
    if weight is None:
        return per_sample.mean()
    return (per_sample * weight).sum() / weight.sum().clamp_min(1)


def _gaussian_gram(x: torch.Tensor) -> torch.Tensor:
    """Gaussian kernel Gram matrix (B, n, n) of x (B, n, d), bandwidth = median pairwise distance."""
    d2 = torch.cdist(x, x).pow(2)
    n = x.shape[1]
    off = d2[:, ~torch.eye(n, dtype=torch.bool, device=x.device)].reshape(x.shape[0], -1)
    sigma2 = off.median(dim=1).values.clamp_min(1e-6).view(-1, 1, 1)
    return torch.exp(-d2 / (2 * sigma2))


def hsic_penalty(a: torch.Tensor, b: torch.Tensor, num_voxels: int = 256,
                 generator: torch.Generator | None = None, weight: torch.Tensor | None = None) -> torch.Tensor:
    r"""Normalised HSIC with Gaussian kernels on a random subset of voxels (a nonlinear dependence measure).

    With n sampled voxels, Gram matrices K (of ``a``'s channel vectors) and L (of ``b``'s), and the
    centring matrix :math:`H = I - \frac{1}{n}\mathbf{1}\mathbf{1}^\top`:

    .. math:: \mathrm{HSIC}(a,b) = \frac{\operatorname{tr}(K H L H)}{(n-1)^2}, \qquad
              \mathrm{nHSIC} = \frac{\mathrm{HSIC}(a,b)}{\sqrt{\mathrm{HSIC}(a,a)\,\mathrm{HSIC}(b,b)}} \in [0, 1]

    Bandwidths follow the median heuristic. Near 0 for independent inputs, large for any
    dependence, including nonlinear (``b = a**2``) where :func:`cross_covariance_penalty` is blind. A constant
    input (an absent modality's stream) has a zero centred Gram matrix and gives 0, with finite gradients;
    ``weight`` (B,) as in :func:`cross_covariance_penalty`'s pairs: a weighted mean over the batch.
    """
    a, b = _subsample_voxels([_flatten_voxels(a.float()), _flatten_voxels(b.float())], num_voxels, generator)
    k, l = _gaussian_gram(a.transpose(1, 2)), _gaussian_gram(b.transpose(1, 2))
    k = k - k.mean(1, keepdim=True) - k.mean(2, keepdim=True) + k.mean((1, 2), keepdim=True)  # H K H
    l = l - l.mean(1, keepdim=True) - l.mean(2, keepdim=True) + l.mean((1, 2), keepdim=True)
    kl, kk, ll = (k * l).sum((1, 2)), (k * k).sum((1, 2)), (l * l).sum((1, 2))
    per_sample = kl / (kk * ll).clamp_min(1e-24).sqrt()  # clamped before the root: its gradient at 0 is infinite
    if weight is None:
        return per_sample.mean()
    return (per_sample * weight).sum() / weight.sum().clamp_min(1)


#: EnFuse's pairwise penalty: cross_covariance_penalty (one voxel subset for every pair) or hsic_penalty
INDEPENDENCE_OPTIONS = ("xcov", "hsic")


class PointwiseMLP(nn.Module):
    """1x1 conv -> GELU -> 1x1 conv (hidden = ``expansion`` x input), with a residual when shapes allow.

    ``groups`` > 1 makes both convolutions block-diagonal (one block per modality), which is how the
    M modality-specific heads E_u,m run as one module. Pointwise on purpose: the encoder stages
    before it already mix space (docs/design.md).
    """

    def __init__(self, conv_op, in_channels: int, out_channels: int, groups: int = 1, expansion: int = 1):
        super().__init__()
        hidden = in_channels * expansion
        self.expand = conv_op(in_channels, hidden, 1, groups=groups)
        self.project = conv_op(hidden, out_channels, 1, groups=groups)
        self.residual = in_channels == out_channels

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        y = self.project(F.gelu(self.expand(x)))
        return x + y if self.residual else y


class EnFuse(nn.Module):
    """EnFuse at one resolution: (B, M, w, *s) modality features -> F_en (B, out, *s) and the parts."""

    def __init__(self, num_modalities: int, width: int, out_channels: int, conv_op, norm_op,
                 norm_op_kwargs: dict | None, nonlin, nonlin_kwargs: dict | None, independence: str = "xcov",
                 conflict_hidden: int = 8):
        super().__init__()
        if independence not in INDEPENDENCE_OPTIONS:
            raise ValueError(f"independence must be one of {sorted(INDEPENDENCE_OPTIONS)}, got {independence!r}")
        m = num_modalities
        self.num_modalities = m
        self.independence = independence
        self.E_c = PointwiseMLP(conv_op, width, width)
        self.E_u = PointwiseMLP(conv_op, m * width, m * width, groups=m)
        # the conflict map: per-voxel features, then one 3x3 conv so that F_cf is spatially smooth
        self.D_cf = nn.Sequential(conv_op(2 * width + 1, conflict_hidden, 1), nn.GELU(),
                                  conv_op(conflict_hidden, 1, 3, padding=1))
        self.gate = conv_op(width + 1, m + 1, 1)
        self.gate_conflict = nn.Parameter(torch.zeros(m + 1))  # the weight ``a`` of logit(F_cf) per source
        self.out = nn.Sequential(conv_op(width + 1, out_channels, 1), norm_op(out_channels, **(norm_op_kwargs or {})),
                                 nonlin(**(nonlin_kwargs or {})))

    def forward(self, h: torch.Tensor, disagreement: torch.Tensor | None = None, mask: torch.Tensor | None = None,
                weights: torch.Tensor | None = None) -> dict[str, torch.Tensor]:
        """``mask`` (B, M), 1 = modality present (default: all; None skips the masking, which is then the
        identity); ``weights`` (B, M) the experts' reliability weights (0 on absent modalities, sum 1; default:
        uniform over the present ones)."""
        b, m, w = h.shape[:3]
        spatial = h.shape[3:]
        everything = mask is None
        mask = torch.ones(b, m, device=h.device) if everything else mask.float()
        weights = mask / mask.sum(1, keepdim=True) if weights is None else weights.float()
        per_stream = (b, m, 1, *([1] * len(spatial)))
        a, wt = mask.view(per_stream).to(h.dtype), weights.view(per_stream).to(h.dtype)
        z = self.E_c(h.reshape(b * m, w, *spatial)).reshape(b, m, w, *spatial)
        f_c = (z * wt).sum(1)  # consensus: reliability-weighted mean of the present modalities
        f_u = self.E_u(h.reshape(b, m * w, *spatial)).reshape(b, m, w, *spatial)
        if disagreement is None:
            disagreement = torch.zeros_like(f_c[:, :1])
        # spread of the present modalities around their mean, written out: torch.var is slow on CPU here
        if everything:
            spread = (z - z.mean(1, keepdim=True)).square().mean(1)
        else:
            f_u = f_u * a
            n = a.sum(1)
            spread = ((z - ((z * a).sum(1) / n).unsqueeze(1)).square() * a).sum(1) / n
        cf_logit = self.D_cf(torch.cat([spread, f_c, disagreement.to(f_c.dtype)], 1))
        f_cf = torch.sigmoid(cf_logit)
        gate_logits = self.gate(torch.cat([f_c, f_cf], 1))
        gate_logits = gate_logits + self.gate_conflict.view(1, m + 1, *([1] * len(spatial))) * cf_logit
        gates = torch.softmax(self._reliability_logits(gate_logits, mask, weights), 1)
        fused = gates[:, :1] * f_c + (gates[:, 1:, None] * f_u).sum(1)
        f_en = self.out(torch.cat([fused, f_cf], 1))
        return {"F_en": f_en, "F_c": f_c, "F_u": f_u, "F_cf": f_cf, "F_cf_logit": cf_logit, "gates": gates,
                "mask": mask}

    @staticmethod
    def _reliability_logits(gate_logits: torch.Tensor, mask: torch.Tensor, weights: torch.Tensor) -> torch.Tensor:
        """Gate logits (B, 1 + M, *s) plus ``log(M_present * w_m)`` for specific stream m (0 for uniform
        weights) and -inf for absent modalities: an absent stream gets gate 0, an unreliable one less."""
        n = mask.sum(1, keepdim=True)
        log_w = torch.log((weights * n).clamp_min(1e-6)).masked_fill(mask <= 0, float("-inf"))
        log_w = torch.cat([torch.zeros_like(log_w[:, :1]), log_w], 1)
        return gate_logits.float() + log_w.view(*log_w.shape, *([1] * (gate_logits.dim() - 2)))

    def independence_penalty(self, parts: dict[str, torch.Tensor]) -> torch.Tensor:
        """Mean of the 1 + 2M pairwise penalties between F_c, each F_u,m and F_cf. A pair with F_u,m counts only the
        samples where modality m is present (an absent stream is 0 and has nothing to decorrelate)."""
        f_c, f_u, f_cf = parts["F_c"], parts["F_u"], parts["F_cf"]
        m = f_u.shape[1]
        present = parts.get("mask")
        weights = [None if present is None else present[:, i].float() for i in range(m)]
        if self.independence == "xcov":
            # cross_covariance_penalty of every pair, with each part standardised once (one voxel subset)
            flat = _subsample_voxels([_flatten_voxels(t.float()) for t in (f_c, f_u.flatten(1, 2), f_cf)],
                                     MAX_VOXELS)
            c, u, cf = (_standardize(t) for t in flat)
            u = u.unflatten(1, (m, -1))
            total = _mean_squared_correlation(c, cf)
            for i in range(m):
                total = (total + _mean_squared_correlation(c, u[:, i], weights[i])
                         + _mean_squared_correlation(u[:, i], cf, weights[i]))
            return total / (1 + 2 * m)
        total = hsic_penalty(f_c, f_cf)
        for i in range(m):
            total = total + hsic_penalty(f_c, f_u[:, i], weight=weights[i]) + hsic_penalty(f_u[:, i], f_cf,
                                                                                           weight=weights[i])
        return total / (1 + 2 * m)
