"""semiseg's side of `benchmarks/official_step_bcp.py`: one whole BCP update (pre-training or self-training),
the mixed losses at two volumes per half, and BCP's schedules over the whole recipe.

Everything is a function of the seed: student weights (seed), teacher weights (seed + 1), inputs, keyed
dropout (`student.` / `teacher.` keys), the copy-paste box (torch's global RNG seeded right before the step;
the benchmark feeds the drawn box starts to the official `context_mask`). The recipe (learning-rate schedule,
stage lengths, EMA decay) is the `la-8` preset's, with a batch of 2 labelled + 2 unlabelled volumes. Schedules
over the 17,000 updates are stored run-length encoded (`runs`: first update, last update, value, ...) so that a
fixture stays small; the comparison itself is over every update.
"""

from __future__ import annotations

import functools
from collections.abc import Iterator, Sequence
from contextlib import contextmanager
from typing import Any
from unittest import mock

import torch
from torch import nn

from golden_step import KeyedDropout, _generator, inputs, install_dropout, seeded_weights

LA_PATCH = (112, 112, 80)


def runs(values: Sequence[float]) -> list[float]:
    """Run-length code of a per-update schedule: [first update, last update, value] per run, flattened."""
    out: list[float] = []
    for update, value in enumerate(values, start=1):
        if out and out[-1] == value:
            out[-2] = update
        else:
            out += [update, update, value]
    return out


def recipe() -> Any:
    """The la-8 recipe at the fixtures' batch (2 labelled + 2 unlabelled volumes)."""
    from semiseg.config import build_config

    return build_config("bcp", None, {"batch_labeled": 2, "batch_unlabeled": 2}, "la-8")


@contextmanager
def _recorded(target: object, name: str, sink: list) -> Iterator[None]:
    """Wrap `target.name` so that every call appends (args, result) to `sink`."""
    real = getattr(target, name)

    def wrapper(*args: Any, **kwargs: Any) -> Any:
        result = real(*args, **kwargs)
        sink.append((args, result))
        return result

    with mock.patch.object(target, name, wrapper):
        yield


def _tag_dropout(net: nn.Module, tag: str, seed: int) -> None:
    install_dropout(net, seed)
    for module in net.modules():
        if isinstance(module, KeyedDropout):
            module.keys = [f"{tag}.{key}" for key in module.keys]


def box_bounds(spatial: Sequence[int]) -> list[int]:
    """The exclusive upper bounds of the box starts semiseg draws for a patch (official: hard-coded for LA)."""
    from semiseg.methods import bcp

    with mock.patch.object(bcp.torch, "randint", wraps=torch.randint) as draw:
        bcp.box_mask(spatial, bcp.BCPParams().mask_ratio, torch.device("cpu"))
    return [call.args[1] for call in draw.call_args_list]


def box_starts(keep: torch.Tensor) -> list[int]:
    """First index of the box (the zeros of `keep`) along each axis."""
    inside = keep == 0
    return [int(inside.movedim(axis, 0).flatten(1).any(1).nonzero()[0]) for axis in range(keep.ndim)]


def bcp_inputs(seed: int, size: int) -> tuple[torch.Tensor, torch.Tensor]:
    """2 labelled volumes (the golden noise inputs and random labels) then 2 unlabelled ones: noisy bright balls,
    on which the seeded teacher's thresholded prediction splits into several components in the first volume and
    is empty in the second (both branches of the largest-component step)."""
    x, label = inputs(3, size, 4, 2, seed)
    g = _generator(seed, "bcp-unlabelled")
    grid = torch.stack(torch.meshgrid(*[torch.arange(size, dtype=torch.float64)] * 3, indexing="ij"))
    radius = 6
    for i in (2, 3):
        centres = torch.rand(4, 3, generator=g, dtype=torch.float64) * (size - 2 * radius) + radius
        inside = ((grid[None] - centres[:, :, None, None, None]) ** 2).sum(1).sqrt() < radius
        noise = torch.randn((size,) * 3, generator=g, dtype=torch.float64)
        x[i, 0] = (3.0 * inside.any(0) + noise).to(x.dtype)
    return x, label


