"""Divergence guard (NaN/Inf loss: stop naming the iteration, or skip the update) and output-folder checks."""

from __future__ import annotations

import json
import os
from pathlib import Path

import pytest
import torch

from semiseg.config import build_config
from semiseg.engine.checkpoint import load_checkpoint
from semiseg.engine.trainer import DivergenceError, Trainer
from semiseg.errors import CheckpointError
from semiseg.methods import METHODS, StepOutput
from semiseg.methods.supervised import Supervised


class NanAtThree(Supervised):
    """The labelled-only method whose loss is NaN at update 3 only."""

    name = "nan_at_three"

    def train_step(self, batch, ctx) -> StepOutput:
        out = super().train_step(batch, ctx)
        return StepOutput(out.loss * float("nan"), out.logs) if ctx.iteration == 3 else out


@pytest.fixture()
def nan_method():
    METHODS[NanAtThree.name] = NanAtThree
    yield NanAtThree.name
    del METHODS[NanAtThree.name]


def _cfg(method: str, data: str, **extra):
    return build_config(method, None, {"data": data, "labeled": 2, "iterations": 6, "patch_size": (32, 32, 16),
                                       "n_filters": 4, "num_workers": 0, "log_every": 5, "checkpoint_every": 2,
                                       **extra})


def test_nan_loss_stops_the_run_naming_iteration_and_checkpoint(tmp_path: Path, tiny_synthetic: str,
                                                                nan_method: str) -> None:
    with pytest.raises(DivergenceError, match=r"NaN/Inf at iteration 3 \(seen at 4\).*iteration 2\)"):
        Trainer(_cfg(nan_method, tiny_synthetic), tmp_path / "run", progress=False).run()
    good = load_checkpoint(tmp_path / "run" / "checkpoint.pt")
    assert good["iteration"] == 2
    assert all(torch.isfinite(v).all() for v in good["method"].values() if v.is_floating_point())


def test_skip_mode_drops_only_the_bad_update(tmp_path: Path, tiny_synthetic: str, nan_method: str) -> None:
    Trainer(_cfg(nan_method, tiny_synthetic, on_nonfinite="skip"), tmp_path / "run", progress=False).run()
    summary = json.loads((tmp_path / "run" / "train_summary.json").read_text())
    assert summary["skipped_updates"] == 1
    final = load_checkpoint(tmp_path / "run" / "checkpoint.pt")
    assert final["iteration"] == 6
    assert all(torch.isfinite(v).all() for v in final["method"].values() if v.is_floating_point())


@pytest.mark.skipif(os.geteuid() == 0, reason="root can write into read-only folders")
def test_unwritable_output_folder_is_reported_before_training(tmp_path: Path, tiny_synthetic: str) -> None:
    locked = tmp_path / "locked"
    locked.mkdir()
    locked.chmod(0o500)
    with pytest.raises(CheckpointError, match="not writable"):
        Trainer(_cfg("supervised", tiny_synthetic), locked / "run", progress=False)


def test_output_path_that_is_a_file_is_reported_before_training(tmp_path: Path, tiny_synthetic: str) -> None:
    blocker = tmp_path / "file"
    blocker.write_text("x")
    with pytest.raises(CheckpointError, match="not writable"):
        Trainer(_cfg("supervised", tiny_synthetic), blocker / "run", progress=False)
