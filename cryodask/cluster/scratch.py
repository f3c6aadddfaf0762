"""Node-local scratch copies of the particle store, and the chunk-reading tasks.

RELION's I/O options, kept by name and made safe:

``--scratch_dir D``
    Each node copies its workers' share of the particle store once, as the
    store's own chunk files, into ``D/cryodask_<user>/<job>/<store name>/`` (a
    per-job folder: two jobs on one node never clobber each other, unlike
    RELION's shared ``relion_volatile``). The copy is itself a valid store (same
    ``zarr.json``, ``manifest.json``, ``particles.star``) plus ``staged.json``, the
    record of which chunks are complete. Workers of one node serialise on a
    ``fcntl.flock`` lock in the job folder: the first copies, the others wait
    and then find the chunks already there. Every file is copied to a temporary
    name and renamed; a chunk counts as staged only once ``staged.json`` lists it,
    so a killed copy is never mistaken for a complete one. Chunk tasks are pinned
    to the worker that staged them (``workers=``, ``allow_other_workers=True``);
    a task that runs elsewhere (the worker was lost) reads the shared store.
``--keep_free_scratch GB`` (default 10, as RELION)
    Free space that must remain after the copy. When the share does not fit,
    :func:`stage` refuses with a :class:`UserError` (the job fails at the start,
    not mid-run) unless ``partial=True``, which stages the chunks that fit and
    leaves the rest to be read from the shared store, as RELION does.
``--keep_scratch``
    Keep the copy after the job; otherwise :func:`cleanup` removes the job folder.
``--reuse_scratch``
    Reuse a copy left by an earlier run only when its manifest matches the
    store's (same particles, order, box, pixel size, dtype, chunk size and chunk
    hashes) and its chunk files have the recorded sizes (``verify="full"``
    re-hashes them); a copy that differs is refused with a message naming the
    difference. RELION only counts files. Without it, a copy from an earlier run
    is deleted and made afresh (a copy from this run, made by a sibling worker,
    is always used after the same manifest check).
``--preread_images``
    Chunks stay in the reading worker's memory across iterations: a per-process
    cache keyed by (store, chunk, chunk hash), so a re-imported store is never
    served stale. Only a chunk's owner caches it: when the scheduler moves a
    (loosely pinned) read to another worker, that read goes to disk and is not
    kept, so each chunk is held once in the cluster. It is module state on purpose (one cache per worker process,
    shared by its threads, like a worker plugin); it holds float32 arrays marked
    read-only. :func:`clear_preread_cache` empties it.
``--no_parallel_disc_io``
    One worker reads every chunk (strictly pinned to it) and the chunks travel to
    the tasks that use them, for file systems that suffer under many readers.
    By default every worker reads (and stages) its own contiguous block of chunks.

Per-process counters (:func:`read_stats`) record what each worker read and
copied, so a client can check where the I/O happened
(``client.run(read_stats)``).
"""

from __future__ import annotations

import collections
import contextlib
import fcntl
import json
import os
import re
import shutil
import threading
import time
import uuid
import warnings
from collections.abc import Iterator, Sequence
from pathlib import Path
from typing import Any

import numpy as np

from cryodask.errors import UserError
from cryodask.io.store import (MANIFEST, ParticleStore, StarParticles, _format_bytes, chunk_hash, compare_manifests,
                               open_particles, open_store)

RECORD = "staged.json"
GB = 1e9  # RELION's --keep_free_scratch is in GB

PathLike = str | os.PathLike[str]

# per-process state (one worker process = one cache); see the module docstring
_LOCK = threading.Lock()
_CACHE: dict[tuple[str, int, str], np.ndarray] = {}
_STATS: collections.Counter = collections.Counter()
_STORES: dict[tuple[str, float], ParticleStore] = {}


# ---------------------------------------------------------------------------------------------
# folders


def user_name() -> str:
    """The login name (for the per-user scratch folder); the uid when there is none."""
    try:
        import getpass

        name = getpass.getuser()
    except Exception:  # no passwd entry in some containers
        name = str(os.getuid())
    return re.sub(r"[^A-Za-z0-9._-]", "_", name) or str(os.getuid())


