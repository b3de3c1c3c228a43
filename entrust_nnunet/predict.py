"""Prediction with uncertainty maps: a subclass of nnU-Net's nnUNetPredictor.

nnU-Net's predictor is reused for everything it already does (preprocessing, sliding window with
Gaussian weighting, mirroring, fold averaging, resampling, crop/transpose back). Two hooks change:

* the network it runs is wrapped in :class:`TrustStatistics`, which returns per patch the
  quantities that pool by averaging: the hypotheses' mean class probabilities (C channels), their
  mean entropy (aleatoric), ProbeStep's map and the conflict map. nnU-Net's Gaussian-weighted
  sliding window, its mirroring and its average over folds therefore pool the hypotheses of all
  patches, mirrorings and folds exactly; :meth:`EnTrustPredictor.predict_logits_from_preprocessed_data`
  then derives from the pooled numbers ``total``/``epistemic`` (entropy of the pooled mean minus
  the pooled aleatoric part: with several folds it includes disagreement between folds) and the
  calibrated probability of error (the folds' CalibHeads averaged);
* export: the mask (and, with ``--save_probabilities``, the pooled class probabilities as
  ``.npz``/``.pkl``) is written by nnU-Net's own ``export_prediction_from_logits``; the maps are
  resampled by nnU-Net's own functions and written as float32 images with the mask's geometry into
  ``OUT/uncertainty/``. Everything goes to temporary names first and is renamed at the end, maps
  before the mask, so a mask on disk means its maps are complete.

Output per case: ``OUT/CASE<ending>`` and ``OUT/uncertainty/CASE_{total,aleatoric,epistemic,conflict}<ending>``.
"""
from __future__ import annotations

import contextlib
import multiprocessing
import os
import signal
import threading
from pathlib import Path
from types import SimpleNamespace

import numpy as np
import SimpleITK as sitk
import torch
from nnunetv2.inference.export_prediction import (convert_predicted_logits_to_segmentation_with_correct_shape,
                                                  export_prediction_from_logits)
from nnunetv2.inference.predict_from_raw_data import nnUNetPredictor
from nnunetv2.utilities.label_handling.label_handling import LabelManager
from acvl_utils.cropping_and_padding.bounding_boxes import insert_crop_into_image
from torch import nn
from tqdm import tqdm

from entrust_nnunet.io import (MAP_FOLDER, MAP_NAMES, InputError, atomic_file, check_writable_folder, folder_lock,
                               geometry_mismatch, map_path, read_image, remove_stale_temporaries,
                               sigterm_handler_of_this_process, temporary_path, write_image)
from entrust_nnunet.metrics import entropy
from entrust_nnunet.network import MIN_PROBABILITY, EnTrustUNet
from entrust_nnunet.trustmap import CalibHead


#: per-voxel statistics pooled beside the mean probabilities (by averaging, like nnU-Net pools logits)
POOLED_MAPS = ("aleatoric", "probe", "conflict", "head_confidence")


def uncertainty_statistics(net: nn.Module, x: torch.Tensor, num_samples: int, steps: int | None, seed: int = 0,
                           probe: bool = True) -> dict[str, torch.Tensor]:
    """Per-patch ``mean`` (B, C, *s) class probabilities and the maps of :data:`POOLED_MAPS` (B, *s).

    EnTrustUNet samples its SegDiff hypotheses; a network with ``sample_statistics`` (the baselines in
    ``entrust_nnunet.baselines``) gives its own; any other nnU-Net network is read as plain softmax
    (aleatoric = its entropy, no probe, no conflict). For networks without a deterministic head of
    their own, ``head_confidence`` is the max of ``mean``.
    """
    if isinstance(net, EnTrustUNet):
        s = net.sample(x, num_samples, steps or net.sampling_steps, seed=seed, probe=probe)
        return {k: s[k] for k in ("mean", *POOLED_MAPS)}
    if hasattr(net, "sample_statistics"):
        s = net.sample_statistics(x, num_samples=num_samples, seed=seed)
    else:
        mean = torch.softmax(net(x).float(), 1)
        s = {"mean": mean, "aleatoric": entropy(mean, axis=1)}
    zeros = torch.zeros_like(s["aleatoric"])
    return {"mean": s["mean"], "aleatoric": s["aleatoric"], "probe": zeros, "conflict": s.get("conflict", zeros),
            "head_confidence": s["mean"].amax(1)}


