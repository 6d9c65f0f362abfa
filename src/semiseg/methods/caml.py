"""CAML (Gao et al., MICCAI 2023): correlation-aware mutual learning, as the official code trains it.

Two VNets (f_v, f_a with cross-sample attention) are trained with a Dice loss on the labelled pair,
MC-Net mutual learning against each other's sharpened probabilities, and omni-correlation consistency
(OCC): the correlation of confident, agreed unlabelled voxels with 256 labelled features per class from
a memory bank, f_v's correlation pulled towards f_a's by a cross-entropy. Only f_v is evaluated.

Unlike the official code (a CPU numpy bank concatenated every step), the memory bank lives in two
registered buffers on the model's device, and sampling and top-k selection are fixed-size tensor ops:
no host round trip, no Python loop over voxels. Official quirks are named options (docs/methods/caml.md).
"""

from __future__ import annotations

from typing import Any, Literal

import torch
import torch.nn.functional as F
from pydantic import model_validator
from torch import nn

from ..data.loader import Batch
from ..engine.losses import binary_dice_loss, dice_ce_loss, sharpen
from ..engine.reductions import class_argmax
from ..engine.schedules import sigmoid_rampup
from ..nets.caml import CAMLNet, CAMLOutput, at_least_float32
from . import register
from .base import Method, MethodParams, NetSpec, StepContext, StepOutput

# Ramp lengths (epochs of `epoch_iterations`) of the released runs, by number of labelled cases.
RAMP_BY_LABELS = ((4, 40.0), (8, 20.0))
RAMP_MORE_LABELS = 15.0

QUIRK_VALUES: dict[str, dict[str, Any]] = {
    "official": {"memory_feature_layout": "official_scrambled", "occ_target_detach": False,
                 "mutual_target_detach": False, "head_bn_rows": "all_agreed"},
    "corrected": {"memory_feature_layout": "channels_last", "occ_target_detach": True,
                  "mutual_target_detach": True, "head_bn_rows": "topk_only"},
}


def default_ramp_length(n_labeled: int) -> float:
    """40 / 20 / 15 epochs for 4 / 8 / 16 labelled cases (released runs); <= 4: 40, <= 8: 20, more: 15."""
    for limit, length in RAMP_BY_LABELS:
        if n_labeled <= limit:
            return length
    return RAMP_MORE_LABELS


class CAMLParams(MethodParams):
    sup_weight: float = 0.5
    """lambda_s (`--lamda`) on the summed Dice of both sub-models."""
    consistency: float = 1.0
    """lambda_c, maximum weight of the mutual (MSE-to-sharpened) loss."""
    consistency_o: float = 0.05
    """lambda_o, maximum weight of the OCC loss."""
    consistency_rampup: float | None = None
    """Sigmoid ramp length in epochs; None follows the labelled count (40 / 20 / 15 for 4 / 8 / 16)."""
    epoch_iterations: int = 150
    """Iterations per "epoch" of the ramp-up schedules (150 in the papers; rescaled for short runs)."""
    temperature: float = 0.1
    """Sharpening temperature T of the mutual targets."""
    occ_temperature: float = 0.1
    """Softmax temperature tau of the correlation matrices."""
    num_filtered: int = 12800
    """K: most confident agreed unlabelled voxels kept per class."""
    memory_num: int = 256
    """Labelled memory features sampled per class each step."""
    head_dim: int = 32
    """Q2: the official `--embedding_dim 64` is never used; heads are 32-d."""
    quirks: Literal["official", "corrected"] = "official"
    """Fills every quirk option below that is not given explicitly."""
    memory_feature_layout: Literal["official_scrambled", "channels_last"] = "official_scrambled"
    """Q1: f_a's labelled features are flattened without moving channels last (scrambled rows)."""
    occ_target_detach: bool = False
    """Q4: stop-gradient on f_a's correlation matrix (the OCC target)."""
    mutual_target_detach: bool = False
    """Q5: stop-gradient on the sharpened mutual targets."""
    head_bn_rows: Literal["all_agreed", "topk_only"] = "all_agreed"
    """Q6: rows whose statistics the head BatchNorm uses: every agreed unlabelled voxel, or the top-K kept."""
    occ_similarity: Literal["dot", "cosine"] = "dot"
    """Q9: raw dot product (official); cosine is an ablation."""
    sup_loss: Literal["dice", "dice_ce"] = "dice"
    """Q13: foreground Dice only (official); dice_ce is 0.5 (CE + Dice) per sub-model, an ablation."""

    @model_validator(mode="before")
    @classmethod
    def _fill_quirks(cls, data: Any) -> Any:
        if isinstance(data, dict):
            return {**QUIRK_VALUES.get(data.get("quirks", "official"), {}), **data}
        return data


