"""The whole MLRPL update of the official `code/train_Mutual_Reliable.py`, run in place, against semiseg's.

    python benchmarks/official_equivalence.py --method mlrpl --step method --iteration 6000 --seed 1 \
        --official /tmp/official/MLRPL --official-commit 5ca2d87c2ae470f7fc53d6235c34ada6da10bda5 \
        --official-variant 4489dac336cf34ede27c1bda45cf4717ff8c49ca=/tmp/official/MLRPL-4489dac [--write-fixture]

The official repository has no licence: its script is executed unmodified from the checkout you give
(`runpy.run_path`, `sys.argv` = the la-8 line of its `train_la.sh`), nothing of it is copied here. What is
patched, for the run only (every patch is restored after it):

- `networks.net_factory.net_factory` builds the script's own `Mine3d_v1` class with `n_filters` base filters
  (the factory's class default is 16), loads semiseg's seeded weights through `semiseg.official.key_map` and puts
  keyed dropout in (the masks of semiseg's modules of the same name); `.cuda()` is the identity.
- `dataloaders.dataset.LAHeart` reads no file and `torch.utils.data.DataLoader` yields, for each index batch of the
  script's own `TwoStreamBatchSampler`, the seeded batch (`golden_step.inputs`: 2 labelled + 2 unlabelled cubes).
- `utils.ramps.sigmoid_rampup` is evaluated at the epoch of update `--iteration` (the script calls it with
  `iter_num // 150` of its first update, 0): the iteration counter is the only thing moved.
- `torch.optim.SGD.step` records the gradients, steps, records the weights and stops the script; the per-direction
  values (entropy mask, prototypes, similarity map, reliability weight, the pseudo-label term) are the script's
  loop variables, read from its frame when it calls its `consistency_criterion` (`nn.CrossEntropyLoss`) for each
  direction; each direction's term is the increase of its `loss_consist` over that call.
- Progress bar, TensorBoard writer, log file, `os.makedirs` / `shutil.copytree` of the hard-coded snapshot folder
  and the test-set evaluation (`utils.test_patch.var_all_case`, returning 0: no checkpoint is saved) are inert;
  torchvision's `Compose` (only wrapped around the patched dataset's transforms) and medpy (only used by the
  evaluation) are stand-ins when not installed.

The ramp and the learning rate over the whole recipe (15,000 updates) are what the script itself computes: a
second run of it, unchanged except for a two-voxel network and batch, records its `consistency_weight` and the
optimiser's learning rate at each of its 15,000 `optimizer.step()` calls. semiseg's side
(`tests/golden_step_mlrpl.py`) is the `la-8` preset's `train_step` + SGD step, its `consistency_weight` and the
trainer's `learning_rate` over the preset's iterations.

Quirk Q1: the official HEAD (5ca2d87) feeds the student's logits to the pseudo-label CE, its first upload
(4489dac) the softmax probabilities. The table compares HEAD with semiseg's `pseudo_ce_input=logits` (every row
must be equal), then semiseg's default `probs` with HEAD (only the pseudo-label CE terms and what follows from them
differ), then, with `--official-variant COMMIT=PATH` (a checkout of 4489dac), the first upload with the default
`probs` (equal again). Both codes run in float64; semiseg computes probabilities and reliability weights in float32
by design (autocast-safe), which is the 1e-7 level of some differences. Update 6000 is the first at which beta = 1.
Seed 1 (not 0) because its case is far from ties: the smallest entropy gap between the decoders is 1.5e-6 and the
smallest |p_fg - 0.5| 0.037 (seed 0: 5e-7 and 7e-6), ten times semiseg's float32 rounding of the entropies
(1.5e-7), so the voxel counts of the masks stay exact on any CPU; the script prints both margins.
"""

from __future__ import annotations

import argparse
import contextlib
import importlib
import logging
import os
import runpy
import shutil
import sys
import tempfile
import types
import warnings
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import numpy as np
import torch
from torch import nn

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO / "tests"))
sys.path.insert(0, str(Path(__file__).resolve().parent))
from official_equivalence import TOL, _install_official_dropout, _row, _step_report  # noqa: E402

