"""refine3d end to end on simulated data: files, accuracy against the truth, --continue, RELION reads our output."""

from __future__ import annotations

import subprocess

import mrcfile
import numpy as np
import pytest

from cryodask.analysis.fsc import fsc, resolution_at
from cryodask.em.iteration import rotation_angle_between
from cryodask.em.refine3d import refine3d
from cryodask.geometry.euler import euler_to_matrix
from cryodask.io.mrc import write_map
from cryodask.io.star import read_particles, read_star
from cryodask.ops.filters import low_pass_filter, spherical_mask
from cryodask.simulate import phantom, simulate_particles, write_simulation

BOX, APIX = 32, 5.0
COMMON = dict(ini_high=30.0, particle_diameter=0.8 * BOX * APIX, ctf=True, zero_mask=True, flatten_solvent=True,
              low_resol_join_halves=40.0, random_seed=3, pool=100, log=None)


@pytest.fixture(scope="module")
def client():
    from cryodask.cluster.local import local_client

    with local_client(2) as c:
        yield c


def _dataset(folder, n, seed=1):
    vol = phantom(BOX, seed=0)
    sim = simulate_particles([vol], APIX, n=n, snr=0.3, seed=seed, n_optics_groups=2)
    paths = write_simulation(folder, sim)
    write_map(folder / "ref.mrc", low_pass_filter(vol, 30.0, APIX), APIX)
    return vol, sim, paths


@pytest.fixture(scope="module")
def small(tmp_path_factory):
    folder = tmp_path_factory.mktemp("refine3d")
    vol, sim, paths = _dataset(folder, 300)
    return folder, vol, sim, paths


@pytest.fixture(scope="module")
def short_run(small, client):
    folder, vol, sim, paths = small
    lines: list[str] = []
    res = refine3d(paths["particles"], folder / "A" / "run", folder / "ref.mrc", healpix_order=1, iter=2,
                   client=client, **{**COMMON, "log": lines.append, "quiet": True})
    res.log_lines = lines
    return res


def _angular_errors(data, truth):
    a = euler_to_matrix(*(data[c].to_numpy() for c in ("rlnAngleRot", "rlnAngleTilt", "rlnAnglePsi")))
    b = euler_to_matrix(*(truth[c].to_numpy() for c in ("rlnAngleRot", "rlnAngleTilt", "rlnAnglePsi")))
    return rotation_angle_between(a, b)


