"""entrust convert: BraTS 2020/2021 + 2023, per-case folders (with a DICOM series), MSD delegation, and
one CLI test per kind of bad input (exit 2, one line naming the file, nothing left behind, source untouched)."""
import gzip
import hashlib
import json
import os
import shutil

import numpy as np
import pytest
import SimpleITK as sitk

from entrust_nnunet.cli import main
from entrust_nnunet.data.convert import convert_brats, convert_folder
from entrust_nnunet.data.io import read_image

SHAPE = (6, 8, 8)  # numpy z, y, x
SPACING = (0.9, 1.1, 2.5)  # SimpleITK x, y, z: anisotropic
ORIGIN = (-12.5, 30.25, 4.0)
_C, _S = np.cos(np.deg2rad(20.0)), np.sin(np.deg2rad(20.0))
DIRECTION = (_C, -_S, 0.0, _S, _C, 0.0, 0.0, 0.0, 1.0)  # rotated about z

BRATS = {  # layout -> separator, modality keys in channel order T1, T1ce, T2, FLAIR, seg values, case name
    "2020": ("_", ("t1", "t1ce", "t2", "flair"), (0, 1, 2, 4), "BraTS20_Training_{:03d}"),
    "2023": ("-", ("t1n", "t1c", "t2w", "t2f"), (0, 1, 2, 3), "BraTS-GLI-{:05d}-000"),
}
# seg slice z holds the z-th BraTS value; nnU-Net wants 1 edema (BraTS 2), 2 NCR (BraTS 1), 3 ET (BraTS 4 / 3)
EXPECTED_SLICES = (0, 2, 1, 3, 0, 0)
FOLDER_MODALITIES = ("T1", "T2", "FLAIR")


@pytest.fixture(autouse=True)
def _clean_env(monkeypatch):
    for var in ("nnUNet_raw", "nnUNet_preprocessed", "nnUNet_results"):
        monkeypatch.delenv(var, raising=False)


# ------------------------------------------------------------------------------------------------ helpers


def _image(arr, spacing=SPACING, origin=ORIGIN, direction=DIRECTION):
    img = sitk.GetImageFromArray(arr, isVector=False)  # a 4D array is a 4D image, not a vector image
    img.SetSpacing(spacing)
    img.SetOrigin(origin)
    img.SetDirection(direction)
    return img


def _write(arr, path, **geometry):
    sitk.WriteImage(_image(arr, **geometry), str(path), useCompression=str(path).endswith(".gz"))


def _value(case, channel):
    """Constant intensity that identifies (case, source channel) in the output."""
    return 100.0 * (channel + 1) + case


def _channel(case, channel, dtype=np.float32):
    return np.full(SHAPE, _value(case, channel), dtype)


def _seg(values):
    arr = np.zeros(SHAPE, np.uint8)
    for z, v in enumerate(values):
        arr[z] = v
    return arr


def write_dicom_series(image, folder):
    """A 3D int16 image as one 2D DICOM file per slice, with the geometry tags GDCM reads back."""
    folder.mkdir(parents=True)
    writer = sitk.ImageFileWriter()
    writer.KeepOriginalImageUIDOn()
    d, sp = image.GetDirection(), image.GetSpacing()
    series_uid, study_uid = "1.2.826.0.1.3680043.2.1125.7.1", "1.2.826.0.1.3680043.2.1125.7.2"
    common = {
        "0008|0008": "DERIVED\\SECONDARY", "0008|0060": "MR", "0008|0021": "20240101", "0008|0031": "120000",
        "0008|103e": "FLAIR", "0020|000d": study_uid, "0020|000e": series_uid,
        "0020|0037": "\\".join(f"{v:.8f}" for v in (d[0], d[3], d[6], d[1], d[4], d[7])),
        "0028|0030": f"{sp[1]:.6f}\\{sp[0]:.6f}", "0018|0050": f"{sp[2]:.6f}",
    }
    for z in range(image.GetDepth()):
        sl = image[:, :, z]
        for tag, value in common.items():
            sl.SetMetaData(tag, value)
        sl.SetMetaData("0020|0032", "\\".join(f"{v:.6f}" for v in image.TransformIndexToPhysicalPoint((0, 0, z))))
        sl.SetMetaData("0020|0013", str(z + 1))
        sl.SetMetaData("0008|0018", f"{series_uid}.{z + 1}")
        writer.SetFileName(str(folder / f"IM{z:04d}.dcm"))
        writer.Execute(sl)


