"""SLURM: worker jobs from dask-jobqueue's ``SLURMCluster``, or a whole job inside one allocation.

Two ways to run on SLURM:

* **Workers as jobs** (:func:`slurm_client`): the job runs where it is started
  (a login node, or a small driver job) and submits one SLURM job per worker
  group, built from ``jobqueue.slurm.*`` (see ``cluster_configs/slurm-*.yaml``).
  ``adapt`` replaces workers SLURM took away (preemption, node failure);
  ``--lifetime`` / ``--lifetime-stagger`` in ``worker-extra-args`` make workers
  leave cleanly before their walltime. Every job carries a unique name
  (``cryodask-<token>``), and all of them are cancelled when the job ends, fails
  or is interrupted (Ctrl-C, SIGTERM), also those still pending.
* **Inside one allocation** (:func:`runner_client`): ``srun -n N cryodask ...
  --scheduler_file F`` runs the same command on every task; dask-jobqueue's
  ``SLURMRunner`` makes task 0 the scheduler, task 1 the job itself and the
  others workers. See ``pipelines/``.

The configuration given to the client (the file's ``distributed.*`` and
``cryodask.*`` sections) reaches the SLURM workers through
``DASK_INTERNAL_INHERIT_CONFIG`` in the job script: they run in fresh processes
that do not see the client's ``dask.config.set`` scope.
"""

from __future__ import annotations

import contextlib
import copy
import getpass
import logging
import math
import os
import signal
import subprocess
import sys
import threading
import time
import uuid
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import dask

from cryodask.cluster.config import ClusterSpec
from cryodask.errors import UserError

logger = logging.getLogger("cryodask.cluster")

P = "jobqueue.slurm."
#: scheduler address shown by ``cryodask cluster show`` (the real one exists only once a job runs)
SCHEDULER_PLACEHOLDER = "tcp://SCHEDULER_HOST:PORT"


def import_jobqueue():
    """Import dask-jobqueue, keeping this process's Ctrl-C handler.

    ``dask_jobqueue.runner`` replaces the SIGINT handler at import time with one
    that calls ``sys.exit()`` (exit status 0); a job interrupted with Ctrl-C must
    raise ``KeyboardInterrupt`` instead, clean up and exit non-zero.
    """
    if "dask_jobqueue" in sys.modules:
        return sys.modules["dask_jobqueue"]
    main = threading.current_thread() is threading.main_thread()
    old = signal.getsignal(signal.SIGINT) if main else None
    real_signal = signal.signal
    if not main:  # a job run from a thread (a notebook's, a GUI's): Python refuses handlers there
        def signal_or_skip(signum, handler):
            try:
                return real_signal(signum, handler)
            except ValueError:
                return signal.getsignal(signum)

        signal.signal = signal_or_skip
    try:
        import dask_jobqueue
    except ModuleNotFoundError:
        raise UserError("--cluster", "dask-jobqueue is not installed, so SLURM clusters are unavailable; "
                                     "pip install 'cryodask[slurm]'") from None
    finally:
        signal.signal = real_signal
        if main and old is not None:
            signal.signal(signal.SIGINT, old)
    return dask_jobqueue


def walltime_lifetime_args(worker_args: list[str]) -> list[str]:
    """``--lifetime`` / ``--lifetime-stagger`` for a job's walltime, when the configuration sets no lifetime.

    A worker SLURM kills at its walltime dies with its tasks (each counts a failure,
    dask's ``allowed-failures``); one that reaches its ``--lifetime`` first hands its
    results over and leaves cleanly, and ``adapt`` starts a replacement. Staggered,
    so the workers of jobs started together do not all leave at once. Leaves before
    the walltime by 10 % (at most 10 min), staggered over 5 % (at most 5 min).
    """
    from cryodask.cluster.config import walltime_seconds

    if any(a == "--lifetime" or a.startswith("--lifetime=") for a in worker_args) or \
            dask.config.get("distributed.worker.lifetime.duration", None):
        return []
    wall = walltime_seconds(dask.config.get(P + "walltime", None) or "")
    if not wall or wall < 120:
        return []
    margin, stagger = min(600.0, 0.10 * wall), min(300.0, 0.05 * wall)
    return ["--lifetime", f"{int(wall - margin - stagger)}s", "--lifetime-stagger", f"{int(stagger)}s"]


