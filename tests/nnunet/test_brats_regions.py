"""The BraTS path end to end (issue 13's "Done when"): a tiny BraTS 2021-layout dataset (3D, four modalities,
labels 0/1/2/4) -> ``entrust convert brats`` -> ``entrust plan`` -> stock ``nnUNetv2_train`` of a tiny EnTrust
variant (region-based: whole tumor, tumor core, enhancing tumor) -> ``entrust predict`` -> ``entrust evaluate``
per region; and a region dataset that nnU-Net rejects."""
import json
import os
import subprocess
from pathlib import Path

import numpy as np
import pytest
import SimpleITK as sitk
from conftest import nnunet_bin

from entrust_nnunet.data.io import MAP_NAMES
from entrust_nnunet.nnunet.env import ensure_ext_trainer, set_nnunet_roots

DATASET_ID = 961
SIZE = 24  # voxels per side
SPACING = (1.0, 1.0, 1.5)
ORIGIN = (-20.0, 11.5, 3.25)
_C, _S = np.cos(np.deg2rad(15.0)), np.sin(np.deg2rad(15.0))
DIRECTION = (_C, -_S, 0.0, _S, _C, 0.0, 0.0, 0.0, 1.0)
TRAINER = "nnUNetTrainerEnTrust_1epochCPU"
#: nnU-Net's region conversion of BraTS (labels after conversion: 1 edema, 2 necrosis, 3 enhancing)
REGIONS = {"whole tumor": (1, 2, 3), "tumor core": (2, 3), "enhancing tumor": (3,)}


def _write(arr, path):
    img = sitk.GetImageFromArray(arr)
    img.SetSpacing(SPACING)
    img.SetOrigin(ORIGIN)
    img.SetDirection(DIRECTION)
    sitk.WriteImage(img, str(path), useCompression=True)


def make_brats_2021(root: Path, cases: int = 6) -> Path:
    """BraTS 2021 case folders: nested spheres (edema 2 > necrosis 1 > enhancing 4) that each modality shows
    with its own contrast, plus noise."""
    rng = np.random.default_rng(0)
    zz, yy, xx = np.meshgrid(*[np.arange(SIZE)] * 3, indexing="ij")
    for i in range(cases):
        case = f"BraTS2021_{i:05d}"
        (root / case).mkdir(parents=True)
        c = rng.uniform(9, 15, 3)
        r = np.sqrt((zz - c[0]) ** 2 + (yy - c[1]) ** 2 + (xx - c[2]) ** 2)
        seg = np.select([r < 2.5, r < 4.5, r < 7.5], [4, 1, 2], 0).astype(np.uint8)
        contrast = {"t1": [0, -1, -1, -0.5], "t1ce": [0, 0.2, 0.3, 2.0], "t2": [0, 1.5, 1.0, 0.8],
                    "flair": [0, 0.8, 2.0, 0.5]}  # background, necrosis (1), edema (2), enhancing (4)
        index = np.select([seg == 1, seg == 2, seg == 4], [1, 2, 3], 0)
        for key, values in contrast.items():
            image = np.asarray(values, np.float32)[index] + 1.0 + rng.normal(0, 0.2, seg.shape).astype(np.float32)
            _write(image, root / case / f"{case}_{key}.nii.gz")
        _write(seg, root / case / f"{case}_seg.nii.gz")
    return root


def _run(env, *cmd, timeout=1800):
    exe = nnunet_bin(cmd[0])
    r = subprocess.run([exe, *cmd[1:]], env=env, capture_output=True, encoding="utf-8", errors="replace",
                       timeout=timeout)
    assert r.returncode == 0, (cmd, r.stdout[-3000:] + r.stderr[-3000:])
    return r


def _env(root: Path) -> dict:
    env = set_nnunet_roots(root, dict(os.environ))
    env.update(nnUNet_def_n_proc="1", nnUNet_n_proc_DA="1", nnUNet_compile="false")
    ensure_ext_trainer(env)
    return env


