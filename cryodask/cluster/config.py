"""Cluster configuration files: dask's own YAML convention plus a small ``cryodask:`` section.

A file (``cluster_configs/*.yaml``) holds ordinary dask configuration,
``jobqueue.slurm.*`` for dask-jobqueue's ``SLURMCluster`` and ``distributed.*``
for the scheduler and workers, plus::

    cryodask:
      cluster:
        kind: slurm             # local | local-gpu | slurm
        jobs: 4                 # SLURM jobs to start (fixed size) ...
        adapt: {minimum: 1, maximum: 8}   # ... or adaptive (replaces lost workers); false for fixed
        workers: null           # local kinds: worker processes (default: one per core / per GPU)
        threads: null           # local kinds: threads per worker (default 1)
        wait-timeout: null      # give up when no worker has started after this long (e.g. "2h")
      gpu:
        enabled: true           # workers advertise GPU=1; SLURM jobs ask for --gres=gpu:1
        gpu-list: "0 1"         # local-gpu: GPUs to use (default all)
        resources: {GPU: 1}

Loading a file is ``dask.config.update(dask.config.config, file, priority="new")``
inside a ``dask.config.set`` scope (:func:`config_scope`): nothing leaks out of the
job. The same keys can live in ``~/.config/dask/*.yaml`` instead; a ``cryodask``
section there is used when a job gets no ``--cluster``.

:func:`check_config` lists every problem of a file (unknown keys with a
suggestion, values dask or SLURM would reject or misread); ``cryodask cluster
check`` prints them one per line.
"""

from __future__ import annotations

import contextlib
import copy
import difflib
import os
import re
from collections.abc import Iterator, Mapping
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import dask

from cryodask.errors import UserError, where

KINDS = ("local", "local-gpu", "slurm")

#: folders searched for ``--cluster NAME`` besides the path itself
CONFIG_DIRS = (Path("cluster_configs"), Path(__file__).resolve().parents[2] / "cluster_configs")

# the cryodask section: key -> allowed sub-keys (None: a leaf)
_CRYODASK_KEYS = {
    "cluster": {"kind", "jobs", "adapt", "workers", "threads", "wait-timeout"},
    "gpu": {"enabled", "gpu-list", "resources"},
}
_ADAPT_KEYS = {"minimum", "maximum", "interval", "wait-count"}
# dask config paths whose keys are free-form (names of variables or resources)
_FREE_FORM = ("distributed.nanny.environ", "distributed.nanny.pre-spawn-environ", "distributed.worker.resources",
              "distributed.scheduler.preload", "logging", "jobqueue.slurm.scheduler-options")
_DEPRECATED_JOBQUEUE = {"extra": "worker-extra-args", "job-extra": "job-extra-directives",
                        "env-extra": "job-script-prologue", "header-skip": "job-directives-skip", "project": "account"}
_GPU_DIRECTIVE = re.compile(r"^(--gres[= ](\S*:)?gpu\b|--gres[= ]gpu|--gpus\b|--gpus[-=]|-G\b|--gpus-per-)")
_WALLTIME = re.compile(r"^(\d+)(?::(\d+))?(?::(\d+))?$|^(\d+)-(\d+)(?::(\d+))?(?::(\d+))?$")


@dataclass(frozen=True)
class Problem:
    """One problem of a configuration: ``level`` is ``"error"`` or ``"warning"``."""

    level: str
    field: str
    what: str

    def line(self, source: str) -> str:
        return f"{self.level}: {where(source, field=self.field or None)}: {self.what}"


@dataclass(frozen=True)
class ClusterSpec:
    """The ``cryodask`` section, checked: what kind of cluster to build and how big."""

    kind: str = "local"
    jobs: int | None = None
    adapt: tuple[int, int] | None = None
    adapt_options: dict[str, Any] = field(default_factory=dict)
    workers: int | None = None
    threads: int | None = None
    wait_timeout: float | None = None
    gpu: bool = False
    gpu_list: list[int] | None = None
    gpu_resources: dict[str, float] = field(default_factory=lambda: {"GPU": 1})
    source: str = "dask config"
    #: the non-jobqueue part of the file (passed on to SLURM workers, which do not see the client's scope)
    worker_config: dict[str, Any] = field(default_factory=dict)


# ---------------------------------------------------------------------------------------------
# reading


