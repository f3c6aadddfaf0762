"""Model / optimiser state files: round trips and RELION's block and label names."""

from __future__ import annotations

import numpy as np
import pytest

from cryodask.em.model import Model, read_model, write_model
from cryodask.em.state import (OptimiserState, command_line_of, iteration_rng, output_name, read_optimiser,
                               read_sampling, write_optimiser, write_sampling)
from cryodask.errors import UserError
from cryodask.io.star import read_star


def _model(rng) -> Model:
    m = Model(ori_size=32, pixel_size=4.5, n_classes=2, n_optics_groups=2, current_resolution=12.5,
              current_size=24, references=["a_class001.mrc", "a_class002.mrc"],
              class_fractions=[0.25, 0.75], sigma_offset=7.5, tau2_fudge=4.0)
    m.tau2[:] = rng.random(m.tau2.shape)
    m.fsc[:] = rng.random(m.fsc.shape)
    m.data_vs_prior[:] = rng.random(m.fsc.shape) * 100
    m.sigma2_noise[:] = rng.random(m.sigma2_noise.shape) * 1e-3
    m.acc_rot[:] = [3.5, 4.25]
    m.pdf_direction = [rng.random(12), rng.random(12)]
    m.scale[:] = [0.9, 1.1]
    return m


def test_model_round_trip_keeps_every_number(tmp_path, rng):
    m = _model(rng)
    p = tmp_path / "run_it003_model.star"
    write_model(p, m)
    r = read_model(p)
    assert (r.ori_size, r.n_classes, r.n_optics_groups, r.current_size) == (32, 2, 2, 24)
    assert r.current_resolution == pytest.approx(12.5)
    assert r.references == m.references
    np.testing.assert_allclose(r.class_fractions, [0.25, 0.75])
    for attr in ("tau2", "fsc", "data_vs_prior", "sigma2_noise"):
        np.testing.assert_allclose(getattr(r, attr), getattr(m, attr), rtol=1e-5, atol=1e-12)
    np.testing.assert_allclose(r.pdf_direction[1], m.pdf_direction[1], rtol=1e-5)
    np.testing.assert_allclose(r.scale, [0.9, 1.1])
    assert r.sigma_offset == pytest.approx(7.5) and r.tau2_fudge == 4.0


def test_model_blocks_and_labels_are_relions(tmp_path, rng, shared_data):
    p = tmp_path / "m.star"
    write_model(p, _model(rng))
    ours = read_star(p)
    assert list(ours)[:3] == ["model_general", "model_classes", "model_class_1"]
    assert "model_optics_group_2" in ours and "model_groups" in ours and "model_pdf_orient_class_2" in ours
    real = read_star(shared_data / "star" / "aspire" / "sample_data_model.star")
    # every label RELION writes in these blocks (3.0 names that 3.1 renamed aside) is in ours
    renamed = {"rlnSigmaOffsets"}
    for block in ("model_general", "model_classes", "model_class_1", "model_groups"):
        theirs = real[block]
        labels = set(theirs) if isinstance(theirs, dict) else set(theirs.columns)
        mine = set(ours[block]) if isinstance(ours[block], dict) else set(ours[block].columns)
        assert labels - renamed - {"rlnAccuracyTranslations"} <= mine, block
    assert len(ours["model_class_1"]) == 17  # shells 0..N/2


def test_optimiser_round_trip_and_command_line_first(tmp_path):
    s = OptimiserState(output_root="Refine3D/run", iteration=7, random_seed=1234, healpix_order=3,
                       offset_range=4.5, offset_step=1.5, random_perturbation=-0.31, acc_rot=2.5,
                       nr_iter_wo_resol_gain=1, has_converged=True, local_searches=True, sigma_ang=2.5)
    opt = output_name(tmp_path / "run", 7, "optimiser.star")
    smp = output_name(tmp_path / "run", 7, "sampling.star")
    write_sampling(smp, s)
    cmd = "cryodask refine3d --i particles.star --o run --ref ref.mrc --healpix_order 2"
    write_optimiser(opt, s, command_line=cmd, model_files="run_it007_half1_model.star run_it007_half2_model.star",
                    data_file="run_it007_data.star", sampling_file=str(smp))
    assert opt.read_text().splitlines()[0] == "# " + cmd
    assert command_line_of(opt) == cmd
    r, files = read_optimiser(opt)
    assert r == s
    assert files["model"].split() == ["run_it007_half1_model.star", "run_it007_half2_model.star"]
    blocks = read_star(opt)
    assert blocks["optimiser_general"]["rlnCurrentIteration"] == 7
    assert read_star(smp)["sampling_general"]["rlnHealpixOrder"] == 3