def _gpu_worker_args(spec: ClusterSpec, wargs: list[str]) -> list[str]:
    """``worker-extra-args`` plus ``--resources GPU=1`` for GPU jobs that do not advertise it yet."""
    if not spec.gpu or any(a == "--resources" or a.startswith("--resources=") for a in wargs):
        return wargs
    res = ",".join(f"{k}={v:g}" if isinstance(v, float) else f"{k}={v}" for k, v in spec.gpu_resources.items())
    return [*wargs, "--resources", res]


# jobqueue.slurm keys whose keyword argument is not the key with "_" for "-"
_KWARG_NAMES = {"name": "job_name"}
# settings of the cluster (its scheduler), not of each job
_CLUSTER_ONLY = ("scheduler_options", "shared_temp_directory")
# deprecated keys: passed on only when set (dask-jobqueue warns about them)
_DEPRECATED = ("extra", "env-extra", "job-extra", "header-skip", "project")


def slurm_kwargs(spec: ClusterSpec, *, job_name: str | None = None, log_directory: str | os.PathLike | None = None,
                 cores: int | None = None) -> dict[str, Any]:
    """Keyword arguments for ``SLURMCluster`` / ``SLURMJob``: the active ``jobqueue.slurm`` config, all of it.

    Every setting is passed explicitly: dask-jobqueue reads the ones it is not
    given from the live dask config each time it makes a job, so a replacement
    job submitted later (adapt) would otherwise see whatever configuration is
    active then, not this cluster's.
    """
    kwargs: dict[str, Any] = {}
    accepted = _accepted_kwargs()
    for key, value in (dask.config.get("jobqueue.slurm", {}) or {}).items():
        key = key.replace("_", "-")
        if key in _DEPRECATED and not value:
            continue
        name = _KWARG_NAMES.get(key, key.replace("-", "_"))
        if name not in accepted:  # e.g. a stray key in ~/.config/dask (cryodask cluster check names them)
            logger.warning("jobqueue.slurm.%s is not a dask-jobqueue setting; ignored", key)
            continue
        kwargs[name] = copy.deepcopy(value)
    prologue = [str(x) for x in (dask.config.get(P + "job-script-prologue") or [])]
    sections = "".join(f"the cluster configuration's {', '.join(sorted(spec.worker_config))} sections and "
                       for _ in [0] if spec.worker_config)
    prologue.append(f"# {sections}the memory settings for the workers (base64 JSON)")
    prologue.append(f"export DASK_INTERNAL_INHERIT_CONFIG={dask.config.serialize(_with_memory_environ(spec.worker_config))}")
    kwargs["job_script_prologue"] = prologue
    wargs = [str(a) for a in (dask.config.get(P + "worker-extra-args") or [])]
    kwargs["worker_extra_args"] = _gpu_worker_args(spec, wargs + walltime_lifetime_args(wargs))
    if job_name is not None:
        kwargs["job_name"] = job_name
    if log_directory is not None:
        kwargs["log_directory"] = str(log_directory)
    if cores is not None:
        kwargs["cores"] = cores
    return kwargs


def _with_memory_environ(worker_config: dict[str, Any]) -> dict[str, Any]:
    """``worker_config`` with :data:`cryodask.cluster.local.MEMORY_ENVIRON` added to the nanny's
    pre-spawn environment, where the file does not set those variables itself."""
    from cryodask.cluster.local import MEMORY_ENVIRON

    out = copy.deepcopy(dict(worker_config))
    env = out.setdefault("distributed", {}).setdefault("nanny", {}).setdefault("pre-spawn-environ", {})
    for k, v in MEMORY_ENVIRON.items():
        env.setdefault(k, v)
    return out


def _accepted_kwargs() -> set[str]:
    """Keyword arguments ``SLURMCluster`` passes on (its own, ``Job``'s and ``SLURMJob``'s)."""
    import inspect

    import_jobqueue()
    from dask_jobqueue.core import Job, JobQueueCluster
    from dask_jobqueue.slurm import SLURMJob

    return {p for cls in (SLURMJob, Job, JobQueueCluster) for p in inspect.signature(cls.__init__).parameters} - {
        "self", "kwargs", "base_class_kwargs", "job_kwargs"}


def render_job_script(spec: ClusterSpec, *, job_name: str | None = None,
                      log_directory: str | os.PathLike | None = None) -> str:
    """The sbatch script one worker job gets, without SLURM or a scheduler (``cryodask cluster show``).

    Call inside the configuration's scope (:func:`cryodask.cluster.config.config_scope`).
    The scheduler address is a placeholder. As ``SLURMCluster`` does, this
    creates ``log-directory`` when it is set.
    """
    import_jobqueue()
    from dask_jobqueue.slurm import SLURMJob

    kwargs = slurm_kwargs(spec, job_name=job_name or user_job_name("TOKEN"), log_directory=log_directory)
    for k in _CLUSTER_ONLY:
        kwargs.pop(k, None)
    job = SLURMJob(scheduler=SCHEDULER_PLACEHOLDER, name="dummy-name", **kwargs)
    return job.job_script()


