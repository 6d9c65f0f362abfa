"""A run as something to look at: training curves, per-case overlays and one static HTML page.

Reads what training and evaluation wrote (`metrics.jsonl`, `config.yaml`, `eval-SPLIT/summary.json`
and the label maps of `semiseg evaluate --save-predictions`) and writes `RUN/report/`: `curves.png`,
`cases/<id>.png` (representative slices with the ground truth outlined and the prediction filled)
and `index.html`, which references the images relatively so the folder can be copied anywhere.
"""

from __future__ import annotations

import html
import json
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any
from urllib.parse import quote

import numpy as np

from .errors import DataError

# Dice and Jaccard as fractions in [0, 1] with four decimals, as `semiseg evaluate` prints them and summary.json
# holds them (one convention for the CLI and the report); distances in the card's unit.
METRIC_COLUMNS = (("dice", "Dice", 4), ("jaccard", "Jaccard", 4), ("hd95", "95HD (vox)", 2), ("asd", "ASD (vox)", 2))
PALETTE = ("#e6194b", "#3cb44b", "#4363d8", "#f58231", "#911eb4", "#42d4f4", "#f032e6", "#bfef45")


@dataclass
class Report:
    """What was written, and what could not be (with the command that would add it)."""

    index: Path
    images: list[Path] = field(default_factory=list)
    notes: list[str] = field(default_factory=list)


def read_metrics(path: Path) -> list[dict[str, float]]:
    """The training log, one JSON record per line (loss records and validation records).

    A resumed run logs again from its checkpoint's iteration on: those records replace the ones the
    interrupted run had logged past the checkpoint, so the curves show one line, not a zig-zag.
    """
    if not path.is_file():
        return []
    streams: dict[bool, list[dict[str, float]]] = {False: [], True: []}  # loss records, validation records
    for line in path.read_text(errors="replace").splitlines():
        try:
            record = json.loads(line) if line.strip() else None
        except ValueError:
            continue  # a line torn by a run killed mid-write
        if isinstance(record, dict) and isinstance(record.get("iteration"), int | float) and all(
                isinstance(v, int | float) for k, v in record.items() if k.startswith(("loss", "lr", "val_dice"))):
            stream = streams["val_dice" in record]
            while stream and stream[-1]["iteration"] >= record["iteration"]:
                stream.pop()
            stream.append(record)
    return streams[False] + streams[True]


def plot_curves(records: list[dict[str, float]], path: Path) -> Path:
    """Losses (log scale), learning rate and validation Dice against the iteration."""
    from matplotlib.figure import Figure

    loss_keys = sorted({k for r in records for k in r if k.startswith("loss")})
    panels = [("loss", loss_keys), ("learning rate", ["lr"])]
    if any("val_dice" in r for r in records):
        panels.append(("validation Dice", ["val_dice"]))
    fig = Figure(figsize=(4.2 * len(panels), 3.4), dpi=100, layout="constrained")
    for ax, (title, keys) in zip(fig.subplots(1, len(panels), squeeze=False)[0], panels, strict=True):
        for key in keys:
            points = [(r["iteration"], r[key]) for r in records if key in r]
            if points:
                xs, ys = zip(*points, strict=True)
                ax.plot(xs, ys, label=key, marker="o" if len(points) < 30 else None, markersize=3)
        if title == "loss" and all(r[k] > 0 for r in records for k in keys if k in r):
            ax.set_yscale("log")
        ax.set_title(title)
        ax.set_xlabel("iteration")
        ax.grid(alpha=0.3)
        if len(keys) > 1:
            ax.legend(fontsize=7)
    path.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(path)
    return path


def representative_slices(label: np.ndarray, pred: np.ndarray, count: int = 3) -> tuple[int, list[int]]:
    """(axis, indices): across the thinnest axis, slices at 20 / 50 / 80 % of the foreground's extent."""
    axis = int(np.argmin(label.shape[::-1]))
    axis = label.ndim - 1 - axis  # ties go to the last axis (the axial one for LA and RAS volumes)
    others = tuple(a for a in range(label.ndim) if a != axis)
    present = np.flatnonzero(np.any((label > 0) | (pred > 0), axis=others))
    if present.size == 0:
        present = np.arange(label.shape[axis])
    picks = [int(present[round(q * (present.size - 1))]) for q in np.linspace(0.2, 0.8, count)]
    return axis, sorted(set(picks))


