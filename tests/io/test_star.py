"""cryodask.io.star on the real STAR files in ../shared/data/star (skipped when absent).

Every file there must parse; the asserted values were read off the files by eye
(see ../shared/data/README.md for where each file comes from).
"""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pandas as pd
import pytest

from cryodask.errors import UserError
from cryodask.io.star import check_ctf_columns, read_particles, read_star, write_particles

# file -> {block: (rows, columns) for a loop, or the number of pairs}
BLOCKS = {
    "starfile/postprocess.star": {"general": 6, "fsc": (49, 7), "guinier": (49, 3)},
    "starfile/relion_tutorial/run_it025_optimiser_2D.star": {"optimiser_general": 84},
    "starfile/relion_tutorial/run_it025_optimiser_3D.star": {"optimiser_general": 84},
    "starfile/relion_tutorial/run_it025_sampling_2D.star": {"sampling_general": 12},
    "starfile/relion_tutorial/run_it025_sampling_3D.star": {"sampling_general": 15, "sampling_directions": (192, 2)},
    "starfile/default_pipeline.star": {"pipeline_general": 1, "pipeline_processes": (31, 4),
                                       "pipeline_nodes": (74, 2), "pipeline_input_edges": (48, 2),
                                       "pipeline_output_edges": (72, 2)},
    "starfile/one_loop.star": {"": (16, 12)},
    "starfile/rln3.1_data_style.star": {"block_1": (1, 7), "block_2": (2, 5), "block_3": (2, 5)},
    "starfile/basic_single_quote.star": {"": 4},
    "starfile/basic_double_quote.star": {"": 4},
    "starfile/loop_single_quote.star": {"": (2, 8)},
    "starfile/loop_double_quote.star": {"": (2, 8)},
    "starfile/empty_loop.star": {"": (0, 1)},
    "starfile/single_line_end_of_multiblock.star": {"block_1": (2, 5), "block_2": (1, 5)},
    "starfile/single_line_middle_of_multiblock.star": {"block_1": (1, 5), "block_2": (1, 5)},
    "starfile/two_basic_blocks.star": {"block_0": 3, "block_1": 3},
    "starfile/two_single_line_loop_blocks.star": {"block_0": (1, 3), "block_1": (1, 3)},
    "cryodrgn/relion5.star": {"optics": (1, 18), "particles": (17, 26)},
    "cryodrgn/relion31.star": {"optics": (1, 9), "particles": (5, 26)},
    "cryodrgn/relion31.v2.star": {"particles": (5, 26), "optics": (1, 9)},
    "cryodrgn/relion31.6opticsgroups.star": {"optics": (6, 18), "particles": (139, 23)},
    "cryodrgn/FinalRefinement-OriginalParticles-PfCRT.star": {"images": (5, 22)},
    "cryodrgn/empiar_10076_7.star": {"": (7, 10)},
    "aspire/sample_particles_relion31.star": {"optics": (2, 8), "particles": (17, 26)},
    "aspire/sample_particles_relion30.star": {"model_class_1": (17, 29)},
    "aspire/sample_data_model.star": {"model_general": 22, "model_classes": (1, 4), "model_class_1": (76, 8),
                                      "model_groups": (1, 4), "model_group_1": (76, 3),
                                      "model_pdf_orient_class_1": (192, 1)},
    "aspire/sample_incomplete_ctf_params.star": {"model_class_1": (1, 28)},
    "aspire/rln_proj_64.star": {"particles": (5, 7)},
    "aspire/rln_proj_65.star": {"particles": (5, 7)},
    "aspire/rln_proj_64_shifted.star": {"optics": (1, 7), "particles": (4, 7)},
    "cryojax/trpv1_small_stack.star": {"optics": (1, 8), "particles": (10, 14)},
    "cryojax/test_starfile.star": {"particles": (3, 16), "optics": (1, 6)},
}


@pytest.fixture(scope="module")
def star(shared_data: Path) -> Path:
    return shared_data / "star"


