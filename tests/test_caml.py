"""CAML: network sizes, CMA mixing, memory bank, OCC against a literal reference, training and resume."""

from __future__ import annotations

import copy
import math
from pathlib import Path

import numpy as np
import pytest
import torch

from semiseg.config import build_config
from semiseg.data.loader import Batch
from semiseg.engine.losses import sharpen
from semiseg.methods.base import NetSpec, StepContext
from semiseg.methods.caml import CAML, CAMLParams, default_ramp_length
from semiseg.nets import count_parameters
from semiseg.nets.caml import CAMLNet, CrossSampleAttention, FeatureHead

SMALL = {"num_filtered": 300, "memory_num": 32}


def _method(**params: object) -> CAML:
    return CAML(CAMLParams(**{**SMALL, **params}), NetSpec(n_filters=4))


def _batch(seed: int = 0, shape: tuple[int, int, int] = (32, 32, 16)) -> Batch:
    """Two labelled + two unlabelled volumes: a bright noisy ellipsoid on a dark background."""
    g = torch.Generator().manual_seed(seed)
    grid = torch.stack(torch.meshgrid(*[torch.linspace(-1, 1, s) for s in shape], indexing="ij"))
    centres = torch.rand(4, 3, 1, 1, 1, generator=g) * 0.4 - 0.2
    label = ((grid[None] - centres).square().sum(1) < 0.6).long()
    image = (label.float() + 0.4 * torch.randn(4, *shape, generator=g))[:, None]
    return Batch(image[:2], label[:2], image[2:], torch.tensor([1, 0]))


def test_parameter_count_matches_official() -> None:
    net = CAMLNet()
    assert count_parameters(net) == 20_128_836
    assert count_parameters(net.f_v.encoder) == 7_376_896
    assert count_parameters(net.f_a.encoder) == 7_773_440
    assert count_parameters(net.f_a.encoder.x4_transform.intra_sample) == 198_272
    assert count_parameters(net.f_v.decoder) == 2_071_970
    assert count_parameters(net.f_a.decoder) == 2_898_850
    assert count_parameters(net.projection_v) == 1_664
    assert count_parameters(net.prediction_a) == 2_176
    method = CAML(CAMLParams(), NetSpec())
    assert count_parameters(method) == 20_128_836  # the bank is buffers, not parameters
    assert method.inference_network() is method.net.f_v
    assert count_parameters(method.inference_network()) == 9_448_866


def test_common_norm_and_dropout_keys_reach_both_networks() -> None:
    """`--set dropout=0` / `--set norm=...` change f_v and f_a; CMA keeps its own dropout of 0.5."""
    net = CAML(CAMLParams(), NetSpec(n_filters=4, norm="instancenorm", dropout=0.0)).net
    for vnet in (net.f_v, net.f_a):
        assert isinstance(vnet.encoder.dropout, torch.nn.Identity)
        assert isinstance(vnet.decoder.dropout, torch.nn.Identity)
    assert not any(isinstance(m, torch.nn.BatchNorm3d) for m in net.modules())
    assert any(isinstance(m, torch.nn.InstanceNorm3d) for m in net.modules())
    assert net.f_a.encoder.x4_transform.intra_sample.dropout.p == 0.5


def test_output_shapes() -> None:
    net = CAMLNet(n_filters=4, head_dim=8)
    out = net(torch.randn(4, 1, 32, 32, 16))
    assert out.seg_v.shape == out.seg_a.shape == (4, 2, 32, 32, 16)
    assert out.emb_v.shape == out.emb_a.shape == (4, 4, 32, 32, 16)
    rows = out.emb_v.movedim(1, -1).reshape(-1, 4)
    assert net.embed_v(rows).shape == net.embed_a(rows).shape == (4 * 32 * 32 * 16, 8)
    net.eval()
    assert net.f_v(torch.randn(1, 1, 32, 32, 16)).shape == (1, 2, 32, 32, 16)


def _changed(a: torch.Tensor, b: torch.Tensor) -> torch.Tensor:
    """[B, H, W, D] map of the positions whose output moved."""
    return ((a - b).abs().amax(1) > 1e-6)