def find_config(name: str | os.PathLike[str]) -> Path:
    """The file for ``--cluster NAME``: the path itself, else ``NAME[.yaml]`` in ``cluster_configs/``."""
    p = Path(name).expanduser()
    if p.is_file():
        return p
    if p.parent == Path("."):
        for d in CONFIG_DIRS:
            for cand in (d / p.name, d / f"{p.name}.yaml"):
                if cand.is_file():
                    return cand
    known = sorted({c.stem for d in CONFIG_DIRS if d.is_dir() for c in d.glob("*.yaml")})
    hint = f" (shipped configurations: {', '.join(known)})" if known else ""
    raise UserError(f"--cluster {name}", f"no such file{hint}; give the path of a YAML cluster configuration")


def read_config(path: str | os.PathLike[str]) -> dict[str, Any]:
    """A configuration file as a dict with dask's canonical (hyphenated) keys."""
    import yaml

    path = Path(path)
    try:
        text = path.read_text()
    except OSError as err:
        raise UserError(path, f"cannot read it ({err.strerror or err}); check the path") from None
    try:
        data = yaml.safe_load(text)
    except yaml.YAMLError as err:
        mark = getattr(err, "problem_mark", None)
        at = f"line {mark.line + 1}: " if mark is not None else ""
        problem = getattr(err, "problem", None) or str(err).splitlines()[0]
        raise UserError(path, f"{at}not valid YAML ({problem}); fix the file") from None
    if data is None:
        data = {}
    if not isinstance(data, dict):
        raise UserError(path, f"holds a {type(data).__name__}, not a mapping of dask configuration sections; "
                              "start from a file in cluster_configs/")
    return normalize_keys(data)


def normalize_keys(data: Any, path: str = "") -> Any:
    """Dask's canonical key spelling (``-`` for ``_``), except inside free-form sections."""
    if not isinstance(data, dict):
        return data
    out = {}
    for k, v in data.items():
        key = str(k)
        if not _free_form(path):
            key = key.replace("_", "-")
        full = f"{path}.{key}" if path else key
        out[key] = normalize_keys(v, full)
    return out


def _free_form(path: str) -> bool:
    return any(path == f or path.startswith(f + ".") for f in _FREE_FORM)


def flatten(data: Mapping[str, Any], prefix: str = "") -> dict[str, Any]:
    """Nested mapping -> dotted keys of its leaves (an empty mapping is a leaf)."""
    out: dict[str, Any] = {}
    for k, v in data.items():
        key = f"{prefix}.{k}" if prefix else str(k)
        if isinstance(v, Mapping) and v:
            out.update(flatten(v, key))
        else:
            out[key] = copy.deepcopy(v)
    return out


@contextlib.contextmanager
def config_scope(data: Mapping[str, Any] | None) -> Iterator[None]:
    """Apply a configuration as ``dask.config.update(config, data, priority="new")`` for the ``with`` block.

    Leaves are set one by one (``dask.config.set`` with dotted keys), so sibling
    keys the file does not mention keep their values, and everything is restored
    on exit.
    """
    if not data:
        yield
        return
    _register_defaults()
    with dask.config.set(flatten(data)):
        yield


def _register_defaults() -> None:
    """Load distributed's and dask-jobqueue's default configuration (the reference for unknown keys)."""
    import distributed  # noqa: F401

    with contextlib.suppress(ImportError):
        from cryodask.cluster.slurm import import_jobqueue

        import_jobqueue()


# ---------------------------------------------------------------------------------------------
# checking


def check_config(data: Mapping[str, Any], *, source: str = "config") -> list[Problem]:
    """Every problem of a cluster configuration (the file's dict), errors and warnings.

    The values checked are the effective ones: the file over the user's dask
    configuration and dask's defaults.
    """
    data = normalize_keys(dict(data))
    problems: list[Problem] = []
    _register_defaults()
    problems += _unknown_keys(data)
    if "cryodask" not in data:
        problems.append(Problem("error", "cryodask.cluster.kind",
                                f"missing; add a cryodask section with cluster: {{kind: ...}} ({' | '.join(KINDS)})"))
        return problems
    with config_scope(data):
        spec_problems, spec = _check_cryodask(source)
        problems += spec_problems
        problems += _check_distributed()
        if spec is not None and spec.kind == "slurm":
            problems += _check_slurm(spec)
        elif spec is None and isinstance(data.get("jobqueue"), dict) and "slurm" in data["jobqueue"]:
            # the cryodask section has errors: still check the SLURM part, but render no job script
            gpu = _get("cryodask.gpu.enabled", False) is True
            problems += _check_slurm(ClusterSpec(kind="slurm", gpu=gpu, source=source), render=False)
    return problems


