"""RELION's CTF: closed-form values, zeros, astigmatism, STAR parameters, and parity with relion_project."""

from __future__ import annotations

import math
import subprocess
from types import SimpleNamespace

import numpy as np
import pandas as pd
import pytest

from cryodask.errors import UserError
from cryodask.ops.ctf import ctf_2d, ctf_for_scoring, ctf_params, ctf_premultiplied, wavelength

BASE = dict(voltage=300.0, cs=2.7, amplitude_contrast=0.1)


def test_wavelength():
    # Relativistic electron wavelengths: 0.019687 Å at 300 kV, 0.025079 Å at 200 kV.
    assert wavelength(300.0) == pytest.approx(0.0196875, abs=2e-7)
    assert wavelength(200.0) == pytest.approx(0.0250793, abs=2e-7)


def test_shape_and_layout():
    c = ctf_2d(16, 1.5, defocus_u=[10000, 12000, 9000], defocus_v=11000, defocus_angle=30, **BASE)
    assert c.shape == (3, 16, 9) and c.dtype == np.float32
    full = ctf_2d(16, 1.5, defocus_u=[10000, 12000, 9000], defocus_v=11000, defocus_angle=30, half=False,
                  dtype=np.float64, **BASE)
    assert full.shape == (3, 16, 16) and full.dtype == np.float64
    np.testing.assert_allclose(full[:, :, :9], c, atol=2e-5)  # float32 vs float64
    # CTF(-k) = CTF(k): full[i, j] = full[-i, -j] away from the Nyquist row/column.
    i = np.arange(1, 8)
    np.testing.assert_allclose(full[:, i][:, :, i], full[:, -i][:, :, -i], atol=1e-12)
    assert np.abs(full[:, i][:, :, i] - full[:, i][:, :, -i]).max() > 0.1  # but not mirror-symmetric in x
    # The Nyquist row of an even box is ky = +box/2, as in RELION's FFTW loops. Box 16 at
    # 1.5 Å samples the same frequencies (i / 24 Å) as box 32 at 0.75 Å, where row 8 is +8.
    fine = ctf_2d(32, 0.75, defocus_u=[10000, 12000, 9000], defocus_v=11000, defocus_angle=30, half=False,
                  dtype=np.float64, **BASE)
    j = np.arange(-7, 8)
    np.testing.assert_allclose(full[:, 8][:, j], fine[:, 8][:, j], atol=1e-12)
    assert np.abs(full[:, 8][:, j] - fine[:, -8][:, j]).max() > 0.1  # -8 would differ (astigmatism)
    np.testing.assert_allclose(full[:, :8, :8], fine[:, :8, :8], atol=1e-12)
    # Odd box: half layout has box//2 + 1 columns and ky = 0..(box-1)/2, then negatives.
    assert ctf_2d(15, 1.5, defocus_u=10000, defocus_v=10000, defocus_angle=0, **BASE).shape == (1, 15, 8)


def test_dc_value_is_amplitude_contrast():
    c = ctf_2d(8, 2.0, defocus_u=15000, defocus_v=14000, defocus_angle=10, **BASE, dtype=np.float64)
    assert c[0, 0, 0] == pytest.approx(0.1, abs=1e-12)  # -sin(-atan(Q0/sqrt(1-Q0^2))) = Q0
    # Phase plate: 90° adds pi/2, so CTF(0) = cos(asin(Q0)) = sqrt(1 - Q0^2); scale multiplies.
    c = ctf_2d(8, 2.0, defocus_u=15000, defocus_v=14000, defocus_angle=10, phase_shift=90, scale=0.5, **BASE,
               dtype=np.float64)
    assert c[0, 0, 0] == pytest.approx(0.5 * math.sqrt(0.99), abs=1e-12)


