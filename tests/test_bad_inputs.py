"""Bad input is a named one-line error, never a traceback (issue 15 §4, §5): damaged run configs and
checkpoints, h5 arrays of the wrong kind or of absurd declared sizes, compression bombs, a disk that fills
during training, and read-only output folders refused before any work.
"""

from __future__ import annotations

import errno
import gzip
import os
import shutil
import sys
import tempfile
import tracemalloc
from collections.abc import Callable
from pathlib import Path

import h5py
import numpy as np
import pytest
import torch
import yaml

from semiseg.config import build_config
from semiseg.engine.checkpoint import load_checkpoint, save_checkpoint
from semiseg.engine.trainer import Trainer
from semiseg.errors import CheckpointError, DataError
from test_guards import _error_as_unprivileged_user

TINY = {"labeled": 2, "iterations": 4, "patch_size": (32, 32, 16), "stride": (16, 16, 8), "n_filters": 4,
        "num_workers": 0, "log_every": 1, "checkpoint_every": 2}


def _cli(args: list[str], capsys: pytest.CaptureFixture, monkeypatch: pytest.MonkeyPatch) -> tuple[int, str]:
    from semiseg.cli import main

    monkeypatch.setattr(sys, "argv", ["semiseg", *args])
    with pytest.raises(SystemExit) as info:
        main()
    return info.value.code or 0, capsys.readouterr().err.strip()


def _one_line_error(args: list[str], capsys: pytest.CaptureFixture, monkeypatch: pytest.MonkeyPatch) -> str:
    code, err = _cli(args, capsys, monkeypatch)
    assert code == 2 and len(err.splitlines()) == 1 and err.startswith("error: "), err
    return err


# ---- run folders and checkpoints --------------------------------------------------------------------------------

@pytest.mark.parametrize(("text", "message"), [
    ("!!python/object/apply:os.system ['echo pwned']\n", "not valid YAML (could not determine a constructor"),
    ("- supervised\n- 4\n", "a config file must be a mapping"),
    ("method: [1\n", "not valid YAML"),
], ids=["yaml-tag", "list", "broken"])
def test_damaged_run_config_is_one_line_for_evaluate_report_and_resume(text: str, message: str, tiny_run: Path,
                                                                       tmp_path: Path, capsys, monkeypatch) -> None:
    run = tmp_path / "run"
    shutil.copytree(tiny_run, run)
    (run / "config.yaml").write_text(text)
    for args in (["evaluate", str(run), "--out", str(tmp_path / "eval")], ["report", str(run)]):
        err = _one_line_error(args, capsys, monkeypatch)
        assert f"{run / 'config.yaml'}: {message}" in err, (args, err)
    # --resume takes the configuration saved in the checkpoint, so the damaged copy (the tool's own output) is
    # simply written anew
    code, err = _cli(["train", "--out", str(run), "--resume", "--iterations", "4"], capsys, monkeypatch)
    assert code == 0, err
    assert yaml.safe_load((run / "config.yaml").read_text())["iterations"] == 4


def _damaged(payload: dict, change: Callable[[dict], None]) -> dict:
    damaged = {**payload, "config": dict(payload["config"]), "spec": dict(payload["spec"]),
               "method": dict(payload["method"])}
    change(damaged)
    return damaged


CHECKPOINTS = {
    "no config": (lambda p: p.pop("config"), "'config' is missing or not a dict"),
    "config a string": (lambda p: p.update(config="supervised"), "'config' is missing or not a dict"),
    "config unknown key": (lambda p: p["config"].update(lrr=1), "saved configuration: config key 'lrr'"),
    "config unknown method": (lambda p: p["config"].update(method="nope"), "saved configuration: unknown method"),
    "older format": (lambda p: p.update(version=0), "format version 0 is not one this semiseg reads"),
    "format a string": (lambda p: p.update(version="1"), "format version '1' is not one this semiseg reads"),
    "wrong tensor shape": (lambda p: p["method"].update({next(iter(p["method"])): torch.zeros(3, 3)}),
                           "has shape (3, 3), the network needs"),
    "missing tensor": (lambda p: p["method"].pop(next(iter(p["method"]))), "1 missing, 0 unexpected"),
    "huge spec": (lambda p: p["spec"].update(n_filters=10**7), "spec n_filters = 10000000 is not"),
    "spec not matching the weights": (lambda p: p["spec"].update(n_filters=64), "the network needs"),
    "spec of the wrong type": (lambda p: p.update(spec=[1, 2]), "'spec' must be a mapping"),
}


