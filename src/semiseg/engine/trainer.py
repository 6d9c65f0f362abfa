"""The iteration-based training loop. It knows nothing about any method.

Each iteration: fetch the precomputed batch, move it to the device, `method.train_step` under
autocast, backward, optimiser step, `method.after_step`. Losses stay on the device and are read
only every `log_every` iterations, so the GPU is never made to wait for the host in between.
"""

from __future__ import annotations

import contextlib
import json
import os
import random
import resource
import shutil
import signal
import sys
import threading
import time
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any

import numpy as np
import torch
import yaml

from .. import __version__
from ..config import TrainConfig, resolved, resume_config, saved_config, schedules_on_total
from ..data import Layout, Split, absolute_data, dataset_fingerprint, load_cases, locate_dataset, open_dataset
from ..data.loader import TwoStreamBatches, batch_loader
from ..errors import CheckpointError, ConfigError, SemisegError
from ..methods.base import Method, NetSpec, StepContext
from .checkpoint import (
    CheckpointWriteError,
    check_free_space,
    check_writable,
    checkpoint_bytes,
    load_checkpoint,
    save_checkpoint,
)
from .cpu_memory import keep_freed_memory
from .distributed import init_from_env, shutdown
from .inference import autocast_for, inference_protocol, predict_volume
from .metrics import dice
from .model_file import MODEL, export_model
from .progress import Progress
from .runlock import FolderLock
from .schedules import poly_lr, step_lr

CHECKPOINT = "checkpoint.pt"
BEST = "best.pt"


class DivergenceError(SemisegError):
    """The loss became NaN or Inf."""


class TrainingInterrupted(Exception):  # noqa: N818 - what happened, not an error of the user's
    """SIGINT / SIGTERM: a checkpoint was written at `iteration`; the CLI says how to continue and exits 130."""

    def __init__(self, iteration: int, out: Path, signal_name: str) -> None:
        super().__init__(f"interrupted at iteration {iteration}; continue with `semiseg train --out {out} --resume`")
        self.iteration, self.out, self.signal_name = iteration, out, signal_name


# Files a run writes; a run that fails before its first checkpoint removes them (and a folder it created).
RUN_OUTPUTS = ("config.yaml", "split.json", "metrics.jsonl", "train_summary.json", "tensorboard")


def resolve_device(name: str) -> torch.device:
    if name == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    if name.startswith("cuda") and not torch.cuda.is_available():
        raise ConfigError(f"device {name!r} requested but CUDA is not available; use --set device=cpu")
    return torch.device(name)


def seed_everything(seed: int) -> None:
    random.seed(seed)
    np.random.seed(seed % 2**32)
    torch.manual_seed(seed)


def peak_memory_mb(device: torch.device) -> float:
    """Peak GPU memory allocated by tensors, or the process's peak resident memory on CPU."""
    if device.type == "cuda":
        return torch.cuda.max_memory_allocated(device) / 2**20
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024


@dataclass
class Setup:
    """Everything derived from a config: data, split, method and optimiser."""

    layout: Layout
    split: Split
    method: Method
    optimizer: torch.optim.Optimizer
    device: torch.device


def build_method(cfg: TrainConfig, spec: NetSpec, device: torch.device) -> Method:
    method = cfg.method_class()(cfg.method_params(), spec)
    return method.to(device)


def build_optimizer(cfg: TrainConfig, method: Method) -> torch.optim.Optimizer:
    params = method.trainable_parameters()
    if cfg.optimizer == "adamw":
        return torch.optim.AdamW(params, lr=cfg.lr, weight_decay=cfg.weight_decay)
    return torch.optim.SGD(params, lr=cfg.lr, momentum=cfg.momentum, weight_decay=cfg.weight_decay,
                           nesterov=cfg.nesterov)


