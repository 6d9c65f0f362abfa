"""DTC: the on-device distance transforms and signed distance map against scipy / scikit-image, the dual-head
VNet, each loss term against a direct computation, presets, and short trainings (CLI on synthetic data, real LA)."""

from __future__ import annotations

import json
import math
from pathlib import Path

import numpy as np
import pytest
import torch
from scipy import ndimage
from skimage.segmentation import find_boundaries
from torch import nn

from helpers import real_la_batch, semiseg, train_steps
from semiseg.config import build_config
from semiseg.data.loader import Batch
from semiseg.engine.evaluate import evaluate_checkpoint
from semiseg.engine.trainer import learning_rate
from semiseg.errors import ConfigError
from semiseg.methods._sdf import distance_transform, signed_distance_map, squared_distance_to
from semiseg.methods.base import NetSpec, StepContext
from semiseg.methods.dtc import DTC, DTCParams
from semiseg.nets import count_parameters
from semiseg.nets.dtc import SDFVNet

SPEC = NetSpec(in_channels=1, num_classes=2, spatial_dims=3, n_filters=4)


def official_sdf(masks: np.ndarray) -> np.ndarray:
    """DTC's `compute_sdf`, written out with scipy and scikit-image (the test oracle)."""
    out = np.zeros(masks.shape)
    for b, posmask in enumerate(masks.astype(bool)):
        if posmask.any():
            negmask = ~posmask
            posdis = ndimage.distance_transform_edt(posmask)
            negdis = ndimage.distance_transform_edt(negmask)
            boundary = find_boundaries(posmask, mode="inner").astype(np.uint8)
            sdf = ((negdis - negdis.min()) / (negdis.max() - negdis.min())
                   - (posdis - posdis.min()) / (posdis.max() - posdis.min()))
            sdf[boundary == 1] = 0
            out[b] = sdf
    return out


def _blobs(shape: tuple[int, ...], n: int, seed: int) -> np.ndarray:
    rng = np.random.default_rng(seed)
    smooth = ndimage.gaussian_filter(rng.standard_normal((n, *shape)), (0, *[2.0] * len(shape)))
    return smooth > 0.3 * smooth.std()


# ---------------------------------------------------------------- distance transforms and the SDF


@pytest.mark.parametrize("shape", [(17, 13, 9), (23, 31)])
def test_distance_transform_is_scipys_exact_edt(shape: tuple[int, ...]) -> None:
    masks = _blobs(shape, 3, 0)
    ours = distance_transform(torch.from_numpy(masks)).numpy()
    for mask, got in zip(masks, ours, strict=True):
        np.testing.assert_allclose(got, ndimage.distance_transform_edt(mask), rtol=0, atol=1e-5)
    assert torch.isinf(squared_distance_to(torch.zeros(1, 4, 5, dtype=torch.bool))).all()


def test_distance_transform_works_in_blocks_along_long_lines(monkeypatch: pytest.MonkeyPatch) -> None:
    import semiseg.methods._sdf as sdf_module

    masks = torch.from_numpy(_blobs((12, 10, 8), 2, 1))
    whole = distance_transform(masks)
    monkeypatch.setattr(sdf_module, "_BLOCK_ELEMENTS", 150)  # one line (n^2 = 144) per block
    assert torch.equal(distance_transform(masks), whole)


