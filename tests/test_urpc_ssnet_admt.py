"""URPC, SS-Net and AD-MT: every loss term against a direct transcription of its official definition, the
state a resume needs, a tiny CLI run on synthetic data and a few iterations on the real LA data."""

from __future__ import annotations

import copy
import json
import math
import os
from pathlib import Path

import pytest
import torch
import torch.nn.functional as F
from torch import nn

from semiseg.config import build_config
from semiseg.data.layouts.la import CASES_DIR
from semiseg.data.loader import Batch
from semiseg.engine.checkpoint import load_checkpoint
from semiseg.engine.trainer import Trainer, learning_rate
from semiseg.errors import ConfigError
from semiseg.methods import available_methods
from semiseg.methods.admt import ADMT, ADMTParams, brightness_contrast, clipped_noise, cutmix_box_masks, entropy_blend
from semiseg.methods.base import NetSpec, StepContext
from semiseg.methods.ssnet import SSNet, SSNetParams, masked_batch_norm, weighted_prototype_distance
from semiseg.methods.urpc import URPC, URPCParams
from semiseg.nets import count_parameters, evaluated_parameters
from semiseg.nets.urpc import PyramidVNet

NEW = ("urpc", "ssnet", "admt")
TINY = NetSpec(n_filters=4)


def _batch(n_lab: int = 2, n_unl: int = 2, size: int = 16, seed: int = 0) -> Batch:
    """Blobs with noise: a learnable task at a tiny size."""
    g = torch.Generator().manual_seed(seed)
    grid = torch.stack(torch.meshgrid(*[torch.arange(float(size))] * 3, indexing="ij"))
    centres = size / 3 + size / 3 * torch.rand(n_lab + n_unl, 3, 1, 1, 1, generator=g)
    labels = (((grid - centres) ** 2).sum(1) < (size / 4) ** 2).long()
    images = (labels.float() + 0.3 * torch.randn(labels.shape, generator=g)).unsqueeze(1)
    return Batch(images[:n_lab], labels[:n_lab], images[n_lab:], torch.arange(n_lab))


def _ramp(epoch: float, length: float) -> float:
    return math.exp(-5 * (1 - min(epoch, length) / length) ** 2)


def _ssl4mis_dice(p: torch.Tensor, labels: torch.Tensor) -> torch.Tensor:
    """SSL4MIS `DiceLoss(2)`: per class 1 - (2 sum(p g) + 1e-5) / (sum(p^2) + sum(g^2) + 1e-5), averaged."""
    return sum(1 - (2 * (p[:, c] * (labels == c)).sum() + 1e-5)
               / ((p[:, c] ** 2).sum() + (labels == c).float().sum() + 1e-5) for c in range(2)) / 2


# ---- registry, presets, parameter counts --------------------------------------------------------------------

def test_semiseg_methods_lists_them_with_parameter_counts_and_presets() -> None:
    from typer.testing import CliRunner

    from semiseg.cli import app

    result = CliRunner().invoke(app, ["methods"])
    assert result.exit_code == 0, result.output
    lines = {line.split()[0]: line for line in result.output.splitlines() if line and not line.startswith(" ")}
    assert "9,449,320 params (evaluated net 9,448,866)" in lines["urpc"]
    assert "9,457,318 params (evaluated net 9,448,866)" in lines["ssnet"]
    assert "9,448,866 params (evaluated net 9,448,866)" in lines["admt"]
    methods = available_methods()
    assert {"la-8", "la-16"} <= set(methods["urpc"].presets)
    assert {"la-4", "la-8", "la-16"} <= set(methods["ssnet"].presets) & set(methods["admt"].presets)


def test_recipes_follow_the_official_scripts() -> None:
    ss = build_config("ssnet", preset="la-8")
    assert (ss.labeled, ss.iterations, ss.batch_labeled, ss.batch_unlabeled) == (8, 15000, 2, 2)
    assert learning_rate(ss, 2500) == 0.01 and learning_rate(ss, 2501) == pytest.approx(1e-3)
    ad = build_config("admt", preset="la-4")
    assert (ad.labeled, ad.iterations, ad.lr_schedule) == (4, 15000, "poly")
    assert ad.method_params().consistency == 2.0 and ad.method_params().conf_threshold == 0.8
    ur = build_config("urpc", preset="la-16")
    assert (ur.labeled, ur.lr_schedule) == (16, "poly")
    with pytest.raises(ConfigError, match="3D"):
        URPC(URPCParams(), NetSpec(spatial_dims=2))
    with pytest.raises(ConfigError, match="binary 3D"):
        SSNet(SSNetParams(), NetSpec(num_classes=3))
    with pytest.raises(ConfigError, match="period"):
        ADMT(ADMTParams(period=0), TINY)


