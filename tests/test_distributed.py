"""Multi-process training on CPU with the gloo backend (2 processes under torchrun) against a single process."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import torch

from semiseg.engine.checkpoint import load_checkpoint

COMMON = ["--method", "supervised", "--labeled", "4", "--iterations", "6", "--quiet", "--set", "patch_size=32,32,16",
          "--set", "n_filters=4", "--set", "num_workers=0", "--set", "log_every=2", "--set", "checkpoint_every=3",
          "--set", "lr=0.05", "--set", "batch_unlabeled=0", "--set", "norm=none", "--set", "dropout=0",
          "--set", "loss=ce"]
ENV = {**os.environ, "OMP_NUM_THREADS": "1"}
# Without normalisation layers or dropout and with a per-voxel-mean loss, 2 processes x 1 sample must learn the same
# update as 1 process x 2 samples up to float summation order: relative L2 distance of the final weights, divided by
# the size of the single run's update, below 1e-3. (Per-sample InstanceNorm over the 2x2x1 bottleneck of these tiny
# patches amplifies float noise chaotically, so it is left out.) (Batch-pooled losses such as the papers' Dice are
# pooled per process under data parallelism, and BatchNorm statistics are per process unless sync_bn is set.)
TOLERANCE = 1e-3


def _weights(run: Path) -> torch.Tensor:
    state = load_checkpoint(run / "checkpoint.pt")["method"]
    return torch.cat([v.flatten().float() for k, v in state.items() if k.endswith("weight")])


def test_two_gloo_processes_match_one_process_with_the_same_global_batch(tmp_path: Path, tiny_synthetic: str) -> None:
    single = tmp_path / "single"
    subprocess.run([sys.executable, "-m", "semiseg.cli", "train", "--data", tiny_synthetic, "--out", str(single),
                    *COMMON, "--set", "batch_labeled=2"], check=True, env=ENV, timeout=600)
    ddp = tmp_path / "ddp"
    subprocess.run([sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node", "2",
                    "-m", "semiseg.cli", "train", "--data", tiny_synthetic, "--out", str(ddp), *COMMON,
                    "--set", "batch_labeled=1"], check=True, env=ENV, timeout=600)
    summary = json.loads((ddp / "train_summary.json").read_text())
    assert summary["world_size"] == 2 and summary["iterations"] == 6
    assert len((ddp / "metrics.jsonl").read_text().splitlines()) == 3  # rank 0 alone logs
    payload = load_checkpoint(ddp / "checkpoint.pt")
    assert payload["world_size"] == 2 and len(payload["rng"]) == 2

    init = torch.cat([p.flatten() for n, p in _init_state(tiny_synthetic).items() if n.endswith("weight")])
    a, b = _weights(single), _weights(ddp)
    relative = float((a - b).norm() / (a - init).norm())
    assert relative < TOLERANCE, relative


def _init_state(data: str) -> dict[str, torch.Tensor]:
    from semiseg.config import build_config, parse_set
    from semiseg.engine.trainer import seed_everything, setup

    cfg = build_config("supervised", None, {"data": data, **parse_set(COMMON[COMMON.index("--set") + 1::2]),
                                             "labeled": 4})
    seed_everything(cfg.seed)
    return setup(cfg).method.state_dict()


PROBE_SETS = ["labeled=4", "iterations=4", "patch_size=32,32,16", "n_filters=4", "num_workers=0", "log_every=2",
              "checkpoint_every=4", "batch_labeled=1", "batch_unlabeled=1", "seed=5"]


def _ranks(tmp_path: Path, method: str, data: str, *sets: str) -> tuple[dict, dict]:
    """Train `method` on 2 gloo processes; return each rank's final method state."""
    out = tmp_path / method
    subprocess.run([sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node", "2",
                    str(Path(__file__).with_name("ddp_probe.py")), str(out), method, data, *PROBE_SETS, *sets],
                   check=True, env=ENV, timeout=600)
    return (torch.load(out / "state-rank0.pt", weights_only=True),
            torch.load(out / "state-rank1.pt", weights_only=True))


def _learnt(state: dict) -> dict:
    """Weights and biases: what gradients (averaged across ranks) and EMA updates produce."""
    return {k: v for k, v in state.items() if k.endswith(("weight", "bias", "in_proj_weight", "in_proj_bias"))}


def test_ema_teacher_stays_identical_across_ranks(tmp_path: Path, tiny_synthetic: str) -> None:
    rank0, rank1 = _ranks(tmp_path, "mean_teacher", tiny_synthetic)
    learnt0, learnt1 = _learnt(rank0), _learnt(rank1)
    assert any(k.startswith("teacher.") for k in learnt0)
    for key in learnt0:
        assert torch.equal(learnt0[key], learnt1[key]), key


def test_caml_memory_bank_follows_rank_0(tmp_path: Path, tiny_synthetic: str) -> None:
    """DDP broadcasts rank 0's buffers before every forward, so the ranks' banks differ only in the slots that
    the last step wrote (each rank writes its own labelled sample after the broadcast)."""
    from semiseg.data.loader import stream_index

    rank0, rank1 = _ranks(tmp_path, "caml", tiny_synthetic)
    for key in _learnt(rank0):
        assert torch.equal(rank0[key], rank1[key]), key
    last_step = {stream_index(5, 0, 3 * 2 + slot, 4) for slot in range(2)}  # iteration 3 (0-based), 2 ranks x 1
    kept = [s for s in range(4) if s not in last_step]
    assert kept and (rank0["memory_labels"][kept] >= 0).any()  # something to compare
    assert torch.equal(rank0["memory_labels"][kept], rank1["memory_labels"][kept])
    assert torch.equal(rank0["memory_features"][kept], rank1["memory_features"][kept])