def test_cma_mixes_samples_only_at_the_same_position() -> None:
    torch.manual_seed(0)
    cma = CrossSampleAttention(16, dropout=0.0).train()
    x = torch.randn(4, 16, 4, 3, 2)
    x_perturbed = x.clone()
    x_perturbed[0, :, 1, 2, 0] += 1.0

    inter_only = copy.deepcopy(cma)
    inter_only.intra_sample = torch.nn.Identity()
    moved = _changed(inter_only(x), inter_only(x_perturbed))
    expected = torch.zeros_like(moved)
    expected[:, 1, 2, 0] = True  # every sample, at the perturbed position only
    assert torch.equal(moved, expected)

    intra_only = copy.deepcopy(cma)
    intra_only.inter_sample = torch.nn.Identity()
    moved = _changed(intra_only(x), intra_only(x_perturbed))
    assert moved[0].all() and not moved[1:].any()  # the whole perturbed sample, no other sample

    moved = _changed(cma(x), cma(x_perturbed))
    assert moved.all()  # intra then inter: one voxel reaches every position of every sample

    cma.eval()
    assert torch.equal(cma(x), x)


def test_cma_with_dropout_is_random_in_training_and_identity_in_eval() -> None:
    cma = CrossSampleAttention(16).train()
    x = torch.randn(4, 16, 2, 2, 2)
    torch.manual_seed(1)
    a = cma(x)
    torch.manual_seed(1)
    assert torch.equal(a, cma(x))
    assert not torch.allclose(a, cma(x))
    assert torch.equal(cma.eval()(x), x)


def test_masked_batchnorm_equals_batchnorm_on_the_selected_rows() -> None:
    torch.manual_seed(0)
    head = FeatureHead(6, 8).train()
    reference = copy.deepcopy(head)
    rows = torch.randn(40, 6, requires_grad=True)
    mask = torch.rand(40) > 0.4
    out = head(rows, mask)
    ref_rows = rows.detach()[mask].requires_grad_()
    ref = reference(ref_rows)
    torch.testing.assert_close(out[mask], ref)
    torch.testing.assert_close(head.bn.running_mean, reference.bn.running_mean)
    torch.testing.assert_close(head.bn.running_var, reference.bn.running_var)
    (out[mask] ** 2).sum().backward()
    (ref ** 2).sum().backward()
    torch.testing.assert_close(rows.grad[mask], ref_rows.grad)
    assert rows.grad[~mask].abs().sum() == 0
    torch.testing.assert_close(head.fc1.weight.grad, reference.fc1.weight.grad)
    torch.testing.assert_close(head.fc1.bias.grad, reference.fc1.bias.grad)  # ~0: BatchNorm cancels it
    # Running statistics are used when asked, whatever the mode, and are not updated then.
    before = head.bn.running_mean.clone()
    torch.testing.assert_close(head(rows, running_stats=True), copy.deepcopy(head).eval()(rows))
    assert torch.equal(head.bn.running_mean, before)


def test_heads_run_in_at_least_float32() -> None:
    """bf16 activations (autocast) reach the heads in float32; a float64 run (the golden fixtures) stays float64."""
    head = FeatureHead(6, 8).train()
    assert head(torch.randn(10, 6).bfloat16()).dtype == torch.float32
    head64 = FeatureHead(6, 8).double().train()
    assert head64(torch.randn(10, 6, dtype=torch.float64), torch.rand(10) > 0.3).dtype == torch.float64


def _probs(logit: torch.Tensor) -> torch.Tensor:
    return torch.stack([1 - logit.sigmoid(), logit.sigmoid()], 1)


