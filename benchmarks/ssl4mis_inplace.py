"""Run one update of an SSL4MIS 3D training script in place, unmodified, and hand back its loop's locals.

Used by `official_step_cps.py` and `official_step_urpc.py`. The script runs with `runpy.run_path(...,
run_name="__main__")` and its own command-line options, from a scratch folder two levels deep (it writes
`../model/...`), with these replacements around it, never inside it:
- `.cuda()` is the identity (CPU); modules it imports only for logging, progress bars or the validation code it
  never reaches in one update (tensorboardX, torchvision, tqdm, SimpleITK,
  medpy; batchgenerators for the nnU-Net class its network factory imports) are stand-ins when not installed;
  its `shutil.copytree` of its own code is dropped;
- its dataset class (`dataloaders.brats2019.BraTS2019`), batch sampler and `DataLoader` give it one given batch;
- its network factory builds the caller's network; `torch.optim.SGD` is wrapped: when the first optimiser is
  built (after the script's own initialisation), `prepare(nets)` runs (seeded weights, keyed dropout) and every
  optimiser starts at the caller's learning rate; the first `step` records the gradients, the last one (the
  script's `optimizer.step()` / `optimizer2.step()`) records the weights and ends the run;
- `utils.ramps.sigmoid_rampup` is called with the epoch of the compared update in place of the loop's (the
  iteration counter starts at 0 in a fresh run).
Every replacement is undone afterwards.
"""

from __future__ import annotations

import contextlib
import importlib
import io
import logging
import os
import runpy
import shutil
import sys
import tempfile
import types
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import torch
from torch import nn

_PACKAGES = ("networks", "utils", "dataloaders", "val_3D", "val_urpc_util", "model", "util")


class _Done(Exception):
    """Raised by the wrapped optimiser after the last step of the update."""


class _Nothing:
    """Any attribute, any call: for a writer or a transform that only logging or unused code touches."""

    def __getattr__(self, name: str) -> _Nothing:
        if name.startswith("__"):
            raise AttributeError(name)
        return _Nothing()

    def __call__(self, *args: Any, **kwargs: Any) -> _Nothing:
        return _Nothing()


class _StubModule(types.ModuleType):
    def __getattr__(self, name: str) -> Any:
        if name.startswith("__"):
            raise AttributeError(name)
        if name == "tqdm":  # tqdm(iterable, ...) must still iterate
            return lambda iterable=None, *a, **k: _Progress(iterable)
        return _Nothing()


class _Progress:
    def __init__(self, iterable: Any) -> None:
        self.iterable = iterable

    def __iter__(self) -> Iterator[Any]:
        return iter(self.iterable)

    def close(self) -> None:
        pass


_OPTIONAL = ("tensorboardX", "torchvision", "torchvision.transforms", "torchvision.utils", "tqdm", "SimpleITK",
             "medpy", "medpy.metric", "batchgenerators", "batchgenerators.augmentations",
             "batchgenerators.augmentations.utils")


@contextlib.contextmanager
def _patched(obj: Any, name: str, value: Any) -> Iterator[None]:
    old = getattr(obj, name)
    setattr(obj, name, value)
    try:
        yield
    finally:
        setattr(obj, name, old)


class _OneBatch:
    """The script's `DataLoader`: the given batch, once per epoch."""

    def __init__(self, batch: dict[str, torch.Tensor]) -> None:
        self.batch = batch

    def __call__(self, *args: Any, **kwargs: Any) -> _OneBatch:
        return self

    def __len__(self) -> int:
        return 1

    def __iter__(self) -> Iterator[dict[str, torch.Tensor]]:
        yield {k: v.clone() for k, v in self.batch.items()}


class _StandInDataset:
    def __init__(self, *args: Any, **kwargs: Any) -> None:
        pass

    def __len__(self) -> int:
        return 250


