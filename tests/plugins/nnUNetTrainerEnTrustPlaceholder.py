"""Test scaffolding: a trainer that is exactly nnUNetTrainer under another name, found by nnU-Net's search
through ``nnUNet_extTrainer`` (tests put this folder on it), to prove plug-in discovery end to end."""
from nnunetv2.training.nnUNetTrainer.nnUNetTrainer import nnUNetTrainer

from entrust_nnunet.nnunet.variants import ScheduleMixin


class nnUNetTrainerEnTrustPlaceholder(nnUNetTrainer):
    pass


class nnUNetTrainerEnTrustPlaceholder_tinyCPU(ScheduleMixin, nnUNetTrainerEnTrustPlaceholder):
    schedule = {"num_epochs": 1, "num_iterations_per_epoch": 2, "num_val_iterations_per_epoch": 1}
