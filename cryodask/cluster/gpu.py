"""GPUs: the cryo-EM parameters (Scipion's ``use_gpu`` / ``gpu_list``), RELION's ``--gpu`` syntax,
assignment of GPUs to threads, ``%(GPU)s`` substitution, and a local cluster with one worker per GPU.

Parameters follow the convention Scipion set for cryo-EM protocols: ``use_gpu``
(bool) and ``gpu_list``, GPU ids separated by spaces (``"0 1"``). RELION's
``--gpu`` syntax (ranks separated by ``:``, a rank's GPUs by ``,``) is accepted
and translated (:func:`parse_gpu_option`).

Assignment (:func:`assign_gpus`, Scipion's rules): thread 0 is the master and
uses no GPU; the other threads share the GPUs round-robin when there are fewer
GPUs than threads, and take contiguous chunks (the remainder spread over the
first threads) when there are more.

Locally every GPU gets its own worker process whose ``CUDA_VISIBLE_DEVICES``
holds only that GPU (so the worker's code always uses device 0) and which
advertises the resource ``GPU=1``; GPU tasks ask for it with
``client.submit(..., resources={"GPU": 1})``. Under SLURM the same comes from
``--gres=gpu:1`` per job (:mod:`cryodask.cluster.slurm`).
"""

from __future__ import annotations

import contextlib
import importlib.util
import os
import re
import warnings
from collections.abc import Iterator, Sequence
from typing import Any

from cryodask.cluster.local import worker_environ
from cryodask.errors import UserError

#: the resource GPU workers advertise and GPU tasks request
GPU_RESOURCE = "GPU"


class GpuSyntaxWarning(UserWarning):
    """A ``--gpu`` value whose meaning in RELION differs from what cryodask does with it."""


GpuList = str | Sequence[int] | None


# ---------------------------------------------------------------------------------------------
# parsing


def parse_gpu_list(text: GpuList, *, option: str = "--gpu_list") -> list[int]:
    """GPU ids from Scipion's ``gpu_list`` (``"0 1"``; commas are taken as separators too).

    A sequence of ints is returned as a list. Repeated ids are kept: two workers then share that GPU.

    Raises
    ------
    UserError
        An id that is not a non-negative integer.
    """
    if text is None:
        return []
    if not isinstance(text, str):
        ids = list(text)
        for g in ids:
            if not isinstance(g, int) or isinstance(g, bool) or g < 0:
                raise UserError(option, f"{g!r} is not a GPU id; give GPU numbers such as \"0 1\"")
        return ids
    ids = []
    for tok in re.split(r"[\s,]+", text.strip()):
        if not tok:
            continue
        if not tok.isdigit():
            raise UserError(option, f"{tok!r} in {text!r} is not a GPU id; give GPU numbers separated by spaces, "
                                    "such as \"0 1\"")
        ids.append(int(tok))
    return ids


def parse_gpu_option(text: str | None, *, option: str = "--gpu") -> list[int] | None:
    """The GPUs of a ``--gpu`` value: ``None`` (all GPUs) for an empty value, else the ids.

    Accepts Scipion's ``"0 1"`` and RELION's syntax: ``"0:1"`` (one GPU per MPI
    rank) and ``"0,1:2,3"`` (ranks separated by ``:``, a rank's GPUs by ``,``),
    both translated to the GPU list ``0 1`` / ``0 1 2 3``: cryodask runs one
    worker process per GPU, and the scheduler plays RELION's master. A list with
    commas and no colon (``"0,1,2,3"``) means in RELION that *every* rank uses
    all those GPUs (RELION issues #427 and #1056: usually a mistake); cryodask
    gives each worker one of them and warns (:class:`GpuSyntaxWarning`).
    """
    if text is None or not str(text).strip():
        return None
    text = str(text).strip()
    if ":" not in text and "," not in text:
        return parse_gpu_list(text, option=option)
    ranks = [r.strip() for r in text.split(":")]
    ids = []
    for r in ranks:
        if not r:
            raise UserError(option, f"{text!r} has an empty rank between ':'; write RELION's syntax as \"0:1\" "
                                    "or \"0,1:2,3\", or Scipion's as \"0 1\"")
        ids.extend(parse_gpu_list(r.replace(",", " "), option=option))
    if ":" not in text and len(set(ids)) > 1:
        warnings.warn(f"{option} {text!r}: in RELION this gives every MPI rank all of GPUs {text} "
                      "(RELION issues #427, #1056); cryodask runs one worker per GPU. Write "
                      f"\"{' '.join(map(str, ids))}\" (or \"{':'.join(map(str, ids))}\") to say so.",
                      GpuSyntaxWarning, stacklevel=2)
    return ids


