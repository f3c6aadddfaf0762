"""class3d --skip_align: classification at fixed poses, focused by a mask with signal subtraction on the fly."""

from __future__ import annotations

import numpy as np
import pytest

from cryodask.em.skip_align import SkipAlignSetup, class_posteriors, skip_align_chunk
from cryodask.io.mrc import write_map
from cryodask.io.star import ParticleTable, read_particles, read_star, write_particles
from cryodask.simulate import phantom, phantom_variant, simulate_particles, write_simulation

BOX, APIX = 32, 5.0


def focus_mask(a: np.ndarray, b: np.ndarray) -> np.ndarray:
    """A soft mask around where two maps differ (what a user draws around a flexible region)."""
    from scipy import ndimage

    d = np.abs(a - b)
    core = ndimage.binary_dilation(d > 0.1 * d.max(), iterations=2)
    soft = ndimage.gaussian_filter(core.astype(np.float32), 1.5)
    return np.clip(np.maximum(2 * soft, core), 0, 1).astype(np.float32)


def _consensus_dataset(folder, n, seed=2):
    """A 50/50 mixture whose true poses stand for a consensus refinement (its _data.star without classes)."""
    a = phantom(BOX, seed=0)
    b = phantom_variant(a, fraction=0.1, seed=1)
    sim = simulate_particles([a, b], APIX, n=n, snr=0.3, seed=seed, n_optics_groups=2)
    paths = write_simulation(folder, sim)
    t = read_particles(paths["truth"])
    write_particles(folder / "consensus.star",
                    ParticleTable(optics=t.optics, particles=t.particles.drop(columns=["rlnClassNumber"])))
    write_map(folder / "consensus.mrc", 0.5 * (a + b), APIX)
    write_map(folder / "mask.mrc", focus_mask(a, b), APIX)
    return a, b, sim


def _accuracy(truth, got):
    return max(np.mean(truth == got), np.mean(truth != got))  # labels may be swapped


def test_class_posteriors():
    d2 = np.array([[0.0, 2.0], [5.0, 5.0], [1000.0, 0.0]])
    w, ev = class_posteriors(d2, np.array([0.5, 0.5]))
    np.testing.assert_allclose(w[0], [1 / (1 + np.exp(-2)), np.exp(-2) / (1 + np.exp(-2))])
    np.testing.assert_allclose(w[1], [0.5, 0.5])
    np.testing.assert_allclose(w[2], [0.0, 1.0], atol=1e-12)
    np.testing.assert_allclose(ev[1], np.log(0.5 * np.exp(-5) * 2))
    w, _ = class_posteriors(np.array([[1.0, 1.0]]), np.array([0.25, 0.75]))
    np.testing.assert_allclose(w[0], [0.25, 0.75])
    w, _ = class_posteriors(np.array([[0.0, 9.0]]), np.array([0.0, 1.0]))  # an empty class gets nothing
    np.testing.assert_allclose(w[0], [0.0, 1.0])


def _chunk(folder, sim, n):
    from cryodask.em.iteration import ChunkMeta
    from cryodask.ops.ctf import ctf_params

    t = sim.truth.iloc[:n]
    table = ParticleTable(optics=sim.optics, particles=sim.particles.iloc[:n])
    meta = ChunkMeta(index=np.arange(n), rot=t.rlnAngleRot.to_numpy(), tilt=t.rlnAngleTilt.to_numpy(),
                     psi=t.rlnAnglePsi.to_numpy(),
                     origins_px=np.stack([t.rlnOriginXAngst, t.rlnOriginYAngst], 1) / APIX,
                     half=np.ones(n, np.int64), optics=sim.particles.rlnOpticsGroup.to_numpy()[:n] - 1,
                     ctf=ctf_params(table, source="sim"), premultiplied=None, n_optics=2)
    return sim.images[:n], meta


