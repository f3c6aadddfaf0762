"""Write the example notebooks (outputs stripped) from the cells below.

    .venv/bin/python notebooks/make_notebooks.py      # rewrites notebooks/0*.ipynb

Edit the cells here, not the .ipynb files, so the notebooks stay small and reviewable.
Each notebook works in a folder ``work/`` under the directory it runs in and runs in well
under a minute on two cores (box 32, a few hundred particles, 2-3 iterations);
tests/test_notebooks.py executes them top to bottom.
"""

from __future__ import annotations

from pathlib import Path

import nbformat
from nbformat.v4 import new_code_cell, new_markdown_cell, new_notebook

HERE = Path(__file__).resolve().parent

SETUP = """\
%matplotlib inline
from pathlib import Path

import os

import numpy as np

import cryodask
from cryodask.runs import open_run

# a project folder, as RELION has: every path below is relative to it, image names included
work = Path("work")
if Path.cwd().name != "work":
    work.mkdir(exist_ok=True)
    os.chdir(work)"""

QUICKSTART = [
    new_markdown_cell("""\
# cryodask quickstart: simulate, refine, look

A tiny end-to-end run: particles simulated from a phantom map (box 32, 5 Å/px), a gold-standard
3D auto-refinement (`cryodask.refine3d`, RELION's `relion_refine --auto_refine`), its FSC curve and
slices through the map. The same run from a shell:

```bash
mkdir work && cd work
cryodask simulate --phantom 32 --angpix 5 --n 200 --snr 0.3 --o .
cryodask refine3d --i particles.star --ref phantom.mrc --ini_high 30 --o Refine3D/run --ctf --particle_diameter 128
cryodask report Refine3D/run
```"""),
    new_code_cell(SETUP),
    new_markdown_cell("## Simulate particles\nRandom poses and shifts, RELION's CTF with a defocus spread, noise at SNR 0.3. "
                      "`truth.star` keeps the true poses apart."),
    new_code_cell("""\
from cryodask.io.mrc import write_map
from cryodask.ops.filters import low_pass_filter
from cryodask.simulate import phantom, simulate_particles, write_simulation

box, apix = 32, 5.0
truth_map = phantom(box, seed=0)
sim = simulate_particles([truth_map], apix, n=200, snr=0.3, seed=1)
paths = write_simulation(".", sim)
# the starting reference: the truth low-passed to 30 Å (refine3d low-passes it again with ini_high)
write_map("ref.mrc", low_pass_filter(truth_map, 30.0, apix), apix)
sim.particles.head()"""),
    new_markdown_cell("## Refine\nRELION's option names as keyword arguments. A local Dask cluster is started for the "
                      "call (`workers`); pass `client=` to use your own (see `03-cluster`)."),
    new_code_cell("""\
result = cryodask.refine3d(paths["particles"], "Refine3D/run", "ref.mrc",
                           ini_high=30.0, particle_diameter=128.0, ctf=True, zero_mask=True, flatten_solvent=True,
                           healpix_order=1, iter=1, pool=100, workers=2, random_seed=3)
print(f"gold-standard resolution {result.resolution:.1f} Å after {result.iterations} iterations")"""),
    new_markdown_cell("## Open the run\n`open_run` reads a finished or running job from its files: ours, or RELION's own "
                      "Refine3D / Class3D / Class2D folders."),
    new_code_cell("""\
run = open_run("Refine3D")
run, run.resolution, len(run.particles)"""),
    new_code_cell("run.plot_fsc()"),
    new_markdown_cell("Central slices and projections of the final map, and the map against the truth:"),
    new_code_cell("run.plot_slices()"),
    new_code_cell("""\
from cryodask.analysis.fsc import fsc, resolution_at
from cryodask.ops.filters import spherical_mask
from cryodask.plots import plot_fsc

vs_truth = fsc(run.maps[0], truth_map, mask=spherical_mask(box, 0.4 * box, width=3))
print(f"against the true map: {resolution_at(vs_truth, 0.5, apix):.1f} Å at FSC 0.5")
plot_fsc(vs_truth, apix, annotate=0.5)"""),
    new_code_cell("run.plot_angles()"),
    new_code_cell("""\
run.history[["iteration", "resolution", "gold_resolution", "changes_orientations", "changes_offsets", "ave_pmax"]]"""),
    new_markdown_cell("Everything in one HTML page (PNGs beside the outputs as well):"),
    new_code_cell("run.write_report()"),
]

