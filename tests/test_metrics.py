"""Golden and property tests of semiseg.engine.metrics (protocol.md §5).

Golden values marked "medpy" were produced once, outside this repository, with medpy 0.5.2 (numpy 2.4.6,
scipy 1.17.1) in a throwaway venv — medpy is GPL-3.0 and is never imported here. Calls, with ``sp`` the
spacing (None or as given):

    medpy.metric.binary.hd95(P, G, voxelspacing=sp)   -> HD95_LEGACY
    medpy.metric.binary.asd(P, G, voxelspacing=sp)    -> ASD
    medpy.metric.binary.assd(P, G, voxelspacing=sp)   -> ASSD
    sd = getattr(medpy.metric.binary, "__surface_distances")
    max(np.percentile(sd(P, G, sp, 1), 95), np.percentile(sd(G, P, sp, 1), 95))  -> HD95_STANDARD

HD95_STANDARD was cross-checked with MONAI 1.6.1 ``compute_hausdorff_distance(percentile=95)`` (float32,
agrees to 1e-6) and ASD / ASSD with ``compute_average_surface_distance(symmetric=False / True)``.
"""

from __future__ import annotations

import math

import numpy as np
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st
from hypothesis.extra.numpy import arrays
from scipy import ndimage
from scipy.spatial.distance import cdist

from semiseg.engine import metrics as m


def ball(shape: tuple[int, ...], centre: tuple[int, ...], radius: float) -> np.ndarray:
    """{v : ||v - centre|| <= radius} on integer coordinates (protocol.md §5)."""
    grid = np.indices(shape)
    return sum((grid[i] - centre[i]) ** 2 for i in range(len(shape))) <= radius * radius


SHAPE = (112, 112, 80)
CENTRE = (56, 56, 40)


@pytest.fixture(scope="module")
def cases() -> dict[str, tuple[np.ndarray, np.ndarray]]:
    g = ball(SHAPE, CENTRE, 25)
    edge_p = np.zeros((20, 20, 12), bool)
    edge_p[:8, 3:15, :5] = True  # touches the array edge on three faces
    edge_g = np.zeros((20, 20, 12), bool)
    edge_g[2:12, 0:10, 2:9] = True
    return {
        "shift": (np.roll(g, 4, axis=2), g),
        "blob": (g | ball(SHAPE, (15, 15, 10), 6), g),
        "eroded": (ball(SHAPE, CENTRE, 22), g),
        "2d": (ball((40, 48), (18, 22), 7), ball((40, 48), (20, 25), 10)),
        "edge": (edge_p, edge_g),
    }


# protocol.md §5 table: (medpy HD95 pooled, MONAI HD95, ASD, ASSD), 3 decimals.
PROTOCOL_TABLE = {
    "shift": (3.742, 3.742, 1.898, 1.898),
    "blob": (0.000, 35.341, 2.135, 1.096),
    "eroded": (3.162, 3.162, 2.828, 2.850),
}

ANISO_3D = (0.625, 0.625, 2.5)
ANISO_2D = (0.7, 1.9)

