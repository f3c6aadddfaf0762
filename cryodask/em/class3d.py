"""3D classification (RELION's ``relion_refine --K``), on the refine3d machinery without half-sets.

Every particle is scored against all K references at once (class priors = the class
fractions), at a fixed HEALPix order with global searches; each class's weighted slices
are accumulated on the workers and tree-reduced, and the classes are reconstructed in
parallel, regularised by τ² = the power spectrum of the class's current reference
(RELION's classification τ²) times ``--tau2_fudge``. A single reference starts all
classes; in the first iteration each particle goes to one random class, which breaks
their symmetry (RELION's rule for one initial reference). That iteration scores the coarse grid
only (no adaptive oversampling): its posteriors are flat, so the fine pass would cost the most
(about ten times the rest of the iteration) for a reconstruction of random halves. Files per iteration:
``<o>_itNNN_{data,model,optimiser,sampling}.star`` and ``<o>_itNNN_classNNN.mrc``.

* ``--solvent_mask mask.mrc`` multiplies the references by the mask after every M-step
  (and the initial references), instead of ``--flatten_solvent``'s soft sphere.
* ``--skip_align`` classifies without alignment: each particle keeps the pose of its input
  (a consensus refinement's ``_data.star``) and only the class is a hidden variable
  (:mod:`cryodask.em.skip_align`). With a ``--solvent_mask`` the classification is focused:
  the projection of the consensus map (``--ref``) outside the mask is subtracted from each
  image on the fly and the rest is compared with the masked classes.
* ``auto_focus_iter = n`` (``--auto_focus_iter``, cryodask's): the last ``n`` iterations classify
  without alignment at the poses the global searches found, focused on a soft mask around where
  the class maps differ (:func:`difference_mask`), with the fraction-weighted average of the
  classes outside the mask subtracted from the images. Unfocused, every particle is compared
  over its whole projection, and the noise of the class maps where they agree moves particles
  between classes from one iteration to the next; focused, the assignments settle.
* ``--continue <o>_itNNN_optimiser.star`` resumes from an iteration's files. Each
  iteration goes on from what it wrote and draws its random numbers from (seed, iteration),
  so a continued run ends with the maps of an uninterrupted one.

Not yet: local searches, learnt direction priors.
"""

from __future__ import annotations

import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import pandas as pd

from cryodask.errors import UserError, where
from cryodask.runs import RunViews

__all__ = ["class3d", "Class3DResult"]


@dataclass
class Class3DResult(RunViews):
    """What :func:`class3d` returns (besides the files it writes); ``.plot_classes()``,
    ``.plot_angles()``, ``.plot_convergence()`` and ``.write_report()`` read those files."""

    maps: list[np.ndarray]
    class_fractions: np.ndarray
    data: pd.DataFrame
    pixel_size: float
    iterations: int
    output_root: str
    history: list[dict[str, Any]] = field(default_factory=list)

    @property
    def particles(self) -> pd.DataFrame:
        """The particles with their classes and poses (``data``)."""
        return self.data


