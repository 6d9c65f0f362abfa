"""Segmentation metrics of the paper tables (protocol.md §5), written clean-room with SciPy.

medpy is the de-facto reference of the SSL lineage but is GPL-3.0, so it is only used as a test-time
oracle. Definitions:

* border ``∂X = X XOR erode(X)`` with the connectivity-1 structuring element and ``border_value=0``
  (foreground voxels on the array edge are border voxels);
* directed surface distances ``d(A→B)``: exact Euclidean distance transform of the complement of ``∂B``
  (with ``sampling=spacing``) read at the voxels of ``∂A``;
* ``hd95_legacy`` / ``asd_legacy`` reproduce medpy's ``hd95`` (95th percentile of the *pooled* directed
  sets) and ``asd`` (mean of ``d(pred→ref)``); ``hd95_standard`` is the MONAI / DeepMind-style maximum of
  the two directed 95th percentiles; ``assd`` is medpy ≥ 0.5's mean of the pooled sets.

Empty masks are handled by an explicit policy (``EMPTY_POLICIES``) because medpy raises on them and the
papers silently score an empty prediction as the *best* possible distance.
"""

from __future__ import annotations

import math
from collections.abc import Callable, Sequence

import numpy as np
from scipy import ndimage

EMPTY_POLICIES = ("legacy_zero", "nan", "penalty")

METRIC_DEFINITIONS: dict[str, str] = {
    "dice": "2|P∩G| / (|P|+|G|); 0 when both masks are empty",
    "jaccard": "|P∩G| / |P∪G|; 0 when both masks are empty",
    "hd95": (
        "medpy-compatible: 95th percentile (linear interpolation) of the pooled directed surface distances "
        "pred->ref and ref->pred; border = 1-voxel erosion, connectivity 1, exact EDT"
    ),
    "asd": "medpy-compatible (directed, not symmetric): mean of the surface distances pred->ref",
    "hd95_standard": "MONAI/DeepMind-style: max of the 95th percentiles of pred->ref and ref->pred",
    "assd": "medpy>=0.5: mean of the pooled directed surface distances pred->ref and ref->pred",
    "ravd": "| |P| - |G| | / |G| (absolute relative volume difference); NaN when G is empty",
}

_Pair = tuple[np.ndarray, np.ndarray]


def _as_bool_pair(pred: np.ndarray, ref: np.ndarray) -> _Pair:
    p = np.asarray(pred).astype(bool, copy=False)
    r = np.asarray(ref).astype(bool, copy=False)
    if p.shape != r.shape:
        raise ValueError(f"shape mismatch: pred {p.shape} vs ref {r.shape}")
    return p, r


def _spacing(spacing: Sequence[float] | None, ndim: int) -> np.ndarray:
    if spacing is None:
        return np.ones(ndim)
    s = np.asarray(spacing, dtype=float)
    if s.shape != (ndim,) or not np.all(s > 0):
        raise ValueError(f"spacing must be {ndim} positive numbers, got {spacing!r}")
    return s


def _check_policy(empty_policy: str) -> None:
    if empty_policy not in EMPTY_POLICIES:
        raise ValueError(f"unknown empty_policy {empty_policy!r}; valid: {', '.join(EMPTY_POLICIES)}")


def _crop_to_union(a: np.ndarray, b: np.ndarray) -> _Pair:
    """Crop to the union bounding box plus one voxel, clipped at the array edge.

    Exact: every foreground voxel keeps all its neighbours (either inside the crop, or outside the
    original array where erosion sees ``border_value=0`` in both cases), and all border voxels, hence
    all EDT zeros, stay inside the crop; distances are translation invariant.
    """
    union = a | b
    slices = []
    for axis in range(union.ndim):
        others = tuple(i for i in range(union.ndim) if i != axis)
        idx = np.flatnonzero(np.any(union, axis=others))
        slices.append(slice(max(idx[0] - 1, 0), min(idx[-1] + 2, union.shape[axis])))
    return a[tuple(slices)], b[tuple(slices)]


def _border(x: np.ndarray) -> np.ndarray:
    structure = ndimage.generate_binary_structure(x.ndim, 1)
    return x & ~ndimage.binary_erosion(x, structure=structure, border_value=0)


