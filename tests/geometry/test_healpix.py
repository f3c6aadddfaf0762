import math
import warnings

import numpy as np
import pytest

from cryodask.errors import UserError
from cryodask.geometry.euler import euler_to_matrix
from cryodask.geometry.healpix import (
    angular_step,
    child_pixels,
    child_psi,
    directions,
    healpix_sampling,
    local_directions,
    local_psi,
    local_subset,
    max_pixel_radius,
    n_directions,
    n_psi,
    nest_z_phi,
    next_random_perturbation,
    orientation_grid,
    oversample,
    perturbation_matrix,
    pixel_directions,
    psi_angles,
)
from cryodask.geometry.symmetry import direction_vectors, symmetry_copies


def _angle_between(v, w):
    return np.rad2deg(np.arccos(np.clip(np.sum(v * w, axis=-1), -1, 1)))


def _rotation_angle(m):
    return np.rad2deg(np.arccos(np.clip((np.trace(m, axis1=-2, axis2=-1) - 1) / 2, -1, 1)))


def test_angular_step_table():
    assert [angular_step(o) for o in range(6)] == [60.0, 30.0, 15.0, 7.5, 3.75, 1.875]
    assert [n_psi(o) for o in range(8)] == [6, 12, 24, 48, 96, 192, 384, 768]
    assert np.array_equal(psi_angles(3), np.arange(48) * 7.5)
    assert len(psi_angles(2, psi_step=7)) == 52  # ceil(360 / 7), step 360 / 52
    assert psi_angles(2, psi_step=7)[1] == pytest.approx(360 / 52)


@pytest.mark.parametrize("order", range(8))
def test_full_sphere_counts_and_astropy(order):
    from astropy_healpix import healpy as hp

    assert n_directions(order) == 12 * 4**order
    rot, tilt, pix = directions(order)
    assert len(rot) == 12 * 4**order and np.array_equal(pix, np.arange(12 * 4**order))
    theta, phi = hp.pix2ang(2**order, pix, nest=True)
    z, phi2 = nest_z_phi(order, pix)
    assert np.allclose(z, np.cos(theta), atol=1e-13) and np.allclose(phi2, phi, atol=1e-12)
    assert np.all((rot > -180) & (rot <= 180)) and np.all((tilt >= 0) & (tilt <= 180))
    assert np.allclose(direction_vectors(rot, tilt), np.transpose(hp.ang2vec(theta, phi)), atol=1e-12)


def test_first_pixels_order2():
    rot, tilt = pixel_directions(2, [0, 1, 3, 191])
    # pixel 0 of order 2 is at (45, 80.405932) in RELION's _sampling.star
    assert rot[0] == 45.0 and tilt[0] == pytest.approx(80.405932, abs=1e-6)
    assert rot[1] == pytest.approx(56.25) and tilt[2] == pytest.approx(60.0)
    # rot is wrapped into (-180, 180]
    assert rot[3] < 0


def test_matches_relion_tutorial_sampling(shared_data):
    import starfile

    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        star = starfile.read(shared_data / "star/starfile/relion_tutorial/run_it025_sampling_3D.star")
    general, dirs = star["sampling_general"], star["sampling_directions"]
    assert int(general["rlnHealpixOrder"]) == 2 and general["rlnSymmetryGroup"] == "C1"
    s = healpix_sampling(2, sym="C1")
    assert s.psi_step == float(general["rlnPsiStep"])
    assert len(dirs) == s.n_directions == 192
    assert np.allclose(dirs["rlnAngleRot"], s.rot, atol=1e-5)
    assert np.allclose(dirs["rlnAngleTilt"], s.tilt, atol=1e-5)


@pytest.mark.parametrize("order", [1, 2, 3, 4, 5])
def test_nearest_neighbour_spacing_is_the_step(order):
    from scipy.spatial import cKDTree

    rot, tilt, _ = directions(order)
    v = direction_vectors(rot, tilt)
    dist, _ = cKDTree(v).query(v, k=2)
    nn = np.rad2deg(2 * np.arcsin(dist[:, 1] / 2)) / angular_step(order)
    assert 0.94 < np.median(nn) < 0.99
    assert nn.min() > 0.78 and nn.max() < 1.02


