"""RELION's contrast transfer function, for many particles at once, on NumPy or CuPy.

The model is RELION's ``CTF::getCTF`` (``src/ctf.h``, 3.1). At spatial frequency
``k = (x, y)`` in 1/Å:

    λ     = 12.2643247 / sqrt(V · (1 + 0.978466e-6 · V))   electron wavelength (Å), V in volts
    γ(k)  = π λ · kᵀ A k + (π/2) Cs λ³ |k|⁴ − φ − atan(Q₀ / sqrt(1 − Q₀²))
    A     = −Rᵀ diag(ΔU, ΔV) R,  R the rotation by the defocus angle
    CTF(k) = −s · sin γ(k) · exp(−B |k|² / 4)

with ΔU, ΔV the defocus (Å, positive = underfocus), Cs in Å, φ the phase shift,
Q₀ the amplitude contrast, B the B-factor (Å²) and s the scale factor. Along the
defocus-angle direction kᵀAk = −ΔU |k|², so at k = 0 the CTF equals
``s · sin(atan(Q₀/√(1−Q₀²)) + φ)``, i.e. ``Q₀`` when there is no phase shift.
``--ctf_intact_first_peak`` sets the CTF (before damping and scale) to 1
wherever |γ| < π/2. Like RELION, values smaller than 1e-8 in magnitude are
replaced by ±1e-8 (RELION does this to avoid divisions by zero).

The Fourier layout is RELION's (FFTW's): DC at ``[0, 0]``, ``ky`` wrapped, and the
Nyquist row ``box//2`` of an even box taken as +box/2 (``ky = i`` for
``i <= box//2``, else ``i - box``); the half transform keeps ``kx = 0 .. box//2``.
"""

from __future__ import annotations

import math
from types import ModuleType
from typing import Any

import numpy as np
import numpy.typing as npt

from cryodask.backend import array_module
from cryodask.errors import UserError, where

_RELION_CTF_FLOOR = 1e-8


def wavelength(voltage: npt.ArrayLike) -> np.ndarray:
    """Relativistic electron wavelength in Å for an accelerating voltage in kV (RELION's constants)."""
    v = np.asarray(voltage, dtype=np.float64) * 1e3
    return 12.2643247 / np.sqrt(v * (1.0 + v * 0.978466e-6))


def _per_particle(name: str, value: Any) -> np.ndarray:
    a = np.atleast_1d(np.asarray(value, dtype=np.float64))
    if a.ndim != 1:
        raise ValueError(f"{name} must be a scalar or a 1-D array of per-particle values, got shape {a.shape}")
    return a


