import numpy as np

from cryodask.geometry.euler import angular_distance, euler_to_matrix, matrix_to_euler


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


def test_angular_distance_is_relions_mean_axis_angle_with_symmetry():
    rng = np.random.default_rng(5)
    a = euler_to_matrix(*rng.uniform(-180, 180, (3, 50)))
    theta = 4.0
    c, s = np.cos(np.deg2rad(theta)), np.sin(np.deg2rad(theta))
    about_x = np.array([[1, 0, 0], [0, c, -s], [0, s, c]])
    # b = a·Rx: row i of b is row i of a turned about the map's x axis; rows meet x at angles α_i,
    # so the mean row angle is θ·mean(sin α_i) to first order, not θ (the rotation angle)
    b = a @ about_x
    sin_alpha = np.sqrt(1.0 - a[:, :, 0] ** 2)
    assert np.allclose(angular_distance(a, b), theta * sin_alpha.mean(axis=1), atol=0.02)
    # a C4 copy is the same pose under C4 (distance 0) and 90° of in-plane-like change without symmetry
    quarter = np.array([[0.0, -1, 0], [1, 0, 0], [0, 0, 1]])
    assert np.allclose(angular_distance(a @ quarter, a, "C4"), 0.0, atol=1e-4)
    assert np.all(angular_distance(a @ quarter, a, "C1") > 20.0)
