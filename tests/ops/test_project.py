"""Projector: projection-slice theorem, exact grid cases, normalisation, windows, RELION parity."""

from __future__ import annotations

import subprocess

import mrcfile
import numpy as np
import pytest
from scipy.ndimage import map_coordinates

from cryodask import backend
from cryodask.geometry.euler import euler_to_matrix
from cryodask.ops.filters import phase_shift, window_fourier
from cryodask.ops.project import (Projector, Projector2D, grid_correct, in_plane_rotations, project_2d, project_images,
                                  slice_pixels)


def blob_phantom(box: int, rng: np.random.Generator, n_blobs: int = 7) -> np.ndarray:
    """A smooth, asymmetric sum of Gaussian blobs well inside the box."""
    c = np.arange(box) - box // 2
    z, y, x = np.meshgrid(c, c, c, indexing="ij")
    vol = np.zeros((box,) * 3)
    for _ in range(n_blobs):
        cen = rng.uniform(-box / 5, box / 5, 3)
        s = rng.uniform(box / 32, box / 16)
        vol += rng.uniform(0.5, 1.5) * np.exp(-((x - cen[0]) ** 2 + (y - cen[1]) ** 2 + (z - cen[2]) ** 2) / (2 * s * s))
    return vol


def random_rotations(n: int, rng: np.random.Generator) -> np.ndarray:
    rot, psi = rng.uniform(-180, 180, n), rng.uniform(-180, 180, n)
    tilt = np.rad2deg(np.arccos(rng.uniform(-1, 1, n)))
    return euler_to_matrix(rot, tilt, psi)


