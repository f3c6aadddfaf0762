"""cryodask.io.star on generated files: round trips, formatting, layouts, and every bad-input case."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pandas as pd
import pytest

from cryodask.errors import UserError
from cryodask.io.star import (
    ParticleTable,
    _float_rows,
    check_ctf_columns,
    label_type,
    read_particles,
    read_star,
    write_particles,
    write_star,
)


def _table(rng: np.random.Generator, n: int = 200) -> ParticleTable:
    du = rng.uniform(5000, 30000, n)
    parts = pd.DataFrame({
        "rlnImageName": pd.Series([f"{i + 1:06d}@Extract/job007/mic_{i // 50:03d}.mrcs" for i in range(n)], dtype=str),
        "rlnMicrographName": pd.Series([f"MotionCorr/mic_{i // 50:03d}.mrc" for i in range(n)], dtype=str),
        "rlnCoordinateX": rng.integers(0, 4096, n).astype(float),
        "rlnDefocusU": du,
        "rlnDefocusV": du - rng.uniform(0, 500, n),
        "rlnDefocusAngle": rng.uniform(-180, 180, n),
        "rlnAngleRot": rng.uniform(-180, 180, n),
        "rlnAngleTilt": rng.uniform(0, 180, n),
        "rlnAnglePsi": rng.uniform(-180, 180, n),
        "rlnOriginXAngst": rng.normal(0, 3, n),
        "rlnOriginYAngst": rng.normal(0, 1e-3, n),  # many small values: more decimals or %e
        "rlnLogLikeliContribution": rng.normal(2.5e5, 1e3, n),
        "rlnMaxValueProbDistribution": 10.0 ** rng.uniform(-9, 0, n),
        "rlnNormCorrection": 10.0 ** rng.uniform(-3, 12, n) * rng.choice([-1, 1], n),
        "rlnClassNumber": rng.integers(1, 5, n),
        "rlnRandomSubset": rng.integers(1, 3, n),
        "rlnOpticsGroup": rng.integers(1, 3, n),
        "myUnknownInts": rng.integers(-10**12, 10**12, n),
    })
    optics = pd.DataFrame({
        "rlnOpticsGroup": [1, 2], "rlnOpticsGroupName": ["opticsGroup1", "group two"],
        "rlnVoltage": [300.0, 200.0], "rlnSphericalAberration": [2.7, 0.01], "rlnAmplitudeContrast": [0.1, 0.07],
        "rlnImagePixelSize": [1.06, 1.06], "rlnImageSize": [256, 256], "rlnImageDimensionality": [2, 2],
    })
    return ParticleTable(optics=optics, particles=parts)


def _same(a: pd.DataFrame, b: pd.DataFrame) -> None:
    assert list(a.columns) == list(b.columns)
    for c in a.columns:
        x, y = a[c], b[c]
        if x.dtype.kind == "f":
            assert y.dtype == np.float64, c
            np.testing.assert_allclose(y, x, rtol=1e-6, atol=0, err_msg=c)
        elif x.dtype.kind in "iu":
            assert y.dtype == np.int64, c
            np.testing.assert_array_equal(y, x, err_msg=c)
        else:
            assert x.astype(str).tolist() == y.astype(str).tolist(), c


def test_particles_round_trip(tmp_path, rng):
    t = _table(rng)
    write_particles(tmp_path / "p.star", t)
    text = (tmp_path / "p.star").read_text()
    lines = text.splitlines()
    assert lines[0] == "# version 30001"
    assert text.index("data_optics") < text.index("data_particles")
    assert "_rlnOpticsGroup #1 \n_rlnOpticsGroupName #2 \n" in text and "_myUnknownInts #18 \n" in text
    assert '"group two"' in text  # a name with a space is quoted
    back = read_particles(tmp_path / "p.star")
    assert back.version == "30001" and back.source == tmp_path / "p.star"
    _same(t.particles, back.particles)
    _same(t.optics, back.optics)
    assert back.pixel_size() == 1.06 and back.box_size() == 256
    check_ctf_columns(back)


@pytest.mark.parametrize("value, text", [
    (0.0, "0.000000"), (1.0, "1.000000"), (-1.0, "-1.000000"), (13108.082418, "13108.082418"),
    (258678.9, "258678.900000"), (0.5, "0.5000000"), (-0.64686, "-0.6468600"), (0.019324, "0.01932400"),
    (1e-4, "0.0001000000"), (9.99e-5, "9.990000e-05"), (1.7300412e-7, "1.730041e-07"), (-3.2e-12, "-3.200000e-12"),
    (1e8, "1.000000e+08"), (99999999.5, "99999999.500000"), (0.99999996, "1.0000000"), (np.nan, "nan"),
    (np.inf, "inf"), (-np.inf, "-inf"), (123.4567894, "123.456789"), (-0.0, "0.000000"),
])
def test_float_text(value, text):
    m = _float_rows(np.array([value, 1.5, 10.0 ** 5]))  # with neighbours: right-aligned in one column
    col = np.ascontiguousarray(m.T).view(f"S{m.shape[0]}").ravel()
    assert col[0].decode().strip() == text
    assert len({len(c) for c in col}) == 1


def test_float_precision(tmp_path, rng):
    x = np.concatenate([10.0 ** rng.uniform(-12, 14, 3000) * rng.choice([-1, 1], 3000), [0.0, 1e-300, 1e300]])
    write_star(tmp_path / "f.star", {"v": pd.DataFrame({"rlnAngleRot": x})})
    y = read_star(tmp_path / "f.star")["v"]["rlnAngleRot"].to_numpy()
    np.testing.assert_allclose(y, x, rtol=5e-7, atol=0)


def test_generic_blocks_round_trip(tmp_path):
    blocks = {
        "model_general": {"rlnPixelSize": 1.25, "rlnOriginalImageSize": 150, "rlnSymmetryGroup": "C1",
                          "rlnSolventMaskName": "None", "rlnDoSplitRandomHalves": True, "myNote": "two words",
                          "rlnEmptyThing": "", "rlnLogLikelihood": 2.646715e8},
        "model_class_1": pd.DataFrame({"rlnSpectralIndex": np.arange(5), "rlnResolution": np.arange(5) / 150.0,
                                       "rlnReferenceSigma2": [1.7e-7, 3e-7, 2e-6, 1e-9, 0.0]}),
        "": {"rlnVersion": 1},
    }
    write_star(tmp_path / "m.star", blocks, comment="RELION model; version 3.1\n--o Class3D/run")
    text = (tmp_path / "m.star").read_text()
    assert text.startswith("# version 30001\n# RELION model; version 3.1\n# --o Class3D/run\n")
    assert "_myNote" in text and '"two words"' in text and '_rlnEmptyThing                ""' not in text
    assert text.count("# version 30001") == 3  # once first, then before each later block, as RELION does
    back = read_star(tmp_path / "m.star")
    assert list(back) == ["model_general", "model_class_1", ""]
    g = back["model_general"]
    assert g == {"rlnPixelSize": 1.25, "rlnOriginalImageSize": 150, "rlnSymmetryGroup": "C1",
                 "rlnSolventMaskName": "None", "rlnDoSplitRandomHalves": 1, "myNote": "two words", "rlnEmptyThing": "",
                 "rlnLogLikelihood": 2.646715e8}
    _same(blocks["model_class_1"], back["model_class_1"])
    assert back[""] == {"rlnVersion": 1}
    write_star(tmp_path / "n.star", {"a": {"x": 1}}, version=None)
    assert (tmp_path / "n.star").read_text().startswith("\ndata_a\n")


def test_strings_that_need_quotes(tmp_path):
    names = ["plain", "with space", "", "tab\there", "#hash", '"quoted"', "it's", "data_x.mrc", "ünïcode.mrc"]
    df = pd.DataFrame({"rlnMicrographName": pd.Series(names, dtype=str), "rlnDefocusU": np.arange(9.0)})
    write_star(tmp_path / "q.star", {"particles": df})
    back = read_star(tmp_path / "q.star")["particles"]
    assert back["rlnMicrographName"].tolist() == names
    # a one-column loop: a value starting with data_ must not end the loop
    one = pd.DataFrame({"rlnMicrographName": pd.Series(["a.mrc", "data_b.mrc", "_c", "loop_d"], dtype=str)})
    write_star(tmp_path / "one.star", {"mics": one, "next": {"rlnX": 1}})
    back = read_star(tmp_path / "one.star")
    assert back["mics"]["rlnMicrographName"].tolist() == ["a.mrc", "data_b.mrc", "_c", "loop_d"]
    assert back["next"] == {"rlnX": 1}


def test_legacy_30_to_31(tmp_path, rng):
    n = 12
    text = ["# RELION; version 3.0.8", "", "data_images", "", "loop_"]
    cols = ["rlnImageName", "rlnMicrographName", "rlnVoltage", "rlnSphericalAberration", "rlnAmplitudeContrast",
            "rlnMagnification", "rlnDetectorPixelSize", "rlnOriginX", "rlnOriginY", "rlnDefocusU", "rlnDefocusV",
            "rlnDefocusAngle", "rlnClassNumber", "rlnOriginXPrior"]
    text += [f"_{c} #{i + 1}" for i, c in enumerate(cols)]
    ox, oy = rng.normal(0, 3, n).round(4), rng.normal(0, 3, n).round(4)
    volt = np.where(np.arange(n) < 5, 300, 200)
    for i in range(n):
        text.append(f"{i + 1:06d}@stack.mrcs mic{i // 4}.mrc {volt[i]} 2.7 0.1 10000 2.5 {ox[i]} {oy[i]} "
                    f"{15000 + i} {14800 + i} {i * 3.5} {i % 3 + 1} 1.5")
    (tmp_path / "old.star").write_text("\n".join(text) + "\n")
    t = read_particles(tmp_path / "old.star")
    assert t.version == "legacy"
    assert t.optics[["rlnOpticsGroup", "rlnVoltage", "rlnImagePixelSize"]].values.tolist() == [[1, 300, 2.5],
                                                                                              [2, 200, 2.5]]
    assert t.particles["rlnOpticsGroup"].tolist() == [1] * 5 + [2] * 7
    np.testing.assert_allclose(t.particles["rlnOriginXAngst"], ox * 2.5, rtol=1e-12)  # 2.5 um / 10000x = 2.5 A
    np.testing.assert_allclose(t.particles["rlnOriginYAngst"], oy * 2.5, rtol=1e-12)
    np.testing.assert_allclose(t.particles["rlnOriginXPriorAngst"], 3.75)
    assert not {"rlnOriginX", "rlnOriginY", "rlnOriginXPrior", "rlnMagnification", "rlnVoltage"} & set(t.particles)
    write_particles(tmp_path / "new.star", t)
    assert read_star(tmp_path / "new.star", blocks=["optics"])["optics"]["rlnVoltage"].tolist() == [300, 200]
    back = read_particles(tmp_path / "new.star")
    assert back.version == "30001"
    _same(t.particles, back.particles)
    _same(t.optics, back.optics)


def test_crlf_tabs_comments_blank_lines(tmp_path, rng):
    t = _table(rng, 30)
    write_particles(tmp_path / "p.star", t)
    ref = read_particles(tmp_path / "p.star")
    text = (tmp_path / "p.star").read_text()
    (tmp_path / "crlf.star").write_bytes(text.replace("\n", "\r\n").encode())
    crlf = read_particles(tmp_path / "crlf.star")
    pd.testing.assert_frame_equal(crlf.particles, ref.particles)
    pd.testing.assert_frame_equal(crlf.optics, ref.optics)
    messy = ("# a comment first\n\n\n" + text.replace("data_particles", "# between blocks\n\n   \ndata_particles")
             .replace(" 1 ", "\t1\t").rstrip("\n \t"))  # tabs, and the last row ends the file without a newline
    (tmp_path / "messy.star").write_text(messy)
    m = read_particles(tmp_path / "messy.star")
    pd.testing.assert_frame_equal(m.particles, ref.particles)


def test_comment_and_single_quote_in_a_loop_use_the_exact_tokenizer(tmp_path):
    text = ("data_\nloop_\n_rlnMicrographName #1\n_rlnDefocusU #2\n_myLabel #3\n"
            "'a b' 1.5 x\n# a comment inside the loop\n\"c d\" 2.5 it's\n")
    (tmp_path / "s.star").write_text(text)
    d = read_star(tmp_path / "s.star")[""]
    assert d.to_dict("list") == {"rlnMicrographName": ["a b", "c d"], "rlnDefocusU": [1.5, 2.5],
                                 "myLabel": ["x", "it's"]}


def test_types_follow_relion_labels(tmp_path):
    text = ("data_p\nloop_\n_rlnClassNumber\n_rlnCoordinateX\n_rlnMicrographName\n_myInts\n_myFloats\n_myMixed\n"
            "1.0 3277 0001 5 5 a\n2 12 0002 6 6.5 7\n")
    (tmp_path / "t.star").write_text(text)
    d = read_star(tmp_path / "t.star")["p"]
    assert d.dtypes.to_dict() == {"rlnClassNumber": np.int64, "rlnCoordinateX": np.float64,
                                  "rlnMicrographName": d["rlnMicrographName"].dtype, "myInts": np.int64,
                                  "myFloats": np.float64, "myMixed": d["myMixed"].dtype}
    assert d["rlnMicrographName"].tolist() == ["0001", "0002"]  # text, leading zeros kept
    assert d["myMixed"].tolist() == ["a", "7"]
    assert label_type("rlnOpticsGroup") == "int" and label_type("rlnImageName") == "str"
    assert label_type("rlnDefocusU") == "float" and label_type("myLabel") is None


def test_ctf_check(tmp_path, rng):
    t = _table(rng, 10)
    check_ctf_columns(t)
    bad = ParticleTable(optics=t.optics, particles=t.particles.copy(), source=Path("x.star"))
    bad.particles.loc[3, "rlnDefocusV"] = np.nan
    with pytest.raises(UserError) as e:
        check_ctf_columns(bad)
    assert e.value.where == "x.star, row 4, rlnDefocusV"
    bad.particles["rlnDefocusV"] = bad.particles["rlnDefocusU"]
    bad.particles["rlnDefocusAngle"] = bad.particles["rlnDefocusAngle"].astype(object)
    bad.particles.loc[6, "rlnDefocusAngle"] = "abc"
    with pytest.raises(UserError) as e:
        check_ctf_columns(bad)
    assert e.value.where == "x.star, row 7, rlnDefocusAngle" and "'abc'" in e.value.what
    ok = ParticleTable(optics=t.optics.copy(), particles=t.particles.copy(), source=Path("x.star"))
    ok.particles["rlnOpticsGroup"] = [1] * 5 + [2] * 5
    ok.optics.loc[1, "rlnVoltage"] = 0.0
    with pytest.raises(UserError) as e:
        check_ctf_columns(ok)
    assert e.value.where == "x.star, data_optics row 2, rlnVoltage"
    ok.particles["rlnOpticsGroup"] = 1  # the bad group unused: fine
    check_ctf_columns(ok)
    ok.optics = ok.optics.drop(columns="rlnAmplitudeContrast")
    ok.optics["rlnVoltage"] = 300.0
    with pytest.raises(UserError) as e:
        check_ctf_columns(ok)
    assert e.value.where == "x.star, rlnAmplitudeContrast"
    with pytest.raises(UserError) as e:
        check_ctf_columns(ParticleTable(optics=t.optics, particles=t.particles.drop(columns="rlnDefocusU"),
                                        source=Path("x.star")))
    assert e.value.where == "x.star, rlnDefocusU"


def test_mixed_and_unknown_box(rng):
    t = _table(rng, 50)
    t.particles["rlnOpticsGroup"] = np.repeat([1, 2], 25)
    t.optics.loc[1, "rlnImageSize"] = 128
    with pytest.raises(UserError) as e:
        t.box_size()
    assert "1 (opticsGroup1): 256" in e.value.what and "2 (group two): 128" in e.value.what
    assert "re-extract" in e.value.what
    t.particles["rlnOpticsGroup"] = 1  # only group 1 in use: one box
    assert t.box_size() == 256 and t.pixel_size() == 1.06
    t.optics = t.optics.drop(columns="rlnImageSize")
    with pytest.raises(UserError):
        t.box_size()


# ------------------------------------------------------------------------- bad input


def _write(tmp_path: Path, text: str, name: str = "bad.star") -> Path:
    p = tmp_path / name
    p.write_text(text)
    return p


HEAD = ("# version 30001\n\ndata_optics\n\nloop_\n_rlnOpticsGroup #1\n_rlnOpticsGroupName #2\n_rlnVoltage #3\n"
        "_rlnImagePixelSize #4\n1 opticsGroup1 300 1.5\n\n# version 30001\n\ndata_particles\n\nloop_\n"
        "_rlnImageName #1\n_rlnDefocusU #2\n_rlnClassNumber #3\n_rlnOpticsGroup #4\n")  # rows from line 21


def test_good_head_reads(tmp_path):
    t = read_particles(_write(tmp_path, HEAD + "1@a.mrcs 1.5 1 1\n2@a.mrcs 2.5 2 1\n"))
    assert len(t) == 2 and t.particles["rlnClassNumber"].tolist() == [1, 2]


def test_missing_file_and_not_star(tmp_path):
    with pytest.raises(UserError) as e:
        read_particles(tmp_path / "nope.star")
    assert e.value.where == str(tmp_path / "nope.star") and "not found" in e.value.what
    with pytest.raises(UserError) as e:
        read_star(tmp_path)
    assert "folder" in e.value.what
    with pytest.raises(UserError) as e:
        read_star(_write(tmp_path, "hello world\nthis is text\n"))
    assert e.value.where == f"{tmp_path / 'bad.star'}, line 1" and "not a STAR file" in e.value.what
    with pytest.raises(UserError) as e:
        read_star(_write(tmp_path, "\n# only a comment\n"))
    assert "no data_ block" in e.value.what
    (tmp_path / "b.mrc").write_bytes(b"\x00\x01" * 600)
    with pytest.raises(UserError) as e:
        read_star(tmp_path / "b.mrc")
    assert "binary" in e.value.what


def test_missing_required_column(tmp_path):
    p = _write(tmp_path, HEAD.replace("_rlnImageName #1\n", "_rlnMicrographName #1\n") + "m.mrc 1.5 1 1\n")
    with pytest.raises(UserError) as e:
        read_particles(p)
    assert e.value.where == f"{p}, rlnImageName"
    assert len(read_particles(p, require=())) == 1
    with pytest.raises(UserError) as e:
        read_particles(p, require=("rlnMicrographName", "rlnAnglePsi"))
    assert e.value.where == f"{p}, rlnAnglePsi"


def test_undefined_optics_group(tmp_path):
    p = _write(tmp_path, HEAD + "1@a.mrcs 1.5 1 1\n2@a.mrcs 1.5 1 1\n3@a.mrcs 1.5 1 9\n")
    with pytest.raises(UserError) as e:
        read_particles(p)
    assert e.value.where == f"{p}, row 3, rlnOpticsGroup" and "optics group 9" in e.value.what


def test_empty_particles_loop(tmp_path):
    p = _write(tmp_path, HEAD)
    with pytest.raises(UserError) as e:
        read_particles(p)
    assert e.value.where == f"{p}, data_particles" and "no rows" in e.value.what


@pytest.mark.parametrize("rows, line", [
    ("1@a.mrcs 1.5 1 1\n2@a.mrcs 1.5 1 1 7\n", 22),   # a field too many
    ("1@a.mrcs 1.5 1 1\n2@a.mrcs 1.5 1\n3@a.mrcs 1.5 1 1\n", 22),   # a field short
    ("1@a.mrcs 1.5 1 1\n'2@a.mrcs' 1.5 1 1\n3@a.mrcs\n", 23),   # short, in the exact tokenizer
])
def test_wrong_number_of_fields(tmp_path, rows, line):
    p = _write(tmp_path, HEAD + rows)
    with pytest.raises(UserError) as e:
        read_particles(p)
    assert e.value.where == f"{p}, line {line}" and "fields" in e.value.what


def test_rows_after_a_blank_line(tmp_path):
    p = _write(tmp_path, HEAD + "1@a.mrcs 1.5 1 1\n\n2@a.mrcs 1.5 1 1\n")
    with pytest.raises(UserError) as e:
        read_particles(p)
    assert e.value.where == f"{p}, line 23" and "blank line 22" in e.value.what


def test_non_numeric_values(tmp_path):
    p = _write(tmp_path, HEAD + "1@a.mrcs 1.5 1 1\n2@a.mrcs 1,5 1 1\n")
    with pytest.raises(UserError) as e:
        read_particles(p)
    assert e.value.where == f"{p}, row 2, rlnDefocusU" and "'1,5'" in e.value.what
    p = _write(tmp_path, HEAD + "1@a.mrcs 1.5 1 1\n2@a.mrcs 2.5 1.5 1\n")
    with pytest.raises(UserError) as e:
        read_particles(p)
    assert e.value.where == f"{p}, row 2, rlnClassNumber" and "integer" in e.value.what
    p = _write(tmp_path, "data_g\n_rlnPixelSize abc\n")
    with pytest.raises(UserError) as e:
        read_star(p)
    assert e.value.where == f"{p}, line 2, rlnPixelSize"
    assert np.isnan(read_star(_write(tmp_path, HEAD + "1@a.mrcs nan 1 1\n"))["particles"]["rlnDefocusU"][0])


def test_structure_errors(tmp_path):
    cases = [
        ("data_a\n_rlnX 1\ndata_a\n_rlnX 2\n", "line 3", "twice"),
        ("data_a\nloop_\n_rlnX\n1\nloop_\n_rlnY\n2\n", "line 5", "one loop per block"),
        ("data_a\nloop_\n_rlnX\n_rlnX\n1\n", "line 4", "twice"),
        ("data_a\n_rlnX\n", "line 2", "no value"),
        ("data_a\nloop_\n\ndata_b\n", "line 2", "without column labels"),
    ]
    for text, line, what in cases:
        p = _write(tmp_path, text)
        with pytest.raises(UserError) as e:
            read_star(p)
        assert e.value.where == f"{p}, {line}" and what in e.value.what, text


def test_pixel_origins_need_a_pixel_size(tmp_path):
    p = _write(tmp_path, "data_\nloop_\n_rlnImageName\n_rlnOriginX\n1@a.mrcs 0\n2@a.mrcs 1.5\n")
    with pytest.raises(UserError) as e:
        read_particles(p)
    assert e.value.where == f"{p}, row 2, rlnOriginX" and "--angpix" in e.value.what
    t = read_particles(p, angpix=2.0)
    assert t.particles["rlnOriginXAngst"].tolist() == [0.0, 3.0]


def test_write_refuses_unknown_pixel_size(tmp_path):
    t = read_particles(_write(tmp_path, "data_\nloop_\n_rlnImageName\n1@a.mrcs\n"))
    with pytest.raises(UserError) as e:
        write_particles(tmp_path / "out.star", t)
    assert "pixel size" in e.value.what and not (tmp_path / "out.star").exists()


def test_write_is_atomic(tmp_path):
    p = tmp_path / "keep.star"
    write_star(p, {"a": {"rlnX": 1}})
    before = p.read_bytes()
    with pytest.raises(TypeError):
        write_star(p, {"a": {"rlnX": 2}, "b": 3})
    assert p.read_bytes() == before and [q.name for q in tmp_path.iterdir()] == ["keep.star"]


def test_big_loops_parse_in_pieces_the_same(tmp_path, rng, monkeypatch):
    import cryodask.io.star as star_mod

    t = _table(rng, 3000)
    t.particles["myMixed"] = pd.Series(["7"] * 2999 + ["x"], dtype=str)  # pieces disagree on text vs numbers
    t.particles["rlnMicrographName"] = pd.Series(["a.mrc"] * 1500 + ["0001"] * 1500, dtype=str)
    write_particles(tmp_path / "p.star", t)
    whole = read_particles(tmp_path / "p.star")
    monkeypatch.setattr(star_mod, "_SPLIT_BYTES", 20_000)
    monkeypatch.setattr(star_mod, "_workers", lambda: 3)
    pieces = read_particles(tmp_path / "p.star")
    pd.testing.assert_frame_equal(pieces.particles, whole.particles)
    assert pieces.particles["rlnMicrographName"].iloc[-1] == "0001"
    assert pieces.particles["myMixed"].iloc[0] == "7"
    _same(t.particles, pieces.particles)
    text = (tmp_path / "p.star").read_text()
    line = text[:text.index("002500@")].count("\n") + 1
    (tmp_path / "bad.star").write_text(text.replace("002500@", "x 002500@"))
    with pytest.raises(UserError) as e:  # an error in one piece still names its line
        read_particles(tmp_path / "bad.star")
    assert e.value.where == f"{tmp_path / 'bad.star'}, line {line}"
    first = text.index("\n", text.index("_myMixed")) + 1  # an extra field on the first row
    (tmp_path / "bad.star").write_text(text[:first] + "x " + text[first:])
    with pytest.raises(UserError) as e:
        read_particles(tmp_path / "bad.star")
    assert e.value.where.endswith(f", line {text[:first].count(chr(10)) + 1}")


def test_memory_mapped_reading(tmp_path, rng, monkeypatch):
    import cryodask.io.star as star_mod

    t = _table(rng, 500)
    write_particles(tmp_path / "p.star", t)
    ref = read_particles(tmp_path / "p.star")
    monkeypatch.setattr(star_mod, "_MMAP_BYTES", 0)  # map every file, as for big ones
    monkeypatch.setattr(star_mod, "_SPLIT_BYTES", 10_000)
    got = read_particles(tmp_path / "p.star")
    pd.testing.assert_frame_equal(got.particles, ref.particles)
    pd.testing.assert_frame_equal(got.optics, ref.optics)
    (tmp_path / "empty.star").write_bytes(b"")
    with pytest.raises(UserError):
        read_star(tmp_path / "empty.star")
    p = _write(tmp_path, HEAD + "1@a.mrcs 1.5 1 1\n2@a.mrcs 1.5 1\n")
    with pytest.raises(UserError) as e:
        read_particles(p)
    assert e.value.where == f"{p}, line 22"
