"""benchmarks/lean_artifacts.py's official column: semiseg's weights under the official keys, the per-case metric
comparison, the report, and the skip when no official checkout is there (the official code is not needed here)."""

from __future__ import annotations

import importlib.util
import sys
from pathlib import Path

import pytest
import torch

from semiseg.errors import CheckpointError
from semiseg.methods import get_method
from semiseg.methods.base import NetSpec
from semiseg.official import map_official_state, to_official_state

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO / "benchmarks"))
_spec = importlib.util.spec_from_file_location("lean_artifacts", REPO / "benchmarks" / "lean_artifacts.py")
lean = importlib.util.module_from_spec(_spec)
_spec.loader.exec_module(lean)


def _caml_net() -> torch.nn.Module:
    cls = get_method("caml")
    return cls(cls.Params(), NetSpec(1, 2, 3, 2)).net


def test_semiseg_weights_go_back_to_the_official_file_exactly(official_caml_pth: Path) -> None:
    official = torch.load(official_caml_pth, weights_only=True)
    ours = map_official_state(official, "caml", 3, _caml_net().state_dict())
    back = to_official_state(ours, list(official), "caml", 3)
    assert list(back) == list(official)
    assert all(torch.equal(back[k], official[k]) for k in official)


def test_official_export_refuses_a_network_that_does_not_fit(official_caml_pth: Path) -> None:
    official_keys = list(torch.load(official_caml_pth, weights_only=True))
    ours = _caml_net().state_dict()
    dropped = dict(ours)
    dropped.pop("f_v.encoder.block_one.0.weight")
    with pytest.raises(CheckpointError, match="missing"):
        to_official_state(dropped, official_keys, "caml", 3)
    with pytest.raises(CheckpointError, match="unused"):
        to_official_state({**ours, "extra.weight": torch.zeros(1)}, official_keys, "caml", 3)


def test_per_case_metrics_compare_to_a_relative_tolerance() -> None:
    official = {"A": [0.9, 0.8, 5.0, 1.5], "B": [0.0, 0.0, 0.0, 0.0]}
    same = lean.compare_cases(official, {"A": [0.9, 0.8, 5.0 + 1e-12, 1.5], "B": [0.0] * 4})
    assert same["identical"] and same["max_abs_diff"]["hd95"] == pytest.approx(1e-12, abs=1e-15)
    off = lean.compare_cases(official, {"A": [0.9, 0.8, 5.01, 1.5], "B": [0.0] * 4})
    assert not off["identical"] and off["max_abs_diff"]["hd95"] == pytest.approx(0.01)
    assert not lean.compare_cases(official, {"A": [0.9, 0.8, 5.0, 1.5]})["identical"]


def test_report_states_the_verdict_against_the_official_peak() -> None:
    cases = {"A": [0.9, 0.8, 5.0, 1.5]}
    result = {"official": {"peak_mib": 2000.0, "wall_s": 10.0}, "semiseg": {"peak_mib": 1100.0, "wall_s": 5.0},
              "official_cases": cases, "official_empty": [], "semiseg_cases": cases, "rtol": lean.RTOL,
              "strides_asked": {"stride_xy": 18, "stride_z": 4}, "strides_used": {"stride_xy": 56, "stride_z": 40},
              "comparison": lean.compare_cases(cases, cases)}
    text = lean.official_markdown(result, {"model.pt": 1150.0})
    assert "**Target met**" in text and "18/4" in text and "56/40" in text
    assert "1150 MiB (model.pt, table above, -850)" in text
    over = lean.official_markdown(result, {"model.pt": 2100.0})
    assert "**Target not met**" in over and "+100" in over
    assert "(run folder, default: 2 windows per forward pass)" in over  # measured before the default was recorded
    result.update(default_windows=1, other_windows={"windows": 2, "peak_mib": 2500.0, "wall_s": 6.0,
                                                    "identical": True})
    other = lean.official_markdown(result, {"model.pt": 1150.0})
    assert "**Target met** at the default (1 window per forward pass)" in other
    assert "2 windows per forward pass | 2500" in other
    assert "2500 MiB (+500), per-case metrics identical, above the official peak" in other
    result["comparison"] = lean.compare_cases(cases, {"A": [0.5, 0.8, 5.0, 1.5]})
    assert "metrics differ" in lean.official_markdown(result, {"model.pt": 1150.0})


