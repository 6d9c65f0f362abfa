"""CrossMatch's whole training update: the official scripts, run in place and unmodified, against semiseg.

    python benchmarks/official_equivalence.py --method crossmatch --step method --iteration 7000 \\
        --official /tmp/official/CrossMatch --official-commit 59772e00c3d2bee5e3a603e596ef120eb9f88fd3
    python benchmarks/official_equivalence.py --method crossmatch --dims 2 --step method \\
        --official /tmp/official/CrossMatch --official-commit 59772e00c3d2bee5e3a603e596ef120eb9f88fd3

`--write-fixture` saves `tests/golden/steps/crossmatch.json` / `crossmatch_2d.json`, which
`tests/test_golden.py` and `tests/test_golden_crossmatch.py` recompute with semiseg alone.

Both scripts (`LA/code/train_cross_match.py` with the `la-8` options of `LA/code/train.sh`;
`ACDC/train_cross_match.py` with `configs/acdc.yaml` at crop 32, batch 2, 2 epochs) are executed with
`runpy.run_path(..., run_name="__main__")` in a temporary folder, in float64, with these patches (all restored):
- `.cuda()` is the identity; the ACDC `setup_distributed` starts a one-process gloo group (file store),
  `SyncBatchNorm.convert_sync_batchnorm` is the identity (on one GPU SyncBatchNorm runs plain batch norm) and
  the real `DistributedDataParallel` wraps the model without `device_ids` (CPU);
- the data: `LAHeart` / `ACDCDataset` and `DataLoader` yield the seeded batches of `tests/golden_step_crossmatch.py
  :case` (the same tensors semiseg gets: images, labels, strong views, CutMix boxes; the ACDC u_w and mix
  images on 8-bit levels by the dataset's own formula, semiseg quantising them itself);
- the network class (`networks.vnet.VNet`, 4 base filters; `model.unet.UNet`) loads the seeded weights mapped
  with `semiseg.official.key_map` and gets keyed dropout (`StepDropout`; the LA VNet's one dropout module is
  keyed x5 / x9 by the encoder / decoder call) and keyed feature perturbation (`FeatureDropout` in place of
  the two `PertDropout.dropouts`);
- recording only: `dice_loss` (LA) / `DiceLoss` (ACDC) record each call's target, ignore mask and value; the
  optimiser's `step` records the learning rate, gradients, weights and state, reads the loss terms from the
  loop's frame and raises at the last update; a pre-hook records the network's mode at every call (the mix
  teacher is the first call of an update); tensorboard writers, tqdm and the unused augmentation / metrics
  packages (torchio, torchvision, medpy) are stand-ins when they are not installed.
- LA only: `utils.ramps.sigmoid_rampup` is shifted by K - 2, so that the threshold of update 2 (the compared
  one) is the official threshold of update K = `--iteration`; the learning rate stays that of update 2.

LA compares update 2 (after one AdamW update), ACDC update 9: the first update of the second epoch of 8
(`len(trainloader_u) // 8` must be >= 1), where the official mix teacher runs in eval mode after the epoch's
validation (quirk Q2, `mix_teacher_eval_epoch_iterations`); semiseg is also rerun with that option off to show
the difference it makes. The learning rate, the threshold and the mix-teacher mode are compared over the whole
recipe (LA 14,001 updates with `iterations=14001`, the preset's 14,000 being their prefix; ACDC 30,900) from the
official formulas (the LA ramp module itself, the loops' lr lines, the ACDC epoch structure).
"""

from __future__ import annotations

import argparse
import importlib.machinery
import inspect
import os
import runpy
import sys
import tempfile
import types
from collections.abc import Iterator
from contextlib import ExitStack
from importlib.util import find_spec
from pathlib import Path
from typing import Any
from unittest import mock

import numpy as np
import torch
from torch import nn

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "tests"))
from official_equivalence import _install_official_dropout, _row, _step_report  # noqa: E402

from golden_step_crossmatch import (  # noqa: E402
    OFFICIAL_ORDER,
    TERMS,
    TITLES,
    FeatureDropout,
    as_step_dropout,
    case,
    mask_summary,
    run_updates,
    sampled,
    schedules,
    state_norms,
    weights,
)

