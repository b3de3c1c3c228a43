"""What a user writes for a short run: 12 epochs x 25 iterations, for plain nnU-Net and for EnTrust (as the
issue's author trained on held-out phantoms), and a 4x longer one (50 epochs x 25 iterations, ``SCHEDULE=Long``
in run.sh), and EnTrust with the cross-modal conflict (``VARIANT=CrossModal`` in run.sh). Found by nnU-Net through ``nnUNet_extTrainer``."""
import torch
from nnunetv2.training.nnUNetTrainer.nnUNetTrainer import nnUNetTrainer

from entrust_nnunet.nnunet.trainers import nnUNetTrainerEnTrust, nnUNetTrainerEnTrustCrossModal


class nnUNetTrainerShort(nnUNetTrainer):
    def __init__(self, plans: dict, configuration: str, fold: int, dataset_json: dict,
                 device: torch.device = torch.device("cuda")):
        super().__init__(plans, configuration, fold, dataset_json, device)
        self.num_epochs, self.num_iterations_per_epoch, self.num_val_iterations_per_epoch = 12, 25, 5


class nnUNetTrainerEnTrustShort(nnUNetTrainerEnTrust):
    def __init__(self, plans: dict, configuration: str, fold: int, dataset_json: dict,
                 device: torch.device = torch.device("cuda")):
        super().__init__(plans, configuration, fold, dataset_json, device)
        self.num_epochs, self.num_iterations_per_epoch, self.num_val_iterations_per_epoch = 12, 25, 5


class nnUNetTrainerLong(nnUNetTrainerShort):
    def __init__(self, plans: dict, configuration: str, fold: int, dataset_json: dict,
                 device: torch.device = torch.device("cuda")):
        super().__init__(plans, configuration, fold, dataset_json, device)
        self.num_epochs = 50


class nnUNetTrainerEnTrustLong(nnUNetTrainerEnTrustShort):
    def __init__(self, plans: dict, configuration: str, fold: int, dataset_json: dict,
                 device: torch.device = torch.device("cuda")):
        super().__init__(plans, configuration, fold, dataset_json, device)
        self.num_epochs = 50


class nnUNetTrainerEnTrustCrossModalShort(nnUNetTrainerEnTrustShort, nnUNetTrainerEnTrustCrossModal):
    pass


class nnUNetTrainerEnTrustCrossModalLong(nnUNetTrainerEnTrustLong, nnUNetTrainerEnTrustCrossModal):
    pass
