"""Your own data in the nnU-Net raw layout, read from the cache that `semiseg data prepare` writes.

`--data` may name the raw folder (`dataset.json`, `imagesTr/`, ...; its cache is `semiseg-prepared/`
inside it) or the cache folder itself (`prepared.json`, for a cache written elsewhere with `--out`).
Labelled cases come first in the training list, then the unlabelled ones, so the usual "first N
labelled" rule holds; only cases that have labels can be labelled or validation cases.
"""

from __future__ import annotations

import json
from pathlib import Path

from ...errors import DataError
from ..prepare import CACHE_DIR, FORMAT, PREPARED, Recipe
from . import register_layout
from .base import Layout, Split, check_case_id


def find_prepared(root: Path) -> Path | None:
    """The cache folder for `root` (a raw nnU-Net folder or a cache), None if `root` is neither."""
    root = Path(root)
    if (root / PREPARED).is_file():
        return root
    if (root / "dataset.json").is_file():
        cache = root / CACHE_DIR
        if not (cache / PREPARED).is_file():
            raise DataError(f"{root}: this nnU-Net dataset is not prepared yet; run `semiseg data prepare {root}` "
                            "(checks the files and writes the training cache)")
        return cache
    return None


@register_layout
class NnUNetLayout(Layout):
    name = "nnunet"
    signature = "dataset.json with imagesTr/ and labelsTr/ (run `semiseg data prepare` first) or prepared.json"

    def __init__(self, root: Path) -> None:
        cache = find_prepared(root)
        if cache is None:
            raise DataError(f"{root}: no dataset.json or prepared.json; see docs/user-data.md for the layout")
        self.cache = cache
        manifest_path = cache / PREPARED
        try:
            self.manifest = json.loads(manifest_path.read_text())
        except (OSError, UnicodeDecodeError, json.JSONDecodeError) as exc:
            raise DataError(f"{manifest_path}: unreadable ({exc}); run `semiseg data prepare` again") from None
        if not isinstance(self.manifest, dict) or self.manifest.get("format") != FORMAT:
            raise DataError(f"{manifest_path}: not a semiseg prepared dataset; run `semiseg data prepare` again")
        for key in ("labeled", "unlabeled", "test"):
            ids = self.manifest.get(key)
            if not isinstance(ids, list):
                raise DataError(f"{manifest_path}: {key!r} must be a list of case ids; run `semiseg data prepare` "
                                "again")
            for index, case_id in enumerate(ids):
                check_case_id(case_id, f"{manifest_path}: {key}[{index}]")
        labels = self.manifest["labels"]
        self.class_names = tuple(sorted(labels, key=labels.get))  # type: ignore[misc]
        self.num_classes = len(labels)  # type: ignore[misc]
        self.labeled_ids: list[str] = list(self.manifest["labeled"])
        self.recipe = Recipe.from_json(self.manifest["recipe"])
        super().__init__(root)

    @classmethod
    def detect(cls, root: Path) -> bool:
        return (root / PREPARED).is_file() or (root / "dataset.json").is_file()

    def load_lists(self) -> tuple[list[str], list[str], list[str]]:
        return self.labeled_ids + list(self.manifest["unlabeled"]), list(self.manifest["test"]), []

    def case_path(self, case_id: str) -> Path:
        return self.cache / "cases" / f"{case_id}.h5"

    def split(self, labeled: int, val: int = 0) -> Split:
        """Validation = the last `val` labelled cases; labelled = the first `labeled` of the rest.

        Labelled cases left over join the unlabelled pool (their labels are not read).
        """
        n = len(self.labeled_ids)
        if labeled <= 0:
            raise DataError(f"{self.root}: the labelled set is empty (--labeled {labeled}); pass --labeled N "
                            "with N >= 1")
        if labeled + max(val, 0) > n:
            raise DataError(f"{self.root}: --labeled {labeled} and --val {val} need {labeled + max(val, 0)} "
                            f"labelled cases but the dataset has {n}; pass --labeled {max(n - max(val, 0), 0)} "
                            "or fewer")
        pool = self.labeled_ids[: n - val] if val > 0 else list(self.labeled_ids)
        val_ids = self.labeled_ids[n - val:] if val > 0 else []
        source = f"last {val} labelled cases" if val > 0 else "none"
        return Split(pool[:labeled], pool[labeled:] + list(self.manifest["unlabeled"]), val_ids,
                     list(self.test_ids), source)
