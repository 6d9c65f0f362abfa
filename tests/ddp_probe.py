"""Run under torchrun by test_distributed.py: train one run, then save this process's method state.

Usage: ddp_probe.py OUT METHOD DATA [key=value ...]. Every process writes OUT/state-rank<R>.pt, so a test can
compare what each rank holds at the end (the run's checkpoint has rank 0's state only).
"""

from __future__ import annotations

import os
import sys
from pathlib import Path

import torch

from semiseg.config import build_config, parse_set
from semiseg.engine.trainer import Trainer


def main() -> None:
    out, method, data, *sets = sys.argv[1:]
    cfg = build_config(method, None, {"data": data, **parse_set(sets)})
    trainer = Trainer(cfg, Path(out), progress=False)
    trainer.run()
    torch.save(trainer.s.method.state_dict(), Path(out) / f"state-rank{os.environ.get('RANK', '0')}.pt")


if __name__ == "__main__":
    main()