class TrustStatistics(nn.Module):
    """Wraps a network so that ``forward(x)`` returns (B, C + len(POOLED_MAPS), *s): mean probabilities, then
    the maps of :data:`POOLED_MAPS`.

    These all pool by averaging, so nnU-Net's sliding window, mirroring and fold average pool them
    exactly. ``load_state_dict`` goes to the wrapped network, so nnU-Net's per-fold loading works.
    """

    def __init__(self, network: nn.Module, num_samples: int, steps: int | None, seed: int = 0, probe: bool = True):
        super().__init__()
        self.net = network
        self.num_samples, self.steps, self.seed, self.probe = num_samples, steps, seed, probe

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        s = uncertainty_statistics(self.net, x, self.num_samples, self.steps, self.seed, self.probe)
        return torch.cat([s["mean"], *(s[k][:, None] for k in POOLED_MAPS)], 1)

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


def export_prediction_with_maps(prediction: np.ndarray, properties: dict, configuration_manager, plans_manager,
                                dataset_json: dict, output_file_truncated: str, save_probabilities: bool = False,
                                keep_mask: bool = True) -> None:
    """Write mask (+ probabilities) with nnU-Net's exporter and the maps beside it, all atomically.

    ``prediction`` is (C + 4, *s): log class probabilities, then total, aleatoric, epistemic, conflict.
    With ``keep_mask=False`` only the maps are kept (nnU-Net's validation has written the masks).
    """
    num_classes = prediction.shape[0] - len(MAP_NAMES)
    ending = dataset_json["file_ending"]
    out_dir, case = os.path.split(output_file_truncated)
    tmp_trunc = str(temporary_path(output_file_truncated))
    written = []
    try:
        export_prediction_from_logits(prediction[:num_classes], properties, configuration_manager, plans_manager,
                                      dataset_json, tmp_trunc, save_probabilities)
        written += [tmp_trunc + e for e in (ending, ".npz", ".pkl") if os.path.exists(tmp_trunc + e)]
        label_manager = _MapChannels({"background": 0, **{f"map{i}": i for i in range(1, len(MAP_NAMES))}}, None)
        _, maps = convert_predicted_logits_to_segmentation_with_correct_shape(
            prediction[num_classes:], plans_manager, configuration_manager, label_manager, properties,
            return_probabilities=True)
        reference = sitk.ReadImage(tmp_trunc + ending)  # the mask nnU-Net wrote: its geometry is the input's
        os.makedirs(os.path.join(out_dir, MAP_FOLDER), exist_ok=True)
        shape = sitk.GetArrayViewFromImage(reference).shape
        for name, values in zip(MAP_NAMES, maps):  # channel order of predict_logits_from_preprocessed_data
            image = sitk.GetImageFromArray(np.asarray(values, dtype=np.float32).reshape(shape))
            image.CopyInformation(reference)
            write_image(image, map_path(out_dir, case, name, ending))
        for tmp in written if keep_mask else []:  # the mask last: a mask on disk means its maps are complete
            os.replace(tmp, output_file_truncated + tmp[len(tmp_trunc):])
    finally:
        for tmp in written:
            if os.path.exists(tmp):
                os.remove(tmp)


def load_checkpoint(checkpoint: Path) -> dict:
    """An nnU-Net checkpoint, loaded with ``weights_only=True``: nothing in the file can run code.

    Every problem is one :class:`InputError` line naming the file.
    """
    import pickle
    import re
    import warnings
    import zipfile

    from torch.serialization import safe_globals

    # nnU-Net's checkpoints keep numpy scalars in their logging dict: allow exactly those
    core = getattr(np, "_core", None) or np.core  # numpy 2 renamed it (np.core warns)
    numpy_types = [np.dtype, core.multiarray.scalar, np.ndarray, core.multiarray._reconstruct,
                   type(np.dtype("float32")), type(np.dtype("float64")), type(np.dtype("int64"))]
    if not checkpoint.is_file():
        raise InputError(f"{checkpoint}: checkpoint not found")
    try:
        with safe_globals(numpy_types), warnings.catch_warnings():
            warnings.simplefilter("ignore")  # torch warns about pickle protocols of files it then refuses
            ckpt = torch.load(checkpoint, map_location="cpu", weights_only=True)
    except pickle.UnpicklingError as e:
        unsafe = re.search(r"GLOBAL ([\w.]+)|[Uu]nsupported class ([\w.]+)", str(e))
        if unsafe:
            raise InputError(f"{checkpoint}: refused: the file holds objects that would execute code when loaded "
                             f"({unsafe.group(1) or unsafe.group(2)}); only weights are loaded") from None
        raise InputError(f"{checkpoint}: truncated or corrupt checkpoint (not a torch file)") from None
    except (RuntimeError, OSError, EOFError, ValueError, zipfile.BadZipFile) as e:
        reason = str(e).strip().splitlines()[0].split(". ")[0][:120] if str(e).strip() else type(e).__name__
        raise InputError(f"{checkpoint}: truncated or corrupt checkpoint ({reason})") from None
    if not isinstance(ckpt, dict) or "network_weights" not in ckpt or "trainer_name" not in ckpt:
        raise InputError(f"{checkpoint}: not an nnU-Net checkpoint (no network_weights/trainer_name)")
    return ckpt


