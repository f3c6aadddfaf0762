"""The simulator: truth kept apart, SNR as asked, mixtures labelled, and files RELION reads."""

import subprocess

import numpy as np
import pytest

from cryodask.analysis.fsc import fsc
from cryodask.cli import main as cli
from cryodask.io.mrc import read_map, read_stack
from cryodask.io.star import read_particles
from cryodask.simulate import phantom, phantom_variant, simulate_particles


def test_phantom_is_deterministic_and_asymmetric():
    a, b = phantom(32, seed=3), phantom(32, seed=3)
    assert np.array_equal(a, b)
    assert not np.allclose(phantom(32, seed=4), a)
    # no accidental inversion symmetry: the map differs from its point reflection
    assert np.corrcoef(a.ravel(), a[::-1, ::-1, ::-1].ravel())[0, 1] < 0.8


def test_variant_differs_by_about_the_asked_fraction():
    a = phantom(48, seed=0)
    b = phantom_variant(a, fraction=0.1, seed=1)
    changed = np.abs(a - b).sum() / a.sum()
    assert 0.1 <= changed <= 0.35  # removed ~10% and added it elsewhere
    assert abs(b.sum() - a.sum()) / a.sum() < 0.02


def test_snr_and_noise_level():
    vol = phantom(32, seed=0)
    clean = simulate_particles([vol], 3.0, n=200, snr=1e9, seed=5)
    noisy = simulate_particles([vol], 3.0, n=200, snr=0.25, seed=5)
    noise = noisy.images - clean.images
    ratio = clean.images.var(axis=(1, 2)).mean() / noise.var()
    assert ratio == pytest.approx(0.25, rel=0.05)
    # ground truth is not in the particle table
    assert not {"rlnAngleRot", "rlnClassNumber", "rlnOriginXAngst"} & set(noisy.particles.columns)


def test_mixture_labels_follow_fractions():
    vols = [phantom(32, seed=0), phantom(32, seed=1)]
    d = simulate_particles(vols, 3.0, n=2000, snr=1.0, seed=0, class_fractions=[0.7, 0.3])
    share = np.mean(d.truth["rlnClassNumber"].to_numpy() == 1)
    assert share == pytest.approx(0.7, abs=0.04)


def test_cli_writes_relion_files(tmp_path, relion):
    out = tmp_path / "sim"
    assert cli(["simulate", "--phantom", "32", "--angpix", "4", "--n", "600", "--snr", "100",
                "--o", str(out), "--n_optics_groups", "2", "--seed", "2"]) == 0
    table = read_particles(out / "particles.star")
    assert len(table) == 600 and len(table.optics) == 2
    assert read_stack(out / "particles.mrcs").shape == (600, 32, 32)
    # RELION reconstructs our particles from truth.star: the map must match the phantom
    subprocess.run([str(relion / "relion_reconstruct"), "--i", "truth.star", "--o", "relion.mrc", "--ctf",
                    "--angpix", "4"], cwd=out, check=True, capture_output=True)
    rec, _ = read_map(out / "relion.mrc")
    truth, _ = read_map(out / "phantom.mrc")
    curve = fsc(rec, truth)
    assert curve[: int(0.6 * 16)].min() > 0.9


def test_cli_bad_input(tmp_path, capsys):
    assert cli(["simulate", "--map", str(tmp_path / "missing.mrc"), "--n", "10", "--o", str(tmp_path)]) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and err[0].startswith("cryodask: error:") and "missing.mrc" in err[0]
