"""EnTrust trainers for ``nnUNetv2_train ... -tr <name>``; the classes live in entrust_nnunet.nnunet."""
from entrust_nnunet.nnunet.trainers import (  # noqa: F401
    nnUNetTrainerEnTrust,
    nnUNetTrainerEnTrustCrossModal,
    nnUNetTrainerEnTrustModDrop,
)
from entrust_nnunet.nnunet.variants import (  # noqa: F401
    nnUNetTrainerEnTrust_5epochs,
    nnUNetTrainerEnTrust_50epochs,
    nnUNetTrainerEnTrust_1epochCPU,
    nnUNetTrainerEnTrust_demo,
    nnUNetTrainerEnTrust_demo3d,
    nnUNetTrainerEnTrust_tinyCPU,
    nnUNetTrainerEnTrustCrossModal_demo,
    nnUNetTrainerEnTrustCrossModal_tinyCPU,
    nnUNetTrainerEnTrustModDrop_demo,
    nnUNetTrainerEnTrustModDrop_tinyCPU,
)