@pytest.mark.parametrize("name", list(CHECKPOINTS))
def test_checkpoint_wrong_inside_is_one_line_for_evaluate_and_predict(name: str, tiny_run: Path, tmp_path: Path,
                                                                      tiny_synthetic: str, capsys,
                                                                      monkeypatch) -> None:
    change, message = CHECKPOINTS[name]
    payload = load_checkpoint(tiny_run / "checkpoint.pt")
    bad = tmp_path / "bad.pt"
    damaged = _damaged(payload, change)
    save_checkpoint(bad, {k: v for k, v in damaged.items() if k not in ("format", "version")})
    if "version" in damaged and damaged["version"] != payload["version"]:
        torch.save(damaged, bad)
    from semiseg.data import open_dataset

    image = open_dataset(tiny_synthetic).case_path(open_dataset(tiny_synthetic).test_ids[0])
    for args in (["evaluate", str(bad), "--out", str(tmp_path / "eval")],
                 ["predict", str(bad), str(image), "--out", str(tmp_path / "pred")]):
        err = _one_line_error(args, capsys, monkeypatch)
        assert f"{bad}: " in err and message in err, (args, err)
    assert not (tmp_path / "eval").exists() and not (tmp_path / "pred").exists()  # refused: no empty folders left


def test_resume_from_a_checkpoint_with_a_damaged_optimizer_state_is_one_line(tiny_run: Path, tmp_path: Path,
                                                                             capsys, monkeypatch) -> None:
    run = tmp_path / "run"
    shutil.copytree(tiny_run, run)
    payload = load_checkpoint(run / "checkpoint.pt")
    payload["iteration"] = 2
    payload["optimizer"] = {"state": {}, "param_groups": []}
    save_checkpoint(run / "checkpoint.pt", {k: v for k, v in payload.items() if k not in ("format", "version")})
    err = _one_line_error(["train", "--out", str(run), "--resume"], capsys, monkeypatch)
    assert f"{run / 'checkpoint.pt'}: its saved state does not fit this run (ValueError" in err


# ---- h5 arrays and declared sizes -------------------------------------------------------------------------------

def _h5(path: Path, write: Callable[[h5py.File], object]) -> Path:
    with h5py.File(path, "w") as f:
        write(f)
        if "label" not in f:
            f.create_dataset("label", data=np.zeros((8, 8, 8), np.uint8))
    return path


@pytest.mark.parametrize(("write", "message"), [
    (lambda f: f.create_dataset("image", data=np.array([b"a", b"b"])), "'image' holds |S1 values, not numbers"),
    (lambda f: f.create_dataset("image", data=np.zeros(4, dtype=[("a", "f4"), ("b", "i2")])),
     "'image' holds [('a', '<f4'), ('b', '<i2')] values, not numbers"),
    (lambda f: f.create_group("image"), "'image' is an HDF5 group, not an array"),
    (lambda f: f.create_dataset("image", data=np.array(["x"], dtype=h5py.string_dtype())),
     "'image' holds object values, not numbers"),
    (lambda f: f.create_dataset("image", shape=(1536, 1536, 1536), dtype="f4", chunks=(64, 64, 64),
                                compression="gzip"),
     "dataset 'image' declares a size of 1536x1536x1536 = 3,623,878,656 voxels (13.5 GiB as float32), over the "
     "limit of 268,435,456"),
], ids=["bytes", "compound", "group", "strings", "declared-1536^3"])
def test_h5_image_of_the_wrong_kind_or_size_is_named(write, message: str, tmp_path: Path) -> None:
    from semiseg.data.h5 import read_case

    path = _h5(tmp_path / "case.h5", write)
    assert path.stat().st_size < 100_000  # the 13.5 GiB array is declared, never stored
    with pytest.raises(DataError) as info:
        read_case(path, "case", num_classes=2)
    assert str(info.value) == f"{path}: {message}" or str(info.value).startswith(f"{path}: {message}"), info.value


def test_declared_size_limit_is_checked_before_reading_and_can_be_raised(tmp_path: Path,
                                                                          monkeypatch: pytest.MonkeyPatch) -> None:
    from semiseg.data.h5 import read_case, write_case

    path = tmp_path / "case.h5"
    write_case(path, np.random.default_rng(0).standard_normal((32, 32, 16)).astype(np.float32),
               np.zeros((32, 32, 16), np.uint8))
    monkeypatch.setenv("SEMISEG_MAX_VOXELS", "10000")
    with pytest.raises(DataError, match=r"32x32x16 = 16,384 voxels .* over the limit of 10,000.*SEMISEG_MAX_VOXELS"):
        read_case(path, "case", num_classes=2)
    monkeypatch.setenv("SEMISEG_MAX_VOXELS", "1e5")
    assert read_case(path, "case", num_classes=2).image.shape == (1, 32, 32, 16)


