"""Converters of the raw public datasets, on tiny synthetic raw inputs written like the real downloads."""

from __future__ import annotations

from pathlib import Path

import h5py
import nibabel as nib
import numpy as np
import pytest
from skimage.exposure import cumulative_distribution

from semiseg.data.convert import (
    ACDC_FIRST,
    PANCREAS_FIRST,
    PANCREAS_TEST,
    brats_case,
    cdf_threshold,
    convert,
    pancreas_case,
)
from semiseg.data.layouts import open_layout
from semiseg.errors import DataError


def _nii(path: Path, data: np.ndarray, spacing: tuple[float, float, float] = (1.0, 1.0, 1.0)) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    nib.save(nib.Nifti1Image(data, np.diag([*spacing, 1.0])), str(path))


def _h5(path: Path) -> tuple[np.ndarray, np.ndarray]:
    with h5py.File(path, "r") as f:
        return f["image"][()], f["label"][()]


def _lines(path: Path) -> list[str]:
    return path.read_text().split()


def test_acdc_volumes_slices_and_lists(tmp_path: Path) -> None:
    raw = tmp_path / "ACDC" / "training"
    rng = np.random.default_rng(0)
    patients = (1, 2, 38, 99, 5)  # test, val, labelled-first (038 after 099), one more training patient
    for p in patients:
        for frame in (1, 12):
            name = f"patient{p:03d}_frame{frame:02d}"
            image = rng.integers(0, 500, (20, 16, 3)).astype(np.int16)  # nibabel (x, y, z)
            label = rng.integers(0, 4, (20, 16, 3)).astype(np.uint8)
            _nii(raw / f"patient{p:03d}" / f"{name}.nii.gz", image, (1.5, 1.5, 10.0))
            _nii(raw / f"patient{p:03d}" / f"{name}_gt.nii.gz", label, (1.5, 1.5, 10.0))
    out = tmp_path / "out"
    convert("acdc", tmp_path / "ACDC", out)
    image, label = _h5(out / "data" / "patient038_frame12.h5")
    source = np.asarray(nib.load(str(raw / "patient038" / "patient038_frame12.nii.gz")).dataobj).astype(float)
    assert image.shape == label.shape == (3, 16, 20)  # (D, H, W)
    expected = (source - source.min()) / (source.max() - source.min())
    np.testing.assert_allclose(image, expected.transpose(2, 1, 0), rtol=1e-6)
    slice_image, slice_label = _h5(out / "data" / "slices" / "patient038_frame12_slice_1.h5")  # 1-based
    np.testing.assert_array_equal(slice_image, image[0])
    np.testing.assert_array_equal(slice_label, label[0])
    assert not (out / "data" / "slices" / "patient038_frame12_slice_0.h5").exists()
    assert _lines(out / "test.list") == ["patient001_frame01", "patient001_frame12"]
    assert _lines(out / "val.list") == ["patient002_frame01", "patient002_frame12"]
    slices = _lines(out / "train_slices.list")
    assert ACDC_FIRST.index(99) < ACDC_FIRST.index(38)
    assert slices[:6] == [f"patient099_frame{f:02d}_slice_{k}" for f in (1, 12) for k in (1, 2, 3)]
    assert slices[6:12] == [f"patient038_frame{f:02d}_slice_{k}" for f in (1, 12) for k in (1, 2, 3)]
    assert slices[12:] == [f"patient005_frame{f:02d}_slice_{k}" for f in (1, 12) for k in (1, 2, 3)]
    assert _lines(out / "train.list")[0] == "patient099_frame01"
    layout = open_layout(out)
    assert layout.name == "acdc"
    assert layout.split(1).labeled == slices[:6]  # 1 labelled patient = both frames of patient099
    assert layout.read_eval("patient001_frame01").image.shape == (1, 3, 16, 20)


