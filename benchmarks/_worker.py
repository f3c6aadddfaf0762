"""Run a benchmark in the environment of a cryodask worker process.

A worker starts with one BLAS thread and :data:`cryodask.cluster.local.MEMORY_ENVIRON` (glibc's
malloc settings, NumPy's huge-page advice off). glibc and NumPy read them once, at start-up, so a
benchmark that times what a worker does restarts itself with them before it measures anything.
"""

from __future__ import annotations

import os
import sys

_MARK = "CRYODASK_BENCHMARK_AS_WORKER"


def as_worker(threads: int = 1, *, machine_defaults: bool = False) -> None:
    """Re-execute this script with the worker environment (once); no-op if already done or asked not to."""
    if machine_defaults or os.environ.get(_MARK):
        return
    from cryodask.cluster.local import worker_environ

    env = {**os.environ, **worker_environ(threads), _MARK: "1"}
    sys.stdout.flush()
    os.execve(sys.executable, [sys.executable, *sys.argv], env)
