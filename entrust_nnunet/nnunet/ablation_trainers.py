"""nnU-Net trainers of the EnTrust ablations (``entrust_nnunet.model.ablations``): nnUNetTrainerEnTrust with
another network class built from the same arch kwargs; everything else (losses, CalibHead fitted on the
validation fold, validation maps) is EnTrust's. Their schedule variants are in ``entrust_nnunet.nnunet.variants``.
"""
from __future__ import annotations

from nnunetv2.utilities.get_network_from_plans import get_network_from_plans
from torch import nn

from entrust_nnunet.model.ablations import EnTrustNoEnFuseUNet, EnTrustNoProbeUNet, EnTrustNoStepsUNet
from entrust_nnunet.model.network import LOSS_WEIGHTS
from entrust_nnunet.nnunet.distributed import unwrap
from entrust_nnunet.nnunet.trainers import EnTrustLoss, nnUNetTrainerEnTrust


def _build(cls: type, configuration_manager, num_input_channels: int, num_output_channels: int,
           enable_deep_supervision: bool) -> nn.Module:
    return get_network_from_plans(f"{cls.__module__}.{cls.__name__}", configuration_manager.network_arch_init_kwargs,
                                  configuration_manager.network_arch_init_kwargs_req_import, num_input_channels,
                                  num_output_channels, allow_init=True, deep_supervision=enable_deep_supervision)


class nnUNetTrainerEnTrustNoEnFuse(nnUNetTrainerEnTrust):
    """EnTrust with the modality streams concatenated instead of EnFuse (:class:`EnTrustNoEnFuseUNet`)."""

    @staticmethod
    def build_network_architecture(plans_manager, configuration_manager, num_input_channels: int,
                                   num_output_channels: int, enable_deep_supervision: bool = True) -> nn.Module:
        return _build(EnTrustNoEnFuseUNet, configuration_manager, num_input_channels, num_output_channels,
                      enable_deep_supervision)


class nnUNetTrainerEnTrustNoSteps(nnUNetTrainerEnTrust):
    """EnTrust with the deterministic head only (:class:`EnTrustNoStepsUNet`; generative loss weight 0)."""

    @staticmethod
    def build_network_architecture(plans_manager, configuration_manager, num_input_channels: int,
                                   num_output_channels: int, enable_deep_supervision: bool = True) -> nn.Module:
        return _build(EnTrustNoStepsUNet, configuration_manager, num_input_channels, num_output_channels,
                      enable_deep_supervision)

    def _build_loss(self):
        loss = super()._build_loss()
        return EnTrustLoss(loss.base, unwrap(self.network), {**LOSS_WEIGHTS, "generative": 0.0})


class nnUNetTrainerEnTrustNoProbe(nnUNetTrainerEnTrust):
    """EnTrust sampled without ProbeStep, in CalibHead's fitting and at inference (:class:`EnTrustNoProbeUNet`)."""

    @staticmethod
    def build_network_architecture(plans_manager, configuration_manager, num_input_channels: int,
                                   num_output_channels: int, enable_deep_supervision: bool = True) -> nn.Module:
        return _build(EnTrustNoProbeUNet, configuration_manager, num_input_channels, num_output_channels,
                      enable_deep_supervision)
