"""Checkpoints that survive crashes: written to a temporary file, fsynced, then renamed into place."""

from __future__ import annotations

import dataclasses
import os
import shutil
import warnings
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import Any

import torch

from ..config import TrainConfig, saved_config
from ..errors import CheckpointError, ConfigError, SemisegError
from ..methods.base import Method, NetSpec

FORMAT = "semiseg-checkpoint"
VERSION = 1


class CheckpointWriteError(CheckpointError):
    """Writing a checkpoint failed (disk full, I/O error); the previous file, if any, is intact."""


def save_checkpoint(path: Path, payload: dict[str, Any]) -> None:
    """Atomic write: a reader sees either the old complete file or the new complete file.

    A failed write (e.g. a full disk) removes its temporary file and raises `CheckpointWriteError`.
    """
    path = Path(path)
    tmp = path.with_name(f".{path.name}.tmp{os.getpid()}")
    try:
        with open(tmp, "wb") as f:
            torch.save({"format": FORMAT, "version": VERSION, **payload}, f)
            f.flush()
            os.fsync(f.fileno())
        os.replace(tmp, path)
    except (OSError, RuntimeError) as exc:  # torch reports a failed write of its archive as RuntimeError
        tmp.unlink(missing_ok=True)
        reason = getattr(exc, "strerror", None) or " ".join(str(exc).split())[:200]
        raise CheckpointWriteError(f"writing {path.name} failed ({reason})") from None


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
    version = payload.get("version")
    if isinstance(version, int) and not isinstance(version, bool) and version > VERSION:
        raise CheckpointError(f"{path}: written by a newer semiseg (format {payload['version']}); upgrade semiseg")
    if version != VERSION or isinstance(version, bool):
        raise CheckpointError(f"{path}: checkpoint format version {version!r} is not one this semiseg reads "
                              f"({VERSION}); the file is damaged or was not written by `semiseg train`")
    return payload


def _spec(path: Path, payload: dict[str, Any]) -> NetSpec:
    """The network spec, each field of the right type and in a range a real network has."""
    raw = payload.get("spec")
    fields = {f.name: f.type for f in dataclasses.fields(NetSpec)}
    if not isinstance(raw, dict) or set(raw) - set(fields):
        raise CheckpointError(f"{path}: 'spec' must be a mapping of {', '.join(fields)}; the checkpoint is "
                              "damaged or was not written by `semiseg train`")
    spec = NetSpec(**raw)
    checks = {"in_channels": (int, 1, 1024), "num_classes": (int, 1, 1024), "spatial_dims": (int, 2, 3),
              "n_filters": (int, 1, 4096), "dropout": ((int, float), 0.0, 1.0)}
    for name, (kind, low, high) in checks.items():
        value = getattr(spec, name)
        if isinstance(value, bool) or not isinstance(value, kind) or not low <= value <= high:
            raise CheckpointError(f"{path}: spec {name} = {value!r} is not a {kind} in [{low}, {high}]; the "
                                  "checkpoint is damaged")
    if not isinstance(spec.norm, str):
        raise CheckpointError(f"{path}: spec norm = {spec.norm!r} is not a name; the checkpoint is damaged")
    return spec


def restore_method(path: Path, payload: dict[str, Any], device: torch.device) -> tuple[TrainConfig, NetSpec, Method]:
    """The trained method of a checkpoint, its weights loaded, checked before anything large is allocated.

    The network is first built on the meta device (no memory): its state's keys and shapes must match the
    checkpoint's tensors, so a damaged spec cannot allocate huge layers and a wrong tensor is named.
    """
    cfg, spec = check_checkpoint(path, payload)
    method = cfg.method_class()(cfg.method_params(), spec).to(device)
    method.load_state_dict(payload["method"])
    return cfg, spec, method


def check_checkpoint(path: Path, payload: dict[str, Any]) -> tuple[TrainConfig, NetSpec]:
    """The configuration and spec of a loaded checkpoint, after checking that its method state has the keys and
    shapes of its network (built on the meta device, so nothing large is allocated)."""
    path = Path(path)
    for key, kind in (("config", dict), ("method", dict), ("iteration", int)):
        if not isinstance(payload.get(key), kind):
            raise CheckpointError(f"{path}: {key!r} is missing or not a {kind.__name__}; the checkpoint is damaged "
                                  "or was not written by `semiseg train`")
    try:
        cfg = saved_config(payload["config"], path)
    except ConfigError as exc:
        raise CheckpointError(str(exc)) from None
    spec = _spec(path, payload)
    state = payload["method"]
    try:
        with torch.device("meta"):
            expected = cfg.method_class()(cfg.method_params(), spec).state_dict()
    except SemisegError as exc:
        raise CheckpointError(f"{path}: its spec does not fit its method: {exc}") from None
    missing = [k for k in expected if k not in state]
    unexpected = [k for k in state if k not in expected]
    if missing or unexpected:
        raise CheckpointError(f"{path}: the weights do not match a {cfg.method} network ({len(missing)} missing, "
                              f"{len(unexpected)} unexpected, e.g. {(missing or unexpected)[0]!r}); the checkpoint "
                              "is damaged or from another version")
    for key, tensor in expected.items():
        if not isinstance(tensor, torch.Tensor):
            continue  # a module's extra state (e.g. AD-MT's alternation), checked by the module when loaded
        stored = state[key]
        lazy = tensor.numel() == 0  # a buffer sized at the first step (CAML's memory bank): any size of its rank
        if not isinstance(stored, torch.Tensor) or (stored.dim() != tensor.dim() if lazy else
                                                    tuple(stored.shape) != tuple(tensor.shape)):
            got = tuple(stored.shape) if isinstance(stored, torch.Tensor) else type(stored).__name__
            raise CheckpointError(f"{path}: tensor {key!r} has shape {got}, the network needs "
                                  f"{tuple(tensor.shape)}; the checkpoint is damaged")
    return cfg, spec


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


@contextmanager
def writable_output(folder: Path) -> Iterator[None]:
    """`check_writable(folder)` for the length of a command: the folders it had to create are removed again, when
    still empty, if the command fails, so a refused command leaves nothing beside the user's files."""
    created = [p for p in (folder, *folder.parents) if not p.exists()]  # deepest first
    check_writable(folder)
    try:
        yield
    except BaseException:
        for made in created:
            try:
                made.rmdir()
            except OSError:  # not empty: something was written, and it stays
                break
        raise


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
