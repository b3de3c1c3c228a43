"""nnU-Net trainers of the uncertainty baselines (MC dropout, CRNP) that EnTrust is compared against.

They change only ``build_network_architecture`` (and, for CRNP, ``_build_loss``); nnU-Net's
``train_step``, validation and inference run unchanged. Their schedule variants are in
``entrust_nnunet.nnunet.variants``.
"""
from __future__ import annotations

import inspect
from collections import defaultdict

import numpy as np
from dynamic_network_architectures.architectures.unet import PlainConvUNet
from nnunetv2.training.nnUNetTrainer.nnUNetTrainer import nnUNetTrainer
from nnunetv2.utilities.get_network_from_plans import get_network_from_plans
from torch import nn

from entrust_nnunet.model.crnp import CRNPUNet
from entrust_nnunet.model.mcdropout import MCDropoutUNet
from entrust_nnunet.nnunet.distributed import unwrap
from entrust_nnunet.nnunet.modality_dropout import ModalityDropoutZeroFill

MCDROPOUT_NETWORK = f"{MCDropoutUNet.__module__}.{MCDropoutUNet.__name__}"
CRNP_NETWORK = f"{CRNPUNet.__module__}.{CRNPUNet.__name__}"
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


class nnUNetTrainerModDrop(ModalityDropoutZeroFill, nnUNetTrainer):
    """Plain nnU-Net with the same modality dropout as :class:`~entrust_nnunet.nnunet.trainers.nnUNetTrainerEnTrustModDrop`,
    dropped channels zero-filled after normalisation: the fair baseline for missing modalities."""

    modality_dropout = 0.5


class nnUNetTrainerMCDropout(nnUNetTrainer):
    """nnU-Net training of :class:`MCDropoutUNet` (decoder dropout p = 0.1) from the plans' arch kwargs."""

    @staticmethod
    def build_network_architecture(plans_manager, configuration_manager, num_input_channels: int,
                                   num_output_channels: int, enable_deep_supervision: bool = True) -> nn.Module:
        return _build(MCDROPOUT_NETWORK, configuration_manager, num_input_channels, num_output_channels,
                      enable_deep_supervision)


class CRNPLoss(nn.Module):
    """nnU-Net's loss with the predictors' RNP loss added, its gradient confined to the predictors.

    Every training call returns ``base(output, target) + (L_rnp - L_rnp.detach())`` with
    ``L_rnp = mean(e)`` (:meth:`CRNPUNet.rnp_loss`). Its value is nnU-Net's deep-supervised Dice+CE (so
    nnU-Net's logged train loss stays a segmentation loss); its gradient is nnU-Net's loss's, which
    trains encoders, fusion, attention and decoder on EVERY iteration (the fusion reads the RNP errors
    detached, so it never reaches the predictors), plus ``L_rnp``'s, which reaches the predictors f_psi
    only (the features they read are detached, the random targets frozen). One optimiser step therefore
    makes one segmentation update, as for every other method, and one predictor update in addition.
    Validation calls (eval mode) get nnU-Net's loss alone.

    nnU-Net's ``train_step`` runs unchanged; the RNP loss of every training call is kept in ``history``.
    """

    def __init__(self, base_loss: nn.Module, network: CRNPUNet):
        super().__init__()
        self.base = base_loss
        self.network = [network]  # a list: keep the network out of this module's parameters/state_dict
        self.history: dict[str, list[float]] = defaultdict(list)

    def forward(self, output, target):
        loss = self.base(output, target)
        net = self.network[0]
        parts, net.last_parts = net.last_parts, None
        if not net.training or parts is None:
            return loss
        rnp = net.rnp_loss(parts)
        self.history["rnp"].append(float(rnp.detach()))
        return loss + (rnp - rnp.detach()).to(loss.dtype)


class nnUNetTrainerCRNP(nnUNetTrainer):
    """nnU-Net training of :class:`CRNPUNet` from the plans' arch kwargs, the predictors' step added to every
    segmentation step (:class:`CRNPLoss`); the mean RNP loss of each epoch goes to the training log."""

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
