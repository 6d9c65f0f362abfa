"""semiseg's side of the whole MLRPL update that `benchmarks/official_step_mlrpl.py` runs in the official script.

The recipe is the `la-8` preset (λ 0.5, β_max 1, 40-epoch ramp of 150 updates, SGD 0.01 / 0.9 / 1e-4, constant
LR, 15,000 updates) at `n_filters` base filters; weights, inputs and dropout masks come from the seed
(`golden_step`). `train_step` runs as the trainer runs it; its helpers `directional_loss`, `class_prototypes` and
`prototype_similarity` are wrapped for the duration of the step only to record what they return (the entropy
masks, prototypes, similarity maps and reliability weights of both directions), so nothing is recomputed outside
the method.
"""

from __future__ import annotations

from collections.abc import Callable, Iterator
from contextlib import contextmanager
from typing import Any

import torch

from golden_step import inputs, install_dropout, seeded_weights

DIRECTIONS = ("12", "21")  # student decoder 1 <- teacher 2, then 2 <- 1: the order of both codes' loops


@contextmanager
def _recording(module: Any, names: tuple[str, ...]) -> Iterator[dict[str, list[Any]]]:
    """Wrap `module.NAME` for each name so that every call's result is appended to `calls[NAME]`."""
    calls: dict[str, list[Any]] = {name: [] for name in names}
    originals = {name: getattr(module, name) for name in names}

    def wrap(name: str, fn: Callable[..., Any]) -> Callable[..., Any]:
        def recorded(*args: Any, **kwargs: Any) -> Any:
            out = fn(*args, **kwargs)
            calls[name].append(out)
            return out
        return recorded

    for name, fn in originals.items():
        setattr(module, name, wrap(name, fn))
    try:
        yield calls
    finally:
        for name, fn in originals.items():
            setattr(module, name, fn)


def summaries(tensors: dict[str, torch.Tensor]) -> dict[str, float]:
    """The scalars a fixture stores for each direction's mask, prototypes, similarity map and weight (both codes
    are summarised by this one function)."""
    out = {}
    for d in DIRECTIONS:
        out[f"mask_{d}"] = float(tensors[f"mask_{d}"].sum())
        out[f"prototypes_{d}"] = float(tensors[f"prototypes_{d}"].double().abs().sum())
        out[f"similarity_{d}"] = float(tensors[f"similarity_{d}"].double().sum())
        out[f"reliability_{d}"] = float(tensors[f"reliability_{d}"].double().sum())
    return out


def semiseg_run(n_filters: int, size: int, seed: int, iteration: int,
                pseudo_ce_input: str = "logits") -> dict[str, Any]:
    """One `train_step` + SGD step of the la-8 recipe at update `iteration`; scalars, tensors, schedules."""
    from semiseg.config import build_config
    from semiseg.data.loader import Batch
    from semiseg.engine.trainer import build_optimizer, learning_rate
    from semiseg.methods import get_method
    from semiseg.methods import mlrpl as module
    from semiseg.methods.base import NetSpec, StepContext

    cfg = build_config("mlrpl", None, {"n_filters": n_filters, "pseudo_ce_input": pseudo_ce_input}, "la-8")
    method = get_method("mlrpl")(cfg.method_params(), NetSpec(1, 2, 3, cfg.n_filters, cfg.norm, cfg.dropout))
    method.net.load_state_dict(seeded_weights(method.net, seed))
    install_dropout(method.net, seed)
    batch = cfg.batch_labeled + cfg.batch_unlabeled
    x, label = inputs(3, size, batch, 2, seed)
    n = cfg.batch_labeled
    method.train()
    ctx = StepContext(iteration, cfg.iterations)
    optimizer = build_optimizer(cfg, method)
    for group in optimizer.param_groups:
        group["lr"] = learning_rate(cfg, iteration)
    with _recording(module, ("directional_loss", "class_prototypes", "prototype_similarity")) as calls:
        out = method.train_step(Batch(x[:n], label[:n], x[n:], torch.arange(n)), ctx)
    optimizer.zero_grad()
    out.loss.backward()
    grads = {k: p.grad.detach().clone() for k, p in method.net.named_parameters()}
    optimizer.step()
    method.after_step(ctx)
    assert [len(v) for v in calls.values()] == [2, 2, 2], "one call per direction expected"
    tensors: dict[str, torch.Tensor] = {}
    scalars = {"supervised": float(out.logs["loss/supervised"]), "pseudo": float(out.logs["loss/pseudo"]),
               "weight": float(out.logs["consistency_weight"]), "loss": float(out.loss.detach())}
    for k, d in enumerate(DIRECTIONS):
        loss_d, mask, weight = calls["directional_loss"][k]
        tensors.update({f"mask_{d}": mask, f"prototypes_{d}": calls["class_prototypes"][k],
                        f"similarity_{d}": calls["prototype_similarity"][k], f"reliability_{d}": weight})
        scalars[f"pseudo_{d}"] = float(loss_d.detach())
    scalars.update(summaries(tensors))
    return {"method": method, "x": x, "label": label[:n], "batch": batch, "grads": grads, "scalars": scalars,
            "tensors": tensors, "student": {k: p.detach() for k, p in method.net.named_parameters()},
            "ramp": [method.consistency_weight(StepContext(t, cfg.iterations)) for t in range(1, cfg.iterations + 1)],
            "schedules": {"learning rate": [learning_rate(cfg, t) for t in range(1, cfg.iterations + 1)]}}


def semiseg_update(fx: dict[str, Any]) -> dict[str, Any]:
    """What `tests/test_golden.py::test_whole_update_matches_official` compares with `tests/golden/steps/mlrpl.json`
    (the official HEAD, so `pseudo_ce_input` as the fixture records it: logits)."""
    return semiseg_run(fx["n_filters"], fx["size"], fx["seed"], fx["iteration"], fx.get("pseudo_ce_input", "logits"))