def _directed(border_a: np.ndarray, border_b: np.ndarray, spacing: np.ndarray) -> np.ndarray:
    return ndimage.distance_transform_edt(~border_b, sampling=spacing)[border_a]


def _directed_pair(pred: np.ndarray, ref: np.ndarray, spacing: np.ndarray) -> _Pair:
    """``(d(pred→ref), d(ref→pred))`` for two non-empty masks, sharing the crop and the borders."""
    p, r = _crop_to_union(pred, ref)
    bp, br = _border(p), _border(r)
    return _directed(bp, br, spacing), _directed(br, bp, spacing)


def _diagonal(shape: tuple[int, ...], spacing: np.ndarray) -> float:
    """Physical diagonal of the image grid: an upper bound of any surface distance inside it."""
    return float(np.linalg.norm(np.asarray(shape) * spacing))


def _empty_distance(p: np.ndarray, r: np.ndarray, spacing: np.ndarray, empty_policy: str) -> float | None:
    """Distance value imposed by the empty policy, or None when both masks have foreground."""
    p_any, r_any = bool(p.any()), bool(r.any())
    if p_any and r_any:
        return None
    if empty_policy == "nan":
        return math.nan
    if empty_policy == "legacy_zero" and not p_any:
        return 0.0
    return _diagonal(p.shape, spacing)


def surface_distances(a: np.ndarray, b: np.ndarray, spacing: Sequence[float] | None = None) -> np.ndarray:
    """Directed distances from each border voxel of ``a`` to the border of ``b`` (one value per voxel).

    Empty ``a`` gives an empty array; empty ``b`` (with non-empty ``a``) has no defined distance and raises.
    """
    a, b = _as_bool_pair(a, b)
    s = _spacing(spacing, a.ndim)
    if not a.any():
        return np.empty(0)
    if not b.any():
        raise ValueError("b has no foreground: surface distances to an empty mask are undefined")
    ca, cb = _crop_to_union(a, b)
    return _directed(_border(ca), _border(cb), s)


def dice(pred: np.ndarray, ref: np.ndarray) -> float:
    """Dice coefficient; 0 when both masks are empty (paper convention)."""
    p, r = _as_bool_pair(pred, ref)
    total = np.count_nonzero(p) + np.count_nonzero(r)
    return float(2 * np.count_nonzero(p & r) / total) if total else 0.0


def jaccard(pred: np.ndarray, ref: np.ndarray) -> float:
    """Jaccard index; 0 when both masks are empty."""
    p, r = _as_bool_pair(pred, ref)
    union = np.count_nonzero(p | r)
    return float(np.count_nonzero(p & r) / union) if union else 0.0


def _pooled(d_pr: np.ndarray, d_rp: np.ndarray) -> np.ndarray:
    return np.concatenate([d_pr, d_rp])


def _hd95_legacy(d_pr: np.ndarray, d_rp: np.ndarray) -> float:
    return float(np.percentile(_pooled(d_pr, d_rp), 95))


def _asd_legacy(d_pr: np.ndarray, d_rp: np.ndarray) -> float:
    return float(d_pr.mean())


def _hd95_standard(d_pr: np.ndarray, d_rp: np.ndarray) -> float:
    return float(max(np.percentile(d_pr, 95), np.percentile(d_rp, 95)))


def _assd(d_pr: np.ndarray, d_rp: np.ndarray) -> float:
    return float(_pooled(d_pr, d_rp).mean())


def _distance_metric(
    pred: np.ndarray,
    ref: np.ndarray,
    spacing: Sequence[float] | None,
    empty_policy: str,
    reduce: Callable[[np.ndarray, np.ndarray], float],
) -> float:
    _check_policy(empty_policy)
    p, r = _as_bool_pair(pred, ref)
    s = _spacing(spacing, p.ndim)
    imposed = _empty_distance(p, r, s, empty_policy)
    return reduce(*_directed_pair(p, r, s)) if imposed is None else imposed


def hd95_legacy(
    pred: np.ndarray,
    ref: np.ndarray,
    spacing: Sequence[float] | None = None,
    empty_policy: str = "legacy_zero",
) -> float:
    """medpy ``hd95``: 95th percentile of the pooled d(pred→ref) ∪ d(ref→pred) — what the papers report.

    Pooling can hide an outlier that is ~5 % of one surface (protocol.md §5 worked example). Empty masks
    follow ``empty_policy`` as in ``case_metrics``.
    """
    return _distance_metric(pred, ref, spacing, empty_policy, _hd95_legacy)


