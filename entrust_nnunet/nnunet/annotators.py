"""Multi-annotator training: each training sample draws one annotator's label (ATFM's data-hierarchical
supervision), through nnU-Net's own preprocessing and dataset.

* raw: ``labelsTr_annotators/CASE_aN<ending>`` beside ``labelsTr/`` (``entrust phantoms --annotators``);
* preprocessed: ``<data identifier>/annotators/CASE_aN.b2nd``. :func:`preprocess_annotators` (run by
  ``entrust plan`` after nnU-Net's preprocessing) sends each annotator's label through the preprocessor the
  plans name, together with the case's images, so it gets exactly the transpose, crop to the images' non-zero
  region and resampling of ``CASE_seg.b2nd``. A sub-folder, because nnU-Net takes every ``*.b2nd`` in the data
  folder that does not end with ``_seg.b2nd`` for a case;
* training: :class:`AnnotatorDataset`, an ``nnUNetDatasetBlosc2`` whose ``load_case`` returns one annotator's
  seg, drawn with numpy's global generator as nnU-Net's data loader draws cases and patches (batchgenerators
  seeds it per worker). Cases without annotator files keep their labelsTr seg. The trainer uses it for the
  training split only: validation, CalibHead and the validation maps keep labelsTr.

Foreground oversampling still centres patches on labelsTr's class locations (the case's ``.pkl``); annotators
differ from it by a boundary voxel or a blob, which a patch around such a location still holds.
"""
from __future__ import annotations

import multiprocessing
import os
from copy import deepcopy
from pathlib import Path

import blosc2
import numpy as np
from batchgenerators.utilities.file_and_folder_operations import load_json
from nnunetv2.paths import nnUNet_preprocessed, nnUNet_raw
from nnunetv2.training.dataloading.nnunet_dataset import nnUNetDatasetBlosc2, comp_blosc2_params
from nnunetv2.utilities.dataset_name_id_conversion import maybe_convert_to_dataset_name
from nnunetv2.utilities.plans_handling.plans_handler import PlansManager
from nnunetv2.utilities.utils import get_filenames_of_train_images_and_targets

from entrust_nnunet.data.io import InputError, atomic_directory, check_same_geometry, numbered_files, read_header

#: raw annotator labels ``CASE_aN<ending>`` (as ``entrust phantoms --annotators`` writes them)
RAW_FOLDER = "labelsTr_annotators"
#: preprocessed annotator segs ``CASE_aN.b2nd``, inside nnU-Net's data folder of a configuration
PREPROCESSED_FOLDER = "annotators"


def annotator_segs(data_folder: str | os.PathLike, identifiers) -> dict[str, list[Path]]:
    """The preprocessed annotator segs of each of ``identifiers`` that has any, in annotator order."""
    folder = Path(data_folder) / PREPROCESSED_FOLDER
    found = {key: numbered_files(folder, key, "a", ".b2nd") for key in identifiers}
    return {key: files for key, files in found.items() if files}


class AnnotatorDataset(nnUNetDatasetBlosc2):
    """nnU-Net's blosc2 dataset; ``load_case`` returns a randomly drawn annotator's seg where the case has any."""

    def __init__(self, folder: str, identifiers: list[str] = None, folder_with_segs_from_previous_stage: str = None):
        super().__init__(folder, identifiers, folder_with_segs_from_previous_stage)
        self.annotator_files = annotator_segs(folder, self.identifiers)

    def load_case(self, identifier):
        data, seg, seg_prev, properties = super().load_case(identifier)
        files = self.annotator_files.get(identifier)
        if files:
            # numpy's global generator: nnU-Net's loader draws cases and patches from it too
            path = files[np.random.randint(len(files))]
            seg = blosc2.open(urlpath=str(path), mode="r", dparams={"nthreads": 1}, **self.mmap_kwargs)
        return data, seg, seg_prev, properties


def training_dataset(dataset, log=print):
    """``dataset`` (nnU-Net's training split) as an :class:`AnnotatorDataset` when its folder holds annotator
    segs for any of its cases; else ``dataset`` itself (nnU-Net's behaviour)."""
    if not isinstance(dataset, nnUNetDatasetBlosc2) or dataset.folder_with_segs_from_previous_stage is not None:
        return dataset  # cascades and the numpy format keep nnU-Net's labels
    found = annotator_segs(dataset.source_folder, dataset.identifiers)
    if not found:
        return dataset
    counts = sorted({len(v) for v in found.values()})
    log(f"multi-annotator training: each sample of {len(found)} of {len(dataset.identifiers)} training cases "
        f"draws one of {'/'.join(map(str, counts))} annotator labels ({Path(dataset.source_folder) / PREPROCESSED_FOLDER})")
    return AnnotatorDataset(dataset.source_folder, list(dataset.identifiers))


