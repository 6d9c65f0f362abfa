"""BCP, bidirectional copy-paste (Bai et al., CVPR 2023) as DeepMed-Lab-ECNU/BCP trains LA: docs/methods/bcp.md.

Two stages in one run. Pre-training (iterations 1..`pretrain_iterations`): labelled volume pairs are mixed
with a centred-anywhere box (copy-paste) and supervised with Dice + CE. Self-training: the student is copied
into an EMA teacher whose thresholded, largest-component predictions label the unlabelled volumes; each
step pastes an unlabelled box into a labelled volume and a labelled box into an unlabelled volume, and the
voxels that came from unlabelled volumes weigh `u_weight` in the loss.
"""

from __future__ import annotations

import math
from collections.abc import Sequence

import torch
import torch.nn.functional as F
from torch import nn

from ..data.loader import Batch
from ..engine.ema import EMATeacher
from ..errors import ConfigError
from ..nets import default_network
from . import register
from .base import Method, MethodParams, NetSpec, StepContext, StepOutput


def box_mask(spatial: Sequence[int], ratio: float, device: torch.device) -> torch.Tensor:
    """Float mask [*spatial]: 0 inside a box of int(ratio * size) voxels per axis, 1 elsewhere (BCP's
    `context_mask`); each start is uniform in [0, size - length), the official exclusive upper bound."""
    inside = torch.ones((), dtype=torch.bool, device=device)
    for axis, size in enumerate(spatial):
        length = int(size * ratio)
        start = torch.randint(0, max(size - length, 1), (1,), device=device)
        coords = torch.arange(size, device=device)
        along = (coords >= start) & (coords < start + length)
        inside = inside & along.view(*([1] * axis), size, *([1] * (len(spatial) - axis - 1)))
    return (~inside).float()


@torch.no_grad()
def largest_component(mask: torch.Tensor, check_every: int = 2) -> torch.Tensor:
    """Keep each sample's largest full-connectivity component of a bool mask [B, *S] (2D or 3D), on its device.

    Union-find by tensor ops: every foreground voxel starts labelled with its flat index; each round takes
    the minimum label of the 3^d neighbourhood (min-pooling), hooks the voxel's current root onto it
    (scatter-min at index label[v]) and compresses paths (label <- label[label], twice). Labels only ever
    take values from the same component and end as its first voxel in C order, so ties between equally
    large components keep that first one, as the official `skimage.measure.label` + `argmax(bincount)`.
    A few rounds suffice (5 on LA masks); the convergence test is the one host synchronisation.
    """
    b, spatial = mask.shape[0], mask.shape[1:]
    n = math.prod(spatial)
    dtype = torch.float32 if n < 2**24 else torch.float64  # flat indices stay exact
    fg = mask.reshape(b, 1, *spatial)
    index = torch.arange(n, device=mask.device, dtype=dtype).view(1, 1, *spatial)
    background = torch.tensor(float(n), device=mask.device, dtype=dtype)
    labels = torch.where(fg, index, background)
    pool = F.max_pool3d if len(spatial) == 3 else F.max_pool2d

    def pointer(flat: torch.Tensor) -> torch.Tensor:
        return flat.clamp(max=n - 1).long()  # background (= n) points anywhere; masked out below

    while True:
        previous = labels
        for _ in range(check_every):
            neighbours = torch.where(fg, -pool(-labels, 3, 1, 1), background).view(b, n)
            flat = labels.view(b, n)
            flat = torch.minimum(flat.scatter_reduce(1, pointer(flat), neighbours, reduce="amin"), neighbours)
            flat = flat.gather(1, pointer(flat))
            flat = flat.gather(1, pointer(flat))
            labels = torch.where(fg, flat.view_as(labels), background)
        if torch.equal(labels, previous):
            break
    flat = labels.view(b, n).long()
    counts = torch.zeros(b, n + 1, device=mask.device, dtype=torch.int64)
    counts.scatter_add_(1, flat, torch.ones_like(flat))
    counts[:, n] = 0
    return (flat == counts.argmax(1, keepdim=True)).view_as(mask) & mask


