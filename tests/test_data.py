"""Data: LA reader and splits, bad-input errors, synthetic generator, legacy augmentations, two-stream batches."""

from __future__ import annotations

from pathlib import Path

import h5py
import numpy as np
import pytest

from semiseg.data import open_dataset
from semiseg.data.h5 import read_case, write_case
from semiseg.data.layouts.la import CASES_DIR
from semiseg.data.loader import TwoStreamBatches, stream_index
from semiseg.data.synthetic import SyntheticSpec, make_case
from semiseg.data.transforms import RandomCrop, RandomRotFlip, legacy_augmentation
from semiseg.errors import ConfigError, DataError


def _la_folder(root: Path, n_train: int = 4, n_test: int = 2, shape=(20, 18, 12)) -> Path:
    ids = [f"C{i}" for i in range(n_train + n_test)]
    rng = np.random.default_rng(0)
    for case_id in ids:
        label = np.zeros(shape, np.uint8)
        label[5:12, 5:12, 3:9] = 1
        write_case(root / CASES_DIR / case_id / "mri_norm2.h5", rng.standard_normal(shape).astype(np.float32), label)
    (root / "train.list").write_text("\n".join(ids[:n_train]) + "\n")
    (root / "test.list").write_text("\n".join(ids[n_train:]) + "\n")
    return root


# ---- layout and splits -------------------------------------------------------------------------------------

def test_la_layout_split_is_first_n_labelled(tmp_path: Path) -> None:
    layout = open_dataset(_la_folder(tmp_path))
    assert layout.name == "la"
    split = layout.split(labeled=2)
    assert split.labeled == ["C0", "C1"] and split.unlabeled == ["C2", "C3"] and split.test == ["C4", "C5"]
    assert split.val == []


def test_validation_subset_is_carved_from_the_training_list(tmp_path: Path) -> None:
    split = open_dataset(_la_folder(tmp_path)).split(labeled=2, val=1)
    assert split.val == ["C3"] and "C3" not in split.unlabeled and not set(split.val) & set(split.test)
    assert "last 1" in split.val_source


def test_empty_labelled_set_and_too_many_labels_are_clear_errors(tmp_path: Path) -> None:
    layout = open_dataset(_la_folder(tmp_path))
    with pytest.raises(DataError, match="labelled set is empty"):
        layout.split(labeled=0)
    with pytest.raises(DataError, match="--labeled 9 but only 4"):
        layout.split(labeled=9)


def test_unknown_folder_and_missing_folder(tmp_path: Path) -> None:
    with pytest.raises(DataError, match="no known dataset layout"):
        open_dataset(tmp_path)
    with pytest.raises(DataError, match="not found"):
        open_dataset(tmp_path / "nope")


# ---- bad input -----------------------------------------------------------------------------------------------

def _h5(path: Path, **arrays: np.ndarray) -> Path:
    with h5py.File(path, "w") as f:
        for key, value in arrays.items():
            f.create_dataset(key, data=value)
    return path


@pytest.mark.parametrize(("arrays", "message"), [
    ({"image": np.zeros((4, 4, 4), np.float32)}, "no 'label' dataset"),
    ({"img": np.zeros((4, 4, 4), np.float32)}, "no 'image' dataset"),
    ({"image": np.zeros((4, 4, 4), np.float32), "label": np.zeros((4, 4, 5), np.uint8)}, "shapes? .* differ"),
    ({"image": np.zeros((4, 4, 4), np.float32), "label": np.full((4, 4, 4), 3, np.uint8)}, "outside 0..1"),
    ({"image": np.full((4, 4, 4), np.nan, np.float32), "label": np.zeros((4, 4, 4), np.uint8)}, "NaN/Inf"),
    ({"image": np.zeros((4, 4, 4), np.float32), "label": np.full((4, 4, 4), 0.5)}, "non-integer"),
    ({"image": np.zeros((4, 4), np.float32), "label": np.zeros((4, 4), np.uint8)}, "expected 3D"),
    ({"image": np.zeros((0, 4, 4), np.float32), "label": np.zeros((0, 4, 4), np.uint8)}, "no voxels"),
])
def test_bad_cases_name_the_file_and_the_problem(tmp_path: Path, arrays: dict, message: str) -> None:
    path = _h5(tmp_path / "case.h5", **arrays)
    with pytest.raises(DataError, match=message) as info:
        read_case(path, "case", num_classes=2)
    assert str(path) in str(info.value)


