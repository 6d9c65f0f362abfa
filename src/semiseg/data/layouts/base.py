"""The layout interface and the labelled / unlabelled / validation / test split rule."""

from __future__ import annotations

from abc import ABC, abstractmethod
from dataclasses import dataclass, field
from pathlib import Path
from typing import ClassVar

from ...errors import DataError
from ..h5 import Case, read_case
from ..transforms import Transform, legacy_augmentation


@dataclass
class Split:
    """Case ids of each role. `val` is disjoint from `test`, so choosing a checkpoint on it is honest."""

    labeled: list[str]
    unlabeled: list[str]
    val: list[str] = field(default_factory=list)
    test: list[str] = field(default_factory=list)
    val_source: str = "none"


def check_case_id(case_id: object, where: str) -> str:
    """A case id becomes a file name (`<id>.h5`, `cases/<id>.png`) inside its folder, so it must be a bare
    name: no `/` or `\\`, not `.` or `..`, not empty. `where` names the list and line it came from."""
    if not isinstance(case_id, str) or not case_id or case_id in (".", "..") or any(
            c in case_id for c in "/\\\0"):
        raise DataError(f"{where}: case id {case_id!r} is not a bare file name and would lead outside its "
                        "folder; case ids must not contain '/' or '\\' nor be '.' or '..'")
    return case_id


def read_list(path: Path) -> list[str]:
    """Bare ids, one per line, blank lines ignored (the UA-MT / SSL4MIS list format)."""
    if not path.is_file():
        raise DataError(f"{path}: split list not found; the dataset folder must contain it")
    try:
        lines = path.read_text().splitlines()
    except (OSError, UnicodeDecodeError) as exc:
        raise DataError(f"{path}: unreadable split list ({exc}); it must be a text file of case ids") from None
    return [check_case_id(line.strip(), f"{path}:{number}") for number, line in enumerate(lines, start=1)
            if line.strip()]


class Layout(ABC):
    name: ClassVar[str]
    signature: ClassVar[str]  # what `detect` looks for, shown when no layout matches
    spatial_dims: ClassVar[int] = 3
    num_classes: ClassVar[int] = 2
    class_names: ClassVar[tuple[str, ...]] = ("background", "foreground")
    # How evaluation turns a volume into a label map: "sliding_window" (3D protocols) or "slicewise"
    # (2D networks on 3D volumes, ACDC).
    inference_mode: ClassVar[str] = "sliding_window"

    def __init__(self, root: Path) -> None:
        self.root = Path(root)
        self.train_ids, self.test_ids, self.val_ids = self.load_lists()

    @classmethod
    @abstractmethod
    def detect(cls, root: Path) -> bool: ...

    @abstractmethod
    def load_lists(self) -> tuple[list[str], list[str], list[str]]:
        """(train, test, declared validation) ids in file order."""

    @abstractmethod
    def case_path(self, case_id: str) -> Path: ...

    def read(self, case_id: str, with_label: bool = True) -> Case:
        """A training item (a volume, or a slice for 2D layouts)."""
        return read_case(self.case_path(case_id), case_id, self.num_classes, with_label, self.spatial_dims)

    def read_eval(self, case_id: str) -> Case:
        """A whole evaluation volume with its label."""
        return self.read(case_id, with_label=True)

    def train_transform(self, patch_size: tuple[int, ...], rot_flip: bool) -> Transform:
        """Training augmentation of this dataset's protocol (LA: RandomRotFlip + RandomCrop)."""
        return legacy_augmentation(patch_size, rot_flip)

    def split(self, labeled: int, val: int = 0) -> Split:
        """Labelled = the first `labeled` training ids (the papers' rule), the rest unlabelled.

        With `val > 0` the validation cases are the declared list if the dataset has one, otherwise
        the last `val` ids of the training list, removed from the unlabelled pool.
        """
        train = list(self.train_ids)
        if labeled <= 0:
            raise DataError(f"{self.root}: the labelled set is empty (--labeled {labeled}); "
                            "pass --labeled N with N >= 1")
        val_ids: list[str] = []
        source = "none"
        if val > 0 and self.val_ids:
            val_ids, source = list(self.val_ids), "declared validation list"
        elif val > 0:
            val_ids, train = train[-val:], train[:-val]
            source = f"last {val} cases of the training list"
        if labeled > len(train):
            raise DataError(f"{self.root}: --labeled {labeled} but only {len(train)} training cases "
                            f"(after removing {len(val_ids)} validation cases); lower --labeled or --val")
        return Split(train[:labeled], train[labeled:], val_ids, list(self.test_ids), source)