def job_folder(scratch_dir: PathLike, job_id: str) -> Path:
    """``scratch_dir/cryodask_<user>/<job>``; ``Refine3D/job012`` becomes ``Refine3D_job012``."""
    name = re.sub(r"[^A-Za-z0-9._-]", "_", str(job_id).strip().strip("/")).lstrip(".")
    if not name:
        raise ValueError(f"job id {job_id!r} gives an empty folder name")
    return Path(scratch_dir) / f"cryodask_{user_name()}" / name


def _writable_folder(folder: Path, scratch_dir: PathLike) -> None:
    """Create ``folder`` and prove it is writable (a test file), else UserError naming the scratch folder."""
    try:
        folder.mkdir(parents=True, exist_ok=True)
        probe = folder / f".probe-{os.getpid()}-{threading.get_ident()}"
        probe.write_bytes(b"")
        probe.unlink()
    except OSError as err:
        raise UserError(f"--scratch_dir {scratch_dir}", f"cannot write to {folder} ({err.strerror or err}); "
                                                        "choose a writable node-local folder, or run without "
                                                        "--scratch_dir") from None


@contextlib.contextmanager
def _node_lock(path: Path) -> Iterator[None]:
    """Exclusive ``flock`` on ``path``: serialises the workers (processes and threads) of one node."""
    with open(path, "a+") as fh:
        fcntl.flock(fh.fileno(), fcntl.LOCK_EX)
        try:
            yield
        finally:
            fcntl.flock(fh.fileno(), fcntl.LOCK_UN)


def _copy_atomic(src: Path, dst: Path) -> None:
    dst.parent.mkdir(parents=True, exist_ok=True)
    tmp = dst.with_name(f".{dst.name}.tmp-{os.getpid()}-{threading.get_ident()}")
    try:
        shutil.copyfile(src, tmp)
        os.replace(tmp, dst)
    except BaseException:
        with contextlib.suppress(FileNotFoundError):
            tmp.unlink()
        raise


def _write_json_atomic(path: Path, data: dict[str, Any]) -> None:
    tmp = path.with_name(f".{path.name}.tmp-{os.getpid()}-{threading.get_ident()}")
    tmp.write_text(json.dumps(data, indent=1))
    os.replace(tmp, path)


def _read_json(path: Path) -> dict[str, Any] | None:
    try:
        return json.loads(path.read_text())
    except (OSError, ValueError):
        return None


def staged_chunks(staged: PathLike) -> set[int]:
    """Chunks complete in a scratch copy (empty when there is no copy)."""
    record = _read_json(Path(staged) / RECORD)
    return set(record["chunks"]) if record else set()


# ---------------------------------------------------------------------------------------------
# staging


def _check_copy(target: Path, store: ParticleStore, record: dict[str, Any], verify: str) -> list[int]:
    """Chunks of the copy whose file is missing, has the wrong size, or (``verify="full"``) the wrong hash."""
    nbytes = store.manifest["chunk_nbytes"]
    copy = open_store(target)
    bad = []
    for i in record["chunks"]:
        f = copy.chunk_file(i)
        if not f.is_file() or f.stat().st_size != nbytes[i]:
            bad.append(i)
        elif verify == "full" and chunk_hash(copy.read_chunk_stored(i)) != store.manifest["chunk_hashes"][i]:
            bad.append(i)
    return bad


