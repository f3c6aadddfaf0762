"""Where a job gets its Dask client: the execution options every job shares, and :func:`execution_client`.

Every job takes the same execution options (:func:`add_execution_args`, shown
first in its help)::

    --cluster CONFIG        a cluster configuration (cluster_configs/*.yaml)
    --scheduler_file FILE   an existing scheduler, or, inside `srun -n N`, one made by SLURMRunner
    (neither)               a LocalCluster sized to this machine (or the cryodask section of ~/.config/dask)
    --use_gpu, --gpu [IDS], --gpu_list IDS, --j, --workers, and RELION's scratch options

and opens its client with::

    with execution_client(args) as client:
        ...

which builds the cluster and tears it down on exit, on error and on Ctrl-C or
SIGTERM (every SLURM job cancelled).
"""

from __future__ import annotations

import argparse
import contextlib
import dataclasses
import logging
import signal
import threading
from collections.abc import Iterator, Mapping
from typing import Any

from cryodask.errors import UserError

logger = logging.getLogger("cryodask.cluster")

#: option defaults, by argparse ``dest`` (what :func:`execution_client` accepts as keywords)
EXECUTION_DEFAULTS: dict[str, Any] = {
    "use_gpu": False, "gpu": None, "gpu_list": None, "j": None, "workers": None, "cluster": None,
    "scheduler_file": None, "scratch_dir": None, "keep_free_scratch": 10.0, "keep_scratch": False,
    "reuse_scratch": False, "preread_images": False, "no_parallel_disc_io": False, "profile": None,
}
GROUP_TITLE = "execution (where and how the job runs; the same in every command)"

#: what keeps one lost worker (killed, preempted, past its walltime) from failing a job. Applied where a
#: job's cluster is built, to every key the user's dask configuration leaves at dask's default; a
#: ``--cluster`` file's own values win. A task running on a worker that dies unexpectedly counts one
#: failure (``allowed-failures``: a task fails the job only after more deaths than this); a silent worker
#: (a node gone from the network) is dropped after ``worker-ttl`` and its tasks rescheduled; comm timeouts
#: long enough for a busy shared file system or a large cluster, so a slow answer is not taken for a death.
#: Walltimes: ``--lifetime`` / ``--lifetime-stagger`` in the SLURM configurations' ``worker-extra-args``
#: make workers leave cleanly (no failure counted) before SLURM kills them.
RESILIENCE: dict[str, Any] = {
    "distributed.scheduler.allowed-failures": 5,
    "distributed.scheduler.worker-ttl": "5 minutes",
    "distributed.comm.timeouts.connect": "60s",
    "distributed.comm.timeouts.tcp": "120s",
}


def resilience_config() -> dict[str, Any]:
    """The :data:`RESILIENCE` settings the active dask configuration leaves at distributed's defaults."""
    import os

    import dask
    import distributed
    import yaml

    path = os.path.join(os.path.dirname(distributed.__file__), "distributed.yaml")
    try:
        with open(path) as fh:
            shipped = yaml.safe_load(fh) or {}
    except OSError:
        shipped = {}
    out = {}
    for key, value in RESILIENCE.items():
        default = shipped
        for part in key.split("."):
            default = default.get(part) if isinstance(default, dict) else None
        if dask.config.get(key, None) == default:
            out[key] = value
    return out


def _positive_int(text: str) -> int:
    try:
        v = int(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"{text!r} is not a whole number") from None
    if v < 1:
        raise argparse.ArgumentTypeError(f"{v} is less than 1")
    return v


class _IntoGroup:
    """Lets :func:`cryodask.cluster.scratch.add_scratch_args` add its options to our group."""

    def __init__(self, group: argparse._ArgumentGroup) -> None:
        self._group = group

    def add_argument_group(self, *args: Any, **kwargs: Any) -> argparse._ArgumentGroup:
        return self._group


