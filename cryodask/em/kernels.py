"""Compiled CPU kernels for the E-step's per-particle reductions (Numba).

The steps of a chunk task between the GEMMs are reductions over every sample of a particle that
array expressions make in several passes over arrays the size of the score array (hundreds of MB),
with large temporaries:

- the posterior (:func:`posterior_rows`): min diff2, the log-weights, ``exp``, the normalisation,
  the best sample and RELION's significance rule, a few particles at a time so that their rows stay
  in cache between the passes (long rows: a particle at a time, in blocks); the exponentials by NumPy's
  vectorised ``exp``. Weights below the
  smallest normal float32 are stored as 0 (subnormal arithmetic is ~100× slower on x86).
- the significance threshold (RELION's walk down the sorted weights until their sum exceeds
  ``adaptive_fraction`` of the total): only the weights that the walk could take are kept
  (a handful on a peaked posterior, then sorted); with broad posteriors tens of thousands per
  particle go into a histogram of their float32 bit patterns (monotonic in the value; 4,096 bins of
  1/16 of an octave), the walk runs over the bins from the top, and only the bin where the sum
  crosses the target is sorted.
- the M-step's sums of the significant weights per translation, orientation and (particle,
  orientation) (:func:`significant_marginals`), its weight matrix (:func:`weight_matrix`), and the
  noise and scale sums ``Σ_t Re(X_t · conj Q_t)`` and ``Σ_t w_t |X_t|²`` per particle and pixel, read
  straight from the weights, the significance mask and the shifted images, with no masked or
  gathered copies.

Used for NumPy arrays only; CuPy arrays keep the array expressions of :mod:`cryodask.em.estep`.
"""

from __future__ import annotations

import numpy as np
from numba import njit

#: bins of the float32 bit pattern (sign 0, 8 exponent bits, the top 4 mantissa bits)
_SHIFT = 19
_N_BINS = 1 << (31 - _SHIFT)


#: a row with at most this many candidates is walked by sorting them, more go through the histogram
_SORT_LIMIT = 4096


@njit(cache=True, nogil=True)
def _bin_sorted(cand, bits, b, buf):
    """The candidates in bin ``b``, ascending (a view of ``buf``)."""
    k = 0
    for j in range(cand.shape[0]):
        if (bits[j] >> _SHIFT) == b:
            buf[k] = cand[j]
            k += 1
    return np.sort(buf[:k])


@njit(cache=True, nogil=True)
def _candidates_row(w, total, fraction, cand):
    """Copy into ``cand`` the row's weights that the walk could take; returns ``(count, smallest positive
    weight)`` (inf: none).

    A weight below ``(1 − fraction)·total / M`` (``M`` samples) is never taken: all such weights
    together hold less than the ``1 − fraction`` the walk leaves out. Half that cut (against rounding)
    leaves a handful of candidates on a peaked posterior.
    """
    m = w.shape[0]
    cut = 0.5 * max(0.0, 1.0 - fraction) * total / max(m, 1)
    n = 0
    smallest = np.inf
    for j in range(m):
        v = w[j]
        smallest = min(smallest, v if v > 0 else np.inf)
        if v >= cut and v > 0:
            cand[n] = v
            n += 1
    return n, smallest


