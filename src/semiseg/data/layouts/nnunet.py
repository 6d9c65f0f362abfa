"""Your own data in the nnU-Net raw layout, read from the cache that `semiseg data prepare` writes.

`--data` may name the raw folder (`dataset.json`, `imagesTr/`, ...; its cache is `semiseg-prepared/`
inside it) or the cache folder itself (`prepared.json`, for a cache written elsewhere with `--out`).
Labelled cases come first in the training list, then the unlabelled ones, so the usual "first N
labelled" rule holds; only cases that have labels can be labelled or validation cases.
"""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np

from ...errors import DataError
from ..prepare import CACHE_DIR, FORMAT, PREPARED, Recipe, read_volume, write_label_like
from . import register_layout
from .base import Layout, Split, Window, check_case_id

# Largest patch a derived window may have: the LA protocol's 112 x 112 x 80 voxels, which the benchmark networks
# train with at batch 2 + 2 on a 24 GB GPU.
PATCH_BUDGET = 112 * 112 * 80


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

    def default_window(self) -> Window:
        """nnU-Net's planning, simply: the patch is the median training image size rounded down to multiples of
        16 (at least 16), its largest axis shrunk by 16 while it exceeds `PATCH_BUDGET` voxels; stride half of it."""
        cases = self.manifest["cases"]
        ids = [i for i in self.train_ids if i in cases]
        median = np.median(np.array([cases[i]["shape"] for i in ids], dtype=float), axis=0)
        patch = [max(16, int(m // 16) * 16) for m in median]
        while int(np.prod(patch)) > PATCH_BUDGET and max(patch) > 16:
            patch[int(np.argmax(patch))] -= 16
        stride = [max(1, p // 2) for p in patch]
        size = "x".join(f"{m:g}" for m in median)
        return tuple(patch), tuple(stride), (f"derived from the median image size {size} of the {len(ids)} "
                                             "training cases (multiples of 16, stride half the patch)")

    def voxel_spacing(self, case_id: str) -> tuple[float, ...] | None:
        """The prepared grid's spacing (mm), from the case's affine in prepared.json."""
        entry = self.manifest["cases"].get(case_id)
        if entry is None or "affine" not in entry:
            return None
        affine = np.asarray(entry["affine"], dtype=float)
        return tuple(float(v) for v in np.sqrt((affine[:3, :3] ** 2).sum(0)))

    def _source(self, case_id: str) -> Path | None:
        images = self.manifest["cases"].get(case_id, {}).get("images") or []
        return Path(images[0]) if images and Path(images[0]).is_file() else None

    def write_prediction(self, folder: Path, case_id: str, pred: np.ndarray) -> Path:
        """The dataset's own format (`file_ending`) on the scan's grid, with its affine and header, as `predict`
        writes; when the raw scan is no longer there, NIfTI on the prepared (RAS+) grid with that grid's affine."""
        import nibabel as nib

        folder = Path(folder)
        folder.mkdir(parents=True, exist_ok=True)
        source = self._source(case_id)
        if source is None:
            path = folder / f"{case_id}.nii.gz"
            affine = np.asarray(self.manifest["cases"][case_id]["affine"], dtype=float)
            nib.save(nib.Nifti1Image(pred.astype(np.uint8), affine), str(path))
            return path
        reference = read_volume(source)
        ending = self.manifest.get("file_ending", ".nii.gz")
        ending = ".nrrd" if ending == ".nhdr" else ending
        return write_label_like(folder / f"{case_id}{ending}", self.recipe.restore(pred, reference), reference)

    def read_prediction(self, folder: Path, case_id: str) -> np.ndarray:
        """A label map in scanner geometry (`<id>` + the dataset's ending, .nii.gz, .nii or .nrrd) goes through the
        dataset's preprocessing onto the prepared grid, as the labels did; an `.h5` one is taken as it is."""
        folder = Path(folder)
        shape = tuple(self.manifest["cases"][case_id]["shape"])
        for ending in dict.fromkeys((self.manifest.get("file_ending", ".nii.gz"), ".nii.gz", ".nii", ".nrrd")):
            path = folder / f"{case_id}{ending}"
            if path.is_file():
                volume = read_volume(path)
                if self.recipe.spacing is None and tuple(sorted(volume.data.shape)) != tuple(sorted(shape)):
                    raise DataError(f"{path}: prediction shape {volume.data.shape} differs from the scan's "
                                    f"({shape} after reorientation); write it on the scan's grid")
                return self.recipe.label(volume, shape)
        return super().read_prediction(folder, case_id)
