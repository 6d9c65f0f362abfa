"""The SSL4MIS / UniMatch 2D UNet used on ACDC (channels 16-256, 1,813,764 parameters with 4 classes).

Conv 3x3 + BatchNorm + LeakyReLU(0.01) blocks with element-wise dropout between the two convolutions
(0.05, 0.1, 0.2, 0.3, 0.5 down the encoder, none in the decoder), max-pool down, concatenated skips.
Up-sampling is a 1x1 convolution followed by bilinear x2 (align_corners=True): the official config sets
`bilinear: False`, but the decoder never passes it to its up-blocks, whose default is bilinear; the
1,813,764 parameters of the official module confirm it (transposed convolutions would give 1,944,324).
Encoder and decoder are separate modules so that CrossMatch can decode perturbed copies of the pyramid.
"""

from __future__ import annotations

from collections.abc import Sequence

import torch
from torch import nn

CHANNELS = (16, 32, 64, 128, 256)
DROPOUT = (0.05, 0.1, 0.2, 0.3, 0.5)


class ConvBlock2d(nn.Sequential):
    """Conv3x3 -> BN -> LeakyReLU -> Dropout(p) -> Conv3x3 -> BN -> LeakyReLU."""

    def __init__(self, in_ch: int, out_ch: int, dropout: float) -> None:
        super().__init__(
            nn.Conv2d(in_ch, out_ch, 3, padding=1), nn.BatchNorm2d(out_ch), nn.LeakyReLU(0.01),
            nn.Dropout(dropout) if dropout > 0 else nn.Identity(),
            nn.Conv2d(out_ch, out_ch, 3, padding=1), nn.BatchNorm2d(out_ch), nn.LeakyReLU(0.01),
        )


class UNet2DEncoder(nn.Module):
    """Returns the five feature maps [x0 (16 ch, full size), ..., x4 (256 ch, 1/16 size)]."""

    def __init__(self, in_channels: int = 1, channels: Sequence[int] = CHANNELS,
                 dropout: Sequence[float] = DROPOUT) -> None:
        super().__init__()
        self.in_conv = ConvBlock2d(in_channels, channels[0], dropout[0])
        self.downs = nn.ModuleList(
            nn.Sequential(nn.MaxPool2d(2), ConvBlock2d(c_in, c_out, p))
            for c_in, c_out, p in zip(channels[:-1], channels[1:], dropout[1:], strict=True))

    def forward(self, x: torch.Tensor) -> list[torch.Tensor]:
        features = [self.in_conv(x)]
        for down in self.downs:
            features.append(down(features[-1]))
        return features


class UpBlock2d(nn.Module):
    """1x1 conv to the skip's width, bilinear x2, concatenate [skip, up], ConvBlock without dropout."""

    def __init__(self, in_ch: int, skip_ch: int) -> None:
        super().__init__()
        self.conv1x1 = nn.Conv2d(in_ch, skip_ch, 1)
        self.up = nn.Upsample(scale_factor=2, mode="bilinear", align_corners=True)
        self.conv = ConvBlock2d(2 * skip_ch, skip_ch, 0.0)

    def forward(self, x: torch.Tensor, skip: torch.Tensor) -> torch.Tensor:
        return self.conv(torch.cat([skip, self.up(self.conv1x1(x))], dim=1))


class UNet2DDecoder(nn.Module):
    """Four up-blocks (256->128->64->32->16) and a 3x3 output convolution; returns logits."""

    def __init__(self, num_classes: int = 4, channels: Sequence[int] = CHANNELS) -> None:
        super().__init__()
        self.ups = nn.ModuleList(UpBlock2d(c_in, c_skip) for c_in, c_skip in
                                 zip(channels[:0:-1], channels[-2::-1], strict=True))
        self.out_conv = nn.Conv2d(channels[0], num_classes, 3, padding=1)

    def forward(self, features: Sequence[torch.Tensor]) -> torch.Tensor:
        x = features[-1]
        for up, skip in zip(self.ups, reversed(features[:-1]), strict=True):
            x = up(x, skip)
        return self.out_conv(x)


class UNet2D(nn.Module):
    """Single encoder-decoder 2D UNet; input sides must be multiples of 16."""

    def __init__(self, in_channels: int = 1, num_classes: int = 4) -> None:
        super().__init__()
        self.encoder = UNet2DEncoder(in_channels)
        self.decoder = UNet2DDecoder(num_classes)
        self.arch_args = {"in_channels": in_channels, "num_classes": num_classes}  # for `nets.portable`

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.decoder(self.encoder(x))