def test_short_run_writes_relions_files_and_finds_the_poses(small, short_run):
    folder, vol, sim, paths = small
    res = short_run
    root = folder / "A" / "run"
    for it in (1, 2):
        for what in ("data.star", "half1_model.star", "half2_model.star", "optimiser.star", "sampling.star",
                     "half1_class001.mrc", "half2_class001.mrc"):
            assert (folder / "A" / f"run_it{it:03d}_{what}").is_file(), (it, what)
    for what in ("class001.mrc", "half1_class001_unfil.mrc", "half2_class001_unfil.mrc", "data.star", "model.star"):
        assert (folder / "A" / f"run_{what}").is_file(), what
    assert res.iterations == 3  # two iterations, then the joined one
    data = read_particles(f"{root}_data.star").particles
    assert set(data["rlnRandomSubset"]) == {1, 2} and abs((data["rlnRandomSubset"] == 1).sum() - 150) <= 1
    for c in ("rlnAngleRot", "rlnOriginXAngst", "rlnMaxValueProbDistribution", "rlnNrOfSignificantSamples",
              "rlnLogLikeliContribution", "rlnClassNumber"):
        assert c in data.columns
    model = read_star(folder / "A" / "run_it002_half1_model.star")
    assert model["model_general"]["rlnCurrentImageSize"] == BOX
    assert len(model["model_optics_group_2"]) == BOX // 2 + 1
    assert (model["model_optics_group_1"]["rlnSigma2Noise"][1:] > 0).all()
    # the learnt direction prior (RELION's pdf_direction) of half 1 follows where its particles' true views lie
    from cryodask.geometry.healpix import healpix_sampling
    from cryodask.geometry.symmetry import direction_vectors

    pdf = read_star(f"{root}_it002_half1_model.star")["model_pdf_orient_class_1"]["rlnOrientationDistribution"]
    pdf = pdf.to_numpy(np.float64)
    assert len(pdf) == 48 and pdf.sum() == pytest.approx(1.0, abs=1e-6) and pdf.min() >= 0
    half1 = (data["rlnRandomSubset"] == 1).to_numpy()
    true_dir = direction_vectors(sim.truth.rlnAngleRot.to_numpy()[half1], sim.truth.rlnAngleTilt.to_numpy()[half1])
    counts = np.bincount(np.argmax(true_dir @ healpix_sampling(1).direction_vectors().T, axis=1), minlength=48)
    # measured 0.56 (150 particles over 48 directions); a uniform or mis-indexed prior gives ~0
    assert np.corrcoef(pdf, counts)[0, 1] > 0.3, np.corrcoef(pdf, counts)[0, 1]
    # RELION 3.1's scale groups by default: one per micrograph, numbered in order of appearance
    mics = list(dict.fromkeys(data["rlnMicrographName"]))
    assert list(model["model_groups"]["rlnGroupName"]) == mics and len(mics) == 6
    assert np.array_equal(data["rlnGroupNumber"].to_numpy(), [mics.index(m) + 1 for m in data["rlnMicrographName"]])
    # 15° fine sampling after two iterations from a 30 Å reference: most poses within ~ one step
    err = _angular_errors(data, sim.truth)
    assert np.median(err) < 15.0, np.median(err)
    assert np.mean(err > 30) < 0.25  # measured 0.19-0.20 (two iterations at 15°; the full runs go below 0.01)
    shift = np.hypot(data.rlnOriginXAngst - sim.truth.rlnOriginXAngst, data.rlnOriginYAngst - sim.truth.rlnOriginYAngst)
    assert np.median(shift) < 1.0 * APIX
    mask = spherical_mask(BOX, 0.4 * BOX, width=3)
    assert resolution_at(fsc(res.map, vol, mask=mask), 0.5, APIX) < 20.0
    assert 10.0 <= res.resolution < 25.0


def test_progress_lines_plots_report_and_result_views(small, short_run):
    """The memory check first, a line per iteration with RELION's NrHiddenVariableSamplingPoints, PNGs beside
    the iterations, run_report.html at the end; the result object plots what was written."""
    folder = small[0]
    lines = short_run.log_lines
    assert any(x.startswith("refine3d: memory per worker") for x in lines), lines
    its = [x for x in lines if x.startswith("refine3d it")]
    assert [x[:15] for x in its] == ["refine3d it001/", "refine3d it002/", "refine3d it003/"], its
    # HEALPix order 1 (48 directions x 12 psi), the disc of radius 6 px in 2 px steps (29), oversampling 1
    assert f"{48 * 12 * 29 * 8 * 4:,} sampling points/particle" in its[0]
    assert "left" in its[0] and "left" not in its[-1]
    assert (folder / "A" / "run_it002_fsc.png").stat().st_size > 1000
    assert "<img" in (folder / "A" / "run_report.html").read_text()
    assert short_run.particles is short_run.data and short_run.maps[0] is short_run.map  # the names of #7
    ax = short_run.plot_fsc()
    assert "0.143" in " ".join(t.get_text() for t in ax.figure.findobj(lambda o: hasattr(o, "get_text")))
    sampling = read_star(folder / "A" / "run_it001_sampling.star")["sampling_general"]
    assert float(sampling["rlnOffsetRange"]) == pytest.approx(6.0 * APIX)  # Å, as RELION 3.1 writes it


