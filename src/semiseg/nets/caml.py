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
        h = self.hidden(rows, row_mask, running_stats)
        return self.fc2(h if keep is None else h[keep])

    def hidden(self, rows: torch.Tensor, row_mask: torch.Tensor | None = None,
               running_stats: bool = False) -> torch.Tensor:
        """ReLU(BatchNorm(fc1(rows))): the head up to its last layer."""
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
            operand, bias = self.masked_batch_norm_affine(rows, row_mask, self.fc1.weight, self.fc1.bias)
            h = torch.addmm(bias, rows, operand)
        return h.relu()

    def masked_batch_norm_affine(self, x: torch.Tensor, row_mask: torch.Tensor, weight: torch.Tensor,
                                 bias: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """BatchNorm(x @ weight.T + bias) with the statistics of the masked rows, as one affine map of x: returns
        (W'^T, b') for `torch.addmm(b', rows, W'^T)`.

        The map is linear, so the mean and variance of its output follow from the masked mean and covariance
        of x (in_dim x in_dim): the [rows, dim] pre-activation is never materialised to be normalised, and
        callers apply the map to only the rows they need. Updates the running statistics as nn.BatchNorm1d.
        W'^T is a contiguous [in, out] tensor: autograd then forms the weight gradient as rows.T @ grad, not as
        (grad.T @ rows).T, which CPU BLAS computes 11x slower for [262144, 8] rows (addmm fwd+bwd 331 -> 127 ms).
        """
        bn = self.bn
        mask = row_mask.to(x.dtype)
        count = mask.sum()
        n = count.clamp_min(1)
        mean_x = (mask @ x) / n
        centered = x - mean_x
        cov = (centered * mask[:, None]).T @ centered / n
        mean = weight @ mean_x + bias
        var = ((weight @ cov) * weight).sum(1).clamp_min(0)  # w^T cov w >= 0 up to rounding
        scale = bn.weight * torch.rsqrt(var + bn.eps)
        with torch.no_grad():
            # nn.BatchNorm1d's update (unbiased running variance); skipped when fewer than 2 rows are selected.
            step = bn.momentum * (count > 1).to(x.dtype)
            bn.running_mean.lerp_(mean, step)
            bn.running_var.lerp_(var * n / (n - 1).clamp_min(1), step)
            bn.num_batches_tracked.add_(1)
        return (weight * scale[:, None]).T.contiguous(), (bias - mean) * scale + bn.bias


def embed(projection: FeatureHead, prediction: FeatureHead, rows: torch.Tensor,
          row_mask: torch.Tensor | None = None, keep: torch.Tensor | None = None) -> torch.Tensor:
    """prediction(projection(rows)) for the rows `keep` (all when None), BatchNorm statistics over `row_mask`.

    With a mask in training, prediction.fc1 o projection.fc2 is one affine map of the projection's hidden
    rows, so the prediction BatchNorm's statistics come from their masked moments: the two 32-d layers run on
    the kept rows only, not on every agreed voxel (same values up to rounding, a third less work per head).
    """
    if row_mask is None or not prediction.training:
        return prediction(projection(rows, row_mask), row_mask, keep=keep)
    hidden = projection.hidden(rows, row_mask)
    first, last = projection.fc2, prediction.fc1
    operand, bias = prediction.masked_batch_norm_affine(hidden, row_mask, last.weight @ first.weight,
                                                        last.weight @ first.bias + last.bias)
    kept = hidden if keep is None else hidden[keep]
    return prediction.fc2(torch.addmm(bias, kept, operand).relu())


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
        return embed(self.projection_v, self.prediction_v, rows, row_mask, keep)

    def embed_a(self, rows: torch.Tensor, row_mask: torch.Tensor | None = None,
                keep: torch.Tensor | None = None) -> torch.Tensor:
        return embed(self.projection_a, self.prediction_a, rows, row_mask, keep)
