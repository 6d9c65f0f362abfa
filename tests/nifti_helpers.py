"""Tiny synthetic nnU-Net-style datasets (NIfTI or NRRD) for the user-data tests."""

from __future__ import annotations

import json
from pathlib import Path

import nibabel as nib
import numpy as np

from semiseg.data.synthetic import make_case

# Array axis 0 runs posterior (-A), axis 1 left (-R), axis 2 superior at 2 mm: not RAS, anisotropic.
AFFINE = np.array([[0.0, -1.0, 0.0, 30.0], [-1.0, 0.0, 0.0, 20.0], [0.0, 0.0, 2.0, -5.0], [0.0, 0.0, 0.0, 1.0]])
SHAPE = (24, 28, 16)


def case_arrays(index: int, shape: tuple[int, int, int] = SHAPE) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """(MRI-like image, CT-like image in HU, 3-class label): class 2 is the upper half of the object."""
    image, label = make_case(7, index, shape)
    label = label.astype(np.uint8)
    zs = np.nonzero(label.any(axis=(0, 1)))[0]
    if zs.size:
        label[..., (zs.min() + zs.max()) // 2 + 1:] *= 2
    return image * 50 + 300, image * 120 + 40, label


def save_nifti(path: Path, data: np.ndarray, affine: np.ndarray = AFFINE) -> Path:
    path.parent.mkdir(parents=True, exist_ok=True)
    img = nib.Nifti1Image(data, affine)
    img.header.set_xyzt_units("mm", "sec")
    img.header["descrip"] = b"semiseg test scan"
    nib.save(img, str(path))
    return path


def make_dataset(root: Path, n_labeled: int = 4, n_unlabeled: int = 2, n_test: int = 2, channels: int = 2,
                 shape: tuple[int, int, int] = SHAPE) -> Path:
    """imagesTr / labelsTr / imagesUnlabeled / imagesTs / labelsTs with `channels` channels (MRI, CT)."""
    names = {"0": "T2", "1": "CT"}
    meta = {"name": "Toy", "channel_names": {str(c): names[str(c)] for c in range(channels)},
            "labels": {"background": 0, "lower": 1, "upper": 2}, "numTraining": n_labeled,
            "file_ending": ".nii.gz"}
    (root).mkdir(parents=True, exist_ok=True)
    (root / "dataset.json").write_text(json.dumps(meta))
    index = 0
    for folder, count, label_folder in (("imagesTr", n_labeled, "labelsTr"), ("imagesUnlabeled", n_unlabeled, None),
                                        ("imagesTs", n_test, "labelsTs")):
        for _ in range(count):
            case_id = f"toy_{index:03d}"
            mri, ct, label = case_arrays(index, shape)
            for c, image in enumerate((mri, ct)[:channels]):
                save_nifti(root / folder / f"{case_id}_{c:04d}.nii.gz", image.astype(np.float32))
            if label_folder:
                save_nifti(root / label_folder / f"{case_id}.nii.gz", label)
            index += 1
    return root
