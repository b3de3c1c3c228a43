"""The cross-modal prediction conflict: high where one modality shows what the others hide, low on edges that every
modality shows; the coin reading of it; EnTrust reading it."""
import numpy as np
import pytest
import torch
from scipy import ndimage

from conftest import arch_kwargs
from entrust_nnunet.model.alternatives import coin_alternatives, coin_reading, expected_alternative
from entrust_nnunet.model.crossmodal import (HIGH, LOW, CrossModalPredictor, EnTrustCrossModalUNet, fit_predictor,
                                             gaussian_smooth)

CONTRASTS = (1.0, -1.0, 0.6)  # each modality's step from tissue to the disk


def _images(rng, size=32, extra_in=None):
    """Three modalities of one blurred disk (every modality shows it, with its own contrast) and noise; ``extra_in``:
    a modality that also shows a blob the others hide. Returns (images (3, s, s), disk edge band, blob)."""
    yy, xx = np.mgrid[:size, :size]
    cy, cx, r = rng.uniform(10, 22), rng.uniform(10, 22), rng.uniform(4, 7)
    disk = np.hypot(yy - cy, xx - cx) < r
    blob = np.zeros_like(disk)
    if extra_in is not None:
        by, bx = (4, 4) if cy > 16 or cx > 16 else (27, 27)
        blob = np.hypot(yy - by, xx - bx) < 3
    images = []
    for m, step in enumerate(CONTRASTS):
        shown = disk | (blob if m == extra_in else False)
        images.append(ndimage.gaussian_filter(step * shown.astype(float), 0.9) + rng.normal(0, 0.1, disk.shape))
    edge = ndimage.binary_dilation(disk, iterations=1) & ~ndimage.binary_erosion(disk, iterations=1)
    return np.stack(images).astype(np.float32), edge, blob


@pytest.fixture(scope="module")
def trained_predictor():
    torch.manual_seed(0)
    rng = np.random.default_rng(0)
    data = torch.from_numpy(np.stack([_images(rng)[0] for _ in range(64)]))
    net = CrossModalPredictor(torch.nn.Conv2d, 3, width=8)
    assert float(net.fitted) == 0
    first, last = fit_predictor(net, (data[torch.randint(0, len(data), (8,))] for _ in iter(int, 1)), steps=300)
    assert float(net.fitted) == 1
    return net, first, last


def test_gaussian_smooth_is_scipys_gaussian_filter():
    x = torch.randn(2, 3, 9, 11, dtype=torch.float64)
    ref = np.stack([[ndimage.gaussian_filter(c, 1.0, mode="nearest", truncate=3.0) for c in b] for b in x.numpy()])
    np.testing.assert_allclose(gaussian_smooth(x, 1.0).numpy(), ref, atol=1e-10)
    x3 = torch.randn(1, 1, 5, 6, 7, dtype=torch.float64)
    np.testing.assert_allclose(gaussian_smooth(x3, 1.0).numpy()[0, 0],
                               ndimage.gaussian_filter(x3.numpy()[0, 0], 1.0, mode="nearest", truncate=3.0), atol=1e-10)


def test_conflict_is_high_where_one_modality_shows_a_blob_and_low_on_shared_edges(trained_predictor):
    net, first, last = trained_predictor
    assert last < first - 1.0  # the NLL falls
    rng = np.random.default_rng(1)
    inside, edges, elsewhere = [], [], []
    with torch.no_grad():
        for m in (0, 1, 2):  # a blob never seen in training, shown by each modality in turn
            images, edge, blob = _images(rng, extra_in=m)
            x = torch.from_numpy(images)[None]
            c = net.conflict(net(x), x, torch.ones(1, 3))[0, 0].numpy()
            inside.append(c[blob].mean())
            edges.append(c[edge].mean())
            elsewhere.append(c[~edge & ~ndimage.binary_dilation(blob, iterations=3)].mean())
    assert min(inside) > 0.5, inside
    assert max(edges) < 0.1 and max(elsewhere) < 0.05, (edges, elsewhere)


