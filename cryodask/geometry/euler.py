"""RELION's Euler angles (rot, tilt, psi; ZYZ, in degrees) and rotation matrices.

The matrix ``A = euler_to_matrix(rot, tilt, psi)`` is RELION's
``Euler_angles2matrix``: it maps map coordinates to image coordinates, so the
projection of a map ``V`` is ``p(x, y) = integral V(A.T @ (x, y, z)) dz`` and the
central slice of the map's transform is read at ``A.T @ (kx, ky, 0)``.
"""

from __future__ import annotations

import numpy as np
import numpy.typing as npt


def euler_to_matrix(rot: npt.ArrayLike, tilt: npt.ArrayLike, psi: npt.ArrayLike) -> np.ndarray:
    """Rotation matrices, shape ``(..., 3, 3)``, from angles in degrees (broadcast together)."""
    a, b, g = (np.deg2rad(np.asarray(v, dtype=np.float64)) for v in (rot, tilt, psi))
    a, b, g = np.broadcast_arrays(a, b, g)
    ca, sa, cb, sb, cg, sg = np.cos(a), np.sin(a), np.cos(b), np.sin(b), np.cos(g), np.sin(g)
    cc, cs, sc, ss = cb * ca, cb * sa, sb * ca, sb * sa
    m = np.empty(a.shape + (3, 3))
    m[..., 0, 0] = cg * cc - sg * sa
    m[..., 0, 1] = cg * cs + sg * ca
    m[..., 0, 2] = -cg * sb
    m[..., 1, 0] = -sg * cc - cg * sa
    m[..., 1, 1] = -sg * cs + cg * ca
    m[..., 1, 2] = sg * sb
    m[..., 2, 0] = sc
    m[..., 2, 1] = ss
    m[..., 2, 2] = cb
    return m


def matrix_to_euler(m: npt.ArrayLike) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """(rot, tilt, psi) in degrees from rotation matrices ``(..., 3, 3)`` (RELION's ``Euler_matrix2angles``)."""
    m = np.asarray(m, dtype=np.float64)
    eps = np.finfo(np.float32).eps
    abs_sb = np.hypot(m[..., 0, 2], m[..., 1, 2])
    regular = abs_sb > 16 * eps
    gamma = np.arctan2(m[..., 1, 2], -m[..., 0, 2])
    alpha = np.arctan2(m[..., 2, 1], m[..., 2, 0])
    sin_g = np.sin(gamma)
    with np.errstate(divide="ignore", invalid="ignore"):
        sign_sb = np.where(np.abs(sin_g) < eps,
                           np.sign(-m[..., 0, 2] / np.cos(gamma)),
                           np.where(sin_g > 0, np.sign(m[..., 1, 2]), -np.sign(m[..., 1, 2])))
    beta = np.arctan2(sign_sb * abs_sb, m[..., 2, 2])
    # tilt 0 or 180: rot and psi are not separable; RELION puts it all in psi
    up = m[..., 2, 2] > 0
    alpha = np.where(regular, alpha, 0.0)
    beta = np.where(regular, beta, np.where(up, 0.0, np.pi))
    gamma = np.where(regular, gamma,
                     np.where(up, np.arctan2(-m[..., 1, 0], m[..., 0, 0]), np.arctan2(m[..., 1, 0], -m[..., 0, 0])))
    return np.rad2deg(alpha), np.rad2deg(beta), np.rad2deg(gamma)


def angular_distance(a: npt.ArrayLike, b: npt.ArrayLike, sym: str = "C1") -> np.ndarray:
    """RELION's angular distance (degrees) between rotation matrices ``a`` and ``b`` ``(..., 3, 3)``:
    the mean over the three rows (the image axes in map coordinates) of the angle between
    corresponding rows, the smallest over the symmetry copies ``a·S`` of ``a``
    (``HealpixSampling::calculateAngularDistance``; auto-refine's "changes in orientations").

    It is not the rotation angle between ``a`` and ``b``: a small rotation by θ about an axis at
    angle αᵢ to row i moves that row by θ·sin αᵢ, so the mean is about 0.8 θ.
    """
    from cryodask.geometry.symmetry import symmetry_group

    a = np.asarray(a, dtype=np.float64)
    b = np.asarray(b, dtype=np.float64)
    best = None
    for s in symmetry_group(sym):
        cos = np.einsum("...ij,...ij->...i", a @ s, b)  # row i of a·S against row i of b
        d = np.rad2deg(np.arccos(np.clip(cos, -1.0, 1.0))).mean(axis=-1)
        best = d if best is None else np.minimum(best, d)
    return best