def stage(store: PathLike | ParticleStore, scratch_dir: PathLike, *, job_id: str,
          chunks: Sequence[int] | None = None, keep_free_gb: float = 10, reuse: bool = False,
          run_id: str | None = None, partial: bool = False, verify: str = "sizes") -> Path:
    """Copy chunks of a particle store onto node-local scratch (once per node); return the copy's folder.

    Parameters
    ----------
    store
        The shared particle store (path or opened).
    scratch_dir
        Node-local folder (``--scratch_dir``); the copy goes to
        ``scratch_dir/cryodask_<user>/<job>/<store name>``.
    job_id
        The job (e.g. its output folder); one scratch folder per job.
    chunks
        The chunks this worker will read (default all). Several calls on one node
        add their shares to the same copy.
    keep_free_gb
        GB that must stay free on the scratch disk (``--keep_free_scratch``).
    reuse
        ``--reuse_scratch``: adopt a copy left by another run when it matches the
        store (else UserError naming the difference). Without it such a copy is
        deleted and made again.
    run_id
        Identifies one run of the job; calls with the same ``run_id`` (the workers
        of one run, every iteration) share the copy. Default: a new id, i.e. this
        call is a run of its own.
    partial
        When the share does not fit, stage the chunks that fit (the others are read
        from the shared store) instead of refusing.
    verify
        ``"sizes"`` (default) checks the chunk files of an adopted copy against the
        manifest's sizes; ``"full"`` also re-hashes them and every newly copied chunk.

    Returns
    -------
    pathlib.Path
        The scratch copy (a particle store; :func:`staged_chunks` lists what it holds).

    Raises
    ------
    UserError
        Scratch not writable; not enough free space (unless ``partial``); with
        ``reuse``, a copy that differs from the store.
    """
    if verify not in ("sizes", "full"):
        raise ValueError(f"verify must be 'sizes' or 'full', not {verify!r}")
    store = store if isinstance(store, ParticleStore) else open_store(store)
    n_chunks = store.n_chunks
    want = list(range(n_chunks)) if chunks is None else sorted({int(c) for c in chunks})
    if want and not (0 <= want[0] and want[-1] < n_chunks):
        raise ValueError(f"chunks {want[0]}..{want[-1]} out of range: the store has {n_chunks} chunks")
    run_id = run_id or uuid.uuid4().hex
    folder = job_folder(scratch_dir, job_id)
    _writable_folder(folder, scratch_dir)
    target = folder / store.path.name

    with _node_lock(folder / f".{store.path.name}.lock"):
        record = _read_json(target / RECORD) if target.is_dir() else None
        if target.exists() and record is None:  # an interrupted first copy: no chunk of it is trusted
            shutil.rmtree(target)
        if record is not None:
            staged_manifest = _read_json(target / MANIFEST) or {}
            diffs = compare_manifests(staged_manifest, store.manifest, have_name="the scratch copy",
                                      want_name=f"the store {store.path}")
            same_run = record.get("run_id") == run_id
            if diffs and reuse and not same_run:
                raise UserError(target, f"--reuse_scratch: {'; '.join(diffs[:3])}; remove {folder} or run "
                                        "without --reuse_scratch to copy the store afresh")
            if diffs or not (same_run or reuse):
                shutil.rmtree(target)  # a stale copy (or another run's, without --reuse_scratch): copy afresh
                record = None
            elif not same_run:  # adopted from an earlier run: check the files before trusting them
                bad = _check_copy(target, store, record, verify)
                if bad:
                    warnings.warn(f"{target}: {len(bad)} chunk file(s) of the reused scratch copy are damaged "
                                  f"(first: chunk {bad[0]}); copying them again", stacklevel=2)
                    record["chunks"] = sorted(set(record["chunks"]) - set(bad))
                record["run_id"] = run_id
                _write_json_atomic(target / RECORD, record)
                _count("reused", 1)
        if record is None:
            record = {"run_id": run_id, "source": str(store.path.resolve()), "chunks": []}
            try:
                for name in ("zarr.json", "images/zarr.json", "particles.star", MANIFEST):
                    _copy_atomic(store.path / name, target / name)
                _write_json_atomic(target / RECORD, record)
            except OSError as err:
                raise UserError(f"--scratch_dir {scratch_dir}", f"cannot write to {target} "
                                                                f"({err.strerror or err}); check the scratch "
                                                                "disk, or run without --scratch_dir") from None

        have = set(record["chunks"])
        missing = [c for c in want if c not in have]
        nbytes = store.manifest["chunk_nbytes"]
        need = sum(nbytes[c] for c in missing)
        free = shutil.disk_usage(folder).free
        budget = free - keep_free_gb * GB
        if need > budget:
            if not partial:
                raise UserError(f"--scratch_dir {scratch_dir}", f"needs {_format_bytes(need)} for {len(missing)} "
                                f"chunk(s) but has {_format_bytes(free)} free and --keep_free_scratch keeps "
                                f"{keep_free_gb:g} GB free; free some space, lower --keep_free_scratch, choose "
                                "another --scratch_dir, or run without --scratch_dir")
            fits, used = [], 0
            for c in missing:
                if used + nbytes[c] > budget:
                    break
                fits.append(c)
                used += nbytes[c]
            _count("not_staged", len(missing) - len(fits))
            missing = fits
        copy = open_store(target) if missing else None
        have = set(record["chunks"])
        last = time.monotonic()
        try:
            for k, c in enumerate(missing):
                src = store.chunk_file(c)
                if not src.is_file():
                    raise UserError(src, f"chunk {c} of the store is missing; the store is damaged: import it "
                                         "again")
                dst = copy.chunk_file(c)
                _copy_atomic(src, dst)
                if dst.stat().st_size != nbytes[c] or (verify == "full" and chunk_hash(copy.read_chunk_stored(c))
                                                       != store.manifest["chunk_hashes"][c]):
                    dst.unlink()
                    raise UserError(dst, f"the scratch copy of chunk {c} differs from the store after copying; "
                                         "check the scratch disk, or run without --scratch_dir")
                have.add(c)
                _count("copied", 1)
                # a chunk counts as staged once the record lists it; the record is rewritten about once a second
                if k == len(missing) - 1 or time.monotonic() - last > 1.0:
                    record["chunks"] = sorted(have)
                    _write_json_atomic(target / RECORD, record)
                    last = time.monotonic()
        except OSError as err:  # scratch full after all, or an I/O error on either disk
            record["chunks"] = sorted(have)  # the chunks copied whole so far stay usable
            with contextlib.suppress(OSError):
                _write_json_atomic(target / RECORD, record)
            raise UserError(f"--scratch_dir {scratch_dir}", f"copying the store to {target} failed "
                                                            f"({err.strerror or err}); check the scratch disk, "
                                                            "or run without --scratch_dir") from None
    return target


