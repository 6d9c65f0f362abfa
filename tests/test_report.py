"""`semiseg report`: curves, overlays and the HTML page, rendered in headless Chromium."""

from __future__ import annotations

import functools
import json
import os
import re
import shutil
import subprocess
import threading
from http.server import SimpleHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path
from typing import NoReturn

import h5py
import numpy as np
import pytest
import yaml
from matplotlib.image import imread

from semiseg.data import open_dataset
from semiseg.engine.evaluate import evaluate_predictions
from semiseg.errors import DataError
from semiseg.report import PALETTE, plot_curves, plot_overlay, read_metrics, representative_slices, write_report

CHROMIUM_FLAGS = ["--headless", "--no-sandbox", "--disable-gpu", "--disable-quic", "--no-first-run",
                  "--disable-background-networking", "--disable-component-update", "--disable-sync"]
PROBE = """<!DOCTYPE html><html><body><iframe id="f" src="index.html" width="1200" height="900"></iframe><script>
window.addEventListener("load", () => {
  const d = document.getElementById("f").contentDocument;
  const result = {rows: [...d.querySelectorAll("table.cases tbody tr")].map(r => r.cells[0].textContent),
                  images: [...d.images].map(i => [i.getAttribute("src"), i.complete, i.naturalWidth])};
  const pre = document.createElement("pre");
  pre.id = "result";
  pre.textContent = JSON.stringify(result);
  document.body.appendChild(pre);
});
</script></body></html>"""


def _unavailable(reason: str) -> NoReturn:
    """Skip on a developer machine; fail under CI (`CI` set), where the browser test must really run."""
    if os.environ.get("CI"):
        pytest.fail(reason)
    pytest.skip(reason)


@pytest.fixture(scope="session")
def chromium() -> str:
    """Debian's chromium; installed with apt-get when absent (needs root, as in CI)."""
    found = shutil.which("chromium")
    if found:
        return found
    if shutil.which("apt-get") is None or os.geteuid() != 0:
        _unavailable("chromium is not installed and cannot be installed here (needs apt-get as root): "
                     "apt-get install chromium")
    env = {**os.environ, "DEBIAN_FRONTEND": "noninteractive"}
    errors = ""
    for command in (["apt-get", "install", "-y", "-qq", "chromium"], ["apt-get", "update", "-qq"],
                    ["apt-get", "install", "-y", "-qq", "chromium"]):
        result = subprocess.run(command, env=env, capture_output=True, text=True, timeout=1200)
        errors = result.stderr[-500:]
        if shutil.which("chromium"):
            return str(shutil.which("chromium"))
    _unavailable(f"installing Debian's chromium with apt-get failed: {errors}")


def _run_folder(tmp_path: Path, data: str, with_eval: bool = True) -> Path:
    """A run folder as train + `evaluate --save-predictions` leave it; predictions = shifted labels."""
    run = tmp_path / "run"
    run.mkdir()
    (run / "config.yaml").write_text(yaml.safe_dump({"method": "supervised", "data": data, "layout": "auto",
                                                     "labeled": 4, "iterations": 40, "seed": 1}))
    records = [{"iteration": i, "lr": 0.01, "loss": 1.0 / i, "loss/supervised": 0.9 / i} for i in range(10, 41, 10)]
    records += [{"iteration": 20, "val_dice": 0.5}, {"iteration": 40, "val_dice": 0.7}]
    (run / "metrics.jsonl").write_text("".join(json.dumps(r) + "\n" for r in records))
    if with_eval:
        layout = open_dataset(data)
        predictions = run / "eval-test" / "predictions"
        predictions.mkdir(parents=True)
        for case_id in layout.test_ids:
            with h5py.File(predictions / f"{case_id}.h5", "w") as f:
                f.create_dataset("label", data=np.roll(layout.read_eval(case_id).label, 2, axis=0))
        evaluate_predictions(predictions, data, run / "eval-test")
    return run


def test_report_renders_in_headless_chromium(tmp_path: Path, tiny_synthetic: str, chromium: str) -> None:
    run = _run_folder(tmp_path, tiny_synthetic)
    report = write_report(run)
    assert report.notes == []
    folder = report.index.parent
    (folder / "probe.html").write_text(PROBE)
    handler = functools.partial(SimpleHTTPRequestHandler, directory=str(folder))
    handler.log_message = lambda *args: None  # type: ignore[method-assign]
    server = ThreadingHTTPServer(("127.0.0.1", 0), handler)
    threading.Thread(target=server.serve_forever, args=(0.05,), daemon=True).start()
    try:
        url = f"http://127.0.0.1:{server.server_address[1]}/probe.html"
        dom = subprocess.run([chromium, *CHROMIUM_FLAGS, f"--user-data-dir={tmp_path / 'profile'}",
                              "--virtual-time-budget=10000", "--dump-dom", url],
                             capture_output=True, text=True, timeout=120).stdout
    finally:
        server.shutdown()
        server.server_close()
    match = re.search(r'<pre id="result">(.*?)</pre>', dom)
    assert match, dom[-2000:]
    result = json.loads(match[1].replace("&quot;", '"'))
    test_ids = open_dataset(tiny_synthetic).test_ids
    assert result["rows"] == test_ids  # one table row per test case, in order
    images = {src: (complete, width) for src, complete, width in result["images"]}
    assert set(images) == {"curves.png", *(f"cases/{c}.png" for c in test_ids)}
    for src, (complete, width) in images.items():  # loaded, at the PNG's own size
        assert complete and width == imread(folder / src).shape[1], src
    summary = json.loads((run / "eval-test" / "summary.json").read_text())
    page = report.index.read_text()
    for row in summary["cases"]:
        assert f"<td>{row['dice']:.4f}</td>" in page  # fractions, as `semiseg evaluate` prints them


