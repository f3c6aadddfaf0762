"""Compiled CPU kernels for the projector's gathers and the backprojector's scatters (Numba).

Taking central slices out of a 3D transform and putting them back is, per Fourier pixel, eight
reads or eight adds at computed addresses (four in 2D). Array expressions spend ~200 ns a sample on it (the
corner indices and weights are made as arrays, then gathered); a loop compiled by Numba does the
same arithmetic in registers, ~10x faster, and holds no temporary arrays. These are used for NumPy
arrays only; CuPy arrays keep the array expressions of :mod:`cryodask.ops.project` (the GPU runs
those as fused kernels already).

The arithmetic is that of :func:`cryodask.ops.project.trilinear_corners`: the grid is RELION's
centred Hermitian half (x from 0, y and z centred at ``half_extent``), points with ``x < 0`` are
mirrored through the origin and their values conjugated, and corner indices are clipped into the
array (points on the outer edge then get weight 0 at their far corners).

The kernels take the complex arrays as views of their real and imaginary parts and keep the
arithmetic in the arrays' precision: complex arithmetic on complex64 values with float weights ran
in double precision, at half the speed (37 → 17 ns per sample for a gather at box 128).
"""

from __future__ import annotations

import numpy as np
from numba import njit


@njit(cache=True, nogil=True, fastmath=False)
def _corner(x, y, z, half_extent: int, nz: int, ny: int, nx: int):
    """Mirror (x < 0), lower corner (clipped into the array) and fractions of a 3D point, in its precision."""
    neg = x < 0
    if neg:
        x, y, z = -x, -y, -z
    xf, yf, zf = np.floor(x), np.floor(y), np.floor(z)  # same precision, a rounding instruction
    ix = min(max(int(xf), 0), nx - 2)
    iy = min(max(int(yf) + half_extent, 0), ny - 2)
    iz = min(max(int(zf) + half_extent, 0), nz - 2)
    return neg, ix, iy, iz, x - xf, y - yf, z - zf


@njit(cache=True, nogil=True, fastmath=False)
def _corner2(x, y, half_extent: int, ny: int, nx: int):
    """The 2D analogue of :func:`_corner`."""
    neg = x < 0
    if neg:
        x, y = -x, -y
    xf, yf = np.floor(x), np.floor(y)
    ix = min(max(int(xf), 0), nx - 2)
    iy = min(max(int(yf) + half_extent, 0), ny - 2)
    return neg, ix, iy, x - xf, y - yf


@njit(cache=True, nogil=True, fastmath=False)
def slice_gather(data, rotations, kx, ky, pad, half_extent, one, out):
    """``out[r, k]`` = the map's transform at ``pad·A_rᵀ (kx_k, ky_k, 0)``. ``data`` (z, y, x, 2) and
    ``out`` (R, K, 2) hold the real and imaginary parts of the complex arrays; ``one`` is 1 in their
    precision, which the arithmetic keeps (complex arithmetic ran in double precision: half the speed)."""
    nz, ny, nx = data.shape[0], data.shape[1], data.shape[2]
    for r in range(rotations.shape[0]):
        a00, a01, a02 = rotations[r, 0, 0], rotations[r, 0, 1], rotations[r, 0, 2]
        a10, a11, a12 = rotations[r, 1, 0], rotations[r, 1, 1], rotations[r, 1, 2]
        for k in range(kx.shape[0]):
            x = pad * (kx[k] * a00 + ky[k] * a10)
            y = pad * (kx[k] * a01 + ky[k] * a11)
            z = pad * (kx[k] * a02 + ky[k] * a12)
            neg, ix, iy, iz, fx, fy, fz = _corner(x, y, z, half_extent, nz, ny, nx)
            gx, gy, gz = one - fx, one - fy, one - fz
            w00, w01, w10, w11 = gz * gy, gz * fy, fz * gy, fz * fy  # (dz, dy)
            re = (w00 * (gx * data[iz, iy, ix, 0] + fx * data[iz, iy, ix + 1, 0])
                  + w01 * (gx * data[iz, iy + 1, ix, 0] + fx * data[iz, iy + 1, ix + 1, 0])
                  + w10 * (gx * data[iz + 1, iy, ix, 0] + fx * data[iz + 1, iy, ix + 1, 0])
                  + w11 * (gx * data[iz + 1, iy + 1, ix, 0] + fx * data[iz + 1, iy + 1, ix + 1, 0]))
            im = (w00 * (gx * data[iz, iy, ix, 1] + fx * data[iz, iy, ix + 1, 1])
                  + w01 * (gx * data[iz, iy + 1, ix, 1] + fx * data[iz, iy + 1, ix + 1, 1])
                  + w10 * (gx * data[iz + 1, iy, ix, 1] + fx * data[iz + 1, iy, ix + 1, 1])
                  + w11 * (gx * data[iz + 1, iy + 1, ix, 1] + fx * data[iz + 1, iy + 1, ix + 1, 1]))
            out[r, k, 0] = re
            out[r, k, 1] = -im if neg else im


