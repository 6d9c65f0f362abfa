"""The legacy VNet of the UA-MT / MC-Net / CAML / MLRPL lineage, and its multi-decoder variants.

Exactly the official layout: 16 base filters, BatchNorm, additive skips, Dropout3d(0.5) on the
bottleneck (x5) and on the last decoder feature (x9). 1 input channel and 2 classes give 9,448,866
parameters. Decoders return both the logits and x9 (after dropout), the feature map that CAML's
correlation and MLRPL's prototypes are computed from.
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any, Literal

import torch
from torch import nn

from .blocks import ConvBlock, DownBlock, Norm, UpBlock, UpType


class VNetEncoder(nn.Module):
    """Five stages with 1, 2, 3, 3, 3 convolutions; returns the skips [x1, x2, x3, x4, x5].

    `x4_transform` is applied to x4 before it is down-sampled and used as a skip: CAML inserts its
    cross-sample attention there.
    """

    def __init__(self, in_channels: int = 1, n_filters: int = 16, norm: Norm = "batchnorm",
                 dropout: float = 0.5, x4_transform: nn.Module | None = None) -> None:
        super().__init__()
        f = n_filters
        self.block_one = ConvBlock(1, in_channels, f, norm)
        self.down_one = DownBlock(f, 2 * f, norm)
        self.block_two = ConvBlock(2, 2 * f, 2 * f, norm)
        self.down_two = DownBlock(2 * f, 4 * f, norm)
        self.block_three = ConvBlock(3, 4 * f, 4 * f, norm)
        self.down_three = DownBlock(4 * f, 8 * f, norm)
        self.block_four = ConvBlock(3, 8 * f, 8 * f, norm)
        self.x4_transform = x4_transform if x4_transform is not None else nn.Identity()
        self.down_four = DownBlock(8 * f, 16 * f, norm)
        self.block_five = ConvBlock(3, 16 * f, 16 * f, norm)
        self.dropout = nn.Dropout3d(dropout) if dropout > 0 else nn.Identity()

    def forward(self, x: torch.Tensor) -> list[torch.Tensor]:
        x1 = self.block_one(x)
        x2 = self.block_two(self.down_one(x1))
        x3 = self.block_three(self.down_two(x2))
        x4 = self.x4_transform(self.block_four(self.down_three(x3)))
        x5 = self.dropout(self.block_five(self.down_four(x4)))
        return [x1, x2, x3, x4, x5]


class VNetDecoder(nn.Module):
    """Mirror of the encoder with additive skips; returns (logits, x9 after dropout)."""

    def __init__(self, n_classes: int = 2, n_filters: int = 16, up: UpType = "transposed",
                 norm: Norm = "batchnorm", dropout: float = 0.5) -> None:
        super().__init__()
        f = n_filters
        self.up_five = UpBlock(16 * f, 8 * f, up, norm)
        self.block_six = ConvBlock(3, 8 * f, 8 * f, norm)
        self.up_six = UpBlock(8 * f, 4 * f, up, norm)
        self.block_seven = ConvBlock(3, 4 * f, 4 * f, norm)
        self.up_seven = UpBlock(4 * f, 2 * f, up, norm)
        self.block_eight = ConvBlock(2, 2 * f, 2 * f, norm)
        self.up_eight = UpBlock(2 * f, f, up, norm)
        self.block_nine = ConvBlock(1, f, f, norm)
        self.dropout = nn.Dropout3d(dropout) if dropout > 0 else nn.Identity()
        self.out_conv = nn.Conv3d(f, n_classes, 1)

    def forward(self, skips: Sequence[torch.Tensor], final_dropout: bool = True) -> tuple[torch.Tensor, torch.Tensor]:
        """`final_dropout=False` skips the x9 dropout (CrossMatch's feature-perturbed paths, official `no_drop`)."""
        x1, x2, x3, x4, x5 = skips
        x = self.block_six(self.up_five(x5) + x4)
        x = self.block_seven(self.up_six(x) + x3)
        x = self.block_eight(self.up_seven(x) + x2)
        x9 = self.block_nine(self.up_eight(x) + x1)
        if final_dropout:
            x9 = self.dropout(x9)
        return self.out_conv(x9), x9


class VNet(nn.Module):
    """Single encoder-decoder VNet (the labelled-only baseline, Mean Teacher, UA-MT, BCP)."""

    def __init__(self, in_channels: int = 1, n_classes: int = 2, n_filters: int = 16,
                 norm: Norm = "batchnorm", dropout: float = 0.5, up: UpType = "transposed",
                 x4_transform: nn.Module | None = None) -> None:
        super().__init__()
        self.encoder = VNetEncoder(in_channels, n_filters, norm, dropout, x4_transform)
        self.decoder = VNetDecoder(n_classes, n_filters, up, norm, dropout)
        # The constructor arguments, so a model file can rebuild the network (`nets.portable`); None with an
        # x4 transform, a module that arguments cannot describe.
        self.arch_args: dict[str, Any] | None = None if x4_transform is not None else {
            "in_channels": in_channels, "n_classes": n_classes, "n_filters": n_filters, "norm": norm,
            "dropout": dropout, "up": up}

    def forward_with_features(self, x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """Logits and the 16-channel (n_filters) last decoder feature map."""
        return self.decoder(self.encoder(x))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.forward_with_features(x)[0]


class MultiDecoderVNet(nn.Module):
    """One shared encoder, one decoder per upsampling type (MC-Net, MC-Net+, MLRPL).

    `forward` returns the first decoder's logits, the output the papers evaluate;
    `forward_all` returns every decoder's (logits, features).
    """

    def __init__(self, in_channels: int = 1, n_classes: int = 2, n_filters: int = 16,
                 up_types: Sequence[UpType] = ("transposed", "trilinear"), norm: Norm = "batchnorm",
                 dropout: float = 0.5) -> None:
        super().__init__()
        self.encoder = VNetEncoder(in_channels, n_filters, norm, dropout)
        self.decoders = nn.ModuleList(VNetDecoder(n_classes, n_filters, up, norm, dropout) for up in up_types)
        self.arch_args: dict[str, Any] = {"in_channels": in_channels, "n_classes": n_classes, "n_filters": n_filters,
                                          "up_types": list(up_types), "norm": norm, "dropout": dropout}

    def forward_all(self, x: torch.Tensor) -> list[tuple[torch.Tensor, torch.Tensor]]:
        skips = self.encoder(x)
        return [decoder(skips) for decoder in self.decoders]

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.decoders[0](self.encoder(x))[0]


AverageMode = Literal["logits_gt_0.5", "mean_softmax"]


class DecoderAverage(nn.Module):
    """The official "average of decoders" output (MLRPL). With `logits_gt_0.5` each window yields the scores
    [0.5, mean foreground logit], averaged as they are (`window_scores`) so that argmax = (mean logit
    > 0.5); with `mean_softmax` it yields log(mean softmax), whose softmax is the mean softmax."""

    def __init__(self, net: MultiDecoderVNet, mode: AverageMode) -> None:
        super().__init__()
        self.net = net
        self.mode = mode
        self.window_scores = mode == "logits_gt_0.5"

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        logits = torch.stack([z for z, _ in self.net.forward_all(x)]).float()
        if self.mode == "mean_softmax":
            return logits.softmax(2).mean(0).clamp_min(torch.finfo(torch.float32).tiny).log()
        mean = logits.mean(0)
        return torch.cat([torch.full_like(mean[:, :1], 0.5), mean[:, 1:]], 1)


def count_parameters(module: nn.Module) -> int:
    """Trainable parameter count, as quoted by the papers."""
    return sum(p.numel() for p in module.parameters() if p.requires_grad)


def evaluated_parameters(net: nn.Module) -> int:
    """Parameters on the path `forward` uses: a multi-decoder VNet is evaluated through decoder 1 alone, and a
    network's `training_only_modules()` are left out. Frozen parameters count: an evaluated EMA teacher (AD-MT)
    has no trainable ones."""
    def total(module: nn.Module) -> int:
        return sum(p.numel() for p in module.parameters())

    if isinstance(net, MultiDecoderVNet):
        return total(net.encoder) + total(net.decoders[0])
    unused = getattr(net, "training_only_modules", list)()  # e.g. URPC's auxiliary pyramid heads
    return total(net) - sum(total(m) for m in unused)
