"""Projection of a 3D map into 2D Fourier slices (RELION's ``Projector``).

The map's transform is built as RELION's ``Projector::computeFourierTransformMap``:

1. gridding pre-correction: divide the map by sinc²(r / (pad·N)), the transform
   of the trilinear kernel;
2. zero-pad to ``P = pad·N`` (made even) with the map centred at ``P//2``;
3. forward FFT (divided by the number of voxels) scaled by ``pad³·N``, so that
   a slice equals the 2D transform of the projection (line integral, in voxel
   units) under the same normalisation;
4. keep frequencies with ``|ξ| <= round(pad·r_max)`` on a centred Hermitian-half
   grid; the radial power spectrum ``<|V|²>/2`` per shell is recorded (τ² for
   classification).

A central slice for rotation ``A`` (RELION's Euler matrix, map to image
coordinates) reads the padded transform at ``ξ = pad·Aᵀ·(kx, ky, 0)`` with
trilinear interpolation; points with ``ξx < 0`` read ``conj(V(-ξ))``.
Everything is vectorised over orientations and pixels (no Python loops over
either); arrays are NumPy or CuPy, following :mod:`cryodask.backend`.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

import numpy as np

from cryodask import backend
from cryodask.ops import kernels
from cryodask.ops.filters import fftw_frequencies, real_space_radius

__all__ = ["Projector", "Projector2D", "grid_correct", "padded_size", "slice_pixels", "trilinear_corners",
           "bilinear_corners", "in_plane_rotations", "project_2d", "project_images"]

#: number of (orientation, pixel) pairs handled at once: ~240 B of temporaries each, so ~60 MB;
#: larger blocks are no faster (measured: 2^21 was 1.3x slower than 2^18 at box 64 and used 5x the memory)
_CHUNK_ELEMENTS = 1 << 18


def padded_size(box: int, pad: float) -> tuple[int, float]:
    """RELION's padded box ``round(pad·box)`` made even, and the padding factor it implies."""
    p = int(np.floor(pad * box + 0.5))
    p += p % 2
    return p, p / box


def grid_correct(volume: Any, pad: float, *, ndim: int | None = None) -> Any:
    """Divide a real-space map (or image) by sinc²(r / (pad·N)), the transform of the trilinear kernel.

    RELION's ``Projector::griddingCorrect`` for trilinear interpolation; ``r`` is
    the distance from the centre (index ``N//2``) and ``pad·N`` the (even) padded box.
    """
    xp = backend.array_module(volume)
    ndim = volume.ndim if ndim is None else ndim
    box = volume.shape[-1]
    p, _ = padded_size(box, pad)
    r = real_space_radius(box, ndim, xp=xp) / p
    sinc = xp.where(r > 0, xp.sin(np.pi * r) / xp.where(r > 0, np.pi * r, 1.0), 1.0)
    return (volume / (sinc * sinc)).astype(volume.dtype)


