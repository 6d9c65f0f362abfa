"""Nothing a user made is deleted, nothing is written outside the output folder, one writer per folder.

Each test here failed on the code before issue 15: `prepare --out` deleted whatever folder it was given,
case ids such as `../x` wrote outside the run folder, and two runs could write into one folder.
"""

from __future__ import annotations

import json
from pathlib import Path

import pytest

from nifti_helpers import make_dataset
from semiseg.data.prepare import CACHE_DIR, PREPARED, prepare
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


def test_prepare_refuses_a_fake_marker(raw: Path, tmp_path: Path) -> None:
    out = tmp_path / "fake"
    out.mkdir()
    (out / PREPARED).write_text('{"format": "something else"}')
    with pytest.raises(DataError, match="not a previous output"):
        prepare(raw, out)
    assert (out / PREPARED).read_text() == '{"format": "something else"}'
