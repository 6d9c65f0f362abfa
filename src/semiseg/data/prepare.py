"""Your own data in: check an nnU-Net-style dataset folder, then preprocess it into a fast training cache.

The raw folder follows the nnU-Net convention (`dataset.json`, `imagesTr/{CASE}_{XXXX}{ending}`,
`labelsTr/{CASE}{ending}`, `imagesTs/`, optional `labelsTs/`) plus unlabelled cases in `imagesUnlabeled/`
or listed under `"unlabeled"` in `dataset.json`; files are NIfTI or NRRD. Checking reads every file and
reports *all* problems at once, each naming its file, because a user fixing data wants the whole list.

Preprocessing (the `Recipe`, stored in the cache so `semiseg predict` repeats it and can undo it):
reorient to RAS+, optionally resample to a target spacing, normalise each channel by modality
(z-score per volume for MRI and anything else, a fixed window + dataset-wide z-score for CT, as
nnU-Net does). Cases are written as `image` (C, X, Y, Z) / `label` h5 files that the `nnunet`
layout reads like the LA files.
"""

from __future__ import annotations

import bz2
import io
import json
import os
import re
import shutil
import socket
import tempfile
import zlib
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import torch
import torch.nn.functional as F

from ..errors import DataError, one_line
from .h5 import check_declared_size, write_case

CACHE_DIR = "semiseg-prepared"
PREPARED = "prepared.json"
FORMAT = "semiseg-prepared"
SUFFIXES = (".nii.gz", ".nii", ".nrrd", ".nhdr")
CT_SAMPLES_PER_CASE = 10_000
CHANNEL_FILE = re.compile(r"^(?P<case>.+)_(?P<channel>\d{4})$")
FLOAT32_SAFE = 1e30  # no scan holds such intensities; beyond float32's 3.4e38 they would become Inf


# ----------------------------------------------------------------------------- reading and writing volumes

@dataclass
class Volume:
    """A 3D array as stored, its voxel-to-world (RAS+, mm) affine and the header to write outputs alike."""

    data: np.ndarray
    affine: np.ndarray
    header: Any

    @property
    def spacing(self) -> np.ndarray:
        return np.sqrt((self.affine[:3, :3] ** 2).sum(0))


def split_suffix(name: str) -> tuple[str, str]:
    """`case_0000.nii.gz` -> (`case_0000`, `.nii.gz`); ('', '') for unsupported files."""
    lower = name.lower()
    suffix = next((s for s in SUFFIXES if lower.endswith(s)), "")
    return (name[: -len(suffix)], suffix) if suffix else ("", "")


def _nrrd_affine(header: dict[str, Any]) -> np.ndarray:
    directions = header.get("space directions")
    if directions is None:
        matrix = np.diag(np.asarray(header.get("spacings", [1.0, 1.0, 1.0]), dtype=float))
    else:
        matrix = np.asarray(directions, dtype=float).T  # pynrrd: one row per axis
    affine = np.eye(4)
    affine[:3, :3] = matrix
    affine[:3, 3] = np.asarray(header.get("space origin", np.zeros(3)), dtype=float)
    space = str(header.get("space", "right-anterior-superior")).lower()
    if space in ("left-posterior-superior", "lps"):
        affine[:2] *= -1  # LPS world -> RAS world
    elif space not in ("right-anterior-superior", "ras"):
        raise ValueError(f"unsupported NRRD space {space!r} (expected RAS or LPS)")
    return affine


def _decompress_bounded(source: Any, encoding: str, limit: int, path: Path) -> bytes:
    """Decompress a gzip / bzip2 stream, stopping as soon as it yields more than `limit` bytes (a bomb)."""
    gzip = encoding in ("gzip", "gz")
    codec: Any = zlib.decompressobj(zlib.MAX_WBITS | 16) if gzip else bz2.BZ2Decompressor()
    out = bytearray()
    pending = b""
    while not codec.eof:
        if gzip or codec.needs_input:
            pending = pending or source.read(1 << 20)
            if not pending:
                break
        out += codec.decompress(pending, limit + 1 - len(out))  # never more than one byte past the limit
        if len(out) > limit:
            raise DataError(f"{path}: the compressed data holds more than the {limit:,} bytes its header declares; "
                            "the file is damaged")
        pending = codec.unconsumed_tail if gzip else b""
    return bytes(out)


