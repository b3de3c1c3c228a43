"""SegDiff: a start distribution in logit space (SSN) refined by S flow-matching steps, conditioned on F_en.

**Start distribution** (Stochastic Segmentation Networks, Monteiro et al. 2020; the Gaussian-truncated
start of ATFM). Per image, the logits are Gaussian with a low-rank plus diagonal covariance::

    l = mu + P eps + sqrt(D) * eta,   eps ~ N(0, I_r) (one per hypothesis), eta ~ N(0, I) (per voxel)

``mu`` (B, C, *s) = the deterministic head's logits; ``P`` (B, C, r, *s) and ``D`` (B, C, *s) > 0 come
from a light pointwise head on the projected conditioning (:meth:`SegDiffHead.covariance`). Because
``eps`` is shared by every voxel, one draw moves a whole region at once: a hypothesis takes or
leaves an ambiguous structure whole.

* Training (:meth:`SegDiffHead.start_loss`): the Monte-Carlo log-likelihood of the label under M
  samples, per image b with N voxels, divided by N so that it reads like a per-voxel cross-entropy,
  plus a small quadratic cost on the covariance (weight ``lambda`` = ``cov_penalty``)::

      L_b = -(1/N) [ logsumexp_m sum_v log softmax(l_m)_v[y_v] - log M ]
            + lambda (1/N) sum_v sum_c (sum_r P_vcr^2 + D_vc)

  Where the labels split (coin-flip structures), the best of M samples is one that flips the whole
  structure: that gains about log 2 per voxel, far above the cost, so ``P`` grows there. Why the
  cost: the likelihood of a product over N voxels rewards ANY coherent spread wherever ``mu`` is
  slightly under-confident (0.96^64 is far below the 0.75 that a 3-in-4 coherent flip gives), and once
  ``mu`` is confident the losing samples carry no gradient, so such spread would never shrink. With
  the cost, the covariance collapses wherever it buys less likelihood than it costs (measured: see
  tests/model/test_ambiguity.py, consistent labels give no spread).
* Inference: ``eps_k`` is drawn from a CPU generator seeded with ``(seed, k)`` only, the same for every
  batch element and every sliding-window patch, so hypothesis k is ONE coherent mask over the case and
  hypotheses are nested across K. The diagonal part is not drawn: per-voxel noise would make every
  mask salt-and-pepper, and overlapping patches would draw it differently. It is marginalised in
  closed form instead (pairwise mean-field approximation of E[softmax], :func:`expected_softmax` with P = 0)::

      p_k,c ~ 1 / (1 + sum_{j != c} exp(-(l_c - l_j) / sqrt(1 + pi (D_c + D_j) / 8))),   l = mu + P eps_k

  renormalised to sum to one over the classes.

  so D makes hypothesis k soft where voxel-wise doubt is (e.g. edges) without speckling it.

**Flow** (S >= 1 steps, truncated rectified flow). From ``x_s = 2 p_k - 1`` at ``t0 = t_start``, a
straight path to ``x1 = 2 onehot(y) - 1`` at 1: ``x_t = (1 - r) x_s + r x1``, ``r = (t - t0)/(1 - t0)``;
loss ``|| v_theta(x_t, t | c) - (x1 - x_s)/(1 - t0) ||^2`` with ``t ~ U(t0, 1)`` and ``x_s`` from one
start draw (detached: the start is trained by its own likelihood). Hypothesis k's probabilities after
the flow: ``softmax(sharpness * x1_hat_k)``. With S = 0 the hypotheses are the start's ``p_k``.

**Regions** (``regions=True``, nnU-Net's region-based training: one sigmoid channel per region, regions
may overlap). The same Gaussian in logit space, read per channel as a Bernoulli logit: the start's
likelihood is ``sum_v sum_r log sigmoid((2 y_vr - 1) l_vr)`` (a binary likelihood per region channel,
y_vr = 1 when voxel v is in region r), hypotheses are ``sigmoid((mu + P eps_k) / sqrt(1 + pi D / 8))``
(the same probit approximation, now for the logistic), the flow's data point is ``x1 = 2 y - 1`` per
region and a hypothesis after the flow is ``sigmoid(2 * sharpness * x1_hat)``: a region channel read as
the two-class softmax of ``(x, -x)``, so a region hypothesis is as sharp as a label hypothesis.

**Ignored voxels** (nnU-Net's ignore label; ``valid`` = False): no likelihood, no flow-matching error;
the per-image normalisation N counts valid voxels only. In flow matching their data point is the start
draw itself (x1 = x_s), so their labels reach no valid voxel through the head's 3x3 convolution either. The covariance cost does not see labels and is
kept over every voxel.

Defaults (``cov_penalty`` 0.002; S = 0 at inference since 2026-12-05) and what they were chosen on: docs/design.md.

Cost: the conditioning ``c`` is projected ONCE per patch (:meth:`SegDiffHead.condition`), and so are ``D``
and the covariance head's hidden features. A start hypothesis costs one C x hidden product per voxel (the
latents folded into P's last layer: :meth:`SegDiffHead.start_sampler`; P is formed only for the start's
expectation at S = 0, once per patch, from the same hidden features: :meth:`SegDiffHead.start_mean`); each of
the K x S flow steps runs only the light head (one 3x3 conv on the C-channel state, two 1x1 convs of ``hidden``
channels), on ``chunk`` hypotheses at a time so that memory does not grow with K.
"""
from __future__ import annotations

