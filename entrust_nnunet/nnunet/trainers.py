"""nnUNetTrainerEnTrust: nnU-Net's trainer with EnTrust's network and losses. The plug-in modules in
``trainers/`` re-export it; schedule variants are in :mod:`entrust_nnunet.nnunet.variants`.

It changes these hooks of nnUNetTrainer and nothing else:

* ``build_network_architecture``: whatever class the plans name (PlainConvUNet in ``nnUNetPlans``,
  EnTrustUNet in ``nnUNetEnTrustPlans``), build EnTrustUNet from the same arch kwargs, so both plans train;
* ``_build_loss``: nnU-Net's own deep-supervised Dice+CE, wrapped by :class:`EnTrustLoss`, which adds
  the EnTrust terms; nnU-Net's ``train_step`` and ``validation_step`` run unchanged, the step inside
  :func:`~entrust_nnunet.nnunet.clipping.clipping_per_group` (SegDiff's gradient norm clipped apart from the rest);
* ``get_tr_and_val_datasets``: where ``entrust plan`` preprocessed annotator labels (``labelsTr_annotators/``),
  each training sample draws one annotator's label (:mod:`entrust_nnunet.nnunet.annotators`); validation keeps
  labelsTr;
* ``do_split`` / ``on_train_end``: fit TrustMap's CalibHead, and the temperature of the class probabilities,
  on the validation fold (cases the network never trained on) before the final checkpoint; with fold ``all`` a held-out subset of the training
  cases instead (:mod:`entrust_nnunet.nnunet.calibration`); with modality dropout each case is also predicted
  with subsets of its modalities (:meth:`nnUNetTrainerEnTrust.calibration_modalities`);
* ``train_step`` (:class:`~entrust_nnunet.nnunet.modality_dropout.ModalityDropout`): with ``modality_dropout``
  > 0 each sample keeps a random non-empty subset of its modalities, handed to the network as a mask around
  nnU-Net's unchanged step (off here; on in :class:`nnUNetTrainerEnTrustModDrop`);
* ``perform_actual_validation``: after nnU-Net's own validation, write the uncertainty maps of every
  validation case into ``fold_X/validation/uncertainty/``, cross-fitted (each half of the fold from a
  CalibHead fitted on the other half), so cross-validated metrics never score CalibHead on its own voxels.

Regions and the ignore label work as in nnU-Net: with regions the network has one sigmoid channel per
region (``EnTrustUNet.use_regions``) and nnU-Net's loss is its DC_and_BCE_loss; with an ignore label the
voxels under it are left out of every EnTrust term (:func:`split_target`) and of CalibHead's voxels.

It also logs the EnTrust terms per epoch (training log + ``progress_entrust.png``; kept in the
checkpoint, so ``--c`` continues the curves).
"""
from __future__ import annotations

import contextlib
import os
import time
from collections import defaultdict
from pathlib import Path
from typing import Iterator

import numpy as np
import torch
from nnunetv2.training.dataloading.data_loader import nnUNetDataLoader
from nnunetv2.training.nnUNetTrainer.nnUNetTrainer import nnUNetTrainer
from nnunetv2.utilities.get_network_from_plans import get_network_from_plans
from nnunetv2.utilities.label_handling.label_handling import convert_labelmap_to_one_hot
from torch import nn

from entrust_nnunet.model.crossmodal import FIT_STEPS, EnTrustCrossModalUNet, fit_predictor
from entrust_nnunet.model.network import LOSS_WEIGHTS, EnTrustUNet
from entrust_nnunet.model.outputs import full_resolution
from entrust_nnunet.nnunet.annotators import training_dataset
from entrust_nnunet.nnunet.calibration import (CALIBRATION_STEPS, FOLD_VOXELS_FILE, OTHER_READING_VOXELS_FILE,
                                               Voxels, calibration_subset, calibration_voxels, choose_reading,
                                               class_calibrated_voxels, fit_calib_head, fit_class_temperature,
                                               save_fold_voxels)
from entrust_nnunet.nnunet.clipping import clipping_per_group
from entrust_nnunet.nnunet.distributed import broadcast_state, freeze, thawed, unwrap, waiting_group
from entrust_nnunet.nnunet.modality_dropout import ModalityDropout, calibration_subsets

