"""semiseg's networks against the authors' own code, on identical weights, inputs and dropout masks.

    python benchmarks/official_equivalence.py --method caml --official /tmp/official/CAML
    python benchmarks/official_equivalence.py --method crossmatch --dims 2 --official /tmp/official/CrossMatch
    python benchmarks/official_equivalence.py --method caml --official /tmp/official/CAML --write-fixture

PATH is a checkout of the official repository that you provide (nothing of it is copied here). The script
builds the official network and semiseg's, draws one set of weights in semiseg's layout and maps it onto the
official network with `semiseg.official.key_map` (the mapping `semiseg evaluate --official-checkpoint` uses),
replaces every dropout module of both networks by one whose channel mask is drawn from its semiseg module name
(so both sides drop the same channels; the attention-probability dropout inside `nn.MultiheadAttention` is off
on both sides), and runs one training-mode step on both: forward (every output head), a fixed loss (the sum of
the cross-entropy of every output against one random label map; identical on both sides by construction), the
backward, and one SGD step (lr 0.01, momentum 0.9, weight decay 1e-4). It prints, per term, the official and
semiseg values (max |.|), abs and relative diff (max |a - b| / max |a|) and the verdict `equal` (<= 1e-5) or
`DIFFERS`: every output, the loss, the global gradient norm, the five parameters with the largest gradient
difference, the weights after the step and the BatchNorm running statistics.

What it does not check: the methods' own losses, masks, thresholds and schedules (their official steps are
inline in the training scripts; see docs/methods/*.md for which of them have been compared by hand).

`--write-fixture` saves `tests/golden/NAME.json` (numbers only: sizes, seeds, checksums of the weights and
inputs, and the official values of every term), which `tests/test_golden.py` recomputes with semiseg alone.
"""

from __future__ import annotations

import argparse
import datetime as dt
import importlib
import json
import subprocess
import sys
from collections.abc import Callable
from pathlib import Path
from typing import Any

import numpy as np
import torch
import torch.nn.functional as F
from torch import nn

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO / "tests"))
from golden_step import (  # noqa: E402
    KeyedDropout,
    build_semiseg,
    default_dtype,
    inputs,
    key_of_official_module,
    network_step,
    seeded_weights,
)

TOL = 1e-5


def _official_class(root: Path, network: str) -> type[nn.Module]:
    """Import e.g. `code/networks/VNet.py:CAML3d_v1`: the folder above the package goes first on sys.path."""
    file, cls = network.split(":")
    parts = Path(file).with_suffix("").parts
    code_dir, module = root.joinpath(*parts[:-2]), ".".join(parts[-2:])
    for name in list(sys.modules):  # every official repository has its own `networks` package
        if name.split(".")[0] in ("networks", "model", "util", "utils"):
            del sys.modules[name]
    sys.path.insert(0, str(code_dir))
    try:
        return getattr(importlib.import_module(module), cls)
    finally:
        sys.path.pop(0)


def _official_network(method: str, dims: int, root: Path, n_filters: int, classes: int) -> nn.Module:
    from semiseg.official import official_layout

    layout = official_layout(method, dims)
    cls = _official_class(root, layout.network)
    if dims == 2:
        return cls(in_chns=1, class_num=classes)
    if method == "dtc":  # one sigmoid channel (`n_classes=num_classes-1` in train_la_dtc.py)
        classes -= 1
    return cls(n_channels=1, n_classes=classes, n_filters=n_filters, normalization="batchnorm", has_dropout=True)


def _official_outputs(method: str, dims: int) -> Callable[[nn.Module, torch.Tensor], list[torch.Tensor]]:
    def run(net: nn.Module, x: torch.Tensor) -> list[torch.Tensor]:
        out = net(x)
        if method in ("bcp", "ssnet"):  # (logits, features)
            return [out[0]]
        return list(out) if isinstance(out, (tuple, list)) else [out]
    return run


