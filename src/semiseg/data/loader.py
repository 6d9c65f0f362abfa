"""Two-stream batches: L labelled + U unlabelled samples per iteration, a pure function of (seed, i).

The labelled ids are reshuffled on every pass and the unlabelled ids cycle through an endless stream
of permutations (the `TwoStreamBatchSampler` of the papers, which also works here with zero
unlabelled cases). Deriving every random draw from (seed, iteration) makes a batch independent of
worker count and lets an interrupted run resume on exactly the batch it would have seen.
"""

from __future__ import annotations

import signal
from dataclasses import dataclass

import numpy as np
import torch
from torch.utils.data import DataLoader, Dataset

from .h5 import Case
from .transforms import Transform

_LABELED_STREAM, _UNLABELED_STREAM, _AUGMENT = 0, 1, 2


def stream_index(seed: int, stream: int, position: int, n: int) -> int:
    """Item `position` of an endless concatenation of seeded permutations of range(n)."""
    epoch, offset = divmod(position, n)
    return int(np.random.default_rng([seed, stream, epoch]).permutation(n)[offset])


@dataclass
class Batch:
    """One iteration's input; tensors are [N, C, *spatial] images and [N, *spatial] int64 labels.

    `index_labeled` holds each labelled sample's position in the labelled list (CAML's memory slots).
    """

    image_labeled: torch.Tensor
    label_labeled: torch.Tensor
    image_unlabeled: torch.Tensor
    index_labeled: torch.Tensor

    @property
    def images(self) -> torch.Tensor:
        """Labelled then unlabelled images in one tensor, the order every method's forward uses."""
        return torch.cat([self.image_labeled, self.image_unlabeled]) if len(self.image_unlabeled) else \
            self.image_labeled

    @property
    def n_labeled(self) -> int:
        return len(self.image_labeled)

    def to(self, device: torch.device | str, channels_last: bool = False) -> Batch:
        """Copy to `device` (asynchronously from pinned memory); images optionally in channels-last 3D layout."""
        fmt = torch.channels_last_3d if channels_last else torch.contiguous_format
        return Batch(self.image_labeled.to(device, non_blocking=True, memory_format=fmt),
                     self.label_labeled.to(device, non_blocking=True),
                     self.image_unlabeled.to(device, non_blocking=True, memory_format=fmt),
                     self.index_labeled.to(device, non_blocking=True))

    def pin_memory(self) -> Batch:
        return Batch(*(t.pin_memory() for t in
                       (self.image_labeled, self.label_labeled, self.image_unlabeled, self.index_labeled)))


class TwoStreamBatches(Dataset):
    """Map-style dataset whose item i is the batch of iteration `start + i` (0-based) for one process.

    With `world` processes, the global batch of an iteration holds `world * batch_labeled` labelled and
    `world * batch_unlabeled` unlabelled samples, and process `rank` takes its own contiguous share; every sample's
    augmentation has its own seed, so the union over processes equals the single-process batch of the same size.
    """

    def __init__(self, labeled: list[Case], unlabeled: list[Case], batch_labeled: int, batch_unlabeled: int,
                 transform: Transform, seed: int, start: int, stop: int, rank: int = 0, world: int = 1) -> None:
        self.labeled, self.unlabeled = labeled, unlabeled
        self.batch_labeled = batch_labeled
        self.batch_unlabeled = batch_unlabeled if unlabeled else 0
        self.transform, self.seed, self.start, self.stop = transform, seed, start, stop
        self.rank, self.world = rank, world

    def __len__(self) -> int:
        return max(self.stop - self.start, 0)

    def _sample(self, stream: int, iteration: int, slot: int, cases: list[Case], with_label: bool):
        """Sample `slot` of the global batch of one stream: its case and its own augmentation seed."""
        per_iteration = (self.batch_labeled if stream == _LABELED_STREAM else self.batch_unlabeled) * self.world
        index = stream_index(self.seed, stream, iteration * per_iteration + slot, len(cases))
        rng = np.random.default_rng([self.seed, _AUGMENT, stream, iteration, slot])
        case = cases[index]
        sample = {"image": case.image, "label": case.label} if with_label else {"image": case.image}
        return index, self.transform(sample, rng)

    def __getitem__(self, i: int) -> Batch:
        iteration = self.start + i
        first_l, first_u = self.rank * self.batch_labeled, self.rank * self.batch_unlabeled
        lab = [self._sample(_LABELED_STREAM, iteration, first_l + j, self.labeled, True)
               for j in range(self.batch_labeled)]
        unl = [self._sample(_UNLABELED_STREAM, iteration, first_u + j, self.unlabeled, False)[1]
               for j in range(self.batch_unlabeled)]
        image_l = torch.from_numpy(np.stack([s["image"] for _, s in lab]))
        empty = image_l.new_zeros((0, *image_l.shape[1:]))
        return Batch(
            image_labeled=image_l,
            label_labeled=torch.from_numpy(np.stack([s["label"] for _, s in lab]).astype(np.int64)),
            image_unlabeled=torch.from_numpy(np.stack([s["image"] for s in unl])) if unl else empty,
            index_labeled=torch.tensor([k for k, _ in lab], dtype=torch.int64),
        )


def _identity(batch: Batch) -> Batch:
    return batch


def _ignore_sigint(_worker: int) -> None:
    """Ctrl-C reaches the whole process group: the workers leave it to the trainer, which checkpoints and stops."""
    signal.signal(signal.SIGINT, signal.SIG_IGN)


def batch_loader(batches: TwoStreamBatches, num_workers: int, pin_memory: bool) -> DataLoader:
    """Prefetch batches in worker processes, in order (shuffling is already in the stream)."""
    # A private generator: creating the loader must not consume the global RNG (exact resume).
    return DataLoader(batches, batch_size=None, shuffle=False, num_workers=num_workers,
                      collate_fn=_identity, pin_memory=pin_memory, generator=torch.Generator(),
                      prefetch_factor=4 if num_workers else None, persistent_workers=False,
                      worker_init_fn=_ignore_sigint if num_workers else None)
