"""Prediction with uncertainty maps: a subclass of nnU-Net's nnUNetPredictor.

nnU-Net's predictor is reused for everything it already does (preprocessing, sliding window with
Gaussian weighting, mirroring, fold averaging, resampling, crop/transpose back). Two hooks change:

* the network it runs is wrapped in :class:`TrustStatistics`, which returns per patch the
  quantities that pool by averaging (:data:`POOLED_MAPS`): the hypotheses' mean class probabilities (C channels),
  the entropy of that mean, the network's own models' spread, ProbeStep's map, the conflict map and the head's
  confidence. nnU-Net's Gaussian-weighted sliding window and its mirroring pool them per fold; our loop over the
  folds (:meth:`EnTrustPredictor._pooled_over_folds`) keeps each fold's pooled probabilities p_f, from which the
  exported maps follow the UQ study: aleatoric = mean_f H(p_f) (less MC dropout's spread), epistemic =
  H(mean_f p_f) - aleatoric (the folds' disagreement; 0 with one EnTrust fold). CalibHead reads the pooled
  per-pass entropies and the rest of the entropy, as it was fitted, and the folds' CalibHeads are averaged;
* export: the mask (and, with ``--save_probabilities``, the pooled class probabilities as ``.npz``/``.pkl``:
  temperature-scaled by the fitted temperature, their top label's confidence the calibrated ``1 - P(error)``,
  :meth:`EnTrustPredictor.class_probabilities`) is written by nnU-Net's own ``export_prediction_from_logits``;
  the maps are resampled by nnU-Net's own functions and written as float32 images with the mask's geometry into
  ``OUT/uncertainty/``. Everything goes to temporary names first and is renamed at the end, maps
  before the mask, so a mask on disk means its maps are complete.

Output per case: ``OUT/CASE<ending>`` and ``OUT/uncertainty/CASE_{total,aleatoric,epistemic,conflict}<ending>``
(``total`` is the probability of error); with a modality record, ``OUT/uncertainty/CASE_modalities.json``.

Absent modalities: :attr:`TrustStatistics.modality_mask` (set per case) is handed to EnTrust networks, which
mask those streams; other nnU-Net networks see the channels zero-filled after normalisation (how the
``nnUNetTrainerModDrop`` baseline is trained, and what a user of plain nnU-Net would do).

Region datasets (nnU-Net's regions, e.g. BraTS): the pooled "class probabilities" are the regions' sigmoid
probabilities (C = R channels, overlapping) and are exported to nnU-Net as their logits, so its own
exporter writes the mask after its region-to-label conversion (``regions_class_order``) and saves the
sigmoid probabilities in ``.npz`` as ``nnUNetv2_predict`` does (its ensembling works on them). ``total`` is
the probability that this converted mask is wrong; aleatoric and epistemic sum binary entropies over
regions, conflict is the largest per-region conflict (:mod:`entrust_nnunet.model.trustmap`).
"""
from __future__ import annotations

import contextlib
import json
import math
import multiprocessing
import os
import sys
from pathlib import Path
from types import SimpleNamespace

import numpy as np
import SimpleITK as sitk
import torch
from nnunetv2.inference.export_prediction import (convert_predicted_logits_to_segmentation_with_correct_shape,
                                                  export_prediction_from_logits)
from nnunetv2.configuration import default_num_processes
from nnunetv2.inference.data_iterators import PreprocessAdapter
from nnunetv2.inference.predict_from_raw_data import nnUNetPredictor
from nnunetv2.utilities.label_handling.label_handling import LabelManager
from nnunetv2.utilities.plans_handling.plans_handler import PlansManager
from acvl_utils.cropping_and_padding.bounding_boxes import insert_crop_into_image
from torch import nn
from tqdm import tqdm

from entrust_nnunet.data.io import (HYPOTHESIS_FOLDER, MAP_FOLDER, MAP_NAMES, InputError, atomic_file, hypothesis_path,
                                    map_path, numbered_files, temporary_path, write_image)
from entrust_nnunet.data.modalities import modalities_path
from entrust_nnunet.model.absence import resolve_mask, without_absent
from entrust_nnunet.model.alternatives import alternatives_gate, gated_error_floor
from entrust_nnunet.model.network import EnTrustUNet
from entrust_nnunet.model.outputs import as_logits, decision_confidence, log_probabilities, probabilities
from entrust_nnunet.model.sampling import DEFAULT_SAMPLING, SamplingSettings
from entrust_nnunet.model.trustmap import (CalibHead, calibrated_log_probabilities, output_entropy,
                                           top_label_calibrated)
from entrust_nnunet.nnunet.calibration import load_calibrator, with_conflict_reading
from entrust_nnunet.nnunet.checkpoints import build_network, check_weights_fit, find_trainer, load_checkpoint
from entrust_nnunet.nnunet.distributed import unwrap
from entrust_nnunet.nnunet.orientation import in_written_order, written_voxel_order
from entrust_nnunet.nnunet.workers import (end_processes, sigint_blocked_in_children, workers_ended_first_on_signals,
                                           workers_started)


