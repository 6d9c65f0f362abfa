"""The LA-mini benchmark's bookkeeping (benchmarks/la_mini.py): seeds recorded per run, statistics over seeds,
runs stopped when they cannot finish by `--finish-by`."""

from __future__ import annotations

import csv
import datetime as dt
import importlib.util
import json
import subprocess
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


def _curve(points: dict[int, float]) -> str:
    return "".join(json.dumps({"iteration": it, "val_dice": d, "wall_s": it * 0.2}) + "\n" for it, d in points.items())


def test_calibration_finds_the_first_budget_where_all_labels_beat_8_on_every_seed(
        results: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    curves = results / "curves"
    curves.mkdir()
    monkeypatch.setattr(la_mini, "CURVES", curves)
    # 8 labels: 0.50 / 0.55 / 0.60 at every point; 72 labels: below at 150, a 5-point gap at 300 (fails), then
    # 0.70 / 0.72 / 0.74 from 450 on (gap 17, every 72-label seed above every 8-label seed)
    for seed, suffix in ((1337, ""), (2, "-seed_2"), (3, "-seed_3")):
        low = 0.50 + 0.05 * [1337, 2, 3].index(seed)
        (curves / f"supervised-8-3000-val8{suffix}.jsonl").write_text(_curve({150: low, 300: low, 450: low, 600: low}))
        high = [0.70, 0.72, 0.74][[1337, 2, 3].index(seed)]
        (curves / f"supervised-72-3000-val8{suffix}.jsonl").write_text(
            _curve({150: 0.4, 300: low + 0.05, 450: high, 600: high}))
    table = la_mini.calibration_table(la_mini.curve_files())
    assert [r["iteration"] for r in table] == [150, 300, 450, 600]
    assert [r["passes"] for r in table] == [False, False, True, True]
    assert table[1]["gap"] == pytest.approx(5.0) and not table[1]["passes"]
    # trailing 3-point means: at 450 the 72-label seeds average (0.4, low + 0.05, high), not above every 8-label
    # seed; at 600 (low + 0.05, high, high): gap (5 + 2 x 17) / 3 = 13
    assert table[3]["gap_smoothed"] == pytest.approx(13.0) and table[3]["passes_smoothed"]
    assert not table[2]["passes_smoothed"]
    text = la_mini.render_calibration()
    assert "passes at every later point from **450** iterations" in text
    # seeds in numeric order: 2, 3, 1337
    assert ("| 450 | 55.0 ± 5.0 | 55.0 / 60.0 / 50.0 | 72.0 ± 2.0 | 72.0 / 74.0 / 70.0 | +17.0 | yes | **pass** |"
            in text)


def test_calibration_needs_both_label_counts(results: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    curves = results / "curves"
    curves.mkdir()
    monkeypatch.setattr(la_mini, "CURVES", curves)
    (curves / "supervised-8-3000-val8-partial.jsonl").write_text(_curve({150: 0.5}))
    assert la_mini.calibration_table(la_mini.curve_files()) == []
    assert "No calibration curves yet" in la_mini.render_calibration()


def test_calibration_on_the_test_set_uses_the_finished_runs_of_the_calibrated_protocol(results: Path) -> None:
    rows = la_mini.read_rows()  # the uncalibrated rows (val 0) take no part
    for seed, low, high in ((1337, 0.79, 0.865), (2, 0.76, 0.85), (3, 0.80, 0.84)):
        rows += [{**_row("supervised", "recipe", low), "iterations": "3000", "seed": str(seed), "val": "8"},
                 {**_row("supervised", "recipe", high), "iterations": "3000", "labeled": "72", "seed": str(seed),
                  "val": "8"}]
    rows.append({**_row("supervised", "recipe", 0.9), "iterations": "1500", "seed": "1337", "val": "8"})
    table = la_mini.test_calibration(rows)
    assert [r["iteration"] for r in table] == [3000]  # 1,500 has no 72-label run
    (r,) = table
    assert r["seeds"] == [2, 3, 1337] and r["gap"] == pytest.approx(100 * (2.555 - 2.35) / 3)
    assert r["separated"] and r["passes"]
    rows[-2]["dice"] = "0.795"  # seed 3 with 72 labels no longer above every 8-label seed (0.80)
    assert not la_mini.test_calibration(rows)[0]["passes"]


def test_deadline_parses_a_time_of_day_or_an_iso_date_time() -> None:
    now = dt.datetime(2026, 12, 3, 9, 0, tzinfo=dt.UTC)
    assert la_mini.parse_deadline("11:25", now) == dt.datetime(2026, 12, 3, 11, 25, tzinfo=dt.UTC)
    assert la_mini.parse_deadline("2026-12-04T01:00", now) == dt.datetime(2026, 12, 4, 1, 0, tzinfo=dt.UTC)
    with pytest.raises(SystemExit, match="give HH:MM"):
        la_mini.parse_deadline("soon", now)


def test_finish_is_projected_from_the_fastest_recent_rate_after_50_new_iterations() -> None:
    now = dt.datetime(2026, 12, 3, 9, 0, tzinfo=dt.UTC)
    records = [{"iteration": 200, "s_per_it": 3.0}, {"iteration": 250, "s_per_it": 9.0},
               {"iteration": 300, "s_per_it": 2.0}, {"iteration": 300, "val_dice": 0.5}]
    finish = la_mini.projected_finish(records, 3000, 0, now, margin_s=60)
    assert finish == now + dt.timedelta(seconds=2700 * 2.0 + 60)  # the fastest recent rate: a busy spell passes
    assert la_mini.projected_finish(records[:2], 3000, 0, now, 0) == now + dt.timedelta(seconds=2750 * 3.0)
    assert la_mini.projected_finish(records, 3000, 260, now, 60) is None  # resumed at 260: not 50 new iterations yet
    assert la_mini.projected_finish([], 3000, 0, now, 60) is None


def test_a_training_projected_past_the_deadline_is_stopped_with_sigterm(tmp_path: Path) -> None:
    """A stand-in training logs 2 s/iteration for 3,000 iterations: past a deadline 10 minutes away, so it is
    stopped at the first poll after its 50th iteration; one that fits runs to its end."""
    metrics = tmp_path / "metrics.jsonl"
    child = tmp_path / "train.py"
    child.write_text(
        "import json, signal, sys, time\n"
        "signal.signal(signal.SIGTERM, lambda *a: (open(sys.argv[2], 'w').write('stopped'), sys.exit(130)))\n"
        "for it in (50, 100):\n"
        "    with open(sys.argv[1], 'a') as f:\n"
        "        f.write(json.dumps({'iteration': it, 's_per_it': float(sys.argv[3])}) + '\\n')\n"
        "    time.sleep(0.3)\n"
        "time.sleep(float(sys.argv[4]))\n")
    flag = tmp_path / "flag"
    soon = dt.datetime.now(dt.UTC) + dt.timedelta(minutes=10)
    with pytest.raises(la_mini.PastDeadline, match="stopped with a checkpoint"):
        la_mini.supervise([sys.executable, str(child), str(metrics), str(flag), "2.0", "30"], metrics, 3000, soon,
                          margin_s=0, poll_s=0.2)
    assert flag.read_text() == "stopped"
    metrics.unlink()
    la_mini.supervise([sys.executable, str(child), str(metrics), str(flag), "0.01", "0"], metrics, 3000, soon,
                      margin_s=0, poll_s=0.2)  # 2,900 x 0.01 s fits: runs to its end
    with pytest.raises(subprocess.CalledProcessError):
        la_mini.supervise([sys.executable, "-c", "raise SystemExit(3)"], metrics, 3000, None, 0)