def format_gpu_list(gpus: Sequence[int]) -> str:
    """Scipion's form of a GPU list: ``[0, 1]`` -> ``"0 1"``."""
    return " ".join(str(g) for g in gpus)


# ---------------------------------------------------------------------------------------------
# assignment and %(GPU)s


def assign_gpus(n_threads: int, gpu_list: GpuList) -> list[list[int]]:
    """The GPUs each thread uses; thread 0 is the master and uses none.

    Scipion's rules: with at least as many worker threads (``n_threads - 1``) as
    GPUs, the GPUs are shared round-robin (thread ``i`` gets GPU ``(i-1) % n``);
    with more GPUs than worker threads, each thread gets a contiguous chunk, the
    remainder spread one each over the first threads. A single thread
    (``n_threads == 1``) has no one to hand work to: it is master and worker and
    gets every GPU, as a RELION run without MPI does.

    Examples
    --------
    >>> assign_gpus(3, "0 1")
    [[], [0], [1]]
    >>> assign_gpus(5, "0 1")
    [[], [0], [1], [0], [1]]
    >>> assign_gpus(3, "0 1 2 3")
    [[], [0, 1], [2, 3]]
    >>> assign_gpus(3, "0 1 2")
    [[], [0, 1], [2]]
    """
    if int(n_threads) != n_threads or n_threads < 1:
        raise ValueError(f"n_threads must be a positive integer, not {n_threads!r}")
    gpus = parse_gpu_list(gpu_list)
    if not gpus:
        return [[] for _ in range(n_threads)]
    if n_threads == 1:
        return [list(gpus)]
    workers = n_threads - 1
    if len(gpus) <= workers:
        return [[]] + [[gpus[i % len(gpus)]] for i in range(workers)]
    base, extra = divmod(len(gpus), workers)
    out: list[list[int]] = [[]]
    start = 0
    for i in range(workers):
        n = base + (1 if i < extra else 0)
        out.append(list(gpus[start:start + n]))
        start += n
    return out


_GPU_PLACEHOLDER = "%(GPU)s"
_CVD_PLACEHOLDER = re.compile(r"(CUDA_VISIBLE_DEVICES=)(['\"]?)%\(GPU\)s")


def substitute_gpu(command: str, gpus: Sequence[int] | str) -> str:
    """Replace ``%(GPU)s`` in a command by the GPUs of its thread (Scipion's placeholder).

    Space-separated (``--gpu %(GPU)s`` -> ``--gpu 0 1``), or comma-separated
    where it follows ``CUDA_VISIBLE_DEVICES=`` (``CUDA_VISIBLE_DEVICES=0,1``).
    A command without the placeholder is returned unchanged; other ``%``
    characters are left alone.
    """
    ids = [str(g) for g in parse_gpu_list(gpus)]
    command = _CVD_PLACEHOLDER.sub(lambda m: m.group(1) + m.group(2) + ",".join(ids), command)
    return command.replace(_GPU_PLACEHOLDER, " ".join(ids))


# ---------------------------------------------------------------------------------------------
# devices


