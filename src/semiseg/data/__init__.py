"""Datasets: layouts on disk, splits, augmentation and two-stream batches."""

from __future__ import annotations

from pathlib import Path

from .h5 import Case
from .layouts import Layout, Split, open_layout


def open_dataset(data: str | Path, layout: str = "auto") -> Layout:
    """`data` is a dataset folder or `synthetic[:options]` (generated once into the cache)."""
    text = str(data)
    if text == "synthetic" or text.startswith("synthetic:"):
        from .synthetic import resolve

        return open_layout(resolve(text), "la")
    return open_layout(Path(text), layout)


def load_cases(layout: Layout, ids: list[str], with_label: bool) -> list[Case]:
    """Read training items into memory once; workers share them copy-on-write."""
    return [layout.read(case_id, with_label=with_label) for case_id in ids]


__all__ = ["Case", "Layout", "Split", "load_cases", "open_dataset", "open_layout"]