#: per-voxel statistics pooled beside the mean probabilities (by averaging, like nnU-Net pools logits)
#: ``aleatoric``: the entropy of a patch's (pass's) mean, pooled as CalibHead was fitted to read it (below the entropy
#: of the pooled mean by the mirrorings' and patches' disagreement, an error signal). ``model_spread``: the
#: disagreement among a network's own models within a patch (MC dropout's passes: the mutual information
#: ``H(mean) - mean_t H(p_t)``; 0 for EnTrust, whose hypotheses are one generative model's, and for a plain
#: network). The EXPORTED aleatoric and epistemic maps are made after pooling (:func:`fold_aleatoric`), so that
#: patch overlap and mirroring are averaged, never counted as disagreement.
POOLED_MAPS = ("aleatoric", "model_spread", "probe", "conflict", "head_confidence")
#: what :meth:`EnTrustUNet.sample` is asked for per patch (its model spread is 0)
SAMPLED_MAPS = tuple(k for k in POOLED_MAPS if k != "model_spread")


def pooling_channels(stats: dict[str, torch.Tensor]) -> list[torch.Tensor]:
    """The maps of :data:`POOLED_MAPS` as nnU-Net pools them, each (B, 1, *s): ``head_confidence`` as ``1 - c``.

    nnU-Net's sliding-window accumulator is float16, whose step near 1 is 4.9e-4: every confidence above 0.9995
    would come back as 1 (CalibHead reads ``log(1 - c)``), while ``1 - c`` keeps three digits far below that.
    Averaging is linear, so the pooled ``1 - c`` is 1 - the pooled ``c``. :func:`pooled_maps` reads them back."""
    return [(1 - stats[k] if k == "head_confidence" else stats[k])[:, None] for k in POOLED_MAPS]


def pooled_maps(channels: torch.Tensor) -> dict[str, torch.Tensor]:
    """The maps of :data:`POOLED_MAPS` from nnU-Net's pooled channels (len(POOLED_MAPS), *s) of
    :func:`pooling_channels`."""
    maps = dict(zip(POOLED_MAPS, channels.float()))
    maps["head_confidence"] = 1 - maps["head_confidence"]
    return maps


def pooled_probabilities(pooled: torch.Tensor, regions: bool) -> torch.Tensor:
    """Class probabilities (C, *s) from nnU-Net's pooled (float16-accumulated) channels: within [0, 1], and for
    labels summing to one."""
    p = pooled.clamp(0, 1)
    return p if regions else p / p.sum(0, keepdim=True).clamp_min(1e-8)


def fold_aleatoric(pooled: torch.Tensor, model_spread: torch.Tensor, regions: bool) -> torch.Tensor:
    """One model's (fold's) aleatoric map ``H(p_f) - s_f`` (*s): the entropy of its pooled class probabilities
    ``p_f`` (C, *s; patches and mirrorings averaged first, so their differences count as nothing) less its own
    models' spread ``s_f`` (MC dropout's passes; 0 for EnTrust and plain networks).

    Over F folds (the UQ study's definition): aleatoric = mean_f [H(p_f) - s_f], epistemic = H(mean_f p_f) -
    aleatoric = the folds' Jensen-Shannon divergence + mean_f s_f. One EnTrust fold: aleatoric = H(p), epistemic 0.
    MC dropout's ``s_f`` is its passes' divergence per patch, pooled: an upper bound of their divergence after
    pooling (which is convex), exact without mirroring and overlap.
    """
    return (output_entropy(pooled_probabilities(pooled, regions), 0, regions) - model_spread).clamp_min(0)


