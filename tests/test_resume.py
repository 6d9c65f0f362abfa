"""Exact resume: a run killed with SIGKILL and resumed ends with the same weights, bit for bit, on CPU.

Mean Teacher exercises every piece of state a resume must restore: student, EMA teacher, optimiser momentum,
both batch streams (labelled and unlabelled) and the RNG behind the teacher's input noise and the augmentation.
"""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import torch

from semiseg.engine.checkpoint import load_checkpoint

ITERATIONS = 40


def _train_args(data: str, out: Path, checkpoint_every: int) -> list[str]:
    return [sys.executable, "-m", "semiseg.cli", "train", "--method", "mean_teacher", "--data", data, "--labeled", "2",
            "--iterations", str(ITERATIONS), "--out", str(out), "--quiet", "--set", "patch_size=32,32,16",
            "--set", "n_filters=4", "--set", "num_workers=1", "--set", "log_every=1",
            "--set", f"checkpoint_every={checkpoint_every}", "--set", "batch_unlabeled=2"]


ENV = {**os.environ, "OMP_NUM_THREADS": "1"}


def _logged_iterations(run: Path) -> int:
    log = run / "metrics.jsonl"
    lines = log.read_text().splitlines() if log.exists() else []
    return json.loads(lines[-1])["iteration"] if lines else 0


def test_sigkill_then_resume_gives_identical_weights(tmp_path: Path, tiny_synthetic: str) -> None:
    reference = tmp_path / "reference"
    subprocess.run(_train_args(tiny_synthetic, reference, ITERATIONS), check=True, env=ENV, timeout=600)

    run = tmp_path / "interrupted"
    proc = subprocess.Popen(_train_args(tiny_synthetic, run, 7), env=ENV)
    deadline = time.time() + 300
    while _logged_iterations(run) < 17 and time.time() < deadline and proc.poll() is None:
        time.sleep(0.05)
    proc.send_signal(signal.SIGKILL)
    assert proc.wait() == -signal.SIGKILL
    killed_at = load_checkpoint(run / "checkpoint.pt")["iteration"]
    assert 7 <= killed_at < ITERATIONS

    subprocess.run([sys.executable, "-m", "semiseg.cli", "train", "--out", str(run), "--resume", "--quiet"],
                   check=True, env=ENV, timeout=600)
    assert not list(run.glob(".*.tmp*"))  # a temporary file torn by the kill is cleaned up on resume
    a = load_checkpoint(reference / "checkpoint.pt")
    b = load_checkpoint(run / "checkpoint.pt")
    assert a["iteration"] == b["iteration"] == ITERATIONS
    assert any(key.startswith("teacher.") for key in a["method"])  # the EMA teacher is part of the state
    for key, value in a["method"].items():
        assert torch.equal(value, b["method"][key]), key
    for ka, kb in zip(a["optimizer"]["state"].values(), b["optimizer"]["state"].values(), strict=True):
        assert torch.equal(ka["momentum_buffer"], kb["momentum_buffer"])
