"""Property-based and fuzz tests: sliding window and metrics over random shapes, readers over damaged files,
and every class of bad input of issue 15 (case ids, dataset.json, h5 kinds and declared sizes, NIfTI headers,
checkpoint payloads, run configs, summaries, sums files).

Nothing may fail with anything but a clear one-line `SemisegError` (or a valid result). The count of inputs
tried is printed at the end of the run (conftest.py).
"""

from __future__ import annotations

import contextlib
import os
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


# ---- the input classes of issue 15: ids, dataset.json, h5 kinds, NIfTI headers, checkpoints, configs, sums ----------

@contextlib.contextmanager
def _voxel_limit(limit: int):
    """A low declared-size limit, so fuzzed headers that declare big arrays are refused, never allocated."""
    old = os.environ.get("SEMISEG_MAX_VOXELS")
    os.environ["SEMISEG_MAX_VOXELS"] = str(limit)
    try:
        yield
    finally:
        if old is None:
            del os.environ["SEMISEG_MAX_VOXELS"]
        else:
            os.environ["SEMISEG_MAX_VOXELS"] = old


HOSTILE_IDS = st.sampled_from(["..", ".", "../x", "/abs/x", "a/b", "..\\x", "x\0y", "", " ", "~", "-rf", "a..b",
                               "C:x", "\u202e", "case.h5", "..."])
IDS = st.one_of(HOSTILE_IDS, st.text(max_size=12), st.text(alphabet="./\\ab", max_size=8))


@settings(max_examples=250, deadline=None)
@given(st.lists(IDS, min_size=1, max_size=5))
def test_split_list_ids_are_accepted_only_when_they_stay_in_their_folder(ids: list[str]) -> None:
    from semiseg.data.layouts.base import read_list

    tried("split-list case ids")
    with tempfile.TemporaryDirectory() as folder:
        root = Path(folder)
        path = root / "test.list"
        path.write_bytes("\n".join(ids).encode("utf-8", "surrogatepass"))
        try:
            accepted = read_list(path)
        except DataError as exc:
            assert str(exc).startswith(f"{path}:") and len(str(exc).splitlines()) == 1
            return
        for case_id in accepted:
            for built in (root / f"{case_id}.h5", root / "cases" / f"{case_id}.png", root / case_id / "x.h5"):
                assert root.resolve() in built.resolve().parents


JSON = st.recursive(st.none() | st.booleans() | st.integers(-3, 10**12) | st.floats() | st.text(max_size=6),
                    lambda children: st.lists(children, max_size=3) | st.dictionaries(st.text(max_size=4), children,
                                                                                       max_size=3), max_leaves=8)
FIELDS = ("channel_names", "labels", "file_ending", "unlabeled", "numTraining", "name")


@st.composite
def dataset_jsons(draw):
    """Arbitrary JSON, or a dataset.json whose known fields hold arbitrary values (near misses)."""
    if draw(st.booleans()):
        return draw(JSON)
    meta = {"channel_names": {"0": "MRI"}, "labels": {"background": 0, "organ": 1}, "file_ending": ".nii.gz"}
    for key in draw(st.lists(st.sampled_from(FIELDS), max_size=3)):
        meta[key] = draw(JSON | st.dictionaries(st.sampled_from(["0", "1", "x", "-1"]), JSON, max_size=3))
    return meta


@settings(max_examples=200, deadline=None)
@given(dataset_jsons())
def test_any_dataset_json_gives_info_or_named_problems(meta) -> None:  # noqa: ANN001 - any JSON value
    import json

    from semiseg.data.prepare import _read_dataset_json

    tried("dataset.json documents")
    with tempfile.TemporaryDirectory() as folder:
        (Path(folder) / "dataset.json").write_text(json.dumps(meta))
        problems: list = []
        info = _read_dataset_json(Path(folder), problems)
        assert (info is None) == bool(problems)
        assert all(p.path == Path(folder) / "dataset.json" and "\n" not in p.message for p in problems)
        if info is not None:
            assert all(isinstance(n, str) for n in info.channel_names) and info.file_ending.startswith(".")


H5_KINDS = ["f4", "f8", "i2", "u1", "?", "S3", "c8", "compound", "vlen-str", "group", "scalar", "declared-huge",
            "empty"]


