"""One whole 2D UniMatch update of `more-scenarios/medical/unimatch.py` (LiheYoung/UniMatch) against semiseg's.

    python benchmarks/official_equivalence.py --method unimatch --dims 2 --step method --iteration 15001 \\
        --official /tmp/official/unimatch --official-commit 0324f3dd4a22128105a5eb135d2586c0bb3cc647

The official side is the script's loop body (MIT code, rebuilt here statement by statement, one process: its
`SyncBatchNorm` / DDP on one GPU is plain BatchNorm) on the official `model.unet.UNet` with
`forward(x, need_fp=True)`, the official `util.utils.DiceLoss` (with its `ignore` mask), `CrossEntropyLoss`, SGD
(lr, momentum 0.9, weight decay 1e-4) and the script's poly rule (`lr = cfg['lr'] * (1 - iters / total_iters) **
0.9` set after update `iters + 1`), with `configs/acdc.yaml` (lr 0.01, conf_thresh 0.95, nclass 4) and the
`acdc-3` total of 30,900 updates (300 epochs of 103). Update K is `iters = K - 1`; its rate is the one set after
update K - 1.

Aligned (tests/golden_step_unimatch.py): weights mapped with `key_map` (output convolution x 10 so that the
confidence masks are about half full), inputs, the strong views and CutMix boxes (drawn once by semiseg and handed
to both sides, as the official loader hands them to its loop: the strong-view pipelines themselves, PIL there and
torch here, are not compared), the encoder dropout masks (keyed by semiseg module name) and the feature
perturbation's masks (the official `nn.Dropout2d(0.5)` created inside `forward` is replaced, for that call only,
by the keyed dropout semiseg's `perturb_features` also gets). UniMatch has no ramp: the ramp row is absent.

3D: there is no official 3D UniMatch (UniMatch's medical code is ACDC only; CrossMatch's LA folder has only
`train_cross_match.py`), so semiseg's 3D unimatch has nothing to be compared with (docs/methods/unimatch.md).
"""

from __future__ import annotations

import argparse
from pathlib import Path
from typing import Any

import torch
from official_equivalence import _install_official_dropout, _official_class, _official_module, _step_report
from torch import nn

TITLES = {"loss_x": "supervised (CE + Dice) / 2", "loss_s1": "masked Dice, strong view 1 (CutMix box 1)",
          "loss_s2": "masked Dice, strong view 2 (CutMix box 2)", "loss_fp": "masked Dice, feature perturbation",
          "loss": "total (L_x + .25 L_s1 + .25 L_s2 + .5 L_fp) / 2", "lr": "learning rate of the update",
          "mask_ratio": "mask ratio (conf_u_w >= 0.95)", "valid_s1": "valid pixels, strong view 1",
          "valid_s2": "valid pixels, strong view 2", "valid_fp": "valid pixels, feature perturbation",
          "box1": "CutMix box 1 pixels", "box2": "CutMix box 2 pixels"}