def make_brats(root, layout="2020", labelled=2, unlabelled=1):
    sep, keys, seg_values, pattern = BRATS[layout]
    root.mkdir(parents=True, exist_ok=True)
    (root / "name_mapping.csv").write_text("a,b\n")  # top-level files are not cases
    for i in range(labelled + unlabelled):
        case = pattern.format(i)
        (root / case).mkdir()
        for c, key in reversed(list(enumerate(keys))):  # file order must not matter
            _write(_channel(i, c), root / case / f"{case}{sep}{key}.nii.gz")
        if i < labelled:
            _write(_seg(seg_values), root / case / f"{case}{sep}seg.nii.gz")
    return root


def make_folder(root, cases=3, labelled=2):
    """T1 as .nii.gz, t2 as .nrrd, FLAIR as a DICOM series folder ``Flair/``; labels {0,1,2} (label.nii.gz) and
    {0,1} (Label.mha); the last case is unlabelled."""
    for i in range(cases):
        d = root / f"case{i}"
        d.mkdir(parents=True)
        _write(_channel(i, 0), d / "T1.nii.gz")
        _write(_channel(i, 1), d / "t2.nrrd")
        write_dicom_series(_image(_channel(i, 2, np.int16)), d / "Flair")
        if i == 2:  # a valid gzip stream of two members (as parallel compressors write): accepted
            data = gzip.decompress((d / "T1.nii.gz").read_bytes())
            (d / "T1.nii.gz").write_bytes(gzip.compress(data[:200]) + gzip.compress(data[200:]))
        if i == 0:
            _write(_seg((0, 1, 2, 1)), d / "label.nii.gz")
        elif i < labelled:
            _write(_seg((0, 1)), d / "Label.mha")
    return root


def make_msd(root, name="Task09_Tiny"):
    """MSD layout: 4D images (2 channels) in imagesTr/imagesTs, 3D labels, MSD-style dataset.json."""
    task = root / name
    for sub in ("imagesTr", "labelsTr", "imagesTs"):
        (task / sub).mkdir(parents=True)
    direction4 = np.eye(4)
    direction4[:3, :3] = np.array(DIRECTION).reshape(3, 3)
    geometry4 = dict(spacing=SPACING + (1.0,), origin=ORIGIN + (0.0,), direction=tuple(direction4.ravel()))
    for i, split in enumerate(("imagesTr", "imagesTr", "imagesTs")):
        _write(np.stack([_channel(i, c) for c in range(2)]), task / split / f"tiny_{i:03d}.nii.gz", **geometry4)
        if split == "imagesTr":
            _write(_seg((0, 1, 2)), task / "labelsTr" / f"tiny_{i:03d}.nii.gz")
    meta = {"name": "Tiny", "description": "test", "tensorImageSize": "4D", "modality": {"0": "T2", "1": "ADC"},
            "labels": {"0": "background", "1": "PZ", "2": "TZ"}, "numTraining": 2, "numTest": 1,
            "training": [{"image": f"./imagesTr/tiny_{i:03d}.nii.gz", "label": f"./labelsTr/tiny_{i:03d}.nii.gz"}
                         for i in range(2)],
            "test": ["./imagesTs/tiny_002.nii.gz"]}
    (task / "dataset.json").write_text(json.dumps(meta))
    return task


