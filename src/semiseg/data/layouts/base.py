"""The layout interface and the labelled / unlabelled / validation / test split rule."""

from __future__ import annotations

from abc import ABC, abstractmethod
from dataclasses import dataclass, field
from pathlib import Path
from typing import ClassVar

import h5py
import numpy as np

from ...errors import DataError, one_line
from ..h5 import Case, read_array, read_case
from ..transforms import Transform, legacy_augmentation

# What a run's patch and sliding-window stride are when its configuration sets none: (patch, stride, why).
Window = tuple[tuple[int, ...], tuple[int, ...], str]


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

    def default_window(self) -> Window:
        """Patch and stride of this dataset's protocol, used when the configuration sets neither."""
        return (112, 112, 80), (18, 18, 4), "the LA protocol's window"

    def voxel_spacing(self, case_id: str) -> tuple[float, ...] | None:
        """mm per voxel of an evaluation case along its array axes; None when the files do not record it (the
        benchmark h5 files), so distances are in voxels as the papers report them."""
        return None

    def write_prediction(self, folder: Path, case_id: str, pred: np.ndarray) -> Path:
        """A label map in this dataset's own file format: `label` of an h5 file for the h5 layouts."""
        path = Path(folder) / f"{case_id}.h5"
        path.parent.mkdir(parents=True, exist_ok=True)
        with h5py.File(path, "w") as f:
            f.create_dataset("label", data=pred.astype(np.uint8), compression="gzip")
        return path

    def read_prediction(self, folder: Path, case_id: str) -> np.ndarray:
        """A label map written for `case_id` (by `write_prediction` or by another tool) on the evaluation grid."""
        return read_prediction_file(Path(folder), case_id)

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


def read_prediction_file(folder: Path, case_id: str) -> np.ndarray:
    """`<id>.h5` (dataset `label` or `pred`) or `<id>.nii.gz` / `<id>.nii` from a prediction folder, as stored."""
    for suffix in (".h5", ".nii.gz", ".nii"):
        path = folder / f"{case_id}{suffix}"
        if not path.is_file():
            continue
        if suffix == ".h5":
            try:
                with h5py.File(path, "r") as f:
                    key = next((k for k in ("label", "pred", "prediction") if k in f), None)
                    if key is None:
                        raise DataError(f"{path}: no 'label' or 'pred' dataset (found {list(f.keys())})")
                    return read_array(path, f, key)
            except DataError:
                raise
            except Exception as exc:  # h5py reports damaged files as OSError, RuntimeError, KeyError...
                raise DataError(f"{path}: unreadable HDF5 file ({one_line(exc)})") from None
        from ..prepare import read_volume

        return read_volume(path).data
    raise DataError(f"{folder}: no prediction for case {case_id!r} (looked for {case_id}.h5, .nii.gz, .nii)")
