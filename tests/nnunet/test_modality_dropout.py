"""Modality dropout: masks keep a non-empty subset, all modalities with the documented probability; the
trainers apply them around nnU-Net's train_step (EnTrust by masking, the nnU-Net baseline by zero-filling)."""

import torch

from conftest import initialized_trainer
from entrust_nnunet.nnunet import variants
from entrust_nnunet.nnunet.modality_dropout import calibration_subsets, modality_dropout_masks, subsets


def test_masks_keep_a_nonempty_subset_and_everything_with_probability_one_minus_p():
    masks = modality_dropout_masks(24000, 3, 0.5, torch.Generator().manual_seed(0))
    assert masks.shape == (24000, 3) and (masks.sum(1) >= 1).all()
    assert abs(float((masks.sum(1) == 3).float().mean()) - 0.5) < 0.02
    counts = {}
    for row in masks.int().tolist():
        counts[tuple(row)] = counts.get(tuple(row), 0) + 1
    assert len(counts) == 7  # every non-empty subset occurs
    proper = [v / 24000 for k, v in counts.items() if sum(k) < 3]
    assert all(abs(f - 0.5 / 6) < 0.015 for f in proper)  # proper subsets drawn uniformly
    assert (modality_dropout_masks(50, 3, 1.0).sum(1) < 3).all()
    assert modality_dropout_masks(50, 3, 0.0).eq(1).all() and modality_dropout_masks(50, 1, 1.0).eq(1).all()


def test_subsets_are_every_nonempty_subset_smallest_first():
    assert subsets(3) == [(0,), (1,), (2,), (0, 1), (0, 2), (1, 2), (0, 1, 2)]
    assert len(subsets(4)) == 15


def test_calibration_subsets_are_proper_and_seeded_by_the_case():
    every = calibration_subsets(3, 6, "case_000")
    assert sorted(every) == sorted({(a, b, c) for a in (0, 1) for b in (0, 1) for c in (0, 1)} - {(0, 0, 0), (1, 1, 1)})
    drawn = {key: calibration_subsets(4, 5, key) for key in ("case_000", "case_001", "case_002")}
    for key, sets in drawn.items():
        assert len(sets) == len(set(sets)) == 5 and all(0 < sum(s) < 4 for s in sets)
        assert calibration_subsets(4, 5, key) == sets  # the same case always sees the same subsets
    assert len({tuple(v) for v in drawn.values()}) > 1  # different cases see different subsets


def _batch(trainer, b=4):
    """A random batch shaped like nnU-Net's data loader's (deep-supervision targets at every scale)."""
    patch = list(trainer.configuration_manager.patch_size)
    m = trainer.num_input_channels
    target = [torch.randint(0, 3, (b, 1, *[max(1, round(p * s)) for p, s in zip(patch, scale)])).float()
              for scale in trainer._get_deep_supervision_scales()]
    return {"data": torch.randn(b, m, *patch) + 3.0, "target": target}


def test_entrust_training_steps_mask_every_sample(planned_phantoms, monkeypatch):
    torch.manual_seed(0)
    t = initialized_trainer(variants.nnUNetTrainerEnTrustModDrop_tinyCPU, planned_phantoms, monkeypatch)
    assert t.modality_dropout == 0.5 and variants.nnUNetTrainerEnTrust_tinyCPU.modality_dropout == 0.0
    seen = []
    t.network.register_forward_pre_hook(lambda mod, args: seen.append(mod.modality_mask))
    batch = _batch(t)
    losses = [t.train_step(batch)["loss"] for _ in range(6)]
    assert all(map(lambda v: v == v and abs(v) < 1e3, losses))
    masks = torch.cat(seen)
    assert masks.shape == (24, t.num_input_channels) and (masks.sum(1) >= 1).all()
    assert (masks.sum(1) < t.num_input_channels).any() and (masks.sum(1) == t.num_input_channels).any()
    assert t.network.modality_mask is None  # validation and inference see every modality again


def test_nnunet_baseline_zero_fills_dropped_channels(planned_phantoms, monkeypatch):
    torch.manual_seed(1)
    t = initialized_trainer(variants.nnUNetTrainerModDrop_tinyCPU, planned_phantoms, monkeypatch)
    seen = []
    t.network.register_forward_pre_hook(lambda mod, args: seen.append(args[0].detach().clone()))
    batch = _batch(t)
    for _ in range(4):
        t.train_step(batch)
    for x in seen:
        zero = x.flatten(2).abs().amax(2) == 0  # (B, M): channels dropped in this sample
        assert not zero.all(1).any()  # never every channel
        kept = ~zero
        torch.testing.assert_close(x[kept], batch["data"][kept])  # kept channels untouched
    assert any((x.flatten(2).abs().amax(2) == 0).any() for x in seen)


def _zero_filled_like(net, channels: int, present: list[bool]) -> torch.Tensor:
    """The mean probabilities of a plain ``net`` with ``present``'s absent modalities zero-filled by prediction,
    checked against the network on the input zeroed by hand; returns them."""
    from entrust_nnunet.model.sampling import SamplingSettings
    from entrust_nnunet.nnunet.predictor import uncertainty_statistics

    x = torch.randn(1, channels, 32, 32)
    zeroed = x.clone()
    zeroed[:, [c for c, p in enumerate(present) if not p]] = 0
    with torch.no_grad():
        masked = uncertainty_statistics(net, x, SamplingSettings(), torch.tensor(present))
        torch.testing.assert_close(masked["mean"], torch.softmax(net(zeroed), 1))
        assert (masked["mean"] - uncertainty_statistics(net, x, SamplingSettings())["mean"]).abs().max() > 1e-4
    return masked["mean"]


