"""`semiseg data prepare` checks: every kind of problem is reported with the file it concerns."""

from __future__ import annotations

import gzip
import json
import re
import sys
from collections.abc import Callable
from pathlib import Path

import nibabel as nib
import nrrd
import numpy as np
import pytest

from nifti_helpers import AFFINE, case_arrays, make_dataset, save_nifti
from semiseg.data.prepare import CACHE_DIR, PrepareError, check_dataset, prepare, read_volume

SHAPE = (16, 16, 12)


@pytest.fixture
def dataset(tmp_path: Path) -> Path:
    """Two labelled, one unlabelled and one test case (toy_000, toy_001 | toy_002 | toy_003), 2 channels."""
    return make_dataset(tmp_path / "ds", n_labeled=2, n_unlabeled=1, n_test=1, shape=SHAPE)


def _meta(root: Path, **changes: object) -> None:
    meta = json.loads((root / "dataset.json").read_text())
    meta.update(changes)
    (root / "dataset.json").write_text(json.dumps(meta))


def _label(root: Path, case: str = "toy_000") -> Path:
    return root / "labelsTr" / f"{case}.nii.gz"


def _image(root: Path, case: str = "toy_000", channel: int = 0) -> Path:
    return root / "imagesTr" / f"{case}_{channel:04d}.nii.gz"


def _relabel(root: Path, change: Callable[[np.ndarray], np.ndarray], affine: np.ndarray = AFFINE) -> None:
    data = np.asarray(nib.load(str(_label(root))).dataobj)
    save_nifti(_label(root), change(data), affine)


def _shifted(dx: float = 0.0, scale: float = 1.0, flip: bool = False) -> np.ndarray:
    affine = AFFINE.copy()
    affine[:3, 3] += dx
    affine[:3, 2] *= scale
    if flip:
        affine[:3, 0] *= -1
    return affine


def _with_nans(count: int) -> np.ndarray:
    image = np.random.default_rng(0).random(SHAPE).astype(np.float32)
    image.flat[:count] = np.nan
    return image


def _scaled(slope: float) -> Callable[[Path], object]:
    """An int16 image whose NIfTI scl_slope makes its values huge (Inf in float32)."""
    def write(root: Path) -> None:
        img = nib.Nifti1Image(np.random.default_rng(0).integers(1, 30000, SHAPE).astype(np.int16), AFFINE)
        img.header.set_slope_inter(slope, 0.0)
        nib.save(img, str(_image(root)))
    return write


def _header_only(shape: tuple[int, ...], dtype: type = np.float32) -> Callable[[Path], object]:
    """A .nii.gz whose header declares `shape` but holds only a few voxels (a damaged or hostile header)."""
    def write(root: Path) -> None:
        header = nib.Nifti1Header()
        header.set_data_dtype(dtype)
        header.set_data_shape(shape)
        header.set_qform(AFFINE, 1)
        blob = header.binaryblock + b"\0" * (352 - len(header.binaryblock)) + b"\0" * 4096
        _image(root).write_bytes(gzip.compress(blob))
    return write