def test_missing_and_corrupt_files(tmp_path: Path) -> None:
    with pytest.raises(DataError, match="file not found"):
        read_case(tmp_path / "absent.h5", "absent", 2)
    good = _h5(tmp_path / "good.h5", image=np.zeros((8, 8, 8), np.float32), label=np.zeros((8, 8, 8), np.uint8))
    truncated = tmp_path / "truncated.h5"
    truncated.write_bytes(good.read_bytes()[:700])
    with pytest.raises(DataError, match="truncated or corrupt"):
        read_case(truncated, "truncated", 2)


def test_unlabelled_read_ignores_a_missing_label(tmp_path: Path) -> None:
    path = _h5(tmp_path / "u.h5", image=np.ones((5, 6, 7), np.float32))
    case = read_case(path, "u", 2, with_label=False)
    assert case.label is None and case.image.shape == (1, 5, 6, 7)


# ---- synthetic -----------------------------------------------------------------------------------------------

def test_synthetic_cases_are_deterministic_and_organ_like() -> None:
    a_img, a_lab = make_case(3, 1, (48, 40, 32))
    b_img, b_lab = make_case(3, 1, (48, 40, 32))
    c_img, _ = make_case(3, 2, (48, 40, 32))
    assert np.array_equal(a_img, b_img) and np.array_equal(a_lab, b_lab) and not np.array_equal(a_img, c_img)
    assert 0.01 < a_lab.mean() < 0.3  # one object, a few percent of the volume like the LA atrium
    assert abs(a_img.mean()) < 1e-4 and abs(a_img.std() - 1) < 1e-3  # z-scored like mri_norm2.h5
    assert a_img[a_lab == 1].mean() > a_img[a_lab == 0].mean() + 0.5


@pytest.mark.parametrize("shape", [(96, 96, 64), (37, 50, 23)])
@pytest.mark.parametrize("cells", [3, 5, 8])
def test_smooth_field_is_the_nd_cubic_zoom_of_the_coarse_grid(shape: tuple[int, int, int], cells: int) -> None:
    """The per-axis matrices give the field `ndimage.zoom` gives (the data of every earlier release)."""
    from scipy import ndimage

    from semiseg.data.synthetic import _smooth_field

    coarse = np.random.default_rng(5).standard_normal([cells] * 3)
    zoomed = ndimage.zoom(coarse, [s / cells for s in shape], order=3)
    expected = (zoomed - zoomed.mean()) / (zoomed.std() + 1e-8)
    field = _smooth_field(np.random.default_rng(5), shape, cells)
    assert field.shape == shape and np.abs(field - expected).max() < 1e-12


def test_synthetic_dataset_uses_the_la_layout(tiny_synthetic: str) -> None:
    layout = open_dataset(tiny_synthetic)
    assert layout.name == "la" and len(layout.train_ids) == 8 and len(layout.test_ids) == 2
    case = layout.read(layout.train_ids[0])
    assert case.image.shape == (1, 40, 40, 32) and set(np.unique(case.label)) == {0, 1}


def test_synthetic_options_are_validated() -> None:
    assert SyntheticSpec.parse("synthetic:n_train=3,shape=32x32x16").shape == (32, 32, 16)
    with pytest.raises(ConfigError, match="unknown synthetic option 'size'"):
        SyntheticSpec.parse("synthetic:size=3")


# ---- augmentations -------------------------------------------------------------------------------------------

def test_rot_flip_moves_image_and_label_together() -> None:
    image = np.arange(2 * 4 * 5 * 3, dtype=np.float32).reshape(2, 4, 5, 3)
    label = (image[0] % 7 == 0).astype(np.uint8)
    for seed in range(8):
        out = RandomRotFlip()({"image": image, "label": label}, np.random.default_rng(seed))
        assert np.array_equal(out["label"], (out["image"][0] % 7 == 0))
        assert out["image"].shape[-1] == 3  # rotation only in the plane of the first two spatial axes


def test_rot_flip_stays_in_the_axial_plane_and_draws_every_rotation_and_flip() -> None:
    image = np.arange(4 * 5 * 3, dtype=np.float32).reshape(1, 4, 5, 3)
    seen = set()
    for seed in range(64):
        out = RandomRotFlip()({"image": image}, np.random.default_rng(seed))["image"][0]
        assert np.all(np.diff(out, axis=-1) == 1)  # the depth axis is never flipped or moved
        seen.add(out.tobytes())
    # k in 0..3 times a flip of axis 0 or 1: 8 draws, only 4 distinct arrays (flip-x after rot k = flip-y after k+2)
    assert len(seen) == 4


