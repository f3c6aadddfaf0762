"""3D classification into K classes (relion_refine --K, global searches at a fixed HEALPix order).

All particles are scored against all K references together; each class is reconstructed
regularised by the power spectrum of its current reference times --tau2_fudge (RELION's
classification τ², GUI default 4). One reference starts every class; in the first iteration
each particle goes to one random class. Writes RELION's files per iteration:
<o>_itNNN_{data,model,optimiser,sampling}.star and <o>_itNNN_classNNN.mrc.

--solvent_mask masks the references after every iteration (values in [0, 1]). --skip_align
classifies without alignment at the poses of a consensus refinement's _data.star; with
--solvent_mask it is a focused classification: the consensus map (--ref) outside the mask is
subtracted from every image on the fly, so only the masked region decides the class.

Examples
--------
  cryodask class3d --i particles.star --ref consensus.mrc --o Class3D/run --K 2 --ctf --ini_high 30 \\
      --particle_diameter 130 --zero_mask --flatten_solvent --iter 15
  cryodask class3d --i Refine3D/run_data.star --ref Refine3D/run_class001.mrc --o Focus/run --K 2 --ctf \\
      --skip_align --solvent_mask mask.mrc --ini_high 30 --particle_diameter 130 --zero_mask --iter 10
  cryodask class3d --continue Class3D/run_it015_optimiser.star --i particles.star --o Class3D/run --iter 25
"""

from __future__ import annotations

import argparse

from cryodask.cluster.client import add_execution_args


def add_args(parser: argparse.ArgumentParser) -> None:
    g = parser.add_argument_group("input and output")
    g.add_argument("--i", required=True, metavar="STAR|STORE", help="particles: a STAR file or a particle store")
    g.add_argument("--o", required=True, metavar="ROOT", help="output rootname, e.g. Class3D/run")
    g.add_argument("--ref", metavar="MAP", help="initial reference map (with --skip_align: the consensus map)")
    g.add_argument("--continue", dest="continue_from", metavar="OPTIMISER",
                   help="resume from an <o>_itNNN_optimiser.star")
    g = parser.add_argument_group("classification (RELION's options)")
    g.add_argument("--K", type=int, default=2, help="number of classes (default 2)")
    g.add_argument("--ini_high", type=float, default=-1.0, help="low-pass the reference to this resolution, Å")
    g.add_argument("--particle_diameter", type=float, default=-1.0, help="mask diameter in Å")
    g.add_argument("--healpix_order", type=int, default=2, help="HEALPix order (2 = 15°; default 2)")
    g.add_argument("--offset_range", type=float, default=6.0, help="translational search range, pixels (default 6)")
    g.add_argument("--offset_step", type=float, default=2.0, help="translational search step, pixels (default 2)")
    g.add_argument("--oversampling", type=int, default=1, help="adaptive oversampling order (default 1)")
    g.add_argument("--sym", default="C1", help="point-group symmetry (default C1)")
    g.add_argument("--ctf", action="store_true", help="CTF-correct")
    g.add_argument("--pad", type=int, default=None, choices=(1, 2), help="padding factor (default 2)")
    g.add_argument("--tau2_fudge", type=float, default=None, help="regularisation parameter T (default 4)")
    g.add_argument("--zero_mask", action="store_true", help="zeros outside the particle mask (else noise)")
    g.add_argument("--flatten_solvent", action="store_true", help="mask the references with a soft sphere")
    g.add_argument("--solvent_mask", metavar="MAP", default=None,
                   help="mask the references with this map (values 0..1); with --skip_align, the focus mask")
    g.add_argument("--skip_align", action="store_true",
                   help="no alignment: keep each particle's pose from --i (a consensus refinement's _data.star)")
    g.add_argument("--auto_focus_iter", type=int, default=0,
                   help="cryodask: the last N iterations classify without alignment at the poses found, focused on "
                        "a mask around where the classes differ (default 0: off)")
    g.add_argument("--firstiter_cc", action="store_true", help="cross-correlation in the first iteration")
    g.add_argument("--iter", type=int, default=None, help="iterations (default 25)")
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
    from cryodask.em.class3d import class3d
    from cryodask.errors import UserError

    if args.continue_from is None and args.ref is None:
        raise UserError("--ref", "give an initial reference map (--ref MAP), or --continue an earlier run")
    res = class3d(args.i, args.o, args.ref, K=args.K, ini_high=args.ini_high,
                  particle_diameter=args.particle_diameter, healpix_order=args.healpix_order,
                  offset_range=args.offset_range, offset_step=args.offset_step, oversampling=args.oversampling,
                  sym=args.sym, ctf=args.ctf, pad=args.pad, tau2_fudge=args.tau2_fudge, zero_mask=args.zero_mask,
                  flatten_solvent=args.flatten_solvent, solvent_mask=args.solvent_mask, skip_align=args.skip_align,
                  auto_focus_iter=args.auto_focus_iter, firstiter_cc=args.firstiter_cc,
                  iter=args.iter, random_seed=args.random_seed, pool=args.pool, continue_from=args.continue_from,
                  norm=args.norm, scale=args.scale, command_line=command_line(args, "class3d"), quiet=args.quiet,
                  **execution_keywords(vars(args)))
    print(f"class3d: {res.iterations} iterations; class fractions "
          f"{', '.join(f'{f:.3f}' for f in res.class_fractions)}")
    return 0
