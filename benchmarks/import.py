"""Import throughput and peak memory: STAR + MRC stacks -> particle store.

Writes ``--stacks`` MRC stacks of random float32 particles (box ``--box``) and a
RELION 3.1 STAR file naming them, then imports the first N particles for each N
in ``--n`` (float32 and ``--float16``), each import in a fresh process, and
prints particles/s, MB/s of float32 input, and the process's peak RSS
(``VmHWM`` of /proc/self/status; ``getrusage().ru_maxrss`` would include the
parent's RSS at fork) with its RSS before the import (after importing the
libraries). The
import streams chunk by chunk, so the peak RSS must not grow with N.

The stacks are read right after they were written, so they are usually in the
page cache: the figures are the import's own cost (MRC read + write + hash),
not a cold-disk read.

Usage::

    python benchmarks/import.py                      # 100,000 particles at box 128 (6.6 GB of stacks)
    python benchmarks/import.py --n 20000 100000     # two sizes from the same stacks
    python benchmarks/import.py --n 20000 --workdir /scratch/me/bench
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import subprocess
import sys
import tempfile
import time
from pathlib import Path


def _status_kb(field: str) -> int:
    with open("/proc/self/status") as f:
        for line in f:
            if line.startswith(field + ":"):
                return int(line.split()[1])
    return 0


def child(star: str, out: str, float16: bool, chunk: int | None) -> None:
    """One import in this process; prints a JSON line with its timing and memory."""
    import scipy.fft  # noqa: F401  (imported first so that "RSS before" counts the libraries)
    import zarr  # noqa: F401

    import cryodask.io.mrc  # noqa: F401
    import cryodask.io.star  # noqa: F401
    from cryodask.io.store import disk_size, import_particles

    os.chdir(Path(star).parent)
    before = _status_kb("VmRSS")
    t0 = time.perf_counter()
    s = import_particles(star, out, float16=float16, chunk=chunk)
    dt = time.perf_counter() - t0
    # VmHWM, not getrusage's ru_maxrss: on Linux ru_maxrss survives exec and so reports the parent's
    # RSS at fork time (this benchmark's parent maps the stacks it wrote)
    print(json.dumps({"n": len(s), "seconds": dt, "maxrss_kb": _status_kb("VmHWM"),
                      "rss_before_kb": before, "disk_bytes": disk_size(out), "chunk": s.chunk,
                      "n_chunks": s.n_chunks}))


def make_data(folder: Path, n: int, box: int, stacks: int, angpix: float = 1.0) -> Path:
    import mrcfile
    import numpy as np
    import pandas as pd
    import starfile

    rng = np.random.default_rng(0)
    folder.mkdir(parents=True, exist_ok=True)
    per = -(-n // stacks)
    names = []
    for s in range(stacks):
        m = min(per, n - s * per)
        if m <= 0:
            break
        rel = f"Extract/stack{s:03d}.mrcs"
        (folder / "Extract").mkdir(exist_ok=True)
        with mrcfile.new_mmap(folder / rel, shape=(m, box, box), mrc_mode=2, overwrite=True) as mrc:
            for a in range(0, m, 1000):
                b = min(m, a + 1000)
                mrc.data[a:b] = rng.standard_normal((b - a, box, box), dtype=np.float32)
            mrc.set_image_stack()
            mrc.voxel_size = angpix
        names += [f"{k + 1:06d}@{rel}" for k in range(m)]
    optics = pd.DataFrame({"rlnOpticsGroupName": ["opticsGroup1"], "rlnOpticsGroup": [1], "rlnVoltage": [300.0],
                           "rlnSphericalAberration": [2.7], "rlnAmplitudeContrast": [0.1],
                           "rlnImagePixelSize": [angpix], "rlnImageSize": [box], "rlnImageDimensionality": [2]})
    parts = pd.DataFrame({"rlnImageName": names,
                          "rlnDefocusU": rng.uniform(10000, 30000, len(names)).round(2),
                          "rlnDefocusV": rng.uniform(10000, 30000, len(names)).round(2),
                          "rlnDefocusAngle": rng.uniform(0, 180, len(names)).round(2),
                          "rlnOriginXAngst": np.zeros(len(names)), "rlnOriginYAngst": np.zeros(len(names)),
                          "rlnOpticsGroup": np.ones(len(names), dtype=int)})
    star = folder / "particles.star"
    starfile.write({"optics": optics, "particles": parts}, star)
    return star


def subset(star: Path, n: int) -> Path:
    import starfile

    d = starfile.read(star, always_dict=True)
    if len(d["particles"]) == n:
        return star
    d["particles"] = d["particles"].iloc[:n]
    out = star.with_name(f"particles_{n}.star")
    starfile.write(d, out)
    return out


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--n", type=int, nargs="+", default=[100_000], help="particle counts to import (default 100000)")
    p.add_argument("--box", type=int, default=128)
    p.add_argument("--stacks", type=int, default=10)
    p.add_argument("--chunk", type=int, default=None)
    p.add_argument("--workdir", default=None, help="where to write the stacks and stores (default: a temp folder)")
    p.add_argument("--keep", action="store_true", help="keep the generated files")
    p.add_argument("--child", nargs=3, metavar=("STAR", "OUT", "FLOAT16"), help=argparse.SUPPRESS)
    a = p.parse_args()
    if a.child:
        child(a.child[0], a.child[1], a.child[2] == "1", a.chunk)
        return

    work = Path(a.workdir) if a.workdir else Path(tempfile.mkdtemp(prefix="cryodask-bench-import-"))
    work.mkdir(parents=True, exist_ok=True)
    nmax = max(a.n)
    img = nmax * a.box * a.box * 4
    need = img * 2.6  # stacks + float32 store + float16 store, with slack
    free = shutil.disk_usage(work).free
    print(f"workdir {work}: {free / 1e9:.1f} GB free, this run needs about {need / 1e9:.1f} GB")
    if need > free - 5e9:
        sys.exit(f"not enough disk in {work}: lower --n or choose another --workdir")
    try:
        t0 = time.perf_counter()
        star = work / "particles.star"
        made = work / f"made-{nmax}-{a.box}-{a.stacks}"  # stacks kept from an earlier run with --keep
        if made.exists() and star.exists():
            print(f"reusing the {nmax} particles of {a.box}^2 in {work}")
        else:
            made.unlink(missing_ok=True)
            star = make_data(work, nmax, a.box, a.stacks)
            made.touch()
            print(f"wrote {nmax} particles of {a.box}^2 float32 in {a.stacks} stacks ({img / 1e9:.2f} GB) "
                  f"in {time.perf_counter() - t0:.1f} s")
        print(f"{'N':>8} {'dtype':>7} {'time s':>8} {'particles/s':>12} {'MB/s in':>8} {'peak RSS MB':>12} "
              f"{'RSS before':>11} {'store GB':>9} {'chunks':>10}")
        for n in sorted(a.n):
            s = subset(star, n)
            for f16 in (False, True):
                out = work / f"store_{n}_{'f16' if f16 else 'f32'}.zarr"
                cmd = [sys.executable, __file__, "--child", str(s), str(out), "1" if f16 else "0"]
                if a.chunk:
                    cmd += ["--chunk", str(a.chunk)]
                r = subprocess.run(cmd, capture_output=True, text=True)
                if r.returncode:
                    sys.exit(r.stderr)
                m = json.loads(r.stdout.strip().splitlines()[-1])
                rate = m["n"] / m["seconds"]
                print(f"{m['n']:>8} {'float16' if f16 else 'float32':>7} {m['seconds']:>8.1f} {rate:>12.0f} "
                      f"{rate * a.box * a.box * 4 / 1e6:>8.0f} {m['maxrss_kb'] / 1024:>12.0f} "
                      f"{m['rss_before_kb'] / 1024:>11.0f} {m['disk_bytes'] / 1e9:>9.2f} "
                      f"{m['n_chunks']:>5} x {m['chunk']}")
                shutil.rmtree(out)
    finally:
        if not a.keep:
            shutil.rmtree(work, ignore_errors=True)


if __name__ == "__main__":
    main()