def learning_rate(cfg: TrainConfig, iteration: int) -> float:
    """LR used by update number `iteration` (1-based), as SSL4MIS-style loops set it."""
    if cfg.lr_schedule == "poly":
        return poly_lr(cfg.lr, max(iteration - 1 - cfg.poly_lag, 0), cfg.poly_horizon or cfg.iterations,
                       cfg.poly_power)
    if cfg.lr_schedule == "step":
        return step_lr(cfg.lr, iteration - cfg.lr_step_start, cfg.lr_step, cfg.lr_gamma)
    return cfg.lr


def setup(cfg: TrainConfig, local_rank: int | None = None, layout: Layout | None = None) -> Setup:
    """`local_rank` picks this process's GPU under torchrun."""
    device = resolve_device(cfg.device)
    if local_rank is not None and device.type == "cuda":
        device = torch.device("cuda", local_rank)
        torch.cuda.set_device(device)
    layout = layout or open_dataset(cfg.data, cfg.layout)
    split = layout.split(cfg.labeled, cfg.val)
    probe = layout.read(split.labeled[0])
    spec = NetSpec(probe.image.shape[0], layout.num_classes, layout.spatial_dims, cfg.n_filters, cfg.norm, cfg.dropout)
    if len(cfg.patch_size) != layout.spatial_dims:
        raise ConfigError(f"patch_size {cfg.patch_size} has {len(cfg.patch_size)} axes but {layout.name} data is "
                          f"{layout.spatial_dims}D; pass --set patch_size with {layout.spatial_dims} sizes")
    method = build_method(cfg, spec, device)
    if device.type == "cuda":
        torch.backends.cudnn.benchmark = cfg.cudnn_benchmark
    else:
        set_threads(cfg.threads)
        if cfg.cpu_malloc == "keep":
            keep_freed_memory()
    if uses_channels_last(cfg, device, spec.spatial_dims):
        method.to(memory_format=torch.channels_last_3d)
    return Setup(layout, split, method, build_optimizer(cfg, method), device)


def available_cores() -> int:
    """CPUs this process may run on (its affinity mask, which containers and `taskset` narrow), not the host's."""
    try:
        return len(os.sched_getaffinity(0))
    except AttributeError:  # not on Linux
        return os.cpu_count() or 1


def env_threads() -> int | None:
    """OMP_NUM_THREADS when it holds a positive count: how batch systems and users give a process its share."""
    text = os.environ.get("OMP_NUM_THREADS", "").strip()
    return int(text) if text.isdigit() and int(text) > 0 else None


def set_threads(threads: int) -> None:
    """One intra-op thread per usable core (0 = OMP_NUM_THREADS when set, else every usable core): more threads
    than cores only adds contention, and a process given fewer threads shares its cores with others."""
    wanted = threads or env_threads() or available_cores()
    if torch.get_num_threads() != wanted:
        torch.set_num_threads(wanted)


def uses_channels_last(cfg: TrainConfig, device: torch.device, spatial_dims: int) -> bool:
    """Channels-last 3D lets cuDNN pick its fastest convolution kernels (tensor cores) on GPUs, and oneDNN its
    blocked AVX-512 kernels on CPUs; `auto` takes it on CPU for the methods whose step measured faster with it
    (`Method.cpu_channels_last`, BENCHMARKS.md "cpu-options")."""
    if cfg.channels_last == "auto":
        wanted = device.type == "cuda" or (device.type == "cpu" and cfg.method_class().cpu_channels_last)
    else:
        wanted = cfg.channels_last == "on"
    return wanted and spatial_dims == 3


def _rng_state() -> dict[str, Any]:
    state: dict[str, Any] = {"torch": torch.get_rng_state()}
    if torch.cuda.is_available():
        state["cuda"] = torch.cuda.get_rng_state_all()
    return state


def _restore_rng(state: dict[str, Any]) -> None:
    torch.set_rng_state(state["torch"])
    if "cuda" in state and torch.cuda.is_available():
        torch.cuda.set_rng_state_all(state["cuda"])


def _record_iteration(line: str) -> float:
    """The iteration of a log record; a torn or foreign line (a run killed mid-write) counts as after any."""
    try:
        record = json.loads(line)
        value = record.get("iteration", 0) if isinstance(record, dict) else None
    except ValueError:
        value = None
    return value if isinstance(value, int | float) and not isinstance(value, bool) else float("inf")


