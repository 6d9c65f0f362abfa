"""MC-Net (MICCAI 2021) and MC-Net+ (MedIA 2022) as ycwu1997/MC-Net trains them: docs/methods/mcnet.md.

One shared encoder, one decoder per upsampling type. Every decoder is supervised with the foreground Dice
on the labelled volumes, and every ordered pair of decoders (i, j), i != j, is pulled together by the MSE
between decoder i's softmax and decoder j's sharpened softmax on all volumes, labelled included.
"""

from __future__ import annotations

from collections.abc import Sequence

import torch
from torch import nn

from ..data.loader import Batch
from ..engine.losses import binary_dice_loss, sharpen
from ..engine.schedules import sigmoid_rampup
from ..errors import ConfigError
from ..nets import MultiDecoderVNet
from ..nets.blocks import UpType
from . import register
from .base import Method, MethodParams, NetSpec, StepContext, StepOutput


def mutual_consistency_loss(probs: Sequence[torch.Tensor], temperature: float,
                            detach_targets: bool = False) -> torch.Tensor:
    """sum over ordered pairs i != j of mean((p_i - sharpen(p_j, T))^2): MC-Net's (and CAML's) mutual loss."""
    targets = [sharpen(p, temperature) for p in probs]
    if detach_targets:
        targets = [t.detach() for t in targets]
    return sum(((p - t) ** 2).mean() for i, p in enumerate(probs) for j, t in enumerate(targets) if i != j)


class MCNetParams(MethodParams):
    consistency: float = 1.0
    """Maximum weight of the mutual consistency loss."""
    consistency_rampup: float = 40.0
    """Sigmoid ramp-up length in epochs of `epoch_iterations` (the official default for every label count)."""
    epoch_iterations: int = 150
    """Iterations per "epoch" of the ramp-up schedules (150 in the papers; rescaled for short runs)."""
    temperature: float = 0.1
    """Sharpening temperature T of p^(1/T) / (p^(1/T) + (1 - p)^(1/T))."""
    lamda: float = 0.5
    """Weight of the summed supervised Dice (`--lamda` / `--beta` in the official scripts)."""
    detach_targets: bool = False
    """The official code lets gradients flow through the sharpened targets too."""


@register
class MCNet(Method):
    name = "mcnet"
    description = "MC-Net: shared encoder, transposed + trilinear decoders, sharpened mutual consistency"
    Params = MCNetParams
    up_types: tuple[UpType, ...] = ("transposed", "trilinear")
    presets = {"la-8": {"labeled": 8}, "la-16": {"labeled": 16}}

    def __init__(self, params: MCNetParams, spec: NetSpec) -> None:
        super().__init__(params, spec)
        self.params: MCNetParams = params
        if spec.spatial_dims != 3:
            raise ConfigError(f"{self.name} is a 3D VNet method; the data is {spec.spatial_dims}D")
        self.net = MultiDecoderVNet(spec.in_channels, spec.num_classes, spec.n_filters, self.up_types,
                                    norm=spec.norm, dropout=spec.dropout)

    def train_step(self, batch: Batch, ctx: StepContext) -> StepOutput:
        p, n_lab = self.params, batch.n_labeled
        probs = [logits.softmax(1) for logits, _ in self.net.forward_all(batch.images)]
        foreground = batch.label_labeled == 1
        dice = sum(binary_dice_loss(q[:n_lab, 1], foreground) for q in probs)
        consistency = mutual_consistency_loss(probs, p.temperature, p.detach_targets)
        weight = p.consistency * sigmoid_rampup(ctx.iteration, p.consistency_rampup, p.epoch_iterations)
        loss = p.lamda * dice + weight * consistency
        return StepOutput(loss, {"loss/dice": dice.detach(), "loss/consistency": consistency.detach(),
                                 "weight/consistency": torch.tensor(weight)})

    def inference_network(self) -> nn.Module:
        """Decoder 1 (transposed convolutions), the output the official test script reports."""
        return self.net

    def evaluated_output(self) -> str:
        return "decoder 1 (transposed convolutions) of the shared-encoder network"


@register
class MCNetPlus(MCNet):
    name = "mcnet_plus"
    description = "MC-Net+: MC-Net with three decoders (transposed, trilinear, nearest)"
    up_types = ("transposed", "trilinear", "nearest")
