"""Progress on stderr: a rich bar on a terminal, one plain line per record elsewhere (logs, CI, `nohup`).

Training shows loss, learning rate, s/iteration, the validation Dice when it is computed and an ETA computed
from this call's own training time (validation left out), so it is meaningful from the first logged iterations.
Evaluation and prediction show one step per case with the case's metrics.
"""

from __future__ import annotations

import sys
import time
from typing import Any


def _minutes(seconds: float) -> str:
    if seconds < 90:
        return f"{seconds:.0f} s"
    return f"{seconds / 60:.1f} min" if seconds < 5400 else f"{seconds / 3600:.1f} h"


def _bar(label: str, total: int, completed: int) -> tuple[Any, Any]:
    from rich.progress import BarColumn, MofNCompleteColumn, TextColumn
    from rich.progress import Progress as RichProgress

    bar = RichProgress(TextColumn(label), BarColumn(), MofNCompleteColumn(), TextColumn("{task.fields[info]}"),
                       console=_console(), transient=False)
    task = bar.add_task(label, total=total, completed=completed, info="")
    bar.start()
    return bar, task


def _console() -> Any:
    from rich.console import Console

    return Console(file=sys.stderr)


class Progress:
    """Training progress, updated only when the trainer logs or validates (never a device sync of its own)."""

    def __init__(self, start: int, total: int, enabled: bool = True) -> None:
        self.start, self.total, self.enabled = start, total, enabled
        self.t0 = time.perf_counter()
        self.excluded = 0.0  # seconds spent validating, left out of the ETA
        self.val = ""
        self.bar = self.task = None
        if enabled and sys.stderr.isatty():
            self.bar, self.task = _bar("train", total, start)

    def eta(self, iteration: int) -> float:
        """Seconds left at this call's mean training time per iteration."""
        done = max(iteration - self.start, 1)
        return (time.perf_counter() - self.t0 - self.excluded) / done * (self.total - iteration)

    def update(self, iteration: int, record: dict[str, float]) -> None:
        if not self.enabled:
            return
        info = (f"loss {record['loss']:.4f}  lr {record['lr']:.2e}  {record['s_per_it']:.3f} s/it{self.val}  "
                f"ETA {_minutes(self.eta(iteration))}")
        self._show(iteration, info)

    def validated(self, iteration: int, dice: float, best: dict[str, Any], seconds: float) -> None:
        """A validation result: shown at once, and kept beside the loss until the next one."""
        self.excluded += seconds
        if not self.enabled:
            return
        self.val = f"  val Dice {dice:.4f} (best {best['dice']:.4f} at {best['iteration']})"
        self._show(iteration, f"validation Dice {dice:.4f} on the selection cases, best {best['dice']:.4f} at "
                   f"iteration {best['iteration']} ({seconds:.1f} s)")

    def _show(self, iteration: int, info: str) -> None:
        if self.bar is not None:
            self.bar.update(self.task, completed=iteration, info=info)
            return
        print(f"[{iteration}/{self.total}] {info}", file=sys.stderr, flush=True)

    def close(self) -> None:
        if self.bar is not None:
            self.bar.stop()


class CaseProgress:
    """Per-case progress of `evaluate` and `predict`: the case and its result as each one finishes."""

    def __init__(self, label: str, total: int, enabled: bool = True) -> None:
        self.label, self.total, self.enabled = label, total, enabled
        self.done = 0
        self.t0 = time.perf_counter()
        self.bar = self.task = None
        if enabled and total and sys.stderr.isatty():
            self.bar, self.task = _bar(label, total, 0)

    def step(self, case_id: str, result: str) -> None:
        self.done += 1
        if not self.enabled:
            return
        left = (time.perf_counter() - self.t0) / self.done * (self.total - self.done)
        info = f"{case_id}: {result}" + (f"  ETA {_minutes(left)}" if self.done < self.total else "")
        if self.bar is not None:
            self.bar.update(self.task, completed=self.done, info=info)
        else:
            print(f"{self.label} [{self.done}/{self.total}] {info}", file=sys.stderr, flush=True)

    def close(self) -> None:
        if self.bar is not None:
            self.bar.stop()
