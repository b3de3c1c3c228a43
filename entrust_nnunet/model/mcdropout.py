"""Monte-Carlo dropout (Gal & Ghahramani) as an nnU-Net network: the MC-dropout uncertainty baseline.

Built from the arch kwargs nnU-Net's planner writes for PlainConvUNet (2D or 3D); ``forward`` returns
what PlainConvUNet returns; ``sample_statistics(x, num_hypotheses, seed)`` gives the ``mean`` class
probabilities, ``aleatoric`` and ``conflict`` maps that ``entrust predict`` pools over patches,
mirrorings and folds exactly as it pools EnTrust's hypotheses.
"""
from __future__ import annotations

import torch
from dynamic_network_architectures.architectures.unet import PlainConvUNet
from dynamic_network_architectures.building_blocks.helper import convert_conv_op_to_dim, get_matching_dropout
from dynamic_network_architectures.building_blocks.unet_decoder import UNetDecoder
from torch.nn.modules.dropout import _DropoutNd

from entrust_nnunet.model.outputs import full_resolution, probabilities
from entrust_nnunet.model.sampling import DEFAULT_SAMPLING
from entrust_nnunet.model.trustmap import output_entropy


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

    #: :meth:`sample_statistics` returns its ``num_hypotheses`` passes as ``hypotheses``
    samples_hypotheses = True

    def dropout_layers(self) -> list[_DropoutNd]:
        return [m for m in self.modules() if isinstance(m, _DropoutNd)]

    @torch.no_grad()
    def sample_statistics(self, x: torch.Tensor, num_hypotheses: int = DEFAULT_SAMPLING.num_hypotheses,
                          seed: int = 0, regions: bool = False) -> dict[str, torch.Tensor]:
        """T = ``num_hypotheses`` stochastic passes, dropout layers (only) in train mode.

        ``p_t = softmax(f(x; dropout mask t))`` (a sigmoid per channel with ``regions``; H then sums the regions'
        binary entropies); ``mean = (1/T) sum_t p_t`` (B, C, *s);
        ``aleatoric = (1/T) sum_t H(p_t)`` (expected entropy, nats, B, *s); ``conflict = 0`` (one
        fused stream: no notion of modalities disagreeing). The T masks are drawn from
        ``torch.manual_seed(seed)`` inside ``torch.random.fork_rng``: the same seed gives the same
        statistics and the caller's RNG state is left untouched. Norm layers stay in eval mode.
        """
        if num_hypotheses < 1:
            raise ValueError(f"num_hypotheses must be >= 1, got {num_hypotheses}")
        layers = self.dropout_layers()
        modes = [m.training for m in layers]
        devices = [x.device] if x.device.type == "cuda" else []
        mean = aleatoric = None
        passes = []
        try:
            for m in layers:
                m.train(True)
            with torch.random.fork_rng(devices=devices):
                torch.manual_seed(seed)
                for _ in range(num_hypotheses):
                    p = probabilities(full_resolution(self(x)), regions)
                    passes.append(p)
                    h = output_entropy(p, 1, regions)
                    mean = p if mean is None else mean + p
                    aleatoric = h if aleatoric is None else aleatoric + h
        finally:
            for m, mode in zip(layers, modes):
                m.train(mode)
        mean, aleatoric = mean / num_hypotheses, aleatoric / num_hypotheses
        return {"mean": mean, "aleatoric": aleatoric, "conflict": torch.zeros_like(aleatoric),
                "hypotheses": torch.stack(passes)}
