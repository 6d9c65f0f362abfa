"""Helpers several test files share: the CLI in a subprocess, and a real LA batch for a few training steps."""

from __future__ import annotations

import os
import subprocess
import sys
from collections.abc import Iterator
from pathlib import Path

import numpy as np
import torch

from semiseg.data.loader import Batch
from semiseg.methods.base import Method, StepContext, StepOutput


def semiseg(*args: str, check: bool = True) -> subprocess.CompletedProcess:
    """`semiseg ARGS` in a fresh one-thread process; fails the test with its output unless it succeeds
    (`check=False`: return whatever it did)."""
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    result = subprocess.run([sys.executable, "-m", "semiseg.cli", *args], capture_output=True, text=True, env=env,
                            timeout=300)
    if check and result.returncode != 0:
        raise AssertionError(f"semiseg {' '.join(args)} failed:\n{result.stdout}\n{result.stderr}")
    return result


def real_la_batch(la_root: Path, patch: tuple[int, int, int], n_unlabelled: int = 1) -> Batch:
    """One labelled and `n_unlabelled` unlabelled crops of real LA cases (the 8-label split), with the official
    training augmentation."""
    from semiseg.data import open_dataset
    from semiseg.data.transforms import legacy_augmentation

    layout = open_dataset(str(la_root))
    split = layout.split(8)
    transform = legacy_augmentation(patch)
    rng = np.random.default_rng(0)
    labelled = transform({"image": (c := layout.read(split.labeled[0])).image, "label": c.label}, rng)
    unlabelled = [transform({"image": layout.read(i, with_label=False).image}, rng)["image"]
                  for i in split.unlabeled[:n_unlabelled]]
    return Batch(torch.from_numpy(labelled["image"])[None], torch.from_numpy(labelled["label"]).long()[None],
                 torch.from_numpy(np.stack(unlabelled)), torch.arange(1))


def train_steps(method: Method, batch: Batch, optimizer: torch.optim.Optimizer, total: int,
                iterations: tuple[int, ...] = (1, 2)) -> Iterator[StepOutput]:
    """Train `method` on `batch` at each of `iterations` (of `total`), yielding every step's output."""
    for iteration in iterations:
        step = method.train_step(batch, StepContext(iteration, total))
        optimizer.zero_grad()
        step.loss.backward()
        optimizer.step()
        yield step