def _did_you_mean(key: str, choices, form: str = "; did you mean {}?") -> str:
    close = difflib.get_close_matches(key, list(choices), n=1, cutoff=0.6)
    return form.format(close[0]) if close else ""


def _unknown_keys(data: Mapping[str, Any]) -> list[Problem]:
    problems = []
    top = set(dask.config.config) | {"cryodask", "jobqueue", "distributed", "logging", "scheduler"}
    for k, v in data.items():
        if k not in top:
            hint = _did_you_mean(k, top)
            if k in ("slurm", "cluster", "gpu"):
                hint = f"; it belongs under {'jobqueue' if k == 'slurm' else 'cryodask'}"
            problems.append(Problem("error", k, f"unknown section{hint}"))
    cd = data.get("cryodask")
    if cd is not None:
        if not isinstance(cd, dict):
            problems.append(Problem("error", "cryodask", "must be a mapping with cluster: and gpu:"))
        else:
            for k, v in cd.items():
                if k not in _CRYODASK_KEYS:
                    problems.append(Problem("error", f"cryodask.{k}", f"unknown key{_did_you_mean(k, _CRYODASK_KEYS)}"))
                elif not isinstance(v, dict):
                    problems.append(Problem("error", f"cryodask.{k}", "must be a mapping"))
                else:
                    for kk in v:
                        if kk not in _CRYODASK_KEYS[k]:
                            problems.append(Problem("error", f"cryodask.{k}.{kk}",
                                                    f"unknown key{_did_you_mean(kk, _CRYODASK_KEYS[k])}"))
    jq = data.get("jobqueue")
    if isinstance(jq, dict):
        for k, v in jq.items():
            if k != "slurm":
                problems.append(Problem("warning", f"jobqueue.{k}", "ignored: cryodask builds SLURM clusters from "
                                                                    "jobqueue.slurm"))
        slurm = jq.get("slurm")
        if isinstance(slurm, dict):
            known = set(dask.config.get("jobqueue.slurm", {})) | set(_DEPRECATED_JOBQUEUE)
            for k in slurm:
                if k in _DEPRECATED_JOBQUEUE:
                    problems.append(Problem("warning", f"jobqueue.slurm.{k}",
                                            f"deprecated in dask-jobqueue; use {_DEPRECATED_JOBQUEUE[k]}"))
                elif k not in known:
                    problems.append(Problem("error", f"jobqueue.slurm.{k}", f"unknown key{_did_you_mean(k, known)}"))
        elif slurm is not None:
            problems.append(Problem("error", "jobqueue.slurm", "must be a mapping of SLURMCluster settings"))
    elif jq is not None:
        problems.append(Problem("error", "jobqueue", "must be a mapping (jobqueue: {slurm: {...}})"))
    if isinstance(data.get("distributed"), dict):
        problems += _unknown_in(data["distributed"], dask.config.get("distributed"), "distributed")
    return problems


def _unknown_in(user: Mapping[str, Any], default: Any, path: str) -> list[Problem]:
    if _free_form(path) or not isinstance(default, dict) or not default:
        return []
    problems = []
    for k, v in user.items():
        full = f"{path}.{k}"
        if k not in default:
            problems.append(Problem("error", full, f"unknown key (dask would ignore it){_did_you_mean(k, default)}"))
        elif isinstance(v, dict):
            problems += _unknown_in(v, default[k], full)
    return problems


def _is_int(v: Any) -> bool:
    return isinstance(v, int) and not isinstance(v, bool)


def _get(key: str, default: Any = None) -> Any:
    return dask.config.get(key, default)


def _timedelta(value: Any) -> float | None:
    """Seconds, or None when dask cannot parse it."""
    from dask.utils import parse_timedelta

    try:
        return float(parse_timedelta(value, default="seconds"))
    except (ValueError, TypeError, KeyError):
        return None


def _suggest_duration(text: str) -> str:
    """``23h50m`` -> ``1430m`` (dask parses one unit per value)."""
    parts = re.findall(r"(\d+(?:\.\d+)?)\s*([dhms])", str(text))
    if not parts or "".join(n + u for n, u in parts) != re.sub(r"\s+", "", str(text)):
        return "write one number and one unit, such as 1430m or 2h"
    secs = sum(float(n) * {"d": 86400, "h": 3600, "m": 60, "s": 1}[u] for n, u in parts)
    return f"write {secs / 60:g}m" if secs % 60 == 0 else f"write {secs:g}s"