def uncertainty_statistics(net: nn.Module, x: torch.Tensor, sampling: SamplingSettings,
                           modality_mask=None, regions: bool = False) -> dict[str, torch.Tensor]:
    """Per-patch ``mean`` (B, C, *s) class probabilities and the maps of :data:`POOLED_MAPS` (B, *s).

    EnTrustUNet samples its SegDiff hypotheses; a network with ``sample_statistics`` (the baselines in
    ``entrust_nnunet.model.mcdropout``, ``entrust_nnunet.model.crnp``) gives its own; any other nnU-Net
    network is read as plain softmax (no model spread, no probe, no conflict); with ``regions`` (the
    dataset's outputs are nnU-Net regions) those networks are read with a sigmoid per region channel, as nnU-Net
    reads them (EnTrust knows its own). For networks without a deterministic head of their own,
    ``head_confidence`` is the probability of the mask's decision under ``mean``. Also
    ``hypotheses`` (K, B, C, *s): the network's samples, or its one prediction (K = 1); EnTrust's only with
    ``sampling.hypotheses`` (drawing K of them costs; nothing pooled reads them). ``modality_mask`` (M,):
    absent modalities, masked by EnTrust networks, zero-filled (after normalisation) for any other.
    """
    if isinstance(net, EnTrustUNet):
        # the K hypotheses only when they are written (``sampling.hypotheses``): the pooled maps do not read them
        wanted = (*SAMPLED_MAPS, "hypotheses") if sampling.hypotheses else SAMPLED_MAPS
        s = net.sample(x, sampling, modality_mask=modality_mask, maps=wanted)
        return {k: s[k] for k in ("mean", *wanted)} | {"model_spread": torch.zeros_like(s["conflict"])}
    if modality_mask is not None:  # the image channels first; a cascade stage's prior after them stays as it is
        x = without_absent(x, resolve_mask(modality_mask, x.shape[0], torch.as_tensor(modality_mask).shape[-1],
                                           x.device))
    if hasattr(net, "sample_statistics"):
        s = net.sample_statistics(x, num_hypotheses=sampling.num_hypotheses, seed=sampling.seed, regions=regions)
    else:
        mean = probabilities(net(x), regions)
        s = {"mean": mean, "aleatoric": output_entropy(mean, 1, regions)}
    zeros = torch.zeros_like(s["aleatoric"])
    spread = (output_entropy(s["mean"], 1, regions) - s["aleatoric"]).clamp_min(0)
    return {"mean": s["mean"], "aleatoric": s["aleatoric"], "model_spread": spread, "probe": zeros,
            "conflict": s.get("conflict", zeros),
            "head_confidence": decision_confidence(s["mean"], regions),
            "hypotheses": s.get("hypotheses", s["mean"][None])}


class TrustStatistics(nn.Module):
    """Wraps a network so that ``forward(x)`` returns (B, C + len(POOLED_MAPS), *s): mean probabilities, then
    the maps of :data:`POOLED_MAPS`.

    These all pool by averaging, so nnU-Net's sliding window, mirroring and fold average pool them
    exactly. ``load_state_dict`` goes to the wrapped network, so nnU-Net's per-fold loading works.
    """

    def __init__(self, network: nn.Module, sampling: SamplingSettings, with_hypotheses: bool = False,
                 regions: bool = False):
        super().__init__()
        self.net = network
        self.sampling = sampling
        #: the dataset's outputs are nnU-Net regions (sigmoids): how a network other than EnTrust is read
        self.regions = regions
        #: also return every hypothesis' class probabilities (K x C more channels; hypothesis k draws the
        #: same latent in every patch, so averaging it over patches and mirrorings keeps it one mask)
        self.with_hypotheses = with_hypotheses
        #: (M,) modalities present in the case being predicted (None: all); the predictor sets it per case
        self.modality_mask = None

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        # the hypotheses' drawn readings only when they are written
        sampling = self.sampling.with_(hypotheses=self.with_hypotheses)
        s = uncertainty_statistics(self.net, x, sampling, self.modality_mask, self.regions)
        hyps = [s["hypotheses"].movedim(0, 1).flatten(1, 2).to(s["mean"].dtype)] if self.with_hypotheses else []
        return torch.cat([s["mean"], *pooling_channels(s), *hyps], 1)

    def load_state_dict(self, state_dict, strict: bool = True, assign: bool = False):
        return self.net.load_state_dict(state_dict, strict=strict, assign=assign)


class _MapChannels(LabelManager):
    """Lets nnU-Net's resampling/cropping/transposing code carry float maps: identity 'nonlinearity',
    zeros outside the crop (nnU-Net crops to the non-zero image region, where there is nothing to doubt)."""

    def apply_inference_nonlin(self, logits):
        return torch.from_numpy(logits).float() if isinstance(logits, np.ndarray) else logits.float()

    def revert_cropping_on_probabilities(self, predicted_probabilities, bbox, original_shape):
        out = torch.zeros((predicted_probabilities.shape[0], *original_shape), dtype=predicted_probabilities.dtype)
        return insert_crop_into_image(out, predicted_probabilities, bbox)


def _write_hypotheses(hypotheses: np.ndarray, properties: dict, configuration_manager, plans_manager,
                      dataset_json: dict, reference: sitk.Image, order, out_dir: str, case: str) -> None:
    """Each hypothesis' labels (F*K, *s, preprocessed geometry) as a mask with the input's geometry, brought
    back exactly as nnU-Net brings back the mask (resampled one-hot, cropping and transposition reverted) and put
    in the voxel ``order`` of the mask nnU-Net wrote (``reference``: :func:`written_voxel_order`)."""
    label_manager = plans_manager.get_label_manager(dataset_json)
    c = label_manager.num_segmentation_heads
    shape = sitk.GetArrayViewFromImage(reference).shape
    for k, labels in enumerate(hypotheses):
        if label_manager.has_regions:  # +-20 per region: the sigmoid gives membership, nnU-Net converts back
            onehot_logits = np.stack([np.isin(labels, np.atleast_1d(r)) for r in label_manager.foreground_regions])
            onehot_logits = (onehot_logits.astype(np.float32) * 2 - 1) * 20.0
        else:
            onehot_logits = np.moveaxis(np.eye(c, dtype=np.float32)[labels], -1, 0) * 20.0  # softmax -> one-hot
        seg = convert_predicted_logits_to_segmentation_with_correct_shape(
            torch.from_numpy(onehot_logits), plans_manager, configuration_manager, label_manager, properties)
        image = sitk.GetImageFromArray(in_written_order(np.asarray(seg, dtype=np.uint8), order, shape))
        image.CopyInformation(reference)
        write_image(image, hypothesis_path(out_dir, case, k, dataset_json["file_ending"]))


