"""Convert BraTS, per-case folders and MSD tasks into nnU-Net v2 raw datasets.

``convert_brats``
    One folder per case. BraTS 2020/2021 names ``CASE/CASE_t1.nii.gz``, ``_t1ce``, ``_t2``, ``_flair``,
    ``_seg`` or BraTS 2023 names ``CASE/CASE-t1n.nii.gz``, ``-t1c``, ``-t2w``, ``-t2f``, ``-seg`` (one
    layout per dataset). Channels are written in the fixed order 0=T1, 1=T1ce, 2=T2, 3=FLAIR. Labels are
    remapped as nnU-Net's own BraTS converters do: 0 background, 1 edema, 2 necrosis (NCR), 3 enhancing
    tumor (ET); dataset.json declares the BraTS regions whole tumor (1, 2, 3), tumor core (2, 3) and
    enhancing tumor (3) with ``regions_class_order`` (1, 2, 3).

``convert_folder``
    One folder per case holding one image per modality named after it (``T1.nii.gz``, ``t2.nrrd``,
    ... case-insensitive; or a sub-folder ``T1/`` holding a DICOM series) and a label image
    (``label.*``). Labels must be consecutive integers from 0 over the whole dataset.

``convert_msd``
    A Medical Segmentation Decathlon task, converted by nnU-Net's ``convert_msd_dataset`` after our
    own checks, into a temporary folder that is renamed at the end.

Cases without a label go to ``imagesTs``. Every channel and the label of a case must share the
geometry of the case's first channel. Any problem raises :class:`~entrust_nnunet.data.io.InputError`
naming the file; the dataset is built in a temporary folder, so a failure leaves nothing behind,
and the source is only ever read.
"""
from __future__ import annotations

import contextlib
import json
import os
import re
import shutil
from dataclasses import dataclass
from pathlib import Path
from typing import Callable, Sequence

import numpy as np
import SimpleITK as sitk
from tqdm import tqdm

from entrust_nnunet.data.io import (InputError, atomic_directory, case_files, first_error_line, sitk_error_reason,
                               claim_dataset_folder, check_same_geometry, copy_geometry, dataset_prefix, raw_root_from_env,
                               read_header, read_image)

FILE_ENDING = ".nii.gz"

#: extensions recognised as images (longest first where one is the suffix of another)
IMAGE_EXTENSIONS = (".nii.gz", ".nii", ".nrrd", ".nhdr", ".mha", ".mhd", ".hdr", ".png", ".tiff", ".tif",
                    ".jpeg", ".jpg", ".bmp", ".dcm", ".gipl.gz", ".gipl", ".vtk")
#: voxel-data files that belong to a header file of the same name (``T1.mhd`` + ``T1.raw``)
COMPANION_EXTENSIONS = {".raw": (".mhd", ".nhdr"), ".zraw": (".mhd",), ".raw.gz": (".mhd", ".nhdr"),
                        ".img": (".hdr",), ".img.gz": (".hdr",)}

BRATS_CHANNELS = ("T1", "T1ce", "T2", "FLAIR")
#: nnU-Net's BraTS region declaration (Dataset137_BraTS21): 1 edema, 2 NCR, 3 ET after remapping
BRATS_LABELS = {"background": 0, "whole tumor": (1, 2, 3), "tumor core": (2, 3), "enhancing tumor": 3}
BRATS_REGIONS_CLASS_ORDER = (1, 2, 3)


@dataclass(frozen=True)
class BratsLayout:
    name: str
    sep: str  # between the case name and the modality key
    keys: tuple[str, ...]  # modality keys in output channel order T1, T1ce, T2, FLAIR
    seg: str
    label_map: dict[int, int]  # source BraTS value -> nnU-Net value

    def channel_names(self, case: str) -> list[str]:
        return [f"{case}{self.sep}{k}" for k in self.keys]

    def seg_name(self, case: str) -> str:
        return f"{case}{self.sep}{self.seg}"


