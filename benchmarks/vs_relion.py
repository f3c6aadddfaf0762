"""cryodask against Debian's RELION 3.1 on the same simulated data and cores: time, memory, accuracy.

For each job (class2d, class3d, refine3d) both programs run on one simulated data set
(:mod:`cryodask.simulate`: a phantom and a variant, 2-class mixture, CTF, known poses) with
matching options, each as a command line whose process tree is sampled with psutil (peak =
the largest sum of RSS over the tree: RELION's MPI ranks, cryodask's driver + workers).
Printed per job: wall time of each and the ratio RELION / cryodask, the ratio of their CPU
seconds (user + system over the process tree: a check that barely moves when other work shared
the machine during a long run, where the wall time does), peak memory of each, and
accuracy against the truth — FSC(0.143) resolution of the map against the true volume for
refine3d (and class3d's best class), class purity for class2d and class3d.

RELION: ``relion_refine --j <cores>`` for class2d/class3d; ``mpirun -n 3 relion_refine_mpi --j 1``
for refine3d (a master and two half-set ranks). cryodask: its CLI with one single-threaded worker
per core (``--workers <cores> --j 1``, its default), the particles' default chunking.

Usage::

    .venv/bin/python benchmarks/vs_relion.py                        # 3,000 particles, box 64, all jobs
    .venv/bin/python benchmarks/vs_relion.py --box 128
    .venv/bin/python benchmarks/vs_relion.py --n 600 --iter 3 --jobs class3d,refine3d   # quick
"""

from __future__ import annotations

import argparse
import json
import os
import resource
import shutil
import subprocess
import tempfile
import threading
import time
from pathlib import Path

import numpy as np


def _tree_cpu(root) -> float:
    """User + system seconds of a live process tree (each process's own and its reaped children's)."""
    import psutil

    total = 0.0
    for p in [root] + root.children(recursive=True):
        try:
            t = p.cpu_times()
            total += t.user + t.system + t.children_user + t.children_system
        except psutil.Error:
            pass
    return total


def run_tree(cmd: list[str], cwd: Path, log: Path, on_iteration=None, watch: Path | None = None,
             ) -> tuple[float, int, int, float]:
    """(wall seconds, peak summed RSS of the process tree in bytes, exit code, CPU seconds of the tree).

    The CPU seconds (user + system of every descendant, reaped) barely change when something else
    runs on the machine, unlike the wall time: the check on a figure measured beside other work.
    With ``watch`` (an output prefix such as ``RR/run``), ``on_iteration(iteration, wall, cpu, peak)``
    is called each time the program writes a new ``<prefix>_itNNN_optimiser.star``: the figures up
    to the end of that iteration, which survive the run being killed.
    """
    import psutil

    cpu0 = resource.getrusage(resource.RUSAGE_CHILDREN)
    t0 = time.perf_counter()
    with open(log, "w") as fh:
        env = dict(os.environ)
        if cmd[0] == "mpirun" and hasattr(os, "geteuid") and os.geteuid() == 0:  # CI and containers run as root
            env.update(OMPI_ALLOW_RUN_AS_ROOT="1", OMPI_ALLOW_RUN_AS_ROOT_CONFIRM="1")
        proc = subprocess.Popen(cmd, cwd=cwd, stdout=fh, stderr=subprocess.STDOUT, env=env)
        peak = [0]

        def sample():
            try:
                root = psutil.Process(proc.pid)
            except psutil.NoSuchProcess:
                return
            seen = set(_iterations(cwd / watch)) if watch else set()
            while proc.poll() is None:
                total = 0
                try:
                    for p in [root] + root.children(recursive=True):
                        try:
                            total += p.memory_info().rss
                        except psutil.Error:
                            pass
                except psutil.Error:
                    pass
                peak[0] = max(peak[0], total)
                if watch and on_iteration:
                    new = set(_iterations(cwd / watch)) - seen
                    if new:
                        seen |= new
                        try:
                            on_iteration(max(new), time.perf_counter() - t0, _tree_cpu(root), peak[0])
                        except psutil.Error:
                            pass
                time.sleep(0.2)

        th = threading.Thread(target=sample, daemon=True)
        th.start()
        rc = proc.wait()
        wall = time.perf_counter() - t0
        th.join()
    cpu1 = resource.getrusage(resource.RUSAGE_CHILDREN)
    cpu = (cpu1.ru_utime - cpu0.ru_utime) + (cpu1.ru_stime - cpu0.ru_stime)
    return wall, peak[0], rc, cpu