def remove_superseded_outputs(out_dir: str, case: str, ending: str, hypotheses_written: int,
                              probabilities_written: bool) -> None:
    """Files an earlier prediction of ``case`` left in ``out_dir`` that this one does not rewrite: hypotheses
    numbered from ``hypotheses_written`` on and, without ``probabilities_written``, ``CASE.npz``/``CASE.pkl``.
    Evaluation, the report and nnU-Net's ensembling read whatever is there; they must not mix two predictions.
    This prediction's hypotheses 0 .. n-1 are written already, so they are the first n in numbered order."""
    stale = numbered_files(Path(out_dir) / HYPOTHESIS_FOLDER, case, "h", ending)[hypotheses_written:]
    if not probabilities_written:
        stale += [Path(out_dir) / f"{case}{e}" for e in (".npz", ".pkl")]
    for f in stale:
        with contextlib.suppress(FileNotFoundError):
            f.unlink()


def export_prediction_with_maps(prediction: np.ndarray, properties: dict, configuration_manager, plans_manager,
                                dataset_json: dict, output_file_truncated: str, save_probabilities: bool = False,
                                keep_mask: bool = True, hypotheses: np.ndarray | None = None,
                                modalities: dict | None = None) -> None:
    """Write mask (+ probabilities) with nnU-Net's exporter and the maps (+ hypotheses) beside it, atomically.

    ``prediction`` is (C + 4, *s): log class probabilities, then total, aleatoric, epistemic, conflict.
    ``hypotheses`` (F*K, *s): labels of every hypothesis, written to ``OUT/hypotheses/CASE_hNN``.
    With ``keep_mask=False`` only the maps are kept (nnU-Net's validation has written the masks).
    ``modalities``: the case's modality record, written to ``OUT/uncertainty/CASE_modalities.json``.
    """
    num_classes = prediction.shape[0] - len(MAP_NAMES)
    ending = dataset_json["file_ending"]
    out_dir, case = os.path.split(output_file_truncated)
    tmp_trunc = str(temporary_path(output_file_truncated))
    # named before nnU-Net writes them: a signal between its write and our bookkeeping must not leave one behind
    temporaries = [tmp_trunc + e for e in (ending, ".npz", ".pkl")]
    try:
        export_prediction_from_logits(prediction[:num_classes], properties, configuration_manager, plans_manager,
                                      dataset_json, tmp_trunc, save_probabilities)
        written = [t for t in temporaries if os.path.exists(t)]
        label_manager = _MapChannels({"background": 0, **{f"map{i}": i for i in range(1, len(MAP_NAMES))}}, None)
        _, maps = convert_predicted_logits_to_segmentation_with_correct_shape(
            prediction[num_classes:], plans_manager, configuration_manager, label_manager, properties,
            return_probabilities=True)
        reference = sitk.ReadImage(tmp_trunc + ending)  # the mask nnU-Net wrote: its geometry is the input's
        os.makedirs(os.path.join(out_dir, MAP_FOLDER), exist_ok=True)
        shape = sitk.GetArrayViewFromImage(reference).shape
        # the mask's voxel order: a reorienting writer wrote it in the input's orientation, not the network's
        order = written_voxel_order(plans_manager.image_reader_writer_class(), tuple(maps.shape[1:]), properties,
                                    ending, tmp_trunc)
        for name, values in zip(MAP_NAMES, maps):  # channel order of predict_logits_from_preprocessed_data
            image = sitk.GetImageFromArray(in_written_order(np.asarray(values, dtype=np.float32), order, shape))
            image.CopyInformation(reference)
            write_image(image, map_path(out_dir, case, name, ending))
        if modalities is not None:
            with atomic_file(modalities_path(out_dir, case)) as f:
                json.dump(modalities, f, indent=2)
        if hypotheses is not None:
            os.makedirs(os.path.join(out_dir, HYPOTHESIS_FOLDER), exist_ok=True)
            _write_hypotheses(hypotheses, properties, configuration_manager, plans_manager, dataset_json, reference,
                              order, out_dir, case)
        if keep_mask:
            remove_superseded_outputs(out_dir, case, ending, 0 if hypotheses is None else len(hypotheses),
                                      save_probabilities)
        for tmp in written if keep_mask else []:  # the mask last: a mask on disk means its maps are complete
            os.replace(tmp, output_file_truncated + tmp[len(tmp_trunc):])
    finally:
        for tmp in temporaries:
            if os.path.exists(tmp):
                os.remove(tmp)