BRATS_LAYOUTS = (
    # 1 NCR/NET, 2 edema, 4 enhancing  ->  1 edema, 2 NCR, 3 ET
    BratsLayout("BraTS 2020/2021", "_", ("t1", "t1ce", "t2", "flair"), "seg", {0: 0, 2: 1, 1: 2, 4: 3}),
    # 1 NCR, 2 edema (SNFH), 3 ET  ->  1 edema, 2 NCR, 3 ET
    BratsLayout("BraTS 2023", "-", ("t1n", "t1c", "t2w", "t2f"), "seg", {0: 0, 2: 1, 1: 2, 3: 3}),
)


@dataclass
class SourceCase:
    name: str
    folder: Path
    images: list[Path]  # in channel order
    label: Path | None


#: turns a read label image into the image to write and the (output) label values it holds
Relabel = Callable[[sitk.Image, Path], tuple[sitk.Image, set[int]]]


# ----------------------------------------------------------------------------------------------
# public API


def convert_brats(src: str | os.PathLike, dataset_id: int, raw_root: str | None = None, name: str = "BraTS",
                  overwrite: bool = False) -> Path:
    """BraTS 2020/2021 or 2023 case folders -> ``raw_root/DatasetXXX_name`` (see the module docstring)."""
    src = _source_root(src)
    folders = _case_folders(src)
    layout = _brats_layout(folders)
    cases = [_match_case(f, layout.channel_names(f.name), layout.seg_name(f.name)) for f in folders]
    target = _claim_target(src, raw_root, dataset_id, name, overwrite)

    def describe(found: dict[Path, set[int]]) -> dict:
        return dict(labels=dict(BRATS_LABELS), regions_class_order=BRATS_REGIONS_CLASS_ORDER,
                    dataset_name=target.name, description=f"{layout.name} converted by entrust convert brats",
                    license="see the BraTS challenge terms of use", reference="https://www.synapse.org/brats",
                    entrust={"converter": "brats", "source_layout": layout.name,
                             "label_mapping": {str(k): v for k, v in layout.label_map.items()}})

    return _write_dataset(target, overwrite, cases, BRATS_CHANNELS, _brats_relabel(layout), describe)


def convert_folder(src: str | os.PathLike, dataset_id: int, modalities: Sequence[str], raw_root: str | None = None,
                   name: str = "Custom", label_name: str = "label", overwrite: bool = False) -> Path:
    """Per-case folders (one image or DICOM series folder per modality + a label) -> nnU-Net raw."""
    modalities = _check_modality_names(modalities, label_name)
    src = _source_root(src)
    cases = [_match_case(f, modalities, label_name) for f in _case_folders(src)]
    target = _claim_target(src, raw_root, dataset_id, name, overwrite)

    def describe(found: dict[Path, set[int]]) -> dict:
        top = _check_consecutive(found)
        labels = {"background": 0, **{f"label_{v}": v for v in range(1, top + 1)}}
        return dict(labels=labels, dataset_name=target.name,
                    description=f"converted by entrust convert folder from {len(cases)} case folders",
                    entrust={"converter": "folder", "modalities": list(modalities), "label_name": label_name})

    return _write_dataset(target, overwrite, cases, modalities, _plain_relabel, describe)


def convert_msd(src: str | os.PathLike, dataset_id: int | None = None, overwrite: bool = False,
                num_processes: int = 2) -> Path:
    """A Medical Segmentation Decathlon task folder -> ``$nnUNet_raw/DatasetXXX_Name`` via nnU-Net's converter.

    ``dataset_id`` defaults to the task number. nnU-Net writes into a temporary folder that is renamed
    into place at the end (its own id check is replaced by ours, which honours ``overwrite``).
    """
    from nnunetv2.dataset_conversion import convert_MSD_dataset as msd

    if num_processes < 1:
        raise InputError(f"-np {num_processes}: need at least one process")
    src = _source_root(src)
    task_id, task_name = _check_msd_task(src)
    target_id = task_id if dataset_id is None else dataset_id
    target = _claim_target(src, raw_root_from_env(), target_id, task_name, overwrite)
    with atomic_directory(target, overwrite=overwrite) as tmp:
        stage = tmp / ".nnunet-raw"
        stage.mkdir()
        # nnU-Net writes to $nnUNet_raw/<name> and refuses ids it finds under its three roots (our own
        # check above already honoured --overwrite): point all three at empty staging folders, for this call
        with _nnunet_roots(stage):
            try:
                msd.convert_msd_dataset(str(src), overwrite_target_id=target_id, num_processes=num_processes)
            except (AssertionError, RuntimeError, OSError, KeyError, ValueError) as e:
                reason = sitk_error_reason(e) if isinstance(e, RuntimeError) else first_error_line(e)
                raise InputError(f"{src}: nnU-Net's MSD conversion failed ({reason})") from None
        for child in (stage / target.name).iterdir():
            os.replace(child, tmp / child.name)
        shutil.rmtree(stage)
        for n in ("nnUNet_preprocessed", "nnUNet_results"):
            shutil.rmtree(tmp / f".{n}", ignore_errors=True)
    return target


