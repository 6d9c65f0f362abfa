"""One whole URPC update of SSL4MIS `train_uncertainty_rectified_pyramid_consistency_3D.py` against semiseg's.

    python benchmarks/official_equivalence.py --method urpc --step method --iteration 12001 \\
        --official /tmp/official/SSL4MIS --official-commit 06df6047a59aba9988ced8331998b5957ecb356b

The official script itself runs in place, unmodified (`ssl4mis_inplace.run`: `runpy` with its own options
`--base_lr 0.01 --max_iterations 15000 --consistency_rampup 100 --seed S`, the values the `la-8` preset sets; its
own defaults are 0.1 / 60,000 / 400), on one given batch with 3 classes (the script hard-codes `num_classes = 3`
for its GTV data); its SGD starts at the rate the loop set after update K - 1 (from `iter_num = K - 2`); its ramp is
evaluated at the epoch of update K, `(K - 1) // 150`; the loop's locals are read after `optimizer.step()`. The
schedules over the recipe are the script's lines (the ramp of `iter_num // 150`, `lr_ = base_lr * (1 - iter_num /
max_iterations) ** 0.9` computed before `iter_num` is incremented) evaluated at every update.

The network is not the official one: `unet_3D_dv_semi` is a 3D UNet (max-pooling encoder, `UnetUp3_CT`
decoder, `UnetDsv3` heads) with no semiseg counterpart, so no key mapping exists; semiseg puts the pyramid on
the legacy VNet (docs/methods/urpc.md). The script's `unet_3D_dv_semi(...)` therefore builds a deep copy of
semiseg's seeded `PyramidVNet` (the same keyed dropout masks) that returns the four levels as a tuple, finest
first, as the official `model(volume_batch)` does: this compares everything of the update except the architecture.
"""

from __future__ import annotations

import argparse
import copy
from pathlib import Path
from typing import Any

import torch
from official_equivalence import _official_module, _step_report
from torch import nn

TITLES = {"supervised": "supervised (4 CE + 4 Dice) / 8", "consistency": "rectified pyramid consistency",
          "mean_kl": "mean KL of the levels from their mean (uncertainty)", "weight": "consistency weight",
          "loss": "total loss", "lr": "learning rate of the update"}


class _FourOutputs(nn.Module):
    """`model(volume_batch)` of the script: the four levels (dsv1 finest ... dsv4 coarsest) as a tuple."""

    def __init__(self, net: nn.Module) -> None:
        super().__init__()
        self.net = net

    def forward(self, x: torch.Tensor) -> tuple[torch.Tensor, ...]:
        return tuple(self.net.forward_pyramid(x))


def compare(args: argparse.Namespace) -> tuple[list[dict[str, Any]], dict[str, Any]]:
    from ssl4mis_inplace import run

    from golden_step_urpc import SCHEDULE_EVERY, build, semiseg_update

    root, k, seed = Path(args.official), args.iteration, args.seed
    fx = {"size": args.size, "n_filters": args.n_filters, "seed": seed, "iteration": k}
    _, fresh = build(fx)  # the same seeded network and dropout keys, before semiseg's step touches them
    model = _FourOutputs(copy.deepcopy(fresh.net))
    ours = semiseg_update(fx, every=1)
    ramps = _official_module(root, "code/utils/ramps.py")
    base_lr, max_iterations, consistency, consistency_rampup = 0.01, ours["iterations"], 0.1, 100.0
    lr_ = base_lr if k == 1 else base_lr * (1.0 - (k - 2) / max_iterations) ** 0.9
    argv = ["--base_lr", str(base_lr), "--max_iterations", str(max_iterations), "--consistency", str(consistency),
            "--consistency_rampup", str(consistency_rampup), "--seed", str(seed), "--batch_size", "4",
            "--labeled_bs", "2"]
    o = run(root / "code", "train_uncertainty_rectified_pyramid_consistency_3D.py", argv,
            {"image": ours["x"], "label": ours["label"]}, ("networks.unet_3D_dv_semi", "unet_3D_dv_semi"),
            lambda: model, lambda nets: None, lr_, (k - 1) // 150, steps=1)
    grads = {n.removeprefix("net."): g for n, g in o["grads"][0].items()}

    def get_current_consistency_weight(epoch: int) -> float:  # the script's, with the options above
        return consistency * ramps.sigmoid_rampup(epoch, consistency_rampup)

    ramp = [get_current_consistency_weight((t - 1) // 150) for t in range(1, max_iterations + 1)]
    lrs = [base_lr] + [base_lr * (1.0 - n / max_iterations) ** 0.9 for n in range(max_iterations - 1)]
    variances = [o[f"variance_aux{i}"] for i in range(1, 5)]
    scalars = {"supervised": o["supervised_loss"].item(), "consistency": o["consistency_loss"].item(),
               "mean_kl": (sum(torch.mean(v) for v in variances) / 4).item(),
               "weight": float(o["consistency_weight"]), "loss": o["loss"].item(), "lr": lr_}
    mapping = {n: n for n in grads}
    states = {"student": {n.removeprefix("net."): p for n, p in model.named_parameters()}}
    rows, meta = _step_report(args, "HiLab-git/SSL4MIS", root, ours, mapping, scalars, TITLES, grads, states, ramp,
                              {"learning rate": lrs})
    meta["schedule_every"], meta["classes"] = SCHEDULE_EVERY, 3
    meta["official_run"] = "script run in place (benchmarks/ssl4mis_inplace.py)"
    meta["network"] = "semiseg PyramidVNet on both sides (the official unet_3D_dv_semi has no semiseg counterpart)"
    meta["official"]["ramp"] = ramp[::SCHEDULE_EVERY]
    meta["official"]["schedules"] = {"learning rate": lrs[::SCHEDULE_EVERY]}
    return rows, meta
