"""EnFuse's independence penalties against references and their limits."""
import numpy as np
import pytest
import torch
from conftest import arch_kwargs

from entrust_nnunet.model.enfuse import cross_covariance_penalty, hsic_penalty
from entrust_nnunet.model.network import EnTrustUNet


def test_cross_covariance_reference_and_limits():
    g = torch.Generator().manual_seed(0)
    a, b = torch.randn(2, 4, 64, 64, generator=g), torch.randn(2, 3, 64, 64, generator=g)
    # reference: numpy correlation coefficients between every channel pair, squared, averaged
    ref = np.mean([np.corrcoef(a[i, c].ravel(), b[i, d].ravel())[0, 1] ** 2
                   for i in range(2) for c in range(4) for d in range(3)])
    assert float(cross_covariance_penalty(a, b)) == pytest.approx(ref, rel=1e-3)
    assert float(cross_covariance_penalty(a, b)) < 0.01  # independent
    assert float(cross_covariance_penalty(a[:, :1], a[:, :1])) == pytest.approx(1.0, abs=1e-3)
    assert float(cross_covariance_penalty(a, 3 * a + 0.1 * b[:, :1])) > 0.2  # correlated
    assert float(cross_covariance_penalty(a, 1000 * a)) == pytest.approx(float(cross_covariance_penalty(a, a)), rel=1e-4)


def test_enfuse_independence_penalty_is_the_mean_of_pairwise_penalties():
    """The one-pass xcov penalty of EnFuse equals the mean of cross_covariance_penalty over its 1 + 2M pairs."""
    g = torch.Generator().manual_seed(2)
    m, w = 3, 4
    f_c, f_cf = torch.randn(2, w, 16, 16, generator=g), torch.rand(2, 1, 16, 16, generator=g)
    f_u = torch.randn(2, m, w, 16, 16, generator=g) + 0.5 * f_c[:, None]  # correlated with F_c on purpose
    parts = {"F_c": f_c, "F_u": f_u, "F_cf": f_cf}
    pairs = [(f_c, f_cf)] + [p for i in range(m) for p in ((f_c, f_u[:, i]), (f_u[:, i], f_cf))]
    expected = np.mean([float(cross_covariance_penalty(a, b)) for a, b in pairs])
    fuse = EnTrustUNet(m, num_classes=2, **arch_kwargs(2)).fuse[0]
    assert float(fuse.independence_penalty(parts)) == pytest.approx(expected, rel=1e-5)
    assert expected > 0.02  # the correlated pairs count (independent parts score ~1/256)


def test_hsic_sees_nonlinear_dependence_that_xcov_misses():
    g = torch.Generator().manual_seed(1)
    a = torch.randn(1, 1, 32, 32, generator=g)
    indep = torch.randn(1, 1, 32, 32, generator=g)
    sq = a ** 2  # uncorrelated with a (symmetric a), but fully dependent
    assert float(cross_covariance_penalty(a, sq)) < 0.02
    h_dep = float(hsic_penalty(a, sq, num_voxels=256, generator=torch.Generator().manual_seed(0)))
    h_ind = float(hsic_penalty(a, indep, num_voxels=256, generator=torch.Generator().manual_seed(0)))
    assert h_dep > 0.2 and h_ind < 0.05 and h_dep > 5 * h_ind


def test_hsic_option_with_an_absent_modality_has_finite_gradients_and_weights_the_stream_out():
    """An absent stream is exactly 0: its centred Gram matrix is 0, and the square root's gradient at 0 made every
    gradient NaN (under AMP each such step was skipped). Its pairs now count only where the modality is present."""
    torch.manual_seed(0)
    net = EnTrustUNet(3, num_classes=2, independence="hsic", **arch_kwargs(2))
    x = torch.randn(2, 3, 32, 32, requires_grad=True)
    parts = net(x, return_parts=True, modality_mask=torch.tensor([[1.0, 0.0, 1.0], [1.0, 1.0, 1.0]]))
    net.auxiliary_losses(parts, torch.randint(0, 2, (2, 1, 32, 32)))["independence"].backward()
    assert torch.isfinite(x.grad).all()
    assert all(torch.isfinite(p.grad).all() for p in net.parameters() if p.grad is not None)
    a, b = torch.randn(2, 4, 8, 8), torch.randn(2, 4, 8, 8)
    b[0] = 0  # absent in sample 0
    gen = torch.Generator
    weighted = hsic_penalty(a, b, generator=gen().manual_seed(0), weight=torch.tensor([0.0, 1.0]))
    alone = hsic_penalty(a, b, generator=gen().manual_seed(0))  # the mean over both samples, the absent one 0
    assert float(hsic_penalty(a[:1], b[:1])) == 0.0 and float(weighted) == pytest.approx(2 * float(alone))


@pytest.mark.parametrize("dim", [2, 3])
def test_enfuse_without_a_mask_equals_the_all_present_mask(dim):
    """The trunk hands EnFuse no mask when every modality is present (it skips the masking, which is then the
    identity): the same parts as with an explicit all-ones mask, with reliability weights or without."""
    torch.manual_seed(0)
    net = EnTrustUNet(3, num_classes=3, **arch_kwargs(dim)).eval()
    fuse = net.fuse[0]
    size = (8, 8) if dim == 2 else (4, 8, 8)
    h, d = torch.randn(2, 3, fuse.E_c.expand.in_channels, *size), torch.rand(2, 1, *size)
    weights = torch.softmax(torch.randn(2, 3), 1)
    for w in (None, weights):
        fast, masked = fuse(h, d, None, w), fuse(h, d, torch.ones(2, 3), w)
        for key in ("F_en", "F_c", "F_u", "F_cf", "gates"):
            torch.testing.assert_close(fast[key], masked[key])
