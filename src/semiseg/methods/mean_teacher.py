"""Mean Teacher (Tarvainen & Valpola 2017) as SSL4MIS trains it: docs/methods/mean_teacher.md.

The student sees the whole batch; an EMA teacher sees the unlabelled images plus clamped Gaussian noise;
the consistency loss is the MSE between the two softmax maps, weighted by a sigmoid ramp-up.
"""

from __future__ import annotations

import torch
from torch import nn

from ..data.loader import Batch
from ..engine.ema import EMATeacher
from ..engine.losses import dice_ce_loss
from ..engine.schedules import sigmoid_rampup
from ..nets import default_network
from . import register
from .base import Method, MethodParams, NetSpec, StepContext, StepOutput

# The published LA recipe of the UA-MT paper (Yu et al., MICCAI 2019), shared by Mean Teacher and UA-MT:
# 6,000 iterations, SGD lr 0.01 divided by 10 every 2,500 iterations, batch 2 labelled + 2 unlabelled.
LA_TEACHER_RECIPE = {"iterations": 6000, "lr_schedule": "step", "lr_step": 2500, "lr_gamma": 0.1}


class MeanTeacherParams(MethodParams):
    consistency: float = 0.1
    """Maximum weight of the consistency loss."""
    consistency_rampup: float = 40.0
    """Sigmoid ramp-up length in epochs of `epoch_iterations` (40 x 150 = the whole 6k-iteration LA run)."""
    epoch_iterations: int = 150
    """Iterations per "epoch" of the ramp-up schedules (150 in the papers; rescaled for short runs)."""
    ema_decay: float = 0.99
    """EMA teacher decay: alpha = min(1 - 1/t, ema_decay) at update t."""
    noise_std: float = 0.1
    """Teacher input noise: clamp(N(0, noise_std^2), -noise_clip, noise_clip)."""
    noise_clip: float = 0.2
    """Bound of the teacher input noise (see noise_std)."""
    ramp_from_zero: bool = True
    """SSL4MIS evaluates ramps at the 0-based iteration (`iter_num` before its increment)."""


@register
class MeanTeacher(Method):
    name = "mean_teacher"
    description = "Mean Teacher: EMA teacher on noisy unlabelled input, MSE consistency (SSL4MIS)"
    Params = MeanTeacherParams
    recipe = LA_TEACHER_RECIPE
    presets = {"la-8": {"labeled": 8}, "la-16": {"labeled": 16}}

    def __init__(self, params: MeanTeacherParams, spec: NetSpec) -> None:
        super().__init__(params, spec)
        self.params: MeanTeacherParams = params
        self.net = default_network(spec)
        self.teacher = EMATeacher(self.net, params.ema_decay)

    def ramp_iteration(self, ctx: StepContext) -> int:
        return ctx.iteration - 1 if self.params.ramp_from_zero else ctx.iteration

    def consistency_weight(self, ctx: StepContext) -> float:
        p = self.params
        return p.consistency * sigmoid_rampup(self.ramp_iteration(ctx), p.consistency_rampup, p.epoch_iterations)

    def add_noise(self, images: torch.Tensor) -> torch.Tensor:
        p = self.params
        return images + torch.clamp(torch.randn_like(images) * p.noise_std, -p.noise_clip, p.noise_clip)

    def consistency_loss(self, student_logits: torch.Tensor, unlabeled: torch.Tensor,
                         ctx: StepContext) -> tuple[torch.Tensor, dict[str, torch.Tensor]]:
        """Mean over every element of (softmax(student) - softmax(teacher(x + noise)))^2."""
        with torch.no_grad():
            target = self.teacher(self.add_noise(unlabeled)).softmax(1)
        return ((student_logits.softmax(1) - target) ** 2).mean(), {}

    def train_step(self, batch: Batch, ctx: StepContext) -> StepOutput:
        n_lab = batch.n_labeled
        logits = self.net(batch.images)
        supervised = dice_ce_loss(logits[:n_lab], batch.label_labeled)
        weight = self.consistency_weight(ctx)
        if len(batch.image_unlabeled):
            consistency, logs = self.consistency_loss(logits[n_lab:], batch.image_unlabeled, ctx)
        else:
            consistency, logs = supervised.new_zeros(()), {}
        loss = supervised + weight * consistency
        return StepOutput(loss, {"loss/supervised": supervised.detach(), "loss/consistency": consistency.detach(),
                                 "weight/consistency": torch.tensor(weight), **logs})

    @torch.no_grad()
    def after_step(self, ctx: StepContext) -> None:
        self.teacher.update(self.net, ctx.iteration)

    def inference_network(self) -> nn.Module:
        return self.net

    def evaluated_output(self) -> str:
        return "the student VNet (not the EMA teacher)"
