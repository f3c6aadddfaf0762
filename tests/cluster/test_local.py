"""The embedded LocalCluster's worker processes: their environment is set before they start."""

from __future__ import annotations

import os
import resource

import numpy as np

from cryodask.cluster.local import MEMORY_ENVIRON, local_client


def _environ() -> dict[str, str | None]:
    return {k: os.environ.get(k) for k in (*MEMORY_ENVIRON, "OPENBLAS_NUM_THREADS")}


def _refault_pages(n_bytes: int) -> int:
    """Page faults of allocating and filling ``n_bytes`` again after freeing an array of that size."""
    a = np.ones(n_bytes // 8)
    del a
    before = resource.getrusage(resource.RUSAGE_SELF).ru_minflt
    b = np.ones(n_bytes // 8)
    faults = resource.getrusage(resource.RUSAGE_SELF).ru_minflt - before
    del b
    return faults


def test_workers_keep_freed_memory_for_the_next_array():
    with local_client(1) as client:
        env = next(iter(client.run(_environ).values()))
        # in a worker's task thread, as a chunk task runs
        faults = client.submit(_refault_pages, 200 << 20, pure=False).result()
    assert env == {**MEMORY_ENVIRON, "OPENBLAS_NUM_THREADS": "1"}
    # glibc's default maps a fresh 200 MB array each time and its pages fault again: 101 with NumPy's
    # transparent huge pages (2 MiB), 51,200 without; kept heap memory faults 0 times
    assert faults < 20, faults
