"""One whole CPS update of SSL4MIS `train_cross_pseudo_supervision_3D.py` / `_2D.py` against semiseg's.

    python benchmarks/official_equivalence.py --method cps --step method --iteration 24001 \\
        --official /tmp/official/SSL4MIS --official-commit 06df6047a59aba9988ced8331998b5957ecb356b
    python benchmarks/official_equivalence.py --method cps --dims 2 --step method --iteration 24001 \\
        --official /tmp/official/SSL4MIS --official-commit 06df6047a59aba9988ced8331998b5957ecb356b

3D: the official script itself runs in place, unmodified (`ssl4mis_inplace.run`: `runpy` with its own options
`--model vnet --seed S --max_iterations 30000 --base_lr 0.01 --consistency 0.1 --consistency_rampup 200`, the
values the `la-8` preset sets; its network factory builds `networks.vnet.VNet` at `--n-filters`, which is what
`net_factory_3d('vnet')` builds at 16; one given batch; its two SGD optimisers start at the rate the loop sets
after update K - 1; its ramp is evaluated at the epoch of update K, `(K - 1) // 150`; the loop's locals are read
after `optimizer2.step()`). 2D: the loop body of `train_cross_pseudo_supervision_2D.py` (the same body as the 3D
script's) rebuilt statement by statement on `networks.unet.UNet`, the official `utils.losses.DiceLoss`,
`CrossEntropyLoss` and `utils.ramps.sigmoid_rampup` (MIT code; the 2D script's imports need cv2, matplotlib,
timm and the CTAugment pipeline, not installed here), with the `acdc-7` values (the same ones). The schedules
over the recipe are the scripts' lines (`lr_ = base_lr * (1 - iter_num / max_iterations) ** 0.9` after each
update, the ramp of `iter_num // 150`) evaluated at every update.

Aligned: the weights (semiseg's `seeded_weights`, seed for network 1 and seed + 1 for network 2, mapped with
`key_map`), the inputs (2 labelled + 2 unlabelled), the dropout masks (keyed by semiseg module name under
`net1.` / `net2.`). The initialisation itself is compared too: in 3D the script's own (`--seed S`, two nets built,
then its `kaiming_normal_init_weight(net1)` / `xavier_normal_init_weight(net2)`), in 2D `torch.manual_seed(S)` and
two default-initialised UNets (the 2D script never calls its initialisers), against semiseg's `CPS(...)` built
under `torch.manual_seed(S)` (global weight norms).
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


def _in_place_3d(root: Path, args: argparse.Namespace, ours: dict[str, Any], lr: float) -> dict[str, Any]:
    """`train_cross_pseudo_supervision_3D.py` itself, run in place (`ssl4mis_inplace`), `--model vnet`."""
    import importlib

    from ssl4mis_inplace import run

    from golden_step import seeded_weights
    from golden_step_cps import global_norm, prefix_dropout
    from semiseg.official import key_map

    seed, init = args.seed, {}

    def build() -> nn.Module:  # what net_factory_3d('vnet') builds, at --n-filters
        vnet = importlib.import_module("networks.vnet").VNet
        return vnet(n_channels=1, n_classes=2, n_filters=args.n_filters, normalization="batchnorm", has_dropout=True)

    def prepare(nets: list[nn.Module]) -> None:  # after the script's own initialisation, before its optimisers
        for i, (model, s) in enumerate(zip(nets, (seed, seed + 1)), start=1):
            init[f"init{i}"] = global_norm(model.parameters())
            part = key_map(list(model.state_dict()), "cps", 3)
            weights = seeded_weights(getattr(ours["method"], f"net{i}"), s)
            model.load_state_dict({o: weights[m].clone() for o, m in part.items()})
            _install_official_dropout(model, "cps", 3, seed)
            prefix_dropout(model, f"net{i}")

    argv = ["--model", "vnet", "--seed", str(seed), "--max_iterations", str(ours["iterations"]), "--base_lr", "0.01",
            "--batch_size", "4", "--labeled_bs", "2", "--consistency", "0.1", "--consistency_rampup", "200"]
    out = run(root / "code", "train_cross_pseudo_supervision_3D.py", argv, {"image": ours["x"], "label": ours["label"]},
              ("networks.net_factory_3d", "net_factory_3d"), build, prepare, lr, (args.iteration - 1) // 150, steps=2)
    return {**out, **init, "model1": out["nets"][0], "model2": out["nets"][1],
            "grads": {f"model{i}.{n}": g for i, grads in enumerate(out["grads"], start=1) for n, g in grads.items()}}


def _rebuilt_2d(root: Path, args: argparse.Namespace, ours: dict[str, Any], lr_: float) -> dict[str, Any]:
    """The loop body of `train_cross_pseudo_supervision_2D.py`, rebuilt statement by statement (the script
    imports dozens of 2D networks and the CTAugment pipeline, whose dependencies are not installed here)."""
    from golden_step import seeded_weights
    from golden_step_cps import global_norm, prefix_dropout
    from semiseg.official import key_map

    seed, classes, labeled_bs = args.seed, 4, 2
    cls = _official_class(root, "code/networks/unet.py:UNet")
    losses, ramps = _official_module(root, "code/utils/losses.py"), _official_module(root, "code/utils/ramps.py")
    torch.manual_seed(seed)  # the script's seeding, then create_model() twice (no initialiser is called in 2D)
    model1, model2 = cls(in_chns=1, class_num=classes), cls(in_chns=1, class_num=classes)
    init = {"init1": global_norm(model1.parameters()), "init2": global_norm(model2.parameters())}
    for i, (model, s) in enumerate(((model1, seed), (model2, seed + 1)), start=1):
        part = key_map(list(model.state_dict()), "cps", 2)
        weights = seeded_weights(getattr(ours["method"], f"net{i}"), s)
        model.load_state_dict({o: weights[m].clone() for o, m in part.items()})
        _install_official_dropout(model, "cps", 2, seed)
        prefix_dropout(model, f"net{i}")
    volume_batch, label_batch = ours["x"], ours["label"]
    iter_num = args.iteration - 1

    # --- the official loop body at iter_num = k - 1, lr as set after update k - 1
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
    return {"loss1": loss1, "loss2": loss2, "pseudo_supervision1": pseudo_supervision1,
            "pseudo_supervision2": pseudo_supervision2, "consistency_weight": consistency_weight, "loss": loss,
            "pseudo_outputs1": pseudo_outputs1, "pseudo_outputs2": pseudo_outputs2, "model1": model1,
            "model2": model2, "grads": grads, **init}


def compare(args: argparse.Namespace) -> tuple[list[dict[str, Any]], dict[str, Any]]:
    from golden_step_cps import SCHEDULE_EVERY, classes_of, semiseg_update
    from semiseg.official import key_map

    root, k, seed, dims = Path(args.official), args.iteration, args.seed, args.dims
    fx = {"dims": dims, "size": args.size, "n_filters": args.n_filters, "seed": seed, "iteration": k}
    ours = semiseg_update(fx, every=1)
    max_iterations, base_lr = ours["iterations"], 0.01
    lr_ = base_lr * (1.0 - (k - 1) / max_iterations) ** 0.9  # set by the loop after update k - 1
    o = (_in_place_3d if dims == 3 else _rebuilt_2d)(root, args, ours, lr_)
    mapping = {}
    for i in (1, 2):
        part = key_map(list(o[f"model{i}"].state_dict()), "cps", dims)
        mapping.update({f"model{i}.{a}": f"net{i}.{b}" for a, b in part.items()})
    ramps = _official_module(root, "code/utils/ramps.py")
    # The schedules over the recipe: the weight of update t (iter_num = t - 1) and the script's lr line, which
    # sets the rate of update t + 1 after update t.
    ramp = [0.1 * ramps.sigmoid_rampup((t - 1) // 150, 200.0) for t in range(1, max_iterations + 1)]
    lrs = [base_lr] + [base_lr * (1.0 - n / max_iterations) ** 0.9 for n in range(1, max_iterations)]
    p1, p2 = o["pseudo_outputs1"], o["pseudo_outputs2"]
    scalars = {"supervised1": o["loss1"].item(), "supervised2": o["loss2"].item(),
               "cps1": o["pseudo_supervision1"].item(), "cps2": o["pseudo_supervision2"].item(),
               "weight": float(o["consistency_weight"]), "loss": o["loss"].item(), "lr": lr_,
               "pseudo1_foreground": float((p1 > 0).sum()), "pseudo2_foreground": float((p2 > 0).sum()),
               "pseudo_agree": float((p1 == p2).sum()), "init1": o["init1"], "init2": o["init2"]}
    states = {f"net{i}": {f"model{i}.{n}": p for n, p in o[f"model{i}"].named_parameters()} for i in (1, 2)}
    rows, meta = _step_report(args, "HiLab-git/SSL4MIS", root, ours, mapping, scalars, TITLES, o["grads"], states,
                              ramp, {"learning rate": lrs})
    meta["classes"], meta["schedule_every"] = classes_of(dims), SCHEDULE_EVERY
    meta["official_run"] = "script run in place (benchmarks/ssl4mis_inplace.py)" if dims == 3 else \
        "loop body rebuilt from the 2D script"
    meta["official"]["ramp"] = ramp[::SCHEDULE_EVERY]
    meta["official"]["schedules"] = {"learning rate": lrs[::SCHEDULE_EVERY]}
    return rows, meta
