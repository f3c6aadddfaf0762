"""2D classification (RELION's Class2D: ``relion_refine`` with ``--K`` classes of 2D references).

Each iteration is one Dask graph (DESIGN §3):

* one task per particle chunk (:func:`expectation_chunk`, submitted next to its chunk
  future): recentre each image by its previous offset, soft circular mask of
  ``--particle_diameter`` (zeros outside with ``--zero_mask``, else white noise of the
  background's variance), FFT with RELION's normalisation, CTF; score against every
  class × in-plane rotation × translation with the GEMM kernel
  (:func:`cryodask.em.estep.score_terms`); posterior with the class fractions and the
  Gaussian translation prior centred on each class's prior offset (RELION's 2D rule);
  M-step sums (:func:`cryodask.em.estep.mstep_sums`) inserted into one 2D
  :class:`~cryodask.ops.backproject.BackProjector` per class (``backrotate2D``) on the worker;
* a tree reduction of the chunk sums (:func:`cryodask.em.known_poses.tree_reduce`);
* one reconstruction task per class, in parallel, regularised by τ² = the power spectrum of
  the class's current reference (RELION's classification rule) times ``--tau2_fudge``;
  with ``--flatten_solvent`` the classes are then masked by the soft circle of
  ``--particle_diameter`` (RELION's ``solventFlatten``), before τ² is taken from them;
* on the driver: σ² per optics group, class fractions, per-class prior offsets, σ_offset,
  the resolution (last shell with SSNR ≥ 1 over the classes) and the next image size.

Initialisation follows RELION 3 without ``--ref`` (``calculateSumOfPowerSpectraAndAverageImage``):
each particle goes to a random class at a random in-plane angle, and each class starts as the
CTF-weighted average (data/weight, no prior) of its random subset, band-limited to ``0.07·box``
shells; iteration 1's image size follows from those references' SSNR
(``initialiseDataVersusPrior``).

The search is RELION's adaptive oversampling (``--oversampling`` ≥ 1, the default 1): a coarse
pass at ``coarse_size`` (resolution ``(psi_step/360)·π·D/1.5``, RELION's 2D rule) over psi steps of
``--psi_step`` and the translation grid of ``--offset_step``, the 0.999 significance rule, then the
children of the significant samples (psi step / 2^os, offset step / 2^os) at ``current_size``
(:func:`cryodask.em.estep.score_two_pass`). ``--oversampling 0`` scores the coarse grid only.

Simplifications (to be lifted): the sampling grid is not randomly perturbed; the initial σ² uses
every particle (RELION: the first 1000 per optics group).

References reach the chunk tasks as the ``_classes.mrcs`` file of the previous
iteration (read and turned into a projector once per worker process), never embedded
in the graph.
"""

from __future__ import annotations

import math
import os
import time
from collections import OrderedDict
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import pandas as pd

from cryodask import backend
from cryodask.errors import UserError
from cryodask.runs import RunViews

__all__ = ["class2d", "Class2DResult", "Class2DSetup", "ChunkInput", "Class2DSums", "expectation_chunk",
           "initial_chunk", "fine_sampling", "coarse_image_size_2d"]


# ---------------------------------------------------------------------------------------------
# small pieces


def fine_sampling(psi_step: float, offset_range: float, offset_step: float, oversampling: int
                  ) -> tuple[np.ndarray, np.ndarray]:
    """In-plane angles (degrees) and translations (pixels, ``(T, 2)``) of the fine grid.

    The fine grid of RELION's adaptive oversampling: psi step ``psi_step / 2^os`` on
    ``[0, 360)``, and the translation disc of ``offset_range`` with every coarse point split
    into its ``4^os`` children (:func:`cryodask.geometry.shifts.oversample_translations`).
    """
    from cryodask.geometry.shifts import oversample_translations, translation_grid

    n_psi = int(round(360.0 / psi_step)) << int(oversampling)
    psi = (np.arange(n_psi) + 0.5) * (360.0 / n_psi) - 0.5 * psi_step  # children centred on coarse points
    psi = np.mod(psi, 360.0)
    coarse = translation_grid(offset_range, offset_step)
    trans = oversample_translations(coarse, None, oversampling, offset_step) if oversampling else coarse
    return psi, trans


def coarse_image_size_2d(psi_step: float, particle_diameter: float, pixel_size: float, box: int,
                         current_size: int) -> int:
    """RELION's coarse size in 2D: resolution ``(step/360)·π·D/1.5`` → ``2·ceil(apix·N/res)``, at most
    current_size."""
    res = (psi_step / 360.0) * math.pi * particle_diameter / 1.5
    size = 2 * int(math.ceil(pixel_size * box / res)) if res > 0 else current_size
    return int(min(current_size, max(size, 8)))


def _shell_of(kx: np.ndarray, ky: np.ndarray) -> np.ndarray:
    return np.floor(np.sqrt(kx.astype(np.float64) ** 2 + ky.astype(np.float64) ** 2) + 0.5).astype(np.int64)


