"""Distributed reconstruction from known poses equals the serial one, chunk for chunk."""

import numpy as np
import pytest

from cryodask.analysis.fsc import fsc, resolution_at
from cryodask.cli import main as cli
from cryodask.cluster.local import local_client
from cryodask.em.known_poses import reconstruct_known_poses
from cryodask.io.mrc import read_map
from cryodask.io.star import read_particles
from cryodask.io.store import import_particles, open_particles
from cryodask.simulate import phantom, simulate_particles, write_simulation


@pytest.fixture(scope="module")
def dataset(tmp_path_factory):
    out = tmp_path_factory.mktemp("kp")
    vol = phantom(32, seed=0)
    data = simulate_particles([vol], 4.0, n=700, snr=0.5, seed=1, n_optics_groups=2)
    paths = write_simulation(out, data)
    store = import_particles(paths["particles"], out / "p.zarr", chunk=128)
    return out, vol, paths, store


def test_matches_serial_reconstruct_and_truth(dataset):
    out, vol, paths, store = dataset
    truth = read_particles(paths["truth"]).particles
    with local_client(2) as client:
        res = reconstruct_known_poses(client, store, truth, ctf=True)
        # the same from the STAR file directly (no store)
        res_star = reconstruct_known_poses(client, open_particles(paths["particles"], chunk=200), truth, ctf=True)
    assert store.n_chunks == 6  # several chunks went through the tree reduction
    assert cli(["reconstruct", "--i", str(paths["truth"]), "--o", str(out / "serial.mrc"), "--ctf"]) == 0
    serial, _ = read_map(out / "serial.mrc")
    scale = np.abs(serial).max()
    assert np.abs(res.full_map - serial).max() < 1e-4 * scale
    assert np.abs(res_star.full_map - serial).max() < 1e-4 * scale
    # half-maps partition the data: each is noisier than the full map but agrees with the truth
    f_full = fsc(res.full_map, vol)
    f_half = fsc(res.half_maps[0], vol)
    assert f_full[:10].min() > 0.9
    assert f_full[4:14].mean() > f_half[4:14].mean()
    gold = fsc(res.half_maps[0], res.half_maps[1])
    assert resolution_at(gold, 0.143, 4.0, 32) < 12.0


def test_halves_from_random_subset(dataset):
    out, vol, paths, store = dataset
    truth = read_particles(paths["truth"]).particles.copy()
    truth["rlnRandomSubset"] = 1  # everything in half 1: half 2 is empty
    with local_client(1) as client:
        res = reconstruct_known_poses(client, store, truth, ctf=True)
    assert np.abs(res.half_maps[1]).max() == 0
    assert np.allclose(res.half_maps[0], res.full_map, atol=1e-5 * np.abs(res.full_map).max())


def test_expected_accuracy_stops_at_the_first_angle_over_the_threshold():
    # RELION's calculateExpectedAngularErrors walks the angles up and stops at the first whose change of the
    # expected image exceeds ln 100; the batched walk must return the angle a walk over all of them finds.
    from scipy.spatial.transform import Rotation

    from cryodask.em.iteration import _ANGLE_STEPS, _expected_accuracy
    from cryodask.ops.project import Projector, slice_pixels

    rng = np.random.default_rng(3)
    box = 32
    z, y, x = np.mgrid[:box, :box, :box] - box // 2
    vol = sum(np.exp(-((x - c[0]) ** 2 + (y - c[1]) ** 2 + (z - c[2]) ** 2) / 8.0)
              for c in rng.uniform(-8, 8, size=(6, 3)))
    proj = Projector.from_map(vol.astype(np.float32), pad=2)
    flat, kx, ky = slice_pixels(box, box // 2 - 1)
    shell = np.round(np.hypot(kx, ky)).astype(np.int64)
    mats = Rotation.random(3, random_state=4).as_matrix()
    ctf = np.ones(len(flat), np.float32)
    for noise in (1e-6, 1e-4, 1e-3, 1.0):  # sharp to blunt: the angle found moves across the batches of 16
        isg = np.where(shell == 0, 0.0, 1.0 / noise)
        rng_walk = np.random.default_rng(17)
        ar = np.mean([_expected_accuracy(proj, mats[i], ctf, isg, kx, ky, rng_walk, box, 2.0)[0] for i in range(3)])
        want = []
        rng_ref = np.random.default_rng(17)
        for i in range(3):
            p0 = proj.sample(mats[[i]].astype(np.float32), kx, ky)[0]
            axis = rng_ref.standard_normal(3)
            axis /= np.linalg.norm(axis)
            pert = Rotation.from_rotvec(np.deg2rad(_ANGLE_STEPS)[:, None] * axis[None, :]).as_matrix()
            pp = proj.sample((mats[i][None] @ pert).astype(np.float32), kx, ky)
            d = (np.abs(pp - p0[None]) ** 2 * isg[None]).sum(axis=1) / 2.0
            j = np.flatnonzero(d > np.log(100.0))
            want.append(_ANGLE_STEPS[j[0]] if len(j) else _ANGLE_STEPS[-1])
        assert ar == pytest.approx(np.mean(want), rel=1e-6), noise
