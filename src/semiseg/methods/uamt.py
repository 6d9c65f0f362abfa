"""UA-MT (Yu et al., MICCAI 2019) as SSL4MIS trains it: docs/methods/uamt.md.

Mean Teacher whose consistency is restricted to voxels where the teacher is certain: T noisy, dropout-on
teacher passes give a mean softmax whose predictive entropy must stay below a threshold ramped from
0.75 H_max to H_max over the run.
"""

from __future__ import annotations

import math

import torch
from pydantic import model_validator

from ..engine.schedules import sigmoid_rampup
from ..nets.batched import batchnorm_per_pass
from . import register
from .base import MethodParams, NetSpec, StepContext
from .mean_teacher import LA_TEACHER_RECIPE, MeanTeacher, MeanTeacherParams


class UAMTParams(MeanTeacherParams):
    mc_samples: int = 8
    """T: stochastic teacher passes for the uncertainty map."""
    mc_batch_repeat: int = 2
    """Copies of the unlabelled batch per teacher pass (SSL4MIS: 2, i.e. T/2 passes of 2U volumes)."""
    threshold_rampup: int | None = None
    """Length in iterations of the threshold ramp; None = the whole run (SSL4MIS `max_iterations`)."""
    two_class_constants: bool = True
    """Official quirk: the entropy threshold uses ln 2 and the consistency divides by 2 whatever the class count;
    False uses ln K and K for K classes."""
    single_pass: bool = False
    """True: the target pass and the T/R Monte-Carlo passes as one batched teacher call whose BatchNorms keep each
    pass's own statistics (`nets.batched`): the official maths with fewer, larger convolutions, (T+1)x the teacher's
    activation memory; its speed-up is not yet measured on a quiet machine, so the default stays one teacher call per
    pass, as SSL4MIS. Both draw the same distributions, not the same random numbers."""
    """SSL4MIS hard-codes H_max = ln 2 and divides the masked sum by 2 for any class count; False uses ln C and C."""

    @model_validator(mode="after")
    def _passes_divide(self) -> UAMTParams:
        if self.mc_samples < 1 or self.mc_batch_repeat < 1 or self.mc_samples % self.mc_batch_repeat:
            raise ValueError(f"mc_samples ({self.mc_samples}) must be a positive multiple of mc_batch_repeat "
                             f"({self.mc_batch_repeat})")
        return self


@register
class UAMT(MeanTeacher):
    name = "uamt"
    description = "UA-MT: Mean Teacher with a Monte-Carlo-entropy mask on the consistency (SSL4MIS)"
    Params = UAMTParams
    recipe = LA_TEACHER_RECIPE
    presets = {"la-8": {"labeled": 8}, "la-16": {"labeled": 16}}

    @classmethod
    def schedules_on_total(cls, params: MethodParams) -> list[str]:
        unset = getattr(params, "threshold_rampup", None) is None
        return ["uncertainty-threshold ramp (threshold_rampup unset)"] if unset else []

    def __init__(self, params: UAMTParams, spec: NetSpec) -> None:
        super().__init__(params, spec)
        self.params: UAMTParams = params

    @staticmethod
    def entropy(summed: torch.Tensor, samples: int) -> torch.Tensor:
        mean = summed / samples
        return -(mean * torch.log(mean + 1e-6)).sum(1, keepdim=True)

    @torch.no_grad()
    def uncertainty(self, unlabeled: torch.Tensor) -> torch.Tensor:
        """Predictive entropy [U, 1, *S] of the mean softmax over T noisy teacher passes (train mode: dropout on)."""
        p = self.params
        repeated = unlabeled.repeat(p.mc_batch_repeat, *([1] * (unlabeled.ndim - 1)))
        total = None
        for _ in range(p.mc_samples // p.mc_batch_repeat):
            probs = self.teacher(self.add_noise(repeated)).softmax(1)
            summed = probs.unflatten(0, (p.mc_batch_repeat, len(unlabeled))).sum(0)
            total = summed if total is None else total + summed
        return self.entropy(total, p.mc_samples)

    @torch.no_grad()
    def teacher_passes(self, unlabeled: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """Target softmax [U, K, *S] and entropy [U, 1, *S]: the target pass then the T/R Monte-Carlo passes of
        R copies each, in one batched call (or one call each with `single_pass=False`)."""
        p = self.params
        if not p.single_pass:
            return self.teacher(self.add_noise(unlabeled)).softmax(1), self.uncertainty(unlabeled)
        u = len(unlabeled)
        passes = p.mc_samples // p.mc_batch_repeat
        stacked = unlabeled.repeat(1 + p.mc_samples, *([1] * (unlabeled.ndim - 1)))
        with batchnorm_per_pass(self.teacher, [u] + [u * p.mc_batch_repeat] * passes):
            probs = self.teacher(self.add_noise(stacked)).softmax(1)
        return probs[:u], self.entropy(probs[u:].unflatten(0, (p.mc_samples, u)).sum(0), p.mc_samples)

    def threshold(self, ctx: StepContext, num_classes: int) -> float:
        p = self.params
        length = p.threshold_rampup if p.threshold_rampup is not None else ctx.total_iterations
        h_max = math.log(2) if p.two_class_constants else math.log(num_classes)
        return (0.75 + 0.25 * sigmoid_rampup(self.ramp_iteration(ctx), length, 1)) * h_max

    def consistency_loss(self, student_logits: torch.Tensor, unlabeled: torch.Tensor,
                         ctx: StepContext) -> tuple[torch.Tensor, dict[str, torch.Tensor]]:
        """sum(mask * (p_s - p_t)^2) / (C' sum(mask) + 1e-16), mask = entropy < threshold, C' = 2 (official)."""
        target, entropy = self.teacher_passes(unlabeled)
        num_classes = student_logits.shape[1]
        threshold = self.threshold(ctx, num_classes)
        mask = (entropy < threshold).to(target.dtype)
        divisor = 2 if self.params.two_class_constants else num_classes
        distance = (student_logits.softmax(1) - target) ** 2
        loss = (mask * distance).sum() / (divisor * mask.sum() + 1e-16)
        return loss, {"uncertainty/threshold": torch.tensor(threshold), "uncertainty/certain_fraction": mask.mean()}
