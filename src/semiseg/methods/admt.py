"""AD-MT, alternate diverse teaching (Zhao et al., ECCV 2024), from the paper and a reading of ZhenZHAO/AD-MT.

Written from the paper and the released training script's behaviour (that repository has no licence, so
nothing of it is copied): docs/methods/admt.md.

One student, two EMA teachers updated in turn (Random Periodic Alternate updating): the active teacher
changes after a random number of iterations drawn from 1..`period`. While teacher 1 is active the student
learns on a colour-and-noise strong view of the unlabelled batch; while teacher 2 is active, on a CutMix of
the weak view. Both teachers label the weak view; their softmax maps are blended with entropy weights
exp(-H_k) / sum_j exp(-H_j) (Conflict-Combating Module), and where the teachers disagree and the student is
more confident than the blend (`conflict_mode="pixel_confidence"`) the student's own label is used. The
unlabelled loss is a CE on the voxels whose pseudo-label confidence reaches `conf_threshold`.
"""

from __future__ import annotations

import copy
from typing import Any, Literal

import torch
import torch.nn.functional as F
from torch import nn

from ..data.loader import Batch
from ..engine.losses import dice_ce_loss
from ..engine.reductions import class_argmax
from ..engine.schedules import sigmoid_rampup
from ..errors import ConfigError
from ..nets import default_network
from . import register
from .base import Method, MethodParams, NetSpec, StepContext, StepOutput

ConflictMode = Literal["pixel_confidence", "always_teacher", "always_student", "random"]


class ADMTParams(MethodParams):
    ema_decay: float = 0.99
    """EMA decay of the teacher updated at this step (after the warm-up)."""
    ema_warmup_iterations: int = 80
    """Updates during which a teacher update copies the student outright (alpha = 0). With s = (iteration - 1) // 2
    and s0 = ema_warmup_iterations // 2, afterwards alpha = min(1 - 1 / (s - s0 + 1), ema_decay): the official
    `global_step = iter_num // 2` against `consistency_rampup` (40), i.e. 80 updates."""
    ema_buffers: bool = True
    """Official: BatchNorm running statistics are averaged like the weights (integer counters are not)."""
    consistency: float = 2.0
    """Maximum weight of the unlabelled loss (the LA config's 2.0; the script's own default is 1.0)."""
    consistency_rampup: float = 40.0
    """Sigmoid ramp-up length of the unlabelled weight, in epochs of `epoch_iterations`."""
    epoch_iterations: int = 150
    """Iterations per ramp-up "epoch" (150 in the papers' loops; benchmarks rescale it with the budget)."""
    conf_threshold: float = 0.8
    """Pseudo-labels whose (blended) confidence is below this are ignored."""
    period: int = 19
    """Longest stretch of iterations one teacher stays active (half an epoch of the official LA-4 loader)."""
    random_period: bool = True
    """Each stretch lasts U{1..period} iterations; False alternates every `period` iterations."""
    ensemble_temperature: float = 1.0
    """The blended teacher softmax is sharpened as p^(1/T), renormalised."""
    conflict_mode: ConflictMode = "pixel_confidence"
    """Where the teachers disagree and the blend disagrees with the student: take the student's label if it is
    more confident (official), never, always, or for the whole batch with probability 0.5."""
    conflict_weight: float = 1.0
    """1.0: one CE over all confident voxels (official). Otherwise CE over the teachers' agreement region +
    conflict_weight x CE over their conflict region, each averaged over its own voxels."""
    cutmix_prob: float = 1.0
    """Probability that the teacher-2 stretch's view is a CutMix (else the plain weak view)."""
    student_labels_unmixed: bool = True
    """Official quirk: under CutMix the student's labels for the conflict rule come from the un-mixed weak
    view while the teachers' labels are mixed; False mixes them alike."""
    brightness: float = 0.5
    """Strong view: maximum brightness jitter (official colour augmentation)."""
    contrast: float = 0.5
    """Strong view: maximum contrast jitter."""
    p_color: float = 0.8
    """Strong view: probability of the brightness / contrast jitter."""
    noise_sigma: tuple[float, float] = (0.1, 1.0)
    """Strong view: range of the clipped Gaussian noise sigma (drawn per sample)."""
    p_noise: float = 0.2
    """Strong view: probability of adding the clipped noise."""
    independent_teacher_init: bool = True
    """Official: both teachers start from their own random initialisation, not from the student."""
    evaluated_network: Literal["teacher", "student"] = "teacher"
    """The official test script scores teacher 1 (`ema_model`); `student` scores the student instead."""


