"""open_run, reports and class selection on our own small runs and on RELION's files.

The tests on our own runs share one module fixture (three small jobs, about a minute on an idle
machine) and are marked slow.
"""

from __future__ import annotations

import re
import shutil
import subprocess
from dataclasses import dataclass

import numpy as np
import pytest

from cryodask.analysis.fsc import resolution_at
from cryodask.errors import UserError
from cryodask.io.star import read_particles, read_star
from cryodask.runs import RunViews, open_run

BOX, APIX, N = 32, 5.0, 200
FAST = dict(particle_diameter=0.8 * BOX * APIX, ctf=True, pool=N, offset_range=2, offset_step=1, log=None)


@pytest.fixture(scope="module")
def runs(tmp_path_factory):
    """A refine3d (1 iteration + the joined one), a class3d (K=2, 1 iteration) and a class2d (K=3, 2 iterations)."""
    from cryodask.cluster.local import local_client
    from cryodask.em.class2d import class2d
    from cryodask.em.class3d import class3d
    from cryodask.em.refine3d import refine3d
    from cryodask.io.mrc import write_map
    from cryodask.ops.filters import low_pass_filter
    from cryodask.simulate import phantom, simulate_particles, write_simulation

    folder = tmp_path_factory.mktemp("runs")
    vol = phantom(BOX, seed=0)
    paths = write_simulation(folder / "sim", simulate_particles([vol], APIX, n=N, snr=0.3, seed=1))
    write_map(folder / "ref.mrc", low_pass_filter(vol, 30.0, APIX), APIX)
    with local_client(1) as c:
        r3 = refine3d(paths["particles"], folder / "R" / "run", folder / "ref.mrc", healpix_order=1, iter=1,
                      ini_high=30.0, random_seed=3, client=c, **FAST)
        c3 = class3d(paths["particles"], folder / "C3" / "run", folder / "ref.mrc", K=2, iter=1, healpix_order=1,
                     ini_high=30.0, client=c, **FAST)
        c2 = class2d(paths["particles"], folder / "C2" / "run", K=3, iter=2, psi_step=30, client=c, **FAST)
    return folder, paths, {"refine3d": r3, "class3d": c3, "class2d": c2}


@pytest.mark.slow
def test_finished_refine3d(runs):
    folder, _, res = runs
    run = open_run(folder / "R")  # the job folder
    assert (run.kind, run.finished, run.iteration) == ("refine3d", True, 1)
    model = read_star(folder / "R" / "run_model.star")
    fsc = model["model_class_1"]["rlnGoldStandardFsc"].to_numpy()
    np.testing.assert_allclose(run.fsc, fsc)
    assert run.resolution == resolution_at(fsc, 0.143, APIX, BOX) == pytest.approx(res["refine3d"].resolution)
    assert (run.box, run.pixel_size) == (BOX, APIX)
    assert run.map_paths == [folder / "R" / "run_class001.mrc"]
    np.testing.assert_allclose(run.maps[0], res["refine3d"].map, atol=1e-6)
    parts = read_particles(folder / "R" / "run_data.star").particles
    assert len(run.particles) == N
    np.testing.assert_allclose(run.particles["rlnAngleRot"], parts["rlnAngleRot"])
    h = run.history
    assert list(h["iteration"]) == [1]
    half1 = read_star(folder / "R" / "run_it001_half1_model.star")
    assert h["resolution"].iloc[0] == pytest.approx(float(half1["model_general"]["rlnCurrentResolution"]))
    assert h["gold_resolution"].iloc[0] == pytest.approx(
        resolution_at(half1["model_class_1"]["rlnGoldStandardFsc"].to_numpy(), 0.143, APIX, BOX))
    assert h["acc_rot"].iloc[0] == pytest.approx(res["refine3d"].history[0]["acc_rot"], rel=1e-5)
    # the same run by rootname, by a final file, and one iteration by its optimiser file
    assert open_run(folder / "R" / "run").resolution == run.resolution
    assert open_run(folder / "R" / "run_model.star").finished
    it1 = open_run(folder / "R" / "run_it001_optimiser.star")
    assert (it1.iteration, it1.finished, it1.model_path.name) == (1, False, "run_it001_half1_model.star")
    assert it1.map_paths == [folder / "R" / "run_it001_half1_class001.mrc"]


@pytest.mark.slow
def test_a_running_refine3d_shows_its_last_iteration(runs, tmp_path):
    folder = runs[0]
    for f in (folder / "R").glob("run_it*"):
        shutil.copy(f, tmp_path / f.name)
    run = open_run(tmp_path)
    assert (run.kind, run.finished, run.iteration) == ("refine3d", False, 1)
    half1 = read_star(tmp_path / "run_it001_half1_model.star")
    assert run.resolution == resolution_at(half1["model_class_1"]["rlnGoldStandardFsc"].to_numpy(), 0.143, APIX, BOX)
    assert len(run.particles) == N  # named in the optimiser file as an absolute path, found beside it as well


