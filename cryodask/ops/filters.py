"""Real- and Fourier-space helpers on grids: frequency indices, shells, masks, filters, resizing.

Fourier arrays are in FFTW's (``numpy.fft.rfftn``) layout: the last axis holds
the Hermitian half ``x = 0 .. box//2``, the other axes run ``0, 1, ..., -1``.
Following RELION (``FOR_ALL_ELEMENTS_IN_FFTW_TRANSFORM``), index ``i`` along a
full axis is the frequency ``i`` when ``i <= box//2`` and ``i - box`` otherwise,
so for even boxes the Nyquist row is ``+box/2``. Real-space centres are at
index ``box//2`` (RELION's ``setXmippOrigin``).

All functions take and return arrays of the caller's array module (NumPy or
CuPy, see :mod:`cryodask.backend`).
"""

from __future__ import annotations

from typing import Any

import numpy as np

from cryodask import backend


def fftw_frequencies(n: int, xp: Any = np) -> Any:
    """Integer frequencies of an FFT axis of length ``n`` in RELION's convention (Nyquist positive)."""
    i = xp.arange(n)
    return xp.where(i <= n // 2, i, i - n)


def frequency_grid(box: int, ndim: int = 3, *, half: bool = True, xp: Any = np) -> tuple[Any, ...]:
    """Broadcastable integer frequency coordinates ``(kz, ky, kx)`` (or ``(ky, kx)``) of a ``box`` grid.

    With ``half`` the last axis is the Hermitian half (``box//2 + 1`` entries).
    """
    full = fftw_frequencies(box, xp)
    last = xp.arange(box // 2 + 1) if half else full
    axes = [full] * (ndim - 1) + [last]
    out = []
    for d, a in enumerate(axes):
        shape = [1] * ndim
        shape[d] = a.shape[0]
        out.append(a.reshape(shape))
    return tuple(out)


def frequency_radius2(box: int, ndim: int = 3, *, half: bool = True, xp: Any = np) -> Any:
    """Squared integer frequency radius ``kx² + ky² (+ kz²)`` on the Fourier grid of ``box``."""
    r2 = 0
    for k in frequency_grid(box, ndim, half=half, xp=xp):
        r2 = r2 + k * k
    return r2


def radial_shell_index(box: int, ndim: int = 3, *, half: bool = True, xp: Any = np) -> Any:
    """Shell index ``round(|k|)`` of every Fourier pixel (RELION's ``ROUND(sqrt(kp²+ip²+jp²))``)."""
    r = xp.sqrt(frequency_radius2(box, ndim, half=half, xp=xp).astype(np.float64))
    # RELION's ROUND rounds halves away from zero; radii are >= 0, so floor(r + 0.5)
    return xp.floor(r + 0.5).astype(np.int64)


def radial_average(values: Any, shell: Any, n_shells: int, *, weights: Any = None) -> Any:
    """Mean of ``values`` over each shell ``0 .. n_shells-1`` (shells outside the range are ignored).

    Empty shells give 0. ``weights`` multiplies each value and its count.
    """
    xp = backend.array_module(values)
    shell = xp.broadcast_to(shell, values.shape).reshape(-1)
    vals = values.reshape(-1)
    keep = (shell >= 0) & (shell < n_shells)
    shell, vals = shell[keep], vals[keep]
    w = xp.ones_like(vals, dtype=np.float64) if weights is None else xp.broadcast_to(weights, values.shape).reshape(-1)[keep]
    total = xp.bincount(shell, weights=(vals * w).astype(np.float64), minlength=n_shells)
    count = xp.bincount(shell, weights=w.astype(np.float64), minlength=n_shells)
    return xp.where(count > 0, total / xp.where(count > 0, count, 1), 0.0)


def real_space_radius(box: int, ndim: int = 3, *, xp: Any = np, dtype: Any = np.float64) -> Any:
    """Distance of every voxel from the box centre (index ``box//2``), shape ``(box,)*ndim``."""
    c = xp.arange(box, dtype=dtype) - box // 2
    r2 = 0
    for d in range(ndim):
        shape = [1] * ndim
        shape[d] = box
        r2 = r2 + (c * c).reshape(shape)
    return xp.sqrt(r2)


def spherical_mask(box: int, radius: float, *, width: float = 3.0, ndim: int = 3, xp: Any = np,
                   dtype: Any = np.float32) -> Any:
    """Soft spherical (circular for ``ndim=2``) mask: 1 inside ``radius`` px, raised-cosine edge to 0 at ``radius + width``.

    This is RELION's ``raisedCosineMask`` with ``radius_p = radius + width``.
    """
    r = real_space_radius(box, ndim, xp=xp)
    if width <= 0:
        return (r <= radius).astype(dtype)
    edge = 0.5 + 0.5 * xp.cos(np.pi * (r - radius) / width)
    m = xp.where(r < radius, 1.0, xp.where(r > radius + width, 0.0, edge))
    return m.astype(dtype)


def soft_mask_outside_map(volume: Any, radius: float | None = None, cosine_width: float = 3.0) -> Any:
    """RELION's ``softMaskOutsideMap``: replace everything outside ``radius`` by the background average.

    The background is the (raised-cosine weighted) mean of the voxels at or
    beyond ``radius``; voxels within the ``cosine_width`` edge are blended.
    ``radius`` defaults to half the box. Works on 2D or 3D arrays; returns a new array.
    """
    xp = backend.array_module(volume)
    box = volume.shape[-1]
    if radius is None or radius < 0:
        radius = box / 2.0
    radius_p = radius + cosine_width
    r = real_space_radius(box, volume.ndim, xp=xp)
    raised = 0.5 + 0.5 * xp.cos(np.pi * (radius_p - r) / cosine_width)
    w = xp.where(r < radius, 0.0, xp.where(r > radius_p, 1.0, raised))
    total = float(w.sum())
    background = float((w * volume).sum()) / total if total > 0 else 0.0
    return ((1.0 - w) * volume + w * background).astype(volume.dtype)


def low_pass_filter(x: Any, low_pass: float, pixel_size: float, *, edge_width: int = 2,
                    ndim: int | None = None) -> Any:
    """Low-pass filter real-space images or maps at ``low_pass`` Å with a raised-cosine edge.

    RELION's ``lowPassFilterMap``: pass shells below ``round(box·apix/low_pass) - edge_width//2``,
    zero beyond ``+ edge_width//2``, raised cosine between. ``ndim`` (default ``x.ndim``) is the
    number of trailing axes transformed, so a stack ``(n, box, box)`` takes ``ndim=2``.
    """
    xp = backend.array_module(x)
    ndim = x.ndim if ndim is None else ndim
    box = x.shape[-1]
    axes = tuple(range(-ndim, 0))
    ft = backend.rfftn(x, axes=axes)
    ires_filter = int(np.floor(box * pixel_size / low_pass + 0.5))
    half = edge_width // 2
    edge_low = max(0.0, (ires_filter - half) / box)
    edge_high = min(float(box // 2 + 1), (ires_filter + half) / box)
    width = edge_high - edge_low
    res = xp.sqrt(frequency_radius2(box, ndim, xp=xp).astype(np.float64)) / box
    if width > 0:
        taper = 0.5 + 0.5 * xp.cos(np.pi * (res - edge_low) / width)
    else:
        taper = xp.zeros_like(res)
    f = xp.where(res < edge_low, 1.0, xp.where(res > edge_high, 0.0, taper))
    return backend.irfftn(ft * f.astype(x.dtype), x.shape[-ndim:], axes=axes).astype(x.dtype)


def window_fourier(ft: Any, new_box: int, ndim: int) -> Any:
    """RELION's ``windowFourierTransform`` on FFTW-layout half transforms (the last ``ndim`` axes).

    Shrinking keeps frequencies ``-(new_box-1)//2 .. new_box//2`` (Nyquist positive); growing pads
    with zeros and, as RELION does, keeps only the sphere ``|k| <= old_box//2`` (no corners, which
    would make the larger transform asymmetric). Values are copied unchanged, so with RELION's
    normalisation (forward divided by the number of pixels) a resized map keeps its amplitude.
    """
    xp = backend.array_module(ft)
    old_box = ft.shape[-2] if ndim >= 2 else 2 * (ft.shape[-1] - 1)
    lead = ft.shape[:-ndim]
    out = xp.zeros(lead + (new_box,) * (ndim - 1) + (new_box // 2 + 1,), dtype=ft.dtype)
    small = min(old_box, new_box)
    # the frequencies both grids hold, placed by index arithmetic in each
    k = fftw_frequencies(small)
    idx_old = np.mod(k, old_box)
    idx_new = np.mod(k, new_box)
    nx = small // 2 + 1
    sel_old = tuple([slice(None)] * len(lead)) + tuple(
        [_as_index(idx_old, d, ndim - 1, xp) for d in range(ndim - 1)]) + (slice(0, nx),)
    sel_new = tuple([slice(None)] * len(lead)) + tuple(
        [_as_index(idx_new, d, ndim - 1, xp) for d in range(ndim - 1)]) + (slice(0, nx),)
    out[sel_new] = ft[sel_old]
    if new_box > old_box:
        r2 = frequency_radius2(new_box, ndim, xp=xp)
        out *= (r2 <= (old_box // 2) ** 2)
    return out


def _as_index(idx: np.ndarray, d: int, n: int, xp: Any) -> Any:
    shape = [1] * n
    shape[d] = idx.shape[0]
    return xp.asarray(idx.reshape(shape))


def fourier_resize(x: Any, new_box: int, *, ndim: int | None = None) -> Any:
    """Crop or pad real-space images or maps in Fourier space to ``new_box`` (RELION's ``resizeMap``).

    The pixel size changes by ``box / new_box``; the mean is preserved. ``ndim`` trailing axes
    are resized (default: all axes).
    """
    ndim = x.ndim if ndim is None else ndim
    box = x.shape[-1]
    if new_box == box:
        return x.copy()
    axes = tuple(range(-ndim, 0))
    ft = window_fourier(backend.rfftn(x, axes=axes), new_box, ndim)
    return backend.irfftn(ft, (new_box,) * ndim, axes=axes).astype(x.dtype)


def fourier_crop(x: Any, new_box: int, *, ndim: int | None = None) -> Any:
    """Downsample by cropping the Fourier transform (``new_box < box``); see :func:`fourier_resize`."""
    if new_box > x.shape[-1]:
        raise ValueError(f"fourier_crop: new box {new_box} is larger than {x.shape[-1]}; use fourier_pad")
    return fourier_resize(x, new_box, ndim=ndim)


def fourier_pad(x: Any, new_box: int, *, ndim: int | None = None) -> Any:
    """Upsample by zero-padding the Fourier transform (``new_box > box``); see :func:`fourier_resize`."""
    if new_box < x.shape[-1]:
        raise ValueError(f"fourier_pad: new box {new_box} is smaller than {x.shape[-1]}; use fourier_crop")
    return fourier_resize(x, new_box, ndim=ndim)


def phase_shift(ft: Any, shifts: Any, box: int | None = None) -> Any:
    """Translate images by ``shifts`` pixels through a Fourier phase ramp (RELION's ``shiftImageInFourierTransform``).

    ``ft`` is ``(..., box, box//2+1)`` (FFTW half layout); ``shifts`` is ``(..., 2)`` as
    ``(x, y)``, broadcast against the leading axes. The content moves by ``+shift``:
    ``F(k) · exp(-2πi k·s / box)``, with the Nyquist row taken as ``+box/2`` as RELION does.
    To centre a particle with RELION origin ``o`` (pixels), shift by ``+o``; ``relion_project``
    renders an image with origin ``o`` by shifting the projection by ``-o``.
    """
    xp = backend.array_module(ft)
    box = ft.shape[-2] if box is None else box
    s = xp.asarray(shifts, dtype=np.float64)
    ky, kx = frequency_grid(box, 2, xp=xp)
    sx = s[..., 0][..., None, None]
    sy = s[..., 1][..., None, None]
    phase = (-2.0 * np.pi / box) * (kx * sx + ky * sy)
    ramp = (xp.cos(phase) + 1j * xp.sin(phase)).astype(ft.dtype)
    return ft * ramp
