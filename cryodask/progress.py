"""Progress of a job: the dashboard link, a bar per iteration over finished tasks, a line per iteration.

``tqdm.auto`` draws the bar: a text bar in a terminal, a widget in Jupyter. One line per
iteration says how many hidden-variable sampling points each particle is scored against
(what RELION prints as ``NrHiddenVariableSamplingPoints``, the number the E-step cost grows
with), the time taken, and an estimate of the time left. ``quiet=True`` (``--quiet``) drops
the bars, which fill batch logs with carriage returns, and keeps the lines.

Use from a job's loop::

    progress = JobProgress("refine3d", total_iterations=opts["iter"], quiet=quiet)
    progress.start(client)                       # prints the dashboard link
    for it in ...:
        t0 = time.perf_counter()
        futures = [client.submit(expectation_chunk, ...) for ...]
        progress.track(futures, f"it{it:03d} E-step")   # returns when every future has finished
        ...                                              # gather / reduce as before
        progress.iteration_done(it, time.perf_counter() - t0, sampling_points=n, resolution=res_A)
    progress.close()

``track`` only waits: it never gathers results, keeps no reference to the futures after it
returns, and does not raise for a failed task (the caller's ``gather``/``result`` does).
"""

from __future__ import annotations

import sys
import time
from collections.abc import Iterable
from typing import Any, TextIO

__all__ = ["JobProgress", "hidden_variable_sampling_points", "format_seconds", "dashboard_link"]


def hidden_variable_sampling_points(n_classes: int, n_directions: int, n_psi: int, n_translations: int, *,
                                    oversampling: int = 0, ref_dim: int = 3) -> int:
    """RELION's ``NrHiddenVariableSamplingPoints``: classes × orientations × translations per particle.

    At adaptive oversampling order ``os`` each coarse orientation has ``4^os`` direction children
    (3D only) times ``2^os`` psi children, and each translation ``4^os`` children (2D images).
    2D classification (``ref_dim=2``) has one direction.
    """
    os_ = int(oversampling)
    dirs = int(n_directions) * (4 ** os_ if ref_dim == 3 else 1)
    return int(n_classes) * dirs * int(n_psi) * 2 ** os_ * int(n_translations) * 4 ** os_


def _interactive(stream: Any) -> bool:
    """A terminal, or a Jupyter kernel (where ``tqdm.auto`` draws a widget)."""
    try:
        from IPython import get_ipython

        shell = get_ipython()
        if shell is not None and "IPKernelApp" in getattr(shell, "config", {}):
            return True
    except ImportError:
        pass
    isatty = getattr(stream, "isatty", None)
    return bool(isatty and isatty())


def format_seconds(s: float) -> str:
    """``42 s``, ``3 min 05 s``, ``2 h 07 min``."""
    s = max(0.0, float(s))
    if s < 60:
        return f"{s:.1f} s" if s < 10 else f"{s:.0f} s"
    m, sec = divmod(int(round(s)), 60)
    if m < 60:
        return f"{m} min {sec:02d} s"
    h, m = divmod(m, 60)
    return f"{h} h {m:02d} min"


def dashboard_link(client: Any) -> str | None:
    """The client's dashboard address (None when the scheduler runs without one)."""
    try:
        link = client.dashboard_link
    except Exception:  # noqa: BLE001 - no dashboard (bokeh missing, dashboard off)
        return None
    return str(link) if link else None


