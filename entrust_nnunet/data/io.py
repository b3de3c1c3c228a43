"""Image and dataset IO with the safety rules every writer in EnTrust follows.

* Bad input raises :class:`InputError` with ONE line naming the file and the problem; the CLI
  prints it and exits non-zero.
* Nothing is written in place: files go to a temporary name in the destination folder and are
  renamed (``os.replace`` is atomic on one filesystem), whole datasets are built in a temporary
  sibling folder and renamed at the end. An interrupted run leaves no truncated ``.nii.gz``.
* Inputs are only ever read.
"""
from __future__ import annotations

import contextlib
import gzip
import os
import shutil
import tempfile
import uuid
import zlib
from pathlib import Path
from typing import Iterator

import numpy as np
import SimpleITK as sitk

#: default tolerance when comparing spacing / origin / direction of two images (relative for
#: spacing, absolute in mm for origin, absolute for direction cosines)
GEOMETRY_TOLERANCE = 1e-4


#: the prediction folder layout of ``entrust predict``: maps live in this sub-folder (so that
#: ``nnUNetv2_evaluate_folder`` still works on the masks beside it), one file per map name
MAP_FOLDER = "uncertainty"
MAP_NAMES = ("total", "aleatoric", "epistemic", "conflict")
#: ``entrust postprocess`` records beside its masks what it removed per case (``entrust evaluate`` reports it);
#: a removed voxel counts as marked by the conflict map above CONFLICT_MARK
POSTPROCESSING_RECORD = "postprocessed_regions.json"
CONFLICT_MARK = 0.5
#: endings SimpleITK writes float32 images to; other dataset endings (e.g. .png) get .nii.gz maps
FLOAT_ENDINGS = (".nii.gz", ".nii", ".mha", ".mhd", ".nrrd")


def map_ending(file_ending: str) -> str:
    return file_ending if file_ending in FLOAT_ENDINGS else ".nii.gz"


def map_path(pred_dir: str | os.PathLike, case: str, name: str, file_ending: str) -> Path:
    """``PRED/uncertainty/CASE_<name><ending>``."""
    return Path(pred_dir) / MAP_FOLDER / f"{case}_{name}{map_ending(file_ending)}"


#: ``entrust predict --save-hypotheses`` writes one mask per hypothesis into this sub-folder
HYPOTHESIS_FOLDER = "hypotheses"


def hypothesis_path(pred_dir: str | os.PathLike, case: str, index: int, file_ending: str) -> Path:
    """``PRED/hypotheses/CASE_hNN<ending>`` (NN = 00 ... K-1; with several folds, fold-major)."""
    return Path(pred_dir) / HYPOTHESIS_FOLDER / f"{case}_h{index:02d}{file_ending}"


def numbered_files(folder: Path, case: str, tag: str, file_ending: str) -> list[Path]:
    """``folder/CASE_<tag>N<ending>`` files in the order of N (hypotheses ``h``, annotators ``a``)."""
    if not folder.is_dir():
        return []
    prefix = f"{case}_{tag}"
    found = [(f.name[len(prefix):-len(file_ending)], f) for f in folder.iterdir()
             if f.name.startswith(prefix) and f.name.endswith(file_ending)]
    return [f for n, f in sorted((int(n), f) for n, f in found if n.isdigit())]


class InputError(Exception):
    """A problem with what the user gave us. ``str(err)`` is a single line fit for a terminal."""


def first_error_line(err: BaseException) -> str:
    text = next((ln.strip() for ln in str(err).splitlines() if ln.strip()), type(err).__name__)
    return text[:200]


def sitk_error_reason(err: RuntimeError) -> str:
    """The informative part of a SimpleITK exception (its ``sitk::ERROR:`` line, not the source location)."""
    lines = [ln.strip() for ln in str(err).splitlines() if ln.strip()]
    errors = [ln.split("ERROR:", 1)[1].strip() for ln in lines if "ERROR:" in ln]
    return (errors[-1] if errors else lines[0] if lines else "unknown error")[:160]


def _is_nifti(path: Path) -> bool:
    return path.is_file() and path.name.lower().endswith((".nii", ".nii.gz"))


def _gzip_content_size(path: Path, expected: int) -> int:
    """Uncompressed size of a .gz file: the trailer's ISIZE when it says ``expected`` (cheap), else the
    size found by decompressing it (which also exposes a broken stream)."""
    with open(path, "rb") as f:
        f.seek(-4, os.SEEK_END)
        if int.from_bytes(f.read(4), "little") == expected % 2 ** 32:
            return expected
    size = 0
    with gzip.open(path, "rb") as g:
        while chunk := g.read(1 << 22):
            size += len(chunk)
    return size