# medpy 0.5.2 (see module docstring): (case, spacing) -> (hd95_legacy, hd95_standard, asd, assd).
MEDPY = {
    ("shift", None): (3.7416573867739413, 3.7416573867739413, 1.898319378460611, 1.898319378460611),
    ("shift", ANISO_3D): (6.155536126122565, 6.155536126122565, 1.9778324649931749, 1.9778324649931749),
    ("blob", None): (0.0, 35.34119409414458, 2.1346652471280323, 1.0962059040730838),
    ("blob", ANISO_3D): (0.0, 28.7581504094861, 1.872793730374343, 0.9617280962949398),
    ("eroded", None): (3.1622776601683795, 3.1622776601683795, 2.828373450884004, 2.8498104439177645),
    ("eroded", ANISO_3D): (5.0775240028974755, 5.340002340823457, 2.3272902426180764, 2.4913638867231596),
    ("2d", None): (6.5404101002127835, 6.798919902340896, 2.580390392086427, 3.098059906101148),
    ("2d", ANISO_2D): (9.659633783076261, 9.959086776331025, 2.1815584273992594, 3.393565076572042),
    ("edge", None): (5.0990195135927845, 5.0990195135927845, 2.429851944158462, 2.7946681329554015),
    ("edge", ANISO_3D): (10.077822185373186, 10.174262872562316, 2.8487676207887294, 3.940554054909338),
}
# medpy 0.5.2 dc / jc (spacing-independent).
MEDPY_OVERLAP = {
    "shift": (0.8807360534420151, 0.7868886120655433),
    "blob": (0.9929635856046372, 0.9860255015711868),
    "eroded": (0.8105157645343539, 0.6814010142951262),
    "2d": (0.630901287553648, 0.4608150470219436),
    "edge": (0.2135593220338983, 0.11954459203036052),
}


def all_distances(p: np.ndarray, g: np.ndarray, spacing=None) -> tuple[float, float, float, float]:
    return (
        m.hd95_legacy(p, g, spacing),
        m.hd95_standard(p, g, spacing),
        m.asd_legacy(p, g, spacing),
        m.assd(p, g, spacing),
    )


@pytest.mark.parametrize("name", sorted(PROTOCOL_TABLE))
def test_protocol_worked_examples(cases, name):
    p, g = cases[name]
    assert tuple(round(v, 3) for v in all_distances(p, g)) == pytest.approx(PROTOCOL_TABLE[name], abs=1e-9)


@pytest.mark.parametrize("key", sorted(MEDPY, key=str), ids=str)
def test_medpy_golden(cases, key):
    name, spacing = key
    p, g = cases[name]
    assert all_distances(p, g, spacing) == pytest.approx(MEDPY[key], abs=1e-9)
    cm = m.case_metrics(p, g, spacing)
    assert cm == pytest.approx(
        {
            "dice": MEDPY_OVERLAP[name][0],
            "jaccard": MEDPY_OVERLAP[name][1],
            "hd95": MEDPY[key][0],
            "asd": MEDPY[key][2],
        },
        abs=1e-12,
    )


def test_pooled_hd95_hides_outlier(cases):
    """The distant blob is ~5 % of one surface: medpy's pooled HD95 ignores it, the standard one does not."""
    p, g = cases["blob"]
    assert m.hd95_legacy(p, g) == 0.0
    assert m.hd95_standard(p, g) > 35


def test_asd_is_directed(cases):
    p, g = cases["blob"]
    assert m.asd_legacy(p, g) == pytest.approx(2.1346652471280323)
    assert m.asd_legacy(g, p) == pytest.approx(0.0)


# --- hand-computed cases -------------------------------------------------------------------------


def test_two_single_voxels():
    a = np.zeros((5, 5), bool)
    b = np.zeros((5, 5), bool)
    a[0, 0] = b[3, 4] = True
    for f in (m.hd95_legacy, m.hd95_standard, m.asd_legacy, m.assd):
        assert f(a, b) == pytest.approx(5.0)
        assert f(a, b, spacing=(2.0, 1.0)) == pytest.approx(math.sqrt(52))
    np.testing.assert_allclose(m.surface_distances(a, b), [5.0])


def test_block_inside_full_array():
    """Ref fills the array: its border is the outer ring only because border_value=0 at the array edge."""
    ref = np.ones((5, 5), bool)
    pred = np.zeros((5, 5), bool)
    pred[1:4, 1:4] = True
    np.testing.assert_allclose(np.sort(m.surface_distances(pred, ref)), np.ones(8))
    np.testing.assert_allclose(np.sort(m.surface_distances(ref, pred)), [1.0] * 12 + [math.sqrt(2)] * 4)
    assert m.asd_legacy(pred, ref) == pytest.approx(1.0)
    assert m.assd(pred, ref) == pytest.approx((20 + 4 * math.sqrt(2)) / 24)
    assert m.hd95_legacy(pred, ref) == pytest.approx(math.sqrt(2))
    assert m.hd95_standard(pred, ref) == pytest.approx(math.sqrt(2))
    assert m.dice(pred, ref) == pytest.approx(18 / 34)
    assert m.jaccard(pred, ref) == pytest.approx(9 / 25)