def test_memory_bank_stores_only_voxels_both_models_got_right() -> None:
    torch.manual_seed(0)
    method = _method().eval()  # heads' running statistics are what the official code projects with
    method.net.projection_v.bn.running_mean.uniform_(-1, 1)
    method.net.projection_a.bn.running_var.uniform_(0.5, 2)
    shape = (2, 3, 8)
    label = torch.randint(0, 2, (2, *shape))
    pred_v, pred_a = torch.randint(0, 2, (2, *shape)), torch.randint(0, 2, (2, *shape))
    emb_v, emb_a = torch.randn(2, 4, *shape), torch.randn(2, 4, *shape)
    method.update_memory(emb_v, emb_a, pred_v, pred_a, label, torch.tensor([2, 0]), n_slots=3)

    correct = (pred_v == label) & (pred_a == label)
    assert 0 < correct.sum() < correct.numel()
    stored = method.memory_labels
    assert stored.shape == (3, 48) and stored.dtype == torch.int8
    assert torch.equal(stored[2], torch.where(correct[0], label[0], -1).flatten().to(torch.int8))
    assert torch.equal(stored[0], torch.where(correct[1], label[1], -1).flatten().to(torch.int8))
    assert (stored[1] == -1).all()  # untouched slot

    # Official layout (Q1): f_a's row for voxel 0 is 4 consecutive depth positions of channel 0.
    heads = copy.deepcopy(method.net).eval()
    g_v = heads.projection_v(emb_v[None, 0, :, 0, 0, 0])
    g_a = heads.projection_a(emb_a[None, 0, 0, 0, 0, :4])
    torch.testing.assert_close(method.memory_features[2, :1], (g_v + g_a) / 2)
    rows_a = emb_a.reshape(-1, 4)  # the scrambled rows, in voxel order
    expected = (heads.projection_v(emb_v.movedim(1, -1).reshape(-1, 4)) + heads.projection_a(rows_a)) / 2
    torch.testing.assert_close(method.memory_features[[2, 0]].reshape(-1, 32), expected)

    clean = _method(memory_feature_layout="channels_last").eval()
    clean.net.load_state_dict(method.net.state_dict())
    clean.update_memory(emb_v, emb_a, pred_v, pred_a, label, torch.tensor([2, 0]), n_slots=3)
    expected = (heads.projection_v(emb_v[None, 0, :, 0, 0, 1]) + heads.projection_a(emb_a[None, 0, :, 0, 0, 1])) / 2
    torch.testing.assert_close(clean.memory_features[2, 1:2], expected)

    # The same case twice in one batch: the later sample is stored, as the official loop does.
    method.update_memory(emb_v, emb_a, pred_v, pred_a, label, torch.tensor([1, 1]), n_slots=3)
    assert torch.equal(method.memory_labels[1], stored[0])


def test_memory_sampling_is_per_class_without_replacement() -> None:
    method = _method(memory_num=5)
    labels = torch.full((3, 10), -1, dtype=torch.int8)
    labels[0, :4] = 1
    labels[2, 3:9] = 0
    labels[1, 7:] = 1
    method.memory_labels = labels
    ids = torch.arange(30.0).reshape(3, 10, 1)
    method.memory_features = torch.cat([ids, labels[..., None].float(), torch.zeros(3, 10, 30)], -1)
    for seed in range(5):
        torch.manual_seed(seed)
        memory, available = method.sample_memory()
        assert memory.shape == (2, 5, 32)
        assert available.tolist() == [True, True]
        for c in range(2):
            assert (memory[c, :, 1] == c).all()
            assert len(set(memory[c, :, 0].tolist())) == 5
    labels[2, 3:5] = -1  # 4 background entries left: fewer than memory_num
    _, available = method.sample_memory()
    assert available.tolist() == [False, True]


