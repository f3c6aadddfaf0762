"""Gold-standard 3D auto-refinement (RELION's ``relion_refine --auto_refine --split_random_halves``).

Two random half-sets (``rlnRandomSubset`` when the input has it) are refined against
their own references. Each iteration (:mod:`cryodask.em.iteration`) runs one task per
particle chunk; the accumulators are tree-reduced per half-set and the halves are
reconstructed in parallel, regularised by τ² from the gold-standard FSC
(:func:`cryodask.em.mstep.tau2_from_fsc`). Then, on the driver: σ² per optics group,
σ_offset, the resolution (last shell with SSNR ≥ 1) and the image sizes, the expected
angular accuracy, the changes of the hidden variables and RELION's schedule — HEALPix
order raised once the resolution and the hidden variables have stalled for an iteration,
local searches (σ = 2 × the new oversampled step) from ``--auto_local_healpix_order`` — until the
sampling is finer than the accuracy; then one final iteration with the halves joined,
out to Nyquist. Files per iteration are RELION's (:mod:`cryodask.em.state`).

Simplifications (to be lifted): uniform direction prior (``pdf_direction`` not learnt),
no norm / scale correction, white-noise fill outside the mask without ``--zero_mask``,
one class (``K = 1``).
"""

from __future__ import annotations

import math
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import pandas as pd

from cryodask.errors import UserError
from cryodask.runs import RunViews

__all__ = ["refine3d", "Refine3DResult", "coarse_image_size", "image_size_for"]


@dataclass
class Refine3DResult(RunViews):
    """What :func:`refine3d` returns (besides the files it writes); ``.plot_fsc()``,
    ``.plot_slices()``, ``.plot_angles()``, ``.plot_convergence()`` and ``.write_report()`` read
    those files."""

    map: np.ndarray  # the final joined map
    half_maps: list[np.ndarray]
    resolution: float  # gold-standard FSC 0.143, Å
    fsc: np.ndarray
    data: pd.DataFrame  # particles with their refined poses
    pixel_size: float
    iterations: int
    output_root: str
    history: list[dict[str, Any]] = field(default_factory=list)

    @property
    def particles(self) -> pd.DataFrame:
        """The particles with their refined poses (``data``)."""
        return self.data

    @property
    def maps(self) -> list[np.ndarray]:
        """``[map]``: the final joined map, as ``.maps`` of the other jobs' results."""
        return [self.map]


def image_size_for(ires: int, box: int, incr_size: int) -> int:
    """RELION's ``current_size = 2·(ires + incr_size)``, even and at most the box."""
    return int(min(box, 2 * (int(ires) + int(incr_size))))


def coarse_image_size(angular_step: float, particle_diameter: float, pixel_size: float, box: int,
                      current_size: int) -> int:
    """RELION's coarse size: resolution ``(step/360)·π·D/1.2`` → ``2·ceil(apix·N/res)``, at most current_size."""
    res = (angular_step / 360.0) * math.pi * particle_diameter / 1.2
    size = 2 * int(math.ceil(pixel_size * box / res)) if res > 0 else current_size
    return int(min(current_size, max(size, 8)))


def _ires(resolution: float, box: int, pixel_size: float) -> int:
    return max(1, int(round(box * pixel_size / resolution)))


def _last_shell_ssnr(dvp: np.ndarray) -> int:
    below = np.flatnonzero(dvp[1:] < 1.0)
    return int(below[0]) if len(below) else len(dvp) - 1  # (first index below 1) − 1, in shells from 0


def _column(parts: pd.DataFrame, label: str, default: float) -> np.ndarray:
    if label in parts.columns:
        v = pd.to_numeric(parts[label], errors="coerce").to_numpy(np.float64)
        return np.where(np.isfinite(v), v, default)
    return np.full(len(parts), default)


class _Run:
    """The driver's state of one refinement."""

    def __init__(self, session, particles, opts: dict[str, Any]):
        from cryodask.em.model import Model
        from cryodask.em.state import OptimiserState

        self.session = session
        self.client = session.client
        self.particles = particles
        self.o = opts
        self.box = int(particles.box)
        self.apix = float(particles.pixel_size)
        from cryodask.em.iteration import optics_tables, scale_groups

        self.optics, self.parts, self.optics_index = optics_tables(particles.table)
        self.n_opt = len(self.optics)
        # RELION's groups for the intensity scale (per micrograph unless rlnGroupName says otherwise)
        self.group_index, self.group_names = scale_groups(self.parts)
        self.parts["rlnGroupNumber"] = self.group_index + 1
        n = len(self.parts)
        self.state = OptimiserState()
        self.models = [Model(ori_size=self.box, pixel_size=self.apix, n_optics_groups=self.n_opt,
                             pad=opts["pad"] or 2, tau2_fudge=opts["tau2_fudge"] or 1.0,
                             optics_group_names=[str(s) for s in self.optics["rlnOpticsGroupName"]],
                             group_names=list(self.group_names))
                       for _ in range(2)]
        self.n = n
        self.history: list[dict[str, Any]] = []

    # -- per-chunk inputs ----------------------------------------------------------------------
    def chunk_meta(self, sl: slice):
        from cryodask.em.iteration import ChunkMeta
        from cryodask.ops.ctf import ctf_params, ctf_premultiplied

        p = self.parts.iloc[sl]
        ctf = pre = None
        if self.state.do_ctf_correction:
            sub = type(self.particles.table)(optics=self.optics, particles=p)
            src = str(getattr(self.particles, "path", "particles"))
            ctf = ctf_params(sub, source=src)
            pre = ctf_premultiplied(sub, source=src)
        origins = np.stack([_column(p, "rlnOriginXAngst", 0.0), _column(p, "rlnOriginYAngst", 0.0)], 1) / self.apix
        half = _column(p, "rlnRandomSubset", 1.0).astype(np.int64)
        return ChunkMeta(index=np.arange(sl.start, sl.stop), rot=_column(p, "rlnAngleRot", 0.0),
                         tilt=_column(p, "rlnAngleTilt", 0.0), psi=_column(p, "rlnAnglePsi", 0.0),
                         origins_px=origins, half=half, optics=self.optics_index[sl], ctf=ctf, premultiplied=pre,
                         n_optics=self.n_opt, norm=_column(p, "rlnNormCorrection", 1.0), group=self.group_index[sl])


