"""M-step: from backprojected sums to maps and the spectra that regularise them.

Reconstruction follows RELION's ``BackProjector::reconstruct``
(``src/backprojector.cpp``):

1. Hermitian symmetry on the ``x = 0`` plane, then point-group symmetry
   (:meth:`cryodask.ops.backproject.BackProjector.symmetrised`).
2. With a τ² spectrum (``do_map``): ``W(ξ) = weight(ξ) + 1/(padᵈ·T·τ²(r))`` for shells
   ``r >= minres_map`` (``1/(0.001·weight)`` where τ² = 0); d = 3, or 2 for 2D references.
3. ``V = data / W``, either directly (``skip_gridding``, RELION 4/5's default, with
   RELION 4/5's floor ``max(W, <W>_shell/1000)`` or RELION 3.1's plain division),
   or with RELION 3.1's iterative gridding weights (Pipe & Menon density
   compensation with a Kaiser-Bessel blob; ``relion_reconstruct`` without
   ``--skip_gridding``).
4. Inverse FFT on the padded box, window to N³, divide by ``pad³·N`` (``pad²`` in 2D),
   soft mask outside the sphere of radius N/2 (``softMaskOutsideMap``), divide by
   sinc²(r/(pad·N)).

The spectra helpers (:func:`reconstruction_sigma2`, :func:`tau2_from_fsc`,
:func:`data_vs_prior`) are RELION's ``updateSSNRarrays``; σ²/τ² updates of later
stages belong in this module too.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

import numpy as np

from cryodask import backend
from cryodask.ops.backproject import BackProjector
from cryodask.ops.filters import soft_mask_outside_map
from cryodask.ops.project import grid_correct, padded_size

__all__ = [
    "reconstruct",
    "reconstruction_sigma2",
    "tau2_from_fsc",
    "data_vs_prior",
    "DataVsPrior",
    "blob_fourier_profile",
    "scale_correction",
    "norm_correction",
]


def _shell_round(bp: BackProjector) -> Any:
    """Shell (pixels of the original box) of each accumulator voxel: ``round(|ξ| / pad)``."""
    xp = backend.array_module(bp.data)
    return xp.floor(xp.sqrt(bp.radius2().astype(np.float64)) / bp.pad + 0.5).astype(np.int64)


def _prepared(bp: BackProjector, sym: Any) -> BackProjector:
    return bp if bp.is_symmetrised else bp.symmetrised(sym)


def reconstruction_sigma2(bp: BackProjector, *, sym: Any = None) -> Any:
    """Noise power in the reconstruction per shell: ``1 / <pad³·weight>`` (0 where the weight is 0).

    RELION's σ²_rec (``sigma2`` in ``BackProjector::reconstruct``), shape ``(N//2+1,)``, over
    voxels with ``|ξ|² < R²``.
    """
    bp = _prepared(bp, sym)
    xp = backend.array_module(bp.weight)
    nsh = bp.ori_size // 2 + 1
    inner = bp.radius2() < bp.radius ** 2
    shell = xp.broadcast_to(_shell_round(bp), bp.weight.shape)[inner]
    w = (bp.pad ** bp.ndim) * bp.weight[inner].astype(np.float64)
    total = xp.bincount(shell, weights=w, minlength=nsh)[:nsh]
    count = xp.bincount(shell, minlength=nsh)[:nsh].astype(np.float64)
    return xp.where(total > 1e-10, count / xp.where(total > 1e-10, total, 1.0), 0.0)


def tau2_from_fsc(fsc: Any, sigma2: Any, *, tau2_fudge: float = 1.0,
                  is_whole_instead_of_half: bool = False) -> tuple[Any, Any]:
    """τ² from a gold-standard FSC (RELION ``updateSSNRarrays`` with ``update_tau2_with_fsc``).

    ``FSC' = clip(FSC, 0.001, ...)``; for the joined final map ``FSC' = sqrt(2·FSC'/(1+FSC'))``;
    then ``min(FSC', 0.999)``, ``SSNR = T·FSC'/(1-FSC')`` and ``τ² = SSNR·σ²_rec``.
    Returns ``(tau2, data_vs_prior)`` (the SSNR, reported as rlnSsnrMap).
    """
    xp = backend.array_module(sigma2)
    f = xp.maximum(xp.asarray(fsc, dtype=np.float64), 0.001)
    if is_whole_instead_of_half:
        f = xp.sqrt(2.0 * f / (f + 1.0))
    f = xp.minimum(f, 0.999)
    ssnr = tau2_fudge * f / (1.0 - f)
    return ssnr * sigma2, ssnr


@dataclass(frozen=True)
class DataVsPrior:
    """Per-shell evidence-to-prior ratio and the fraction of voxels where it is at least 1."""

    data_vs_prior: Any
    fourier_coverage: Any


def _inverse_tau2(bp: BackProjector, tau2: Any, tau2_fudge: float, w: Any, shell: Any) -> Any:
    xp = backend.array_module(w)
    tau2 = xp.asarray(tau2, dtype=np.float64)
    t = tau2[xp.minimum(shell, tau2.shape[0] - 1)]
    if bool(xp.any(t < 0)):
        raise ValueError("reconstruct: negative values in the tau2 spectrum")
    with np.errstate(divide="ignore"):
        return xp.where(t > 0, 1.0 / (bp.pad ** bp.ndim * tau2_fudge * xp.where(t > 0, t, 1.0)),
                        1.0 / (0.001 * w))


def data_vs_prior(bp: BackProjector, tau2: Any, *, tau2_fudge: float = 1.0, sym: Any = None) -> DataVsPrior:
    """RELION's ``data_vs_prior`` (``<weight·pad³·T·τ²>`` per shell; 999 where a shell is empty,
    0 beyond ``r_max``) and ``fourier_coverage`` (fraction of voxels with ratio >= 1)."""
    bp = _prepared(bp, sym)
    xp = backend.array_module(bp.weight)
    nsh = bp.ori_size // 2 + 1
    inner = bp.radius2() < bp.radius ** 2
    shell = xp.broadcast_to(_shell_round(bp), bp.weight.shape)[inner]
    w = bp.weight[inner].astype(np.float64)
    with np.errstate(divide="ignore", invalid="ignore"):
        ratio = w / _inverse_tau2(bp, tau2, tau2_fudge, w, shell)
    ratio = xp.nan_to_num(ratio)
    count = xp.bincount(shell, minlength=nsh)[:nsh].astype(np.float64)
    dvp = xp.bincount(shell, weights=ratio, minlength=nsh)[:nsh]
    cov = xp.bincount(shell, weights=(ratio >= 1).astype(np.float64), minlength=nsh)[:nsh]
    idx = xp.arange(nsh)
    dvp = xp.where(idx > bp.r_max, 0.0, xp.where(count < 0.001, 999.0, dvp / xp.maximum(count, 1)))
    cov = xp.where(count > 0, cov / xp.maximum(count, 1), 0.0)
    return DataVsPrior(data_vs_prior=dvp, fourier_coverage=cov)


def blob_fourier_profile(rval: Any, *, radius: float = 3.8, alpha: float = 15.0, order: int = 0,
                         n_table: int = 10000) -> Any:
    """Normalised Fourier transform of a Kaiser-Bessel blob at ``rval`` (1/voxel), as RELION tabulates it.

    RELION's ``TabFtBlob``: ``kaiser_Fourier_value`` sampled every ``0.5/n_table`` and looked up
    by truncation, 0 from 0.5 on, divided by its value at 0. RELION 3.1's BackProjector uses
    ``radius = 2 × 1.9`` whatever the padding.
    """
    from scipy.special import iv, jv

    xp = backend.array_module(rval)
    sampling = 0.5 / n_table
    idx = xp.floor(xp.abs(xp.asarray(rval, dtype=np.float64)) / sampling)
    w = backend.to_numpy(idx) * sampling
    nu = 1.5 if order == 0 else 3.5
    if order not in (0, 2):
        raise ValueError("blob order must be 0 or 2")

    def kaiser(wv: np.ndarray) -> np.ndarray:
        c = 2.0 * np.pi * radius * wv
        sig = np.sqrt(np.abs(alpha * alpha - c * c))
        small = sig < 1e-8
        s = np.where(small, 1.0, sig)
        val = np.where(c > alpha, jv(nu, s), iv(nu, s)) / s ** nu
        # limit sig -> 0 of I_nu(sig)/sig^nu and J_nu(sig)/sig^nu
        from scipy.special import gamma

        return np.where(small, 2.0 ** -nu / gamma(nu + 1.0), val)

    out = kaiser(w) / kaiser(np.zeros(1))[0]
    out = np.where(backend.to_numpy(idx) >= n_table, 0.0, out)
    return xp.asarray(out)


def _decentre(a: Any) -> Any:
    """Centred (odd, ``2h+1``) y/z axes to FFTW order; x (the last axis) already starts at 0."""
    xp = backend.array_module(a)
    return xp.fft.ifftshift(a, axes=tuple(range(a.ndim - 1)))


def _recentre(a: Any) -> Any:
    xp = backend.array_module(a)
    return xp.fft.fftshift(a, axes=tuple(range(a.ndim - 1)))


def _gridding_weights(bp: BackProjector, w: Any, n_iter: int, blob: dict[str, Any]) -> Any:
    """Pipe & Menon (1999) density compensation on the odd ``2R+3`` grid, as RELION 3.1 does it."""
    xp = backend.array_module(w)
    m = bp.data.shape[0]
    nd = bp.ndim
    axes = tuple(range(nd))
    r2 = bp.radius2()
    inner = _decentre(xp.broadcast_to(r2 < bp.radius ** 2, w.shape))
    fweight = _decentre(w.astype(np.float64))
    fnew = inner.astype(np.float64)
    # blob transform in real space; RELION's distances: k if k < M/2 else k - M, over ori_size·pad
    k = np.arange(m)
    k = np.where(k < m // 2, k, k - m).astype(np.float64)
    rr2 = 0.0
    for d in range(nd):
        shape = [1] * nd
        shape[d] = m
        rr2 = rr2 + (k * k).reshape(shape)
    rr = np.sqrt(rr2)
    ftblob = blob_fourier_profile(xp.asarray(rr / (bp.ori_size * bp.pad)), **blob)
    # FFTs in the accumulators' precision; the weights themselves stay float64 as in RELION
    cdtype = np.complex128 if bp.weight.dtype == np.float64 else np.complex64
    ftblob = ftblob.astype(bp.weight.dtype)
    for _ in range(n_iter):
        conv = (fnew * fweight).astype(cdtype)
        real = backend.irfftn(conv, (m,) * nd, axes=axes)
        conv = backend.rfftn(real * ftblob, axes=axes)
        fnew = xp.where(inner, fnew / xp.maximum(xp.abs(conv), 1e-6), fnew)
    return fnew


def reconstruct(bp: BackProjector, *, tau2: Any = None, tau2_fudge: float = 1.0,
                skip_gridding: bool = True, gridding_iter: int = 10, sym: Any = None,
                minres_map: int = 5, weight_floor: bool = True, blob_radius: float = 1.9,
                blob_alpha: float = 15.0, blob_order: int = 0) -> Any:
    """Reconstruct the real-space map ``(N, N, N)`` (or image ``(N, N)`` for 2D accumulators) from backprojected sums.

    Parameters
    ----------
    bp
        The accumulators (raw or already :meth:`~BackProjector.symmetrised`).
    tau2
        Signal power spectrum ``(N//2+1,)``; regularise with it (RELION ``do_map``). None
        reconstructs ``data / weight`` (``relion_reconstruct``).
    tau2_fudge
        RELION's T (``--tau2_fudge``).
    skip_gridding
        Divide by the weight directly (RELION 4/5's default) instead of RELION 3.1's
        iterative gridding weights (``--dont_skip_gridding`` / 3.1 ``relion_reconstruct``).
    gridding_iter
        Iterations of the gridding weights (RELION ``--iter``, 10).
    sym
        Point-group symmetry (matrices, a SymmetryGroup or a name) if ``bp`` is raw.
    minres_map
        Shells below this are not regularised (RELION: 5).
    weight_floor
        With ``skip_gridding``: RELION 4/5's ``max(W, <W>_shell/1000)``; False divides only where
        ``W > 0`` as RELION 3.1 did.
    blob_radius, blob_alpha, blob_order
        The gridding blob (RELION ``--blob_r/--blob_a/--blob_m``; the radius is doubled as in 3.1).
    """
    bp = _prepared(bp, sym)
    xp = backend.array_module(bp.data)
    cdtype, rdtype = bp.data.dtype, bp.weight.dtype
    n, padf = bp.ori_size, bp.pad
    p, _ = padded_size(n, padf)
    r2 = bp.radius2()
    rad2 = bp.radius ** 2
    within = r2 <= rad2
    data = xp.where(within, bp.data, 0).astype(cdtype)
    w = xp.where(within, bp.weight.astype(np.float64), 0.0)
    shell = xp.broadcast_to(_shell_round(bp), w.shape)

    if tau2 is not None:
        inner = xp.broadcast_to(r2 < rad2, w.shape)
        with np.errstate(divide="ignore"):
            invtau2 = _inverse_tau2(bp, tau2, tau2_fudge, w, shell)
        w = xp.where(inner & (shell >= minres_map), w + invtau2, w)

    if skip_gridding:
        if weight_floor:
            w = xp.maximum(w, _shell_floor(bp, w))
        with np.errstate(divide="ignore", invalid="ignore"):
            v = xp.where(w > 0, data / xp.where(w > 0, w, 1.0), data)
    else:
        fnew = _gridding_weights(bp, w, gridding_iter,
                                 dict(radius=2.0 * blob_radius, alpha=blob_alpha, order=blob_order))
        v = data * _recentre(fnew)
    v = v.astype(cdtype)

    # window the centred grid into the FFTW grid of the even padded box P: frequencies (-P/2, P/2]
    h = bp.half_extent
    k = np.arange(-h, h + 1)
    ok = (k > -p // 2) & (k <= p // 2)
    kx = np.arange(v.shape[-1])
    okx = kx <= p // 2
    src_z = xp.asarray(np.nonzero(ok)[0])
    dst = xp.asarray(np.mod(k[ok], p))
    src_x = xp.asarray(np.nonzero(okx)[0])
    nd = bp.ndim
    fpad = xp.zeros((p,) * (nd - 1) + (p // 2 + 1,), dtype=cdtype)
    if nd == 3:
        fpad[dst[:, None, None], dst[None, :, None], src_x[None, None, :]] = \
            v[src_z[:, None, None], src_z[None, :, None], src_x[None, None, :]]
    else:
        fpad[dst[:, None], src_x[None, :]] = v[src_z[:, None], src_x[None, :]]
    vol = backend.irfftn(fpad, (p,) * nd, axes=tuple(range(nd)))
    del fpad
    vol = xp.fft.fftshift(vol)
    o = p // 2 - n // 2
    vol = vol[(slice(o, o + n),) * nd]
    # slices of a 3D map carry the 2D normalisation (values N times the 3D transform's)
    vol = vol / (padf ** nd * (n if nd == 3 else 1))
    vol = soft_mask_outside_map(vol.astype(rdtype), n / 2.0, 3.0)
    return grid_correct(vol, padf)


def _shell_floor(bp: BackProjector, w: Any) -> Any:
    """RELION 4/5's skip-gridding floor: 1/1000 of the mean weight in each (floored) shell."""
    xp = backend.array_module(w)
    r2 = xp.broadcast_to(bp.radius2(), w.shape)
    r_max = bp.r_max
    shell = xp.floor(xp.sqrt(r2.astype(np.float64)) / bp.pad).astype(np.int64)
    sel = r2 < int(np.floor((r_max * bp.pad) ** 2 + 0.5))
    total = xp.bincount(shell[sel], weights=w[sel], minlength=r_max)[:r_max]
    count = xp.bincount(shell[sel], minlength=r_max)[:r_max].astype(np.float64)
    floor = total / (1000.0 * xp.maximum(count, 1.0))
    return floor[xp.minimum(shell, r_max - 1)]



def scale_correction(scale: Any, signal_product: Any, reference_power: Any, data_vs_prior: Any,
                     group_particles: Any) -> np.ndarray:
    """RELION's ``--scale`` update: the intensity scale of each group.

    ``signal_product[g, r]`` = Σ w·⟨X, s·CTF·A⟩ and ``reference_power[g, r]`` = Σ w·|s·CTF·A|²
    per shell, summed with the current scales ``s`` in the references (as the E-step scored
    them), so ``s_new = s·ΣXA/ΣAA`` over the shells where ``data_vs_prior`` (the SSNR) > 3.
    The scales are then clamped to [median/5, 5·median] and renormalised to a mean of 1
    weighted by the groups' particles (RELION's ``maximizationOtherParameters``). Groups
    without signal in those shells keep their scale; with no such shell at all nothing changes.
    """
    s = np.asarray(scale, np.float64).copy()
    xa = np.asarray(signal_product, np.float64)
    aa = np.asarray(reference_power, np.float64)
    dvp = np.asarray(data_vs_prior, np.float64)
    n = min(xa.shape[1], dvp.shape[0])
    good = np.flatnonzero(dvp[:n] > 3.0)
    good = good[good > 0]  # the origin carries the mean, not the signal
    if len(good) == 0:
        return s
    sxa, saa = xa[:, good].sum(axis=1), aa[:, good].sum(axis=1)
    ok = (saa > 0) & (sxa > 0)
    s[ok] = s[ok] * sxa[ok] / saa[ok]
    counts = np.asarray(group_particles, np.float64)
    med = float(np.median(s[counts > 0])) if (counts > 0).any() else 1.0
    s = np.clip(s, med / 5.0, 5.0 * med)
    mean = float((s * counts).sum() / counts.sum()) if counts.sum() > 0 else 1.0
    return s / mean if mean > 0 else s


def norm_correction(norm: Any, avg_norm: float, wdiff2: Any, highres_power: Any) -> np.ndarray:
    """RELION's ``--norm`` update of each particle's ``rlnNormCorrection``.

    ``wdiff2`` = Σ_φ w·Σ_k |X − A|² over the scoring window of images already multiplied by
    ``avg_norm/norm`` and ``highres_power`` = Σ_k |X|² beyond it (to Nyquist). With RELION's
    FFT normalisation, 2·(their sum) is the variance of the residual image, so the new value
    ``(norm/avg_norm)·√(2·(wdiff2 + highres_power))`` is the noise level of the image as read.
    """
    norm = np.asarray(norm, np.float64)
    total = 2.0 * (np.asarray(wdiff2, np.float64) + np.asarray(highres_power, np.float64))
    return (norm / float(avg_norm)) * np.sqrt(np.maximum(total, 0.0))
