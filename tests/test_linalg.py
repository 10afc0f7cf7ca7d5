"""Batched kernels against NumPy / SciPy in float64."""

from __future__ import annotations

import jax
import numpy as np
import pytest
import scipy.linalg

from lowrank_optax import linalg

RNG = np.random.default_rng(0)


@pytest.fixture(autouse=True)
def float64():
    with jax.enable_x64(True):
        yield


def _spd(r, batch=(), floor=0.1):
    x = RNG.normal(size=(*batch, r, r))
    return x @ np.swapaxes(x, -1, -2) + floor * np.eye(r)


def test_grams():
    a, b = RNG.normal(size=(3, 7, 2)), RNG.normal(size=(3, 2, 5))
    np.testing.assert_allclose(linalg.gram_a(a), np.swapaxes(a, -1, -2) @ a, rtol=1e-12)
    np.testing.assert_allclose(linalg.gram_b(b), b @ np.swapaxes(b, -1, -2), rtol=1e-12)


@pytest.mark.parametrize("delta", [0.0, 0.3])
def test_regularised_spd_solves(delta):
    s, rhs = _spd(4, (2,)), RNG.normal(size=(2, 4, 6))
    expected = np.stack([scipy.linalg.solve(s[i] + delta * np.eye(4), rhs[i]) for i in range(2)])
    np.testing.assert_allclose(linalg.solve_spd(s, rhs, delta), expected, rtol=1e-9)
    lhs = RNG.normal(size=(2, 6, 4))
    expected_right = np.stack(
        [lhs[i] @ np.linalg.inv(s[i] + delta * np.eye(4)) for i in range(2)])
    np.testing.assert_allclose(linalg.solve_spd_right(lhs, s, delta), expected_right, rtol=1e-9)


def test_sylvester_spd_matches_scipy():
    p, q, c = _spd(3, (2,)), _spd(5, (2,)), RNG.normal(size=(2, 3, 5))
    expected = np.stack([scipy.linalg.solve_sylvester(p[i], q[i], c[i]) for i in range(2)])
    np.testing.assert_allclose(linalg.solve_sylvester_spd(p, q, c), expected, rtol=1e-9)


def test_sylvester_with_singular_coefficients_is_finite_minimum_norm():
    p = np.diag([1.0, 0.0])
    q = np.diag([0.0, 2.0])
    c = np.array([[1.0, 2.0], [0.0, 4.0]])
    x = np.asarray(linalg.solve_sylvester_spd(p, q, c))
    np.testing.assert_allclose(x, [[1.0, 2.0 / 3.0], [0.0, 2.0]], rtol=1e-12)


def test_sylvester_gram_product_matches_scipy():
    ga, gb, c = _spd(4, (3,)), _spd(4, (3,)), RNG.normal(size=(3, 4, 4))
    s = ga @ gb
    expected = np.stack([scipy.linalg.solve_sylvester(s[i], s[i], c[i]) for i in range(3)])
    np.testing.assert_allclose(linalg.solve_sylvester_gram_product(ga, gb, c), expected,
                               rtol=1e-8, atol=1e-10)


def _projector(x):
    return x @ np.linalg.pinv(x)


def test_tangent_projection_and_its_recovery_from_factor_gradients():
    m, n, r, scale = 9, 7, 3, 2.5
    a, b = RNG.normal(size=(m, r)), RNG.normal(size=(r, n))
    g = RNG.normal(size=(m, n))
    pu, pv = _projector(a), _projector(b.T)
    expected = pu @ g + g @ pv - pu @ g @ pv
    np.testing.assert_allclose(linalg.project_tangent(a, b, g), expected, rtol=1e-9, atol=1e-12)
    grad_a, grad_b = scale * g @ b.T, scale * a.T @ g
    recovered = linalg.tangent_from_factor_grads(a, b, grad_a, grad_b, scale)
    np.testing.assert_allclose(recovered, expected, rtol=1e-9, atol=1e-12)
    # P_T is a projection: idempotent, and orthogonal to (I − P_u) X (I − P_v).
    np.testing.assert_allclose(linalg.project_tangent(a, b, expected), expected, atol=1e-10)
    normal = (np.eye(m) - pu) @ g @ (np.eye(n) - pv)
    np.testing.assert_allclose(np.sum(normal * expected), 0.0, atol=1e-10)


def test_tangent_recovery_with_zero_b_is_the_column_space_projection():
    a, g = RNG.normal(size=(6, 2)), RNG.normal(size=(6, 5))
    b = np.zeros((2, 5))
    recovered = linalg.tangent_from_factor_grads(a, b, g @ b.T, a.T @ g, 1.0, delta=1e-8)
    np.testing.assert_allclose(recovered, _projector(a) @ g, rtol=1e-6, atol=1e-9)
