"""CAML's dual network: two independent VNets, cross-sample attention (CMA) and the OCC heads.

f_v is a plain VNet with transposed-conv up-sampling (the only network evaluated); f_a has trilinear
up-sampling and CMA after encoder block 4. Each returns class logits and its last decoder feature
(x9 after dropout, n_filters channels), which the projection / prediction heads map to `head_dim`.
With 16 filters and 32-d heads the whole model has 20,128,836 parameters, as the official `CAML3d_v1`.
"""

from __future__ import annotations

from typing import NamedTuple

import torch
from torch import nn

from .blocks import Norm
from .vnet import VNet


def at_least_float32(t: torch.Tensor) -> torch.Tensor:
    """Half-precision activations (bf16 / fp16 autocast) upcast to float32, float32 and float64 kept: the heads
    and OCC never run in half precision, and a float64 run (the golden fixtures) stays float64 throughout."""
    return t.float() if t.dtype in (torch.float16, torch.bfloat16) else t


class CrossSampleAttention(nn.Module):
    """CMA: intra-sample then inter-sample self-attention on x4, two post-norm Transformer layers.

    The intra layer attends over every position of one sample; the inter layer over the batch axis, so a
    voxel sees the voxels at the *same spatial position* of every sample (labelled and unlabelled alike,
    no masks). No positional encoding, no outer residual. It is the identity in eval mode, so f_a
    becomes a plain VNet at inference, as in the official code.
    """

    def __init__(self, channels: int, heads: int = 4, dropout: float = 0.5) -> None:
        super().__init__()
        self.intra_sample = nn.TransformerEncoderLayer(channels, heads, 4 * channels, dropout)
        self.inter_sample = nn.TransformerEncoderLayer(channels, heads, 4 * channels, dropout)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if not self.training:
            return x
        # Sequence-first layers: [N, B, C] makes N the sequence (intra); [B, N, C] makes B the sequence (inter).
        # Every token tensor is a contiguous copy, as in the official code: a strided view selects other
        # matmul kernels, whose rounding differs (1e-4 of f_a's output at 112x112x80, 3e-3 on gradients).
        tokens = x.flatten(2).transpose(1, 2).contiguous()  # [B, N, C]
        tokens = self.intra_sample(tokens.transpose(0, 1).contiguous()).transpose(0, 1).contiguous()
        tokens = self.inter_sample(tokens)
        return tokens.transpose(1, 2).reshape(x.shape).contiguous()


class FeatureHead(nn.Module):
    """Linear -> BatchNorm1d -> ReLU -> Linear on feature rows (SS-Net's projector and predictor).

    `row_mask` restricts the training-mode BatchNorm statistics (and the running-stat update) to the
    selected rows: a fixed-size row tensor then gives exactly BatchNorm over the selected rows alone,
    without the host sync that boolean indexing would cost. `running_stats=True` normalises with the
    running statistics whatever the mode (the official code projects labelled features in eval mode).
    Statistics are computed in at least float32.
    """

    def __init__(self, in_dim: int, dim: int) -> None:
        super().__init__()
        self.fc1 = nn.Linear(in_dim, dim)
        self.bn = nn.BatchNorm1d(dim)
        self.fc2 = nn.Linear(dim, dim)

    def forward(self, rows: torch.Tensor, row_mask: torch.Tensor | None = None, running_stats: bool = False,
                keep: torch.Tensor | None = None) -> torch.Tensor:
        """`keep` (row indices) gathers the rows to output before the last layer, saving its cost on the rest."""
        rows = at_least_float32(rows)
        bn = self.bn
        if running_stats or not self.training:
            # Eval-mode BatchNorm is affine: folded into fc1, one pass over the rows.
            scale = bn.weight * torch.rsqrt(bn.running_var + bn.eps)
            h = torch.addmm((self.fc1.bias - bn.running_mean) * scale + bn.bias, rows,
                            (self.fc1.weight * scale[:, None]).T)
        elif row_mask is None:
            h = bn(self.fc1(rows))
        else:
            h = self._masked_linear_batch_norm(rows, row_mask)
        h = h.relu()
        return self.fc2(h if keep is None else h[keep])

    def _masked_linear_batch_norm(self, x: torch.Tensor, row_mask: torch.Tensor) -> torch.Tensor:
        """BatchNorm(fc1(x)) with the statistics of the masked rows, as one affine map of x.

        fc1 is linear, so the mean and variance of its output follow from the masked mean and covariance
        of x (in_dim x in_dim): the [rows, dim] activation is produced once, never normalised pass by pass.
        """
        fc, bn = self.fc1, self.bn
        weight = row_mask.to(x.dtype)
        count = weight.sum()
        n = count.clamp_min(1)
        mean_x = (weight @ x) / n
        centered = x - mean_x
        cov = (centered * weight[:, None]).T @ centered / n
        mean = fc.weight @ mean_x + fc.bias
        var = ((fc.weight @ cov) * fc.weight).sum(1).clamp_min(0)  # w^T cov w >= 0 up to rounding
        scale = bn.weight * torch.rsqrt(var + bn.eps)
        with torch.no_grad():
            # nn.BatchNorm1d's update (unbiased running variance); skipped when fewer than 2 rows are selected.
            step = bn.momentum * (count > 1).to(x.dtype)
            bn.running_mean.lerp_(mean, step)
            bn.running_var.lerp_(var * n / (n - 1).clamp_min(1), step)
            bn.num_batches_tracked.add_(1)
        return torch.addmm((fc.bias - mean) * scale + bn.bias, x, (fc.weight * scale[:, None]).T)


class CAMLOutput(NamedTuple):
    seg_v: torch.Tensor
    seg_a: torch.Tensor
    emb_v: torch.Tensor
    emb_a: torch.Tensor


class CAMLNet(nn.Module):
    """f_v (transposed-conv VNet), f_a (trilinear VNet + CMA) and one projection + prediction head each."""

    def __init__(self, in_channels: int = 1, n_classes: int = 2, n_filters: int = 16, head_dim: int = 32,
                 norm: Norm = "batchnorm", dropout: float = 0.5, attention_dropout: float = 0.5) -> None:
        super().__init__()
        self.f_v = VNet(in_channels, n_classes, n_filters, norm, dropout, up="transposed")
        self.f_a = VNet(in_channels, n_classes, n_filters, norm, dropout, up="trilinear",
                        x4_transform=CrossSampleAttention(8 * n_filters, dropout=attention_dropout))
        self.projection_v = FeatureHead(n_filters, head_dim)
        self.projection_a = FeatureHead(n_filters, head_dim)
        self.prediction_v = FeatureHead(head_dim, head_dim)
        self.prediction_a = FeatureHead(head_dim, head_dim)

    def forward(self, x: torch.Tensor) -> CAMLOutput:
        seg_v, emb_v = self.f_v.forward_with_features(x)
        seg_a, emb_a = self.f_a.forward_with_features(x)
        return CAMLOutput(seg_v, seg_a, emb_v, emb_a)

    def embed_v(self, rows: torch.Tensor, row_mask: torch.Tensor | None = None,
                keep: torch.Tensor | None = None) -> torch.Tensor:
        """f_v's online embedding prediction(projection(rows)), for the rows `keep` (all when None)."""
        return self.prediction_v(self.projection_v(rows, row_mask), row_mask, keep=keep)

    def embed_a(self, rows: torch.Tensor, row_mask: torch.Tensor | None = None,
                keep: torch.Tensor | None = None) -> torch.Tensor:
        return self.prediction_a(self.projection_a(rows, row_mask), row_mask, keep=keep)