def tree_digest(root):
    """Checksum of every path, mode and byte under ``root``."""
    h = hashlib.sha256()
    if root.exists():
        for p in sorted(root.rglob("*")):
            h.update(str(p.relative_to(root)).encode() + oct(p.stat().st_mode).encode())
            if p.is_file():
                h.update(p.read_bytes())
    return h.hexdigest()


def assert_geometry(path, spacing=SPACING, origin=ORIGIN, direction=DIRECTION):
    img = sitk.ReadImage(str(path))
    np.testing.assert_allclose(img.GetSpacing(), spacing, rtol=1e-5)
    np.testing.assert_allclose(img.GetOrigin(), origin, atol=1e-4)
    np.testing.assert_allclose(img.GetDirection(), direction, atol=1e-5)
    return sitk.GetArrayFromImage(img)


def one_error_line(rc, capsys):
    assert rc == 2
    lines = capsys.readouterr().err.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith("entrust: error: "), lines
    return lines[0]


def assert_nothing_left(root):
    if root.exists():
        assert not [p.name for p in root.iterdir() if p.name.startswith(("Dataset", ".tmp-", ".trash-"))]


def verify_with_nnunet(folder):
    from nnunetv2.experiment_planning.verify_dataset_integrity import verify_dataset_integrity

    verify_dataset_integrity(str(folder), num_processes=1)  # raises on any problem


# ------------------------------------------------------------------------------------------------ DICOM


def test_dicom_series_round_trips_through_read_image(tmp_path):
    arr = (np.arange(np.prod(SHAPE)).reshape(SHAPE) * 7 - 300).astype(np.int16)
    write_dicom_series(_image(arr), tmp_path / "series")
    assert len(list((tmp_path / "series").glob("*.dcm"))) == SHAPE[0]
    img = read_image(tmp_path / "series")
    assert img.GetSize() == SHAPE[::-1]
    np.testing.assert_array_equal(sitk.GetArrayFromImage(img), arr)
    np.testing.assert_allclose(img.GetSpacing(), SPACING, rtol=1e-5)
    np.testing.assert_allclose(img.GetOrigin(), ORIGIN, atol=1e-4)
    np.testing.assert_allclose(img.GetDirection(), DIRECTION, atol=1e-6)


# ------------------------------------------------------------------------------------------------ BraTS


@pytest.mark.parametrize("layout", ["2020", "2023"])
def test_brats_channels_labels_regions_geometry(tmp_path, layout):
    src = make_brats(tmp_path / "src", layout)
    before = tree_digest(src)
    out = convert_brats(src, 11, raw_root=tmp_path / "raw")
    assert out == tmp_path / "raw" / "Dataset011_BraTS"
    assert tree_digest(src) == before
    dj = json.loads((out / "dataset.json").read_text())
    assert dj["channel_names"] == {"0": "T1", "1": "T1ce", "2": "T2", "3": "FLAIR"}
    assert dj["labels"] == {"background": 0, "whole tumor": [1, 2, 3], "tumor core": [2, 3], "enhancing tumor": 3}
    assert dj["regions_class_order"] == [1, 2, 3] and dj["numTraining"] == 2 and dj["file_ending"] == ".nii.gz"
    pattern = BRATS[layout][3]
    for i in range(3):
        case = pattern.format(i)
        split = "imagesTr" if i < 2 else "imagesTs"
        for c in range(4):  # channel c holds the value written for source modality c (T1, T1ce, T2, FLAIR)
            arr = assert_geometry(out / split / f"{case}_{c:04d}.nii.gz")
            assert np.all(arr == _value(i, c))
        if i < 2:
            seg = assert_geometry(out / "labelsTr" / f"{case}.nii.gz")
            assert [int(seg[z].max()) for z in range(SHAPE[0])] == list(EXPECTED_SLICES)
            assert all(np.unique(seg[z]).size == 1 for z in range(SHAPE[0]))
    assert sorted(p.name for p in (out / "imagesTs").iterdir()) == [f"{pattern.format(2)}_{c:04d}.nii.gz"
                                                                    for c in range(4)]
    assert not (out / "labelsTr" / f"{pattern.format(2)}.nii.gz").exists()
    assert not list((tmp_path / "raw").glob(".tmp-*"))
    if layout == "2020":
        verify_with_nnunet(out)


