"""nnU-Net trainers for EnTrust. The plug-in modules in ``trainers/`` re-export these classes.

``nnUNetTrainerEnTrust`` changes three hooks of nnUNetTrainer and nothing else:

* ``build_network_architecture``: whatever class the plans name (PlainConvUNet in ``nnUNetPlans``,
  EnTrustUNet in ``nnUNetEnTrustPlans``), build :class:`~entrust_nnunet.network.EnTrustUNet`
  from the same arch kwargs, so both plans train;
* ``_build_loss``: nnU-Net's own deep-supervised Dice+CE, wrapped by :class:`EnTrustLoss`, which adds
  the EnTrust terms (generative, independence, experts, conflict); nnU-Net's ``train_step`` and
  ``validation_step`` run unchanged;
* ``do_split``: nnU-Net's 5-fold split, minus a calibration subset of the training cases;
* ``on_train_end``: fit TrustMap's CalibHead on that held-out calibration subset before the final
  checkpoint (never on the validation fold, never on cases the network was trained on);
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
from entrust_nnunet.trustmap import STATISTICS

ENTRUST_NETWORK = "entrust_nnunet.network.EnTrustUNet"
#: the demo's short CPU schedule: 15 epochs x 50 iterations of batch 2 (2D 64x64 phantoms), about 2-3 min
DEMO_SCHEDULE = {"num_epochs": 15, "num_iterations_per_epoch": 50, "num_val_iterations_per_epoch": 5}
#: the tests' schedule: 4 epochs x 3 iterations, 1 validation iteration, a checkpoint every epoch
TINY_SCHEDULE = {"num_epochs": 4, "num_iterations_per_epoch": 3, "num_val_iterations_per_epoch": 1, "save_every": 1}


class ScheduleMixin:
    """Put first in the bases of a trainer variant: nnU-Net's ``__init__`` (same signature), then the
    attributes in the class's ``schedule`` (e.g. ``num_epochs``) overwrite nnU-Net's defaults."""

    schedule: dict = {}

    def __init__(self, plans: dict, configuration: str, fold: int, dataset_json: dict,
                 device: torch.device = torch.device("cuda")):
        super().__init__(plans, configuration, fold, dataset_json, device)
        for key, value in self.schedule.items():
            setattr(self, key, value)


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
    #: share of the training cases held out of training to fit CalibHead
    calibration_fraction = 0.25

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

    def do_split(self):
        """nnU-Net's split, with a calibration subset (``calibration_fraction`` of the training cases, at least
        one) held out of training: CalibHead is fitted on it, so it sees neither training nor validation cases."""
        tr_keys, val_keys = super().do_split()
        seed = 12345 + (self.fold if isinstance(self.fold, int) else 5)
        self.calibration_keys = calibration_subset(tr_keys, self.calibration_fraction, seed)
        return [k for k in tr_keys if k not in self.calibration_keys], val_keys

    def perform_actual_validation(self, save_probabilities: bool = False):
        super().perform_actual_validation(save_probabilities)
        if self.local_rank == 0 and not self.is_cascaded:
            self.write_validation_maps()

    def _predictor(self):
        from entrust_nnunet.predict import EnTrustPredictor

        predictor = EnTrustPredictor(tile_step_size=0.5, use_gaussian=True, use_mirroring=True,
                                     perform_everything_on_device=True, device=self.device, allow_tqdm=False)
        # the current weights as the one 'fold' (nnU-Net's own validation calls the network directly instead)
        predictor.manual_initialization(self.network, self.plans_manager, self.configuration_manager,
                                        [unwrap(self.network).state_dict()], self.dataset_json,
                                        self.__class__.__name__, self.inference_allowed_mirroring_axes)
        return predictor

    def _preprocessed_cases(self, keys):
        """(key, data tensor, segmentation, properties) of preprocessed cases, as nnU-Net's validation loads them."""
        dataset = self.dataset_class(self.preprocessed_dataset_folder, keys)
        for key in dataset.identifiers:
            data, seg, _, properties = dataset.load_case(key)
            yield key, torch.from_numpy(np.asarray(data[:])), np.asarray(seg[:]), properties

    def write_validation_maps(self) -> None:
        from entrust_nnunet.predict import export_prediction_with_maps

        predictor = self._predictor()
        _, val_keys = self.do_split()
        folder = os.path.join(self.output_folder, "validation")
        for key, data, _, properties in self._preprocessed_cases(val_keys):
            prediction = predictor.predict_logits_from_preprocessed_data(data)
            export_prediction_with_maps(prediction.cpu().numpy(), properties, self.configuration_manager,
                                        self.plans_manager, self.dataset_json, os.path.join(folder, key),
                                        keep_mask=False)
        self.print_to_log_file(f"uncertainty maps of {len(val_keys)} validation cases in {folder}/uncertainty")

    @torch.no_grad()
    def fit_calibration(self) -> None:
        """Fit CalibHead on the held-out calibration cases, predicted exactly as at inference (sliding window,
        mirroring, pooled hypotheses). Voxels outside nnU-Net's crop mask (label < 0) are skipped."""
        if not getattr(self, "calibration_keys", None):
            self.do_split()
        if not self.calibration_keys:
            self.print_to_log_file("CalibHead not fitted: too few training cases for a calibration subset; "
                                   "total falls back to 1 - max probability")
            return
        net = unwrap(self.network)
        self.set_deep_supervision_enabled(False)
        net.eval()
        predictor = self._predictor()
        columns, errors = defaultdict(list), []
        for _, data, seg, _ in self._preprocessed_cases(self.calibration_keys):
            stats = predictor.pooled_statistics(data)
            seg = torch.from_numpy(seg[0]).to(stats["total"].device)
            valid = seg >= 0
            errors.append((stats["mean"].argmax(0) != seg)[valid].float().cpu())
            for k in STATISTICS:
                columns[k].append(stats[k][valid].float().cpu())
        error = torch.cat(errors)
        calib = net.calib.cpu()
        bce = calib.fit_voxels({k: torch.cat(v) for k, v in columns.items()}, error)
        calib.to(self.device)
        self.set_deep_supervision_enabled(self.enable_deep_supervision)
        self.print_to_log_file(f"CalibHead fitted on {len(self.calibration_keys)} held-out calibration cases "
                               f"({error.numel()} voxels, error rate {float(error.mean()):.4f}, BCE {bce:.4f})")