def test_relion_floor_on_tiny_values():
    # Q0 = 0, no phase shift: CTF(0) = -sin(0) = 0, which RELION replaces by +1e-8.
    c = ctf_2d(8, 2.0, defocus_u=15000, defocus_v=15000, defocus_angle=0, voltage=300, cs=2.7,
               amplitude_contrast=0.0, dtype=np.float64)
    assert c[0, 0, 0] == 1e-8
    assert np.abs(c).min() >= 1e-8


def _zero_radii(defocus, voltage, cs_mm, q0, kmax):
    """Frequencies (1/Å) where gamma = -m*pi: roots of (pi/2) Cs l^3 k^4 - pi l D k^2 - K3 + m pi = 0."""
    lam = wavelength(voltage)
    a = 0.5 * math.pi * cs_mm * 1e7 * lam**3
    b = -math.pi * lam * defocus
    k3 = math.atan(q0 / math.sqrt(1 - q0 * q0))
    radii = []
    for m in range(1, 1000):
        c = m * math.pi - k3
        disc = b * b - 4 * a * c
        if disc < 0:
            break
        k2 = (-b - math.sqrt(disc)) / (2 * a)  # smaller root: the Thon rings before Cs turns gamma around
        if k2 <= 0 or math.sqrt(k2) > kmax:
            break
        radii.append(math.sqrt(k2))
    return np.array(radii)