def test_max_pixel_radius():
    # HEALPix max_pixrad: every point of the sphere is this close to a pixel centre
    from astropy_healpix import healpy as hp

    assert max_pixel_radius(2) == pytest.approx(14.5, abs=0.1)
    rng = np.random.default_rng(0)
    v = rng.normal(size=(20000, 3))
    v /= np.linalg.norm(v, axis=1, keepdims=True)
    for order in (1, 3):
        pix = hp.vec2pix(2**order, v[:, 0], v[:, 1], v[:, 2], nest=True)
        centre = direction_vectors(*pixel_directions(order, pix))
        d = _angle_between(v, centre)
        assert d.max() <= max_pixel_radius(order) and d.max() > 0.9 * max_pixel_radius(order)


def test_child_pixels_relion_order():
    assert np.array_equal(child_pixels(5, 1), [20, 21, 22, 23])
    # os = 2: HEALPix y index outer, x inner (RELION's getOrientations)
    assert np.array_equal(child_pixels(0, 2), [0, 1, 4, 5, 2, 3, 6, 7, 8, 9, 12, 13, 10, 11, 14, 15])
    assert np.array_equal(np.sort(child_pixels(7, 3)), 7 * 64 + np.arange(64))
    assert child_pixels([1, 2], 1).shape == (2, 4)


@pytest.mark.parametrize("order,os_", [(1, 1), (2, 1), (2, 2), (3, 1), (4, 1)])
def test_child_directions_inside_parent(order, os_):
    from astropy_healpix import healpy as hp

    parents = np.arange(n_directions(order))
    kids = child_pixels(parents, os_)
    rot, tilt = pixel_directions(order + os_, kids.ravel())
    theta, phi = np.deg2rad(tilt), np.deg2rad(rot)
    assert np.array_equal(hp.ang2pix(2**order, theta, phi, nest=True), np.repeat(parents, 4**os_))
    d = _angle_between(direction_vectors(rot, tilt).reshape(kids.shape + (3,)),
                       direction_vectors(*pixel_directions(order, parents))[:, None])
    assert d.max() < max_pixel_radius(order) and d.max() < angular_step(order)


def test_child_psi():
    kids = child_psi([0.0, 7.5, 352.5], 7.5, 1)
    assert np.allclose(kids, [[-1.875, 1.875], [5.625, 9.375], [350.625, 354.375]])
    kids = child_psi(np.arange(48) * 7.5, 7.5, 3)
    assert kids.shape == (48, 8)
    assert np.allclose(kids.mean(axis=1), np.arange(48) * 7.5)
    assert np.allclose(np.diff(kids, axis=1), 7.5 / 8)
    assert np.all(np.abs(kids - (np.arange(48) * 7.5)[:, None]) < 7.5 / 2)


def test_orientation_grid_layout():
    g = orientation_grid(2, sym="D2")
    s = g.sampling
    assert s.n_directions == 48 and s.n_psi == 24 and len(g) == 48 * 24
    # direction-major: consecutive rows share the direction and step psi
    assert np.array_equal(g.dir_index, np.repeat(np.arange(48), 24))
    assert np.array_equal(g.psi_index, np.tile(np.arange(24), 48))
    assert np.array_equal(g.coarse_index, np.arange(48 * 24))
    assert np.array_equal(g.rot[:24], np.full(24, s.rot[0])) and np.array_equal(g.psi[:24], s.psi)
    m = g.matrices(np.float32)
    assert m.dtype == np.float32 and m.shape == (48 * 24, 3, 3)
    assert np.allclose(m, euler_to_matrix(g.rot, g.tilt, g.psi), atol=1e-6)
    # the projection direction is the third row of the matrix
    assert np.allclose(m[:, 2], direction_vectors(g.rot, g.tilt), atol=1e-6)
    sub = s.orientations([5, 30])
    assert np.array_equal(sub.dir_index, [0, 1]) and np.array_equal(sub.psi_index, [5, 6])
    with pytest.raises(ValueError):
        orientation_grid(6)  # 49,152 x 384 orientations must be asked for explicitly
    with pytest.raises(IndexError):
        s.orientations([48 * 24])


