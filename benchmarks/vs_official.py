"""One training step of the official code against semiseg on the same CPU, batch shape and data, interleaved.

    python benchmarks/vs_official.py --official-root /tmp/official --sizes mini paper --repeats 3
    python benchmarks/vs_official.py --official-root /tmp/official --settings caml --sizes mini --repeats 3 \\
        --eval-cases 4 --update-md

`--official-root DIR` holds the official checkouts, never copied into this repository: `CAML`
(Herschel555/CAML), `MLRPL` (Jiawei0o0/mutual-learning-with-reliable-pseudo-labels), `CrossMatch`
(AiEson/CrossMatch), `SSL4MIS` (HiLab-git/SSL4MIS: Mean Teacher and UA-MT) and `MC-Net` (ycwu1997/MC-Net).
Running them needs tqdm, tensorboardX and torchvision (and medpy for the evaluation), which semiseg itself does not.

How the official step is timed: each official training script runs unmodified (`runpy`) in a child process, from a
scratch folder, with `.cuda()` made a no-op (CPU), and with three things replaced around it, never inside it:
its dataset classes by empty stand-ins and `torch.utils.data.DataLoader` by a loader that hands it, in the
script's own batch format, the same synthetic batches the semiseg child gets (so data loading and the official
CPU-side augmentations, which run in loader worker processes there, are not timed on either side: semiseg's own
on-device augmentation, e.g. CrossMatch's strong views, *is* inside its step); the network class is given
`n_filters` where its constructor takes it (the scripts hard-code 16). A step is the time between two
consecutive batch requests of the training loop: forward, losses, backward, optimiser, the script's own logging.
Writes outside the scratch folder (the scripts' absolute snapshot paths, `shutil.rmtree`, code copies) are
redirected into it or dropped. The semiseg child runs `train_step` + backward + update as the trainer does, at
its default settings (`channels_last=auto`, fp32).

Memory: every child's peak resident set (`ru_maxrss` from `wait4`, MiB) is read when it exits; each side is its own
process, so the peaks are per side. `--memory-only` writes a table of the peaks alone (section vs-official-memory),
for a machine too loaded for the times to mean anything:

    python benchmarks/vs_official.py --official-root /tmp/official --settings caml mlrpl crossmatch_la --sizes mini \
        --repeats 1 --memory-only --update-md

Interleaving: for each setting and size, `--repeats` rounds of (official child, semiseg child), each timing
`--steps` steps after one warm-up step; the table gives min / median / max over every timed step.

Evaluation (`--eval-cases N`): a VNet trained briefly by semiseg on LA-mini (downsampled LA, the
benchmarks/la_mini.py data) is evaluated on the first N LA-mini test volumes by the official CAML test functions
(`utils/test_patch.test_all_case`: one window at a time, medpy metrics, printed to 5 decimals) and by
`semiseg evaluate`; the per-case metrics must agree to the official print precision.
"""

from __future__ import annotations

import argparse
import contextlib
import functools
import io
import json
import os
import re
import runpy
import shutil
import statistics
import subprocess
import sys
import tempfile
import time
import types
from pathlib import Path
from typing import Any

import numpy as np
import torch

_RMTREE = shutil.rmtree  # kept: the official scripts' own rmtree calls are dropped (`_confine`)

sys.path.insert(0, str(Path(__file__).resolve().parent))
from common import REPO, markdown_table, stamp, update_section  # noqa: E402

# Batch shapes: LA-mini (benchmarks/la_mini.py: 64x64x32, 8 filters) and the papers' (112x112x80, 16 filters);
# ACDC is 2D (the official UNet has fixed widths).
MEMORY_NOTE = (
    "Each side runs in its own fresh process (the official script unmodified, as in the timing table above; semiseg's "
    "`train_step` + backward + update at its defaults), one warm-up and `--steps` training steps on the same "
    "synthetic batches; the peak resident set (`ru_maxrss`, MiB) of the whole process is read when it exits, so it "
    "includes the interpreter, the imports, the network, the optimiser state and the steps, on both sides alike. "
    "The largest over the `--repeats` children of a side is given. The step times of this run are not reported: "
    "the machine was shared with other jobs (load above), so they mean nothing; the peaks do not depend on the load.")
EVAL_ITERATIONS = 300  # the evaluated VNet: enough for non-empty predictions on the test volumes
SIZES = {"tiny": ((32, 32, 32), 4), "mini": ((64, 64, 32), 8), "paper": ((112, 112, 80), 16)}  # tiny: smoke runs