def check_weights_fit(network: nn.Module, weights: dict, checkpoint: Path, plans: Path) -> None:
    """Refuse weights that do not fit ``network`` (missing, unexpected or differently shaped tensors)."""
    expected = network.state_dict()

    def names(keys: list[str]) -> str:
        return ", ".join(keys[:3]) + (f" and {len(keys) - 3} more" if len(keys) > 3 else "")

    missing = [k for k in expected if k not in weights]
    unexpected = [k for k in weights if k not in expected]
    shaped = [k for k in expected
              if k in weights and tuple(getattr(weights[k], "shape", ())) != tuple(expected[k].shape)]
    problems = [f"{what} {names(keys)}" for what, keys in (("missing weight(s)", missing),
                ("unexpected weight(s)", unexpected), ("weight(s) of another shape", shaped)) if keys]
    if problems:
        raise InputError(f"{checkpoint}: does not fit the model described by {plans} ({'; '.join(problems)})")


def _build_network(trainer_name: str, plans_manager, configuration_manager, dataset_json: dict,
                   checkpoint: Path) -> nn.Module:
    """The network the checkpoint's trainer builds from these plans (nnU-Net's own builders)."""
    import inspect
    import warnings

    from nnunetv2.utilities.find_objects import recursive_find_trainer_class_by_name
    from nnunetv2.utilities.label_handling.label_handling import determine_num_input_channels

    try:
        with warnings.catch_warnings():  # nnU-Net imports every trainer module to find one; not the user's concern
            warnings.simplefilter("ignore", FutureWarning)
            trainer = recursive_find_trainer_class_by_name(trainer_name)
    except (RuntimeError, AssertionError):
        raise InputError(f"{checkpoint}: trained with {trainer_name}, which nnU-Net cannot find "
                         f"(is its folder on nnUNet_extTrainer?)") from None
    cm = configuration_manager
    n_in = determine_num_input_channels(plans_manager, cm, dataset_json)
    n_out = plans_manager.get_label_manager(dataset_json).num_segmentation_heads
    if "plans_manager" in inspect.signature(trainer.build_network_architecture).parameters:
        return trainer.build_network_architecture(plans_manager, cm, n_in, n_out, enable_deep_supervision=False)
    return trainer.build_network_architecture(cm.network_arch_class_name, cm.network_arch_init_kwargs,
                                              cm.network_arch_init_kwargs_req_import, n_in, n_out,
                                              enable_deep_supervision=False)


@contextlib.contextmanager
def sigint_blocked_in_children():
    """Processes started inside inherit a blocked SIGINT. Ctrl-C reaches the whole process group; this
    way only the main process sees it (one line, exit 130) and tears its workers down, instead of every
    worker printing a KeyboardInterrupt traceback. A Ctrl-C meanwhile waits until the block ends."""
    from multiprocessing import resource_tracker

    if threading.current_thread() is not threading.main_thread():
        yield
        return
    resource_tracker.ensure_running()  # starting it unblocks SIGINT in this thread: start it before blocking
    previous = signal.pthread_sigmask(signal.SIG_BLOCK, {signal.SIGINT})
    try:
        yield
    finally:
        signal.pthread_sigmask(signal.SIG_SETMASK, previous)