def _read_nrrd(path: Path) -> tuple[np.ndarray, dict[str, Any]]:
    """pynrrd, with the declared size checked first and compressed data decompressed with a bound."""
    import nrrd

    with open(path, "rb") as fh:
        header = nrrd.read_header(fh)
        sizes = tuple(int(v) for v in np.atleast_1d(header.get("sizes", ())))
        check_declared_size(path, sizes, "the NRRD header")
        data_file = header.get("datafile", header.get("data file"))
        skips = header.get("lineskip", header.get("line skip", 0)) or header.get("byteskip", header.get("byte skip", 0))
        encoding = str(header.get("encoding", "raw"))
        if data_file is not None:
            target = Path(data_file) if Path(data_file).is_absolute() else path.parent / data_file
            if not target.is_file():
                raise DataError(f"{path}: its data file {data_file!r} is not a regular file next to it")
        if encoding not in ("gzip", "gz", "bzip2", "bz2") or skips:
            return nrrd.read_data(header, fh, str(path)), header
        expected = int(np.prod(sizes, dtype=np.int64)) * nrrd.reader._determine_datatype(header).itemsize
        if data_file is None:
            raw = _decompress_bounded(fh, encoding, expected, path)
        else:
            with open(target, "rb") as source:
                raw = _decompress_bounded(source, encoding, expected, path)
    plain = {k: v for k, v in header.items() if k not in ("datafile", "data file")}
    return nrrd.read_data({**plain, "encoding": "raw"}, io.BytesIO(raw), str(path)), header


def read_volume(path: Path) -> Volume:
    """Read a NIfTI (nibabel) or NRRD (pynrrd) file; a trailing singleton 4th axis is dropped.

    The header's declared size is checked against `max_voxels()` before any voxel is read.
    """
    path = Path(path)
    _, suffix = split_suffix(path.name)
    try:
        if suffix in (".nrrd", ".nhdr"):
            data, header = _read_nrrd(path)
            affine = _nrrd_affine(header) if data.ndim == 3 else np.eye(4)
        else:
            import nibabel as nib

            img = nib.load(str(path))
            check_declared_size(path, tuple(img.shape), "the NIfTI header")
            data, affine, header = np.asarray(img.dataobj), img.affine.copy(), img.header
    except ImportError as exc:
        raise DataError(f"{path}: reading it needs {exc.name}; pip install nibabel pynrrd") from None
    except DataError:
        raise
    except Exception as exc:  # nibabel / pynrrd / zlib raise many types for damaged files
        raise DataError(f"{path}: unreadable image ({one_line(exc)})") from None
    if data.ndim == 4 and data.shape[-1] == 1:
        data = data[..., 0]
    return Volume(data, affine, header)


def write_label_like(path: Path, label: np.ndarray, reference: Volume) -> Path:
    """Write a label map on the reference's voxel grid with its affine and header (NIfTI or NRRD)."""
    path.parent.mkdir(parents=True, exist_ok=True)
    label = np.ascontiguousarray(label, dtype=np.uint8)
    if isinstance(reference.header, dict):
        import nrrd

        header = {k: v for k, v in reference.header.items() if k not in ("data file", "type", "encoding")}
        nrrd.write(str(path), label, header={**header, "encoding": "gzip"})
        return path
    import nibabel as nib

    header = reference.header.copy()
    header.set_data_dtype(np.uint8)
    nib.save(nib.Nifti1Image(label, reference.affine, header), str(path))
    return path


# ----------------------------------------------------------------------------- the preprocessing recipe

@dataclass
class ChannelNorm:
    """How one input channel is normalised; CT carries the dataset-wide window and statistics."""

    name: str
    scheme: str  # "zscore" (per volume), "ct" (window, then dataset mean / std) or "none"
    window: tuple[float, float] | None = None
    mean: float | None = None
    std: float | None = None

    @classmethod
    def for_channel(cls, name: str) -> ChannelNorm:
        lowered = name.lower()
        return cls(name, "ct" if lowered == "ct" else "none" if lowered in ("nonorm", "none") else "zscore")

    def apply(self, x: np.ndarray) -> np.ndarray:
        if self.scheme == "zscore":  # statistics in float64: float32 sums of large intensities overflow
            return ((x - x.mean(dtype=np.float64)) / max(float(x.std(dtype=np.float64)), 1e-8)).astype(np.float32)
        if self.scheme == "ct":
            assert self.window is not None and self.mean is not None and self.std is not None
            return (np.clip(x, *self.window) - self.mean) / max(self.std, 1e-8)
        return x


