"""A small EM job shared by the cluster tests (fault, locality, SLURM): class3d of a two-map mixture."""

from __future__ import annotations

from dataclasses import dataclass, field
from pathlib import Path

import numpy as np

EM_BOX, EM_APIX, EM_N = 24, 6.0, 200
#: class3d options of the shared job: 3 iterations, 8 chunks of 25 particles; oversampling 0 keeps the
#: first iteration (flat posteriors: every sample significant) as fast as the others
CLASS3D_OPTS = dict(K=2, ini_high=30.0, particle_diameter=0.8 * EM_BOX * EM_APIX, healpix_order=1, ctf=True,
                    zero_mask=True, oversampling=0, iter=3, random_seed=3, pool=25, log=None)
CHUNKS = EM_N // CLASS3D_OPTS["pool"]


@dataclass
class EMData:
    particles: Path
    reference: Path


@dataclass
class Class3DRun:
    """What a class3d run gave: class maps, class of every particle, and where each task ran."""

    maps: list
    classes: np.ndarray
    task_stream: list = field(default_factory=list)


def simulate_em_data(out: Path) -> EMData:
    """200 particles (box 24) of two maps that differ in 15% of their density, and a blurred reference."""
    from cryodask.io.mrc import write_map
    from cryodask.ops.filters import low_pass_filter
    from cryodask.simulate import phantom, phantom_variant, simulate_particles, write_simulation

    a = phantom(EM_BOX, seed=0)
    b = phantom_variant(a, fraction=0.15, seed=1)
    sim = simulate_particles([a, b], EM_APIX, n=EM_N, snr=0.5, seed=2)
    paths = write_simulation(out, sim)
    write_map(out / "ref.mrc", low_pass_filter(0.5 * (a + b), 30.0, EM_APIX), EM_APIX)
    return EMData(particles=paths["particles"], reference=out / "ref.mrc")


def run_class3d(data: EMData, out: Path, **kw) -> Class3DRun:
    """The shared class3d job (``kw``: execution options or ``client``, or other class3d options)."""
    from cryodask.em.class3d import class3d

    res = class3d(data.particles, out, data.reference, **{**CLASS3D_OPTS, **kw})
    return Class3DRun(maps=[np.asarray(m) for m in res.maps], classes=res.data["rlnClassNumber"].to_numpy())


def moved_by_stealing(client) -> set[str]:
    """Keys of the tasks that the scheduler's work stealing moved to another worker (its event log)."""
    out = set()
    for _, msg in client.get_events("stealing"):
        if isinstance(msg, (tuple, list)) and msg and msg[0] in ("confirm", "reschedule"):
            out.add(str(msg[1] if msg[0] == "confirm" else msg[2]))
    return out


def assert_same_class3d(got: Class3DRun, want: Class3DRun) -> None:
    """Same class for every particle, and the class maps equal to float tolerance."""
    assert np.array_equal(got.classes, want.classes), f"{np.mean(got.classes != want.classes):.1%} differ"
    scale = max(float(np.abs(m).max()) for m in want.maps)
    assert scale > 0
    for g, w in zip(got.maps, want.maps, strict=True):
        assert np.abs(g - w).max() < 1e-5 * scale, np.abs(g - w).max() / scale
