"""Nothing a user made is deleted, nothing is written outside the output folder, one writer per folder.

Each test here failed on the code before issue 15: `prepare --out` deleted whatever folder it was given,
case ids such as `../x` wrote outside the run folder, and two runs could write into one folder.
"""

from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys
from pathlib import Path

import pytest

from nifti_helpers import make_dataset
from semiseg.data.prepare import CACHE_DIR, PREPARED, prepare
from semiseg.engine.runlock import LOCK, FolderBusyError, FolderLock
from semiseg.errors import DataError

SMALL = (12, 12, 8)


@pytest.fixture
def raw(tmp_path: Path) -> Path:
    return make_dataset(tmp_path / "raw", n_labeled=2, n_unlabeled=0, n_test=0, channels=1, shape=SMALL)


def _tree(folder: Path) -> dict[str, bytes]:
    return {str(p.relative_to(folder)): p.read_bytes() for p in sorted(folder.rglob("*")) if p.is_file()}


def test_prepare_refuses_the_dataset_itself_and_its_parents_as_out(raw: Path) -> None:
    before = _tree(raw.parent)
    for out in (raw, raw.parent, raw / "imagesTr" / ".."):
        with pytest.raises(DataError, match="dataset folder itself or contains it"):
            prepare(raw, out)
    assert _tree(raw.parent) == before


def test_prepare_refuses_a_non_empty_folder_it_did_not_make(raw: Path, tmp_path: Path) -> None:
    mine = tmp_path / "mine"
    (mine / "thesis").mkdir(parents=True)
    (mine / "thesis" / "chapter1.tex").write_text("years of work")
    with pytest.raises(DataError, match="not a previous output of `semiseg data prepare`"):
        prepare(raw, mine)
    assert (mine / "thesis" / "chapter1.tex").read_text() == "years of work"
    assert [p.name for p in tmp_path.iterdir() if p.name.startswith(".")] == []  # no staging folder left


def test_prepare_never_follows_a_symlinked_out(raw: Path, tmp_path: Path) -> None:
    real = tmp_path / "real"
    real.mkdir()
    link = tmp_path / "link"
    link.symlink_to(real)
    with pytest.raises(DataError, match="symbolic link"):
        prepare(raw, link)
    assert list(real.iterdir()) == [] and link.is_symlink()


def test_prepare_replaces_its_own_output_but_not_one_with_user_files(raw: Path, tmp_path: Path) -> None:
    out = tmp_path / "cache"
    out.mkdir()  # an empty folder is fine
    prepare(raw, out)
    first = json.loads((out / PREPARED).read_text())
    assert sorted(first["labeled"]) == ["toy_000", "toy_001"]
    prepare(raw, out)  # its own output: replaced
    assert sorted(p.name for p in out.iterdir()) == ["cases", PREPARED]
    assert sorted(p.name for p in tmp_path.iterdir()) == ["cache", "raw"]  # no staging or old folder left
    (out / "notes.txt").write_text("mine")
    with pytest.raises(DataError, match="not a previous output"):
        prepare(raw, out)
    assert (out / "notes.txt").read_text() == "mine"
    (out / "notes.txt").unlink()
    (out / "cases" / "link.h5").symlink_to(raw / "dataset.json")
    with pytest.raises(DataError, match="not a previous output"):
        prepare(raw, out)
    default = prepare(raw)  # the default cache inside the dataset folder
    assert default == raw / CACHE_DIR and (default / PREPARED).is_file()


def test_prepare_removes_what_a_killed_prepare_left_but_nothing_else(raw: Path, tmp_path: Path) -> None:
    """A SIGKILL skips the clean-up and leaves a hidden staged (or old) cache beside `--out`; the next `prepare`
    removes those of dead writers on this host, and keeps a live writer's, another host's and the user's own."""
    import socket

    out = tmp_path / "cache"
    dead = subprocess.run([sys.executable, "-c", "import os; print(os.getpid())"], capture_output=True,
                          text=True, check=True)
    dead_pid, host = int(dead.stdout), socket.gethostname()
    left = {name: tmp_path / name for name in (f".cache.{host}-{dead_pid}.ab12cd.tmp",
                                              f".cache.{host}-{dead_pid}.ef34gh.old",
                                              f".cache.{host}-{os.getpid()}.live01.tmp",
                                              f".cache.otherhost-{dead_pid}.ab12cd.tmp",
                                              ".cache.my-own-notes")}
    for folder in left.values():
        (folder / "cases").mkdir(parents=True)
        (folder / "cases" / "a.h5").write_bytes(b"x" * 1000)
    prepare(raw, out)
    kept = sorted(p.name for p in tmp_path.iterdir() if p.name.startswith("."))
    assert kept == sorted(list(left)[2:])
    assert (out / PREPARED).is_file()