def test_every_shared_star_file_is_listed(star):
    found = {str(p.relative_to(star)) for p in star.rglob("*.star")}
    assert found == set(BLOCKS)


@pytest.mark.parametrize("name", sorted(BLOCKS))
def test_blocks_parse(star, name):
    blocks = read_star(star / name)
    assert list(blocks) == list(BLOCKS[name])  # file order
    for block, want in BLOCKS[name].items():
        got = blocks[block]
        if isinstance(want, tuple):
            assert isinstance(got, pd.DataFrame) and got.shape == want
        else:
            assert isinstance(got, dict) and len(got) == want


def test_read_only_some_blocks(star):
    model = read_star(star / "aspire/sample_data_model.star", blocks=["model_class_1"])
    assert list(model) == ["model_class_1"]
    with pytest.raises(UserError) as e:
        read_star(star / "aspire/sample_data_model.star", blocks=["model_class_2"])
    assert "data_model_class_2" in e.value.what and "data_model_class_1" in e.value.what


def test_relion31(star):
    t = read_particles(star / "cryodrgn/relion31.star")
    assert t.version == "30001" and len(t) == 5
    assert t.pixel_size() == pytest.approx(2.806) and t.box_size() == 256
    p = t.particles
    assert p["rlnDefocusU"].iloc[0] == pytest.approx(13108.082418, abs=1e-9)
    assert p["rlnOriginXAngst"].tolist()[:2] == pytest.approx([0.019324, -0.25248], abs=1e-12)
    assert p["rlnLogLikeliContribution"].iloc[0] == pytest.approx(2.586789e5)
    assert p["rlnImageName"].tolist()[:2] == ["000001@relion31.mrcs", "000002@relion31.mrcs"]
    for c in ("rlnOpticsGroup", "rlnClassNumber", "rlnRandomSubset", "rlnGroupNumber", "rlnNrOfSignificantSamples"):
        assert p[c].dtype == np.int64, c
    assert p["rlnCoordinateX"].dtype == np.float64  # written 3277.000000: a RELION real, not an int
    assert t.optics["rlnOpticsGroup"].dtype == np.int64 and t.optics["rlnImageSize"].dtype == np.int64
    assert t.optics["rlnOpticsGroupName"].tolist() == ["opticsGroup1"]
    assert t.optics["rlnSphericalAberration"].iloc[0] == pytest.approx(0.01)


def test_optics_after_particles_parses_the_same(star):
    a = read_particles(star / "cryodrgn/relion31.star")
    b = read_particles(star / "cryodrgn/relion31.v2.star")
    pd.testing.assert_frame_equal(a.particles, b.particles)
    pd.testing.assert_frame_equal(a.optics, b.optics)


def test_relion5(star):
    t = read_particles(star / "cryodrgn/relion5.star")
    assert t.version == "50001" and len(t) == 17
    assert t.pixel_size() == pytest.approx(0.89) and t.box_size() == 448
    o = t.optics.iloc[0]
    assert o["rlnVoltage"] == 100 and o["rlnBeamTiltX"] == pytest.approx(0.043489)
    assert t.optics["rlnCtfDataAreCtfPremultiplied"].dtype == np.int64 and o["rlnCtfDataAreCtfPremultiplied"] == 0
    assert o["rlnOddZernike"].startswith("[0.0680480107376,")  # vectors stay text
    assert t.particles["rlnImageName"].iloc[9] == "10@toy_images_a.mrcs"
    check_ctf_columns(t)