def _install_official_dropout(net: nn.Module, method: str, dims: int, seed: int) -> None:
    from semiseg.official import official_layout

    flat = official_layout(method, dims).family in ("vnet_flat", "dtc")
    for name, module in list(net.named_modules()):
        for child_name, child in list(module.named_children()):
            if isinstance(child, (nn.Dropout, nn.Dropout2d, nn.Dropout3d)):
                full = f"{name}.{child_name}" if name else child_name
                # A flat VNet calls one `dropout` module twice: on x5 (encoder) then on x9 (decoder).
                key = key_of_official_module(full, method, dims)
                keys = [key, key.replace("encoder.", "decoder.")] if flat and full == "dropout" else [key]
                setattr(module, child_name, KeyedDropout(child.p, keys, seed, not isinstance(child, nn.Dropout)))
        if isinstance(module, nn.MultiheadAttention):
            module.dropout = 0.0


def _git(root: Path) -> str:
    out = subprocess.run(["git", "-C", str(root), "rev-parse", "HEAD"], capture_output=True, text=True)
    return out.stdout.strip() or "unknown (not a git checkout; give the commit with --official-commit)"


def _row(term: str, a: torch.Tensor, b: torch.Tensor, scale: float | None = None) -> dict[str, Any]:
    """`scale` (default max |official|) is the denominator of the relative difference."""
    a64, b64 = a.detach().double(), b.detach().double()
    official = a64.abs().max().item()
    scale = official if scale is None else scale
    diff = (a64 - b64).abs().max().item()
    rel = diff / scale if scale > 0 else diff
    return {"term": term, "official": official, "semiseg": b64.abs().max().item(), "abs": diff, "rel": rel,
            "verdict": "equal" if rel <= TOL else "DIFFERS"}


def compare(args: argparse.Namespace) -> tuple[list[dict[str, Any]], dict[str, Any]]:
    from semiseg.official import key_map

    dims, size, classes = args.dims, args.size, args.classes
    torch.manual_seed(args.seed)
    method, target = build_semiseg(args.method, dims, args.n_filters, classes)
    official = _official_network(args.method, dims, Path(args.official), args.n_filters, classes)
    weights = seeded_weights(target, args.seed)
    mapping = key_map(list(official.state_dict()), args.method, dims)
    official_state = official.state_dict()
    for okey, skey in mapping.items():
        official_state[okey] = weights[skey].clone()
    official.load_state_dict(official_state)
    target.load_state_dict(weights)
    _install_official_dropout(official, args.method, dims, args.seed)
    x, label = inputs(dims, size, args.batch, classes, args.seed)

    res_o = network_step(official, _official_outputs(args.method, dims), x, label, args.seed, dropout=False)
    res_s = network_step(target, None, x, label, args.seed, dropout=True, method=args.method)
    rows = [_row(f"output {i}", a, b) for i, (a, b) in enumerate(zip(res_o["outputs"], res_s["outputs"]))]
    rows.append(_row("loss", res_o["loss"], res_s["loss"]))
    inverse = {s: o for o, s in mapping.items()}
    paired = [(k, res_o["grads"][inverse[k]], g) for k, g in res_s["grads"].items()]
    norm_o = torch.stack([a.double().norm() for _, a, _ in paired]).norm()
    norm_s = torch.stack([b.double().norm() for _, _, b in paired]).norm()
    rows.append(_row("gradient norm (global)", norm_o, norm_s))
    # Gradients relative to the largest official gradient entry: a bias followed by BatchNorm has a zero
    # gradient up to rounding noise, which a per-parameter ratio would magnify.
    top = max(a.abs().max().item() for _, a, _ in paired)
    worst = sorted(paired, key=lambda p: -(p[1] - p[2]).abs().max().item())
    rows += [_row(f"grad {k}", a, b, top) for k, a, b in worst[:5]]
    after_o = torch.cat([res_o["after"][inverse[k]].flatten() for k in res_s["after"]])
    after_s = torch.cat([v.flatten() for v in res_s["after"].values()])
    rows.append(_row("weights after SGD step", after_o, after_s))
    buf_keys = [k for k in res_s["buffers"] if k in inverse]
    if buf_keys:
        rows.append(_row("BatchNorm running stats", torch.cat([res_o["buffers"][inverse[k]].flatten().double()
                                                              for k in buf_keys]),
                         torch.cat([res_s["buffers"][k].flatten().double() for k in buf_keys])))
    meta = {"method": args.method, "dims": dims, "size": size, "batch": args.batch, "n_filters": args.n_filters,
            "classes": classes, "seed": args.seed, "official_repo": _layout_repo(args.method, dims),
            "official_commit": args.official_commit or _git(Path(args.official)),
            "date": f"{dt.datetime.now(dt.timezone.utc):%Y-%m-%d}",
            "command": "python benchmarks/official_equivalence.py " + " ".join(sys.argv[1:]),
            "checksums": res_s["checksums"],
            "official_keys": {k: list(v.shape) for k, v in official.state_dict().items()},
            "official": _fixture_values(res_o, inverse, res_s)}
    return rows, meta