def _reference_occ(net: CAMLNet, emb_v: torch.Tensor, emb_a: torch.Tensor, prob_v: torch.Tensor,
                   prob_a: torch.Tensor, memory: torch.Tensor, memory_ok: list[bool], k: int, tau: float,
                   bn_rows: str) -> torch.Tensor:
    """The spec's steps 6-8 written literally: boolean selection, sort, per-class concatenation."""
    confidence, label = prob_v.max(1)
    agree = label == prob_a.argmax(1)
    f_v, f_a = emb_v.movedim(1, -1)[agree], emb_a.movedim(1, -1)[agree]
    ell, s = label[agree], confidence[agree]
    keep = []
    for c in range(2):
        rows = torch.nonzero(ell == c).flatten()
        rows = rows[torch.argsort(s[rows], descending=True)][:k]
        if len(rows) > 1:
            keep.append(rows)
    if bn_rows == "all_agreed":
        z_v, z_a = net.embed_v(f_v), net.embed_a(f_a)
        groups = [(z_v[r], z_a[r]) for r in keep]
    else:
        allrows = torch.cat(keep)
        z_v, z_a = net.embed_v(f_v[allrows]), net.embed_a(f_a[allrows])
        sizes = [len(r) for r in keep]
        groups = list(zip(z_v.split(sizes), z_a.split(sizes), strict=True))
    mats_v, mats_a = [], []
    for zv, za in groups:
        bank = torch.cat([memory[c] for c in range(2) if memory_ok[c]])
        mats_v.append(torch.softmax(zv @ bank.T / tau, 1))
        mats_a.append(torch.softmax(za @ bank.T / tau, 1))
    r_v, r_a = torch.cat(mats_v), torch.cat(mats_a)
    return (-(r_a * torch.log(r_v + 1e-8)).sum(1)).mean()


@pytest.mark.parametrize(("bn_rows", "memory_ok"), [("all_agreed", [True, True]), ("topk_only", [True, True]),
                                                    ("all_agreed", [False, True])])
def test_occ_matches_literal_reference(bn_rows: str, memory_ok: list[bool]) -> None:
    torch.manual_seed(0)
    method = _method(num_filtered=40, head_bn_rows=bn_rows).train()
    reference = copy.deepcopy(method.net)
    shape = (2, 6, 5, 4)
    logit_v = torch.randn(shape) * 2 + 2.5  # mostly foreground: background has fewer rows than K
    prob_v, prob_a = _probs(logit_v), _probs(logit_v + torch.randn(shape))
    emb_v, emb_a = torch.randn(2, 4, *shape[1:]), torch.randn(2, 4, *shape[1:])
    memory = torch.randn(2, 32, 32)
    ok = torch.tensor(memory_ok)

    confidence, pred_v = prob_v.max(1)
    loss, rows = method.correlation_loss(emb_v, emb_a, confidence, pred_v, prob_a.argmax(1), memory, ok)
    expected = _reference_occ(reference, emb_v, emb_a, prob_v, prob_a, memory, memory_ok, 40, 0.1, bn_rows)
    torch.testing.assert_close(loss, expected, rtol=1e-5, atol=1e-5)
    agree = prob_v.argmax(1) == prob_a.argmax(1)
    per_class = [int((agree & (prob_v.argmax(1) == c)).sum()) for c in range(2)]
    assert per_class[0] < 40 < per_class[1]
    assert rows == per_class[0] + 40
    for mine, ref in ((method.net.projection_v, reference.projection_v),
                      (method.net.prediction_a, reference.prediction_a)):
        torch.testing.assert_close(mine.bn.running_mean, ref.bn.running_mean)
        torch.testing.assert_close(mine.bn.running_var, ref.bn.running_var)


def test_occ_is_zero_without_memory_or_rows() -> None:
    method = _method()
    confidence, pred = torch.rand(2, 4, 4, 4), torch.randint(0, 2, (2, 4, 4, 4))
    emb = torch.randn(2, 4, 4, 4, 4)
    loss, rows = method.correlation_loss(emb, emb, confidence, pred, pred, torch.randn(2, 32, 32),
                                         torch.tensor([False, False]))
    assert loss == 0 and rows == 0
    pred = torch.zeros(2, 4, 4, 4, dtype=torch.long)
    pred[0, 0, 0, 0] = 1  # a single foreground voxel: the class is skipped
    loss, rows = method.correlation_loss(emb, emb, confidence, pred, pred, torch.randn(2, 32, 32),
                                         torch.tensor([True, True]))
    assert torch.isfinite(loss) and rows == 127


