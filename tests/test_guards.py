"""Divergence guard (NaN/Inf loss: stop naming the iteration, or skip the update) and output-folder checks."""

from __future__ import annotations

import errno
import json
import os
import shutil
import tempfile
from collections.abc import Callable
from pathlib import Path

import pytest
import torch

from semiseg.config import build_config
from semiseg.engine.checkpoint import load_checkpoint, save_checkpoint
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


def _error_as_unprivileged_user(action: Callable[[], object]) -> str:
    """`repr` of what `action` raises ('' if nothing) in a forked child that drops root's rights first.

    Root writes into read-only folders, and CI runs as root, so the child becomes `nobody` there.
    """
    read, write = os.pipe()
    pid = os.fork()
    if pid == 0:  # the child: report through the pipe, never return into pytest
        os.close(read)
        message = ""
        try:
            if os.geteuid() == 0:
                os.setgid(65534)
                os.setuid(65534)
            action()
        except BaseException as exc:  # every outcome is reported to the parent
            message = repr(exc)
        os.write(write, message.encode())
        os._exit(0)
    os.close(write)
    with os.fdopen(read, "rb") as pipe:
        message = pipe.read().decode()
    os.waitpid(pid, 0)
    return message


def test_unwritable_output_folder_is_reported_before_training(tiny_synthetic: str) -> None:
    base = Path(tempfile.mkdtemp())
    locked = base / "locked"
    try:
        base.chmod(0o755)  # reachable by the unprivileged child
        locked.mkdir(mode=0o555)
        cfg = _cfg("supervised", tiny_synthetic)
        for out in (locked, locked / "run"):  # an existing read-only folder; one that cannot be created
            message = _error_as_unprivileged_user(lambda out=out: Trainer(cfg, out, progress=False))
            assert message.startswith("CheckpointError") and "not writable (Permission denied)" in message, message
    finally:
        if locked.exists():
            locked.chmod(0o755)
        shutil.rmtree(base)


def test_full_output_folder_is_reported_before_training(tmp_path: Path, tiny_synthetic: str,
                                                        monkeypatch: pytest.MonkeyPatch) -> None:
    def no_space(self: Path, data: bytes) -> int:
        raise OSError(errno.ENOSPC, os.strerror(errno.ENOSPC), str(self))

    monkeypatch.setattr(Path, "write_bytes", no_space)
    with pytest.raises(CheckpointError, match="not writable .No space left on device.*free disk space"):
        Trainer(_cfg("supervised", tiny_synthetic), tmp_path / "run", progress=False)
    assert not (tmp_path / "run" / "config.yaml").exists()  # stopped before anything else was written


def test_too_little_disk_for_the_checkpoints_is_reported_before_training(tmp_path: Path, tiny_synthetic: str,
                                                                          monkeypatch: pytest.MonkeyPatch) -> None:
    """The 1 KiB write probe passes on a nearly full disk; the free space is checked against the model size."""
    from semiseg.engine import checkpoint

    trainer = Trainer(_cfg("supervised", tiny_synthetic), tmp_path / "first", progress=False)
    trainer.run()
    actual = (tmp_path / "first" / "checkpoint.pt").stat().st_size
    estimate = checkpoint.checkpoint_bytes(trainer.s.method, trainer.s.optimizer)
    assert 0.8 * actual < estimate <= actual  # weights + momentum; the file adds config and RNG states

    usage = shutil.disk_usage(tmp_path)
    monkeypatch.setattr(checkpoint.shutil, "disk_usage", lambda _: usage._replace(free=estimate))
    with pytest.raises(CheckpointError, match=r"MiB free, but this run needs .* free disk space or choose"):
        Trainer(_cfg("supervised", tiny_synthetic), tmp_path / "run", progress=False)
    monkeypatch.setattr(checkpoint.shutil, "disk_usage", lambda _: usage._replace(free=2 * estimate))
    Trainer(_cfg("supervised", tiny_synthetic), tmp_path / "fits", progress=False)  # checkpoint + temporary copy


def test_output_path_that_is_a_file_is_reported_before_training(tmp_path: Path, tiny_synthetic: str) -> None:
    blocker = tmp_path / "file"
    blocker.write_text("x")
    with pytest.raises(CheckpointError, match="not writable"):
        Trainer(_cfg("supervised", tiny_synthetic), blocker / "run", progress=False)


def test_checkpoint_files_are_validated_on_load(tmp_path: Path) -> None:
    good = tmp_path / "checkpoint.pt"
    save_checkpoint(good, {"iteration": 7, "method": {"w": torch.ones(1000)}})
    assert load_checkpoint(good)["iteration"] == 7 and [p.name for p in tmp_path.iterdir()] == ["checkpoint.pt"]
    truncated = tmp_path / "truncated.pt"
    truncated.write_bytes(good.read_bytes()[: good.stat().st_size // 2])
    with pytest.raises(CheckpointError, match=r"truncated.pt: unreadable checkpoint .*truncated"):
        load_checkpoint(truncated)
    foreign = tmp_path / "foreign.pt"
    torch.save({"state_dict": {"w": torch.ones(3)}}, foreign)  # a valid torch file, not written by semiseg
    with pytest.raises(CheckpointError, match="foreign.pt: not a semiseg checkpoint"):
        load_checkpoint(foreign)
    newer = tmp_path / "newer.pt"
    torch.save({"format": "semiseg-checkpoint", "version": 99}, newer)
    with pytest.raises(CheckpointError, match="newer semiseg"):
        load_checkpoint(newer)
    with pytest.raises(CheckpointError, match="checkpoint not found"):
        load_checkpoint(tmp_path / "missing.pt")