def visible_devices(gpus: Sequence[int], parent: str | None = None) -> str:
    """``CUDA_VISIBLE_DEVICES`` for a worker using ``gpus`` (ids as this process numbers them).

    When this process itself runs under ``CUDA_VISIBLE_DEVICES`` (``parent``,
    default from the environment), GPU ``i`` is its ``i``-th entry: with
    ``CUDA_VISIBLE_DEVICES=2,3``, GPU 1 is physical GPU 3.
    """
    if parent is None:
        parent = os.environ.get("CUDA_VISIBLE_DEVICES")
    if parent is None or not parent.strip():
        return ",".join(str(g) for g in gpus)
    entries = [e.strip() for e in parent.split(",") if e.strip()]
    out = []
    for g in gpus:
        if g >= len(entries):
            raise UserError("--gpu_list", f"GPU {g} is not among the {len(entries)} GPUs this process may use "
                                          f"(CUDA_VISIBLE_DEVICES={parent}); give ids 0-{len(entries) - 1}")
        out.append(entries[g])
    return ",".join(out)


def device_count() -> int:
    """CUDA devices CuPy sees (0 without CuPy or a driver)."""
    try:
        import cupy

        return int(cupy.cuda.runtime.getDeviceCount())
    except Exception:
        return 0


def check_gpus(gpus: Sequence[int] | None, *, check_devices: bool = True, n_devices: int | None = None,
               option: str = "--gpu") -> list[int]:
    """Check that the GPUs can be used here; returns the GPU ids (all devices for ``None``).

    Parameters
    ----------
    gpus
        Requested ids, or None for every device.
    check_devices
        Ask CuPy whether a device is there (:func:`cryodask.backend.gpu_available`).
        Tests without CUDA turn it off and give ``n_devices``.
    n_devices
        Number of devices to check the ids against (default: CuPy's count).

    Raises
    ------
    UserError
        CuPy is not installed, no device is visible, or an id does not exist.
    """
    from cryodask.backend import gpu_available

    if check_devices and not gpu_available():
        if importlib.util.find_spec("cupy") is None:
            raise UserError(option, "CuPy is not installed, so cryodask cannot use a GPU; install it "
                                    "(pip install 'cryodask[gpu]') on a machine with a CUDA GPU, or run without --gpu")
        raise UserError(option, "CuPy sees no CUDA GPU on this machine (no device or no driver; "
                                f"CUDA_VISIBLE_DEVICES={os.environ.get('CUDA_VISIBLE_DEVICES', '<unset>')}); "
                                "check nvidia-smi, or run without --gpu")
    if n_devices is None:
        n_devices = device_count() if check_devices else None
    if gpus is None:
        if n_devices is None:
            raise UserError(option, "without a device check the GPU ids must be given (for example \"0 1\")")
        return list(range(n_devices))
    gpus = list(gpus)
    if not gpus:
        raise UserError(option, "no GPU given; list GPU ids such as \"0 1\", or give --gpu alone for all GPUs")
    if n_devices is not None:
        bad = sorted({g for g in gpus if g >= n_devices})
        if bad:
            have = "no GPU" if n_devices == 0 else f"{n_devices} GPU{'s' if n_devices > 1 else ''} (0-{n_devices - 1})"
            raise UserError(option, f"GPU {', '.join(map(str, bad))} does not exist: this machine has {have}; "
                                    "list GPUs that exist (nvidia-smi -L), or give --gpu alone for all of them")
    return gpus


def gpu_task_resources(client) -> dict[str, float] | None:
    """``resources=`` for GPU tasks on this client's cluster: ``{"GPU": 1}`` when its workers advertise
    GPUs, else None (a CPU cluster: tasks run anywhere, on NumPy)."""
    workers = client.scheduler_info()["workers"].values()
    return {GPU_RESOURCE: 1} if any((w.get("resources") or {}).get(GPU_RESOURCE) for w in workers) else None


# ---------------------------------------------------------------------------------------------
# the local GPU cluster: one worker process per GPU


