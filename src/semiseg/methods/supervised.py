"""Labelled-only baseline: one legacy VNet trained on the labelled stream alone."""

from __future__ import annotations

from typing import Literal

import torch.nn.functional as F
from torch import nn

from ..data.loader import Batch
from ..engine.losses import binary_dice_loss, dice_ce_loss
from ..nets import default_network
from . import register
from .base import Method, MethodParams, NetSpec, StepContext, StepOutput


class SupervisedParams(MethodParams):
    loss: Literal["dice_ce", "dice", "ce"] = "dice_ce"
    """dice_ce: 0.5 (CE + Dice), the UA-MT/SSL4MIS baseline; dice: MC-Net-lineage foreground Dice; ce: cross-entropy
    alone (a per-voxel mean, hence independent of how a batch is split across processes)."""


@register
class Supervised(Method):
    name = "supervised"
    description = "Labelled-only VNet (the papers' lower bound; with all labels, the upper bound)"
    Params = SupervisedParams
    recipe = {"batch_unlabeled": 0}

    def __init__(self, params: SupervisedParams, spec: NetSpec) -> None:
        super().__init__(params, spec)
        self.net = default_network(spec)

    def train_step(self, batch: Batch, ctx: StepContext) -> StepOutput:
        logits = self.net(batch.image_labeled)
        if self.params.loss == "dice":
            loss = binary_dice_loss(logits.softmax(1)[:, 1], batch.label_labeled)
        elif self.params.loss == "ce":
            loss = F.cross_entropy(logits, batch.label_labeled)
        else:
            loss = dice_ce_loss(logits, batch.label_labeled)
        return StepOutput(loss, {"loss/supervised": loss.detach()})

    def inference_network(self) -> nn.Module:
        return self.net