def compare(args: argparse.Namespace) -> tuple[list[dict[str, Any]], dict[str, Any]]:
    from golden_step_unimatch import CLASSES, SCHEDULE_EVERY, SHARPEN, fp_dropout, semiseg_update
    from semiseg.official import key_map

    if args.dims != 2:
        raise SystemExit("unimatch: the official medical code is 2D (ACDC) only; pass --dims 2")
    root, k, seed = Path(args.official), args.iteration, args.seed
    fx = {"size": args.size, "seed": seed, "iteration": k}
    ours = semiseg_update(fx, every=1)
    t = ours["tensors"]
    model = _official_class(root, "more-scenarios/medical/model/unet.py:UNet")(in_chns=1, class_num=CLASSES)
    losses = _official_module(root, "more-scenarios/medical/util/utils.py")
    mapping = key_map(list(model.state_dict()), "unimatch", 2)
    from golden_step import seeded_weights

    weights = seeded_weights(ours["method"].net.net, seed)
    weights["decoder.out_conv.weight"] = weights["decoder.out_conv.weight"] * SHARPEN
    model.load_state_dict({o: weights[m].clone() for o, m in mapping.items()})
    _install_official_dropout(model, "unimatch", 2, seed)
    cfg = {"lr": 0.01, "conf_thresh": 0.95, "nclass": CLASSES}
    total_iters = ours["iterations"]

    img_x, mask_x = t["x"], t["y"]
    img_u_w, img_u_w_mix = t["u"][:2], t["u"][2:]
    img_u_s1, img_u_s2 = t["s1"].clone(), t["s2"].clone()
    img_u_s1_mix, img_u_s2_mix = t["s1_mix"], t["s2_mix"]
    cutmix_box1, cutmix_box2 = t["box1"], t["box2"]
    iters = k - 1
    lr = cfg["lr"] if k == 1 else cfg["lr"] * (1 - (iters - 1) / total_iters) ** 0.9
    optimizer = torch.optim.SGD(model.parameters(), lr, momentum=0.9, weight_decay=0.0001)
    criterion_ce = nn.CrossEntropyLoss()
    criterion_dice = losses.DiceLoss(n_classes=cfg["nclass"])

    # --- the official loop body
    with torch.no_grad():
        model.eval()
        pred_u_w_mix = model(img_u_w_mix).detach()
        conf_u_w_mix = pred_u_w_mix.softmax(dim=1).max(dim=1)[0]
        mask_u_w_mix = pred_u_w_mix.argmax(dim=1)
    img_u_s1[cutmix_box1.unsqueeze(1).expand(img_u_s1.shape) == 1] = \
        img_u_s1_mix[cutmix_box1.unsqueeze(1).expand(img_u_s1.shape) == 1]
    img_u_s2[cutmix_box2.unsqueeze(1).expand(img_u_s2.shape) == 1] = \
        img_u_s2_mix[cutmix_box2.unsqueeze(1).expand(img_u_s2.shape) == 1]
    model.train()
    num_lb, num_ulb = img_x.shape[0], img_u_w.shape[0]
    keyed, dropout2d = fp_dropout(seed), nn.Dropout2d
    nn.Dropout2d = lambda p: keyed  # the need_fp path's inline `nn.Dropout2d(0.5)`, this call only
    try:
        preds, preds_fp = model(torch.cat((img_x, img_u_w)), True)
    finally:
        nn.Dropout2d = dropout2d
    pred_x, pred_u_w = preds.split([num_lb, num_ulb])
    pred_u_w_fp = preds_fp[num_lb:]
    pred_u_s1, pred_u_s2 = model(torch.cat((img_u_s1, img_u_s2))).chunk(2)
    pred_u_w = pred_u_w.detach()
    conf_u_w = pred_u_w.softmax(dim=1).max(dim=1)[0]
    mask_u_w = pred_u_w.argmax(dim=1)
    mask_u_w_cutmixed1, conf_u_w_cutmixed1 = mask_u_w.clone(), conf_u_w.clone()
    mask_u_w_cutmixed2, conf_u_w_cutmixed2 = mask_u_w.clone(), conf_u_w.clone()
    mask_u_w_cutmixed1[cutmix_box1 == 1] = mask_u_w_mix[cutmix_box1 == 1]
    conf_u_w_cutmixed1[cutmix_box1 == 1] = conf_u_w_mix[cutmix_box1 == 1]
    mask_u_w_cutmixed2[cutmix_box2 == 1] = mask_u_w_mix[cutmix_box2 == 1]
    conf_u_w_cutmixed2[cutmix_box2 == 1] = conf_u_w_mix[cutmix_box2 == 1]
    loss_x = (criterion_ce(pred_x, mask_x) + criterion_dice(pred_x.softmax(dim=1), mask_x.unsqueeze(1).float())) / 2.0
    loss_u_s1 = criterion_dice(pred_u_s1.softmax(dim=1), mask_u_w_cutmixed1.unsqueeze(1).float(),
                               ignore=(conf_u_w_cutmixed1 < cfg["conf_thresh"]).float())
    loss_u_s2 = criterion_dice(pred_u_s2.softmax(dim=1), mask_u_w_cutmixed2.unsqueeze(1).float(),
                               ignore=(conf_u_w_cutmixed2 < cfg["conf_thresh"]).float())
    loss_u_w_fp = criterion_dice(pred_u_w_fp.softmax(dim=1), mask_u_w.unsqueeze(1).float(),
                                 ignore=(conf_u_w < cfg["conf_thresh"]).float())
    loss = (loss_x + loss_u_s1 * 0.25 + loss_u_s2 * 0.25 + loss_u_w_fp * 0.5) / 2.0
    optimizer.zero_grad()
    loss.backward()
    grads = {n: p.grad.detach().clone() for n, p in model.named_parameters()}
    optimizer.step()
    mask_ratio = (conf_u_w >= cfg["conf_thresh"]).sum() / conf_u_w.numel()

    # The rate of update u: set after update u - 1 from iters = u - 2 (the first update runs at cfg['lr']).
    lrs = [cfg["lr"]] + [cfg["lr"] * (1 - max(u - 2, 0) / total_iters) ** 0.9 for u in range(2, total_iters + 1)]
    scalars = {"loss_x": loss_x.item(), "loss_s1": loss_u_s1.item(), "loss_s2": loss_u_s2.item(),
               "loss_fp": loss_u_w_fp.item(), "loss": loss.item(), "lr": lr, "mask_ratio": mask_ratio.item(),
               "valid_s1": float((conf_u_w_cutmixed1 >= cfg["conf_thresh"]).sum()),
               "valid_s2": float((conf_u_w_cutmixed2 >= cfg["conf_thresh"]).sum()),
               "valid_fp": float((conf_u_w >= cfg["conf_thresh"]).sum()),
               "box1": float(cutmix_box1.sum()), "box2": float(cutmix_box2.sum())}
    rows, meta = _step_report(args, "LiheYoung/UniMatch", root, ours, mapping, scalars, TITLES, grads,
                              {"student": dict(model.named_parameters())}, [], {"learning rate": lrs})
    meta["schedule_every"], meta["classes"], meta["sharpen"] = SCHEDULE_EVERY, CLASSES, SHARPEN
    meta["official"]["schedules"] = {"learning rate": lrs[::SCHEDULE_EVERY]}
    return rows, meta