def _row(method: str, peak: float) -> dict:
    evaluate = {v: {"peak_mib": peak} for v in ("before", "after", "after_model")}
    return {"method": method, "checkpoint_mib": 90.0, "model_mib": 36.1, "params": 9448866, "fp32_mib": 36.0,
            "evaluate": evaluate, "identical": True, "cpu_windows": 1, "iterations": 1}


def test_report_has_one_official_section_and_column_per_script_run() -> None:
    cases = {"A": [0.9, 0.8, 5.0, 1.5]}
    official = {"method": "mcnet", "repo": "ycwu1997/MC-Net", "stamp": "Machine: X. Commit: c. Date: d.",
                "official": {"peak_mib": 1300.0, "wall_s": 10.0}, "semiseg": {"peak_mib": 900.0, "wall_s": 5.0},
                "official_cases": cases, "official_empty": [], "semiseg_cases": cases, "rtol": lean.RTOL,
                "strides_asked": {"stride_xy": 18, "stride_z": 4}, "strides_used": {"stride_xy": 56, "stride_z": 40},
                "comparison": lean.compare_cases(cases, cases)}
    text = lean.markdown([_row("mcnet", 910.0), _row("mlrpl", 920.0)], "cmd", 2, {"mcnet": official})
    assert "| mcnet | 90.0 | 36.1 | 9,448,866 | 36.0 | +0.3 % | 910 | 910 | 910 | 1 | 1300 | yes |" in text
    assert "| mlrpl |" in text and text.split("| mlrpl |")[1].split("\n")[0].count("| - |") == 1
    assert "#### MC-Net: the official test script" in text and "ycwu1997/MC-Net" in text
    assert "Machine: X. Commit: c. Date: d." in text and "strict=False" in text
    assert "910 MiB (model.pt, table above, -390)" in text and "**Target met**" in text
    assert "the official test scripts of MC-Net" in text and "for mlrpl no official test script was run" in text
    assert "no official test script was run" in lean.markdown([_row("mlrpl", 920.0)], "cmd", 2)


def test_official_run_is_skipped_without_the_checkout(tmp_path: Path, capsys: pytest.CaptureFixture) -> None:
    # Nothing is trained or evaluated: the checkout test comes first.
    mcnet_like = tmp_path / "MC-Net"
    (mcnet_like / "code").mkdir(parents=True)
    (mcnet_like / "code" / "test_3d.py").write_text("")
    assert lean.official_test("ssnet", mcnet_like, tmp_path / "data", tmp_path / "work", 1, 1,
                              tmp_path / "src") is None  # SS-Net's script is code/test_LA.py
    assert "no official test script code/test_LA.py there (ycwu1997/SS-Net)" in capsys.readouterr().out
    for method in ("caml", "mcnet", "mcnet_plus", "ssnet", "bcp"):
        assert lean.official_test(method, tmp_path / "absent", tmp_path / "data", tmp_path / "work", 1, 1,
                                  tmp_path / "src") is None
        assert f"official column of {method} is skipped" in capsys.readouterr().out
    assert not (tmp_path / "work").exists()


