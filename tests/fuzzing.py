"""A session-wide count of the inputs the property-based tests tried (printed at the end of the run)."""

from __future__ import annotations

from collections import Counter

TRIED: Counter[str] = Counter()


def tried(kind: str) -> None:
    TRIED[kind] += 1