@njit(cache=True, nogil=True)
def _walk_row(cand, bits, total, fraction, maxsig, smallest, hist_sum, hist_cnt, buf):
    """RELION's walk down a row's candidate weights (``cand``, ``bits`` its int32 view) until their sum
    exceeds ``fraction · total``: ``(n_taken, threshold)``. Few candidates are sorted; many go into a
    histogram of their bit patterns and only the bin where the sum crosses the target is sorted."""
    n = cand.shape[0]
    target = fraction * total
    acc = 0.0
    taken = 0
    thr = -1.0
    if n <= _SORT_LIMIT:
        vals = np.sort(cand)
        for q in range(n - 1, -1, -1):
            acc += vals[q]
            taken += 1
            if acc > target:
                thr = vals[q]
                break
    else:
        hist_sum[:] = 0.0
        hist_cnt[:] = 0
        for j in range(n):
            b = bits[j] >> _SHIFT
            hist_sum[b] += cand[j]
            hist_cnt[b] += 1
        for b in range(_N_BINS - 1, -1, -1):
            if hist_cnt[b] == 0:
                continue
            if acc + hist_sum[b] <= target:
                acc += hist_sum[b]
                taken += hist_cnt[b]
                continue
            # the sum crosses the target inside this bin: walk its values in descending order
            vals = _bin_sorted(cand, bits, b, buf)
            for q in range(len(vals) - 1, -1, -1):
                acc += vals[q]
                taken += 1
                if acc > target:
                    thr = vals[q]
                    break
            if thr >= 0:
                break
    if thr < 0:  # the walk ran through (only by rounding, or fraction >= 1): the smallest weight
        taken = max(taken, 1)
        thr = smallest if smallest < np.inf else 0.0
    if maxsig > 0 and taken > maxsig:  # the maxsig-th largest weight (taken ≤ n: it is a candidate)
        taken = maxsig
        if n <= _SORT_LIMIT:
            thr = vals[n - maxsig]
        else:
            above = 0
            for b in range(_N_BINS - 1, -1, -1):
                if above + hist_cnt[b] < maxsig:
                    above += hist_cnt[b]
                    continue
                vals = _bin_sorted(cand, bits, b, buf)
                thr = vals[len(vals) - 1 - (maxsig - above - 1)]
                break
    return taken, thr


@njit(cache=True, nogil=True)
def _significance_row(w, total, fraction, maxsig, cand, cand_bits, hist_sum, hist_cnt, buf):
    """``(n_taken, threshold)`` of one row of weights (float32)."""
    n, smallest = _candidates_row(w, total, fraction, cand)
    return _walk_row(cand[:n], cand_bits[:n], total, fraction, maxsig, smallest, hist_sum, hist_cnt, buf)


@njit(cache=True, nogil=True)
def _significance_rows(w, total, fraction, maxsig, cand, cand_bits, n_taken, threshold):
    hist_sum = np.empty(_N_BINS, np.float64)
    hist_cnt = np.empty(_N_BINS, np.int64)
    buf = np.empty(w.shape[1], w.dtype)
    for i in range(w.shape[0]):
        n_taken[i], threshold[i] = _significance_row(w[i], total[i], fraction, maxsig, cand, cand_bits, hist_sum,
                                                     hist_cnt, buf)


def significance_threshold(weights: np.ndarray, total: np.ndarray, adaptive_fraction: float,
                           maxsig: int = -1) -> tuple[np.ndarray, np.ndarray]:
    """RELION's significance walk per row of ``weights`` (N_i, M) float32, non-negative.

    Returns ``(n_taken, threshold)``: the samples taken until the running sum of the sorted
    weights exceeds ``adaptive_fraction · total`` (``total`` in float64, one per row), and the
    last weight taken; with ``maxsig > 0`` at most ``maxsig`` samples. A walk that runs through
    ends at the smallest positive weight. Rows with no positive weight get threshold 0.
    """
    w = np.ascontiguousarray(weights, dtype=np.float32)
    n = w.shape[0]
    n_taken = np.zeros(n, np.int64)
    threshold = np.zeros(n, np.float64)
    if n and w.shape[1]:
        cand = np.empty(w.shape[1], np.float32)
        _significance_rows(w, np.asarray(total, np.float64), float(adaptive_fraction), int(maxsig), cand,
                           cand.view(np.int32), n_taken, threshold)
    return n_taken, threshold


@njit(cache=True, nogil=True)
def _image_products(Xm, cols, pid, Q, tw, XA, XX):
    k = Xm.shape[1]
    for c in range(cols.shape[0]):
        row = cols[c]
        i = pid[c]
        wt = tw[c]
        for p in range(k):
            x = Xm[row, p]
            q = Q[c, p]
            XA[i, p] += x.real * q.real + x.imag * q.imag
            XX[i, p] += wt * (x.real * x.real + x.imag * x.imag)