@dataclass
class Recipe:
    """Everything needed to repeat the preprocessing on a new scan and to map a prediction back."""

    channels: list[ChannelNorm]
    spacing: tuple[float, float, float] | None = None  # target spacing in mm (canonical axes), None = native

    def to_json(self) -> dict[str, Any]:
        return asdict(self)

    @classmethod
    def from_json(cls, data: dict[str, Any]) -> Recipe:
        channels = [ChannelNorm(**{**c, "window": tuple(c["window"]) if c.get("window") else None})
                    for c in data["channels"]]
        return cls(channels, tuple(data["spacing"]) if data.get("spacing") else None)

    def image(self, volumes: list[Volume]) -> tuple[np.ndarray, np.ndarray]:
        """(C, X, Y, Z) float32 image in RAS+ orientation at the target spacing, and its affine."""
        from nibabel import orientations as nio

        reference = volumes[0]
        ornt = nio.io_orientation(reference.affine)
        affine = reference.affine @ nio.inv_ornt_aff(ornt, reference.data.shape)
        image = np.stack([norm.apply(nio.apply_orientation(np.asarray(v.data, dtype=np.float32), ornt))
                          for norm, v in zip(self.channels, volumes, strict=True)]).astype(np.float32)
        if self.spacing is None:
            return image, affine
        shape = target_shape(image.shape[1:], affine, self.spacing)
        return resize(image, shape, "trilinear"), resampled_affine(affine, image.shape[1:], shape)

    def label(self, label: Volume, shape: tuple[int, ...]) -> np.ndarray:
        """The label on the preprocessed image grid of `shape` (nearest neighbour)."""
        from nibabel import orientations as nio

        canonical = nio.apply_orientation(label.data, nio.io_orientation(label.affine))
        return resize(canonical.astype(np.uint8), shape, "nearest-exact").astype(np.uint8)

    def restore(self, label: np.ndarray, reference: Volume) -> np.ndarray:
        """Map a label predicted on the preprocessed grid back onto the reference scan's own voxel grid."""
        from nibabel import orientations as nio

        ornt = nio.io_orientation(reference.affine)
        canonical_shape = tuple(reference.data.shape[i] for i in np.argsort(ornt[:, 0]))
        label = resize(label, canonical_shape, "nearest-exact")
        return nio.apply_orientation(label, nio.ornt_transform(nio.axcodes2ornt("RAS"), ornt)).astype(np.uint8)


def target_shape(shape: tuple[int, ...], affine: np.ndarray, spacing: tuple[float, ...]) -> tuple[int, ...]:
    current = np.sqrt((affine[:3, :3] ** 2).sum(0))
    return tuple(max(1, round(s * c / t)) for s, c, t in zip(shape, current, spacing, strict=True))


def resampled_affine(affine: np.ndarray, old: tuple[int, ...], new: tuple[int, ...]) -> np.ndarray:
    """Affine of a grid resized from `old` to `new` voxels over the same extent (voxel edges aligned)."""
    ratio = np.asarray(old, float) / np.asarray(new, float)
    scale = np.eye(4)
    scale[:3, :3] = np.diag(ratio)
    scale[:3, 3] = 0.5 * (ratio - 1)  # new voxel i's centre lies at old index (i + 0.5) * ratio - 0.5
    return affine @ scale


def resize(array: np.ndarray, shape: tuple[int, ...], mode: str) -> np.ndarray:
    """Resize the last three axes of (C, X, Y, Z) or (X, Y, Z) (trilinear / nearest-exact, edges aligned)."""
    if tuple(array.shape[-3:]) == tuple(shape):
        return array
    tensor = torch.from_numpy(np.ascontiguousarray(array, dtype=np.float32))
    tensor = tensor[None] if array.ndim == 4 else tensor[None, None]
    kwargs = {"align_corners": False} if mode == "trilinear" else {}
    out = F.interpolate(tensor, size=tuple(shape), mode=mode, **kwargs)[0]
    out = out if array.ndim == 4 else out[0]
    return out.numpy().astype(array.dtype if mode != "trilinear" else np.float32)


# ----------------------------------------------------------------------------- checking a dataset folder

@dataclass
class Problem:
    path: Path
    message: str

    def __str__(self) -> str:
        return f"{self.path}: {self.message}"


class PrepareError(DataError):
    """The dataset has problems; every one is listed, one per line, each naming its file."""

    def __init__(self, folder: Path, problems: list[Problem]) -> None:
        self.problems = problems
        lines = "\n".join(f"  {p}" for p in problems)
        super().__init__(f"{len(problems)} problem(s) in {folder}; fix them and run `semiseg data prepare` "
                         f"again:\n{lines}")


@dataclass
class CaseFiles:
    case_id: str
    role: str  # "labeled", "unlabeled" or "test"
    images: list[Path]
    label: Path | None = None


@dataclass
class DatasetInfo:
    """What `dataset.json` declares, plus the cases found on disk."""

    name: str
    channel_names: list[str]
    labels: dict[str, int]
    file_ending: str
    unlabeled: list[str] = field(default_factory=list)  # case ids declared unlabelled in dataset.json
    num_training: int | None = None
    cases: list[CaseFiles] = field(default_factory=list)

    def role(self, role: str) -> list[CaseFiles]:
        return [c for c in self.cases if c.role == role]


