"""Property-based and fuzz tests: sliding window and metrics over random shapes, readers over damaged files.

Nothing may fail with anything but a clear `DataError` (or a valid result).
"""

from __future__ import annotations

import tempfile
from pathlib import Path

import h5py
import numpy as np
import torch
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st
from torch import nn

from fuzzing import tried
from semiseg.data.h5 import read_case, write_case
from semiseg.engine.inference import InferenceProtocol, predict_volume, sliding_window_probs
from semiseg.engine.metrics import case_metrics
from semiseg.errors import DataError

FAST = settings(max_examples=60, deadline=None, suppress_health_check=[HealthCheck.too_slow])


class _Conv(nn.Module):
    def __init__(self, dims: int) -> None:
        super().__init__()
        self.conv = (nn.Conv3d if dims == 3 else nn.Conv2d)(1, 2, 3, padding=1)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.conv(x)


NETS = {2: _Conv(2).eval(), 3: _Conv(3).eval()}


@st.composite
def volumes_and_windows(draw):
    """Any volume, patch (may exceed it) and stride, with at most about 3 windows per axis: the shapes and
    edge cases are what matter, and a 1-voxel patch at stride 1 would spend a minute in thousands of windows."""
    dims = draw(st.sampled_from([2, 3]))
    size = tuple(draw(st.integers(1, 14)) for _ in range(dims))
    patch = tuple(draw(st.integers(max(1, s // 3), 12)) for s in size)
    stride = tuple(draw(st.integers(min(p, max(1, -(-(s - p) // 2))), p)) for s, p in zip(size, patch, strict=True))
    return size, patch, stride


@FAST
@given(volumes_and_windows(), st.integers(0, 2**16))
def test_sliding_window_any_shape_gives_probabilities_of_the_input_size(case, seed) -> None:
    tried("sliding-window shapes")
    size, patch, stride = case
    image = torch.from_numpy(np.random.default_rng(seed).standard_normal((1, *size)).astype(np.float32))
    probs = sliding_window_probs(NETS[len(size)], image, patch, stride, sw_batch_size=3)
    assert probs.shape == (2, *size)
    assert torch.isfinite(probs).all() and torch.allclose(probs.sum(0), torch.ones(size), atol=1e-5)
    label = predict_volume(NETS[len(size)], image.numpy(), InferenceProtocol(patch_size=patch, stride=stride,
                                                                            post_lcc=True), torch.device("cpu"))
    assert label.shape == size and set(np.unique(label)) <= {0, 1}


@FAST
@given(st.integers(2, 3).flatmap(lambda d: st.tuples(*[st.integers(1, 9)] * d)), st.integers(0, 2**16),
       st.sampled_from(["legacy_zero", "nan", "penalty"]))
def test_metrics_never_crash_on_random_or_empty_masks(shape, seed, policy) -> None:
    tried("metric mask pairs")
    rng = np.random.default_rng(seed)
    pred = rng.random(shape) < rng.choice([0.0, 0.1, 0.5, 1.0])
    ref = rng.random(shape) < rng.choice([0.0, 0.1, 0.5, 1.0])
    values = case_metrics(pred, ref, empty_policy=policy)
    assert set(values) == {"dice", "jaccard", "hd95", "asd"}
    assert 0.0 <= values["dice"] <= 1.0 and 0.0 <= values["jaccard"] <= 1.0
    assert all(np.isnan(v) or v >= 0 for v in values.values())


def _good_case_bytes() -> bytes:
    with tempfile.TemporaryDirectory() as folder:
        path = Path(folder) / "case.h5"
        label = np.zeros((12, 10, 8), np.uint8)
        label[3:7, 3:7, 2:5] = 1
        write_case(path, np.random.default_rng(0).standard_normal((12, 10, 8)).astype(np.float32), label)
        return path.read_bytes()


GOOD = _good_case_bytes()


@settings(max_examples=120, deadline=None)
@given(st.data())
def test_reader_on_truncated_or_corrupted_files_raises_only_data_errors(data) -> None:
    tried("damaged h5 files")
    blob = bytearray(GOOD)
    if data.draw(st.booleans(), label="truncate"):
        blob = blob[: data.draw(st.integers(0, len(blob) - 1), label="length")]
    else:
        for _ in range(data.draw(st.integers(1, 40), label="flips")):
            position = data.draw(st.integers(0, len(blob) - 1))
            blob[position] = data.draw(st.integers(0, 255))
    with tempfile.TemporaryDirectory() as folder:
        path = Path(folder) / "damaged.h5"
        path.write_bytes(bytes(blob))
        try:
            case = read_case(path, "damaged", num_classes=2)
        except DataError as exc:
            assert str(path) in str(exc)
        else:
            assert case.image.shape[1:] == case.label.shape and np.isfinite(case.image).all()


@settings(max_examples=80, deadline=None)
@given(st.sampled_from([np.float32, np.float64, np.int16, np.uint8]),
       st.lists(st.integers(1, 6), min_size=1, max_size=5), st.lists(st.integers(1, 6), min_size=1, max_size=5),
       st.integers(-2, 4), st.sampled_from([0.0, np.nan, np.inf]))
def test_reader_on_arbitrary_arrays_accepts_or_explains(dtype, image_shape, label_shape, label_value, poison) -> None:
    tried("arbitrary h5 arrays")
    with tempfile.TemporaryDirectory() as folder:
        path = Path(folder) / "case.h5"
        image = np.zeros(image_shape, dtype=dtype)
        if poison and np.issubdtype(dtype, np.floating):
            image.flat[0] = poison
        with h5py.File(path, "w") as f:
            f.create_dataset("image", data=image)
            f.create_dataset("label", data=np.full(label_shape, label_value, dtype=np.int16))
        try:
            case = read_case(path, "case", num_classes=3)
        except DataError as exc:
            assert str(path) in str(exc)
        else:
            assert case.image.ndim == 4 and case.label.shape == case.image.shape[1:]
            assert 0 <= label_value < 3 and np.isfinite(case.image).all()


def _scan_bytes(suffix: str) -> bytes:
    """A small valid scan to damage (NRRD with gzip-encoded data)."""
    with tempfile.TemporaryDirectory() as folder:
        path = Path(folder) / f"scan{suffix}"
        if suffix == ".nrrd":
            import nrrd

            nrrd.write(str(path), np.arange(6 * 5 * 4, dtype=np.float32).reshape(6, 5, 4),
                       {"space": "left-posterior-superior", "space directions": np.diag([0.7, 0.7, 2.0]),
                        "encoding": "gzip"})
        else:
            import nibabel as nib

            nib.save(nib.Nifti1Image(np.arange(6 * 5 * 4, dtype=np.float32).reshape(6, 5, 4), np.eye(4)), str(path))
        return path.read_bytes()


SCANS = {suffix: _scan_bytes(suffix) for suffix in (".nii", ".nii.gz", ".nrrd")}


@settings(max_examples=150, deadline=None)
@given(st.sampled_from(sorted(SCANS)), st.data())
def test_nifti_and_nrrd_readers_on_damaged_files_raise_only_data_errors(suffix, data) -> None:
    from semiseg.data.prepare import read_volume

    tried("damaged NIfTI / NRRD files")
    blob = bytearray(SCANS[suffix])
    if data.draw(st.booleans(), label="truncate"):
        blob = blob[: data.draw(st.integers(0, len(blob) - 1), label="length")]
    else:
        for _ in range(data.draw(st.integers(1, 20), label="flips")):
            blob[data.draw(st.integers(0, len(blob) - 1))] = data.draw(st.integers(0, 255))
    with tempfile.TemporaryDirectory() as folder:
        path = Path(folder) / f"damaged{suffix}"
        path.write_bytes(bytes(blob))
        try:
            volume = read_volume(path)
        except DataError as exc:
            assert str(path) in str(exc)
        else:
            assert volume.affine.shape == (4, 4) and isinstance(volume.data, np.ndarray)


@settings(max_examples=60, deadline=None)
@given(st.data())
def test_checkpoint_loader_on_damaged_files_raises_only_checkpoint_errors(data) -> None:
    from semiseg.engine.checkpoint import load_checkpoint, save_checkpoint
    from semiseg.errors import CheckpointError

    tried("damaged checkpoints")
    with tempfile.TemporaryDirectory() as folder:
        path = Path(folder) / "checkpoint.pt"
        save_checkpoint(path, {"iteration": 3, "method": {"w": torch.arange(50.0)}})
        blob = bytearray(path.read_bytes())
        if data.draw(st.booleans(), label="truncate"):
            blob = blob[: data.draw(st.integers(0, len(blob) - 1), label="length")]
        else:
            for _ in range(data.draw(st.integers(1, 20), label="flips")):
                blob[data.draw(st.integers(0, len(blob) - 1))] = data.draw(st.integers(0, 255))
        path.write_bytes(bytes(blob))
        try:
            payload = load_checkpoint(path)
        except CheckpointError as exc:
            assert str(path) in str(exc)
        else:
            assert payload["format"] == "semiseg-checkpoint"
