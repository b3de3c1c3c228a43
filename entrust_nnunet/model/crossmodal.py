"""Cross-modal prediction conflict: where one modality shows what the others do not.

For each modality m a small convolutional net predicts its normalised image from the other modalities, with a
per-voxel variance (a heteroscedastic Gaussian: mean ``mu_m`` and ``log var_m``, fitted by the Gaussian NLL,
:func:`fit_predictor`). Its standardised squared residual

    z2_m = (x_m - mu_m)^2 / var_m

is ~1 on average wherever the modalities co-vary, however fuzzy the structure: on a blurred edge every modality
changes together and the net widens its variance where it cannot place the edge exactly. Where one modality shows a
structure the others hide (or hides one they show), nothing in the others can predict it and z2 is large. The
conflict map is

    c = clamp(log(z2 / LOW) / log(HIGH / LOW), 0, 1),   z2 = max over m of the Gaussian-smoothed (sigma 1 voxel) z2_m

LOW = 4 and HIGH = 16 in units of z2's own expectation (1): a voxel whose residual is four times what the net
expects starts to count, sixteen times counts fully. They were set on the project's phantoms (development seed),
where consistent voxels stay below ~3 at their 99th percentile and conflicting structures reach 8-80, before
the held-out generator was scored (docs/design.md, "A conflict map the labels do not teach").

The nets are fitted once the segmentation network is trained, on the training cases as preprocessed: the images
they meet at inference. Fitted inside nnU-Net's loop they learned from its per-channel intensity augmentation,
which makes every modality less predictable from the others, so they widened their variance and the map weakened
(docs/design.md). Until fitted the map is 0.

It needs no label: a conflict never seen in training is as unpredictable as one seen. It sees only what the
images show, so it cannot tell which of two readings is right; EnTrust's coin reading
(:mod:`~entrust_nnunet.model.alternatives`) turns it into hypotheses that take or leave the structure.
A sample with any modality absent has no conflict here (every prediction needs all the other modalities).
"""
from __future__ import annotations

import math
from typing import Iterator

import torch
from dynamic_network_architectures.building_blocks.helper import convert_conv_op_to_dim
from torch import nn
from torch.nn import functional as F

from entrust_nnunet.model.absence import without_absent
from entrust_nnunet.model.alternatives import alternatives_gate, coin_gate
from entrust_nnunet.model.network import EnTrustUNet
from entrust_nnunet.model.outputs import full_resolution, probabilities

#: the conflict ramp's ends, in units of the standardised squared residual's expectation (module doc)
LOW, HIGH = 4.0, 16.0
#: the residuals are smoothed over this many voxels (Gaussian sigma) before the ramp: a structure, not speckle
SMOOTHING = 1.0
#: the predicted log-variance is kept within +-LOG_VAR_BOUND (a net at initialisation cannot divide by ~0)
LOG_VAR_BOUND = 8.0
#: Adam steps and learning rate of :func:`fit_predictor` (the development study's fit: docs/design.md)
FIT_STEPS, FIT_LR = 600, 3e-3


def gaussian_smooth(x: torch.Tensor, sigma: float = SMOOTHING) -> torch.Tensor:
    """Separable Gaussian smoothing of every channel of ``x`` (B, C, *s; 1-3 spatial axes), ``sigma`` in voxels,
    the kernel cut at 3 sigma, edges replicated."""
    r = max(1, math.ceil(3 * sigma))
    t = torch.arange(-r, r + 1, dtype=x.dtype, device=x.device)
    kernel = torch.exp(-t ** 2 / (2 * sigma ** 2))
    kernel = kernel / kernel.sum()
    dim, c = x.dim() - 2, x.shape[1]
    conv = (F.conv1d, F.conv2d, F.conv3d)[dim - 1]
    for axis in range(dim):
        shape = [1] * dim
        shape[axis] = 2 * r + 1
        pad = [0, 0] * dim
        pad[2 * (dim - 1 - axis)] = pad[2 * (dim - 1 - axis) + 1] = r  # F.pad lists the last axis first
        x = conv(F.pad(x, pad, mode="replicate"), kernel.view(1, 1, *shape).expand(c, 1, *shape), groups=c)
    return x


