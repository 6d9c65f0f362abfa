"""Baselines (Mean Teacher, UA-MT, MC-Net / MC-Net+, BCP) and the shared EMA teacher.

Loss tests swap the networks for tiny hand-set modules and recompute every loss from its written-out
definition, so each assertion checks the method's arithmetic, not that it runs.
"""

from __future__ import annotations

import json
import math
import os
from pathlib import Path

import numpy as np
import pytest
import torch
from torch import nn

from semiseg.config import build_config
from semiseg.data.layouts.la import CASES_DIR
from semiseg.data.loader import Batch
from semiseg.engine.ema import EMATeacher
from semiseg.engine.postprocess import largest_connected_component
from semiseg.engine.trainer import Trainer, learning_rate
from semiseg.errors import ConfigError
from semiseg.methods import available_methods
from semiseg.methods.base import NetSpec, StepContext
from semiseg.methods.bcp import BCP, BCPParams, box_mask, largest_component, region_dice_ce
from semiseg.methods.mcnet import MCNet, MCNetParams, MCNetPlus
from semiseg.methods.mean_teacher import MeanTeacher, MeanTeacherParams
from semiseg.methods.uamt import UAMT, UAMTParams
from semiseg.nets import count_parameters

BASELINES = ("mean_teacher", "uamt", "mcnet", "mcnet_plus", "bcp")
TINY = NetSpec(n_filters=4)


def _pointwise(w0: float, b0: float, w1: float, b1: float) -> nn.Conv3d:
    """logits = (w0 x + b0, w1 x + b1): a hand-set network with no randomness and no batch coupling."""
    conv = nn.Conv3d(1, 2, 1)
    with torch.no_grad():
        conv.weight.copy_(torch.tensor([w0, w1]).view(2, 1, 1, 1, 1))
        conv.bias.copy_(torch.tensor([b0, b1]))
    return conv


def _batch(n_lab: int = 2, n_unl: int = 2, shape: tuple[int, ...] = (6, 5, 4), seed: int = 0) -> Batch:
    g = torch.Generator().manual_seed(seed)
    x_l = torch.randn(n_lab, 1, *shape, generator=g) * 2
    y_l = (x_l[:, 0] + 0.5 * torch.randn(n_lab, *shape, generator=g) > 0).long()
    x_u = torch.randn(n_unl, 1, *shape, generator=g) * 2
    return Batch(x_l, y_l, x_u, torch.arange(n_lab))


def _ramp(epoch: float, length: float) -> float:
    return math.exp(-5 * (1 - min(epoch, length) / length) ** 2)


def _ssl4mis_supervised(logits: torch.Tensor, labels: torch.Tensor) -> torch.Tensor:
    """0.5 (CE + two-class Dice with squared denominators, smooth 1e-5), written out."""
    p = logits.softmax(1)
    ce = -p.log().gather(1, labels.unsqueeze(1)).mean()
    dice = sum(1 - (2 * (p[:, c] * (labels == c)).sum() + 1e-5)
               / ((p[:, c] ** 2).sum() + (labels == c).float().sum() + 1e-5) for c in range(2)) / 2
    return 0.5 * (ce + dice)


def _noise(like: torch.Tensor) -> torch.Tensor:
    return torch.clamp(torch.randn_like(like) * 0.1, -0.2, 0.2)


# ---- registry, presets, parameter counts --------------------------------------------------------------------

def test_semiseg_methods_lists_every_baseline_with_la_presets() -> None:
    from typer.testing import CliRunner

    from semiseg.cli import app

    result = CliRunner().invoke(app, ["methods"])
    assert result.exit_code == 0, result.output
    methods = available_methods()
    for name in BASELINES:
        assert name in result.output
        assert {"la-8", "la-16"} <= set(methods[name].presets)
    assert "la-4" in methods["bcp"].presets


def test_network_parameter_counts_match_the_official_modules() -> None:
    spec = NetSpec()
    assert count_parameters(MCNet(MCNetParams(), spec)) == 12_347_716  # MCNet3d_v1
    assert count_parameters(MCNetPlus(MCNetParams(), spec)) == 15_246_566  # MCNet3d_v2
    for cls, params in ((MeanTeacher, MeanTeacherParams()), (UAMT, UAMTParams())):
        method = cls(params, spec)
        assert count_parameters(method) == 9_448_866  # the student only: the teacher is frozen
        assert sum(p.numel() for p in method.teacher.parameters()) == 9_448_866
        assert not any(p.requires_grad for p in method.teacher.parameters())
        assert any(k.startswith("teacher.net.") for k in method.state_dict())


