import numpy as np
import pytest

from cryodask.errors import UserError
from cryodask.geometry.healpix import angular_step, directions, max_pixel_radius
from cryodask.geometry.symmetry import (
    direction_vectors,
    in_asymmetric_unit,
    point_group,
    reduce_to_asymmetric_unit,
    symmetry_copies,
    symmetry_group,
)

GROUP_ORDERS = {
    "C1": 1, "C2": 2, "C4": 4, "C7": 7, "C13": 13, "D1": 2, "D2": 4, "D3": 6, "D7": 14,
    "T": 12, "O": 24, "I": 60, "I1": 60, "I2": 60, "I3": 60, "I4": 60,
}


def _rotation(axis, angle_deg):
    a = np.asarray(axis, float) / np.linalg.norm(axis)
    t = np.deg2rad(angle_deg)
    k = np.array([[0, -a[2], a[1]], [a[2], 0, -a[0]], [-a[1], a[0], 0]])
    return np.eye(3) + np.sin(t) * k + (1 - np.cos(t)) * k @ k


def _contains(group, m, tol=1e-6):
    return np.abs(group - m).max(axis=(1, 2)).min() < tol


def _angles(v):
    return np.rad2deg(np.arctan2(v[..., 1], v[..., 0])), np.rad2deg(np.arccos(np.clip(v[..., 2], -1, 1)))


@pytest.mark.parametrize("name,order", GROUP_ORDERS.items())
def test_group_order_identity_rotations(name, order):
    g = symmetry_group(name)
    assert g.shape == (order, 3, 3)
    assert np.array_equal(g[0], np.eye(3))
    assert np.allclose(g @ np.swapaxes(g, 1, 2), np.eye(3), atol=1e-12)
    assert np.allclose(np.linalg.det(g), 1.0, atol=1e-12)


@pytest.mark.parametrize("name", GROUP_ORDERS)
def test_closure_and_distinct(name):
    g = symmetry_group(name)
    prods = np.einsum("aij,bjk->abik", g, g).reshape(-1, 3, 3)
    # every product is one of the elements
    d = np.abs(prods[:, None] - g[None]).max(axis=(2, 3))
    assert d.min(axis=1).max() < 1e-6
    # no element twice
    dd = np.abs(g[:, None] - g[None]).max(axis=(2, 3)) + np.eye(len(g)) * 10
    assert dd.min() > 0.1


def test_relion_axes():
    # Generators from RELION's SymList::fill_symmetry_class (their rounded axes).
    assert _contains(symmetry_group("C4"), _rotation([0, 0, 1], 90))
    d2 = symmetry_group("D2")
    for axis in ([1, 0, 0], [0, 1, 0], [0, 0, 1]):
        assert _contains(d2, _rotation(axis, 180))
    assert _contains(symmetry_group("D7"), _rotation([1, 0, 0], 180))
    assert not _contains(symmetry_group("D7"), _rotation([0, 1, 0], 180))  # 7 is odd
    t = symmetry_group("T")
    assert _contains(t, _rotation([0, 0, 1], 120))
    assert _contains(t, _rotation([0, 0.816496, 0.577350], 180), tol=1e-5)
    o = symmetry_group("O")
    assert _contains(o, _rotation([0, 0, 1], 90))
    assert _contains(o, _rotation([1, 1, 1], 120))
    i2 = symmetry_group("I")
    assert np.array_equal(i2, symmetry_group("I2"))
    for axis in ([1, 0, 0], [0, 1, 0], [0, 0, 1]):  # I2: 2-folds on x, y and z
        assert _contains(i2, _rotation(axis, 180))
    assert _contains(i2, _rotation([0.525731114, 0, 0.850650807], 72))
    assert _contains(i2, _rotation([0, 0.356822076, 0.934172364], 120))
    assert not _contains(i2, _rotation([0, 0, 1], 72))  # no 5-fold along z in I2
    i1 = symmetry_group("I1")
    assert _contains(i1, _rotation([1, 0, 0], 180))
    assert _contains(i1, _rotation([0.85065080702670, 0, -0.5257311142635], 72))
    assert _contains(i1, _rotation([0.9341723640, 0.3568220765, 0], 120))
    i3 = symmetry_group("I3")
    assert _contains(i3, _rotation([0, 0, 1], 72))
    assert _contains(i3, _rotation([-0.5257311143, 0, 0.8506508070], 180))
    assert _contains(i3, _rotation([-0.4911234778630044, 0.3568220764705179, 0.7946544753759428], 120))
    i4 = symmetry_group("I4")
    assert _contains(i4, _rotation([0, 0, 1], 72))
    assert _contains(i4, _rotation([0.8944271932547096, 0, 0.4472135909903704], 72))
    assert _contains(i4, _rotation([0.5257311143, 0, 0.8506508070], 180))


