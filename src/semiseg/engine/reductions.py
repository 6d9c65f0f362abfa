"""Reductions over the class axis that torch computes slowly on CPU."""

from __future__ import annotations

import torch


def class_argmax(t: torch.Tensor, dim: int = 1) -> torch.Tensor:
    """`t.argmax(dim)` as `t.max(dim).indices`: the same indices (the first maximum on ties, NaN wins), but
    torch 2.13's CPU argmax over any axis but the innermost is 10-16x slower: 217 ms against 14 ms for the
    classes of a [4, 2, 64, 64, 32] batch, 1.0 s against 0.09 s for a [2, 160, 160, 96] volume (one thread)."""
    return t.max(dim).indices
