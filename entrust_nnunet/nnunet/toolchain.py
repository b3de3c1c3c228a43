"""nnU-Net's post-training toolchain on ``entrust predict`` folders, keeping the uncertainty maps consistent.

* :func:`postprocess_folder` (``entrust postprocess``): nnU-Net's post-processing (the ``postprocessing.pkl``
  that ``nnUNetv2_find_best_configuration`` writes, applied with nnU-Net's own ``apply_postprocessing``) on
  the masks. Where it changed a voxel (nnU-Net's functions only remove components: label -> background),
  ``total`` becomes ``1 - p(new label)`` from the saved class probabilities (``--save_probabilities``), i.e.
  the network's own foreground probability there: the probability that removing it was wrong. Without
  the .npz it becomes ``1 - total``, the calibrated probability that the removed label was right (exact
  with one foreground label, a lower bound with several); the record says which. The other maps describe the
  class probabilities (aleatoric, epistemic) or the images (conflict), which post-processing does not
  change, so they are copied. ``postprocessed_regions.json`` records per case the removed voxels and
  those the conflict map marks (> :data:`CONFLICT_MARK`); ``entrust evaluate`` and the report show it.
* :func:`ensemble_folders` (``entrust ensemble``): several ``entrust predict --save_probabilities``
  folders pooled the way folds are pooled: class probabilities averaged (nnU-Net's
  ``average_probabilities``; mask = nnU-Net's ``convert_probabilities_to_segmentation``), aleatoric
  averaged, epistemic = the members' own epistemic maps averaged plus the Jensen-Shannon divergence of their
  class probabilities (the members' disagreement, each member weighted equally), conflict averaged,
  ``total`` = the members' calibrated P(error) re-targeted to the ensemble's label and averaged
  (:func:`member_error_probability`).

Everything is checked before anything is written; every file goes to a temporary name and is renamed,
maps before the mask, so a mask on disk means its maps are complete.
"""
from __future__ import annotations

import contextlib
import io
import json
import multiprocessing
import os
import pickle
from pathlib import Path
from typing import Iterator

import numpy as np
import SimpleITK as sitk
import torch
from batchgenerators.utilities.file_and_folder_operations import load_pickle
from nnunetv2.ensembling.ensemble import average_probabilities
from nnunetv2.postprocessing.remove_connected_components import apply_postprocessing
from nnunetv2.utilities.plans_handling.plans_handler import PlansManager
from scipy import ndimage

from entrust_nnunet.data.io import (CONFLICT_MARK, MAP_FOLDER, MAP_NAMES, POSTPROCESSING_RECORD, InputError,
                                    atomic_file, map_path, read_image, temporary_path, write_image,
                                    writing_prediction_folder)
from entrust_nnunet.data.modalities import modalities_path
from entrust_nnunet.model.trustmap import jensen_shannon
from entrust_nnunet.nnunet.orientation import in_array_order, in_written_order, written_voxel_order


# --------------------------------------------------------------------------------------------------
# reading and writing one prediction folder
# --------------------------------------------------------------------------------------------------
def _json(path: Path) -> dict:
    if not path.is_file():
        raise InputError(f"{path}: missing (not an `entrust predict` output folder?)")
    try:
        return json.loads(path.read_text())
    except (OSError, UnicodeDecodeError, json.JSONDecodeError) as e:
        raise InputError(f"{path}: not a readable JSON file ({str(e).splitlines()[0][:120]})") from None


def prediction_folder(folder, plans_json=None, dataset_json=None) -> dict:
    """dataset.json, plans and the masks of an ``entrust predict`` folder; InputError if it is not one.
    ``plans_json``/``dataset_json`` replace the folder's, as nnU-Net's ``-plans_json``/``-dataset_json`` do."""
    folder = Path(folder).absolute()
    if not folder.is_dir():
        raise InputError(f"{folder}: prediction folder does not exist")
    dataset_json = _json(Path(dataset_json) if dataset_json else folder / "dataset.json")
    plans = PlansManager(_json(Path(plans_json) if plans_json else folder / "plans.json"))
    label_manager = plans.get_label_manager(dataset_json)
    if label_manager.has_regions:
        raise InputError(f"{folder / 'dataset.json'}: region-based labels are not supported (the maps need a class "
                         "distribution)")
    ending = dataset_json["file_ending"]
    cases = sorted(f.name[: -len(ending)] for f in folder.iterdir()
                   if f.is_file() and f.name.endswith(ending) and not f.name.startswith("."))
    if not cases:
        raise InputError(f"{folder}: no masks ending with {ending}")
    return {"folder": folder, "dataset_json": dataset_json, "plans": plans.plans, "ending": ending, "cases": cases,
            "rw": plans.image_reader_writer_class(), "label_manager": label_manager}


