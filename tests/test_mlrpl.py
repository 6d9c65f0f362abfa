"""MLRPL: network, masks, prototypes, reliability weights and the loss against a direct reference."""

from __future__ import annotations

import json
import math
from pathlib import Path

import numpy as np
import pytest
import torch
from torch import nn

from semiseg.config import build_config
from semiseg.data.loader import Batch
from semiseg.data.synthetic import make_case
from semiseg.engine.inference import sliding_window_probs, window_starts
from semiseg.engine.trainer import Trainer
from semiseg.methods import get_method
from semiseg.methods.base import NetSpec, StepContext
from semiseg.methods.mlrpl import (
    MLRPL,
    DecoderAverage,
    MLRPLParams,
    class_prototypes,
    directional_loss,
    prototype_similarity,
    reliability_weight,
)
from semiseg.nets import count_parameters

# Hand-made batch: 2 labelled + 1 unlabelled sample, 2 classes, a 2x2x1 patch (4 voxels), 3 features.
# Voxel (sample 0, v 3) is a tie (both decoders give the same logits); teacher decoder 2 predicts no
# foreground in sample 2.
LOGITS = [
    torch.tensor([[[0.2, -1.0, 0.5, 0.3], [1.0, 0.4, -0.5, 0.9]],
                  [[2.0, 0.1, -0.3, 0.0], [-1.0, 0.6, 0.8, 0.2]],
                  [[0.3, 0.9, -0.2, 1.1], [0.5, -0.4, 0.1, 0.6]]]),
    torch.tensor([[[-0.4, 0.7, 1.2, 0.3], [0.8, -0.2, 0.1, 0.9]],
                  [[1.1, -0.6, 0.0, 0.5], [0.2, 0.9, 1.5, -0.7]],
                  [[1.0, 0.8, 0.6, 1.4], [-0.3, 0.2, 0.1, 0.0]]]),
]
FEATURES = [
    torch.tensor([[[0.5, 0.0, 1.2, 0.3], [0.1, 0.9, 0.0, 0.4], [0.0, 0.3, 0.7, 1.0]],
                  [[1.0, 0.2, 0.0, 0.6], [0.3, 0.0, 0.8, 0.1], [0.7, 0.5, 0.2, 0.0]],
                  [[0.0, 0.4, 0.9, 0.2], [0.6, 0.1, 0.3, 0.8], [0.2, 0.0, 0.5, 0.7]]]),
    torch.tensor([[[0.9, 0.1, 0.0, 0.5], [0.0, 0.6, 0.4, 0.2], [0.3, 0.0, 1.1, 0.6]],
                  [[0.2, 0.8, 0.5, 0.0], [1.0, 0.0, 0.3, 0.4], [0.0, 0.7, 0.1, 0.9]],
                  [[0.4, 0.3, 0.0, 1.2], [0.1, 0.5, 0.6, 0.0], [0.8, 0.2, 0.0, 0.3]]]),
]
LABELS = torch.tensor([[1, 0, 0, 1], [0, 1, 1, 0]])
SHAPE = (2, 2, 1)


def _spatial(t: torch.Tensor) -> torch.Tensor:
    return t.reshape(*t.shape[:2], *SHAPE)


