"""One EM iteration as Dask tasks: the per-chunk E-step and M-step sums, and their reduction.

The shape is DESIGN §3. For every particle chunk one task (submitted next to its chunk
future, :func:`cryodask.cluster.scratch.chunk_futures`) runs :func:`expectation_chunk`:

1. prepare the images (RELION's ``getFourierTransformsAndCtfs``): recentre by the previous
   offset (Fourier phase shift), soft circular mask of ``particle_diameter`` (zeros
   outside with ``--zero_mask``, else white noise of the background's variance), FFT
   with RELION's normalisation, CTF;
2. for each half-set, score the particles of that half against the projections of its
   reference with the two-pass kernel (:func:`cryodask.em.estep.score_two_pass`):
   coarse pass at ``coarse_size`` on the coarse HEALPix × translation grid,
   significance, fine pass at ``current_size`` on the oversampled children. Global
   searches score the whole grid for the chunk at once; local searches score each
   particle on its own Gaussian-prior subset (:func:`cryodask.geometry.healpix.local_subset`);
3. M-step sums (:func:`cryodask.em.estep.mstep_sums`) and insertion of the weighted slices
   into one :class:`~cryodask.ops.backproject.BackProjector` per half-set, on the worker;
4. return the accumulators, the σ² sums per optics group, the offset sums, and small
   per-particle results (best pose, Pmax, number of significant samples, log-likelihood).

References reach the tasks as MRC files: :func:`load_projector` reads a map and builds its
projector once per worker process (cached by path, modification time and size).
"""

from __future__ import annotations

import math
import os
import threading
from collections import OrderedDict
from collections.abc import Sequence
from dataclasses import dataclass, field
from typing import Any

import numpy as np

from cryodask import backend

__all__ = ["IterationSetup", "ChunkMeta", "ChunkResult", "Accumulators", "expectation_chunk", "scale_groups",
           "direction_prior", "expected_accuracy_chunk",
           "load_projector", "sum_accumulators", "pixel_shells", "prepare_images", "fsc_of_accumulators",
           "join_halves_at_low_resolution", "initial_noise_chunk", "rotation_angle_between", "sampling_points"]


# ---------------------------------------------------------------------------------------------
# what the driver sends and gets back


@dataclass
class IterationSetup:
    """Everything a chunk task needs that is the same for every chunk (small; no maps)."""

    iteration: int
    box: int
    pixel_size: float
    pad: float
    current_size: int
    coarse_size: int
    reference_paths: list[str]  # one per half-set (one map for class3d K=1)
    sigma2_noise: np.ndarray  # (n_halves, n_optics, nsh)
    sigma_offset: list[float]  # Å, per half-set
    healpix_order: int = 2
    sym: str = "C1"
    psi_step: float | None = None
    random_perturbation: float = 0.0
    offset_range: float = 6.0
    offset_step: float = 2.0
    oversampling: int = 1
    adaptive_fraction: float = 0.999
    local_searches: bool = False
    sigma_ang: float = -1.0
    mode: str = "ml"  # "cc" for --firstiter_cc
    particle_diameter: float = -1.0  # Å
    width_mask_edge: int = 5
    zero_mask: bool = False
    do_ctf: bool = True
    random_seed: int = 0
    n_acc_particles: int = 5  # particles per chunk and half-set for the expected accuracies (refine3d)
    split_halves: bool = True  # refine3d: one reference per half-set; class3d: K references for all
    class_fractions: list[float] | None = None  # class3d priors
    random_classes: bool = False  # class3d's first iteration: each particle to one random class
    batch_size: int = 0  # particles scored together in global searches (0: the whole chunk; smaller was slower)
    maxsig: int = -1  # RELION's --maxsig: at most this many significant coarse samples per particle (-1: no cap)
    do_norm: bool = False  # --norm: images × avg_norm/rlnNormCorrection; new per-particle values returned
    avg_norm: float = 1.0  # rlnNormCorrectionAverage
    scale: np.ndarray | None = None  # --scale: (n_halves, n_groups) intensity scale applied to the references
    # global searches: RELION's learnt direction prior, (n_references, n_directions), each row summing to 1
    # (None: uniform); a direction with prior 0 is not searched, as in RELION
    direction_prior: np.ndarray | None = None


@dataclass
class ChunkMeta:
    """The per-particle inputs of one chunk (small arrays)."""

    index: np.ndarray  # (n,) particle indices in the full set
    rot: np.ndarray
    tilt: np.ndarray
    psi: np.ndarray
    origins_px: np.ndarray  # (n, 2)
    half: np.ndarray  # (n,) 1 or 2
    optics: np.ndarray  # (n,) 0-based optics group
    ctf: dict[str, np.ndarray] | None
    premultiplied: np.ndarray | None
    n_optics: int = 1
    norm: np.ndarray | None = None  # (n,) rlnNormCorrection (None: 1)
    group: np.ndarray | None = None  # (n,) 0-based scale group (rlnGroupNumber − 1; None: the optics group)


@dataclass
class Accumulators:
    """Sums that are added over chunks (the tree reduction's payload)."""

    bp: list[Any]  # BackProjector per half-set
    sigma2_sum: np.ndarray  # (n_halves, n_optics, nsh) Σ w|X−A|² per shell (inside the window)
    power_sum: np.ndarray  # (n_halves, n_optics, nsh) Σ |X|² per shell (all shells)
    pixel_count: np.ndarray  # (n_halves, n_optics, nsh) pixels counted per shell (× particles)
    n_particles: np.ndarray  # (n_halves, n_optics)
    sigma2_offset: np.ndarray  # (n_halves,) Σ w |Δt|² (Å²)
    weight_sum: np.ndarray  # (n_halves,)
    class_weight: np.ndarray  # (n_references,) Σ w per reference
    # --scale: (n_halves, n_groups, nsh) Σ w⟨X, s·CTF·A⟩ and Σ w|s·CTF·A|² per shell (None: not summed)
    signal_product: np.ndarray | None = None
    reference_power: np.ndarray | None = None
    # global searches: (n_references, n_directions) Σ w per HEALPix direction (RELION's wsum pdf_direction)
    direction_weight: np.ndarray | None = None

    def __iadd__(self, other: "Accumulators") -> "Accumulators":
        for a, b in zip(self.bp, other.bp, strict=True):
            a += b
        for name in _SUMMED:
            mine, theirs = getattr(self, name), getattr(other, name)
            if theirs is not None:
                setattr(self, name, theirs.copy() if mine is None else mine + theirs)
        return self


