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
from dataclasses import dataclass

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


@dataclass(frozen=True)
class VoxelOrder:
    """Where a writer puts nnU-Net's array's voxels: its axes (those longer than 1) permuted and flipped
    (``axes[w]``: the array axis that becomes the file's w-th such axis; ``flips[w]``: reversed), what a
    reorientation does, or, for any other writer, per written voxel its index along each array axis
    (``index``)."""
    axes: tuple[int, ...] = ()
    flips: tuple[bool, ...] = ()
    index: tuple[np.ndarray, ...] | None = None


def written_voxel_order(writer, shape: tuple[int, ...], properties: dict, file_ending: str,
                        beside: str | os.PathLike) -> VoxelOrder | None:
    """Where ``writer`` puts the voxels of nnU-Net's array of ``shape`` (in SimpleITK's array order, as
    :func:`SimpleITK.GetArrayFromImage` reads its file): one coordinate image per array axis written by
    ``writer.write_seg`` to a temporary file beside ``beside`` and read back. None where the writer keeps the
    array order (:data:`IN_ARRAY_ORDER`)."""
    if type(writer) in IN_ARRAY_ORDER:
        return None
    if max(shape) > LARGEST_COORDINATE:
        raise InputError(f"{beside}: an axis of {max(shape)} voxels is too long to follow "
                         f"{type(writer).__name__}'s reorientation (at most {LARGEST_COORDINATE})")
    written = []
    for axis, n in enumerate(shape):
        coordinate = np.arange(n, dtype=np.uint16).reshape([n if a == axis else 1 for a in range(len(shape))])
        with temporary_sibling(f"{beside}{file_ending}") as tmp:
            writer.write_seg(np.ascontiguousarray(np.broadcast_to(coordinate, shape)), str(tmp), properties)
            written.append(sitk.GetArrayFromImage(sitk.ReadImage(str(tmp))).astype(np.uint16, copy=False))
    return _permutation(shape, written) or VoxelOrder(index=tuple(w.astype(np.intp) for w in written))


def _permutation(shape: tuple[int, ...], written: list[np.ndarray]) -> VoxelOrder | None:
    """The axis permutation and flips the coordinate images ``written`` show, if they are one (checked voxel for
    voxel); None otherwise."""
    long_axes = [a for a, n in enumerate(shape) if n > 1]
    file_axes = [w for w, n in enumerate(written[0].shape) if n > 1]
    if len(long_axes) != len(file_axes):
        return None
    axes, flips = [None] * len(file_axes), [False] * len(file_axes)
    for a in long_axes:
        image = written[a].reshape([written[a].shape[w] for w in file_axes])
        for i in range(image.ndim):
            line = image[tuple(slice(None) if j == i else 0 for j in range(image.ndim))].astype(np.int64)
            ramp = np.arange(shape[a])
            if axes[i] is None and line.size == shape[a] and (np.array_equal(line, ramp) or
                                                               np.array_equal(line, ramp[::-1])):
                view = [1] * image.ndim
                view[i] = -1
                if np.array_equal(image, np.broadcast_to(line.reshape(view), image.shape)):
                    axes[i], flips[i] = a, bool(line[0] != 0)
                    break
        else:
            return None
    return VoxelOrder(axes=tuple(axes), flips=tuple(flips))


def in_written_order(values: np.ndarray, order: VoxelOrder | None, shape: tuple[int, ...]) -> np.ndarray:
    """``values`` (nnU-Net's array) in the voxel order of a written file of SimpleITK array ``shape``
    (:func:`written_voxel_order`; None: the same voxels reshaped, 2D: (1, H, W) -> (H, W))."""
    if order is None:
        return values.reshape(shape)
    if order.index is not None:
        return values[order.index]
    long_values = values.reshape([n for n in values.shape if n > 1])
    # the array's long axes in the order of the file's: np.squeeze numbers them 0.. in the array's order
    rank = {a: i for i, a in enumerate(sorted(order.axes))}
    moved = np.transpose(long_values, [rank[a] for a in order.axes])
    moved = np.flip(moved, [w for w, f in enumerate(order.flips) if f])
    return np.ascontiguousarray(moved).reshape(shape)


def in_array_order(written: np.ndarray, order: VoxelOrder | None, shape: tuple[int, ...]) -> np.ndarray:
    """The inverse of :func:`in_written_order`: a written file's voxels (SimpleITK array order) in nnU-Net's array
    of ``shape``, where its reader puts the mask (``read_seg``) and nnU-Net keeps the class probabilities."""
    if order is None:
        return written.reshape(shape)
    if order.index is not None:
        out = np.empty(shape, dtype=written.dtype)
        out[order.index] = written
        return out
    long_written = written.reshape([n for n in written.shape if n > 1])
    unflipped = np.flip(long_written, [w for w, f in enumerate(order.flips) if f])
    rank = {a: i for i, a in enumerate(sorted(order.axes))}
    back = np.transpose(unflipped, np.argsort([rank[a] for a in order.axes]))
    return np.ascontiguousarray(back).reshape(shape)
