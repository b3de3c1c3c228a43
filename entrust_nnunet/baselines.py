"""Uncertainty baselines that EnTrust is compared against, as nnU-Net networks and trainers.

Both networks are built from the arch kwargs nnU-Net's planner writes for PlainConvUNet (so any
``nnUNetPlans``/``nnUNetEnTrustPlans`` trains them, 2D or 3D), return what PlainConvUNet returns
from ``forward`` (deep-supervision list while training, full-resolution logits otherwise), and have
``sample_statistics(x, num_samples, seed)``, through which ``entrust predict``
(:func:`entrust_nnunet.predict.uncertainty_statistics`) pools their ``mean`` class probabilities,
``aleatoric`` map and ``conflict`` map over sliding-window patches, mirrorings and folds exactly as
it pools EnTrust's hypotheses. One idea per class:

* :class:`MCDropoutUNet` / :class:`nnUNetTrainerMCDropout`: Monte-Carlo dropout (Gal & Ghahramani):
  PlainConvUNet with dropout in the decoder only, T stochastic passes at inference;
* :class:`CRNPUNet` / :class:`nnUNetTrainerCRNP`: cross-modal random network prediction: one encoder
  per modality; at the bottleneck, a frozen random target network and a small trained predictor per
  modality, whose prediction error says how unfamiliar that modality's features are and sets the
  modality weights of the fusion; predictors trained on alternate iterations (:class:`CRNPLoss`).

The trainers change only ``build_network_architecture`` (and, for CRNP, ``_build_loss``); nnU-Net's
``train_step``, validation, and inference run unchanged.
"""
from __future__ import annotations

import inspect
from collections import defaultdict
from types import SimpleNamespace

import numpy as np
import torch
from dynamic_network_architectures.architectures.unet import PlainConvUNet
from dynamic_network_architectures.building_blocks.helper import convert_conv_op_to_dim, get_matching_dropout
from dynamic_network_architectures.building_blocks.unet_decoder import UNetDecoder
from dynamic_network_architectures.initialization.weight_init import InitWeights_He
from nnunetv2.training.nnUNetTrainer.nnUNetTrainer import nnUNetTrainer
from nnunetv2.utilities.get_network_from_plans import get_network_from_plans
from torch import nn
from torch.nn import functional as F
from torch.nn.modules.dropout import _DropoutNd

from entrust_nnunet.encoders import ModalityEncoders
from entrust_nnunet.metrics import entropy
from entrust_nnunet.training import DEMO_SCHEDULE, TINY_SCHEDULE, ScheduleMixin, unwrap

MCDROPOUT_NETWORK = "entrust_nnunet.baselines.MCDropoutUNet"
CRNP_NETWORK = "entrust_nnunet.baselines.CRNPUNet"
#: PlainConvUNet's constructor arguments: the plan arch kwargs both baselines accept
_PLAIN_ARGS = set(inspect.signature(PlainConvUNet.__init__).parameters) - {"self", "input_channels", "num_classes"}


def plain_arch_kwargs(configuration_manager) -> tuple[dict, list[str]]:
    """The plans' arch kwargs reduced to PlainConvUNet's, whatever network class the plans name.

    ResidualEncoderUNet's ``n_blocks_per_stage`` becomes ``n_conv_per_stage``; kwargs of other classes
    (e.g. EnTrustUNet's options) are dropped. Returns (kwargs, the keys among them to import).
    """
    kwargs = dict(configuration_manager.network_arch_init_kwargs)
    if "n_conv_per_stage" not in kwargs and "n_blocks_per_stage" in kwargs:
        kwargs["n_conv_per_stage"] = kwargs["n_blocks_per_stage"]
    kwargs = {k: v for k, v in kwargs.items() if k in _PLAIN_ARGS}
    req_import = [k for k in configuration_manager.network_arch_init_kwargs_req_import if k in kwargs]
    return kwargs, req_import


def _build(network: str, configuration_manager, num_input_channels: int, num_output_channels: int,
           enable_deep_supervision: bool) -> nn.Module:
    kwargs, req_import = plain_arch_kwargs(configuration_manager)
    return get_network_from_plans(network, kwargs, req_import, num_input_channels, num_output_channels,
                                  allow_init=True, deep_supervision=enable_deep_supervision)