def asd_legacy(
    pred: np.ndarray,
    ref: np.ndarray,
    spacing: Sequence[float] | None = None,
    empty_policy: str = "legacy_zero",
) -> float:
    """medpy ``asd``: mean of the directed d(pred→ref); argument order matters (not symmetric).

    Empty masks follow ``empty_policy`` as in ``case_metrics``.
    """
    return _distance_metric(pred, ref, spacing, empty_policy, _asd_legacy)


def hd95_standard(
    pred: np.ndarray,
    ref: np.ndarray,
    spacing: Sequence[float] | None = None,
    empty_policy: str = "legacy_zero",
) -> float:
    """MONAI-style HD95: max of the two directed 95th percentiles (does not hide one-sided outliers).

    Empty masks follow ``empty_policy`` as in ``case_metrics``.
    """
    return _distance_metric(pred, ref, spacing, empty_policy, _hd95_standard)


def assd(
    pred: np.ndarray,
    ref: np.ndarray,
    spacing: Sequence[float] | None = None,
    empty_policy: str = "legacy_zero",
) -> float:
    """Average symmetric surface distance as in medpy ≥ 0.5: mean of the pooled directed distances.

    Empty masks follow ``empty_policy`` as in ``case_metrics``.
    """
    return _distance_metric(pred, ref, spacing, empty_policy, _assd)


def ravd(pred: np.ndarray, ref: np.ndarray) -> float:
    """Absolute relative volume difference (SSL4MIS BraTS tables); NaN when ``ref`` is empty (undefined)."""
    p, r = _as_bool_pair(pred, ref)
    g = np.count_nonzero(r)
    return float(abs(np.count_nonzero(p) - g) / g) if g else math.nan


def case_metrics(
    pred: np.ndarray,
    ref: np.ndarray,
    spacing: Sequence[float] | None = None,
    empty_policy: str = "legacy_zero",
) -> dict[str, float]:
    """Per-case ``dice, jaccard, hd95, asd`` with the legacy (medpy, paper-table) definitions.

    ``empty_policy`` decides the distances when ``pred`` or ``ref`` has no foreground (Dice and Jaccard are
    always the plain formulas, i.e. 0 when either mask is empty):

    * ``legacy_zero`` — the papers' convention: empty ``pred`` scores hd95 = asd = 0 (the *best* value).
      Empty ``ref`` with non-empty ``pred`` (where medpy would crash) gets the ``penalty`` distance instead.
    * ``nan`` — distances are NaN, to be excluded and counted (``summarize`` reports ``n``).
    * ``penalty`` — distances are the image diagonal in spacing units (``|shape ⊙ spacing|``), also when
      both masks are empty.
    """
    _check_policy(empty_policy)
    p, r = _as_bool_pair(pred, ref)
    s = _spacing(spacing, p.ndim)
    out = {"dice": dice(p, r), "jaccard": jaccard(p, r)}
    imposed = _empty_distance(p, r, s, empty_policy)
    if imposed is not None:
        return {**out, "hd95": imposed, "asd": imposed}
    d_pr, d_rp = _directed_pair(p, r, s)
    return {**out, "hd95": _hd95_legacy(d_pr, d_rp), "asd": _asd_legacy(d_pr, d_rp)}


def summarize(values: Sequence[dict[str, float]]) -> dict[str, dict[str, float]]:
    """Per metric ``mean``, population ``std`` and ``n`` over cases, ignoring NaN (``nan`` policy).

    A metric whose values are all NaN gets mean = std = NaN and n = 0.
    """
    keys = list(dict.fromkeys(k for case in values for k in case))
    summary: dict[str, dict[str, float]] = {}
    for key in keys:
        arr = np.array([case[key] for case in values if key in case], dtype=float)
        arr = arr[~np.isnan(arr)]
        n = arr.size
        summary[key] = {
            "mean": float(arr.mean()) if n else math.nan,
            "std": float(arr.std()) if n else math.nan,
            "n": n,
        }
    return summary