@functools.cache
def settings() -> dict[str, dict[str, Any]]:
    """Per setting: the official script (folder, file, arguments), what to stand in for, and the semiseg method."""
    la = {"dataset_names": ["LAHeart"], "dims": 3}
    return {
        "caml": {**la, "folder": "CAML/code", "script": "train_caml.py", "argv": ["--labelnum", "8"],
                 "iter_arg": "--max_iteration", "root_arg": "--root_path", "datasets": "dataloaders.dataset",
                 "net": ("networks.net_factory", "CAML3d_v1"), "format": "dict_idx", "method": "caml",
                 "batch": (2, 2)},
        "mlrpl": {**la, "folder": "MLRPL/code", "script": "train_Mutual_Reliable.py",
                  "argv": ["--labelnum", "8", "--model", "mine3d_v1", "--exp", "mine"],
                  "iter_arg": "--max_iteration", "root_arg": "--root_path", "datasets": "dataloaders.dataset",
                  "net": ("networks.net_factory", "Mine3d_v1"), "format": "dict", "method": "mlrpl",
                  "batch": (2, 2)},
        "crossmatch_la": {**la, "folder": "CrossMatch/LA/code", "script": "train_cross_match.py",
                          "argv": ["--label_num", "8"], "iter_arg": "--max_iterations", "root_arg": "--root_path",
                          "datasets": "dataloaders.la_heart", "net": ("networks.vnet", "VNet"),
                          "format": "crossmatch", "method": "crossmatch", "batch": (2, 2)},
        "uamt": {"dataset_names": ["BraTS2019"], "dims": 3, "folder": "SSL4MIS/code",
                 "script": "train_uncertainty_aware_mean_teacher_3D.py", "argv": ["--model", "vnet",
                                                                                 "--labeled_num", "8"],
                 "iter_arg": "--max_iterations", "root_arg": "--root_path", "datasets": "dataloaders.brats2019",
                 "net": ("networks.net_factory_3d", "VNet"), "format": "dict", "method": "uamt", "batch": (2, 2)},
        "mean_teacher": {"dataset_names": ["BraTS2019"], "dims": 3, "folder": "SSL4MIS/code",
                         "script": "train_mean_teacher_3D.py", "argv": ["--model", "vnet", "--labeled_num", "8"],
                         "iter_arg": "--max_iterations", "root_arg": "--root_path",
                         "datasets": "dataloaders.brats2019", "net": ("networks.net_factory_3d", "VNet"),
                         "format": "dict", "method": "mean_teacher", "batch": (2, 2)},
        "crossmatch_acdc": {"dataset_names": ["ACDCDataset"], "dims": 2, "folder": "CrossMatch/ACDC",
                            "script": "train_cross_match.py", "argv": ["--labeled-id-path", "l", "--unlabeled-id-path",
                                                                       "u"],
                            "config": "configs/acdc.yaml", "iter_arg": None, "root_arg": "--save-path",
                            "datasets": "dataset.acdc", "net": ("model.unet", "UNet"), "format": "crossmatch",
                            "method": "crossmatch", "preset": "acdc-3", "batch": (4, 4), "classes": 4, "ddp": True,
                            "sizes": {"mini": ((128, 128), 16), "paper": ((256, 256), 16)}},
        "mcnet": {**la, "folder": "MC-Net/code", "script": "train_mcnet_3d.py", "argv": ["--labelnum", "8"],
                  "iter_arg": "--max_iteration", "root_arg": "--root_path", "datasets": "dataloaders.dataset",
                  "net": ("networks.net_factory", "MCNet3d_v1"), "format": "dict", "method": "mcnet",
                  "batch": (2, 2)},
    }


def shape_of(spec: dict[str, Any], size: str) -> tuple[tuple[int, ...], int]:
    """(patch, n_filters) of a setting at a size; 2D settings have their own (the official UNet's widths are fixed)."""
    return spec.get("sizes", SIZES)[size]


