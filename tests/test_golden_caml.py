"""CAML's whole update against the official script: what `test_golden.py`'s generic check cannot express.

`tests/golden/steps/caml.json` was written by `benchmarks/official_step_caml.py` (three updates of the official
`code/train_caml.py`, the last on a bank of five slots). The generic test holds the losses, weights, gradients,
the ramp and the learning rate; this one holds the counts of the filters exactly, the memory bank after the
updates (every slot's stored voxels per class, labels and features) and the BatchNorm running statistics.
"""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch

from golden_step import default_dtype, summarize_output
from golden_step_caml import LABELED_SLOTS, UPDATES, semiseg_update

FIXTURE = json.loads((Path(__file__).parent / "golden" / "steps" / "caml.json").read_text())
REL = 1e-5


@pytest.fixture(scope="module")
def ours() -> dict:
    with default_dtype(FIXTURE["dtype"]):
        return semiseg_update(FIXTURE)


def test_the_case_compares_a_populated_bank() -> None:
    """The fixture's last update samples a bank written by earlier updates, not only the first special one."""
    assert FIXTURE["updates"] == UPDATES == 3 and FIXTURE["labeled_slots"] == [list(s) for s in LABELED_SLOTS]
    bank = FIXTURE["official"]["bank"]
    assert sorted(map(int, bank)) == [0, 1, 2, 3, 4]
    assert sum(sum(slot["class_counts"]) > 0 for slot in bank.values()) >= 4
    assert FIXTURE["official"]["scalars"]["occ_rows"] > FIXTURE["num_filtered"]  # the top-K truncated a class


def test_filter_counts_are_exact(ours: dict) -> None:
    want = FIXTURE["official"]["scalars"]
    keys = ["stored_voxels", "agreed_voxels", "occ_rows"] + [f"{k}_{j}" for k in ("agreed_voxels", "occ_rows")
                                                            for j in range(1, UPDATES + 1)]
    for key in keys:
        assert ours["scalars"][key] == want[key], key


def test_memory_bank_matches_official(ours: dict) -> None:
    bank = FIXTURE["official"]["bank"]
    for slot, entry in ours["bank"].items():
        if str(slot) not in bank:  # never written by the official script (None there)
            assert len(entry["labels"]) == 0, slot
            continue
        want = bank[str(slot)]
        assert entry["labels"].bincount(minlength=2).tolist() == want["class_counts"], slot
        if "features" not in want:  # overwritten with no voxel correct in both models
            assert len(entry["labels"]) == 0 and sum(want["class_counts"]) == 0
            continue
        for name in ("labels", "features"):
            have, expected = summarize_output(entry[name]), want[name]
            assert have["shape"] == expected["shape"], (slot, name)
            scale = expected["max_abs"]
            assert have["max_abs"] == pytest.approx(expected["max_abs"], rel=REL), (slot, name)
            assert abs(have["sum"] - expected["sum"]) <= REL * expected["abs_sum"], (slot, name)
            assert torch.allclose(torch.tensor(have["samples"]), torch.tensor(expected["samples"]), rtol=0,
                                  atol=REL * scale), (slot, name)


def test_batchnorm_statistics_match_official(ours: dict) -> None:
    """The heads' running statistics are what the next update's bank projection uses."""
    want = FIXTURE["official"]["buffer_norms"]
    assert set(want) == set(ours["buffers"])
    assert any(key.startswith("projection_") for key in want)
    for key, norm in want.items():
        assert ours["buffers"][key].double().norm().item() == pytest.approx(norm, rel=REL), key
