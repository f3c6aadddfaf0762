"""Point-group symmetry with RELION's conventions (``--sym``).

Supported groups are the rotation groups used for single particles:

=========  =====  ===========================================================
name       order  generators (RELION ``SymList::fill_symmetry_class``)
=========  =====  ===========================================================
``C<n>``   n      n-fold about z
``D<n>``   2n     n-fold about z, 2-fold about x
``T``      12     3-fold about z, 2-fold about (0, sqrt(2/3), sqrt(1/3))
``O``      24     3-fold about (1, 1, 1)/sqrt(3), 4-fold about z
``I2``     60     2-folds on x, y, z; a 5-fold in the xz plane at
                  (1, 0, phi)/|.|, tilted 31.7 deg from z ("I" means I2)
``I1``     60     I2 turned by 90 deg about y: 2-folds on x, y, z, 5-fold
                  at (phi, 0, -1)/|.|
``I3``     60     5-fold about z, a 2-fold at (-1, 0, phi)/|.|
``I4``     60     5-fold about z, a 2-fold at (1, 0, phi)/|.|
=========  =====  ===========================================================

(phi is the golden ratio.) Names are case-insensitive, as in RELION.

Directions are reduced to an asymmetric unit as RELION's
``HealpixSampling::removeSymmetryEquivalentPoints`` does: first a geometric
rule per group (ranges of rot/tilt and half-spaces bounded by planes through
symmetry axes, using RELION's own plane normals so that points on the
boundaries go the same way), then, for fewer than 4000 directions, a greedy
pass that drops any direction whose symmetry copy lies within half a HEALPix
pixel radius of an already kept one (this cleans the seams).
"""

from __future__ import annotations

from dataclasses import dataclass
import functools
import math
import re

import numpy as np
import numpy.typing as npt

from cryodask.errors import UserError

__all__ = [
    "SymmetryGroup",
    "point_group",
    "symmetry_group",
    "direction_vectors",
    "in_asymmetric_unit",
    "reduce_to_asymmetric_unit",
    "symmetry_copies",
]

_GOLDEN = (1.0 + np.sqrt(5.0)) / 2.0
_BAD_NAME = "unknown point group '{}'; use C<n>, D<n>, T, O or I"
# RELION only cleans the seams for small direction sets (too slow otherwise).
_SEAM_LIMIT = 4000


def _unit(v) -> np.ndarray:
    v = np.asarray(v, dtype=np.float64)
    return v / np.linalg.norm(v)


def _axis_rotation(axis: np.ndarray, angle_deg: float) -> np.ndarray:
    """Right-handed rotation matrix by ``angle_deg`` about unit ``axis`` (Rodrigues)."""
    x, y, z = axis
    a = np.deg2rad(angle_deg)
    c, s = np.cos(a), np.sin(a)
    k = np.array([[0.0, -z, y], [z, 0.0, -x], [-y, x, 0.0]])
    return np.eye(3) * c + s * k + (1.0 - c) * np.outer(axis, axis)


def _close_group(generators: list[tuple[int, np.ndarray]], tol: float = 1e-6) -> np.ndarray:
    """All products of n-fold rotations about the given axes; identity first."""
    gens = [_axis_rotation(axis, 360.0 / fold) for fold, axis in generators if fold > 1]
    elements = [np.eye(3)]
    frontier = [np.eye(3)]
    while frontier:
        new = []
        for e in frontier:
            for g in gens:
                m = g @ e
                if not any(np.abs(m - x).max() < tol for x in elements):
                    elements.append(m)
                    new.append(m)
        frontier = new
        if len(elements) > 1000:  # pragma: no cover - would mean a non-finite group
            raise RuntimeError("symmetry generators do not close into a finite group")
    out = np.stack(elements)
    # Snap round-off so exact values (0, +-1, +-0.5) are exact.
    out[np.abs(out) < 1e-14] = 0.0
    return out


# RELION's plane normals for the geometric asymmetric-unit rules (healpix_sampling.cpp,
# removeSymmetryEquivalentPointsGeometric); kept at RELION's precision on purpose.
_T_NORMALS = [(-0.942809, 0.0, 0.0), (0.471405, 0.272165, 0.7698), (0.471404, 0.816497, 0.0)]
_O_NORMALS = [(0.0, -1.0, 1.0), (1.0, 1.0, 0.0), (-1.0, 1.0, 0.0)]
_I2_NORMALS = [
    (0.0, 1.0, 0.0),
    (-0.4999999839058737, -0.8090170074556163, 0.3090169861701543),
    (0.4999999839058737, -0.8090170074556163, 0.3090169861701543),
]
_I4_NORMALS = [
    (0.0, 0.0, 1.0),
    (0.187592467856686, -0.303530987314591, -0.491123477863004),
    (0.187592467856686, 0.303530987314591, -0.491123477863004),
]
_I_TILT = 31.7174745559  # deg, the angle between a 5-fold and the nearest 2-fold


