"""Against a real single-node SLURM (scripts/start-local-slurm.sh, 2 fake GPUs): worker jobs, adapt,
scancel mid-computation, GPU jobs, clean-up on exit / error / Ctrl-C, and the pipelines' sbatch scripts."""

from __future__ import annotations

import copy
import os
import signal
import subprocess
import sys
import threading
import time
from pathlib import Path

import cloudpickle
import numpy as np
import pytest
import yaml
from distributed.diagnostics.plugin import WorkerPlugin

from cryodask.cluster import execution_client
from cryodask.cluster.client import worker_info

REPO = Path(__file__).resolve().parents[2]
pytestmark = [pytest.mark.slurm, pytest.mark.timeout(300)]
# SLURM workers cannot import this test module: functions given to client.run / register_plugin are sent by
# value (tasks must use importable functions: a Task's function is pickled by reference)
cloudpickle.register_pickle_by_value(sys.modules[__name__])


def squeue(*args: str) -> list[str]:
    out = subprocess.run(["squeue", "-h", *args], capture_output=True, text=True, timeout=30)
    if "Invalid job id" in out.stderr:  # a job SLURM has already forgotten
        return []
    assert out.returncode == 0, out.stderr
    return [ln for ln in out.stdout.splitlines() if ln.strip()]


def wait_queue_empty(name: str | None = None, timeout: float = 15.0) -> list[str]:
    """Lines squeue still shows (for ``name``, or all) after waiting up to ``timeout`` s for it to empty."""
    args = ("-n", name) if name else ()
    t0 = time.monotonic()
    while (left := squeue(*args)) and time.monotonic() - t0 < timeout:
        time.sleep(0.2)
    return left


def test_config(base: str, tmp: Path, *, name: str, adapt=None, jobs: int = 2, **slurm) -> Path:
    """A shipped configuration with this machine's queue and small jobs (1 core, 1 GiB, 10 min)."""
    data = yaml.safe_load((REPO / "cluster_configs" / f"{base}.yaml").read_text())
    data = copy.deepcopy(data)
    data["cryodask"]["cluster"].update({"jobs": jobs, "adapt": adapt if adapt else False,
                                        "wait-timeout": "120s"})
    data["jobqueue"]["slurm"].update({
        "queue": "debug", "cores": 1, "memory": "1GiB", "walltime": "00:10:00", "interface": "lo",
        "death-timeout": 30, "log-directory": str(tmp / "logs"),
        "worker-extra-args": [a.replace("1430m", "8m").replace("5m", "1m")
                              for a in data["jobqueue"]["slurm"]["worker-extra-args"]],
        **slurm})
    path = tmp / f"{name}.yaml"
    path.write_text(yaml.safe_dump(data))
    return path


test_config.__test__ = False  # a helper, not a test


def _job_env(*names: str) -> tuple:
    return tuple(os.environ.get(n) for n in names)


# ---------------------------------------------------------------------------------------------
# data: box 32, a few hundred particles, small chunks (many tasks)


@pytest.fixture(scope="module")
def dataset(tmp_path_factory):
    from cryodask.io.star import read_particles
    from cryodask.io.store import import_particles
    from cryodask.simulate import phantom, simulate_particles, write_simulation

    out = tmp_path_factory.mktemp("slurm-data")
    data = simulate_particles([phantom(32, seed=3)], 4.0, n=240, snr=1.0, seed=4)
    paths = write_simulation(out, data)
    store = import_particles(paths["particles"], out / "p.zarr", chunk=20)
    truth = read_particles(paths["truth"]).particles
    return store, truth


@pytest.fixture(scope="module")
def local_map(dataset):
    """The reference: the same reconstruction on the default LocalCluster."""
    from cryodask.em.known_poses import reconstruct_known_poses

    store, truth = dataset
    with execution_client(workers=2) as client:
        assert type(client.cluster).__name__ == "LocalCluster"
        return reconstruct_known_poses(client, store, truth, ctf=True).full_map


