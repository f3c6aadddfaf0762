import numpy as np

from cryodask.geometry.euler import euler_to_matrix, matrix_to_euler


def test_matrices_are_rotations(rng):
    rot, tilt, psi = rng.uniform(-180, 180, 500), rng.uniform(0, 180, 500), rng.uniform(-180, 180, 500)
    m = euler_to_matrix(rot, tilt, psi)
    assert np.allclose(m @ np.swapaxes(m, -1, -2), np.eye(3), atol=1e-12)
    assert np.allclose(np.linalg.det(m), 1.0)


def test_known_matrices():
    # rot about z by 90 deg: RELION's A maps map coordinates to image coordinates
    assert np.allclose(euler_to_matrix(90, 0, 0), [[0, 1, 0], [-1, 0, 0], [0, 0, 1]], atol=1e-12)
    # tilt 90 about y
    assert np.allclose(euler_to_matrix(0, 90, 0), [[0, 0, -1], [0, 1, 0], [1, 0, 0]], atol=1e-12)
    # composition: A = Rz(psi) Ry(tilt) Rz(rot)
    a = euler_to_matrix(30, 40, 50)
    assert np.allclose(a, euler_to_matrix(0, 0, 50) @ euler_to_matrix(0, 40, 0) @ euler_to_matrix(30, 0, 0))


def test_round_trip(rng):
    rot, tilt, psi = rng.uniform(-180, 180, 1000), rng.uniform(0.5, 179.5, 1000), rng.uniform(-180, 180, 1000)
    r2, t2, p2 = matrix_to_euler(euler_to_matrix(rot, tilt, psi))
    assert np.allclose(euler_to_matrix(r2, t2, p2), euler_to_matrix(rot, tilt, psi), atol=1e-9)
    assert np.allclose(t2, tilt, atol=1e-9)
    assert np.allclose(np.mod(r2 - rot + 180, 360) - 180, 0, atol=1e-9)


def test_degenerate_tilt():
    for tilt in (0.0, 180.0):
        m = euler_to_matrix(25.0, tilt, 40.0)
        r, t, p = matrix_to_euler(m)
        assert r == 0.0 and abs(t - tilt) < 1e-9
        assert np.allclose(euler_to_matrix(r, t, p), m, atol=1e-9)