def check_case_files(pred: dict, case: str, need_probabilities: bool) -> None:
    """The maps (and the .npz/.pkl) of one case exist; else InputError naming the first missing file."""
    folder = pred["folder"]
    needed = [map_path(folder, case, name, pred["ending"]) for name in MAP_NAMES]
    if need_probabilities:
        needed += [folder / f"{case}.npz", folder / f"{case}.pkl"]
    for f in needed:
        if not f.is_file():
            why = "run `entrust predict` with --save_probabilities" if f.suffix in (".npz", ".pkl") else \
                "not an `entrust predict` output (maps missing)"
            raise InputError(f"{f}: missing ({why})")


def _probabilities(npz: Path, shape: tuple) -> np.ndarray:
    try:
        probs = np.load(npz)["probabilities"].astype(np.float32)
    except (OSError, ValueError, KeyError) as e:
        raise InputError(f"{npz}: no readable 'probabilities' array ({str(e).splitlines()[0][:120]})") from None
    if probs.shape[1:] != tuple(shape):
        raise InputError(f"{npz}: probabilities of shape {probs.shape[1:]}, the mask has {tuple(shape)}")
    return probs


def _maps(pred: dict, case: str, shape: tuple, order) -> dict[str, np.ndarray]:
    """The case's maps in the array layout of nnU-Net's reader (``read_seg``), the .npz's: the files' voxels put
    back through the writer's voxel ``order`` (:func:`written_voxel_order`; None: the same layout)."""
    maps = {}
    for name in MAP_NAMES:
        path = map_path(pred["folder"], case, name, pred["ending"])
        arr = sitk.GetArrayFromImage(read_image(path)).astype(np.float32)
        if arr.size != int(np.prod(shape)):
            raise InputError(f"{path}: {arr.size} voxels, the mask has {int(np.prod(shape))}")
        maps[name] = in_array_order(arr, order, shape)
    return maps


def case_voxel_order(pred: dict, case: str, shape: tuple, properties: dict, out: Path):
    """The writer's voxel order for ``case`` (:func:`written_voxel_order`), its probe files written in ``out``."""
    return written_voxel_order(pred["rw"], tuple(shape), properties, pred["ending"], out / case)


def modality_record(folders: list[Path], case: str) -> dict | None:
    """The case's modality record (which modalities were present) for an output made from ``folders``: theirs
    when they agree (a post-processed folder: its one input's), every folder's otherwise (None: none has one)."""
    records = [json.loads(f.read_text()) if f.is_file() else None for f in (modalities_path(d, case) for d in folders)]
    if all(r is None for r in records):
        return None
    if all(r == records[0] for r in records):
        return records[0]
    return {"case": case, "members": {str(d): r for d, r in zip(folders, records)}}


def write_case(out: Path, case: str, ending: str, rw, seg: np.ndarray, properties: dict, maps: dict, order,
               npz_pkl: tuple[bytes, bytes] | None = None, record: dict | None = None) -> None:
    """Mask (nnU-Net's writer), maps (mask's geometry and, through the writer's voxel ``order``, its voxel order),
    optional .npz/.pkl contents and modality record: temporary names first, the mask renamed last."""
    mask, tmp_mask = out / f"{case}{ending}", temporary_path(out / f"{case}{ending}")
    try:
        rw.write_seg(seg, str(tmp_mask), properties)
        reference = sitk.ReadImage(str(tmp_mask))
        shape = sitk.GetArrayViewFromImage(reference).shape
        for name in MAP_NAMES:
            image = sitk.GetImageFromArray(in_written_order(np.asarray(maps[name], dtype=np.float32), order, shape))
            image.CopyInformation(reference)
            write_image(image, map_path(out, case, name, ending))
        if record is not None:
            with atomic_file(modalities_path(out, case)) as f:
                json.dump(record, f, indent=2)
        else:  # an earlier run's record into the same folder describes other inputs
            modalities_path(out, case).unlink(missing_ok=True)
        for suffix, content in zip((".npz", ".pkl"), npz_pkl or ()):
            with atomic_file(out / f"{case}{suffix}", "wb") as f:
                f.write(content)
        os.replace(tmp_mask, mask)
    finally:
        if tmp_mask.exists():
            tmp_mask.unlink()


def _npz_pkl(probabilities: np.ndarray, properties: dict) -> tuple[bytes, bytes]:
    """The .npz/.pkl pair as nnU-Net's ensembling writes it."""
    buffer = io.BytesIO()
    np.savez_compressed(buffer, probabilities=probabilities)
    return buffer.getvalue(), pickle.dumps(properties)


