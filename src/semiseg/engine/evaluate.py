"""Evaluation under the declared protocol: per-case metrics, a summary and a protocol card.

Writes `cases.csv` (one row per case) and `summary.json` with `metrics` (mean and std of each
metric), `cases` and `protocol`, the card that says exactly how the numbers were obtained. An undefined
value (a distance under the `nan` empty policy) is `null` in `summary.json` and `nan` in `cases.csv`.
"""

from __future__ import annotations

import csv
import json
import subprocess
from collections.abc import Iterable
from pathlib import Path
from typing import Any

import h5py
import numpy as np

from .. import __version__
from ..config import TrainConfig
from ..data import Layout, open_dataset
from ..data.prepare import parse_sizes
from ..errors import ConfigError, DataError
from ..methods.base import NetSpec
from .checkpoint import load_checkpoint
from .inference import predict_volume
from .metrics import EMPTY_POLICIES, METRIC_DEFINITIONS, case_metrics, summarize
from .trainer import BEST, CHECKPOINT, build_method, inference_protocol, resolve_device

METRICS = ("dice", "jaccard", "hd95", "asd")
# How each checkpoint rule chose the weights, stated in the protocol card (protocol.md section 6).
CHECKPOINT_RULES = {
    "last": "the run's final checkpoint, no selection (the honest default for LA / Pancreas)",
    "best_on_val": "highest mean foreground Dice on the declared validation cases, disjoint from the test set",
    "best_on_test": "highest mean foreground Dice on the TEST cases (the official codes' quirk: the test set "
                    "leaks into the choice; for reproducing their numbers only, not an honest estimate)",
    "given file": "the checkpoint file named on the command line",
}
CHECKPOINT_RULES["best"] = CHECKPOINT_RULES["best_on_val"]  # `--checkpoint best` of a run without a rule recorded


def code_version() -> str:
    """semiseg version plus the git commit when run from a checkout, marked `.dirty` with uncommitted changes."""
    try:
        commit = subprocess.run(["git", "describe", "--always", "--dirty=.dirty", "--exclude=*"],
                                capture_output=True, text=True, cwd=Path(__file__).parent, timeout=5).stdout.strip()
    except (OSError, subprocess.SubprocessError):
        commit = ""
    return f"{__version__}+{commit}" if commit else __version__


def resolve_checkpoint(path: Path, which: str = "auto") -> tuple[Path, str]:
    """A run folder becomes the checkpoint its selection rule names; returns (file, rule)."""
    path = Path(path)
    if which not in ("auto", "last", "best"):
        raise ConfigError(f"--checkpoint {which!r}: use auto (the run's rule), last or best")
    if path.is_file():
        return path, "given file"
    if not path.is_dir():
        raise DataError(f"{path}: neither a run folder nor a checkpoint file")
    run_rule = "last"
    cfg_file = path / "config.yaml"
    if cfg_file.is_file():
        import yaml

        run_rule = (yaml.safe_load(cfg_file.read_text()) or {}).get("checkpoint_selection", "last")
    # `best` is the run's own best checkpoint, so the card names the cases it was chosen on.
    rule = run_rule if which == "auto" or (which == "best" and run_rule.startswith("best_")) else which
    name = BEST if rule.startswith("best") else CHECKPOINT
    return path / name, rule


def parse_spacing(text: str | None) -> tuple[float, ...] | None:
    """`--spacing 0.625,0.625,0.625` (mm per voxel along the stored axes) for distances in mm."""
    if text is None:
        return None
    values = parse_sizes(text)
    if values is None:
        raise ConfigError(f"--spacing {text!r}: give one positive size in mm per image axis, e.g. 0.625,0.625,0.625 "
                          "(LA), or leave it out for distances in voxels as the papers report")
    return values


def _class_metrics(pred: np.ndarray, label: np.ndarray, num_classes: int, empty_policy: str,
                   spacing: tuple[float, ...] | None = None, case: str = "") -> dict[str, float]:
    """Binary tasks: the foreground class; multi-class: each class and their mean (ACDC tables)."""
    if spacing is not None and len(spacing) != label.ndim:
        raise ConfigError(f"--spacing has {len(spacing)} values but case {case} has {label.ndim} axes "
                          f"(shape {label.shape}); give one size per axis")
    per_class = [case_metrics(pred == c, label == c, spacing=spacing, empty_policy=empty_policy)
                 for c in range(1, num_classes)]
    row = {m: float(np.mean([pc[m] for pc in per_class])) for m in METRICS}
    if num_classes > 2:
        for c, pc in enumerate(per_class, start=1):
            row.update({f"{m}_class{c}": pc[m] for m in METRICS})
    return row


def write_report(out: Path, rows: list[dict[str, Any]], protocol: dict[str, Any]) -> dict[str, Any]:
    out.mkdir(parents=True, exist_ok=True)
    with open(out / "cases.csv", "w", newline="") as f:
        writer = csv.DictWriter(f, fieldnames=list(rows[0]))
        writer.writeheader()
        writer.writerows(rows)
    stats = summarize([{m: r[m] for m in r if m != "case"} for r in rows])
    summary = {"metrics": {m: stats[m] for m in stats}, "cases": rows, "protocol": protocol}
    (out / "summary.json").write_text(json.dumps(strict_json(summary), indent=1, allow_nan=False))
    return summary


