"""Reconstruct a map from particle images and their poses (relion_reconstruct).

Reads the particles of --i (RELION 3.0 to 5.0 STAR files, or a particle store
made by cryodask import from a STAR file with poses), recentres each image
by its origin (rlnOriginXAngst/YAngst) with a Fourier phase shift, zeroes its
DC term as relion_reconstruct does, and inserts it into the padded 3D transform
at its Euler angles with trilinear interpolation. With --ctf the images are
multiplied by their CTF and the weights are CTF² (CTF-premultiplied particles are
not multiplied again). The map is data / weight, unregularised, as in
relion_reconstruct: divided directly (RELION 4/5's default) or, with
--dont_skip_gridding, through RELION 3.1's iterative gridding weights
(relion_reconstruct 3.1's default).

Examples
--------
  cryodask reconstruct --i particles.star --o map.mrc --ctf
  cryodask reconstruct --i particles.zarr --o map.mrc --ctf
  cryodask reconstruct --i run_data.star --o half1.mrc --ctf --subset 1 --sym C4
  cryodask reconstruct --i proj.star --o back.mrc --maxres 8 --dont_skip_gridding
"""

from __future__ import annotations

import argparse


def add_args(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--i", required=True, metavar="STAR|STORE",
                        help="particles with images and poses: a STAR file or a particle store (cryodask import)")
    parser.add_argument("--o", default="relion.mrc", metavar="MAP", help="output map (default relion.mrc)")
    parser.add_argument("--sym", default="C1", help="point-group symmetry (default C1)")
    parser.add_argument("--maxres", type=float, default=-1.0, help="maximum resolution in Å (default: Nyquist)")
    parser.add_argument("--pad", type=int, default=2, choices=(1, 2), help="padding factor (default 2)")
    parser.add_argument("--angpix", type=float,
                        help="pixel size in Å when the STAR file does not give it (default: its optics)")
    parser.add_argument("--ctf", action="store_true", help="apply CTF correction")
    parser.add_argument("--ctf_intact_first_peak", action="store_true", help="leave the CTF at 1 until its first peak")
    parser.add_argument("--subset", type=int, default=-1,
                        help="1 or 2: only that half set (rlnRandomSubset); other values: all particles")
    parser.add_argument("--class", dest="klass", type=int, default=-1,
                        help="only particles of this rlnClassNumber (default: all)")
    parser.add_argument("--dont_skip_gridding", action="store_true",
                        help="use RELION 3.1's iterative gridding weights instead of dividing by the weight")
    parser.add_argument("--skip_gridding", action="store_true", help=argparse.SUPPRESS)  # the default; RELION 3.1 name
    parser.add_argument("--iter", type=int, default=10, help="gridding iterations (default 10)")
    parser.add_argument("--double", action="store_true", help="accumulate and reconstruct in float64 (default float32)")
    parser.add_argument("--img", metavar="DIR", help="folder the image paths are relative to (default: the "
                                                     "current folder, then the STAR file's folder)")


def main(args: argparse.Namespace) -> int:
    import math

    import numpy as np

    from cryodask.em.known_poses import insert_particles, numeric_column
    from cryodask.errors import UserError, where
    from cryodask.geometry.euler import euler_to_matrix
    from cryodask.geometry.symmetry import point_group
    from cryodask.io.mrc import write_map
    from cryodask.io.store import StarParticles, open_particles
    from cryodask.ops.backproject import BackProjector
    from cryodask.ops.ctf import ctf_2d, ctf_params, ctf_premultiplied

    if args.maxres == 0 or not math.isfinite(args.maxres):
        raise UserError("--maxres", f"{args.maxres} Å is not a resolution; give a positive number of Å")
    if args.iter < 0:
        raise UserError("--iter", "the number of gridding iterations cannot be negative")
    sym = point_group(args.sym)
    src = args.i
    particles = open_particles(src, angpix=args.angpix)
    if args.img and isinstance(particles, StarParticles):
        particles = StarParticles(src, angpix=args.angpix, base_dirs=[args.img])
    table = particles.table
    parts = table.particles
    keep = np.ones(len(parts), dtype=bool)
    if args.subset in (1, 2):
        if "rlnRandomSubset" not in parts.columns:
            raise UserError(where(src, field="rlnRandomSubset"), "--subset needs the rlnRandomSubset column; "
                                                                  "drop --subset or add the half-set labels")
        keep &= numeric_column(parts, "rlnRandomSubset", src) == args.subset
    if args.klass >= 0:
        if "rlnClassNumber" not in parts.columns:
            raise UserError(where(src, field="rlnClassNumber"), "--class needs the rlnClassNumber column")
        keep &= numeric_column(parts, "rlnClassNumber", src) == args.klass
    rows = np.flatnonzero(keep)
    if len(rows) == 0:
        raise UserError(src, "no particles left after --subset/--class; check the selection")

    apix = float(args.angpix) if args.angpix is not None else float(particles.pixel_size)
    angles = np.stack([numeric_column(parts, c, src) for c in ("rlnAngleRot", "rlnAngleTilt", "rlnAnglePsi")], axis=1)
    origins = np.zeros((len(parts), 2))
    for j, c in enumerate(("rlnOriginXAngst", "rlnOriginYAngst")):
        if c in parts.columns:
            origins[:, j] = numeric_column(parts, c, src) / apix
    ctf_kw = ctf_params(table, source=src) if args.ctf else None
    premultiplied = ctf_premultiplied(table, source=src) if args.ctf else None

    box = particles.box
    r_max = box // 2 if args.maxres < 0 else min(box // 2, math.ceil(box * apix / args.maxres))
    bp = BackProjector.zeros(box, pad=args.pad, r_max=r_max, double=args.double)
    rots = euler_to_matrix(angles[:, 0], angles[:, 1], angles[:, 2])
    for i, sl in enumerate(particles.chunk_slices()):
        idx = rows[(rows >= sl.start) & (rows < sl.stop)]
        if len(idx) == 0:
            continue
        imgs = particles.read_chunk(i)[idx - sl.start]
        ctf = None
        if ctf_kw is not None:
            ctf = ctf_2d(box, apix, **{k: v[idx] for k, v in ctf_kw.items()},
                         ctf_intact_first_peak=args.ctf_intact_first_peak)
        insert_particles(bp, imgs, rots[idx], origins[idx], ctf=ctf,
                         premultiplied=None if premultiplied is None else premultiplied[idx])
    vol = bp.reconstruct(sym=sym, skip_gridding=not args.dont_skip_gridding, gridding_iter=args.iter)
    write_map(args.o, vol, apix)
    print(f"cryodask reconstruct: {len(rows)} particles -> {args.o} ({box}^3, {apix:g} Å/px)")
    return 0
