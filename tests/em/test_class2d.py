"""class2d: a mixture of views is sorted into classes whose averages match the views (issue 4 §4)."""

from __future__ import annotations

import subprocess
import sys

import numpy as np
import pandas as pd
import pytest
from scipy import ndimage

from cryodask.em.class2d import fine_sampling

BOX, APIX = 32, 4.0
VIEWS = ((0.0, 0.0), (0.0, 90.0), (90.0, 90.0), (45.0, 45.0), (135.0, 60.0))  # (rot, tilt)


def _simulate(out, n=300, snr=0.8, seed=0):
    """Particles of a phantom seen from a few fixed directions: random psi, small shifts, CTF, noise."""
    from cryodask.io.mrc import write_stack
    from cryodask.io.star import ParticleTable, write_particles
    from cryodask.ops.ctf import ctf_2d
    from cryodask.ops.project import project_images
    from cryodask.simulate import phantom

    rng = np.random.default_rng(seed)
    vol = phantom(BOX, seed=seed)
    view = np.arange(n) % len(VIEWS)
    rng.shuffle(view)
    rot = np.array([VIEWS[v][0] for v in view])
    tilt = np.array([VIEWS[v][1] for v in view])
    psi = rng.uniform(0, 360, n)
    shifts = np.clip(rng.normal(0, 1.0, (n, 2)), -2, 2)
    du = rng.uniform(8000, 20000, n)
    dv = du - rng.uniform(0, 300, n)
    dang = rng.uniform(0, 180, n)
    ctf = ctf_2d(BOX, APIX, defocus_u=du, defocus_v=dv, defocus_angle=dang, voltage=300.0, cs=2.7,
                 amplitude_contrast=0.1)
    img = project_images(vol, rot, tilt, psi, origins=shifts, ctf=ctf)
    img = img + rng.normal(0, np.sqrt(img.var(axis=(1, 2)).mean() / snr), img.shape).astype(np.float32)
    truth = project_images(vol, [v[0] for v in VIEWS], [v[1] for v in VIEWS], [0.0] * len(VIEWS))
    out.mkdir(parents=True, exist_ok=True)
    write_stack(out / "p.mrcs", img, APIX)
    optics = pd.DataFrame({"rlnOpticsGroupName": ["opticsGroup1"], "rlnOpticsGroup": [1], "rlnVoltage": [300.0],
                           "rlnSphericalAberration": [2.7], "rlnAmplitudeContrast": [0.1],
                           "rlnImagePixelSize": [APIX], "rlnImageSize": [BOX], "rlnImageDimensionality": [2]})
    parts = pd.DataFrame({"rlnImageName": [f"{i + 1:06d}@p.mrcs" for i in range(n)], "rlnDefocusU": du,
                          "rlnDefocusV": dv, "rlnDefocusAngle": dang, "rlnOpticsGroup": 1})
    write_particles(out / "p.star", ParticleTable(optics=optics, particles=parts))
    return view, truth, img


def high_pass(a: np.ndarray, shells: int = 3) -> np.ndarray:
    """``a`` without its lowest Fourier shells (the round envelope every view of a compact particle shares)."""
    f = np.fft.fft2(a)
    k = np.fft.fftfreq(a.shape[0]) * a.shape[0]
    f[np.hypot(k[:, None], k[None, :]) < shells] = 0
    return np.real(np.fft.ifft2(f))


