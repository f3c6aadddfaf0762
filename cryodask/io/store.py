"""The particle store: all particle images of a job in one Zarr v3 group, with their RELION table.

``cryodask import`` converts a RELION ``particles.star`` and its MRC stacks into::

    store.zarr/
      zarr.json        the group; attributes ``{"cryodask": {"format", "version", "manifest"}}``
      images/          (N, B, B) float32 or float16, chunks of C particles, uncompressed, no sharding
        zarr.json
        c/<i>/0/0      chunk i = particles i*C .. (i+1)*C-1, one file each
      particles.star   the full RELION table (optics + particles), row k = images[k]
      manifest.json    identity and content hashes (below)

Design choices (and why):

* **Chunks are the unit of everything**: reading, writing, hashing, staging to
  scratch and the E-step tasks. Every chunk is written once, whole, by one
  process, so there is no partial-chunk race. No sharding: with chunks of a few
  MB the file count stays small (100k particles at box 128 = 391 files), and
  sharding would make the shard, not the chunk, the unit that must be written in
  one go (unaligned shard writes from several processes lose data).
* **No compression**: noise-dominated particle images compress by only
  1.04-1.12x, and uncompressed chunks read fastest. ``--float16`` halves the size.
* **Metadata as a STAR file** inside the store (``particles.star``, written by
  :func:`cryodask.io.star.write_particles`): any later job gets the complete RELION
  table back, every column, in store order, and RELION tools can read it. The
  ``rlnImageName`` column keeps the original ``N@stack.mrcs`` names: they are the
  particles' identities (and what output STAR files refer to); the pixels come
  from ``images``. After ``--new_box`` the optics table holds the new
  ``rlnImageSize`` and ``rlnImagePixelSize``; origins in Å need no change.
* **Manifest** (``manifest.json``): format version, particle count, a hash of the
  ordered ``rlnImageName`` list (``particles_hash``) and of the sorted list
  (``particle_set_hash``, so "same particles, other order" can be told apart),
  box, pixel size, stored dtype, chunk size, and per chunk the BLAKE2b-256 of the
  chunk's particles as stored (little-endian bytes of ``images[i*C:(i+1)*C]``
  in the stored dtype) and the size of its file. The list of names itself is the
  ``rlnImageName`` column of ``particles.star``.

Fourier cropping (``--new_box``) follows RELION's ``resizeMap`` exactly: forward
FFT divided by the number of pixels (RELION's convention), keep the frequencies
``0..B/2`` and ``-(B/2-1)..-1`` along y and ``0..B/2`` along x of the Hermitian
half, inverse FFT without division. Because the forward transform is normalised
by the old pixel count and the inverse is not, pixel values stay comparable: the
mean (the DC term) is unchanged, a band-limited image is resampled exactly on
the coarser grid, and white noise of variance s2 keeps only the fraction
(B/B0)^2 of its variance that lay below the new Nyquist. This matches
``relion_image_handler --rescale_angpix`` to float precision.

Importing streams: a reader thread reads chunk i+1 from the MRC stacks while the
main thread crops, writes and hashes chunk i; at most about four chunks are in
memory (one being read, one queued, one being written, and the FFT of one with
``--new_box``), whatever the number of particles.
The store is built under ``<store>.tmp-<pid>`` and renamed when complete, so a
killed import never leaves something that looks like a store.

Every later job takes either a STAR file or a store: :func:`open_particles`
returns a :class:`ParticleStore` or a :class:`StarParticles`, which serve the same
chunks (``table``, ``n_chunks``, ``chunk_slices()``, ``read_chunk(i)``).
"""

from __future__ import annotations

import contextlib
import dataclasses
import hashlib
import json
import math
import os
import queue
import shutil
import threading
import time
from collections.abc import Iterator, Sequence
from functools import cached_property
from pathlib import Path
from typing import Any

import numpy as np

from cryodask.errors import UserError

FORMAT = "cryodask-particle-store"
VERSION = 1
MANIFEST = "manifest.json"
TABLE = "particles.star"
IMAGES = "images"
HASH = "blake2b-256"
#: Fields that identify a store's content; two stores (or a store and its scratch copy)
#: with equal values hold the same particles in the same order with the same pixels.
IDENTITY_FIELDS = ("n_particles", "particle_set_hash", "particles_hash", "box", "pixel_size", "dtype",
                   "chunk", "chunk_hashes")

