"""One whole BCP update of the official `code/LA_BCP_train.py` (DeepMed-Lab-ECNU/BCP, MIT), run in place and
unmodified, against semiseg's `train_step` + backward + SGD step + `after_step` (tests/golden_step_bcp.py).

    python benchmarks/official_equivalence.py --method bcp --step method --size 48 --iteration 1000 \\
        --official /tmp/official/BCP --official-commit SHA --write-fixture    # pre-training: bcp_pretrain.json
    python benchmarks/official_equivalence.py --method bcp --step method --size 48 --iteration 3000 \\
        --official /tmp/official/BCP --official-commit SHA --write-fixture    # self-training: bcp.json

`--iteration` <= 2,000 (the recipe's pre-training length) compares a pre-training update, above it a
self-training one. Size 48 at least: the official forward max-pools x5 with a 3^3 window.

How the script runs: `runpy.run_path(LA_BCP_train.py, run_name="__main__")` with its own options (`--labeled_bs 2
--batch_size 4`: 1 volume per half, the smallest batch it allows), from a scratch folder three levels deep,
`.cuda()` an identity, and around it, never inside it: `torch.utils.data.DataLoader` and `LAHeart` replaced by a
loader that yields the seeded batch (its epoch length is the script's own `TwoStreamBatchSampler`'s), the network
class in `networks.net_factory` wrapped to build `n_filters` filters, load the seeded weights and install keyed
dropout (`student.` / `teacher.` keys; the self-training stage loads its student and EMA teacher from the
"best pre-training checkpoint", so `torch.load` hands it the seeded student and teacher states), validation
(`test_3d_patch.var_all_case_LA`) returning 0, the writer and tqdm as recorders, the script's code copy
dropped. tensorboardX, tqdm, torchvision, medpy and nibabel are stand-ins (only their names are used, or only
by the replaced validation). The copy-paste box is aligned by feeding the official `context_mask` (through its
module's `np.random.randint`) the box starts semiseg drew from torch's seeded RNG; the bounds it asked for are
recorded (they are hard-coded for 112x112x80: quirk B7). A pre-training update stops after the first SGD step;
for a self-training update the pre-training stage runs one update (`--pre_max_iteration 1`, the iteration
counter being the only thing changed) and the run stops right after the first `update_ema_variables`. Every
term is read from the recorded calls (`mask_DiceLoss` and the per-voxel CE of `mix_loss`) and from the loop's
locals in the traceback frames. The official update does not depend on its iteration counter below 2,500
self-training updates except through what it only logs, so its first update stands for semiseg's update K
(both with a fresh SGD optimiser, as `mean_teacher`'s comparison).

Also compared: the mixed losses at 2 volumes per half (official `mix_loss` on fixed logits, labels,
pseudo-labels and the aligned mask; semiseg's `self_train_step` with its network replaced by the same logits),
where the Dice is a mean over two samples; the box-start bounds for the LA patch; and, over the whole recipe
(17,000 updates), the weight of voxels from unlabelled volumes (the `ramp`: 0 while pre-training), the learning
rate, the EMA decay, the teacher restart and the fresh optimiser, recorded from a second run of the unmodified
script over all its updates with a stand-in 1x1x1-convolution network on 4^3 volumes (none of them depends on
the network).
"""

from __future__ import annotations

import argparse
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

import numpy as np
import torch
from torch import nn

sys.path.insert(0, str(Path(__file__).resolve().parent))
sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "tests"))
from official_equivalence import _install_official_dropout, _row, _step_report  # noqa: E402

from golden_step import KeyedDropout, seeded_weights  # noqa: E402
from golden_step_bcp import (  # noqa: E402
    LA_PATCH,
    bcp_update,
    box_bounds,
    loss_case,
    mixed_losses_two_per_half,
    runs,
)

SCRIPT = "code/LA_BCP_train.py"
OFFICIAL_PACKAGES = ("networks", "utils", "dataloaders")
STAND_INS = ("tensorboardX", "tqdm", "torchvision", "torchvision.transforms", "medpy", "medpy.metric", "nibabel")


