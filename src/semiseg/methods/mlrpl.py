"""MLRPL: mutual learning with reliable pseudo-labels (Su et al., Medical Image Analysis 2024).

One shared VNet encoder, two decoders that differ only in their upsampling (transposed conv vs
nearest + conv). Each decoder in turn teaches the other, voxel by voxel: its hard pseudo-label
supervises the student only where the teacher's entropy is strictly lower, weighted by how well the
teacher's probabilities agree with the cosine similarity of its features to per-sample class
prototypes. No EMA teacher, no threshold. Official-code quirks are the params documented in
docs/methods/mlrpl.md, with the behaviour behind the published numbers as default.
"""

from __future__ import annotations

import itertools
from typing import Literal

import torch
import torch.nn.functional as F
from torch import nn

from ..data.loader import Batch
from ..engine.losses import binary_dice_loss
from ..engine.reductions import class_argmax
from ..engine.schedules import sigmoid_rampup
from ..errors import ConfigError
from ..nets import MultiDecoderVNet
from ..nets.vnet import AverageMode, DecoderAverage
from . import register
from .base import Method, MethodParams, NetSpec, StepContext, StepOutput

Measure = Literal["entropy", "max_prob"]

_LA = {"patch_size": (112, 112, 80), "stride": (18, 18, 4), "rot_flip": True}
_PANCREAS = {"patch_size": (96, 96, 96), "stride": (16, 16, 16), "rot_flip": False}
# BraTS training code is unreleased: data protocol, iterations and selection follow SSL4MIS (unverified).
_BRATS = {"patch_size": (96, 96, 96), "stride": (64, 64, 64), "rot_flip": True, "iterations": 30000,
          "val": 25, "checkpoint_selection": "best_on_val"}


class MLRPLParams(MethodParams):
    supervised_weight: float = 0.5
    """lambda (`--lamda`): weight of the decoders' summed Dice loss on the labelled half."""
    consistency: float = 1.0
    """Maximum weight beta of the mutual pseudo-label loss."""
    consistency_rampup: float = 40.0
    """Sigmoid ramp-up length in epochs of `epoch_iterations` iterations."""
    epoch_iterations: int = 150
    """Iterations per "epoch" of the ramp-up schedules (150 in the papers; rescaled for short runs)."""
    pseudo_ce_input: Literal["probs", "logits"] = "probs"
    """Q1: probs = CE on softmax outputs (official code until Oct 2024, the published numbers); logits = HEAD."""
    pseudo_loss_on_labeled: bool = True
    """Q3: the pseudo-label loss also covers the labelled half (with predicted labels)."""
    pseudo_loss_norm: Literal["mask_count", "weight_sum"] = "mask_count"
    """Q4: divide the weighted CE by the number of masked voxels (official) or by the weight sum."""
    reliability_measure: Measure = "entropy"
    """Q7: a teacher is trusted where its entropy (or 1 - max probability) is strictly lower."""
    prototype_features: Literal["teacher_post_dropout", "teacher_pre_dropout"] = "teacher_post_dropout"
    """Q8: prototypes from the teacher's last decoder feature after (official) or before its Dropout3d."""
    decoder2_upsample: Literal["nearest", "trilinear"] = "nearest"
    """Q10: upsampling of the second decoder (MC-Net pairs transposed conv with trilinear)."""
    eval_output: Literal["decoder1", "average"] = "decoder1"
    """Evaluated output: decoder 1 (the papers' tables) or the average of both decoders."""
    average_output_mode: AverageMode = "logits_gt_0.5"
    """Q5: official averaging of the decoders' logits, foreground logit > 0.5; or mean softmax."""


def uncertainty(probs: torch.Tensor, measure: Measure = "entropy") -> torch.Tensor:
    """Per-voxel uncertainty [B, *S] of class probabilities [B, C, *S]; lower = more reliable."""
    if measure == "entropy":
        return -(probs * torch.log(probs + 1e-6)).sum(1)
    return 1 - probs.amax(1)


def class_prototypes(features: torch.Tensor, pseudo: torch.Tensor, num_classes: int) -> torch.Tensor:
    """L2-normalised mean feature of each sample's voxels predicted as each class: [B, C, F].

    A class absent from a sample's prediction gets the zero vector (so zero similarity everywhere).
    """
    f = features.flatten(2)
    classes = torch.arange(num_classes, device=pseudo.device).view(1, -1, 1)
    onehot = (pseudo.flatten(1).unsqueeze(1) == classes).to(f.dtype)
    sums = torch.einsum("bfv,bcv->bcf", f, onehot)
    return F.normalize(sums / (onehot.sum(-1, keepdim=True) + 1e-6), dim=-1, eps=1e-12)


def prototype_similarity(features: torch.Tensor, prototypes: torch.Tensor) -> torch.Tensor:
    """Cosine similarity [B, C, *S] of every voxel's feature [B, F, *S] to each unit prototype [B, C, F]."""
    f = features.flatten(2)
    sim = torch.einsum("bcf,bfv->bcv", prototypes, f) / f.norm(dim=1, keepdim=True).clamp_min(1e-8)
    return sim.view(*prototypes.shape[:2], *features.shape[2:])


@torch.no_grad()
def reliability_weight(probs: torch.Tensor, features: torch.Tensor) -> torch.Tensor:
    """1 - mean_c (S_c - p_c)^2 [B, *S]: agreement of the teacher's probabilities with its prototype
    similarities. In [0, 1] for post-ReLU features; computed in float32 outside autocast, no gradient."""
    with torch.autocast(features.device.type, enabled=False):
        probs, features = probs.float(), features.float()
        prototypes = class_prototypes(features, class_argmax(probs), probs.shape[1])
        return 1 - (prototype_similarity(features, prototypes) - probs).pow(2).mean(1)


