"""Pancreas-CT (MC-Net layout) and BraTS-2019 (SSL4MIS layout): detection, splits, reading, a short
`semiseg train --method mlrpl` with each paper preset, and the 96/16 evaluation windows."""

from __future__ import annotations

import json
import math
from pathlib import Path

import numpy as np
import pytest
from typer.testing import CliRunner

from semiseg.cli import app
from semiseg.config import build_config
from semiseg.data import open_dataset
from semiseg.data.h5 import write_case
from semiseg.data.synthetic import make_case
from semiseg.engine.inference import window_starts
from semiseg.engine.trainer import inference_protocol
from semiseg.errors import DataError

TINY = {"patch_size": (32, 32, 32), "stride": (16, 16, 16), "n_filters": 4, "iterations": 2, "num_workers": 0,
        "device": "cpu", "log_every": 1}


def _pancreas(root: Path, n_train: int = 8, n_test: int = 2) -> Path:
    """MC-Net layout: image0001_norm.h5 ... in Pancreas_h5/, volumes (W, H, D)."""
    ids = [f"image{i:04d}" for i in (57, 18, 62, 31, 20, 17, 32, 79, 50, 59)][: n_train + n_test]
    for k, case_id in enumerate(ids):
        image, label = make_case(1, k, (40, 36, 34))
        write_case(root / "Pancreas_h5" / f"{case_id}_norm.h5", image, label)
    (root / "train.list").write_text("\n".join(ids[:n_train]) + "\n")
    (root / "test.list").write_text("\n".join(ids[n_train:]) + "\n")
    return root


def _brats(root: Path, n_train: int = 8, n_val: int = 2, n_test: int = 2) -> Path:
    """SSL4MIS layout: data/<ID>.h5 (FLAIR (D, H, W), whole tumour 0/1), train/val/test.txt."""
    ids = [f"BraTS19_TCIA02_{i:03d}_1" for i in range(n_train + n_val + n_test)]
    for k, case_id in enumerate(ids):
        image, label = make_case(2, k, (34, 40, 38))
        write_case(root / "data" / f"{case_id}.h5", image, label)
    train, val, test = ids[:n_train], ids[n_train:n_train + n_val], ids[n_train + n_val:]
    (root / "train.txt").write_text("\n".join(train) + "\n")
    (root / "val.txt").write_text("\n".join(f"{i},extra" for i in val) + "\n")  # SSL4MIS keeps text before ','
    (root / "test.txt").write_text("\n".join(test) + "\n")
    return root


