"""Backprojection: trilinear splatting of 2D Fourier slices into 3D accumulators (RELION's ``BackProjector``).

Two accumulators live on the padded, centred Hermitian-half grid of
:class:`cryodask.ops.project.Projector` (sized by ``r_max``, not by the box):

* ``data``   += w · (slice value)   (complex), e.g. ``s·CTF·X/σ²``,
* ``weight`` += w · (slice weight)  (real),    e.g. ``s²·CTF²/σ²``,

at ``ξ = pad·Aᵀ·(kx, ky, 0)``, with the 8 trilinear weights of ``ξ``. Points
with ``ξx < 0`` are mirrored to ``-ξ`` and their value conjugated. As in RELION
the ``kx = 0, ky < 0`` pixels of a slice are not inserted (they are the Friedel
mates of ``kx = 0, ky > 0``); the ``x = 0`` plane is completed later by
:meth:`BackProjector.symmetrised` (``enforceHermitianSymmetry``).

Accumulators add: ``a += b`` (or :meth:`BackProjector.merge`) sums two of them,
which is what a tree reduction over particle chunks needs. Turning the sums into
a map is :func:`cryodask.em.mstep.reconstruct` (also reachable as
:meth:`BackProjector.reconstruct`).
"""

from __future__ import annotations

from dataclasses import dataclass, field, replace
from typing import Any, Sequence

import numpy as np

from cryodask import backend
from cryodask.ops import kernels
from cryodask.ops.project import (_CHUNK_ELEMENTS, _as_2d_rotations, _as_rotations, bilinear_corners, padded_size,
                                  slice_pixels, trilinear_corners)

__all__ = ["BackProjector"]