CASES: dict[str, tuple[Callable[[Path], object], Callable[[Path], Path], str]] = {
    "dataset.json null": (lambda r: (r / "dataset.json").write_text("null"), lambda r: r / "dataset.json",
                          "must be a JSON object, got NoneType"),
    "channel_names a list": (lambda r: _meta(r, channel_names=["T2", "CT"]), lambda r: r / "dataset.json",
                             "channel_names must be a non-empty object"),
    "labels a list": (lambda r: _meta(r, labels=["background", "lower"]), lambda r: r / "dataset.json",
                      "labels must be a non-empty object"),
    "channel_names non-integer keys": (lambda r: _meta(r, channel_names={"zero": "T2", "one": "CT"}),
                                       lambda r: r / "dataset.json", 'channel_names keys must be "0".."1"'),
    "unlabeled not a list": (lambda r: _meta(r, unlabeled="toy_001"), lambda r: r / "dataset.json",
                             "unlabeled must be a list"),
    "label Inf": (lambda r: _relabel(r, lambda d: np.where(d == 2, np.inf, d).astype(np.float32)), _label,
                  "label holds [0-9]+ NaN/Inf values"),
    "label 1e20": (lambda r: _relabel(r, lambda d: np.where(d == 2, 1e20, d).astype(np.float64)), _label,
                   r"label values \[1e\+20\] are not declared in dataset.json labels \[0, 1, 2\]"),
    "scl_slope 1e38": (_scaled(1e38), _image, r"image values reach [0-9.]+e\+4[0-9], beyond what float32"),
    "values of 3e38": (lambda r: save_nifti(_image(r), np.where(_with_nans(0) > 0.5, 3e38, -3e38).astype(
        np.float32)), _image, r"image values reach 3e\+38"),
    "absurd NIfTI dimensions": (_header_only((32767, 32767, 32767)), _image,
                                "the NIfTI header declares a size of 32767x32767x32767 = 35,181,150,961,663 voxels"),
    "gzip bomb sized header": (_header_only((1024, 1024, 1024), np.uint8), _image,
                               "declares a size of 1024x1024x1024 .* over the limit of 268,435,456"),
    "no dataset.json": (lambda r: (r / "dataset.json").unlink(), lambda r: r / "dataset.json", "not found"),
    "invalid json": (lambda r: (r / "dataset.json").write_text("{labels: 1"), lambda r: r / "dataset.json",
                     "not valid JSON"),
    "missing keys": (lambda r: (r / "dataset.json").write_text('{"labels": {"background": 0}}'),
                     lambda r: r / "dataset.json", "missing channel_names"),
    "labels not consecutive": (lambda r: _meta(r, labels={"background": 0, "a": 1, "b": 3}),
                               lambda r: r / "dataset.json", r"consecutive from 0.*\[0, 1, 3\]"),
    "region labels": (lambda r: _meta(r, labels={"background": 0, "whole": [1, 2]}), lambda r: r / "dataset.json",
                      "region-based labels are not supported"),
    "file ending": (lambda r: _meta(r, file_ending=".mha"), lambda r: r / "dataset.json",
                    "file_ending '.mha' is not supported"),
    "bad image name": (lambda r: _image(r, "toy_001", 1).rename(r / "imagesTr" / "toy_001b.nii.gz"),
                       lambda r: r / "imagesTr" / "toy_001b.nii.gz", "names must be CASE_XXXX.nii.gz"),
    "undeclared channel": (lambda r: save_nifti(_image(r, "toy_000", 2), np.ones(SHAPE, np.float32)),
                           lambda r: _image(r, "toy_000", 2), "channel 2 but dataset.json declares 2"),
    "missing channel": (lambda r: _image(r, "toy_001", 1).unlink(), lambda r: _image(r, "toy_001", 1),
                        "missing: case 'toy_001' needs 2 channel files"),
    "no label": (lambda r: _label(r, "toy_001").unlink(), lambda r: _image(r, "toy_001"),
                 "no label labelsTr/toy_001.nii.gz"),
    "label without image": (lambda r: save_nifti(_label(r, "toy_009"), np.zeros(SHAPE, np.uint8)),
                            lambda r: _label(r, "toy_009"), "label without image"),
    "stray label in imagesUnlabeled": (lambda r: save_nifti(_label(r, "toy_002"), np.zeros(SHAPE, np.uint8)),
                                       lambda r: _label(r, "toy_002"), "stray label: case 'toy_002' is in "
                                       "imagesUnlabeled"),
    "stray label of a listed unlabeled case": (lambda r: _meta(r, unlabeled=["toy_001"], numTraining=2),
                                               lambda r: _label(r, "toy_001"),
                                               "stray label: case 'toy_001' is listed as unlabeled"),
    "listed unlabeled case without images": (lambda r: _meta(r, unlabeled=["ghost"]), lambda r: r / "dataset.json",
                                             "unlabeled case 'ghost' has no images"),
    "numTraining": (lambda r: _meta(r, numTraining=5), lambda r: r / "dataset.json",
                    "numTraining is 5 but imagesTr/ holds 2 cases"),
    "label shape": (lambda r: _relabel(r, lambda d: d[:, :, :-1]), _label, r"label shape \(16, 16, 11\) differs"),
    "label origin": (lambda r: _relabel(r, lambda d: d, _shifted(dx=3.0)), _label,
                     "label geometry differs from its image: origin"),
    "label spacing": (lambda r: _relabel(r, lambda d: d, _shifted(scale=1.5)), _label,
                      "label geometry differs from its image: spacing"),
    "label direction": (lambda r: _relabel(r, lambda d: d, _shifted(flip=True)), _label,
                        r"label geometry differs from its image: direction"),
    "undeclared label value": (lambda r: _relabel(r, lambda d: np.where(d == 2, 7, d).astype(np.uint8)), _label,
                               r"label values \[7\] are not declared in dataset.json labels \[0, 1, 2\]"),
    "non-integer label": (lambda r: _relabel(r, lambda d: d.astype(np.float32) * 0.5), _label,
                          "non-integer values"),
    "NaN image": (lambda r: save_nifti(_image(r), _with_nans(3)), _image, "3 NaN/Inf voxels"),
    "empty image": (lambda r: save_nifti(_image(r), np.zeros(SHAPE, np.float32)), _image,
                    "image is empty: every voxel equals 0"),
    "4D image": (lambda r: save_nifti(_image(r), np.ones((*SHAPE, 2), np.float32)), _image,
                 r"expected one 3D volume per channel file"),
    "channel shape": (lambda r: save_nifti(_image(r, channel=1), np.random.rand(16, 16, 10).astype(np.float32)),
                      lambda r: _image(r, channel=1), r"shape \(16, 16, 10\) differs from channel 0"),
    "channel geometry": (lambda r: save_nifti(_image(r, channel=1), np.random.rand(*SHAPE).astype(np.float32),
                                              _shifted(dx=5.0)),
                         lambda r: _image(r, channel=1), "geometry differs from channel 0: origin"),
    "truncated file": (lambda r: _image(r).write_bytes(gzip.compress(b"\0" * 400)[:60]), _image,
                       "unreadable image"),
    "test label without image": (lambda r: save_nifti(r / "labelsTs" / "toy_042.nii.gz", np.zeros(SHAPE, np.uint8)),
                                 lambda r: r / "labelsTs" / "toy_042.nii.gz", "label without image"),
    "no labelled case": (lambda r: [p.unlink() for p in (r / "labelsTr").iterdir()] and _meta(
        r, unlabeled=["toy_000", "toy_001"]), lambda r: r / "labelsTr", "no labelled training case"),
}


