"""3D classification (RELION's ``relion_refine --K``), on the refine3d machinery without half-sets.

Every particle is scored against all K references at once (class priors = the class
fractions), at a fixed HEALPix order with global searches; each class's weighted slices
are accumulated on the workers and tree-reduced, and the classes are reconstructed in
parallel, regularised by τ² = the power spectrum of the class's current reference
(RELION's classification τ²) times ``--tau2_fudge``. A single reference starts all
classes; in the first iteration each particle goes to one random class, which breaks
their symmetry (RELION's rule for one initial reference). Files per iteration:
``<o>_itNNN_{data,model,optimiser,sampling}.star`` and ``<o>_itNNN_classNNN.mrc``.

Not yet: ``--skip_align`` with a focus mask, local searches, learnt direction priors.
"""

from __future__ import annotations

import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import pandas as pd

from cryodask.errors import UserError

__all__ = ["class3d", "Class3DResult"]


@dataclass
class Class3DResult:
    maps: list[np.ndarray]
    class_fractions: np.ndarray
    data: pd.DataFrame
    pixel_size: float
    iterations: int
    output_root: str
    history: list[dict[str, Any]] = field(default_factory=list)


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


def class3d(i: str | Path, o: str | Path, ref: str | Path, *,
            use_gpu: bool = False, gpu: str | None = None, gpu_list: str | None = None, j: int | None = None,
            workers: int | None = None, cluster: str | None = None, scheduler_file: str | None = None,
            scratch_dir: str | None = None, keep_free_scratch: float = 10.0, keep_scratch: bool = False,
            reuse_scratch: bool = False, preread_images: bool = False, no_parallel_disc_io: bool = False,
            client: Any = None, K: int = 2, ini_high: float = -1.0,
            particle_diameter: float = -1.0, healpix_order: int = 2, offset_range: float = 6.0,
            offset_step: float = 2.0, oversampling: int = 1, sym: str = "C1", ctf: bool = False, pad: float = 2,
            tau2_fudge: float = 4.0, zero_mask: bool = False, flatten_solvent: bool = False, iter: int = 25,
            random_seed: int = 0, pool: int | None = None, skip_gridding: bool = True,
            incr_size: int = 10, perturb: float = 0.5, adaptive_fraction: float = 0.999,
            command_line: str = "", log: Any = print) -> Class3DResult:
    """3D classification into ``K`` classes; RELION's option names as keyword arguments (see the module doc).

    The execution options (``use_gpu`` … ``no_parallel_disc_io``) say where the job runs, as
    on the command line (:mod:`cryodask.cluster.client`); ``client`` runs it on an existing client.
    """
    if K < 1:
        raise UserError("--K", f"{K} classes: give at least 1")
    opts = dict(i=str(i), o=str(o), ref=str(ref), K=int(K), ini_high=ini_high, particle_diameter=particle_diameter,
                healpix_order=healpix_order, offset_range=offset_range, offset_step=offset_step,
                oversampling=oversampling, sym=sym, ctf=ctf, pad=pad, tau2_fudge=tau2_fudge, zero_mask=zero_mask,
                flatten_solvent=flatten_solvent, iter=iter, random_seed=random_seed, pool=pool,
                skip_gridding=skip_gridding, incr_size=incr_size, perturb=perturb,
                adaptive_fraction=adaptive_fraction, command_line=command_line, continue_from=None,
                auto_local_healpix_order=99, low_resol_join_halves=-1.0, firstiter_cc=False, auto_iter_max=iter)
    from cryodask.em.refine3d import _check_inputs

    _check_inputs(opts)  # bad input fails before a cluster starts
    Path(opts["o"]).parent.mkdir(parents=True, exist_ok=True)
    from cryodask.cluster.job import job_session

    with job_session(client, name=opts["o"], use_gpu=use_gpu, gpu=gpu, gpu_list=gpu_list, j=j, workers=workers,
                     cluster=cluster, scheduler_file=scheduler_file, scratch_dir=scratch_dir,
                     keep_free_scratch=keep_free_scratch, keep_scratch=keep_scratch, reuse_scratch=reuse_scratch,
                     preread_images=preread_images, no_parallel_disc_io=no_parallel_disc_io) as session:
        return _classify(session, opts, log or (lambda *a, **k: None))


