"""End-to-end CLI: methods, train -> evaluate -> predict on synthetic data, and one-line user errors."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import h5py
import numpy as np
import pytest

TINY = ["--set", "patch_size=32,32,16", "--set", "stride=16,16,8", "--set", "n_filters=4", "--set", "num_workers=0",
        "--set", "log_every=2", "--set", "checkpoint_every=3"]


def semiseg(*args: str, check: bool = True) -> subprocess.CompletedProcess:
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    result = subprocess.run([sys.executable, "-m", "semiseg.cli", *args], capture_output=True, text=True, env=env,
                            timeout=300)
    if check and result.returncode != 0:
        raise AssertionError(f"semiseg {' '.join(args)} failed:\n{result.stdout}\n{result.stderr}")
    return result


def test_methods_lists_supervised_with_its_parameter_count() -> None:
    out = semiseg("methods").stdout
    assert "supervised" in out and "9,448,866" in out


def test_train_evaluate_predict_round_trip(tmp_path: Path, tiny_synthetic: str) -> None:
    run = tmp_path / "run"
    semiseg("train", "--method", "supervised", "--data", tiny_synthetic, "--labeled", "2", "--iterations", "6",
            "--out", str(run), *TINY)
    assert (run / "checkpoint.pt").is_file() and (run / "config.yaml").is_file()
    assert len((run / "metrics.jsonl").read_text().splitlines()) == 3
    assert list((run / "tensorboard").iterdir())

    result = semiseg("evaluate", str(run), "--out", str(tmp_path / "eval"), "--save-predictions")
    for metric in ("dice", "jaccard", "hd95", "asd"):
        assert metric in result.stdout
    summary = json.loads((tmp_path / "eval" / "summary.json").read_text())
    assert set(summary["metrics"]) >= {"dice", "jaccard", "hd95", "asd"}
    assert {"mean", "std"} <= set(summary["metrics"]["dice"])
    card = summary["protocol"]
    assert card["checkpoint"]["rule"] == "last" and card["checkpoint"]["iteration"] == 6
    assert card["dataset"]["split"] == "test" and len(card["dataset"]["case_ids"]) == 2
    assert card["dataset"]["labeled_ids"] == ["SYN0000", "SYN0001"]
    assert card["metrics"]["empty_policy"] == "legacy_zero" and "voxels" in card["metrics"]["units"]
    assert card["inference"]["stride"] == [16, 16, 8]
    rows = (tmp_path / "eval" / "cases.csv").read_text().splitlines()
    assert rows[0].startswith("case,dice,jaccard,hd95,asd") and len(rows) == 3

    # scoring the saved label maps as a prediction folder gives the same numbers
    semiseg("evaluate", "--pred", str(tmp_path / "eval" / "predictions"), "--data", tiny_synthetic,
            "--out", str(tmp_path / "eval-pred"))
    again = json.loads((tmp_path / "eval-pred" / "summary.json").read_text())
    assert again["metrics"]["dice"]["mean"] == pytest.approx(summary["metrics"]["dice"]["mean"])

    from semiseg.data import open_dataset

    layout = open_dataset(tiny_synthetic)
    image = layout.case_path(layout.test_ids[0])
    out = semiseg("predict", str(run), str(image), "--out", str(tmp_path / "pred")).stdout
    written = Path(out.strip().splitlines()[-1])
    with h5py.File(written) as f:
        assert f["label"].shape == (40, 40, 32) and set(np.unique(f["label"][()])) <= {0, 1}


@pytest.mark.parametrize(("args", "message"), [
    (["train", "--method", "nope"], "unknown method 'nope'"),
    (["train", "--data", "/does/not/exist"], "data folder not found"),
    (["train", "--set", "lr=abc"], "config key 'lr'"),
    (["evaluate", "/does/not/exist.pt"], "neither a run folder nor a checkpoint"),
])
def test_user_errors_are_one_line_without_traceback(args: list[str], message: str) -> None:
    result = semiseg(*args, "--out", "/tmp/semiseg-never", check=False) if args[0] == "train" else semiseg(
        *args, check=False)
    assert result.returncode == 2
    assert message in result.stderr and "Traceback" not in result.stderr
    assert len(result.stderr.strip().splitlines()) == 1


def test_foreign_or_truncated_checkpoint_is_a_clear_error(tmp_path: Path) -> None:
    bad = tmp_path / "model.pt"
    bad.write_bytes(b"not a checkpoint")
    result = semiseg("evaluate", str(bad), check=False)
    assert result.returncode == 2 and "unreadable checkpoint" in result.stderr


def test_existing_run_folder_needs_resume(tmp_path: Path, tiny_synthetic: str) -> None:
    run = tmp_path / "run"
    args = ["train", "--data", tiny_synthetic, "--labeled", "2", "--iterations", "2", "--out", str(run), *TINY]
    semiseg(*args)
    result = semiseg(*args, check=False)
    assert result.returncode == 2 and "--resume" in result.stderr
