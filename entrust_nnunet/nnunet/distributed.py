"""What our trainer needs under nnU-Net's DDP (``nnUNetv2_train -num_gpus N``) and ``torch.compile``.

nnU-Net wraps the network in DDP inside ``initialize``; DDP then expects a gradient for every
parameter that requires one. CalibHead is fitted after training, not by the training loss, so its
parameters are frozen while training (:func:`freeze`) and thawed only inside a fit. The fit itself
runs on rank 0 and its result is sent to the other ranks (:func:`broadcast_state`), which wait for it in a gloo
group of their own (:func:`waiting_group`): nnU-Net starts NCCL with its default timeout (10 min), shorter than a
fit on a real validation fold, and a timed-out rank would abort the run before ``checkpoint_final`` is saved.
"""
from __future__ import annotations

import contextlib
from datetime import timedelta
from typing import Iterator

import torch.distributed as dist
from torch import nn
from torch._dynamo import OptimizedModule


def unwrap(network: nn.Module) -> nn.Module:
    """The plain module behind DDP and torch.compile wrappers."""
    if isinstance(network, nn.parallel.DistributedDataParallel):
        network = network.module
    if isinstance(network, OptimizedModule):
        network = network._orig_mod
    return network


def freeze(module: nn.Module) -> nn.Module:
    """No gradients for ``module``'s parameters (so DDP does not wait for them)."""
    return module.requires_grad_(False)


@contextlib.contextmanager
def thawed(module: nn.Module) -> Iterator[nn.Module]:
    """``module``'s parameters trainable for the duration of a fit, frozen again afterwards."""
    module.requires_grad_(True)
    try:
        yield module
    finally:
        module.requires_grad_(False)


def is_distributed() -> bool:
    return dist.is_available() and dist.is_initialized()


#: how long the other ranks wait for rank 0's calibration fit
FIT_TIMEOUT = timedelta(hours=12)


def waiting_group(timeout: timedelta = FIT_TIMEOUT):
    """A gloo group of every rank whose collectives wait up to ``timeout`` (None without DDP). Every rank must
    call it, before rank 0 starts the work the others wait for."""
    return dist.new_group(backend="gloo", timeout=timeout) if is_distributed() else None


def broadcast_state(module: nn.Module, src: int = 0, group=None) -> None:
    """Give every rank the parameters and buffers ``module`` has on rank ``src`` (no-op without DDP), through
    ``group`` (default: the default group; :func:`waiting_group` for a long wait)."""
    if not is_distributed():
        return
    state = [{k: v.cpu() for k, v in module.state_dict().items()} if dist.get_rank() == src else None]
    dist.broadcast_object_list(state, src=src, group=group)
    if dist.get_rank() != src:
        device = next(iter(module.state_dict().values())).device
        module.load_state_dict({k: v.to(device) for k, v in state[0].items()})
