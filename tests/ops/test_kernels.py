"""The compiled gather/scatter kernels against the array expressions they replace on the CPU."""

from __future__ import annotations

import numpy as np
import pytest

from cryodask import backend
from cryodask.geometry.euler import euler_to_matrix
from cryodask.ops import kernels
from cryodask.ops.backproject import BackProjector
from cryodask.ops.project import Projector, slice_pixels, trilinear_corners


def _rotations(n, seed):
    rng = np.random.default_rng(seed)
    return np.stack([euler_to_matrix(*a) for a in rng.uniform([-180, 0, -180], [180, 180, 180], (n, 3))])


@pytest.mark.parametrize("double", [False, True])
@pytest.mark.parametrize("tile", [None, 7])  # 7: many tiles, the last one partial
def test_gather_equals_the_array_expression(double, tile, monkeypatch):
    if tile:
        monkeypatch.setattr(kernels, "GATHER_TILE", tile)
    rng = np.random.default_rng(0)
    box = 24
    proj = Projector.from_map(rng.normal(size=(box,) * 3), pad=2, double=double)
    rot = _rotations(30, 1)
    _, kx, ky = slice_pixels(box, box / 2)  # to the edge: the clipped corners are exercised
    kx = kx + rng.uniform(-0.5, 0.5, kx.shape)  # off-grid too, some with kx < 0 (Friedel mates)
    rdtype = np.float64 if double else np.float32
    a = rot.astype(rdtype)
    xi = proj.pad * (kx.astype(rdtype)[None, :, None] * a[:, None, 0, :]
                     + ky.astype(rdtype)[None, :, None] * a[:, None, 1, :])
    index, weight, negative = trilinear_corners(xi, proj.half_extent, proj.data.shape)
    want = (proj.data.reshape(-1)[index] * weight).sum(axis=-1)
    want = np.where(negative, np.conj(want), want)
    assert negative.any() and not negative.all()
    got = proj.sample(rot, kx, ky)
    assert got.dtype == proj.data.dtype
    tol = 1e-12 if double else 2e-6
    assert np.abs(got - want).max() <= tol * np.abs(want).max()


@pytest.mark.parametrize("tile", [None, 7])
def test_scatter_equals_the_array_expression(tile, monkeypatch):
    if tile:
        monkeypatch.setattr(kernels, "GATHER_TILE", tile)
    rng = np.random.default_rng(3)
    box = 20
    bp = BackProjector.zeros(box, pad=2)
    rot = _rotations(12, 4)
    flat, kx, ky = slice_pixels(box, box / 2, skip_redundant=True)
    vals = (rng.normal(size=(12, len(flat))) + 1j * rng.normal(size=(12, len(flat)))).astype(np.complex64)
    w = rng.uniform(-0.2, 1.0, size=(12, len(flat))).astype(np.float32)  # some <= 0: skipped
    slices = np.zeros((12, box * (box // 2 + 1)), np.complex64)
    weights = np.zeros((12, box * (box // 2 + 1)), np.float32)
    slices[:, flat], weights[:, flat] = vals, w
    bp.insert(slices.reshape(12, box, -1), rot, weights=weights.reshape(12, box, -1))
    # the same sums with corner arrays and bincount
    data = np.zeros_like(bp.data)
    weight = np.zeros_like(bp.weight)
    a = rot.astype(np.float32)
    xi = bp.pad * (kx.astype(np.float32)[None, :, None] * a[:, None, 0, :]
                   + ky.astype(np.float32)[None, :, None] * a[:, None, 1, :])
    index, tri, negative = trilinear_corners(xi, bp.half_extent, bp.data.shape)
    keep = w > 0
    v = np.where(negative, np.conj(vals), vals) * keep
    backend.scatter_add(data, index, v[..., None] * tri)
    backend.scatter_add(weight, index, (w * keep)[..., None] * tri)
    assert np.abs(bp.data - data).max() <= 1e-5 * np.abs(data).max()
    assert np.abs(bp.weight - weight).max() <= 1e-5 * weight.max()
    assert weight.max() > 0 and np.count_nonzero(bp.weight) == np.count_nonzero(weight)


def test_kernels_take_float64_rotations_and_no_weights():
    data = np.zeros((7, 7, 4), np.complex64)
    weight = np.zeros((7, 7, 4), np.float32)
    rot = np.eye(3)[None]
    kernels.scatter(data, weight, np.ones((1, 1), np.complex64), None, rot, np.array([0.5]), np.array([0.0]),
                    1.0, 3)
    # one pixel half-way between x = 0 and x = 1 at y = z = 0: two corners of 0.5 each
    assert weight[3, 3, 0] == pytest.approx(0.5) and weight[3, 3, 1] == pytest.approx(0.5)
    assert weight.sum() == pytest.approx(1.0) and data.sum() == pytest.approx(1.0)
    out = kernels.gather(data, rot, np.array([0.5]), np.array([0.0]), 1.0, 3)
    assert out[0, 0] == pytest.approx(0.5)


def test_2d_gather_and_scatter_equal_the_array_expressions():
    from cryodask.ops.project import Projector2D, bilinear_corners, in_plane_rotations

    rng = np.random.default_rng(7)
    box = 20
    proj = Projector2D.from_images(rng.normal(size=(3, box, box)), pad=2)
    psi = rng.uniform(-180, 180, 17)
    rot = in_plane_rotations(psi, np, np.float32)
    flat, kx, ky = slice_pixels(box, box / 2)
    xi = proj.pad * (kx.astype(np.float32)[None, :, None] * rot[:, None, 0, :]
                     + ky.astype(np.float32)[None, :, None] * rot[:, None, 1, :])
    index, weight, negative = bilinear_corners(xi, proj.half_extent, proj.data.shape[1:])
    want = (proj.data.reshape(3, -1)[:, index] * weight).sum(axis=-1)
    want = np.where(negative, np.conj(want), want)
    got = proj.sample(psi, kx, ky)
    assert got.shape == (3, 17, len(kx)) and negative.any()
    assert np.abs(got - want).max() <= 2e-6 * np.abs(want).max()
    # insertion into 2D accumulators
    bp = BackProjector.zeros(box, pad=2, ndim=2)
    flat, kx, ky = slice_pixels(box, box / 2, skip_redundant=True)
    vals = (rng.normal(size=(17, len(flat))) + 1j * rng.normal(size=(17, len(flat)))).astype(np.complex64)
    w = rng.uniform(-0.2, 1.0, size=(17, len(flat))).astype(np.float32)
    slices = np.zeros((17, box * (box // 2 + 1)), np.complex64)
    weights = np.zeros((17, box * (box // 2 + 1)), np.float32)
    slices[:, flat], weights[:, flat] = vals, w
    bp.insert(slices.reshape(17, box, -1), psi, weights=weights.reshape(17, box, -1))
    xi = bp.pad * (kx.astype(np.float32)[None, :, None] * rot[:, None, 0, :]
                   + ky.astype(np.float32)[None, :, None] * rot[:, None, 1, :])
    index, tri, negative = bilinear_corners(xi, bp.half_extent, bp.data.shape)
    keep = w > 0
    data = np.zeros_like(bp.data)
    wsum = np.zeros_like(bp.weight)
    backend.scatter_add(data, index, (np.where(negative, np.conj(vals), vals) * keep)[..., None] * tri)
    backend.scatter_add(wsum, index, (w * keep)[..., None] * tri)
    assert np.abs(bp.data - data).max() <= 1e-5 * np.abs(data).max()
    assert np.abs(bp.weight - wsum).max() <= 1e-5 * wsum.max()