def synthetic(step: int, patch: tuple[int, ...], n: int, labeled: int, classes: int = 2) -> tuple:
    """Image [n, 1, *patch] in [0, 1] (blobs plus noise) and label [n, *patch] int64, a function of `step`."""
    g = torch.Generator().manual_seed(1000 + step)
    grid = torch.stack(torch.meshgrid(*[torch.linspace(-1, 1, s) for s in patch], indexing="ij"))
    centres = (torch.rand(n, len(patch), *([1] * len(patch)), generator=g) * 0.6 - 0.3)
    dist = (grid[None] - centres).square().sum(1)
    label = torch.zeros(n, *patch, dtype=torch.int64)
    for c in range(1, classes):
        label[dist < 0.4 / c] = c
    image = (label.float() / max(classes - 1, 1) + 0.3 * torch.randn(n, *patch, generator=g)).clamp(0, 1)[:, None]
    index = torch.tensor([(labeled * step + j) % 8 for j in range(labeled)])
    return image.contiguous(), label, index


def cutmix_boxes(step: int, n: int, patch: tuple[int, ...]) -> torch.Tensor:
    """[n, *patch] 0/1 boxes (a quarter to a half of each axis), for the official CrossMatch loaders."""
    g = torch.Generator().manual_seed(5000 + step)
    box = torch.zeros(n, *patch)
    for i in range(n):
        sl = []
        for s in patch:
            length = int(s * (0.25 + 0.25 * float(torch.rand(1, generator=g))))
            start = int(torch.randint(0, s - length + 1, (1,), generator=g))
            sl.append(slice(start, start + length))
        box[(i, *sl)] = 1
    return box


# ---------------------------------------------------------------------------------------------------- official
class _Done(BaseException):  # noqa: N818 - a signal, not an error; BaseException so `except Exception` lets it by
    """Raised from the stand-in loader once every timed step is done."""


class _Loaders:
    """State shared by the stand-in loaders of one official run: batch requests of the first loader, timed."""

    def __init__(self, fmt: str, patch: tuple[int, ...], batch: tuple[int, int], classes: int, total: int):
        self.fmt, self.patch, self.batch, self.classes, self.total = fmt, patch, batch, classes, total
        self.created: list[Any] = []
        self.marks: list[float] = []

    def item(self, which: int, step: int, dataset: Any) -> Any:
        lab, unl = self.batch
        image, label, index = synthetic(step, self.patch, lab + 2 * unl, lab, self.classes)
        if self.fmt == "dict":
            return {"image": image[:lab + unl], "label": label[:lab + unl]}
        if self.fmt == "dict_idx":
            return {"image": image[:lab + unl], "label": label[:lab + unl],
                    "idx": torch.cat([index, torch.arange(8, 8 + unl)])}
        # CrossMatch: labelled (img, mask); unlabelled and mix (weak, strong1, strong2, box1, box2).
        if getattr(dataset, "mode", "") == "train_l":
            return image[:lab], label[:lab]
        order = [loader for loader in self.created if getattr(loader.dataset, "mode", "") != "train_l"]
        first = lab + unl * min(order.index(self.created[which]), 1)  # the first unlabelled loader, then the mix
        u = image[first:first + unl]
        strong = (u * 0.9 + 0.05).contiguous()
        return (u, strong.clone(), strong.clone(), cutmix_boxes(2 * step + which, unl, self.patch),
                cutmix_boxes(2 * step + which + 7, unl, self.patch))


def _loader_class(state: _Loaders) -> type:
    class StandInLoader:
        """Takes DataLoader's arguments, yields the benchmark's batches; the first loader's requests are timed."""

        def __init__(self, dataset: Any = None, *args: Any, **kwargs: Any) -> None:
            self.dataset, self.which = dataset, len(state.created)
            self.sampler = kwargs.get("sampler") or types.SimpleNamespace(set_epoch=lambda _e: None)
            state.created.append(self)

        def __len__(self) -> int:  # an epoch longer than the benchmark (scripts divide by it)
            return max(state.total + 1, 1000)

        def __iter__(self):
            for step in range(state.total + 1):
                if self.which == 0:
                    state.marks.append(time.perf_counter())
                    if len(state.marks) > state.total:
                        raise _Done
                yield state.item(self.which, step, self.dataset)

    return StandInLoader


class _Stub(types.ModuleType):
    """A module whose every attribute is a do-nothing callable: for imports that only replaced code uses."""

    def __getattr__(self, name: str) -> Any:
        if name.startswith("__"):
            raise AttributeError(name)
        return lambda *a, **k: None


# Imported at the top of official modules but used only by what the benchmark replaces or never calls: torchio by
# the CrossMatch-LA dataset, pandas by its test helper, batchgenerators by SSL4MIS's nnU-Net class (each stubbed only
# when not installed); torchvision's meta kernel for nms
# (its compiled ops do not match this torch build; the scripts use only transforms and make_grid).
_STUBS = {"crossmatch_la": ("torchio", "torchio.transforms", "pandas"),
          "uamt": ("batchgenerators", "batchgenerators.augmentations", "batchgenerators.augmentations.utils"),
          "mean_teacher": ("batchgenerators", "batchgenerators.augmentations", "batchgenerators.augmentations.utils")}