def directional_loss(student_logits: torch.Tensor, student_probs: torch.Tensor, teacher_probs: torch.Tensor,
                     teacher_features: torch.Tensor, params: MLRPLParams
                     ) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """L_{i<-j}: the student's CE to the teacher's hard labels where the teacher is more certain,
    weighted by the teacher's reliability. Returns (loss, mask, weight); gradient reaches only the
    student's output."""
    with torch.no_grad():
        mask = (uncertainty(student_probs, params.reliability_measure)
                > uncertainty(teacher_probs, params.reliability_measure)).float()
        weight = reliability_weight(teacher_probs, teacher_features) * mask
    ce_input = student_logits if params.pseudo_ce_input == "logits" else student_probs
    ce = F.cross_entropy(ce_input, class_argmax(teacher_probs), reduction="none")
    norm = mask.sum() if params.pseudo_loss_norm == "mask_count" else weight.sum()
    return (ce * weight).sum() / (norm + 1e-6), mask, weight


@register
class MLRPL(Method):
    name = "mlrpl"
    description = "Mutual learning with reliable pseudo-labels: two decoders teach each other (MedIA 2024)"
    Params = MLRPLParams
    recipe = {"lr_schedule": "constant", "checkpoint_selection": "last"}
    presets = {"la-8": {**_LA, "labeled": 8}, "la-16": {**_LA, "labeled": 16},
               "pancreas-6": {**_PANCREAS, "labeled": 6}, "pancreas-12": {**_PANCREAS, "labeled": 12},
               "brats-25": {**_BRATS, "labeled": 25}, "brats-50": {**_BRATS, "labeled": 50}}

    def __init__(self, params: MLRPLParams, spec: NetSpec) -> None:
        super().__init__(params, spec)
        if spec.spatial_dims != 3 or spec.num_classes != 2:
            raise ConfigError(f"mlrpl needs binary 3D data (its network is the two-class 3D VNet); got "
                              f"{spec.spatial_dims}D data with {spec.num_classes} classes")
        self.net = MultiDecoderVNet(spec.in_channels, spec.num_classes, spec.n_filters,
                                    up_types=("transposed", params.decoder2_upsample), norm=spec.norm,
                                    dropout=spec.dropout)

    def decoder_outputs(self, x: torch.Tensor) -> list[tuple[torch.Tensor, torch.Tensor]]:
        """(logits, prototype features) of each decoder; the features are taken before the decoder's
        Dropout3d when `prototype_features` says so (captured by a hook on its input)."""
        if self.params.prototype_features == "teacher_post_dropout":
            return self.net.forward_all(x)
        captured: list[torch.Tensor] = []
        hooks = [d.dropout.register_forward_hook(lambda _m, inputs, _out: captured.append(inputs[0]))
                 for d in self.net.decoders]
        try:
            outputs = self.net.forward_all(x)
        finally:
            for hook in hooks:
                hook.remove()
        return [(logits, feat) for (logits, _), feat in zip(outputs, captured, strict=True)]

    def train_step(self, batch: Batch, ctx: StepContext) -> StepOutput:
        p = self.params
        n = batch.n_labeled
        outputs = self.decoder_outputs(batch.images)
        logits = [z for z, _ in outputs]
        probs = [z.float().softmax(1) for z in logits]
        supervised = sum(binary_dice_loss(pr[:n, 1], batch.label_labeled) for pr in probs)
        start = 0 if p.pseudo_loss_on_labeled else n
        pseudo = logits[0].new_zeros((), dtype=torch.float32)
        masked = weight_sum = logits[0].new_zeros((), dtype=torch.float32)
        for i, j in itertools.permutations(range(len(outputs)), 2):
            loss_ij, mask, weight = directional_loss(logits[i][start:], probs[i][start:], probs[j][start:],
                                                     outputs[j][1][start:], p)
            pseudo = pseudo + loss_ij
            masked, weight_sum = masked + mask.sum(), weight_sum + weight.sum()
        beta = self.consistency_weight(ctx)
        loss = p.supervised_weight * supervised + beta * pseudo
        voxels = max(probs[0][start:, 0].numel(), 1)
        logs = {"loss/supervised": supervised.detach(), "loss/pseudo": pseudo.detach(),
                "consistency_weight": pseudo.new_tensor(beta), "pseudo/mask_fraction": masked / voxels,
                "pseudo/mean_weight": weight_sum / masked.clamp_min(1)}
        return StepOutput(loss, logs)

    def consistency_weight(self, ctx: StepContext) -> float:
        """beta(t): the sigmoid ramp of the pseudo-label loss at update `ctx.iteration` (1-based)."""
        p = self.params
        return p.consistency * sigmoid_rampup(ctx.iteration, p.consistency_rampup, p.epoch_iterations)

    def inference_network(self) -> nn.Module:
        """Decoder 1 (the transposed-conv decoder), as the papers evaluate, or the decoders' average."""
        if self.params.eval_output == "decoder1":
            return self.net
        return DecoderAverage(self.net, self.params.average_output_mode)

    def evaluated_output(self) -> str:
        if self.params.eval_output == "decoder1":
            return "decoder 1 (transposed convolutions) of the shared-encoder network"
        return f"average of both decoders ({self.params.average_output_mode})"
