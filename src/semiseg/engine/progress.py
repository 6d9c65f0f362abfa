"""Training progress: a rich progress bar (loss, s/it, ETA) on a terminal, plain log lines elsewhere."""

from __future__ import annotations

import sys
import time


class Progress:
    """Updated only when the trainer logs, so it never forces a device sync of its own."""

    def __init__(self, start: int, total: int, enabled: bool = True) -> None:
        self.start, self.total, self.enabled = start, total, enabled
        self.t0 = time.perf_counter()
        self.bar = None
        if enabled and sys.stderr.isatty():
            from rich.progress import BarColumn, MofNCompleteColumn, TextColumn, TimeRemainingColumn
            from rich.progress import Progress as RichProgress

            self.bar = RichProgress(TextColumn("train"), BarColumn(), MofNCompleteColumn(),
                                    TextColumn("{task.fields[info]}"), TimeRemainingColumn(), transient=False)
            self.task = self.bar.add_task("train", total=total, completed=start, info="")
            self.bar.start()

    def update(self, iteration: int, record: dict[str, float]) -> None:
        if not self.enabled:
            return
        info = f"loss {record['loss']:.4f}  lr {record['lr']:.2e}  {record['s_per_it']:.3f} s/it"
        if self.bar is not None:
            self.bar.update(self.task, completed=iteration, info=info)
            return
        done = max(iteration - self.start, 1)
        eta = (time.perf_counter() - self.t0) / done * (self.total - iteration)
        print(f"[{iteration}/{self.total}] {info}  ETA {eta / 60:.1f} min", file=sys.stderr, flush=True)

    def close(self) -> None:
        if self.bar is not None:
            self.bar.stop()
