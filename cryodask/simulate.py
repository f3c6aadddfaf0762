"""Simulated particles with known ground truth: phantoms, random poses, CTF, noise.

``simulate_particles`` projects one or more maps at uniform random orientations
with small random shifts, applies RELION's CTF with a defocus spread, and adds
white Gaussian noise at a chosen SNR. With several maps the particles are a
mixture with true class labels. The ground truth (poses, shifts, classes) is
returned apart from the particle table, and written to ``truth.star``, which
jobs never read.

SNR is the ratio of the mean per-image variance of the noiseless (CTF-affected)
images to the noise variance, over the whole box.
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

import numpy as np
import pandas as pd
from scipy.spatial.transform import Rotation

from cryodask.geometry.euler import matrix_to_euler


def phantom(box: int, *, seed: int = 0, n_blobs: int = 400, radius: float = 0.3) -> np.ndarray:
    """An asymmetric, protein-like density: Gaussian blobs inside an ellipsoid.

    Parameters
    ----------
    box
        Side of the cubic map in pixels.
    seed
        The same seed gives the same map.
    n_blobs
        Number of Gaussian blobs.
    radius
        Extent of the molecule as a fraction of the box (the ellipsoid's largest semi-axis).

    Returns
    -------
    (box, box, box) float32 map, values in [0, 1].
    """
    rng = np.random.default_rng(seed)
    axes = np.array([1.0, 0.8, 0.65]) * radius * box
    centres = []
    while len(centres) < n_blobs:
        p = rng.uniform(-1, 1, 3)
        if np.sum(p**2) <= 1:
            centres.append(p * axes)
    centres = np.array(centres)
    # blob widths of 1-2 px at box 64 give detail out to about 3 px, like a map at moderate resolution
    sigmas = rng.uniform(1.0, 2.0, n_blobs) * box / 64
    amps = rng.uniform(0.3, 1.0, n_blobs)
    # an off-centre arm breaks any accidental symmetry (and makes the hand visible)
    arm = np.linspace(0, 1, 16)[:, None] * np.array([0.2, 0.25, 0.3]) * box + np.array([0.15, 0.0, 0.1]) * box
    centres = np.vstack([centres, arm])
    sigmas = np.concatenate([sigmas, np.full(len(arm), 1.5 * box / 64)])
    amps = np.concatenate([amps, np.full(len(arm), 0.8)])
    grid = np.arange(box, dtype=np.float32) - box // 2
    vol = np.zeros((box, box, box), np.float32)
    for (cx, cy, cz), s, a in zip(centres, sigmas, amps, strict=True):
        gx = np.exp(-((grid - cx) ** 2) / (2 * s * s))
        gy = np.exp(-((grid - cy) ** 2) / (2 * s * s))
        gz = np.exp(-((grid - cz) ** 2) / (2 * s * s))
        vol += a * gz[:, None, None] * gy[None, :, None] * gx[None, None, :]
    return (vol / vol.max()).astype(np.float32)


def phantom_variant(volume: np.ndarray, *, fraction: float = 0.1, seed: int = 1) -> np.ndarray:
    """A second map that differs from ``volume`` in about ``fraction`` of its density.

    Removes the density inside a sphere placed on the molecule's edge and adds
    a blob of equal mass elsewhere, as a conformational or compositional
    difference that classification should find.
    """
    rng = np.random.default_rng(seed)
    box = volume.shape[0]
    total = float(volume.sum())
    z, y, x = np.indices(volume.shape) - box // 2
    mass_points = np.argwhere(volume > 0.3 * volume.max()) - box // 2
    out = volume.copy()
    # grow a sphere around a peripheral point until it holds `fraction` of the mass
    far = mass_points[np.argsort(np.sum(mass_points**2, axis=1))[-len(mass_points) // 10:]]
    centre = far[rng.integers(len(far))]
    r2 = (z - centre[0]) ** 2 + (y - centre[1]) ** 2 + (x - centre[2]) ** 2
    for r in np.arange(2, box / 2, 0.5):
        inside = r2 <= r * r
        if volume[inside].sum() >= fraction * total:
            break
    out[inside] = 0
    removed = volume[inside].sum()
    # put the mass back as a blob on the opposite side
    c2 = -centre * 0.9
    s = max(r / 2, 2.0)
    blob = np.exp(-((z - c2[0]) ** 2 + (y - c2[1]) ** 2 + (x - c2[2]) ** 2) / (2 * s * s)).astype(np.float32)
    out += blob * (removed / blob.sum())
    return out.astype(np.float32)


def random_poses(n: int, rng: np.random.Generator) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """Uniformly distributed orientations on SO(3), as RELION Euler angles (rot, tilt, psi) in degrees."""
    matrices = Rotation.random(n, random_state=rng).as_matrix()
    return matrix_to_euler(matrices)


@dataclass
class SimulatedData:
    """Particle images with their RELION tables; ``truth`` holds what jobs must not see."""

    images: np.ndarray  # (N, B, B) float32
    optics: pd.DataFrame
    particles: pd.DataFrame
    truth: pd.DataFrame
    pixel_size: float


def simulate_particles(
    volumes: list[np.ndarray],
    pixel_size: float,
    *,
    n: int,
    snr: float = 0.1,
    seed: int = 0,
    class_fractions: list[float] | None = None,
    max_shift: float = 3.0,
    defocus_min: float = 10000.0,
    defocus_max: float = 25000.0,
    astigmatism: float = 500.0,
    voltage: float = 300.0,
    cs: float = 2.7,
    amplitude_contrast: float = 0.1,
    bfactor: float = 0.0,
    n_optics_groups: int = 1,
    pad: int = 2,
    stack_name: str = "particles.mrcs",
) -> SimulatedData:
    """Simulate ``n`` particle images from one or more maps.

    Parameters
    ----------
    volumes
        Maps (B, B, B) of the same box; several maps give a mixture with true class labels.
    pixel_size
        Å per pixel.
    n, snr, seed
        Number of particles, signal-to-noise ratio (variance ratio), random seed.
    class_fractions
        Share of particles from each map (default equal).
    max_shift
        Shifts are drawn from a normal distribution with this standard deviation in
        pixels, clipped to 2x it; stored as ``rlnOriginXAngst/YAngst``.
    defocus_min, defocus_max, astigmatism
        Defocus U is uniform in [min, max] Å; V = U - uniform(0, astigmatism); random angle.
    n_optics_groups
        Particles are split into this many optics groups, alternating; group g has
        spherical aberration ``cs + 0.1*(g-1)`` so the groups differ.
    """
    from cryodask.ops import ctf as ctf_ops
    from cryodask.ops.project import project_images

    rng = np.random.default_rng(seed)
    box = volumes[0].shape[0]
    if any(v.shape != (box, box, box) for v in volumes):
        raise ValueError("all maps must have the same cubic box")
    k = len(volumes)
    fractions = np.asarray(class_fractions if class_fractions is not None else [1.0 / k] * k, float)
    classes = rng.choice(k, size=n, p=fractions / fractions.sum()) + 1
    rot, tilt, psi = random_poses(n, rng)
    shifts = np.clip(rng.normal(0, max_shift, (n, 2)), -2 * max_shift, 2 * max_shift) if max_shift > 0 \
        else np.zeros((n, 2))
    du = rng.uniform(defocus_min, defocus_max, n)
    dv = du - rng.uniform(0, astigmatism, n)
    dang = rng.uniform(0, 180, n)
    groups = np.arange(n) % n_optics_groups + 1

    optics = pd.DataFrame({
        "rlnOpticsGroupName": [f"opticsGroup{g}" for g in range(1, n_optics_groups + 1)],
        "rlnOpticsGroup": np.arange(1, n_optics_groups + 1),
        "rlnMicrographOriginalPixelSize": pixel_size,
        "rlnVoltage": voltage,
        "rlnSphericalAberration": cs + 0.1 * np.arange(n_optics_groups),
        "rlnAmplitudeContrast": amplitude_contrast,
        "rlnImagePixelSize": pixel_size,
        "rlnImageSize": box,
        "rlnImageDimensionality": 2,
    })
    names = [f"{i + 1:06d}@{stack_name}" for i in range(n)]
    particles = pd.DataFrame({
        "rlnImageName": names,
        "rlnMicrographName": [f"mic{(i // 50) + 1:04d}.mrc" for i in range(n)],
        "rlnDefocusU": du,
        "rlnDefocusV": dv,
        "rlnDefocusAngle": dang,
        "rlnCtfBfactor": bfactor,
        "rlnCtfScalefactor": 1.0,
        "rlnPhaseShift": 0.0,
        "rlnOpticsGroup": groups,
    })
    truth = pd.DataFrame({
        "rlnImageName": names,
        "rlnAngleRot": rot,
        "rlnAngleTilt": tilt,
        "rlnAnglePsi": psi,
        "rlnOriginXAngst": shifts[:, 0] * pixel_size,
        "rlnOriginYAngst": shifts[:, 1] * pixel_size,
        "rlnClassNumber": classes,
        "rlnOpticsGroup": groups,
    })

    images = np.empty((n, box, box), np.float32)
    cs_per_particle = optics["rlnSphericalAberration"].to_numpy()[groups - 1]
    for c in range(1, k + 1):
        sel = np.flatnonzero(classes == c)
        if len(sel) == 0:
            continue
        ctf = ctf_ops.ctf_2d(box, pixel_size, defocus_u=du[sel], defocus_v=dv[sel], defocus_angle=dang[sel],
                             voltage=voltage, cs=cs_per_particle[sel], amplitude_contrast=amplitude_contrast,
                             bfactor=bfactor)
        images[sel] = project_images(volumes[c - 1], rot[sel], tilt[sel], psi[sel],
                                     origins=shifts[sel], ctf=ctf, pad=pad)
    signal_var = float(images.var(axis=(1, 2)).mean())
    noise_sigma = np.sqrt(signal_var / snr) if snr > 0 else 0.0
    images += rng.normal(0, noise_sigma, images.shape).astype(np.float32)
    return SimulatedData(images=images, optics=optics, particles=particles, truth=truth, pixel_size=pixel_size)


def write_simulation(out_dir: str | Path, data: SimulatedData, *, stack_name: str = "particles.mrcs") -> dict[str, Path]:
    """Write ``particles.mrcs``, ``particles.star`` (RELION 3.1) and ``truth.star`` into ``out_dir``."""
    from cryodask.io.mrc import write_stack
    from cryodask.io.star import ParticleTable, write_particles

    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    paths = {"stack": out / stack_name, "particles": out / "particles.star", "truth": out / "truth.star"}
    write_stack(paths["stack"], data.images, data.pixel_size)
    write_particles(paths["particles"], ParticleTable(optics=data.optics, particles=data.particles))
    truth = data.particles.merge(data.truth.drop(columns=["rlnOpticsGroup"]), on="rlnImageName")
    write_particles(paths["truth"], ParticleTable(optics=data.optics, particles=truth))
    return paths
