"""URPC, uncertainty-rectified pyramid consistency (Luo et al., MedIA 2022), as SSL4MIS trains it: docs/methods/urpc.md.

One network with four outputs at the input size (a pyramid of decoder levels, each with its own dropout).
Every level is supervised with 0.5 (CE + Dice) on the labelled volumes; on the unlabelled volumes each
level is pulled towards the mean of the four softmax maps by an MSE weighted voxel-wise by exp(-KL), the
level's divergence from the mean (its uncertainty), plus the mean KL itself as a penalty.
"""

from __future__ import annotations

from collections.abc import Sequence

import torch
from pydantic import field_validator
from torch import nn

from ..data.loader import Batch
from ..engine.losses import dice_ce_loss
from ..engine.schedules import sigmoid_rampup
from ..errors import ConfigError
from ..nets.urpc import PYRAMID_DROPOUT, PyramidVNet
from . import register
from .base import Method, MethodParams, NetSpec, StepContext, StepOutput


def rectified_pyramid_consistency(probs: Sequence[torch.Tensor],
                                  detach_mean: bool = False) -> tuple[torch.Tensor, torch.Tensor]:
    """SSL4MIS URPC consistency over levels k (softmax maps [U, C, *S]); returns (loss, mean KL).

    p_bar = mean_k p_k; D_k = sum_c p_bar log(p_bar / p_k) [U, 1, *S] (`KLDivLoss(log p_k, p_bar)` summed over
    classes); loss = mean_k [ mean((p_bar - p_k)^2 exp(-D_k)) / (mean(exp(-D_k)) + 1e-8) + mean(D_k) ].
    """
    mean = sum(probs) / len(probs)
    if detach_mean:
        mean = mean.detach()
    total = probs[0].new_zeros(())
    divergence = probs[0].new_zeros(())
    for p in probs:
        kl = torch.nn.functional.kl_div(torch.log(p), mean, reduction="none").sum(1, keepdim=True)
        weight = torch.exp(-kl)
        total = total + ((mean - p) ** 2 * weight).mean() / (weight.mean() + 1e-8) + kl.mean()
        divergence = divergence + kl.detach().mean()
    return total / len(probs), divergence / len(probs)


class URPCParams(MethodParams):
    consistency: float = 0.1
    """Maximum weight of the consistency loss (SSL4MIS `--consistency`)."""
    consistency_rampup: float = 100.0
    """Sigmoid ramp-up length in epochs of `epoch_iterations`. SSL4MIS ramps over its whole run (400 x 150 =
    60,000 iterations); 100 x 150 spans the 15,000-iteration LA recipe the same way."""
    epoch_iterations: int = 150
    """Iterations per ramp-up "epoch" (150 in the papers' loops; benchmarks rescale it with the budget)."""
    level_dropout: tuple[float, float, float, float] = PYRAMID_DROPOUT
    """Dropout3d after the decoder levels, deepest first (SSL4MIS `unet_3D_dv_semi`)."""
    detach_mean: bool = False
    """SSL4MIS lets gradients flow into the mean prediction p_bar too; True makes it a fixed target."""
    ramp_from_zero: bool = True
    """SSL4MIS evaluates the ramp at the 0-based iteration (`iter_num` before its increment)."""

    @field_validator("level_dropout")
    @classmethod
    def _rates(cls, value: tuple[float, ...]) -> tuple[float, ...]:
        if any(not 0 <= p < 1 for p in value):
            raise ValueError("every dropout rate must lie in [0, 1)")
        return value


@register
class URPC(Method):
    name = "urpc"
    description = "URPC: pyramid VNet, uncertainty (KL)-rectified consistency of every level with their mean"
    Params = URPCParams
    # SSL4MIS sets the poly rate from `iter_num` before its increment: update k uses poly(k - 2) (lag 1).
    recipe = {"lr_schedule": "poly", "poly_lag": 1}
    presets = {"la-8": {"labeled": 8}, "la-16": {"labeled": 16}}

    def __init__(self, params: URPCParams, spec: NetSpec) -> None:
        super().__init__(params, spec)
        self.params: URPCParams = params
        if spec.spatial_dims != 3:
            raise ConfigError(f"urpc implements the 3D (VNet) recipe; the data is {spec.spatial_dims}D")
        self.net = PyramidVNet(spec.in_channels, spec.num_classes, spec.n_filters, spec.norm, spec.dropout,
                               params.level_dropout)

    def consistency_weight(self, ctx: StepContext) -> float:
        p = self.params
        ramp_at = ctx.iteration - 1 if p.ramp_from_zero else ctx.iteration
        return p.consistency * sigmoid_rampup(ramp_at, p.consistency_rampup, p.epoch_iterations)

    def train_step(self, batch: Batch, ctx: StepContext) -> StepOutput:
        p, n_lab = self.params, batch.n_labeled
        levels = self.net.forward_pyramid(batch.images)
        supervised = sum(dice_ce_loss(logits[:n_lab], batch.label_labeled) for logits in levels) / len(levels)
        weight = self.consistency_weight(ctx)
        if len(batch.image_unlabeled):
            probs = [logits[n_lab:].softmax(1) for logits in levels]
            consistency, divergence = rectified_pyramid_consistency(probs, p.detach_mean)
        else:
            consistency = divergence = supervised.new_zeros(())
        loss = supervised + weight * consistency
        return StepOutput(loss, {"loss/supervised": supervised.detach(), "loss/consistency": consistency.detach(),
                                 "uncertainty/mean_kl": divergence, "weight/consistency": torch.tensor(weight)})

    def inference_network(self) -> nn.Module:
        return self.net

    def evaluated_output(self) -> str:
        return "the finest (full-resolution) level of the pyramid VNet"
