"""The one EMA teacher of semiseg (Mean Teacher, UA-MT, BCP).

A frozen deep copy of the student whose parameters follow theta_t <- a theta_t + (1 - a) theta_s after
every optimiser step. With `warmup` (SSL4MIS's `update_ema_variables`, Mean Teacher and UA-MT),
a = min(1 - 1/iteration, decay): its `global_step` is our 1-based iteration minus one, so the first update
copies the student outright. Without it (BCP's `update_ema_variables`), a = decay from the first update.
Only parameters are averaged; buffers (BatchNorm running statistics) are the teacher's own, updated by
its own forward passes in train mode, exactly as in the official code. Being a submodule of the method,
the teacher is in the method's `state_dict`, so a resumed run continues with the same teacher.
"""

from __future__ import annotations

import copy

import torch
from torch import nn


class EMATeacher(nn.Module):
    """Exponential moving average of a student network; never receives gradients."""

    def __init__(self, student: nn.Module, decay: float = 0.99, warmup: bool = True) -> None:
        super().__init__()
        if not 0.0 <= decay < 1.0:
            raise ValueError(f"EMA decay must be in [0, 1), got {decay}")
        self.decay = decay
        self.warmup = warmup
        self.net = copy.deepcopy(student)
        for p in self.net.parameters():
            p.requires_grad_(False)

    def forward(self, *args: torch.Tensor) -> torch.Tensor:
        return self.net(*args)

    def alpha(self, iteration: int) -> float:
        """Weight of the old teacher after update `iteration` (1-based): min(1 - 1/iteration, decay) with
        warm-up, else decay."""
        if not self.warmup:
            return self.decay
        return min(1.0 - 1.0 / max(iteration, 1), self.decay)

    @torch.no_grad()
    def update(self, student: nn.Module, iteration: int) -> None:
        """theta_t <- a theta_t + (1 - a) theta_s for every parameter, in two fused multi-tensor ops."""
        alpha = self.alpha(iteration)
        teacher_params = list(self.net.parameters())
        student_params = [p.detach() for p in student.parameters()]
        if len(teacher_params) != len(student_params):
            raise ValueError("EMA teacher and student have different parameter lists")
        torch._foreach_mul_(teacher_params, alpha)
        torch._foreach_add_(teacher_params, student_params, alpha=1.0 - alpha)

    @torch.no_grad()
    def copy_from(self, student: nn.Module) -> None:
        """Restart the teacher from the student's current weights and buffers (BCP's stage switch)."""
        self.net.load_state_dict(student.state_dict())