def _dice(a: np.ndarray, b: np.ndarray) -> float:
    total = a.sum() + b.sum()
    return float(2 * (a & b).sum() / total) if total else float("nan")


def plot_overlay(image: np.ndarray, label: np.ndarray, pred: np.ndarray, class_names: tuple[str, ...],
                 title: str, path: Path) -> Path:
    """Representative slices: image in grey, prediction filled, ground truth outlined, per class."""
    from matplotlib.colors import to_rgba
    from matplotlib.figure import Figure
    from matplotlib.lines import Line2D
    from matplotlib.patches import Patch

    axis, picks = representative_slices(label, pred)
    low, high = np.percentile(image, [1, 99])
    fig = Figure(figsize=(3.3 * len(picks), 3.8), dpi=100, layout="constrained")
    classes = range(1, max(len(class_names), int(max(label.max(), pred.max())) + 1))
    for ax, index in zip(fig.subplots(1, len(picks), squeeze=False)[0], picks, strict=True):
        img, gt, pr = (np.take(a, index, axis=axis).T for a in (image, label, pred))
        ax.imshow(img, cmap="gray", vmin=low, vmax=high, origin="lower", interpolation="nearest")
        fill = np.zeros((*pr.shape, 4))
        for c in classes:
            fill[pr == c] = to_rgba(PALETTE[(c - 1) % len(PALETTE)], 0.4)
            if (gt == c).any():
                ax.contour(gt == c, levels=[0.5], colors=[PALETTE[(c - 1) % len(PALETTE)]], linewidths=1.3,
                           origin="lower")
        ax.imshow(fill, origin="lower", interpolation="nearest")
        ax.set_title(f"slice {index} (axis {axis}), Dice {_dice(gt > 0, pr > 0):.2f}", fontsize=9)
        ax.set_xticks([])
        ax.set_yticks([])
    handles = [Line2D([], [], color="white", lw=0, label="ground truth: outline, prediction: fill")]
    handles += [Patch(color=PALETTE[(c - 1) % len(PALETTE)],
                      label=class_names[c] if c < len(class_names) else f"class {c}") for c in classes]
    fig.legend(handles=handles, loc="outside lower center", ncols=len(handles), fontsize=8, frameon=False)
    fig.suptitle(title, fontsize=10)
    path.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(path)
    return path


def _cell(value: Any, decimals: int) -> str:
    if not isinstance(value, (int, float)) or not np.isfinite(value):
        return "–"
    return f"{float(value):.{decimals}f}"


def _img(src: str, alt: str) -> str:
    return f'<img src="{html.escape(quote(src))}" alt="{html.escape(alt)}">'


def _column_title(key: str, class_names: tuple[str, ...]) -> str:
    """`dice_class2` -> `Dice myocardium`, `hd95_class2` -> `95HD myocardium (vox)`: per-class columns."""
    metric, _, c = key.partition("_class")
    title = next((h for k, h, _ in METRIC_COLUMNS if k == metric), None)
    if title is None or not c.isdigit():
        return key
    name = class_names[int(c)] if int(c) < len(class_names) else f"class {c}"
    head, _, unit = title.partition(" (")
    return f"{head} {name}" + (f" ({unit}" if unit else "")


def _with_units(unit: str) -> Callable[[str], str]:
    """HTML-escape, naming the distance unit of the evaluation (voxels, or mm with `evaluate --spacing`)."""
    return lambda text: html.escape(text.replace("(vox)", f"({unit})"))