@pytest.mark.parametrize("shape", [(20, 18, 12), (32, 28)])
def test_signed_distance_map_matches_the_official_compute_sdf(shape: tuple[int, ...]) -> None:
    masks = _blobs(shape, 3, 2)
    masks[0, ...] = False  # an empty label: all zeros
    border = np.zeros(shape, dtype=bool)
    border[: shape[0] // 2] = True  # an object touching the array border on three sides
    masks[1] = border
    ours = signed_distance_map(torch.from_numpy(masks)).numpy()
    np.testing.assert_allclose(ours, official_sdf(masks), rtol=0, atol=1e-6)
    assert ours[2].min() == pytest.approx(-1) and ours[2].max() == pytest.approx(1)
    assert ours.dtype == np.float32


def test_a_label_without_background_gives_zeros_not_nan() -> None:
    full = torch.ones(1, 6, 6, 4, dtype=torch.bool)
    assert torch.equal(signed_distance_map(full), torch.zeros(1, 6, 6, 4))


# ---------------------------------------------------------------- network


def test_dual_head_vnet_has_the_official_parameter_count_and_sigmoid_logits() -> None:
    assert count_parameters(SDFVNet(1, 16)) == 9_448_866
    assert "net.sdf_head.weight" in DTC(DTCParams(), SPEC).state_dict()
    torch.manual_seed(0)
    net = SDFVNet(1, 4).eval()
    x = torch.randn(2, 1, 16, 16, 16)
    logit, sdf = net.forward_both(x)
    assert logit.shape == sdf.shape == (2, 1, 16, 16, 16) and sdf.abs().max() < 1
    probs = net(x).softmax(1)
    torch.testing.assert_close(probs[:, 1:], torch.sigmoid(logit))
    torch.testing.assert_close(probs[:, :1], 1 - torch.sigmoid(logit))


def test_dtc_refuses_2d_or_multiclass_data() -> None:
    with pytest.raises(ConfigError, match="one foreground class in 3D"):
        DTC(DTCParams(), NetSpec(1, 4, 2))
    with pytest.raises(ConfigError, match="3 classes"):
        DTC(DTCParams(), NetSpec(1, 3, 3, 4))


# ---------------------------------------------------------------- losses


class FixedHeads(nn.Module):
    """Stand-in network: fixed per-voxel logits and level-set outputs, with gradients to both."""

    def __init__(self, logit: torch.Tensor, sdf: torch.Tensor) -> None:
        super().__init__()
        self.logit = nn.Parameter(logit.clone())
        self.sdf = nn.Parameter(sdf.clone())

    def forward_both(self, x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        return self.logit[:, None], self.sdf[:, None]


def test_every_loss_term_matches_a_direct_computation() -> None:
    torch.manual_seed(0)
    shape = (3, 12, 10, 8)  # 2 labelled + 1 unlabelled
    logit, sdf = torch.randn(shape) * 2, torch.rand(shape) * 0.02 - 0.01
    labels = torch.from_numpy(_blobs(shape[1:], 2, 3)).long()
    method = DTC(DTCParams(bce_weight=0.5), SPEC)
    method.net = FixedHeads(logit, sdf)
    batch = Batch(torch.zeros(2, 1, *shape[1:]), labels, torch.zeros(1, 1, *shape[1:]), torch.arange(2))
    ctx = StepContext(1 + 150 * 7, 6000)
    step = method.train_step(batch, ctx)

    p, g = torch.sigmoid(logit[:2]).double(), labels.double()
    dice = 1 - (2 * (p * g).sum() + 1e-5) / ((p ** 2).sum() + (g ** 2).sum() + 1e-5)
    target = torch.from_numpy(official_sdf(labels.numpy().astype(bool)))
    mse = ((sdf[:2].double() - target) ** 2).mean()
    bce = -(g * torch.log(p) + (1 - g) * torch.log(1 - p)).mean()
    consistency = ((1 / (1 + torch.exp(1500 * sdf.double())) - torch.sigmoid(logit.double())) ** 2).mean()
    weight = math.exp(-5 * (1 - 7 / 40) ** 2)  # epoch 7 of the 40-epoch ramp, from the 0-based iteration
    assert step.logs["loss/dice"].item() == pytest.approx(dice.item(), rel=1e-5)
    assert step.logs["loss/sdf"].item() == pytest.approx(mse.item(), rel=1e-5)
    assert step.logs["loss/bce"].item() == pytest.approx(bce.item(), rel=1e-5)
    assert step.logs["loss/consistency"].item() == pytest.approx(consistency.item(), rel=1e-5)
    assert step.logs["weight/consistency"].item() == pytest.approx(weight)
    expected = dice + 0.3 * mse + 0.5 * bce + weight * consistency
    assert step.loss.item() == pytest.approx(expected.item(), rel=1e-5)
    # the official weight of the BCE is 0: computed, logged, not trained on
    method = DTC(DTCParams(), SPEC)
    method.net = FixedHeads(logit, sdf)
    assert method.train_step(batch, ctx).loss.item() == pytest.approx((dice + 0.3 * mse + weight * consistency).item(),
                                                                      rel=1e-5)


def test_consistency_reaches_the_unlabelled_voxels_and_the_supervised_terms_only_the_labelled() -> None:
    torch.manual_seed(0)
    shape = (3, 8, 8, 8)
    labels = torch.from_numpy(_blobs(shape[1:], 2, 4)).long()
    batch = Batch(torch.zeros(2, 1, *shape[1:]), labels, torch.zeros(1, 1, *shape[1:]), torch.arange(2))
    logit, sdf = torch.randn(shape), torch.rand(shape) * 0.01
    grads = {}
    for consistency in (1.0, 0.0):
        method = DTC(DTCParams(consistency=consistency, consistency_rampup=0), SPEC)
        method.net = FixedHeads(logit, sdf)
        method.train_step(batch, StepContext(1, 10)).loss.backward()
        grads[consistency] = (method.net.logit.grad, method.net.sdf.grad)
    assert all(g[2].abs().sum() > 0 for g in grads[1.0])  # the unlabelled sample is reached by the consistency
    assert all(g[2].abs().sum() == 0 and g[:2].abs().sum() > 0 for g in grads[0.0])  # Dice + SDF: labelled only


def test_presets_carry_the_official_recipe() -> None:
    cfg = build_config("dtc", preset="la-16")
    assert (cfg.labeled, cfg.iterations, cfg.batch_labeled, cfg.batch_unlabeled) == (16, 6000, 2, 2)
    assert (cfg.optimizer, cfg.lr, cfg.lr_schedule, cfg.post_lcc) == ("sgd", 0.01, "step", True)
    assert learning_rate(cfg, 2500) == pytest.approx(0.01) and learning_rate(cfg, 2501) == pytest.approx(0.001)
    params = cfg.method_params()
    assert (params.beta, params.consistency, params.consistency_rampup, params.transform_k) == (0.3, 1.0, 40.0, 1500)
    assert build_config("dtc", preset="la-8").labeled == 8


# ---------------------------------------------------------------- training


def test_cli_trains_the_la_preset_on_synthetic_data(tmp_path: Path, tiny_synthetic: str) -> None:
    run = tmp_path / "run"
    semiseg("train", "--method", "dtc", "--preset", "la-8", "--data", tiny_synthetic, "--labeled", "2",
            "--iterations", "3", "--out", str(run), "--set", "patch_size=32,32,16", "--set", "stride=16,16,8",
            "--set", "n_filters=4", "--set", "num_workers=0", "--set", "log_every=1", "--quiet")
    records = [json.loads(line) for line in (run / "metrics.jsonl").read_text().splitlines()]
    assert len(records) == 3 and all(0 < r["loss/sdf"] < 1 and math.isfinite(r["loss/consistency"]) for r in records)
    assert records[0]["weight/consistency"] == pytest.approx(math.exp(-5))
    summary = evaluate_checkpoint(run, tmp_path / "eval", device="cpu")
    assert summary["protocol"]["method"] == "dtc" and summary["protocol"]["inference"]["post_lcc"] is True
    assert 0 <= summary["metrics"]["dice"]["mean"] <= 1


@pytest.mark.la
def test_a_few_steps_on_real_la_cases(la_root: Path) -> None:
    batch = real_la_batch(la_root, (32, 32, 32))
    target = signed_distance_map(batch.label_labeled == 1).numpy()
    np.testing.assert_allclose(target, official_sdf(batch.label_labeled.numpy()), atol=1e-6)
    torch.manual_seed(0)
    method = DTC(DTCParams(), NetSpec(1, 2, 3, 4)).train()
    optimizer = torch.optim.SGD(method.trainable_parameters(), lr=0.01, momentum=0.9)
    for step in train_steps(method, batch, optimizer, 6000):
        assert math.isfinite(step.loss.item()) and 0 <= step.logs["loss/dice"].item() <= 1
