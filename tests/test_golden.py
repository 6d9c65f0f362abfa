"""Golden fixtures: each method's network step recomputed with semiseg against the official code's values.

`tests/golden/*.json` were written by `benchmarks/official_equivalence.py --write-fixture` from the authors'
code (repository, commit and command inside each file). Weights, inputs and dropout masks are functions of
the seed (tests/golden_step.py), so the fixtures hold numbers only. A change to a network's layout, its
modules' order of operations or the key mapping makes one of these fail.
"""

from __future__ import annotations

import importlib
import json
from pathlib import Path

import pytest
import torch

from golden_step import build_semiseg, default_dtype, inputs, network_step, seeded_weights, summarize_output
from semiseg.official import key_map, official_layout

GOLDEN = Path(__file__).parent / "golden"
FIXTURES = sorted(GOLDEN.glob("*.json"))
REL = 1e-5


def _close(official: float, ours: float, scale: float, what: str) -> None:
    assert abs(official - ours) <= REL * max(abs(scale), 1e-12), f"{what}: official {official!r}, semiseg {ours!r}"


def test_every_mapped_method_has_a_fixture() -> None:
    from semiseg.official import LAYOUTS

    names = {p.stem for p in FIXTURES}
    assert {m if d == 3 else f"{m}_{d}d" for m, d in LAYOUTS} <= names


@pytest.mark.parametrize("path", FIXTURES, ids=[p.stem for p in FIXTURES])
def test_official_keys_map_one_to_one(path: Path) -> None:
    fx = json.loads(path.read_text())
    _, target = build_semiseg(fx["method"], fx["dims"], fx["n_filters"], fx["classes"])
    ours = {k: list(v.shape) for k, v in target.state_dict().items()}
    mapping = key_map(list(fx["official_keys"]), fx["method"], fx["dims"])
    assert sorted(mapping.values()) == sorted(ours), "official keys and semiseg keys differ"
    for okey, skey in mapping.items():
        assert fx["official_keys"][okey] == ours[skey], f"{okey} -> {skey}: shapes differ"
    ignored = [k for k in fx["official_keys"] if k not in mapping]
    assert all(k.startswith(official_layout(fx["method"], fx["dims"]).ignored) for k in ignored)


@pytest.mark.parametrize("path", FIXTURES, ids=[p.stem for p in FIXTURES])
def test_network_step_matches_official(path: Path) -> None:
    fx = json.loads(path.read_text())
    with default_dtype(fx.get("dtype", "float32")):
        _check_network_step(fx)


def _check_network_step(fx: dict) -> None:
    torch.manual_seed(fx["seed"])
    _, target = build_semiseg(fx["method"], fx["dims"], fx["n_filters"], fx["classes"])
    target.load_state_dict(seeded_weights(target, fx["seed"]))
    x, label = inputs(fx["dims"], fx["size"], fx["batch"], fx["classes"], fx["seed"])
    res = network_step(target, None, x, label, fx["seed"], dropout=True, method=fx["method"])
    for key in ("weights", "inputs"):  # the seeded draws themselves, before any method code runs
        _close(fx["checksums"][key], res["checksums"][key], abs(fx["checksums"][key]) + 1, f"checksum {key}")
    assert res["checksums"]["labels"] == fx["checksums"]["labels"]
    official = fx["official"]
    assert len(res["outputs"]) == len(official["outputs"])
    for i, (want, got) in enumerate(zip(official["outputs"], res["outputs"])):
        have = summarize_output(got)
        assert have["shape"] == want["shape"]
        scale = want["max_abs"]
        _close(want["max_abs"], have["max_abs"], scale, f"output {i} max")
        _close(want["sum"], have["sum"], want["abs_sum"], f"output {i} sum")
        for j, (a, b) in enumerate(zip(want["samples"], have["samples"])):
            _close(a, b, scale, f"output {i} sample {j}")
    _close(official["loss"], res["loss"].item(), official["loss"], "loss")
    top = max(official["grad_norms"].values())
    assert set(official["grad_norms"]) == set(res["grads"])
    for key, norm in official["grad_norms"].items():
        # Relative to the largest gradient: a bias followed by BatchNorm has a zero gradient up to rounding noise.
        _close(norm, res["grads"][key].double().norm().item(), top, f"grad norm {key}")
    for key, norm in official["after_norms"].items():
        _close(norm, res["after"][key].double().norm().item(), norm, f"weight norm after the step {key}")


STEPS = sorted((GOLDEN / "steps").glob("*.json"))


@pytest.mark.parametrize("path", STEPS, ids=[p.stem for p in STEPS])
def test_whole_update_matches_official(path: Path) -> None:
    """The whole update of the official training script (losses, ramp, SGD step, EMA update where there is one)."""
    fx = json.loads(path.read_text())
    with default_dtype(fx.get("dtype", "float32")):
        _check_whole_update(fx)


def _check_whole_update(fx: dict) -> None:
    from golden_step import mcnet_step, mean_teacher_step

    want = fx["official"]
    if fx["method"] in ("mean_teacher", "uamt"):
        res = mean_teacher_step(fx["n_filters"], fx["size"], fx["seed"], fx["iteration"], fx["method"],
                                30000 if fx["method"] == "uamt" else 6000)
    elif fx["method"] in ("mcnet", "mcnet_plus"):
        res = mcnet_step(fx["method"], fx["n_filters"], fx["size"], fx["seed"], fx["iteration"])
    else:  # tests/golden_step_METHOD.py: semiseg's side of benchmarks/official_step_METHOD.py
        res = importlib.import_module(f"golden_step_{fx['method']}").semiseg_update(fx)
    for key, value in want["scalars"].items():
        _close(value, res["scalars"][key], value, key)
    top = max(want["grad_norms"].values())
    for key, norm in want["grad_norms"].items():
        _close(norm, res["grads"][key].double().norm().item(), top, f"grad norm {key}")
    parts = [k.removesuffix("_norms") for k in want if k.endswith("_norms") and k != "grad_norms"]
    # student, teacher, or e.g. CPS's net1 / net2; a part the semiseg side does not return here (BCP's BatchNorm
    # buffers) is checked by the method's own test file
    for part in [p for p in parts if p in res or p in ("student", "teacher")]:
        for key, norm in want[f"{part}_norms"].items():
            _close(norm, res[part][key].double().norm().item(), norm, f"{part} {key}")
    assert res["ramp"] == pytest.approx(want["ramp"], rel=1e-12, abs=1e-15)
    for name, values in want.get("schedules", {}).items():  # learning rate, thresholds, ... over the recipe
        assert res["schedules"][name] == pytest.approx(values, rel=1e-12, abs=1e-15), name