def cleanup(scratch_dir: PathLike, job_id: str, *, keep_scratch: bool = False) -> bool:
    """Remove this job's scratch folder on this node (unless ``keep_scratch``); True when something was removed."""
    if keep_scratch:
        return False
    folder = job_folder(scratch_dir, job_id)
    if not folder.exists():
        return False
    shutil.rmtree(folder, ignore_errors=True)
    with contextlib.suppress(OSError):  # the per-user folder, once empty
        folder.parent.rmdir()
    return not folder.exists()


def cleanup_workers(client, scratch_dir: PathLike, job_id: str, *, keep_scratch: bool = False) -> dict[str, bool]:
    """:func:`cleanup` on every worker's node (``client.run``); {worker address: removed}."""
    return client.run(cleanup, str(scratch_dir), job_id, keep_scratch=keep_scratch)


# ---------------------------------------------------------------------------------------------
# reading (worker side)


def _open_cached(path: str, star: tuple | None = None) -> ParticleStore | StarParticles:
    """Open a store (or, with ``star=(chunk, angpix, base_dirs)``, a STAR file) once per process.

    Re-opened when the store's manifest (or the STAR file) changes.
    """
    try:
        stamp = os.stat(path if star else os.path.join(path, MANIFEST)).st_mtime_ns
    except OSError:
        stamp = -1
    key = (path, stamp, star)
    with _LOCK:
        s = _STORES.get(key)
    if s is None:
        if star:
            s = StarParticles(path, chunk=star[0], angpix=star[1], base_dirs=star[2])
        else:
            s = open_store(path)
        with _LOCK:
            _STORES[key] = s
    return s


def _worker_address() -> str | None:
    try:
        from distributed import get_worker

        return get_worker().address
    except (ImportError, ValueError):  # not running inside a worker
        return None


