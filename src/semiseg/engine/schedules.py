"""Ramp-ups and learning-rate schedules, written in iterations so that benchmarks can rescale them."""

from __future__ import annotations

import math


def sigmoid_rampup(iteration: int, length_epochs: float, epoch_iterations: int = 150) -> float:
    """exp(-5 (1 - min(e, L) / L)^2) with e = iteration // epoch_iterations (the papers' ramp)."""
    if length_epochs <= 0:
        return 1.0
    epoch = iteration // max(epoch_iterations, 1)
    phase = 1.0 - min(epoch, length_epochs) / length_epochs
    return math.exp(-5.0 * phase * phase)


def poly_lr(base_lr: float, iteration: int, total: int, power: float = 0.9) -> float:
    """base * (1 - it / total)^power (SSL4MIS, CrossMatch)."""
    return base_lr * (1.0 - min(iteration, total) / total) ** power


def step_lr(base_lr: float, iteration: int, step: int, gamma: float = 0.1) -> float:
    """base * gamma^((it - 1) // step) for the 1-based update `it` (UA-MT paper, BCP: x0.1 every 2,500 updates);
    updates at it <= 0 (before the schedule starts) use the base rate."""
    return base_lr * gamma ** (max(iteration - 1, 0) // max(step, 1))
