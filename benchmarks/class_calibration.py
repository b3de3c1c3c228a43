"""How calibrated are the class probabilities EnTrust saves, against plain nnU-Net's softmax? (issue 12, item 7)

On a DEVELOPMENT dataset only (never the benchmark's test seed): one EnTrust and one plain nnU-Net model,
both fold 0 of the same preprocessed data. Every option below is fitted on fold 0's validation cases
(out-of-fold, the cases CalibHead is fitted on) and scored on the dataset's test cases:

* ``entrust mean``: the K hypotheses' mean, pooled as ``entrust predict`` pools it (patches, mirrorings);
* ``entrust mean, T (all)``: temperature-scaled, T NLL-fitted on all validation voxels (what the trainer fits);
* ``entrust mean, T (fg)``: T fitted on foreground + boundary voxels only;
* ``entrust head``: the deterministic head's softmax (pooled the same way);
* ``entrust mix``: ``(1 - a) mean + a head``, ``a`` NLL-fitted on the validation voxels (grid);
* ``nnU-Net softmax`` and ``nnU-Net softmax, T``: plain nnU-Net, raw and temperature-scaled (the benchmark's rows).

Scores: class-probability ECE (15 bins, pooled over cases) on all voxels and on foreground + boundary voxels,
and NLL, exactly as ``entrust evaluate`` computes them from saved probabilities.

    python benchmarks/class_calibration.py --entrust MODEL_DIR --plain MODEL_DIR --raw RAW_DATASET [--fold 0]
"""
from __future__ import annotations

import argparse
import json
from pathlib import Path

import numpy as np
import torch
from torch import nn

from entrust_nnunet.evaluation import metrics
from entrust_nnunet.evaluation.temperature import fit_temperature, temperature_scale
from entrust_nnunet.model.outputs import MIN_PROBABILITY
from entrust_nnunet.nnunet.predictor import EnTrustPredictor, POOLED_MAPS


class MeanAndHead(nn.Module):
    """(B, C + len(POOLED_MAPS), *s): the hypotheses' mean, then the head's softmax (zero-padded): both pool by
    averaging through EnTrustPredictor's sliding window, exactly as ``entrust predict`` pools the mean."""

    with_hypotheses = False

    def __init__(self, net):
        super().__init__()
        self.net = net

    def forward(self, x):
        s = self.net.sample(x)
        head = torch.softmax(self.net._trunk(x, keep_all=False)["logits"].float(), 1)
        pad = torch.zeros_like(head[:, :1]).expand(-1, len(POOLED_MAPS) - head.shape[1], *head.shape[2:])
        return torch.cat([s["mean"], head, pad], 1)

    def load_state_dict(self, state_dict, strict=True, assign=False):
        return self.net.load_state_dict(state_dict, strict=strict, assign=assign)


def _cases(raw: Path, split_keys: list[str] | None, images: str, labels: str):
    ending = json.loads((raw / "dataset.json").read_text())["file_ending"]
    names = split_keys or sorted(p.name[: -len("_0000" + ending)] for p in (raw / images).glob(f"*_0000{ending}"))
    for name in names:
        yield name, sorted(str(p) for p in (raw / images).glob(f"{name}_[0-9][0-9][0-9][0-9]{ending}")), \
            str(raw / labels / f"{name}{ending}")


def _predict(predictor, cases, entrust: bool) -> list[tuple[np.ndarray, ...]]:
    """(probabilities of each option, labels) per case, in nnU-Net's preprocessed space (phantoms: no crop)."""
    pre = predictor.configuration_manager.preprocessor_class(verbose=False)
    c = predictor.label_manager.num_segmentation_heads
    out = []
    for _, images, label in cases:
        data, seg, _ = pre.run_case(images, label, predictor.plans_manager, predictor.configuration_manager,
                                    predictor.dataset_json)
        with torch.no_grad():
            pooled = predictor.predict_sliding_window_return_logits(torch.from_numpy(data)).float()
        if entrust:
            probs = [pooled[:c] / pooled[:c].sum(0, keepdim=True), pooled[c:2 * c] / pooled[c:2 * c].sum(0, keepdim=True)]
        else:
            probs = [torch.softmax(pooled, 0)]
        out.append(([p.numpy() for p in probs], seg[0].astype(np.int64)))
    return out


def _entrust_predictor(model: Path, fold: int):
    predictor = EnTrustPredictor(tile_step_size=0.5, use_gaussian=True, use_mirroring=True,
                                 perform_everything_on_device=False, device=torch.device("cpu"), allow_tqdm=False)
    predictor.initialize_from_trained_model_folder(str(model), [fold])
    predictor.network = MeanAndHead(predictor.network.net)
    predictor.network.load_state_dict(predictor.list_of_parameters[0])
    return predictor


def _plain_predictor(model: Path, fold: int):
    from nnunetv2.inference.predict_from_raw_data import nnUNetPredictor

    predictor = nnUNetPredictor(tile_step_size=0.5, use_gaussian=True, use_mirroring=True,
                                perform_everything_on_device=False, device=torch.device("cpu"), allow_tqdm=False)
    predictor.initialize_from_trained_model_folder(str(model), [fold], "checkpoint_final.pth")
    predictor.network.load_state_dict(predictor.list_of_parameters[0])
    return predictor