@register
class CAML(Method):
    name = "caml"
    description = "CAML (MICCAI'23): dual VNets, cross-sample attention, omni-correlation consistency"
    Params = CAMLParams
    recipe = {"optimizer": "sgd", "lr": 0.01, "lr_schedule": "constant", "iterations": 15000}
    presets = {f"la-{n}": {"labeled": n, "consistency_rampup": default_ramp_length(n), "seed": 3407}
               for n in (4, 8, 16)}

    def __init__(self, params: CAMLParams, spec: NetSpec) -> None:
        super().__init__(params, spec)
        self.params: CAMLParams = params
        self.net = CAMLNet(spec.in_channels, spec.num_classes, spec.n_filters, params.head_dim, spec.norm,
                           spec.dropout)
        # Memory bank: one row per voxel of each labelled slot's latest crop, label -1 where the voxel is not
        # stored (wrong in either model). Allocated at the first step, when the patch size is known.
        self.register_buffer("memory_features", torch.zeros(0, 0, params.head_dim))
        self.register_buffer("memory_labels", torch.zeros(0, 0, dtype=torch.int8))

    def inference_network(self) -> nn.Module:
        return self.net.f_v

    def evaluated_output(self) -> str:
        return "f_v (the transposed-conv VNet; f_a and the heads are training-only)"

    def train_step(self, batch: Batch, ctx: StepContext) -> StepOutput:
        p = self.params
        out = self.net(batch.images)
        prob_v, prob_a = at_least_float32(out.seg_v).softmax(1), at_least_float32(out.seg_a).softmax(1)
        sup = self.supervised_loss(out, prob_v, prob_a, batch)
        mutual = self.mutual_loss(prob_v, prob_a)
        occ, occ_rows = self.occ_loss(out, prob_v, prob_a, batch, ctx.n_labeled_cases)
        length = p.consistency_rampup if p.consistency_rampup is not None else default_ramp_length(
            ctx.n_labeled_cases)
        ramp = sigmoid_rampup(ctx.iteration, length, p.epoch_iterations)
        loss = p.sup_weight * sup + p.consistency * ramp * mutual + p.consistency_o * ramp * occ
        logs = {"loss/supervised": sup.detach(), "loss/mutual": mutual.detach(), "loss/occ": occ.detach(),
                "occ/rows": occ_rows, "weight/ramp": torch.tensor(ramp)}
        return StepOutput(loss, logs)

    def supervised_loss(self, out: CAMLOutput, prob_v: torch.Tensor, prob_a: torch.Tensor,
                        batch: Batch) -> torch.Tensor:
        """Sum over f_v and f_a of the loss on the labelled samples."""
        n, label = batch.n_labeled, batch.label_labeled
        if self.params.sup_loss == "dice_ce":
            return (dice_ce_loss(at_least_float32(out.seg_v[:n]), label)
                    + dice_ce_loss(at_least_float32(out.seg_a[:n]), label))
        return binary_dice_loss(prob_v[:n, 1], label) + binary_dice_loss(prob_a[:n, 1], label)

    def mutual_loss(self, prob_v: torch.Tensor, prob_a: torch.Tensor) -> torch.Tensor:
        """MSE of each model's probabilities to the other's sharpened ones, all samples and channels."""
        target_v, target_a = sharpen(prob_v, self.params.temperature), sharpen(prob_a, self.params.temperature)
        if self.params.mutual_target_detach:
            target_v, target_a = target_v.detach(), target_a.detach()
        return F.mse_loss(prob_v, target_a) + F.mse_loss(prob_a, target_v)

    def occ_loss(self, out: CAMLOutput, prob_v: torch.Tensor, prob_a: torch.Tensor, batch: Batch,
                 n_slots: int) -> tuple[torch.Tensor, torch.Tensor]:
        """Update the bank with this batch, sample it, and return (OCC loss, number of rows it averages)."""
        n = batch.n_labeled
        confidence_v, pred_v = prob_v.detach().max(1)
        pred_a = class_argmax(prob_a.detach())
        emb_v, emb_a = at_least_float32(out.emb_v), at_least_float32(out.emb_a)
        with torch.autocast(emb_v.device.type, enabled=False):
            self.update_memory(emb_v[:n], emb_a[:n], pred_v[:n], pred_a[:n], batch.label_labeled,
                               batch.index_labeled, n_slots)
            memory, memory_ok = self.sample_memory()
            if len(batch.image_unlabeled) == 0:
                zero = prob_v.new_zeros(())
                return zero, zero
            return self.correlation_loss(emb_v[n:], emb_a[n:], confidence_v[n:], pred_v[n:], pred_a[n:], memory,
                                         memory_ok)

    @torch.no_grad()
    def update_memory(self, emb_v: torch.Tensor, emb_a: torch.Tensor, pred_v: torch.Tensor, pred_a: torch.Tensor,
                      label: torch.Tensor, index: torch.Tensor, n_slots: int) -> None:
        """Overwrite slot `index[i]` with sample i's projected features where both models are right.

        Stored feature = (projection_v(e_v) + projection_a(e_a)) / 2 with running BatchNorm statistics;
        with `official_scrambled`, e_a is flattened to rows without moving channels last (Q1).
        """
        n, channels = emb_v.shape[:2]
        voxels = label[0].numel()
        self._allocate_bank(n_slots, voxels, emb_v.device)
        # A case drawn twice in one batch: the later sample wins, as in the official sequential loop.
        positions = torch.arange(n, device=index.device)
        winner = ((index[:, None] == index[None, :]) * positions).amax(1)
        emb_v, emb_a, pred_v, pred_a, label = (t[winner] for t in (emb_v, emb_a, pred_v, pred_a, label))
        rows_v = emb_v.movedim(1, -1).reshape(-1, channels)
        if self.params.memory_feature_layout == "official_scrambled":
            rows_a = emb_a.reshape(-1, channels)
        else:
            rows_a = emb_a.movedim(1, -1).reshape(-1, channels)
        features = (self.net.projection_v(rows_v, running_stats=True)
                    + self.net.projection_a(rows_a, running_stats=True)) / 2
        correct = (pred_v == label) & (pred_a == label)
        self.memory_features[index] = features.reshape(n, voxels, -1)
        self.memory_labels[index] = torch.where(correct, label, -1).to(torch.int8).reshape(n, voxels)

    def _allocate_bank(self, n_slots: int, voxels: int, device: torch.device) -> None:
        if self.memory_labels.shape == (n_slots, voxels):
            return
        if n_slots <= 0:
            raise ValueError("CAML needs the number of labelled cases (StepContext.n_labeled_cases) to size its "
                             "memory bank")
        self.memory_features = torch.zeros(n_slots, voxels, self.params.head_dim, device=device)
        self.memory_labels = torch.full((n_slots, voxels), -1, dtype=torch.int8, device=device)

    def sample_memory(self) -> tuple[torch.Tensor, torch.Tensor]:
        """`memory_num` stored features per class, uniformly without replacement over all slots.

        Returns features [classes, memory_num, head_dim] and, per class, whether it had enough entries
        (the official bank is None otherwise). Top-k of uniform keys restricted to the class is a uniform
        draw without replacement, with fixed shapes and no host sync.
        """
        labels = self.memory_labels.reshape(-1)
        features = self.memory_features.reshape(-1, self.memory_features.shape[-1])
        keys = torch.rand(labels.shape, device=labels.device)
        k = min(self.params.memory_num, labels.numel())
        picks, available = [], []
        for c in range(self.spec.num_classes):
            values, idx = torch.where(labels == c, keys, -1.0).topk(k)
            picks.append(features[idx])
            available.append((values.min() >= 0) & (k == self.params.memory_num))
        return torch.stack(picks), torch.stack(available)

    def correlation_loss(self, emb_v: torch.Tensor, emb_a: torch.Tensor, confidence_v: torch.Tensor,
                         pred_v: torch.Tensor, pred_a: torch.Tensor, memory: torch.Tensor,
                         memory_ok: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """OCC on the unlabelled samples: CE of f_v's correlation matrix against f_a's (the target).

        Rows: per class (f_v's argmax), the top-`num_filtered` agreed voxels by f_v's confidence, kept in
        fixed-size tensors with a validity mask; a class with fewer than 2 rows is dropped, and memory
        classes without enough entries are masked out of the softmax, as the official code skips them.
        """
        p = self.params
        channels = emb_v.shape[1]
        agree = (pred_v == pred_a).reshape(-1)
        confidence, label = confidence_v.reshape(-1), pred_v.reshape(-1)
        rows_v = emb_v.movedim(1, -1).reshape(-1, channels)
        rows_a = emb_a.movedim(1, -1).reshape(-1, channels)
        k = min(p.num_filtered, label.numel())
        selected, valid = [], []
        for c in range(self.spec.num_classes):
            scores = torch.where(agree & (label == c), confidence, float("-inf"))
            values, idx = scores.topk(k)
            ok = values > float("-inf")
            selected.append(idx)
            valid.append(ok & (ok.sum() > 1))
        idx, row_ok = torch.cat(selected), torch.cat(valid)
        if p.head_bn_rows == "all_agreed":
            z_v, z_a = self.net.embed_v(rows_v, agree, idx), self.net.embed_a(rows_a, agree, idx)
        else:
            z_v, z_a = self.net.embed_v(rows_v[idx], row_ok), self.net.embed_a(rows_a[idx], row_ok)
        bank = memory.reshape(-1, memory.shape[-1])
        column_ok = memory_ok.repeat_interleave(memory.shape[1])
        r_v = self._correlation(z_v, bank, column_ok)
        r_a = self._correlation(z_a, bank, column_ok)
        if p.occ_target_detach:
            r_a = r_a.detach()
        row_ok = row_ok & column_ok.any()
        cross_entropy = -(r_a * torch.log(r_v + 1e-8)).sum(1)
        rows = row_ok.sum()
        return torch.where(row_ok, cross_entropy, 0.0).sum() / rows.clamp_min(1), rows.detach()

    def _correlation(self, z: torch.Tensor, bank: torch.Tensor, column_ok: torch.Tensor) -> torch.Tensor:
        """softmax(z . bank^T / tau) over the available memory entries."""
        if self.params.occ_similarity == "cosine":
            z, bank = F.normalize(z, dim=1), F.normalize(bank, dim=1)
        # Unavailable entries get a huge negative bias (not -inf: a row with none available stays finite).
        bias = torch.where(column_ok, 0.0, torch.finfo(z.dtype).min / 2)
        return torch.addmm(bias, z, bank.T / self.params.occ_temperature).softmax(1)

    def _load_from_state_dict(self, state_dict: dict[str, Any], prefix: str, *args: Any, **kwargs: Any) -> None:
        # The bank is allocated lazily: take the saved shape before the copy (exact resume and evaluation).
        for name in ("memory_features", "memory_labels"):
            saved = state_dict.get(prefix + name)
            if saved is not None and saved.shape != getattr(self, name).shape:
                setattr(self, name, torch.empty_like(saved, device=getattr(self, name).device))
        super()._load_from_state_dict(state_dict, prefix, *args, **kwargs)
