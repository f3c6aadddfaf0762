"""RELION's orientation sampling: HEALPix directions times in-plane angles.

A coarse orientation is a pair (direction, psi):

* directions are the centres of the HEALPix pixels (NEST scheme) of order
  ``--healpix_order``: ``rot`` = longitude in degrees, wrapped to (-180, 180],
  ``tilt`` = colatitude ``acos(z)`` in [0, 180]; they are reduced to the
  asymmetric unit of ``--sym`` and by ``--limit_tilt``;
* psi runs over ``0, step, 2 step, ... 360 - step`` with the same step as the
  directions, ``360 / (6 * 2**order)`` degrees.

Coarse orientations are numbered direction-major, ``idir * n_psi + ipsi``
(RELION's ``getPositionSamplingPoint`` order). At order 7 there are 196,608
directions and 768 psi angles (151 million orientations), so the full product is
never built here unless asked for: :class:`HealpixSampling` holds directions and
psi separately and materialises :class:`OrientationGrid` objects for chosen indices.

Pixel centres are computed here the way HEALPix C++ (bundled with RELION) rounds
them, not with astropy-healpix: RELION's asymmetric-unit rules compare angles
exactly, and astropy-healpix's last bits differ for ~half the pixels, which
changes which seam directions survive (12 of 126 RELION 3.1 reference cases,
e.g. D4 and O at most orders). astropy-healpix remains the reference the tests
check the centres against (to 1e-12).

Adaptive oversampling by ``os`` splits a coarse sample into the 4**os NEST
children of its pixel (order ``order + os``) times 2**os psi values centred in
the coarse psi interval, ``psi - step/2 + (k + 1/2) step / 2**os``
(``HealpixSampling::getOrientations``). The children are listed direction-major
in RELION's order: rows (HEALPix ``y``) outer, columns (``x``) inner.

The random perturbation (``--perturb``) is RELION's: one scalar
``random_perturbation`` in [-perturb, perturb] per iteration, and every sampled
orientation ``A = euler_to_matrix(rot, tilt, psi)`` is replaced by ``A @ R`` with
``R = euler_to_matrix(p, p, p)``, ``p = random_perturbation * coarse step``. Local
searches select around the unperturbed grid, as RELION does.
"""

from __future__ import annotations

from dataclasses import dataclass
import functools
import math

import numpy as np
import numpy.typing as npt

from cryodask.errors import UserError
from cryodask.geometry.euler import euler_to_matrix, matrix_to_euler
from cryodask.geometry.symmetry import (
    SymmetryGroup,
    direction_vectors,
    point_group,
    reduce_to_asymmetric_unit,
    symmetry_copies,
)

__all__ = [
    "MAX_ORDER",
    "angular_step",
    "n_directions",
    "n_psi",
    "nside",
    "max_pixel_radius",
    "nest_z_phi",
    "pixel_directions",
    "directions",
    "psi_angles",
    "child_pixels",
    "child_psi",
    "next_random_perturbation",
    "perturbation_matrix",
    "HealpixSampling",
    "healpix_sampling",
    "OrientationGrid",
    "orientation_grid",
    "oversample",
    "local_directions",
    "local_psi",
    "local_subset",
]

MAX_ORDER = 7
# Building more orientations than this at once must be asked for explicitly.
_DEFAULT_MAX_ORIENTATIONS = 3_000_000


def _check_order(order: int, where: str = "--healpix_order") -> int:
    if int(order) != order or not 0 <= order <= MAX_ORDER:
        raise UserError(where, f"HEALPix order {order} is out of range; use an integer from 0 to {MAX_ORDER}")
    return int(order)


def nside(order: int) -> int:
    """HEALPix N_side = 2**order (orders 0-29; oversampled grids go beyond MAX_ORDER)."""
    if int(order) != order or not 0 <= order <= 29:
        raise ValueError(f"HEALPix order must be an integer from 0 to 29, got {order}")
    return 1 << int(order)