def _read_dataset_json(folder: Path, problems: list[Problem]) -> DatasetInfo | None:
    path = folder / "dataset.json"
    if not path.is_file():
        problems.append(Problem(path, "not found; an nnU-Net dataset folder needs dataset.json with "
                                "channel_names and labels"))
        return None
    try:
        meta = json.loads(path.read_text())
    except (json.JSONDecodeError, UnicodeDecodeError, RecursionError) as exc:
        problems.append(Problem(path, f"not valid JSON ({one_line(exc)})"))
        return None
    example = ("e.g. {\"channel_names\": {\"0\": \"MRI\"}, \"labels\": {\"background\": 0, \"tumour\": 1}, "
               "\"file_ending\": \".nii.gz\"}")
    if not isinstance(meta, dict):
        problems.append(Problem(path, f"must be a JSON object, got {type(meta).__name__}; {example}"))
        return None
    missing = [k for k in ("channel_names", "labels") if k not in meta]
    if missing:
        problems.append(Problem(path, f"missing {', '.join(missing)} ({example})"))
        return None
    channels, labels = meta["channel_names"], meta["labels"]
    for key, value in (("channel_names", channels), ("labels", labels)):
        if not isinstance(value, dict) or not value:
            problems.append(Problem(path, f"{key} must be a non-empty object, got {json.dumps(value)[:60]}; {example}"))
            return None
    if sorted(channels) != sorted(str(i) for i in range(len(channels))) or not all(
            isinstance(v, str) for v in channels.values()):
        problems.append(Problem(path, f"channel_names keys must be \"0\"..\"{len(channels) - 1}\" with names as "
                                f"values, got {json.dumps(channels)[:80]}"))
        return None
    if not all(isinstance(v, int) and not isinstance(v, bool) for v in labels.values()):
        problems.append(Problem(path, "labels must map names to single integers (region-based labels are "
                                "not supported)"))
        return None
    if sorted(labels.values()) != list(range(len(labels))):
        problems.append(Problem(path, f"label values must be consecutive from 0 (background), got "
                                f"{sorted(labels.values())}"))
        return None
    ending = meta.get("file_ending", ".nii.gz")
    if not isinstance(ending, str) or ending not in SUFFIXES:
        problems.append(Problem(path, f"file_ending {ending!r} is not supported; use one of {', '.join(SUFFIXES)}"))
        return None
    unlabeled = meta.get("unlabeled", [])
    if not isinstance(unlabeled, list) or not all(isinstance(c, str) for c in unlabeled):
        problems.append(Problem(path, "unlabeled must be a list of case ids (strings)"))
        return None
    count = meta.get("numTraining")
    if count is not None and (not isinstance(count, int) or isinstance(count, bool)):
        problems.append(Problem(path, f"numTraining must be a whole number, got {count!r}"))
        return None
    return DatasetInfo(str(meta.get("name", folder.name)), [channels[str(i)] for i in range(len(channels))],
                       dict(labels), ending, list(unlabeled), count)


def _images_by_case(folder: Path, ending: str, n_channels: int, problems: list[Problem]) -> dict[str, list[Path]]:
    found: dict[str, dict[int, Path]] = {}
    if not folder.is_dir():
        return {}
    for path in sorted(folder.iterdir()):
        stem, suffix = split_suffix(path.name)
        if path.name.startswith(".") or suffix != ending:
            continue
        match = CHANNEL_FILE.match(stem)
        if match is None:
            problems.append(Problem(path, f"image names must be CASE_XXXX{ending} (XXXX = channel, e.g. "
                                    f"{stem}_0000{ending})"))
            continue
        channel = int(match["channel"])
        if channel >= n_channels:
            problems.append(Problem(path, f"channel {channel} but dataset.json declares {n_channels} channel(s)"))
            continue
        found.setdefault(match["case"], {})[channel] = path
    cases = {}
    for case_id, channels in found.items():
        missing = [i for i in range(n_channels) if i not in channels]
        for i in missing:
            problems.append(Problem(folder / f"{case_id}_{i:04d}{ending}", f"missing: case {case_id!r} needs "
                                    f"{n_channels} channel files"))
        if not missing:
            cases[case_id] = [channels[i] for i in range(n_channels)]
    return cases


def _labels(folder: Path, ending: str) -> dict[str, Path]:
    if not folder.is_dir():
        return {}
    return {split_suffix(p.name)[0]: p for p in sorted(folder.iterdir())
            if split_suffix(p.name)[1] == ending and not p.name.startswith(".")}