def render_html(title: str, facts: dict[str, Any], summary: dict[str, Any] | None, curves: str | None,
                overlays: dict[str, str], notes: list[str], class_names: tuple[str, ...] = ()) -> str:
    """One self-contained static page (no script); images are referenced relatively."""
    e = html.escape
    parts = [f"<!DOCTYPE html><html lang='en'><head><meta charset='utf-8'><title>{e(title)}</title>", """<style>
body{font-family:system-ui,sans-serif;margin:2em auto;max-width:1200px;padding:0 1em;color:#222}
table{border-collapse:collapse;margin:1em 0}td,th{border:1px solid #ccc;padding:.3em .6em;text-align:right}
th{background:#f3f3f3}td:first-child,th:first-child{text-align:left}img{max-width:100%}
.scroll{overflow-x:auto}figure{margin:1.5em 0}
figcaption{color:#555}.notes{background:#fff8e1;padding:.5em 1em;border-left:4px solid #fb0}
</style></head><body>""", f"<h1>{e(title)}</h1>"]
    if notes:
        parts.append("<div class='notes'><ul>" + "".join(f"<li>{e(n)}</li>" for n in notes) + "</ul></div>")
    parts.append("<table class='facts'><tbody>" + "".join(
        f"<tr><th>{e(k)}</th><td>{e(str(v))}</td></tr>" for k, v in facts.items()) + "</tbody></table>")
    if curves:
        parts.append(f"<h2>Training curves</h2><figure>{_img(curves, 'training curves')}</figure>")
    if summary is not None:
        stats = summary["metrics"]
        units = str(summary.get("protocol", {}).get("metrics", {}).get("units", ""))
        eu = _with_units("mm" if units.startswith("mm") else "vox")
        parts.append("<h2>Test metrics</h2><table class='summary'><thead><tr>" + "".join(
            f"<th>{eu(h)}</th>" for _, h, _ in METRIC_COLUMNS) + "</tr></thead><tbody><tr>" + "".join(
            f"<td>{_cell(stats[k].get('mean'), s)} ± {_cell(stats[k].get('std'), s)}</td>"
            for k, _, s in METRIC_COLUMNS) + "</tr></tbody></table>")
        extra = [k for k in summary["cases"][0] if k not in {"case", *(c for c, _, _ in METRIC_COLUMNS)}]
        head = "".join(f"<th>{eu(h)}</th>" for _, h, _ in METRIC_COLUMNS) + "".join(
            f"<th>{eu(_column_title(k, class_names))}</th>" for k in extra)
        rows = []
        for row in summary["cases"]:
            case = str(row.get("case"))
            name = f"<a href='#case-{e(case)}'>{e(case)}</a>" if case in overlays else e(case)
            rows.append(f"<tr><td>{name}</td>" + "".join(f"<td>{_cell(row.get(k), s)}</td>"
                                                         for k, _, s in METRIC_COLUMNS)
                        + "".join(f"<td>{_cell(row.get(k), 4 if k.startswith(('dice', 'jaccard')) else 2)}</td>"
                                  for k in extra) + "</tr>")
        parts.append(f"<h2>Per case</h2><div class='scroll'><table class='cases'><thead><tr><th>Case</th>{head}"
                     f"</tr></thead><tbody>{''.join(rows)}</tbody></table></div>")
    if overlays:
        parts.append("<h2>Overlays</h2>")
        parts += [f"<figure id='case-{e(case)}'>{_img(src, f'overlay of case {case}')}<figcaption>{e(case)}"
                  "</figcaption></figure>" for case, src in overlays.items()]
    parts.append("</body></html>")
    return "\n".join(parts)


def read_summary(path: Path) -> dict[str, Any]:
    """`summary.json` of `semiseg evaluate`, checked: a damaged or foreign file is a `DataError`, not a crash."""
    try:
        summary = json.loads(path.read_text())
    except (OSError, UnicodeDecodeError, json.JSONDecodeError) as exc:
        raise DataError(f"{path}: unreadable ({exc}); run `semiseg evaluate` again") from None
    metric_keys = [k for k, _, _ in METRIC_COLUMNS]
    ok = (isinstance(summary, dict) and isinstance(summary.get("metrics"), dict)
          and all(isinstance(summary["metrics"].get(k), dict) for k in metric_keys)
          and isinstance(summary.get("cases"), list) and summary["cases"]
          and all(isinstance(row, dict) and all(isinstance(row.get(k), (int, float, type(None))) for k in metric_keys)
                  for row in summary["cases"])
          and isinstance(summary.get("protocol", {}), dict))
    if not ok:
        raise DataError(f"{path}: not a summary written by `semiseg evaluate` (it needs metrics, cases and "
                        "protocol); run `semiseg evaluate` again")
    return summary


