"""cryodask project / reconstruct end to end: round trip, RELION parity, bad input."""

from __future__ import annotations

import subprocess

import mrcfile
import numpy as np
import pandas as pd
import pytest

from cryodask.analysis.fsc import fsc
from cryodask.cli import main
from cryodask.io.star import ParticleTable, read_particles, write_particles


def blob_phantom(box: int, rng: np.random.Generator, n_blobs: int = 8) -> np.ndarray:
    c = np.arange(box) - box // 2
    z, y, x = np.meshgrid(c, c, c, indexing="ij")
    vol = np.zeros((box,) * 3)
    for _ in range(n_blobs):
        cen = rng.uniform(-box / 5, box / 5, 3)
        s = rng.uniform(box / 40, box / 20)
        vol += rng.uniform(0.5, 1.5) * np.exp(-((x - cen[0]) ** 2 + (y - cen[1]) ** 2 + (z - cen[2]) ** 2) / (2 * s * s))
    return vol.astype(np.float32)


def write_map(path, vol, apix):
    with mrcfile.new(path, overwrite=True) as m:
        m.set_data(vol)
        m.voxel_size = apix


def write_poses(path, n, rng, apix, box, *, ctf=True, drop=()):
    rot, psi = rng.uniform(-180, 180, n), rng.uniform(-180, 180, n)
    tilt = np.rad2deg(np.arccos(rng.uniform(-1, 1, n)))
    parts = {"rlnAngleRot": rot, "rlnAngleTilt": tilt, "rlnAnglePsi": psi,
             "rlnOriginXAngst": rng.uniform(-3, 3, n) * apix, "rlnOriginYAngst": rng.uniform(-3, 3, n) * apix,
             "rlnOpticsGroup": np.ones(n, dtype=np.int64),
             "rlnImageName": [f"{i + 1:06d}@none.mrcs" for i in range(n)]}
    if ctf:
        du = rng.uniform(8000, 25000, n)
        parts.update(rlnDefocusU=du, rlnDefocusV=du - rng.uniform(0, 800, n), rlnDefocusAngle=rng.uniform(0, 180, n))
    for c in drop:
        parts.pop(c)
    optics = pd.DataFrame({"rlnOpticsGroup": [1], "rlnOpticsGroupName": ["opticsGroup1"],
                           "rlnImagePixelSize": [apix], "rlnImageSize": [box], "rlnImageDimensionality": [2],
                           "rlnVoltage": [300.0], "rlnSphericalAberration": [2.7], "rlnAmplitudeContrast": [0.1]})
    write_particles(path, ParticleTable(optics=optics, particles=pd.DataFrame(parts)))


def test_round_trip_with_ctf(tmp_path, monkeypatch, rng, capsys):
    monkeypatch.chdir(tmp_path)
    box, apix = 32, 2.0
    vol = blob_phantom(box, rng)
    write_map("map.mrc", vol, apix)
    write_poses("poses.star", 1500, rng, apix, box)
    assert main(["project", "--i", "map.mrc", "--ang", "poses.star", "--o", "proj.mrcs", "--ctf"]) == 0
    table = read_particles("proj.star")
    assert len(table) == 1500 and table.particles["rlnImageName"].iloc[4] == "000005@proj.mrcs"
    assert table.pixel_size() == apix and table.box_size() == box
    assert mrcfile.open("proj.mrcs").data.shape == (1500, box, box)
    assert main(["reconstruct", "--i", "proj.star", "--o", "back.mrc", "--ctf"]) == 0
    back = mrcfile.read("back.mrc")
    assert np.isclose(float(mrcfile.open("back.mrc").voxel_size.x), apix)
    curve = fsc(back, vol)
    assert curve[1: int(0.9 * box / 2) + 1].min() >= 0.95, curve
    # without CTF correction the CTF-modulated images give a much worse map
    assert main(["reconstruct", "--i", "proj.star", "--o", "noctf.mrc"]) == 0
    assert fsc(mrcfile.read("noctf.mrc"), vol)[3:12].mean() < 0.9
    # gridding and symmetry options run and agree with the default where the data are good
    assert main(["reconstruct", "--i", "proj.star", "--o", "grid.mrc", "--ctf", "--dont_skip_gridding",
                 "--iter", "3"]) == 0
    assert fsc(mrcfile.read("grid.mrc"), vol)[1:12].min() >= 0.95
    out = capsys.readouterr().out
    assert "1500 particles" in out