def test_continue_gives_the_same_maps_as_an_uninterrupted_run(small, short_run, client):
    folder, _, _, paths = small
    first = refine3d(paths["particles"], folder / "B" / "run", folder / "ref.mrc", healpix_order=1, iter=1,
                     client=client, **COMMON)
    assert first.iterations == 2
    cont = refine3d(paths["particles"], folder / "B" / "run", None, iter=2, client=client,
                    continue_from=folder / "B" / "run_it001_optimiser.star", log=None)
    assert cont.iterations == 3
    np.testing.assert_allclose(cont.map, short_run.map, rtol=0, atol=1e-5 * np.abs(short_run.map).max())
    a = read_particles(folder / "A" / "run_data.star").particles
    b = read_particles(folder / "B" / "run_data.star").particles
    np.testing.assert_allclose(a.rlnAngleRot, b.rlnAngleRot)


def test_continue_in_local_searches_is_checked_as_a_local_search(small, short_run, client, tmp_path):
    """A run continued in local searches at order 6 fits: the memory pre-flight counted it as a global
    search of 18.9 million orientations and refused it."""
    import re
    import shutil

    from cryodask.em.refine3d import search_order
    from cryodask.em.state import read_optimiser

    folder, _, _, paths = small
    for f in (folder / "A").glob("run_it001_*"):
        shutil.copy(f, tmp_path / f.name)
    optimiser = tmp_path / "run_it001_optimiser.star"  # it names its files with absolute paths
    text = optimiser.read_text().replace(str(folder / "A"), str(tmp_path))
    text = re.sub(r"(_rlnCryodaskLocalSearches\s+)\d", r"\g<1>1", text)  # as _raise_sampling leaves order 6
    optimiser.write_text(re.sub(r"(_rlnCryodaskSigmaAngles\s+)\S+", r"\g<1>0.9375", text))
    sampling = tmp_path / "run_it001_sampling.star"
    text = re.sub(r"(_rlnHealpixOrder\s+)\d+", r"\g<1>6", sampling.read_text())
    sampling.write_text(re.sub(r"(_rlnPsiStep\s+)\S+", r"\g<1>0.9375", text))
    state = read_optimiser(tmp_path / "run_it001_optimiser.star")[0]
    assert (state.healpix_order, state.local_searches, state.healpix_order_original) == (6, True, 1)
    assert search_order(state) == 1  # as the run started
    lines: list[str] = []
    refine3d(paths["particles"], tmp_path / "run", None, iter=2, client=client,
             continue_from=tmp_path / "run_it001_optimiser.star", log=lines.append)
    assert (tmp_path / "run_it002_optimiser.star").is_file()
    assert any("order 6 local" in line for line in lines), lines


def test_sampling_is_updated_with_accuracies_against_the_iterations_own_references(small, short_run, client,
                                                                                  tmp_path):
    """As RELION (calculateExpectedAngularErrors, then updateAngularSampling, at the start of an iteration), a
    stall before iteration 2 is judged with the accuracy against iteration 2's references (iteration 1's
    maps). Iteration 1's own accuracy, against the 30 Å start, is ~21°: 0.75 × 21° > the 7.5° fine step of
    order 1 would call the sampling fine enough and keep order 1; iteration 2's ~9° raises it to order 2."""
    import re
    import shutil

    from cryodask.em.state import read_optimiser

    folder, _, _, paths = small
    for f in (folder / "A").glob("run_it001_*"):
        shutil.copy(f, tmp_path / f.name)
    optimiser = tmp_path / "run_it001_optimiser.star"
    text = optimiser.read_text().replace(str(folder / "A"), str(tmp_path))
    for label in ("rlnNumberOfIterWithoutResolutionGain", "rlnNumberOfIterWithoutChangingAssignments"):
        text = re.sub(rf"(_{label}\s+)\d+", r"\g<1>1", text)  # stalled after iteration 1
    optimiser.write_text(text)
    state = read_optimiser(optimiser)[0]
    acc_before = short_run.history[0]["acc_rot"]
    assert 0.75 * acc_before > 7.5 and not state.has_fine_enough_angular_sampling, acc_before
    res = refine3d(paths["particles"], tmp_path / "run", None, iter=2, client=client, continue_from=optimiser,
                   log=None)
    it2 = res.history[0]
    assert it2["iteration"] == 2 and it2["acc_rot"] == pytest.approx(short_run.history[1]["acc_rot"])
    assert 0.75 * it2["acc_rot"] < 7.5, it2["acc_rot"]
    assert it2["order"] == 2
    assert int(read_star(tmp_path / "run_it002_sampling.star")["sampling_general"]["rlnHealpixOrder"]) == 2


