"""Building blocks of the legacy (UA-MT lineage) VNet.

The papers' VNet is not MONAI's Milletari VNet: 3x3x3 conv + BatchNorm + ReLU stages, stride-2
convolutions down, additive skips. These blocks are shared by every VNet variant in `semiseg`
(single decoder, MC-Net / MLRPL multi-decoder, CAML dual network) so that parameter counts match
the official code exactly.
"""

from __future__ import annotations

from typing import Literal

from torch import nn

Norm = Literal["batchnorm", "instancenorm", "groupnorm", "none"]
UpType = Literal["transposed", "trilinear", "nearest"]


def _norm(kind: Norm, channels: int) -> nn.Module:
    if kind == "batchnorm":
        return nn.BatchNorm3d(channels)
    if kind == "instancenorm":
        return nn.InstanceNorm3d(channels)
    if kind == "groupnorm":
        return nn.GroupNorm(16, channels)
    if kind == "none":
        return nn.Identity()
    raise ValueError(f"unknown normalization {kind!r}; use batchnorm, instancenorm, groupnorm or none")


class ConvBlock(nn.Sequential):
    """`stages` x [Conv3d 3x3x3 -> norm -> ReLU]; the first conv maps in_ch -> out_ch."""

    def __init__(self, stages: int, in_ch: int, out_ch: int, norm: Norm = "batchnorm") -> None:
        layers: list[nn.Module] = []
        for i in range(stages):
            layers += [nn.Conv3d(in_ch if i == 0 else out_ch, out_ch, 3, padding=1), _norm(norm, out_ch)]
            layers.append(nn.ReLU(inplace=True))
        super().__init__(*layers)


class DownBlock(nn.Sequential):
    """Stride-2 Conv3d(k=2) -> norm -> ReLU: halves every spatial axis."""

    def __init__(self, in_ch: int, out_ch: int, norm: Norm = "batchnorm") -> None:
        super().__init__(nn.Conv3d(in_ch, out_ch, 2, stride=2), _norm(norm, out_ch), nn.ReLU(inplace=True))


class UpBlock(nn.Sequential):
    """Doubles every spatial axis: transposed conv (MC-Net up_type 0), trilinear (1) or nearest (2) + conv."""

    def __init__(self, in_ch: int, out_ch: int, up: UpType = "transposed", norm: Norm = "batchnorm") -> None:
        if up == "transposed":
            layers: list[nn.Module] = [nn.ConvTranspose3d(in_ch, out_ch, 2, stride=2)]
        elif up == "trilinear":
            layers = [nn.Upsample(scale_factor=2, mode="trilinear", align_corners=True),
                      nn.Conv3d(in_ch, out_ch, 3, padding=1)]
        elif up == "nearest":
            layers = [nn.Upsample(scale_factor=2, mode="nearest"), nn.Conv3d(in_ch, out_ch, 3, padding=1)]
        else:
            raise ValueError(f"unknown upsampling {up!r}; use transposed, trilinear or nearest")
        super().__init__(*layers, _norm(norm, out_ch), nn.ReLU(inplace=True))

