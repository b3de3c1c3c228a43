"""``entrust predict``: every case of a folder through :class:`~entrust_nnunet.nnunet.predictor.EnTrustPredictor`.

Output per case: ``OUT/CASE<ending>`` (the mask, as ``nnUNetv2_predict`` writes it),
``OUT/uncertainty/CASE_{total,aleatoric,epistemic,conflict}<ending>`` with the input's geometry and
``OUT/uncertainty/CASE_modalities.json`` (which modalities were present).

A case whose channel file is absent, or whose modality ``--drop-modalities`` names, is predicted with that
modality masked (one warning line per case), if the model was trained with modality dropout.
"""
from __future__ import annotations

import json
import sys
from pathlib import Path

import torch

from entrust_nnunet.data.io import (HYPOTHESIS_FOLDER, MAP_FOLDER, InputError, check_same_geometry,
                                    check_writable_folder, read_header, read_image, writing_prediction_folder)
from entrust_nnunet.data.modalities import CaseModalities, case_modalities, files_to_read, parse_drop_modalities
from entrust_nnunet.model.sampling import DEFAULT_SAMPLING, SamplingSettings
from entrust_nnunet.nnunet.predictor import EnTrustPredictor


def collect_cases(input_dir: Path, file_ending: str, num_channels: int,
                  unread: frozenset[int] = frozenset()) -> dict[str, list[str | None]]:
    """Group ``CASE_XXXX<ending>`` files by case and check channel numbers and per-case geometry.

    A channel without its file is None (an absent modality: :func:`case_modalities` decides what to do). Channels
    in ``unread`` (``--drop-modalities``) keep their file name but are neither read nor checked: nothing reads them,
    and a user may drop a modality precisely because its file is broken."""
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
        extra = sorted(c for c in channels if c >= num_channels)
        if extra:
            raise InputError(f"{channels[extra[0]]}: case {case} has channel {extra[0]} but the model expects "
                             f"{num_channels} channels")
        # read_image, not just headers: ITK would silently read NaN/Inf voxels as 0 and truncated files as zeros
        read = sorted(c for c in channels if c not in unread)
        if not read:
            continue  # every file dropped: case_modalities names the case
        first = read_image(channels[read[0]])
        for c in read[1:]:
            check_same_geometry(first, channels[read[0]], read_image(channels[c]), channels[c],
                                f"channel {read[0]} of case {case}")
    return {case: [str(channels[c]) if c in channels else None for c in range(num_channels)]
            for case, channels in cases.items()}


def resolve_device(name: str) -> torch.device:
    """nnUNetv2_predict's ``-device`` (cuda, cpu, mps), except that ``cuda`` without a usable GPU falls back
    to the CPU with one printed line, so CPU users and the demo need no flag."""
    if name == "cuda" and not torch.cuda.is_available():
        print("entrust: CUDA is not available on this machine; predicting on the CPU")
        return torch.device("cpu")
    if name == "mps" and not torch.backends.mps.is_available():
        raise InputError("-device mps: MPS (Apple GPU) is not available on this machine")
    return torch.device(name)


def check_output_folder(output_dir: Path, input_dir: Path) -> None:
    """Refuse an output folder (or its ``uncertainty/``) we could not write into, before any work is done."""
    if output_dir.resolve() == input_dir.resolve():
        raise InputError(f"{output_dir}: output folder is the input folder; choose another so inputs stay untouched")
    for folder in (output_dir, output_dir / MAP_FOLDER):
        if folder.exists() and not folder.is_dir():
            raise InputError(f"{folder}: exists and is not a folder")
        if folder.exists() or folder == output_dir:
            check_writable_folder(folder)


def check_absence_supported(predictor: EnTrustPredictor, modalities: dict[str, CaseModalities], input_dir: Path,
                            file_ending: str, drop_flag: str | None) -> None:
    """Refuse absent modalities (one line naming the trainer) unless the model was trained with modality dropout."""
    absent = [m for m in modalities.values() if not m.complete]
    if not absent or predictor.modality_dropout > 0:
        return
    first = absent[0]
    trainer = f"the model was trained by {predictor.trainer_name} without modality dropout"
    advice = "give every channel or use a model trained with modality dropout (e.g. nnUNetTrainerEnTrustModDrop)"
    if first.missing:
        c = first.missing[0]
        raise InputError(f"{input_dir / f'{first.case}_{c:04d}{file_ending}'}: channel {c} ({first.names[c]}) of case "
                         f"{first.case} is missing and {trainer}; {advice}")
    raise InputError(f"--drop-modalities {drop_flag}: {trainer}; it cannot predict with absent modalities")


