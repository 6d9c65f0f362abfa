"""The legacy VNet family: exact parameter counts of the official modules, shapes, features."""

from __future__ import annotations

import torch

from semiseg.nets import MultiDecoderVNet, VNet, count_parameters, evaluated_parameters


def test_legacy_vnet_has_the_official_parameter_count() -> None:
    assert count_parameters(VNet(in_channels=1, n_classes=2)) == 9_448_866


def test_multi_decoder_counts_match_mcnet_and_mlrpl() -> None:
    assert count_parameters(MultiDecoderVNet(up_types=("transposed", "trilinear"))) == 12_347_716
    assert count_parameters(MultiDecoderVNet(up_types=("transposed", "nearest"))) == 12_347_716
    assert count_parameters(MultiDecoderVNet(up_types=("transposed", "trilinear", "nearest"))) == 15_246_566


def test_vnet_returns_logits_and_last_decoder_feature() -> None:
    net = VNet(n_filters=4).eval()
    x = torch.randn(2, 1, 32, 32, 16)
    logits, features = net.forward_with_features(x)
    assert logits.shape == (2, 2, 32, 32, 16)
    assert features.shape == (2, 4, 32, 32, 16)
    assert torch.equal(net(x), logits)


def test_dropout_is_active_only_in_train_mode() -> None:
    torch.manual_seed(0)
    net = VNet(n_filters=4)
    x = torch.randn(2, 1, 32, 32, 32)
    net.eval()
    assert torch.equal(net(x), net(x))
    net.train()
    _, f1 = net.forward_with_features(x)
    zeroed_channels = (f1.flatten(2).abs().sum(-1) == 0).sum()
    assert zeroed_channels > 0  # Dropout3d drops whole channels of x9


def test_multi_decoder_forward_is_the_first_decoder() -> None:
    net = MultiDecoderVNet(n_filters=4, up_types=("transposed", "nearest")).eval()
    x = torch.randn(1, 1, 16, 16, 16)
    outputs = net.forward_all(x)
    assert len(outputs) == 2
    assert torch.equal(net(x), outputs[0][0])


def test_evaluated_path_of_a_multi_decoder_net_is_a_plain_vnet() -> None:
    assert evaluated_parameters(MultiDecoderVNet(up_types=("transposed", "nearest"))) == 9_448_866
    assert evaluated_parameters(VNet()) == 9_448_866