def bcp_update(stage: str, n_filters: int, size: int, seed: int, iteration: int) -> dict[str, Any]:
    """One `train_step` + backward + SGD step (the recipe's lr at `iteration`, a fresh optimiser) + `after_step`."""
    from semiseg.data.loader import Batch
    from semiseg.engine.trainer import build_optimizer, learning_rate
    from semiseg.methods import bcp
    from semiseg.methods.base import NetSpec, StepContext

    cfg = recipe()
    method = bcp.BCP(cfg.method_params(), NetSpec(1, 2, 3, n_filters))
    pretrain = method.params.pretrain_iterations
    if (stage == "pretrain") != (iteration <= pretrain):
        raise ValueError(f"iteration {iteration} is not in the {stage} stage (pre-training: 1..{pretrain})")
    for net, tag, s in ((method.net, "student", seed), (method.teacher.net, "teacher", seed + 1)):
        net.load_state_dict(seeded_weights(net, s))
        _tag_dropout(net, tag, seed)
    x, label = bcp_inputs(seed, size)
    batch = Batch(x[:2], label[:2], x[2:], torch.arange(2))
    method.train()
    boxes: list = []
    terms: list = []
    lcc: list = []
    ctx = StepContext(iteration, cfg.iterations)
    torch.manual_seed(seed)
    with _recorded(bcp, "box_mask", boxes), _recorded(bcp, "region_dice_ce", terms), \
            _recorded(bcp, "largest_component", lcc):
        out = method.train_step(batch, ctx)
    optimizer = build_optimizer(cfg, method)
    lr = learning_rate(cfg, iteration)
    for group in optimizer.param_groups:
        group["lr"] = lr
    optimizer.zero_grad()
    out.loss.backward()
    grads = {k: p.grad.detach().clone() for k, p in method.net.named_parameters()}
    optimizer.step()
    ema: list = []
    with _recorded(method.teacher, "alpha", ema):
        method.after_step(ctx)
    keep = boxes[0][1]
    scalars: dict[str, float] = {"kept_voxels": float(keep.sum()), "lr": lr}
    if stage == "pretrain":
        scalars.update(dice=float(out.logs["loss/pretrain_dice"]), ce=float(out.logs["loss/pretrain_ce"]),
                       loss=float(out.loss.detach()))
    else:
        for (dice, ce), part in zip((result for _, result in terms), ("l_keep", "l_paste", "u_keep", "u_paste")):
            scalars[f"dice_{part}"], scalars[f"ce_{part}"] = float(dice.detach()), float(ce.detach())
        (thresholded,), pseudo = lcc[0][0], lcc[0][1]
        scalars.update(loss_l=float(out.logs["loss/labeled_mix"]), loss_u=float(out.logs["loss/unlabeled_mix"]),
                       loss=float(out.loss.detach()), u_weight=method.params.u_weight, ema_decay=ema[0][1],
                       pseudo_a_thresholded=float(thresholded[0].sum()),
                       pseudo_b_thresholded=float(thresholded[1].sum()),
                       pseudo_a=float(pseudo[0].sum()), pseudo_b=float(pseudo[1].sum()))
        scalars.update(mixed_losses_two_per_half(seed)["scalars"])
    scalars.update({f"la_box_bound_{axis}": float(b) for axis, b in zip("xyz", box_bounds(LA_PATCH))})
    result = {"method": method, "x": x, "label": label, "grads": grads, "scalars": scalars, "batch": 4,
              "keep": keep, "box_starts": box_starts(keep),
              "student": {k: p.detach() for k, p in method.net.named_parameters()},
              "buffers": {"student": {k: v for k, v in method.net.named_buffers() if "running" in k},
                          "teacher": {k: v for k, v in method.teacher.net.named_buffers() if "running" in k}}}
    if stage != "pretrain":
        result["teacher"] = {k: p.detach() for k, p in method.teacher.net.named_parameters()}
        result["pseudo"] = lcc[0][1]
    result.update(recipe_schedules())
    return result


class _Replay(nn.Module):
    """A stand-in network that returns fixed logits, one per call, whatever its input."""

    def __init__(self, outputs: list[torch.Tensor]) -> None:
        super().__init__()
        self.outputs, self.calls = outputs, 0

    def forward(self, _x: torch.Tensor) -> torch.Tensor:
        self.calls += 1
        return self.outputs[self.calls - 1]


def loss_case(seed: int, size: int = 12) -> dict[str, torch.Tensor]:
    """Seeded logits of the two mixed batches, labels and pseudo-labels ([:2] for the first mixed batch, [2:]
    for the second), two volumes per half."""
    g = _generator(seed, "bcp-mixed-losses")
    shape = (size,) * 3
    logits = torch.randn(4, 2, *shape, generator=g, dtype=torch.float64).to(torch.get_default_dtype())
    return {"logits_l": logits[:2], "logits_u": logits[2:], "label": torch.randint(0, 2, (4, *shape), generator=g),
            "pseudo": torch.randint(0, 2, (4, *shape), generator=g)}