from golden_step import inputs, seeded_weights  # noqa: E402
from golden_step_mlrpl import DIRECTIONS, semiseg_run, summaries  # noqa: E402

REPO_NAME = "Jiawei0o0/mutual-learning-with-reliable-pseudo-labels"
SCRIPT = "code/train_Mutual_Reliable.py"
ARGV = ["--dataset_name", "LA", "--model", "mine3d_v1", "--exp", "mine", "--labelnum", "8", "--gpu", "1"]
SNAPSHOT_ROOT = "/mnt/imtStu/"  # the script's hard-coded snapshot folder
PACKAGES = ("networks", "utils", "dataloaders")
TITLES = {"supervised": "supervised: sum of decoder Dice losses", "pseudo": "pseudo-label loss (both directions)",
          "weight": "consistency weight beta", "loss": "total loss",
          **{f"pseudo_{d}": f"pseudo-label term L{d[0]}<-{d[1]}" for d in DIRECTIONS},
          **{f"mask_{d}": f"entropy mask {d[0]}<-{d[1]} (voxels)" for d in DIRECTIONS},
          **{f"prototypes_{d}": f"prototypes {d[0]}<-{d[1]} (sum of absolute entries)" for d in DIRECTIONS},
          **{f"similarity_{d}": f"similarity map {d[0]}<-{d[1]} (sum)" for d in DIRECTIONS},
          **{f"reliability_{d}": f"reliability weight {d[0]}<-{d[1]} (sum)" for d in DIRECTIONS}}
# Scalars that do not depend on the pseudo-label CE input (quirk Q1): equal for semiseg's default too.
CE_FREE = ("supervised", "weight", *(f"{k}_{d}" for k in ("mask", "prototypes", "similarity", "reliability")
                                     for d in DIRECTIONS))
Q1 = "Q1 pseudo_ce_input (HEAD: logits)"


def _value(v: Any) -> float:
    """A loop variable of the script (a tensor with a graph, or the int 0 it starts from) as a float."""
    return float(torch.as_tensor(v).detach())


class _Stop(Exception):
    """Raised by the recording optimiser to end the official script after the update under test."""


def _script_globals(script: str) -> dict[str, Any]:
    """The official script's module namespace (its loop variables), found on the call stack."""
    frame = sys._getframe(1)
    while frame is not None:
        if frame.f_code.co_filename == script and frame.f_code.co_name == "<module>":
            return frame.f_globals
        frame = frame.f_back
    raise RuntimeError(f"{script} is not on the call stack")


class _RecordingSGD(torch.optim.SGD):
    """The script's optimiser: `hook(optimizer, script globals, real step)` decides when to stop."""

    hook: Callable[..., None] | None = None
    script = ""

    def step(self, closure: Any = None) -> Any:  # noqa: ARG002 - the script passes none
        assert _RecordingSGD.hook is not None
        _RecordingSGD.hook(self, _script_globals(_RecordingSGD.script), super().step)


class _RecordingCE(nn.CrossEntropyLoss):
    """The script's `consistency_criterion`: each call is one direction; `hook` sees the loop's variables."""

    hook: Callable[..., None] | None = None

    def forward(self, input: torch.Tensor, target: torch.Tensor) -> torch.Tensor:  # noqa: A002 - torch's name
        out = super().forward(input, target)
        if _RecordingCE.hook is not None:
            _RecordingCE.hook(input, out, _script_globals(_RecordingSGD.script))
        return out


class _Batches:
    """Stands for the script's DataLoader: its own batch sampler's length, the seeded batch for every index batch."""

    def __init__(self, batch: dict[str, torch.Tensor]) -> None:
        self.batch = batch

    def __call__(self, dataset: Any, batch_sampler: Any = None, **_: Any) -> _Batches:
        self.sampler = batch_sampler
        return self

    def __len__(self) -> int:
        return len(self.sampler)

    def __iter__(self) -> Iterator[dict[str, torch.Tensor]]:
        for _ in self.sampler:
            yield dict(self.batch)


