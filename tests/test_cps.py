"""Cross pseudo supervision: initialisation, each loss term against a direct computation, gradient paths,
ramp-up, presets, and short trainings (CLI on synthetic 3D and ACDC-layout 2D data, real LA)."""

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
from semiseg.methods.base import NetSpec, StepContext
from semiseg.methods.cps import CPS, CPSParams
from semiseg.nets import VNet, default_network
from semiseg.nets.unet2d import UNet2D

SPEC_3D = NetSpec(in_channels=1, num_classes=2, spatial_dims=3, n_filters=4)
SPEC_2D = NetSpec(in_channels=1, num_classes=4, spatial_dims=2)


def test_3d_networks_get_kaiming_and_xavier_weights_as_the_official_3d_script() -> None:
    torch.manual_seed(0)
    method = CPS(CPSParams(), NetSpec(1, 2, 3, 16))
    conv1, conv2 = method.net1.decoder.block_six[0], method.net2.decoder.block_six[0]  # Conv3d 128 -> 128
    fan_in, fan_out = 128 * 27, 128 * 27
    assert conv1.weight.std().item() == pytest.approx(math.sqrt(2 / fan_in), rel=0.02)  # kaiming_normal_
    assert conv2.weight.std().item() == pytest.approx(math.sqrt(2 / (fan_in + fan_out)), rel=0.02)  # xavier
    bn = method.net1.decoder.block_six[1]
    assert torch.equal(bn.weight, torch.ones_like(bn.weight)) and torch.equal(bn.bias, torch.zeros_like(bn.bias))
    # transposed convolutions are no Conv3d: they keep PyTorch's default initialisation in both networks
    up1, up2 = method.net1.decoder.up_five[0], method.net2.decoder.up_five[0]
    assert isinstance(up1, nn.ConvTranspose3d)
    bound = 1 / math.sqrt(up1.weight.shape[1] * 8)  # kaiming_uniform(a=sqrt 5) bound over fan_in = out_ch * k^3
    assert up1.weight.abs().max() <= bound and up2.weight.abs().max() <= bound


def test_2d_networks_keep_the_default_initialisation_as_the_official_2d_script() -> None:
    torch.manual_seed(0)
    method = CPS(CPSParams(), SPEC_2D)
    torch.manual_seed(0)
    first, second = default_network(SPEC_2D), default_network(SPEC_2D)
    for ours, reference in ((method.net1, first), (method.net2, second)):
        for a, b in zip(ours.state_dict().values(), reference.state_dict().values(), strict=True):
            assert torch.equal(a, b)
    assert isinstance(method.inference_network(), UNet2D)
    explicit = CPS(CPSParams(init="kaiming_xavier"), SPEC_2D)
    conv = explicit.net1.encoder.in_conv[0]
    assert conv.weight.std().item() == pytest.approx(math.sqrt(2 / 9), rel=0.1)


def _batch(n_lab: int = 2, n_unl: int = 2) -> Batch:
    gen = torch.Generator().manual_seed(0)
    images = torch.randn(n_lab + n_unl, 1, 16, 16, 16, generator=gen)
    labels = (images[:n_lab, 0] > 0.3).long()
    return Batch(images[:n_lab], labels, images[n_lab:], torch.arange(n_lab))


def _dice_ce(logits: torch.Tensor, target: torch.Tensor) -> torch.Tensor:
    """0.5 (CE + SSL4MIS DiceLoss over both classes, smooth 1e-5), written out."""
    probs = logits.double().softmax(1)
    dice = 0.0
    for c in range(probs.shape[1]):
        p, g = probs[:, c], (target == c).double()
        dice += 1 - (2 * (p * g).sum() + 1e-5) / ((p * p).sum() + (g * g).sum() + 1e-5)
    return 0.5 * (F.cross_entropy(logits.double(), target) + dice / probs.shape[1])


@pytest.mark.parametrize("on_labeled", [False, True])
def test_every_loss_term_matches_a_direct_computation(on_labeled: bool) -> None:
    torch.manual_seed(0)
    method = CPS(CPSParams(cps_on_labeled=on_labeled), SPEC_3D).eval()  # eval: deterministic forwards
    batch = _batch()
    ctx = StepContext(1 + 150 * 50, 30000)
    step = method.train_step(batch, ctx)
    with torch.no_grad():
        out1, out2 = method.net1(batch.images), method.net2(batch.images)
    sup1, sup2 = _dice_ce(out1[:2], batch.label_labeled), _dice_ce(out2[:2], batch.label_labeled)
    start = 0 if on_labeled else 2
    cps1 = F.cross_entropy(out1[start:].double(), out2[start:].argmax(1))  # network 1 learns network 2's labels
    cps2 = F.cross_entropy(out2[start:].double(), out1[start:].argmax(1))
    weight = 0.1 * math.exp(-5 * (1 - 50 / 200) ** 2)
    for key, value in (("loss/supervised1", sup1), ("loss/supervised2", sup2), ("loss/cps1", cps1),
                       ("loss/cps2", cps2), ("weight/consistency", weight)):
        assert float(step.logs[key]) == pytest.approx(float(value), rel=1e-5), key
    assert step.loss.item() == pytest.approx((sup1 + sup2 + weight * (cps1 + cps2)).item(), rel=1e-5)