def run(code: Path, script: str, argv: list[str], batch: dict[str, torch.Tensor], factory: tuple[str, str],
        build: Callable[[], nn.Module], prepare: Callable[[list[nn.Module]], None], lr: float,
        ramp_epoch: int, steps: int) -> dict[str, Any]:
    """Locals of the script's `train` frame after `steps` optimiser steps, plus `grads` (first step, every net's
    parameters by net index) and `nets` (the networks, weights after the update)."""
    code = Path(code).resolve()
    nets: list[nn.Module] = []
    record: dict[str, Any] = {"steps": 0}
    real_sgd = torch.optim.SGD

    class RecordingSGD(real_sgd):  # type: ignore[misc, valid-type]
        def __init__(self, params: Any, *args: Any, **kwargs: Any) -> None:
            if "prepared" not in record:
                prepare(nets)
                record["prepared"] = True
            kwargs["lr"] = lr
            super().__init__(params, *args[1:], **kwargs)

        def step(self, closure: Any = None) -> Any:
            if record["steps"] == 0:
                record["grads"] = [{n: p.grad.detach().clone() for n, p in net.named_parameters()} for net in nets]
            out = super().step(closure)
            record["steps"] += 1
            if record["steps"] == steps:
                raise _Done
            return out

    def network(*args: Any, **kwargs: Any) -> nn.Module:
        net = build()
        nets.append(net)
        return net

    saved_modules = {name: mod for name, mod in sys.modules.items() if name.split(".")[0] in _PACKAGES}
    for name in saved_modules:
        del sys.modules[name]
    stubs = []
    for name in _OPTIONAL:
        try:
            importlib.import_module(name)
        except ImportError:
            sys.modules[name] = _StubModule(name)
            stubs.append(name)
    scratch = Path(tempfile.mkdtemp(prefix="ssl4mis-inplace-")).resolve()
    work = scratch / "a" / "b"
    work.mkdir(parents=True)
    cwd, argv0, handlers = os.getcwd(), sys.argv, list(logging.getLogger().handlers)
    sys.path.insert(0, str(code))
    frame_locals: dict[str, Any] = {}
    try:
        os.chdir(work)
        brats = importlib.import_module("dataloaders.brats2019")
        factory_module = importlib.import_module(factory[0])
        ramps = importlib.import_module("utils.ramps")
        real_ramp = ramps.sigmoid_rampup
        sys.argv = [script, *argv]
        with contextlib.ExitStack() as stack:
            for obj, name, value in (
                    (torch.Tensor, "cuda", lambda self, *a, **k: self), (nn.Module, "cuda", lambda self, *a, **k: self),
                    (brats, "BraTS2019", _StandInDataset), (brats, "TwoStreamBatchSampler", _StandInDataset),
                    (torch.utils.data, "DataLoader", _OneBatch(batch)), (factory_module, factory[1], network),
                    (torch.optim, "SGD", RecordingSGD), (shutil, "copytree", lambda *a, **k: None),
                    (ramps, "sigmoid_rampup", lambda current, length: real_ramp(ramp_epoch, length))):
                stack.enter_context(_patched(obj, name, value))
            try:
                with contextlib.redirect_stdout(io.StringIO()):
                    runpy.run_path(str(code / script), run_name="__main__")
            except _Done:
                tb = sys.exc_info()[2]
                while tb is not None:
                    if tb.tb_frame.f_code.co_name == "train":
                        frame_locals = dict(tb.tb_frame.f_locals)
                    tb = tb.tb_next
            else:
                raise RuntimeError(f"{script}: the loop ended before {steps} optimiser steps")
    finally:
        os.chdir(cwd)
        sys.argv = argv0
        sys.path.remove(str(code))
        root = logging.getLogger()
        for handler in list(root.handlers):
            if handler not in handlers:
                root.removeHandler(handler)
                handler.close()
        for name in [n for n in sys.modules if n.split(".")[0] in _PACKAGES] + stubs:
            del sys.modules[name]
        sys.modules.update(saved_modules)
        shutil.rmtree(scratch, ignore_errors=True)
    if not frame_locals:
        raise RuntimeError(f"{script}: no `train` frame in the traceback")
    return {**frame_locals, "grads": record["grads"], "nets": nets}