class _Stop(Exception):
    """Raised by a recorder once the compared update is complete."""


class _Writer:
    """tensorboardX.SummaryWriter stand-in: keeps the scalars the script logs."""

    def __init__(self, *args: Any, **kwargs: Any) -> None:
        self.scalars: dict[str, list[float]] = {}

    def add_scalar(self, tag: str, value: Any, step: int) -> None:
        self.scalars.setdefault(tag, []).append(float(value))

    def add_images(self, *args: Any, **kwargs: Any) -> None:
        pass

    def close(self) -> None:
        pass


class _Progress:
    """tqdm stand-in: iterates, closes."""

    def __init__(self, iterable: Any = None, *args: Any, **kwargs: Any) -> None:
        self.iterable = iterable

    def __iter__(self) -> Iterator[Any]:
        return iter(self.iterable)

    def close(self) -> None:
        pass


def _stand_in_modules() -> dict[str, types.ModuleType]:
    modules = {name: types.ModuleType(name) for name in STAND_INS}
    modules["tensorboardX"].SummaryWriter = _Writer
    modules["tqdm"].tqdm = _Progress
    modules["torchvision"].transforms = modules["torchvision.transforms"]
    modules["torchvision.transforms"].Compose = list
    modules["medpy"].metric = modules["medpy.metric"]
    return modules


class _BoxDraws:
    """numpy as BCP_utils sees it, except `random.randint`, which returns the given box starts in turn."""

    def __init__(self, starts: list[int]) -> None:
        self.starts, self.bounds = starts, []
        self.random = types.SimpleNamespace(randint=self.randint)

    def randint(self, low: int, high: int) -> int:
        start = self.starts[len(self.bounds) % len(self.starts)]
        self.bounds.append(high)
        if not low <= start < high:
            raise ValueError(f"box start {start} outside the official range [{low}, {high})")
        return start

    def __getattr__(self, name: str) -> Any:
        return getattr(np, name)


class _Session:
    """The official code imported from `root`, with the stand-ins and CPU patches, restored on exit."""

    def __init__(self, root: Path) -> None:
        self.code = (root / "code").resolve()

    def __enter__(self) -> _Session:
        self.saved_modules = {k: v for k, v in sys.modules.items() if k.split(".")[0] in OFFICIAL_PACKAGES
                              or k in STAND_INS}
        for name in self.saved_modules:
            del sys.modules[name]
        sys.modules.update(_stand_in_modules())
        self.saved = [(torch.Tensor, "cuda", torch.Tensor.cuda), (nn.Module, "cuda", nn.Module.cuda)]
        torch.Tensor.cuda = lambda self, *a, **k: self  # type: ignore[method-assign]
        nn.Module.cuda = lambda self, *a, **k: self  # type: ignore[method-assign]
        sys.path.insert(0, str(self.code))
        self.bcp_utils = importlib.import_module("utils.BCP_utils")
        self.dataset = importlib.import_module("dataloaders.dataset")
        self.factory = importlib.import_module("networks.net_factory")
        self.validation = importlib.import_module("utils.test_3d_patch")
        return self

    def patch(self, target: Any, name: str, value: Any) -> None:
        self.saved.append((target, name, getattr(target, name)))
        setattr(target, name, value)

    def __exit__(self, *exc: object) -> None:
        for target, name, value in reversed(self.saved):
            setattr(target, name, value)
        sys.path.remove(str(self.code))
        for name in [k for k in sys.modules if k.split(".")[0] in OFFICIAL_PACKAGES or k in STAND_INS]:
            del sys.modules[name]
        sys.modules.update(self.saved_modules)


class _Recorder:
    """What the running script does, call by call: SGD steps (lr, optimiser, gradients), EMA updates, checkpoint
    loads, `mix_loss` weights, Dice and per-voxel CE values."""

    def __init__(self) -> None:
        self.steps: list[dict[str, Any]] = []
        self.ema: list[tuple[int, float]] = []
        self.loads: list[int] = []
        self.u_weights: list[tuple[int, float]] = []
        self.dice: list[torch.Tensor] = []
        self.ce: list[torch.Tensor] = []
        self.stop_after_step: int | None = None
        self.stop_after_ema = False