OFFICIAL_PACKAGES = ("networks", "utils", "dataloaders", "test_util", "model", "util", "dataset")
STAND_INS = ("torchio", "tensorboardX", "tqdm", "torchvision", "medpy", "pandas")
EVERY = 97  # fixture sample stride of the recipe-long schedules
LOGIT_SCALE = {3: 0.5, 2: 12.0}  # output convolution x this: a fair share of voxels passes the threshold


class _Stop(Exception):
    """Raised by the recording optimiser after the compared update."""


class _Patches(ExitStack):
    """Every patch of the official run, undone in reverse order on exit."""

    def set(self, obj: Any, name: str, value: Any) -> None:
        self.enter_context(mock.patch.object(obj, name, value))

    def module(self, name: str, value: types.ModuleType) -> None:
        """`sys.modules[name] = value` until exit (only that key: patch.dict would also drop every module
        imported meanwhile, and numpy's extensions cannot be imported twice)."""
        sys.modules[name] = value
        self.callback(sys.modules.pop, name, None)


def _purge() -> None:
    """Forget the official packages (each repository has its own `networks`, `utils`, ...)."""
    for name in list(sys.modules):
        if name.split(".")[0] in OFFICIAL_PACKAGES:
            del sys.modules[name]


def _stand_in(name: str) -> types.ModuleType:
    """A module whose every attribute is a `MagicMock` (tqdm: a pass-through), with a spec so that importers
    that inspect `sys.modules` (torch._dynamo) accept it."""
    module = types.ModuleType(name)
    module.__spec__ = importlib.machinery.ModuleSpec(name, None)
    module.__getattr__ = lambda attribute: mock.MagicMock(name=f"{name}.{attribute}")  # type: ignore[method-assign]
    if name == "tqdm":
        module.tqdm = lambda iterable, *a, **k: iterable  # type: ignore[attr-defined]
    return module


def _stand_ins(p: _Patches) -> None:
    for name in STAND_INS:
        if find_spec(name) is None:
            p.module(name, _stand_in(name))
            if name == "torchvision":
                p.module("torchvision.transforms", _stand_in("torchvision.transforms"))
                p.module("torchvision.utils", _stand_in("torchvision.utils"))
    import torch.utils.tensorboard as tensorboard

    p.set(tensorboard, "SummaryWriter", mock.MagicMock())


class _Recorder:
    """What the official run did, update by update."""

    def __init__(self, script: Path, stop_at: int) -> None:
        self.script, self.stop_at = str(script), stop_at
        self.net: nn.Module | None = None
        self.calls: list[tuple[torch.Tensor, torch.Tensor, torch.Tensor | None]] = []
        self.modes: list[bool] = []
        self.updates: list[dict[str, Any]] = []

    def frame(self) -> Any:
        frame = inspect.currentframe()
        while frame is not None and frame.f_code.co_filename != self.script:
            frame = frame.f_back
        return frame

    def before_step(self, optimizer: torch.optim.Optimizer) -> None:
        names = ["loss_x", "loss_u_s1", "loss_u_s2", "loss_u_w_kd", "loss", "conf_thresh"]
        values = self.frame().f_locals
        self.updates.append({"lr": optimizer.param_groups[0]["lr"], "calls": self.calls, "modes": self.modes,
                             "frame": {n: values[n] for n in names},
                             "grads": {k: p.grad.detach().clone() for k, p in self.net.named_parameters()}})
        self.calls, self.modes = [], []

    def after_step(self, optimizer: torch.optim.Optimizer) -> None:
        update = self.updates[-1]
        update["thresh_after"] = float(self.frame().f_locals["conf_thresh"])
        update["after"] = {k: p.detach().clone() for k, p in self.net.named_parameters()}
        update.update(state_norms(self.net, optimizer))
        if len(self.updates) == self.stop_at:
            raise _Stop


