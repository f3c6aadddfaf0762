"""The memory pre-flight: refusal up front with a fix, estimates against tracemalloc peaks, the CLI."""

from __future__ import annotations

import time
import tracemalloc

import numpy as np
import pytest

from cryodask.em.memory import estimate, preflight
from cryodask.errors import UserError

APIX = 4.0


def _measure_chunk(tmp_path, monkeypatch, job, box, n, order, K=1, current_size=None, coarse_size=None):
    """tracemalloc peak of one real expectation_chunk, and the estimate given the measured significant unions
    (the fine passes of its groups together)."""
    import cryodask.em.estep as estep
    from cryodask.em.iteration import ChunkMeta, IterationSetup, expectation_chunk
    from cryodask.io.mrc import write_map
    from cryodask.ops.filters import low_pass_filter
    from cryodask.simulate import phantom, phantom_variant, simulate_particles

    vol = phantom(box, seed=0)
    vols = [vol, phantom_variant(vol, seed=1)][:max(1, K)]
    img = np.asarray(simulate_particles(vols, APIX, n=n, snr=0.5, seed=2).images, np.float32)
    n_refs = 2 if job == "refine3d" else K
    refs = []
    for k in range(n_refs):  # fresh paths: the per-process projector cache must not hold them already
        p = tmp_path / f"ref{k}_{time.time_ns()}.mrc"
        write_map(p, low_pass_filter(vols[k % len(vols)], 10.0, APIX), APIX)
        refs.append(str(p))
    cur = current_size or box
    sig2 = np.full((2 if job == "refine3d" else 1, 1, box // 2 + 1), float(img.var()) / box ** 2 / 4)
    setup = IterationSetup(iteration=2, box=box, pixel_size=APIX, pad=2, current_size=cur,
                           coarse_size=coarse_size or cur, reference_paths=refs, sigma2_noise=sig2,
                           sigma_offset=[10.0, 10.0], healpix_order=order, offset_range=4, offset_step=2,
                           oversampling=1, particle_diameter=0.8 * box * APIX, zero_mask=True, do_ctf=False,
                           split_halves=job == "refine3d", class_fractions=None if job == "refine3d" else [1 / K] * K)
    meta = ChunkMeta(index=np.arange(n), rot=np.zeros(n), tilt=np.zeros(n), psi=np.zeros(n),
                     origins_px=np.zeros((n, 2)), half=np.arange(n) % 2 + 1, optics=np.zeros(n, np.int64),
                     ctf=None, premultiplied=None)
    union = []
    original = estep.score_two_pass_grouped

    def recording(coarse, fine, coarse_projections, fine_projector, **kw):
        groups = original(coarse, fine, coarse_projections, fine_projector, **kw)
        n_rc = sum(int(p.shape[0]) for p in coarse_projections)
        for g, r in groups:  # the fine pass of each group is dense over that group's union
            union.append((len(g), sum(len(c.orientations) for c in r.classes) / kw["n_over_rot"] / n_rc,
                          len(r.fine_translations) / kw["n_over_trans"] / coarse.n_trans))
        return groups

    monkeypatch.setattr(estep, "score_two_pass_grouped", recording)
    tracemalloc.start()
    try:
        expectation_chunk(img.copy(), meta, setup)  # the copy: the task holds its images
        peak = tracemalloc.get_traced_memory()[1]
    finally:
        tracemalloc.stop()
    # the groups' fine scores together, as one union for every particle: n · rows · translations = Σ_g n_g·R_g·T_g
    n_all = sum(u[0] for u in union)
    trans = sum(u[0] * u[2] for u in union) / n_all
    rows = sum(u[0] * u[1] * u[2] for u in union) / n_all / trans
    est = estimate(job, box=box, n_particles=n, K=K, pad=2, healpix_order=order, offset_range=4, offset_step=2,
                   oversampling=1, chunk=n, current_size=cur, coarse_size=coarse_size,
                   significant_fraction=rows, significant_translations=trans)
    return peak, est


@pytest.mark.parametrize("cfg", [
    dict(job="refine3d", box=32, n=40, order=1),
    dict(job="class3d", box=32, n=60, order=1, K=2),
    dict(job="refine3d", box=48, n=40, order=2, current_size=32, coarse_size=24),
], ids=["refine3d-32-o1", "class3d-32-K2", "refine3d-48-o2"])
def test_e_step_estimate_within_30_percent(tmp_path, monkeypatch, cfg):
    peak, est = _measure_chunk(tmp_path, monkeypatch, **cfg)
    ratio = est.e_step_chunk() / peak
    assert 0.7 <= ratio <= 1.3, (ratio, peak, est.e_step)


@pytest.mark.parametrize("box", [48, 64])
def test_m_step_reconstruction_within_30_percent(box):
    from cryodask.em.mstep import reconstruct
    from cryodask.ops.backproject import BackProjector

    bp = BackProjector.zeros(box, pad=2)
    bp.data[...] = 1
    bp.weight[...] = 1
    tracemalloc.start()
    try:
        reconstruct(bp, tau2=np.ones(box // 2 + 1))
        peak = tracemalloc.get_traced_memory()[1]
    finally:
        tracemalloc.stop()
    est = estimate("class3d", box=box, n_particles=10, K=1)
    # the model's per-map figure is the working memory on top of the accumulators passed in
    assert 0.7 <= est.m_step["reconstruction per map"] / peak <= 1.3
    assert est.m_step["accumulators (one set, all references)"] == bp.data.nbytes + bp.weight.nbytes


def test_chunk_grows_with_memory_and_linear_model():
    est = estimate("refine3d", box=64, n_particles=3000, healpix_order=2)
    small, big = preflight(est, 2 * 2**30), preflight(est, 8 * 2**30)
    assert 1 <= small.chunk < big.chunk <= 3000
    assert small.e_step_peak <= small.usable  # the chosen chunk fits with the margin
    assert est.e_step_chunk(small.max_chunk + 1) * est.threads_per_worker + est.projector_cache > small.usable


def test_too_big_is_refused_up_front_naming_the_fix():
    est = estimate("refine3d", box=256, n_particles=100_000, pad=2)
    with pytest.raises(UserError) as e:
        preflight(est, 2 * 2**30)
    msg = str(e.value)
    assert "--pad 1" in msg and "--new_box" in msg and "memory" in msg
    est = estimate("class3d", box=128, n_particles=10_000, K=8, healpix_order=3)
    with pytest.raises(UserError, match="--K 4"):
        preflight(est, 256 * 2**20)
    # with pad 1 the same refine3d fits a bigger worker
    assert preflight(estimate("refine3d", box=256, n_particles=100_000, pad=1), 16 * 2**30).chunk >= 1


def test_cli_prints_and_refuses(capsys):
    from cryodask.cli import main

    assert main(["estimate", "refine3d", "--box", "64", "--n_particles", "3000", "--memory_per_worker", "4G"]) == 0
    out = capsys.readouterr().out
    assert "E-step peak per worker" in out and "M-step peak per worker" in out and "scratch disk" in out
    chunk = int(out.split("chunk: ")[1].split()[0])
    est = estimate("refine3d", box=64, n_particles=3000)
    assert chunk == preflight(est, 4 * 2**30).chunk
    assert "scratch disk: 47.4 MiB" in out  # 3000 × 64² × 4 B (46.9 MiB) + 200 B of metadata each
    assert main(["estimate", "--job", "refine3d", "--box", "360", "--n_particles", "1000",
                 "--memory_per_worker", "1G"]) == 2
    err = capsys.readouterr().err
    assert "cryodask: error: memory:" in err and "--pad 1" in err
    assert main(["estimate", "class3d"]) == 2  # no data given
    assert "--i" in capsys.readouterr().err


def test_cli_takes_the_jobs_own_command_line(capsys):
    """`cryodask estimate` before a job's command line: the options that size the memory are read, the job's
    other options are checked against the job and listed as ignored, its --j sets the threads per worker."""
    from cryodask.cli import main

    job = ["class2d", "--box", "64", "--n_particles", "3000", "--o", "Class2D/run", "--K", "10", "--iter", "5",
           "--psi_step", "10", "--ctf", "--zero_mask", "--flatten_solvent", "--particle_diameter", "154"]
    assert main(["estimate"] + job + ["--j", "2", "--memory_per_worker", "4G"]) == 0
    out = capsys.readouterr().out
    assert "ignored): --o Class2D/run --iter 5 --ctf --zero_mask --flatten_solvent --particle_diameter 154" in out
    assert "(2 thread(s))" in out and "K 10" in out and "36 orientations" in out  # 360° / psi step 10
    assert main(["estimate"] + job + ["--healpix_order", "3", "--tau2_fudge", "2"]) == 0  # class2d takes tau2_fudge
    capsys.readouterr()
    assert main(["estimate"] + job + ["--sigma_ang", "3"]) == 2  # not an option of class2d
    err = capsys.readouterr().err.strip()
    assert err == "cryodask: error: --sigma_ang: not an option of cryodask class2d: --sigma_ang 3", err
    with pytest.raises(SystemExit):  # other commands take no unknown options, as before
        main(["simulate", "--bogus"])