def user_job_name(token: str | None = None) -> str:
    """``<name>-<token>``: the configured job name (``cryodask`` for dask's default) made unique."""
    base = dask.config.get(P + "name", None)
    if not base or base == "dask-worker":
        base = "cryodask"
    return f"{base}-{token or uuid.uuid4().hex[:8]}"


def squeue_ids(job_name: str, *, states: str | None = None) -> list[str]:
    """Job ids of this user's jobs called ``job_name`` (empty when squeue fails)."""
    cmd = ["squeue", "-h", "-u", getpass.getuser(), "-n", job_name, "-o", "%i"]
    if states:
        cmd += ["-t", states]
    try:
        out = subprocess.run(cmd, capture_output=True, text=True, timeout=30)
    except (OSError, subprocess.TimeoutExpired):
        return []
    return out.stdout.split() if out.returncode == 0 else []


def cancel_jobs(job_name: str) -> None:
    """``scancel`` every job of this user called ``job_name``: running, pending or still being submitted."""
    with contextlib.suppress(OSError, subprocess.TimeoutExpired):
        subprocess.run(["scancel", "-u", getpass.getuser(), "-n", job_name], capture_output=True, timeout=60)


def test_submit(script: str, *, source: str) -> None:
    """``sbatch --test-only`` on a job script (nothing is submitted); UserError with sbatch's reason if refused."""
    import tempfile

    with tempfile.NamedTemporaryFile("w", suffix=".sh", delete=False) as fh:
        fh.write(script)
    try:
        out = subprocess.run(["sbatch", "--test-only", fh.name], capture_output=True, text=True, timeout=60)
    except FileNotFoundError:
        raise UserError(source, "sbatch is not on PATH: run the job where SLURM's commands are available "
                                "(a login node), or use a local configuration") from None
    except subprocess.TimeoutExpired:
        return  # a slow controller is no reason to refuse; the real submission will tell
    finally:
        os.unlink(fh.name)
    if out.returncode != 0:
        lines = [ln.strip() for ln in (out.stderr or out.stdout).splitlines() if ln.strip()]
        reason = lines[-1] if lines else f"exit status {out.returncode}"
        raise UserError(source, f"SLURM refuses the worker job ({reason}); fix jobqueue.slurm "
                                "(cryodask cluster show prints the job script)")


def _n_workers(client) -> int:
    return len(client.scheduler_info(n_workers=-1)["workers"]) if _takes_n_workers(client) else \
        len(client.scheduler_info()["workers"])


def _takes_n_workers(client) -> bool:
    import inspect

    return "n_workers" in inspect.signature(client.scheduler_info).parameters


def wait_for_slurm_workers(client, job_name: str, n: int, *, timeout: float | None, source: str,
                           log_directory: str | None = None, poll: float = 0.25) -> None:
    """Wait until ``n`` workers have connected; UserError when the jobs die first or ``timeout`` passes."""
    t0 = time.monotonic()
    announced = False
    last_check = t0
    while _n_workers(client) < n:
        now = time.monotonic()
        if timeout is not None and now - t0 > timeout:
            raise UserError(source, f"no SLURM worker connected within {timeout:g} s (jobs {job_name}: "
                                    f"squeue -n {job_name}); raise cryodask.cluster.wait-timeout or pick a less "
                                    "busy partition")
        if not announced and now - t0 > 5:
            logger.warning("waiting for SLURM to start the worker jobs (squeue -n %s)", job_name)
            announced = True
        if now - last_check > 5:
            last_check = now
            if not squeue_ids(job_name) and _n_workers(client) < n:
                logs = f" in {log_directory}" if log_directory else " (slurm-<jobid>.out in the submit folder)"
                raise UserError(source, f"the SLURM worker jobs ended before {n} worker(s) connected; read their "
                                        f"logs{logs}, and check interface / scheduler-options host (the workers "
                                        "must reach the scheduler)")
        time.sleep(poll)