def _check_case(inp: Path, out: Path, case: str) -> None:
    """Mask = nnU-Net's region conversion of the saved sigmoid probabilities; maps with the input's geometry."""
    ref = sitk.ReadImage(str(inp / f"{case}_0000.nii.gz"))
    mask_img = sitk.ReadImage(str(out / f"{case}.nii.gz"))
    for img in [mask_img] + [sitk.ReadImage(str(out / "uncertainty" / f"{case}_{n}.nii.gz")) for n in MAP_NAMES]:
        assert img.GetSize() == ref.GetSize()
        np.testing.assert_allclose(img.GetSpacing(), ref.GetSpacing(), rtol=1e-6)
        np.testing.assert_allclose(img.GetOrigin(), ref.GetOrigin(), atol=1e-5)
        np.testing.assert_allclose(img.GetDirection(), ref.GetDirection(), atol=1e-6)
    mask = sitk.GetArrayFromImage(mask_img)
    probs = np.load(out / f"{case}.npz")["probabilities"]  # (3 regions, z, y, x), a sigmoid each
    assert probs.shape == (3, *mask.shape) and probs.min() >= 0 and probs.max() <= 1
    expected = np.zeros(mask.shape, np.uint8)
    for label, p in zip((1, 2, 3), probs):  # regions_class_order
        expected[p > 0.5] = label
    np.testing.assert_array_equal(mask, expected)
    maps = {n: sitk.GetArrayFromImage(sitk.ReadImage(str(out / "uncertainty" / f"{case}_{n}.nii.gz")))
            for n in MAP_NAMES}
    assert 0 <= maps["total"].min() and maps["total"].max() <= 1 and 0 <= maps["conflict"].min() <= 1
    # entropies are sums of binary entropies over the three regions
    assert maps["aleatoric"].max() <= 3 * np.log(2) + 1e-4 and maps["epistemic"].min() >= 0


def _check_whole_tumor_dice(out: Path, gt: Path, cases: list, summary: dict) -> None:
    from nnunetv2.evaluation.evaluate_predictions import region_or_label_to_mask

    dices = []
    for case in cases:
        p = region_or_label_to_mask(sitk.GetArrayFromImage(sitk.ReadImage(str(out / f"{case}.nii.gz"))), (1, 2, 3))
        t = region_or_label_to_mask(sitk.GetArrayFromImage(sitk.ReadImage(str(gt / f"{case}.nii.gz"))), (1, 2, 3))
        dices.append(2 * (p & t).sum() / (p.sum() + t.sum()) if p.sum() + t.sum() else np.nan)
    assert summary["mean"]["(1, 2, 3)"]["Dice"] == pytest.approx(np.nanmean(dices), abs=1e-6)


def test_entrust_loss_on_nnunets_region_targets_with_an_ignore_channel():
    """What nnUNetTrainerEnTrust's loss gets for BraTS with an ignore label: nnU-Net's DC_and_BCE_loss under its
    deep-supervision wrapper, targets (B, 3 regions + ignore, *s) per scale (tests/model/test_regions.py checks
    that the ignored voxels change no EnTrust term)."""
    import torch
    from conftest import arch_kwargs
    from nnunetv2.training.loss.compound_losses import DC_and_BCE_loss
    from nnunetv2.training.loss.deep_supervision import DeepSupervisionWrapper

    from entrust_nnunet.model.network import LOSS_WEIGHTS, EnTrustUNet
    from entrust_nnunet.nnunet.trainers import EnTrustLoss

    torch.manual_seed(0)
    net = EnTrustUNet(4, num_classes=3, deep_supervision=True, segdiff_mc_samples=4, **arch_kwargs(3)).use_regions(True)
    net.cache_parts = True
    base = DeepSupervisionWrapper(DC_and_BCE_loss({}, {"batch_dice": False, "do_bg": True, "smooth": 1e-5},
                                                  use_ignore_label=True), [1, 0.5])
    loss = EnTrustLoss(base, net, regions=True, ignore_label=4)
    x = torch.randn(2, 4, 8, 16, 16)
    labels = torch.randint(0, 5, (2, 1, 8, 16, 16))  # 4 = ignore
    regions = torch.cat([torch.isin(labels, torch.tensor(r)) for r in ((1, 2, 3), (2, 3), (3,), (4,))], 1)
    targets = [regions, regions[:, :, ::2, ::2, ::2]]
    value = loss(net(x), targets)
    value.backward()
    assert torch.isfinite(value) and set(loss.history) == set(LOSS_WEIGHTS)
    assert all(all(v == v for v in values) for values in loss.history.values())


