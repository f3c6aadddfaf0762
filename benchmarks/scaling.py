"""Scaling of one E-step iteration: time against particle count and orientation count, memory against particles.

Runs the real chunk task (:func:`cryodask.em.iteration.expectation_chunk`, global searches
with the two-pass kernel) over simulated particles split into fixed-size chunks, in this
process on one thread with a worker's environment (the per-worker figure), and prints

* time per particle at 1k, 4k, 16k particles (``--sizes``): flat means linear growth;
* time per orientation at HEALPix order 1, 2, 3 (``--orders``): the coarse pass is linear in
  the orientations, so the ratio shows how much of the time the orientation-dependent work is;
* the peak traced memory of one chunk task at each particle count (tracemalloc), which must
  stay flat (it depends on the chunk, not on the data set), beside the estimate of
  :mod:`cryodask.em.memory`.

Usage::

    .venv/bin/python benchmarks/scaling.py                      # 1k, 4k, 16k particles; orders 1, 2, 3
    .venv/bin/python benchmarks/scaling.py --sizes 200,800 --orders 1,2 --box 32   # quick
"""

from __future__ import annotations

import argparse
import tempfile
import time
import tracemalloc
from pathlib import Path

import numpy as np


def _setup(folder: Path, box: int, order: int, apix: float, sigma2: float):
    from cryodask.em.iteration import IterationSetup
    from cryodask.io.mrc import write_map
    from cryodask.ops.filters import low_pass_filter
    from cryodask.simulate import phantom

    vol = phantom(box, seed=0)
    refs = []
    for h in range(2):
        p = folder / f"ref{h}_o{order}.mrc"
        write_map(p, low_pass_filter(vol, 3 * apix, apix), apix)
        refs.append(str(p))
    return IterationSetup(iteration=2, box=box, pixel_size=apix, pad=2, current_size=box, coarse_size=box // 2,
                          reference_paths=refs, sigma2_noise=np.full((2, 1, box // 2 + 1), sigma2),
                          sigma_offset=[3 * apix] * 2, healpix_order=order, offset_range=4, offset_step=2,
                          oversampling=1, particle_diameter=0.8 * box * apix, zero_mask=True, do_ctf=True)


def _meta(sim, sl):
    from cryodask.em.iteration import ChunkMeta

    n = sl.stop - sl.start
    return ChunkMeta(index=np.arange(sl.start, sl.stop), rot=np.zeros(n), tilt=np.zeros(n), psi=np.zeros(n),
                     origins_px=np.zeros((n, 2)), half=np.arange(sl.start, sl.stop) % 2 + 1,
                     optics=np.zeros(n, np.int64), ctf=None, premultiplied=None)


#: the benchmark's clock: set in main (the CPU time of this thread with one BLAS thread, else wall time)
clock = time.perf_counter


def run_iteration(images, setup, chunk: int, trace: bool = False) -> tuple[float, int]:
    """Seconds for all chunks, and the largest tracemalloc peak of one chunk task (0 without ``trace``)."""
    from cryodask.em.iteration import expectation_chunk

    class _S:  # particle slices only
        pass

    peak = 0
    t0 = clock()
    for s in range(0, len(images), chunk):
        sl = slice(s, min(len(images), s + chunk))
        if trace:
            tracemalloc.start()
        expectation_chunk(images[sl].copy(), _meta(_S, sl), setup)
        if trace:
            peak = max(peak, tracemalloc.get_traced_memory()[1])
            tracemalloc.stop()
    return clock() - t0, peak


def main(argv=None) -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--sizes", default="1000,4000,16000", help="particle counts (comma-separated)")
    ap.add_argument("--orders", default="1,2,3", help="HEALPix orders (comma-separated)")
    ap.add_argument("--box", type=int, default=64)
    ap.add_argument("--chunk", type=int, default=250, help="particles per chunk task")
    ap.add_argument("--order_particles", type=int, default=200, help="particles for the orientation scan")
    ap.add_argument("--machine-defaults", action="store_true",
                    help="keep this shell's environment (BLAS threads, malloc, huge pages) instead of a worker's")
    args = ap.parse_args(argv)
    from _worker import as_worker

    as_worker(machine_defaults=args.machine_defaults)
    import os

    global clock
    # one BLAS thread: all the work is on this thread, whose CPU time does not grow while other
    # processes hold the cores (unlike the wall time)
    one_thread = os.environ.get("OPENBLAS_NUM_THREADS") == "1"
    clock = time.thread_time if one_thread else time.perf_counter

    from cryodask.em.memory import estimate
    from cryodask.simulate import phantom, simulate_particles

    sizes = [int(s) for s in args.sizes.split(",")]
    orders = [int(s) for s in args.orders.split(",")]
    box, apix = args.box, 3.0
    sim = simulate_particles([phantom(box, seed=0)], apix, n=max(sizes + [args.order_particles]), snr=0.3, seed=1)
    images = np.asarray(sim.images, np.float32)
    sigma2 = float(images[:200].var()) / box ** 2 / 2
    print(f"machine: {os.cpu_count()} cores; box {box}, chunk {args.chunk}, one thread, pad 2, oversampling 1; "
          f"times are {'CPU seconds of this thread' if one_thread else 'wall seconds'}")
    with tempfile.TemporaryDirectory() as tmp:
        setup = _setup(Path(tmp), box, orders[0] if len(orders) == 1 else 2, apix, sigma2)
        run_iteration(images[:min(20, len(images))], setup, args.chunk)  # warm-up: projector cache, imports
        print("\nparticles  seconds  ms/particle  ratio  peak chunk MiB  estimate MiB (union 0.1)")
        base = None
        for n in sizes:
            sec, peak = run_iteration(images[:n], setup, args.chunk, trace=True)
            per = sec / n
            base = base or per
            est = estimate("refine3d", box=box, n_particles=n, chunk=min(n, args.chunk), healpix_order=setup.healpix_order,
                           offset_range=4, offset_step=2, current_size=box, coarse_size=box // 2)
            print(f"{n:9d}  {sec:7.1f}  {1e3 * per:11.2f}  {per / base:5.2f}  {peak / 2**20:14.1f}  "
                  f"{est.e_step_chunk() / 2**20:12.1f}")
        print("\norder  orientations  seconds  ms/orientation  ratio   (", args.order_particles, "particles)")
        base = None
        for o in orders:
            s = _setup(Path(tmp), box, o, apix, sigma2)
            run_iteration(images[:2], s, args.chunk)  # warm the projector cache
            sec, _ = run_iteration(images[:args.order_particles], s, args.chunk)
            from cryodask.geometry.healpix import healpix_sampling

            n_r = healpix_sampling(o).n_orientations
            per = sec / n_r
            base = base or per
            print(f"{o:5d}  {n_r:12d}  {sec:7.1f}  {1e3 * per:14.4f}  {per / base:5.2f}")


if __name__ == "__main__":
    main()