@pytest.mark.slow
def test_class3d_and_class2d(runs):
    folder, _, res = runs
    c3 = open_run(folder / "C3")
    assert (c3.kind, c3.iteration, c3.finished) == ("class3d", 1, True)
    model = read_star(folder / "C3" / "run_it001_model.star")
    np.testing.assert_allclose(c3.class_fractions, model["model_classes"]["rlnClassDistribution"])
    assert c3.resolution == pytest.approx(float(model["model_general"]["rlnCurrentResolution"]))
    assert c3.fsc is None and len(c3.maps) == 2 and c3.maps[1].shape == (BOX,) * 3
    np.testing.assert_allclose(c3.maps[1], res["class3d"].maps[1], atol=1e-6)
    c2 = open_run(folder / "C2" / "run")
    assert (c2.kind, c2.iteration) == ("class2d", 2)
    assert c2.maps.shape == (3, BOX, BOX)
    np.testing.assert_allclose(c2.maps, res["class2d"].classes, atol=1e-6)
    np.testing.assert_allclose(c2.class_fractions, res["class2d"].class_fractions, rtol=1e-5)
    assert list(c2.history["iteration"]) == [1, 2]  # iteration 0 (the initial averages) is not in the history
    np.testing.assert_allclose(c2.history["ave_pmax"], [h["ave_pmax"] for h in res["class2d"].history], rtol=1e-5)
    opt = read_star(folder / "C2" / "run_it002_optimiser.star")["optimiser_general"]
    assert c2.history["changes_classes"].iloc[1] == pytest.approx(float(opt["rlnChangesOptimalClasses"]))


@pytest.mark.slow
def test_plots_of_a_run_and_of_a_result_with_output_root(runs):
    folder, _, res = runs
    fig = open_run(folder / "C2").plot_classes()
    labels = [t.get_text() for t in fig.axes[0].texts if t.get_gid() == "class-label"]
    assert len(labels) == 3

    @dataclass
    class Result(RunViews):  # what the jobs' result dataclasses will do
        output_root: str

    r = Result(str(folder / "R" / "run"))
    text = next(t.get_text() for t in r.plot_fsc().axes[0].texts if t.get_text().startswith("FSC"))
    assert float(re.search(r"([\d.]+) Å", text).group(1)) == pytest.approx(res["refine3d"].resolution, abs=0.005)
    mesh = r.plot_angles().axes[0].collections[0]
    assert float(np.asarray(mesh.get_array()).sum()) == N
    assert len(r.plot_classes().axes) == 6
    with pytest.raises(UserError, match="refine3d"):
        Result(str(folder / "C3" / "run")).plot_fsc()


@pytest.mark.slow
def test_report(runs, tmp_path):
    folder = runs[0]
    html_path = open_run(folder / "R").write_report()
    assert html_path == folder / "R" / "run_report.html"
    text = html_path.read_text()
    for name in ("fsc", "slices", "angles", "convergence"):
        png = folder / "R" / f"run_{name}.png"
        assert png.read_bytes()[:4] == b"\x89PNG"
        assert f'id="{name}"' in text
    assert text.count("data:image/png;base64,") == 4
    from cryodask.report import write_report

    out = write_report(folder / "C2", tmp_path / "c2.html")
    assert out == tmp_path / "c2.html" and (tmp_path / "c2_classes.png").is_file()
    assert sorted(p.name for p in tmp_path.iterdir()) == ["c2.html", "c2_classes.png", "c2_convergence.png"]


@pytest.mark.slow
def test_iteration_plots(runs):
    from cryodask.report import write_iteration_plots

    folder = runs[0]
    assert [p.name for p in write_iteration_plots(folder / "C2" / "run", 2, "class2d")] == ["run_it002_classes.png"]
    assert [p.name for p in write_iteration_plots(folder / "R" / "run", 1, "refine3d")] == \
        ["run_it001_fsc.png", "run_it001_slices.png"]
    assert [p.name for p in write_iteration_plots(folder / "C3" / "run", 1, "class3d")] == ["run_it001_slices.png"]
    assert (folder / "C3" / "run_it001_slices.png").read_bytes()[:4] == b"\x89PNG"