def test_bcp_network_is_the_official_one_minus_its_unused_contrastive_heads() -> None:
    bcp = BCP(BCPParams(), NetSpec())
    assert count_parameters(bcp) == 9_448_866

    def head(out: int) -> int:  # SS-Net heads that BCP's VNet builds and its LA script never calls
        return count_parameters(nn.Sequential(nn.Linear(32, 32), nn.BatchNorm1d(32), nn.Linear(32, out)))

    projection = count_parameters(nn.Sequential(nn.Linear(16, 32), nn.BatchNorm1d(32), nn.Linear(32, 32)))
    unused = projection + head(32) + 4 * head(1)
    assert unused == 8_452
    assert count_parameters(bcp.inference_network()) + unused == 9_457_318


def test_step_schedules_of_the_la_recipes() -> None:
    bcp = build_config("bcp", preset="la-8")
    assert (bcp.batch_labeled, bcp.batch_unlabeled, bcp.iterations, bcp.post_lcc) == (4, 4, 17000, True)
    assert [learning_rate(bcp, it) for it in (1, 2000, 4500)] == [0.01] * 3  # pre-training, then 2,500 updates
    assert learning_rate(bcp, 4501) == pytest.approx(1e-3) and learning_rate(bcp, 7001) == pytest.approx(1e-4)
    uamt = build_config("uamt", preset="la-16")
    assert (uamt.labeled, uamt.iterations) == (16, 6000)
    assert learning_rate(uamt, 2500) == 0.01 and learning_rate(uamt, 2501) == pytest.approx(1e-3)
    mc = build_config("mcnet_plus", preset="la-8")
    assert (mc.iterations, mc.lr_schedule, mc.batch_labeled, mc.batch_unlabeled) == (15000, "constant", 2, 2)


# ---- the EMA teacher ----------------------------------------------------------------------------------------

def test_ema_update_arithmetic_and_buffers() -> None:
    student = nn.Sequential(nn.Linear(3, 2), nn.BatchNorm1d(2))
    teacher = EMATeacher(student, decay=0.99)
    assert not any(p.requires_grad for p in teacher.parameters())
    with torch.no_grad():
        for p in student.parameters():
            p.fill_(2.0)
        student[1].running_mean.fill_(5.0)
    teacher.update(student, iteration=1)  # alpha = min(1 - 1/1, 0.99) = 0: a copy
    assert all(torch.equal(t, s) for t, s in zip(teacher.parameters(), student.parameters(), strict=True))
    assert torch.equal(teacher.net[1].running_mean, torch.zeros(2))  # buffers are never averaged
    with torch.no_grad():
        for p in student.parameters():
            p.fill_(6.0)
    teacher.update(student, iteration=4)  # alpha = min(0.75, 0.99)
    assert all(torch.allclose(t, torch.full_like(t, 0.75 * 2 + 0.25 * 6)) for t in teacher.parameters())
    teacher.update(student, iteration=10_000)  # alpha = 0.99
    assert all(torch.allclose(t, torch.full_like(t, 0.99 * 3 + 0.01 * 6)) for t in teacher.parameters())
    teacher.copy_from(student)
    assert torch.equal(teacher.net[1].running_mean, student[1].running_mean)
    assert teacher.net[0].weight.requires_grad is False
    constant = EMATeacher(student, decay=0.99, warmup=False)  # BCP: 0.99 from the first update
    with torch.no_grad():
        for p in student.parameters():
            p.fill_(1.0)
    constant.update(student, iteration=1)
    assert constant.alpha(1) == 0.99
    assert all(torch.allclose(t, torch.full_like(t, 0.99 * 6 + 0.01 * 1)) for t in constant.parameters())


@pytest.mark.parametrize("cls", [MeanTeacher, UAMT, BCP])
def test_the_student_is_the_evaluated_network(cls: type) -> None:
    method = cls(cls.Params(), TINY)
    assert method.inference_network() is method.net and method.net is not method.teacher.net


