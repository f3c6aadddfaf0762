"""STAR read / write speed: cryodask.io.star against the starfile package.

Generates a realistic RELION 3.1 refinement ``_data.star`` (an optics block and a
particles loop of 23 columns, as ``relion_refine`` writes them: coordinates, two
file names, CTF, angles, origins in Å, class, subset...) with ``--n`` rows in a
temporary folder, then times, each the best of ``--repeat`` runs:

* ``read_particles`` and ``read_star`` on it, and ``starfile.read``;
* ``write_particles`` of the table read, and ``starfile.write`` (on ``--n-starfile``
  rows, 200,000 by default, since it is slow; its time is also scaled to ``--n``).

Prints the figures, rows/s, the ratios, and the peak RSS of this process.

Usage::

    python benchmarks/star_io.py                    # 1,000,000 rows
    python benchmarks/star_io.py --n 200000 --repeat 1
    python benchmarks/star_io.py --no-starfile      # ours only
"""

from __future__ import annotations

import argparse
import os
import resource
import sys
import tempfile
import time
from pathlib import Path

import numpy as np
import pandas as pd


def make_table(n: int, seed: int = 0):
    """A refinement-like ParticleTable with ``n`` particles (300 per micrograph, 2 optics groups)."""
    from cryodask.io.star import ParticleTable

    r = np.random.default_rng(seed)
    mic = np.arange(n) // 300
    du = r.uniform(5000, 30000, n)
    parts = pd.DataFrame({
        "rlnCoordinateX": r.integers(0, 4096, n).astype(float),
        "rlnCoordinateY": r.integers(0, 4096, n).astype(float),
        "rlnAutopickFigureOfMerit": r.normal(1, 0.5, n),
        "rlnClassNumber": r.integers(1, 5, n),
        "rlnAnglePsi": r.uniform(-180, 180, n),
        "rlnImageName": pd.Series([f"{i % 300 + 1:06d}@Extract/job007/Movies/FoilHole_{m:08d}_Data.mrcs"
                                   for i, m in enumerate(mic)], dtype=str),
        "rlnMicrographName": pd.Series([f"MotionCorr/job002/Movies/FoilHole_{m:08d}_Data.mrc" for m in mic],
                                       dtype=str),
        "rlnOpticsGroup": (mic % 2 + 1).astype(np.int64),
        "rlnCtfMaxResolution": r.uniform(3, 8, n),
        "rlnCtfFigureOfMerit": r.uniform(0, 0.3, n),
        "rlnDefocusU": du,
        "rlnDefocusV": du - r.uniform(0, 500, n),
        "rlnDefocusAngle": r.uniform(-180, 180, n),
        "rlnCtfBfactor": np.zeros(n),
        "rlnCtfScalefactor": np.ones(n),
        "rlnPhaseShift": np.zeros(n),
        "rlnAngleRot": r.uniform(-180, 180, n),
        "rlnAngleTilt": r.uniform(0, 180, n),
        "rlnOriginXAngst": r.normal(0, 3, n),
        "rlnOriginYAngst": r.normal(0, 3, n),
        "rlnNormCorrection": r.normal(1, 0.1, n),
        "rlnLogLikeliContribution": r.normal(2.5e5, 1e3, n),
        "rlnRandomSubset": r.integers(1, 3, n),
    })
    optics = pd.DataFrame({
        "rlnOpticsGroup": [1, 2], "rlnOpticsGroupName": ["opticsGroup1", "opticsGroup2"],
        "rlnAmplitudeContrast": [0.1, 0.1], "rlnSphericalAberration": [2.7, 2.7], "rlnVoltage": [300.0, 300.0],
        "rlnImagePixelSize": [1.06, 1.06], "rlnMicrographOriginalPixelSize": [0.53, 0.53],
        "rlnImageSize": [256, 256], "rlnImageDimensionality": [2, 2],
    })
    return ParticleTable(optics=optics, particles=parts)


def best(fn, repeat: int) -> float:
    times = []
    for _ in range(repeat):
        t0 = time.perf_counter()
        fn()
        times.append(time.perf_counter() - t0)
    return min(times)


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--n", type=int, default=1_000_000, help="particles (default 1,000,000)")
    ap.add_argument("--n-starfile", type=int, default=200_000, help="rows for starfile.write (default 200,000)")
    ap.add_argument("--repeat", type=int, default=2, help="runs per timing; the best is kept (default 2)")
    ap.add_argument("--no-starfile", action="store_true", help="skip the starfile package")
    ap.add_argument("--workdir", default=None, help="folder for the temporary files (default: system temp)")
    args = ap.parse_args(argv)

    from cryodask.io.star import read_particles, read_star, write_particles

    with tempfile.TemporaryDirectory(dir=args.workdir) as tmp:
        path = Path(tmp) / "run_data.star"
        table = make_table(args.n)
        write_particles(path, table)  # the file every reader reads
        size = path.stat().st_size
        print(f"file: {args.n:,} particles x {table.particles.shape[1]} columns, {size / 1e6:.0f} MB, "
              f"{os.cpu_count()} CPUs, load average {os.getloadavg()[0]:.2f}")

        t_read = best(lambda: read_particles(path), args.repeat)
        t_read_star = best(lambda: read_star(path), args.repeat)
        back = read_particles(path)
        out = Path(tmp) / "ours.star"
        t_write = best(lambda: write_particles(out, back), args.repeat)
        rows = [("cryodask read_particles", t_read, args.n), ("cryodask read_star", t_read_star, args.n),
                ("cryodask write_particles", t_write, args.n)]

        if not args.no_starfile:
            import starfile

            t_sf_read = best(lambda: starfile.read(path, always_dict=True), 1)
            m = min(args.n_starfile, args.n)
            small = {"optics": back.optics, "particles": back.particles.iloc[:m]}
            sf_out = Path(tmp) / "starfile.star"
            t_sf_write = best(lambda: starfile.write(small, sf_out, overwrite=True), 1)
            rows += [("starfile.read", t_sf_read, args.n), (f"starfile.write ({m:,} rows)", t_sf_write, m)]

        print(f"{'':28s} {'seconds':>9s} {'rows/s':>12s}")
        for name, t, n in rows:
            print(f"{name:28s} {t:9.2f} {n / t:12,.0f}")
        if not args.no_starfile:
            sf_write_full = t_sf_write * args.n / m
            print(f"starfile.write scaled to {args.n:,} rows: {sf_write_full:.1f} s")
            print(f"ratio read  (starfile / read_particles): {t_sf_read / t_read:.1f}x")
            print(f"ratio write (starfile scaled / write_particles): {sf_write_full / t_write:.1f}x")
        print(f"peak RSS {resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1e6:.2f} GB, "
              f"load average after {os.getloadavg()[0]:.2f}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