def calibration_subset(keys, fraction: float, seed: int) -> list:
    """A seeded subset of ``keys`` (at least one, and at least one left for training) for CalibHead."""
    keys = sorted(keys)
    if len(keys) < 2 or fraction <= 0:
        return []
    n = min(len(keys) - 1, max(1, int(round(fraction * len(keys)))))
    return sorted(np.random.RandomState(seed).choice(keys, n, replace=False).tolist())


class nnUNetTrainerEnTrust_5epochs(ScheduleMixin, nnUNetTrainerEnTrust):
    schedule = {"num_epochs": 5}


class nnUNetTrainerEnTrust_50epochs(ScheduleMixin, nnUNetTrainerEnTrust):
    schedule = {"num_epochs": 50}


class nnUNetTrainerEnTrust_tinyCPU(ScheduleMixin, nnUNetTrainerEnTrust):
    """For tests: TINY_SCHEDULE."""

    schedule = TINY_SCHEDULE


class nnUNetTrainer_tinyCPU(ScheduleMixin, nnUNetTrainer):
    """Plain nnU-Net on TINY_SCHEDULE (the benchmark's smoke run compares against it)."""

    schedule = TINY_SCHEDULE


class nnUNetTrainerEnTrust_demo(ScheduleMixin, nnUNetTrainerEnTrust):
    """The demo's short CPU schedule (see DEMO_SCHEDULE); nnUNetTrainer_demo is plain nnU-Net on the same one."""

    schedule = DEMO_SCHEDULE


class nnUNetTrainer_demo(ScheduleMixin, nnUNetTrainer):
    """Plain nnU-Net on the demo's schedule: the baseline the demo and benchmark compare against."""

    schedule = DEMO_SCHEDULE


class nnUNetTrainerEnTrustPlaceholder(nnUNetTrainer):
    """Exactly nnUNetTrainer under another name: proves plug-in discovery end to end."""


class nnUNetTrainerEnTrustPlaceholder_tinyCPU(ScheduleMixin, nnUNetTrainerEnTrustPlaceholder):
    schedule = {"num_epochs": 1, "num_iterations_per_epoch": 2, "num_val_iterations_per_epoch": 1}