def reference_loss(params: MLRPLParams, iteration: int, n_labeled: int = 2) -> float:
    """MLRPL's loss written out voxel by voxel in float64 (spec section 3), for LOGITS / FEATURES."""
    z = [x.double().tolist() for x in LOGITS]
    f = [x.double().tolist() for x in FEATURES]
    n_samples, n_classes, n_voxels = LOGITS[0].shape
    n_feat = FEATURES[0].shape[1]

    def softmax(values: list[float]) -> list[float]:
        e = [math.exp(v - max(values)) for v in values]
        return [x / sum(e) for x in e]

    p = [[[softmax([z[k][b][c][v] for c in range(n_classes)]) for v in range(n_voxels)] for b in range(n_samples)]
         for k in range(2)]  # p[k][b][v][c]

    def uncertainty(probs: list[float]) -> float:
        if params.reliability_measure == "entropy":
            return -sum(q * math.log(q + 1e-6) for q in probs)
        return 1 - max(probs)

    supervised = 0.0
    for k in range(2):
        inter = sum(p[k][b][v][1] * LABELS[b][v].item() for b in range(n_labeled) for v in range(n_voxels))
        psum = sum(p[k][b][v][1] for b in range(n_labeled) for v in range(n_voxels))
        supervised += 1 - (2 * inter + 1e-8) / (psum + LABELS.sum().item() + 1e-8)
    start = 0 if params.pseudo_loss_on_labeled else n_labeled
    pseudo = 0.0
    for i, j in ((0, 1), (1, 0)):
        total, count, weight_total = 0.0, 0, 0.0
        for b in range(start, n_samples):
            hard = [max(range(n_classes), key=lambda c, v=v: p[j][b][v][c]) for v in range(n_voxels)]
            prototypes = []
            for c in range(n_classes):
                members = [v for v in range(n_voxels) if hard[v] == c]
                q = [sum(f[j][b][d][v] for v in members) / (len(members) + 1e-6) for d in range(n_feat)]
                norm = math.sqrt(sum(x * x for x in q))
                prototypes.append([x / norm for x in q] if norm > 0 else q)
            for v in range(n_voxels):
                if not uncertainty(p[i][b][v]) > uncertainty(p[j][b][v]):
                    continue
                feat = [f[j][b][d][v] for d in range(n_feat)]
                fnorm = math.sqrt(sum(x * x for x in feat))
                sims = [sum(a * q for a, q in zip(feat, proto, strict=True)) / fnorm for proto in prototypes]
                w = 1 - sum((s - p[j][b][v][c]) ** 2 for c, s in enumerate(sims)) / n_classes
                x = [z[i][b][c][v] for c in range(n_classes)] if params.pseudo_ce_input == "logits" else p[i][b][v]
                ce = -math.log(softmax(x)[hard[v]])
                total += ce * w
                count += 1
                weight_total += w
        pseudo += total / ((count if params.pseudo_loss_norm == "mask_count" else weight_total) + 1e-6)
    epoch = iteration // params.epoch_iterations
    beta = params.consistency * math.exp(-5 * (1 - min(epoch, params.consistency_rampup)
                                               / params.consistency_rampup) ** 2)
    return params.supervised_weight * supervised + beta * pseudo


def _method(params: MLRPLParams, n_filters: int = 4) -> MLRPL:
    return MLRPL(params, NetSpec(n_filters=n_filters))


def _hand_made_batch() -> Batch:
    return Batch(torch.zeros(2, 1, *SHAPE), _spatial(LABELS[:, None])[:, 0], torch.zeros(1, 1, *SHAPE),
                 torch.arange(2))


@pytest.mark.parametrize("options", [
    {"pseudo_ce_input": "probs"},
    {"pseudo_ce_input": "logits"},
    {"pseudo_ce_input": "logits", "pseudo_loss_on_labeled": False},
    {"pseudo_ce_input": "probs", "pseudo_loss_norm": "weight_sum", "reliability_measure": "max_prob"},
])
def test_loss_equals_direct_reference(options: dict, monkeypatch: pytest.MonkeyPatch) -> None:
    params = MLRPLParams(**options)
    method = _method(params)
    outputs = [(_spatial(z), _spatial(f)) for z, f in zip(LOGITS, FEATURES, strict=True)]
    monkeypatch.setattr(method, "decoder_outputs", lambda x: outputs)
    for iteration in (1, 3000, 7000):
        loss = method.train_step(_hand_made_batch(), StepContext(iteration, 15000)).loss
        assert loss.item() == pytest.approx(reference_loss(params, iteration), rel=1e-5, abs=1e-6)


