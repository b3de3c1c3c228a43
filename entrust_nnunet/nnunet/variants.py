"""Trainer variants that change only the schedule: one small class each, named for what it changes.

Every variant is ``class X(ScheduleMixin, Parent)`` with a ``schedule`` dict. The mixin comes FIRST
in the bases, so its ``__init__`` runs nnU-Net's (same signature) and then overwrites nnU-Net's
defaults with the schedule; a key that is not an attribute nnU-Net's trainer sets fails loudly.

Every variant also has an explicit training seed (nnU-Net seeds nothing itself): the trainer attribute
``seed``, read from the environment variable ``ENTRUST_TRAIN_SEED`` (default 0), seeds python's
``random``, numpy and torch before nnU-Net builds the network (so it fixes the initial weights and the
main process's random state) and is written to the training log. nnU-Net's data-augmentation worker
processes draw their own seeds (``NonDetMultiThreadedAugmenter(seeds=None)``), so two runs with one seed
are not bit-identical; different seeds give different initialisations.
"""
from __future__ import annotations

import os
import random

import numpy as np
import torch
from nnunetv2.training.nnUNetTrainer.nnUNetTrainer import nnUNetTrainer

from entrust_nnunet.nnunet.ablation_trainers import (nnUNetTrainerEnTrustNoAlternatives, nnUNetTrainerEnTrustNoEnFuse,
                                                      nnUNetTrainerEnTrustNoProbe, nnUNetTrainerEnTrustNoSteps)
from entrust_nnunet.nnunet.baseline_trainers import nnUNetTrainerCRNP, nnUNetTrainerMCDropout, nnUNetTrainerModDrop
from entrust_nnunet.nnunet.trainers import (nnUNetTrainerEnTrust, nnUNetTrainerEnTrustCrossModal,
                                            nnUNetTrainerEnTrustModDrop)

#: the demo's short CPU schedule: 15 epochs x 50 iterations of batch 2 (2D 64x64 phantoms), about 2-3 min
DEMO_SCHEDULE = {"num_epochs": 15, "num_iterations_per_epoch": 50, "num_val_iterations_per_epoch": 5}
#: the 3D demo's CPU schedule (32^3 phantoms, nnU-Net's 3d_fullres plan: 32^3 patches, batch 2): about 10 min of
#: training on 2 cores so that the whole `entrust demo --dim 3` stays within 15 min (docs/design.md, "3D demo")
DEMO_3D_SCHEDULE = {"num_epochs": 20, "num_iterations_per_epoch": 25, "num_val_iterations_per_epoch": 3}
#: the tests' schedule: 4 epochs x 3 iterations, 1 validation iteration, a checkpoint every epoch
TINY_SCHEDULE = {"num_epochs": 4, "num_iterations_per_epoch": 3, "num_val_iterations_per_epoch": 1, "save_every": 1,
                 "final_plot_only": True}
#: the toolchain test's schedule (5 folds): one epoch of 2 iterations and a 50-step CalibHead fit (the fits took
#: most of a 1-epoch fold: 4.5 of 6 min on a loaded 2-core machine); the test checks plumbing, not quality
ONE_EPOCH_SCHEDULE = {"num_epochs": 1, "num_iterations_per_epoch": 2, "num_val_iterations_per_epoch": 1, "save_every": 1,
                      "calibration_steps": 50, "final_plot_only": True}


#: the environment variable that sets a variant's training seed (benchmarks/run.py --seeds sets it per run)
TRAIN_SEED_ENV = "ENTRUST_TRAIN_SEED"


def training_seed() -> int:
    """The training seed from ``ENTRUST_TRAIN_SEED`` (0 when unset); anything but an integer fails loudly."""
    value = os.environ.get(TRAIN_SEED_ENV, "").strip() or "0"
    try:
        return int(value)
    except ValueError:
        raise ValueError(f"{TRAIN_SEED_ENV}={value!r}: must be an integer") from None


def seed_everything(seed: int) -> None:
    """Seed python's ``random``, numpy's global generator and torch (CPU and every CUDA device)."""
    random.seed(seed)
    np.random.seed(seed % 2 ** 32)
    torch.manual_seed(seed)


class ScheduleMixin:
    """Put FIRST in the bases of a trainer variant: nnU-Net's ``__init__`` (same signature) runs, then the
    entries of the class's ``schedule`` overwrite the trainer attributes of the same name; ``seed``
    (:func:`training_seed`) seeds everything when nnU-Net initialises the trainer."""

    schedule: dict = {}
    #: draw the progress plots (nnU-Net's progress.png, EnTrust's progress_entrust.png) after the last epoch only:
    #: each costs about a second of CPU, more than an epoch of the tests' schedules
    final_plot_only = False

    def __init__(self, plans: dict, configuration: str, fold: int, dataset_json: dict,
                 device: torch.device = torch.device("cuda")):
        super().__init__(plans, configuration, fold, dataset_json, device)
        unknown = sorted(k for k in self.schedule if not hasattr(self, k))
        if unknown:
            raise AttributeError(f"{type(self).__name__}.schedule: {', '.join(unknown)} is not an attribute of "
                                 f"nnU-Net's trainer (misspelled?)")
        for key, value in self.schedule.items():
            setattr(self, key, value)
        #: the training seed (``ENTRUST_TRAIN_SEED``), applied in :meth:`initialize`
        self.seed = training_seed()

    def initialize(self):
        if not self.was_initialized:
            seed_everything(self.seed)
            self.print_to_log_file(f"training seed: {self.seed} (from {TRAIN_SEED_ENV}; seeds random, numpy and "
                                   f"torch before the network is built)")
        super().initialize()

    def on_epoch_end(self):
        if not self.final_plot_only or self.current_epoch >= self.num_epochs - 1:
            return super().on_epoch_end()
        # instance attributes shadow the plotting methods for this epoch only
        self.logger.plot_progress_png = self._plot_aux_losses = lambda *args: None
        try:
            return super().on_epoch_end()
        finally:
            del self.logger.plot_progress_png, self._plot_aux_losses