@contextlib.contextmanager
def _nnunet_roots(stage: Path):
    """nnU-Net reads its roots from the environment on every access (nnunetv2.paths): redirect them."""
    names = ("nnUNet_raw", "nnUNet_preprocessed", "nnUNet_results")
    saved = {n: os.environ.get(n) for n in names}
    try:
        for n in names:
            folder = stage if n == "nnUNet_raw" else stage.parent / f".{n}"
            folder.mkdir(exist_ok=True)
            os.environ[n] = str(folder)
        yield
    finally:
        for n, v in saved.items():
            if v is None:
                os.environ.pop(n, None)
            else:
                os.environ[n] = v


# ----------------------------------------------------------------------------------------------
# source discovery


def _source_root(src: str | os.PathLike) -> Path:
    src = Path(src).absolute()
    if not src.exists():
        raise InputError(f"{src}: source folder does not exist")
    if not src.is_dir():
        raise InputError(f"{src}: source is not a folder")
    return src


def _visible(folder: Path) -> list[Path]:
    try:
        return sorted(p for p in folder.iterdir() if not p.name.startswith("."))
    except OSError as e:
        raise InputError(f"{folder}: cannot list folder ({e.strerror})") from None


def _case_folders(src: Path) -> list[Path]:
    folders = [p for p in _visible(src) if p.is_dir()]
    if not folders:
        raise InputError(f"{src}: no case folders found (expected one sub-folder per case)")
    return folders


def _split_extension(filename: str, extensions: Sequence[str] = IMAGE_EXTENSIONS) -> tuple[str, str]:
    lower = filename.lower()
    for ext in sorted(extensions, key=len, reverse=True):
        if lower.endswith(ext) and len(filename) > len(ext):
            return filename[:-len(ext)], filename[-len(ext):]
    return filename, ""


def _is_companion(path: Path) -> bool:
    """``T1.raw`` next to ``T1.mhd`` and the like: voxel data of a header file, not an image of its own."""
    stem, ext = _split_extension(path.name, tuple(COMPANION_EXTENSIONS))
    return bool(ext) and any((path.parent / (stem + h)).exists() or (path.parent / (stem + h.upper())).exists()
                             for h in COMPANION_EXTENSIONS[ext.lower()])


def _entry_stem(path: Path) -> str | None:
    """The name an entry is matched by: a folder's name or a file's name without its image extension
    (``None`` for a file that is no image)."""
    if path.is_dir():
        return path.name
    stem, ext = _split_extension(path.name)
    return stem if ext else None


def _match_case(folder: Path, channels: Sequence[str], label: str) -> SourceCase:
    """Find one entry per channel name and at most one label entry (case-insensitive) in ``folder``."""
    wanted = {n.casefold() for n in channels} | {label.casefold()}
    found: dict[str, Path] = {}
    extra = []
    for entry in _visible(folder):
        if not entry.is_dir() and _is_companion(entry):
            continue
        stem = _entry_stem(entry)
        key = stem.casefold() if stem is not None else None
        if key in wanted and key not in found:
            found[key] = entry
        else:
            extra.append(entry.name + (f" (second file for {stem})" if key in found else ""))
    missing = [n for n in channels if n.casefold() not in found]
    problems = []
    if missing:
        problems.append("missing modality file(s) " + ", ".join(f"{n}.*" for n in missing))
    if extra:
        problems.append("extra file(s) " + ", ".join(extra))
    if problems:
        raise InputError(f"{folder}: " + "; ".join(problems)
                         + f" (expected {', '.join(channels)} and optionally {label})")
    return SourceCase(folder.name, folder, [found[n.casefold()] for n in channels], found.get(label.casefold()))


