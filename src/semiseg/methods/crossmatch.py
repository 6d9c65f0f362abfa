"""CrossMatch: perturbation strategies + self-knowledge distillation (Zhao et al., IEEE JBHI 2024).

UniMatch-style weak-to-strong consistency on one network (VNet in 3D / LA, UNet in 2D / ACDC). Per
iteration: a labelled batch, an unlabelled batch u_w and a second "mix" unlabelled batch. Each unlabelled
image gets two strong views; CutMix pastes the mix batch's strong views into box M_k. The clean
prediction on u_w (with the mix teacher's inside the boxes) gives hard pseudo-labels with a confidence
mask that supervise (L_ip) the clean outputs on both strong views and (L_tkd) the 0.25 / 0.75
feature-dropout decoder outputs on u_w and strong view 2; (L_dkd) each dropout decoder on u_w also teaches
the same dropout decoder on strong view 2. All unsupervised losses are masked Dice losses.

`batch.image_unlabeled` carries both unlabelled streams: set `batch_unlabeled` to 2U, the first U are u_w,
the last U the mix batch. Official-code quirks are the params below, documented in docs/methods/crossmatch.md
with the current official code (HEAD) as default.
"""

from __future__ import annotations

import math
from typing import Any, Literal

import torch
import torch.nn.functional as F
from pydantic import Field
from torch import nn

from ..data.loader import Batch
from ..engine.schedules import sigmoid_rampup
from ..errors import ConfigError
from ..nets import default_network
from ..nets.perturbed import FeaturePerturbedNet, PerturbType
from . import register
from ._augment import cutmix_boxes_2d, cutmix_boxes_3d, quantise_8bit, strong_augment_2d, strong_augment_3d
from .base import Method, MethodParams, NetSpec, StepContext, StepOutput

LossWeights = tuple[float, float, float, float]
# Official weights of (L_x, L_s1, L_s2, L_kd) before dividing by `loss_norm` (crossmatch.md section 4).
LA_WEIGHTS: LossWeights = (1.0, 0.25, 0.25, 1.0)
ACDC_WEIGHTS: LossWeights = (1.0, 0.25, 0.25, 0.5)
PAPER_WEIGHTS: LossWeights = (1.0, 0.5, 0.5, 1.0)


class CrossMatchParams(MethodParams):
    tau: float | None = Field(None, gt=0, le=1)
    """Confidence threshold (LA: tau0 of the ramp). None: the official value of the data's setting,
    3D (LA HEAD) 0.75, 2D (ACDC) 0.95. LA paper-era code used 0.85 (quirk Q5)."""
    tau_schedule: Literal["ramp", "fixed"] | None = None
    """ramp (LA): tau0 at the first update, then (tau0 + (1 - tau0) r(t)) * ln 2 with the sigmoid ramp
    r(t) = exp(-5 (1 - t / horizon)^2) of the 0-based iteration t of the previous update; fixed (ACDC).
    None: ramp in 3D, fixed in 2D."""
    tau_ln2_scale: bool = True
    """Q7: the LA ramp multiplies the threshold by ln 2 (tau in [0.52, 0.69] for tau0 = 0.75)."""
    schedule_horizon: int = Field(17000, ge=0)
    """Q6: length of the LA threshold ramp in iterations, hard-coded 17,000 whatever the run length;
    0 = the run's iterations. (The LR poly horizon is the common key `poly_horizon`.)"""
    eta: float = Field(0.3, ge=0, le=1)
    """Balance of the distillation terms: L_kd = (1 - eta) L_tkd + eta L_dkd."""
    loss_weights: LossWeights | None = None
    """Q4: weights of (L_x, L_s1, L_s2, L_kd). None: the HEAD weights of the data's setting,
    3D (LA) (1, 0.25, 0.25, 1), 2D (ACDC) (1, 0.25, 0.25, 0.5); paper-era code (1, 0.5, 0.5, 1)."""
    loss_norm: float = Field(2.0, gt=0)
    """Q4: the weighted sum is divided by this (HEAD 2, paper-era 3)."""
    fp_rates: tuple[float, float] = (0.25, 0.75)
    """Rates of the weak and strong feature perturbation (official 0.5 -+ pert_gap / 2, pert_gap 0.5)."""
    fp_type: PerturbType = "dropout"
    """Official `--pert_type`: channel dropout (Dropout2d / 3d), alpha or feature_alpha dropout."""
    mix_teacher_mode: Literal["train", "eval"] = "train"
    """Q2: mode of the no-grad teacher pass on the mix batch: train (HEAD: batch-stat BN, dropouts on) or
    eval (paper-era, BN running statistics, x5/x9 dropout off; the feature perturbation stays on)."""
    mix_teacher_eval_epoch_iterations: int = Field(0, ge=0)
    """Q2 (ACDC HEAD): when > 0, the epoch length E in updates; the mix teacher then runs in eval mode at the
    first update of every epoch after the first (updates k E + 1, k >= 1), as the official ACDC loop does
    (its end-of-epoch validation leaves the model in eval() and train() comes after the teacher). 0: never."""
    dkd_box_target_source: Literal["mix", "self"] = "mix"
    """Q3: inside box M2 the L_dkd targets come from the dropout decoders on the mix batch (HEAD, fixed
    Dec 2024) or, as in the paper-era code, from the same decoders on u_w itself (spatially wrong)."""
    cutmix3d_axes: Literal["official_swapped", "correct"] = "official_swapped"
    """Q1: the LA box is drawn as (x, y, z) but written to mask[z:z+d, y:y+h, x:x+w] (official), or correctly."""
    cutmix_prob: float = Field(0.5, ge=0, le=1)
    """Probability that a strong view gets a CutMix box at all."""
    quantise_8bit: bool = True
    """Q21 (2D only): u_w and the strong-view operations are rounded to 8-bit levels as the PIL pipeline is."""
    temperature: float = Field(1.0, gt=0)
    """Q18 (LA `--temperature`): divides the three u_w logits when != 1."""


