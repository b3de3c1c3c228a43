"""Uncertainty baselines for ``nnUNetv2_train ... -tr <name>``; the classes live in entrust_nnunet.baselines."""
from entrust_nnunet.baselines import (  # noqa: F401
    nnUNetTrainerCRNP,
    nnUNetTrainerCRNP_demo,
    nnUNetTrainerCRNP_tinyCPU,
    nnUNetTrainerMCDropout,
    nnUNetTrainerMCDropout_demo,
    nnUNetTrainerMCDropout_tinyCPU,
)