def test_pooled_can_exceed_standard():
    """With linear interpolation hd95_legacy <= hd95_standard does NOT hold in general (so it is not asserted
    as a property): both directed sets are [0, 1] -> q95 = 0.95 each, pooled [0, 0, 1, 1] -> q95 = 1."""
    a = np.array([[1, 1], [0, 0]], bool)
    b = np.array([[1, 0], [1, 0]], bool)
    assert m.hd95_standard(a, b) == pytest.approx(0.95)
    assert m.hd95_legacy(a, b) == pytest.approx(1.0)


def test_identical_masks(cases):
    _, g = cases["eroded"]
    assert m.case_metrics(g, g) == {"dice": 1.0, "jaccard": 1.0, "hd95": 0.0, "asd": 0.0}


def test_dice_jaccard_ravd_hand():
    p = np.array([1, 1, 1, 0, 0], bool)
    g = np.array([0, 1, 1, 1, 1], bool)
    assert m.dice(p, g) == pytest.approx(4 / 7)
    assert m.jaccard(p, g) == pytest.approx(2 / 5)
    assert m.ravd(p, g) == pytest.approx(0.25)  # medpy.ravd is signed (-0.25); the tables use |RAVD|
    assert m.dice(np.zeros(3), np.zeros(3)) == 0.0
    assert m.jaccard(np.zeros(3), np.zeros(3)) == 0.0
    assert math.isnan(m.ravd(p, np.zeros(5)))


def test_non_bool_inputs_are_cast():
    p = np.array([[0, 2], [3, 0]], np.uint8)
    g = np.array([[0.0, 0.5], [0.0, 0.0]])
    assert m.dice(p, g) == pytest.approx(2 / 3)


def test_uniform_spacing_scales(cases):
    p, g = cases["2d"]
    scaled = all_distances(p, g, (2.5, 2.5))
    assert scaled == pytest.approx(tuple(2.5 * v for v in all_distances(p, g)))


# --- empty masks ---------------------------------------------------------------------------------

SMALL = (10, 12, 8)


def small_ref() -> np.ndarray:
    g = np.zeros(SMALL, bool)
    g[2:6, 3:8, 1:5] = True
    return g


def test_empty_prediction_each_policy():
    g, e = small_ref(), np.zeros(SMALL, bool)
    diag = math.sqrt(10**2 + 12**2 + 8**2)
    assert m.case_metrics(e, g, empty_policy="legacy_zero") == {"dice": 0, "jaccard": 0, "hd95": 0, "asd": 0}
    nan = m.case_metrics(e, g, empty_policy="nan")
    assert (nan["dice"], nan["jaccard"]) == (0.0, 0.0)
    assert math.isnan(nan["hd95"]) and math.isnan(nan["asd"])
    pen = m.case_metrics(e, g, empty_policy="penalty")
    assert pen == pytest.approx({"dice": 0, "jaccard": 0, "hd95": diag, "asd": diag})
    pen_sp = m.case_metrics(e, g, spacing=(0.5, 1.0, 2.0), empty_policy="penalty")
    assert pen_sp["hd95"] == pytest.approx(math.sqrt(5**2 + 12**2 + 16**2))


