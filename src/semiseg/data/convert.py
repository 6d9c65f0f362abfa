"""Raw public datasets -> the protocol layouts of protocol.md (ACDC, Pancreas-CT, BraTS-2019).

Each converter writes the h5 files and split lists its protocol names, with the preprocessing that
protocol specifies (including its quirks, which are what makes numbers comparable). Lists whose full
official order is not public are rebuilt so that every *published* labelled subset is reproduced
exactly; the lines returned say what was done and where a split differs from the official one.
"""

from __future__ import annotations

import re
import shutil
from pathlib import Path

import numpy as np
from scipy import ndimage

from ..errors import DataError
from .h5 import write_case
from .prepare import read_volume

# ACDC (protocol.md 2.2, 2.3): patient split 70 / 10 / 20; the first 14 patients of train_slices.list.
ACDC_VAL = (2, 19, 28, 30, 39, 45, 78, 82, 85, 87)
ACDC_TEST = (1, 7, 8, 11, 13, 22, 24, 33, 52, 59, 64, 65, 66, 68, 75, 80, 81, 83, 84, 93)
ACDC_FIRST = (99, 38, 50, 100, 58, 21, 49, 20, 72, 40, 60, 89, 4, 56)
# Pancreas-CT (protocol.md 3): MC-Net test ids and the first 12 of train.list.
PANCREAS_TEST = (50, 59, 37, 60, 40, 74, 4, 46, 8, 54, 5, 73, 1, 39, 6, 67, 25, 51, 21, 9)
PANCREAS_FIRST = (57, 18, 62, 31, 20, 17, 32, 79, 61, 64, 70, 19)
PANCREAS_WINDOW = (-125.0, 275.0)
PANCREAS_MARGIN, PANCREAS_MIN_SIZE = 25, 96
# BraTS-2019 (protocol.md 4): SSL4MIS split sizes of its 335 cases.
BRATS_SPLIT = (250, 25, 60)


def _sitk_order(data: np.ndarray) -> np.ndarray:
    """nibabel (x, y, z) -> SimpleITK array order (z, y, x), the (D, H, W) of the ACDC / BraTS files."""
    return np.ascontiguousarray(np.transpose(data, (2, 1, 0)))


def _write_list(path: Path, ids: list[str]) -> None:
    path.write_text("".join(f"{i}\n" for i in ids))


# ----------------------------------------------------------------------------- ACDC

def convert_acdc(raw: Path, out: Path) -> list[str]:
    """`patientXXX_frameYY.nii.gz` + `_gt` -> `data/<name>.h5` volumes and 1-based `data/slices/` files."""
    pairs = []
    for image in sorted(raw.rglob("patient*_frame??.nii.gz")):
        gt = image.with_name(image.name.replace(".nii.gz", "_gt.nii.gz"))
        if gt.is_file():
            pairs.append((image.name.removesuffix(".nii.gz"), image, gt))
    if not pairs:
        raise DataError(f"{raw}: no ACDC frames (patientXXX_frameYY.nii.gz with patientXXX_frameYY_gt.nii.gz)")
    volumes: dict[int, list[str]] = {}
    slices: dict[str, int] = {}
    for name, image_path, gt_path in pairs:
        image = _sitk_order(np.asarray(read_volume(image_path).data, dtype=np.float32))
        label = _sitk_order(np.asarray(read_volume(gt_path).data))
        if image.shape != label.shape:
            raise DataError(f"{gt_path}: shape {label.shape[::-1]} differs from the image's {image.shape[::-1]}")
        if not set(np.unique(label).tolist()) <= {0, 1, 2, 3}:
            raise DataError(f"{gt_path}: label values {np.unique(label).tolist()} outside ACDC's 0..3")
        image = (image - image.min()) / max(float(image.max() - image.min()), 1e-8)
        write_case(out / "data" / f"{name}.h5", image, label)
        for k in range(image.shape[0]):  # slice names are 1-based, as in the distributed data and lists
            write_case(out / "data" / "slices" / f"{name}_slice_{k + 1}.h5", image[k], label[k])
        volumes.setdefault(int(name[7:10]), []).append(name)
        slices[name] = image.shape[0]
    train = [p for p in ACDC_FIRST if p in volumes] + sorted(
        p for p in volumes if p not in ACDC_FIRST + ACDC_VAL + ACDC_TEST)
    _write_list(out / "train_slices.list", [f"{v}_slice_{k + 1}" for p in train for v in volumes[p]
                                            for k in range(slices[v])])
    for name, patients in (("train.list", train), ("val.list", sorted(p for p in ACDC_VAL if p in volumes)),
                           ("test.list", sorted(p for p in ACDC_TEST if p in volumes))):
        _write_list(out / name, [v for p in patients for v in volumes[p]])
    return [f"ACDC: {len(pairs)} volumes of {len(volumes)} patients, {sum(slices.values())} slices -> {out}",
            "train_slices.list starts with the 14 patients of the published 3 / 7 / 14-patient labelled sets in "
            "SSL4MIS order; the order of the other training patients is numeric (not SSL4MIS's)"]