def test_chunk_scores_the_true_class_at_the_true_pose(tmp_path):
    """One chunk, true maps as classes: the posterior picks each particle's class, with or without subtraction;
    with subtraction of everything outside the mask, only the masked region is left to score."""
    from cryodask.em.iteration import initial_noise_chunk, initial_sigma2

    a, b, sim = _consensus_dataset(tmp_path, 60)
    mask = focus_mask(a, b)
    write_map(tmp_path / "a.mrc", a, APIX)
    write_map(tmp_path / "b.mrc", b, APIX)
    write_map(tmp_path / "am.mrc", a * mask, APIX)
    write_map(tmp_path / "bm.mrc", b * mask, APIX)
    write_map(tmp_path / "outside.mrc", 0.5 * (a + b) * (1 - mask), APIX)
    images, meta = _chunk(tmp_path, sim, 60)
    p, t, c = initial_noise_chunk(images, meta, pixel_size=APIX, particle_diameter=0.8 * BOX * APIX,
                                  width_mask_edge=5, zero_mask=True)
    sigma2 = initial_sigma2(p, t, c, BOX)
    truth = sim.truth.rlnClassNumber.to_numpy()[:60]
    common = dict(iteration=2, box=BOX, pixel_size=APIX, pad=2, current_size=BOX, sigma2_noise=sigma2,
                  class_fractions=[0.5, 0.5], particle_diameter=0.8 * BOX * APIX, zero_mask=True)
    full = skip_align_chunk(images, meta, SkipAlignSetup(reference_paths=[str(tmp_path / "a.mrc"),
                                                                          str(tmp_path / "b.mrc")], **common))
    focused = skip_align_chunk(images, meta, SkipAlignSetup(
        reference_paths=[str(tmp_path / "am.mrc"), str(tmp_path / "bm.mrc")],
        subtract_path=str(tmp_path / "outside.mrc"), **common))
    for r in (full, focused):
        assert np.mean(r.class_number == truth) >= 0.95
        assert r.acc.class_weight.sum() == pytest.approx(60)
        np.testing.assert_array_equal(r.rot, meta.rot)  # poses are kept
        assert np.all(r.acc.bp[0].weight.sum() > 0) and np.all(r.acc.bp[1].weight.sum() > 0)
    # without subtraction the masked classes explain the images far worse than with it
    unsub = skip_align_chunk(images, meta, SkipAlignSetup(
        reference_paths=[str(tmp_path / "am.mrc"), str(tmp_path / "bm.mrc")], **common))
    assert focused.log_likelihood.mean() > unsub.log_likelihood.mean() + 10
    # σ² sums: the residual of the focused fit is close to the noise of the full fit
    ratio = focused.acc.sigma2_sum[0, :, 2:12].sum() / full.acc.sigma2_sum[0, :, 2:12].sum()
    assert 0.9 < ratio < 1.1, ratio


def test_chunk_norm_and_scale_without_alignment(tmp_path):
    """--norm and --scale with --skip_align: a particle twice as bright gets twice the rlnNormCorrection, and the
    scale sums of an optics group whose images are at 0.6 of the references' level measure 0.6."""
    from cryodask.em.iteration import initial_noise_chunk, initial_sigma2

    a, b, sim = _consensus_dataset(tmp_path, 80)
    write_map(tmp_path / "a.mrc", a, APIX)
    write_map(tmp_path / "b.mrc", b, APIX)
    images, meta = _chunk(tmp_path, sim, 80)
    level = np.where(np.arange(80) % 2 == 0, 2.0, 1.0)
    p, t, c = initial_noise_chunk(images, meta, pixel_size=APIX, particle_diameter=0.8 * BOX * APIX,
                                  width_mask_edge=5, zero_mask=True)
    common = dict(iteration=2, box=BOX, pixel_size=APIX, pad=2, current_size=BOX,
                  sigma2_noise=initial_sigma2(p, t, c, BOX), class_fractions=[0.5, 0.5],
                  reference_paths=[str(tmp_path / "a.mrc"), str(tmp_path / "b.mrc")],
                  particle_diameter=0.8 * BOX * APIX, zero_mask=True)
    r = skip_align_chunk(images * level[:, None, None], meta, SkipAlignSetup(do_norm=True, **common))
    ratio = np.median(r.norm[level == 2]) / np.median(r.norm[level == 1])
    assert 1.8 <= ratio <= 2.2, ratio
    g1 = meta.optics == 1
    dim = np.where(g1, 0.6, 1.0)
    r = skip_align_chunk(images * dim[:, None, None], meta, SkipAlignSetup(scale=np.ones(2), **common))
    xa, aa = r.acc.signal_product[0][:, 1:8].sum(axis=1), r.acc.reference_power[0][:, 1:8].sum(axis=1)
    assert xa[0] / aa[0] == pytest.approx(1.0, abs=0.1) and xa[1] / aa[1] == pytest.approx(0.6, abs=0.1)
    np.testing.assert_array_equal(r.norm, np.ones(80))  # without --norm the values stay as read


@pytest.fixture(scope="module")
def focused(tmp_path_factory):
    """K=2, --skip_align at the consensus poses with a mask around the difference (6 iterations, --norm and
    --scale on); and the same run stopped after iteration 2 and continued."""
    from cryodask.cluster.local import local_client
    from cryodask.em.class3d import class3d

    folder = tmp_path_factory.mktemp("focused")
    a, b, sim = _consensus_dataset(folder, 300)
    kw = dict(K=2, ini_high=30.0, particle_diameter=0.8 * BOX * APIX, ctf=True, zero_mask=True, skip_align=True,
              solvent_mask=folder / "mask.mrc", random_seed=3, pool=100, norm=True, scale=True, log=None)
    with local_client(2) as client:
        res = class3d(folder / "consensus.star", folder / "run", folder / "consensus.mrc", iter=6, client=client,
                      **kw)
        class3d(folder / "consensus.star", folder / "b" / "run", folder / "consensus.mrc", iter=2, client=client,
                **kw)
        cont = class3d(folder / "consensus.star", folder / "b" / "run", iter=6, client=client, log=None,
                       continue_from=folder / "b" / "run_it002_optimiser.star")
    return folder, a, b, sim, res, cont


