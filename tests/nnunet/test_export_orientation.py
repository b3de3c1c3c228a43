"""Maps and hypotheses are written voxel for voxel over the mask, whatever reader/writer the dataset names.

nnU-Net's reorienting readers (NibabelIOWithReorient, SimpleITKIOWithReorient) hand the network a RAS array and
write the mask back in the file's own orientation; maps written in the network's array order would then lie
flipped or transposed over the mask of a non-RAS input.
"""
import json
import pickle
from pathlib import Path

import nibabel
import numpy as np
import pytest
import SimpleITK as sitk

from entrust_nnunet.data.io import MAP_NAMES

#: a non-RAS affine: axes permuted and two of them flipped (an LPS-like oblique-free scan)
AFFINE = np.array([[0.0, -1.0, 0.0, 10.0], [-1.0, 0.0, 0.0, 20.0], [0.0, 0.0, 1.0, -5.0], [0.0, 0.0, 0.0, 1.0]])


def _export(planned_phantoms, folder: Path, reader: str, save_probabilities: bool = False) -> None:
    """A non-RAS 3-channel input read with ``reader``, and a prediction of it exported into ``folder``: class 1 and
    every map (0.5) on an asymmetric block of the network's array, hypothesis 0 = that block, hypothesis 1 empty.
    Writes plans.json / dataset.json there as ``entrust predict`` does."""
    from nnunetv2.preprocessing.preprocessors.default_preprocessor import DefaultPreprocessor
    from nnunetv2.utilities.plans_handling.plans_handler import PlansManager

    from entrust_nnunet.nnunet.predictor import export_prediction_with_maps

    env, name = planned_phantoms
    pre = Path(env["nnUNet_preprocessed"]) / name
    dataset_json = json.loads((pre / "dataset.json").read_text())
    # what nnU-Net's planner writes when dataset.json says overwrite_image_reader_writer
    plans_dict = json.loads((pre / "nnUNetPlans.json").read_text()) | {"image_reader_writer": reader}
    plans = PlansManager(plans_dict)
    config = plans.get_configuration("2d")
    rng = np.random.default_rng(0)
    files = []
    folder.mkdir(parents=True)
    for c in range(len(dataset_json["channel_names"])):
        files.append(str(folder.parent / f"{folder.name}_input_{c:04d}.nii.gz"))
        nibabel.save(nibabel.Nifti1Image((rng.random((5, 7, 3)) + 1).astype(np.float32), AFFINE), files[-1])
    data, _, properties = DefaultPreprocessor(verbose=False).run_case(files, None, plans, config, dataset_json)
    pattern = np.zeros(data.shape[1:], dtype=np.float32)
    pattern[:, :2, :3] = 1
    pattern[0, 0, 0] = 0
    pattern[:, -1:, -1:] = 1  # a second, smaller component: what post-processing may remove
    logits = np.full((len(dataset_json["labels"]), *pattern.shape), -10, dtype=np.float32)
    logits[0], logits[1] = 10 * (1 - 2 * pattern), 10 * (2 * pattern - 1)
    maps = np.stack([pattern * 0.5] * len(MAP_NAMES))
    hypotheses = np.stack([pattern.astype(np.int64), np.zeros_like(pattern, dtype=np.int64)])
    export_prediction_with_maps(np.concatenate([logits, maps]), properties, config, plans, dataset_json,
                                str(folder / "case"), save_probabilities=save_probabilities, hypotheses=hypotheses)
    (folder / "plans.json").write_text(json.dumps(plans_dict))
    (folder / "dataset.json").write_text(json.dumps(dataset_json))


def _assert_maps_over_the_mask(folder: Path, maps=MAP_NAMES, lesion: np.ndarray | None = None) -> None:
    """The ``maps`` of ``folder`` exceed 0.25 exactly on ``lesion`` (default: its mask's label 1), same direction."""
    mask = sitk.ReadImage(str(folder / "case.nii.gz"))
    lesion = sitk.GetArrayFromImage(mask) == 1 if lesion is None else lesion
    assert 0 < lesion.sum() < lesion.size
    for map_name in maps:
        image = sitk.ReadImage(str(folder / "uncertainty" / f"case_{map_name}.nii.gz"))
        np.testing.assert_allclose(image.GetDirection(), mask.GetDirection(), atol=1e-6)
        np.testing.assert_array_equal(sitk.GetArrayFromImage(image) > 0.25, lesion, err_msg=map_name)


@pytest.mark.parametrize("reader", ["NibabelIOWithReorient", "SimpleITKIOWithReorient", "SimpleITKIO", "NibabelIO"])
def test_maps_and_hypotheses_lie_over_the_mask_for_every_reader(planned_phantoms, tmp_path, reader):
    out = tmp_path / "out"
    _export(planned_phantoms, out, reader)
    _assert_maps_over_the_mask(out)
    lesion = sitk.GetArrayFromImage(sitk.ReadImage(str(out / "case.nii.gz"))) == 1
    first = sitk.GetArrayFromImage(sitk.ReadImage(str(out / "hypotheses" / "case_h00.nii.gz")))
    np.testing.assert_array_equal(first == 1, lesion)
    assert not list(out.rglob(".tmp-*"))