def real_space_projection(vol: np.ndarray, a: np.ndarray) -> np.ndarray:
    """p[y, x] = sum_z V(A^T (x, y, z)) by linear interpolation (independent of the Fourier code)."""
    box = vol.shape[0]
    c = np.arange(box) - box // 2
    x, y, z = np.meshgrid(c, c, c, indexing="xy")  # arrays indexed [y, x, z]
    pts = np.stack([x, y, z], axis=-1) @ a  # row vectors: p @ A = (A^T p)^T
    coords = [pts[..., 2] + box // 2, pts[..., 1] + box // 2, pts[..., 0] + box // 2]
    return map_coordinates(vol, coords, order=1, mode="constant").sum(axis=-1)


def to_images(slices: np.ndarray, box: int) -> np.ndarray:
    return np.fft.fftshift(backend.irfftn(slices, (box, box), axes=(-2, -1)), axes=(-2, -1))


@pytest.mark.parametrize("pad", [2, 1])
def test_projection_slice_theorem(rng, pad):
    box = 64
    vol = blob_phantom(box, rng)
    rots = random_rotations(5, rng)
    images = to_images(Projector.from_map(vol, pad=pad).project(rots), box)
    for a, img in zip(rots, images):
        ref = real_space_projection(vol, a)
        corr = np.corrcoef(ref.ravel(), img.ravel())[0, 1]
        assert corr > (0.999 if pad == 2 else 0.99), corr


def test_exact_on_grid_rotations(rng):
    """Rotations by multiples of 90 deg about z sample grid points: slices are exact transforms."""
    box = 32
    vol = rng.standard_normal((box,) * 3)
    proj = Projector.from_map(vol, pad=2, do_gridding=False, double=True)
    img_z = vol.sum(axis=0)  # [y, x]
    expected = backend.rfftn(np.fft.ifftshift(img_z), axes=(0, 1))
    got = proj.project(np.eye(3)[None])[0]
    flat, _, _ = slice_pixels(box, box // 2)
    assert np.allclose(got.reshape(-1)[flat], expected.reshape(-1)[flat], atol=1e-12)
    # rot = 90: A^T (x, y, z) = (-y, x, z), so image[y, x] = P[Y = x, X = -y]
    img90 = to_images(proj.project(euler_to_matrix(90.0, 0.0, 0.0)[None]), box)[0]
    lowpass = to_images(got[None], box)[0]  # the same disc of frequencies, unrotated
    c = box // 2
    idx = np.arange(1, box)  # skip the unpaired -box/2 row/column
    for yy in idx[::5]:
        for xx in idx[::5]:
            assert np.isclose(img90[yy, xx], lowpass[xx, 2 * c - yy], atol=1e-9)


def test_hermitian_half_column_and_realness(rng):
    vol = blob_phantom(32, rng)
    s = Projector.from_map(vol).project(random_rotations(3, rng))
    col = s[:, :, 0]
    ky = np.arange(1, 16)
    assert np.allclose(col[:, ky], np.conj(col[:, -ky]), atol=1e-4 * np.abs(col).max())


def test_power_spectrum_of_white_noise(rng):
    """|V|^2 per shell is sigma^2 / N for white noise (forward FFT divided by N^3, times pad^3 N)."""
    box, sigma = 48, 2.0
    vol = rng.normal(0, sigma, (box,) * 3)
    proj = Projector.from_map(vol, do_gridding=False, double=True)
    ps = proj.power_spectrum
    assert ps.shape == (box // 2 + 1,)
    expect = sigma ** 2 / (2 * box)
    assert np.allclose(ps[3:box // 2].mean(), expect, rtol=0.03)
    assert np.all(np.abs(ps[3:box // 2] / expect - 1) < 0.3)


def test_r_max_and_windowed_box(rng):
    vol = blob_phantom(48, rng)
    rots = random_rotations(4, rng)
    proj = Projector.from_map(vol)
    full = proj.project(rots)
    limited = Projector.from_map(vol, r_max=10).project(rots)
    ky = np.fft.fftfreq(48, 1 / 48)[:, None]
    kx = np.arange(25)[None, :]
    outside = kx ** 2 + ky ** 2 > 100
    assert np.all(limited[:, outside] == 0)
    inner = kx ** 2 + ky ** 2 <= 64  # away from the truncation edge the two agree
    assert np.allclose(limited[:, inner], full[:, inner], rtol=1e-5, atol=1e-6 * np.abs(full).max())
    # a smaller output box is the windowed transform (RELION's current_size)
    small = proj.project(rots, box=24, r_max=12)
    windowed = window_fourier(proj.project(rots, r_max=12), 24, 2)
    assert np.allclose(small, windowed)


def test_grid_correct_is_sinc_squared():
    vol = np.ones((16, 16, 16))
    g = grid_correct(vol, 2)
    assert g[8, 8, 8] == 1.0
    r = 5.0 / 32
    assert np.isclose(g[8, 8, 13], 1.0 / (np.sin(np.pi * r) / (np.pi * r)) ** 2)


def test_float32_default_and_double(rng):
    vol = blob_phantom(32, rng)
    rots = random_rotations(2, rng)
    s32 = Projector.from_map(vol).project(rots)
    s64 = Projector.from_map(vol, double=True).project(rots)
    assert s32.dtype == np.complex64 and s64.dtype == np.complex128
    assert np.allclose(s32, s64, atol=1e-5 * np.abs(s64).max())


def test_projector_data_is_c_contiguous(rng):
    """The compiled gathers read the map in place; a map in another memory order is copied whole on every
    call (at box 128 that was 40 % of a refine3d iteration's time)."""
    p3 = Projector.from_map(blob_phantom(32, rng))
    p2 = Projector2D.from_images(rng.standard_normal((3, 32, 32)))
    assert p3.data.flags.c_contiguous and p2.data.flags.c_contiguous


def _write_relion_star(path, angles, origins_px, pixel_size, box, image_names):
    lines = ["", "# version 30001", "", "data_optics", "", "loop_",
             "_rlnOpticsGroup #1", "_rlnOpticsGroupName #2", "_rlnImagePixelSize #3", "_rlnImageSize #4",
             "_rlnImageDimensionality #5", "_rlnVoltage #6", "_rlnSphericalAberration #7",
             "_rlnAmplitudeContrast #8", f"1 opticsGroup1 {pixel_size} {box} 2 300 2.7 0.1", "", "",
             "# version 30001", "", "data_particles", "", "loop_",
             "_rlnAngleRot #1", "_rlnAngleTilt #2", "_rlnAnglePsi #3", "_rlnOriginXAngst #4",
             "_rlnOriginYAngst #5", "_rlnOpticsGroup #6", "_rlnImageName #7"]
    for (r, t, p), (ox, oy), name in zip(angles, origins_px, image_names):
        lines.append(f"{r:.6f} {t:.6f} {p:.6f} {ox * pixel_size:.6f} {oy * pixel_size:.6f} 1 {name}")
    path.write_text("\n".join(lines) + "\n")


@pytest.mark.relion
def test_parity_with_relion_project(relion, tmp_path, rng):
    """relion_project of the same map and angles, origins included: RELION's sign is pinned here."""
    box, apix = 48, 1.5
    vol = blob_phantom(box, rng).astype(np.float32)
    with mrcfile.new(tmp_path / "map.mrc") as m:
        m.set_data(vol)
        m.voxel_size = apix
    n = 6
    angles = np.stack([rng.uniform(-180, 180, n), rng.uniform(0, 180, n), rng.uniform(-180, 180, n)], axis=1)
    origins = np.zeros((n, 2))
    origins[-2:] = [[3.0, -2.0], [-1.5, 2.5]]  # pixels
    _write_relion_star(tmp_path / "ang.star", angles, origins, apix, box, [f"{i + 1:06d}@x.mrcs" for i in range(n)])
    subprocess.run([str(relion / "relion_project"), "--i", "map.mrc", "--ang", "ang.star", "--o", "proj",
                    "--angpix", str(apix)], cwd=tmp_path, check=True, capture_output=True)
    theirs = mrcfile.read(tmp_path / "proj.mrcs").astype(np.float64)
    rots = euler_to_matrix(angles[:, 0], angles[:, 1], angles[:, 2])
    slices = Projector.from_map(vol, double=True).project(rots)
    # an image with origin o shows the particle moved by -o
    ours = to_images(phase_shift(slices, -origins), box)
    for a, b in zip(ours, theirs):
        fa, fb = np.fft.rfft2(a), np.fft.rfft2(b)
        corr = np.real(np.vdot(fa, fb)) / np.sqrt(np.vdot(fa, fa).real * np.vdot(fb, fb).real)
        assert corr > 0.9999, corr
        assert np.abs(a - b).max() < 1e-4 * np.abs(b).max()
    # the convenience wrapper makes the same images (float32, the whole padded transform as relion_project)
    imgs = project_images(vol, angles[:, 0], angles[:, 1], angles[:, 2], origins=origins)
    assert imgs.dtype == np.float32 and np.abs(imgs - theirs).max() < 1e-4 * np.abs(theirs).max()
    # and the opposite sign is clearly wrong
    wrong = to_images(phase_shift(slices[-2:], origins[-2:]), box)
    assert np.corrcoef(wrong[0].ravel(), theirs[-2].ravel())[0, 1] < 0.9


def test_2d_rotation_equals_3d_projection_about_z(rng):
    """Without gridding, rotating the z-projection in-plane is exactly the 3D slice at (0, 0, psi)."""
    vol = rng.standard_normal((32, 32, 32))
    psi = np.array([0.0, 17.0, 90.0, -133.0])
    a = euler_to_matrix(0 * psi, 0 * psi, psi)
    three = Projector.from_map(vol, do_gridding=False, double=True).project(a)
    two = Projector2D.from_images(vol.sum(axis=0), do_gridding=False, double=True)
    assert np.allclose(two.project(psi)[0], three, atol=1e-12)
    assert np.allclose(two.project(a)[0], three, atol=1e-12)  # 3x3 matrices: upper-left block
    assert np.allclose(in_plane_rotations(psi), a[:, :2, :2])


def test_2d_rotation_matches_real_space(rng):
    box = 64
    c = np.arange(box) - box // 2
    y, x = np.meshgrid(c, c, indexing="ij")
    refs = np.zeros((2, box, box))
    for k in range(2):
        for _ in range(5):
            cx, cy = rng.uniform(-12, 12, 2)
            refs[k] += np.exp(-((x - cx) ** 2 + (y - cy) ** 2) / (2 * rng.uniform(2, 4) ** 2))
    psi = np.array([23.0, 150.0, -70.0])
    rotated = np.fft.fftshift(backend.irfftn(project_2d(refs, psi), (box, box), axes=(-2, -1)), axes=(-2, -1))
    assert rotated.shape == (2, 3, box, box)
    for k in range(2):
        for j, p in enumerate(psi):
            cs, sn = np.cos(np.deg2rad(p)), np.sin(np.deg2rad(p))
            # image(x, y) = ref(A^T (x, y)) with A = [[c, s], [-s, c]]
            ref_x, ref_y = cs * x - sn * y, sn * x + cs * y
            want = map_coordinates(refs[k], [ref_y + box // 2, ref_x + box // 2], order=1)
            assert np.corrcoef(want.ravel(), rotated[k, j].ravel())[0, 1] > 0.999


def test_2d_power_spectrum_of_white_noise(rng):
    box, sigma = 64, 1.5
    proj = Projector2D.from_images(rng.normal(0, sigma, (3, box, box)), do_gridding=False, double=True)
    ps = proj.power_spectrum
    assert ps.shape == (3, box // 2 + 1)
    assert np.allclose(ps[:, 3:box // 2].mean(axis=1), sigma ** 2 / (2 * box * box), rtol=0.05)


@pytest.mark.gpu
def test_gpu_matches_cpu(rng):
    cupy = pytest.importorskip("cupy")
    if not backend.gpu_available():
        pytest.skip("no GPU")
    vol = blob_phantom(32, rng)
    rots = random_rotations(20, rng)
    cpu = Projector.from_map(vol).project(rots)
    gpu = Projector.from_map(cupy.asarray(vol)).project(rots)
    assert np.allclose(backend.to_numpy(gpu), cpu, atol=1e-5 * np.abs(cpu).max())
