"""The embedded default: a ``LocalCluster`` sized to the machine, with nothing to configure."""

from __future__ import annotations

import contextlib
import os
from collections.abc import Iterator

import dask


#: memory settings for worker processes. A chunk task allocates and frees arrays of 10-500 MB many
#: times; with glibc's defaults (and dask's MALLOC_TRIM_THRESHOLD_=65536) each is a fresh mmap whose
#: pages the kernel zeroes again, measured at a quarter of a class2d task's time as system time.
#: One arena (a worker thread's own arena cannot hold arrays over 64 MB), arrays below 256 MiB from
#: the heap, and up to 1 GiB of freed heap kept for the next task: the retained memory never exceeds
#: a task's own peak, which the memory pre-flight has already sized to the worker. NumPy's huge-page
#: advice is off: where the kernel compacts memory on such faults (transparent_hugepage/defrag =
#: madvise, Debian's default) each new stretch of heap stalled for seconds (class2d at 3,000
#: particles: 5.7 s of system time against 1.4 s without, 34.8 against 32.5 s overall).
MEMORY_ENVIRON = {"MALLOC_ARENA_MAX": "1", "MALLOC_MMAP_THRESHOLD_": str(256 << 20),
                  "MALLOC_TRIM_THRESHOLD_": str(1 << 30), "NUMPY_MADVISE_HUGEPAGE": "0"}


def worker_environ(threads: int = 1) -> dict[str, str]:
    """Environment of a worker process: BLAS with ``threads`` threads (the cluster provides the
    parallelism) and :data:`MEMORY_ENVIRON`. Set before the process starts (the nanny's
    ``pre-spawn-environ``): glibc reads it once."""
    t = str(threads)
    return {"OMP_NUM_THREADS": t, "OPENBLAS_NUM_THREADS": t, "MKL_NUM_THREADS": t, **MEMORY_ENVIRON}


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
    env = worker_environ(threads)
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
