"""The legacy augmentations of the LA lineage, as composable callables.

Every transform takes a sample dict (`image` (C, *spatial), optional `label` (*spatial)) and a
NumPy Generator, and returns a new dict: randomness comes only from the generator, so a batch is a
pure function of (seed, iteration) and training resumes bit for bit.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence

import numpy as np

Sample = dict[str, np.ndarray]
Transform = Callable[[Sample, np.random.Generator], Sample]


class Compose:
    def __init__(self, transforms: Sequence[Transform]) -> None:
        self.transforms = list(transforms)

    def __call__(self, sample: Sample, rng: np.random.Generator) -> Sample:
        for transform in self.transforms:
            sample = transform(sample, rng)
        return sample


class RandomRotFlip:
    """rot90 by k ~ U{0..3} in the plane of the first two spatial axes, then a flip along one of them."""

    def __call__(self, sample: Sample, rng: np.random.Generator) -> Sample:
        k = int(rng.integers(0, 4))
        axis = int(rng.integers(0, 2))
        out = {}
        for key, arr in sample.items():
            first = arr.ndim - (sample["image"].ndim - 1)  # skip the channel axis of images
            rotated = np.rot90(arr, k, axes=(first, first + 1))
            out[key] = np.ascontiguousarray(np.flip(rotated, axis=first + axis))
        return out


class RandomCrop:
    """Random patch; zero-pads first when any axis is <= the patch (the legacy rule, kept exactly).

    Legacy rule: if any spatial dim <= patch, every axis is padded by max((patch - dim) // 2 + 3, 0) on
    both sides; the start is drawn from [0, dim - patch) (the last position is never drawn).
    """

    def __init__(self, patch: Sequence[int]) -> None:
        self.patch = tuple(int(p) for p in patch)

    def __call__(self, sample: Sample, rng: np.random.Generator) -> Sample:
        spatial = sample["image"].shape[1:]
        if len(spatial) != len(self.patch):
            from ..errors import ConfigError

            raise ConfigError(f"patch_size {self.patch} has {len(self.patch)} axes but the data is "
                              f"{len(spatial)}D; set patch_size to {len(spatial)} sizes")
        if any(d <= p for d, p in zip(spatial, self.patch, strict=True)):
            pads = [max((p - d) // 2 + 3, 0) for d, p in zip(spatial, self.patch, strict=True)]
            sample = {k: np.pad(v, [(0, 0)] * (v.ndim - len(pads)) + [(p, p) for p in pads])
                      for k, v in sample.items()}
            spatial = sample["image"].shape[1:]
        starts = [int(rng.integers(0, d - p)) for d, p in zip(spatial, self.patch, strict=True)]
        window = tuple(slice(s, s + p) for s, p in zip(starts, self.patch, strict=True))
        return {k: np.ascontiguousarray(v[(..., *window)]) for k, v in sample.items()}


def legacy_augmentation(patch: Sequence[int], rot_flip: bool = True) -> Compose:
    """LA recipe: RandomRotFlip + RandomCrop; Pancreas recipe (`rot_flip=False`): RandomCrop only."""
    return Compose(([RandomRotFlip()] if rot_flip else []) + [RandomCrop(patch)])
