"""EnTrust ablations for ``nnUNetv2_train ... -tr <name>`` (benchmarks/run.py --ablations); the classes live in
entrust_nnunet.nnunet."""
from entrust_nnunet.nnunet.ablation_trainers import (  # noqa: F401
    nnUNetTrainerEnTrustNoAlternatives,
    nnUNetTrainerEnTrustNoEnFuse,
    nnUNetTrainerEnTrustNoProbe,
    nnUNetTrainerEnTrustNoSteps,
)
from entrust_nnunet.nnunet.variants import (  # noqa: F401
    nnUNetTrainerEnTrustNoAlternatives_demo,
    nnUNetTrainerEnTrustNoAlternatives_tinyCPU,
    nnUNetTrainerEnTrustNoEnFuse_demo,
    nnUNetTrainerEnTrustNoEnFuse_tinyCPU,
    nnUNetTrainerEnTrustNoProbe_demo,
    nnUNetTrainerEnTrustNoProbe_tinyCPU,
    nnUNetTrainerEnTrustNoSteps_demo,
    nnUNetTrainerEnTrustNoSteps_tinyCPU,
)
