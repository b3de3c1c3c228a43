"""nnU-Net trainers for EnTrust. The plug-in modules in ``trainers/`` re-export these classes.

``nnUNetTrainerEnTrust`` changes three hooks of nnUNetTrainer and nothing else:

* ``build_network_architecture``: whatever class the plans name (PlainConvUNet in ``nnUNetPlans``,
  EnTrustUNet in ``nnUNetEnTrustPlans``), build :class:`~entrust_nnunet.network.EnTrustUNet`
  from the same arch kwargs, so both plans train;
* ``_build_loss``: nnU-Net's own deep-supervised Dice+CE, wrapped by :class:`EnTrustLoss`, which adds
  the EnTrust terms (generative, independence, experts, conflict); nnU-Net's ``train_step`` and
  ``validation_step`` run unchanged;
* ``on_train_end``: fit TrustMap's CalibHead on training-fold batches before the final checkpoint;
* ``perform_actual_validation``: after nnU-Net's own validation (masks, summary.json), write the
  uncertainty maps of every validation case into ``fold_X/validation/uncertainty/`` with
  :class:`~entrust_nnunet.predict.EnTrustPredictor`, so 5-fold cross-validation yields maps for
  every training case.

It also logs the EnTrust terms per epoch (training log + ``progress_entrust.png`` beside nnU-Net's
``progress.png``; the values are kept in the checkpoint, so ``--c`` continues the curves).
"""
from __future__ import annotations

import os
from collections import defaultdict

import numpy as np
import torch
from nnunetv2.training.nnUNetTrainer.nnUNetTrainer import nnUNetTrainer
from nnunetv2.utilities.get_network_from_plans import get_network_from_plans
from torch import nn
from torch._dynamo import OptimizedModule

from entrust_nnunet.network import LOSS_WEIGHTS

ENTRUST_NETWORK = "entrust_nnunet.network.EnTrustUNet"
AUX_LOG_KEYS = tuple(f"entrust_{k}" for k in LOSS_WEIGHTS)


def unwrap(network: nn.Module) -> nn.Module:
    """The plain module behind DDP and torch.compile wrappers."""
    if isinstance(network, nn.parallel.DistributedDataParallel):
        network = network.module
    if isinstance(network, OptimizedModule):
        network = network._orig_mod
    return network


class EnTrustLoss(nn.Module):
    """nnU-Net's loss plus the EnTrust terms computed from the parts the network cached in forward.

    ``total = base(output, target) + sum_k LOSS_WEIGHTS[k] * aux_k``; the detached aux values of
    training calls are collected in ``history`` for logging.
    """

    def __init__(self, base_loss: nn.Module, network: nn.Module, weights: dict[str, float] | None = None):
        super().__init__()
        self.base = base_loss
        self.network = [network]  # a list: keep the network out of this module's parameters/state_dict
        self.weights = dict(LOSS_WEIGHTS if weights is None else weights)
        self.history: dict[str, list[float]] = defaultdict(list)

    def forward(self, output, target):
        loss = self.base(output, target)
        net = self.network[0]
        full_res_target = target[0] if isinstance(target, (list, tuple)) else target
        aux = net.auxiliary_losses(net.last_parts, full_res_target)
        net.last_parts = None
        for k, v in aux.items():
            loss = loss + self.weights[k] * v
            if net.training:
                self.history[k].append(float(v.detach()))
        return loss