def _check_cryodask(source: str, default_kind: str | None = None) -> tuple[list[Problem], ClusterSpec | None]:
    problems: list[Problem] = []
    kind = _get("cryodask.cluster.kind") or default_kind
    if kind is None:
        problems.append(Problem("error", "cryodask.cluster.kind", f"missing; set it to one of {', '.join(KINDS)}"))
    elif kind not in KINDS:
        problems.append(Problem("error", "cryodask.cluster.kind",
                                f"unknown kind {kind!r}{_did_you_mean(str(kind), KINDS, ' (did you mean {}?)')}; "
                                f"use one of {', '.join(KINDS)}"))

    def count(key: str, low: int) -> int | None:
        v = _get(key)
        if v is None:
            return None
        if not _is_int(v) or v < low:
            problems.append(Problem("error", key, f"{v!r} is not a whole number >= {low}"))
            return None
        return v

    jobs = count("cryodask.cluster.jobs", 1)
    workers = count("cryodask.cluster.workers", 1)
    threads = count("cryodask.cluster.threads", 1)
    adapt = None
    adapt_options: dict[str, Any] = {}
    a = _get("cryodask.cluster.adapt")
    if a not in (None, False):
        if a is True:
            a = {}
        if not isinstance(a, dict):
            problems.append(Problem("error", "cryodask.cluster.adapt",
                                    f"{a!r}: give false or {{minimum: N, maximum: M}}"))
        else:
            for k in a:
                if k not in _ADAPT_KEYS:
                    problems.append(Problem("error", f"cryodask.cluster.adapt.{k}",
                                            f"unknown key{_did_you_mean(k, _ADAPT_KEYS)}"))
            lo = count("cryodask.cluster.adapt.minimum", 0)
            hi = count("cryodask.cluster.adapt.maximum", 1)
            lo = 0 if lo is None else lo
            hi = hi if hi is not None else (jobs or max(lo, 1))
            if lo > hi:
                problems.append(Problem("error", "cryodask.cluster.adapt",
                                        f"minimum {lo} is above maximum {hi}"))
            adapt = (lo, hi)
            if "interval" in a:
                if _timedelta(a["interval"]) is None:
                    problems.append(Problem("error", "cryodask.cluster.adapt.interval",
                                            f"{a['interval']!r} is not a duration dask understands (e.g. 1s)"))
                else:
                    adapt_options["interval"] = a["interval"]
            if "wait-count" in a:
                if not _is_int(a["wait-count"]) or a["wait-count"] < 1:
                    problems.append(Problem("error", "cryodask.cluster.adapt.wait-count",
                                            f"{a['wait-count']!r} is not a whole number >= 1"))
                else:
                    adapt_options["wait_count"] = a["wait-count"]
    if kind == "slurm" and jobs is None and adapt is None and not problems:
        problems.append(Problem("warning", "cryodask.cluster.jobs", "not set: one SLURM job is started "
                                                                    "(set jobs: N or adapt: {minimum, maximum})"))
    wait = _get("cryodask.cluster.wait-timeout")
    wait_s = None
    if wait is not None:
        wait_s = _timedelta(wait)
        if wait_s is None:
            problems.append(Problem("error", "cryodask.cluster.wait-timeout",
                                    f"{wait!r} is not a duration dask understands; {_suggest_duration(wait)}"))
    gpu = _get("cryodask.gpu.enabled", False)
    if not isinstance(gpu, bool):
        problems.append(Problem("error", "cryodask.gpu.enabled", f"{gpu!r} is not true or false"))
        gpu = False
    if kind == "local-gpu":
        gpu = True
    gpu_list = None
    gl = _get("cryodask.gpu.gpu-list")
    if gl is not None:
        from cryodask.cluster.gpu import parse_gpu_option

        try:
            gpu_list = parse_gpu_option(str(gl) if not isinstance(gl, (list, tuple)) else " ".join(map(str, gl)),
                                        option="cryodask.gpu.gpu-list")
        except UserError as err:
            problems.append(Problem("error", "cryodask.gpu.gpu-list", err.what))
        if kind == "slurm":
            problems.append(Problem("warning", "cryodask.gpu.gpu-list", "ignored under SLURM: SLURM gives each job "
                                                                        "its GPU (--gres=gpu:1)"))
    resources = _get("cryodask.gpu.resources") or {"GPU": 1}
    if not isinstance(resources, dict) or not all(isinstance(v, (int, float)) and not isinstance(v, bool) and v > 0
                                                  for v in resources.values()):
        problems.append(Problem("error", "cryodask.gpu.resources", f"{resources!r}: give a mapping such as {{GPU: 1}}"))
        resources = {"GPU": 1}
    if any(p.level == "error" for p in problems):
        return problems, None
    return problems, ClusterSpec(kind=kind, jobs=jobs, adapt=adapt, adapt_options=adapt_options, workers=workers,
                                 threads=threads, wait_timeout=wait_s, gpu=gpu, gpu_list=gpu_list,
                                 gpu_resources=dict(resources), source=source)


