"""End-to-end CLI: methods, train -> evaluate -> predict on synthetic data, and one-line user errors."""

from __future__ import annotations

import json
import sys
from pathlib import Path

import h5py
import numpy as np
import pytest

from helpers import semiseg

TINY = ["--set", "patch_size=32,32,16", "--set", "stride=16,16,8", "--set", "n_filters=4", "--set", "num_workers=0",
        "--set", "log_every=2", "--set", "checkpoint_every=3"]


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
    assert card["inference"]["stride"] == [16, 16, 8] and card["inference"]["patch_size"] == [32, 32, 16]
    assert card["inference"]["post_lcc"] is False and "softmax" in card["inference"]["blend"]
    assert set(card["metrics"]["definitions"]) == {"dice", "jaccard", "hd95", "asd"}
    assert "final checkpoint" in card["checkpoint"]["how_chosen"] and card["seed"] == 1337
    assert card["code_version"].startswith("0.") and [c["case"] for c in summary["cases"]] == card["dataset"][
        "case_ids"]
    assert "checkpoint iteration 6/6 (rule: last)" in result.stdout and "empty policy legacy_zero" in result.stdout
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
    (["train", "--method", "supervised", "--data", "/does/not/exist"], "data folder not found"),
    (["train", "--method", "supervised", "--set", "lr=abc"], "config key 'lr'"),
    (["train", "--data", "/does/not/exist"], "train needs --method NAME; methods: admt, bcp, caml,"),
    (["evaluate", "/does/not/exist.pt"], "neither a run folder nor a checkpoint"),
    (["evaluate", "/does/not/exist.pt", "--spacing", "0.6,-1,1"], "--spacing '0.6,-1,1': give one positive size"),
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
    result = semiseg("evaluate", str(bad), "--out", str(tmp_path / "eval"), check=False)
    assert result.returncode == 2 and "unreadable checkpoint" in result.stderr
    beside = semiseg("evaluate", str(bad), check=False)  # not in a run folder: nothing is written beside the file
    assert beside.returncode == 2 and "give --out DIR" in beside.stderr and not (tmp_path / "eval-test").exists()


def test_existing_run_folder_needs_resume(tmp_path: Path, tiny_synthetic: str) -> None:
    run = tmp_path / "run"
    args = ["train", "--method", "supervised", "--data", tiny_synthetic, "--labeled", "2", "--iterations", "2",
            "--out", str(run), *TINY]
    semiseg(*args)
    result = semiseg(*args, check=False)
    assert result.returncode == 2 and "--resume" in result.stderr


def test_resume_accepts_the_original_command_and_refuses_a_changed_recipe(tmp_path: Path, tiny_synthetic: str,
                                                                          capsys, monkeypatch) -> None:
    run = tmp_path / "run"
    args = ["train", "--method", "supervised", "--data", tiny_synthetic, "--labeled", "2", "--iterations", "2",
            "--out", str(run), "--quiet", *TINY]
    assert _cli(args, capsys, monkeypatch)[0] == 0
    code, out, _ = _cli([*args, "--resume"], capsys, monkeypatch)  # already complete: nothing to do
    assert code == 0 and "checkpoint.pt" in out
    err = _cli_error([*args, "--set", "lr=0.1", "--resume"], capsys, monkeypatch)
    assert "lr (run 0.01, given 0.1)" in err


# ---- bad input through the real entry point: one line on stderr, exit status 2, the file or key named ----------

def _cli(args: list[str], capsys: pytest.CaptureFixture, monkeypatch: pytest.MonkeyPatch) -> tuple[int, str, str]:
    """Run the console-script entry point in this process: (exit status, stdout, stderr)."""
    from semiseg.cli import main

    monkeypatch.setattr(sys, "argv", ["semiseg", *args])
    with pytest.raises(SystemExit) as info:
        main()
    captured = capsys.readouterr()
    return info.value.code or 0, captured.out, captured.err.strip()