def brightness_contrast(x: torch.Tensor, brightness: float, contrast: float, p: float) -> torch.Tensor:
    """Per sample, with probability p: x -> clip(a n + b mean(a n), 0, 1) in min-max normalised units n, then
    back to the sample's range; a = 1 + U(-contrast, contrast), b = U(-brightness, brightness)."""
    n = len(x)
    shape = (n, *([1] * (x.ndim - 1)))
    alpha = 1 + (torch.rand(shape, device=x.device) * 2 - 1) * contrast
    beta = (torch.rand(shape, device=x.device) * 2 - 1) * brightness
    apply = torch.rand(shape, device=x.device) < p
    flat = x.flatten(1)
    low = flat.min(1).values.view(shape)
    high = flat.max(1).values.view(shape)
    span = high - low
    norm = (x - low) / torch.where(span > 0, span, torch.ones_like(span))
    scaled = alpha * norm
    adjusted = (scaled + beta * scaled.flatten(1).mean(1).view(shape)).clamp(0, 1)
    return torch.where(apply, adjusted * span + low, x)


def clipped_noise(x: torch.Tensor, sigma: tuple[float, float], p: float) -> torch.Tensor:
    """Per sample, with probability p: x + clip(s N(0, 1), -2 s, 2 s), s = U(sigma)."""
    shape = (len(x), *([1] * (x.ndim - 1)))
    s = torch.rand(shape, device=x.device) * (sigma[1] - sigma[0]) + sigma[0]
    apply = torch.rand(shape, device=x.device) < p
    noise = torch.maximum(torch.minimum(torch.randn_like(x) * s, 2 * s), -2 * s)
    return torch.where(apply, x + noise, x)