def _end_processes(processes) -> None:
    # daemonic workers first: a Manager ended before them would make them print EOFError tracebacks
    for group in ([p for p in processes if p.daemon], [p for p in processes if not p.daemon]):
        for p in group:
            p.terminate()
        for p in group:
            p.join(10)


@contextlib.contextmanager
def _workers_ended_first_on_signals(ours: set):
    """On Ctrl-C/SIGTERM, end the daemonic workers started inside (nnU-Net's preprocessing) before the
    exception unwinds nnU-Net's iterator: unwinding releases the Manager objects they use, and they
    would print tracebacks. Then the previous handler raises as usual."""
    if threading.current_thread() is not threading.main_thread():
        yield
        return
    previous = {s: signal.getsignal(s) for s in (signal.SIGINT, signal.SIGTERM)}

    @sigterm_handler_of_this_process
    def handler(signum, frame):
        _end_processes({p for p in multiprocessing.active_children() if p.daemon} - ours)
        if callable(previous[signum]):
            previous[signum](signum, frame)
        else:  # default or ignored: let the signal do what it did before
            signal.signal(signum, previous[signum])
            os.kill(os.getpid(), signum)

    for s in previous:
        signal.signal(s, handler)
    try:
        yield
    finally:
        for s, h in previous.items():
            signal.signal(s, h)


def _workers_started(iterator):
    """nnU-Net's preprocessing iterator starts its worker processes at the first ``next()``."""
    with sigint_blocked_in_children():
        first = next(iterator, None)
    if first is not None:
        yield first
        yield from iterator


