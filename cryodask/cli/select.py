"""Select particles by class (RELION's Subset selection): classes by number, or by share and resolution.

Reads a classification's _data.star and writes the particles of the chosen classes to a
new STAR file (RELION 3.1, every column kept). Classes are given by number (--classes),
or chosen from the iteration's _model.star: at least --min_fraction of the particles
(rlnClassDistribution) and an estimated resolution (rlnEstimatedResolution) of
--max_resolution Å or better. Both may be combined (a class must pass all the tests).
Prints the classes kept and the number of particles.

Examples
--------
  cryodask select --i Class2D/run_it025_data.star --classes 1 3 --o Select/selected.star
  cryodask select --i Class2D/run_it025_data.star --min_fraction 0.05 --max_resolution 20 --o Select/good.star
  cryodask refine3d --i Select/good.star --ref ref.mrc --o Refine3D/run --ctf
"""

from __future__ import annotations

import argparse


def add_args(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--i", required=True, metavar="DATA", help="a classification's <root>_itNNN_data.star")
    parser.add_argument("--o", required=True, metavar="STAR", help="output STAR file of the selected particles")
    parser.add_argument("--classes", type=int, nargs="+", metavar="K", help="class numbers to keep (1-based)")
    parser.add_argument("--min_fraction", type=float, default=None, metavar="F",
                        help="keep classes with at least this share of the particles (rlnClassDistribution)")
    parser.add_argument("--max_resolution", type=float, default=None, metavar="A",
                        help="keep classes with an estimated resolution of this many Å or better")
    parser.add_argument("--model", default=None, metavar="MODEL",
                        help="the _model.star to choose from (default: the one beside --i, same iteration)")


def choose_classes(fractions, resolutions, *, classes=None, min_fraction=None, max_resolution=None) -> list[int]:
    """1-based class numbers that pass every given test."""
    import numpy as np

    k = len(fractions)
    keep = np.ones(k, bool)
    if classes:
        keep &= np.isin(np.arange(1, k + 1), classes)
    if min_fraction is not None:
        keep &= np.asarray(fractions) >= min_fraction
    if max_resolution is not None:
        keep &= np.asarray(resolutions) <= max_resolution
    return [int(c) for c in np.flatnonzero(keep) + 1]


def main(args: argparse.Namespace) -> int:
    from pathlib import Path

    import numpy as np

    from cryodask.errors import UserError, where
    from cryodask.io.star import ParticleTable, read_particles, write_particles

    if not args.classes and args.min_fraction is None and args.max_resolution is None:
        raise UserError("--classes", "say which classes to keep: --classes 1 3, or --min_fraction / --max_resolution")
    table = read_particles(args.i)
    parts = table.particles
    if "rlnClassNumber" not in parts.columns:
        raise UserError(where(args.i, field="rlnClassNumber"), "missing; give the _data.star of a classification")
    cls = parts["rlnClassNumber"].to_numpy().astype(np.int64)
    if args.min_fraction is not None or args.max_resolution is not None:
        from cryodask.em.model import read_model

        model_path = Path(args.model) if args.model else Path(str(args.i).replace("_data.star", "_model.star"))
        if not model_path.is_file() or model_path == Path(args.i):
            raise UserError(model_path, "does not exist; give the iteration's _model.star with --model")
        m = read_model(model_path)
        chosen = choose_classes(m.class_fractions, m.estimated_resolution, classes=args.classes,
                                min_fraction=args.min_fraction, max_resolution=args.max_resolution)
    else:
        k = int(cls.max()) if len(cls) else 0
        bad = [c for c in args.classes if c < 1 or c > k]
        if bad:
            raise UserError("--classes", f"{bad}: the classes of {args.i} are 1 to {k}")
        chosen = sorted(set(args.classes))
    sel = parts[np.isin(cls, chosen)].reset_index(drop=True)
    if len(sel) == 0:
        raise UserError("--classes", f"classes {chosen} hold no particles; choose others (see the _model.star's "
                                     "rlnClassDistribution)")
    Path(args.o).parent.mkdir(parents=True, exist_ok=True)
    write_particles(args.o, ParticleTable(optics=table.optics, particles=sel))
    print(f"select: classes {chosen}: {len(sel)} of {len(parts)} particles -> {args.o}")
    return 0