def previous_stage_files(modalities: dict[str, CaseModalities], cases: dict, folder, file_ending: str,
                         previous: str | None, model_folder: Path) -> list[str] | None:
    """The previous stage's mask of every case (``FOLDER/CASE<ending>``, as nnUNetv2_predict's
    ``-prev_stage_predictions``) for a cascade stage, else None; one line naming the file or the flag otherwise.
    Its geometry is checked against the case's first present channel (a dropped one is not read)."""
    if previous is None:
        if folder is not None:
            raise InputError(f"-prev_stage_predictions {folder}: {model_folder} is not a cascade stage; leave the "
                             f"flag out")
        return None
    if folder is None:
        raise InputError(f"{model_folder}: a cascade stage (after {previous}); give -prev_stage_predictions FOLDER "
                         f"with {previous}'s masks of these cases")
    files = {case: Path(folder).absolute() / f"{case}{file_ending}" for case in cases}
    for case, path in files.items():
        if not path.is_file():
            raise InputError(f"{path}: the previous stage's mask of case {case} is missing (-prev_stage_predictions)")
        channel = next(f for f, present in zip(cases[case], modalities[case].present) if present)
        check_same_geometry(read_header(channel), channel, read_header(path), path)  # headers only
    return [str(files[case]) for case in cases]


def predict_folder(input_dir, output_dir, model_folder, folds=None, checkpoint: str = "checkpoint_final.pth",
                   device: str = "cpu", sampling: SamplingSettings = DEFAULT_SAMPLING, step_size: float = 0.5,
                   disable_tta: bool = False, save_probabilities: bool = False, num_processes_preprocessing: int = 2,
                   num_processes_export: int = 2, save_hypotheses: bool = False, drop_modalities: str | None = None,
                   absent_without_dropout: bool = False, prev_stage_predictions=None) -> Path:
    """Predict every case of ``input_dir`` into ``output_dir`` (masks + ``uncertainty/`` maps; with
    ``save_hypotheses`` also ``hypotheses/CASE_hNN`` masks).

    ``drop_modalities`` ("T2,FLAIR", dataset.json's channel names) predicts as if those files were absent.
    Absent modalities need a model trained with modality dropout, unless ``absent_without_dropout`` (the
    benchmark's zero-filled nnU-Net baseline). A cascade stage (3d_cascade_fullres) takes the previous stage's
    masks from ``prev_stage_predictions`` (``CASE<ending>``), as ``nnUNetv2_predict -prev_stage_predictions``. Every check (output writable, inputs readable and finite,
    modalities, checkpoints loadable and fitting) runs before ``output_dir`` is created, so an input error
    leaves nothing behind.
    """
    input_dir, output_dir, model_folder = Path(input_dir).absolute(), Path(output_dir).absolute(), Path(model_folder)
    check_output_folder(output_dir, input_dir)
    if not (model_folder / "dataset.json").exists():
        raise InputError(f"{model_folder}: no trained model here (dataset.json missing)")
    dataset_json = json.loads((model_folder / "dataset.json").read_text())
    ending, channel_names = dataset_json["file_ending"], dataset_json["channel_names"]
    dropped = parse_drop_modalities(drop_modalities, channel_names)
    cases = collect_cases(input_dir, ending, len(channel_names), frozenset(dropped))
    modalities = case_modalities(cases, channel_names, dropped, drop_modalities)
    device = resolve_device(str(device))
    predictor = EnTrustPredictor(tile_step_size=step_size, use_gaussian=True, use_mirroring=not disable_tta,
                                 perform_everything_on_device=device.type == "cuda", device=device,
                                 allow_tqdm=False, sampling=sampling, save_hypotheses=save_hypotheses)
    predictor.initialize_from_trained_model_folder(str(model_folder), folds, checkpoint)
    previous = previous_stage_files(modalities, cases, prev_stage_predictions, ending,
                                    predictor.configuration_manager.previous_stage_name, model_folder)
    if not absent_without_dropout:
        check_absence_supported(predictor, modalities, input_dir, ending, drop_modalities)
    try:
        output_dir.mkdir(parents=True, exist_ok=True)
    except OSError as e:
        raise InputError(f"{output_dir}: cannot create output folder ({e.strerror})") from None
    with writing_prediction_folder(output_dir, (MAP_FOLDER, HYPOTHESIS_FOLDER), predictor.dataset_json,
                                   predictor.plans_manager.plans, "entrust predict"):
        for m in modalities.values():
            if not m.complete:
                print(m.warning("masked" if predictor.masks_absent_modalities else "zero-filled after normalisation"),
                      file=sys.stderr)
        predictor.predict_cases([files_to_read(cases[c], m.present) for c, m in modalities.items()],
                                [str(output_dir / c) for c in cases], save_probabilities,
                                num_processes_preprocessing, num_processes_export,
                                [{**m.record(), "mask": m.present} for m in modalities.values()], previous)
    return output_dir