def image_products(Xm: np.ndarray, cols: np.ndarray, pid: np.ndarray, Q: np.ndarray, tw: np.ndarray,
                   n_i: int) -> tuple[np.ndarray, np.ndarray]:
    """``XA[i] = Σ_c Re(Xm[cols[c]] · conj Q[c])`` and ``XX[i] = Σ_c tw[c] |Xm[cols[c]]|²`` over the
    (particle, translation) rows ``c`` of particle ``i = pid[c]``; float64 sums, shape (n_i, K)."""
    k = Xm.shape[1]
    XA = np.zeros((n_i, k), np.float64)
    XX = np.zeros((n_i, k), np.float64)
    if len(cols):
        _image_products(np.ascontiguousarray(Xm), np.asarray(cols, np.int64), np.asarray(pid, np.int64),
                        np.ascontiguousarray(Q), np.asarray(tw, np.float64), XA, XX)
    return XA, XX


#: smallest normal float32. Weights below it are stored as 0: subnormal arithmetic takes a microcode assist
#: on x86 (~100 cycles: it made normalising 10x slower, and slows every GEMM the weights enter), and such a
#: weight is at most 1e-38 of the particle's largest, which is ≥ 1/(samples).
_FLT_MIN = float(np.finfo(np.float32).tiny)
#: exp(x) < _FLT_MIN below this; the weights are exp(x) / total with total ≥ 1, so they would be stored as 0
_EXP_FLOOR = float(np.log(np.finfo(np.float32).tiny))
#: the exponent of samples with weight 0: exp gives 1e-304, a normal float64 that adds nothing to a total ≥ 1
#: (−inf or an underflowing exponent take NumPy's exp off its vectorised path, 3-6x slower)
_ZERO_EXPONENT = -700.0
#: particles per block of :func:`posterior_rows` for short rows: their exponents (float64) stay in cache for
#: NumPy's exp and the passes after it
_ROWS_PER_BLOCK = 4
#: rows longer than this (samples) are taken a block of ``_BLOCK_SAMPLES`` at a time (whole orientations):
#: at order 3 a row is 2.7M samples, 22 MB of float64 exponentials that no cache holds. Blocks cost a few
#: calls each and exp twice: on broad rows of 0.5M samples they ran 5 % slower than four rows at a time,
#: on peaked order-3 rows 30 % faster
_LONG_ROW = 1 << 20
_BLOCK_SAMPLES = 1 << 15


@njit(cache=True, nogil=True)
def _log_weight_rows(diff2, lpo, lpt, cls, max_exponent, i0, x, min_rel, top):
    """Exponents ``x = lw − top`` of particles ``i0 …`` (one row of ``x`` each), ``_ZERO_EXPONENT`` where the
    weight is 0; ``min_rel`` +inf marks a particle with nothing scored."""
    n_r, n_t = diff2.shape[1], diff2.shape[2]
    po = lpo.shape[0] > 1
    pt = lpt.shape[0] > 1
    for k in range(x.shape[0]):
        i = i0 + k
        io = i if po else 0
        it = i if pt else 0
        xk = x[k]
        # min diff2 and max (log prior − diff2) over the samples with a finite diff2 and prior
        lo = np.inf
        hi = -np.inf
        d_hi = 0.0
        for r in range(n_r):
            a = lpo[io, r]
            c = cls[r]
            for t in range(n_t):
                d = diff2[i, r, t]
                p = a + lpt[it, c, t]
                if np.isfinite(d) and np.isfinite(p):
                    if d < lo:
                        lo = d
                    if p - d > hi:
                        hi = p - d
                        d_hi = d
        min_rel[i] = lo
        if not np.isfinite(lo):  # nothing scored: a failed particle
            top[i] = 0.0
            xk[:] = _ZERO_EXPONENT
            continue
        if d_hi - lo > max_exponent:  # the priors outweigh the cut (span > 700): the max of what is kept
            hi = -np.inf
            for r in range(n_r):
                for t in range(n_t):
                    d = diff2[i, r, t]
                    p = lpo[io, r] + lpt[it, cls[r], t]
                    if np.isfinite(d) and np.isfinite(p) and d - lo <= max_exponent and p - d > hi:
                        hi = p - d
        top[i] = hi + lo  # the largest log-weight, lw = log prior − (diff2 − min)
        for r in range(n_r):  # RELION's cut at diff2 − min > 700
            a = lpo[io, r]
            c = cls[r]
            for t in range(n_t):
                d = diff2[i, r, t]
                p = a + lpt[it, c, t]
                v = _ZERO_EXPONENT
                if np.isfinite(d) and np.isfinite(p) and d - lo <= max_exponent:
                    v = (p - d) - hi
                    if v < _EXP_FLOOR:
                        v = _ZERO_EXPONENT
                xk[r * n_t + t] = v


