"""The user's path end to end (issue 18): resume of what was typed, runs that work from any folder, progress,
Ctrl-C, the CLI habits of the field (-h, --version, config keys), defaults that follow the data, units."""

from __future__ import annotations

import json
import os
import shutil
import signal
import subprocess
import sys
import time
from pathlib import Path

import nibabel as nib
import numpy as np
import pytest
import torch
import yaml

from nifti_helpers import make_dataset
from semiseg.engine.checkpoint import load_checkpoint

TINY = ["--set", "patch_size=32,32,16", "--set", "stride=16,16,8", "--set", "n_filters=4", "--set", "num_workers=0",
        "--set", "log_every=1"]
ENV = {**os.environ, "OMP_NUM_THREADS": "1"}


def cli(args: list[str], capsys: pytest.CaptureFixture, monkeypatch: pytest.MonkeyPatch,
        code: int = 0) -> tuple[str, str]:
    """The console entry point in this process: (stdout, stderr), checking the exit status."""
    from semiseg.cli import main

    monkeypatch.setattr(sys, "argv", ["semiseg", *map(str, args)])
    with pytest.raises(SystemExit) as info:
        main()
    out, err = capsys.readouterr()
    assert (info.value.code or 0) == code, err
    return out, err


@pytest.fixture
def user_data(tmp_path: Path) -> Path:
    from semiseg.data.prepare import prepare

    root = make_dataset(tmp_path / "MyData", n_labeled=4, n_unlabeled=1, n_test=2)
    prepare(root)
    return root


# ---- resume: only what was typed is compared; a larger --iterations extends the run ------------------------------

def test_resume_with_only_iterations_extends_the_run_and_says_which_schedules_move(
        tmp_path: Path, tiny_synthetic: str, capsys, monkeypatch) -> None:
    run = tmp_path / "run"
    cli(["train", "--method", "mean_teacher", "--data", tiny_synthetic, "--labeled", "2", "--iterations", "3",
         "--out", run, "--set", "lr_schedule=poly", *TINY], capsys, monkeypatch)
    # Before: refused, listing method, data, labeled, patch_size... (defaults of options never typed).
    _, err = cli(["train", "--out", run, "--resume", "--iterations", "5"], capsys, monkeypatch)
    assert "extended from 3 to 5 iterations at iteration 3" in err and "poly learning-rate decay" in err
    payload = load_checkpoint(run / "checkpoint.pt")
    assert payload["iteration"] == 5 and payload["config"]["iterations"] == 5
    assert payload["history"] == [{"extended_at": 3, "from": 3, "to": 5,
                                   "recomputed": ["poly learning-rate decay (poly_horizon 0)"]}]
    lrs = [json.loads(line)["lr"] for line in (run / "metrics.jsonl").read_text().splitlines()]
    assert lrs[3] == pytest.approx(0.01 * (1 - 3 / 5) ** 0.9)  # iteration 4 on the new total's decay
    out, _ = cli(["evaluate", run, "--quiet"], capsys, monkeypatch)
    assert "run      extended from 3 to 5 iterations" in out
    card = json.loads((run / "eval-test" / "summary.json").read_text())["protocol"]
    assert card["training"]["extensions"][0]["recomputed"] == ["poly learning-rate decay (poly_horizon 0)"]
    # Typed options that change the recipe are still refused, naming only them; shortening too.
    _, err = cli(["train", "--out", run, "--resume", "--labeled", "3", "--iterations", "4"], capsys, monkeypatch, 2)
    assert "labeled (run 2, given 3)" in err and "extended, not shortened" in err and "data" not in err


def test_resume_without_a_run_says_nothing_to_resume(tmp_path: Path, capsys, monkeypatch) -> None:
    (tmp_path / "empty").mkdir()
    for folder in (tmp_path / "empty", tmp_path / "absent"):
        _, err = cli(["train", "--out", folder, "--resume"], capsys, monkeypatch, 2)
        assert err.startswith(f"error: {folder}: nothing to resume") and len(err.splitlines()) == 1
    assert not (tmp_path / "absent").exists()


# ---- runs work from any folder: absolute data paths, and a moved dataset found again by its fingerprint ----------