def test_empty_reference_and_both_empty():
    g, e = small_ref(), np.zeros(SMALL, bool)
    diag = math.sqrt(10**2 + 12**2 + 8**2)
    # legacy_zero: a non-empty prediction of an empty reference is penalised, not rewarded.
    assert m.case_metrics(g, e) == pytest.approx({"dice": 0, "jaccard": 0, "hd95": diag, "asd": diag})
    assert m.case_metrics(e, e) == {"dice": 0, "jaccard": 0, "hd95": 0, "asd": 0}
    assert math.isnan(m.hd95_standard(g, e, empty_policy="nan"))
    assert m.assd(e, e, empty_policy="penalty") == pytest.approx(diag)
    assert m.hd95_legacy(e, g) == 0.0


def test_surface_distances_empty():
    g, e = small_ref(), np.zeros(SMALL, bool)
    assert m.surface_distances(e, g).shape == (0,)
    with pytest.raises(ValueError, match="no foreground"):
        m.surface_distances(g, e)


# --- errors --------------------------------------------------------------------------------------


def test_unknown_policy():
    g = small_ref()
    with pytest.raises(ValueError, match="legacy_zero, nan, penalty"):
        m.case_metrics(g, g, empty_policy="zero")
    with pytest.raises(ValueError, match="valid"):
        m.hd95_legacy(g, g, empty_policy="ignore")


def test_shape_mismatch():
    with pytest.raises(ValueError, match=r"\(3, 4\).*\(4, 3\)"):
        m.case_metrics(np.ones((3, 4)), np.ones((4, 3)))
    with pytest.raises(ValueError, match="shape"):
        m.dice(np.ones((3, 4)), np.ones((3, 4, 1)))


def test_bad_spacing():
    g = small_ref()
    with pytest.raises(ValueError, match="spacing"):
        m.hd95_legacy(g, g, spacing=(1.0, 1.0))
    with pytest.raises(ValueError, match="spacing"):
        m.asd_legacy(g, g, spacing=(1.0, 0.0, 1.0))


# --- summarize and definitions -------------------------------------------------------------------


def test_summarize_ignores_nan():
    out = m.summarize(
        [{"dice": 0.5, "hd95": 2.0}, {"dice": 1.0, "hd95": math.nan}, {"dice": 0.0, "hd95": 4.0}]
    )
    assert out["dice"] == pytest.approx({"mean": 0.5, "std": np.std([0.5, 1.0, 0.0]), "n": 3})
    assert out["hd95"] == pytest.approx({"mean": 3.0, "std": 1.0, "n": 2})
    all_nan = m.summarize([{"asd": math.nan}])["asd"]
    assert all_nan["n"] == 0 and math.isnan(all_nan["mean"]) and math.isnan(all_nan["std"])
    assert m.summarize([]) == {}


def test_metric_definitions_cover_case_metrics():
    assert set(m.case_metrics(small_ref(), small_ref())) <= set(m.METRIC_DEFINITIONS)
    assert {"hd95_standard", "assd", "ravd"} <= set(m.METRIC_DEFINITIONS)
    assert m.EMPTY_POLICIES == ("legacy_zero", "nan", "penalty")


# --- properties ----------------------------------------------------------------------------------


def brute_directed(a: np.ndarray, b: np.ndarray, spacing: np.ndarray) -> np.ndarray:
    """Independent oracle: border by an explicit connectivity-1 neighbour test (zero outside the array),
    then all-pairs distances."""

    def border(x: np.ndarray) -> np.ndarray:
        padded = np.pad(x, 1)
        interior = np.ones_like(x)
        for axis in range(x.ndim):
            for step in (-1, 1):
                interior &= np.roll(padded, step, axis=axis)[tuple(slice(1, -1) for _ in range(x.ndim))]
        return x & ~interior

    pa, pb = np.argwhere(border(a)) * spacing, np.argwhere(border(b)) * spacing
    return cdist(pa, pb).min(axis=1)


mask_shapes = st.one_of(
    st.tuples(st.integers(1, 16), st.integers(1, 16)),
    st.tuples(st.integers(1, 8), st.integers(1, 8), st.integers(1, 8)),
)


