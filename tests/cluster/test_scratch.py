"""Node-local scratch staging and the chunk-reading tasks, with real folders and real worker processes."""

from __future__ import annotations

import shutil
from collections import namedtuple
from pathlib import Path

import mrcfile
import numpy as np
import pandas as pd
import pytest
import starfile

from cryodask.cluster import scratch as sc
from cryodask.errors import UserError
from cryodask.io.store import import_particles, open_store

N, BOX, CHUNK = 40, 16, 8  # 5 chunks of 8 KB


def make_star(folder: Path, *, order=None, seed: int = 0, name: str = "particles.star") -> Path:
    rng = np.random.default_rng(seed)
    folder.mkdir(parents=True, exist_ok=True)
    images = rng.normal(size=(N, BOX, BOX)).astype(np.float32)
    with mrcfile.new(folder / "stack.mrcs", overwrite=True) as m:
        m.set_data(images)
        m.set_image_stack()
        m.voxel_size = 2.0
    idx = np.arange(N) if order is None else np.asarray(order)
    optics = pd.DataFrame({"rlnOpticsGroupName": ["g1"], "rlnOpticsGroup": [1], "rlnImagePixelSize": [2.0],
                           "rlnImageSize": [BOX], "rlnImageDimensionality": [2], "rlnVoltage": [300.0],
                           "rlnSphericalAberration": [2.7], "rlnAmplitudeContrast": [0.1]})
    particles = pd.DataFrame({"rlnImageName": [f"{k + 1:06d}@{folder / 'stack.mrcs'}" for k in idx],
                              "rlnOpticsGroup": 1})
    star = folder / name
    starfile.write({"optics": optics, "particles": particles}, star)
    return star


@pytest.fixture
def store(tmp_path):
    (tmp_path / "shared").mkdir()
    return import_particles(make_star(tmp_path / "proj"), tmp_path / "shared" / "p.zarr", chunk=CHUNK)


@pytest.fixture(scope="module")
def client():
    import dask
    from distributed import Client, LocalCluster

    # no work stealing: reads stay with the worker they are pinned to, so the counts below are exact
    with dask.config.set({"distributed.worker.daemon": False, "logging.distributed": "error",
                          "distributed.scheduler.work-stealing": False}):
        cluster = LocalCluster(n_workers=2, threads_per_worker=1, processes=True, dashboard_address=None,
                               silence_logs=40)
        with Client(cluster) as c:
            yield c
        cluster.close()


@pytest.fixture
def fresh(client):
    """The module's client with every worker's counters and preread cache emptied."""
    client.run(sc.reset_read_stats)
    client.run(sc.clear_preread_cache)
    return client


Stats = namedtuple("Stats", "per_worker total")


def stats(client) -> Stats:
    per = client.run(sc.read_stats)
    keys = {k for v in per.values() for k in v if k != "pid"}
    return Stats(per, {k: sum(v.get(k, 0) for v in per.values()) for k in keys})


# --- staging ---------------------------------------------------------------------------------------

def test_two_workers_stage_concurrently_one_copy(store, tmp_path, fresh):
    """Both worker processes stage the whole store into one scratch folder at once: one copies, one waits."""
    workers = sorted(fresh.scheduler_info()["workers"])
    futs = [fresh.submit(sc.stage, str(store.path), str(tmp_path / "scratch"), job_id="Refine3D/job001",
                         run_id="run-1", workers=[w], allow_other_workers=False, pure=False) for w in workers]
    paths = fresh.gather(futs)
    want = tmp_path / "scratch" / f"cryodask_{sc.user_name()}" / "Refine3D_job001" / "p.zarr"
    assert [Path(p) for p in paths] == [want, want]
    s = stats(fresh)
    assert s.total["copied"] == 5  # each chunk copied once in all
    assert sorted(v.get("copied", 0) for v in s.per_worker.values()) == [0, 5]  # all by whichever came first
    copy = open_store(want)
    assert copy.manifest["chunk_hashes"] == store.manifest["chunk_hashes"]
    copy.verify()  # re-hash: identical content
    assert sc.staged_chunks(want) == {0, 1, 2, 3, 4}
    assert not list(want.rglob(".*.tmp-*"))


def test_shares_add_up_and_jobs_are_separate(store, tmp_path):
    d = tmp_path / "scratch"
    a = sc.stage(store, d, job_id="job001", chunks=[0, 1], run_id="r")
    assert sc.staged_chunks(a) == {0, 1}
    assert sc.stage(store, d, job_id="job001", chunks=[3, 4], run_id="r") == a
    assert sc.staged_chunks(a) == {0, 1, 3, 4}  # a second worker's share added to the node's copy
    b = sc.stage(store, d, job_id="job002", run_id="other")
    assert a.parent.name == "job001" and b.parent.name == "job002" and a.parent.parent == b.parent.parent
    assert sc.staged_chunks(b) == {0, 1, 2, 3, 4} and sc.staged_chunks(a) == {0, 1, 3, 4}
    # a new run without --reuse_scratch copies afresh (RELION's default)
    assert sc.stage(store, d, job_id="job001", chunks=[2], run_id="r2") == a
    assert sc.staged_chunks(a) == {2}
    with pytest.raises(ValueError, match="out of range"):
        sc.stage(store, d, job_id="job001", chunks=[5], run_id="r2")