def _half_pixels(box: int) -> tuple[np.ndarray, np.ndarray]:
    """Shell of every pixel of the ``(box, box//2+1)`` half transform (flattened), and the pixel count per shell."""
    from cryodask.ops.filters import fftw_frequencies

    ky = fftw_frequencies(box, np)[:, None]
    kx = np.arange(box // 2 + 1)[None, :]
    shell = _shell_of(np.broadcast_to(kx, (box, box // 2 + 1)), np.broadcast_to(ky, (box, box // 2 + 1))).ravel()
    nsh = box // 2 + 1
    count = np.bincount(np.minimum(shell, nsh), minlength=nsh + 1)[:nsh].astype(np.float64)
    return shell, count


def _soft_circle(box: int, radius: float, width: float) -> np.ndarray:
    from cryodask.ops.filters import spherical_mask

    return np.asarray(spherical_mask(box, radius, width=width, ndim=2, dtype=np.float64))


# ---------------------------------------------------------------------------------------------
# what the driver sends to and gets back from a chunk task


@dataclass
class Class2DSetup:
    """Everything a chunk task needs that is the same for every chunk (small; no images)."""

    iteration: int
    box: int
    pixel_size: float
    pad: float
    n_classes: int
    current_size: int
    references: str  # the _classes.mrcs of the previous iteration
    sigma2_noise: np.ndarray  # (n_optics, nsh)
    class_fractions: np.ndarray  # (K,)
    prior_offsets: np.ndarray  # (K, 2) pixels
    sigma_offset: float  # Å
    psi_step: float  # coarse in-plane step, degrees
    offset_range: float  # pixels
    offset_step: float  # coarse translation step, pixels
    oversampling: int
    coarse_size: int
    particle_diameter: float  # Å
    width_mask_edge: int = 5
    zero_mask: bool = False
    do_ctf: bool = False
    random_seed: int = 0
    adaptive_fraction: float = 0.999
    do_norm: bool = False  # --norm: images × avg_norm/rlnNormCorrection; new per-particle values returned
    avg_norm: float = 1.0
    scale: np.ndarray | None = None  # --scale: (n_groups,) intensity scale applied to the references


@dataclass
class ChunkInput:
    """The per-particle inputs of one chunk (small arrays)."""

    chunk: int
    index: np.ndarray  # (n,) particle indices in the whole set
    origins_px: np.ndarray  # (n, 2) previous offsets
    optics: np.ndarray  # (n,) 0-based optics group
    n_optics: int
    ctf: dict[str, np.ndarray] | None = None
    premultiplied: np.ndarray | None = None
    seed_class: np.ndarray | None = None  # (n,) 0-based random class of the initial references
    seed_psi: np.ndarray | None = None  # (n,) random in-plane angle (degrees) of the initial references
    norm: np.ndarray | None = None  # (n,) rlnNormCorrection (None: 1)
    group: np.ndarray | None = None  # (n,) 0-based scale group (rlnGroupNumber − 1; None: the optics group)


@dataclass
class Class2DSums:
    """Sums added over chunks (the tree reduction's payload)."""

    bp: list[Any]  # one 2D BackProjector per class
    sigma2_sum: np.ndarray  # (n_optics, nsh) Σ w |X − A|² per shell, inside the window
    power_sum: np.ndarray  # (n_optics, nsh) Σ |X|² per shell, whole half transform
    n_particles: np.ndarray  # (n_optics,)
    class_weight: np.ndarray  # (K,)
    offset_sum: np.ndarray  # (K, 2) Σ w (old + t), pixels
    sigma2_offset: float  # Σ w |old + t − prior|² (Å²)
    log_likelihood: float
    pmax_sum: float
    # --scale: (n_groups, nsh) Σ w⟨X, s·CTF·A⟩ and Σ w|s·CTF·A|² per shell (None: not summed)
    signal_product: np.ndarray | None = None
    reference_power: np.ndarray | None = None

    def __iadd__(self, other: "Class2DSums") -> "Class2DSums":
        for a, b in zip(self.bp, other.bp, strict=True):
            a += b
        for name in ("sigma2_sum", "power_sum", "n_particles", "class_weight", "offset_sum", "sigma2_offset",
                     "log_likelihood", "pmax_sum", "signal_product", "reference_power"):
            mine, theirs = getattr(self, name), getattr(other, name)
            if theirs is not None:
                setattr(self, name, theirs if mine is None else mine + theirs)
        return self


@dataclass
class ChunkOutput:
    """A chunk task's result: its sums and the per-particle results."""

    sums: Class2DSums | None
    index: np.ndarray
    class_number: np.ndarray  # 1-based
    psi: np.ndarray
    origins_px: np.ndarray
    pmax: np.ndarray
    n_significant: np.ndarray
    log_likelihood: np.ndarray
    norm: np.ndarray = field(default_factory=lambda: np.zeros(0))  # --norm: the new rlnNormCorrection


def sum_outputs(*parts: Any) -> Class2DSums:
    """Add chunk sums together (a tree-reduction step); takes ChunkOutputs or Class2DSums."""
    sums = [p.sums if isinstance(p, ChunkOutput) else p for p in parts]
    first = sums[0]
    total = Class2DSums(bp=[b.copy() for b in first.bp], sigma2_sum=first.sigma2_sum.copy(),
                        power_sum=first.power_sum.copy(), n_particles=first.n_particles.copy(),
                        class_weight=first.class_weight.copy(), offset_sum=first.offset_sum.copy(),
                        sigma2_offset=first.sigma2_offset, log_likelihood=first.log_likelihood,
                        pmax_sum=first.pmax_sum, **{k: None if getattr(first, k) is None else getattr(first, k).copy()
                                                   for k in ("signal_product", "reference_power")})
    for s in sums[1:]:
        total += s
    return total


def particle_part(out: ChunkOutput) -> ChunkOutput:
    """The per-particle results without the accumulators (what the driver gathers)."""
    return ChunkOutput(sums=None, index=out.index, class_number=out.class_number, psi=out.psi,
                       origins_px=out.origins_px, pmax=out.pmax, n_significant=out.n_significant,
                       log_likelihood=out.log_likelihood, norm=out.norm)


# ---------------------------------------------------------------------------------------------
# references: read once per worker process

_REFERENCES: OrderedDict = OrderedDict()


def load_references(path: str, *, pad: float, r_max: float) -> Any:
    """The :class:`~cryodask.ops.project.Projector2D` of a ``_classes.mrcs`` (cached by path, mtime, size, r_max)."""
    from cryodask.io.mrc import read_stack
    from cryodask.ops.project import Projector2D

    st = os.stat(path)
    key = (os.path.abspath(path), st.st_mtime_ns, st.st_size, float(pad), float(r_max))
    if key not in _REFERENCES:
        refs = np.array(read_stack(path, mmap=False), dtype=np.float32)
        _REFERENCES[key] = Projector2D.from_images(refs, pad=pad, r_max=r_max)
        while len(_REFERENCES) > 4:
            _REFERENCES.popitem(last=False)
    _REFERENCES.move_to_end(key)
    return _REFERENCES[key]


# ---------------------------------------------------------------------------------------------
# image preparation


def prepare_images(images: np.ndarray, origins_px: np.ndarray, *, pixel_size: float, particle_diameter: float,
                   width_mask_edge: int, zero_mask: bool, rng: np.random.Generator
                   ) -> tuple[np.ndarray, np.ndarray]:
    """(unmasked FT, masked FT) ``(n, B, B//2+1)`` of images recentred by their offsets (RELION's normalisation)."""
    from cryodask.ops.filters import phase_shift

    box = images.shape[-1]
    ft = backend.rfftn(np.fft.ifftshift(images.astype(np.float64), axes=(-2, -1)), axes=(-2, -1))
    ft = phase_shift(ft, origins_px)
    real = np.fft.fftshift(backend.irfftn(ft, (box, box), axes=(-2, -1)), axes=(-2, -1))
    radius = particle_diameter / (2.0 * pixel_size)
    m = _soft_circle(box, radius, float(width_mask_edge))
    if zero_mask:
        masked = real * m
    else:
        outside = m < 1e-6
        sd = real[:, outside].std(axis=1) if outside.any() else np.zeros(len(real))
        noise = rng.standard_normal(real.shape) * sd[:, None, None]
        masked = real * m + noise * (1.0 - m)
    mft = backend.rfftn(np.fft.ifftshift(masked, axes=(-2, -1)), axes=(-2, -1))
    return ft, mft


def _ctf_of(inp: ChunkInput, box: int, pixel_size: float, do_ctf: bool) -> np.ndarray:
    from cryodask.ops.ctf import ctf_2d, ctf_for_scoring

    n = len(inp.index)
    if not do_ctf or inp.ctf is None:
        return np.ones((n, box, box // 2 + 1), np.float32)
    c = ctf_2d(box, pixel_size, **inp.ctf)
    if inp.premultiplied is not None:
        c = ctf_for_scoring(c, inp.premultiplied)
    return np.asarray(c, np.float32)


#: RELION 3's initial 2D references are band-limited to this fraction of the box (in shells)
INITIAL_BAND = 0.07


def initial_r_max(box: int) -> int:
    """Radius (shells) of the initial references' accumulators: ``round(0.07·box)``, at least 1."""
    return max(1, int(round(INITIAL_BAND * box)))


def initial_chunk(images: np.ndarray, inp: ChunkInput, *, pixel_size: float, particle_diameter: float,
                  width_mask_edge: int, zero_mask: bool, random_seed: int, n_classes: int, pad: float,
                  do_ctf: bool) -> dict[str, Any]:
    """Sums for the initial noise spectrum and references (RELION's ``calculateSumOfPowerSpectraAndAverageImage``).

    Per optics group Σ|X|² per shell and ΣX of the masked images; and per class the accumulators
    of its random subset (``inp.seed_class``) inserted at random in-plane angles (``inp.seed_psi``),
    CTF-weighted (data Σ CTF·X, weight Σ CTF²) up to :func:`initial_r_max` shells.
    """
    from cryodask.em.state import iteration_rng
    from cryodask.ops.backproject import BackProjector

    box = images.shape[-1]
    rng = iteration_rng(random_seed, 0, 1000 + inp.chunk)
    ft, mft = prepare_images(images, inp.origins_px, pixel_size=pixel_size, particle_diameter=particle_diameter,
                             width_mask_edge=width_mask_edge, zero_mask=zero_mask, rng=rng)
    shell, _ = _half_pixels(box)
    nsh = box // 2 + 1
    flat = mft.reshape(len(mft), -1)
    p2 = (flat.real ** 2 + flat.imag ** 2)
    power = np.zeros((inp.n_optics, nsh))
    sum_ft = np.zeros((inp.n_optics, flat.shape[1]), np.complex128)
    count = np.zeros(inp.n_optics)
    ok = shell < nsh
    for g in range(inp.n_optics):
        sel = inp.optics == g
        if sel.any():
            power[g] = np.bincount(shell[ok], weights=p2[sel][:, ok].sum(axis=0), minlength=nsh)[:nsh]
            sum_ft[g] = flat[sel].sum(axis=0)
            count[g] = sel.sum()
    # the initial references: RELION masks the images only with --zero_mask here
    ctf = _ctf_of(inp, box, pixel_size, do_ctf)
    x = (mft if zero_mask else ft) * ctf
    bps = [BackProjector.zeros(box, pad=pad, r_max=initial_r_max(box), ndim=2) for _ in range(n_classes)]
    for k in range(n_classes):
        sel = np.flatnonzero(np.asarray(inp.seed_class) == k)
        if len(sel):
            bps[k].insert(x[sel].astype(np.complex64), np.asarray(inp.seed_psi, np.float64)[sel],
                          weights=(ctf[sel] ** 2).astype(np.float32))
    return {"power": power, "sum_ft": sum_ft, "count": count,
            "ref_data": np.stack([b.data for b in bps]), "ref_weight": np.stack([b.weight for b in bps])}


def _add_dicts(*parts: dict[str, Any]) -> dict[str, Any]:
    return {k: sum(p[k] for p in parts) for k in parts[0]}


# ---------------------------------------------------------------------------------------------
# the chunk task


def _pixels(box: int, r_max: float, ft: np.ndarray, mft: np.ndarray, ctf_full: np.ndarray, sigma2: np.ndarray,
            optics: np.ndarray) -> dict[str, Any]:
    """The images, CTF and 1/σ² on the Fourier pixels within ``r_max`` (a window of ``2·r_max``)."""
    from cryodask.em.estep import inv_sigma2_from_sigma2
    from cryodask.ops.project import slice_pixels

    n = len(ft)
    nsh = box // 2 + 1
    flat, kx, ky = slice_pixels(box, r_max)
    shell = _shell_of(kx, ky)
    s2 = np.asarray(sigma2, np.float64)[optics][:, np.minimum(shell, nsh - 1)]
    isg_m = inv_sigma2_from_sigma2(s2).astype(np.float32)  # M-step: 1/σ² at the origin too (RELION)
    isg = isg_m.copy()
    isg[:, shell == 0] = 0.0  # scoring leaves the origin out
    return dict(flat=flat, kx=kx, ky=ky, shell=shell, freqs=np.stack([kx, ky], axis=1),
                # np.take keeps rows C-ordered ([:, flat] would make them Fortran-ordered)
                Xu=np.take(ft.reshape(n, -1), flat, axis=1).astype(np.complex64),
                Xm=np.take(mft.reshape(n, -1), flat, axis=1).astype(np.complex64),
                ctf=np.take(ctf_full.reshape(n, -1), flat, axis=1), isg=isg, isg_m=isg_m)


def _offset_d2(old: np.ndarray, T: np.ndarray, prior: np.ndarray, apix: float) -> np.ndarray:
    """``|old + t − prior_k|²`` in Å², ``(n, K, T)``."""
    d = old[:, None, None, :] + T[None, None, :, :] - prior[None, :, None, :]
    return (d * d).sum(axis=-1) * apix * apix


def _log_prior_trans(d2: np.ndarray, sigma_offset: float) -> np.ndarray:
    s2off = float(sigma_offset) ** 2
    return -d2 / (2.0 * s2off) if s2off >= 1e-4 else np.where(d2 > 0, -np.inf, 0.0)


def _single_pass(setup: Class2DSetup, px: dict[str, Any], old: np.ndarray, n_score: int, lpo: Any) -> dict[str, Any]:
    """Every class × psi × translation of the fine grid scored at ``current_size`` (``--oversampling 0``)."""
    from cryodask.em.estep import (log_sigma2_term, phase_ramps, posterior_weights, precompute_shifted, score_terms,
                                   scoring_terms)

    n = len(old)
    psi, T = fine_sampling(setup.psi_step, setup.offset_range, setup.offset_step, setup.oversampling)
    R, n_t = len(psi), len(T)
    ramps = phase_ramps(px["freqs"], -T, setup.box)  # translation t: the image moved by +t (new origin = old + t)
    Xm_s = precompute_shifted(px["Xm"], ramps)
    terms = scoring_terms(Xm_s, ctf=px["ctf"], inv_sigma2=px["isg"], n_trans=n_t)
    proj = load_references(setup.references, pad=setup.pad, r_max=setup.current_size / 2.0)
    P = proj.sample(psi, px["kx"], px["ky"])  # (K, R, npix)
    lpt = _log_prior_trans(_offset_d2(old, T, setup.prior_offsets[:n_score], setup.pixel_size), setup.sigma_offset)
    diff2 = np.empty((n, n_score * R, n_t), np.float32)
    for k in range(n_score):
        score_terms(terms, P[k], include_constant=False, out=diff2[:, k * R:(k + 1) * R, :])
    post = posterior_weights(diff2, log_prior_orient=None if lpo is None else np.repeat(lpo, R), log_prior_trans=lpt,
                             orient_class=np.repeat(np.arange(n_score), R), adaptive_fraction=setup.adaptive_fraction,
                             diff2_offset=terms.constant, logsigma2=log_sigma2_term(px["isg"]), overwrite_diff2=True)
    del diff2
    return dict(rows=np.arange(n), weights=post.weights, significant=post.significant,
                starts=np.arange(n_score + 1) * R,
                projections=[P[k] for k in range(n_score)], orient=[np.arange(R)] * n_score, psi_grid=psi, T=T,
                ramps=ramps, Xm_s=Xm_s,
                best_class=post.best_orientation // R,
                best_psi=psi[post.best_orientation % R], best_t=T[post.best_translation], pmax=post.pmax,
                n_significant=post.n_significant, log_likelihood=post.log_likelihood, failed=post.failed)


def _two_pass(setup: Class2DSetup, ft: np.ndarray, mft: np.ndarray, ctf_full: np.ndarray, optics: np.ndarray,
              px: dict[str, Any], old: np.ndarray, n_score: int, lpo: Any) -> list[dict[str, Any]]:
    """RELION's adaptive oversampling: coarse grid at ``coarse_size``, then the children of the significant
    samples at ``current_size``, per group of particles with similar significant samples
    (:func:`cryodask.em.estep.score_two_pass_grouped`); one result per group, ``rows`` its particles."""
    from dataclasses import replace

    from cryodask.em.estep import (lazy_scoring_terms, log_sigma2_term, phase_ramps, precompute_shifted,
                                   score_two_pass_grouped, scoring_terms)
    from cryodask.geometry.shifts import oversample_translations, translation_grid

    box, os_ = setup.box, setup.oversampling
    psi_c, _ = fine_sampling(setup.psi_step, setup.offset_range, setup.offset_step, 0)
    psi_f, _ = fine_sampling(setup.psi_step, setup.offset_range, setup.offset_step, os_)
    T_c = translation_grid(setup.offset_range, setup.offset_step)
    T_f = oversample_translations(T_c, None, os_, setup.offset_step)  # coarse-major children
    pc = _pixels(box, setup.coarse_size / 2.0, ft, mft, ctf_full, setup.sigma2_noise, optics)
    ramps_c = phase_ramps(pc["freqs"], -T_c, box)
    ramps_f = phase_ramps(px["freqs"], -T_f, box)
    coarse = scoring_terms(precompute_shifted(pc["Xm"], ramps_c), ctf=pc["ctf"], inv_sigma2=pc["isg"],
                           n_trans=len(T_c))
    fine = lazy_scoring_terms(px["Xm"], ramps_f, ctf=px["ctf"], inv_sigma2=px["isg"])
    proj_c = load_references(setup.references, pad=setup.pad, r_max=setup.coarse_size / 2.0)
    proj_f = load_references(setup.references, pad=setup.pad, r_max=setup.current_size / 2.0)
    P_c = proj_c.sample(psi_c, pc["kx"], pc["ky"])
    single = [replace(proj_f, data=proj_f.data[k:k + 1], power_spectrum=proj_f.power_spectrum[k:k + 1])
              for k in range(n_score)]
    # fine projections made once per chunk batch, whichever groups ask for them
    P_f = np.zeros((n_score, len(psi_f), len(px["kx"])), np.complex64)
    made = np.zeros((n_score, len(psi_f)), bool)

    def fine_projector(g: Any, k: int, orient: Any) -> np.ndarray:
        orient = np.asarray(orient, np.int64)
        new = np.unique(orient[~made[k, orient]])
        if len(new):
            P_f[k, new] = single[k].sample(psi_f[new], px["kx"], px["ky"])[0]
            made[k, new] = True
        return P_f[k, orient]

    lpt = _log_prior_trans(_offset_d2(old, T_c, setup.prior_offsets[:n_score], setup.pixel_size), setup.sigma_offset)
    groups = score_two_pass_grouped(coarse, fine, [P_c[k] for k in range(n_score)], fine_projector,
                                    n_over_rot=2 ** os_, n_over_trans=4 ** os_,
                                    log_prior_orient=None if lpo is None else np.repeat(lpo[:, None], len(psi_c),
                                                                                        axis=1),
                                    log_prior_trans=lpt, adaptive_fraction=setup.adaptive_fraction,
                                    logsigma2=log_sigma2_term(px["isg"]), group_cost=GROUP_COST,
                                    projection_cost=PROJECTION_COST)
    del coarse, fine
    out = []
    for g, res in groups:
        sel = np.asarray(res.fine_translations, np.int64)
        cls, orient, tidx = res.best_pose()
        ramps = ramps_f[sel]
        out.append(dict(rows=np.asarray(g, np.int64), weights=res.fine.weights, significant=res.fine.significant,
                        starts=np.array([fc.start for fc in res.classes] + [res.classes[-1].stop]),
                        projections=[fc.projections for fc in res.classes],
                        orient=[np.asarray(fc.orientations, np.int64) for fc in res.classes], psi_grid=psi_f,
                        T=T_f[sel],
                        ramps=ramps, Xm_s=precompute_shifted(px["Xm"][g], ramps), best_class=cls,
                        best_psi=psi_f[orient], best_t=T_f[tidx], pmax=res.fine.pmax,
                        n_significant=res.coarse.n_significant, log_likelihood=res.fine.log_likelihood,
                        failed=res.fine.failed | res.coarse.failed))
    return out


#: :func:`cryodask.em.estep.fine_groups`' costs, in coarse samples of one particle: of one more group (a few
#: dozen calls), and of each coarse orientation in a group's union (its children's projections, their |P|² in
#: the scoring and the M-step, the expected projections, the rows of the summed slices: passes over the
#: window's pixels whatever the group's size). Measured at box 64, K=10 (CPU s of a 5-iteration run,
#: 2 × 2 runs): 40/2,000 gave 41.4-41.8 s against 43.7-46.0 for 8/8,000 and 43.7-45.2 for 20/2,000; with
#: 8/2,000 the broad first iterations split into ~100 groups a batch by translation alone (+45 % CPU)
GROUP_COST = 2000.0
PROJECTION_COST = 40.0


#: memory budget (bytes) of the shifted images of one batch of particles inside a chunk task
BATCH_BYTES = 1 << 28


def batch_size(n_trans: int, n_pixels: int, budget: int = BATCH_BYTES) -> int:
    """Particles scored at once: the fine shifted images (masked, unmasked and the scoring copy, complex64)
    of a batch stay within ``budget``."""
    return max(1, int(budget // max(1, 3 * 8 * n_trans * n_pixels)))


def _insert_slabs(slabs: dict[int, Any], psi_grid: np.ndarray, kx: np.ndarray, ky: np.ndarray, bps: list[Any]) -> None:
    """Insert each class's summed slices (``slabs[k]``: data and weight on the window's pixels ``kx, ky``
    per orientation of ``psi_grid``, and which orientations got any) into ``bps[k]``: one insertion per
    class and batch, whichever groups of particles the slices came from."""
    keep = ~((kx == 0) & (ky < 0))  # the Friedel mates BackProjector.insert leaves out
    for k, (data, weight, used) in sorted(slabs.items()):
        o = np.flatnonzero(used)
        bps[k].insert_pixels(np.compress(keep, data[o], axis=1), psi_grid[o], np.compress(keep, weight[o], axis=1),
                             kx[keep], ky[keep])


#: the M-step sums take all classes in one pair of GEMMs when that scores at most this many times the
#: (particle, orientation) pairs of one pair of GEMMs per class (the per-class calls repeat the passes over
#: the images and the weights; one call pays for the pairs of particles with no weight in a class)
STACK_CLASSES_COST = 1.5


def _stack_classes(present: np.ndarray, sizes: np.ndarray) -> bool:
    """Whether :func:`cryodask.em.estep.mstep_sums` takes all classes at once: ``present`` (n, K) says
    which classes hold each particle's significant samples, ``sizes`` (K,) the classes' orientations."""
    per_class = float((present.sum(axis=0) * sizes).sum())
    stacked = float(present.any(axis=1).sum() * sizes.sum())
    return len(sizes) > 1 and stacked <= STACK_CLASSES_COST * per_class


def _expectation_batch(ft: np.ndarray, mft: np.ndarray, ctf_full: np.ndarray, optics: np.ndarray, n_optics: int,
                       old: np.ndarray, index: np.ndarray, setup: Class2DSetup,
                       bps: list[Any], acc: dict[str, Any], group: np.ndarray) -> dict[str, np.ndarray]:
    """Score one batch of a chunk's particles, add its M-step sums to ``bps`` / ``acc``; per-particle results."""
    box, K = setup.box, setup.n_classes
    px = _pixels(box, setup.current_size / 2.0, ft, mft, ctf_full, setup.sigma2_noise, optics)
    with np.errstate(divide="ignore"):
        lpo = np.log(np.maximum(np.asarray(setup.class_fractions, np.float64), 0.0))
    if setup.oversampling > 0:
        scored = _two_pass(setup, ft, mft, ctf_full, optics, px, old, K, lpo)
    else:
        scored = [_single_pass(setup, px, old, K, lpo)]
    n = len(ft)
    failed = np.zeros(n, bool)
    for s in scored:
        failed[s["rows"]] = np.asarray(s["failed"], bool)
    if failed.any():
        bad = index[np.flatnonzero(failed)[0]] + 1
        raise UserError(f"particle {bad}", "zero sum of weights (its image does not fit any class); check the "
                                           "pixel size, --particle_diameter and the CTF parameters")
    out = dict(class_number=np.zeros(n, np.int64), psi=np.zeros(n), origins_px=np.zeros((n, 2)), pmax=np.zeros(n),
               n_significant=np.zeros(n, np.int64), log_likelihood=np.zeros(n), wdiff2=np.zeros(n))
    batch_groups, local_group = np.unique(group, return_inverse=True)  # the batch's scale groups
    slabs: dict[int, tuple[np.ndarray, np.ndarray, np.ndarray]] = {}
    for s in scored:
        g = s["rows"]
        out["class_number"][g] = np.asarray(s["best_class"], np.int64) + 1
        out["psi"][g] = s["best_psi"]
        out["origins_px"][g] = old[g] + np.asarray(s["best_t"])
        out["pmax"][g] = s["pmax"]
        out["n_significant"][g] = s["n_significant"]
        out["log_likelihood"][g] = s["log_likelihood"]
        out["wdiff2"][g] = _add_mstep_sums(s, {key: px[key][g] for key in ("Xu", "ctf", "isg_m")}, px, old[g],
                                           optics[g], n_optics, local_group[g], batch_groups, setup, slabs, acc)
    _insert_slabs(slabs, scored[0]["psi_grid"], px["kx"], px["ky"], bps)
    out["window_power"] = (np.abs(px["Xm"].astype(np.complex128)) ** 2).sum(axis=1)
    return out


def _add_mstep_sums(s: dict[str, Any], pg: dict[str, np.ndarray], px: dict[str, Any], old: np.ndarray,
                    optics: np.ndarray, n_optics: int, local_group: np.ndarray, batch_groups: np.ndarray,
                    setup: Class2DSetup, slabs: dict[int, Any], acc: dict[str, Any]) -> np.ndarray:
    """Add the M-step sums of one scored group of particles (``s``; ``pg`` its rows of the images, CTF and
    1/σ²) to ``slabs`` (per class, the summed slices of each orientation: :func:`_insert_slabs`) and ``acc``;
    returns the group's ``Σ w |X − A|²`` per particle (``--norm``)."""
    from cryodask.em.estep import mstep_sums, precompute_shifted
    from cryodask.em.iteration import shell_sums
    from cryodask.em.kernels import class_presence

    box, K = setup.box, setup.n_classes
    nsh = box // 2 + 1
    T = s["T"]
    n_t = len(T)
    Xu_s = precompute_shifted(pg["Xu"], s["ramps"])
    d2 = _offset_d2(old, T, setup.prior_offsets, setup.pixel_size)
    shell = px["shell"]
    wdiff2 = np.zeros(len(old))  # --norm: Σ_φ w Σ_k |X − A|² per particle
    W, sig, starts = s["weights"], s["significant"], np.asarray(s["starts"], np.int64)
    present = class_presence(sig, starts)  # (n, K): which classes hold a particle's significant samples
    sizes = np.diff(starts)
    kw = dict(ctf=pg["ctf"], inv_sigma2=pg["isg_m"], n_trans=n_t, X_shifted_masked=s["Xm_s"], group=optics,
              n_groups=n_optics, scale_group=local_group, n_scale_groups=len(batch_groups))
    if _stack_classes(present, sizes):
        orient_class = np.repeat(np.arange(K), sizes)
        sums = mstep_sums(W, Xu_s, np.concatenate(s["projections"]), significant=sig, offset_diff2=d2,
                          orient_class=orient_class, n_classes=K, **kw)
        orient_all = np.concatenate(s["orient"])
        parts = [(sums, np.flatnonzero(orient_class[np.asarray(sums.orientations)] == k), orient_all, k)
                 for k in range(K)]
        ctw = np.asarray(sums.class_translation_weight, np.float64)
        class_tw = [ctw[:, k, :] for k in range(K)]
        shared = [sums]
    else:
        parts, class_tw, shared = [], [], []
        for k in range(K):
            a, b = int(starts[k]), int(starts[k + 1])
            if b == a or not present[:, k].any():
                class_tw.append(None)
                continue
            sk = mstep_sums(W[:, a:b], Xu_s, s["projections"][k], significant=sig[:, a:b], offset_diff2=d2[:, k, :],
                            **kw)
            parts.append((sk, np.arange(len(sk.orientations)), s["orient"][k], k))
            class_tw.append(np.asarray(sk.translation_weight, np.float64))
            shared.append(sk)
    n_orient, n_pix = len(s["psi_grid"]), len(shell)
    for sk, rows, orient, k in parts:  # the slices of class k, by orientation (distinct within a call)
        if not len(rows):
            continue
        if k not in slabs:
            slabs[k] = (np.zeros((n_orient, n_pix), np.complex64), np.zeros((n_orient, n_pix), np.float32),
                        np.zeros(n_orient, bool))
        data, weight, used = slabs[k]
        o = orient[np.asarray(sk.orientations)[rows]]
        data[o] += sk.data[rows]
        weight[o] += sk.weight[rows]
        used[o] = True
    for sk in shared:  # sums over classes
        for g in range(n_optics):
            acc["sigma2_sum"][g] += np.bincount(shell, weights=sk.sigma2_noise[g].astype(np.float64),
                                                minlength=nsh)[:nsh]
        if acc["signal_product"] is not None:  # the batch's groups are distinct: += by index is a sum
            acc["signal_product"][batch_groups] += shell_sums(sk.signal_product, shell, nsh)
            acc["reference_power"][batch_groups] += shell_sums(sk.reference_power, shell, nsh)
        wdiff2 += np.asarray(sk.wdiff2, np.float64)
        acc["sigma2_offset"] += sk.sigma2_offset
    for k, tw in enumerate(class_tw):  # (n, T) per class
        if tw is not None:
            acc["class_weight"][k] += tw.sum()
            acc["offset_sum"][k] += tw.sum(axis=1) @ old + tw.sum(axis=0) @ T
    return wdiff2


def expectation_chunk(images: np.ndarray, inp: ChunkInput, setup: Class2DSetup) -> ChunkOutput:
    """E-step and M-step sums of one chunk against all classes (see the module docstring).

    The chunk is scored in batches of :func:`batch_size` particles, so the task's memory follows
    the budget, not the chunk size; the sums of all batches go into the same accumulators.
    """
    from cryodask.em.state import iteration_rng
    from cryodask.geometry.shifts import n_translations
    from cryodask.ops.backproject import BackProjector
    from cryodask.ops.project import slice_pixels

    box, apix, K = setup.box, setup.pixel_size, setup.n_classes
    n = len(inp.index)
    nsh = box // 2 + 1
    r_max = setup.current_size / 2.0
    rng = iteration_rng(setup.random_seed, setup.iteration, 1000 + inp.chunk)
    norm_in = np.ones(n) if inp.norm is None else np.asarray(inp.norm, np.float64)
    images = np.asarray(images)
    if setup.do_norm:  # RELION's first step of image preparation
        images = images * (setup.avg_norm / norm_in).astype(np.float32)[:, None, None]
    ft, mft = prepare_images(images, inp.origins_px, pixel_size=apix,
                             particle_diameter=setup.particle_diameter, width_mask_edge=setup.width_mask_edge,
                             zero_mask=setup.zero_mask, rng=rng)
    ctf_full = _ctf_of(inp, box, apix, setup.do_ctf)
    group = inp.optics if inp.group is None else np.asarray(inp.group, np.int64)
    if setup.scale is not None:  # the group's intensity scale multiplies the references, as the CTF does
        ctf_full = ctf_full * np.asarray(setup.scale, np.float32)[group][:, None, None]
    old = np.asarray(inp.origins_px, np.float64)
    bps = [BackProjector.zeros(box, pad=setup.pad, r_max=r_max, ndim=2) for _ in range(K)]
    acc: dict[str, Any] = dict(sigma2_sum=np.zeros((inp.n_optics, nsh)), class_weight=np.zeros(K),
                               offset_sum=np.zeros((K, 2)), sigma2_offset=0.0,
                               signal_product=None if setup.scale is None else np.zeros((len(setup.scale), nsh)),
                               reference_power=None if setup.scale is None else np.zeros((len(setup.scale), nsh)))
    nb = batch_size(n_translations(setup.offset_range, setup.offset_step, setup.oversampling),
                    len(slice_pixels(box, r_max)[0]))
    parts = []
    for b0 in range(0, n, nb):
        sl = slice(b0, min(n, b0 + nb))
        parts.append(_expectation_batch(ft[sl], mft[sl], ctf_full[sl], inp.optics[sl], inp.n_optics,
                                        old[sl],
                                        inp.index[sl], setup, bps, acc, group[sl]))
    res = {key: np.concatenate([p[key] for p in parts]) for key in parts[0]}
    wdiff2, window_power = res.pop("wdiff2"), res.pop("window_power")

    shell_all, _ = _half_pixels(box)
    p2 = mft.reshape(n, -1)
    p2 = p2.real ** 2 + p2.imag ** 2
    power_sum = np.zeros((inp.n_optics, nsh))
    n_particles = np.zeros(inp.n_optics)
    ok = shell_all < nsh
    for g in range(inp.n_optics):
        sel = inp.optics == g
        n_particles[g] = sel.sum()
        if sel.any():
            power_sum[g] = np.bincount(shell_all[ok], weights=p2[sel][:, ok].sum(axis=0), minlength=nsh)[:nsh]

    sums = Class2DSums(bp=bps, sigma2_sum=acc["sigma2_sum"], power_sum=power_sum, n_particles=n_particles,
                       class_weight=acc["class_weight"], offset_sum=acc["offset_sum"],
                       sigma2_offset=float(acc["sigma2_offset"]), log_likelihood=float(res["log_likelihood"].sum()),
                       pmax_sum=float(res["pmax"].sum()), signal_product=acc["signal_product"],
                       reference_power=acc["reference_power"])
    norm_out = norm_in
    if setup.do_norm:
        from cryodask.em.mstep import norm_correction

        # power beyond the scoring window, to Nyquist
        highres = np.maximum(p2[:, ok].sum(axis=1, dtype=np.float64) - window_power, 0.0)
        norm_out = norm_correction(norm_in, setup.avg_norm, wdiff2, highres)
    return ChunkOutput(sums=sums, index=np.asarray(inp.index), norm=norm_out, **res)


def class_accumulator(total: Class2DSums, k: int) -> Any:
    """Class ``k``'s accumulators alone: what a reconstruction task needs (so only they move)."""
    return total.bp[k]


def reconstruct_class(bp: Any, tau2: np.ndarray, tau2_fudge: float) -> tuple[np.ndarray, np.ndarray]:
    """A class's new reference ``(B, B)`` from its accumulators, and its SSNR per shell (RELION's ``data_vs_prior``)."""
    from cryodask.em.mstep import data_vs_prior, reconstruct

    bp = bp.symmetrised()
    image = np.asarray(reconstruct(bp, tau2=tau2, tau2_fudge=tau2_fudge), np.float32)
    dvp = np.asarray(data_vs_prior(bp, tau2, tau2_fudge=tau2_fudge).data_vs_prior, np.float64)
    return image, dvp


# ---------------------------------------------------------------------------------------------
# the driver


@dataclass
class Class2DResult(RunViews):
    """What :func:`class2d` returns (besides the files it writes); ``.plot_classes()``,
    ``.plot_convergence()``, ``.write_report()`` read those files."""

    classes: np.ndarray  # (K, B, B) the final class averages
    class_fractions: np.ndarray
    resolution: np.ndarray  # Å per class (estimated)
    data: pd.DataFrame  # particles with rlnClassNumber, rlnAnglePsi, origins…
    pixel_size: float
    iterations: int
    output_root: str
    history: list[dict[str, Any]] = field(default_factory=list)

    @property
    def particles(self) -> pd.DataFrame:
        """The particles with their classes, psi and offsets (``data``)."""
        return self.data

    @property
    def maps(self) -> np.ndarray:
        """The class averages ``(K, B, B)`` (``classes``)."""
        return self.classes


def _column(parts: pd.DataFrame, label: str, default: float) -> np.ndarray:
    if label in parts.columns:
        v = pd.to_numeric(parts[label], errors="coerce").to_numpy(np.float64)
        return np.where(np.isfinite(v), v, default)
    return np.full(len(parts), default)


def _check_options(K: int, iter: int, psi_step: float, offset_range: float, offset_step: float, oversampling: int,
                   tau2_fudge: float, particle_diameter: float, pad: float, pool: int | None) -> None:
    checks = [
        (K >= 1, "--K", f"{K} classes: give at least 1 (e.g. --K 50)"),
        (iter >= 1, "--iter", f"{iter} iterations: give at least 1 (RELION's GUI uses 25)"),
        (psi_step == -1 or 0 < psi_step <= 360, "--psi_step",
         f"{psi_step} is not an angle step in (0, 360]; give e.g. 10 (or -1 for RELION's 2D default of 10)"),
        (offset_range >= 0, "--offset_range", f"{offset_range} must be zero or positive (pixels)"),
        (offset_step > 0, "--offset_step", f"{offset_step} must be positive (pixels)"),
        (0 <= oversampling <= 3, "--oversampling", f"{oversampling}: give 0, 1, 2 or 3"),
        (tau2_fudge > 0, "--tau2_fudge", f"{tau2_fudge} must be positive (RELION's GUI uses 2 for Class2D)"),
        (pad in (1, 2), "--pad", f"{pad}: give 1 or 2"),
        (pool is None or pool >= 1, "--pool", f"{pool}: give a positive number of particles per task"),
        (particle_diameter == -1 or particle_diameter > 0, "--particle_diameter",
         f"{particle_diameter} must be positive (Å), or -1 for the box"),
    ]
    for ok, where_, what in checks:
        if not ok:
            raise UserError(where_, what)


def class2d(particles: Any, o: str | Path, *,
            use_gpu: bool = False, gpu: str | None = None, gpu_list: str | None = None, j: int | None = None,
            workers: int | None = None, cluster: str | None = None, scheduler_file: str | None = None,
            scratch_dir: str | None = None, keep_free_scratch: float = 10.0, keep_scratch: bool = False,
            reuse_scratch: bool = False, preread_images: bool = False, no_parallel_disc_io: bool = False,
            profile: str | None = None,
            client: Any = None, K: int | None = None, iter: int = 25, psi_step: float = -1.0,
            offset_range: float = 6.0, offset_step: float = 2.0, oversampling: int = 1, tau2_fudge: float = 2.0,
            particle_diameter: float = -1.0, zero_mask: bool = False, flatten_solvent: bool = False,
            ctf: bool = False, random_seed: int = 0, pad: float = 2, incr_size: int = 10, adaptive_fraction: float = 0.999, width_mask_edge: int = 5,
            pool: int | None = None, norm: bool = False, scale: bool = False,
            continue_from: str | Path | None = None, command_line: str = "", log: Any = print,
            quiet: bool = False) -> Class2DResult:
    """2D classification; RELION's option names as keyword arguments.

    Parameters
    ----------
    particles
        A STAR file or a particle store (path), or particles opened with
        :func:`cryodask.io.store.open_particles`.
    o
        Output rootname (``Class2D/run`` writes ``Class2D/run_it001_classes.mrcs``…).
    K
        Number of classes (required unless ``continue_from``).
    iter
        Number of iterations (RELION's GUI: 25); with ``continue_from``, the last iteration to run.
    psi_step
        In-plane angular step in degrees; -1 is RELION's 2D default, 10°.
    offset_range, offset_step
        Translational search disc radius and step in pixels (RELION: 6 and 2).
    oversampling
        Adaptive oversampling order: the fine pass uses psi step / 2^os and offset step / 2^os; 0 scores the
        coarse grid only.
    tau2_fudge
        Regularisation parameter T (RELION's GUI for Class2D: 2).
    particle_diameter
        Mask diameter in Å; -1: the box minus the soft edge.
    zero_mask
        Zeros outside the mask (else noise).
    flatten_solvent
        Multiply the classes by the soft circular mask of ``particle_diameter`` after every M-step
        (RELION's ``--flatten_solvent``, which its GUI always gives for Class2D): zero outside the
        particle, and τ² from the masked classes.
    ctf
        CTF-correct.
    random_seed
        Same seed, same result.
    pool
        Particles per chunk task when ``particles`` is a STAR file (default: the store's chunking).
    norm, scale
        RELION's ``--norm`` (a normalisation correction per particle, ``rlnNormCorrection``) and
        ``--scale`` (an intensity scale per group: rlnGroupName, else micrograph); RELION's GUI turns
        both on.
    use_gpu, gpu, gpu_list, j, workers, cluster, scheduler_file, scratch_dir, keep_free_scratch, keep_scratch, reuse_scratch, preread_images, no_parallel_disc_io, profile
        Where and how the job runs, as on the command line (the execution options,
        :mod:`cryodask.cluster.client`); by default a ``LocalCluster`` sized to the machine.
    client
        A ``distributed.Client`` to run on instead (left open at the end).
    continue_from
        An ``<o>_itNNN_optimiser.star`` to resume from (RELION's ``--continue``). The classes, the
        model, the particles' offsets and the options that shape the run (K, sampling, mask, CTF,
        seed, chunking) come from that iteration's files; ``iter``, ``tau2_fudge`` and the compute
        options may change. Same seed, same chunks: the continued run draws what an uninterrupted
        one would.
    command_line
        Stored as the first line of each ``_optimiser.star``.
    log, quiet
        Where the progress lines go (None: nowhere); ``quiet``: no progress bars (batch logs).

    Returns
    -------
    Class2DResult
    """
    state = None
    if continue_from is not None:
        from cryodask.em.model import read_model
        from cryodask.em.state import read_optimiser, resolve_file

        state, files = read_optimiser(continue_from)
        K = read_model(resolve_file(files["model"], continue_from)).n_classes
        psi_step, offset_range, offset_step = state.psi_step, state.offset_range, state.offset_step
        oversampling, particle_diameter, zero_mask = state.adaptive_oversampling, state.particle_diameter, \
            state.do_zero_mask
        flatten_solvent = state.do_solvent
        ctf, random_seed, pool, incr_size = state.do_ctf_correction, state.random_seed, state.max_pooled, \
            state.incr_size
        adaptive_fraction, width_mask_edge = state.adaptive_fraction, state.width_mask_edge
        norm, scale = state.do_norm_correction, state.do_scale_correction
        # read_optimiser gives the offsets in pixels (RELION 3.1's Å divided by the model's pixel size)
    if K is None:
        raise UserError("--K", "give the number of classes (e.g. --K 50), or --continue an earlier run")
    _check_options(K, iter, psi_step, offset_range, offset_step, oversampling, tau2_fudge, particle_diameter, pad,
                   pool)
    from cryodask.io.store import open_particles

    if isinstance(particles, (str, os.PathLike)):
        parts_obj = open_particles(particles, chunk=pool) if pool else open_particles(particles)
    else:
        parts_obj = particles
    Path(str(o)).parent.mkdir(parents=True, exist_ok=True)
    opts = dict(o=str(o), K=int(K), iter=int(iter), psi_step=10.0 if psi_step == -1 else float(psi_step),
                offset_range=float(offset_range), offset_step=float(offset_step), oversampling=int(oversampling),
                tau2_fudge=float(tau2_fudge), particle_diameter=float(particle_diameter), zero_mask=bool(zero_mask),
                flatten_solvent=bool(flatten_solvent), ctf=bool(ctf), random_seed=int(random_seed), pad=float(pad), incr_size=int(incr_size),
                adaptive_fraction=float(adaptive_fraction), width_mask_edge=int(width_mask_edge),
                command_line=command_line, pool=pool, quiet=bool(quiet), norm=bool(norm), scale=bool(scale),
                continue_from=None if continue_from is None else str(continue_from))
    from cryodask.cluster.job import job_session

    with job_session(client, name=opts["o"], use_gpu=use_gpu, gpu=gpu, gpu_list=gpu_list, j=j, workers=workers,
                     cluster=cluster, scheduler_file=scheduler_file, scratch_dir=scratch_dir,
                     keep_free_scratch=keep_free_scratch, keep_scratch=keep_scratch, reuse_scratch=reuse_scratch,
                     preread_images=preread_images, no_parallel_disc_io=no_parallel_disc_io,
                     profile=profile) as session:
        from cryodask.em.monitor import memory_preflight

        fits = memory_preflight("class2d", session.client, parts_obj, chunk_given=bool(pool), K=int(K), pad=pad,
                                offset_range=opts["offset_range"], offset_step=opts["offset_step"],
                                oversampling=opts["oversampling"], psi_step=opts["psi_step"], log=log)
        if fits is not None and state is None and isinstance(particles, (str, os.PathLike)):
            parts_obj = open_particles(particles, chunk=fits)
            opts["pool"] = fits
        return _Run(session, parts_obj, opts, log).run()


class _Run:
    """The driver's state of one classification."""

    def __init__(self, session: Any, particles: Any, opts: dict[str, Any], log: Any) -> None:
        from cryodask.em.model import Model
        from cryodask.em.state import OptimiserState

        self.session, self.client, self.particles, self.o = session, session.client, particles, opts
        self.log = log or (lambda *a, **k: None)
        from cryodask.em.monitor import JobMonitor

        self.monitor = JobMonitor("class2d", session.client, output_root=opts["o"], total_iterations=opts["iter"],
                                  log=log, quiet=opts.get("quiet", False))
        self.box = int(particles.box)
        self.apix = float(particles.pixel_size)
        from cryodask.em.iteration import optics_tables, scale_groups

        self.optics, self.parts, self.optics_index = optics_tables(particles.table)
        self.n_opt = len(self.optics)
        # RELION's groups for the intensity scale (per micrograph unless rlnGroupName says otherwise)
        self.group_index, self.group_names = scale_groups(self.parts)
        self.parts["rlnGroupNumber"] = self.group_index + 1
        self.n = len(self.parts)
        self.K = opts["K"]
        if opts["particle_diameter"] <= 0:
            opts["particle_diameter"] = (self.box - 2 * opts["width_mask_edge"]) * self.apix
        if self.K > self.n:
            raise UserError("--K", f"{self.K} classes for {self.n} particles: give fewer classes than particles")
        names = [str(s) for s in self.optics.get("rlnOpticsGroupName", [f"opticsGroup{g}" for g in self.optics["rlnOpticsGroup"]])]
        self.model = Model(ori_size=self.box, pixel_size=self.apix, n_classes=self.K, n_optics_groups=self.n_opt,
                           pad=opts["pad"], tau2_fudge=opts["tau2_fudge"], optics_group_names=names,
                           group_names=list(self.group_names), current_size=self.box, sigma_offset=10.0)
        st = OptimiserState(output_root=opts["o"], n_iterations=opts["iter"], random_seed=opts["random_seed"],
                            do_split_random_halves=False, adaptive_oversampling=opts["oversampling"],
                            adaptive_fraction=opts["adaptive_fraction"], particle_diameter=opts["particle_diameter"],
                            width_mask_edge=opts["width_mask_edge"], do_zero_mask=opts["zero_mask"],
                            do_solvent=opts["flatten_solvent"],
                            incr_size=opts["incr_size"], do_auto_refine=False, do_ctf_correction=opts["ctf"],
                            max_pooled=int(opts["pool"] or getattr(particles, "chunk", 1) or 1),
                            psi_step=opts["psi_step"], psi_step_original=opts["psi_step"],
                            offset_range=opts["offset_range"], offset_step=opts["offset_step"],
                            offset_range_original=opts["offset_range"], offset_step_original=opts["offset_step"],
                            healpix_order=0, healpix_order_original=0, perturbation_factor=0.0,
                            do_norm_correction=opts["norm"], do_scale_correction=opts["scale"])
        self.state = st
        self.prior_offsets = np.zeros((self.K, 2))
        self.tau2 = np.zeros((self.K, self.box // 2 + 1))
        self.history: list[dict[str, Any]] = []
        # RELION's columns this job sets
        for c in ("rlnOriginXAngst", "rlnOriginYAngst"):
            if c not in self.parts.columns:
                self.parts[c] = 0.0
        if "rlnNormCorrection" not in self.parts.columns:
            self.parts["rlnNormCorrection"] = 1.0  # RELION writes it, --norm or not

    # -- per-chunk inputs --------------------------------------------------------------------
    def chunk_input(self, i: int, sl: slice, seed_class: np.ndarray | None = None,
                    seed_psi: np.ndarray | None = None) -> ChunkInput:
        from cryodask.ops.ctf import ctf_params, ctf_premultiplied

        p = self.parts.iloc[sl]
        ctf = pre = None
        if self.o["ctf"]:
            sub = type(self.particles.table)(optics=self.optics, particles=p)
            src = str(getattr(self.particles, "path", "particles"))
            ctf = ctf_params(sub, source=src)
            pre = ctf_premultiplied(sub, source=src)
        origins = np.stack([_column(p, "rlnOriginXAngst", 0.0), _column(p, "rlnOriginYAngst", 0.0)], 1) / self.apix
        return ChunkInput(chunk=i, index=np.arange(sl.start, sl.stop), origins_px=origins,
                          optics=self.optics_index[sl], n_optics=self.n_opt, ctf=ctf, premultiplied=pre,
                          seed_class=None if seed_class is None else seed_class[sl],
                          seed_psi=None if seed_psi is None else seed_psi[sl],
                          norm=_column(p, "rlnNormCorrection", 1.0), group=self.group_index[sl])

    def _chunks(self) -> list[Any]:
        return self.session.chunk_futures(self.particles)

    # -- the run -------------------------------------------------------------------------------
    def run(self) -> Class2DResult:
        t0 = time.perf_counter()
        if self.o["continue_from"]:
            refs = self._load(self.o["continue_from"])
            start = self.state.iteration + 1
        else:
            refs = self._initialise()
            start = 1
        self.log(f"class2d: {self.n} particles, box {self.box}, {self.apix:g} Å/px, K={self.K}; "
                 f"{'continued from iteration ' + str(start - 1) if start > 1 else 'initialised'} in "
                 f"{time.perf_counter() - t0:.1f} s")
        from cryodask.geometry.shifts import translation_grid
        from cryodask.progress import hidden_variable_sampling_points

        points = hidden_variable_sampling_points(
            self.K, 1, int(round(360.0 / self.o["psi_step"])),
            len(translation_grid(self.o["offset_range"], self.o["offset_step"])),
            oversampling=self.o["oversampling"], ref_dim=2)
        last = self.o["iter"]
        pending = self._submit(start, refs) if start <= last else None
        for it in range(start, last + 1):
            refs = self._complete(it, pending)
            # the next iteration needs only the new classes and model: the workers score it while this
            # iteration's STAR files and plots are written
            pending = self._submit(it + 1, refs) if it < last else None
            self._write(it, refs)
            h = self.history[-1]
            self.monitor.iteration_done(it, sampling_points=points, resolution=float(h["resolution"]),
                                        image_size=int(h["current_size"]), pmax=float(h["ave_pmax"]))
        self.monitor.finish()
        from cryodask.io.mrc import read_stack

        classes = np.array(read_stack(refs, mmap=False))
        return Class2DResult(classes=classes, class_fractions=self.model.class_fractions.copy(),
                             resolution=self.model.estimated_resolution.copy(), data=self.parts.copy(),
                             pixel_size=self.apix, iterations=self.o["iter"], output_root=self.o["o"],
                             history=self.history)

    def _load(self, optimiser: str) -> str:
        """Restore the model, the particles and the state of an iteration; returns its classes' path."""
        from cryodask.em.model import read_model
        from cryodask.em.state import read_optimiser, resolve_file
        from cryodask.io.mrc import read_stack
        from cryodask.io.star import read_particles, read_star

        st, files = read_optimiser(optimiser)
        data = resolve_file(files["data"], optimiser)
        t = read_particles(data)
        if len(t.particles) != self.n:
            raise UserError(data, f"has {len(t.particles)} particles but --i has {self.n}; continue with the same "
                                  "particles")
        model_path = resolve_file(files["model"], optimiser)
        m = read_model(model_path)
        if not m.references or "@" not in m.references[0]:
            raise UserError(model_path, "names no class stack (rlnReferenceImage N@file.mrcs); continue a class2d run")
        refs = resolve_file(m.references[0].split("@", 1)[1], optimiser)
        classes = read_star(model_path, blocks=["model_classes"])["model_classes"]
        for j, c in enumerate(("rlnClassPriorOffsetX", "rlnClassPriorOffsetY")):
            if c in classes.columns:
                self.prior_offsets[:, j] = pd.to_numeric(classes[c]).to_numpy(np.float64) / self.apix
        if not np.any(m.sigma2_noise):  # read_model also reads RELION 3.1's data_model_group_N
            raise UserError(model_path, "has no noise spectrum (rlnSigma2Noise in data_model_optics_group_N or "
                                        "data_model_group_N); continue a class2d run")
        from cryodask.em.model import match_scale_groups

        m.tau2_fudge = self.o["tau2_fudge"]
        m.pad = self.o["pad"]
        self.model = match_scale_groups(m, self.group_names)
        st.output_root, st.n_iterations = self.o["o"], self.o["iter"]
        self.state = st
        self.parts = t.particles.reset_index(drop=True)
        self._set_tau2(np.array(read_stack(refs, mmap=False)))
        return str(refs)

    def _initialise(self) -> str:
        """Initial σ² and references (averages of random subsets at random angles, as RELION 3); writes the
        it000 files. Returns the references' path."""
        from cryodask.em.known_poses import tree_reduce
        from cryodask.em.mstep import reconstruct
        from cryodask.em.state import iteration_rng, output_name
        from cryodask.io.mrc import write_stack
        from cryodask.ops.backproject import BackProjector

        c = self.client
        rng = iteration_rng(self.o["random_seed"], 0, 7)
        seed_class = rng.integers(0, self.K, self.n)
        seed_psi = rng.uniform(0.0, 360.0, self.n)
        outs = []
        for i, (fut, sl) in enumerate(zip(self._chunks(), self.particles.chunk_slices(), strict=True)):
            outs.append(c.submit(initial_chunk, fut, self.chunk_input(i, sl, seed_class, seed_psi),
                                 pixel_size=self.apix, particle_diameter=self.o["particle_diameter"],
                                 width_mask_edge=self.o["width_mask_edge"], zero_mask=self.o["zero_mask"],
                                 random_seed=self.o["random_seed"], n_classes=self.K, pad=self.o["pad"],
                                 do_ctf=self.o["ctf"], pure=False, key=f"class2d-init-{i}-{fut.key}"))
        tot = tree_reduce(c, outs, _add_dicts, key=f"class2d-init-sum-{outs[0].key}").result()
        _, npix = _half_pixels(self.box)
        shell, _ = _half_pixels(self.box)
        nsh = self.box // 2 + 1
        sigma2 = np.zeros((self.n_opt, nsh))
        for g in range(self.n_opt):
            cnt = max(tot["count"][g], 1.0)
            mean_ft = tot["sum_ft"][g] / cnt
            mp = np.bincount(np.minimum(shell, nsh), weights=np.abs(mean_ft) ** 2, minlength=nsh + 1)[:nsh]
            sigma2[g] = (tot["power"][g] / cnt - mp) / (2.0 * np.maximum(npix, 1))
        self.model.sigma2_noise = np.maximum(sigma2, 0.0)
        refs = np.zeros((self.K, self.box, self.box), np.float32)
        r0 = initial_r_max(self.box)
        beyond = (shell > r0).reshape(self.box, self.box // 2 + 1)
        for k in range(self.K):  # data / weight, no prior (RELION reconstructs them without do_map)
            bp = BackProjector.zeros(self.box, pad=self.o["pad"], r_max=r0, ndim=2)
            bp.data[...] = tot["ref_data"][k]
            bp.weight[...] = tot["ref_weight"][k]
            # cropping the padded reconstruction leaks ~0.2 % of the amplitude past the band; RELION's
            # references have none there, and their SSNR sets iteration 1's image size
            ft = np.fft.rfft2(np.asarray(reconstruct(bp.symmetrised()), np.float64))
            ft[beyond] = 0
            refs[k] = np.fft.irfft2(ft, s=(self.box, self.box)).astype(np.float32)
        path = output_name(self.o["o"], 0, "classes.mrcs")
        write_stack(path, refs, self.apix)
        self._set_tau2(refs)
        # iteration 1's image size from the references' SSNR, as RELION (initialiseDataVersusPrior: the power
        # spectrum of the unpadded references, which is 0 past their band)
        from cryodask.ops.filters import radial_average

        power = np.abs(backend.rfftn(np.fft.ifftshift(refs.astype(np.float64), axes=(-2, -1)),
                                     axes=(-2, -1)).reshape(self.K, -1)) ** 2 / 2
        spectrum = np.stack([radial_average(p, shell, nsh) for p in power])
        dvp = initial_data_vs_prior(spectrum, self.model.sigma2_noise, tot["count"], self.model.class_fractions,
                                    tau2_fudge=float(self.o["tau2_fudge"]))
        best = max(1, max(_last_shell_ssnr(d) for d in dvp))
        self.model.current_resolution = float(self.box * self.apix / best)
        self.model.current_size = 0  # no iteration has run (RELION's it000 too)
        self.parts["rlnClassNumber"] = 1
        self.parts["rlnAnglePsi"] = 0.0
        self._write(0, str(path))
        return str(path)

    def _set_tau2(self, refs: np.ndarray) -> None:
        from cryodask.ops.project import Projector2D

        proj = Projector2D.from_images(np.asarray(refs, np.float32), pad=self.o["pad"])
        self.tau2 = np.asarray(proj.power_spectrum, np.float64)

    def _submit(self, it: int, refs: str) -> dict[str, Any]:
        """Submit iteration ``it`` (chunk tasks, their reduction, the reconstructions) against ``refs``."""
        from cryodask.em.known_poses import tree_reduce

        c, m, o = self.client, self.model, self.o
        images = self._chunks()
        size = self._image_size()
        setup = Class2DSetup(iteration=it, box=self.box, pixel_size=self.apix, pad=o["pad"], n_classes=self.K,
                             current_size=size, references=str(Path(refs).resolve()),
                             sigma2_noise=m.sigma2_noise.copy(), class_fractions=m.class_fractions.copy(),
                             prior_offsets=self.prior_offsets.copy(), sigma_offset=float(m.sigma_offset),
                             psi_step=o["psi_step"], offset_range=o["offset_range"], offset_step=o["offset_step"],
                             oversampling=o["oversampling"], coarse_size=coarse_image_size_2d(
                                 o["psi_step"], o["particle_diameter"], self.apix, self.box, size),
                             particle_diameter=o["particle_diameter"],
                             width_mask_edge=o["width_mask_edge"], zero_mask=o["zero_mask"], do_ctf=o["ctf"],
                             random_seed=o["random_seed"],
                             adaptive_fraction=o["adaptive_fraction"], do_norm=o["norm"], avg_norm=float(m.avg_norm),
                             scale=m.scale.copy() if o["scale"] else None)
        outs = []
        for i, (fut, sl) in enumerate(zip(images, self.particles.chunk_slices(), strict=True)):
            outs.append(self.session.submit_scoring(expectation_chunk, fut, self.chunk_input(i, sl), setup, pure=False,
                                 key=f"class2d-estep-{it}-{i}-{fut.key}"))
            # the references travel as a file: nothing big is embedded in the graph
        per_particle = [c.submit(particle_part, f, pure=False) for f in outs]
        total = tree_reduce(c, outs, sum_outputs, key=f"class2d-sum-{it}-{outs[0].key}")
        if len(outs) == 1:  # a one-chunk tree is the chunk itself
            total = c.submit(sum_outputs, total, pure=False, key=f"class2d-sum-{it}-{outs[0].key}")
        T = float(o["tau2_fudge"])
        tag = f"{it}-{outs[0].key}"
        parts = [c.submit(class_accumulator, total, k, pure=False, key=f"class2d-bp-{k}-{tag}") for k in range(self.K)]
        recs = [c.submit(reconstruct_class, parts[k], self.tau2[k], T, pure=False, key=f"class2d-rec-{k}-{tag}")
                for k in range(self.K)]
        return dict(outs=outs, per_particle=per_particle, total=total, recs=recs, setup=setup)

    def _image_size(self) -> int:
        """The image size of the next iteration: 2·(resolution shell + ``--incr_size``), at most the box."""
        shell = max(1, int(round(self.box * self.apix / self.model.current_resolution)))
        return int(min(self.box, 2 * (shell + self.o["incr_size"])))

    def _complete(self, it: int, pending: dict[str, Any]) -> str:
        """Gather iteration ``it``, update the model and the particles, write its classes; returns their path."""
        from cryodask.em.state import output_name
        from cryodask.io.mrc import write_stack

        c, m, o = self.client, self.model, self.o
        self.monitor.track(pending["outs"], f"it{it:03d}")  # reductions run as chunks finish
        results = c.gather(pending["per_particle"])
        sums = pending["total"].result()
        rec = c.gather(pending["recs"])

        # -- per-particle results
        idx = np.concatenate([r.index for r in results])
        old_class = self.parts["rlnClassNumber"].to_numpy().copy()
        self.parts.loc[idx, "rlnClassNumber"] = np.concatenate([r.class_number for r in results]).astype(np.int64)
        self.parts.loc[idx, "rlnAnglePsi"] = np.concatenate([r.psi for r in results])
        org = np.concatenate([r.origins_px for r in results]) * self.apix
        self.parts.loc[idx, "rlnOriginXAngst"] = org[:, 0]
        self.parts.loc[idx, "rlnOriginYAngst"] = org[:, 1]
        self.parts.loc[idx, "rlnMaxValueProbDistribution"] = np.concatenate([r.pmax for r in results])
        self.parts.loc[idx, "rlnNrOfSignificantSamples"] = np.concatenate([r.n_significant for r in results])
        self.parts.loc[idx, "rlnLogLikeliContribution"] = np.concatenate([r.log_likelihood for r in results])
        self.parts["rlnClassNumber"] = self.parts["rlnClassNumber"].astype(np.int64)
        self.parts["rlnNrOfSignificantSamples"] = self.parts["rlnNrOfSignificantSamples"].astype(np.int64)
        from cryodask.em.refine3d import update_norm_column

        avg_norm = update_norm_column(self.parts, results, idx, o["norm"])
        if avg_norm is not None:
            m.avg_norm = avg_norm

        # -- model update (RELION's maximizationOtherParameters for 2D)
        n = float(self.n)
        cw = sums.class_weight
        m.class_fractions = cw / max(cw.sum(), 1e-30)
        for k in range(self.K):
            if cw[k] > 0:
                self.prior_offsets[k] = sums.offset_sum[k] / cw[k]
        sigma2_offset = max(sums.sigma2_offset / (2.0 * n), 2.0)  # 2D: /(2N); RELION's floor 2 Å²
        m.sigma_offset = float(math.sqrt(sigma2_offset))
        _, npix = _half_pixels(self.box)
        nsh = self.box // 2 + 1
        flat_shells = np.arange(nsh)
        setup = pending["setup"]
        inside = flat_shells < setup.current_size // 2  # the last shell is only partly inside the window
        for g in range(self.n_opt):
            ng = max(sums.n_particles[g], 1.0)
            new = np.where(inside, sums.sigma2_sum[g], sums.power_sum[g]) / (2.0 * ng * np.maximum(npix, 1))
            m.sigma2_noise[g] = np.where(npix > 0, new, m.sigma2_noise[g])
        m.tau2 = self.tau2.copy()
        images_new = np.stack([r[0] for r in rec]).astype(np.float32)
        if o["flatten_solvent"]:  # RELION's solventFlatten: after the M-step, before τ² is taken from the classes
            images_new *= _soft_circle(self.box, o["particle_diameter"] / (2.0 * self.apix),
                                       o["width_mask_edge"]).astype(np.float32)
        m.data_vs_prior = np.stack([r[1] for r in rec])
        res_shell = np.array([_last_shell_ssnr(d) for d in m.data_vs_prior])
        res_shell = np.maximum(res_shell, 1)
        m.estimated_resolution = self.box * self.apix / res_shell
        best = int(res_shell[cw > 0].max()) if (cw > 0).any() else 1
        m.current_resolution = float(self.box * self.apix / best)
        m.log_likelihood = float(sums.log_likelihood)
        m.ave_pmax = float(sums.pmax_sum / n)
        m.group_nr_particles = np.bincount(self.group_index, minlength=m.n_groups)[:m.n_groups]
        if o["scale"] and sums.signal_product is not None:
            from cryodask.em.mstep import scale_correction

            ssnr = (m.class_fractions[:, None] * m.data_vs_prior).sum(axis=0)  # the classes' SSNR, by their share
            m.scale = scale_correction(m.scale, sums.signal_product, sums.reference_power, ssnr, m.group_nr_particles)
        st = self.state
        st.iteration = it
        st.current_changes_optimal_classes = float(np.mean(old_class != self.parts["rlnClassNumber"].to_numpy()))
        # the model holds the size this iteration ran at, as RELION's; the next one follows from the resolution
        m.current_size = setup.current_size
        st.coarse_size = setup.coarse_size
        self.history.append({"iteration": it, "resolution": m.current_resolution, "current_size": m.current_size,
                             "ave_pmax": m.ave_pmax, "class_fractions": m.class_fractions.copy(),
                             "changes_classes": st.current_changes_optimal_classes})

        path = output_name(self.o["o"], it, "classes.mrcs")
        write_stack(path, images_new, self.apix)
        self._set_tau2(images_new)
        return str(path)

    # -- files ---------------------------------------------------------------------------------
    def _write(self, it: int, classes_path: str) -> None:
        from cryodask.em.state import output_name, write_optimiser
        from cryodask.io.star import ParticleTable, write_particles

        root = self.o["o"]
        self.model.references = [f"{k + 1:06d}@{classes_path}" for k in range(self.K)]
        data = output_name(root, it, "data.star")
        write_particles(data, ParticleTable(optics=self.optics, particles=self.parts))
        model = output_name(root, it, "model.star")
        write_model_2d(model, self.model, self.prior_offsets * self.apix)
        sampling = output_name(root, it, "sampling.star")
        write_sampling_2d(sampling, self.state, self.apix)
        write_optimiser(output_name(root, it, "optimiser.star"), self.state, command_line=self.o["command_line"],
                        model_files=str(model), data_file=str(data), sampling_file=str(sampling))


def initial_data_vs_prior(tau2: np.ndarray, sigma2_noise: np.ndarray, n_particles: np.ndarray,
                          class_fractions: np.ndarray, *, tau2_fudge: float) -> np.ndarray:
    """RELION's SSNR of the initial 2D references (``MlModel::initialiseDataVersusPrior``), (K, shells).

    ``N · pdf_class · T · τ²(r) / σ²(r)``, with σ² averaged over the optics groups by their particle
    counts; a shell with no noise power counts as resolved.
    """
    n = np.asarray(n_particles, np.float64)
    avg = (n[:, None] * np.asarray(sigma2_noise, np.float64)).sum(axis=0) / max(n.sum(), 1.0)
    evidence = n.sum() * np.asarray(class_fractions, np.float64)[:, None]
    with np.errstate(divide="ignore", invalid="ignore"):
        ssnr = evidence * tau2_fudge * np.asarray(tau2, np.float64) / avg[None, :]
    return np.where(avg[None, :] > 0, ssnr, np.inf)


def _last_shell_ssnr(dvp: np.ndarray) -> int:
    """RELION's resolution shell: the last shell (from 1) before the SSNR first drops below 1."""
    below = np.flatnonzero(np.asarray(dvp)[1:] < 1.0)
    return int(below[0]) if len(below) else len(dvp) - 1


def write_model_2d(path: str | os.PathLike[str], model: Any, prior_offsets_angst: np.ndarray) -> None:
    """``_model.star`` of a 2D run: :func:`cryodask.em.model.write_model`'s blocks with RELION's 2D values
    (``rlnReferenceDimensionality 2``; ``rlnClassPriorOffsetX/Y`` per class, in Å)."""
    from cryodask.em.model import write_model
    from cryodask.io.atomic import atomic_path
    from cryodask.io.star import read_star, write_star

    model.reference_dimensionality = 2
    with atomic_path(path) as tmp:
        write_model(tmp, model)
        blocks = read_star(tmp)
        classes = blocks["model_classes"].copy()
        classes["rlnClassPriorOffsetX"] = np.asarray(prior_offsets_angst, np.float64)[:, 0]
        classes["rlnClassPriorOffsetY"] = np.asarray(prior_offsets_angst, np.float64)[:, 1]
        blocks["model_classes"] = classes
        write_star(tmp, blocks)


def write_sampling_2d(path: str | os.PathLike[str], state: Any, pixel_size: float) -> None:
    """``_sampling.star`` of a 2D run: ``rlnIs3DSampling 0`` and the offsets in Å, as RELION 3.1 writes them
    (``state`` holds them in pixels)."""
    from cryodask.em.state import write_sampling

    write_sampling(path, state, pixel_size, is_3d=False)
