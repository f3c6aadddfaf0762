"""E-step throughput: score one realistic particle chunk and compare the GEMM rate with the machine's matmul.

    .venv/bin/python benchmarks/estep.py                       # 1000 particles x 5000 orientations x 25 translations
    .venv/bin/python benchmarks/estep.py --quick               # a small smoke run
    .venv/bin/python benchmarks/estep.py --current-size 128 --double

What it does, for one chunk and one class (cryodask.em.estep):

1. prepare: shifted images ``X_i^t`` (phase ramps) and the CTF/σ²-weighted terms;
2. score: ``diff2`` for every (particle, orientation, translation), two GEMMs, the orientation axis
   in blocks (``--block-mb``) so the GEMM output stays bounded; the full diff2 array
   (N_i·N_r·N_t·4 bytes, 500 MB at the defaults) is the one large allocation, needed whole by the
   significance rule;
3. weights: posterior, significance (RELION's 0.999 rule), Pmax, best pose;
4. M-step sums over the significant samples (backprojection slices, σ² sums);
5. slice insertion into a padded 3D accumulator, if ``cryodask.ops.backproject.BackProjector`` exists.

It prints the GEMM FLOP rate of step 2 (2·M·N·K per GEMM) as a fraction of ``numpy.matmul``'s
float32 (or float64) rate measured in the same run on a matrix of the same inner and outer
shape, plus each step's share of the chunk's time. The particles are made from the projections
(random complex slices, so unrelated orientations do not resemble each other) with noise at
``--snr``; at the default each posterior is peaked, as in late iterations. Step 3 (and with
``--flat-mstep`` step 4) is also timed on a flat posterior, as in early iterations.
The machine load (``os.getloadavg``) is printed before and after, since other work on the
same cores changes every figure.
"""

from __future__ import annotations

import argparse
import os
import sys
import time
from pathlib import Path

import numpy as np

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from _worker import as_worker  # noqa: E402

from cryodask.em import estep  # noqa: E402


