"""Maps in the mask's voxel order, whatever reader/writer the dataset names.

nnU-Net's reorienting reader/writers (``NibabelIOWithReorient``, ``SimpleITKIOWithReorient``) hand the network a RAS
array and write the mask back in the input file's own orientation. Float maps written with SimpleITK in the
network's array order would lie flipped or transposed over the mask of a non-RAS input (measured:
tests/nnunet/test_export_orientation.py). nnU-Net's writers write label images only, so rather than copying each
writer's reorientation, the dataset's own writer writes the voxel coordinates (one label image per array axis), and
the maps are gathered through them: whatever a writer does to a mask, it does to the maps.
"""
from __future__ import annotations

import os

import numpy as np
import SimpleITK as sitk
from nnunetv2.imageio.natural_image_reader_writer import NaturalImage2DIO
from nnunetv2.imageio.nibabel_reader_writer import NibabelIO
from nnunetv2.imageio.simpleitk_reader_writer import SimpleITKIO

from entrust_nnunet.data.io import InputError, temporary_sibling

#: writers whose files SimpleITK reads back in nnU-Net's array order (the subclasses that reorient are not these)
IN_ARRAY_ORDER = (SimpleITKIO, NibabelIO, NaturalImage2DIO)
#: the largest coordinate a label writer keeps (nnU-Net writes uint16 label images)
LARGEST_COORDINATE = np.iinfo(np.uint16).max


def written_voxel_order(writer, shape: tuple[int, ...], properties: dict, file_ending: str,
                        beside: str | os.PathLike) -> tuple[np.ndarray, ...] | None:
    """Per voxel of a file ``writer`` writes (in SimpleITK's array order, as :func:`SimpleITK.GetArrayFromImage`
    reads it), its index along each axis of nnU-Net's array of ``shape``: one coordinate image per axis written
    by ``writer.write_seg`` to a temporary file beside ``beside`` and read back. None where the writer keeps the
    array order (:data:`IN_ARRAY_ORDER`)."""
    if type(writer) in IN_ARRAY_ORDER:
        return None
    if max(shape) > LARGEST_COORDINATE:
        raise InputError(f"{beside}: an axis of {max(shape)} voxels is too long to follow "
                         f"{type(writer).__name__}'s reorientation (at most {LARGEST_COORDINATE})")
    order = []
    for axis, n in enumerate(shape):
        coordinate = np.arange(n, dtype=np.uint16).reshape([n if a == axis else 1 for a in range(len(shape))])
        with temporary_sibling(f"{beside}{file_ending}") as tmp:
            writer.write_seg(np.ascontiguousarray(np.broadcast_to(coordinate, shape)), str(tmp), properties)
            order.append(sitk.GetArrayFromImage(sitk.ReadImage(str(tmp))).astype(np.intp))
    return tuple(order)


def in_written_order(values: np.ndarray, order: tuple[np.ndarray, ...] | None, shape: tuple[int, ...]) -> np.ndarray:
    """``values`` (nnU-Net's array) in the voxel order of a written file of SimpleITK array ``shape``: gathered
    through ``order`` (:func:`written_voxel_order`), else the same voxels reshaped (2D: (1, H, W) -> (H, W))."""
    return values.reshape(shape) if order is None else values[order]


def in_array_order(written: np.ndarray, order: tuple[np.ndarray, ...] | None, shape: tuple[int, ...]) -> np.ndarray:
    """The inverse of :func:`in_written_order`: a written file's voxels (SimpleITK array order) in nnU-Net's array
    of ``shape``, where its reader puts the mask (``read_seg``) and nnU-Net keeps the class probabilities."""
    if order is None:
        return written.reshape(shape)
    out = np.empty(shape, dtype=written.dtype)
    out[order] = written
    return out