def _run_script(session: _Session, rec: _Recorder, argv: list[str], build_net: Callable[..., nn.Module],
                checkpoints: Callable[[], dict[str, Any]], batch: dict[str, torch.Tensor],
                draws: _BoxDraws | None) -> dict[str, dict[str, Any]]:
    """Run the script's __main__ until a recorder stops it (or to its end); the locals of its stage functions."""
    bcp_utils = session.bcp_utils
    real_step, real_ema, real_mix = torch.optim.SGD.step, bcp_utils.update_ema_variables, bcp_utils.mix_loss

    def step(self: torch.optim.SGD, *a: Any, **k: Any) -> Any:
        params = [p for group in self.param_groups for p in group["params"]]
        rec.steps.append({"lr": self.param_groups[0]["lr"], "optimizer": id(self),
                          "grads": {id(p): p.grad.detach().clone() for p in params if p.grad is not None}})
        out = real_step(self, *a, **k)
        if rec.stop_after_step == len(rec.steps):
            raise _Stop
        return out

    def ema(model: nn.Module, ema_model: nn.Module, alpha: float) -> None:
        real_ema(model, ema_model, alpha)
        rec.ema.append((len(rec.steps), alpha))
        if rec.stop_after_ema:
            raise _Stop

    def mix_loss(*a: Any, **k: Any) -> torch.Tensor:
        rec.u_weights.append((len(rec.steps) + 1, k["u_weight"]))
        return real_mix(*a, **k)

    def load(path: Any, *a: Any, **k: Any) -> dict[str, Any]:
        rec.loads.append(len(rec.steps) + 1)
        return checkpoints()

    class Loader:
        """`DataLoader` stand-in: the script's batch sampler sets the epoch length; every batch is `batch`."""

        def __init__(self, dataset: Any, batch_sampler: Any = None, **kwargs: Any) -> None:
            self.n = len(batch_sampler)

        def __len__(self) -> int:
            return self.n

        def __iter__(self) -> Iterator[dict[str, torch.Tensor]]:
            return iter([batch] * self.n)

    class Dataset:
        def __init__(self, *args: Any, **kwargs: Any) -> None:
            pass

    dice_hook = bcp_utils.DICE.register_forward_hook(lambda _m, _i, out: rec.dice.append(out.detach()))
    ce_hook = bcp_utils.CE.register_forward_hook(lambda _m, _i, out: rec.ce.append(out.detach()))
    session.patch(torch.optim.SGD, "step", step)
    session.patch(bcp_utils, "update_ema_variables", ema)
    session.patch(bcp_utils, "mix_loss", mix_loss)
    session.patch(torch, "load", load)
    session.patch(torch.utils.data, "DataLoader", Loader)
    session.patch(session.dataset, "LAHeart", Dataset)
    session.patch(session.factory, "VNet", build_net)
    session.patch(session.validation, "var_all_case_LA", lambda *a, **k: 0.0)
    session.patch(shutil, "copy", lambda *a, **k: None)
    if draws is not None:
        session.patch(bcp_utils, "np", draws)
    root_logger = logging.getLogger()
    handlers, level = list(root_logger.handlers), root_logger.level
    scratch = Path(tempfile.mkdtemp(prefix="bcp-official-"))
    cwd, argv_saved = os.getcwd(), sys.argv
    frames: dict[str, dict[str, Any]] = {}
    try:
        work = scratch / "a" / "b" / "code"
        work.mkdir(parents=True)
        os.chdir(work)
        sys.argv = ["LA_BCP_train.py", "--root_path", str(scratch), *argv]
        with contextlib.redirect_stdout(io.StringIO()), contextlib.redirect_stderr(io.StringIO()):
            runpy.run_path(str(session.code / "LA_BCP_train.py"), run_name="__main__")
    except _Stop as stop:
        tb = stop.__traceback__
        while tb is not None:
            frames[tb.tb_frame.f_code.co_name] = {"locals": dict(tb.tb_frame.f_locals),
                                                  "globals": tb.tb_frame.f_globals}
            tb = tb.tb_next
    finally:
        dice_hook.remove()
        ce_hook.remove()
        for handler in root_logger.handlers[len(handlers):]:
            handler.close()
        root_logger.handlers[:] = handlers
        root_logger.setLevel(level)
        os.chdir(cwd)
        sys.argv = argv_saved
        shutil.rmtree(scratch, ignore_errors=True)
    return frames