def _power_spectrum(path: str, pad: float) -> np.ndarray:
    from cryodask.em.iteration import load_projector
    from cryodask.io.mrc import stack_info

    box = stack_info(path).shape[-1]
    return np.asarray(load_projector(path, pad=pad, r_max=box // 2).power_spectrum, np.float64)


def _reconstruct_class(acc, k: int, tau2, tau2_fudge: float, skip_gridding: bool, sym: str):
    from cryodask.em.mstep import data_vs_prior, reconstruct

    bp = acc.bp[k]
    vol = np.asarray(reconstruct(bp, tau2=tau2, tau2_fudge=tau2_fudge, skip_gridding=skip_gridding, sym=sym),
                     np.float32)
    dvp = data_vs_prior(bp, tau2, tau2_fudge=tau2_fudge, sym=sym)
    return vol, np.asarray(dvp.data_vs_prior, np.float64)


def _small(acc):
    from dataclasses import replace

    return replace(acc, bp=[])


def read_solvent_mask(path: str | Path, box: int) -> np.ndarray:
    """A ``--solvent_mask``: a ``box``³ map with values in [0, 1] (RELION's rule), float32."""
    from cryodask.io.mrc import read_map

    p = Path(path)
    if not p.is_file():
        raise UserError(p, "does not exist; give the mask as an MRC map (--solvent_mask mask.mrc)")
    mask, _ = read_map(p)
    if mask.shape != (box,) * 3:
        raise UserError(p, f"is {'x'.join(map(str, mask.shape))} but the particles are {box} px; give a "
                           f"{box}³ mask (relion_mask_create on a map of the particles' box)")
    lo, hi = float(np.nanmin(mask)), float(np.nanmax(mask))
    if not np.all(np.isfinite(mask)) or lo < -1e-3 or hi > 1 + 1e-3:
        raise UserError(p, f"has values from {lo:.3g} to {hi:.3g}; a solvent mask must lie between 0 and 1 "
                           "(make it with relion_mask_create)")
    if hi <= 0:
        raise UserError(p, "is zero everywhere; give a mask around the region to classify")
    return np.clip(mask, 0.0, 1.0).astype(np.float32)


def difference_mask(maps: list[np.ndarray], *, threshold: float = 0.3, dilate: int = 2,
                    soft_width: float = 1.5) -> np.ndarray:
    """A soft mask (values in [0, 1]) around where class maps differ.

    The spread of the maps (standard deviation over the classes), smoothed by a Gaussian
    of 1 px, is thresholded at ``threshold`` × its maximum, dilated by ``dilate`` px and
    given a soft edge (Gaussian of ``soft_width`` px); 1 inside the dilated region.
    """
    from scipy import ndimage

    spread = ndimage.gaussian_filter(np.std(np.stack([np.asarray(m, np.float64) for m in maps]), axis=0), 1.0)
    if spread.max() <= 0:
        return np.ones_like(np.asarray(maps[0], np.float32))
    core = spread > threshold * spread.max()
    if dilate > 0:
        core = ndimage.binary_dilation(core, iterations=int(dilate))
    soft = np.clip(2.0 * ndimage.gaussian_filter(core.astype(np.float64), soft_width), 0.0, 1.0)
    return np.maximum(soft, core).astype(np.float32)


def class3d(i: str | Path, o: str | Path, ref: str | Path | None = None, *,
            use_gpu: bool = False, gpu: str | None = None, gpu_list: str | None = None, j: int | None = None,
            workers: int | None = None, cluster: str | None = None, scheduler_file: str | None = None,
            scratch_dir: str | None = None, keep_free_scratch: float = 10.0, keep_scratch: bool = False,
            reuse_scratch: bool = False, preread_images: bool = False, no_parallel_disc_io: bool = False,
            profile: str | None = None,
            client: Any = None, K: int = 2, ini_high: float = -1.0,
            particle_diameter: float = -1.0, healpix_order: int = 2, offset_range: float = 6.0,
            offset_step: float = 2.0, oversampling: int = 1, sym: str = "C1", ctf: bool = False,
            pad: float | None = None, tau2_fudge: float | None = None, zero_mask: bool = False,
            flatten_solvent: bool = False, solvent_mask: str | Path | None = None, skip_align: bool = False,
            auto_focus_iter: int = 0, firstiter_cc: bool = False, norm: bool = False, scale: bool = False,
            iter: int | None = None, random_seed: int = 0, pool: int | None = None, skip_gridding: bool = True,
            incr_size: int = 10, perturb: float = 0.5, adaptive_fraction: float = 0.999,
            continue_from: str | Path | None = None, command_line: str = "", log: Any = print,
            quiet: bool = False) -> Class3DResult:
    """3D classification into ``K`` classes; RELION's option names as keyword arguments.

    Parameters
    ----------
    i
        Particles: a STAR file or a particle store. With ``skip_align`` their poses
        (``rlnAngleRot/Tilt/Psi``, ``rlnOriginX/YAngst``) are used as they are.
    o
        Output rootname (``Class3D/run`` writes ``Class3D/run_it001_data.star``…).
    ref
        Initial reference (with ``skip_align`` and ``solvent_mask``: the consensus map whose
        part outside the mask is subtracted from the images).
    K, ini_high, particle_diameter, healpix_order, offset_range, offset_step, oversampling, sym, ctf
        As RELION's options (offsets in pixels).
    pad, tau2_fudge, iter
        Default 2, 4 and 25; on ``continue_from`` the run's own values unless given.
    solvent_mask
        A mask (values in [0, 1]) applied to the references after every iteration; with
        ``skip_align`` the focus mask of the classification.
    skip_align
        Classify without alignment, at each particle's input pose.
    auto_focus_iter
        The last this many iterations classify without alignment at the poses found, focused on
        where the classes differ (see the module doc); 0 (the default) keeps RELION's behaviour.
    firstiter_cc
        Score the first iteration by cross-correlation (RELION's ``--firstiter_cc``): a reference
        whose grey scale differs from the images' does not bias the first assignments.
    norm, scale
        RELION's ``--norm`` (a normalisation correction per particle) and ``--scale`` (an intensity
        scale per group: rlnGroupName, else micrograph), with or without ``skip_align``.
    continue_from
        An ``<o>_itNNN_optimiser.star`` to resume from (RELION's ``--continue``); the options that
        shape the run come from its files, ``iter``, ``tau2_fudge``, ``pad``, ``solvent_mask`` and the
        execution options may change.
    use_gpu … no_parallel_disc_io, profile
        Where the job runs, as on the command line (:mod:`cryodask.cluster.client`); ``client``
        runs it on an existing client.
    command_line
        Stored as the first line of each ``_optimiser.star``.
    log, quiet
        Where the progress lines go (None: nowhere); ``quiet``: no progress bars (batch logs).

    Returns
    -------
    Class3DResult
    """
    if continue_from is None and ref is None:
        raise UserError("--ref", "class3d needs an initial reference map (--ref), or --continue")
    if K < 1:
        raise UserError("--K", f"{K} classes: give at least 1")
    if auto_focus_iter < 0:
        raise UserError("--auto_focus_iter", f"{auto_focus_iter}: give 0 or a positive number of iterations")
    opts = dict(i=str(i), o=str(o), ref=None if ref is None else str(ref), K=int(K), ini_high=ini_high,
                particle_diameter=particle_diameter, healpix_order=healpix_order, offset_range=offset_range,
                offset_step=offset_step, oversampling=oversampling, sym=sym, ctf=ctf, pad=pad, tau2_fudge=tau2_fudge,
                zero_mask=zero_mask, flatten_solvent=flatten_solvent,
                solvent_mask=None if solvent_mask is None else str(solvent_mask), skip_align=bool(skip_align),
                auto_focus_iter=int(auto_focus_iter), norm=bool(norm), scale=bool(scale),
                iter=iter, random_seed=random_seed, pool=pool, skip_gridding=skip_gridding, incr_size=incr_size,
                perturb=perturb, adaptive_fraction=adaptive_fraction, command_line=command_line,
                continue_from=None if continue_from is None else str(continue_from),
                auto_local_healpix_order=99, low_resol_join_halves=-1.0,
                firstiter_cc=bool(firstiter_cc) and not skip_align, auto_iter_max=iter,
                quiet=bool(quiet), job="class3d")
    _check(opts)  # bad input fails before a cluster starts
    Path(opts["o"]).parent.mkdir(parents=True, exist_ok=True)
    from cryodask.cluster.job import job_session

    with job_session(client, name=opts["o"], use_gpu=use_gpu, gpu=gpu, gpu_list=gpu_list, j=j, workers=workers,
                     cluster=cluster, scheduler_file=scheduler_file, scratch_dir=scratch_dir,
                     keep_free_scratch=keep_free_scratch, keep_scratch=keep_scratch, reuse_scratch=reuse_scratch,
                     preread_images=preread_images, no_parallel_disc_io=no_parallel_disc_io,
                     profile=profile) as session:
        return _classify(session, opts, log)


def _check(opts: dict[str, Any]) -> None:
    """Inputs that can be checked without a cluster: particles, reference, mask, poses, continue file."""
    from cryodask.em.refine3d import _check_inputs, _open

    if opts["continue_from"]:
        from cryodask.em.state import read_optimiser

        st, _ = read_optimiser(opts["continue_from"])
        if not opts["pool"]:
            opts["pool"] = st.max_pooled  # the same chunks as before
    _check_inputs(opts)
    if opts["solvent_mask"] or (opts["skip_align"] and not opts["continue_from"]):
        particles = _open(opts)
        if opts["solvent_mask"]:
            read_solvent_mask(opts["solvent_mask"], int(particles.box))
        if opts["skip_align"] and not opts["continue_from"]:
            _check_poses(particles.table.particles, opts["i"])


def _check_poses(parts: pd.DataFrame, source: str) -> None:
    for c in ("rlnAngleRot", "rlnAngleTilt", "rlnAnglePsi"):
        if c not in parts.columns:
            raise UserError(where(source, field=c), "--skip_align keeps each particle's pose, but the column is "
                                                    "missing; give a refinement's _data.star")
        v = pd.to_numeric(parts[c], errors="coerce").to_numpy(np.float64)
        bad = np.flatnonzero(~np.isfinite(v))
        if len(bad):
            raise UserError(where(source, row=int(bad[0]) + 1, field=c),
                            f"{parts[c].iloc[bad[0]]!r} is not an angle; fix or remove that particle")


def _classify(session, opts, log) -> Class3DResult:
    from cryodask.em.model import Model
    from cryodask.em.refine3d import _Run, _initial_sigma2, _preflight, _write_map
    from cryodask.em.state import output_name
    from cryodask.geometry.healpix import angular_step
    from cryodask.io.mrc import read_map
    from cryodask.ops.filters import low_pass_filter

    particles = _preflight(session, opts, K=opts["K"], log=log)
    run = _Run(session, particles, opts)
    root = opts["o"]
    if opts["continue_from"]:
        refs, model = _load_iteration(run, opts["continue_from"])
        st = run.state
        if opts["iter"] is not None:
            st.n_iterations = int(opts["iter"])
        if opts["pad"]:
            model.pad = float(opts["pad"])
        if opts["tau2_fudge"]:
            model.tau2_fudge = float(opts["tau2_fudge"])
        if opts["solvent_mask"]:
            st.solvent_mask = str(Path(opts["solvent_mask"]).resolve())
        opts["command_line"] = opts["command_line"] or st.output_root
        st.output_root = root
        return _iterate(run, refs, model, log)
    K, box, apix = opts["K"], run.box, run.apix
    vol, _ = read_map(opts["ref"])
    st = run.state
    st.output_root, st.random_seed = root, int(opts["random_seed"])
    st.n_iterations = int(opts["iter"]) if opts["iter"] is not None else 25
    st.do_split_random_halves = st.do_auto_refine = False
    st.healpix_order = st.healpix_order_original = int(opts["healpix_order"])
    st.psi_step = st.psi_step_original = angular_step(st.healpix_order)
    st.offset_range = st.offset_range_original = float(opts["offset_range"])
    st.offset_step = st.offset_step_original = float(opts["offset_step"])
    st.adaptive_oversampling, st.adaptive_fraction = int(opts["oversampling"]), float(opts["adaptive_fraction"])
    st.sym, st.particle_diameter = opts["sym"], float(opts["particle_diameter"])
    st.do_zero_mask, st.do_solvent = bool(opts["zero_mask"]), bool(opts["flatten_solvent"])
    st.do_ctf_correction, st.incr_size = bool(opts["ctf"]), int(opts["incr_size"])
    st.perturbation_factor, st.ini_high = float(opts["perturb"]), float(opts["ini_high"])
    st.max_pooled = int(particles.chunk_slices()[0].stop - particles.chunk_slices()[0].start)
    st.do_skip_align = bool(opts["skip_align"])
    st.do_norm_correction, st.do_scale_correction = bool(opts["norm"]), bool(opts["scale"])
    st.firstiter_cc = bool(opts["firstiter_cc"])
    st.auto_focus_iter = 0 if st.do_skip_align else int(opts["auto_focus_iter"])
    mask = None
    if opts["solvent_mask"]:
        st.solvent_mask = str(Path(opts["solvent_mask"]).resolve())
        mask = read_solvent_mask(st.solvent_mask, box)
    run.parts = run.parts.drop(columns=[c for c in ("rlnRandomSubset",) if c in run.parts.columns])
    model = Model(ori_size=box, pixel_size=apix, n_classes=K, n_optics_groups=run.n_opt,
                  pad=float(opts["pad"] or 2), tau2_fudge=float(opts["tau2_fudge"] or 4.0),
                  optics_group_names=[str(s) for s in run.optics["rlnOpticsGroupName"]],
                  group_names=list(run.group_names))
    model.sigma2_noise[:] = _initial_sigma2(run)
    model.current_resolution = st.ini_high if st.ini_high > 0 else 4 * apix
    if st.do_skip_align and mask is not None:
        # focused classification: the consensus outside the mask is subtracted from every image
        st.subtract_map = str(Path(str(output_name(root, None, "subtracted_outside_mask.mrc"))).resolve())
        _write_map(st.subtract_map, vol * (1.0 - mask), apix)
    if opts["ini_high"] > 0:
        vol = low_pass_filter(vol, opts["ini_high"], apix)
    if mask is not None:
        vol = vol * mask
    refs = []
    for k in range(K):
        refs.append(str(output_name(root, 0, f"class{k + 1:03d}.mrc")))
        _write_map(refs[k], vol, apix)
    return _iterate(run, refs, model, log)


def _iterate(run, refs: list[str], model, log) -> Class3DResult:
    from cryodask.em.monitor import JobMonitor

    with JobMonitor("class3d", run.client, output_root=run.state.output_root,
                    total_iterations=run.state.n_iterations, log=log, quiet=run.o.get("quiet", False)) as monitor:
        return _iterations(run, refs, model, monitor)


def _iterations(run, refs: list[str], model, monitor) -> Class3DResult:
    from cryodask.em.iteration import (IterationSetup, direction_prior, expectation_chunk, particle_results,
                                       sampling_points)
    from cryodask.em.iteration import sum_accumulators
    from cryodask.em.mstep import scale_correction
    from cryodask.em.refine3d import (_all_shells, _column, _last_shell_ssnr, _solvent_flatten, _tree,
                                      coarse_image_size, image_size_for, update_norm_column)
    from cryodask.em.skip_align import SkipAlignSetup, skip_align_chunk
    from cryodask.em.state import iteration_rng
    from cryodask.geometry.healpix import angular_step, next_random_perturbation

    session, client, st = run.session, run.client, run.state
    K, box, apix = model.n_classes, run.box, run.apix
    nsh = box // 2 + 1
    mask = read_solvent_mask(st.solvent_mask, box) if st.solvent_mask not in ("", "None") else None
    maps: list[np.ndarray] = []
    history = []
    while st.iteration < st.n_iterations:
        t0 = time.time()
        it = st.iteration + 1
        T = float(model.tau2_fudge)
        if it == 1 and st.ini_high > 0:
            ires0 = max(1, round(box * apix / st.ini_high))
        else:
            ires0 = max(1, round(box * apix / model.current_resolution))
        current_size = image_size_for(ires0, box, st.incr_size)
        current_size -= current_size % 2
        coarse_size = coarse_image_size(angular_step(st.healpix_order),
                                        st.particle_diameter if st.particle_diameter > 0 else 0.8 * box * apix,
                                        apix, box, current_size)
        paths = [str(Path(r).resolve()) for r in refs]
        random_classes = it == 1 and K > 1
        mode = "cc" if (it == 1 and st.firstiter_cc) else "ml"
        if st.do_skip_align:
            setup = SkipAlignSetup(
                iteration=it, box=box, pixel_size=apix, pad=model.pad, current_size=current_size,
                reference_paths=paths, sigma2_noise=np.asarray(model.sigma2_noise),
                class_fractions=list(model.class_fractions), particle_diameter=st.particle_diameter,
                width_mask_edge=st.width_mask_edge, zero_mask=st.do_zero_mask, do_ctf=st.do_ctf_correction,
                random_seed=st.random_seed, random_classes=random_classes,
                subtract_path=None if st.subtract_map in ("", "None") else st.subtract_map,
                do_norm=st.do_norm_correction, avg_norm=float(model.avg_norm),
                scale=model.scale if st.do_scale_correction else None)
            task, name = skip_align_chunk, "class3d-skipalign"
        else:
            setup = IterationSetup(
                iteration=it, box=box, pixel_size=apix, pad=model.pad, current_size=current_size,
                coarse_size=coarse_size, reference_paths=paths, sigma2_noise=model.sigma2_noise[None],
                sigma_offset=[model.sigma_offset], healpix_order=st.healpix_order, sym=st.sym,
                random_perturbation=st.random_perturbation, offset_range=st.offset_range,
                offset_step=st.offset_step, oversampling=0 if random_classes else st.adaptive_oversampling,
                adaptive_fraction=st.adaptive_fraction, particle_diameter=st.particle_diameter,
                width_mask_edge=st.width_mask_edge, zero_mask=st.do_zero_mask, do_ctf=st.do_ctf_correction,
                random_seed=st.random_seed, split_halves=False, class_fractions=list(model.class_fractions),
                random_classes=random_classes, do_norm=st.do_norm_correction, mode=mode,
                avg_norm=float(model.avg_norm), scale=model.scale[None] if st.do_scale_correction else None,
                direction_prior=direction_prior(model.pdf_direction if len(model.pdf_direction) == K else [],
                                                st.healpix_order, st.sym))
            task, name = expectation_chunk, "class3d"
        tau2_f = [client.submit(_power_spectrum, paths[k], model.pad, pure=False) for k in range(K)]
        futs = session.chunk_futures(run.particles)
        results = [session.submit_scoring(task, f, run.chunk_meta(sl), setup, pure=False,
                                          key=f"{name}-it{it:03d}-{n}-{f.key}")
                   for n, (f, sl) in enumerate(zip(futs, run.particles.chunk_slices(), strict=True))]
        per_particle = [client.submit(particle_results, r, pure=False) for r in results]
        total = _tree(client, results, sum_accumulators, key=f"{name}-sum-it{it:03d}-{results[0].key}")
        monitor.track(results, f"it{it:03d}")  # everything is submitted: the reduction runs as chunks finish
        tau2 = client.gather(tau2_f)
        rec = client.gather([client.submit(_reconstruct_class, total, k, tau2[k], T, run.o["skip_gridding"],
                                           st.sym, pure=False) for k in range(K)])
        acc = client.submit(_small, total, pure=False).result()
        pp = client.gather(per_particle)
        del results, per_particle, total
        maps = [r[0] for r in rec]
        focus_now = (not st.do_skip_align and K > 1 and st.auto_focus_iter > 0
                     and it == max(1, st.n_iterations - st.auto_focus_iter))
        if focus_now:  # from here on: no alignment, focused on where the classes differ
            mask, maps = _start_focus(st, maps, acc.class_weight, apix)
        elif mask is not None:
            maps = [(m * mask).astype(np.float32) for m in maps]
        elif st.do_solvent:
            maps = [_solvent_flatten(m, st.particle_diameter, apix, st.width_mask_edge) for m in maps]
        # particles
        idx = np.concatenate([r.index for r in pp])
        p = run.parts
        old_class = _column(p, "rlnClassNumber", 0.0).astype(np.int64)
        for c, v in (("rlnAngleRot", [r.rot for r in pp]), ("rlnAngleTilt", [r.tilt for r in pp]),
                     ("rlnAnglePsi", [r.psi for r in pp]), ("rlnMaxValueProbDistribution", [r.pmax for r in pp]),
                     ("rlnLogLikeliContribution", [r.log_likelihood for r in pp])):
            arr = np.zeros(run.n)
            arr[idx] = np.concatenate(v)
            p[c] = arr
        orig = np.zeros((run.n, 2))
        orig[idx] = np.concatenate([r.origins_px for r in pp]) * apix
        p["rlnOriginXAngst"], p["rlnOriginYAngst"] = orig[:, 0], orig[:, 1]
        cls = np.zeros(run.n, np.int64)
        cls[idx] = np.concatenate([r.class_number for r in pp])
        p["rlnClassNumber"] = cls
        nsig = np.zeros(run.n, np.int64)
        nsig[idx] = np.concatenate([r.n_significant for r in pp])
        p["rlnNrOfSignificantSamples"] = nsig
        ml = mode == "ml"
        avg_norm = update_norm_column(p, pp, idx, st.do_norm_correction and ml)
        if avg_norm is not None:
            model.avg_norm = avg_norm
        changes_classes = float(np.mean(old_class != cls)) if it > 1 else 1.0
        # model
        total_w = float(acc.class_weight.sum())
        model.class_fractions = acc.class_weight / total_w if total_w > 0 else np.full(K, 1.0 / K)
        npix_all = np.bincount(_all_shells(box), minlength=nsh)[:nsh].astype(np.float64)
        for g in range(run.n_opt if mode == "ml" else 0):  # RELION keeps σ² through a --firstiter_cc iteration
            nn = acc.n_particles[0, g]
            if nn <= 0:
                continue
            inside = (np.arange(nsh) < current_size // 2) & (acc.pixel_count[0, g] > 0)
            model.sigma2_noise[g] = np.where(
                inside, acc.sigma2_sum[0, g] / np.maximum(2.0 * acc.pixel_count[0, g], 1e-30),
                acc.power_sum[0, g] / (2.0 * nn * np.maximum(npix_all, 1)))
        if acc.weight_sum[0] > 0 and ml and not st.do_skip_align:
            model.sigma_offset = float(np.sqrt(max(2.0, acc.sigma2_offset[0] / (2.0 * acc.weight_sum[0]))))
        if acc.direction_weight is not None and not st.do_skip_align and total_w > 0:
            # RELION's pdf_direction: Σw per direction over all the weight, so a class's sums to its fraction
            model.pdf_direction = [np.asarray(acc.direction_weight[k], np.float64) / total_w for k in range(K)]
        for k in range(K):
            model.tau2[k] = tau2[k]
            model.data_vs_prior[k] = rec[k][1]
        ires = max(_last_shell_ssnr(model.data_vs_prior[k]) for k in range(K))
        ires = max(1, min(ires, current_size // 2))
        model.current_resolution = box * apix / ires
        model.current_size = current_size
        model.estimated_resolution[:] = [box * apix / max(1, _last_shell_ssnr(model.data_vs_prior[k]))
                                         for k in range(K)]
        model.ave_pmax = float(p["rlnMaxValueProbDistribution"].mean())
        model.log_likelihood = float(p["rlnLogLikeliContribution"].sum())
        model.group_nr_particles = np.bincount(run.group_index, minlength=len(run.group_names))
        if st.do_scale_correction and ml and acc.signal_product is not None:
            ssnr = (model.class_fractions[:, None] * model.data_vs_prior).sum(axis=0)  # by the classes' share
            model.scale = scale_correction(model.scale, acc.signal_product[0], acc.reference_power[0], ssnr,
                                           model.group_nr_particles)
        st.iteration = it
        st.current_changes_optimal_classes = changes_classes
        if focus_now:
            st.do_skip_align = True
        if not st.do_skip_align:
            st.random_perturbation = next_random_perturbation(st.random_perturbation, st.perturbation_factor,
                                                              iteration_rng(st.random_seed, it, 7))
        opt_file = _write_iteration(run, model, maps)
        entry = dict(iteration=it, current_size=current_size, resolution=model.current_resolution,
                     class_fractions=model.class_fractions.tolist(), changes_classes=changes_classes,
                     seconds=time.time() - t0)
        history.append(entry)
        n_points = K if isinstance(setup, SkipAlignSetup) else sampling_points(setup, K)
        monitor.iteration_done(it, sampling_points=n_points, size=f"{coarse_size}/{current_size}",
                               resolution=model.current_resolution,
                               classes=" ".join(f"{f:.3f}" for f in model.class_fractions),
                               changed_class=f"{100 * changes_classes:.1f}%")
        # go on from what was written, so that --continue from any iteration gives the same result
        refs, model = _load_iteration(run, opt_file)
        st = run.state
    return Class3DResult(maps=maps, class_fractions=model.class_fractions, data=run.parts.copy(), pixel_size=apix,
                         iterations=st.iteration, output_root=st.output_root, history=history)


def _start_focus(st, maps: list[np.ndarray], class_weight: np.ndarray, apix: float):
    """Switch to focused classification without alignment: the mask around where ``maps`` differ, the
    consensus (class-weighted average) outside it to subtract, and the masked maps as the next references."""
    from cryodask.em.refine3d import _solvent_flatten, _write_map
    from cryodask.em.state import output_name

    if st.do_solvent:  # the difference that counts is inside the particle
        maps = [_solvent_flatten(m, st.particle_diameter, apix, st.width_mask_edge) for m in maps]
    w = np.asarray(class_weight, np.float64)
    w = w / w.sum() if w.sum() > 0 else np.full(len(maps), 1.0 / len(maps))
    consensus = sum(wk * m for wk, m in zip(w, maps, strict=True))
    mask = difference_mask(maps)
    if st.solvent_mask not in ("", "None"):
        mask = mask * read_solvent_mask(st.solvent_mask, mask.shape[0])
    st.solvent_mask = str(Path(str(output_name(st.output_root, st.iteration + 1, "autofocus_mask.mrc"))).resolve())
    _write_map(st.solvent_mask, mask, apix)
    st.subtract_map = str(Path(str(output_name(st.output_root, st.iteration + 1,
                                               "subtracted_outside_mask.mrc"))).resolve())
    _write_map(st.subtract_map, consensus * (1.0 - mask), apix)
    return mask, [(m * mask).astype(np.float32) for m in maps]


def _write_iteration(run, model, maps: list[np.ndarray]) -> Path:
    from cryodask.em.model import write_model
    from cryodask.em.refine3d import _write_map
    from cryodask.em.state import output_name, write_optimiser, write_sampling
    from cryodask.io.star import ParticleTable, write_particles

    st = run.state
    root, it = st.output_root, st.iteration
    refs = [str(output_name(root, it, f"class{k + 1:03d}.mrc")) for k in range(model.n_classes)]
    for k, m in enumerate(maps):
        _write_map(refs[k], m, run.apix)
    model.references = refs
    data = output_name(root, it, "data.star")
    write_particles(data, ParticleTable(optics=run.optics, particles=run.parts))
    mfile = output_name(root, it, "model.star")
    write_model(mfile, model)
    sfile = output_name(root, it, "sampling.star")
    write_sampling(sfile, st, run.apix)
    opt = output_name(root, it, "optimiser.star")
    write_optimiser(opt, st, command_line=run.o["command_line"], model_files=str(mfile), data_file=str(data),
                    sampling_file=str(sfile))
    return opt


def _load_iteration(run, optimiser: str | Path):
    """Restore the state, the model and the particles from an iteration's files; returns (references, model)."""
    from cryodask.em.model import read_model
    from cryodask.em.state import read_optimiser, resolve_file
    from cryodask.io.star import read_particles

    st, files = read_optimiser(optimiser)
    data = resolve_file(files["data"], optimiser)
    t = read_particles(data)
    if len(t.particles) != run.n:
        raise UserError(data, f"has {len(t.particles)} particles but --i has {run.n}; continue with the same "
                              "particles")
    names = files["model"].split()
    if len(names) != 1 or st.do_split_random_halves:
        raise UserError(optimiser, "is not from a 3D classification (it names half-set models); continue a "
                                   "class3d run")
    from cryodask.em.model import match_scale_groups

    model = match_scale_groups(read_model(resolve_file(names[0], optimiser)), run.group_names)
    if model.ori_size != run.box:
        raise UserError(optimiser, f"is from {model.ori_size} px particles but --i has {run.box} px; continue with "
                                   "the same particles")
    run.state = st
    run.parts = t.particles.reset_index(drop=True)
    refs = [str(resolve_file(r, optimiser)) for r in model.references]
    return refs, model