def test_names():
    assert point_group("c4").name == "C4"
    assert point_group(" d7 ").name == "D7"
    assert point_group("i").name == "I"
    assert point_group("C13").n == 13
    for bad in ("C0", "D0", "X3", "D", "I5", "C100", "", "C4V", "O2"):
        with pytest.raises(UserError) as e:
            point_group(bad)
        assert e.value.where == "--sym"
        assert f"'{bad}'" in e.value.what and "C<n>, D<n>, T, O or I" in e.value.what


@pytest.mark.parametrize("name", GROUP_ORDERS)
def test_asymmetric_unit_tiles_the_sphere(name, rng):
    # RELION's geometric rule: exactly one symmetry copy of a generic direction is
    # inside (so the unit is 1/|G| of the sphere and the copies tile it).
    v = rng.normal(size=(4000, 3))
    v /= np.linalg.norm(v, axis=1, keepdims=True)
    rot, tilt = _angles(symmetry_copies(v, name))
    inside = in_asymmetric_unit(rot, tilt, name).sum(axis=0)
    assert np.all(inside == 1)


# Directions per order after reduction, from RELION 3.1's relion_refine (_sampling.star).
RELION_COUNTS = {
    "C2": [6, 24, 96, 384, 1536, 6176],
    "C3": [3, 14, 60, 248, 1003, 4086],
    "C4": [3, 12, 48, 192, 768, 3072],
    "C5": [1, 8, 35, 150, 598, 2438],
    "C7": [1, 5, 24, 106, 427, 1726],
    "C13": [1, 2, 9, 56, 214, 908, 3726],
    "D1": [7, 24, 96, 384, 1536],
    "D2": [4, 12, 48, 192, 768, 3072],
    "D3": [2, 8, 33, 129, 503, 2033],
    "D7": [1, 3, 13, 53, 218, 864, 3493],
    "T": [1, 3, 14, 59, 250, 1009, 4075],
    "O": [1, 1, 7, 32, 126, 507, 2037],
    "I": [0, 0, 2, 11, 48, 199, 809],
    "I1": [1, 1, 3, 12, 49, 199, 807],
    "I3": [0, 0, 4, 12, 53, 206, 820],
    "I4": [0, 1, 2, 11, 48, 196, 802],
}


@pytest.mark.parametrize("name", RELION_COUNTS)
def test_direction_counts_match_relion(name):
    counts = [len(directions(order, sym=name)[0]) for order in range(len(RELION_COUNTS[name]))]
    assert counts == RELION_COUNTS[name]


@pytest.mark.parametrize("name,order", [("C4", 3), ("C4", 4), ("D2", 3), ("D2", 4), ("O", 4), ("O", 5),
                                        ("I", 5), ("I", 6)])
def test_direction_counts_near_sphere_over_group(name, order):
    n = len(directions(order, sym=name)[0])
    assert n == pytest.approx(12 * 4**order / GROUP_ORDERS[name], rel=0.03)


@pytest.mark.parametrize("name", ["C1", "C4", "C7", "D2", "D7", "T", "O", "I", "I1", "I3", "I4"])
def test_reduced_grid_covers_sphere(name, rng):
    order = 3
    rot, tilt, _ = directions(order, sym=name)
    kept = direction_vectors(rot, tilt)
    v = rng.normal(size=(2000, 3))
    v /= np.linalg.norm(v, axis=1, keepdims=True)
    best = np.einsum("gni,ki->gnk", symmetry_copies(v, name), kept).max(axis=(0, 2))
    gap = np.rad2deg(np.arccos(np.clip(best, -1, 1))).max() / angular_step(order)
    # The full HEALPix grid is within 0.75 step of every direction; RELION's seams
    # (exact boundary tests) leave gaps of up to ~1.6 steps for C7, D7, I and I4.
    assert gap < (0.75 if name in ("C1", "C4", "D2") else 2.0)


@pytest.mark.parametrize("name", ["C4", "D3", "T", "O", "I"])
def test_no_symmetry_duplicates_after_seam_cleaning(name):
    order = 3
    rot, tilt, _ = directions(order, sym=name)
    v = direction_vectors(rot, tilt)
    cos = np.einsum("gni,ki->gnk", symmetry_copies(v, name), v)  # copy g of n vs k
    cos[0, np.arange(len(v)), np.arange(len(v))] = -1  # a direction and itself
    close = np.rad2deg(np.arccos(np.clip(cos.max(axis=0), -1, 1)))
    np.fill_diagonal(close, 180)
    assert close.min() > 0.5 * max_pixel_radius(order) - 1e-9


def test_reduce_keeps_input_order_and_subset():
    rot, tilt, pix = directions(2)
    keep = reduce_to_asymmetric_unit(rot, tilt, "D2", max_angle=0.5 * max_pixel_radius(2))
    assert np.all(np.diff(keep) > 0)
    assert np.array_equal(pix[keep], directions(2, sym="D2")[2])