import math
import zlib

import torch
from torch import nn
from torch.nn import functional as F

from entrust_nnunet.model.outputs import masked_mean
from entrust_nnunet.model.pointwise import pointwise_product

#: bound on the state so that logits stay finite in fp16 (nnU-Net accumulates in half precision)
STATE_CLAMP = 4.0


def one_hot_state(target: torch.Tensor, num_classes: int, regions: bool = False) -> torch.Tensor:
    """(B, 1, *s) integer labels -> (B, C, *s) flow-matching data point in {-1, +1}; with ``regions`` the
    target is already (B, C, *s) region membership (0/1)."""
    if regions:
        return target.float() * 2 - 1
    onehot = F.one_hot(target[:, 0].long(), num_classes).movedim(-1, 1)
    return onehot.float() * 2 - 1


def label_log_likelihood(logits: torch.Tensor, target: torch.Tensor, regions: bool) -> torch.Tensor:
    """Per-voxel log-likelihood of the target under logits (..., B, C, *s) -> (..., B, 1, *s): log softmax at
    the label (target (B, 1, *s)), or for ``regions`` the sum over channels of the Bernoulli log-likelihood
    ``log sigmoid((2 y - 1) l)`` (target (B, C, *s) in {0, 1})."""
    axis = logits.dim() - target.dim() + 1
    if regions:
        return F.logsigmoid((2 * target.to(logits.dtype) - 1) * logits).sum(axis, keepdim=True)
    y = target.long().expand(*logits.shape[:axis], 1, *target.shape[2:])
    return torch.log_softmax(logits, axis).gather(axis, y)


def latent_draws(num_hypotheses: int, rank: int, seed: int) -> torch.Tensor:
    """(K, r) global latents; row k comes from a CPU generator seeded with ``(seed, k)`` alone.

    So hypothesis k does not depend on K, on the device, on the batch or on the patch.
    """
    if num_hypotheses < 1:
        raise ValueError(f"need num_hypotheses >= 1, got {num_hypotheses}")
    rows = [torch.randn(rank, generator=torch.Generator().manual_seed(zlib.crc32(f"{int(seed)}:{k}".encode())))
            for k in range(num_hypotheses)]
    return torch.stack(rows)


def low_rank_shift(factor: torch.Tensor, eps: torch.Tensor) -> torch.Tensor:
    """``P eps``: factor (B, C, r, *s) and latents (K, r) -> (K, B, C, *s); or (K, B, r) per image."""
    if eps.dim() == 2:
        return torch.einsum("bcr...,kr->kbc...", factor, eps.to(factor.dtype))
    return torch.einsum("bcr...,kbr->kbc...", factor, eps.to(factor.dtype))


def marginal_probabilities(logits: torch.Tensor, diag: torch.Tensor, regions: bool = False) -> torch.Tensor:
    """``E_eta softmax(l + sqrt(D) eta)`` by :func:`expected_softmax`'s pairwise approximation with P = 0 (the
    variance of a logit difference is ``D_c + D_j``); with ``regions`` ``sigmoid(l / sqrt(1 + pi D / 8))`` per channel.

    ``logits`` (K, B, C, *s) or (B, C, *s), ``diag`` (B, C, *s); the class axis is ``diag``'s axis 1.
    """
    axis = logits.dim() - diag.dim() + 1
    if regions:
        return torch.sigmoid(logits / torch.sqrt(1 + math.pi / 8 * diag))
    return _pairwise_expected_softmax(logits, lambda c, j: diag[:, c] + diag[:, j], axis)