_SUMMED = ("sigma2_sum", "power_sum", "pixel_count", "n_particles", "sigma2_offset", "weight_sum", "class_weight",
           "signal_product", "reference_power", "direction_weight")


@dataclass
class ChunkResult:
    """What a chunk task returns: accumulators and per-particle results."""

    acc: Accumulators
    index: np.ndarray
    rot: np.ndarray
    tilt: np.ndarray
    psi: np.ndarray
    origins_px: np.ndarray
    pmax: np.ndarray
    n_significant: np.ndarray
    log_likelihood: np.ndarray
    failed: np.ndarray = field(default_factory=lambda: np.zeros(0, bool))
    class_number: np.ndarray = field(default_factory=lambda: np.zeros(0, np.int64))
    norm: np.ndarray = field(default_factory=lambda: np.zeros(0))  # --norm: the new rlnNormCorrection


def optics_tables(table: Any) -> tuple[Any, Any, np.ndarray]:
    """(optics, particles, optics index per particle) with fresh row numbers, for a job's driver.

    The index is the row of each particle's ``rlnOpticsGroup`` in the optics table
    (the STAR reader has already refused particles of undefined groups).
    """
    optics = table.optics.reset_index(drop=True)
    parts = table.particles.copy().reset_index(drop=True)
    lookup = {int(g): i for i, g in enumerate(optics["rlnOpticsGroup"].to_numpy())}
    index = np.array([lookup.get(int(g), 0) for g in parts["rlnOpticsGroup"]], np.int64)
    return optics, parts, index


def scale_groups(particles: Any) -> tuple[np.ndarray, list[str]]:
    """RELION 3.1's groups of the intensity scale: (0-based group per particle, group names).

    A group is a ``rlnGroupName`` when the particles have one, else a micrograph
    (``rlnMicrographName``), else all particles are one group; groups are numbered in the order
    they first appear (RELION sets ``rlnGroupNumber`` so on reading and ignores the column in
    the file).
    """
    for label in ("rlnGroupName", "rlnMicrographName"):
        if label in particles.columns:
            names = particles[label].astype(str).to_numpy()
            uniq, first, inverse = np.unique(names, return_index=True, return_inverse=True)
            order = np.argsort(first, kind="stable")  # first appearance
            rank = np.empty_like(order)
            rank[order] = np.arange(len(order))
            return rank[inverse].astype(np.int64), [str(x) for x in uniq[order]]
    return np.zeros(len(particles), np.int64), ["group"]


def shell_sums(values: Any, shell: np.ndarray, nsh: int) -> np.ndarray:
    """Row by row, the sum of ``values`` (m, K) over the pixels of each shell: (m, nsh), float64."""
    return np.stack([np.bincount(shell, weights=np.asarray(v, np.float64), minlength=nsh)[:nsh]
                     for v in backend.to_numpy(values)]).reshape(-1, nsh)


def direction_prior(pdfs: list[np.ndarray], healpix_order: int, sym: str) -> np.ndarray | None:
    """Learnt direction priors (RELION's pdf_direction, one per reference) as the E-step takes them: each row
    summing to 1 (a class fraction is applied apart). None (uniform) when they are missing or were learnt on
    another HEALPix grid (before the order changed)."""
    from cryodask.geometry.healpix import healpix_sampling

    n_dir = healpix_sampling(healpix_order, sym=sym).n_directions
    if not pdfs or any(len(p) != n_dir for p in pdfs):
        return None
    rows = np.asarray(pdfs, np.float64)
    total = rows.sum(axis=1, keepdims=True)
    return np.where(total > 0, rows / np.where(total > 0, total, 1.0), 1.0 / n_dir)


def sum_accumulators(*parts: Any) -> Accumulators:
    """Add Accumulators (or ChunkResults' accumulators) together; a tree-reduction step."""
    accs = [p.acc if isinstance(p, ChunkResult) else p for p in parts]
    total = Accumulators(bp=[b.copy() for b in accs[0].bp], **{
        k: None if getattr(accs[0], k) is None else np.array(getattr(accs[0], k), copy=True) for k in _SUMMED})
    for a in accs[1:]:
        total += a
    return total


def particle_results(r: ChunkResult) -> ChunkResult:
    """The chunk's per-particle results without its accumulators (what the driver gathers)."""
    return ChunkResult(acc=None, index=r.index, rot=r.rot, tilt=r.tilt, psi=r.psi, origins_px=r.origins_px,
                       pmax=r.pmax, n_significant=r.n_significant, log_likelihood=r.log_likelihood, failed=r.failed,
                       class_number=r.class_number, norm=r.norm)


# ---------------------------------------------------------------------------------------------
# projectors, loaded once per worker

_PROJECTORS: OrderedDict = OrderedDict()
_MAX_CACHED = 4


def load_projector(path: str, *, pad: float, r_max: float) -> Any:
    """The projector of the map at ``path`` (cached per process by path, mtime, size, pad, r_max)."""
    from cryodask.io.mrc import read_map
    from cryodask.ops.project import Projector

    st = os.stat(path)
    key = (os.path.abspath(path), st.st_mtime_ns, st.st_size, float(pad), float(r_max))
    if key in _PROJECTORS:
        _PROJECTORS.move_to_end(key)
        return _PROJECTORS[key]
    vol, _ = read_map(path)
    proj = Projector.from_map(vol, pad=pad, r_max=r_max)
    _PROJECTORS[key] = proj
    while len(_PROJECTORS) > _MAX_CACHED:
        _PROJECTORS.popitem(last=False)
    return proj


# the coarse projections of a global search: every chunk task of an iteration on a worker needs the same
# ones (all orientations of the grid, at the coarse size), so they are made once per worker and reference
_COARSE: OrderedDict = OrderedDict()
_COARSE_LOCK = threading.Lock()


