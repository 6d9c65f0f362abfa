"""Post-processing of binary predictions (the lineage's optional largest-connected-component step)."""

from __future__ import annotations

import numpy as np
from scipy import ndimage


def largest_connected_component(mask: np.ndarray) -> np.ndarray:
    """Keep only the largest connected component of ``mask`` (returned as bool).

    Full connectivity (26-neighbourhood in 3D, 8 in 2D), as ``skimage.measure.label``'s default used by the
    UA-MT lineage's ``getLargestCC``. Ties keep the component with the lowest label (first in C order);
    an empty mask stays empty.
    """
    m = np.asarray(mask).astype(bool, copy=False)
    labels, n = ndimage.label(m, structure=ndimage.generate_binary_structure(m.ndim, m.ndim))
    if n == 0:
        return np.zeros(m.shape, dtype=bool)
    sizes = np.bincount(labels.ravel(), minlength=n + 1)[1:]
    return labels == np.argmax(sizes) + 1
