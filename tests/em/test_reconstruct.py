"""Reconstruction: recovery of maps from noiseless projections, regularisation formulas, RELION parity."""

from __future__ import annotations

import subprocess

import mrcfile
import numpy as np
import pytest

from cryodask import backend
from cryodask.analysis.fsc import fsc
from cryodask.em.mstep import (blob_fourier_profile, data_vs_prior, reconstruct, reconstruction_sigma2,
                               tau2_from_fsc)
from cryodask.geometry.euler import euler_to_matrix
from cryodask.ops.backproject import BackProjector
from cryodask.ops.ctf import ctf_2d
from cryodask.ops.filters import phase_shift
from cryodask.ops.project import Projector, Projector2D


def blob_phantom(box: int, rng: np.random.Generator, n_blobs: int = 8) -> np.ndarray:
    """Gaussian blobs of 0.8-2.5 px: sharp enough to carry power up to Nyquist (FSC there is meaningful)."""
    c = np.arange(box) - box // 2
    z, y, x = np.meshgrid(c, c, c, indexing="ij")
    vol = np.zeros((box,) * 3)
    for _ in range(n_blobs):
        cen = rng.uniform(-box / 5, box / 5, 3)
        s = rng.uniform(0.8, 2.5)
        vol += rng.uniform(0.5, 1.5) * np.exp(-((x - cen[0]) ** 2 + (y - cen[1]) ** 2 + (z - cen[2]) ** 2) / (2 * s * s))
    return vol.astype(np.float32)


def random_angles(n: int, rng: np.random.Generator) -> np.ndarray:
    rot, psi = rng.uniform(-180, 180, n), rng.uniform(-180, 180, n)
    tilt = np.rad2deg(np.arccos(rng.uniform(-1, 1, n)))
    return np.stack([rot, tilt, psi], axis=1)


def rotations(angles: np.ndarray) -> np.ndarray:
    return euler_to_matrix(angles[:, 0], angles[:, 1], angles[:, 2])


def backproject_projections(vol: np.ndarray, rots: np.ndarray, *, ctf=None, pad: int = 2) -> BackProjector:
    slices = Projector.from_map(vol, pad=pad).project(rots)
    bp = BackProjector.zeros(vol.shape[0], pad=pad)
    if ctf is None:
        bp.insert(slices, rots)
    else:
        bp.insert(slices * ctf * ctf, rots, weights=ctf * ctf)  # images carry one CTF; data += CTF·X
    return bp


def min_fsc_to(curve: np.ndarray, box: int, fraction: float = 0.9) -> float:
    return float(curve[: int(fraction * box / 2) + 1].min())


@pytest.mark.parametrize("skip_gridding", [True, False])
def test_phantom_recovered_from_noiseless_projections(rng, skip_gridding):
    box = 48
    vol = blob_phantom(box, rng)
    bp = backproject_projections(vol, rotations(random_angles(1500, rng)))
    rec = bp.reconstruct(skip_gridding=skip_gridding)
    assert rec.shape == vol.shape and rec.dtype == np.float32
    curve = fsc(rec, vol)
    assert min_fsc_to(curve, box) >= 0.95, curve
    # the amplitude comes back too (shells 1..20 within 3 %)
    fr, fv = np.fft.rfftn(rec), np.fft.rfftn(vol)
    ratio = np.real(np.vdot(fv, fr)) / np.real(np.vdot(fv, fv))
    assert 0.9 < ratio < 1.1


def test_pad1_also_works(rng):
    box = 48
    vol = blob_phantom(box, rng)
    rec = backproject_projections(vol, rotations(random_angles(1500, rng)), pad=1).reconstruct()
    assert min_fsc_to(fsc(rec, vol), box, 0.8) >= 0.95


@pytest.mark.slow
def test_real_map_recovered(shared_data, rng):
    vol = mrcfile.read(shared_data / "maps" / "cryodrgn_hand-vol.mrc").astype(np.float32)
    box = vol.shape[0]
    bp = backproject_projections(vol, rotations(random_angles(5000, rng)))
    for kw in (dict(), dict(skip_gridding=False)):
        curve = fsc(bp.reconstruct(**kw), vol)
        assert min_fsc_to(curve, box) >= 0.95, (kw, curve)


