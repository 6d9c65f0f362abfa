"""Tests of semiseg.engine.postprocess.largest_connected_component."""

from __future__ import annotations

import numpy as np
from hypothesis import given, settings
from hypothesis import strategies as st
from hypothesis.extra.numpy import arrays
from skimage.measure import label

from semiseg.engine.postprocess import largest_connected_component


def skimage_largest_cc(mask: np.ndarray) -> np.ndarray:
    """The lineage's ``getLargestCC`` (skimage default = full connectivity), as an oracle."""
    labels = label(mask)
    if labels.max() == 0:
        return np.zeros(mask.shape, bool)
    return labels == np.argmax(np.bincount(labels.ravel())[1:]) + 1


def test_keeps_largest_3d():
    m = np.zeros((10, 10, 10), bool)
    m[0:2, 0:2, 0:2] = True  # 8 voxels
    m[5:8, 5:8, 5:8] = True  # 27 voxels
    out = largest_connected_component(m)
    assert out.dtype == bool and out.shape == m.shape
    assert out.sum() == 27 and out[6, 6, 6] and not out[0, 0, 0]


def test_corner_contact_is_connected():
    """Full connectivity: voxels touching only at a corner form one component (26-neighbourhood)."""
    m = np.zeros((4, 4, 4), bool)
    m[0, 0, 0] = m[1, 1, 1] = m[2, 2, 2] = True
    m[0, 3, 3] = m[0, 3, 2] = True
    assert largest_connected_component(m).sum() == 3
    m2 = np.zeros((4, 4), bool)
    m2[0, 0] = m2[1, 1] = True
    m2[3, 3] = True
    assert largest_connected_component(m2).sum() == 2


def test_tie_keeps_lowest_label():
    m = np.zeros((5, 7), bool)
    m[0, 4:6] = True  # first in C order -> label 1
    m[3, 0:2] = True
    out = largest_connected_component(m)
    assert out[0, 4] and out[0, 5] and out.sum() == 2


def test_empty_and_non_bool_input():
    out = largest_connected_component(np.zeros((3, 4, 5), np.uint8))
    assert out.dtype == bool and out.shape == (3, 4, 5) and not out.any()
    lab = np.array([[0, 2, 2], [0, 0, 0], [1, 0, 0]], np.uint8)
    np.testing.assert_array_equal(largest_connected_component(lab), lab == 2)


@settings(max_examples=50, deadline=None)
@given(
    st.one_of(
        arrays(bool, st.tuples(st.integers(1, 16), st.integers(1, 16))),
        arrays(bool, st.tuples(st.integers(1, 10), st.integers(1, 10), st.integers(1, 10))),
    )
)
def test_matches_skimage(mask):
    np.testing.assert_array_equal(largest_connected_component(mask), skimage_largest_cc(mask))