AUX_LOG_KEYS = tuple(f"entrust_{k}" for k in LOSS_WEIGHTS)


def split_target(target: torch.Tensor, regions: bool, ignore_label: int | None
                 ) -> tuple[torch.Tensor, torch.Tensor | None]:
    """nnU-Net's training target -> (target in the network's space, valid voxels (B, 1, *s) or None).

    Labels: (B, 1, *s) integers, the ignore label replaced by 0 where it is (``valid`` False there).
    Regions: nnU-Net's data loader has turned the labels into (B, R, *s) region membership, and with an
    ignore label appended it as the last channel (as its DC_and_BCE_loss reads it).
    """
    if ignore_label is None:
        return target, None
    if regions:
        return target[:, :-1], ~target[:, -1:].bool()
    valid = target != ignore_label
    return torch.where(valid, target, torch.zeros_like(target)), valid


class EnTrustLoss(nn.Module):
    """nnU-Net's loss plus the EnTrust terms computed from the parts the network cached in forward.

    ``total = base(output, target) + sum_k LOSS_WEIGHTS[k] * aux_k``; the detached aux values of
    training calls are collected in ``history`` for logging. ``regions``/``ignore_label``: the label
    manager's, for :func:`split_target`.
    """

    def __init__(self, base_loss: nn.Module, network: nn.Module, weights: dict[str, float] | None = None,
                 regions: bool = False, ignore_label: int | None = None):
        super().__init__()
        self.base = base_loss
        self.network = [network]  # a list: keep the network out of this module's parameters/state_dict
        self.weights = dict(LOSS_WEIGHTS if weights is None else weights)
        self.regions, self.ignore_label = regions, ignore_label
        self.history: dict[str, list[torch.Tensor]] = defaultdict(list)

    def forward(self, output, target):
        loss = self.base(output, target)
        net = self.network[0]
        # deep-supervision targets come as a list too
        full_res_target, valid = split_target(full_resolution(target), self.regions, self.ignore_label)
        aux = net.auxiliary_losses(net.last_parts, full_res_target, valid)
        net.last_parts = None
        for k, v in aux.items():
            loss = loss + self.weights[k] * v
            if net.training:
                self.history[k].append(v.detach())  # read at the epoch's end: no device sync per step
        return loss


@contextlib.contextmanager
def caching_parts(network: nn.Module) -> Iterator[None]:
    """Within the context, the network's forward keeps its parts for :class:`EnTrustLoss` (and returns the head's
    logits). Only around nnU-Net's train and validation steps: everywhere else (nnU-Net's end-of-training
    validation, ``nnUNetv2_predict``, our calibration) an eval-mode forward without deep supervision must return
    the calibrated class probabilities' logits, and a patch's parts must not be held."""
    net = unwrap(network)
    net.cache_parts = True
    try:
        yield
    finally:
        net.cache_parts, net.last_parts = False, None


def cascade_kwargs(plans_manager, configuration_manager) -> dict:
    """``num_modalities`` for a cascade stage, whose input has the previous stage's one-hot segmentation after the
    image channels (nnU-Net's ``determine_num_input_channels``); the plans' per-channel intensity properties count
    the image channels (the preprocessor normalises by them, so they match the data). Empty otherwise."""
    if configuration_manager.previous_stage_name is None:
        return {}
    return {"num_modalities": len(plans_manager.foreground_intensity_properties_per_channel)}


def check_previous_stage(folder: str, keys) -> None:
    """A cascade stage needs the previous stage's predictions of every case; one line naming the folder if not."""
    found = {os.path.splitext(f)[0] for f in os.listdir(folder)} if os.path.isdir(folder) else set()
    missing = sorted(k for k in keys if k not in found)
    if missing:
        raise FileNotFoundError(f"{folder}: the low-resolution stage's predictions of {len(missing)} case(s) are missing "
                                f"(first: {missing[0]}); train the previous stage (3d_lowres) with this trainer first")