def _iterations(prefix: Path) -> list[int]:
    """Iterations a RELION run has finished under an output prefix (its ``_itNNN_optimiser.star`` files)."""
    n = len(prefix.name) + 3
    return sorted(int(f.name[n:n + 3]) for f in prefix.parent.glob(f"{prefix.name}_it[0-9][0-9][0-9]_optimiser.star"))


def _continue_command(cmd: list[str], out: str, iteration: int) -> list[str]:
    """RELION's own command to go on from a finished iteration: the launcher, ``--continue`` and the
    options that only set how it runs (threads, pool, weights in memory) or when it stops (--iter)."""
    k = next(i for i, a in enumerate(cmd) if a.startswith("relion_refine"))
    keep = []
    for opt in ("--j", "--pool", "--iter"):
        if opt in cmd:
            keep += [opt, cmd[cmd.index(opt) + 1]]
    keep += [a for a in cmd if a == "--dont_combine_weights_via_disc"]
    return cmd[:k + 1] + ["--continue", f"{out}_it{iteration:03d}_optimiser.star", "--o", out] + keep


def run_relion(cmd: list[str], cwd: Path, job: str, resume: bool) -> tuple[float, int, int, float]:
    """Run RELION's side, keeping its figures at the end of every iteration in ``<job>_relion_progress.json``.

    A refine3d at box 128 runs for hours; when the machine or the session stops it, ``resume``
    goes on from the last finished iteration with RELION's ``--continue``. The figures add up over
    finished iterations only (the one cut short is not counted: an uninterrupted run would not have
    paid it), so they are those of one run. A run cut short before this file was kept counts its
    wall time from ``ref.mrc`` to its last optimiser file, and its CPU seconds as unknown.

    RELION's ``--continue`` repeats auto-refine's sampling update of the iteration it continues
    from (its log then shows the no-gain count one higher and the offset range halved once more),
    so a resumed refine3d searches fewer translations than one that ran through: its time is if
    anything lower, and the speed-up measured against it a lower bound.
    """
    out = cmd[cmd.index("--o") + 1]
    progress = cwd / f"{job}_relion_progress.json"
    done = _iterations(cwd / out)
    segments: list[dict] = []
    if resume and done:
        segments = json.loads(progress.read_text()) if progress.is_file() else []
        if not segments:
            last = cwd / f"{out}_it{done[-1]:03d}_optimiser.star"
            segments = [{"from": 0, "to": done[-1], "wall": last.stat().st_mtime - (cwd / "ref.mrc").stat().st_mtime,
                         "cpu": None, "peak": None}]
        if segments[-1]["to"] != done[-1]:
            raise SystemExit(f"{progress}: records iterations up to {segments[-1]['to']} but {out} has "
                             f"{done[-1]}; delete {cwd / Path(out).parent} to start RELION's side again")
        first, cmd = done[-1] + 1, _continue_command(cmd, out, done[-1])
        print(f"{job}: RELION goes on from iteration {done[-1]} ({sum(g['wall'] for g in segments):.0f} s so far)",
              flush=True)
    else:
        first = 0
        progress.unlink(missing_ok=True)

    def checkpoint(iteration: int, wall: float, cpu: float, peak: int) -> list[dict]:
        now = segments + [{"from": first, "to": iteration, "wall": wall, "cpu": cpu, "peak": peak}]
        tmp = progress.with_suffix(".tmp")
        tmp.write_text(json.dumps(now, indent=1))
        os.replace(tmp, progress)
        return now

    wall, peak, rc, cpu = run_tree(cmd, cwd, cwd / f"{job}_relion.log" if not segments else
                                   cwd / f"{job}_relion_from_it{first:03d}.log", checkpoint, Path(out))
    done = _iterations(cwd / out)
    segments = checkpoint(done[-1] if done else first, wall, cpu, peak)
    if len(segments) > 1:
        print(f"{job}: RELION in {len(segments)} parts: " + ", ".join(
            f"iterations {g['from']}-{g['to']} {g['wall']:.0f} s" for g in segments), flush=True)
    cpus = [g["cpu"] for g in segments]
    return (sum(g["wall"] for g in segments), max(g["peak"] or 0 for g in segments), rc,
            float("nan") if None in cpus else sum(cpus))


def _fsc_resolution(vol_path: Path, truth: np.ndarray, apix: float) -> float:
    from cryodask.analysis.fsc import fsc, resolution_at
    from cryodask.io.mrc import read_map

    v, _ = read_map(vol_path)
    return float(resolution_at(fsc(np.asarray(v, np.float64), truth), 0.143, apix))