_CHUNK_TARGET_BYTES = 16 * 2**20  # float32 bytes per chunk for the default chunk size
_FLOAT16_MAX = float(np.finfo(np.float16).max)

PathLike = str | os.PathLike[str]


# ---------------------------------------------------------------------------------------------
# small pieces


def default_chunk(box: int) -> int:
    """Particles per chunk: a power of two near 16 MB of float32 images, between 16 and 1024.

    Box 64 gives 1024, box 128 gives 256, box 256 gives 64, box 400 gives 32.
    The chunk size does not depend on the stored dtype, so a float16 store has the
    same chunks (and tasks) as its float32 twin.
    """
    per_image = 4 * box * box
    n = 2 ** round(math.log2(max(1.0, _CHUNK_TARGET_BYTES / per_image)))
    return int(min(1024, max(16, n)))


def fourier_crop(images: Any, new_box: int) -> Any:
    """Downsample ``(..., B0, B0)`` images to ``(..., B, B)`` by cropping their Fourier transform.

    RELION's ``resizeMap`` convention: forward FFT divided by ``B0**2``, keep
    ``ky`` in ``0..B/2`` and ``-(B/2-1)..-1``, ``kx`` in ``0..B/2``, inverse FFT
    without division, so the mean and the values of band-limited images are
    preserved. The pixel size grows by ``B0 / B``. NumPy or CuPy in, same out;
    float32 in gives float32 out.

    Parameters
    ----------
    images
        Real images with an even square box ``B0``.
    new_box
        Even ``B < B0``.
    """
    from cryodask.ops.filters import fourier_crop as crop

    b0 = images.shape[-1]
    if images.shape[-2] != b0 or new_box % 2 or not 0 < new_box < b0 or b0 % 2:
        raise ValueError(f"fourier_crop needs even square images and an even new box below {b0}, got "
                         f"{images.shape[-2:]} -> {new_box}")
    out = crop(images, new_box, ndim=2)
    return out.astype(images.dtype if images.dtype in (np.float32, np.float64) else np.float32, copy=False)


def chunk_hash(data: np.ndarray) -> str:
    """BLAKE2b-256 (hex) of an array's little-endian bytes, as a chunk is stored."""
    a = np.ascontiguousarray(data)
    if a.dtype.byteorder == ">" or (a.dtype.byteorder == "=" and np.little_endian is False):
        a = a.astype(a.dtype.newbyteorder("<"))
    return hashlib.blake2b(memoryview(a).cast("B"), digest_size=32).hexdigest()


def names_hash(names: Sequence[str]) -> str:
    """BLAKE2b-256 of the names joined by newlines (the order matters)."""
    h = hashlib.blake2b(digest_size=32)
    for n in names:
        h.update(str(n).encode())
        h.update(b"\n")
    return h.hexdigest()


def compare_manifests(have: dict[str, Any], want: dict[str, Any], *, have_name: str = "the copy",
                      want_name: str = "the store") -> list[str]:
    """Differences between two manifests, in words, most telling first ([] when they match).

    E.g. ``["the copy has box 128, the store has box 64"]``.
    """
    diffs: list[str] = []
    for f in ("format", "version"):
        if have.get(f) != want.get(f):
            diffs.append(f"{have_name} has {f} {have.get(f)!r}, {want_name} has {f} {want.get(f)!r}")
    if have.get("n_particles") != want.get("n_particles"):
        diffs.append(f"{have_name} has {have.get('n_particles')} particles, {want_name} has "
                     f"{want.get('n_particles')}")
    elif have.get("particle_set_hash") != want.get("particle_set_hash"):
        diffs.append(f"{have_name} holds different particles (other rlnImageName) than {want_name}")
    elif have.get("particles_hash") != want.get("particles_hash"):
        diffs.append(f"{have_name} holds the same particles as {want_name} but in a different order")
    for f, label in (("box", "box"), ("pixel_size", "pixel size"), ("dtype", "dtype"), ("chunk", "chunk size")):
        if have.get(f) != want.get(f):
            diffs.append(f"{have_name} has {label} {have.get(f)}, {want_name} has {label} {want.get(f)}")
    if not diffs:
        ha, wa = have.get("chunk_hashes") or [], want.get("chunk_hashes") or []
        bad = [i for i, (a, b) in enumerate(zip(ha, wa)) if a != b]
        if len(ha) != len(wa):
            diffs.append(f"{have_name} has {len(ha)} chunks, {want_name} has {len(wa)}")
        elif bad:
            diffs.append(f"{have_name} has different pixel values in chunk {bad[0]}"
                         + (f" and {len(bad) - 1} more" if len(bad) > 1 else "") + f" than {want_name}")
    return diffs


