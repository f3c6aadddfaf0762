"""Cluster configuration files, the execution options, `cryodask cluster show/check`, local clients."""

from __future__ import annotations

import argparse
import base64
import json
import os
import signal
import subprocess
import sys
from pathlib import Path

import dask
import pytest

from cryodask.cli import main as cli
from cryodask.cluster import add_execution_args, execution_client
from cryodask.cluster.client import GROUP_TITLE, execution_options
from cryodask.cluster.config import (check_config, config_scope, current_spec, find_config, flatten,
                                     load_cluster_config, read_config, walltime_seconds)
from cryodask.cluster.gpu import GpuSyntaxWarning
from cryodask.cluster.scratch import scratch_options
from cryodask.errors import UserError

REPO = Path(__file__).resolve().parents[2]
SHIPPED = ["local", "local-gpu", "slurm-cpu", "slurm-gpu"]


def write(tmp_path: Path, text: str, name: str = "c.yaml") -> Path:
    p = tmp_path / name
    p.write_text(text)
    return p


# ---------------------------------------------------------------------------------------------
# the shipped configurations


@pytest.mark.parametrize("name", SHIPPED)
def test_shipped_configs_are_clean(name):
    path = find_config(name)
    assert path.resolve() == REPO / "cluster_configs" / f"{name}.yaml"
    assert check_config(read_config(path), source=str(path)) == []


def test_find_config_by_name_and_path(tmp_path):
    assert find_config("slurm-gpu.yaml").name == "slurm-gpu.yaml"
    p = write(tmp_path, "cryodask: {cluster: {kind: local}}\n")
    assert find_config(p) == p
    with pytest.raises(UserError, match=r"no such file \(shipped configurations: local, local-gpu, slurm-cpu"):
        find_config("slurm-cpuu")


# ---------------------------------------------------------------------------------------------
# loading: dask.config.update(..., priority="new") semantics, scoped


def test_config_scope_merges_and_restores():
    before = dask.config.get("distributed.worker.memory.spill")
    data = read_config(find_config("slurm-gpu"))
    assert dask.config.get("cryodask", None) is None
    with config_scope(data):
        assert dask.config.get("jobqueue.slurm.cores") == 8
        assert dask.config.get("jobqueue.slurm.memory") == "60GiB"
        assert dask.config.get("jobqueue.slurm.job-extra-directives") == ["--gres=gpu:1"]
        assert dask.config.get("distributed.scheduler.allowed-failures") == 5
        assert dask.config.get("cryodask.gpu.resources") == {"GPU": 1}
        # keys the file does not name keep their values (an update, not a replacement of sections)
        assert dask.config.get("jobqueue.slurm.shebang") == "#!/usr/bin/env bash"
        assert dask.config.get("distributed.worker.memory.rebalance.measure") == "optimistic"
        assert "pbs" in dask.config.get("jobqueue")
    assert dask.config.get("cryodask", None) is None
    assert dask.config.get("jobqueue.slurm.cores") is None
    assert dask.config.get("distributed.scheduler.allowed-failures") == 3
    assert dask.config.get("distributed.worker.memory.spill") == before


def test_config_scope_equals_dask_update():
    import copy

    data = read_config(find_config("slurm-cpu"))
    expected = dask.config.update(copy.deepcopy(dask.config.config), copy.deepcopy(data), priority="new")
    with config_scope(data):
        got = copy.deepcopy(dask.config.config)
    for key in flatten(data):
        assert dask.config.get(key, config=got) == dask.config.get(key, config=expected), key


def test_underscore_keys_are_canonical(tmp_path):
    p = write(tmp_path, "cryodask: {cluster: {kind: slurm, jobs: 2}}\njobqueue:\n  slurm:\n    cores: 2\n"
                        "    memory: 4GiB\n    queue: q\n    job_extra_directives: ['--exclusive']\n"
                        "    worker_extra_args: ['--lifetime', '20m']\n")
    data = read_config(p)
    assert "job-extra-directives" in data["jobqueue"]["slurm"]
    with config_scope(data):
        assert dask.config.get("jobqueue.slurm.job-extra-directives") == ["--exclusive"]


