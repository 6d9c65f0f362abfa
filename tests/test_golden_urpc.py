"""URPC against SSL4MIS beyond the generic fixture check: the learning rate lags one update (poly_lag 1)."""

from __future__ import annotations

import json
from pathlib import Path

import pytest

from golden_step import default_dtype

FIXTURE = Path(__file__).parent / "golden" / "steps" / "urpc.json"


def test_urpc_learning_rate_lags_one_update_as_the_official_loop() -> None:
    """The script computes the poly rate from `iter_num` before its increment, so update k >= 2 runs at
    poly(k - 2): the recipe's `poly_lag=1` gives exactly the official schedule, the unlagged rule does not."""
    from semiseg.config import build_config
    from semiseg.engine.trainer import learning_rate

    fx = json.loads(FIXTURE.read_text())
    want = fx["official"]["schedules"]["learning rate"]
    with default_dtype(fx["dtype"]):
        for lag, equal in ((1, True), (0, False)):
            cfg = build_config("urpc", None, {"poly_lag": lag}, "la-8")
            assert cfg.poly_lag == lag
            got = [learning_rate(cfg, t) for t in range(1, cfg.iterations + 1, fx["schedule_every"])]
            assert (got == pytest.approx(want, rel=1e-12, abs=1e-15)) is equal
    assert build_config("urpc", None, {}, "la-8").poly_lag == 1