def _purity(data_star: Path, truth_labels: np.ndarray) -> float:
    """Σ_k (largest true class among particles of class k) / N — 1 is perfect, 1/K_true is chance."""
    from cryodask.io.star import read_particles

    got = read_particles(data_star).particles["rlnClassNumber"].to_numpy().astype(int)
    n = min(len(got), len(truth_labels))
    got, lab = got[:n], truth_labels[:n]
    return float(sum(np.bincount(lab[got == k]).max() for k in np.unique(got)) / n)


def _view_spread(data_star: Path, truth_directions: np.ndarray) -> float:
    """Mean angle (°) between a particle's true viewing direction and the mean true direction of its class:
    how well 2D classes group views, which is what 2D classification is for (purity against two 3D
    species that look alike in most views is not). Lower is better; classes blind to the view give ~90°."""
    from cryodask.io.star import read_particles

    got = read_particles(data_star).particles["rlnClassNumber"].to_numpy().astype(int)
    n = min(len(got), len(truth_directions))
    got, d = got[:n], truth_directions[:n]
    total = 0.0
    for k in np.unique(got):
        v = d[got == k]
        mean = v.sum(axis=0)
        mean /= max(np.linalg.norm(mean), 1e-12)
        total += np.degrees(np.arccos(np.clip(v @ mean, -1.0, 1.0))).sum()
    return float(total / n)


# how each program is told where and how to run, which need not match; everything else must
_EXECUTION = {"relion": {"--o", "--j", "--pool", "--dont_combine_weights_via_disc", "--auto_refine",
                         "--split_random_halves"},
              "cryodask": {"--o", "--workers", "--j"}}


def _options(cmd: list[str], skip: set[str]) -> dict[str, str]:
    start = next(i for i, w in enumerate(cmd) if w in ("relion_refine", "relion_refine_mpi", "cryodask"))
    words = cmd[start + 1:]
    out = {}
    for i, w in enumerate(words):
        if w.startswith("--") and w not in skip:
            nxt = words[i + 1] if i + 1 < len(words) else ""
            out[w] = "" if nxt.startswith("--") else nxt
    return out


def _check_matching(job: str, relion: list[str], ours: list[str]) -> None:
    """Both programs get the same options (RELION's names), apart from how they run: a figure from
    differently configured runs compares nothing."""
    a, b = _options(relion, _EXECUTION["relion"]), _options(ours, _EXECUTION["cryodask"])
    if a != b:
        diff = sorted(set(a.items()) ^ set(b.items()))
        raise SystemExit(f"vs_relion: the {job} command lines differ in {diff}: give both programs the same options")


def _last(folder: Path, pattern: str) -> Path | None:
    files = sorted(folder.glob(pattern))
    return files[-1] if files else None