def test_split_target_reads_nnunets_label_and_region_targets():
    import torch

    from entrust_nnunet.nnunet.trainers import split_target

    labels = torch.tensor([[[0, 1, 3, 2]]])  # ignore label 3
    target, valid = split_target(labels, False, 3)
    assert target.tolist() == [[[0, 1, 0, 2]]] and valid.tolist() == [[[True, True, False, True]]]
    # regions: nnU-Net's loader appends the ignore label as the last channel
    regions = torch.tensor([[[1, 0], [1, 1], [0, 1]]])  # (B, 2 regions + ignore, 2 voxels)
    target, valid = split_target(regions, True, 3)
    assert target.tolist() == [[[1, 0], [1, 1]]] and valid.tolist() == [[[True, False]]]
    assert split_target(labels, False, None)[1] is None


def test_plan_refuses_regions_that_nnunet_rejects(tmp_path):
    env = _env(tmp_path / "nnunet")
    src = make_brats_2021(tmp_path / "brats", cases=2)
    _run(env, "entrust", "convert", "brats", str(src), "-d", str(DATASET_ID))
    raw = next(Path(env["nnUNet_raw"]).glob(f"Dataset{DATASET_ID}_*"))
    dj = json.loads((raw / "dataset.json").read_text())
    dj["regions_class_order"] = [1, 2]  # three regions, two entries
    (raw / "dataset.json").write_text(json.dumps(dj))
    r = subprocess.run([nnunet_bin("entrust"), "plan", "-d", str(DATASET_ID), "-c", "3d_fullres"], env=env,
                       capture_output=True, encoding="utf-8", errors="replace", timeout=1800)
    assert r.returncode == 2
    lines = r.stderr.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith(f"entrust: error: {raw / 'dataset.json'}: invalid labels")
    assert "regions_class_order" in lines[0] and "Traceback" not in r.stderr
    assert not (Path(env["nnUNet_preprocessed"]) / raw.name).exists()


def test_brats_regions_convert_plan_train_predict_evaluate(tmp_path):
    env = _env(tmp_path / "nnunet")
    src = make_brats_2021(tmp_path / "brats")
    _run(env, "entrust", "convert", "brats", str(src), "-d", str(DATASET_ID))
    raw = next(Path(env["nnUNet_raw"]).glob(f"Dataset{DATASET_ID}_*"))
    assert json.loads((raw / "dataset.json").read_text())["regions_class_order"] == [1, 2, 3]
    _run(env, "entrust", "plan", "-d", str(DATASET_ID), "-c", "3d_fullres", "-np", "1")
    _run(env, "nnUNetv2_train", str(DATASET_ID), "3d_fullres", "0", "-tr", TRAINER, "-device", "cpu")
    model = Path(env["nnUNet_results"]) / raw.name / f"{TRAINER}__nnUNetPlans__3d_fullres"
    # nnU-Net's own validation wrote region-converted masks, ours the maps of the same cases
    val = model / "fold_0" / "validation"
    assert sorted(val.glob("*.nii.gz")) and all((val / "uncertainty" / f"{p.name[:-7]}_total.nii.gz").is_file()
                                                for p in val.glob("*.nii.gz"))

    cases = ["BraTS2021_00000", "BraTS2021_00001"]
    inp, gt, out = tmp_path / "in", tmp_path / "gt", tmp_path / "out"
    inp.mkdir(), gt.mkdir()
    for case in cases:
        for ch in range(4):
            (inp / f"{case}_{ch:04d}.nii.gz").symlink_to(raw / "imagesTr" / f"{case}_{ch:04d}.nii.gz")
        (gt / f"{case}.nii.gz").symlink_to(raw / "labelsTr" / f"{case}.nii.gz")
    _run(env, "entrust", "predict", "-i", str(inp), "-o", str(out), "-d", str(DATASET_ID), "-c", "3d_fullres",
         "-tr", TRAINER, "-p", "nnUNetPlans", "-f", "0", "--num-hypotheses", "2", "--save_probabilities",
         "-npp", "0", "-nps", "1", "-device", "cpu")
    for case in cases:
        _check_case(inp, out, case)

    r = _run(env, "entrust", "evaluate", "--pred", str(out), "--gt", str(gt), "-o", str(tmp_path / "summary.json"),
             "-np", "1")
    summary = json.loads((tmp_path / "summary.json").read_text())
    keys = {str(r_) if len(r_) > 1 else str(r_[0]): name for name, r_ in REGIONS.items()}
    assert summary["foreground_names"] == keys
    for key, name in keys.items():
        assert f"Dice {name}" in r.stdout
        assert 0 <= summary["mean"][key]["Dice"] <= 1
    _check_whole_tumor_dice(out, gt, cases, summary)
