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