@njit(cache=True, nogil=True, fastmath=False)
def slice_scatter(data, weight, values, weights, rotations, kx, ky, pad, half_extent, one):
    """Add ``values[r, k]`` (and ``weights[r, k]``) at ``pad·A_rᵀ (kx_k, ky_k, 0)`` into ``data`` and
    ``weight`` (z, y, x), spread over the eight corners; pixels with weight <= 0 are skipped. ``data``
    (z, y, x, 2) and ``values`` (R, K, 2) hold real and imaginary parts, as in :func:`slice_gather`."""
    nz, ny, nx = weight.shape
    for r in range(rotations.shape[0]):
        a00, a01, a02 = rotations[r, 0, 0], rotations[r, 0, 1], rotations[r, 0, 2]
        a10, a11, a12 = rotations[r, 1, 0], rotations[r, 1, 1], rotations[r, 1, 2]
        for k in range(kx.shape[0]):
            w = weights[r, k]
            if w <= 0:
                continue
            x = pad * (kx[k] * a00 + ky[k] * a10)
            y = pad * (kx[k] * a01 + ky[k] * a11)
            z = pad * (kx[k] * a02 + ky[k] * a12)
            neg, ix, iy, iz, fx, fy, fz = _corner(x, y, z, half_extent, nz, ny, nx)
            re = values[r, k, 0]
            im = -values[r, k, 1] if neg else values[r, k, 1]
            gx, gy, gz = one - fx, one - fy, one - fz
            for dz in range(2):
                wz = fz if dz else gz
                for dy in range(2):
                    wzy = wz * (fy if dy else gy)
                    for dx in range(2):
                        c = wzy * (fx if dx else gx)
                        data[iz + dz, iy + dy, ix + dx, 0] += c * re
                        data[iz + dz, iy + dy, ix + dx, 1] += c * im
                        weight[iz + dz, iy + dy, ix + dx] += c * w


@njit(cache=True, nogil=True, fastmath=False)
def slice_gather_2d(data, rotations, kx, ky, pad, half_extent, one, out):
    """``out[c, r, k]`` = class ``c``'s 2D transform at ``pad·A_rᵀ (kx_k, ky_k)``; ``data`` (C, y, x, 2) and
    ``out`` (C, R, K, 2) hold real and imaginary parts, as in :func:`slice_gather`."""
    n_ref, ny, nx = data.shape[0], data.shape[1], data.shape[2]
    for r in range(rotations.shape[0]):
        a00, a01 = rotations[r, 0, 0], rotations[r, 0, 1]
        a10, a11 = rotations[r, 1, 0], rotations[r, 1, 1]
        for k in range(kx.shape[0]):
            x = pad * (kx[k] * a00 + ky[k] * a10)
            y = pad * (kx[k] * a01 + ky[k] * a11)
            neg, ix, iy, fx, fy = _corner2(x, y, half_extent, ny, nx)
            gx, gy = one - fx, one - fy
            for c in range(n_ref):
                re = (gy * (gx * data[c, iy, ix, 0] + fx * data[c, iy, ix + 1, 0])
                      + fy * (gx * data[c, iy + 1, ix, 0] + fx * data[c, iy + 1, ix + 1, 0]))
                im = (gy * (gx * data[c, iy, ix, 1] + fx * data[c, iy, ix + 1, 1])
                      + fy * (gx * data[c, iy + 1, ix, 1] + fx * data[c, iy + 1, ix + 1, 1]))
                out[c, r, k, 0] = re
                out[c, r, k, 1] = -im if neg else im


