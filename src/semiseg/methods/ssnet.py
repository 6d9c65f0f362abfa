"""SS-Net, smoothness and class separation (Wu et al., MICCAI 2022) as ycwu1997/SS-Net trains LA: docs/methods/ssnet.md.

One VNet plus small MLP heads on its last decoder feature (x9, 16 channels). Smoothness: a virtual adversarial
perturbation of the whole batch (one power iteration, radius `vat_epsilon`) must not change the prediction
(foreground-pooled Dice between the two softmax maps). Class separation: every step the labelled voxels the
network already segments correctly as foreground are projected and ranked by a learned selector; 32 of them
become the prototype memory, and the projected-and-predicted features of every labelled (true class) and
unlabelled (pseudo class) voxel are pulled towards that memory by a cosine distance whose two sides are
re-weighted by learned attention weights (SemiSeg-Contrastive's class-to-class loss).
"""

from __future__ import annotations

from collections.abc import Iterator
from contextlib import contextmanager
from typing import Literal

import torch
import torch.nn.functional as F
from torch import nn

from ..data.loader import Batch
from ..engine.losses import binary_dice_loss
from ..engine.reductions import class_argmax
from ..engine.schedules import sigmoid_rampup
from ..errors import ConfigError
from ..nets import VNet
from . import register
from .base import Method, MethodParams, NetSpec, StepContext, StepOutput

FEATURE_DIM = 32  # the official heads' width


class SSNetParams(MethodParams):
    consistency: float = 1.0
    """Maximum weight of (L_vat + 0.1 (L_proto_l + L_proto_u))."""
    consistency_rampup: float = 40.0
    """Sigmoid ramp-up length of the consistency weight, in epochs of `epoch_iterations`."""
    epoch_iterations: int = 150
    """Iterations per ramp-up "epoch" (150 in the papers' loops; benchmarks rescale it with the budget)."""
    vat_xi: float = 10.0
    """Step of the power iteration that finds the adversarial direction."""
    vat_epsilon: float = 10.0
    """Radius of the adversarial perturbation (the official `--magnitude`)."""
    prototype_weight: float = 0.1
    """Weight of the prototype-alignment terms inside the consistency (the official 0.1)."""
    memory_size: int = 32
    """Features kept per class in the prototype memory (`elements_per_class`)."""
    memory_selection: Literal["lowest", "highest"] = "lowest"
    """Official quirk: `torch.sort` ascends, so the memory keeps the 32 features the selector ranks *lowest*
    (the code's comment says highest); `highest` keeps the top-ranked ones."""
    background_prototypes: bool = False
    """Official quirk: only correctly predicted *foreground* voxels enter the memory, so the background term of
    the loss never runs (it is still divided by the class count); True stores correct background voxels too."""
    memory_attention: bool = False
    """Official quirk: the memory-side weights are rescaled by a [1, N] tensor's `shape[0]` (1) over their own
    values, so every memory weight is exactly v / v = 1 and the memory selector only moves its BatchNorm
    statistics; True rescales them to mean 1 like the feature side."""
    ramp_from_zero: bool = False
    """The official ramp is evaluated after `iter_num` is incremented (1-based)."""


def masked_batch_norm(bn: nn.BatchNorm1d, h: torch.Tensor, mask: torch.Tensor, update: torch.Tensor) -> torch.Tensor:
    """`bn(h[mask])` written over all rows [N, D] (rows outside `mask` come out unused), without a host sync.

    Train mode normalises with the biased statistics of the masked rows and, where the bool scalar `update`
    holds, moves the running statistics as `nn.BatchNorm1d` does (unbiased variance, `bn.momentum`); eval
    mode is the plain running-statistics transform."""
    if not bn.training:
        return bn(h)
    m = mask.to(h.dtype).unsqueeze(1)
    n = m.sum()
    mean = (h * m).sum(0) / n.clamp_min(1)
    var = ((h - mean) ** 2 * m).sum(0) / n.clamp_min(1)
    out = (h - mean) / torch.sqrt(var + bn.eps)
    if bn.affine:
        out = out * bn.weight + bn.bias
    if bn.track_running_stats and bn.running_mean is not None and bn.running_var is not None:
        with torch.no_grad():
            momentum = bn.momentum if bn.momentum is not None else 0.1
            unbiased = var.detach().float() * n / (n - 1).clamp_min(1)
            new_mean = (1 - momentum) * bn.running_mean + momentum * mean.detach().float()
            new_var = (1 - momentum) * bn.running_var + momentum * unbiased
            bn.running_mean.copy_(torch.where(update, new_mean, bn.running_mean))
            bn.running_var.copy_(torch.where(update, new_var, bn.running_var))
            if bn.num_batches_tracked is not None:
                bn.num_batches_tracked.add_(update.long())
    return out


def mlp_head(in_dim: int, out_dim: int, leaky: bool = False) -> nn.Sequential:
    """Linear -> BatchNorm1d -> (Leaky)ReLU -> Linear, the official head layout."""
    act: nn.Module = nn.LeakyReLU(0.2) if leaky else nn.ReLU()
    return nn.Sequential(nn.Linear(in_dim, FEATURE_DIM), nn.BatchNorm1d(FEATURE_DIM), act,
                         nn.Linear(FEATURE_DIM, out_dim))


