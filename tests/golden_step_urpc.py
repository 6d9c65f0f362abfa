"""semiseg's side of `benchmarks/official_step_urpc.py`: one whole URPC update on seeded weights.

The `la-8` preset gives every hyper-parameter; semiseg's `PyramidVNet` (the official `unet_3D_dv_semi` is a 3D
UNet with no semiseg counterpart, so both sides run this network: docs/methods/urpc.md) with `seeded_weights`,
keyed dropout, 2 labelled + 2 unlabelled seeded inputs with 3 classes (the official script hard-codes
`num_classes = 3`, its GTV data; URPC's loss is class-count agnostic); one SGD step at the preset's learning rate
of update `iteration`.
"""

from __future__ import annotations

from typing import Any

import torch

from golden_step import inputs, install_dropout, seeded_weights

CLASSES = 3
SCHEDULE_EVERY = 10
"""The fixture stores the ramp and the learning rate at updates 1, 11, 21, ...; the table compares every one."""


def build(fx: dict[str, Any]) -> tuple[Any, Any]:
    """The la-8 configuration and the method with seeded weights and keyed dropout."""
    from semiseg.config import build_config
    from semiseg.engine.trainer import build_method
    from semiseg.methods.base import NetSpec

    cfg = build_config("urpc", None, {"n_filters": fx["n_filters"], "device": "cpu", **fx.get("set", {})}, "la-8")
    method = build_method(cfg, NetSpec(1, CLASSES, 3, cfg.n_filters), torch.device("cpu"))
    method.net.load_state_dict(seeded_weights(method.net, fx["seed"]))
    install_dropout(method.net, fx["seed"])
    return cfg, method


def semiseg_update(fx: dict[str, Any], every: int | None = None) -> dict[str, Any]:
    from semiseg.data.loader import Batch
    from semiseg.engine.trainer import build_optimizer, learning_rate
    from semiseg.methods.base import StepContext

    every = fx.get("schedule_every", SCHEDULE_EVERY) if every is None else every
    k = fx["iteration"]
    cfg, method = build(fx)
    x, label = inputs(3, fx["size"], 4, CLASSES, fx["seed"])
    method.train()
    ctx = StepContext(k, cfg.iterations)
    out = method.train_step(Batch(x[:2], label[:2], x[2:], torch.arange(2)), ctx)
    optimizer = build_optimizer(cfg, method)
    for group in optimizer.param_groups:
        group["lr"] = learning_rate(cfg, k)
    optimizer.zero_grad()
    out.loss.backward()
    grads = {n: p.grad.detach().clone() for n, p in method.net.named_parameters()}
    optimizer.step()
    method.after_step(ctx)
    logs = out.logs
    updates = range(1, cfg.iterations + 1, every)
    return {"method": method, "x": x, "label": label, "grads": grads, "batch": 4, "iterations": cfg.iterations,
            "scalars": {"supervised": float(logs["loss/supervised"]), "consistency": float(logs["loss/consistency"]),
                        "mean_kl": float(logs["uncertainty/mean_kl"]), "weight": float(logs["weight/consistency"]),
                        "loss": float(out.loss.detach()), "lr": learning_rate(cfg, k)},
            "student": {n: v.detach() for n, v in method.net.named_parameters()},
            "ramp": [method.consistency_weight(StepContext(t, cfg.iterations)) for t in updates],
            "schedules": {"learning rate": [learning_rate(cfg, t) for t in updates]}}
