"""LA 2018 in the UA-MT layout: `2018LA_Seg_Training Set/<ID>/mri_norm2.h5`, `train.list`, `test.list`."""

from __future__ import annotations

from pathlib import Path

from . import register_layout
from .base import Layout, read_list

CASES_DIR = "2018LA_Seg_Training Set"


@register_layout
class LALayout(Layout):
    name = "la"
    signature = f"'{CASES_DIR}/<ID>/mri_norm2.h5' with train.list and test.list"

    @classmethod
    def detect(cls, root: Path) -> bool:
        return (root / CASES_DIR).is_dir() and (root / "train.list").is_file()

    def load_lists(self) -> tuple[list[str], list[str], list[str]]:
        return read_list(self.root / "train.list"), read_list(self.root / "test.list"), []

    def case_path(self, case_id: str) -> Path:
        return self.root / CASES_DIR / case_id / "mri_norm2.h5"