def _official_nets(session: _Session, args: argparse.Namespace, student: dict[str, torch.Tensor],
                   teacher: dict[str, torch.Tensor], tags: list[str]) -> tuple[Callable[..., nn.Module], list]:
    """A factory for the script's `VNet(...)` calls: `n_filters` filters, seeded weights, keyed dropout."""
    from semiseg.official import key_map

    real, built = session.factory.VNet, []

    def build(**kwargs: Any) -> nn.Module:
        net = real(**kwargs, n_filters=args.n_filters)
        tag = tags[len(built)]
        mapping = key_map(list(net.state_dict()), "bcp", 3)
        weights = {"student": student, "teacher": teacher}.get(tag)
        if weights is not None:
            net.load_state_dict({**net.state_dict(), **{o: weights[m].clone() for o, m in mapping.items()}})
        _install_official_dropout(net, "bcp", 3, args.seed)
        for module in net.modules():
            if isinstance(module, KeyedDropout):
                module.keys = [f"{tag}.{key}" for key in module.keys]
        built.append(net)
        return net

    return build, built


class _StandInNet(nn.Module):
    """The schedule run's network: a 1x1x1 convolution, (logits, features) as the official VNet returns."""

    def __init__(self, **kwargs: Any) -> None:
        super().__init__()
        self.conv = nn.Conv3d(1, 2, 1)

    def forward(self, x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        out = self.conv(x)
        return out, out


def _official_schedules(root: Path) -> dict[str, list[float]]:
    """The unmodified script over its whole recipe (2,000 + 15,000 updates) with the stand-in network."""
    rec = _Recorder()
    g = torch.Generator().manual_seed(0)
    batch = {"image": torch.rand(8, 1, 4, 4, 4, generator=g), "label": torch.randint(0, 2, (8, 4, 4, 4), generator=g)}
    with _Session(root) as session:
        _run_script(session, rec, [], _StandInNet, lambda: {"net": _StandInNet().state_dict()}, batch, None)
    total = len(rec.steps)
    weight, decay, restarts, fresh = ([0.0] * total for _ in range(4))
    for update, w in rec.u_weights:
        weight[update - 1] = w
    for update, alpha in rec.ema:
        decay[update - 1] = alpha
    for update in rec.loads[1::2]:  # load_net(model, ...) then load_net(ema_model, ...)
        restarts[update - 1] = 1.0
    for i, step in enumerate(rec.steps):
        fresh[i] = float(i == 0 or step["optimizer"] != rec.steps[i - 1]["optimizer"])
    return {"ramp": weight, "learning rate": [s["lr"] for s in rec.steps], "EMA decay": decay,
            "teacher restarted": restarts, "fresh optimiser": fresh}


def _official_update(root: Path, args: argparse.Namespace, stage: str, ours: dict[str, Any]) -> dict[str, Any]:
    """One official update on the seeded batch; its terms, gradients and states."""
    from semiseg.official import key_map

    student = seeded_weights(ours["method"].net, args.seed)
    teacher = seeded_weights(ours["method"].net, args.seed + 1)
    x, label = ours["x"], ours["label"]
    rec = _Recorder()
    draws = _BoxDraws(ours["box_starts"])
    options = ["--labeled_bs", "2", "--batch_size", "4"]
    with _Session(root) as session:
        if stage == "pretrain":
            build, built = _official_nets(session, args, student, teacher, ["student"])
            rec.stop_after_step = 1
            frames = _run_script(session, rec, options, build, dict, {"image": x, "label": label}, draws)
            loop = frames["pre_train"]["locals"]
        else:
            build, built = _official_nets(session, args, student, teacher, ["pretrain", "student", "teacher"])
            states = iter(["student", "teacher"])

            def checkpoint() -> dict[str, Any]:  # load_net(model, best) then load_net(ema_model, best)
                net = built[1] if next(states) == "student" else built[2]
                return {"net": {k: v.clone() for k, v in net.state_dict().items()}}

            rec.stop_after_ema = True
            frames = _run_script(session, rec, [*options, "--pre_max_iteration", "1"], build, checkpoint,
                                 {"image": x, "label": label}, draws)
            loop = frames["self_train"]["locals"]
            cut = frames["self_train"]["globals"]["get_cut_mask"]
        model = loop["model"]
        grads_by_id = rec.steps[-1]["grads"]
        grads = {name: grads_by_id[id(p)] for name, p in model.named_parameters() if id(p) in grads_by_id}
        mask = loop["img_mask"]
        scalars: dict[str, float] = {"kept_voxels": float(mask.sum()), "lr": rec.steps[-1]["lr"]}
        out = {"model": model, "mask": mask, "grads": grads, "states": {"student": dict(model.named_parameters())},
               "bounds": draws.bounds[-3:], "buffers": {"student": dict(model.named_buffers())}}
        if stage == "pretrain":
            scalars.update(dice=float(loop["loss_dice"]), ce=float(loop["loss_ce"]), loss=float(loop["loss"]))
        else:
            loss_mask = loop["loss_mask"]
            regions = [loss_mask, 1 - loss_mask] * 2
            for i, part in enumerate(("l_keep", "l_paste", "u_keep", "u_paste")):
                scalars[f"dice_{part}"] = float(rec.dice[i])
                # mix_loss's CE of a region: sum(region * CE) / (sum(region) + 1e-16)
                scalars[f"ce_{part}"] = float((rec.ce[i] * regions[i]).sum() / (regions[i].sum() + 1e-16))
            ema_model = loop["ema_model"]
            scalars.update(loss_l=float(loop["loss_l"]), loss_u=float(loop["loss_u"]), loss=float(loop["loss"]),
                           u_weight=rec.u_weights[-1][1], ema_decay=rec.ema[-1][1],
                           pseudo_a_thresholded=float(cut(loop["unoutput_a"], nms=0).sum()),
                           pseudo_b_thresholded=float(cut(loop["unoutput_b"], nms=0).sum()),
                           pseudo_a=float(loop["plab_a"].sum()), pseudo_b=float(loop["plab_b"].sum()))
            out["states"]["teacher"] = dict(ema_model.named_parameters())
            out["buffers"]["teacher"] = dict(ema_model.named_buffers())
            out["pseudo"] = torch.cat([loop["plab_a"], loop["plab_b"]])
            scalars.update(_official_mixed_losses(session, args.seed))
        la = _BoxDraws([0])
        session.patch(session.bcp_utils, "np", la)
        session.bcp_utils.context_mask(torch.zeros(1, 1, *LA_PATCH), 2 / 3)
        scalars.update({f"la_box_bound_{axis}": float(b) for axis, b in zip("xyz", la.bounds)})
        out["scalars"] = scalars
        out["mapping"] = key_map(list(model.state_dict()), "bcp", 3)
    return out


def _official_mixed_losses(session: _Session, seed: int) -> dict[str, float]:
    """The official `mix_loss` pair on the fixed logits / labels / pseudo-labels of `loss_case`, 2 volumes per
    half, with the box semiseg drew."""
    case, ours = loss_case(seed), mixed_losses_two_per_half(seed)
    draws = _BoxDraws(ours["box_starts"])
    session.patch(session.bcp_utils, "np", draws)
    _, loss_mask = session.bcp_utils.context_mask(case["logits_l"][:, :1], 2 / 3)
    label, pseudo, mix = case["label"], case["pseudo"], session.bcp_utils.mix_loss
    loss_l = mix(case["logits_l"], label[:2], pseudo[:2], loss_mask, u_weight=0.5)
    loss_u = mix(case["logits_u"], pseudo[2:], label[2:], loss_mask, u_weight=0.5, unlab=True)
    return {"mixed_l_two_per_half": float(loss_l), "mixed_u_two_per_half": float(loss_u)}


TITLES = {"kept_voxels": "copy-paste mask: voxels kept (outside the box)", "lr": "learning rate of the update",
          "dice": "pre-training Dice (mask_DiceLoss)", "ce": "pre-training CE", "loss": "total loss",
          "loss_l": "mixed loss, labelled-outside batch (mix_loss)",
          "loss_u": "mixed loss, unlabelled-outside batch (mix_loss, unlab)",
          "u_weight": "weight of voxels from unlabelled volumes", "ema_decay": "EMA decay of the update",
          "pseudo_a_thresholded": "teacher foreground >= 0.5, volume a (voxels)",
          "pseudo_b_thresholded": "teacher foreground >= 0.5, volume b (voxels)",
          "pseudo_a": "pseudo-label a after the largest component (voxels)",
          "pseudo_b": "pseudo-label b after the largest component (voxels)",
          "mixed_l_two_per_half": "mix_loss, 2 volumes per half (labelled outside)",
          "mixed_u_two_per_half": "mix_loss, 2 volumes per half (unlabelled outside)",
          **{f"la_box_bound_{a}": f"box start bound {a}, 112x112x80 patch" for a in "xyz"},
          **{f"dice_{p}": f"Dice, {w}" for p, w in (("l_keep", "labelled volume outside the box (weight 1)"),
                                                    ("l_paste", "unlabelled box in it (u_weight)"),
                                                    ("u_keep", "unlabelled volume outside the box (u_weight)"),
                                                    ("u_paste", "labelled box in it (weight 1)"))},
          **{f"ce_{p}": f"CE, {w}" for p, w in (("l_keep", "labelled volume outside the box"),
                                                ("l_paste", "unlabelled box in it"),
                                                ("u_keep", "unlabelled volume outside the box"),
                                                ("u_paste", "labelled box in it"))}}


def compare(args: argparse.Namespace) -> tuple[list[dict[str, Any]], dict[str, Any]]:
    from golden_step_bcp import recipe

    root, k = Path(args.official), args.iteration
    pretrain = recipe().method_params().pretrain_iterations
    stage = "pretrain" if k <= pretrain else "self_train"
    ours = bcp_update(stage, args.n_filters, args.size, args.seed, k)
    theirs = _official_update(root, args, stage, ours)
    recipe_runs = _official_schedules(root)
    ramp = recipe_runs.pop("ramp")
    rows, meta = _step_report(args, "DeepMed-Lab-ECNU/BCP", root, ours, theirs["mapping"], theirs["scalars"],
                              TITLES, theirs["grads"], theirs["states"], ramp, recipe_runs)
    for row in rows:  # BCP has no ramp-up: its `ramp` is the weight of voxels from unlabelled volumes
        if row["term"].startswith("consistency weight, updates"):
            row["term"] = row["term"].replace("consistency weight", "weight of voxels from unlabelled volumes")
    inverse = {m: o for o, m in theirs["mapping"].items()}
    rows.append(_row("copy-paste mask (voxelwise)", theirs["mask"].double(), ours["keep"].double()))
    if stage != "pretrain":
        rows.append(_row("pseudo-labels (voxelwise)", theirs["pseudo"].double(), ours["pseudo"].double()))
    for part, buffers in theirs["buffers"].items():
        keys = list(ours["buffers"][part])
        rows.append(_row(f"BatchNorm running stats, {part}", torch.cat([buffers[inverse[m]].flatten() for m in keys]),
                         torch.cat([ours["buffers"][part][m].flatten() for m in keys])))
    official = meta["official"]
    official["ramp"] = runs(official["ramp"])
    official["schedules"] = {name: runs(values) for name, values in official["schedules"].items()}
    official["buffer_norms"] = {part: {m: buffers[inverse[m]].double().norm().item() for m in ours["buffers"][part]}
                                for part, buffers in theirs["buffers"].items()}
    meta.update(stage=stage, fixture="bcp" if stage != "pretrain" else "bcp_pretrain", encoding="runs",
                box_starts=ours["box_starts"], official_box_bounds=theirs["bounds"],
                semiseg_box_bounds=box_bounds((args.size,) * 3))
    return rows, meta