# ----------------------------------------------------------------------------- Pancreas-CT

def _resample_iso(data: np.ndarray, spacing: np.ndarray, order: int) -> np.ndarray:
    """To 1 mm voxels keeping voxel 0's centre (SimpleITK's resampler); order 3 = B-spline, 0 = nearest."""
    shape = tuple(max(1, round(n * s)) for n, s in zip(data.shape, spacing, strict=True))
    return ndimage.affine_transform(data, 1.0 / spacing, output_shape=shape, order=order, mode="nearest")


def _crop_bounds(mask_axis: np.ndarray, margin: int, min_size: int) -> tuple[int, int]:
    """Foreground extent + margin, grown (inside the image) to at least `min_size` voxels."""
    idx = np.flatnonzero(mask_axis)
    n = mask_axis.size
    lo, hi = max(idx[0] - margin, 0), min(idx[-1] + margin + 1, n)
    short = min_size - (hi - lo)
    if short > 0:
        lo = max(lo - short // 2, 0)
        hi = min(lo + max(min_size, hi - lo), n)
        lo = max(min(lo, hi - min_size), 0)
    return int(lo), int(hi)


def pancreas_case(image: np.ndarray, label: np.ndarray, spacing: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """MC-Net preprocessing of one (x, y, z) HU volume: 1 mm, window, [0, 1], crop x / y, z-score."""
    image = _resample_iso(image.astype(np.float32), spacing, 3)
    label = _resample_iso((label > 0).astype(np.uint8), spacing, 0)
    lo, hi = PANCREAS_WINDOW
    image = (np.clip(image, lo, hi) - lo) / (hi - lo)
    if not label.any():
        raise DataError("label is empty after resampling")
    window = [_crop_bounds(label.any(axis=tuple(a for a in range(3) if a != axis)), PANCREAS_MARGIN,
                           PANCREAS_MIN_SIZE) for axis in (0, 1)]
    crop = (slice(*window[0]), slice(*window[1]), slice(None))
    image, label = image[crop], label[crop]
    pad = [(0, max(PANCREAS_MIN_SIZE - s, 0)) if axis < 2 else (0, 0) for axis, s in enumerate(image.shape)]
    image, label = np.pad(image, pad), np.pad(label, pad)
    return ((image - image.mean()) / max(float(image.std()), 1e-8)).astype(np.float32), label


def _number(path: Path) -> int | None:
    match = re.search(r"(\d{4})(?!.*\d)", path.name)
    return int(match[1]) if match else None


def convert_pancreas(raw: Path, out: Path, labels: Path | None = None) -> list[str]:
    """NIfTI CT volumes (`PANCREAS_0001.nii.gz` or similar, in HU) and TCIA `label0001.nii.gz` masks."""
    labels = labels or raw
    label_files = {_number(p): p for p in labels.rglob("label*.nii*")}
    images = {_number(p): p for p in raw.rglob("*.nii*") if not p.name.startswith("label") and _number(p)}
    if not images and any(raw.rglob("*.dcm")):
        raise DataError(f"{raw}: DICOM series; convert each to NIfTI first (e.g. dcm2niix -z y -o OUT SERIES) "
                        "and run this again on the NIfTI files")
    pairs = {n: (images[n], label_files[n]) for n in sorted(images) if n in label_files}
    if not pairs:
        raise DataError(f"{raw}: no CT volume with a matching labelNNNN.nii.gz (looked in {labels})")
    for n, (image_path, label_path) in pairs.items():
        vol = read_volume(image_path)
        label = read_volume(label_path)
        if label.data.shape != vol.data.shape:
            raise DataError(f"{label_path}: shape {label.data.shape} differs from {image_path}'s {vol.data.shape}")
        try:
            image, mask = pancreas_case(np.asarray(vol.data, dtype=np.float32), np.asarray(label.data), vol.spacing)
        except DataError as exc:
            raise DataError(f"{label_path}: {exc}") from None
        write_case(out / "Pancreas_h5" / f"image{n:04d}_norm.h5", image, mask)
    train = [n for n in PANCREAS_FIRST if n in pairs] + sorted(
        n for n in pairs if n not in PANCREAS_FIRST + PANCREAS_TEST)
    _write_list(out / "train.list", [f"image{n:04d}" for n in train])
    _write_list(out / "test.list", [f"image{n:04d}" for n in PANCREAS_TEST if n in pairs])
    missing = [n for n in PANCREAS_FIRST + PANCREAS_TEST if n not in pairs]
    lines = [f"Pancreas-CT: {len(pairs)} volumes -> {out / 'Pancreas_h5'}; train.list starts with MC-Net's first 12, "
             "test.list is MC-Net's 20"]
    if missing:
        lines.append(f"warning: protocol cases missing from the input: {', '.join(f'{n:04d}' for n in missing)}")
    return lines


# ----------------------------------------------------------------------------- BraTS-2019

def cdf_threshold(image: np.ndarray, fraction: float = 0.999) -> float:
    """First histogram-bin value whose cumulative distribution reaches `fraction`.

    The bins of `skimage.exposure.cumulative_distribution`: one per integer for integer images, 256
    equal bins (their centres) for float images, with the CDF in float32 for float32 images.
    """
    flat = image.ravel()
    if np.issubdtype(image.dtype, np.integer):
        centres, counts = np.unique(flat, return_counts=True)
    else:
        counts, edges = np.histogram(flat, bins=256, range=(float(flat.min()), float(flat.max())))
        centres = (edges[:-1] + edges[1:]) / 2
    cdf = counts.cumsum() / float(counts.sum())
    if image.dtype in (np.float32, np.float16):
        cdf = cdf.astype(np.float32)
    return float(centres[np.argmax(cdf >= fraction)])


def brats_case(flair: np.ndarray, seg: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """SSL4MIS preprocessing of one (D, H, W) FLAIR volume: crop, clip at the 99.9 % CDF bin, z-score."""
    nonzero = np.nonzero(flair)
    # The SSL4MIS crop ends at the last nonzero index exclusively (one slice is lost per axis): kept.
    crop = tuple(slice(int(idx.min()), int(idx.max())) for idx in nonzero)
    image, label = flair[crop], (seg[crop] > 0).astype(np.uint8)
    image = np.clip(image, image.min(), cdf_threshold(image)).astype(np.float32)
    inside = image[image > 0]
    return ((image - inside.mean()) / max(float(inside.std()), 1e-8)).astype(np.float32), label


def convert_brats(raw: Path, out: Path, split_dir: Path | None = None, seed: int = 0) -> list[str]:
    """`<ID>/<ID>_flair.nii.gz` + `_seg.nii.gz` -> `data/<ID>.h5` (FLAIR, whole tumour) and the split lists."""
    cases = {}
    for flair in sorted(raw.rglob("*_flair.nii*")):
        case_id = flair.name.split("_flair")[0]
        seg = next(iter(sorted(flair.parent.glob(f"{case_id}_seg.nii*"))), None)
        if seg is not None:
            cases[case_id] = (flair, seg)
    if not cases:
        raise DataError(f"{raw}: no BraTS cases (<ID>_flair.nii.gz with <ID>_seg.nii.gz)")
    for case_id, (flair_path, seg_path) in cases.items():
        flair = _sitk_order(np.asarray(read_volume(flair_path).data))
        seg = _sitk_order(np.asarray(read_volume(seg_path).data))
        if flair.shape != seg.shape:
            raise DataError(f"{seg_path}: shape differs from {flair_path}")
        write_case(out / "data" / f"{case_id}.h5", *brats_case(flair, seg))
    ids = sorted(cases)
    if split_dir is not None:
        lines = []
        for name in ("train.txt", "val.txt", "test.txt"):
            listed = [s.split(",")[0].strip() for s in (split_dir / name).read_text().splitlines() if s.strip()]
            unknown = [i for i in listed if i not in cases]
            if unknown:
                raise DataError(f"{split_dir / name}: cases not in {raw}: {', '.join(unknown[:5])}")
            shutil.copyfile(split_dir / name, out / name)
            lines.append(f"{name}: {len(listed)} cases from {split_dir}")
        return [f"BraTS-2019: {len(ids)} cases -> {out / 'data'}", *lines]
    order = [ids[i] for i in np.random.default_rng(seed).permutation(len(ids))]
    n_val = round(len(ids) * BRATS_SPLIT[1] / sum(BRATS_SPLIT))
    n_test = round(len(ids) * BRATS_SPLIT[2] / sum(BRATS_SPLIT))
    n_train = len(ids) - n_val - n_test
    _write_list(out / "train.txt", order[:n_train])
    _write_list(out / "val.txt", order[n_train:n_train + n_val])
    _write_list(out / "test.txt", order[n_train + n_val:])
    return [f"BraTS-2019: {len(ids)} cases -> {out / 'data'}",
            f"warning: split {n_train} / {n_val} / {n_test} drawn with seed {seed}, not SSL4MIS's lists; pass "
            "--split-dir with SSL4MIS's train.txt / val.txt / test.txt for comparable numbers"]


DATASETS = ("acdc", "pancreas", "brats")


def convert(dataset: str, raw: Path, out: Path, labels: Path | None = None, split_dir: Path | None = None) -> list[str]:
    """Run the named converter; returns lines describing what was written."""
    if dataset not in DATASETS:
        raise DataError(f"unknown dataset {dataset!r}; converters: {', '.join(DATASETS)}")
    raw, out = Path(raw), Path(out)
    if not raw.is_dir():
        raise DataError(f"{raw}: raw dataset folder not found")
    out.mkdir(parents=True, exist_ok=True)
    if dataset == "pancreas":
        return convert_pancreas(raw, out, labels)
    if dataset == "brats":
        return convert_brats(raw, out, split_dir)
    return convert_acdc(raw, out)
