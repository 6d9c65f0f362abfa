"""semiseg's side of `benchmarks/official_step_cps.py`: one whole CPS update (both networks) on seeded weights.

The preset of the setting (`la-8` in 3D, `acdc-7` in 2D) gives every hyper-parameter; the batch is 2 labelled +
2 unlabelled seeded inputs; network 1 gets `seeded_weights(seed)`, network 2 `seeded_weights(seed + 1)` (so
their pseudo-labels differ), keyed dropout under `net1.` / `net2.`; one SGD step at the preset's learning rate
of update `iteration`. Also records the initialisation drawn by `torch.manual_seed(seed)` (Kaiming / Xavier in
3D, PyTorch's default in 2D) and the voxel counts of the hard pseudo-labels.
"""

from __future__ import annotations

from typing import Any

import torch

from golden_step import KeyedDropout, inputs, install_dropout, seeded_weights

PRESETS = {3: "la-8", 2: "acdc-7"}
SCHEDULE_EVERY = 10
"""The fixture stores the ramp and the learning rate at updates 1, 11, 21, ... (every epoch boundary of the
150-update ramp epochs included); the benchmark's table compares every update."""


def classes_of(dims: int) -> int:
    return 2 if dims == 3 else 4


def prefix_dropout(net: torch.nn.Module, tag: str) -> None:
    for module in net.modules():
        if isinstance(module, KeyedDropout):
            module.keys = [f"{tag}.{key}" for key in module.keys]


def global_norm(tensors: Any) -> float:
    return float(torch.stack([t.detach().double().norm() for t in tensors]).norm())


def semiseg_update(fx: dict[str, Any], every: int | None = None) -> dict[str, Any]:
    from semiseg.config import build_config
    from semiseg.data.loader import Batch
    from semiseg.engine.trainer import build_method, build_optimizer, learning_rate
    from semiseg.methods import cps
    from semiseg.methods.base import NetSpec, StepContext

    dims, seed, k = fx["dims"], fx["seed"], fx["iteration"]
    every = fx.get("schedule_every", SCHEDULE_EVERY) if every is None else every
    classes = classes_of(dims)
    cfg = build_config("cps", None, {"n_filters": fx["n_filters"], "device": "cpu"}, PRESETS[dims])
    torch.manual_seed(seed)
    method = build_method(cfg, NetSpec(1, classes, dims, cfg.n_filters), torch.device("cpu"))
    init = {f"init{i}": global_norm(net.parameters()) for i, net in ((1, method.net1), (2, method.net2))}
    for net, tag, s in ((method.net1, "net1", seed), (method.net2, "net2", seed + 1)):
        net.load_state_dict(seeded_weights(net, s))
        install_dropout(net, seed)
        prefix_dropout(net, tag)
    x, label = inputs(dims, fx["size"], 4, classes, seed)

    targets: dict[str, torch.Tensor] = {}
    real = cps.cross_pseudo_loss

    def recording(logits_a: torch.Tensor, logits_b: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        targets["1"], targets["2"] = logits_a.detach().argmax(1), logits_b.detach().argmax(1)
        return real(logits_a, logits_b)

    method.train()
    ctx = StepContext(k, cfg.iterations)
    cps.cross_pseudo_loss = recording
    try:
        out = method.train_step(Batch(x[:2], label[:2], x[2:], torch.arange(2)), ctx)
    finally:
        cps.cross_pseudo_loss = real
    optimizer = build_optimizer(cfg, method)
    for group in optimizer.param_groups:
        group["lr"] = learning_rate(cfg, k)
    optimizer.zero_grad()
    out.loss.backward()
    named = [(f"net{i}.{n}", p) for i, net in ((1, method.net1), (2, method.net2)) for n, p in net.named_parameters()]
    grads = {n: p.grad.detach().clone() for n, p in named}
    optimizer.step()
    method.after_step(ctx)
    logs = out.logs
    scalars = {"supervised1": float(logs["loss/supervised1"]), "supervised2": float(logs["loss/supervised2"]),
               "cps1": float(logs["loss/cps1"]), "cps2": float(logs["loss/cps2"]),
               "weight": float(logs["weight/consistency"]), "loss": float(out.loss.detach()),
               "lr": learning_rate(cfg, k),
               "pseudo1_foreground": float((targets["1"] > 0).sum()),
               "pseudo2_foreground": float((targets["2"] > 0).sum()),
               "pseudo_agree": float((targets["1"] == targets["2"]).sum()), **init}
    updates = range(1, cfg.iterations + 1, every)
    return {"method": method, "x": x, "label": label, "grads": grads, "scalars": scalars, "batch": 4,
            "net1": {n: p.detach() for n, p in named if n.startswith("net1.")},
            "net2": {n: p.detach() for n, p in named if n.startswith("net2.")},
            "ramp": [method.consistency_weight(StepContext(t, cfg.iterations)) for t in updates],
            "schedules": {"learning rate": [learning_rate(cfg, t) for t in updates]},
            "iterations": cfg.iterations}
