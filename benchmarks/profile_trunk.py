"""Where EnTrust's trunk spends its time beyond plain nnU-Net: torch.profiler per module, one patch, CPU.

Builds plain PlainConvUNet and EnTrustUNet from the arch kwargs nnU-Net's planner wrote for the plans of
``benchmarks/cost.py`` (kept in ``benchmarks/results/cost_large.json``), with untrained weights, and runs in ONE
process, interleaved: plain forward, EnTrust's trunk (ModEnc + EnFuse + decoder) and EnTrust K = 1 with all maps
and K = 8 (what the predictor runs per patch; default sampling settings). Ratios to plain are what to read on a loaded machine.

    python benchmarks/profile_trunk.py --plan 2d                      # 2D 512x512, 4 channels, 8 stages
    python benchmarks/profile_trunk.py --plan 3d --patch 64 96 96     # the 3D plan's network, a smaller patch
"""
from __future__ import annotations

import argparse
import json
import statistics
import time
from pathlib import Path

RESULTS = Path(__file__).resolve().parent / "results" / "cost_large.json"
REQ_IMPORT = ["conv_op", "norm_op", "dropout_op", "nonlin"]


def networks(plan: str):
    """(plain, EnTrust, patch size) from the stored plan's arch kwargs; eval mode, deep supervision off."""
    import torch
    from nnunetv2.utilities.get_network_from_plans import get_network_from_plans

    stored = json.loads(RESULTS.read_text())["plans"][plan]
    kwargs = stored["arch_kwargs"]
    nets = []
    for cls in ("dynamic_network_architectures.architectures.unet.PlainConvUNet",
                "entrust_nnunet.model.network.EnTrustUNet"):
        torch.manual_seed(0)
        nets.append(get_network_from_plans(cls, kwargs, REQ_IMPORT, 4, 3, allow_init=True,
                                           deep_supervision=False).eval())
    nets[1].calib.fitted.fill_(1.0)  # a trained model's CalibHead runs (untrained, it is skipped for 1 - max prob.)
    return nets[0], nets[1], stored["patch_size"]


def _label_modules(net, names) -> list:
    """Forward hooks that open/close a torch.profiler ``record_function`` named after each listed sub-module."""
    import torch

    handles = []
    for name in names:
        module = net.get_submodule(name)
        ctx = {}

        def pre(mod, args, name=name, ctx=ctx):
            ctx["r"] = torch.profiler.record_function(f"module::{name}")
            ctx["r"].__enter__()

        def post(mod, args, out, ctx=ctx):
            ctx["r"].__exit__(None, None, None)

        handles += [module.register_forward_pre_hook(pre), module.register_forward_hook(post)]
    return handles


def entrust_modules(net) -> list[str]:
    fuse = [f"fuse.{i}" for i in range(len(net.fuse))]
    return ["encoders", "experts", *fuse, "fuse_full", "decoder", "segdiff"]


def plain_modules(net) -> list[str]:
    return ["encoder", "decoder"]


def profile(fn) -> dict:
    """CPU milliseconds per labelled module (and per top operator) of one call of ``fn``."""
    import torch
    from torch.profiler import ProfilerActivity

    with torch.profiler.profile(activities=[ProfilerActivity.CPU]) as prof:
        fn()
    rows = {e.key: e.cpu_time_total / 1e3 for e in prof.key_averages() if e.key.startswith("module::")}
    ops = sorted(((e.self_cpu_time_total / 1e3, e.key) for e in prof.key_averages()
                  if not e.key.startswith("module::")), reverse=True)[:12]
    return {"modules": rows, "top_ops": [(k, round(v, 1)) for v, k in ops]}


def timings(jobs: dict, repeats: int) -> dict[str, list[float]]:
    """Seconds of each job, interleaved (one round = every job once), after one warm-up round."""
    times = {k: [] for k in jobs}
    for r in range(repeats + 1):
        for label, fn in jobs.items():
            t = time.perf_counter()
            fn()
            if r:
                times[label].append(time.perf_counter() - t)
    return times


def main(argv=None) -> dict:
    import torch

    from entrust_nnunet.model.sampling import SamplingSettings
    from entrust_nnunet.nnunet.predictor import TrustStatistics

    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--plan", choices=["2d", "3d"], default="2d")
    p.add_argument("--patch", type=int, nargs="+", help="patch size (default: the plan's)")
    p.add_argument("--repeats", type=int, default=3)
    p.add_argument("--threads", type=int, default=2)
    p.add_argument("--no-profile", action="store_true", help="ratios only")
    args = p.parse_args(argv)
    torch.set_num_threads(args.threads)
    plain, net, patch = networks(args.plan)
    patch = args.patch or patch
    x = torch.randn(1, 4, *patch)
    k1, k8 = TrustStatistics(net, SamplingSettings(1)), TrustStatistics(net, SamplingSettings(8))
    mask = net._mask(x)  # every modality present
    jobs = {"plain": lambda: plain(x), "trunk": lambda: net._trunk(x, keep_all=False, mask=mask),
            "K=1 all maps": lambda: k1(x), "K=8 all maps": lambda: k8(x)}
    out = {"plan": args.plan, "patch": list(patch), "threads": args.threads}
    with torch.inference_mode():
        times = timings(jobs, args.repeats)
        base = statistics.median(times["plain"])
        out["median_s"] = {k: round(statistics.median(v), 3) for k, v in times.items()}
        out["ratio"] = {k: round(statistics.median(v) / base, 3) for k, v in times.items()}
        if not args.no_profile:
            _label_modules(plain, plain_modules(plain))
            _label_modules(net, entrust_modules(net))
            out["plain_profile"] = profile(jobs["plain"])
            out["entrust_profile"] = profile(jobs["K=1 all maps"])
    print(json.dumps(out, indent=1))
    return out


if __name__ == "__main__":
    main()
