"""Run an official training script's own loop in place, unmodified, for one update (or a whole recipe).

Issue 16's preferred way to compare a whole training update, and the only one for code without a licence:
`runpy.run_path(script, run_name="__main__")` with the script's own options, from a temporary working folder two
levels deep (the scripts write to `../model/...` or `./model/...`), nothing of the script changed. What is patched,
and restored afterwards:

- `torch.Tensor.cuda` / `nn.Module.cuda`: identity (a CPU run);
- `torch.utils.data.DataLoader`: yields the caller's batches (dicts as the official dataset returns them),
  `epoch_length` per epoch of the script's loop; before batch i it may set a local of the loop's frame
  (`on_batch`, e.g. the iteration counter `iter_num`); asked for one more batch than it has, it raises `StopRun`,
  so the update before it has run to its end (optimiser step, EMA, lr change). A script that stops by itself
  first (its `max_iterations`) just returns;
- `torch.optim.SGD.step`: records each parameter's gradient, the learning rate and the locals of the frame that
  called it (loss terms, ramp weight), then steps;
- imports the update never reads (tensorboardX, tqdm, torchvision, medpy, pandas, cv2: logging, progress bars,
  image grids, CSV logs, validation metrics) are stand-in modules when they are not installed, and
  `torch.utils.tensorboard` always is.

Everything else (the caller's own patches of the network class or the dataset class in the script's imported
modules) goes through `patch`. `run` returns the locals of every frame of the script's files that the stop
unwound, keyed by function name (`<module>` for a script whose loop runs at module level).
"""

from __future__ import annotations

import contextlib
import ctypes
import importlib
import importlib.machinery
import importlib.util
import logging
import os
import runpy
import sys
import tempfile
import types
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import torch
from torch import nn


class StopRun(Exception):
    """Raised by the stand-in data loader once its batches are used up."""


@contextlib.contextmanager
def patch(obj: object, name: str, value: object) -> Iterator[None]:
    missing = object()
    old = getattr(obj, name, missing)
    setattr(obj, name, value)
    try:
        yield
    finally:
        if old is missing:
            delattr(obj, name)
        else:
            setattr(obj, name, old)


class _Anything:
    """A stand-in that accepts any call or attribute and does nothing (a SummaryWriter, a DataFrame, ...)."""

    def __init__(self, *args: Any, **kwargs: Any) -> None:
        pass

    def __call__(self, *args: Any, **kwargs: Any) -> _Anything:
        return _Anything()

    def __getattr__(self, name: str) -> _Anything:
        return _Anything()


class _Progress:
    """`tqdm(iterable)`: the iterable itself, plus the `close` the scripts call."""

    def __init__(self, iterable: Any = (), *args: Any, **kwargs: Any) -> None:
        self.iterable = iterable

    def __iter__(self) -> Iterator[Any]:
        return iter(self.iterable)

    def close(self) -> None:
        pass


def _stand_ins() -> dict[str, types.ModuleType]:
    modules: dict[str, types.ModuleType] = {}

    def module(name: str, **attrs: Any) -> types.ModuleType:
        mod = types.ModuleType(name)
        mod.__spec__ = importlib.machinery.ModuleSpec(name, None)
        mod.__dict__.update(attrs)
        mod.__getattr__ = _module_attribute  # type: ignore[method-assign]
        modules[name] = mod
        return mod

    module("tensorboardX", SummaryWriter=_Anything)
    module("torch.utils.tensorboard", SummaryWriter=_Anything)
    module("tqdm", tqdm=_Progress)
    transforms = module("torchvision.transforms", Compose=_Anything)
    utils = module("torchvision.utils", make_grid=_Anything())
    module("torchvision", transforms=transforms, utils=utils)
    binary = module("medpy.metric.binary", dc=lambda *a: 0.0)
    metric = module("medpy.metric", binary=binary)
    module("medpy", metric=metric)
    module("pandas", DataFrame=_Anything)
    module("cv2")
    # torch's own SummaryWriter would write event files into the deleted working folder at exit: always a stand-in.
    return {name: mod for name, mod in modules.items() if name == "torch.utils.tensorboard" or not _installed(name)}


def _module_attribute(name: str) -> type[_Anything]:
    """Any public name of a stand-in module (`from tensorboardX import SummaryWriter`); dunders stay absent."""
    if name.startswith("__"):
        raise AttributeError(name)
    return _Anything


def _installed(name: str) -> bool:
    try:
        return importlib.util.find_spec(name) is not None
    except (ImportError, ValueError):
        return False


def set_frame_local(frame: types.FrameType, name: str, value: object) -> None:
    """Set a local of a running frame (a module frame's locals are its globals; a function's need the
    write-back that Python < 3.13 does not do by itself)."""
    frame.f_locals[name] = value
    if frame.f_code.co_name != "<module>":
        ctypes.pythonapi.PyFrame_LocalsToFast(ctypes.py_object(frame), ctypes.c_int(0))


