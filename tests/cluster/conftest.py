"""Fixtures for the cluster tests: a real single-node SLURM (scripts/start-local-slurm.sh)."""

from __future__ import annotations

import os
import shutil
import subprocess
from pathlib import Path

import pytest

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


@pytest.fixture(scope="session")
def local_slurm() -> str:
    """Start (or reuse) the local SLURM with 2 fake GPUs; returns the partition name.

    In CI it must run: a missing SLURM fails there instead of skipping. SLURM is
    left running afterwards (scripts/stop-local-slurm.sh stops it).
    """
    why = _unavailable()
    if why:
        if IN_CI:
            pytest.fail(why)
        pytest.skip(why)
    out = subprocess.run([*_as_root(), "bash", str(REPO / "scripts" / "start-local-slurm.sh"), "--cpus", str(SLURM_CPUS),
                          "--gpus", str(SLURM_GPUS)], capture_output=True, text=True, timeout=180)
    if out.returncode != 0:  # root and the packages are there: a failure here is a bug
        pytest.fail(f"start-local-slurm.sh failed:\n{out.stdout}\n{out.stderr}")
    os.environ.setdefault("SLURM_CONF", "/etc/slurm/slurm.conf")
    return "debug"