def angular_step(order: int) -> float:
    """RELION's angular sampling in degrees, ``360 / (6 * 2**order)`` (order 2: 15, 3: 7.5)."""
    return 360.0 / (6 * nside(order))


def n_directions(order: int) -> int:
    """Number of HEALPix pixels on the whole sphere, ``12 * 4**order``."""
    return 12 * nside(order) ** 2


def n_psi(order: int, *, psi_step: float | None = None) -> int:
    """Number of psi angles: ``ceil(360 / psi_step)``, by default ``6 * 2**order``."""
    step = angular_step(order) if psi_step is None else float(psi_step)
    if not step > 0:
        raise UserError("--psi_step", f"psi step {psi_step} must be positive")
    return int(math.ceil(360.0 / step))


def max_pixel_radius(order: int) -> float:
    """HEALPix ``max_pixrad`` in degrees: the largest centre-to-corner angle of a pixel."""
    ns = nside(order)

    def vec(z: float, phi: float) -> np.ndarray:
        s = math.sqrt((1.0 - z) * (1.0 + z))
        return np.array([s * math.cos(phi), s * math.sin(phi), z])

    t1 = (1.0 - 1.0 / ns) ** 2
    va, vb = vec(2.0 / 3.0, math.pi / (4 * ns)), vec(1.0 - t1 / 3.0, 0.0)
    return math.degrees(math.atan2(np.linalg.norm(np.cross(va, vb)), float(va @ vb)))


_JRLL = np.array([2, 2, 2, 2, 3, 3, 3, 3, 4, 4, 4, 4], dtype=np.int64)
_JPLL = np.array([1, 3, 5, 7, 0, 2, 4, 6, 1, 3, 5, 7], dtype=np.int64)
_HALFPI = np.pi / 2


def _compact_bits(v: np.ndarray) -> np.ndarray:
    """Take the even bits of v (inverse of NEST bit interleaving)."""
    out = np.zeros_like(v)
    for k in range(MAX_ORDER + 24):
        out |= ((v >> (2 * k)) & 1) << k
    return out


