"""Pointwise convolutions as a matrix product: the same outputs and gradients as nnU-Net's conv_op."""
import pytest
import torch
from torch import nn

from entrust_nnunet.model.pointwise import pointwise_conv, pointwise_product


@pytest.mark.parametrize("conv_op", [nn.Conv2d, nn.Conv3d])
@pytest.mark.parametrize("groups", [1, 3])
@pytest.mark.parametrize("bias", [True, False])
@pytest.mark.parametrize("batch", [1, 2])  # one sample (inference) uses the weights without copying them
def test_pointwise_conv_equals_the_convolution(conv_op, groups, bias, batch):
    torch.manual_seed(0)
    size = (9, 10) if conv_op is nn.Conv2d else (5, 6, 7)
    ours, reference = pointwise_conv(conv_op)(6, 9, 1, groups=groups, bias=bias), conv_op(6, 9, 1, groups=groups,
                                                                                           bias=bias)
    assert issubclass(type(ours), conv_op) and ours.pointwise
    reference.load_state_dict(ours.state_dict())  # same parameters under the same names
    x = torch.randn(batch, 6, *size, requires_grad=True)
    y, y_ref = ours(x), reference(x)
    torch.testing.assert_close(y, y_ref)
    (g,) = torch.autograd.grad((y * y_ref.detach()).sum(), x)
    (g_ref,) = torch.autograd.grad((y_ref * y_ref.detach()).sum(), x)
    torch.testing.assert_close(g, g_ref)


def test_other_kernels_keep_the_convolution():
    """A 3x3 kernel (D_cf's, the flow head's) or a strided one is not pointwise: conv_op's own path."""
    torch.manual_seed(0)
    cls = pointwise_conv(nn.Conv2d)
    assert cls is pointwise_conv(nn.Conv2d)
    x = torch.randn(1, 4, 8, 8)
    for kwargs in ({"kernel_size": 3, "padding": 1}, {"kernel_size": 1, "stride": 2}):
        conv = cls(4, 5, **kwargs)
        assert not conv.pointwise
        torch.testing.assert_close(conv(x), nn.functional.conv2d(x, conv.weight, conv.bias, conv.stride, conv.padding))


def test_pointwise_product_by_hand():
    w = torch.tensor([[1.0, 2.0], [0.0, -1.0]]).view(2, 2, 1, 1)
    x = torch.tensor([[[1.0, 3.0]], [[2.0, 5.0]]]).view(1, 2, 1, 2)
    y = pointwise_product(x, w, torch.tensor([0.5, 0.0]))
    torch.testing.assert_close(y, torch.tensor([[[[5.5, 13.5]], [[-2.0, -5.0]]]]))
    # two groups: each output channel sees its own input channel
    y = pointwise_product(x, torch.tensor([2.0, 3.0]).view(2, 1, 1, 1), None, groups=2)
    torch.testing.assert_close(y, torch.tensor([[[[2.0, 6.0]], [[6.0, 15.0]]]]))
