"""RELION's translational sampling (``--offset_range``, ``--offset_step``), in pixels.

The coarse grid is the square lattice ``(ix, iy) * offset_step`` for
``|ix|, |iy| <= ceil(offset_range / offset_step)``, kept where
``x**2 + y**2 < offset_range**2 + 0.001`` (``HealpixSampling::setTranslations``;
points on the circle are included). It is listed with x outer and y inner and is
centred on (0, 0): callers add each particle's previous offset.

Oversampling by ``os`` replaces a coarse point by ``2**os x 2**os`` points with step
``offset_step / 2**os``, centred on it: ``t - step/2 + (k + 1/2) * step / 2**os``
(``getTranslationsInPixel``), again x outer, y inner.

RELION's random perturbation shifts every translation by
``random_perturbation * offset_step`` in both x and y.
"""

from __future__ import annotations

import math

import numpy as np
import numpy.typing as npt

from cryodask.errors import UserError

__all__ = ["translation_grid", "oversample_translations", "n_translations"]


def translation_grid(
    offset_range: float,
    offset_step: float,
    *,
    random_perturbation: float = 0.0,
) -> np.ndarray:
    """Coarse 2D translations ``(T, 2)`` float64, columns (x, y), in pixels.

    Parameters
    ----------
    offset_range
        ``--offset_range``: radius of the search disc in pixels (>= 0).
    offset_step
        ``--offset_step``: lattice step in pixels (> 0).
    random_perturbation
        This iteration's perturbation instance (see
        :func:`cryodask.geometry.healpix.next_random_perturbation`); adds
        ``random_perturbation * offset_step`` to x and y.

    Examples
    --------
    >>> translation_grid(6, 2).shape   # RELION's default: 29 translations
    (29, 2)
    """
    if not offset_step > 0:
        raise UserError("--offset_step", f"offset step {offset_step} must be positive (pixels)")
    if not offset_range >= 0:
        raise UserError("--offset_range", f"offset range {offset_range} must be zero or positive (pixels)")
    maxp = int(math.ceil(offset_range / offset_step))
    k = np.arange(-maxp, maxp + 1)
    ix, iy = np.meshgrid(k, k, indexing="ij")  # x outer, y inner
    t = np.stack([ix.ravel(), iy.ravel()], axis=1) * float(offset_step)
    # RELION's tolerance keeps points that lie on the circle despite round-off.
    t = t[(t**2).sum(axis=1) < offset_range**2 + 0.001]
    return t + random_perturbation * offset_step


def n_translations(offset_range: float, offset_step: float, oversampling: int = 0) -> int:
    """Number of translations per coarse grid, times ``4**oversampling``."""
    return len(translation_grid(offset_range, offset_step)) * 4 ** int(oversampling)


def oversample_translations(
    coarse: npt.ArrayLike,
    indices: npt.ArrayLike | None,
    oversampling: int,
    offset_step: float,
) -> np.ndarray:
    """Oversampled translations ``(len(indices) * 4**os, 2)`` around chosen coarse ones.

    Parameters
    ----------
    coarse
        Coarse translations ``(T, 2)`` (x, y) as returned by :func:`translation_grid`
        (perturbed or not: children follow their parent).
    indices
        Rows of ``coarse`` to expand, in the order wanted; None for all.
    oversampling
        ``os``; each coarse point gives ``4**os`` children.
    offset_step
        The coarse step in pixels.

    Returns
    -------
    numpy.ndarray
        float64; the children of ``coarse[indices[i]]`` are rows
        ``i * 4**os ... (i + 1) * 4**os - 1``, x outer, y inner.
    """
    c = np.asarray(coarse, dtype=np.float64).reshape(-1, 2)
    if indices is not None:
        c = c[np.asarray(indices, dtype=np.int64).ravel()]
    n = 1 << int(oversampling)
    sub = -0.5 * offset_step + (0.5 + np.arange(n)) * (offset_step / n)
    dx, dy = np.meshgrid(sub, sub, indexing="ij")  # x outer, y inner
    d = np.stack([dx.ravel(), dy.ravel()], axis=1)  # (n*n, 2)
    return (c[:, None, :] + d[None, :, :]).reshape(-1, 2)