def nest_z_phi(order: int, pixels: npt.ArrayLike) -> tuple[np.ndarray, np.ndarray]:
    """(z, phi) of NEST pixel centres, computed the way HEALPix C++ ``pix2ang_z_phi`` does.

    RELION's symmetry reduction compares angles exactly (``rot >= 45``, ``rot == 0``,
    signs of dot products with planes through the axes), so the pixel centres
    must round the same way as in RELION for the same directions to be kept.
    The values agree with astropy-healpix to ~1e-15 (tested).
    """
    ns = nside(order)
    pix = np.asarray(pixels, dtype=np.int64)
    fact2 = 4.0 / (12 * ns * ns)
    fact1 = (ns << 1) * fact2
    face = pix >> (2 * order)
    p = pix & (ns * ns - 1)
    ix, iy = _compact_bits(p), _compact_bits(p >> 1)
    jr = (_JRLL[face] << order) - ix - iy - 1  # ring number, 1 .. 4 nside - 1
    north, south = jr < ns, jr > 3 * ns
    nr = np.where(north, jr, np.where(south, 4 * ns - jr, ns))
    z = np.where(north, 1 - (nr * nr) * fact2, np.where(south, (nr * nr) * fact2 - 1, (2 * ns - jr) * fact1))
    kshift = np.where(north | south, 0, (jr - ns) & 1)
    num = _JPLL[face] * nr + ix - iy + 1 + kshift
    jp = np.where(num >= 0, num // 2, -((-num) // 2))  # C division truncates toward zero
    jp = np.where(jp > 4 * ns, jp - 4 * ns, jp)
    jp = np.where(jp < 1, jp + 4 * ns, jp)
    phi = (jp - (kshift + 1) * 0.5) * (_HALFPI / nr)
    return z, phi


def pixel_directions(order: int, pixels: npt.ArrayLike) -> tuple[np.ndarray, np.ndarray]:
    """(rot, tilt) in degrees of NEST pixel centres, in RELION's ranges and rounding.

    ``rot = phi * 180 / pi``, wrapped to (-180, 180] (values above 180 lose 360, as in
    RELION's ``checkDirection``); ``tilt = acos(z) * 180 / pi`` in [0, 180].
    """
    z, phi = nest_z_phi(order, pixels)
    rot = phi * 180.0 / np.pi
    rot = np.where(rot > 180.0, rot - 360.0, rot)
    # acos from the C library (as RELION), evaluated once per ring
    zu, inv = np.unique(z, return_inverse=True)
    acos = np.array([math.acos(v) for v in zu.tolist()])
    tilt = acos[inv.reshape(z.shape)] * 180.0 / np.pi
    return rot, tilt


def directions(
    order: int,
    *,
    sym: str | SymmetryGroup = "C1",
    limit_tilt: float = -91.0,
) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """RELION's coarse projection directions (``HealpixSampling::setOrientations``).

    Parameters
    ----------
    order
        HEALPix order (``--healpix_order``), 0 to 7.
    sym
        Point group (``--sym``); directions are reduced to its asymmetric unit.
    limit_tilt
        ``--limit_tilt``: with ``|limit_tilt| < 90``, a positive value keeps side views,
        ``min(tilt, 180 - tilt) >= limit_tilt``; a negative one keeps top views,
        ``min(tilt, 180 - tilt) <= -limit_tilt``. The default -91 keeps everything.

    Returns
    -------
    rot, tilt : numpy.ndarray
        float64 degrees.
    pixel : numpy.ndarray
        int64 NEST pixel index of each direction, ascending.
    """
    order = _check_order(order)
    group = point_group(sym)
    rot, tilt = pixel_directions(order, np.arange(n_directions(order)))
    keep = reduce_to_asymmetric_unit(rot, tilt, group, max_angle=0.5 * max_pixel_radius(order))
    if abs(limit_tilt) < 90.0:
        if limit_tilt == 0:
            raise UserError(
                "--limit_tilt",
                "0 would remove every direction; use a positive angle to keep side views, "
                "a negative one to keep top views, or -91 for no limit",
            )
        t = tilt[keep]
        t = np.abs(np.where(t > 90.0, t - 180.0, t))
        keep = keep[t >= limit_tilt] if limit_tilt > 0 else keep[t <= -limit_tilt]
    return rot[keep], tilt[keep], keep.astype(np.int64)


def psi_angles(order: int, *, psi_step: float | None = None) -> np.ndarray:
    """Coarse psi angles ``ipsi * step`` for ``ipsi < n_psi`` (degrees, from 0 up to 360 - step).

    The step is ``360 / n_psi(order, psi_step=psi_step)``: by default the HEALPix step.
    """
    n = n_psi(order, psi_step=psi_step)
    return np.arange(n) * (360.0 / n)


def _spread_bits(v: np.ndarray) -> np.ndarray:
    """Put bit k of v at bit 2k (NEST bit interleaving)."""
    out = np.zeros_like(v)
    for k in range(16):
        out |= ((v >> k) & 1) << (2 * k)
    return out


def child_pixels(pixels: npt.ArrayLike, oversampling: int) -> np.ndarray:
    """NEST pixels ``(..., 4**os)`` at order ``order + os`` inside each pixel, in RELION's order.

    The children of pixel p are ``4**os * p + [0, 4**os)``; they are listed with the
    HEALPix y index outer and x inner (``HealpixSampling::getOrientations``), which
    for os = 1 is simply ``4p, 4p+1, 4p+2, 4p+3``.
    """
    os_ = int(oversampling)
    if os_ < 0:
        raise ValueError(f"oversampling must be >= 0, got {oversampling}")
    f = 1 << os_
    j, i = np.divmod(np.arange(f * f, dtype=np.int64), f)  # j (y) outer, i (x) inner
    offsets = _spread_bits(i) | (_spread_bits(j) << 1)
    return np.asarray(pixels, dtype=np.int64)[..., None] * (f * f) + offsets


def child_psi(psi: npt.ArrayLike, psi_step: float, oversampling: int) -> np.ndarray:
    """Psi values ``(..., 2**os)`` centred in each coarse psi interval of width ``psi_step``."""
    n = 1 << int(oversampling)
    k = np.arange(n)
    return np.asarray(psi, dtype=np.float64)[..., None] - 0.5 * psi_step + (0.5 + k) * (psi_step / n)


def next_random_perturbation(current: float, perturb: float, rng: np.random.Generator | int | None) -> float:
    """RELION's ``resetRandomlyPerturbedSampling``: the perturbation for the next iteration.

    Adds a uniform draw from [perturb/2, perturb) to ``current`` and wraps the result
    into [-perturb, perturb], so consecutive iterations differ by at least half the
    factor. ``rng`` is a NumPy generator or a seed (reproducible).
    """
    if not 0.0 <= perturb <= 1.0:
        raise UserError("--perturb", f"random perturbation factor {perturb} must lie between 0 and 1")
    if perturb == 0.0:
        return 0.0
    rng = np.random.default_rng(rng)
    value = float(current) + rng.uniform(0.5 * perturb, perturb)
    width = 2.0 * perturb
    if value > perturb:
        value -= width * (math.floor((value - perturb) / width) + 1)
    elif value < -perturb:
        value -= width * (math.floor((value + perturb) / width))
    return value


def perturbation_matrix(random_perturbation: float, order: int) -> np.ndarray:
    """``R = euler_to_matrix(p, p, p)``, ``p = random_perturbation * angular_step(order)``.

    Perturbed orientations are ``euler_to_matrix(rot, tilt, psi) @ R``.
    """
    p = float(random_perturbation) * angular_step(order)
    return euler_to_matrix(p, p, p)


@dataclass(frozen=True, eq=False)
class OrientationGrid:
    """A materialised list of orientations (all arrays have one entry per orientation).

    Attributes
    ----------
    sampling
        The coarse :class:`HealpixSampling` this grid was drawn from.
    oversampling
        0 for coarse orientations, ``os`` for oversampled ones.
    rot, tilt, psi
        float64 degrees, perturbed when the sampling is.
    pixel
        NEST pixel of the (unperturbed) direction at order ``sampling.order + oversampling``.
    dir_index, psi_index
        Index of the coarse direction / psi in ``sampling`` that the orientation comes from.
    coarse_index
        ``dir_index * sampling.n_psi + psi_index``.
    """

    sampling: HealpixSampling
    oversampling: int
    rot: np.ndarray
    tilt: np.ndarray
    psi: np.ndarray
    pixel: np.ndarray
    dir_index: np.ndarray
    psi_index: np.ndarray

    def __len__(self) -> int:
        return len(self.rot)

    @property
    def order(self) -> int:
        """HEALPix order of the directions, ``sampling.order + oversampling``."""
        return self.sampling.order + self.oversampling

    @property
    def coarse_index(self) -> np.ndarray:
        """Flat index of the coarse orientation, ``dir_index * n_psi + psi_index``."""
        return self.dir_index * self.sampling.n_psi + self.psi_index

    def matrices(self, dtype: npt.DTypeLike = np.float64) -> np.ndarray:
        """Rotation matrices ``(n, 3, 3)`` (RELION's A, see :mod:`cryodask.geometry.euler`)."""
        return euler_to_matrix(self.rot, self.tilt, self.psi).astype(dtype, copy=False)


@dataclass(frozen=True, eq=False)
class HealpixSampling:
    """Coarse directions and psi angles of one iteration (the product is implicit).

    Build with :func:`healpix_sampling`. ``rot``, ``tilt`` and ``psi`` are the
    unperturbed grid values; :meth:`orientations` and :meth:`oversample` apply the
    perturbation.
    """

    order: int
    sym: SymmetryGroup
    limit_tilt: float
    psi_step: float
    random_perturbation: float
    rot: np.ndarray
    tilt: np.ndarray
    pixel: np.ndarray
    psi: np.ndarray

    @property
    def n_directions(self) -> int:
        return len(self.rot)

    @property
    def n_psi(self) -> int:
        return len(self.psi)

    @property
    def n_orientations(self) -> int:
        return self.n_directions * self.n_psi

    @property
    def angular_step(self) -> float:
        """HEALPix step of the directions in degrees."""
        return angular_step(self.order)

    def direction_vectors(self) -> np.ndarray:
        """Unit vectors ``(n_directions, 3)`` of the unperturbed directions."""
        return direction_vectors(self.rot, self.tilt)

    @functools.cached_property
    def _direction_copies(self) -> np.ndarray:
        # (n_ops, n_directions, 3), reused by every local search on this sampling
        return symmetry_copies(self.direction_vectors(), self.sym)

    def _grid(self, rot, tilt, psi, pixel, idir, ipsi, oversampling) -> OrientationGrid:
        if self.random_perturbation != 0.0:
            a = euler_to_matrix(rot, tilt, psi) @ perturbation_matrix(self.random_perturbation, self.order)
            rot, tilt, psi = matrix_to_euler(a)
        return OrientationGrid(self, oversampling, rot, tilt, psi, pixel, idir, ipsi)

    def _split(self, indices: npt.ArrayLike | None) -> tuple[np.ndarray, np.ndarray]:
        if indices is None:
            idx = np.arange(self.n_orientations, dtype=np.int64)
        else:
            idx = np.asarray(indices, dtype=np.int64).ravel()
            if idx.size and (idx.min() < 0 or idx.max() >= self.n_orientations):
                raise IndexError(f"orientation index out of range [0, {self.n_orientations})")
        return np.divmod(idx, self.n_psi)

    def orientations(
        self, indices: npt.ArrayLike | None = None, *, max_orientations: int = _DEFAULT_MAX_ORIENTATIONS
    ) -> OrientationGrid:
        """Coarse orientations for flat indices ``idir * n_psi + ipsi`` (all when None).

        Raises ``ValueError`` when more than ``max_orientations`` would be built.
        """
        idir, ipsi = self._split(indices)
        if len(idir) > max_orientations:
            raise ValueError(
                f"{len(idir)} orientations requested (> max_orientations={max_orientations}); "
                "work with directions and psi separately or pass indices"
            )
        return self._grid(self.rot[idir], self.tilt[idir], self.psi[ipsi], self.pixel[idir], idir, ipsi, 0)

    def oversample(
        self, indices: npt.ArrayLike, oversampling: int, *, max_orientations: int = _DEFAULT_MAX_ORIENTATIONS
    ) -> OrientationGrid:
        """Fine orientations (``8**os`` per coarse one) for flat coarse ``indices``.

        For each coarse index in the given order: its ``4**os`` child directions (RELION
        order), each with its ``2**os`` psi sub-steps.
        """
        os_ = int(oversampling)
        idir, ipsi = self._split(indices)
        nd, npsi = 1 << (2 * os_), 1 << os_
        total = len(idir) * nd * npsi
        if total > max_orientations:
            raise ValueError(f"{total} oversampled orientations requested (> max_orientations={max_orientations})")
        fine_order = self.order + os_
        if fine_order > 29:
            raise ValueError(f"oversampled HEALPix order {fine_order} is too large")
        pix = child_pixels(self.pixel[idir], os_)  # (n, nd)
        rot, tilt = pixel_directions(fine_order, pix.ravel())
        rot, tilt = rot.reshape(pix.shape), tilt.reshape(pix.shape)
        psi = child_psi(self.psi[ipsi], self.psi_step, os_)  # (n, npsi)
        shape = (len(idir), nd, npsi)
        rot = np.broadcast_to(rot[:, :, None], shape).ravel()
        tilt = np.broadcast_to(tilt[:, :, None], shape).ravel()
        pixel = np.broadcast_to(pix[:, :, None], shape).ravel()
        psi = np.broadcast_to(psi[:, None, :], shape).ravel()
        per = nd * npsi
        return self._grid(rot, tilt, psi, pixel, np.repeat(idir, per), np.repeat(ipsi, per), os_)


def healpix_sampling(
    order: int,
    *,
    sym: str | SymmetryGroup = "C1",
    limit_tilt: float = -91.0,
    psi_step: float | None = None,
    random_perturbation: float = 0.0,
) -> HealpixSampling:
    """The coarse sampling of one iteration.

    Parameters
    ----------
    order
        ``--healpix_order`` (0-7).
    sym
        ``--sym``.
    limit_tilt
        ``--limit_tilt`` (see :func:`directions`).
    psi_step
        ``--psi_step``; by default the HEALPix step (RELION's 3D default).
    random_perturbation
        This iteration's perturbation instance in [-1, 1] (RELION's
        ``rlnSamplingPerturbInstance``), see :func:`next_random_perturbation`.
    """
    rot, tilt, pixel = directions(order, sym=sym, limit_tilt=limit_tilt)
    psi = psi_angles(order, psi_step=psi_step)
    return HealpixSampling(
        order=order,
        sym=point_group(sym),
        limit_tilt=float(limit_tilt),
        psi_step=360.0 / len(psi),
        random_perturbation=float(random_perturbation),
        rot=rot,
        tilt=tilt,
        pixel=pixel,
        psi=psi,
    )


def orientation_grid(
    order: int,
    *,
    sym: str | SymmetryGroup = "C1",
    limit_tilt: float = -91.0,
    random_perturbation: float = 0.0,
    max_orientations: int = _DEFAULT_MAX_ORIENTATIONS,
) -> OrientationGrid:
    """All coarse orientations (directions x psi) of a sampling, materialised.

    Fine up to order 4 (C1: 3072 x 96 = 294,912 orientations); larger grids raise
    ``ValueError`` unless ``max_orientations`` is raised.
    """
    s = healpix_sampling(order, sym=sym, limit_tilt=limit_tilt, random_perturbation=random_perturbation)
    return s.orientations(max_orientations=max_orientations)


def oversample(grid: OrientationGrid, rows: npt.ArrayLike, oversampling: int) -> OrientationGrid:
    """Oversampled children of rows ``rows`` of a coarse grid (see :meth:`HealpixSampling.oversample`)."""
    if grid.oversampling != 0:
        raise ValueError("oversample() needs a coarse grid (oversampling 0)")
    rows = np.asarray(rows, dtype=np.int64).ravel()
    return grid.sampling.oversample(grid.coarse_index[rows], oversampling)


def _log_normalised(d2_over_2s2: np.ndarray) -> np.ndarray:
    a = -d2_over_2s2
    m = a.max()
    return a - (m + np.log(np.exp(a - m).sum()))


def local_directions(
    sampling: HealpixSampling,
    prior_rot: float,
    prior_tilt: float,
    *,
    sigma_rot: float,
    sigma_tilt: float,
    sigma_cutoff: float = 3.0,
) -> tuple[np.ndarray, np.ndarray]:
    """Directions with a non-zero Gaussian prior around (prior_rot, prior_tilt).

    RELION's ``selectOrientationsWithNonZeroPriorProbability`` (3D, no relaxed
    symmetry): each grid direction is compared with the prior through the symmetry
    copy nearest to it.

    * ``sigma_rot > 0`` and ``sigma_tilt > 0``: the distance is the angle between the
      directions; ``sigma = max(sigma_rot, sigma_tilt)``.
    * only ``sigma_rot > 0``: the angle of the direction out of the plane through z
      and the prior's rot.
    * only ``sigma_tilt > 0``: ``|tilt - prior_tilt|``.
    * neither: every direction, uniform prior.

    Directions with distance ``< sigma_cutoff * sigma`` are kept with prior
    ``exp(-d**2 / (2 sigma**2))``, normalised to sum 1. When none is that close the
    single nearest direction is returned with prior 1.

    Returns
    -------
    indices : numpy.ndarray
        int64 indices into the sampling's directions, ascending.
    log_prior : numpy.ndarray
        float64 natural log of the normalised prior of each.
    """
    n = sampling.n_directions
    if not (sigma_rot > 0 or sigma_tilt > 0):
        return np.arange(n, dtype=np.int64), np.full(n, -np.log(n))
    copies = sampling._direction_copies  # (G, n, 3)
    if sigma_rot > 0 and sigma_tilt > 0:
        sigma = max(sigma_rot, sigma_tilt)
        prior = direction_vectors(prior_rot, prior_tilt)
        cos_best = np.clip((copies @ prior).max(axis=0), -1.0, 1.0)
        dist = np.rad2deg(np.arccos(cos_best))
    elif sigma_rot > 0:
        sigma = sigma_rot
        r = np.deg2rad(prior_rot)
        # y component after rotating the frame by prior_rot about z
        y = -np.sin(r) * copies[..., 0] + np.cos(r) * copies[..., 1]
        dist = np.rad2deg(np.arcsin(np.clip(np.abs(y), 0.0, 1.0))).min(axis=0)
    else:
        sigma = sigma_tilt
        tilt = np.rad2deg(np.arccos(np.clip(copies[..., 2], -1.0, 1.0)))
        dist = np.abs(tilt - prior_tilt).min(axis=0)
    sel = np.flatnonzero(dist < sigma_cutoff * sigma)
    if len(sel) == 0:
        return np.array([int(np.argmin(dist))], dtype=np.int64), np.zeros(1)
    return sel.astype(np.int64), _log_normalised(dist[sel] ** 2 / (2.0 * sigma**2))


def local_psi(
    sampling: HealpixSampling,
    prior_psi: float,
    *,
    sigma_psi: float,
    sigma_cutoff: float = 3.0,
) -> tuple[np.ndarray, np.ndarray]:
    """Psi angles with a non-zero Gaussian prior around ``prior_psi`` (RELION's rule).

    The distance is the circular difference ``|psi - prior_psi|`` (not
    symmetry-adjusted, as in RELION); kept when ``< sigma_cutoff * sigma_psi``;
    the nearest one alone when none is. ``sigma_psi <= 0`` keeps all, uniformly.
    """
    n = sampling.n_psi
    if not sigma_psi > 0:
        return np.arange(n, dtype=np.int64), np.full(n, -np.log(n))
    d = np.mod(sampling.psi - prior_psi, 360.0)
    d = np.minimum(d, 360.0 - d)
    sel = np.flatnonzero(d < sigma_cutoff * sigma_psi)
    if len(sel) == 0:
        return np.array([int(np.argmin(d))], dtype=np.int64), np.zeros(1)
    return sel.astype(np.int64), _log_normalised(d[sel] ** 2 / (2.0 * sigma_psi**2))


def local_subset(
    sampling: HealpixSampling | OrientationGrid,
    prior_rot: float,
    prior_tilt: float,
    prior_psi: float,
    *,
    sigma_rot: float,
    sigma_tilt: float,
    sigma_psi: float,
    sigma_cutoff: float = 3.0,
) -> tuple[np.ndarray, np.ndarray]:
    """Coarse orientations for a local search around a previous pose.

    The product of :func:`local_directions` and :func:`local_psi` (RELION treats
    directions and psi separately). ``--sigma_ang s`` means
    ``sigma_rot = sigma_tilt = sigma_psi = s`` in RELION (a +-3 s window).

    Returns
    -------
    indices : numpy.ndarray
        Flat coarse indices ``idir * n_psi + ipsi`` (pass to
        :meth:`HealpixSampling.orientations`), direction-major.
    log_prior : numpy.ndarray
        ``log(direction prior) + log(psi prior)``; ``exp`` sums to 1.
    """
    if isinstance(sampling, OrientationGrid):
        sampling = sampling.sampling
    di, dl = local_directions(
        sampling, prior_rot, prior_tilt, sigma_rot=sigma_rot, sigma_tilt=sigma_tilt, sigma_cutoff=sigma_cutoff
    )
    pi, pl = local_psi(sampling, prior_psi, sigma_psi=sigma_psi, sigma_cutoff=sigma_cutoff)
    idx = (di[:, None] * sampling.n_psi + pi[None, :]).ravel()
    return idx, (dl[:, None] + pl[None, :]).ravel()