def _check_distributed() -> list[Problem]:
    problems = []
    af = _get("distributed.scheduler.allowed-failures")
    if not _is_int(af) or af < 1:
        problems.append(Problem("error", "distributed.scheduler.allowed-failures",
                                f"{af!r}: must be a whole number >= 1, or one lost worker fails the job (3 is dask's "
                                "default)"))
    for key in ("distributed.comm.timeouts.connect", "distributed.comm.timeouts.tcp",
                "distributed.scheduler.worker-ttl", "distributed.worker.lifetime.duration",
                "distributed.worker.lifetime.stagger", "distributed.scheduler.idle-timeout"):
        v = _get(key)
        if v is not None and v is not False and _timedelta(v) is None:
            problems.append(Problem("error", key, f"{v!r} is not a duration dask understands; {_suggest_duration(v)}"))
    for k in ("target", "spill", "pause", "terminate"):
        key = f"distributed.worker.memory.{k}"
        v = _get(key)
        if v is not False and v is not None and not (isinstance(v, (int, float)) and 0 < v <= 1):
            problems.append(Problem("error", key, f"{v!r}: give a fraction of the memory limit (0-1) or false"))
    return problems


def walltime_seconds(text: Any) -> float | None:
    """SLURM's time limit (``minutes``, ``m:s``, ``h:m:s``, ``d-h``, ``d-h:m``, ``d-h:m:s``) in seconds."""
    m = _WALLTIME.match(str(text).strip())
    if not m:
        return None
    g = m.groups()
    if g[0] is not None:
        nums = [int(x) for x in g[:3] if x is not None]
        if len(nums) == 1:
            return nums[0] * 60.0
        if len(nums) == 2:
            return nums[0] * 60.0 + nums[1]
        return nums[0] * 3600.0 + nums[1] * 60 + nums[2]
    d, h = int(g[3]), int(g[4])
    mins = int(g[5]) if g[5] else 0
    secs = int(g[6]) if g[6] else 0
    return d * 86400.0 + h * 3600 + mins * 60 + secs


def _arg_values(args: list[str], name: str) -> list[str]:
    """Values of ``--name V`` / ``--name=V`` in a worker argument list."""
    out = []
    for i, a in enumerate(args):
        if a == name and i + 1 < len(args):
            out.append(args[i + 1])
        elif a.startswith(name + "="):
            out.append(a.split("=", 1)[1])
    return out