@pytest.fixture(scope="module")
def slurm_cpu(local_slurm, tmp_path_factory):
    """A SLURM cluster of 2 one-core worker jobs, adaptive (2..2: lost workers are replaced).

    Its configuration scope (dask.config) is live while it exists: tests ask for it after
    fixtures that build other clusters.
    """
    tmp = tmp_path_factory.mktemp("slurm-cpu")
    cfg = test_config("slurm-cpu", tmp, name="cpu", adapt={"minimum": 2, "maximum": 2})
    # the cluster gives up on a lost worker's job (and adapt replaces it) after 2 s instead of 15 s
    data = yaml.safe_load(cfg.read_text())
    data["distributed"]["deploy"] = {"lost-worker-timeout": "2s"}
    cfg.write_text(yaml.safe_dump(data))
    with execution_client(cluster=str(cfg)) as client:
        client.wait_for_workers(2, timeout=120)
        names = {n for (n,) in client.run(_job_env, "SLURM_JOB_NAME").values()}
        assert len(names) == 1
        name = names.pop()
        yield client, name
    # every job of this cluster is gone (at once: nothing running or pending; soon: nothing completing)
    assert squeue("-n", name, "-t", "PD,R") == []
    assert wait_queue_empty(name) == []


# ---------------------------------------------------------------------------------------------


def test_reconstruction_on_slurm_equals_local(local_map, dataset, slurm_cpu):
    from cryodask.em.known_poses import reconstruct_known_poses

    client, name = slurm_cpu
    store, truth = dataset
    # the workers really are SLURM jobs of this cluster, one per job
    jobs = client.run(_job_env, "SLURM_JOB_ID", "SLURM_JOB_NAME")
    assert len({j for j, _ in jobs.values()}) == 2 and {n for _, n in jobs.values()} == {name}
    assert name.startswith("cryodask-")
    assert sorted(squeue("-n", name, "-t", "R", "-o", "%i")) == sorted(j for j, _ in jobs.values())
    # the file's distributed section reached the scheduler (client scope) and the workers (job script)
    assert client.run_on_scheduler(lambda dask_scheduler: dask_scheduler.allowed_failures) == 5
    assert set(client.run(_config, "distributed.comm.timeouts.tcp").values()) == {"120s"}
    res = reconstruct_known_poses(client, store, truth, ctf=True)
    scale = np.abs(local_map).max()
    assert scale > 0
    assert np.abs(res.full_map - local_map).max() < 1e-5 * scale


def _config(key: str):
    import dask

    return dask.config.get(key)


class SlowBackprojection(WorkerPlugin):
    """Worker plugin: every back-projection task takes 0.3 s longer, so a job can be killed mid-way."""

    name = "slow-backprojection"

    def transition(self, key, start, finish, **kwargs):
        if finish == "executing" and str(key).startswith("backproject-"):
            time.sleep(0.3)


def test_scancel_one_worker_mid_computation(local_map, dataset, slurm_cpu):
    from cryodask.em.known_poses import reconstruct_known_poses

    client, name = slurm_cpu
    store, truth = dataset
    client.wait_for_workers(2, timeout=60)
    plugin = SlowBackprojection()
    client.register_plugin(plugin)
    try:
        result = {}

        def run():
            try:
                result["map"] = reconstruct_known_poses(client, store, truth, ctf=True).full_map
            except BaseException as exc:  # noqa: BLE001 - reported below
                result["error"] = exc

        before = {j for (j,) in client.run(_job_env, "SLURM_JOB_ID").values()}
        worker = threading.Thread(target=run)
        worker.start()
        # wait until both workers hold finished back-projections, then take one job away
        t0 = time.monotonic()
        while time.monotonic() - t0 < 60:
            held = client.run_on_scheduler(_results_per_worker)
            if len(held) == 2 and min(held.values()) >= 2:
                break
            time.sleep(0.05)
        victim_addr = max(held, key=held.get)
        victim = client.run(_job_env, "SLURM_JOB_ID", workers=[victim_addr])[victim_addr][0]
        subprocess.run(["scancel", victim], check=True, timeout=30)
        assert worker.is_alive(), "the computation ended before the scancel: the test would prove nothing"
        worker.join(timeout=120)
        assert not worker.is_alive()
        assert "error" not in result, result.get("error")
        # the same map, although a worker and the results it held were lost mid-way
        assert np.abs(result["map"] - local_map).max() < 1e-5 * np.abs(local_map).max()
        # adapt submits a replacement job: back to 2 workers, one of them new
        client.wait_for_workers(2, timeout=90)
        t0 = time.monotonic()
        while time.monotonic() - t0 < 90:
            now = {j for (j,) in client.run(_job_env, "SLURM_JOB_ID").values()}
            if len(now) == 2 and victim not in now:
                break
            time.sleep(0.5)
        assert len(now) == 2 and victim not in now and len(now - before) == 1
    finally:
        client.unregister_worker_plugin(plugin.name)


