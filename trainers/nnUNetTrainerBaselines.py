"""Uncertainty baselines for ``nnUNetv2_train ... -tr <name>``; the classes live in entrust_nnunet.nnunet."""
from entrust_nnunet.nnunet.baseline_trainers import nnUNetTrainerCRNP, nnUNetTrainerMCDropout, nnUNetTrainerModDrop  # noqa: F401
from entrust_nnunet.nnunet.variants import (  # noqa: F401
    nnUNetTrainerCRNP_demo,
    nnUNetTrainerCRNP_tinyCPU,
    nnUNetTrainerMCDropout_demo,
    nnUNetTrainerMCDropout_tinyCPU,
    nnUNetTrainerModDrop_demo,
    nnUNetTrainerModDrop_tinyCPU,
)
