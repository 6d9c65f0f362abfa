"""UniMatch: the whole-batch feature perturbation, each loss term against a direct computation (masked Dice
as the official `DiceLoss`, CutMix-aligned targets), the mix teacher's mode, presets, `semiseg methods`, and
short trainings (CLI on synthetic 3D and ACDC-layout 2D data, real LA)."""

from __future__ import annotations

import json
import math
from pathlib import Path

import pytest
import torch
import torch.nn.functional as F
from torch import nn

from helpers import real_la_batch, semiseg, train_steps
from semiseg.config import build_config
from semiseg.data.layouts.acdc import write_synthetic_acdc
from semiseg.data.loader import Batch
from semiseg.engine.evaluate import evaluate_checkpoint
from semiseg.engine.trainer import learning_rate
from semiseg.errors import ConfigError
from semiseg.methods.base import NetSpec, StepContext
from semiseg.methods.unimatch import UniMatch, UniMatchParams
from semiseg.nets.perturbed import FeaturePerturbedNet
from semiseg.nets.unet2d import UNet2D

SPEC_3D = NetSpec(in_channels=1, num_classes=2, spatial_dims=3, n_filters=4)
SPEC_2D = NetSpec(in_channels=1, num_classes=4, spatial_dims=2)


def test_whole_batch_perturbation_decodes_clean_and_dropped_copies_together() -> None:
    torch.manual_seed(0)
    model = FeaturePerturbedNet(UNet2D(1, 4), (0.5,)).eval()  # eval: the encoder itself is deterministic
    seen: list[list[torch.Tensor]] = []
    model.net.decoder.register_forward_pre_hook(lambda module, args: seen.append(list(args[0])))
    x = torch.randn(6, 1, 16, 16)
    clean, dropped = model.forward_perturbed(x)
    assert clean.shape == dropped.shape == (6, 4, 16, 16)
    torch.testing.assert_close(clean, model(x), atol=1e-5, rtol=1e-4)
    flags = []
    for level, feature in zip(seen[0], model.net.encoder(x), strict=True):
        assert len(level) == 12  # one decoder call over [x, drop(x)]: BatchNorm sees both
        zero = level[6:].flatten(2).abs().amax(-1) == 0
        torch.testing.assert_close(level[6:][~zero], feature[~zero] * 2)
        flags.append(zero.flatten())
    assert torch.cat(flags).float().mean().item() == pytest.approx(0.5, abs=0.05)  # every sample, labelled too


def masked_dice(probs: torch.Tensor, target: torch.Tensor, ignore: torch.Tensor | None,
                classes: range) -> torch.Tensor:
    """The official `DiceLoss(..., ignore)`: per class, voxels with ignore == 1 dropped, smooth 1e-5."""
    keep = torch.ones_like(target, dtype=torch.bool) if ignore is None else ignore != 1
    total = 0.0
    for c in classes:
        p, g = probs[:, c][keep].double(), (target == c)[keep].double()
        total += 1 - (2 * (p * g).sum() + 1e-5) / ((p * p).sum() + (g * g).sum() + 1e-5)
    return total / len(classes)


