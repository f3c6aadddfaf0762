import numpy as np
import pytest

from cryodask import backend


def test_fft_follows_relion_normalisation(rng):
    x = rng.standard_normal((3, 16, 16)).astype(np.float32)
    f = backend.rfftn(x, axes=(-2, -1))
    assert f.dtype == np.complex64
    # forward divides by the number of pixels: the DC term is the mean
    assert np.allclose(f[:, 0, 0].real, x.mean(axis=(1, 2)), atol=1e-6)
    assert np.allclose(backend.irfftn(f, (16, 16), axes=(-2, -1)), x, atol=1e-5)


@pytest.mark.parametrize("dtype", [np.float32, np.complex64])
def test_scatter_add_sums_repeats(rng, dtype):
    target = np.zeros(10, dtype=dtype)
    idx = np.array([1, 1, 3, 9, 1])
    vals = (np.arange(5) + (1j * np.arange(5) if dtype == np.complex64 else 0)).astype(dtype)
    backend.scatter_add(target, idx, vals)
    expect = np.zeros(10, dtype=dtype)
    np.add.at(expect, idx, vals)
    assert np.allclose(target, expect)


def test_array_module_is_numpy_on_cpu():
    assert backend.array_module(np.zeros(2)) is np
    assert not backend.is_gpu(np.zeros(2))