def write_report(run: Path, out: Path | None = None, data: str | None = None, split: str = "test") -> Report:
    """Build `RUN/report/` (or `out`) from what the run folder holds; missing parts become notes."""
    from .config import load_yaml
    from .data import locate_dataset
    from .data.layouts.base import check_case_id
    from .engine.checkpoint import check_writable

    run = Path(run)
    if not (run / "config.yaml").is_file():
        raise DataError(f"{run}: not a run folder (no config.yaml); give the --out folder of `semiseg train`")
    out = Path(out) if out is not None else run / "report"
    check_writable(out)  # before any work
    cfg = load_yaml(run / "config.yaml")
    report = Report(out / "index.html")
    records = read_metrics(run / "metrics.jsonl")
    curves = None
    if records:
        report.images.append(plot_curves(records, out / "curves.png"))
        curves = "curves.png"
    else:
        report.notes.append(f"no training log ({run / 'metrics.jsonl'}); curves need a run that logged")
    eval_dir = run / f"eval-{split}"
    summary = read_summary(eval_dir / "summary.json") if (eval_dir / "summary.json").is_file() else None
    overlays: dict[str, str] = {}
    protocol = (summary or {}).get("protocol", {})
    class_names = tuple(protocol.get("dataset", {}).get("class_names", ()))
    if summary is None:
        report.notes.append(f"no evaluation yet: run `semiseg evaluate {run} --split {split} --save-predictions` "
                            "for the metrics table and the overlays")
    elif not (eval_dir / "predictions").is_dir():
        report.notes.append(f"no saved predictions in {eval_dir}: run `semiseg evaluate {run} --split {split} "
                            "--save-predictions` for the overlays")
    else:
        layout = locate_dataset(cfg.get("data", "synthetic"), data, cfg.get("layout", "auto"))
        class_names = tuple(layout.class_names)
        for index, row in enumerate(summary["cases"]):
            case_id = check_case_id(row.get("case"), f"{eval_dir / 'summary.json'}: cases[{index}]")
            case = layout.read_eval(case_id)
            pred = layout.read_prediction(eval_dir / "predictions", case_id)
            title = f"{case_id}: Dice {_cell(row.get('dice'), 4)}"
            report.images.append(plot_overlay(case.image[0], case.label, pred, class_names, title,
                                              out / "cases" / f"{case_id}.png"))
            overlays[case_id] = f"cases/{case_id}.png"
    checkpoint = protocol.get("checkpoint", {})
    inference = protocol.get("inference", {})
    facts = {"method": cfg.get("method"), "preset": cfg.get("preset") or "–", "data": data or cfg.get("data"),
             "labelled cases": cfg.get("labeled"), "iterations": cfg.get("iterations"), "seed": cfg.get("seed")}
    if checkpoint:
        facts["evaluated checkpoint"] = f"iteration {checkpoint.get('iteration')} ({checkpoint.get('rule')})"
        facts["sliding window"] = f"patch {inference.get('patch_size')}, stride {inference.get('stride')}"
        facts["largest component"] = inference.get("post_lcc")
        facts["empty policy"] = protocol.get("metrics", {}).get("empty_policy")
        facts["distances"] = protocol.get("metrics", {}).get("units")
        facts["code version"] = protocol.get("code_version")
    title = f"semiseg report: {run.resolve().name}"
    out.mkdir(parents=True, exist_ok=True)
    report.index.write_text(render_html(title, facts, summary, curves, overlays, report.notes, class_names))
    return report
