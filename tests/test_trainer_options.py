"""Trainer options beyond the basic loop: checkpoint selection rules, validation start, optimiser resets at a
method's stage switch, torch.compile of the networks, and a clean log after a resume."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch

from semiseg.config import build_config
from semiseg.engine.checkpoint import load_checkpoint
from semiseg.engine.evaluate import evaluate_checkpoint
from semiseg.engine.trainer import Trainer, compile_networks, truncate_log
from semiseg.errors import ConfigError
from semiseg.methods.base import NetSpec
from semiseg.methods.caml import CAML, CAMLParams

TINY = {"patch_size": "32,32,16", "stride": "16,16,8", "n_filters": 4, "num_workers": 0, "log_every": 1,
        "checkpoint_every": 100, "labeled": 2}


def _train(tmp_path: Path, data: str, method: str = "supervised", **sets: object) -> Path:
    out = tmp_path / method
    Trainer(build_config(method, None, {"data": data, **TINY, **sets}), out, progress=False).run()
    return out


def test_best_on_test_selects_on_the_test_cases_and_says_so(tmp_path: Path, tiny_synthetic: str) -> None:
    run = _train(tmp_path, tiny_synthetic, iterations=4, val_every=2, val_start=3,
                 checkpoint_selection="best_on_test")
    records = [json.loads(line) for line in (run / "metrics.jsonl").read_text().splitlines()]
    assert [r["iteration"] for r in records if "val_dice" in r] == [4]  # from val_start, every val_every, last
    summary = json.loads((run / "train_summary.json").read_text())
    assert summary["checkpoint_selection"] == "best_on_test" and summary["selection_cases"] == 2
    assert (run / "best.pt").is_file()
    card = evaluate_checkpoint(run, tmp_path / "eval")["protocol"]
    assert card["checkpoint"]["rule"] == "best_on_test" and "TEST cases" in card["checkpoint"]["how_chosen"]
    assert card["inference"]["evaluated_output"] == "supervised: the method's single network"
    best = evaluate_checkpoint(run, tmp_path / "eval-best", None, "test", "best")["protocol"]["checkpoint"]
    assert best["rule"] == "best_on_test"  # `--checkpoint best` names the cases the best was chosen on


def test_best_on_val_needs_validation_cases() -> None:
    with pytest.raises(ConfigError, match="val=N"):
        build_config("supervised", None, {"checkpoint_selection": "best_on_val"})


def test_bcp_self_training_starts_with_a_fresh_optimiser(tmp_path: Path, tiny_synthetic: str) -> None:
    """AdamW counts its steps: after a reset at the stage switch (iteration 2) the count restarts."""
    run = _train(tmp_path, tiny_synthetic, "bcp", iterations=3, pretrain_iterations=2, lr_step_start=2,
                 optimizer="adamw", checkpoint_every=3)
    steps = {float(s["step"]) for s in load_checkpoint(run / "checkpoint.pt")["optimizer"]["state"].values()}
    assert steps == {1.0}
    plain = _train(tmp_path, tiny_synthetic, "supervised", iterations=3, optimizer="adamw", checkpoint_every=3)
    assert {float(s["step"]) for s in load_checkpoint(plain / "checkpoint.pt")["optimizer"]["state"].values()} == {3.0}


def test_compile_wraps_each_network_in_place_keeping_checkpoint_keys() -> None:
    method = CAML(CAMLParams(), NetSpec(n_filters=4))
    keys = list(method.state_dict())
    compile_networks(method, "off")
    assert all(getattr(m, "_compiled_call_impl", None) is None for m in method.modules())
    compile_networks(method, "default")
    assert method.compiled_networks() == [method.net]
    assert method.net._compiled_call_impl is not None
    assert list(method.state_dict()) == keys  # checkpoints of compiled and plain runs are interchangeable


def test_compiled_networks_train_like_eager_ones(tmp_path: Path, tiny_synthetic: str) -> None:
    """A real compiled run (dynamo tracing; eager kernels keep the test fast on a CPU) learns the same weights."""
    eager = _train(tmp_path / "eager", tiny_synthetic, iterations=2, batch_unlabeled=0, dropout=0)
    original = torch.compile
    torch.compile = lambda model, **kw: original(model, backend="eager")  # type: ignore[assignment]
    try:
        torch._dynamo.reset()
        compiled = _train(tmp_path / "compiled", tiny_synthetic, iterations=2, batch_unlabeled=0, dropout=0,
                          compile="default")
    finally:
        torch.compile = original
    a = load_checkpoint(eager / "checkpoint.pt")["method"]
    b = load_checkpoint(compiled / "checkpoint.pt")["method"]
    assert a.keys() == b.keys()
    for key in a:
        torch.testing.assert_close(a[key], b[key], rtol=1e-4, atol=1e-5)


def test_truncate_log_drops_records_after_the_checkpoint(tmp_path: Path) -> None:
    log = tmp_path / "metrics.jsonl"
    log.write_text("".join(json.dumps({"iteration": i, "loss": 1.0 / i}) + "\n" for i in range(1, 7)))
    truncate_log(log, 4)
    assert [json.loads(line)["iteration"] for line in log.read_text().splitlines()] == [1, 2, 3, 4]
    truncate_log(tmp_path / "absent.jsonl", 3)  # a fresh run has no log yet


def test_training_wall_time_adds_up_over_resumed_calls(tmp_path: Path, tiny_synthetic: str) -> None:
    from semiseg.engine.checkpoint import save_checkpoint

    run = _train(tmp_path, tiny_synthetic, iterations=2, batch_unlabeled=0)
    payload = load_checkpoint(run / "checkpoint.pt")
    assert 0 < payload["wall_s"] < 100
    payload.update(iteration=1, wall_s=100.0)  # as if an earlier call had trained 100 s up to iteration 1
    save_checkpoint(run / "checkpoint.pt", payload)
    Trainer(build_config("supervised", None, {}), run, resume=True, progress=False).run()
    summary = json.loads((run / "train_summary.json").read_text())
    assert summary["iterations"] == 1 and summary["total_wall_s"] > 100 > summary["wall_s"]
