"""CrossMatch: feature-perturbed paths, masked Dice, CutMix alignment, strong augmentations, thresholds,
presets, and short 2D / 3D trainings (synthetic, and real LA when present)."""

from __future__ import annotations

import json
import math
from pathlib import Path

import numpy as np
import pytest
import torch
from scipy import ndimage
from torch import nn

from helpers import real_la_batch, semiseg, train_steps
from semiseg.config import build_config
from semiseg.data.loader import Batch
from semiseg.data.synthetic import make_case
from semiseg.engine.evaluate import evaluate_checkpoint
from semiseg.engine.trainer import learning_rate
from semiseg.errors import ConfigError
from semiseg.methods._augment import (
    cutmix_boxes_2d,
    cutmix_boxes_3d,
    gaussian_blur,
    quantise_8bit,
    random_bias_field,
    random_gamma,
    strong_augment_2d,
    strong_augment_3d,
)
from semiseg.methods.base import NetSpec, StepContext
from semiseg.methods.crossmatch import CrossMatch, CrossMatchParams, confidence, masked_dice_loss
from semiseg.nets import VNet
from semiseg.nets.perturbed import FeaturePerturbedNet
from semiseg.nets.unet2d import UNet2D

SPEC_3D = NetSpec(in_channels=1, num_classes=2, spatial_dims=3, n_filters=4)
SPEC_2D = NetSpec(in_channels=1, num_classes=4, spatial_dims=2)


def make_method(spec: NetSpec, **params) -> CrossMatch:
    return CrossMatch(CrossMatchParams(**params), spec)


# ---------------------------------------------------------------- networks


@pytest.mark.parametrize(("net", "shape", "classes"), [
    (lambda: VNet(1, 2, 4), (16, 16, 16), 2), (lambda: UNet2D(1, 4), (32, 32), 4)])
def test_perturbed_paths_return_four_chunks(net, shape, classes) -> None:
    model = FeaturePerturbedNet(net())
    outputs = model.forward_fp(torch.randn(4, 1, *shape), 2)
    assert [tuple(o.shape) for o in outputs] == [(2, classes, *shape)] * 4
    uneven = model.forward_fp(torch.randn(3, 1, *shape), 1)
    assert [len(o) for o in uneven] == [1, 2, 2, 2]


def test_feature_dropout_acts_on_the_perturbed_copies_only() -> None:
    torch.manual_seed(0)
    model = FeaturePerturbedNet(UNet2D(1, 4)).eval()  # eval: the encoder itself is deterministic
    seen: list[list[torch.Tensor]] = []
    model.net.decoder.register_forward_pre_hook(lambda module, args: seen.append(list(args[0])))
    a, u = torch.randn(8, 1, 16, 16), torch.randn(8, 1, 16, 16)
    p_a, p_u, p_weak, p_strong = model.forward_fp(torch.cat([a, u]), 8)
    clean_a, clean_u = model.net.encoder(a), model.net.encoder(u)
    dropped = {0.25: [], 0.75: []}
    for level, fa, fu in zip(seen[0], clean_a, clean_u, strict=True):
        chunks = level.split(8)
        torch.testing.assert_close(chunks[0], fa)
        torch.testing.assert_close(chunks[1], fu)
        for chunk, rate in zip(chunks[2:], (0.25, 0.75), strict=True):
            zero = chunk.flatten(2).abs().amax(-1) == 0  # whole channel maps are dropped (Dropout2d)
            kept = ~zero
            torch.testing.assert_close(chunk[kept], fu[kept] / (1 - rate))
            dropped[rate].append(zero.flatten())
    for rate, flags in dropped.items():  # 8 samples x 496 channels per rate
        assert torch.cat(flags).float().mean().item() == pytest.approx(rate, abs=0.04)
    # the clean paths are the plain network; the perturbation stays on in eval() (official, unregistered)
    torch.testing.assert_close(p_a, model(a), atol=1e-5, rtol=1e-4)
    torch.testing.assert_close(p_u, model(u), atol=1e-5, rtol=1e-4)
    assert not torch.allclose(p_weak, p_u) and not torch.allclose(p_strong, p_u)
    assert torch.equal(model(u), model(u))


