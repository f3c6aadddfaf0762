"""The E-step kernel against direct loops over RELION's formulas (small sizes, float64 references)."""

from __future__ import annotations

from functools import partial

import numpy as np
import pytest

from cryodask.backend import gpu_available
from cryodask.em import estep
from cryodask.em.estep import (
    cross_correlation,
    gaussian_log_prior_trans,
    hermitian_multiplicity,
    inv_sigma2_from_sigma2,
    log_sigma2_term,
    mstep_sums,
    offset_prior_diff2,
    phase_ramps,
    posterior_weights,
    precompute_shifted,
    score_two_pass,
    scoring_terms,
    significant_coarse,
    squared_differences,
)

BOX = 16
RADIUS = 6


def half_plane_window(box: int = BOX, radius: float = RADIUS, *, keep_origin: bool = False):
    """(kx, ky) of the Hermitian-half pixels inside ``radius`` (rfft2 layout: kx ≥ 0, ky signed)."""
    ky, kx = np.meshgrid(np.fft.fftfreq(box, 1 / box).astype(int), np.arange(box // 2 + 1), indexing="ij")
    inside = kx**2 + ky**2 <= radius**2
    if not keep_origin:
        inside &= (kx != 0) | (ky != 0)
    rows, cols = np.nonzero(inside)
    return np.stack([kx[rows, cols], ky[rows, cols]], axis=1), (rows, cols)


def make_problem(rng, n_i=4, n_r=7, n_t=5, sigma_scale=4.0):
    freqs, _ = half_plane_window()
    k = freqs.shape[0]
    X = (rng.normal(size=(n_i, k)) + 1j * rng.normal(size=(n_i, k)))
    P = (rng.normal(size=(n_r, k)) + 1j * rng.normal(size=(n_r, k)))
    ctf = rng.uniform(-1, 1, size=(n_i, k))
    sigma2 = rng.uniform(0.5, 1.5, size=k) * sigma_scale
    scale = rng.uniform(0.8, 1.2, size=n_i)
    trans = rng.uniform(-2, 2, size=(n_t, 2))
    ramps = phase_ramps(freqs, trans, BOX, double=True)
    highres = rng.uniform(0, 10, size=n_i)
    return dict(freqs=freqs, X=X, P=P, ctf=ctf, sigma2=sigma2, scale=scale, trans=trans, ramps=ramps,
                highres=highres, n_i=n_i, n_r=n_r, n_t=n_t)


def loop_diff2(p, multiplicity=None, with_highres=True):
    """RELION's diff2 by a direct loop over (i, r, t), float64."""
    m = np.ones(p["X"].shape[1]) if multiplicity is None else multiplicity
    inv_s2 = 1.0 / p["sigma2"]
    out = np.empty((p["n_i"], p["n_r"], p["n_t"]))
    for i in range(p["n_i"]):
        for r in range(p["n_r"]):
            A = p["scale"][i] * p["ctf"][i] * p["P"][r]
            for t in range(p["n_t"]):
                Xt = p["X"][i] * p["ramps"][t]
                out[i, r, t] = np.sum(m * np.abs(A - Xt) ** 2 * inv_s2) / 2
            if with_highres:
                out[i, r, :] += p["highres"][i] / 2
    return out


def loop_weights(diff2, lp):
    """Normalised RELION weights from a float64 diff2 and log prior (N_i, N_r, N_t)."""
    w = np.zeros_like(diff2)
    ll = np.empty(diff2.shape[0])
    for i in range(diff2.shape[0]):
        d = diff2[i] - diff2[i].min()
        e = np.where(d > 700, 0.0, np.exp(-d)) * np.exp(lp[i])
        w[i] = e / e.sum()
        ll[i] = np.log(e.sum()) - diff2[i].min()
    return w, ll


def reference_significance(weights, fraction, maxsig):
    """RELION's CPU loop: descending walk over the positive weights of each particle."""
    n = weights.shape[0]
    flat = weights.reshape(n, -1)
    mask = np.zeros_like(flat, dtype=bool)
    nsig = np.zeros(n, dtype=int)
    thr = np.zeros(n)
    for i in range(n):
        pos = np.sort(flat[i][flat[i] > 0])
        total = pos.sum()
        frac_w, count, sig_w = 0.0, 0, 0.0
        for j in range(pos.size - 1, -1, -1):
            if maxsig > 0:
                if count < maxsig:
                    count += 1
                    sig_w = pos[j]
            else:
                count += 1
                sig_w = pos[j]
            frac_w += pos[j]
            if frac_w > fraction * total:
                break
        nsig[i], thr[i] = count, sig_w
        mask[i] = (flat[i] >= sig_w) & (flat[i] > 0)
    return mask.reshape(weights.shape), nsig, thr


# ---------------------------------------------------------------------------------------------
def test_phase_ramps_shift_image_by_minus_t(rng):
    img = rng.normal(size=(BOX, BOX))
    freqs, (rows, cols) = half_plane_window(radius=BOX, keep_origin=True)
    F = np.fft.rfft2(img)[rows, cols]
    t = np.array([[3, -2], [0, 5]])  # (tx, ty)
    ramps = phase_ramps(freqs, t, BOX, double=True)
    for j, (tx, ty) in enumerate(t):
        rolled = np.roll(np.roll(img, -ty, axis=0), -tx, axis=1)
        np.testing.assert_allclose(F * ramps[j], np.fft.rfft2(rolled)[rows, cols], atol=1e-9)
    shifted = precompute_shifted(F[None], ramps, double=True)
    np.testing.assert_allclose(shifted[1], F * ramps[1])


def test_inv_sigma2_handles_zero_inf_nan():
    out = inv_sigma2_from_sigma2(np.array([2.0, 0.0, np.inf, np.nan, -1.0, 0.5]))
    np.testing.assert_array_equal(out, [0.5, 0, 0, 0, 0, 2.0])


@pytest.mark.parametrize("double", [False, True])
@pytest.mark.parametrize("rule", ["relion", "full"])
def test_squared_differences_match_loop(rng, double, rule):
    p = make_problem(rng)
    m = hermitian_multiplicity(p["freqs"][:, 0], BOX, rule=rule)
    ref = loop_diff2(p, multiplicity=m)
    Xs = precompute_shifted(p["X"], p["ramps"], double=double)
    kw = dict(ctf=p["ctf"], inv_sigma2=1 / p["sigma2"], n_trans=p["n_t"], scale=p["scale"],
              multiplicity=m, highres_Xi2=p["highres"], double=double)
    d = squared_differences(Xs, p["P"], **kw)
    assert d.dtype == (np.float64 if double else np.float32)
    np.testing.assert_allclose(d, ref, rtol=1e-4 if not double else 1e-10)
    # Without the per-particle constant, which ScoringTerms keeps in float64.
    terms = scoring_terms(Xs, **kw)
    rel = squared_differences(terms, p["P"], include_constant=False)
    np.testing.assert_allclose(rel + terms.constant[:, None, None], ref, rtol=1e-5 if not double else 1e-12)
    # The rows of diff2 differ by a lot less than diff2 itself: check them on their own scale.
    span = (ref - ref.min(axis=(1, 2), keepdims=True)).max()
    np.testing.assert_allclose(rel - rel.min(axis=(1, 2), keepdims=True),
                               ref - ref.min(axis=(1, 2), keepdims=True), atol=2e-5 * span if not double else 1e-9)
    if rule == "full":  # kx > 0 pixels count twice
        assert terms.constant[0] > scoring_terms(Xs, **{**kw, "multiplicity": None}).constant[0]


def test_blocked_orientation_axis_is_identical(rng):
    p = make_problem(rng, n_r=23)
    Xs = precompute_shifted(p["X"], p["ramps"])
    kw = dict(ctf=p["ctf"], inv_sigma2=1 / p["sigma2"], n_trans=p["n_t"], scale=p["scale"])
    whole = squared_differences(Xs, p["P"], **kw)
    terms = scoring_terms(Xs, **kw)
    out = np.empty_like(whole)
    for r0 in range(0, 23, 5):  # caller-side blocking into slices of one output array
        estep.score_terms(terms, p["P"][r0:r0 + 5], out=out[:, r0:r0 + 5, :])
    np.testing.assert_allclose(out, whole, rtol=1e-6)
    # Blocks of particles and orientations inside score_terms: a budget of one particle's row of one
    # orientation forces the smallest blocks (64 orientations, a few particles).
    n_i, n_t = p["X"].shape[0], p["n_t"]
    assert estep._gemm_blocks(n_i, n_t, 23, 4, 1) == (min(n_i, -(-estep._MIN_GEMM_ROWS // n_t)), 23)
    assert estep._gemm_blocks(100, 2, 1000, 4, 1) == (100, 64)
    assert estep._gemm_blocks(100, 2, 1000, 4, 1 << 30) == (100, 1000)
    many = make_problem(rng, n_i=60, n_r=150)  # > 64 orientations, > 256 rows: blocks of both
    Xm = precompute_shifted(many["X"], many["ramps"])
    kwm = dict(ctf=many["ctf"], inv_sigma2=1 / many["sigma2"], n_trans=many["n_t"], scale=many["scale"])
    assert estep._gemm_blocks(60, many["n_t"], 150, 4, 1) == (52, 64)
    tm = scoring_terms(Xm, **kwm)
    big = estep.score_terms(tm, many["P"])
    small = estep.score_terms(tm, many["P"], block_bytes=1)
    np.testing.assert_allclose(small, big, rtol=1e-6)
    tc = scoring_terms(Xm, **{**kwm, "mode": "cc"})
    np.testing.assert_allclose(estep.score_terms(tc, many["P"], block_bytes=1), estep.score_terms(tc, many["P"]),
                               rtol=1e-5, atol=1e-7)


def test_full_multiplicity_equals_full_plane_sum(rng):
    """With rule='full', the half-plane sum equals the sum over every pixel of the full transform."""
    n = BOX
    x = rng.normal(size=(n, n))
    proj = rng.normal(size=(n, n))
    Xf, Pf = np.fft.fft2(x) / n**2, np.fft.fft2(proj) / n**2  # RELION: forward FFT divided by N
    ky, kx = np.meshgrid(np.fft.fftfreq(n, 1 / n), np.fft.fftfreq(n, 1 / n), indexing="ij")
    r = np.hypot(kx, ky)
    window = (r <= RADIUS) & (r > 0)
    ctf = np.cos(0.3 * r**2)  # centrosymmetric
    sigma2 = 1e-4 * (1 + r)
    s = 0.9
    full = np.sum((np.abs(s * ctf * Pf - Xf) ** 2 / (2 * sigma2))[window])

    freqs, (rows, cols) = half_plane_window(n, RADIUS)
    Xh = (np.fft.rfft2(x) / n**2)[rows, cols]
    Ph = (np.fft.rfft2(proj) / n**2)[rows, cols]
    rh = np.hypot(freqs[:, 0], freqs[:, 1])
    m = hermitian_multiplicity(freqs[:, 0], n, rule="full")
    d = squared_differences(Xh[None], Ph[None], ctf=np.cos(0.3 * rh**2)[None], inv_sigma2=1 / (1e-4 * (1 + rh)),
                            n_trans=1, scale=s, multiplicity=m, double=True)
    np.testing.assert_allclose(d[0, 0, 0], full, rtol=1e-12)
    # RELION's own rule (each stored pixel once): the kx > 0 half counts once, the kx = 0 column
    # (stored with both Friedel mates) fully, i.e. (full + column)/2.
    d1 = squared_differences(Xh[None], Ph[None], ctf=np.cos(0.3 * rh**2)[None], inv_sigma2=1 / (1e-4 * (1 + rh)),
                             n_trans=1, scale=s, double=True)
    column = np.sum((np.abs(s * ctf * Pf - Xf) ** 2 / (2 * sigma2))[window & (kx == 0)])
    np.testing.assert_allclose(d1[0, 0, 0], (full + column) / 2, rtol=1e-12)


@pytest.mark.parametrize("double", [False, True])
def test_weights_with_priors_match_float64_bruteforce(rng, double):
    p = make_problem(rng)
    ref_d2 = loop_diff2(p)
    lpo = np.log(rng.dirichlet(np.ones(p["n_r"])))
    old = rng.uniform(-1, 1, size=(p["n_i"], 2))
    prior_c = rng.uniform(-1, 1, size=(p["n_i"], 2))
    lpt = gaussian_log_prior_trans(p["trans"], old, prior_c, sigma_offset=3.0, angpix=1.5)
    lp = lpo[None, :, None] + lpt[:, None, :]
    ref_w, ref_ll = loop_weights(ref_d2, lp)

    Xs = precompute_shifted(p["X"], p["ramps"], double=double)
    terms = scoring_terms(Xs, ctf=p["ctf"], inv_sigma2=1 / p["sigma2"], n_trans=p["n_t"], scale=p["scale"],
                          highres_Xi2=p["highres"], double=double)
    d2 = squared_differences(terms, p["P"], include_constant=False)
    logsig = log_sigma2_term(1 / p["sigma2"])
    post = posterior_weights(d2, log_prior_orient=lpo, log_prior_trans=lpt, diff2_offset=terms.constant,
                             logsigma2=logsig)
    # the weights span several decades here; all of them agree to 1e-4 relative
    assert ref_w.max() / ref_w.min() > 1e3
    np.testing.assert_allclose(post.weights, ref_w, rtol=1e-4 if not double else 1e-9)
    np.testing.assert_allclose(post.weights.sum(axis=(1, 2)), 1, rtol=1e-5)
    np.testing.assert_allclose(post.pmax, ref_w.reshape(p["n_i"], -1).max(1), rtol=1e-4)
    best = ref_w.reshape(p["n_i"], -1).argmax(1)
    np.testing.assert_array_equal(post.best_orientation, best // p["n_t"])
    np.testing.assert_array_equal(post.best_translation, best % p["n_t"])
    np.testing.assert_allclose(post.min_diff2, ref_d2.reshape(p["n_i"], -1).min(1), rtol=1e-6)
    np.testing.assert_allclose(post.log_likelihood, ref_ll - np.log(2 * np.pi * p["sigma2"]).sum(), rtol=1e-5)
    mask, nsig, thr = reference_significance(ref_w, 0.999, -1)
    np.testing.assert_array_equal(post.significant, mask)
    np.testing.assert_array_equal(post.n_significant, nsig)
    assert not post.failed.any()


def test_local_search_prior_per_particle_and_per_class_translation_prior(rng):
    p = make_problem(rng)
    d2 = loop_diff2(p)
    lpo = np.where(rng.uniform(size=(p["n_i"], p["n_r"])) < 0.4, -np.inf, 0.0)  # local search windows
    lpo[:, 0] = 0.0
    orient_class = np.array([0, 0, 0, 1, 1, 1, 1])
    lpt = rng.normal(size=(p["n_i"], 2, p["n_t"]))  # 2D: a prior centre per class
    post = posterior_weights(d2, log_prior_orient=lpo, log_prior_trans=lpt, orient_class=orient_class)
    lp = lpo[:, :, None] + lpt[:, orient_class, :]
    ref = np.zeros_like(d2)
    for i in range(p["n_i"]):
        ok = np.isfinite(lp[i])
        dmin = d2[i][ok].min()  # min over samples with a non-zero prior
        e = np.where(ok, np.exp(-(d2[i] - dmin) + np.where(ok, lp[i], 0)), 0)
        ref[i] = e / e.sum()
    np.testing.assert_allclose(post.weights, ref, rtol=1e-9, atol=1e-300)
    assert (post.weights[np.broadcast_to(~np.isfinite(lpo)[:, :, None], d2.shape)] == 0).all()


def test_exponent_above_700_gives_zero_weight():
    d2 = np.array([[[0.0, 699.0, 700.5, np.inf]]])
    post = posterior_weights(d2)
    w = post.weights[0, 0]
    assert w[1] > 0 and w[1] == pytest.approx(np.exp(-699.0) / (1 + np.exp(-699.0)), rel=1e-12)
    assert w[2] == 0 and w[3] == 0
    # all-infinite particle: flagged, not NaN
    post = posterior_weights(np.full((2, 1, 2), np.inf))
    assert post.failed.all() and (post.weights == 0).all()


@pytest.mark.parametrize("dtype", [np.float64, np.float32])  # float32: the compiled kernel
@pytest.mark.parametrize("fraction", [0.999, 0.9, 0.5, 1.0, 1 - 1e-15])
@pytest.mark.parametrize("maxsig", [-1, 1, 3, 40])
def test_significance_matches_relion_rule(rng, fraction, maxsig, dtype):
    n, m = 6, 300
    w = np.empty((n, m))
    w[0] = np.exp(-rng.uniform(0, 30, m))  # peaked
    w[1] = rng.uniform(0.5, 1.0, m)  # flat: many significant
    w[2] = np.round(rng.uniform(0, 1, m), 1)  # ties and zeros
    w[3] = 0.0
    w[3, 7] = 1.0  # a single sample
    w[4] = np.exp(-rng.uniform(0, 3, m)) * (rng.uniform(size=m) < 0.2)  # mostly zeros
    w[5] = 1.0 / m  # all equal
    w /= np.maximum(w.sum(1, keepdims=True), 1e-300)
    w3 = w.reshape(n, 20, 15).astype(dtype)
    mask, nsig, thr = significant_coarse(w3, fraction, maxsig)
    rmask, rnsig, rthr = reference_significance(w3.astype(np.float64), fraction, maxsig)
    np.testing.assert_array_equal(nsig, rnsig)
    np.testing.assert_array_equal(thr, rthr)
    np.testing.assert_array_equal(mask, rmask)
    assert mask[3].sum() == 1 and nsig[3] == 1
    if maxsig == -1 and fraction < 1:
        w64 = w3.astype(np.float64)
        kept = (w64 * mask).sum(axis=(1, 2))
        assert (kept > fraction * w64.sum(axis=(1, 2)) - 1e-12).all()
    if fraction == 1.0 and maxsig == -1:
        np.testing.assert_array_equal(mask, w3 > 0)


@pytest.mark.parametrize("maxsig", [-1, 2, 5])
def test_significance_on_peaked_rows_gathers_candidates(rng, maxsig):
    # few candidates per row: the gather-and-sort branch, with rows of different lengths
    n, m = 40, 2000
    w = np.exp(-rng.uniform(0, 400, size=(n, m))).astype(np.float32)
    w[:, :4] = rng.uniform(0.1, 1, size=(n, 4))
    w[::3, 4:12] = 0.3  # ties in some rows
    w /= w.sum(1, keepdims=True)
    cut = 0.5 * 0.001 / m
    assert (w >= cut).sum() * 8 < w.size
    mask, nsig, thr = significant_coarse(w, 0.999, maxsig)
    rmask, rnsig, rthr = reference_significance(w.astype(np.float64), 0.999, maxsig)
    np.testing.assert_array_equal(nsig, rnsig)
    np.testing.assert_array_equal(mask, rmask)
    np.testing.assert_allclose(thr, rthr, rtol=1e-6)


@pytest.fixture(params=["short_rows", "long_rows"])
def row_path(request, monkeypatch):
    """Run a test through both paths of the compiled posterior: rows a few particles at a time, and long rows
    in blocks (forced here with blocks of a few orientations, so that rows span many blocks)."""
    from cryodask.em import kernels

    if request.param == "long_rows":
        monkeypatch.setattr(kernels, "_LONG_ROW", 0)
        monkeypatch.setattr(kernels, "_BLOCK_SAMPLES", 20)
    return request.param


@pytest.mark.parametrize("prior_form", ["none", "shared", "per_particle", "per_class", "wide"])
def test_compiled_float32_posterior_matches_the_float64_path(rng, prior_form, row_path):
    # float32 NumPy diff2 goes through the compiled kernel; float64 through the array expressions
    n_i, n_c, n_r1, n_t = 5, 3, 8, 6
    n_r = n_c * n_r1
    d2 = rng.uniform(0, 40, size=(n_i, n_r, n_t))
    d2[0, :, 2] = np.inf  # samples not evaluated (a fine pass)
    d2[3] = np.inf  # a particle with nothing evaluated
    orient_class = np.repeat(np.arange(n_c), n_r1)
    lpo = lpt = None
    if prior_form == "shared":
        lpo, lpt = rng.normal(size=n_r), -rng.uniform(0, 3, n_t)
    elif prior_form == "per_particle":
        lpo = rng.normal(size=(n_i, n_r))
        lpo[1, :5] = -np.inf  # outside a local search
        lpt = -rng.uniform(0, 3, (n_i, n_t))
    elif prior_form in ("per_class", "wide"):
        lpo = np.log(rng.uniform(0.1, 1, n_r))
        lpt = -rng.uniform(0, 3, (n_i, n_c, n_t))
        if prior_form == "wide":  # priors over 700 log units: RELION's cut at diff2 − min > 700 matters
            d2[2, n_r1:2 * n_r1, :] = rng.uniform(750, 800, size=(n_r1, n_t))  # class 1: all beyond the cut
            lpt[2, 1, :] = 1500.0  # but the prior would make them the best
    kw = dict(log_prior_orient=lpo, log_prior_trans=lpt, orient_class=orient_class, adaptive_fraction=0.99,
              diff2_offset=rng.uniform(0, 5, n_i), logsigma2=rng.uniform(0, 1, n_i))
    ref = posterior_weights(d2, **kw)
    got = posterior_weights(d2.astype(np.float32), **kw)
    assert got.weights.dtype == np.float32
    np.testing.assert_allclose(got.weights, ref.weights, rtol=2e-4, atol=1e-7)
    np.testing.assert_array_equal(got.failed, ref.failed)
    ok = ~ref.failed
    np.testing.assert_allclose(got.min_diff2[ok], ref.min_diff2[ok], rtol=1e-6)
    np.testing.assert_allclose(got.log_likelihood[ok], ref.log_likelihood[ok], rtol=1e-5, atol=1e-4)
    np.testing.assert_array_equal(got.best_orientation[ok], ref.best_orientation[ok])
    np.testing.assert_array_equal(got.n_significant, ref.n_significant)
    np.testing.assert_array_equal(got.significant, ref.significant)
    np.testing.assert_allclose(got.significant_weight, ref.significant_weight, rtol=2e-4)
    np.testing.assert_allclose(got.pmax, ref.pmax, rtol=2e-4)
    np.testing.assert_allclose(got.log_sum_weight[ok], ref.log_sum_weight[ok], rtol=1e-5, atol=1e-5)
    assert (got.weights[3] == 0).all() and got.failed[3] and not got.significant[3].any()
    if prior_form == "wide":  # the cut leaves the samples 700 beyond the minimum at 0 although their prior is high
        cut = d2[2] - d2[2].min() > 700
        assert (got.weights[2][cut] == 0).all() and got.weights[2][~cut].sum() == pytest.approx(1, rel=1e-5)


def test_compiled_posterior_on_peaked_rows_matches_the_separate_steps(rng, row_path):
    # Long rows spread over thousands of diff2 units: most samples lie below float32's smallest normal
    # weight, stored as 0. The kernel's weights, significance and best sample must equal the steps done
    # one after another (float64 exp, normalise in float64, cast, significant_coarse, argmax).
    n_i, n_r, n_t = 6, 700, 9
    d2 = rng.uniform(0, 3000, size=(n_i, n_r, n_t))
    d2[:, :40, :] = rng.uniform(0, 60, size=(n_i, 40, n_t))  # a broad peak: dozens of significant samples
    d2[1, 5, 3] = -200.0  # one dominant sample
    lpt = -rng.uniform(0, 3, (n_i, n_t))
    got = posterior_weights(d2.astype(np.float32), log_prior_trans=lpt)
    d32 = d2.astype(np.float32).astype(np.float64)
    lw = lpt[:, None, :] - (d32 - d32.reshape(n_i, -1).min(1)[:, None, None])
    lw[d32 - d32.reshape(n_i, -1).min(1)[:, None, None] > 700] = -np.inf
    e = np.exp(lw - lw.reshape(n_i, -1).max(1)[:, None, None])
    tiny = np.finfo(np.float32).tiny
    e[e < tiny] = 0
    q = e * (1.0 / e.reshape(n_i, -1).sum(1))[:, None, None]
    w = np.where(q >= tiny, q, 0).astype(np.float32)
    # the long-row path sums the total by blocks: its weights may differ from the one-pass sum's in the last bit
    exact = np.testing.assert_array_equal if row_path == "short_rows" else partial(
        np.testing.assert_allclose, rtol=2.5e-7, atol=0)
    exact(got.weights, w)
    assert (w == 0).mean() > 0.5 and ((q > 0) & (q < tiny)).any()  # the floors were exercised
    mask, nsig, thr = significant_coarse(w, 0.999, -1)
    np.testing.assert_array_equal(got.significant, mask)
    np.testing.assert_array_equal(got.n_significant, nsig)
    assert nsig[0] > 30 and nsig[1] == 1
    np.testing.assert_array_equal(got.best_orientation * n_t + got.best_translation, w.reshape(n_i, -1).argmax(1))
    # the chunk tasks let the weights overwrite diff2: same posterior, no second array
    d32 = d2.astype(np.float32)
    again = posterior_weights(d32, log_prior_trans=lpt, overwrite_diff2=True)
    assert np.shares_memory(again.weights, d32)
    exact(again.weights, w)
    np.testing.assert_array_equal(again.significant, mask)
    np.testing.assert_array_equal(again.min_diff2, got.min_diff2)


def test_significance_on_float32_posterior_is_stable(rng):
    # a long row: only a prefix gets sorted, the answer must not change
    w = np.exp(-rng.exponential(8, size=(3, 50000))).astype(np.float32)
    w /= w.sum(1, keepdims=True)
    mask, nsig, thr = significant_coarse(w, 0.999, -1)
    rmask, rnsig, rthr = reference_significance(w.astype(np.float64), 0.999, -1)
    np.testing.assert_array_equal(nsig, rnsig)
    np.testing.assert_array_equal(mask, rmask)


def test_cross_correlation_mode_matches_direct_formula_and_hard_assignment(rng):
    p = make_problem(rng)
    m = hermitian_multiplicity(p["freqs"][:, 0], BOX, rule="full")
    Xs = precompute_shifted(p["X"], p["ramps"])
    cc = cross_correlation(Xs, p["P"], ctf=p["ctf"], n_trans=p["n_t"], multiplicity=m)
    ref = np.empty((p["n_i"], p["n_r"], p["n_t"]))
    for i in range(p["n_i"]):
        for r in range(p["n_r"]):
            A = p["ctf"][i] * p["P"][r]
            for t in range(p["n_t"]):
                Xt = p["X"][i] * p["ramps"][t]
                ref[i, r, t] = -np.sum(m * np.real(A * np.conj(Xt))) / (
                    np.sqrt(np.sum(m * np.abs(A) ** 2)) * np.sqrt(np.sum(m * np.abs(Xt) ** 2)))
    np.testing.assert_allclose(cc, ref, rtol=1e-4, atol=1e-6)
    assert (np.abs(ref) <= 1).all()
    # the scale does not matter in CC
    terms = scoring_terms(Xs, ctf=p["ctf"], inv_sigma2=1.0, n_trans=p["n_t"], scale=7.0, multiplicity=m, mode="cc")
    np.testing.assert_allclose(cross_correlation(terms, p["P"]), cc, rtol=1e-6)
    # hard assignment, priors ignored
    post = posterior_weights(cc, log_prior_orient=np.log(np.full(p["n_r"], 1 / p["n_r"])), mode="cc")
    best = ref.reshape(p["n_i"], -1).argmin(1)
    flat = post.weights.reshape(p["n_i"], -1)
    np.testing.assert_array_equal(flat.argmax(1), best)
    np.testing.assert_array_equal(flat.sum(1), 1)
    np.testing.assert_array_equal((flat > 0).sum(1), 1)
    np.testing.assert_array_equal(post.n_significant, 1)
    np.testing.assert_array_equal(post.pmax, 1)
    np.testing.assert_allclose(post.log_likelihood, -ref.reshape(p["n_i"], -1).min(1), rtol=1e-4)


def test_planted_signal_recovers_pose(rng):
    freqs, _ = half_plane_window()
    k = freqs.shape[0]
    n_i, n_r = 10, 30
    grid = np.array([(x, y) for x in (-2, -1, 0, 1, 2) for y in (-2, 0, 2)], dtype=float)
    P = rng.normal(size=(n_r, k)) + 1j * rng.normal(size=(n_r, k))
    ctf = np.cos(0.05 * (freqs**2).sum(1))[None] * rng.uniform(0.8, 1.2, size=(n_i, 1))
    scale = rng.uniform(0.8, 1.2, size=n_i)
    r0 = rng.integers(0, n_r, n_i)
    t0 = rng.integers(0, len(grid), n_i)
    # particle = s·CTF·P_r0 moved by +t0, plus noise; scoring moves it back by -t.
    back = phase_ramps(freqs, -grid, BOX, double=True)
    X = scale[:, None] * ctf * P[r0] * back[t0] + 0.3 * (rng.normal(size=(n_i, k)) + 1j * rng.normal(size=(n_i, k)))
    ramps = phase_ramps(freqs, grid, BOX)
    Xs = precompute_shifted(X, ramps)
    d2 = squared_differences(Xs, P, ctf=ctf, inv_sigma2=np.full(k, 1 / 0.09), n_trans=len(grid), scale=scale,
                             include_constant=False)
    post = posterior_weights(d2)
    np.testing.assert_array_equal(post.best_orientation, r0)
    np.testing.assert_array_equal(post.best_translation, t0)
    assert (post.pmax > 0.99).all()
    np.testing.assert_array_equal(post.n_significant, 1)


@pytest.mark.parametrize("double", [False, True])
def test_mstep_sums_match_loops(rng, double):
    p = make_problem(rng)
    n_i, n_r, n_t = p["n_i"], p["n_r"], p["n_t"]
    w = rng.dirichlet(np.ones(n_r * n_t), size=n_i).reshape(n_i, n_r, n_t)
    w[:, 2, :] = 0  # an orientation nobody uses
    w[1, :, 3] = 0  # a translation one particle never takes
    sig = rng.uniform(size=w.shape) < 0.8
    Xm = p["X"] * rng.uniform(0.5, 1.0, size=p["X"].shape)  # "masked" images differ from unmasked
    group = np.array([0, 1, 1, 0])
    inv_s2 = 1 / p["sigma2"]
    old = rng.uniform(-1, 1, size=(n_i, 2))
    od2 = offset_prior_diff2(p["trans"], old, angpix=1.3)

    Xs = precompute_shifted(p["X"], p["ramps"], double=double)
    Xms = precompute_shifted(Xm, p["ramps"], double=double)
    out = mstep_sums(w, Xs, p["P"], ctf=p["ctf"], inv_sigma2=inv_s2, n_trans=n_t, scale=p["scale"],
                     X_shifted_masked=Xms, significant=sig, group=group, n_groups=2, offset_diff2=od2,
                     double=double)

    k = p["X"].shape[1]
    data = np.zeros((n_r, k), complex)
    weight = np.zeros((n_r, k))
    s2n = np.zeros((2, k))
    XA = np.zeros((2, k))
    AA = np.zeros((2, k))
    wd = np.zeros(n_i)
    soff = 0.0
    ws = w * sig
    for i in range(n_i):
        s, c = p["scale"][i], p["ctf"][i]
        for r in range(n_r):
            A = s * c * p["P"][r]
            for t in range(n_t):
                wt = ws[i, r, t]
                if wt == 0:
                    continue
                Xt = p["X"][i] * p["ramps"][t]
                Xmt = Xm[i] * p["ramps"][t]
                data[r] += wt * s * c * Xt * inv_s2
                weight[r] += wt * s * s * c * c * inv_s2
                diff = np.abs(Xmt - A) ** 2
                s2n[group[i]] += wt * diff
                XA[group[i]] += wt * np.real(Xmt * np.conj(A))
                AA[group[i]] += wt * np.abs(A) ** 2
                wd[i] += wt * diff.sum()
                soff += wt * od2[i, t]
    used = np.nonzero(ws.sum(axis=(0, 2)) > 0)[0]
    assert 2 not in used
    np.testing.assert_array_equal(out.orientations, used)
    tol = dict(rtol=1e-4, atol=1e-5) if not double else dict(rtol=1e-10, atol=1e-12)
    np.testing.assert_allclose(out.data, data[used], **{**tol, "atol": tol["atol"] * np.abs(data).max()})
    np.testing.assert_allclose(out.weight, weight[used], **{**tol, "atol": tol["atol"] * weight.max()})
    np.testing.assert_allclose(out.sigma2_noise, s2n, **{**tol, "atol": tol["atol"] * s2n.max()})
    np.testing.assert_allclose(out.signal_product, XA, **{**tol, "atol": tol["atol"] * np.abs(XA).max()})
    np.testing.assert_allclose(out.reference_power, AA, **{**tol, "atol": tol["atol"] * AA.max()})
    np.testing.assert_allclose(out.wdiff2, wd, rtol=tol["rtol"])
    np.testing.assert_allclose(out.sum_weight, ws.sum(axis=(1, 2)), rtol=1e-6)
    np.testing.assert_allclose(out.orientation_weight, ws.sum(axis=(0, 2)), rtol=1e-6)
    np.testing.assert_allclose(out.translation_weight, ws.sum(axis=1), rtol=1e-6)
    np.testing.assert_allclose(out.group_weight, [ws[group == g].sum() for g in (0, 1)], rtol=1e-6)
    assert out.class_weight == pytest.approx(ws.sum(), rel=1e-6)
    assert out.sigma2_offset == pytest.approx(soff, rel=1e-6)


def test_mstep_sums_of_stacked_classes_equal_the_per_class_sums(rng):
    """One call over the projections of all classes (``orient_class``) gives the per-class calls' slices,
    the sums over pixels and particles added over classes, and the translation sums of each class."""
    n_c, n_r1 = 3, 4
    p = make_problem(rng, n_i=6, n_r=n_c * n_r1, n_t=5)
    n_i, n_r, n_t = p["n_i"], p["n_r"], p["n_t"]
    w = rng.dirichlet(np.ones(n_r * n_t), size=n_i).reshape(n_i, n_r, n_t).astype(np.float32)
    w[:2, n_r1:2 * n_r1] = 0  # particles with no weight in a class
    w[:, 2 * n_r1:] = 0  # a class nobody takes
    sig = rng.uniform(size=w.shape) < 0.7
    Xs = precompute_shifted(p["X"], p["ramps"])
    Xms = precompute_shifted(p["X"] * rng.uniform(0.5, 1.0, size=p["X"].shape), p["ramps"])
    group = np.array([0, 1, 1, 0, 1, 0])
    od2 = rng.uniform(0, 5, size=(n_i, n_c, n_t))  # per-class prior offsets: per-class distances
    kw = dict(ctf=p["ctf"], inv_sigma2=1 / p["sigma2"], n_trans=n_t, scale=p["scale"], X_shifted_masked=Xms,
              group=group, n_groups=2)
    oc = np.repeat(np.arange(n_c), n_r1)
    allc = mstep_sums(w, Xs, p["P"], significant=sig, offset_diff2=od2, orient_class=oc, n_classes=n_c, **kw)
    per = [mstep_sums(w[:, c * n_r1:(c + 1) * n_r1], Xs, p["P"][c * n_r1:(c + 1) * n_r1],
                      significant=sig[:, c * n_r1:(c + 1) * n_r1], offset_diff2=od2[:, c], **kw) for c in range(n_c)]
    assert not len(per[2].orientations)
    np.testing.assert_array_equal(allc.orientations,
                                  np.concatenate([c * n_r1 + q.orientations for c, q in enumerate(per)]))
    np.testing.assert_allclose(allc.data, np.concatenate([q.data for q in per]), rtol=1e-4,
                               atol=1e-5 * np.abs(allc.data).max())
    np.testing.assert_allclose(allc.weight, np.concatenate([q.weight for q in per]), rtol=1e-5)
    for name in ("sigma2_noise", "signal_product", "reference_power", "wdiff2", "sum_weight", "group_weight"):
        a, b = getattr(allc, name), sum(getattr(q, name) for q in per)
        np.testing.assert_allclose(a, b, rtol=1e-4, atol=1e-5 * np.abs(b).max(), err_msg=name)
    np.testing.assert_allclose(allc.translation_weight, sum(q.translation_weight for q in per), rtol=1e-5)
    for c, q in enumerate(per):
        np.testing.assert_allclose(allc.class_translation_weight[:, c], q.translation_weight, rtol=1e-6)
    assert allc.class_translation_weight[:2, 1].sum() == 0
    assert allc.sigma2_offset == pytest.approx(sum(q.sigma2_offset for q in per), rel=1e-5)
    assert allc.class_weight == pytest.approx(sum(q.class_weight for q in per), rel=1e-6)


def test_class_presence():
    from cryodask.em.kernels import class_presence

    rng = np.random.default_rng(5)
    sig = np.zeros((4, 30, 70), bool)  # class blocks longer than the 64-byte steps of the kernel
    starts = np.array([0, 10, 11, 30])
    sig[0, 3, 69] = True
    sig[1, 10, 0] = True
    sig[2, 29, 69] = True
    sig[3] = rng.uniform(size=(30, 70)) < 0.01
    want = np.stack([sig[:, a:b].any(axis=(1, 2)) for a, b in zip(starts[:-1], starts[1:])], axis=1)
    np.testing.assert_array_equal(class_presence(sig, starts), want)
    assert class_presence(sig, starts)[:3].tolist() == [[True, False, False], [False, True, False],
                                                         [False, False, True]]


def test_two_pass_driver_matches_bruteforce(rng):
    freqs, _ = half_plane_window()
    k = freqs.shape[0]
    coarse_sel = np.hypot(freqs[:, 0], freqs[:, 1]) <= 4  # coarse_size: a smaller window
    n_i, n_class, n_rc, n_tc, n_or, n_ot = 5, 2, 6, 4, 4, 2
    fine_P = rng.normal(size=(n_class, n_rc * n_or, k)) + 1j * rng.normal(size=(n_class, n_rc * n_or, k))
    coarse_P = fine_P.reshape(n_class, n_rc, n_or, k).mean(axis=2)[:, :, coarse_sel]
    ctf = rng.uniform(0.5, 1, size=(n_i, k))
    inv_s2 = np.full(k, 1 / 40.0)  # noisy enough that several coarse samples are significant
    tc = rng.uniform(-2, 2, size=(n_tc, 2))
    tf = (tc[:, None, :] + 0.5 * rng.uniform(-1, 1, size=(n_tc, n_ot, 2))).reshape(-1, 2)
    X = rng.normal(size=(n_i, k)) + 1j * rng.normal(size=(n_i, k))
    X += 2 * fine_P[0, rng.integers(0, n_rc * n_or, n_i)]
    coarse = scoring_terms(precompute_shifted(X[:, coarse_sel], phase_ramps(freqs[coarse_sel], tc, BOX)),
                           ctf=ctf[:, coarse_sel], inv_sigma2=inv_s2[coarse_sel], n_trans=n_tc)
    fine = scoring_terms(precompute_shifted(X, phase_ramps(freqs, tf, BOX)), ctf=ctf, inv_sigma2=inv_s2,
                         n_trans=n_tc * n_ot)
    lpo = np.log(rng.dirichlet(np.ones(n_class * n_rc))).reshape(n_class, n_rc)
    lpt = rng.normal(scale=0.3, size=(n_i, n_tc))
    calls = []

    def projector(c, idx):
        calls.append((c, np.asarray(idx).copy()))
        return fine_P[c][idx]

    res = score_two_pass(coarse, fine, list(coarse_P), projector, n_over_rot=n_or, n_over_trans=n_ot,
                         log_prior_orient=lpo, log_prior_trans=lpt, adaptive_fraction=0.9)

    # --- brute force, float64
    def diff2_loop(Xi, P, c_, is2, t):
        ramps = phase_ramps(freqs if P.shape[-1] == k else freqs[coarse_sel], t, BOX, double=True)
        return np.array([[np.sum(np.abs(c_ * Pr - Xi * ramps[j]) ** 2 * is2) / 2 for j in range(len(t))]
                         for Pr in P])

    for i in range(n_i):
        dc = np.concatenate([diff2_loop(X[i, coarse_sel], coarse_P[c], ctf[i, coarse_sel], inv_s2[coarse_sel], tc)
                             for c in range(n_class)])  # (C·N_rc, N_tc)
        lp = lpo.reshape(-1)[:, None] + lpt[i][None, :]
        e = np.exp(-(dc - dc.min()) + lp)
        wc = e / e.sum()
        np.testing.assert_allclose(res.coarse.weights[i], wc, rtol=1e-4)
        sig, nsig, _ = reference_significance(wc[None], 0.9, -1)
        np.testing.assert_array_equal(res.coarse.significant[i], sig[0])
        # fine: children of significant coarse samples only, with the parents' priors
        df = np.concatenate([diff2_loop(X[i], fine_P[c], ctf[i], inv_s2, tf) for c in range(n_class)])
        parent_r = np.arange(n_class * n_rc * n_or) // n_or  # (class, coarse r) flat index
        parent_t = np.arange(n_tc * n_ot) // n_ot
        valid = sig[0][parent_r][:, parent_t]
        lpf = lp[parent_r][:, parent_t]
        dmin = df[valid].min()
        ef = np.where(valid, np.exp(-(df - dmin) + lpf), 0)
        wf = ef / ef.sum()
        # map the driver's (union) axes back to full fine indices
        got = np.zeros_like(wf)
        for fc in res.classes:
            rows = fc.class_index * n_rc * n_or + fc.orientations
            got[np.ix_(rows, res.fine_translations)] = res.fine.weights[i, fc.start:fc.stop, :]
        np.testing.assert_allclose(got, wf, rtol=2e-4, atol=1e-7)
        assert res.fine.min_diff2[i] == pytest.approx(dmin, rel=1e-5)  # constant added back
        best = np.unravel_index(wf.argmax(), wf.shape)
        cls, orient, trans = res.best_pose()
        assert cls[i] == best[0] // (n_rc * n_or)
        assert orient[i] == best[0] % (n_rc * n_or)
        assert trans[i] == best[1]
    # only children of significant coarse orientations were projected
    union = np.nonzero(res.coarse.significant.any(axis=(0, 2)))[0]
    requested = np.concatenate([c * n_rc * n_or + idx for c, idx in calls])
    np.testing.assert_array_equal(np.unique(requested // n_or), union)
    assert len(requested) < n_class * n_rc * n_or  # it did prune something
    # the M-step takes each class's slice of the fine posterior directly
    Xf = precompute_shifted(X, phase_ramps(freqs, tf[res.fine_translations], BOX))
    total = 0.0
    for fc in res.classes:
        w_c, s_c = res.class_weights(fc.class_index)
        sums = mstep_sums(w_c, Xf, fc.projections, ctf=ctf, inv_sigma2=inv_s2, n_trans=len(res.fine_translations),
                          significant=s_c)
        total += sums.class_weight
        np.testing.assert_allclose(sums.sum_weight, (w_c * s_c).sum(axis=(1, 2)), rtol=1e-5)
    assert total == pytest.approx(float((res.fine.weights * res.fine.significant).sum()), rel=1e-5)
    assert n_i * 0.9 < total <= n_i * (1 + 1e-5)  # the second cut (fraction 0.9 here) keeps > 90 % of each particle


def test_two_pass_driver_in_cc_mode_is_a_hard_assignment(rng):
    freqs, _ = half_plane_window()
    k = freqs.shape[0]
    n_i, n_rc, n_or, n_tc, n_ot = 4, 5, 4, 3, 2
    fine_P = rng.normal(size=(n_rc * n_or, k)) + 1j * rng.normal(size=(n_rc * n_or, k))
    coarse_P = fine_P.reshape(n_rc, n_or, k).mean(axis=1)
    tc = rng.uniform(-2, 2, size=(n_tc, 2))
    tf = np.repeat(tc, n_ot, axis=0) + rng.uniform(-0.3, 0.3, size=(n_tc * n_ot, 2))
    X = fine_P[rng.integers(0, n_rc * n_or, n_i)] + 0.5 * rng.normal(size=(n_i, k))
    ctf = np.ones((n_i, k))
    coarse = scoring_terms(precompute_shifted(X, phase_ramps(freqs, tc, BOX)), ctf=ctf, inv_sigma2=1.0,
                           n_trans=n_tc, mode="cc")
    fine = scoring_terms(precompute_shifted(X, phase_ramps(freqs, tf, BOX)), ctf=ctf, inv_sigma2=1.0,
                         n_trans=n_tc * n_ot, mode="cc")
    res = score_two_pass(coarse, fine, [coarse_P], lambda c, idx: fine_P[idx], n_over_rot=n_or, n_over_trans=n_ot)
    np.testing.assert_array_equal(res.coarse.n_significant, 1)
    cc_c = cross_correlation(coarse, coarse_P)
    cc_f = cross_correlation(fine, fine_P)
    _, orient, trans = res.best_pose()
    for i in range(n_i):
        rc, t_c = np.unravel_index(cc_c[i].argmin(), cc_c[i].shape)
        children = cc_f[i, rc * n_or:(rc + 1) * n_or, t_c * n_ot:(t_c + 1) * n_ot]
        j, u = np.unravel_index(children.argmin(), children.shape)
        assert (orient[i], trans[i]) == (rc * n_or + j, t_c * n_ot + u)
    flat = res.fine.weights.reshape(n_i, -1)
    np.testing.assert_array_equal((flat > 0).sum(1), 1)
    np.testing.assert_array_equal(flat.max(1), 1)


@pytest.mark.gpu
@pytest.mark.skipif(not gpu_available(), reason="needs CuPy and a GPU")
def test_cupy_matches_numpy(rng):
    import cupy as cp

    p = make_problem(rng)
    Xs = precompute_shifted(p["X"], p["ramps"])
    kw = dict(ctf=p["ctf"], inv_sigma2=1 / p["sigma2"], n_trans=p["n_t"], scale=p["scale"])
    d_np = squared_differences(Xs, p["P"], include_constant=False, **kw)
    d_cp = squared_differences(cp.asarray(Xs), cp.asarray(p["P"]), include_constant=False,
                               **{a: cp.asarray(b) for a, b in kw.items() if a != "n_trans"}, n_trans=p["n_t"])
    np.testing.assert_allclose(cp.asnumpy(d_cp), d_np, rtol=1e-4, atol=1e-4)
    post = posterior_weights(d_cp)
    np.testing.assert_allclose(cp.asnumpy(post.weights), posterior_weights(d_np).weights, rtol=1e-3, atol=1e-7)


def test_grouped_fine_pass_gives_each_particle_the_same_posterior(rng):
    """score_two_pass_grouped: the fine pass per group of particles, the same posteriors as one dense pass."""
    from cryodask.em.estep import fine_groups, score_two_pass_grouped

    freqs, _ = half_plane_window()
    k = freqs.shape[0]
    n_i, n_class, n_rc, n_tc, n_or, n_ot = 12, 2, 30, 4, 4, 2
    base = rng.normal(size=(n_class, n_rc, 1, k)) + 1j * rng.normal(size=(n_class, n_rc, 1, k))
    fine_P = (base + 0.3 * (rng.normal(size=(n_class, n_rc, n_or, k)) + 1j * rng.normal(
        size=(n_class, n_rc, n_or, k)))).reshape(n_class, n_rc * n_or, k)
    coarse_P = fine_P.reshape(n_class, n_rc, n_or, k).mean(axis=2)
    ctf = rng.uniform(0.5, 1, size=(n_i, k))
    inv_s2 = np.full(k, 1 / 2.0)  # a few significant coarse samples per particle, different ones per particle
    tc = rng.uniform(-2, 2, size=(n_tc, 2))
    tf = (tc[:, None, :] + 0.5 * rng.uniform(-1, 1, size=(n_tc, n_ot, 2))).reshape(-1, 2)
    truth = rng.integers(0, n_rc * n_or, n_i)
    X = rng.normal(size=(n_i, k)) + 1j * rng.normal(size=(n_i, k)) + fine_P[0, truth]
    coarse = scoring_terms(precompute_shifted(X, phase_ramps(freqs, tc, BOX)), ctf=ctf, inv_sigma2=inv_s2,
                           n_trans=n_tc)
    fine = scoring_terms(precompute_shifted(X, phase_ramps(freqs, tf, BOX)), ctf=ctf, inv_sigma2=inv_s2,
                         n_trans=n_tc * n_ot)
    lpt = rng.normal(scale=0.3, size=(n_i, n_tc))
    kw = dict(n_over_rot=n_or, n_over_trans=n_ot, log_prior_trans=lpt, adaptive_fraction=0.99)
    whole = score_two_pass(coarse, fine, list(coarse_P), lambda c, idx: fine_P[c][idx], **kw)
    requested = []

    def projector(g, c, idx):
        requested.append(len(idx))
        return fine_P[c][idx]

    groups = score_two_pass_grouped(coarse, fine, list(coarse_P), projector, group_cost=0.0, **kw)
    assert len(groups) > 1  # particles of different views: the fine pass was split
    seen = np.concatenate([g for g, _ in groups])
    np.testing.assert_array_equal(np.sort(seen), np.arange(n_i))
    _, w_orient, w_trans = whole.best_pose()
    for g, res in groups:
        np.testing.assert_allclose(res.fine.pmax, whole.fine.pmax[g], rtol=1e-5)
        np.testing.assert_allclose(res.fine.log_likelihood, whole.fine.log_likelihood[g], rtol=1e-6)
        np.testing.assert_array_equal(res.coarse.n_significant, whole.coarse.n_significant[g])
        _, orient, trans = res.best_pose()
        np.testing.assert_array_equal(orient, w_orient[g])
        np.testing.assert_array_equal(trans, w_trans[g])
        # the significant fine weight of each particle is the same
        np.testing.assert_allclose((res.fine.weights * res.fine.significant).sum(axis=(1, 2)),
                                   (whole.fine.weights * whole.fine.significant).sum(axis=(1, 2))[g], rtol=1e-5)
    # the groups' fine passes scored fewer (particle, orientation) pairs than one dense pass over the union
    dense = n_i * sum(len(c.orientations) for c in whole.classes)
    grouped = sum(len(g) * sum(len(c.orientations) for c in res.classes) for g, res in groups)
    assert grouped < 0.7 * dense, (grouped, dense)
    # one particle per group when grouping costs nothing extra, one group when a group is very expensive
    sig = whole.coarse.significant
    assert len(fine_groups(sig, projection_cost=0.0, group_cost=1e12)) == 1


@pytest.mark.parametrize("mode", ["ml", "cc"])
def test_lazy_terms_equal_the_precomputed_ones(rng, mode):
    """lazy_scoring_terms shifts only the translations selected, with the scores of the precomputed terms."""
    from cryodask.em.estep import lazy_scoring_terms, score_terms

    p = make_problem(rng, n_i=5, n_t=9)
    kw = dict(ctf=p["ctf"], inv_sigma2=1.0 / p["sigma2"], scale=p["scale"], mode=mode, double=True)
    full = scoring_terms(precompute_shifted(p["X"], p["ramps"], double=True), n_trans=p["n_t"], **kw)
    lazy = lazy_scoring_terms(p["X"], p["ramps"], **kw)
    assert lazy.cross is None and lazy.n_trans == p["n_t"] and lazy.n_particles == 5
    np.testing.assert_allclose(score_terms(lazy, p["P"]), score_terms(full, p["P"]), rtol=1e-12, atol=1e-9)
    pick, rows = np.array([7, 2, 3]), np.array([4, 0])
    a = lazy.select_particles(rows).select_translations(pick)
    b = full.select_particles(rows).select_translations(pick)
    assert a.cross is not None and a.n_trans == 3
    np.testing.assert_allclose(a.cross, b.cross, rtol=1e-12, atol=1e-12)
    np.testing.assert_allclose(score_terms(a, p["P"]), score_terms(b, p["P"]), rtol=1e-12, atol=1e-9)


def test_significant_unions_match_numpy(rng):
    from cryodask.em.estep import _significant_unions

    sig = rng.uniform(size=(7, 40, 9)) < 0.02
    sig[3] = False  # a particle with nothing significant
    rows, trans = _significant_unions(sig)
    np.testing.assert_array_equal(rows, sig.any(axis=2))
    np.testing.assert_array_equal(trans, sig.any(axis=1))
    assert rows.any() and not rows[3].any()