def _brats_layout_of(folder: Path) -> BratsLayout:
    stems = {s.casefold() for s in map(_entry_stem, _visible(folder)) if s is not None}
    hits = [lay for lay in BRATS_LAYOUTS
            if any(n.casefold() in stems for n in lay.channel_names(folder.name) + [lay.seg_name(folder.name)])]
    if not hits:
        examples = " or ".join(f"{lay.channel_names(folder.name)[0]}{FILE_ENDING}" for lay in BRATS_LAYOUTS)
        raise InputError(f"{folder}: no BraTS files found (expected names like {examples})")
    if len(hits) > 1:
        raise InputError(f"{folder}: mixes {' and '.join(h.name for h in hits)} file names")
    return hits[0]


def _brats_layout(folders: Sequence[Path]) -> BratsLayout:
    """The one BraTS naming scheme of the dataset; a case using another one is named in the error."""
    layouts = [_brats_layout_of(f) for f in folders]
    majority = max(BRATS_LAYOUTS, key=layouts.count)
    for folder, layout in zip(folders, layouts, strict=True):
        if layout is not majority:
            other = folders[layouts.index(majority)]
            raise InputError(f"{folder}: uses {layout.name} file names but {other.name} and "
                             f"{layouts.count(majority) - 1} more case(s) use {majority.name}; one layout per dataset")
    return majority


def _check_modality_names(modalities: Sequence[str], label_name: str) -> list[str]:
    names = [m.strip() for m in modalities]
    if not names or any(not n for n in names):
        raise InputError(f"--modalities {','.join(modalities)}: need one non-empty name per channel")
    folded = [n.casefold() for n in names]
    dup = sorted({n for n in names if folded.count(n.casefold()) > 1})
    if dup:
        raise InputError(f"--modalities {','.join(names)}: duplicate name(s) {', '.join(dup)}")
    if not label_name.strip() or label_name.casefold() in folded:
        raise InputError(f"--label {label_name}: must be non-empty and differ from every modality name")
    return names


def _check_msd_task(src: Path) -> tuple[int, str]:
    """Check that ``src`` is what nnU-Net's MSD converter expects; return (task number, name)."""
    m = re.fullmatch(r"Task(\d+)_([^_]+)", src.name)
    if not m:
        raise InputError(f"{src}: not an MSD task folder name (expected TaskNN_Name, e.g. Task05_Prostate)")
    for sub in ("imagesTr", "labelsTr", "imagesTs"):
        if not (src / sub).is_dir():
            raise InputError(f"{src / sub}: missing; an MSD task holds dataset.json, imagesTr, labelsTr and imagesTs")
    meta = src / "dataset.json"
    try:
        info = json.loads(meta.read_text())
    except FileNotFoundError:
        raise InputError(f"{meta}: missing; an MSD task holds dataset.json, imagesTr, labelsTr and imagesTs") from None
    except (OSError, ValueError) as e:
        raise InputError(f"{meta}: unreadable JSON ({first_error_line(e)})") from None
    missing = [k for k in ("modality", "labels", "training", "test") if not isinstance(info, dict) or k not in info]
    if missing:
        raise InputError(f"{meta}: not an MSD dataset.json (missing key(s) {', '.join(missing)})")
    if not isinstance(info["modality"], dict) or not isinstance(info["labels"], dict) \
            or not all(str(k).isdigit() for k in info["labels"]):
        raise InputError(f"{meta}: 'modality' and 'labels' must map numbers to names")
    _check_msd_files(src, len(info["modality"]))
    return int(m.group(1)), m.group(2)


