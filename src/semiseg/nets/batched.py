"""Several train-mode passes of one network as a single batched pass, with the same BatchNorm maths.

In train mode BatchNorm normalises with the statistics of the batch it sees, so stacking k passes into one
batch would change every result. Inside `batchnorm_per_pass`, each BatchNorm of the network normalises every
pass's chunk of the batch with that chunk's own statistics and updates its running statistics once per chunk,
in order, exactly as k separate passes would; convolutions, ReLU and dropout (independent per sample) see one
large batch, which keeps the CPU's vector units busier than k small ones.
"""

from __future__ import annotations

from collections.abc import Iterator, Sequence
from contextlib import contextmanager

import torch
from torch import nn
from torch.nn.modules.batchnorm import _BatchNorm


def _per_pass(module: _BatchNorm, sizes: Sequence[int], x: torch.Tensor) -> torch.Tensor:
    if x.shape[0] != sum(sizes):
        raise ValueError(f"batch of {x.shape[0]} does not split into passes of {list(sizes)}")
    return torch.cat([type(module).forward(module, chunk) for chunk in x.split(list(sizes))])


@contextmanager
def batchnorm_per_pass(net: nn.Module, sizes: Sequence[int]) -> Iterator[nn.Module]:
    """Within the block, `net(torch.cat(passes))` equals `torch.cat([net(p) for p in passes])` (same
    per-pass BatchNorm statistics and running-statistic updates) when `sizes` are the passes' batch sizes."""
    norms = [m for m in net.modules() if isinstance(m, _BatchNorm)]
    for m in norms:
        m.forward = lambda x, m=m: _per_pass(m, sizes, x)  # instance attribute: shadows the class's forward
    try:
        yield net
    finally:
        for m in norms:
            del m.forward
