"""Cross pseudo supervision (Chen et al., CVPR 2021) as SSL4MIS trains it: docs/methods/cps.md.

Two networks of the same architecture, initialised differently, see the whole batch. Each is supervised by
0.5 (CE + Dice) on the labelled images and by the cross-entropy against the other network's hard
(argmax) prediction on the unlabelled images, weighted by a sigmoid ramp-up. Network 1 is evaluated.
"""

from __future__ import annotations

from typing import Literal

import torch
import torch.nn.functional as F
from pydantic import Field
from torch import nn

from ..data.loader import Batch
from ..engine.losses import dice_ce_loss
from ..engine.reductions import class_argmax
from ..engine.schedules import sigmoid_rampup
from ..nets import default_network
from . import register
from .base import Method, MethodParams, NetSpec, StepContext, StepOutput

Init = Literal["kaiming_xavier", "default"]


class CPSParams(MethodParams):
    consistency: float = Field(0.1, ge=0)
    """Maximum weight of the cross pseudo supervision loss (SSL4MIS `--consistency`)."""
    consistency_rampup: float = Field(200.0, ge=0)
    """Sigmoid ramp-up length in epochs of `epoch_iterations` (200 x 150 = the whole 30k-iteration run)."""
    epoch_iterations: int = Field(150, gt=0)
    """Iterations per ramp-up "epoch" (150 in the papers' loops; benchmarks rescale it with the budget)."""
    ramp_from_zero: bool = True
    """SSL4MIS evaluates the ramp at the 0-based iteration (`iter_num` before its increment)."""
    init: Init | None = None
    """Weight initialisation: kaiming_xavier (network 1 Kaiming-normal, network 2 Xavier-normal convolution
    weights, BatchNorm 1 / 0), or PyTorch's default for both. None: as the official scripts, kaiming_xavier in
    3D (`train_cross_pseudo_supervision_3D.py`), default in 2D (the 2D script defines the initialisers but
    never calls them)."""
    cps_on_labeled: bool = False
    """The paper also applies the cross pseudo supervision to the labelled images; SSL4MIS only to the
    unlabelled ones (default)."""
    evaluated_network: Literal[1, 2] = 1
    """Which network `evaluate` scores (SSL4MIS tests `best_model1`)."""


def init_weights(net: nn.Module, kind: Literal["kaiming", "xavier"]) -> nn.Module:
    """SSL4MIS's `kaiming_normal_init_weight` / `xavier_normal_init_weight`: every Conv2d / Conv3d weight (not
    transposed convolutions, which are no subclass of them) drawn afresh; BatchNorm weight 1, bias 0."""
    for m in net.modules():
        if isinstance(m, nn.Conv2d | nn.Conv3d):
            (nn.init.kaiming_normal_ if kind == "kaiming" else nn.init.xavier_normal_)(m.weight)
        elif isinstance(m, nn.BatchNorm2d | nn.BatchNorm3d):
            nn.init.ones_(m.weight)
            nn.init.zeros_(m.bias)
    return net


def cross_pseudo_loss(logits_a: torch.Tensor, logits_b: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """(CE(a, argmax b), CE(b, argmax a)), per-voxel means; the hard targets carry no gradient."""
    target_a, target_b = class_argmax(logits_a.detach()), class_argmax(logits_b.detach())
    return F.cross_entropy(logits_a.float(), target_b), F.cross_entropy(logits_b.float(), target_a)


# SSL4MIS 3D (BraTS there; LA patches and batch here): 30k iterations, SGD 0.01 with poly decay, batch 2 + 2.
_LA = {"iterations": 30000, "lr_schedule": "poly", "poly_horizon": 0}
# SSL4MIS 2D (ACDC): 30k iterations, batch 12 labelled + 12 unlabelled slices, 256 x 256.
_ACDC = {"iterations": 30000, "lr_schedule": "poly", "poly_horizon": 0, "batch_labeled": 12,
         "batch_unlabeled": 12, "patch_size": (256, 256)}


@register
class CPS(Method):
    name = "cps"
    description = "Cross pseudo supervision: two networks teach each other with hard pseudo-labels (SSL4MIS)"
    Params = CPSParams
    recipe = _LA
    presets = {"la-8": {"labeled": 8}, "la-16": {"labeled": 16},
               "acdc-3": {"labeled": 3, **_ACDC}, "acdc-7": {"labeled": 7, **_ACDC}}

    def __init__(self, params: CPSParams, spec: NetSpec) -> None:
        super().__init__(params, spec)
        self.params: CPSParams = params
        self.net1 = default_network(spec)
        self.net2 = default_network(spec)
        if (params.init or ("kaiming_xavier" if spec.spatial_dims == 3 else "default")) == "kaiming_xavier":
            init_weights(self.net1, "kaiming")
            init_weights(self.net2, "xavier")

    def consistency_weight(self, ctx: StepContext) -> float:
        p = self.params
        iteration = ctx.iteration - 1 if p.ramp_from_zero else ctx.iteration
        return p.consistency * sigmoid_rampup(iteration, p.consistency_rampup, p.epoch_iterations)

    def train_step(self, batch: Batch, ctx: StepContext) -> StepOutput:
        n_lab, images = batch.n_labeled, batch.images
        logits1, logits2 = self.net1(images), self.net2(images)
        supervised1 = dice_ce_loss(logits1[:n_lab].float(), batch.label_labeled)
        supervised2 = dice_ce_loss(logits2[:n_lab].float(), batch.label_labeled)
        start = 0 if self.params.cps_on_labeled else n_lab
        if start < len(images):
            cps1, cps2 = cross_pseudo_loss(logits1[start:], logits2[start:])
        else:
            cps1 = cps2 = supervised1.new_zeros(())
        weight = self.consistency_weight(ctx)
        loss = supervised1 + supervised2 + weight * (cps1 + cps2)
        logs = {"loss/supervised1": supervised1, "loss/supervised2": supervised2, "loss/cps1": cps1,
                "loss/cps2": cps2}
        return StepOutput(loss, {k: v.detach() for k, v in logs.items()} | {"weight/consistency": torch.tensor(weight)})

    def inference_network(self) -> nn.Module:
        return self.net1 if self.params.evaluated_network == 1 else self.net2

    def evaluated_output(self) -> str:
        return f"network {self.params.evaluated_network} of the two"
