"""BackProjector: weights, adjointness with the projector, merging, Hermitian and point-group symmetry."""

from __future__ import annotations

import numpy as np
import pytest

from cryodask import backend
from cryodask.geometry.euler import euler_to_matrix
from cryodask.ops.backproject import BackProjector
from cryodask.ops.project import Projector, Projector2D, slice_pixels


def random_rotations(n: int, rng: np.random.Generator) -> np.ndarray:
    rot, psi = rng.uniform(-180, 180, n), rng.uniform(-180, 180, n)
    tilt = np.rad2deg(np.arccos(rng.uniform(-1, 1, n)))
    return euler_to_matrix(rot, tilt, psi)


def random_slices(n: int, box: int, rng: np.random.Generator) -> np.ndarray:
    return (rng.standard_normal((n, box, box // 2 + 1)) + 1j * rng.standard_normal((n, box, box // 2 + 1)))


def rot_z(deg: float) -> np.ndarray:
    a = np.deg2rad(deg)
    return np.array([[np.cos(a), -np.sin(a), 0], [np.sin(a), np.cos(a), 0], [0, 0, 1]])


def test_geometry_follows_r_max():
    bp = BackProjector.zeros(64)
    assert bp.data.shape == (131, 131, 66) and bp.radius == 64 and bp.half_extent == 65
    small = BackProjector.zeros(64, r_max=10)
    assert small.data.shape == (43, 43, 22) and small.r_max == 10
    assert BackProjector.zeros(64, pad=1).data.shape == (67, 67, 34)
    assert bp.data.dtype == np.complex64 and bp.weight.dtype == np.float32
    assert BackProjector.zeros(8, double=True).data.dtype == np.complex128


def test_weights_sum_to_pixel_count(rng):
    box = 32
    bp = BackProjector.zeros(box, double=True)
    rots = random_rotations(5, rng)
    bp.insert(random_slices(5, box, rng), rots)
    n_pix = slice_pixels(box, box // 2, skip_redundant=True)[0].shape[0]
    assert np.isclose(bp.weight.sum(), 5 * n_pix)
    # explicit weights scale the accumulated weight; weights <= 0 are skipped
    bp2 = BackProjector.zeros(box, double=True)
    w = np.full((5, box, box // 2 + 1), 2.5)
    w[:, :, 3] = -1.0
    bp2.insert(random_slices(5, box, rng), rots, weights=w)
    n_neg = np.count_nonzero(np.isin(slice_pixels(box, box // 2, skip_redundant=True)[0] % (box // 2 + 1), [3]))
    assert np.isclose(bp2.weight.sum(), 5 * 2.5 * (n_pix - n_neg))


def test_insertion_is_adjoint_of_projection(rng):
    """Re <S, P V> = Re <B S, V>: trilinear splatting is the adjoint of trilinear sampling."""
    box = 24
    bp = BackProjector.zeros(box, double=True)
    vgrid = rng.standard_normal(bp.data.shape) + 1j * rng.standard_normal(bp.data.shape)
    proj = Projector(data=vgrid, ori_size=box, pad=bp.pad, r_max=box // 2, power_spectrum=None)
    rots = random_rotations(7, rng)
    s = random_slices(7, box, rng)
    # the kx = 0, ky < 0 pixels are not inserted (Friedel mates); leave them out of both sides
    s[:, box // 2 + 1:, 0] = 0
    bp.insert(s, rots)
    lhs = np.real(np.vdot(s, proj.project(rots)))
    rhs = np.real(np.vdot(bp.data, vgrid))
    assert np.isclose(lhs, rhs, rtol=1e-10)


def test_merge_equals_single_pass(rng):
    box = 24
    rots = random_rotations(10, rng)
    s = random_slices(10, box, rng)
    w = rng.uniform(0.1, 2, s.shape)
    whole = BackProjector.zeros(box, double=True)
    whole.insert(s, rots, weights=w)
    a = BackProjector.zeros(box, double=True)
    b = BackProjector.zeros(box, double=True)
    a.insert(s[:4], rots[:4], weights=w[:4])
    b.insert(s[4:], rots[4:], weights=w[4:])
    c = a + b
    a += b
    for m in (a, c):
        assert np.allclose(m.data, whole.data) and np.allclose(m.weight, whole.weight)
    with pytest.raises(ValueError):
        a.merge(BackProjector.zeros(16))


def test_hermitian_symmetry_of_x0_plane(rng):
    box = 24
    bp = BackProjector.zeros(box, double=True)
    bp.insert(random_slices(6, box, rng), random_rotations(6, rng))
    sym = bp.symmetrised()
    assert sym.is_symmetrised and not bp.is_symmetrised
    d0, w0 = sym.data[:, :, 0], sym.weight[:, :, 0]
    h = sym.half_extent
    off = np.ones_like(w0, dtype=bool)
    off[h, h] = False
    assert np.allclose(d0[off], np.conj(d0[::-1, ::-1][off]))
    assert np.allclose(w0, w0[::-1, ::-1])
    # each pair holds the sum of both, the origin is left alone
    raw0 = bp.weight[:, :, 0]
    assert np.isclose(w0[h, h + 3], raw0[h, h + 3] + raw0[h, h - 3])
    assert w0[h, h] == raw0[h, h]
    with pytest.raises(ValueError):
        sym.insert(random_slices(1, box, rng), random_rotations(1, rng))


@pytest.mark.parametrize("order", [2, 4])
def test_point_group_equals_inserting_symmetry_copies(rng, order):
    """Cn about z maps the grid onto itself, so symmetrising is exact: it equals inserting A·R for each R."""
    box = 24
    mats = [rot_z(360.0 * i / order) for i in range(order)]  # identity first, as symmetry groups list it
    rots = random_rotations(5, rng)
    s = random_slices(5, box, rng)
    w = rng.uniform(0.5, 1.5, s.shape)
    one = BackProjector.zeros(box, double=True)
    one.insert(s, rots, weights=w)
    got = one.symmetrised(mats)
    copies = BackProjector.zeros(box, double=True)
    for m in mats:
        copies.insert(s, rots @ m, weights=w)
    want = copies.symmetrised()
    inside = got.radius2() <= got.radius ** 2
    inside = np.broadcast_to(inside, got.weight.shape)
    assert np.allclose(got.weight[inside], want.weight[inside], atol=1e-9)
    assert np.allclose(got.data[inside], want.data[inside], atol=1e-9)
    # a symmetry-group object or a name works too
    from cryodask.geometry.symmetry import point_group

    by_name = one.symmetrised(f"C{order}")
    assert np.allclose(by_name.weight, got.weight, atol=1e-9)
    assert np.allclose(one.symmetrised(point_group(f"C{order}")).data, got.data, atol=1e-9)


def test_windowed_slices_insert_like_full_ones(rng):
    """A (box 16) window of a box-32 slice inserts exactly like the full slice cut at r_max 8."""
    from cryodask.ops.filters import window_fourier

    rots = random_rotations(4, rng)
    s = random_slices(4, 32, rng)
    full = BackProjector.zeros(32, r_max=8, double=True)
    full.insert(s, rots)
    small = BackProjector.zeros(32, r_max=8, double=True)
    small.insert(window_fourier(s, 16, 2), rots)
    assert np.allclose(full.weight, small.weight) and np.allclose(full.data, small.data)


def test_2d_accumulators_are_adjoint_to_in_plane_rotation(rng):
    box = 24
    bp = BackProjector.zeros(box, ndim=2, double=True)
    assert bp.data.shape == (51, 26) and bp.ndim == 2
    grid = rng.standard_normal(bp.data.shape) + 1j * rng.standard_normal(bp.data.shape)
    proj = Projector2D(data=grid[None], ori_size=box, pad=bp.pad, r_max=box // 2, power_spectrum=None)
    psi = rng.uniform(-180, 180, 9)
    s = random_slices(9, box, rng)
    s[:, box // 2 + 1:, 0] = 0
    bp.insert(s, psi)
    assert np.isclose(np.real(np.vdot(s, proj.project(psi)[0])), np.real(np.vdot(bp.data, grid)), rtol=1e-10)
    sym = bp.symmetrised()
    h = sym.half_extent
    assert np.allclose(sym.data[h + 1:, 0], np.conj(sym.data[h - 1::-1, 0]))
    with pytest.raises(ValueError):
        bp.symmetrised("C2")


@pytest.mark.gpu
def test_gpu_matches_cpu(rng):
    cupy = pytest.importorskip("cupy")
    if not backend.gpu_available():
        pytest.skip("no GPU")
    box = 32
    rots = random_rotations(30, rng)
    s = random_slices(30, box, rng).astype(np.complex64)
    cpu = BackProjector.zeros(box)
    cpu.insert(s, rots)
    gpu = BackProjector.zeros(box, xp=cupy)
    gpu.insert(cupy.asarray(s), cupy.asarray(rots))
    assert np.allclose(backend.to_numpy(gpu.weight), cpu.weight, atol=1e-4)
    assert np.allclose(backend.to_numpy(gpu.data), cpu.data, atol=1e-3)
    assert np.allclose(backend.to_numpy(gpu.reconstruct()), cpu.reconstruct(), atol=1e-4)


def test_insert_pixels_equals_inserting_whole_slices(rng):
    # the E-step's path: values at a list of pixels within a radius, the kx = 0, ky < 0 mates left out
    box, r = 32, 11.0
    rots = euler_to_matrix(*rng.uniform(-180, 180, (3, 4)))
    flat, kx, ky = slice_pixels(box, r)
    vals = (rng.standard_normal((4, len(flat))) + 1j * rng.standard_normal((4, len(flat)))).astype(np.complex64)
    wts = rng.uniform(0, 2, (4, len(flat))).astype(np.float32)
    wts[:, ::7] = 0.0  # skipped, as in insert
    slices = np.zeros((4, box * (box // 2 + 1)), np.complex64)
    weights = np.zeros((4, box * (box // 2 + 1)), np.float32)
    slices[:, flat], weights[:, flat] = vals, wts
    whole = BackProjector.zeros(box, r_max=r)
    whole.insert(slices.reshape(4, box, -1), rots, weights=weights.reshape(4, box, -1))
    listed = BackProjector.zeros(box, r_max=r)
    keep = ~((kx == 0) & (ky < 0))
    listed.insert_pixels(vals[:, keep], rots, wts[:, keep], kx[keep], ky[keep])
    assert np.abs(whole.data).max() > 0
    np.testing.assert_array_equal(listed.data, whole.data)
    np.testing.assert_array_equal(listed.weight, whole.weight)