def coarse_projections(path: str, proj: Any, mats: np.ndarray, kx: np.ndarray, ky: np.ndarray, *,
                       keep: int) -> Any:
    """``proj.sample(mats, kx, ky)`` for the map at ``path``, cached per process (read-only).

    The key is the map file (path, mtime, size), the projector's padding and radius, and the
    orientations and pixels themselves; at most ``keep`` entries stay (one per reference of the job:
    both half-sets, or every class), so a worker holds one iteration's coarse projections.
    """
    import hashlib

    st = os.stat(path)
    h = hashlib.blake2b(digest_size=16)
    for a in (mats, kx, ky):
        h.update(np.ascontiguousarray(a).tobytes())
    key = (os.path.abspath(path), st.st_mtime_ns, st.st_size, float(proj.pad), float(proj.r_max), h.hexdigest())
    with _COARSE_LOCK:
        if key in _COARSE:
            _COARSE.move_to_end(key)
            return _COARSE[key]
    P = proj.sample(mats, kx, ky)
    if isinstance(P, np.ndarray):
        P.flags.writeable = False
    with _COARSE_LOCK:
        _COARSE[key] = P
        while len(_COARSE) > max(1, keep):
            _COARSE.popitem(last=False)
    return P


def retain_coarse_projections(paths: Sequence[str]) -> None:
    """Drop the cached coarse projections of maps other than ``paths`` (an earlier iteration's or job's)."""
    keep = {os.path.abspath(p) for p in paths}
    with _COARSE_LOCK:
        for key in [k for k in _COARSE if k[0] not in keep]:
            del _COARSE[key]


# ---------------------------------------------------------------------------------------------
# image preparation


def pixel_shells(box: int, r_max: float) -> tuple[np.ndarray, np.ndarray, np.ndarray, np.ndarray]:
    """Fourier pixels of a ``box`` half transform within ``r_max``: (flat index, kx, ky, shell)."""
    from cryodask.ops.project import slice_pixels

    flat, kx, ky = slice_pixels(box, r_max)
    shell = np.floor(np.sqrt(kx.astype(np.float64) ** 2 + ky.astype(np.float64) ** 2) + 0.5).astype(np.int64)
    return flat, kx, ky, shell


def _soft_circle(box: int, radius: float, width: float) -> np.ndarray:
    from cryodask.ops.filters import spherical_mask

    return spherical_mask(box, radius, width=width, ndim=2, dtype=np.float64)


def prepare_images(images: np.ndarray, origins_px: np.ndarray, *, pixel_size: float, particle_diameter: float,
                   width_mask_edge: int, zero_mask: bool, rng: np.random.Generator | None = None
                   ) -> tuple[np.ndarray, np.ndarray]:
    """(unmasked FT, masked FT) of particle images recentred by their previous offsets, ``(n, B, B//2+1)``.

    FFTs divided by the number of pixels (RELION). The DC term is kept in the masked FT (it
    enters the noise power) but left out of scoring by ``inv_sigma2 = 0`` at the origin.
    """
    from cryodask.ops.filters import phase_shift

    box = images.shape[-1]
    ft = backend.rfftn(np.fft.ifftshift(images.astype(np.float64), axes=(-2, -1)), axes=(-2, -1))
    ft = phase_shift(ft, origins_px)
    real = np.fft.fftshift(backend.irfftn(ft, (box, box), axes=(-2, -1)), axes=(-2, -1))
    radius = (particle_diameter / (2.0 * pixel_size)) if particle_diameter > 0 else box / 2.0 - width_mask_edge
    m = _soft_circle(box, radius, float(width_mask_edge))
    if zero_mask:
        masked = real * m
    else:
        outside = m < 1e-6
        sd = real[:, outside].std(axis=1) if outside.any() else np.zeros(len(real))
        rng = rng or np.random.default_rng(0)
        noise = rng.standard_normal(real.shape) * sd[:, None, None]
        masked = real * m + noise * (1.0 - m)
    mft = backend.rfftn(np.fft.ifftshift(masked, axes=(-2, -1)), axes=(-2, -1))
    return ft.astype(np.complex64), mft.astype(np.complex64)