def mixed_losses_two_per_half(seed: int) -> dict[str, Any]:
    """semiseg's `self_train_step` on 4 + 4 volumes with the network replaced by fixed logits and the pseudo-labels
    fixed: its two mixed losses, where each Dice is a mean over two samples (per sample, not batch-pooled)."""
    from semiseg.data.loader import Batch
    from semiseg.methods import bcp
    from semiseg.methods.base import NetSpec

    case = loss_case(seed)
    method = bcp.BCP(bcp.BCPParams(), NetSpec(1, 2, 3, 2))
    method.net = _Replay([case["logits_l"], case["logits_u"]])
    method.pseudo_labels = lambda _a, _b: case["pseudo"]  # type: ignore[method-assign]
    images = torch.zeros(4, 1, *case["label"].shape[1:])
    boxes: list = []
    torch.manual_seed(seed)
    with _recorded(bcp, "box_mask", boxes):
        out = method.self_train_step(Batch(images, case["label"], images, torch.arange(4)))
    keep = boxes[0][1]
    return {"case": case, "box_starts": box_starts(keep),
            "scalars": {"mixed_l_two_per_half": float(out.logs["loss/labeled_mix"]),
                        "mixed_u_two_per_half": float(out.logs["loss/unlabeled_mix"])}}


def recipe_schedules() -> dict[str, Any]:
    """`_recipe_schedules`, copied (computed once per process)."""
    cached = _recipe_schedules()
    return {"ramp": list(cached["ramp"]), "schedules": {k: list(v) for k, v in cached["schedules"].items()}}


@functools.lru_cache(maxsize=1)
def _recipe_schedules() -> dict[str, Any]:
    """Per update of the recipe: the weight of voxels from unlabelled volumes (0 while pre-training: none are
    used; the `ramp`), the learning rate, the EMA decay applied after the update (0: no EMA update), whether the
    teacher is restarted from the student and whether the optimiser starts fresh before it."""
    from semiseg.data.loader import Batch
    from semiseg.engine.trainer import learning_rate
    from semiseg.methods import bcp
    from semiseg.methods.base import NetSpec, StepContext, StepOutput

    cfg = recipe()
    method = bcp.BCP(cfg.method_params(), NetSpec(1, 2, 3, 2))
    weight: list[float] = []
    restarts: list[float] = []
    decay: list[float] = []
    empty = StepOutput(torch.zeros(()), {})
    method.pretrain_step = lambda _b: weight.append(0.0) or empty  # type: ignore[method-assign]
    method.self_train_step = lambda _b: weight.append(method.params.u_weight) or empty  # type: ignore[method-assign]
    method.teacher.copy_from = lambda _s: restarts.append(1.0)  # type: ignore[method-assign]
    method.teacher.update = lambda _s, t: decay.append(method.teacher.alpha(t))  # type: ignore[method-assign]
    tiny = torch.zeros(2, 1, 1, 1, 1)
    batch = Batch(tiny, tiny[:, 0].long(), tiny, torch.arange(2))
    resets = set(method.optimizer_resets())
    schedules: dict[str, list[float]] = {"learning rate": [], "EMA decay": [], "teacher restarted": [],
                                         "fresh optimiser": []}
    for t in range(1, cfg.iterations + 1):
        ctx = StepContext(t, cfg.iterations)
        n_restarts, n_updates = len(restarts), len(decay)
        method.train_step(batch, ctx)
        method.after_step(ctx)
        schedules["learning rate"].append(learning_rate(cfg, t))
        schedules["EMA decay"].append(decay[-1] if len(decay) > n_updates else 0.0)
        schedules["teacher restarted"].append(float(len(restarts) > n_restarts))
        schedules["fresh optimiser"].append(float(t == 1 or t - 1 in resets))  # the trainer's rule
    return {"ramp": weight, "schedules": schedules}


@functools.lru_cache(maxsize=2)
def _cached_update(stage: str, n_filters: int, size: int, seed: int, iteration: int,
                   dtype: torch.dtype) -> dict[str, Any]:
    return bcp_update(stage, n_filters, size, seed, iteration)


def fixture_update(fx: dict[str, Any]) -> dict[str, Any]:
    """`bcp_update` for a fixture, computed once per process (the generic test and test_golden_bcp.py share it)."""
    return _cached_update(fx["stage"], fx["n_filters"], fx["size"], fx["seed"], fx["iteration"],
                          torch.get_default_dtype())


def semiseg_update(fx: dict[str, Any]) -> dict[str, Any]:
    """What `tests/test_golden.py::test_whole_update_matches_official` compares with a bcp fixture."""
    res = fixture_update(fx)
    if fx.get("encoding") != "runs":
        return res
    return {**res, "ramp": runs(res["ramp"]),
            "schedules": {name: runs(values) for name, values in res["schedules"].items()}}