def strict_json(value: Any) -> Any:
    """NaN / Inf become null, so `summary.json` is standard JSON that any reader (jq, JavaScript) accepts."""
    if isinstance(value, float):
        return value if np.isfinite(value) else None
    if isinstance(value, dict):
        return {k: strict_json(v) for k, v in value.items()}
    if isinstance(value, (list, tuple)):
        return [strict_json(v) for v in value]
    return value


def _split_ids(layout: Layout, cfg: TrainConfig | None, split: str) -> list[str]:
    if split == "test":
        if not layout.test_ids:
            raise DataError(f"{layout.root}: no labelled test cases (own data: put test labels in labelsTs/ and "
                            "run `semiseg data prepare` again); `semiseg predict` labels unlabelled scans")
        return list(layout.test_ids)
    if split == "val":
        ids = layout.split(cfg.labeled, cfg.val).val if cfg is not None and cfg.val else list(layout.val_ids)
        if not ids:
            raise DataError(f"{layout.root}: no validation cases (train with --val N, or use a dataset with a "
                            "declared validation list)")
        return ids
    raise DataError(f"unknown split {split!r}; use test or val")


def _checked_policy(empty_policy: str) -> str:
    if empty_policy not in EMPTY_POLICIES:
        raise ConfigError(f"--empty-policy {empty_policy!r}: use one of {', '.join(EMPTY_POLICIES)}")
    return empty_policy


def _metric_card(empty_policy: str, spacing: tuple[float, ...] | None = None) -> dict[str, Any]:
    units = ("voxels (spacing 1 on every axis, as the papers report)" if spacing is None else
             f"mm (voxel spacing {'x'.join(f'{v:g}' for v in spacing)} given with --spacing)")
    return {"definitions": {m: METRIC_DEFINITIONS[m] for m in METRICS}, "units": units,
            "empty_policy": empty_policy,
            "empty_policy_meaning": {"legacy_zero": "empty prediction scores 0 on all four metrics and is "
                                     "averaged in (the papers' convention; rewards misses on HD95/ASD)",
                                     "nan": "distances NaN for empty masks, excluded from the mean",
                                     "penalty": "distances set to the image diagonal for empty masks"}[empty_policy]}


def evaluate_checkpoint(checkpoint: Path, out: Path, data: str | None = None, split: str = "test",
                        which: str = "auto", post_lcc: bool | None = None, empty_policy: str | None = None,
                        device: str = "auto", save_predictions: bool = False,
                        spacing: tuple[float, ...] | None = None, cpu_bf16: bool | None = None,
                        fold_bn: bool | None = None) -> dict[str, Any]:
    """`post_lcc`, `empty_policy`, `cpu_bf16`, `fold_bn`: None = the run's own setting."""
    ckpt_path, rule = resolve_checkpoint(checkpoint, which)
    payload = load_checkpoint(ckpt_path)
    cfg = TrainConfig(**payload["config"])
    if post_lcc is not None:
        cfg.post_lcc = post_lcc
    if cpu_bf16 is not None:
        cfg.cpu_bf16 = cpu_bf16
    if fold_bn is not None:
        cfg.fold_bn = fold_bn
    policy = _checked_policy(empty_policy or cfg.empty_policy)
    layout = open_dataset(data or cfg.data, cfg.layout)
    ids = _split_ids(layout, cfg, split)
    dev = resolve_device(device)
    spec = NetSpec(**payload["spec"])
    method = build_method(cfg, spec, dev)
    method.load_state_dict(payload["method"])
    method.eval()
    net = method.inference_network()
    protocol = inference_protocol(cfg, layout)
    rows = []
    for case_id in ids:
        case = layout.read_eval(case_id)
        if case.image.shape[0] != spec.in_channels:
            raise DataError(f"{case.path}: image has {case.image.shape[0]} channels, the model expects "
                            f"{spec.in_channels}; evaluate on the dataset the model was trained for")
        pred = predict_volume(net, case.image, protocol, dev)
        if save_predictions:
            _save_prediction(out / "predictions" / f"{case_id}.h5", pred)
        rows.append({"case": case_id, **_class_metrics(pred, case.label, layout.num_classes, policy, spacing,
                                                       case_id)})
    train_split = layout.split(cfg.labeled, cfg.val)
    best = payload.get("best") or {}
    card = {
        "dataset": {"layout": layout.name, "root": str(layout.root), "split": split, "case_ids": ids,
                    "class_names": list(layout.class_names),
                    "labeled_ids": train_split.labeled, "n_unlabeled": len(train_split.unlabeled),
                    "val_ids": train_split.val, "val_source": train_split.val_source},
        "inference": {**vars(protocol), "evaluated_output": f"{cfg.method}: {method.evaluated_output()}"},
        "metrics": _metric_card(policy, spacing),
        "checkpoint": {"path": str(ckpt_path), "iteration": payload["iteration"], "of": cfg.iterations,
                       "rule": rule, "how_chosen": CHECKPOINT_RULES[rule],
                       "run_selection_rule": cfg.checkpoint_selection,
                       "best_val": best if best.get("iteration") else None,
                       "complete": payload["iteration"] >= cfg.iterations},
        "method": cfg.method, "preset": cfg.preset, "seed": cfg.seed, "code_version": code_version(),
    }
    return write_report(out, rows, card)