@settings(max_examples=150, deadline=None)
@given(st.sampled_from(H5_KINDS), st.sampled_from(H5_KINDS), st.lists(st.integers(1, 5), min_size=2, max_size=4))
def test_h5_arrays_of_any_kind_and_declared_size_are_read_or_named(image_kind: str, label_kind: str,
                                                                   shape: list[int]) -> None:
    tried("h5 array kinds and declared sizes")

    def put(f: h5py.File, key: str, kind: str) -> None:
        if kind == "group":
            f.create_group(key)
        elif kind == "compound":
            f.create_dataset(key, data=np.zeros(shape, dtype=[("a", "f4"), ("b", "i2")]))
        elif kind == "vlen-str":
            f.create_dataset(key, data=np.full(shape, "x", dtype=object), dtype=h5py.string_dtype())
        elif kind == "scalar":
            f.create_dataset(key, data=1.0)
        elif kind == "declared-huge":
            f.create_dataset(key, shape=(4000, 4000, 4000), dtype="f4", chunks=(16, 16, 16), compression="gzip")
        elif kind == "empty":
            f.create_dataset(key, shape=(0, *shape[1:]), dtype="f4")
        else:
            f.create_dataset(key, data=np.ones(shape, dtype=kind))

    with tempfile.TemporaryDirectory() as folder, _voxel_limit(100_000):
        path = Path(folder) / "case.h5"
        with h5py.File(path, "w") as f:
            put(f, "image", image_kind)
            put(f, "label", label_kind)
        try:
            case = read_case(path, "case", num_classes=2, spatial_dims=len(shape))
        except DataError as exc:
            assert str(exc).startswith(f"{path}:") and len(str(exc).splitlines()) == 1
        else:
            assert case.image.dtype == np.float32 and case.label.shape == case.image.shape[1:]


NIFTI_CODES = [2, 4, 8, 16, 64, 256, 512, 768, 32, 128, 1792, 2304]  # numeric, complex, RGB / RGBA


@settings(max_examples=150, deadline=None)
@given(st.lists(st.integers(-2, 32767), min_size=1, max_size=5), st.sampled_from(NIFTI_CODES),
       st.sampled_from([1.0, 0.0, 1e38, -1e38, float("nan"), float("inf"), 1e-30]),
       st.sampled_from([0.0, 1e38, float("nan")]), st.sampled_from([352, 0, 348, 10**6]))
def test_nifti_headers_with_any_dims_type_and_scaling_are_read_or_named(dims: list[int], code: int, slope: float,
                                                                       inter: float, offset: int) -> None:
    import nibabel as nib

    from semiseg.data.prepare import Problem, _check_image, read_volume

    tried("NIfTI header fields")
    header = nib.Nifti1Header()
    raw = header.binaryblock
    header = nib.Nifti1Header(raw)
    header["dim"][0] = len(dims)
    header["dim"][1:len(dims) + 1] = dims
    header["datatype"] = code
    header["bitpix"] = 8 * max(1, {2: 1, 4: 2, 8: 4, 16: 4, 64: 8, 256: 1, 512: 2, 768: 4, 32: 8, 128: 3, 1792: 16,
                                    2304: 4}[code])
    header["scl_slope"], header["scl_inter"], header["vox_offset"] = slope, inter, offset
    with tempfile.TemporaryDirectory() as folder, _voxel_limit(1_000_000):
        path = Path(folder) / "scan.nii"
        body = np.random.default_rng(len(dims)).integers(0, 255, 6000, dtype=np.uint8).tobytes()
        path.write_bytes(header.binaryblock + b"\0" * 4 + body)
        try:
            volume = read_volume(path)
        except DataError as exc:
            assert str(exc).startswith(f"{path}:") and len(str(exc).splitlines()) == 1
            return
        problems: list[Problem] = []
        if _check_image(path, volume, None, problems):
            assert np.isfinite(np.asarray(volume.data, dtype=np.float32)).all()
        else:
            assert len(problems) == 1 and problems[0].path == path


def _small_payload() -> dict:
    from semiseg.config import build_config
    from semiseg.methods.base import NetSpec

    cfg = build_config("supervised", None, {"n_filters": 4, "patch_size": (32, 32)})
    spec = NetSpec(1, 2, 2, 4)
    method = cfg.method_class()(cfg.method_params(), spec)
    return {"format": "semiseg-checkpoint", "version": 1, "config": cfg.model_dump(mode="json"),
            "spec": {"in_channels": 1, "num_classes": 2, "spatial_dims": 2, "n_filters": 4, "norm": "batchnorm",
                     "dropout": 0.5}, "iteration": 3, "method": method.state_dict()}


PAYLOAD = _small_payload()
ANY = JSON | st.sampled_from([10**6, 4096, 0, -1, 2, 3, "batchnorm", True, 1e300])