def test_zero_crossings_of_isotropic_ctf():
    # Rings stay >= 4 pixels apart up to Nyquist for these values, so none is missed.
    box, px, defocus = 256, 2.0, 10000.0
    c = ctf_2d(box, px, defocus_u=defocus, defocus_v=defocus, defocus_angle=25, **BASE, dtype=np.float64)
    profile = c[0, 0, :]  # along +x, k = j / (box * px)
    k = np.arange(box // 2 + 1) / (box * px)
    predicted = _zero_radii(defocus, 300, 2.7, 0.1, k[-1])
    assert len(predicted) >= 10
    sign_change = np.flatnonzero(np.sign(profile[:-1]) != np.sign(profile[1:]))
    assert len(sign_change) == len(predicted)
    # Linear interpolation of each crossing lands on the predicted radius (to 0.2 Fourier pixel).
    j = sign_change
    found = k[j] + (k[j + 1] - k[j]) * profile[j] / (profile[j] - profile[j + 1])
    np.testing.assert_allclose(found * box * px, predicted * box * px, atol=0.2)
    # Isotropic: the same profile along y (first column, positive ky) and any other direction.
    np.testing.assert_allclose(c[0, : box // 2, 0], profile[: box // 2], atol=1e-12)


def test_astigmatism_along_defocus_angle():
    box, px = 128, 1.2
    args = dict(defocus_u=21000.0, defocus_v=15000.0, **BASE, half=False, dtype=np.float64)
    iso_u = ctf_2d(box, px, defocus_u=21000.0, defocus_v=21000.0, defocus_angle=0, half=False, dtype=np.float64,
                   **BASE)[0]
    iso_v = ctf_2d(box, px, defocus_u=15000.0, defocus_v=15000.0, defocus_angle=0, half=False, dtype=np.float64,
                   **BASE)[0]
    n = np.arange(1, box // 2)
    # Angle 0: U along x, V along y.
    c = ctf_2d(box, px, defocus_angle=0, **args)[0]
    np.testing.assert_allclose(c[0, n], iso_u[0, n], atol=1e-12)
    np.testing.assert_allclose(c[n, 0], iso_v[n, 0], atol=1e-12)
    assert np.abs(c[0, n] - iso_v[0, n]).max() > 0.5  # the two defoci really differ
    # Angle 45°: U along the diagonal (kx = ky > 0), V along the anti-diagonal (kx = -ky).
    c = ctf_2d(box, px, defocus_angle=45, **args)[0]
    np.testing.assert_allclose(c[n, n], iso_u[n, n], atol=1e-9)
    np.testing.assert_allclose(c[-n, n], iso_v[-n, n], atol=1e-9)
    # Angle -45° swaps them.
    c = ctf_2d(box, px, defocus_angle=-45, **args)[0]
    np.testing.assert_allclose(c[n, n], iso_v[n, n], atol=1e-9)
    # Angle 90° puts U along y.
    c = ctf_2d(box, px, defocus_angle=90, **args)[0]
    np.testing.assert_allclose(c[n, 0], iso_u[n, 0], atol=1e-9)


def test_bfactor_envelope_and_scale():
    box, px = 64, 2.0
    plain = ctf_2d(box, px, defocus_u=15000, defocus_v=13000, defocus_angle=20, **BASE, dtype=np.float64)[0]
    damped = ctf_2d(box, px, defocus_u=15000, defocus_v=13000, defocus_angle=20, bfactor=100, scale=0.8, **BASE,
                    dtype=np.float64)[0]
    ky = np.where(np.arange(box) <= box // 2, np.arange(box), np.arange(box) - box)[:, None] / (box * px)
    kx = np.arange(box // 2 + 1)[None, :] / (box * px)
    expected = plain * 0.8 * np.exp(-100 * (kx**2 + ky**2) / 4)
    big = np.abs(expected) > 1e-6  # away from RELION's 1e-8 floor
    np.testing.assert_allclose(damped[big], expected[big], rtol=1e-10)
    assert damped[0, 32] == pytest.approx(plain[0, 32] * 0.8 * math.exp(-100 * 0.25**2 / 4), rel=1e-10)


def test_intact_first_peak():
    box, px = 128, 1.0
    kw = dict(defocus_u=25000, defocus_v=25000, defocus_angle=0, **BASE, dtype=np.float64)
    plain = ctf_2d(box, px, **kw)[0, 0]
    intact = ctf_2d(box, px, ctf_intact_first_peak=True, **kw)[0, 0]
    # The first peak of -sin(gamma) is where gamma = -pi/2; before it the CTF is 1.
    k = np.arange(box // 2 + 1) / (box * px)
    lam = wavelength(300)
    gamma = -math.pi * lam * 25000 * k**2 + 0.5 * math.pi * 2.7e7 * lam**3 * k**4 - math.asin(0.1)
    before = np.abs(gamma) < math.pi / 2
    assert 2 <= before.sum() < 10
    np.testing.assert_array_equal(intact[before], 1.0)
    np.testing.assert_allclose(intact[~before], plain[~before], atol=1e-12)
    assert np.all(plain[before] < 1.0)


def test_vectorised_matches_one_by_one():
    defu = np.array([12000.0, 18000.0, 25000.0])
    defv = np.array([11000.0, 18500.0, 21000.0])
    ang = np.array([0.0, 33.0, -120.0])
    ps = np.array([0.0, 45.0, 90.0])
    b = np.array([0.0, 50.0, 10.0])
    many = ctf_2d(32, 1.7, defocus_u=defu, defocus_v=defv, defocus_angle=ang, phase_shift=ps, bfactor=b,
                  voltage=[300, 200, 300], cs=[2.7, 2.0, 0.01], amplitude_contrast=[0.1, 0.07, 0.2])
    for i in range(3):
        one = ctf_2d(32, 1.7, defocus_u=defu[i], defocus_v=defv[i], defocus_angle=ang[i], phase_shift=ps[i],
                     bfactor=b[i], voltage=[300, 200, 300][i], cs=[2.7, 2.0, 0.01][i],
                     amplitude_contrast=[0.1, 0.07, 0.2][i])
        np.testing.assert_array_equal(many[i], one[0])
    # float32 and float64 agree to float32 accuracy.
    d = ctf_2d(32, 1.7, defocus_u=defu, defocus_v=defv, defocus_angle=ang, **BASE, dtype=np.float64)
    s = ctf_2d(32, 1.7, defocus_u=defu, defocus_v=defv, defocus_angle=ang, **BASE)
    assert np.abs(d - s).max() < 1e-4
    with pytest.raises(ValueError, match="defocus_v has 2 values"):
        ctf_2d(8, 1.0, defocus_u=[1, 2, 3], defocus_v=[1, 2], defocus_angle=0, **BASE)
    with pytest.raises(ValueError, match="amplitude_contrast"):
        ctf_2d(8, 1.0, defocus_u=1e4, defocus_v=1e4, defocus_angle=0, voltage=300, cs=2.7, amplitude_contrast=1.5)


def test_ctf_for_scoring():
    c = ctf_2d(8, 2.0, defocus_u=[15000, 9000], defocus_v=14000, defocus_angle=10, **BASE)
    np.testing.assert_array_equal(ctf_for_scoring(c, False), c)
    np.testing.assert_array_equal(ctf_for_scoring(c, True), c * c)
    mixed = ctf_for_scoring(c, np.array([True, False]))
    np.testing.assert_array_equal(mixed[0], c[0] ** 2)
    np.testing.assert_array_equal(mixed[1], c[1])


# --- parameters from STAR tables -------------------------------------------------------------


def _table(particles, optics=None, source="p.star"):
    return SimpleNamespace(particles=pd.DataFrame(particles), optics=None if optics is None else pd.DataFrame(optics),
                           source=source)


def test_ctf_params_from_optics_groups():
    t = _table(
        {"rlnDefocusU": [10000.0, 20000.0, 15000.0], "rlnDefocusV": [9000.0, 19000.0, 14000.0],
         "rlnDefocusAngle": [10.0, 20.0, 30.0], "rlnOpticsGroup": [2, 1, 2], "rlnPhaseShift": [0.0, 5.0, 0.0]},
        {"rlnOpticsGroup": [1, 2], "rlnVoltage": [300.0, 200.0], "rlnSphericalAberration": [2.7, 2.0],
         "rlnAmplitudeContrast": [0.1, 0.07], "rlnCtfDataAreCtfPremultiplied": [0, 1]},
    )
    p = ctf_params(t)
    np.testing.assert_array_equal(p["voltage"], [200.0, 300.0, 200.0])
    np.testing.assert_array_equal(p["cs"], [2.0, 2.7, 2.0])
    np.testing.assert_array_equal(p["amplitude_contrast"], [0.07, 0.1, 0.07])
    np.testing.assert_array_equal(p["phase_shift"], [0.0, 5.0, 0.0])
    np.testing.assert_array_equal(p["bfactor"], [0.0, 0.0, 0.0])
    np.testing.assert_array_equal(p["scale"], [1.0, 1.0, 1.0])
    np.testing.assert_array_equal(ctf_premultiplied(t), [True, False, True])
    c = ctf_2d(16, 1.0, **p)
    assert c.shape == (3, 16, 9)
    assert c[0, 0, 0] == pytest.approx(0.07, abs=1e-7)


def test_ctf_params_relion30_and_defaults():
    # RELION 3.0: everything per particle, no optics table; V defaults to U, like RELION.
    t = _table({"rlnDefocusU": [10000.0], "rlnVoltage": [300.0], "rlnSphericalAberration": [2.0],
                "rlnAmplitudeContrast": [0.1], "rlnCtfBfactor": [40.0]})
    p = ctf_params(t)
    assert p["defocus_v"][0] == 10000.0 and p["defocus_angle"][0] == 0.0 and p["bfactor"][0] == 40.0
    assert not ctf_premultiplied(t).any()


def test_ctf_params_errors():
    optics = {"rlnOpticsGroup": [1], "rlnVoltage": [300.0], "rlnSphericalAberration": [2.7]}
    with pytest.raises(UserError) as e:
        ctf_params(_table({"rlnDefocusU": [1e4], "rlnOpticsGroup": [1]}, optics))
    assert e.value.where == "p.star, rlnAmplitudeContrast"
    optics["rlnAmplitudeContrast"] = [0.1]
    with pytest.raises(UserError) as e:
        ctf_params(_table({"rlnDefocusU": [1e4, 1e4], "rlnOpticsGroup": [1, 3]}, optics))
    assert e.value.where == "p.star, row 2, rlnOpticsGroup" and "optics group 3" in e.value.what
    with pytest.raises(UserError) as e:
        ctf_params(_table({"rlnDefocusV": [1e4], "rlnOpticsGroup": [1]}, optics))
    assert e.value.where == "p.star, rlnDefocusU"
    with pytest.raises(UserError) as e:
        ctf_params(_table({"rlnDefocusU": [1e4, "abc"], "rlnOpticsGroup": [1, 1]}, optics))
    assert e.value.where == "p.star, row 2, rlnDefocusU"
    with pytest.raises(UserError) as e:
        ctf_params(_table({"rlnDefocusU": [1e4], "rlnAmplitudeContrast": [1.3], "rlnOpticsGroup": [1]}, optics))
    assert e.value.where == "p.star, row 1, rlnAmplitudeContrast"


def test_ctf_params_real_star_files(shared_data):
    import starfile

    blocks = starfile.read(shared_data / "star/cryodrgn/relion31.6opticsgroups.star")
    t = SimpleNamespace(optics=blocks["optics"], particles=blocks["particles"])
    p = ctf_params(t)
    assert len(p["voltage"]) == len(t.particles) == 139
    cs_by_group = dict(zip(t.optics.rlnOpticsGroup, t.optics.rlnSphericalAberration))
    np.testing.assert_array_equal(p["cs"], [cs_by_group[g] for g in t.particles.rlnOpticsGroup])
    np.testing.assert_array_equal(p["defocus_u"], t.particles.rlnDefocusU.to_numpy())
    # rlnVoltage missing: refused, naming the file's field.
    bad = starfile.read(shared_data / "star/aspire/sample_incomplete_ctf_params.star")
    with pytest.raises(UserError) as e:
        ctf_params(SimpleNamespace(particles=bad, optics=None), source="sample_incomplete_ctf_params.star")
    assert e.value.where == "sample_incomplete_ctf_params.star, rlnVoltage"


def test_cupy_matches_numpy():
    cp = pytest.importorskip("cupy")
    from cryodask.backend import gpu_available

    if not gpu_available():
        pytest.skip("no GPU")
    kw = dict(defocus_u=[15000.0, 9000.0], defocus_v=14000.0, defocus_angle=[10.0, -50.0], phase_shift=30.0,
              bfactor=20.0, **BASE)
    c_np = ctf_2d(64, 1.3, **kw)
    c_cp = ctf_2d(64, 1.3, xp=cp, **kw)
    assert isinstance(c_cp, cp.ndarray)
    np.testing.assert_allclose(cp.asnumpy(c_cp), c_np, atol=2e-6)
    # xp is taken from CuPy parameters when not given.
    assert isinstance(ctf_2d(8, 1.0, **{**kw, "defocus_u": cp.asarray([15000.0, 9000.0])}), cp.ndarray)


# --- parity with relion_project --ctf --------------------------------------------------------

_STAR = """# version 30001

data_optics

loop_
_rlnOpticsGroup #1
_rlnOpticsGroupName #2
_rlnImagePixelSize #3
_rlnImageSize #4
_rlnVoltage #5
_rlnSphericalAberration #6
_rlnAmplitudeContrast #7
_rlnImageDimensionality #8
1 opticsGroup1 {px} {box} 300.0 2.7 0.1 2

# version 30001

data_particles

loop_
_rlnAngleRot #1
_rlnAngleTilt #2
_rlnAnglePsi #3
_rlnDefocusU #4
_rlnDefocusV #5
_rlnDefocusAngle #6
_rlnPhaseShift #7
_rlnCtfBfactor #8
_rlnCtfScalefactor #9
_rlnOpticsGroup #10
_rlnImageName #11
{rows}
"""

_PARTICLES = [  # rot tilt psi defU defV angle phase B scale
    (10.0, 20.0, 30.0, 15000.0, 15000.0, 0.0, 0.0, 0.0, 1.0),
    (40.0, 70.0, -30.0, 12000.0, 18000.0, 35.0, 0.0, 0.0, 1.0),
    (-100.0, 120.0, 80.0, 20000.0, 16000.0, -70.0, 60.0, 0.0, 1.0),
    (150.0, 95.0, 0.0, 9000.0, 10500.0, 120.0, 20.0, 80.0, 0.7),
]


@pytest.mark.relion
@pytest.mark.parametrize("intact", [False, True], ids=["ctf", "ctf_intact_first_peak"])
def test_parity_with_relion_project(relion, tmp_path, intact):
    from cryodask.io.mrc import read_stack, write_map

    box, px = 64, 2.0
    # Phantom: sharp Gaussian blobs, so the projections have signal out to Nyquist.
    rng = np.random.default_rng(7)
    z, y, x = np.mgrid[:box, :box, :box] - box // 2
    vol = np.zeros((box, box, box), np.float32)
    for _ in range(40):
        c, s = rng.uniform(-15, 15, 3), rng.uniform(0.7, 1.5)
        vol += np.exp(-((z - c[0]) ** 2 + (y - c[1]) ** 2 + (x - c[2]) ** 2) / (2 * s * s)).astype(np.float32)
    write_map(tmp_path / "map.mrc", vol, px)
    rows = "\n".join(" ".join(str(v) for v in p) + f" 1 {i + 1}@none.mrcs" for i, p in enumerate(_PARTICLES))
    (tmp_path / "ang.star").write_text(_STAR.format(px=px, box=box, rows=rows))

    exe = str(relion / "relion_project")
    extra = ["--ctf_intact_first_peak"] if intact else []
    for out, flags in (("plain", []), ("ctf", ["--ctf", *extra])):
        r = subprocess.run([exe, "--i", "map.mrc", "--ang", "ang.star", "--o", out, *flags], cwd=tmp_path,
                           capture_output=True, text=True, timeout=120)
        assert r.returncode == 0, r.stdout + r.stderr
    # relion_project writes out.mrcs (the images) and out.star.
    plain = np.asarray(read_stack(tmp_path / "plain.mrcs"), dtype=np.float64)
    with_ctf = np.asarray(read_stack(tmp_path / "ctf.mrcs"), dtype=np.float64)
    assert plain.shape == with_ctf.shape == (len(_PARTICLES), box, box)

    # Both images went through the same real-space centring, so the ratio of their
    # transforms is RELION's CTF in the rfft layout.
    f_plain, f_ctf = np.fft.rfft2(plain), np.fft.rfft2(with_ctf)
    usable = np.abs(f_plain) > 1e-4 * np.abs(f_plain).max(axis=(1, 2), keepdims=True)
    usable[:, box // 2, :] = False  # Nyquist row and column: not recoverable through a real image
    usable[:, :, box // 2] = False
    ratio = f_ctf / np.where(usable, f_plain, 1)

    p = np.array(_PARTICLES)
    ours = ctf_2d(box, px, defocus_u=p[:, 3], defocus_v=p[:, 4], defocus_angle=p[:, 5], phase_shift=p[:, 6],
                  bfactor=p[:, 7], scale=p[:, 8], voltage=300.0, cs=2.7, amplitude_contrast=0.1,
                  ctf_intact_first_peak=intact)
    for i in range(len(_PARTICLES)):
        m = usable[i]
        assert m.sum() > 1400  # nearly the whole disc of radius box/2 (about 1600 pixels)
        assert np.abs(ratio[i][m].imag).max() < 1e-4
        assert np.abs(ratio[i][m].real - ours[i][m]).max() < 1e-3
        assert np.corrcoef(ratio[i][m].real, ours[i][m])[0, 1] > 0.99999
    if intact:
        assert (ours[:, 0, 1] == 1.0).sum() >= 3  # the first-peak branch is really exercised
