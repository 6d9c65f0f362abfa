"""semiseg's side of CAML's whole-update comparison (`benchmarks/official_step_caml.py` runs the official script).

The case: the `la-8` recipe (8 labelled cases, so 8 memory slots; ramp 20 epochs; SGD 0.01 constant, momentum
0.9, weight decay 1e-4; 15,000 updates), seeded weights, keyed dropout, and `UPDATES` consecutive updates ending at
update `iteration`, each on its own seeded batch of 2 labelled + 2 unlabelled volumes whose labelled cases are
`LABELED_SLOTS[j]`. The first update writes slots 0 and 1 into an empty bank, the second slots 2 and 3, the
third overwrites slot 1 and writes slot 4, then samples a bank holding five slots written by three different
weight states: the comparison is made on a populated bank, not only on the first, special update. Before each
update torch's global RNG is seeded with `sample_seed(seed, j)`; the memory sampling is the only draw of the
update from it (dropout masks are keyed), and the official side draws its 256 entries per class from the same
keys (see the benchmark).
"""

from __future__ import annotations

import functools
import zlib
from typing import Any

import torch

from golden_step import _generator, default_dtype, install_dropout, seeded_weights

UPDATES = 3
LABELED_SLOTS = ((0, 1), (2, 3), (1, 4))
PRESET = "la-8"
RECIPE_ITERATIONS = 15000


def sample_seed(seed: int, update: int) -> int:
    """Seed of torch's global RNG before update `update` (0-based): it drives the memory-bank sampling."""
    return zlib.crc32(f"{seed}:memory:{update}".encode())


def case_batches(size: int, seed: int) -> list[tuple[torch.Tensor, torch.Tensor, torch.Tensor]]:
    """(images [4, 1, S, S, S], labels [4, S, S, S], dataset indices [4]) of each update; labelled first."""
    batches = []
    for j, slots in enumerate(LABELED_SLOTS):
        g = _generator(seed, "caml-batch", j)
        x = torch.randn(4, 1, size, size, size, generator=g, dtype=torch.float64).to(torch.get_default_dtype())
        label = torch.randint(0, 2, (4, size, size, size), generator=g)
        batches.append((x, label, torch.tensor([*slots, 8 + 2 * j, 9 + 2 * j])))
    return batches


def caml_updates(n_filters: int, size: int, seed: int, iteration: int, num_filtered: int) -> dict[str, Any]:
    """Run the updates with semiseg's trainer pieces (config of the preset, `build_method`, `build_optimizer`,
    `learning_rate`, `train_step`, backward, step, `after_step`) and return what the comparison needs."""
    from semiseg.config import build_config
    from semiseg.data.loader import Batch
    from semiseg.engine.schedules import sigmoid_rampup
    from semiseg.engine.trainer import build_method, build_optimizer, learning_rate
    from semiseg.methods.base import NetSpec, StepContext

    cfg = build_config("caml", None, {"n_filters": n_filters, "num_filtered": num_filtered}, preset=PRESET)
    method = build_method(cfg, NetSpec(1, 2, 3, n_filters), torch.device("cpu"))
    method.net.load_state_dict(seeded_weights(method.net, seed))
    install_dropout(method.net, seed)
    optimizer = build_optimizer(cfg, method)
    agreed: list[int] = []
    embed_v = method.net.embed_v

    def spy(rows: torch.Tensor, row_mask: torch.Tensor | None = None, keep: torch.Tensor | None = None) -> Any:
        agreed.append(int(row_mask.sum()))  # the agreed-voxel mask OCC's rows and head statistics come from
        return embed_v(rows, row_mask, keep)

    method.net.embed_v = spy
    method.train()
    scalars: dict[str, float] = {}
    first = iteration - UPDATES + 1
    for j, (x, label, idx) in enumerate(case_batches(size, seed)):
        ctx = StepContext(first + j, cfg.iterations, cfg.labeled)
        for group in optimizer.param_groups:
            group["lr"] = learning_rate(cfg, ctx.iteration)
        torch.manual_seed(sample_seed(seed, j))
        out = method(Batch(x[:2], label[:2], x[2:], idx[:2]), ctx)
        optimizer.zero_grad(set_to_none=True)
        out.loss.backward()
        grads = {k: p.grad.detach().clone() for k, p in method.net.named_parameters() if p.grad is not None}
        optimizer.step()
        method.after_step(ctx)
        logs, tag = out.logs, f"_{j + 1}"
        scalars.update({f"loss{tag}": float(out.loss.detach()), f"loss_o{tag}": float(logs["loss/occ"]),
                        f"occ_rows{tag}": float(logs["occ/rows"]), f"agreed_voxels{tag}": float(agreed[-1])})
    p = method.params
    labels = method.memory_labels
    stored = (labels[list(LABELED_SLOTS[-1])] >= 0).sum()
    scalars.update({"loss_s": float(logs["loss/supervised"]), "loss_c": float(logs["loss/mutual"]),
                    "loss_o": float(logs["loss/occ"]), "lambda_c": p.consistency * float(logs["weight/ramp"]),
                    "lambda_o": p.consistency_o * float(logs["weight/ramp"]), "loss": float(out.loss.detach()),
                    "stored_voxels": float(stored), "agreed_voxels": float(agreed[-1]),
                    "occ_rows": float(logs["occ/rows"])})
    ramp = [sigmoid_rampup(t, p.consistency_rampup, p.epoch_iterations) for t in range(1, cfg.iterations + 1)]
    bank = {}
    for slot in range(labels.shape[0]):
        keep = labels[slot] >= 0
        bank[slot] = {"labels": labels[slot][keep].long(), "features": method.memory_features[slot][keep]}
    return {"method": method, "cfg": cfg, "grads": grads, "scalars": scalars,
            "student": {k: v.detach() for k, v in method.net.named_parameters()},
            "buffers": {k: v.detach() for k, v in method.net.named_buffers() if "running" in k},
            "bank": bank, "ramp": [p.consistency * r for r in ramp], "lambda_o": [p.consistency_o * r for r in ramp],
            "schedules": {"learning rate": [learning_rate(cfg, t) for t in range(1, cfg.iterations + 1)]}}


@functools.lru_cache(maxsize=1)
def _cached_updates(n_filters: int, size: int, seed: int, iteration: int, num_filtered: int,
                    dtype: torch.dtype) -> dict[str, Any]:
    with default_dtype(str(dtype).removeprefix("torch.")):
        result = caml_updates(n_filters, size, seed, iteration, num_filtered)
    return {k: v for k, v in result.items() if k not in ("method", "cfg")}


def semiseg_update(fx: dict[str, Any]) -> dict[str, Any]:
    """`tests/test_golden.py`'s entry point: the case of fixture `fx` (computed once per session and dtype:
    `tests/test_golden_caml.py` checks the bank and the counts of the same run)."""
    return _cached_updates(fx["n_filters"], fx["size"], fx["seed"], fx["iteration"], fx["num_filtered"],
                           torch.get_default_dtype())