def masked_head(head: nn.Sequential, x: torch.Tensor, mask: torch.Tensor, update: torch.Tensor) -> torch.Tensor:
    """`head(x[mask])` over all rows, its BatchNorm restricted to the masked rows (see `masked_batch_norm`)."""
    h = masked_batch_norm(head[1], head[0](x), mask, update)
    return head[3](head[2](h))


def l2_normalise_per_sample(d: torch.Tensor) -> torch.Tensor:
    """d / (||d_i||_2 + 1e-8) for each sample i (VAT's `_l2_normalize`)."""
    return d / (d.flatten(1).norm(dim=1).view(-1, *([1] * (d.ndim - 1))) + 1e-8)


@contextmanager
def frozen_bn_statistics(net: nn.Module) -> Iterator[None]:
    """BatchNorm layers normalise with batch statistics but leave their running statistics alone."""
    norms = [m for m in net.modules() if isinstance(m, nn.modules.batchnorm._BatchNorm) and m.track_running_stats]
    for m in norms:
        m.track_running_stats = False
    try:
        yield
    finally:
        for m in norms:
            m.track_running_stats = True


def weighted_prototype_distance(features: torch.Tensor, feature_mask: torch.Tensor, feature_weights: torch.Tensor,
                                memory: torch.Tensor, memory_mask: torch.Tensor, memory_weights: torch.Tensor,
                                memory_attention: bool = False) -> torch.Tensor:
    """mean over masked (i, j) of (1 - cos(f_i, m_j)) w_i v_j, w rescaled to mean 1 over the masked features, v
    likewise (`memory_attention`) or, as the official code does, divided by itself (v_j = 1).

    `memory` rows are already unit vectors. Equal to the official M x N distance matrix without building it:
    with sum(w) = M and sum(v) = N the mean is 1 - (sum_i w_i f_i / |f_i| / M) . (sum_j v_j m_j / N)."""
    fm, mm = feature_mask.to(features.dtype), memory_mask.to(memory.dtype)
    n_f, n_m = fm.sum().clamp_min(1), mm.sum().clamp_min(1)
    w = feature_weights * fm
    w = w * n_f / w.sum().clamp_min(1e-12)
    if memory_attention:
        v = memory_weights * mm
        v = v * n_m / v.sum().clamp_min(1e-12)
    else:
        v = (1 / memory_weights) * memory_weights * mm
    a = (w.unsqueeze(1) * F.normalize(features, dim=1)).sum(0) / n_f
    b = (v.unsqueeze(1) * memory).sum(0) / n_m
    return 1 - (a * b).sum()


