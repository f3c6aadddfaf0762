"""Model / optimiser state files: round trips and RELION's block and label names."""

from __future__ import annotations

import numpy as np
import pytest

from cryodask.em.model import Model, read_model, write_model
from cryodask.em.state import (OptimiserState, command_line_of, iteration_rng, output_name, read_optimiser,
                               write_optimiser, write_sampling)
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