def slice_pixels(box: int, r_max: float, *, skip_redundant: bool = False, xp: Any = np
                 ) -> tuple[Any, Any, Any]:
    """The 2D Fourier pixels of a ``box`` image inside radius ``r_max``, in FFTW half layout.

    Returns ``(flat_index, kx, ky)``: indices into a flattened ``(box, box//2+1)`` array and
    the integer frequencies (Nyquist row ``+box/2``). ``skip_redundant`` drops the ``kx = 0,
    ky < 0`` pixels, the Friedel mates of ``kx = 0, ky > 0`` (RELION does not insert them twice).
    """
    half = box // 2 + 1
    r_eff = min(float(r_max), float(box // 2))
    ky = fftw_frequencies(box, np)[:, None]
    kx = np.arange(half)[None, :]
    keep = (kx * kx + ky * ky) <= r_eff * r_eff + 1e-9
    if skip_redundant:
        keep &= ~((kx == 0) & (ky < 0))
    iy, ix = np.nonzero(keep)
    flat = iy * half + ix
    return xp.asarray(flat), xp.asarray(kx[0, ix]), xp.asarray(ky[iy, 0])


def trilinear_corners(xi: Any, half_extent: int, shape: tuple[int, int, int]) -> tuple[Any, Any, Any]:
    """Flat corner indices, corner weights and the Friedel flag for points ``xi`` (``(..., 3)``, x y z).

    The grid is RELION's centred Hermitian half: x from 0, y and z centred at
    ``half_extent`` (``STARTINGY = -half_extent``). Points with ``x < 0`` are mirrored
    through the origin; the returned flag says where (their values must be conjugated).
    Returns ``index (..., 8)`` (int64), ``weight (..., 8)`` (same float type as ``xi``) and
    ``negative (...)``.
    """
    xp = backend.array_module(xi)
    negative = xi[..., 0] < 0
    xi = xp.where(negative[..., None], -xi, xi)
    base = xp.floor(xi)
    frac = xi - base
    base = base.astype(np.int64)
    nz, ny, nx = shape
    x0 = base[..., 0]
    y0 = base[..., 1] + half_extent
    z0 = base[..., 2] + half_extent
    # points numerically on the outer edge stay inside the array (their far corners get weight 0)
    x0 = xp.clip(x0, 0, nx - 2)
    y0 = xp.clip(y0, 0, ny - 2)
    z0 = xp.clip(z0, 0, nz - 2)
    i000 = (z0 * ny + y0) * nx + x0
    fx, fy, fz = frac[..., 0], frac[..., 1], frac[..., 2]
    gx, gy, gz = 1 - fx, 1 - fy, 1 - fz
    offsets = xp.asarray([0, 1, nx, nx + 1, ny * nx, ny * nx + 1, ny * nx + nx, ny * nx + nx + 1],
                         dtype=np.int64)
    index = i000[..., None] + offsets
    weight = xp.stack([gz * gy * gx, gz * gy * fx, gz * fy * gx, gz * fy * fx,
                       fz * gy * gx, fz * gy * fx, fz * fy * gx, fz * fy * fx], axis=-1)
    return index, weight, negative


def _on_huge_pages(a: np.ndarray) -> np.ndarray:
    """A C-contiguous copy of ``a`` on huge pages (:func:`cryodask.backend.huge_page_zeros`)."""
    out = backend.huge_page_zeros(a.shape, a.dtype)
    out[...] = a
    return out


def _as_rotations(rotations: Any, xp: Any, dtype: Any) -> Any:
    r = xp.asarray(rotations, dtype=dtype)
    if r.ndim == 2:
        r = r[None]
    if r.shape[-2:] != (3, 3):
        raise ValueError(f"rotations must have shape (R, 3, 3), not {tuple(r.shape)}")
    return r


@dataclass(frozen=True)
class Projector:
    """The padded, centred Hermitian half of a map's transform, ready for central slices.

    Attributes
    ----------
    data
        ``(2R+3, 2R+3, R+2)`` complex array (z, y, x) with ``R = round(pad·min(r_max, N/2))``;
        y and z centred at index ``R+1``, x from 0.
    ori_size
        Box size N of the map.
    pad
        Padding factor actually used (``P / N`` with the even padded box ``P``).
    r_max
        Frequency radius (pixels of the original box) kept in the map and in slices.
    power_spectrum
        ``(N//2+1,)`` radial average of ``|V|²/2`` (RELION's τ² for classification).
    """

    data: Any
    ori_size: int
    pad: float
    r_max: float
    power_spectrum: Any

    @property
    def half_extent(self) -> int:
        """Index of frequency 0 along y and z of :attr:`data` (``R + 1``)."""
        return (self.data.shape[0] - 1) // 2

    @classmethod
    def from_map(cls, volume: Any, *, pad: float = 2, r_max: float | None = None,
                 do_gridding: bool = True, xp: Any = None, double: bool = False) -> "Projector":
        """Build the projector of a cubic real-space map (RELION ``computeFourierTransformMap``).

        Parameters
        ----------
        volume
            ``(N, N, N)`` real map (NumPy or CuPy, or anything ``xp.asarray`` takes).
        pad
            Padding factor (RELION ``--pad``, default 2).
        r_max
            Keep frequencies up to this radius in pixels of the original box (default N/2,
            Nyquist; RELION's ``current_size/2``). ``relion_project`` keeps the whole padded
            cube, which ``r_max=N`` reproduces.
        do_gridding
            Apply the sinc² gridding pre-correction (RELION always does for projection).
        xp
            Array module to compute with (default: the module of ``volume``).
        double
            Compute in float64/complex128 instead of float32/complex64.
        """
        xp = backend.array_module(volume) if xp is None else xp
        rdtype, cdtype = backend.real_dtype(double), backend.complex_dtype(double)
        vol = xp.asarray(volume, dtype=rdtype)
        if vol.ndim != 3 or len(set(vol.shape)) != 1:
            raise ValueError(f"Projector.from_map needs a cubic 3D map, not shape {tuple(vol.shape)}")
        n = vol.shape[0]
        p, padf = padded_size(n, pad)
        r_max = float(n // 2) if r_max is None else float(r_max)
        if do_gridding:
            vol = grid_correct(vol, padf)
        mpad = xp.zeros((p, p, p), dtype=rdtype)
        o = p // 2 - n // 2
        mpad[o:o + n, o:o + n, o:o + n] = vol
        # put the map centre at the origin so that phases refer to it (RELION's CenterFFT)
        mpad = xp.fft.ifftshift(mpad)
        ft = backend.rfftn(mpad, axes=(0, 1, 2)).astype(cdtype)
        del mpad
        ft *= padf ** 3 * n
        # the transform holds frequencies (-P/2, P/2]; keep at most that much
        rad_keep = int(np.floor(padf * r_max + 0.5))
        rad_store = min(rad_keep, p // 2)
        h = rad_store + 1
        k = np.arange(-h, h + 1)
        valid = (k > -p // 2) & (k <= p // 2)
        idx = xp.asarray(np.mod(k, p))
        kx = np.arange(h + 1)
        idx_x = xp.asarray(np.minimum(kx, p // 2))
        # indexing with arrays after a slice leaves the result in another memory order; the gathers read
        # it (z, y, x) in place, and would copy the whole map on every call otherwise
        data = ft[idx][:, idx][:, :, idx_x]
        if xp is np:  # the gathers read the map at scattered addresses: huge pages spare the TLB misses
            data = _on_huge_pages(data)
        else:
            data = xp.ascontiguousarray(data)
        del ft
        kz3 = k[:, None, None]
        ky3 = k[None, :, None]
        kx3 = kx[None, None, :]
        r2 = kz3 * kz3 + ky3 * ky3 + kx3 * kx3
        keep = (r2 <= rad_keep * rad_keep) & valid[:, None, None] & valid[None, :, None] & (kx3 <= p // 2)
        data *= xp.asarray(keep)
        # radial power spectrum, shells in pixels of the original box
        ires = np.floor(np.sqrt(r2) / padf + 0.5).astype(np.int64)
        nsh = n // 2 + 1
        sel = keep & (ires < nsh)
        sel_x = xp.asarray(sel)
        power = xp.abs(data) ** 2 / 2
        total = xp.bincount(xp.asarray(ires)[sel_x], weights=power[sel_x].astype(np.float64), minlength=nsh)
        count = np.bincount(ires[sel], minlength=nsh)
        spectrum = total / xp.asarray(np.maximum(count, 1)) * xp.asarray(count > 0)
        return cls(data=data, ori_size=n, pad=padf, r_max=r_max, power_spectrum=spectrum)

    def sample(self, rotations: Any, kx: Any, ky: Any) -> Any:
        """Values of the central slices at 2D frequencies ``(kx, ky)`` for each rotation.

        ``rotations`` ``(R, 3, 3)``; ``kx``, ``ky`` ``(K,)`` (any real values, pixels of the
        original box; they must lie within ``r_max``). Returns ``(R, K)`` complex. This is
        the building block of :meth:`project` and of scoring on a list of Fourier pixels.
        """
        xp = backend.array_module(self.data)
        rdtype = np.float64 if self.data.dtype == np.complex128 else np.float32
        rot = _as_rotations(rotations, xp, rdtype)
        kx = xp.asarray(kx, dtype=rdtype)
        ky = xp.asarray(ky, dtype=rdtype)
        if xp is np:
            return kernels.gather(self.data, rot, kx, ky, self.pad, self.half_extent)
        out = xp.empty((rot.shape[0], kx.shape[0]), dtype=self.data.dtype)
        flat = self.data.reshape(-1)
        step = max(1, _CHUNK_ELEMENTS // max(1, kx.shape[0]))
        for s in range(0, rot.shape[0], step):
            a = rot[s:s + step]
            # xi = pad * A^T (kx, ky, 0): rows 0 and 1 of A weighted by kx and ky
            xi = self.pad * (kx[None, :, None] * a[:, None, 0, :] + ky[None, :, None] * a[:, None, 1, :])
            index, weight, negative = trilinear_corners(xi, self.half_extent, self.data.shape)
            vals = (flat[index] * weight).sum(axis=-1)
            out[s:s + a.shape[0]] = xp.where(negative, xp.conj(vals), vals)
            del xi, index, weight, negative, vals  # before the next block's are made
        return out

    def project(self, rotations: Any, *, box: int | None = None, r_max: float | None = None) -> Any:
        """Central slices ``(R, box, box//2+1)`` (FFTW half layout) for rotations ``(R, 3, 3)``.

        ``box`` (default the map's) sets the output grid; frequencies keep their meaning in
        pixels of the original box, so a smaller ``box`` is RELION's windowed ``current_size``.
        Pixels beyond ``min(r_max, box/2)`` are zero (``r_max`` defaults to the projector's).
        The inverse FFT (:func:`cryodask.backend.irfftn`) of a slice, ``fftshift``-ed, is the
        real-space projection (sum of voxels along the beam).
        """
        xp = backend.array_module(self.data)
        box = self.ori_size if box is None else int(box)
        r = self.r_max if r_max is None else min(float(r_max), self.r_max)
        flat, kx, ky = slice_pixels(box, r, xp=xp)
        rot = _as_rotations(rotations, xp, np.float64)
        out = xp.zeros((rot.shape[0], box * (box // 2 + 1)), dtype=self.data.dtype)
        out[:, flat] = self.sample(rot, kx, ky)
        return out.reshape(rot.shape[0], box, box // 2 + 1)



def project_images(volume: Any, rot: Any, tilt: Any, psi: Any, *, origins: Any = None, ctf: Any = None,
                   pad: float = 2, r_max: float | None = None, chunk: int = 512) -> Any:
    """Real-space projection images ``(N, box, box)`` of a map, as ``relion_project`` makes them.

    Parameters
    ----------
    volume
        ``(box, box, box)`` map (NumPy or CuPy), or a :class:`Projector` already made from
        one (then ``pad`` and ``r_max`` are the projector's).
    rot, tilt, psi
        RELION Euler angles in degrees, ``(N,)`` each.
    origins
        ``(N, 2)`` RELION origins in pixels (``rlnOriginXAngst / pixel size``): the image shows
        the particle moved by ``-origin``, so that reconstruction recentres it by ``+origin``.
    ctf
        ``(N, box, box//2+1)`` CTFs (FFTW half layout) to multiply the projections by, or None.
    pad, r_max
        Projector padding and frequency limit (default: the whole padded transform, as
        ``relion_project`` without ``--maxres``; the images are limited to Nyquist anyway).
    chunk
        Particles per batch (bounds memory).
    """
    from cryodask.geometry.euler import euler_to_matrix
    from cryodask.ops.filters import phase_shift

    if isinstance(volume, Projector):
        projector = volume  # made once by the caller, for many batches
        box = projector.ori_size
    else:
        box = volume.shape[0]
        projector = Projector.from_map(volume, pad=pad, r_max=box if r_max is None else r_max)
    xp = backend.array_module(projector.data)
    rots = euler_to_matrix(rot, tilt, psi).reshape(-1, 3, 3)
    n = rots.shape[0]
    out = xp.empty((n, box, box), dtype=np.float32)
    for s in range(0, n, chunk):
        sl = slice(s, min(n, s + chunk))
        f = projector.project(rots[sl], box=box)
        if origins is not None:
            f = phase_shift(f, -xp.asarray(origins, dtype=np.float64).reshape(-1, 2)[sl])
        if ctf is not None:
            f = f * xp.asarray(ctf[sl])
        img = backend.irfftn(f, (box, box), axes=(1, 2))
        out[sl] = xp.fft.fftshift(img, axes=(1, 2))
    return out

# --- 2D references (classification): in-plane rotations -----------------------------------------

def in_plane_rotations(psi: Any, xp: Any = np, dtype: Any = np.float64) -> Any:
    """2x2 matrices of RELION's ``Euler_angles2matrix(0, 0, psi)`` (``[[c, s], [-s, c]]``), ``(R, 2, 2)``."""
    a = np.deg2rad(np.atleast_1d(np.asarray(backend.to_numpy(psi), dtype=np.float64)))
    c, s = np.cos(a), np.sin(a)
    return xp.asarray(np.stack([np.stack([c, s], -1), np.stack([-s, c], -1)], -2), dtype=dtype)


def bilinear_corners(xi: Any, half_extent: int, shape: tuple[int, int]) -> tuple[Any, Any, Any]:
    """The 2D analogue of :func:`trilinear_corners`: ``xi`` ``(..., 2)`` as (x, y) on a centred half grid."""
    xp = backend.array_module(xi)
    negative = xi[..., 0] < 0
    xi = xp.where(negative[..., None], -xi, xi)
    base = xp.floor(xi)
    frac = xi - base
    base = base.astype(np.int64)
    ny, nx = shape
    x0 = xp.clip(base[..., 0], 0, nx - 2)
    y0 = xp.clip(base[..., 1] + half_extent, 0, ny - 2)
    fx, fy = frac[..., 0], frac[..., 1]
    gx, gy = 1 - fx, 1 - fy
    index = (y0 * nx + x0)[..., None] + xp.asarray([0, 1, nx, nx + 1], dtype=np.int64)
    weight = xp.stack([gy * gx, gy * fx, fy * gx, fy * fx], axis=-1)
    return index, weight, negative


@dataclass(frozen=True)
class Projector2D:
    """Padded, centred Hermitian halves of 2D references, for in-plane rotations (RELION ``ref_dim = 2``).

    As :class:`Projector` with one dimension less: gridding pre-correction by
    sinc²(r/(pad·N)), zero padding, FFT divided by the number of pixels and scaled by
    ``pad²`` (so values match image transforms), ``|ξ| <= round(pad·r_max)`` kept.

    Attributes
    ----------
    data
        ``(K, 2R+3, R+2)`` complex, one plane per reference; y centred at ``R+1``.
    ori_size, pad, r_max
        As for :class:`Projector`.
    power_spectrum
        ``(K, N//2+1)``: ``<|V|²>/2`` per shell of each reference.
    """

    data: Any
    ori_size: int
    pad: float
    r_max: float
    power_spectrum: Any

    @property
    def half_extent(self) -> int:
        return (self.data.shape[1] - 1) // 2

    @classmethod
    def from_images(cls, images: Any, *, pad: float = 2, r_max: float | None = None, do_gridding: bool = True,
                    xp: Any = None, double: bool = False) -> "Projector2D":
        """Build from ``(N, N)`` or ``(K, N, N)`` real references."""
        xp = backend.array_module(images) if xp is None else xp
        rdtype, cdtype = backend.real_dtype(double), backend.complex_dtype(double)
        refs = xp.asarray(images, dtype=rdtype)
        if refs.ndim == 2:
            refs = refs[None]
        if refs.ndim != 3 or refs.shape[1] != refs.shape[2]:
            raise ValueError(f"Projector2D needs square references (K, N, N), not {tuple(refs.shape)}")
        k, n = refs.shape[0], refs.shape[1]
        p, padf = padded_size(n, pad)
        r_max = float(n // 2) if r_max is None else float(r_max)
        if do_gridding:
            refs = grid_correct(refs, padf, ndim=2)
        mpad = xp.zeros((k, p, p), dtype=rdtype)
        o = p // 2 - n // 2
        mpad[:, o:o + n, o:o + n] = refs
        ft = backend.rfftn(xp.fft.ifftshift(mpad, axes=(1, 2)), axes=(1, 2)).astype(cdtype)
        del mpad
        ft *= padf ** 2
        rad_keep = int(np.floor(padf * r_max + 0.5))
        h = min(rad_keep, p // 2) + 1
        ky = np.arange(-h, h + 1)
        valid = (ky > -p // 2) & (ky <= p // 2)
        kx = np.arange(h + 1)
        data = ft[:, xp.asarray(np.mod(ky, p))][:, :, xp.asarray(np.minimum(kx, p // 2))]
        data = _on_huge_pages(data) if xp is np else xp.ascontiguousarray(data)
        r2 = ky[:, None] ** 2 + kx[None, :] ** 2
        keep = (r2 <= rad_keep * rad_keep) & valid[:, None] & (kx[None, :] <= p // 2)
        data *= xp.asarray(keep)
        ires = np.floor(np.sqrt(r2) / padf + 0.5).astype(np.int64)
        nsh = n // 2 + 1
        sel = keep & (ires < nsh)
        count = np.bincount(ires[sel], minlength=nsh)
        power = (xp.abs(data) ** 2 / 2)[:, xp.asarray(sel)]
        sh = xp.asarray(ires[sel])
        spectrum = xp.stack([xp.bincount(sh, weights=power[i].astype(np.float64), minlength=nsh)
                             for i in range(k)])
        spectrum = spectrum / xp.asarray(np.maximum(count, 1)) * xp.asarray(count > 0)
        return cls(data=data, ori_size=n, pad=padf, r_max=r_max, power_spectrum=spectrum)

    def sample(self, rotations: Any, kx: Any, ky: Any) -> Any:
        """Values ``(K, R, P)`` of the rotated references at 2D frequencies ``(kx, ky)``.

        ``rotations``: in-plane angles psi in degrees ``(R,)``, or matrices ``(R, 2, 2)`` /
        ``(R, 3, 3)`` (the upper-left 2x2 block is used; RELION's ``A``, image from reference).
        """
        xp = backend.array_module(self.data)
        rdtype = np.float64 if self.data.dtype == np.complex128 else np.float32
        rot = _as_2d_rotations(rotations, xp, rdtype)
        kx = xp.asarray(kx, dtype=rdtype)
        ky = xp.asarray(ky, dtype=rdtype)
        if xp is np:
            return kernels.gather_2d(self.data, rot, kx, ky, self.pad, self.half_extent)
        n_ref = self.data.shape[0]
        out = xp.empty((n_ref, rot.shape[0], kx.shape[0]), dtype=self.data.dtype)
        flat = self.data.reshape(n_ref, -1)
        step = max(1, _CHUNK_ELEMENTS // max(1, kx.shape[0] * n_ref))
        for s in range(0, rot.shape[0], step):
            a = rot[s:s + step]
            xi = self.pad * (kx[None, :, None] * a[:, None, 0, :] + ky[None, :, None] * a[:, None, 1, :])
            index, weight, negative = bilinear_corners(xi, self.half_extent, self.data.shape[1:])
            vals = (flat[:, index] * weight).sum(axis=-1)
            out[:, s:s + a.shape[0]] = xp.where(negative, xp.conj(vals), vals)
            del xi, index, weight, negative, vals  # before the next block's are made
        return out

    def project(self, rotations: Any, *, box: int | None = None, r_max: float | None = None) -> Any:
        """Rotated references ``(K, R, box, box//2+1)`` in FFTW half layout (RELION ``rotate2D``)."""
        xp = backend.array_module(self.data)
        box = self.ori_size if box is None else int(box)
        r = self.r_max if r_max is None else min(float(r_max), self.r_max)
        flat, kx, ky = slice_pixels(box, r, xp=xp)
        vals = self.sample(rotations, kx, ky)
        out = xp.zeros(vals.shape[:2] + (box * (box // 2 + 1),), dtype=self.data.dtype)
        out[:, :, flat] = vals
        return out.reshape(vals.shape[:2] + (box, box // 2 + 1))


def project_2d(references: Any, psi: Any, *, pad: float = 2, r_max: float | None = None,
               box: int | None = None) -> Any:
    """In-plane rotations of 2D references in Fourier space: ``(K, R, box, box//2+1)``.

    Convenience wrapper around :class:`Projector2D` (build once and reuse it when rotating
    the same references many times).
    """
    return Projector2D.from_images(references, pad=pad, r_max=r_max).project(psi, box=box)


def _as_2d_rotations(rotations: Any, xp: Any, dtype: Any) -> Any:
    r = rotations
    if not hasattr(r, "ndim"):
        r = np.asarray(r)
    if r.ndim <= 1:
        return in_plane_rotations(r, xp, dtype)
    r = xp.asarray(r, dtype=dtype)
    if r.ndim == 2:
        r = r[None]
    if r.shape[-2:] == (3, 3):
        r = r[:, :2, :2]
    if r.shape[-2:] != (2, 2):
        raise ValueError(f"in-plane rotations must be angles (R,) or matrices (R, 2, 2), not {tuple(r.shape)}")
    return r
