"""UniMatch (2D) against the official code beyond the generic fixture check: the lagged learning rate, and that
the fixture pins the feature perturbation's masks (the keyed `fp` dropout is really on the compared path)."""

from __future__ import annotations

import json
from pathlib import Path

import pytest

import golden_step_unimatch
from golden_step import default_dtype

FIXTURE = Path(__file__).parent / "golden" / "steps" / "unimatch_2d.json"


def test_unimatch_acdc_learning_rate_lags_one_update_as_the_official_loop() -> None:
    from semiseg.config import build_config
    from semiseg.engine.trainer import learning_rate

    fx = json.loads(FIXTURE.read_text())
    want = fx["official"]["schedules"]["learning rate"]
    with default_dtype(fx["dtype"]):
        for lag, equal in ((1, True), (0, False)):
            cfg = build_config("unimatch", None, {"poly_lag": lag}, "acdc-3")
            got = [learning_rate(cfg, t) for t in range(1, cfg.iterations + 1, fx["schedule_every"])]
            assert (got == pytest.approx(want, rel=1e-12, abs=1e-15)) is equal
    assert build_config("unimatch", None, {}, "acdc-7").poly_lag == 1
    assert build_config("unimatch", None, {}, "la-8").poly_lag == 0  # no official 3D loop to follow


def test_the_feature_perturbation_masks_are_part_of_the_fixture(monkeypatch: pytest.MonkeyPatch) -> None:
    """Without the keyed channel dropout on the perturbed path, L_fp no longer matches the official value."""
    fx = json.loads(FIXTURE.read_text())
    monkeypatch.setattr(golden_step_unimatch, "fp_dropout", lambda seed: lambda feature: feature)
    with default_dtype(fx["dtype"]):
        res = golden_step_unimatch.semiseg_update(fx)
    assert res["scalars"]["loss_fp"] != pytest.approx(fx["official"]["scalars"]["loss_fp"], rel=1e-3)
