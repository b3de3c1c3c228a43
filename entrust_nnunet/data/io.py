"""Image and dataset IO with the safety rules every writer in EnTrust follows.

* Bad input raises :class:`InputError` with ONE line naming the file and the problem; the CLI
  prints it and exits non-zero.
* Nothing is written in place: files go to a temporary name in the destination folder and are
  renamed (``os.replace`` is atomic on one filesystem), whole datasets are built in a temporary
  sibling folder and renamed at the end. An interrupted run leaves no truncated ``.nii.gz``.
* Temporaries are named ``.tmp-<pid>-<random>-<name>`` (:func:`temporary_sibling`): SIGINT and
  SIGTERM (:func:`raise_on_sigterm`) become exceptions, so ``finally`` removes them; after SIGKILL
  the next writer into that folder removes those whose process is dead
  (:func:`remove_stale_temporaries`).
* Inputs are only ever read.
"""
from __future__ import annotations

import contextlib
import gzip
import json
import os
import re
import shutil
import signal
import socket
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


#: taken in an output folder while ``entrust predict``, ``postprocess`` or ``ensemble`` write there, so that two runs
#: cannot interleave their files
OUTPUT_LOCK = ".entrust-predict.lock"

#: ``entrust predict --save-hypotheses`` writes one mask per hypothesis into this sub-folder
HYPOTHESIS_FOLDER = "hypotheses"


def hypothesis_path(pred_dir: str | os.PathLike, case: str, index: int, file_ending: str) -> Path:
    """``PRED/hypotheses/CASE_hNN<ending>`` (NN = 00 ... F*K-1 for F folds of K hypotheses each, fold-major)."""
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


#: prefix of every temporary file or folder; the pid and host after it name the process that writes it
TEMP_PREFIX = ".tmp-"
#: this machine (container) as 8 hex digits: on a folder shared between machines (NFS, a volume of several
#: containers) a pid says nothing about another machine's processes, so their files and locks are left alone
HOST_TAG = f"{zlib.crc32(socket.gethostname().encode('utf-8')):08x}"
#: ``.tmp-<pid>-h<host>-<random>-<name>``; names without the host (written before it) count as this machine's
_TEMP_NAME = re.compile(r"^\.tmp-(\d+)-(?:h([0-9a-f]{8})-)?")


class Terminated(KeyboardInterrupt):
    """SIGTERM as an exception (see :func:`raise_on_sigterm`); a KeyboardInterrupt, so code that
    tears down pools on Ctrl-C does the same here."""


_FORK_HOOK = []


def _default_sigterm_in_forked_child() -> None:
    if getattr(signal.getsignal(signal.SIGTERM), "entrust_sigterm", False):
        signal.signal(signal.SIGTERM, signal.SIG_DFL)


def sigterm_handler_of_this_process(handler):
    """Mark ``handler`` so that processes forked from here (fork pools, Managers) get SIGTERM's default
    back: a Python handler runs only between bytecodes, so a pool worker ended by ``terminate()`` could
    die later, holding a lock its siblings wait for (a hang)."""
    if not _FORK_HOOK:
        os.register_at_fork(after_in_child=_default_sigterm_in_forked_child)
        _FORK_HOOK.append(True)
    handler.entrust_sigterm = True
    return handler


def raise_on_sigterm():
    """Turn SIGTERM into :class:`Terminated` in this process, so ``finally`` blocks remove temporaries.
    Returns the previous handler."""

    @sigterm_handler_of_this_process
    def handler(signum, frame):
        signal.signal(signum, signal.SIG_IGN)  # a second SIGTERM must not cut the cleanup short
        raise Terminated()

    return signal.signal(signal.SIGTERM, handler)


def pid_alive(pid: int) -> bool:
    """Whether process ``pid`` runs (a zombie counts as dead: it can write nothing any more)."""
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:  # another user's process
        return True
    try:
        with open(f"/proc/{pid}/stat") as f:
            return f.read().rsplit(")", 1)[1].split()[0] != "Z"
    except (OSError, IndexError):
        return True