def _stub_modules(setting: str = "") -> None:
    """Also restores NumPy's old aliases (np.int, np.float, np.bool), which the official code (NumPy < 1.24) uses."""
    import importlib.machinery

    for alias, builtin in (("int", int), ("float", float), ("bool", bool)):
        if alias not in np.__dict__:
            setattr(np, alias, builtin)

    for name in ("torchvision._meta_registrations", *_STUBS.get(setting, ())):
        try:
            if name != "torchvision._meta_registrations":
                __import__(name)
                continue
        except ImportError:
            pass
        sys.modules[name] = _Stub(name)
        sys.modules[name].__spec__ = importlib.machinery.ModuleSpec(name, None)
        parent, _, child = name.rpartition(".")
        if parent in sys.modules:
            setattr(sys.modules[parent], child, sys.modules[name])


class _StandInDataset:
    def __init__(self, *args: Any, **kwargs: Any) -> None:
        self.mode = kwargs.get("mode") or kwargs.get("split") or (args[2] if len(args) > 2 else "")
        self.ids = list(range(72))

    def __len__(self) -> int:
        return 72

    def __getitem__(self, i: int) -> Any:
        raise RuntimeError("the benchmark's loader stands in for the dataset")


def _confine(scratch: Path):
    """Redirect the scripts' writes outside `scratch` into it; never delete anything outside it."""
    def inside(path: Any) -> str:
        p = Path(os.path.abspath(str(path)))
        return str(p) if p.is_relative_to(scratch) else str(scratch / "redirected" / p.relative_to(p.anchor))

    real_makedirs = os.makedirs
    os.makedirs = lambda path, *a, **k: real_makedirs(inside(path), *a, **{**k, "exist_ok": True})
    shutil.rmtree = lambda path, *a, **k: None
    shutil.copytree = lambda src, dst, *a, **k: None
    import logging

    real_basic = logging.basicConfig
    logging.basicConfig = lambda **k: real_basic(**{**k, **({"filename": inside(k["filename"])}
                                                          if "filename" in k else {})})
    real_save = torch.save
    torch.save = lambda obj, f, *a, **k: real_save(obj, inside(f), *a, **k) if isinstance(f, str | Path) else \
        real_save(obj, f, *a, **k)
    for module_name in ("tensorboardX", "torch.utils.tensorboard"):
        try:
            module = __import__(module_name, fromlist=["SummaryWriter"])
        except ImportError:
            continue
        real_writer = module.SummaryWriter

        class Writer(real_writer):  # type: ignore[misc, valid-type]
            def __init__(self, logdir: Any = None, *a: Any, **k: Any) -> None:
                super().__init__(inside(logdir or scratch / "runs"), *a, **k)

        module.SummaryWriter = Writer


def _single_process_ddp() -> None:
    """CrossMatch-ACDC is a torchrun script: run it as one gloo process (SyncBatchNorm on one process is
    BatchNorm; DistributedDataParallel keeps its gradient all-reduce, over one process)."""
    import socket

    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    os.environ.update({"RANK": "0", "WORLD_SIZE": "1", "LOCAL_RANK": "0", "MASTER_ADDR": "127.0.0.1",
                       "MASTER_PORT": str(port)})
    helper = __import__("util.dist_helper", fromlist=["_"])

    def setup_distributed(backend: str = "gloo", port: int | None = None) -> tuple[int, int]:
        torch.distributed.init_process_group("gloo", rank=0, world_size=1)
        return 0, 1

    helper.setup_distributed = setup_distributed
    torch.nn.SyncBatchNorm.convert_sync_batchnorm = staticmethod(lambda module, *a, **k: module)
    real_ddp = torch.nn.parallel.DistributedDataParallel

    class CpuDDP(real_ddp):  # type: ignore[misc, valid-type]
        def __init__(self, module: torch.nn.Module, *a: Any, **k: Any) -> None:
            k.pop("device_ids", None)
            k.pop("output_device", None)
            super().__init__(module, **k)

    torch.nn.parallel.DistributedDataParallel = CpuDDP  # type: ignore[misc]