def test_random_crop_never_draws_the_last_start_and_pads_by_the_legacy_rule() -> None:
    image = np.arange(10, dtype=np.float32).reshape(1, 10, 1, 1).repeat(6, 2).repeat(6, 3)
    starts = {int(RandomCrop((4, 6, 6))({"image": image}, np.random.default_rng(s))["image"][0, 0, 0, 0])
              for s in range(300)}
    # dim 6 <= patch 6 triggers padding of every axis by max((p - d)//2 + 3, 0): x by max(-3 + 3, 0) = 0
    assert starts == set(range(0, 10 - 4))  # start in [0, dim - patch): 6 never drawn
    no_pad = np.zeros((1, 12, 12, 12), np.float32)
    assert RandomCrop((4, 4, 4))({"image": no_pad}, np.random.default_rng(0))["image"].shape == (1, 4, 4, 4)
    small = {"image": np.ones((1, 3, 8, 8), np.float32), "label": np.ones((3, 8, 8), np.uint8)}
    out = RandomCrop((4, 4, 4))(small, np.random.default_rng(0))
    assert out["image"].shape == (1, 4, 4, 4) and out["label"].shape == (4, 4, 4)


# ---- two-stream batches --------------------------------------------------------------------------------------

def test_labelled_stream_reshuffles_every_pass_and_unlabelled_cycles() -> None:
    firsts = [stream_index(0, 0, p, 8) for p in range(8)]
    seconds = [stream_index(0, 0, p, 8) for p in range(8, 16)]
    assert sorted(firsts) == sorted(seconds) == list(range(8)) and firsts != seconds


def test_batches_are_a_pure_function_of_seed_and_iteration(tiny_synthetic: str) -> None:
    from semiseg.data import load_cases

    layout = open_dataset(tiny_synthetic)
    split = layout.split(2)
    lab, unl = load_cases(layout, split.labeled, True), load_cases(layout, split.unlabeled, False)
    make = lambda start: TwoStreamBatches(lab, unl, 2, 2, legacy_augmentation((16, 16, 16)), 5, start, 10)  # noqa: E731
    full, resumed = make(0), make(6)
    b1, b2 = full[7], resumed[1]
    assert b1.image_labeled.shape == (2, 1, 16, 16, 16) and b1.image_unlabeled.shape == (2, 1, 16, 16, 16)
    assert all(np.array_equal(getattr(b1, k), getattr(b2, k)) for k in
               ("image_labeled", "label_labeled", "image_unlabeled", "index_labeled"))
    assert b1.images.shape[0] == 4


def test_zero_unlabelled_cases_gives_labelled_only_batches(tiny_synthetic: str) -> None:
    from semiseg.data import load_cases

    layout = open_dataset(tiny_synthetic)
    lab = load_cases(layout, layout.train_ids, True)
    batch = TwoStreamBatches(lab, [], 2, 2, legacy_augmentation((16, 16, 16)), 0, 0, 3)[0]
    assert batch.image_unlabeled.shape[0] == 0 and batch.images.shape[0] == 2


# ---- real LA -------------------------------------------------------------------------------------------------

@pytest.mark.la
def test_real_la_reader_and_split(la_root: Path) -> None:
    layout = open_dataset(la_root)
    assert len(layout.train_ids) == 80 and len(layout.test_ids) == 20
    split = layout.split(8)
    assert split.labeled[:4] == ["06SR5RBREL16DQ6M8LWS", "0RZDK210BSMWAA6467LU", "1D7CUD1955YZPGK8XHJX",
                                 "1GU15S0GJ6PFNARO469W"]
    assert len(split.unlabeled) == 72 and split.test[0] == "UPT6DX9IQY9JAZ7HJKA7"
    for case_id in (split.labeled[0], split.test[0]):
        case = layout.read(case_id)
        assert case.image.dtype == np.float32 and case.image.shape[0] == 1 and case.image.shape[-1] == 88
        assert set(np.unique(case.label)) == {0, 1}
        assert 0.3 < case.image.mean() < 2.0  # z-scored on the full volume, then cropped (protocol.md 1.1)


def test_process_shares_of_the_global_batch_equal_the_single_process_batch(tiny_synthetic: str) -> None:
    import torch

    from semiseg.data import load_cases

    layout = open_dataset(tiny_synthetic)
    split = layout.split(3)
    lab, unl = load_cases(layout, split.labeled, True), load_cases(layout, split.unlabeled, False)
    aug = legacy_augmentation((16, 16, 16))
    single = TwoStreamBatches(lab, unl, 4, 2, aug, 1, 0, 5)[3]
    shares = [TwoStreamBatches(lab, unl, 2, 1, aug, 1, 0, 5, rank=r, world=2)[3] for r in range(2)]
    for key in ("image_labeled", "label_labeled", "image_unlabeled", "index_labeled"):
        assert torch.equal(getattr(single, key), torch.cat([getattr(s, key) for s in shares])), key