def test_probs_and_logits_ce_differ() -> None:
    """Q1 matters: CE on probabilities is log-softmax(softmax(z)), bounded by log(1 + e) for 2 classes."""
    losses = {mode: reference_loss(MLRPLParams(pseudo_ce_input=mode), 6000) for mode in ("probs", "logits")}
    assert losses["probs"] != pytest.approx(losses["logits"], rel=1e-3)
    student = torch.tensor([[[-2.0], [2.0]]])
    teacher = torch.tensor([[[0.9999], [0.0001]]])  # more certain teacher of the other class; weight ~ 1
    feats = torch.tensor([[[0.3], [0.7], [0.1]]])
    expected = {"logits": -math.log(torch.tensor([-2.0, 2.0]).softmax(0)[0].item()),
                "probs": -math.log(torch.tensor([-2.0, 2.0]).softmax(0).softmax(0)[0].item())}
    for mode, value in expected.items():
        loss, mask, weight = directional_loss(student, student.softmax(1), teacher, feats,
                                              MLRPLParams(pseudo_ce_input=mode))
        assert mask.item() == 1 and weight.item() == pytest.approx(1 - 1e-4 ** 2, abs=1e-6)
        assert loss.item() == pytest.approx(value * weight.item(), rel=1e-5)
    assert expected["probs"] < math.log(1 + math.e) < expected["logits"]


def test_parameter_count_and_decoders() -> None:
    method = get_method("mlrpl")(MLRPLParams(), NetSpec())
    net = method.net
    assert count_parameters(method) == 12_347_716
    assert count_parameters(net.encoder) == 7_376_896
    assert [count_parameters(d) for d in net.decoders] == [2_071_970, 2_898_850]
    assert isinstance(net.decoders[0].up_five[0], nn.ConvTranspose3d)
    assert net.decoders[1].up_five[0].mode == "nearest"
    assert method.inference_network() is net  # evaluation = decoder 1
    trilinear = MLRPL(MLRPLParams(decoder2_upsample="trilinear"), NetSpec(n_filters=4))
    assert trilinear.net.decoders[1].up_five[0].mode == "trilinear"


def test_common_norm_and_dropout_keys_reach_the_network() -> None:
    """`--set dropout=0` / `--set norm=...` must change MLRPL's network, not be silently ignored."""
    net = MLRPL(MLRPLParams(), NetSpec(n_filters=4, norm="instancenorm", dropout=0.0)).net
    assert all(isinstance(d.dropout, nn.Identity) for d in net.decoders)
    assert isinstance(net.encoder.dropout, nn.Identity)
    assert not any(isinstance(m, nn.BatchNorm3d) for m in net.modules())
    assert any(isinstance(m, nn.InstanceNorm3d) for m in net.modules())
    default = _method(MLRPLParams()).net
    assert all(isinstance(d.dropout, nn.Dropout3d) and d.dropout.p == 0.5 for d in default.decoders)


def test_masks_complementary_except_ties() -> None:
    torch.manual_seed(0)
    z1, z2 = torch.randn(2, 2, 5, 4, 3), torch.randn(2, 2, 5, 4, 3)
    z2[:, :, 0] = z1[:, :, 0]  # exact ties on one slab
    feats = torch.rand(2, 4, 5, 4, 3)
    for measure in ("entropy", "max_prob"):
        params = MLRPLParams(reliability_measure=measure)
        p1, p2 = z1.softmax(1), z2.softmax(1)
        _, m12, _ = directional_loss(z1, p1, p2, feats, params)  # student 1, teacher 2
        _, m21, _ = directional_loss(z2, p2, p1, feats, params)
        assert torch.all(m12[:, 0] + m21[:, 0] == 0)  # ties: neither decoder teaches
        assert torch.all(m12[:, 1:] + m21[:, 1:] == 1)
        if measure == "entropy":  # teacher 2 teaches where its entropy is strictly lower
            h1, h2 = (-(p * (p + 1e-6).log()).sum(1) for p in (p1, p2))
            assert torch.equal(m12.bool(), h1 > h2)
        else:
            assert torch.equal(m12.bool(), p2.amax(1) > p1.amax(1))


def test_weights_in_unit_interval_and_detached() -> None:
    torch.manual_seed(1)
    z_s = torch.randn(3, 2, 6, 6, 4, requires_grad=True)
    z_t = torch.randn(3, 2, 6, 6, 4, requires_grad=True)
    feats = torch.randn(3, 8, 6, 6, 4).relu().requires_grad_()
    loss, mask, weight = directional_loss(z_s, z_s.softmax(1), z_t.softmax(1), feats, MLRPLParams())
    assert not weight.requires_grad and not mask.requires_grad
    assert weight.min() >= 0 and weight.max() <= 1
    assert torch.all(weight[mask == 0] == 0) and weight[mask == 1].min() > 0
    raw = reliability_weight(z_t.softmax(1), feats)
    assert not raw.requires_grad and raw.min() >= 0 and raw.max() <= 1
    loss.backward()
    assert z_s.grad is not None and z_s.grad.abs().sum() > 0
    assert z_t.grad is None and feats.grad is None  # teacher outputs carry no gradient