def _grad_norms(method: CAML) -> dict[str, float]:
    parts = {"f_v.encoder": method.net.f_v.encoder, "f_v.decoder": method.net.f_v.decoder,
             "f_a.encoder": method.net.f_a.encoder, "f_a.cma": method.net.f_a.encoder.x4_transform,
             "f_a.decoder": method.net.f_a.decoder, "projection_v": method.net.projection_v,
             "projection_a": method.net.projection_a, "prediction_v": method.net.prediction_v,
             "prediction_a": method.net.prediction_a}
    return {name: sum(float(p.grad.abs().sum()) for p in part.parameters() if p.grad is not None)
            for name, part in parts.items()}


@pytest.mark.parametrize("detach", [False, True])
def test_occ_gradients_reach_both_submodels(detach: bool) -> None:
    torch.manual_seed(0)
    method = _method(occ_target_detach=detach).train()
    batch = _batch()
    out = method.net(batch.images)
    prob_v, prob_a = out.seg_v.softmax(1), out.seg_a.softmax(1)
    occ, rows = method.occ_loss(out, prob_v, prob_a, batch, n_slots=4)
    assert torch.isfinite(occ) and occ > 0 and rows > 0
    occ.backward()
    norms = _grad_norms(method)
    for name in ("f_v.encoder", "f_v.decoder", "projection_v", "prediction_v"):
        assert norms[name] > 0, name
    for name in ("f_a.encoder", "f_a.cma", "f_a.decoder", "projection_a", "prediction_a"):
        assert (norms[name] == 0) == detach, name  # Q4: official OCC trains f_a through its own target


def test_mutual_loss_reference_and_detach() -> None:
    prob_v = _probs(torch.randn(4, 3, 3, 2)).requires_grad_()
    prob_a = _probs(torch.randn(4, 3, 3, 2)).requires_grad_()
    loss = _method().mutual_loss(prob_v, prob_a)
    torch.testing.assert_close(loss, ((prob_v - sharpen(prob_a, 0.1)) ** 2).mean()
                               + ((prob_a - sharpen(prob_v, 0.1)) ** 2).mean())
    _method(mutual_target_detach=True).mutual_loss(prob_v, prob_a).backward()
    torch.testing.assert_close(prob_v.grad, 2 * (prob_v - sharpen(prob_a, 0.1)).detach() / prob_v.numel())


def test_quirk_switch_presets_and_ramp() -> None:
    official, corrected = CAMLParams(), CAMLParams(quirks="corrected")
    assert (official.memory_feature_layout, official.occ_target_detach, official.head_bn_rows) == (
        "official_scrambled", False, "all_agreed")
    assert (corrected.memory_feature_layout, corrected.occ_target_detach, corrected.mutual_target_detach,
            corrected.head_bn_rows) == ("channels_last", True, True, "topk_only")
    assert not CAMLParams(quirks="corrected", mutual_target_detach=False).mutual_target_detach
    for n, length in ((4, 40), (8, 20), (16, 15)):
        cfg = build_config("caml", preset=f"la-{n}")
        assert (cfg.labeled, cfg.params["consistency_rampup"], cfg.seed) == (n, length, 3407)
        assert default_ramp_length(n) == length
    cfg = build_config("caml", overrides={"labeled": 8, "iterations": 5})
    assert (cfg.iterations, cfg.lr, cfg.lr_schedule, cfg.method_params().consistency_rampup) == (
        5, 0.01, "constant", None)
    method = _method()
    method.occ_loss = lambda *args: (torch.zeros(()), torch.zeros(()))  # ramp only: skip OCC
    for iteration, n_labeled, expected in ((150, 8, math.exp(-5 * (1 - 1 / 20) ** 2)), (3000, 8, 1.0),
                                           (3000, 4, math.exp(-5 * 0.5 ** 2)), (2249, 16, math.exp(-5 / 225))):
        logs = method.train_step(_batch(), StepContext(iteration, 15000, n_labeled)).logs
        assert logs["weight/ramp"].item() == pytest.approx(expected)