def _recording_optimizer(base: type[torch.optim.Optimizer], rec: _Recorder) -> type[torch.optim.Optimizer]:
    class Recording(base):  # type: ignore[valid-type, misc]
        def step(self, closure: Any = None) -> Any:
            rec.before_step(self)
            out = super().step(closure)
            rec.after_step(self)
            return out

    return Recording


def _network_init(cls: type[nn.Module], rec: _Recorder, dims: int, seed: int, scale: float,
                  n_filters: int) -> Any:
    """`cls.__init__` followed by the seeded weights, keyed dropout and perturbation, and the mode hook (the
    class itself stays: the official constructors call `super(VNet, self)`)."""
    from semiseg.methods import get_method
    from semiseg.methods.base import NetSpec
    from semiseg.official import key_map

    original = cls.__init__

    def init(net: nn.Module, *args: Any, **kwargs: Any) -> None:
        if dims == 3:
            kwargs["n_filters"] = n_filters
        original(net, *args, **kwargs)
        method = get_method("crossmatch")
        ours = method(method.Params(), NetSpec(1, 2 if dims == 3 else 4, dims, n_filters)).net.net
        state = weights(ours, seed, scale)
        mapping = key_map(list(net.state_dict()), "crossmatch", dims)
        net.load_state_dict({o: state[m].clone() for o, m in mapping.items()})
        _install_official_dropout(net, "crossmatch", dims, seed)
        as_step_dropout(net)
        net.pert.dropouts = [FeatureDropout(d.p, seed) for d in net.pert.dropouts]
        if dims == 3:  # one `dropout` module on x5 (encoder) and x9 (decoder): key it by the caller
            drop, encoder, decoder = net.dropout, net.encoder, net.decoder

            def keyed_encoder(x: torch.Tensor) -> Any:
                drop.active = "encoder.dropout"
                return encoder(x)

            def keyed_decoder(features: Any, no_drop: bool = False) -> Any:
                drop.active = "decoder.dropout"
                return decoder(features, no_drop)

            net.encoder, net.decoder = keyed_encoder, keyed_decoder
        net.register_forward_pre_hook(lambda module, _: rec.modes.append(module.training))
        rec.net = net

    return init


def _loader_class(streams: dict[str, list[tuple[torch.Tensor, ...]]], epoch: int, rec: _Recorder) -> type:
    """`DataLoader` stand-in: the first train_u loader is u, the second the mix stream; `epoch` batches each.
    A labelled batch starts an update: the network calls recorded before it (validation) are dropped."""

    class Loader:
        taken: list[str] = []

        def __init__(self, dataset: Any, batch_size: int = 1, sampler: Any = None, **_: Any) -> None:
            mode = dataset.mode
            self.stream = {"train_l": "l", "val": "val"}.get(mode) or ("mix" if "u" in Loader.taken else "u")
            Loader.taken.append(self.stream)
            self.sampler, self.epochs_done = sampler, 0

        def __len__(self) -> int:
            return 1 if self.stream == "val" else epoch

        def __iter__(self) -> Iterator[tuple[torch.Tensor, ...]]:
            if self.stream == "val":
                yield from streams["val"]
                return
            start = self.epochs_done * epoch
            self.epochs_done += 1
            for i in range(start, start + epoch):
                if self.stream == "l":
                    rec.modes.clear()
                yield tuple(t.clone() for t in streams[self.stream][i])  # the loop pastes boxes in place

    return Loader


class _Dataset(torch.utils.data.Dataset):
    """Stands in for `LAHeart` / `ACDCDataset`: only its mode and length are used (the loader yields)."""

    def __init__(self, *args: Any, **kwargs: Any) -> None:
        self.mode = kwargs.get("mode") or args[2]
        self.ids = [str(i) for i in range(16)]

    def __len__(self) -> int:
        return len(self.ids)

    def __getitem__(self, item: int) -> Any:
        raise RuntimeError("served by the loader stand-in")


def _quantised(images: torch.Tensor) -> torch.Tensor:
    """The ACDC dataset's u_w: `np.array(Image.fromarray((img * 255).astype(np.uint8))) / 255` per slice,
    in the run's dtype (the dataset's `.float()`)."""
    from PIL import Image

    slices = [torch.from_numpy(np.array(Image.fromarray((img * 255).astype(np.uint8)))) for img in images[:, 0].numpy()]
    return torch.stack(slices).unsqueeze(1).to(images.dtype) / 255.0


