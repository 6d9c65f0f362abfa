"""Reading and validating `image` / `label` HDF5 cases (the UA-MT / SSL4MIS on-disk format)."""

from __future__ import annotations

import os
from dataclasses import dataclass
from pathlib import Path

import h5py
import numpy as np

from ..errors import DataError, one_line

DEFAULT_MAX_VOXELS = 1 << 28  # 268 M voxels: 1 GiB as float32, above any volume of the supported datasets


def max_voxels() -> int:
    """The largest array (in elements) a file may declare before it is read; `SEMISEG_MAX_VOXELS` raises it."""
    try:
        return int(float(os.environ.get("SEMISEG_MAX_VOXELS", DEFAULT_MAX_VOXELS)))
    except ValueError:
        raise DataError(f"SEMISEG_MAX_VOXELS={os.environ['SEMISEG_MAX_VOXELS']!r}: give a number of voxels, e.g. "
                        "1e9") from None


def check_declared_size(path: Path, shape: tuple[int, ...], what: str) -> None:
    """Refuse a file whose header declares more voxels than the limit, before any of its data is read
    (a damaged or hostile header must not make the reader allocate gigabytes)."""
    count = 1
    for size in shape:
        count *= max(int(size), 0)
    if count > max_voxels():
        dims = "x".join(str(int(s)) for s in shape)
        raise DataError(f"{path}: {what} declares a size of {dims} = {count:,} voxels ({count * 4 / 2**30:.1f} GiB as "
                        f"float32), over the limit of {max_voxels():,}; the header is damaged, or, for a genuinely "
                        "large volume, raise the limit with SEMISEG_MAX_VOXELS")


def read_array(path: Path, f: h5py.File, key: str) -> np.ndarray:
    """Dataset `key` of an open h5 file, checked before reading: a numeric array of a sane declared size."""
    item = f[key]
    if not isinstance(item, h5py.Dataset):
        raise DataError(f"{path}: {key!r} is an HDF5 {type(item).__name__.lower()}, not an array; {key!r} must be a "
                        "numeric dataset")
    if item.dtype.kind not in "biuf":
        raise DataError(f"{path}: {key!r} holds {item.dtype} values, not numbers; {key!r} must be a numeric "
                        "array (float images, integer labels)")
    check_declared_size(path, item.shape or (), f"dataset {key!r}")
    return np.asarray(item[()])


@dataclass
class Case:
    """One volume: image (C, *spatial) float32, label (*spatial) uint8 or None for unlabelled use."""

    case_id: str
    image: np.ndarray
    label: np.ndarray | None
    path: Path


def read_case(path: Path, case_id: str, num_classes: int, with_label: bool = True, spatial_dims: int = 3,
              image_key: str = "image", label_key: str = "label") -> Case:
    """Read and check one h5 case; every problem becomes a `DataError` naming the file and the fix."""
    path = Path(path)
    if not path.is_file():
        raise DataError(f"{path}: file not found (case {case_id!r} is listed in the split but missing on disk; "
                        "check the data root or regenerate the list)")
    try:
        with h5py.File(path, "r") as f:
            keys = list(f.keys())
            if image_key not in f:
                raise DataError(f"{path}: no {image_key!r} dataset (found {keys}); "
                                f"cases need {image_key!r} and {label_key!r} arrays")
            image = read_array(path, f, image_key).astype(np.float32, copy=False)
            label = None
            if with_label:
                if label_key not in f:
                    raise DataError(f"{path}: no {label_key!r} dataset (found {keys}); labelled cases need one")
                label = read_array(path, f, label_key)
    except DataError:
        raise
    except Exception as exc:  # h5py reports damaged files as OSError, RuntimeError, KeyError, ValueError...
        raise DataError(f"{path}: not a readable HDF5 file ({one_line(exc)}); the file is truncated or "
                        "corrupt, download or regenerate it") from None
    return validate_case(Case(case_id, image, label, path), num_classes, spatial_dims)


def validate_case(case: Case, num_classes: int, spatial_dims: int = 3) -> Case:
    """Add the channel axis to single-channel images and check values, shapes and label range."""
    image = case.image
    if image.ndim == spatial_dims:
        image = image[None]
    elif image.ndim != spatial_dims + 1:
        raise DataError(f"{case.path}: image has shape {image.shape}; expected {spatial_dims}D "
                        "(optionally with a leading channel axis)")
    if image.size == 0:
        raise DataError(f"{case.path}: image has shape {image.shape} with no voxels; regenerate the file")
    if not np.isfinite(image).all():  # float32 already: values beyond its range became Inf
        bad = int((~np.isfinite(image)).sum())
        raise DataError(f"{case.path}: image has {bad} NaN/Inf voxels; fix the preprocessing "
                        "(e.g. replace them with 0) and write the file again")
    label = case.label
    if label is not None:
        if label.shape != image.shape[1:]:
            raise DataError(f"{case.path}: image shape {image.shape[1:]} and label shape {label.shape} differ; "
                            "they must cover the same voxels")
        if not np.issubdtype(label.dtype, np.integer) and not np.isfinite(label).all():
            raise DataError(f"{case.path}: label holds {int((~np.isfinite(label)).sum())} NaN/Inf values; labels "
                            "must be class indices")
        if not np.issubdtype(label.dtype, np.integer) and not np.array_equal(label, np.round(label)):
            raise DataError(f"{case.path}: label holds non-integer values; labels must be class indices")
        values = np.unique(label)
        if values.min() < 0 or values.max() >= num_classes:
            raise DataError(f"{case.path}: label values {values.tolist()} are outside 0..{num_classes - 1} "
                            f"(the dataset has {num_classes} classes); map them to class indices, e.g. 255 -> 1 "
                            "for a binary mask")
        label = label.astype(np.uint8)
    return Case(case.case_id, np.ascontiguousarray(image, dtype=np.float32), label, case.path)


def write_case(path: Path, image: np.ndarray, label: np.ndarray | None) -> None:
    """Write a case atomically (temporary file, then rename) with gzip, as the reference files are."""
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(path.name + ".tmp")
    with h5py.File(tmp, "w") as f:
        f.create_dataset("image", data=image.astype(np.float32), compression="gzip")
        if label is not None:
            f.create_dataset("label", data=label.astype(np.uint8), compression="gzip")
    tmp.replace(path)