def _msd_files(folder: Path) -> list[Path]:
    # the files nnU-Net's converter picks up
    return sorted(p for p in folder.glob("*" + FILE_ENDING) if not p.name.startswith((".", "_")))


def _check_msd_files(src: Path, num_channels: int) -> None:
    """Cheap checks (headers and gzip trailers, no voxel data): readable, not truncated, the declared
    channel count, a label for every training image. NaN/Inf voxels are not looked for here."""
    train = _msd_files(src / "imagesTr")
    if not train:
        raise InputError(f"{src / 'imagesTr'}: no {FILE_ENDING} images")
    for path in train + _msd_files(src / "imagesTs"):
        reader = read_header(path)
        dim, size = reader.GetDimension(), reader.GetSize()
        channels = size[3] if dim == 4 else 1
        if dim not in (3, 4) or channels != num_channels:
            raise InputError(f"{path}: {dim}D image with {channels} channel(s), dataset.json declares {num_channels}")
    for path in train:
        label = src / "labelsTr" / path.name
        if not label.is_file():
            raise InputError(f"{label}: missing label for {path.name}")
        read_header(label)


# ----------------------------------------------------------------------------------------------
# target


def _claim_target(src: Path, raw_root: str | os.PathLike | None, dataset_id: int, name: str,
                  overwrite: bool) -> Path:
    """``raw_root/DatasetXXX_name``, checked: free id (also in $nnUNet_preprocessed / $nnUNet_results),
    a sane name, and no overlap with the source (which must never be written to)."""
    if not name or any(c in name for c in "/\\") or name.startswith(".") or name != name.strip():
        raise InputError(f"--name {name!r}: must be a plain folder name")
    target = claim_dataset_folder(raw_root_from_env(raw_root), dataset_id, name, overwrite).absolute()
    prefix = dataset_prefix(dataset_id)
    for var in ("nnUNet_preprocessed", "nnUNet_results"):
        root = os.environ.get(var)
        others = sorted(p for p in Path(root).glob(prefix + "*") if p.is_dir() and p.name != target.name) \
            if root and Path(root).is_dir() else []
        if others:
            raise InputError(f"{others[0]}: dataset id {int(dataset_id)} is already taken (in ${var})")
    real_src, real_target = src.resolve(), target.resolve()
    if real_target == real_src or real_src in real_target.parents or real_target in real_src.parents:
        raise InputError(f"{target}: output dataset overlaps the source folder {src}")
    return target


# ----------------------------------------------------------------------------------------------
# per-case conversion, shared by brats and folder


def _read_channel(path: Path) -> sitk.Image:
    image = read_image(path)
    if image.GetNumberOfComponentsPerPixel() != 1:
        raise InputError(f"{path}: {image.GetNumberOfComponentsPerPixel()}-component (e.g. RGB) image; "
                         f"need one scalar image per channel")
    if image.GetDimension() not in (2, 3):
        raise InputError(f"{path}: {image.GetDimension()}D image; expected 2D or 3D (one file per channel)")
    return image


def _convert_case(case: SourceCase, out: Path, relabel: Relabel) -> set[int] | None:
    """Check and write one case; return the label values written, or ``None`` for an unlabelled case.

    Channels and label whose geometry agrees with the first channel's within our tolerance are written with
    exactly the first channel's: nnU-Net compares them with ``np.allclose`` (about 1e-5) and would refuse the
    dataset for spacings that differ in the fifth digit, as DICOM series of one session often do."""
    split = "Tr" if case.label is not None else "Ts"
    outputs = case_files(out / f"images{split}", case.name, len(case.images), FILE_ENDING)
    reference = None
    for path, dest in zip(case.images, outputs, strict=True):
        image = _read_channel(path)
        if reference is None:
            reference = image
        else:
            check_same_geometry(reference, case.images[0], image, path,
                                f"{case.images[0].name}, the first channel of case {case.name}")
            image.CopyInformation(reference)
        sitk.WriteImage(image, str(dest), useCompression=True)
    if case.label is None:
        return None
    label = _read_channel(case.label)
    check_same_geometry(reference, case.images[0], label, case.label,
                        f"{case.images[0].name}, the first channel of case {case.name}")
    label, values = relabel(label, case.label)
    label.CopyInformation(reference)
    sitk.WriteImage(label, str(out / "labelsTr" / f"{case.name}{FILE_ENDING}"), useCompression=True)
    return values