@njit(cache=True, nogil=True, fastmath=False)
def slice_scatter_2d(data, weight, values, weights, rotations, kx, ky, pad, half_extent, one):
    """The 2D analogue of :func:`slice_scatter`: bilinear, into ``data`` (y, x, 2) and ``weight`` (y, x)."""
    ny, nx = weight.shape
    for r in range(rotations.shape[0]):
        a00, a01 = rotations[r, 0, 0], rotations[r, 0, 1]
        a10, a11 = rotations[r, 1, 0], rotations[r, 1, 1]
        for k in range(kx.shape[0]):
            w = weights[r, k]
            if w <= 0:
                continue
            x = pad * (kx[k] * a00 + ky[k] * a10)
            y = pad * (kx[k] * a01 + ky[k] * a11)
            neg, ix, iy, fx, fy = _corner2(x, y, half_extent, ny, nx)
            re = values[r, k, 0]
            im = -values[r, k, 1] if neg else values[r, k, 1]
            gx, gy = one - fx, one - fy
            for dy in range(2):
                wy = fy if dy else gy
                for dx in range(2):
                    c = wy * (fx if dx else gx)
                    data[iy + dy, ix + dx, 0] += c * re
                    data[iy + dy, ix + dx, 1] += c * im
                    weight[iy + dy, ix + dx] += c * w


def gather(data: np.ndarray, rotations: np.ndarray, kx: np.ndarray, ky: np.ndarray, pad: float,
           half_extent: int) -> np.ndarray:
    """Central-slice values ``(R, K)`` of a projector's ``data`` (see :meth:`Projector.sample`)."""
    rdtype = np.float64 if data.dtype == np.complex128 else np.float32
    out = np.empty((rotations.shape[0], kx.shape[0]), dtype=data.dtype)
    parts = np.ascontiguousarray(data).view(rdtype).reshape(data.shape + (2,))
    slice_gather(parts, np.ascontiguousarray(rotations, dtype=rdtype), np.ascontiguousarray(kx, dtype=rdtype),
                 np.ascontiguousarray(ky, dtype=rdtype), rdtype(pad), int(half_extent), rdtype(1),
                 out.view(rdtype).reshape(out.shape + (2,)))
    return out


def gather_2d(data: np.ndarray, rotations: np.ndarray, kx: np.ndarray, ky: np.ndarray, pad: float,
              half_extent: int) -> np.ndarray:
    """Rotated-reference values ``(C, R, K)`` of a 2D projector's ``data`` (see :meth:`Projector2D.sample`)."""
    rdtype = np.float64 if data.dtype == np.complex128 else np.float32
    out = np.empty((data.shape[0], rotations.shape[0], kx.shape[0]), dtype=data.dtype)
    parts = np.ascontiguousarray(data).view(rdtype).reshape(data.shape + (2,))
    slice_gather_2d(parts, np.ascontiguousarray(rotations[:, :2, :2], dtype=rdtype),
                    np.ascontiguousarray(kx, dtype=rdtype), np.ascontiguousarray(ky, dtype=rdtype), rdtype(pad),
                    int(half_extent), rdtype(1), out.view(rdtype).reshape(out.shape + (2,)))
    return out


def scatter(data: np.ndarray, weight: np.ndarray, values: np.ndarray, weights: np.ndarray | None,
            rotations: np.ndarray, kx: np.ndarray, ky: np.ndarray, pad: float, half_extent: int) -> None:
    """Insert slice values ``(R, K)`` with their weights into a backprojector's ``data`` and ``weight``
    (3D, or 2D for ``(y, x)`` accumulators with ``(R, 2, 2)`` rotations)."""
    rdtype = weight.dtype.type
    if weights is None:
        weights = np.ones(values.shape, dtype=rdtype)
    if not data.flags.c_contiguous:
        raise ValueError("scatter needs C-contiguous accumulators (it adds through a real view of them)")
    kernel = slice_scatter if data.ndim == 3 else slice_scatter_2d
    vals = np.ascontiguousarray(values, dtype=data.dtype)
    kernel(data.view(rdtype).reshape(data.shape + (2,)), weight, vals.view(rdtype).reshape(vals.shape + (2,)),
           np.ascontiguousarray(weights, dtype=rdtype), np.ascontiguousarray(rotations, dtype=rdtype),
           np.ascontiguousarray(kx, dtype=rdtype), np.ascontiguousarray(ky, dtype=rdtype), rdtype(pad),
           int(half_extent), rdtype(1))
