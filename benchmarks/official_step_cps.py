"""One whole CPS update of SSL4MIS `train_cross_pseudo_supervision_3D.py` / `_2D.py` against semiseg's.

    python benchmarks/official_equivalence.py --method cps --step method --iteration 24001 \\
        --official /tmp/official/SSL4MIS --official-commit 06df6047a59aba9988ced8331998b5957ecb356b
    python benchmarks/official_equivalence.py --method cps --dims 2 --step method --iteration 24001 \\
        --official /tmp/official/SSL4MIS --official-commit 06df6047a59aba9988ced8331998b5957ecb356b

The official side is the scripts' loop body (MIT code, rebuilt here statement by statement; both scripts have the
same body) on the official networks (`networks.vnet.VNet` with `has_dropout=True`, what `net_factory_3d('vnet')`
builds, at `--n-filters`; `networks.unet.UNet` in 2D), the official `utils.losses.DiceLoss`, `CrossEntropyLoss`
and `utils.ramps.sigmoid_rampup`, two SGD optimisers (lr, momentum 0.9, weight decay 1e-4) and the scripts' poly
rule (`lr_ = base_lr * (1 - iter_num / max_iterations) ** 0.9` after each update), at the script options that
the semiseg preset sets (`la-8` / `acdc-7`: consistency 0.1, ramp-up 200, 30,000 iterations, base lr 0.01).
Update K is the loop's `iter_num = K - 1`; its learning rate is the one the loop set after update K - 1.

Aligned: the weights (semiseg's `seeded_weights`, seed for network 1 and seed + 1 for network 2, mapped with
`key_map`), the inputs (2 labelled + 2 unlabelled), the dropout masks (keyed by semiseg module name under
`net1.` / `net2.`). The initialisation itself is compared too: `torch.manual_seed(seed)`, then the official
order (net1, net2 built, then `kaiming_normal_init_weight(net1)`, `xavier_normal_init_weight(net2)` in 3D; the 2D
script never calls them) against semiseg's `CPS(...)` construction under the same seed (global weight norms).
The fixture keeps the ramp and learning rate at every 10th update; the table compares all of them.
"""

from __future__ import annotations

import argparse
from pathlib import Path
from typing import Any

import torch
from official_equivalence import _install_official_dropout, _official_class, _official_module, _step_report
from torch import nn

TITLES = {"supervised1": "supervised 0.5 (CE + Dice), network 1",
          "supervised2": "supervised 0.5 (CE + Dice), network 2",
          "cps1": "CE(net 1, argmax net 2), unlabelled", "cps2": "CE(net 2, argmax net 1), unlabelled",
          "weight": "consistency weight", "loss": "total loss (model1_loss + model2_loss)",
          "lr": "learning rate of the update",
          "pseudo1_foreground": "pseudo-label 1 foreground voxels",
          "pseudo2_foreground": "pseudo-label 2 foreground voxels",
          "pseudo_agree": "voxels where the pseudo-labels agree",
          "init1": "initial weights net 1 (global norm)", "init2": "initial weights net 2 (global norm)"}


def _init(model: nn.Module, kind: str) -> None:
    """The 3D script's `kaiming_normal_init_weight` / `xavier_normal_init_weight`."""
    for m in model.modules():
        if isinstance(m, nn.Conv3d):
            (torch.nn.init.kaiming_normal_ if kind == "kaiming" else torch.nn.init.xavier_normal_)(m.weight)
        elif isinstance(m, nn.BatchNorm3d):
            m.weight.data.fill_(1)
            m.bias.data.zero_()


