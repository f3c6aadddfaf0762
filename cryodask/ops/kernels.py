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

The 3D kernels go through the pixels a tile at a time, for all rotations, in separate passes: the
corner arithmetic (which the compiler vectorises once it is alone in its loop), then the scattered
reads or additions. One loop doing everything per pixel stayed scalar and ran out of registers: a
gather at box 128 took ~28 ns a sample, ~12 ns in passes (a final-iteration E-step chunk: gather
8.7 → 4.0 s, scatter 5.0 → 3.4 s), ~8 ns with each pair of x-neighbours copied at once. Neighbouring
rotations of a local search then also reuse the tile's voxels from cache.
"""

from __future__ import annotations

import numpy as np
from numba import njit


@njit(cache=True, nogil=True, fastmath=False)
def _corner2(x, y, half_extent: int, ny: int, nx: int):
    """Mirror (x < 0), lower corner (clipped into the array) and fractions of a 2D point, in its precision."""
    neg = x < 0
    if neg:
        x, y = -x, -y
    xf, yf = np.floor(x), np.floor(y)
    ix = min(max(int(xf), 0), nx - 2)
    iy = min(max(int(yf) + half_extent, 0), ny - 2)
    return neg, ix, iy, x - xf, y - yf


@njit(cache=True, nogil=True, fastmath=False)
def _tile_corners(rotation, kx, ky, k0, pad, half_extent, one, nz, ny, nx, base, fxs, fys, fzs, sign):
    """For pixels ``k0 …`` (as many as ``base`` holds) under one rotation: the flat index of each point's
    lower corner (clipped into the array) and its fractions, after mirroring points with ``x < 0``
    through the origin (``sign`` −1: their values are conjugated). A loop of its own: it vectorises."""
    a00, a01, a02 = rotation[0, 0], rotation[0, 1], rotation[0, 2]
    a10, a11, a12 = rotation[1, 0], rotation[1, 1], rotation[1, 2]
    for j in range(base.shape[0]):
        u, v = kx[k0 + j], ky[k0 + j]
        x = pad * (u * a00 + v * a10)
        y = pad * (u * a01 + v * a11)
        z = pad * (u * a02 + v * a12)
        s = one if x >= 0 else -one
        x, y, z = x * s, y * s, z * s
        xf, yf, zf = np.floor(x), np.floor(y), np.floor(z)
        ix = min(max(np.int64(xf), 0), nx - 2)
        iy = min(max(np.int64(yf) + half_extent, 0), ny - 2)
        iz = min(max(np.int64(zf) + half_extent, 0), nz - 2)
        base[j] = (iz * ny + iy) * nx + ix
        fxs[j], fys[j], fzs[j], sign[j] = x - xf, y - yf, z - zf, s


GATHER_TILE = 256  # pixels per tile: the tile's buffers stay in L1, its voxels for nearby rotations in L2


@njit(cache=True, nogil=True, fastmath=False)
def slice_gather(pairs, nz, ny, nx, rotations, kx, ky, pad, half_extent, one, out, tile):
    """``out[r, k]`` = the map's transform at ``pad·A_rᵀ (kx_k, ky_k, 0)``.

    ``pairs`` is the (z, y, x) map flattened and seen as overlapping pairs of x-neighbours (element
    ``i`` = voxels ``i`` and ``i + 1``, see :func:`gather`): one copy fetches both x-corners. Its values
    are only copied here, never computed with; ``out`` (R, K, 2) holds the real and imaginary parts of
    the result; ``one`` is 1 in their precision, which the arithmetic keeps. Pixels are taken a tile at a
    time for all rotations, in three passes per rotation: corner indices and fractions (vectorised by
    the compiler), the four corner pairs copied into a buffer (the only scattered reads), and the
    trilinear sums (vectorised). Doing all three per pixel in one loop left it scalar: ~28 ns a sample
    against ~8 ns at box 128.
    """
    n_pix = kx.shape[0]
    rdtype = kx.dtype
    sy, sz = nx, ny * nx
    base = np.empty(tile, np.int64)
    fxs, fys, fzs, sign = (np.empty(tile, rdtype), np.empty(tile, rdtype), np.empty(tile, rdtype),
                           np.empty(tile, rdtype))
    corners = np.empty((4, tile), pairs.dtype)
    c = corners.view(rdtype)  # (4, 4·tile): re0, im0, re1, im1 per pixel
    re = np.empty(tile, rdtype)
    im = np.empty(tile, rdtype)
    for k0 in range(0, n_pix, tile):
        n = min(tile, n_pix - k0)
        for r in range(rotations.shape[0]):
            _tile_corners(rotations[r], kx, ky, k0, pad, half_extent, one, nz, ny, nx, base[:n], fxs[:n], fys[:n],
                          fzs[:n], sign[:n])
            for j in range(n):
                b = base[j]
                corners[0, j] = pairs[b]
                corners[1, j] = pairs[b + sy]
                corners[2, j] = pairs[b + sz]
                corners[3, j] = pairs[b + sz + sy]
            for j in range(n):
                fx, fy, fz = fxs[j], fys[j], fzs[j]
                gx, gy, gz = one - fx, one - fy, one - fz
                w00, w01, w10, w11 = gz * gy, gz * fy, fz * gy, fz * fy  # (dz, dy)
                q = 4 * j
                re[j] = (w00 * (gx * c[0, q] + fx * c[0, q + 2]) + w01 * (gx * c[1, q] + fx * c[1, q + 2])
                         + w10 * (gx * c[2, q] + fx * c[2, q + 2]) + w11 * (gx * c[3, q] + fx * c[3, q + 2]))
                im[j] = sign[j] * (w00 * (gx * c[0, q + 1] + fx * c[0, q + 3])
                                   + w01 * (gx * c[1, q + 1] + fx * c[1, q + 3])
                                   + w10 * (gx * c[2, q + 1] + fx * c[2, q + 3])
                                   + w11 * (gx * c[3, q + 1] + fx * c[3, q + 3]))
            row = out[r]
            for j in range(n):
                row[k0 + j, 0] = re[j]
                row[k0 + j, 1] = im[j]


@njit(cache=True, nogil=True, fastmath=False)
def slice_scatter(data, weight, values, weights, rotations, kx, ky, pad, half_extent, one, tile):
    """Add ``values[r, k]`` (and ``weights[r, k]``) at ``pad·A_rᵀ (kx_k, ky_k, 0)`` into ``data`` and
    ``weight``, spread over the eight corners; pixels with weight <= 0 are skipped. ``data`` is the
    (z, y, x) accumulator's real and imaginary parts flattened (2N), ``weight`` its weights (z, y, x),
    ``values`` (R, K, 2) real and imaginary parts. As in :func:`slice_gather`, a tile of pixels at a time
    for all rotations: the corners, then the 24 contributions (8 corners × real, imaginary, weight), in
    loops of their own, and only the additions into the accumulators in the last, scalar one."""
    nz, ny, nx = weight.shape
    wflat = weight.reshape(-1)
    n_pix = kx.shape[0]
    rdtype = kx.dtype
    sy, sz = nx, ny * nx
    offsets = (0, 1, sy, sy + 1, sz, sz + 1, sz + sy, sz + sy + 1)
    base = np.empty(tile, np.int64)
    fxs, fys, fzs, sign = (np.empty(tile, rdtype), np.empty(tile, rdtype), np.empty(tile, rdtype),
                           np.empty(tile, rdtype))
    add = np.empty((24, tile), rdtype)  # rows 0-7: real parts, 8-15: imaginary, 16-23: weights
    for k0 in range(0, n_pix, tile):
        n = min(tile, n_pix - k0)
        for r in range(rotations.shape[0]):
            _tile_corners(rotations[r], kx, ky, k0, pad, half_extent, one, nz, ny, nx, base[:n], fxs[:n], fys[:n],
                          fzs[:n], sign[:n])
            vals = values[r, k0:k0 + n]
            wts = weights[r, k0:k0 + n]
            for j in range(n):
                fx, fy, fz = fxs[j], fys[j], fzs[j]
                gx, gy, gz = one - fx, one - fy, one - fz
                re, im, w = vals[j, 0], sign[j] * vals[j, 1], wts[j]
                zy0, zy1, zy2, zy3 = gz * gy, gz * fy, fz * gy, fz * fy  # corners in (dz, dy, dx) order
                c0, c1, c2, c3 = zy0 * gx, zy0 * fx, zy1 * gx, zy1 * fx
                c4, c5, c6, c7 = zy2 * gx, zy2 * fx, zy3 * gx, zy3 * fx
                add[0, j], add[1, j], add[2, j], add[3, j] = c0 * re, c1 * re, c2 * re, c3 * re
                add[4, j], add[5, j], add[6, j], add[7, j] = c4 * re, c5 * re, c6 * re, c7 * re
                add[8, j], add[9, j], add[10, j], add[11, j] = c0 * im, c1 * im, c2 * im, c3 * im
                add[12, j], add[13, j], add[14, j], add[15, j] = c4 * im, c5 * im, c6 * im, c7 * im
                add[16, j], add[17, j], add[18, j], add[19, j] = c0 * w, c1 * w, c2 * w, c3 * w
                add[20, j], add[21, j], add[22, j], add[23, j] = c4 * w, c5 * w, c6 * w, c7 * w
            for j in range(n):
                if wts[j] <= 0:
                    continue
                b = base[j]
                for q in range(8):
                    i = b + offsets[q]
                    data[2 * i] += add[q, j]
                    data[2 * i + 1] += add[8 + q, j]
                    wflat[i] += add[16 + q, j]


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
    nz, ny, nx = data.shape
    flat = np.ascontiguousarray(data).reshape(-1)
    # overlapping 16-byte (or 32-byte) elements at the voxels' stride: element i holds voxels i and i + 1
    pair = np.complex128 if flat.dtype == np.complex64 else np.dtype([("a", np.complex128), ("b", np.complex128)])
    pairs = np.ndarray(shape=(flat.shape[0] - 1,), dtype=pair, buffer=flat, strides=(flat.itemsize,))
    slice_gather(pairs, nz, ny, nx, np.ascontiguousarray(rotations, dtype=rdtype),
                 np.ascontiguousarray(kx, dtype=rdtype), np.ascontiguousarray(ky, dtype=rdtype), rdtype(pad),
                 int(half_extent), rdtype(1), out.view(rdtype).reshape(out.shape + (2,)), GATHER_TILE)
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
    if not (data.flags.c_contiguous and weight.flags.c_contiguous):
        raise ValueError("scatter needs C-contiguous accumulators (it adds through flat views of them)")
    vals = np.ascontiguousarray(values, dtype=data.dtype)
    args = (vals.view(rdtype).reshape(vals.shape + (2,)), np.ascontiguousarray(weights, dtype=rdtype),
            np.ascontiguousarray(rotations, dtype=rdtype), np.ascontiguousarray(kx, dtype=rdtype),
            np.ascontiguousarray(ky, dtype=rdtype), rdtype(pad), int(half_extent), rdtype(1))
    if data.ndim == 3:
        slice_scatter(data.view(rdtype).reshape(-1), weight, *args, GATHER_TILE)
    else:
        slice_scatter_2d(data.view(rdtype).reshape(data.shape + (2,)), weight, *args)