def test_ctf_weighting_recovers_map(rng):
    box, apix = 48, 1.5
    vol = blob_phantom(box, rng)
    n = 1500
    du = rng.uniform(8000, 25000, n)
    ctf = ctf_2d(box, apix, defocus_u=du, defocus_v=du - rng.uniform(0, 800, n),
                 defocus_angle=rng.uniform(0, 180, n), voltage=300, cs=2.7, amplitude_contrast=0.1)
    rec = backproject_projections(vol, rotations(random_angles(n, rng)), ctf=ctf).reconstruct()
    assert min_fsc_to(fsc(rec, vol), box) >= 0.95


@pytest.mark.parametrize("skip_gridding", [True, False])
def test_2d_class_average_from_rotated_copies(rng, skip_gridding):
    """2D references (Class2D): rotated copies inserted at their psi average back to the reference."""
    box = 48
    c = np.arange(box) - box // 2
    y, x = np.meshgrid(c, c, indexing="ij")
    ref = np.zeros((box, box))
    for _ in range(8):
        cx, cy = rng.uniform(-12, 12, 2)
        ref += rng.uniform(0.5, 1.5) * np.exp(-((x - cx) ** 2 + (y - cy) ** 2) / (2 * rng.uniform(0.8, 2.5) ** 2))
    psi = rng.uniform(-180, 180, 400)
    copies = Projector2D.from_images(ref).project(psi)[0]
    bp = BackProjector.zeros(box, ndim=2)
    bp.insert(copies, psi)
    avg = bp.reconstruct(skip_gridding=skip_gridding)
    assert avg.shape == (box, box)
    curve = fsc(avg, ref)
    assert min_fsc_to(curve, box) >= 0.95, curve  # two bilinear interpolations: ~0.98 at 0.9 Nyquist
    assert min_fsc_to(curve, box, 0.7) >= 0.99, curve
    assert abs(np.vdot(ref, avg) / np.vdot(ref, ref) - 1) < 0.05


def test_symmetry_uses_every_copy(rng):
    """A C4 map from few views: reconstructing with C4 beats C1 and matches inserting the copies."""
    box = 32
    c = np.arange(box) - box // 2
    z, y, x = np.meshgrid(c, c, c, indexing="ij")
    vol = np.zeros((box,) * 3)
    for _ in range(3):  # each blob and its copies turned by 90, 180, 270 deg about z (about voxel box//2)
        bx, by, bz = rng.uniform(-6, 6, 3)
        s = rng.uniform(1.0, 2.0)
        for cx, cy in ((bx, by), (-by, bx), (-bx, -by), (by, -bx)):
            vol += np.exp(-((x - cx) ** 2 + (y - cy) ** 2 + (z - bz) ** 2) / (2 * s * s))
    rots = rotations(random_angles(40, rng))
    bp = backproject_projections(vol.astype(np.float32), rots)
    c1 = fsc(bp.reconstruct(), vol)
    c4 = fsc(bp.reconstruct(sym="C4"), vol)
    assert c4[2:14].mean() > c1[2:14].mean() + 0.02
    assert min_fsc_to(c4, box, 0.8) >= 0.9


def _uniform_bp(box: int, w0: float, vol: np.ndarray) -> BackProjector:
    """Accumulators with weight w0 everywhere inside R and data = w0 · (the map's padded transform)."""
    proj = Projector.from_map(vol, do_gridding=False, double=True)
    bp = BackProjector.zeros(box, double=True)
    inside = np.broadcast_to(bp.radius2() <= bp.radius ** 2, bp.weight.shape)
    bp.weight[inside] = w0
    bp.data[...] = w0 * proj.data
    bp.is_symmetrised = True  # already Hermitian: it came from a real map
    return bp