class _NoData:
    """`LAHeart` without files (the batches come from `_Batches`)."""

    def __init__(self, *args: Any, **kwargs: Any) -> None:
        pass


def _stubs() -> dict[str, types.ModuleType]:
    """Stand-ins for imports that only serve logging, progress and the unused evaluation."""
    tqdm = types.ModuleType("tqdm")

    class _Tqdm:
        def __init__(self, iterable: Any = (), **_: Any) -> None:
            self.iterable = iterable

        def __iter__(self) -> Iterator[Any]:
            return iter(self.iterable)

        def close(self) -> None:
            pass

    tqdm.tqdm = _Tqdm
    board = types.ModuleType("tensorboardX")

    class _Writer:
        def __init__(self, *args: Any, **kwargs: Any) -> None:
            pass

        def add_scalar(self, *args: Any, **kwargs: Any) -> None:
            pass

        def close(self) -> None:
            pass

    board.SummaryWriter = _Writer
    out = {"tqdm": tqdm, "tensorboardX": board}
    for name, attrs in (("torchvision", ("transforms",)), ("medpy", ("metric",))):
        try:
            importlib.import_module(name)
        except ImportError:
            top = types.ModuleType(name)
            for attr in attrs:
                sub = types.ModuleType(f"{name}.{attr}")
                if attr == "transforms":
                    sub.Compose = lambda ts: ts
                setattr(top, attr, sub)
                out[f"{name}.{attr}"] = sub
            out[name] = top
    return out


def _purge() -> None:
    for name in list(sys.modules):
        if name.split(".")[0] in PACKAGES:
            del sys.modules[name]


@contextlib.contextmanager
def _patched(obj: Any, name: str, value: Any) -> Iterator[None]:
    old = getattr(obj, name)
    setattr(obj, name, value)
    try:
        yield
    finally:
        setattr(obj, name, old)


def run_official(root: Path, builder: Callable[[Any], Callable[..., nn.Module]], batch: dict[str, torch.Tensor],
                 on_step: Callable[..., None], on_ce: Callable[..., None] | None = None,
                 ramp_epoch: int | None = None) -> None:
    """Run the official script in place until `on_step` raises `_Stop`; `builder(vnet_module)` is its
    `net_factory`; `ramp_epoch` replaces the ramp's epoch argument."""
    script = str((root / SCRIPT).resolve())
    code = str(root / "code")
    saved_modules = {name: sys.modules.get(name) for name in _stubs()}
    rng = (torch.get_rng_state(), np.random.get_state(), __import__("random").getstate())
    cudnn = (torch.backends.cudnn.benchmark, torch.backends.cudnn.deterministic)
    env, cwd, argv = os.environ.get("CUDA_VISIBLE_DEVICES"), os.getcwd(), sys.argv
    root_logger = logging.getLogger()
    handlers, level = list(root_logger.handlers), root_logger.level
    real_makedirs, real_copytree = os.makedirs, shutil.copytree
    _purge()
    sys.modules.update(_stubs())
    sys.path.insert(0, code)
    try:
        with contextlib.ExitStack() as stack:
            factory = importlib.import_module("networks.net_factory")
            ramps = importlib.import_module("utils.ramps")
            real_ramp = ramps.sigmoid_rampup
            patches = [
                (factory, "net_factory", builder(factory)),
                (importlib.import_module("dataloaders.dataset"), "LAHeart", _NoData),
                (importlib.import_module("utils.test_patch"), "var_all_case", lambda *a, **k: 0.0),
                (torch.utils.data, "DataLoader", _Batches(batch)),
                (torch.optim, "SGD", _RecordingSGD), (nn, "CrossEntropyLoss", _RecordingCE),
                (torch.Tensor, "cuda", lambda self, *a, **k: self), (nn.Module, "cuda", lambda self, *a, **k: self),
                (os, "makedirs", lambda p, *a, **k: None if str(p).startswith(SNAPSHOT_ROOT)
                 else real_makedirs(p, *a, **k)),
                (shutil, "copytree", lambda s, d, *a, **k: None if str(d).startswith(SNAPSHOT_ROOT)
                 else real_copytree(s, d, *a, **k)),
                (logging, "basicConfig", lambda **k: None)]
            if ramp_epoch is not None:
                patches.append((ramps, "sigmoid_rampup", lambda current, length: real_ramp(ramp_epoch, length)))
            for obj, name, value in patches:
                stack.enter_context(_patched(obj, name, value))
            _RecordingSGD.hook, _RecordingSGD.script, _RecordingCE.hook = on_step, script, on_ce
            work = Path(stack.enter_context(tempfile.TemporaryDirectory())) / "a" / "b"
            work.mkdir(parents=True)
            os.chdir(work)
            sys.argv = [script, *ARGV]
            root_logger.setLevel(logging.WARNING)
            with contextlib.suppress(_Stop), warnings.catch_warnings():
                # its log line formats tensors that carry a graph: torch warns, the update is unaffected
                warnings.filterwarnings("ignore", message="Converting a tensor with requires_grad=True")
                runpy.run_path(script, run_name="__main__")
                raise RuntimeError("the official script ended without an optimiser step")
    finally:
        _RecordingSGD.hook = _RecordingCE.hook = None
        os.chdir(cwd)
        sys.argv = argv
        sys.path.remove(code)
        _purge()
        for name, module in saved_modules.items():
            if module is None:
                sys.modules.pop(name, None)
            else:
                sys.modules[name] = module
        root_logger.handlers[:] = handlers
        root_logger.setLevel(level)
        if env is None:
            os.environ.pop("CUDA_VISIBLE_DEVICES", None)
        else:
            os.environ["CUDA_VISIBLE_DEVICES"] = env
        torch.backends.cudnn.benchmark, torch.backends.cudnn.deterministic = cudnn
        torch.set_rng_state(rng[0])
        np.random.set_state(rng[1])
        __import__("random").setstate(rng[2])