def test_continue_from_a_missing_file_is_a_user_error(small, client):
    from cryodask.errors import UserError

    folder, _, _, paths = small
    with pytest.raises(UserError, match="does not exist"):
        refine3d(paths["particles"], folder / "C" / "run", None, client=client,
                 continue_from=folder / "C" / "run_it009_optimiser.star", log=None)


@pytest.mark.relion
def test_relion_reconstruct_reads_our_data_star(small, short_run, relion, tmp_path, monkeypatch):
    from cryodask.cli import main

    folder = small[0]
    data = folder / "A" / "run_data.star"
    monkeypatch.chdir(folder)  # image names are relative to the simulation folder
    subprocess.run([str(relion / "relion_reconstruct"), "--i", str(data), "--o", str(tmp_path / "rel.mrc"),
                    "--ctf", "--skip_gridding"], check=True, capture_output=True)
    assert main(["reconstruct", "--i", str(data), "--o", str(tmp_path / "ours.mrc"), "--ctf"]) == 0
    curve = fsc(mrcfile.read(tmp_path / "ours.mrc"), mrcfile.read(tmp_path / "rel.mrc"))
    assert curve[: int(0.9 * BOX / 2) + 1].min() >= 0.99, curve


def test_cli_refuses_a_run_without_reference(small, tmp_path, capsys):
    from cryodask.cli import main

    paths = small[3]
    assert main(["refine3d", "--i", str(paths["particles"]), "--o", str(tmp_path / "run")]) == 2
    err = capsys.readouterr().err.strip()
    assert err.startswith("cryodask: error: --ref:") and "\n" not in err


def test_cli_refuses_a_reference_of_another_box(small, tmp_path, capsys):
    from cryodask.cli import main

    paths = small[3]
    write_map(tmp_path / "big.mrc", np.zeros((40, 40, 40), np.float32), APIX)
    assert main(["refine3d", "--i", str(paths["particles"]), "--o", str(tmp_path / "run"), "--ref",
                 str(tmp_path / "big.mrc"), "--workers", "1"]) == 2
    assert "resample" in capsys.readouterr().err


@pytest.mark.relion
def test_relion_postprocess_reads_our_half_maps(small, short_run, relion, tmp_path):
    folder = small[0]
    write_map(tmp_path / "mask.mrc", spherical_mask(BOX, 0.4 * BOX, width=3), APIX)
    subprocess.run([str(relion / "relion_postprocess"), "--i", str(folder / "A" / "run_half1_class001_unfil.mrc"),
                    "--mask", str(tmp_path / "mask.mrc"), "--angpix", str(APIX), "--o", str(tmp_path / "post")],
                   check=True, capture_output=True)
    final = float(read_star(tmp_path / "post.star")["general"]["rlnFinalResolution"])
    # RELION's masked gold-standard resolution agrees with ours (unmasked, from the accumulators)
    assert 0.7 * short_run.resolution <= final <= 1.3 * short_run.resolution, (final, short_run.resolution)


