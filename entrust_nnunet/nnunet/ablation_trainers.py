"""nnU-Net trainers of the EnTrust ablations (``entrust_nnunet.model.ablations``): nnUNetTrainerEnTrust with
another network class built from the same arch kwargs; everything else (losses, CalibHead fitted on the
validation fold, validation maps) is EnTrust's. Their schedule variants are in ``entrust_nnunet.nnunet.variants``.
"""
from __future__ import annotations

from entrust_nnunet.model.ablations import (EnTrustNoAlternativesUNet, EnTrustNoEnFuseUNet, EnTrustNoProbeUNet,
                                            EnTrustNoStepsUNet)
from entrust_nnunet.nnunet.trainers import nnUNetTrainerEnTrust


class nnUNetTrainerEnTrustNoEnFuse(nnUNetTrainerEnTrust):
    """EnTrust with the modality streams concatenated instead of EnFuse (:class:`EnTrustNoEnFuseUNet`)."""

    network_class = EnTrustNoEnFuseUNet


class nnUNetTrainerEnTrustNoSteps(nnUNetTrainerEnTrust):
    """EnTrust with the deterministic head only (:class:`EnTrustNoStepsUNet`; generative loss weight 0)."""

    network_class = EnTrustNoStepsUNet

    def loss_weights(self) -> dict[str, float]:
        return {**super().loss_weights(), "generative": 0.0, "start": 0.0}


class nnUNetTrainerEnTrustNoAlternatives(nnUNetTrainerEnTrust):
    """EnTrust whose hypotheses never follow a modality's expert (:class:`EnTrustNoAlternativesUNet`)."""

    network_class = EnTrustNoAlternativesUNet


class nnUNetTrainerEnTrustNoProbe(nnUNetTrainerEnTrust):
    """EnTrust sampled without ProbeStep, in CalibHead's fitting and at inference (:class:`EnTrustNoProbeUNet`)."""

    network_class = EnTrustNoProbeUNet
