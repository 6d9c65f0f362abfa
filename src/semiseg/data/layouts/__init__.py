"""On-disk dataset layouts, registered by name and detected from the folder contents.

A layout knows where each case lives, which cases form the official train / val / test lists and
how many labelled items "N labelled" means (first N of the train list for LA). A new layout is one
module in this package that defines a `Layout` subclass decorated with `register_layout`.
"""

from __future__ import annotations

import importlib
import pkgutil
from pathlib import Path

from ...errors import DataError
from .base import Layout, Split

LAYOUTS: dict[str, type[Layout]] = {}


def register_layout(cls: type[Layout]) -> type[Layout]:
    LAYOUTS[cls.name] = cls
    return cls


def open_layout(root: Path, name: str = "auto") -> Layout:
    """Open `root` as the named layout, or the first registered layout whose files are found there."""
    _discover()
    root = Path(root).expanduser()
    if not root.exists():
        raise DataError(f"{root}: data folder not found; pass --data with an existing dataset folder "
                        "or --data synthetic")
    if name != "auto":
        if name not in LAYOUTS:
            raise DataError(f"unknown dataset layout {name!r}; known: {', '.join(sorted(LAYOUTS))}")
        return LAYOUTS[name](root)
    for cls in LAYOUTS.values():
        if cls.detect(root):
            return cls(root)
    expected = "; ".join(f"{c.name}: {c.signature}" for c in LAYOUTS.values())
    raise DataError(f"{root}: no known dataset layout found (expected one of: {expected})")


def _discover() -> None:
    for info in pkgutil.iter_modules(__path__):
        if info.name != "base":
            importlib.import_module(f"{__name__}.{info.name}")


__all__ = ["LAYOUTS", "Layout", "Split", "open_layout", "register_layout"]