def _cli_error(args: list[str], capsys: pytest.CaptureFixture, monkeypatch: pytest.MonkeyPatch) -> str:
    code, _, err = _cli(args, capsys, monkeypatch)
    assert code == 2, err
    assert len(err.splitlines()) == 1 and err.startswith("error: "), err
    return err


def _la_copy(root: Path, damage) -> Path:  # noqa: ANN001 - a callable on the first training case's arrays
    """A 4 + 2 case LA-layout folder whose first training case is rewritten by `damage` (None: file removed)."""
    from semiseg.data.layouts.la import CASES_DIR

    ids = [f"C{i}" for i in range(6)]
    rng = np.random.default_rng(0)
    for i, case_id in enumerate(ids):
        label = np.zeros((40, 40, 32), np.uint8)
        label[10:30, 10:30, 8:24] = 1
        arrays = {"image": rng.standard_normal((40, 40, 32)).astype(np.float32), "label": label}
        arrays = damage(arrays) if i == 0 else arrays
        path = root / CASES_DIR / case_id / "mri_norm2.h5"
        path.parent.mkdir(parents=True)
        if arrays is None:
            continue
        with h5py.File(path, "w") as f:
            for key, value in arrays.items():
                f.create_dataset(key, data=value)
    (root / "train.list").write_text("\n".join(ids[:4]) + "\n")
    (root / "test.list").write_text("\n".join(ids[4:]) + "\n")
    return root


def _poison(value: float):  # noqa: ANN202
    def damage(arrays: dict) -> dict:
        arrays["image"][3, 4, 5] = value
        return arrays
    return damage


@pytest.mark.parametrize(("damage", "message"), [
    (lambda a: None, "file not found"),
    (lambda a: {"image": a["image"]}, "no 'label' dataset"),
    (lambda a: {"img": a["image"], "label": a["label"]}, "no 'image' dataset"),
    (lambda a: {"image": a["image"], "label": a["label"][:, :, :30]}, "label shape (40, 40, 30) differ"),
    (lambda a: {"image": a["image"], "label": a["label"] * 255}, "label values [0, 255] are outside 0..1"),
    (_poison(float("nan")), "1 NaN/Inf voxels"),
    (_poison(float("inf")), "1 NaN/Inf voxels"),
    ("truncate", "truncated or corrupt"),
], ids=["missing", "no-label", "no-image", "shape", "label-values", "nan", "inf", "corrupt"])
def test_bad_training_case_is_one_line_naming_the_file(damage, message: str, tmp_path: Path, capsys,
                                                       monkeypatch) -> None:
    root = _la_copy(tmp_path / "data", (lambda a: a) if damage == "truncate" else damage)
    bad = root / "2018LA_Seg_Training Set" / "C0" / "mri_norm2.h5"
    if damage == "truncate":
        bad.write_bytes(bad.read_bytes()[:1000])
    err = _cli_error(["train", "--method", "supervised", "--data", str(root), "--labeled", "2", "--iterations", "1",
                      "--out", str(tmp_path / "run"), *TINY], capsys, monkeypatch)
    assert message in err and str(bad) in err
    assert not (tmp_path / "run").exists()  # a failed train leaves no run folder behind


def test_bad_config_is_one_line_naming_the_key_or_file(tmp_path: Path, tiny_synthetic: str, capsys,
                                                       monkeypatch) -> None:
    base = ["train", "--method", "supervised", "--data", tiny_synthetic, "--out", str(tmp_path / "run"), *TINY]
    assert "labelled set is empty (--labeled 0)" in _cli_error([*base, "--labeled", "0"], capsys, monkeypatch)
    assert "unknown method 'supervise' (did you mean 'supervised'?)" in _cli_error(
        [*base, "--method", "supervise"], capsys, monkeypatch)
    assert "unknown config key 'lrr' (did you mean 'lr'?)" in _cli_error([*base, "--set", "lrr=0.1"], capsys,
                                                                          monkeypatch)
    typo = tmp_path / "typo.yaml"
    typo.write_text("lrr: 0.1\n")
    err = _cli_error([*base, "--config", str(typo)], capsys, monkeypatch)
    assert err.startswith(f"error: {typo}: unknown config key 'lrr'")
    broken = tmp_path / "broken.yaml"
    broken.write_text("lr: [1\n")
    assert f"{broken}: not valid YAML" in _cli_error([*base, "--config", str(broken)], capsys, monkeypatch)
    err = _cli_error([*base, "--set", "patch_size=30,30,16"], capsys, monkeypatch)
    assert "config key 'patch_size': every patch size must be a positive multiple of 16" in err


