"""Evaluation under the declared protocol: per-case metrics, a summary and a protocol card.

Writes `cases.csv` (one row per case) and `summary.json` with `metrics` (mean and std of each
metric), `cases` and `protocol`, the card that says exactly how the numbers were obtained. An undefined
value (a distance under the `nan` empty policy) is `null` in `summary.json` and `nan` in `cases.csv`.
"""

from __future__ import annotations

import csv
import json
import subprocess
from collections.abc import Iterable, Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import Any

import numpy as np
import torch

from .. import __version__
from ..config import TrainConfig, load_yaml
from ..data import Layout, dataset_fingerprint, locate_dataset, open_dataset
from ..data.prepare import parse_sizes
from ..errors import ConfigError, DataError
from ..methods.base import NetSpec
from .checkpoint import writable_output
from .inference import InferenceProtocol, predict_volume
from .metrics import EMPTY_POLICIES, METRIC_DEFINITIONS, case_metrics, summarize
from .model_file import MODEL, load_model
from .progress import CaseProgress
from .runlock import FolderLock
from .trainer import BEST, CHECKPOINT, build_method, extension_line, inference_protocol, resolve_device

# `spacing` of the evaluation functions: mm per voxel given by the user, None = the dataset's own spacing where
# its files record it (voxels otherwise), or VOXELS = distances in voxels whatever the dataset knows.
Spacing = tuple[float, ...] | str | None
VOXELS = "voxels"

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
    """A run folder becomes the checkpoint its selection rule names; returns (file, rule).

    A folder that holds only an exported `model.pt` (no checkpoint) gives that file.
    """
    path = Path(path)
    check_options(which)
    if path.is_file():
        return path, "given file"
    if not path.is_dir():
        raise DataError(f"{path}: neither a run folder nor a checkpoint file")
    run_rule = "last"
    cfg_file = path / "config.yaml"
    if cfg_file.is_file():
        run_rule = str(load_yaml(cfg_file).get("checkpoint_selection", "last"))
    # `best` is the run's own best checkpoint, so the card names the cases it was chosen on.
    rule = run_rule if which == "auto" or (which == "best" and run_rule.startswith("best_")) else which
    name = BEST if rule.startswith("best") else CHECKPOINT
    if which == "auto" and not (path / name).is_file() and (path / MODEL).is_file():
        return path / MODEL, "given file"
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


def _case_spacing(layout: Layout, case_id: str, spacing: Spacing) -> tuple[float, ...] | None:
    """The voxel size a case's distances are measured with (None: voxels)."""
    if spacing == VOXELS:
        return None
    return spacing if spacing is not None else layout.voxel_spacing(case_id)  # type: ignore[return-value]


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


def check_options(which: str = "auto", empty_policy: str | None = None) -> None:
    """The values of `--checkpoint` and `--empty-policy`, before any file is looked at."""
    if which not in ("auto", "last", "best"):
        raise ConfigError(f"--checkpoint {which!r}: use auto (the run's rule), last or best")
    if empty_policy is not None:
        _checked_policy(empty_policy)


def _checked_policy(empty_policy: str) -> str:
    if empty_policy not in EMPTY_POLICIES:
        raise ConfigError(f"--empty-policy {empty_policy!r}: use one of {', '.join(EMPTY_POLICIES)}")
    return empty_policy


def _units(layout: Layout, ids: list[str], spacing: Spacing) -> str:
    """The distance unit of the card, stated with where the spacing came from."""
    if isinstance(spacing, tuple):
        return f"mm (voxel spacing {'x'.join(f'{v:g}' for v in spacing)} given with --spacing)"
    known = spacing is None and ids and layout.voxel_spacing(ids[0]) is not None
    if known:
        return "mm (each case's voxel spacing, from the dataset's geometry; --voxels for voxels)"
    why = "asked with --voxels" if spacing == VOXELS else f"the {layout.name} files record no spacing"
    return f"voxels (spacing 1 on every axis, as the papers' protocol reports them; {why})"


def _metric_card(empty_policy: str, units: str) -> dict[str, Any]:
    return {"definitions": {m: METRIC_DEFINITIONS[m] for m in METRICS}, "units": units,
            "empty_policy": empty_policy,
            "empty_policy_meaning": {"legacy_zero": "empty prediction scores 0 on all four metrics and is "
                                     "averaged in (the papers' convention; rewards misses on HD95/ASD)",
                                     "nan": "distances NaN for empty masks, excluded from the mean",
                                     "penalty": "distances set to the image diagonal for empty masks"}[empty_policy]}


def _case_line(row: dict[str, Any]) -> str:
    return "  ".join(f"{m} {row[m]:.4f}" for m in METRICS)


@contextmanager
def _locked_output(out: Path, command: str) -> Iterator[None]:
    """The output folder, checked writable and locked before any work: one writer per folder (and no empty
    folder left behind when the evaluation is refused)."""
    with writable_output(Path(out)), FolderLock(Path(out), command):
        yield


