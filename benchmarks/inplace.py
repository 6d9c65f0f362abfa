"""Pieces shared by the scripts that run an official training script in place (`official_step_*.py`,
`ssl4mis_inplace.py`): a temporary attribute patch and forgetting an official repository's packages, since
every repository has its own `networks`, `utils`, `dataloaders` that must not leak into the next one."""

from __future__ import annotations

import contextlib
import sys
from collections.abc import Iterable, Iterator
from typing import Any


@contextlib.contextmanager
def patched(obj: Any, name: str, value: Any) -> Iterator[None]:
    """`obj.name = value` for the duration of the block, restored whatever happens."""
    old = getattr(obj, name)
    setattr(obj, name, value)
    try:
        yield
    finally:
        setattr(obj, name, old)


def purge_modules(packages: Iterable[str]) -> None:
    """Drop every imported module whose top-level package is one of `packages`."""
    tops = set(packages)
    for name in list(sys.modules):
        if name.split(".")[0] in tops:
            del sys.modules[name]
