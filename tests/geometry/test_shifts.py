import warnings

import numpy as np
import pytest

from cryodask.errors import UserError
from cryodask.geometry.shifts import n_translations, oversample_translations, translation_grid


@pytest.mark.parametrize("offset_range,offset_step,count", [
    (6, 2, 29),   # RELION's CLI default; relion_refine logs NrTranslations= 29
    (4, 2, 13),   # relion_refine logs NrTranslations= 13
    (5, 2, 21),   # i^2 + j^2 <= 6.25
    (5, 1, 81),   # GUI default: lattice points in a radius-5 disc, circle included
    (0, 2, 1),
    (1.9, 2, 1),  # (+-2, 0) are outside
])
def test_counts(offset_range, offset_step, count):
    assert len(translation_grid(offset_range, offset_step)) == count
    assert n_translations(offset_range, offset_step, 1) == 4 * count


def test_layout_and_circle():
    t = translation_grid(6, 2)
    assert t.dtype == np.float64 and t.shape == (29, 2)
    # x outer, y inner (RELION's setTranslations loops)
    assert t[:6].tolist() == [[-6, 0], [-4, -4], [-4, -2], [-4, 0], [-4, 2], [-4, 4]]
    assert np.all(np.diff(t[:, 0]) >= 0)
    # points exactly on the circle are kept; nothing is outside it
    for p in ([6, 0], [0, -6], [-6, 0]):
        assert p in t.tolist()
    assert np.hypot(t[:, 0], t[:, 1]).max() == 6
    assert [4, 6] not in t.tolist()
    # symmetric under x -> -x, y -> -y and x <-> y
    key = set(map(tuple, t))
    assert key == set(map(tuple, t * [-1, 1])) == set(map(tuple, t * [1, -1])) == set(map(tuple, t[:, ::-1]))
    assert np.allclose(t.mean(axis=0), 0)


def test_perturbation_shifts_everything():
    t = translation_grid(6, 2)
    p = translation_grid(6, 2, random_perturbation=-0.3)
    assert np.allclose(p - t, -0.6)


def test_oversampling():
    t = translation_grid(6, 2)
    kids = oversample_translations(t, [0, 14], 1, 2)
    assert kids.shape == (8, 2)
    # x outer, y inner, centred on the parent with half the step
    assert kids[:4].tolist() == [[-6.5, -0.5], [-6.5, 0.5], [-5.5, -0.5], [-5.5, 0.5]]
    assert np.allclose(kids.reshape(2, 4, 2).mean(axis=1), t[[0, 14]])
    for os_ in (1, 2, 3):
        kids = oversample_translations(t, None, os_, 2).reshape(len(t), 4**os_, 2)
        assert np.allclose(kids.mean(axis=1), t)  # children average to their parent
        off = kids - t[:, None]
        assert np.abs(off).max() < 1.0  # inside the parent's cell
        steps = np.unique(np.round(np.diff(np.unique(off[0, :, 0])), 12))
        assert np.allclose(steps, 2 / 2**os_)
    # the children of all points tile the plane: no two coincide
    kids = oversample_translations(t, None, 2, 2)
    assert len(np.unique(np.round(kids, 9), axis=0)) == len(kids)
    # os = 0 gives the parents back
    assert np.array_equal(oversample_translations(t, [3, 1], 0, 2), t[[3, 1]])


def test_bad_options():
    with pytest.raises(UserError) as e:
        translation_grid(6, 0)
    assert e.value.where == "--offset_step"
    with pytest.raises(UserError) as e:
        translation_grid(-1, 2)
    assert e.value.where == "--offset_range"


@pytest.mark.relion
@pytest.mark.parametrize("oversampling", [0, 1])
def test_matches_relion(relion_sampling, oversampling):
    import starfile

    log, root = relion_sampling(f"trans{oversampling}", healpix_order=1, oversampling=oversampling,
                                offset_range=4, offset_step=2)
    assert f"NrTranslations= {13 * 4**oversampling}\n" in log
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        rp = float(starfile.read(f"{root}_it001_sampling.star")["sampling_general"]["rlnSamplingPerturbInstance"])
        data = starfile.read(f"{root}_it001_data.star")
    apix = float(data["optics"]["rlnImagePixelSize"][0])
    p = data["particles"]
    best = np.array([p["rlnOriginXAngst"][0], p["rlnOriginYAngst"][0]]) / apix  # started at (0, 0)
    grid = translation_grid(4, 2, random_perturbation=rp)
    if oversampling:
        grid = oversample_translations(grid, None, oversampling, 2)
    err = np.abs(grid - best).max(axis=1)
    assert err.min() < 1e-4 and np.partition(err, 1)[1] > 0.1