def test_user_dask_config_section_is_used():
    with dask.config.set({"cryodask.cluster.kind": "slurm", "cryodask.cluster.jobs": 3}):
        spec = current_spec()
        assert (spec.kind, spec.jobs, spec.adapt) == ("slurm", 3, None)
    assert current_spec().kind == "local"
    with dask.config.set({"cryodask.gpu.gpu-list": "0 1"}):  # a gpu section alone: local GPUs
        spec = current_spec()
        assert (spec.kind, spec.gpu, spec.gpu_list) == ("local", False, [0, 1])
    with dask.config.set({"cryodask.cluster.kind": "pbs"}), pytest.raises(UserError) as err:
        current_spec()
    assert err.value.where == "dask config, cryodask.cluster.kind"


# ---------------------------------------------------------------------------------------------
# checking


BASE = """cryodask:
  cluster: {kind: slurm, jobs: 2}
jobqueue:
  slurm:
    queue: q
    cores: 4
    memory: 16GiB
    walltime: "01:00:00"
    worker-extra-args: ["--lifetime", "50m", "--lifetime-stagger", "4m"]
"""


def problems_of(tmp_path, text):
    p = write(tmp_path, text)
    return [(x.level, x.field, x.what) for x in check_config(read_config(p), source=str(p))]


def test_base_is_clean(tmp_path):
    assert problems_of(tmp_path, BASE) == []


@pytest.mark.parametrize("old, new, field, message", [
    ("kind: slurm", "kind: slrum", "cryodask.cluster.kind", "unknown kind 'slrum' (did you mean slurm?)"),
    ("jobs: 2", "jobs: 0", "cryodask.cluster.jobs", "0 is not a whole number >= 1"),
    ("jobs: 2", "jobs: 2, adapt: {minimum: 3, maximum: 2}", "cryodask.cluster.adapt", "minimum 3 is above maximum 2"),
    ("cores: 4", "cores: 0", "jobqueue.slurm.cores", "0 is not a whole number >= 1"),
    ("cores: 4", "cores: four", "jobqueue.slurm.cores", "'four' is not a whole number"),
    ("    cores: 4\n", "", "jobqueue.slurm.cores", "missing"),
    ("memory: 16GiB", "memory: 16 gigs", "jobqueue.slurm.memory", "not a size dask understands"),
    ("memory: 16GiB", "memory: 16", "jobqueue.slurm.memory", "16 bytes, too little for a worker; give a unit"),
    ("walltime: \"01:00:00\"", "walltime: 1h", "jobqueue.slurm.walltime", "not a SLURM time limit"),
    ("\"50m\"", "\"23h50m\"", "jobqueue.slurm.worker-extra-args",
     "--lifetime '23h50m' is not a duration dask understands; write 1430m"),
    ("\"50m\"", "\"58m\"", "jobqueue.slurm.worker-extra-args", "is not shorter than the walltime"),
    ("queue: q", "queue: q\n    job-extra-directives: ['--gres=gpu:1']", "jobqueue.slurm.job-extra-directives",
     "asks SLURM for GPUs but the workers advertise no GPU resource"),
    ("jobs: 2}", "jobs: 2}\n  gpu: {enabled: true}", "jobqueue.slurm.job-extra-directives",
     "the workers advertise GPU=1 but the jobs ask SLURM for no GPU"),
    ("queue: q", "queue: q\n    job-extra-directives: ['--gpus=1', '--mem-per-gpu=20G']",
     "jobqueue.slurm.job-directives-skip", "dask-jobqueue#698"),
    ("queue: q", "queue: q\n    job-extra-directives: ['#SBATCH --exclusive']", "jobqueue.slurm.job-extra-directives",
     "give the option only"),
    ("queue: q", "queue: q\n    job-mem: 250GiB", "jobqueue.slurm.job-mem", "SLURM wants e.g. 250G"),
    ("queue: q", "queue: q\n    processes: 8", "jobqueue.slurm.processes", "leave each worker 0 threads"),
    ("queue: q", "queue: q\n    job-extr: []", "jobqueue.slurm.job-extr", "unknown key; did you mean job-extra?"),
    ("jobs: 2}", "jobs: 2, nodes: 3}", "cryodask.cluster.nodes", "unknown key"),
    ("cryodask:", "slurm: {}\ncryodask:", "slurm", "unknown section; it belongs under jobqueue"),
    ("cryodask:", "distributed: {scheduler: {allowed-failures: 0}}\ncryodask:",
     "distributed.scheduler.allowed-failures", "one lost worker fails the job"),
    ("cryodask:", "distributed: {scheduler: {alowed-failures: 5}}\ncryodask:",
     "distributed.scheduler.alowed-failures", "did you mean allowed-failures?"),
    ("cryodask:", "distributed: {comm: {timeouts: {connect: 1 minutes 30s}}}\ncryodask:",
     "distributed.comm.timeouts.connect", "not a duration dask understands"),
    ("cryodask:", "distributed: {worker: {memory: {spill: 70}}}\ncryodask:",
     "distributed.worker.memory.spill", "give a fraction"),
])
def test_check_names_each_error(tmp_path, old, new, field, message):
    assert old in BASE
    found = problems_of(tmp_path, BASE.replace(old, new, 1))
    errors = [(f, w) for level, f, w in found if level == "error"]
    assert any(f == field and message in w for f, w in errors), found