@contextlib.contextmanager
def slurm_client(spec: ClusterSpec, *, jobs: int | None = None, cores: int | None = None,
                 log_directory: str | os.PathLike | None = None, check_devices: bool = True,
                 wait: bool = True, quiet: bool = True) -> Iterator["distributed.Client"]:  # noqa: F821
    """A ``SLURMCluster`` from the active configuration, scaled or adaptive, and its client.

    Call inside the configuration's scope. On exit (normal, error, Ctrl-C) the
    client and cluster are closed and every job of this cluster is cancelled
    (``scancel -n <unique job name>``), pending ones included.

    Parameters
    ----------
    spec
        The ``cryodask`` section (:func:`cryodask.cluster.config.current_spec`).
    jobs
        Jobs to start (default ``spec.jobs``, else 1); ignored with ``spec.adapt``.
    cores
        Overrides ``jobqueue.slurm.cores`` (``--j`` times the processes per job).
    wait
        Wait for the first worker (for ``jobs``, or adapt's minimum, workers when
        the minimum is above 0).
    check_devices
        With GPUs, check that every worker sees one (CuPy); tests with fake GPUs turn it off.
    """
    import_jobqueue()
    from dask_jobqueue import SLURMCluster
    from distributed import Client

    job_name = user_job_name()
    kwargs = slurm_kwargs(spec, job_name=job_name, log_directory=log_directory, cores=cores)
    log_dir = str(log_directory) if log_directory else dask.config.get(P + "log-directory", None)
    cluster = client = None
    try:
        with dask.config.set({"logging.distributed": "error"} if quiet else {}):
            try:
                cluster = SLURMCluster(**kwargs)
            except (OSError, ValueError) as exc:
                raise UserError(spec.source, f"cannot start the scheduler for the SLURM workers ({exc}); "
                                             "check jobqueue.slurm.interface / scheduler-options") from None
        # sbatch's verdict first, so that a refused job script is an error here and not a log line later
        test_submit(cluster.job_script(), source=spec.source)
        client = Client(cluster)
        processes = cluster._dummy_job.worker_processes if hasattr(cluster, "_dummy_job") else 1
        if spec.adapt is not None:
            lo, hi = spec.adapt
            cluster.adapt(minimum_jobs=lo, maximum_jobs=hi, **spec.adapt_options)
            n_wait = lo * processes
        else:
            n_jobs = jobs or spec.jobs or 1
            cluster.scale(jobs=n_jobs)
            n_wait = n_jobs * processes
        if wait and n_wait > 0:
            wait_for_slurm_workers(client, job_name, 1, timeout=spec.wait_timeout, source=spec.source,
                                   log_directory=log_dir)
        if spec.gpu and check_devices and _n_workers(client):
            from cryodask.backend import gpu_available

            seen = client.run(gpu_available)
            blind = sorted(w for w, ok in seen.items() if not ok)
            if blind:
                raise UserError(spec.source, f"{len(blind)} of {len(seen)} SLURM GPU workers see no GPU with CuPy "
                                             f"(e.g. {blind[0]}); install cryodask[gpu] where the jobs run and ask "
                                             "for a GPU partition / --gres=gpu:1")
        yield client
    finally:
        if client is not None:
            with contextlib.suppress(Exception):
                client.close()
        if cluster is not None:
            with contextlib.suppress(Exception):
                cluster.close()
        cancel_jobs(job_name)


# ---------------------------------------------------------------------------------------------
# inside one allocation: srun + SLURMRunner


def in_srun_step() -> bool:
    """True inside a task that srun started (not the batch script itself)."""
    return "SLURM_STEP_ID" in os.environ and "SLURM_PROCID" in os.environ and "SLURM_NTASKS" in os.environ


def restart_task_as_worker(threads: int = 1) -> None:
    """Restart this srun task's process with a worker's environment if it will be a worker.

    ``SLURMRunner`` makes tasks 2+ workers inside the process srun started, so no nanny sets
    :func:`cryodask.cluster.local.worker_environ` for them; glibc and NumPy read it only at
    start-up. The task therefore executes itself again, same command line, with those variables
    added (values already in the environment win). Tasks 0 and 1 and a restarted task return.
    """
    from cryodask.cluster.local import worker_environ

    if int(os.environ.get("SLURM_PROCID", "0")) < 2 or os.environ.get("CRYODASK_WORKER_ENVIRON"):
        return
    env = {**worker_environ(threads), **os.environ, "CRYODASK_WORKER_ENVIRON": "1"}
    sys.stdout.flush()
    sys.stderr.flush()
    # orig_argv keeps "-m cryodask" (argv[0] would be the package's __main__.py run as a script)
    os.execve(sys.executable, [sys.executable, *sys.orig_argv[1:]], env)