class EnTrustPredictor(nnUNetPredictor):
    def __init__(self, *args, num_samples: int = 8, steps: int | None = None, seed: int = 0, probe: bool = True,
                 **kwargs):
        super().__init__(*args, **kwargs)
        self.num_samples, self.steps, self.seed, self.probe = num_samples, steps, seed, probe
        self.calib_heads: list[CalibHead] = []

    # --------------------------------------------------------------- initialisation
    def initialize_from_trained_model_folder(self, model_training_output_dir: str, use_folds,
                                             checkpoint_name: str = "checkpoint_final.pth"):
        """nnU-Net's initialisation, with checkpoints read by :func:`load_checkpoint` (weights only, our
        messages) and checked to fit the network before anything is predicted."""
        import json

        from nnunetv2.utilities.plans_handling.plans_handler import PlansManager

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
        network = _build_network(first["trainer_name"], plans_manager, configuration_manager, dataset_json, files[0])
        for ckpt, f in zip(checkpoints, files):
            check_weights_fit(network, ckpt["network_weights"], f, folder / "plans.json")
        parameters = [c["network_weights"] for c in checkpoints]
        network.load_state_dict(parameters[0])
        self.manual_initialization(network, plans_manager, configuration_manager, parameters, dataset_json,
                                   first["trainer_name"], first.get("inference_allowed_mirroring_axes"))

    def manual_initialization(self, network, plans_manager, configuration_manager, parameters, dataset_json,
                              trainer_name, inference_allowed_mirroring_axes):
        super().manual_initialization(network, plans_manager, configuration_manager, parameters, dataset_json,
                                      trainer_name, inference_allowed_mirroring_axes)
        self._wrap_network()

    def _wrap_network(self) -> None:
        from entrust_nnunet.training import unwrap

        net = unwrap(self.network)
        if isinstance(net, TrustStatistics):
            net = net.net
        self.network = TrustStatistics(net, self.num_samples, self.steps, self.seed, self.probe)
        self.calib_heads = []
        if isinstance(net, EnTrustUNet):
            for p in self.list_of_parameters or [net.state_dict()]:
                head = CalibHead(type(net.calib.net[0]))
                head.load_state_dict({k[len("calib."):]: v for k, v in p.items() if k.startswith("calib.")})
                self.calib_heads.append(head.eval())

    def probability_of_error(self, stats: dict[str, torch.Tensor]) -> torch.Tensor:
        """EnTrust: the folds' CalibHeads averaged; other methods: 1 - max of the pooled mean."""
        if not self.calib_heads:
            return 1 - stats["confidence"]
        return torch.stack([head.predict_voxels(stats) for head in self.calib_heads]).mean(0).clamp(0, 1)

    # --------------------------------------------------------------- prediction
    def predict_sliding_window_return_logits(self, input_image: torch.Tensor):
        # nnU-Net preallocates one accumulator channel per segmentation head; ours carry the pooled maps too
        labels = self.label_manager
        self.label_manager = SimpleNamespace(num_segmentation_heads=labels.num_segmentation_heads + len(POOLED_MAPS))
        try:
            return super().predict_sliding_window_return_logits(input_image)
        finally:
            self.label_manager = labels

    @torch.inference_mode()
    def pooled_statistics(self, data: torch.Tensor) -> dict[str, torch.Tensor]:
        """Hypotheses pooled over patches, mirrorings and folds -> ``mean`` (C, *s) and CalibHead's inputs (*s)."""
        pooled = super().predict_logits_from_preprocessed_data(data).float()
        c = self.label_manager.num_segmentation_heads
        mean = pooled[:c].clamp_min(0)
        mean = mean / mean.sum(0, keepdim=True).clamp_min(1e-8)
        maps = dict(zip(POOLED_MAPS, pooled[c:]))
        total = entropy(mean, axis=0)
        return {**maps, "mean": mean, "confidence": mean.amax(0), "total": total,
                "epistemic": (total - maps["aleatoric"]).clamp_min(0), "conflict": maps["conflict"].clamp(0, 1)}

    @torch.inference_mode()
    def predict_logits_from_preprocessed_data(self, data: torch.Tensor) -> torch.Tensor:
        """(C + 4, *s): log pooled class probabilities, then total (P(error), see :meth:`probability_of_error`),
        aleatoric, epistemic, conflict."""
        stats = self.pooled_statistics(data)
        error = self.probability_of_error(stats)
        return torch.cat([stats["mean"].clamp_min(MIN_PROBABILITY).log(),
                          torch.stack([error, stats["aleatoric"], stats["epistemic"], stats["conflict"]])])

    def predict_cases(self, input_files: list[list[str]], output_truncated: list[str], save_probabilities: bool = False,
                      num_processes_preprocessing: int = 2, num_processes_export: int = 2) -> None:
        """Preprocess (nnU-Net's iterator), predict with maps, export in a spawn pool; progress bar per case."""
        iterator = self._internal_get_data_iterator_from_lists_of_filenames(
            input_files, [None] * len(input_files), output_truncated, num_processes_preprocessing)
        with sigint_blocked_in_children():
            pool = multiprocessing.get_context("spawn").Pool(num_processes_export)
        ours = set(multiprocessing.active_children())
        with pool, _workers_ended_first_on_signals(ours):  # the pool's exit terminates the export workers
            try:
                pending = []
                for item in tqdm(_workers_started(iter(iterator)), total=len(input_files), desc="predict",
                                 unit="case", disable=not self.allow_tqdm):
                    data = item["data"]
                    if isinstance(data, str):  # nnU-Net hands large cases over as a temporary .npy file
                        path, data = data, torch.from_numpy(np.load(data))
                        os.remove(path)
                    prediction = self.predict_logits_from_preprocessed_data(data).cpu().numpy()
                    pending.append(pool.apply_async(export_prediction_with_maps, (
                        prediction, item["data_properties"], self.configuration_manager, self.plans_manager,
                        self.dataset_json, item["ofile"], save_probabilities)))
                for job in pending:
                    job.get()
            except BaseException:
                # any other error (signals: see above): end nnU-Net's workers and their Manager while its
                # iterator still holds their shared objects; at exit the Manager would go first and the
                # workers would print EOFError tracebacks
                _end_processes(set(multiprocessing.active_children()) - ours)
                raise


