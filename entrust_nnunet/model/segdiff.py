"""SegDiff: a flow-matching segmentation decoder in the logit space of the mask, conditioned on F_en.

Choice: conditional flow matching (rectified flow) rather than DDPM diffusion, because a straight
probability path needs few Euler steps (S <= 10) and its loss is a plain regression.

* Data point: ``x1 = 2 * onehot(y) - 1`` (C channels, +1 for the true class, -1 elsewhere).
* Start (truncated flow matching, as in ATFM): at ``t0 = t_start`` the state is
  ``x_s = (1 - t0) z + t0 (2 p_det - 1)`` with ``z ~ N(0, I)`` and ``p_det`` the deterministic head's
  (detached) probabilities; with ``t0 = 0`` it is pure noise.
* Path: straight from ``x_s`` at ``t0`` to ``x1`` at 1: ``x_t = (1 - r) x_s + r x1``,
  ``r = (t - t0) / (1 - t0)``; target velocity ``(x1 - x_s) / (1 - t0)``.
* Loss: ``|| v_theta(x_t, t | c) - (x1 - x_s) / (1 - t0) ||^2`` with ``t ~ U(t0, 1)``.
* Sampling: Euler steps from ``x_s`` at ``t0`` to 1 for K hypotheses; training and sampling
  use the same start distribution. Anchoring at the deterministic prediction keeps the mask as
  good as the deterministic head and lets few steps suffice; where ``p_det`` is undecided the start
  is mostly noise and the hypotheses spread.
* Hypothesis k's class probabilities: ``softmax(sharpness * x1_hat_k)``.

Cost: the conditioning ``c`` (decoder features at full resolution and F_cf) is projected ONCE per
patch (:meth:`SegDiffHead.condition`) and shared by the K hypotheses (broadcast, not copied); the
time embedding is computed once per step. Each of the K x S steps runs only the light head (one
3x3 conv on the C-channel state, two 1x1 convs of ``hidden`` channels), on ``chunk`` hypotheses at a
time so that memory does not grow with K.
Where the conditioning is the same but the training labels were split (ambiguous voxels), the
learned velocity field is bimodal and the K hypotheses diverge; elsewhere they agree.
"""
from __future__ import annotations

import math

import torch
from torch import nn
from torch.nn import functional as F

#: bound on the state so that logits stay finite in fp16 (nnU-Net accumulates in half precision)
STATE_CLAMP = 4.0


def one_hot_state(target: torch.Tensor, num_classes: int) -> torch.Tensor:
    """(B, 1, *s) integer labels -> (B, C, *s) flow-matching data point in {-1, +1}."""
    onehot = F.one_hot(target[:, 0].long(), num_classes).movedim(-1, 1)
    return onehot.float() * 2 - 1