@contextlib.contextmanager
def _output_folder(out, inputs: list[Path], dataset_json: dict, plans: dict, what: str) -> Iterator[Path]:
    """OUT, not an input, created and written under :func:`writing_prediction_folder`."""
    out = Path(out).absolute()
    if any(out.resolve() == i.resolve() for i in inputs):
        raise InputError(f"{out}: output folder is an input folder; choose another so inputs stay untouched")
    try:
        (out / MAP_FOLDER).mkdir(parents=True, exist_ok=True)
    except OSError as e:
        raise InputError(f"{out}: cannot create output folder ({e.strerror})") from None
    with writing_prediction_folder(out, (MAP_FOLDER,), dataset_json, plans, what):
        yield out


def _run(fn, jobs: list[dict], num_processes: int) -> list:
    if num_processes > 1 and len(jobs) > 1:
        with multiprocessing.get_context("spawn").Pool(min(num_processes, len(jobs))) as pool:
            return pool.map(fn, jobs)
    return [fn(job) for job in jobs]


# --------------------------------------------------------------------------------------------------
# post-processing
# --------------------------------------------------------------------------------------------------
def load_postprocessing(pp_pkl_file) -> tuple[list, list]:
    """``(functions, kwargs)`` from nnU-Net's ``postprocessing.pkl``."""
    path = Path(pp_pkl_file)
    if not path.is_file():
        raise InputError(f"{path}: postprocessing file does not exist")
    try:
        pp_fns, pp_kwargs = load_pickle(str(path))
    except Exception as e:  # unpickling fails in many ways
        raise InputError(f"{path}: not nnU-Net's postprocessing.pkl ({type(e).__name__})") from None
    return list(pp_fns), list(pp_kwargs)


def _postprocess_case(job: dict) -> dict:
    pred, case, out = job["pred"], job["case"], job["out"]
    seg, properties = pred["rw"].read_seg(str(pred["folder"] / f"{case}{pred['ending']}"))
    before = seg[0]
    after = apply_postprocessing(before, job["pp_fns"], job["pp_kwargs"])
    order = case_voxel_order(pred, case, before.shape, properties, out)
    maps = _maps(pred, case, before.shape, order)
    changed = before != after
    npz = pred["folder"] / f"{case}.npz"
    if npz.is_file():  # P(error) of the new label: where a component was removed, the network's P(foreground)
        p_new = np.take_along_axis(_probabilities(npz, before.shape), after[None].astype(np.int64), 0)[0]
        new_total = 1.0 - p_new
    else:  # the calibrated P(removed label was right): exact with one foreground label, else a lower bound
        new_total = 1.0 - maps["total"]
    maps["total"] = np.where(changed, np.clip(new_total, 0.0, 1.0), maps["total"])
    marked = changed & (maps["conflict"] > CONFLICT_MARK)
    components, n = ndimage.label(changed, structure=np.ones((3,) * changed.ndim))  # full connectivity, as nnU-Net
    marked_regions = len(set(np.unique(components[marked]).tolist()) - {0})
    # the class probabilities stay the network's (the mask is no longer their argmax where a region was removed)
    kept = [pred["folder"] / f"{case}{e}" for e in (".npz", ".pkl")]
    npz_pkl = tuple(f.read_bytes() for f in kept) if all(f.is_file() for f in kept) else None
    write_case(out, case, pred["ending"], pred["rw"], after, properties, maps, order, npz_pkl,
               modality_record([pred["folder"]], case))
    return {"case": case, "removed_voxels": int(changed.sum()), "removed_regions": int(n),
            "removed_conflict_voxels": int(marked.sum()), "removed_conflict_regions": marked_regions,
            "p_error_source": "probabilities" if npz.is_file() else "total"}


def postprocess_folder(input_dir, output_dir, pp_pkl_file, num_processes: int = 2, plans_json=None,
                       dataset_json=None) -> dict:
    """nnU-Net's post-processing on an ``entrust predict`` folder, maps kept consistent.

    Returns (and writes to ``OUT/postprocessed_regions.json``) what was removed per case."""
    pred = prediction_folder(input_dir, plans_json, dataset_json)
    pp_fns, pp_kwargs = load_postprocessing(pp_pkl_file)
    for case in pred["cases"]:
        check_case_files(pred, case, need_probabilities=False)
    with _output_folder(output_dir, [pred["folder"]], pred["dataset_json"], pred["plans"],
                        "entrust postprocess") as out:
        jobs = [{"pred": pred, "case": c, "out": out, "pp_fns": pp_fns, "pp_kwargs": pp_kwargs} for c in pred["cases"]]
        removed = _run(_postprocess_case, jobs, num_processes)
        record = {"input": str(pred["folder"]), "pp_pkl_file": str(Path(pp_pkl_file).absolute()),
                  "postprocessing_fns": [getattr(f, "__name__", str(f)) for f in pp_fns],
                  "postprocessing_kwargs": [{k: str(v) for k, v in kw.items()} for kw in pp_kwargs],
                  "conflict_mark": CONFLICT_MARK, "cases": {r.pop("case"): r for r in removed}}
        with atomic_file(out / POSTPROCESSING_RECORD) as f:
            json.dump(record, f, indent=2)
    return record