@pytest.fixture(scope="module")
def pancreas_root(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return _pancreas(tmp_path_factory.mktemp("pancreas"))


@pytest.fixture(scope="module")
def brats_root(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return _brats(tmp_path_factory.mktemp("brats"))


def test_detection(pancreas_root: Path, brats_root: Path, tmp_path: Path) -> None:
    assert open_dataset(pancreas_root).name == "pancreas"
    assert open_dataset(brats_root).name == "brats"
    assert open_dataset(brats_root, "brats").name == "brats"
    (tmp_path / "data").mkdir()
    (tmp_path / "train.txt").write_text("x\n")  # BraTS needs val.txt too
    with pytest.raises(DataError, match="no known dataset layout") as err:
        open_dataset(tmp_path)
    assert "pancreas: 'Pancreas_h5/<ID>_norm.h5'" in str(err.value) and "brats: 'data/<ID>.h5'" in str(err.value)


def test_pancreas_split_is_first_n_of_train_list(pancreas_root: Path) -> None:
    layout = open_dataset(pancreas_root)
    split = layout.split(labeled=6)
    assert split.labeled == ["image0057", "image0018", "image0062", "image0031", "image0020", "image0017"]
    assert split.unlabeled == ["image0032", "image0079"] and split.test == ["image0050", "image0059"]
    assert layout.val_ids == [] and split.val == []
    carved = layout.split(labeled=6, val=1)  # no declared list: carved from the end of train.list
    assert carved.val == ["image0079"] and carved.unlabeled == ["image0032"]
    case = layout.read("image0057")
    assert case.image.shape == (1, 40, 36, 34) and set(np.unique(case.label)) == {0, 1}


def test_brats_split_uses_declared_val_list(brats_root: Path) -> None:
    layout = open_dataset(brats_root)
    ids = [f"BraTS19_TCIA02_{i:03d}_1" for i in range(12)]
    split = layout.split(labeled=3, val=25)
    assert split.labeled == ids[:3] and split.unlabeled == ids[3:8]
    assert split.val == ids[8:10] and split.val_source == "declared validation list"
    assert split.test == ids[10:] and not set(split.val) & set(split.test)
    assert layout.split(labeled=3).val == [] and layout.split(labeled=3).unlabeled == ids[3:8]
    case = layout.read(ids[0])
    assert case.image.shape == (1, 34, 40, 38)  # stored (D, H, W) order is kept


def _records(run: Path) -> list[dict]:
    return [json.loads(line) for line in (run / "metrics.jsonl").read_text().splitlines()]


def _cli(*args: str) -> None:
    result = CliRunner().invoke(app, list(args))
    assert result.exit_code == 0, result.output


def _train(preset: str, root: Path, run: Path, *extra: str) -> None:
    """`semiseg train --method mlrpl --preset PRESET` shrunk to TINY with `--set`."""
    sets = [f"--set={k}={','.join(map(str, v)) if isinstance(v, tuple) else v}" for k, v in TINY.items()]
    _cli("train", "--method", "mlrpl", "--preset", preset, "--data", str(root), "--out", str(run), "--quiet",
         *sets, *extra)


def _evaluate(run: Path, out: Path, *extra: str) -> dict:
    _cli("evaluate", str(run), "--out", str(out), "--device", "cpu", *extra)
    return json.loads((out / "summary.json").read_text())


def test_mlrpl_pancreas_preset_trains_and_evaluates_via_cli(pancreas_root: Path, tmp_path: Path) -> None:
    cfg = build_config("mlrpl", preset="pancreas-6")
    assert (cfg.labeled, cfg.rot_flip, cfg.checkpoint_selection, cfg.val) == (6, False, "last", 0)
    run = tmp_path / "run"
    _train("pancreas-6", pancreas_root, run)
    losses = [r for r in _records(run) if "loss" in r]
    assert [r["iteration"] for r in losses] == [1, 2] and all(math.isfinite(r["loss"]) for r in losses)
    assert json.loads((run / "split.json").read_text())["unlabeled"] == ["image0032", "image0079"]
    summary = _evaluate(run, tmp_path / "eval")
    card = summary["protocol"]
    assert [c["case"] for c in summary["cases"]] == ["image0050", "image0059"]
    assert card["checkpoint"]["rule"] == "last" and card["inference"]["stride"] == [16, 16, 16]
    assert card["dataset"]["layout"] == "pancreas" and card["preset"] == "pancreas-6"
    assert 0 <= summary["metrics"]["dice"]["mean"] <= 1


def test_mlrpl_brats_preset_via_cli_selects_on_val(brats_root: Path, tmp_path: Path) -> None:
    run = tmp_path / "run"
    _train("brats-25", brats_root, run, "--labeled", "3")
    records = _records(run)
    assert [r["iteration"] for r in records if "val_dice" in r] == [2]  # validated on val.txt at the end
    assert (run / "best.pt").is_file()
    summary = _evaluate(run, tmp_path / "eval")
    assert summary["protocol"]["checkpoint"]["rule"] == "best_on_val"
    assert summary["protocol"]["dataset"]["val_source"] == "declared validation list"
    assert [c["case"] for c in summary["cases"]] == ["BraTS19_TCIA02_010_1", "BraTS19_TCIA02_011_1"]
    last = _evaluate(run, tmp_path / "eval-last", "--checkpoint", "last")  # the spec: always also report last
    assert last["protocol"]["checkpoint"]["rule"] == "last"


def test_preset_windows_keep_stride_16_for_96_patches() -> None:
    """96/16 must give stride 16 (MONAI's overlap-derived int(96 * (1 - 1/6)) would give 15)."""
    protocol = inference_protocol(build_config("mlrpl", preset="pancreas-6"))
    assert protocol.patch_size == (96, 96, 96) and protocol.stride == (16, 16, 16)
    starts = window_starts(150, 96, 16)
    assert starts == [0, 16, 32, 48, 54]  # ceil(54 / 16) + 1 windows, the last clamped to the border
    assert window_starts(256, 96, 16) == list(range(0, 161, 16))
    assert window_starts(96, 96, 16) == [0] and window_starts(80, 96, 16) == [0]
    # MONAI derives the stride from an overlap and truncates: 96 with overlap 1 - 16/96 gives 15; its grid
    # with an explicit scan interval equals ours.
    from monai.data.utils import dense_patch_slices
    from monai.inferers.utils import _get_scan_interval

    assert _get_scan_interval((150,) * 3, (96,) * 3, 3, (1 - 16 / 96,) * 3) == (15, 15, 15)
    monai_windows = dense_patch_slices((150, 256, 96), (96,) * 3, (16,) * 3)
    ours = [(a, b, 0) for a in window_starts(150, 96, 16) for b in window_starts(256, 96, 16)]
    assert sorted(tuple(int(s.start) for s in w) for w in monai_windows) == ours
    brats = inference_protocol(build_config("mlrpl", preset="brats-50"))
    assert brats.stride == (64, 64, 64) and window_starts(155, 96, 64) == [0, 59]
