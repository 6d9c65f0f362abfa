"""Own data end to end: NIfTI folder -> prepare -> train -> predict (scanner geometry) -> evaluate -> report."""

from __future__ import annotations

import json
import sys
from pathlib import Path

import h5py
import nibabel as nib
import nrrd
import numpy as np
import pytest

from nifti_helpers import AFFINE, SHAPE, case_arrays, make_dataset
from semiseg.data import open_dataset
from semiseg.data.prepare import (
    ChannelNorm,
    Recipe,
    Volume,
    prepare,
    read_volume,
    resampled_affine,
    write_label_like,
)
from semiseg.engine.predict import group_inputs
from semiseg.errors import DataError


def run_cli(monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture[str], *args: str) -> str:
    from semiseg.cli import main

    monkeypatch.setattr(sys, "argv", ["semiseg", *map(str, args)])
    with pytest.raises(SystemExit) as info:
        main()
    captured = capsys.readouterr()
    assert info.value.code == 0, captured.err
    return captured.out


def _world_centroid(mask: np.ndarray, affine: np.ndarray) -> np.ndarray:
    return (affine @ np.append(np.argwhere(mask).mean(0), 1.0))[:3]


def test_resampled_affine_keeps_the_field_of_view() -> None:
    affine = np.diag([1.0, 2.0, 3.0, 1.0])
    affine[:3, 3] = [10.0, 20.0, 30.0]
    new = resampled_affine(affine, (10, 10, 10), (4, 5, 10))
    # voxel size x: 10 / 4 = 2.5 old voxels; new voxel 0's centre at old index 0.75 (edges stay at -0.5).
    np.testing.assert_allclose(new[:3, :3], np.diag([2.5, 4.0, 3.0]))
    np.testing.assert_allclose(new[:3, 3], [10.75, 20.0 + 2 * 0.5, 30.0])
    corner = np.array([-0.5, -0.5, -0.5, 1.0])  # the outer edges of the first and last voxels stay put
    np.testing.assert_allclose(affine @ corner, new @ corner)
    np.testing.assert_allclose(affine @ np.array([9.5, 9.5, 9.5, 1.0]), new @ np.array([3.5, 4.5, 9.5, 1.0]))


def test_recipe_reorients_and_restores_the_scanner_grid_exactly() -> None:
    _, _, label = case_arrays(0)
    scan = Volume(label.astype(np.float32), AFFINE, None)
    image, affine = Recipe([ChannelNorm("x", "none")]).image([scan])
    assert image.shape == (1, SHAPE[1], SHAPE[0], SHAPE[2])  # axes swapped into R, A, S order
    assert np.all(np.diag(affine)[:3] > 0)  # RAS+: every axis increases along R, A, S
    np.testing.assert_allclose(_world_centroid(image[0] == 2, affine), _world_centroid(label == 2, AFFINE))
    restored = Recipe([ChannelNorm("x", "none")]).restore(image[0].astype(np.uint8), scan)
    np.testing.assert_array_equal(restored, label)


def test_recipe_resamples_and_maps_predictions_back_in_world_space() -> None:
    _, _, label = case_arrays(1, (40, 44, 20))
    scan = Volume(label.astype(np.float32), AFFINE, None)
    recipe = Recipe([ChannelNorm("x", "none")], spacing=(1.6, 1.6, 1.0))
    image, affine = recipe.image([scan])
    assert image.shape == (1, 28, 25, 40)  # (44, 40, 20) voxels of (1, 1, 2) mm -> 1.6, 1.6, 1 mm
    np.testing.assert_allclose(np.sqrt((affine[:3, :3] ** 2).sum(0)), [44 / 28, 40 / 25, 1.0])
    resampled_label = recipe.label(Volume(label, AFFINE, None), image.shape[1:])
    for c in (1, 2):  # each class stays where it was in scanner space (within a fraction of a voxel)
        shift = _world_centroid(resampled_label == c, affine) - _world_centroid(label == c, AFFINE)
        assert np.linalg.norm(shift) < 0.5
    fine = Recipe([ChannelNorm("x", "none")], spacing=(0.5, 0.5, 1.0))
    fine_image, fine_affine = fine.image([scan])
    assert fine_image.shape == (1, 88, 80, 40)
    oracle = fine.label(Volume(label, AFFINE, None), fine_image.shape[1:])  # a perfect prediction, finer grid
    back = fine.restore(oracle, scan)
    assert back.dtype == np.uint8
    np.testing.assert_array_equal(back, label)  # 2x finer in-plane, 2x along z: nearest maps back exactly