def test_reuse_matching_copy_without_copying(store, tmp_path):
    d = tmp_path / "scratch"
    sc.reset_read_stats()
    path = sc.stage(store, d, job_id="j", run_id="first")
    assert sc.read_stats()["copied"] == 5
    sc.reset_read_stats()
    assert sc.stage(store, d, job_id="j", run_id="second", reuse=True) == path
    st = sc.read_stats()
    assert st.get("copied", 0) == 0 and st["reused"] == 1
    # a damaged chunk file in the kept copy is found by its size and copied again
    f = open_store(path).chunk_file(3)
    f.write_bytes(f.read_bytes()[:-10])
    sc.reset_read_stats()
    with pytest.warns(UserWarning, match="chunk 3"):
        sc.stage(store, d, job_id="j", run_id="third", reuse=True)
    assert sc.read_stats()["copied"] == 1
    open_store(path).verify()
    # same size, other bytes: only the full check sees it
    raw = bytearray(f.read_bytes())
    raw[7] ^= 0x55
    f.write_bytes(bytes(raw))
    sc.stage(store, d, job_id="j", run_id="fourth", reuse=True)  # sizes only: not noticed
    with pytest.raises(UserError, match="chunk 3"):
        open_store(path).verify()
    with pytest.warns(UserWarning, match="chunk 3"):
        sc.stage(store, d, job_id="j", run_id="fifth", reuse=True, verify="full")
    open_store(path).verify()


def test_reuse_refuses_a_copy_of_other_data(tmp_path):
    d = tmp_path / "scratch"
    star = make_star(tmp_path / "proj")
    shared = tmp_path / "p.zarr"
    store = import_particles(star, shared, chunk=CHUNK)
    path = sc.stage(store, d, job_id="j", run_id="r1")

    # same particles, other order
    rev = make_star(tmp_path / "proj", order=np.arange(N)[::-1], name="reversed.star")
    import_particles(rev, shared, chunk=CHUNK, overwrite=True)
    with pytest.raises(UserError, match="same particles as the store .* in a different order") as e:
        sc.stage(shared, d, job_id="j", run_id="r2", reuse=True)
    assert e.value.where == str(path) and "--reuse_scratch" in e.value.what

    # other box
    import_particles(star, shared, chunk=CHUNK, new_box=8, overwrite=True)
    with pytest.raises(UserError, match="scratch copy has box 16, the store .* has box 8"):
        sc.stage(shared, d, job_id="j", run_id="r3", reuse=True)

    # other particles (a subset) and other pixels (float16)
    sub = make_star(tmp_path / "proj", name="subset.star")
    t = starfile.read(sub, always_dict=True)
    t["particles"] = t["particles"].iloc[:30]
    starfile.write(t, sub)
    import_particles(sub, shared, chunk=CHUNK, overwrite=True)
    with pytest.raises(UserError, match="scratch copy has 40 particles, the store .* has 30"):
        sc.stage(shared, d, job_id="j", run_id="r4", reuse=True)
    import_particles(star, shared, chunk=CHUNK, float16=True, overwrite=True)
    with pytest.raises(UserError, match="dtype float32, the store .* has dtype float16"):
        sc.stage(shared, d, job_id="j", run_id="r5", reuse=True)

    # without --reuse_scratch the stale copy is replaced, and then matches
    assert sc.stage(shared, d, job_id="j", run_id="r6") == path
    assert open_store(path).manifest["chunk_hashes"] == open_store(shared).manifest["chunk_hashes"]
    assert open_store(path).dtype == np.float16


def test_keep_and_cleanup(store, tmp_path):
    d = tmp_path / "scratch"
    path = sc.stage(store, d, job_id="j1", run_id="r")
    other = sc.stage(store, d, job_id="j2", run_id="r")
    assert sc.cleanup(d, "j1", keep_scratch=True) is False
    assert sc.staged_chunks(path) == {0, 1, 2, 3, 4}
    assert sc.cleanup(d, "j1") is True
    assert not path.parent.exists() and sc.staged_chunks(other) == {0, 1, 2, 3, 4}  # the other job is untouched
    assert sc.cleanup(d, "j1") is False
    assert sc.cleanup(d, "j2") is True
    assert not (d / f"cryodask_{sc.user_name()}").exists()


