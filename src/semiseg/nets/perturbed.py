"""CrossMatch's feature-perturbed decoding paths for the VNet and the 2D UNet (crossmatch.md section 2.3).

One encoder and one decoder with shared weights. `forward_fp(x, n_first)` encodes the whole batch,
splits every pyramid level into the first `n_first` samples (A) and the rest (U), and decodes
[A, U, drop_weak(U), drop_strong(U)] in a single decoder call, so decoder BatchNorm statistics are
taken over that mixture, as in the official code. Channel dropout (rates 0.25 / 0.75) is applied
independently at every level with fresh masks.

The official dropout layers are kept in a plain Python list, never registered, so they stay active in
eval(); here they are functional calls with `training=True`, which is the same behaviour. The VNet's
x9 dropout is skipped on these paths (official `no_drop=True`); its x5 dropout acts in train mode.
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Literal

import torch
import torch.nn.functional as F
from torch import nn

from .unet2d import UNet2D
from .vnet import VNet

PerturbType = Literal["dropout", "alpha", "feature_alpha"]


def perturb_features(feature: torch.Tensor, rate: float, kind: PerturbType = "dropout") -> torch.Tensor:
    """Always-on perturbation of one feature map [B, C, *S]: channel dropout (Dropout2d / Dropout3d by
    dimensionality), AlphaDropout or FeatureAlphaDropout (the official `--pert_type` choices)."""
    if kind == "dropout":
        channel_dropout = F.dropout3d if feature.ndim == 5 else F.dropout2d
        return channel_dropout(feature, rate, training=True)
    if kind == "alpha":
        return F.alpha_dropout(feature, rate, training=True)
    if kind == "feature_alpha":
        return F.feature_alpha_dropout(feature, rate, training=True)
    raise ValueError(f"unknown perturbation {kind!r}; use dropout, alpha or feature_alpha")


class FeaturePerturbedNet(nn.Module):
    """Wraps a `VNet` or `UNet2D`; `forward` is the plain network, `forward_fp` adds the perturbed paths."""

    def __init__(self, net: VNet | UNet2D, rates: Sequence[float] = (0.25, 0.75),
                 kind: PerturbType = "dropout") -> None:
        super().__init__()
        if not isinstance(net, VNet | UNet2D):
            raise TypeError(f"feature perturbation needs a VNet or UNet2D, got {type(net).__name__}")
        self.net = net
        self.rates = tuple(float(r) for r in rates)
        self.kind = kind

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.net(x)

    def _decode(self, features: list[torch.Tensor]) -> torch.Tensor:
        if isinstance(self.net, VNet):
            return self.net.decoder(features, final_dropout=False)[0]
        return self.net.decoder(features)

    def forward_fp(self, x: torch.Tensor, n_first: int) -> tuple[torch.Tensor, ...]:
        """Logits (P(A), P(U), P_rate1(U), P_rate2(U), ...) with A = x[:n_first], U = x[n_first:]."""
        if not 0 < n_first < len(x):
            raise ValueError(f"n_first={n_first} must split the batch of {len(x)} into two non-empty parts")
        pyramid = []
        for feature in self.net.encoder(x):
            first, rest = feature[:n_first], feature[n_first:]
            pyramid.append(torch.cat([first, rest, *(perturb_features(rest, r, self.kind) for r in self.rates)]))
        n_rest = len(x) - n_first
        return self._decode(pyramid).split([n_first] + [n_rest] * (1 + len(self.rates)))

    def forward_perturbed(self, x: torch.Tensor) -> tuple[torch.Tensor, ...]:
        """Logits (P(x), P_rate1(x), ...): every sample perturbed, [x, drop(x), ...] decoded in one call
        (UniMatch's `need_fp`, whose decoder BatchNorm sees clean and perturbed copies of the whole batch)."""
        pyramid = [torch.cat([f, *(perturb_features(f, r, self.kind) for r in self.rates)])
                   for f in self.net.encoder(x)]
        return self._decode(pyramid).chunk(1 + len(self.rates))