@pytest.mark.parametrize("old, new, field, message", [
    ("memory: 16GiB", "memory: 60 GB", "jobqueue.slurm.memory",
     "'60 GB' is 55.9 GiB: SLURM counts in GiB (its 'G'), so the job asks for --mem=56G; write 60GiB"),
    ("memory: 16GiB", "memory: 500MB", "jobqueue.slurm.memory", "--mem=477M; write 500MiB"),
    ("    worker-extra-args: [\"--lifetime\", \"50m\", \"--lifetime-stagger\", \"4m\"]\n", "",
     "jobqueue.slurm.worker-extra-args", "no --lifetime"),
    ("    queue: q\n", "", "jobqueue.slurm.queue", "default partition"),
    ("queue: q", "queue: q\n    project: p", "jobqueue.slurm.project", "deprecated in dask-jobqueue; use account"),
])
def test_check_warnings(tmp_path, old, new, field, message):
    found = problems_of(tmp_path, BASE.replace(old, new, 1))
    assert [(f, w) for level, f, w in found if level == "error"] == []
    assert any(level == "warning" and f == field and message in w for level, f, w in found), found


def test_check_reports_every_problem_at_once(tmp_path):
    text = BASE.replace("kind: slurm", "kind: slurmm").replace("cores: 4", "cores: 0").replace(
        "walltime: \"01:00:00\"", "walltime: 24h")
    fields = {f for level, f, _ in problems_of(tmp_path, text) if level == "error"}
    # the SLURM part is checked even though the cryodask section has an error
    assert {"cryodask.cluster.kind", "jobqueue.slurm.cores", "jobqueue.slurm.walltime"} <= fields


@pytest.mark.parametrize("text, seconds", [("30", 1800), ("30:15", 1815), ("24:00:00", 86400), ("1-0", 86400),
                                            ("2-12:30", 217800), ("1-00:00:01", 86401)])
def test_walltime_seconds(text, seconds):
    assert walltime_seconds(text) == seconds


@pytest.mark.parametrize("text, message", [
    ("cryodask: [1, 2", "line 1: not valid YAML"),
    ("- a\n- b\n", "holds a list, not a mapping"),
])
def test_unreadable_config(tmp_path, text, message):
    with pytest.raises(UserError, match=message):
        load_cluster_config(write(tmp_path, text))


def test_load_raises_first_error_with_count(tmp_path):
    p = write(tmp_path, BASE.replace("cores: 4", "cores: 0").replace("jobs: 2", "jobs: -1"))
    with pytest.raises(UserError) as err:
        load_cluster_config(p)
    assert err.value.where == f"{p}, cryodask.cluster.jobs"
    assert err.value.what.endswith(f"(1 more: cryodask cluster check {p})")


# ---------------------------------------------------------------------------------------------
# cryodask cluster check / show