def _results_per_worker(dask_scheduler) -> dict[str, int]:
    out = {}
    for ws in dask_scheduler.workers.values():
        out[ws.address] = sum(str(ts.key).startswith("backproject-") for ts in ws.has_what)
    return out


def test_gpu_jobs_each_see_their_own_gpu(local_slurm, tmp_path):
    # 2 fake GPUs declared through gres: each --gres=gpu:1 job gets its own CUDA_VISIBLE_DEVICES
    cfg = test_config("slurm-gpu", tmp_path, name="gpu", jobs=2)
    with execution_client(cluster=str(cfg), check_devices=False) as client:
        client.wait_for_workers(2, timeout=120)
        seen = client.run(_job_env, "CUDA_VISIBLE_DEVICES", "SLURM_JOB_GPUS", "SLURM_JOB_ID")
        info = client.scheduler_info()["workers"]
        assert sorted(v[0] for v in seen.values()) == ["0", "1"]
        assert sorted(v[1] for v in seen.values()) == ["0", "1"]
        assert len({v[2] for v in seen.values()}) == 2
        assert all(info[a]["resources"] == {"GPU": 1} for a in seen)
        # GPU tasks ask for the resource; two overlapping ones run on the two GPUs
        futs = [client.submit(worker_info, 0.5, resources={"GPU": 1}, pure=False) for _ in range(2)]
        assert sorted(f.result(timeout=60)["CUDA_VISIBLE_DEVICES"] for f in futs) == ["0", "1"]
        name = next(iter(client.run(_job_env, "SLURM_JOB_NAME").values()))[0]
    assert squeue("-n", name, "-t", "PD,R") == []


def test_jobs_cancelled_on_error(local_slurm, tmp_path):
    # also: --workers and --j override the configuration (1 job, 2 threads booked as 2 CPUs)
    cfg = test_config("slurm-cpu", tmp_path, name="err", jobs=3)
    with pytest.raises(RuntimeError, match="boom"):
        with execution_client(cluster=str(cfg), workers=1, j=2) as client:
            (name, cpus), = client.run(_job_env, "SLURM_JOB_NAME", "SLURM_CPUS_PER_TASK").values()
            assert cpus == "2"
            assert [w["nthreads"] for w in client.scheduler_info()["workers"].values()] == [2]
            assert len(squeue("-n", name, "-t", "R")) == 1
            client.cluster.scale(jobs=3)  # and one more that may still be pending or starting
            time.sleep(0.5)
            raise RuntimeError("boom")
    assert squeue("-n", name, "-t", "PD,R") == []
    assert wait_queue_empty(name) == []


@pytest.mark.parametrize("sig", [signal.SIGINT, signal.SIGTERM], ids=["SIGINT", "SIGTERM"])
def test_jobs_cancelled_on_ctrl_c_and_sigterm(local_slurm, tmp_path, sig):
    # a job process interrupted by Ctrl-C (or scancel of a driver job: SIGTERM) cancels its worker jobs
    cfg = test_config("slurm-cpu", tmp_path, name="sig", jobs=1)
    script = tmp_path / "job.py"
    script.write_text(
        "import os, sys, time\n"
        "from cryodask.cli import main\n"
        "import cryodask.cli.cluster as c\n"
        "def job(args):\n"
        "    from cryodask.cluster import execution_client\n"
        "    with execution_client(args) as client:\n"
        "        name = list(client.run(lambda: os.environ['SLURM_JOB_NAME']).values())[0]\n"
        "        print(name, flush=True)\n"
        "        time.sleep(120)\n"
        "c._test = job\n"
        "if __name__ == '__main__':\n"
        f"    sys.exit(main(['cluster', 'test', {str(cfg)!r}]))\n")
    proc = subprocess.Popen([sys.executable, str(script)], stdout=subprocess.PIPE, stderr=subprocess.PIPE,
                            text=True, cwd=REPO, env={**os.environ, "PYTHONPATH": str(REPO)})
    try:
        name = proc.stdout.readline().strip()
        assert name.startswith("cryodask-"), proc.stderr.read() if proc.poll() is not None else name
        assert len(squeue("-n", name, "-t", "R")) == 1
        proc.send_signal(sig)
        rc = proc.wait(timeout=60)
    finally:
        proc.kill()
    assert rc == 130
    assert squeue("-n", name, "-t", "PD,R") == []
    assert wait_queue_empty(name) == []


