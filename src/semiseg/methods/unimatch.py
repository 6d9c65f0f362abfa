"""UniMatch: weak-to-strong consistency with dual strong views and feature perturbation (Yang et al., CVPR 2023).

Medical recipe of the official `more-scenarios/medical/unimatch.py` (ACDC, 2D UNet), and its 3D form on the
VNet with CrossMatch's LA pipeline: docs/methods/unimatch.md. Per iteration: a labelled batch x, an
unlabelled batch u_w and a second "mix" unlabelled batch. Each unlabelled image gets two strong views; CutMix
pastes the mix batch's strong views into boxes. The clean prediction on u_w (with the mix teacher's inside the
boxes) gives hard pseudo-labels with a confidence mask that supervise the clean predictions on both strong
views (L_s1, L_s2) and the channel-dropout (0.5) prediction on u_w itself (L_fp); all are masked Dice losses.

CrossMatch extends this method; the pieces they share (strong views, CutMix boxes, masked Dice, the
feature-perturbed network) live in crossmatch.py, _augment.py and nets/perturbed.py and are used from there.
`batch.image_unlabeled` carries both unlabelled streams: set `batch_unlabeled` to 2U, u_w first, then the mix.
"""

from __future__ import annotations

from typing import Any, Literal

import torch
from pydantic import Field
from torch import nn

from ..data.loader import Batch
from ..errors import ConfigError
from ..nets import default_network
from ..nets.perturbed import FeaturePerturbedNet, PerturbType
from . import register
from ._augment import quantise_8bit
from .base import Method, MethodParams, NetSpec, StepContext, StepOutput
from .crossmatch import CrossMatch, _paste, confidence

LossWeights = tuple[float, float, float, float]


class UniMatchParams(MethodParams):
    tau: float = Field(0.95, gt=0, le=1)
    """Confidence threshold of the pseudo-labels (official `conf_thresh`, fixed over the run)."""
    loss_weights: LossWeights = (1.0, 0.25, 0.25, 0.5)
    """Weights of (L_x, L_s1, L_s2, L_fp) before dividing by `loss_norm` (official)."""
    loss_norm: float = Field(2.0, gt=0)
    """The weighted sum of the four terms is divided by this (official: 2)."""
    fp_rate: float = Field(0.5, gt=0, lt=1)
    """Channel-dropout rate of the feature perturbation, at every pyramid level (official `Dropout2d(0.5)`)."""
    fp_type: PerturbType = "dropout"
    """Channel dropout (Dropout2d / 3d, official), or CrossMatch's alpha / feature_alpha alternatives."""
    mix_teacher_mode: Literal["train", "eval"] = "eval"
    """Mode of the no-grad teacher pass on the mix batch: eval (official: BN running statistics, dropout off)."""
    dice_classes: Literal["all", "foreground"] | None = None
    """Classes of the Dice losses. None: all classes for multi-class data (UniMatch `DiceLoss`), the
    foreground alone for binary data (CrossMatch-LA's Dice, the LA lineage's)."""
    dice_smooth: float = Field(1e-5, gt=0)
    """Smoothing term of the Dice losses (official 1e-5)."""
    cutmix_prob: float = Field(0.5, ge=0, le=1)
    """Probability that a strong view gets a CutMix box at all."""
    cutmix3d_axes: Literal["official_swapped", "correct"] = "correct"
    """3D boxes: written correctly (default; UniMatch is 2D) or as CrossMatch-LA's swapped-axes quirk Q1."""
    quantise_8bit: bool = True
    """2D only: u_w and the strong-view operations are rounded to 8-bit levels as the official PIL pipeline is."""


# ACDC: 300 epochs of floor(unlabelled slices / 12) iterations on one GPU (3 patients: 103, 7: 98 per epoch). The
# official loop sets the poly rate after each update from that update's 0-based index: update k uses poly(k - 2).
_ACDC = {"optimizer": "sgd", "lr": 0.01, "momentum": 0.9, "weight_decay": 1e-4, "nesterov": False,
         "lr_schedule": "poly", "poly_horizon": 0, "poly_lag": 1, "batch_labeled": 12, "batch_unlabeled": 24,
         "patch_size": (256, 256)}