def _reconstruct_task(bp, tau2, tau2_fudge, skip_gridding, sym):
    from cryodask.em.mstep import reconstruct

    return np.asarray(reconstruct(bp, tau2=tau2, tau2_fudge=tau2_fudge, skip_gridding=skip_gridding, sym=sym),
                      np.float32)


def _halves(acc, join_shell: int):
    from cryodask.em.iteration import join_halves_at_low_resolution

    if join_shell > 0:
        return list(join_halves_at_low_resolution(acc.bp[0], acc.bp[1], join_shell))
    return acc.bp


def _summarise(acc, join_shell: int) -> dict[str, Any]:
    """Small results of the reduced accumulators: FSC, σ²_rec per half and joined, and the
    accumulators' small sums (the 3D arrays stay on the worker)."""
    from dataclasses import replace

    from cryodask.em.iteration import fsc_of_accumulators
    from cryodask.em.mstep import reconstruction_sigma2

    b = _halves(acc, join_shell)
    # RELION joins the halves below --low_resol_join_halves first, then compares them (FSC 1 there)
    return {"fsc": fsc_of_accumulators(b[0], b[1]),
            "sigma2": [np.asarray(reconstruction_sigma2(x)) for x in b],
            "sigma2_joined": np.asarray(reconstruction_sigma2(acc.bp[0] + acc.bp[1])),
            "acc": replace(acc, bp=[])}


def _reconstruct_from(acc, h: int, join_shell: int, tau2, tau2_fudge, skip_gridding, sym):
    """Reconstruct half ``h`` (0/1) or the joined halves (``h = -1``) where the accumulators are."""
    bp = acc.bp[0] + acc.bp[1] if h < 0 else _halves(acc, join_shell)[h]
    return _reconstruct_task(bp, tau2, tau2_fudge, skip_gridding, sym)


def _tree(client, futures, func, key):
    from cryodask.em.known_poses import tree_reduce

    if len(futures) == 1:  # still one step, so the result is always the reduced type
        return client.submit(func, futures[0], key=f"{key}-0", pure=False)
    return tree_reduce(client, futures, func, key=key)


def _write_map(path, vol, apix):
    from cryodask.io.mrc import write_map

    write_map(path, np.asarray(vol, np.float32), apix)


def _solvent_flatten(vol: np.ndarray, particle_diameter: float, apix: float, width: int) -> np.ndarray:
    from cryodask.ops.filters import spherical_mask

    box = vol.shape[0]
    r = particle_diameter / (2 * apix) if particle_diameter > 0 else box / 2 - width
    return (vol * spherical_mask(box, r, width=width, ndim=3, dtype=np.float32)).astype(np.float32)


def refine3d(i: str | Path, o: str | Path, ref: str | Path | None = None, *,
             use_gpu: bool = False, gpu: str | None = None, gpu_list: str | None = None, j: int | None = None,
             workers: int | None = None, cluster: str | None = None, scheduler_file: str | None = None,
             scratch_dir: str | None = None, keep_free_scratch: float = 10.0, keep_scratch: bool = False,
             reuse_scratch: bool = False, preread_images: bool = False, no_parallel_disc_io: bool = False,
             profile: str | None = None,
             client: Any = None, ini_high: float = -1.0,
             particle_diameter: float = -1.0, healpix_order: int = 2, offset_range: float = 6.0,
             offset_step: float = 2.0, oversampling: int = 1, auto_local_healpix_order: int = 4, sym: str = "C1",
             ctf: bool = False, pad: float | None = None, tau2_fudge: float | None = None,
             firstiter_cc: bool = False,
             low_resol_join_halves: float = -1.0, zero_mask: bool = False, flatten_solvent: bool = False,
             iter: int | None = None, random_seed: int = 0, pool: int | None = None,
             skip_gridding: bool = True, incr_size: int = 10, perturb: float = 0.5,
             adaptive_fraction: float = 0.999, maxsig: int = -1, auto_iter_max: int = 999,
             norm: bool = False, scale: bool = False, continue_from: str | Path | None = None, command_line: str = "",
             log: Any = print, quiet: bool = False) -> Refine3DResult:
    """Gold-standard auto-refinement; RELION's option names as keyword arguments.

    Parameters
    ----------
    i
        Particles: a STAR file or a particle store (``cryodask import``).
    o
        Output rootname (``Refine3D/run`` writes ``Refine3D/run_it001_data.star``…).
    ref
        Initial reference map (same box and pixel size as the particles).
    ini_high
        Low-pass filter the reference to this resolution (Å) and start there.
    iter
        Hard stop: at most this many iterations before the final joined one (default:
        RELION's convergence rules, ``auto_iter_max``).
    use_gpu, gpu, gpu_list, j, workers, cluster, scheduler_file, scratch_dir, keep_free_scratch, keep_scratch, reuse_scratch, preread_images, no_parallel_disc_io, profile
        Where and how the job runs, as on the command line (the execution options,
        :mod:`cryodask.cluster.client`); by default a ``LocalCluster`` sized to the machine.
    client
        A ``distributed.Client`` to run on instead (left open at the end).
    pool
        Particles per chunk task when ``i`` is a STAR file (default: the store's chunking).
    norm, scale
        RELION's ``--norm`` (a normalisation correction per particle, ``rlnNormCorrection``) and
        ``--scale`` (an intensity scale per group, ``rlnGroupScaleCorrection``; a group is the
        particles' ``rlnGroupName``, else their micrograph); RELION's GUI turns both on.
    maxsig
        RELION's ``--maxsig``: at most this many significant coarse samples per particle (default
        −1, no cap). The fine pass already runs per group of particles, so broad first-iteration
        posteriors cost little; a cap trades the tail of the posterior for speed.
    continue_from
        An ``_itNNN_optimiser.star`` of an earlier run to resume (``--continue``).
    command_line
        Stored as the first line of each ``_optimiser.star``.
    log, quiet
        Where the progress lines go (None: nowhere); ``quiet``: no progress bars (batch logs).

    Returns
    -------
    Refine3DResult
    """
    opts = dict(i=str(i), o=str(o), ref=None if ref is None else str(ref), ini_high=ini_high,
                particle_diameter=particle_diameter, healpix_order=healpix_order, offset_range=offset_range,
                offset_step=offset_step, oversampling=oversampling, auto_local_healpix_order=auto_local_healpix_order,
                sym=sym, ctf=ctf, pad=pad, tau2_fudge=tau2_fudge, firstiter_cc=firstiter_cc,
                low_resol_join_halves=low_resol_join_halves, zero_mask=zero_mask, flatten_solvent=flatten_solvent,
                iter=iter, random_seed=random_seed, pool=pool, skip_gridding=skip_gridding, incr_size=incr_size,
                perturb=perturb, adaptive_fraction=adaptive_fraction, maxsig=maxsig, auto_iter_max=auto_iter_max,
                norm=bool(norm), scale=bool(scale),
                command_line=command_line, continue_from=None if continue_from is None else str(continue_from),
                quiet=bool(quiet))
    if continue_from is None and ref is None:
        raise UserError("--ref", "refine3d needs an initial reference map (--ref), or --continue")
    from cryodask.em.refine3d import _check_inputs

    _check_inputs(opts)  # bad input fails before a cluster starts
    Path(opts["o"]).parent.mkdir(parents=True, exist_ok=True)
    from cryodask.cluster.job import job_session

    with job_session(client, name=opts["o"], use_gpu=use_gpu, gpu=gpu, gpu_list=gpu_list, j=j, workers=workers,
                     cluster=cluster, scheduler_file=scheduler_file, scratch_dir=scratch_dir,
                     keep_free_scratch=keep_free_scratch, keep_scratch=keep_scratch, reuse_scratch=reuse_scratch,
                     preread_images=preread_images, no_parallel_disc_io=no_parallel_disc_io,
                     profile=profile) as session:
        return _refine(session, opts, log)