def _write_dataset(target: Path, overwrite: bool, cases: Sequence[SourceCase], channel_names: Sequence[str],
                   relabel: Relabel, describe: Callable[[dict[Path, set[int]]], dict]) -> Path:
    """Build the dataset in a temporary folder: every case, then dataset.json (``describe`` gets the
    label values found per label file and returns the dataset.json fields)."""
    from nnunetv2.dataset_conversion.generate_dataset_json import generate_dataset_json

    with atomic_directory(target, overwrite=overwrite) as tmp:
        for sub in ("imagesTr", "labelsTr") + (("imagesTs",) if any(c.label is None for c in cases) else ()):
            (tmp / sub).mkdir()
        found: dict[Path, set[int]] = {}
        for case in tqdm(cases, desc=f"convert {target.name}", unit="case", disable=None):
            values = _convert_case(case, tmp, relabel)
            if values is not None:
                found[case.label] = values
        generate_dataset_json(str(tmp), channel_names=dict(enumerate(channel_names)),
                              num_training_cases=len(found), file_ending=FILE_ENDING,
                              converted_by="entrust convert", **describe(found))
    return target


# ----------------------------------------------------------------------------------------------
# labels


def _integer_values(label: sitk.Image, path: Path) -> tuple[np.ndarray, np.ndarray]:
    """The label array and its unique values, refusing non-integer values."""
    arr = sitk.GetArrayFromImage(label)
    values = np.unique(arr)
    if np.issubdtype(arr.dtype, np.floating):
        odd = values[values != np.round(values)]
        if odd.size:
            raise InputError(f"{path}: label image holds non-integer values (e.g. {odd[0]:g})")
    return arr, values.astype(np.int64)


def _label_image(arr: np.ndarray, reference: sitk.Image) -> sitk.Image:
    dtype = np.uint8 if arr.max(initial=0) <= np.iinfo(np.uint8).max else np.uint16
    return copy_geometry(arr.astype(dtype), reference)


def _brats_relabel(layout: BratsLayout) -> Relabel:
    def relabel(label: sitk.Image, path: Path) -> tuple[sitk.Image, set[int]]:
        arr, values = _integer_values(label, path)
        bad = [int(v) for v in values if int(v) not in layout.label_map]
        if bad:
            raise InputError(f"{path}: label value(s) {bad} are not {layout.name} labels "
                             f"{sorted(layout.label_map)}")
        out = np.zeros(arr.shape, np.uint8)
        for source, dest in layout.label_map.items():
            out[arr == source] = dest
        return copy_geometry(out, label), {layout.label_map[int(v)] for v in values}

    return relabel


def _plain_relabel(label: sitk.Image, path: Path) -> tuple[sitk.Image, set[int]]:
    arr, values = _integer_values(label, path)
    if values.size and values[0] < 0:
        raise InputError(f"{path}: negative label value(s) {[int(v) for v in values if v < 0]}")
    if values.size and values[-1] > np.iinfo(np.uint16).max:
        raise InputError(f"{path}: label value {int(values[-1])} is too large")
    return _label_image(arr, label), {int(v) for v in values}


def _check_consecutive(found: dict[Path, set[int]]) -> int:
    """The union of label values must be 0..N; return N or raise naming a file above the first gap."""
    union = set().union(*found.values()) if found else {0}
    top = max(union)
    gaps = sorted(set(range(top + 1)) - union)
    if gaps:
        gap = gaps[0]
        above = min(v for v in union if v > gap)
        path = next(p for p, vals in found.items() if above in vals)
        raise InputError(f"{path}: holds label {above} but no case holds label {gap}; labels must be "
                         f"consecutive integers from 0 (found {sorted(union)})")
    return top