def test_a_method_newer_than_the_before_commit_is_trained_with_this_checkout(tmp_path: Path,
                                                                            monkeypatch) -> None:
    """The before code cannot train or read a method it does not have: its run comes from this checkout and the
    row has no before column (a real before tree is asked which methods it registers)."""
    old = tmp_path / "old-src" / "semiseg" / "methods"
    old.mkdir(parents=True)
    (old.parent / "__init__.py").write_text("")
    (old / "__init__.py").write_text("def available_methods():\n    return {'supervised': 0, 'caml': 0}\n")
    src = old.parent.parent
    assert lean.methods_of(src) == {"supervised", "caml"}
    assert lean.training_code("caml", src) == src and lean.training_code("dtc", src) is None
    calls = []
    monkeypatch.setattr(lean, "measured", lambda args, log, pythonpath=None, **_: calls.append(pythonpath)
                        or {"rc": 0})
    lean.ensure_run("dtc", tmp_path / "data", tmp_path / "work", 1, src)
    lean.ensure_run("caml", tmp_path / "data", tmp_path / "work", 1, src)
    assert calls == [None, src]
    newer = _row("dtc", 800.0)
    del newer["evaluate"]["before"]
    text = lean.markdown([_row("caml", 900.0), newer], "cmd", 2)
    assert "| dtc | 90.0 | 36.1 | 9,448,866 | 36.0 | +0.3 % | - (newer method) | 800 | 800 | 1 | - | yes |" in text
    assert "none for a method added after that commit" in text


FAKE_UTILITY = '''
import numpy as np

def {single}(model, image, stride_xy, stride_z, patch_size, num_classes=1):
    return image > 0, None

def calculate_metric_percase(pred, gt):
    return float(pred.mean()), 0.5, 3.0, 1.25

def test_all_case(*args, stride_xy=18, stride_z=4, **kwargs):
    print("strides", stride_xy, stride_z)
    for image in (np.ones(4), np.zeros(4)):
        prediction, _ = {single}(None, image, stride_xy, stride_z, (2, 2, 2))
        if np.sum(prediction) == 0:
            continue
        calculate_metric_percase(prediction, prediction)
'''
FAKE_SCRIPT = '''
import numpy as np
from {module} import test_all_case
assert np.int is int  # the alias the official utilities use
if __name__ == "__main__":
    test_all_case(None, [], num_classes=2, stride_xy=18, stride_z=4)
'''


@pytest.mark.parametrize("method", ["mcnet", "ssnet", "bcp"])
def test_official_test_step_patches_the_layout_of_each_script(tmp_path: Path, method: str) -> None:
    """The `test` step on a stand-in checkout with the file layout of the method's official script: the strides it
    asks for are replaced, each case is counted, the metrics are recorded in full precision and an empty
    prediction is scored 0 (what the official script does) and named."""
    import json
    import subprocess

    import official_test
    spec = official_test.TESTS[method]
    checkout = tmp_path / "checkout"
    module_file = checkout / spec.script.rsplit("/", 1)[0] / (spec.patch_module.replace(".", "/") + ".py")
    module_file.parent.mkdir(parents=True)
    module_file.write_text(FAKE_UTILITY.format(single=spec.single_case))
    (module_file.parent / "__init__.py").write_text("")
    (checkout / spec.script).write_text(FAKE_SCRIPT.format(module=spec.patch_module))
    scratch = tmp_path / "scratch"
    (scratch / "data" / "LA").mkdir(parents=True)
    (scratch / "data" / "LA" / "test.list").write_text("CASE_A\nCASE_B\n")
    (scratch / "official.json").write_text(json.dumps({"method": method, "argv": list(spec.argv)}))
    done = subprocess.run([sys.executable, str(REPO / "benchmarks" / "official_test.py"), "test", str(checkout),
                           str(scratch), "56", "40"], capture_output=True, text=True, check=True)
    assert "strides 56 40" in done.stdout
    result = json.loads(done.stdout.splitlines()[-1])
    assert result["cases"] == {"CASE_A": [1.0, 0.5, 3.0, 1.25], "CASE_B": [0.0, 0.0, 0.0, 0.0]}
    assert result["empty"] == ["CASE_B"]
    assert result["strides_asked"] == {"stride_xy": 18, "stride_z": 4}
