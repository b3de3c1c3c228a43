"""EnTrust trainers for ``nnUNetv2_train ... -tr <name>``; the classes live in entrust_nnunet.training."""
from entrust_nnunet.training import (  # noqa: F401
    nnUNetTrainerEnTrust,
    nnUNetTrainerEnTrust_5epochs,
    nnUNetTrainerEnTrust_50epochs,
    nnUNetTrainerEnTrust_demo,
    nnUNetTrainerEnTrust_tinyCPU,
)
