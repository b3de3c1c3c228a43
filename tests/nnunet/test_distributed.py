"""Our additions under DDP (what nnU-Net's ``-num_gpus`` does), on CPU with two gloo processes.

nnU-Net's own DDP path needs CUDA; what we add to it (the loss wrapper reading the parts the wrapped
network caches, CalibHead frozen while training, the calibration fit sent from rank 0) runs here.
"""
import torch
import torch.distributed as dist
import torch.multiprocessing as mp
from torch import nn
from torch.nn.parallel import DistributedDataParallel as DDP

from conftest import arch_kwargs
from entrust_nnunet.model.network import EnTrustUNet
from entrust_nnunet.nnunet.distributed import broadcast_state, freeze, thawed, unwrap
from entrust_nnunet.nnunet.trainers import EnTrustLoss


class _DeepSupervisedCE(nn.Module):
    """Cross-entropy on every deep-supervision output, as nnU-Net's loss uses every decoder head."""

    def forward(self, output, target):
        return sum(nn.functional.cross_entropy(o, nn.functional.interpolate(target.float(), o.shape[2:]).long()[:, 0])
                   for o in output)


def _worker(rank: int, init_file: str, results):
    dist.init_process_group("gloo", init_method=f"file://{init_file}", rank=rank, world_size=2)
    torch.manual_seed(0)  # the same initial weights on both ranks, as nnU-Net's checkpoints give
    net = EnTrustUNet(2, num_classes=3, deep_supervision=True, **arch_kwargs(2))  # as nnU-Net trains
    freeze(net.calib)
    model = DDP(net)
    loss_fn = EnTrustLoss(_DeepSupervisedCE(), unwrap(model))
    unwrap(model).cache_parts = True
    opt = torch.optim.SGD(model.parameters(), lr=0.01)
    g = torch.Generator().manual_seed(rank)  # different data per rank: DDP must average the gradients
    for _ in range(2):
        x = torch.randn(2, 2, 32, 32, generator=g)
        y = torch.randint(0, 3, (2, 1, 32, 32), generator=g)
        opt.zero_grad()
        loss = loss_fn(model(x), y)
        loss.backward()
        opt.step()
    calib = unwrap(model).calib
    if rank == 0:
        with thawed(calib):
            for p in calib.parameters():
                p.data.fill_(0.5)
        calib.fitted.fill_(1.0)
    broadcast_state(calib)
    first = next(iter(unwrap(model).encoders.parameters())).detach().flatten()[:5].tolist()
    results.put((rank, first, float(calib.net[0].weight.mean()), float(calib.fitted),
                 any(p.requires_grad for p in calib.parameters()), len(loss_fn.history["generative"])))
    dist.destroy_process_group()


def _two_ranks(worker, tmp_path, timeout: int = 180) -> dict:
    """Run ``worker(rank, init_file, results)`` on two spawned processes; rank -> what it put after its rank."""
    ctx = mp.get_context("spawn")
    results = ctx.Queue()
    procs = [ctx.Process(target=worker, args=(r, str(tmp_path / "init"), results)) for r in range(2)]
    for p in procs:
        p.start()
    out = dict((r[0], r[1:]) for r in (results.get(timeout=timeout) for _ in procs))
    for p in procs:
        p.join(timeout=60)
        assert p.exitcode == 0
    return out


def test_entrust_loss_and_calibration_under_ddp(tmp_path):
    # without freeze(calib) DDP stops at the second step: CalibHead gets no gradient from the training loss
    out = _two_ranks(_worker, tmp_path)
    (w0, c0, f0, grad0, n0), (w1, c1, f1, grad1, n1) = out[0], out[1]
    assert w0 == w1  # gradients were averaged: the replicas stayed identical
    assert c0 == c1 == 0.5 and f0 == f1 == 1.0  # rank 0's fit reached rank 1
    assert not grad0 and not grad1  # frozen again after the fit
    assert n0 == n1 == 2  # the EnTrust terms were computed from the wrapped network's parts


def _slow_fit_worker(rank: int, init_file: str, results):
    import time
    from datetime import timedelta

    from entrust_nnunet.nnunet.distributed import waiting_group

    # the default group's timeout stands for NCCL's 10 minutes; rank 0's fit takes longer than it
    # (set after the rendezvous: two ranks importing torch on a loaded machine may arrive seconds apart)
    dist.init_process_group("gloo", init_method=f"file://{init_file}", rank=rank, world_size=2)
    dist.set_timeout(timedelta(seconds=2))
    module = nn.Linear(2, 2)
    group = waiting_group(timedelta(seconds=60))
    if rank == 0:
        time.sleep(5)
        with torch.no_grad():
            module.weight.fill_(0.25)
    try:
        broadcast_state(module, group=group)
        results.put((rank, float(module.weight.mean())))
    except RuntimeError as e:
        results.put((rank, str(e).splitlines()[0][:200]))
    dist.destroy_process_group()


def test_other_ranks_wait_for_a_fit_longer_than_the_default_timeout(tmp_path):
    assert _two_ranks(_slow_fit_worker, tmp_path, timeout=120) == {0: (0.25,), 1: (0.25,)}
