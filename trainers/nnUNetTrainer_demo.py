"""Plain nnU-Net on the demo's schedule, the baseline the demo and the benchmark compare against."""
from entrust_nnunet.training import nnUNetTrainer_demo  # noqa: F401