# ------------------------------------------------------------------------------ folder-level driver
def collect_cases(input_dir: Path, file_ending: str, num_channels: int) -> dict[str, list[str]]:
    """Group ``CASE_XXXX<ending>`` files by case and check channel count and per-case geometry."""
    if not input_dir.is_dir():
        raise InputError(f"{input_dir}: input folder does not exist")
    cases: dict[str, dict[int, Path]] = {}
    for f in sorted(input_dir.iterdir()):
        name = f.name
        if not name.endswith(file_ending) or f.is_dir():
            continue
        stem = name[: -len(file_ending)]
        if len(stem) < 6 or stem[-5] != "_" or not stem[-4:].isdigit():
            raise InputError(f"{f}: file name must be CASE_XXXX{file_ending} (XXXX = channel index)")
        cases.setdefault(stem[:-5], {})[int(stem[-4:])] = f
    if not cases:
        raise InputError(f"{input_dir}: no images ending with {file_ending}")
    for case, channels in cases.items():
        missing = [c for c in range(num_channels) if c not in channels]
        if missing:
            raise InputError(f"{input_dir / f'{case}_{missing[0]:04d}{file_ending}'}: channel {missing[0]} of case "
                             f"{case} is missing (the model expects {num_channels} channels)")
        extra = sorted(c for c in channels if c >= num_channels)
        if extra:
            raise InputError(f"{channels[extra[0]]}: case {case} has channel {extra[0]} but the model expects "
                             f"{num_channels} channels")
        # read_image, not just headers: ITK would silently read NaN/Inf voxels as 0 and truncated files as zeros
        first = read_image(channels[0])
        for c in range(1, num_channels):
            if problem := geometry_mismatch(first, read_image(channels[c])):
                raise InputError(f"{channels[c]}: geometry differs from channel 0 of case {case} ({problem})")
    return {case: [str(channels[c]) for c in range(num_channels)] for case, channels in cases.items()}


#: taken in OUT while ``entrust predict`` writes there, so that two runs cannot interleave their files
LOCK_NAME = ".entrust-predict.lock"


def check_output_folder(output_dir: Path, input_dir: Path) -> None:
    """Refuse an output folder (or its ``uncertainty/``) we could not write into, before any work is done."""
    if output_dir.resolve() == input_dir.resolve():
        raise InputError(f"{output_dir}: output folder is the input folder; choose another so inputs stay untouched")
    for folder in (output_dir, output_dir / MAP_FOLDER):
        if folder.exists() and not folder.is_dir():
            raise InputError(f"{folder}: exists and is not a folder")
        if folder.exists() or folder == output_dir:
            check_writable_folder(folder)


def predict_folder(input_dir, output_dir, model_folder, folds=None, checkpoint: str = "checkpoint_final.pth",
                   device: str = "cpu", num_samples: int = 8, steps: int | None = None, seed: int = 0,
                   step_size: float = 0.5, disable_tta: bool = False, save_probabilities: bool = False,
                   num_processes_preprocessing: int = 2, num_processes_export: int = 2, probe: bool = True) -> Path:
    """Predict every case of ``input_dir`` into ``output_dir`` (masks + ``uncertainty/`` maps).

    Every check (output writable, inputs readable and finite, checkpoints loadable and fitting) runs
    before ``output_dir`` is created, so an input error leaves nothing behind.
    """
    import json

    input_dir, output_dir, model_folder = Path(input_dir).absolute(), Path(output_dir).absolute(), Path(model_folder)
    check_output_folder(output_dir, input_dir)
    if not (model_folder / "dataset.json").exists():
        raise InputError(f"{model_folder}: no trained model here (dataset.json missing)")
    dataset_json = json.loads((model_folder / "dataset.json").read_text())
    cases = collect_cases(input_dir, dataset_json["file_ending"], len(dataset_json["channel_names"]))

    predictor = EnTrustPredictor(tile_step_size=step_size, use_gaussian=True, use_mirroring=not disable_tta,
                                 perform_everything_on_device=device == "cuda", device=torch.device(device),
                                 allow_tqdm=False, num_samples=num_samples, steps=steps, seed=seed, probe=probe)
    predictor.initialize_from_trained_model_folder(str(model_folder), folds, checkpoint)
    try:
        output_dir.mkdir(parents=True, exist_ok=True)
    except OSError as e:
        raise InputError(f"{output_dir}: cannot create output folder ({e.strerror})") from None
    with folder_lock(output_dir, LOCK_NAME, "entrust predict"):
        try:
            remove_stale_temporaries(output_dir, output_dir / MAP_FOLDER)  # left by a killed run
            for name, content in (("dataset.json", predictor.dataset_json),
                                  ("plans.json", predictor.plans_manager.plans)):
                with atomic_file(output_dir / name) as f:
                    json.dump(content, f, indent=2)
            predictor.predict_cases(list(cases.values()), [str(output_dir / c) for c in cases], save_probabilities,
                                    num_processes_preprocessing, num_processes_export)
        finally:  # export workers ended by Ctrl-C/SIGTERM cannot remove their own temporaries
            remove_stale_temporaries(output_dir, output_dir / MAP_FOLDER)
    return output_dir