def best_correlation(a: np.ndarray, b: np.ndarray, max_shift: int = 3) -> float:
    """Largest normalised correlation of ``b`` with ``a`` rotated in-plane (3° steps) and shifted (≤ max_shift px),
    inside a circle, both high-passed (:func:`high_pass`): views of the phantom then correlate at ≤ 0.55."""
    a, b = high_pass(a), high_pass(b)
    box = a.shape[0]
    yy, xx = np.mgrid[:box, :box] - box // 2
    m = (xx ** 2 + yy ** 2) <= (box // 2 - 2) ** 2
    bb = np.where(m, b - b[m].mean(), 0)
    B = np.conj(np.fft.fft2(bb))
    c0, best = box // 2, -1.0
    for ang in np.arange(0, 360, 3):
        r = ndimage.rotate(a, ang, reshape=False, order=1)
        r = np.where(m, r - r[m].mean(), 0)
        cc = np.fft.fftshift(np.real(np.fft.ifft2(np.fft.fft2(r) * B)))
        peak = cc[c0 - max_shift:c0 + max_shift + 1, c0 - max_shift:c0 + max_shift + 1].max()
        best = max(best, peak / (np.linalg.norm(r) * np.linalg.norm(bb) + 1e-30))
    return float(best)


def view_matches(classes: np.ndarray, class_number: np.ndarray, view: np.ndarray, truth: np.ndarray):
    """Per view: (purity, class its particles mostly went to, correlation with its own view, best with another)."""
    out = []
    for v in range(len(truth)):
        counts = np.bincount(class_number[view == v], minlength=len(classes) + 1)
        c = int(np.argmax(counts))
        corr = [best_correlation(classes[c - 1], t) for t in truth]
        out.append((counts[c] / counts.sum(), c, corr[v], max(corr[u] for u in range(len(truth)) if u != v)))
    return out


def class_purity(class_number: np.ndarray, view: np.ndarray) -> float:
    """Smallest share of a class's particles that come from its most common view (classes with ≥ 5% of the
    particles)."""
    out = 1.0
    for c in np.unique(class_number):
        sel = class_number == c
        if sel.mean() >= 0.05:
            out = min(out, np.bincount(view[sel]).max() / sel.sum())
    return float(out)


def test_fine_sampling_grid():
    psi, t = fine_sampling(10, 6, 2, 0)
    assert len(psi) == 36 and np.allclose(np.diff(psi), 10) and len(t) == 29
    psi1, t1 = fine_sampling(10, 6, 2, 1)
    assert len(psi1) == 72 and np.allclose(np.sort(psi1)[:2], [2.5, 7.5]) and len(t1) == 4 * 29
    assert np.allclose(np.diff(np.unique(t1[:, 0])), 1.0)  # children at half the step


@pytest.mark.slow
def test_class2d_sorts_views(tmp_path, monkeypatch):
    """K=10 on 300 particles from 5 views (SNR 0.8, CTF, random psi, shifts; two-pass search): every class is pure
    (≥ 0.9 of its particles from one view), every view goes mostly to one class, and that class's average matches
    the view (high-passed correlation ≥ 0.75, ≥ 0.15 above its correlation with any other view)."""
    from cryodask.em.class2d import class2d
    from cryodask.io.star import read_particles, read_star

    view, truth, img = _simulate(tmp_path / "data")
    monkeypatch.chdir(tmp_path / "data")
    lines = []
    res = class2d("p.star", tmp_path / "out" / "run", K=10, iter=15, ctf=True, psi_step=10, offset_range=3,
                  offset_step=1, oversampling=1, particle_diameter=110, zero_mask=True, pool=100, workers=2,
                  random_seed=1, log=lines.append)
    cls = res.data["rlnClassNumber"].to_numpy()
    assert class_purity(cls, view) >= 0.9
    matches = view_matches(res.classes, cls, view, truth)
    for v, (share, c, own, other) in enumerate(matches):
        assert share >= 0.75, (v, matches)
        assert own >= 0.75 and own > other + 0.15, (v, matches)
    assert len({c for _, c, _, _ in matches}) == len(VIEWS)  # every view has its own class

    # the same checks fail on averages of random subsets (what the classes start from)
    rng = np.random.default_rng(0)
    rand = rng.integers(1, 11, len(view))
    avg = np.stack([img[rand == k].mean(axis=0) for k in range(1, 11)])
    assert class_purity(rand, view) < 0.5
    bad = view_matches(avg, rand, view, truth)
    assert not any(own >= 0.75 and own > o + 0.15 for _, _, own, o in bad), bad

    # outputs, RELION's names and labels
    root = tmp_path / "out" / "run"
    for it in (0, 15):
        for what in ("classes.mrcs", "data.star", "model.star", "optimiser.star", "sampling.star"):
            assert (tmp_path / "out" / f"run_it{it:03d}_{what}").is_file()
    data = read_particles(f"{root}_it015_data.star").particles
    for label in ("rlnClassNumber", "rlnAnglePsi", "rlnOriginXAngst", "rlnOriginYAngst",
                  "rlnMaxValueProbDistribution", "rlnNrOfSignificantSamples", "rlnLogLikeliContribution"):
        assert label in data.columns
    assert np.array_equal(data["rlnClassNumber"].to_numpy(), cls)
    model = read_star(f"{root}_it015_model.star")
    assert model["model_general"]["rlnReferenceDimensionality"] == 2
    fr = model["model_classes"]["rlnClassDistribution"].to_numpy()
    assert fr.sum() == pytest.approx(1.0, abs=1e-4)
    assert np.allclose(np.bincount(cls, minlength=11)[1:] / len(cls), fr, atol=0.05)
    assert (model["model_classes"]["rlnEstimatedResolution"].to_numpy()[fr > 0] < 20).all()
    first = open(f"{root}_it015_optimiser.star").readline()
    assert first.startswith("#")

    # progress lines: RELION's NrHiddenVariableSamplingPoints (K x psi x translations x 2^os x 4^os), time left
    its = [x for x in lines if x.startswith("class2d it")]
    assert len(its) == 15 and its[0].startswith("class2d it001/015")
    n_trans = 29  # the disc of radius 3 px in 1 px steps
    assert f"{10 * 36 * n_trans * 2 * 4:,} sampling points/particle" in its[0]
    assert "left" in its[0]
    assert any("memory per worker" in x for x in lines)
    # plots beside every iteration, the report at the end; the result's plots read the same files
    assert (tmp_path / "out" / "run_it015_classes.png").stat().st_size > 1000
    html = (tmp_path / "out" / "run_report.html").read_text()
    assert "<img" in html
    assert res.plot_classes().axes[0].get_title().endswith("iteration 15")


@pytest.mark.relion
def test_class2d_outputs_read_by_relion(tmp_path, relion, monkeypatch):
    """RELION reads the class stack and the STAR files of a short run."""
    from cryodask.em.class2d import class2d

    _simulate(tmp_path / "data", n=60)
    monkeypatch.chdir(tmp_path / "data")
    class2d("p.star", tmp_path / "out" / "run", K=2, iter=1, psi_step=30, offset_range=1, offset_step=1,
            oversampling=0, pool=60, workers=1, log=None)
    root = tmp_path / "out" / "run_it001"
    r = subprocess.run([f"{relion}/relion_image_handler", "--i", f"{root}_classes.mrcs", "--stats"],
                       capture_output=True, text=True, timeout=60)
    assert r.returncode == 0 and r.stdout.count("32 x 32 x 1") == 2, r.stdout + r.stderr
    for what in ("data", "model"):
        out = tmp_path / f"{what}_copy.star"
        r = subprocess.run([f"{relion}/relion_star_handler", "--i", f"{root}_{what}.star", "--o", str(out)],
                           capture_output=True, text=True, timeout=60)
        assert r.returncode == 0 and out.is_file(), r.stdout + r.stderr
    assert "rlnClassNumber" in (tmp_path / "data_copy.star").read_text()


@pytest.mark.parametrize("opt", [["--K", "0"], ["--offset_step", "0"], ["--tau2_fudge", "-1"],
                                 ["--K", "20"]])  # more classes than the 10 particles
def test_class2d_bad_options(tmp_path, opt):
    _simulate(tmp_path, n=10)
    r = subprocess.run([sys.executable, "-m", "cryodask", "class2d", "--i", str(tmp_path / "p.star"), "--o",
                        str(tmp_path / "run"), "--K", "2", *opt], capture_output=True, text=True, timeout=120,
                       cwd=tmp_path)
    assert r.returncode == 2
    lines = r.stderr.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith(f"cryodask: error: {opt[0]}:"), r.stderr
    assert "Traceback" not in r.stderr


def test_two_pass_finds_the_single_pass_optimum(tmp_path):
    """Adaptive oversampling (coarse pass, significance, children) ends at the same best class, psi and offset as
    scoring the whole fine grid, and with nearly the same Pmax (SNR 0.1: posteriors broad enough that the coarse
    pass keeps the optimum's parent; at SNR 0.5, Pmax ≈ 1, a quarter of the particles end one fine step away, as
    RELION's coarse pass also does)."""
    from cryodask.em.class2d import Class2DSetup, ChunkInput, _pixels, _single_pass, _two_pass, prepare_images
    from cryodask.io.mrc import write_stack
    from cryodask.ops.ctf import ctf_2d

    view, truth, img = _simulate(tmp_path, n=80, snr=0.1, seed=3)
    refs = tmp_path / "refs.mrcs"
    write_stack(refs, truth, APIX)
    n = len(img)
    noise_var = img.var() / 1.1  # the noise share of the variance at SNR 0.1
    sigma2 = np.full((1, BOX // 2 + 1), noise_var / (2 * BOX * BOX))
    setup = Class2DSetup(iteration=2, box=BOX, pixel_size=APIX, pad=2, n_classes=len(truth), current_size=BOX,
                         references=str(refs), sigma2_noise=sigma2, class_fractions=np.full(len(truth), 0.2),
                         prior_offsets=np.zeros((len(truth), 2)), sigma_offset=10.0, psi_step=10, offset_range=3,
                         offset_step=2, oversampling=1, coarse_size=24, particle_diameter=110, zero_mask=True)
    from cryodask.io.star import read_particles

    parts = read_particles(tmp_path / "p.star").particles
    ctf = ctf_2d(BOX, APIX, defocus_u=parts["rlnDefocusU"].to_numpy(), defocus_v=parts["rlnDefocusV"].to_numpy(),
                 defocus_angle=parts["rlnDefocusAngle"].to_numpy(), voltage=300.0, cs=2.7, amplitude_contrast=0.1)
    inp = ChunkInput(chunk=0, index=np.arange(n), origins_px=np.zeros((n, 2)), optics=np.zeros(n, np.int64),
                     n_optics=1)
    ft, mft = prepare_images(img, inp.origins_px, pixel_size=APIX, particle_diameter=110, width_mask_edge=5,
                             zero_mask=True, rng=np.random.default_rng(0))
    px = _pixels(BOX, BOX / 2, ft, mft, np.asarray(ctf, np.float32), sigma2, inp.optics)
    lpo = np.log(setup.class_fractions)
    one = _single_pass(setup, px, inp.origins_px, len(truth), lpo)
    groups = _two_pass(setup, ft, mft, np.asarray(ctf, np.float32), inp.optics, px, inp.origins_px, len(truth), lpo)
    rows = np.concatenate([g["rows"] for g in groups])
    assert np.array_equal(np.sort(rows), np.arange(n))  # the groups partition the particles
    two = {key: np.zeros((n,) + np.shape(groups[0][key])[1:], np.asarray(groups[0][key]).dtype)
           for key in ("best_class", "best_psi", "best_t", "pmax", "n_significant")}
    for g in groups:
        for key in two:
            two[key][g["rows"]] = g[key]
    assert np.mean(one["best_class"] == view) >= 0.95  # the references are the true views
    assert np.mean(two["best_class"] == one["best_class"]) >= 0.95
    dpsi = np.abs((two["best_psi"] - one["best_psi"] + 180) % 360 - 180)
    same = two["best_class"] == one["best_class"]
    assert np.mean(dpsi[same] < 1e-6) >= 0.85
    assert np.mean(np.all(two["best_t"] == one["best_t"], axis=1)[same]) >= 0.85
    assert np.median(np.abs(two["pmax"] - one["pmax"])) < 0.02
    assert (two["n_significant"] >= 1).all() and all(len(g["T"]) <= 4 * 29 for g in groups)


def test_class2d_continue_equals_uninterrupted(tmp_path, monkeypatch):
    """Stopped after iteration 2 and continued to 3, a run ends with the classes and assignments of a run of 3;
    --flatten_solvent carries over (the classes are zero beyond the mask's soft edge in both)."""
    from cryodask.cluster.local import local_client
    from cryodask.em.class2d import class2d

    _simulate(tmp_path, n=80, seed=5)
    monkeypatch.chdir(tmp_path)
    kw = dict(psi_step=30, offset_range=2, offset_step=1, oversampling=1, particle_diameter=110, zero_mask=True,
              flatten_solvent=True, ctf=True, pool=40, random_seed=3, norm=True, scale=True, log=None)
    with local_client(1) as client:
        full = class2d("p.star", tmp_path / "a" / "run", K=3, iter=3, client=client, **kw)
        class2d("p.star", tmp_path / "b" / "run", K=3, iter=2, client=client, **kw)
        cont = class2d("p.star", tmp_path / "b" / "run", iter=3, client=client, log=None,
                       continue_from=tmp_path / "b" / "run_it002_optimiser.star")
        # a different seed gives different classes (the comparison can fail)
        other = class2d("p.star", tmp_path / "c" / "run", K=3, iter=3, client=client, **{**kw, "random_seed": 4})
    assert (tmp_path / "b" / "run_it003_classes.mrcs").is_file()
    scale = np.abs(full.classes).max()
    assert np.abs(cont.classes - full.classes).max() < 1e-3 * scale
    assert np.array_equal(cont.data["rlnClassNumber"].to_numpy(), full.data["rlnClassNumber"].to_numpy())
    assert np.allclose(cont.class_fractions, full.class_fractions, atol=1e-4)
    assert np.abs(other.classes - full.classes).max() > 0.05 * scale
    r = np.hypot(*np.meshgrid(np.arange(BOX) - BOX // 2, np.arange(BOX) - BOX // 2, indexing="ij"))
    outside = r > 110 / (2 * APIX) + 5  # the mask's radius plus its 5-pixel soft edge
    for res in (full, cont):
        assert np.abs(res.classes[:, outside]).max() == 0 and np.abs(res.classes[:, r < 10]).max() > 0.1 * scale
    # --norm carries over through the files (the per-particle values and their average)
    # (the files hold 7 digits: a fine-pass sample at the edge of a particle's significant set can fall on
    # either side in the two runs, which moves that particle's norm by ~1e-4; the rest agree to ~1e-7)
    a, b = cont.data["rlnNormCorrection"].to_numpy(float), full.data["rlnNormCorrection"].to_numpy(float)
    rel = np.abs(a - b) / b
    assert np.median(rel) < 1e-6 and (rel < 1e-6).mean() >= 0.95 and rel.max() < 1e-3, np.sort(rel)[-3:]
    assert full.data["rlnNormCorrection"].std() > 0.001


def test_class2d_norm_follows_each_images_level(tmp_path, monkeypatch):
    """--norm on images whose overall level is x0.7 or x1.4: rlnNormCorrection is twice as large for the second;
    with one optics group --scale stays 1."""
    from cryodask.cluster.local import local_client
    from cryodask.em.class2d import class2d
    from cryodask.io.mrc import read_stack, write_stack
    from cryodask.io.star import read_star

    _simulate(tmp_path, n=120, seed=6)
    img = np.array(read_stack(tmp_path / "p.mrcs", mmap=False))
    level = np.random.default_rng(1).choice([0.7, 1.4], len(img))
    write_stack(tmp_path / "p.mrcs", (img * level[:, None, None]).astype(np.float32), APIX)
    monkeypatch.chdir(tmp_path)
    with local_client(1) as client:
        res = class2d("p.star", tmp_path / "run", K=3, iter=3, psi_step=30, offset_range=2, offset_step=1,
                      particle_diameter=110, zero_mask=True, ctf=True, pool=60, norm=True, scale=True, client=client,
                      log=None)
    norm = res.data["rlnNormCorrection"].to_numpy()
    ratio = np.median(norm[level == 1.4]) / np.median(norm[level == 0.7])
    assert 1.8 <= ratio <= 2.2, ratio
    model = read_star(tmp_path / "run_it003_model.star")
    assert float(model["model_general"]["rlnNormCorrectionAverage"]) == pytest.approx(norm.mean(), rel=1e-4)
    assert model["model_groups"]["rlnGroupScaleCorrection"].to_numpy() == pytest.approx([1.0])


@pytest.mark.relion
def test_class2d_continues_a_relion_run(tmp_path, relion, monkeypatch):
    """``--continue`` reads RELION 3.1's Class2D files (offsets in Å in _sampling.star, σ² per group) and carries
    on where RELION stopped: the particles keep their classes as in RELION's own iterations and the posteriors
    stay as sharp."""
    from cryodask.em.class2d import class2d
    from cryodask.io.star import read_particles, read_star

    _simulate(tmp_path, n=100, seed=2)
    monkeypatch.chdir(tmp_path)
    (tmp_path / "R").mkdir()
    r = subprocess.run([f"{relion}/relion_refine", "--i", "p.star", "--o", "R/run", "--K", "3", "--iter", "3",
                        "--ctf", "--tau2_fudge", "2", "--particle_diameter", "110", "--zero_mask", "--oversampling",
                        "1", "--psi_step", "20", "--offset_range", "2", "--offset_step", "1", "--random_seed", "1",
                        "--j", "2"], capture_output=True, text=True, timeout=300)
    assert r.returncode == 0, r.stdout[-2000:] + r.stderr[-2000:]
    rel = read_particles("R/run_it003_data.star").particles
    rel_pmax = float(read_star("R/run_it003_model.star")["model_general"]["rlnAveragePmax"])
    res = class2d("p.star", "C/run", iter=4, continue_from="R/run_it003_optimiser.star", workers=1, log=None)
    same = np.mean(res.data["rlnClassNumber"].to_numpy() == rel["rlnClassNumber"].to_numpy())
    rel2 = read_particles("R/run_it002_data.star").particles
    rel_same = np.mean(rel2["rlnClassNumber"].to_numpy() == rel["rlnClassNumber"].to_numpy())
    # as many particles keep their class as in RELION's own last step (0.66 vs 0.67 measured; a broken
    # continuation, e.g. σ² read as 0, reshuffles them at chance, ~1/K, with Pmax ~0.001)
    assert same >= rel_same - 0.1, (same, rel_same)
    assert res.history[-1]["ave_pmax"] >= 0.5 * rel_pmax, (res.history[-1]["ave_pmax"], rel_pmax)
    assert float(read_star("C/run_it004_sampling.star")["sampling_general"]["rlnOffsetRange"]) == pytest.approx(8.0)


def _chunk_problem(tmp_path, *, n, snr, seed, n_refs, noise, origins=None, **setup):
    """(images, ChunkInput, Class2DSetup, true views) of one chunk scored directly, references the true views."""
    import cryodask.em.class2d as c2d
    from cryodask.io.mrc import write_stack
    from cryodask.io.star import read_particles
    from cryodask.ops.ctf import ctf_params

    view, truth, img = _simulate(tmp_path, n=n, snr=snr, seed=seed)
    write_stack(tmp_path / "refs.mrcs", truth[:n_refs], APIX)
    table = read_particles(tmp_path / "p.star")
    kw = dict(iteration=2, box=BOX, pixel_size=APIX, pad=2, n_classes=n_refs, current_size=24,
              references=str(tmp_path / "refs.mrcs"), sigma2_noise=np.full((1, BOX // 2 + 1), img.var() / noise / 2048),
              class_fractions=np.full(n_refs, 1.0 / n_refs), prior_offsets=np.zeros((n_refs, 2)), sigma_offset=6.0,
              psi_step=20, offset_range=2, offset_step=1, oversampling=1, coarse_size=16, particle_diameter=110,
              zero_mask=True, do_ctf=True)
    inp = c2d.ChunkInput(chunk=0, index=np.arange(n), origins_px=np.zeros((n, 2)) if origins is None else origins,
                         optics=np.zeros(n, np.int64), n_optics=1, ctf=ctf_params(table))
    return img, inp, c2d.Class2DSetup(**{**kw, **setup}), view


def _assert_same_sums(a, b, *, rtol=1e-4, atol=1e-6):
    """Two ChunkOutputs' M-step sums agree (``atol`` relative to each accumulator's largest value)."""
    for x, y in zip(a.sums.bp, b.sums.bp):
        assert np.allclose(x.data, y.data, rtol=rtol, atol=atol * np.abs(y.data).max())
        assert np.allclose(x.weight, y.weight, rtol=rtol, atol=atol * y.weight.max())
    assert np.allclose(a.sums.sigma2_sum, b.sums.sigma2_sum, rtol=1e-4)
    assert np.allclose(a.sums.class_weight, b.sums.class_weight, rtol=1e-5)
    assert np.allclose(a.sums.offset_sum, b.sums.offset_sum, rtol=1e-4, atol=1e-4)


def test_chunk_in_batches_equals_one_batch(tmp_path, monkeypatch):
    """A chunk scored a few particles at a time (the memory budget) sums to what one batch gives."""
    import cryodask.em.class2d as c2d

    img, inp, setup, _ = _chunk_problem(tmp_path, n=30, snr=0.3, seed=4, n_refs=3, noise=1.3,
                                        class_fractions=np.array([0.5, 0.3, 0.2]))
    one = c2d.expectation_chunk(img, inp, setup)
    monkeypatch.setattr(c2d, "BATCH_BYTES", 1)  # one particle per batch
    many = c2d.expectation_chunk(img, inp, setup)
    assert np.array_equal(one.class_number, many.class_number) and np.allclose(one.psi, many.psi)
    assert np.allclose(one.pmax, many.pmax, atol=1e-5)
    _assert_same_sums(one, many)
    assert one.sums.class_weight.sum() == pytest.approx(len(img), rel=1e-3)  # the significant samples hold ≥ 0.999


def test_mstep_of_all_classes_at_once_equals_class_by_class(tmp_path, monkeypatch):
    """The M-step sums of a chunk taken over all classes in one call (broad posteriors) equal those taken
    class by class (sharp posteriors), and the choice between them follows the classes' occupancy."""
    import cryodask.em.class2d as c2d

    assert c2d._stack_classes(np.ones((10, 4), bool), np.full(4, 36))  # every particle in every class
    assert not c2d._stack_classes(np.eye(4, dtype=bool)[np.arange(10) % 4], np.full(4, 36))  # one class each
    assert not c2d._stack_classes(np.ones((10, 1), bool), np.full(1, 36))
    img, inp, setup, _ = _chunk_problem(tmp_path, n=30, snr=0.05, seed=6, n_refs=3, noise=1.05,
                                        origins=np.random.default_rng(7).uniform(-1, 1, size=(30, 2)),
                                        class_fractions=np.array([0.5, 0.3, 0.2]), do_norm=True,
                                        prior_offsets=np.array([[0, 0], [1, 0], [0, -1]]))
    taken = []
    decide = c2d._stack_classes
    monkeypatch.setattr(c2d, "_stack_classes", lambda *a: taken.append(decide(*a)) or taken[-1])
    monkeypatch.setattr(c2d, "STACK_CLASSES_COST", np.inf)
    stacked = c2d.expectation_chunk(img, inp, setup)
    n_calls = len(taken)
    monkeypatch.setattr(c2d, "STACK_CLASSES_COST", 0.0)
    per_class = c2d.expectation_chunk(img, inp, setup)
    assert all(taken[:n_calls]) and not any(taken[n_calls:]) and len(taken) == 2 * n_calls
    _assert_same_sums(stacked, per_class)
    assert all(np.abs(y.weight).max() > 0 for y in per_class.sums.bp)
    assert (per_class.sums.class_weight > 0.5).all()
    assert stacked.sums.sigma2_offset == pytest.approx(per_class.sums.sigma2_offset, rel=1e-4)
    assert per_class.sums.sigma2_offset > 0
    assert np.allclose(stacked.norm, per_class.norm, rtol=1e-5)
    assert np.array_equal(stacked.class_number, per_class.class_number)


def test_fine_pass_in_groups_equals_one_group(tmp_path, monkeypatch):
    """Particles scored in groups of similar significant samples (each group's fine pass dense over its own
    union) get the posteriors and sums of one fine pass over the whole batch."""
    import cryodask.em.class2d as c2d
    from cryodask.em import estep

    img, inp, setup, view = _chunk_problem(tmp_path, n=40, snr=0.5, seed=8, n_refs=5, noise=1.5, iteration=3,
                                           current_size=32, psi_step=15)
    sizes = []
    real = estep.score_two_pass_grouped

    def spy(*a, **k):
        out = real(*a, **k)
        sizes.append(len(out))
        return out

    monkeypatch.setattr(estep, "score_two_pass_grouped", spy)
    monkeypatch.setattr(c2d, "GROUP_COST", 0.0)
    many = c2d.expectation_chunk(img, inp, setup)
    monkeypatch.setattr(c2d, "GROUP_COST", 1e12)
    one = c2d.expectation_chunk(img, inp, setup)
    assert sizes[0] >= 3 and sizes[1] == 1, sizes  # sharp posteriors: groups of particles with similar poses
    assert np.array_equal(one.class_number, many.class_number) and np.allclose(one.psi, many.psi)
    assert np.mean(one.class_number - 1 == view) >= 0.9
    assert np.allclose(one.pmax, many.pmax, atol=1e-3) and np.allclose(one.origins_px, many.origins_px)
    _assert_same_sums(one, many, rtol=1e-3, atol=1e-4)  # weights differ by float32 rounding of the scores (1e-4)


def test_class2d_refuses_chunks_that_do_not_fit_before_starting(tmp_path, monkeypatch):
    """A worker memory limit too small for the store's chunks: refused up front, naming the fix; nothing written."""
    from distributed import Client, LocalCluster

    from cryodask.em.class2d import class2d
    from cryodask.errors import UserError

    _simulate(tmp_path / "data")
    monkeypatch.chdir(tmp_path / "data")
    with LocalCluster(n_workers=1, threads_per_worker=1, processes=False, memory_limit="60MB",
                      dashboard_address=None) as cluster, Client(cluster) as client:
        with pytest.raises(UserError, match="E-step of class2d") as e:
            class2d("p.star", tmp_path / "out" / "run", K=50, iter=2, pool=300, client=client, log=None)
    assert "per worker" in str(e.value) and "--pad 1" in str(e.value) and "--K 25" in str(e.value)
    assert not list((tmp_path / "out").glob("run_it*"))


def test_initial_references_are_ctf_corrected_band_limited_subset_averages():
    """RELION 3's initial 2D references: each class averages its random subset at the random angles drawn for
    it, CTF-weighted (Σ CTF·X / Σ CTF², no prior), up to round(0.07·box) shells."""
    from cryodask.em.class2d import ChunkInput, initial_chunk, initial_r_max
    from cryodask.em.mstep import reconstruct
    from cryodask.ops.backproject import BackProjector
    from cryodask.ops.ctf import ctf_2d

    box, apix, n = 64, 3.0, 60
    rng = np.random.default_rng(2)
    r = np.hypot(*np.mgrid[-box // 2:box // 2, -box // 2:box // 2])
    # round (any in-plane angle fits it), with rings 6 px apart: power at ~11 shells that the band must cut
    truth = np.exp(-(r / 9.0) ** 2) - 0.5 * np.exp(-(r / 4.0) ** 2) + 0.3 * np.cos(2 * np.pi * r / 6) * (r < 20)
    defocus = rng.uniform(8000, 25000, n)
    params = dict(defocus_u=defocus, defocus_v=defocus, defocus_angle=np.zeros(n), voltage=np.full(n, 300.0),
                  cs=np.full(n, 2.7), amplitude_contrast=np.full(n, 0.1))
    ctf = np.asarray(ctf_2d(box, apix, **params), np.float64)
    ft = np.fft.rfft2(np.fft.ifftshift(truth))
    images = np.fft.fftshift(np.fft.irfft2(ft[None] * ctf, s=(box, box)), axes=(-2, -1)).astype(np.float32)
    cls = np.r_[np.zeros(n // 2, int), np.ones(n // 2, int)]
    inp = ChunkInput(chunk=0, index=np.arange(n), origins_px=np.zeros((n, 2)), optics=np.zeros(n, int), n_optics=1,
                     ctf=params, seed_class=cls, seed_psi=rng.uniform(0, 360, n))
    out = initial_chunk(images, inp, pixel_size=apix, particle_diameter=0.9 * box * apix, width_mask_edge=5,
                        zero_mask=False, random_seed=0, n_classes=3, pad=2, do_ctf=True)
    r0 = initial_r_max(box)
    assert r0 == 4
    refs = []
    for k in range(3):
        bp = BackProjector.zeros(box, pad=2, r_max=r0, ndim=2)
        bp.data[...], bp.weight[...] = out["ref_data"][k], out["ref_weight"][k]
        refs.append(np.asarray(reconstruct(bp.symmetrised())))
    kk = np.hypot(*np.meshgrid(np.fft.fftfreq(box) * box, np.fft.rfftfreq(box) * box, indexing="ij"))
    expected = np.fft.fftshift(np.fft.irfft2(ft * (kk <= r0), s=(box, box)))  # the truth's first r0 shells
    plain = images.mean(axis=0)  # what an average without the CTF weighting starts from
    for k in (0, 1):  # both recover the band-limited image at its own scale
        err = np.linalg.norm(refs[k] - expected) / np.linalg.norm(expected)
        assert err < 0.15, (k, err)
        assert np.linalg.norm(plain - expected) / np.linalg.norm(expected) > 0.5
        spec = np.abs(np.fft.rfft2(refs[k]))
        assert spec[kk > r0 + 1.5].max() < 5e-3 * spec.max()  # nothing beyond the band
    assert np.abs(refs[2]).max() == 0  # a class with no particles starts empty


def test_profile_option_writes_a_profile_per_chunk_task(tmp_path):
    """``--profile DIR``: every chunk task of the run writes its cProfile, which pstats reads, and
    cryodask.profiling.summary adds up."""
    from cryodask.profiling import summary

    _simulate(tmp_path, n=60, seed=9)
    r = subprocess.run([sys.executable, "-m", "cryodask", "class2d", "--i", "p.star", "--o", "run", "--K", "2",
                        "--iter", "2", "--psi_step", "30", "--offset_range", "2", "--offset_step", "1",
                        "--particle_diameter", "110", "--ctf", "--pool", "20", "--workers", "1",
                        "--profile", "prof"], capture_output=True, text=True, timeout=300, cwd=tmp_path)
    assert r.returncode == 0, r.stderr
    files = sorted((tmp_path / "prof").glob("*.prof"))
    assert len(files) == 2 * 3, [f.name for f in files]  # 2 iterations × 3 chunks of 20
    assert all(f.name.startswith("class2d-estep-") for f in files)
    text = summary(tmp_path / "prof", top=40, sort="cumulative")
    assert text.startswith("6 task profiles") and "expectation_chunk" in text and "mstep_sums" in text
    assert ".prof" not in text  # the functions, not a line per file
    assert (tmp_path / "run_it002_classes.mrcs").is_file()
    (tmp_path / "afile").write_text("")
    r = subprocess.run([sys.executable, "-m", "cryodask", "class2d", "--i", "p.star", "--o", "run2", "--K", "2",
                        "--profile", "afile/prof"], capture_output=True, text=True, timeout=120, cwd=tmp_path)
    assert r.returncode == 2 and r.stderr.strip().startswith("cryodask: error: --profile: cannot make the folder")
    assert len(r.stderr.strip().splitlines()) == 1 and not list(tmp_path.glob("run2*"))


def test_first_iteration_runs_at_relions_initial_image_size(tmp_path, monkeypatch):
    """Without --ref the references start band-limited to round(0.07·box) shells (RELION 3), so iteration 1
    runs at 2·(that + --incr_size): 24 px at box 32 (RELION on the 64-px benchmark data: 28, as ours)."""
    from cryodask.cluster.local import local_client
    from cryodask.em.class2d import class2d
    from cryodask.io.mrc import read_stack

    _simulate(tmp_path, n=80, seed=7)
    monkeypatch.chdir(tmp_path)
    with local_client(1) as client:
        res = class2d("p.star", tmp_path / "run", K=3, iter=1, psi_step=30, offset_range=2, offset_step=1,
                      particle_diameter=110, zero_mask=True, ctf=True, client=client, log=None)
    assert res.history[0]["current_size"] == 2 * (round(0.07 * BOX) + 10) == 24
    # _model.star holds the size each iteration ran at, as RELION's (it000: 0, none ran; it001: 24)
    from cryodask.io.star import read_star

    sizes = [int(read_star(tmp_path / f"run_it00{i}_model.star")["model_general"]["rlnCurrentImageSize"])
             for i in (0, 1)]
    assert sizes == [0, 24], sizes
    refs = np.array(read_stack(tmp_path / "run_it000_classes.mrcs", mmap=False), np.float64)
    assert np.abs(refs[0] - refs[1]).max() > 0.05 * np.abs(refs).max()  # different random subsets
    spec = np.abs(np.fft.rfft2(refs, axes=(-2, -1)))
    kk = np.hypot(*np.meshgrid(np.fft.fftfreq(BOX) * BOX, np.fft.rfftfreq(BOX) * BOX, indexing="ij"))
    assert spec[:, kk > 2.5].max() < 1e-6 * spec.max()
