"""MRC maps and particle stacks, read and written the way RELION does.

Maps are ``(Z, Y, X)`` float32 arrays with a voxel size in Å; particle stacks are
``(N, Y, X)``. Particles are named as in RELION's ``rlnImageName``:
``000012@Particles/stack.mrcs`` is the 12th image of that stack (RELION counts
from 1; the functions here return 0-based indices).

Headers are read with :mod:`mrcfile` in permissive mode, because RELION itself
writes headers that strict readers reject (no ``MAP `` id, no machine stamp,
``nversion`` 0, voxel size 0). Those cosmetic faults are accepted; what would
make the data wrong is refused with a :class:`~cryodask.errors.UserError`: a
file shorter than its header says, impossible dimensions, or a mode that is not
a real-valued image mode. Data are memory-mapped with :class:`numpy.memmap` at
the offset the header gives, so nothing is read until it is used.

Output files go through :func:`cryodask.io.atomic.atomic_path` and are float32
(mode 2), which every RELION version reads.
"""

from __future__ import annotations

import math
import os
import warnings
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path

import mrcfile
import numpy as np
import numpy.typing as npt

from cryodask.errors import UserError, where
from cryodask.io.atomic import atomic_path

#: Modes RELION and cryodask read: 0 int8, 1 int16, 2 float32, 6 uint16, 12 float16.
SUPPORTED_MODES = {0: np.int8, 1: np.int16, 2: np.float32, 6: np.uint16, 12: np.float16}
_MODE_NAMES = {0: "int8", 1: "int16", 2: "float32", 3: "complex int16", 4: "complex float32",
               6: "uint16", 12: "float16", 101: "packed 4-bit"}
_HEADER_BYTES = 1024
# A dimension beyond this is a corrupt header, not a real image (RELION's largest
# micrographs are ~12k pixels; tomograms have a few thousand slices).
_MAX_DIM = 1 << 20

PathLike = str | os.PathLike[str]


@dataclass(frozen=True)
class StackInfo:
    """What an MRC header says about its data, checked against the file size.

    Attributes
    ----------
    path
        The file.
    n, ny, nx
        Number of images (``nz`` of the header: sections of a volume count as
        images, as in RELION) and the image size in pixels.
    voxel_size
        Pixel size in Å along X (``cella.x / mx``, what RELION reports as angpix);
        NaN when unset (0).
    voxel_size_xyz
        The header's ``(x, y, z)`` voxel sizes, for callers that check anisotropy.
    mode
        MRC mode number (0, 1, 2, 6 or 12).
    dtype
        NumPy dtype of the stored data, with the file's byte order.
    offset
        Byte offset of the first pixel (1024 + extended header).
    """

    path: Path
    n: int
    ny: int
    nx: int
    voxel_size: float
    voxel_size_xyz: tuple[float, float, float]
    mode: int
    dtype: np.dtype
    offset: int

    @property
    def shape(self) -> tuple[int, int, int]:
        return (self.n, self.ny, self.nx)

    @property
    def nbytes(self) -> int:
        """Size of the data block in bytes."""
        return self.n * self.ny * self.nx * self.dtype.itemsize


def _voxel(v: float) -> float:
    # Headers store the cell in float32: round off the float32 noise (234.24 / 48
    # reads 4.8800001), keeping the 7 significant digits the header can carry.
    v = float(v)
    return float(f"{v:.7g}") if v > 0 and math.isfinite(v) else math.nan