def cutmix_box_masks(n: int, spatial: tuple[int, ...], device: torch.device) -> torch.Tensor:
    """[n, *spatial] bool boxes of AD-MT's `rand_bbox_3d`: lam ~ Beta(4, 4), edge int(size sqrt(1 - lam)) on every
    axis (the 2D area rule, also in 3D), centre c ~ U{size // 8 .. size - 1} per sample and axis, box
    [clip(c - edge // 2), clip(c + edge // 2)) clipped to the patch."""
    lam = torch.distributions.Beta(torch.tensor(4.0, device=device), torch.tensor(4.0, device=device)).sample()
    ratio = torch.sqrt(1 - lam)
    inside = torch.ones((n, *spatial), dtype=torch.bool, device=device)
    for axis, size in enumerate(spatial):
        half = torch.floor(size * ratio).long() // 2
        centre = torch.randint(size // 8, size, (n,), device=device)
        low, high = (centre - half).clamp(0, size), (centre + half).clamp(0, size)
        coords = torch.arange(size, device=device)
        along = (coords[None] >= low[:, None]) & (coords[None] < high[:, None])  # [n, size]
        inside = inside & along.view(n, *([1] * axis), size, *([1] * (len(spatial) - axis - 1)))
    return inside


def entropy_blend(p1: torch.Tensor, p2: torch.Tensor, temperature: float) -> torch.Tensor:
    """w_k = exp(-H_k) / (exp(-H_1) + exp(-H_2)), H_k = -sum_c p_k log2(p_k + 1e-10); blend w_1 p_1 + w_2 p_2,
    sharpened as q^(1/T) / sum_c q^(1/T)."""
    h1 = -(p1 * torch.log2(p1 + 1e-10)).sum(1, keepdim=True)
    h2 = -(p2 * torch.log2(p2 + 1e-10)).sum(1, keepdim=True)
    w1 = torch.exp(-h1) / (torch.exp(-h1) + torch.exp(-h2))
    blended = w1 * p1 + (1 - w1) * p2
    blended = blended.pow(1.0 / temperature)
    return blended / blended.sum(1, keepdim=True)


def masked_ce(logits: torch.Tensor, target: torch.Tensor, mask: torch.Tensor) -> torch.Tensor:
    """CE averaged over the voxels in `mask` (`ignore_index` CE); 0 where the mask is empty (the official NaN)."""
    ce = F.cross_entropy(logits, target, reduction="none")
    maskf = mask.to(ce.dtype)
    return (ce * maskf).sum() / maskf.sum().clamp_min(1)


@register
class ADMT(Method):
    name = "admt"
    description = "AD-MT: two EMA teachers updated in random alternate periods, entropy-blended conflict-aware labels"
    Params = ADMTParams
    # The script sets the poly rate after each update from its 0-based counter: update t uses poly(t - 2).
    recipe = {"iterations": 15000, "lr_schedule": "poly", "poly_lag": 1, "post_lcc": True, "seed": 2023}
    presets = {"la-4": {"labeled": 4}, "la-8": {"labeled": 8}, "la-16": {"labeled": 16}}

    def __init__(self, params: ADMTParams, spec: NetSpec) -> None:
        super().__init__(params, spec)
        self.params: ADMTParams = params
        if spec.spatial_dims != 3:
            raise ConfigError(f"admt implements the 3D (LA) recipe; the data is {spec.spatial_dims}D")
        if params.period < 1:
            raise ConfigError(f"admt parameter 'period' must be at least 1 (got {params.period})")
        self.net = default_network(spec)
        self.teachers = nn.ModuleList(default_network(spec) if params.independent_teacher_init
                                      else copy.deepcopy(self.net) for _ in range(2))
        for p in self.teachers.parameters():
            p.requires_grad_(False)
        # The alternation (saved through get_extra_state): teacher 1 active first. Its draws (stretch lengths,
        # the CutMix coin) come from a CPU generator of its own, seeded from the global one while every process
        # still shares the run's seed, so all processes of a multi-GPU run update the same teacher.
        self.alternation_rng = torch.Generator().manual_seed(int(torch.randint(0, 2**62, (), device="cpu")))
        self.first_active = True
        self.counter = 0
        self.stretch = self._draw_stretch()

    def _draw_stretch(self) -> int:
        """Length of the next stretch, U{1..period} (a CPU draw: no device sync)."""
        p = self.params.period
        return int(torch.randint(1, p + 1, (), generator=self.alternation_rng, device="cpu")) \
            if self.params.random_period else p

    def get_extra_state(self) -> dict[str, Any]:
        return {"first_active": self.first_active, "counter": self.counter, "stretch": self.stretch,
                "rng": self.alternation_rng.get_state()}

    def set_extra_state(self, state: dict[str, Any]) -> None:
        self.first_active = bool(state["first_active"])
        self.counter = int(state["counter"])
        self.stretch = int(state["stretch"])
        self.alternation_rng.set_state(state["rng"])

    @torch.no_grad()
    def pseudo_labels(self, weak: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        """Blended label [U, *S], its confidence and the teachers' conflict mask, on the weak view. The active
        teacher runs in train mode (dropout, batch statistics), the other in eval mode."""
        active, idle = (0, 1) if self.first_active else (1, 0)
        self.teachers[active].train()
        self.teachers[idle].eval()
        p1 = self.teachers[0](weak).softmax(1)
        p2 = self.teachers[1](weak).softmax(1)
        conflict = class_argmax(p1) != class_argmax(p2)
        confidence, label = entropy_blend(p1, p2, self.params.ensemble_temperature).max(1)
        return label, confidence, conflict

    def combine_with_student(self, label: torch.Tensor, confidence: torch.Tensor, conflict: torch.Tensor,
                             student_label: torch.Tensor,
                             student_confidence: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """Where both teachers conflict and the blend differs from the student, apply `conflict_mode`."""
        mode = self.params.conflict_mode
        where = conflict & (label != student_label)
        if mode == "always_teacher":
            return label, confidence
        if mode == "pixel_confidence":
            where = where & (student_confidence > confidence)
        elif mode == "random":
            where = where & (torch.rand((), device=label.device) < 0.5)
        return torch.where(where, student_label, label), torch.where(where, student_confidence, confidence)

    def unlabeled_loss(self, logits: torch.Tensor, label: torch.Tensor, confidence: torch.Tensor,
                       conflict: torch.Tensor) -> torch.Tensor:
        p = self.params
        confident = confidence >= p.conf_threshold
        if p.conflict_weight == 1.0:
            return masked_ce(logits, label, confident)
        return (masked_ce(logits, label, confident & ~conflict)
                + p.conflict_weight * masked_ce(logits, label, confident & conflict))

    def train_step(self, batch: Batch, ctx: StepContext) -> StepOutput:
        p, n_lab = self.params, batch.n_labeled
        weak = batch.image_unlabeled
        if not len(weak):
            raise ConfigError("admt needs unlabelled volumes: set batch_unlabeled >= 1")
        label, confidence, conflict = self.pseudo_labels(weak)
        if self.first_active:
            strong = clipped_noise(brightness_contrast(weak, p.brightness, p.contrast, p.p_color),
                                   p.noise_sigma, p.p_noise)
            box = perm = None
        else:
            strong, box, perm = weak, None, None
            if bool(torch.rand((), generator=self.alternation_rng) < p.cutmix_prob):  # CPU: no device sync
                box = cutmix_box_masks(len(weak), tuple(weak.shape[2:]), weak.device)
                perm = torch.randperm(len(weak), device=weak.device)
                strong = torch.where(box.unsqueeze(1), weak[perm], weak)
                label = torch.where(box, label[perm], label)
                confidence = torch.where(box, confidence[perm], confidence)
                conflict = torch.where(box, conflict[perm], conflict)
        logits = self.net(torch.cat([batch.image_labeled, weak, strong]))
        logits_l = logits[:n_lab]
        logits_w, logits_s = logits[n_lab:].chunk(2)
        with torch.no_grad():
            student_confidence, student_label = logits_w.detach().softmax(1).max(1)
            if box is not None and not p.student_labels_unmixed:
                student_label = torch.where(box, student_label[perm], student_label)
                student_confidence = torch.where(box, student_confidence[perm], student_confidence)
        label, confidence = self.combine_with_student(label, confidence, conflict, student_label, student_confidence)
        supervised = dice_ce_loss(logits_l, batch.label_labeled)
        unsupervised = self.unlabeled_loss(logits_s, label, confidence, conflict)
        weight = p.consistency * sigmoid_rampup(ctx.iteration - 1, p.consistency_rampup, p.epoch_iterations)
        loss = supervised + weight * unsupervised
        return StepOutput(loss, {"loss/supervised": supervised.detach(), "loss/unlabeled": unsupervised.detach(),
                                 "weight/consistency": torch.tensor(weight),
                                 "pseudo/confident_fraction": (confidence >= p.conf_threshold).float().mean(),
                                 "pseudo/conflict_fraction": conflict.float().mean(),
                                 "teacher/first_active": torch.tensor(float(self.first_active))})

    def ema_alpha(self, iteration: int) -> float:
        """Official `update_ema_variables(..., global_step=iter_num // 2)` with the 0-based `iter_num`."""
        p = self.params
        step, warmup = (iteration - 1) // 2, p.ema_warmup_iterations // 2
        if step < warmup:
            return 0.0
        return min(1 - 1 / (step - warmup + 1), p.ema_decay)

    @torch.no_grad()
    def after_step(self, ctx: StepContext) -> None:
        """Update the active teacher, then advance the alternation."""
        teacher = self.teachers[0 if self.first_active else 1]
        alpha = self.ema_alpha(ctx.iteration)
        pairs = [(t, s) for t, s in zip(teacher.parameters(), self.net.parameters())]
        if self.params.ema_buffers:
            pairs += [(t, s) for t, s in zip(teacher.buffers(), self.net.buffers()) if t.is_floating_point()]
        targets, sources = [t for t, _ in pairs], [s.detach() for _, s in pairs]
        torch._foreach_mul_(targets, alpha)
        torch._foreach_add_(targets, sources, alpha=1.0 - alpha)
        self.counter += 1
        if self.counter >= self.stretch:
            self.first_active = not self.first_active
            self.counter = 0
            self.stretch = self._draw_stretch()

    def trainable_parameters(self) -> list[nn.Parameter]:
        return list(self.net.parameters())

    def compiled_networks(self) -> list[nn.Module]:
        return [self.net, *self.teachers]

    def inference_network(self) -> nn.Module:
        return self.teachers[0] if self.params.evaluated_network == "teacher" else self.net

    def evaluated_output(self) -> str:
        return ("teacher 1 (the EMA teacher updated during the strong-view stretches), as the official test script"
                if self.params.evaluated_network == "teacher" else "the student VNet")