@dataclass(frozen=True, eq=False)
class SymmetryGroup:
    """A point group: its RELION name, family and rotation matrices.

    Attributes
    ----------
    name
        Canonical upper-case name (``"C4"``, ``"D7"``, ``"T"``, ``"O"``, ``"I2"``...);
        plain ``"I"`` is kept as ``"I"`` and means RELION's default I2.
    family
        ``"C"``, ``"D"``, ``"T"``, ``"O"`` or ``"I"``.
    n
        The n of C<n>/D<n>; the variant 1-4 for I (2 for plain I); 0 for T and O.
    matrices
        ``(n_ops, 3, 3)`` float64 rotations, identity first. ``matrices[k] @ v`` is
        the k-th symmetry copy of a vector ``v``.
    """

    name: str
    family: str
    n: int
    matrices: np.ndarray

    def __len__(self) -> int:
        return len(self.matrices)

    @property
    def order(self) -> int:
        """Number of operations |G|."""
        return len(self.matrices)


def _parse(name: str) -> tuple[str, int]:
    s = str(name).strip().upper()
    m = re.fullmatch(r"([CD])(\d{1,2})", s)
    if m:
        n = int(m.group(2))
        if n >= 1:
            return m.group(1), n
    elif s in ("T", "O"):
        return s, 0
    elif s == "I":
        return "I", 2
    elif re.fullmatch(r"I[1-4]", s):
        return "I", int(s[1])
    raise UserError("--sym", _BAD_NAME.format(name))


def point_group(sym: str | SymmetryGroup) -> SymmetryGroup:
    """The :class:`SymmetryGroup` for a RELION symmetry name (or pass one through).

    Raises
    ------
    UserError
        For a name that is not C<n>, D<n> (n = 1..99), T, O, I or I1..I4.
    """
    if isinstance(sym, SymmetryGroup):
        return sym
    family, n = _parse(sym)
    plain_i = str(sym).strip().upper() == "I"
    return _build(family, n, plain_i)


@functools.lru_cache(maxsize=64)
def _build(family: str, n: int, plain_i: bool) -> SymmetryGroup:
    z = np.array([0.0, 0.0, 1.0])
    x = np.array([1.0, 0.0, 0.0])
    if family == "C":
        gens = [(n, z)]
    elif family == "D":
        gens = [(n, z), (2, x)]
    elif family == "T":
        gens = [(3, z), (2, _unit([0.0, np.sqrt(2.0 / 3.0), np.sqrt(1.0 / 3.0)]))]
    elif family == "O":
        gens = [(3, _unit([1.0, 1.0, 1.0])), (4, z)]
    else:
        g = _GOLDEN
        # Exact forms of RELION's rounded axes (tests find RELION's values in the group).
        gens = {
            1: [(2, x), (5, _unit([g, 0.0, -1.0])), (3, _unit([g, 1.0 / g, 0.0]))],
            2: [(2, z), (5, _unit([1.0, 0.0, g])), (3, _unit([0.0, 1.0 / g, g]))],
            3: [
                (2, _unit([-1.0, 0.0, g])),
                (5, z),
                (3, _unit([-0.4911234778630044, 0.3568220764705179, 0.7946544753759428])),
            ],
            4: [
                (2, _unit([1.0, 0.0, g])),
                (5, _unit([2.0, 0.0, 1.0])),
                (3, _unit([0.4911234778630044, 0.3568220764705179, 0.7946544753759428])),
            ],
        }[n]
    canonical = {"C": f"C{n}", "D": f"D{n}", "T": "T", "O": "O"}.get(family)
    if canonical is None:
        canonical = "I" if plain_i else f"I{n}"
    matrices = _close_group(gens)
    matrices.setflags(write=False)  # shared through the cache
    return SymmetryGroup(canonical, family, n, matrices)


def symmetry_group(name: str) -> np.ndarray:
    """Rotation matrices ``(n_ops, 3, 3)`` of the point group ``name``, identity first.

    Examples
    --------
    >>> symmetry_group("D2").shape
    (4, 3, 3)
    """
    return point_group(name).matrices.copy()


def direction_vectors(rot: npt.ArrayLike, tilt: npt.ArrayLike) -> np.ndarray:
    """Unit vectors ``(..., 3)`` of directions (RELION ``Euler_angles2direction``), degrees.

    ``(sin(tilt) cos(rot), sin(tilt) sin(rot), cos(tilt))``, rounded as RELION does
    (``d * pi / 180``), so that exact boundary tests go the same way.
    """
    r = np.asarray(rot, dtype=np.float64) * np.pi / 180.0
    t = np.asarray(tilt, dtype=np.float64) * np.pi / 180.0
    st = np.sin(t)
    return np.stack([st * np.cos(r), st * np.sin(r), np.cos(t)], axis=-1)


def symmetry_copies(vectors: npt.ArrayLike, sym: str | SymmetryGroup) -> np.ndarray:
    """All symmetry copies ``(n_ops, ..., 3)`` of unit vectors ``(..., 3)``; copy 0 is the input."""
    v = np.asarray(vectors, dtype=np.float64)
    return np.einsum("gij,...j->g...i", point_group(sym).matrices, v)