def stack_info(path: PathLike) -> StackInfo:
    """Read and validate an MRC header without touching the data.

    Parameters
    ----------
    path
        An MRC map, image or stack (``.mrc`` / ``.mrcs``; the extension does not matter).

    Returns
    -------
    StackInfo

    Raises
    ------
    UserError
        The file is missing, is not an MRC file, has an unsupported mode, or is
        shorter than its header says (truncated copy or interrupted write).
    """
    path = Path(path)
    if not path.is_file():
        what = "is a folder, not an MRC file" if path.is_dir() else "file not found"
        raise UserError(path, f"{what}; check the path")
    size = path.stat().st_size
    if size < _HEADER_BYTES:
        raise UserError(path, f"not an MRC file: it has {size} bytes, less than the 1024-byte MRC header; "
                              "check the file or regenerate it")
    try:
        with warnings.catch_warnings(record=True) as caught:
            warnings.simplefilter("always")
            with mrcfile.open(path, mode="r", header_only=True, permissive=True) as mrc:
                h = mrc.header.copy()
    except (ValueError, OSError) as err:
        raise UserError(path, f"not an MRC file, or its header is corrupt ({err}); check the file or "
                              "regenerate it") from None
    map_id_missing = any("Map ID" in str(w.message) for w in caught)

    nx, ny, nz = int(h.nx), int(h.ny), int(h.nz)
    mode = int(h.mode)
    nsymbt = int(h.nsymbt)
    dims_ok = all(1 <= d <= _MAX_DIM for d in (nx, ny, nz)) and 0 <= nsymbt < size
    if mode not in _MODE_NAMES or not dims_ok:
        if map_id_missing or mode not in _MODE_NAMES:
            raise UserError(path, f"not an MRC file, or its header is corrupt (mode {mode}, size {nx} x {ny} x {nz}"
                                  f", extended header {nsymbt} bytes); check the file or regenerate it")
        raise UserError(path, f"corrupt MRC header: size {nx} x {ny} x {nz}, extended header {nsymbt} bytes; "
                              "check the file or regenerate it")
    if mode not in SUPPORTED_MODES:
        raise UserError(path, f"MRC mode {mode} ({_MODE_NAMES[mode]}) is not supported: images must be real-valued "
                              "(modes 0 int8, 1 int16, 2 float32, 6 uint16, 12 float16); convert the file to "
                              "float32 (e.g. with relion_image_handler or IMOD's newstack -mode 2)")
    byte_order = h.mode.dtype.byteorder
    dtype = np.dtype(SUPPORTED_MODES[mode]).newbyteorder("<" if byte_order == "=" else byte_order)
    if dtype.itemsize == 1:
        dtype = dtype.newbyteorder("=")
    offset = _HEADER_BYTES + nsymbt
    need = offset + nx * ny * nz * dtype.itemsize
    if size < need:
        raise UserError(path, f"file is truncated: its header says {nz} image(s) of {nx} x {ny} {_MODE_NAMES[mode]} "
                              f"({need} bytes) but the file has {size} bytes; copy it again or regenerate it")

    mx, my, mz = (int(v) for v in (h.mx, h.my, h.mz))
    cx, cy, cz = (float(v) for v in (h.cella.x, h.cella.y, h.cella.z))
    vx = _voxel(cx / mx) if mx > 0 else math.nan
    vy = _voxel(cy / my) if my > 0 else math.nan
    vz = _voxel(cz / mz) if mz > 0 else math.nan
    return StackInfo(path=path, n=nz, ny=ny, nx=nx, voxel_size=vx, voxel_size_xyz=(vx, vy, vz), mode=mode,
                     dtype=dtype, offset=offset)


def voxel_size_of(path: PathLike) -> float:
    """Voxel (pixel) size in Å from the header's X axis, as RELION reads it; NaN when unset."""
    return stack_info(path).voxel_size


def _open_data(info: StackInfo, mmap: bool) -> np.ndarray:
    """The data block as ``(N, Y, X)``: a read-only memmap, or an in-memory copy."""
    shape = info.shape
    try:
        if mmap:
            return np.memmap(info.path, dtype=info.dtype, mode="r", offset=info.offset, shape=shape)
        with open(info.path, "rb") as f:
            f.seek(info.offset)
            data = np.fromfile(f, dtype=info.dtype, count=int(np.prod(shape)))
    except OSError as err:
        raise UserError(info.path, f"cannot read the data ({err.strerror or err}); check the file") from None
    if data.size != np.prod(shape):  # the file shrank after the header was checked
        raise UserError(info.path, "file is truncated; copy it again or regenerate it")
    return data.reshape(shape)


def read_stack(path: PathLike, *, mmap: bool = True) -> np.ndarray:
    """Read an image stack as ``(N, Y, X)`` in the file's own dtype.

    A single 2-D image reads as ``N = 1``; a 3-D map reads as its ``Z`` sections.

    Parameters
    ----------
    path
        The MRC stack.
    mmap
        Return a read-only :class:`numpy.memmap` (default) instead of reading the
        file into memory.
    """
    return _open_data(stack_info(path), mmap)


def read_map(path: PathLike, *, mmap: bool = False) -> tuple[np.ndarray, float]:
    """Read an MRC map.

    Parameters
    ----------
    path
        The map (any supported mode; ``ispg`` is ignored, as RELION does).
    mmap
        Memory-map instead of reading into memory. The map is then returned in
        the file's dtype when that is native float32, else converted (a copy).

    Returns
    -------
    data
        ``(Z, Y, X)`` float32 (a 2-D image gives ``Z = 1``).
    voxel_size
        Voxel size in Å (header X axis); NaN when the header leaves it unset.
    """
    info = stack_info(path)
    data = _open_data(info, mmap)
    if data.dtype != np.float32:
        data = data.astype(np.float32)
    return data, info.voxel_size


def _check_voxel(path: PathLike, voxel_size: float) -> float:
    v = float(voxel_size)
    if math.isnan(v):
        return 0.0  # MRC's "unset"
    if not (v > 0 and math.isfinite(v)):
        raise UserError(path, f"voxel size {voxel_size} Å is not a positive number; give the pixel size (--angpix)")
    return v