def test_vnet_decoder_can_skip_its_final_dropout() -> None:
    torch.manual_seed(0)
    net = VNet(1, 2, 4).train()
    features = [f.detach() for f in net.encoder(torch.randn(2, 1, 16, 16, 16))]
    assert torch.equal(net.decoder(features, final_dropout=False)[0], net.decoder(features, final_dropout=False)[0])
    assert not torch.equal(net.decoder(features)[0], net.decoder(features)[0])


def test_inference_network_is_the_plain_network() -> None:
    method = make_method(SPEC_3D)
    net = method.inference_network()
    assert isinstance(net, VNet)
    assert sum(p.numel() for p in method.parameters()) == sum(p.numel() for p in net.parameters())
    VNet(1, 2, 4).load_state_dict(net.state_dict())
    assert isinstance(make_method(SPEC_2D).inference_network(), UNet2D)


# ---------------------------------------------------------------- losses and masks


def test_masked_dice_loss_matches_a_hand_computation() -> None:
    fg = torch.tensor([0.9, 0.2, 0.6, 0.4])
    probs = torch.stack([1 - fg, fg]).view(1, 2, 2, 2)
    target = torch.tensor([1, 0, 1, 1]).view(1, 2, 2)
    valid = torch.tensor([True, True, False, True]).view(1, 2, 2)
    s = 1e-5
    # foreground over valid voxels: intersection 0.9 + 0.4, sum p^2 = 0.81 + 0.04 + 0.16, sum t^2 = 2
    fg_loss = 1 - (2 * 1.3 + s) / (1.01 + 2 + s)
    bg_loss = 1 - (2 * 0.8 + s) / (0.01 + 0.64 + 0.36 + 1 + s)
    assert masked_dice_loss(probs, target, valid, s, foreground_only=True).item() == pytest.approx(fg_loss)
    assert masked_dice_loss(probs, target, valid, s).item() == pytest.approx((fg_loss + bg_loss) / 2)
    assert masked_dice_loss(probs, target, torch.zeros_like(valid), s).item() == 0.0
    unmasked = 1 - (2 * 1.9 + s) / (1.37 + 3 + s)
    assert masked_dice_loss(probs, target, None, s, foreground_only=True).item() == pytest.approx(unmasked)


def test_confidence_mask_ignores_exactly_the_low_confidence_voxels() -> None:
    torch.manual_seed(0)
    method = make_method(SPEC_2D)
    teacher = torch.randn(2, 4, 8, 8) * 3
    conf, label = confidence(teacher)
    valid = conf >= 0.8
    assert 0 < valid.sum() < valid.numel()
    student = torch.randn(2, 4, 8, 8, requires_grad=True)
    loss = method.dice(student, label, valid)
    loss.backward()
    touched = student.grad.abs().sum(1) > 0
    assert torch.equal(touched, valid)
    changed = torch.where(valid[:, None], student.detach(), torch.randn_like(student) * 5)
    assert method.dice(changed, label, valid).item() == pytest.approx(loss.item())


class PixelFP(nn.Module):
    """A stand-in network whose logits are a per-pixel function of the input, on every path."""

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return torch.cat([-(x - c).abs() * 10 for c in (0.1, 0.4, 0.6, 0.9)], dim=1)

    def forward_fp(self, x: torch.Tensor, n_first: int) -> tuple[torch.Tensor, ...]:
        out = self(x)
        first, rest = out[:n_first], out[n_first:]
        return first, rest, rest * 0.5, rest.flip(1)  # weak / strong paths: other pixel-wise functions


