"""Label maps for new scans: h5 in, h5 out; NIfTI / NRRD in, the same format out on the scan's own grid.

A model trained on a prepared (nnU-Net style) dataset repeats that dataset's preprocessing on each
scan (RAS+ reorientation, resampling, per-channel normalisation) and maps the prediction back onto
the scan's voxel grid, so the written label map has the input's affine and header. Multi-channel
scans are given as nnU-Net channel files `CASE_0000.nii.gz`, `CASE_0001.nii.gz`, ... The sliding
window is the run's (its preset's patch and stride).
"""

from __future__ import annotations

from pathlib import Path

import h5py
import numpy as np

from ..data.h5 import Case, read_array, validate_case
from ..data.prepare import CHANNEL_FILE, Recipe, Volume, read_volume, split_suffix, write_label_like
from ..errors import DataError, one_line
from .checkpoint import writable_output
from .evaluate import resolve_checkpoint
from .inference import predict_volume
from .model_file import InferenceModel, load_model, recipe_json
from .progress import CaseProgress
from .trainer import resolve_device

H5 = ".h5"


def _candidates(paths: list[Path]) -> list[Path]:
    files: list[Path] = []
    for path in paths:
        if path.is_dir():
            files += sorted(p for p in path.iterdir() if p.is_file() and not p.name.startswith(".")
                            and (p.name.endswith(H5) or split_suffix(p.name)[1]))
        elif path.is_file():
            files.append(path)
        else:
            raise DataError(f"{path}: input not found")
    if not files:
        raise DataError(f"no .h5 / .nii / .nii.gz / .nrrd images in {', '.join(map(str, paths))}")
    return files


def group_inputs(paths: list[Path], channels: int) -> dict[str, list[Path]]:
    """Case id -> its channel files in order. `CASE_XXXX.ext` files are grouped by CASE (nnU-Net names);

    a single `CASE_0000.ext` given alone brings its sibling channel files along.
    """
    cases: dict[str, dict[int, Path]] = {}
    for path in _candidates(paths):
        stem = path.name[: -len(H5)] if path.name.endswith(H5) else split_suffix(path.name)[0]
        match = CHANNEL_FILE.match(stem) if not path.name.endswith(H5) else None
        if match is None:
            cases.setdefault(stem, {})[0] = path
            continue
        group = cases.setdefault(match["case"], {})
        group[int(match["channel"])] = path
        if int(match["channel"]) == 0 and channels > 1:
            suffix = split_suffix(path.name)[1]
            for c in range(1, channels):
                sibling = path.with_name(f"{match['case']}_{c:04d}{suffix}")
                if sibling.is_file():
                    group.setdefault(c, sibling)
    grouped = {}
    for case_id, files in cases.items():
        expected = 1 if files.get(0, Path()).name.endswith(H5) else channels
        if sorted(files) != list(range(expected)):
            raise DataError(f"case {case_id!r}: the model expects {expected} channel file(s) "
                            f"{case_id}_0000 .. {case_id}_{expected - 1:04d}, found channels {sorted(files)}")
        grouped[case_id] = [files[c] for c in range(expected)]
    return grouped


def load_recipe(data: str) -> Recipe | None:
    """The training dataset's preprocessing when it is a prepared dataset; None for h5 layouts."""
    recipe = recipe_json(data)
    return None if recipe is None else Recipe.from_json(recipe)


def model_recipe(model: InferenceModel, data: str | None) -> Recipe | None:
    """The training dataset's preprocessing: from `data` when given, else as recorded in the model file, else
    read from the dataset the run was trained on; None for h5 layouts (no recipe)."""
    pre = model.preprocessing
    if data is None and pre.get("recipe_recorded"):
        return None if pre.get("recipe") is None else Recipe.from_json(pre["recipe"])
    return load_recipe(data or model.config.data)


def _read_h5(path: Path) -> np.ndarray:
    try:
        with h5py.File(path, "r") as f:
            if "image" not in f:
                raise DataError(f"{path}: no 'image' dataset (found {list(f.keys())})")
            return read_array(path, f, "image").astype(np.float32)
    except DataError:
        raise
    except Exception as exc:  # h5py reports damaged files as OSError, RuntimeError, KeyError, ValueError...
        raise DataError(f"{path}: unreadable HDF5 file ({one_line(exc)})") from None