def truncate_log(path: Path, iteration: int) -> None:
    """Drop the records after `iteration`: a run killed after its last checkpoint logged iterations that the
    resumed run repeats, and its log must read as one uninterrupted run."""
    if not path.is_file():
        return
    lines = path.read_text(errors="replace").splitlines()
    kept = [line for line in lines if _record_iteration(line) <= iteration]
    if len(kept) != len(lines):
        tmp = path.with_name(path.name + ".tmp")
        tmp.write_text("".join(line + "\n" for line in kept))
        tmp.replace(path)


def plan_window(cfg: TrainConfig, layout: Layout) -> tuple[TrainConfig, dict[str, Any]]:
    """Defaults follow the data: a configuration that sets no patch (no recipe, preset, file or `--set` names it)
    gets the dataset's window (`Layout.default_window`: its protocol's, or one derived from the image sizes)."""
    if "patch_size" in cfg.model_fields_set:
        return cfg, {"patch_size": list(cfg.patch_size), "stride": list(cfg.stride),
                     "source": "set in the configuration (recipe, preset, config file or --set)"}
    patch, stride, why = layout.default_window()
    keep_stride = "stride" in cfg.model_fields_set and len(cfg.stride) == len(patch)
    update = {"patch_size": patch, "stride": cfg.stride if keep_stride else stride}
    cfg = TrainConfig(**{**cfg.model_dump(), **update})
    source = f"{why}{'; stride set in the configuration' if keep_stride else ''}"
    return cfg, {"patch_size": list(cfg.patch_size), "stride": list(cfg.stride), "source": source}


def extension_line(ext: dict[str, Any]) -> str:
    """How an extended run's schedules behave, for the console and the protocol card."""
    recomputed = ", ".join(ext["recomputed"])
    what = (f"recomputed with the new total from iteration {ext['extended_at'] + 1}: {recomputed}" if recomputed
            else "no schedule depends on the total")
    return (f"extended from {ext['from']} to {ext['to']} iterations at iteration {ext['extended_at']}; {what}; "
            "ramp-ups in epochs, step decays and stage switches are fixed in iterations and unchanged")


def compile_networks(method: Method, mode: str) -> None:
    """torch.compile each of the method's networks in place (`nn.Module.compile`: state_dict keys unchanged, so
    checkpoints stay interchangeable with uncompiled runs)."""
    if mode == "off":
        return
    for net in method.compiled_networks():
        net.compile(mode=mode)


