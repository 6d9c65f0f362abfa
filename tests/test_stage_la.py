"""The LA staging packer (benchmarks/stage_la.py): lossless, split into parts, resumable unpacking."""

from __future__ import annotations

import importlib.util
from pathlib import Path

import numpy as np
import pytest

from semiseg.data.h5 import read_case, write_case

REPO = Path(__file__).resolve().parents[1]
_spec = importlib.util.spec_from_file_location("stage_la", REPO / "benchmarks" / "stage_la.py")
stage_la = importlib.util.module_from_spec(_spec)
_spec.loader.exec_module(stage_la)


def _write_la(root: Path, ids: list[str], images: list[np.ndarray], labels: list[np.ndarray]) -> Path:
    for case_id, image, label in zip(ids, images, labels):
        write_case(root / stage_la.CASES_DIR / case_id / "mri_norm2.h5", image, label)
    (root / "train.list").write_text("".join(f"{i}\n" for i in ids[:-1]))
    (root / "test.list").write_text(f"{ids[-1]}\n")
    return root


def _same_cases(a: Path, b: Path, ids: list[str]) -> None:
    for case_id in ids:
        x = read_case(a / stage_la.CASES_DIR / case_id / "mri_norm2.h5", case_id, 2)
        y = read_case(b / stage_la.CASES_DIR / case_id / "mri_norm2.h5", case_id, 2)
        assert x.image.dtype == y.image.dtype and np.array_equal(x.image, y.image)
        assert np.array_equal(x.label, y.label)


def test_round_trip_is_lossless_across_parts_and_resumable(tmp_path: Path) -> None:
    rng = np.random.default_rng(0)
    ids = ["A", "B", "C"]
    table = rng.normal(size=200).astype(np.float32)
    images = [table[rng.integers(0, 200, (20, 18, 12))],  # few distinct values: the uint8 index path
              rng.normal(size=(16, 16, 8)).astype(np.float32),  # arbitrary floats: the raw path
              table[rng.integers(0, 50, (10, 12, 14))]]
    labels = [(rng.random(im.shape) > 0.7).astype(np.uint8) for im in images]
    source = _write_la(tmp_path / "src", ids, images, labels)
    parts = stage_la.pack(source, tmp_path / "stage", part_mb=0.004)
    assert len(parts) >= 2  # the small part size splits the cases
    out = tmp_path / "LA"
    assert stage_la.unpack(parts[0], out) >= 1
    assert stage_la.unpack(parts[0], out) == 0  # finished cases are skipped on a second call
    for part in parts[1:]:
        stage_la.unpack(part, out)
    _same_cases(source, out, ids)
    assert (out / "train.list").read_text() == (source / "train.list").read_text()
    assert (out / "test.list").read_text() == "C\n"


def test_a_damaged_part_is_refused(tmp_path: Path) -> None:
    rng = np.random.default_rng(1)
    image = rng.normal(size=(8, 8, 8)).astype(np.float32)
    source = _write_la(tmp_path / "src", ["A", "B"], [image, image], [np.zeros((8, 8, 8), np.uint8)] * 2)
    part = stage_la.pack(source, tmp_path / "stage", part_mb=60)[0]
    with np.load(part) as data:
        arrays = {k: data[k] for k in data.files}
    entry_manifest = arrays["manifest"].tobytes().replace(b'"image_sha256": "', b'"image_sha256": "0', 1)
    arrays["manifest"] = np.frombuffer(entry_manifest, np.uint8)
    np.savez(part, **arrays)
    with pytest.raises(SystemExit, match="does not match its digest"):
        stage_la.unpack(part, tmp_path / "LA")
    assert not list((tmp_path / "LA").rglob("*.h5"))


def test_real_la_cases_pack_smaller_and_exactly(tmp_path: Path, la_root: Path) -> None:
    ids = (la_root / "train.list").read_text().split()[:2]
    source = tmp_path / "src"
    for case_id in ids:
        (source / stage_la.CASES_DIR / case_id).mkdir(parents=True)
        (source / stage_la.CASES_DIR / case_id / "mri_norm2.h5").symlink_to(
            la_root / stage_la.CASES_DIR / case_id / "mri_norm2.h5")
    (source / "train.list").write_text(ids[0] + "\n")
    (source / "test.list").write_text(ids[1] + "\n")
    part = stage_la.pack(source, tmp_path / "stage", part_mb=60)[0]
    original = sum((la_root / stage_la.CASES_DIR / i / "mri_norm2.h5").stat().st_size for i in ids)
    assert part.stat().st_size < 0.8 * original
    stage_la.unpack(part, tmp_path / "LA")
    _same_cases(source, tmp_path / "LA", ids)