def find_cases(folder: Path, info: DatasetInfo, problems: list[Problem]) -> None:
    """Pair images with labels by role; stray, missing and orphan files become problems."""
    declared_unlabeled = set(info.unlabeled)
    n, ending = len(info.channel_names), info.file_ending
    if not (folder / "imagesTr").is_dir():
        problems.append(Problem(folder / "imagesTr", "folder not found; training images go in imagesTr/"))
    train = _images_by_case(folder / "imagesTr", ending, n, problems)
    extra = _images_by_case(folder / "imagesUnlabeled", ending, n, problems)
    test = _images_by_case(folder / "imagesTs", ending, n, problems)
    labels_tr = _labels(folder / "labelsTr", ending)
    labels_ts = _labels(folder / "labelsTs", ending)
    for case_id in sorted(declared_unlabeled - set(train) - set(extra)):
        problems.append(Problem(folder / "dataset.json", f"unlabeled case {case_id!r} has no images in imagesTr/ "
                                "or imagesUnlabeled/"))
    for case_id, images in train.items():
        label = labels_tr.get(case_id)
        if case_id in declared_unlabeled:
            info.cases.append(CaseFiles(case_id, "unlabeled", images))
            if label is not None:
                problems.append(Problem(label, f"stray label: case {case_id!r} is listed as unlabeled in "
                                        "dataset.json; remove the label or the case from the unlabeled list"))
        elif label is None:
            problems.append(Problem(images[0], f"no label labelsTr/{case_id}{ending}; add it, or list the case "
                                    "under \"unlabeled\" in dataset.json (or move it to imagesUnlabeled/)"))
        else:
            info.cases.append(CaseFiles(case_id, "labeled", images, label))
    for case_id, images in extra.items():
        if case_id in train:
            problems.append(Problem(images[0], f"case {case_id!r} is in both imagesTr/ and imagesUnlabeled/"))
            continue
        info.cases.append(CaseFiles(case_id, "unlabeled", images))
        if case_id in labels_tr:
            problems.append(Problem(labels_tr[case_id], f"stray label: case {case_id!r} is in imagesUnlabeled/; "
                                    "unlabelled cases must not have a label (move the case to imagesTr/ to use it)"))
    for case_id, label in labels_tr.items():
        if case_id not in train and case_id not in extra:
            problems.append(Problem(label, f"label without image: no imagesTr/{case_id}_0000{ending}"))
    for case_id, images in test.items():
        info.cases.append(CaseFiles(case_id, "test", images, labels_ts.get(case_id)))
    for case_id, label in labels_ts.items():
        if case_id not in test:
            problems.append(Problem(label, f"label without image: no imagesTs/{case_id}_0000{ending}"))
    n_labeled = len(info.role("labeled"))
    if info.num_training is not None and info.num_training != len(train):
        problems.append(Problem(folder / "dataset.json", f"numTraining is {info.num_training} but imagesTr/ holds "
                                f"{len(train)} cases"))
    if (folder / "imagesTr").is_dir() and n_labeled == 0:
        problems.append(Problem(folder / "labelsTr", "no labelled training case; at least one image in imagesTr/ "
                                "needs its label in labelsTr/"))


def _geometry_difference(a: np.ndarray, b: np.ndarray) -> str | None:
    """Which of spacing, direction, origin differ between two affines (None when they agree)."""
    sa, sb = np.sqrt((a[:3, :3] ** 2).sum(0)), np.sqrt((b[:3, :3] ** 2).sum(0))
    if not np.allclose(sa, sb, rtol=1e-4, atol=1e-4):
        return f"spacing {np.round(sb, 4).tolist()} vs {np.round(sa, 4).tolist()}"
    if not np.allclose(a[:3, :3] / sa, b[:3, :3] / sb, atol=1e-4):
        return "direction (orientation) differs"
    if not np.allclose(a[:3, 3], b[:3, 3], atol=1e-3 * max(float(sa.max()), 1.0)):
        return f"origin {np.round(b[:3, 3], 3).tolist()} vs {np.round(a[:3, 3], 3).tolist()}"
    return None


def _check_image(path: Path, vol: Volume, reference: Volume | None, problems: list[Problem]) -> bool:
    data = vol.data
    if data.ndim != 3:
        problems.append(Problem(path, f"image has shape {data.shape}; expected one 3D volume per channel file"))
        return False
    if data.size == 0:
        problems.append(Problem(path, "image is empty (no voxels)"))
        return False
    if not np.issubdtype(data.dtype, np.number):
        problems.append(Problem(path, f"image has non-numeric type {data.dtype}"))
        return False
    finite = np.isfinite(data)
    if not finite.all():
        problems.append(Problem(path, f"image has {int((~finite).sum())} NaN/Inf voxels; replace them (e.g. with 0)"))
        return False
    big = float(np.abs(data).max())
    if big > FLOAT32_SAFE:  # Inf in float32 (e.g. after scl_slope scaling), or overflow when normalised
        problems.append(Problem(path, f"image values reach {big:.3g}, beyond what float32 preprocessing can hold "
                                f"(|x| <= {FLOAT32_SAFE:.0e}); check scl_slope / scl_inter or rescale the file"))
        return False
    if data.min() == data.max():
        problems.append(Problem(path, f"image is empty: every voxel equals {data.min().item()}"))
        return False
    if reference is not None:
        if data.shape != reference.data.shape:
            problems.append(Problem(path, f"shape {data.shape} differs from channel 0's {reference.data.shape}"))
            return False
        diff = _geometry_difference(reference.affine, vol.affine)
        if diff:
            problems.append(Problem(path, f"geometry differs from channel 0: {diff}"))
            return False
    return True