def _format_bytes(n: float) -> str:
    for unit in ("B", "KB", "MB", "GB", "TB"):
        if abs(n) < 1000 or unit == "TB":
            return f"{n:.0f} {unit}" if unit == "B" else f"{n:.2f} {unit}"
        n /= 1000
    return f"{n:.2f} TB"


def disk_size(path: PathLike) -> int:
    """Bytes of all files under ``path``."""
    total = 0
    for root, _, files in os.walk(path):
        for f in files:
            with contextlib.suppress(OSError):
                total += os.stat(os.path.join(root, f)).st_size
    return total


def is_store(path: PathLike) -> bool:
    """True when ``path`` is a folder holding a cryodask particle store (zarr.json + manifest.json)."""
    p = Path(path)
    return p.is_dir() and (p / "zarr.json").is_file() and (p / MANIFEST).is_file()


# ---------------------------------------------------------------------------------------------
# the store


class ParticleStore:
    """An opened particle store (see the module docstring for the layout).

    Attributes
    ----------
    path
        The store folder.
    manifest
        The parsed ``manifest.json``.
    images
        The ``images`` :class:`zarr.Array` ``(N, B, B)``, float32 or float16.
    """

    def __init__(self, path: PathLike) -> None:
        import zarr

        self.path = Path(path)
        if not self.path.exists():
            raise UserError(self.path, "particle store not found; check the path or run cryodask import first")
        if not is_store(self.path):
            raise UserError(self.path, "not a cryodask particle store (no zarr.json and manifest.json inside); "
                                       "create one with cryodask import --i particles.star --o store.zarr")
        try:
            self.manifest: dict[str, Any] = json.loads((self.path / MANIFEST).read_text())
        except (OSError, ValueError) as err:
            raise UserError(self.path / MANIFEST, f"cannot read the manifest ({err}); the store is damaged: "
                                                  "import it again") from None
        m = self.manifest
        if m.get("format") != FORMAT:
            raise UserError(self.path / MANIFEST, f"not a cryodask particle store manifest (format "
                                                  f"{m.get('format')!r}); import the particles again")
        if not isinstance(m.get("version"), int) or m["version"] > VERSION:
            raise UserError(self.path / MANIFEST, f"store format version {m.get('version')} is newer than this "
                                                  f"cryodask reads ({VERSION}); upgrade cryodask")
        try:
            self.images = zarr.open_array(str(self.path / IMAGES), mode="r")
        except Exception as err:  # zarr raises several types for a missing / bad array
            raise UserError(self.path / IMAGES, f"cannot open the image array ({err}); the store is damaged: "
                                                "import it again") from None
        n, b, c = m["n_particles"], m["box"], m["chunk"]
        if tuple(self.images.shape) != (n, b, b) or tuple(self.images.chunks) != (c, b, b):
            raise UserError(self.path, f"image array is {self.images.shape} in chunks of {self.images.chunks} but "
                                       f"the manifest says {n} particles of {b} x {b} in chunks of {c}; the store is "
                                       "damaged: import it again")

    # -- description
    @property
    def n_particles(self) -> int:
        return int(self.manifest["n_particles"])

    def __len__(self) -> int:
        return self.n_particles

    @property
    def box(self) -> int:
        return int(self.manifest["box"])

    @property
    def pixel_size(self) -> float:
        """Pixel size in Å of the stored images (after any Fourier crop)."""
        return float(self.manifest["pixel_size"])

    @property
    def dtype(self) -> np.dtype:
        """Stored dtype (float32 or float16); :meth:`read_chunk` always returns float32."""
        return np.dtype(self.manifest["dtype"])

    @property
    def chunk(self) -> int:
        return int(self.manifest["chunk"])

    @property
    def n_chunks(self) -> int:
        return int(self.manifest["n_chunks"])

    @cached_property
    def table(self):  # -> ParticleTable
        """The RELION table (optics + particles) in store order, read on first use."""
        from cryodask.io.star import read_particles

        table = read_particles(self.path / TABLE)
        if len(table) != self.n_particles:
            raise UserError(self.path / TABLE, f"has {len(table)} particles but the store holds "
                                               f"{self.n_particles}; the store is damaged: import it again")
        return table

    def chunk_slices(self) -> list[slice]:
        """``slice`` of particle rows per chunk, in order."""
        c, n = self.chunk, self.n_particles
        return [slice(i * c, min(n, (i + 1) * c)) for i in range(self.n_chunks)]

    def chunk_file(self, i: int) -> Path:
        """The file holding chunk ``i`` (zarr's default v3 chunk key)."""
        return self.path / IMAGES / self.images.metadata.encode_chunk_key((i, 0, 0))

    def _check_index(self, i: int) -> slice:
        if not 0 <= i < self.n_chunks:
            raise IndexError(f"chunk {i} out of range: the store has {self.n_chunks} chunks")
        return self.chunk_slices()[i]

    def read_chunk_stored(self, i: int) -> np.ndarray:
        """Chunk ``i`` in the stored dtype (what the chunk hash covers)."""
        s = self._check_index(i)
        # zarr returns the fill value for a missing chunk file: refuse instead of serving zeros.
        if not self.chunk_file(i).is_file():
            raise UserError(self.chunk_file(i), f"chunk {i} (particles {s.start + 1}-{s.stop}) is missing: the "
                                                "store is incomplete or damaged; import it again")
        return np.asarray(self.images[s])

    def read_chunk(self, i: int) -> np.ndarray:
        """Chunk ``i`` as float32 ``(n_i, B, B)``."""
        return self.read_chunk_stored(i).astype(np.float32, copy=False)

    def verify(self, chunks: Sequence[int] | None = None) -> None:
        """Re-hash chunks (default all) against the manifest.

        Raises
        ------
        UserError
            Naming the first chunk whose content differs or whose file is missing.
        """
        hashes = self.manifest["chunk_hashes"]
        for i in range(self.n_chunks) if chunks is None else chunks:
            got = chunk_hash(self.read_chunk_stored(i))
            if got != hashes[i]:
                s = self.chunk_slices()[i]
                raise UserError(self.chunk_file(i), f"chunk {i} (particles {s.start + 1}-{s.stop}) differs from "
                                                    "the manifest: the store is damaged; import it again")

    def __repr__(self) -> str:
        return (f"ParticleStore({str(self.path)!r}: {self.n_particles} particles, box {self.box}, "
                f"{self.pixel_size:g} Å/px, {self.dtype}, {self.n_chunks} chunks of {self.chunk})")

    def __reduce__(self):  # ship the path, not the arrays or the table
        return (ParticleStore, (str(self.path),))