def test_unwritable_scratch_is_a_user_error(store, tmp_path):
    (tmp_path / "file.txt").write_text("a file, not a folder")  # fails for root too, unlike chmod
    bad = tmp_path / "file.txt" / "sub"
    with pytest.raises(UserError, match="cannot write to") as e:
        sc.stage(store, bad, job_id="j")
    assert e.value.where == f"--scratch_dir {bad}" and "--scratch_dir" in e.value.what


def test_full_scratch_refused_or_partial(store, tmp_path, monkeypatch):
    d = tmp_path / "scratch"
    free = shutil.disk_usage(tmp_path).free
    with pytest.raises(UserError, match=r"needs 40\.96 KB for 5 chunk\(s\) .*--keep_free_scratch keeps") as e:
        sc.stage(store, d, job_id="j", keep_free_gb=free / 1e9 + 1000)
    assert e.value.where.startswith("--scratch_dir")
    # partial: exactly the chunks that fit (free space pinned so that 2.5 chunks fit above 10 GB)
    usage = shutil.disk_usage(tmp_path)
    fake = usage._replace(free=int(10e9 + 2.5 * 8192))
    monkeypatch.setattr(sc.shutil, "disk_usage", lambda p: fake)
    sc.reset_read_stats()
    path = sc.stage(store, d, job_id="j", partial=True, run_id="r")
    assert sc.staged_chunks(path) == {0, 1}
    assert sc.read_stats()["not_staged"] == 3
    # the chunks not staged come from the shared store
    sc.reset_read_stats()
    for i in range(5):
        np.testing.assert_array_equal(sc.read_chunk(store.path, i, staged=path), store.read_chunk(i))
    st = sc.read_stats()
    assert (st["scratch"], st["shared"]) == (2, 3)


def test_read_falls_back_when_the_copy_is_elsewhere(store, tmp_path):
    sc.reset_read_stats()
    x = sc.read_chunk(store.path, 2, staged=tmp_path / "on-another-node" / "p.zarr")
    np.testing.assert_array_equal(x, store.read_chunk(2))
    assert sc.read_stats()["shared"] == 1


# --- the chunk tasks -----------------------------------------------------------------------------------

def test_chunk_futures_stage_then_read_from_scratch(store, tmp_path, fresh):
    futs = sc.chunk_futures(fresh, store, scratch_dir=tmp_path / "scratch", job_id="job007")
    chunks = fresh.gather(futs)
    for i, c in enumerate(chunks):
        np.testing.assert_array_equal(c, store.read_chunk(i))
    s = stats(fresh)
    assert s.total["copied"] == 5 and s.total["scratch"] == 5 and s.total.get("shared", 0) == 0
    # both workers read their own block (3 + 2 chunks), unless the scheduler moved one
    assert sum(v.get("reads", 0) for v in s.per_worker.values()) == 5
    # the next iteration of the same run copies nothing
    fresh.run(sc.reset_read_stats)
    fresh.gather(sc.chunk_futures(fresh, store, scratch_dir=tmp_path / "scratch", job_id="job007"))
    s = stats(fresh)
    assert s.total.get("copied", 0) == 0 and s.total["scratch"] == 5
    removed = sc.cleanup_workers(fresh, tmp_path / "scratch", "job007")
    assert any(removed.values()) and not (tmp_path / "scratch" / f"cryodask_{sc.user_name()}").exists()


def test_preread_serves_the_second_iteration_from_memory(store, fresh):
    first = fresh.gather(sc.chunk_futures(fresh, store, preread=True))
    s1 = stats(fresh)
    assert s1.total["reads"] == 5 and s1.total.get("cache", 0) == 0
    second = fresh.gather(sc.chunk_futures(fresh, store, preread=True))
    s2 = stats(fresh)
    assert s2.total["reads"] == 5 and s2.total["cache"] == 5  # no new disk reads
    for a, b in zip(first, second):
        np.testing.assert_array_equal(a, b)
    # without preread every iteration reads again
    fresh.run(sc.reset_read_stats)
    fresh.gather(sc.chunk_futures(fresh, store))
    fresh.gather(sc.chunk_futures(fresh, store))
    assert stats(fresh).total["reads"] == 10


def test_preread_caches_only_on_the_owner(store):
    sc.clear_preread_cache()
    sc.reset_read_stats()
    sc.read_chunk(store.path, 1, preread=True, owner="tcp://elsewhere:1")  # a moved task: not kept
    sc.read_chunk(store.path, 1, preread=True, owner="tcp://elsewhere:1")
    assert sc.read_stats()["reads"] == 2 and "cache" not in sc.read_stats()
    a = sc.read_chunk(store.path, 1, preread=True)  # outside a cluster anyone may keep it
    b = sc.read_chunk(store.path, 1, preread=True)
    assert b is a and not b.flags.writeable
    assert sc.read_stats()["cache"] == 1 and sc.clear_preread_cache() == 1


