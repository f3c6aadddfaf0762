"""Memory and disk a job needs per worker, before it runs (DESIGN §6), and the chunk size that fits.

RELION's most reported failure is running out of memory late, in the final Nyquist
iteration. This module models, from what a job knows before it starts (its options, the
box, the number of particles, the workers' ``memory_limit``), the peak of

* the **E-step** of one chunk task (:func:`cryodask.em.iteration.expectation_chunk`, or
  :func:`cryodask.em.class2d.expectation_chunk`): the images and their transforms, the
  projectors, the projections of the coarse grid, the shifted images (``N_i·N_t × K``
  complex, made once per image size), the score arrays (``N_i × N_r × N_t`` float32, the
  coarse pass and the fine pass over the chunk's significant union) with the posterior's
  working copies, and the accumulators the task carries (one
  :class:`~cryodask.ops.backproject.BackProjector` per reference);
* the **M-step** on one worker: the tree reduction (:func:`cryodask.em.known_poses.tree_reduce`,
  ``split_every`` operands plus their sum, each holding every reference's accumulators) and
  the reconstruction's working arrays, at the largest size the job reaches (refine3d: the
  final iteration at Nyquist, ``current_size = box``);
* the **scratch disk**: the particle store.

The counts come from the same code the jobs use (:func:`cryodask.geometry.healpix.healpix_sampling`,
:func:`cryodask.geometry.shifts.translation_grid`, :func:`cryodask.ops.project.slice_pixels`,
:meth:`cryodask.ops.backproject.BackProjector.zeros`'s geometry). The bytes per element of
each array family were read off the code and checked against ``tracemalloc`` peaks of the
real chunk task (``tests/em/test_memory.py``: within 30 %).

One quantity depends on the data: the fine pass scores the *union* over the chunk's
particles of their significant coarse orientations and translations. ``significant_fraction``
(of the coarse orientations, and of the translations) sets it; the default 0.1 is a
mid-refinement figure for chunks of a few hundred particles (measured: 0.02-0.3 on simulated
data; 1.0 when every particle disagrees, early in a run). :func:`preflight` adds a margin on top.

Examples
--------
>>> est = estimate("refine3d", box=128, n_particles=10_000, healpix_order=2)
>>> pf = preflight(est, 4 * 2**30)                       # a 4 GiB worker
>>> pf.chunk > 0
True
"""

from __future__ import annotations

import math
import os
from dataclasses import dataclass, field

import numpy as np

from cryodask.errors import UserError

__all__ = ["MemoryEstimate", "Preflight", "estimate", "preflight", "format_bytes", "default_worker_memory"]

JOBS = ("refine3d", "class3d", "class2d")

#: bytes per image pixel of the transient of image preparation (float64 FFTs, mask, noise; measured 56-64)
_PREP_BYTES_PER_PIXEL = 64
#: float32 score arrays alive at the posterior of the coarse pass (diff2, log-weights) + bool masks
_COARSE_BYTES_PER_SAMPLE = 4 + 4 + 3
#: fine pass: diff2, validity masks (repeat), posterior's masked copy and log-weights, masks
_FINE_BYTES_PER_SAMPLE = 4 + 3 + 4 + 4 + 2
#: what a posterior keeps: weights (float32) and the significance mask
_POSTERIOR_BYTES_PER_SAMPLE = 5
#: M-step sums (mstep_sums): complex64 copies of the selected shifted images alive at its peak, beyond the
#: unmasked and masked shifted images (measured; they exist per group of the fine pass, not per chunk)
_MSTEP_COPIES = 0.25
#: reconstruction working memory per accumulator voxel (symmetrised copy, masks, float64 weights,
#: complex128 quotient, shells) and per padded-box voxel (padded FT, inverse FFT, shifted copy)
_RECON_BYTES_PER_VOXEL = 60
_RECON_BYTES_PER_PADDED_VOXEL = 12
#: projector build (Projector.from_map): padded map, its shift, the FFT and its cast, per padded voxel
_BUILD_BYTES_PER_PADDED_VOXEL = 26
#: margin preflight keeps free under the worker's limit (Dask's own pause threshold is 80 %)
DEFAULT_MARGIN = 0.25