def open_store(path: PathLike) -> ParticleStore:
    """Open a particle store written by :func:`import_particles` (read-only)."""
    return ParticleStore(path)


class StarParticles:
    """Particles served straight from a STAR file and its MRC stacks, chunk by chunk.

    The same reading interface as :class:`ParticleStore` (``table``, ``n_chunks``,
    ``chunk_slices()``, ``read_chunk(i)``, ``box``, ``pixel_size``), without a
    manifest. Stack paths are resolved against ``base_dirs``: by default the
    working directory at open time (RELION's project folder), then the STAR
    file's folder.
    """

    manifest = None

    def __init__(self, path: PathLike, *, chunk: int | None = None, angpix: float | None = None,
                 base_dirs: Sequence[PathLike] | None = None) -> None:
        from cryodask.io.star import read_particles

        self.path = Path(path)
        self.table = read_particles(self.path, angpix=angpix)
        _check_table(self.path, self.table)
        self.base_dirs = _base_dirs(self.path) if base_dirs is None else [Path(b) for b in base_dirs]
        self.box = _table_box(self.path, self.table, self.base_dirs)
        self.pixel_size = float(self.table.pixel_size())
        self.chunk = min(_check_chunk(chunk, self.box, len(self.table)), len(self.table))
        self._names = self.table.particles["rlnImageName"].astype(str).tolist()

    @property
    def n_particles(self) -> int:
        return len(self._names)

    def __len__(self) -> int:
        return self.n_particles

    @property
    def n_chunks(self) -> int:
        return -(-self.n_particles // self.chunk)

    dtype = np.dtype(np.float32)

    def chunk_slices(self) -> list[slice]:
        c, n = self.chunk, self.n_particles
        return [slice(i * c, min(n, (i + 1) * c)) for i in range(self.n_chunks)]

    def read_chunk(self, i: int) -> np.ndarray:
        from cryodask.io.mrc import read_images

        if not 0 <= i < self.n_chunks:
            raise IndexError(f"chunk {i} out of range: {self.n_chunks} chunks")
        s = self.chunk_slices()[i]
        images = read_images(self._names[s], base_dir=self.base_dirs, source=self.path, first_row=s.start + 1,
                             dtype=np.float32)
        _check_box(self.path, images, self.box, s.start)
        return images

    def __repr__(self) -> str:
        return (f"StarParticles({str(self.path)!r}: {self.n_particles} particles, box {self.box}, "
                f"{self.pixel_size:g} Å/px, {self.n_chunks} chunks of {self.chunk})")


def open_particles(path: PathLike, *, chunk: int | None = None,
                   angpix: float | None = None) -> ParticleStore | StarParticles:
    """Open particles from a STAR file or a particle store, told apart by content.

    Parameters
    ----------
    path
        A particle store folder (holding ``zarr.json``; its ``zarr.json`` file also
        works) or a RELION particles STAR file.
    chunk, angpix
        For a STAR file only: particles per chunk, and the pixel size when the
        file does not give it.

    Raises
    ------
    UserError
        The path does not exist, or is neither a STAR file nor a particle store.
    """
    p = Path(path)
    if p.is_file() and p.name == "zarr.json":
        p = p.parent
    if p.is_dir():
        if (p / "zarr.json").is_file():
            return open_store(p)
        raise UserError(p, "is a folder but not a particle store (no zarr.json inside); give a particles STAR "
                           "file or a store made by cryodask import")
    if not p.exists():
        raise UserError(p, "file not found; give a particles STAR file or a particle store")
    try:
        with open(p, "rb") as f:
            head = f.read(65536)
    except OSError as err:
        raise UserError(p, f"cannot read it ({err.strerror or err}); check the permissions") from None
    text = head.decode("utf-8", errors="replace")
    if b"\0" in head or "data_" not in text:
        kind = "an MRC image" if len(head) >= 212 and head[208:212] == b"MAP " else "not a STAR file"
        raise UserError(p, f"is {kind}, neither a STAR file nor a particle store; give the particles STAR file "
                           "(e.g. Extract/job012/particles.star) or a store made by cryodask import")
    return StarParticles(p, chunk=chunk, angpix=angpix)


# ---------------------------------------------------------------------------------------------
# import


def _base_dirs(star: Path) -> list[Path]:
    """Where relative stack paths are looked for: the working (project) folder, then the STAR file's folder."""
    dirs = [Path.cwd().resolve(), star.resolve().parent]
    return dirs[:1] if dirs[0] == dirs[1] else dirs


#: a small data set is still cut into about this many chunks (at least _MIN_SPLIT_CHUNK particles each),
#: so that every worker has tasks; the rule depends on the data alone, so the same seed gives the
#: same chunks, and the same result, on any cluster
_TARGET_CHUNKS = 16
_MIN_SPLIT_CHUNK = 32


def data_chunk(box: int, n_particles: int) -> int:
    """The default particles per chunk of a data set: :func:`default_chunk`, or fewer for a small
    data set, so that it still makes about 16 tasks (at least 32 particles each)."""
    return int(min(default_chunk(box), max(_MIN_SPLIT_CHUNK, math.ceil(n_particles / _TARGET_CHUNKS))))


def _check_chunk(chunk: int | None, box: int, n_particles: int | None = None) -> int:
    if chunk is None:
        return default_chunk(box) if n_particles is None else data_chunk(box, n_particles)
    if int(chunk) != chunk or chunk < 1:
        raise UserError("--chunk", f"{chunk} is not a positive whole number of particles; give e.g. --chunk 256")
    return int(chunk)


def _check_table(star: Path, table) -> None:
    """Refuse tables import cannot turn into one store: no particles, mixed boxes or pixel sizes."""
    parts = table.particles
    if len(parts) == 0:
        raise UserError(star, "the particles loop is empty: there is nothing to import; check that you gave the "
                              "right STAR file")
    if "rlnImageName" not in parts.columns:
        raise UserError(star, "no rlnImageName column: these are not extracted particles; give the particles "
                              "STAR file written by Extract (or Select, Refine...)")
    optics = table.optics
    if optics is not None and len(optics) > 1 and "rlnOpticsGroup" in parts.columns:
        used = optics[optics["rlnOpticsGroup"].isin(parts["rlnOpticsGroup"].unique())]
        for col, label, fix in (
            ("rlnImageSize", "box sizes", "re-extract all groups at one box size"),
            ("rlnImagePixelSize", "pixel sizes", "rescale the groups to one pixel size (re-extract with "
                                                 "--rescale, or relion_image_handler --rescale_angpix)"),
        ):
            if col in used.columns and used[col].nunique() > 1:
                vals = ", ".join(f"group {g}: {v:g}" for g, v in zip(used["rlnOpticsGroup"], used[col]))
                raise UserError(star, f"optics groups have different {label} ({vals}); one store holds one box "
                                      f"and pixel size: {fix}, or import the groups separately "
                                      "(relion_star_handler --select rlnOpticsGroup)")


def _table_box(star: Path, table, base_dirs: list[Path]) -> int:
    """The box: ``rlnImageSize`` when the optics table gives it, else the first particle's image size."""
    if "rlnImageSize" in table.optics.columns:
        return int(table.box_size())
    from cryodask.io.mrc import read_images

    first = read_images(table.particles["rlnImageName"].iloc[:1].astype(str).tolist(), base_dir=base_dirs,
                        source=star, dtype=np.float32, check_finite=False)
    return int(first.shape[-1])


def _check_box(star: Path, images: np.ndarray, box: int, first: int) -> None:
    if images.shape[-1] != box:
        b = images.shape[-1]
        raise UserError(star, f"the images from row {first + 1} on are {b} x {b} pixels, the first ones {box} x "
                              f"{box} (rlnImageSize or the first stack); one store holds one box: re-extract the "
                              "particles at one box size, or import them separately")


def _reader(star: Path, names: list[str], slices: list[slice], box: int, base_dirs: list[Path], out: queue.Queue,
            stop: threading.Event) -> None:
    """Read chunk after chunk into ``out``: ``(i, images)``, then ``None``; or ``(None, exception)``.

    A chunk is read in a few sub-batches into one preallocated array, which keeps
    ``read_images``' temporaries (it holds about three copies of what it reads)
    to a fraction of a chunk.
    """
    from cryodask.io.mrc import read_images

    def put(item) -> bool:
        while not stop.is_set():
            try:
                out.put(item, timeout=0.2)
                return True
            except queue.Full:
                continue
        return False

    try:
        for i, s in enumerate(slices):
            images = np.empty((s.stop - s.start, box, box), np.float32)
            step = max(16, -(-(s.stop - s.start) // 4))
            for a in range(s.start, s.stop, step):
                b = min(s.stop, a + step)
                try:
                    part = read_images(names[a:b], base_dir=base_dirs, source=star, first_row=a + 1,
                                       dtype=np.float32, check_finite=True)
                except OSError as err:  # e.g. a stack removed or an I/O error while it is read
                    raise UserError(star, f"cannot read the images of rows {a + 1}-{b} ({err.strerror or err}); "
                                          "check the stacks and the file system") from None
                _check_box(star, part, box, a)
                images[a - s.start:b - s.start] = part
                del part
            if not put((i, images)):
                return
            del images
        put(None)
    except BaseException as err:  # handed to the main thread, which raises it
        put((None, err))


def _store_dtype(images: np.ndarray, float16: bool, star: Path, first: int) -> np.ndarray:
    if not float16:
        return images.astype(np.float32, copy=False)
    big = np.abs(images).max(axis=(1, 2)) > _FLOAT16_MAX
    if big.any():
        k = int(np.flatnonzero(big)[0])
        raise UserError(star, f"row {first + k + 1}: image values exceed the float16 range (±65504); import "
                              "without --float16, or normalise the particles first")
    return images.astype(np.float16)


def import_particles(star_path: PathLike, store_path: PathLike, *, float16: bool = False,
                     new_box: int | None = None, chunk: int | None = None, angpix: float | None = None,
                     overwrite: bool = False) -> ParticleStore:
    """Convert a RELION particles STAR file and its MRC stacks into a particle store.

    Parameters
    ----------
    star_path
        Particles STAR file (RELION 3.0, 3.1/4 or 5). Stack paths in ``rlnImageName``
        are resolved against the working directory (RELION's project folder), then
        the STAR file's folder.
    store_path
        Output folder, e.g. ``particles.zarr``; must not exist unless ``overwrite``.
    float16
        Store half-precision pixels (half the disk; read back as float32).
    new_box
        Fourier-crop to this even box below the current one (RELION's ``resizeMap``
        normalisation: means and band-limited values are preserved); the pixel size
        becomes ``angpix * box / new_box``.
    chunk
        Particles per chunk; default :func:`data_chunk` (~16 MB of float32, or fewer particles
        when the data set would make fewer than 16 chunks).
    angpix
        Pixel size in Å when the STAR file does not give one (passed to ``read_particles``).
    overwrite
        Replace an existing particle store at ``store_path`` (never anything else).

    Returns
    -------
    ParticleStore
        The new store, opened.

    Raises
    ------
    UserError
        Missing or truncated stacks, NaN images, mixed box or pixel sizes, odd boxes,
        an empty table, a bad ``new_box`` or ``chunk``, or an existing output. Nothing
        is left at ``store_path`` (or the old store is kept) when it is raised.
    """
    import zarr

    from cryodask import __version__
    from cryodask.io.star import read_particles, write_particles

    star = Path(star_path)
    out = Path(store_path)
    if out.name in ("", ".", ".."):
        raise UserError(out, "give the store a name, e.g. --o particles.zarr")
    parent = out.parent
    if not parent.is_dir():
        raise UserError(out, f"folder {parent} does not exist; create it or choose another output path")
    if out.exists() or out.is_symlink():
        if not overwrite:
            raise UserError(out, "already exists; choose another --o, or add --overwrite to replace it")
        if not is_store(out):
            raise UserError(out, "exists and is not a cryodask particle store, so --overwrite will not delete it; "
                                 "remove it yourself or choose another --o")

    table = read_particles(star, angpix=angpix)
    _check_table(star, table)
    base_dirs = _base_dirs(star)
    box0 = _table_box(star, table, base_dirs)
    angpix0 = float(table.pixel_size())
    if box0 % 2:
        raise UserError(star, f"the box is {box0} pixels, an odd size; RELION refines only even boxes: re-extract "
                              "with an even box or resize the stacks (relion_image_handler --new_box)")
    box = box0
    if new_box is not None:
        if int(new_box) != new_box or new_box % 2 or not 0 < new_box < box0:
            raise UserError("--new_box", f"{new_box} must be an even number of pixels below the current box "
                                         f"{box0}, e.g. --new_box {max(2, (box0 // 2) // 2 * 2)}")
        box = int(new_box)
    chunk = min(_check_chunk(chunk, box, len(table)), len(table))  # a chunk larger than the data set wastes disk
    angpix_new = angpix0 * box0 / box
    dtype = np.dtype(np.float16 if float16 else np.float32)

    parts = table.particles
    names = parts["rlnImageName"].astype(str).tolist()
    n = len(names)
    n_chunks = -(-n // chunk)
    slices = [slice(i * chunk, min(n, (i + 1) * chunk)) for i in range(n_chunks)]

    tmp = parent / f"{out.name}.tmp-{os.getpid()}"
    if tmp.exists():
        shutil.rmtree(tmp)
    stop = threading.Event()
    q: queue.Queue = queue.Queue(maxsize=1)
    reader = threading.Thread(target=_reader, args=(star, names, slices, box0, base_dirs, q, stop),
                              name="cryodask-import-reader", daemon=True)
    try:
        group = zarr.create_group(str(tmp), attributes={"cryodask": {"format": FORMAT, "version": VERSION,
                                                                    "manifest": MANIFEST}})
        arr = group.create_array(IMAGES, shape=(n, box, box), dtype=dtype, chunks=(chunk, box, box),
                                 shards=None, compressors=None, fill_value=0,
                                 dimension_names=("particle", "y", "x"),
                                 config={"write_empty_chunks": True})
        hashes: list[str | None] = [None] * n_chunks
        reader.start()
        done = 0
        while done < n_chunks:
            item = q.get()
            if item is None:
                break
            i, images = item
            if i is None:
                raise images
            s = slices[i]
            if box != box0:
                images = fourier_crop(images, box)
            stored = _store_dtype(images, float16, star, s.start)
            del images
            arr[s] = stored  # whole, aligned chunk: one writer per chunk file
            hashes[i] = chunk_hash(stored)
            del stored
            done += 1
        if done != n_chunks:  # the reader stopped early without an error: never expected
            raise RuntimeError(f"import read {done} of {n_chunks} chunks")

        # the table, in store order, with the optics of the stored images
        optics = table.optics.copy()
        optics["rlnImageSize"] = box  # also filled in when the file did not give it (RELION <= 3.0)
        if box != box0:
            optics["rlnImagePixelSize"] = angpix_new
        write_particles(tmp / TABLE, dataclasses.replace(table, optics=optics))

        chunk_files = [tmp / IMAGES / arr.metadata.encode_chunk_key((i, 0, 0)) for i in range(n_chunks)]
        manifest = {
            "format": FORMAT,
            "version": VERSION,
            "created_by": f"cryodask {__version__}",
            "created": time.strftime("%Y-%m-%dT%H:%M:%S%z"),
            "source": str(star.resolve()),
            "n_particles": n,
            "particles_hash": names_hash(names),
            "particle_set_hash": names_hash(sorted(names)),
            "box": box,
            "pixel_size": angpix_new,
            "original_box": box0,
            "original_pixel_size": angpix0,
            "fourier_crop": box != box0,
            "dtype": dtype.name,
            "chunk": chunk,
            "n_chunks": n_chunks,
            "hash": HASH,
            "chunk_hashes": hashes,
            "chunk_nbytes": [f.stat().st_size for f in chunk_files],
            "table": TABLE,
        }
        (tmp / MANIFEST).write_text(json.dumps(manifest, indent=1))

        # swap in: an old store (with --overwrite) is moved aside first and removed last
        old = None
        if out.exists():
            old = parent / f"{out.name}.old-{os.getpid()}"
            os.replace(out, old)
        os.replace(tmp, out)
        if old is not None:
            shutil.rmtree(old, ignore_errors=True)
    except BaseException as err:
        stop.set()
        if reader.is_alive():
            reader.join(timeout=10)
        shutil.rmtree(tmp, ignore_errors=True)
        if isinstance(err, OSError):  # writing failed: disk full, permissions, quota...
            raise UserError(out, f"cannot write the store ({err.strerror or err}); check the free space and "
                                 f"permissions of {parent}, or choose another --o") from None
        raise
    finally:
        stop.set()
    return open_store(out)


def summary(store: ParticleStore, seconds: float | None = None) -> str:
    """One line: particles, box, pixel size, dtype, size on disk, time."""
    m = store.manifest
    crop = (f" (Fourier-cropped from box {m['original_box']} at {m['original_pixel_size']:g} Å)"
            if m.get("fourier_crop") else "")
    t = f" in {seconds:.1f} s" if seconds is not None else ""
    return (f"{store.path}: {store.n_particles} particles, box {store.box}, pixel size {store.pixel_size:g} Å{crop}, "
            f"{store.dtype}, {store.n_chunks} chunks of {store.chunk}, {_format_bytes(disk_size(store.path))} "
            f"on disk{t}")


def iter_chunks(particles: ParticleStore | StarParticles) -> Iterator[tuple[slice, np.ndarray]]:
    """``(rows, float32 images)`` for each chunk in order (serial; for scripts and tests)."""
    for i, s in enumerate(particles.chunk_slices()):
        yield s, particles.read_chunk(i)
