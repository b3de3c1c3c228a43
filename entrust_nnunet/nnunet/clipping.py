"""Gradient-norm clipping per parameter group inside nnU-Net's ``train_step``.

nnU-Net's ``train_step`` clips the norm of ALL the network's gradients to 12 in one call
(``torch.nn.utils.clip_grad_norm_(self.network.parameters(), 12)``), after DDP's all-reduce and AMP's unscale.
SegDiff learns from its own losses on a detached conditioning, yet shares that one norm: at initialisation its
gradients (norm ~50, the flow loss starts at ~17) dominate it and scale every trunk update down by ~4x. At
four development seeds, SegDiff detached AND clipped on its own calibrated better than either alone
(docs/design.md, "The head-only ablation calibrates better", resolution).

:func:`clipping_per_group` substitutes, for the duration of one step, a function that clips each group to the
same bound on its own; nnU-Net's ``train_step`` itself is reused unchanged (no copy of it). Outside the
context nothing is changed; calls for parameters that are not the network's (any other caller) pass through.
"""
from __future__ import annotations

import contextlib
from typing import Iterable, Iterator

import torch
from torch import nn
from torch.nn.utils import clip_grad_norm_ as _clip_grad_norm  # the real one, whatever the context substitutes


def clip_grad_norm_per_group(groups: Iterable[Iterable[nn.Parameter]], max_norm: float, **kwargs) -> torch.Tensor:
    """Clip the gradient norm of each group to ``max_norm`` separately; returns the total norm before clipping
    (over all groups, as ``clip_grad_norm_`` returns it). ``kwargs``: those of ``clip_grad_norm_``."""
    with_grads = [g for g in ([p for p in group if p.grad is not None] for group in groups) if g]
    # the norms stay on the gradients' device (no host sync in the training step)
    norms = [_clip_grad_norm(group, max_norm, **kwargs).float() for group in with_grads]
    return torch.linalg.vector_norm(torch.stack(norms)) if norms else torch.tensor(0.0)


@contextlib.contextmanager
def clipping_per_group(network: nn.Module, apart: nn.Module) -> Iterator[None]:
    """Within the context, ``torch.nn.utils.clip_grad_norm_`` called on ``network``'s parameters clips
    ``apart``'s parameters and the rest as two groups, each to the bound of the call."""
    original = torch.nn.utils.clip_grad_norm_
    own = {id(p) for p in apart.parameters()}
    everything = {id(p) for p in network.parameters()}

    def per_group(parameters, max_norm, *args, **kwargs):
        params = [parameters] if isinstance(parameters, torch.Tensor) else list(parameters)
        if not own or {id(p) for p in params} != everything or args:
            return original(params, max_norm, *args, **kwargs)
        return clip_grad_norm_per_group(([p for p in params if id(p) in own], [p for p in params if id(p) not in own]),
                                        max_norm, **kwargs)

    torch.nn.utils.clip_grad_norm_ = per_group
    try:
        yield
    finally:
        torch.nn.utils.clip_grad_norm_ = original