def test_ssnet_parameters_are_the_official_vnet_with_its_heads() -> None:
    ss = SSNet(SSNetParams(), NetSpec())
    assert count_parameters(ss) == 9_457_318  # SS-Net's VNet incl. projection, prediction and 4 selector heads
    assert evaluated_parameters(ss.inference_network()) == 9_448_866


# ---- URPC ---------------------------------------------------------------------------------------------------

def test_pyramid_vnet_levels_and_inference_output() -> None:
    net = PyramidVNet(n_filters=4)
    x = torch.randn(2, 1, 32, 32, 16)
    levels = net.forward_pyramid(x)
    assert len(levels) == 4 and all(level.shape == (2, 2, 32, 32, 16) for level in levels)
    net.eval()
    with torch.no_grad():
        assert torch.equal(net(x), net.forward_pyramid(x)[0])
    assert count_parameters(PyramidVNet()) == 9_448_866 + (128 + 64 + 32) * 2 + 3 * 2


class _FixedPyramid(nn.Module):
    """Stands in for the pyramid network: returns the same trainable logits for every call."""

    def __init__(self, logits: list[torch.Tensor]) -> None:
        super().__init__()
        self.levels = nn.ParameterList(nn.Parameter(t.clone()) for t in logits)

    def forward_pyramid(self, x: torch.Tensor) -> list[torch.Tensor]:
        return [level * 1 for level in self.levels]