class PixelFP(nn.Module):
    """Stand-in network: logits are a per-pixel function of the input; the perturbed path halves them."""

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return torch.cat([-(x - c).abs() * 10 for c in (0.1, 0.4, 0.6, 0.9)], dim=1)

    def forward_perturbed(self, x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        out = self(x)
        return out, out * 0.5


def test_every_loss_term_matches_a_direct_computation() -> None:
    torch.manual_seed(0)
    tau = 0.8
    method = UniMatch(UniMatchParams(tau=tau, quantise_8bit=False), SPEC_2D)
    method.net = PixelFP()
    box1 = torch.zeros(2, 8, 8)
    box1[0, 2:6, 1:5] = 1  # sample 1 keeps its own strong view
    box2 = torch.zeros(2, 8, 8)
    box2[:, 5:8, 3:8] = 1
    method.strong_views = lambda images: images  # type: ignore[method-assign]
    method.cutmix_boxes = lambda n, size, device: torch.cat([box1, box2])  # type: ignore[method-assign]
    x, u_w, u_mix = torch.rand(2, 1, 8, 8), torch.rand(2, 1, 8, 8), torch.rand(2, 1, 8, 8)
    y = torch.randint(0, 4, (2, 8, 8))
    step = method.train_step(Batch(x, y, torch.cat([u_w, u_mix]), torch.arange(2)), StepContext(1, 10))

    net = PixelFP()
    conf_w, label_w = net(u_w).softmax(1).max(1)
    conf_m, label_m = net(u_mix).softmax(1).max(1)
    expected = {}
    for name, box in (("loss/s1", box1), ("loss/s2", box2)):
        inside = box.bool()
        mixed = torch.where(inside[:, None], u_mix, u_w)  # the student sees the pasted image ...
        target = torch.where(inside, label_m, label_w)  # ... and learns the teachers' labels on that image
        conf = torch.where(inside, conf_m, conf_w)
        expected[name] = masked_dice(net(mixed).softmax(1), target, (conf < tau).float(), range(4))
    expected["loss/fp"] = masked_dice((net(u_w) * 0.5).softmax(1), label_w, (conf_w < tau).float(), range(4))
    expected["loss/x"] = (F.cross_entropy(net(x).double(), y) + masked_dice(net(x).softmax(1), y, None, range(4))) / 2
    assert 0 < (conf_w >= tau).float().mean() < 1  # the masks are partial
    for key, value in expected.items():
        assert step.logs[key].item() == pytest.approx(value.item(), rel=1e-5), key
    e = expected
    total = (e["loss/x"] + 0.25 * e["loss/s1"] + 0.25 * e["loss/s2"] + 0.5 * e["loss/fp"]) / 2
    assert step.loss.item() == pytest.approx(total.item(), rel=1e-5)
    assert step.logs["confident_fraction"].item() == pytest.approx((conf_w >= tau).float().mean().item())


def test_binary_data_uses_the_foreground_dice_and_multiclass_data_every_class() -> None:
    probs = torch.rand(2, 2, 4, 4, 4).softmax(1)
    target = torch.randint(0, 2, (2, 4, 4, 4))
    binary = UniMatch(UniMatchParams(), SPEC_3D)
    foreground = masked_dice(probs, target, None, range(1, 2)).item()
    assert binary.dice(probs.log(), target).item() == pytest.approx(foreground, rel=1e-5)
    every = UniMatch(UniMatchParams(dice_classes="all"), SPEC_3D)
    assert every.dice(probs.log(), target).item() == pytest.approx(masked_dice(probs, target, None, range(2)).item(),
                                                                   rel=1e-5)
    assert not UniMatch(UniMatchParams(), SPEC_2D).binary


def _batch_3d() -> Batch:
    gen = torch.Generator().manual_seed(0)
    images = torch.randn(5, 1, 16, 16, 16, generator=gen)  # 1 labelled, 2 u_w, 2 mix (BatchNorm needs 2)
    return Batch(images[:1], (images[:1, 0] > 0.3).long(), images[1:], torch.arange(1))


@pytest.mark.parametrize(("mode", "expected"), [("eval", False), ("train", True)])
def test_mix_teacher_runs_without_gradient_in_the_chosen_mode(mode: str, expected: bool) -> None:
    method = UniMatch(UniMatchParams(mix_teacher_mode=mode), SPEC_3D).train()
    calls: list[tuple[bool, bool]] = []
    method.net.net.encoder.register_forward_hook(
        lambda m, args, out: calls.append((m.training, torch.is_grad_enabled())))
    step = method.train_step(_batch_3d(), StepContext(1, 10))
    # mix teacher, then the student's perturbed pass on (x, u_w) and its pass on the two strong views
    assert calls == [(expected, False), (True, True), (True, True)]
    assert method.net.training and math.isfinite(step.loss.item())
    step.loss.backward()
    assert all(p.grad is not None for p in method.parameters())


def test_odd_unlabelled_batch_is_a_config_error() -> None:
    batch = _batch_3d()
    with pytest.raises(ConfigError, match="even batch_unlabeled"):
        UniMatch(UniMatchParams(), SPEC_3D).train_step(
            Batch(batch.image_labeled, batch.label_labeled, batch.image_unlabeled[:1], batch.index_labeled),
            StepContext(1, 10))


def test_presets_carry_the_official_acdc_recipe_and_the_la_recipe() -> None:
    acdc = build_config("unimatch", preset="acdc-3")
    assert (acdc.optimizer, acdc.nesterov, acdc.lr, acdc.lr_schedule, acdc.iterations) == ("sgd", False, 0.01, "poly",
                                                                                        30900)
    assert (acdc.labeled, acdc.batch_labeled, acdc.batch_unlabeled, acdc.patch_size) == (3, 12, 24, (256, 256))
    params = acdc.method_params()
    assert (params.tau, params.loss_weights, params.mix_teacher_mode, params.fp_rate) == (0.95, (1, 0.25, 0.25, 0.5),
                                                                                        "eval", 0.5)
    assert build_config("unimatch", preset="acdc-7").iterations == 29400
    la = build_config("unimatch", preset="la-16")
    assert (la.labeled, la.optimizer, la.lr, la.iterations, la.batch_unlabeled) == (16, "adamw", 1e-3, 14000, 4)
    assert learning_rate(la, 14000) == pytest.approx(1e-3 * (1 / 14000) ** 0.9)  # poly over the run


def test_semiseg_methods_lists_the_new_methods_with_parameter_counts(capsys: pytest.CaptureFixture) -> None:
    from semiseg.cli import methods

    methods()
    lines = {line.split()[0]: line for line in capsys.readouterr().out.splitlines() if not line.startswith(" ")}
    assert "9,448,866 params" in lines["unimatch"] and "9,448,866 params" in lines["dtc"]
    assert "18,897,732 params (evaluated net 9,448,866)" in lines["cps"]


def test_cli_trains_the_la_preset_on_synthetic_data(tmp_path: Path, tiny_synthetic: str) -> None:
    run = tmp_path / "run"
    semiseg("train", "--method", "unimatch", "--preset", "la-8", "--data", tiny_synthetic, "--labeled", "2",
            "--iterations", "3", "--out", str(run), "--set", "patch_size=32,32,16", "--set", "stride=16,16,8",
            "--set", "n_filters=4", "--set", "batch_labeled=1", "--set", "batch_unlabeled=2",
            "--set", "num_workers=0", "--set", "log_every=1", "--quiet")
    records = [json.loads(line) for line in (run / "metrics.jsonl").read_text().splitlines()]
    assert len(records) == 3 and records[0]["lr"] == 1e-3 and all(math.isfinite(r["loss/fp"]) for r in records)
    summary = evaluate_checkpoint(run, tmp_path / "eval", device="cpu")
    assert summary["protocol"]["method"] == "unimatch" and 0 <= summary["metrics"]["dice"]["mean"] <= 1


def test_acdc_preset_trains_and_evaluates_per_class(tmp_path: Path) -> None:
    root = write_synthetic_acdc(tmp_path / "acdc", patients=6, shape=(3, 40, 36))
    run = tmp_path / "run"
    semiseg("train", "--method", "unimatch", "--preset", "acdc-3", "--data", str(root), "--labeled", "2",
            "--iterations", "2", "--out", str(run), "--set", "patch_size=32,32", "--set", "batch_labeled=2",
            "--set", "batch_unlabeled=4", "--set", "num_workers=0", "--set", "log_every=1", "--quiet")
    records = [json.loads(line) for line in (run / "metrics.jsonl").read_text().splitlines()]
    assert len(records) == 2 and records[0]["lr"] == pytest.approx(0.01)
    assert all(math.isfinite(r["loss/s1"]) and math.isfinite(r["loss/fp"]) for r in records)
    summary = evaluate_checkpoint(run, tmp_path / "eval", split="val", device="cpu")
    assert summary["protocol"]["inference"]["mode"] == "slicewise"
    assert {f"dice_class{c}" for c in (1, 2, 3)} <= set(summary["metrics"])


@pytest.mark.la
def test_a_few_steps_on_real_la_cases(la_root: Path) -> None:
    batch = real_la_batch(la_root, (32, 32, 32), 2)
    torch.manual_seed(0)
    method = UniMatch(UniMatchParams(), NetSpec(1, 2, 3, 4)).train()
    optimizer = torch.optim.AdamW(method.trainable_parameters(), lr=1e-3)
    for step in train_steps(method, batch, optimizer, 14000):
        assert math.isfinite(step.loss.item()) and 0 <= step.logs["loss/x"].item() < 2
