"""ModEnc: the width rule and per-modality independence of the grouped encoder."""
import torch
from conftest import arch_kwargs
from dynamic_network_architectures.architectures.unet import PlainConvUNet

from entrust_nnunet.model.encoders import modality_widths
from entrust_nnunet.model.network import EnTrustUNet


def test_width_rule_keeps_parameters_near_plain():
    assert modality_widths([32, 64, 128], 4) == [8, 16, 32]
    assert modality_widths([32, 64], 8) == [8, 8]  # the floor
    for m in (2, 3, 4):
        ours = sum(p.numel() for p in EnTrustUNet(m, num_classes=3, **arch_kwargs(2, 4)).parameters())
        plain = sum(p.numel() for p in PlainConvUNet(m, num_classes=3, **arch_kwargs(2, 4)).parameters())
        assert 0.5 < ours / plain < 1.1, (m, ours, plain)


def test_modality_encoders_are_independent_per_modality():
    """The grouped encoder is M separate encoders: changing modality 1 leaves stream 0 untouched."""
    from entrust_nnunet.model.encoders import ModalityEncoders

    torch.manual_seed(0)
    kw = arch_kwargs(2)
    enc = ModalityEncoders(3, kw["n_stages"], kw["features_per_stage"], kw["conv_op"], kw["kernel_sizes"],
                           kw["strides"], kw["n_conv_per_stage"], True, kw["norm_op"], kw["norm_op_kwargs"],
                           nonlin=kw["nonlin"], nonlin_kwargs=kw["nonlin_kwargs"]).eval()
    x = torch.randn(2, 3, 32, 32)
    y = x.clone()
    y[:, 1] = torch.randn(2, 32, 32)
    a, b = enc(x), enc(y)
    for s, w in enumerate(enc.widths):
        assert a[s].shape == (2, 3, w, 32 // 2 ** s, 32 // 2 ** s)
        torch.testing.assert_close(a[s][:, 0], b[s][:, 0])
        torch.testing.assert_close(a[s][:, 2], b[s][:, 2])
        assert (a[s][:, 1] - b[s][:, 1]).abs().max() > 1e-3