@pytest.mark.parametrize("name", list(CASES))
def test_each_problem_names_its_file(dataset: Path, name: str) -> None:
    mutate, where, message = CASES[name]
    mutate(dataset)
    problems = check_dataset(dataset).problems
    assert problems, f"{name}: no problem reported"
    text = "\n".join(str(p) for p in problems)
    assert any(p.path == where(dataset) and re.search(message, p.message) for p in problems), text


def test_clean_dataset_has_no_problem_and_all_problems_come_at_once(dataset: Path) -> None:
    assert check_dataset(dataset).problems == []
    save_nifti(_image(dataset, "toy_001"), np.zeros(SHAPE, np.float32))
    _relabel(dataset, lambda d: np.where(d == 2, 9, d).astype(np.uint8))
    with pytest.raises(PrepareError) as info:
        prepare(dataset)
    assert len(info.value.problems) == 2
    assert str(_image(dataset, "toy_001")) in str(info.value) and str(_label(dataset)) in str(info.value)
    assert not (dataset / CACHE_DIR).exists()  # nothing written when anything is wrong


def test_cli_prints_every_problem_and_exits_2(dataset: Path, capsys: pytest.CaptureFixture[str],
                                              monkeypatch: pytest.MonkeyPatch) -> None:
    from semiseg.cli import main

    _label(dataset, "toy_001").unlink()
    save_nifti(dataset / "imagesUnlabeled" / "toy_002_0000.nii.gz", np.full(SHAPE, np.nan, np.float32))
    monkeypatch.setattr(sys, "argv", ["semiseg", "data", "prepare", str(dataset), "--check"])
    with pytest.raises(SystemExit) as exit_info:
        main()
    assert exit_info.value.code == 2
    err = capsys.readouterr().err
    assert "2 problem(s)" in err
    assert f"{_image(dataset, 'toy_001')}: no label" in err
    assert f"{dataset / 'imagesUnlabeled' / 'toy_002_0000.nii.gz'}: image has {np.prod(SHAPE)} NaN/Inf" in err


def test_nrrd_dataset_reads_lps_geometry(tmp_path: Path) -> None:
    """NRRD files (LPS world, as Slicer writes them) check and prepare like NIfTI; the affine becomes RAS."""
    root = tmp_path / "nrrd"
    meta = {"channel_names": {"0": "MRI"}, "labels": {"background": 0, "a": 1, "b": 2}, "file_ending": ".nrrd"}
    root.mkdir()
    (root / "dataset.json").write_text(json.dumps(meta))
    header = {"space": "left-posterior-superior", "space directions": np.diag([0.5, 0.5, 2.0]),
              "space origin": np.array([10.0, 20.0, -30.0])}
    for i in range(2):
        image, _, label = case_arrays(i, SHAPE)
        (root / "imagesTr").mkdir(exist_ok=True)
        (root / "labelsTr").mkdir(exist_ok=True)
        nrrd.write(str(root / "imagesTr" / f"c{i}_0000.nrrd"), image, header)
        nrrd.write(str(root / "labelsTr" / f"c{i}.nrrd"), label, header)
    vol = read_volume(root / "imagesTr" / "c0_0000.nrrd")
    np.testing.assert_allclose(vol.affine, [[-0.5, 0, 0, -10], [0, -0.5, 0, -20], [0, 0, 2, -30], [0, 0, 0, 1]])
    assert check_dataset(root).problems == []
    cache = prepare(root)
    manifest = json.loads((cache / "prepared.json").read_text())
    assert manifest["labeled"] == ["c0", "c1"]
    # RAS+ reorientation flips the two in-plane axes: voxel (0, 0, 0) of the cache is the file's last in x, y.
    np.testing.assert_allclose(manifest["cases"]["c0"]["affine"][0], [0.5, 0, 0, -10 - 0.5 * (SHAPE[0] - 1)])