def add_execution_args(parser: argparse.ArgumentParser) -> argparse._ArgumentGroup:
    """Add the execution options (one argument group, listed first in ``--help``).

    Names follow RELION (``--j``, ``--gpu``, ``--scratch_dir`` ...) and Scipion
    (``--use_gpu``, ``--gpu_list``). Returns the group.
    """
    from cryodask.cluster.scratch import add_scratch_args

    g = parser.add_argument_group(GROUP_TITLE)
    g.add_argument("--use_gpu", action="store_true",
                   help="run on GPUs: one worker per GPU (all GPUs unless --gpu_list / --gpu IDS)")
    g.add_argument("--gpu", nargs="?", const="", default=None, metavar="IDS",
                   help='GPUs to use: "0 1" (Scipion), or RELION\'s "0:1" / "0,1:2,3"; alone: all GPUs')
    g.add_argument("--gpu_list", default=None, metavar="IDS", help='GPU ids separated by spaces, e.g. "0 1"')
    g.add_argument("--j", type=_positive_int, default=None, metavar="N",
                   help="threads per worker (default 1)")
    g.add_argument("--workers", type=_positive_int, default=None, metavar="N",
                   help="worker processes (default: one per core, or per GPU); with --cluster: workers to start")
    g.add_argument("--cluster", default=None, metavar="CONFIG",
                   help="cluster configuration (cluster_configs/*.yaml or a name there: local, local-gpu, "
                        "slurm-cpu, slurm-gpu); see cryodask cluster show/check")
    g.add_argument("--scheduler_file", default=None, metavar="FILE",
                   help="connect to the scheduler this file names; under srun -n N (N >= 3) the job makes its "
                        "own (SLURMRunner: task 0 scheduler, task 1 the job, the rest workers)")
    add_scratch_args(_IntoGroup(g))
    g.add_argument("--profile", default=None, metavar="DIR",
                   help="write a cProfile of every chunk task to DIR/<task>.prof (a folder every worker can "
                        "write); read them with python -m pstats, or together with cryodask.profiling.summary")
    # listed first in --help, before the job's own options
    parser._action_groups.remove(g)
    parser._action_groups.insert(0, g)
    return g


@dataclasses.dataclass(frozen=True)
class Execution:
    """The execution options, checked."""

    use_gpu: bool = False
    gpus: list[int] | None = None  # None: all GPUs
    threads: int | None = None
    workers: int | None = None
    cluster: str | None = None
    scheduler_file: str | None = None


def _as_dict(args: argparse.Namespace | Mapping[str, Any] | None, kwargs: Mapping[str, Any]) -> dict[str, Any]:
    values = dict(EXECUTION_DEFAULTS)
    if isinstance(args, argparse.Namespace):
        values.update({k: v for k, v in vars(args).items() if k in EXECUTION_DEFAULTS})
    elif args is not None:
        values.update(args)
    values.update(kwargs)
    unknown = sorted(set(values) - set(EXECUTION_DEFAULTS))
    if unknown:
        raise TypeError(f"unknown execution option(s): {', '.join(unknown)}")
    return values


def execution_options(args: argparse.Namespace | Mapping[str, Any] | None = None, /, **kwargs: Any) -> Execution:
    """Check the execution options (a parsed namespace, a mapping, or keywords)."""
    from cryodask.cluster.gpu import parse_gpu_list, parse_gpu_option

    v = _as_dict(args, kwargs)
    gpus = None
    if v["gpu"] not in (None, "") and v["gpu_list"] not in (None, ""):
        raise UserError("--gpu", f"given together with --gpu_list {v['gpu_list']!r}; give the GPUs once")
    if v["gpu"] not in (None, ""):
        gpus = parse_gpu_option(v["gpu"], option="--gpu")
    elif v["gpu_list"] not in (None, ""):
        gpus = parse_gpu_list(v["gpu_list"], option="--gpu_list") if isinstance(v["gpu_list"], str) \
            else parse_gpu_list(list(v["gpu_list"]), option="--gpu_list")
    use_gpu = bool(v["use_gpu"]) or v["gpu"] is not None or gpus is not None
    for name in ("j", "workers"):
        if v[name] is not None and (not isinstance(v[name], int) or v[name] < 1):
            raise UserError(f"--{name}", f"{v[name]!r} is not a whole number >= 1")
    if v["cluster"] and v["scheduler_file"]:
        raise UserError("--scheduler_file", "given together with --cluster; give one: --cluster builds a cluster, "
                                            "--scheduler_file joins one")
    return Execution(use_gpu=use_gpu, gpus=gpus, threads=v["j"], workers=v["workers"],
                     cluster=str(v["cluster"]) if v["cluster"] else None,
                     scheduler_file=str(v["scheduler_file"]) if v["scheduler_file"] else None)