@pytest.mark.parametrize("source", ["mix", "self"])
def test_cutmix_targets_stay_aligned_with_the_mixed_images(source: str) -> None:
    torch.manual_seed(0)
    method = make_method(SPEC_2D, quantise_8bit=False, dkd_box_target_source=source)
    method.net = PixelFP()
    box1 = torch.zeros(2, 8, 8)
    box1[0, 2:6, 1:5] = 1  # sample 1 keeps its own image
    box2 = torch.zeros(2, 8, 8)
    box2[:, 5:8, 3:8] = 1
    method.strong_views = lambda images: images  # type: ignore[method-assign]
    method.cutmix_boxes = lambda n, size, device: torch.cat([box1, box2])  # type: ignore[method-assign]
    calls: list[tuple[torch.Tensor, torch.Tensor, torch.Tensor | None]] = []
    method.dice = lambda logits, target, valid=None: calls.append((logits, target, valid)) or torch.zeros(())  # type: ignore[method-assign]
    x = torch.rand(2, 1, 8, 8)
    u_w, u_mix = torch.rand(2, 1, 8, 8), torch.rand(2, 1, 8, 8)
    method.supervised_loss = lambda logits, y: torch.zeros(())  # type: ignore[method-assign]
    method.train_step(Batch(x, torch.zeros(2, 8, 8, dtype=torch.long), torch.cat([u_w, u_mix]), torch.arange(2)),
                      StepContext(1, 10))
    mixed1 = torch.where(box1.bool()[:, None], u_mix, u_w)
    mixed2 = torch.where(box2.bool()[:, None], u_mix, u_w)
    net, tau = PixelFP(), method.threshold(1, 10)
    (s1_logits, s1_target, s1_valid), (s2_logits, s2_target, _) = calls[0], calls[1]
    torch.testing.assert_close(s1_logits, net(mixed1))  # the student saw the mixed image ...
    torch.testing.assert_close(s2_logits, net(mixed2))
    assert torch.equal(s1_target, net(mixed1).argmax(1))  # ... and its target is the teacher on that image
    assert torch.equal(s1_valid, net(mixed1).softmax(1).amax(1) >= tau)
    assert torch.equal(s2_target, net(mixed2).argmax(1))
    assert not torch.equal(s1_target, s2_target)
    dkd_weak_target = calls[6][1]  # calls: s1, s2, four L_tkd terms, two L_dkd terms
    expected = (net(mixed2) * 0.5 if source == "mix" else net(u_w) * 0.5).argmax(1)
    assert torch.equal(dkd_weak_target, expected)
    assert torch.equal(calls[7][1], (net(mixed2) if source == "mix" else net(u_w)).flip(1).argmax(1))


# ---------------------------------------------------------------- CutMix boxes and strong views


def test_2d_boxes_are_rectangles_inside_the_image_half_of_the_time() -> None:
    torch.manual_seed(0)
    boxes = cutmix_boxes_2d(400, (64, 48), torch.device("cpu"))
    area = boxes.sum((1, 2))
    assert 0.38 < (area > 0).float().mean().item() < 0.62
    for box in boxes[area > 0][:50]:
        rows, cols = box.any(1).sum(), box.any(0).sum()
        assert box.sum() == rows * cols  # one axis-aligned rectangle
    assert area.max().item() <= 0.4 * 64 * 48
    assert cutmix_boxes_2d(10, (64, 48), torch.device("cpu"), p=0.0).sum() == 0


def test_3d_official_boxes_never_reach_the_far_part_of_axis_0() -> None:
    torch.manual_seed(0)
    size = (56, 56, 40)
    swapped = cutmix_boxes_3d(200, size, torch.device("cpu"), p=1.0, swapped_axes=True)
    correct = cutmix_boxes_3d(200, size, torch.device("cpu"), p=1.0, swapped_axes=False)
    # z in [0, 40 - d) lands on axis 0 (length 56): the box stops before index 40 (quirk Q1)
    assert swapped[:, 40:].sum() == 0 and correct[:, 40:].sum() > 0
    # the x range lands on axis 2 (length 40) and is clipped there, so the official boxes are smaller
    assert swapped[:, :, :, -1].any((1, 2)).float().mean() > correct[:, :, :, -1].any((1, 2)).float().mean()
    assert swapped.sum() < correct.sum()
    sides = torch.stack([correct.any((2, 3)).sum(1), correct.any((1, 3)).sum(1), correct.any((1, 2)).sum(1)], 1)
    assert torch.equal(correct.sum((1, 2, 3)), sides.prod(1).float())  # whole boxes when written correctly