def _check_inputs(opts) -> None:
    """Open the particles and check the reference's box and pixel size, without starting a cluster."""
    from cryodask.io.mrc import stack_info

    particles = _open(opts)
    if opts.get("ref"):
        info = stack_info(opts["ref"])
        if tuple(info.shape) != (particles.box,) * 3:
            raise UserError(opts["ref"], f"is {info.shape[-1]} px but the particles are {particles.box} px; "
                                         "resample the reference to the particles' box")
    out = Path(opts["o"]).parent
    if out.exists() and not out.is_dir():
        raise UserError("--o", f"{out} is a file; give a rootname inside a folder")


def _open(opts):
    from cryodask.io.store import open_particles

    chunk = opts["pool"] if opts["pool"] and opts["pool"] > 1 else None
    return open_particles(opts["i"], chunk=chunk) if chunk else open_particles(opts["i"])


def _refine(session, opts, log) -> Refine3DResult:
    if opts["continue_from"] and not opts["pool"]:
        from cryodask.em.state import read_optimiser

        opts["pool"] = read_optimiser(opts["continue_from"])[0].max_pooled  # the same chunks as before
    from cryodask.em.state import iteration_rng
    from cryodask.io.mrc import read_map
    from cryodask.ops.filters import low_pass_filter

    particles = _preflight(session, opts, K=1, log=log)
    run = _Run(session, particles, opts)
    st = run.state
    root = opts["o"]
    if opts["continue_from"]:
        refs = _load_iteration(run, opts["continue_from"])
        st = run.state
        for m in run.models:  # options RELION lets a continued run change
            m.pad = float(opts["pad"] or m.pad)
            m.tau2_fudge = float(opts["tau2_fudge"] or m.tau2_fudge)
        if opts["iter"] is not None:
            st.n_iterations = int(opts["iter"])
        run.o["command_line"] = opts["command_line"] or st.output_root
    else:
        vol, vs = read_map(opts["ref"])
        if vol.shape != (run.box,) * 3:
            raise UserError(opts["ref"], f"is {vol.shape[-1]} px but the particles are {run.box} px; resample "
                                         "the reference to the particles' box")
        if opts["ini_high"] > 0:
            vol = low_pass_filter(vol, opts["ini_high"], run.apix)
        st.output_root = root
        st.random_seed = int(opts["random_seed"])
        st.n_iterations = int(opts["iter"]) if opts["iter"] is not None else int(opts["auto_iter_max"])
        st.healpix_order = st.healpix_order_original = int(opts["healpix_order"])
        from cryodask.geometry.healpix import angular_step

        st.psi_step = st.psi_step_original = angular_step(st.healpix_order)
        st.offset_range = st.offset_range_original = float(opts["offset_range"])
        st.offset_step = st.offset_step_original = float(opts["offset_step"])
        st.adaptive_oversampling = int(opts["oversampling"])
        st.adaptive_fraction = float(opts["adaptive_fraction"])
        st.auto_local_healpix_order = int(opts["auto_local_healpix_order"])
        st.sym = opts["sym"]
        st.particle_diameter = float(opts["particle_diameter"])
        st.do_zero_mask = bool(opts["zero_mask"])
        st.do_solvent = bool(opts["flatten_solvent"])
        st.incr_size = int(opts["incr_size"])
        st.do_ctf_correction = bool(opts["ctf"])
        st.low_resol_join_halves = float(opts["low_resol_join_halves"])
        st.firstiter_cc = bool(opts["firstiter_cc"])
        st.do_norm_correction, st.do_scale_correction = bool(opts["norm"]), bool(opts["scale"])
        st.ini_high = float(opts["ini_high"])
        st.perturbation_factor = float(opts["perturb"])
        st.max_pooled = int(particles.chunk_slices()[0].stop - particles.chunk_slices()[0].start)
        if "rlnRandomSubset" not in run.parts.columns:
            rng = iteration_rng(st.random_seed, 0, 99)
            half = np.ones(run.n, np.int64)
            half[rng.permutation(run.n)[run.n // 2:]] = 2
            run.parts["rlnRandomSubset"] = half
        ref0 = f"{root}_it000_half1_class001.mrc"
        _write_map(ref0, vol, run.apix)
        refs = [ref0, f"{root}_it000_half2_class001.mrc"]
        _write_map(refs[1], vol, run.apix)
        # initial noise spectrum from the images (per optics group), as RELION
        sigma2 = _initial_sigma2(run)
        for m in run.models:
            m.sigma2_noise[:] = sigma2
            m.sigma_offset = 10.0
            res0 = st.ini_high if st.ini_high > 0 else 2 * run.apix * run.box / max(4, run.box // 4)
            m.current_resolution = res0
    return _iterate(run, refs, log)


def _preflight(session, opts, *, K: int, log) -> Any:
    """The particles, re-chunked when the memory pre-flight asks for smaller tasks
    (:func:`cryodask.em.monitor.memory_preflight`); refuses up front when the job cannot fit."""
    from cryodask.em.monitor import memory_preflight

    particles = _open(opts)
    continued = bool(opts["continue_from"])
    order = opts["healpix_order"]
    if continued:  # the sampling the run had reached
        from cryodask.em.state import read_optimiser

        order = search_order(read_optimiser(opts["continue_from"])[0])
    no_search = bool(opts.get("skip_align"))  # class3d --skip_align scores one pose per particle and class
    fits = memory_preflight(opts.get("job", "refine3d"), session.client, particles,
                            chunk_given=bool(opts["pool"]) or continued, K=K, pad=opts["pad"] or 2,
                            healpix_order=0 if no_search else order,
                            offset_range=0.0 if no_search else opts["offset_range"], offset_step=opts["offset_step"],
                            oversampling=opts["oversampling"], sym=opts["sym"], log=log)
    if fits is not None:
        opts["pool"] = fits
        particles = _open(opts)
    return particles


def search_order(state: Any) -> int:
    """The HEALPix order whose global search bounds what a continued run will score.

    The run's own order, except in local searches (from ``--auto_local_healpix_order`` on; refine3d
    never leaves them): each particle is scored on its own few hundred orientations (σ = 2
    oversampled steps), less than the global search the run started with, so the run is checked as
    it was when it started (``healpix_order_original``). Counted as a global search at the run's
    order (order 6: 18.9 million orientations) the memory pre-flight refused a continued run that fits.
    """
    if state.local_searches:
        return int(state.healpix_order_original)
    return int(state.healpix_order)


def _initial_sigma2(run: _Run) -> np.ndarray:
    from cryodask.em.iteration import initial_noise_chunk, initial_sigma2

    client = run.client
    futs = run.session.chunk_futures(run.particles)
    outs = [client.submit(initial_noise_chunk, f, run.chunk_meta(sl), pixel_size=run.apix,
                          particle_diameter=run.state.particle_diameter, width_mask_edge=run.state.width_mask_edge,
                          zero_mask=True, pure=False)
            for f, sl in zip(futs, run.particles.chunk_slices(), strict=True)]
    power = total = count = None
    for p, t, c in client.gather(outs):
        power = p if power is None else power + p
        total = t if total is None else total + t
        count = c if count is None else count + c
    return initial_sigma2(power, total, count, run.box)


def _iterate(run: _Run, refs: list[str], log) -> Refine3DResult:
    from cryodask.em.monitor import JobMonitor

    total = None if run.o["iter"] is None else int(run.o["iter"]) + 1  # + the final joined iteration
    with JobMonitor("refine3d", run.client, output_root=run.state.output_root, total_iterations=total, log=log,
                    quiet=run.o.get("quiet", False)) as monitor:
        return _iterations(run, refs, monitor)


def _iterations(run: _Run, refs: list[str], monitor: Any) -> Refine3DResult:
    from cryodask.analysis.fsc import resolution_at
    from cryodask.em.iteration import IterationSetup, direction_prior, expectation_chunk, particle_results
    from cryodask.em.iteration import sampling_points, sum_accumulators
    from cryodask.em.mstep import scale_correction, tau2_from_fsc
    from cryodask.geometry.euler import angular_distance, euler_to_matrix
    from cryodask.geometry.healpix import angular_step

    st, client, o = run.state, run.client, run.o
    box, apix = run.box, run.apix
    nsh = box // 2 + 1
    root = st.output_root
    final_maps: list[Any] = []
    while True:
        t0 = time.time()
        it = st.iteration + 1
        # RELION's order: checkConvergence (end of the last iteration), the image size, the expected
        # accuracies against this iteration's references, then updateAngularSampling with them
        _check_convergence(st)
        final = st.do_join_random_halves
        m0 = run.models[0]
        current_size = _image_size(run, it, final)
        mode = "cc" if (it == 1 and st.firstiter_cc) else "ml"
        if mode == "ml":
            st.acc_rot, st.acc_trans = _expected_accuracies(run, it, refs, current_size)
        _update_angular_sampling(st, apix)
        step = angular_step(st.healpix_order)
        coarse_size = coarse_image_size(step, st.particle_diameter if st.particle_diameter > 0 else box * apix * 0.8,
                                        apix, box, current_size)
        setup = IterationSetup(
            iteration=it, box=box, pixel_size=apix, pad=float(m0.pad), current_size=current_size,
            coarse_size=coarse_size, reference_paths=[str(Path(r).resolve()) for r in refs],
            sigma2_noise=np.stack([m.sigma2_noise for m in run.models]),
            sigma_offset=[m.sigma_offset for m in run.models], healpix_order=st.healpix_order, sym=st.sym,
            random_perturbation=st.random_perturbation, offset_range=st.offset_range, offset_step=st.offset_step,
            oversampling=st.adaptive_oversampling, adaptive_fraction=st.adaptive_fraction,
            local_searches=st.local_searches, sigma_ang=st.sigma_ang, mode=mode,
            particle_diameter=st.particle_diameter, width_mask_edge=st.width_mask_edge, zero_mask=st.do_zero_mask,
            do_ctf=st.do_ctf_correction, random_seed=st.random_seed, maxsig=int(o.get("maxsig", -1) or -1),
            do_norm=st.do_norm_correction, avg_norm=float(m0.avg_norm),
            scale=np.stack([m.scale for m in run.models]) if st.do_scale_correction else None,
            direction_prior=None if st.local_searches or any(len(m.pdf_direction) != 1 for m in run.models)
            else direction_prior([m.pdf_direction[0] for m in run.models], st.healpix_order, st.sym))
        futs = run.session.chunk_futures(run.particles)
        results = []
        for k, (f, sl) in enumerate(zip(futs, run.particles.chunk_slices(), strict=True)):
            results.append(run.session.submit_scoring(expectation_chunk, f, run.chunk_meta(sl), setup,
                                         key=f"expectation-it{it:03d}-{k}-{f.key}", pure=False))
        per_particle = [client.submit(particle_results, r, pure=False) for r in results]
        total = _tree(client, results, sum_accumulators, key=f"sum-it{it:03d}-{results[0].key}")
        monitor.track(results, f"it{it:03d}")  # everything is submitted: the reduction runs as chunks finish
        pp = client.gather(per_particle)
        del results, per_particle
        # ---- per-particle results → data table; changes of the hidden variables
        old_rot = euler_to_matrix(_column(run.parts, "rlnAngleRot", 0.0), _column(run.parts, "rlnAngleTilt", 0.0),
                                  _column(run.parts, "rlnAnglePsi", 0.0)).reshape(-1, 3, 3)
        old_orig = np.stack([_column(run.parts, "rlnOriginXAngst", 0.0),
                             _column(run.parts, "rlnOriginYAngst", 0.0)], 1)
        idx = np.concatenate([r.index for r in pp])
        cols = {"rlnAngleRot": np.concatenate([r.rot for r in pp]),
                "rlnAngleTilt": np.concatenate([r.tilt for r in pp]),
                "rlnAnglePsi": np.concatenate([r.psi for r in pp])}
        orig = np.concatenate([r.origins_px for r in pp]) * apix
        p = run.parts
        for c, v in cols.items():
            arr = np.zeros(run.n)
            arr[idx] = v
            p[c] = arr
        ox, oy = np.zeros(run.n), np.zeros(run.n)
        ox[idx], oy[idx] = orig[:, 0], orig[:, 1]
        p["rlnOriginXAngst"], p["rlnOriginYAngst"] = ox, oy
        p["rlnClassNumber"] = 1
        avg_norm = update_norm_column(p, pp, idx, st.do_norm_correction and mode == "ml")
        for c, attr in (("rlnLogLikeliContribution", "log_likelihood"), ("rlnMaxValueProbDistribution", "pmax"),
                        ("rlnNrOfSignificantSamples", "n_significant")):
            arr = np.zeros(run.n)
            arr[idx] = np.concatenate([getattr(r, attr) for r in pp])
            p[c] = arr.astype(np.int64) if attr == "n_significant" else arr
        n_failed = int(np.concatenate([r.failed for r in pp]).sum())
        new_rot = euler_to_matrix(p["rlnAngleRot"].to_numpy(), p["rlnAngleTilt"].to_numpy(),
                                  p["rlnAnglePsi"].to_numpy()).reshape(-1, 3, 3)
        if it > 1 or ("rlnAngleRot" in run.particles.table.particles.columns):
            # RELION's monitorHiddenVariableChanges: the mean angular distance; the offsets' RMS per coordinate
            ch_ori = float(np.mean(angular_distance(new_rot, old_rot, st.sym)))
            ch_off = float(np.sqrt(np.mean(((np.stack([ox, oy], 1) - old_orig) ** 2).sum(axis=1)) / 2.0))
        else:
            ch_ori = ch_off = 999.0
        # ---- M-step: small summaries come to the driver, accumulators stay on the workers
        join_shell = -1
        if st.low_resol_join_halves > 0 and not final:
            join_shell = _ires(max(st.low_resol_join_halves, m0.current_resolution), box, apix)
        summary = client.submit(_summarise, total, join_shell, pure=False).result()
        fsc_now = summary["fsc"]
        T = float(m0.tau2_fudge)
        sg = o["skip_gridding"]
        if final:
            tau2, dvp = tau2_from_fsc(fsc_now, summary["sigma2_joined"], tau2_fudge=T, is_whole_instead_of_half=True)
            fut = [client.submit(_reconstruct_from, total, -1, -1, tau2, T, sg, st.sym, pure=False)]
            fut += [client.submit(_reconstruct_from, total, h, -1, None, T, sg, st.sym, pure=False) for h in range(2)]
            maps = client.gather(fut)
            tau2s, dvps = [tau2, tau2], [dvp, dvp]
        else:
            tau2s, dvps = [], []
            for h in range(2):
                t2, dv = tau2_from_fsc(fsc_now, summary["sigma2"][h], tau2_fudge=T)
                tau2s.append(t2)
                dvps.append(dv)
            maps = client.gather([client.submit(_reconstruct_from, total, h, join_shell, tau2s[h], T, sg, st.sym,
                                                pure=False) for h in range(2)])
            if st.do_solvent:
                maps = [_solvent_flatten(m, st.particle_diameter, apix, st.width_mask_edge) for m in maps]
        acc = summary["acc"]
        # ---- model update: σ², σ_offset, resolution
        npix_all = np.bincount(_all_shells(box), minlength=nsh)[:nsh].astype(np.float64)
        r_win = current_size // 2
        for h, m in enumerate(run.models):
            new = m.sigma2_noise.copy()
            for g in range(run.n_opt):
                nn = acc.n_particles[h, g]
                if nn <= 0:
                    continue
                inside = (np.arange(nsh) < r_win) & (acc.pixel_count[h, g] > 0)
                out_pw = acc.power_sum[h, g] / (2.0 * nn * np.maximum(npix_all, 1))
                new[g] = np.where(inside, acc.sigma2_sum[h, g] / np.maximum(2.0 * acc.pixel_count[h, g], 1e-30),
                                  out_pw)
            if mode == "ml":  # RELION keeps σ² through a --firstiter_cc iteration (its residuals are not ML ones)
                m.sigma2_noise[:] = new
            if acc.direction_weight is not None and acc.weight_sum[h] > 0:  # RELION's pdf_direction
                m.pdf_direction = [np.asarray(acc.direction_weight[h], np.float64) / acc.weight_sum[h]]
            if acc.weight_sum[h] > 0 and mode == "ml":
                m.sigma_offset = float(np.sqrt(max(2.0, acc.sigma2_offset[h] / (2.0 * acc.weight_sum[h]))))
            m.fsc[0] = fsc_now
            m.tau2[0] = np.asarray(tau2s[h], np.float64)
            m.data_vs_prior[0] = np.asarray(dvps[h], np.float64)
            m.sigma2_class[0] = summary["sigma2_joined"] if final else summary["sigma2"][h]
            m.current_size = current_size
            m.ave_pmax = float(p["rlnMaxValueProbDistribution"][p["rlnRandomSubset"] == h + 1].mean())
            m.log_likelihood = float(p["rlnLogLikeliContribution"][p["rlnRandomSubset"] == h + 1].sum())
            m.group_nr_particles = np.bincount(run.group_index[p["rlnRandomSubset"].to_numpy() == h + 1],
                                               minlength=len(run.group_names))
            if avg_norm is not None:
                m.avg_norm = avg_norm
            if st.do_scale_correction and mode == "ml" and acc.signal_product is not None:
                m.scale = scale_correction(m.scale, acc.signal_product[h], acc.reference_power[h], dvps[h],
                                           m.group_nr_particles)
        ires_new = _last_shell_ssnr(0.5 * (np.asarray(dvps[0]) + np.asarray(dvps[1])))
        ires_new = max(1, min(ires_new, current_size // 2))
        res_new = box * apix / ires_new
        gold = resolution_at(fsc_now, 0.143, apix, box)
        res_before = m0.current_resolution
        for m in run.models:
            m.current_resolution = res_new
            m.acc_rot[0], m.acc_trans[0] = st.acc_rot, st.acc_trans
            m.estimated_resolution[0] = gold
        lim_shell = min(current_size // 2, nsh - 1)
        st.has_high_fsc_at_limit = bool(fsc_now[lim_shell] > 0.2)
        # ---- convergence counters (RELION's updateOverallChangesInHiddenVariables); acted on at the next start
        st.iteration = it
        if not final:
            _count_stalled_iterations(st, 1.0 / res_new, 1.0 / res_before if res_before > 0 else 0.0, ch_ori, ch_off,
                                      apix)
            st.current_changes_optimal_orientations, st.current_changes_optimal_offsets = ch_ori, ch_off
            st.current_changes_optimal_classes = 0.0
        # ---- write the iteration's files
        entry = dict(iteration=it, current_size=current_size, coarse_size=coarse_size, order=setup.healpix_order,
                     local=setup.local_searches, resolution=res_new, gold_resolution=gold, acc_rot=st.acc_rot,
                     acc_trans=st.acc_trans, changes_orient=ch_ori, changes_offset=ch_off, failed=n_failed,
                     seconds=time.time() - t0)
        run.history.append(entry)
        numbers = dict(order=f"{setup.healpix_order}{' local' if setup.local_searches else ''}",
                       size=f"{coarse_size}/{current_size}", resolution=res_new, resolution_gold=gold,
                       accuracy=f"{st.acc_rot:.2f}°/{st.acc_trans:.2f} Å", changes=f"{ch_ori:.2f}°/{ch_off:.2f} Å")
        n_points = sampling_points(setup)
        if final:
            final_maps = maps
            _write_final(run, maps, fsc_now)
            monitor.iteration_done(it, sampling_points=n_points, plots=False, **numbers)
            break
        refs = [f"{root}_it{it:03d}_half{h + 1}_class001.mrc" for h in range(2)]
        for h in range(2):
            _write_map(refs[h], maps[h], apix)
        opt_file = _write_iteration(run, it, refs)
        # go on from what was written, so that --continue from any iteration gives the same result
        monitor.iteration_done(it, sampling_points=n_points, **numbers)
        refs = _load_iteration(run, opt_file)
        st = run.state
    from cryodask.io.star import read_particles

    return Refine3DResult(map=final_maps[0], half_maps=final_maps[1:], resolution=gold, fsc=fsc_now,
                          data=read_particles(f"{root}_data.star").particles, pixel_size=apix,
                          iterations=st.iteration, output_root=root, history=run.history)


def update_norm_column(parts: pd.DataFrame, results: list[Any], index: np.ndarray, update: bool) -> float | None:
    """``rlnNormCorrection`` from the chunks' new values (``--norm``); returns their mean, the new
    ``rlnNormCorrectionAverage`` (None when not updated: the column is kept, 1 where missing)."""
    if update and all(len(r.norm) == len(r.index) for r in results):
        arr = _column(parts, "rlnNormCorrection", 1.0)
        arr[index] = np.concatenate([r.norm for r in results])
        bad = ~np.isfinite(arr) | (arr <= 0)
        if bad.any():  # a particle without signal or noise: RELION stops; keep its previous value instead
            arr[bad] = _column(parts, "rlnNormCorrection", 1.0)[bad]
        parts["rlnNormCorrection"] = arr
        return float(arr.mean())
    if "rlnNormCorrection" not in parts.columns:
        parts["rlnNormCorrection"] = 1.0
    return None


def iteration_rng_seed(seed: int, it: int) -> np.random.Generator:
    from cryodask.em.state import iteration_rng

    return iteration_rng(seed, it, 7)


def _first_below(fsc: np.ndarray, thr: float) -> int:
    b = np.flatnonzero(np.asarray(fsc)[1:] < thr)
    return int(b[0]) + 1 if len(b) else len(fsc) - 1


def _all_shells(box: int) -> np.ndarray:
    from cryodask.em.iteration import pixel_shells

    return pixel_shells(box, box / 2.0)[3]


def _count_stalled_iterations(st, resol: float, resol_before: float, ch_ori: float, ch_off: float,
                              apix: float) -> None:
    """RELION's counters of iterations without resolution gain (``updateCurrentResolution``) and without large
    changes in the hidden variables (``updateOverallChangesInHiddenVariables``), from this iteration's
    resolution (1/Å), the previous iteration's, and the mean changes in orientation (°) and offset (Å).

    As ``relion_refine_mpi`` computes them: a gain is against the previous iteration, not the best so far;
    a change is large when it fell by more than 3 % against the smallest so far and is at least 40 % of the
    sampling step, where the step is the one the run *started* with (RELION's leader rank, which computes
    these, never updates its own sampling: only the followers raise the HEALPix order). With the current
    step instead, local searches would need one or two more iterations per order than RELION takes. The
    class test fails on the first iteration of each order (its smallest is reset to 9,999,999 there), so
    an order is searched at least twice.
    """
    from cryodask.geometry.healpix import angular_step

    if resol <= resol_before + 0.0001:
        st.nr_iter_wo_resol_gain += 1
    else:
        st.nr_iter_wo_resol_gain = 0
    st.best_resol_thus_far = max(st.best_resol_thus_far, resol)
    os_ = 2 ** st.adaptive_oversampling
    ratio_orient = ch_ori / (angular_step(st.healpix_order_original) / os_)
    ratio_trans = ch_off / (st.offset_step_original * apix / os_)
    ch_cls = 0.0  # one class per half-set
    stalled = (1.03 * ch_cls >= st.smallest_changes_optimal_classes
               and (ratio_trans < 0.40 or 1.03 * ch_off >= st.smallest_changes_optimal_offsets)
               and (ratio_orient < 0.40 or 1.03 * ch_ori >= st.smallest_changes_optimal_orientations))
    st.nr_iter_wo_large_hidden_variable_changes = st.nr_iter_wo_large_hidden_variable_changes + 1 if stalled else 0
    st.smallest_changes_optimal_classes = min(st.smallest_changes_optimal_classes, round(ch_cls))
    st.smallest_changes_optimal_orientations = min(st.smallest_changes_optimal_orientations, ch_ori)
    st.smallest_changes_optimal_offsets = min(st.smallest_changes_optimal_offsets, ch_off)


def _image_size(run: _Run, it: int, final: bool) -> int:
    """RELION's ``updateImageSizeAndResolutionPointers``: the whole box in the final iteration; the
    ``--ini_high`` shell in the first; else twice the resolution shell plus a margin that grows with the
    distance between the FSC's 0.5 and 0.143 crossings, and a quarter box more while the FSC is high at the
    limit."""
    st, box, apix = run.state, run.box, run.apix
    if final:
        size = box
    elif it == 1 and st.ini_high > 0:
        size = image_size_for(_ires(st.ini_high, box, apix), box, st.incr_size)
    else:
        incr = st.incr_size
        if it > 1:
            fsc = 0.5 * (run.models[0].fsc[0] + run.models[1].fsc[0])
            incr = max(incr, _first_below(fsc, 0.143) - _first_below(fsc, 0.5) + 5)
        size = image_size_for(_ires(run.models[0].current_resolution, box, apix), box, incr)
        if st.has_high_fsc_at_limit:
            size = min(box, size + box // 4)
    return size - size % 2


ACCURACY_PARTICLES = 100  # per half-set: RELION averages its accuracies over 100 particles in 3D


def _expected_accuracies(run: _Run, it: int, refs: list[str], current_size: int) -> tuple[float, float]:
    """RELION's ``calculateExpectedAngularErrors`` at the start of an iteration: the mean smallest rotation (°)
    and shift (Å) that change a particle's expected image significantly, against the iteration's references
    and σ² at the particles' current poses: the first few particles per half-set of the first chunks, about
    ``ACCURACY_PARTICLES`` per half-set in all (small tasks, no images). The workers' projector caches keep
    the references for the E-step that follows."""
    from cryodask.em.iteration import IterationSetup, expected_accuracy_chunk

    st, m = run.state, run.models
    setup = IterationSetup(
        iteration=it, box=run.box, pixel_size=run.apix, pad=float(m[0].pad), current_size=current_size,
        coarse_size=current_size, reference_paths=[str(Path(r).resolve()) for r in refs],
        sigma2_noise=np.stack([x.sigma2_noise for x in m]), sigma_offset=[x.sigma_offset for x in m],
        do_ctf=st.do_ctf_correction, scale=np.stack([x.scale for x in m]) if st.do_scale_correction else None)
    n_chunks = -(-ACCURACY_PARTICLES // setup.n_acc_particles)
    tasks = [run.client.submit(expected_accuracy_chunk, run.chunk_meta(sl), setup, pure=False)
             for sl in list(run.particles.chunk_slices())[:n_chunks]]
    total = np.sum(run.client.gather(tasks), axis=0)
    if total[0, 1] == 0:
        return st.acc_rot, st.acc_trans
    return float(total[0, 0] / total[0, 1]), float(total[1, 0] / total[1, 1])


def _stalled(st) -> bool:
    return st.nr_iter_wo_resol_gain >= 1 and st.nr_iter_wo_large_hidden_variable_changes >= 1


def _check_convergence(st) -> None:
    """RELION's ``checkConvergence``, from the counters of the last iteration: converged once resolution and
    hidden variables stall at a sampling already marked fine enough; then (or after ``--iter``) the final
    iteration with joined half-sets. Done at the start of an iteration rather than the end of the last one,
    so that the last one's files hold the sampling it used, as RELION's, and a continued run decides the
    same way."""
    if st.iteration < 1 or st.do_join_random_halves:
        return
    if _stalled(st) and st.has_fine_enough_angular_sampling:
        st.has_converged = True
    if st.has_converged or st.iteration >= st.n_iterations:
        st.do_join_random_halves = True


def _update_angular_sampling(st, apix: float) -> None:
    """RELION's ``updateAngularSampling`` at the start of an iteration, with ``st.acc_rot`` / ``st.acc_trans``
    just estimated against this iteration's references: once resolution and hidden variables stall, the
    sampling is marked fine enough when its step is below 0.75 × the angular accuracy (convergence then
    comes at the next stall, so the last order runs one more iteration), else the next HEALPix order.
    Then a new random perturbation."""
    from cryodask.geometry.healpix import angular_step, next_random_perturbation

    if st.iteration < 1:
        return
    if _stalled(st) and not st.has_converged:
        fine_step = angular_step(st.healpix_order) / 2 ** st.adaptive_oversampling
        if fine_step < 0.75 * st.acc_rot or st.healpix_order >= 7:
            st.has_fine_enough_angular_sampling = True
        else:
            _raise_sampling(st, st.current_changes_optimal_offsets, apix)
    st.random_perturbation = next_random_perturbation(
        st.random_perturbation, st.perturbation_factor, iteration_rng_seed(st.random_seed, st.iteration))


def _raise_sampling(st, offset_change: float, apix: float) -> None:
    """HEALPix order + 1, translations as RELION's updateAngularSampling sets them (in Å: a step of 75 % of
    the translational accuracy, at most 1.5 Å, times the oversampling; a range of five times the RMS change
    in offsets, at most 1.3 × the last range and at least 1.5 steps, halved when over four steps; never
    coarser than before), and local searches from ``auto_local_healpix_order``. ``offset_change`` in Å."""
    from cryodask.geometry.healpix import angular_step

    st.healpix_order += 1
    st.psi_step = angular_step(st.healpix_order)
    os_ = 2 ** st.adaptive_oversampling
    old_step, old_range = st.offset_step * apix, st.offset_range * apix
    step = min(1.5, 0.75 * st.acc_trans) * os_
    rng = min(1.3 * old_range, 5.0 * offset_change)
    rng = max(rng, 1.5 * step)
    if rng > 4.0 * step:
        rng /= 2.0
    if rng > 4.0 * step:
        step = rng / 4.0
    if step > old_step:
        step, rng = old_step, old_range
    st.offset_step, st.offset_range = float(step / apix), float(rng / apix)
    if st.healpix_order >= st.auto_local_healpix_order:
        st.local_searches = True
        # RELION: σ² = (2·step)² with the oversampled step (getAngularSampling(adaptive_oversampling))
        st.sigma_ang = 2.0 * angular_step(st.healpix_order) / 2 ** st.adaptive_oversampling
    st.nr_iter_wo_resol_gain = 0
    st.nr_iter_wo_large_hidden_variable_changes = 0
    st.smallest_changes_optimal_orientations = 999.0
    st.smallest_changes_optimal_offsets = 999.0
    st.smallest_changes_optimal_classes = 9999999


def _data_table(run: _Run):
    from cryodask.io.star import ParticleTable

    return ParticleTable(optics=run.optics, particles=run.parts)


def _write_iteration(run: _Run, it: int, refs: list[str]) -> None:
    from cryodask.em.model import write_model
    from cryodask.em.state import output_name, write_optimiser, write_sampling
    from cryodask.io.star import write_particles

    st = run.state
    root = st.output_root
    data = output_name(root, it, "data.star")
    write_particles(data, _data_table(run))
    models = []
    for h, m in enumerate(run.models):
        m.references = [refs[h]]
        path = output_name(root, it, f"half{h + 1}_model.star")
        write_model(path, m)
        models.append(str(path))
    sampling = output_name(root, it, "sampling.star")
    write_sampling(sampling, st, run.apix)
    opt = output_name(root, it, "optimiser.star")
    write_optimiser(opt, st, command_line=run.o["command_line"], model_files=" ".join(models), data_file=str(data),
                    sampling_file=str(sampling))
    return opt


def _load_iteration(run: _Run, optimiser: str | Path) -> list[str]:
    """Restore the run's state, models and particles from an iteration's files; returns the reference maps."""
    from cryodask.em.model import match_scale_groups, read_model
    from cryodask.em.state import read_optimiser, resolve_file
    from cryodask.io.star import read_particles

    st, files = read_optimiser(optimiser)
    data = resolve_file(files["data"], optimiser)
    t = read_particles(data)
    if len(t.particles) != run.n:
        raise UserError(data, f"has {len(t.particles)} particles but --i has {run.n}; continue with the same "
                              "particles")
    run.state = st
    run.parts = t.particles.reset_index(drop=True)
    run.models = [match_scale_groups(read_model(resolve_file(m, optimiser)), run.group_names)
                  for m in files["model"].split()]
    if len(run.models) != 2:
        raise UserError(optimiser, "does not name two half-set models; continue a refine3d run")
    return [str(resolve_file(m.references[0], optimiser)) for m in run.models]


def _write_final(run: _Run, maps: list[np.ndarray], fsc: np.ndarray) -> None:
    from cryodask.em.model import write_model
    from cryodask.em.state import output_name
    from cryodask.io.star import write_particles

    root = run.state.output_root
    _write_map(output_name(root, None, "class001.mrc"), maps[0], run.apix)
    for h in range(2):
        _write_map(output_name(root, None, f"half{h + 1}_class001_unfil.mrc"), maps[1 + h], run.apix)
    write_particles(output_name(root, None, "data.star"), _data_table(run))
    m = run.models[0].copy()
    m.references = [str(output_name(root, None, "class001.mrc"))]
    m.fsc[0] = fsc
    write_model(output_name(root, None, "model.star"), m)
