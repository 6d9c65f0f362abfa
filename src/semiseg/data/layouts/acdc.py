"""ACDC in the SSL4MIS layout (protocol.md section 2): 2D training slices, 3D evaluation volumes.

Files: `data/slices/<case>_slice_<k>.h5` (2D `image` in [0, 1], `label` in {0 bg, 1 RV, 2 Myo, 3 LV}),
`data/<case>.h5` volumes (D, H, W) for validation and test, and the lists `train_slices.list`,
`val.list` and `test.list` (bare names). "N labelled" means N *patients*: the labelled set is the first S
slices of `train_slices.list`, S being the number of slices of the first N patients met in list order
(SSL4MIS hard-codes S = 68 for 3 patients and 136 for 7; here it is counted from the list).
"""

from __future__ import annotations

from collections.abc import Sequence
from pathlib import Path

import numpy as np
from scipy import ndimage

from ...errors import DataError
from ..h5 import Case, read_case, write_case
from ..transforms import Sample, Transform
from . import register_layout
from .base import Layout, Split, Window, read_list


def patient_of(slice_id: str) -> str:
    """`patient038_frame01_slice_3` -> `patient038` (both frames of a patient count as one case)."""
    volume = slice_id.rsplit("_slice_", 1)[0]
    return volume.split("_frame", 1)[0]


def zoom_nearest(arr: np.ndarray, size: Sequence[int]) -> np.ndarray:
    """`scipy.ndimage.zoom(order=0)` of the last two axes to `size` (what SSL4MIS / UniMatch use)."""
    h, w = arr.shape[-2:]
    factors = [1.0] * (arr.ndim - 2) + [size[0] / h, size[1] / w]
    return ndimage.zoom(arr, factors, order=0)


class ACDCAugmentation:
    """SSL4MIS / UniMatch slice recipe: p = 0.5 rot90 (k ~ U{0..3}) + flip on axis 0 or 1; otherwise
    p = 0.5 rotation by an integer angle in [-20, 20) (order 0, same shape); then nearest resize to `size`."""

    def __init__(self, size: Sequence[int], rot_flip: bool = True) -> None:
        self.size = tuple(int(s) for s in size)
        self.rot_flip = rot_flip

    def __call__(self, sample: Sample, rng: np.random.Generator) -> Sample:
        out = dict(sample)
        if self.rot_flip and rng.random() > 0.5:
            k, axis = int(rng.integers(0, 4)), int(rng.integers(0, 2))
            for key, arr in out.items():
                first = arr.ndim - 2
                out[key] = np.flip(np.rot90(arr, k, axes=(first, first + 1)), axis=first + axis)
        elif self.rot_flip and rng.random() > 0.5:
            angle = int(rng.integers(-20, 20))
            for key, arr in out.items():
                first = arr.ndim - 2
                out[key] = ndimage.rotate(arr, angle, axes=(first + 1, first), order=0, reshape=False)
        return {key: np.ascontiguousarray(zoom_nearest(arr, self.size)) for key, arr in out.items()}


