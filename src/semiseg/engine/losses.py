"""Segmentation losses as the papers define them (smoothing constants included)."""

from __future__ import annotations

import torch
import torch.nn.functional as F


def binary_dice_loss(prob_fg: torch.Tensor, target: torch.Tensor, smooth: float = 1e-8) -> torch.Tensor:
    """MC-Net-lineage Dice on the foreground probability, pooled over the whole batch:
    1 - (2 sum(p g) + s) / (sum(p) + sum(g) + s). Used by MC-Net, CAML and MLRPL."""
    target = target.float()
    intersection = (prob_fg * target).sum()
    return 1 - (2 * intersection + smooth) / (prob_fg.sum() + target.sum() + smooth)


def multiclass_dice_loss(probs: torch.Tensor, target: torch.Tensor, smooth: float = 1e-5,
                         include_background: bool = True) -> torch.Tensor:
    """SSL4MIS / UA-MT `DiceLoss`: soft Dice per class, batch-pooled, averaged over classes.

    Per class c: 1 - (2 sum(p_c g_c) + s) / (sum(p_c^2) + sum(g_c^2) + s) with squared denominators,
    as in the official `DiceLoss(n_classes)`.
    """
    onehot = F.one_hot(target.long(), probs.shape[1]).movedim(-1, 1).to(probs.dtype)
    dims = (0, *range(2, probs.ndim))
    intersection = (probs * onehot).sum(dims)
    denominator = (probs * probs).sum(dims) + (onehot * onehot).sum(dims)
    per_class = 1 - (2 * intersection + smooth) / (denominator + smooth)
    return per_class.mean() if include_background else per_class[1:].mean()


def dice_ce_loss(logits: torch.Tensor, target: torch.Tensor) -> torch.Tensor:
    """0.5 * (CE + Dice): the supervised loss of UA-MT / SSL4MIS baselines."""
    probs = logits.softmax(1)
    return 0.5 * (F.cross_entropy(logits, target.long()) + multiclass_dice_loss(probs, target))


def sharpen(probs: torch.Tensor, temperature: float) -> torch.Tensor:
    """MC-Net sharpening p^(1/T) / (p^(1/T) + (1-p)^(1/T)), element-wise per channel."""
    powered = probs.pow(1 / temperature)
    return powered / (powered + (1 - probs).pow(1 / temperature))