def test_cli_check(tmp_path, capsys):
    bad = write(tmp_path, BASE.replace("memory: 16GiB", "memory: 60 GB").replace("\"50m\"", "\"23h50m\"")
                .replace("jobs: 2", "jobs: 2, adapt: {minimum: 3, maximum: 2}"))
    assert cli(["cluster", "check", str(bad)]) == 2
    lines = capsys.readouterr().out.splitlines()
    assert lines[:-1] == [
        f"error: {bad}, cryodask.cluster.adapt: minimum 3 is above maximum 2",
        f"warning: {bad}, jobqueue.slurm.memory: '60 GB' is 55.9 GiB: SLURM counts in GiB (its 'G'), so the job "
        "asks for --mem=56G; write 60GiB if you meant SLURM's units",
        f"error: {bad}, jobqueue.slurm.worker-extra-args: --lifetime '23h50m' is not a duration dask "
        "understands; write 1430m",
    ]
    assert lines[-1] == f"{bad}: 2 errors; fix them before using this configuration"
    assert cli(["cluster", "check", "slurm-gpu"]) == 0
    assert capsys.readouterr().out.strip().endswith("slurm-gpu.yaml: OK")


def test_cli_show_slurm_gpu(capsys):
    assert cli(["cluster", "show", "slurm-gpu"]) == 0
    out = capsys.readouterr().out
    lines = out.splitlines()
    assert lines[0] == "#!/usr/bin/env bash"
    for expected in ("#SBATCH -J cryodask-TOKEN", "#SBATCH -p gpu", "#SBATCH --cpus-per-task=8", "#SBATCH --mem=60G",
                     "#SBATCH -t 24:00:00", "#SBATCH --gres=gpu:1"):
        assert expected in lines
    worker = lines[-1]
    assert "distributed.cli.dask_worker tcp://SCHEDULER_HOST:PORT" in worker
    assert "--nthreads 8 --memory-limit 60.00GiB" in worker
    assert worker.endswith("--resources GPU=1 --lifetime 1430m --lifetime-stagger 5m")
    # the workers get the file's distributed section (they do not see the client's dask.config scope)
    export = next(ln for ln in lines if ln.startswith("export DASK_INTERNAL_INHERIT_CONFIG="))
    inherited = json.loads(base64.urlsafe_b64decode(export.split("=", 1)[1]))
    assert inherited["distributed"]["scheduler"]["allowed-failures"] == 5
    assert inherited["distributed"]["comm"]["timeouts"] == {"connect": "60s", "tcp": "120s"}
    assert "jobqueue" not in inherited
    # and the glibc malloc settings of worker_environ, through the nanny (it would set its own trim threshold)
    env = inherited["distributed"]["nanny"]["pre-spawn-environ"]
    assert env["MALLOC_ARENA_MAX"] == "1" and env["MALLOC_TRIM_THRESHOLD_"] == str(1 << 30)
    # nothing leaked into this process's configuration
    assert dask.config.get("jobqueue.slurm.cores") is None


def test_cli_show_adds_gpu_resource(tmp_path, capsys):
    p = write(tmp_path, BASE.replace("jobs: 2}", "jobs: 2}\n  gpu: {enabled: true}")
              .replace("queue: q", "queue: q\n    job-extra-directives: ['--gpus=1']"))
    assert cli(["cluster", "show", str(p)]) == 0
    worker = capsys.readouterr().out.splitlines()[-1]
    assert worker.endswith("--lifetime 50m --lifetime-stagger 4m --resources GPU=1")


def test_cli_show_adds_lifetime_for_the_walltime(tmp_path, capsys):
    # no --lifetime in the file: the workers leave 6 min (10 %) before the 1 h walltime, staggered over 3 min
    text = BASE.replace('    worker-extra-args: ["--lifetime", "50m", "--lifetime-stagger", "4m"]\n', "")
    assert cli(["cluster", "show", str(write(tmp_path, text))]) == 0
    assert capsys.readouterr().out.splitlines()[-1].endswith("--lifetime 3060s --lifetime-stagger 180s")
    found = problems_of(tmp_path, text)
    assert ("warning", "jobqueue.slurm.worker-extra-args", "no --lifetime: cryodask adds --lifetime 3060s "
            "--lifetime-stagger 180s for the walltime (01:00:00), so workers leave cleanly before SLURM kills them; "
            "set \"--lifetime\", \"--lifetime-stagger\" to choose") in found
    # a lifetime from the dask configuration is kept as it is
    with dask.config.set({"distributed.worker.lifetime.duration": "40m"}):
        assert cli(["cluster", "show", str(write(tmp_path, text))]) == 0
    assert "--lifetime" not in capsys.readouterr().out.splitlines()[-1]


def test_cli_show_local(capsys):
    assert cli(["cluster", "show", "local"]) == 0
    assert "local: " in capsys.readouterr().out