def test_gaussian_blur_matches_scipy() -> None:
    rng = np.random.default_rng(0)
    x3 = rng.random((2, 1, 20, 18, 16)).astype(np.float32)
    sigma = torch.tensor([[0.5, 1.0, 2.0], [1.5, 0.1, 0.7]])
    out = gaussian_blur(torch.from_numpy(x3), sigma).numpy()
    for i in range(2):
        expected = x3[i, 0]
        for axis, s in enumerate(sigma[i].tolist()):  # same support as ours: radius 8 = truncate * sigma
            expected = ndimage.gaussian_filter1d(expected, s, axis=axis, mode="mirror", truncate=8 / s)
        np.testing.assert_allclose(out[i, 0], expected, atol=1e-5)
    x2 = rng.random((1, 1, 24, 20)).astype(np.float32)
    out2 = gaussian_blur(torch.from_numpy(x2), torch.tensor([[1.2, 1.2]])).numpy()
    np.testing.assert_allclose(out2[0, 0], ndimage.gaussian_filter(x2[0, 0], 1.2, mode="mirror", truncate=8 / 1.2),
                               atol=1e-5)


def test_bias_field_is_the_exponential_of_a_cubic_polynomial() -> None:
    torch.manual_seed(0)
    x = torch.rand(2, 1, 12, 10, 9) + 0.5
    log_field = torch.log(random_bias_field(x) / x)
    for axis in (2, 3, 4):  # fourth finite differences of a cubic vanish
        assert log_field.diff(n=4, dim=axis).abs().max() < 1e-3
    assert log_field.abs().max() <= 0.5 * 20  # 20 terms with |c| <= 0.5 on [-1, 1]
    assert torch.equal(random_bias_field(x, coefficient=0.0), x)


def test_gamma_keeps_the_sign_and_uses_one_exponent_per_sample() -> None:
    torch.manual_seed(0)
    x = torch.randn(3, 1, 6, 6, 6)
    out = random_gamma(x)
    assert torch.equal(out.sign(), x.sign())
    gamma = torch.log(out.abs()) / torch.log(x.abs())
    mask = (x.abs() - 1).abs() > 0.1
    for g, m in zip(gamma, mask, strict=True):
        assert g[m].std() < 1e-3 and math.exp(-0.5) - 1e-4 <= g[m].mean() <= math.exp(0.5) + 1e-4


def test_strong_views_keep_shapes_and_voxel_positions() -> None:
    torch.manual_seed(0)
    x3 = torch.randn(4, 1, 16, 16, 12)
    out3 = strong_augment_3d(x3)
    assert out3.shape == x3.shape and out3.dtype == x3.dtype and torch.isfinite(out3).all()
    assert not torch.equal(out3, x3)
    no_blur = strong_augment_3d(x3, p_blur=0.0)
    assert torch.equal(no_blur.sign(), x3.sign())  # positive field, signed gamma: structures stay put
    assert torch.equal(strong_augment_3d(x3, p_intensity=0.0, p_blur=0.0), x3)

    x2 = quantise_8bit(torch.rand(6, 1, 32, 32))
    out2 = strong_augment_2d(x2)
    assert out2.shape == x2.shape and out2.min() >= 0 and out2.max() <= 1
    torch.testing.assert_close(out2 * 255, torch.round(out2 * 255))  # 8-bit levels like the PIL pipeline
    jitter = strong_augment_2d(x2, p_jitter=1.0, p_blur=0.0)
    for before, after in zip(x2.flatten(1), jitter.flatten(1), strict=True):
        order = before.argsort()
        assert (after[order].diff() >= 0).all()  # brightness / contrast are monotone: no pixel moves
    assert torch.equal(strong_augment_2d(x2, p_jitter=0.0, p_blur=0.0), x2)


def test_strong_views_stay_float32_under_autocast() -> None:
    torch.manual_seed(0)
    images = quantise_8bit(torch.rand(4, 1, 32, 32))
    with torch.autocast("cpu", dtype=torch.bfloat16):
        views = make_method(SPEC_2D).strong_views(images)
    assert views.dtype == torch.float32
    torch.testing.assert_close(views * 255, torch.round(views * 255), atol=1e-4, rtol=0)


# ---------------------------------------------------------------- schedule and presets