def _set_default(function: Any, name: str, value: Any) -> bool:
    """Change the default of one keyword of `function` in place (the class stays the class: `super(VNet, self)`
    inside it must still work); False when it has no such defaulted parameter."""
    code = function.__code__
    names = code.co_varnames[:code.co_argcount]
    defaults = list(function.__defaults__ or ())
    if name not in names[len(names) - len(defaults):]:
        return False
    defaults[names.index(name) - (len(names) - len(defaults))] = value
    function.__defaults__ = tuple(defaults)
    return True


def run_official(name: str, root: Path, size: str, steps: int, warmup: int) -> dict[str, Any]:
    spec = settings()[name]
    patch, n_filters = shape_of(spec, size)
    code = (root / spec["folder"]).resolve()
    scratch = Path(tempfile.mkdtemp(prefix=f"vs-official-{name}-")).resolve()
    try:
        work = scratch / "a" / "b" / "code"  # "../model" and "../data" of the scripts stay inside scratch
        work.mkdir(parents=True)
        os.chdir(work)
        sys.path.insert(0, str(code))
        _stub_modules(name)
        torch.Tensor.cuda = lambda self, *a, **k: self  # type: ignore[method-assign]
        torch.nn.Module.cuda = lambda self, *a, **k: self  # type: ignore[method-assign]
        _confine(scratch)
        state = _Loaders(spec["format"], patch, spec["batch"], spec.get("classes", 2), warmup + steps)
        if spec.get("ddp"):
            _single_process_ddp()
        torch.utils.data.DataLoader = _loader_class(state)  # type: ignore[misc]
        datasets = __import__(spec["datasets"], fromlist=["_"])
        for cls_name in spec["dataset_names"]:
            setattr(datasets, cls_name, _StandInDataset)
        net_module = __import__(spec["net"][0], fromlist=["_"])
        net_cls = getattr(net_module, spec["net"][1])
        filters = "16 (fixed)"
        if _set_default(net_cls.__init__, "n_filters", n_filters):
            filters = str(n_filters)
        sys.argv = [spec["script"], *spec["argv"], *([spec["iter_arg"], str(10 ** 6)] if spec["iter_arg"] else []),
                    spec["root_arg"], str(scratch) + "/",
                    *(["--config", str(code / spec["config"])] if "config" in spec else [])]
        with contextlib.redirect_stdout(io.StringIO()), contextlib.suppress(_Done):
            runpy.run_path(str(code / spec["script"]), run_name="__main__")
        marks = state.marks
        if len(marks) < warmup + steps + 1:
            raise RuntimeError(f"{name}: the official loop stopped after {len(marks)} batch requests")
        times = [b - a for a, b in zip(marks, marks[1:])][warmup:]
        return {"side": "official", "setting": name, "size": size, "patch": list(patch), "filters": filters,
                "times": times}
    finally:
        os.chdir(REPO)
        _RMTREE(scratch, ignore_errors=True)


