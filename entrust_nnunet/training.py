"""nnU-Net trainers for EnTrust. The plug-in modules in ``trainers/`` re-export these classes.

``nnUNetTrainerEnTrust`` changes three hooks of nnUNetTrainer and nothing else:

* ``build_network_architecture``: whatever class the plans name (PlainConvUNet in ``nnUNetPlans``,
  EnTrustUNet in ``nnUNetEnTrustPlans``), build :class:`~entrust_nnunet.network.EnTrustUNet`
  from the same arch kwargs, so both plans train;
* ``_build_loss``: nnU-Net's own deep-supervised Dice+CE, wrapped by :class:`EnTrustLoss`, which adds
  the EnTrust terms (generative, independence, experts, conflict); nnU-Net's ``train_step`` and
  ``validation_step`` run unchanged;
* ``on_train_end``: fit TrustMap's CalibHead on the validation fold (cases the network never trained
  on) before the final checkpoint; only with fold ``all``, which has no held-out cases, ``do_split``
  holds a calibration subset of the training cases out of training instead;
* ``perform_actual_validation``: after nnU-Net's own validation (masks, summary.json), write the
  uncertainty maps of every validation case into ``fold_X/validation/uncertainty/`` with
  :class:`~entrust_nnunet.predict.EnTrustPredictor`, so 5-fold cross-validation yields maps for
  every training case. These maps are cross-fitted: each half of the fold gets them from a CalibHead
  fitted on the other half, so cross-validated uncertainty metrics never score CalibHead on the
  voxels it was fitted on.

It also logs the EnTrust terms per epoch (training log + ``progress_entrust.png`` beside nnU-Net's
``progress.png``; the values are kept in the checkpoint, so ``--c`` continues the curves).
"""
from __future__ import annotations

import os
import zlib
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
    #: with fold 'all' only (no validation fold): share of the training cases held out to fit CalibHead
    calibration_fraction = 0.25
    #: CalibHead sees at most this many voxels per case (a seeded uniform subset), bounding its memory
    calibration_voxels_per_case = 200_000

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
        self.__dict__.pop("_calibration_cache", None)  # statistics of other weights

    def on_train_end(self):
        self.fit_calibration()
        super().on_train_end()

    def do_split(self):
        """nnU-Net's split. CalibHead is fitted on the validation fold; only fold ``all``, whose validation
        cases are its training cases, holds a calibration subset (``calibration_fraction``, at least one
        case) out of training instead, so CalibHead never sees cases the network was trained on."""
        tr_keys, val_keys = super().do_split()
        if self.fold != "all":
            self.calibration_keys = sorted(val_keys)
            return tr_keys, val_keys
        self.calibration_keys = calibration_subset(tr_keys, self.calibration_fraction, seed=12345)
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
        """Uncertainty maps of the validation fold, each half with a CalibHead fitted on the other half."""
        from entrust_nnunet.predict import export_prediction_with_maps

        _, val_keys = self.do_split()
        val_keys = sorted(val_keys)
        calib = unwrap(self.network).calib
        fitted = {k: v.clone() for k, v in calib.state_dict().items()}
        halves = [val_keys[0::2], val_keys[1::2]]
        cross_fit = self.fold != "all" and len(val_keys) >= 2
        groups = [(halves[0], halves[1]), (halves[1], halves[0])] if cross_fit else [(val_keys, None)]
        folder = os.path.join(self.output_folder, "validation")
        try:
            for keys, other in groups:
                if other is not None:
                    self._fit_calib_head(other)
                predictor = self._predictor()
                for key, data, _, properties in self._preprocessed_cases(keys):
                    prediction = predictor.predict_logits_from_preprocessed_data(data)
                    export_prediction_with_maps(prediction.cpu().numpy(), properties, self.configuration_manager,
                                                self.plans_manager, self.dataset_json, os.path.join(folder, key),
                                                keep_mask=False)
        finally:
            calib.load_state_dict(fitted)
        how = "cross-fitted CalibHead (each half fitted on the other)" if cross_fit else "the fitted CalibHead"
        self.print_to_log_file(f"uncertainty maps of {len(val_keys)} validation cases in {folder}/uncertainty, "
                               f"{how}")

    @torch.no_grad()
    def _calibration_voxels(self, keys) -> tuple[dict[str, torch.Tensor], torch.Tensor]:
        """TrustMap statistics and error indicators of the voxels of ``keys``, predicted exactly as at
        inference (sliding window, mirroring, pooled hypotheses). Voxels outside nnU-Net's crop mask
        (label < 0) are skipped; at most ``calibration_voxels_per_case`` voxels per case are kept."""
        cache = self.__dict__.setdefault("_calibration_cache", {})  # per case; emptied when weights load
        net = unwrap(self.network)
        self.set_deep_supervision_enabled(False)
        net.eval()
        predictor = self._predictor()
        todo = [k for k in keys if k not in cache]
        for key, data, seg, _ in self._preprocessed_cases(todo):
            stats = predictor.pooled_statistics(data)
            seg = torch.from_numpy(seg[0]).to(stats["total"].device)
            valid = (seg >= 0).flatten().nonzero()[:, 0].cpu()
            if valid.numel() > self.calibration_voxels_per_case:
                gen = torch.Generator().manual_seed(zlib.crc32(key.encode("utf-8")))
                valid = valid[torch.randperm(valid.numel(), generator=gen)[:self.calibration_voxels_per_case]]
            error = (stats["mean"].argmax(0) != seg).flatten().cpu()[valid].float()
            cache[key] = ({k: stats[k].flatten().float().cpu()[valid] for k in STATISTICS}, error)
        self.set_deep_supervision_enabled(self.enable_deep_supervision)
        columns = {k: torch.cat([cache[key][0][k] for key in keys]) for k in STATISTICS}
        return columns, torch.cat([cache[key][1] for key in keys])

    def _fit_calib_head(self, keys) -> str:
        """Fit the network's CalibHead on the voxels of ``keys``; returns a one-line summary.

        With two cases or more, every other case judges a fit on the rest, which picks the number of
        steps (early stopping); the head is then fitted on all of ``keys`` for that many steps.
        """
        keys = sorted(keys)
        calib = unwrap(self.network).calib.cpu()
        steps = 1000
        if len(keys) >= 2:
            _, steps = calib.fit_voxels(*self._calibration_voxels(keys[0::2]), steps=steps,
                                        judge=self._calibration_voxels(keys[1::2]))
        columns, error = self._calibration_voxels(keys)
        bce, _ = calib.fit_voxels(columns, error, steps=steps)
        calib.to(self.device)
        return (f"{len(keys)} cases ({error.numel()} voxels, error rate {float(error.mean()):.4f}, {steps} steps "
                f"chosen on held-out cases, BCE {bce:.4f})")

    def fit_calibration(self) -> None:
        """Fit CalibHead on the calibration cases (the validation fold; a held-out subset with fold 'all')."""
        if not getattr(self, "calibration_keys", None):
            self.do_split()
        if not self.calibration_keys:
            self.print_to_log_file("CalibHead not fitted: no cases to fit it on; total falls back to "
                                   "1 - max probability")
            return
        self.print_to_log_file(f"CalibHead fitted on {self._fit_calib_head(self.calibration_keys)}")


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