def test_methods_update_the_teacher_after_each_step() -> None:
    method = MeanTeacher(MeanTeacherParams(ema_decay=0.9), TINY)
    method.net, method.teacher = _pointwise(1.0, 0.0, 3.0, 1.0), EMATeacher(_pointwise(0.0, 0.0, 0.0, 0.0), 0.9)
    method.after_step(StepContext(iteration=50, total_iterations=100))
    assert torch.allclose(method.teacher.net.weight.flatten(), torch.tensor([0.1, 0.3]))
    assert method.trainable_parameters() == list(method.net.parameters())


# ---- Mean Teacher and UA-MT ---------------------------------------------------------------------------------

def test_mean_teacher_loss_equals_the_reference() -> None:
    method = MeanTeacher(MeanTeacherParams(), TINY)
    method.net = _pointwise(1.0, 0.2, -0.5, 0.1)
    method.teacher = EMATeacher(_pointwise(0.3, 0.0, 1.5, -0.2))
    batch = _batch()
    ctx = StepContext(iteration=451, total_iterations=6000)
    torch.manual_seed(7)
    out = method.train_step(batch, ctx)

    torch.manual_seed(7)
    noise = _noise(batch.image_unlabeled)
    logits = method.net(batch.images)
    supervised = _ssl4mis_supervised(logits[:2], batch.label_labeled)
    target = method.teacher.net(batch.image_unlabeled + noise).softmax(1)
    consistency = ((logits[2:].softmax(1) - target) ** 2).mean()
    weight = 0.1 * _ramp(450 // 150, 40)  # SSL4MIS ramps at the 0-based iteration
    assert out.loss.item() == pytest.approx((supervised + weight * consistency).item(), rel=1e-6)
    assert out.logs["loss/consistency"].item() == pytest.approx(consistency.item(), rel=1e-6)


def test_uamt_loss_masks_uncertain_voxels_like_the_reference() -> None:
    method = UAMT(UAMTParams(single_pass=False), TINY)  # one call per pass as SSL4MIS; batched: test_cpu_speed.py
    method.net = _pointwise(1.0, 0.0, -1.0, 0.0)
    method.teacher = EMATeacher(_pointwise(0.0, 0.0, 1.5, 0.0))
    batch = _batch(seed=3)
    ctx = StepContext(iteration=3001, total_iterations=6000)
    calls: list[int] = []
    method.teacher.net.register_forward_hook(lambda _m, args, _o: calls.append(len(args[0])))
    torch.manual_seed(11)
    out = method.train_step(batch, ctx)
    assert calls == [2, 4, 4, 4, 4]  # the target pass, then T/2 = 4 passes of the unlabelled pair repeated twice

    torch.manual_seed(11)
    x_u = batch.image_unlabeled
    teacher = method.teacher.net
    target = teacher(x_u + _noise(x_u)).softmax(1)
    repeated = x_u.repeat(2, 1, 1, 1, 1)
    preds = torch.cat([teacher(repeated + _noise(repeated)) for _ in range(4)]).softmax(1)
    mean = preds.reshape(8, 2, *preds.shape[1:]).mean(0)  # SSL4MIS: preds.reshape(T, stride, ...)
    entropy = -(mean * torch.log(mean + 1e-6)).sum(1, keepdim=True)
    threshold = (0.75 + 0.25 * _ramp(3000, 6000)) * math.log(2)
    mask = (entropy < threshold).float()
    logits = method.net(batch.images)
    consistency = (mask * (logits[2:].softmax(1) - target) ** 2).sum() / (2 * mask.sum() + 1e-16)
    expected = _ssl4mis_supervised(logits[:2], batch.label_labeled) + 0.1 * _ramp(3000 // 150, 40) * consistency
    assert 0.05 < mask.mean().item() < 0.95  # both sides of the threshold are exercised
    assert out.logs["uncertainty/threshold"].item() == pytest.approx(threshold)
    assert out.loss.item() == pytest.approx(expected.item(), rel=1e-6)


def test_uamt_mc_batch_repeat_must_divide_the_samples() -> None:
    with pytest.raises(ValueError, match="multiple of mc_batch_repeat"):
        UAMTParams(mc_samples=8, mc_batch_repeat=3)


# ---- MC-Net / MC-Net+ ---------------------------------------------------------------------------------------

class _FixedDecoders(nn.Module):
    """`forward_all` returns fixed logits (leaf parameters, so gradients can be inspected)."""

    def __init__(self, logits: list[torch.Tensor]) -> None:
        super().__init__()
        self.logits = nn.ParameterList(nn.Parameter(t.clone()) for t in logits)

    def forward_all(self, _x: torch.Tensor) -> list[tuple[torch.Tensor, None]]:
        return [(t, None) for t in self.logits]


def _mcnet_reference(logits: list[torch.Tensor], labels: torch.Tensor, weight: float,
                     detach: bool) -> torch.Tensor:
    probs = [t.softmax(1) for t in logits]
    dice = sum(1 - (2 * (p[:2, 1] * labels).sum() + 1e-8) / (p[:2, 1].sum() + labels.sum() + 1e-8) for p in probs)
    sharp = [p**10 / (p**10 + (1 - p) ** 10) for p in probs]
    if detach:
        sharp = [s.detach() for s in sharp]
    consistency = sum(((probs[i] - sharp[j]) ** 2).mean()
                      for i in range(len(probs)) for j in range(len(probs)) if i != j)
    return 0.5 * dice + weight * consistency


@pytest.mark.parametrize(("cls", "decoders", "detach"), [(MCNet, 2, False), (MCNetPlus, 3, False),
                                                          (MCNet, 2, True)])
def test_mcnet_loss_and_gradients_equal_the_reference(cls: type[MCNet], decoders: int, detach: bool) -> None:
    g = torch.Generator().manual_seed(decoders)
    logits = [torch.randn(4, 2, 5, 4, 3, generator=g) * 2 for _ in range(decoders)]
    batch = _batch(shape=(5, 4, 3))
    method = cls(MCNetParams(detach_targets=detach), TINY)
    method.net = _FixedDecoders(logits)
    out = method.train_step(batch, StepContext(iteration=1350, total_iterations=15000))
    out.loss.backward()

    leaves = [t.clone().requires_grad_() for t in logits]
    expected = _mcnet_reference(leaves, batch.label_labeled, _ramp(1350 // 150, 40), detach)
    expected.backward()
    assert out.loss.item() == pytest.approx(expected.item(), rel=1e-6)
    for got, want in zip(method.net.logits, leaves, strict=True):
        assert torch.allclose(got.grad, want.grad, rtol=1e-5, atol=1e-8)
    if not detach:  # the official targets carry gradient: detaching them would change it
        other = [t.clone().requires_grad_() for t in logits]
        _mcnet_reference(other, batch.label_labeled, _ramp(1350 // 150, 40), True).backward()
        assert not torch.allclose(other[0].grad, leaves[0].grad)


def test_mcnet_networks_follow_the_configured_norm_and_dropout() -> None:
    method = MCNetPlus(MCNetParams(), NetSpec(n_filters=4, norm="instancenorm", dropout=0.0))
    assert not any(isinstance(m, nn.BatchNorm3d) for m in method.modules())
    assert any(isinstance(m, nn.InstanceNorm3d) for m in method.modules())
    assert all(m.p == 0.0 for m in method.modules() if isinstance(m, nn.Dropout3d))


def test_mcnet_rejects_2d_data() -> None:
    with pytest.raises(ConfigError, match="3D"):
        MCNet(MCNetParams(), NetSpec(spatial_dims=2))


# ---- BCP -----------------------------------------------------------------------------------------------------

def test_box_mask_size_and_position() -> None:
    torch.manual_seed(0)
    for _ in range(20):
        keep = box_mask((112, 112, 80), 2 / 3, torch.device("cpu"))
        box = (keep == 0).nonzero()
        lo, hi = box.min(0).values, box.max(0).values + 1
        assert (hi - lo).tolist() == [74, 74, 53] and len(box) == 74 * 74 * 53
        assert (lo >= 0).all() and (lo < torch.tensor([38, 38, 27])).all()  # start in [0, size - length)
    assert box_mask((9, 12), 2 / 3, torch.device("cpu")).eq(0).sum() == 6 * 8


def test_largest_component_matches_scipy_with_full_connectivity() -> None:
    g = torch.Generator().manual_seed(1)
    volumes = torch.rand(4, 14, 11, 9, generator=g) > 0.62
    volumes[3] = False  # an empty sample stays empty
    planes = torch.rand(3, 23, 19, generator=g) > 0.55
    ties = torch.zeros(1, 8, 8, 8, dtype=torch.bool)
    ties[0, 5:7, 5:7, 5:7] = ties[0, 0:2, 0:2, 0:2] = True  # equal sizes: the first in C order wins
    snake = torch.zeros(1, 21, 21, dtype=torch.bool)  # one long path (a worst case for label propagation) ...
    snake[0, ::2] = True
    snake[0, 1::4, -1] = snake[0, 3::4, 0] = True
    snake[0, 20, 0] = False
    snake[0, 20, 3:6] = False  # ... cut into two: the longer head must win
    for masks in (volumes, planes, ties, snake):
        got = largest_component(masks)
        want = np.stack([largest_connected_component(m.numpy()) for m in masks])
        assert np.array_equal(got.numpy(), want)
    assert largest_component(ties)[0, 0, 0, 0] and not largest_component(ties)[0, 5, 5, 5]


def _region_reference(logits: torch.Tensor, target: torch.Tensor, region: torch.Tensor) -> tuple[float, float]:
    p = logits.softmax(1)
    r = region.expand(target.shape).float()
    ratios = [(2 * (r[n] * p[n, c] * (target[n] == c)).sum() + 1e-5)
              / ((r[n] * (p[n, c] + (target[n] == c).float())).sum() + 1e-5)
              for n in range(len(target)) for c in range(2)]
    ce = -p.log().gather(1, target.unsqueeze(1))[:, 0]
    return 1 - sum(ratios).item() / len(ratios), ((r * ce).sum() / r.sum()).item()


def test_region_dice_ce_equals_the_reference() -> None:
    g = torch.Generator().manual_seed(2)
    logits = torch.randn(2, 2, 6, 5, 4, generator=g)
    target = (torch.rand(2, 6, 5, 4, generator=g) > 0.5).long()
    region = (torch.rand(6, 5, 4, generator=g) > 0.3).float()
    dice, ce = region_dice_ce(logits, target, region)
    ref_dice, ref_ce = _region_reference(logits, target, region)
    assert dice.item() == pytest.approx(ref_dice, rel=1e-6) and ce.item() == pytest.approx(ref_ce, rel=1e-6)


def test_bcp_self_training_loss_equals_the_reference() -> None:
    method = BCP(BCPParams(pretrain_iterations=0), TINY)
    method.net = _pointwise(-0.7, 0.1, 0.9, -0.2)
    method.teacher = EMATeacher(_pointwise(0.0, 0.0, 1.0, 0.0))  # foreground where x >= 0
    shape = (9, 9, 6)
    batch = _batch(n_lab=4, n_unl=4, shape=shape, seed=4)
    batch.image_unlabeled[:] = -1.0
    batch.image_unlabeled[:, 0, 0:3, 0:3, 0:2] = 1.0  # a small blob ...
    batch.image_unlabeled[:, 0, 5:9, 4:9, 2:6] = 1.0  # ... and a large one: the LCC drops the small one
    torch.manual_seed(5)
    out = method.train_step(batch, StepContext(iteration=7, total_iterations=100))

    torch.manual_seed(5)
    x_l, y_l, x_u = batch.image_labeled, batch.label_labeled, batch.image_unlabeled
    fg = method.teacher.net(x_u).softmax(1)[:, 1] >= 0.5
    pseudo = torch.from_numpy(np.stack([largest_connected_component(m.numpy()) for m in fg])).long()
    assert pseudo.sum() == 4 * 4 * 5 * 4
    keep = box_mask(shape, 2 / 3, torch.device("cpu"))
    logits_l = method.net(x_l[:2] * keep + x_u[:2] * (1 - keep))
    logits_u = method.net(x_u[2:] * keep + x_l[2:] * (1 - keep))
    d_lo, c_lo = _region_reference(logits_l, y_l[:2], keep)
    d_li, c_li = _region_reference(logits_l, pseudo[:2], 1 - keep)
    d_uo, c_uo = _region_reference(logits_u, pseudo[2:], keep)
    d_ui, c_ui = _region_reference(logits_u, y_l[2:], 1 - keep)
    expected = (d_lo + 0.5 * d_li + c_lo + 0.5 * c_li) / 2 + (0.5 * d_uo + d_ui + 0.5 * c_uo + c_ui) / 2
    assert out.loss.item() == pytest.approx(expected, rel=1e-5)


def test_bcp_pretraining_loss_and_stage_switch() -> None:
    method = BCP(BCPParams(pretrain_iterations=3), TINY)
    teacher = method.teacher  # keep BCP's own EMA settings around the hand-set network
    method.net = _pointwise(0.8, 0.0, -0.4, 0.3)
    method.teacher = EMATeacher(_pointwise(0.0, 0.0, 0.0, 0.0), teacher.decay, teacher.warmup)
    batch = _batch(n_lab=4, n_unl=4, shape=(6, 6, 3), seed=6)
    torch.manual_seed(9)
    out = method.train_step(batch, StepContext(iteration=3, total_iterations=10))
    torch.manual_seed(9)
    keep = box_mask((6, 6, 3), 2 / 3, torch.device("cpu"))
    x, y = batch.image_labeled, batch.label_labeled
    mixed_label = torch.where(keep.bool(), y[:2], y[2:])
    dice, ce = _region_reference(method.net(x[:2] * keep + x[2:] * (1 - keep)), mixed_label, torch.ones(()))
    assert out.loss.item() == pytest.approx((dice + ce) / 2, rel=1e-6)

    method.after_step(StepContext(iteration=3, total_iterations=10))  # no EMA during pre-training
    assert method.teacher.net.weight.abs().sum() == 0
    method.train_step(batch, StepContext(iteration=4, total_iterations=10))  # first self-training step
    assert torch.equal(method.teacher.net.weight, method.net.weight)
    copied = method.teacher.net.weight.clone()
    with torch.no_grad():
        method.net.weight.add_(1.0)
    method.after_step(StepContext(iteration=4, total_iterations=10))  # official: a constant 0.99, no warm-up
    assert torch.allclose(method.teacher.net.weight, 0.99 * copied + 0.01 * method.net.weight)
    with pytest.raises(ConfigError, match="must be even and equal"):  # already during pre-training
        method.train_step(_batch(n_lab=4, n_unl=2, shape=(6, 6, 3)), StepContext(iteration=1, total_iterations=10))


# ---- a few real optimisation steps lower the loss ------------------------------------------------------------

def _blob_batch(n_lab: int, n_unl: int) -> Batch:
    g = torch.Generator().manual_seed(0)
    grid = torch.stack(torch.meshgrid(*[torch.arange(16.0)] * 3, indexing="ij"))
    centres = 5 + 6 * torch.rand(n_lab + n_unl, 3, 1, 1, 1, generator=g)
    labels = (((grid - centres) ** 2).sum(1) < 16).long()
    images = (labels.float() + 0.3 * torch.randn(labels.shape, generator=g)).unsqueeze(1)
    return Batch(images[:n_lab], labels[:n_lab], images[n_lab:], torch.arange(n_lab))


@pytest.mark.parametrize("name", BASELINES)
def test_a_few_synthetic_iterations_lower_the_loss(name: str) -> None:
    torch.manual_seed(0)
    cls = available_methods()[name]
    params = cls.Params(pretrain_iterations=2) if name == "bcp" else cls.Params()
    method = cls(params, TINY)
    method.train()
    batch = _blob_batch(4, 4) if name == "bcp" else _blob_batch(2, 2)
    optimizer = torch.optim.Adam(method.trainable_parameters(), lr=0.01)
    probe_ctx = StepContext(iteration=6, total_iterations=10)

    def probe() -> float:
        torch.manual_seed(123)  # same dropout masks, noise and boxes before and after
        with torch.no_grad():
            return method.train_step(batch, probe_ctx).loss.item()

    before = probe()
    for iteration in range(1, 11):
        ctx = StepContext(iteration=iteration, total_iterations=10)
        loss = method.train_step(batch, ctx).loss
        optimizer.zero_grad()
        loss.backward()
        optimizer.step()
        method.after_step(ctx)
    assert probe() < 0.95 * before  # MC-Net's Dice-only loss moves slowest (0.93 here)


# ---- real LA ------------------------------------------------------------------------------------------------

@pytest.mark.parametrize("name", BASELINES)
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
    if name == "bcp":
        overrides.update({"pretrain_iterations": 1, "lr_step_start": 1})
    cfg = build_config(name, overrides=overrides, preset="la-8")
    assert cfg.preset == "la-8"
    run = tmp_path / "run"
    Trainer(cfg, run, progress=False).run()
    summary = evaluate_checkpoint(run, run / "eval", device="cpu")
    assert len(summary["cases"]) == 1
    records = [json.loads(line) for line in (run / "metrics.jsonl").read_text().splitlines()]
    losses = [r["loss"] for r in records if "loss" in r]
    assert len(losses) == 2 and all(math.isfinite(v) for v in losses)