def _layout_repo(method: str, dims: int) -> str:
    from semiseg.official import official_layout

    return official_layout(method, dims).repo


def _fixture_values(res_o: dict[str, Any], inverse: dict[str, str], res_s: dict[str, Any]) -> dict[str, Any]:
    """The official values the golden test recomputes: output summaries, loss, per-parameter grad norms."""
    from golden_step import summarize_output

    return {"outputs": [summarize_output(o) for o in res_o["outputs"]],
            "loss": res_o["loss"].item(),
            "grad_norms": {k: res_o["grads"][inverse[k]].double().norm().item() for k in res_s["grads"]},
            "after_norms": {k: res_o["after"][inverse[k]].double().norm().item() for k in res_s["after"]}}


def _official_module(root: Path, file: str):  # noqa: ANN202 - an official module object
    parts = Path(file).with_suffix("").parts
    for name in list(sys.modules):
        if name.split(".")[0] in ("networks", "model", "util", "utils"):
            del sys.modules[name]
    sys.path.insert(0, str(root.joinpath(*parts[:-2])))
    try:
        return importlib.import_module(".".join(parts[-2:]))
    finally:
        sys.path.pop(0)


def compare_mean_teacher_step(args: argparse.Namespace) -> tuple[list[dict[str, Any]], dict[str, Any]]:
    """One whole Mean Teacher update of SSL4MIS `train_mean_teacher_3D.py` (its loop body rebuilt from the
    official network, `utils.losses.DiceLoss`, `utils.ramps.sigmoid_rampup` and the script's own formulas for
    the noise, the losses and `update_ema_variables`) against semiseg's `train_step` + `after_step`, with the
    script's defaults (consistency 0.1, ramp-up 200 epochs of 150 updates, EMA 0.99) at update `--iteration`."""
    from golden_step import mean_teacher_step
    from semiseg.official import key_map

    root, k, seed = Path(args.official), args.iteration, args.seed
    uamt = args.method == "uamt"
    total = 30000 if uamt else 6000  # UA-MT's threshold ramp spans the script's max_iterations (30,000)
    ours = mean_teacher_step(args.n_filters, args.size, seed, k, args.method, total)  # semiseg first
    vnet = _official_class(root, "code/networks/vnet.py:VNet")
    model, ema = (vnet(n_channels=1, n_classes=2, n_filters=args.n_filters, normalization="batchnorm",
                       has_dropout=True) for _ in range(2))
    losses, ramps = _official_module(root, "code/utils/losses.py"), _official_module(root, "code/utils/ramps.py")
    mapping = key_map(list(model.state_dict()), "mean_teacher", 3)
    reference = ours["method"]
    for theirs, tag, s in ((model, "student", seed), (ema, "teacher", seed + 1)):
        weights = seeded_weights(reference.net, s)
        theirs.load_state_dict({o: weights[m].clone() for o, m in mapping.items()})
        _install_official_dropout(theirs, "mean_teacher", 3, seed)
        for module in theirs.modules():
            if isinstance(module, KeyedDropout):
                module.keys = [f"{tag}.{key}" for key in module.keys]
    x, label = ours["x"], ours["label"]

    # --- the official loop body (iter_num = k - 1)
    model.train()
    ema.train()
    torch.manual_seed(seed)
    unlabeled = x[2:]
    noise = torch.clamp(torch.randn_like(unlabeled) * 0.1, -0.2, 0.2)
    outputs = model(x)
    outputs_soft = torch.softmax(outputs, dim=1)
    with torch.no_grad():
        ema_output = ema(unlabeled + noise)
        ema_output_soft = torch.softmax(ema_output, dim=1)
    if uamt:  # train_uncertainty_aware_mean_teacher_3D.py, T = 8 passes on the batch repeated twice
        _, _, d, w, h = unlabeled.shape
        volume_batch_r = unlabeled.repeat(2, 1, 1, 1, 1)
        stride = volume_batch_r.shape[0] // 2
        preds = torch.zeros([stride * 8, 2, d, w, h])  # the script's .cuda() dropped: CPU run
        for i in range(8 // 2):
            ema_inputs = volume_batch_r + torch.clamp(torch.randn_like(volume_batch_r) * 0.1, -0.2, 0.2)
            with torch.no_grad():
                preds[2 * stride * i:2 * stride * (i + 1)] = ema(ema_inputs)
        preds = torch.softmax(preds, dim=1).reshape(8, stride, 2, d, w, h).mean(dim=0)
        uncertainty = -1.0 * torch.sum(preds * torch.log(preds + 1e-6), dim=1, keepdim=True)
    loss_ce = torch.nn.CrossEntropyLoss()(outputs[:2], label)
    loss_dice = losses.DiceLoss(2)(outputs_soft[:2], label.unsqueeze(1))
    supervised = 0.5 * (loss_dice + loss_ce)
    weight = 0.1 * ramps.sigmoid_rampup((k - 1) // 150, 200.0)
    extra = {}
    if uamt:
        consistency_dist = losses.softmax_mse_loss(outputs[2:], ema_output)
        threshold = (0.75 + 0.25 * ramps.sigmoid_rampup(k - 1, total)) * np.log(2)
        mask = (uncertainty < threshold).float()
        consistency = torch.sum(mask * consistency_dist) / (2 * torch.sum(mask) + 1e-16)
        extra = {"threshold": float(threshold), "certain_fraction": mask.mean().item()}
    else:
        consistency = torch.mean((outputs_soft[2:] - ema_output_soft) ** 2)
    loss = supervised + weight * consistency
    optimizer = torch.optim.SGD(model.parameters(), lr=0.01, momentum=0.9, weight_decay=0.0001)
    optimizer.zero_grad()
    loss.backward()
    grads = {o: p.grad.detach().clone() for o, p in model.named_parameters()}
    optimizer.step()
    alpha = min(1 - 1 / (k - 1 + 1), 0.99)  # update_ema_variables(model, ema_model, 0.99, iter_num)
    with torch.no_grad():
        for ema_param, param in zip(ema.parameters(), model.parameters()):
            ema_param.mul_(alpha).add_(param, alpha=1 - alpha)
    ramp = [0.1 * ramps.sigmoid_rampup((t - 1) // 150, 200.0) for t in range(1, 6001)]

    scalars = {"supervised": supervised.item(), "weight": weight, "consistency": consistency.item(),
               "loss": loss.item(), **extra}
    titles = {"supervised": "supervised 0.5 (CE + Dice)", "weight": "consistency weight",
              "consistency": "consistency (masked) MSE", "loss": "total loss",
              "threshold": "uncertainty threshold", "certain_fraction": "certain-voxel fraction (mask)"}
    states = {"student": dict(model.named_parameters()), "teacher": dict(ema.named_parameters())}
    return _step_report(args, "HiLab-git/SSL4MIS", root, ours, mapping, scalars, titles, grads, states, ramp)



def _step_report(args: argparse.Namespace, repo: str, root: Path, ours: dict[str, Any], mapping: dict[str, str],
                 scalars: dict[str, float], titles: dict[str, str], grads: dict[str, torch.Tensor],
                 states: dict[str, dict[str, torch.Tensor]], ramp: list[float],
                 schedules: dict[str, list[float]] | None = None) -> tuple[list[dict], dict]:
    """Rows and fixture of a whole-update comparison: scalar terms, gradients, weights after, the ramp, and any
    further per-update schedule over the whole recipe (`schedules`, e.g. the learning rate or a threshold; semiseg's
    values in `ours["schedules"]`)."""
    inverse = {m: o for o, m in mapping.items()}
    rows = [_row(titles[key], torch.tensor(value, dtype=torch.float64),
                 torch.tensor(ours["scalars"][key], dtype=torch.float64)) for key, value in scalars.items()]
    paired = [(m, grads[inverse[m]], g) for m, g in ours["grads"].items()]
    top = max(a.abs().max().item() for _, a, _ in paired)
    rows.append(_row("gradient norm (global)", torch.stack([a.double().norm() for _, a, _ in paired]).norm(),
                     torch.stack([b.double().norm() for _, _, b in paired]).norm()))
    worst = sorted(paired, key=lambda p: -(p[1] - p[2]).abs().max().item())
    rows += [_row(f"grad {m}", a, b, top) for m, a, b in worst[:5]]
    names = {"student": "weights after SGD step", "teacher": "EMA teacher after update"}
    for part, official in states.items():
        name = names.get(part, f"{part} after the step")
        rows.append(_row(name, torch.cat([official[inverse[m]].detach().flatten() for m in ours[part]]),
                         torch.cat([v.flatten() for v in ours[part].values()])))
    if ramp:  # a method without a consistency ramp (CrossMatch, UniMatch) passes []
        rows.append(_row(f"consistency weight, updates 1-{len(ramp)}", torch.tensor(ramp, dtype=torch.float64),
                         torch.tensor(ours["ramp"], dtype=torch.float64)))
    for name, values in (schedules or {}).items():
        rows.append(_row(f"{name}, updates 1-{len(values)}", torch.tensor(values, dtype=torch.float64),
                         torch.tensor(ours["schedules"][name], dtype=torch.float64)))
    meta = {"method": args.method, "step": "method", "dims": args.dims, "size": args.size,
            "batch": ours.get("batch", 4),
            "n_filters": args.n_filters, "seed": args.seed, "iteration": args.iteration, "official_repo": repo,
            "official_commit": args.official_commit or _git(root),
            "date": f"{dt.datetime.now(dt.timezone.utc):%Y-%m-%d}",
            "command": "python benchmarks/official_equivalence.py " + " ".join(sys.argv[1:]),
            "official": {"scalars": scalars,
                         "grad_norms": {m: grads[inverse[m]].double().norm().item() for m in ours["grads"]},
                         **{f"{part}_norms": {m: official[inverse[m]].double().norm().item() for m in ours[part]}
                            for part, official in states.items()},
                         "ramp": ramp, "schedules": schedules or {}}}
    return rows, meta


def compare_mcnet_step(args: argparse.Namespace) -> tuple[list[dict[str, Any]], dict[str, Any]]:
    """One whole update of MC-Net's `train_mcnet_3d.py` (loop body rebuilt from the official network,
    `utils.losses.Binary_dice_loss` / `mse_loss`, `utils.ramps` and the script's `sharpening` formula, with
    its defaults lamda 0.5, consistency 1, ramp-up 40, T 0.1) against semiseg's `train_step`."""
    from golden_step import mcnet_step
    from semiseg.official import key_map

    root, k, seed = Path(args.official), args.iteration, args.seed
    ours = mcnet_step(args.method, args.n_filters, args.size, seed, k)
    cls = _official_class(root, "code/networks/VNet.py:" + ("MCNet3d_v1" if args.method == "mcnet" else "MCNet3d_v2"))
    model = cls(n_channels=1, n_classes=2, n_filters=args.n_filters, normalization="batchnorm", has_dropout=True)
    losses, ramps = _official_module(root, "code/utils/losses.py"), _official_module(root, "code/utils/ramps.py")
    mapping = key_map(list(model.state_dict()), args.method, 3)
    weights = seeded_weights(ours["method"].net, seed)
    model.load_state_dict({o: weights[m].clone() for o, m in mapping.items()})
    _install_official_dropout(model, args.method, 3, seed)
    x, label = ours["x"], ours["label"]

    def sharpening(p: torch.Tensor) -> torch.Tensor:  # the script's, with T = 1 / args.temperature
        t = 1 / 0.1
        return p ** t / (p ** t + (1 - p) ** t)

    # --- the official loop body (iter_num incremented before the weight)
    model.train()
    outputs = model(x)
    y_ori = torch.zeros((len(outputs),) + outputs[0].shape)
    y_pseudo_label = torch.zeros((len(outputs),) + outputs[0].shape)
    loss_seg_dice = 0
    for idx in range(len(outputs)):
        y_prob = F.softmax(outputs[idx][:2], dim=1)
        loss_seg_dice += losses.Binary_dice_loss(y_prob[:, 1, ...], label[:2, ...] == 1)
        y_prob_all = F.softmax(outputs[idx], dim=1)
        y_ori[idx] = y_prob_all
        y_pseudo_label[idx] = sharpening(y_prob_all)
    loss_consist = 0
    for i in range(len(outputs)):
        for j in range(len(outputs)):
            if i != j:
                loss_consist += losses.mse_loss(y_ori[i], y_pseudo_label[j])
    weight = 1.0 * ramps.sigmoid_rampup(k // 150, 40.0)
    loss = 0.5 * loss_seg_dice + weight * loss_consist
    optimizer = torch.optim.SGD(model.parameters(), lr=0.01, momentum=0.9, weight_decay=0.0001)
    optimizer.zero_grad()
    loss.backward()
    grads = {o: p.grad.detach().clone() for o, p in model.named_parameters()}
    optimizer.step()
    ramp = [1.0 * ramps.sigmoid_rampup(t // 150, 40.0) for t in range(1, 15001)]
    scalars = {"dice": float(loss_seg_dice), "consistency": float(loss_consist), "weight": weight,
               "loss": float(loss)}
    titles = {"dice": "sum of decoder Dice losses", "consistency": "mutual consistency (sharpened MSE)",
              "weight": "consistency weight", "loss": "total loss"}
    return _step_report(args, "ycwu1997/MC-Net", root, ours, mapping, scalars, titles, grads,
                        {"student": dict(model.named_parameters())}, ramp)


BUILT_IN_STEPS = {"mean_teacher": compare_mean_teacher_step, "uamt": compare_mean_teacher_step,
                  "mcnet": compare_mcnet_step, "mcnet_plus": compare_mcnet_step}


def _whole_update(method: str) -> Callable[[argparse.Namespace], tuple[list[dict], dict]] | None:
    """The whole-update comparison of `method`: built in above, or `benchmarks/official_step_METHOD.py:compare`."""
    if method in BUILT_IN_STEPS:
        return BUILT_IN_STEPS[method]
    if not (Path(__file__).parent / f"official_step_{method}.py").exists():
        return None
    sys.path.insert(0, str(Path(__file__).parent))
    return importlib.import_module(f"official_step_{method}").compare


def _steps_available() -> set[str]:
    return set(BUILT_IN_STEPS) | {p.stem.removeprefix("official_step_")
                                  for p in Path(__file__).parent.glob("official_step_*.py")}


def print_table(rows: list[dict[str, Any]], meta: dict[str, Any]) -> None:
    print(f"{meta['method']} ({meta['dims']}D, {meta['batch']} x {meta['size']}^{meta['dims']}, "
          f"n_filters {meta['n_filters']}, {meta['dtype']}) vs {meta['official_repo']}@{meta['official_commit'][:10]}, "
          f"{meta['date']}")
    print("| term | official | semiseg | abs diff | rel diff | verdict |")
    print("|---|---|---|---|---|---|")
    for r in rows:
        print(f"| {r['term']} | {r['official']:.6g} | {r['semiseg']:.6g} | {r['abs']:.3g} | {r['rel']:.3g} | "
              f"{r['verdict']} |")


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--method", required=True)
    parser.add_argument("--official", required=True, help="checkout of the official repository")
    parser.add_argument("--official-commit", default=None, help="commit, when PATH is not a git checkout")
    parser.add_argument("--dims", type=int, default=3)
    parser.add_argument("--size", type=int, default=32, help="cube / square side of the inputs")
    parser.add_argument("--batch", type=int, default=4)
    parser.add_argument("--n-filters", type=int, default=4, help="3D base filters (the 2D UNets are fixed)")
    parser.add_argument("--classes", type=int, default=None, help="default 2 in 3D, 4 in 2D")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--dtype", choices=("float64", "float32"), default="float64",
                        help="both codes' dtype (float64, the fixtures' choice, is free of rounding noise; float32 "
                             "shows the agreement at training precision)")
    parser.add_argument("--write-fixture", action="store_true", help="save tests/golden/NAME.json")
    parser.add_argument("--step", choices=("network", "method"), default="network",
                        help="method: the whole official training update (every method with a comparison: see "
                             "BUILT_IN_STEPS and benchmarks/official_step_*.py)")
    parser.add_argument("--iteration", type=int, default=1000, help="--step method: the 1-based update")
    parser.add_argument("--official-variant", default=None, metavar="COMMIT=PATH",
                        help="--step method: a checkout of another official commit that the method's comparison "
                             "also runs (mlrpl: the first upload, quirk Q1)")
    args = parser.parse_args(argv)
    args.classes = args.classes or (2 if args.dims == 3 else 4)
    with default_dtype(args.dtype):
        return _run(parser, args)


def _run(parser: argparse.ArgumentParser, args: argparse.Namespace) -> int:
    if args.step == "method":
        step = _whole_update(args.method)
        if step is None:
            parser.error(f"--step method is implemented for {', '.join(sorted(_steps_available()))} so far")
        rows, meta = step(args)
        meta["dtype"] = args.dtype
        print_table(rows, meta)
        if args.write_fixture:  # a method with several fixtures (e.g. one per stage) names each in meta
            name = meta.get("fixture") or (args.method if args.dims == 3 else f"{args.method}_{args.dims}d")
            path = REPO / "tests" / "golden" / "steps" / f"{name}.json"
            path.parent.mkdir(exist_ok=True)
            path.write_text(json.dumps(meta, indent=1) + "\n")
            print(f"fixture: {path.relative_to(REPO)} ({path.stat().st_size / 1024:.0f} KiB)")
        return 0 if all(r["verdict"] != "DIFFERS" for r in rows) else 1  # or a verdict naming a quirk
    rows, meta = compare(args)
    meta["dtype"] = args.dtype
    print_table(rows, meta)
    if args.write_fixture:
        name = args.method if args.dims == 3 else f"{args.method}_2d"
        path = REPO / "tests" / "golden" / f"{name}.json"
        path.parent.mkdir(exist_ok=True)
        path.write_text(json.dumps(meta, indent=1) + "\n")
        print(f"fixture: {path.relative_to(REPO)} ({path.stat().st_size / 1024:.0f} KiB)")
    return 0 if all(r["verdict"] == "equal" for r in rows) else 1


if __name__ == "__main__":
    sys.exit(main())