@register_layout
class ACDCLayout(Layout):
    name = "acdc"
    signature = "'data/slices/<case>_slice_<k>.h5' and 'data/<case>.h5' with train_slices.list, val.list, test.list"
    spatial_dims = 2
    num_classes = 4
    class_names = ("background", "RV", "Myo", "LV")
    inference_mode = "slicewise"

    @classmethod
    def detect(cls, root: Path) -> bool:
        return (root / "data" / "slices").is_dir() and (root / "train_slices.list").is_file()

    def load_lists(self) -> tuple[list[str], list[str], list[str]]:
        return (read_list(self.root / "train_slices.list"), read_list(self.root / "test.list"),
                read_list(self.root / "val.list"))

    def case_path(self, case_id: str) -> Path:
        if "_slice_" in case_id:
            return self.root / "data" / "slices" / f"{case_id}.h5"
        return self.root / "data" / f"{case_id}.h5"

    def read_eval(self, case_id: str) -> Case:
        """A whole (D, H, W) volume with its label."""
        return read_case(self.case_path(case_id), case_id, self.num_classes, True, spatial_dims=3)

    def train_transform(self, patch_size: tuple[int, ...], rot_flip: bool) -> Transform:
        return ACDCAugmentation(patch_size, rot_flip)

    def default_window(self) -> Window:
        """2D: every slice is resized to 256x256 (SSL4MIS); the stride is unused by slice-wise inference."""
        return (256, 256), (256, 256), "the ACDC protocol: 2D slices resized to 256x256"

    def labeled_slices(self, patients: int) -> int:
        """Number of leading slices of the training list that belong to its first `patients` patients."""
        seen: list[str] = []
        for count, slice_id in enumerate(self.train_ids):
            patient = patient_of(slice_id)
            if patient not in seen:
                if len(seen) == patients:
                    return count
                seen.append(patient)
        if len(seen) < patients:
            raise DataError(f"{self.root}: --labeled {patients} patients but train_slices.list holds only "
                            f"{len(seen)}; lower --labeled")
        return len(self.train_ids)

    def split(self, labeled: int, val: int = 0) -> Split:
        """Labelled = the slices of the first `labeled` patients; validation = the declared val.list."""
        if labeled <= 0:
            raise DataError(f"{self.root}: the labelled set is empty (--labeled {labeled}); "
                            "pass --labeled N (patients) with N >= 1")
        n = self.labeled_slices(labeled)
        train = list(self.train_ids)
        val_ids = list(self.val_ids) if val > 0 else []
        return Split(train[:n], train[n:], val_ids, list(self.test_ids),
                     "declared validation list" if val_ids else "none")


def write_synthetic_acdc(root: Path, patients: int = 6, val_patients: int = 1, test_patients: int = 1,
                         shape: tuple[int, int, int] = (4, 40, 36), seed: int = 0) -> Path:
    """A small ACDC-like dataset in the SSL4MIS layout: per patient two frames of a (D, H, W) volume with
    an LV disk (3) inside a myocardium ring (2) and an RV crescent (1) beside it, noise, [0, 1] images.

    Slices are named with 1-based k as the distributed data are. Used by the tests and for dry runs.
    """
    root = Path(root)
    rng = np.random.default_rng(seed)
    d, h, w = shape
    yy, xx = np.mgrid[0:h, 0:w].astype(np.float32)
    names = {"train": [], "val": [], "test": []}
    order = ["train"] * patients + ["val"] * val_patients + ["test"] * test_patients
    slice_ids: list[str] = []
    for p, role in enumerate(order, start=1):
        for frame in (1, 12):
            case = f"patient{p:03d}_frame{frame:02d}"
            cy, cx = h * rng.uniform(0.4, 0.6), w * rng.uniform(0.45, 0.6)
            label = np.zeros(shape, np.uint8)
            for z in range(d):
                r = min(h, w) * rng.uniform(0.12, 0.18) * (1 - 0.08 * z)
                dist = np.hypot(yy - cy, xx - cx)
                rv = np.hypot(yy - cy, xx - (cx - 1.9 * r))
                label[z][(rv < 1.5 * r) & (dist >= 1.6 * r)] = 1
                label[z][(dist >= r) & (dist < 1.6 * r)] = 2
                label[z][dist < r] = 3
            intensity = np.array([0.1, 0.7, 0.35, 0.9], np.float32)[label]
            image = intensity + 0.08 * rng.standard_normal(shape).astype(np.float32)
            image = (image - image.min()) / (image.max() - image.min())
            write_case(root / "data" / f"{case}.h5", image, label)
            names[role].append(case)
            if role == "train":
                for z in range(d):
                    slice_id = f"{case}_slice_{z + 1}"
                    write_case(root / "data" / "slices" / f"{slice_id}.h5", image[z], label[z])
                    slice_ids.append(slice_id)
    (root / "train_slices.list").write_text("\n".join(slice_ids) + "\n")
    (root / "val.list").write_text("\n".join(names["val"]) + "\n")
    (root / "test.list").write_text("\n".join(names["test"]) + "\n")
    return root