def test_prediction_zero_fills_absent_channels_for_plain_networks():
    from conftest import arch_kwargs
    from dynamic_network_architectures.architectures.unet import PlainConvUNet

    torch.manual_seed(0)
    net = PlainConvUNet(3, num_classes=2, deep_supervision=False, **arch_kwargs(2)).eval()
    _zero_filled_like(net, 3, [True, True, False])
    # a cascade stage: two prior channels after the three modalities, left as they are
    cascade = PlainConvUNet(5, num_classes=2, deep_supervision=False, **arch_kwargs(2)).eval()
    _zero_filled_like(cascade, 5, [True, False, True])


def test_calibration_also_sees_each_case_with_modalities_missing(planned_phantoms, monkeypatch):
    """A dropout-trained EnTrust fits CalibHead and the class temperature on every calibration case predicted with
    every modality and with each proper subset (masked, as at inference); without dropout only with every one."""
    torch.manual_seed(2)
    t = initialized_trainer(variants.nnUNetTrainerEnTrustModDrop_tinyCPU, planned_phantoms, monkeypatch)
    from entrust_nnunet.nnunet.predictor import EnTrustPredictor

    seen, pooled = [], EnTrustPredictor.pooled_statistics
    monkeypatch.setattr(EnTrustPredictor, "pooled_statistics",
                        lambda self, data: seen.append(self.network.modality_mask) or pooled(self, data))
    keys = sorted(t.do_split()[1])[:2]
    columns, error = t._calibration_voxels(keys)
    masks = [None if m is None else tuple(m.int().tolist()) for m in seen]
    assert len(masks) == 14 and set(masks) == {None, *calibration_subsets(3, 6, keys[0])}
    full = {k: v for k, v in t._calibration_cache.items() if "~" not in k}
    assert sorted(full) == keys and len(t._calibration_cache) == 14
    n = sum(v[1].numel() for v in full.values())
    assert error.numel() == 7 * n and columns["probabilities"].shape[0] == 7 * n
    # one case number per case, shared by its modality sets (the unit the conflict reading's choice resamples)
    sizes = {key: t._calibration_cache[key][1].numel() for key in keys}
    expected = torch.cat([torch.full((7 * sizes[key],), i, dtype=torch.int32) for i, key in enumerate(keys)])
    assert torch.equal(columns["case"], expected)
    # a case without T2 is not the case with every modality: the statistics differ
    k = keys[0]
    assert not torch.equal(t._calibration_cache[k][0]["probabilities"], t._calibration_cache[k + "~101"][0]["probabilities"])
    plain = initialized_trainer(variants.nnUNetTrainerEnTrust_tinyCPU, planned_phantoms, monkeypatch)
    assert plain.calibration_modalities(k) == [None]
    assert plain._calibration_voxels(keys)[1].numel() == n


def test_calib_head_fit_predicts_nothing_while_calib_head_is_moved_for_it(planned_phantoms, monkeypatch):
    """--val / --val_best fit CalibHead with nothing cached. Every case must be predicted before CalibHead moves to
    the CPU for its fit: the predictor moves the whole network to the trainer's device, and on CUDA that left
    CalibHead there under CPU voxels (a device mismatch after nnU-Net's masks were written, no maps)."""
    from entrust_nnunet.nnunet.distributed import unwrap

    torch.manual_seed(3)
    t = initialized_trainer(variants.nnUNetTrainerEnTrust_tinyCPU, planned_phantoms, monkeypatch)
    t.calibration_steps = 5
    calib, predictor, during_fit = unwrap(t.network).calib, t._predictor, []
    monkeypatch.setattr(t, "_predictor", lambda: during_fit.append(any(p.requires_grad for p in calib.parameters()))
                        or predictor())
    t._fit_calib_head(sorted(t.do_split()[1])[:2])
    assert during_fit and not any(during_fit)


def test_dropout_counts_the_datasets_channels_and_leaves_a_cascade_prior_alone():
    """A cascade stage's batch holds the previous stage's one-hot prior after the image channels: the masks have one
    column per dataset channel, and zero-fill touches image channels only."""
    from entrust_nnunet.nnunet.modality_dropout import ModalityDropoutZeroFill

    class Step:
        def train_step(self, batch):
            return batch

    class ZeroFill(ModalityDropoutZeroFill, Step):
        modality_dropout = 1.0  # every sample drops a proper subset
        dataset_json = {"channel_names": {str(c): f"m{c}" for c in range(4)}}

    torch.manual_seed(0)
    data = torch.ones(16, 7, 4, 4)
    seen = ZeroFill().train_step({"data": data})["data"]
    images, prior = seen[:, :4].flatten(2).amax(2), seen[:, 4:]
    assert ((images == 0).any(1) & (images == 1).any(1)).all()  # each sample: some dropped, some kept
    torch.testing.assert_close(prior, data[:, 4:])