CLASSIFICATION = [
    new_markdown_cell("""\
# Classification: 2D classes, 3D classes, focused classification

Particles from two slightly different maps (box 32), sorted by `cryodask.class2d` (reference-free
2D classes), `cryodask.class3d` (3D classes) and a focused 3D classification without alignment
(`skip_align=True` with a mask). RELION's option names throughout."""),
    new_code_cell(SETUP),
    new_code_cell("""\
from cryodask.io.mrc import write_map
from cryodask.ops.filters import low_pass_filter, spherical_mask
from cryodask.simulate import phantom, phantom_variant, simulate_particles, write_simulation

box, apix = 32, 5.0
a = phantom(box, seed=0)
b = phantom_variant(a, fraction=0.2, seed=1)
sim = simulate_particles([a, b], apix, n=200, snr=0.5, seed=2)
paths = write_simulation(".", sim)
write_map("ref.mrc", low_pass_filter(a, 30.0, apix), apix)
np.bincount(sim.truth["rlnClassNumber"])[1:]   # particles per true map"""),
    new_markdown_cell("## 2D classification\nA montage of the class averages, labelled with class number, share of the "
                      "particles and estimated resolution, most populated first."),
    new_code_cell("""\
c2 = cryodask.class2d(paths["particles"], "Class2D/run", K=4, iter=2, psi_step=20, offset_range=3,
                      offset_step=1, particle_diameter=128.0, zero_mask=True, ctf=True, pool=100, workers=2)
run2 = open_run("Class2D")
run2.plot_classes(order="fraction")"""),
    new_markdown_cell("Select classes by their share of the particles (the same as `cryodask select --min_fraction`):"),
    new_code_cell("""\
keep = [k + 1 for k, f in enumerate(run2.class_fractions) if f >= 0.1]
selected = run2.particles[run2.particles["rlnClassNumber"].isin(keep)]
print(f"classes {keep}: {len(selected)} of {len(run2.particles)} particles")"""),
    new_markdown_cell("## 3D classification"),
    new_code_cell("""\
c3 = cryodask.class3d(paths["particles"], "Class3D/run", "ref.mrc", K=2, iter=2,
                      ini_high=30.0, healpix_order=1, particle_diameter=128.0, ctf=True, pool=100, workers=2)
run3 = open_run("Class3D")
print("class fractions", np.round(run3.class_fractions, 3))
run3.plot_classes()"""),
    new_code_cell("run3.plot_convergence()"),
    new_markdown_cell("""\
## Focused classification without alignment

Keep the poses of the run above and classify only what lies inside a mask (RELION's
`--skip_align --solvent_mask`). The keyword is new: the cell says so and moves on when this
version of cryodask does not have it yet."""),
    new_code_cell("""\
import inspect

write_map("mask.mrc", spherical_mask(box, 0.25 * box, width=3), apix)
if "skip_align" in inspect.signature(cryodask.class3d).parameters:
    focused = cryodask.class3d("Class3D/run_it002_data.star", "Focused/run",
                               "ref.mrc", K=2, iter=1, skip_align=True,
                               solvent_mask="mask.mrc", particle_diameter=128.0, ctf=True, pool=100,
                               workers=2)
    run_f = open_run("Focused")
    print("class fractions", np.round(run_f.class_fractions, 3))
else:
    print("class3d(skip_align=True, solvent_mask=...) is not in this version of cryodask yet")"""),
]