def _check_slurm(spec: ClusterSpec, *, render: bool = True) -> list[Problem]:
    from dask.utils import parse_bytes

    problems: list[Problem] = []
    P = "jobqueue.slurm."

    def err(key: str, what: str, level: str = "error") -> None:
        problems.append(Problem(level, P + key, what))

    cores = _get(P + "cores")
    if cores is None:
        err("cores", "missing: set the CPU cores of one worker job (e.g. cores: 8)")
    elif not _is_int(cores) or cores < 1:
        err("cores", f"{cores!r} is not a whole number >= 1")
        cores = None
    processes = _get(P + "processes")
    if processes is not None:
        if not _is_int(processes) or processes < 1:
            err("processes", f"{processes!r} is not a whole number >= 1")
        elif cores and processes > cores:
            err("processes", f"{processes} worker processes for {cores} cores leave each worker 0 threads")
        elif cores and cores % processes:
            err("processes", f"{cores} cores do not divide into {processes} processes: each gets "
                             f"{cores // processes} threads", "warning")
    memory = _get(P + "memory")
    if memory is None:
        err("memory", "missing: set the memory of one worker job (e.g. memory: 60GiB)")
    else:
        try:
            nbytes = parse_bytes(memory)
        except (ValueError, TypeError):
            err("memory", f"{memory!r} is not a size dask understands; write e.g. 60GiB")
        else:
            unit = re.sub(r"[\d.\s]", "", str(memory))
            if nbytes < 2**28:
                err("memory", f"{memory!r} is {nbytes} bytes, too little for a worker; give a unit, e.g. 60GiB")
            elif unit and not unit.lower().endswith("ib"):
                from dask_jobqueue.slurm import slurm_format_bytes_ceil

                m = re.match(r"\s*([\d.]+)\s*([A-Za-z])", str(memory))
                binary = f"{m.group(1)}{m.group(2).upper()}iB" if m else "60GiB"
                err("memory", f"{memory!r} is {nbytes / 2**30:.1f} GiB: SLURM counts in GiB (its 'G'), so the job "
                              f"asks for --mem={slurm_format_bytes_ceil(nbytes)}; write {binary} if you meant SLURM's "
                              "units", "warning")
    job_mem = _get(P + "job-mem")
    if job_mem is not None and re.search(r"i[Bb]?$", str(job_mem).strip()):
        err("job-mem", f"{job_mem!r} is passed to #SBATCH --mem as written; SLURM wants e.g. 250G (its G is GiB)")
    job_cpu = _get(P + "job-cpu")
    if job_cpu is not None and (not _is_int(job_cpu) or job_cpu < 1):
        err("job-cpu", f"{job_cpu!r} is not a whole number >= 1")
    walltime = _get(P + "walltime")
    wall_s = None
    if walltime is not None:
        wall_s = walltime_seconds(walltime)
        if wall_s is None:
            err("walltime", f"{walltime!r} is not a SLURM time limit; write hours:minutes:seconds (24:00:00) or "
                            "days-hours:minutes:seconds (1-12:00:00)")
        elif wall_s <= 0:
            err("walltime", f"{walltime!r} is zero")
    dt = _get(P + "death-timeout")
    if dt is not None and _timedelta(dt) is None:
        err("death-timeout", f"{dt!r} is not a duration dask understands; {_suggest_duration(dt)}")

    wargs = _get(P + "worker-extra-args") or []
    if not isinstance(wargs, list) or not all(isinstance(a, (str, int, float)) for a in wargs):
        err("worker-extra-args", f"{wargs!r}: give a list of strings, e.g. [\"--lifetime\", \"55m\"]")
        wargs = []
    wargs = [str(a) for a in wargs]
    lifetime = stagger = None
    lifetime_given = bool(_arg_values(wargs, "--lifetime"))
    for name in ("--lifetime", "--lifetime-stagger"):
        for v in _arg_values(wargs, name):
            secs = _timedelta(v)
            if secs is None:
                err("worker-extra-args", f"{name} {v!r} is not a duration dask understands; {_suggest_duration(v)}")
            elif name == "--lifetime":
                lifetime = secs
            else:
                stagger = secs
    if lifetime is None and _get("distributed.worker.lifetime.duration"):
        lifetime = _timedelta(_get("distributed.worker.lifetime.duration"))
        stagger = stagger or _timedelta(_get("distributed.worker.lifetime.stagger") or 0)
    if wall_s:
        if lifetime is None and not lifetime_given:
            from cryodask.cluster.slurm import walltime_lifetime_args

            auto = " ".join(walltime_lifetime_args(wargs))
            err("worker-extra-args", f"no --lifetime: cryodask adds {auto or 'none'} for the walltime ({walltime}), "
                                     "so workers leave cleanly before SLURM kills them; set \"--lifetime\", "
                                     "\"--lifetime-stagger\" to choose", "warning")
        elif lifetime is not None and lifetime + (stagger or 0) >= wall_s:
            err("worker-extra-args", f"--lifetime {lifetime / 60:g}m plus --lifetime-stagger {(stagger or 0) / 60:g}m "
                                     f"is not shorter than the walltime {walltime}: workers must leave before SLURM "
                                     "kills the job; shorten --lifetime")
    resources = [v for v in _arg_values(wargs, "--resources")]
    gpu_resource = any(re.search(r"(^|[ ,])GPU=", r) for r in resources)

    directives = _get(P + "job-extra-directives") or []
    if not isinstance(directives, list) or not all(isinstance(d, str) for d in directives):
        err("job-extra-directives", f"{directives!r}: give a list of strings, e.g. [\"--gres=gpu:1\"]")
        directives = []
    for d in directives:
        if d.strip().startswith("#"):
            err("job-extra-directives", f"{d!r}: give the option only (e.g. \"--gres=gpu:1\"); "
                                        "dask-jobqueue writes the #SBATCH")
    gpu_directive = [d for d in directives if _GPU_DIRECTIVE.match(d.strip())]
    skip = _get(P + "job-directives-skip") or []
    if any(d.strip().startswith("--mem-per-gpu") for d in directives) and "--mem" not in skip:
        err("job-directives-skip", "--mem-per-gpu conflicts with the --mem line dask-jobqueue writes (SLURM: "
                                   "mutually exclusive; dask-jobqueue#698); add job-directives-skip: [\"--mem\"]")
    if gpu_directive and not spec.gpu and not gpu_resource:
        err("job-extra-directives", f"{gpu_directive[0]!r} asks SLURM for GPUs but the workers advertise no GPU "
                                    "resource, so GPU tasks would never run there; set cryodask.gpu.enabled: true")
    if (spec.gpu or gpu_resource) and not gpu_directive:
        err("job-extra-directives", "the workers advertise GPU=1 but the jobs ask SLURM for no GPU; add "
                                    "\"--gres=gpu:1\" (or \"--gpus=1\")")
    if resources and spec.gpu and not gpu_resource:
        err("worker-extra-args", f"--resources {resources[0]!r} lacks GPU=1 while cryodask.gpu.enabled is true")

    queue = _get(P + "queue")
    if queue is None:
        err("queue", "not set: jobs go to the cluster's default partition", "warning")
    opts = _get(P + "scheduler-options") or {}
    if not isinstance(opts, dict):
        err("scheduler-options", f"{opts!r}: give a mapping, e.g. {{dashboard_address: ':0'}}")
    if render and all(p.level != "error" for p in problems):
        # last: let dask-jobqueue render the job script (catches what the checks above do not know)
        try:
            import warnings

            from cryodask.cluster.slurm import render_job_script

            with warnings.catch_warnings():  # deprecations are reported above, once
                warnings.simplefilter("ignore", FutureWarning)
                render_job_script(spec)
        except Exception as exc:  # noqa: BLE001 - reported as one line
            problems.append(Problem("error", "jobqueue.slurm", f"dask-jobqueue cannot build a job script: "
                                                               f"{type(exc).__name__}: {exc}".splitlines()[0]))
    return problems