class nnUNetTrainerEnTrust(ModalityDropout, nnUNetTrainer):
    #: modality dropout is off by default: in two three-seed benchmark runs it cost full-modality Dice beyond the
    #: seed spread (0.902 vs 0.916, 0.908 vs 0.918; README); on in nnUNetTrainerEnTrustModDrop
    modality_dropout = 0.0
    #: with fold 'all' only (no validation fold): share of the training cases held out to fit CalibHead
    calibration_fraction = 0.25
    #: CalibHead sees at most this many voxels per case (a seeded uniform subset), bounding its memory
    calibration_voxels_per_case = 200_000
    #: most Adam steps of a CalibHead fit (early stopping picks fewer); schedule variants for tests lower it
    calibration_steps = CALIBRATION_STEPS
    #: with modality dropout: proper modality subsets each calibration case is also predicted with (all when fewer)
    calibration_subsets_per_case = 6
    #: choose how the hypotheses read the experts where they conflict (the vote or the showing expert) on the
    #: calibration cases (:func:`~entrust_nnunet.nnunet.calibration.choose_reading`; they are predicted twice);
    #: False: the vote
    choose_conflict_reading = True

    def __init__(self, plans: dict, configuration: str, fold: int, dataset_json: dict,
                 device: torch.device = torch.device("cuda")):
        super().__init__(plans, configuration, fold, dataset_json, device)
        self._register_aux_log_keys()

    def _register_aux_log_keys(self):
        for key in AUX_LOG_KEYS:
            self.logger.local_logger.my_fantastic_logging.setdefault(key, [])

    #: the network built from the plans' arch kwargs (the ablation trainers name a subclass)
    network_class = EnTrustUNet

    @classmethod
    def build_network_architecture(cls, plans_manager, configuration_manager, num_input_channels: int,
                                   num_output_channels: int, enable_deep_supervision: bool = True) -> nn.Module:
        net = get_network_from_plans(f"{cls.network_class.__module__}.{cls.network_class.__name__}",
                                     {**configuration_manager.network_arch_init_kwargs,
                                      **cascade_kwargs(plans_manager, configuration_manager)},
                                     configuration_manager.network_arch_init_kwargs_req_import,
                                     num_input_channels, num_output_channels, allow_init=True,
                                     deep_supervision=enable_deep_supervision)
        freeze(net.calib)  # fitted after training (fit_calibration), never by the training loss
        return net

    def initialize(self):
        super().initialize()
        unwrap(self.network).use_regions(self.label_manager.has_regions)
        if self.is_cascaded:
            check_previous_stage(self.folder_with_segs_from_previous_stage,
                                 self.dataset_class.get_identifiers(self.preprocessed_dataset_folder))

    def on_train_start(self):
        super().on_train_start()
        self.own_output_space_unfitted()

    def own_output_space_unfitted(self) -> None:
        """This dataset's output space (labels or regions) and an unfitted calibration until :meth:`fit_calibration`:
        ``-pretrained_weights`` loads another model's ``region_outputs`` flag and fitted CalibHead with its
        weights (nnU-Net transfers every matching key), and a checkpoint's fit belongs to the weights it was
        fitted for."""
        net = unwrap(self.network)
        net.use_regions(self.label_manager.has_regions)
        net.calib.unfit()

    def drop_modalities(self, batch: dict, mask: torch.Tensor) -> dict:
        unwrap(self.network).modality_mask = mask.to(self.device)  # the network masks; nnU-Net calls network(x)
        return batch

    def restore_modalities(self) -> None:
        unwrap(self.network).modality_mask = None

    def _build_loss(self):
        net = unwrap(self.network)
        lm = self.label_manager
        return EnTrustLoss(super()._build_loss(), net, self.loss_weights(), regions=lm.has_regions,
                           ignore_label=lm.ignore_label)

    def train_step(self, batch: dict) -> dict:
        # nnU-Net's step, with SegDiff's gradients clipped apart from the rest (nnunet/clipping.py)
        with clipping_per_group(self.network, unwrap(self.network).segdiff), caching_parts(self.network):
            return super().train_step(batch)

    def validation_step(self, batch: dict) -> dict:
        with caching_parts(self.network):
            return super().validation_step(batch)

    def loss_weights(self) -> dict[str, float]:
        """The weights of EnTrust's terms (LOSS_WEIGHTS; variants override this). CLoE's consistency terms (mec,
        rec) stay on without modality dropout too: at four development seeds they lowered the class-probability
        ECE and left the conflict map's separation of conflict from edges as it was (docs/design.md)."""
        return dict(LOSS_WEIGHTS)

    def on_train_epoch_end(self, train_outputs):
        super().on_train_epoch_end(train_outputs)
        means = {k: float(torch.stack(v).float().mean()) for k, v in self.loss.history.items() if v}
        for key, name in zip(AUX_LOG_KEYS, LOSS_WEIGHTS):
            self.logger.log(key, means.get(name, float("nan")), self.current_epoch)
        self.print_to_log_file("entrust losses", {k: round(v, 4) for k, v in means.items()})
        self.loss.history.clear()

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

    def get_tr_and_val_datasets(self):
        dataset_tr, dataset_val = super().get_tr_and_val_datasets()
        return training_dataset(dataset_tr, self.print_to_log_file), dataset_val

    def perform_actual_validation(self, save_probabilities: bool = False):
        super().perform_actual_validation(save_probabilities)
        if self.local_rank == 0:
            self.write_validation_maps()

    def _predictor(self):
        # nnU-Net's own shape: the trainer uses the predictor (not the other way round)
        from entrust_nnunet.nnunet.predictor import EnTrustPredictor

        predictor = EnTrustPredictor(tile_step_size=0.5, use_gaussian=True, use_mirroring=True,
                                     perform_everything_on_device=True, device=self.device, allow_tqdm=False)
        # the current weights as the one 'fold' (nnU-Net's own validation calls the network directly instead)
        predictor.manual_initialization(self.network, self.plans_manager, self.configuration_manager,
                                        [unwrap(self.network).state_dict()], self.dataset_json,
                                        self.__class__.__name__, self.inference_allowed_mirroring_axes)
        return predictor

    def _preprocessed_cases(self, keys):
        """(key, data tensor, segmentation, properties) of preprocessed cases, as nnU-Net's validation loads them."""
        dataset = self.dataset_class(self.preprocessed_dataset_folder, keys,
                                     folder_with_segs_from_previous_stage=self.folder_with_segs_from_previous_stage)
        for key in dataset.identifiers:
            data, seg, seg_prev, properties = dataset.load_case(key)
            data = np.asarray(data[:])
            if self.is_cascaded:  # the previous stage's one-hot segmentation after the images, as nnU-Net validates
                data = np.vstack((data, convert_labelmap_to_one_hot(np.asarray(seg_prev[:]),
                                                                    self.label_manager.foreground_labels,
                                                                    output_dtype=data.dtype)))
            yield key, torch.from_numpy(data), np.asarray(seg[:]), properties

    def write_validation_maps(self) -> None:
        """Uncertainty maps of the validation fold, each half with a CalibHead fitted on the other half."""
        from entrust_nnunet.nnunet.predictor import export_prediction_with_maps

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

    def calibration_modalities(self, key: str) -> list[tuple[bool, ...] | None]:
        """What a calibration case is predicted with: every modality (None) and, when the network trains with
        modality dropout, up to ``calibration_subsets_per_case`` proper subsets (M present flags), so that
        CalibHead and the class temperature also learn the statistics of cases with modalities missing."""
        if not self.modality_dropout:
            return [None]
        m = unwrap(self.network).num_modalities
        return [None, *calibration_subsets(m, self.calibration_subsets_per_case, key)]

    def _calibration_voxels(self, keys) -> tuple[dict[str, torch.Tensor], torch.Tensor]:
        """TrustMap statistics and error indicators of the voxels of ``keys`` (each case predicted with every
        modality set of :meth:`calibration_modalities`), predicted as at inference."""
        cache = self.__dict__.setdefault("_calibration_cache", {})  # per prediction; emptied when weights load

        def name(key, present):
            return key if present is None else f"{key}~{''.join('1' if p else '0' for p in present)}"

        names = {key: {name(key, p): p for p in self.calibration_modalities(key)} for key in keys}
        self.set_deep_supervision_enabled(False)
        unwrap(self.network).eval()
        try:
            todo = [k for k in keys if any(n not in cache for n in names[k])]
            cases = ((n, data, seg, present) for key, data, seg, _ in self._preprocessed_cases(todo)
                     for n, present in names[key].items() if n not in cache)
            return calibration_voxels(self._predictor() if todo else None, cases, [n for k in keys for n in names[k]],
                                      cache, self.calibration_voxels_per_case, [k for k in keys for _ in names[k]])
        finally:
            self.set_deep_supervision_enabled(self.enable_deep_supervision)

    def _fit_calib_head(self, keys) -> str:
        """Fit the network's CalibHead on the voxels of ``keys``, for the mask and confidence of its class
        calibration (fitted before it); returns a one-line summary."""
        # predicted before CalibHead moves to the CPU: the predictor moves the whole network to the trainer's device,
        # CalibHead included, which would leave it on CUDA under CPU voxels (--val and --val_best start uncached)
        self._calibration_voxels(keys)
        calib = unwrap(self.network).calib.cpu()

        def voxels_of(names):
            return class_calibrated_voxels(self._calibration_voxels(names), calib.temperature, calib.conflict_bias)

        try:
            with thawed(calib):
                return fit_calib_head(calib, voxels_of, keys, self.calibration_steps)
        finally:
            calib.to(self.device)

    def _voxels_per_reading(self) -> dict[str, Voxels]:
        """The calibration voxels per conflict reading, the one :func:`choose_reading` keeps first (set in
        CalibHead, and the statistics cache left holding its voxels); the vote's alone without
        :attr:`choose_conflict_reading`."""
        calib = unwrap(self.network).calib
        calib.showing_reading.zero_()
        vote = self._calibration_voxels(self.calibration_keys)
        # regions keep their sigmoids (no class calibration to judge by); without alternatives both readings agree
        if not (self.choose_conflict_reading and "probabilities" in vote[0]
                and unwrap(self.network).expert_alternatives > 0):
            return {"vote": vote}
        kept = self.__dict__.pop("_calibration_cache", {})
        calib.showing_reading.fill_(1.0)
        showing = self._calibration_voxels(self.calibration_keys)
        reading, summary = choose_reading({"vote": vote[0], "showing": showing[0]})
        self.print_to_log_file(summary)
        if reading == "vote":
            calib.showing_reading.zero_()
            self.__dict__["_calibration_cache"] = kept
            return {"vote": vote, "showing": showing}
        return {"showing": showing, "vote": vote}

    def fit_calibration(self) -> None:
        """Fit CalibHead on the calibration cases (the validation fold; a held-out subset with fold 'all').
        Under DDP rank 0 fits and the other ranks receive its fit."""
        if not getattr(self, "calibration_keys", None):
            self.do_split()
        if not self.calibration_keys:
            self.print_to_log_file("CalibHead not fitted: no cases to fit it on; total falls back to "
                                   "1 - max probability")
            return
        group = waiting_group()  # the other ranks wait for rank 0's fit longer than NCCL's timeout allows
        if self.local_rank == 0:
            sets = len(self.calibration_modalities(self.calibration_keys[0]))
            subsets = f", each predicted with {sets} modality sets" if sets > 1 else ""
            readings = self._voxels_per_reading()
            voxels = next(iter(readings.values()))
            # the class calibration first: it decides the mask, whose error CalibHead learns
            if "probabilities" in voxels[0]:  # label outputs only: regions keep their sigmoids
                self.print_to_log_file(fit_class_temperature(unwrap(self.network).calib, voxels))
            self.print_to_log_file(f"CalibHead fitted on {self._fit_calib_head(self.calibration_keys)}{subsets}")
            # out-of-fold voxels for `entrust calibrate`, which fits one calibrator (and chooses the reading once)
            # on every fold's
            calib = unwrap(self.network).calib
            (Path(self.output_folder) / OTHER_READING_VOXELS_FILE).unlink(missing_ok=True)  # an earlier run's
            for (reading, v), name in zip(readings.items(), (FOLD_VOXELS_FILE, OTHER_READING_VOXELS_FILE)):
                save_fold_voxels(Path(self.output_folder) / name,
                                 class_calibrated_voxels(v, calib.temperature, calib.conflict_bias),
                                 reading if len(readings) > 1 else None)
        broadcast_state(unwrap(self.network).calib, group=group)


