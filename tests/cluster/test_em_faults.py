"""EM jobs against lost workers and a lost driver, on LocalClusters (issue 5, sections 4 and 5).

* Locality: every chunk task runs on the worker that read its chunk, and chunk ``i`` is
  read by the same worker every iteration.
* Worker processes SIGKILLed mid-task (one scoring a chunk, one running the tree
  reduction): the job finishes with the undisturbed run's classes and maps.
* The driver SIGKILLed after an iteration's files are written: ``--continue`` from the
  last written iteration ends where an uninterrupted run ends, and no worker process
  of the killed driver is left running.
"""

from __future__ import annotations

import os
import re
import signal
import subprocess
import sys
import threading
import time
from pathlib import Path

import cloudpickle
import numpy as np
import pytest
from distributed.diagnostics.plugin import WorkerPlugin

from cryodask.cluster import execution_client
from cryodask.cluster.client import RESILIENCE

from em_jobs import CHUNKS, assert_same_class3d, run_class3d

pytestmark = [pytest.mark.timeout(300)]
# the plugin below is sent to the workers by value (they cannot import this test module)
cloudpickle.register_pickle_by_value(sys.modules[__name__])

_EXPECTATION = re.compile(r"^class3d-it(\d{3})-(\d+)-(.+)$")
_CHUNK_READ = re.compile(r"^cryodask-chunk-.+-(\d+)$")


def test_chunk_tasks_run_where_their_chunk_is(class3d_local):
    stream = class3d_local.task_stream
    reader = {t["key"]: t["worker"] for t in stream if _CHUNK_READ.match(t["key"])}
    # reads are pinned loosely (a lost worker's chunks must still be read): work stealing may move one
    stolen_reads = {t["key"] for t in stream if _CHUNK_READ.match(t["key"]) and t["stolen"]}
    kept: dict[int, set[str]] = {}
    by_iteration: dict[int, dict[int, str]] = {}
    remote = []
    for t in stream:
        m = _EXPECTATION.match(t["key"])
        if not m:
            continue
        it, n, chunk_key = int(m[1]), int(m[2]), m[3]
        assert int(_CHUNK_READ.match(chunk_key)[1]) == n
        by_iteration.setdefault(it, {})[n] = reader[chunk_key]
        if chunk_key not in stolen_reads:
            kept.setdefault(n, set()).add(reader[chunk_key])
        # a chunk whose read was stolen is scored on its planned worker (its owner), not the thief
        if t["worker"] != reader[chunk_key] and chunk_key not in stolen_reads:
            remote.append(t)
    # all iterations, every chunk scored once per iteration, on both workers
    assert sorted(by_iteration) == [1, 2, 3]
    assert all(sorted(v) == list(range(CHUNKS)) for v in by_iteration.values())
    assert len(set(by_iteration[1].values())) == 2
    # the chunk-to-worker map is the same every iteration: chunk n is read by the same worker (reads that
    # work stealing moved aside: few)
    assert all(len(w) == 1 for w in kept.values()), kept
    assert len(stolen_reads) <= CHUNKS // 4, sorted(stolen_reads)
    # a scoring task runs where its chunk is, unless work stealing moved it (none did, or only a few)
    assert all(t["stolen"] for t in remote), ([t["key"] for t in remote if not t["stolen"]], sorted(stolen_reads))
    assert len(remote) <= CHUNKS // 4


class MarkAndDelay(WorkerPlugin):
    """Worker plugin: when a task whose key starts with one of ``delays`` starts executing, write a marker
    file ``<pid>~<key>`` into ``folder`` and sleep that many seconds (so the test can kill the worker mid-task)."""

    name = "mark-and-delay"

    def __init__(self, folder: str, delays: dict[str, float]):
        self.folder, self.delays = folder, delays

    def transition(self, key, start, finish, **kwargs):
        if finish != "executing":
            return
        for prefix, delay in self.delays.items():
            if str(key).startswith(prefix):
                Path(self.folder, f"{os.getpid()}~{key}").touch()
                time.sleep(delay)
                return


def _markers(folder: Path, prefix: str) -> list[tuple[int, str]]:
    out = []
    for p in sorted(folder.iterdir(), key=lambda p: p.stat().st_mtime_ns):
        pid, _, key = p.name.partition("~")
        if key.startswith(prefix):
            out.append((int(pid), key))
    return out


def _alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    return True