# ----------------------------------------------------------------------------------------------------- semiseg
def run_semiseg(name: str, size: str, steps: int, warmup: int, overrides: list[str]) -> dict[str, Any]:
    """The trainer's step (train_step under its autocast, backward, optimiser, after_step) on the same batches."""
    from semiseg.config import build_config, parse_set
    from semiseg.data.loader import Batch
    from semiseg.engine.inference import autocast_for
    from semiseg.engine.trainer import build_method, build_optimizer, set_threads, uses_channels_last
    from semiseg.methods.base import NetSpec, StepContext

    spec = settings()[name]
    patch, n_filters = shape_of(spec, size)
    lab, unl = spec["batch"]
    classes = spec.get("classes", 2)
    n_unl = 2 * unl if spec["method"] == "crossmatch" else unl  # CrossMatch: the unlabelled and the mix stream
    cfg = build_config(spec["method"], None, {"device": "cpu", "patch_size": patch, "n_filters": n_filters,
                                              "batch_labeled": lab, "batch_unlabeled": n_unl,
                                              **parse_set(overrides)}, spec.get("preset", "la-8"))
    device = torch.device("cpu")
    set_threads(cfg.threads)
    torch.manual_seed(cfg.seed)
    method = build_method(cfg, NetSpec(1, classes, len(patch), cfg.n_filters, cfg.norm, cfg.dropout), device)
    channels_last = uses_channels_last(cfg, device, len(patch))
    if channels_last:
        method.to(memory_format=torch.channels_last_3d)
    opt = build_optimizer(cfg, method)
    method.train()
    times = []
    for step in range(warmup + steps):
        image, label, index = synthetic(step, patch, lab + 2 * unl, lab, classes)
        batch = Batch(image[:lab], label[:lab], image[lab:lab + n_unl], index)
        t0 = time.perf_counter()
        batch = batch.to(device, channels_last)
        ctx = StepContext(cfg.iterations // 2, cfg.iterations, 8)  # mid-run: every term of the loss active
        with autocast_for(device, cfg.cpu_bf16) if cfg.amp else torch.autocast("cpu", enabled=False):
            out = method.train_step(batch, ctx)
        opt.zero_grad(set_to_none=True)
        out.loss.backward()
        opt.step()
        method.after_step(ctx)
        times.append(time.perf_counter() - t0)
    return {"side": "semiseg", "setting": name, "size": size, "patch": list(patch), "filters": str(n_filters),
            "channels_last": channels_last, "times": times[warmup:]}


# -------------------------------------------------------------------------------------------------- evaluation
_OFFICIAL_LINE = re.compile(r"^(\d+),\s+([-\d.]+), ([-\d.]+), ([-\d.]+), ([-\d.]+)$")


def run_eval_official(root: Path, run: Path, data: Path, cases: list[str]) -> dict[str, Any]:
    """The official CAML test functions on the semiseg-trained VNet (its weights, the official windows/metrics)."""
    from semiseg.config import TrainConfig
    from semiseg.engine.checkpoint import load_checkpoint
    from semiseg.engine.trainer import build_method
    from semiseg.methods.base import NetSpec

    sys.path.insert(0, str((root / "CAML" / "code").resolve()))
    _stub_modules()
    torch.Tensor.cuda = lambda self, *a, **k: self  # type: ignore[method-assign]
    from utils import test_patch  # the official module

    payload = load_checkpoint(run / "checkpoint.pt")
    cfg = TrainConfig(**payload["config"])
    method = build_method(cfg, NetSpec(**payload["spec"]), torch.device("cpu"))
    method.load_state_dict(payload["method"])
    net = method.inference_network().eval()
    paths = [str(data / "2018LA_Seg_Training Set" / c / "mri_norm2.h5") for c in cases]
    scratch = Path(tempfile.mkdtemp(prefix="vs-official-eval-"))
    (scratch / "pred").mkdir()  # the official function writes its summary to test_save_path/../
    out = io.StringIO()
    t0 = time.perf_counter()
    try:
        with contextlib.redirect_stdout(out):
            test_patch.test_all_case("vnet", 1, net, paths, 2, tuple(cfg.patch_size), cfg.stride[0], cfg.stride[2],
                                     save_result=False, test_save_path=str(scratch / "pred") + "/", metric_detail=1)
    finally:
        shutil.rmtree(scratch, ignore_errors=True)
    elapsed = time.perf_counter() - t0
    rows = [[float(v) for v in m.groups()[1:]] for line in out.getvalue().splitlines()
            if (m := _OFFICIAL_LINE.match(line.strip()))]
    return {"side": "official", "seconds": elapsed, "cases": dict(zip(cases, rows, strict=True))}


def run_eval_semiseg(run: Path, data: Path, cases: list[str]) -> dict[str, Any]:
    from semiseg.engine.evaluate import evaluate_checkpoint

    scratch = Path(tempfile.mkdtemp(prefix="vs-official-eval-"))
    subset = scratch / "LA"
    (subset / "2018LA_Seg_Training Set").mkdir(parents=True)
    for c in (data / "2018LA_Seg_Training Set").iterdir():
        os.symlink(c, subset / "2018LA_Seg_Training Set" / c.name)
    (subset / "train.list").write_text((data / "train.list").read_text())
    (subset / "test.list").write_text("\n".join(cases) + "\n")
    t0 = time.perf_counter()
    try:
        summary = evaluate_checkpoint(run, scratch / "eval", data=str(subset), device="cpu")
    finally:
        shutil.rmtree(scratch, ignore_errors=True)
    elapsed = time.perf_counter() - t0
    return {"side": "semiseg", "seconds": elapsed,
            "cases": {r["case"]: [r["dice"], r["jaccard"], r["hd95"], r["asd"]] for r in summary["cases"]}}


def train_eval_model(data: Path, out: Path, iterations: int) -> Path:
    """A short supervised LA-mini run (the model both evaluations score)."""
    from semiseg.config import build_config
    from semiseg.engine.trainer import Trainer

    if (out / "checkpoint.pt").is_file():
        return out
    cfg = build_config("supervised", None, {"data": str(data), "labeled": 8, "iterations": iterations,
                                            "patch_size": (64, 64, 32), "stride": (9, 9, 2), "n_filters": 8,
                                            "num_workers": 1, "device": "cpu", "checkpoint_every": iterations})
    Trainer(cfg, out, progress=False).run()
    return out


# ------------------------------------------------------------------------------------------------------ driver
def _child(args: list[str]) -> dict[str, Any]:
    """Run one side in a fresh process; its JSON result, with the process's peak resident set (`peak_mib`, read
    from `wait4` when it exits: imports, model, optimiser and every step, warm-up included)."""
    with tempfile.TemporaryFile("w+") as out:
        proc = subprocess.Popen([sys.executable, __file__, *args], stdout=out, text=True)
        _, status, usage = os.wait4(proc.pid, 0)
        code = os.waitstatus_to_exitcode(status)
        if code != 0:
            raise RuntimeError(f"child {' '.join(args)} failed (exit {code}; its error is above)")
        out.seek(0)
        result = json.loads(out.read().strip().splitlines()[-1])
    return {**result, "peak_mib": usage.ru_maxrss / 1024}


def _stats(values: list[float]) -> str:
    return f"{min(values):.2f} / {statistics.median(values):.2f} / {max(values):.2f}"


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--official-root", type=Path, required=True, help="folder of the official checkouts")
    parser.add_argument("--settings", nargs="+", default=None, choices=list(settings()),
                        help="default: every setting whose checkout is present")
    parser.add_argument("--sizes", nargs="+", default=["mini"], choices=list(SIZES))
    parser.add_argument("--repeats", type=int, default=3, help="interleaved rounds (official, semiseg)")
    parser.add_argument("--steps", type=int, default=1, help="timed steps per child, after --warmup")
    parser.add_argument("--warmup", type=int, default=1)
    parser.add_argument("--set", dest="overrides", action="append", default=[], help="semiseg key=value")
    parser.add_argument("--eval-cases", type=int, default=0, help="LA-mini test volumes to evaluate both ways")
    parser.add_argument("--eval-iterations", type=int, default=EVAL_ITERATIONS, help="training of the evaluated model")
    parser.add_argument("--la", type=Path, default=REPO.parent / "shared" / "data" / "LA")
    parser.add_argument("--work", type=Path, default=Path(tempfile.gettempdir()) / "semiseg-vs-official")
    parser.add_argument("--update-md", action="store_true", help="write the vs-official section of BENCHMARKS.md")
    parser.add_argument("--tag", default="", help="suffix of the result file and of the BENCHMARKS.md section")
    parser.add_argument("--memory-only", action="store_true",
                        help="report the peak resident set of each side only (section vs-official-memory): on a "
                        "loaded machine the step times mean nothing, the peaks do not depend on the load")
    parser.add_argument("--child", nargs="+", help=argparse.SUPPRESS)
    args = parser.parse_args()
    root = args.official_root.resolve()
    if args.child:
        kind, *rest = args.child
        if kind == "official":
            result = run_official(rest[0], root, rest[1], args.steps, args.warmup)
        elif kind == "semiseg":
            result = run_semiseg(rest[0], rest[1], args.steps, args.warmup, args.overrides)
        elif kind == "eval-official":
            result = run_eval_official(root, Path(rest[0]), Path(rest[1]), rest[2:])
        else:
            result = run_eval_semiseg(Path(rest[0]), Path(rest[1]), rest[2:])
        print(json.dumps(result))
        return
    if not root.is_dir():
        raise SystemExit(f"--official-root {root}: no such folder (fetch the official repositories there)")
    load_start = os.getloadavg()[0]
    chosen = args.settings or [n for n, s in settings().items() if (root / s["folder"] / s["script"]).is_file()]
    rows, raw = [], []
    for name in chosen:
        for size in args.sizes:
            times: dict[str, list[float]] = {"official": [], "semiseg": []}
            peaks: dict[str, list[float]] = {"official": [], "semiseg": []}
            info: dict[str, Any] = {}
            common = ["--official-root", str(root), "--steps", str(args.steps), "--warmup", str(args.warmup),
                      *[f"--set={o}" for o in args.overrides]]
            for _ in range(args.repeats):
                for side in ("official", "semiseg"):
                    result = _child([*common, "--child", side, name, size])
                    times[side] += result["times"]
                    peaks[side].append(result["peak_mib"])
                    info[side] = result
                    raw.append(result)
                    print(f"{name} {size} {side}: {', '.join(f'{t:.2f}' for t in result['times'])} s, peak "
                          f"{result['peak_mib']:.0f} MiB", file=sys.stderr, flush=True)
            ratio = statistics.median(times["official"]) / statistics.median(times["semiseg"])
            spec = settings()[name]
            lab, unl = spec["batch"]
            memory = [f"{max(peaks['official']):.0f}", f"{max(peaks['semiseg']):.0f}",
                      f"{max(peaks['semiseg']) / max(peaks['official']):.2f}"]
            timing = [_stats(times["official"]), _stats(times["semiseg"]), f"{ratio:.2f}x"]
            rows.append([name, size, "x".join(map(str, info["semiseg"]["patch"])),
                         f"{lab}+{unl}" + (f"+{unl}" if spec["format"] == "crossmatch" else ""),
                         f"{info['official']['filters']} / {info['semiseg']['filters']}",
                         *([] if args.memory_only else timing), *memory, str(len(times["semiseg"]))])
            print(f"{name} {size}: official/semiseg median ratio {ratio:.2f}, peak official "
                  f"{max(peaks['official']):.0f} MiB, semiseg {max(peaks['semiseg']):.0f} MiB", flush=True)
    header = ["setting", "size", "patch", "batch", "filters official / semiseg"]
    if not args.memory_only:
        header += ["official s/step min / median / max", "semiseg s/step min / median / max", "speed-up (medians)"]
    table = markdown_table(header + ["official peak MiB", "semiseg peak MiB", "semiseg / official peak",
                                     "steps each"], rows)
    eval_table, eval_raw = "", None
    if args.eval_cases:
        sys.path.insert(0, str(REPO / "benchmarks"))
        from la_mini import prepare

        data = prepare(args.la, args.work / "la-mini-data")
        model = train_eval_model(data, args.work / "eval-model", args.eval_iterations)
        cases = (data / "test.list").read_text().split()[:args.eval_cases]
        results = []
        for side in ("eval-official", "eval-semiseg"):
            results.append(_child(["--official-root", str(root), "--child", side, str(model), str(data), *cases]))
        official, ours = results
        agree = all(np.allclose(official["cases"][c], [round(v, 5) for v in ours["cases"][c]], atol=1.01e-5)
                    for c in cases)
        eval_raw = results
        eval_table = markdown_table(
            ["volumes", "official test_all_case s", "semiseg evaluate s", "speed-up", "per-case metrics"],
            [[str(len(cases)), f"{official['seconds']:.1f}", f"{ours['seconds']:.1f}",
              f"{official['seconds'] / ours['seconds']:.2f}x",
              "identical (to the official 5 decimals)" if agree else "DIFFER"]])
        print(eval_table, flush=True)
    suffix = ("-memory" if args.memory_only else "") + (f"-{args.tag}" if args.tag else "")
    out = REPO / "benchmarks" / "results" / f"vs_official{suffix}.json"
    run_stamp = stamp()  # before the result file is written: its commit is the code's, not "+dirty"
    out.write_text(json.dumps({"stamp": run_stamp, "steps": raw, "eval": eval_raw}, indent=1))
    print(table)
    if args.update_md:
        cmd = (f"python benchmarks/vs_official.py --official-root DIR --settings {' '.join(chosen)} --sizes "
               f"{' '.join(args.sizes)} --repeats {args.repeats} --steps {args.steps}"
               + (f" --eval-cases {args.eval_cases}" if args.eval_cases else "")
               + (f" --tag {args.tag}" if args.tag else "") + (" --memory-only" if args.memory_only else ""))
        if args.memory_only:
            update_section(f"vs-official{suffix}", f"### Peak memory of one training step, official code vs semiseg "
                           f"(CPU){suffix.removeprefix('-memory')}\n\n{run_stamp}\n\nCommand: `{cmd}`\n\n"
                           f"{MEMORY_NOTE}\n\n{table}\n\n{eval_table}\n")
            return
        update_section(f"vs-official{suffix}", f"### One training step, official code vs semiseg (CPU){suffix}\n\n"
                       f"{run_stamp} Load average (1 min) at the start / end: {load_start:.1f} / "
                       f"{os.getloadavg()[0]:.1f}.\n\n"
                       f"Command: `{cmd}` (interleaved: official, semiseg, official, ...)\n\n{table}\n\n{eval_table}\n")


if __name__ == "__main__":
    main()
