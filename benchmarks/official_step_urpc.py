"""One whole URPC update of SSL4MIS `train_uncertainty_rectified_pyramid_consistency_3D.py` against semiseg's.

    python benchmarks/official_equivalence.py --method urpc --step method --iteration 12001 \\
        --official /tmp/official/SSL4MIS --official-commit 06df6047a59aba9988ced8331998b5957ecb356b

The official side is the script's loop body (MIT code, rebuilt here statement by statement) with the official
`utils.losses.DiceLoss`, `CrossEntropyLoss`, `nn.KLDivLoss(reduction='none')`, `utils.ramps.sigmoid_rampup`, SGD
(momentum 0.9, weight decay 1e-4) and the script's poly rule (`lr_ = base_lr * (1 - iter_num / max_iterations)
** 0.9` computed *before* `iter_num` is incremented), at the script options that the `la-8` preset sets
(`--base_lr 0.01 --max_iterations 15000 --consistency_rampup 100`; the script's own defaults are 0.1 / 60,000 /
400, and it hard-codes 3 classes for its GTV data, 2 here for LA). Update K is the loop's `iter_num = K - 1`.

The network is not the official one: `unet_3D_dv_semi` is a 3D UNet (max-pooling encoder, `UnetUp3_CT`
decoder, `UnetDsv3` heads) with no semiseg counterpart, so no key mapping exists; semiseg puts the pyramid on
the legacy VNet (docs/methods/urpc.md). Both sides therefore run semiseg's `PyramidVNet` (one seeded draw, the
official side a deep copy that returns the four levels as the official `model(volume_batch)` does, finest first,
with the same keyed dropout masks): this compares everything of the update except the architecture.
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
    from golden_step_urpc import SCHEDULE_EVERY, build, semiseg_update

    root, k, seed = Path(args.official), args.iteration, args.seed
    fx = {"size": args.size, "n_filters": args.n_filters, "seed": seed, "iteration": k}
    _, fresh = build(fx)  # the same seeded network and dropout keys, before semiseg's step touches them
    model = _FourOutputs(copy.deepcopy(fresh.net))
    ours = semiseg_update(fx, every=1)
    losses, ramps = _official_module(root, "code/utils/losses.py"), _official_module(root, "code/utils/ramps.py")
    base_lr, max_iterations, consistency, consistency_rampup = 0.01, ours["iterations"], 0.1, 100.0
    labeled_bs, num_classes = 2, 2
    volume_batch, label_batch = ours["x"], ours["label"]

    def get_current_consistency_weight(epoch: int) -> float:
        return consistency * ramps.sigmoid_rampup(epoch, consistency_rampup)

    # --- the official loop body at iter_num = k - 1; the lr was set after update k - 1 from iter_num = k - 2
    iter_num = k - 1
    lr_ = base_lr if k == 1 else base_lr * (1.0 - (k - 2) / max_iterations) ** 0.9
    model.train()
    optimizer = torch.optim.SGD(model.parameters(), lr=lr_, momentum=0.9, weight_decay=0.0001)
    ce_loss = torch.nn.CrossEntropyLoss()
    dice_loss = losses.DiceLoss(num_classes)
    kl_distance = nn.KLDivLoss(reduction="none")
    outputs = model(volume_batch)
    soft = [torch.softmax(o, dim=1) for o in outputs]
    loss_ce = [ce_loss(o[:labeled_bs], label_batch[:labeled_bs]) for o in outputs]
    loss_dice = [dice_loss(s[:labeled_bs], label_batch[:labeled_bs].unsqueeze(1)) for s in soft]
    supervised_loss = (sum(loss_ce) + sum(loss_dice)) / 8
    preds = (soft[0] + soft[1] + soft[2] + soft[3]) / 4
    variance = [torch.sum(kl_distance(torch.log(s[labeled_bs:]), preds[labeled_bs:]), dim=1, keepdim=True)
                for s in soft]
    exp_variance = [torch.exp(-v) for v in variance]
    consistency_weight = get_current_consistency_weight(iter_num // 150)
    consistency_losses = []
    for s, v, e in zip(soft, variance, exp_variance):  # consistency_loss_aux1 ... aux4
        consistency_dist = (preds[labeled_bs:] - s[labeled_bs:]) ** 2
        consistency_losses.append(torch.mean(consistency_dist * e) / (torch.mean(e) + 1e-8) + torch.mean(v))
    consistency_loss = (consistency_losses[0] + consistency_losses[1] + consistency_losses[2]
                        + consistency_losses[3]) / 4
    loss = supervised_loss + consistency_weight * consistency_loss
    optimizer.zero_grad()
    loss.backward()
    grads = {n.removeprefix("net."): p.grad.detach().clone() for n, p in model.named_parameters()}
    optimizer.step()

    ramp = [get_current_consistency_weight((t - 1) // 150) for t in range(1, max_iterations + 1)]
    lrs = [base_lr] + [base_lr * (1.0 - n / max_iterations) ** 0.9 for n in range(max_iterations - 1)]
    scalars = {"supervised": supervised_loss.item(), "consistency": consistency_loss.item(),
               "mean_kl": (sum(torch.mean(v) for v in variance) / 4).item(), "weight": consistency_weight,
               "loss": loss.item(), "lr": lr_}
    mapping = {n: n for n in grads}
    states = {"student": {n.removeprefix("net."): p for n, p in model.named_parameters()}}
    rows, meta = _step_report(args, "HiLab-git/SSL4MIS", root, ours, mapping, scalars, TITLES, grads, states, ramp,
                              {"learning rate": lrs})
    meta["schedule_every"] = SCHEDULE_EVERY
    meta["network"] = "semiseg PyramidVNet on both sides (the official unet_3D_dv_semi has no semiseg counterpart)"
    meta["official"]["ramp"] = ramp[::SCHEDULE_EVERY]
    meta["official"]["schedules"] = {"learning rate": lrs[::SCHEDULE_EVERY]}
    return rows, meta
