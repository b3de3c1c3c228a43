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
from nnunetv2.imageio.tif_reader_writer import Tiff3DIO

from entrust_nnunet.data.io import InputError, temporary_sibling

#: writers whose files SimpleITK reads back in nnU-Net's array order (the subclasses that reorient are not these)
IN_ARRAY_ORDER = (SimpleITKIO, NibabelIO, NaturalImage2DIO, Tiff3DIO)
#: the values every label writer keeps (SimpleITKIOWithReorient writes uint8): coordinates go in base-256 digits
DIGIT = 256


@dataclass(frozen=True)
class VoxelOrder:
    """Where a writer puts nnU-Net's array's voxels: its axes (those longer than 1) permuted and flipped
    (``axes[w]``: the array axis that becomes the file's w-th such axis; ``flips[w]``: reversed), what a
    reorientation does, or, for any other writer, per written voxel its index along each array axis
    (``index``)."""
    axes: tuple[int, ...] = ()
    flips: tuple[bool, ...] = ()
    index: tuple[np.ndarray, ...] | None = None

    @property
    def transpose(self) -> list[int]:
        """``np.transpose`` axes taking the array's long axes (numbered 0.. in the array's order once the length-1
        axes are dropped) into the file's order."""
        rank = {a: i for i, a in enumerate(sorted(self.axes))}
        return [rank[a] for a in self.axes]

    @property
    def flipped(self) -> list[int]:
        """The file's long axes that run backwards."""
        return [w for w, f in enumerate(self.flips) if f]


def written_voxel_order(writer, shape: tuple[int, ...], properties: dict, file_ending: str,
                        beside: str | os.PathLike) -> VoxelOrder | None:
    """Where ``writer`` puts the voxels of nnU-Net's array of ``shape`` (in SimpleITK's array order, as
    :func:`SimpleITK.GetArrayFromImage` reads its file): one coordinate image per array axis written by
    ``writer.write_seg`` to a temporary file beside ``beside`` and read back. None where the writer keeps the
    array order (:data:`IN_ARRAY_ORDER`)."""
    if type(writer) in IN_ARRAY_ORDER:
        return None
    written = [_written_coordinate(writer, shape, axis, properties, f"{beside}{file_ending}")
               for axis in range(len(shape))]
    order = _permutation(shape, written)
    if order is not None:
        return order
    index = tuple(w.astype(np.intp) for w in written)
    flat = np.ravel_multi_index(index, shape, mode="clip").ravel()
    if flat.size != int(np.prod(shape)) or not np.all(np.bincount(flat, minlength=flat.size) == 1):
        raise InputError(f"{beside}{file_ending}: {type(writer).__name__} does not write each voxel of the array "
                         "once, so the uncertainty maps cannot follow its masks")
    return VoxelOrder(index=index)


def _written_coordinate(writer, shape: tuple[int, ...], axis: int, properties: dict, path: str) -> np.ndarray:
    """The coordinate along ``axis`` of every voxel of nnU-Net's array of ``shape``, as ``writer`` writes it and
    SimpleITK reads it back; written as base-:data:`DIGIT` digits, each a label image of values below 256."""
    n = shape[axis]
    coordinate = np.arange(n).reshape([n if a == axis else 1 for a in range(len(shape))])
    value, scale = np.zeros((), dtype=np.int32), 1  # int32: the transient copies stay 4 bytes a voxel
    while True:
        digit = (coordinate // scale) % DIGIT
        with temporary_sibling(path) as tmp:
            writer.write_seg(np.ascontiguousarray(np.broadcast_to(digit, shape), dtype=np.uint8), str(tmp), properties)
            value = value + scale * sitk.GetArrayFromImage(sitk.ReadImage(str(tmp))).astype(np.int32)
        scale *= DIGIT
        if scale >= n:
            return value


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
        ramp = np.arange(shape[a])
        for i in range(image.ndim):
            line = image[tuple(slice(None) if j == i else 0 for j in range(image.ndim))].astype(np.int64)
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
    moved = np.flip(np.transpose(long_values, order.transpose), order.flipped)
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
    back = np.transpose(np.flip(long_written, order.flipped), np.argsort(order.transpose))
    return np.ascontiguousarray(back).reshape(shape)