class Recorder:
    """What `SGD.step` saw at each call: gradients (by parameter object), learning rate, the caller's locals."""

    def __init__(self, keep_grads: bool = True, locals_kept: tuple[str, ...] = ()) -> None:
        self.keep_grads, self.locals_kept = keep_grads, locals_kept
        self.grads: list[dict[int, torch.Tensor]] = []
        self.lr: list[float] = []
        self.frame_locals: list[dict[str, Any]] = []


def run(script: Path, argv: list[str], batches: list[dict[str, torch.Tensor]], epoch_length: int,
        recorder: Recorder, on_batch: Callable[[types.FrameType, int], None] | None = None,
        patches: Callable[[], contextlib.AbstractContextManager[Any]] | None = None,
        chdir_depth: int = 2, before: Callable[[], None] | None = None) -> dict[str, dict[str, Any]]:
    """Run `script` (its code folder first on sys.path) until `batches` are used up; `patches()` is entered
    after the code folder is importable, for patches of the script's own modules. Returns the unwound frames'
    locals by function name."""
    script = Path(script).resolve()
    code_dir = script.parent
    own = {p.stem for p in code_dir.iterdir() if p.suffix == ".py" or (p.is_dir() and not p.name.startswith("."))}

    def purge() -> None:
        for name in list(sys.modules):
            if name.split(".")[0] in own:
                del sys.modules[name]

    cursor = iter(enumerate(batches))

    class Loader:
        def __init__(self, *args: Any, **kwargs: Any) -> None:
            pass

        def __len__(self) -> int:
            return epoch_length

        def __iter__(self) -> Iterator[dict[str, torch.Tensor]]:
            for _ in range(epoch_length):  # one epoch of the script's loop
                i, batch = next(cursor, (None, None))
                if batch is None:
                    raise StopRun
                if on_batch is not None:
                    on_batch(sys._getframe(1), i)
                yield batch

    original_step = torch.optim.SGD.step

    def step(self: torch.optim.SGD, *args: Any, **kwargs: Any) -> Any:
        frame = sys._getframe(1)  # torch wraps `step` (profiling hooks): the script's frame is further up
        while frame is not None and not frame.f_code.co_filename.startswith(str(code_dir)):
            frame = frame.f_back
        caller = frame.f_locals if frame is not None else {}
        recorder.frame_locals.append({k: _detached(caller[k]) for k in recorder.locals_kept if k in caller})
        recorder.lr.append(float(self.param_groups[0]["lr"]))
        if recorder.keep_grads:
            recorder.grads.append({id(p): p.grad.detach().clone() for g in self.param_groups for p in g["params"]
                                   if p.grad is not None})
        return original_step(self, *args, **kwargs)

    importlib.import_module("torch._dynamo")  # the optimisers import it lazily; it probes pandas, torchvision, ...
    saved_argv, saved_path, saved_cwd = list(sys.argv), list(sys.path), os.getcwd()
    root_logger = logging.getLogger()
    saved_handlers, saved_level = list(root_logger.handlers), root_logger.level
    stand_ins = _stand_ins()
    saved_modules = {name: sys.modules.get(name) for name in stand_ins}
    unwound: dict[str, dict[str, Any]] = {}
    with tempfile.TemporaryDirectory() as tmp, contextlib.ExitStack() as stack:
        cwd = Path(tmp).joinpath(*["run"] * chdir_depth)
        (cwd / "code").mkdir(parents=True)  # SS-Net copies ./code/ into its snapshot folder
        stack.enter_context(patch(torch.Tensor, "cuda", lambda self, *a, **k: self))
        stack.enter_context(patch(nn.Module, "cuda", lambda self, *a, **k: self))
        stack.enter_context(patch(torch.utils.data, "DataLoader", Loader))
        stack.enter_context(patch(torch.optim.SGD, "step", step))
        sys.modules.update(stand_ins)
        purge()
        sys.path.insert(0, str(code_dir))
        os.chdir(cwd)
        sys.argv = [str(script), *argv]
        try:
            if patches is not None:
                stack.enter_context(patches())
            if before is not None:
                before()
            with open(os.devnull, "w") as devnull, contextlib.redirect_stdout(devnull):
                runpy.run_path(str(script), run_name="__main__")
        except StopRun as stop:
            tb = stop.__traceback__
            while tb is not None:
                if Path(tb.tb_frame.f_code.co_filename).resolve().parent == code_dir:
                    unwound[tb.tb_frame.f_code.co_name] = dict(tb.tb_frame.f_locals)
                tb = tb.tb_next
        finally:
            os.chdir(saved_cwd)
            sys.argv, sys.path[:] = saved_argv, saved_path
            for handler in root_logger.handlers:
                if handler not in saved_handlers:
                    handler.close()
            root_logger.handlers[:] = saved_handlers
            root_logger.setLevel(saved_level)
            purge()
            for name, mod in saved_modules.items():
                if mod is None:
                    sys.modules.pop(name, None)
                else:
                    sys.modules[name] = mod
    return unwound


def _detached(value: Any) -> Any:
    return value.detach().clone() if isinstance(value, torch.Tensor) else value