def test_training_lowers_the_supervised_loss() -> None:
    torch.manual_seed(0)
    method = _method().train()
    optimizer = torch.optim.SGD(method.parameters(), lr=0.1, momentum=0.9, weight_decay=1e-4)
    batch = _batch(1)
    history = []
    for iteration in range(1, 13):
        step = method.train_step(batch, StepContext(iteration, 12, 2))
        optimizer.zero_grad()
        step.loss.backward()
        optimizer.step()
        history.append(float(step.logs["loss/supervised"]))
        assert all(torch.isfinite(v) for v in step.logs.values())
    assert np.mean(history[-3:]) < np.mean(history[:3]) - 0.1
    assert (method.memory_labels[:2] >= 0).any(1).all() and (method.memory_labels[2:] == -1).all()


def test_resume_restores_the_memory_bank_exactly() -> None:
    torch.manual_seed(0)
    method = _method().train()
    optimizer = torch.optim.SGD(method.parameters(), lr=0.01, momentum=0.9)

    def step(m: CAML, opt: torch.optim.Optimizer, iteration: int) -> torch.Tensor:
        out = m.train_step(_batch(iteration), StepContext(iteration, 3, 2))
        opt.zero_grad()
        out.loss.backward()
        opt.step()
        return out.loss.detach()

    step(method, optimizer, 1)
    state = copy.deepcopy((method.state_dict(), optimizer.state_dict(), torch.get_rng_state()))
    expected = step(method, optimizer, 2)
    resumed = _method().train()
    resumed.load_state_dict(state[0])
    assert resumed.memory_features.shape == (2, 32 * 32 * 16, 32)
    opt2 = torch.optim.SGD(resumed.parameters(), lr=0.01, momentum=0.9)
    opt2.load_state_dict(state[1])
    torch.set_rng_state(state[2])
    assert torch.equal(step(resumed, opt2, 2), expected)
    for key, value in method.state_dict().items():
        assert torch.equal(value, resumed.state_dict()[key]), key


def test_train_and_evaluate_through_the_engine(tmp_path: Path, tiny_synthetic: str) -> None:
    from semiseg.engine.checkpoint import load_checkpoint
    from semiseg.engine.evaluate import evaluate_checkpoint
    from semiseg.engine.trainer import Trainer

    cfg = build_config("caml", overrides={"data": tiny_synthetic, "labeled": 4, "iterations": 2, "n_filters": 4,
                                          "patch_size": (32, 32, 16), "stride": (16, 16, 16), "num_workers": 0,
                                          "log_every": 1, **SMALL})
    Trainer(cfg, tmp_path / "run", progress=False).run()
    state = load_checkpoint(tmp_path / "run" / "checkpoint.pt")["method"]
    assert state["memory_features"].shape == (4, 32 * 32 * 16, 32)
    assert (state["memory_labels"] >= 0).sum() > 0
    summary = evaluate_checkpoint(tmp_path / "run", tmp_path / "eval")
    assert len(summary["cases"]) == 2
    assert summary["protocol"]["inference"]["evaluated_output"].startswith("caml: f_v")


@pytest.mark.la
def test_short_real_la_run(la_root: Path) -> None:
    from semiseg.data import load_cases, open_dataset
    from semiseg.data.loader import TwoStreamBatches

    layout = open_dataset(la_root)
    split = layout.split(8)
    batches = TwoStreamBatches(load_cases(layout, split.labeled[:2], True), load_cases(layout, split.unlabeled[:2],
                               False), 2, 2, layout.train_transform((48, 48, 32), True), 3407, 0, 3)
    torch.manual_seed(3407)
    method = CAML(CAMLParams(), NetSpec(n_filters=4)).train()
    optimizer = torch.optim.SGD(method.parameters(), lr=0.01, momentum=0.9, weight_decay=1e-4)
    for iteration in range(1, 3):
        step = method.train_step(batches[iteration - 1], StepContext(iteration, 15000, 4))
        optimizer.zero_grad()
        step.loss.backward()
        optimizer.step()
        assert all(torch.isfinite(v) for v in step.logs.values())
    assert method.memory_labels.shape == (4, 48 * 48 * 32)
    assert step.logs["occ/rows"] > 0
    assert 0 < step.logs["loss/occ"] < 50