# ---------------------------------------------------------------------------------------------
# pipelines/


@pytest.mark.parametrize("script", sorted((REPO / "pipelines").glob("*.sbatch")), ids=lambda p: p.name)
def test_pipeline_scripts_are_valid_bash(script):
    assert script.read_text().startswith("#!/usr/bin/env bash\n")
    out = subprocess.run(["bash", "-n", str(script)], capture_output=True, text=True)
    assert out.returncode == 0, out.stderr
    # sbatch reads its options from the #SBATCH lines at the top: none after the first command
    lines = script.read_text().splitlines()
    first_cmd = next(i for i, ln in enumerate(lines) if ln.strip() and not ln.startswith("#"))
    assert any(ln.startswith("#SBATCH ") for ln in lines[:first_cmd])
    assert not any(ln.startswith("#SBATCH") for ln in lines[first_cmd:])


def test_run_in_allocation_pipeline(local_slurm, tmp_path):
    # the whole job inside one allocation: srun -n 3 -> scheduler, job, one worker (SLURMRunner)
    env = {**os.environ, "CRYODASK": str(Path(sys.executable).parent / "cryodask")}
    out = tmp_path / "out.txt"
    sub = subprocess.run(["sbatch", "--parsable", "--ntasks=3", "--cpus-per-task=1", "--mem-per-cpu=700M",
                          "--time=5", f"--output={out}", str(REPO / "pipelines" / "run-in-allocation.sbatch"),
                          "cluster", "test"], capture_output=True, text=True, cwd=tmp_path, env=env, timeout=60)
    assert sub.returncode == 0, sub.stderr
    job = sub.stdout.strip().split(";")[0]
    state = _wait_job(job, timeout=90)
    text = out.read_text() if out.exists() else ""
    assert state == ("COMPLETED", "0:0"), text[-3000:]
    assert "1 worker(s) up" in text and "sum(range(1000)) = 499500" in text
    # the worker task restarted itself with a worker's malloc settings (no nanny sets them here)
    assert "MALLOC_ARENA_MAX=1" in text, text[-3000:]
    assert not list(tmp_path.glob(".cryodask-scheduler-*.json"))  # the scheduler file is cleaned up


def _wait_job(job: str, timeout: float) -> tuple[str, str]:
    t0 = time.monotonic()
    state = exit_code = ""
    while time.monotonic() - t0 < timeout:
        out = subprocess.run(["scontrol", "-o", "show", "job", job], capture_output=True, text=True).stdout
        fields = dict(f.split("=", 1) for f in out.split() if "=" in f)
        state, exit_code = fields.get("JobState", ""), fields.get("ExitCode", "")
        if state and state not in ("PENDING", "RUNNING", "CONFIGURING", "COMPLETING"):
            return state, exit_code
        time.sleep(0.3)
    subprocess.run(["scancel", job])
    return state, exit_code


def test_submit_workers_pipeline(local_slurm, tmp_path):
    # a driver job that submits its workers as SLURM jobs from a cluster configuration
    cfg = test_config("slurm-cpu", tmp_path, name="driver", jobs=1)
    env = {**os.environ, "CRYODASK": str(Path(sys.executable).parent / "cryodask"), "CLUSTER": str(cfg)}
    out = tmp_path / "driver.txt"
    sub = subprocess.run(["sbatch", "--parsable", "--cpus-per-task=1", "--mem=1G", "--time=5", f"--output={out}",
                          str(REPO / "pipelines" / "submit-workers.sbatch"), "cluster", "test"],
                         capture_output=True, text=True, cwd=tmp_path, env=env, timeout=60)
    assert sub.returncode == 0, sub.stderr
    state = _wait_job(sub.stdout.strip().split(";")[0], timeout=90)
    text = out.read_text() if out.exists() else ""
    assert state == ("COMPLETED", "0:0"), text[-3000:]
    assert "1 worker(s) up" in text and "SLURM_JOB_ID=" in text
    assert "MALLOC_ARENA_MAX=1" in text, text[-3000:]  # through the nanny's pre-spawn environment
    # the worker ran as a job of its own, and is gone with the driver
    worker_job = text.split("SLURM_JOB_ID=")[1].split(",")[0].split()[0]
    assert worker_job != sub.stdout.strip().split(";")[0]
    assert squeue("-j", worker_job, "-t", "PD,R") == []