class CrossModalPredictor(nn.Module):
    """M small nets in one grouped stack: net m maps the other M - 1 modalities (B, M - 1, *s) through ``layers``
    k x k convolutions of ``width`` channels (LeakyReLU) to ``(mu_m, log var_m)``. ``forward`` (B, M, *s) ->
    (B, M, 2, *s). ``fitted`` (a buffer, saved with the weights): 1 once :func:`fit_predictor` has fitted them."""

    def __init__(self, conv_op, num_modalities: int, width: int = 16, layers: int = 3, kernel_size: int = 3):
        super().__init__()
        m = self.num_modalities = num_modalities
        if m < 2:
            raise ValueError(f"cross-modal prediction needs at least two modalities, got {m}")
        k = [kernel_size] * convert_conv_op_to_dim(conv_op)
        blocks, c = [], m * (m - 1)
        for _ in range(layers):
            blocks += [conv_op(c, m * width, k, padding=[kernel_size // 2] * len(k), groups=m),
                       nn.LeakyReLU(1e-2, inplace=True)]
            c = m * width
        self.net = nn.Sequential(*blocks, conv_op(c, 2 * m, 1, groups=m))
        #: input channel order: the others of modality 0, then of modality 1, ...
        self.register_buffer("fitted", torch.zeros(()))
        self.register_buffer("others", torch.tensor([j for i in range(m) for j in range(m) if j != i]),
                             persistent=False)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.net(x[:, self.others]).unflatten(1, (self.num_modalities, 2))

    @staticmethod
    def _moments(prediction: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """(mu, log var) (B, M, *s) in float32 from :meth:`forward`'s output, the log-variance within its bound."""
        return prediction[:, :, 0].float(), prediction[:, :, 1].float().clamp(-LOG_VAR_BOUND, LOG_VAR_BOUND)

    def nll(self, prediction: torch.Tensor, x: torch.Tensor, mask: torch.Tensor) -> torch.Tensor:
        """Gaussian NLL (up to its constant) ``0.5 (log var + (x - mu)^2 / var)``, mean over the voxels and
        modalities of the samples whose modalities are all present (``mask`` (B, M), 1 = present); 0 with
        gradient when none is."""
        mu, log_var = self._moments(prediction)
        per_sample = (0.5 * (log_var + (x.float() - mu) ** 2 * torch.exp(-log_var))).flatten(1).mean(1)
        complete = (mask > 0).all(1)
        # where, not a product: an absent channel may hold anything (NaN included), and 0 * NaN is NaN
        return torch.where(complete, per_sample, 0.0).sum() / complete.sum().clamp_min(1)

    def conflict(self, prediction: torch.Tensor, x: torch.Tensor, mask: torch.Tensor) -> torch.Tensor:
        """The conflict map ``c`` (B, 1, *s) in [0, 1] of the module doc; 0 for samples with a modality absent, and
        everywhere until the nets are fitted."""
        mu, log_var = self._moments(prediction)
        z2 = gaussian_smooth((x.float() - mu) ** 2 * torch.exp(-log_var)).amax(1, keepdim=True)
        c = (torch.log(z2.clamp_min(1e-12) / LOW) / math.log(HIGH / LOW)).clamp(0, 1)
        complete = (mask > 0).all(1).view(-1, *[1] * (c.dim() - 1)) & (self.fitted > 0)  # no host sync
        return torch.where(complete, c, 0.0)


def fit_predictor(predictor: CrossModalPredictor, batches: Iterator[torch.Tensor], steps: int = FIT_STEPS,
                  lr: float = FIT_LR) -> tuple[float, float]:
    """Fit ``predictor`` by Adam on its NLL over ``steps`` batches (B, M, *s) of complete images (every modality
    present; the predictor's device) and mark it fitted; returns the mean NLL of the first and the last tenth of
    the steps."""
    optimizer = torch.optim.Adam(predictor.parameters(), lr)
    losses = []
    with torch.enable_grad():
        for _ in range(steps):
            x = next(batches).float()
            loss = predictor.nll(predictor(x), x, x.new_ones(x.shape[:2]))
            optimizer.zero_grad(set_to_none=True)
            loss.backward()
            optimizer.step()
            losses.append(loss.detach())
    predictor.zero_grad(set_to_none=True)
    predictor.fitted.fill_(1.0)
    tenth = max(1, steps // 10)
    return float(torch.stack(losses[:tenth]).mean()), float(torch.stack(losses[-tenth:]).mean())


class EnTrustCrossModalUNet(EnTrustUNet):
    """EnTrust whose conflict map is the cross-modal prediction conflict (module doc) instead of the experts'
    Jensen-Shannon divergence, read by the coin: where it is open, half the hypotheses take the structure (as the
    likeliest foreground class) and half leave it. The gate is the conflict itself (alternatives strength 1), and
    CalibHead, the class calibration's conflict biases and the P(error) floor read it as they read the experts'.
    The trunk is EnTrust's (its experts still inform EnFuse); ``crossmodal_width``: channels per modality's net.
    The predictors take no part in training (no loss term, not run): they are fitted afterwards (module doc)."""

    def __init__(self, input_channels: int, n_stages: int, features_per_stage, conv_op, *args,
                 crossmodal_width: int = 16, **kwargs):
        kwargs.setdefault("expert_alternatives", 1.0)
        super().__init__(input_channels, n_stages, features_per_stage, conv_op, *args, **kwargs)
        self.crossmodal = CrossModalPredictor(conv_op, self.num_modalities, crossmodal_width)

    @property
    def conflict_reading(self) -> str:
        return "coin"

    def _trunk(self, x: torch.Tensor, keep_all: bool, mask: torch.Tensor) -> dict:
        parts = super()._trunk(x, keep_all, mask)
        if not keep_all:  # training reads no conflict map
            # absent channels removed as the trunk removes them: whatever they hold never reaches an output
            images = without_absent(x[:, :self.num_modalities], mask)
            parts["image_conflict"] = self.crossmodal.conflict(self.crossmodal(images), images, mask)
        return parts

    def _full_resolution_experts(self, parts: dict, size) -> dict[str, torch.Tensor | None]:
        """What the coin reads, once per patch: the cross-modal ``conflict`` (already at the input's resolution), the
        modality ``mask``, the head's probabilities as its ``split`` (every hypothesis, ProbeStep's moved ones
        included, takes the same class) and its gate with whole structures (``whole``, :func:`coin_gate`; the mean
        and every set of hypotheses read the same). The coin reads no expert, so their probabilities are not
        upsampled."""
        conflict = parts["image_conflict"].float()
        return {"experts": None, "conflict": conflict, "mask": parts["modality_mask"],
                "split": probabilities(full_resolution(parts["logits"]).float(), self.regions),
                "whole": coin_gate(alternatives_gate(conflict, self.expert_alternatives))}
