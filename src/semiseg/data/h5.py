"""Reading and validating `image` / `label` HDF5 cases (the UA-MT / SSL4MIS on-disk format)."""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

import h5py
import numpy as np

from ..errors import DataError


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
            image = np.asarray(f[image_key][()], dtype=np.float32)
            label = None
            if with_label:
                if label_key not in f:
                    raise DataError(f"{path}: no {label_key!r} dataset (found {keys}); labelled cases need one")
                label = np.asarray(f[label_key][()])
    except DataError:
        raise
    except Exception as exc:  # h5py reports damaged files as OSError, RuntimeError, KeyError, ValueError...
        raise DataError(f"{path}: not a readable HDF5 file ({type(exc).__name__}: {exc}); the file is truncated or "
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
    if not np.isfinite(image).all():
        bad = int((~np.isfinite(image)).sum())
        raise DataError(f"{case.path}: image has {bad} NaN/Inf voxels; fix the preprocessing "
                        "(e.g. replace them with 0) and write the file again")
    label = case.label
    if label is not None:
        if label.shape != image.shape[1:]:
            raise DataError(f"{case.path}: image shape {image.shape[1:]} and label shape {label.shape} differ; "
                            "they must cover the same voxels")
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
