"""Modality dropout: during training each sample keeps a random non-empty subset of its modalities.

With probability ``1 - p`` a sample keeps every modality; with probability ``p`` (the trainer attribute
``modality_dropout``) it keeps one of the ``2^M - 2`` proper non-empty subsets, drawn uniformly. With
``p = 0.5`` and M = 3 every one of the 6 proper subsets is seen in 1/12 of the samples, the full set in 1/2.

How a dropped modality is removed depends on the network: EnTrust masks it (its encoder stream leaves every
mean, gate and the experts' conflict, ``entrust_nnunet.model.absence``); plain nnU-Net has no notion of a
modality, so its baseline (:class:`ModalityDropoutZeroFill`) zero-fills the channel after nnU-Net's
normalisation, which is what a user can do with absent scans today.
"""
from __future__ import annotations

import zlib

import torch

from entrust_nnunet.model.absence import without_absent


def modality_dropout_masks(batch: int, modalities: int, probability: float,
                           generator: torch.Generator | None = None) -> torch.Tensor:
    """(B, M) float masks, 1 = kept; each row keeps all with probability ``1 - probability``, else a uniformly
    drawn proper non-empty subset. With one modality nothing can be dropped (all ones)."""
    if not 0.0 <= probability <= 1.0:
        raise ValueError(f"modality dropout probability must lie in [0, 1], got {probability}")
    mask = torch.ones(batch, modalities)
    if modalities < 2 or probability == 0:
        return mask
    drop = torch.rand(batch, generator=generator) < probability
    # subsets as bit patterns 1 .. 2^M - 2 (0 = none, 2^M - 1 = all are excluded)
    codes = torch.randint(1, 2 ** modalities - 1, (batch,), generator=generator)
    bits = ((codes[:, None] >> torch.arange(modalities)) & 1).float()
    mask[drop] = bits[drop]
    return mask


def subsets(modalities: int) -> list[tuple[int, ...]]:
    """Every non-empty subset of ``range(modalities)`` (2^M - 1 of them), smallest first, as sorted tuples."""
    out = [tuple(m for m in range(modalities) if code >> m & 1) for code in range(1, 2 ** modalities)]
    return sorted(out, key=lambda s: (len(s), s))


def calibration_subsets(modalities: int, most: int, key: str) -> list[tuple[bool, ...]]:
    """The proper non-empty subsets (as M present flags) a calibration case is also predicted with: all
    2^M - 2 of them when there are at most ``most``, else ``most`` drawn without replacement by a generator
    seeded with the case ``key`` (different cases see different subsets; the same case always the same)."""
    proper = [tuple(m in s for m in range(modalities)) for s in subsets(modalities) if len(s) < modalities]
    if len(proper) <= most:
        return proper
    gen = torch.Generator().manual_seed(zlib.crc32(key.encode("utf-8")))
    return [proper[i] for i in sorted(torch.randperm(len(proper), generator=gen)[:most].tolist())]


class ModalityDropout:
    """Trainer mixin (before nnUNetTrainer in the bases): when ``modality_dropout`` > 0, ``train_step`` draws a
    mask per batch, hands it to :meth:`drop_modalities` and runs nnU-Net's step; validation sees every modality."""

    #: probability that a training sample drops a (proper, non-empty) subset of its modalities; 0 = off
    modality_dropout = 0.0

    def train_step(self, batch: dict) -> dict:
        if not self.modality_dropout:
            return super().train_step(batch)
        # the dataset's channels, not the batch's: a cascade stage appends the previous stage's one-hot prior,
        # which is not a modality and is never dropped
        m = len(self.dataset_json["channel_names"])
        batch = self.drop_modalities(batch, modality_dropout_masks(batch["data"].shape[0], m, self.modality_dropout))
        try:
            return super().train_step(batch)
        finally:
            self.restore_modalities()

    def drop_modalities(self, batch: dict, mask: torch.Tensor) -> dict:
        """The batch nnU-Net's step should see with ``mask`` (B, M) applied."""
        raise NotImplementedError

    def restore_modalities(self) -> None:
        """Undo what :meth:`drop_modalities` changed outside the batch."""


class ModalityDropoutZeroFill(ModalityDropout):
    """Dropped channels are set to 0 in the normalised batch (nnU-Net's ZScore mean): plain nnU-Net's dropout."""

    def drop_modalities(self, batch: dict, mask: torch.Tensor) -> dict:
        # the image channels come first; a cascade's prior channels after them stay as they are
        return {**batch, "data": without_absent(batch["data"], mask)}