def read_chunk(store: PathLike, i: int, *, staged: PathLike | None = None, preread: bool = False,
               star: tuple | None = None, owner: str | None = None) -> np.ndarray:
    """Chunk ``i`` as float32, from the preread cache, the scratch copy, or the shared store.

    Meant to run as a task on a worker. ``staged`` is this node's scratch copy
    (from :func:`stage`); chunks it does not hold, or a copy absent on this node
    (the task ran elsewhere), are read from ``store``. With ``star=(chunk, angpix,
    base_dirs)``, ``store`` is a STAR file read through :class:`StarParticles`.
    With ``preread``, only the chunk's ``owner`` (a worker address; None = any)
    keeps it in memory, so a task the scheduler moved to another worker costs a
    disk read but never a second copy in memory.
    """
    path = str(Path(store).resolve())
    shared = _open_cached(path, star)
    if star:
        version = f"star-{os.stat(path).st_mtime_ns}"
    else:
        version = shared.manifest["chunk_hashes"][i]
    key = (path, int(i), version, star)
    if preread:
        with _LOCK:
            hit = _CACHE.get(key)
        if hit is not None:
            _count("cache", 1)
            return hit
    if staged is not None and Path(staged, RECORD).is_file() and i in staged_chunks(staged):
        data = _open_cached(str(Path(staged).resolve())).read_chunk(i)
        _count("scratch", 1)
    else:
        data = shared.read_chunk(i)
        _count("shared", 1)
    _count("reads", 1)
    if preread and (owner is None or owner == _worker_address()):
        data = np.ascontiguousarray(data)
        data.flags.writeable = False  # shared by every task of this worker: nobody may edit it in place
        with _LOCK:
            _CACHE[key] = data
    return data


def _count(name: str, n: int = 1) -> None:
    with _LOCK:
        _STATS[name] += n


def read_stats() -> dict[str, int]:
    """This process's counters: ``reads`` (from disk), ``shared``, ``scratch``, ``cache`` hits,
    ``copied`` chunks, ``reused`` copies, ``not_staged`` chunks, plus ``pid``."""
    with _LOCK:
        return {**_STATS, "pid": os.getpid()}


def reset_read_stats() -> None:
    with _LOCK:
        _STATS.clear()


def clear_preread_cache() -> int:
    """Empty this process's preread cache; returns the number of chunks dropped."""
    with _LOCK:
        n = len(_CACHE)
        _CACHE.clear()
        _STORES.clear()
    return n


# ---------------------------------------------------------------------------------------------
# the tasks (client side)


