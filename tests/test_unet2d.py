"""The SSL4MIS / UniMatch 2D UNet: exact parameter count, pyramid shapes, dropout placement."""

from __future__ import annotations

import torch
from torch import nn

from semiseg.methods.base import NetSpec
from semiseg.nets import count_parameters, default_network
from semiseg.nets.unet2d import UNet2D


def test_parameter_count_matches_the_official_module() -> None:
    assert count_parameters(UNet2D(1, 4)) == 1_813_764
    # Only the output convolution depends on the class count: 16 * 9 weights + 1 bias per class.
    assert count_parameters(UNet2D(1, 2)) == 1_813_764 - 2 * (16 * 9 + 1)


def test_pyramid_and_output_shapes() -> None:
    net = UNet2D(1, 4)
    features = net.encoder(torch.zeros(2, 1, 64, 48))
    assert [tuple(f.shape) for f in features] == [(2, 16, 64, 48), (2, 32, 32, 24), (2, 64, 16, 12),
                                                  (2, 128, 8, 6), (2, 256, 4, 3)]
    assert net(torch.zeros(2, 1, 64, 48)).shape == (2, 4, 64, 48)


def test_bilinear_up_sampling_and_dropout_only_in_the_encoder() -> None:
    net = UNet2D(1, 4)
    assert not any(isinstance(m, nn.ConvTranspose2d) for m in net.modules())
    assert [m.p for m in net.encoder.modules() if isinstance(m, nn.Dropout)] == [0.05, 0.1, 0.2, 0.3, 0.5]
    assert not any(isinstance(m, nn.Dropout) for m in net.decoder.modules())
    assert all(m.negative_slope == 0.01 for m in net.modules() if isinstance(m, nn.LeakyReLU))


def test_dropout_is_active_in_train_mode_only_and_gradients_reach_every_weight() -> None:
    torch.manual_seed(0)
    net = UNet2D(1, 4)
    x = torch.randn(2, 1, 32, 32)
    net.eval()
    assert torch.equal(net(x), net(x))
    net.train()
    out = net(x)
    assert not torch.equal(out, net(x))
    out.square().mean().backward()
    assert all(p.grad is not None and p.grad.abs().sum() > 0 for p in net.parameters())


def test_default_network_for_2d_data_is_the_unet() -> None:
    net = default_network(NetSpec(in_channels=1, num_classes=4, spatial_dims=2))
    assert isinstance(net, UNet2D) and count_parameters(net) == 1_813_764