def test_cli_show_bad_config_is_user_error(tmp_path, capsys):
    p = write(tmp_path, BASE.replace("walltime: \"01:00:00\"", "walltime: 1h"))
    assert cli(["cluster", "show", str(p)]) == 2
    err = capsys.readouterr().err
    assert err == (f"cryodask: error: {p}, jobqueue.slurm.walltime: '1h' is not a SLURM time limit; write "
                   "hours:minutes:seconds (24:00:00) or days-hours:minutes:seconds (1-12:00:00)\n")


# ---------------------------------------------------------------------------------------------
# the execution options


def parser():
    p = argparse.ArgumentParser(prog="cryodask job")
    p.add_argument("--i", required=True)
    add_execution_args(p)
    return p


def test_execution_group_is_first_in_help():
    text = parser().format_help()
    assert text.index(GROUP_TITLE) < text.index("\n  --i I")
    group = text.split(GROUP_TITLE)[1].split("\n  --i I")[0]
    for opt in ("--use_gpu", "--gpu [IDS]", "--gpu_list IDS", "--j N", "--workers N", "--cluster CONFIG",
                "--scheduler_file FILE", "--scratch_dir DIR", "--keep_free_scratch GB", "--keep_scratch",
                "--reuse_scratch", "--preread_images", "--no_parallel_disc_io"):
        assert f"\n  {opt}" in group, opt


def test_execution_options_parse():
    args = parser().parse_args(["--i", "x", "--gpu", "0:1", "--j", "2", "--workers", "3", "--cluster", "local",
                                "--scratch_dir", "/tmp/s", "--preread_images"])
    ex = execution_options(args)
    assert (ex.use_gpu, ex.gpus, ex.threads, ex.workers, ex.cluster) == (True, [0, 1], 2, 3, "local")
    assert args.keep_free_scratch == 10.0
    # the scratch helper reads the same namespace
    assert scratch_options(args) == {"scratch_dir": "/tmp/s", "keep_free_gb": 10.0, "reuse": False,
                                     "preread": True, "parallel_disc_io": True}
    assert execution_options(parser().parse_args(["--i", "x", "--gpu"])).gpus is None  # all GPUs
    assert execution_options(parser().parse_args(["--i", "x", "--gpu"])).use_gpu
    assert execution_options(parser().parse_args(["--i", "x", "--use_gpu", "--gpu_list", "1 2"])).gpus == [1, 2]
    assert not execution_options(parser().parse_args(["--i", "x"])).use_gpu
    assert execution_options(workers=2, gpu_list=[0]).gpus == [0]
    with pytest.warns(GpuSyntaxWarning):
        assert execution_options({"gpu": "0,1,2,3"}).gpus == [0, 1, 2, 3]


@pytest.mark.parametrize("kwargs, where, message", [
    ({"gpu": "0", "gpu_list": "1"}, "--gpu", "give the GPUs once"),
    ({"cluster": "local", "scheduler_file": "s.json"}, "--scheduler_file", "give one"),
    ({"workers": 0}, "--workers", "not a whole number >= 1"),
    ({"gpu_list": "0 zero"}, "--gpu_list", "'zero'"),
])
def test_execution_options_errors(kwargs, where, message):
    with pytest.raises(UserError, match=message) as err:
        execution_options(**kwargs)
    assert err.value.where == where


def test_bad_thread_count_is_an_argparse_error(capsys):
    with pytest.raises(SystemExit):
        parser().parse_args(["--i", "x", "--j", "0"])
    assert "argument --j: 0 is less than 1" in capsys.readouterr().err


def test_unknown_option_name_is_a_type_error():
    with pytest.raises(TypeError, match="nworkers"):
        execution_options(nworkers=2)


# ---------------------------------------------------------------------------------------------
# local clients


def test_execution_client_local_config_scoped():
    # --cluster local: its distributed section reaches the scheduler and the workers, and leaves with the job
    with execution_client(cluster="local", workers=2, j=1) as client:
        assert len(client.scheduler_info()["workers"]) == 2
        assert client.run_on_scheduler(lambda dask_scheduler: dask_scheduler.allowed_failures) == 5
        assert set(client.run(lambda: dask.config.get("distributed.scheduler.allowed-failures")).values()) == {5}
        from cryodask.cluster.gpu import gpu_task_resources

        assert gpu_task_resources(client) is None  # a CPU cluster: tasks ask for no GPU
        assert dask.config.get("cryodask.cluster.kind") == "local"
        cluster = client.cluster
    assert cluster.status.name == "closed"
    assert dask.config.get("cryodask", None) is None
    assert dask.config.get("distributed.scheduler.allowed-failures") == 3


