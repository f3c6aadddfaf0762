"""An EM job on SLURM workers (the local SLURM of scripts/start-local-slurm.sh), issue 5 sections 3 and 5:
class3d with ``--cluster`` gives the LocalCluster's result with the same seed, also when SLURM takes a
worker job away (scancel) in the middle of an iteration; no job is left behind."""

from __future__ import annotations

import subprocess
import threading
import time

import pytest
from em_jobs import assert_same_class3d, run_class3d
from test_slurm import squeue
from test_slurm import test_config as slurm_config

pytestmark = [pytest.mark.slurm, pytest.mark.slow, pytest.mark.timeout(300)]


def _our_jobs(before: set[str]) -> dict[str, str]:
    """{job id: state} of the cryodask worker jobs that were not in the queue before (``before``: ids)."""
    out = {}
    for line in squeue("-o", "%i %j %t"):
        jid, name, state = line.split()
        if name.startswith("cryodask-") and jid not in before:
            out[jid] = state
    return out


def _left_after(before: set[str], timeout: float = 30.0) -> dict[str, str]:
    """The new cryodask jobs still in the queue (completing ones included) after up to ``timeout`` s."""
    t0 = time.monotonic()
    while (left := _our_jobs(before)) and time.monotonic() - t0 < timeout:
        time.sleep(0.2)
    return left


def _run_in_thread(func):
    result: dict = {}

    def target():
        try:
            result["run"] = func()
        except BaseException as exc:  # noqa: BLE001 - asserted by the caller
            result["error"] = exc

    thread = threading.Thread(target=target)
    thread.start()
    return thread, result


def test_class3d_on_slurm_equals_local(local_slurm, em_data, class3d_local, tmp_path):
    cfg = slurm_config("slurm-cpu", tmp_path, name="em", jobs=2)
    before = {ln.split()[0] for ln in squeue("-o", "%i")}
    thread, result = _run_in_thread(lambda: run_class3d(em_data, tmp_path / "run", cluster=str(cfg)))
    seen: set[str] = set()
    while thread.is_alive():  # the job's own SLURMCluster: 2 worker jobs, running while it computes
        seen |= {j for j, s in _our_jobs(before).items() if s == "R"}
        time.sleep(0.2)
    thread.join()
    assert "error" not in result, result.get("error")
    assert len(seen) == 2, seen
    assert_same_class3d(result["run"], class3d_local)
    # every worker job is gone with the job: at once nothing running or pending, soon nothing at all
    assert not {j for j, s in _our_jobs(before).items() if s in ("R", "PD")}
    assert _left_after(before) == {}


def test_class3d_survives_scancel_mid_iteration(local_slurm, em_data, class3d_local, tmp_path):
    # adapt 2..2 replaces the cancelled job; the cluster gives up on a lost job after 2 s instead of 15 s
    import yaml

    cfg = slurm_config("slurm-cpu", tmp_path, name="em-adapt", adapt={"minimum": 2, "maximum": 2})
    data = yaml.safe_load(cfg.read_text())
    data["distributed"]["deploy"] = {"lost-worker-timeout": "2s"}
    cfg.write_text(yaml.safe_dump(data))
    before = {ln.split()[0] for ln in squeue("-o", "%i")}
    root = tmp_path / "run"
    thread, result = _run_in_thread(lambda: run_class3d(em_data, root, cluster=str(cfg)))
    victim = None
    seen: set[str] = set()
    try:
        while thread.is_alive():
            running = sorted(j for j, s in _our_jobs(before).items() if s == "R")
            seen |= set(running)
            # iteration 1's files are written: iteration 2's chunk tasks are running now
            if victim is None and (tmp_path / "run_it001_optimiser.star").exists() and running:
                victim = running[0]
                subprocess.run(["scancel", victim], check=True, timeout=30)
                mid = not (tmp_path / "run_it002_optimiser.star").exists()
            time.sleep(0.1)
    finally:
        thread.join(timeout=240)
    assert "error" not in result, result.get("error")
    assert victim is not None and mid, "the job ended before a worker job could be cancelled mid-iteration"
    assert_same_class3d(result["run"], class3d_local)
    assert victim in seen and len(seen) >= 2
    # every worker job of the job is gone with it, the replacement included
    assert not {j for j, s in _our_jobs(before).items() if s in ("R", "PD")}
    assert _left_after(before) == {}
