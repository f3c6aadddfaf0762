"""What every EM job does around its iterations: the memory pre-flight before the first, a
progress bar and a line per iteration while it runs, plots beside each iteration's files, and
``run_report.html`` at the end.

Used by the job drivers (:mod:`cryodask.em.refine3d`, :mod:`~cryodask.em.class3d`,
:mod:`~cryodask.em.class2d`)::

    monitor = JobMonitor("class2d", session.client, output_root=o, total_iterations=n, log=log)
    chunk = memory_preflight("class2d", session.client, particles, K=K, ..., log=log)
    for it in ...:
        futures = [...]
        monitor.track(futures, f"it{it:03d}")
        ...                                    # files of the iteration written
        monitor.iteration_done(it, sampling_points=n, resolution=res)
    monitor.finish()                           # run_report.html
"""

from __future__ import annotations

import logging
import time
from collections.abc import Callable, Iterable
from typing import Any

from cryodask.errors import UserError

logger = logging.getLogger("cryodask.em")

__all__ = ["JobMonitor", "memory_preflight", "worker_memory_limit"]


class JobMonitor:
    """Progress, per-iteration plots and the final report of one job.

    Parameters
    ----------
    job
        ``"refine3d"``, ``"class3d"`` or ``"class2d"``.
    client
        The job's ``distributed.Client`` (its dashboard link is printed at the start).
    output_root
        The job's ``--o``: plots go beside ``<o>_itNNN_*`` and the report to ``<o>_report.html``.
    total_iterations
        For the estimate of the time left (None: unknown, as in auto-refinement).
    log
        Where the lines go (``print``; None: nowhere). Progress bars are drawn only when
        there is a log and ``quiet`` is false.
    quiet
        ``--quiet``: lines only, no bars (for batch logs).
    plots
        Write PNGs beside each iteration's files and the report at the end.
    """

    def __init__(self, job: str, client: Any, *, output_root: str, total_iterations: int | None = None,
                 log: Callable[[str], Any] | None = print, quiet: bool = False, plots: bool = True) -> None:
        from cryodask.progress import JobProgress

        self.job, self.output_root, self.plots, self.log = job, str(output_root), bool(plots), log
        # bars on stderr (none without a log or with quiet); the lines go through ``log``
        self.progress = JobProgress(job, quiet=quiet or log is None, total_iterations=total_iterations,
                                    stream="stderr" if log is not None else None, log=log or (lambda line: None))
        self._t = time.perf_counter()
        self.progress.start(client)

    def track(self, futures: Iterable[Any], desc: str) -> int:
        """A bar over ``futures`` until all have finished (results are not fetched)."""
        return self.progress.track(futures, desc)

    def iteration_done(self, iteration: int, *, sampling_points: int | None = None, plots: bool = True,
                       **numbers: Any) -> str:
        """The iteration's line (time since the last one, time left) and its plots (``plots=False``:
        none, e.g. after refine3d's final iteration, whose files carry no iteration number)."""
        now = time.perf_counter()
        line = self.progress.iteration_done(iteration, now - self._t, sampling_points, **numbers)
        if self.plots and plots:
            from cryodask.report import write_iteration_plots

            try:
                write_iteration_plots(self.output_root, iteration, self.job)
            except Exception as e:  # noqa: BLE001 - a picture must never stop a refinement
                logger.warning("%s: no plots for iteration %d (%s)", self.job, iteration, e)
        self._t = time.perf_counter()
        return line

    def __enter__(self) -> "JobMonitor":
        return self

    def __exit__(self, exc_type: Any, exc: Any, tb: Any) -> None:
        # the report only for a run that ended; an interrupted one just closes its bar
        if exc_type is None:
            self.finish()
        else:
            self.progress.close()

    def finish(self) -> str | None:
        """Write ``run_report.html`` beside the outputs; returns its path (None when plots are off or it failed)."""
        self.progress.close()
        if not self.plots:
            return None
        from cryodask.report import write_report

        try:
            path = str(write_report(self.output_root))
        except Exception as e:  # noqa: BLE001 - the job's files are written; the report is extra
            logger.warning("%s: no run report (%s)", self.job, e)
            return None
        self.progress.note(f"{self.job}: report {path}")
        return path


def worker_memory_limit(client: Any) -> int | None:
    """The smallest ``memory_limit`` of the client's workers in bytes (None: no limit set)."""
    workers = client.scheduler_info(n_workers=-1)["workers"] if _takes_n_workers(client) else \
        client.scheduler_info()["workers"]
    limits = [int(w.get("memory_limit") or 0) for w in workers.values()]
    limits = [x for x in limits if x > 0]
    return min(limits) if limits else None


def _takes_n_workers(client) -> bool:
    import inspect

    return "n_workers" in inspect.signature(client.scheduler_info).parameters


def memory_preflight(job: str, client: Any, particles: Any, *, chunk_given: bool, K: int = 1, pad: float = 2,
                     healpix_order: int = 2, offset_range: float = 6.0, offset_step: float = 2.0,
                     oversampling: int = 1, psi_step: float | None = None, sym: str = "C1",
                     log: Callable[[str], Any] | None = print) -> int | None:
    """Check that the job fits its workers before it starts (:func:`cryodask.em.memory.preflight`).

    Returns the particles per task to use when the input's chunks are too large and can be
    re-chunked (a STAR file without ``--pool``), else None (the chunks fit as they are).

    Raises
    ------
    UserError
        The M-step cannot fit, the E-step cannot fit with one particle per task, or a particle
        store's (or ``--pool``'s) chunks are too large: the message names the fix.
    """
    from cryodask.em.memory import estimate, format_bytes, preflight
    from cryodask.io.store import StarParticles

    slices = particles.chunk_slices()
    chunk = max(s.stop - s.start for s in slices)
    threads = max(int(w.get("nthreads", 1) or 1) for w in client.scheduler_info()["workers"].values())
    n = len(particles.table.particles)
    limit = worker_memory_limit(client)
    est = estimate(job, box=int(particles.box), n_particles=n, K=K, pad=pad, healpix_order=healpix_order,
                   offset_range=offset_range, offset_step=offset_step, oversampling=oversampling,
                   psi_step=psi_step, chunk=chunk, sym=sym, threads_per_worker=threads,
                   image_bytes=2 if str(getattr(particles, "dtype", "float32")) == "float16" else 4)
    pf = preflight(est, limit, chunk=chunk)
    if log is not None:
        log(f"{job}: memory per worker: E-step {format_bytes(pf.e_step_peak)} with {min(chunk, pf.chunk)} "
            f"particles per task, M-step {format_bytes(pf.m_step_peak)}, limit {format_bytes(pf.limit)}")
    if pf.chunk >= chunk:
        return None
    if isinstance(particles, StarParticles) and not chunk_given:
        return pf.chunk
    source = "--pool" if chunk_given else str(particles.path)
    fix = (f"give --pool {pf.chunk} or less" if chunk_given else
           f"import again with --chunk {pf.chunk} (cryodask import), or give each worker more memory")
    raise UserError(source, f"{chunk} particles per task need {format_bytes(est.e_step_worker(chunk))} per worker, "
                            f"more than the {format_bytes(pf.usable)} that fit a {format_bytes(pf.limit)} worker; "
                            f"{fix}")
