"""pipelines/class2d-select-refine3d.sh end to end at a tiny size (simulate, import, class2d, select, refine3d)."""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest

REPO = Path(__file__).resolve().parents[1]


@pytest.mark.slow
@pytest.mark.timeout(900)
def test_class2d_select_refine3d_script(tmp_path):
    from cryodask.io.star import read_particles, read_star
    from cryodask.runs import open_run

    project = tmp_path / "project"
    env = dict(os.environ, CRYODASK=f"{sys.executable} -m cryodask", N="200", K="4", ITER_2D="2",
               MIN_FRACTION="0.2", EXEC="--workers 1", EXTRA_2D="--psi_step 30 --pool 100",
               EXTRA_3D="--healpix_order 1 --iter 1 --pool 100")
    r = subprocess.run(["bash", str(REPO / "pipelines" / "class2d-select-refine3d.sh"), str(project)], env=env,
                       capture_output=True, text=True, timeout=850)
    assert r.returncode == 0, r.stdout[-3000:] + r.stderr[-3000:]
    # the selection follows the class distribution of the last 2D iteration
    model = read_star(project / "Class2D" / "run_it002_model.star")["model_classes"]
    keep = np.flatnonzero(model["rlnClassDistribution"].to_numpy() >= 0.2) + 1
    data = read_particles(project / "Class2D" / "run_it002_data.star").particles
    selected = read_particles(project / "Select" / "particles.star").particles
    assert 0 < len(selected) == np.isin(data["rlnClassNumber"], keep).sum() < 200
    assert set(selected["rlnClassNumber"]) == set(keep.tolist())
    # refine3d ran on exactly those particles and finished
    run = open_run(project / "Refine3D")
    assert run.kind == "refine3d" and run.finished
    assert sorted(run.particles["rlnImageName"]) == sorted(selected["rlnImageName"])
    assert 10.0 < run.resolution < 60.0
    for report in ("Class2D/run_report.html", "Refine3D/run_report.html"):
        assert (project / report).is_file()
    assert r.stdout.splitlines()[-2:] == ["Class2D/run_report.html", "Refine3D/run_report.html"]  # paths printed