def official_update(root: Path, ours: dict[str, Any], args: argparse.Namespace) -> dict[str, Any]:
    """One update of the script on semiseg's seeded weights, batch and dropout masks."""
    from semiseg.methods.mlrpl import uncertainty
    from semiseg.official import key_map

    reference = seeded_weights(ours["method"].net, args.seed)
    nets: list[nn.Module] = []

    def builder(factory: types.ModuleType) -> Callable[..., nn.Module]:
        def net_factory(net_type: str = "unet", in_chns: int = 1, class_num: int = 4, mode: str = "train") -> nn.Module:
            assert net_type == "mine3d_v1", net_type
            net = factory.Mine3d_v1(n_channels=in_chns, n_classes=class_num, n_filters=args.n_filters,
                                    normalization="batchnorm", has_dropout=mode == "train")
            mapping = key_map(list(net.state_dict()), "mlrpl", 3)
            assert sorted(mapping.values()) == sorted(reference), "official and semiseg keys differ"
            net.load_state_dict({o: reference[m].clone() for o, m in mapping.items()})
            _install_official_dropout(net, "mlrpl", 3, args.seed)
            nets.append(net)
            return net
        return net_factory

    directions: list[dict[str, Any]] = []
    result: dict[str, Any] = {}

    def on_ce(ce_input: torch.Tensor, loss_t: torch.Tensor, g: dict[str, Any]) -> None:
        i, j = g["i"], g["j"]
        directions.append({"pair": (i, j), "before": _value(g["loss_consist"]),
                           "ce_input": "logits" if torch.equal(ce_input, g["outputs"][i]) else
                           "probs" if torch.equal(ce_input, g["y_all"][i]) else "other",
                           "mask": g["mask"].detach().clone(), "prototypes": g["prototype_bank"].detach().clone(),
                           "similarity": g["mask_t"].detach().clone(),
                           "reliability": g["weight_pixel_t"].detach().clone(), "ce": loss_t.detach().clone()})

    def on_step(optimizer: torch.optim.Optimizer, g: dict[str, Any], step: Callable[[], Any]) -> None:
        model = g["model"]
        result["grads"] = {k: p.grad.detach().clone() for k, p in model.named_parameters()}
        result["lr"] = [group["lr"] for group in optimizer.param_groups]
        probs = g["y_all"].detach()
        entropy = [uncertainty(q) for q in probs]
        result["margins"] = {"entropy_gap": (entropy[0] - entropy[1]).abs().min().item(),
                             "foreground_vs_half": (probs[:, :, 1] - 0.5).abs().min().item()}
        step()
        result["after"] = {k: p.detach().clone() for k, p in model.named_parameters()}
        result.update(supervised=_value(g["loss_seg_dice"]), pseudo=_value(g["loss_consist"]),
                      weight=float(g["consistency_weight"]), loss=_value(g["loss"]), iter_num=g["iter_num"])
        raise _Stop

    x, label = ours["x"], inputs(3, args.size, ours["batch"], 2, args.seed)[1]
    run_official(root, builder, {"image": x, "label": label}, on_step, on_ce, args.iteration // 150)
    assert len(nets) == 1 and result["iter_num"] == 1
    assert [d["pair"] for d in directions] == [(0, 1), (1, 0)], [d["pair"] for d in directions]
    scalars = {"supervised": result["supervised"], "pseudo": result["pseudo"], "weight": result["weight"],
               "loss": result["loss"]}
    ends = [d["before"] for d in directions[1:]] + [result["pseudo"]]
    tensors: dict[str, torch.Tensor] = {}
    for d, rec, end in zip(DIRECTIONS, directions, ends):
        scalars[f"pseudo_{d}"] = end - rec["before"]
        tensors.update({f"{k}_{d}": rec[k] for k in ("mask", "prototypes", "similarity", "reliability")})
    scalars.update(summaries(tensors))
    return {"scalars": scalars, "tensors": tensors, "grads": result["grads"], "after": result["after"],
            "model": nets[0], "ce_input": {rec["ce_input"] for rec in directions}, "lr": result["lr"],
            "margins": result["margins"]}


class _TwoVoxelNet(nn.Module):
    """The network of the schedule run: a 1x1x1 convolution per output, so 15,000 updates take a minute."""

    def __init__(self) -> None:
        super().__init__()
        self.heads = nn.ModuleList(nn.Conv3d(1, 2, 1) for _ in range(2))
        self.features = nn.ModuleList(nn.Conv3d(1, 4, 1) for _ in range(2))

    def forward(self, x: torch.Tensor) -> Any:
        logits = [h(x) for h in self.heads]
        if not self.training:
            return tuple(logits)
        return logits, [torch.relu(f(x)) for f in self.features]


def official_schedules(root: Path) -> tuple[list[float], list[float]]:
    """The script's own consistency weight and learning rate at each of its updates, whole recipe."""
    weights: list[float] = []
    lrs: list[float] = []

    def on_step(optimizer: torch.optim.Optimizer, g: dict[str, Any], step: Callable[[], Any]) -> None:
        assert g["iter_num"] == len(weights) + 1
        weights.append(float(g["consistency_weight"]))
        lrs.append(float(optimizer.param_groups[0]["lr"]))
        assert all(group["lr"] == lrs[-1] for group in optimizer.param_groups)
        step()
        if g["iter_num"] >= g["max_iterations"]:
            raise _Stop

    g = torch.Generator().manual_seed(0)
    batch = {"image": torch.randn(4, 1, 2, 1, 1, generator=g, dtype=torch.float64).to(torch.get_default_dtype()),
             "label": torch.randint(0, 2, (4, 2, 1, 1), generator=g)}
    run_official(root, lambda factory: lambda **kw: _TwoVoxelNet(), batch, on_step)
    return weights, lrs


def _q1_rows(official: dict[str, Any], probs: dict[str, Any], inverse: dict[str, str],
             label: str) -> list[dict[str, Any]]:
    """semiseg with `pseudo_ce_input=probs` against an official run: scalars, gradient norm, weights after."""
    rows = []
    for key, value in official["scalars"].items():
        rows.append(_row(f"{label}: {TITLES[key]}", torch.tensor(value, dtype=torch.float64),
                         torch.tensor(probs["scalars"][key], dtype=torch.float64)))
    grads = [(official["grads"][inverse[m]], g) for m, g in probs["grads"].items()]
    rows.append(_row(f"{label}: gradient norm (global)", torch.stack([a.double().norm() for a, _ in grads]).norm(),
                     torch.stack([b.double().norm() for _, b in grads]).norm()))
    rows.append(_row(f"{label}: weights after SGD step",
                     torch.cat([official["after"][inverse[m]].flatten() for m in probs["student"]]),
                     torch.cat([v.flatten() for v in probs["student"].values()])))
    return rows


def compare(args: argparse.Namespace) -> tuple[list[dict[str, Any]], dict[str, Any]]:
    from semiseg.official import key_map

    root = Path(args.official)
    k = args.iteration
    ours = semiseg_run(args.n_filters, args.size, args.seed, k, "logits")
    head = official_update(root, ours, args)
    if head["ce_input"] != {"logits"}:
        raise SystemExit(f"{root}: its pseudo-label CE takes {head['ce_input']}, not the logits of HEAD 5ca2d87; "
                         "give that checkout with --official (an earlier one with --official-variant)")
    ramp, lrs = official_schedules(root)
    mapping = key_map(list(head["model"].state_dict()), "mlrpl", 3)
    inverse = {m: o for o, m in mapping.items()}
    rows, meta = _step_report(args, REPO_NAME, root, ours, mapping, head["scalars"], TITLES, head["grads"],
                              {"student": head["after"]}, ramp, {"learning rate": lrs})
    per_voxel = [_row(f"{name} {d[0]}<-{d[1]} (per {unit})", head["tensors"][f"{key}_{d}"],
                      ours["tensors"][f"{key}_{d}"])
                 for d in DIRECTIONS for key, name, unit in
                 (("mask", "entropy mask", "voxel"), ("prototypes", "prototypes", "entry"),
                  ("similarity", "similarity map", "voxel"), ("reliability", "reliability weight", "voxel"))]
    rows[len(head["scalars"]):len(head["scalars"])] = per_voxel
    rows.append(_row(f"learning rate at update {k}", torch.tensor(head["lr"], dtype=torch.float64),
                     torch.tensor([ours["schedules"]["learning rate"][k - 1]], dtype=torch.float64)))

    probs = semiseg_run(args.n_filters, args.size, args.seed, k, "probs")
    for row in _q1_rows(head, probs, inverse, "default probs vs HEAD"):
        row["verdict"] = row["verdict"] if row["rel"] <= TOL else Q1
        rows.append(row)
    meta.update(pseudo_ce_input="logits", official_script=SCRIPT, official_argv=ARGV,
                official_ce_input="logits (outputs[i])", ramp_epoch_patched_to=k // 150,
                # How far the case is from a tie, in the official float64 probabilities: the smallest entropy gap
                # between the decoders (a mask flips below it) and the smallest |p_fg - 0.5| (a pseudo-label
                # flips); semiseg's float32 probabilities move entropies by about 1.5e-7.
                margins=head["margins"])
    print(f"margins of the case: smallest entropy gap {head['margins']['entropy_gap']:.3g}, smallest |p_fg - 0.5| "
          f"{head['margins']['foreground_vs_half']:.3g}")
    if getattr(args, "official_variant", None):
        commit, _, path = args.official_variant.partition("=")
        first = official_update(Path(path), probs, args)
        if first["ce_input"] != {"probs"}:
            raise SystemExit(f"{path}: its pseudo-label CE takes {first['ce_input']}, not the probabilities of the "
                             "first upload 4489dac")
        rows += _q1_rows(first, probs, inverse, f"default probs vs {commit[:7]}")
        meta["variants"] = {commit: {
            "pseudo_ce_input": "probs", "official_ce_input": "probs (y_all[i])", "scalars": first["scalars"],
            "grad_norms": {m: first["grads"][inverse[m]].double().norm().item() for m in probs["grads"]},
            "student_norms": {m: first["after"][inverse[m]].double().norm().item() for m in probs["student"]}}}
    return rows, meta
