"""Import particles: a RELION STAR file and its MRC stacks into one Zarr particle store.

The store holds the images (float32, or float16 with --float16) in chunks of
particles, the full RELION table (optics and particles, as particles.star inside
the store) and a manifest with the particles' identity and a hash per chunk.
Every later job accepts the store, or the STAR file directly.

--new_box B Fourier-crops the images to box B at import (RELION's resizeMap:
means and band-limited values are preserved); the pixel size becomes
angpix * box / B, and the best reachable resolution 2 x the new pixel size.
Stack paths are resolved against the current folder (RELION's project folder),
then against the STAR file's folder.

Examples:

  cryodask import --i Extract/job012/particles.star --o particles.zarr
  cryodask import --i particles.star --o particles_bin2.zarr --new_box 128 --float16
  cryodask import --i particles.star --o particles.zarr --chunk 512 --overwrite
"""

from __future__ import annotations

import argparse


def add_args(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--i", required=True, metavar="STAR", help="input particles STAR file")
    parser.add_argument("--o", required=True, metavar="STORE", help="output particle store (a folder, e.g. particles.zarr)")
    parser.add_argument("--float16", action="store_true", help="store pixels as float16 (half the disk; read back as float32)")
    parser.add_argument("--new_box", type=int, default=None, metavar="B",
                        help="Fourier-crop the images to this even box size, below the current one")
    parser.add_argument("--chunk", type=int, default=None, metavar="N",
                        help="particles per chunk (default: about 16 MB of float32 images, e.g. 256 at box 128; "
                             "a small data set still gets about 16 chunks of at least 32)")
    parser.add_argument("--angpix", type=float, default=None, metavar="A",
                        help="pixel size in Å, when the STAR file does not give one")
    parser.add_argument("--overwrite", action="store_true", help="replace an existing particle store at --o")


def main(args: argparse.Namespace) -> int:
    import time

    from cryodask.io.store import import_particles, summary

    t0 = time.perf_counter()
    store = import_particles(args.i, args.o, float16=args.float16, new_box=args.new_box, chunk=args.chunk,
                             angpix=args.angpix, overwrite=args.overwrite)
    seconds = time.perf_counter() - t0
    m = store.manifest
    if m.get("fourier_crop"):
        print(f"Fourier-cropped box {m['original_box']} -> {m['box']}: pixel size {m['original_pixel_size']:g} -> "
              f"{m['pixel_size']:g} Å; best reachable resolution {2 * m['pixel_size']:.3g} Å (Nyquist)")
    print(summary(store, seconds))
    return 0