def test_nrrd_gzip_bomb_is_stopped_at_the_declared_size(tmp_path: Path) -> None:
    """A 16x16x12 NRRD whose gzip body inflates to 256 MiB: refused after reading about the declared 12 KiB."""
    from semiseg.data.prepare import read_volume

    header = (b"NRRD0004\ntype: float\ndimension: 3\nsizes: 16 16 12\nencoding: gzip\nendian: little\n"
              b"space: right-anterior-superior\nspace directions: (1,0,0) (0,1,0) (0,0,1)\n\n")
    stream = gzip.compress(b"\0" * (16 << 20), compresslevel=9)  # 16 MiB of zeros, ~16 KiB compressed
    path = tmp_path / "bomb.nrrd"
    path.write_bytes(header + stream)
    with open(path, "ab") as f:  # gzip members concatenate: 16 of them inflate to 256 MiB
        for _ in range(15):
            f.write(stream)
    tracemalloc.start()
    try:
        with pytest.raises(DataError, match=r"bomb.nrrd: the compressed data holds more than the 12,288 bytes"):
            read_volume(path)
        peak = tracemalloc.get_traced_memory()[1]
    finally:
        tracemalloc.stop()
    assert peak < 16 << 20, peak  # pynrrd alone would have held the whole inflated stream


def test_valid_gzip_and_bzip2_nrrd_still_read(tmp_path: Path) -> None:
    import nrrd

    from semiseg.data.prepare import read_volume

    data = np.random.default_rng(0).standard_normal((9, 7, 5)).astype(np.float32)
    for encoding in ("gzip", "bzip2", "raw"):
        path = tmp_path / f"scan-{encoding}.nrrd"
        nrrd.write(str(path), data, {"encoding": encoding, "space": "left-posterior-superior"})
        np.testing.assert_array_equal(read_volume(path).data, data)
    detached = tmp_path / "scan.nhdr"
    nrrd.write(str(detached), data, {"encoding": "gzip"}, detached_header=True)
    np.testing.assert_array_equal(read_volume(detached).data, data)


# ---- a disk that fills during training --------------------------------------------------------------------------

def test_disk_full_during_training_is_one_line_and_leaves_no_temporary_file(tmp_path: Path, tiny_synthetic: str,
                                                                            monkeypatch: pytest.MonkeyPatch) -> None:
    from semiseg.engine import checkpoint

    real_save = torch.save
    calls = []

    def full_disk_on_second_save(obj: object, f) -> None:  # noqa: ANN001 - torch.save's file argument
        calls.append(1)
        if len(calls) == 2:
            f.write(b"\0" * 4096)  # part of the archive made it to disk, then the disk filled
            raise OSError(errno.ENOSPC, os.strerror(errno.ENOSPC))
        real_save(obj, f)

    monkeypatch.setattr(checkpoint.torch, "save", full_disk_on_second_save)
    run = tmp_path / "run"
    with pytest.raises(CheckpointError) as info:
        Trainer(build_config("supervised", None, {"data": tiny_synthetic, **TINY}), run, progress=False).run()
    message = str(info.value)
    assert len(message.splitlines()) == 1
    assert message.startswith(f"{run}: the run stopped because its folder could not be written (writing "
                              "checkpoint.pt failed (No space left on device))")
    assert f"the last good checkpoint is {run / 'checkpoint.pt'} (iteration 2)" in message and "--resume" in message
    assert sorted(p.name for p in run.iterdir() if p.name.startswith(".")) == []  # no temporary file, lock released
    monkeypatch.setattr(checkpoint.torch, "save", real_save)
    assert load_checkpoint(run / "checkpoint.pt")["iteration"] == 2
    Trainer(build_config("supervised", None, {"data": tiny_synthetic, **TINY}), run, resume=True,
            progress=False).run()
    assert load_checkpoint(run / "checkpoint.pt")["iteration"] == 4


# ---- read-only output folders: refused before any work ------------------------------------------------------------

def test_read_only_output_is_refused_before_any_work(tiny_run: Path, tiny_synthetic: str) -> None:
    from nifti_helpers import make_dataset
    from semiseg.data.download import download_la
    from semiseg.data.prepare import prepare
    from semiseg.engine.evaluate import evaluate_checkpoint
    from semiseg.engine.predict import predict_files
    from semiseg.report import write_report

    base = Path(tempfile.mkdtemp())
    try:
        base.chmod(0o755)  # reachable by the unprivileged child
        raw = make_dataset(base / "raw", n_labeled=1, n_unlabeled=0, n_test=0, channels=1, shape=(8, 8, 8))
        run = base / "run"
        shutil.copytree(tiny_run, run)
        for path in [base, *base.rglob("*")]:
            path.chmod(0o755 if path.is_dir() else 0o644)
        locked = base / "locked"
        locked.mkdir(mode=0o555)
        actions = {
            "evaluate": lambda: evaluate_checkpoint(run, locked / "eval"),
            "predict": lambda: predict_files(run, [raw / "imagesTr"], locked / "pred"),
            "report": lambda: write_report(run, locked / "report"),
            "prepare": lambda: prepare(raw, locked / "cache"),
            "download": lambda: download_la(locked / "LA", "http://127.0.0.1:9/never"),
        }
        for name, action in actions.items():
            message = _error_as_unprivileged_user(action)
            assert "not writable (Permission denied)" in message, (name, message)
        assert list(locked.iterdir()) == []
    finally:
        for path in [base, *base.rglob("*")]:
            if path.is_dir():
                path.chmod(0o755)
        shutil.rmtree(base)