# --------------------------------------------------------------------------------------------------
# ensembles of configurations
# --------------------------------------------------------------------------------------------------
def member_error_probability(total: np.ndarray, member_label: np.ndarray, member_probs: np.ndarray,
                             label: np.ndarray) -> np.ndarray:
    """A member's probability that ``label`` (the ensemble's) is wrong, from its calibrated ``total``.

    Where the member chose ``label`` too, that is its ``total``. Elsewhere the member's probability of
    ``label`` is its calibrated probability of being wrong (``total``) shared among the other classes in
    proportion to its class probabilities: ``1 - total * p[label] / (1 - p[member_label])`` (exact with
    one foreground class: ``1 - total``)."""
    p_label = np.take_along_axis(member_probs, label[None].astype(np.int64), 0)[0]
    p_own = np.take_along_axis(member_probs, member_label[None].astype(np.int64), 0)[0]
    share = np.clip(p_label / np.maximum(1.0 - p_own, 1e-8), 0.0, 1.0)
    return np.where(member_label == label, total, np.clip(1.0 - total * share, 0.0, 1.0))


def _ensemble_case(job: dict) -> dict:
    members, case, out, first = job["members"], job["case"], job["out"], job["members"][0]
    probs = average_probabilities([str(m["folder"] / f"{case}.npz") for m in members])
    label = first["label_manager"].convert_probabilities_to_segmentation(probs)
    properties = load_pickle(str(first["folder"] / f"{case}.pkl"))
    errors, member_maps, member_probs = [], [], []
    order = case_voxel_order(first, case, label.shape, properties, out)
    for m in members:
        seg, _ = m["rw"].read_seg(str(m["folder"] / f"{case}{m['ending']}"))
        member_maps.append(_maps(m, case, label.shape, order))
        member_probs.append(_probabilities(m["folder"] / f"{case}.npz", label.shape))
        errors.append(member_error_probability(member_maps[-1]["total"], seg[0], member_probs[-1], label))
    maps = {name: np.mean([mm[name] for mm in member_maps], 0) for name in ("aleatoric", "epistemic", "conflict")}
    maps["total"] = np.mean(errors, 0)
    # each member's own epistemic part (its folds') plus the members' disagreement: the Jensen-Shannon divergence of
    # their class probabilities as written (for EnTrust top-label calibrated, docs/design.md "Class probabilities")
    between = jensen_shannon(torch.from_numpy(np.stack(member_probs)), member_axis=0, class_axis=1)
    maps["epistemic"] = maps["epistemic"] + between.numpy()
    write_case(out, case, first["ending"], first["rw"], label, properties, maps, order,
               _npz_pkl(probs, properties) if job["save_probabilities"] else None,
               modality_record([m["folder"] for m in members], case))
    return {"case": case}


def _check_members(members: list[dict]) -> None:
    first = members[0]
    for m in members[1:]:
        if m["dataset_json"]["labels"] != first["dataset_json"]["labels"]:
            raise InputError(f"{m['folder'] / 'dataset.json'}: labels differ from {first['folder'] / 'dataset.json'}")
        if m["cases"] != first["cases"]:
            missing = sorted(set(first["cases"]) ^ set(m["cases"]))[0]
            raise InputError(f"{m['folder']}: case {missing} is in one member folder but not in the other "
                             f"(compare {first['folder']})")
    for m in members:
        for case in m["cases"]:
            check_case_files(m, case, need_probabilities=True)


def ensemble_folders(input_dirs, output_dir, save_probabilities: bool = False, num_processes: int = 2) -> Path:
    """Pool several ``entrust predict --save_probabilities`` folders (e.g. 2d and 3d_fullres) with maps."""
    if len(input_dirs) < 2:
        raise InputError("-i: give at least two prediction folders to ensemble")
    members = [prediction_folder(d) for d in input_dirs]
    _check_members(members)
    with _output_folder(output_dir, [m["folder"] for m in members], members[0]["dataset_json"], members[0]["plans"],
                        "entrust ensemble") as out:
        jobs = [{"members": members, "case": c, "out": out, "save_probabilities": save_probabilities}
                for c in members[0]["cases"]]
        _run(_ensemble_case, jobs, num_processes)
        with atomic_file(out / "ensemble_members.json") as f:
            json.dump([str(m["folder"]) for m in members], f, indent=2)
    return out