def test_prototypes_and_absent_class() -> None:
    feats = torch.tensor([[[1.0, 3.0, 0.0, 2.0], [0.0, 1.0, 2.0, 2.0]],
                          [[1.0, 0.0, 2.0, 1.0], [1.0, 2.0, 0.0, 1.0]]]).view(2, 2, 2, 2, 1)
    pseudo = torch.tensor([[0, 0, 1, 1], [0, 0, 0, 0]]).view(2, 2, 2, 1)  # sample 1: no foreground
    protos = class_prototypes(feats, pseudo, 2)
    expected0 = torch.tensor([2.0, 0.5]) / (1 + 1e-6)
    assert torch.allclose(protos[0, 0], expected0 / expected0.norm())
    assert torch.allclose(protos[0, 1], torch.tensor([1.0, 2.0]) / math.sqrt(5))
    assert torch.equal(protos[1, 1], torch.zeros(2))
    sim = prototype_similarity(feats, protos)
    assert sim.shape == (2, 2, 2, 2, 1)
    assert torch.equal(sim[1, 1], torch.zeros(2, 2, 1))
    f = feats.flatten(2)
    cos = torch.nn.functional.cosine_similarity(f[0, :, 2], protos[0, 1], dim=0, eps=1e-8)
    assert sim[0, 1].flatten()[2] == pytest.approx(cos.item(), abs=1e-6)
    # A zero feature vector gets zero similarity, not NaN.
    assert torch.equal(prototype_similarity(torch.zeros(1, 2, 3, 1, 1), protos[:1]), torch.zeros(1, 2, 3, 1, 1))


def test_pre_dropout_features_are_captured() -> None:
    torch.manual_seed(0)
    method = _method(MLRPLParams(prototype_features="teacher_pre_dropout"))
    method.train()
    x = torch.randn(2, 1, 16, 16, 16)
    outputs = method.decoder_outputs(x)
    assert len(outputs) == 2 and all(f.shape == (2, 4, 16, 16, 16) for _, f in outputs)
    assert all(not d.dropout._forward_hooks for d in method.net.decoders)  # hooks removed
    for _, feat in outputs:  # Dropout3d(0.5) zeroes whole channels after the hook, not before it
        assert feat.min() >= 0 and (feat.flatten(2).abs().sum(-1) > 0).all()


def _blob_batch(n: int, size: int = 32) -> tuple[torch.Tensor, torch.Tensor]:
    pairs = [make_case(0, i, (size, size, size)) for i in range(n)]
    return (torch.from_numpy(np.stack([im for im, _ in pairs]))[:, None],
            torch.from_numpy(np.stack([lb for _, lb in pairs])).long())


def test_iterations_lower_the_loss_and_update_every_part() -> None:
    torch.manual_seed(0)
    method = _method(MLRPLParams(pseudo_ce_input="logits"))
    images, labels = _blob_batch(4)
    batch = Batch(images[:2], labels[:2], images[2:], torch.arange(2))
    before = {k: v.clone() for k, v in method.state_dict().items()}
    optimizer = torch.optim.SGD(method.parameters(), lr=0.05, momentum=0.9, weight_decay=1e-4)
    method.train()
    losses = []
    for it in range(1, 16):
        step = method.train_step(batch, StepContext(6000 + it, 15000))
        optimizer.zero_grad()
        step.loss.backward()
        optimizer.step()
        losses.append(step.loss.item())
        assert 0 < step.logs["pseudo/mask_fraction"] <= 1 and 0 < step.logs["pseudo/mean_weight"] <= 1
    assert np.mean(losses[-3:]) < 0.8 * np.mean(losses[:3])
    after = method.state_dict()
    for part in ("net.encoder.block_one.0.weight", "net.decoders.0.out_conv.weight",
                 "net.decoders.1.out_conv.weight", "net.decoders.1.up_five.1.weight"):
        assert not torch.equal(before[part], after[part])