# ---------------------------------------------------------------------------------------------
# loading


def current_spec(source: str = "dask config") -> ClusterSpec:
    """The ``cryodask`` section of the active dask configuration, checked (local when absent).

    Raises
    ------
    UserError
        The first error (``cryodask cluster check`` lists them all).
    """
    if _get("cryodask.cluster.kind") is None and _get("cryodask.gpu") is None:
        return ClusterSpec(source=source)
    # a user's ~/.config/dask may hold just a gpu section: the kind is then the local default
    problems, spec = _check_cryodask(source, default_kind="local")
    errors = [p for p in problems if p.level == "error"]
    if errors:
        raise _as_user_error(errors, source)
    return spec


def _as_user_error(errors: list[Problem], source: str) -> UserError:
    e = errors[0]
    more = f" ({len(errors) - 1} more: cryodask cluster check {source})" if len(errors) > 1 else ""
    return UserError(where(source, field=e.field or None), e.what + more)


def load_cluster_config(path: str | os.PathLike[str]) -> tuple[dict[str, Any], list[Problem]]:
    """Read and check a configuration file; returns (its dict, its warnings).

    Raises
    ------
    UserError
        The file is missing or unreadable, or has errors (the first is named).
    """
    p = find_config(path)
    data = read_config(p)
    problems = check_config(data, source=str(p))
    errors = [x for x in problems if x.level == "error"]
    if errors:
        raise _as_user_error(errors, str(p))
    return data, [x for x in problems if x.level == "warning"]


def worker_config(data: Mapping[str, Any]) -> dict[str, Any]:
    """The part of a file that processes started elsewhere (SLURM workers) must see: all but ``jobqueue``."""
    return {k: copy.deepcopy(v) for k, v in data.items() if k != "jobqueue"}