def test_oversample_children():
    g = orientation_grid(2)
    rows = np.array([0, 100, 4607])
    fine = oversample(g, rows, 1)
    assert len(fine) == 3 * 8 and fine.order == 3 and fine.oversampling == 1
    assert np.array_equal(fine.coarse_index, np.repeat(g.coarse_index[rows], 8))
    # per coarse sample: 4 child directions (NEST 4p..4p+3), each with 2 psi values
    assert np.array_equal(fine.pixel[:8], np.repeat(4 * g.pixel[0] + np.arange(4), 2))
    assert np.allclose(fine.psi[:8], np.tile([-3.75, 3.75], 4))
    assert np.allclose(fine.psi[-8:], np.tile([345 - 3.75, 345 + 3.75], 4))
    # children average to their parent's psi, their directions lie in the parent pixel
    assert np.allclose(fine.psi.reshape(3, 8).mean(axis=1), g.psi[rows])
    d = _angle_between(direction_vectors(fine.rot, fine.tilt).reshape(3, 8, 3),
                       direction_vectors(g.rot[rows], g.tilt[rows])[:, None])
    assert d.max() < angular_step(2)
    fine2 = g.sampling.oversample(g.coarse_index[rows], 2)
    assert len(fine2) == 3 * 64
    assert np.allclose(fine2.psi[:4], np.arange(-3 * 15 / 8, 15 / 2, 15 / 4))
    with pytest.raises(ValueError):
        oversample(fine, [0], 1)


def test_next_random_perturbation():
    a = [next_random_perturbation(0.0, 0.5, seed) for seed in (1, 1, 2)]
    assert a[0] == a[1] and a[0] != a[2]
    rng = np.random.default_rng(3)
    x, values = 0.0, []
    for _ in range(200):
        y = next_random_perturbation(x, 0.5, rng)
        step = (y - x) % 1.0  # added 0.25..0.5, then wrapped into [-0.5, 0.5]
        assert 0.25 <= step <= 0.5 + 1e-12
        x = y
        values.append(y)
    assert min(values) >= -0.5 and max(values) <= 0.5 and min(values) < -0.3 and max(values) > 0.3
    assert next_random_perturbation(0.3, 0.0, 1) == 0.0
    with pytest.raises(UserError):
        next_random_perturbation(0.0, 1.5, 1)


def test_perturbed_grid_is_one_rotation_of_the_grid():
    plain = orientation_grid(2, sym="C4")
    rp = next_random_perturbation(0.0, 0.5, 11)
    pert = orientation_grid(2, sym="C4", random_perturbation=rp)
    again = orientation_grid(2, sym="C4", random_perturbation=next_random_perturbation(0.0, 0.5, 11))
    other = orientation_grid(2, sym="C4", random_perturbation=next_random_perturbation(0.0, 0.5, 12))
    assert np.array_equal(pert.rot, again.rot) and np.array_equal(pert.psi, again.psi)
    assert not np.allclose(pert.rot, other.rot)
    a, b = plain.matrices(), pert.matrices()
    r = np.swapaxes(a, 1, 2) @ b  # A_pert = A @ R with the same R for every sample
    assert np.allclose(r, r[0], atol=1e-9)
    assert np.allclose(r[0], perturbation_matrix(rp, 2), atol=1e-9)
    angle = _rotation_angle(r[0])
    assert 0 < angle <= 3 * abs(rp) * 15 + 1e-9  # R = Euler(p, p, p), p = rp * 15 deg
    # oversampled children are perturbed by the same rotation
    fine = pert.sampling.oversample([0, 7], 1)
    fine0 = plain.sampling.oversample([0, 7], 1)
    assert np.allclose(np.swapaxes(fine0.matrices(), 1, 2) @ fine.matrices(), r[0], atol=1e-9)