def local_gpu_worker_spec(gpus: Sequence[int], *, n_workers: int | None = None, threads: int = 1,
                          memory_limit: str | int | float = "auto", parent_visible: str | None = None,
                          env: dict[str, str] | None = None, quiet: bool = True) -> dict[str, dict[str, Any]]:
    """``SpecCluster`` worker specs: one ``Nanny`` per GPU, each seeing only its GPU(s).

    ``n_workers`` defaults to one per GPU; otherwise worker ``i`` gets
    ``assign_gpus(n_workers + 1, gpus)[i + 1]`` (the scheduler is the master).
    Each worker advertises ``GPU=1`` and runs ``threads`` threads (1 by default:
    cuFFT plans are cached per thread and per device). ``memory_limit="auto"``
    splits the machine's memory evenly between the workers.
    """
    from distributed import Nanny
    from distributed.system import MEMORY_LIMIT

    gpus = list(gpus)
    if not gpus:
        raise ValueError("local_gpu_worker_spec needs at least one GPU")
    n_workers = n_workers or len(gpus)
    per_worker = assign_gpus(n_workers + 1, gpus)[1:]
    if memory_limit == "auto":
        memory_limit = int(MEMORY_LIMIT // n_workers)
    spec = {}
    for i, mine in enumerate(per_worker):
        worker_env = {**worker_environ(threads), **(env or {}),
                      "CUDA_VISIBLE_DEVICES": visible_devices(mine, parent_visible)}
        spec[f"gpu-{i}"] = {"cls": Nanny, "options": {
            "nthreads": threads, "memory_limit": memory_limit, "resources": {GPU_RESOURCE: 1},
            "env": worker_env, "name": f"gpu-{i}", "silence_logs": 40 if quiet else 20}}
    return spec


def local_gpu_cluster(gpu_list: GpuList = None, *, n_workers: int | None = None, threads: int = 1,
                      memory_limit: str | int | float = "auto", check_devices: bool = True,
                      n_devices: int | None = None, dashboard: bool = False, quiet: bool = True):
    """A local cluster with one worker process per GPU (see :func:`local_gpu_worker_spec`).

    ``gpu_list`` None means every GPU. ``check_devices=False`` (tests) skips the
    CuPy check, so the workers start with fake ids; give ``n_devices`` to still
    check the ids. Call inside ``dask.config.set({"distributed.worker.daemon":
    False})`` or use :func:`local_gpu_client`.
    """
    from distributed import Scheduler, SpecCluster

    ids = None if gpu_list is None else parse_gpu_list(gpu_list)
    gpus = check_gpus(ids, check_devices=check_devices, n_devices=n_devices)
    workers = local_gpu_worker_spec(gpus, n_workers=n_workers, threads=threads, memory_limit=memory_limit,
                                    quiet=quiet)
    # the scheduler's HTTP server always starts: on a free port, never on 8787 that another cluster may hold
    scheduler = {"cls": Scheduler, "options": {"dashboard_address": ":0", "dashboard": dashboard,
                                                "host": "127.0.0.1"}}
    return SpecCluster(workers=workers, scheduler=scheduler, silence_logs=40 if quiet else 20,
                       name="cryodask-local-gpu")


@contextlib.contextmanager
def local_gpu_client(gpu_list: GpuList = None, *, n_workers: int | None = None, threads: int = 1,
                     memory_limit: str | int | float = "auto", check_devices: bool = True,
                     n_devices: int | None = None, dashboard: bool = False,
                     quiet: bool = True) -> Iterator["distributed.Client"]:  # noqa: F821
    """:func:`local_gpu_cluster` and its client, closed on exit (and on errors or Ctrl-C)."""
    import dask
    from distributed import Client

    with dask.config.set({"distributed.worker.daemon": False,
                          "logging.distributed": "error" if quiet else "info"}):
        cluster = local_gpu_cluster(gpu_list, n_workers=n_workers, threads=threads, memory_limit=memory_limit,
                                    check_devices=check_devices, n_devices=n_devices, dashboard=dashboard,
                                    quiet=quiet)
        try:
            with Client(cluster) as client:
                client.wait_for_workers(len(cluster.worker_spec))
                yield client
        finally:
            cluster.close()