def chunk_owners(n_chunks: int, workers: Sequence[str], *, parallel_disc_io: bool = True) -> list[str]:
    """The worker that reads each chunk: contiguous blocks per worker, or all on the first worker."""
    workers = sorted(workers)
    if not workers:
        raise ValueError("no workers")
    if not parallel_disc_io:
        return [workers[0]] * n_chunks
    return [workers[i * len(workers) // max(1, n_chunks)] for i in range(n_chunks)]


def chunk_futures(client, particles: PathLike | ParticleStore | StarParticles, *,
                  scratch_dir: PathLike | None = None, job_id: str | None = None, keep_free_gb: float = 10,
                  reuse: bool = False, preread: bool = False, parallel_disc_io: bool = True,
                  run_id: str | None = None, partial: bool = False, owners: Sequence[str] | None = None) -> list:
    """Futures of every chunk (float32 ``(n_i, B, B)``), read on pinned workers.

    Call it once per iteration; with ``preread`` the second call is served from the
    readers' memory, and with ``scratch_dir`` the first call stages each worker's
    share (later calls of the same run find it staged).

    Parameters
    ----------
    client
        A ``distributed.Client``.
    particles
        A particle store, or a STAR file (path, or as opened by
        :func:`~cryodask.io.store.open_particles`); a STAR file is read straight
        from its stacks and cannot be staged.
    scratch_dir, job_id, keep_free_gb, reuse, partial
        Stage to node-local scratch first (see :func:`stage`); ``job_id`` is required
        with ``scratch_dir``. Removing the copy at the end of the job is the
        caller's: :func:`cleanup_workers` (skip it for ``--keep_scratch``).
    preread
        ``--preread_images``: keep chunks in the readers' memory across calls.
    parallel_disc_io
        True (default): each worker reads its own contiguous block of chunks,
        pinned with ``allow_other_workers=True``. False (``--no_parallel_disc_io``):
        one worker reads every chunk (strictly pinned: if it is lost, these
        futures wait for it; call again to pick a new reader), and the chunks
        travel to the tasks that use them.
    run_id
        Shared by the staging tasks of every iteration of one run; default: the
        scheduler's id plus ``job_id``.
    owners
        The worker that reads (and stages) each chunk; default: :func:`chunk_owners`
        over the workers there now. A job passes the same map every iteration
        (:class:`cryodask.cluster.job.JobSession`) so that chunks stay where they are.

    Returns
    -------
    list[distributed.Future]
        One per chunk, in order.
    """
    if not isinstance(particles, (ParticleStore, StarParticles)):
        particles = open_particles(particles)
    path = str(particles.path.resolve())
    star = None
    if isinstance(particles, StarParticles):
        if scratch_dir is not None:
            raise UserError("--scratch_dir", f"{particles.path} is a STAR file: scratch holds a particle store; "
                                             "import the particles first (cryodask import --i "
                                             f"{particles.path} --o particles.zarr) or run without --scratch_dir")
        star = (particles.chunk, particles.pixel_size, tuple(str(b) for b in particles.base_dirs))
    workers = list(client.scheduler_info(n_workers=-1)["workers"]) if _takes_n_workers(client) else \
        list(client.scheduler_info()["workers"])
    if not workers:
        client.wait_for_workers(1)
        workers = list(client.scheduler_info()["workers"])
    if owners is None:
        owners = chunk_owners(particles.n_chunks, workers, parallel_disc_io=parallel_disc_io)
    elif len(owners) != particles.n_chunks:
        raise ValueError(f"owners names {len(owners)} workers for {particles.n_chunks} chunks")
    tag = uuid.uuid4().hex[:8]

    staged: dict[str, Any] = {}
    if scratch_dir is not None:
        if not job_id:
            raise ValueError("chunk_futures needs a job_id with scratch_dir")
        run_id = run_id or f"{client.scheduler_info().get('id', 'scheduler')}-{job_id}"
        shares: dict[str, list[int]] = collections.defaultdict(list)
        for i, w in enumerate(owners):
            shares[w].append(i)
        for w, share in shares.items():
            # pinned loosely: if the worker is gone, staging elsewhere is harmless (reads check what is there)
            staged[w] = client.submit(stage, path, str(scratch_dir), job_id=job_id, chunks=share,
                                      keep_free_gb=keep_free_gb, reuse=reuse, run_id=run_id, partial=partial,
                                      workers=[w], allow_other_workers=True, pure=False,
                                      key=f"cryodask-stage-{tag}-{w}")
    return [client.submit(read_chunk, path, i, staged=staged.get(w), preread=preread, star=star, owner=w,
                          workers=[w], allow_other_workers=parallel_disc_io, pure=False,
                          key=f"cryodask-chunk-{tag}-{i}")
            for i, w in enumerate(owners)]


def _takes_n_workers(client) -> bool:
    import inspect

    return "n_workers" in inspect.signature(client.scheduler_info).parameters


# ---------------------------------------------------------------------------------------------
# command-line options (shared by every job that reads particles)


def add_scratch_args(parser) -> None:
    """Add RELION's I/O options to a job's ``argparse`` parser (one argument group)."""
    g = parser.add_argument_group("scratch and disc I/O (RELION's options)")
    g.add_argument("--scratch_dir", default=None, metavar="DIR",
                   help="copy each node's share of the particle store to this node-local folder first")
    g.add_argument("--keep_free_scratch", type=float, default=10.0, metavar="GB",
                   help="GB to leave free on the scratch disk (default 10)")
    g.add_argument("--keep_scratch", action="store_true", help="keep the scratch copy after the job")
    g.add_argument("--reuse_scratch", action="store_true",
                   help="reuse a kept scratch copy, after checking it against the store's manifest")
    g.add_argument("--preread_images", action="store_true",
                   help="keep the particle images in the workers' memory across iterations")
    g.add_argument("--no_parallel_disc_io", action="store_true",
                   help="one worker reads all particles (for file systems that suffer under many readers)")


def scratch_options(args) -> dict[str, Any]:
    """The keyword arguments of :func:`chunk_futures` from :func:`add_scratch_args`' options."""
    if args.keep_free_scratch < 0:
        raise UserError("--keep_free_scratch", f"{args.keep_free_scratch:g} GB is negative; give 0 or more")
    if args.reuse_scratch and not args.scratch_dir:
        raise UserError("--reuse_scratch", "needs --scratch_dir (the folder holding the copy to reuse)")
    return {"scratch_dir": args.scratch_dir, "keep_free_gb": args.keep_free_scratch, "reuse": args.reuse_scratch,
            "preread": args.preread_images, "parallel_disc_io": not args.no_parallel_disc_io}