def test_optimiser_labels_match_relion(tmp_path, shared_data):
    p = tmp_path / "o.star"
    write_optimiser(p, OptimiserState(), command_line="x")
    mine = set(read_star(p)["optimiser_general"])
    theirs = read_star(shared_data / "star" / "starfile" / "relion_tutorial" / "run_it025_optimiser_3D.star")
    core = {"rlnOutputRootName", "rlnModelStarFile", "rlnExperimentalDataStarFile", "rlnOrientSamplingStarFile",
            "rlnCurrentIteration", "rlnRandomSeed", "rlnDoSplitRandomHalves", "rlnBestResolutionThusFar",
            "rlnOverallAccuracyRotations", "rlnChangesOptimalOrientations", "rlnHasConverged",
            "rlnAutoLocalSearchesHealpixOrder", "rlnNumberOfIterWithoutResolutionGain"}
    assert core <= set(theirs["optimiser_general"]) and core <= mine


def test_continue_from_missing_file_is_a_user_error(tmp_path):
    with pytest.raises(UserError, match="does not exist"):
        read_optimiser(tmp_path / "nope_optimiser.star")


def test_iteration_rng_depends_only_on_seed_and_iteration():
    a = iteration_rng(5, 3).random(4)
    assert np.array_equal(a, iteration_rng(5, 3).random(4))
    assert not np.array_equal(a, iteration_rng(5, 4).random(4))


# --- units and dimensionality of RELION 3.1's files -------------------------------------------

def test_sampling_offsets_are_written_in_angstrom_and_read_back_in_pixels(tmp_path):
    s = OptimiserState(offset_range=6.0, offset_step=2.0, offset_range_original=5.0, offset_step_original=1.5)
    p = tmp_path / "s.star"
    write_sampling(p, s, 2.5)
    pairs = read_star(p)["sampling_general"]
    assert float(pairs["rlnOffsetRange"]) == pytest.approx(15.0)
    assert float(pairs["rlnOffsetStep"]) == pytest.approx(5.0)
    assert float(pairs["rlnOffsetRangeOriginal"]) == pytest.approx(12.5)
    assert "rlnCryodaskOffsetsInPixels" not in pairs
    r = read_sampling(p, OptimiserState(), 2.5)
    assert (r.offset_range, r.offset_step, r.offset_range_original, r.offset_step_original) == \
        pytest.approx((6.0, 2.0, 5.0, 1.5))
    with pytest.raises(UserError, match="pixel size"):
        read_sampling(p, OptimiserState())
    # written without a pixel size: pixels, and the file says so
    q = tmp_path / "q.star"
    write_sampling(q, s)
    assert int(read_star(q)["sampling_general"]["rlnCryodaskOffsetsInPixels"]) == 1
    assert read_sampling(q, OptimiserState(), 2.5).offset_range == pytest.approx(6.0)


def test_relions_own_sampling_files_give_pixels(shared_data):
    folder = shared_data / "star" / "starfile" / "relion_tutorial"
    # both runs were started with --offset_range 5 --offset_step 2 (pixels; their optimiser's command line)
    three = read_sampling(folder / "run_it025_sampling_3D.star", OptimiserState(), 0.885)
    assert (three.offset_range, three.offset_step) == pytest.approx((5.0, 2.0))
    two = read_sampling(folder / "run_it025_sampling_2D.star", OptimiserState(), 3.54)
    assert (two.offset_range, two.offset_step) == pytest.approx((5.0, 2.0))
    assert two.psi_step == pytest.approx(11.25)


