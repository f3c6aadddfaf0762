"""2D classification (relion_refine --K classes of 2D references, RELION's Class2D).

Starts, as RELION does without a reference, from averages of random subsets of the
particles; then, each iteration, aligns every particle to every class over in-plane
rotations (--psi_step) and translations (--offset_range, --offset_step), with the
posterior weighted by the class fractions and a Gaussian prior on the offsets around
each class's mean offset, and reconstructs the classes regularised by their power
spectra (--tau2_fudge, 2 in RELION's GUI). One task per particle chunk on the Dask
cluster; the class sums are tree-reduced and the classes reconstructed in parallel.
Writes RELION's files per iteration: <o>_itNNN_classes.mrcs and
<o>_itNNN_{data,model,optimiser,sampling}.star (class distributions and resolutions in
_model.star). Option names are RELION's.

Examples
--------
  cryodask simulate --phantom 32 --angpix 4 --n 500 --snr 0.5 --o sim/
  cryodask class2d --i sim/particles.star --o Class2D/run --K 10 --iter 25 --ctf \\
      --particle_diameter 110 --zero_mask --flatten_solvent --psi_step 10 --offset_range 5 --offset_step 2
  cryodask class2d --i sim/particles.star --o Class2D/run --continue Class2D/run_it010_optimiser.star --iter 25
"""

from __future__ import annotations

import argparse

from cryodask.cluster.client import add_execution_args


def add_args(parser: argparse.ArgumentParser) -> None:
    g = parser.add_argument_group("input and output")
    g.add_argument("--i", required=True, metavar="STAR|STORE", help="particles: a STAR file or a particle store")
    g.add_argument("--o", required=True, metavar="ROOT", help="output rootname, e.g. Class2D/run")
    g.add_argument("--continue", dest="continue_from", metavar="OPTIMISER",
                   help="resume from an <o>_itNNN_optimiser.star (--iter is then the last iteration to run)")
    g = parser.add_argument_group("classification (RELION's options)")
    g.add_argument("--K", type=int, default=None, help="number of classes")
    g.add_argument("--iter", type=int, default=25, help="number of iterations (default 25)")
    g.add_argument("--psi_step", type=float, default=-1.0, help="in-plane angular step, degrees (-1: 10)")
    g.add_argument("--offset_range", type=float, default=6.0, help="translational search range, pixels (default 6)")
    g.add_argument("--offset_step", type=float, default=2.0, help="translational search step, pixels (default 2)")
    g.add_argument("--oversampling", type=int, default=1,
                   help="adaptive oversampling order: the fine pass uses steps / 2^os (default 1)")
    g.add_argument("--tau2_fudge", type=float, default=2.0, help="regularisation parameter T (default 2)")
    g.add_argument("--particle_diameter", type=float, default=-1.0,
                   help="mask diameter in Å (default: the box minus the soft edge)")
    g.add_argument("--zero_mask", action="store_true", help="zeros outside the particle mask (else noise)")
    g.add_argument("--flatten_solvent", action="store_true",
                   help="mask the classes with the soft circle of --particle_diameter (RELION's GUI: on)")
    g.add_argument("--ctf", action="store_true", help="CTF-correct")
    g.add_argument("--pad", type=int, default=2, choices=(1, 2), help="padding factor (default 2)")
    g.add_argument("--norm", action="store_true", help="normalisation correction per particle (RELION's GUI: on)")
    g.add_argument("--scale", action="store_true",
                   help="intensity scale per group: rlnGroupName, else micrograph (RELION's GUI: on)")
    g.add_argument("--random_seed", type=int, default=0, help="random seed (same seed, same result)")
    g = parser.add_argument_group("computation")
    g.add_argument("--pool", type=int, default=None, help="particles per task when --i is a STAR file")
    g.add_argument("--quiet", action="store_true", help="no progress bars (for batch logs); lines stay")
    add_execution_args(parser)


def main(args: argparse.Namespace) -> int:
    from cryodask.cli import command_line
    from cryodask.cluster.job import execution_keywords
    from cryodask.em.class2d import class2d

    res = class2d(args.i, args.o, K=args.K, iter=args.iter, psi_step=args.psi_step, offset_range=args.offset_range,
                  offset_step=args.offset_step, oversampling=args.oversampling, tau2_fudge=args.tau2_fudge,
                  particle_diameter=args.particle_diameter, zero_mask=args.zero_mask,
                  flatten_solvent=args.flatten_solvent, ctf=args.ctf, pad=args.pad,
                  random_seed=args.random_seed, pool=args.pool, continue_from=args.continue_from, quiet=args.quiet,
                  norm=args.norm, scale=args.scale,
                  command_line=command_line(args, "class2d"), **execution_keywords(vars(args)))
    fr = ", ".join(f"{f:.2f}" for f in res.class_fractions)
    print(f"class2d: {res.iterations} iterations; class fractions {fr}; "
          f"classes {res.output_root}_it{res.iterations:03d}_classes.mrcs")
    return 0