def test_six_optics_groups(star):
    t = read_particles(star / "cryodrgn/relion31.6opticsgroups.star")
    assert t.optics["rlnOpticsGroup"].tolist() == [1, 2, 3, 4, 5, 6]
    assert t.optics["rlnImagePixelSize"].tolist() == [1.25, 1.24, 1.25, 1.25, 1.24, 1.25]
    assert t.optics["rlnSphericalAberration"].tolist() == [2.7, 2.7, 2.7, 2.6, 2.7, 2.7]
    assert t.particles["rlnOpticsGroup"].value_counts().sort_index().tolist() == [48, 29, 5, 7, 26, 24]
    per = t.particle_optics()
    assert len(per) == 139
    np.testing.assert_array_equal(per["rlnOpticsGroup"], t.particles["rlnOpticsGroup"])
    expect = np.where(np.isin(t.particles["rlnOpticsGroup"], [2, 5]), 1.24, 1.25)
    np.testing.assert_array_equal(per["rlnImagePixelSize"], expect)
    assert t.box_size() == 196  # mixed pixel sizes but one box
    with pytest.raises(UserError) as e:
        t.pixel_size()
    assert e.value.where.endswith("relion31.6opticsgroups.star, rlnImagePixelSize")
    assert "2 (opticsGroup3): 1.24" in e.value.what and "1 (opticsGroup5): 1.25" in e.value.what
    assert "rescale" in e.value.what and "re-extract" in e.value.what
    check_ctf_columns(t)


def test_relion30_pixel_origins_to_angstrom(star):
    raw = read_star(star / "cryodrgn/FinalRefinement-OriginalParticles-PfCRT.star")["images"]
    t = read_particles(star / "cryodrgn/FinalRefinement-OriginalParticles-PfCRT.star")
    assert t.version == "legacy" and len(t) == 5
    assert t.pixel_size() == pytest.approx(1.035 * 1e4 / 10000)  # rlnDetectorPixelSize [um] * 1e4 / rlnMagnification
    np.testing.assert_allclose(t.particles["rlnOriginXAngst"], raw["rlnOriginX"] * 1.035, rtol=1e-12)
    np.testing.assert_allclose(t.particles["rlnOriginYAngst"], raw["rlnOriginY"] * 1.035, rtol=1e-12)
    assert t.particles["rlnOriginXAngst"].iloc[0] == pytest.approx(-0.14063 * 1.035)
    for gone in ("rlnOriginX", "rlnOriginY", "rlnMagnification", "rlnDetectorPixelSize", "rlnVoltage"):
        assert gone not in t.particles.columns
    assert t.optics[["rlnVoltage", "rlnSphericalAberration"]].values.tolist() == [[300.0, 0.001]]
    assert t.particles["rlnOpticsGroup"].tolist() == [1] * 5
    with pytest.raises(UserError) as e:  # this file has no amplitude contrast
        check_ctf_columns(t)
    assert e.value.where.endswith("rlnAmplitudeContrast")


def test_empiar_pixel_size(star):
    t = read_particles(star / "cryodrgn/empiar_10076_7.star")
    assert t.version == "legacy"
    assert t.pixel_size() == pytest.approx(5 * 1e4 / 38168)  # 1.30999... A
    assert t.particles["rlnMicrographName"].tolist() == ["1", "2", "3", "4", "5", "6", "7"]  # a string label
    assert t.optics["rlnAmplitudeContrast"].tolist() == [0.07]
    with pytest.raises(UserError) as e:
        t.box_size()  # no rlnImageSize: the MRC reader supplies it
    assert "rlnImageSize" in e.value.where
    check_ctf_columns(t)


def test_shifted_pixel_origins_in_a_31_file(star):
    t = read_particles(star / "aspire/rln_proj_64_shifted.star")
    assert t.pixel_size() == 1.0 and t.box_size() == 64
    got = t.particles[["rlnOriginXAngst", "rlnOriginYAngst"]].values.tolist()
    assert got == [[6, 10], [10, -5], [-8, 11], [-13, -3]]
    assert "rlnOriginX" not in t.particles.columns
    assert t.optics["rlnOpticsGroupName"].tolist() == ["optics1"]


