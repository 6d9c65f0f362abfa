"""Sliding window: the legacy window grid, padding, softmax averaging, and agreement with MONAI's grid."""

from __future__ import annotations

import itertools

import numpy as np
import pytest
import torch
from torch import nn

from semiseg.engine.inference import InferenceProtocol, predict_volume, sliding_window_probs, window_starts


@pytest.mark.parametrize(("size", "patch", "stride", "expected"), [
    (215, 112, 18, [0, 18, 36, 54, 72, 90, 103]),
    (132, 112, 18, [0, 18, 20]),
    (88, 80, 4, [0, 4, 8]),
    (112, 112, 18, [0]),
    (100, 112, 18, [0]),
])
def test_window_starts_match_protocol_examples(size: int, patch: int, stride: int, expected: list[int]) -> None:
    assert window_starts(size, patch, stride) == expected


def test_window_grid_equals_monai_dense_patch_slices_with_exact_stride() -> None:
    from monai.data.utils import dense_patch_slices

    for size, patch, stride in [((183, 140, 88), (112, 112, 80), (18, 18, 4)), ((130, 120, 101), (96,) * 3, (16,) * 3)]:
        ours = list(itertools.product(*[window_starts(s, p, t) for s, p, t in zip(size, patch, stride)]))
        theirs = [tuple(sl.start for sl in w) for w in dense_patch_slices(size, patch, stride)]
        assert sorted(ours) == sorted(theirs)


class _Scale(nn.Module):
    """A position-dependent toy net: logits depend on the input values, so averaging is observable."""

    def __init__(self) -> None:
        super().__init__()
        self.conv = nn.Conv3d(1, 3, 3, padding=1)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.conv(x)


def _legacy_reference(net: nn.Module, image: np.ndarray, patch, stride) -> np.ndarray:
    """A direct transcription of protocol.md section 1.4, loop by loop."""
    c, *size = image.shape
    pads = [max(p - s, 0) for s, p in zip(size, patch)]
    padded = np.pad(image, [(0, 0)] + [(t // 2, t - t // 2) for t in pads])
    size_p = padded.shape[1:]
    score = None
    count = np.zeros(size_p)
    for xs in window_starts(size_p[0], patch[0], stride[0]):
        for ys in window_starts(size_p[1], patch[1], stride[1]):
            for zs in window_starts(size_p[2], patch[2], stride[2]):
                crop = padded[:, xs:xs + patch[0], ys:ys + patch[1], zs:zs + patch[2]]
                with torch.no_grad():
                    y = net(torch.from_numpy(crop[None]).float()).softmax(1)[0].numpy()
                if score is None:
                    score = np.zeros((y.shape[0], *size_p))
                score[:, xs:xs + patch[0], ys:ys + patch[1], zs:zs + patch[2]] += y
                count[xs:xs + patch[0], ys:ys + patch[1], zs:zs + patch[2]] += 1
    probs = score / count
    return probs[:, pads[0] // 2:pads[0] // 2 + size[0], pads[1] // 2:pads[1] // 2 + size[1],
                 pads[2] // 2:pads[2] // 2 + size[2]]


@pytest.mark.parametrize("size", [(23, 19, 12), (9, 21, 7)])
def test_sliding_window_equals_the_legacy_loop(size: tuple[int, int, int]) -> None:
    torch.manual_seed(0)
    net = _Scale().eval()
    image = np.random.default_rng(0).standard_normal((1, *size)).astype(np.float32)
    patch, stride = (12, 12, 8), (5, 4, 3)
    ours = sliding_window_probs(net, torch.from_numpy(image), patch, stride, sw_batch_size=3).numpy()
    np.testing.assert_allclose(ours, _legacy_reference(net, image, patch, stride), atol=1e-6)
    assert ours.shape == (3, *size)
    np.testing.assert_allclose(ours.sum(0), 1.0, atol=1e-5)


def test_predict_volume_argmax_and_largest_component() -> None:
    class TwoBlobs(nn.Module):
        def forward(self, x: torch.Tensor) -> torch.Tensor:
            return torch.cat([-x, x], 1) * 10

    image = -np.ones((1, 20, 20, 10), dtype=np.float32)
    image[0, 2:8, 2:8, 2:8] = 1  # 216 voxels
    image[0, 14:16, 14:16, 4:6] = 1  # 8 voxels, a separate component
    protocol = InferenceProtocol(patch_size=(8, 8, 8), stride=(4, 4, 4))
    label = predict_volume(TwoBlobs(), image, protocol, torch.device("cpu"))
    assert label.dtype == np.uint8 and label.sum() == 224
    lcc = predict_volume(TwoBlobs(), image, InferenceProtocol(patch_size=(8, 8, 8), stride=(4, 4, 4), post_lcc=True),
                         torch.device("cpu"))
    assert lcc.sum() == 216 and lcc[15, 15, 5] == 0


@pytest.mark.la
def test_sliding_window_on_a_real_la_volume(la_root) -> None:
    from semiseg.data import open_dataset
    from semiseg.nets import VNet

    layout = open_dataset(la_root)
    case = layout.read_eval(layout.test_ids[0])
    n_windows = np.prod([len(window_starts(s, p, t)) for s, p, t in
                         zip(case.image.shape[1:], (112, 112, 80), (18, 18, 4))])
    assert 45 <= n_windows <= 84  # protocol.md: test cases need 45-84 windows
    torch.manual_seed(0)
    net = VNet(n_filters=2).eval()
    label = predict_volume(net, case.image, InferenceProtocol(stride=(56, 56, 40), sw_batch_size=2),
                           torch.device("cpu"))
    assert label.shape == case.label.shape