def test_la_threshold_ramp_and_acdc_fixed_threshold() -> None:
    la = make_method(SPEC_3D)
    assert la.threshold(1, 14000) == 0.75  # the first update uses tau0 unscaled (official)
    for t, expected in ((0, 0.521), (5000, 0.534), (9000, 0.577), (14000, 0.668)):
        assert la.threshold(t + 2, 14000) == pytest.approx(expected, abs=1e-3)
    assert la.threshold(100, 14000) == pytest.approx((0.75 + 0.25 * math.exp(-5 * (1 - 98 / 17000) ** 2)) * math.log(2))
    unscaled = make_method(SPEC_3D, tau_ln2_scale=False, schedule_horizon=0)
    assert unscaled.threshold(1002, 1000) == pytest.approx(1.0)
    acdc = make_method(SPEC_2D)
    assert acdc.threshold(1, 30900) == acdc.threshold(30000, 30900) == 0.95
    assert acdc.loss_weights == (1.0, 0.25, 0.25, 0.5) and la.loss_weights == (1.0, 0.25, 0.25, 1.0)


def test_presets_carry_the_official_recipes() -> None:
    la = build_config("crossmatch", preset="la-8")
    assert (la.optimizer, la.lr, la.lr_schedule, la.poly_horizon, la.iterations) == ("adamw", 1e-3, "poly", 17000,
                                                                                    14000)
    assert (la.labeled, la.batch_labeled, la.batch_unlabeled, la.patch_size) == (8, 2, 4, (112, 112, 80))
    assert learning_rate(la, 14000) / la.lr == pytest.approx(0.21, abs=0.005)  # poly over 17,000 (Q6)
    params = la.method_params()
    assert (params.tau, params.tau_schedule, params.mix_teacher_mode, params.cutmix3d_axes) == (
        0.75, "ramp", "train", "official_swapped")
    paper = build_config("crossmatch", preset="la-16-paper")
    assert paper.iterations == 9000 and paper.method_params().tau == 0.85
    assert paper.method_params().dkd_box_target_source == "self" and paper.method_params().loss_norm == 3
    corrected = build_config("crossmatch", preset="la-8-corrected")
    assert corrected.method_params().cutmix3d_axes == "correct" and corrected.poly_horizon == 0
    acdc = build_config("crossmatch", preset="acdc-3")
    assert (acdc.optimizer, acdc.nesterov, acdc.lr, acdc.iterations, acdc.labeled) == ("sgd", True, 0.01, 30900, 3)
    assert (acdc.batch_labeled, acdc.batch_unlabeled, acdc.patch_size) == (12, 24, (256, 256))
    assert learning_rate(acdc, 30900) == pytest.approx(0.01 * (2 / 30900) ** 0.9)  # lags one update (official)
    assert acdc.method_params().loss_weights == (1.0, 0.25, 0.25, 0.5)
    assert build_config("crossmatch", preset="acdc-7").iterations == 29400
    assert build_config("crossmatch", preset="acdc-7-corrected").checkpoint_selection == "best_on_val"


# ---------------------------------------------------------------- training


def _batch_3d() -> Batch:
    cases = [make_case(0, i, (32, 32, 16)) for i in range(3)]
    images = torch.from_numpy(np.stack([c[0] for c in cases]))[:, None]
    labels = torch.from_numpy(np.stack([c[1] for c in cases])).long()
    return Batch(images[:1], labels[:1], images[1:], torch.arange(1))


def _batch_2d() -> Batch:
    gen = torch.Generator().manual_seed(0)
    yy, xx = torch.meshgrid(torch.arange(32.0), torch.arange(32.0), indexing="ij")
    labels = []
    for _ in range(6):
        cy, cx = torch.randint(12, 20, (2,), generator=gen).float()
        r = torch.hypot(yy - cy, xx - cx)
        label = torch.zeros(32, 32, dtype=torch.long)
        label[r < 11], label[r < 8], label[r < 5] = 1, 2, 3
        labels.append(label)
    label = torch.stack(labels)
    images = (label / 3 + 0.1 * torch.randn(label.shape, generator=gen)).clamp(0, 1)[:, None]
    return Batch(images[:2], label[:2], images[2:], torch.arange(2))


def _probe(method: CrossMatch, batch: Batch) -> dict[str, float]:
    """Losses of one step under fixed random draws (augmentations, boxes, dropout masks), no update."""
    torch.manual_seed(123)
    with torch.no_grad():
        step = method.train_step(batch, StepContext(5, 10))
    return {"loss": step.loss.item(), **{k: v.item() for k, v in step.logs.items()}}