def _check_label(path: Path, vol: Volume, image: Volume, labels: dict[str, int], problems: list[Problem]) -> bool:
    data = vol.data
    if data.shape != image.data.shape:
        problems.append(Problem(path, f"label shape {data.shape} differs from its image's {image.data.shape}"))
        return False
    diff = _geometry_difference(image.affine, vol.affine)
    if diff:
        problems.append(Problem(path, f"label geometry differs from its image: {diff}"))
        return False
    if not np.issubdtype(data.dtype, np.number) and data.dtype != np.bool_:
        problems.append(Problem(path, f"label has non-numeric type {data.dtype}; labels must be class indices"))
        return False
    if not np.isfinite(data).all():
        problems.append(Problem(path, f"label holds {int((~np.isfinite(data)).sum())} NaN/Inf values; labels must "
                                "be class indices"))
        return False
    if not np.issubdtype(data.dtype, np.integer) and not np.array_equal(data, np.round(data)):
        problems.append(Problem(path, "label holds non-integer values; labels must be class indices"))
        return False
    found = np.unique(data)
    declared = sorted(labels.values())
    outside = found[(found < 0) | (found > max(declared))]
    if outside.size:  # compared as numbers: a cast to int would turn 1e20 into nonsense
        shown = ", ".join(f"{v:g}" for v in outside[:5].tolist())
        problems.append(Problem(path, f"label values [{shown}] are not declared in dataset.json labels {declared}; "
                                "declare them in dataset.json \"labels\" (labels must stay consecutive from 0), or "
                                "remap the label files to the declared values (e.g. 255 -> 1 for a binary mask)"))
        return False
    values = set(found.astype(int).tolist())
    undeclared = sorted(values - set(labels.values()))
    if undeclared:
        example = ", ".join(f'"class{v}": {v}' for v in undeclared)
        problems.append(Problem(path, f"label values {undeclared} are not declared in dataset.json labels "
                                f"{sorted(labels.values())}; declare them in dataset.json \"labels\" (e.g. "
                                f"{example}; labels must stay consecutive from 0), or remap the label files to the "
                                "declared values (e.g. 255 -> 1 for a binary mask)"))
        return False
    return True


@dataclass
class CheckResult:
    info: DatasetInfo | None
    problems: list[Problem]
    spacings: list[np.ndarray] = field(default_factory=list)  # canonical spacing of each training case
    ct_samples: dict[int, list[np.ndarray]] = field(default_factory=dict)  # channel -> foreground intensities


def _load_case(case: CaseFiles, info: DatasetInfo, problems: list[Problem]) -> tuple[list[Volume], Volume | None]:
    """Read and check one case; returns ([], None) when anything is wrong (problems are appended)."""
    volumes: list[Volume] = []
    for path in case.images:
        try:
            vol = read_volume(path)
        except DataError as exc:
            problems.append(Problem(path, str(exc).removeprefix(f"{path}: ")))
            return [], None
        if not _check_image(path, vol, volumes[0] if volumes else None, problems):
            return [], None
        volumes.append(vol)
    if case.label is None:
        return volumes, None
    try:
        label = read_volume(case.label)
    except DataError as exc:
        problems.append(Problem(case.label, str(exc).removeprefix(f"{case.label}: ")))
        return [], None
    if not _check_label(case.label, label, volumes[0], info.labels, problems):
        return [], None
    return volumes, label


