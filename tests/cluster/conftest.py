"""Fixtures for the cluster tests: a real single-node SLURM (scripts/start-local-slurm.sh)."""

from __future__ import annotations

import os
import shutil
import subprocess
from collections.abc import Iterator
from pathlib import Path

import pytest
from em_jobs import Class3DRun, EMData, moved_by_stealing, run_class3d, simulate_em_data

REPO = Path(__file__).resolve().parents[2]
IN_CI = os.environ.get("CI", "").lower() in ("1", "true", "yes")
#: what the SLURM tests declare: CPUs above the machine's (jobs oversubscribe) and 2 fake GPUs
SLURM_CPUS = 8
SLURM_GPUS = 2


def _as_root() -> list[str] | None:
    """The prefix that runs a command as root: [] for root, sudo when it needs no password, else None."""
    if os.geteuid() == 0:
        return []
    if shutil.which("sudo") and subprocess.run(["sudo", "-n", "true"], capture_output=True).returncode == 0:
        return ["sudo", "-n", "-E"]
    return None


def _unavailable() -> str | None:
    if _as_root() is None:
        return "the local SLURM needs root or password-less sudo (scripts/start-local-slurm.sh)"
    missing = [exe for exe in ("slurmctld", "slurmd", "munged", "sbatch", "squeue") if shutil.which(exe) is None]
    if missing:
        return f"SLURM is not installed ({', '.join(missing)} missing): run scripts/install-system-deps.sh"
    return None


STATE_DIR = Path("/var/spool/local-slurm")  # scripts/start-local-slurm.sh's default --state-dir


def slurm_running() -> bool:
    """Whether the local SLURM's controller (started by scripts/start-local-slurm.sh) is alive."""
    pidfile = STATE_DIR / "run" / "slurmctld.pid"
    try:
        pid = int(pidfile.read_text().split()[0])
    except (OSError, ValueError, IndexError):
        return False
    return Path(f"/proc/{pid}").exists()


@pytest.fixture(scope="session")
def local_slurm() -> Iterator[str]:
    """Start (or reuse) the local SLURM with 2 fake GPUs; yields the partition name.

    In CI it must run: a missing SLURM fails there instead of skipping. If this
    fixture started the daemons, it stops them at the end of the session
    (scripts/stop-local-slurm.sh, which also cancels leftover jobs); a SLURM that
    was already up (CI's own step, a developer's) is left running.
    """
    why = _unavailable()
    if why:
        if IN_CI:
            pytest.fail(why)
        pytest.skip(why)
    was_running = slurm_running()
    out = subprocess.run([*_as_root(), "bash", str(REPO / "scripts" / "start-local-slurm.sh"), "--cpus", str(SLURM_CPUS),
                          "--gpus", str(SLURM_GPUS)], capture_output=True, text=True, timeout=180)
    if out.returncode != 0:  # root and the packages are there: a failure here is a bug
        pytest.fail(f"start-local-slurm.sh failed:\n{out.stdout}\n{out.stderr}")
    os.environ.setdefault("SLURM_CONF", "/etc/slurm/slurm.conf")
    try:
        yield "debug"
    finally:
        if not was_running:
            subprocess.run([*_as_root(), "bash", str(REPO / "scripts" / "stop-local-slurm.sh")], capture_output=True,
                           text=True, timeout=120)


# ---------------------------------------------------------------------------------------------
# a small EM job shared by the fault, locality and SLURM tests (em_jobs.py)


@pytest.fixture(scope="session")
def em_data(tmp_path_factory) -> EMData:
    return simulate_em_data(tmp_path_factory.mktemp("em-data"))


@pytest.fixture(scope="session")
def class3d_local(em_data, tmp_path_factory) -> Class3DRun:
    """The undisturbed reference: the shared class3d job on a 2-worker LocalCluster, with its task stream."""
    from distributed import get_task_stream

    from cryodask.cluster import execution_client

    out = tmp_path_factory.mktemp("class3d-local")
    with execution_client(workers=2) as client:
        assert type(client.cluster).__name__ == "LocalCluster"
        with get_task_stream(client) as ts:
            run = run_class3d(em_data, out / "run", client=client)
        stolen = moved_by_stealing(client)
    run.task_stream = [{"key": str(t["key"]), "worker": t["worker"], "stolen": str(t["key"]) in stolen}
                       for t in ts.data]
    return run