@pytest.mark.slow
def test_class3d_survives_killed_workers(em_data, class3d_local, tmp_path):
    """SIGKILL a worker scoring chunks in iteration 1, then the worker running iteration 2's tree reduction."""
    marks = tmp_path / "marks"
    marks.mkdir()
    with execution_client(workers=2) as client:
        # the job's cluster carries the settings that let a task outlive lost workers
        assert client.run_on_scheduler(lambda dask_scheduler: dask_scheduler.allowed_failures) == \
            RESILIENCE["distributed.scheduler.allowed-failures"]
        client.register_plugin(MarkAndDelay(str(marks), {"class3d-it001-": 0.5, "class3d-sum-it002": 1.5}))
        before = set(client.scheduler_info()["workers"])
        result: dict = {}

        def job():
            try:
                result["run"] = run_class3d(em_data, tmp_path / "run", client=client)
            except BaseException as exc:  # noqa: BLE001 - asserted below
                result["error"] = exc

        thread = threading.Thread(target=job)
        thread.start()
        killed = []
        try:
            for prefix, nth in (("class3d-it001-", 3), ("class3d-sum-it002", 1)):
                t0 = time.monotonic()
                while thread.is_alive() and time.monotonic() - t0 < 120:
                    seen = [(pid, key) for pid, key in _markers(marks, prefix) if pid not in {p for p, _ in killed}]
                    if len(seen) >= nth and _alive(seen[-1][0]):
                        pid, key = seen[-1]
                        os.kill(pid, signal.SIGKILL)
                        killed.append((pid, key))
                        break
                    time.sleep(0.05)
                assert thread.is_alive(), f"the job ended before a {prefix} task could be interrupted: {result}"
        finally:
            thread.join(timeout=240)
        assert not thread.is_alive()
        assert "error" not in result, result.get("error")
        after = set(client.scheduler_info()["workers"])
    # both kills hit a task while it executed: a chunk's scoring, then a step of the tree reduction
    assert [k.split("-")[1] for _, k in killed] == ["it001", "sum"]
    assert all(not _alive(pid) for pid, _ in killed)
    assert len(after) == 2 and len(after & before) <= 1  # the nanny replaced the killed workers
    assert_same_class3d(result["run"], class3d_local)


# ---------------------------------------------------------------------------------------------
# the driver killed between iterations


CLASS2D_ARGS = ["--K", "3", "--psi_step", "30", "--offset_range", "2", "--offset_step", "1", "--ctf", "--zero_mask",
                "--particle_diameter", "115", "--pool", "50", "--random_seed", "3"]


def _children(pid: int) -> list[int]:
    """Every descendant process of ``pid`` (from /proc)."""
    parents: dict[int, int] = {}
    for d in Path("/proc").iterdir():
        if d.name.isdigit():
            try:
                parents[int(d.name)] = int((d / "stat").read_text().rsplit(")", 1)[1].split()[1])
            except (OSError, ValueError, IndexError):
                pass
    out, todo = [], [pid]
    while todo:
        p = todo.pop()
        kids = [c for c, pp in parents.items() if pp == p]
        out += kids
        todo += kids
    return out


@pytest.mark.slow
def test_class2d_driver_killed_then_continue(em_data, tmp_path):
    from cryodask.em.class2d import class2d

    exe = Path(sys.executable).parent / "cryodask"
    root = tmp_path / "killed" / "run"
    root.parent.mkdir()
    proc = subprocess.Popen([str(exe), "class2d", "--i", str(em_data.particles), "--o", str(root), "--iter", "3",
                             *CLASS2D_ARGS, "--workers", "1"], stdout=subprocess.PIPE, stderr=subprocess.STDOUT,
                            text=True)
    workers: list[int] = []
    try:
        t0 = time.monotonic()
        while proc.poll() is None and time.monotonic() - t0 < 180:
            if (root.parent / "run_it001_optimiser.star").exists():
                workers = _children(proc.pid)
                os.kill(proc.pid, signal.SIGKILL)  # the driver, right after iteration 1's files
                break
            time.sleep(0.05)
        rc = proc.wait(timeout=30)
    finally:
        if proc.poll() is None:
            proc.kill()
    assert rc == -signal.SIGKILL, proc.stdout.read()
    assert workers, "the driver had no worker processes"
    # its LocalCluster's processes see the driver gone and exit: nothing is left running
    t0 = time.monotonic()
    while [p for p in workers if _alive(p)] and time.monotonic() - t0 < 30:
        time.sleep(0.2)
    left = [p for p in workers if _alive(p)]
    for p in left:
        os.kill(p, signal.SIGKILL)
    assert not left, f"worker processes {left} outlived their killed driver"
    written = sorted(root.parent.glob("run_it*_optimiser.star"))
    assert written and written[-1].name < "run_it003_optimiser.star"
    # --continue from the last written iteration, and an uninterrupted run, on one LocalCluster
    opts = dict(K=3, psi_step=30, offset_range=2, offset_step=1, ctf=True, zero_mask=True, particle_diameter=115,
                pool=50, random_seed=3, log=None)
    with execution_client(workers=1) as client:
        cont = class2d(em_data.particles, root, iter=3, continue_from=written[-1], client=client, log=None)
        full = class2d(em_data.particles, tmp_path / "full" / "run", iter=3, client=client, **opts)
    assert np.array_equal(cont.data["rlnClassNumber"].to_numpy(), full.data["rlnClassNumber"].to_numpy())
    scale = np.abs(full.classes).max()
    assert scale > 0 and np.abs(cont.classes - full.classes).max() < 1e-4 * scale
    assert np.allclose(cont.class_fractions, full.class_fractions, atol=1e-5)