@contextlib.contextmanager
def _interrupt_signals() -> Iterator[None]:
    """Ctrl-C and SIGTERM (scancel of a driver job) raise KeyboardInterrupt, so clean-up runs; restored on exit."""
    if threading.current_thread() is not threading.main_thread():
        yield
        return

    def terminate(signum, frame):
        raise KeyboardInterrupt(f"signal {signum}")

    old_term = signal.getsignal(signal.SIGTERM)
    old_int = signal.getsignal(signal.SIGINT)
    if old_term in (signal.SIG_DFL, None):
        signal.signal(signal.SIGTERM, terminate)
    # dask_jobqueue.runner installs a SIGINT handler that exits with status 0
    if getattr(old_int, "__module__", "").startswith("dask_jobqueue"):
        signal.signal(signal.SIGINT, signal.default_int_handler)
    try:
        yield
    finally:
        if old_term in (signal.SIG_DFL, None):
            signal.signal(signal.SIGTERM, old_term or signal.SIG_DFL)
        if getattr(old_int, "__module__", "").startswith("dask_jobqueue"):
            signal.signal(signal.SIGINT, old_int)


@contextlib.contextmanager
def execution_client(args: argparse.Namespace | Mapping[str, Any] | None = None, /, *,
                     check_devices: bool = True, log_directory: str | None = None, wait: bool = True,
                     quiet: bool = True, **options: Any) -> Iterator["distributed.Client"]:  # noqa: F821
    """The job's Dask client, on the cluster its options ask for; torn down on exit.

    Parameters
    ----------
    args
        Parsed options (from :func:`add_execution_args`), or a mapping; keywords
        (``cluster=``, ``workers=``, ``use_gpu=``, ``gpu_list=`` ...) override.
    check_devices
        Check that the GPUs exist (CuPy). Tests with fake GPUs turn it off.
    log_directory
        Where SLURM worker jobs write their logs (default: the configuration's
        ``log-directory``, else SLURM's default, the submit folder).
    wait
        Return once the first worker is there (all workers for local clusters).

    Which cluster:

    * ``--scheduler_file F``: inside ``srun -n N`` (N >= 3), dask-jobqueue's
      ``SLURMRunner`` (only task 1 returns from here; the others serve and exit);
      elsewhere a client of the scheduler ``F`` names (left running on exit).
    * ``--cluster CONFIG``: the configuration's kind, inside its dask config scope.
    * neither: the ``cryodask`` section of the user's dask config if any, else a
      ``LocalCluster`` sized to the machine; with ``--use_gpu`` one worker per GPU.

    Raises
    ------
    UserError
        Bad options or configuration, GPUs that are missing, SLURM refusing the jobs.
    """
    from cryodask.cluster.config import config_scope, current_spec, find_config, load_cluster_config, worker_config
    from cryodask.cluster.gpu import local_gpu_client
    from cryodask.cluster.local import local_client
    from cryodask.cluster.slurm import in_srun_step, runner_client, scheduler_file_client

    import dask

    ex = execution_options(args, **options)
    with contextlib.ExitStack() as stack:
        stack.enter_context(_interrupt_signals())
        # under any --cluster file (applied below, so its values win): one lost worker never fails the job
        resilient = resilience_config()
        stack.enter_context(dask.config.set(resilient))
        if ex.scheduler_file:
            if in_srun_step():
                client = stack.enter_context(runner_client(ex.scheduler_file, threads=ex.threads or 1,
                                                           gpu=ex.use_gpu, wait=wait, quiet=quiet))
            else:
                client = stack.enter_context(scheduler_file_client(ex.scheduler_file, wait=wait))
            yield client
            return
        if ex.cluster:
            data, warnings = load_cluster_config(ex.cluster)
            source = str(find_config(ex.cluster))
            for w in warnings:
                logger.warning("%s", w.line(source))
            stack.enter_context(config_scope(data))
            spec = dataclasses.replace(current_spec(source), worker_config=worker_config(data))
        else:
            spec = current_spec()
        if spec.kind == "slurm":
            # SLURM workers run in fresh processes: they get the settings through their job script
            spec = dataclasses.replace(spec, worker_config=_with_resilience(spec.worker_config, resilient))
            client = stack.enter_context(_slurm(spec, ex, check_devices=check_devices,
                                                log_directory=log_directory, wait=wait, quiet=quiet))
        elif spec.kind == "local-gpu" or ex.use_gpu or spec.gpu:
            gpus = ex.gpus if ex.gpus is not None else spec.gpu_list
            client = stack.enter_context(local_gpu_client(gpus, n_workers=ex.workers or spec.workers,
                                                          threads=ex.threads or spec.threads or 1,
                                                          check_devices=check_devices, quiet=quiet))
        else:
            client = stack.enter_context(local_client(ex.workers or spec.workers, threads=ex.threads or spec.threads,
                                                      quiet=quiet))
        yield client


