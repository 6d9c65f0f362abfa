"""The LA-mini benchmark's bookkeeping (benchmarks/la_mini.py): seeds recorded per run, statistics over seeds."""

from __future__ import annotations

import csv
import importlib.util
import sys
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parents[1]
_spec = importlib.util.spec_from_file_location("la_mini", REPO / "benchmarks" / "la_mini.py")
la_mini = importlib.util.module_from_spec(_spec)
_spec.loader.exec_module(la_mini)

OLD_HEADER = ["method", "variant", "labeled", "iterations", "n_filters", "dice", "jaccard", "hd95", "asd",
              "train_wall_s", "wall_s", "s_per_it", "peak_mb", "overrides", "stamp"]
COMMON = "patch_size=64,64,32 stride=9,9,2 n_filters=8"


def _row(method: str, variant: str, dice: float, overrides: str = COMMON) -> dict[str, str]:
    return {"method": method, "variant": variant, "labeled": "8", "iterations": "240", "n_filters": "8",
            "dice": str(dice), "jaccard": str(dice / 2), "hd95": "10", "asd": "2", "train_wall_s": "60",
            "wall_s": "66", "s_per_it": "0.25", "peak_mb": "700", "overrides": overrides, "stamp": "Machine: test."}


@pytest.fixture()
def results(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> Path:
    """la_mini.csv and BENCHMARKS.md in a temporary folder, the CSV in the format before the seed column."""
    monkeypatch.setattr(la_mini, "RESULTS", tmp_path)
    monkeypatch.setattr(la_mini, "CSV_PATH", tmp_path / "la_mini.csv")
    monkeypatch.setattr(sys.modules["common"], "BENCHMARKS_MD", tmp_path / "BENCHMARKS.md")
    with open(tmp_path / "la_mini.csv", "w", newline="") as f:
        writer = csv.DictWriter(f, fieldnames=OLD_HEADER)
        writer.writeheader()
        writer.writerows([_row("supervised", "recipe", 0.40), _row("caml", "recipe", 0.20),
                          _row("supervised", "seed=2", 0.60, f"{COMMON} seed=2")])
    return tmp_path


def test_rows_without_a_seed_column_get_the_seed_they_ran_with(results: Path) -> None:
    rows = la_mini.read_rows()
    assert [(r["method"], r["variant"], r["seed"]) for r in rows] == [
        ("supervised", "recipe", "1337"), ("caml", "recipe", "3407"), ("supervised", "recipe", "2")]
    la_mini.write_rows([*rows, {**_row("supervised", "recipe", 0.50), "seed": 3}])
    with open(results / "la_mini.csv") as f:
        reader = csv.DictReader(f)
        assert reader.fieldnames == la_mini.FIELDS and [r["seed"] for r in reader] == ["1337", "3407", "2", "3"]


def test_settings_run_with_several_seeds_get_mean_and_sample_std(results: Path) -> None:
    la_mini.render()
    text = (results / "BENCHMARKS.md").read_text()
    runs, seeds = text.split("<!-- la-mini-seeds:start -->")
    assert "| supervised | recipe | 8 | 240 | 8 | 2 | 60.00 |" in runs
    assert "| caml | recipe | 8 | 240 | 8 | 3407 |" in runs
    # Dice 40 and 60: mean 50, sample std 14.1; caml has one seed, so no statistics row
    assert ("| supervised | recipe | 8 | 240 | 8 | 1337 2 | 50.0 ± 14.1 | 25.0 ± 7.1 | 10.0 ± 0.0 | 2.0 ± 0.0 "
            "| 40.0 / 60.0 |") in seeds
    assert "| caml |" not in seeds
