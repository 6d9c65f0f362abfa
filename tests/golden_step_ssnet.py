"""semiseg's side of the whole SS-Net update (`benchmarks/official_step_ssnet.py` runs the official one).

The case: seeded weights for the whole method (VNet, projection / prediction heads, the four selectors; the
prototype memory empty, as the official `FeatureMemory` starts every run), keyed dropout, `golden_step.ball_batch`,
`torch.manual_seed(seed)` right before the step (VAT's random direction), update `fx["iteration"]` of the `la-4`
preset, SGD at the learning rate the official step used. The official heads are 16 -> 32 wide whatever the VNet's
width, so this case has 16 base filters (on 16^3 volumes).
"""

from __future__ import annotations

from typing import Any

import torch

from golden_step import ball_batch, install_dropout, run_length, seeded_weights

# Official key prefix (networks/VNet.py) -> semiseg's, relative to the method.
HEADS = {"projection_head.": "projection_head.", "prediction_head.": "prediction_head.",
         "contrastive_class_selector_memory": "memory_selectors.", "contrastive_class_selector_": "feature_selectors."}


def official_to_semiseg(official_keys: list[str]) -> dict[str, str]:
    """Every official parameter and buffer (heads included) -> the semiseg method's key."""
    from semiseg.official import key_map

    net = key_map(official_keys, "ssnet", 3)
    out = {o: f"net.{s}" for o, s in net.items()}
    for key in official_keys:
        for prefix, ours in HEADS.items():
            if key.startswith(prefix):
                out[key] = ours + key.removeprefix(prefix)
                break
    return out


def build(fx: dict[str, Any]) -> Any:
    from semiseg.config import build_config
    from semiseg.methods import get_method
    from semiseg.methods.base import NetSpec

    cfg = build_config("ssnet", preset="la-4")
    method = get_method("ssnet")(cfg.method_params(), NetSpec(1, 2, 3, fx["n_filters"]))
    state = seeded_weights(method, fx["seed"])
    state["memory"], state["memory_count"] = torch.zeros_like(method.memory), torch.zeros_like(method.memory_count)
    method.load_state_dict(state)
    install_dropout(method.net, fx["seed"])
    return method, cfg


def semiseg_update(fx: dict[str, Any]) -> dict[str, Any]:
    from semiseg.data.loader import Batch
    from semiseg.engine.trainer import learning_rate
    from semiseg.methods.base import StepContext

    method, cfg = build(fx)
    x, label = ball_batch(fx["size"], fx["seed"])
    seen: dict[str, list[int]] = {"correct": [], "labels": []}
    update_memory, prototype_loss = method.update_memory, method.prototype_loss

    def spy_memory(features: torch.Tensor, labels: torch.Tensor, correct: torch.Tensor) -> None:
        seen["correct"].append(int(correct.sum()))
        update_memory(features, labels, correct)

    def spy_loss(predicted: torch.Tensor, labels: torch.Tensor) -> torch.Tensor:
        seen["labels"].append(int((labels == 1).sum()))
        return prototype_loss(predicted, labels)

    method.update_memory, method.prototype_loss = spy_memory, spy_loss
    method.train()
    ctx = StepContext(fx["iteration"], cfg.iterations)
    torch.manual_seed(fx["seed"])
    out = method.train_step(Batch(x[:2], label[:2], x[2:], torch.arange(2)), ctx)
    optimizer = torch.optim.SGD(method.trainable_parameters(), lr=fx["lr_at_step"], momentum=cfg.momentum,
                                weight_decay=cfg.weight_decay)
    optimizer.zero_grad()
    out.loss.backward()
    grads = {k: p.grad.detach().clone() for k, p in method.named_parameters() if p.grad is not None}
    optimizer.step()
    logs = out.logs
    rows = int(method.memory_count[1])
    scalars = {"dice": float(logs["loss/dice"]), "vat": float(logs["loss/vat"]),
               "proto_l": float(logs["loss/prototype_labeled"]), "proto_u": float(logs["loss/prototype_unlabeled"]),
               "weight": float(logs["weight/consistency"]), "loss": float(out.loss.detach()),
               "correct_foreground": float(seen["correct"][0]), "memory_rows": float(rows),
               "memory_norm": float(method.memory[1, :rows].double().norm()),
               "pseudo_foreground": float(seen["labels"][1])}
    total = cfg.iterations
    p = method.params
    from semiseg.engine.schedules import sigmoid_rampup

    lr = [learning_rate(cfg, t) for t in range(1, total + 1)]
    ramp = [p.consistency * sigmoid_rampup(t - 1 if p.ramp_from_zero else t, p.consistency_rampup,
                                           p.epoch_iterations) for t in range(1, total + 1)]
    return {"method": method, "grads": grads, "scalars": scalars,
            "ramp": run_length(ramp) if fx.get("ramp_encoding") == "run length" else ramp,
            "student": {k: v.detach() for k, v in method.named_parameters() if k in grads},
            "schedules": {"learning rate": lr, "learning rate (value, run length)": run_length(lr)}}
