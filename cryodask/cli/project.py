"""Project a map at the poses of a STAR file into an image stack (relion_project).

Each particle row of --ang gives the Euler angles (rlnAngleRot/Tilt/Psi) and
origin (rlnOriginXAngst/YAngst, or rlnOriginX/Y in pixels in RELION 3.0 files).
As in RELION, an image with origin o shows the particle moved by -o, so
relion_reconstruct (or cryodask reconstruct) recentres it by +o. Projections
use RELION's central-slice projector: gridding pre-correction, --pad zero
padding and trilinear interpolation. --ctf multiplies them by each particle's
CTF. Writes the stack and a matching RELION 3.1 STAR file next to it whose
rlnImageName are N@stack.mrcs.

Without --ang, one projection is made from --rot/--tilt/--psi (--xoff/--yoff in pixels).

Examples
--------
  cryodask project --i map.mrc --ang poses.star --o proj.mrcs            # proj.mrcs + proj.star
  cryodask project --i map.mrc --ang poses.star --o proj.mrcs --ctf --maxres 6
  cryodask project --i map.mrc --rot 30 --tilt 60 --psi 0 --o one.mrcs --angpix 1.5
  cryodask reconstruct --i proj.star --o back.mrc                        # round trip
"""

from __future__ import annotations

import argparse


