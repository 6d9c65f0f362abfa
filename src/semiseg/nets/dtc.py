"""DTC's dual-task VNet: the legacy VNet with one sigmoid segmentation channel plus a tanh signed-distance head.

Official `networks/vnet_sdf.py` (HiLab-git/DTC): both 1x1 heads read x9 (after its dropout); `out_conv` feeds
the tanh level-set output and `out_conv2` the segmentation. With 16 filters the network has 9,448,866
parameters, as many as the two-class VNet. `forward` returns two-class logits [0, z] for the evaluator:
their softmax is [1 - sigmoid(z), sigmoid(z)], the official test's foreground probability.
"""

from __future__ import annotations

import torch
from torch import nn

from .blocks import Norm
from .vnet import VNet


class SDFVNet(nn.Module):
    def __init__(self, in_channels: int = 1, n_filters: int = 16, norm: Norm = "batchnorm",
                 dropout: float = 0.5) -> None:
        super().__init__()
        self.vnet = VNet(in_channels, 1, n_filters, norm, dropout)
        self.sdf_head = nn.Conv3d(n_filters, 1, 1)

    def forward_both(self, x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """(segmentation logit z [N, 1, *S], tanh signed-distance output [N, 1, *S]) from one pass."""
        logit, x9 = self.vnet.forward_with_features(x)
        return logit, torch.tanh(self.sdf_head(x9))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        logit = self.vnet(x)
        return torch.cat([torch.zeros_like(logit), logit], 1)