def test_limit_tilt():
    rot, tilt, _ = directions(3)
    t = np.minimum(tilt, 180 - tilt)
    _, side, _ = directions(3, limit_tilt=30)
    _, top, _ = directions(3, limit_tilt=-30)
    assert len(side) == np.sum(t >= 30) == 648  # RELION: 648
    assert len(top) == np.sum(t <= 30) == 120  # RELION: 120
    assert np.minimum(side, 180 - side).min() >= 30 and np.minimum(top, 180 - top).max() <= 30
    assert len(directions(3, limit_tilt=-91)[0]) == len(directions(3, limit_tilt=91)[0]) == 768
    assert len(directions(3, sym="D2", limit_tilt=60)[0]) == 104  # RELION: 104
    with pytest.raises(UserError):
        directions(3, limit_tilt=0)


def test_bad_order():
    for bad in (-1, 8, 2.5):
        with pytest.raises(UserError) as e:
            directions(bad)
        assert e.value.where == "--healpix_order"


def test_order7_is_cheap():
    s = healpix_sampling(7)
    assert s.n_directions == 196608 and s.n_psi == 768 and s.n_orientations == 196608 * 768


def _nearest_direction(s, rot, tilt):
    v = direction_vectors(rot, tilt)
    best = (symmetry_copies(s.direction_vectors(), s.sym) @ v).max(axis=0)
    return np.rad2deg(np.arccos(np.clip(best, -1, 1)))


@pytest.mark.parametrize("sym", ["C1", "C4", "D2", "O"])
def test_local_subset(sym):
    s = healpix_sampling(3, sym=sym)
    sigma = 5.0
    prior = (100.3, 63.1, 200.7)  # rot outside the C4/D2 asymmetric unit: needs symmetry
    dist = _nearest_direction(s, prior[0], prior[1])
    di, dl = local_directions(s, prior[0], prior[1], sigma_rot=sigma, sigma_tilt=sigma)
    assert np.array_equal(di, np.flatnonzero(dist < 3 * sigma))  # all within 3 sigma, and only those
    assert len(di) > 10
    assert di[np.argmax(dl)] == np.argmin(dist)  # the nearest direction has the largest prior
    assert np.allclose(dl, -dist[di] ** 2 / (2 * sigma**2) - np.log(np.exp(-dist[di] ** 2 / (2 * sigma**2)).sum()))
    pi, pl = local_psi(s, prior[2], sigma_psi=sigma)
    dpsi = np.abs((s.psi[pi] - prior[2] + 180) % 360 - 180)
    assert np.all(dpsi < 3 * sigma) and len(pi) == 4  # 15 deg window on a 7.5 deg grid
    idx, lp = local_subset(s, *prior, sigma_rot=sigma, sigma_tilt=sigma, sigma_psi=sigma)
    assert len(idx) == len(di) * len(pi)
    assert np.exp(lp).sum() == pytest.approx(1.0)
    best = s.orientations(idx[[np.argmax(lp)]])
    assert best.dir_index[0] == np.argmin(dist) and best.psi[0] == 202.5
    assert np.array_equal(idx[:len(pi)], di[0] * s.n_psi + pi)


def test_local_psi_wraps_and_falls_back():
    s = healpix_sampling(2)
    pi, _ = local_psi(s, -179.0, sigma_psi=5)  # -179 = 181: 180 and 195 are within 15 deg
    assert s.psi[pi].tolist() == [180.0, 195.0]
    pi, _ = local_psi(s, 352.0, sigma_psi=5)  # across 360: 345 (7 deg) and 0 (8 deg)
    assert s.psi[pi].tolist() == [0.0, 345.0]
    pi, pl = local_psi(s, 359.0, sigma_psi=0.1)  # nothing within 0.3 deg: nearest only
    assert np.array_equal(pi, [0]) and np.array_equal(pl, [0.0])
    pi, pl = local_psi(s, 10.0, sigma_psi=-1)
    assert len(pi) == 24 and np.allclose(pl, -math.log(24))