def add_args(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--i", required=True, metavar="MAP", help="input map (MRC)")
    parser.add_argument("--o", required=True, metavar="STACK",
                        help="output stack (.mrcs added if missing); the STAR file gets the same name, .star")
    parser.add_argument("--ang", metavar="STAR", help="STAR file with the poses (and CTF parameters for --ctf)")
    parser.add_argument("--angpix", type=float, help="pixel size in Å (default: the STAR optics, else the map header)")
    parser.add_argument("--ctf", action="store_true", help="apply each particle's CTF")
    parser.add_argument("--ctf_intact_first_peak", action="store_true", help="leave the CTF at 1 until its first peak")
    parser.add_argument("--pad", type=int, default=2, choices=(1, 2), help="padding factor (default 2)")
    parser.add_argument("--maxres", type=float, default=-1.0,
                        help="maximum resolution in Å to keep (default: Nyquist)")
    parser.add_argument("--double", action="store_true", help="project in float64 (default float32)")
    parser.add_argument("--rot", type=float, default=0.0, help="first Euler angle, without --ang")
    parser.add_argument("--tilt", type=float, default=0.0, help="second Euler angle, without --ang")
    parser.add_argument("--psi", type=float, default=0.0, help="third Euler angle, without --ang")
    parser.add_argument("--xoff", type=float, default=0.0, help="origin X in pixels, without --ang")
    parser.add_argument("--yoff", type=float, default=0.0, help="origin Y in pixels, without --ang")


_ANGLES = ("rlnAngleRot", "rlnAngleTilt", "rlnAnglePsi")
#: particles projected at once (bounds memory: a few hundred MB at box 256)
_CHUNK = 512


def _stack_names(out: str) -> tuple[str, str]:
    from pathlib import Path

    p = Path(out)
    if p.suffix.lower() in (".mrcs", ".mrc"):
        stack = p
    else:
        stack = p.with_name(p.name + ".mrcs")
    return str(stack), str(stack.with_suffix(".star"))


def main(args: argparse.Namespace) -> int:
    import math

    import numpy as np
    import pandas as pd

    from cryodask.errors import UserError, where
    from cryodask.io.mrc import read_map, write_stack
    from cryodask.io.star import ParticleTable, read_particles, write_particles
    from cryodask.ops.ctf import ctf_2d, ctf_params
    from cryodask.ops.project import Projector, project_images

    vol, map_apix = read_map(args.i)
    if vol.ndim != 3 or len(set(vol.shape)) != 1 or vol.shape[0] < 2:
        raise UserError(args.i, f"the map is {vol.shape[::-1]} voxels, not a cubic 3D map; resize it to a cube first")
    box = vol.shape[0]
    if args.angpix is not None and not (args.angpix > 0 and math.isfinite(args.angpix)):
        raise UserError("--angpix", f"{args.angpix} is not a pixel size; give a positive number of Å per pixel")
    if args.maxres == 0 or not math.isfinite(args.maxres):
        raise UserError("--maxres", f"{args.maxres} Å is not a resolution; give a positive number of Å")

    if args.ang:
        table = read_particles(args.ang, angpix=args.angpix, require=_ANGLES)
        if args.angpix is not None:
            apix = float(args.angpix)
        else:
            try:
                apix = table.pixel_size()
            except UserError:
                if not (map_apix > 0):
                    raise
                apix = float(map_apix)
        parts = table.particles
        angles = np.stack([pd.to_numeric(parts[c], errors="coerce").to_numpy(np.float64) for c in _ANGLES], axis=1)
        bad = np.argwhere(~np.isfinite(angles))
        if len(bad):
            r, c = bad[0]
            raise UserError(where(args.ang, row=int(r) + 1, field=_ANGLES[c]), "not a number; give angles in degrees")
        origins = np.zeros((len(parts), 2))
        for j, c in enumerate(("rlnOriginXAngst", "rlnOriginYAngst")):
            if c in parts.columns:
                origins[:, j] = pd.to_numeric(parts[c], errors="coerce").fillna(0.0).to_numpy(np.float64) / apix
        optics = table.optics.copy()
    else:
        if args.ctf:
            raise UserError("--ctf", "the CTF parameters come from --ang; give a STAR file with them")
        apix = float(args.angpix) if args.angpix is not None else float(map_apix)
        if not (apix > 0):
            raise UserError("--angpix", f"the map header of {args.i} gives no pixel size; give --angpix")
        angles = np.array([[args.rot, args.tilt, args.psi]])
        origins = np.array([[args.xoff, args.yoff]])
        parts = pd.DataFrame({"rlnAngleRot": angles[:, 0], "rlnAngleTilt": angles[:, 1], "rlnAnglePsi": angles[:, 2],
                              "rlnOriginXAngst": origins[:, 0] * apix, "rlnOriginYAngst": origins[:, 1] * apix,
                              "rlnOpticsGroup": np.ones(1, dtype=np.int64)})
        optics = pd.DataFrame({"rlnOpticsGroup": np.ones(1, dtype=np.int64), "rlnOpticsGroupName": ["opticsGroup1"]})
        table = None

    ctf_kw = ctf_params(table, source=args.ang) if args.ctf else None
    # relion_project keeps the whole padded transform unless --maxres limits it
    r_max = box if args.maxres < 0 else math.ceil(box * apix / args.maxres)
    projector = Projector.from_map(vol, pad=args.pad, r_max=r_max, double=args.double)
    n = len(angles)
    images = np.empty((n, box, box), dtype=np.float32)
    for s in range(0, n, _CHUNK):
        sl = slice(s, min(n, s + _CHUNK))
        ctf = None
        if ctf_kw is not None:
            ctf = ctf_2d(box, apix, **{k: v[sl] for k, v in ctf_kw.items()},
                         ctf_intact_first_peak=args.ctf_intact_first_peak)
        images[sl] = project_images(projector, angles[sl, 0], angles[sl, 1], angles[sl, 2], origins=origins[sl],
                                    ctf=ctf)

    stack_path, star_path = _stack_names(args.o)
    out_parts = parts.copy()
    out_parts["rlnImageName"] = [f"{i + 1:06d}@{stack_path}" for i in range(n)]
    for c in ("rlnOriginX", "rlnOriginY"):
        out_parts = out_parts.drop(columns=c, errors="ignore")
    used = optics["rlnOpticsGroup"].isin(out_parts["rlnOpticsGroup"]) if "rlnOpticsGroup" in out_parts else None
    optics = optics[used].copy() if used is not None else optics
    optics["rlnImagePixelSize"] = apix
    optics["rlnImageSize"] = np.int64(box)
    optics["rlnImageDimensionality"] = np.int64(2)
    write_stack(stack_path, images, apix)
    write_particles(star_path, ParticleTable(optics=optics.reset_index(drop=True), particles=out_parts))
    print(f"cryodask project: wrote {n} projection{'s' if n != 1 else ''} of {args.i} to {stack_path} "
          f"and {star_path}")
    return 0
