"""refine3d's quality targets (issue 4, section 4) end to end, at the largest size CI affords.

The issue's data is box 64 with 2,000 particles (benchmarks/refine3d_quality.py runs it); here the
same kind of data is smaller: a phantom at box 32, 5 Å/px, 400 particles, SNR 0.3, CTF with a
defocus spread of 1.0-2.5 µm, two optics groups. The thresholds are the issue's:

(a) from a 30 Å low-pass of the truth: the refined map's FSC against the truth (inside a mask)
    crosses 0.5 within 10% of the resolution of the map from the true poses of the same particles
    (same half-sets); median angular error below 3 × the final angular step; few particles more
    than 30° off (RELION 3.1 leaves about 30% on such data);
(b) from a 40 Å low-pass: converges with a median angular error below 5°.
"""

from __future__ import annotations

import numpy as np
import pytest

from cryodask.analysis.fsc import fsc, resolution_at
from cryodask.em.iteration import rotation_angle_between
from cryodask.em.refine3d import refine3d
from cryodask.geometry.euler import euler_to_matrix
from cryodask.io.mrc import write_map
from cryodask.ops.filters import low_pass_filter, spherical_mask
from cryodask.simulate import phantom, simulate_particles, write_simulation

BOX, APIX, N, SNR = 32, 5.0, 400, 0.3
COMMON = dict(particle_diameter=0.8 * BOX * APIX, ctf=True, zero_mask=True, flatten_solvent=True,
              low_resol_join_halves=40.0, random_seed=3, pool=100, healpix_order=1, auto_local_healpix_order=3,
              log=None)

pytestmark = pytest.mark.slow


@pytest.fixture(scope="module")
def client():
    from cryodask.cluster.local import local_client

    with local_client(2) as c:
        yield c


@pytest.fixture(scope="module")
def data(tmp_path_factory):
    folder = tmp_path_factory.mktemp("quality")
    vol = phantom(BOX, seed=0)
    sim = simulate_particles([vol], APIX, n=N, snr=SNR, seed=1, n_optics_groups=2, defocus_min=10000.0,
                             defocus_max=25000.0)
    paths = write_simulation(folder, sim)
    for s in (30, 40):
        write_map(folder / f"ref{s}.mrc", low_pass_filter(vol, float(s), APIX), APIX)
    return folder, vol, sim, paths


def _angular_errors(data, truth):
    cols = ("rlnAngleRot", "rlnAngleTilt", "rlnAnglePsi")
    a = euler_to_matrix(*(data[c].to_numpy() for c in cols)).reshape(-1, 3, 3)
    b = euler_to_matrix(*(truth[c].to_numpy() for c in cols)).reshape(-1, 3, 3)
    return rotation_angle_between(a, b)


def test_from_30A_reaches_the_true_pose_resolution(data, client):
    from cryodask.em.known_poses import reconstruct_known_poses
    from cryodask.io.store import open_particles

    folder, vol, sim, paths = data
    res = refine3d(paths["particles"], folder / "from30" / "run", folder / "ref30.mrc", ini_high=30.0,
                   client=client, **COMMON)
    truth = sim.truth.copy()
    truth["rlnRandomSubset"] = res.data["rlnRandomSubset"].to_numpy()
    known = reconstruct_known_poses(client, open_particles(paths["particles"]), truth, ctf=True)
    mask = spherical_mask(BOX, 0.4 * BOX, width=3)
    ours = resolution_at(fsc(res.map, vol, mask=mask), 0.5, APIX, BOX, interpolate=True)
    best = resolution_at(fsc(known.full_map, vol, mask=mask), 0.5, APIX, BOX, interpolate=True)
    assert ours <= 1.10 * best, (ours, best)
    err = _angular_errors(res.data, sim.truth)
    final_step = 360.0 / (6 * 2 ** res.history[-1]["order"]) / 2
    assert np.median(err) < 3 * final_step, (np.median(err), final_step)
    assert np.mean(err > 30) < 0.05, np.mean(err > 30)  # RELION 3.1: about 0.3


def test_from_40A_converges(data, client):
    folder, vol, sim, paths = data
    res = refine3d(paths["particles"], folder / "from40" / "run", folder / "ref40.mrc", ini_high=40.0,
                   client=client, **COMMON)
    err = _angular_errors(res.data, sim.truth)
    assert np.median(err) < 5.0, np.median(err)
    assert np.mean(err > 30) < 0.05, np.mean(err > 30)
    # each iteration's _sampling.star holds the HEALPix order it ran at, as RELION's (the order rose on the way)
    from cryodask.io.star import read_star

    orders = [h["order"] for h in res.history]
    assert orders[-1] > orders[0], orders
    for h in res.history[:-1]:  # the final iteration writes run_*, not run_itNNN_*
        sampling = read_star(folder / "from40" / f"run_it{h['iteration']:03d}_sampling.star")["sampling_general"]
        assert int(sampling["rlnHealpixOrder"]) == h["order"], (h["iteration"], orders)