#: reassociation for the row sums and maxima only: they vectorise, and their order does not matter beyond
#: rounding (no NaN reaches them: exponents are finite or _ZERO_EXPONENT)
_REDUCE = {"reassoc", "nsz", "contract"}


@njit(cache=True, nogil=True)
def _row_extent(d, lpo_row, lpt_i, cls):
    """(min diff2, max(log prior − diff2), max log prior) of one particle's ``d`` (N_r, N_t) over the samples
    with a finite diff2 and prior; selects, not branches (the signs of a comparison are unpredictable)."""
    lo, hi, pmax = np.inf, -np.inf, -np.inf
    for r in range(d.shape[0]):
        a = lpo_row[r]
        lt = lpt_i[cls[r]]
        dr = d[r]
        for t in range(d.shape[1]):
            dd = np.float64(dr[t])
            p = a + lt[t]
            ok = np.isfinite(dd) and np.isfinite(p)
            x1 = dd if ok else np.inf
            x2 = p - dd if ok else -np.inf
            x3 = p if ok else -np.inf
            lo = x1 if x1 < lo else lo
            hi = x2 if x2 > hi else hi
            pmax = x3 if x3 > pmax else pmax
    return lo, hi, pmax


@njit(cache=True, nogil=True)
def _exponents(d, lpo_row, lpt_i, cls, lo, hi, max_exponent, r0, x):
    """``x`` = the exponents ``lw − top`` of orientations ``r0 …`` of one particle (flat, all translations),
    ``_ZERO_EXPONENT`` where the weight is 0: as :func:`_log_weight_rows`, with the row's extent known."""
    n_t = d.shape[1]
    for k in range(x.shape[0] // n_t):
        r = r0 + k
        a = lpo_row[r]
        lt = lpt_i[cls[r]]
        dr = d[r]
        xk = x[k * n_t:(k + 1) * n_t]
        for t in range(n_t):
            dd = np.float64(dr[t])
            p = a + lt[t]
            v = (p - dd) - hi
            # RELION's cut at diff2 − min > 700; a non-finite diff2 or prior fails one of the tests
            ok = (dd - lo <= max_exponent) & (v >= _EXP_FLOOR) & (p < np.inf)
            xk[t] = v if ok else _ZERO_EXPONENT


@njit(cache=True, nogil=True, fastmath=_REDUCE)
def _row_sum(e):
    s = 0.0
    for j in range(e.shape[0]):
        s += e[j]
    return s


@njit(cache=True, nogil=True, fastmath=_REDUCE)
def _scaled_float32(e, f, w):
    """``w = float32(e·f)``, values below float32's smallest normal stored as 0; returns (Σw, max w)."""
    wsum = 0.0
    vmax = np.float32(0.0)
    for j in range(e.shape[0]):
        q = e[j] * f
        v = np.float32(q) if q >= _FLT_MIN else np.float32(0.0)
        w[j] = v
        wsum += v
        vmax = max(vmax, v)
    return wsum, vmax


@njit(cache=True, nogil=True)
def _candidates_above(w, cut, cand):
    """Copy the row's weights ``>= cut`` (and > 0) into ``cand``; returns their count."""
    n = 0
    for j in range(w.shape[0]):
        v = w[j]
        if v >= cut and v > 0:
            cand[n] = v
            n += 1
    return n


@njit(cache=True, nogil=True)
def _significance(wi, wsum, vmax, at, n, fraction, maxsig, sigi, cand, cand_bits, hist_sum, hist_cnt, buf):
    """(n_taken, threshold, best) of a row of normalised weights ``wi`` whose ``n`` candidates are in
    ``cand``; the row's largest weight ``vmax`` is first met in the block starting at ``at``. Fills the
    significance mask ``sigi``."""
    best = at
    while wi[best] != vmax:
        best += 1
    if not wsum > 0:
        sigi[:] = False
        return 0, 0.0, best
    taken, thr = _walk_row(cand[:n], cand_bits[:n], wsum, fraction, maxsig, np.inf, hist_sum, hist_cnt, buf)
    if taken >= n:  # it may have run through (rounding): then the threshold is the smallest positive weight
        smallest = np.inf
        for j in range(wi.shape[0]):
            if wi[j] > 0 and wi[j] < smallest:
                smallest = wi[j]
        taken, thr = _walk_row(cand[:n], cand_bits[:n], wsum, fraction, maxsig, smallest, hist_sum, hist_cnt, buf)
    t32 = np.float32(thr)
    for j in range(wi.shape[0]):
        sigi[j] = wi[j] >= t32
    return taken, thr, best


@njit(cache=True, nogil=True)
def _normalise_rows(e, i0, min_rel, fraction, maxsig, w, sig, total, n_taken, threshold, best,
                    cand, cand_bits, hist_sum, hist_cnt, buf):
    """From ``e = exp(lw − top)`` of particles ``i0 …``: normalised float32 weights, the best sample and
    the significance rule, each row while it is in cache. The passes over a row are kept branch-free
    where they can be (they vectorise): sum, scale (with the row's sum and max), the candidates the
    walk could take (few on a peaked row), the mask."""
    m = e.shape[1]
    for k in range(e.shape[0]):
        i = i0 + k
        ek, wi = e[k], w[i]
        s = _row_sum(ek) if np.isfinite(min_rel[i]) else 0.0
        total[i] = s
        n_taken[i] = 0
        threshold[i] = 0.0
        best[i] = 0
        if not s > 0:
            wi[:] = 0.0
            sig[i] = False
            continue
        wsum, vmax = _scaled_float32(ek, 1.0 / s, wi)
        # weights below (1 − fraction)·Σw / M together hold less than what the walk leaves out (a quarter of
        # that, against rounding); with fraction >= 1 every positive weight is a candidate
        n = _candidates_above(wi, 0.25 * max(0.0, 1.0 - fraction) * wsum / max(m, 1), cand)
        n_taken[i], threshold[i], best[i] = _significance(wi, wsum, vmax, 0, n, fraction, maxsig, sig[i], cand,
                                                          cand_bits, hist_sum, hist_cnt, buf)


def posterior_rows(diff2: np.ndarray, lpo: np.ndarray, lpt: np.ndarray, cls: np.ndarray, max_exponent: float,
                   adaptive_fraction: float, maxsig: int, overwrite_diff2: bool = False) -> dict[str, np.ndarray]:
    """Normalised posterior of a float32 ``diff2`` (N_i, N_r, N_t) with the log prior
    ``lpo[i, r] + lpt[i, cls[r], t]`` (a first axis of 1 is shared by all particles), and RELION's
    significance rule, with each row's passes made while it is in cache: short rows a few particles at
    a time, long rows (over ``_LONG_ROW`` samples) in blocks (:func:`_long_rows`). The exponentials by
    NumPy's vectorised ``exp``, several times a scalar loop's speed.

    Returns a dict: ``weights`` (float32, rows summing to 1, 0 for a non-finite diff2 or prior and
    beyond ``max_exponent``), ``significant`` (bool), ``min_rel`` (the min diff2 over samples with a
    finite prior, +inf: none), ``top`` (the largest log-weight), ``total`` (``Σ exp(lw − top)``,
    float64; 0 for a particle with nothing scored), ``n_taken`` and ``threshold`` (as
    :func:`significance_threshold`) and ``best`` (flat index of the largest weight). With
    ``overwrite_diff2`` (a C-contiguous float32 ``diff2``) the weights are written over ``diff2``: a
    row is read for the last time before its weights are written.
    """
    n_i, n_r, n_t = diff2.shape
    m = n_r * n_t
    in_place = overwrite_diff2 and diff2.dtype == np.float32 and diff2.flags.c_contiguous
    diff2 = np.ascontiguousarray(diff2)
    lpo, lpt = np.ascontiguousarray(lpo, np.float64), np.ascontiguousarray(lpt, np.float64)
    cls = np.asarray(cls, np.int64)
    w = diff2.reshape(n_i, m) if in_place else np.empty((n_i, m), np.float32)
    sig = np.empty((n_i, m), np.bool_)
    out = {k: np.zeros(n_i) for k in ("min_rel", "top", "total", "threshold")}
    n_taken, best = np.zeros(n_i, np.int64), np.zeros(n_i, np.int64)
    hist_sum, hist_cnt, buf = np.empty(_N_BINS), np.empty(_N_BINS, np.int64), np.empty(m, np.float32)
    cand = np.empty(m, np.float32)
    scratch = (cand, cand.view(np.int32), hist_sum, hist_cnt, buf)
    if m > _LONG_ROW:
        _long_rows(diff2, lpo, lpt, cls, float(max_exponent), float(adaptive_fraction), int(maxsig), w, sig, out,
                   n_taken, best, scratch)
    else:
        e = np.empty((min(_ROWS_PER_BLOCK, n_i), m))
        for i0 in range(0, n_i, _ROWS_PER_BLOCK):
            ek = e[:min(_ROWS_PER_BLOCK, n_i - i0)]
            _log_weight_rows(diff2, lpo, lpt, cls, float(max_exponent), i0, ek, out["min_rel"], out["top"])
            np.exp(ek, out=ek)
            _normalise_rows(ek, i0, out["min_rel"], float(adaptive_fraction), int(maxsig), w, sig, out["total"],
                            n_taken, out["threshold"], best, *scratch)
    return dict(out, weights=w.reshape(n_i, n_r, n_t), significant=sig.reshape(n_i, n_r, n_t), n_taken=n_taken,
                best=best)


def _long_rows(diff2, lpo, lpt, cls, max_exponent, fraction, maxsig, w, sig, out, n_taken, best, scratch) -> None:
    """:func:`posterior_rows` for long rows: a particle at a time, its row in blocks of ``_BLOCK_SAMPLES``
    that stay in cache. One pass for the row's extent (min diff2, max log-weight), one for the total
    ``Σ exp(lw − top)``, and one that makes the exponentials again and writes the float32 weights, their
    maximum and the candidates of the significance walk: exp twice costs less than a row of float64
    exponentials written and read back (22 MB a particle at order 3; synthetic order-3 rows 10.9 → 7.9 ns
    a sample). Same weights as the short-row path, to the rounding of the total's summation order."""
    n_i, n_r, n_t = diff2.shape
    m = n_r * n_t
    cand = scratch[0]
    rows = max(1, _BLOCK_SAMPLES // max(n_t, 1))
    x = np.empty(rows * n_t)
    blocks = [(r0, r0 * n_t, min(rows, n_r - r0) * n_t) for r0 in range(0, n_r, rows)]
    # weights below (1 − fraction)·Σw / M together hold less than what the walk leaves out (a quarter of that,
    # against rounding; Σw is 1 to float32 rounding): the walk's candidates. fraction >= 1: every positive weight
    cut = 0.25 * max(0.0, 1.0 - fraction) * (1.0 - 1e-3) / max(m, 1)
    po, pt = lpo.shape[0] > 1, lpt.shape[0] > 1
    for i in range(n_i):
        d, lpo_i, lpt_i, wi = diff2[i], lpo[i if po else 0], lpt[i if pt else 0], w[i]
        lo, hi, pmax = _row_extent(d, lpo_i, lpt_i, cls)
        out["min_rel"][i] = lo
        if not np.isfinite(lo):  # nothing scored: a failed particle
            wi[:] = 0.0
            sig[i] = False
            continue
        if pmax - hi - lo > max_exponent:  # the largest log-weight may lie beyond the cut: take it exactly
            _log_weight_rows(diff2[i:i + 1], lpo[i:i + 1] if po else lpo, lpt[i:i + 1] if pt else lpt, cls,
                             max_exponent, 0, np.empty((1, m)), out["min_rel"][i:i + 1], out["top"][i:i + 1])
            hi = out["top"][i] - lo
        out["top"][i] = hi + lo  # the largest log-weight, lw = log prior − (diff2 − min)
        total = 0.0
        for r0, j0, n in blocks:
            xb = x[:n]
            _exponents(d, lpo_i, lpt_i, cls, lo, hi, max_exponent, r0, xb)
            total += _row_sum(np.exp(xb, out=xb))
        out["total"][i] = total
        if not total > 0:
            wi[:] = 0.0
            sig[i] = False
            continue
        wsum, vmax, at, n_cand = 0.0, np.float32(0.0), 0, 0
        for r0, j0, n in blocks:
            xb = x[:n]
            _exponents(d, lpo_i, lpt_i, cls, lo, hi, max_exponent, r0, xb)
            wb = wi[j0:j0 + n]
            ws, vm = _scaled_float32(np.exp(xb, out=xb), 1.0 / total, wb)
            wsum += ws
            if vm > vmax:
                vmax, at = vm, j0
            n_cand += _candidates_above(wb, cut, cand[n_cand:])
        n_taken[i], out["threshold"][i], best[i] = _significance(wi, wsum, vmax, at, n_cand, fraction, maxsig, sig[i],
                                                                 *scratch)


@njit(cache=True, nogil=True)
def _significant_marginals(w, sig, use_sig, cls, trans_w, orient_w, w_ir):
    n_i, n_r, n_t = w.shape
    zero = w.dtype.type(0)
    for i in range(n_i):
        for r in range(n_r):
            acc = 0.0
            tw = trans_w[i, cls[r]]
            for t in range(n_t):
                v = w[i, r, t] if (not use_sig or sig[i, r, t]) else zero
                tw[t] += v
                acc += v
            w_ir[i, r] = acc
            orient_w[r] += acc


def significant_marginals(w: np.ndarray, significant: np.ndarray | None, orient_class: np.ndarray | None = None,
                          n_classes: int = 1) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """Sums of the weights ``w`` (N_i, N_r, N_t) over the ``significant`` samples (all when None), in one
    pass and without a masked copy: ``(Σ_r w (N_i, N_t), Σ_{i,t} w (N_r,) float64, Σ_t w (N_i, N_r))``.

    With ``orient_class`` (N_r,) the first is summed per class instead: (N_i, n_classes, N_t).
    ``w`` and ``significant`` may be views (a class's orientation range of a larger array): they are
    read in place.
    """
    n_i, n_r, n_t = w.shape
    per_class = orient_class is not None
    cls = np.asarray(orient_class, np.int64) if per_class else np.zeros(n_r, np.int64)
    trans_w = np.zeros((n_i, n_classes if per_class else 1, n_t), w.dtype)
    orient_w, w_ir = np.zeros(n_r), np.empty((n_i, n_r), w.dtype)
    use_sig = significant is not None
    sig = np.asarray(significant, np.bool_) if use_sig else np.ones((1, 1, 1), np.bool_)
    _significant_marginals(w, sig, use_sig, cls, trans_w, orient_w, w_ir)
    return (trans_w if per_class else trans_w[:, 0]), orient_w, w_ir


@njit(cache=True, nogil=True)
def _class_presence(sig, starts, out):
    n_i = sig.shape[0]
    for i in range(n_i):
        row = sig[i]
        for c in range(starts.shape[0] - 1):
            block = row[starts[c]:starts[c + 1]]
            found = False
            for j0 in range(0, block.shape[0], 64):  # an OR over 64 bytes vectorises; the test is per block
                acc = False
                for j in range(j0, min(j0 + 64, block.shape[0])):
                    acc |= block[j]
                if acc:
                    found = True
                    break
            out[i, c] = found


def class_presence(significant: np.ndarray, starts: np.ndarray) -> np.ndarray:
    """``(N_i, C)``: whether particle ``i`` has a significant sample among orientations
    ``starts[c]:starts[c + 1]`` of ``significant`` (N_i, N_r, N_t); stops at a particle's first one."""
    sig = np.ascontiguousarray(significant, np.bool_)
    n_i, n_r, n_t = sig.shape
    starts = np.asarray(starts, np.int64)
    out = np.zeros((n_i, len(starts) - 1), np.bool_)
    _class_presence(sig.reshape(n_i, n_r * n_t), starts * n_t, out)
    return out


@njit(cache=True, nogil=True)
def _weight_matrix(w, sig, use_sig, act, ci, ct, out):
    zero = w.dtype.type(0)
    n_c = ci.shape[0]
    c0 = 0
    while c0 < n_c:  # one particle's columns (contiguous: cols is sorted) for every orientation: its weights
        i = ci[c0]   # stay in cache, and each row of out is written in runs
        c1 = c0
        while c1 < n_c and ci[c1] == i:
            c1 += 1
        t0 = ct[c0]
        if ct[c1 - 1] - t0 == c1 - 1 - c0:  # consecutive translations: runs that vectorise
            for a in range(act.shape[0]):
                wr = w[i, act[a], t0:t0 + c1 - c0]
                o = out[a, c0:c1]
                if use_sig:
                    sr = sig[i, act[a], t0:t0 + c1 - c0]
                    for j in range(c1 - c0):
                        o[j] = wr[j] if sr[j] else zero
                else:
                    o[:] = wr
        else:
            for a in range(act.shape[0]):
                r = act[a]
                for c in range(c0, c1):
                    t = ct[c]
                    out[a, c] = w[i, r, t] if (not use_sig or sig[i, r, t]) else zero
        c0 = c1


def weight_matrix(w: np.ndarray, act: np.ndarray, cols: np.ndarray, significant: np.ndarray | None = None
                  ) -> np.ndarray:
    """``out[a, c] = w[i, act[a], t]`` for the (particle, translation) rows ``cols[c] = i·N_t + t`` of
    ``w`` (N_i, N_r, N_t), 0 where not ``significant``: the M-step's weight matrix, without the
    transposed or masked copies (``w`` and ``significant`` may be views, read in place). ``cols`` must be
    sorted."""
    out = np.empty((len(act), len(cols)), w.dtype)
    use_sig = significant is not None
    sig = np.asarray(significant, np.bool_) if use_sig else np.ones((1, 1, 1), np.bool_)
    cols = np.asarray(cols, np.int64)
    ci = cols // w.shape[2]  # sorted: a particle's columns are consecutive
    _weight_matrix(w, sig, use_sig, np.asarray(act, np.int64), ci, cols - ci * w.shape[2], out)
    return out


@njit(cache=True, nogil=True)
def _significant_any(sig, rows, trans):
    n_i, n_r, n_t = sig.shape
    for i in range(n_i):
        for r in range(n_r):
            for t in range(n_t):
                if sig[i, r, t]:
                    rows[i, r] = True
                    trans[i, t] = True


def significant_any(significant: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """``(significant.any(axis=2), significant.any(axis=1))`` of a (N_i, N_r, N_t) mask in one pass
    (NumPy's reductions over an inner axis of a bool array take two slow passes)."""
    sig = np.ascontiguousarray(significant, np.bool_)
    n_i, n_r, n_t = sig.shape
    rows, trans = np.zeros((n_i, n_r), np.bool_), np.zeros((n_i, n_t), np.bool_)
    _significant_any(sig, rows, trans)
    return rows, trans


@njit(cache=True, nogil=True)
def _abs2_flat(a, out):
    for j in range(a.shape[0]):
        v = a[j]
        out[j] = v.real * v.real + v.imag * v.imag


def abs2(a: np.ndarray) -> np.ndarray:
    """``|a|²`` of a complex array in one pass (the array expression makes three temporaries and reads
    the interleaved parts with a stride: 7× slower on the projection blocks of the scoring)."""
    flat = np.ascontiguousarray(a).reshape(-1)
    out = np.empty(flat.shape, flat.real.dtype)
    _abs2_flat(flat, out)
    return out.reshape(a.shape)


@njit(cache=True, nogil=True)
def _scaled_rows(X, cols, pid, f, out):
    k = X.shape[1]
    for c in range(cols.shape[0]):
        row = cols[c]
        i = pid[c]
        for p in range(k):
            out[c, p] = X[row, p] * f[i, p]


def scaled_rows(X: np.ndarray, cols: np.ndarray, pid: np.ndarray, f: np.ndarray) -> np.ndarray:
    """``X[cols] * f[pid]`` in one pass (the images to backproject, times CTF/σ² per particle)."""
    out = np.empty((len(cols), X.shape[1]), X.dtype)
    _scaled_rows(np.ascontiguousarray(X), np.asarray(cols, np.int64), np.asarray(pid, np.int64),
                 np.ascontiguousarray(f, dtype=X.real.dtype), out)
    return out