@st.composite
def mask_pairs(draw) -> tuple[np.ndarray, np.ndarray]:
    shape = draw(mask_shapes)
    return draw(arrays(bool, shape)), draw(arrays(bool, shape))


PROPS = settings(max_examples=50, deadline=None)


@PROPS
@given(mask_pairs())
def test_overlap_properties(pair):
    p, g = pair
    d = m.dice(p, g)
    assert d == m.dice(g, p)
    assert 0.0 <= d <= 1.0
    assert m.jaccard(p, g) == pytest.approx(d / (2 - d))


@PROPS
@given(mask_pairs(), st.sampled_from(m.EMPTY_POLICIES))
def test_every_policy_never_crashes(pair, policy):
    p, g = pair
    out = m.case_metrics(p, g, empty_policy=policy)
    assert set(out) == {"dice", "jaccard", "hd95", "asd"}
    for value in out.values():
        assert math.isnan(value) or value >= 0.0
    if policy != "nan":
        assert not any(math.isnan(v) for v in out.values())


@PROPS
@given(mask_pairs(), st.lists(st.sampled_from([0.5, 1.0, 1.5, 3.0]), min_size=3, max_size=3))
def test_distances_match_brute_force(pair, spacing):
    p, g = pair
    if not (p.any() and g.any()):
        return
    s = np.array(spacing[: p.ndim])
    d_pg, d_gp = brute_directed(p, g, s), brute_directed(g, p, s)
    np.testing.assert_allclose(np.sort(m.surface_distances(p, g, s)), np.sort(d_pg), atol=1e-9)
    pooled = np.concatenate([d_pg, d_gp])
    hd_max = pooled.max()
    legacy, standard, asd, assd_ = all_distances(p, g, s)
    assert legacy == pytest.approx(np.percentile(pooled, 95))
    assert asd == pytest.approx(d_pg.mean()) and asd >= 0
    assert assd_ == pytest.approx(pooled.mean())
    assert 0 <= legacy <= hd_max + 1e-9 and 0 <= standard <= hd_max + 1e-9
    assert m.hd95_legacy(g, p, s) == pytest.approx(legacy)
    assert m.hd95_standard(g, p, s) == pytest.approx(standard)
    assert m.assd(g, p, s) == pytest.approx(assd_)


@PROPS
@given(mask_pairs(), st.integers(0, 3), st.integers(0, 3))
def test_zero_padding_keeps_distances(pair, before, after):
    """Padding with background never changes borders or distances (checks the bounding-box crop)."""
    p, g = pair
    if not (p.any() and g.any()):
        return
    pad = [(before, after)] * p.ndim
    assert all_distances(np.pad(p, pad), np.pad(g, pad)) == pytest.approx(all_distances(p, g))


@pytest.mark.la
def test_metrics_on_two_real_la_labels(la_root):
    """On real LA masks: exact identities, the shift bound, the crop shortcut and the empty policy."""
    from semiseg.data import open_dataset

    layout = open_dataset(la_root)
    for case_id in layout.test_ids[:2]:
        g = layout.read_eval(case_id).label.astype(bool)
        assert not g[:, :, :2].any() and not g[:, :, -2:].any()  # the z shift below moves no voxel off the grid
        assert m.case_metrics(g, g) == {"dice": 1.0, "jaccard": 1.0, "hd95": 0.0, "asd": 0.0}
        p = np.roll(g, 2, axis=2)  # the shift maps the border onto the border: every distance is at most 2
        d_pg = m.surface_distances(p, g)
        assert 0 < d_pg.max() <= 2 and 0 < m.hd95_legacy(p, g) <= 2 and 0 < m.asd_legacy(p, g) <= 2
        full = ndimage.distance_transform_edt(~m._border(g))[m._border(p)]  # no crop to the union box
        np.testing.assert_allclose(np.sort(d_pg), np.sort(full))
        assert m.case_metrics(np.zeros_like(g), g) == {"dice": 0, "jaccard": 0, "hd95": 0, "asd": 0}