def compare(args: argparse.Namespace) -> tuple[list[dict[str, Any]], dict[str, Any]]:
    from golden_step import seeded_weights
    from golden_step_cps import SCHEDULE_EVERY, classes_of, global_norm, prefix_dropout, semiseg_update
    from semiseg.official import key_map

    root, k, seed, dims = Path(args.official), args.iteration, args.seed, args.dims
    fx = {"dims": dims, "size": args.size, "n_filters": args.n_filters, "seed": seed, "iteration": k}
    ours = semiseg_update(fx, every=1)
    classes, max_iterations, base_lr, labeled_bs = classes_of(dims), ours["iterations"], 0.01, 2
    if dims == 3:
        cls = _official_class(root, "code/networks/vnet.py:VNet")

        def build() -> nn.Module:
            return cls(n_channels=1, n_classes=classes, n_filters=args.n_filters, normalization="batchnorm",
                       has_dropout=True)
    else:
        cls = _official_class(root, "code/networks/unet.py:UNet")

        def build() -> nn.Module:
            return cls(in_chns=1, class_num=classes)
    losses, ramps = _official_module(root, "code/utils/losses.py"), _official_module(root, "code/utils/ramps.py")

    torch.manual_seed(seed)  # the initialisation, in the script's order
    net1, net2 = build(), build()
    if dims == 3:
        _init(net1, "kaiming")
        _init(net2, "xavier")
    init = {"init1": global_norm(net1.parameters()), "init2": global_norm(net2.parameters())}

    model1, model2 = net1, net2
    mapping = {}
    for i, (model, s) in enumerate(((model1, seed), (model2, seed + 1)), start=1):
        net = getattr(ours["method"], f"net{i}")
        part = key_map(list(model.state_dict()), "cps", dims)
        weights = seeded_weights(net, s)
        model.load_state_dict({o: weights[m].clone() for o, m in part.items()})
        _install_official_dropout(model, "cps", dims, seed)
        prefix_dropout(model, f"net{i}")
        mapping.update({f"model{i}.{o}": f"net{i}.{m}" for o, m in part.items()})
    volume_batch, label_batch = ours["x"], ours["label"]

    # --- the official loop body at iter_num = k - 1, lr as set after update k - 1
    iter_num = k - 1
    lr_ = base_lr * (1.0 - iter_num / max_iterations) ** 0.9
    model1.train()
    model2.train()
    optimizer1 = torch.optim.SGD(model1.parameters(), lr=lr_, momentum=0.9, weight_decay=0.0001)
    optimizer2 = torch.optim.SGD(model2.parameters(), lr=lr_, momentum=0.9, weight_decay=0.0001)
    ce_loss = torch.nn.CrossEntropyLoss()
    dice_loss = losses.DiceLoss(classes)
    outputs1 = model1(volume_batch)
    outputs_soft1 = torch.softmax(outputs1, dim=1)
    outputs2 = model2(volume_batch)
    outputs_soft2 = torch.softmax(outputs2, dim=1)
    consistency_weight = 0.1 * ramps.sigmoid_rampup(iter_num // 150, 200.0)
    loss1 = 0.5 * (ce_loss(outputs1[:labeled_bs], label_batch[:][:labeled_bs].long()) + dice_loss(
        outputs_soft1[:labeled_bs], label_batch[:labeled_bs].unsqueeze(1)))
    loss2 = 0.5 * (ce_loss(outputs2[:labeled_bs], label_batch[:][:labeled_bs].long()) + dice_loss(
        outputs_soft2[:labeled_bs], label_batch[:labeled_bs].unsqueeze(1)))
    pseudo_outputs1 = torch.argmax(outputs_soft1[labeled_bs:].detach(), dim=1, keepdim=False)
    pseudo_outputs2 = torch.argmax(outputs_soft2[labeled_bs:].detach(), dim=1, keepdim=False)
    pseudo_supervision1 = ce_loss(outputs1[labeled_bs:], pseudo_outputs2)
    pseudo_supervision2 = ce_loss(outputs2[labeled_bs:], pseudo_outputs1)
    model1_loss = loss1 + consistency_weight * pseudo_supervision1
    model2_loss = loss2 + consistency_weight * pseudo_supervision2
    loss = model1_loss + model2_loss
    optimizer1.zero_grad()
    optimizer2.zero_grad()
    loss.backward()
    grads = {f"model{i}.{n}": p.grad.detach().clone()
             for i, model in ((1, model1), (2, model2)) for n, p in model.named_parameters()}
    optimizer1.step()
    optimizer2.step()

    # The schedules over the recipe: the weight of update t (iter_num = t - 1), the lr the loop set before it.
    ramp = [0.1 * ramps.sigmoid_rampup((t - 1) // 150, 200.0) for t in range(1, max_iterations + 1)]
    lrs = [base_lr] + [base_lr * (1.0 - n / max_iterations) ** 0.9 for n in range(1, max_iterations)]
    scalars = {"supervised1": loss1.item(), "supervised2": loss2.item(), "cps1": pseudo_supervision1.item(),
               "cps2": pseudo_supervision2.item(), "weight": consistency_weight, "loss": loss.item(), "lr": lr_,
               "pseudo1_foreground": float((pseudo_outputs1 > 0).sum()),
               "pseudo2_foreground": float((pseudo_outputs2 > 0).sum()),
               "pseudo_agree": float((pseudo_outputs1 == pseudo_outputs2).sum()), **init}
    states = {"net1": {f"model1.{n}": p for n, p in model1.named_parameters()},
              "net2": {f"model2.{n}": p for n, p in model2.named_parameters()}}
    rows, meta = _step_report(args, "HiLab-git/SSL4MIS", root, ours, mapping, scalars, TITLES, grads, states, ramp,
                              {"learning rate": lrs})
    meta["classes"], meta["schedule_every"] = classes, SCHEDULE_EVERY
    meta["official"]["ramp"] = ramp[::SCHEDULE_EVERY]
    meta["official"]["schedules"] = {"learning rate": lrs[::SCHEDULE_EVERY]}
    return rows, meta