def _streams(inputs: list[dict[str, torch.Tensor]], dims: int, size: int) -> dict[str, list[tuple[torch.Tensor, ...]]]:
    q = _quantised if dims == 2 else (lambda t: t)
    streams = {"l": [(b["x"], b["y"]) for b in inputs],
               "u": [(q(b["u_w"]), b["s1"], b["s2"], b["box1"], b["box2"]) for b in inputs],
               "mix": [(q(b["u_mix"]), b["s1_mix"], b["s2_mix"], b["box1_mix"], b["box2_mix"]) for b in inputs]}
    if dims == 2:  # one validation volume of 2 slices holding every class (the loop divides by class unions)
        g = torch.Generator().manual_seed(0)
        volume = torch.rand(1, 2, size, size, generator=g, dtype=torch.float64).to(torch.get_default_dtype())
        streams["val"] = [(volume, torch.arange(4).repeat_interleave(size * size // 2).reshape(1, 2, size, size))]
    return streams


def run_official(root: Path, fx: dict[str, Any]) -> _Recorder:
    """The official script of `fx["dims"]` for `fx["case"]["updates"]` updates; everything it did."""
    dims, c = fx["dims"], fx["case"]
    code = root / ("LA/code" if dims == 3 else "ACDC")
    script = code / "train_cross_match.py"
    rec = _Recorder(script, c["updates"])
    inputs = case(dims, fx["size"], c["batch"], c["classes"], fx["seed"], c["updates"])
    with tempfile.TemporaryDirectory() as tmp, _Patches() as p:
        work = Path(tmp) / "a" / "b"
        work.mkdir(parents=True)
        _purge()
        p.callback(_purge)
        p.enter_context(mock.patch.object(sys, "path", [str(code), *sys.path]))
        p.enter_context(mock.patch.dict(os.environ, {"RANK": "0", "WORLD_SIZE": "1", "LOCAL_RANK": "0"}))
        cwd = os.getcwd()
        os.chdir(work)
        p.callback(os.chdir, cwd)
        p.callback(_logging_restorer())
        _stand_ins(p)
        p.set(torch.Tensor, "cuda", lambda self, *a, **k: self)
        p.set(nn.Module, "cuda", lambda self, *a, **k: self)
        loader = _loader_class(_streams(inputs, dims, fx["size"]), c["epoch_iterations"], rec)
        p.set(torch.utils.data, "DataLoader", loader)
        for name in ("AdamW", "SGD"):
            p.set(torch.optim, name, _recording_optimizer(getattr(torch.optim, name), rec))
        if dims == 3:
            import dataloaders.la_heart as la_heart
            import networks.vnet as vnet
            import utils.losses as losses
            import utils.ramps as ramps

            p.set(la_heart, "LAHeart", _Dataset)
            p.set(vnet.VNet, "__init__", _network_init(vnet.VNet, rec, 3, fx["seed"], c["logit_scale"],
                                                       fx["n_filters"]))
            p.set(losses, "dice_loss", _recording(losses.dice_loss, rec))
            shift, ramp = c["threshold_iterations"][-1] - 2, ramps.sigmoid_rampup
            p.set(ramps, "sigmoid_rampup", lambda current, length: ramp(current + shift, length))
            argv = ["train_cross_match.py", "--exp", "eq", "--conf_thresh", "0.75", "--label_num", "8",
                    "--max_iterations", "14000", "--optimizer", "AdamW", "--base_lr", "0.001", "--root_path", tmp]
        else:
            import dataset.acdc as acdc
            import model.unet as unet
            import torch.distributed as dist
            import util.dist_helper as dist_helper
            import util.utils as utils

            def setup_distributed(backend: str = "nccl", port: Any = None) -> tuple[int, int]:
                dist.init_process_group("gloo", init_method=f"file://{tmp}/pg", rank=0, world_size=1)
                p.callback(dist.destroy_process_group)
                return 0, 1

            ddp = torch.nn.parallel.DistributedDataParallel
            p.set(dist_helper, "setup_distributed", setup_distributed)
            p.set(torch.nn.SyncBatchNorm, "convert_sync_batchnorm", staticmethod(lambda module, *a, **k: module))
            p.set(torch.nn.parallel, "DistributedDataParallel",
                  lambda module, device_ids=None, output_device=None, **kw: ddp(module, **kw))
            p.set(acdc, "ACDCDataset", _Dataset)
            p.set(unet.UNet, "__init__", _network_init(unet.UNet, rec, 2, fx["seed"], c["logit_scale"],
                                                       fx["n_filters"]))
            p.set(utils.DiceLoss, "forward", _recording_dice_forward(utils.DiceLoss, rec))
            strategy = torch.multiprocessing.get_sharing_strategy()
            p.callback(torch.multiprocessing.set_sharing_strategy, strategy)
            config = Path(tmp) / "acdc.yaml"
            config.write_text(f"dataset: acdc\nnclass: 4\ncrop_size: {fx['size']}\ndata_root: .\nepochs: 2\n"
                              f"batch_size: {c['batch']}\nlr: 0.01\nconf_thresh: 0.95\ndrop_rate: 0.5\n"
                              "use_threshold_relax: False\nT: 1.0\n")
            argv = ["train_cross_match.py", "--config", str(config), "--labeled-id-path", "l.txt",
                    "--unlabeled-id-path", "u.txt", "--save-path", str(Path(tmp) / "save")]
        p.enter_context(mock.patch.object(sys, "argv", argv))
        try:
            runpy.run_path(str(script), run_name="__main__")
        except _Stop:
            pass
        else:
            raise RuntimeError(f"{script} ended before update {c['updates']}")
    return rec


def _logging_restorer() -> Any:
    """A callback that restores the root and `global` loggers' handlers (the scripts add file/stream ones)."""
    import logging

    saved = {name: list(logging.getLogger(name).handlers) for name in ("", "global")}

    def restore() -> None:
        for name, handlers in saved.items():
            logging.getLogger(name).handlers[:] = handlers

    return restore


def _recording(dice_loss: Any, rec: _Recorder) -> Any:
    def record(score: torch.Tensor, target: torch.Tensor, ignore: torch.Tensor | None = None) -> torch.Tensor:
        value = dice_loss(score, target, ignore)
        rec.calls.append((value.detach(), target.long(), None if ignore is None else ignore != 1))
        return value

    return record


def _recording_dice_forward(base: type[nn.Module], rec: _Recorder) -> Any:
    """`DiceLoss.forward` that records each call (the class stays: its constructor calls `super(DiceLoss, self)`)."""
    original = base.forward

    def forward(self: nn.Module, inputs: torch.Tensor, target: torch.Tensor, weight: Any = None,
                softmax: bool = False, ignore: torch.Tensor | None = None) -> torch.Tensor:
        value = original(self, inputs, target, weight, softmax, ignore)
        rec.calls.append((value.detach(), target[:, 0].long(), None if ignore is None else ignore != 1))
        return value

    return forward


def _fixture_case(args: argparse.Namespace) -> dict[str, Any]:
    if args.dims == 3:
        return {"preset": "la-8", "overrides": {}, "classes": 2, "batch": 2, "updates": 2, "epoch_iterations": 2,
                "threshold_iterations": [1, args.iteration], "logit_scale": LOGIT_SCALE[3],
                "recipe": {"preset": "la-8", "overrides": {"iterations": 14001}, "every": EVERY}}
    epoch = 8
    return {"preset": "acdc-3", "overrides": {"iterations": 2 * epoch, "mix_teacher_eval_epoch_iterations": epoch},
            "classes": 4, "batch": 2, "updates": epoch + 1, "epoch_iterations": epoch,
            "threshold_iterations": list(range(1, epoch + 2)), "logit_scale": LOGIT_SCALE[2],
            "recipe": {"preset": "acdc-3", "overrides": {}, "every": EVERY}}


def official_schedules(root: Path, fx: dict[str, Any]) -> dict[str, list[float]]:
    """The official learning rate, threshold and (ACDC) mix-teacher eval updates over the whole recipe."""
    if fx["dims"] == 3:
        sys.path.insert(0, str(root / "LA/code"))
        _purge()
        try:
            from utils import ramps
        finally:
            sys.path.pop(0)
            _purge()
        n, base = 14001, 0.001  # `iter_num > max_iterations` stops after update 14,001
        # update k runs with lr_ and conf_thresh set after update k - 1 (iter_num = k - 1, ramp at k - 2)
        lr = [base * (1 - (k - 1) / 17000) ** 0.9 for k in range(1, n + 1)]
        tau = [0.75] + [(0.75 + (1 - 0.75) * ramps.sigmoid_rampup(k - 2, 17000)) * np.log(2) for k in range(2, n + 1)]
        return {"learning rate": lr, "confidence threshold": [float(t) for t in tau]}
    import yaml

    cfg = yaml.safe_load((root / "ACDC/configs/acdc.yaml").read_text())
    unlabeled = (root / "ACDC/splits/acdc/3/unlabeled.txt").read_text().splitlines()
    # len(trainloader_u) on one GPU (drop_last): 103 for acdc-3
    epoch, epochs, base = len(unlabeled) // cfg["batch_size"], cfg["epochs"], cfg["lr"]
    total = epoch * epochs
    # `iters = epoch * len(trainloader_u) + i` sets the rate after the step of update iters + 1
    lr = [base] + [base * (1 - (k - 2) / total) ** 0.9 for k in range(2, total + 1)]
    return {"learning rate": lr, "confidence threshold": [0.95] * total,
            "mix-teacher eval-mode updates": [float(e * epoch + 1) for e in range(1, epochs)]}


def _mask_rows(official: list[tuple], ours: list[tuple], title: str = "") -> list[dict[str, Any]]:
    rows = []
    for name, (_, t_o, v_o), (_, t_s, v_s) in zip(TERMS[1:], official[1:], ours[1:]):
        differing = int(((t_o != t_s) | (v_o != v_s)).sum())
        rows.append({"term": f"{title}target + mask, {TITLES[name]} (valid voxels)", "official": int(v_o.sum()),
                     "semiseg": int(v_s.sum()), "abs": differing, "rel": differing / v_o.numel(),
                     "verdict": "equal" if differing == 0 else "DIFFERS"})
    return rows


def official_threshold(rec: _Recorder, fx: dict[str, Any], k: int) -> float:
    """The threshold update k's losses used: LA updates `conf_thresh` after the loss (update k uses the value
    set by update k - 1, `--conf_thresh` at the first); ACDC keeps it fixed."""
    if fx["dims"] == 3:
        return rec.updates[k - 2]["thresh_after"] if k > 1 else 0.75
    return float(rec.updates[k - 1]["frame"]["conf_thresh"])


def official_scalars(rec: _Recorder, fx: dict[str, Any]) -> dict[str, float]:
    last = rec.updates[-1]
    calls = dict(zip(OFFICIAL_ORDER, last["calls"]))
    f = last["frame"]
    threshold = official_threshold(rec, fx, len(rec.updates))
    terms = {name: float(calls[name][0]) for name in TERMS}
    f = {k: v.detach() if isinstance(v, torch.Tensor) else v for k, v in f.items()}
    scalars = {"loss_x": float(f["loss_x"]),
               "loss_tkd": sum(terms[n] for n in TERMS if n.startswith("tkd")) / 4,
               "loss_dkd": sum(terms[n] for n in TERMS if n.startswith("dkd")) / 2,
               "loss_kd": float(f["loss_u_w_kd"]), "loss": float(f["loss"]), "threshold": float(threshold),
               "lr": last["lr"], **terms, "running_stats": last["running_stats"],
               "optimizer_state": last["optimizer_state"]}
    for k, update in enumerate(rec.updates[:-1], 1):
        scalars[f"loss_update_{k}"] = float(update["frame"]["loss"].detach())
    return scalars


def compare(args: argparse.Namespace) -> tuple[list[dict[str, Any]], dict[str, Any]]:
    from semiseg.official import key_map

    root = Path(args.official)
    fx = {"dims": args.dims, "size": args.size, "seed": args.seed, "n_filters": args.n_filters,
          "iteration": args.iteration, "case": _fixture_case(args)}
    rec = run_official(root, fx)
    ours = run_updates(fx)
    official_calls = dict(zip(OFFICIAL_ORDER, rec.updates[-1]["calls"]))
    official_calls = [official_calls[name] for name in TERMS]
    scalars = official_scalars(rec, fx)
    titles = dict(TITLES) | {f"loss_update_{k}": f"total loss of update {k}" for k in range(1, 10)}
    full = official_schedules(root, fx)
    modes = [float(u["modes"][0]) for u in rec.updates]
    ours["schedules"] = schedules(fx, full=True) | {"mix teacher in train mode (in-place run)":
                                                    [float(m) for m in ours["mix_teacher_train"]]}
    thresholds = [official_threshold(rec, fx, k) for k in range(1, len(rec.updates) + 1)]
    in_place = {"mix teacher in train mode (in-place run)": modes,
                "learning rate (in-place run)": [u["lr"] for u in rec.updates],
                "confidence threshold (in-place run)": thresholds}
    ours["schedules"] |= {"learning rate (in-place run)": ours["lrs"],
                          "confidence threshold (in-place run)": ours["thresholds"]}
    schedules_in = full | in_place
    ours["ramp"] = []
    mapping = key_map(list(rec.net.state_dict()), "crossmatch", args.dims)
    rows, meta = _step_report(args, "AiEson/CrossMatch", root, ours, mapping, scalars, titles,
                              rec.updates[-1]["grads"], {"student": rec.updates[-1]["after"]}, [], schedules_in)
    rows += _mask_rows(official_calls, ours["calls"])
    step = "AdamW" if args.dims == 3 else "SGD (Nesterov)"
    for row in rows:
        row["term"] = row["term"].replace("weights after SGD step", f"weights after the {step} step")
    recipe = fx["case"]["recipe"]
    meta["batch"] = 3 * fx["case"]["batch"]
    meta["iteration"] = fx["case"]["threshold_iterations"][-1]  # LA: K (threshold only); ACDC: the update
    meta["case"] = fx["case"]
    meta["official"]["schedules"] = {f"{name} (sampled)": sampled(values, recipe["every"])
                                     for name, values in full.items() if name != "mix-teacher eval-mode updates"}
    meta["official"]["schedules"].update({k: v for k, v in schedules_in.items() if k not in
                                          ("learning rate", "confidence threshold")})
    meta["official"]["masks"] = {name: mask_summary(t, v, fx["case"]["classes"])
                                 for name, (_, t, v) in zip(TERMS[1:], official_calls[1:])}
    if args.dims == 2:
        _quirk_rerun(fx, scalars, official_calls, modes)
    return rows, meta


def _quirk_rerun(fx: dict[str, Any], scalars: dict[str, float], official_calls: list[tuple],
                 modes: list[float]) -> None:
    """Quirk Q2: semiseg again with `mix_teacher_eval_epoch_iterations=0` (mix teacher always in train mode)."""
    off = run_updates(fx, mix_teacher_eval=False)
    print(f"Quirk Q2 rerun, update {len(modes)} (the first of epoch 2; official mix teacher in "
          f"{'train' if modes[-1] else 'eval'} mode) with mix_teacher_eval_epoch_iterations=0:")
    print("| term | official | semiseg (option off) | abs diff | rel diff | verdict |")
    print("|---|---|---|---|---|---|")
    rows = [_row(TITLES[k], torch.tensor(scalars[k]), torch.tensor(off["scalars"][k]))
            for k in ("loss", "s1", "s2", "dkd_s2_weak", "dkd_s2_strong")]
    for r in rows + _mask_rows(official_calls, off["calls"]):
        print(f"| {r['term']} | {r['official']:.6g} | {r['semiseg']:.6g} | {r['abs']:.3g} | {r['rel']:.3g} | "
              f"{r['verdict']} |")
    print()