def test_run_stores_absolute_data_and_finds_a_moved_dataset_by_fingerprint(
        tmp_path: Path, tiny_synthetic: str, capsys, monkeypatch) -> None:
    from semiseg.data import open_dataset

    source = open_dataset(tiny_synthetic).root
    shutil.copytree(source, tmp_path / "LA")
    monkeypatch.chdir(tmp_path)
    cli(["train", "--method", "supervised", "--data", "LA", "--labeled", "2", "--iterations", "2", "--out", "run",
         "--quiet", *TINY], capsys, monkeypatch)
    config = yaml.safe_load((tmp_path / "run" / "config.yaml").read_text())
    assert config["data"] == str((tmp_path / "LA").resolve())
    elsewhere = tmp_path / "elsewhere"
    elsewhere.mkdir()
    monkeypatch.chdir(elsewhere)
    cli(["evaluate", tmp_path / "run", "--quiet"], capsys, monkeypatch)
    card = json.loads((tmp_path / "run" / "eval-test" / "summary.json").read_text())["protocol"]
    assert card["dataset"]["root"] == config["data"] and card["dataset"]["same_as_training"] is True
    (tmp_path / "LA").rename(tmp_path / "LA-moved")
    _, err = cli(["evaluate", tmp_path / "run", "--quiet"], capsys, monkeypatch, 2)
    assert "the run's dataset is not found" in err and "pass --data" in err
    cli(["evaluate", tmp_path / "run", "--data", tmp_path / "LA-moved", "--quiet"], capsys, monkeypatch)
    cli(["train", "--out", tmp_path / "run", "--resume", "--data", tmp_path / "LA-moved", "--iterations", "3",
         "--quiet"], capsys, monkeypatch)
    assert load_checkpoint(tmp_path / "run" / "checkpoint.pt")["iteration"] == 3
    other = open_dataset("synthetic:n_train=8,n_test=2,shape=40x40x32,seed=5").root
    _, err = cli(["train", "--out", tmp_path / "run", "--resume", "--data", other, "--iterations", "4", "--quiet"],
                 capsys, monkeypatch, 2)
    assert "not the dataset this run was trained on" in err


def test_config_yaml_holds_every_method_parameter_resolved(tmp_path: Path, tiny_synthetic: str, capsys,
                                                           monkeypatch) -> None:
    from semiseg.methods import get_method

    run = tmp_path / "run"
    cli(["train", "--method", "mlrpl", "--data", tiny_synthetic, "--labeled", "2", "--iterations", "1", "--out", run,
         "--quiet", "--set", "consistency=0.5", *TINY], capsys, monkeypatch)
    params = yaml.safe_load((run / "config.yaml").read_text())["params"]
    expected = get_method("mlrpl").Params(consistency=0.5).model_dump(mode="json")
    assert params == expected and len(params) > 5


# ---- evaluate --save-predictions writes the dataset's own format, with its geometry -------------------------------

def test_evaluate_saves_nifti_predictions_in_the_scan_geometry_and_distances_in_mm(
        tmp_path: Path, user_data: Path, capsys, monkeypatch) -> None:
    run = tmp_path / "run"
    cli(["train", "--method", "supervised", "--data", user_data, "--labeled", "3", "--iterations", "2", "--out", run,
         "--quiet", "--set", "n_filters=4", "--set", "num_workers=0"], capsys, monkeypatch)
    out, err = cli(["evaluate", run, "--save-predictions"], capsys, monkeypatch)
    assert err.count("evaluate [") == 2 and "evaluate [1/2] toy_005: dice " in err  # a line per case, non-TTY
    for case_id in ("toy_005", "toy_006"):
        scan = nib.load(str(user_data / "imagesTs" / f"{case_id}_0000.nii.gz"))
        pred = nib.load(str(run / "eval-test" / "predictions" / f"{case_id}.nii.gz"))
        assert pred.shape == scan.shape
        np.testing.assert_allclose(pred.affine, scan.affine)
    summary = json.loads((run / "eval-test" / "summary.json").read_text())
    assert summary["protocol"]["metrics"]["units"].startswith("mm (each case's voxel spacing")
    assert "mm (each case's voxel spacing" in out
    # The saved label maps score the same when given back with --pred (mapped onto the evaluation grid).
    cli(["evaluate", "--pred", run / "eval-test" / "predictions", "--data", user_data, "--out", tmp_path / "again",
         "--quiet"], capsys, monkeypatch)
    again = json.loads((tmp_path / "again" / "summary.json").read_text())
    assert again["metrics"]["dice"] == summary["metrics"]["dice"]
    assert again["metrics"]["hd95"] == summary["metrics"]["hd95"]
    # mm by default = the prepared grid's spacing (1, 1, 2 mm after reorientation); --voxels gives voxels.
    cli(["evaluate", run, "--spacing", "1,1,2", "--out", tmp_path / "given", "--quiet"], capsys, monkeypatch)
    cli(["evaluate", run, "--voxels", "--out", tmp_path / "vox", "--quiet"], capsys, monkeypatch)
    given, vox = (json.loads((tmp_path / n / "summary.json").read_text()) for n in ("given", "vox"))
    assert given["metrics"]["hd95"] == summary["metrics"]["hd95"]
    assert vox["protocol"]["metrics"]["units"].startswith("voxels") and "--voxels" in vox["protocol"]["metrics"][
        "units"]