class SegDiffHead(nn.Module):
    """The light denoising head ``v_theta(x_t, t | c)`` of SegDiff."""

    def __init__(self, conv_op, num_classes: int, cond_channels: int, hidden: int = 16, sharpness: float = 2.0,
                 t_start: float = 0.0):
        super().__init__()
        if not 0.0 <= t_start < 1.0:
            raise ValueError(f"t_start must be in [0, 1), got {t_start}")
        self.num_classes = num_classes
        self.hidden = hidden
        self.sharpness = sharpness
        self.t_start = t_start
        self.cond_proj = conv_op(cond_channels, hidden, 1)
        self.state_in = conv_op(num_classes, hidden, 3, padding=1)
        self.time_mlp = nn.Sequential(nn.Linear(16, hidden), nn.GELU(), nn.Linear(hidden, hidden))
        self.mid = conv_op(hidden, hidden, 1)
        self.out = conv_op(hidden, num_classes, 1)

    @staticmethod
    def _time_features(t: torch.Tensor) -> torch.Tensor:
        freqs = torch.exp(torch.linspace(0, math.log(100.0), 8, device=t.device))
        angles = t[:, None] * freqs[None] * math.pi
        return torch.cat([angles.sin(), angles.cos()], 1)

    def condition(self, cond: torch.Tensor) -> torch.Tensor:
        """Project the conditioning once per patch: (B, cond_channels, *s) -> (B, hidden, *s)."""
        return self.cond_proj(cond)

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

    def start_state(self, noise: torch.Tensor, init_probs: torch.Tensor | None) -> torch.Tensor:
        """``x_s = (1 - t0) z + t0 (2 p_det - 1)`` (just ``z`` when t0 = 0 or no probabilities are given)."""
        if self.t_start == 0 or init_probs is None:
            return noise
        return (1 - self.t_start) * noise + self.t_start * (2 * init_probs.to(noise.dtype) - 1)

    def loss(self, cond_h: torch.Tensor, target: torch.Tensor, init_probs: torch.Tensor | None = None,
             generator: torch.Generator | None = None) -> torch.Tensor:
        """Flow-matching regression loss for integer ``target`` (B, 1, *s) given projected conditioning and
        (for t_start > 0) the deterministic head's probabilities ``init_probs`` (B, C, *s), detached.

        One draw of (z, t) per sample: the B states are passed as B hypotheses of one batch element each.
        """
        x1 = one_hot_state(target, self.num_classes).to(cond_h.dtype)
        noise = torch.randn(x1.shape, device=x1.device, dtype=x1.dtype, generator=generator)
        x_s = self.start_state(noise, None if init_probs is None else init_probs.detach())
        t0 = self.t_start
        t = t0 + (1 - t0) * torch.rand(x1.shape[0], device=x1.device, generator=generator)
        r = ((t - t0) / (1 - t0)).view(-1, *([1] * (x1.dim() - 1))).to(x1.dtype)
        x_t = (1 - r) * x_s + r * x1
        v = self.velocity(x_t.unsqueeze(1), t, cond_h.unsqueeze(1)).squeeze(1)
        return F.mse_loss(v, (x1 - x_s) / (1 - t0))

    def noise(self, cond_h: torch.Tensor, num_hypotheses: int, seed: int) -> torch.Tensor:
        """Start noise (K, B, C, *s) of K hypotheses, from a generator seeded with ``seed``.

        Drawn one hypothesis after the other, so the first k of K hypotheses are those of a draw of k:
        hypotheses are nested across K (ProbeStep relies on it).
        """
        if num_hypotheses < 1:
            raise ValueError(f"need num_hypotheses >= 1, got {num_hypotheses}")
        gen = torch.Generator(device=cond_h.device).manual_seed(int(seed))
        shape = (cond_h.shape[0], self.num_classes, *cond_h.shape[2:])
        return torch.stack([torch.randn(shape, device=cond_h.device, dtype=cond_h.dtype, generator=gen)
                            for _ in range(num_hypotheses)])

    @torch.no_grad()
    def sample(self, cond_h: torch.Tensor, num_hypotheses: int, steps: int, seed: int = 0,
               init_probs: torch.Tensor | None = None, chunk: int = 2) -> torch.Tensor:
        """K hypotheses per input by Euler integration; returns class probabilities (K, B, C, *s).

        Deterministic for a fixed ``seed``; hypothesis k depends only on its own noise (see
        :meth:`noise`), not on K or ``chunk``. The head runs on ``chunk`` hypotheses at a time: its
        hidden activations are ``hidden / C`` times larger than a hypothesis, so chunking bounds the
        peak memory of sampling at that of ``chunk`` hypotheses, whatever K.
        """
        if steps < 1:
            raise ValueError(f"need steps >= 1, got {steps}")
        noise = self.noise(cond_h, num_hypotheses, seed)
        t0 = self.t_start
        dt = (1.0 - t0) / steps
        # every hypothesis is at the same time at step i: conditioning + time embedding once per step
        times = t0 + dt * torch.arange(steps, device=cond_h.device, dtype=cond_h.dtype)
        temb = self.time_mlp(self._time_features(times))
        biases = [cond_h + e.view(1, -1, *([1] * (cond_h.dim() - 2))) for e in temb]
        out = []
        for z in noise.split(max(1, int(chunk))):
            x = self.start_state(z, init_probs)
            for bias in biases:
                x = (x + dt * self._head(x, bias)).clamp_(-STATE_CLAMP, STATE_CLAMP)
            out.append(torch.softmax(self.sharpness * x.float(), 2))
        return torch.cat(out, 0)

    def compute_conv_feature_map_size(self, input_size) -> int:
        """Activations per patch while training (one state per sample), the planner's convention."""
        n = int(torch.tensor(input_size).prod())
        return (3 * self.hidden + self.num_classes) * n