def _normalise(image: np.ndarray, scheme: str) -> np.ndarray:
    """Per channel over the volume: z-score (LA-style h5 layouts) or min-max to [0, 1] (ACDC)."""
    axes = tuple(range(1, image.ndim))
    if scheme == "zscore":
        return (image - image.mean(axis=axes, keepdims=True)) / (image.std(axis=axes, keepdims=True) + 1e-8)
    if scheme == "minmax":
        low = image.min(axis=axes, keepdims=True)
        return (image - low) / np.maximum(image.max(axis=axes, keepdims=True) - low, 1e-8)
    return image


def _prepare_scan(files: list[Path], recipe: Recipe | None, normalize: str,
                  slicewise: bool) -> tuple[np.ndarray, Volume | None]:
    """(C, *spatial) network input, and the reference volume for writing (None for h5 input).

    Without a recipe, a 2D (slice-wise) model gets the ACDC files' (z, y, x) axis order and [0, 1] range.
    """
    if files[0].name.endswith(H5):
        image = _read_h5(files[0])
        return (_normalise(image[None], "zscore")[0] if normalize == "zscore" else image), None
    volumes = [read_volume(p) for p in files]
    if recipe is not None and normalize == "auto":
        return recipe.image(volumes)[0], volumes[0]
    image = np.stack([np.asarray(v.data, dtype=np.float32) for v in volumes])
    if slicewise:
        image = np.ascontiguousarray(image.transpose(0, 3, 2, 1))
    if normalize == "auto":
        normalize = "minmax" if slicewise else "zscore"
    return _normalise(image, normalize), volumes[0]


def predict_files(checkpoint: Path, inputs: list[Path], out: Path, device: str = "auto",
                  normalize: str = "auto", data: str | None = None, progress: bool = False) -> list[Path]:
    """Predict every input case and write its label map into `out`; returns the written files.

    `normalize`: auto = the training dataset's recipe for prepared datasets, otherwise z-score NIfTI /
    NRRD scans (min-max for 2D models) and keep h5 images as stored; zscore or none force that for all.
    """
    if normalize not in ("auto", "zscore", "none"):
        raise DataError(f"--normalize {normalize!r}: use auto, zscore or none")
    with writable_output(Path(out)):  # checked before any work; no empty folder left if refused
        return _predict_cases(checkpoint, inputs, Path(out), device, normalize, data, progress)


def _predict_cases(checkpoint: Path, inputs: list[Path], out: Path, device: str, normalize: str, data: str | None,
                   progress: bool) -> list[Path]:
    ckpt_path, rule = resolve_checkpoint(checkpoint)
    dev = resolve_device(device)
    model = load_model(ckpt_path, rule, dev)
    spec, net, protocol = model.spec, model.net, model.protocol_for(dev)
    cases = group_inputs(inputs, spec.in_channels)
    needs_recipe = normalize == "auto" and any(not f[0].name.endswith(H5) for f in cases.values())
    recipe = model_recipe(model, data) if needs_recipe else None
    slicewise = spec.spatial_dims == 2  # 2D networks label volumes slice by slice (ACDC)
    out.mkdir(parents=True, exist_ok=True)
    written = []
    shown = CaseProgress("predict", len(cases), progress)
    try:
        for case_id, files in cases.items():
            image, reference = _prepare_scan(files, recipe, normalize, slicewise)
            case = validate_case(Case(case_id, image, None, files[0]), spec.num_classes, 3)
            if case.image.shape[0] != spec.in_channels:
                raise DataError(f"{files[0]}: image has {case.image.shape[0]} channels, the model expects "
                                f"{spec.in_channels}")
            pred = predict_volume(net, case.image, protocol, dev)
            if reference is not None and slicewise:
                pred = pred.transpose(2, 1, 0)
            written.append(_write(out, case_id, pred, reference, recipe, files[0]))
            counts = np.bincount(pred.ravel(), minlength=spec.num_classes)[1:]
            shown.step(case_id, f"{written[-1].name}, foreground voxels per class {counts.tolist()}")
            del image, reference, case, pred  # before the next scan is read
    finally:
        shown.close()
    return written


def _write(out: Path, case_id: str, pred: np.ndarray, reference: Volume | None, recipe: Recipe | None,
           source: Path) -> Path:
    if reference is None:
        path = out / f"{case_id}{H5}"
        with h5py.File(path, "w") as f:
            f.create_dataset("label", data=pred.astype(np.uint8), compression="gzip")
        return path
    if recipe is not None:
        pred = recipe.restore(pred, reference)
    suffix = split_suffix(source.name)[1]
    suffix = ".nrrd" if suffix == ".nhdr" else suffix
    return write_label_like(out / f"{case_id}{suffix}", pred, reference)
