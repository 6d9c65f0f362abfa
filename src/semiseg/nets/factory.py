"""The default single network for a dataset's dimensionality (the labelled-only baseline's)."""

from __future__ import annotations

from typing import TYPE_CHECKING

from torch import nn

from .vnet import VNet

if TYPE_CHECKING:
    from ..methods.base import NetSpec


def default_network(spec: NetSpec) -> nn.Module:
    """3D: the legacy VNet; 2D: the SSL4MIS UNet (channels 16-256)."""
    if spec.spatial_dims == 3:
        return VNet(spec.in_channels, spec.num_classes, spec.n_filters, spec.norm, spec.dropout)
    from .unet2d import UNet2D

    return UNet2D(spec.in_channels, spec.num_classes)
