"""Memory and scratch disk a job needs per worker, and the chunk size that fits, before it runs.

Prints, per worker, the E-step peak of one chunk task (images, projectors, projections,
shifted images, scores, the accumulators the task carries), the M-step peak (tree reduction of
the accumulators of every class and half-set, and the reconstructions) at the largest size
the job reaches (refine3d: its final iteration at Nyquist, current_size = box), and the
scratch disk for the particle store. Picks the largest chunk (particles per task) that fits
--memory_per_worker, and refuses, naming the fix (--pad 1, a smaller box, fewer classes,
more memory per worker), when even one particle per task cannot fit.

Give the particles (--i, box and count read from them) or the sizes (--box, --n_particles). The
job's own command line works as it is: put ``estimate`` before the job's name; its options that do
not change the memory (--o, --ctf, --iter ...) are checked against the job and listed as ignored,
and its --j is the threads per worker.

Examples
--------
  cryodask estimate refine3d --i particles.star --healpix_order 2 --pad 2
  cryodask estimate class3d --box 256 --n_particles 100000 --K 4 --memory_per_worker 16G
  cryodask estimate --job class2d --box 128 --n_particles 50000 --K 50 --psi_step 10
  cryodask estimate refine3d --box 360 --n_particles 200000 --memory_per_worker 8G   # refused: use --pad 1 ...
  cryodask estimate class2d --i particles.star --o Class2D/run --K 50 --ctf --zero_mask --flatten_solvent
"""

from __future__ import annotations

import argparse

JOBS = ("refine3d", "class3d", "class2d")


def _bytes(text: str) -> int:
    """``16G``, ``512M``, ``2.5GiB``, ``1e9`` → bytes."""
    t = str(text).strip().upper().replace("IB", "").replace("B", "")
    mult = {"K": 2**10, "M": 2**20, "G": 2**30, "T": 2**40}
    try:
        if t and t[-1] in mult:
            return int(float(t[:-1]) * mult[t[-1]])
        return int(float(t))
    except ValueError:
        raise argparse.ArgumentTypeError(f"{text!r} is not a memory size; give e.g. 16G, 512M or 2e9") from None


