"""A deterministic synthetic 3D dataset in the LA on-disk layout.

Each case holds one organ-like object: an ellipsoid whose surface is deformed by smooth random
noise, seen through Rician-like noise and a multiplicative intensity bias field, with a few
distractor blobs of similar brightness, then z-scored like the LA files. It is written in the LA
layout so that the very same reader, splits and evaluation serve synthetic and real data.
"""

from __future__ import annotations

import hashlib
import os
import shutil
from dataclasses import asdict, dataclass
from functools import lru_cache
from pathlib import Path

import numpy as np
from scipy import ndimage

from .h5 import write_case
from .layouts.la import CASES_DIR


@dataclass(frozen=True)
class SyntheticSpec:
    """What to generate; the cache folder name is derived from it, so a spec maps to one dataset."""

    n_train: int = 24
    n_test: int = 6
    shape: tuple[int, int, int] = (160, 144, 88)
    seed: int = 0

    @classmethod
    def parse(cls, text: str) -> SyntheticSpec:
        """`synthetic` or `synthetic:n_train=16,n_test=4,shape=96x96x64,seed=1`."""
        from ..errors import ConfigError

        _, _, options = text.partition(":")
        values: dict[str, object] = {}
        for item in filter(None, options.split(",")):
            key, _, value = item.partition("=")
            if key == "shape":
                values[key] = tuple(int(v) for v in value.split("x"))
            elif key in ("n_train", "n_test", "seed"):
                values[key] = int(value)
            else:
                raise ConfigError(f"unknown synthetic option {key!r} in {text!r}; "
                                  "use n_train, n_test, shape (e.g. 96x96x64) or seed")
        spec = cls(**values)  # type: ignore[arg-type]
        if len(spec.shape) != 3 or min(spec.shape) < 16:
            raise ConfigError(f"synthetic shape {spec.shape} must be three sizes of at least 16")
        return spec

    def key(self) -> str:
        return hashlib.sha1(repr(asdict(self)).encode()).hexdigest()[:10]


@lru_cache(maxsize=32)
def _zoom_matrix(cells: int, size: int) -> np.ndarray:
    """(size, cells): column i is `ndimage.zoom` (cubic) of the i-th unit vector from `cells` to `size` points."""
    eye = np.eye(cells)
    return np.stack([ndimage.zoom(eye[i], size / cells, order=3)[:size] for i in range(cells)], axis=1)


def _smooth_field(rng: np.random.Generator, shape: tuple[int, int, int], cells: int) -> np.ndarray:
    """Zero-mean, unit-std smooth noise: a coarse random grid upsampled with cubic splines.

    The N-D cubic zoom is a tensor product of 1-D linear maps, so it is applied as one small matrix per axis:
    the same field as `ndimage.zoom(coarse, shape / cells, order=3)` to float64 rounding, 30-60x faster (the
    N-D zoom took 0.5 s of a 96x96x64 case's 0.6 s per field, and most of `semiseg demo`'s first run).
    """
    coarse = rng.standard_normal([cells] * len(shape))
    axes = [_zoom_matrix(cells, size) for size in shape]
    field = np.einsum("ia,jb,kc,abc->ijk", *axes, coarse, optimize=True)
    return (field - field.mean()) / (field.std() + 1e-8)


def _blob(grid: list[np.ndarray], centre: np.ndarray, radii: np.ndarray, warp: np.ndarray) -> np.ndarray:
    r = sum(((g - c) / s) ** 2 for g, c, s in zip(grid, centre, radii, strict=True))
    return np.sqrt(r) + warp < 1.0


def make_case(seed: int, index: int, shape: tuple[int, int, int]) -> tuple[np.ndarray, np.ndarray]:
    """One (image float32, label uint8) pair, a pure function of (seed, index, shape)."""
    rng = np.random.default_rng([seed, index])
    shape_arr = np.array(shape, dtype=float)
    grid = [g.astype(np.float32) for g in np.ogrid[tuple(slice(0, s) for s in shape)]]
    centre = shape_arr * rng.uniform(0.4, 0.6, 3)
    radii = shape_arr * rng.uniform(0.16, 0.26, 3)
    label = _blob(grid, centre, radii, 0.18 * _smooth_field(rng, shape, 5))
    image = np.where(label, 1.0, 0.0).astype(np.float32)
    for _ in range(rng.integers(2, 5)):  # distractors: bright blobs that are not the organ
        c = shape_arr * rng.uniform(0.1, 0.9, 3)
        r = shape_arr * rng.uniform(0.04, 0.1, 3)
        image += 0.8 * _blob(grid, c, r, 0.1 * _smooth_field(rng, shape, 4)) * ~label
    image += 0.25 * _smooth_field(rng, shape, 8)  # soft anatomical texture
    image *= np.exp(0.3 * _smooth_field(rng, shape, 3))  # MR bias field
    image += 0.35 * rng.standard_normal(shape).astype(np.float32)
    image = (image - image.mean()) / image.std()
    return image.astype(np.float32), label.astype(np.uint8)


def generate(root: Path, spec: SyntheticSpec) -> Path:
    """Write the dataset under `root` (atomically: a temporary folder renamed at the end)."""
    root = Path(root)
    if (root / "test.list").is_file():
        return root
    tmp = root.with_name(root.name + f".tmp{os.getpid()}")
    shutil.rmtree(tmp, ignore_errors=True)
    ids = [f"SYN{i:04d}" for i in range(spec.n_train + spec.n_test)]
    for i, case_id in enumerate(ids):
        image, label = make_case(spec.seed, i, spec.shape)
        write_case(tmp / CASES_DIR / case_id / "mri_norm2.h5", image, label)
    (tmp / "train.list").write_text("\n".join(ids[: spec.n_train]) + "\n")
    (tmp / "test.list").write_text("\n".join(ids[spec.n_train:]) + "\n")
    root.parent.mkdir(parents=True, exist_ok=True)
    try:
        tmp.rename(root)
    except OSError:  # another process finished first
        shutil.rmtree(tmp, ignore_errors=True)
    return root


def cache_dir() -> Path:
    return Path(os.environ.get("SEMISEG_CACHE", Path.home() / ".cache" / "semiseg"))


def resolve(text: str) -> Path:
    """Turn `synthetic[:options]` into the folder of a generated dataset (generated on first use)."""
    spec = SyntheticSpec.parse(text)
    return generate(cache_dir() / f"synthetic-{spec.key()}", spec)
