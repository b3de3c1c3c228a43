"""The network behind nnU-Net's wrappers (DDP for ``-num_gpus``, ``torch.compile``)."""
from __future__ import annotations

from torch import nn
from torch._dynamo import OptimizedModule


def unwrap(network: nn.Module) -> nn.Module:
    """The plain module behind DDP and torch.compile wrappers."""
    if isinstance(network, nn.parallel.DistributedDataParallel):
        network = network.module
    if isinstance(network, OptimizedModule):
        network = network._orig_mod
    return network
