"""Simulate a small dataset and refine it with refine3d on the embedded LocalCluster; print the resolution.

The whole path a user's data takes, on data with a known answer: a phantom map
is projected into noisy CTF-affected particles (two optics groups, a defocus
spread), the particles are imported into a Zarr particle store, and refine3d
(gold-standard auto-refinement, RELION's schedule) runs on a LocalCluster from
the true map low-passed to --ini_high, so it must find every particle's pose
itself. Prints the gold-standard resolution (FSC 0.143 between the half-maps)
and the resolution at which the refined map's FSC with the true map falls below
0.5, next to the same figure for a reconstruction from the true poses (the best
the particles allow), and the median angular error of the refined poses.

Examples
--------
  cryodask demo --o demo                                        # box 32, 400 particles: a few minutes
  cryodask demo --o demo --n 2000 --box 64 --angpix 3 --snr 0.2   # the issue's size: an hour or more on 2 cores
"""

from __future__ import annotations

import argparse


def add_args(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--o", default="demo", metavar="DIR", help="output folder (default demo)")
    parser.add_argument("--n", type=int, default=400, help="number of particles (default 400)")
    parser.add_argument("--box", type=int, default=32, help="box size in pixels (default 32)")
    parser.add_argument("--angpix", type=float, default=5.0, help="pixel size in Å (default 5)")
    parser.add_argument("--snr", type=float, default=0.2, help="signal-to-noise ratio (default 0.2)")
    parser.add_argument("--ini_high", type=float, default=30.0,
                        help="low-pass the true map to this resolution (Å) as the starting reference (default 30)")
    parser.add_argument("--healpix_order", type=int, default=1,
                        help="initial HEALPix order of refine3d (default 1: 30° coarse, 15° fine)")
    parser.add_argument("--auto_local_healpix_order", type=int, default=3,
                        help="HEALPix order from which refine3d searches locally (default 3)")
    parser.add_argument("--iter", type=int, default=None, help="stop refine3d after this many iterations")
    parser.add_argument("--seed", type=int, default=0, help="random seed (default 0)")
    parser.add_argument("--workers", type=int, help="LocalCluster worker processes (default: one per core)")


def main(args: argparse.Namespace) -> int:
    import math
    import shutil
    import time
    from pathlib import Path

    import numpy as np

    from cryodask.analysis.fsc import fsc, resolution_at
    from cryodask.cluster.local import local_client
    from cryodask.em.iteration import rotation_angle_between
    from cryodask.em.known_poses import reconstruct_known_poses
    from cryodask.em.refine3d import refine3d
    from cryodask.errors import UserError
    from cryodask.geometry.euler import euler_to_matrix
    from cryodask.io.mrc import write_map
    from cryodask.io.star import read_particles
    from cryodask.io.store import import_particles
    from cryodask.ops.filters import low_pass_filter, spherical_mask
    from cryodask.simulate import phantom, simulate_particles, write_simulation

    if args.box % 2 or args.box < 32:
        raise UserError("--box", "the box must be even and at least 32")
    if args.n < 100:
        raise UserError("--n", "use at least 100 particles (refine3d needs two half-sets to compare)")
    if not args.ini_high > 2 * args.angpix:
        raise UserError("--ini_high", f"must be coarser than Nyquist ({2 * args.angpix:g} Å); 30-40 Å is usual")
    out = Path(args.o)
    out.mkdir(parents=True, exist_ok=True)
    t0 = time.perf_counter()

    truth_map = phantom(args.box, seed=args.seed)
    write_map(out / "truth.mrc", truth_map, args.angpix)
    write_map(out / "reference.mrc", low_pass_filter(truth_map, args.ini_high, args.angpix), args.angpix)
    data = simulate_particles([truth_map], args.angpix, n=args.n, snr=args.snr, seed=args.seed, n_optics_groups=2)
    paths = write_simulation(out / "sim", data)
    print(f"[{time.perf_counter() - t0:5.1f} s] simulated {args.n} particles ({args.box} px, {args.angpix:g} Å/px, "
          f"SNR {args.snr:g}, 2 optics groups) -> {paths['particles']}", flush=True)

    store_path = out / "particles.zarr"
    if store_path.exists():
        shutil.rmtree(store_path)
    # several chunks, so that every worker has chunk tasks
    store = import_particles(paths["particles"], store_path, chunk=max(50, math.ceil(args.n / 8)))
    print(f"[{time.perf_counter() - t0:5.1f} s] imported into {store_path} ({store.n_chunks} chunks)", flush=True)

    truth = read_particles(paths["truth"]).particles
    with local_client(args.workers) as client:
        n_workers = len(client.scheduler_info()["workers"])
        print(f"[{time.perf_counter() - t0:5.1f} s] refine3d on a LocalCluster of {n_workers} workers, from the "
              f"true map low-passed to {args.ini_high:g} Å", flush=True)
        res = refine3d(store_path, out / "Refine3D" / "run", out / "reference.mrc", ini_high=args.ini_high,
                       particle_diameter=0.8 * args.box * args.angpix, ctf=True, zero_mask=True,
                       flatten_solvent=True, low_resol_join_halves=40.0, healpix_order=args.healpix_order,
                       auto_local_healpix_order=args.auto_local_healpix_order, iter=args.iter,
                       random_seed=args.seed, client=client,
                       log=lambda m: print(f"[{time.perf_counter() - t0:5.1f} s]   {m}", flush=True))
        poses = truth.copy()
        poses["rlnRandomSubset"] = res.data["rlnRandomSubset"].to_numpy()
        known = reconstruct_known_poses(client, store, poses, ctf=True, source=str(paths["truth"]))
    write_map(out / "true_poses.mrc", known.full_map, args.angpix)

    mask = spherical_mask(args.box, 0.4 * args.box, width=4)
    res_truth = resolution_at(fsc(res.map, truth_map, mask=mask), 0.5, args.angpix, args.box)
    res_known = resolution_at(fsc(known.full_map, truth_map, mask=mask), 0.5, args.angpix, args.box)
    cols = ("rlnAngleRot", "rlnAngleTilt", "rlnAnglePsi")
    err = rotation_angle_between(euler_to_matrix(*(res.data[c].to_numpy() for c in cols)).reshape(-1, 3, 3),
                                 euler_to_matrix(*(truth[c].to_numpy() for c in cols)).reshape(-1, 3, 3))
    print(f"[{time.perf_counter() - t0:5.1f} s] refine3d finished after {res.iterations} iterations")
    print(f"gold-standard resolution (half-map FSC 0.143): {res.resolution:.2f} Å")
    print(f"resolution against the true map (FSC 0.5): {res_truth:.2f} Å   (from the true poses: {res_known:.2f} Å; "
          f"Nyquist {2 * args.angpix:.2f} Å)")
    print(f"median angular error: {np.median(err):.2f}°; particles more than 30° off: {100 * np.mean(err > 30):.1f}%")
    print(f"maps in {out}/: truth.mrc, reference.mrc, true_poses.mrc, Refine3D/run_class001.mrc, "
          f"Refine3D/run_half1_class001_unfil.mrc, Refine3D/run_half2_class001_unfil.mrc")
    return 0 if np.isfinite(res_truth) and np.isfinite(res.resolution) else 1
