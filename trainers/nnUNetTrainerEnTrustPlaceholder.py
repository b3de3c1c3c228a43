"""The placeholder trainer (exactly nnUNetTrainer) that proves plug-in discovery."""
from entrust_nnunet.training import nnUNetTrainerEnTrustPlaceholder, nnUNetTrainerEnTrustPlaceholder_tinyCPU  # noqa: F401
