"""Checkpoints that survive crashes: written to a temporary file, fsynced, then renamed into place."""

from __future__ import annotations

import os
import shutil
import warnings
from pathlib import Path
from typing import Any

import torch

from ..errors import CheckpointError

FORMAT = "semiseg-checkpoint"
VERSION = 1


def save_checkpoint(path: Path, payload: dict[str, Any]) -> None:
    """Atomic write: a reader sees either the old complete file or the new complete file."""
    path = Path(path)
    tmp = path.with_name(f".{path.name}.tmp{os.getpid()}")
    with open(tmp, "wb") as f:
        torch.save({"format": FORMAT, "version": VERSION, **payload}, f)
        f.flush()
        os.fsync(f.fileno())
    os.replace(tmp, path)


def load_checkpoint(path: Path) -> dict[str, Any]:
    """Load and validate; a truncated or foreign file is a `CheckpointError`, not a pickle traceback."""
    path = Path(path)
    if not path.is_file():
        raise CheckpointError(f"{path}: checkpoint not found; pass a run folder or a .pt file written by "
                              "`semiseg train`")
    try:
        with warnings.catch_warnings():  # a damaged file's bytes can look like an unusual pickle protocol
            warnings.filterwarnings("ignore", message="Detected pickle protocol")
            payload = torch.load(path, map_location="cpu", weights_only=True)
    except Exception as exc:  # torch raises many exception types for damaged files
        raise CheckpointError(f"{path}: unreadable checkpoint ({type(exc).__name__}); the file is truncated "
                              "or not a semiseg checkpoint; resume from an earlier one or retrain") from None
    if not isinstance(payload, dict) or payload.get("format") != FORMAT:
        raise CheckpointError(f"{path}: not a semiseg checkpoint (no {FORMAT!r} marker); semiseg loads only "
                              "files written by `semiseg train`")
    if payload.get("version", 0) > VERSION:
        raise CheckpointError(f"{path}: written by a newer semiseg (format {payload['version']}); upgrade semiseg")
    return payload


def check_writable(folder: Path) -> None:
    """Fail before training, not at the first checkpoint, when the output folder cannot be written."""
    try:
        folder.mkdir(parents=True, exist_ok=True)
        probe = folder / f".write-test-{os.getpid()}"
        probe.write_bytes(b"0" * 1024)
        probe.unlink()
    except OSError as exc:
        raise CheckpointError(f"{folder}: output folder is not writable ({exc.strerror}); choose another --out "
                              "or free disk space") from None


def checkpoint_bytes(module: torch.nn.Module, optimizer: torch.optim.Optimizer) -> int:
    """Expected checkpoint size: weights and buffers, plus the optimiser's per-parameter state once it exists.

    Estimated before the first step, when the state is still empty: SGD momentum holds one copy of each
    parameter, Adam(W) two.
    """
    tensors = [*module.parameters(), *module.buffers()]
    weights = sum(t.numel() * t.element_size() for t in tensors)
    params = sum(p.numel() * p.element_size() for p in module.parameters())
    copies = 2 if isinstance(optimizer, torch.optim.Adam | torch.optim.AdamW) else 1
    return weights + copies * params


def check_free_space(folder: Path, checkpoint_size: int, names: tuple[str, ...]) -> None:
    """Fail before training when the disk cannot hold the run's checkpoint files.

    Each save writes a temporary copy beside the file it replaces, so the need is one checkpoint for the
    copy plus one for every named file that does not exist yet (a resumed run already holds its own).
    """
    missing = [n for n in names if not (folder / n).is_file()]
    need = checkpoint_size * (len(missing) + 1)
    free = shutil.disk_usage(folder).free
    if free < need:
        raise CheckpointError(f"{folder}: {free / 2**20:.0f} MiB free, but this run needs {need / 2**20:.0f} MiB "
                              f"for its checkpoints ({', '.join(names)}, about {checkpoint_size / 2**20:.0f} MiB "
                              "each, plus a temporary copy while saving); free disk space or choose another --out")