def test_single_projection_and_maxres(tmp_path, monkeypatch, rng):
    monkeypatch.chdir(tmp_path)
    box, apix = 32, 2.0
    vol = blob_phantom(box, rng)
    write_map("map.mrc", vol, apix)
    assert main(["project", "--i", "map.mrc", "--o", "one", "--rot", "0", "--tilt", "0", "--psi", "0"]) == 0
    img = mrcfile.read("one.mrcs").reshape(-1, box, box)[0]
    # rot = tilt = psi = 0 projects along z: the sum over z, up to the gridding and Fourier-disc limits
    assert np.corrcoef(img.ravel(), vol.sum(axis=0).ravel())[0, 1] > 0.999
    assert main(["project", "--i", "map.mrc", "--o", "low.mrcs", "--rot", "0", "--tilt", "0", "--psi", "0",
                 "--maxres", "8"]) == 0
    f = np.fft.rfft2(mrcfile.read("low.mrcs").reshape(-1, box, box)[0])
    ky = np.fft.fftfreq(box, 1 / box)[:, None]
    kx = np.arange(box // 2 + 1)[None, :]
    beyond = kx ** 2 + ky ** 2 > (box * apix / 8) ** 2
    assert np.abs(f[beyond]).max() < 1e-5 * np.abs(f).max()


@pytest.mark.relion
def test_parity_with_relion_tools(relion, tmp_path, monkeypatch, rng):
    monkeypatch.chdir(tmp_path)
    box, apix = 48, 1.5
    write_map("map.mrc", blob_phantom(box, rng), apix)
    write_poses("poses.star", 600, rng, apix, box)
    subprocess.run([str(relion / "relion_project"), "--i", "map.mrc", "--ang", "poses.star", "--o", "rel",
                    "--ctf", "--angpix", str(apix)], check=True, capture_output=True)
    assert main(["project", "--i", "map.mrc", "--ang", "poses.star", "--o", "ours.mrcs", "--ctf"]) == 0
    theirs, ours = mrcfile.read("rel.mrcs"), mrcfile.read("ours.mrcs")
    assert np.abs(ours - theirs).max() < 1e-4 * np.abs(theirs).max()
    # reconstruct RELION's stack with both tools (RELION 3.1 needs --skip_gridding for the direct division)
    subprocess.run([str(relion / "relion_reconstruct"), "--i", "rel.star", "--o", "rel.mrc", "--ctf",
                    "--skip_gridding"], check=True, capture_output=True)
    assert main(["reconstruct", "--i", "rel.star", "--o", "ours.mrc", "--ctf"]) == 0
    curve = fsc(mrcfile.read("ours.mrc"), mrcfile.read("rel.mrc"))
    assert curve[: int(0.9 * box / 2) + 1].min() >= 0.99, curve


def _error(capsys) -> str:
    err = capsys.readouterr().err.strip()
    assert err.startswith("cryodask: error: ") and "\n" not in err and "Traceback" not in err, err
    return err


def test_bad_input_exits_2_with_one_line(tmp_path, monkeypatch, rng, capsys):
    monkeypatch.chdir(tmp_path)
    box, apix = 16, 2.0
    write_map("map.mrc", blob_phantom(box, rng), apix)
    write_poses("notilt.star", 5, rng, apix, box, drop=("rlnAngleTilt",))
    assert main(["project", "--i", "map.mrc", "--ang", "notilt.star", "--o", "p.mrcs"]) == 2
    assert "rlnAngleTilt" in _error(capsys)
    write_poses("noctf.star", 5, rng, apix, box, ctf=False)
    assert main(["project", "--i", "map.mrc", "--ang", "noctf.star", "--o", "p.mrcs", "--ctf"]) == 2
    assert "rlnDefocusU" in _error(capsys)
    assert main(["project", "--i", "map.mrc", "--ang", "noctf.star", "--o", "p.mrcs"]) == 0
    capsys.readouterr()
    assert main(["reconstruct", "--i", "p.star", "--o", "r.mrc", "--ctf"]) == 2
    assert "rlnDefocusU" in _error(capsys)
    assert main(["reconstruct", "--i", "p.star", "--o", "r.mrc", "--sym", "X7"]) == 2
    _error(capsys)
    assert main(["reconstruct", "--i", "p.star", "--o", "r.mrc", "--subset", "1"]) == 2
    assert "rlnRandomSubset" in _error(capsys)
    write_map("flat.mrc", np.zeros((4, 16, 16), np.float32), apix)
    assert main(["project", "--i", "flat.mrc", "--ang", "noctf.star", "--o", "q.mrcs"]) == 2
    assert "cubic" in _error(capsys)
    assert main(["reconstruct", "--i", "missing.star", "--o", "r.mrc"]) == 2
    _error(capsys)
