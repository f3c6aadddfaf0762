"""The E-step scoring kernel: RELION's squared differences, posterior weights and M-step sums as GEMMs.

Everything here works on plain arrays for one particle chunk (and, for the scoring
functions, one class: the caller loops over classes and stacks the results along the
orientation axis, see :func:`score_two_pass`). NumPy arrays compute on the CPU, CuPy
arrays on the GPU (:func:`cryodask.backend.array_module`); there are no Python loops
over particles, orientations or translations.

Notation (RELION, ``reference/relion-algorithm.md`` §1.3-1.5)
----------------------------------------------------------------
``i`` particle, ``r`` orientation, ``t`` translation, ``k`` a Fourier pixel of the
current window, flattened (the caller picks the pixels: Hermitian half, inside
``current_size``). ``X_i^t`` is the (masked) particle FT shifted by ``-t``, ``P_r`` the
central slice, ``A = s · CTF_i · P_r`` the expected image, ``inv_sigma2`` RELION's
``Minvsigma2`` (``0`` at ``k = 0`` and outside the window)::

    diff2(i,r,t) = Σ_k m_k |A(k) − X_i^t(k)|² · inv_sigma2(k) / 2        (+ highres_Xi2_i / 2)
                 = Σ_k m_k |X_i(k)|² inv_sigma2 / 2                       constant per particle
                 + Σ_k [m_k s² CTF² inv_sigma2 / 2] · |P_r(k)|²             GEMM  N_i × K × N_r
                 − Σ_k Re([m_k s CTF inv_sigma2 X_i^t(k)] · conj P_r(k))    GEMM  (N_i·N_t) × 2K × N_r

The last GEMM is real: a complex array viewed as ``float`` has its real and imaginary
parts interleaved, and the dot product of two such rows is ``Re(a · conj b)``, so it
runs as one SGEMM/DGEMM with no copies of the projections.

Multiplicity ``m_k`` (the rule used here)
-----------------------------------------
RELION sums ``diff2`` over the elements of its Hermitian-half array, each counted
**once** (``ml_optimiser.cpp``: ``diff2 += |Frefctf − Fimg_shift|² · Minvsigma2`` over
``n < exp_current_Fsize2``, then ``/2``; the source comments that the factor 2 is the
Gaussian's, "NOT because of 2-dimensionality of the complex plane"). So the default,
``multiplicity=None``, is ``m_k = 1`` for every pixel: RELION parity. Note that on the
``x = 0`` column both ``(0, y)`` and its Friedel mate ``(0, −y)`` are stored, so RELION
effectively double-counts that column relative to the independent pixels.

:func:`hermitian_multiplicity` with ``rule="full"`` gives ``m = 2`` for ``0 < kx < N/2``
and ``1`` on the ``kx = 0`` and Nyquist columns; with it, ``diff2`` equals the sum over
every pixel of the full (non-Hermitian-reduced) transform inside a centrosymmetric
window, which is tested against a full-plane brute force. The multiplicity enters the
likelihood only (``diff2``, cross-correlation, ``log_sigma2_term``); the M-step sums are
per stored pixel, as RELION's backprojection and σ² bins are.

Precision
---------
float32 by default (``double=True`` for float64). The per-particle constant is large
and common to every pose, so the scoring functions can leave it out
(``include_constant=False``) and report it separately (:attr:`ScoringTerms.constant`,
float64): the weights only need ``diff2 − min diff2``, which float32 then resolves to
the GEMMs' own rounding, and the log-likelihood adds the constant back in float64.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from dataclasses import dataclass, replace
from typing import Any

import numpy as np

from cryodask.backend import array_module, complex_dtype, real_dtype

Array = Any  # numpy.ndarray or cupy.ndarray

#: RELION sets a weight to zero when ``diff2 − min diff2`` exceeds this (``convertAllSquaredDifferencesToWeights``).
MAX_EXPONENT = 700.0
#: Default memory budget (bytes) for one orientation block's GEMM output. 16 MiB: ~1,000 orientations for a
#: half-set chunk of 90 particles × 45 translations, which BLAS runs at its best rate (137 GFLOPS on one core
#: here, against 121 for 128 MiB blocks, whose output no longer stays in cache for the subtraction after it).
DEFAULT_BLOCK_BYTES = 1 << 24


# ----------------------------------------------------------------------------------------
# small helpers
# ----------------------------------------------------------------------------------------
def _real_view(a: Array) -> Array:
    """A C-contiguous complex (n, K) array as real (n, 2K), real and imaginary parts interleaved (no copy)."""
    xp = array_module(a)
    a = xp.ascontiguousarray(a)
    rdt = np.float64 if a.dtype == np.complex128 else np.float32
    try:
        return a.view(rdt)
    except (ValueError, TypeError):  # older CuPy: no itemsize-changing views
        return xp.stack([a.real, a.imag], axis=-1).reshape(a.shape[:-1] + (2 * a.shape[-1],))


def _complex_view(a: Array) -> Array:
    """Inverse of :func:`_real_view`: real (n, 2K) interleaved → complex (n, K)."""
    xp = array_module(a)
    a = xp.ascontiguousarray(a)
    cdt = np.complex128 if a.dtype == np.float64 else np.complex64
    try:
        return a.view(cdt)
    except (ValueError, TypeError):
        pairs = a.reshape(a.shape[:-1] + (a.shape[-1] // 2, 2))
        return (pairs[..., 0] + 1j * pairs[..., 1]).astype(cdt)


def _abs2(a: Array) -> Array:
    if isinstance(a, np.ndarray) and np.iscomplexobj(a):
        from cryodask.em.kernels import abs2

        return abs2(a)
    return a.real * a.real + a.imag * a.imag


def _per_particle(value: Any, n: int, xp: Any, dtype: Any) -> Array:
    """Scalar or (n,) → (n, 1) array (a per-particle factor broadcast over pixels)."""
    v = xp.asarray(value, dtype=dtype)
    if v.ndim == 0:
        return xp.full((n, 1), v, dtype=dtype)
    if v.shape != (n,):
        raise ValueError(f"expected a scalar or shape ({n},), got {tuple(v.shape)}")
    return v.reshape(n, 1)


def _per_pixel(value: Any, n: int, k: int, xp: Any, dtype: Any, name: str) -> Array:
    """(K,) or (N_i, K) → array broadcastable to (N_i, K)."""
    v = xp.asarray(value, dtype=dtype)
    if v.shape == (k,):
        return v.reshape(1, k)
    if v.shape == (n, k):
        return v
    raise ValueError(f"{name}: expected shape ({k},) or ({n}, {k}), got {tuple(v.shape)}")


def _multiplicity(multiplicity: Any, k: int, xp: Any, dtype: Any) -> Array:
    if multiplicity is None:
        return xp.ones((1, k), dtype=dtype)
    m = xp.asarray(multiplicity, dtype=dtype)
    if m.shape != (k,):
        raise ValueError(f"multiplicity: expected shape ({k},), got {tuple(m.shape)}")
    return m.reshape(1, k)


def hermitian_multiplicity(kx: Any, box: int, rule: str = "relion") -> Array:
    """How many pixels of the full transform each stored Hermitian-half pixel stands for.

    Parameters
    ----------
    kx : array of int
        x frequency index (0 … box//2) of each stored pixel.
    box : int
        Side of the (windowed) image the half transform belongs to.
    rule : {"relion", "full"}
        ``"relion"``: 1 everywhere (what RELION's ``diff2`` sums; the default of every
        function here). ``"full"``: 2 for ``0 < kx < box/2``, 1 on the ``kx = 0`` and
        Nyquist columns, which turns the half-plane sum into the full-plane sum.
    """
    xp = array_module(kx)
    kx = xp.asarray(kx)
    if rule == "relion":
        return xp.ones(kx.shape, dtype=np.float64)
    if rule == "full":
        return xp.where((kx > 0) & (2 * kx != box), 2.0, 1.0)
    raise ValueError(f"rule must be 'relion' or 'full', not {rule!r}")


def inv_sigma2_from_sigma2(sigma2: Any) -> Array:
    """RELION's ``Minvsigma2``: ``1/σ²``, and 0 where σ² is 0, negative, infinite or NaN (pixel left out)."""
    xp = array_module(sigma2)
    s = xp.asarray(sigma2)
    good = xp.isfinite(s) & (s > 0)
    return xp.where(good, 1.0 / xp.where(good, s, 1.0), 0.0).astype(s.dtype if s.dtype.kind == "f" else np.float64)


def log_sigma2_term(inv_sigma2: Any, multiplicity: Any = None) -> Array:
    """``Σ_k m_k log(2π σ²(k))`` over the pixels that count (``inv_sigma2 > 0``), per particle, float64.

    This is the normalisation RELION subtracts in ``rlnLogLikeliContribution``
    (``logsigma2`` in ``storeWeightedSums``; origin and out-of-window pixels excluded).
    ``inv_sigma2`` is (K,) or (N_i, K); the result is () or (N_i,).
    """
    xp = array_module(inv_sigma2)
    v = xp.asarray(inv_sigma2, dtype=np.float64)
    m = 1.0 if multiplicity is None else xp.asarray(multiplicity, dtype=np.float64)
    good = v > 0
    terms = xp.where(good, m * xp.log(2.0 * np.pi / xp.where(good, v, 1.0)), 0.0)
    return terms.sum(axis=-1)


def phase_ramps(freqs: Any, translations: Any, box: int, *, double: bool = False) -> Array:
    """Fourier factors that move an image by ``−t``: ``exp(+2πi k·t / box)``, shape (N_t, K).

    ``freqs`` (K, d) holds the integer frequency (kx, ky[, kz]) of each pixel and
    ``translations`` (N_t, d) the shifts in pixels, in the same axis order. Multiplying a
    particle's FT by row ``t`` gives the FT of the particle shifted by ``−t``, which is
    what RELION scores for translation ``t`` (``shiftImageInFourierTransform(..., −t)``),
    i.e. ``fft(np.roll(img, -t))`` for integer ``t``.
    """
    xp = array_module(freqs, translations)
    f = xp.asarray(freqs, dtype=np.float64)
    t = xp.asarray(translations, dtype=np.float64)
    if f.ndim == 1:
        f = f[:, None]
    if t.ndim == 1:
        t = t[:, None]
    phase = (2.0 * np.pi / box) * (t @ f.T)
    return xp.exp(1j * phase).astype(complex_dtype(double))


def precompute_shifted(X: Any, ramps: Any, *, double: bool = False) -> Array:
    """All shifted particle images ``X_i^t = X_i · ramp_t``, shape (N_i·N_t, K), particle-major.

    Row ``i·N_t + t`` is particle ``i`` shifted by ``−t``. Computed once per chunk and image
    size, then reused for every class and orientation block.
    """
    xp = array_module(X, ramps)
    cdt = complex_dtype(double)
    X = xp.asarray(X, dtype=cdt)
    ramps = xp.asarray(ramps, dtype=cdt)
    n_i, k = X.shape
    # into a C-ordered array: a product laid out after its inputs' strides would be copied by reshape
    out = xp.empty((n_i, ramps.shape[0], k), dtype=cdt)
    xp.multiply(X[:, None, :], ramps[None, :, :], out=out)
    return out.reshape(n_i * ramps.shape[0], k)


def offset_prior_diff2(translations: Any, old_offsets: Any, prior_offsets: Any = None, *,
                       angpix: float = 1.0) -> Array:
    """``|t_old + t − prior|² · angpix²`` per particle and translation, (N_i, N_t), float64.

    ``translations`` (N_t, d) and the offsets (N_i, d) in pixels; the prior centre is 0
    when ``prior_offsets`` is None. The Gaussian translation prior is then
    ``log p = −offset_prior_diff2 / (2 σ²_offset)`` (σ in Å, RELION ≥ 3.1), and the same
    array weighted by the posterior gives the σ²_offset sum (:func:`mstep_sums`).
    """
    xp = array_module(translations, old_offsets)
    t = xp.asarray(translations, dtype=np.float64)
    old = xp.asarray(old_offsets, dtype=np.float64)
    prior = xp.zeros_like(old) if prior_offsets is None else xp.asarray(prior_offsets, dtype=np.float64)
    d = old[:, None, :] + t[None, :, :] - prior[:, None, :]
    return (d * d).sum(axis=-1) * angpix * angpix


def gaussian_log_prior_trans(translations: Any, old_offsets: Any, prior_offsets: Any = None, *,
                             sigma_offset: float, angpix: float = 1.0) -> Array:
    """RELION's translation log-prior ``−|t_old + t − prior|² apix² / (2 σ²_offset)``, (N_i, N_t).

    As in RELION, σ²_offset < 0.0001 Å² makes the prior a hard one: 0 at the prior centre,
    ``−inf`` elsewhere.
    """
    xp = array_module(translations, old_offsets)
    d2 = offset_prior_diff2(translations, old_offsets, prior_offsets, angpix=angpix)
    s2 = float(sigma_offset) ** 2
    if s2 < 1e-4:
        return xp.where(d2 > 0, -np.inf, 0.0)
    return -d2 / (2.0 * s2)


# ----------------------------------------------------------------------------------------
# scoring
# ----------------------------------------------------------------------------------------
@dataclass(frozen=True)
class ScoringTerms:
    """The projection-independent factors of ``diff2`` for one chunk at one image size.

    Built by :func:`scoring_terms` once per chunk and reused for every class and
    orientation block.

    Attributes
    ----------
    cross : (N_i·N_t, K) complex, or None
        ``m s CTF inv_sigma2 · X_i^t`` (``ml``) or ``m CTF · X_i^t`` (``cc``). None in terms made by
        :func:`lazy_scoring_terms`, which shift the images only when translations are selected.
    power : (N_i, K) real
        ``m s² CTF² inv_sigma2 / 2`` (``ml``) or ``m CTF²`` (``cc``).
    constant : (N_i,) float64
        ``Σ m |X_i|² inv_sigma2 / 2 + highres_Xi2 / 2`` (``ml``; 0 for ``cc``).
    sqrt_xi2 : (N_i,) real
        ``sqrt(Σ m |X_i|²)`` (``cc`` only; RELION's ``exp_local_sqrtXi2``).
    n_trans : int
    mode : {"ml", "cc"}
    base, ramps : (N_i, K) and (N_t, K) complex, or None
        Lazy terms only: the unshifted ``cross`` of each particle and the phase ramps, whose
        product row by row is ``cross``.
    """

    cross: Array | None
    power: Array
    constant: Array
    n_trans: int
    mode: str = "ml"
    sqrt_xi2: Array | None = None
    base: Array | None = None
    ramps: Array | None = None

    @property
    def n_particles(self) -> int:
        return int(self.power.shape[0])

    @property
    def n_pixels(self) -> int:
        return int(self.power.shape[1])

    @property
    def complex_dtype(self) -> Any:
        return (self.base if self.cross is None else self.cross).dtype

    def select_translations(self, index: Any) -> ScoringTerms:
        """The same terms restricted to the translations ``index`` (in the given order)."""
        xp = array_module(self.power)
        index = xp.asarray(index, dtype=np.int64)
        n_i, k = self.power.shape
        if self.cross is None:  # shift the images by these translations only
            m = int(index.shape[0])
            cross = xp.empty((n_i, m, k), dtype=self.base.dtype)
            xp.multiply(self.base[:, None, :], self.ramps[index][None, :, :], out=cross)
            return replace(self, cross=cross.reshape(n_i * m, k), base=None, ramps=None, n_trans=m)
        cross = self.cross.reshape(n_i, self.n_trans, k)[:, index, :].reshape(n_i * int(index.shape[0]), k)
        return replace(self, cross=xp.ascontiguousarray(cross), n_trans=int(index.shape[0]))

    def select_particles(self, index: Any) -> ScoringTerms:
        """The same terms for the particles ``index`` only (in the given order)."""
        xp = array_module(self.power)
        index = xp.asarray(index, dtype=np.int64)
        n_i, k = self.power.shape
        if self.cross is None:
            return replace(self, base=self.base[index], power=self.power[index], constant=self.constant[index],
                           sqrt_xi2=None if self.sqrt_xi2 is None else self.sqrt_xi2[index])
        cross = self.cross.reshape(n_i, self.n_trans, k)[index].reshape(int(index.shape[0]) * self.n_trans, k)
        return replace(self, cross=xp.ascontiguousarray(cross), power=self.power[index],
                       constant=self.constant[index],
                       sqrt_xi2=None if self.sqrt_xi2 is None else self.sqrt_xi2[index])


def scoring_terms(X_shifted: Any, *, ctf: Any, inv_sigma2: Any, n_trans: int, scale: Any = 1.0,
                  multiplicity: Any = None, highres_Xi2: Any = None, mode: str = "ml",
                  double: bool = False) -> ScoringTerms:
    """Prepare a chunk for scoring (see :class:`ScoringTerms`).

    Parameters
    ----------
    X_shifted : (N_i·N_t, K) complex
        Masked particle FTs shifted by ``−t`` (:func:`precompute_shifted`), particle-major.
        The shifts must be pure phase ramps (``|X_i^t| = |X_i|``), so the constant term is
        taken from each particle's first translation.
    ctf : (N_i, K) real
        CTF per pixel (ones without ``--ctf``).
    inv_sigma2 : (K,) or (N_i, K) real
        ``1/σ²`` per pixel, 0 at ``k = 0`` and outside the window (:func:`inv_sigma2_from_sigma2`).
        Ignored in ``cc`` mode.
    n_trans : int
        Translations per particle ``N_t``.
    scale : float or (N_i,)
        Intensity scale ``s`` of each particle's group (ignored in ``cc`` mode, where it cancels).
    multiplicity : (K,), optional
        ``m_k``; default 1 (RELION's half-plane sum, see the module docstring).
    highres_Xi2 : (N_i,), optional
        RELION's ``exp_highres_Xi2_img`` (``Σ |X|²/σ²`` beyond the window); adds ``highres_Xi2/2``.
    mode : {"ml", "cc"}
        ``"cc"`` for ``--firstiter_cc`` / ``--always_cc``.
    double : bool
        float64 instead of float32.
    """
    if mode not in ("ml", "cc"):
        raise ValueError(f"mode must be 'ml' or 'cc', not {mode!r}")
    xp = array_module(X_shifted, ctf)
    rdt, cdt = real_dtype(double), complex_dtype(double)
    X_shifted = xp.asarray(X_shifted, dtype=cdt)
    n_rows, k = X_shifted.shape
    if n_rows % n_trans:
        raise ValueError(f"X_shifted has {n_rows} rows, not a multiple of n_trans={n_trans}")
    n_i = n_rows // n_trans
    ctf = _per_pixel(ctf, n_i, k, xp, rdt, "ctf")
    m = _multiplicity(multiplicity, k, xp, rdt)
    X3 = X_shifted.reshape(n_i, n_trans, k)
    X0 = X3[:, 0, :]

    if mode == "cc":
        w = m * ctf
        cross = (X3 * w[:, None, :]).reshape(n_rows, k)
        power = xp.ascontiguousarray(xp.broadcast_to(m * ctf * ctf, (n_i, k)), dtype=rdt)
        xi2 = (m.astype(np.float64) * _abs2(X0.astype(np.complex128))).sum(axis=1)
        return ScoringTerms(cross=xp.ascontiguousarray(cross), power=power,
                            constant=xp.zeros(n_i, dtype=np.float64), n_trans=n_trans, mode="cc",
                            sqrt_xi2=xp.sqrt(xi2).astype(rdt))

    s = _per_particle(scale, n_i, xp, rdt)
    isg = _per_pixel(inv_sigma2, n_i, k, xp, rdt, "inv_sigma2")
    w = m * s * ctf * isg
    cross = (X3 * w[:, None, :]).reshape(n_rows, k)
    power = xp.ascontiguousarray(xp.broadcast_to(0.5 * m * s * s * ctf * ctf * isg, (n_i, k)), dtype=rdt)
    # The constant in float64: it is large and only its sum matters.
    const = 0.5 * (m.astype(np.float64) * isg.astype(np.float64) * _abs2(X0.astype(np.complex128))).sum(axis=1)
    if highres_Xi2 is not None:
        const = const + 0.5 * xp.asarray(highres_Xi2, dtype=np.float64)
    return ScoringTerms(cross=xp.ascontiguousarray(cross), power=power, constant=const,
                        n_trans=n_trans, mode="ml")


def lazy_scoring_terms(X: Any, ramps: Any, **kwargs: Any) -> ScoringTerms:
    """:func:`scoring_terms` of ``X`` (N_i, K) shifted by each row of ``ramps`` (N_t, K), kept unshifted.

    The shifted images are made by :meth:`ScoringTerms.select_translations`, for the translations
    selected only: the fine pass needs the children of the significant coarse translations, a
    small part of all ``N_t`` once posteriors sharpen. ``kwargs`` are those of :func:`scoring_terms`
    (``n_trans`` excepted). Since the ramps are pure phases, ``X_i·w_i·ramp_t`` equals the
    ``w_i``-weighted shifted image of :func:`scoring_terms`.
    """
    terms = scoring_terms(X, n_trans=1, **kwargs)
    xp = array_module(terms.cross)
    return replace(terms, cross=None, base=terms.cross, n_trans=int(ramps.shape[0]),
                   ramps=xp.asarray(ramps, dtype=terms.cross.dtype))


#: fewest GEMM rows (particles × translations) per block: with fewer, BLAS falls below its best rate
_MIN_GEMM_ROWS = 256


def _gemm_blocks(n_i: int, n_t: int, n_r: int, itemsize: int, block_bytes: int) -> tuple[int, int]:
    """(particles, orientations) per GEMM of :func:`score_terms`, its output within ``block_bytes``.

    All orientations in one GEMM when a block of particles with at least ``_MIN_GEMM_ROWS`` rows
    fits: the widest output, whose transposed copy into ``diff2`` follows while it is in cache (25%
    faster than blocks of orientations over all particles, which stream the images once a block).
    Otherwise the fewest particles giving ``_MIN_GEMM_ROWS`` rows and orientation blocks of at
    least 64.
    """
    n_i, n_t, n_r = max(1, n_i), max(1, n_t), max(1, n_r)
    few = min(n_i, -(-_MIN_GEMM_ROWS // n_t))
    particles = block_bytes // (n_t * n_r * itemsize)
    if particles >= few:
        return min(n_i, particles), n_r
    return few, int(min(n_r, max(64, block_bytes // (few * n_t * itemsize))))


def score_terms(terms: ScoringTerms, P: Any, *, include_constant: bool = True, out: Any = None,
                block_bytes: int = DEFAULT_BLOCK_BYTES) -> Array:
    """``diff2`` (N_i, N_r, N_t) of prepared terms against projections ``P`` (N_r, K).

    ``ml`` mode: RELION's squared difference; ``cc`` mode: ``−Re⟨A,X⟩/(‖A‖‖X‖)``.
    The GEMMs run over blocks of particles and orientations (:func:`_gemm_blocks`) whose output
    stays within ``block_bytes``. ``out`` (any (N_i, N_r, N_t) real view, e.g. a slice of a stack
    of classes) receives the result.
    """
    if terms.cross is None:
        terms = terms.select_translations(np.arange(terms.n_trans))
    xp = array_module(terms.cross, P)
    cdt = terms.cross.dtype
    rdt = terms.power.dtype
    P = xp.ascontiguousarray(xp.asarray(P, dtype=cdt))
    n_r, k = P.shape
    if k != terms.n_pixels:
        raise ValueError(f"projections have {k} pixels, the images {terms.n_pixels}")
    n_i, n_t = terms.n_particles, terms.n_trans
    if out is None:
        out = xp.empty((n_i, n_r, n_t), dtype=rdt)
    elif tuple(out.shape) != (n_i, n_r, n_t):
        raise ValueError(f"out has shape {tuple(out.shape)}, expected {(n_i, n_r, n_t)}")
    G = _real_view(terms.cross)  # (N_i·N_t, 2K)
    bi, br = _gemm_blocks(n_i, n_t, n_r, rdt.itemsize, block_bytes)
    const = terms.constant.astype(rdt) if terms.mode == "ml" and include_constant else None
    for r0 in range(0, n_r, br):
        r1 = min(n_r, r0 + br)
        Pb = P[r0:r1]
        PbT = _real_view(Pb).T
        a2 = terms.power @ _abs2(Pb).T  # (N_i, nb)
        for i0 in range(0, n_i, bi):
            i1 = min(n_i, i0 + bi)
            cross = (G[i0 * n_t:i1 * n_t] @ PbT).reshape(i1 - i0, n_t, r1 - r0).transpose(0, 2, 1)
            dest = out[i0:i1, r0:r1, :]
            if terms.mode == "ml":
                xp.subtract(a2[i0:i1, :, None], cross, out=dest)  # one pass, no block-sized temporary
                if const is not None:
                    dest += const[i0:i1, None, None]
            else:
                denom = xp.sqrt(xp.maximum(a2[i0:i1], 0)) * terms.sqrt_xi2[i0:i1, None]
                denom = xp.where(denom > 0, denom, xp.inf)  # an all-zero reference correlates with nothing
                xp.divide(cross, denom[:, :, None], out=dest)
                xp.negative(dest, out=dest)
    return out


def squared_differences(X_shifted: Any, P: Any, *, ctf: Any = None, inv_sigma2: Any = None,
                        n_trans: int | None = None, scale: Any = 1.0, multiplicity: Any = None,
                        highres_Xi2: Any = None, include_constant: bool = True, double: bool = False,
                        out: Any = None, block_bytes: int = DEFAULT_BLOCK_BYTES) -> Array:
    """RELION's ``diff2`` for every (particle, orientation, translation), shape (N_i, N_r, N_t).

    ``diff2(i,r,t) = Σ_k m_k |s_i CTF_i(k) P_r(k) − X_i^t(k)|² inv_sigma2_i(k) / 2 + highres_Xi2_i / 2``,
    computed as two GEMMs (see the module docstring). ``X_shifted`` may also be a
    :class:`ScoringTerms` (then the image arguments are not needed). With
    ``include_constant=False`` the per-particle constant (``ScoringTerms.constant``) is
    left out, which keeps float32 results exact enough for the weights.
    """
    if isinstance(X_shifted, ScoringTerms):
        terms = X_shifted
    else:
        if ctf is None or inv_sigma2 is None or n_trans is None:
            raise TypeError("squared_differences needs ctf, inv_sigma2 and n_trans with raw images")
        terms = scoring_terms(X_shifted, ctf=ctf, inv_sigma2=inv_sigma2, n_trans=n_trans, scale=scale,
                              multiplicity=multiplicity, highres_Xi2=highres_Xi2, double=double)
    if terms.mode != "ml":
        raise ValueError("these terms were prepared for cross-correlation; use cross_correlation")
    return score_terms(terms, P, include_constant=include_constant, out=out, block_bytes=block_bytes)


def cross_correlation(X_shifted: Any, P: Any, *, ctf: Any = None, n_trans: int | None = None,
                      multiplicity: Any = None, double: bool = False, out: Any = None,
                      block_bytes: int = DEFAULT_BLOCK_BYTES) -> Array:
    """``--firstiter_cc`` scores: ``diff2 = −Re⟨CTF·P, X^t⟩ / (‖CTF·P‖ ‖X‖)``, shape (N_i, N_r, N_t).

    Sums run over the K given pixels weighted by ``m_k``, without σ² (RELION's
    ``do_firstiter_cc`` branch of ``getAllSquaredDifferences``; the scale cancels).
    ``‖X‖`` is taken over the same K pixels; RELION's ``exp_local_sqrtXi2`` may cover the whole
    windowed square, but it is a per-particle constant, so only the reported value (and
    ``rlnLogLikeliContribution``) could differ, never the assignment.
    ``X_shifted`` may be :class:`ScoringTerms` prepared with ``mode="cc"``.
    """
    if isinstance(X_shifted, ScoringTerms):
        terms = X_shifted
    else:
        if ctf is None or n_trans is None:
            raise TypeError("cross_correlation needs ctf and n_trans with raw images")
        terms = scoring_terms(X_shifted, ctf=ctf, inv_sigma2=1.0, n_trans=n_trans,
                              multiplicity=multiplicity, mode="cc", double=double)
    if terms.mode != "cc":
        raise ValueError("these terms were prepared for maximum likelihood; use squared_differences")
    return score_terms(terms, P, out=out, block_bytes=block_bytes)


# ----------------------------------------------------------------------------------------
# weights and significance
# ----------------------------------------------------------------------------------------
def significant_coarse(weights: Any, adaptive_fraction: float = 0.999, maxsig: int = -1,
                       ) -> tuple[Array, Array, Array]:
    """RELION's significance rule, per particle (first axis).

    Walk the positive weights from the largest down, taking each one, until the running
    sum exceeds ``adaptive_fraction`` × the total; with ``maxsig > 0`` the threshold stops
    moving after ``maxsig`` samples. Every sample with weight ≥ the last one taken is
    significant.

    Returns
    -------
    mask : bool, shape of ``weights``
    n_significant : (N_i,) int
        The number of samples taken (RELION's ``rlnNrOfSignificantSamples``; ties with the
        threshold can make ``mask`` hold a few more).
    threshold : (N_i,) the significant weight (0 where a particle has no positive weight).

    Notes
    -----
    Only a prefix of each particle's descending order is sorted: a weight below
    ``(1 − fraction)·total / M`` (``M`` samples) can never be taken, because all such
    weights together hold less than the ``1 − fraction`` that is left out. The prefix is
    made with ``partition`` and sorted, so the cost is O(M) plus a sort of the candidates.
    """
    xp = array_module(weights)
    n = int(weights.shape[0])
    w = weights.reshape(n, -1)
    M = int(w.shape[1])
    frac = float(adaptive_fraction)
    total = w.sum(axis=1, dtype=np.float64)
    if xp is np and w.dtype == np.float32:  # compiled: one histogram pass per particle, no sort of the rows
        from cryodask.em.kernels import significance_threshold

        n_taken, threshold = significance_threshold(w, total, frac, maxsig)
        return _significance_mask(xp, weights, total, n_taken, threshold)
    cut = (0.5 * max(0.0, 1.0 - frac) / M) * total  # 0.5: margin against rounding
    cand = w >= cut[:, None].astype(w.dtype)
    ncand = cand.sum(axis=1)
    c = max(1, int(ncand.max()) if n else 1)
    if maxsig > 0:
        c = min(c, int(maxsig))
    c = min(c, M)

    def _top_sorted(width: int, rows: Any) -> Any:
        """The `width` largest weights of the given rows, descending (zero-padded where a row has fewer candidates)."""
        ww = w if rows is None else w[rows]
        if width >= M:
            return xp.sort(ww, axis=1)[:, ::-1]
        n_cand = int(ncand.sum()) if rows is None else -1
        if rows is None and n_cand * 8 < n * M:
            # Few candidates (peaked posteriors): gather them and sort by (row, −weight); a
            # partition of every row would cost more than the whole rest of this function.
            flat_idx = xp.flatnonzero(cand)
            vals = w.reshape(-1)[flat_idx]
            r_idx = flat_idx // M
            order = xp.lexsort(xp.stack([-vals, r_idx.astype(vals.dtype)]))
            vals, r_idx = vals[order], r_idx[order]
            starts = xp.cumsum(ncand) - ncand
            pos = xp.arange(vals.shape[0]) - starts[r_idx]
            keep = pos < width
            top = xp.zeros((n, width), dtype=w.dtype)
            top[r_idx[keep], pos[keep]] = vals[keep]
            return top
        return xp.sort(xp.partition(ww, M - width, axis=1)[:, M - width:], axis=1)[:, ::-1]

    def _walk(top: Any, rows: Any) -> tuple[Any, Any, Any]:
        """RELION's descending walk over `top`: samples taken, threshold, whether the walk stopped."""
        tot = total if rows is None else total[rows]
        csum = xp.cumsum(top.astype(np.float64), axis=1)
        exceed = csum > frac * tot[:, None]
        has = exceed.any(axis=1)
        n_taken = xp.where(has, xp.argmax(exceed, axis=1) + 1, top.shape[1])
        if not bool(has.all()):  # the walk ran through: it ends at the smallest positive weight
            npos = (top > 0).sum(axis=1)
            n_taken = xp.where(has, n_taken, xp.maximum(npos, 1))
        if maxsig > 0:
            n_taken = xp.minimum(n_taken, int(maxsig))
        thr = top[xp.arange(top.shape[0]), n_taken - 1].astype(np.float64)
        return n_taken, thr, has

    n_taken, threshold, has = _walk(_top_sorted(c, None), None)
    capped = maxsig > 0 and c >= maxsig
    if c < M and not capped and not bool(has.all()):
        # The walk did not stop inside the prefix (only by rounding, or fraction ≥ 1): redo those rows in full.
        ridx = xp.nonzero(~has)[0]
        nt_full, thr_full, _ = _walk(_top_sorted(M, ridx), ridx)
        n_taken[ridx] = nt_full
        threshold[ridx] = thr_full
    return _significance_mask(xp, weights, total, n_taken, threshold)


def _significance_mask(xp: Any, weights: Any, total: Any, n_taken: Any, threshold: Any) -> tuple[Array, Array, Array]:
    n = int(weights.shape[0])
    empty = ~(total > 0)
    threshold = xp.where(empty, 0.0, threshold)
    # thr > 0 for every row with a positive weight, so ">= thr" also drops the zeros; +inf empties a row
    thr = xp.where(empty, xp.inf, threshold).astype(weights.dtype).reshape((n,) + (1,) * (weights.ndim - 1))
    mask = weights >= thr
    n_sig = xp.where(empty, 0, n_taken).astype(np.int64)
    return mask, n_sig, threshold


@dataclass
class Posterior:
    """Normalised posterior over one chunk's sampled poses (from :func:`posterior_weights`).

    Attributes
    ----------
    weights : (N_i, N_r, N_t)
        Normalised (each particle sums to 1 over everything scored).
    significant : (N_i, N_r, N_t) bool
        RELION's significant samples; the M-step uses ``weights`` only where this is True.
    significant_weight : (N_i,) the weight threshold.
    n_significant : (N_i,) int
    pmax : (N_i,) largest normalised weight (``rlnMaxValueProbDistribution``).
    best_orientation, best_translation : (N_i,) int, the pose of ``pmax``.
    min_diff2 : (N_i,) float64, including ``diff2_offset``.
    log_sum_weight : (N_i,) float64, ``log Σ_φ π(φ) exp(−(diff2 − min diff2))``.
    log_likelihood : (N_i,) float64, ``log_sum_weight − min_diff2 − logsigma2``
        (``rlnLogLikeliContribution``; ``−min_diff2`` in ``cc`` mode).
    failed : (N_i,) bool, particles with no finite, positive weight (RELION's
        "zero sum of weights"); their weights are 0. The caller decides (RELION stops; its
        GPU fail-safe mode tolerates a few).
    """

    weights: Array
    significant: Array
    significant_weight: Array
    n_significant: Array
    pmax: Array
    best_orientation: Array
    best_translation: Array
    min_diff2: Array
    log_sum_weight: Array
    log_likelihood: Array
    failed: Array


class _PerClassPrior:
    """A per-class translation prior (N_i, C, N_t) over orientations grouped by class: added block by
    block (runs of equal ``orient_class``) instead of being expanded to the size of ``diff2``."""

    def __init__(self, xp: Any, lpt: Any, orient_class: Any) -> None:
        from cryodask.backend import to_numpy

        oc = np.asarray(to_numpy(orient_class), np.int64)
        starts = np.flatnonzero(np.r_[True, oc[1:] != oc[:-1]]) if oc.size else np.zeros(0, np.int64)
        stops = np.r_[starts[1:], oc.size].astype(np.int64)
        self.xp, self.lpt, self.orient_class = xp, lpt, orient_class
        self.runs = [(int(oc[a]), int(a), int(b)) for a, b in zip(starts, stops, strict=True)]
        self.used = self.lpt[:, np.unique(oc), :] if oc.size else self.lpt[:, :0, :]

    def finite(self) -> Any:
        """Where the prior is finite, shape (N_i, N_r, N_t) (the slow path only)."""
        return self.xp.isfinite(self.lpt[:, self.xp.asarray(self.orient_class), :])

    def add_to(self, lw: Any) -> None:
        for c, a, b in self.runs:
            lw[:, a:b, :] += self.lpt[:, c, None, :]


def _all_finite(xp: Any, q: Any) -> bool:
    return bool(xp.isfinite(q.used if isinstance(q, _PerClassPrior) else q).all())


def _log_prior_parts(xp: Any, shape: tuple[int, int, int], log_prior_orient: Any, log_prior_trans: Any,
                     orient_class: Any, dtype: Any) -> list[Array]:
    """The log priors as arrays broadcastable to (N_i, N_r, N_t), kept small where possible."""
    n_i, n_r, n_t = shape
    parts = []
    if log_prior_orient is not None:
        lpo = xp.asarray(log_prior_orient, dtype=dtype)
        if lpo.shape == (n_r,):
            parts.append(lpo[None, :, None])
        elif lpo.shape == (n_i, n_r):
            parts.append(lpo[:, :, None])
        else:
            raise ValueError(f"log_prior_orient: expected ({n_r},) or ({n_i}, {n_r}), got {tuple(lpo.shape)}")
    if log_prior_trans is not None:
        lpt = xp.asarray(log_prior_trans, dtype=dtype)
        if lpt.shape == (n_t,):
            parts.append(lpt[None, None, :])
        elif lpt.shape == (n_i, n_t):
            parts.append(lpt[:, None, :])
        elif lpt.ndim == 3 and lpt.shape[0] == n_i and lpt.shape[2] == n_t:
            if orient_class is None:
                raise ValueError("a per-class log_prior_trans (N_i, C, N_t) needs orient_class")
            parts.append(_PerClassPrior(xp, lpt, orient_class))
        else:
            raise ValueError(f"log_prior_trans: expected ({n_t},), ({n_i}, {n_t}) or ({n_i}, C, {n_t}), "
                             f"got {tuple(lpt.shape)}")
    return parts


def posterior_weights(diff2: Any, *, log_prior_orient: Any = None, log_prior_trans: Any = None,
                      orient_class: Any = None, adaptive_fraction: float = 0.999, maxsig: int = -1,
                      mode: str = "ml", diff2_offset: Any = None, logsigma2: Any = None,
                      overwrite_diff2: bool = False) -> Posterior:
    """RELION's ``convertAllSquaredDifferencesToWeights`` for one chunk.

    ``w = π(r) · p(t) · exp(−(diff2 − min diff2))`` (0 where the exponent exceeds 700),
    normalised per particle, then the significance rule (:func:`significant_coarse`).
    Normalisation is over everything in ``diff2``: stack all classes along the
    orientation axis (the class prior goes into ``log_prior_orient``).

    Parameters
    ----------
    diff2 : (N_i, N_r, N_t)
        ``+inf`` marks samples that were not evaluated (e.g. non-significant in a fine pass).
    log_prior_orient : (N_r,) or (N_i, N_r), optional
        ``log π``; ``−inf`` for orientations outside a local search.
    log_prior_trans : (N_t,), (N_i, N_t) or (N_i, C, N_t), optional
        ``log p(t)`` (:func:`gaussian_log_prior_trans`); the 3-D form (2D classification,
        per-class prior centres) needs ``orient_class`` (N_r,) mapping orientation → class.
    adaptive_fraction, maxsig
        ``--adaptive_fraction``, ``--maxsig``.
    mode : {"ml", "cc"}
        ``"cc"``: hard assignment to the smallest diff2 (weight 1), priors ignored, as
        RELION does with ``--firstiter_cc``.
    diff2_offset : (N_i,), optional
        Constant left out of ``diff2`` (``ScoringTerms.constant``), added to ``min_diff2``.
    logsigma2 : (N_i,) or scalar, optional
        :func:`log_sigma2_term`, subtracted in the log-likelihood.
    overwrite_diff2 : bool
        ``diff2`` is not needed afterwards: a float32 NumPy ``diff2`` holds the weights on return
        (``Posterior.weights`` is a view of it), which saves an array of its size.

    Notes
    -----
    ``min diff2`` is taken over samples with a finite diff2 and a non-zero prior (RELION
    only scores orientations with a non-zero prior). Before ``exp`` the log-weights are
    shifted by their per-particle maximum, so the largest weight is 1 and no prior can
    make them overflow or all underflow; the shift is undone in ``log_sum_weight``.
    """
    xp = array_module(diff2)
    if diff2.ndim != 3:
        raise ValueError(f"diff2 must be (N_i, N_r, N_t), got shape {tuple(diff2.shape)}")
    n_i, n_r, n_t = (int(s) for s in diff2.shape)
    dt = diff2.dtype
    parts = _log_prior_parts(xp, (n_i, n_r, n_t), log_prior_orient, log_prior_trans, orient_class, dt)
    if xp is np and dt == np.float32 and mode == "ml":
        return _posterior_compiled(diff2, log_prior_orient, log_prior_trans, orient_class, adaptive_fraction,
                                   maxsig, diff2_offset, logsigma2, overwrite_diff2)
    flat2 = diff2.reshape(n_i, -1)
    lo, hi = flat2.min(axis=1), flat2.max(axis=1)
    # Fast path (no masks): every diff2 finite and every prior non-zero. min/max propagate NaN.
    fast = bool(xp.isfinite(lo).all() and xp.isfinite(hi).all()) and all(_all_finite(xp, q) for q in parts)
    if fast:
        valid, d, min_rel = None, diff2, lo
    else:
        valid = xp.isfinite(diff2)
        for q in parts:
            if not _all_finite(xp, q):
                valid &= q.finite() if isinstance(q, _PerClassPrior) else xp.isfinite(q)
        if xp is np and mode == "ml":  # no masked copy of diff2: the invalid samples get -inf log-weights below
            d = diff2
            min_rel = np.min(flat2, axis=1, where=valid.reshape(n_i, -1), initial=np.inf)
        else:
            d = xp.where(valid, diff2, xp.inf)
            min_rel = d.reshape(n_i, -1).min(axis=1)
    failed = ~xp.isfinite(min_rel)
    offset = xp.zeros(n_i, dtype=np.float64) if diff2_offset is None else xp.asarray(diff2_offset, dtype=np.float64)
    min_diff2 = min_rel.astype(np.float64) + offset
    safe_min = xp.where(failed, 0, min_rel).astype(dt)[:, None, None]

    if mode == "cc":
        flat = d.reshape(n_i, -1)
        best = xp.argmin(flat, axis=1)
        w = xp.zeros((n_i, n_r * n_t), dtype=dt)
        w[xp.arange(n_i), best] = 1
        w[failed] = 0
        w = w.reshape(n_i, n_r, n_t)
        sig = w > 0
        ones = xp.where(failed, 0.0, 1.0)
        return Posterior(weights=w, significant=sig, significant_weight=ones,
                         n_significant=(~failed).astype(np.int64), pmax=ones,
                         best_orientation=best // n_t, best_translation=best % n_t,
                         min_diff2=min_diff2, log_sum_weight=xp.zeros(n_i, dtype=np.float64),
                         log_likelihood=-min_diff2, failed=failed)
    if mode != "ml":
        raise ValueError(f"mode must be 'ml' or 'cc', not {mode!r}")

    # lw = log prior − (diff2 − min diff2), built in one diff2-sized array (they dominate a chunk's memory).
    lw = xp.empty(diff2.shape, dtype=dt)
    dense = [q for q in parts if not isinstance(q, _PerClassPrior)]
    xp.subtract((dense[0] + safe_min) if dense else safe_min, d, out=lw)
    for q in dense[1:]:
        lw += q
    for q in parts:
        if isinstance(q, _PerClassPrior):
            q.add_to(lw)
    # RELION's cut: weight 0 where diff2 − min > 700. In float32 exp underflows long before that,
    # unless the priors span hundreds of log units, so the (two-pass) mask is skipped then.
    span = 0.0
    for q in parts:
        q = q.used if isinstance(q, _PerClassPrior) else q
        qf = q[xp.isfinite(q)]
        if qf.size:
            span += float(qf.max() - qf.min())
    if dt == np.float64 or span > 500:
        lw[d > safe_min + MAX_EXPONENT] = -xp.inf
    if valid is not None:
        lw[~valid] = -xp.inf
    top = lw.reshape(n_i, -1).max(axis=1)
    failed |= ~xp.isfinite(top)
    top = xp.where(failed, 0, top)
    lw -= top.astype(dt)[:, None, None]
    w = xp.exp(lw, out=lw)
    s = w.reshape(n_i, -1).sum(axis=1, dtype=np.float64)
    failed |= ~(s > 0)
    s = xp.where(failed, 1.0, s)
    return _normalised_posterior(xp, w, s, top.astype(np.float64), failed, min_diff2, adaptive_fraction, maxsig,
                                 logsigma2)


def _log_likelihood(xp: Any, top: Any, s: Any, failed: Any, min_diff2: Any, logsigma2: Any) -> tuple[Any, Any]:
    """``(log_sum_weight, log_likelihood)`` from the largest log-weight ``top`` and ``s = Σ exp(lw − top)``
    (both 0 for a failed particle)."""
    log_sum = xp.where(failed, 0.0, top) + xp.log(xp.where(failed, 1.0, s))
    ll = log_sum - min_diff2
    if logsigma2 is not None:
        ll = ll - xp.asarray(logsigma2, dtype=np.float64)
    return log_sum, ll


def _normalised_posterior(xp: Any, w: Any, s: Any, top: Any, failed: Any, min_diff2: Any, adaptive_fraction: float,
                          maxsig: int, logsigma2: Any) -> Posterior:
    """Divide the weights ``w = exp(lw − top)`` by their sums ``s`` (1 where ``failed``), then the
    log-likelihood, the significance rule and each particle's best sample."""
    n_i, n_t = int(w.shape[0]), int(w.shape[2])
    w *= (1.0 / s).astype(w.dtype)[:, None, None]
    w[failed] = 0
    log_sum, ll = _log_likelihood(xp, top, s, failed, min_diff2, logsigma2)
    sig, n_sig, thr = significant_coarse(w, adaptive_fraction, maxsig)
    flat = w.reshape(n_i, -1)
    best = xp.argmax(flat, axis=1)
    pmax = flat[xp.arange(n_i), best].astype(np.float64)
    return Posterior(weights=w, significant=sig, significant_weight=thr, n_significant=n_sig, pmax=pmax,
                     best_orientation=best // n_t, best_translation=best % n_t, min_diff2=min_diff2,
                     log_sum_weight=log_sum, log_likelihood=ll, failed=failed)


def _posterior_compiled(diff2: np.ndarray, log_prior_orient: Any, log_prior_trans: Any, orient_class: Any,
                        adaptive_fraction: float, maxsig: int, diff2_offset: Any, logsigma2: Any,
                        overwrite_diff2: bool = False) -> Posterior:
    """:func:`posterior_weights` for float32 NumPy arrays (mode "ml"): one compiled visit per particle
    (:func:`cryodask.em.kernels.posterior_rows`), the priors kept in their compact forms."""
    from cryodask.em.kernels import posterior_rows

    n_i, n_r, n_t = diff2.shape
    lpo = np.zeros((1, n_r)) if log_prior_orient is None else np.asarray(log_prior_orient, np.float64)
    lpo = lpo.reshape(-1, n_r)
    cls = np.zeros(n_r, np.int64)
    if log_prior_trans is None:
        lpt = np.zeros((1, 1, n_t))
    else:
        lpt = np.asarray(log_prior_trans, np.float64)
        if lpt.ndim == 3:
            cls = np.asarray(orient_class, np.int64)
        else:
            lpt = lpt.reshape(-1, 1, n_t)
    q = posterior_rows(diff2, lpo, lpt, cls, MAX_EXPONENT, adaptive_fraction, maxsig, overwrite_diff2)
    s = q["total"]
    failed = ~(s > 0)
    offset = np.zeros(n_i) if diff2_offset is None else np.asarray(diff2_offset, np.float64)
    min_diff2 = q["min_rel"] + offset
    log_sum, ll = _log_likelihood(np, q["top"], s, failed, min_diff2, logsigma2)
    best = q["best"]
    pmax = q["weights"].reshape(n_i, -1)[np.arange(n_i), best].astype(np.float64)
    return Posterior(weights=q["weights"], significant=q["significant"], significant_weight=q["threshold"],
                     n_significant=q["n_taken"], pmax=pmax, best_orientation=best // n_t,
                     best_translation=best % n_t, min_diff2=min_diff2, log_sum_weight=log_sum, log_likelihood=ll,
                     failed=failed)


# ----------------------------------------------------------------------------------------
# M-step sums
# ----------------------------------------------------------------------------------------
@dataclass
class MStepSums:
    """One chunk's (and one class's) contribution to the M-step.

    Attributes
    ----------
    orientations : (n,) int
        Orientations (indices into the ``P`` given) that received weight; ``data`` and
        ``weight`` have one row per entry, to be inserted as slices.
    data : (n, K) complex, ``Σ_{i,t} w · s·CTF·X^t·inv_sigma2`` (unmasked images).
    weight : (n, K) real, ``Σ_{i,t} w · s²·CTF²·inv_sigma2``.
    sigma2_noise : (n_groups, K), ``Σ w |X^t − s·CTF·P|²`` (masked images), per pixel, to be
        binned by resolution shell.
    signal_product : (n_groups, K), ``Σ w Re(X^t · conj A)`` with ``A = s·CTF·P`` (scale correction "XA").
    reference_power : (n_groups, K), ``Σ w |A|²`` ("AA").
    wdiff2 : (N_i,), ``Σ_k Σ_{r,t} w |X^t − A|²`` per particle (norm correction, before adding
        the high-resolution power).
    sum_weight : (N_i,), ``Σ_{r,t} w`` per particle (this class's share).
    orientation_weight : (N_r,), ``Σ_{i,t} w`` (direction prior sums after mapping r → direction).
    translation_weight : (N_i, N_t), ``Σ_r w`` (per-class prior offsets in 2D).
    group_weight : (n_groups,), ``Σ w`` per group (``sumw_group``).
    class_weight : float, ``Σ w``.
    sigma2_offset : float, ``Σ w · offset_diff2`` (0 when ``offset_diff2`` is not given).
    class_translation_weight : (N_i, C, N_t) or None, ``Σ_r w`` over each class's orientations
        (only with ``orient_class``).
    """

    orientations: Array
    data: Array
    weight: Array
    sigma2_noise: Array
    signal_product: Array
    reference_power: Array
    wdiff2: Array
    sum_weight: Array
    orientation_weight: Array
    translation_weight: Array
    group_weight: Array
    class_weight: float
    sigma2_offset: float = 0.0
    class_translation_weight: Array | None = None


def _segment_sum(values: Array, pid: Array, n: int) -> Array:
    """Sum the rows of ``values`` per particle: ``out[p] = Σ_{j: pid[j] = p} values[j]`` (``pid`` non-decreasing)."""
    xp = array_module(values)
    out = xp.zeros((n,) + tuple(values.shape[1:]), dtype=values.dtype)
    if values.shape[0] == 0:
        return out
    if xp is np:
        starts = np.flatnonzero(np.r_[True, pid[1:] != pid[:-1]])
        out[pid[starts]] = np.add.reduceat(values, starts, axis=0)
    else:
        import cupyx

        cupyx.scatter_add(out, pid, values)
    return out


def mstep_sums(weights: Any, X_shifted: Any, P: Any, *, ctf: Any, inv_sigma2: Any, n_trans: int,
               scale: Any = 1.0, X_shifted_masked: Any = None, significant: Any = None,
               group: Any = None, n_groups: int = 1, scale_group: Any = None, n_scale_groups: int | None = None,
               offset_diff2: Any = None, orient_class: Any = None, n_classes: int = 1,
               double: bool = False) -> MStepSums:
    """Weighted sums of one chunk for one class, or several (RELION's ``storeWeightedSums``), as GEMMs.

    Parameters
    ----------
    weights : (N_i, N_r, N_t)
        Normalised posterior (:attr:`Posterior.weights`, this class's orientation range).
    X_shifted : (N_i·N_t, K) complex
        **Unmasked** shifted images (what RELION backprojects).
    P : (N_r, K) complex
        The projections the weights refer to.
    ctf : (N_i, K); inv_sigma2 : (K,) or (N_i, K)
        ``inv_sigma2`` as the M-step wants it: RELION puts ``1/σ²(0)`` back at the origin
        here, and uses 1 everywhere without ``do_map``.
    scale : float or (N_i,)
    X_shifted_masked : (N_i·N_t, K), optional
        Masked shifted images for the noise and scale sums (default: ``X_shifted``).
    significant : (N_i, N_r, N_t) bool, optional
        Only these samples are accumulated (RELION: ``w ≥ significant_weight``).
    group, n_groups
        Group index (N_i,) of each particle for the per-group noise sums (all 0 by default).
    scale_group, n_scale_groups
        Group index (N_i,) for the scale sums (``signal_product``, ``reference_power``; RELION's
        ``rlnGroupNumber``); by default ``group``.
    offset_diff2 : (N_i, N_t) or (N_i, C, N_t), optional
        :func:`offset_prior_diff2` (Å²), for the σ²_offset sum; per class with ``orient_class``.
    orient_class, n_classes
        Class (N_r,) of each orientation when ``P`` stacks several classes: the sums over pixels,
        groups and particles add over classes, ``data`` and ``weight`` rows belong to one class
        each, and :attr:`MStepSums.class_translation_weight` keeps the translation sums per class.
        Two GEMMs over all classes instead of two per class: faster when most particles have
        weight in most classes (early iterations), slower when each has weight in few.

    Notes
    -----
    Only orientations and (particle, translation) pairs with non-zero weight enter the
    two large GEMMs (data: ``(n × N_i·N_t)·(N_i·N_t × K)``; expected projections
    ``Q = Σ_r w P_r``: ``(N_i·N_t × n)·(n × K)``), so their cost follows the significant
    samples, not the full grid. No multiplicity enters: the sums are per stored pixel.
    """
    xp = array_module(weights, X_shifted, P)
    rdt, cdt = real_dtype(double), complex_dtype(double)
    w = xp.asarray(weights, dtype=rdt)
    if significant is not None and xp is not np:  # NumPy: the compiled kernels read the mask in place
        w = xp.where(xp.asarray(significant), w, 0)
        significant = None
    n_i, n_r, n_t = (int(s) for s in w.shape)
    if n_t != n_trans:
        raise ValueError(f"weights have {n_t} translations, n_trans is {n_trans}")
    X = xp.asarray(X_shifted, dtype=cdt)
    Xm = X if X_shifted_masked is None else xp.asarray(X_shifted_masked, dtype=cdt)
    P = xp.ascontiguousarray(xp.asarray(P, dtype=cdt))
    k = int(X.shape[1])
    ctf = _per_pixel(ctf, n_i, k, xp, rdt, "ctf")
    isg = _per_pixel(inv_sigma2, n_i, k, xp, rdt, "inv_sigma2")
    s = _per_particle(scale, n_i, xp, rdt)

    if xp is np:  # one compiled pass over the weights
        from cryodask.em.kernels import significant_marginals

        trans_wc, orient_w, w_ir_all = significant_marginals(w, significant, orient_class, n_classes)
    else:
        if orient_class is None:
            trans_wc = w.sum(axis=1)  # (N_i, N_t)
        else:
            oc = xp.asarray(orient_class)
            trans_wc = xp.stack([w[:, oc == c, :].sum(axis=1) for c in range(n_classes)], axis=1)
        orient_w = w.sum(axis=(0, 2), dtype=np.float64)
    trans_w = trans_wc if orient_class is None else trans_wc.sum(axis=1)
    sum_weight = trans_w.sum(axis=1, dtype=np.float64)
    act = xp.nonzero(orient_w > 0)[0]
    cols = xp.nonzero(trans_w.reshape(-1) > 0)[0]  # sorted, so particle ids below are non-decreasing
    pid = cols // n_t
    n_act = int(act.shape[0])

    Pa = xp.ascontiguousarray(P[act])
    f = xp.broadcast_to(s * ctf * isg, (n_i, k))
    if xp is np:  # compiled gathers: no transposed or gathered copies of the weights and images
        from cryodask.em.kernels import scaled_rows, weight_matrix

        Wmat = weight_matrix(w, act, cols, significant)  # (n, n_cols)
        W_ir = w_ir_all[:, act]  # (N_i, n)
        Y = scaled_rows(X, cols, pid, f)
    else:
        Wa = w[:, act, :]  # (N_i, n, N_t)
        Wmat = xp.ascontiguousarray(Wa.transpose(1, 0, 2).reshape(n_act, n_i * n_t)[:, cols])
        W_ir = Wa.sum(axis=2)  # (N_i, n)
        Y = X[cols] * f[pid]

    # backprojection slices
    data = _complex_view(Wmat @ _real_view(Y))
    weight = W_ir.T @ xp.broadcast_to(s * s * ctf * ctf * isg, (n_i, k))

    # noise / scale / norm sums: expected projection per (i, t), then per-pixel products
    Q = _complex_view(Wmat.T @ _real_view(Pa))  # (n_cols, K) = Σ_r w_irt P_r
    sc = s * ctf
    if xp is np:  # compiled: read the images in place, sum in float64
        from cryodask.em.kernels import image_products

        XA, XX = image_products(Xm, cols, pid, Q, trans_w.reshape(-1)[cols], n_i)
        XA, XX = sc * XA.astype(rdt), XX.astype(rdt)
    else:
        Xm_c = Xm[cols]
        XA = sc * _segment_sum(Xm_c.real * Q.real + Xm_c.imag * Q.imag, pid, n_i)
        XX = _segment_sum(trans_w.reshape(-1)[cols][:, None] * _abs2(Xm_c), pid, n_i)
    AA = sc * sc * (W_ir @ _abs2(Pa))
    wd = XX - 2 * XA + AA  # (N_i, K)

    if group is None:
        onehot = xp.ones((1, n_i), dtype=rdt)
        if n_groups != 1:
            onehot = xp.concatenate([onehot, xp.zeros((n_groups - 1, n_i), dtype=rdt)])
    else:
        g = xp.asarray(group, dtype=np.int64)
        onehot = (g[None, :] == xp.arange(n_groups)[:, None]).astype(rdt)
    if scale_group is None:
        onehot_s = onehot
    else:
        gs = xp.asarray(scale_group, dtype=np.int64)
        onehot_s = (gs[None, :] == xp.arange(int(n_scale_groups))[:, None]).astype(rdt)
    sig_off = 0.0
    if offset_diff2 is not None:
        od2 = xp.asarray(offset_diff2, dtype=np.float64)
        tw = trans_w if orient_class is None or od2.ndim == 2 else trans_wc
        sig_off = float((tw.astype(np.float64) * od2).sum())
    return MStepSums(orientations=act, data=data, weight=weight, sigma2_noise=onehot @ wd,
                     signal_product=onehot_s @ XA, reference_power=onehot_s @ AA,
                     wdiff2=wd.sum(axis=1, dtype=np.float64), sum_weight=sum_weight,
                     orientation_weight=orient_w, translation_weight=trans_w,
                     group_weight=onehot.astype(np.float64) @ sum_weight,
                     class_weight=float(sum_weight.sum()), sigma2_offset=sig_off,
                     class_translation_weight=None if orient_class is None else trans_wc)


# ----------------------------------------------------------------------------------------
# two-pass driver (adaptive oversampling)
# ----------------------------------------------------------------------------------------
@dataclass
class FineClass:
    """The fine-pass orientations of one class: ``weights[:, start:start+n]`` belong to it."""

    class_index: int
    orientations: Array  # (n,) fine orientation indices: coarse r · n_over_rot + child
    projections: Array  # (n, K_fine)
    start: int

    @property
    def stop(self) -> int:
        return self.start + int(self.orientations.shape[0])


@dataclass
class TwoPassResult:
    """Output of :func:`score_two_pass`.

    ``fine`` is the posterior over the fine samples evaluated: the orientation axis is the
    concatenation of ``classes[c].orientations`` and the translation axis is
    ``fine_translations`` (fine translation indices: coarse t · n_over_trans + child).
    Samples whose coarse parent was not significant have weight 0. ``coarse`` is the first
    pass (its ``n_significant`` is RELION's ``rlnNrOfSignificantSamples``); in the results of
    :func:`score_two_pass_grouped` it holds the per-particle fields only (``weights`` and
    ``significant`` None: the groups read the chunk's coarse mask in place).
    """

    coarse: Posterior
    fine: Posterior
    classes: list[FineClass]
    fine_translations: Array
    n_over_rot: int
    n_over_trans: int

    def best_pose(self) -> tuple[Array, Array, Array]:
        """(class, fine orientation index, fine translation index) of each particle's largest weight."""
        xp = array_module(self.fine.best_orientation)
        cls = xp.zeros_like(self.fine.best_orientation)
        orient = xp.zeros_like(self.fine.best_orientation)
        for c in self.classes:
            inside = (self.fine.best_orientation >= c.start) & (self.fine.best_orientation < c.stop)
            if c.stop > c.start:
                local = xp.clip(self.fine.best_orientation - c.start, 0, c.stop - c.start - 1)
                orient = xp.where(inside, c.orientations[local], orient)
            cls = xp.where(inside, c.class_index, cls)
        return cls, orient, self.fine_translations[self.fine.best_translation]

    def class_weights(self, c: int) -> tuple[Array, Array]:
        """(weights, significant) of class ``c``'s fine orientations, for :func:`mstep_sums`."""
        fc = self.classes[c]
        return self.fine.weights[:, fc.start:fc.stop, :], self.fine.significant[:, fc.start:fc.stop, :]


#: classes' projections up to this size are stacked and scored in one GEMM (wider, so faster: measured
#: 1.4x for 10 classes of 72 orientations); larger ones are scored class by class, without a copy
STACK_PROJECTION_BYTES = 1 << 26


def _score_classes(terms: ScoringTerms, projections: list[Any], diff2: Any, starts: list[int],
                   block_bytes: int) -> None:
    """``diff2[:, start_c:start_c + n_c, :]`` = the scores of class ``c``'s projections (consecutive blocks)."""
    xp = array_module(diff2)
    parts = [(P, a) for P, a in zip(projections, starts, strict=True) if int(P.shape[0])]
    if not parts:
        return
    total = sum(int(P.shape[0]) * int(P.shape[1]) * P.dtype.itemsize for P, _ in parts)
    contiguous = all(a + int(P.shape[0]) == b for (P, a), (_, b) in zip(parts, parts[1:]))
    if len(parts) > 1 and contiguous and total <= STACK_PROJECTION_BYTES:
        a0 = parts[0][1]
        stacked = xp.concatenate([P for P, _ in parts])
        score_terms(terms, stacked, include_constant=False, out=diff2[:, a0:a0 + int(stacked.shape[0]), :],
                    block_bytes=block_bytes)
        return
    for P, a in parts:
        score_terms(terms, P, include_constant=False, out=diff2[:, a:a + int(P.shape[0]), :], block_bytes=block_bytes)


def _class_priors(xp: Any, lp: Any, n_i: int, n_class: int, n_orient: int) -> Any:
    if lp is None:
        return None
    lp = xp.asarray(lp)
    if lp.shape == (n_class, n_orient):
        return lp.reshape(n_class * n_orient)
    if lp.shape == (n_i, n_class, n_orient):
        return lp.reshape(n_i, n_class * n_orient)
    raise ValueError(f"log_prior_orient: expected ({n_class}, {n_orient}) or ({n_i}, {n_class}, {n_orient}), "
                     f"got {tuple(lp.shape)}")


def score_two_pass(coarse: ScoringTerms, fine: ScoringTerms, coarse_projections: Sequence[Any],
                   fine_projector: Callable[[int, Any], Any], *, n_over_rot: int, n_over_trans: int,
                   log_prior_orient: Any = None, log_prior_trans: Any = None,
                   adaptive_fraction: float = 0.999, maxsig: int = -1, logsigma2: Any = None,
                   block_bytes: int = DEFAULT_BLOCK_BYTES) -> TwoPassResult:
    """RELION's adaptive oversampling for one chunk over all classes: coarse pass → significance → fine pass.

    Parameters
    ----------
    coarse : ScoringTerms
        Images at ``coarse_size`` with the N_tc coarse translations.
    fine : ScoringTerms
        Images at ``current_size`` with the oversampled translations, ordered coarse-major:
        fine translation ``t_c · n_over_trans + u`` is child ``u`` of coarse ``t_c``.
    coarse_projections : sequence of (N_rc, K_coarse)
        One stack per class, the same N_rc coarse orientations for every class.
    fine_projector : callable ``(class_index, fine_orientation_indices) -> (n, K_fine)``
        Projects the oversampled orientations ``r_c · n_over_rot + j`` (child ``j`` of coarse
        ``r_c``; RELION's order) at ``current_size``. Only orientations below a significant
        coarse one are requested.
    n_over_rot, n_over_trans : int
        Children per coarse orientation (``2^(3·os)`` in 3D) and translation (``2^(2·os)`` in 2D images).
    log_prior_orient : (C, N_rc) or (N_i, C, N_rc), optional
        ``log π(class, orientation)`` on the coarse grid (class prior included).
    log_prior_trans : (N_tc,), (N_i, N_tc) or (N_i, C, N_tc), optional
        On the coarse grid. As in RELION, children inherit their coarse parent's priors.
    adaptive_fraction, maxsig, logsigma2
        As in :func:`posterior_weights` (the fine pass applies the same fraction again;
        ``maxsig`` only limits the coarse pass, as in RELION).

    Notes
    -----
    The fine pass is one dense GEMM per class over the *union* of the chunk's significant
    coarse orientations (expanded to their children) and the union of significant coarse
    translations; samples outside a particle's own significant set are then masked
    (diff2 = +inf). That keeps the work in large GEMMs, at the price of scoring pairs no
    particle needs when the particles of a chunk disagree (early iterations, or chunks
    mixing very different views): the cost is ``|union| / mean(|own set|)`` times the
    minimum. Sorting particles into chunks by their previous pose keeps the union small.
    """
    post_c, lpo = _coarse_pass(coarse, fine, coarse_projections, n_over_trans=n_over_trans,
                               log_prior_orient=log_prior_orient, log_prior_trans=log_prior_trans,
                               adaptive_fraction=adaptive_fraction, maxsig=maxsig, logsigma2=logsigma2,
                               block_bytes=block_bytes)
    return _fine_pass(post_c, fine, fine_projector, lpo, log_prior_trans, n_class=len(coarse_projections),
                      n_rc=int(coarse_projections[0].shape[0]), n_over_rot=n_over_rot, n_over_trans=n_over_trans,
                      adaptive_fraction=adaptive_fraction, logsigma2=logsigma2, block_bytes=block_bytes)


def _coarse_pass(coarse: ScoringTerms, fine: ScoringTerms, coarse_projections: Sequence[Any], *, n_over_trans: int,
                 log_prior_orient: Any, log_prior_trans: Any, adaptive_fraction: float, maxsig: int,
                 logsigma2: Any, block_bytes: int) -> tuple[Posterior, Any]:
    """Pass 0 of :func:`score_two_pass`: the coarse posterior and the class-flattened orientation prior."""
    xp = array_module(coarse.power)
    if coarse.mode != fine.mode:
        raise ValueError("coarse and fine terms must use the same mode")
    n_class = len(coarse_projections)
    if n_class == 0:
        raise ValueError("no classes")
    n_i, n_tc = coarse.n_particles, coarse.n_trans
    if fine.n_particles != n_i or fine.n_trans != n_tc * n_over_trans:
        raise ValueError(f"fine terms must hold {n_i} particles × {n_tc * n_over_trans} translations")
    n_rc = int(coarse_projections[0].shape[0])
    if any(int(p.shape[0]) != n_rc for p in coarse_projections):
        raise ValueError("every class needs the same number of coarse orientations")
    rdt = coarse.power.dtype
    orient_class_c = xp.repeat(xp.arange(n_class), n_rc)
    lpo = _class_priors(xp, log_prior_orient, n_i, n_class, n_rc)
    diff2 = xp.empty((n_i, n_class * n_rc, n_tc), dtype=rdt)
    _score_classes(coarse, list(coarse_projections), diff2, [c * n_rc for c in range(n_class)], block_bytes)
    post_c = posterior_weights(diff2, log_prior_orient=lpo, log_prior_trans=log_prior_trans,
                               orient_class=orient_class_c, adaptive_fraction=adaptive_fraction,
                               maxsig=maxsig, mode=coarse.mode, diff2_offset=coarse.constant,
                               logsigma2=logsigma2, overwrite_diff2=True)
    return post_c, lpo


def _fine_pass(post_c: Posterior, fine: ScoringTerms, fine_projector: Callable[[int, Any], Any], lpo: Any,
               log_prior_trans: Any, *, n_class: int, n_rc: int, n_over_rot: int, n_over_trans: int,
               adaptive_fraction: float, logsigma2: Any, block_bytes: int,
               unions: tuple[Any, Any] | None = None, coarse_significant: Any = None,
               coarse_rows: Any = None) -> TwoPassResult:
    """Pass 1 of :func:`score_two_pass`: dense over the union of the particles' significant coarse samples
    (``unions``: :func:`_significant_unions` of their coarse mask when the caller has them). The coarse
    mask is ``post_c.significant``, or ``coarse_significant`` (the chunk's, for a group) and its rows
    ``coarse_rows`` (read in place: only the group's union is copied)."""
    xp = array_module(fine.power)
    rdt = fine.power.dtype
    n_i = fine.n_particles
    orient_class_c = xp.repeat(xp.arange(n_class), n_rc)
    sig = post_c.significant if coarse_significant is None else coarse_significant
    if unions is None:
        unions = _significant_unions(sig if coarse_rows is None else sig[coarse_rows])
    rows_i, trans_i = unions
    rows = xp.nonzero(rows_i.any(axis=0))[0]  # union of significant (class, orientation)
    tcs = xp.nonzero(trans_i.any(axis=0))[0]  # union of significant coarse translations
    child_t = xp.arange(n_over_trans)
    fine_t = (tcs[:, None] * n_over_trans + child_t[None, :]).reshape(-1)
    fine_sub = fine.select_translations(fine_t)

    classes: list[FineClass] = []
    start = 0
    child_r = xp.arange(n_over_rot)
    for c in range(n_class):
        rc = rows[(rows >= c * n_rc) & (rows < (c + 1) * n_rc)] - c * n_rc
        orient = (rc[:, None] * n_over_rot + child_r[None, :]).reshape(-1)
        proj = fine_projector(c, orient) if orient.shape[0] else xp.zeros((0, fine.n_pixels), dtype=fine.complex_dtype)
        classes.append(FineClass(class_index=c, orientations=orient, projections=proj, start=start))
        start += int(orient.shape[0])
    diff2 = xp.empty((n_i, start, int(fine_t.shape[0])), dtype=rdt)
    _score_classes(fine_sub, [fc.projections for fc in classes], diff2, [fc.start for fc in classes], block_bytes)
    parent = sig[:, rows, :][:, :, tcs] if coarse_rows is None else sig[xp.ix_(coarse_rows, rows, tcs)]
    valid = xp.repeat(xp.repeat(parent, n_over_rot, axis=1), n_over_trans, axis=2)
    diff2[~valid] = xp.inf
    lpo_f = None
    if lpo is not None:
        lpo_f = xp.repeat(lpo[..., rows], n_over_rot, axis=-1)
    lpt_f = None
    if log_prior_trans is not None:
        lpt_f = xp.repeat(xp.asarray(log_prior_trans)[..., tcs], n_over_trans, axis=-1)
    orient_class_f = xp.repeat(orient_class_c[rows], n_over_rot)
    post_f = posterior_weights(diff2, log_prior_orient=lpo_f, log_prior_trans=lpt_f,
                               orient_class=orient_class_f, adaptive_fraction=adaptive_fraction,
                               maxsig=-1, mode=fine.mode, diff2_offset=fine.constant, logsigma2=logsigma2,
                               overwrite_diff2=True)
    return TwoPassResult(coarse=post_c, fine=post_f, classes=classes, fine_translations=fine_t,
                         n_over_rot=n_over_rot, n_over_trans=n_over_trans)


def _take(x: Any, idx: Any, n: int) -> Any:
    """Rows ``idx`` of a per-particle array (first axis ``n``); shared arrays and scalars as they are."""
    if x is None or np.ndim(x) == 0:
        return x
    return x[idx] if int(x.shape[0]) == n and np.ndim(x) >= 1 else x


def _significant_unions(significant: Any) -> tuple[Any, Any]:
    """Per particle, the orientations (N_i, N_r) and translations (N_i, N_t) holding a significant sample."""
    if isinstance(significant, np.ndarray):
        from cryodask.em.kernels import significant_any

        return significant_any(significant)
    return significant.any(axis=2), significant.any(axis=1)


def fine_groups(significant: Any, *, projection_cost: float = 8.0, group_cost: float = 500.0,
                unions: tuple[Any, Any] | None = None) -> list[np.ndarray]:
    """Split a chunk's particles into groups whose fine passes are cheaper apart than together.

    The fine pass of a group costs about ``n · |R| · |T|`` (particles × union of their significant
    coarse orientations × union of coarse translations, in units of one coarse sample's oversampled
    GEMM block), plus ``projection_cost · |R|`` to project the orientations' children and
    ``group_cost`` per group. With broad posteriors (early iterations) one union over the chunk is
    nearly the whole grid and costs many times the particles' own sets; walking the particles in
    the order of their best coarse orientation, each joins the current group only if that costs no
    more than starting a new one. Particles with no significant sample join the current group.

    Parameters
    ----------
    significant : (N_i, N_r, N_t) bool
        The coarse pass's significant samples (NumPy or CuPy; the grouping runs on the host).
    unions : optional
        ``(significant.any(axis=2), significant.any(axis=1))`` when the caller has them.

    Returns
    -------
    Particle indices of each group (sorted within a group); together a partition of ``range(N_i)``.
    """
    from cryodask.backend import to_numpy

    rows, trans = _significant_unions(significant) if unions is None else unions
    rows, trans = to_numpy(rows), to_numpy(trans)
    n = rows.shape[0]
    if n == 0:
        return []
    nr, nt = rows.sum(axis=1), trans.sum(axis=1)
    best = np.where(nr > 0, rows.argmax(axis=1), -1)
    order = np.argsort(best, kind="stable")
    groups: list[list[int]] = []
    R = T = None
    cnt = 0
    for i in order:
        if R is not None and nr[i] == 0:
            groups[-1].append(int(i))
            continue
        if R is None:
            groups.append([int(i)])
            R, T, cnt = rows[i].copy(), trans[i].copy(), 1
            continue
        Ru, Tu = R | rows[i], T | trans[i]
        nru, ntu = int(Ru.sum()), int(Tu.sum())
        nrg, ntg = int(R.sum()), int(T.sum())
        merged = (cnt + 1) * nru * ntu + projection_cost * nru
        apart = cnt * nrg * ntg + projection_cost * nrg + group_cost + nr[i] * nt[i] + projection_cost * nr[i]
        if merged <= apart:
            groups[-1].append(int(i))
            R, T, cnt = Ru, Tu, cnt + 1
        else:
            groups.append([int(i)])
            R, T, cnt = rows[i].copy(), trans[i].copy(), 1
    return [np.sort(np.asarray(g, np.int64)) for g in groups]


def _posterior_rows(post: Posterior, idx: Any) -> Posterior:
    """The per-particle fields of ``post`` for the particles ``idx``; ``weights`` and ``significant`` None
    (copying them per group took 1.5 s of an order-3 chunk at box 128, 12 % of the task)."""
    return Posterior(**{k: None if k in ("weights", "significant") else getattr(post, k)[idx]
                        for k in post.__dataclass_fields__})


def score_two_pass_grouped(coarse: ScoringTerms, fine: ScoringTerms, coarse_projections: Sequence[Any],
                           fine_projector: Callable[[Any, int, Any], Any], *, n_over_rot: int, n_over_trans: int,
                           log_prior_orient: Any = None, log_prior_trans: Any = None,
                           adaptive_fraction: float = 0.999, maxsig: int = -1, logsigma2: Any = None,
                           block_bytes: int = DEFAULT_BLOCK_BYTES, projection_cost: float = 8.0,
                           group_cost: float = 500.0) -> list[tuple[Array, TwoPassResult]]:
    """:func:`score_two_pass` with the fine pass run per group of particles (:func:`fine_groups`).

    The coarse pass is one GEMM over the chunk; the fine pass of each group is dense over that
    group's union only, so its cost follows the particles' own significant sets when they
    disagree (broad posteriors in the first iterations) and stays one large GEMM when they agree.
    Each particle's posterior is the same as in :func:`score_two_pass` (posteriors are per
    particle); only the layout of the result differs.

    ``fine_projector(group, class_index, fine_orientation_indices)`` gets the group's particle
    indices first. Returns ``[(particle indices, TwoPassResult of those particles), ...]``.
    """
    post_c, lpo = _coarse_pass(coarse, fine, coarse_projections, n_over_trans=n_over_trans,
                               log_prior_orient=log_prior_orient, log_prior_trans=log_prior_trans,
                               adaptive_fraction=adaptive_fraction, maxsig=maxsig, logsigma2=logsigma2,
                               block_bytes=block_bytes)
    xp = array_module(fine.power)
    n_i = fine.n_particles
    out = []
    unions = _significant_unions(post_c.significant)
    for g in fine_groups(post_c.significant, projection_cost=projection_cost, group_cost=group_cost,
                         unions=unions):
        gi = xp.asarray(g)
        sub = fine if len(g) == n_i else fine.select_particles(gi)
        pc = _posterior_rows(post_c, gi)  # the coarse weights are freed on return (the M-step has no use for them)
        res = _fine_pass(pc, sub, lambda c, orient, g=g: fine_projector(g, c, orient), _take(lpo, gi, n_i)
                         if lpo is not None and lpo.ndim == 2 else lpo,
                         None if log_prior_trans is None else (
                             _take(xp.asarray(log_prior_trans), gi, n_i) if np.ndim(log_prior_trans) >= 2
                             else log_prior_trans),
                         n_class=len(coarse_projections), n_rc=int(coarse_projections[0].shape[0]),
                         n_over_rot=n_over_rot, n_over_trans=n_over_trans, adaptive_fraction=adaptive_fraction,
                         logsigma2=_take(logsigma2, gi, n_i), block_bytes=block_bytes,
                         unions=tuple(u if len(g) == n_i else u[gi] for u in unions),
                         coarse_significant=post_c.significant, coarse_rows=None if len(g) == n_i else gi)
        out.append((g, res))
    return out