def expected_softmax(mu: torch.Tensor, factor: torch.Tensor, diag: torch.Tensor) -> torch.Tensor:
    """``E softmax(mu + P eps + sqrt(D) eta)`` (B, C, *s) for the low-rank plus diagonal Gaussian of the start.

    Pairwise mean-field approximation: ``p_c ~= 1 / (1 + sum_{j != c} exp(-(mu_c - mu_j) / sqrt(1 + pi v_cj / 8)))``
    with ``v_cj = sum_r (P_cr - P_jr)^2 + D_c + D_j`` the variance of the logit difference (a shift common to
    every class changes no probability, so it must not temper them), then renormalised to sum to one.
    ``mu`` (B, C, *s), ``factor`` P (B, C, r, *s), ``diag`` D (B, C, *s).
    """
    sq = factor.square().sum(2) + diag  # (B, C, *s): |P_c|^2 + D_c
    return _pairwise_expected_softmax(
        mu, lambda c, j: sq[:, c] + sq[:, j] - 2 * (factor[:, c] * factor[:, j]).sum(1), 1)


def _pairwise_expected_softmax(mu: torch.Tensor, variance, axis: int) -> torch.Tensor:
    """The pairwise approximation of :func:`expected_softmax` along ``axis`` of ``mu``; ``variance(c, j)`` is the
    variance of ``mu_c - mu_j`` (broadcasting against ``mu`` without its class axis)."""
    # one class pair at a time on slices: the same numbers as (B, C, C, *s) tensors at half the time on CPU
    # (3D 96x160x160, C = 4: 0.39 s against 0.71 s), the pair's two terms from one exp (e_jc = 1 / e_cj)
    n = mu.shape[axis]
    den = [torch.ones_like(mu.select(axis, 0)) for _ in range(n)]  # the j = c term, exp(0) = 1
    for c in range(n):
        for j in range(c + 1, n):
            e = torch.exp(-(mu.select(axis, c) - mu.select(axis, j)) / torch.sqrt(1 + math.pi / 8 * variance(c, j)))
            den[c] = den[c] + e
            den[j] = den[j] + 1 / e
    p = 1.0 / torch.stack(den, axis)
    return p / p.sum(axis, keepdim=True)