def test_la_protocol_distances_stay_in_voxels_and_say_so(tmp_path: Path, tiny_synthetic: str) -> None:
    from semiseg.data import open_dataset
    from semiseg.engine.evaluate import _units

    layout = open_dataset(tiny_synthetic)
    units = _units(layout, list(layout.test_ids), None)
    assert units.startswith("voxels") and "papers' protocol" in units and "la files record no spacing" in units


# ---- progress and feedback ---------------------------------------------------------------------------------------

def test_training_shows_validation_dice_eta_and_the_next_command(tmp_path: Path, tiny_synthetic: str, capsys,
                                                                 monkeypatch) -> None:
    run = tmp_path / "run"
    out, err = cli(["train", "--method", "supervised", "--data", tiny_synthetic, "--labeled", "2", "--val", "1",
                    "--iterations", "4", "--out", run, "--set", "val_every=2", *TINY], capsys, monkeypatch)
    assert "[1/4] loss " in err and "ETA " in err.splitlines()[2]  # an ETA from the first logged iteration
    assert "[2/4] validation Dice " in err and "val Dice " in err.splitlines()[-2]
    assert "val Dice best " in out and f"next: semiseg evaluate {run}" in out.splitlines()[-1]
    assert (run / "best.pt").is_file()


def test_predict_prints_a_line_per_case(tmp_path: Path, tiny_synthetic: str, capsys, monkeypatch) -> None:
    from semiseg.data import open_dataset

    run = tmp_path / "run"
    cli(["train", "--method", "supervised", "--data", tiny_synthetic, "--labeled", "2", "--iterations", "1",
         "--out", run, "--quiet", *TINY], capsys, monkeypatch)
    layout = open_dataset(tiny_synthetic)
    images = [layout.case_path(i) for i in layout.test_ids]
    shutil.copy(images[0], tmp_path / "a.h5")
    shutil.copy(images[1], tmp_path / "b.h5")
    _, err = cli(["predict", run, tmp_path / "a.h5", tmp_path / "b.h5", "--out", tmp_path / "pred"], capsys,
                 monkeypatch)
    assert "predict [1/2] a: a.h5, foreground voxels per class [" in err and "predict [2/2] b: " in err


def _logged(run: Path) -> int:
    log = run / "metrics.jsonl"
    lines = log.read_text().splitlines() if log.exists() else []
    return json.loads(lines[-1])["iteration"] if lines else 0


def test_sigint_checkpoints_the_current_iteration_says_how_to_continue_and_exits_130(
        tmp_path: Path, tiny_synthetic: str) -> None:
    args = [sys.executable, "-m", "semiseg.cli", "train", "--method", "supervised", "--data", tiny_synthetic,
            "--labeled", "2", "--iterations", "400", "--quiet", "--set", "patch_size=32,32,16", "--set", "n_filters=4",
            "--set", "num_workers=1", "--set", "log_every=1", "--set", "checkpoint_every=1000"]
    run = tmp_path / "run"
    proc = subprocess.Popen([*args, "--out", str(run)], env=ENV, stderr=subprocess.PIPE, text=True)
    deadline = time.time() + 120
    while _logged(run) < 3 and time.time() < deadline and proc.poll() is None:
        time.sleep(0.05)
    proc.send_signal(signal.SIGINT)
    _, err = proc.communicate(timeout=120)
    assert proc.returncode == 130, err
    stopped = load_checkpoint(run / "checkpoint.pt")["iteration"]
    assert 3 <= stopped < 400  # no checkpoint was due before iteration 1000: this one is the interruption's
    assert f"interrupted at iteration {stopped}; continue with `semiseg train --out {run} --resume`" in err
    # The checkpoint is the state at iteration N exactly: a run of N iterations (this recipe's schedules do not
    # depend on the total) ends with the same weights and optimiser state.
    reference = tmp_path / "reference"
    subprocess.run([*args[:11], str(stopped), *args[12:], "--out", str(reference)], check=True, env=ENV, timeout=300)
    a, b = (load_checkpoint(r / "checkpoint.pt") for r in (run, reference))
    assert a["iteration"] == b["iteration"] == stopped
    for key, value in a["method"].items():
        assert torch.equal(value, b["method"][key]), key
    for ka, kb in zip(a["optimizer"]["state"].values(), b["optimizer"]["state"].values(), strict=True):
        assert torch.equal(ka["momentum_buffer"], kb["momentum_buffer"])


# ---- the CLI habits of the field ---------------------------------------------------------------------------------

