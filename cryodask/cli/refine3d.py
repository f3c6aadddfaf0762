"""Gold-standard 3D auto-refinement (relion_refine --auto_refine --split_random_halves).

Refines two random half-sets (rlnRandomSubset when the input has it) against their own
references, reconstructs them regularised by the gold-standard FSC, raises the HEALPix
order as the resolution and the poses stall, switches to local searches from
--auto_local_healpix_order, and ends with one iteration with the halves joined out to
Nyquist. Writes RELION's files: <o>_itNNN_{data,half1_model,half2_model,optimiser,sampling}.star,
<o>_itNNN_half{1,2}_class001.mrc, and at the end <o>_class001.mrc, <o>_half{1,2}_class001_unfil.mrc,
<o>_data.star and <o>_model.star. Option names are RELION's.

Examples
--------
  cryodask simulate --o sim --n 800 --box 32 --angpix 5 --snr 0.3
  cryodask refine3d --i sim/particles.star --ref ref.mrc --o Refine3D/run --ctf --ini_high 30 \\
      --particle_diameter 130 --zero_mask --flatten_solvent --low_resol_join_halves 40
  cryodask refine3d --continue Refine3D/run_it005_optimiser.star --i sim/particles.star --o Refine3D/run
"""

from __future__ import annotations

import argparse

from cryodask.cluster.client import add_execution_args


def add_args(parser: argparse.ArgumentParser) -> None:
    g = parser.add_argument_group("input and output")
    g.add_argument("--i", required=True, metavar="STAR|STORE", help="particles: a STAR file or a particle store")
    g.add_argument("--o", required=True, metavar="ROOT", help="output rootname, e.g. Refine3D/run")
    g.add_argument("--ref", metavar="MAP", help="initial reference map (same box and pixel size as the particles)")
    g.add_argument("--continue", dest="continue_from", metavar="OPTIMISER",
                   help="resume from an <o>_itNNN_optimiser.star")
    g = parser.add_argument_group("refinement (RELION's options)")
    g.add_argument("--ini_high", type=float, default=-1.0, help="low-pass the reference to this resolution, Å")
    g.add_argument("--particle_diameter", type=float, default=-1.0, help="mask diameter in Å (default: 80%% of box)")
    g.add_argument("--healpix_order", type=int, default=2, help="initial HEALPix order (2 = 15°; default 2)")
    g.add_argument("--offset_range", type=float, default=6.0, help="translational search range, pixels (default 6)")
    g.add_argument("--offset_step", type=float, default=2.0, help="translational search step, pixels (default 2)")
    g.add_argument("--oversampling", type=int, default=1, help="adaptive oversampling order (default 1)")
    g.add_argument("--auto_local_healpix_order", type=int, default=4,
                   help="HEALPix order from which searches are local (default 4)")
    g.add_argument("--sym", default="C1", help="point-group symmetry (default C1)")
    g.add_argument("--ctf", action="store_true", help="CTF-correct")
    g.add_argument("--pad", type=int, default=None, choices=(1, 2), help="padding factor (default 2)")
    g.add_argument("--tau2_fudge", type=float, default=None, help="regularisation parameter T (default 1)")
    g.add_argument("--firstiter_cc", action="store_true", help="cross-correlation in the first iteration")
    g.add_argument("--low_resol_join_halves", type=float, default=-1.0,
                   help="average the halves below this resolution, Å (RELION's GUI: 40)")
    g.add_argument("--zero_mask", action="store_true", help="zeros outside the particle mask (else noise)")
    g.add_argument("--flatten_solvent", action="store_true", help="mask the references with a soft sphere")
    g.add_argument("--iter", type=int, default=None, help="stop after this many iterations (default: converge)")
    g.add_argument("--auto_iter_max", type=int, default=999, help="hard stop of the automatic schedule")
    g.add_argument("--incr_size", type=int, default=10, help="Fourier shells beyond the resolution (default 10)")
    g.add_argument("--perturb", type=float, default=0.5, help="random perturbation of the sampling (default 0.5)")
    g.add_argument("--adaptive_fraction", type=float, default=0.999, help="significant posterior mass (0.999)")
    g.add_argument("--maxsig", type=int, default=-1,
                   help="at most this many significant coarse samples per particle (default -1: no cap)")
    g.add_argument("--norm", action="store_true", help="normalisation correction per particle (RELION's GUI: on)")
    g.add_argument("--scale", action="store_true",
                   help="intensity scale per group: rlnGroupName, else micrograph (RELION's GUI: on)")
    g.add_argument("--random_seed", type=int, default=0, help="random seed (same seed, same result)")
    g.add_argument("--skip_gridding", action="store_true", default=True, help="divide by the weight (default)")
    g.add_argument("--dont_skip_gridding", action="store_true", help="RELION 3.1's iterative gridding weights")
    g = parser.add_argument_group("computation")
    g.add_argument("--pool", type=int, default=None, help="particles per task when --i is a STAR file")
    g.add_argument("--quiet", action="store_true", help="no progress bars (for batch logs); lines stay")
    add_execution_args(parser)


def main(args: argparse.Namespace) -> int:
    from cryodask.cli import command_line
    from cryodask.cluster.job import execution_keywords
    from cryodask.em.refine3d import refine3d
    from cryodask.errors import UserError

    if args.continue_from is None and args.ref is None:
        raise UserError("--ref", "give an initial reference map (--ref MAP), or --continue an earlier run")
    res = refine3d(args.i, args.o, args.ref, ini_high=args.ini_high, particle_diameter=args.particle_diameter,
                   healpix_order=args.healpix_order, offset_range=args.offset_range, offset_step=args.offset_step,
                   oversampling=args.oversampling, auto_local_healpix_order=args.auto_local_healpix_order,
                   sym=args.sym, ctf=args.ctf, pad=args.pad, tau2_fudge=args.tau2_fudge,
                   firstiter_cc=args.firstiter_cc, low_resol_join_halves=args.low_resol_join_halves,
                   zero_mask=args.zero_mask, flatten_solvent=args.flatten_solvent, iter=args.iter,
                   random_seed=args.random_seed, pool=args.pool, skip_gridding=not args.dont_skip_gridding,
                   incr_size=args.incr_size, perturb=args.perturb, adaptive_fraction=args.adaptive_fraction,
                   maxsig=args.maxsig,
                   auto_iter_max=args.auto_iter_max, continue_from=args.continue_from,
                   norm=args.norm, scale=args.scale, command_line=command_line(args, "refine3d"), quiet=args.quiet,
                   **execution_keywords(vars(args)))
    print(f"refine3d: {res.iterations} iterations; gold-standard resolution {res.resolution:.2f} Å; "
          f"map {res.output_root}_class001.mrc")
    return 0