def format_bytes(n: float) -> str:
    """``1536`` → ``'1.5 KiB'``."""
    n = float(n)
    for unit in ("B", "KiB", "MiB", "GiB", "TiB"):
        if abs(n) < 1024 or unit == "TiB":
            return f"{n:.0f} {unit}" if unit == "B" else f"{n:.1f} {unit}"
        n /= 1024
    return f"{n:.1f} TiB"  # pragma: no cover


def default_worker_memory(threads_per_worker: int = 1) -> int:
    """This machine's memory divided by its cores, times the threads of one worker (bytes)."""
    try:
        total = os.sysconf("SC_PAGE_SIZE") * os.sysconf("SC_PHYS_PAGES")
    except (ValueError, OSError, AttributeError):  # pragma: no cover - non-POSIX
        import psutil

        total = psutil.virtual_memory().total
    return int(total // max(1, os.cpu_count() or 1) * max(1, threads_per_worker))


@dataclass
class MemoryEstimate:
    """Peak memory per worker and scratch disk of one job (bytes).

    ``e_step`` and ``m_step`` break the peaks down by what holds the memory. The E-step is
    ``e_fixed + chunk·e_per_particle`` for one chunk task (plus ``projector_cache`` and the
    other threads' tasks, see :attr:`e_step_peak`), which is how :func:`preflight` picks the chunk.
    """

    job: str
    box: int
    n_particles: int
    K: int
    pad: float
    chunk: int
    threads_per_worker: int
    current_size: int
    coarse_size: int
    n_orientations: int  # coarse orientations per reference (HEALPix × psi, or psi in 2D)
    n_translations: int  # coarse translations
    oversampling: int
    significant_fraction: float
    n_references: int  # references scored by one chunk task (refine3d: 2 half-sets)
    pixels_coarse: int
    pixels_fine: int
    e_fixed: int  # per chunk task, independent of its particle count
    e_per_particle: float
    e_step: dict[str, int] = field(default_factory=dict)  # breakdown at `chunk`
    m_step: dict[str, int] = field(default_factory=dict)
    projector_cache: int = 0  # projectors of the previous iteration still cached by the worker
    scratch_bytes: int = 0
    notes: list[str] = field(default_factory=list)

    def e_step_chunk(self, chunk: int | None = None) -> int:
        """Peak of one chunk task of ``chunk`` particles (default: :attr:`chunk`)."""
        n = self.chunk if chunk is None else int(chunk)
        return int(self.e_fixed + n * self.e_per_particle)

    def e_step_worker(self, chunk: int | None = None) -> int:
        """Peak of one worker in the E-step: its threads' chunk tasks at once, plus the projector cache."""
        return int(self.threads_per_worker * self.e_step_chunk(chunk) + self.projector_cache)

    @property
    def e_step_peak(self) -> int:
        return self.e_step_worker()

    @property
    def m_step_peak(self) -> int:
        return int(max(self.m_step.get("reduction", 0), self.m_step.get("reconstruction", 0)))

    @property
    def worker_peak(self) -> int:
        return max(self.e_step_peak, self.m_step_peak)


@dataclass
class Preflight:
    """Outcome of :func:`preflight`: the chunk size and the peaks it gives."""

    chunk: int
    e_step_peak: int
    m_step_peak: int
    limit: int
    usable: int  # limit × (1 − margin)
    max_chunk: int  # the largest chunk that fits (before capping at the particle count)


# ---------------------------------------------------------------------------------------------
# counts, from the code the jobs run


def _pixels(box: int, r_max: float) -> int:
    from cryodask.ops.project import slice_pixels

    return int(len(slice_pixels(box, r_max)[0]))


def _bp_voxels(box: int, pad: float, r_max: float, ndim: int = 3) -> tuple[int, int]:
    """(voxels of one BackProjector, voxels of the padded box) — BackProjector.zeros's geometry."""
    from cryodask.ops.project import padded_size

    p, padf = padded_size(box, pad)
    r = min(int(math.ceil(r_max)), box // 2)
    rad = int(math.floor(padf * r + 0.5))
    return (2 * rad + 3) ** (ndim - 1) * (rad + 2), p ** ndim


def _projector_voxels(box: int, pad: float, r_max: float, ndim: int = 3) -> int:
    """Voxels of a Projector (Projector.from_map's geometry)."""
    from cryodask.ops.project import padded_size

    p, padf = padded_size(box, pad)
    h = min(int(math.floor(padf * r_max + 0.5)), p // 2) + 1
    return (2 * h + 1) ** (ndim - 1) * (h + 1)


def _n_orientations(job: str, healpix_order: int, sym: str, psi_step: float | None) -> int:
    if job == "class2d":
        return int(round(360.0 / (10.0 if psi_step is None or psi_step <= 0 else psi_step)))
    from cryodask.geometry.healpix import healpix_sampling

    return int(healpix_sampling(healpix_order, sym=sym, psi_step=psi_step).n_orientations)


def _split_every() -> int:
    import inspect

    from cryodask.em.known_poses import tree_reduce

    return int(inspect.signature(tree_reduce).parameters["split_every"].default)


# ---------------------------------------------------------------------------------------------
# the model


def _check(job: str, box: int, n_particles: int, K: int, pad: float, threads: int) -> None:
    if job not in JOBS:
        raise UserError("--job", f"unknown job {job!r}; give one of {', '.join(JOBS)}")
    if not (isinstance(box, (int, np.integer)) and box >= 8):
        raise UserError("--box", f"box {box} is not an image size in pixels (>= 8)")
    if n_particles < 1:
        raise UserError("--n_particles", f"{n_particles} particles: give at least 1")
    if K < 1:
        raise UserError("--K", f"{K} classes: give at least 1")
    if not pad >= 1:
        raise UserError("--pad", f"padding factor {pad} must be >= 1 (RELION's default is 2)")
    if threads < 1:
        raise UserError("--threads", f"{threads} threads per worker: give at least 1")


def estimate(job: str, *, box: int, n_particles: int, K: int = 1, pad: float = 2, healpix_order: int = 2,
             offset_range: float = 6.0, offset_step: float = 2.0, oversampling: int = 1,
             psi_step: float | None = None, chunk: int | None = None, current_size: int | None = None,
             coarse_size: int | None = None, sym: str = "C1", threads_per_worker: int = 1,
             significant_fraction: float = 0.1, significant_translations: float = 1.0,
             n_optics: int = 1, image_bytes: int = 4) -> MemoryEstimate:
    """Peak memory per worker (E-step, M-step) and scratch disk of ``job``.

    Parameters
    ----------
    job
        ``"refine3d"``, ``"class3d"`` or ``"class2d"``.
    box, n_particles
        Image size (pixels) and number of particles.
    K
        Classes (class3d, class2d; refine3d has 1 reference per half-set).
    pad, healpix_order, offset_range, offset_step, oversampling, psi_step, sym
        The job's options (RELION's names; offsets in pixels). ``psi_step`` ``None``: the
        HEALPix step in 3D, 10° in 2D.
    chunk
        Particles per chunk task (default: the whole set, capped at 1000).
    current_size
        Image size of the fine pass. Default: the largest the job can reach, ``box``
        (refine3d's final iteration is at Nyquist).
    coarse_size
        Image size of the coarse pass (default: ``current_size``, the upper bound).
    threads_per_worker
        Chunk tasks one worker runs at once.
    significant_fraction
        Fraction of the coarse orientations (all classes) in the chunk's significant union
        (the fine pass's extent; see the module docstring).
    significant_translations
        Fraction of the coarse translations in that union (measured 0.7-1.0: the union over a
        chunk covers nearly every translation).
    n_optics
        Optics groups (small arrays only).
    image_bytes
        Bytes per stored pixel of the particle store (4 float32, 2 float16).
    """
    job = str(job)
    box, n_particles, K = int(box), int(n_particles), int(K)
    _check(job, box, n_particles, K, pad, threads_per_worker)
    if not 0 < significant_fraction <= 1:
        raise UserError("--significant_fraction", f"{significant_fraction} must be in (0, 1]")
    if not 0 < significant_translations <= 1:
        raise UserError("--significant_translations", f"{significant_translations} must be in (0, 1]")
    cur = box if current_size is None or current_size <= 0 else min(int(current_size), box)
    coarse = cur if coarse_size is None or coarse_size <= 0 else min(int(coarse_size), cur)
    chunk = min(n_particles, 1000) if chunk is None or chunk <= 0 else min(int(chunk), n_particles)
    ndim = 2 if job == "class2d" else 3
    n_refs = 2 if job == "refine3d" else K  # accumulators and projectors per chunk task
    n_scored = 1 if job == "refine3d" else K  # references a particle is scored against
    set_fraction = 0.5 if job == "refine3d" else 1.0  # refine3d scores each half-set's particles apart
    n_rc = _n_orientations(job, healpix_order, sym, psi_step)
    from cryodask.geometry.shifts import translation_grid

    n_tc = int(len(translation_grid(offset_range, offset_step)))
    over_rot = (2 if ndim == 2 else 8) ** int(oversampling)
    over_trans = 4 ** int(oversampling)
    n_tf = n_tc * over_trans
    kc, kf = _pixels(box, coarse / 2.0), _pixels(box, cur / 2.0)
    half = box * (box // 2 + 1)
    v_bp, v_pad = _bp_voxels(box, pad, cur / 2.0, ndim)
    v_proj = _projector_voxels(box, pad, cur / 2.0, ndim)
    v_proj_c = _projector_voxels(box, pad, coarse / 2.0, ndim) if ndim == 2 else 0  # class2d: 2 projectors
    f = float(significant_fraction)
    rows_f = max(1, math.ceil(f * n_scored * n_rc)) * over_rot  # fine orientations (union, all classes)
    t_f = max(1, math.ceil(float(significant_translations) * n_tc)) * over_trans  # fine translations (union)

    # -- fixed per chunk task (bytes)
    per_ref_image = 1 if ndim == 3 else 1
    projectors = n_refs * (v_proj + v_proj_c) * 8 * per_ref_image
    accumulators = n_refs * v_bp * 12
    # coarse projections of every class; in 3D they stay cached on the worker for every reference (both
    # half-sets in refine3d: iteration.coarse_projections)
    projections_c = (n_refs if ndim == 3 else n_scored) * n_rc * kc * 8
    projections_f = rows_f * kf * 8
    ramps = (n_tc * kc + 2 * n_tf * kf) * 8  # + the float64 phase of the fine ramps
    build = _BUILD_BYTES_PER_PADDED_VOXEL * v_pad // (1 if ndim == 3 else 1)
    rows_ins = max(1, rows_f // n_scored)  # one class's orientations are inserted at a time
    # gathers and scatters are compiled loops (cryodask.ops.kernels) with no per-sample temporaries on the
    # CPU; the projections they make are counted above. (CuPy's array expressions hold ~240 B per sampled
    # pixel of a block on the GPU, which is not this host-memory estimate.)
    sample_c = sample_f = 0
    insert = rows_ins * kf * 24 + rows_ins * half * 12  # the slices' pixels, full-size slices and weights

    # -- per particle of the chunk (bytes); `s` scales what one set (half) holds at once
    s = set_fraction
    images = box * box * 4 + 2 * half * 8 + half * 4  # images, two FTs, CTF
    prep = _PREP_BYTES_PER_PIXEL * box * box
    inputs = s * (kc * 16 + kf * 28)  # windowed images, CTF, 1/σ² for the coarse and fine size
    shifted_c = s * n_tc * kc * 8
    shifted_f = s * kf * 8  # the fine terms are lazy: unshifted until translations are selected
    shifted_sel = s * t_f * kf * 8  # fine terms restricted to the union's translations
    scores_c = s * n_scored * n_rc * n_tc
    scores_f = s * rows_f * t_f
    mstep = s * _MSTEP_COPIES * t_f * kf * 8 + 2 * shifted_sel  # + the unmasked and masked shifted images
    gemm_c = min(scores_c * 4, max(64 * s * n_tc * 4, 0))  # an orientation block's GEMM output (per particle part)

    # the M-step's weight matrix: one class's orientations at a time in 3D, all classes at once in class2d
    # (while its posteriors are broad: class2d._stack_classes)
    wmat_classes = 1 if ndim == 2 else max(1, n_scored)
    # phases of a chunk task: (fixed bytes, bytes per particle); the peak is the largest phase
    held_fixed = projectors + accumulators
    phases = {
        "prepare": (accumulators, images + prep),
        "projector build": (held_fixed + build, images),
        "coarse projections": (held_fixed + projections_c + sample_c, images),
        "shifted images": (held_fixed + projections_c + ramps, images + inputs + 2 * shifted_c + shifted_f),
        "coarse scores": (held_fixed + projections_c + ramps,
                          images + inputs + shifted_c + shifted_f + gemm_c + scores_c * _COARSE_BYTES_PER_SAMPLE),
        "fine projections": (held_fixed + projections_c + ramps + sample_f,
                             images + inputs + shifted_c + shifted_f + shifted_sel
                             + scores_c * _POSTERIOR_BYTES_PER_SAMPLE),
        "fine scores": (held_fixed + projections_c + projections_f + ramps,
                        images + inputs + shifted_c + shifted_f + shifted_sel
                        + scores_c * _POSTERIOR_BYTES_PER_SAMPLE + scores_f * _FINE_BYTES_PER_SAMPLE),
        # the coarse posterior is freed once the fine passes are made (groups keep per-particle fields only)
        "M-step sums": (held_fixed + projections_c + projections_f + ramps,
                        images + inputs + shifted_c + shifted_f + mstep
                        + scores_f * _POSTERIOR_BYTES_PER_SAMPLE + scores_f * 4 / wmat_classes),
        "insertion": (held_fixed + projections_c + projections_f + ramps + insert,
                      images + inputs + shifted_c + shifted_f + 2 * shifted_sel
                      + scores_f * _POSTERIOR_BYTES_PER_SAMPLE),
    }
    if job == "class2d":  # class2d scores its chunk in batches whose shifted images fit BATCH_BYTES
        from cryodask.em.class2d import batch_size

        nb = batch_size(n_tf, kf)
        if chunk > nb:  # the per-batch part stops growing with the chunk
            phases = {k: (a + b * nb - images * nb, images) if k != "prepare" else (a, b)
                      for k, (a, b) in phases.items()}
    name, (fixed, per) = max(phases.items(), key=lambda kv: kv[1][0] + chunk * kv[1][1])
    e_step = {
        "phase": 0,
        "images (images, FTs, CTF)": int(chunk * images),
        "projectors": int(projectors),
        "projections (coarse grid + fine union)": int(projections_c + (projections_f if "fine" in name or "M-step" in name else 0)),
        "shifted images": int(chunk * (shifted_c + shifted_f + (shifted_c if name == "shifted images" else 0))),
        "scores (N_i·N_r·N_t and posteriors)": int(chunk * (scores_c * _COARSE_BYTES_PER_SAMPLE if name != "fine scores"
                                                            else scores_c * 5 + scores_f * _FINE_BYTES_PER_SAMPLE)),
        "accumulators carried by the task": int(accumulators),
    }
    del e_step["phase"]
    total_chunk = int(fixed + chunk * per)
    e_step["other (windowed inputs, GEMM blocks, temporaries)"] = max(0, total_chunk - sum(e_step.values()))
    e_step["peak phase: " + name] = total_chunk
    # the previous iteration's projectors stay in the per-process cache (iteration.load_projector keeps 4)
    from cryodask.em.iteration import _MAX_CACHED

    cache = max(0, min(_MAX_CACHED, 2 * n_refs) - n_refs) * v_proj * 8 if ndim == 3 else 0

    # -- M-step on one worker: tree reduction, then reconstructions (one per thread at once)
    split = _split_every()
    one_acc = n_refs * v_bp * 12
    reduction = (split + 1) * one_acc
    recon_one = _RECON_BYTES_PER_VOXEL * v_bp + _RECON_BYTES_PER_PADDED_VOXEL * v_pad
    if job == "refine3d":
        recon_one += v_bp * 12  # the joined halves (bp0 + bp1) of the final iteration
    reconstruction = one_acc + min(threads_per_worker, n_refs + (1 if job == "refine3d" else 0)) * recon_one
    m_step = {"accumulators (one set, all references)": int(one_acc), "reduction": int(reduction),
              "reconstruction": int(reconstruction), "reconstruction per map": int(recon_one)}
    scratch = int(n_particles) * box * box * int(image_bytes) + 200 * int(n_particles)  # images + metadata
    notes = [f"fine pass over {significant_fraction:g} of the coarse grid (significant union)",
             f"current_size {cur}, coarse_size {coarse}"]
    return MemoryEstimate(job=job, box=box, n_particles=n_particles, K=K, pad=float(pad), chunk=chunk,
                          threads_per_worker=int(threads_per_worker), current_size=cur, coarse_size=coarse,
                          n_orientations=n_rc, n_translations=n_tc, oversampling=int(oversampling),
                          significant_fraction=f, n_references=n_refs, pixels_coarse=kc, pixels_fine=kf,
                          e_fixed=int(fixed), e_per_particle=float(per), e_step=e_step, m_step=m_step,
                          projector_cache=int(cache), scratch_bytes=scratch, notes=notes)


def _fixes(est: MemoryEstimate, what: str) -> str:
    fixes = []
    if est.pad > 1:
        fixes.append("--pad 1 (accumulators and projectors 8x smaller)")
    fixes.append(f"a smaller box (cryodask import --new_box {max(8, (est.box // 2) // 2 * 2)})")
    if est.K > 1:
        fixes.append(f"fewer classes (--K {max(1, est.K // 2)})")
    if what == "E-step" and est.n_orientations > 1:
        fixes.append("a coarser sampling (--healpix_order / --psi_step) or a smaller --offset_range")
    fixes.append("more memory per worker (the memory of your --cluster config, or --memory_per_worker)")
    if est.threads_per_worker > 1:
        fixes.append("fewer threads per worker")
    return "; or ".join(fixes)


def preflight(est: MemoryEstimate, worker_memory_limit_bytes: float, *, chunk: int | None = None,
              margin: float = DEFAULT_MARGIN) -> Preflight:
    """The largest chunk (particles per task) whose E-step fits a worker, or a UserError naming the fix.

    Parameters
    ----------
    est
        :func:`estimate` of the job.
    worker_memory_limit_bytes
        One worker's ``memory_limit`` (``client.scheduler_info()["workers"][...]["memory_limit"]``);
        0 or None means no limit (the machine's memory per core is used).
    chunk
        A chunk size asked for (``--pool``): checked, and lowered when it does not fit.
    margin
        Fraction of the limit kept free (Dask pauses a worker at 80 % of its limit).

    Raises
    ------
    UserError
        When the M-step does not fit, or the E-step does not fit with one particle per task.
    """
    limit = int(worker_memory_limit_bytes or default_worker_memory(est.threads_per_worker))
    usable = int(limit * (1.0 - margin))
    if est.m_step_peak > usable:
        raise UserError("memory", f"the M-step of {est.job} (box {est.box}, pad {est.pad:g}, "
                        f"{est.n_references} reference(s)) needs {format_bytes(est.m_step_peak)} per worker, "
                        f"more than {format_bytes(usable)} ({1 - margin:.0%} of the {format_bytes(limit)} limit); "
                        f"use {_fixes(est, 'M-step')}")
    free = usable - est.projector_cache
    t = est.threads_per_worker
    one = t * est.e_fixed + t * est.e_per_particle
    if one > free:
        raise UserError("memory", f"the E-step of {est.job} (box {est.box}, {est.n_orientations} orientations x "
                        f"{est.n_translations} translations) needs {format_bytes(one + est.projector_cache)} per "
                        f"worker with even 1 particle per task, more than {format_bytes(usable)} ({1 - margin:.0%} "
                        f"of the {format_bytes(limit)} limit); use {_fixes(est, 'E-step')}")
    max_chunk = int((free / t - est.e_fixed) // max(est.e_per_particle, 1.0))
    want = est.n_particles if chunk is None or chunk <= 0 else int(chunk)
    c = max(1, min(max_chunk, want, est.n_particles))
    return Preflight(chunk=c, e_step_peak=est.e_step_worker(c), m_step_peak=est.m_step_peak, limit=limit,
                     usable=usable, max_chunk=max_chunk)