COMMANDS = [["methods"], ["train"], ["evaluate"], ["predict"], ["demo"], ["report"], ["config"], ["config", "keys"],
            ["data"], ["data", "prepare"], ["data", "download"], ["data", "convert"], []]


@pytest.mark.parametrize("command", COMMANDS, ids=lambda c: " ".join(c) or "semiseg")
def test_every_command_has_short_help_and_version(command: list[str], capsys, monkeypatch) -> None:
    from semiseg import __version__

    out, _ = cli([*command, "-h"], capsys, monkeypatch)
    assert "Usage:" in out and "--version" in out
    out, _ = cli([*command, "--version"], capsys, monkeypatch)
    assert out.strip() == f"semiseg {__version__}"


def test_train_help_shows_the_new_options_and_points_to_config_keys(capsys, monkeypatch) -> None:
    out, _ = cli(["train", "-h"], capsys, monkeypatch)
    flat = " ".join(out.replace("│", " ").split())
    for option in ("--seed", "--device", "--val", "--labeled", "--iterations"):
        assert option in flat
    assert "8, the LA benchmark's" in flat and "semiseg config keys --method NAME" in flat


def test_config_keys_lists_every_key_with_type_default_and_help(capsys, monkeypatch) -> None:
    from semiseg.config import TrainConfig, config_keys
    from semiseg.methods import available_methods

    out, _ = cli(["config", "keys", "--method", "mlrpl"], capsys, monkeypatch)
    lines = {line.split()[0]: line for line in out.splitlines() if line.startswith("  ")}
    assert set(TrainConfig.model_fields) - {"params"} <= set(lines)
    assert "consistency_rampup" in lines and "40.0" in lines["consistency_rampup"]
    assert lines["lr"].split()[1:3] == ["float", "0.01"]
    for name in available_methods():  # every key of every method has a line of help (its docstring)
        for title, rows in config_keys(name):
            missing = [key for key, _, _, text in rows if not text.strip()]
            assert not missing, f"{name}: {title}: keys without help {missing}"


def test_defaults_follow_the_data_2d_and_user_datasets(tmp_path: Path, user_data: Path) -> None:
    from semiseg.config import build_config
    from semiseg.data import open_dataset
    from semiseg.data.layouts.acdc import write_synthetic_acdc
    from semiseg.engine.trainer import Trainer, plan_window

    acdc = write_synthetic_acdc(tmp_path / "acdc", patients=2, shape=(3, 32, 28))
    cfg = build_config("supervised", None, {"data": str(acdc), "labeled": 1, "iterations": 1, "num_workers": 0})
    trainer = Trainer(cfg, tmp_path / "acdc-run", progress=False)  # no --set patch_size: a 2D patch and network
    assert trainer.cfg.patch_size == (256, 256) and trainer.s.method.spec.spatial_dims == 2
    assert "ACDC protocol" in trainer.plan["source"]
    planned, plan = plan_window(build_config("supervised", None, {"data": str(user_data)}), open_dataset(
        str(user_data)))
    assert planned.patch_size == (16, 16, 16) and planned.stride == (8, 8, 8)  # median 28x24x16 -> multiples of 16
    assert plan["source"].startswith("derived from the median image size 28x24x16 of the 5 training cases")
    kept, plan = plan_window(build_config("supervised", None, {"data": str(user_data), "patch_size": "32,32,16"}),
                             open_dataset(str(user_data)))
    assert kept.patch_size == (32, 32, 16) and plan["source"].startswith("set in the configuration")


def test_prepare_suggests_a_command_with_method_and_the_derived_window(tmp_path: Path, capsys, monkeypatch) -> None:
    root = make_dataset(tmp_path / "MyData", n_labeled=3, n_unlabeled=0, n_test=0, channels=1)
    out, _ = cli(["data", "prepare", root], capsys, monkeypatch)
    assert f"semiseg train --method mean_teacher --data {root} --labeled 3" in out
    assert "window for training: patch 16x16x16, stride 8x8x8 (derived from the median image size" in out


def test_undeclared_label_values_suggest_the_fix(tmp_path: Path, capsys, monkeypatch) -> None:
    from nifti_helpers import save_nifti

    root = make_dataset(tmp_path / "MyData", n_labeled=2, n_unlabeled=0, n_test=0, channels=1)
    label = np.asarray(nib.load(str(root / "labelsTr" / "toy_000.nii.gz")).dataobj).copy()
    label[0, 0, 0] = 5
    save_nifti(root / "labelsTr" / "toy_000.nii.gz", label)
    _, err = cli(["data", "prepare", root], capsys, monkeypatch, 2)
    assert "label values [5] are not declared" in err and 'declare them in dataset.json "labels"' in err
    assert "or remap the label files" in err
