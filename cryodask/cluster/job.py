"""One job's execution: its Dask client, which worker holds which particle chunk, and its scratch.

Every EM job runs inside :func:`job_session`::

    with job_session(client, use_gpu=..., cluster=..., scratch_dir=..., ...) as session:
        for it in iterations:
            chunks = session.chunk_futures(particles)      # the same worker reads a chunk every iteration
            scores = [session.submit_scoring(expectation_chunk, c, ...) for c in chunks]

The chunk-to-worker map is made once, from the workers there when the first
iteration starts, and kept: a chunk is read (and staged on scratch) by the same
worker every iteration. Only the chunks of a worker that has gone (killed,
preempted, past its walltime) move, to the live workers holding fewest chunks,
which stage them again from the shared store. Workers that join later take
work by stealing (tasks are pinned loosely, ``allow_other_workers=True``).

At exit the session removes its scratch copies (unless ``keep_scratch``) and
closes the cluster it started; a client passed in is left open.
"""

from __future__ import annotations

import collections
import contextlib
import logging
import uuid
from collections.abc import Callable, Iterator, Mapping
from dataclasses import dataclass, field
from typing import Any

from cryodask.cluster.client import EXECUTION_DEFAULTS, Execution, execution_client, execution_options

logger = logging.getLogger("cryodask.cluster")

__all__ = ["JobSession", "job_session", "execution_keywords", "reassign_owners"]


def execution_keywords(values: Mapping[str, Any]) -> dict[str, Any]:
    """The execution options among ``values`` (a job's keyword arguments), defaults left out."""
    return {k: values[k] for k in EXECUTION_DEFAULTS if k in values and values[k] != EXECUTION_DEFAULTS[k]}


def reassign_owners(owners: list[str], live: list[str]) -> list[str]:
    """``owners`` with every chunk of a worker not in ``live`` moved to the live worker holding fewest.

    Chunks of live workers never move. Ties go to the worker listed first in
    ``live``, so the result is the same on every call with the same inputs.
    """
    if not live:
        raise ValueError("no live workers")
    alive = set(live)
    load = collections.Counter({w: 0 for w in live})
    load.update(w for w in owners if w in alive)
    out = list(owners)
    order = {w: i for i, w in enumerate(live)}
    for i, w in enumerate(owners):
        if w not in alive:
            new = min(live, key=lambda x: (load[x], order[x]))
            out[i] = new
            load[new] += 1
    return out


@dataclass
class JobSession:
    """A running job's client and the chunk-to-worker map (see the module doc)."""

    client: Any
    execution: Execution
    scratch: dict[str, Any]
    job_id: str = field(default_factory=lambda: f"cryodask-{uuid.uuid4().hex[:12]}")
    owners: list[str] | None = None
    gpu: dict[str, float] | None = None
    moved: int = 0  # chunks moved off lost workers so far
    profile: str | None = None  # --profile: the folder of the chunk tasks' profiles

    def workers(self) -> list[str]:
        info = self.client.scheduler_info(n_workers=-1) if _takes_n_workers(self.client) \
            else self.client.scheduler_info()
        workers = list(info["workers"])
        if not workers:
            self.client.wait_for_workers(1)
            return self.workers()
        return workers

    def chunk_futures(self, particles: Any) -> list:
        """Futures of every chunk's images, each read by its worker in the map (see the module doc)."""
        from cryodask.cluster.scratch import chunk_futures, chunk_owners

        live = self.workers()
        if self.owners is None or len(self.owners) != particles.n_chunks:
            self.owners = chunk_owners(particles.n_chunks, live,
                                       parallel_disc_io=self.scratch.get("parallel_disc_io", True))
        else:
            new = reassign_owners(self.owners, live)
            moved = sum(a != b for a, b in zip(new, self.owners, strict=True))
            if moved:
                logger.warning("%d chunk(s) of lost workers are read again from %s by other workers", moved,
                               getattr(particles, "path", "the store"))
                self.moved += moved
            self.owners = new
        kw = {k: v for k, v in self.scratch.items() if k != "keep_scratch"}
        if kw.get("scratch_dir"):
            kw["job_id"] = self.job_id
        futures = chunk_futures(self.client, particles, owners=self.owners, **kw)
        self._owner_of = {f.key: w for f, w in zip(futures, self.owners, strict=True)}
        return futures

    def submit_scoring(self, func: Callable, chunk: Any, *args: Any, **kwargs: Any):
        """``client.submit(func, chunk, ...)`` for a task that scores a chunk's images: pinned (loosely)
        to the worker holding the chunk, and asking for a GPU where the workers have them."""
        owner = getattr(self, "_owner_of", {}).get(getattr(chunk, "key", None))
        if owner is not None and "workers" not in kwargs:
            # work stealing would otherwise move a few tasks away from their chunk
            kwargs.update(workers=[owner], allow_other_workers=True)
        if self.gpu:
            kwargs.setdefault("resources", self.gpu)
        if self.profile:
            from cryodask.profiling import Profiled

            func = Profiled(func, self.profile, str(kwargs.get("key") or f"{func.__name__}-{uuid.uuid4().hex[:8]}"))
        return self.client.submit(func, chunk, *args, **kwargs)