def test_conflict_ramp_and_absent_modalities():
    """``c`` is 0 up to z2 = LOW, 1 from HIGH, log-linear between; a sample with a modality absent has none and
    adds nothing to the NLL; an unfitted predictor gives none at all."""
    net = CrossModalPredictor(torch.nn.Conv2d, 2, width=4)
    x = torch.zeros(3, 2, 16, 16)
    for i, z2 in enumerate((LOW / 2, (LOW * HIGH) ** 0.5, HIGH * 2)):
        x[i, 0] = z2 ** 0.5  # a constant residual: smoothing leaves z2 as it is
    prediction = torch.zeros(3, 2, 2, 16, 16)  # mu 0, log var 0
    assert float(net.conflict(prediction, x, torch.ones(3, 2)).abs().max()) == 0
    net.fitted.fill_(1.0)
    c = net.conflict(prediction, x, torch.ones(3, 2))
    torch.testing.assert_close(c[:, 0, 8, 8], torch.tensor([0.0, 0.5, 1.0]))
    mask = torch.tensor([[1.0, 1.0], [1.0, 0.0], [1.0, 1.0]])
    assert float(net.conflict(prediction, x, mask)[1].abs().max()) == 0
    nll = net.nll(prediction, x, mask)
    expected = 0.5 * (x[[0, 2]] ** 2).mean()
    torch.testing.assert_close(nll, expected)
    with pytest.raises(ValueError, match="at least two modalities"):
        CrossModalPredictor(torch.nn.Conv2d, 1)


def test_coin_reading_takes_or_leaves_the_open_region_whole():
    mean = torch.zeros(1, 3, 4, 4)
    mean[:, 0] = 0.9
    mean[:, 2] = 0.08  # the likeliest foreground class is 2
    mean[:, 1] = 0.02
    taken, left = coin_reading(mean)
    assert taken[0, :, 0, 0].tolist() == [0, 0, 1] and left[0, :, 0, 0].tolist() == [1, 0, 0]
    hyps = mean[None].expand(8, -1, -1, -1, -1).clone()
    gate = torch.zeros(1, 1, 1, 4, 4)
    gate[..., 1:3, 1:3] = 1.0
    out = coin_alternatives(hyps, gate)
    inside = out[:, 0, :, 1:3, 1:3].argmax(1).flatten(1)
    assert (inside == inside[:, :1]).all()  # whole region per hypothesis
    assert inside[:, 0].tolist() == [0, 2, 0, 2, 0, 2, 0, 2]  # van der Corput: left, taken, ...
    torch.testing.assert_close(out[:, :, :, 0, 0], hyps[:, :, :, 0, 0])  # gate 0: unchanged
    conflict = gate[0]
    expected = expected_alternative(mean, torch.zeros(1, 3, 3, 4, 4), conflict, torch.ones(1, 3), 1.0, "coin")
    # half and half, with the network's own 2 % left to break the tie
    torch.testing.assert_close(expected[0, :, 1, 1], 0.98 * torch.tensor([0.5, 0.0, 0.5]) + 0.02 * mean[0, :, 1, 1])
    assert expected[0].argmax(0)[1, 1] == 0  # the network said background: the mask stays background
    torch.testing.assert_close(out.mean(0)[0, :, 1, 1], expected[0, :, 1, 1])  # K = 8: half taken
    lesion = mean.flip(1)  # the network says class 2 at 0.9
    assert expected_alternative(lesion, torch.zeros(1, 3, 3, 4, 4), conflict, torch.ones(1, 3), 1.0,
                                "coin")[0].argmax(0)[1, 1] == 2
    split = torch.tensor([0.9, 0.08, 0.02]).view(1, 3, 1, 1).expand(1, 3, 4, 4)  # the caller's: class 1
    assert coin_alternatives(hyps, gate, split=split)[1, 0].argmax(0)[1, 1] == 1
    regions = torch.tensor([0.6, 0.4, 0.1]).view(1, 3, 1, 1).expand(1, 3, 4, 4)
    assert coin_reading(regions, regions=True)[0][0, :, 0, 0].tolist() == [1, 1, 0]


