"""`cryodask reconstruct` takes a particle store as well as a STAR file, with the same result."""

import numpy as np

from cryodask.cli import main
from cryodask.io.mrc import read_map
from cryodask.io.store import import_particles
from cryodask.simulate import phantom, simulate_particles, write_simulation


def test_store_and_star_give_the_same_map(tmp_path, capsys):
    data = simulate_particles([phantom(32, seed=2)], 4.0, n=300, snr=1.0, seed=3)
    paths = write_simulation(tmp_path, data)
    import_particles(paths["truth"], tmp_path / "truth.zarr", chunk=64)  # 5 chunks, poses in its table
    for src, out in ((paths["truth"], "star.mrc"), (tmp_path / "truth.zarr", "store.mrc")):
        assert main(["reconstruct", "--i", str(src), "--o", str(tmp_path / out), "--ctf", "--subset", "-1"]) == 0
    a, _ = read_map(tmp_path / "star.mrc")
    b, _ = read_map(tmp_path / "store.mrc")
    assert np.abs(a - b).max() <= 1e-5 * np.abs(a).max()
    # a selection crosses chunk borders the same way
    assert main(["reconstruct", "--i", str(tmp_path / "truth.zarr"), "--o", str(tmp_path / "c1.mrc"),
                 "--class", "1"]) == 0
    assert main(["reconstruct", "--i", str(tmp_path / "truth.zarr"), "--o", str(tmp_path / "c2.mrc"),
                 "--class", "2"]) == 2
    err = capsys.readouterr().err
    assert err.count("cryodask: error:") == 1 and "no particles left" in err


def test_double_precision_agrees(tmp_path):
    data = simulate_particles([phantom(32, seed=2)], 4.0, n=200, snr=1.0, seed=4)
    paths = write_simulation(tmp_path, data)
    for flag, out in (([], "f32.mrc"), (["--double"], "f64.mrc")):
        assert main(["reconstruct", "--i", str(paths["truth"]), "--o", str(tmp_path / out), "--ctf", *flag]) == 0
    a, _ = read_map(tmp_path / "f32.mrc")
    b, _ = read_map(tmp_path / "f64.mrc")
    diff = np.abs(a - b).max() / np.abs(b).max()
    assert 0 < diff < 1e-4  # different arithmetic, same map
    assert main(["project", "--i", str(tmp_path / "f64.mrc"), "--ang", str(paths["truth"]),
                 "--o", str(tmp_path / "p64.mrcs"), "--double"]) == 0