def _write(path: PathLike, data: np.ndarray, voxel_size: float, stack: bool) -> None:
    v = _check_voxel(path, voxel_size)
    with atomic_path(path) as tmp, warnings.catch_warnings():
        warnings.filterwarnings("ignore", "Data array contains NaN", RuntimeWarning)  # written as given
        with mrcfile.new(tmp, overwrite=True) as mrc:
            mrc.set_data(data)
            if stack:
                mrc.set_image_stack()
            else:
                mrc.set_volume()
            mrc.voxel_size = v
            mrc.update_header_stats()


def write_map(path: PathLike, data: np.ndarray, voxel_size: float) -> None:
    """Write a ``(Z, Y, X)`` map as a float32 (mode 2) MRC volume, atomically.

    Parameters
    ----------
    path
        Output file; replaced only once the new file is complete.
    data
        3-D array (converted to float32; CuPy arrays are copied to the host).
    voxel_size
        Voxel size in Å; NaN writes 0 (unset).
    """
    from cryodask.backend import to_numpy

    data = np.ascontiguousarray(to_numpy(data), dtype=np.float32)
    if data.ndim != 3:
        raise ValueError(f"write_map needs a 3-D (Z, Y, X) array, got shape {data.shape}")
    _write(path, data, voxel_size, stack=False)


def write_stack(path: PathLike, images: np.ndarray, voxel_size: float) -> None:
    """Write ``(N, Y, X)`` images as a float32 MRC image stack (``ispg = 0``), atomically.

    A single ``(Y, X)`` image is written as a stack of one. RELION addresses the
    images as ``1@path`` .. ``N@path``.
    """
    from cryodask.backend import to_numpy

    images = np.ascontiguousarray(to_numpy(images), dtype=np.float32)
    if images.ndim == 2:
        images = images[None]
    if images.ndim != 3:
        raise ValueError(f"write_stack needs (N, Y, X) images, got shape {images.shape}")
    _write(path, images, voxel_size, stack=True)


def parse_image_name(name: str, *, location: str | None = None) -> tuple[int, str]:
    """Split a RELION image name into a 0-based index and the stack path.

    ``"000012@Particles/stack.mrcs"`` gives ``(11, "Particles/stack.mrcs")``. A name
    without ``@`` names a whole file, which for a particle must hold one image:
    it gives index 0 (:func:`read_images` checks the file has exactly one image).
    RELION's file-type suffixes (``stack.mrcs:mrcs``) are dropped.

    Parameters
    ----------
    name
        The ``rlnImageName`` value.
    location
        Where the name came from (``particles.star, row 3, rlnImageName``), for errors;
        defaults to the name itself.

    Raises
    ------
    UserError
        The index is not a whole number of at least 1, or the path is empty.
    """
    name = str(name).strip()
    loc = location or name
    if "@" in name:
        idx_text, _, stack = name.partition("@")
        try:
            idx = int(idx_text)
        except ValueError:
            raise UserError(loc, f"image name {name!r} does not start with an image number (expected N@stack.mrcs, "
                                 "N counting from 1)") from None
        if idx < 1:
            raise UserError(loc, f"image name {name!r} has index {idx}: RELION numbers images from 1 "
                                 f"(1@{stack.strip()} is the first image); fix rlnImageName")
        idx -= 1
    else:
        idx, stack = 0, name
    stack = stack.strip()
    for suffix in (":mrcs", ":mrc"):
        if stack.endswith(suffix):
            stack = stack[: -len(suffix)]
    if not stack:
        raise UserError(loc, f"image name {name!r} has no file name (expected N@stack.mrcs)")
    return idx, stack


def _resolve(stack: str, base_dirs: Sequence[Path]) -> tuple[Path | None, list[Path]]:
    p = Path(stack)
    if p.is_absolute():
        return (p if p.exists() else None), [p]
    tried = [b / p for b in base_dirs]
    for cand in tried:
        if cand.exists():
            return cand, tried
    return None, tried


