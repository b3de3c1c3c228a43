"""Schedule variants: the mixin sets nnU-Net's attributes and refuses a key nnU-Net's trainer does not have."""
import pytest
import torch

from conftest import use_nnunet_roots
from entrust_nnunet.nnunet import variants
from entrust_nnunet.nnunet.trainers import nnUNetTrainerEnTrust
from entrust_nnunet.nnunet.variants import DEMO_SCHEDULE, TINY_SCHEDULE, ScheduleMixin


def _trainer(cls, planned_phantoms):
    import json
    from pathlib import Path

    env, name = planned_phantoms
    pre = Path(env["nnUNet_preprocessed"]) / name
    plans = json.loads((pre / "nnUNetPlans.json").read_text())
    plans["continue_training"] = False  # nnU-Net >= 2.8 pops it in __init__ (its get_trainer_from_args sets it)
    dataset_json = json.loads((pre / "dataset.json").read_text())
    return cls(plans, "2d", 0, dataset_json, torch.device("cpu"))


def test_schedule_overwrites_nnunet_defaults(planned_phantoms, monkeypatch):
    env, _ = planned_phantoms
    use_nnunet_roots(env, monkeypatch)
    t = _trainer(variants.nnUNetTrainerEnTrust_tinyCPU, planned_phantoms)
    assert (t.num_epochs, t.num_iterations_per_epoch, t.save_every) == (4, 3, 1)


def test_misspelled_schedule_key_fails_loudly(planned_phantoms, monkeypatch):
    env, _ = planned_phantoms
    use_nnunet_roots(env, monkeypatch)

    class Misspelled(ScheduleMixin, nnUNetTrainerEnTrust):
        schedule = {"num_epoch": 3}

    with pytest.raises(AttributeError, match="num_epoch"):
        _trainer(Misspelled, planned_phantoms)


def test_every_variant_names_its_schedule_and_keeps_the_mixin_first():
    classes = [c for c in vars(variants).values() if isinstance(c, type) and issubclass(c, ScheduleMixin)
               and c is not ScheduleMixin]
    assert len(classes) >= 10
    for cls in classes:
        assert cls.__mro__[1] is ScheduleMixin, cls.__name__
        assert cls.schedule, cls.__name__
    assert variants.nnUNetTrainerEnTrust_demo.schedule is DEMO_SCHEDULE
    assert variants.nnUNetTrainer_tinyCPU.schedule is TINY_SCHEDULE


def test_training_seed_comes_from_the_environment_and_is_applied(planned_phantoms, monkeypatch):
    env, _ = planned_phantoms
    use_nnunet_roots(env, monkeypatch)
    monkeypatch.setenv(variants.TRAIN_SEED_ENV, "7")
    t = _trainer(variants.nnUNetTrainer_tinyCPU, planned_phantoms)
    assert t.seed == 7
    t.initialize()
    first = [p.detach().clone() for p in t.network.parameters()]
    again = _trainer(variants.nnUNetTrainer_tinyCPU, planned_phantoms)
    again.initialize()
    assert all(torch.equal(a, b) for a, b in zip(first, again.network.parameters()))  # same seed, same weights
    assert "training seed: 7" in open(t.log_file, encoding="utf-8").read()
    monkeypatch.setenv(variants.TRAIN_SEED_ENV, "8")
    other = _trainer(variants.nnUNetTrainer_tinyCPU, planned_phantoms)
    other.initialize()
    assert not all(torch.equal(a, b) for a, b in zip(first, other.network.parameters()))
    monkeypatch.setenv(variants.TRAIN_SEED_ENV, "x")
    with pytest.raises(ValueError, match=variants.TRAIN_SEED_ENV):
        variants.training_seed()


def test_test_schedules_draw_the_progress_plots_after_the_last_epoch_only():
    """final_plot_only (the tests' schedules): nnU-Net's and EnTrust's plots are skipped before the last epoch,
    drawn after it, and the trainer's own methods are back after every epoch."""
    calls = []

    class Logger:
        def plot_progress_png(self, folder):
            calls.append(("progress", trainer.current_epoch))

    class Trainer:
        def on_epoch_end(self):
            self.logger.plot_progress_png("out")
            self._plot_aux_losses()

        def _plot_aux_losses(self):
            calls.append(("entrust", self.current_epoch))

    class Variant(ScheduleMixin, Trainer):
        pass

    trainer = object.__new__(Variant)
    trainer.logger, trainer.num_epochs, trainer.final_plot_only = Logger(), 3, True
    for epoch in range(3):
        trainer.current_epoch = epoch
        trainer.on_epoch_end()
        assert "plot_progress_png" not in vars(trainer.logger) and "_plot_aux_losses" not in vars(trainer)
    assert calls == [("progress", 2), ("entrust", 2)]
    trainer.final_plot_only, calls[:] = False, []
    trainer.on_epoch_end()
    assert calls == [("progress", 2), ("entrust", 2)]
    assert variants.TINY_SCHEDULE["final_plot_only"] and not variants.DEMO_SCHEDULE.get("final_plot_only")


def test_head_only_ablation_trains_with_entrusts_weights_less_segdiffs(planned_phantoms, monkeypatch):
    """The ablation removes SegDiff's two losses and nothing else: every other weight is EnTrust's own (an
    earlier version rebuilt the loss from LOSS_WEIGHTS and so trained CLoE's terms that EnTrust had off)."""
    from entrust_nnunet.nnunet.ablation_trainers import nnUNetTrainerEnTrustNoSteps

    env, _ = planned_phantoms
    use_nnunet_roots(env, monkeypatch)
    base = _trainer(nnUNetTrainerEnTrust, planned_phantoms).loss_weights()
    t = _trainer(nnUNetTrainerEnTrustNoSteps, planned_phantoms)
    t.initialize()
    assert t.loss.weights == {**base, "generative": 0.0, "start": 0.0}
    assert (t.loss.regions, t.loss.ignore_label) == (t.label_manager.has_regions, t.label_manager.ignore_label)