# ------------------------------------------------------------------------------------------------ folder


def test_folder_layout_with_dicom_nrrd_and_mha(tmp_path):
    src = make_folder(tmp_path / "src")
    before = tree_digest(src)
    out = convert_folder(src, 12, FOLDER_MODALITIES, raw_root=tmp_path / "raw", name="Multi")
    assert out.name == "Dataset012_Multi" and tree_digest(src) == before
    dj = json.loads((out / "dataset.json").read_text())
    assert dj["channel_names"] == {"0": "T1", "1": "T2", "2": "FLAIR"}
    assert dj["labels"] == {"background": 0, "label_1": 1, "label_2": 2} and dj["numTraining"] == 2
    for i, split in enumerate(("imagesTr", "imagesTr", "imagesTs")):
        for c in range(3):
            arr = assert_geometry(out / split / f"case{i}_{c:04d}.nii.gz")
            assert np.all(arr == _value(i, c))
    flair = sitk.ReadImage(str(out / "imagesTr" / "case0_0002.nii.gz"))
    assert flair.GetPixelID() == sitk.sitkInt16  # DICOM pixel type kept
    np.testing.assert_array_equal(assert_geometry(out / "labelsTr" / "case0.nii.gz"), _seg((0, 1, 2, 1)))
    np.testing.assert_array_equal(assert_geometry(out / "labelsTr" / "case1.nii.gz"), _seg((0, 1)))
    assert not (out / "labelsTr" / "case2.nii.gz").exists()
    verify_with_nnunet(out)


def test_geometry_within_tolerance_is_written_as_the_first_channels(tmp_path):
    """A second channel and a label whose spacing and origin differ from the first channel's in the fifth digit
    (DICOM series of one session) pass our check and are written with the first channel's geometry exactly, so
    that nnU-Net's stricter check (np.allclose) accepts the dataset."""
    src = tmp_path / "src"
    (src / "case0").mkdir(parents=True)
    near = {"spacing": tuple(v * (1 + 5e-5) for v in SPACING), "origin": tuple(v + 2e-5 for v in ORIGIN)}
    _write(_channel(0, 0), src / "case0" / "T1.nii.gz")
    _write(_channel(0, 1), src / "case0" / "T2.nii.gz", **near)
    _write(_seg((0, 1, 2)), src / "case0" / "label.nii.gz", **near)
    out = convert_folder(src, 13, ("T1", "T2"), raw_root=tmp_path / "raw", name="Near")
    first = sitk.ReadImage(str(out / "imagesTr" / "case0_0000.nii.gz"))
    for f in (out / "imagesTr" / "case0_0001.nii.gz", out / "labelsTr" / "case0.nii.gz"):
        img = sitk.ReadImage(str(f))
        assert img.GetSpacing() == first.GetSpacing() and img.GetOrigin() == first.GetOrigin()
        assert img.GetDirection() == first.GetDirection()
    assert np.all(sitk.GetArrayFromImage(sitk.ReadImage(str(out / "imagesTr" / "case0_0001.nii.gz"))) == _value(0, 1))
    verify_with_nnunet(out)


# ------------------------------------------------------------------------------------------------ MSD