def read_images(
    image_names: Sequence[str],
    *,
    base_dir: PathLike | Sequence[PathLike] = ".",
    source: str | os.PathLike[str] | None = None,
    first_row: int = 1,
    dtype: npt.DTypeLike = np.float32,
    check_finite: bool = True,
    allow_odd: bool = False,
) -> np.ndarray:
    """Read particle images named as in ``rlnImageName`` into one ``(N, B, B)`` array.

    Names are grouped by stack; each stack is memory-mapped once and its images
    are read with one fancy-indexed copy, so reading is sequential per file.

    Parameters
    ----------
    image_names
        ``N@stack.mrcs`` names (1-based N), in output order; repeats are allowed.
    base_dir
        Folder, or list of folders tried in order, against which relative stack
        paths are resolved. RELION resolves them against its project folder (the
        working directory it ran in), hence the default ``"."``; pass
        ``[project_dir, star_file.parent]`` to also accept stacks next to the STAR file.
    source
        The STAR file the names come from; errors then name its row and
        ``rlnImageName`` instead of the stack file.
    first_row
        The STAR row (1-based) of ``image_names[0]``, for error messages when
        reading a slice of a table.
    dtype
        Output dtype (float32 by default).
    check_finite
        Refuse images containing NaN or Inf.
    allow_odd
        Accept odd box sizes (RELION refines only even boxes).

    Returns
    -------
    numpy.ndarray
        ``(len(image_names), B, B)`` images.

    Raises
    ------
    UserError
        A stack is missing, truncated, not an MRC file or of an unsupported mode;
        an index is 0 or past the end of its stack; images are not square, have an
        odd box, or differ in size; an image holds NaN or Inf.
    """
    names = list(image_names)
    bases = [Path(base_dir)] if isinstance(base_dir, (str, os.PathLike)) else [Path(b) for b in base_dir]
    if not bases:
        bases = [Path(".")]

    def loc(i: int, fallback: PathLike) -> str:
        if source is not None:
            return where(source, row=first_row + i, field="rlnImageName")
        return str(fallback)

    # Group by stack, keeping the first position that names each stack for error messages.
    groups: dict[str, list[tuple[int, int]]] = {}
    for i, name in enumerate(names):
        idx, stack = parse_image_name(name, location=loc(i, name))
        groups.setdefault(stack, []).append((i, idx))

    # Pass 1: headers only, so size problems are found before anything is read.
    infos: dict[str, StackInfo] = {}
    box: tuple[int, int] | None = None  # (box size, position of the first image)
    for stack, members in groups.items():
        i0 = members[0][0]
        path, tried = _resolve(stack, bases)
        if path is None:
            looked = ", ".join(str(t.resolve()) for t in tried)
            raise UserError(loc(i0, stack), f"image {names[i0]}: stack file {stack} not found (looked for {looked}); "
                                            "run from the project folder RELION ran in, or give the folder the image "
                                            "paths are relative to")
        try:
            info = stack_info(path)
        except UserError as err:
            if source is None:
                raise
            raise UserError(loc(i0, stack), f"image {names[i0]}: {err.where}: {err.what}") from None
        where_stack = loc(i0, path)
        if info.nx != info.ny:
            raise UserError(where_stack, f"images in {path} are {info.nx} x {info.ny} pixels, not square; particles "
                                         "must be square: re-extract them with a square box")
        if info.nx % 2 and not allow_odd:
            raise UserError(where_stack, f"images in {path} have an odd box of {info.nx} pixels; RELION needs even "
                                         f"boxes: resize with relion_image_handler --i {path} --new_box "
                                         f"{info.nx - 1} --o ... (or allow odd boxes)")
        if box is None:
            box = (info.nx, i0)
        elif info.nx != box[0]:
            j = box[1]
            raise UserError(where_stack, f"images have different sizes: {names[j]} is {box[0]} x {box[0]} but "
                                         f"{names[i0]} is {info.nx} x {info.nx}; all particles must share one box "
                                         "(resize with relion_image_handler --new_box)")
        for i, idx in members:
            if idx >= info.n:
                raise UserError(loc(i, path), f"image {names[i]}: {path} has only {info.n} image(s) "
                                              f"(1@ to {info.n}@); fix rlnImageName or the stack")
            if "@" not in names[i] and info.n != 1:
                raise UserError(loc(i, path), f"image name {names[i]!r} has no image number but {path} holds "
                                              f"{info.n} images; name one image as N@{stack}")
        infos[stack] = info

    b = box[0] if box is not None else 0
    out = np.empty((len(names), b, b), dtype=dtype)

    # Pass 2: one memmap per stack, one sorted fancy-index read per stack.
    for stack, members in groups.items():
        info = infos[stack]
        pos = np.fromiter((m[0] for m in members), dtype=np.int64, count=len(members))
        idx = np.fromiter((m[1] for m in members), dtype=np.int64, count=len(members))
        uniq, inverse = np.unique(idx, return_inverse=True)
        data = _open_data(info, mmap=True)
        try:
            block = np.asarray(data[uniq], dtype=dtype)
        except OSError as err:
            raise UserError(loc(int(pos[0]), info.path), f"cannot read {info.path} ({err}); check the file") from None
        del data
        if check_finite:
            bad = ~np.isfinite(block).all(axis=(1, 2))
            if bad.any():
                u = int(np.flatnonzero(bad)[0])
                k = int(np.flatnonzero(inverse == u)[0])
                i = int(pos[k])
                raise UserError(loc(i, info.path), f"image {names[i]} contains NaN or Inf pixel values; remove the "
                                                   "particle or repair the stack (relion_image_handler --remove_nan)")
        out[pos] = block[inverse]
    return out