def test_31_layout_without_optics_block(star):
    t = read_particles(star / "aspire/rln_proj_64.star")
    assert t.version == "30001" and len(t) == 5
    assert t.optics["rlnOpticsGroup"].tolist() == [1]
    assert np.isnan(t.optics["rlnImagePixelSize"].iloc[0])
    with pytest.raises(UserError) as e:
        t.pixel_size()
    assert "--angpix" in e.value.what
    t = read_particles(star / "aspire/rln_proj_64.star", angpix=1.5)
    assert t.pixel_size() == 1.5
    assert t.particles["rlnAngleRot"].iloc[0] == pytest.approx(275.167758)


def test_angpix_contradicting_the_file(star):
    with pytest.raises(UserError) as e:
        read_particles(star / "cryodrgn/relion31.star", angpix=1.0)
    assert "2.806" in e.value.what and e.value.where.endswith("rlnImagePixelSize")
    assert read_particles(star / "cryodrgn/relion31.star", angpix=2.806).pixel_size() == 2.806


def test_relion30_and_31_versions_of_one_data_set(star):
    t30 = read_particles(star / "aspire/sample_particles_relion30.star")
    t31 = read_particles(star / "aspire/sample_particles_relion31.star")
    # 3.0: optics groups made from the unique voltages, numbered by first appearance
    assert t30.optics[["rlnOpticsGroup", "rlnVoltage"]].values.tolist() == [[1, 300], [2, 200]]
    assert t30.optics["rlnOpticsGroupName"].tolist() == ["opticsGroup1", "opticsGroup2"]
    assert t30.pixel_size() == pytest.approx(5.0 * 1e4 / 37369.207031)
    assert t31.optics["rlnVoltage"].tolist() == [300, 200] and t31.pixel_size() == 1.4
    np.testing.assert_array_equal(t30.particles["rlnOpticsGroup"], t31.particles["rlnOpticsGroup"])
    np.testing.assert_array_equal(t30.particles["rlnDefocusU"], t31.particles["rlnDefocusU"])
    assert "rlnImageSize" not in t31.optics.columns  # left for the MRC reader
    assert t31.optics["rlnMtfFileName"].tolist() == ["mtf_k2_200kV.star"] * 2


def test_incomplete_ctf(star):
    t = read_particles(star / "aspire/sample_incomplete_ctf_params.star")
    with pytest.raises(UserError) as e:
        check_ctf_columns(t)
    assert e.value.where.endswith("rlnVoltage") and "CTF" in e.value.what


def test_cryojax_files(star):
    t = read_particles(star / "cryojax/trpv1_small_stack.star")
    assert t.optics["rlnOpticsGroup"].tolist() == [7] and set(t.particles["rlnOpticsGroup"]) == {7}
    assert t.pixel_size() == 4.88 and t.box_size() == 48
    assert t.particles["rlnRandomSubset"].tolist() == [2, 1] * 5
    check_ctf_columns(t)
    t = read_particles(star / "cryojax/test_starfile.star")  # particles before optics, tabs, no group name
    assert t.pixel_size() == 12 and t.box_size() == 16
    assert t.optics["rlnOpticsGroupName"].tolist() == ["opticsGroup1"]
    assert t.particles["rlnImageName"].iloc[2] == "0000003@000000.mrcs"


def test_one_loop_legacy_subtomograms(star):
    t = read_particles(star / "starfile/one_loop.star")
    assert t.pixel_size() == 5.0  # 5 um / 10000x
    assert t.particles["rlnCoordinateZ"].iloc[0] == 964.5
    assert t.particles["rlnImageName"].iloc[0].startswith("F:/WM5984_180924_DCheR_minicells/")


def test_model_file(star):
    m = read_star(star / "aspire/sample_data_model.star")
    g = m["model_general"]
    assert g["rlnPixelSize"] == 1.25 and g["rlnOriginalImageSize"] == 150 and isinstance(g["rlnNrClasses"], int)
    assert g["rlnLogLikelihood"] == pytest.approx(2.646715e8)
    c1 = m["model_class_1"]
    assert len(c1) == 76 and c1["rlnSpectralIndex"].tolist() == list(range(76))
    assert c1["rlnSpectralIndex"].dtype == np.int64
    assert c1["rlnResolution"].iloc[1] == 0.005333 and c1["rlnReferenceSigma2"].iloc[0] == pytest.approx(1.730041e-7)
    assert m["model_classes"]["rlnReferenceImage"].tolist() == ["Class3D/run_001_it025_class001.mrc"]


