"""Parity with RELION 3.1: RELION reads what write_particles writes, and we read what RELION writes."""

from __future__ import annotations

import subprocess
from pathlib import Path

import numpy as np
import pandas as pd
import pytest

from cryodask.io.star import ParticleTable, read_particles, read_star, write_particles


def _table(n: int = 60) -> ParticleTable:
    rng = np.random.default_rng(11)
    du = rng.uniform(5000, 30000, n)
    parts = pd.DataFrame({
        "rlnImageName": pd.Series([f"{i + 1:06d}@Extract/job007/stack.mrcs" for i in range(n)], dtype=str),
        # a name with a space (quoted) and an empty one
        "rlnMicrographName": pd.Series(["mic one.mrc" if i % 3 == 0 else "" if i % 7 == 1 else f"mic{i}.mrc"
                                        for i in range(n)], dtype=str),
        "rlnCoordinateX": rng.integers(0, 4096, n).astype(float),
        "rlnDefocusU": du,
        "rlnDefocusV": du - rng.uniform(0, 500, n),
        "rlnDefocusAngle": rng.uniform(-180, 180, n),
        "rlnAngleRot": rng.uniform(-180, 180, n),
        "rlnAngleTilt": rng.uniform(0, 180, n),
        "rlnAnglePsi": rng.uniform(-180, 180, n),
        "rlnOriginXAngst": rng.normal(0, 3, n),
        "rlnOriginYAngst": rng.normal(0, 0.01, n),
        "rlnMaxValueProbDistribution": 10.0 ** rng.uniform(-8, 0, n),
        "rlnLogLikeliContribution": rng.normal(2.5e5, 1e3, n),
        "rlnClassNumber": rng.integers(1, 4, n),
        "rlnRandomSubset": rng.integers(1, 3, n),
        "rlnOpticsGroup": np.repeat([1, 2], n // 2),
    })
    optics = pd.DataFrame({
        "rlnOpticsGroup": [1, 2], "rlnOpticsGroupName": ["opticsGroup1", "second group"],
        "rlnAmplitudeContrast": [0.1, 0.07], "rlnSphericalAberration": [2.7, 0.01], "rlnVoltage": [300.0, 200.0],
        "rlnImagePixelSize": [1.06, 1.375], "rlnImageSize": [256, 200], "rlnImageDimensionality": [2, 2],
    })
    return ParticleTable(optics=optics, particles=parts)


def _handler(relion: Path, cwd: Path, *args: str) -> subprocess.CompletedProcess:
    r = subprocess.run([str(relion / "relion_star_handler"), *args], cwd=cwd, capture_output=True, text=True,
                       timeout=120)
    assert r.returncode == 0 and "ERROR" not in r.stdout + r.stderr, r.stdout + r.stderr
    return r


@pytest.mark.relion
def test_relion_reads_what_we_write(relion, tmp_path):
    t = _table()
    write_particles(tmp_path / "ours.star", t)
    # RELION parses every value (it must, to multiply) and writes the table back in its own format
    _handler(relion, tmp_path, "--i", "ours.star", "--o", "relion.star", "--operate", "rlnDefocusU",
             "--multiply_by", "2")
    back = read_particles(tmp_path / "relion.star")
    assert back.version == "30001" and len(back) == len(t)
    pd.testing.assert_frame_equal(back.optics, t.optics)  # RELION kept every optics value, names and types
    p, q = t.particles, back.particles
    assert list(q.columns) == list(p.columns)
    np.testing.assert_allclose(q["rlnDefocusU"], 2 * p["rlnDefocusU"], rtol=1e-9, atol=1e-6)
    for c in p.columns.drop(["rlnDefocusU"]):
        if p[c].dtype == np.float64:
            # RELION prints %12.6f (%12.5f when negative) or %12.6e: compare at that precision
            np.testing.assert_allclose(q[c], p[c], rtol=1e-6, atol=6e-6, err_msg=c)
        else:
            assert q[c].dtype == p[c].dtype and q[c].tolist() == p[c].tolist(), c
    assert q["rlnMicrographName"].iloc[0] == "mic one.mrc" and q["rlnMicrographName"].iloc[1] == ""
    text = (tmp_path / "relion.star").read_text()
    assert '"second group"' in text and '"mic one.mrc"' in text


@pytest.mark.relion
def test_relion_selects_on_our_integers_and_strings(relion, tmp_path):
    t = _table()
    write_particles(tmp_path / "ours.star", t)
    _handler(relion, tmp_path, "--i", "ours.star", "--o", "class2.star", "--select", "rlnClassNumber",
             "--minval", "2", "--maxval", "2")
    sel = read_particles(tmp_path / "class2.star")
    want = t.particles[t.particles["rlnClassNumber"] == 2]
    assert len(sel) == len(want) > 0
    assert sel.particles["rlnImageName"].tolist() == want["rlnImageName"].tolist()
    _handler(relion, tmp_path, "--i", "ours.star", "--o", "mic.star", "--select_by_str", "rlnMicrographName",
             "--select_include", "one")
    sel = read_particles(tmp_path / "mic.star")
    assert sel.particles["rlnMicrographName"].tolist() == ["mic one.mrc"] * int(
        (t.particles["rlnMicrographName"] == "mic one.mrc").sum())


@pytest.mark.relion
def test_relion_reads_our_conversion_of_a_30_file(relion, tmp_path):
    rows = "\n".join(f"{i + 1}@s.mrcs {300 if i < 3 else 200} 2.7 0.1 10000 2.5 {i - 2.5} {0.5 * i} 15000 14000 10"
                     for i in range(6))
    (tmp_path / "old.star").write_text(
        "data_images\nloop_\n_rlnImageName\n_rlnVoltage\n_rlnSphericalAberration\n_rlnAmplitudeContrast\n"
        "_rlnMagnification\n_rlnDetectorPixelSize\n_rlnOriginX\n_rlnOriginY\n_rlnDefocusU\n_rlnDefocusV\n"
        f"_rlnDefocusAngle\n{rows}\n")
    t = read_particles(tmp_path / "old.star")
    write_particles(tmp_path / "new.star", t)
    _handler(relion, tmp_path, "--i", "new.star", "--o", "relion.star", "--operate", "rlnOriginXAngst",
             "--multiply_by", "1")
    out = read_star(tmp_path / "relion.star")
    assert out["optics"]["rlnVoltage"].tolist() == [300, 200]
    assert out["optics"]["rlnImagePixelSize"].tolist() == [2.5, 2.5]
    np.testing.assert_allclose(out["particles"]["rlnOriginXAngst"], (np.arange(6) - 2.5) * 2.5, atol=1e-5)
    np.testing.assert_allclose(out["particles"]["rlnOriginYAngst"], 0.5 * np.arange(6) * 2.5, atol=1e-5)