def _nifti_problem(path: Path, check_finite: bool = True) -> str | None:
    """What ITK's NIfTI reader hides: it reads a truncated file as zeros and turns NaN/Inf voxels into 0,
    so ``read_image`` cannot see either. Checks the stored size (header and gzip trailer, cheap) and,
    with ``check_finite``, the stored floats of float images (read a second time, with nibabel)."""
    if not _is_nifti(path):
        return None
    import nibabel

    try:
        nii = nibabel.load(str(path))
        expected = int(nii.header.get_data_offset()) + int(np.prod(nii.shape)) * nii.get_data_dtype().itemsize
        if path.name.lower().endswith(".gz"):
            stored = _gzip_content_size(path, expected)
        else:
            stored = path.stat().st_size
        if stored < expected:
            return f"truncated or corrupt file (holds {stored} of {expected} bytes)"
        if check_finite and nii.get_data_dtype().kind in "fc" \
                and not np.all(np.isfinite(np.asanyarray(nii.dataobj))):
            return "image contains NaN or Inf values"
    except (OSError, EOFError, ValueError, zlib.error, nibabel.filebasedimages.ImageFileError) as e:
        return f"truncated or corrupt file ({first_error_line(e)})"
    return None


def read_image(path: str | os.PathLike, check_finite: bool = True) -> sitk.Image:
    """Read an image SimpleITK understands; a folder is read as a DICOM series.

    Raises :class:`InputError` (naming ``path``) when the file is missing, unreadable, truncated, or
    contains NaN/Inf voxels (``check_finite``). ITK's NIfTI reader reads a truncated file as zeros and
    NaN/Inf voxels as 0, so NIfTI files are checked once more (:func:`_nifti_problem`).
    """
    path = Path(path)
    if not path.exists():
        raise InputError(f"{path}: file does not exist")
    try:
        if path.is_dir():
            reader = sitk.ImageSeriesReader()
            series = reader.GetGDCMSeriesIDs(str(path))
            if not series:
                raise InputError(f"{path}: folder contains no DICOM series")
            if len(series) > 1:
                raise InputError(f"{path}: folder contains {len(series)} DICOM series, expected one")
            reader.SetFileNames(reader.GetGDCMSeriesFileNames(str(path), series[0]))
            image = reader.Execute()
        else:
            image = sitk.ReadImage(str(path))
    except InputError:
        raise
    except RuntimeError as e:  # SimpleITK raises RuntimeError with a multi-line message
        raise InputError(f"{path}: unreadable or corrupt image ({sitk_error_reason(e)})") from None
    problem = _nifti_problem(path, check_finite)
    if problem:
        raise InputError(f"{path}: {problem}")
    if check_finite and image.GetPixelID() in (sitk.sitkFloat32, sitk.sitkFloat64):
        arr = sitk.GetArrayViewFromImage(image)
        if not np.all(np.isfinite(arr)):
            raise InputError(f"{path}: image contains NaN or Inf values")
    return image


def read_header(path: str | os.PathLike) -> sitk.ImageFileReader:
    """Read only the header of an image; the returned reader answers GetSize/GetSpacing/GetOrigin/GetDirection."""
    reader = sitk.ImageFileReader()
    reader.SetFileName(str(path))
    try:
        reader.ReadImageInformation()
    except RuntimeError as e:
        raise InputError(f"{path}: unreadable or corrupt image ({sitk_error_reason(e)})") from None
    problem = _nifti_problem(Path(path), check_finite=False)
    if problem:
        raise InputError(f"{path}: {problem}")
    return reader


def _fmt(values) -> str:
    return "(" + ", ".join(f"{float(v):.5g}" for v in values) + ")"


def geometry_mismatch(a: sitk.Image, b: sitk.Image, tol: float = GEOMETRY_TOLERANCE) -> str | None:
    """Describe how the geometry of ``b`` differs from ``a`` (size, spacing, origin, direction),
    or return ``None`` when they agree within ``tol``. Images or headers (:func:`read_header`) alike."""
    if a.GetDimension() != b.GetDimension():
        return f"dimension {b.GetDimension()} != {a.GetDimension()}"
    if a.GetSize() != b.GetSize():
        return f"size {b.GetSize()} != {a.GetSize()}"
    sa, sb = np.array(a.GetSpacing()), np.array(b.GetSpacing())
    if not np.allclose(sa, sb, rtol=tol, atol=0):
        return f"spacing {_fmt(sb)} != {_fmt(sa)}"
    if not np.allclose(a.GetOrigin(), b.GetOrigin(), rtol=0, atol=max(tol, tol * float(sa.max()))):
        return f"origin {_fmt(b.GetOrigin())} != {_fmt(a.GetOrigin())}"
    if not np.allclose(a.GetDirection(), b.GetDirection(), rtol=0, atol=tol):
        return "direction differs"
    return None


def check_same_geometry(reference: sitk.Image, ref_path, image: sitk.Image, path, what: str = "") -> None:
    """Raise :class:`InputError` naming ``path`` when its geometry differs from ``reference`` (read from
    ``ref_path``); ``what`` describes the reference (default: its file name)."""
    problem = geometry_mismatch(reference, image)
    if problem:
        raise InputError(f"{path}: geometry differs from {what or ref_path} ({problem})")


