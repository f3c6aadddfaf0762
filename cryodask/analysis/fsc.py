"""Fourier shell correlation and the resolution it implies (RELION's ``getFSC`` and postprocess rule).

Shells are ``round(|k|)`` over the Hermitian half of the transform, each half-grid
element counted once, ``0 .. N//2`` (RELION ``getFSC``, ``src/fftw.cpp``).
"""

from __future__ import annotations

from typing import Any

import numpy as np

from cryodask import backend
from cryodask.ops.filters import radial_shell_index

__all__ = ["fsc", "fsc_from_transforms", "shell_frequencies", "shell_resolutions", "resolution_at",
           "shell_counts"]


def fsc_from_transforms(ft1: Any, ft2: Any) -> Any:
    """FSC of two half transforms ``(N, N, N//2+1)`` (or 2D ``(N, N//2+1)``); shape ``(N//2+1,)``.

    Shells with no power in either map get 0.
    """
    xp = backend.array_module(ft1, ft2)
    if ft1.shape != ft2.shape:
        raise ValueError(f"fsc: transforms differ in shape: {tuple(ft1.shape)} vs {tuple(ft2.shape)}")
    box = ft1.shape[0]
    nsh = box // 2 + 1
    shell = radial_shell_index(box, ft1.ndim, xp=xp).reshape(-1)
    keep = shell < nsh
    shell = shell[keep]
    a = ft1.reshape(-1)[keep].astype(np.complex128)
    b = ft2.reshape(-1)[keep].astype(np.complex128)
    num = xp.bincount(shell, weights=(xp.conj(a) * b).real, minlength=nsh)
    den1 = xp.bincount(shell, weights=(a.real ** 2 + a.imag ** 2), minlength=nsh)
    den2 = xp.bincount(shell, weights=(b.real ** 2 + b.imag ** 2), minlength=nsh)
    den = xp.sqrt(den1 * den2)
    return xp.where(den > 0, num / xp.where(den > 0, den, 1.0), 0.0)


def fsc(map1: Any, map2: Any, *, mask: Any = None) -> Any:
    """Fourier shell correlation of two real-space maps (or images), shape ``(N//2+1,)``.

    ``mask`` (same shape, values in [0, 1]) multiplies both maps first, as in RELION's
    postprocessing of masked maps.
    """
    if map1.shape != map2.shape:
        raise ValueError(f"fsc: maps differ in shape: {tuple(map1.shape)} vs {tuple(map2.shape)}")
    if len(set(map1.shape)) != 1:
        raise ValueError(f"fsc: maps must be square or cubic, not {tuple(map1.shape)}")
    if mask is not None:
        map1 = map1 * mask
        map2 = map2 * mask
    axes = tuple(range(map1.ndim))
    return fsc_from_transforms(backend.rfftn(map1, axes=axes), backend.rfftn(map2, axes=axes))


def shell_counts(box: int, ndim: int = 3, *, xp: Any = np) -> Any:
    """Number of half-transform elements in each shell ``0 .. box//2``."""
    nsh = box // 2 + 1
    shell = radial_shell_index(box, ndim, xp=xp).reshape(-1)
    return xp.bincount(shell[shell < nsh], minlength=nsh)


def shell_frequencies(box: int, pixel_size: float) -> np.ndarray:
    """Spatial frequency of each shell in 1/Å: ``i / (box · pixel_size)``."""
    return np.arange(box // 2 + 1) / (box * pixel_size)


def shell_resolutions(box: int, pixel_size: float) -> np.ndarray:
    """Resolution of each shell in Å: ``box · pixel_size / i`` (``inf`` for shell 0)."""
    i = np.arange(box // 2 + 1, dtype=np.float64)
    with np.errstate(divide="ignore"):
        return np.where(i > 0, box * pixel_size / np.where(i > 0, i, 1.0), np.inf)


def resolution_at(curve: Any, threshold: float, pixel_size: float, box: int | None = None, *,
                  interpolate: bool = False) -> float:
    """Resolution (Å) where an FSC curve first drops below ``threshold`` (e.g. 0.143 or 0.5).

    RELION's postprocess rule: walk the shells from 0 and report the last one before
    the first value below ``threshold`` (``box·apix/i``; ``inf`` if that is shell 0,
    Nyquist ``2·apix`` if the curve never drops). With ``interpolate`` the crossing is
    placed linearly between the two shells. ``box`` defaults to ``2·(len(curve)-1)``.
    """
    c = np.asarray(backend.to_numpy(curve), dtype=np.float64)
    box = 2 * (len(c) - 1) if box is None else int(box)
    below = np.nonzero(c < threshold)[0]
    if len(below) == 0:
        last = float(len(c) - 1)
    else:
        first = int(below[0])
        last = float(first - 1)
        if interpolate and first > 0:
            c0, c1 = c[first - 1], c[first]
            last = first - 1 + (c0 - threshold) / (c0 - c1)
    if last <= 0:
        return float("inf")
    return float(box * pixel_size / last)
