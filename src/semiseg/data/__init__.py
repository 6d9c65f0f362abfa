"""Datasets: layouts on disk, splits, augmentation and two-stream batches."""

from __future__ import annotations

import hashlib
import json
from pathlib import Path

from ..errors import DataError
from .h5 import Case
from .layouts import Layout, Split, open_layout


def open_dataset(data: str | Path, layout: str = "auto") -> Layout:
    """`data` is a dataset folder or `synthetic[:options]` (generated once into the cache)."""
    text = str(data)
    if text == "synthetic" or text.startswith("synthetic:"):
        from .synthetic import resolve

        return open_layout(resolve(text), "la")
    return open_layout(Path(text), layout)


def is_synthetic(data: str) -> bool:
    return data == "synthetic" or data.startswith("synthetic:")


def absolute_data(data: str) -> str:
    """A dataset folder as an absolute, resolved path (a run then works from any folder); synthetic specs as given."""
    return data if is_synthetic(data) else str(Path(data).expanduser().resolve())


def dataset_fingerprint(layout: Layout) -> str:
    """What identifies a dataset wherever it lies: its layout, classes, case lists and the size of every case file.

    Cheap (no file is read) and independent of the folder's path, so a moved or copied dataset is recognised.
    """
    ids = sorted(set(layout.train_ids) | set(layout.test_ids) | set(layout.val_ids))
    sizes = [layout.case_path(i).stat().st_size if layout.case_path(i).is_file() else -1 for i in ids]
    text = json.dumps([layout.name, list(layout.class_names), layout.train_ids, layout.test_ids, layout.val_ids,
                       sizes])
    return hashlib.sha256(text.encode()).hexdigest()[:16]


def locate_dataset(saved: str, given: str | None = None, layout: str = "auto") -> Layout:
    """The dataset a run was trained on (`saved`, as stored in its config), or `given` with `--data`."""
    if given is None and not is_synthetic(saved) and not Path(saved).expanduser().exists():
        raise DataError(f"{saved}: the run's dataset is not found (moved, or the run was copied to another "
                        "machine); pass --data with its new place (it is recognised by its fingerprint)")
    return open_dataset(given or saved, layout)


def load_cases(layout: Layout, ids: list[str], with_label: bool) -> list[Case]:
    """Read training items into memory once; workers share them copy-on-write."""
    return [layout.read(case_id, with_label=with_label) for case_id in ids]


__all__ = ["Case", "Layout", "Split", "absolute_data", "dataset_fingerprint", "is_synthetic", "load_cases",
           "locate_dataset", "open_dataset", "open_layout"]
