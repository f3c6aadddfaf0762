"""3D classification without alignment (RELION's ``--skip_align``), optionally focused by a mask.

Each particle keeps the pose of a consensus refinement (``rlnAngleRot/Tilt/Psi`` and its
origin); only its class is a hidden variable. One chunk task (:func:`skip_align_chunk`):

1. prepares the images as the aligned E-step does (recentred by their origins, soft
   circular mask, FFT with RELION's normalisation, CTF);
2. with a signal-subtraction map (the consensus map outside the focus mask, written by
   :func:`cryodask.em.class3d.class3d`), subtracts its CTF-weighted projection at each
   particle's pose from the image before masking, so that only the masked region is left
   to decide the class (signal subtraction on the fly);
3. projects every class at each particle's pose and scores it with the noise model,
   ``diff2_ik = Σ_k |X_i − CTF_i·P_ik|² / (2σ²)`` within the current image size; the class
   posterior is ``π_k exp(−diff2_ik)`` normalised (π = the class fractions);
4. inserts each particle into every class's back-projector with its class weight
   (``w·CTF·X/σ²``, ``w·CTF²/σ²``) and adds the σ² sums per optics group; with ``--norm`` and
   ``--scale`` (as in the aligned E-step) the images are first multiplied by avg_norm/norm, the
   references by the group's scale, and the sums for their updates are returned too.

The result is the aligned E-step's :class:`~cryodask.em.iteration.ChunkResult`, so the
class3d driver combines (tree-reduces), reconstructs and updates the model the same way.
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np

from cryodask import backend

__all__ = ["SkipAlignSetup", "skip_align_chunk", "class_posteriors"]


@dataclass
class SkipAlignSetup:
    """What every chunk task of one skip-align iteration shares (small; maps travel as files)."""

    iteration: int
    box: int
    pixel_size: float
    pad: float
    current_size: int
    reference_paths: list[str]  # one map per class
    sigma2_noise: np.ndarray  # (n_optics, nsh)
    class_fractions: list[float]
    particle_diameter: float = -1.0  # Å
    width_mask_edge: int = 5
    zero_mask: bool = False
    do_ctf: bool = True
    random_seed: int = 0
    random_classes: bool = False  # first iteration from one reference: each particle to one random class
    subtract_path: str | None = None  # map whose projection is subtracted from every image (focus mask)
    do_norm: bool = False  # --norm: images × avg_norm/rlnNormCorrection; new per-particle values returned
    avg_norm: float = 1.0  # rlnNormCorrectionAverage
    scale: np.ndarray | None = None  # --scale: (n_groups,) intensity scale applied to the references


def class_posteriors(diff2: np.ndarray, class_fractions: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """Posterior class weights ``(n, K)`` and log-evidence ``(n,)`` from ``diff2`` ``(n, K)`` and priors π_k.

    ``w_ik = π_k exp(−diff2_ik) / Σ_k π_k exp(−diff2_ik)``; the log-evidence is
    ``log Σ_k π_k exp(−diff2_ik)``. Classes with π_k = 0 get no weight.
    """
    with np.errstate(divide="ignore"):
        logp = np.log(np.asarray(class_fractions, np.float64))[None, :] - np.asarray(diff2, np.float64)
    top = np.max(logp, axis=1, keepdims=True)
    top = np.where(np.isfinite(top), top, 0.0)
    e = np.exp(logp - top)
    s = e.sum(axis=1, keepdims=True)
    w = np.where(s > 0, e / np.where(s > 0, s, 1.0), 1.0 / logp.shape[1])
    return w, (np.log(np.maximum(s[:, 0], 1e-300)) + top[:, 0])


def skip_align_chunk(images: np.ndarray, meta, setup: SkipAlignSetup):
    """Class posteriors and M-step sums of one chunk at fixed poses (see the module docstring)."""
    from cryodask.em.iteration import (Accumulators, ChunkResult, _ctf, _inv_sigma2, load_projector, pixel_shells,
                                       prepare_images)
    from cryodask.em.state import iteration_rng
    from cryodask.geometry.euler import euler_to_matrix
    from cryodask.ops.backproject import BackProjector

    images = np.asarray(images, dtype=np.float32)
    n = len(images)
    norm_in = np.ones(n) if meta.norm is None else np.asarray(meta.norm, np.float64)
    if setup.do_norm:  # RELION's first step of image preparation, as in the aligned E-step
        images = images * (setup.avg_norm / norm_in).astype(np.float32)[:, None, None]
    box = setup.box
    nsh = box // 2 + 1
    K = len(setup.reference_paths)
    n_opt = meta.n_optics
    r_cur = setup.current_size / 2.0
    flat_f, kx_f, ky_f, sh_f = pixel_shells(box, r_cur)
    flat_a, kx_a, ky_a, sh_a = pixel_shells(box, box / 2.0)
    mats = euler_to_matrix(meta.rot, meta.tilt, meta.psi).reshape(-1, 3, 3).astype(np.float32)
    ctf = _ctf(meta, np.arange(n), box, setup.pixel_size, setup.do_ctf).reshape(n, -1)
    group = meta.optics if meta.group is None else np.asarray(meta.group, np.int64)
    if setup.scale is not None:  # the group's intensity scale multiplies the references, as the CTF does
        ctf = ctf * np.asarray(setup.scale, np.float64)[group][:, None].astype(ctf.dtype)
    rng = iteration_rng(setup.random_seed, setup.iteration, 1 + int(meta.index[0]) if n else 1)
    prep = dict(pixel_size=setup.pixel_size, particle_diameter=setup.particle_diameter,
                width_mask_edge=setup.width_mask_edge, zero_mask=setup.zero_mask, rng=rng)
    if setup.subtract_path:
        # subtract before masking: the masked FT must be that of the subtracted image
        ft_u, _ = prepare_images(images, meta.origins_px, **{**prep, "zero_mask": True})
        sub = load_projector(setup.subtract_path, pad=setup.pad, r_max=box / 2.0).sample(mats, kx_a, ky_a)
        U = ft_u.reshape(n, -1).astype(np.complex64)
        U[:, flat_a] -= (ctf[:, flat_a] * sub).astype(np.complex64)
        real = np.fft.fftshift(backend.irfftn(U.reshape(ft_u.shape).astype(np.complex128), (box, box),
                                              axes=(-2, -1)), axes=(-2, -1))
        ft_u, ft_m = prepare_images(real.astype(np.float32), np.zeros((n, 2)), **prep)
    else:
        ft_u, ft_m = prepare_images(images, meta.origins_px, **prep)
    U = ft_u.reshape(n, -1)[:, flat_f]
    M = ft_m.reshape(n, -1)
    C = ctf[:, flat_f]
    isg = _inv_sigma2(np.asarray(setup.sigma2_noise), meta.optics, sh_f, origin=False).astype(np.float64)
    isg_m = _inv_sigma2(np.asarray(setup.sigma2_noise), meta.optics, sh_f, origin=True)
    Xm = M[:, flat_f]

    # scores: every class projected at every particle's pose
    projs = [load_projector(p, pad=setup.pad, r_max=r_cur) for p in setup.reference_paths]
    A = []  # (K) × (n, P) expected images CTF·P
    diff2 = np.zeros((n, K))
    for k, proj in enumerate(projs):
        a = C * proj.sample(mats, kx_f, ky_f)
        A.append(a.astype(np.complex64))
        diff2[:, k] = 0.5 * (np.abs(Xm - a) ** 2 * isg).sum(axis=1)
    if setup.random_classes:
        pick = iteration_rng(setup.random_seed, setup.iteration, 3_000_017 + (int(meta.index[0]) if n else 0)
                             ).integers(0, K, n)
        w = np.zeros((n, K))
        w[np.arange(n), pick] = 1.0
        log_ev = -diff2[np.arange(n), pick]
    else:
        w, log_ev = class_posteriors(diff2, np.asarray(setup.class_fractions, np.float64))

    # M-step sums: each particle into every class with its weight
    acc = Accumulators(
        bp=[BackProjector.zeros(box, pad=setup.pad, r_max=r_cur) for _ in range(K)],
        sigma2_sum=np.zeros((1, n_opt, nsh)), power_sum=np.zeros((1, n_opt, nsh)),
        pixel_count=np.zeros((1, n_opt, nsh)), n_particles=np.zeros((1, n_opt)), sigma2_offset=np.zeros(1),
        weight_sum=np.zeros(1), class_weight=np.zeros(K))
    npix = box * (box // 2 + 1)
    n_per_shell_f = np.bincount(sh_f, minlength=nsh)[:nsh]
    pw = np.abs(M[:, flat_a]) ** 2
    resid = np.zeros((n, len(flat_f)))
    xa = np.zeros((n, len(flat_f)))  # --scale: Σ_k w ⟨X, s·CTF·P_k⟩ and Σ_k w |s·CTF·P_k|² per pixel
    aa = np.zeros((n, len(flat_f)))
    for k in range(K):
        wk = w[:, k]
        use = np.flatnonzero(wk > 1e-10)
        if len(use):
            slices = np.zeros((len(use), npix), np.complex64)
            weights = np.zeros((len(use), npix), np.float32)
            slices[:, flat_f] = (wk[use, None] * C[use] * isg_m[use]) * U[use]
            weights[:, flat_f] = wk[use, None] * C[use] ** 2 * isg_m[use]
            acc.bp[k].insert(slices.reshape(len(use), box, box // 2 + 1), mats[use],
                             weights=weights.reshape(len(use), box, box // 2 + 1))
        resid += wk[:, None] * np.abs(Xm - A[k]) ** 2
        xa += wk[:, None] * (Xm.real * A[k].real + Xm.imag * A[k].imag)
        aa += wk[:, None] * np.abs(A[k]) ** 2
        acc.class_weight[k] += float(wk.sum())
    for o in range(n_opt):
        so = meta.optics == o
        if not so.any():
            continue
        acc.sigma2_sum[0, o] += np.bincount(sh_f, weights=resid[so].sum(axis=0), minlength=nsh)[:nsh]
        acc.power_sum[0, o] += np.bincount(sh_a, weights=pw[so].sum(axis=0), minlength=nsh)[:nsh]
        acc.n_particles[0, o] += so.sum()
        acc.pixel_count[0, o] += n_per_shell_f * so.sum()
    if setup.scale is not None:
        n_groups = len(np.asarray(setup.scale))
        acc.signal_product = np.zeros((1, n_groups, nsh))
        acc.reference_power = np.zeros((1, n_groups, nsh))
        for gid in np.unique(group):
            sg = group == gid
            acc.signal_product[0, gid] += np.bincount(sh_f, weights=xa[sg].sum(axis=0), minlength=nsh)[:nsh]
            acc.reference_power[0, gid] += np.bincount(sh_f, weights=aa[sg].sum(axis=0), minlength=nsh)[:nsh]
    acc.weight_sum[0] += float(w.sum())
    norm_out = norm_in
    if setup.do_norm:
        from cryodask.em.mstep import norm_correction

        beyond = np.setdiff1d(flat_a, flat_f)  # power beyond the scoring window, to Nyquist
        highres = (np.abs(M[:, beyond]) ** 2).sum(axis=1, dtype=np.float64)
        norm_out = norm_correction(norm_in, setup.avg_norm, resid.sum(axis=1), highres)
    best = np.argmax(w, axis=1)
    return ChunkResult(acc=acc, index=meta.index, rot=np.asarray(meta.rot, np.float64).copy(),
                       tilt=np.asarray(meta.tilt, np.float64).copy(), psi=np.asarray(meta.psi, np.float64).copy(),
                       origins_px=np.asarray(meta.origins_px, np.float64).copy(), pmax=w[np.arange(n), best],
                       n_significant=(w > 1e-3).sum(axis=1).astype(np.int64), log_likelihood=log_ev,
                       failed=np.zeros(n, bool), class_number=best + 1, norm=norm_out)