def _ctf(meta: ChunkMeta, sel: np.ndarray, box: int, pixel_size: float, do_ctf: bool) -> np.ndarray:
    from cryodask.ops.ctf import ctf_2d, ctf_for_scoring

    if not do_ctf or meta.ctf is None:
        return np.ones((len(sel), box, box // 2 + 1), np.float32)
    c = ctf_2d(box, pixel_size, **{k: v[sel] for k, v in meta.ctf.items()})
    if meta.premultiplied is not None:
        c = ctf_for_scoring(c, meta.premultiplied[sel])
    return c


# ---------------------------------------------------------------------------------------------
# the chunk task


def rotation_angle_between(a: np.ndarray, b: np.ndarray) -> np.ndarray:
    """Angle (degrees) of the rotation taking ``a`` to ``b``, for stacks of matrices ``(n, 3, 3)``."""
    tr = np.einsum("nij,nij->n", a, b)
    return np.rad2deg(np.arccos(np.clip((tr - 1.0) / 2.0, -1.0, 1.0)))


def _inv_sigma2(sigma2: np.ndarray, optics: np.ndarray, shell: np.ndarray, *, origin: bool) -> np.ndarray:
    from cryodask.em.estep import inv_sigma2_from_sigma2

    s = sigma2[optics][:, np.minimum(shell, sigma2.shape[-1] - 1)]  # (n, K)
    inv = inv_sigma2_from_sigma2(s)
    if not origin:
        inv[:, shell == 0] = 0.0
    return inv.astype(np.float32)


class _FineCache:
    """Fine projections of one class, each oversampled coarse orientation projected once per batch,
    and the weighted slices summed per fine orientation over the batch's particle groups (so each
    is inserted into the 3D accumulator once)."""

    def __init__(self, proj: Any, sampling: Any, coarse_index: np.ndarray, oversampling: int, kx: Any, ky: Any):
        self.proj, self.sampling, self.coarse_index, self.os_ = proj, sampling, coarse_index, oversampling
        self.kx, self.ky = kx, ky
        self.n_over = 8 ** oversampling
        self.slot = np.full(len(coarse_index), -1, np.int64)
        self.n = 0
        self.P = self.mats = self.data = self.weight = self.touched = None

    def _grow(self, need: int, like: Any) -> None:
        xp = backend.array_module(like)
        cap = 0 if self.P is None else self.P.shape[0] // self.n_over
        if need <= cap:
            return
        cap = max(need, 2 * cap, 16)
        k = like.shape[1]

        def grown(old, shape, dtype, mod, zero=True):
            new = mod.zeros(shape, dtype) if zero else mod.empty(shape, dtype)
            if old is not None:
                new[:old.shape[0]] = old
            return new

        rows = cap * self.n_over
        # projections and matrices are written before they are read; the sums start at 0
        self.P = grown(self.P, (rows, k), like.dtype, xp, zero=False)
        self.mats = grown(self.mats, (rows, 3, 3), np.float32, np, zero=False)
        self.data = grown(self.data, (rows, k), like.dtype, xp)
        self.weight = grown(self.weight, (rows, k), np.float32, xp)
        self.touched = grown(self.touched, (rows,), bool, np)

    def rows(self, orient: Any) -> np.ndarray:
        """Storage rows of fine orientations ``rc·n_over + child`` (projecting the missing ones)."""
        orient = backend.to_numpy(orient)
        rc = orient[::self.n_over] // self.n_over
        miss = np.unique(rc[self.slot[rc] < 0])
        if len(miss):
            mats = self.sampling.oversample(self.coarse_index[miss], self.os_).matrices(np.float32)
            P = self.proj.sample(mats, self.kx, self.ky)
            self._grow(self.n + len(miss), P)
            r0 = self.n * self.n_over
            self.P[r0:r0 + len(P)] = P
            self.mats[r0:r0 + len(P)] = mats
            self.slot[miss] = self.n + np.arange(len(miss))
            self.n += len(miss)
        return (self.slot[rc][:, None] * self.n_over + np.arange(self.n_over)[None, :]).reshape(-1)

    def add(self, rows: np.ndarray, data: Any, weight: Any) -> None:
        self.data[rows] += data  # rows are distinct within one call
        self.weight[rows] += weight
        self.touched[rows] = True

    def inserts(self) -> tuple[np.ndarray, Any, Any]:
        """(rotation matrices, data slices, weight slices) of the fine orientations that received weight."""
        if self.P is None:
            return np.zeros((0, 3, 3), np.float32), None, None
        used = np.flatnonzero(self.touched[:self.n * self.n_over])
        return self.mats[used], self.data[used], self.weight[used]


def _score_batch(*, Xc, Xf, Xu, ctf_c, ctf_f, isg_c, isg_f, isg_m, projs, sampling, coarse_index, log_prior_orient,
                 kx_c, ky_c, kx_f, ky_f, t_coarse, t_fine, ramps_c, ramps_f, setup: IterationSetup, optics,
                 n_optics, sigma_offset, scale_groups=None, n_scale_groups=None, P_c=None):
    """Score one batch of particles against every class in ``projs`` (one set of coarse orientations).

    The coarse pass covers the batch; the fine pass runs per group of particles
    (:func:`cryodask.em.estep.score_two_pass_grouped`), so that broad posteriors do not make it
    dense over the whole grid. Returns ``(groups, inserts)``: one entry per group
    ``(particle rows in the batch, TwoPassResult, per class (MStepSums, fine rotation matrices) or
    None when the class received no significant sample)``, and per class the weighted slices
    summed over the groups per fine orientation, ``(rotation matrices, data, weight)``, to insert.
    """
    from cryodask.em.estep import (gaussian_log_prior_trans, lazy_scoring_terms, mstep_sums, offset_prior_diff2,
                                   precompute_shifted, score_two_pass_grouped, scoring_terms)

    xp = backend.array_module(Xc)
    n_i = Xc.shape[0]
    os_ = setup.oversampling
    n_over_rot, n_over_trans = 8 ** os_, 4 ** os_
    n_tc = len(t_coarse)
    coarse = scoring_terms(precompute_shifted(Xc, ramps_c), ctf=ctf_c, inv_sigma2=isg_c, n_trans=n_tc,
                           mode=setup.mode)
    fine = lazy_scoring_terms(Xf, ramps_f, ctf=ctf_f, inv_sigma2=isg_f, mode=setup.mode)
    if P_c is None:
        mats_c = sampling.orientations(coarse_index).matrices(np.float32)
        P_c = [proj.sample(mats_c, kx_c, ky_c) for proj in projs]
    caches = [_FineCache(proj, sampling, coarse_index, os_, kx_f, ky_f) for proj in projs]
    rows_f: dict[tuple[int, int], np.ndarray] = {}

    def fine_projector(g: np.ndarray, c: int, orient: Any) -> Any:
        r = caches[c].rows(orient)
        rows_f[(int(g[0]), c)] = r
        return caches[c].P[r]

    lpt = gaussian_log_prior_trans(t_coarse, np.zeros((n_i, 2)), sigma_offset=sigma_offset,
                                   angpix=setup.pixel_size)
    groups = score_two_pass_grouped(coarse, fine, P_c, fine_projector, n_over_rot=n_over_rot,
                                    n_over_trans=n_over_trans, log_prior_orient=log_prior_orient,
                                    log_prior_trans=lpt, adaptive_fraction=setup.adaptive_fraction,
                                    maxsig=setup.maxsig)
    out_groups = []
    for g, res in groups:
        t_sel = t_fine[backend.to_numpy(res.fine_translations)]
        ramps_sel = ramps_f[res.fine_translations]
        Xu_s = precompute_shifted(Xu[g], ramps_sel)
        Xm_s = precompute_shifted(Xf[g], ramps_sel)
        od2 = offset_prior_diff2(t_sel, np.zeros((len(g), 2)), angpix=setup.pixel_size)
        isg_g = isg_m[g] if getattr(isg_m, "ndim", 1) == 2 else isg_m
        out: list[Any] = []
        for c, fcl in enumerate(res.classes):
            key = (int(g[0]), c)
            if key not in rows_f or fcl.stop == fcl.start:
                out.append(None)
                continue
            w, sig = res.class_weights(c)
            sums = mstep_sums(w, Xu_s, fcl.projections, ctf=ctf_f[g], inv_sigma2=isg_g, n_trans=len(t_sel),
                              X_shifted_masked=Xm_s, significant=sig, group=optics[g], n_groups=n_optics,
                              scale_group=None if scale_groups is None else scale_groups[g],
                              n_scale_groups=n_scale_groups,
                              offset_diff2=od2)
            act = backend.to_numpy(sums.orientations)
            caches[c].add(rows_f[key][act], sums.data, sums.weight)
            out.append((sums, caches[c].mats[rows_f[key]]))
        out_groups.append((g, res, out))
    del xp
    return out_groups, [c.inserts() for c in caches]


def sampling_points(setup: IterationSetup, n_classes: int = 1) -> int:
    """RELION's ``NrHiddenVariableSamplingPoints`` of one particle for this iteration.

    Global searches: the whole (symmetry-reduced) HEALPix × psi grid; local searches: the
    orientations inside the ±3σ window around a pose (at tilt 90°, where the window is widest).
    Times the translations, the classes and the adaptive oversampling.
    """
    from cryodask.geometry.healpix import healpix_sampling, local_subset
    from cryodask.geometry.shifts import translation_grid
    from cryodask.progress import hidden_variable_sampling_points

    sampling = healpix_sampling(setup.healpix_order, sym=setup.sym, psi_step=setup.psi_step)
    if setup.local_searches:
        s = setup.sigma_ang
        n_orient = len(local_subset(sampling, 0.0, 90.0, 0.0, sigma_rot=s, sigma_tilt=s, sigma_psi=s)[0])
    else:
        n_orient = sampling.n_orientations
    n_trans = len(translation_grid(setup.offset_range, setup.offset_step))
    return hidden_variable_sampling_points(n_classes, n_orient, 1, n_trans, oversampling=setup.oversampling)


def expectation_chunk(images: np.ndarray, meta: ChunkMeta, setup: IterationSetup) -> ChunkResult:
    """E-step and M-step sums of one chunk (see the module docstring).

    With ``setup.split_halves`` (refine3d) particles of half ``h`` are scored against
    reference ``h`` and accumulated into ``bp[h]``; otherwise (class3d) every particle is
    scored against all references together, with the class priors ``setup.class_fractions``,
    and class ``k``'s weighted slices go into ``bp[k]``.
    """
    from cryodask.geometry.euler import matrix_to_euler
    from cryodask.geometry.healpix import healpix_sampling, local_subset
    from cryodask.geometry.shifts import oversample_translations, translation_grid
    from cryodask.em.estep import phase_ramps
    from cryodask.em.state import iteration_rng
    from cryodask.ops.backproject import BackProjector

    retain_coarse_projections([] if setup.local_searches else setup.reference_paths)
    images = np.asarray(images, dtype=np.float32)
    n = len(images)
    box = setup.box
    nsh = box // 2 + 1
    n_refs = len(setup.reference_paths)
    n_sets = n_refs if setup.split_halves else 1  # particle sets with their own σ² and offsets
    n_opt = meta.n_optics
    r_cur = setup.current_size / 2.0
    r_coarse = setup.coarse_size / 2.0
    flat_c, kx_c, ky_c, sh_c = pixel_shells(box, r_coarse)
    flat_f, kx_f, ky_f, sh_f = pixel_shells(box, r_cur)
    flat_a, _, _, sh_a = pixel_shells(box, box / 2.0)
    ins_f = ~((kx_f == 0) & (ky_f < 0))  # the Friedel mates BackProjector.insert leaves out

    rng = iteration_rng(setup.random_seed, setup.iteration, 1 + int(meta.index[0]) if n else 1)
    norm_in = np.ones(n) if meta.norm is None else np.asarray(meta.norm, np.float64)
    if setup.do_norm:  # RELION's first step of image preparation
        images = images * (setup.avg_norm / norm_in).astype(np.float32)[:, None, None]
    ft_u, ft_m = prepare_images(images, meta.origins_px, pixel_size=setup.pixel_size,
                                particle_diameter=setup.particle_diameter, width_mask_edge=setup.width_mask_edge,
                                zero_mask=setup.zero_mask, rng=rng)
    ctf_full = _ctf(meta, np.arange(n), box, setup.pixel_size, setup.do_ctf)
    U = ft_u.reshape(n, -1)
    M = ft_m.reshape(n, -1)
    C = ctf_full.reshape(n, -1)
    group = meta.optics if meta.group is None else np.asarray(meta.group, np.int64)
    if setup.scale is not None:  # the group's intensity scale multiplies the references, as the CTF does
        sets = meta.half - 1 if setup.split_halves and n_sets > 1 else np.zeros(n, np.int64)
        C = C * np.asarray(setup.scale, np.float64)[sets, group][:, None].astype(C.dtype)

    sampling = healpix_sampling(setup.healpix_order, sym=setup.sym, psi_step=setup.psi_step,
                                random_perturbation=setup.random_perturbation)
    t_coarse = translation_grid(setup.offset_range, setup.offset_step,
                                random_perturbation=setup.random_perturbation)
    t_fine = oversample_translations(t_coarse, None, setup.oversampling, setup.offset_step)
    # translation t scores the image moved by +t (new origin = old + t); phase_ramps moves by −t
    ramps_c = phase_ramps(np.stack([kx_c, ky_c], axis=1), -t_coarse, box)
    ramps_f = phase_ramps(np.stack([kx_f, ky_f], axis=1), -t_fine, box)

    acc = Accumulators(
        bp=[BackProjector.zeros(box, pad=setup.pad, r_max=r_cur) for _ in range(n_refs)],
        sigma2_sum=np.zeros((n_sets, n_opt, nsh)), power_sum=np.zeros((n_sets, n_opt, nsh)),
        pixel_count=np.zeros((n_sets, n_opt, nsh)), n_particles=np.zeros((n_sets, n_opt)),
        sigma2_offset=np.zeros(n_sets), weight_sum=np.zeros(n_sets),
        class_weight=np.zeros(n_refs))
    if not setup.local_searches:
        acc.direction_weight = np.zeros((n_refs, sampling.n_directions))
    n_over_rot = 8 ** setup.oversampling
    if setup.scale is not None:
        n_groups = np.asarray(setup.scale).shape[-1]
        acc.signal_product = np.zeros((n_sets, n_groups, nsh))
        acc.reference_power = np.zeros((n_sets, n_groups, nsh))
    wdiff2 = np.zeros(n)  # --norm: Σ_φ w Σ_k |X − A|² per particle
    out_rot, out_tilt, out_psi = meta.rot.copy(), meta.tilt.copy(), meta.psi.copy()
    out_orig = meta.origins_px.copy()
    out_class = np.zeros(n, np.int64)
    pmax = np.zeros(n)
    nsig = np.zeros(n, np.int64)
    ll = np.zeros(n)
    failed = np.zeros(n, bool)

    n_per_shell_f = np.bincount(sh_f, minlength=nsh)[:nsh]
    for h in range(n_sets):
        sel = np.flatnonzero(meta.half == h + 1) if setup.split_halves and n_sets > 1 else np.arange(n)
        if len(sel) == 0:
            continue
        refs = [h] if setup.split_halves else list(range(n_refs))
        projs = [load_projector(setup.reference_paths[k], pad=setup.pad, r_max=r_cur) for k in refs]
        class_lp = None
        if not setup.split_halves and setup.class_fractions is not None:
            with np.errstate(divide="ignore"):
                class_lp = np.log(np.asarray(setup.class_fractions, np.float64))
        sigma2 = setup.sigma2_noise[h]
        opt = meta.optics[sel]
        # power of the masked images per shell (σ² beyond the window)
        pw = np.abs(M[sel][:, flat_a]) ** 2
        for o in range(n_opt):
            so = opt == o
            if so.any():
                acc.power_sum[h, o] += np.bincount(sh_a, weights=pw[so].sum(axis=0), minlength=nsh)[:nsh]
                acc.n_particles[h, o] += so.sum()
                acc.pixel_count[h, o] += n_per_shell_f * so.sum()
        P_c = None
        if setup.local_searches:
            batches = [np.array([i]) for i in sel]
        else:
            # the fine pass runs over the union of a batch's significant samples; smaller batches shrink
            # the union but cost more per particle (measured at box 32), so the default is one batch
            bs = setup.batch_size if setup.batch_size > 0 else len(sel)
            batches = [sel[s:s + bs] for s in range(0, len(sel), bs)]
            mats_c = sampling.orientations().matrices(np.float32)
            P_c = [coarse_projections(setup.reference_paths[k], proj, mats_c, kx_c, ky_c, keep=n_refs)
                   for k, proj in zip(refs, projs, strict=True)]
        for b in batches:
            ob = meta.optics[b]
            Mb, Cb = M[b], C[b]  # np.take keeps the windowed rows C-ordered ([:, idx] makes them Fortran-ordered)
            kw = dict(Xc=np.take(Mb, flat_c, axis=1), Xf=np.take(Mb, flat_f, axis=1),
                      Xu=np.take(U[b], flat_f, axis=1), ctf_c=np.take(Cb, flat_c, axis=1),
                      ctf_f=np.take(Cb, flat_f, axis=1), isg_c=_inv_sigma2(sigma2, ob, sh_c, origin=False),
                      isg_f=_inv_sigma2(sigma2, ob, sh_f, origin=False),
                      isg_m=_inv_sigma2(sigma2, ob, sh_f, origin=True), projs=projs, sampling=sampling,
                      kx_c=kx_c, ky_c=ky_c, kx_f=kx_f, ky_f=ky_f, t_coarse=t_coarse, t_fine=t_fine, ramps_c=ramps_c,
                      ramps_f=ramps_f, setup=setup, optics=ob, n_optics=n_opt, sigma_offset=setup.sigma_offset[h],
                      P_c=P_c)
            batch_groups, local_group = np.unique(group[b], return_inverse=True)  # the scale groups of the batch
            if acc.signal_product is not None:
                kw.update(scale_groups=local_group, n_scale_groups=len(batch_groups))
            if setup.local_searches:
                i = int(b[0])
                idx, lp = local_subset(sampling, meta.rot[i], meta.tilt[i], meta.psi[i], sigma_rot=setup.sigma_ang,
                                       sigma_tilt=setup.sigma_ang, sigma_psi=setup.sigma_ang)
            else:
                idx, lp = np.arange(sampling.n_orientations), None
            dir_lp = None
            if setup.direction_prior is not None and not setup.local_searches:
                with np.errstate(divide="ignore"):
                    dir_lp = np.log(np.asarray(setup.direction_prior, np.float64)[refs])[:, idx // sampling.n_psi]
            if class_lp is not None:
                base = np.zeros(len(idx)) if lp is None else lp
                lp = class_lp[:, None] + base[None, :]
                if dir_lp is not None:
                    lp = lp + dir_lp
                if setup.random_classes:  # break the symmetry of identical starting references
                    pick = iteration_rng(setup.random_seed, setup.iteration, 2_000_003 + int(meta.index[b[0]])
                                         ).integers(0, len(projs), len(b))
                    own = np.arange(len(projs))[None, :] == pick[:, None]
                    lp = np.where(own[:, :, None], lp[None], -np.inf)
            elif lp is not None:
                lp = np.broadcast_to(lp[None, :], (len(projs), len(idx)))
            elif dir_lp is not None:
                lp = dir_lp
            kw.update(coarse_index=idx, log_prior_orient=lp)
            groups, inserts = _score_batch(**kw)
            for c, (mats, data, weight) in enumerate(inserts):
                if len(mats):  # insert the weighted slices at their orientations
                    # np.compress, not [:, mask]: the mask on the second axis gives a Fortran-ordered copy,
                    # which the scatter then copied again, transposed (16 ms a final-iteration insertion)
                    acc.bp[refs[c]].insert_pixels(np.compress(ins_f, backend.to_numpy(data), axis=1), mats,
                                                  np.compress(ins_f, backend.to_numpy(weight), axis=1),
                                                  kx_f[ins_f], ky_f[ins_f])
            for g, res, per_class in groups:
                bg = b[g]
                fail = backend.to_numpy(res.fine.failed)
                failed[bg] |= fail
                # per-particle best pose: its class and the row of that class's fine matrices
                pos = backend.to_numpy(res.fine.best_orientation)
                ok = ~fail
                best = np.zeros((len(bg), 3, 3))
                cls = np.zeros(len(bg), np.int64)
                for c, fcl in enumerate(res.classes):
                    inside = (pos >= fcl.start) & (pos < fcl.stop) & ok
                    if inside.any() and per_class[c] is not None:
                        best[inside] = per_class[c][1][pos[inside] - fcl.start]
                        cls[inside] = refs[c]
                ok &= np.abs(best).sum(axis=(1, 2)) > 0
                rot, tilt, psi = matrix_to_euler(best[ok]) if ok.any() else (np.zeros(0),) * 3
                out_rot[bg[ok]], out_tilt[bg[ok]], out_psi[bg[ok]] = rot, tilt, psi
                ft = backend.to_numpy(res.fine_translations)[backend.to_numpy(res.fine.best_translation)]
                out_orig[bg[ok]] = meta.origins_px[bg[ok]] + t_fine[ft][ok]
                out_class[bg] = cls
                pmax[bg] = backend.to_numpy(res.fine.pmax)
                nsig[bg] = backend.to_numpy(res.coarse.n_significant)
                ll[bg] = backend.to_numpy(res.fine.log_likelihood)
                for c, item in enumerate(per_class):
                    if item is None:
                        continue
                    sums, mats = item
                    k = refs[c]
                    if acc.direction_weight is not None:
                        fine = backend.to_numpy(res.classes[c].orientations)
                        acc.direction_weight[k] += np.bincount(
                            idx[fine // n_over_rot] // sampling.n_psi, minlength=sampling.n_directions,
                            weights=np.asarray(backend.to_numpy(sums.orientation_weight), np.float64))
                    s2n = backend.to_numpy(sums.sigma2_noise)
                    xa = backend.to_numpy(sums.signal_product)
                    aa = backend.to_numpy(sums.reference_power)
                    for o in range(n_opt):
                        acc.sigma2_sum[h, o] += np.bincount(sh_f, weights=np.asarray(s2n[o], np.float64),
                                                            minlength=nsh)[:nsh]
                    if acc.signal_product is not None:  # the batch's groups are distinct: += by index is a sum
                        acc.signal_product[h, batch_groups] += shell_sums(xa, sh_f, nsh)
                        acc.reference_power[h, batch_groups] += shell_sums(aa, sh_f, nsh)
                    wdiff2[bg] += backend.to_numpy(sums.wdiff2)
                    acc.sigma2_offset[h] += sums.sigma2_offset
                    acc.weight_sum[h] += float(backend.to_numpy(sums.sum_weight).sum())
                    acc.class_weight[k] += sums.class_weight
    norm_out = norm_in
    if setup.do_norm and setup.mode == "ml":
        from cryodask.em.mstep import norm_correction

        beyond = np.setdiff1d(flat_a, flat_f)  # power beyond the scoring window, to Nyquist
        highres = (np.abs(M[:, beyond]) ** 2).sum(axis=1, dtype=np.float64)
        norm_out = np.where(failed, norm_in, norm_correction(norm_in, setup.avg_norm, wdiff2, highres))
    return ChunkResult(acc=acc, index=meta.index, rot=out_rot, tilt=out_tilt, psi=out_psi, origins_px=out_orig,
                       pmax=pmax, n_significant=nsig, log_likelihood=ll, failed=failed, class_number=out_class + 1,
                       norm=norm_out)


def expected_accuracy_chunk(meta: ChunkMeta, setup: IterationSetup) -> np.ndarray:
    """RELION's ``calculateExpectedAngularErrors`` on the first ``setup.n_acc_particles`` particles of each
    half-set of a chunk, at their current poses against the iteration's references and σ², at the
    iteration's image size.

    Needs no images: only the CTFs, poses and model. refine3d runs it at the start of an iteration, before
    the sampling is updated from it, as RELION does. Returns ``[[Σ rotation (°), n], [Σ shift (Å), n]]``,
    to be added over chunks.
    """
    from cryodask.geometry.euler import euler_to_matrix

    box = setup.box
    r_cur = setup.current_size / 2.0
    flat, kx, ky, shell = pixel_shells(box, r_cur)
    mats = euler_to_matrix(meta.rot, meta.tilt, meta.psi).reshape(-1, 3, 3)
    group = meta.optics if meta.group is None else np.asarray(meta.group, np.int64)
    n_refs = len(setup.reference_paths)
    out = np.zeros((2, 2))
    for h in range(n_refs if setup.split_halves else 1):
        sel = np.flatnonzero(meta.half == h + 1) if setup.split_halves and n_refs > 1 else np.arange(len(mats))
        sel = sel[:setup.n_acc_particles]
        if len(sel) == 0:
            continue
        ctf = _ctf(meta, sel, box, setup.pixel_size, setup.do_ctf).reshape(len(sel), -1)[:, flat]
        if setup.scale is not None:
            ctf = ctf * np.asarray(setup.scale, np.float64)[h, group[sel]][:, None].astype(ctf.dtype)
        proj = load_projector(setup.reference_paths[h], pad=setup.pad, r_max=r_cur)
        rng = np.random.default_rng(int(sel[0]) + 17)
        for j, i in enumerate(sel):
            isg = _inv_sigma2(setup.sigma2_noise[h], meta.optics[[i]], shell, origin=False)[0]
            rot, shift = _expected_accuracy(proj, mats[i], ctf[j], isg, kx, ky, rng, box, setup.pixel_size)
            out += [[rot, 1], [shift, 1]]
    return out


_ANGLE_STEPS = np.concatenate([np.arange(0.05, 1.0, 0.05), np.arange(1.0, 5.0, 0.1), np.arange(5.0, 30.0, 0.5)])
_SHIFT_STEPS = np.concatenate([np.arange(0.1, 2.0, 0.1), np.arange(2.0, 10.0, 0.25)])


def _expected_accuracy(proj, mat, ctf, inv_sigma2, kx, ky, rng, box, pixel_size) -> tuple[float, float]:
    """The smallest rotation (degrees) and shift (Å) of one particle's expected image that change it by
    Σ|CTF·ΔP|²/(2σ²) > ln 100 (rotation about a random axis instead of RELION's separate rot/tilt/psi)."""
    from scipy.spatial.transform import Rotation

    thr = math.log(100.0)
    p0 = proj.sample(mat[None].astype(np.float32), kx, ky)[0] * ctf
    axis = rng.standard_normal(3)
    axis /= np.linalg.norm(axis)
    pert = Rotation.from_rotvec(np.deg2rad(_ANGLE_STEPS)[:, None] * axis[None, :]).as_matrix()
    mats_p = (mat[None] @ pert).astype(np.float32)
    angle = _ANGLE_STEPS[-1]
    for s in range(0, len(_ANGLE_STEPS), 16):  # in steps, as RELION stops at the first angle over
        pp = proj.sample(mats_p[s:s + 16], kx, ky) * ctf[None]
        d = (np.abs(pp - p0[None]) ** 2 * inv_sigma2[None]).sum(axis=1) / 2.0
        j = np.flatnonzero(d > thr)
        if len(j):
            angle = _ANGLE_STEPS[s + j[0]]
            break
    # shift along x: |P|²·|1 − e^{iφ}|² = |P|²·4 sin²(φ/2)
    phase = 2 * np.pi * kx[None, :] * _SHIFT_STEPS[:, None] / box
    ds = ((np.abs(p0) ** 2 * inv_sigma2)[None] * 4 * np.sin(phase / 2) ** 2).sum(axis=1) / 2.0
    j = np.flatnonzero(ds > thr)
    return float(angle), float((_SHIFT_STEPS[j[0]] if len(j) else _SHIFT_STEPS[-1]) * pixel_size)


# ---------------------------------------------------------------------------------------------
# initial noise estimate


def initial_noise_chunk(images: np.ndarray, meta: ChunkMeta, *, pixel_size: float, particle_diameter: float,
                        width_mask_edge: int, zero_mask: bool) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """Sums for RELION's initial σ² (``setSigmaNoiseEstimatesAndSetAverageImage``), per optics group.

    Returns (Σ|X|² per shell (n_optics, nsh), Σ X per pixel (n_optics, B, B//2+1), count (n_optics,)).
    """
    box = images.shape[-1]
    nsh = box // 2 + 1
    _, ft = prepare_images(np.asarray(images, np.float32), meta.origins_px, pixel_size=pixel_size,
                           particle_diameter=particle_diameter, width_mask_edge=width_mask_edge, zero_mask=True)
    flat, _, _, sh = pixel_shells(box, box / 2.0)
    power = np.zeros((meta.n_optics, nsh))
    total = np.zeros((meta.n_optics,) + ft.shape[1:], np.complex128)
    count = np.zeros(meta.n_optics)
    for o in range(meta.n_optics):
        s = meta.optics == o
        if s.any():
            power[o] = np.bincount(sh, weights=(np.abs(ft[s].reshape(s.sum(), -1)[:, flat]) ** 2).sum(axis=0),
                                   minlength=nsh)[:nsh]
            total[o] = ft[s].sum(axis=0)
            count[o] = s.sum()
    return power, total, count


def initial_sigma2(power: np.ndarray, total: np.ndarray, count: np.ndarray, box: int) -> np.ndarray:
    """σ²(shell) = (⟨|X|²⟩ − |⟨X⟩|²)/2 per optics group, from the sums of :func:`initial_noise_chunk`."""
    nsh = box // 2 + 1
    flat, _, _, sh = pixel_shells(box, box / 2.0)
    npix = np.bincount(sh, minlength=nsh)[:nsh].astype(np.float64)
    out = np.zeros((len(count), nsh))
    for o in range(len(count)):
        if count[o] <= 0:
            continue
        mean = total[o].reshape(-1)[flat] / count[o]
        mean_pw = np.bincount(sh, weights=np.abs(mean) ** 2, minlength=nsh)[:nsh]
        out[o] = (power[o] / count[o] - mean_pw) / np.maximum(npix, 1) / 2.0
    return np.maximum(out, 0.0)


# ---------------------------------------------------------------------------------------------
# half-set comparison


def _relion_round(v: np.ndarray) -> np.ndarray:
    """C's ROUND as RELION defines it: halves away from zero."""
    return (np.sign(v) * np.floor(np.abs(v) + 0.5)).astype(np.int64)


def downsampled_average(bp: Any) -> tuple[np.ndarray, tuple[np.ndarray, np.ndarray, np.ndarray]]:
    """``data/weight`` binned to the original grid (RELION's ``getDownsampledAverage``).

    Each padded voxel goes to the original-grid voxel its frequency rounds to; the data and the
    weights of a bin are summed before dividing, so a voxel that got little weight does not count as
    much as one that got a lot. Returns the average ``(2m+1, 2m+1, m+1)`` (z, y, x; y and z centred at
    ``m``) and the integer frequencies ``(kz, ky, kx)`` of its axes.
    """
    h = bp.half_extent
    nz, ny, nx = bp.weight.shape
    kz = _relion_round((np.arange(nz) - h) / bp.pad)
    ky = _relion_round((np.arange(ny) - h) / bp.pad)
    kx = _relion_round(np.arange(nx) / bp.pad)
    m = int(max(np.abs(kz).max(), np.abs(ky).max(), kx.max()))
    n = 2 * m + 1
    index = (((kz + m)[:, None, None] * n + (ky + m)[None, :, None]) * (m + 1) + kx[None, None, :]).reshape(-1)
    size = n * n * (m + 1)
    data = backend.to_numpy(bp.data).reshape(-1)
    weight = np.bincount(index, weights=backend.to_numpy(bp.weight).reshape(-1).astype(np.float64), minlength=size)
    real = np.bincount(index, weights=data.real.astype(np.float64), minlength=size)
    imag = np.bincount(index, weights=data.imag.astype(np.float64), minlength=size)
    avg = np.where(weight > 0, (real + 1j * imag) / np.where(weight > 0, weight, 1), 0)
    axes = np.arange(-m, m + 1)
    return avg.reshape(n, n, m + 1), (axes, axes, np.arange(m + 1))


def fsc_of_accumulators(bp1: Any, bp2: Any) -> np.ndarray:
    """Gold-standard FSC of two half-sets' unregularised averages, per shell of the original box; FSC(0) = 1.

    RELION's ``compareTwoHalves``: both accumulators binned to the original grid
    (:func:`downsampled_average`), then the FSC over the voxels with ``|k| <= r_max``, shell
    ``ROUND(|k|)``.
    """
    a = bp1.symmetrised(None) if not bp1.is_symmetrised else bp1
    b = bp2.symmetrised(None) if not bp2.is_symmetrised else bp2
    va, (kz, ky, kx) = downsampled_average(a)
    vb, _ = downsampled_average(b)
    nsh = a.ori_size // 2 + 1
    r = np.sqrt(kz[:, None, None] ** 2 + ky[None, :, None] ** 2 + kx[None, None, :] ** 2)
    keep = r <= a.r_max
    shell = _relion_round(r[keep])
    ok = shell < nsh
    shell = shell[ok]
    za, zb = va[keep][ok], vb[keep][ok]
    num = np.bincount(shell, weights=(za * np.conj(zb)).real, minlength=nsh)[:nsh]
    d1 = np.bincount(shell, weights=np.abs(za) ** 2, minlength=nsh)[:nsh]
    d2 = np.bincount(shell, weights=np.abs(zb) ** 2, minlength=nsh)[:nsh]
    den = np.sqrt(d1 * d2)
    fsc = np.where(den > 0, num / np.where(den > 0, den, 1), 0.0)
    fsc[0] = 1.0
    return fsc


def join_halves_at_low_resolution(bp1: Any, bp2: Any, shell_limit: int) -> tuple[Any, Any]:
    """RELION's ``joinTwoHalvesAtLowResolution``: average data and weight of both halves below ``shell_limit``."""
    a, b = bp1.copy(), bp2.copy()
    shell = np.floor(np.sqrt(a.radius2().astype(np.float64)) / a.pad + 0.5)
    low = np.broadcast_to(shell < shell_limit, a.weight.shape)
    for name in ("data", "weight"):
        x, y = getattr(a, name), getattr(b, name)
        avg = 0.5 * (x + y)
        x[low] = avg[low]
        y[low] = avg[low]
    return a, b