def copy_geometry(array: np.ndarray, reference: sitk.Image) -> sitk.Image:
    """Wrap a numpy array (z, y, x order, as ``sitk.GetArrayFromImage``) with ``reference``'s geometry."""
    image = sitk.GetImageFromArray(array)
    image.CopyInformation(reference)
    return image


def _temporary_sibling(path: Path) -> Path:
    # keep the full suffix (.nii.gz) so SimpleITK picks the right writer for the temporary file
    return path.with_name(f".tmp-{uuid.uuid4().hex[:8]}-{path.name}")


def write_image(image: sitk.Image, path: str | os.PathLike, compress: bool = True) -> None:
    """Write atomically: to a hidden temporary name in the same folder, then rename."""
    path = Path(path)
    tmp = _temporary_sibling(path)
    try:
        sitk.WriteImage(image, str(tmp), useCompression=compress)
        os.replace(tmp, path)
    finally:
        if tmp.exists():
            tmp.unlink()


@contextlib.contextmanager
def atomic_file(path: str | os.PathLike, mode: str = "w") -> Iterator:
    """Open a temporary sibling of ``path`` for writing; rename it onto ``path`` on success."""
    path = Path(path)
    tmp = _temporary_sibling(path)
    try:
        with open(tmp, mode, **({} if "b" in mode else {"encoding": "utf-8"})) as f:
            yield f
        os.replace(tmp, path)
    finally:
        if tmp.exists():
            tmp.unlink()


def check_writable_parent(folder: Path) -> None:
    parent = folder.parent
    if not parent.exists():
        try:
            parent.mkdir(parents=True)
        except OSError as e:
            raise InputError(f"{parent}: cannot create output folder ({e.strerror})") from None
    if not os.access(parent, os.W_OK | os.X_OK):
        raise InputError(f"{parent}: output location is not writable")


@contextlib.contextmanager
def atomic_directory(final: str | os.PathLike, overwrite: bool = False) -> Iterator[Path]:
    """Build a folder under a temporary name beside ``final`` and rename it into place at the end.

    On any exception the temporary folder is removed and ``final`` is untouched. An existing
    ``final`` is refused unless ``overwrite`` (then it is replaced only after the new one is
    complete).
    """
    final = Path(final).absolute()
    if final.exists() and not overwrite:
        raise InputError(f"{final}: already exists (use --overwrite to replace it)")
    check_writable_parent(final)
    tmp = Path(tempfile.mkdtemp(prefix=f".tmp-{final.name}-", dir=final.parent))
    try:
        yield tmp
        if final.exists():
            trash = final.with_name(f".trash-{uuid.uuid4().hex[:8]}-{final.name}")
            os.replace(final, trash)
            os.replace(tmp, final)
            shutil.rmtree(trash, ignore_errors=True)
        else:
            os.replace(tmp, final)
    finally:
        if tmp.exists():
            shutil.rmtree(tmp, ignore_errors=True)


def dataset_prefix(dataset_id: int) -> str:
    """nnU-Net's folder prefix of a dataset id: ``DatasetXXX_`` (nnU-Net resolves datasets by it)."""
    if not 1 <= int(dataset_id) <= 999:
        raise InputError(f"dataset id {dataset_id}: must be between 1 and 999")
    return f"Dataset{int(dataset_id):03d}_"


def nnunet_dataset_name(dataset_id: int, name: str) -> str:
    return dataset_prefix(dataset_id) + name


def claim_dataset_folder(raw_root: str | os.PathLike, dataset_id: int, name: str, overwrite: bool) -> Path:
    """Return ``raw_root/DatasetXXX_name`` after checking that no OTHER dataset uses the id.

    nnU-Net resolves datasets by id, so two folders with one id break every later command.
    """
    raw_root = Path(raw_root)
    target = raw_root / nnunet_dataset_name(dataset_id, name)
    prefix = dataset_prefix(dataset_id)
    taken = sorted(p for p in raw_root.glob(prefix + "*") if p.is_dir()) if raw_root.is_dir() else []
    for other in taken:
        if other.name != target.name or not overwrite:
            raise InputError(f"{other}: dataset id {int(dataset_id)} is already taken"
                             + ("" if other.name != target.name else " (use --overwrite to replace it)"))
    return target


def raw_root_from_env(explicit: str | None = None) -> Path:
    root = explicit or os.environ.get("nnUNet_raw")
    if not root:
        raise InputError("nnUNet_raw is not set: pass -o/--output-root or run `entrust env` for the lines to export")
    return Path(root)


def case_files(folder: Path, case: str, n_channels: int, file_ending: str) -> list[Path]:
    """nnU-Net's raw naming: ``CASE_0000<ending>``, ``CASE_0001<ending>``, ..."""
    return [folder / f"{case}_{c:04d}{file_ending}" for c in range(n_channels)]