def check_dataset(folder: Path) -> CheckResult:
    """Read every file of the dataset and list all problems; also gathers spacings and CT statistics."""
    from nibabel import orientations as nio

    folder = Path(folder)
    problems: list[Problem] = []
    info = _read_dataset_json(folder, problems)
    result = CheckResult(info, problems)
    if info is None:
        return result
    find_cases(folder, info, problems)
    ct_channels = [i for i, name in enumerate(info.channel_names) if ChannelNorm.for_channel(name).scheme == "ct"]
    for index, case in enumerate(info.cases):
        volumes, label = _load_case(case, info, problems)
        if not volumes or case.role == "test":
            continue
        ornt = nio.io_orientation(volumes[0].affine)
        result.spacings.append(volumes[0].spacing[np.argsort(ornt[:, 0])])  # spacing along R, A, S
        if label is not None:
            foreground = label.data > 0
            rng = np.random.default_rng(index)
            for c in ct_channels:
                values = volumes[c].data[foreground] if foreground.any() else volumes[c].data.ravel()
                if values.size > CT_SAMPLES_PER_CASE:
                    values = rng.choice(values, CT_SAMPLES_PER_CASE, replace=False)
                result.ct_samples.setdefault(c, []).append(values.astype(np.float64))
    return result


# ----------------------------------------------------------------------------- preparing the cache

def parse_sizes(text: str) -> tuple[float, ...] | None:
    """`1,1,2.5` or `1x1x2.5` as positive finite sizes (mm); None when the text is not such a list."""
    try:
        values = tuple(float(v) for v in text.replace("x", ",").split(",") if v.strip())
    except ValueError:
        return None
    return values if values and all(np.isfinite(v) and v > 0 for v in values) else None


def make_recipe(result: CheckResult, spacing: str | None = None,
                ct_window: tuple[float, float] | None = None) -> Recipe:
    """Channel normalisation from the names (CT window: given, or the 0.5-99.5 % foreground percentiles)."""
    assert result.info is not None
    channels = []
    for i, name in enumerate(result.info.channel_names):
        norm = ChannelNorm.for_channel(name)
        if norm.scheme == "ct":
            samples = np.concatenate(result.ct_samples.get(i, [np.zeros(1)]))
            window = ct_window or (float(np.percentile(samples, 0.5)), float(np.percentile(samples, 99.5)))
            clipped = np.clip(samples, *window)
            norm = ChannelNorm(name, "ct", window, float(clipped.mean()), float(clipped.std()))
        channels.append(norm)
    target: tuple[float, float, float] | None = None
    if spacing == "median":
        target = tuple(float(v) for v in np.median(np.stack(result.spacings), axis=0))  # type: ignore[assignment]
    elif spacing:
        values = parse_sizes(spacing)
        if values is None or len(values) != 3:
            raise DataError(f"--spacing {spacing!r}: give three positive sizes in mm (e.g. 1,1,2.5) or 'median'")
        target = values  # type: ignore[assignment]
    return Recipe(channels, target)


def prepared_folder(folder: Path) -> Path:
    return Path(folder) / CACHE_DIR


def _is_own_output(target: Path) -> bool:
    """True when `target` holds only what `prepare` writes: its marker `prepared.json` and `cases/*.h5`."""
    marker = target / PREPARED
    if marker.is_symlink() or not marker.is_file():
        return False
    try:
        if json.loads(marker.read_text()).get("format") != FORMAT:
            return False
    except (OSError, ValueError, AttributeError):
        return False
    cases = target / "cases"
    if any(entry.name not in (PREPARED, "cases") for entry in target.iterdir()):
        return False
    if not cases.exists():
        return True
    if cases.is_symlink() or not cases.is_dir():
        return False
    return all(p.suffix == ".h5" and p.is_file() and not p.is_symlink() for p in cases.iterdir())


def check_output(folder: Path, target: Path) -> None:
    """Refuse an output folder whose replacement could destroy anything but a previous cache of `prepare`.

    The cache is replaced as a whole, so the folder must be new, empty, or `prepare`'s own output (its
    marker file `prepared.json` and `cases/`, nothing else); it must not be a symbolic link, the dataset
    itself, or a folder that contains the dataset.
    """
    if target.is_symlink():
        raise DataError(f"{target}: --out is a symbolic link; semiseg does not follow it (it would replace "
                        "what the link points to); give the real folder")
    source, resolved = folder.resolve(), target.resolve()
    if resolved == source or resolved in source.parents:
        raise DataError(f"{target}: --out is the dataset folder itself or contains it, and preparing replaces "
                        f"--out as a whole; choose a new folder (default: {folder / CACHE_DIR})")
    if not target.exists():
        return
    if not target.is_dir():
        raise DataError(f"{target}: --out exists and is not a folder; choose a new or empty folder")
    if any(target.iterdir()) and not _is_own_output(target):
        raise DataError(f"{target}: folder is not empty and is not a previous output of `semiseg data prepare` "
                        f"(only {PREPARED} and cases/*.h5 may be there); semiseg replaces only its own output: "
                        "choose a new or empty folder")


def _aside_prefix(target: Path) -> str:
    """Name start of this process's folders beside `target` (staged cache, old cache): the writer's host and pid
    are in the name, so that a later `prepare` can tell a dead writer's leftovers from a live writer's work."""
    return f".{target.name}.{socket.gethostname()}-{os.getpid()}."


