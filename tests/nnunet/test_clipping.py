"""Per-group gradient clipping around nnU-Net's one ``clip_grad_norm_`` call."""
import torch
from torch import nn

from entrust_nnunet.nnunet.clipping import clip_grad_norm_per_group, clipping_per_group


def _net_with_grads(big: float, small: float) -> nn.Sequential:
    net = nn.Sequential(nn.Linear(4, 4), nn.Linear(4, 4))
    for p in net[0].parameters():
        p.grad = torch.full_like(p, big)
    for p in net[1].parameters():
        p.grad = torch.full_like(p, small)
    return net


def _norm(module: nn.Module) -> float:
    return float(torch.linalg.vector_norm(torch.stack([p.grad.norm() for p in module.parameters()])))


def test_each_group_is_clipped_to_the_bound_on_its_own():
    """Inside the context nnU-Net's call clips the dominant group to 12 and leaves the small one as it was;
    outside it the one global clip scales the small group down with the big one."""
    net = _net_with_grads(10.0, 0.1)
    small = _norm(net[1])
    with clipping_per_group(net, net[0]):
        total = torch.nn.utils.clip_grad_norm_(net.parameters(), 12)  # what nnU-Net's train_step calls
    assert abs(_norm(net[0]) - 12) < 1e-4 and abs(_norm(net[1]) - small) < 1e-6
    assert abs(float(total) - (44.72 ** 2 + small ** 2) ** 0.5) < 0.05  # the norm before clipping, as torch's
    assert torch.nn.utils.clip_grad_norm_ is clip_grad_norm_per_group.__globals__["_clip_grad_norm"]  # restored

    net = _net_with_grads(10.0, 0.1)
    torch.nn.utils.clip_grad_norm_(net.parameters(), 12)
    assert abs(_norm(net[0]) ** 2 + _norm(net[1]) ** 2 - 144) < 1e-2 and _norm(net[1]) < small / 3


def test_other_calls_and_missing_gradients_pass_through():
    """A call on other parameters is the real clip (one norm); a group without gradients is skipped."""
    net = _net_with_grads(10.0, 0.1)
    for p in net[1].parameters():
        p.grad = None
    with clipping_per_group(net, net[1]):
        torch.nn.utils.clip_grad_norm_(net.parameters(), 12)
        other = nn.Linear(4, 4)
        other.weight.grad = torch.full_like(other.weight, 10.0)
        torch.nn.utils.clip_grad_norm_([other.weight], 1)
    assert abs(_norm(net[0]) - 12) < 1e-4 and all(p.grad is None for p in net[1].parameters())
    assert abs(float(other.weight.grad.norm()) - 1) < 1e-5


def test_entrust_trainer_step_clips_segdiff_apart(monkeypatch):
    """nnUNetTrainerEnTrust runs nnU-Net's own train_step (stubbed here by its clip call) inside the per-group
    context: SegDiff's large gradients no longer scale the trunk's down."""
    from conftest import arch_kwargs
    from nnunetv2.training.nnUNetTrainer.nnUNetTrainer import nnUNetTrainer

    from entrust_nnunet.model.network import EnTrustUNet
    from entrust_nnunet.nnunet.trainers import nnUNetTrainerEnTrust

    def step(self, batch):  # the clip of nnU-Net's train_step, on every parameter of the network
        torch.nn.utils.clip_grad_norm_(self.network.parameters(), 12)
        return {}

    monkeypatch.setattr(nnUNetTrainer, "train_step", step)
    trainer = object.__new__(nnUNetTrainerEnTrust)
    trainer.network = EnTrustUNet(2, num_classes=2, **arch_kwargs(2))
    for name, p in trainer.network.named_parameters():
        p.grad = torch.full_like(p, 1.0 if name.startswith("segdiff.") else 1e-4)
    trunk = [p for n, p in trainer.network.named_parameters() if not n.startswith("segdiff.")]
    before = [p.grad.clone() for p in trunk]
    trainer.train_step({})
    assert all(torch.equal(p.grad, b) for p, b in zip(trunk, before))  # trunk's norm is far below 12
    assert abs(_norm(trainer.network.segdiff) - 12) < 1e-3
