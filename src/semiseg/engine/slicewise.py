"""Slice-wise inference of a 2D network on a 3D volume (SSL4MIS `test_single_volume`, protocol.md 2.5).

Every slice is resized to the network size with nearest-neighbour sampling exactly as
`scipy.ndimage.zoom(order=0)` samples (see `zoom_indices`; torch's "nearest" modes pick other pixels),
run through the network, softmax + argmax, and the label map is resized back the same way. Slices go
through the network in batches, on the network's device.
"""

from __future__ import annotations

from collections.abc import Sequence

import torch
from torch import nn

from .inference import autocast_for
from .reductions import class_argmax


def zoom_indices(n_in: int, n_out: int, device: torch.device | None = None) -> torch.Tensor:
    """Source index of every output position of `scipy.ndimage.zoom(order=0)` along one axis.

    SciPy (grid_mode=False) maps output i to input x = i * (n_in - 1) / (n_out - 1) and an order-0 spline
    takes the nearest sample, rounding halves up.
    """
    if n_out == 1 or n_in == 1:
        return torch.zeros(n_out, dtype=torch.long, device=device)
    i = torch.arange(n_out, dtype=torch.float64, device=device)
    x = i * (n_in - 1) / (n_out - 1)
    return torch.floor(x + 0.5).long().clamp_(0, n_in - 1)


def zoom_nearest_2d(x: torch.Tensor, size: Sequence[int]) -> torch.Tensor:
    """Resize the last two axes of `x` to `size` like `scipy.ndimage.zoom(order=0)`."""
    rows = zoom_indices(x.shape[-2], size[0], x.device)
    cols = zoom_indices(x.shape[-1], size[1], x.device)
    return x.index_select(-2, rows).index_select(-1, cols)


@torch.no_grad()
def slicewise_labels(net: nn.Module, volume: torch.Tensor, size: Sequence[int], batch_size: int = 16,
                     cpu_bf16: bool = False) -> torch.Tensor:
    """Label map [D, H, W] (int64) of a volume [C, D, H, W]: per slice resize, softmax, argmax, resize back."""
    if volume.ndim != 4:
        raise ValueError(f"slice-wise inference needs a (C, D, H, W) volume, got shape {tuple(volume.shape)}")
    height, width = volume.shape[-2:]
    slices = zoom_nearest_2d(volume.movedim(1, 0), size)  # [D, C, h, w]
    labels = []
    for start in range(0, len(slices), batch_size):
        with autocast_for(volume.device, cpu_bf16):
            logits = net(slices[start:start + batch_size])
        labels.append(class_argmax(logits.float().softmax(1)))
    return zoom_nearest_2d(torch.cat(labels), (height, width))