def _full_resolution(logits):
    return logits[0] if isinstance(logits, (list, tuple)) else logits


# ==================================================================================== MC dropout
class MCDropoutUNet(PlainConvUNet):
    """PlainConvUNet with dropout in the decoder only, sampled at inference (MC dropout).

    Built from PlainConvUNet's arch kwargs. The encoder gets no dropout (a ``dropout_op`` in the
    plans is ignored); the decoder is nnU-Net's own UNetDecoder given ``dropout_op`` and
    ``dropout_op_kwargs = {"p": decoder_dropout_p}``, so every decoder conv block is
    conv -> dropout -> norm -> nonlin. ``decoder_dropout_op`` defaults to the dropout nnU-Net pairs
    with the conv op (``get_matching_dropout``: Dropout2d/Dropout3d, i.e. whole feature maps dropped).

    Training is plain nnU-Net (dropout active in train mode); in eval mode ``forward`` is
    deterministic, so nnU-Net's validation and ``nnUNetv2_predict`` see an ordinary U-Net.
    """

    def __init__(self, input_channels: int, n_stages: int, features_per_stage, conv_op, kernel_sizes, strides,
                 n_conv_per_stage, num_classes: int, n_conv_per_stage_decoder, conv_bias: bool = False,
                 norm_op=None, norm_op_kwargs: dict | None = None, dropout_op=None,
                 dropout_op_kwargs: dict | None = None, nonlin=None, nonlin_kwargs: dict | None = None,
                 deep_supervision: bool = False, nonlin_first: bool = False, decoder_dropout_p: float = 0.1,
                 decoder_dropout_op=None):
        super().__init__(input_channels, n_stages, features_per_stage, conv_op, kernel_sizes, strides,
                         n_conv_per_stage, num_classes, n_conv_per_stage_decoder, conv_bias, norm_op, norm_op_kwargs,
                         None, None, nonlin, nonlin_kwargs, deep_supervision, nonlin_first)
        if not 0 < decoder_dropout_p < 1:
            raise ValueError(f"decoder_dropout_p must be in (0, 1), got {decoder_dropout_p}")
        self.decoder_dropout_p = decoder_dropout_p
        dropout = decoder_dropout_op or get_matching_dropout(dimension=convert_conv_op_to_dim(conv_op))
        self.decoder = UNetDecoder(self.encoder, num_classes, n_conv_per_stage_decoder, deep_supervision,
                                   nonlin_first=nonlin_first, dropout_op=dropout,
                                   dropout_op_kwargs={"p": decoder_dropout_p})

    def dropout_layers(self) -> list[_DropoutNd]:
        return [m for m in self.modules() if isinstance(m, _DropoutNd)]

    @torch.no_grad()
    def sample_statistics(self, x: torch.Tensor, num_samples: int = 8, seed: int = 0) -> dict[str, torch.Tensor]:
        """T = ``num_samples`` stochastic passes, dropout layers (only) in train mode.

        ``p_t = softmax(f(x; dropout mask t))``; ``mean = (1/T) sum_t p_t`` (B, C, *s);
        ``aleatoric = (1/T) sum_t H(p_t)`` (expected entropy, nats, B, *s); ``conflict = 0`` (one
        fused stream: no notion of modalities disagreeing). The T masks are drawn from
        ``torch.manual_seed(seed)`` inside ``torch.random.fork_rng``: the same seed gives the same
        statistics and the caller's RNG state is left untouched. Norm layers stay in eval mode.
        """
        if num_samples < 1:
            raise ValueError(f"num_samples must be >= 1, got {num_samples}")
        layers = self.dropout_layers()
        modes = [m.training for m in layers]
        devices = [x.device] if x.device.type == "cuda" else []
        mean = aleatoric = None
        try:
            for m in layers:
                m.train(True)
            with torch.random.fork_rng(devices=devices):
                torch.manual_seed(seed)
                for _ in range(num_samples):
                    p = torch.softmax(_full_resolution(self(x)).float(), 1)
                    h = entropy(p, axis=1)
                    mean = p if mean is None else mean + p
                    aleatoric = h if aleatoric is None else aleatoric + h
        finally:
            for m, mode in zip(layers, modes):
                m.train(mode)
        mean, aleatoric = mean / num_samples, aleatoric / num_samples
        return {"mean": mean, "aleatoric": aleatoric, "conflict": torch.zeros_like(aleatoric)}