def test_acdc_rejects_labels_outside_0_to_3(tmp_path: Path) -> None:
    _nii(tmp_path / "raw" / "patient003_frame01.nii.gz", np.ones((4, 4, 2), np.float32))
    _nii(tmp_path / "raw" / "patient003_frame01_gt.nii.gz", np.full((4, 4, 2), 5, np.uint8))
    with pytest.raises(DataError, match=r"patient003_frame01_gt.nii.gz: label values \[5\]"):
        convert("acdc", tmp_path / "raw", tmp_path / "out")


def test_pancreas_resample_window_crop_zscore() -> None:
    shape, spacing = (150, 150, 6), np.array([0.8, 0.8, 2.5])
    grid = np.indices(shape).astype(float)
    centre = np.array([60, 80, 3])[:, None, None, None]
    inside = (((grid - centre) * spacing[:, None, None, None]) ** 2).sum(0) <= 6.0 ** 2  # 6 mm ball
    image = np.where(inside, 100.0, -1000.0).astype(np.float32)
    image[:10] = 500.0  # above the window
    out, label = pancreas_case(image, inside.astype(np.uint8), spacing)
    assert out.shape == label.shape == (96, 96, 15)  # 1 mm: 120 x 120 x 15, x / y cropped to 96
    assert out.dtype == np.float32 and abs(out.mean()) < 1e-4 and abs(out.std() - 1) < 1e-3
    assert 0.8 * 4 / 3 * np.pi * 6**3 < label.sum() < 1.2 * 4 / 3 * np.pi * 6**3  # volume kept in mm^3
    # HU -1000 and the clipped 500 map to the two window ends; the ball sits at the window's 225/400.
    low, high = out.min(), out.max()
    ball = np.median(out[label > 0])
    np.testing.assert_allclose((ball - low) / (high - low), 225 / 400, atol=0.02)
    xs = np.flatnonzero(label.any(axis=(1, 2)))
    assert xs.min() >= 25 and out.shape[0] - 1 - xs.max() >= 25  # at least the 25-voxel margin


def test_pancreas_lists_follow_mc_net(tmp_path: Path) -> None:
    numbers = (PANCREAS_FIRST[1], PANCREAS_FIRST[0], PANCREAS_TEST[0], 2)
    for n in numbers:
        image = np.full((40, 40, 4), -1000.0, np.float32)
        label = np.zeros((40, 40, 4), np.uint8)
        label[18:22, 18:22, 1:3] = 1
        image[label > 0] = 60
        _nii(tmp_path / "raw" / f"PANCREAS_{n:04d}" / f"PANCREAS_{n:04d}.nii.gz", image)
        _nii(tmp_path / "labels" / f"label{n:04d}.nii.gz", label)
    lines = convert("pancreas", tmp_path / "raw", tmp_path / "out", labels=tmp_path / "labels")
    assert _lines(tmp_path / "out" / "train.list") == ["image0057", "image0018", "image0002"]
    assert _lines(tmp_path / "out" / "test.list") == ["image0050"]
    image, label = _h5(tmp_path / "out" / "Pancreas_h5" / "image0057_norm.h5")
    assert image.shape == (96, 96, 4) and label.sum() == 32  # padded to the 96 minimum, z kept
    assert any("missing" in line for line in lines)
    layout = open_layout(tmp_path / "out")
    assert layout.name == "pancreas" and layout.split(2).labeled == ["image0057", "image0018"]
    assert layout.read_eval("image0050").label.sum() == 32


def test_cdf_threshold_matches_skimage() -> None:
    rng = np.random.default_rng(0)
    for image in (rng.integers(0, 3000, (30, 30, 30)).astype(np.int16),
                  (rng.gamma(2.0, 100.0, (30, 30, 30))).astype(np.float32),
                  rng.gamma(2.0, 100.0, (20, 20, 20))):
        cdf, centres = cumulative_distribution(image)
        for fraction in (0.5, 0.999):
            assert cdf_threshold(image, fraction) == pytest.approx(float(centres[cdf >= fraction][0]))


