"""The legacy VNet with a pyramid of full-resolution outputs, for URPC (Luo et al., MedIA 2022).

The URPC paper's network is a 3D UNet whose four decoder stages each end in a 1x1x1 head upsampled
(trilinearly) to the input size; SSL4MIS's `unet_3D_dv_semi` adds Dropout3d 0.5 / 0.3 / 0.2 / 0.1 after
those stages so that the pyramid levels disagree. On LA the papers that compare with URPC re-run it on
the VNet of their lineage, so this is that VNet (same blocks, same names, same encoder dropout) with
SSL4MIS's per-level dropouts and three auxiliary heads: 454 parameters more than the VNet.
`forward` is the finest level alone (the evaluated output).
"""

from __future__ import annotations

from collections.abc import Sequence

import torch
import torch.nn.functional as F
from torch import nn

from .blocks import ConvBlock, Norm, UpBlock
from .vnet import VNetEncoder

# SSL4MIS unet_3D_dv_semi: Dropout3d rates after the decoder stages, deepest (1/8 resolution) first.
PYRAMID_DROPOUT = (0.5, 0.3, 0.2, 0.1)


class PyramidVNet(nn.Module):
    """VNet encoder + transposed-convolution decoder whose x6, x7, x8, x9 stages each feed a segmentation head."""

    def __init__(self, in_channels: int = 1, n_classes: int = 2, n_filters: int = 16, norm: Norm = "batchnorm",
                 dropout: float = 0.5, level_dropout: Sequence[float] = PYRAMID_DROPOUT) -> None:
        super().__init__()
        f = n_filters
        if len(level_dropout) != 4:
            raise ValueError(f"level_dropout needs 4 rates (deepest level first), got {list(level_dropout)}")
        self.encoder = VNetEncoder(in_channels, f, norm, dropout)
        self.up_five = UpBlock(16 * f, 8 * f, "transposed", norm)
        self.block_six = ConvBlock(3, 8 * f, 8 * f, norm)
        self.up_six = UpBlock(8 * f, 4 * f, "transposed", norm)
        self.block_seven = ConvBlock(3, 4 * f, 4 * f, norm)
        self.up_seven = UpBlock(4 * f, 2 * f, "transposed", norm)
        self.block_eight = ConvBlock(2, 2 * f, 2 * f, norm)
        self.up_eight = UpBlock(2 * f, f, "transposed", norm)
        self.block_nine = ConvBlock(1, f, f, norm)
        self.level_dropout = nn.ModuleList(nn.Dropout3d(p) if p > 0 else nn.Identity() for p in level_dropout)
        # Heads of levels 1/8, 1/4, 1/2 (upsampled to the input size) and of the full-resolution level.
        self.aux_heads = nn.ModuleList(nn.Conv3d(c, n_classes, 1) for c in (8 * f, 4 * f, 2 * f))
        self.out_conv = nn.Conv3d(f, n_classes, 1)

    def _decode(self, x: torch.Tensor, pyramid: bool) -> list[torch.Tensor]:
        x1, x2, x3, x4, x5 = self.encoder(x)
        drop = self.level_dropout
        x6 = drop[0](self.block_six(self.up_five(x5) + x4))
        x7 = drop[1](self.block_seven(self.up_six(x6) + x3))
        x8 = drop[2](self.block_eight(self.up_seven(x7) + x2))
        x9 = drop[3](self.block_nine(self.up_eight(x8) + x1))
        outputs = [self.out_conv(x9)]
        if pyramid:
            size = x.shape[2:]
            outputs += [F.interpolate(head(feature), size=size, mode="trilinear", align_corners=False)
                        for head, feature in zip(self.aux_heads, (x6, x7, x8))]
        return outputs

    def forward_pyramid(self, x: torch.Tensor) -> list[torch.Tensor]:
        """Logits of every level at the input size, finest first (SSL4MIS order: dsv1, dsv2, dsv3, dsv4)."""
        return self._decode(x, pyramid=True)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self._decode(x, pyramid=False)[0]

    def training_only_modules(self) -> list[nn.Module]:
        """Modules `forward` never uses (left out of the evaluated parameter count)."""
        return [self.aux_heads]