def evaluate_checkpoint(checkpoint: Path, out: Path, data: str | None = None, split: str = "test",
                        which: str = "auto", post_lcc: bool | None = None, empty_policy: str | None = None,
                        device: str = "auto", save_predictions: bool = False, spacing: Spacing = None,
                        progress: bool = False, cpu_bf16: bool | None = None,
                        fold_bn: bool | None = None) -> dict[str, Any]:
    """Score the model of a run folder, checkpoint or model file on a split into `out` (cases.csv, summary.json,
    optionally predictions/); `progress` prints each case with its metrics as it finishes; `cpu_bf16` and
    `fold_bn` (None: the run's own setting) choose the faster approximate inference paths, stated on the card.

    Only the inference network is loaded (`model_file.load_model`), and each volume's arrays are freed before the
    next one is read, so the peak memory is one network, one volume and its windows.
    """
    ckpt_path, rule = resolve_checkpoint(checkpoint, which)  # a missing source is reported before `out` is made
    with _locked_output(out, "semiseg evaluate"):
        dev = resolve_device(device)
        model = load_model(ckpt_path, rule, dev)
        cfg, record = model.config, model.record
        best = model.best
        checkpoint_card = {"path": str(Path(model.source).resolve()), "iteration": model.iteration,
                           "of": cfg.iterations, "rule": model.rule, "how_chosen": CHECKPOINT_RULES[model.rule],
                           "run_selection_rule": cfg.checkpoint_selection,
                           "best_val": best if best.get("iteration") else None,
                           "complete": model.iteration >= cfg.iterations,
                           **({"exported_from": model.exported_from} if model.exported_from else {})}
        training = {"iterations": cfg.iterations,
                    "extensions": [{**ext, "note": extension_line(ext)} for ext in record.get("history") or []]}
        layout = locate_dataset(cfg.data, data, cfg.layout)
        return _evaluate_network(model.net, model.spec, model.evaluated_output, cfg, layout,
                                 model.protocol_for(dev, post_lcc, cpu_bf16, fold_bn), checkpoint_card, out, split,
                                 empty_policy, dev,
                                 save_predictions, spacing, progress,
                                 trained_on=(record.get("dataset") or {}).get("fingerprint"), training=training,
                                 window_source=(record.get("plan") or {}).get(
                                     "source", "not recorded (a run of an earlier semiseg)"))


def evaluate_official_checkpoint(file: Path, cfg: TrainConfig, out: Path, split: str = "test",
                                 post_lcc: bool | None = None, empty_policy: str | None = None,
                                 device: str = "auto", save_predictions: bool = False, spacing: Spacing = None,
                                 progress: bool = False) -> dict[str, Any]:
    """Score a checkpoint saved by the authors' training script (`semiseg.official` maps its keys) under
    semiseg's protocol; `cfg` gives the method, the dataset and the inference settings."""
    from ..official import load_official_checkpoint, official_file, official_layout

    official_file(file)  # a missing file is reported before the output folder is made
    with _locked_output(out, "semiseg evaluate --official-checkpoint"):
        layout = open_dataset(cfg.data, cfg.layout)
        probe = layout.read(layout.split(cfg.labeled, cfg.val).labeled[0])
        spec = NetSpec(probe.image.shape[0], layout.num_classes, layout.spatial_dims, cfg.n_filters, cfg.norm,
                       cfg.dropout)
        official = official_layout(cfg.method, spec.spatial_dims)  # a clear error before the network is built
        dev = resolve_device(device)
        method = build_method(cfg, spec, torch.device("cpu"))
        load_official_checkpoint(file, method)
        checkpoint_card = {"path": str(Path(file).resolve()), "iteration": None, "of": None, "rule": "official",
                           "how_chosen": f"an official checkpoint of {official.repo} ({official.network}), keys "
                                         "mapped by semiseg.official; its selection rule is the official script's",
                           "run_selection_rule": None, "best_val": None, "complete": None}
        method = method.to(dev).eval()
        if post_lcc is not None:
            cfg.post_lcc = post_lcc
        return _evaluate_network(method.inference_network(), spec, method.evaluated_output(), cfg, layout,
                                 inference_protocol(cfg, layout), checkpoint_card, out, split, empty_policy, dev,
                                 save_predictions, spacing, progress, window_source="given with the command")