def half_plane_window(box: int, radius: float) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """(kx, ky) of the FFTW-half pixels with 0 < |k| <= radius, and their row/column in the (box, box//2+1) array."""
    ky, kx = np.meshgrid(np.fft.fftfreq(box, 1 / box).astype(int), np.arange(box // 2 + 1), indexing="ij")
    inside = (kx**2 + ky**2 <= radius**2) & ((kx != 0) | (ky != 0))
    rows, cols = np.nonzero(inside)
    return np.stack([kx[rows, cols], ky[rows, cols]], axis=1), rows, cols


#: the benchmark's clock: set in main (the CPU time of this thread with one BLAS thread, else wall time)
clock = time.perf_counter


def best_time(fn, repeat: int) -> float:
    best = np.inf
    for _ in range(repeat):
        t0 = clock()
        fn()
        best = min(best, clock() - t0)
    return best


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--particles", type=int, default=1000)
    ap.add_argument("--orientations", type=int, default=5000)
    ap.add_argument("--translations", type=int, default=25, help="a square grid of this many (rounded)")
    ap.add_argument("--box", type=int, default=128)
    ap.add_argument("--current-size", type=int, default=96, help="window diameter in pixels (K follows)")
    ap.add_argument("--block-mb", type=float, default=128, help="GEMM output per orientation block")
    ap.add_argument("--snr", type=float, default=0.02, help="signal/noise power per pixel of the particles")
    ap.add_argument("--flat-mstep", action="store_true",
                    help="also time the M-step sums on a flat posterior (every orientation active)")
    ap.add_argument("--double", action="store_true")
    ap.add_argument("--quick", action="store_true", help="200 x 1000 x 9 at current size 64")
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--machine-defaults", action="store_true",
                    help="keep this shell's environment (BLAS threads, malloc, huge pages) instead of a worker's")
    args = ap.parse_args(argv)
    as_worker(machine_defaults=args.machine_defaults)
    global clock
    # With one BLAS thread all the work runs on this thread: its CPU time is the work's, and does not
    # grow when other processes share the cores (a long RELION run beside it), unlike the wall time.
    one_thread = os.environ.get("OPENBLAS_NUM_THREADS") == "1"
    clock = time.thread_time if one_thread else time.perf_counter
    if args.quick:
        args.particles, args.orientations, args.translations, args.current_size = 200, 1000, 9, 64

    rng = np.random.default_rng(args.seed)
    rdt = np.float64 if args.double else np.float32
    cdt = np.complex128 if args.double else np.complex64
    n_i, n_r = args.particles, args.orientations
    side = max(1, int(round(np.sqrt(args.translations))))
    grid = np.arange(side) - (side - 1) / 2
    trans = np.stack(np.meshgrid(grid, grid, indexing="ij"), -1).reshape(-1, 2) * 2.0
    n_t = trans.shape[0]
    freqs, rows, cols = half_plane_window(args.current_size, args.current_size // 2)
    k = freqs.shape[0]
    load0 = os.getloadavg()
    print(f"cryodask E-step benchmark: {n_i} particles x {n_r} orientations x {n_t} translations, "
          f"box {args.box}, current_size {args.current_size} -> K = {k} Fourier pixels, "
          f"{'float64' if args.double else 'float32'}")
    print(f"machine: {os.cpu_count()} cores; load average before: {load0[0]:.2f} {load0[1]:.2f} {load0[2]:.2f}; "
          f"{'this shell' if args.machine_defaults else 'a worker'}'s environment "
          f"(OPENBLAS_NUM_THREADS={os.environ.get('OPENBLAS_NUM_THREADS', 'unset')}); times are "
          f"{'CPU seconds of this thread' if one_thread else 'wall seconds'}")

    # Particles made from the projections: s·CTF·P_r0 moved by a grid translation, plus Gaussian noise
    # of variance σ² per component; --snr sets the signal-to-noise power ratio per pixel.
    P = (rng.normal(size=(n_r, k)) + 1j * rng.normal(size=(n_r, k))).astype(cdt) / np.sqrt(2)
    r2 = (freqs**2).sum(1)
    ctf = (-np.sin(np.pi * 5 / (args.current_size // 2) ** 2 * r2[None] * rng.uniform(0.8, 1.2, size=(n_i, 1))
                   )).astype(rdt)
    scale = rng.uniform(0.9, 1.1, n_i).astype(rdt)
    sigma2 = np.full(k, 0.5 / args.snr, dtype=rdt)
    inv_s2 = estep.inv_sigma2_from_sigma2(sigma2)
    r0 = rng.integers(0, n_r, n_i)
    t0_ = rng.integers(0, n_t, n_i)
    back = estep.phase_ramps(freqs, -trans, args.current_size, double=args.double)
    X = (scale[:, None] * ctf * P[r0] * back[t0_]
         + np.sqrt(sigma2) * (rng.normal(size=(n_i, k)) + 1j * rng.normal(size=(n_i, k)))).astype(cdt)
    lpt = estep.gaussian_log_prior_trans(trans, np.zeros((n_i, 2)), sigma_offset=10.0, angpix=1.0)
    block_bytes = int(args.block_mb * 2**20)
    bi, nb = estep._gemm_blocks(n_i, n_t, n_r, np.dtype(rdt).itemsize, block_bytes)

    # --- reference: numpy.matmul on the same shapes as the big GEMM (rows capped to bound the time),
    # measured before and after the chunk; the faster figure is the machine's rate.
    m_ref = min(bi * n_t, 8192)
    A = rng.normal(size=(m_ref, 2 * k)).astype(rdt)
    B = rng.normal(size=(2 * k, nb)).astype(rdt)

    def matmul_rate() -> float:
        np.matmul(A, B)  # warm-up
        return 2.0 * m_ref * 2 * k * nb / best_time(lambda: np.matmul(A, B), 3)

    ref_before = matmul_rate()
    print(f"numpy.matmul reference: ({m_ref} x {2 * k}) @ ({2 * k} x {nb}) -> {ref_before / 1e9:.1f} GFLOP/s")

    # A worker compiles (or loads from Numba's cache) the kernels once per process: not part of a chunk.
    w_xs = estep.precompute_shifted(X[:4], estep.phase_ramps(freqs, trans, args.current_size, double=args.double),
                                    double=args.double)
    w_terms = estep.scoring_terms(w_xs, ctf=ctf[:4], inv_sigma2=inv_s2, n_trans=n_t, scale=scale[:4],
                                  double=args.double)
    w_post = estep.posterior_weights(estep.score_terms(w_terms, P[:8], include_constant=False),
                                     log_prior_trans=lpt[:4], diff2_offset=w_terms.constant)
    estep.mstep_sums(w_post.weights, w_xs, P[:8], ctf=ctf[:4], inv_sigma2=inv_s2, n_trans=n_t, scale=scale[:4],
                     significant=w_post.significant, double=args.double)
    del w_xs, w_terms, w_post

    timings: dict[str, float] = {}
    t0 = clock()
    ramps = estep.phase_ramps(freqs, trans, args.current_size, double=args.double)
    Xs = estep.precompute_shifted(X, ramps, double=args.double)
    terms = estep.scoring_terms(Xs, ctf=ctf, inv_sigma2=inv_s2, n_trans=n_t, scale=scale, double=args.double)
    timings["prepare (shifts, terms)"] = clock() - t0

    t0 = clock()
    diff2 = estep.score_terms(terms, P, include_constant=False, block_bytes=block_bytes)
    t_score = clock() - t0
    timings["score (diff2 GEMMs)"] = t_score
    flops_cross = 2.0 * (n_i * n_t) * (2 * k) * n_r
    flops_power = 2.0 * n_i * k * n_r
    score_rate = (flops_cross + flops_power) / t_score

    t0 = clock()
    post = estep.posterior_weights(diff2, log_prior_trans=lpt, diff2_offset=terms.constant, overwrite_diff2=True)
    timings["weights + significance"] = clock() - t0
    del diff2

    t0 = clock()
    sums = estep.mstep_sums(post.weights, Xs, P, ctf=ctf, inv_sigma2=inv_s2, n_trans=n_t, scale=scale,
                            significant=post.significant, double=args.double)
    timings["M-step sums"] = clock() - t0
    n_act = int(sums.orientations.shape[0])

    t_insert = None
    try:
        from cryodask.geometry.euler import euler_to_matrix
        from cryodask.ops.backproject import BackProjector
    except ImportError:
        BackProjector = None  # noqa: N806
    if BackProjector is not None:
        try:
            bp = BackProjector.zeros(args.box, pad=2, r_max=args.current_size // 2, double=args.double)
            cs = args.current_size
            slices = np.zeros((n_act, cs, cs // 2 + 1), dtype=cdt)
            weights = np.zeros((n_act, cs, cs // 2 + 1), dtype=rdt)
            slices[:, rows, cols] = sums.data
            weights[:, rows, cols] = sums.weight
            ang = rng.uniform(0, 360, size=(n_act, 3))
            rot = np.stack([np.asarray(euler_to_matrix(*a)) for a in ang])
            t0 = clock()
            bp.insert(slices, rot, weights)
            t_insert = clock() - t0
            timings["slice insertion"] = t_insert
        except Exception as exc:  # the backprojector is another module's work in progress
            print(f"(slice insertion skipped: {type(exc).__name__}: {exc})")

    ref_after = matmul_rate()
    ref_rate = max(ref_before, ref_after)
    A = B = None  # noqa: N806  (free them; the closure above is done with them)
    print(f"numpy.matmul reference again after the chunk: {ref_after / 1e9:.1f} GFLOP/s; "
          f"using {ref_rate / 1e9:.1f} GFLOP/s")
    total = sum(timings.values())
    print()
    print(f"chunk time {total:.2f} s")
    for name, t in timings.items():
        print(f"  {name:26s} {t:8.2f} s  {100 * t / total:5.1f} %")
    print()
    print(f"score GEMMs: {(flops_cross + flops_power) / 1e12:.2f} TFLOP in {t_score:.2f} s "
          f"= {score_rate / 1e9:.1f} GFLOP/s = {score_rate / ref_rate:.2f} of numpy.matmul "
          f"(goal >= 0.6); orientation blocks of {nb}")
    e_rate = (flops_cross + flops_power) / (total - (t_insert or 0.0))
    print(f"whole E-step (prepare + score + weights + M-step sums): {e_rate / 1e9:.1f} GFLOP/s of scoring work "
          f"= {e_rate / ref_rate:.2f} of numpy.matmul")
    print(f"posterior: median significant samples {np.median(post.n_significant):.0f}, "
          f"median Pmax {np.median(post.pmax):.3f}; {n_act} orientations received weight")
    if t_insert is not None:
        print(f"slice insertion: {n_act} slices of {cs}x{cs // 2 + 1} in {t_insert:.2f} s "
              f"= {n_act / t_insert:.0f} slices/s; {100 * t_insert / total:.1f} % of the chunk")

    # weights on a flat posterior (early iterations): the significance sort then dominates
    flat = (-rng.exponential(3.0, size=(n_i, n_r, n_t))).astype(rdt)
    t0 = clock()
    post_flat = estep.posterior_weights(-flat)
    t_flat = clock() - t0
    print(f"weights + significance on a flat posterior: {t_flat:.2f} s "
          f"(median significant samples {np.median(post_flat.n_significant):.0f})")
    del flat
    if args.flat_mstep:
        t0 = clock()
        sf = estep.mstep_sums(post_flat.weights, Xs, P, ctf=ctf, inv_sigma2=inv_s2, n_trans=n_t, scale=scale,
                              significant=post_flat.significant, double=args.double)
        t_mf = clock() - t0
        n_f = int(sf.orientations.shape[0])
        fl = 2 * (2.0 * (n_i * n_t) * (2 * k) * n_f)
        print(f"M-step sums on the flat posterior: {t_mf:.2f} s for {n_f} active orientations "
              f"= {fl / t_mf / 1e9:.1f} GFLOP/s in its two big GEMMs = {fl / t_mf / ref_rate:.2f} of numpy.matmul")
    load1 = os.getloadavg()
    print(f"load average after: {load1[0]:.2f} {load1[1]:.2f} {load1[2]:.2f}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
