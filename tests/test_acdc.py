"""ACDC in the SSL4MIS layout: lists, patient-based labelled split, slice augmentation, slice-wise
inference (scipy-exact nearest resizing) and train -> evaluate with per-class RV / Myo / LV metrics."""

from __future__ import annotations

import csv
import json
from pathlib import Path

import numpy as np
import pytest
import torch
import yaml
from scipy import ndimage
from torch import nn

from helpers import semiseg
from semiseg.data import open_dataset
from semiseg.data.layouts.acdc import ACDCAugmentation, ACDCLayout, patient_of, write_synthetic_acdc
from semiseg.engine.inference import InferenceProtocol, predict_volume
from semiseg.engine.slicewise import slicewise_labels, zoom_indices, zoom_nearest_2d
from semiseg.errors import DataError


@pytest.fixture(scope="module")
def acdc_root(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return write_synthetic_acdc(tmp_path_factory.mktemp("acdc"), patients=6, shape=(4, 40, 36))


def test_layout_is_detected_with_its_lists(acdc_root: Path) -> None:
    layout = open_dataset(str(acdc_root))
    assert isinstance(layout, ACDCLayout)
    assert (layout.spatial_dims, layout.num_classes, layout.inference_mode) == (2, 4, "slicewise")
    assert layout.class_names[1:] == ("RV", "Myo", "LV")
    assert len(layout.train_ids) == 6 * 2 * 4 and layout.train_ids[0] == "patient001_frame01_slice_1"
    assert layout.val_ids == ["patient007_frame01", "patient007_frame12"]
    assert layout.test_ids == ["patient008_frame01", "patient008_frame12"]
    assert (acdc_root / "data" / "slices" / "patient001_frame12_slice_4.h5").is_file()


def test_patient_of_slice_names() -> None:
    assert patient_of("patient038_frame01_slice_3") == "patient038"
    assert patient_of("patient100_frame13_slice_12") == "patient100"


def test_labelled_set_is_the_slices_of_the_first_patients_in_list_order(acdc_root: Path, tmp_path: Path) -> None:
    layout = ACDCLayout(acdc_root)
    by_patient: dict[str, list[str]] = {}
    for slice_id in layout.train_ids:
        by_patient.setdefault(patient_of(slice_id), []).append(slice_id)
    # SSL4MIS lists are grouped by patient in a fixed, non-sorted order (patient099, 038, 050, ...)
    order = ["patient003", "patient001", "patient005", "patient002", "patient006", "patient004"]
    by_patient["patient001"] = by_patient["patient001"][:5]  # patients need not have equal slice counts
    layout.train_ids = [s for p in order for s in by_patient[p]]
    split = layout.split(2)
    assert split.labeled == by_patient["patient003"] + by_patient["patient001"]
    assert len(split.labeled) == 8 + 5 and layout.labeled_slices(2) == 13
    assert split.unlabeled == layout.train_ids[13:] and not split.val
    assert layout.labeled_slices(6) == len(layout.train_ids)
    assert layout.split(1, val=1).val == layout.val_ids
    with pytest.raises(DataError, match="only 6"):
        layout.split(7)


def test_reads_slices_for_training_and_volumes_for_evaluation(acdc_root: Path) -> None:
    layout = ACDCLayout(acdc_root)
    item = layout.read("patient002_frame12_slice_3")
    assert item.image.shape == (1, 40, 36) and item.label.shape == (40, 36)
    volume = layout.read_eval("patient007_frame01")
    assert volume.image.shape == (1, 4, 40, 36) and volume.label.shape == (4, 40, 36)
    assert set(np.unique(volume.label)) == {0, 1, 2, 3}
    assert volume.image.min() >= 0.0 and volume.image.max() <= 1.0


def test_slice_augmentation_keeps_image_and_label_aligned() -> None:
    rng = np.random.default_rng(0)
    label = rng.integers(0, 4, (1, 30, 26)).astype(np.uint8).repeat(2, 1)[0]  # (60, 26) blocky map
    sample = {"image": (label / 3.0).astype(np.float32)[None], "label": label}
    transform = ACDCAugmentation((32, 48))
    kinds = set()
    for seed in range(12):
        out = transform(sample, np.random.default_rng(seed))
        assert out["image"].shape == (1, 32, 48) and out["label"].shape == (32, 48)
        np.testing.assert_array_equal(np.rint(out["image"][0] * 3).astype(np.uint8), out["label"])
        kinds.add(out["label"].tobytes())
    assert len(kinds) > 3  # rotations and flips actually vary the output
    plain = ACDCAugmentation((32, 48), rot_flip=False)(sample, np.random.default_rng(0))
    np.testing.assert_array_equal(plain["label"], ndimage.zoom(label, (32 / 60, 48 / 26), order=0))


@pytest.mark.parametrize(("n_in", "n_out"), [(5, 9), (5, 17), (154, 256), (428, 256), (256, 212), (7, 7), (1, 4)])
def test_zoom_indices_match_scipy_order_0(n_in: int, n_out: int) -> None:
    source = np.arange(n_in)
    expected = ndimage.zoom(source, n_out / n_in, order=0)
    assert np.array_equal(zoom_indices(n_in, n_out).numpy(), expected)


class PixelNet(nn.Module):
    """Logits that depend on each pixel alone: class = number of thresholds 0.25 / 0.5 / 0.75 exceeded."""

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return torch.cat([-(x - t).abs() for t in (0.125, 0.375, 0.625, 0.875)], dim=1) * 10


def test_slicewise_inference_is_the_ssl4mis_per_slice_protocol() -> None:
    rng = np.random.default_rng(1)
    volume = rng.random((1, 5, 23, 31)).astype(np.float32)
    labels = slicewise_labels(PixelNet(), torch.from_numpy(volume), (32, 48), batch_size=2).numpy()
    expected = np.stack([
        ndimage.zoom(np.digitize(ndimage.zoom(s, (32 / 23, 48 / 31), order=0), [0.25, 0.5, 0.75]),
                     (23 / 32, 31 / 48), order=0) for s in volume[0]])
    assert labels.shape == (5, 23, 31)
    np.testing.assert_array_equal(labels, expected)
    single = slicewise_labels(PixelNet(), torch.from_numpy(volume), (32, 48), batch_size=1)
    assert torch.equal(single, torch.from_numpy(labels))
    protocol = InferenceProtocol("slicewise", (32, 48))
    np.testing.assert_array_equal(predict_volume(PixelNet(), volume, protocol, torch.device("cpu")), expected)


def test_zoom_nearest_2d_resizes_only_the_last_two_axes() -> None:
    x = torch.arange(2 * 3 * 4 * 5).view(2, 3, 4, 5)
    assert zoom_nearest_2d(x, (8, 10)).shape == (2, 3, 8, 10)
    assert torch.equal(zoom_nearest_2d(x, (4, 5)), x)


def test_supervised_trains_on_acdc_and_evaluate_reports_each_class(acdc_root: Path, tmp_path: Path) -> None:
    run = tmp_path / "run"
    semiseg("train", "--method", "supervised", "--data", str(acdc_root), "--labeled", "2", "--iterations", "4",
            "--out", str(run), "--set", "patch_size=32,32", "--set", "num_workers=0", "--set", "log_every=2",
            "--set", "val=1", "--set", "val_every=2", "--quiet")
    assert json.loads((run / "split.json").read_text())["labeled"][0] == "patient001_frame01_slice_1"
    records = [json.loads(line) for line in (run / "metrics.jsonl").read_text().splitlines()]
    assert [r["iteration"] for r in records if "val_dice" in r] == [2, 4]

    result = semiseg("evaluate", str(run), "--split", "test", "--out", str(tmp_path / "eval"))
    for name in ("RV", "Myo", "LV"):
        assert any(line.startswith(name) and "hd95" in line for line in result.stdout.splitlines())
    summary = json.loads((tmp_path / "eval" / "summary.json").read_text())
    assert summary["protocol"]["inference"]["mode"] == "slicewise"
    assert summary["protocol"]["dataset"]["class_names"] == ["background", "RV", "Myo", "LV"]
    with open(tmp_path / "eval" / "cases.csv") as f:
        rows = list(csv.DictReader(f))
    assert [r["case"] for r in rows] == ["patient008_frame01", "patient008_frame12"]
    for row in rows:
        for metric in ("dice", "jaccard", "hd95", "asd"):
            per_class = [float(row[f"{metric}_class{c}"]) for c in (1, 2, 3)]
            assert float(row[metric]) == pytest.approx(np.mean(per_class))
    assert 0.0 <= summary["metrics"]["dice_class3"]["mean"] <= 1.0


def test_crossmatch_acdc_preset_trains_and_evaluates_on_the_declared_val_list(acdc_root: Path, tmp_path: Path) -> None:
    run = tmp_path / "run"
    semiseg("train", "--method", "crossmatch", "--preset", "acdc-3", "--data", str(acdc_root), "--labeled", "2",
            "--iterations", "2", "--out", str(run), "--set", "patch_size=32,32", "--set", "batch_labeled=2",
            "--set", "batch_unlabeled=4", "--set", "num_workers=0", "--set", "log_every=1", "--quiet")
    cfg = yaml.safe_load((run / "config.yaml").read_text())
    assert (cfg["optimizer"], cfg["nesterov"], cfg["lr_schedule"], cfg["preset"]) == ("sgd", True, "poly", "acdc-3")
    records = [json.loads(line) for line in (run / "metrics.jsonl").read_text().splitlines()]
    assert [r["tau"] for r in records] == pytest.approx([0.95, 0.95])
    assert records[0]["lr"] == pytest.approx(0.01) and all(np.isfinite(r["loss/dkd"]) for r in records)

    result = semiseg("evaluate", str(run), "--split", "val", "--out", str(tmp_path / "eval"))
    table = {line.split()[0]: line for line in result.stdout.splitlines() if line.strip()}
    for name in ("RV", "Myo", "LV"):
        assert all(metric in table[name] for metric in ("dice", "jaccard", "hd95", "asd"))
    assert {"dice", "jaccard", "hd95", "asd"} <= set(table)  # the class means
    summary = json.loads((tmp_path / "eval" / "summary.json").read_text())
    assert summary["protocol"]["method"] == "crossmatch"
    assert summary["protocol"]["dataset"]["case_ids"] == ["patient007_frame01", "patient007_frame12"]
    assert {f"{m}_class{c}" for m in ("dice", "jaccard", "hd95", "asd") for c in (1, 2, 3)} <= set(summary["metrics"])
