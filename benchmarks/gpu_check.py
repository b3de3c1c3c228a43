"""The Python parts of ``benchmarks/gpu_check.sh``: training step and patch inference, EnTrust against plain nnU-Net.

Needs a planned and preprocessed 3D dataset (the shell script makes one from phantoms). With ``--brats`` a
configuration ``3d_brats`` is added to its plans (inheriting its preprocessed data): the patch size, batch size
and architecture nnU-Net's planner gave a BraTS-like 240x240x155 4-channel dataset at 1 mm (stored by
``benchmarks/cost.py`` in ``results/cost_large.json``), so the networks and the patch are the size users train.

* training step: nnU-Net's own ``train_step`` (AMP with its GradScaler on CUDA, as nnU-Net trains) of an
  initialised nnUNetTrainerEnTrust and nnUNetTrainer, on random batches of the configuration's batch and patch
  size with deep-supervision targets; median seconds per step and the ratio;
* inference: one patch through EnTrust with K = 1 and K = 8 (all maps, as the predictor runs it, autocast on
  CUDA as nnU-Net's predictor) against plain PlainConvUNet; median seconds and ``torch.cuda.max_memory_allocated``
  above the weights, and the ratios.

    python benchmarks/gpu_check.py DATASET_ID --device cuda --brats
    python benchmarks/gpu_check.py DATASET_ID --device cpu --tiny     # dry run of the same code on CPU
"""
from __future__ import annotations

import argparse
import json
import statistics
import time
from pathlib import Path

RESULTS = Path(__file__).resolve().parent / "results" / "cost_large.json"
PLAIN = "dynamic_network_architectures.architectures.unet.PlainConvUNet"
REQ_IMPORT = ["conv_op", "norm_op", "dropout_op", "nonlin"]


def brats_configuration(plans_file: Path) -> str:
    """Add ``3d_brats`` (BraTS-like patch, batch 2, architecture) to the plans; returns its name."""
    stored = json.loads(RESULTS.read_text())["plans"]["3d"]
    plans = json.loads(plans_file.read_text())
    kwargs = dict(stored["arch_kwargs"])
    plans["configurations"]["3d_brats"] = {
        "inherits_from": "3d_fullres", "patch_size": stored["patch_size"], "batch_size": 2,
        "architecture": {"network_class_name": PLAIN, "arch_kwargs": kwargs, "_kw_requires_import": REQ_IMPORT}}
    plans_file.write_text(json.dumps(plans, indent=2))
    return "3d_brats"


def _sync(device):
    import torch

    if device.type == "cuda":
        torch.cuda.synchronize(device)


def trainer(cls, plans: dict, configuration: str, dataset_json: dict, device):
    """An initialised trainer (network, optimizer, loss, GradScaler) as nnUNetv2_train builds it
    (``get_trainer_from_args`` adds ``continue_training`` to the plans the same way)."""
    t = cls({**plans, "continue_training": False}, configuration, 0, dataset_json, device)
    t.initialize()
    t.network.train()
    return t


def random_batch(t, device) -> dict:
    """A batch of the trainer's size: random images and labels, targets per deep-supervision scale."""
    import torch
    from torch.nn import functional as F

    patch = list(t.configuration_manager.patch_size)
    data = torch.randn(t.batch_size, t.num_input_channels, *patch, device=device)
    seg = torch.randint(0, t.label_manager.num_segmentation_heads, (t.batch_size, 1, *patch), device=device).float()
    scales = t._get_deep_supervision_scales() or [[1.0] * len(patch)]
    # int16 targets, as nnU-Net's data loader delivers them
    target = [F.interpolate(seg, size=[round(p * s) for p, s in zip(patch, sc)], mode="nearest").to(torch.int16)
              for sc in scales]
    return {"data": data, "target": target}


def step_times(t, device, warmup: int, steps: int) -> list[float]:
    batch = random_batch(t, device)
    times = []
    for i in range(warmup + steps):
        _sync(device)
        start = time.perf_counter()
        t.train_step(batch)
        _sync(device)
        if i >= warmup:
            times.append(time.perf_counter() - start)
    return times


def training_steps(plans, configuration, dataset_json, device, warmup, steps) -> dict:
    """Median seconds per nnU-Net train_step of nnUNetTrainer and nnUNetTrainerEnTrust, and the ratio."""
    import torch
    from nnunetv2.training.nnUNetTrainer.nnUNetTrainer import nnUNetTrainer

    from entrust_nnunet.nnunet.trainers import nnUNetTrainerEnTrust

    out = {}
    for name, cls in (("nnUNetTrainer", nnUNetTrainer), ("nnUNetTrainerEnTrust", nnUNetTrainerEnTrust)):
        t = trainer(cls, plans, configuration, dataset_json, device)
        out[name] = statistics.median(step_times(t, device, warmup, steps))
        out["batch"] = [t.batch_size, t.num_input_channels, *t.configuration_manager.patch_size]
        out["amp"] = t.grad_scaler is not None
        del t
        if device.type == "cuda":
            torch.cuda.empty_cache()
    out["ratio"] = out["nnUNetTrainerEnTrust"] / out["nnUNetTrainer"]
    return out