def test_pseudo_labels_carry_no_gradient_to_the_network_that_made_them() -> None:
    torch.manual_seed(0)
    method = CPS(CPSParams(consistency_rampup=0), SPEC_3D).eval()
    step = method.train_step(_batch(), StepContext(1, 10))
    # only the cps1 term, CE(net1, argmax net2): net2 gets no gradient from it
    cps1 = F.cross_entropy(method.net1(_batch().images)[2:], method.net2(_batch().images)[2:].detach().argmax(1))
    assert cps1.item() == pytest.approx(step.logs["loss/cps1"].item(), rel=1e-5)
    cps1.backward()
    assert all(p.grad is None for p in method.net2.parameters())
    step.loss.backward()
    assert all(p.grad is not None for p in method.net2.parameters())


def test_no_unlabelled_images_leave_only_the_supervised_terms() -> None:
    torch.manual_seed(0)
    step = CPS(CPSParams(), SPEC_3D).train_step(_batch(2, 0), StepContext(1, 10))
    assert step.logs["loss/cps1"].item() == 0 and step.loss.item() == pytest.approx(
        (step.logs["loss/supervised1"] + step.logs["loss/supervised2"]).item())


def test_ramp_is_evaluated_at_the_zero_based_iteration() -> None:
    method = CPS(CPSParams(), SPEC_3D)
    assert method.consistency_weight(StepContext(150, 30000)) == pytest.approx(0.1 * math.exp(-5))
    assert method.consistency_weight(StepContext(151, 30000)) == pytest.approx(0.1 * math.exp(-5 * (199 / 200) ** 2))
    # the 200-epoch ramp spans the whole 30k run: the last update is still in epoch 199
    assert method.consistency_weight(StepContext(30000, 30000)) == pytest.approx(0.1 * math.exp(-5 / 200 ** 2))


def test_presets_and_the_evaluated_network() -> None:
    la = build_config("cps", preset="la-8")
    assert (la.labeled, la.iterations, la.batch_labeled, la.batch_unlabeled, la.patch_size) == (8, 30000, 2, 2,
                                                                                              (112, 112, 80))
    assert (la.optimizer, la.lr, la.lr_schedule) == ("sgd", 0.01, "poly")
    assert learning_rate(la, 2) == pytest.approx(0.01 * (1 - 1 / 30000) ** 0.9)
    acdc = build_config("cps", preset="acdc-7")
    assert (acdc.labeled, acdc.batch_labeled, acdc.batch_unlabeled, acdc.patch_size) == (7, 12, 12, (256, 256))
    assert build_config("cps", preset="acdc-3").labeled == 3
    method = CPS(CPSParams(evaluated_network=2), SPEC_3D)
    assert method.inference_network() is method.net2 and isinstance(method.net2, VNet)
    assert CPS(CPSParams(), SPEC_3D).inference_network() is not method.net1
    keys = method.state_dict().keys()  # both networks are checkpointed, and both are trained
    assert any(k.startswith("net1.") for k in keys) and any(k.startswith("net2.") for k in keys)
    assert len(method.trainable_parameters()) == 2 * len(list(method.net1.parameters()))


def test_cli_trains_the_la_preset_on_synthetic_data(tmp_path: Path, tiny_synthetic: str) -> None:
    run = tmp_path / "run"
    semiseg("train", "--method", "cps", "--preset", "la-8", "--data", tiny_synthetic, "--labeled", "2",
            "--iterations", "3", "--out", str(run), "--set", "patch_size=32,32,16", "--set", "stride=16,16,8",
            "--set", "n_filters=4", "--set", "num_workers=0", "--set", "log_every=1", "--quiet")
    records = [json.loads(line) for line in (run / "metrics.jsonl").read_text().splitlines()]
    assert len(records) == 3 and all(r["loss/cps1"] > 0 and r["loss/cps2"] > 0 for r in records)
    assert records[0]["weight/consistency"] == pytest.approx(0.1 * math.exp(-5))
    summary = evaluate_checkpoint(run, tmp_path / "eval", device="cpu")
    assert summary["protocol"]["inference"]["evaluated_output"] == "cps: network 1 of the two"
    assert 0 <= summary["metrics"]["dice"]["mean"] <= 1


def test_acdc_preset_trains_and_evaluates_per_class(tmp_path: Path) -> None:
    root = write_synthetic_acdc(tmp_path / "acdc", patients=6, shape=(3, 40, 36))
    run = tmp_path / "run"
    semiseg("train", "--method", "cps", "--preset", "acdc-3", "--data", str(root), "--labeled", "2",
            "--iterations", "2", "--out", str(run), "--set", "patch_size=32,32", "--set", "batch_labeled=2",
            "--set", "batch_unlabeled=2", "--set", "num_workers=0", "--set", "log_every=1", "--quiet")
    records = [json.loads(line) for line in (run / "metrics.jsonl").read_text().splitlines()]
    assert len(records) == 2 and all(math.isfinite(r["loss/cps1"]) for r in records)
    summary = evaluate_checkpoint(run, tmp_path / "eval", split="val", device="cpu")
    assert summary["protocol"]["dataset"]["class_names"] == ["background", "RV", "Myo", "LV"]
    assert {f"dice_class{c}" for c in (1, 2, 3)} <= set(summary["metrics"])


@pytest.mark.la
def test_a_few_steps_on_real_la_cases(la_root: Path) -> None:
    batch = real_la_batch(la_root, (32, 32, 32))
    torch.manual_seed(0)
    method = CPS(CPSParams(), NetSpec(1, 2, 3, 4)).train()
    optimizer = torch.optim.SGD(method.trainable_parameters(), lr=0.01, momentum=0.9)
    for step in train_steps(method, batch, optimizer, 30000):
        assert math.isfinite(step.loss.item()) and step.logs["loss/cps1"].item() > 0
