"""Label maps for new images: h5 in, h5 out; NIfTI in, NIfTI out with the input's affine and header."""

from __future__ import annotations

from pathlib import Path

import h5py
import numpy as np

from ..config import TrainConfig
from ..data.h5 import Case, validate_case
from ..errors import DataError
from ..methods.base import NetSpec
from .checkpoint import load_checkpoint
from .evaluate import resolve_checkpoint
from .inference import predict_volume
from .trainer import build_method, inference_protocol, resolve_device

SUFFIXES = (".h5", ".nii.gz", ".nii")


def _inputs(paths: list[Path]) -> list[Path]:
    files: list[Path] = []
    for path in paths:
        if path.is_dir():
            files += sorted(p for p in path.iterdir() if p.name.endswith(SUFFIXES))
        elif path.is_file():
            files.append(path)
        else:
            raise DataError(f"{path}: input not found")
    if not files:
        raise DataError(f"no .h5 / .nii / .nii.gz images in {', '.join(map(str, paths))}")
    return files


def _stem(path: Path) -> str:
    return next(path.name[: -len(s)] for s in SUFFIXES if path.name.endswith(s)) if path.name.endswith(
        SUFFIXES) else path.stem


def predict_files(checkpoint: Path, inputs: list[Path], out: Path, device: str = "auto",
                  normalize: str = "auto") -> list[Path]:
    """Predict every input; `normalize` auto = z-score NIfTI images (as LA was), keep h5 images as stored."""
    ckpt_path, _ = resolve_checkpoint(checkpoint)
    payload = load_checkpoint(ckpt_path)
    cfg = TrainConfig(**payload["config"])
    dev = resolve_device(device)
    files = _inputs(inputs)
    out.mkdir(parents=True, exist_ok=True)
    net = None
    written = []
    for path in files:
        image, nifti = _read_image(path)
        if (normalize == "auto" and nifti is not None) or normalize == "zscore":
            image = (image - image.mean()) / (image.std() + 1e-8)
        spec = NetSpec(**payload["spec"])
        case = validate_case(Case(_stem(path), image.astype(np.float32), None, path), spec.num_classes,
                             spec.spatial_dims)
        if case.image.shape[0] != spec.in_channels:
            raise DataError(f"{path}: image has {case.image.shape[0]} channels, the model expects "
                            f"{spec.in_channels}")
        if net is None:
            method = build_method(cfg, spec, dev)
            method.load_state_dict(payload["method"])
            method.eval()
            net = method.inference_network()
        pred = predict_volume(net, case.image, inference_protocol(cfg), dev)
        written.append(_write_label(out, case.case_id, pred, nifti))
    return written


def _read_image(path: Path):
    if path.name.endswith(".h5"):
        try:
            with h5py.File(path, "r") as f:
                if "image" not in f:
                    raise DataError(f"{path}: no 'image' dataset (found {list(f.keys())})")
                return np.asarray(f["image"][()], dtype=np.float32), None
        except OSError as exc:
            raise DataError(f"{path}: unreadable HDF5 file ({exc})") from None
    try:
        import nibabel as nib
    except ImportError:
        raise DataError("NIfTI input needs nibabel: pip install 'semiseg[nifti]'") from None
    img = nib.load(str(path))
    return np.asarray(img.dataobj, dtype=np.float32), img


def _write_label(out: Path, case_id: str, pred: np.ndarray, nifti) -> Path:
    if nifti is None:
        path = out / f"{case_id}.h5"
        with h5py.File(path, "w") as f:
            f.create_dataset("label", data=pred, compression="gzip")
        return path
    import nibabel as nib

    header = nifti.header.copy()
    header.set_data_dtype(np.uint8)
    path = out / f"{case_id}.nii.gz"
    nib.save(nib.Nifti1Image(pred.astype(np.uint8), nifti.affine, header), str(path))
    return path