def test_local_directions_variants():
    s = healpix_sampling(3)
    di, dl = local_directions(s, 10, 50, sigma_rot=0.01, sigma_tilt=0.01)  # too narrow
    assert len(di) == 1 and di[0] == np.argmin(_nearest_direction(s, 10, 50)) and dl[0] == 0.0
    di, _ = local_directions(s, 10, 50, sigma_rot=-1, sigma_tilt=4)  # tilt only
    assert np.array_equal(di, np.flatnonzero(np.abs(s.tilt - 50) < 12))
    di, _ = local_directions(s, 10, 50, sigma_rot=4, sigma_tilt=-1)  # rot only: out of the rot=10 plane
    v = s.direction_vectors()
    off_plane = np.rad2deg(np.arcsin(np.abs(-np.sin(np.deg2rad(10)) * v[:, 0] + np.cos(np.deg2rad(10)) * v[:, 1])))
    assert np.array_equal(di, np.flatnonzero(off_plane < 12))
    di, dl = local_directions(s, 10, 50, sigma_rot=-1, sigma_tilt=-1)
    assert len(di) == 768 and np.allclose(dl, -math.log(768))


@pytest.mark.relion
@pytest.mark.parametrize("sym,order,extra", [
    ("C1", 2, ()), ("C7", 3, ()), ("D3", 3, ()), ("T", 3, ()), ("O", 3, ()), ("I", 3, ()),
    ("I1", 3, ()), ("I3", 3, ()), ("I4", 3, ()), ("C1", 3, ("--limit_tilt", "30")),
    ("D2", 3, ("--limit_tilt", "-30")),
])
def test_directions_and_perturbation_match_relion(relion_sampling, sym, order, extra):
    import starfile

    name = f"s_{sym}_{order}_{len(extra)}{'_'.join(extra)}"
    log, root = relion_sampling(name, healpix_order=order, sym=sym, extra=extra)
    limit = float(extra[1]) if extra else -91.0
    s = healpix_sampling(order, sym=sym, limit_tilt=limit)
    assert f"NrOrientations= {s.n_orientations}\n" in log
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        star = starfile.read(f"{root}_it001_sampling.star")
        pose = starfile.read(f"{root}_it001_data.star")["particles"]
    dirs = star["sampling_directions"]
    assert np.allclose(dirs["rlnAngleRot"], s.rot, atol=2e-6)
    assert np.allclose(dirs["rlnAngleTilt"], s.tilt, atol=2e-6)
    # RELION's chosen pose is an orientation of the grid perturbed by its instance
    rp = float(star["sampling_general"]["rlnSamplingPerturbInstance"])
    s = healpix_sampling(order, sym=sym, limit_tilt=limit, random_perturbation=rp)
    a = euler_to_matrix(pose["rlnAngleRot"][0], pose["rlnAngleTilt"][0], pose["rlnAnglePsi"][0])
    err = np.abs(s.orientations().matrices() - a).max(axis=(1, 2))
    assert err.min() < 1e-5 < np.partition(err, 1)[1]


@pytest.mark.relion
def test_oversampled_pose_matches_relion(relion_sampling):
    import starfile

    _, root = relion_sampling("os2", healpix_order=1, sym="D3", oversampling=2)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        rp = float(starfile.read(f"{root}_it001_sampling.star")["sampling_general"]["rlnSamplingPerturbInstance"])
        pose = starfile.read(f"{root}_it001_data.star")["particles"]
    s = healpix_sampling(1, sym="D3", random_perturbation=rp)
    fine = s.oversample(np.arange(s.n_orientations), 2)
    a = euler_to_matrix(pose["rlnAngleRot"][0], pose["rlnAngleTilt"][0], pose["rlnAnglePsi"][0])
    err = np.abs(fine.matrices() - a).max(axis=(1, 2))
    assert err.min() < 1e-5