def _inference(model, x, device, warmup: int, repeats: int) -> tuple[float, int]:
    """(median seconds, peak allocated bytes above the start) of ``model(x)`` under nnU-Net's predictor autocast."""
    import torch
    from nnunetv2.utilities.helpers import dummy_context

    amp = torch.autocast(device.type, enabled=True) if device.type == "cuda" else dummy_context()
    times = []
    if device.type == "cuda":
        torch.cuda.reset_peak_memory_stats(device)
    base = torch.cuda.memory_allocated(device) if device.type == "cuda" else 0
    with torch.inference_mode(), amp:
        for i in range(warmup + repeats):
            _sync(device)
            start = time.perf_counter()
            model(x)
            _sync(device)
            if i >= warmup:
                times.append(time.perf_counter() - start)
    peak = torch.cuda.max_memory_allocated(device) - base if device.type == "cuda" else 0
    return statistics.median(times), peak


def inference(plans, configuration, dataset_json, device, warmup, repeats) -> dict:
    """Plain forward vs EnTrust K = 1 and K = 8 with all maps on one patch: seconds, peak memory, ratios."""
    import torch
    from nnunetv2.utilities.get_network_from_plans import get_network_from_plans
    from nnunetv2.utilities.label_handling.label_handling import determine_num_input_channels
    from nnunetv2.utilities.plans_handling.plans_handler import PlansManager

    from entrust_nnunet.model.sampling import SamplingSettings
    from entrust_nnunet.nnunet.predictor import TrustStatistics
    from entrust_nnunet.nnunet.trainers import nnUNetTrainerEnTrust

    pm = PlansManager(plans)
    cm = pm.get_configuration(configuration)
    c_in = determine_num_input_channels(pm, cm, dataset_json)
    heads = pm.get_label_manager(dataset_json).num_segmentation_heads
    x = torch.randn(1, c_in, *cm.patch_size, device=device)
    plain = get_network_from_plans(cm.network_arch_class_name, cm.network_arch_init_kwargs,
                                   cm.network_arch_init_kwargs_req_import, c_in, heads, allow_init=True,
                                   deep_supervision=False).to(device).eval()
    net = nnUNetTrainerEnTrust.build_network_architecture(pm, cm, c_in, heads, False).to(device).eval()
    out = {"plain": _inference(plain, x, device, warmup, repeats)}
    del plain
    for k in (1, 8):
        out[f"K={k}"] = _inference(TrustStatistics(net, SamplingSettings(k)), x, device, warmup, repeats)
    base_t, base_m = out["plain"]
    return {label: {"seconds": t, "peak_MiB": m / 2 ** 20, "time_ratio": t / base_t,
                    "memory_ratio": m / base_m if base_m else None} for label, (t, m) in out.items()}


def main(argv=None) -> dict:
    import os

    import torch

    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("dataset_id", type=int)
    p.add_argument("--device", default="cuda")
    p.add_argument("--brats", action="store_true", help="add and use the BraTS-like 3d_brats configuration")
    p.add_argument("--tiny", action="store_true", help="few repeats (a dry run of the code path, e.g. on CPU)")
    p.add_argument("--plans", default="nnUNetPlans")
    args = p.parse_args(argv)
    from nnunetv2.utilities.dataset_name_id_conversion import convert_id_to_dataset_name

    folder = Path(os.environ["nnUNet_preprocessed"]) / convert_id_to_dataset_name(args.dataset_id)
    configuration = brats_configuration(folder / f"{args.plans}.json") if args.brats else "3d_fullres"
    plans = json.loads((folder / f"{args.plans}.json").read_text())
    dataset_json = json.loads((folder / "dataset.json").read_text())
    device = torch.device(args.device)
    warmup, repeats = (1, 2) if args.tiny else (5, 20)
    result = {"device": torch.cuda.get_device_name(device) if device.type == "cuda" else "cpu",
              "configuration": configuration,
              "training_step": training_steps(plans, configuration, dataset_json, device, warmup, repeats),
              "inference": inference(plans, configuration, dataset_json, device, warmup, max(repeats // 2, 2))}
    print(report(result))
    print(json.dumps(result))
    return result


def report(result: dict) -> str:
    s = result["training_step"]
    lines = [f"device: {result['device']}; configuration {result['configuration']}, batch {s['batch']}, AMP {s['amp']}",
             f"training step: nnUNetTrainer {s['nnUNetTrainer']:.3f} s, nnUNetTrainerEnTrust "
             f"{s['nnUNetTrainerEnTrust']:.3f} s, ratio {s['ratio']:.2f}"]
    for label, row in result["inference"].items():
        mem = (f"peak allocated {row['peak_MiB']:.0f} MiB ({row['memory_ratio']:.2f}x plain)"
               if row["memory_ratio"] is not None else "peak allocated: CUDA only")
        lines.append(f"inference {label}: {row['seconds']:.3f} s ({row['time_ratio']:.2f}x plain), {mem}")
    return "\n".join(lines)


if __name__ == "__main__":
    main()