def _classify(session, opts, log) -> Class3DResult:
    from cryodask.em.iteration import IterationSetup, expectation_chunk, particle_results, sum_accumulators
    from cryodask.em.model import Model, write_model
    from cryodask.em.refine3d import (_Run, _all_shells, _column, _initial_sigma2, _last_shell_ssnr, _open,
                                      _solvent_flatten, _tree, _write_map, coarse_image_size, image_size_for)
    from cryodask.em.state import output_name, write_optimiser, write_sampling
    from cryodask.geometry.healpix import angular_step, next_random_perturbation
    from cryodask.em.state import iteration_rng
    from cryodask.io.mrc import read_map
    from cryodask.io.star import ParticleTable, write_particles
    from cryodask.ops.filters import low_pass_filter

    particles = _open(opts)
    run = _Run(session, particles, opts)
    client = session.client
    K, box, apix = opts["K"], run.box, run.apix
    nsh = box // 2 + 1
    vol, _ = read_map(opts["ref"])
    if vol.shape != (box,) * 3:
        raise UserError(opts["ref"], f"is {vol.shape[-1]} px but the particles are {box} px; resample the reference")
    if opts["ini_high"] > 0:
        vol = low_pass_filter(vol, opts["ini_high"], apix)
    st = run.state
    root = opts["o"]
    st.output_root, st.random_seed, st.n_iterations = root, int(opts["random_seed"]), int(opts["iter"])
    st.do_split_random_halves = st.do_auto_refine = False
    st.healpix_order = st.healpix_order_original = int(opts["healpix_order"])
    st.psi_step = angular_step(st.healpix_order)
    st.offset_range, st.offset_step = float(opts["offset_range"]), float(opts["offset_step"])
    st.adaptive_oversampling, st.adaptive_fraction = int(opts["oversampling"]), float(opts["adaptive_fraction"])
    st.sym, st.particle_diameter = opts["sym"], float(opts["particle_diameter"])
    st.do_zero_mask, st.do_solvent = bool(opts["zero_mask"]), bool(opts["flatten_solvent"])
    st.do_ctf_correction, st.incr_size = bool(opts["ctf"]), int(opts["incr_size"])
    st.perturbation_factor, st.ini_high = float(opts["perturb"]), float(opts["ini_high"])
    run.parts = run.parts.drop(columns=[c for c in ("rlnRandomSubset",) if c in run.parts.columns])
    model = Model(ori_size=box, pixel_size=apix, n_classes=K, n_optics_groups=run.n_opt, pad=float(opts["pad"]),
                  tau2_fudge=float(opts["tau2_fudge"]),
                  optics_group_names=[str(s) for s in run.optics["rlnOpticsGroupName"]])
    model.sigma2_noise[:] = _initial_sigma2(run)
    model.current_resolution = st.ini_high if st.ini_high > 0 else 4 * apix
    refs = []
    for k in range(K):
        refs.append(str(output_name(root, 0, f"class{k + 1:03d}.mrc")))
        _write_map(refs[k], vol, apix)
    maps: list[np.ndarray] = []
    history = []
    T = float(opts["tau2_fudge"])
    for it in range(1, st.n_iterations + 1):
        t0 = time.time()
        current_size = image_size_for(max(1, round(box * apix / model.current_resolution)), box, st.incr_size)
        current_size -= current_size % 2
        coarse_size = coarse_image_size(angular_step(st.healpix_order),
                                        st.particle_diameter if st.particle_diameter > 0 else 0.8 * box * apix,
                                        apix, box, current_size)
        setup = IterationSetup(
            iteration=it, box=box, pixel_size=apix, pad=model.pad, current_size=current_size, coarse_size=coarse_size,
            reference_paths=[str(Path(r).resolve()) for r in refs], sigma2_noise=model.sigma2_noise[None],
            sigma_offset=[model.sigma_offset], healpix_order=st.healpix_order, sym=st.sym,
            random_perturbation=st.random_perturbation, offset_range=st.offset_range, offset_step=st.offset_step,
            oversampling=st.adaptive_oversampling, adaptive_fraction=st.adaptive_fraction,
            particle_diameter=st.particle_diameter, width_mask_edge=st.width_mask_edge, zero_mask=st.do_zero_mask,
            do_ctf=st.do_ctf_correction, random_seed=st.random_seed, split_halves=False,
            class_fractions=list(model.class_fractions), random_classes=(it == 1 and K > 1), n_acc_particles=0)
        tau2_f = [client.submit(_power_spectrum, setup.reference_paths[k], model.pad, pure=False) for k in range(K)]
        futs = session.chunk_futures(run.particles)
        results = [session.submit_scoring(expectation_chunk, f, run.chunk_meta(sl), setup, pure=False,
                                 key=f"class3d-it{it:03d}-{n}-{f.key}")
                   for n, (f, sl) in enumerate(zip(futs, run.particles.chunk_slices(), strict=True))]
        per_particle = [client.submit(particle_results, r, pure=False) for r in results]
        total = _tree(client, results, sum_accumulators, key=f"class3d-sum-it{it:03d}-{results[0].key}")
        tau2 = client.gather(tau2_f)
        rec = client.gather([client.submit(_reconstruct_class, total, k, tau2[k], T, opts["skip_gridding"], st.sym,
                                           pure=False) for k in range(K)])
        acc = client.submit(_small, total, pure=False).result()
        pp = client.gather(per_particle)
        maps = [r[0] for r in rec]
        if st.do_solvent:
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
        p["rlnNormCorrection"] = 1.0
        changes_classes = float(np.mean(old_class != cls)) if it > 1 else 1.0
        # model
        total_w = float(acc.class_weight.sum())
        model.class_fractions = acc.class_weight / total_w if total_w > 0 else np.full(K, 1.0 / K)
        npix_all = np.bincount(_all_shells(box), minlength=nsh)[:nsh].astype(np.float64)
        for g in range(run.n_opt):
            nn = acc.n_particles[0, g]
            if nn <= 0:
                continue
            inside = (np.arange(nsh) < current_size // 2) & (acc.pixel_count[0, g] > 0)
            model.sigma2_noise[g] = np.where(
                inside, acc.sigma2_sum[0, g] / np.maximum(2.0 * acc.pixel_count[0, g], 1e-30),
                acc.power_sum[0, g] / (2.0 * nn * np.maximum(npix_all, 1)))
        if acc.weight_sum[0] > 0:
            model.sigma_offset = float(np.sqrt(max(2.0, acc.sigma2_offset[0] / (2.0 * acc.weight_sum[0]))))
        for k in range(K):
            model.tau2[k] = tau2[k]
            model.data_vs_prior[k] = rec[k][1]
        ires = max(_last_shell_ssnr(model.data_vs_prior[k]) for k in range(K))
        ires = max(1, min(ires, current_size // 2))
        model.current_resolution = box * apix / ires
        model.current_size = current_size
        model.ave_pmax = float(p["rlnMaxValueProbDistribution"].mean())
        model.log_likelihood = float(p["rlnLogLikeliContribution"].sum())
        model.group_nr_particles = np.bincount(run.optics_index, minlength=run.n_opt)
        st.iteration = it
        st.current_changes_optimal_classes = changes_classes
        st.random_perturbation = next_random_perturbation(st.random_perturbation, st.perturbation_factor,
                                                          iteration_rng(st.random_seed, it, 7))
        # files
        refs = [str(output_name(root, it, f"class{k + 1:03d}.mrc")) for k in range(K)]
        for k in range(K):
            _write_map(refs[k], maps[k], apix)
        model.references = refs
        data = output_name(root, it, "data.star")
        write_particles(data, ParticleTable(optics=run.optics, particles=p))
        mfile = output_name(root, it, "model.star")
        write_model(mfile, model)
        sfile = output_name(root, it, "sampling.star")
        write_sampling(sfile, st)
        write_optimiser(output_name(root, it, "optimiser.star"), st, command_line=opts["command_line"],
                        model_files=str(mfile), data_file=str(data), sampling_file=str(sfile))
        entry = dict(iteration=it, current_size=current_size, resolution=model.current_resolution,
                     class_fractions=model.class_fractions.tolist(), changes_classes=changes_classes,
                     seconds=time.time() - t0)
        history.append(entry)
        log(f"class3d it{it:03d}: size {coarse_size}/{current_size}, resolution {model.current_resolution:.2f} Å, "
            f"classes {np.round(model.class_fractions, 3).tolist()}, {100 * changes_classes:.1f}% changed class, "
            f"{time.time() - t0:.1f} s")
    return Class3DResult(maps=maps, class_fractions=model.class_fractions, data=run.parts.copy(), pixel_size=apix,
                         iterations=st.n_iterations, output_root=root, history=history)