class nnUNetTrainerMCDropout(nnUNetTrainer):
    """nnU-Net training of :class:`MCDropoutUNet` (decoder dropout p = 0.1) from the plans' arch kwargs."""

    @staticmethod
    def build_network_architecture(plans_manager, configuration_manager, num_input_channels: int,
                                   num_output_channels: int, enable_deep_supervision: bool = True) -> nn.Module:
        return _build(MCDROPOUT_NETWORK, configuration_manager, num_input_channels, num_output_channels,
                      enable_deep_supervision)


class nnUNetTrainerMCDropout_demo(ScheduleMixin, nnUNetTrainerMCDropout):
    """MC dropout on the demo's short CPU schedule (DEMO_SCHEDULE)."""

    schedule = DEMO_SCHEDULE


class nnUNetTrainerMCDropout_tinyCPU(ScheduleMixin, nnUNetTrainerMCDropout):
    """For tests: TINY_SCHEDULE."""

    schedule = TINY_SCHEDULE


# ==================================================================================== CRNP
def _conv_block(conv_op, cin: int, cout: int, kernel_size, nonlin, nonlin_kwargs) -> list[nn.Module]:
    k = [kernel_size] * convert_conv_op_to_dim(conv_op) if isinstance(kernel_size, int) else list(kernel_size)
    return [conv_op(cin, cout, k, padding=[(i - 1) // 2 for i in k]), nonlin(**(nonlin_kwargs or {}))]


class RandomNetworkPair(nn.Module):
    """One modality's random network prediction pair on its bottleneck features h (B, w, *s).

    ``target`` g: conv k (w -> 2r) - nonlin - conv k (2r -> 2r) - nonlin - conv 1 (2r -> r), randomly
    initialised and frozen (``requires_grad=False``; its weights are parameters, so they are in the
    state dict and travel with the checkpoint). ``predictor`` f, smaller and trained:
    conv k (w -> r) - nonlin - conv 1 (r -> r). ``forward`` gives the per-voxel error
    ``e = (1/r) sum_c (f(h) - g(h))_c^2`` (B, *s).
    """

    def __init__(self, conv_op, width: int, rnp_width: int, kernel_size, nonlin, nonlin_kwargs):
        super().__init__()
        r = rnp_width
        self.target = nn.Sequential(*_conv_block(conv_op, width, 2 * r, kernel_size, nonlin, nonlin_kwargs),
                                    *_conv_block(conv_op, 2 * r, 2 * r, kernel_size, nonlin, nonlin_kwargs),
                                    conv_op(2 * r, r, 1))
        self.predictor = nn.Sequential(*_conv_block(conv_op, width, r, kernel_size, nonlin, nonlin_kwargs),
                                       conv_op(r, r, 1))
        self.target.requires_grad_(False)

    def forward(self, h: torch.Tensor) -> torch.Tensor:
        with torch.no_grad():
            t = self.target(h)
        return (self.predictor(h) - t).float().pow(2).mean(1)


class CRNPUNet(nn.Module):
    """Cross-modal random network prediction U-Net, built from PlainConvUNet's arch kwargs (+ CRNP options).

    With ``h_m`` (B, w_L, *s_L) modality m's bottleneck features (one :class:`ModalityEncoders`
    encoder per input channel), ``sg`` stop-gradient, M modalities:

    1. error: ``e_m = RandomNetworkPair_m(sg(h_m))`` = (1/r) sum_c (f_m(sg h_m) - g_m(sg h_m))_c^2 per voxel;
       ``sg`` keeps the RNP loss out of the encoders, and the fusion below uses ``sg(e)``, so the
       segmentation loss never trains the predictors: f_m learns only from its RNP loss, ``mean(e_m)``.
    2. normalised error: ``ê_m = e_m / (sigma_m + 1e-6)``, ``sigma_m`` a buffer holding the running mean of
       e_m over training batches (first batch, then EMA with momentum ``rnp_momentum``), so ê ~ 1 on
       familiar features of every modality and > 1 on unfamiliar ones.
    3. fusion weights, per voxel, from the OTHER modalities' errors:
       ``w_n = softmax_n( sum_{m != n} ê_m / tau )`` (tau = ``fusion_temperature``): the more unfamiliar
       the other modalities' features are, the more weight modality n's features get. Because
       ``sum_{m != n} ê_m = sum_m ê_m - ê_n`` and softmax ignores a shared shift, this equals
       ``softmax_n(-ê_n / tau)``. M = 1 gives w = 1.
    4. residual fusion ``b = (1/M) sum_m h_m + sum_m w_m h_m``; 1x1 conv (w_L -> f_L) + norm + nonlin; one pre-norm
       self-attention block over the bottleneck voxels: ``z = b' + MHA(LN(b'))`` (torch.nn.MultiheadAttention,
       no positional encoding: the convolutional features carry position through padding).
    5. skips at stages s < L: the M streams concatenated, 1x1 conv (M w_s -> f_s) + norm + nonlin; then nnU-Net's
       UNetDecoder on [skips..., z] with nnU-Net's widths, so deep supervision works like PlainConvUNet's.

    Conflict map (:meth:`sample_statistics`): ``(max_m ê_m - min_m ê_m) / (max_m ê_m + 1e-6)`` in [0, 1] at the
    bottleneck, up-sampled (bi/trilinear, a convex interpolation, then clamped) to the input size; 0 for M = 1.
    """

    def __init__(self, input_channels: int, n_stages: int, features_per_stage, conv_op, kernel_sizes, strides,
                 n_conv_per_stage, num_classes: int, n_conv_per_stage_decoder, conv_bias: bool = False,
                 norm_op=None, norm_op_kwargs: dict | None = None, dropout_op=None,
                 dropout_op_kwargs: dict | None = None, nonlin=None, nonlin_kwargs: dict | None = None,
                 deep_supervision: bool = False, nonlin_first: bool = False, min_modality_width: int = 8,
                 rnp_width: int = 16, fusion_temperature: float = 1.0, rnp_momentum: float = 0.05,
                 attention_heads: int = 4):
        super().__init__()
        if n_stages < 2:
            raise ValueError("CRNPUNet needs at least two resolution stages")
        if isinstance(features_per_stage, int):
            features_per_stage = [features_per_stage] * n_stages
        if isinstance(kernel_sizes, int):
            kernel_sizes = [kernel_sizes] * n_stages
        nonlin = nonlin or nn.LeakyReLU
        self.num_modalities = m = input_channels
        self.num_classes = num_classes
        self.fusion_temperature = fusion_temperature
        self.rnp_momentum = rnp_momentum
        self.encoders = ModalityEncoders(m, n_stages, features_per_stage, conv_op, kernel_sizes, strides,
                                         n_conv_per_stage, conv_bias, norm_op, norm_op_kwargs, dropout_op,
                                         dropout_op_kwargs, nonlin, nonlin_kwargs, min_width=min_modality_width)
        widths = self.encoders.widths

        def project(cin, cout):
            norm = [norm_op(cout, **(norm_op_kwargs or {}))] if norm_op is not None else []
            return nn.Sequential(conv_op(cin, cout, 1, bias=True), *norm, nonlin(**(nonlin_kwargs or {})))

        self.skip_fusion = nn.ModuleList(project(m * w, f) for w, f in zip(widths[:-1], features_per_stage[:-1]))
        self.rnp = nn.ModuleList(RandomNetworkPair(conv_op, widths[-1], rnp_width, kernel_sizes[-1], nonlin,
                                                   nonlin_kwargs) for _ in range(m))
        self.register_buffer("rnp_scale", torch.ones(m))
        self.register_buffer("rnp_updates", torch.zeros((), dtype=torch.long))
        f_l = features_per_stage[-1]
        self.bottleneck_fusion = project(widths[-1], f_l)
        heads = attention_heads if f_l % attention_heads == 0 else 1
        self.attention_norm = nn.LayerNorm(f_l)
        self.attention = nn.MultiheadAttention(f_l, heads, batch_first=True)
        # UNetDecoder reads only these attributes of an encoder (the spec trick of entrust_nnunet.network)
        spec = SimpleNamespace(output_channels=list(features_per_stage), strides=self.encoders.strides,
                               kernel_sizes=kernel_sizes, conv_op=conv_op, conv_bias=conv_bias, norm_op=norm_op,
                               norm_op_kwargs=norm_op_kwargs, dropout_op=dropout_op,
                               dropout_op_kwargs=dropout_op_kwargs, nonlin=nonlin, nonlin_kwargs=nonlin_kwargs)
        self.decoder = UNetDecoder(spec, num_classes, n_conv_per_stage_decoder, deep_supervision,
                                   nonlin_first=nonlin_first)
        #: when True, training-mode forward() keeps its parts in ``last_parts`` for :class:`CRNPLoss`
        self.cache_parts = False
        self.last_parts: dict | None = None

    initialize = InitWeights_He(1e-2)

    # ------------------------------------------------------------------ forward
    def modality_errors(self, h: torch.Tensor) -> torch.Tensor:
        """RNP errors e (B, M, *s_L) of bottleneck features h (B, M, w_L, *s_L); gradients reach the predictors only."""
        h = h.detach()
        return torch.stack([pair(h[:, i]) for i, pair in enumerate(self.rnp)], 1)

    def normalised_errors(self, e: torch.Tensor) -> torch.Tensor:
        shape = (1, -1) + (1,) * (e.dim() - 2)
        return e.detach() / (self.rnp_scale.view(shape) + 1e-6)

    def fusion_weights(self, e_hat: torch.Tensor) -> torch.Tensor:
        """w (B, M, *s): softmax over modalities of the summed normalised errors of the OTHER modalities."""
        others = e_hat.sum(1, keepdim=True) - e_hat
        return torch.softmax(others / self.fusion_temperature, 1)

    @torch.no_grad()
    def _update_scale(self, e: torch.Tensor) -> None:
        batch = e.detach().float().transpose(0, 1).flatten(1).mean(1)
        if int(self.rnp_updates) == 0:
            self.rnp_scale.copy_(batch)
        else:
            self.rnp_scale.lerp_(batch, self.rnp_momentum)
        self.rnp_updates += 1

    def forward(self, x: torch.Tensor, return_parts: bool = False):
        skips = self.encoders(x)
        h = skips[-1]
        e = self.modality_errors(h)
        if self.training:
            self._update_scale(e)
        e_hat = self.normalised_errors(e)
        w = self.fusion_weights(e_hat)
        fused = h.mean(1) + (w.unsqueeze(2).to(h.dtype) * h).sum(1)
        z = self.bottleneck_fusion(fused)
        tokens = z.flatten(2).transpose(1, 2)
        q = self.attention_norm(tokens)
        tokens = tokens + self.attention(q, q, q, need_weights=False)[0]
        z = tokens.transpose(1, 2).reshape(z.shape)
        logits = self.decoder([f(s.flatten(1, 2)) for f, s in zip(self.skip_fusion, skips[:-1])] + [z])
        if return_parts or (self.cache_parts and self.training):
            parts = {"logits": logits, "errors": e, "normalised_errors": e_hat, "weights": w}
            if self.cache_parts and self.training:
                self.last_parts = parts
            if return_parts:
                return parts
        return logits

    @staticmethod
    def rnp_loss(parts: dict) -> torch.Tensor:
        """The predictors' loss: mean RNP error over batch, modalities and bottleneck voxels (reaches f_m only)."""
        return parts["errors"].mean()

    def conflict(self, e_hat: torch.Tensor, size) -> torch.Tensor:
        """(max_m ê_m - min_m ê_m) / (max_m ê_m + 1e-6) (B, *size), bottleneck map up-sampled to ``size``."""
        if e_hat.shape[1] < 2:
            return torch.zeros((e_hat.shape[0], *size), device=e_hat.device)
        hi, lo = e_hat.float().amax(1, keepdim=True), e_hat.float().amin(1, keepdim=True)
        c = (hi - lo) / (hi + 1e-6)
        mode = "bilinear" if c.dim() == 4 else "trilinear"
        return F.interpolate(c, size=tuple(size), mode=mode, align_corners=False)[:, 0].clamp(0, 1)

    @torch.no_grad()
    def sample_statistics(self, x: torch.Tensor, num_samples: int = 1, seed: int = 0) -> dict[str, torch.Tensor]:
        """One deterministic forward (``num_samples`` and ``seed`` are unused): ``mean`` = softmax of the logits
        (B, C, *s), ``aleatoric`` = its entropy (nats), ``conflict`` = :meth:`conflict` of the normalised RNP errors."""
        parts = self.forward(x, return_parts=True)
        mean = torch.softmax(_full_resolution(parts["logits"]).float(), 1)
        return {"mean": mean, "aleatoric": entropy(mean, axis=1),
                "conflict": self.conflict(parts["normalised_errors"], x.shape[2:])}

    def compute_conv_feature_map_size(self, input_size) -> int:
        """Activation estimate in PlainConvUNet's convention (encoders + fusion outputs + decoder)."""
        total = self.encoders.compute_conv_feature_map_size(input_size)
        size = list(input_size)
        for stage, stride in enumerate(self.encoders.strides):
            size = [i // j for i, j in zip(size, stride)]
            n = int(np.prod(size, dtype=np.int64))
            if stage < len(self.skip_fusion):
                total += n * self.skip_fusion[stage][0].out_channels
            else:
                rnp = self.rnp[0].target[0].out_channels
                total += n * self.num_modalities * 3 * rnp + 2 * n * self.bottleneck_fusion[0].out_channels
        return int(total + self.decoder.compute_conv_feature_map_size(input_size))


class CRNPLoss(nn.Module):
    """nnU-Net's loss on even training iterations, the predictors' RNP loss on odd ones.

    Counting training calls k = 0, 1, 2, ... (validation calls, in eval mode, always get nnU-Net's loss):

    * k even: ``base(output, target)``: nnU-Net's deep-supervised Dice+CE; it trains encoders, fusion,
      attention and decoder, not the predictors (the fusion reads their errors detached) and never the
      frozen targets;
    * k odd: ``base(...).detach() + (L_rnp - L_rnp.detach())``: its value is nnU-Net's loss (so
      nnU-Net's logged train loss stays a segmentation loss), its gradient is that of
      ``L_rnp = mean(e)`` (:meth:`CRNPUNet.rnp_loss`), which reaches the predictors f_m only. Every other
      parameter has no gradient (``None``), so nnU-Net's SGD leaves it, momentum and weight decay
      included, untouched on that iteration.

    nnU-Net's ``train_step`` runs unchanged; the RNP loss of every training call is kept in ``history``.
    """

    def __init__(self, base_loss: nn.Module, network: CRNPUNet):
        super().__init__()
        self.base = base_loss
        self.network = [network]  # a list: keep the network out of this module's parameters/state_dict
        self.calls = 0
        self.history: dict[str, list[float]] = defaultdict(list)

    def forward(self, output, target):
        loss = self.base(output, target)
        net = self.network[0]
        parts, net.last_parts = net.last_parts, None
        if not net.training or parts is None:
            return loss
        rnp = net.rnp_loss(parts)
        self.history["rnp"].append(float(rnp.detach()))
        step, self.calls = self.calls, self.calls + 1
        if step % 2 == 0:
            return loss
        return loss.detach() + (rnp - rnp.detach()).to(loss.dtype)


class nnUNetTrainerCRNP(nnUNetTrainer):
    """nnU-Net training of :class:`CRNPUNet` from the plans' arch kwargs, predictors on alternate iterations
    (:class:`CRNPLoss`); the mean RNP loss of each epoch goes to the training log."""

    @staticmethod
    def build_network_architecture(plans_manager, configuration_manager, num_input_channels: int,
                                   num_output_channels: int, enable_deep_supervision: bool = True) -> nn.Module:
        return _build(CRNP_NETWORK, configuration_manager, num_input_channels, num_output_channels,
                      enable_deep_supervision)

    def _build_loss(self):
        net = unwrap(self.network)
        net.cache_parts = True
        return CRNPLoss(super()._build_loss(), net)

    def on_train_epoch_end(self, train_outputs):
        super().on_train_epoch_end(train_outputs)
        history = self.loss.history["rnp"]
        if history:
            self.print_to_log_file(f"CRNP predictor (RNP) loss: {np.mean(history):.5f}")
        history.clear()


class nnUNetTrainerCRNP_demo(ScheduleMixin, nnUNetTrainerCRNP):
    """CRNP on the demo's short CPU schedule (DEMO_SCHEDULE)."""

    schedule = DEMO_SCHEDULE


class nnUNetTrainerCRNP_tinyCPU(ScheduleMixin, nnUNetTrainerCRNP):
    """For tests: TINY_SCHEDULE."""

    schedule = TINY_SCHEDULE