# LA: no official 3D UniMatch; CrossMatch-LA's recipe (AdamW 1e-3, 2 + 2 (+ 2 mix) patches), poly over the run.
_LA: dict[str, Any] = {"optimizer": "adamw", "lr": 1e-3, "weight_decay": 1e-4, "lr_schedule": "poly",
                       "poly_horizon": 0, "iterations": 14000, "batch_labeled": 2, "batch_unlabeled": 4,
                       "patch_size": (112, 112, 80), "stride": (18, 18, 4)}


@register
class UniMatch(Method):
    name = "unimatch"
    description = "UniMatch: weak-to-strong CutMix, dual strong views + feature-dropout consistency (VNet / 2D UNet)"
    Params = UniMatchParams
    recipe = _LA
    presets = {"la-8": {"labeled": 8}, "la-16": {"labeled": 16},
               "acdc-3": {"labeled": 3, "iterations": 30900, **_ACDC},
               "acdc-7": {"labeled": 7, "iterations": 29400, **_ACDC}}

    # CrossMatch's implementations of the pieces it inherited from UniMatch, shared rather than copied: they read
    # `spec`, `params.quantise_8bit / cutmix_prob / cutmix3d_axes`, `smooth` and `binary`.
    strong_views = CrossMatch.strong_views
    cutmix_boxes = CrossMatch.cutmix_boxes
    dice = CrossMatch.dice
    supervised_loss = CrossMatch.supervised_loss

    def __init__(self, params: UniMatchParams, spec: NetSpec) -> None:
        super().__init__(params, spec)
        self.params: UniMatchParams = params
        self.net = FeaturePerturbedNet(default_network(spec), (params.fp_rate,), params.fp_type)
        classes = params.dice_classes or ("foreground" if spec.num_classes == 2 else "all")
        self.binary = classes == "foreground"
        self.smooth = params.dice_smooth

    @torch.no_grad()
    def _mix_teacher(self, u_mix: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        self.net.train(self.params.mix_teacher_mode == "train")
        conf, label = confidence(self.net(u_mix))
        self.net.train()
        return conf, label

    def train_step(self, batch: Batch, ctx: StepContext) -> StepOutput:
        p = self.params
        x, y, u = batch.image_labeled, batch.label_labeled, batch.image_unlabeled
        if len(u) < 2 or len(u) % 2:
            raise ConfigError(f"unimatch needs an even batch_unlabeled >= 2 (u_w and the mix batch), got {len(u)}")
        if self.spec.spatial_dims == 2 and p.quantise_8bit:
            u = quantise_8bit(u)
        n_u = len(u) // 2
        u_w, u_mix = u[:n_u], u[n_u:]
        conf_mix, label_mix = self._mix_teacher(u_mix)

        s1, s2, s1_mix, s2_mix = self.strong_views(torch.cat([u_w, u_w, u_mix, u_mix])).split(n_u)
        box1, box2 = self.cutmix_boxes(2 * n_u, tuple(u.shape[2:]), u.device).split(n_u)
        s1, s2 = _paste(box1, s1_mix, s1), _paste(box2, s2_mix, s2)

        clean, perturbed = self.net.forward_perturbed(torch.cat([x, u_w]))
        pred_x, pred_w = clean[:len(x)], clean[len(x):]
        pred_fp = perturbed[len(x):]
        pred_s1, pred_s2 = self.net(torch.cat([s1, s2])).chunk(2)

        conf_w, label_w = confidence(pred_w)
        conf1, label1 = _paste(box1, conf_mix, conf_w), _paste(box1, label_mix, label_w)
        conf2, label2 = _paste(box2, conf_mix, conf_w), _paste(box2, label_mix, label_w)
        valid_w = conf_w >= p.tau
        loss_x = self.supervised_loss(pred_x, y)
        loss_s1 = self.dice(pred_s1, label1, conf1 >= p.tau)
        loss_s2 = self.dice(pred_s2, label2, conf2 >= p.tau)
        loss_fp = self.dice(pred_fp, label_w, valid_w)
        w = p.loss_weights
        loss = (w[0] * loss_x + w[1] * loss_s1 + w[2] * loss_s2 + w[3] * loss_fp) / p.loss_norm
        logs = {"loss/x": loss_x, "loss/s1": loss_s1, "loss/s2": loss_s2, "loss/fp": loss_fp,
                "confident_fraction": valid_w.float().mean()}
        return StepOutput(loss, {k: v.detach() for k, v in logs.items()})

    def inference_network(self) -> nn.Module:
        return self.net.net

    def evaluated_output(self) -> str:
        return "the network's clean path (no feature dropout)"