def test_norm_and_scale_recover_image_and_group_intensities(tmp_path, client):
    """--norm and --scale on images whose overall level differs per particle (x0.7 or x1.4: noise and signal)
    and whose signal differs per optics group (x1 and x0.6): rlnNormCorrection follows the particle's level and
    rlnGroupScaleCorrection the group's signal, as RELION's corrections do. The scale groups are the particles'
    rlnGroupName (here the optics group's name; RELION's default, one group per micrograph, is checked below)."""
    import dataclasses

    from cryodask.io.star import ParticleTable, write_particles

    vol = phantom(BOX, seed=0)
    clean = simulate_particles([vol], APIX, n=300, snr=0, seed=5, n_optics_groups=2)
    rng = np.random.default_rng(7)
    noise = rng.normal(0, np.sqrt(clean.images.var() / 0.3), clean.images.shape)
    group = clean.particles["rlnOpticsGroup"].to_numpy()
    signal = np.where(group == 1, 1.0, 0.6)
    level = rng.choice([0.7, 1.4], len(group))
    images = (level[:, None, None] * (signal[:, None, None] * clean.images + noise)).astype(np.float32)
    paths = write_simulation(tmp_path, dataclasses.replace(clean, images=images))
    t = read_particles(paths["particles"])
    parts = t.particles.assign(rlnGroupName=[f"optics{g}" for g in t.particles["rlnOpticsGroup"]])
    write_particles(tmp_path / "grouped.star", ParticleTable(optics=t.optics, particles=parts))
    write_map(tmp_path / "ref.mrc", low_pass_filter(vol, 30.0, APIX), APIX)
    res = refine3d(tmp_path / "grouped.star", tmp_path / "run", tmp_path / "ref.mrc", healpix_order=1, iter=3,
                   norm=True, scale=True, client=client, **COMMON)
    data = res.data
    norm = data["rlnNormCorrection"].to_numpy()
    ratio = np.median(norm[level == 1.4]) / np.median(norm[level == 0.7])
    assert 1.8 <= ratio <= 2.2, ratio
    model = read_star(tmp_path / "run_model.star")
    groups = model["model_groups"]
    assert list(groups["rlnGroupName"]) == ["optics1", "optics2"] and groups["rlnGroupNrParticles"].sum() > 0
    scale = groups["rlnGroupScaleCorrection"].to_numpy()
    assert 0.5 <= scale[1] / scale[0] <= 0.7, scale
    assert np.array_equal(data["rlnGroupNumber"].to_numpy(), data["rlnOpticsGroup"].to_numpy())
    assert float(model["model_general"]["rlnNormCorrectionAverage"]) == pytest.approx(norm.mean(), rel=0.05)
    opt = read_star(tmp_path / "run_it003_optimiser.star")["optimiser_general"]
    assert int(opt["rlnDoCorrectNorm"]) == 1 and int(opt["rlnDoCorrectScale"]) == 1
    mask = spherical_mask(BOX, 0.4 * BOX, width=3)
    # the map is sound with both corrections on: FSC against the truth >= 0.5 to shell 8 (20 Å) after 3 iterations
    assert resolution_at(fsc(res.map, vol, mask=mask), 0.5, APIX) <= 20.0


@pytest.mark.timeout(300)  # a job not refused would wait on a paused worker
def test_refused_before_starting_when_a_worker_cannot_hold_the_job(small, tmp_path):
    """The memory pre-flight: a worker limit too small for the job even with one particle per task is refused
    before anything is written, naming the fixes."""
    from distributed import Client, LocalCluster

    from cryodask.errors import UserError

    folder, _, _, paths = small
    with LocalCluster(n_workers=1, threads_per_worker=1, processes=False, memory_limit="12MB",
                      dashboard_address=None) as cluster, Client(cluster) as client:
        with pytest.raises(UserError, match="[EM]-step of refine3d") as e:
            refine3d(paths["particles"], tmp_path / "run", folder / "ref.mrc", healpix_order=1, client=client,
                     **{**COMMON, "pool": None})
    assert "--pad 1" in str(e.value) and "more memory" in str(e.value)
    assert not list(tmp_path.glob("run_it*"))


