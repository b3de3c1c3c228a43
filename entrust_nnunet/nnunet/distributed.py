"""What our trainer needs under nnU-Net's DDP (``nnUNetv2_train -num_gpus N``) and ``torch.compile``.

nnU-Net wraps the network in DDP inside ``initialize``; DDP then expects a gradient for every
parameter that requires one. CalibHead is fitted after training, not by the training loss, so its
parameters are frozen while training (:func:`freeze`) and thawed only inside a fit. The fit itself
runs on rank 0 and its result is sent to the other ranks (:func:`broadcast_state`).
"""
from __future__ import annotations

import contextlib
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


def broadcast_state(module: nn.Module, src: int = 0) -> None:
    """Give every rank the parameters and buffers ``module`` has on rank ``src`` (no-op without DDP)."""
    if not is_distributed():
        return
    state = [{k: v.cpu() for k, v in module.state_dict().items()} if dist.get_rank() == src else None]
    dist.broadcast_object_list(state, src=src)
    if dist.get_rank() != src:
        device = next(iter(module.state_dict().values())).device
        module.load_state_dict({k: v.to(device) for k, v in state[0].items()})