def test_regularisation_formula(rng):
    """W = w + 1/(pad³·T·τ²) for shells >= minres_map: exactly a per-shell scaling of the data."""
    box = 32
    vol = rng.standard_normal((box,) * 3)
    w0, fudge, t = 1.0, 2.0, 1.0 / 8.0  # 1/(8·2·1/8) = 0.5, so W = 1.5 beyond shell 5
    bp = _uniform_bp(box, w0, vol)
    tau2 = np.full(box // 2 + 1, t)
    reg = reconstruct(bp, tau2=tau2, tau2_fudge=fudge, minres_map=5, weight_floor=False)
    # same thing built by hand: low shells unchanged, the rest scaled by w0 / (w0 + 0.5)
    shell = np.floor(np.sqrt(bp.radius2()) / bp.pad + 0.5)
    inner = np.broadcast_to((shell >= 5) & (bp.radius2() < bp.radius ** 2), bp.data.shape)
    by_hand = bp.copy()
    by_hand.data = np.where(inner, bp.data * (w0 / (w0 + 0.5)), bp.data)
    assert np.allclose(reg, reconstruct(by_hand, weight_floor=False), atol=1e-10)
    # huge tau2 changes nothing; tau2 = 0 divides the data by 1001 (1/(0.001·w))
    plain = reconstruct(bp, weight_floor=False)
    assert np.allclose(reconstruct(bp, tau2=np.full(box // 2 + 1, 1e15), weight_floor=False), plain, atol=1e-9)
    zero = reconstruct(bp, tau2=np.zeros(box // 2 + 1), minres_map=5, weight_floor=False)
    by_hand.data = np.where(inner, bp.data / 1001.0, bp.data)
    assert np.allclose(zero, reconstruct(by_hand, weight_floor=False), atol=1e-10)


def test_noise_and_ssnr_spectra(rng):
    box = 32
    bp = _uniform_bp(box, 4.0, rng.standard_normal((box,) * 3))
    sigma2 = reconstruction_sigma2(bp)
    assert sigma2.shape == (box // 2 + 1,)
    assert np.allclose(sigma2, 1.0 / (8 * 4.0))  # 1 / <pad³ w>
    tau2, ssnr = tau2_from_fsc(np.array([1.0, 0.5, 0.0, -0.2, 0.9995]), np.full(5, 2.0))
    assert np.allclose(ssnr, [999.0, 1.0, 0.001 / 0.999, 0.001 / 0.999, 999.0])
    assert np.allclose(tau2, 2.0 * ssnr)
    f = np.sqrt(2 * 0.5 / 1.5)
    assert np.isclose(tau2_from_fsc(np.array([0.5]), np.ones(1), is_whole_instead_of_half=True, tau2_fudge=3)[1][0],
                      3 * f / (1 - f))
    dvp = data_vs_prior(bp, np.full(box // 2 + 1, 0.01), tau2_fudge=2.0)
    assert np.allclose(dvp.data_vs_prior, 4.0 * 8 * 2.0 * 0.01)  # w · pad³ · T · τ²
    assert np.allclose(dvp.fourier_coverage, 0.0)
    dvp = data_vs_prior(bp, np.full(box // 2 + 1, 1.0))
    assert np.allclose(dvp.fourier_coverage, 1.0)


def test_blob_profile_normalised_and_truncated():
    r = np.array([0.0, 0.01, 0.1, 0.49, 0.5, 0.7])
    b = blob_fourier_profile(r)
    assert b[0] == 1.0 and b[4] == 0.0 and b[5] == 0.0
    assert 0 < b[1] < 1 and abs(b[2]) < b[1]


def test_weight_floor_only_touches_empty_voxels(rng):
    """RELION 4/5's max(W, <W>/1000) equals plain division where every voxel has ample weight."""
    box = 32
    vol = blob_phantom(box, rng)
    bp = backproject_projections(vol, rotations(random_angles(800, rng)))
    a = bp.reconstruct(weight_floor=True)
    b = bp.reconstruct(weight_floor=False)
    assert np.allclose(a, b, atol=1e-4 * np.abs(b).max())
    # with a single view most voxels are empty; the floor keeps the result finite
    one = backproject_projections(vol, rotations(random_angles(1, rng)))
    assert np.all(np.isfinite(one.reconstruct()))


# --- parity with relion_reconstruct ------------------------------------------------------------

def _write_particles(path, angles, origins_px, apix, box, names, ctf_cols=None):
    cols = ["rlnAngleRot", "rlnAngleTilt", "rlnAnglePsi", "rlnOriginXAngst", "rlnOriginYAngst",
            "rlnOpticsGroup", "rlnImageName"]
    if ctf_cols is not None:
        cols += ["rlnDefocusU", "rlnDefocusV", "rlnDefocusAngle"]
    lines = ["", "# version 30001", "", "data_optics", "", "loop_",
             "_rlnOpticsGroup #1", "_rlnOpticsGroupName #2", "_rlnImagePixelSize #3", "_rlnImageSize #4",
             "_rlnImageDimensionality #5", "_rlnVoltage #6", "_rlnSphericalAberration #7",
             "_rlnAmplitudeContrast #8", f"1 opticsGroup1 {apix} {box} 2 300 2.7 0.1", "", "",
             "# version 30001", "", "data_particles", "", "loop_"]
    lines += [f"_{c} #{i + 1}" for i, c in enumerate(cols)]
    for i, ((r, t, p), (ox, oy), name) in enumerate(zip(angles, origins_px, names)):
        row = f"{r:.6f} {t:.6f} {p:.6f} {ox * apix:.6f} {oy * apix:.6f} 1 {name}"
        if ctf_cols is not None:
            row += " " + " ".join(f"{v:.3f}" for v in ctf_cols[i])
        lines.append(row)
    path.write_text("\n".join(lines) + "\n")


@pytest.mark.relion
@pytest.mark.parametrize("with_ctf", [False, True])
def test_parity_with_relion_reconstruct(relion, tmp_path, rng, with_ctf):
    box, apix, n = 48, 1.5, 500
    vol = blob_phantom(box, rng)
    angles = random_angles(n, rng)
    rots = rotations(angles)
    origins = rng.uniform(-4, 4, (n, 2))
    slices = Projector.from_map(vol).project(rots)
    ctf = None
    ctf_cols = None
    if with_ctf:
        du = rng.uniform(8000, 25000, n)
        ctf_cols = np.stack([du, du - rng.uniform(0, 800, n), rng.uniform(0, 180, n)], axis=1)
        ctf = ctf_2d(box, apix, defocus_u=ctf_cols[:, 0], defocus_v=ctf_cols[:, 1],
                     defocus_angle=ctf_cols[:, 2], voltage=300, cs=2.7, amplitude_contrast=0.1)
        slices = slices * ctf
    # images show the particle moved by -origin (RELION's convention)
    images = np.fft.fftshift(backend.irfftn(phase_shift(slices, -origins), (box, box), axes=(1, 2)), axes=(1, 2))
    images = images.astype(np.float32)
    with mrcfile.new(tmp_path / "parts.mrcs") as m:
        m.set_data(images)
        m.voxel_size = apix
    _write_particles(tmp_path / "parts.star", angles, origins, apix, box,
                     [f"{i + 1:06d}@parts.mrcs" for i in range(n)], ctf_cols)
    extra = ["--ctf"] if with_ctf else []
    for out, flags in (("skip.mrc", ["--skip_gridding"]), ("grid.mrc", [])):
        subprocess.run([str(relion / "relion_reconstruct"), "--i", "parts.star", "--o", out, *flags, *extra],
                       cwd=tmp_path, check=True, capture_output=True)

    # ours, from the same images: FFT, recentre by +origin, zero the DC, CTF-weight
    ft = backend.rfftn(np.fft.ifftshift(images.astype(np.float64), axes=(1, 2)), axes=(1, 2))
    ft = phase_shift(ft, origins)
    ft[:, 0, 0] = 0
    bp = BackProjector.zeros(box, double=True)
    if with_ctf:
        c = ctf.astype(np.float64)
        bp.insert(ft * c, rots, weights=c * c)
    else:
        bp.insert(ft, rots)
    for out, kw in (("skip.mrc", dict(weight_floor=False)), ("grid.mrc", dict(skip_gridding=False))):
        theirs = mrcfile.read(tmp_path / out).astype(np.float64)
        ours = bp.reconstruct(**kw)
        curve = fsc(ours, theirs)
        assert min_fsc_to(curve, box) >= 0.99, (out, curve)
        # RELION includes pixels exactly on the r_max circle by floating-point rounding: ~1e-4 differences
        assert np.abs(ours - theirs).max() < 5e-4 * np.abs(theirs).max(), out


def test_scale_correction_is_the_ratio_over_high_ssnr_shells_clamped_and_renormalised():
    from cryodask.em.mstep import scale_correction

    xa = np.array([[9.0, 2.0, 2.0, 5.0], [9.0, 1.0, 1.0, 5.0], [9.0, 40.0, 40.0, 5.0]])
    aa = np.full((3, 4), 2.0)
    dvp = np.array([100.0, 10.0, 4.0, 1.0])  # shells 1-2 count: not the origin, not SSNR <= 3
    s = scale_correction(np.ones(3), xa, aa, dvp, group_particles=[10, 10, 20])
    raw = np.array([1.0, 0.5, 20.0])
    clamped = np.clip(raw, 1.0 / 5, 5.0)  # median 1
    np.testing.assert_allclose(s, clamped / ((clamped * [10, 10, 20]).sum() / 40))
    # the sums carry the current scales s: s_new = s·ΣXA/ΣAA, here 2·(4/8) against 1·(2/4)
    s2 = scale_correction(np.array([2.0, 1.0]), xa[:2], aa[:2] * [[2], [1]], dvp, [1, 1])
    assert s2[0] / s2[1] == pytest.approx(2.0)
    assert np.all(scale_correction(np.ones(3), xa, aa, np.zeros(4), [1, 1, 1]) == 1)  # no signal: unchanged


def _relion_compare_two_halves(bp1, bp2):
    """RELION's getDownsampledAverage + calculateDownSampledFourierShellCorrelation, voxel by voxel."""
    def rnd(v):
        return int(v + 0.5) if v > 0 else int(v - 0.5)

    def average(bp):
        sums: dict = {}
        h = bp.half_extent
        for iz in range(bp.weight.shape[0]):
            for iy in range(bp.weight.shape[1]):
                for ix in range(bp.weight.shape[2]):
                    key = (rnd((iz - h) / bp.pad), rnd((iy - h) / bp.pad), rnd(ix / bp.pad))
                    d, w = sums.get(key, (0j, 0.0))
                    sums[key] = (d + complex(bp.data[iz, iy, ix]), w + float(bp.weight[iz, iy, ix]))
        return {k: (d / w if w > 0 else 0j) for k, (d, w) in sums.items()}

    a, b = average(bp1), average(bp2)
    nsh = bp1.ori_size // 2 + 1
    num, d1, d2 = np.zeros(nsh), np.zeros(nsh), np.zeros(nsh)
    for (kz, ky, kx), z1 in a.items():
        r = np.sqrt(kz * kz + ky * ky + kx * kx)
        if r > bp1.r_max or rnd(r) >= nsh:
            continue
        z2 = b[(kz, ky, kx)]
        num[rnd(r)] += (z1 * np.conj(z2)).real
        d1[rnd(r)] += abs(z1) ** 2
        d2[rnd(r)] += abs(z2) ** 2
    out = np.where(d1 * d2 > 0, num / np.sqrt(np.where(d1 * d2 > 0, d1 * d2, 1)), 0.0)
    out[0] = 1.0
    return out


def test_gold_standard_fsc_bins_the_padded_accumulators_as_relion(rng):
    """The half-set FSC is taken on data/weight binned to the original grid (sums, then the ratio), not on the
    ratio of each padded voxel, whose low-weight voxels are noisy and pull the FSC down."""
    from cryodask.em.iteration import fsc_of_accumulators

    box = 12
    vol = rng.normal(size=(box,) * 3)
    proj = Projector.from_map(vol, pad=2)
    halves = []
    for h in range(2):
        rot = euler_to_matrix(*rng.uniform([-180, 0, -180], [180, 180, 180], (40, 3)).T).reshape(-1, 3, 3)
        slices = proj.project(rot)
        noise = 0.1 * (rng.normal(size=slices.shape) + 1j * rng.normal(size=slices.shape))
        bp = BackProjector.zeros(box, pad=2, r_max=5)
        bp.insert((slices + noise).astype(np.complex64), rot)
        halves.append(bp.symmetrised(None))
    got = fsc_of_accumulators(*halves)
    want = _relion_compare_two_halves(*halves)
    np.testing.assert_allclose(got, want, atol=1e-6)
    assert 0.2 < got[3] < 0.99 and np.all(got[6:] == 0)  # signal and noise; nothing beyond r_max