def test_msd_delegates_to_nnunet_and_honours_ids(tmp_path, monkeypatch, capsys):
    task = make_msd(tmp_path / "msd")
    raw = tmp_path / "raw"
    monkeypatch.setenv("nnUNet_raw", str(raw))
    before = tree_digest(task)
    assert main(["convert", "msd", str(task), "-np", "1"]) == 0
    out = raw / "Dataset009_Tiny"
    assert str(out) in capsys.readouterr().out
    dj = json.loads((out / "dataset.json").read_text())
    assert dj["channel_names"] == {"0": "T2", "1": "ADC"} and dj["file_ending"] == ".nii.gz"
    assert dj["labels"] == {"background": 0, "PZ": 1, "TZ": 2} and "training" not in dj
    for i, split in enumerate(("imagesTr", "imagesTr", "imagesTs")):
        for c in range(2):
            arr = assert_geometry(out / split / f"tiny_{i:03d}_{c:04d}.nii.gz")
            assert np.all(arr == _value(i, c))
    assert sorted(p.name for p in (out / "labelsTr").iterdir()) == ["tiny_000.nii.gz", "tiny_001.nii.gz"]
    assert not any(p.name.startswith(".") for p in out.rglob("*"))  # no staging folder left inside
    verify_with_nnunet(out)
    # taken id refused, --overwrite replaces, -d picks another id
    line = one_error_line(main(["convert", "msd", str(task), "-np", "1"]), capsys)
    assert str(out) in line and "already taken" in line
    (out / "marker").write_text("old")
    assert main(["convert", "msd", str(task), "-np", "1", "--overwrite"]) == 0
    assert not (out / "marker").exists()
    assert main(["convert", "msd", str(task), "-d", "42", "-np", "1"]) == 0
    assert (raw / "Dataset042_Tiny" / "imagesTr" / "tiny_001_0001.nii.gz").exists()
    assert sorted(p.name for p in raw.iterdir()) == ["Dataset009_Tiny", "Dataset042_Tiny"]
    assert tree_digest(task) == before


def _msd_no_raw(task, monkeypatch):
    monkeypatch.delenv("nnUNet_raw")
    return "nnUNet_raw is not set"


def _msd_no_json(task, monkeypatch):
    (task / "dataset.json").unlink()
    return str(task / "dataset.json")


def _msd_corrupt(task, monkeypatch):
    (task / "imagesTr" / "tiny_001.nii.gz").write_bytes(b"definitely not gzip" * 10)
    return str(task / "imagesTr" / "tiny_001.nii.gz")


def _msd_truncated(task, monkeypatch):
    path = task / "imagesTs" / "tiny_002.nii.gz"
    data = path.read_bytes()
    path.write_bytes(data[:-9])
    return str(path)


def _msd_missing_label(task, monkeypatch):
    (task / "labelsTr" / "tiny_000.nii.gz").unlink()
    return str(task / "labelsTr" / "tiny_000.nii.gz")


@pytest.mark.parametrize("mutate", [_msd_no_raw, _msd_no_json, _msd_corrupt, _msd_truncated, _msd_missing_label],
                         ids=lambda f: f.__name__[5:])
def test_msd_bad_input(tmp_path, monkeypatch, capsys, mutate):
    task = make_msd(tmp_path / "msd")
    raw = tmp_path / "raw"
    monkeypatch.setenv("nnUNet_raw", str(raw))
    expected = mutate(task, monkeypatch)
    before = tree_digest(task)
    line = one_error_line(main(["convert", "msd", str(task), "-np", "1"]), capsys)
    assert expected in line
    assert_nothing_left(raw)
    assert tree_digest(task) == before


# ------------------------------------------------------------------------------------------------ bad input
# each mutation damages a freshly built source and returns the texts the one-line error must contain


def _brats_case(src, i=1, layout="2020"):
    sep, keys, _, pattern = BRATS[layout]
    return src / pattern.format(i), pattern.format(i), sep


def _missing_modality(src):
    folder, case, sep = _brats_case(src)
    (folder / f"{case}{sep}t2.nii.gz").unlink()
    return [str(folder), f"{case}{sep}t2.*", "missing"]


