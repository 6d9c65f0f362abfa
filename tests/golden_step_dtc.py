"""semiseg's side of the whole DTC update (`benchmarks/official_step_dtc.py` runs the official one).

The case: seeded weights (`golden_step.seeded_weights`) in semiseg's layout, keyed dropout, the inputs of
`golden_step.ball_batch` (ball-shaped labels so the signed distance map has a range of values), update
`fx["iteration"]` of the `la-16` preset, SGD at the learning rate the official step used (`fx["lr_at_step"]`).
"""

from __future__ import annotations

from typing import Any

import torch

from golden_step import ball_batch, install_dropout, run_length, seeded_weights


def build(fx: dict[str, Any]) -> Any:
    from semiseg.config import build_config
    from semiseg.methods import get_method
    from semiseg.methods.base import NetSpec

    cfg = build_config("dtc", preset="la-16")
    method = get_method("dtc")(cfg.method_params(), NetSpec(1, 2, 3, fx["n_filters"]))
    method.net.load_state_dict(seeded_weights(method.net, fx["seed"]))
    install_dropout(method.net, fx["seed"])
    return method, cfg


def semiseg_update(fx: dict[str, Any]) -> dict[str, Any]:
    from semiseg.data.loader import Batch
    from semiseg.engine.trainer import learning_rate
    from semiseg.methods.base import StepContext

    method, cfg = build(fx)
    x, label = ball_batch(fx["size"], fx["seed"])
    method.train()
    ctx = StepContext(fx["iteration"], cfg.iterations)
    out = method.train_step(Batch(x[:2], label[:2], x[2:], torch.arange(2)), ctx)
    optimizer = torch.optim.SGD(method.trainable_parameters(), lr=fx["lr_at_step"], momentum=cfg.momentum,
                                weight_decay=cfg.weight_decay)
    optimizer.zero_grad()
    out.loss.backward()
    grads = {k: p.grad.detach().clone() for k, p in method.net.named_parameters()}
    optimizer.step()
    logs = out.logs
    scalars = {"dice": float(logs["loss/dice"]), "sdf": float(logs["loss/sdf"]), "bce": float(logs["loss/bce"]),
               "consistency": float(logs["loss/consistency"]), "weight": float(logs["weight/consistency"]),
               "loss": float(out.loss.detach())}
    total = cfg.iterations
    lr = [learning_rate(cfg, t) for t in range(1, total + 1)]
    ramp = [method.consistency_weight(StepContext(t, total)) for t in range(1, total + 1)]
    return {"method": method, "x": x, "label": label, "grads": grads, "scalars": scalars,
            "student": {k: p.detach() for k, p in method.net.named_parameters()},
            "ramp": run_length(ramp) if fx.get("ramp_encoding") == "run length" else ramp,
            "schedules": {"learning rate": lr, "learning rate (value, run length)": run_length(lr)}}
