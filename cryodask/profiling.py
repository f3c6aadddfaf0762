"""Profiles of a job's chunk tasks (``--profile DIR``).

Every chunk task (the E-step and M-step sums of one particle chunk, where a job spends its time) runs
under :mod:`cProfile` inside its worker and writes ``DIR/<task key>.prof``: the profile of the real run,
in the worker's own environment, with no change to what the task computes. Read one with
``python -m pstats DIR/<file>.prof``, or add them up per iteration with :func:`summary`::

    cryodask class2d --i particles.star --o C2D/run --K 10 --iter 5 --profile prof/
    python -c "from cryodask.profiling import summary; print(summary('prof/', top=15))"
"""

from __future__ import annotations

import cProfile
import io
import os
import pstats
from collections.abc import Callable
from pathlib import Path
from typing import Any

__all__ = ["Profiled", "summary"]


class Profiled:
    """``func`` run under cProfile, its profile written to ``folder/<name>.prof`` (picklable: it travels
    to the worker with the task)."""

    def __init__(self, func: Callable[..., Any], folder: str, name: str) -> None:
        self.func, self.folder, self.name = func, str(folder), str(name)
        self.__name__ = getattr(func, "__name__", "task")  # dask names tasks after their function

    def __call__(self, *args: Any, **kwargs: Any) -> Any:
        profile = cProfile.Profile()
        try:
            return profile.runcall(self.func, *args, **kwargs)
        finally:
            path = Path(self.folder) / f"{_safe(self.name)}.prof"
            tmp = path.with_name(f".{path.name}.{os.getpid()}")
            profile.dump_stats(str(tmp))
            os.replace(tmp, path)  # whole files only, also when a retried task writes again


def _safe(name: str) -> str:
    return "".join(c if c.isalnum() or c in "-_." else "_" for c in name)


def summary(folder: str | os.PathLike[str], pattern: str = "*.prof", *, top: int = 20,
            sort: str = "tottime") -> str:
    """The profiles in ``folder`` matching ``pattern`` added up: the ``top`` functions by ``sort``
    (``"tottime"``: time in the function itself; ``"cumulative"``: with what it calls)."""
    files = sorted(Path(folder).glob(pattern))
    if not files:
        raise FileNotFoundError(f"no profiles {pattern} in {folder}")
    out = io.StringIO()
    stats = pstats.Stats(str(files[0]), stream=out)
    for f in files[1:]:
        stats.add(str(f))
    out.write(f"{len(files)} task profiles from {folder}\n")
    stats.files = []  # else print_stats heads its table with a line per file
    stats.sort_stats(sort).print_stats(top)
    return out.getvalue()
