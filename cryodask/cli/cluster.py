"""Show or check a cluster configuration (cluster_configs/*.yaml), or try it out.

A cluster configuration is dask's own YAML (jobqueue.slurm.* for SLURM worker
jobs, distributed.* for the scheduler and workers) plus a small cryodask:
section (cluster kind local | local-gpu | slurm, jobs, adapt, GPUs). Every job
takes it as --cluster CONFIG; CONFIG is a path or a name in cluster_configs/
(local, local-gpu, slurm-cpu, slurm-gpu).

  show CONFIG    print the sbatch script of one worker job (needs no SLURM), or
                 what a local configuration starts
  check CONFIG   list every problem, one line each ("error: FILE, KEY: what is
                 wrong and what to do"); exit status 2 when there are errors
  test [CONFIG]  start the cluster a job would get from the same execution
                 options, run a few tasks on every worker, tear it down (all
                 SLURM jobs cancelled); prints what each worker saw

Examples
--------
  cryodask cluster show slurm-gpu
  cryodask cluster check my-site.yaml
  cryodask cluster test local --workers 2
  cryodask cluster test slurm-cpu --workers 2 --log_dir slurm_logs
  srun -n 4 cryodask cluster test --scheduler_file sched.json   (inside an allocation)
"""

from __future__ import annotations

import argparse
import sys


def add_args(parser: argparse.ArgumentParser) -> None:
    from cryodask.cluster.client import add_execution_args

    add_execution_args(parser)  # for test: the cluster every job would get from the same options
    parser.add_argument("action", choices=("show", "check", "test"), help="what to do with CONFIG")
    parser.add_argument("config", metavar="CONFIG", nargs="?", default=None,
                        help="configuration file, or a name in cluster_configs/ (test: optional, as --cluster)")
    parser.add_argument("--log_dir", default=None, metavar="DIR", help="test: SLURM worker logs go here")


def main(args: argparse.Namespace) -> int:
    from cryodask.errors import UserError

    if args.action in ("check", "show"):
        name = args.config or args.cluster
        if not name:
            raise UserError(f"cryodask cluster {args.action}", "give the configuration: a file, or a name in "
                                                               "cluster_configs/ (local, local-gpu, slurm-cpu, slurm-gpu)")
        return _check(name) if args.action == "check" else _show(name)
    if args.config:
        if args.cluster and args.cluster != args.config:
            raise UserError("--cluster", f"given together with CONFIG {args.config}; give one")
        args.cluster = args.config
    return _test(args)


def _check(name: str) -> int:
    from cryodask.cluster.config import check_config, find_config, read_config

    path = find_config(name)
    problems = check_config(read_config(path), source=str(path))
    for p in problems:
        print(p.line(str(path)))
    errors = sum(p.level == "error" for p in problems)
    if errors:
        print(f"{path}: {errors} error{'s' if errors > 1 else ''}; fix {'them' if errors > 1 else 'it'} "
              "before using this configuration")
        return 2
    print(f"{path}: OK" + (f" ({len(problems)} warning{'s' if len(problems) > 1 else ''})" if problems else ""))
    return 0


def _show(name: str) -> int:
    import dataclasses

    from cryodask.cluster.config import config_scope, current_spec, find_config, load_cluster_config, worker_config

    path = find_config(name)
    data, warnings = load_cluster_config(path)
    for w in warnings:
        print(f"# {w.line(str(path))}", file=sys.stderr)
    with config_scope(data):
        spec = dataclasses.replace(current_spec(str(path)), worker_config=worker_config(data))
        if spec.kind == "slurm":
            from cryodask.cluster.slurm import render_job_script

            size = (f"adapt {spec.adapt[0]}..{spec.adapt[1]} jobs" if spec.adapt is not None
                    else f"{spec.jobs or 1} job{'s' if (spec.jobs or 1) > 1 else ''}")
            print(f"# {path}: SLURM worker jobs ({size}); each job runs this script "
                  "(the scheduler address is filled in at run time)", file=sys.stderr)
            print(render_job_script(spec), end="")
        else:
            from cryodask.cluster.local import default_workers

            if spec.kind == "local-gpu":
                gpus = "all GPUs" if spec.gpu_list is None else f"GPUs {' '.join(map(str, spec.gpu_list))}"
                print(f"{path}: local-gpu: one worker process per GPU ({gpus}), "
                      f"{spec.threads or 1} thread(s) each, CUDA_VISIBLE_DEVICES set per worker, resource GPU=1")
            else:
                n, t = default_workers(spec.workers, spec.threads)
                print(f"{path}: local: {n} worker process(es) x {t} thread(s) on this machine")
    return 0


def _test(args: argparse.Namespace) -> int:
    import time

    from cryodask.cluster.client import execution_client, worker_info

    t0 = time.perf_counter()
    with execution_client(args, log_directory=args.log_dir) as client:
        t1 = time.perf_counter()
        info = client.scheduler_info()["workers"]
        seen = client.run(worker_info)
        total = client.submit(sum, range(1000)).result()
        print(f"{len(info)} worker(s) up in {t1 - t0:.1f} s; sum(range(1000)) = {total}")
        for addr, w in sorted(seen.items()):
            res = info.get(addr, {}).get("resources") or {}
            extra = "".join(f", {k}={w[k]}" for k in ("SLURM_JOB_ID", "CUDA_VISIBLE_DEVICES", "MALLOC_ARENA_MAX")
                            if w.get(k) is not None)
            extra += f", resources {res}" if res else ""
            print(f"  {addr}: {w['host']} pid {w['pid']}, {info.get(addr, {}).get('nthreads', '?')} thread(s){extra}")
    print(f"closed after {time.perf_counter() - t0:.1f} s")
    return 0