def test_no_parallel_disc_io_one_reader(store, fresh):
    futs = sc.chunk_futures(fresh, store, parallel_disc_io=False)
    chunks = fresh.gather(futs)
    for i, c in enumerate(chunks):
        np.testing.assert_array_equal(c, store.read_chunk(i))
    per = stats(fresh).per_worker
    assert sorted(v.get("reads", 0) for v in per.values()) == [0, 5]
    reader = sorted(per)[0]
    assert per[reader]["reads"] == 5
    # the chunks travel: a task pinned to the other worker uses them there
    other = sorted(per)[1]
    sums = fresh.gather([fresh.submit(np.sum, f, workers=[other], allow_other_workers=False) for f in futs])
    np.testing.assert_allclose(sums, [c.sum() for c in chunks], rtol=1e-5)
    assert stats(fresh).per_worker[other].get("reads", 0) == 0


def test_chunk_owners():
    assert sc.chunk_owners(5, ["b", "a"]) == ["a", "a", "a", "b", "b"]
    assert sc.chunk_owners(3, ["b", "a"], parallel_disc_io=False) == ["a", "a", "a"]
    assert sc.job_folder("/s", "Class3D/job012/").name == "Class3D_job012"


def test_chunk_futures_from_a_star_file(store, tmp_path, fresh):
    """A STAR file is served the same way, straight from its stacks (and cannot be staged)."""
    star = tmp_path / "proj" / "particles.star"
    futs = sc.chunk_futures(fresh, star, preread=True)
    assert len(futs) == 2  # the default for 40 particles: 32 + 8 (a small data set still makes several tasks)
    np.testing.assert_array_equal(np.concatenate(fresh.gather(futs)), np.asarray(store.images[:]))
    from cryodask.io.store import open_particles

    p = open_particles(star, chunk=CHUNK)
    first = fresh.gather(sc.chunk_futures(fresh, p, preread=True))
    again = fresh.gather(sc.chunk_futures(fresh, p, preread=True))
    for i in range(5):
        np.testing.assert_array_equal(first[i], store.read_chunk(i))
        np.testing.assert_array_equal(again[i], first[i])
    s = stats(fresh).total
    assert (s["reads"], s["cache"]) == (2 + 5, 5)
    with pytest.raises(UserError, match="STAR file: scratch holds a particle store"):
        sc.chunk_futures(fresh, p, scratch_dir=tmp_path / "scratch", job_id="j")


def test_command_line_options():
    import argparse

    p = argparse.ArgumentParser()
    sc.add_scratch_args(p)
    a = p.parse_args([])
    assert sc.scratch_options(a) == {"scratch_dir": None, "keep_free_gb": 10.0, "reuse": False, "preread": False,
                                     "parallel_disc_io": True}
    a = p.parse_args(["--scratch_dir", "/s", "--keep_free_scratch", "2.5", "--keep_scratch", "--reuse_scratch",
                      "--preread_images", "--no_parallel_disc_io"])
    assert sc.scratch_options(a) == {"scratch_dir": "/s", "keep_free_gb": 2.5, "reuse": True, "preread": True,
                                     "parallel_disc_io": False}
    assert a.keep_scratch
    with pytest.raises(UserError, match="needs --scratch_dir"):
        sc.scratch_options(p.parse_args(["--reuse_scratch"]))


def test_copy_failure_is_a_user_error(store, tmp_path, monkeypatch):
    import errno

    real = shutil.copyfile
    n = []

    def failing(src, dst, *a, **k):
        n.append(src)
        if len(n) == 7:  # 4 metadata files, then the third chunk
            raise OSError(errno.ENOSPC, "No space left on device")
        return real(src, dst, *a, **k)

    monkeypatch.setattr(sc.shutil, "copyfile", failing)
    with pytest.raises(UserError, match=r"copying the store to .* failed \(No space left on device\)"):
        sc.stage(store, tmp_path / "scratch", job_id="j", run_id="r")
    path = sc.job_folder(tmp_path / "scratch", "j") / "p.zarr"
    assert sc.staged_chunks(path) == {0, 1}  # the chunks copied whole, never the broken one
    assert not list(path.rglob(".*.tmp-*"))
    monkeypatch.setattr(sc.shutil, "copyfile", real)
    sc.reset_read_stats()
    sc.stage(store, tmp_path / "scratch", job_id="j", run_id="r")  # the same run completes the copy
    assert sc.staged_chunks(path) == {0, 1, 2, 3, 4} and sc.read_stats()["copied"] == 3
    open_store(path).verify()
