"""Pancreas-CT in the MC-Net layout: `Pancreas_h5/<ID>_norm.h5`, `train.list` (62) and `test.list` (20).

Volumes are (W, H, D) like LA, resampled to 1 mm; there is no validation list (protocol.md section 3).
"""

from __future__ import annotations

from pathlib import Path

from . import register_layout
from .base import Layout, Window, read_list

CASES_DIR = "Pancreas_h5"


@register_layout
class PancreasLayout(Layout):
    name = "pancreas"
    signature = f"'{CASES_DIR}/<ID>_norm.h5' with train.list and test.list"

    @classmethod
    def detect(cls, root: Path) -> bool:
        return (root / CASES_DIR).is_dir() and (root / "train.list").is_file()

    def load_lists(self) -> tuple[list[str], list[str], list[str]]:
        return read_list(self.root / "train.list"), read_list(self.root / "test.list"), []

    def case_path(self, case_id: str) -> Path:
        return self.root / CASES_DIR / f"{case_id}_norm.h5"

    def default_window(self) -> Window:
        return (96, 96, 96), (16, 16, 16), "the Pancreas-CT protocol's window"