def _job_id(name: str) -> str:
    import hashlib
    from pathlib import Path

    root = str(Path(name).resolve())
    return f"cryodask-{Path(root).name}-{hashlib.blake2b(root.encode(), digest_size=6).hexdigest()}"


def _takes_n_workers(client) -> bool:
    import inspect

    return "n_workers" in inspect.signature(client.scheduler_info).parameters


@contextlib.contextmanager
def job_session(client: Any = None, /, *, name: str | None = None, **execution: Any) -> Iterator[JobSession]:
    """A :class:`JobSession` on ``client``, or on the cluster the execution options ask for.

    Parameters
    ----------
    client
        A ``distributed.Client`` to use as it is (left open at exit); None: open one
        with :func:`cryodask.cluster.client.execution_client` from ``execution``.
    **execution
        The execution options by their command-line names (``use_gpu``, ``gpu_list``,
        ``j``, ``workers``, ``cluster``, ``scheduler_file``, ``scratch_dir``,
        ``keep_free_scratch``, ``keep_scratch``, ``reuse_scratch``, ``preread_images``,
        ``no_parallel_disc_io``, ``profile``).
    name
        The job's output rootname: its scratch folder is named after it, so that
        ``--keep_scratch`` then ``--reuse_scratch`` (or ``--continue``) finds the copy.
    """
    from cryodask.cluster.gpu import gpu_task_resources
    from cryodask.cluster.scratch import cleanup_workers
    from cryodask.errors import UserError

    ex = execution_options(**execution)
    v = {**EXECUTION_DEFAULTS, **execution}
    if v["keep_free_scratch"] < 0:
        raise UserError("--keep_free_scratch", f"{v['keep_free_scratch']:g} GB is negative; give 0 or more")
    if v["reuse_scratch"] and not v["scratch_dir"]:
        raise UserError("--reuse_scratch", "needs --scratch_dir (the folder holding the copy to reuse)")
    scratch = {"scratch_dir": v["scratch_dir"], "keep_free_gb": float(v["keep_free_scratch"]),
               "reuse": bool(v["reuse_scratch"]), "preread": bool(v["preread_images"]),
               "parallel_disc_io": not v["no_parallel_disc_io"], "keep_scratch": bool(v["keep_scratch"])}
    profile = None
    if v["profile"]:  # checked before a cluster starts
        from pathlib import Path

        folder = Path(v["profile"]).resolve()
        try:
            folder.mkdir(parents=True, exist_ok=True)
        except OSError as exc:
            raise UserError("--profile", f"cannot make the folder {folder} ({exc.strerror}); give a writable "
                                         "folder") from None
        profile = str(folder)
    with contextlib.ExitStack() as stack:
        if client is None:
            client = stack.enter_context(execution_client(**execution))
        session = JobSession(client=client, execution=ex, scratch=scratch)
        session.profile = profile
        if name:
            session.job_id = _job_id(name)
        session.gpu = gpu_task_resources(client)
        if ex.use_gpu and not session.gpu:
            raise UserError("--use_gpu", "none of the cluster's workers has a GPU; start GPU workers "
                                         "(cluster_configs/local-gpu.yaml or slurm-gpu.yaml) or leave out --use_gpu")
        try:
            yield session
        finally:
            if scratch["scratch_dir"]:
                with contextlib.suppress(Exception):  # a lost cluster must not hide the job's own error
                    cleanup_workers(client, scratch["scratch_dir"], session.job_id,
                                    keep_scratch=scratch["keep_scratch"])