def _task_memory_limit() -> int | str:
    """Memory this srun task may use, from SLURM's environment ("auto" when unknown)."""
    try:
        if os.environ.get("SLURM_MEM_PER_CPU"):
            cpus = int(os.environ.get("SLURM_CPUS_PER_TASK", "1"))
            return int(os.environ["SLURM_MEM_PER_CPU"]) * cpus * 2**20
        if os.environ.get("SLURM_MEM_PER_NODE"):
            tasks = os.environ.get("SLURM_NTASKS_PER_NODE") or os.environ.get("SLURM_TASKS_PER_NODE", "1")
            n = int(tasks.split("(")[0].split(",")[0])
            return int(os.environ["SLURM_MEM_PER_NODE"]) * 2**20 // max(1, n)
    except ValueError:
        pass
    return "auto"


@contextlib.contextmanager
def runner_client(scheduler_file: str | os.PathLike, *, threads: int = 1, gpu: bool = False,
                  gpu_resources: dict[str, float] | None = None, wait: bool = True,
                  quiet: bool = True) -> Iterator["distributed.Client"]:  # noqa: F821
    """The whole job inside one srun step (dask-jobqueue's ``SLURMRunner``).

    Every task runs the same command. Task 0 becomes the scheduler and tasks 2+
    workers: for them this function does not return, the process exits (status
    0) when the job is done. Task 1 runs the job: it gets the client, once all
    workers have connected. ``{job_id}`` in ``scheduler_file`` becomes the SLURM
    job id.
    """
    import_jobqueue()
    from dask_jobqueue.slurm import SLURMRunner, WorldTooSmallException
    from distributed import Client

    n_tasks = int(os.environ.get("SLURM_NTASKS", "0"))
    if n_tasks < 3:
        raise UserError("--scheduler_file", f"this srun step has {n_tasks} task(s); a job inside one allocation "
                                            "needs at least 3 (scheduler, job, one worker): srun -n 3 or more")
    restart_task_as_worker(threads)
    worker_options: dict[str, Any] = {"nthreads": threads, "memory_limit": _task_memory_limit()}
    if gpu:
        worker_options["resources"] = dict(gpu_resources or {"GPU": 1})
    scheduler_options = {"dashboard_address": ":0"}

    def finished(*_):  # the scheduler's or a worker's part is over: leave quietly
        raise SystemExit(0)

    main = threading.current_thread() is threading.main_thread()
    old = signal.signal(signal.SIGINT, finished) if main else None
    dlog = logging.getLogger("distributed")
    level = dlog.level
    if quiet:  # the scheduler's and workers' INFO lines would fill the job's output
        dlog.setLevel(logging.WARNING)
    try:
        runner = SLURMRunner(scheduler_file=str(scheduler_file), scheduler_options=scheduler_options,
                             worker_options=worker_options)
    except WorldTooSmallException as exc:
        raise UserError("--scheduler_file", str(exc)) from None
    finally:
        if main and old is not None:
            signal.signal(signal.SIGINT, old)
    try:
        with runner, Client(runner) as client:
            if wait:
                client.wait_for_workers(runner.n_workers)
            yield client
    finally:
        dlog.setLevel(level)


@contextlib.contextmanager
def scheduler_file_client(scheduler_file: str | os.PathLike, *, timeout: float = 120.0,
                          wait: bool = True) -> Iterator["distributed.Client"]:  # noqa: F821
    """A client of a scheduler someone else started (``dask scheduler --scheduler-file F``).

    Waits up to ``timeout`` seconds for the file; the scheduler and its workers
    are left running on exit (they belong to whoever started them).
    """
    from distributed import Client

    path = Path(scheduler_file)
    t0 = time.monotonic()
    while not path.is_file():
        if time.monotonic() - t0 > timeout:
            raise UserError(f"--scheduler_file {path}", f"no such file after {timeout:g} s; start the scheduler "
                                                        "with dask scheduler --scheduler-file FILE, or give its path")
        time.sleep(0.2)
    try:
        client = Client(scheduler_file=str(path), timeout=f"{max(timeout, 10):g}s")
    except (OSError, TimeoutError, ValueError) as exc:
        raise UserError(f"--scheduler_file {path}", f"cannot reach the scheduler it names ({exc}); is it still "
                                                    "running? remove a stale file") from None
    try:
        if wait:
            client.wait_for_workers(1, timeout=timeout)
        yield client
    finally:
        client.close()


def jobs_for_workers(workers: int, processes: int | None) -> int:
    """SLURM jobs needed for ``workers`` worker processes at ``processes`` per job."""
    return max(1, math.ceil(workers / max(1, processes or 1)))
