"""What the networks return, read the same way everywhere."""
from __future__ import annotations

import torch

#: floor of probabilities before taking logs: log(1e-4) = -9.2 is finite in fp16
MIN_PROBABILITY = 1e-4


def full_resolution(logits) -> torch.Tensor:
    """The full-resolution output of a network that may return a deep-supervision list."""
    return logits[0] if isinstance(logits, (list, tuple)) else logits


def log_probabilities(probs: torch.Tensor) -> torch.Tensor:
    """``log(max(p, MIN_PROBABILITY))``: probabilities handed to nnU-Net as logits (its softmax undoes the log)."""
    return probs.clamp_min(MIN_PROBABILITY).log()