def test_sampling_dimensionality_and_labels_match_relion(tmp_path, shared_data):
    folder = shared_data / "star" / "starfile" / "relion_tutorial"
    for is_3d, name in ((True, "run_it025_sampling_3D.star"), (False, "run_it025_sampling_2D.star")):
        p = tmp_path / name
        write_sampling(p, OptimiserState(), 1.0, is_3d=is_3d)
        mine = read_star(p)["sampling_general"]
        theirs = read_star(folder / name)["sampling_general"]
        assert int(mine["rlnIs3DSampling"]) == int(theirs["rlnIs3DSampling"]) == int(is_3d)
        assert set(theirs) <= set(mine), set(theirs) - set(mine)


def test_read_optimiser_takes_the_pixel_size_from_its_model(tmp_path, rng):
    m = _model(rng)  # 4.5 Å/px
    model = tmp_path / "run_it002_model.star"
    write_model(model, m)
    smp = tmp_path / "run_it002_sampling.star"
    write_sampling(smp, OptimiserState(offset_range=4.0, offset_step=1.0), m.pixel_size)
    assert float(read_star(smp)["sampling_general"]["rlnOffsetRange"]) == pytest.approx(18.0)
    opt = tmp_path / "run_it002_optimiser.star"
    write_optimiser(opt, OptimiserState(iteration=2), model_files=str(model), sampling_file=str(smp))
    st, _ = read_optimiser(opt)
    assert (st.offset_range, st.offset_step) == pytest.approx((4.0, 1.0))
    st, _ = read_optimiser(opt, pixel_size=2.25)  # an explicit pixel size wins
    assert st.offset_range == pytest.approx(8.0)


def test_reference_dimensionality_2d_and_3d(tmp_path, rng):
    m = _model(rng)
    p = tmp_path / "m3.star"
    write_model(p, m)
    assert int(read_star(p)["model_general"]["rlnReferenceDimensionality"]) == 3
    assert read_model(p).reference_dimensionality == 3
    m.reference_dimensionality = 2
    q = tmp_path / "m2.star"
    write_model(q, m)
    assert int(read_star(q)["model_general"]["rlnReferenceDimensionality"]) == 2
    assert read_model(q).reference_dimensionality == 2


def test_noise_from_relions_model_group_blocks(shared_data):
    path = shared_data / "star" / "aspire" / "sample_data_model.star"
    blocks = read_star(path)
    assert "model_optics_group_1" not in blocks  # the noise is in data_model_group_1 only
    m = read_model(path)
    want = blocks["model_group_1"]["rlnSigma2Noise"].to_numpy(np.float64)
    np.testing.assert_allclose(m.sigma2_noise[0, :len(want)], want[:m.n_shells], rtol=1e-6)
    assert np.any(m.sigma2_noise > 0)


def test_noise_from_several_model_group_blocks_is_their_particle_weighted_mean(tmp_path, rng):
    from cryodask.io.star import write_star

    m = _model(rng)
    m.n_optics_groups = 1
    m.sigma2_noise = m.sigma2_noise[:1]
    m.optics_group_names = ["g1"]
    m.group_names = ["g1", "g2"]
    m.group_nr_particles = np.array([100, 300])
    p = tmp_path / "m.star"
    write_model(p, m)
    blocks = read_star(p)
    del blocks["model_optics_group_1"]
    s1, s2 = rng.random(17), rng.random(17)
    blocks["model_group_1"] = blocks["model_class_1"][["rlnSpectralIndex"]].assign(rlnSigma2Noise=s1)
    blocks["model_group_2"] = blocks["model_class_1"][["rlnSpectralIndex"]].assign(rlnSigma2Noise=s2)
    write_star(p, blocks)
    r = read_model(p)
    np.testing.assert_allclose(r.sigma2_noise[0], 0.25 * s1 + 0.75 * s2, rtol=1e-5)