def _extra_modality(src):
    _write(_channel(0, 3), src / "case0" / "T3.nii.gz")
    return [str(src / "case0"), "T3.nii.gz", "extra"]


def _duplicate_modality(src):
    _write(_channel(0, 0), src / "case0" / "t1.mha")
    return [str(src / "case0"), "t1.mha"]


def _geometry_mismatch(src):
    folder, case, sep = _brats_case(src, 0)
    path = folder / f"{case}{sep}flair.nii.gz"
    _write(_channel(0, 3), path, origin=(0.0, 0.0, 0.0))
    return [str(path), case, "origin"]


def _label_geometry_mismatch(src):
    path = src / "case1" / "Label.mha"
    _write(_seg((0, 1)), path, spacing=(1.0, 1.0, 1.0))
    return [str(path), "spacing"]


def _corrupt_image(src):
    path = src / "case1" / "T1.nii.gz"
    path.write_bytes(os.urandom(64) + b"garbage" * 20)
    return [str(path), "corrupt"]


def _truncated_image(src):
    """An interrupted download: ITK would read the missing half as zeros without a word."""
    folder, case, sep = _brats_case(src, 0)
    path = folder / f"{case}{sep}t1.nii.gz"
    _write(np.random.default_rng(0).normal(size=SHAPE).astype(np.float32), path)
    data = path.read_bytes()
    path.write_bytes(data[:len(data) // 2])
    return [str(path), "corrupt"]


def _undeclared_label(src):
    folder, case, sep = _brats_case(src, 0)
    path = folder / f"{case}{sep}seg.nii.gz"
    _write(_seg((0, 1, 3, 5)), path)
    return [str(path), "[3, 5]"]


def _nan_image(src):
    folder, case, sep = _brats_case(src, 1)
    path = folder / f"{case}{sep}t1ce.nii.gz"
    arr = _channel(1, 1)
    arr[2, 3, 4] = np.nan
    _write(arr, path)
    return [str(path), "NaN"]


def _label_gap(src):
    path = src / "case0" / "label.nii.gz"
    _write(_seg((0, 3, 1)), path)  # 0, 1, 3 over the dataset: 2 is missing
    return [str(path), "label 3", "label 2"]


def _mixed_brats_layouts(src):
    other = make_brats(src.parent / "other", "2023", labelled=1, unlabelled=0)
    moved = next(p for p in other.iterdir() if p.is_dir())
    moved.rename(src / moved.name)
    return [str(src / moved.name), "BraTS 2023", "BraTS 2020/2021"]


def _not_brats(src):
    (src / "stray_case").mkdir()
    _write(_channel(0, 0), src / "stray_case" / "image.nii.gz")
    return [str(src / "stray_case"), "no BraTS files"]


def _empty_source(src):
    for p in src.iterdir():
        if p.is_dir():
            shutil.rmtree(p)
    return [str(src), "no case folders"]


BAD_INPUTS = [("brats", _missing_modality), ("folder", _extra_modality), ("folder", _duplicate_modality),
              ("brats", _geometry_mismatch), ("folder", _label_geometry_mismatch), ("folder", _corrupt_image),
              ("brats", _truncated_image), ("brats", _undeclared_label), ("brats", _nan_image),
              ("folder", _label_gap), ("brats", _mixed_brats_layouts), ("brats", _not_brats),
              ("folder", _empty_source)]


def _cli(kind, src, raw, *extra):
    if kind == "brats":
        return ["convert", "brats", str(src), "-d", "5", "-o", str(raw), *extra]
    return ["convert", "folder", str(src), "-d", "5", "-o", str(raw), "--modalities", ",".join(FOLDER_MODALITIES),
            *extra]


@pytest.mark.parametrize("kind,mutate", BAD_INPUTS, ids=[f.__name__.strip("_") for _, f in BAD_INPUTS])
def test_bad_input_fails_cleanly(tmp_path, capsys, kind, mutate):
    src = make_brats(tmp_path / "src") if kind == "brats" else make_folder(tmp_path / "src")
    expected = mutate(src)
    raw = tmp_path / "raw"
    before = tree_digest(src)
    line = one_error_line(main(_cli(kind, src, raw)), capsys)
    for text in expected:
        assert text in line, (text, line)
    assert_nothing_left(raw)
    assert tree_digest(src) == before


def test_missing_source_fails_cleanly(tmp_path, capsys):
    line = one_error_line(main(_cli("brats", tmp_path / "nope", tmp_path / "raw")), capsys)
    assert str(tmp_path / "nope") in line and "does not exist" in line
    assert_nothing_left(tmp_path / "raw")


def test_dataset_id_taken_in_preprocessed(tmp_path, capsys, monkeypatch):
    """nnU-Net resolves ids over raw, preprocessed and results: an id used there is taken too."""
    src = make_brats(tmp_path / "src", labelled=1, unlabelled=0)
    other = tmp_path / "pre" / "Dataset005_Other"
    other.mkdir(parents=True)
    monkeypatch.setenv("nnUNet_preprocessed", str(tmp_path / "pre"))
    line = one_error_line(main(_cli("brats", src, tmp_path / "raw", "--overwrite")), capsys)
    assert str(other) in line and "already taken" in line
    assert_nothing_left(tmp_path / "raw")


def test_dataset_id_taken_and_overwrite(tmp_path, capsys):
    src = make_brats(tmp_path / "src")
    raw = tmp_path / "raw"
    assert main(_cli("brats", src, raw)) == 0
    out = raw / "Dataset005_BraTS"
    capsys.readouterr()
    first, source = tree_digest(out), tree_digest(src)
    line = one_error_line(main(_cli("brats", src, raw)), capsys)
    assert str(out) in line and "--overwrite" in line
    # the id is taken even under another name, --overwrite or not
    line = one_error_line(main(_cli("brats", src, raw, "--name", "Other", "--overwrite")), capsys)
    assert str(out) in line and "already taken" in line
    assert tree_digest(out) == first and tree_digest(src) == source
    assert sorted(p.name for p in raw.iterdir()) == ["Dataset005_BraTS"]
    # --overwrite replaces the dataset with the new conversion (here: without the unlabelled case)
    shutil.rmtree(src / BRATS["2020"][3].format(2))
    assert main(_cli("brats", src, raw, "--overwrite")) == 0
    assert not (out / "imagesTs").exists() and len(list((out / "imagesTr").iterdir())) == 8
    assert sorted(p.name for p in raw.iterdir()) == ["Dataset005_BraTS"]  # no .tmp-* / .trash-* left


@pytest.mark.parametrize("how", ["parent-is-a-file", "chmod-555"])
def test_unwritable_output_root(tmp_path, capsys, how):
    src = make_brats(tmp_path / "src", labelled=1, unlabelled=0)
    if how == "parent-is-a-file":
        (tmp_path / "blocker").write_text("a file, so nothing can be created below it, not even by root")
        raw = tmp_path / "blocker" / "raw"
    else:
        raw = tmp_path / "ro"
        raw.mkdir()
        raw.chmod(0o555)
        if os.access(raw, os.W_OK):
            raw.chmod(0o755)
            pytest.skip("running as root: a read-only mode does not stop writes")
    before = tree_digest(src)
    try:
        line = one_error_line(main(_cli("brats", src, raw)), capsys)
    finally:
        if raw.is_dir():
            raw.chmod(0o755)
    assert str(raw) in line
    assert_nothing_left(raw)
    assert tree_digest(src) == before


def test_output_inside_source_is_refused(tmp_path, capsys):
    src = make_brats(tmp_path / "src", labelled=1, unlabelled=0)
    before = tree_digest(src)
    line = one_error_line(main(_cli("brats", src, src / "raw")), capsys)
    assert "overlaps the source" in line
    assert tree_digest(src) == before
