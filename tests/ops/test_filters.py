"""Grid helpers: frequency indices, shells, masks, low-pass, Fourier resizing, phase shifts."""

from __future__ import annotations

import numpy as np
import pytest

from cryodask import backend
from cryodask.ops.filters import (fftw_frequencies, fourier_crop, fourier_pad, frequency_grid, frequency_radius2,
                                  low_pass_filter,
                                  phase_shift, radial_average, radial_shell_index, real_space_radius,
                                  soft_mask_outside_map, spherical_mask, window_fourier)


def test_frequencies_follow_relion():
    assert list(fftw_frequencies(8)) == [0, 1, 2, 3, 4, -3, -2, -1]  # Nyquist positive
    assert list(fftw_frequencies(7)) == [0, 1, 2, 3, -3, -2, -1]
    kz, ky, kx = frequency_grid(8, 3)
    assert kz.shape == (8, 1, 1) and ky.shape == (1, 8, 1) and kx.shape == (1, 1, 5)
    shell = radial_shell_index(8, 3)
    assert shell.shape == (8, 8, 5)
    assert shell[0, 0, 0] == 0 and shell[4, 0, 0] == 4 and shell[1, 1, 1] == 2 and shell[0, 1, 1] == 1
    assert shell[0, 4, 4] == 6  # round(sqrt(32)) = round(5.66)


def test_radial_average():
    shell = radial_shell_index(16, 2)
    r = np.sqrt(sum(k.astype(float) ** 2 for k in frequency_grid(16, 2)))
    avg = radial_average(r, shell, 9)
    assert np.allclose(avg, np.arange(9), atol=0.35)
    assert avg[0] == 0.0
    assert np.allclose(radial_average(np.ones((16, 9)), shell, 12)[:9], 1.0)
    assert radial_average(np.ones((16, 9)), shell, 14)[13] == 0.0  # empty shell (corners reach 11.3)


def test_spherical_mask_edges():
    m = spherical_mask(32, 8.0, width=4.0)
    r = real_space_radius(32, 3)
    assert m.dtype == np.float32 and m.shape == (32, 32, 32)
    assert np.all(m[r <= 8] == 1) and np.all(m[r >= 12] == 0)
    assert np.isclose(m[16, 16, 26], 0.5)  # r = 10: half way
    hard = spherical_mask(16, 5.0, width=0, ndim=2)
    assert hard[8, 13] == 1 and hard[8, 14] == 0


def test_soft_mask_outside_map_sets_background(rng):
    box = 32
    vol = rng.standard_normal((box,) * 3) + 5.0
    out = soft_mask_outside_map(vol, radius=10, cosine_width=3)
    r = real_space_radius(box, 3)
    assert np.array_equal(out[r < 10], vol[r < 10])
    far = out[r > 13]
    assert np.allclose(far, far[0])
    assert abs(far[0] - 5.0) < 0.05  # the (weighted) mean of the voxels outside
    # a constant map is left as it is; the default radius is half the box
    assert np.allclose(soft_mask_outside_map(np.full((16, 16, 16), 2.0)), 2.0)


def test_low_pass_filter_cuts_at_the_shell():
    box, apix = 64, 2.0
    y, x = np.mgrid[:box, :box]
    low = np.cos(2 * np.pi * 4 * x / box)     # shell 4: 32 Å
    high = np.cos(2 * np.pi * 20 * y / box)   # shell 20: 6.4 Å
    out = low_pass_filter(low + high, 16.0, apix)  # filter at shell 8, edge 7..9
    assert np.allclose(out, low, atol=1e-5)
    stack = np.stack([low + high, 2 * (low + high)])
    assert np.allclose(low_pass_filter(stack, 16.0, apix, ndim=2)[1], 2 * low, atol=1e-5)
    # inside the raised-cosine edge the amplitude is between 0 and 1
    mid = low_pass_filter(np.cos(2 * np.pi * 8 * x / box), 16.0, apix)
    assert 0.4 < np.abs(mid).max() < 0.6


def test_fourier_crop_and_pad(rng):
    box = 32
    x = np.arange(box)
    img = np.cos(2 * np.pi * 3 * x / box)[None, :] * np.ones((box, 1)) + 0.5
    small = fourier_crop(img, 16)
    xs = np.arange(16)
    assert np.allclose(small, np.cos(2 * np.pi * 3 * xs / 16)[None, :] + 0.5, atol=1e-6)
    # padding then cropping returns a map band-limited to the sphere inside Nyquist (RELION's
    # windowFourierTransform drops the corners when it grows a transform)
    vol = rng.standard_normal((box,) * 3)
    f = backend.rfftn(vol, axes=(0, 1, 2))
    f *= frequency_radius2(box, 3) < (box // 2) ** 2
    vol = backend.irfftn(f, (box,) * 3, axes=(0, 1, 2))
    big = fourier_pad(vol, 48)
    assert big.shape == (48,) * 3 and np.isclose(big.mean(), vol.mean())
    assert np.allclose(fourier_crop(big, box), vol, atol=1e-10)
    with pytest.raises(ValueError):
        fourier_crop(vol, 40)
    with pytest.raises(ValueError):
        fourier_pad(vol, 20)


def test_window_fourier_keeps_values(rng):
    f = rng.standard_normal((3, 16, 9)) + 1j * rng.standard_normal((3, 16, 9))
    w = window_fourier(f, 8, 2)
    assert w.shape == (3, 8, 5)
    assert w[1, 3, 2] == f[1, 3, 2] and w[1, 4, 2] == f[1, 4, 2] and w[1, 5, 2] == f[1, 13, 2]
    back = window_fourier(w, 16, 2)
    assert back.shape == (3, 16, 9) and back[1, 13, 2] == f[1, 13, 2] and back[1, 8, 0] == 0
    assert back[1, 4, 4] == 0 and back[1, 4, 0] == f[1, 4, 0]  # growing keeps |k| <= 4 only


def test_phase_shift_integer_is_roll(rng):
    img = rng.standard_normal((2, 24, 24))
    f = backend.rfftn(img, axes=(1, 2))
    moved = backend.irfftn(phase_shift(f, np.array([[3.0, -2.0], [0.0, 5.0]])), (24, 24), axes=(1, 2))
    assert np.allclose(moved[0], np.roll(img[0], (-2, 3), axis=(0, 1)))
    assert np.allclose(moved[1], np.roll(img[1], (5, 0), axis=(0, 1)))
    # shifts compose and undo
    there = phase_shift(f, np.array([1.3, 0.4]))
    assert np.allclose(phase_shift(there, np.array([-1.3, -0.4])), f)
