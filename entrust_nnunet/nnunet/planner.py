"""EnTrustPlanner: nnU-Net's ExperimentPlanner with the EnTrust network in the plans.

nnunetv2 looks for planners only inside its own package, so ``entrust plan`` runs this class through
nnunetv2's planning API (``plan_experiment_dataset``) instead of by name.

What changes against ``ExperimentPlanner``:

* the plans identifier is ``nnUNetEnTrustPlans`` and each configuration names
  ``entrust_nnunet.model.network.EnTrustUNet`` (nnU-Net locates it by its dotted path);
* patch and batch size follow the activation estimate of EnTrustUNet with its M modality
  encoders (``EnTrustUNet.compute_conv_feature_map_size``), compared against nnU-Net's own reference
  budget: the planner's search itself is nnU-Net's, only the network it measures differs;
* the preprocessed data of 2d/3d_fullres is shared with ``nnUNetPlans`` (same spacing, same
  normalisation), like nnU-Net's ResEnc planners do, so both plans train from one preprocessing.
"""
from __future__ import annotations

from typing import List, Tuple, Union

from nnunetv2.experiment_planning.experiment_planners.default_experiment_planner import ExperimentPlanner

from entrust_nnunet.model.network import EnTrustUNet

ENTRUST_PLANS = "nnUNetEnTrustPlans"
#: configurations whose preprocessed data EnTrustPlanner shares with nnUNetPlans (their data identifier); the others
#: (3d_lowres: its spacing follows the network's memory estimate) are preprocessed for EnTrust's plans themselves
SHARED_DATA = ("2d", "3d_fullres")


class EnTrustPlanner(ExperimentPlanner):
    def __init__(self, dataset_name_or_id: Union[str, int], gpu_memory_target_in_gb: float = 8,
                 preprocessor_name: str = "DefaultPreprocessor", plans_name: str = ENTRUST_PLANS,
                 overwrite_target_spacing: Union[List[float], Tuple[float, ...]] = None,
                 suppress_transpose: bool = False):
        super().__init__(dataset_name_or_id, gpu_memory_target_in_gb, preprocessor_name, plans_name,
                         overwrite_target_spacing, suppress_transpose)
        self.UNet_class = EnTrustUNet

    def generate_data_identifier(self, configuration_name: str) -> str:
        if configuration_name in SHARED_DATA:
            return "nnUNetPlans_" + configuration_name
        return super().generate_data_identifier(configuration_name)