def test_brats_crop_clip_zscore() -> None:
    rng = np.random.default_rng(1)
    flair = np.zeros((24, 24, 24), np.int16)
    flair[2:22, 3:21, 1:23] = rng.integers(1, 1000, (20, 18, 22))
    flair[5, 6, 8] = 30000  # a hot voxel above the 99.9 % bin
    seg = np.zeros_like(flair, dtype=np.uint8)
    seg[4:6, 5:8, 6:9] = 2
    seg[6, 7, 9] = 4
    image, label = brats_case(flair, seg)
    crop = (slice(2, 21), slice(3, 20), slice(1, 22))  # the end is exclusive: the last nonzero index is dropped
    assert image.shape == label.shape == (19, 17, 21)
    assert set(np.unique(label)) == {0, 1} and label.sum() == 2 * 3 * 3 + 1
    cropped = flair[crop]
    threshold = cdf_threshold(cropped)
    assert 990 <= threshold < 1000
    clipped = np.clip(cropped, cropped.min(), threshold).astype(np.float32)
    positive = clipped[clipped > 0]
    np.testing.assert_allclose(image, (clipped - positive.mean()) / positive.std(), rtol=1e-5, atol=1e-5)
    assert abs(image[cropped > 0].mean()) < 1e-5 and abs(image[cropped > 0].std() - 1) < 1e-4


def test_brats_cases_and_split(tmp_path: Path) -> None:
    ids = [f"BraTS19_TCIA01_{i:03d}_1" for i in range(14)]
    for i, case_id in enumerate(ids):
        flair = np.zeros((10, 11, 12), np.int16)
        flair[1:9, 2:10, 3:11] = 100 + i
        flair[4, 5, 6] = 300
        seg = np.zeros_like(flair)
        seg[3:5, 4:6, 5:7] = 1
        folder = tmp_path / "raw" / "HGG" / case_id
        _nii(folder / f"{case_id}_flair.nii.gz", flair)
        _nii(folder / f"{case_id}_seg.nii.gz", seg)
    lines = convert("brats", tmp_path / "raw", tmp_path / "out")
    image, label = _h5(tmp_path / "out" / "data" / f"{ids[3]}.h5")
    assert image.shape == (7, 7, 7)  # (D, H, W) = nibabel (z, y, x), each axis cropped to its nonzero box
    splits = [_lines(tmp_path / "out" / f"{n}.txt") for n in ("train", "val", "test")]
    assert [len(s) for s in splits] == [10, 1, 3] and sorted(sum(splits, [])) == ids
    assert any("not SSL4MIS" in line for line in lines)
    layout = open_layout(tmp_path / "out")
    assert layout.name == "brats" and layout.val_ids == splits[1]
    assert layout.read(ids[3]).label.sum() == 2 * 2 * 2
    official = tmp_path / "lists"
    official.mkdir()
    for name, part in zip(("train", "val", "test"), (ids[:8], ids[8:10], ids[10:]), strict=True):
        (official / f"{name}.txt").write_text("\n".join(part) + "\n")
    convert("brats", tmp_path / "raw", tmp_path / "out2", split_dir=official)
    assert _lines(tmp_path / "out2" / "val.txt") == ids[8:10]
    (official / "test.txt").write_text("BraTS19_UNKNOWN\n")
    with pytest.raises(DataError, match="BraTS19_UNKNOWN"):
        convert("brats", tmp_path / "raw", tmp_path / "out3", split_dir=official)


def test_unknown_dataset_and_missing_folder(tmp_path: Path) -> None:
    with pytest.raises(DataError, match="converters: acdc, pancreas, brats"):
        convert("kits", tmp_path, tmp_path / "out")
    with pytest.raises(DataError, match="raw dataset folder not found"):
        convert("acdc", tmp_path / "nope", tmp_path / "out")