def test_prepare_refuses_a_fake_marker(raw: Path, tmp_path: Path) -> None:
    out = tmp_path / "fake"
    out.mkdir()
    (out / PREPARED).write_text('{"format": "something else"}')
    with pytest.raises(DataError, match="not a previous output"):
        prepare(raw, out)
    assert (out / PREPARED).read_text() == '{"format": "something else"}'


# ---- §2 case ids never lead outside their folder -------------------------------------------------------------------

TINY = {"labeled": 2, "iterations": 2, "patch_size": (32, 32, 16), "stride": (16, 16, 8), "n_filters": 4,
        "num_workers": 0, "log_every": 1, "checkpoint_every": 2}


def _data_copy(tiny_synthetic: str, dest: Path) -> Path:
    from semiseg.data import open_dataset

    shutil.copytree(open_dataset(tiny_synthetic).root, dest)
    return dest


def _cli(args: list[str], capsys: pytest.CaptureFixture, monkeypatch: pytest.MonkeyPatch) -> tuple[int, str, str]:
    from semiseg.cli import main

    monkeypatch.setattr(sys, "argv", ["semiseg", *args])
    with pytest.raises(SystemExit) as info:
        main()
    captured = capsys.readouterr()
    return info.value.code or 0, captured.out, captured.err.strip()


def _one_line_error(args: list[str], capsys: pytest.CaptureFixture, monkeypatch: pytest.MonkeyPatch) -> str:
    code, _, err = _cli(args, capsys, monkeypatch)
    assert code == 2 and len(err.splitlines()) == 1 and err.startswith("error: "), err
    return err


@pytest.mark.parametrize("bad", ["../../../escaped", "/tmp/semiseg-escaped-abs", "..", "a\\b"])
def test_case_id_leaving_its_folder_is_refused_naming_list_and_line(bad: str, tiny_run: Path, tiny_synthetic: str,
                                                                    tmp_path: Path, capsys, monkeypatch) -> None:
    data = _data_copy(tiny_synthetic, tmp_path / "data")
    test_list = data / "test.list"
    test_list.write_text(test_list.read_text() + f"\n{bad}\n")
    line = len(test_list.read_text().splitlines())
    out = tmp_path / "deep" / "er" / "eval"
    err = _one_line_error(["evaluate", str(tiny_run), "--data", str(data), "--out", str(out), "--save-predictions"],
                          capsys, monkeypatch)
    assert f"{test_list}:{line}: case id {bad!r} is not a bare file name" in err
    assert not list(tmp_path.rglob("escaped*")) and not Path("/tmp/semiseg-escaped-abs.h5").exists()


def test_prepared_manifest_ids_are_confined(tmp_path: Path) -> None:
    from semiseg.data.layouts import open_layout

    cache = tmp_path / "cache"
    cache.mkdir()
    (cache / PREPARED).write_text(json.dumps({"format": "semiseg-prepared", "labels": {"bg": 0, "fg": 1},
                                              "labeled": ["ok", "../../outside"], "unlabeled": [], "test": [],
                                              "recipe": {"channels": []}}))
    with pytest.raises(DataError, match=r"prepared.json: labeled\[1\]: case id '../../outside' is not a bare"):
        open_layout(cache)


def test_report_refuses_case_ids_from_a_tampered_summary(tiny_run: Path, tmp_path: Path, capsys,
                                                         monkeypatch) -> None:
    run = tmp_path / "run"
    shutil.copytree(tiny_run, run, ignore=shutil.ignore_patterns("metrics.jsonl", "tensorboard"))
    (run / "eval-test" / "predictions").mkdir(parents=True)
    stats = {"mean": 0.5, "std": 0.0}
    summary_path = run / "eval-test" / "summary.json"
    summary_path.write_text(json.dumps({
        "metrics": {m: stats for m in ("dice", "jaccard", "hd95", "asd")}, "protocol": {},
        "cases": [{"case": "../../../../report-escape", "dice": 0.5, "jaccard": 0.3, "hd95": 1.0, "asd": 1.0}]}))
    err = _one_line_error(["report", str(run)], capsys, monkeypatch)
    assert f"{summary_path}: cases[0]: case id '../../../../report-escape' is not a bare file name" in err
    assert not list(tmp_path.rglob("report-escape*"))


