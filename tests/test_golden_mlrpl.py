"""MLRPL's whole update against the official script, beyond what `test_golden.py` checks generically.

`test_golden.py::test_whole_update_matches_official[mlrpl]` holds semiseg with `pseudo_ce_input=logits` to the
official HEAD (5ca2d87) stored in `tests/golden/steps/mlrpl.json`: every loss term, both entropy masks' voxel
counts (1e-5 relative of a count below 10^5 is exact), prototype / similarity / reliability sums, gradients,
weights after SGD, the ramp and the learning rate over the la-8 recipe. Here: quirk Q1, semiseg's default
`probs` against the same fixture and against the official first upload (4489dac) stored beside it.
"""

from __future__ import annotations

import json
from pathlib import Path

import pytest

from golden_step import default_dtype
from golden_step_mlrpl import DIRECTIONS, semiseg_run

FIXTURE = json.loads((Path(__file__).parent / "golden" / "steps" / "mlrpl.json").read_text())
FIRST_UPLOAD = "4489dac336cf34ede27c1bda45cf4717ff8c49ca"
REL = 1e-5
# What the pseudo-label CE input (quirk Q1) cannot change: the Dice term, the ramp, and every mask, prototype,
# similarity map and reliability weight (they come from the teacher's probabilities and features only).
CE_FREE = ("supervised", "weight", *(f"{k}_{d}" for k in ("mask", "prototypes", "similarity", "reliability")
                                     for d in DIRECTIONS))
CE_TERMS = ("pseudo", "loss", *(f"pseudo_{d}" for d in DIRECTIONS))


@pytest.fixture(scope="module")
def default_update() -> dict:
    """semiseg's update with its default `pseudo_ce_input=probs`, on the fixture's case."""
    with default_dtype(FIXTURE["dtype"]):
        return semiseg_run(FIXTURE["n_filters"], FIXTURE["size"], FIXTURE["seed"], FIXTURE["iteration"], "probs")


def test_fixture_is_the_official_head_at_a_full_weight() -> None:
    assert FIXTURE["official_commit"].startswith("5ca2d87")
    assert FIXTURE["pseudo_ce_input"] == "logits" and FIXTURE["official_ce_input"].startswith("logits")
    scalars = FIXTURE["official"]["scalars"]
    assert scalars["weight"] == 1.0  # beta at its maximum: the pseudo-label terms weigh as much as they ever do
    assert scalars["pseudo"] > 0.5 * scalars["supervised"]
    assert len(FIXTURE["official"]["ramp"]) == len(FIXTURE["official"]["schedules"]["learning rate"]) == 15000


def test_default_probs_differs_from_head_only_in_the_pseudo_label_ce(default_update: dict) -> None:
    head = FIXTURE["official"]["scalars"]
    got = default_update["scalars"]
    for key in CE_FREE:
        assert got[key] == pytest.approx(head[key], rel=REL, abs=1e-12), key
    for d in DIRECTIONS:
        assert got[f"mask_{d}"] == head[f"mask_{d}"], f"entropy mask {d}: voxel count"
    for key in CE_TERMS:
        assert abs(got[key] - head[key]) > 1e-2 * abs(head[key]), f"{key}: Q1 should change it"


def test_default_probs_reproduces_the_first_upload(default_update: dict) -> None:
    first = FIXTURE["variants"][FIRST_UPLOAD]
    assert first["pseudo_ce_input"] == "probs" and first["official_ce_input"].startswith("probs")
    for key, value in first["scalars"].items():
        assert default_update["scalars"][key] == pytest.approx(value, rel=REL, abs=1e-12), key
    top = max(first["grad_norms"].values())
    for key, norm in first["grad_norms"].items():
        assert default_update["grads"][key].double().norm().item() == pytest.approx(norm, abs=REL * top), key
    for key, norm in first["student_norms"].items():
        assert default_update["student"][key].double().norm().item() == pytest.approx(norm, rel=REL), key
