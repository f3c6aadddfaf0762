"""Compiled CPU kernels for the E-step's per-particle reductions (Numba).

Two steps of a chunk task are reductions over every sample of a particle that array expressions
make in several passes with large temporaries:

- the significance threshold (RELION's walk down the sorted weights until their sum exceeds
  ``adaptive_fraction`` of the total): with broad posteriors tens of thousands of weights per
  particle are significant, and a partition + sort + cumulative sum of that many per particle cost
  more than the GEMMs that scored them. Here each particle's weights go into a histogram of their
  float32 bit patterns (monotonic in the value; 4,096 bins of 1/16 of an octave), the walk runs
  over the bins from the top, and only the bin where the sum crosses the target is sorted.
- the noise and scale sums of the M-step: ``Σ_t Re(X_t · conj Q_t)`` and ``Σ_t w_t |X_t|²`` per
  particle and pixel, read straight from the shifted images, with no gathered copies.

Used for NumPy arrays only; CuPy arrays keep the array expressions of :mod:`cryodask.em.estep`.
"""

from __future__ import annotations

import numpy as np
from numba import njit

#: bins of the float32 bit pattern (sign 0, 8 exponent bits, the top 4 mantissa bits)
_SHIFT = 19
_N_BINS = 1 << (31 - _SHIFT)


@njit(cache=True, nogil=True)
def _bin_sorted(w, bits, i, b, buf):
    """The positive weights of row ``i`` in bin ``b``, ascending (a view of ``buf``)."""
    k = 0
    for j in range(w.shape[1]):
        if w[i, j] > 0 and (bits[i, j] >> _SHIFT) == b:
            buf[k] = w[i, j]
            k += 1
    return np.sort(buf[:k])


@njit(cache=True, nogil=True)
def _significance_rows(w, bits, total, fraction, maxsig, n_taken, threshold):
    n, m = w.shape
    hist_sum = np.empty(_N_BINS, np.float64)
    hist_cnt = np.empty(_N_BINS, np.int64)
    buf = np.empty(m, w.dtype)
    for i in range(n):
        hist_sum[:] = 0.0
        hist_cnt[:] = 0
        smallest = np.inf
        for j in range(m):
            v = w[i, j]
            if v > 0:
                b = bits[i, j] >> _SHIFT
                hist_sum[b] += v
                hist_cnt[b] += 1
                if v < smallest:
                    smallest = v
        target = fraction * total[i]
        acc = 0.0
        taken = 0
        thr = -1.0
        for b in range(_N_BINS - 1, -1, -1):
            if hist_cnt[b] == 0:
                continue
            if acc + hist_sum[b] <= target:
                acc += hist_sum[b]
                taken += hist_cnt[b]
                continue
            # the sum crosses the target inside this bin: walk its values in descending order
            vals = _bin_sorted(w, bits, i, b, buf)
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
        if maxsig > 0 and taken > maxsig:  # the maxsig-th largest weight
            taken = maxsig
            above = 0
            for b in range(_N_BINS - 1, -1, -1):
                if above + hist_cnt[b] < maxsig:
                    above += hist_cnt[b]
                    continue
                vals = _bin_sorted(w, bits, i, b, buf)
                thr = vals[len(vals) - 1 - (maxsig - above - 1)]
                break
        n_taken[i] = taken
        threshold[i] = thr


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
        _significance_rows(w, w.view(np.int32), np.asarray(total, np.float64), float(adaptive_fraction),
                           int(maxsig), n_taken, threshold)
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


@njit(cache=True, nogil=True)
def _posterior_rows(diff2, lpo, lpt, cls, max_exponent, w, min_rel, top, total):
    n_i, n_r, n_t = diff2.shape
    po = lpo.shape[0] > 1
    pt = lpt.shape[0] > 1
    for i in range(n_i):
        io = i if po else 0
        it = i if pt else 0
        # pass 1: min diff2 and max (log prior − diff2) over the samples with a finite diff2 and prior
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
        if not np.isfinite(lo):
            top[i] = 0.0
            total[i] = 0.0
            w[i] = 0.0
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
        # pass 2: w = exp(lw − top), RELION's cut at diff2 − min > 700
        s = 0.0
        for r in range(n_r):
            a = lpo[io, r]
            c = cls[r]
            for t in range(n_t):
                d = diff2[i, r, t]
                p = a + lpt[it, c, t]
                v = 0.0
                if np.isfinite(d) and np.isfinite(p) and d - lo <= max_exponent:
                    v = np.exp((p - d) - hi)
                w[i, r, t] = v
                s += v
        total[i] = s


def posterior_exp(diff2: np.ndarray, lpo: np.ndarray, lpt: np.ndarray, cls: np.ndarray,
                  max_exponent: float) -> tuple[np.ndarray, np.ndarray, np.ndarray, np.ndarray]:
    """Unnormalised posterior of a float32 ``diff2`` (N_i, N_r, N_t) with the log prior
    ``lpo[i, r] + lpt[i, cls[r], t]`` (a first axis of 1 is shared by all particles).

    Returns ``(w, min_rel, top, total)``: ``w = exp(lw − top)`` with ``lw = log prior − (diff2 − min)``
    (0 for a non-finite diff2 or prior and beyond ``max_exponent``), the per-particle min diff2
    over the samples with a finite prior (+inf: none), the largest ``lw`` and ``Σ w`` (float64).
    """
    n_i = diff2.shape[0]
    w = np.empty(diff2.shape, np.float32)
    min_rel, top, total = np.empty(n_i), np.empty(n_i), np.empty(n_i)
    _posterior_rows(np.ascontiguousarray(diff2), np.ascontiguousarray(lpo, np.float64),
                    np.ascontiguousarray(lpt, np.float64), np.asarray(cls, np.int64), float(max_exponent),
                    w, min_rel, top, total)
    return w, min_rel, top, total


@njit(cache=True, nogil=True)
def _weight_matrix(w, act, cols, out):
    n_t = w.shape[2]
    for a in range(act.shape[0]):
        r = act[a]
        for c in range(cols.shape[0]):
            i = cols[c] // n_t
            out[a, c] = w[i, r, cols[c] - i * n_t]


def weight_matrix(w: np.ndarray, act: np.ndarray, cols: np.ndarray) -> np.ndarray:
    """``out[a, c] = w[i, act[a], t]`` for the (particle, translation) rows ``cols[c] = i·N_t + t`` of
    ``w`` (N_i, N_r, N_t): the M-step's weight matrix, without the transposed copies."""
    out = np.empty((len(act), len(cols)), w.dtype)
    _weight_matrix(np.ascontiguousarray(w), np.asarray(act, np.int64), np.asarray(cols, np.int64), out)
    return out


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
