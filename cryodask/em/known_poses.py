"""Reconstruction from known poses on a Dask cluster (relion_reconstruct, distributed).

The shape of every cryodask iteration in miniature: one task per particle chunk
(read on the worker that holds it, Fourier-transformed, recentred, CTF-weighted
and inserted into padded accumulators), a tree reduction of the accumulators per
half-set, and one reconstruction task per half-set, all in parallel.
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any

import numpy as np
import pandas as pd

from cryodask import backend
from cryodask.errors import UserError, where
from cryodask.geometry.euler import euler_to_matrix
from cryodask.ops.backproject import BackProjector
from cryodask.ops.filters import phase_shift

_ANGLES = ("rlnAngleRot", "rlnAngleTilt", "rlnAnglePsi")


def particle_transforms(images: np.ndarray, origins_px: np.ndarray, *, workers: int | None = None) -> np.ndarray:
    """Centred Fourier transforms ``(n, B, B//2+1)`` of particle images, recentred by their origins.

    An image with origin ``o`` shows the particle moved by ``-o`` (RELION's
    convention); the phase shift by ``+o`` recentres it. The DC term is zeroed, as
    relion_reconstruct does.
    """
    ft = backend.rfftn(np.fft.ifftshift(images, axes=(-2, -1)), axes=(-2, -1), workers=workers)
    ft = phase_shift(ft, origins_px)
    ft[..., 0, 0] = 0
    return ft


def insert_particles(bp: BackProjector, images: np.ndarray, rotations: np.ndarray, origins_px: np.ndarray, *,
                     ctf: np.ndarray | None = None, premultiplied: np.ndarray | None = None) -> BackProjector:
    """Insert particle images into ``bp``: data += CTF·X, weight += CTF² (1 without CTF).

    ``premultiplied`` marks particles whose images already carry one CTF factor
    (``rlnCtfDataAreCtfPremultiplied``): their images are not multiplied again.
    """
    ft = particle_transforms(images, origins_px)
    weights = None
    if ctf is not None:
        if premultiplied is None:
            ft = ft * ctf
        else:
            ft = np.where(np.asarray(premultiplied)[:, None, None], ft, ft * ctf)
        weights = ctf * ctf
    bp.insert(ft, rotations, weights=weights)
    return bp


def numeric_column(parts: pd.DataFrame, label: str, source: str) -> np.ndarray:
    """A numeric particle column as float64, refusing missing or non-numeric values with their row."""
    if label not in parts.columns:
        raise UserError(where(source, field=label), f"the column {label} is missing; it is needed here")
    v = pd.to_numeric(parts[label], errors="coerce").to_numpy(np.float64)
    bad = np.flatnonzero(~np.isfinite(v))
    if len(bad):
        raise UserError(where(source, row=int(bad[0]) + 1, field=label),
                        f"{parts[label].iloc[bad[0]]!r} is not a number; fix or remove that particle")
    return v


@dataclass
class ChunkPoses:
    """What a chunk task needs besides its images: small per-particle arrays."""

    rotations: np.ndarray  # (n, 3, 3)
    origins_px: np.ndarray  # (n, 2)
    half: np.ndarray  # (n,) 1 or 2 (0 when not split)
    ctf: dict[str, np.ndarray] | None
    premultiplied: np.ndarray | None


def chunk_poses(parts: pd.DataFrame, table: Any, *, pixel_size: float, ctf: bool, source: str,
                half_sets: np.ndarray | None) -> ChunkPoses:
    from cryodask.ops.ctf import ctf_params, ctf_premultiplied

    angles = [numeric_column(parts, c, source) for c in _ANGLES]
    origins = np.zeros((len(parts), 2))
    for j, c in enumerate(("rlnOriginXAngst", "rlnOriginYAngst")):
        if c in parts.columns:
            origins[:, j] = numeric_column(parts, c, source) / pixel_size
    ctf_kw = pre = None
    if ctf:
        sub = type(table)(optics=table.optics, particles=parts)
        ctf_kw = ctf_params(sub, source=source)
        pre = ctf_premultiplied(sub, source=source)
    return ChunkPoses(rotations=euler_to_matrix(*angles), origins_px=origins,
                      half=np.zeros(len(parts), int) if half_sets is None else half_sets,
                      ctf=ctf_kw, premultiplied=pre)


def backproject_chunk(images: np.ndarray, poses: ChunkPoses, *, box: int, pixel_size: float, pad: int,
                      r_max: int, n_halves: int) -> list[BackProjector]:
    """Accumulators of one chunk: one per half-set (``n_halves`` 2), or one for all (``n_halves`` 1)."""
    from cryodask.ops.ctf import ctf_2d

    images = np.asarray(images, dtype=np.float32)
    ctf = None
    if poses.ctf is not None:
        ctf = ctf_2d(box, pixel_size, **poses.ctf)
    out = []
    for h in range(1, n_halves + 1):
        bp = BackProjector.zeros(box, pad=pad, r_max=r_max)
        sel = np.flatnonzero(poses.half == h) if n_halves == 2 else np.arange(len(images))
        if len(sel):
            insert_particles(bp, images[sel], poses.rotations[sel], poses.origins_px[sel],
                             ctf=None if ctf is None else ctf[sel],
                             premultiplied=None if poses.premultiplied is None else poses.premultiplied[sel])
        out.append(bp)
    return out


def _sum_accumulators(*parts: list[BackProjector]) -> list[BackProjector]:
    total = [bp.copy() for bp in parts[0]]
    for p in parts[1:]:
        for t, bp in zip(total, p, strict=True):
            t += bp
    return total


def _pick(parts: list[BackProjector], h: int) -> BackProjector:
    return parts[h]


def _merged(parts: list[BackProjector]) -> BackProjector:
    return _sum_accumulators(parts)[0] if len(parts) == 1 else parts[0] + parts[1]


def _reconstruct(bp: BackProjector, sym: str, skip_gridding: bool) -> np.ndarray:
    from cryodask.geometry.symmetry import point_group

    return np.asarray(bp.reconstruct(sym=point_group(sym), skip_gridding=skip_gridding), np.float32)


def tree_reduce(client: Any, futures: Sequence[Any], func: Any, *, split_every: int = 4, key: str = "reduce") -> Any:
    """Combine futures in a tree (``split_every`` at a time) on the cluster; returns one future.

    Partial sums meet on the workers that made them, so only a few accumulators
    cross the network at each level.
    """
    level = 0
    parts = list(futures)
    while len(parts) > 1:
        parts = [client.submit(func, *parts[i:i + split_every], key=f"{key}-{level}-{i}", pure=False)
                 for i in range(0, len(parts), split_every)]
        level += 1
    return parts[0]


@dataclass
class KnownPoseResult:
    """Maps reconstructed from known poses; ``half_maps`` is empty when the halves were not split."""

    full_map: np.ndarray
    half_maps: list[np.ndarray]
    pixel_size: float
    n_particles: int


def reconstruct_known_poses(client: Any, particles: Any, poses: pd.DataFrame, *, ctf: bool = True, pad: int = 2,
                            sym: str = "C1", maxres: float = -1.0, split_halves: bool = True,
                            skip_gridding: bool = True, source: str = "poses") -> KnownPoseResult:
    """Reconstruct from known poses on the cluster of ``client``.

    Parameters
    ----------
    client
        A ``distributed.Client``.
    particles
        A particle store or STAR-backed particles (:func:`cryodask.io.store.open_particles`).
    poses
        One row per particle, in the particles' order, with ``rlnAngleRot/Tilt/Psi``
        and optionally ``rlnOriginXAngst/YAngst`` and ``rlnRandomSubset``.
    ctf
        CTF-weight the images (data += CTF·X, weight += CTF²), as ``relion_reconstruct --ctf``.
    split_halves
        Reconstruct two half-sets (``rlnRandomSubset`` when present, else odd/even
        particles) besides the full map.
    """
    from cryodask.cluster.scratch import chunk_futures

    table = particles.table
    if len(poses) != len(particles):
        raise UserError(source, f"has {len(poses)} particles but the particle set has {len(particles)}; "
                                "give poses for the same particles in the same order")
    pixel_size = float(particles.pixel_size)
    box = int(particles.box)
    r_max = box // 2 if maxres <= 0 else min(box // 2, math.ceil(box * pixel_size / maxres))
    parts = table.particles.copy()
    for c in (*_ANGLES, "rlnOriginXAngst", "rlnOriginYAngst"):
        if c in poses.columns:
            parts[c] = poses[c].to_numpy()
    half_sets = None
    if split_halves:
        if "rlnRandomSubset" in poses.columns:
            half_sets = numeric_column(poses, "rlnRandomSubset", source).astype(int)
        else:
            half_sets = np.arange(len(parts)) % 2 + 1
    n_halves = 2 if split_halves else 1

    images = chunk_futures(client, particles)
    partials = []
    for i, (fut, sl) in enumerate(zip(images, particles.chunk_slices(), strict=True)):
        cp = chunk_poses(parts.iloc[sl], table, pixel_size=pixel_size, ctf=ctf, source=source,
                         half_sets=None if half_sets is None else half_sets[sl])
        partials.append(client.submit(backproject_chunk, fut, cp, box=box, pixel_size=pixel_size, pad=pad,
                                      r_max=r_max, n_halves=n_halves, key=f"backproject-{i}-{fut.key}",
                                      pure=False))
    total = tree_reduce(client, partials, _sum_accumulators, key=f"sum-{partials[0].key}")
    if n_halves == 2:
        halves = [client.submit(_pick, total, h, pure=False) for h in range(2)]
        maps = [client.submit(_reconstruct, h, sym, skip_gridding, pure=False) for h in halves]
    else:
        maps = []
    full = client.submit(_reconstruct, client.submit(_merged, total, pure=False), sym, skip_gridding, pure=False)
    return KnownPoseResult(full_map=full.result(), half_maps=[m.result() for m in maps],
                           pixel_size=pixel_size, n_particles=len(particles))