def masked_dice_loss(probs: torch.Tensor, target: torch.Tensor, valid: torch.Tensor | None = None,
                     smooth: float = 1e-4, foreground_only: bool = False) -> torch.Tensor:
    """Official masked Dice: per class 1 - (2 sum_O p t + s) / (sum_O p^2 + sum_O t^2 + s) pooled over the
    batch's valid voxels O, mean over classes (UniMatch `DiceLoss`, 4 classes incl. background) or class 1
    only (`foreground_only`, UA-MT `dice_loss` on LA). With no valid voxel every term is 0."""
    onehot = F.one_hot(target.long(), probs.shape[1]).movedim(-1, 1).to(probs.dtype)
    if foreground_only:
        probs, onehot = probs[:, 1:2], onehot[:, 1:2]
    if valid is not None:
        weight = valid.unsqueeze(1).to(probs.dtype)
        probs, onehot = probs * weight, onehot * weight
    dims = (0, *range(2, probs.ndim))
    intersection = (probs * onehot).sum(dims)
    denominator = (probs * probs).sum(dims) + (onehot * onehot).sum(dims)
    return (1 - (2 * intersection + smooth) / (denominator + smooth)).mean()


def at_least_float32(t: torch.Tensor) -> torch.Tensor:
    """bf16 / fp16 (autocast) logits upcast to float32 for softmax, Dice and CE; float32 and float64 kept as they
    are, so that a float64 run (the official-code comparison) is not rounded to float32 here."""
    return t.float() if t.dtype in (torch.float16, torch.bfloat16) else t


