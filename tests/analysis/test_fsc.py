"""FSC: identical maps, independent noise, masks, shell bookkeeping, resolution rule."""

from __future__ import annotations

import numpy as np
import pytest

from cryodask.analysis.fsc import (fsc, fsc_from_transforms, resolution_at, shell_counts, shell_frequencies,
                                   shell_resolutions)


def test_identical_maps_give_one(rng):
    vol = rng.standard_normal((32, 32, 32)).astype(np.float32)
    curve = fsc(vol, vol)
    assert curve.shape == (17,)
    assert np.allclose(curve, 1.0)
    # scaling one map does not change the FSC; negating it gives -1
    assert np.allclose(fsc(vol, 3.0 * vol), 1.0)
    assert np.allclose(fsc(vol, -vol), -1.0)


def test_independent_noise_is_near_zero(rng):
    a = rng.standard_normal((48, 48, 48))
    b = rng.standard_normal((48, 48, 48))
    curve = fsc(a, b)
    n = shell_counts(48)
    # each shell is a correlation of n complex values: spread about 1/sqrt(2n)
    assert np.all(np.abs(curve[3:]) < 5 / np.sqrt(n[3:]))
    assert abs(curve[3:].mean()) < 0.02


def test_signal_plus_noise_matches_snr(rng):
    """Half-maps = signal + independent noise of equal power: FSC = SNR/(1+SNR) = 0.5."""
    s = rng.standard_normal((48, 48, 48))
    curve = fsc(s + rng.standard_normal(s.shape), s + rng.standard_normal(s.shape))
    assert abs(curve[4:].mean() - 0.5) < 0.03


def test_mask_and_2d(rng):
    img = rng.standard_normal((32, 32))
    assert np.allclose(fsc(img, img), 1.0)
    mask = np.zeros((32, 32))
    mask[8:24, 8:24] = 1
    other = img.copy()
    other[mask == 0] = rng.standard_normal(int((mask == 0).sum()))  # differ only outside the mask
    assert np.allclose(fsc(img, other, mask=mask), 1.0)
    assert fsc(img, other)[5:].mean() < 0.9
    with pytest.raises(ValueError):
        fsc(img, img[:, :30])


def test_shell_bookkeeping():
    counts = shell_counts(16, 3)
    assert counts.sum() == np.count_nonzero(np.round(np.sqrt(
        np.fft.fftfreq(16, 1 / 16)[:, None, None] ** 2 + np.fft.fftfreq(16, 1 / 16)[None, :, None] ** 2
        + np.arange(9)[None, None, :] ** 2)) <= 8)
    # shell 1 holds |k|² = 1 (5 in the half grid: x=1; y=±1; z=±1) and |k|² = 2 (8): round(√2) = 1
    assert counts[0] == 1 and counts[1] == 13
    assert np.allclose(shell_frequencies(64, 2.0)[[0, 1, 32]], [0, 1 / 128, 0.25])
    assert np.isinf(shell_resolutions(64, 2.0)[0]) and np.isclose(shell_resolutions(64, 2.0)[32], 4.0)


def test_resolution_rule():
    curve = np.array([1.0, 0.99, 0.95, 0.8, 0.6, 0.4, 0.2, 0.1, 0.05])  # box 16
    # first drop below 0.5 at shell 5, so the last shell above is 4: 16·1.5/4 = 6 Å
    assert resolution_at(curve, 0.5, 1.5) == pytest.approx(6.0)
    assert resolution_at(curve, 0.143, 1.5, 16) == pytest.approx(16 * 1.5 / 6)
    # interpolated crossing at 4.5: 16·1.5/4.5
    assert resolution_at(curve, 0.5, 1.5, interpolate=True) == pytest.approx(24 / 4.5)
    assert resolution_at(np.ones(9), 0.143, 1.5) == pytest.approx(3.0)  # Nyquist
    assert np.isinf(resolution_at(np.array([1.0, 0.1, 0.0]), 0.5, 1.0))


def test_fsc_from_transforms_checks_shapes():
    with pytest.raises(ValueError):
        fsc_from_transforms(np.zeros((8, 8, 5), complex), np.zeros((8, 8, 4), complex))