class SegDiffHead(nn.Module):
    """The start distribution (covariance head) and the light flow head ``v_theta(x_t, t | c)`` of SegDiff."""

    def __init__(self, conv_op, num_classes: int, cond_channels: int, hidden: int = 16, sharpness: float = 2.0,
                 t_start: float = 0.0, rank: int = 10, mc_samples: int = 20, cov_penalty: float = 0.002):
        super().__init__()
        if not 0.0 <= t_start < 1.0:
            raise ValueError(f"t_start must be in [0, 1), got {t_start}")
        if rank < 1 or mc_samples < 1:
            raise ValueError(f"need rank >= 1 and mc_samples >= 1, got {rank}, {mc_samples}")
        self.num_classes = num_classes
        self.hidden = hidden
        self.sharpness = sharpness
        self.t_start = t_start
        self.rank = rank
        self.mc_samples = mc_samples
        self.cov_penalty = cov_penalty
        #: one sigmoid per channel (nnU-Net's regions) instead of one softmax; set by ``EnTrustUNet.use_regions``
        self.regions = False
        self.cond_proj = conv_op(cond_channels, hidden, 1)
        # P (C * r channels) and D (C channels); pointwise: the trunk before it already mixes space
        self.cov = nn.Sequential(nn.GELU(), conv_op(hidden, hidden, 1), nn.GELU(),
                                 conv_op(hidden, num_classes * (rank + 1), 1))
        self.reset_start()
        self.state_in = conv_op(num_classes, hidden, 3, padding=1)
        self.time_mlp = nn.Sequential(nn.Linear(16, hidden), nn.GELU(), nn.Linear(hidden, hidden))
        self.mid = conv_op(hidden, hidden, 1)
        self.out = conv_op(hidden, num_classes, 1)

    @torch.no_grad()
    def reset_start(self) -> None:
        """Start close to the deterministic head: P small (weights x 0.1), D = softplus(-5) = 0.007.

        Called again after nnU-Net's He initialisation (see ``EnTrustUNet.initialize``), which would
        otherwise give D = softplus(0) = 0.69 and a P as large as any feature map.
        """
        last = self.cov[-1]
        last.weight.mul_(0.1)
        last.bias.zero_()
        last.bias[self.num_classes * self.rank:] = -5.0

    @staticmethod
    def _time_features(t: torch.Tensor) -> torch.Tensor:
        freqs = torch.exp(torch.linspace(0, math.log(100.0), 8, device=t.device))
        angles = t[:, None] * freqs[None] * math.pi
        return torch.cat([angles.sin(), angles.cos()], 1)

    def condition(self, cond: torch.Tensor) -> torch.Tensor:
        """Project the conditioning once per patch: (B, cond_channels, *s) -> (B, hidden, *s)."""
        return self.cond_proj(cond)

    def start_hidden(self, cond_h: torch.Tensor) -> torch.Tensor:
        """The covariance head's hidden features (B, hidden, *s), before its last (linear) layer: computed once
        per patch and shared by :meth:`sample` and :meth:`start_mean` through their ``hidden`` argument."""
        return self.cov[:-1](cond_h)

    def covariance(self, cond_h: torch.Tensor, hidden: torch.Tensor | None = None
                   ) -> tuple[torch.Tensor, torch.Tensor]:
        """Low-rank factor P (B, C, r, *s) and diagonal D (B, C, *s) > 0 of the start's logit covariance
        (``hidden``: :meth:`start_hidden` of ``cond_h`` when already computed)."""
        out = self.cov[-1](self.start_hidden(cond_h) if hidden is None else hidden).float()
        c, r = self.num_classes, self.rank
        factor = out[:, :c * r].unflatten(1, (c, r))
        return factor, self._diagonal(out[:, c * r:])

    @staticmethod
    def _diagonal(raw: torch.Tensor) -> torch.Tensor:
        """D > 0 from the covariance head's last C channels."""
        return F.softplus(raw.float()) + 1e-6

    def _mean(self, logits: torch.Tensor | None, like: torch.Tensor) -> torch.Tensor:
        """The start's mean: the deterministic logits, or 0 (uniform) for a head used without them."""
        return like.new_zeros(like.shape[0], self.num_classes, *like.shape[2:]) if logits is None else logits.float()

    def start_loss(self, cond_h: torch.Tensor, target: torch.Tensor, logits: torch.Tensor | None = None,
                   generator: torch.Generator | None = None, valid: torch.Tensor | None = None,
                   start: tuple[torch.Tensor, torch.Tensor] | None = None) -> torch.Tensor:
        """SSN loss ``mean_b L_b``, ``L_b = -(1/N)[logsumexp_m sum_v log softmax(l_m)_v[y_v] - log M]`` plus
        the covariance cost ``lambda mean_v sum_c (sum_r P^2 + D)`` (see the module docstring).

        ``l_m = mu + P eps_m + sqrt(D) eta_m`` with M = ``mc_samples`` independent draws per image;
        ``logits`` = mu (B, C, *s): gradients flow into whatever is passed; ``EnTrustUNet`` passes detached
        logits and conditioning (SegDiff trains alone; SSN's joint training of the mean calibrated worse,
        docs/design.md).
        ``target``: labels (B, 1, *s), or region membership (B, C, *s) with ``regions``; ``valid`` (B, 1, *s):
        voxels outside it (ignore label) add nothing and N counts the valid voxels of image b. ``start``:
        :meth:`covariance` of ``cond_h`` when already computed.
        """
        factor, diag = self.covariance(cond_h) if start is None else start
        mu = self._mean(logits, cond_h)
        m, b = self.mc_samples, mu.shape[0]
        eps = torch.randn(m, b, self.rank, device=mu.device, generator=generator)
        eta = torch.randn(m, *mu.shape, device=mu.device, generator=generator)
        samples = mu + low_rank_shift(factor, eps) + diag.sqrt() * eta  # (M, B, C, *s)
        voxel_ll = label_log_likelihood(samples, target, self.regions)  # (M, B, 1, *s)
        if valid is None:
            n = torch.full((b,), float(voxel_ll[0, 0].numel()), device=mu.device)
        else:
            voxel_ll = voxel_ll * valid.to(voxel_ll.dtype)
            n = valid.flatten(1).sum(1).float().clamp_min(1)
        log_lik = voxel_ll.flatten(2).sum(-1)  # (M, B)
        cost = (factor.square().sum(2) + diag).sum(1).mean()
        return (-(torch.logsumexp(log_lik, 0) - math.log(m)) / n).mean() + self.cov_penalty * cost

    def start_probabilities(self, factor: torch.Tensor, diag: torch.Tensor, mu: torch.Tensor,
                            eps: torch.Tensor) -> torch.Tensor:
        """Hypotheses' start probabilities ``E_eta softmax(mu + P eps_k + sqrt(D) eta)`` (K, B, C, *s), by
        :func:`marginal_probabilities`."""
        return marginal_probabilities(mu + low_rank_shift(factor, eps), diag, self.regions)

    def start_sampler(self, cond_h: torch.Tensor, hidden: torch.Tensor | None = None):
        """The start's draws at inference without the factor P: ``(diag, shift)`` with ``diag`` = D (B, C, *s)
        and ``shift(eps)`` = ``P eps`` (K, B, C, *s) for latents (K, r); ``hidden`` as in :meth:`covariance`.

        P's last layer is linear, ``P_vcr = W_cr . h_v + b_cr``, so ``(P eps)_vc = (sum_r eps_r W_cr) . h_v +
        sum_r eps_r b_cr``: one C-channel 1x1 product per hypothesis on the head's hidden features ``h``
        instead of the C r channels of P and their contraction (the same numbers, docs/design.md)."""
        hidden = self.start_hidden(cond_h) if hidden is None else hidden
        last = self.cov[-1]
        c, r = self.num_classes, self.rank
        weight, bias = last.weight.flatten(1), last.bias
        diag = self._diagonal(pointwise_product(hidden, weight[c * r:], bias[c * r:]))
        w_p, b_p = weight[:c * r].unflatten(0, (c, r)), bias[:c * r].unflatten(0, (c, r))

        def shift(eps: torch.Tensor) -> torch.Tensor:
            e = eps.to(w_p.dtype)
            k = e.shape[0]
            out = pointwise_product(hidden, torch.einsum("crh,kr->kch", w_p, e).flatten(0, 1),
                                    torch.einsum("cr,kr->kc", b_p, e).flatten())
            return out.unflatten(1, (k, c)).transpose(0, 1).float()

        return diag, shift

    def velocity(self, x_t: torch.Tensor, t: torch.Tensor, cond_h: torch.Tensor) -> torch.Tensor:
        """v_theta for states (K, B, C, *s) at times t (K,) given projected conditioning (B, hidden, *s).

        The K states share one conditioning: it is broadcast, never copied K times.
        """
        temb = self.time_mlp(self._time_features(t.to(x_t.dtype)))
        return self._head(x_t, cond_h + temb.view(x_t.shape[0], 1, -1, *([1] * (x_t.dim() - 3))))

    def _head(self, x_t: torch.Tensor, bias: torch.Tensor) -> torch.Tensor:
        """The per-step network on states (K, B, C, *s), with conditioning + time embedding ``bias``
        broadcastable to (K, B, hidden, *s)."""
        k, b = x_t.shape[:2]
        h = self.state_in(x_t.flatten(0, 1)).unflatten(0, (k, b)) + bias
        h = F.gelu(self.mid(F.gelu(h.flatten(0, 1))))
        return self.out(h).unflatten(0, (k, b))

    def flow_loss(self, cond_h: torch.Tensor, target: torch.Tensor, logits: torch.Tensor | None = None,
                  generator: torch.Generator | None = None, valid: torch.Tensor | None = None,
                  start: tuple[torch.Tensor, torch.Tensor] | None = None) -> torch.Tensor:
        """Flow-matching regression loss from one (detached) start draw ``x_s = 2 p - 1`` per image, averaged
        over the ``valid`` voxels (all without a mask). ``start``: :meth:`covariance` of ``cond_h`` when
        already computed (used detached).

        The B states are passed as B hypotheses of one batch element each (one draw of (eps, t) per image).
        """
        x1 = one_hot_state(target, self.num_classes, self.regions).to(cond_h.dtype)
        with torch.no_grad():
            factor, diag = self.covariance(cond_h) if start is None else (t.detach() for t in start)
            eps = torch.randn(1, x1.shape[0], self.rank, device=x1.device, generator=generator)  # one per image
            x_s = (2 * self.start_probabilities(factor, diag, self._mean(logits, cond_h), eps)[0] - 1).to(x1.dtype)
        if valid is not None:  # no label to flow to: ignored voxels stay at the start (the 3x3 head sees them)
            x1 = torch.where(valid, x1, x_s)
        t0 = self.t_start
        t = t0 + (1 - t0) * torch.rand(x1.shape[0], device=x1.device, generator=generator)
        r = ((t - t0) / (1 - t0)).view(-1, *([1] * (x1.dim() - 1))).to(x1.dtype)
        x_t = (1 - r) * x_s + r * x1
        v = self.velocity(x_t.unsqueeze(1), t, cond_h.unsqueeze(1)).squeeze(1)
        return masked_mean((v - (x1 - x_s) / (1 - t0)).square(), valid)

    def losses(self, cond_h: torch.Tensor, target: torch.Tensor, logits: torch.Tensor | None = None,
               generator: torch.Generator | None = None, valid: torch.Tensor | None = None) -> dict[str, torch.Tensor]:
        """``start``: the SSN likelihood term; ``generative``: the flow-matching term (both over ``valid``), from
        one pass of the covariance head."""
        start = self.covariance(cond_h)
        return {"start": self.start_loss(cond_h, target, logits, generator, valid, start),
                "generative": self.flow_loss(cond_h, target, logits, generator, valid, start)}

    @torch.no_grad()
    def sample(self, cond_h: torch.Tensor, num_hypotheses: int, steps: int, seed: int = 0,
               logits: torch.Tensor | None = None, chunk: int = 2, hidden: torch.Tensor | None = None
               ) -> torch.Tensor:
        """K hypotheses per input: start draws, then S Euler steps; class probabilities (K, B, C, *s).

        Deterministic for a fixed ``seed``; hypothesis k depends only on ``(seed, k)`` (see
        :func:`latent_draws`), not on K, ``chunk``, the batch or the patch. The flow head runs on
        ``chunk`` hypotheses at a time, bounding the peak memory of sampling at that of ``chunk`` hypotheses.
        ``hidden``: the covariance head's features of ``cond_h`` (:meth:`start_hidden`) when already computed.
        """
        if steps < 0:
            raise ValueError(f"need steps >= 0, got {steps}")
        diag, shift = self.start_sampler(cond_h, hidden)
        mu = self._mean(logits, cond_h)
        eps = latent_draws(num_hypotheses, self.rank, seed).to(cond_h.device)
        t0 = self.t_start
        dt = (1.0 - t0) / max(steps, 1)
        # every hypothesis is at the same time at step i: conditioning + time embedding once per step
        times = t0 + dt * torch.arange(steps, device=cond_h.device, dtype=cond_h.dtype)
        biases = [cond_h + e.view(1, -1, *([1] * (cond_h.dim() - 2)))
                  for e in (self.time_mlp(self._time_features(times)) if steps else [])]
        out = []
        for e in eps.split(max(1, int(chunk))):
            p = marginal_probabilities(mu + shift(e), diag, self.regions)
            if not steps:
                out.append(p)
                continue
            x = (2 * p - 1).to(cond_h.dtype)
            for bias in biases:
                x = (x + dt * self._head(x, bias)).clamp_(-STATE_CLAMP, STATE_CLAMP)
            out.append(self.state_probabilities(x))
        return out[0] if len(out) == 1 else torch.cat(out, 0)

    @torch.no_grad()
    def start_mean(self, cond_h: torch.Tensor, logits: torch.Tensor | None = None,
                   hidden: torch.Tensor | None = None) -> torch.Tensor:
        """The start's class probabilities in expectation over its draws (B, C, *s): per region the probit
        approximation with each logit's whole variance ``D + sum_r P^2``, per softmax :func:`expected_softmax`
        (the variance of the logit differences). What K = 8 draws average to, without their Monte-Carlo noise.
        ``hidden`` as in :meth:`covariance`."""
        factor, diag = self.covariance(cond_h, hidden)
        mu = self._mean(logits, cond_h)
        if self.regions:
            return marginal_probabilities(mu, diag + factor.square().sum(2), regions=True)
        return expected_softmax(mu, factor, diag)

    def state_probabilities(self, x: torch.Tensor) -> torch.Tensor:
        """A flow state (K, B, C, *s) in [-1, 1] as probabilities: ``softmax(sharpness x)`` over C, or per
        region ``sigmoid(2 sharpness x)`` (the two-class softmax of ``(x, -x)``)."""
        if self.regions:
            return torch.sigmoid(2 * self.sharpness * x.float())
        return torch.softmax(self.sharpness * x.float(), 2)

    def compute_conv_feature_map_size(self, input_size) -> int:
        """Activations per patch while training, the planner's convention: flow head (one state per sample),
        covariance head, and the M start samples of the likelihood."""
        n = int(torch.tensor(input_size).prod())
        c = self.num_classes
        return (3 * self.hidden + c + 2 * self.hidden + c * (self.rank + 1) + self.mc_samples * c) * n
