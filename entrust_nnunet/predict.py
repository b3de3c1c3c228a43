"""``entrust predict``: every case of a folder through :class:`~entrust_nnunet.nnunet.predictor.EnTrustPredictor`.

Output per case: ``OUT/CASE<ending>`` (the mask, as ``nnUNetv2_predict`` writes it) and
``OUT/uncertainty/CASE_{total,aleatoric,epistemic,conflict}<ending>`` with the input's geometry.
"""
from __future__ import annotations

import json
from pathlib import Path

import torch

from entrust_nnunet.data.io import (MAP_FOLDER, InputError, atomic_file, check_same_geometry, check_writable_folder,
                                    folder_lock, read_image, remove_stale_temporaries)
from entrust_nnunet.model.sampling import DEFAULT_SAMPLING, SamplingSettings
from entrust_nnunet.nnunet.predictor import EnTrustPredictor


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
            check_same_geometry(first, channels[0], read_image(channels[c]), channels[c], f"channel 0 of case {case}")
    return {case: [str(channels[c]) for c in range(num_channels)] for case, channels in cases.items()}


def resolve_device(name: str) -> torch.device:
    """nnUNetv2_predict's ``-device`` (cuda, cpu, mps), except that ``cuda`` without a usable GPU falls back
    to the CPU with one printed line, so CPU users and the demo need no flag."""
    if name == "cuda" and not torch.cuda.is_available():
        print("entrust: CUDA is not available on this machine; predicting on the CPU")
        return torch.device("cpu")
    if name == "mps" and not torch.backends.mps.is_available():
        raise InputError("-device mps: MPS (Apple GPU) is not available on this machine")
    return torch.device(name)


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
                   device: str = "cpu", sampling: SamplingSettings = DEFAULT_SAMPLING, step_size: float = 0.5,
                   disable_tta: bool = False, save_probabilities: bool = False, num_processes_preprocessing: int = 2,
                   num_processes_export: int = 2, save_hypotheses: bool = False) -> Path:
    """Predict every case of ``input_dir`` into ``output_dir`` (masks + ``uncertainty/`` maps; with
    ``save_hypotheses`` also ``hypotheses/CASE_hNN`` masks).

    Every check (output writable, inputs readable and finite, checkpoints loadable and fitting) runs
    before ``output_dir`` is created, so an input error leaves nothing behind.
    """
    input_dir, output_dir, model_folder = Path(input_dir).absolute(), Path(output_dir).absolute(), Path(model_folder)
    check_output_folder(output_dir, input_dir)
    if not (model_folder / "dataset.json").exists():
        raise InputError(f"{model_folder}: no trained model here (dataset.json missing)")
    dataset_json = json.loads((model_folder / "dataset.json").read_text())
    cases = collect_cases(input_dir, dataset_json["file_ending"], len(dataset_json["channel_names"]))
    device = resolve_device(str(device))
    predictor = EnTrustPredictor(tile_step_size=step_size, use_gaussian=True, use_mirroring=not disable_tta,
                                 perform_everything_on_device=device.type == "cuda", device=device,
                                 allow_tqdm=False, sampling=sampling, save_hypotheses=save_hypotheses)
    predictor.initialize_from_trained_model_folder(str(model_folder), folds, checkpoint)
    previous = predictor.configuration_manager.previous_stage_name
    if previous is not None:  # its input includes the previous stage's segmentation, which this command does not take
        raise InputError(f"{model_folder}: a cascade stage (after {previous}); entrust predict takes no previous-stage "
                         f"segmentations yet: use nnUNetv2_predict ... -prev_stage_predictions FOLDER")
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