# ---- §3 one writer per run folder ------------------------------------------------------------------------------

HOLD = """
import sys, time
from pathlib import Path
from semiseg.engine.runlock import FolderLock
FolderLock(Path(sys.argv[1]), "holder").acquire()
print("locked", flush=True)
time.sleep(120)
"""


def _holder(folder: Path) -> subprocess.Popen:
    """Another process holding `folder`'s lock (as a running `semiseg train` does)."""
    folder.mkdir(parents=True, exist_ok=True)
    proc = subprocess.Popen([sys.executable, "-c", HOLD, str(folder)], stdout=subprocess.PIPE, text=True)
    assert proc.stdout is not None and proc.stdout.readline().strip() == "locked"
    return proc


def test_second_train_into_a_busy_folder_is_refused_and_a_dead_holder_is_taken_over(
        tmp_path: Path, tiny_synthetic: str, capsys, monkeypatch) -> None:
    run = tmp_path / "run"
    args = ["train", "--method", "supervised", "--data", tiny_synthetic, "--out", str(run), "--quiet",
            *[f"--set={k}={','.join(map(str, v)) if isinstance(v, tuple) else v}" for k, v in TINY.items()]]
    holder = _holder(run)
    try:
        err = _one_line_error(args, capsys, monkeypatch)
        assert f"{run}: another semiseg process is writing into this folder (pid {holder.pid}" in err
        assert "`holder`" in err and not (run / "config.yaml").exists()
    finally:
        holder.kill()  # SIGKILL: the lock file stays behind, its flock dies with the process
        holder.wait()
    assert (run / LOCK).is_file()
    code, out, err = _cli(args, capsys, monkeypatch)
    assert code == 0, err
    assert f"took over the lock of a semiseg process that ended without releasing it (pid {holder.pid}" in err
    assert (run / "checkpoint.pt").is_file() and not (run / LOCK).exists()  # released at the end


def test_evaluate_into_a_busy_folder_is_refused(tiny_run: Path, tmp_path: Path, capsys, monkeypatch) -> None:
    out = tmp_path / "eval"
    out.mkdir()
    with FolderLock(out, "semiseg evaluate"):  # another writer (the lock is exclusive within a process too)
        err = _one_line_error(["evaluate", str(tiny_run), "--out", str(out)], capsys, monkeypatch)
        assert f"another semiseg process is writing into this folder (pid {os.getpid()}" in err
        assert list(out.iterdir()) == [out / LOCK]
    assert _cli(["evaluate", str(tiny_run), "--out", str(out)], capsys, monkeypatch)[0] == 0
    assert sorted(p.name for p in out.iterdir()) == ["cases.csv", "summary.json"]


def test_lock_is_exclusive_within_one_process_and_released(tmp_path: Path) -> None:
    first = FolderLock(tmp_path, "first").acquire()
    with pytest.raises(FolderBusyError, match=rf"pid {os.getpid()} .*`first`"):
        FolderLock(tmp_path, "second").acquire()
    first.release()
    assert not (tmp_path / LOCK).exists()
    with FolderLock(tmp_path, "third"):
        assert json.loads((tmp_path / LOCK).read_text())["command"] == "third"
    assert not (tmp_path / LOCK).exists()


def test_a_forked_child_does_not_keep_the_lock(tmp_path: Path) -> None:
    """A DataLoader worker outliving a killed run must not hold its folder: forked children drop the lock."""
    lock = FolderLock(tmp_path, "parent").acquire()
    read, write = os.pipe()
    ready_read, ready_write = os.pipe()
    pid = os.fork()
    if pid == 0:  # the child: say it runs (the fork hooks have run), then live until the parent has checked
        os.close(write)
        os.write(ready_write, b"r")
        os.read(read, 1)
        os._exit(0)
    os.close(read)
    os.read(ready_read, 1)
    try:
        assert lock._fd is not None
        os.close(lock._fd)  # the run dies as under SIGKILL: its descriptor closes, the lock file stays
        lock._fd = None
        with FolderLock(tmp_path, "next run"):  # the child lives on, yet the folder is free
            pass
    finally:
        os.write(write, b"x")
        os.waitpid(pid, 0)