def test_decoder_average_modes() -> None:
    torch.manual_seed(0)
    method = _method(MLRPLParams(eval_output="average"))
    method.eval()
    net = method.inference_network()
    assert isinstance(net, DecoderAverage) and net.window_scores
    image = torch.randn(1, 16, 16, 24)
    patch, stride = (16, 16, 16), (16, 16, 8)
    # Official rule: foreground logit averaged over decoders, then over windows, > 0.5.
    score, count = torch.zeros(16, 16, 24), torch.zeros(16, 16, 24)
    with torch.no_grad():
        for z0 in window_starts(24, 16, 8):
            window = image[None, :, :, :, z0:z0 + 16]
            fg = torch.stack([zz[0, 1] for zz, _ in method.net.forward_all(window)]).mean(0)
            score[..., z0:z0 + 16] += fg
            count[..., z0:z0 + 16] += 1
    decision = sliding_window_probs(net, image, patch, stride).argmax(0)
    assert torch.equal(decision.bool(), score / count > 0.5)
    soft = DecoderAverage(method.net, "mean_softmax")
    assert not soft.window_scores
    with torch.no_grad():
        x = torch.randn(2, 1, 16, 16, 16)
        expected = torch.stack([zz.softmax(1) for zz, _ in method.net.forward_all(x)]).mean(0)
        assert torch.allclose(soft(x).softmax(1), expected, atol=1e-6)


def test_presets_carry_dataset_recipes() -> None:
    la = build_config("mlrpl", preset="la-16")
    assert (la.labeled, la.patch_size, la.stride, la.rot_flip) == (16, (112, 112, 80), (18, 18, 4), True)
    assert (la.iterations, la.lr, la.lr_schedule, la.checkpoint_selection) == (15000, 0.01, "constant", "last")
    assert (la.batch_labeled, la.batch_unlabeled) == (2, 2)
    pan = build_config("mlrpl", preset="pancreas-12")
    assert (pan.labeled, pan.patch_size, pan.stride, pan.rot_flip) == (12, (96,) * 3, (16,) * 3, False)
    assert (pan.iterations, pan.lr_schedule, pan.checkpoint_selection, pan.val) == (15000, "constant", "last", 0)
    assert build_config("mlrpl", preset="pancreas-6").labeled == 6
    brats = build_config("mlrpl", preset="brats-50")
    assert (brats.labeled, brats.stride, brats.val, brats.checkpoint_selection) == (50, (64,) * 3, 25, "best_on_val")
    assert (brats.patch_size, brats.rot_flip, brats.iterations, brats.lr_schedule) == ((96,) * 3, True, 30000,
                                                                                       "constant")
    assert build_config("mlrpl", preset="brats-25").labeled == 25
    assert MLRPL.presets.keys() == {"la-8", "la-16", "pancreas-6", "pancreas-12", "brats-25", "brats-50"}
    assert build_config("mlrpl", preset="la-8").method_params() == MLRPLParams()  # official defaults


def test_rejects_non_binary_or_2d_data() -> None:
    from semiseg.errors import ConfigError

    for spec in (NetSpec(num_classes=4), NetSpec(spatial_dims=2)):
        with pytest.raises(ConfigError, match="binary 3D"):
            MLRPL(MLRPLParams(), spec)


@pytest.mark.la
def test_short_real_la_run(la_root: Path, tmp_path: Path) -> None:
    cfg = build_config("mlrpl", preset="la-8", overrides={
        "data": str(la_root), "iterations": 3, "patch_size": (64, 64, 48), "n_filters": 4, "num_workers": 0,
        "device": "cpu", "log_every": 1, "checkpoint_every": 3})
    Trainer(cfg, tmp_path / "run", progress=False).run()
    records = [json.loads(line) for line in (tmp_path / "run" / "metrics.jsonl").read_text().splitlines()]
    assert [r["iteration"] for r in records] == [1, 2, 3]
    for r in records:
        assert math.isfinite(r["loss"]) and 0 <= r["loss/supervised"] <= 2 and r["loss/pseudo"] >= 0
        assert r["consistency_weight"] == pytest.approx(math.exp(-5))
    split = json.loads((tmp_path / "run" / "split.json").read_text())
    assert len(split["labeled"]) == 8 and len(split["unlabeled"]) == 72
