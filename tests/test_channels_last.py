"""Channels-last 3D (the GPU layout): every 3D method's training step runs with it and gives the same loss."""

from __future__ import annotations

import pytest
import torch

from semiseg.config import build_config
from semiseg.data import load_cases, open_dataset
from semiseg.data.loader import TwoStreamBatches
from semiseg.engine.trainer import setup, uses_channels_last
from semiseg.methods import available_methods
from semiseg.methods.base import StepContext

METHODS = [m for m in available_methods() if m != "nan_at_three"]


@pytest.mark.parametrize("method", METHODS)
def test_training_step_in_channels_last_layout_matches_contiguous(method: str, tiny_synthetic: str) -> None:
    losses = {}
    for layout in ("off", "on"):
        cfg = build_config(method, None, {"data": tiny_synthetic, "labeled": 4, "patch_size": (32, 32, 32),
                                          "n_filters": 4, "batch_labeled": 2,
                                          "batch_unlabeled": 2 if method == "bcp" else 4,
                                          "channels_last": layout, "device": "cpu"})
        torch.manual_seed(0)
        s = setup(cfg)
        assert uses_channels_last(cfg, s.device, 3) == (layout == "on")
        ds = open_dataset(tiny_synthetic)
        batches = TwoStreamBatches(load_cases(ds, s.split.labeled, True), load_cases(ds, s.split.unlabeled, False),
                                   cfg.batch_labeled, cfg.batch_unlabeled, ds.train_transform((32, 32, 32), True), 0,
                                   0, 1)
        batch = batches[0].to("cpu", layout == "on")
        if layout == "on":
            assert batch.image_labeled.is_contiguous(memory_format=torch.channels_last_3d)
        torch.manual_seed(1)
        s.method.train()
        out = s.method.train_step(batch, StepContext(3000, 15000, 4))
        out.loss.backward()
        assert torch.isfinite(out.loss)
        losses[layout] = float(out.loss.detach())
    assert losses["on"] == pytest.approx(losses["off"], rel=1e-3, abs=1e-4)