def test_bad_evaluate_options_are_one_line(tmp_path: Path, tiny_synthetic: str, capsys, monkeypatch) -> None:
    assert "prediction folder not found" in _cli_error(
        ["evaluate", "--pred", str(tmp_path / "none"), "--data", tiny_synthetic], capsys, monkeypatch)
    assert "--empty-policy 'zero'" in _cli_error(
        ["evaluate", "--pred", str(tmp_path), "--data", tiny_synthetic, "--empty-policy", "zero"], capsys,
        monkeypatch)
    assert "--checkpoint 'newest'" in _cli_error(["evaluate", str(tmp_path), "--checkpoint", "newest"], capsys,
                                                  monkeypatch)


def test_demo_trains_and_evaluates_on_the_embedded_synthetic_data(tmp_path: Path) -> None:
    """The README's quick start (`make demo` runs `semiseg demo`), at a 2-iteration budget."""
    run = tmp_path / "demo"
    result = semiseg("demo", "--out", str(run), "--iterations", "2")
    assert "mlrpl on synthetic data, 4 labelled + 16 unlabelled cases, 2 iterations, 4 test cases" in result.stdout
    assert "dice" in result.stdout and (run / "eval-test" / "summary.json").is_file()
    summary = json.loads((run / "eval-test" / "summary.json").read_text())
    assert summary["protocol"]["checkpoint"]["iteration"] == 2 and len(summary["cases"]) == 4


def test_evaluate_spacing_gives_distances_in_mm(tmp_path: Path, tiny_synthetic: str) -> None:
    """Without --spacing distances are in voxels (the papers); with it they scale by the voxel size."""
    from semiseg.data import open_dataset

    layout = open_dataset(tiny_synthetic)
    predictions = tmp_path / "pred"
    predictions.mkdir()
    for case_id in layout.test_ids:
        with h5py.File(predictions / f"{case_id}.h5", "w") as f:
            f.create_dataset("label", data=np.roll(layout.read_eval(case_id).label, 2, axis=0))
    summaries = {}
    for name, extra in (("vox", []), ("mm", ["--spacing", "0.5,0.5,0.5"])):
        out = semiseg("evaluate", "--pred", str(predictions), "--data", tiny_synthetic, "--out",
                      str(tmp_path / name), *extra).stdout
        summaries[name] = json.loads((tmp_path / name / "summary.json").read_text())
        assert ("mm (voxel spacing 0.5x0.5x0.5" in out) == (name == "mm")
    vox, mm = (summaries[k]["metrics"] for k in ("vox", "mm"))
    assert vox["hd95"]["mean"] > 0 and mm["hd95"]["mean"] == pytest.approx(vox["hd95"]["mean"] / 2)
    assert mm["asd"]["mean"] == pytest.approx(vox["asd"]["mean"] / 2)
    assert mm["dice"]["mean"] == vox["dice"]["mean"]
    assert summaries["mm"]["protocol"]["metrics"]["units"].startswith("mm")
    wrong = semiseg("evaluate", "--pred", str(predictions), "--data", tiny_synthetic, "--out",
                    str(tmp_path / "bad"), "--spacing", "1,1", check=False)
    assert wrong.returncode == 2 and "--spacing has 2 values" in wrong.stderr and "Traceback" not in wrong.stderr
