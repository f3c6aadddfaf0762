"""The README's first command: simulate, import, refine3d on a LocalCluster, print the resolutions."""

import re

import pytest

from cryodask.cli import main as cli


@pytest.mark.slow
def test_demo_refines_and_prints_sane_resolutions(tmp_path, capsys):
    assert cli(["demo", "--o", str(tmp_path / "demo"), "--n", "300", "--box", "32", "--angpix", "5",
                "--snr", "0.3", "--workers", "2"]) == 0
    out = capsys.readouterr().out
    gold = float(re.search(r"half-map FSC 0.143\): ([\d.]+) Å", out).group(1))
    truth = float(re.search(r"true map \(FSC 0.5\): ([\d.]+) Å", out).group(1))
    known = float(re.search(r"from the true poses: ([\d.]+) Å", out).group(1))
    median = float(re.search(r"median angular error: ([\d.]+)°", out).group(1))
    # Nyquist is 10 Å; a refinement that lost the poses ends beyond 25 Å on both criteria
    assert 10.0 <= gold < 20.0 and 10.0 <= truth < 20.0, out
    assert 0.7 * truth <= gold <= 1.4 * truth, (gold, truth)  # the two criteria agree for an unbiased map
    assert truth <= 1.25 * known, (truth, known)  # close to what the true poses give
    assert median < 10.0, median
    assert (tmp_path / "demo" / "particles.zarr" / "zarr.json").is_file()
    assert (tmp_path / "demo" / "Refine3D" / "run_class001.mrc").is_file()


def test_demo_refuses_too_few_particles(tmp_path, capsys):
    assert cli(["demo", "--o", str(tmp_path / "demo"), "--n", "10"]) == 2
    assert "--n" in capsys.readouterr().err