class nnUNetTrainerEnTrustModDrop(nnUNetTrainerEnTrust):
    """EnTrust trained with modality dropout: half of the samples keep a random proper non-empty subset of
    their modalities (masked, not zero-filled); such a model predicts cases with absent channel files."""

    modality_dropout = 0.5


class nnUNetTrainerEnTrustCrossModal(nnUNetTrainerEnTrust):
    """EnTrust whose conflict map is the cross-modal prediction conflict, read by the coin
    (:class:`~entrust_nnunet.model.crossmodal.EnTrustCrossModalUNet`): a conflict the labels need not teach.
    There is no expert reading to choose. The predictors are fitted after training, before the calibration that
    reads their map, on the training cases' patches without augmentation (:meth:`fit_crossmodal`); a network whose
    predictors are not fitted (``checkpoint_best.pth``, ``-pretrained_weights``) gets them fitted before its
    calibration or validation."""

    network_class = EnTrustCrossModalUNet
    choose_conflict_reading = False
    #: Adam steps of the predictors' fit (batches of the trainer's batch size and patch size)
    crossmodal_fit_steps = FIT_STEPS

    @classmethod
    def build_network_architecture(cls, plans_manager, configuration_manager, num_input_channels: int,
                                   num_output_channels: int, enable_deep_supervision: bool = True) -> nn.Module:
        net = super().build_network_architecture(plans_manager, configuration_manager, num_input_channels,
                                                 num_output_channels, enable_deep_supervision)
        freeze(net.crossmodal)  # fitted after training (fit_crossmodal), never by the training loss
        return net

    def own_output_space_unfitted(self) -> None:
        super().own_output_space_unfitted()
        unwrap(self.network).crossmodal.fitted.zero_()  # -pretrained_weights: another dataset's fit

    def fit_calibration(self) -> None:
        # the calibration reads the map: the predictors first (at the end of training; with --val_best too, whose
        # checkpoint_best.pth was saved before they were fitted)
        self.fit_crossmodal_unless_fitted()
        super().fit_calibration()

    def perform_actual_validation(self, save_probabilities: bool = False):
        self.fit_crossmodal_unless_fitted()
        super().perform_actual_validation(save_probabilities)

    def fit_crossmodal_unless_fitted(self) -> None:
        if not float(unwrap(self.network).crossmodal.fitted):
            self.fit_crossmodal()

    def fit_crossmodal(self) -> None:
        """Fit the cross-modal predictors on the training cases (never the calibration cases, which must see the
        map as a test case does). Under DDP rank 0 fits and the other ranks receive its fit."""
        predictor = unwrap(self.network).crossmodal
        group = waiting_group()
        if self.local_rank == 0:
            start = time.perf_counter()
            with thawed(predictor):
                first, last = fit_predictor(predictor, self._unaugmented_images(), self.crossmodal_fit_steps)
            self.print_to_log_file(f"cross-modal predictors fitted on the training cases without augmentation: "
                                   f"{self.crossmodal_fit_steps} steps of {self.batch_size} patches in "
                                   f"{time.perf_counter() - start:.0f} s, NLL {first:.3f} -> {last:.3f}")
        broadcast_state(predictor, group=group)

    def _unaugmented_images(self) -> Iterator[torch.Tensor]:
        """Endless batches of the training cases' image channels as preprocessed, cropped by nnU-Net's data loader
        (its foreground oversampling; no transforms) and mirrored at random along the inference mirroring axes
        (the predictor meets mirrored patches at inference)."""
        loader = nnUNetDataLoader(self.get_tr_and_val_datasets()[0], self.batch_size,
                                  self.configuration_manager.patch_size, self.configuration_manager.patch_size,
                                  self.label_manager, oversample_foreground_percent=self.oversample_foreground_percent,
                                  probabilistic_oversampling=self.probabilistic_oversampling)
        m = unwrap(self.network).num_modalities
        axes = self.inference_allowed_mirroring_axes or ()
        while True:
            x = next(loader)["data"][:, :m]
            flip = [a + 2 for a in axes if torch.rand(()) < 0.5]
            yield (x.flip(flip) if flip else x).to(self.device, non_blocking=True)