class JobProgress:
    """Console / Jupyter progress of one job.

    Parameters
    ----------
    job
        Name printed at the start of each line (``refine3d``, ``class2d``…).
    quiet
        No progress bars (for batch logs); the dashboard link and the per-iteration lines are kept.
        Bars on the process's own stderr are drawn only on a terminal or in Jupyter, so a
        batch job's log file holds the lines alone even without ``quiet``.
    total_iterations
        Iterations expected, for the estimate of the time left (unknown: no estimate).
    stream
        Where lines and bars go (default ``sys.stderr``); ``None`` prints nothing at all.
    log
        If given, the lines go to ``log(line)`` instead of ``stream`` (bars still go to ``stream``),
        e.g. a job's ``log=print`` or a logger's ``info``.
    """

    def __init__(self, job: str, *, quiet: bool = False, total_iterations: int | None = None,
                 stream: TextIO | None | str = "stderr", log: Any = None) -> None:
        self.job = job
        self.quiet = bool(quiet)
        self.total_iterations = total_iterations
        self.stream = sys.stderr if stream == "stderr" else stream
        self._bars = not self.quiet and self.stream is not None and (
            self.stream is not sys.stderr or _interactive(self.stream))
        self.log = log
        self.iteration_seconds: list[float] = []
        self.lines: list[str] = []
        self.tracked: list[int] = []  # futures finished, per call of track
        self.dashboard: str | None = None
        self._t_start = time.perf_counter()
        self._t_last = self._t_start
        self._bar: Any = None

    # -- output --------------------------------------------------------------------------------
    def _print(self, line: str) -> None:
        self.lines.append(line)
        if self.log is not None:
            self.log(line)
        elif self.stream is not None:
            print(line, file=self.stream, flush=True)

    def note(self, line: str) -> None:
        """Print a line of the job's own (kept in :attr:`lines` with the others)."""
        self._print(line)

    def start(self, client: Any = None) -> str | None:
        """Mark the start; print the dashboard link of ``client`` (returned; None without a dashboard)."""
        self._t_start = self._t_last = time.perf_counter()
        self.dashboard = dashboard_link(client) if client is not None else None
        if self.dashboard:
            self._print(f"{self.job}: dashboard {self.dashboard}")
        return self.dashboard

    def track(self, futures: Iterable[Any], desc: str | None = None) -> int:
        """Advance a bar as ``futures`` finish; return when all have finished (or failed).

        Returns the number of futures that finished. Results are neither gathered nor changed.
        """
        from distributed import as_completed

        futs = list(futures)
        n = 0
        bar = self._make_bar(len(futs), desc)
        try:
            # with_results=False: only the futures come back, nothing is fetched from the workers
            for _ in as_completed(futs):
                n += 1
                if bar is not None:
                    bar.update(1)
        finally:
            if bar is not None:
                bar.close()
            futs.clear()  # hold no reference once done: the caller decides when results are released
        self.tracked.append(n)
        return n

    def _make_bar(self, total: int, desc: str | None) -> Any:
        if not self._bars:
            return None
        from tqdm.auto import tqdm

        return tqdm(total=total, desc=f"{self.job} {desc}" if desc else self.job, unit="task",
                    file=self.stream, leave=False, dynamic_ncols=True, mininterval=0.2)

    def iteration_done(self, iteration: int, seconds: float | None = None, sampling_points: int | None = None,
                       **numbers: Any) -> str:
        """Print (and return) the iteration's line: sampling points, other numbers, time, time left.

        ``seconds`` defaults to the time since the previous call (or :meth:`start`). ``numbers``
        are printed as ``name value`` (floats to 4 significant digits; ``resolution`` in Å).
        """
        now = time.perf_counter()
        took = now - self._t_last if seconds is None else float(seconds)
        self._t_last = now
        self.iteration_seconds.append(took)
        total = self.total_iterations
        head = f"{self.job} it{int(iteration):03d}" + (f"/{int(total):03d}" if total else "")
        parts = []
        if sampling_points is not None:
            parts.append(f"{int(sampling_points):,} sampling points/particle")
        for k, v in numbers.items():
            if isinstance(v, float):
                parts.append(f"{k} {v:.2f} Å" if k.startswith("resolution") else f"{k} {v:.4g}")
            else:
                parts.append(f"{k} {v}")
        parts.append(format_seconds(took))
        left = self.seconds_left(iteration)
        if left is not None:
            parts.append(f"about {format_seconds(left)} left")
        line = f"{head}: " + ", ".join(parts)
        self._print(line)
        return line

    def seconds_left(self, iteration: int) -> float | None:
        """Mean time of the last (up to 3) iterations × the iterations still to run; None if unknown."""
        if not self.total_iterations or not self.iteration_seconds:
            return None
        remaining = max(0, int(self.total_iterations) - int(iteration))
        if remaining == 0:
            return None
        recent = self.iteration_seconds[-3:]  # sizes grow as the resolution improves: recent iterations tell more
        return remaining * sum(recent) / len(recent)

    def close(self) -> None:
        """Close an open bar (after an interruption); the total time is in :attr:`elapsed`."""
        if self._bar is not None:
            self._bar.close()
            self._bar = None

    @property
    def elapsed(self) -> float:
        """Seconds since :meth:`start`."""
        return time.perf_counter() - self._t_start

    def __enter__(self) -> "JobProgress":
        return self

    def __exit__(self, *exc: Any) -> None:
        self.close()