def _evaluate_network(net: torch.nn.Module, spec: NetSpec, evaluated_output: str, cfg: TrainConfig, layout: Layout,
                      protocol: InferenceProtocol, checkpoint_card: dict[str, Any], out: Path, split: str,
                      empty_policy: str | None, dev: torch.device, save_predictions: bool, spacing: Spacing,
                      progress: bool, trained_on: str | None = None, training: dict[str, Any] | None = None,
                      window_source: str | None = None) -> dict[str, Any]:
    """The evaluation loop shared by semiseg runs, model files and official checkpoints: predict, score, write
    the card."""
    policy = _checked_policy(empty_policy or cfg.empty_policy)
    fingerprint = dataset_fingerprint(layout)
    ids = _split_ids(layout, cfg, split)
    rows = []
    shown = CaseProgress("evaluate", len(ids), progress)
    try:
        for case_id in ids:
            case = layout.read_eval(case_id)
            if case.image.shape[0] != spec.in_channels:
                raise DataError(f"{case.path}: image has {case.image.shape[0]} channels, the model expects "
                                f"{spec.in_channels}; evaluate on the dataset the model was trained for")
            pred = predict_volume(net, case.image, protocol, dev)
            if save_predictions:
                layout.write_prediction(out / "predictions", case_id, pred)
            rows.append({"case": case_id, **_class_metrics(pred, case.label, layout.num_classes, policy,
                                                           _case_spacing(layout, case_id, spacing), case_id)})
            shown.step(case_id, _case_line(rows[-1]))
            del case, pred  # before the next volume is read
    finally:
        shown.close()
    train_split = layout.split(cfg.labeled, cfg.val)
    card = {
        "dataset": {"layout": layout.name, "root": str(Path(layout.root).resolve()), "split": split,
                    "case_ids": ids, "class_names": list(layout.class_names), "fingerprint": fingerprint,
                    "training_data": cfg.data,
                    "same_as_training": None if trained_on is None else fingerprint == trained_on,
                    "labeled_ids": train_split.labeled, "n_unlabeled": len(train_split.unlabeled),
                    "val_ids": train_split.val, "val_source": train_split.val_source},
        "inference": {**vars(protocol), "evaluated_output": f"{cfg.method}: {evaluated_output}",
                      "window_source": window_source},
        "metrics": _metric_card(policy, _units(layout, ids, spacing)),
        "training": training or {"iterations": None, "extensions": []},
        "checkpoint": checkpoint_card,
        "method": cfg.method, "preset": cfg.preset, "seed": cfg.seed, "code_version": code_version(),
    }
    return write_report(out, rows, card)


def evaluate_predictions(pred_dir: Path, data: str, out: Path, split: str = "test",
                         empty_policy: str = "legacy_zero", spacing: Spacing = None,
                         progress: bool = False) -> dict[str, Any]:
    """Score existing label maps against the dataset's labels (like nnU-Net's evaluate_folder).

    Label maps in a prepared dataset's own format and scanner geometry (what `evaluate --save-predictions` and
    `predict` write) go through the dataset's preprocessing onto the grid its labels are scored on."""
    _checked_policy(empty_policy)
    if not Path(pred_dir).is_dir():
        raise DataError(f"{pred_dir}: prediction folder not found; pass --pred with a folder of label maps named "
                        "by case id (<id>.h5, <id>.nii.gz or <id>.nii)")
    with _locked_output(out, "semiseg evaluate --pred"):
        return _evaluate_predictions(pred_dir, data, out, split, empty_policy, spacing, progress)


def _evaluate_predictions(pred_dir: Path, data: str, out: Path, split: str, empty_policy: str, spacing: Spacing,
                          progress: bool) -> dict[str, Any]:
    layout = open_dataset(data)
    ids = _split_ids(layout, None, split)
    rows = []
    shown = CaseProgress("evaluate", len(ids), progress)
    try:
        for case_id in ids:
            case = layout.read_eval(case_id)
            pred = layout.read_prediction(Path(pred_dir), case_id)
            if pred.shape != case.label.shape:
                raise DataError(f"{pred_dir}/{case_id}: prediction shape {pred.shape} differs from the label's "
                                f"{case.label.shape}")
            rows.append({"case": case_id, **_class_metrics(pred, case.label, layout.num_classes, empty_policy,
                                                           _case_spacing(layout, case_id, spacing), case_id)})
            shown.step(case_id, _case_line(rows[-1]))
    finally:
        shown.close()
    card = {"dataset": {"layout": layout.name, "root": str(Path(layout.root).resolve()), "split": split,
                        "case_ids": ids, "class_names": list(layout.class_names),
                        "fingerprint": dataset_fingerprint(layout)},
            "predictions": str(Path(pred_dir).resolve()),
            "metrics": _metric_card(empty_policy, _units(layout, ids, spacing)),
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
        which = f"official checkpoint {ckpt['path']}" if ckpt["rule"] == "official" else \
            f"checkpoint iteration {ckpt['iteration']}/{ckpt['of']} (rule: {ckpt['rule']})"
        yield f"model    {card['method']}, {len(data['labeled_ids'])} labelled, seed {card['seed']}; {which}"
        sizes = "x".join(map(str, inf["patch_size"]))
        window = f"{inf['mode']} {sizes}, stride {'x'.join(map(str, inf['stride']))}"
        yield f"infer    {window}, mean softmax, argmax, largest component {'on' if inf['post_lcc'] else 'off'}"
        if inf.get("window_source"):
            yield f"window   {inf['window_source']}"
        for ext in card.get("training", {}).get("extensions", []):
            yield f"run      {ext['note']}"
        if data.get("same_as_training") is False:
            yield f"note     not the dataset the run was trained on ({data['training_data']}): fingerprints differ"
    else:
        yield f"preds    {card['predictions']}"
    yield f"metrics  medpy-compatible (pooled HD95, directed ASD), {metrics['units']}, empty policy " \
          f"{metrics['empty_policy']}; code {card['code_version']}"