def temporary_path(path: str | os.PathLike) -> Path:
    """``.tmp-<pid>-<random>-<name>`` beside ``path``; the full suffix (.nii.gz) stays, so writers that
    pick the format by ending still do."""
    path = Path(path)
    return path.with_name(f"{TEMP_PREFIX}{os.getpid()}-h{HOST_TAG}-{uuid.uuid4().hex[:8]}-{path.name}")


def _remove(path: Path) -> None:
    if path.is_dir() and not path.is_symlink():
        shutil.rmtree(path, ignore_errors=True)
    else:
        with contextlib.suppress(FileNotFoundError):
            path.unlink()


@contextlib.contextmanager
def temporary_sibling(path: str | os.PathLike) -> Iterator[Path]:
    """A temporary name beside ``path`` (file or folder, not created); removed on exit unless renamed."""
    tmp = temporary_path(path)
    try:
        yield tmp
    finally:
        _remove(tmp)


def remove_stale_temporaries(*folders: str | os.PathLike, of: str | None = None) -> list[Path]:
    """Remove the temporaries in ``folders`` (only those of the file named ``of``, if given) whose writing process is
    dead (left by SIGKILL); return them. Those of another machine are left: whether their process lives cannot be
    known from here."""
    removed = []
    for folder in map(Path, folders):
        with contextlib.suppress(OSError):
            for entry in list(folder.iterdir()):
                if of is not None and not entry.name.endswith(f"-{of}"):
                    continue
                match = _TEMP_NAME.match(entry.name)
                if match and match.group(2) in (None, HOST_TAG) and not pid_alive(int(match.group(1))):
                    _remove(entry)
                    removed.append(entry)
    return removed


def write_image(image: sitk.Image, path: str | os.PathLike, compress: bool = True) -> None:
    """Write atomically: to a hidden temporary name in the same folder, then rename."""
    with temporary_sibling(path) as tmp:
        sitk.WriteImage(image, str(tmp), useCompression=compress)
        os.replace(tmp, path)


@contextlib.contextmanager
def atomic_file(path: str | os.PathLike, mode: str = "w") -> Iterator:
    """Open a temporary sibling of ``path`` for writing; rename it onto ``path`` on success. A SIGKILLed earlier
    writer's temporary of the same file goes first (single files such as summary.json have no folder-wide cleanup)."""
    remove_stale_temporaries(Path(path).parent, of=Path(path).name)
    with temporary_sibling(path) as tmp:
        with open(tmp, mode, **({} if "b" in mode else {"encoding": "utf-8"})) as f:
            yield f
        os.replace(tmp, path)


def check_writable_folder(folder: Path) -> None:
    """``folder`` (or, if it does not exist yet, its nearest existing ancestor) is a writable folder."""
    existing = folder
    while not existing.exists() and existing != existing.parent:
        existing = existing.parent
    if not existing.is_dir():
        raise InputError(f"{existing}: is a file, not a folder"
                         + ("" if existing == folder else f" (cannot create {folder})"))
    if not os.access(existing, os.W_OK | os.X_OK):
        raise InputError(f"{existing}: output {'folder' if existing == folder else 'location'} is not writable")


def check_writable_parent(folder: Path) -> None:
    check_writable_folder(folder.parent)
    try:
        folder.parent.mkdir(parents=True, exist_ok=True)
    except OSError as e:
        raise InputError(f"{folder.parent}: cannot create output folder ({e.strerror})") from None