def test_coarse_projections_are_made_once_per_worker_and_reference(tmp_path):
    """A global search's chunk tasks share one reference's coarse projections (cached per process), and a
    changed map, grid or pixel set, or another iteration's references, make new ones."""
    from cryodask.em import iteration
    from cryodask.geometry.healpix import healpix_sampling
    from cryodask.ops.project import slice_pixels

    vol = phantom(BOX, seed=3).astype(np.float32)
    paths = [tmp_path / "half1.mrc", tmp_path / "half2.mrc"]
    for p, v in zip(paths, (vol, 0.5 * vol), strict=True):
        write_map(p, v, APIX)
    _, kx, ky = slice_pixels(BOX, 6.0)
    mats = healpix_sampling(1, psi_step=30.0).orientations().matrices(np.float32)
    projs = [iteration.load_projector(str(p), pad=2, r_max=8.0) for p in paths]
    iteration.retain_coarse_projections([])
    first = [iteration.coarse_projections(str(p), q, mats, kx, ky, keep=2) for p, q in zip(paths, projs, strict=True)]
    again = [iteration.coarse_projections(str(p), q, mats, kx, ky, keep=2) for p, q in zip(paths, projs, strict=True)]
    assert all(a is b for a, b in zip(first, again, strict=True))  # both halves stay cached
    np.testing.assert_array_equal(first[0], projs[0].sample(mats, kx, ky))
    np.testing.assert_allclose(first[1], 0.5 * first[0], rtol=1e-5, atol=1e-6)
    assert not first[0].flags.writeable  # shared between tasks: nobody may change it
    other = iteration.coarse_projections(str(paths[0]), projs[0], mats[::-1].copy(), kx, ky, keep=2)
    assert other is not first[0] and np.array_equal(other, first[0][::-1])
    write_map(paths[0], 2 * vol, APIX)  # the next iteration's map under the same name
    newer = iteration.coarse_projections(str(paths[0]), iteration.load_projector(str(paths[0]), pad=2, r_max=8.0),
                                         mats, kx, ky, keep=2)
    np.testing.assert_allclose(newer, 2 * first[0], rtol=1e-5, atol=1e-6)
    iteration.retain_coarse_projections([str(paths[1])])  # local searches or another job: the rest goes
    assert all(k[0] == str(paths[1].resolve()) for k in iteration._COARSE)
    iteration.retain_coarse_projections([])
    assert not iteration._COARSE


# A RELION 3.1 auto-refine (mpirun -n 3 relion_refine_mpi, 3,000 simulated particles at box 128, 1.5 Å/px,
# --healpix_order 2 --offset_step 2 --auto_local_healpix_order 4) wrote these per iteration in its
# _it0NN_optimiser.star, _sampling.star and _half1_model.star files: HEALPix order, rlnCurrentResolution (Å),
# rlnOverallAccuracyRotations, rlnChangesOptimalOrientations, rlnChangesOptimalOffsets (Å), and the two
# counters rlnNumberOfIterWithoutResolutionGain / rlnNumberOfIterWithoutChangingAssignments.
# Iteration 14 found the sampling fine enough (0.47° < 0.75 × 1.14°) and ran at order 6 again; it converged
# after it (iteration 15 was the final, joined one).
_RELION_AUTO_REFINE = [
    (2, 32.0, 999.0, 90.066031, 4.444721, 1, 0),
    (2, 12.0, 9.43, 30.466552, 1.695019, 0, 0),
    (2, 12.0, 2.582, 6.901115, 1.142988, 1, 0),
    (2, 12.8, 1.627, 5.278784, 0.852396, 2, 0),
    (2, 12.8, 1.604, 5.544744, 0.914342, 3, 1),
    (3, 12.0, 1.559, 4.125784, 0.646032, 0, 0),
    (3, 12.0, 1.332, 2.510488, 0.338015, 1, 1),
    (4, 11.294118, 1.242, 1.869427, 0.285993, 0, 0),
    (4, 11.294118, 1.176, 1.076790, 0.203498, 1, 1),
    (5, 11.294118, 1.150, 0.841315, 0.226311, 1, 0),
    (5, 11.294118, 1.144, 0.545080, 0.213218, 2, 1),
    (6, 11.294118, 1.162, 0.375295, 0.198296, 1, 0),
    (6, 11.294118, 1.142, 0.286831, 0.150142, 2, 1),
    (6, 11.294118, 1.172, 0.290419, 0.213190, 3, 2),
]