class nnUNetTrainerEnTrust_5epochs(ScheduleMixin, nnUNetTrainerEnTrust):
    schedule = {"num_epochs": 5}


class nnUNetTrainerEnTrust_50epochs(ScheduleMixin, nnUNetTrainerEnTrust):
    schedule = {"num_epochs": 50}


class nnUNetTrainerEnTrust_demo(ScheduleMixin, nnUNetTrainerEnTrust):
    schedule = DEMO_SCHEDULE


class nnUNetTrainerEnTrust_demo3d(ScheduleMixin, nnUNetTrainerEnTrust):
    schedule = DEMO_3D_SCHEDULE


class nnUNetTrainerEnTrust_tinyCPU(ScheduleMixin, nnUNetTrainerEnTrust):
    schedule = TINY_SCHEDULE


class nnUNetTrainerEnTrust_1epochCPU(ScheduleMixin, nnUNetTrainerEnTrust):
    schedule = ONE_EPOCH_SCHEDULE


class nnUNetTrainerEnTrustModDrop_demo(ScheduleMixin, nnUNetTrainerEnTrustModDrop):
    schedule = DEMO_SCHEDULE


class nnUNetTrainerEnTrustModDrop_tinyCPU(ScheduleMixin, nnUNetTrainerEnTrustModDrop):
    schedule = TINY_SCHEDULE


class nnUNetTrainerEnTrustCrossModal_demo(ScheduleMixin, nnUNetTrainerEnTrustCrossModal):
    schedule = DEMO_SCHEDULE


class nnUNetTrainerEnTrustCrossModal_tinyCPU(ScheduleMixin, nnUNetTrainerEnTrustCrossModal):
    schedule = {**TINY_SCHEDULE, "crossmodal_fit_steps": 30}


class nnUNetTrainerModDrop_demo(ScheduleMixin, nnUNetTrainerModDrop):
    schedule = DEMO_SCHEDULE


class nnUNetTrainerModDrop_tinyCPU(ScheduleMixin, nnUNetTrainerModDrop):
    schedule = TINY_SCHEDULE


class nnUNetTrainer_demo(ScheduleMixin, nnUNetTrainer):
    """Plain nnU-Net on the demo's schedule: the baseline the demo and the benchmark compare against."""

    schedule = DEMO_SCHEDULE


class nnUNetTrainer_demo3d(ScheduleMixin, nnUNetTrainer):
    """Plain nnU-Net on the 3D demo's schedule."""

    schedule = DEMO_3D_SCHEDULE


class nnUNetTrainer_tinyCPU(ScheduleMixin, nnUNetTrainer):
    schedule = TINY_SCHEDULE


class nnUNetTrainerMCDropout_demo(ScheduleMixin, nnUNetTrainerMCDropout):
    schedule = DEMO_SCHEDULE


class nnUNetTrainerMCDropout_tinyCPU(ScheduleMixin, nnUNetTrainerMCDropout):
    schedule = TINY_SCHEDULE


class nnUNetTrainerCRNP_demo(ScheduleMixin, nnUNetTrainerCRNP):
    schedule = DEMO_SCHEDULE


class nnUNetTrainerCRNP_tinyCPU(ScheduleMixin, nnUNetTrainerCRNP):
    schedule = TINY_SCHEDULE


class nnUNetTrainerEnTrustNoEnFuse_demo(ScheduleMixin, nnUNetTrainerEnTrustNoEnFuse):
    schedule = DEMO_SCHEDULE


class nnUNetTrainerEnTrustNoEnFuse_tinyCPU(ScheduleMixin, nnUNetTrainerEnTrustNoEnFuse):
    schedule = TINY_SCHEDULE


class nnUNetTrainerEnTrustNoSteps_demo(ScheduleMixin, nnUNetTrainerEnTrustNoSteps):
    schedule = DEMO_SCHEDULE


class nnUNetTrainerEnTrustNoSteps_tinyCPU(ScheduleMixin, nnUNetTrainerEnTrustNoSteps):
    schedule = TINY_SCHEDULE


class nnUNetTrainerEnTrustNoAlternatives_demo(ScheduleMixin, nnUNetTrainerEnTrustNoAlternatives):
    schedule = DEMO_SCHEDULE


class nnUNetTrainerEnTrustNoAlternatives_tinyCPU(ScheduleMixin, nnUNetTrainerEnTrustNoAlternatives):
    schedule = TINY_SCHEDULE


class nnUNetTrainerEnTrustNoProbe_demo(ScheduleMixin, nnUNetTrainerEnTrustNoProbe):
    schedule = DEMO_SCHEDULE


class nnUNetTrainerEnTrustNoProbe_tinyCPU(ScheduleMixin, nnUNetTrainerEnTrustNoProbe):
    schedule = TINY_SCHEDULE