@pytest.mark.slow
def test_cli_report_and_select(runs, tmp_path, capsys):
    from cryodask.cli import main

    folder = runs[0]
    assert main(["report", str(folder / "C3"), "--o", str(tmp_path)]) == 0
    assert capsys.readouterr().out.strip() == str(tmp_path / "run_report.html")
    data = folder / "C2" / "run_it002_data.star"
    cls = read_particles(data).particles["rlnClassNumber"].to_numpy()
    assert main(["select", "--i", str(data), "--classes", "1", "3", "--o", str(tmp_path / "sel.star")]) == 0
    sel = read_particles(tmp_path / "sel.star").particles
    assert len(sel) == np.isin(cls, [1, 3]).sum() and set(sel["rlnClassNumber"]) <= {1, 3}
    model = read_star(folder / "C2" / "run_it002_model.star")["model_classes"]
    fr = model["rlnClassDistribution"].to_numpy()
    thr = float(np.sort(fr)[1])  # keeps the two largest classes
    assert main(["select", "--i", str(data), "--min_fraction", str(thr), "--o", str(tmp_path / "big.star")]) == 0
    big = read_particles(tmp_path / "big.star").particles
    assert set(big["rlnClassNumber"]) == set((np.flatnonzero(fr >= thr) + 1).tolist())
    capsys.readouterr()
    assert main(["select", "--i", str(data), "--classes", "7", "--o", str(tmp_path / "x.star")]) == 2
    assert capsys.readouterr().err.startswith("cryodask: error: --classes:")


def test_no_run_is_a_user_error(tmp_path, capsys):
    from cryodask.cli import main

    with pytest.raises(UserError, match="holds no"):
        open_run(tmp_path)
    with pytest.raises(UserError, match="no run found"):
        open_run(tmp_path / "Class2D" / "run")
    assert main(["report", str(tmp_path / "nothing_it001_optimiser.star")]) == 2
    err = capsys.readouterr().err.strip()
    assert err.startswith("cryodask: error:") and "\n" not in err


def test_relion_tutorial_files(shared_data, tmp_path):
    """RELION's own Class3D files (tutorial optimiser and sampling; a RELION 3.0 model) in a job folder."""
    tut = shared_data / "star" / "starfile" / "relion_tutorial"
    job = tmp_path / "Class3D" / "job020"
    job.mkdir(parents=True)
    shutil.copy(tut / "run_it025_optimiser_3D.star", job / "run_it025_optimiser.star")
    shutil.copy(tut / "run_it025_sampling_3D.star", job / "run_it025_sampling.star")
    shutil.copy(shared_data / "star" / "aspire" / "sample_data_model.star", job / "run_it025_model.star")
    run = open_run(job)
    assert (run.kind, run.iteration, run.finished) == ("class3d", 25, True)
    assert run.resolution == pytest.approx(8.152174)  # rlnCurrentResolution of the model
    assert (run.box, run.pixel_size) == (150, 1.25)
    assert run.command_line.startswith("--o Class3D/job020/run --i Extract/job016/particles.star")
    h = run.history
    assert list(h["iteration"]) == [25]
    assert h["changes_classes"].iloc[0] == pytest.approx(0.493386)
    assert h["changes_orientations"].iloc[0] == pytest.approx(10.079832)


@pytest.mark.slow
@pytest.mark.relion
def test_relion_class3d_and_class2d_folders(runs, relion, tmp_path):
    """RELION 3.1 relion_refine writes the folders; open_run reads what its _model.star says."""
    folder, paths, _ = runs
    sim = paths["particles"].parent
    common = ["--i", "particles.star", "--particle_diameter", "128", "--ctf", "--zero_mask", "--offset_range", "2",
              "--offset_step", "1", "--j", "1", "--pool", "100", "--dont_combine_weights_via_disc"]
    (tmp_path / "C3").mkdir()
    (tmp_path / "C2").mkdir()
    subprocess.run([str(relion / "relion_refine"), *common, "--o", str(tmp_path / "C3" / "run"), "--ref",
                    str(folder / "ref.mrc"), "--K", "2", "--iter", "1", "--tau2_fudge", "4", "--healpix_order", "1",
                    "--ini_high", "30", "--firstiter_cc"], cwd=sim, check=True, capture_output=True, timeout=300)
    subprocess.run([str(relion / "relion_refine"), *common, "--o", str(tmp_path / "C2" / "run"), "--K", "3",
                    "--iter", "1", "--tau2_fudge", "2", "--psi_step", "30"], cwd=sim, check=True,
                   capture_output=True, timeout=300)
    for sub, kind, k in (("C3", "class3d", 2), ("C2", "class2d", 3)):
        run = open_run(tmp_path / sub)
        model = read_star(tmp_path / sub / "run_it001_model.star")
        assert (run.kind, run.iteration, run.finished) == (kind, 1, True)
        assert run.resolution == pytest.approx(float(model["model_general"]["rlnCurrentResolution"]))
        np.testing.assert_allclose(run.class_fractions, model["model_classes"]["rlnClassDistribution"])
        assert len(run.particles) == N
        assert len(run.maps) == k and np.shape(run.maps[0])[-1] == BOX
        assert list(run.history["iteration"]) == [1]
        assert run.write_report().is_file()
