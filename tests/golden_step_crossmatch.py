"""semiseg's side of the whole-update CrossMatch comparison (`benchmarks/official_step_crossmatch.py`).

Everything random is a function of the seed and shared with the official run: the weights (`seeded_weights`,
the output convolution scaled by `logit_scale` so that a fair share of the voxels passes the confidence
threshold), the inputs of every update (`case`: labelled images and labels, u_w, the mix batch, stand-ins for
their strong views and the CutMix boxes, fed to both sides as tensors), the
network's own dropout (`StepDropout`, keyed by the semiseg module name and counted in train mode only, so the
official end-of-epoch validation does not shift the masks) and the feature perturbation (`FeatureDropout`,
keyed by the rate and the pyramid level, i.e. the channel count, in both codes' call order).

`semiseg_update(fx)` runs the fixture's updates with `CrossMatch.train_step` and the trainer's optimiser and
learning rate (`build_optimizer`, `learning_rate` of the preset), and returns what `tests/test_golden.py`
checks, plus `masks` (voxel counts and CRCs of every pseudo-label target and confidence mask) for
`tests/test_golden_crossmatch.py`.
"""

from __future__ import annotations

import json
import sys
import zlib
from collections.abc import Iterator
from contextlib import contextmanager
from typing import Any

import torch
from torch import nn

from golden_step import KeyedDropout, _generator, install_dropout, seeded_weights

# The nine Dice calls of one update, in semiseg's order (official LA / ACDC order: OFFICIAL_ORDER).
TERMS = ["dice_x", "s1", "s2", "tkd_w_weak", "tkd_w_strong", "tkd_s2_weak", "tkd_s2_strong", "dkd_s2_weak",
         "dkd_s2_strong"]
OFFICIAL_ORDER = ["dice_x", "s1", "s2", "dkd_s2_weak", "dkd_s2_strong", "tkd_w_weak", "tkd_w_strong",
                  "tkd_s2_weak", "tkd_s2_strong"]
TITLES = {"dice_x": "supervised Dice of P_c(x)", "s1": "L_s1: P_c(s1) vs Y_c^1", "s2": "L_s2: P_c(s2) vs Y_c^2",
          "tkd_w_weak": "L_tkd: P_w(u_w) vs Y_c", "tkd_w_strong": "L_tkd: P_s(u_w) vs Y_c",
          "tkd_s2_weak": "L_tkd: P_w(s2) vs Y_c^2", "tkd_s2_strong": "L_tkd: P_s(s2) vs Y_c^2",
          "dkd_s2_weak": "L_dkd: P_w(s2) vs Y_w^2", "dkd_s2_strong": "L_dkd: P_s(s2) vs Y_s^2",
          "loss_x": "L_x = (CE + Dice) / 2",
          "loss_tkd": "L_tkd (mean of 4)", "loss_dkd": "L_dkd (mean of 2)", "loss_kd": "L_kd = 0.7 L_tkd + 0.3 L_dkd",
          "loss": "total loss", "threshold": "confidence threshold", "lr": "learning rate of the update",
          "running_stats": "BatchNorm running statistics (norm)", "optimizer_state": "optimiser state (norm)"}


class StepDropout(KeyedDropout):
    """`KeyedDropout` that draws (and counts) only in train mode; `active` (set around the official flat VNet's
    encoder / decoder) overrides the key of a module called at two places."""

    active: str | None = None

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if not self.training or self.p == 0:
            return x
        key = self.active or self.keys[0]
        count = self.calls.get(key, 0)
        self.calls[key] = count + 1
        shape = (*x.shape[:2], *[1] * (x.ndim - 2)) if self.channelwise else x.shape
        keep = torch.rand(shape, generator=_generator(self.seed, key, count)) >= self.p
        return x * (keep.to(x.dtype) / (1 - self.p))


def as_step_dropout(net: nn.Module) -> None:
    """Turn the `KeyedDropout` modules that `install_dropout` / `_install_official_dropout` put in into
    `StepDropout` (same keys and seed)."""
    for module in net.modules():
        if type(module) is KeyedDropout:
            module.__class__ = StepDropout


