"""Plain nnU-Net on the demo's and the tests' schedules: the baselines the demo and the benchmark compare against."""
from entrust_nnunet.nnunet.variants import nnUNetTrainer_demo, nnUNetTrainer_demo3d, nnUNetTrainer_tinyCPU  # noqa: F401