def test_drawn_coin_takes_the_connected_open_region_whole_not_only_its_core():
    """A taken hypothesis over a confident background turns the whole open structure (gate > STRUCTURE_GATE around a
    core above 1/2) to foreground, not only the core; a weak open patch without such a core stays a blend; the
    expectation is the draws' average."""
    hyps = torch.zeros(2, 1, 2, 1, 12)
    hyps[:, :, 0] = 1.0
    gate = torch.tensor([0, 0.2, 0.3, 0.9, 0.3, 0.2, 0, 0, 0.3, 0.3, 0, 0]).view(1, 1, 1, 1, 12)
    out = coin_alternatives(hyps, gate, split=torch.tensor([0.5, 0.5]).view(1, 2, 1, 1).expand(1, 2, 1, 12))
    taken = out[1, 0].argmax(0)[0]  # hypothesis 1 takes
    assert taken.tolist() == [0, 1, 1, 1, 1, 1, 0, 0, 0, 0, 0, 0]
    assert (out[0, 0].argmax(0) == 0).all()  # hypothesis 0 leaves it
    torch.testing.assert_close(out[1, 0, 1, 0, 8], torch.tensor(0.3 * 0.98))  # no core: the gate as it is
    # the expectation (the network's mean, its maps and class probabilities) is what the draws average to, structure
    # and all: half and half over the whole structure, not the per-voxel gate's blend of its rim
    split = torch.tensor([0.5, 0.5]).view(1, 2, 1, 1).expand(1, 2, 1, 12)
    draws = coin_alternatives(hyps[:1].expand(8, -1, -1, -1, -1), gate, split=split)
    expected = coin_alternatives(hyps[:1], gate, drawn=False, split=split)[0]
    torch.testing.assert_close(draws.mean(0), expected)
    torch.testing.assert_close(expected[0, 1, 0, 1:6], torch.full((5,), 0.49))


def test_absent_channels_reach_no_output():
    net = EnTrustCrossModalUNet(3, num_classes=3, **arch_kwargs(2))
    net.crossmodal.fitted.fill_(1.0)
    x = torch.randn(1, 3, 16, 16)
    x[:, 2] = float("nan")
    net.eval()
    out = net.sample(x, modality_mask=torch.tensor([[1.0, 1.0, 0.0]]))
    assert all(torch.isfinite(v).all() for v in out.values())
    assert float(out["conflict"].abs().max()) == 0  # no conflict without every modality


def test_entrust_reads_the_fitted_crossmodal_conflict_and_trains_without_the_predictors():
    torch.manual_seed(0)
    net = EnTrustCrossModalUNet(3, num_classes=3, deep_supervision=True, **arch_kwargs(2))
    net.apply(net.initialize)
    assert net.conflict_reading == "coin" and net.expert_alternatives == 1.0
    x = torch.randn(2, 3, 32, 32)
    net.eval()
    assert float(net.sample(x)["conflict"].abs().max()) == 0  # unfitted: no map
    net.crossmodal.fitted.fill_(1.0)
    out = net.sample(x)
    with torch.no_grad():
        expected = net.crossmodal.conflict(net.crossmodal(x), x, torch.ones(2, 3))[:, 0]
    assert float(expected.max()) > 0  # random weights predict nothing: a map to read
    torch.testing.assert_close(out["conflict"], expected)
    assert out["hypotheses"].shape == (8, 2, 3, 32, 32)
    # fully open everywhere: the mean is the coin's half and half (the head's 2 % breaks the tie)
    net.crossmodal.conflict = lambda prediction, images, mask: torch.ones_like(images[:, :1])
    mean = net.sample(x)["mean"]
    assert float((mean.amax(1) - 0.5).abs().max()) <= 0.0101
    del net.crossmodal.conflict
    # training neither runs the predictors nor gives them a loss term
    net.train()
    net.crossmodal.forward = None  # a call would fail
    parts = net(x, return_parts=True)
    assert "image_conflict" not in parts
    assert "crossmodal" not in net.auxiliary_losses(parts, torch.randint(0, 3, (2, 1, 32, 32)))
