"""The embedded default: a ``LocalCluster`` sized to the machine, with nothing to configure."""

from __future__ import annotations

import contextlib
import os
from collections.abc import Iterator

import dask


def default_workers(n_workers: int | None = None, threads: int | None = None) -> tuple[int, int]:
    """(workers, threads per worker) for this machine: one single-threaded worker per core.

    BLAS and FFT inside a task already use the core well; more threads per worker
    only fight over it.
    """
    cores = len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else (os.cpu_count() or 1)
    threads = threads or 1
    n_workers = n_workers or max(1, cores // threads)
    return n_workers, threads


@contextlib.contextmanager
def local_client(n_workers: int | None = None, *, threads: int | None = None, memory_limit: str = "auto",
                 dashboard: bool = False, quiet: bool = True) -> Iterator["distributed.Client"]:  # noqa: F821
    """A ``LocalCluster`` of worker processes and its client, closed on exit (and on errors or Ctrl-C)."""
    from distributed import Client, LocalCluster

    n_workers, threads = default_workers(n_workers, threads)
    # worker processes each run single-threaded BLAS; the cluster provides the parallelism
    env = {"OMP_NUM_THREADS": str(threads), "OPENBLAS_NUM_THREADS": str(threads), "MKL_NUM_THREADS": str(threads)}
    with dask.config.set({"distributed.worker.daemon": False,
                          "distributed.nanny.pre-spawn-environ": env,
                          "logging.distributed": "error" if quiet else "info"}):
        cluster = LocalCluster(n_workers=n_workers, threads_per_worker=threads, processes=True,
                               memory_limit=memory_limit, dashboard_address=":0",  # a free port: never clash on 8787
                               silence_logs=40 if quiet else 20)
        try:
            with Client(cluster) as client:
                yield client
        finally:
            cluster.close()