class Trainer:
    """Runs one configured training into `out` (config, logs, checkpoints, TensorBoard).

    Under torchrun every process builds its own Trainer; rank 0 alone writes files and validates.
    """

    def __init__(self, cfg: TrainConfig | None, out: Path, resume: bool = False, progress: bool = True,
                 resume_changes: dict[str, Any] | None = None) -> None:
        """With `resume`, the run continues with its saved config (`cfg` is not used and may be None);
        `resume_changes` are the keys the user typed
        (checked by `config.resume_config`: a larger `iterations` extends the run, `data` may be its new place)."""
        self.out = Path(out)
        self.progress = progress
        ckpt = self.out / CHECKPOINT
        self.state: dict[str, Any] | None = None
        self.history: list[dict[str, Any]] = []  # extensions of the run (`--resume --iterations N`)
        if resume:
            if not ckpt.is_file():
                raise CheckpointError(f"{self.out}: nothing to resume (no {CHECKPOINT} in this folder); start the "
                                      "run without --resume, or give the --out of an interrupted run")
            self.state = load_checkpoint(ckpt)
            try:
                saved = resolved(saved_config(self.state.get("config"), ckpt))
            except ConfigError as exc:
                raise CheckpointError(str(exc)) from None
            changes = dict(resume_changes or {})
            if "data" in changes:
                changes["data"] = absolute_data(str(changes["data"]))
            cfg = resume_config(saved, changes, self.out) if changes else saved
            self.history = list(self.state.get("history", []))
            if cfg.iterations > saved.iterations:
                self.history.append({"extended_at": int(self.state["iteration"]), "from": saved.iterations,
                                     "to": cfg.iterations, "recomputed": schedules_on_total(cfg)})
        elif ckpt.exists():
            raise CheckpointError(f"{ckpt}: this run folder already holds a checkpoint; pass --resume to "
                                  "continue it, or choose a new --out")
        else:
            if cfg is None:
                raise ValueError("a new run needs its configuration")
            cfg = resolved(cfg.model_copy(update={"data": absolute_data(cfg.data)}))
        self.dist = init_from_env(resolve_device(cfg.device).type)
        self._created = not self.out.exists()
        self.lock = FolderLock(self.out, "semiseg train")  # one writer per run folder (rank 0 writes)
        if self.dist.is_main:
            check_writable(self.out)  # before any data is read: an unwritable --out fails at once
            self.lock.acquire()
        try:  # a failure from here on leaves no empty run folder behind
            cfg = self._build(cfg, resume)
        except BaseException:
            self._discard()
            raise
        if self.dist.enabled:
            torch.manual_seed(cfg.seed + self.dist.rank)  # independent dropout and sampling per process
        self.start = 0
        self.wall_before = 0.0  # training wall time of the earlier calls of a resumed run, up to its checkpoint
        self._t0 = time.perf_counter()
        self._val_s = 0.0  # time spent validating in this call, left out of the training wall time
        self.best: dict[str, Any] = {"dice": -1.0, "iteration": 0}
        self._stop: str | None = None  # the name of the signal that asked the run to stop
        try:
            if self.state is not None:
                self._restore(self.state)
            if self.dist.is_main:
                self._write_run_files(cfg)
        except BaseException:
            self.lock.release()
            raise

    def _write_run_files(self, cfg: TrainConfig) -> None:
        try:
            (self.out / "config.yaml").write_text(yaml.safe_dump(cfg.model_dump(mode="json"), sort_keys=False))
            (self.out / "split.json").write_text(json.dumps(vars(self.s.split), indent=1))
        except OSError as exc:
            raise self._write_failure(exc, self.start) from None

    def _restore(self, state: dict[str, Any]) -> None:
        """Weights, optimiser, position and RNG of a checkpoint; a damaged one is a `CheckpointError`."""
        try:
            self.s.method.load_state_dict(state["method"])
            self.s.optimizer.load_state_dict(state["optimizer"])
            self.start = int(state["iteration"])
            self.wall_before = float(state.get("wall_s", 0.0))
            self.best = dict(state.get("best", self.best))
            rng = state["rng"]
            _restore_rng(rng[self.dist.rank] if isinstance(rng, list) and len(rng) == self.dist.world else
                         rng[0] if isinstance(rng, list) else rng)
        except (KeyError, TypeError, ValueError, RuntimeError) as exc:
            first = " ".join(str(exc).split())[:240] or type(exc).__name__
            raise CheckpointError(f"{self.out / CHECKPOINT}: its saved state does not fit this run "
                                  f"({type(exc).__name__}: {first}); the checkpoint is damaged, or the data changed "
                                  "since it was written") from None

    def _write_failure(self, exc: Exception, last_saved: int) -> CheckpointError:
        """The run folder could not be written: say why, and which checkpoint a resumed run continues from."""
        reason = str(exc) if isinstance(exc, CheckpointWriteError) else getattr(exc, "strerror", None) or str(exc)
        if last_saved > 0:
            survivor = (f"the last good checkpoint is {self.out / CHECKPOINT} (iteration {last_saved}); free disk "
                        f"space, then continue with `semiseg train --out {self.out} --resume`")
        else:
            survivor = "no checkpoint was written yet; free disk space and train again"
        return CheckpointError(f"{self.out}: the run stopped because its folder could not be written ({reason}); "
                               f"{survivor}")

    def _build(self, cfg: TrainConfig, resume: bool) -> TrainConfig:
        """Data, window, method and optimiser of the run; checks that the disk holds its checkpoints."""
        layout = locate_dataset(cfg.data, None, cfg.layout) if resume else open_dataset(cfg.data, cfg.layout)
        self.fingerprint = dataset_fingerprint(layout)
        if self.state is not None:
            self._check_same_dataset(cfg.data)
            self.plan = dict(self.state.get("plan") or {"source": "saved with the run"})
        else:
            cfg, self.plan = plan_window(cfg, layout)
        self.cfg = cfg
        seed_everything(cfg.seed)  # identical initial weights on every process
        self.s = setup(cfg, self.dist.local_rank if self.dist.enabled else None, layout)
        if self.dist.is_main:
            check_free_space(self.out, checkpoint_bytes(self.s.method, self.s.optimizer),
                             (CHECKPOINT, BEST) if self._selects_best else (CHECKPOINT,))
            for torn in self.out.glob(".*.pt.tmp*"):  # left by a run killed while writing a checkpoint
                torn.unlink()
        return cfg

    def _check_same_dataset(self, data: str) -> None:
        """A resumed run trains on the very dataset it started with, wherever it lies now."""
        assert self.state is not None
        before = (self.state.get("dataset") or {}).get("fingerprint")
        if before is not None and before != self.fingerprint:
            raise ConfigError(f"{data}: not the dataset this run was trained on (fingerprint {self.fingerprint}, "
                              f"the run's {before}); pass --data with the run's dataset, or train into a new --out")

    def _discard(self) -> None:
        """After a failure before the first checkpoint: remove this run's own files, and the folder if this call
        created it and nothing else is in it. A run that has a checkpoint keeps everything (it can be resumed)."""
        self.lock.release()  # its file would keep the folder from being empty
        if not self.dist.is_main or (self.out / CHECKPOINT).exists() or not self.out.is_dir():
            return
        for name in RUN_OUTPUTS:
            path = self.out / name
            if path.is_dir():
                shutil.rmtree(path, ignore_errors=True)
            elif path.exists():
                path.unlink()
        if self._created and not any(self.out.iterdir()):
            self.out.rmdir()

    def _payload(self, iteration: int) -> dict[str, Any]:
        rng = self.dist.gather(_rng_state())  # a collective: every process calls it
        return {"config": self.cfg.model_dump(mode="json"), "iteration": iteration,
                "spec": asdict(self.s.method.spec), "plan": self.plan, "history": self.history,
                "dataset": {"root": self.cfg.data, "layout": self.s.layout.name, "fingerprint": self.fingerprint},
                "method": self.s.method.state_dict(), "optimizer": self.s.optimizer.state_dict(),
                "rng": rng if self.dist.enabled else rng[0], "best": self.best, "world_size": self.dist.world,
                "wall_s": self.train_wall_s(),
                "semiseg_version": __version__}

    def train_wall_s(self) -> float:
        """Training wall time so far, over every call of a resumed run, without the time spent validating (the
        x-axis of a learning curve against time)."""
        return self.wall_before + time.perf_counter() - self._t0 - self._val_s

    def _save(self, name: str, iteration: int) -> None:
        payload = self._payload(iteration)
        if self.dist.is_main:
            save_checkpoint(self.out / name, payload)
        self.dist.barrier()

    def _batches(self) -> TwoStreamBatches:
        cfg, split = self.cfg, self.s.split
        labeled = load_cases(self.s.layout, split.labeled, with_label=True)
        unlabeled = load_cases(self.s.layout, split.unlabeled, with_label=False) if cfg.batch_unlabeled else []
        transform = self.s.layout.train_transform(tuple(cfg.patch_size), cfg.rot_flip)
        return TwoStreamBatches(labeled, unlabeled, cfg.batch_labeled, cfg.batch_unlabeled, transform, cfg.seed,
                                self.start, cfg.iterations, self.dist.rank, self.dist.world)

    @property
    def selection_cases(self) -> list[str]:
        """Cases the checkpoint is chosen on: the validation cases, or the test cases for the official codes'
        `best_on_test` (a quirk that leaks the test set, kept only to reproduce their numbers)."""
        return self.s.split.test if self.cfg.checkpoint_selection == "best_on_test" else self.s.split.val

    @property
    def _selects_best(self) -> bool:
        """Whether the run validates and keeps `best.pt` (on validation cases, or the best_on_test quirk)."""
        return self.cfg.val > 0 or self.cfg.checkpoint_selection == "best_on_test"

    def _validating(self, iteration: int) -> bool:
        cfg = self.cfg
        return self._selects_best and cfg.val_every > 0 and iteration >= cfg.val_start and (
            iteration % cfg.val_every == 0 or iteration == cfg.iterations)

    def validate(self) -> float:
        """Mean foreground Dice on `selection_cases`."""
        method, device = self.s.method, self.s.device
        net = method.inference_network()
        method.eval()
        scores = []
        for case_id in self.selection_cases:
            case = self.s.layout.read_eval(case_id)
            pred = predict_volume(net, case.image, inference_protocol(self.cfg, self.s.layout), device)
            scores.append(float(np.mean([dice(pred == c, case.label == c)
                                         for c in range(1, self.s.layout.num_classes)])))
        method.train()
        return float(np.mean(scores))

    def _model(self) -> torch.nn.Module:
        """The method itself, or wrapped in DistributedDataParallel under torchrun."""
        method = self.s.method
        if not self.dist.enabled:
            return method
        if self.cfg.sync_bn:
            if self.s.device.type != "cuda":
                raise ConfigError("sync_bn needs CUDA devices (PyTorch's SyncBatchNorm does not run on CPU); "
                                  "drop --set sync_bn=true for CPU runs")
            method = torch.nn.SyncBatchNorm.convert_sync_batchnorm(method)
        device_ids = [self.s.device.index] if self.s.device.type == "cuda" else None
        # Unused parameters are normal here (e.g. a method's stage-specific heads), hence the graph search.
        return torch.nn.parallel.DistributedDataParallel(method, device_ids=device_ids, find_unused_parameters=True)

    def run(self) -> Path:
        """Train to `cfg.iterations`; SIGINT / SIGTERM stop it at the current iteration with a checkpoint
        (`TrainingInterrupted`), a run that fails before its first checkpoint leaves no run folder behind, and the
        run folder's lock is released at the end, whatever happens."""
        try:
            if self.start >= self.cfg.iterations:
                if self.dist.is_main and not (self.out / MODEL).is_file():
                    self._export()  # a run finished before model files existed
                return self.out / CHECKPOINT
            handlers = self._catch_signals()
            try:
                return self._train()
            except TrainingInterrupted:
                raise
            except BaseException:
                self._discard()
                raise
            finally:
                for signum, handler in handlers.items():
                    signal.signal(signum, handler)
        finally:
            self.lock.release()

    def _catch_signals(self) -> dict[int, Any]:
        """Ctrl-C and `kill` only set a flag, read between iterations; a second signal acts at once."""
        if threading.current_thread() is not threading.main_thread():
            return {}
        previous = {}

        def stop(signum: int, _frame: object) -> None:
            self._stop = signal.Signals(signum).name
            for number, handler in previous.items():  # a second Ctrl-C interrupts the checkpoint write itself
                signal.signal(number, handler)

        for signum in (signal.SIGINT, signal.SIGTERM):
            previous[signum] = signal.signal(signum, stop)
        return previous

    def _stopping(self) -> bool:
        """Whether a signal asked to stop; under torchrun every process agrees (one small collective)."""
        if not self.dist.enabled:
            return self._stop is not None
        return not self.dist.all_true(torch.tensor(self._stop is None, device=self.s.device))

    def start_lines(self) -> list[str]:
        """What this call trains, printed before the first iteration: data, split, window, schedule changes."""
        cfg, split = self.cfg, self.s.split
        val = f", {len(split.val)} validation" if split.val else ""
        lines = [f"train {cfg.method} on {cfg.data} ({self.s.layout.name}: {len(split.labeled)} labelled, "
                 f"{len(split.unlabeled)} unlabelled{val} cases) on {self.s.device}, iterations "
                 f"{self.start + 1}..{cfg.iterations} into {self.out}",
                 f"window   patch {'x'.join(map(str, cfg.patch_size))}, stride {'x'.join(map(str, cfg.stride))}: "
                 f"{self.plan.get('source', '')}"]
        if self.history and self.history[-1]["extended_at"] == self.start:
            lines.append(extension_line(self.history[-1]))
        return lines

    def _train(self) -> Path:
        cfg, method, optimizer, device = self.cfg, self.s.method, self.s.optimizer, self.s.device
        resets = set(method.optimizer_resets())
        compile_networks(method, cfg.compile)
        model = self._model()
        channels_last = uses_channels_last(cfg, device, self.s.method.spec.spatial_dims)
        loader = batch_loader(self._batches(), cfg.num_workers, pin_memory=device.type == "cuda")
        main = self.dist.is_main
        progress = Progress(self.start, cfg.iterations, self.progress and main)
        writer = log_file = None
        if main:
            from torch.utils.tensorboard import SummaryWriter

            writer = SummaryWriter(str(self.out / "tensorboard"), purge_step=self.start + 1)
            log_path = self.out / "metrics.jsonl"
            truncate_log(log_path, self.start)
            log_file = open(log_path, "a")  # noqa: SIM115 - closed in finally
        if main and self.progress:
            for line in self.start_lines():
                print(line, file=sys.stderr, flush=True)
        method.train()
        t0 = self._t0 = time.perf_counter()
        t_window, done_in_window = t0, 0
        last_saved = iteration = self.start
        last: dict[str, Any] = {}
        first_bad = torch.zeros((), dtype=torch.int64, device=device)  # first non-finite update, kept on device
        skipped = torch.zeros((), dtype=torch.int64, device=device)
        batches = iter(loader)
        try:
            while iteration < cfg.iterations:
                try:
                    batch = next(batches)
                except Exception:
                    if self._stop is None:
                        raise
                    break  # a Ctrl-C also reached the batch workers: stop at the last completed iteration
                iteration += 1
                ctx = StepContext(iteration, cfg.iterations, len(self.s.split.labeled))
                if iteration - 1 in resets:
                    optimizer.state.clear()  # a fresh optimiser for the method's next stage (e.g. BCP)
                lr = learning_rate(cfg, iteration)
                for group in optimizer.param_groups:
                    group["lr"] = lr
                batch = batch.to(device, channels_last)
                with autocast_for(device, cfg.cpu_bf16) if cfg.amp else torch.autocast(device.type, enabled=False):
                    step = model(batch, ctx)
                optimizer.zero_grad(set_to_none=True)
                step.loss.backward()
                finite = torch.isfinite(step.loss.detach())
                first_bad = torch.where(~finite & (first_bad == 0), iteration, first_bad)
                if cfg.on_nonfinite == "skip":
                    if self.dist.all_true(finite):  # a host sync per update, the price of skipping
                        optimizer.step()
                        method.after_step(ctx)
                    else:
                        skipped += 1
                        first_bad.zero_()
                else:
                    optimizer.step()
                    method.after_step(ctx)
                done_in_window += 1
                logging = iteration % cfg.log_every == 0 or iteration == cfg.iterations
                saving = iteration % cfg.checkpoint_every == 0 or iteration == cfg.iterations
                # Never write a checkpoint from diverged weights.
                if (logging or saving) and not self.dist.all_true(first_bad == 0):
                    raise DivergenceError(
                        f"loss became NaN/Inf at iteration {int(first_bad.max())} (seen at {iteration}); the last "
                        f"good checkpoint is {self.out / CHECKPOINT} (iteration {last_saved}); lower the "
                        "learning rate or check the data, then continue with --resume, or set "
                        "on_nonfinite=skip to skip such updates")
                if logging:
                    now = time.perf_counter()
                    record = {"iteration": iteration, "lr": lr, "loss": float(step.loss.detach()),
                              **{k: float(v) for k, v in step.logs.items()},
                              "s_per_it": (now - t_window) / done_in_window, "skipped_updates": int(skipped),
                              "wall_s": round(self.train_wall_s(), 3)}
                    t_window, done_in_window = now, 0
                    last.update(iteration=iteration, loss=record["loss"])
                    if main:
                        for key, value in record.items():
                            if key != "iteration":
                                writer.add_scalar(key, value, iteration)
                        log_file.write(json.dumps(record) + "\n")
                        log_file.flush()
                        progress.update(iteration, record)
                if self._validating(iteration):
                    improved = False
                    if main:  # evaluation once, on rank 0
                        t_val = time.perf_counter()
                        score = self.validate()
                        seconds = time.perf_counter() - t_val
                        self._val_s += seconds
                        t_window += seconds  # keeps validation out of s_per_it too
                        writer.add_scalar("val/dice", score, iteration)
                        log_file.write(json.dumps({"iteration": iteration, "val_dice": score,
                                                   "wall_s": round(self.train_wall_s(), 3)}) + "\n")
                        improved = score > self.best["dice"]
                        if improved:
                            self.best = {"dice": score, "iteration": iteration}
                        last["val_dice"] = {"dice": score, "iteration": iteration}
                        progress.validated(iteration, score, self.best, seconds)
                    if self.dist.gather(improved)[0]:
                        self._save(BEST, iteration)
                    self.dist.barrier()
                if saving:
                    self._save(CHECKPOINT, iteration)
                    last_saved = iteration
                if self._stopping():
                    break
            if self._stop is not None:
                if iteration != last_saved:
                    if not self.dist.all_true(first_bad == 0):
                        raise DivergenceError(f"interrupted at iteration {iteration} after the loss became NaN/Inf "
                                              f"(iteration {int(first_bad.max())}); the last good checkpoint is "
                                              f"{self.out / CHECKPOINT} (iteration {last_saved})")
                    self._save(CHECKPOINT, iteration)
                raise TrainingInterrupted(iteration, self.out, self._stop)
        except (OSError, CheckpointWriteError) as exc:  # a full disk, an I/O error: one line, what survives
            raise self._write_failure(exc, last_saved) from None
        finally:
            progress.close()
            if main:
                writer.close()
                with contextlib.suppress(OSError):  # fails only after a failed write, reported above
                    log_file.close()
        elapsed = time.perf_counter() - t0 - self._val_s
        if main:
            summary = {"iterations": cfg.iterations - self.start, "wall_s": elapsed, "validation_s": self._val_s,
                       "total_wall_s": self.wall_before + elapsed,
                       "checkpoint_selection": cfg.checkpoint_selection,
                       "selection_cases": len(self.selection_cases) if self._validating(cfg.iterations) else 0,
                       "s_per_it": elapsed / max(cfg.iterations - self.start, 1),
                       "peak_memory_mb": peak_memory_mb(device), "device": str(device), "world_size": self.dist.world,
                       "skipped_updates": int(skipped), "best_val": self.best,
                       "last": {"iteration": cfg.iterations, "loss": last.get("loss"),
                                "val_dice": last.get("val_dice")},
                       "window": self.plan, "extensions": self.history}
            (self.out / "train_summary.json").write_text(json.dumps(summary, indent=1))
            self._export()
        shutdown(self.dist)
        return self.out / CHECKPOINT

    def _export(self) -> None:
        """`model.pt`: the weights the run's selection rule chose, as `semiseg export` writes them."""
        rule = self.cfg.checkpoint_selection
        chosen = self.out / (BEST if rule.startswith("best") else CHECKPOINT)
        if not chosen.is_file():
            return
        try:
            export_model(chosen, self.out / MODEL, rule)
        except CheckpointError as exc:  # e.g. a file of the user's named model.pt: the run itself is complete
            print(f"note: {exc}", file=sys.stderr)