CLUSTER = [
    new_markdown_cell("""\
# Clusters: local, SLURM, the dashboard, scaling out

Every cryodask job runs on a Dask `distributed` client. Without one, a job starts a
`LocalCluster` for its duration; pass `client=` to share one cluster between jobs and watch
them on its dashboard."""),
    new_code_cell(SETUP),
    new_markdown_cell("## A local cluster and its dashboard"),
    new_code_cell("""\
from distributed import Client, LocalCluster

cluster = LocalCluster(n_workers=1, threads_per_worker=1, dashboard_address=":0")  # any free port
client = Client(cluster)
print("dashboard:", client.dashboard_link)
len(client.scheduler_info()["workers"])"""),
    new_markdown_cell("Scale out (on SLURM the same call submits worker jobs):"),
    new_code_cell("""\
client.cluster.scale(2)
client.wait_for_workers(2)
len(client.scheduler_info()["workers"])"""),
    new_markdown_cell("## Progress\nThe jobs show a bar per iteration over the finished tasks (a widget here, text in "
                      "a terminal) and one line per iteration; this is the same object on tasks of your own."),
    new_code_cell("""\
import time

from cryodask.progress import JobProgress

def work_item(i):
    time.sleep(0.05)
    return i * i

progress = JobProgress("demo", total_iterations=2)
progress.start(client)
for it in (1, 2):
    futures = [client.submit(work_item, i, pure=False) for i in range(20)]
    progress.track(futures, f"it{it:03d}")
    progress.iteration_done(it, sampling_points=20, total=sum(client.gather(futures)))"""),
    new_markdown_cell("## A job on this cluster"),
    new_code_cell("""\
from cryodask.simulate import phantom, simulate_particles, write_simulation

sim = simulate_particles([phantom(32, seed=0)], 5.0, n=200, snr=0.5, seed=1)
paths = write_simulation(".", sim)
res = cryodask.class2d(paths["particles"], "Class2D/run", K=4, iter=2, psi_step=30, ctf=True,
                       particle_diameter=128.0, pool=100, client=client)
open_run("Class2D").plot_classes()"""),
    new_markdown_cell("""\
## SLURM

`cluster_configs/slurm-cpu.yaml` describes worker jobs in dask-jobqueue's own configuration
keys; `cryodask cluster show` prints the sbatch script each worker job runs, `cryodask cluster
check` says what is wrong with a config, and `--cluster` on any job uses it:

```bash
cryodask class2d --i particles.star --o Class2D/run --K 50 --cluster cluster_configs/slurm-cpu.yaml
```"""),
    new_code_cell("""\
import subprocess
import sys

config = Path(cryodask.__file__).resolve().parents[1] / "cluster_configs" / "slurm-cpu.yaml"
shown = subprocess.run([sys.executable, "-m", "cryodask", "cluster", "show", str(config)],
                       capture_output=True, text=True, check=True)
print(shown.stdout)"""),
    new_markdown_cell("From Python, the same config gives a `SLURMCluster` (needs `sbatch`, so not run here):\n\n"
                      "```python\nfrom dask_jobqueue import SLURMCluster\nimport dask, yaml\n"
                      "dask.config.update(dask.config.config, yaml.safe_load(open(config)))\n"
                      "cluster = SLURMCluster()\ncluster.adapt(minimum=4, maximum=4)   # replaces lost workers\n"
                      "client = Client(cluster)\nprint(client.dashboard_link)\n```"),
    new_code_cell("""\
client.close()
cluster.close()"""),
]

NOTEBOOKS = {"01-quickstart.ipynb": QUICKSTART, "02-classification.ipynb": CLASSIFICATION, "03-cluster.ipynb": CLUSTER}


def build(cells: list) -> nbformat.NotebookNode:
    nb = new_notebook(cells=cells)
    nb.metadata["kernelspec"] = {"display_name": "Python 3", "language": "python", "name": "python3"}
    nb.metadata["language_info"] = {"name": "python"}
    for i, c in enumerate(nb.cells):
        c["id"] = f"cell-{i:02d}"  # stable ids: regenerating gives the same file
    return nb


def main() -> None:
    for name, cells in NOTEBOOKS.items():
        nb = build(cells)
        nbformat.validate(nb)
        (HERE / name).write_text(nbformat.writes(nb) + "\n", encoding="utf-8")
        print(HERE / name)


if __name__ == "__main__":
    main()