def _scaled(p: np.ndarray, t: float, eps: float = 1e-12) -> np.ndarray:
    """:func:`temperature_scale` of (C, *s) probabilities."""
    return temperature_scale(p.reshape(p.shape[0], -1), t, eps=eps).reshape(p.shape)


def _stack(results, option: int):
    """(C, N) probabilities and (N,) labels of all cases' voxels."""
    return (np.concatenate([r[0][option].reshape(r[0][option].shape[0], -1) for r in results], 1),
            np.concatenate([r[1].reshape(-1) for r in results]))


def _scores(results, transform) -> dict:
    """Pooled ECE (all; foreground + boundary) and NLL of ``transform(case probabilities)`` over the cases."""
    stats_all, stats_fg, nll = [], [], []
    for probs, labels in results:
        p = transform(probs)
        pred = p.argmax(0)
        fg = metrics.foreground_boundary_mask(labels, pred)
        stats_all.append(metrics.calibration_statistics(p, labels))
        stats_fg.append(metrics.calibration_statistics(p, labels, mask=fg))
        nll.append(metrics.nll(p, labels) * labels.size)
    ece = metrics.calibration_from_statistics(metrics.pool_calibration_statistics(stats_all))["ece"]
    ece_fg = metrics.calibration_from_statistics(metrics.pool_calibration_statistics(stats_fg))["ece"]
    return {"ece": round(ece, 5), "ece_fg_boundary": round(ece_fg, 5),
            "nll": round(sum(nll) / sum(r[1].size for r in results), 5)}


def _fit_mix(val) -> float:
    mean, labels = _stack(val, 0)
    head, _ = _stack(val, 1)
    grid = np.linspace(0, 1, 21)
    nll = [metrics.nll((1 - a) * mean + a * head, labels) for a in grid]
    return float(grid[int(np.argmin(nll))])


def _fg_voxels(val, option: int):
    probs, labels = _stack(val, option)
    masks = [metrics.foreground_boundary_mask(r[1], r[0][option].argmax(0)).reshape(-1) for r in val]
    fg = np.concatenate(masks)
    return probs[:, fg], labels[fg]


def _plain_rows(predictor, raw: Path, val_keys: list[str]) -> dict:
    val = _predict(predictor, list(_cases(raw, val_keys, "imagesTr", "labelsTr")), False)
    test = _predict(predictor, list(_cases(raw, None, "imagesTs", "labelsTs")), False)
    t = fit_temperature(*_stack(val, 0))
    return {name: {"validation": _scores(val, f), "test": _scores(test, f)}
            for name, f in {"nnU-Net softmax": lambda p: p[0],
                            f"nnU-Net softmax, T = {t:.3f}": lambda p: _scaled(p[0], t)}.items()}


def study(entrust: Path, plain: Path, raw: Path, fold: int) -> dict:
    splits = json.loads((Path(str(raw).replace("nnUNet_raw", "nnUNet_preprocessed")) / "splits_final.json").read_text())
    val_keys = splits[fold]["val"]
    e_pred = _entrust_predictor(entrust, fold)
    e_val = _predict(e_pred, list(_cases(raw, val_keys, "imagesTr", "labelsTr")), True)
    e_test = _predict(e_pred, list(_cases(raw, None, "imagesTs", "labelsTs")), True)
    t_all = fit_temperature(*_stack(e_val, 0), eps=MIN_PROBABILITY)
    t_fg = fit_temperature(*_fg_voxels(e_val, 0), eps=MIN_PROBABILITY)
    a = _fit_mix(e_val)
    options = {
        "entrust mean": lambda p: p[0],
        f"entrust mean, T (all) = {t_all:.3f}": lambda p: _scaled(p[0], t_all, MIN_PROBABILITY),
        f"entrust mean, T (fg) = {t_fg:.3f}": lambda p: _scaled(p[0], t_fg, MIN_PROBABILITY),
        "entrust head": lambda p: p[1],
        f"entrust mix a = {a:.2f}": lambda p: (1 - a) * p[0] + a * p[1],
    }
    table = {name: {"validation": _scores(e_val, f), "test": _scores(e_test, f)} for name, f in options.items()}
    if plain is not None:
        table.update(_plain_rows(_plain_predictor(plain, fold), raw, val_keys))
    stored = float(e_pred.network.net.calib.temperature)
    return {"fold": fold, "validation_cases": val_keys, "test_cases": len(e_test),
            "temperature_in_checkpoint": stored, "table": table}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--entrust", type=Path, required=True)
    parser.add_argument("--plain", type=Path, default=None)
    parser.add_argument("--raw", type=Path, required=True)
    parser.add_argument("--fold", type=int, default=0)
    parser.add_argument("-o", type=Path, default=None)
    args = parser.parse_args()
    torch.set_num_threads(2)
    result = study(args.entrust, args.plain, args.raw, args.fold)
    text = json.dumps(result, indent=2)
    print(text)
    if args.o:
        args.o.write_text(text)


if __name__ == "__main__":
    main()