def add_args(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("job_name", nargs="?", choices=JOBS, metavar="JOB",
                        help="refine3d, class3d or class2d (or --job)")
    parser.add_argument("--job", choices=JOBS, default=None, help="the job (instead of the positional JOB)")
    g = parser.add_argument_group("the data (--i, or --box and --n_particles)")
    g.add_argument("--i", metavar="STAR|STORE", default=None, help="particles: a STAR file or a particle store")
    g.add_argument("--box", type=int, default=None, help="image size in pixels")
    g.add_argument("--n_particles", type=int, default=None, help="number of particles")
    g = parser.add_argument_group("the job's options (RELION's names)")
    g.add_argument("--K", type=int, default=None, help="classes (class3d default 2, class2d 50)")
    g.add_argument("--pad", type=int, default=2, choices=(1, 2), help="padding factor (default 2)")
    g.add_argument("--healpix_order", type=int, default=2, help="HEALPix order of the global searches (default 2)")
    g.add_argument("--psi_step", type=float, default=None, help="in-plane step, degrees (3D: the HEALPix step; 2D: 10)")
    g.add_argument("--offset_range", type=float, default=6.0, help="translational search range, pixels (default 6)")
    g.add_argument("--offset_step", type=float, default=2.0, help="translational search step, pixels (default 2)")
    g.add_argument("--oversampling", type=int, default=1, help="adaptive oversampling order (default 1)")
    g.add_argument("--sym", default="C1", help="point-group symmetry (default C1)")
    g.add_argument("--current_size", type=int, default=None,
                   help="image size of the fine pass (default: the box, the largest the job reaches)")
    g.add_argument("--pool", type=int, default=None, help="particles per task asked for (checked, lowered to fit)")
    g = parser.add_argument_group("the workers")
    g.add_argument("--memory_per_worker", type=_bytes, default=None, metavar="SIZE",
                   help="memory limit of one worker, e.g. 16G (default: this machine's memory / cores × threads)")
    g.add_argument("--threads", type=int, default=None,
                   help="threads (chunk tasks at once) per worker (default: the job's --j, else 1)")
    g.add_argument("--significant_fraction", type=float, default=0.1,
                   help="fraction of the coarse orientations in a chunk's fine pass (default 0.1; 1 = worst case)")
    g.add_argument("--float16", action="store_true", help="the particle store holds float16 images")


def accept_extra(args: argparse.Namespace, extra: list[str]) -> None:
    """The job's options beyond those that size the memory: valid options of that job (else a one-line
    error), kept to be listed as ignored; its ``--j`` sets the threads per worker."""
    from cryodask.cli import _load
    from cryodask.errors import UserError

    job = args.job or args.job_name
    if job is None:
        raise UserError("JOB", f"name the job before its options: cryodask estimate refine3d ... ({', '.join(JOBS)})")
    parser = argparse.ArgumentParser(prog=f"cryodask estimate {job}", add_help=False)
    _load(job).add_args(parser)
    for action in parser._actions:  # --i and --o belong to the job's run, not to its size
        action.required = False
    ns, unknown = parser.parse_known_args(extra)
    if unknown:
        raise UserError(unknown[0], f"not an option of cryodask {job}: {' '.join(unknown)}")
    if getattr(ns, "j", None) and args.threads is None:
        args.threads = int(ns.j)
        extra = [w for i, w in enumerate(extra)
                 if not (w == "--j" or w.startswith("--j=") or (i > 0 and extra[i - 1] == "--j"))]
    args.ignored = extra


def _data_sizes(args: argparse.Namespace) -> tuple[int, int]:
    from cryodask.errors import UserError

    if args.i:
        from cryodask.io.store import open_particles

        parts = open_particles(args.i)
        box, n = int(parts.box), len(parts)
        if args.box and args.box != box:
            raise UserError("--box", f"{args.i} holds {box}-pixel images, not {args.box}; leave --box out")
        return box, n
    if not args.box or not args.n_particles:
        raise UserError("--i", "give the particles (--i particles.star) or their sizes (--box 256 --n_particles 100000)")
    return int(args.box), int(args.n_particles)


def main(args: argparse.Namespace) -> int:
    from cryodask.em.memory import default_worker_memory, estimate, format_bytes, preflight
    from cryodask.errors import UserError

    job = args.job or args.job_name
    if job is None:
        raise UserError("JOB", f"name the job: cryodask estimate refine3d ... (one of {', '.join(JOBS)})")
    if args.job and args.job_name and args.job != args.job_name:
        raise UserError("--job", f"two jobs given ({args.job_name} and --job {args.job}); give one")
    args.threads = args.threads or 1
    box, n = _data_sizes(args)
    K = args.K if args.K is not None else {"refine3d": 1, "class3d": 2, "class2d": 50}[job]
    est = estimate(job, box=box, n_particles=n, K=K, pad=args.pad, healpix_order=args.healpix_order,
                   offset_range=args.offset_range, offset_step=args.offset_step, oversampling=args.oversampling,
                   psi_step=args.psi_step, chunk=args.pool, current_size=args.current_size, sym=args.sym,
                   threads_per_worker=args.threads, significant_fraction=args.significant_fraction,
                   image_bytes=2 if args.float16 else 4)
    limit = args.memory_per_worker or default_worker_memory(args.threads)
    pf = preflight(est, limit, chunk=args.pool)  # raises UserError (the fix named) when it cannot fit
    est.chunk = pf.chunk
    fb = format_bytes
    print(f"cryodask estimate: {job}, {n} particles of {box} px, K {K}, pad {args.pad}, "
          f"{est.n_orientations} orientations x {est.n_translations} translations (coarse), "
          f"oversampling {est.oversampling}, current_size {est.current_size}")
    if getattr(args, "ignored", None):
        print(f"options of {job} that do not change the memory (ignored): {' '.join(args.ignored)}")
    print(f"worker memory limit: {fb(limit)} ({args.threads} thread(s)); usable {fb(pf.usable)}")
    print(f"chunk: {pf.chunk} particles per task (at most {pf.max_chunk} fit)")
    print(f"E-step peak per worker: {fb(pf.e_step_peak)}  (one task of {pf.chunk} particles: "
          f"{fb(est.e_step_chunk(pf.chunk))}; fixed {fb(est.e_fixed)} + {fb(est.e_per_particle)} per particle)")
    est_at = estimate(job, box=box, n_particles=n, K=K, pad=args.pad, healpix_order=args.healpix_order,
                      offset_range=args.offset_range, offset_step=args.offset_step, oversampling=args.oversampling,
                      psi_step=args.psi_step, chunk=pf.chunk, current_size=args.current_size, sym=args.sym,
                      threads_per_worker=args.threads, significant_fraction=args.significant_fraction)
    for k, v in est_at.e_step.items():
        print(f"    {k:<55s} {fb(v):>10s}")
    if est.projector_cache:
        print(f"    {'projectors of the previous iteration (cache)':<55s} {fb(est.projector_cache):>10s}")
    print(f"M-step peak per worker: {fb(est.m_step_peak)}")
    for k, v in est.m_step.items():
        print(f"    {k:<55s} {fb(v):>10s}")
    print(f"scratch disk: {fb(est.scratch_bytes)} (the particle store)")
    return 0