@pytest.mark.parametrize("reader", ["NibabelIOWithReorient", "SimpleITKIOWithReorient"])
def test_ensemble_and_postprocess_keep_the_maps_over_the_mask(planned_phantoms, tmp_path, reader):
    """entrust ensemble and entrust postprocess read the maps back beside nnU-Net's reader's mask and class
    probabilities (the network's array layout) and write them in the mask's layout again: the component
    post-processing removes gets P(error) ~1 (the network's foreground probability there) right where it was."""
    from nnunetv2.postprocessing.remove_connected_components import remove_all_but_largest_component_from_segmentation

    from entrust_nnunet.nnunet.toolchain import ensemble_folders, postprocess_folder

    a, b = tmp_path / "a", tmp_path / "b"
    _export(planned_phantoms, a, reader, save_probabilities=True)
    _export(planned_phantoms, b, reader, save_probabilities=True)
    ensemble_folders([a, b], tmp_path / "ensemble", num_processes=1)
    _assert_maps_over_the_mask(tmp_path / "ensemble", ("aleatoric", "conflict"))
    pp = tmp_path / "postprocessing.pkl"
    pp.write_bytes(pickle.dumps(([remove_all_but_largest_component_from_segmentation], [{"labels_or_regions": 1}])))
    postprocess_folder(a, tmp_path / "pp", pp, num_processes=1)
    before = sitk.GetArrayFromImage(sitk.ReadImage(str(a / "case.nii.gz"))) == 1
    _assert_maps_over_the_mask(tmp_path / "pp", ("aleatoric", "conflict"), before)  # copied: the input's
    after = sitk.GetArrayFromImage(sitk.ReadImage(str(tmp_path / "pp" / "case.nii.gz"))) == 1
    removed = before & ~after
    assert removed.any() and after.any()
    total = sitk.GetArrayFromImage(sitk.ReadImage(str(tmp_path / "pp" / "uncertainty" / "case_total.nii.gz")))
    np.testing.assert_array_equal(total > 0.75, removed)
    assert not list(tmp_path.rglob(".tmp-*"))


def test_a_reorientation_is_found_as_axes_and_flips_and_anything_else_as_indices():
    """What a reorienting writer does to the coordinate images is read as an axis permutation with flips (no
    index arrays as large as the volume); a voxel shuffle falls back to per-voxel indices. Both round-trip."""
    from entrust_nnunet.nnunet.orientation import _permutation, in_array_order, in_written_order

    shape = (4, 5, 6)
    values = np.random.default_rng(0).random(shape)

    def written_by(transform):
        return [transform(np.broadcast_to(np.arange(n).reshape([n if a == i else 1 for a in range(3)]), shape))
                for i, n in enumerate(shape)]

    def reorient(x):
        return np.flip(np.transpose(x, (2, 0, 1)), 0)

    order = _permutation(shape, written_by(reorient))
    assert order is not None and order.index is None and order.axes == (2, 0, 1) and order.flips == (True, False, False)
    out = in_written_order(values, order, (6, 4, 5))
    np.testing.assert_array_equal(out, reorient(values))
    np.testing.assert_array_equal(in_array_order(out, order, shape), values)
    # a 2D case: nnU-Net's (1, H, W) written as (H, W) with the axes swapped
    flat = np.random.default_rng(1).random((1, 5, 6))
    order2 = _permutation((1, 5, 6), [np.zeros((6, 5)), np.broadcast_to(np.arange(5)[None, :], (6, 5)),
                                      np.broadcast_to(np.arange(6)[:, None], (6, 5))])
    np.testing.assert_array_equal(in_written_order(flat, order2, (6, 5)), flat[0].T)
    np.testing.assert_array_equal(in_array_order(flat[0].T, order2, (1, 5, 6)), flat)
    shuffled = written_by(lambda x: x.reshape(-1)[np.random.default_rng(2).permutation(x.size)].reshape(x.shape))
    assert _permutation(shape, shuffled) is None


def test_coordinates_longer_than_a_byte_survive_a_writer_that_writes_uint8(tmp_path):
    """SimpleITKIOWithReorient writes every label image as uint8: coordinates go in base-256 digits, so an axis of
    300 voxels is read back whole (a single uint16 image would wrap at 256 and scramble the maps)."""
    from entrust_nnunet.nnunet.orientation import written_voxel_order

    class Uint8Flipper:  # a reorienting writer that keeps only a byte per voxel, as SimpleITKIOWithReorient
        def write_seg(self, seg, output_fname, properties):
            sitk.WriteImage(sitk.GetImageFromArray(np.flip(seg, 2).astype(np.uint8)), output_fname)

    shape = (2, 3, 300)
    order = written_voxel_order(Uint8Flipper(), shape, {}, ".nii.gz", tmp_path / "case")
    assert order.index is None and order.axes == (0, 1, 2) and order.flips == (False, False, True)
    assert not list(tmp_path.iterdir())

    class Collapser(Uint8Flipper):  # a writer that writes some voxels twice: refused in one line
        def write_seg(self, seg, output_fname, properties):
            seg = seg.copy()
            seg[..., 1] = seg[..., 0]
            sitk.WriteImage(sitk.GetImageFromArray(seg.astype(np.uint8)), output_fname)

    from entrust_nnunet.data.io import InputError
    with pytest.raises(InputError, match="does not write each voxel of the array once"):
        written_voxel_order(Collapser(), (2, 3, 4), {}, ".nii.gz", tmp_path / "case")