def region_dice_ce(logits: torch.Tensor, target: torch.Tensor,
                   region: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """BCP's `mask_DiceLoss` and masked CE restricted to `region` (broadcastable to target [N, *S]).

    Dice: 1 - mean over samples and classes of (2 sum(r p g) + 1e-5) / (sum(r (p + g)) + 1e-5), per sample
    (not batch-pooled); CE: sum(r CE) / (sum(r) + 1e-16) over the batch.
    """
    probs = logits.softmax(1)
    onehot = F.one_hot(target, logits.shape[1]).movedim(-1, 1).to(probs.dtype)
    region = region.to(probs.dtype).expand(target.shape)
    weight = region.unsqueeze(1)
    dims = tuple(range(2, probs.ndim))
    intersection = (probs * onehot * weight).sum(dims)
    union = ((probs + onehot) * weight).sum(dims)
    dice = 1 - ((2 * intersection + 1e-5) / (union + 1e-5)).mean()
    ce = (F.cross_entropy(logits, target, reduction="none") * region).sum() / (region.sum() + 1e-16)
    return dice, ce


class BCPParams(MethodParams):
    pretrain_iterations: int = 2000
    """Labelled-only copy-paste iterations before self-training (keep `lr_step_start` equal to it)."""
    mask_ratio: float = 2 / 3
    """Box edge as a fraction of each patch axis (74 x 74 x 53 in a 112 x 112 x 80 patch)."""
    u_weight: float = 0.5
    """Loss weight of voxels that came from unlabelled volumes (pseudo-labelled)."""
    ema_decay: float = 0.99
    """EMA teacher decay (the teacher follows the student with this momentum)."""
    pseudo_threshold: float = 0.5
    """Foreground where the teacher's softmax >= this (official `get_cut_mask`)."""
    pseudo_label_lcc: bool = True
    """Keep only the largest connected component of each pseudo-label (official `nms=1`)."""
    separate_forwards: bool = True
    """Official: the two mixed batches (and the teacher's two unlabelled halves) are separate network calls,
    so BatchNorm statistics are per half; False runs one call on all four volumes (faster)."""


@register
class BCP(Method):
    name = "bcp"
    description = "BCP: copy-paste pre-training, then bidirectional copy-paste self-training with an EMA teacher"
    Params = BCPParams
    recipe = {"batch_labeled": 4, "batch_unlabeled": 4, "iterations": 17000, "lr_schedule": "step",
              "lr_step": 2500, "lr_gamma": 0.1, "lr_step_start": 2000, "post_lcc": True}
    presets = {"la-4": {"labeled": 4}, "la-8": {"labeled": 8}, "la-16": {"labeled": 16}}

    def __init__(self, params: BCPParams, spec: NetSpec) -> None:
        super().__init__(params, spec)
        self.params: BCPParams = params
        if spec.num_classes != 2:
            raise ConfigError(f"bcp implements the binary (LA) recipe; the data has {spec.num_classes} classes")
        self.net = default_network(spec)
        # Official: a constant 0.99 from the first self-training update, whatever the stage length.
        self.teacher = EMATeacher(self.net, params.ema_decay, warmup=False)

    def _forward(self, net: nn.Module, first: torch.Tensor, second: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        if self.params.separate_forwards:
            return net(first), net(second)
        return net(torch.cat([first, second])).chunk(2)

    @torch.no_grad()
    def pseudo_labels(self, unlabeled_a: torch.Tensor, unlabeled_b: torch.Tensor) -> torch.Tensor:
        """Teacher foreground >= threshold, optionally reduced to its largest component: [U, *S] int64."""
        logits_a, logits_b = self._forward(self.teacher, unlabeled_a, unlabeled_b)
        foreground = torch.cat([logits_a, logits_b]).softmax(1)[:, 1] >= self.params.pseudo_threshold
        if self.params.pseudo_label_lcc:
            foreground = largest_component(foreground)
        return foreground.long()

    def pretrain_step(self, batch: Batch) -> StepOutput:
        images, labels = batch.image_labeled, batch.label_labeled
        half = len(images) // 2
        keep = box_mask(images.shape[2:], self.params.mask_ratio, images.device)
        mixed = images[:half] * keep + images[half:] * (1 - keep)
        target = torch.where(keep.bool(), labels[:half], labels[half:])
        dice, ce = region_dice_ce(self.net(mixed), target, keep.new_ones(()))
        loss = (dice + ce) / 2
        return StepOutput(loss, {"loss/pretrain_dice": dice.detach(), "loss/pretrain_ce": ce.detach()})

    def self_train_step(self, batch: Batch) -> StepOutput:
        images, labels, unlabeled = batch.image_labeled, batch.label_labeled, batch.image_unlabeled
        half = len(images) // 2
        pseudo = self.pseudo_labels(unlabeled[:half], unlabeled[half:])
        keep = box_mask(images.shape[2:], self.params.mask_ratio, images.device)
        paste = 1 - keep
        # Labelled volume outside the box, unlabelled inside; and the reverse.
        mixed_l = images[:half] * keep + unlabeled[:half] * paste
        mixed_u = unlabeled[half:] * keep + images[half:] * paste
        logits_l, logits_u = self._forward(self.net, mixed_l, mixed_u)
        w = self.params.u_weight
        dice_lo, ce_lo = region_dice_ce(logits_l, labels[:half], keep)
        dice_li, ce_li = region_dice_ce(logits_l, pseudo[:half], paste)
        dice_uo, ce_uo = region_dice_ce(logits_u, pseudo[half:], keep)
        dice_ui, ce_ui = region_dice_ce(logits_u, labels[half:], paste)
        loss_l = (dice_lo + w * dice_li + ce_lo + w * ce_li) / 2
        loss_u = (w * dice_uo + dice_ui + w * ce_uo + ce_ui) / 2
        return StepOutput(loss_l + loss_u, {"loss/labeled_mix": loss_l.detach(), "loss/unlabeled_mix": loss_u.detach(),
                                            "pseudo/foreground_fraction": pseudo.float().mean()})

    def train_step(self, batch: Batch, ctx: StepContext) -> StepOutput:
        n_lab, n_unl = batch.n_labeled, len(batch.image_unlabeled)
        if n_lab % 2 or n_unl != n_lab:  # checked from iteration 1, not only when self-training starts
            raise ConfigError(f"bcp mixes labelled and unlabelled halves: batch_labeled ({n_lab}) must be even "
                              f"and equal to batch_unlabeled ({n_unl})")
        if ctx.iteration <= self.params.pretrain_iterations:
            return self.pretrain_step(batch)
        if ctx.iteration == self.params.pretrain_iterations + 1:
            self.teacher.copy_from(self.net)
        return self.self_train_step(batch)

    @torch.no_grad()
    def after_step(self, ctx: StepContext) -> None:
        if ctx.iteration > self.params.pretrain_iterations:
            self.teacher.update(self.net, ctx.iteration)

    def optimizer_resets(self) -> tuple[int, ...]:
        """Self-training starts with a fresh SGD optimiser, as the official script builds a new one (B2)."""
        return (self.params.pretrain_iterations,)

    def inference_network(self) -> nn.Module:
        return self.net

    def evaluated_output(self) -> str:
        return "the student VNet (not the EMA teacher)"