def test_ct_channel_uses_the_dataset_window_and_statistics(tmp_path: Path) -> None:
    root = make_dataset(tmp_path / "ds", n_labeled=3, n_unlabeled=0, n_test=0)
    cache = prepare(root, ct_window=(0.0, 200.0))
    manifest = json.loads((cache / "prepared.json").read_text())
    ct = manifest["recipe"]["channels"][1]
    assert ct["scheme"] == "ct" and ct["window"] == [0.0, 200.0]
    _, hu, label = case_arrays(0)
    foreground = np.clip(np.concatenate([case_arrays(i)[1][case_arrays(i)[2] > 0] for i in range(3)]), 0, 200)
    assert ct["mean"] == pytest.approx(foreground.mean(), rel=1e-6)  # all foreground voxels: < 10k per case
    assert ct["std"] == pytest.approx(foreground.std(), rel=1e-6)
    with h5py.File(cache / "cases" / "toy_000.h5") as f:
        image = f["image"][()]
    expected = (np.clip(hu, 0, 200) - ct["mean"]) / ct["std"]
    np.testing.assert_allclose(image[1], np.transpose(expected, (1, 0, 2))[::-1, ::-1], rtol=1e-5, atol=1e-5)
    np.testing.assert_allclose(image[0].mean(), 0.0, atol=1e-5)  # the T2 channel is z-scored per volume
    default = json.loads((prepare(root) / "prepared.json").read_text())["recipe"]["channels"][1]["window"]
    assert default == pytest.approx([np.percentile(np.concatenate(
        [case_arrays(i)[1][case_arrays(i)[2] > 0] for i in range(3)]), q) for q in (0.5, 99.5)])


def test_layout_splits_use_labelled_cases_only(tmp_path: Path) -> None:
    root = make_dataset(tmp_path / "ds", n_labeled=4, n_unlabeled=2, n_test=1, channels=1)
    prepare(root)
    layout = open_dataset(str(root))
    assert layout.name == "nnunet" and layout.num_classes == 3
    assert layout.class_names == ("background", "lower", "upper")
    split = layout.split(2, 1)
    assert split.labeled == ["toy_000", "toy_001"] and split.val == ["toy_003"]
    assert split.unlabeled == ["toy_002", "toy_004", "toy_005"] and split.test == ["toy_006"]
    with pytest.raises(DataError, match="need 5 labelled cases but the dataset has 4; pass --labeled 3"):
        layout.split(4, 1)
    case = layout.read("toy_004", with_label=False)
    assert case.image.shape == (1, SHAPE[1], SHAPE[0], SHAPE[2]) and case.label is None


def test_unprepared_folder_says_how_to_prepare(tmp_path: Path) -> None:
    root = make_dataset(tmp_path / "ds", n_labeled=1, n_unlabeled=0, n_test=0, channels=1)
    with pytest.raises(DataError, match=r"not prepared yet; run `semiseg data prepare"):
        open_dataset(str(root))


def test_channel_files_are_grouped_by_case(tmp_path: Path) -> None:
    for name in ("a_0000.nii.gz", "a_0001.nii.gz", "b_0000.nii.gz", "b_0001.nii.gz", "c.nii.gz"):
        (tmp_path / name).touch()
    assert group_inputs([tmp_path / "a_0000.nii.gz"], 2) == {"a": [tmp_path / "a_0000.nii.gz",
                                                                   tmp_path / "a_0001.nii.gz"]}
    assert list(group_inputs([tmp_path / "c.nii.gz"], 1)) == ["c"]
    with pytest.raises(DataError, match=r"case 'c': the model expects 2 channel file\(s\)"):
        group_inputs([tmp_path], 2)


def test_nrrd_label_keeps_the_reference_header(tmp_path: Path) -> None:
    header = {"space": "left-posterior-superior", "space directions": np.diag([0.7, 0.7, 3.0]),
              "space origin": np.array([1.0, 2.0, 3.0])}
    nrrd.write(str(tmp_path / "scan.nrrd"), np.random.rand(6, 5, 4).astype(np.float32), header)
    scan = read_volume(tmp_path / "scan.nrrd")
    write_label_like(tmp_path / "out.nrrd", np.ones((6, 5, 4), np.uint8), scan)
    label = read_volume(tmp_path / "out.nrrd")
    np.testing.assert_allclose(label.affine, scan.affine)
    assert label.data.dtype == np.uint8 and label.header["space"] == "left-posterior-superior"