def test_execution_client_closes_on_error():
    with pytest.raises(RuntimeError, match="boom"):
        with execution_client(workers=1) as client:
            cluster = client.cluster
            raise RuntimeError("boom")
    assert cluster.status.name == "closed"


def test_execution_client_scheduler_file_timeout(tmp_path, monkeypatch):
    from cryodask.cluster import slurm

    monkeypatch.delenv("SLURM_STEP_ID", raising=False)
    with pytest.raises(UserError, match="no such file after 0.5 s") as err:
        with slurm.scheduler_file_client(tmp_path / "none.json", timeout=0.5):
            pass
    assert err.value.where.startswith("--scheduler_file")


def test_execution_client_joins_a_running_scheduler(tmp_path, monkeypatch):
    from distributed import LocalCluster

    monkeypatch.delenv("SLURM_STEP_ID", raising=False)  # not inside srun: join, do not start a runner
    path = tmp_path / "scheduler.json"
    with LocalCluster(n_workers=1, threads_per_worker=1, processes=False, dashboard_address=":0",
                      scheduler_kwargs={"scheduler_file": str(path)}) as cluster:
        with execution_client(scheduler_file=str(path)) as client:
            assert client.scheduler.address == cluster.scheduler_address
            assert client.submit(sum, [1, 2, 3]).result() == 6
        assert cluster.status.name == "running"  # someone else's scheduler is left running
        assert len(cluster.scheduler.workers) == 1


def test_importing_jobqueue_keeps_ctrl_c():
    # dask_jobqueue.runner replaces SIGINT's handler by sys.exit (exit status 0) when imported
    code = ("import signal; from cryodask.cluster.slurm import import_jobqueue; import_jobqueue(); "
            "import sys; print(signal.getsignal(signal.SIGINT) is signal.default_int_handler, "
            "'dask_jobqueue' in sys.modules)")
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=60, cwd=REPO)
    assert out.stdout.split() == ["True", "True"], out.stderr


def test_importing_jobqueue_first_from_a_thread():
    # a SLURM job started from a thread (a notebook's, a GUI's): dask_jobqueue's import-time signal.signal
    # raised ValueError there; the import works, and the main thread's Ctrl-C handler is untouched
    code = ("import signal, sys, threading; from cryodask.cluster.slurm import import_jobqueue; "
            "t = threading.Thread(target=import_jobqueue); t.start(); t.join(); "
            "print(signal.getsignal(signal.SIGINT) is signal.default_int_handler, 'dask_jobqueue' in sys.modules, "
            "signal.signal.__module__)")
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=60, cwd=REPO)
    assert out.stdout.split() == ["True", "True", "signal"], out.stderr


def test_ctrl_c_during_local_job_exits_130(tmp_path):
    # a real SIGINT in the middle of a job: KeyboardInterrupt, cluster closed, status 130
    script = tmp_path / "job.py"
    script.write_text(
        "import sys, time\n"
        "from cryodask.cli import main\n"
        "import cryodask.cli.cluster as c\n"
        "def slow(args):\n"
        "    from cryodask.cluster import execution_client\n"
        "    with execution_client(args) as client:\n"
        "        print('READY', flush=True)\n"
        "        time.sleep(60)\n"
        "c._test = slow\n"
        "if __name__ == '__main__':\n"
        "    sys.exit(main(['cluster', 'test', '--workers', '1']))\n")
    proc = subprocess.Popen([sys.executable, str(script)], stdout=subprocess.PIPE, stderr=subprocess.PIPE,
                            text=True, cwd=REPO, env={**os.environ, "PYTHONPATH": str(REPO)})
    try:
        assert proc.stdout.readline().strip() == "READY"
        proc.send_signal(signal.SIGINT)
        rc = proc.wait(timeout=30)
    finally:
        proc.kill()
    assert rc == 130
    assert "cryodask: interrupted" in proc.stderr.read()