@pytest.mark.parametrize("detach", [False, True])
def test_urpc_loss_and_gradients_equal_the_ssl4mis_reference(detach: bool) -> None:
    g = torch.Generator().manual_seed(3)
    logits = [torch.randn(4, 2, 6, 5, 4, generator=g) * 2 for _ in range(4)]
    batch = _batch(size=6)
    batch = Batch(batch.image_labeled[..., :5, :4], batch.label_labeled[..., :5, :4],
                  batch.image_unlabeled[..., :5, :4], batch.index_labeled)
    method = URPC(URPCParams(detach_mean=detach), TINY)
    method.net = _FixedPyramid(logits)
    ctx = StepContext(iteration=3001, total_iterations=15000)
    out = method.train_step(batch, ctx)
    out.loss.backward()

    leaves = [t.clone().requires_grad_(True) for t in logits]
    y, n = batch.label_labeled, 2
    soft = [t.softmax(1) for t in leaves]
    supervised = sum(F.cross_entropy(t[:n], y) + _ssl4mis_dice(s[:n], y) for t, s in zip(leaves, soft)) / 8
    preds = sum(soft) / 4
    if detach:
        preds = preds.detach()
    kl_distance = nn.KLDivLoss(reduction="none")
    consistency = 0
    for s in soft:
        variance = torch.sum(kl_distance(torch.log(s[n:]), preds[n:]), dim=1, keepdim=True)
        exp_variance = torch.exp(-variance)
        consistency = consistency + (torch.mean((preds[n:] - s[n:]) ** 2 * exp_variance)
                                     / (torch.mean(exp_variance) + 1e-8) + torch.mean(variance))
    weight = 0.1 * _ramp(3000 // 150, 100)
    reference = supervised + weight * consistency / 4
    reference.backward()
    assert out.loss.item() == pytest.approx(reference.item(), rel=1e-5)
    assert out.logs["loss/consistency"].item() == pytest.approx(consistency.item() / 4, rel=1e-5)
    for mine, ref in zip(method.net.levels, leaves):
        assert torch.allclose(mine.grad, ref.grad, atol=1e-7, rtol=1e-4)


# ---- SS-Net -------------------------------------------------------------------------------------------------

def test_masked_batch_norm_equals_batch_norm_on_the_masked_rows() -> None:
    g = torch.Generator().manual_seed(0)
    bn = nn.BatchNorm1d(5)
    with torch.no_grad():
        bn.weight.uniform_(0.5, 1.5, generator=g)
        bn.bias.uniform_(-1, 1, generator=g)
    reference = copy.deepcopy(bn)
    h = torch.randn(40, 5, generator=g) * 3 + 1
    mask = torch.rand(40, generator=g) < 0.4
    out = masked_batch_norm(bn, h, mask, torch.tensor(True))
    expected = reference(h[mask])
    assert torch.allclose(out[mask], expected, atol=1e-5)
    for name in ("running_mean", "running_var", "num_batches_tracked"):
        assert torch.allclose(getattr(bn, name).float(), getattr(reference, name).float(), atol=1e-6), name
    before = copy.deepcopy(bn.state_dict())
    masked_batch_norm(bn, h, mask, torch.tensor(False))
    assert all(torch.equal(v, bn.state_dict()[k]) for k, v in before.items())
    bn.eval()
    reference.eval()
    assert torch.allclose(masked_batch_norm(bn, h, mask, torch.tensor(True)), reference(h), atol=1e-6)


def _official_class_loss(selector: nn.Module, selector_memory: nn.Module, features_c: torch.Tensor,
                         memory_c: torch.Tensor) -> torch.Tensor:
    """`contrastive_class_to_class_learned_memory` for one class, transcribed (M x N distance matrix)."""
    memory_c = F.normalize(memory_c, dim=1)
    features_c_norm = F.normalize(features_c, dim=1)
    distances = 1 - torch.mm(features_c_norm, memory_c.transpose(1, 0))
    w = torch.sigmoid(selector(features_c.detach()))
    w = (w.shape[0] / w.sum(dim=0)) * w
    distances = distances * w.repeat(1, distances.shape[1])
    v = torch.sigmoid(selector_memory(memory_c)).permute(1, 0)
    v = (v.shape[0] / v.sum(dim=0)) * v
    distances = distances * v.repeat(distances.shape[0], 1)
    return distances.mean()


@pytest.mark.parametrize("attention", [False, True])
def test_weighted_prototype_distance_equals_the_distance_matrix(attention: bool) -> None:
    g = torch.Generator().manual_seed(1)
    features = torch.randn(30, 8, generator=g)
    mask = torch.rand(30, generator=g) < 0.5
    memory = F.normalize(torch.randn(6, 8, generator=g), dim=1)
    memory_mask = torch.arange(6) < 4
    w, v = torch.rand(30, generator=g) + 0.1, torch.rand(6, generator=g) + 0.1
    mine = weighted_prototype_distance(features, mask, w, memory, memory_mask, v, attention)
    f_hat = F.normalize(features[mask], dim=1)
    wm = w[mask] * mask.sum() / w[mask].sum()
    vm = v[:4] * 4 / v[:4].sum() if attention else torch.ones(4)
    direct = ((1 - f_hat @ memory[:4].T) * wm[:, None] * vm[None]).mean()
    assert mine.item() == pytest.approx(direct.item(), rel=1e-5)


def test_ssnet_prototype_loss_and_memory_equal_the_official_transcription() -> None:
    torch.manual_seed(0)
    method = SSNet(SSNetParams(memory_size=5), TINY)
    method.train()
    reference = copy.deepcopy(method)
    g = torch.Generator().manual_seed(2)
    features = torch.randn(60, 4, generator=g)
    labels = (torch.rand(60, generator=g) < 0.5).long()
    correct = torch.rand(60, generator=g) < 0.6
    method.update_memory(features, labels, correct & (labels == 1))

    # Official `add_features_from_sample_learned` on the foreground class (the only one stored).
    reference.projection_head.eval()
    with torch.no_grad():
        projected = reference.projection_head(features)
        keep = correct & (labels == 1)
        rank = torch.sigmoid(reference.feature_selectors[1](projected[keep]))
        order = torch.sort(rank[:, 0], dim=0).indices
        memory_fg = projected[keep][order][:5]
    reference.projection_head.train()
    assert method.memory_count.tolist() == [0, 5]
    assert torch.allclose(method.memory[1], memory_fg, atol=1e-6)
    assert torch.allclose(method.feature_selectors[1][1].running_mean, reference.feature_selectors[1][1].running_mean,
                          atol=1e-6)

    predicted = torch.randn(60, 32, generator=g, requires_grad=True)
    loss = method.prototype_loss(predicted, labels)
    loss.backward()
    predicted_ref = predicted.detach().clone().requires_grad_(True)
    expected = _official_class_loss(reference.feature_selectors[1], reference.memory_selectors[1],
                                    predicted_ref[labels == 1], memory_fg) / 2  # class 0 has no memory
    expected.backward()
    assert loss.item() == pytest.approx(expected.item(), rel=1e-5)
    assert torch.allclose(predicted.grad, predicted_ref.grad, atol=1e-7, rtol=1e-4)
    for mine, ref in zip(method.feature_selectors[1].parameters(), reference.feature_selectors[1].parameters()):
        assert torch.allclose(mine.grad, ref.grad, atol=1e-7, rtol=1e-4)


def test_ssnet_highest_selection_and_background_prototypes() -> None:
    torch.manual_seed(0)
    method = SSNet(SSNetParams(memory_size=3, memory_selection="highest", background_prototypes=True), TINY)
    g = torch.Generator().manual_seed(4)
    features = torch.randn(20, 4, generator=g)
    labels = (torch.arange(20) % 2).long()
    method.update_memory(features, labels, torch.ones(20, dtype=torch.bool))
    assert method.memory_count.tolist() == [3, 3]
    method.projection_head.eval()
    with torch.no_grad():
        projected = method.projection_head(features)
    rows = {tuple(r.tolist()) for r in method.memory[0]}
    assert rows <= {tuple(r.tolist()) for r in projected[labels == 0]}
    before = method.memory.clone()
    method.update_memory(features, labels, torch.zeros(20, dtype=torch.bool))  # nothing correct: memory kept
    assert torch.equal(method.memory, before) and method.memory_count.tolist() == [3, 3]


def _disable_tracking_bn_stats(model: nn.Module) -> None:
    for m in model.modules():
        if hasattr(m, "track_running_stats"):
            m.track_running_stats ^= True


def test_ssnet_vat_loss_equals_the_official_vat3d() -> None:
    torch.manual_seed(0)
    method = SSNet(SSNetParams(), TINY)
    method.train()
    net = copy.deepcopy(method.net)
    x = torch.randn(2, 1, 16, 16, 16)
    torch.manual_seed(7)
    mine = method.vat_loss(x)
    mine.backward()

    def dice(p: torch.Tensor, t: torch.Tensor) -> torch.Tensor:
        return 1 - (2 * torch.sum(p * t) + 1e-8) / (torch.sum(p) + torch.sum(t) + 1e-8)

    def l2(d: torch.Tensor) -> torch.Tensor:
        return d / (torch.norm(d.view(d.shape[0], -1, 1, 1, 1), dim=1, keepdim=True) + 1e-8)

    torch.manual_seed(7)
    with torch.no_grad():
        pred = F.softmax(net(x), dim=1)
    d = l2(torch.rand(x.shape).sub(0.5))
    _disable_tracking_bn_stats(net)
    d.requires_grad_(True)
    dice(F.softmax(net(x + 10.0 * d), dim=1), pred).backward()
    d = l2(d.grad)
    net.zero_grad()
    lds = dice(F.softmax(net(x + 10.0 * d), dim=1), pred)
    _disable_tracking_bn_stats(net)
    lds.backward()
    assert mine.item() == pytest.approx(lds.item(), rel=1e-5)
    for (name, a), b in zip(method.net.named_parameters(), net.parameters()):
        assert torch.allclose(a.grad, b.grad, atol=1e-6, rtol=1e-3), name
    for (name, a), b in zip(method.net.named_buffers(), net.buffers()):
        assert torch.equal(a, b), name  # only the clean forward moved the running statistics


def test_ssnet_total_loss_composition() -> None:
    torch.manual_seed(0)
    method = SSNet(SSNetParams(), TINY)
    method.train()
    out = method.train_step(_batch(), StepContext(iteration=900, total_iterations=15000))
    logs = out.logs
    weight = _ramp(900 // 150, 40)
    expected = logs["loss/dice"] + weight * (logs["loss/vat"] + 0.1 * (logs["loss/prototype_labeled"]
                                                                       + logs["loss/prototype_unlabeled"]))
    assert out.loss.item() == pytest.approx(expected.item(), rel=1e-6)
    assert logs["weight/consistency"].item() == pytest.approx(weight)


# ---- AD-MT --------------------------------------------------------------------------------------------------

def test_entropy_blend_equals_the_direct_formula() -> None:
    g = torch.Generator().manual_seed(0)
    p1 = torch.randn(2, 2, 4, 3, 2, generator=g).softmax(1)
    p2 = torch.randn(2, 2, 4, 3, 2, generator=g).softmax(1)
    for temperature in (1.0, 0.5):
        h1 = -(p1 * torch.log2(p1 + 1e-10)).sum(1)
        h2 = -(p2 * torch.log2(p2 + 1e-10)).sum(1)
        w1 = torch.exp(-h1) / (torch.exp(-h1) + torch.exp(-h2))
        q = (w1[:, None] * p1 + (1 - w1[:, None]) * p2) ** (1 / temperature)
        assert torch.allclose(entropy_blend(p1, p2, temperature), q / q.sum(1, keepdim=True), atol=1e-6)


def _official_compromise(target_tea: torch.Tensor, logits_tea: torch.Tensor, target_stu: torch.Tensor,
                         logits_stu: torch.Tensor, mode: str, teacher_conflict: torch.Tensor):  # noqa: ANN202
    """`get_compromise_pseudo_btw_tea_stu` (read in ZhenZHAO/AD-MT), written out with boolean indexing."""
    target, logits = target_tea.clone(), logits_tea.clone()
    conflict = (target_tea != target_stu) & teacher_conflict
    if mode == "pixel_confidence":
        select = (logits_stu > logits_tea) & conflict
    elif mode == "always_student":
        select = conflict
    else:
        select = torch.zeros_like(conflict)
    target[select] = target_stu[select]
    logits[select] = logits_stu[select]
    return target, logits


@pytest.mark.parametrize("mode", ["pixel_confidence", "always_student", "always_teacher"])
def test_admt_conflict_rule_equals_the_official_compromise(mode: str) -> None:
    g = torch.Generator().manual_seed(1)
    shape = (2, 5, 4, 3)
    label, student = (torch.rand(shape, generator=g) < 0.5).long(), (torch.rand(shape, generator=g) < 0.5).long()
    conf, student_conf = torch.rand(shape, generator=g), torch.rand(shape, generator=g)
    conflict = torch.rand(shape, generator=g) < 0.5
    method = ADMT(ADMTParams(conflict_mode=mode), TINY)
    mine = method.combine_with_student(label, conf, conflict, student, student_conf)
    ref = _official_compromise(label, conf, student, student_conf, mode, conflict)
    assert torch.equal(mine[0], ref[0]) and torch.equal(mine[1], ref[1])


@pytest.mark.parametrize("conflict_weight", [1.0, 0.5])
def test_admt_unlabeled_loss_equals_ignore_index_cross_entropy(conflict_weight: float) -> None:
    g = torch.Generator().manual_seed(2)
    logits = torch.randn(2, 2, 5, 4, 3, generator=g)
    label = (torch.rand(2, 5, 4, 3, generator=g) < 0.5).long()
    conf = torch.rand(2, 5, 4, 3, generator=g) * 0.5 + 0.5
    conflict = torch.rand(2, 5, 4, 3, generator=g) < 0.3
    method = ADMT(ADMTParams(conflict_weight=conflict_weight), TINY)
    mine = method.unlabeled_loss(logits, label, conf, conflict)
    target = label.clone()
    target[conf < 0.8] = -100
    if conflict_weight == 1.0:
        expected = F.cross_entropy(logits, target, ignore_index=-100)
    else:
        consist, clash = target.clone(), target.clone()
        consist[conflict] = -100
        clash[~conflict] = -100
        expected = (F.cross_entropy(logits, consist, ignore_index=-100)
                    + conflict_weight * F.cross_entropy(logits, clash, ignore_index=-100))
    assert mine.item() == pytest.approx(expected.item(), rel=1e-5)
    empty = method.unlabeled_loss(logits, label, torch.zeros_like(conf), conflict)
    assert empty.item() == 0.0  # no confident voxel: 0, where the official CE would be NaN


def test_admt_cutmix_boxes_follow_rand_bbox_3d() -> None:
    spatial = (16, 12, 8)
    torch.manual_seed(3)
    boxes = cutmix_box_masks(3, spatial, torch.device("cpu"))
    torch.manual_seed(3)
    lam = torch.distributions.Beta(torch.tensor(4.0), torch.tensor(4.0)).sample()
    expected = torch.zeros(3, *spatial, dtype=torch.bool)
    bounds = []
    for size in spatial:
        cut = int(size * math.sqrt(1 - float(lam)))
        centre = torch.randint(size // 8, size, (3,))
        bounds.append([(min(max(int(c) - cut // 2, 0), size), min(max(int(c) + cut // 2, 0), size)) for c in centre])
    for i in range(3):
        (x1, x2), (y1, y2), (z1, z2) = (b[i] for b in bounds)
        expected[i, x1:x2, y1:y2, z1:z2] = True
    assert torch.equal(boxes, expected)


def test_admt_strong_view_formulas() -> None:
    g = torch.Generator().manual_seed(4)
    x = torch.randn(3, 1, 6, 5, 4, generator=g)
    torch.manual_seed(5)
    out = brightness_contrast(x, 0.5, 0.5, 1.0)
    torch.manual_seed(5)
    alpha = 1 + (torch.rand(3, 1, 1, 1, 1) * 2 - 1) * 0.5
    beta = (torch.rand(3, 1, 1, 1, 1) * 2 - 1) * 0.5
    for i in range(3):
        low, high = x[i].min(), x[i].max()
        n = alpha[i] * (x[i] - low) / (high - low)
        expected = torch.clip(n + beta[i] * n.mean(), 0, 1) * (high - low) + low
        assert torch.allclose(out[i], expected, atol=1e-5)
    assert torch.equal(brightness_contrast(x, 0.5, 0.5, 0.0), x)
    torch.manual_seed(6)
    noisy = clipped_noise(x, (0.1, 1.0), 1.0)
    torch.manual_seed(6)
    s = torch.rand(3, 1, 1, 1, 1) * 0.9 + 0.1
    torch.rand(3, 1, 1, 1, 1)
    assert torch.allclose(noisy, x + torch.clamp(torch.randn_like(x) * s, -2 * s, 2 * s))


def test_admt_teachers_alternate_and_follow_the_official_ema() -> None:
    torch.manual_seed(0)
    method = ADMT(ADMTParams(period=3, random_period=False), TINY)
    assert [method.ema_alpha(it) for it in (1, 80, 81, 82, 83, 84)] == [0.0, 0.0, 0.0, 0.0, 0.5, 0.5]
    assert method.ema_alpha(100_000) == 0.99
    t1, t2 = (copy.deepcopy(t.state_dict()) for t in method.teachers)
    assert not torch.equal(t1["encoder.block_one.0.weight"], method.net.state_dict()["encoder.block_one.0.weight"])
    actives = []
    for it in range(1, 8):
        actives.append(method.first_active)
        method.after_step(StepContext(it, 100))
    assert actives == [True, True, True, False, False, False, True]
    # Warm-up: each teacher became a copy of the student, buffers (BatchNorm statistics) included.
    for teacher in method.teachers:
        for key, value in teacher.state_dict().items():
            if value.is_floating_point():
                assert torch.equal(value, method.net.state_dict()[key]), key
    state = method.state_dict()
    extra = state["_extra_state"]
    assert (extra["first_active"], extra["counter"], extra["stretch"]) == (True, 1, 3)
    fresh = ADMT(ADMTParams(period=3, random_period=False), TINY)
    fresh.load_state_dict(state)
    assert (fresh.first_active, fresh.counter, fresh.stretch) == (True, 1, 3)
    assert not any(p.requires_grad for p in method.teachers.parameters())
    assert count_parameters(method) == count_parameters(method.net)
    assert method.inference_network() is method.teachers[0]
    student_evaluated = ADMT(ADMTParams(evaluated_network="student"), TINY)
    assert student_evaluated.inference_network() is student_evaluated.net


def test_admt_student_views_per_stretch() -> None:
    torch.manual_seed(0)
    method = ADMT(ADMTParams(), TINY)
    method.train()
    batch = _batch()
    seen: list[torch.Tensor] = []
    method.net.register_forward_hook(lambda m, args, out: seen.append(args[0].detach()))
    method.first_active = True
    out = method.train_step(batch, StepContext(1, 10))
    weak = batch.image_unlabeled
    assert torch.equal(seen[-1][2:4], weak) and not torch.equal(seen[-1][4:], weak)  # colour / noise strong view
    assert out.logs["teacher/first_active"].item() == 1.0
    method.first_active = False
    method.train_step(batch, StepContext(2, 10))
    mixed = seen[-1][4:]
    from_self = (mixed == weak).all(1)
    from_other = (mixed == weak.flip(0)).all(1)
    assert bool((from_self | from_other).all())  # a CutMix of the weak view, nothing else
    logs = method.train_step(batch, StepContext(301, 10)).logs
    expected = logs["loss/supervised"] + 2.0 * _ramp(300 // 150, 40) * logs["loss/unlabeled"]
    assert method.train_step  # the step above ran with the teacher-2 stretch
    assert logs["weight/consistency"].item() == pytest.approx(2.0 * _ramp(2, 40))
    assert expected.item() > 0


# ---- training -----------------------------------------------------------------------------------------------

@pytest.mark.parametrize("name", NEW)
def test_a_few_synthetic_iterations_lower_the_loss(name: str) -> None:
    torch.manual_seed(0)
    cls = available_methods()[name]
    method = cls(cls.Params(), TINY)
    method.train()
    batch = _batch()
    optimizer = torch.optim.Adam(method.trainable_parameters(), lr=0.01)
    probe_ctx = StepContext(iteration=6, total_iterations=10)

    def probe() -> float:
        torch.manual_seed(123)
        state = copy.deepcopy(method.state_dict())
        with torch.no_grad():
            value = method.train_step(batch, probe_ctx).loss.item()
        method.load_state_dict(state)  # the probe must not move memories or BatchNorm statistics
        return value

    before = probe()
    for iteration in range(1, 11):
        ctx = StepContext(iteration=iteration, total_iterations=10)
        loss = method.train_step(batch, ctx).loss
        optimizer.zero_grad()
        loss.backward()
        optimizer.step()
        method.after_step(ctx)
    assert probe() < 0.95 * before


@pytest.mark.parametrize("name", NEW)
def test_tiny_synthetic_run_through_the_cli(name: str, tiny_synthetic: str, tmp_path: Path) -> None:
    from typer.testing import CliRunner

    from semiseg.cli import app

    run = tmp_path / name
    args = ["train", "--method", name, "--preset", "la-8", "--data", tiny_synthetic, "--labeled", "2",
            "--iterations", "2", "--out", str(run), "--quiet", "--set", "patch_size=32,32,16",
            "--set", "n_filters=4", "--set", "num_workers=0", "--set", "log_every=1", "--set", "device=cpu"]
    result = CliRunner().invoke(app, args)
    assert result.exit_code == 0, result.output
    records = [json.loads(line) for line in (run / "metrics.jsonl").read_text().splitlines()]
    assert [r["iteration"] for r in records if "loss" in r] == [1, 2]
    assert all(math.isfinite(r["loss"]) for r in records if "loss" in r)
    state = load_checkpoint(run / "checkpoint.pt")["method"]
    if name == "admt":
        assert any(k.startswith("teachers.1.") for k in state) and "_extra_state" in state
    if name == "ssnet":
        assert "memory" in state and int(state["memory_count"][1]) > 0


def test_admt_resume_is_exact(tiny_synthetic: str, tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    overrides = {"data": tiny_synthetic, "labeled": 2, "iterations": 4, "patch_size": (32, 32, 16), "n_filters": 4,
                 "num_workers": 0, "checkpoint_every": 2, "log_every": 1, "device": "cpu",
                 "period": 2}
    cfg = build_config("admt", overrides=overrides)
    Trainer(cfg, tmp_path / "ref", progress=False).run()

    original = ADMT.after_step

    def crash_at_3(self: ADMT, ctx: StepContext) -> None:
        if ctx.iteration == 3:
            raise KeyboardInterrupt
        original(self, ctx)

    monkeypatch.setattr(ADMT, "after_step", crash_at_3)
    with pytest.raises(KeyboardInterrupt):
        Trainer(cfg, tmp_path / "run", progress=False).run()
    monkeypatch.setattr(ADMT, "after_step", original)
    assert load_checkpoint(tmp_path / "run" / "checkpoint.pt")["iteration"] == 2
    Trainer(cfg, tmp_path / "run", resume=True, progress=False).run()
    a = load_checkpoint(tmp_path / "ref" / "checkpoint.pt")["method"]
    b = load_checkpoint(tmp_path / "run" / "checkpoint.pt")["method"]
    extra_a, extra_b = a.pop("_extra_state"), b.pop("_extra_state")
    assert torch.equal(extra_a.pop("rng"), extra_b.pop("rng")) and extra_a == extra_b
    for key, value in a.items():
        assert torch.equal(value, b[key]), key


@pytest.mark.parametrize("name", NEW)
def test_short_real_la_run_with_the_preset(name: str, la_root: Path, tmp_path: Path) -> None:
    """The la-8 recipe on a 4-case subset of LA (2 labelled, 1 unlabelled, 1 test), 2 iterations, then evaluate."""
    from semiseg.engine.evaluate import evaluate_checkpoint

    train_ids = (la_root / "train.list").read_text().split()[:3]
    test_id = (la_root / "test.list").read_text().split()[0]
    for case_id in [*train_ids, test_id]:
        (tmp_path / "LA" / CASES_DIR).mkdir(parents=True, exist_ok=True)
        os.symlink(la_root / CASES_DIR / case_id, tmp_path / "LA" / CASES_DIR / case_id)
    (tmp_path / "LA" / "train.list").write_text("\n".join(train_ids) + "\n")
    (tmp_path / "LA" / "test.list").write_text(test_id + "\n")
    overrides = {"data": str(tmp_path / "LA"), "labeled": 2, "iterations": 2, "patch_size": (32, 32, 32),
                 "stride": (32, 32, 32), "n_filters": 4, "num_workers": 0, "checkpoint_every": 2, "log_every": 1,
                 "device": "cpu"}
    cfg = build_config(name, overrides=overrides, preset="la-8")
    run = tmp_path / "run"
    Trainer(cfg, run, progress=False).run()
    summary = evaluate_checkpoint(run, run / "eval", device="cpu")
    assert len(summary["cases"]) == 1
    records = [json.loads(line) for line in (run / "metrics.jsonl").read_text().splitlines()]
    losses = [r["loss"] for r in records if "loss" in r]
    assert len(losses) == 2 and all(math.isfinite(v) for v in losses)


def test_admt_teachers_and_alternation_stay_identical_across_two_processes(tmp_path: Path, tiny_synthetic: str) -> None:
    """Each rank has its own seed (own dropout and boxes), but the alternation's generator is seeded before the
    ranks diverge: both update the same teacher, so the teachers stay identical."""
    import subprocess
    import sys

    out = tmp_path / "admt-ddp"
    sets = ["labeled=4", "iterations=4", "patch_size=32,32,16", "n_filters=4", "num_workers=0", "log_every=2",
            "checkpoint_every=4", "batch_labeled=1", "batch_unlabeled=1", "period=2"]
    subprocess.run([sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node", "2",
                    str(Path(__file__).with_name("ddp_probe.py")), str(out), "admt", tiny_synthetic, *sets],
                   check=True, env={**os.environ, "OMP_NUM_THREADS": "1"}, timeout=600)
    rank0, rank1 = (torch.load(out / f"state-rank{r}.pt", weights_only=True) for r in (0, 1))
    extra0, extra1 = rank0.pop("_extra_state"), rank1.pop("_extra_state")
    assert torch.equal(extra0.pop("rng"), extra1.pop("rng")) and extra0 == extra1
    learnt = [k for k in rank0 if k.endswith(("weight", "bias"))]
    assert any(k.startswith("teachers.1.") for k in learnt)
    for key in learnt:
        assert torch.equal(rank0[key], rank1[key]), key