@register
class SSNet(Method):
    name = "ssnet"
    description = "SS-Net: VAT smoothness + class separation towards a learned foreground prototype memory"
    Params = SSNetParams
    recipe = {"iterations": 15000, "lr_schedule": "step", "lr_step": 2500, "lr_gamma": 0.1, "post_lcc": True}
    presets = {"la-4": {"labeled": 4}, "la-8": {"labeled": 8}, "la-16": {"labeled": 16}}

    def __init__(self, params: SSNetParams, spec: NetSpec) -> None:
        super().__init__(params, spec)
        self.params: SSNetParams = params
        if spec.spatial_dims != 3 or spec.num_classes != 2:
            raise ConfigError(f"ssnet implements the binary 3D (LA) recipe; the data is {spec.spatial_dims}D with "
                              f"{spec.num_classes} classes")
        c = spec.num_classes
        self.net = VNet(spec.in_channels, c, spec.n_filters, spec.norm, spec.dropout)
        self.projection_head = mlp_head(spec.n_filters, FEATURE_DIM)
        self.prediction_head = mlp_head(FEATURE_DIM, FEATURE_DIM)
        self.feature_selectors = nn.ModuleList(mlp_head(FEATURE_DIM, 1, leaky=True) for _ in range(c))
        self.memory_selectors = nn.ModuleList(mlp_head(FEATURE_DIM, 1, leaky=True) for _ in range(c))
        # Prototype memory: a slot per class, its first memory_count[c] rows valid (the official list of arrays).
        self.register_buffer("memory", torch.zeros(c, params.memory_size, FEATURE_DIM))
        self.register_buffer("memory_count", torch.zeros(c, dtype=torch.int64))

    def vat_loss(self, x: torch.Tensor) -> torch.Tensor:
        """Dice(softmax(f(x + eps d_adv)), softmax(f(x))) with d_adv from one power iteration (VAT3d)."""
        p = self.params
        with torch.no_grad():
            target = self.net(x).softmax(1)
        d = l2_normalise_per_sample(torch.rand_like(x) - 0.5)
        with frozen_bn_statistics(self.net), torch.enable_grad():  # the direction needs a gradient even in a probe
            d.requires_grad_(True)
            distance = binary_dice_loss(self.net(x + p.vat_xi * d).softmax(1), target)
            (grad,) = torch.autograd.grad(distance, d)
            d = l2_normalise_per_sample(grad.detach())
            return binary_dice_loss(self.net(x + p.vat_epsilon * d).softmax(1), target)

    def prototype_classes(self) -> range:
        """The classes whose memory can fill: without `background_prototypes` only correct foreground voxels
        enter it, so the background's memory, selectors and loss term are never used, as in the official code,
        where those selectors get no gradient and SGD leaves them alone (no weight decay, no momentum)."""
        return range(0 if self.params.background_prototypes else 1, self.spec.num_classes)

    @torch.no_grad()
    def update_memory(self, features: torch.Tensor, labels: torch.Tensor, correct: torch.Tensor) -> None:
        """Replace each class's memory with up to `memory_size` projected features of correctly predicted voxels
        (ranked by the class's feature selector when there are more); classes with none keep their memory."""
        p = self.params
        was_training = self.projection_head.training
        self.projection_head.eval()
        projected = self.projection_head(features)
        self.projection_head.train(was_training)
        k = min(p.memory_size, len(projected))
        for c in self.prototype_classes():
            selector = self.feature_selectors[c]
            mask = correct & (labels == c)
            count = mask.sum()
            score = torch.sigmoid(masked_head(selector, projected, mask, count > p.memory_size))[:, 0]
            key = score if p.memory_selection == "lowest" else -score
            index = torch.where(mask, key, torch.full_like(key, float("inf"))).topk(k, largest=False).indices
            chosen = torch.zeros_like(self.memory[c])
            chosen[:k] = projected[index].to(chosen.dtype)
            has_any = count > 0
            self.memory[c].copy_(torch.where(has_any, chosen, self.memory[c]))
            self.memory_count[c].copy_(torch.where(has_any, count.clamp(max=p.memory_size), self.memory_count[c]))

    def prototype_loss(self, predicted: torch.Tensor, labels: torch.Tensor) -> torch.Tensor:
        """(1/C) sum_c of the weighted cosine distance between class-c features and the class-c memory, for the
        classes with more than one feature and more than one memory row."""
        total = predicted.new_zeros(())
        slots = torch.arange(self.params.memory_size, device=predicted.device)
        for c in self.prototype_classes():
            mask = labels == c
            count, memory_count = mask.sum(), self.memory_count[c]
            run = (count > 1) & (memory_count > 1)
            memory_mask = slots < memory_count
            memory = F.normalize(self.memory[c].to(predicted.dtype), dim=1)
            w = torch.sigmoid(masked_head(self.feature_selectors[c], predicted.detach(), mask, run))[:, 0]
            v = torch.sigmoid(masked_head(self.memory_selectors[c], memory, memory_mask, run))[:, 0]
            term = weighted_prototype_distance(predicted, mask, w, memory, memory_mask, v, self.params.memory_attention)
            total = total + torch.where(run, term, torch.zeros_like(term))
        return total / self.spec.num_classes

    def train_step(self, batch: Batch, ctx: StepContext) -> StepOutput:
        p, n_lab = self.params, batch.n_labeled
        logits, embedding = self.net.forward_with_features(batch.images)
        probs = logits.softmax(1)
        labels = batch.label_labeled
        prediction = class_argmax(probs)
        correct = prediction[:n_lab] == labels
        if not p.background_prototypes:
            correct = correct & (prediction[:n_lab] > 0)
        features = embedding.movedim(1, -1).reshape(len(embedding), -1, embedding.shape[1])
        labeled_features = features[:n_lab].reshape(-1, features.shape[-1])
        self.update_memory(labeled_features, labels.reshape(-1), correct.reshape(-1))
        proto_l = self.prototype_loss(self.prediction_head(self.projection_head(labeled_features)), labels.reshape(-1))
        if len(batch.image_unlabeled):
            unlabeled_features = features[n_lab:].reshape(-1, features.shape[-1])
            predicted_u = self.prediction_head(self.projection_head(unlabeled_features))
            proto_u = self.prototype_loss(predicted_u, prediction[n_lab:].reshape(-1))
        else:
            proto_u = proto_l.new_zeros(())
        dice = binary_dice_loss(probs[:n_lab, 1], labels == 1)
        vat = self.vat_loss(batch.images)
        ramp_at = ctx.iteration - 1 if p.ramp_from_zero else ctx.iteration
        weight = p.consistency * sigmoid_rampup(ramp_at, p.consistency_rampup, p.epoch_iterations)
        loss = dice + weight * (vat + p.prototype_weight * (proto_l + proto_u))
        return StepOutput(loss, {"loss/dice": dice.detach(), "loss/vat": vat.detach(),
                                 "loss/prototype_labeled": proto_l.detach(),
                                 "loss/prototype_unlabeled": proto_u.detach(),
                                 "memory/foreground_rows": self.memory_count[-1].float(),
                                 "weight/consistency": torch.tensor(weight)})

    def compiled_networks(self) -> list[nn.Module]:
        return [self.net]

    def inference_network(self) -> nn.Module:
        return self.net

    def evaluated_output(self) -> str:
        return "the VNet (the projection, prediction and selector heads are training-only)"