def _with_resilience(worker_config: Mapping[str, Any], settings: Mapping[str, Any]) -> dict[str, Any]:
    """``worker_config`` (nested sections) with the dotted ``settings`` added where it does not set them."""
    import copy

    out = copy.deepcopy(dict(worker_config))
    for key, value in settings.items():
        node = out
        *parents, leaf = key.split(".")
        for p in parents:
            node = node.setdefault(p, {})
            if not isinstance(node, dict):
                break
        else:
            node.setdefault(leaf, value)
    return out


@contextlib.contextmanager
def _slurm(spec, ex: Execution, *, check_devices: bool, log_directory: str | None, wait: bool,
           quiet: bool) -> Iterator["distributed.Client"]:  # noqa: F821
    """slurm_client with the command-line overrides (--workers, --j, --use_gpu)."""
    import dask

    from cryodask.cluster.slurm import jobs_for_workers, slurm_client

    if ex.use_gpu and not spec.gpu:
        raise UserError(spec.source, "--use_gpu / --gpu asks for GPUs but this configuration's jobs get none; "
                                     "use one with cryodask.gpu.enabled: true and --gres=gpu:1 "
                                     "(cluster_configs/slurm-gpu.yaml)")
    if ex.gpus:
        logger.warning("--gpu ids are ignored under SLURM: SLURM gives each worker job its GPU (--gres)")
    processes = dask.config.get("jobqueue.slurm.processes", None) or 1
    # --j: threads per worker, so each job books j cores per worker process
    cores = ex.threads * processes if ex.threads else None
    jobs = None
    if ex.workers:
        jobs = jobs_for_workers(ex.workers, processes)
        if spec.adapt is not None:  # --workers caps the adaptive range
            spec = dataclasses.replace(spec, adapt=(min(spec.adapt[0], jobs), jobs))
    pinned = dask.config.set({"jobqueue.slurm.processes": processes}) if cores else contextlib.nullcontext()
    with pinned, slurm_client(spec, jobs=jobs, cores=cores, log_directory=log_directory,
                              check_devices=check_devices, wait=wait, quiet=quiet) as client:
        yield client


def worker_info(delay: float = 0.0) -> dict[str, Any]:
    """What a worker process sees: host, pid, its GPUs, SLURM job and malloc arenas (run it with ``client.run``).

    ``delay`` seconds of sleep first, so that tasks submitted together overlap
    (a check that they land on different workers).
    """
    import os
    import socket
    import time

    if delay > 0:
        time.sleep(delay)
    env = ("CUDA_VISIBLE_DEVICES", "SLURM_JOB_ID", "SLURM_JOB_NAME", "SLURM_JOB_GPUS", "MALLOC_ARENA_MAX")
    return {"host": socket.gethostname(), "pid": os.getpid(), **{k: os.environ.get(k) for k in env}}