def confidence(logits: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """(max softmax probability, argmax) per voxel, without gradient."""
    conf, label = at_least_float32(logits.detach()).softmax(1).max(1)
    return conf, label


def _paste(box: torch.Tensor, inside: torch.Tensor, outside: torch.Tensor) -> torch.Tensor:
    """`inside` where the [N, *S] box is 1, `outside` elsewhere; images [N, C, *S] get the box per channel."""
    mask = box.bool() if box.ndim == inside.ndim else box.bool().unsqueeze(1)
    return torch.where(mask, inside, outside)


_LA_RECIPE: dict[str, Any] = {"optimizer": "adamw", "lr": 1e-3, "weight_decay": 1e-4, "lr_schedule": "poly",
                              "poly_horizon": 17000, "iterations": 14000, "batch_labeled": 2,
                              "batch_unlabeled": 4, "patch_size": (112, 112, 80), "stride": (18, 18, 4)}
_LA_HEAD = {"tau": 0.75, "tau_schedule": "ramp", "loss_weights": LA_WEIGHTS, "loss_norm": 2.0}
# ACDC: 300 epochs of floor(unlabelled slices / 12) iterations on one GPU (3 patients: 103, 7: 98 per epoch).
_ACDC = {"optimizer": "sgd", "lr": 0.01, "momentum": 0.9, "weight_decay": 1e-4, "nesterov": True,
         "lr_schedule": "poly", "poly_horizon": 0, "batch_labeled": 12, "batch_unlabeled": 24,
         "patch_size": (256, 256), "tau": 0.95, "tau_schedule": "fixed", "loss_weights": ACDC_WEIGHTS,
         "loss_norm": 2.0}
_PAPER = {"loss_weights": PAPER_WEIGHTS, "loss_norm": 3.0, "mix_teacher_mode": "eval",
          "dkd_box_target_source": "self"}


def _presets() -> dict[str, dict[str, Any]]:
    """`<data>-<n>` = HEAD (default), `-paper` = first upload (d00de40), `-corrected` = all quirks fixed."""
    presets: dict[str, dict[str, Any]] = {}
    for n in (4, 8, 16):
        head = {"labeled": n, **_LA_RECIPE, **_LA_HEAD}
        presets[f"la-{n}"] = head
        presets[f"la-{n}-paper"] = {**head, **_PAPER, "iterations": 9000, "tau": 0.85}
        presets[f"la-{n}-corrected"] = {**head, "cutmix3d_axes": "correct", "mix_teacher_mode": "eval",
                                        "poly_horizon": 0, "schedule_horizon": 0}
    for n, iterations in ((3, 30900), (7, 29400)):
        # The official loop sets the poly rate after each step (lag 1) and validates in eval() at every epoch
        # end, so the first mix teacher of each later epoch runs in eval mode (epochs of iterations / 300).
        head = {"labeled": n, "iterations": iterations, **_ACDC, "poly_lag": 1,
                "mix_teacher_eval_epoch_iterations": iterations // 300}
        presets[f"acdc-{n}"] = head
        presets[f"acdc-{n}-paper"] = {**head, **_PAPER}
        presets[f"acdc-{n}-corrected"] = {**head, "mix_teacher_mode": "eval", "val": 1, "poly_lag": 0,
                                          "mix_teacher_eval_epoch_iterations": 0,
                                          "checkpoint_selection": "best_on_val"}
    return presets


@register
class CrossMatch(Method):
    name = "crossmatch"
    description = "CrossMatch: weak-to-strong CutMix + feature-dropout decoders with self-distillation (VNet / 2D UNet)"
    Params = CrossMatchParams
    recipe = _LA_RECIPE
    presets = _presets()

    @classmethod
    def schedules_on_total(cls, params: MethodParams) -> list[str]:
        return [] if getattr(params, "schedule_horizon", 0) else ["confidence-threshold ramp (schedule_horizon 0)"]

    def __init__(self, params: CrossMatchParams, spec: NetSpec) -> None:
        super().__init__(params, spec)
        self.net = FeaturePerturbedNet(default_network(spec), params.fp_rates, params.fp_type)
        three_d = spec.spatial_dims == 3
        self.tau0 = params.tau if params.tau is not None else (0.75 if three_d else 0.95)
        self.tau_schedule = params.tau_schedule or ("ramp" if three_d else "fixed")
        self.loss_weights = params.loss_weights or (LA_WEIGHTS if three_d else ACDC_WEIGHTS)
        # Binary tasks use the LA foreground Dice (smooth 1e-5), multi-class the ACDC all-class Dice (1e-4).
        self.binary = spec.num_classes == 2
        self.smooth = 1e-5 if self.binary else 1e-4

    def threshold(self, iteration: int, total_iterations: int) -> float:
        """Confidence threshold of update `iteration` (1-based)."""
        if self.tau_schedule == "fixed" or iteration <= 1:
            return self.tau0
        horizon = self.params.schedule_horizon or total_iterations
        tau = self.tau0 + (1 - self.tau0) * sigmoid_rampup(iteration - 2, horizon, 1)
        return tau * math.log(2) if self.params.tau_ln2_scale else tau

    def dice(self, logits: torch.Tensor, target: torch.Tensor, valid: torch.Tensor | None = None) -> torch.Tensor:
        return masked_dice_loss(at_least_float32(logits).softmax(1), target, valid, self.smooth, self.binary)

    def supervised_loss(self, logits: torch.Tensor, target: torch.Tensor) -> torch.Tensor:
        """(CE + Dice) / 2 on the labelled batch."""
        return (F.cross_entropy(at_least_float32(logits), target.long()) + self.dice(logits, target)) / 2

    def strong_views(self, images: torch.Tensor) -> torch.Tensor:
        """Independent strong views, computed in float32 even under the trainer's autocast (8-bit levels,
        bias fields and blur kernels would be coarsened in bf16)."""
        with torch.autocast(images.device.type, enabled=False):
            if self.spec.spatial_dims == 3:
                return strong_augment_3d(images.float())
            return strong_augment_2d(images.float(), quantise=self.params.quantise_8bit)

    def cutmix_boxes(self, n: int, size: tuple[int, ...], device: torch.device) -> torch.Tensor:
        if len(size) == 3:
            return cutmix_boxes_3d(n, size, device, self.params.cutmix_prob,
                                   swapped_axes=self.params.cutmix3d_axes == "official_swapped")
        return cutmix_boxes_2d(n, size, device, self.params.cutmix_prob)

    @torch.no_grad()
    def _mix_teacher(self, x: torch.Tensor, u_mix: torch.Tensor, iteration: int) -> dict[str, torch.Tensor]:
        """Hard labels and confidences on the mix batch: clean path, and the dropout paths if L_dkd uses them."""
        self.net.train(self.mix_teacher_trains(iteration))
        out: dict[str, torch.Tensor] = {}
        out["conf_c"], out["label_c"] = confidence(self.net(u_mix))
        if self.params.dkd_box_target_source == "mix":
            # The labelled images only fill the first half of the pass (official; they shift BN statistics).
            _, _, weak, strong = self.net.forward_fp(torch.cat([x, u_mix]), len(x))
            out["conf_w"], out["label_w"] = confidence(weak)
            out["conf_s"], out["label_s"] = confidence(strong)
        self.net.train()
        return out

    def mix_teacher_trains(self, iteration: int) -> bool:
        """Whether the mix teacher of update `iteration` runs in train mode (Q2)."""
        epoch = self.params.mix_teacher_eval_epoch_iterations
        if epoch and iteration > epoch and (iteration - 1) % epoch == 0:
            return False
        return self.params.mix_teacher_mode == "train"

    def train_step(self, batch: Batch, ctx: StepContext) -> StepOutput:
        p = self.params
        x, y, u = batch.image_labeled, batch.label_labeled, batch.image_unlabeled
        if len(u) < 2 or len(u) % 2:
            raise ConfigError(f"crossmatch needs an even batch_unlabeled >= 2 (u_w and the mix batch), got {len(u)}")
        if self.spec.spatial_dims == 2 and p.quantise_8bit:
            u = quantise_8bit(u)
        n_u = len(u) // 2
        u_w, u_mix = u[:n_u], u[n_u:]
        mix = self._mix_teacher(x, u_mix, ctx.iteration)

        s1, s2, s1_mix, s2_mix = self.strong_views(torch.cat([u_w, u_w, u_mix, u_mix])).split(n_u)
        box1, box2 = self.cutmix_boxes(2 * n_u, tuple(u.shape[2:]), u.device).split(n_u)
        s1, s2 = _paste(box1, s1_mix, s1), _paste(box2, s2_mix, s2)

        pred_x, pred_w, pred_w_weak, pred_w_strong = self.net.forward_fp(torch.cat([x, u_w]), len(x))
        if p.temperature != 1:
            pred_w, pred_w_weak, pred_w_strong = (t / p.temperature for t in (pred_w, pred_w_weak, pred_w_strong))
        pred_s1, pred_s2, pred_s2_weak, pred_s2_strong = self.net.forward_fp(torch.cat([s1, s2]), n_u)

        conf_c, label_c = confidence(pred_w)
        conf_w, label_w = confidence(pred_w_weak)
        conf_s, label_s = confidence(pred_w_strong)
        conf_c1, label_c1 = _paste(box1, mix["conf_c"], conf_c), _paste(box1, mix["label_c"], label_c)
        conf_c2, label_c2 = _paste(box2, mix["conf_c"], conf_c), _paste(box2, mix["label_c"], label_c)
        if p.dkd_box_target_source == "mix":
            conf_w, label_w = _paste(box2, mix["conf_w"], conf_w), _paste(box2, mix["label_w"], label_w)
            conf_s, label_s = _paste(box2, mix["conf_s"], conf_s), _paste(box2, mix["label_s"], label_s)

        tau = self.threshold(ctx.iteration, ctx.total_iterations)
        valid_c, valid_c2 = conf_c >= tau, conf_c2 >= tau
        loss_x = self.supervised_loss(pred_x, y)
        loss_s1 = self.dice(pred_s1, label_c1, conf_c1 >= tau)
        loss_s2 = self.dice(pred_s2, label_c2, valid_c2)
        loss_tkd = (self.dice(pred_w_weak, label_c, valid_c) + self.dice(pred_w_strong, label_c, valid_c)
                    + self.dice(pred_s2_weak, label_c2, valid_c2) + self.dice(pred_s2_strong, label_c2, valid_c2)) / 4
        loss_dkd = (self.dice(pred_s2_weak, label_w, conf_w >= tau)
                    + self.dice(pred_s2_strong, label_s, conf_s >= tau)) / 2
        loss_kd = (1 - p.eta) * loss_tkd + p.eta * loss_dkd
        w = self.loss_weights
        loss = (w[0] * loss_x + w[1] * loss_s1 + w[2] * loss_s2 + w[3] * loss_kd) / p.loss_norm
        logs = {"loss/x": loss_x, "loss/s1": loss_s1, "loss/s2": loss_s2, "loss/tkd": loss_tkd,
                "loss/dkd": loss_dkd, "confident_fraction": valid_c.float().mean()}
        logs = {k: v.detach() for k, v in logs.items()} | {"tau": torch.tensor(tau, dtype=torch.float64)}
        return StepOutput(loss, logs)

    def inference_network(self) -> nn.Module:
        return self.net.net

    def evaluated_output(self) -> str:
        return "the network's clean path (no feature dropout)"