class FeatureDropout(nn.Module):
    """Always-on channel dropout of the feature perturbation, keyed by (rate, channel count, call number): the
    official `PertDropout` modules (a plain list, never switched to eval) and semiseg's functional calls draw
    the same masks at every pyramid level."""

    def __init__(self, p: float, seed: int) -> None:
        super().__init__()
        self.p, self.seed = p, seed
        self.calls: dict[str, int] = {}

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        key = f"fp{self.p}.c{x.shape[1]}"
        count = self.calls.get(key, 0)
        self.calls[key] = count + 1
        keep = torch.rand((*x.shape[:2], *[1] * (x.ndim - 2)), generator=_generator(self.seed, key, count)) >= self.p
        return x * (keep.to(x.dtype) / (1 - self.p))


def weights(module: nn.Module, seed: int, logit_scale: float) -> dict[str, torch.Tensor]:
    """`seeded_weights` with the output convolution (`decoder.out_conv`) multiplied by `logit_scale`."""
    state = seeded_weights(module, seed)
    for key in state:
        if key.startswith("decoder.out_conv."):
            state[key] = state[key] * logit_scale
    return state


def _views(g: torch.Generator, images: torch.Tensor, unit_range: bool) -> torch.Tensor:
    """Stand-ins for strong views: per-sample gain U(0.7, 1.3), offset U(-0.1, 0.1) and 0.05 Gaussian noise
    (clipped to [0, 1] for 2D images). Made here, not by semiseg's augmentation, so that a change there does not
    change the fixture's inputs (the views reach both codes as tensors anyway)."""
    n, extra = len(images), [1] * (images.ndim - 1)
    gain = 0.7 + 0.6 * torch.rand(n, *extra, generator=g, dtype=torch.float64)
    offset = 0.2 * torch.rand(n, *extra, generator=g, dtype=torch.float64) - 0.1
    out = images.double() * gain + offset + 0.05 * torch.randn(images.shape, generator=g, dtype=torch.float64)
    return (out.clamp(0, 1) if unit_range else out).to(images.dtype)


