"""The job session: a stable chunk-to-worker map, lost workers' chunks moved, scratch removed at the end."""

from __future__ import annotations

import numpy as np
import pytest

from cryodask.cluster.job import execution_keywords, job_session, reassign_owners
from cryodask.errors import UserError


def test_reassign_owners_moves_only_the_lost_workers_chunks():
    owners = ["a", "a", "b", "b", "c", "c", "c"]
    new = reassign_owners(owners, ["a", "c", "d"])
    assert [n for o, n in zip(owners, new) if o != "b"] == [o for o in owners if o != "b"]
    assert new[2:4] == ["d", "d"]  # the empty newcomer first, then still the least loaded
    assert reassign_owners(owners, ["a", "b", "c"]) == owners
    with pytest.raises(ValueError):
        reassign_owners(owners, [])


def test_execution_keywords_keeps_only_set_execution_options():
    assert execution_keywords({"j": 2, "workers": None, "K": 5, "keep_scratch": False, "cluster": "local"}) == \
        {"j": 2, "cluster": "local"}


def test_bad_scratch_options_are_refused_before_a_cluster_starts():
    with pytest.raises(UserError, match="--reuse_scratch"), job_session(reuse_scratch=True):
        pass


@pytest.fixture
def store(tmp_path):
    from cryodask.io.store import import_particles
    from cryodask.simulate import phantom, simulate_particles, write_simulation

    sim = simulate_particles([phantom(16)], 4.0, n=60, snr=1.0, seed=1)
    paths = write_simulation(tmp_path / "sim", sim)
    return import_particles(paths["particles"], tmp_path / "p.zarr", chunk=10)


def _images(session, particles):
    return np.concatenate(session.client.gather(session.chunk_futures(particles)))


@pytest.mark.slow
def test_chunk_map_is_stable_and_a_lost_workers_chunks_are_restaged(store, tmp_path):
    from cryodask.cluster.scratch import job_folder

    particles = store
    want = np.concatenate([particles.read_chunk(i) for i in range(particles.n_chunks)])
    scratch = tmp_path / "scratch"
    with job_session(workers=2, name=str(tmp_path / "run"), scratch_dir=str(scratch),
                     keep_free_scratch=0) as session:
        np.testing.assert_array_equal(_images(session, particles), want)
        first = list(session.owners)
        assert len(set(first)) == 2
        np.testing.assert_array_equal(_images(session, particles), want)
        assert session.owners == first  # same worker, same chunks, every iteration
        assert job_folder(scratch, session.job_id).is_dir()
        # lose a worker: only its chunks move, and they are read (staged) again from the store
        import time

        before = set(session.workers())
        session.client.cluster.scale(1)
        deadline = time.time() + 60
        while len(session.workers()) > 1 and time.time() < deadline:
            time.sleep(0.2)
        (lost,) = before - set(session.workers())
        np.testing.assert_array_equal(_images(session, particles), want)
        live = set(session.workers())
        assert lost not in live and set(session.owners) <= live
        assert [o for o in first if o != lost] == [n for o, n in zip(first, session.owners) if o != lost]
        assert session.moved == first.count(lost)
        job = session.job_id
    assert not job_folder(scratch, job).exists()  # removed at the end (no --keep_scratch)