def _half_spaces(d: np.ndarray, normals, sign: float = 1.0) -> np.ndarray:
    """d . n >= 0 (or <= 0) for every normal, summed left to right as RELION does."""
    ok = np.ones(d.shape[:-1], dtype=bool)
    for v in normals:
        n = np.asarray(v, dtype=np.float64)
        n = n / math.sqrt(float(n @ n))
        dot = d[..., 0] * n[0] + d[..., 1] * n[1] + d[..., 2] * n[2]
        ok &= (dot >= 0.0) if sign > 0 else (dot <= 0.0)
    return ok


def in_asymmetric_unit(rot: npt.ArrayLike, tilt: npt.ArrayLike, sym: str | SymmetryGroup) -> np.ndarray:
    """RELION's geometric asymmetric-unit test for directions (boolean mask).

    ``rot`` must be in [-180, 180] and ``tilt`` in [0, 180] degrees (as HEALPix
    directions are). Comparisons are exact, as in RELION: which directions on a
    boundary are kept depends on their last bits, so pass RELION-rounded values
    (:func:`cryodask.geometry.healpix.pixel_directions`) for RELION's choice. Both
    copies of a direction on a seam may pass; :func:`reduce_to_asymmetric_unit`
    removes such duplicates.
    """
    g = point_group(sym)
    rot = np.asarray(rot, dtype=np.float64)
    tilt = np.asarray(tilt, dtype=np.float64)
    upper = tilt <= 90.0
    if g.family == "C":
        return (rot >= -180.0 / g.n) & (rot <= 180.0 / g.n)
    if g.family == "D":
        if g.n == 1:
            return upper
        return (rot >= -180.0 / g.n + 90.0) & (rot <= 180.0 / g.n + 90.0) & upper
    d = direction_vectors(rot, tilt)
    if g.family == "T":
        pre = ((rot >= 90.0) & (rot <= 150.0)) | (rot == 0.0)
        return pre & _half_spaces(d, _T_NORMALS)
    if g.family == "O":
        pre = ((rot >= 45.0) & (rot <= 135.0) & upper) | (rot == 0.0)
        return pre & _half_spaces(d, _O_NORMALS)
    # Icosahedral variants: RELION turns the I2 (or I4) normals about y by a tilt.
    if g.n == 2:
        return _half_spaces(d, _I2_NORMALS)
    if g.n == 1:
        return _half_spaces(d, [_tilted(v, 90.0) for v in _I2_NORMALS])
    if g.n == 3:
        return _half_spaces(d, [_tilted(v, _I_TILT) for v in _I2_NORMALS])
    return _half_spaces(d, [_tilted(v, -_I_TILT) for v in _I4_NORMALS], sign=-1.0)


def _tilted(v, tilt: float) -> tuple[float, float, float]:
    """``euler_to_matrix(0, tilt, 0) @ v`` with RELION's rounding."""
    b = tilt * math.pi / 180.0
    cb, sb = math.cos(b), math.sin(b)
    x, y, z = v
    return (cb * x + -sb * z, y, sb * x + cb * z)


def reduce_to_asymmetric_unit(
    rot: npt.ArrayLike,
    tilt: npt.ArrayLike,
    sym: str | SymmetryGroup,
    *,
    max_angle: float,
) -> np.ndarray:
    """Indices of the directions RELION keeps in the asymmetric unit, in input order.

    Parameters
    ----------
    rot, tilt
        Directions in degrees (rot in [-180, 180], tilt in [0, 180]), in HEALPix
        pixel order (the order decides which of two seam duplicates survives).
    sym
        Point group.
    max_angle
        Directions whose symmetry copy lies within this angle (degrees) of an
        earlier kept direction are dropped. RELION uses half the HEALPix
        ``max_pixrad``.

    Returns
    -------
    numpy.ndarray
        int64 indices into ``rot``/``tilt``.
    """
    g = point_group(sym)
    rot = np.asarray(rot, dtype=np.float64)
    tilt = np.asarray(tilt, dtype=np.float64)
    keep = np.flatnonzero(in_asymmetric_unit(rot, tilt, g))
    if len(keep) >= _SEAM_LIMIT or len(keep) == 0:
        return keep
    from scipy.spatial import cKDTree

    d = direction_vectors(rot[keep], tilt[keep])
    copies = symmetry_copies(d, g).reshape(-1, 3)  # (n_ops * n, 3), owner = row % n
    owner = np.tile(np.arange(len(keep)), len(g))
    chord = 2.0 * np.sin(np.deg2rad(max_angle) / 2.0)
    neighbours = cKDTree(copies).query_ball_point(d, chord)
    kept = np.zeros(len(keep), dtype=bool)
    cos_max = np.cos(np.deg2rad(max_angle))
    for i, hits in enumerate(neighbours):
        earlier = owner[hits]
        rows = np.asarray(hits)[earlier < i]
        earlier = earlier[earlier < i]
        # RELION's test is a strict dot-product threshold against kept directions only.
        close = (copies[rows] @ d[i] > cos_max) if len(rows) else np.zeros(0, bool)
        kept[i] = not np.any(kept[earlier[close]])
    return keep[kept]