@pytest.mark.slow
def test_focused_classification_separates_the_mixture(focused):
    """>= 90% of the particles in the right class (issue 4); poses untouched; masked classes that differ where
    the true maps differ."""
    folder, a, b, sim, res, _ = focused
    truth = sim.truth["rlnClassNumber"].to_numpy()
    acc = _accuracy(truth, res.data["rlnClassNumber"].to_numpy())
    assert acc >= 0.90, acc
    assert np.all(res.class_fractions > 0.3)
    # poses and origins are the consensus's, untouched
    np.testing.assert_allclose(res.data["rlnAngleRot"], sim.truth["rlnAngleRot"], atol=1e-3)
    np.testing.assert_allclose(res.data["rlnOriginXAngst"], sim.truth["rlnOriginXAngst"], atol=1e-3)
    # the classes are masked, and differ where the true maps differ
    mask = focus_mask(a, b)
    assert np.all(np.abs(res.maps[0][mask == 0]) < 1e-6)
    corr = np.corrcoef((a - b)[mask > 0.5], (res.maps[0] - res.maps[1])[mask > 0.5])[0, 1]
    assert abs(corr) > 0.5, corr
    opt = read_star(folder / "run_it006_optimiser.star")["optimiser_general"]
    assert int(opt["rlnDoSkipAlign"]) == 1 and str(opt["rlnSolventMaskName"]).endswith("mask.mrc")


@pytest.mark.slow
def test_focused_continue_gives_the_same_maps(focused):
    _, _, _, _, res, cont = focused
    assert cont.iterations == 6
    for m_full, m_cont in zip(res.maps, cont.maps, strict=True):
        assert np.abs(m_full - m_cont).max() <= 1e-5 * np.abs(m_full).max()
    assert np.array_equal(cont.data["rlnClassNumber"].to_numpy(), res.data["rlnClassNumber"].to_numpy())
    # --norm and --scale without alignment: updated, and carried through --continue
    np.testing.assert_allclose(cont.data["rlnNormCorrection"], res.data["rlnNormCorrection"], rtol=1e-6)
    assert res.data["rlnNormCorrection"].std() > 0.01


@pytest.mark.slow
@pytest.mark.relion
def test_relion_reconstruct_reads_our_classes(focused, relion, tmp_path, monkeypatch):
    """relion_reconstruct --class k on our _data.star: inside the mask its two maps differ as ours do."""
    import subprocess

    import mrcfile

    folder, a, b, _, res, _ = focused
    monkeypatch.chdir(folder)  # image names are relative to the simulation folder
    rel = []
    for k in (1, 2):
        subprocess.run([str(relion / "relion_reconstruct"), "--i", str(folder / "run_it006_data.star"), "--o",
                        str(tmp_path / f"c{k}.mrc"), "--ctf", "--class", str(k)], check=True, capture_output=True)
        rel.append(mrcfile.read(tmp_path / f"c{k}.mrc"))
    inside = focus_mask(a, b) > 0.5
    corr = np.corrcoef((rel[0] - rel[1])[inside], (res.maps[0] - res.maps[1])[inside])[0, 1]
    assert corr > 0.5, corr


def test_skip_align_needs_poses_and_a_sane_mask(tmp_path, capsys):
    from cryodask.cli import main
    from cryodask.em.class3d import class3d
    from cryodask.errors import UserError

    a, b, sim = _consensus_dataset(tmp_path, 20)
    paths = {"particles": tmp_path / "particles.star"}  # no poses in the simulation's own table
    with pytest.raises(UserError, match="rlnAngleRot"):
        class3d(paths["particles"], tmp_path / "r", tmp_path / "consensus.mrc", skip_align=True, log=None)
    write_map(tmp_path / "big.mrc", np.full((BOX,) * 3, 2.0, np.float32), APIX)
    with pytest.raises(UserError, match="between 0 and 1"):
        class3d(tmp_path / "consensus.star", tmp_path / "r", tmp_path / "consensus.mrc", skip_align=True,
                solvent_mask=tmp_path / "big.mrc", log=None)
    write_map(tmp_path / "small.mrc", np.ones((16,) * 3, np.float32), APIX)
    code = main(["class3d", "--i", str(tmp_path / "consensus.star"), "--o", str(tmp_path / "r"), "--ref",
                 str(tmp_path / "consensus.mrc"), "--skip_align", "--solvent_mask", str(tmp_path / "small.mrc")])
    assert code == 2
    assert "32" in capsys.readouterr().err