@contextlib.contextmanager
def atomic_directory(final: str | os.PathLike, overwrite: bool = False) -> Iterator[Path]:
    """Build a folder under a temporary name beside ``final`` and rename it into place at the end.

    On any exception the temporary folder is removed and ``final`` is untouched. An existing
    ``final`` (folder or file) is refused unless ``overwrite`` (then it is replaced only after the
    new one is complete). The folder gets the mode the umask gives, like ``mkdir``.
    """
    final = Path(final).absolute()
    if (final.exists() or final.is_symlink()) and not overwrite:
        raise InputError(f"{final}: already exists (use --overwrite to replace it)")
    check_writable_parent(final)
    remove_stale_temporaries(final.parent)
    with temporary_sibling(final) as tmp:
        tmp.mkdir()  # not tempfile.mkdtemp: its 0700 would hide the dataset from other users
        yield tmp
        if final.exists() or final.is_symlink():
            with temporary_sibling(final) as trash:  # removed on exit, file or folder
                os.replace(final, trash)
                try:
                    os.replace(tmp, final)
                except BaseException:  # Ctrl-C / SIGTERM between the renames, or the rename failed: old one back
                    if not (final.exists() or final.is_symlink()):
                        os.replace(trash, final)
                    raise
        else:
            os.replace(tmp, final)


@contextlib.contextmanager
def folder_lock(folder: Path, name: str, what: str) -> Iterator[Path]:
    """Hold ``folder/name`` while writing into ``folder``: an exclusive ``flock`` on the file, which holds our pid
    and :data:`HOST_TAG` for the messages.

    The kernel drops an flock when its holder dies (SIGKILL too), so a lock file nobody holds is stale whatever
    pid it names (pids are reused) and is taken over, by one process only when several try at once. A held lock
    is refused with an :class:`InputError`; so is a file naming another machine, even when unheld (a file system
    without shared locks cannot show us that machine's holder).
    """
    lock = folder / name
    fd = _take_lock(lock, folder, what)
    try:
        os.ftruncate(fd, 0)
        os.write(fd, f"{os.getpid()} {HOST_TAG}\n".encode())
        yield lock
    finally:
        _remove(lock)  # while still held: whoever opened this file before the unlink sees it gone and retries
        os.close(fd)


@contextlib.contextmanager
def writing_prediction_folder(out: Path, subfolders: tuple[str, ...], dataset_json: dict, plans: dict,
                              what: str) -> Iterator[Path]:
    """Hold OUT's :data:`OUTPUT_LOCK` while a prediction folder is written, dataset.json and plans.json first; a
    killed run's temporaries in OUT and its ``subfolders`` are removed before, and after (workers ended by
    Ctrl-C/SIGTERM cannot remove their own)."""
    written = (out, *(out / s for s in subfolders))
    with folder_lock(out, OUTPUT_LOCK, what):
        try:
            remove_stale_temporaries(*written)
            for name, content in (("dataset.json", dataset_json), ("plans.json", plans)):
                with atomic_file(out / name) as f:
                    json.dump(content, f, indent=2)
            yield out
        finally:
            remove_stale_temporaries(*written)


def _take_lock(lock: Path, folder: Path, what: str) -> int:
    import fcntl

    for _ in range(5):
        fd = os.open(lock, os.O_CREAT | os.O_RDWR, 0o644)
        try:
            fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
            held = False
        except BlockingIOError:
            held = True
        holder, host = _lock_holder(lock)
        foreign = host not in (None, HOST_TAG)
        if held or foreign:
            os.close(fd)
            who = f"pid {holder} on another machine, host {host}" if foreign else f"pid {holder or 'unknown'}"
            advice = ("wait for it, or remove the lock if that run has ended" if foreign
                      else "wait for it or choose another output folder")
            raise InputError(f"{lock}: another {what} ({who}) is writing into {folder}; {advice}")
        try:
            if os.path.samestat(os.fstat(fd), os.stat(lock)):
                return fd
        except FileNotFoundError:
            pass
        os.close(fd)  # its holder removed the file between our open and flock: take the current one
    raise InputError(f"{lock}: cannot take the lock")


def _lock_holder(lock: Path) -> tuple[int | None, str | None]:
    """(pid, host tag) of a lock's holder; host None for locks written before it, (None, None) for an empty lock."""
    try:
        words = lock.read_text().split()
        return int(words[0]), (words[1] if len(words) > 1 else None)
    except (OSError, ValueError, IndexError):  # empty: its writer is between flock and write
        return None, None


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