def _boxes(g: torch.Generator, n: int, shape: tuple[int, ...]) -> torch.Tensor:
    """One box per sample, sides U{s/4 .. s/2} and position uniform on every axis."""
    boxes = torch.zeros(n, *shape)
    for box in boxes:
        region = []
        for s in shape:
            side = int(torch.randint(s // 4, s // 2 + 1, (1,), generator=g))
            start = int(torch.randint(0, s - side + 1, (1,), generator=g))
            region.append(slice(start, start + side))
        box[tuple(region)] = 1
    return boxes


def case(dims: int, size: int, batch: int, classes: int, seed: int, updates: int) -> list[dict[str, torch.Tensor]]:
    """The inputs of every update: x, y (labelled), u_w, u_mix (semiseg's unlabelled stream before its own 8-bit
    quantisation in 2D), the strong views s1, s2, s1_mix, s2_mix and the boxes box1, box2 (and the mix stream's
    unused box1_mix, box2_mix); a function of the seed alone."""
    dtype, shape, out = torch.get_default_dtype(), (size,) * dims, []
    for k in range(1, updates + 1):
        g = _generator(seed, "crossmatch-case", k)
        draw = torch.rand if dims == 2 else torch.randn
        x, u_w, u_mix = (draw(batch, 1, *shape, generator=g, dtype=torch.float64).to(dtype) for _ in range(3))
        y = torch.randint(0, classes, (batch, *shape), generator=g)
        views = _views(g, torch.cat([u_w, u_w, u_mix, u_mix]), dims == 2)
        s1, s2, s1_mix, s2_mix = views.split(batch)
        box1, box2, box1_mix, box2_mix = _boxes(g, 4 * batch, shape).to(dtype).split(batch)
        out.append({"x": x, "y": y, "u_w": u_w, "u_mix": u_mix, "s1": s1, "s2": s2, "s1_mix": s1_mix,
                    "s2_mix": s2_mix, "box1": box1, "box2": box2, "box1_mix": box1_mix, "box2_mix": box2_mix})
    return out


def mask_summary(target: torch.Tensor, valid: torch.Tensor, classes: int) -> dict[str, Any]:
    """Voxel counts and CRC-32s of a pseudo-label target [N, *S] and its confidence mask (identical maps give
    identical CRCs; the counts say how far apart two maps are)."""
    t, v = target.to(torch.uint8).contiguous(), valid.to(torch.uint8).contiguous()
    return {"valid": int(v.sum()), "voxels": v.numel(), "classes": torch.bincount(t.flatten(), minlength=classes)
            .tolist(), "valid_classes": torch.bincount(t[v.bool()], minlength=classes).tolist(),
            "crc_target": zlib.crc32(t.numpy().tobytes()), "crc_valid": zlib.crc32(v.numpy().tobytes())}


def state_norms(net: nn.Module, optimizer: torch.optim.Optimizer) -> dict[str, float]:
    """Norms of every BatchNorm running statistic and of the optimiser state (momentum / Adam moments)."""
    stats = [b.double().flatten() for k, b in net.named_buffers() if "running" in k]
    state = [v.double().flatten() for s in optimizer.state.values() for v in s.values()
             if isinstance(v, torch.Tensor) and v.numel() > 1]
    return {"running_stats": torch.cat(stats).norm().item(), "optimizer_state": torch.cat(state).norm().item()}


@contextmanager
def keyed_perturbation(seed: int, rates: tuple[float, ...]) -> Iterator[None]:
    """semiseg's `perturb_features` replaced by `FeatureDropout`s of the same rates."""
    import semiseg.nets.perturbed as perturbed

    drops = {r: FeatureDropout(r, seed) for r in rates}
    original = perturbed.perturb_features
    perturbed.perturb_features = lambda feature, rate, kind="dropout": drops[rate](feature)
    try:
        yield
    finally:
        perturbed.perturb_features = original


@contextmanager
def train_step_locals(store: dict[str, Any]) -> Iterator[None]:
    """Copy the locals of `CrossMatch.train_step` into `store` when it returns (tau, the targets, the masks)."""
    from semiseg.methods.crossmatch import CrossMatch

    code = CrossMatch.train_step.__code__
    previous = sys.getprofile()

    def profile(frame: Any, event: str, arg: Any) -> None:
        if event == "return" and frame.f_code is code:
            store.update(frame.f_locals)

    sys.setprofile(profile)
    try:
        yield
    finally:
        sys.setprofile(previous)


def config(fx: dict[str, Any], mix_teacher_eval: bool = True) -> Any:
    """The preset's configuration with the fixture's overrides (`mix_teacher_eval=False` switches quirk Q2's
    epoch rule off, for the rerun that shows it matters)."""
    from semiseg.config import build_config

    overrides = dict(fx["case"]["overrides"])
    if not mix_teacher_eval:
        overrides["mix_teacher_eval_epoch_iterations"] = 0
    return build_config("crossmatch", None, overrides, fx["case"]["preset"])


def run_updates(fx: dict[str, Any], mix_teacher_eval: bool = True) -> dict[str, Any]:
    """semiseg's updates 1..U of the fixture's case; the last one is the compared update."""
    from semiseg.data.loader import Batch
    from semiseg.engine.trainer import build_optimizer, learning_rate
    from semiseg.methods.base import NetSpec, StepContext
    from semiseg.methods.crossmatch import CrossMatch

    c = fx["case"]
    dims, seed, classes = fx["dims"], fx["seed"], c["classes"]
    cfg = config(fx, mix_teacher_eval)
    method = CrossMatch(cfg.method_params(), NetSpec(1, classes, dims, fx["n_filters"]))
    net = method.net.net
    net.load_state_dict(weights(net, seed, c["logit_scale"]))
    install_dropout(net, seed)
    as_step_dropout(net)
    optimizer = build_optimizer(cfg, method)
    modes: list[bool] = []
    net.register_forward_pre_hook(lambda module, _: modes.append(module.training))
    calls: list[tuple[torch.Tensor, torch.Tensor, torch.Tensor | None]] = []
    dice = method.dice

    def recording_dice(logits: torch.Tensor, target: torch.Tensor, valid: torch.Tensor | None = None) -> torch.Tensor:
        value = dice(logits, target, valid)
        calls.append((value.detach(), target, valid))
        return value

    method.dice = recording_dice  # type: ignore[method-assign]
    method.train()
    inputs = case(dims, fx["size"], c["batch"], classes, seed, c["updates"])
    per_update: list[dict[str, Any]] = []
    grads: dict[str, torch.Tensor] = {}
    with keyed_perturbation(seed, method.params.fp_rates):
        for k, b in enumerate(inputs, 1):
            method.strong_views = lambda _, b=b: torch.cat([b["s1"], b["s2"], b["s1_mix"], b["s2_mix"]])
            method.cutmix_boxes = lambda n, size, device, b=b: torch.cat([b["box1"], b["box2"]])
            lr = learning_rate(cfg, k)
            for group in optimizer.param_groups:
                group["lr"] = lr
            ctx = StepContext(c["threshold_iterations"][k - 1], cfg.iterations)
            calls.clear()
            modes.clear()
            local: dict[str, Any] = {}
            with train_step_locals(local):
                out = method.train_step(Batch(b["x"], b["y"], torch.cat([b["u_w"], b["u_mix"]]),
                                              torch.arange(c["batch"])), ctx)
            optimizer.zero_grad(set_to_none=True)
            out.loss.backward()
            grads = {name: p.grad.detach().clone() for name, p in net.named_parameters()}
            optimizer.step()
            method.after_step(ctx)
            per_update.append({"out": out, "lr": lr, "calls": list(calls), "mix_teacher_train": modes[0],
                               "tau": local["tau"]})
    last = per_update[-1]
    logs = last["out"].logs
    scalars = {"loss_x": float(logs["loss/x"]), "loss_tkd": float(logs["loss/tkd"]),
               "loss_dkd": float(logs["loss/dkd"]),
               "loss_kd": float((1 - method.params.eta) * logs["loss/tkd"] + method.params.eta * logs["loss/dkd"]),
               "loss": float(last["out"].loss.detach()), "threshold": float(last["tau"]), "lr": last["lr"],
               **{name: float(value) for name, (value, _, _) in zip(TERMS, last["calls"])},
               **state_norms(net, optimizer)}
    for k, update in enumerate(per_update[:-1], 1):
        scalars[f"loss_update_{k}"] = float(update["out"].loss.detach())
    masks = {name: mask_summary(target, valid, classes)
             for name, (_, target, valid) in zip(TERMS[1:], last["calls"][1:])}
    return {"method": method, "grads": grads, "scalars": scalars, "masks": masks,
            "calls": last["calls"], "student": {k: v.detach() for k, v in net.named_parameters()},
            "mix_teacher_train": [u["mix_teacher_train"] for u in per_update], "batch": 3 * c["batch"],
            "lrs": [u["lr"] for u in per_update], "thresholds": [float(u["tau"]) for u in per_update]}


def sampled(values: list[float], every: int) -> list[float]:
    """Updates 1-10, every `every`-th update and the last two: what a fixture stores of a recipe-long schedule."""
    n = len(values)
    keep = sorted(set(range(10)) | set(range(0, n, every)) | {n - 2, n - 1})
    return [values[i] for i in keep]


def schedules(fx: dict[str, Any], full: bool = False) -> dict[str, list[float]]:
    """semiseg's learning rate, confidence threshold and (2D) mix-teacher eval-mode updates over the whole
    recipe (`fx["case"]["recipe"]`: the preset and its overrides); `full=False` gives the fixture's samples."""
    from semiseg.config import build_config
    from semiseg.engine.trainer import learning_rate
    from semiseg.methods.base import NetSpec
    from semiseg.methods.crossmatch import CrossMatch

    recipe = fx["case"]["recipe"]
    cfg = build_config("crossmatch", None, recipe["overrides"], recipe["preset"])
    method = CrossMatch(cfg.method_params(), NetSpec(1, fx["case"]["classes"], fx["dims"], 4))
    n = cfg.iterations
    out = {"learning rate": [learning_rate(cfg, k) for k in range(1, n + 1)],
           "confidence threshold": [method.threshold(k, n) for k in range(1, n + 1)]}
    every = recipe["every"]
    if not full:
        out = {f"{name} (sampled)": sampled(values, every) for name, values in out.items()}
    if fx["dims"] == 2:
        out["mix-teacher eval-mode updates"] = [float(k) for k in range(1, n + 1) if not method.mix_teacher_trains(k)]
    return out


_CACHE: dict[str, dict[str, Any]] = {}


def cached_update(fx: dict[str, Any]) -> dict[str, Any]:
    """`run_updates(fx)` once per fixture and test session (the generic and the mask test share it)."""
    key = json.dumps([fx["dims"], fx["size"], fx["seed"], fx["n_filters"], fx["case"], fx.get("dtype")])
    if key not in _CACHE:
        _CACHE[key] = run_updates(fx)
    return _CACHE[key]


def semiseg_update(fx: dict[str, Any]) -> dict[str, Any]:
    """What `tests/test_golden.py::test_whole_update_matches_official` compares with the fixture."""
    res = dict(cached_update(fx))
    res["ramp"] = []
    res["schedules"] = schedules(fx) | {"mix teacher in train mode (in-place run)":
                                        [float(m) for m in res["mix_teacher_train"]],
                                        "learning rate (in-place run)": res["lrs"],
                                        "confidence threshold (in-place run)": res["thresholds"]}
    return res