def test_representative_slices_follow_the_foreground() -> None:
    label = np.zeros((30, 28, 20), np.uint8)
    label[5:15, 5:15, 4:15] = 1  # z 4..14 on the thinnest axis (2)
    assert representative_slices(label, np.zeros_like(label)) == (2, [6, 9, 12])
    pred = np.zeros_like(label)
    pred[5:10, 5:10, 15:17] = 1  # a false positive extends the range shown
    assert representative_slices(label, pred) == (2, [6, 10, 14])
    assert representative_slices(np.zeros((8, 8, 5), np.uint8), np.zeros((8, 8, 5), np.uint8)) == (2, [1, 2, 3])


def test_overlay_draws_prediction_fill_and_truth_outline(tmp_path: Path) -> None:
    label = np.zeros((32, 32, 16), np.uint8)
    label[8:24, 8:24, 4:12] = 1
    pred = np.zeros_like(label)
    pred[12:28, 12:28, 4:12] = 2
    image = np.random.default_rng(0).random(label.shape).astype(np.float32)
    path = plot_overlay(image, label, pred, ("background", "a", "b"), "case", tmp_path / "o.png")
    rgb = imread(path)[..., :3]
    assert rgb.shape[1] == 3 * 330  # three slices
    outline = np.array([int(PALETTE[0][i:i + 2], 16) / 255 for i in (1, 3, 5)])  # class 1 ("a"): red outline
    assert (np.abs(rgb - outline).max(-1) < 0.05).sum() > 100
    green = (rgb[..., 1] > rgb[..., 0] + 0.15) & (rgb[..., 1] > rgb[..., 2] + 0.15)  # class 2 fill over grey
    assert green.sum() > 1000


def test_curves_have_one_panel_per_quantity(tmp_path: Path) -> None:
    records = [{"iteration": i, "lr": 0.01, "loss": 1.0 / i} for i in range(1, 6)]
    assert imread(plot_curves(records, tmp_path / "a.png")).shape[1] == 2 * 420
    records.append({"iteration": 5, "val_dice": 0.8})
    assert imread(plot_curves(records, tmp_path / "b.png")).shape[1] == 3 * 420


def test_report_without_evaluation_says_what_to_run(tmp_path: Path, tiny_synthetic: str) -> None:
    run = _run_folder(tmp_path, tiny_synthetic, with_eval=False)
    report = write_report(run)
    assert len(report.notes) == 1 and f"semiseg evaluate {run} --split test --save-predictions" in report.notes[0]
    page = report.index.read_text()
    assert "class='cases'" not in page and 'src="curves.png"' in page and "--save-predictions" in page
    with pytest.raises(DataError, match="not a run folder"):
        write_report(tmp_path)


def test_records_repeated_after_a_resume_replace_the_interrupted_ones(tmp_path: Path) -> None:
    """Killed at iteration 5 after a checkpoint at 3, resumed: iterations 4 and 5 are logged twice."""
    first = [{"iteration": i, "loss": 1.0} for i in range(1, 6)] + [{"iteration": 4, "val_dice": 0.1}]
    resumed = [{"iteration": i, "loss": 2.0} for i in range(4, 8)] + [{"iteration": 4, "val_dice": 0.2}]
    path = tmp_path / "metrics.jsonl"
    path.write_text("".join(json.dumps(r) + "\n" for r in first + resumed))
    records = read_metrics(path)
    assert [(r["iteration"], r["loss"]) for r in records if "loss" in r] == [(1, 1.0), (2, 1.0), (3, 1.0), (4, 2.0),
                                                                           (5, 2.0), (6, 2.0), (7, 2.0)]
    assert [r for r in records if "val_dice" in r] == [{"iteration": 4, "val_dice": 0.2}]


def test_undefined_metrics_are_null_in_summary_json_and_dashes_in_the_report(tmp_path: Path,
                                                                             tiny_synthetic: str) -> None:
    """`--empty-policy nan` leaves distances undefined for an empty prediction: strict JSON, not a bare NaN."""
    run = _run_folder(tmp_path, tiny_synthetic, with_eval=False)
    layout = open_dataset(tiny_synthetic)
    predictions = run / "eval-test" / "predictions"
    predictions.mkdir(parents=True)
    for i, case_id in enumerate(layout.test_ids):
        label = layout.read_eval(case_id).label
        with h5py.File(predictions / f"{case_id}.h5", "w") as f:
            f.create_dataset("label", data=np.zeros_like(label) if i == 0 else label)
    evaluate_predictions(predictions, tiny_synthetic, run / "eval-test", empty_policy="nan")

    def refuse(token: str) -> NoReturn:
        raise AssertionError(f"non-standard JSON token {token}")

    summary = json.loads((run / "eval-test" / "summary.json").read_text(), parse_constant=refuse)
    assert summary["cases"][0]["hd95"] is None and summary["cases"][0]["dice"] == 0.0
    assert summary["metrics"]["hd95"]["n"] == len(layout.test_ids) - 1
    assert summary["metrics"]["hd95"]["mean"] == 0.0  # the other predictions are perfect
    page = (write_report(run).index).read_text()
    assert "–" in page