@pytest.mark.parametrize(("spec", "make_batch"), [(SPEC_3D, _batch_3d), (SPEC_2D, _batch_2d)])
def test_a_few_iterations_lower_the_supervised_loss_with_every_term_active(spec: NetSpec, make_batch) -> None:
    torch.manual_seed(0)
    method = make_method(spec).train()
    optimizer = torch.optim.AdamW(method.trainable_parameters(), lr=3e-3)
    batch = make_batch()
    before = _probe(method, batch)
    torch.manual_seed(0)
    for iteration in range(1, 11):
        step = method.train_step(batch, StepContext(iteration, 10))
        optimizer.zero_grad()
        step.loss.backward()
        if iteration == 1:
            assert all(p.grad is not None for p in method.parameters())
        optimizer.step()
    after = _probe(method, batch)
    # The pseudo-label targets move while the network learns, so the total objective need not fall in
    # ten steps; the supervised term must, and the unsupervised terms must be in play by then.
    assert after["loss/x"] < 0.9 * before["loss/x"]
    assert after["confident_fraction"] > 0
    assert all(0 < after[k] < 1 for k in ("loss/s1", "loss/s2", "loss/tkd", "loss/dkd"))


@pytest.mark.parametrize(("mode", "expected"), [("train", True), ("eval", False)])
def test_mix_teacher_mode_switches_the_network_mode(mode: str, expected: bool) -> None:
    method = make_method(SPEC_3D, mix_teacher_mode=mode).train()
    modes: list[bool] = []
    method.net.net.register_forward_hook(lambda m, args, out: modes.append(m.training))
    encoder_calls: list[tuple[bool, bool]] = []
    method.net.net.encoder.register_forward_hook(
        lambda m, args, out: encoder_calls.append((m.training, torch.is_grad_enabled())))
    method.train_step(_batch_3d(), StepContext(1, 10))
    # teacher: plain forward + dropout paths on (x, u_mix), without gradient; student: two dropout-path passes
    assert modes == [expected]
    assert encoder_calls == [(expected, False), (expected, False), (True, True), (True, True)]
    assert method.training and method.net.net.training


def test_odd_unlabelled_batch_is_a_config_error() -> None:
    batch = _batch_3d()
    with pytest.raises(ConfigError, match="even batch_unlabeled"):
        make_method(SPEC_3D).train_step(Batch(batch.image_labeled, batch.label_labeled, batch.image_unlabeled[:1],
                                              batch.index_labeled), StepContext(1, 10))


def test_cli_trains_the_la_preset_on_synthetic_data(tmp_path: Path, tiny_synthetic: str) -> None:
    run = tmp_path / "run"
    semiseg("train", "--method", "crossmatch", "--preset", "la-8", "--data", tiny_synthetic, "--labeled", "2",
            "--iterations", "3", "--out", str(run), "--set", "patch_size=32,32,16", "--set", "stride=16,16,8",
            "--set", "n_filters=4", "--set", "batch_labeled=1", "--set", "batch_unlabeled=2",
            "--set", "num_workers=0", "--set", "log_every=1", "--quiet")
    records = [json.loads(line) for line in (run / "metrics.jsonl").read_text().splitlines()]
    ramp = [(0.75 + 0.25 * math.exp(-5 * (1 - t / 17000) ** 2)) * math.log(2) for t in (0, 1)]
    assert [r["tau"] for r in records] == pytest.approx([0.75, *ramp], abs=1e-6)
    assert records[0]["lr"] == 1e-3 and all(math.isfinite(r["loss/dkd"]) for r in records)
    summary = evaluate_checkpoint(run, tmp_path / "eval", device="cpu")
    assert summary["protocol"]["method"] == "crossmatch" and len(summary["cases"]) == 2
    assert 0 <= summary["metrics"]["dice"]["mean"] <= 1


@pytest.mark.la
def test_a_few_steps_on_real_la_cases(la_root: Path) -> None:
    batch = real_la_batch(la_root, (48, 48, 32), 2)
    assert batch.image_unlabeled.min() < 0  # z-scored volumes: the signed gamma path is exercised
    torch.manual_seed(0)
    method = make_method(NetSpec(1, 2, 3, 4)).train()
    optimizer = torch.optim.AdamW(method.trainable_parameters(), lr=1e-3)
    for step in train_steps(method, batch, optimizer, 14000):
        assert math.isfinite(step.loss.item()) and 0 <= step.logs["loss/x"].item() < 2
