"""BraTS-2019 in the SSL4MIS layout: `data/<ID>.h5`, `train.txt` (250), `val.txt` (25), `test.txt` (60).

The preprocessed files hold the FLAIR image (1 channel, z-scored) and the whole-tumour label (0/1),
stored (D, H, W) in SimpleITK order; they are used in that order, as SSL4MIS crops, rotates and
slides its windows on the stored axes (the 96^3 patch is cubic). `val.txt` is the declared
validation list (protocol.md section 4).
"""

from __future__ import annotations

from pathlib import Path

from . import register_layout
from .base import Layout, Window, read_list

CASES_DIR = "data"


def _ids(path: Path) -> list[str]:
    """SSL4MIS keeps the text before the first comma of each line."""
    return [line.split(",")[0].strip() for line in read_list(path)]


@register_layout
class BraTSLayout(Layout):
    name = "brats"
    signature = f"'{CASES_DIR}/<ID>.h5' with train.txt, val.txt and test.txt"

    @classmethod
    def detect(cls, root: Path) -> bool:
        return (root / CASES_DIR).is_dir() and all((root / f).is_file() for f in ("train.txt", "val.txt"))

    def load_lists(self) -> tuple[list[str], list[str], list[str]]:
        return _ids(self.root / "train.txt"), _ids(self.root / "test.txt"), _ids(self.root / "val.txt")

    def case_path(self, case_id: str) -> Path:
        return self.root / CASES_DIR / f"{case_id}.h5"

    def default_window(self) -> Window:
        return (96, 96, 96), (64, 64, 64), "the BraTS-2019 protocol's window"