@dataclass
class BackProjector:
    """Accumulators ``data`` (complex) and ``weight`` (real) of shape ``(2R+3, 2R+3, R+2)``.

    ``R = round(pad·r_max)``; y and z are centred at index ``R+1``, x starts at 0. With
    ``ndim=2`` (2D references, RELION ``ref_dim = 2``) the arrays are ``(2R+3, R+2)`` and
    slices are inserted by in-plane rotation (RELION ``backrotate2D``).

    Attributes
    ----------
    data, weight
        The accumulators (NumPy or CuPy).
    ori_size
        Box size N of the map being reconstructed.
    pad
        Padding factor (``P / N`` for the even padded box ``P``).
    r_max
        Frequency radius in pixels of the original box (at most N/2).
    is_symmetrised
        True once Hermitian (and point-group) symmetry have been applied; such an
        accumulator must not receive more slices or be merged.
    """

    data: Any
    weight: Any
    ori_size: int
    pad: float
    r_max: int
    is_symmetrised: bool = field(default=False)

    @classmethod
    def zeros(cls, box: int, *, pad: float = 2, r_max: float | None = None, ndim: int = 3, xp: Any = np,
              double: bool = False) -> "BackProjector":
        """Empty accumulators for a ``box``³ map (``box``² image with ``ndim=2``).

        ``r_max`` defaults to (and is capped at) ``box//2``.
        """
        if ndim not in (2, 3):
            raise ValueError("BackProjector: ndim must be 2 or 3")
        _, padf = padded_size(box, pad)
        r = box // 2 if r_max is None or r_max < 0 else min(int(np.ceil(r_max)), box // 2)
        rad = int(np.floor(padf * r + 0.5))
        shape = (2 * rad + 3,) * (ndim - 1) + (rad + 2,)
        return cls(data=xp.zeros(shape, dtype=backend.complex_dtype(double)),
                   weight=xp.zeros(shape, dtype=backend.real_dtype(double)),
                   ori_size=box, pad=padf, r_max=r)

    # -- geometry ---------------------------------------------------------------------------
    @property
    def ndim(self) -> int:
        """3 for maps, 2 for 2D references."""
        return self.data.ndim

    @property
    def radius(self) -> int:
        """``R = round(pad·r_max)``: the largest frequency radius of the padded grid kept."""
        return (self.data.shape[0] - 3) // 2

    @property
    def half_extent(self) -> int:
        """Index of frequency 0 along y and z (``R + 1``)."""
        return (self.data.shape[0] - 1) // 2

    def grid_coordinates(self) -> tuple[Any, ...]:
        """Integer frequencies ``(kz, ky, kx)`` (``(ky, kx)`` in 2D) of the grid, broadcastable to its shape."""
        xp = backend.array_module(self.data)
        h = self.half_extent
        k = xp.arange(-h, h + 1)
        kx = xp.arange(self.data.shape[-1])
        if self.ndim == 2:
            return k[:, None], kx[None, :]
        return k[:, None, None], k[None, :, None], kx[None, None, :]

    def radius2(self) -> Any:
        """Squared frequency radius (padded-grid units) of every accumulator voxel."""
        r2 = 0
        for k in self.grid_coordinates():
            r2 = r2 + k * k
        return r2

    # -- accumulation -----------------------------------------------------------------------
    def insert_pixels(self, values: Any, rotations: Any, weights: Any, kx: Any, ky: Any) -> None:
        """Splat slice values given at a list of Fourier pixels ``(kx, ky)`` (pixels of the map's box), as
        :meth:`insert` does for whole slices: ``values`` ``(R, K)`` complex, ``weights`` ``(R, K)`` real
        (pixels with weight <= 0 are skipped). The caller leaves out the ``kx = 0, ky < 0`` pixels
        (:func:`cryodask.ops.project.slice_pixels` with ``skip_redundant``) and those beyond the
        accumulators' radius, as :meth:`insert` does. For the E-step, which holds its slices as such lists:
        no whole-plane arrays are made."""
        if self.is_symmetrised:
            raise ValueError("BackProjector.insert_pixels: these accumulators are already symmetrised")
        xp = backend.array_module(self.data)
        rdtype = np.float64 if self.data.dtype == np.complex128 else np.float32
        rot = (_as_rotations if self.ndim == 3 else _as_2d_rotations)(rotations, xp, rdtype)
        if xp is np:
            kernels.scatter(self.data, self.weight, np.asarray(values), np.asarray(weights, dtype=rdtype), rot,
                            np.asarray(kx, dtype=rdtype), np.asarray(ky, dtype=rdtype), self.pad, self.half_extent)
            return
        box = self.ori_size
        flat = (xp.asarray(ky).astype(np.int64) % box) * (box // 2 + 1) + xp.asarray(kx).astype(np.int64)
        slices = xp.zeros((rot.shape[0], box * (box // 2 + 1)), dtype=self.data.dtype)
        w = xp.zeros((rot.shape[0], box * (box // 2 + 1)), dtype=rdtype)
        slices[:, flat] = xp.asarray(values)
        w[:, flat] = xp.asarray(weights, dtype=rdtype)
        self.insert(slices.reshape(-1, box, box // 2 + 1), rot, weights=w.reshape(-1, box, box // 2 + 1))

    def insert(self, slices: Any, rotations: Any, weights: Any = None) -> None:
        """Splat 2D Fourier slices into the accumulators (in place).

        Parameters
        ----------
        slices
            ``(R, box, box//2+1)`` complex, FFTW half layout. ``box`` may be smaller than
            the map's (a windowed ``current_size``): frequencies are in pixels of the map's box.
        rotations
            ``(R, 3, 3)`` RELION matrices (map to image coordinates); for 2D accumulators
            in-plane angles psi ``(R,)`` in degrees or ``(R, 2, 2)`` matrices.
        weights
            ``(R, box, box//2+1)`` real, or None for 1 everywhere. Pixels with weight <= 0
            are skipped, as in RELION.
        """
        if self.is_symmetrised:
            raise ValueError("BackProjector.insert: these accumulators are already symmetrised")
        xp = backend.array_module(self.data)
        rdtype = np.float64 if self.data.dtype == np.complex128 else np.float32
        slices = xp.asarray(slices)
        if slices.ndim == 2:
            slices = slices[None]
        box = slices.shape[-2]
        if slices.shape[-1] != box // 2 + 1:
            raise ValueError(f"slices must be (R, box, box//2+1), not {tuple(slices.shape)}")
        rot = (_as_rotations if self.ndim == 3 else _as_2d_rotations)(rotations, xp, rdtype)
        if rot.shape[0] != slices.shape[0]:
            raise ValueError(f"{slices.shape[0]} slices but {rot.shape[0]} rotations")
        # pixels with |k| <= r_max, decided exactly (RELION tests the rotated |ξ|² <= R² in floating
        # point, so pixels exactly on the circle go in or not by rounding: ~1e-4 at the last shell)
        flat, kx, ky = slice_pixels(box, self.radius / self.pad, skip_redundant=True, xp=xp)
        kx = kx.astype(rdtype)
        ky = ky.astype(rdtype)
        vals_all = slices.reshape(slices.shape[0], -1)
        w_all = None
        if weights is not None:
            w_all = xp.asarray(weights, dtype=rdtype)
            w_all = xp.broadcast_to(w_all, slices.shape).reshape(slices.shape[0], -1)
        if xp is np:
            kernels.scatter(self.data, self.weight, vals_all[:, flat], None if w_all is None else w_all[:, flat],
                            rot, kx, ky, self.pad, self.half_extent)
            return
        step = max(1, _CHUNK_ELEMENTS // max(1, kx.shape[0]))
        for s in range(0, rot.shape[0], step):
            a = rot[s:s + step]
            xi = self.pad * (kx[None, :, None] * a[:, None, 0, :] + ky[None, :, None] * a[:, None, 1, :])
            corners = trilinear_corners if self.ndim == 3 else bilinear_corners
            index, tri, negative = corners(xi, self.half_extent, self.data.shape)
            vals = vals_all[s:s + step][:, flat].astype(self.data.dtype)
            vals = xp.where(negative, xp.conj(vals), vals)
            if w_all is None:
                w = xp.ones(vals.shape, dtype=rdtype)
            else:
                w = w_all[s:s + step][:, flat]
                keep = w > 0
                w = xp.where(keep, w, 0)
                vals = xp.where(keep, vals, 0)
            contrib = vals[..., None] * tri
            if backend.is_gpu(self.data):
                # scatter real and imaginary parts into the interleaved float view (atomic adds on floats)
                dview = self.data.reshape(-1).view(rdtype)
                backend.scatter_add(dview, 2 * index, contrib.real.astype(rdtype))
                backend.scatter_add(dview, 2 * index + 1, contrib.imag.astype(rdtype))
            else:
                backend.scatter_add(self.data, index, contrib)
            backend.scatter_add(self.weight, index, w[..., None] * tri)
            del xi, index, tri, negative, vals, w, contrib  # before the next block's are made

    def merge(self, other: "BackProjector") -> "BackProjector":
        """Add another accumulator of the same geometry into this one (in place); returns self."""
        if (self.data.shape != other.data.shape or self.ori_size != other.ori_size
                or self.pad != other.pad):
            raise ValueError("BackProjector.merge: accumulators have different geometry")
        if self.is_symmetrised or other.is_symmetrised:
            raise ValueError("BackProjector.merge: merge before symmetrising")
        self.data += backend.to_device(other.data, self.data)
        self.weight += backend.to_device(other.weight, self.weight)
        return self

    def __iadd__(self, other: "BackProjector") -> "BackProjector":
        return self.merge(other)

    def __add__(self, other: "BackProjector") -> "BackProjector":
        return self.copy().merge(other)

    def copy(self) -> "BackProjector":
        return replace(self, data=self.data.copy(), weight=self.weight.copy())

    # -- symmetry ---------------------------------------------------------------------------
    def symmetrised(self, sym: Sequence[Any] | Any | None = None) -> "BackProjector":
        """A copy with Hermitian symmetry on the ``x = 0`` plane enforced, then point-group symmetry.

        ``sym``: symmetry rotation matrices (``(S, 3, 3)`` or a list; identities are skipped),
        e.g. from :mod:`cryodask.geometry.symmetry`. Each operator adds the accumulators
        resampled (trilinearly) at ``R·k`` to those at ``k``, within ``|k| <= R``
        (RELION's ``applyPointGroupSymmetry``); the sums are not divided by the group order.
        """
        if self.is_symmetrised:
            return self
        out = self.copy()
        out._enforce_hermitian_symmetry()
        mats = _symmetry_matrices(sym)
        if len(mats):
            if self.ndim != 3:
                raise ValueError("point-group symmetry applies to 3D accumulators only")
            out._apply_point_group(mats)
        out.is_symmetrised = True
        return out

    def _enforce_hermitian_symmetry(self) -> None:
        """x = 0 plane: each (z, y) and (-z, -y) both get the sum of the pair (data conjugated)."""
        xp = backend.array_module(self.data)
        x0 = (slice(None),) * (self.ndim - 1) + (0,)
        flip = (slice(None, None, -1),) * (self.ndim - 1)
        origin = (self.half_extent,) * (self.ndim - 1)
        d0 = self.data[x0]
        w0 = self.weight[x0]
        dsum = d0 + xp.conj(d0[flip])
        wsum = w0 + w0[flip]
        # RELION leaves the origin alone (it is its own Friedel mate)
        dsum[origin] = d0[origin]
        wsum[origin] = w0[origin]
        self.data[x0] = dsum
        self.weight[x0] = wsum

    def _apply_point_group(self, mats: np.ndarray) -> None:
        xp = backend.array_module(self.data)
        rdtype = np.float64 if self.data.dtype == np.complex128 else np.float32
        r2 = self.radius2()
        rad = self.radius
        inside = xp.nonzero((r2 <= rad * rad).reshape(-1))[0]
        kz, ky, kx = self.grid_coordinates()
        shape = self.data.shape
        kvec = xp.stack([xp.broadcast_to(kx, shape).reshape(-1)[inside],
                         xp.broadcast_to(ky, shape).reshape(-1)[inside],
                         xp.broadcast_to(kz, shape).reshape(-1)[inside]], axis=-1).astype(rdtype)
        dflat = self.data.reshape(-1)
        wflat = self.weight.reshape(-1)
        sum_d = dflat.copy()
        sum_w = wflat.copy()
        for m in mats:
            # coords_input = R · coords_output (RELION: xp = R(0,0) x + R(0,1) y + R(0,2) z)
            xi = kvec @ xp.asarray(m, dtype=rdtype).T
            index, tri, negative = trilinear_corners(xi, self.half_extent, shape)
            dv = (dflat[index] * tri).sum(axis=-1)
            sum_d[inside] += xp.where(negative, xp.conj(dv), dv)
            sum_w[inside] += (wflat[index] * tri).sum(axis=-1)
        self.data = sum_d.reshape(shape)
        self.weight = sum_w.reshape(shape)

    # -- reconstruction ---------------------------------------------------------------------
    def reconstruct(self, **kwargs: Any) -> Any:
        """The real-space map from the accumulators; see :func:`cryodask.em.mstep.reconstruct`."""
        from cryodask.em.mstep import reconstruct

        return reconstruct(self, **kwargs)


def _symmetry_matrices(sym: Sequence[Any] | Any | None) -> np.ndarray:
    if sym is None:
        return np.zeros((0, 3, 3))
    if isinstance(sym, str):
        from cryodask.geometry.symmetry import point_group

        sym = point_group(sym)
    if hasattr(sym, "matrices"):  # a cryodask.geometry.symmetry.SymmetryGroup
        sym = sym.matrices
    if isinstance(sym, (list, tuple)):
        mats = np.stack([np.asarray(backend.to_numpy(m), dtype=np.float64) for m in sym]) if sym else np.zeros((0, 3, 3))
    else:
        mats = np.asarray(backend.to_numpy(sym), dtype=np.float64)
    mats = mats.reshape(-1, 3, 3)
    keep = ~np.all(np.isclose(mats, np.eye(3), atol=1e-9), axis=(1, 2))
    return mats[keep]