class nnUNetTrainerEnTrust(nnUNetTrainer):
    #: training-fold batches used to fit CalibHead at the end of training
    num_calibration_batches = 10

    def __init__(self, plans: dict, configuration: str, fold: int, dataset_json: dict,
                 device: torch.device = torch.device("cuda")):
        super().__init__(plans, configuration, fold, dataset_json, device)
        self._register_aux_log_keys()

    def _register_aux_log_keys(self):
        for key in AUX_LOG_KEYS:
            self.logger.local_logger.my_fantastic_logging.setdefault(key, [])

    @staticmethod
    def build_network_architecture(plans_manager, configuration_manager, num_input_channels: int,
                                   num_output_channels: int, enable_deep_supervision: bool = True) -> nn.Module:
        return get_network_from_plans(ENTRUST_NETWORK, configuration_manager.network_arch_init_kwargs,
                                      configuration_manager.network_arch_init_kwargs_req_import,
                                      num_input_channels, num_output_channels, allow_init=True,
                                      deep_supervision=enable_deep_supervision)

    def initialize(self):
        if self.label_manager.has_regions or self.label_manager.has_ignore_label:
            raise NotImplementedError(
                f"{self.__class__.__name__}: region-based training and ignore labels are not supported yet by "
                f"SegDiff (dataset {self.plans_manager.dataset_name}); train nnUNetTrainer for this dataset")
        super().initialize()

    def _build_loss(self):
        net = unwrap(self.network)
        net.cache_parts = True
        return EnTrustLoss(super()._build_loss(), net)

    def on_train_epoch_end(self, train_outputs):
        super().on_train_epoch_end(train_outputs)
        history = self.loss.history
        for key, name in zip(AUX_LOG_KEYS, LOSS_WEIGHTS):
            value = float(np.mean(history[name])) if history[name] else float("nan")
            self.logger.log(key, value, self.current_epoch)
        self.print_to_log_file("entrust losses", {k: round(float(np.mean(v)), 4) for k, v in history.items()})
        history.clear()

    def on_epoch_end(self):
        super().on_epoch_end()
        if self.local_rank == 0:
            self._plot_aux_losses()

    def _plot_aux_losses(self):
        import matplotlib

        matplotlib.use("Agg")
        import matplotlib.pyplot as plt

        fig, ax = plt.subplots(figsize=(8, 5))
        for key in AUX_LOG_KEYS:
            values = self.logger.get_value(key, step=None)
            ax.plot(range(len(values)), values, label=key.removeprefix("entrust_"), linewidth=2)
        ax.set_xlabel("epoch")
        ax.set_ylabel("loss term (unweighted)")
        ax.set_yscale("log")
        ax.legend()
        fig.tight_layout()
        fig.savefig(os.path.join(self.output_folder, "progress_entrust.png"))
        plt.close(fig)

    def load_checkpoint(self, filename_or_checkpoint):
        super().load_checkpoint(filename_or_checkpoint)
        self._register_aux_log_keys()  # checkpoints of other trainers lack our keys

    def on_train_end(self):
        self.fit_calibration()
        super().on_train_end()

    def perform_actual_validation(self, save_probabilities: bool = False):
        super().perform_actual_validation(save_probabilities)
        if self.local_rank == 0 and not self.is_cascaded:
            self.write_validation_maps()

    def write_validation_maps(self) -> None:
        from entrust_nnunet.predict import EnTrustPredictor, export_prediction_with_maps

        predictor = EnTrustPredictor(tile_step_size=0.5, use_gaussian=True, use_mirroring=True,
                                     perform_everything_on_device=True, device=self.device, allow_tqdm=False)
        # the current weights as the one 'fold' (nnU-Net's own validation calls the network directly instead)
        predictor.manual_initialization(self.network, self.plans_manager, self.configuration_manager,
                                        [unwrap(self.network).state_dict()], self.dataset_json,
                                        self.__class__.__name__, self.inference_allowed_mirroring_axes)
        _, val_keys = self.do_split()
        dataset_val = self.dataset_class(self.preprocessed_dataset_folder, val_keys)
        folder = os.path.join(self.output_folder, "validation")
        for key in dataset_val.identifiers:
            data, _, _, properties = dataset_val.load_case(key)
            prediction = predictor.predict_logits_from_preprocessed_data(torch.from_numpy(np.asarray(data[:])))
            export_prediction_with_maps(prediction.cpu().numpy(), properties, self.configuration_manager,
                                        self.plans_manager, self.dataset_json, os.path.join(folder, key),
                                        keep_mask=False)
        self.print_to_log_file(f"uncertainty maps of {len(val_keys)} validation cases in {folder}/uncertainty")

    @torch.no_grad()
    def fit_calibration(self) -> None:
        """Fit CalibHead on training-fold patches (never the validation fold) and log its in-sample BCE."""
        net = unwrap(self.network)
        if self.dataloader_train is None or self.num_calibration_batches < 1:
            return
        self.set_deep_supervision_enabled(False)
        net.eval()
        stats, errors = defaultdict(list), []
        for _ in range(self.num_calibration_batches):
            batch = next(self.dataloader_train)
            data = batch["data"].to(self.device)
            target = batch["target"][0] if isinstance(batch["target"], list) else batch["target"]
            out = net.sample(data)
            errors.append((out["mean"].argmax(1) != target.to(self.device)[:, 0]).float().cpu())
            for k in ("confidence", "total", "aleatoric", "epistemic", "probe", "conflict"):
                stats[k].append(out[k].float().cpu())
        stats = {k: torch.cat(v) for k, v in stats.items()}
        error = torch.cat(errors)
        calib = net.calib.cpu()
        bce = calib.fit(stats, error)
        calib.to(self.device)
        self.set_deep_supervision_enabled(self.enable_deep_supervision)
        self.print_to_log_file(f"CalibHead fitted on {self.num_calibration_batches} training-fold batches: "
                               f"error rate {float(error.mean()):.4f}, BCE {bce:.4f}")


class nnUNetTrainerEnTrust_5epochs(nnUNetTrainerEnTrust):
    def __init__(self, plans: dict, configuration: str, fold: int, dataset_json: dict,
                 device: torch.device = torch.device("cuda")):
        super().__init__(plans, configuration, fold, dataset_json, device)
        self.num_epochs = 5


class nnUNetTrainerEnTrust_50epochs(nnUNetTrainerEnTrust):
    def __init__(self, plans: dict, configuration: str, fold: int, dataset_json: dict,
                 device: torch.device = torch.device("cuda")):
        super().__init__(plans, configuration, fold, dataset_json, device)
        self.num_epochs = 50


class nnUNetTrainerEnTrust_tinyCPU(nnUNetTrainerEnTrust):
    """For tests: 4 epochs of 3 iterations, 1 validation iteration, a checkpoint every epoch, 2 calibration batches."""

    num_calibration_batches = 2

    def __init__(self, plans: dict, configuration: str, fold: int, dataset_json: dict,
                 device: torch.device = torch.device("cuda")):
        super().__init__(plans, configuration, fold, dataset_json, device)
        self.num_epochs = 4
        self.num_iterations_per_epoch = 3
        self.num_val_iterations_per_epoch = 1
        self.save_every = 1


class nnUNetTrainerEnTrustPlaceholder(nnUNetTrainer):
    """Exactly nnUNetTrainer under another name: proves plug-in discovery end to end."""


class nnUNetTrainerEnTrustPlaceholder_tinyCPU(nnUNetTrainerEnTrustPlaceholder):
    def __init__(self, plans: dict, configuration: str, fold: int, dataset_json: dict,
                 device: torch.device = torch.device("cuda")):
        super().__init__(plans, configuration, fold, dataset_json, device)
        self.num_epochs = 1
        self.num_iterations_per_epoch = 2
        self.num_val_iterations_per_epoch = 1