def test_convergence_counters_and_sampling_follow_relions_mpi_run():
    """Fed RELION's own resolutions and hidden-variable changes, the counters, the HEALPix order of every
    iteration and the iteration it converges after are RELION's. Judging changes against the *current*
    sampling step (what RELION's sequential code reads as) stays at each order twice as long: it counts
    iteration 7's fall from 4.13° to 2.51° as large (0.67 of 3.75°), where RELION's MPI leader, which never
    updates its own sampling, compares with the 7.5° step of order 2 and counts the iteration as stalled."""
    from cryodask.em.refine3d import _check_convergence, _count_stalled_iterations, _update_angular_sampling
    from cryodask.em.state import OptimiserState

    apix = 1.5
    st = OptimiserState(healpix_order=2, healpix_order_original=2, offset_step=2.0, offset_step_original=2.0,
                        offset_range=6.0, psi_step=7.5, auto_local_healpix_order=4, n_iterations=999)
    resolution_before = 30.0  # --ini_high
    orders, counters, fine_enough = [], [], []
    for it, (order, res, acc_rot, ch_ori, ch_off, wo_res, wo_large) in enumerate(_RELION_AUTO_REFINE, start=1):
        st.iteration = it - 1
        _check_convergence(st)
        assert not st.do_join_random_halves, f"converged before iteration {it}"
        st.acc_rot = acc_rot  # estimated at the start of the iteration, before the sampling is updated
        _update_angular_sampling(st, apix)
        orders.append(st.healpix_order)
        fine_enough.append(st.has_fine_enough_angular_sampling)
        _count_stalled_iterations(st, 1 / res, 1 / resolution_before, ch_ori, ch_off, apix)
        resolution_before = res
        counters.append((st.nr_iter_wo_resol_gain, st.nr_iter_wo_large_hidden_variable_changes))
    assert orders == [row[0] for row in _RELION_AUTO_REFINE]
    assert counters == [row[5:] for row in _RELION_AUTO_REFINE]
    assert fine_enough == [False] * 13 + [True]  # iteration 14: 0.47° < 0.75 × its own 1.172°
    st.iteration = len(_RELION_AUTO_REFINE)
    _check_convergence(st)
    assert st.has_converged and st.do_join_random_halves


def test_translational_sampling_follows_relions_updates():
    """RELION's offset step and range at each order raise of the run above (its _sampling.star files, Å), from
    its accuracy (rlnOverallAccuracyTranslationsAngst of the new iteration) and the last iteration's RMS
    change in offsets: the range is halved at order 3 (4.57 Å > 4 steps), floored at 1.5 steps at order 5,
    and at order 6 the step would coarsen, so both stay."""
    from cryodask.em.refine3d import _raise_sampling
    from cryodask.em.state import OptimiserState

    apix = 1.5
    st = OptimiserState(healpix_order=2, offset_step=2.0, offset_range=6.0, auto_local_healpix_order=4)
    relion = [  # (acc_trans Å, previous change in offsets Å) -> (offset step Å, offset range Å)
        ((0.750, 0.914342), (1.125, 2.285855)),
        ((0.651, 0.338015), (0.9765, 1.690073)),
        ((0.606, 0.203498), (0.909, 1.3635)),
        ((0.612, 0.213218), (0.909, 1.3635)),
    ]
    for (acc_trans, change), (step, rng) in relion:
        st.acc_trans = acc_trans
        _raise_sampling(st, change, apix)
        assert st.offset_step * apix == pytest.approx(step, abs=1e-4)
        assert st.offset_range * apix == pytest.approx(rng, abs=1e-4)
    assert st.healpix_order == 6 and st.local_searches