@settings(max_examples=120, deadline=None)
@given(st.lists(st.tuples(st.sampled_from(["drop", "top", "spec", "config", "tensor"]), st.data()), max_size=3))
def test_checkpoint_payloads_wrong_inside_restore_or_name_the_file(changes) -> None:  # noqa: ANN001 - drawn pairs
    from semiseg.engine.checkpoint import restore_method
    from semiseg.errors import CheckpointError

    tried("checkpoint payloads")
    payload = {**PAYLOAD, "config": dict(PAYLOAD["config"]), "spec": dict(PAYLOAD["spec"]),
               "method": dict(PAYLOAD["method"])}
    for where, data in changes:
        if where == "drop":
            payload.pop(data.draw(st.sampled_from(["config", "spec", "method", "iteration"])), None)
        elif where == "top":
            payload[data.draw(st.sampled_from(["config", "spec", "method", "iteration"]))] = data.draw(ANY)
        elif where in ("spec", "config") and isinstance(payload.get(where), dict):
            keys = sorted(payload[where]) + ["bogus"]
            payload[where][data.draw(st.sampled_from(keys))] = data.draw(ANY)
        elif where == "tensor" and isinstance(payload.get("method"), dict) and payload["method"]:
            key = data.draw(st.sampled_from(sorted(payload["method"])))
            payload["method"][key] = torch.zeros(data.draw(st.lists(st.integers(0, 3), max_size=3)))
    path = Path("fuzzed.pt")
    try:
        cfg, spec, method = restore_method(path, payload, torch.device("cpu"))
    except CheckpointError as exc:
        assert str(exc).startswith(f"{path}: ") and len(str(exc).splitlines()) == 1
    else:  # accepted: the network built holds exactly the stored weights (the 2D UNet ignores n_filters)
        assert cfg.method == "supervised" and spec.spatial_dims == 2
        state = method.state_dict()
        assert all(torch.equal(state[k], v) for k, v in payload["method"].items())


CONFIG_KEYS = ["method", "data", "labeled", "iterations", "patch_size", "lr", "params", "seed", "val", "bogus"]
YAML_TEXT = st.one_of(
    st.text(max_size=40),
    st.sampled_from(["!!python/object/apply:os.system ['true']", "- 1\n- 2", "a: &x [*x]", "{", "null", "3",
                     "method: !!binary AAAA", "? [a]\n: 1", "\ufeffmethod: supervised", "method:\n  - nested"]),
    st.dictionaries(st.sampled_from(CONFIG_KEYS), ANY, max_size=4).map(lambda d: __import__("yaml").safe_dump(d)))


@settings(max_examples=150, deadline=None)
@given(YAML_TEXT)
def test_run_config_files_load_or_name_the_file(text: str) -> None:
    from semiseg.config import load_yaml, saved_config
    from semiseg.errors import ConfigError

    tried("run config.yaml texts")
    with tempfile.TemporaryDirectory() as folder:
        path = Path(folder) / "config.yaml"
        path.write_text(text, errors="surrogatepass")
        try:
            cfg = saved_config(load_yaml(path), path)
        except ConfigError as exc:
            assert str(exc).startswith(f"{path}: ") and len(str(exc).splitlines()) == 1
        else:
            assert cfg.method_params() is not None


@settings(max_examples=100, deadline=None)
@given(JSON | st.fixed_dictionaries({"metrics": JSON, "cases": st.lists(JSON, max_size=2)}))
def test_summaries_of_evaluate_read_or_name_the_file(summary) -> None:  # noqa: ANN001 - any JSON value
    import json

    from semiseg.report import read_summary

    tried("summary.json documents")
    with tempfile.TemporaryDirectory() as folder:
        path = Path(folder) / "summary.json"
        path.write_text(json.dumps(summary))
        try:
            read_summary(path)
        except DataError as exc:
            assert str(exc).startswith(f"{path}: ")


@settings(max_examples=100, deadline=None)
@given(st.lists(st.tuples(st.sampled_from(["0" * 64, "abc", "f" * 64]), st.sampled_from(["  ", " ", "\t"]),
                          IDS | st.sampled_from(["a/mri_norm2.h5", "../../etc/x", "/etc/x", "a//b"])), max_size=4))
def test_sums_files_give_confined_paths_or_name_the_line(lines: list[tuple[str, str, str]]) -> None:
    from semiseg.data.download import read_sums

    tried("SHA256SUMS lines")
    with tempfile.TemporaryDirectory() as folder:
        root = Path(folder)
        path = root / "SHA256SUMS"
        path.write_text("\n".join(f"{d}{sep}{name}" for d, sep, name in lines).replace("\0", ""), errors="replace")
        try:
            entries = read_sums(path)
        except DataError as exc:
            assert str(exc).startswith(f"{path}:")
            return
        for _, name in entries:
            assert root.resolve() in (root / "cases" / name).resolve().parents