def _save_prediction(path: Path, pred: np.ndarray) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    with h5py.File(path, "w") as f:
        f.create_dataset("label", data=pred.astype(np.uint8), compression="gzip")


def read_prediction(folder: Path, case_id: str) -> np.ndarray:
    """`<id>.h5` (dataset `label` or `pred`) or `<id>.nii.gz` / `<id>.nii` from a prediction folder."""
    for suffix in (".h5", ".nii.gz", ".nii"):
        path = folder / f"{case_id}{suffix}"
        if not path.is_file():
            continue
        if suffix == ".h5":
            try:
                with h5py.File(path, "r") as f:
                    key = next((k for k in ("label", "pred", "prediction") if k in f), None)
                    if key is None:
                        raise DataError(f"{path}: no 'label' or 'pred' dataset (found {list(f.keys())})")
                    return np.asarray(f[key][()])
            except OSError as exc:
                raise DataError(f"{path}: unreadable HDF5 file ({exc})") from None
        import nibabel as nib

        return np.asarray(nib.load(str(path)).dataobj)
    raise DataError(f"{folder}: no prediction for case {case_id!r} (looked for {case_id}.h5, .nii.gz, .nii)")


def evaluate_predictions(pred_dir: Path, data: str, out: Path, split: str = "test",
                         empty_policy: str = "legacy_zero", spacing: tuple[float, ...] | None = None) -> dict[str, Any]:
    """Score existing label maps against the dataset's labels (like nnU-Net's evaluate_folder)."""
    _checked_policy(empty_policy)
    if not Path(pred_dir).is_dir():
        raise DataError(f"{pred_dir}: prediction folder not found; pass --pred with a folder of label maps named "
                        "by case id (<id>.h5, <id>.nii.gz or <id>.nii)")
    layout = open_dataset(data)
    ids = _split_ids(layout, None, split)
    rows = []
    for case_id in ids:
        case = layout.read_eval(case_id)
        pred = read_prediction(Path(pred_dir), case_id)
        if pred.shape != case.label.shape:
            raise DataError(f"{pred_dir}/{case_id}: prediction shape {pred.shape} differs from the label's "
                            f"{case.label.shape}")
        rows.append({"case": case_id, **_class_metrics(pred, case.label, layout.num_classes, empty_policy, spacing,
                                                       case_id)})
    card = {"dataset": {"layout": layout.name, "root": str(layout.root), "split": split, "case_ids": ids,
                        "class_names": list(layout.class_names)},
            "predictions": str(pred_dir), "metrics": _metric_card(empty_policy, spacing),
            "code_version": code_version()}
    return write_report(out, rows, card)


def format_summary(summary: dict[str, Any]) -> Iterable[str]:
    """Mean ± std of each metric, then one line per class for multi-class data (ACDC tables)."""
    for m in METRICS:
        stats = summary["metrics"][m]
        yield f"{m:8s} {stats['mean']:.4f} ± {stats['std']:.4f}"
    names = summary["protocol"].get("dataset", {}).get("class_names", [])
    for c in range(1, len(names)):
        if f"dice_class{c}" in summary["metrics"]:
            values = "  ".join(f"{m} {summary['metrics'][f'{m}_class{c}']['mean']:.4f}" for m in METRICS)
            yield f"{names[c]:8s} {values}"


def format_card(summary: dict[str, Any]) -> Iterable[str]:
    """The protocol card in brief, so a printed table is never separated from how it was obtained."""
    card = summary["protocol"]
    data, metrics = card["dataset"], card["metrics"]
    yield f"split    {data['split']}: {len(data['case_ids'])} cases of {data['root']} ({data['layout']})"
    if "checkpoint" in card:
        ckpt, inf = card["checkpoint"], card["inference"]
        yield (f"model    {card['method']}, {len(data['labeled_ids'])} labelled, seed {card['seed']}; checkpoint "
               f"iteration {ckpt['iteration']}/{ckpt['of']} (rule: {ckpt['rule']})")
        sizes = "x".join(map(str, inf["patch_size"]))
        window = f"{inf['mode']} {sizes}, stride {'x'.join(map(str, inf['stride']))}"
        yield f"infer    {window}, mean softmax, argmax, largest component {'on' if inf['post_lcc'] else 'off'}"
    else:
        yield f"preds    {card['predictions']}"
    yield f"metrics  medpy-compatible (pooled HD95, directed ASD), {metrics['units']}, empty policy " \
          f"{metrics['empty_policy']}; code {card['code_version']}"
