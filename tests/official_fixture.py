"""The official CAML checkpoint fixture: a `CAML3d_v1` state_dict saved by the official constructor from random
weights (provenance in golden/official/caml_f2_seed0.json), kept as arrays (`caml_f2_seed0.npz`, the official key
order) and written back as the `.pth` the official training script saves (`torch.save(model.state_dict(), path)`),
for the tests and the documented `semiseg evaluate --official-checkpoint` example:

    python tests/official_fixture.py    # writes tests/golden/official/caml_f2_seed0.pth (ignored by git)
"""

from __future__ import annotations

from collections import OrderedDict
from pathlib import Path

import numpy as np
import torch

NPZ = Path(__file__).resolve().parent / "golden" / "official" / "caml_f2_seed0.npz"


def official_state() -> OrderedDict[str, torch.Tensor]:
    """The official state_dict, tensor for tensor, in its key order."""
    with np.load(NPZ) as arrays:
        return OrderedDict((key, torch.from_numpy(arrays[key].copy())) for key in arrays.files)


def write_official_pth(path: Path = NPZ.with_suffix(".pth")) -> Path:
    """The official checkpoint file at `path` (written once; the arrays decide its content)."""
    if not path.is_file():
        path.parent.mkdir(parents=True, exist_ok=True)
        torch.save(official_state(), path)
    return path


if __name__ == "__main__":
    print(write_official_pth())