def _frequencies(box: int, pixel_size: float, half: bool, xp: ModuleType, dtype: np.dtype) -> tuple[Any, Any]:
    """Spatial frequencies (1/Å) of the FFTW-layout grid, as ``(ky[:, None], kx[None, :])``."""
    i = np.arange(box)
    ky = np.where(i <= box // 2, i, i - box)  # Nyquist row positive, as RELION's FFTW loops
    kx = np.arange(box // 2 + 1) if half else ky
    scale = 1.0 / (box * pixel_size)
    return (xp.asarray((ky * scale)[:, None], dtype=dtype), xp.asarray((kx * scale)[None, :], dtype=dtype))


def ctf_2d(
    box: int,
    pixel_size: float,
    *,
    defocus_u: npt.ArrayLike,
    defocus_v: npt.ArrayLike,
    defocus_angle: npt.ArrayLike,
    voltage: npt.ArrayLike,
    cs: npt.ArrayLike,
    amplitude_contrast: npt.ArrayLike,
    bfactor: npt.ArrayLike = 0.0,
    phase_shift: npt.ArrayLike = 0.0,
    scale: npt.ArrayLike = 1.0,
    ctf_intact_first_peak: bool = False,
    half: bool = True,
    xp: ModuleType | None = None,
    dtype: npt.DTypeLike = np.float32,
) -> Any:
    """RELION's CTF on the Fourier grid of ``box x box`` images, one per particle.

    Every CTF parameter is a scalar or a length-N array (N particles); scalars
    are shared. Units as in RELION's STAR files.

    Parameters
    ----------
    box
        Image size in pixels (square images).
    pixel_size
        Pixel size in Å.
    defocus_u, defocus_v
        Defocus along the major / minor axis in Å (``rlnDefocusU``, ``rlnDefocusV``;
        positive is underfocus).
    defocus_angle
        Angle of the U axis from X, in degrees (``rlnDefocusAngle``).
    voltage
        Accelerating voltage in kV (``rlnVoltage``).
    cs
        Spherical aberration in mm (``rlnSphericalAberration``).
    amplitude_contrast
        Amplitude contrast Q₀ in [0, 1] (``rlnAmplitudeContrast``).
    bfactor
        B-factor in Å² (``rlnCtfBfactor``): envelope ``exp(-B |k|^2 / 4)``.
    phase_shift
        Phase-plate phase shift in degrees (``rlnPhaseShift``).
    scale
        Overall scale (``rlnCtfScalefactor``).
    ctf_intact_first_peak
        Leave the CTF at 1 until its first peak (``--ctf_intact_first_peak``).
    half
        Return the half transform ``(N, box, box//2 + 1)`` (rfft layout); otherwise
        the full ``(N, box, box)`` grid, whose first ``box//2 + 1`` columns equal
        the half transform.
    xp
        ``numpy`` or ``cupy``; by default taken from any CuPy array among the
        parameters, else NumPy.
    dtype
        Real dtype of the result (float32 by default; float64 for ``--double``).

    Returns
    -------
    array
        CTF values, ``(N, box, box//2 + 1)`` or ``(N, box, box)``, on ``xp``.
    """
    params = dict(defocus_u=defocus_u, defocus_v=defocus_v, defocus_angle=defocus_angle, voltage=voltage, cs=cs,
                  amplitude_contrast=amplitude_contrast, bfactor=bfactor, phase_shift=phase_shift, scale=scale)
    if xp is None:
        xp = array_module(*params.values())
    # Per-particle constants are cheap: compute them in float64 on the host.
    host = {}
    for k, v in params.items():
        if array_module(v) is not np:
            v = v.get()
        host[k] = _per_particle(k, v)
    n = max(a.shape[0] for a in host.values())
    for k, a in host.items():
        if a.shape[0] not in (1, n):
            raise ValueError(f"{k} has {a.shape[0]} values but other CTF parameters have {n}")
        host[k] = np.broadcast_to(a, (n,))
    q0 = host["amplitude_contrast"]
    if np.any((q0 < 0) | (q0 > 1)):
        raise ValueError("amplitude_contrast must lie in [0, 1]")

    lam = wavelength(host["voltage"])
    k1 = math.pi * lam
    k2 = 0.5 * math.pi * (host["cs"] * 1e7) * lam**3
    k3 = np.arctan2(q0, np.sqrt(1.0 - q0 * q0))  # atan(Q0/sqrt(1-Q0^2)), finite at Q0 = 1
    k4 = -host["bfactor"] / 4.0
    k5 = np.deg2rad(host["phase_shift"])
    ang = np.deg2rad(host["defocus_angle"])
    c, s = np.cos(ang), np.sin(ang)
    du, dv = host["defocus_u"], host["defocus_v"]
    # A = -R^T diag(dU, dV) R: the quadratic form of the astigmatic defocus.
    axx = -(du * c * c + dv * s * s)
    axy = -(du - dv) * c * s
    ayy = -(du * s * s + dv * c * c)

    dtype = np.dtype(dtype)

    def col(a: np.ndarray) -> Any:
        return xp.asarray(a.reshape(n, 1, 1), dtype=dtype)

    ky, kx = _frequencies(box, pixel_size, half, xp, dtype)
    kx2, ky2, kxy = kx * kx, ky * ky, kx * ky
    u2 = kx2 + ky2
    u4 = u2 * u2
    gamma = (col(k1 * axx) * kx2 + col(2.0 * k1 * axy) * kxy + col(k1 * ayy) * ky2
             + col(k2) * u4 - col(k3 + k5))
    ctf = -xp.sin(gamma)
    if ctf_intact_first_peak:
        ctf = xp.where(xp.abs(gamma) < math.pi / 2, xp.asarray(1.0, dtype=dtype), ctf)
    if np.any(k4 != 0):
        ctf = ctf * xp.exp(col(k4) * u2)
    if np.any(host["scale"] != 1):
        ctf = ctf * col(host["scale"])
    # RELION keeps |CTF| >= 1e-8 (sign kept, 0 counted positive).
    floor = xp.asarray(_RELION_CTF_FLOOR, dtype=dtype)
    ctf = xp.where(xp.abs(ctf) < floor, xp.where(ctf < 0, -floor, floor), ctf)
    return ctf.astype(dtype, copy=False)


def ctf_for_scoring(ctf: Any, premultiplied: bool | npt.ArrayLike) -> Any:
    """The CTF factor to use where RELION uses the CTF (scoring, backprojection).

    When the images already carry one CTF factor (``rlnCtfDataAreCtfPremultiplied``
    = 1, e.g. particles extracted by RELION 4 with ``--premultiply_ctf``), RELION
    uses CTF² in the CTF slot. ``premultiplied`` is one flag or one per particle
    (leading axis of ``ctf``).
    """
    xp = array_module(ctf)
    flags = np.asarray(premultiplied, dtype=bool)
    if flags.ndim == 0:
        return ctf * ctf if bool(flags) else ctf
    flags = xp.asarray(flags.reshape((-1,) + (1,) * (ctf.ndim - 1)))
    return xp.where(flags, ctf * ctf, ctf)


# --- STAR tables -> ctf_2d keyword arguments ---------------------------------------

# name in ctf_2d, STAR label, default (None = required); RELION's readByGroup defaults,
# except that voltage, Cs and Q0 are required: RELION's silent defaults (200 kV, Cs 0)
# would hide an incomplete file.
_PARTICLE_FIELDS = (
    ("defocus_u", "rlnDefocusU", None),
    ("defocus_v", "rlnDefocusV", "defocus_u"),
    ("defocus_angle", "rlnDefocusAngle", 0.0),
    ("bfactor", "rlnCtfBfactor", 0.0),
    ("scale", "rlnCtfScalefactor", 1.0),
    ("phase_shift", "rlnPhaseShift", 0.0),
)
_OPTICS_FIELDS = (
    ("voltage", "rlnVoltage"),
    ("cs", "rlnSphericalAberration"),
    ("amplitude_contrast", "rlnAmplitudeContrast"),
)


def _source_of(table: Any, source: Any) -> str:
    for cand in (source, getattr(table, "source", None), getattr(table, "path", None)):
        if cand is not None:
            return str(cand)
    return "particles"


def _numeric(df: Any, label: str, src: str, block: str = "") -> np.ndarray:
    import pandas as pd

    vals = pd.to_numeric(df[label], errors="coerce").to_numpy(dtype=np.float64)
    bad = np.flatnonzero(~np.isfinite(vals))
    if bad.size:
        field = f"{block} {label}" if block else label
        raise UserError(where(src, row=int(bad[0]) + 1, field=field),
                        f"value {df[label].iloc[bad[0]]!r} is not a number; fix the STAR file")
    return vals


def _optics_rows(table: Any, particles: Any, src: str) -> tuple[Any, np.ndarray | None]:
    """The optics table and, per particle, the index of its optics row (None without optics)."""
    optics = getattr(table, "optics", None)
    if optics is None or len(optics) == 0 or "rlnOpticsGroup" not in getattr(optics, "columns", ()):
        return None, None
    groups = _numeric(optics, "rlnOpticsGroup", src, "data_optics").astype(np.int64)
    if "rlnOpticsGroup" in particles.columns:
        pg = _numeric(particles, "rlnOpticsGroup", src).astype(np.int64)
    elif len(optics) == 1:
        pg = np.full(len(particles), groups[0])
    else:
        raise UserError(where(src, field="rlnOpticsGroup"),
                        f"the optics table has {len(optics)} groups but particles have no rlnOpticsGroup column; "
                        "add it")
    lookup = {int(g): r for r, g in enumerate(groups)}
    rows = np.fromiter((lookup.get(int(g), -1) for g in pg), dtype=np.int64, count=len(pg))
    missing = np.flatnonzero(rows < 0)
    if missing.size:
        r = int(missing[0])
        raise UserError(where(src, row=r + 1, field="rlnOpticsGroup"),
                        f"optics group {int(pg[r])} is not in the optics table (groups {sorted(lookup)}); "
                        "fix rlnOpticsGroup or the data_optics block")
    return optics, rows


def ctf_params(table: Any, *, source: str | None = None) -> dict[str, np.ndarray]:
    """Per-particle CTF parameters from a particle table, as keyword arguments of :func:`ctf_2d`.

    Parameters
    ----------
    table
        Any object with ``.particles`` (and optionally ``.optics``) pandas
        DataFrames, as read from a RELION 3.1+ STAR file. A particle column
        overrides the optics column of the same name (RELION's rule), so RELION
        3.0 files with voltage, Cs and amplitude contrast per particle work too.
    source
        The STAR file name for error messages (default: ``table.source`` or
        ``table.path`` when present).

    Returns
    -------
    dict
        ``defocus_u, defocus_v, defocus_angle, bfactor, scale, phase_shift, voltage,
        cs, amplitude_contrast``: float64 arrays of one value per particle.

    Raises
    ------
    UserError
        A needed column is missing (rlnDefocusU, rlnVoltage, rlnSphericalAberration,
        rlnAmplitudeContrast), a value is not a number, an optics group is unknown,
        or the amplitude contrast is outside [0, 1].
    """
    src = _source_of(table, source)
    particles = table.particles
    n = len(particles)
    optics, rows = _optics_rows(table, particles, src)
    out: dict[str, np.ndarray] = {}
    for name, label, default in _PARTICLE_FIELDS:
        if label in particles.columns:
            out[name] = _numeric(particles, label, src)
        elif default is None:
            raise UserError(where(src, field=label), f"particles have no {label} column, so the CTF is unknown; "
                                                     "run CTF estimation first or refine without CTF correction")
        elif isinstance(default, str):
            out[name] = out[default].copy()
        else:
            out[name] = np.full(n, default, dtype=np.float64)
    for name, label in _OPTICS_FIELDS:
        if label in particles.columns:
            out[name] = _numeric(particles, label, src)
        elif optics is not None and label in optics.columns:
            out[name] = _numeric(optics, label, src, "data_optics")[rows]
        else:
            raise UserError(where(src, field=label), f"no {label} in the optics or particle table, so the CTF is "
                                                     "incomplete; add it to data_optics")
    q0 = out["amplitude_contrast"]
    bad = np.flatnonzero((q0 < 0) | (q0 > 1))
    if bad.size:
        r = int(bad[0])
        raise UserError(where(src, row=r + 1, field="rlnAmplitudeContrast"),
                        f"amplitude contrast {q0[r]} must lie in [0, 1] (typically 0.1 for cryo-EM)")
    return out


def ctf_premultiplied(table: Any, *, source: str | None = None) -> np.ndarray:
    """Per-particle ``rlnCtfDataAreCtfPremultiplied`` flags (optics, else particles; False when absent)."""
    src = _source_of(table, source)
    particles = table.particles
    label = "rlnCtfDataAreCtfPremultiplied"
    if label in particles.columns:
        return _numeric(particles, label, src) != 0
    optics, rows = _optics_rows(table, particles, src)
    if optics is not None and label in optics.columns:
        return (_numeric(optics, label, src, "data_optics") != 0)[rows]
    return np.zeros(len(particles), dtype=bool)
