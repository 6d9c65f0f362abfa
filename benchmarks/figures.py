"""Learning-curve figures for BENCHMARKS.md (matplotlib, written as PNG under benchmarks/results/figures/)."""

from __future__ import annotations

from pathlib import Path

import matplotlib

matplotlib.use("Agg")
import matplotlib.pyplot as plt  # noqa: E402
from common import REPO  # noqa: E402

FIGURES = REPO / "benchmarks" / "results" / "figures"


def validation_points(records: list[dict]) -> list[tuple[int, float, float]]:
    """(iteration, training wall seconds, validation Dice) of every validation record of a metrics log."""
    return [(int(r["iteration"]), float(r.get("wall_s", "nan")), float(r["val_dice"]))
            for r in records if "val_dice" in r]


def plot_validation_curves(curves: dict[str, list[dict]], path: Path, title: str) -> Path:
    """Validation Dice against iteration (left) and against training wall time (right), one line per run."""
    path.parent.mkdir(parents=True, exist_ok=True)
    fig, (by_it, by_time) = plt.subplots(1, 2, figsize=(12, 4.5), sharey=True)
    for label, records in sorted(curves.items()):
        points = validation_points(records)
        if not points:
            continue
        its, walls, dice = zip(*points)
        line, = by_it.plot(its, [100 * d for d in dice], marker=".", label=label)
        by_time.plot([w / 60 for w in walls], [100 * d for d in dice], marker=".", color=line.get_color())
    by_it.set_xlabel("iteration")
    by_time.set_xlabel("training wall time (min, validation excluded)")
    by_it.set_ylabel("validation Dice %")
    for ax in (by_it, by_time):
        ax.grid(alpha=0.3)
    by_it.legend(fontsize=7, ncol=2)
    fig.suptitle(title, fontsize=10)
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)
    return path


def plot_terms(series: dict[str, dict[str, list[tuple[int, float]]]], path: Path, title: str) -> Path:
    """One panel per logged term; `series[source][term]` is a list of (iteration, value)."""
    terms = list(next(iter(series.values())))
    path.parent.mkdir(parents=True, exist_ok=True)
    fig, axes = plt.subplots(1, len(terms), figsize=(4 * len(terms), 3.8))
    for ax, term in zip(axes, terms):
        for source, by_term in series.items():
            points = by_term.get(term, [])
            if points:
                its, values = zip(*points)
                ax.plot(its, values, lw=0.9, alpha=0.85, label=source)
        ax.set_title(term, fontsize=9)
        ax.set_xlabel("iteration")
        ax.grid(alpha=0.3)
    axes[0].legend(fontsize=7)
    fig.suptitle(title, fontsize=10)
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)
    return path