def _remove_dead_writers_folders(target: Path) -> list[Path]:
    """Remove the staged and old caches that a `prepare` killed on this host left beside `target` (a SIGKILL or a
    power cut skips the clean-up): they are this tool's own output, as large as the cache, and nobody finishes
    them. A folder of a live process, of another host or of another naming is left alone."""
    pattern = re.compile(rf"^\.{re.escape(target.name)}\.{re.escape(socket.gethostname())}-(\d+)\..+\.(tmp|old)$")
    removed = []
    for path in target.parent.glob(f".{target.name}.*"):
        match = pattern.match(path.name)
        if match and path.is_dir() and not path.is_symlink() and not _process_alive(int(match.group(1))):
            shutil.rmtree(path, ignore_errors=True)
            removed.append(path)
    return removed


def _process_alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:  # alive, another user's
        return True
    return True


def _staging_folder(target: Path) -> Path:
    """A fresh hidden folder beside `target` to build the cache in (also proves the parent is writable)."""
    try:
        target.parent.mkdir(parents=True, exist_ok=True)
        _remove_dead_writers_folders(target)
        return Path(tempfile.mkdtemp(prefix=_aside_prefix(target), suffix=".tmp", dir=target.parent))
    except OSError as exc:
        raise DataError(f"{target.parent}: output folder is not writable ({exc.strerror}); choose another --out "
                        "or free disk space") from None


def _swap_into_place(staged: Path, target: Path, folder: Path) -> None:
    """Replace `target` with the staged cache; the old cache is removed only once the new one is in place."""
    check_output(folder, target)  # again: the folder may have changed while the cases were written
    if not target.exists():
        staged.rename(target)
        return
    old = Path(tempfile.mkdtemp(prefix=_aside_prefix(target), suffix=".old", dir=target.parent))
    old.rmdir()
    target.rename(old)
    staged.rename(target)
    shutil.rmtree(old)


def prepare(folder: Path, out: Path | None = None, spacing: str | None = None,
            ct_window: tuple[float, float] | None = None, check_only: bool = False) -> Path | None:
    """Check the dataset, then write the cache (atomically: built aside, renamed into place).

    Returns the cache folder, or None with `check_only`. Raises `PrepareError` listing every problem. The
    output folder is checked first (see `check_output`), before any file is read.
    """
    folder = Path(folder)
    if not folder.is_dir():
        raise DataError(f"{folder}: dataset folder not found")
    target = Path(out) if out is not None else prepared_folder(folder)
    staged = None
    if not check_only:
        check_output(folder, target)
        staged = _staging_folder(target)
    try:
        result = check_dataset(folder)
        if result.problems:
            raise PrepareError(folder, result.problems)
        if staged is None:
            return None
        _write_cache(folder, result, make_recipe(result, spacing, ct_window), staged)
        _swap_into_place(staged, target, folder)
    finally:
        if staged is not None and staged.exists():
            shutil.rmtree(staged)
    return target


def _write_cache(folder: Path, result: CheckResult, recipe: Recipe, tmp: Path) -> None:
    info = result.info
    assert info is not None
    cases: dict[str, Any] = {}
    for case in info.cases:
        if case.role == "test" and case.label is None:
            continue  # unlabelled test scans are for `semiseg predict`, which reads them directly
        volumes = [read_volume(p) for p in case.images]
        image, affine = recipe.image(volumes)
        if not np.isfinite(image).all():
            raise DataError(f"{case.images[0]}: preprocessing gives {int((~np.isfinite(image)).sum())} NaN/Inf "
                            "voxels (values too large for float32 after scaling); fix the file's intensities or "
                            "its scl_slope / scl_inter")
        label = recipe.label(read_volume(case.label), image.shape[1:]) if case.label is not None else None
        write_case(tmp / "cases" / f"{case.case_id}.h5", image, label)
        cases[case.case_id] = {"role": case.role, "images": [str(p) for p in case.images],
                               "label": str(case.label) if case.label else None,
                               "shape": list(image.shape[1:]), "affine": np.round(affine, 6).tolist()}
    manifest = {
        "format": FORMAT, "version": 1, "name": info.name, "source": str(folder.resolve()),
        "channel_names": info.channel_names, "labels": info.labels, "file_ending": info.file_ending,
        "labeled": [c.case_id for c in info.role("labeled")],
        "unlabeled": [c.case_id for c in info.role("unlabeled")],
        "test": [c.case_id for c in info.role("test") if c.label is not None],
        "recipe": recipe.to_json(), "cases": cases,
    }
    (tmp / PREPARED).write_text(json.dumps(manifest, indent=1))