#: voxels per slab of the case-level maps (:func:`case_slabs`)
CASE_SLAB_VOXELS = 1 << 20


#: the pooled statistics with a class axis first
CLASS_AXIS = ("mean", "calibrated")


def case_slabs(stats: dict[str, torch.Tensor], spatial: tuple[int, ...]):
    """``(part, where)`` over slabs of about :data:`CASE_SLAB_VOXELS` voxels along the first spatial axis longer
    than 1 (2D cases are (1, H, W)): ``part`` the statistics of the slab (those of :data:`CLASS_AXIS` keep their
    class axis first),
    ``where`` its spatial index."""
    axis = next((i for i, n in enumerate(spatial) if n > 1), 0)
    step = max(1, CASE_SLAB_VOXELS // max(1, math.prod(spatial[axis + 1:])))
    for start in range(0, spatial[axis], step):
        where = (slice(None),) * axis + (slice(start, start + step),)
        yield {k: v[(slice(None), *where)] if k in CLASS_AXIS else v[where] for k, v in stats.items()}, where


class EnTrustPredictor(nnUNetPredictor):
    def __init__(self, *args, sampling: SamplingSettings = DEFAULT_SAMPLING, save_hypotheses: bool = False,
                 **kwargs):
        super().__init__(*args, **kwargs)
        self.sampling = sampling
        #: also predict every hypothesis as a mask (fold-major: all of fold 0's, then fold 1's, ...)
        self.save_hypotheses = save_hypotheses
        self.calib_heads: list[CalibHead] = []
        #: the training's modality dropout probability, read from the trainer class when a model folder loads
        self.modality_dropout = 0.0

    # --------------------------------------------------------------- initialisation
    def initialize_from_trained_model_folder(self, model_training_output_dir: str, use_folds,
                                             checkpoint_name: str = "checkpoint_final.pth"):
        """nnU-Net's initialisation, with checkpoints read by :func:`load_checkpoint` (weights only, our
        messages) and checked to fit the network before anything is predicted."""
        folder = Path(model_training_output_dir)
        for name in ("plans.json", "dataset.json"):
            if not (folder / name).exists():
                raise InputError(f"{folder}: no trained model here ({name} missing)")
        if use_folds is None:
            use_folds = self.auto_detect_available_folds(str(folder), checkpoint_name)
            if not use_folds:
                raise InputError(f"{folder}: no fold_*/{checkpoint_name} found")
        files = [folder / f"fold_{f}" / checkpoint_name for f in use_folds]
        checkpoints = [load_checkpoint(f) for f in files]
        dataset_json = json.loads((folder / "dataset.json").read_text())
        plans_manager = PlansManager(json.loads((folder / "plans.json").read_text()))
        first = checkpoints[0]
        configuration = first.get("init_args", {}).get("configuration")
        if configuration not in plans_manager.available_configurations:
            raise InputError(f"{files[0]}: trained for configuration {configuration!r}, which "
                             f"{folder / 'plans.json'} does not hold")
        configuration_manager = plans_manager.get_configuration(configuration)
        network = build_network(first["trainer_name"], plans_manager, configuration_manager, dataset_json, files[0])
        self.modality_dropout = float(getattr(find_trainer(first["trainer_name"], files[0]), "modality_dropout", 0.0))
        for ckpt, f in zip(checkpoints, files):
            check_weights_fit(network, ckpt["network_weights"], f, folder / "plans.json")
        self.calibrator = load_calibrator(folder)
        parameters = [with_conflict_reading(c["network_weights"], self.calibrator) for c in checkpoints]
        network.load_state_dict(parameters[0])
        self.manual_initialization(network, plans_manager, configuration_manager, parameters, dataset_json,
                                   first["trainer_name"], first.get("inference_allowed_mirroring_axes"))
        unfitted = [f for f, p in zip(files, parameters) if "calib.fitted" in p and not float(p["calib.fitted"])]
        if unfitted and self.calibrator is None:
            print(f"entrust: warning: {unfitted[0]}: CalibHead not fitted (training fits it at its end, into "
                  f"checkpoint_final.pth, when it has cases to fit it on); P(error) falls back to 1 - confidence and "
                  f"the class probabilities are not temperature-scaled", file=sys.stderr)
        no_map = [f for f, p in zip(files, parameters) if not float(p.get("crossmodal.fitted", 1.0))]
        if no_map:
            print(f"entrust: warning: {no_map[0]}: the cross-modal predictors are not fitted (training fits them at its "
                  f"end, into checkpoint_final.pth); the conflict map is 0 and no hypothesis reads it", file=sys.stderr)

    def manual_initialization(self, network, plans_manager, configuration_manager, parameters, dataset_json,
                              trainer_name, inference_allowed_mirroring_axes):
        super().manual_initialization(network, plans_manager, configuration_manager, parameters, dataset_json,
                                      trainer_name, inference_allowed_mirroring_axes)
        self._wrap_network()

    def _wrap_network(self) -> None:
        net = unwrap(self.network)
        if isinstance(net, TrustStatistics):
            net = net.net
        self.network = TrustStatistics(net, self.sampling, with_hypotheses=self.save_hypotheses,
                                       regions=self.label_manager.has_regions)
        self.calib_heads = []
        if isinstance(net, EnTrustUNet):
            for p in self.list_of_parameters or [net.state_dict()]:
                head = CalibHead(type(net.calib.net[0]), num_classes=net.num_classes)
                weights = {k[len("calib."):]: v for k, v in p.items() if k.startswith("calib.")}
                weights.setdefault("conflict_bias", head.conflict_bias)  # checkpoints from before the biases: none
                weights.setdefault("showing_reading", head.showing_reading)  # ... and before the choice: the vote
                head.load_state_dict(weights)
                self.calib_heads.append(head.eval())

    def probability_of_error(self, stats: dict[str, torch.Tensor]) -> torch.Tensor:
        """EnTrust: the calibrator of ``entrust calibrate`` (fitted on every fold's out-of-fold cases) when the
        model folder has one, else the folds' CalibHeads averaged; other methods: 1 - max of the pooled mean.
        EnTrust's is never below the expert alternatives' vote where the modalities conflict
        (:func:`~entrust_nnunet.model.alternatives.alternatives_error_floor`)."""
        if getattr(self, "calibrator", None) is not None:
            p = self.calibrator.probability_of_error(stats)
        elif not self.calib_heads:
            return 1 - stats["confidence"]
        else:
            p = torch.stack([head.predict_voxels(stats) for head in self.calib_heads]).mean(0)
        return torch.maximum(p.clamp(0, 1), gated_error_floor(stats["confidence"], stats["gate"]).to(p.device))

    def class_temperature(self) -> float:
        """T of the class probabilities written (``softmax(log mean / T)``): the one ``entrust calibrate`` fitted on
        every fold's out-of-fold voxels when the model folder has it, else the folds' CalibHead temperatures
        averaged (as their P(error) is); 1 for networks without CalibHead."""
        calibrator = getattr(self, "calibrator", None)
        if calibrator is not None and calibrator.class_temperature is not None:
            return calibrator.class_temperature
        if not self.calib_heads:
            return 1.0
        return float(torch.stack([head.temperature for head in self.calib_heads]).mean())

    def class_conflict_bias(self) -> torch.Tensor:
        """Biases b (C,) of the class probabilities where the modalities conflict (``log mean / T + g b``): the
        ones ``entrust calibrate`` fitted with its temperature when the model folder has them, else the folds'
        CalibHead biases averaged; none (size 0) for networks without CalibHead."""
        calibrator = getattr(self, "calibrator", None)
        if calibrator is not None and calibrator.class_temperature is not None:
            return torch.tensor(calibrator.class_conflict_bias or (), dtype=torch.float32)
        if not self.calib_heads:
            return torch.zeros(0)
        return torch.stack([head.conflict_bias.float().cpu() for head in self.calib_heads]).mean(0)

    def calibrated_probabilities(self, mean: torch.Tensor, gate: torch.Tensor) -> torch.Tensor:
        """The calibrated class probabilities (labels; C, *s) of the pooled ``mean``: ``softmax(log mean / T + g b)``
        (:meth:`class_temperature`, :meth:`class_conflict_bias`), ``gate`` g (*s) the expert alternatives' gate of the
        pooled conflict. Their argmax is the mask."""
        return torch.softmax(calibrated_log_probabilities(mean, self.class_temperature(), gate[None],
                                                          self.class_conflict_bias(), axis=0), 0)

    def class_probabilities(self, calibrated: torch.Tensor, p_error: torch.Tensor) -> torch.Tensor:
        """The class probabilities written (labels): the calibrated probabilities (:meth:`calibrated_probabilities`)
        with their top label's confidence set to ``1 - P(error)`` (:func:`top_label_calibrated`): the class
        calibration's few parameters cannot follow every voxel, CalibHead's P(error) does (docs/design.md "Class
        probabilities")."""
        if getattr(self, "calibrator", None) is None and not self.calib_heads:
            return calibrated  # other methods: their own probabilities (their P(error) is 1 - max of them)
        return top_label_calibrated(calibrated, p_error)

    # --------------------------------------------------------------- prediction
    def hypotheses_per_fold(self) -> int:
        """K for networks that sample hypotheses, else 1 (their one prediction)."""
        return self.sampling.num_hypotheses if getattr(self.network.net, "samples_hypotheses", False) else 1

    def predict_sliding_window_return_logits(self, input_image: torch.Tensor):
        # nnU-Net preallocates one accumulator channel per segmentation head; ours carry the pooled maps
        # (and, when asked, every hypothesis) too
        labels = self.label_manager
        extra = len(POOLED_MAPS) + (self.hypotheses_per_fold() * labels.num_segmentation_heads
                                    if self.network.with_hypotheses else 0)
        self.label_manager = SimpleNamespace(num_segmentation_heads=labels.num_segmentation_heads + extra)
        try:
            return super().predict_sliding_window_return_logits(input_image)
        finally:
            self.label_manager = labels

    def _pooled_over_folds(self, data: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor | None]:
        """nnU-Net's loop over folds (each fold's sliding window averages its patches and mirrorings), keeping per
        fold what the maps need: returns the pooled (C + maps, *s) averaged over folds, the aleatoric map of
        :func:`fold_aleatoric` and, with hypotheses, their labels (F*K, *s), fold-major (else None)."""
        c, regions = self.label_manager.num_segmentation_heads, self.label_manager.has_regions
        pooled, aleatoric, labels = None, None, []
        threads = torch.get_num_threads()
        torch.set_num_threads(min(default_num_processes, threads))  # as nnU-Net's own loop
        try:
            for params in self.list_of_parameters:
                self.network.load_state_dict(params)
                out = self.predict_sliding_window_return_logits(data).to("cpu").float()
                head = out[:c + len(POOLED_MAPS)]
                pooled = head if pooled is None else pooled + head
                part = fold_aleatoric(head[:c], head[c + POOLED_MAPS.index("model_spread")], regions)
                aleatoric = part if aleatoric is None else aleatoric + part
                if self.network.with_hypotheses:
                    hyps = out[c + len(POOLED_MAPS):].unflatten(0, (-1, c))
                    labels.append(torch.stack([self.segmentation(h) for h in hyps]).to(torch.uint8))
        finally:
            torch.set_num_threads(threads)
        n = len(self.list_of_parameters)
        return pooled / n, aleatoric / n, torch.cat(labels) if labels else None

    @property
    def masks_absent_modalities(self) -> bool:
        """EnTrust networks mask an absent modality's stream; any other network sees it zero-filled."""
        return isinstance(self.network.net, EnTrustUNet)

    @contextlib.contextmanager
    def modalities_present(self, present):
        """Predict with only the modalities flagged in ``present`` (M bools; None or all True: every one)."""
        self.network.modality_mask = None if present is None or all(present) else torch.tensor(present)
        try:
            yield
        finally:
            self.network.modality_mask = None

    @torch.inference_mode()
    def pooled_statistics(self, data: torch.Tensor) -> dict[str, torch.Tensor]:
        """Hypotheses pooled over patches, mirrorings and folds -> ``mean`` (C, *s) and CalibHead's inputs (*s);
        with ``save_hypotheses`` also ``hypotheses`` (F*K, *s): every hypothesis' labels, fold-major."""
        pooled, aleatoric, hypotheses = self._pooled_over_folds(data)
        c = self.label_manager.num_segmentation_heads
        regions = self.label_manager.has_regions
        mean = pooled_probabilities(pooled[:c], regions)
        maps = pooled_maps(pooled[c:])
        total = output_entropy(mean, 0, regions)
        conflict = maps["conflict"].clamp(0, 1)
        gate = alternatives_gate(conflict, getattr(self.network.net, "expert_alternatives", 0.0))
        # the mask's probabilities: calibrated (labels; regions keep their sigmoids); the other statistics, CalibHead's
        # features, stay those of the hypotheses' pooled mean
        calibrated = mean if regions else self.calibrated_probabilities(mean, gate)
        # CalibHead's aleatoric / epistemic inputs as it was fitted on them (pooled per-pass entropies, the rest of the
        # entropy); the exported maps as the issue defines them (docs/design.md, "Aleatoric and epistemic after pooling")
        return {**maps, "mean": mean, "calibrated": calibrated, "gate": gate,
                "confidence": decision_confidence(calibrated, regions, axis=0), "entropy": total,
                "epistemic": (total - maps["aleatoric"]).clamp_min(0), "conflict": conflict,
                "aleatoric_map": aleatoric, "epistemic_map": (total - aleatoric).clamp_min(0),
                **({"hypotheses": hypotheses} if hypotheses is not None else {})}

    @torch.inference_mode()
    def predict_case(self, data: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor | None]:
        """(C + 4, *s): the logs of the class probabilities written (labels: the calibrated ones of
        :meth:`class_probabilities`, whose top label carries 1 - P(error); regions: the pooled sigmoids' logits),
        then the maps of MAP_NAMES: P(error) (exported as ``total``, see :meth:`probability_of_error`),
        aleatoric, epistemic, conflict; and the hypotheses' labels (F*K, *s) with ``save_hypotheses`` (else None)."""
        stats = self.pooled_statistics(data)
        hypotheses = stats.pop("hypotheses", None)
        c, spatial = stats["mean"].shape[0], stats["entropy"].shape
        out = torch.empty((c + len(MAP_NAMES), *spatial), dtype=torch.float32)
        # per voxel, so slab by slab: CalibHead's 16-channel hidden layer over a whole BraTS-sized case is ~1 GB of
        # temporaries (not the peak of prediction, which is at a patch: docs/design.md "Whole case")
        for part, where in case_slabs(stats, spatial):
            p_error = self.probability_of_error(part)
            out[(slice(0, c), *where)] = (as_logits(part["mean"], True) if self.label_manager.has_regions
                                          else log_probabilities(self.class_probabilities(part["calibrated"], p_error)))
            out[(slice(c, None), *where)] = torch.stack([p_error, part["aleatoric_map"], part["epistemic_map"],
                                                         part["conflict"]])
        return out, hypotheses

    def segmentation(self, mean: torch.Tensor) -> torch.Tensor:
        """nnU-Net's mask of pooled probabilities (C, *s): argmax, or regions converted with
        ``regions_class_order``."""
        return torch.as_tensor(self.label_manager.convert_probabilities_to_segmentation(mean.float().cpu()))

    def predict_logits_from_preprocessed_data(self, data: torch.Tensor) -> torch.Tensor:
        """nnU-Net's entry point: :meth:`predict_case` without the hypotheses."""
        return self.predict_case(data)[0]

    def predict_cases(self, input_files: list[list[str]], output_truncated: list[str], save_probabilities: bool = False,
                      num_processes_preprocessing: int = 2, num_processes_export: int = 2,
                      modalities: list[dict] | None = None, previous_stage: list[str] | None = None) -> None:
        """Preprocess (nnU-Net's iterator; ``num_processes_preprocessing`` 0: in this process), predict with maps,
        export in a spawn pool (``num_processes_export``
        1: in this process, after each case: a spawned worker costs seconds of imports, more than a small case's
        export); progress bar per case. ``modalities``: per case a record whose ``mask`` (M bools) flags the
        modalities present (absent channels are masked); the rest of it (``present``: the names) is written beside
        the maps. ``previous_stage``: per case the previous stage's
        mask (a cascade stage; nnU-Net's preprocessor appends it one-hot, the network takes it as its prior)."""
        records = dict(zip(output_truncated, modalities or [None] * len(output_truncated)))
        iterator = self._internal_get_data_iterator_from_lists_of_filenames(
            input_files, previous_stage or [None] * len(input_files), output_truncated, num_processes_preprocessing)
        pool = None
        if num_processes_export > 1:
            with sigint_blocked_in_children():
                pool = multiprocessing.get_context("spawn").Pool(num_processes_export)
        ours = set(multiprocessing.active_children())
        # the pool's exit terminates the export workers
        with pool or contextlib.nullcontext(), workers_ended_first_on_signals(ours):
            try:
                pending = []
                for item in tqdm(workers_started(iter(iterator)), total=len(input_files), desc="predict",
                                 unit="case", disable=not self.allow_tqdm):
                    export = self._predicted(item, save_probabilities, records[item["ofile"]])
                    if pool is None:
                        export_prediction_with_maps(*export)
                    else:
                        pending.append(pool.apply_async(export_prediction_with_maps, export))
                for job in pending:
                    job.get()
            except BaseException:
                # any other error (signals: see workers.py): end nnU-Net's workers and their Manager while its
                # iterator still holds their shared objects; at exit the Manager would go first and the
                # workers would print EOFError tracebacks
                end_processes(set(multiprocessing.active_children()) - ours)
                raise

    def _internal_get_data_iterator_from_lists_of_filenames(self, input_list_of_lists, seg_from_prev_stage_files,
                                                            output_filenames_truncated, num_processes: int):
        """nnU-Net's iterator (background processes); ``num_processes`` 0: nnU-Net's :class:`PreprocessAdapter`
        iterated in this process (small cases: a spawned worker's imports cost more than it saves)."""
        if num_processes > 0:
            return super()._internal_get_data_iterator_from_lists_of_filenames(
                input_list_of_lists, seg_from_prev_stage_files, output_filenames_truncated, num_processes)
        return iter(PreprocessAdapter(input_list_of_lists, seg_from_prev_stage_files,
                                      self.configuration_manager.preprocessor_class(verbose=self.verbose_preprocessing),
                                      output_filenames_truncated, self.plans_manager, self.dataset_json,
                                      self.configuration_manager))

    def _predicted(self, item: dict, save_probabilities: bool, record: dict | None = None) -> tuple:
        """The arguments of :func:`export_prediction_with_maps` for one preprocessed case of nnU-Net's iterator,
        predicted with the modalities flagged in ``record["mask"]`` (all when None)."""
        data = item["data"]
        if isinstance(data, str):  # nnU-Net hands large cases over as a temporary .npy file
            path, data = data, torch.from_numpy(np.load(data))
            os.remove(path)
        with self.modalities_present(None if record is None else record.get("mask")):
            prediction, hypotheses = self.predict_case(data)
        record = None if record is None else {k: v for k, v in record.items() if k != "mask"}
        return (prediction.cpu().numpy(), item["data_properties"], self.configuration_manager, self.plans_manager,
                self.dataset_json, item["ofile"], save_probabilities, True,
                None if hypotheses is None else hypotheses.cpu().numpy(), record)
