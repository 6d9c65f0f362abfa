"""DTC: dual-task consistency (Luo et al., AAAI 2021) as HiLab-git/DTC trains it on LA: docs/methods/dtc.md.

One VNet with two heads on the last decoder feature: a sigmoid segmentation p and a tanh level-set
(normalised signed distance) output s. Labelled images: Dice(p, y) + beta MSE(s, SDF(y)). All images: the
task-level consistency mean((sigmoid(-k s) - p)^2), the level set turned into a soft mask by a steep
sigmoid, weighted by a sigmoid ramp-up.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from pydantic import Field
from torch import nn

from ..data.loader import Batch
from ..engine.schedules import sigmoid_rampup
from ..errors import ConfigError
from ..nets.dtc import SDFVNet
from . import register
from ._sdf import signed_distance_map
from .base import Method, MethodParams, NetSpec, StepContext, StepOutput
from .mean_teacher import LA_TEACHER_RECIPE


class DTCParams(MethodParams):
    beta: float = Field(0.3, ge=0)
    """Weight of the signed-distance regression MSE(s, SDF(y)) in the supervised loss (official `--beta`)."""
    consistency: float = Field(1.0, ge=0)
    """Maximum weight of the dual-task consistency."""
    consistency_rampup: float = Field(40.0, ge=0)
    """Sigmoid ramp-up length in epochs of `epoch_iterations`."""
    epoch_iterations: int = Field(150, gt=0)
    """Iterations per ramp-up "epoch" (150 in the papers' loops; benchmarks rescale it with the budget)."""
    ramp_from_zero: bool = True
    """The official loop evaluates the ramp at the 0-based iteration (`iter_num // 150` before its increment)."""
    transform_k: float = Field(1500.0, gt=0)
    """k of the level-set-to-mask transform sigmoid(-k s)."""
    bce_weight: float = Field(0.0, ge=0)
    """The official code computes a BCE on the labelled logits but never adds it to the loss (weight 0)."""
    dice_smooth: float = Field(1e-5, gt=0)
    """Smoothing term of the supervised Dice (the official 1e-5)."""


def dice_loss(prob: torch.Tensor, target: torch.Tensor, smooth: float = 1e-5) -> torch.Tensor:
    """UA-MT / DTC `dice_loss`: 1 - (2 sum p g + s) / (sum p^2 + sum g^2 + s), pooled over the batch."""
    target = target.to(prob.dtype)
    return 1 - (2 * (prob * target).sum() + smooth) / ((prob * prob).sum() + (target * target).sum() + smooth)


@register
class DTC(Method):
    name = "dtc"
    description = "DTC: segmentation + signed-distance heads with dual-task consistency (VNet)"
    Params = DTCParams
    # UA-MT's LA recipe (6,000 iterations, SGD 0.01 x0.1 every 2,500); the official test keeps the largest component.
    recipe = {**LA_TEACHER_RECIPE, "post_lcc": True}
    presets = {"la-8": {"labeled": 8}, "la-16": {"labeled": 16}}

    def __init__(self, params: DTCParams, spec: NetSpec) -> None:
        super().__init__(params, spec)
        self.params: DTCParams = params
        if spec.spatial_dims != 3 or spec.num_classes != 2:
            raise ConfigError(f"dtc segments one foreground class in 3D (a VNet with a signed-distance head); the "
                              f"data is {spec.spatial_dims}D with {spec.num_classes} classes; use it on 3D binary "
                              "data (LA, Pancreas-CT) or pick a method for any data, e.g. unimatch or cps")
        self.net = SDFVNet(spec.in_channels, spec.n_filters, spec.norm, spec.dropout)

    def consistency_weight(self, ctx: StepContext) -> float:
        p = self.params
        iteration = ctx.iteration - 1 if p.ramp_from_zero else ctx.iteration
        return p.consistency * sigmoid_rampup(iteration, p.consistency_rampup, p.epoch_iterations)

    def train_step(self, batch: Batch, ctx: StepContext) -> StepOutput:
        p, n_lab = self.params, batch.n_labeled
        logit, sdf = self.net.forward_both(batch.images)
        logit, sdf = logit[:, 0].float(), sdf[:, 0].float()
        prob = torch.sigmoid(logit)
        foreground = batch.label_labeled == 1
        with torch.no_grad():
            target_sdf = signed_distance_map(foreground)
        loss_sdf = F.mse_loss(sdf[:n_lab], target_sdf)
        loss_dice = dice_loss(prob[:n_lab], foreground, p.dice_smooth)
        loss_bce = F.binary_cross_entropy_with_logits(logit[:n_lab], foreground.float())
        supervised = loss_dice + p.beta * loss_sdf + p.bce_weight * loss_bce
        consistency = ((torch.sigmoid(-p.transform_k * sdf) - prob) ** 2).mean()
        weight = self.consistency_weight(ctx)
        loss = supervised + weight * consistency
        logs = {"loss/dice": loss_dice, "loss/sdf": loss_sdf, "loss/bce": loss_bce, "loss/consistency": consistency}
        return StepOutput(loss, {k: v.detach() for k, v in logs.items()} | {"weight/consistency": torch.tensor(weight)})

    def inference_network(self) -> nn.Module:
        return self.net

    def evaluated_output(self) -> str:
        return "the segmentation head (sigmoid foreground probability; the level-set head is not used)"