def test_optimiser_and_sampling_files(star):
    o = read_star(star / "starfile/relion_tutorial/run_it025_optimiser_2D.star")["optimiser_general"]
    assert o["rlnOutputRootName"] == "Class2D/job006/run"
    assert o["rlnRandomSeed"] == 1601377965 and o["rlnDoZeroMask"] == 1 and isinstance(o["rlnDoZeroMask"], int)
    assert o["rlnSolventMaskName"] == "None"  # a string label: stays text
    assert o["rlnJoinHalvesUntilThisResolution"] == -1.0
    s = read_star(star / "starfile/relion_tutorial/run_it025_sampling_3D.star")
    assert s["sampling_general"]["rlnSymmetryGroup"] == "C1" and s["sampling_general"]["rlnHealpixOrder"] == 2
    assert s["sampling_general"]["rlnSamplingPerturbInstance"] == -0.36408
    assert s["sampling_directions"].iloc[0].tolist() == [45.0, 80.405932]


def test_postprocess_and_pipeline(star):
    p = read_star(star / "starfile/postprocess.star")
    assert p["general"]["rlnFinalResolution"] == 16.363636 and p["general"]["rlnMaskName"] == "mask.mrc"
    pipe = read_star(star / "starfile/default_pipeline.star")
    assert pipe["pipeline_general"] == {"rlnPipeLineJobCounter": 32}
    assert pipe["pipeline_processes"]["rlnPipeLineProcessStatus"].dtype == np.int64
    assert pipe["pipeline_processes"].iloc[0].tolist() == ["Import/job001/", "Import/movies/", 0, 2]


def test_parser_cases(star):
    for quote in ("single", "double"):
        b = read_star(star / f"starfile/basic_{quote}_quote.star")[""]
        assert b == {"no_quote_string": "noquote", "quote_string": "quote string", "whitespace_string": " ",
                     "empty_string": ""}
        loop = read_star(star / f"starfile/loop_{quote}_quote.star")[""]
        assert loop.to_dict("list") == {
            "no_quote_string": ["noquote"] * 2, "quote_string": ["quote string"] * 2,
            "whitespace_string": [" "] * 2, "empty_string": ["", ""], "number_and_string": ["4.0", "noquote"],
            "number_and_empty": ["5.0", ""], "number": [6.0, 7.0], "empty_string_and_normal_string": ["", "test"]}
    e = read_star(star / "starfile/empty_loop.star")[""]
    assert list(e.columns) == ["rlnCoordinateX"] and len(e) == 0 and e["rlnCoordinateX"].dtype == np.float64
    two = read_star(star / "starfile/two_single_line_loop_blocks.star")
    assert two["block_0"].iloc[0].tolist() == [1.0, 2.0, 3.0] and two["block_1"].iloc[0].tolist() == ["A", "B", "C"]
    end = read_star(star / "starfile/single_line_end_of_multiblock.star")["block_2"]
    assert end.iloc[0].tolist() == ["000001@0001_sum_particles.mrcs", "0001_sum.mrc", 587.0, 1268.0, -51.5227]


def test_real_files_survive_write_and_read(star, tmp_path):
    for name in ("cryodrgn/relion5.star", "cryodrgn/relion31.6opticsgroups.star",
                 "cryodrgn/FinalRefinement-OriginalParticles-PfCRT.star", "aspire/sample_particles_relion31.star"):
        t = read_particles(star / name)
        write_particles(tmp_path / "out.star", t)
        back = read_particles(tmp_path / "out.star")
        assert back.version == "30001"
        pd.testing.assert_frame_equal(back.optics, t.optics, check_exact=False, rtol=1e-6)
        pd.testing.assert_frame_equal(back.particles, t.particles, check_exact=False, rtol=1e-6)