def test_round_trip_prepare_train_predict_evaluate_report(tmp_path: Path, monkeypatch: pytest.MonkeyPatch,
                                                         capsys: pytest.CaptureFixture[str]) -> None:
    root = make_dataset(tmp_path / "MyData", n_labeled=4, n_unlabeled=2, n_test=2)
    out = run_cli(monkeypatch, capsys, "data", "prepare", root, "--spacing", "1.5,1.5,2")
    assert f"prepared 4 labelled, 2 unlabelled and 2 labelled test cases: {root / 'semiseg-prepared'}" in out
    assert f"semiseg train --method mean_teacher --data {root} --labeled 4" in out
    run = tmp_path / "run"
    run_cli(monkeypatch, capsys, "train", "--method", "supervised", "--data", root, "--labeled", "3",
            "--iterations", "3", "--out", run, "--quiet", "--set", "patch_size=16,16,16", "--set", "stride=8,8,8",
            "--set", "n_filters=4", "--set", "num_workers=0", "--set", "log_every=1")
    assert len((run / "metrics.jsonl").read_text().splitlines()) == 3
    out = run_cli(monkeypatch, capsys, "predict", run, root / "imagesTs", "--out", tmp_path / "pred",
                  "--device", "cpu")
    assert sorted(Path(line).name for line in out.split()) == ["toy_006.nii.gz", "toy_007.nii.gz"]
    for case_id in ("toy_006", "toy_007"):
        scan = nib.load(str(root / "imagesTs" / f"{case_id}_0000.nii.gz"))
        pred = nib.load(str(tmp_path / "pred" / f"{case_id}.nii.gz"))
        assert pred.shape == scan.shape == SHAPE
        np.testing.assert_allclose(pred.affine, scan.affine)
        np.testing.assert_allclose(pred.header.get_zooms(), scan.header.get_zooms())
        assert pred.header["descrip"] == scan.header["descrip"]
        assert pred.get_data_dtype() == np.uint8 and set(np.unique(np.asarray(pred.dataobj))) <= {0, 1, 2}
    # One file: its sibling channel file (toy_006_0001) comes along, and the labels equal the folder run's.
    out = run_cli(monkeypatch, capsys, "predict", run, root / "imagesTs" / "toy_006_0000.nii.gz", "--out",
                  tmp_path / "one", "--device", "cpu")
    assert out.split() == [str(tmp_path / "one" / "toy_006.nii.gz")]
    np.testing.assert_array_equal(nib.load(str(tmp_path / "one" / "toy_006.nii.gz")).get_fdata(),
                                  nib.load(str(tmp_path / "pred" / "toy_006.nii.gz")).get_fdata())
    run_cli(monkeypatch, capsys, "evaluate", run, "--save-predictions", "--device", "cpu")
    assert sorted(p.name for p in (run / "eval-test" / "predictions").iterdir()) == ["toy_006.nii.gz",
                                                                                    "toy_007.nii.gz"]
    out = run_cli(monkeypatch, capsys, "report", run)
    index = run / "report" / "index.html"
    assert f"report: {index}" in out
    page = index.read_text()
    assert page.count("<tr><td><a href='#case-toy_00") == 2 and "Dice upper" in page and "95HD upper (mm)" in page
    for image in ("curves.png", "cases/toy_006.png", "cases/toy_007.png"):
        assert (run / "report" / image).read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
        assert f'src="{image}"' in page


def test_prediction_needs_the_training_data_to_repeat_its_preprocessing(tmp_path: Path) -> None:
    from semiseg.engine.predict import load_recipe

    root = make_dataset(tmp_path / "ds", n_labeled=1, n_unlabeled=0, n_test=0, channels=1)
    prepare(root, spacing="2,2,2")
    assert load_recipe(str(root)).spacing == (2.0, 2.0, 2.0)
    assert load_recipe("synthetic:n_train=4") is None
    with pytest.raises(DataError, match="pass --data with the dataset"):
        load_recipe(str(tmp_path / "moved"))


def test_2d_model_labels_nifti_volumes_slice_by_slice(tmp_path: Path) -> None:
    """A 2D (ACDC) model sees a NIfTI scan in the ACDC files' (z, y, x) order: same labels as the h5 volume."""
    from semiseg.config import build_config
    from semiseg.data.layouts.acdc import write_synthetic_acdc
    from semiseg.engine.predict import predict_files
    from semiseg.engine.trainer import Trainer

    root = write_synthetic_acdc(tmp_path / "acdc", patients=2, shape=(3, 32, 28))
    cfg = build_config("supervised", None, {"data": str(root), "labeled": 1, "iterations": 15, "optimizer": "adamw",
                                            "lr": 0.01, "patch_size": (32, 32), "num_workers": 0})
    Trainer(cfg, tmp_path / "run", progress=False).run()
    volume = root / "data" / "patient004_frame01.h5"  # the test patient: (D, H, W) in [0, 1]
    with h5py.File(volume) as f:
        image = f["image"][()]
    affine = np.diag([1.4, 1.4, 10.0, 1.0])
    nib.save(nib.Nifti1Image(image.transpose(2, 1, 0), affine), str(tmp_path / "scan.nii.gz"))
    from_h5, from_nifti = (predict_files(tmp_path / "run", [path], tmp_path / "pred", "cpu")[0]
                           for path in (volume, tmp_path / "scan.nii.gz"))
    with h5py.File(from_h5) as f:
        reference = f["label"][()]
    pred = nib.load(str(from_nifti))
    assert pred.shape == (28, 32, 3) and np.allclose(pred.affine, affine)
    assert len(np.unique(reference)) > 1  # a spatially varying answer, so the axis order is really checked
    np.testing.assert_array_equal(np.asarray(pred.dataobj).transpose(2, 1, 0), reference)