def annotator_label_values(label_manager) -> set[int]:
    """The values an annotator label may hold: dataset.json's labels, the ignore label included (nnU-Net's
    ``all_labels`` leaves it out; labelsTr may hold it, so may an annotator's label)."""
    return set(label_manager.all_labels) | ({label_manager.ignore_label} if label_manager.has_ignore_label else set())


def _read_checked(rw, path: Path, shape: tuple, labels: set[int], image: str, header) -> np.ndarray:
    """An annotator label, refused with one line when its shape, geometry (spacing, origin, direction against the
    case's first ``image``, whose ``header`` is :func:`read_header`'s) or label values do not fit: a flipped or
    shifted file would train misaligned."""
    seg, _ = rw.read_seg(str(path))
    if seg.shape[1:] != shape:
        raise InputError(f"{path}: annotator label has shape {seg.shape[1:]}, the case's images {shape}")
    check_same_geometry(header, image, read_header(path), path)
    bad = sorted(set(np.unique(seg).astype(int).tolist()) - labels)
    if bad:
        raise InputError(f"{path}: label value(s) {', '.join(map(str, bad))} not declared in dataset.json")
    return seg


def _preprocess_case(case: str, images: list[str], label_files: list[Path], out_dir: Path, plans: dict,
                     configuration: str, dataset_json: dict) -> None:
    """Every annotator label of one case through the plans' preprocessor (with the case's images, read once)."""
    plans_manager = PlansManager(plans)
    cm = plans_manager.get_configuration(configuration)
    preprocessor = cm.preprocessor_class(verbose=False)
    rw = plans_manager.image_reader_writer_class()
    data, properties = rw.read_images(images)
    labels = annotator_label_values(plans_manager.get_label_manager(dataset_json))
    header = read_header(images[0])  # once per case, for every annotator's label
    for k, path in enumerate(label_files):
        seg = _read_checked(rw, path, data.shape[1:], labels, images[0], header)
        _, seg, _ = preprocessor.run_case_npy(data, seg, deepcopy(properties), plans_manager, cm, dataset_json)
        seg = seg.astype(np.int16, copy=False)  # as nnU-Net's run_case_save stores segs
        blocks, chunks = comp_blosc2_params(seg.shape, tuple(cm.patch_size), seg.itemsize)
        nnUNetDatasetBlosc2.save_seg(seg, str(out_dir / f"{case}_a{k}"), chunks_seg=chunks, blocks_seg=blocks)


def preprocess_annotators(dataset_name_or_id, plans_identifier: str, configurations, num_processes: int = 2) -> int:
    """Write ``<data identifier>/annotators/CASE_aN.b2nd`` for every configuration; returns the number of cases
    with annotators (0, writing nothing, when the raw dataset has no ``labelsTr_annotators/``)."""
    name = maybe_convert_to_dataset_name(dataset_name_or_id)
    raw = Path(nnUNet_raw) / name
    if not (raw / RAW_FOLDER).is_dir():
        return 0
    dataset_json = load_json(str(raw / "dataset.json"))
    cases = get_filenames_of_train_images_and_targets(str(raw), dataset_json)
    files = {c: numbered_files(raw / RAW_FOLDER, c, "a", dataset_json["file_ending"]) for c in cases}
    files = {c: f for c, f in files.items() if f}
    plans = load_json(os.path.join(nnUNet_preprocessed, name, plans_identifier + ".json"))
    for configuration in configurations:
        if configuration not in plans["configurations"]:  # as nnU-Net's preprocess: a configuration these plans lack
            continue
        data_folder = Path(nnUNet_preprocessed) / name / PlansManager(plans).get_configuration(configuration).data_identifier
        with atomic_directory(data_folder / PREPROCESSED_FOLDER, overwrite=True) as tmp:
            jobs = [(c, cases[c]["images"], f, tmp, plans, configuration, dataset_json) for c, f in files.items()]
            if num_processes > 1 and len(jobs) > 1:
                with multiprocessing.get_context("spawn").Pool(min(num_processes, len(jobs))) as pool:
                    pool.starmap(_preprocess_case, jobs)
            else:
                for job in jobs:
                    _preprocess_case(*job)
    return len(files)
