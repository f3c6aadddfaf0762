"""Simulate particles from one or more maps, with the ground truth kept apart.

Projects the map(s) at uniform random orientations with small random shifts,
applies RELION's CTF with a defocus spread and adds Gaussian noise at the given
SNR (variance of the noiseless images over variance of the noise). Several maps
give a mixture with true class labels.

Writes into --o: particles.mrcs, particles.star (RELION 3.1, no poses) and
truth.star (poses, shifts and classes; jobs never read it).

Examples
--------
  cryodask simulate --phantom 64 --angpix 3 --n 2000 --snr 0.1 --o sim/
  cryodask simulate --map a.mrc --map b.mrc --n 4000 --snr 0.05 --o mix/ --seed 7
  relion_reconstruct --i sim/truth.star --o check.mrc --ctf   # RELION reads the outputs
"""

from __future__ import annotations

import argparse


def add_args(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--map", action="append", default=[], metavar="MRC",
                        help="map to project (repeat for a mixture; one class per map)")
    parser.add_argument("--phantom", type=int, metavar="BOX",
                        help="instead of --map, generate a protein-like phantom of this box (written to --o)")
    parser.add_argument("--n", type=int, required=True, help="number of particles")
    parser.add_argument("--snr", type=float, default=0.1, help="signal-to-noise ratio (default 0.1)")
    parser.add_argument("--o", required=True, metavar="DIR", help="output folder")
    parser.add_argument("--seed", type=int, default=0, help="random seed (default 0)")
    parser.add_argument("--angpix", type=float, help="pixel size in Å (default: from the map header)")
    parser.add_argument("--class_fractions", type=float, nargs="+", help="share of particles per map")
    parser.add_argument("--max_shift", type=float, default=3.0, help="std of the random shifts in pixels (default 3)")
    parser.add_argument("--defocus_min", type=float, default=10000.0, help="Å (default 10000)")
    parser.add_argument("--defocus_max", type=float, default=25000.0, help="Å (default 25000)")
    parser.add_argument("--n_optics_groups", type=int, default=1, help="number of optics groups (default 1)")
    parser.add_argument("--voltage", type=float, default=300.0, help="kV (default 300)")
    parser.add_argument("--cs", type=float, default=2.7, help="spherical aberration in mm (default 2.7)")
    parser.add_argument("--Q0", type=float, default=0.1, help="amplitude contrast (default 0.1)")


def main(args: argparse.Namespace) -> int:
    import math
    from pathlib import Path

    import numpy as np

    from cryodask.errors import UserError
    from cryodask.io.mrc import read_map, write_map
    from cryodask.simulate import phantom, simulate_particles, write_simulation

    out = Path(args.o)
    if args.n < 1:
        raise UserError("--n", "the number of particles must be at least 1")
    if args.snr <= 0:
        raise UserError("--snr", "the SNR must be positive")
    if bool(args.map) == bool(args.phantom):
        raise UserError("--map", "give one or more --map files, or --phantom BOX (not both)")
    if args.class_fractions and len(args.class_fractions) != max(1, len(args.map)):
        raise UserError("--class_fractions", f"give one fraction per map ({len(args.map)})")
    if args.phantom:
        if args.phantom % 2 or args.phantom < 16:
            raise UserError("--phantom", "the box must be even and at least 16")
        if not args.angpix:
            raise UserError("--angpix", "give the pixel size for the phantom, e.g. --angpix 3")
        volumes, angpix = [phantom(args.phantom, seed=args.seed)], args.angpix
        out.mkdir(parents=True, exist_ok=True)
        write_map(out / "phantom.mrc", volumes[0], angpix)
    else:
        volumes, sizes = [], []
        for m in args.map:
            v, apix = read_map(m)
            if v.ndim != 3 or len(set(v.shape)) != 1:
                raise UserError(m, f"the map is {v.shape}, not a cubic 3D map; resize it first")
            if v.shape[0] % 2:
                raise UserError(m, f"the box {v.shape[0]} is odd; particle images need an even box")
            volumes.append(v)
            sizes.append(apix)
        if len({v.shape for v in volumes}) > 1:
            raise UserError(args.map[1], "all maps must have the same box")
        angpix = args.angpix or sizes[0]
        if not angpix or not math.isfinite(angpix):
            raise UserError(args.map[0], "the header has no pixel size; give --angpix")
    data = simulate_particles(volumes, angpix, n=args.n, snr=args.snr, seed=args.seed,
                              class_fractions=args.class_fractions, max_shift=args.max_shift,
                              defocus_min=args.defocus_min, defocus_max=args.defocus_max,
                              n_optics_groups=args.n_optics_groups, voltage=args.voltage, cs=args.cs,
                              amplitude_contrast=args.Q0)
    paths = write_simulation(out, data)
    counts = np.bincount(data.truth["rlnClassNumber"].to_numpy())[1:]
    print(f"simulated {args.n} particles of box {volumes[0].shape[0]} at {angpix:g} Å/px, SNR {args.snr:g}, "
          f"classes {counts.tolist()} -> {paths['particles']} (truth in {paths['truth']})")
    return 0