def main(argv=None) -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--n", type=int, default=3000, help="particles (default 3000)")
    ap.add_argument("--box", type=int, default=64, help="box (default 64; also 128)")
    ap.add_argument("--jobs", default="class2d,class3d,refine3d")
    ap.add_argument("--iter", type=int, default=None, help="cap iterations (class2d/class3d; refine3d: --iter too)")
    ap.add_argument("--j", type=int, default=os.cpu_count() or 1, help="cores for both programs")
    ap.add_argument("--keep", default=None, help="folder to keep the runs in (default: a temporary one)")
    ap.add_argument("--reuse_relion", action="store_true",
                    help="with --keep: take RELION's figures from an earlier run in that folder (its <job>_relion.json)")
    ap.add_argument("--relion_resume", action="store_true",
                    help="with --keep: go on with an interrupted RELION run of the job from its last finished "
                         "iteration (RELION's --continue); its figures add up over finished iterations")
    ap.add_argument("--random_seed", type=int, default=None,
                    help="give both programs this --random_seed (RELION's default is the clock); the runs go to "
                         "folders and records of their own (R2D_s1/, class2d_seed1_relion.json, ...), so several "
                         "seeds can be compared on the same data")
    ap.add_argument("--relion_only", action="store_true",
                    help="with --keep: run RELION's side only and record it (hours for refine3d at 3,000 particles: "
                         "run it on an idle machine, then cryodask's side with --reuse_relion)")
    args = ap.parse_args(argv)
    if (args.relion_only or args.reuse_relion or args.relion_resume) and not args.keep:
        ap.error("--relion_only, --relion_resume and --reuse_relion need --keep FOLDER (where RELION's record is kept)")
    from cryodask.geometry.symmetry import direction_vectors
    from cryodask.io.mrc import write_map
    from cryodask.ops.filters import low_pass_filter
    from cryodask.simulate import phantom, phantom_variant, simulate_particles, write_simulation

    box, apix = args.box, 3.0 * 64 / args.box
    diam = 0.8 * box * apix
    vol_a = phantom(box, seed=0)
    vol_b = phantom_variant(vol_a, seed=1)
    tmp = Path(args.keep or tempfile.mkdtemp(prefix="vs_relion_"))
    tmp.mkdir(parents=True, exist_ok=True)
    sim = simulate_particles([vol_a, vol_b], apix, n=args.n, snr=0.1, seed=3)
    labels = sim.truth["rlnClassNumber"].to_numpy().astype(int)
    directions = direction_vectors(sim.truth["rlnAngleRot"].to_numpy(), sim.truth["rlnAngleTilt"].to_numpy())
    written = all((tmp / f).is_file() for f in ("particles.mrcs", "particles.star", "truth.star", "ref.mrc"))
    if (args.reuse_relion or args.relion_resume) and written:  # the same data (fixed seeds), left as RELION read it
        paths = {"stack": tmp / "particles.mrcs", "particles": tmp / "particles.star", "truth": tmp / "truth.star"}
    else:
        paths = write_simulation(tmp, sim)  # RELION reads image names relative to its working folder
        write_map(tmp / "ref.mrc", low_pass_filter(vol_a, 30.0, apix), apix)
    cores = str(args.j)
    it = args.iter
    print(f"data: {args.n} particles, box {box}, {apix:.2f} Å/px, 2 classes; {cores} cores "
          f"({os.cpu_count()} on the machine); runs in {tmp}")
    common = ["--particle_diameter", f"{diam:.0f}", "--ctf", "--zero_mask"]
    jobs = {
        "class2d": (
            ["relion_refine", "--i", str(paths["particles"]), "--o", "R2D/run", "--K", "10", "--iter", str(it or 25),
             "--tau2_fudge", "2", "--psi_step", "10", "--offset_range", "6", "--offset_step", "2", "--dont_combine_weights_via_disc",
             "--pool", "100", "--j", cores, "--flatten_solvent"] + common,
            ["cryodask", "class2d", "--i", str(paths["particles"]), "--o", "C2D/run", "--K", "10", "--iter",
             str(it or 25), "--tau2_fudge", "2", "--psi_step", "10", "--offset_range", "6", "--offset_step", "2",
             "--workers", cores, "--j", "1", "--flatten_solvent"] + common),
        "class3d": (
            ["relion_refine", "--i", str(paths["particles"]), "--o", "R3D/run", "--ref", str(tmp / "ref.mrc"),
             "--K", "2", "--iter", str(it or 25), "--ini_high", "30", "--healpix_order", "2", "--tau2_fudge", "4",
             "--firstiter_cc", "--dont_combine_weights_via_disc", "--pool", "100", "--j", cores, "--flatten_solvent"]
            + common,
            ["cryodask", "class3d", "--i", str(paths["particles"]), "--o", "C3D/run", "--ref", str(tmp / "ref.mrc"),
             "--K", "2", "--iter", str(it or 25), "--ini_high", "30", "--healpix_order", "2", "--tau2_fudge", "4",
             "--firstiter_cc", "--workers", cores, "--j", "1", "--flatten_solvent"] + common),
        "refine3d": (
            ["mpirun", "--oversubscribe", "-n", "3", "relion_refine_mpi", "--i", str(paths["particles"]), "--o",
             "RR/run", "--ref", str(tmp / "ref.mrc"), "--auto_refine", "--split_random_halves", "--ini_high", "30",
             "--healpix_order", "2", "--auto_local_healpix_order", "4", "--low_resol_join_halves", "40",
             "--firstiter_cc", "--dont_combine_weights_via_disc", "--pool", "100", "--j", "1", "--flatten_solvent"]
            + (["--iter", str(it)] if it else []) + common,
            ["cryodask", "refine3d", "--i", str(paths["particles"]), "--o", "CR/run", "--ref", str(tmp / "ref.mrc"),
             "--ini_high", "30", "--healpix_order", "2", "--auto_local_healpix_order", "4",
             "--low_resol_join_halves", "40", "--firstiter_cc", "--workers", cores, "--j", "1", "--flatten_solvent"]
            + (["--iter", str(it)] if it else []) + common),
    }
    for job, (rel_cmd, cd_cmd) in jobs.items():
        _check_matching(job, rel_cmd, cd_cmd)
    if shutil.which("relion_refine") is None:
        print("relion_refine not found: install Debian's relion package")
    rows = []
    for job in args.jobs.split(","):
        rel_cmd, cd_cmd = jobs[job]
        tag = job
        if args.random_seed is not None:  # separate folders and records per seed
            tag = f"{job}_seed{args.random_seed}"
            for cmd in (rel_cmd, cd_cmd):
                o = cmd.index("--o") + 1
                folder, name = cmd[o].split("/", 1)
                cmd[o] = f"{folder}_s{args.random_seed}/{name}"
                cmd += ["--random_seed", str(args.random_seed)]
        for cmd in (rel_cmd, cd_cmd):
            (tmp / cmd[cmd.index("--o") + 1]).parent.mkdir(exist_ok=True)
        exe = shutil.which("cryodask") or None
        if exe is None:  # the venv's entry point, or the module
            import sys

            cd_cmd = [sys.executable, "-m", "cryodask"] + cd_cmd[1:]
        record = tmp / f"{tag}_relion.json"
        if args.reuse_relion and record.is_file():
            tr, mr, rcr, *rest = json.loads(record.read_text())
            ur = rest[0] if rest else float("nan")  # records written before CPU time was kept
            print(f"{job}: RELION's figures from {record}")
        else:
            tr, mr, rcr, ur = run_relion(rel_cmd, tmp, tag, resume=args.relion_resume)
            record.write_text(json.dumps([tr, mr, rcr, ur]))
        if args.relion_only:
            print(f"{job}: RELION {tr:.1f} s ({ur:.0f} CPU s), {mr / 2**20:.0f} MiB (rc {rcr}); recorded in {record}",
                  flush=True)
            continue
        tc, mc, rcc, uc = run_tree(cd_cmd, tmp, tmp / f"{tag}_cryodask.log")
        acc_r = acc_c = float("nan")
        out_r, out_c = Path(rel_cmd[rel_cmd.index("--o") + 1]).parent, Path(cd_cmd[cd_cmd.index("--o") + 1]).parent
        try:
            if job == "refine3d":
                fr, fc = _last(tmp / out_r, "run_class001.mrc"), _last(tmp / out_c, "run_class001.mrc")
                fr = fr or _last(tmp / out_r, "run_it*_half1_class001.mrc")
                fc = fc or _last(tmp / out_c, "run_it*_half1_class001.mrc")
                acc_r = _fsc_resolution(fr, vol_a, apix) if fr else acc_r
                acc_c = _fsc_resolution(fc, vol_a, apix) if fc else acc_c
            else:
                dr, dc = _last(tmp / out_r, "run_it*_data.star"), _last(tmp / out_c, "run_it*_data.star")
                acc_r = _purity(dr, labels) if dr else acc_r
                acc_c = _purity(dc, labels) if dc else acc_c
                if job == "class2d" and dr and dc:
                    print(f"class2d: view spread (mean angle of the true directions to their class's mean; lower is "
                          f"better) RELION {_view_spread(dr, directions):.1f}°, cryodask "
                          f"{_view_spread(dc, directions):.1f}°", flush=True)
        except Exception as exc:  # a benchmark reports what it could measure
            print(f"{job}: accuracy not measured ({exc})")
        rows.append((job, tr, tc, mr, mc, acc_r, acc_c, ur, uc))
        what = "FSC-vs-truth resolution (Å)" if job == "refine3d" else "class purity"
        print(f"{job}: RELION {tr:.1f} s ({ur:.0f} CPU s), {mr / 2**20:.0f} MiB, {what} {acc_r:.3f} (rc {rcr}) | "
              f"cryodask {tc:.1f} s ({uc:.0f} CPU s), {mc / 2**20:.0f} MiB, {acc_c:.3f} (rc {rcc}) | "
              f"time ratio RELION/cryodask {tr / tc:.2f}, CPU time ratio {ur / uc:.2f}", flush=True)
    print("\njob       RELION s  cryodask s  speed-up  CPU-s ratio  RELION MiB  cryodask MiB  RELION acc  cryodask acc")
    for job, tr, tc, mr, mc, ar, ac, ur, uc in rows:
        print(f"{job:9s} {tr:8.1f}  {tc:10.1f}  {tr / tc:8.2f}  {ur / uc:11.2f}  {mr / 2**20:10.0f}  {mc / 2**20:12.0f}  "
              f"{ar:10.3f}  {ac:12.3f}")


if __name__ == "__main__":
    main()
