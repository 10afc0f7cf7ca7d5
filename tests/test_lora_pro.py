"""LoRA-Pro against a float64 transcription of its eq. (3) with X from SciPy's Sylvester solver,
the optimality of X, the first-order tangent projection, first-order / orthogonal invariance,
the m×n state of the published AdamW variant and zero-initialised starts."""

from __future__ import annotations

import chex
import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest
import scipy.linalg
from hypothesis import given, settings
from hypothesis import strategies as st
from invariance import invariance_residual, random_gl
from problems import factorization_loss, factorization_target, lora_params, train

from lowrank_optax.lora_pro import (
    equivalent_factor_grads,
    lora_pro_adamw,
    lora_pro_sgd,
    scale_by_lora_pro,
)

M, N, R = 8, 6, 3


@pytest.fixture(autouse=True)
def float64():
    with jax.enable_x64(True):
        yield


def _problem(seed=0):
    """Paper orientation W = s·B A (B: out×r, A: r×in); loss ½‖C⊙(W − Y)‖²."""
    rng = np.random.default_rng(seed)
    big_a = rng.normal(size=(R, M))
    big_b = rng.normal(size=(N, R)) * 0.3
    y, c = rng.normal(size=(N, M)), rng.uniform(0.5, 2.0, size=(N, M))

    def full_grad(w):
        return c**2 * (w - y)

    def library_loss(params, s):
        w = s * (params["s"]["lora_a"] @ params["s"]["lora_b"]).T
        return 0.5 * jnp.sum((c * (w - y)) ** 2)

    return big_a, big_b, full_grad, library_loss


def _floored(gram, floor):
    """``gram`` with its eigenvalues raised to at least ``floor`` times their mean."""
    w, e = np.linalg.eigh(gram)
    return (e * np.maximum(w, floor * w.mean())) @ e.T


def _paper_equivalent_grads(big_a, big_b, grad_a, grad_b, s, floor=0.0):
    """eq. (3) with LoRA-Pro's Sylvester equation BᵀB X + X AAᵀ = −(1/s²)(BᵀB)⁻¹ ∇A Aᵀ; with
    ``floor``, every Gram floored (:func:`_floored`)."""
    btb, aat = _floored(big_b.T @ big_b, floor), _floored(big_a @ big_a.T, floor)
    btb_inv, aat_inv = np.linalg.inv(btb), np.linalg.inv(aat)
    x = scipy.linalg.solve_sylvester(btb, aat, -btb_inv @ grad_a @ big_a.T / s**2)
    p_b = big_b @ btb_inv @ big_b.T
    g_a = btb_inv @ grad_a / s**2 + x @ big_a
    g_b = (np.eye(N) - p_b) @ grad_b @ aat_inv / s**2 - big_b @ x
    return g_a, g_b, x


def _run_library(tx, big_a, big_b, loss, steps):
    params = {"s": {"lora_a": jnp.asarray(big_a.T), "lora_b": jnp.asarray(big_b.T)}}
    state = tx.init(params)
    for _ in range(steps):
        updates, state = tx.update(jax.grad(loss)(params), state, params)
        params = optax.apply_updates(params, updates)
    return np.asarray(params["s"]["lora_a"]).T, np.asarray(params["s"]["lora_b"]).T


@pytest.mark.parametrize("s", [1.0, 2.0])
def test_sgd_matches_eq_3_transcription(s):
    lr, steps = 0.05, 6
    big_a, big_b, full_grad, loss = _problem()
    got = _run_library(lora_pro_sgd(lr, scale=s, delta=0.0), big_a, big_b,
                       lambda p: loss(p, s), steps)
    a, b = big_a, big_b
    for _ in range(steps):
        g = full_grad(s * b @ a)
        g_a, g_b, x = _paper_equivalent_grads(a, b, s * b.T @ g, s * g @ a.T, s)
        assert np.linalg.norm(x) > 1e-3  # X from the Sylvester equation, not X = 0
        a, b = a - lr * g_a, b - lr * g_b
    np.testing.assert_allclose(got[0], a, rtol=1e-9, atol=1e-11)
    np.testing.assert_allclose(got[1], b, rtol=1e-9, atol=1e-11)


@pytest.mark.parametrize("s", [1.0, 2.0])
def test_full_state_adamw_matches_official_rule(s):
    """Adam on Ĝ = P_B G + (I − P_B) G P_A (m×n), then eq. (3) applied to the Adam output."""
    lr, steps, b1, b2, eps = 0.01, 5, 0.9, 0.999, 1e-8
    big_a, big_b, full_grad, loss = _problem(1)
    got = _run_library(lora_pro_adamw(lr, scale=s, delta=0.0, eigenvalue_floor=0.0), big_a,
                       big_b, lambda p: loss(p, s), steps)
    a, b = big_a, big_b
    m = v = np.zeros((N, M))
    for k in range(1, steps + 1):
        g = full_grad(s * b @ a)
        p_b = b @ np.linalg.solve(b.T @ b, b.T)
        p_a = a.T @ np.linalg.solve(a @ a.T, a)
        g_hat = p_b @ g + (np.eye(N) - p_b) @ g @ p_a
        m, v = b1 * m + (1 - b1) * g_hat, b2 * v + (1 - b2) * g_hat**2
        adam = (m / (1 - b1**k)) / (np.sqrt(v / (1 - b2**k)) + eps)
        g_a, g_b, _ = _paper_equivalent_grads(a, b, s * b.T @ adam, s * adam @ a.T, s)
        a, b = a - lr * g_a, b - lr * g_b
    np.testing.assert_allclose(got[0], a, rtol=1e-8, atol=1e-10)
    np.testing.assert_allclose(got[1], b, rtol=1e-8, atol=1e-10)


def test_eigenvalue_floor_bounds_the_map_along_near_null_directions_only():
    """The map of a unit-scale m×n ``g`` (Adam's output) back to factors, with Grams floored at
    1e-2 of their mean, against the transcription with floored Grams."""
    rng = np.random.default_rng(4)
    big_a, big_b = rng.normal(size=(R, M)), rng.normal(size=(N, R)) * 0.3
    g, s = rng.normal(size=(N, M)), 2.0
    near_null = big_b * np.array([1.0, 1.0, 1e-5])  # BᵀB: one eigenvalue ~1e-10 of the mean

    def library(big_b, floor):
        u = equivalent_factor_grads(jnp.asarray(big_a.T), jnp.asarray(big_b.T),
                                    jnp.asarray(s * g.T @ big_b), jnp.asarray(s * big_a @ g.T),
                                    s, 0.0, floor)
        return np.asarray(u.a).T, np.asarray(u.b).T

    expected = _paper_equivalent_grads(big_a, near_null, s * near_null.T @ g,
                                       s * g @ big_a.T, s, floor=1e-2)[:2]
    for got, want in zip(library(near_null, 1e-2), expected):
        np.testing.assert_allclose(got, want, rtol=1e-9, atol=1e-9 * np.abs(want).max())
    # Without the floor gᴬ along the near-null direction is ~1/σ = 1e5 times larger.
    assert np.abs(library(near_null, 0.0)[0]).max() > 1e3 * np.abs(expected[0]).max()
    # A well-conditioned pair's Grams are above the floor: the paper's map.
    assert min(np.linalg.eigvalsh(gram).min() / np.trace(gram) * R
               for gram in (big_a @ big_a.T, big_b.T @ big_b)) > 1e-2
    for got, want in zip(library(big_b, 1e-2), library(big_b, 0.0)):
        np.testing.assert_allclose(got, want, rtol=1e-10, atol=1e-12)


@pytest.mark.parametrize("normalize_grams", [False, True], ids=["peta", "normalized"])
def test_factor_space_adamw_is_adam_on_equivalent_grads(normalize_grams):
    # LoRAProAdamW (normalize_grams=False): Adam on eq. (3)'s (gᴬ, gᴮ). The default multiplies
    # gᴬ by tr(BᵀB)/r and gᴮ by tr(AAᵀ)/r (the mean eigenvalues of the Grams they invert).
    lr, steps, b1, b2, eps = 0.01, 4, 0.9, 0.999, 1e-8
    big_a, big_b, full_grad, loss = _problem(2)
    got = _run_library(lora_pro_adamw(lr, delta=0.0, full_state=False,
                                      normalize_grams=normalize_grams),
                       big_a, big_b, lambda p: loss(p, 1.0), steps)
    a, b = big_a, big_b
    m_a = v_a = np.zeros_like(a)
    m_b = v_b = np.zeros_like(b)
    for k in range(1, steps + 1):
        g = full_grad(b @ a)
        g_a, g_b, _ = _paper_equivalent_grads(a, b, b.T @ g, g @ a.T, 1.0)
        if normalize_grams:
            g_a, g_b = g_a * np.trace(b.T @ b) / R, g_b * np.trace(a @ a.T) / R
        m_a, v_a = b1 * m_a + (1 - b1) * g_a, b2 * v_a + (1 - b2) * g_a**2
        m_b, v_b = b1 * m_b + (1 - b1) * g_b, b2 * v_b + (1 - b2) * g_b**2
        a = a - lr * (m_a / (1 - b1**k)) / (np.sqrt(v_a / (1 - b2**k)) + eps)
        b = b - lr * (m_b / (1 - b1**k)) / (np.sqrt(v_b / (1 - b2**k)) + eps)
    np.testing.assert_allclose(got[0], a, rtol=1e-9, atol=1e-11)
    np.testing.assert_allclose(got[1], b, rtol=1e-9, atol=1e-11)


def test_x_minimises_the_distance_to_the_lora_gradients():
    """LoRA-Pro's X: argmin_X ‖gᴬ(X) − ∇A‖² + ‖gᴮ(X) − ∇B‖² (a quadratic in X)."""
    big_a, big_b, full_grad, _ = _problem(3)
    s = 1.5
    g = full_grad(s * big_b @ big_a)
    grad_a, grad_b = s * big_b.T @ g, s * g @ big_a.T
    u = equivalent_factor_grads(jnp.asarray(big_a.T), jnp.asarray(big_b.T),
                                jnp.asarray(grad_a.T), jnp.asarray(grad_b.T), s, 0.0)
    g_a, g_b = np.asarray(u.a).T, np.asarray(u.b).T

    def distance(dx):
        return (np.sum((g_a + dx @ big_a - grad_a) ** 2)
                + np.sum((g_b - big_b @ dx - grad_b) ** 2))

    rng = np.random.default_rng(0)
    best = distance(np.zeros((R, R)))
    for _ in range(20):
        assert distance(1e-3 * rng.normal(size=(R, R))) > best
    x_star = (g_a - np.linalg.solve(big_b.T @ big_b, grad_a) / s**2) @ np.linalg.pinv(big_a)
    assert distance(-x_star) > best + 1e-6  # X = 0 is worse


@pytest.mark.parametrize("s", [1.0, 3.0])
def test_first_order_change_is_minus_lr_tangent_projection(s):
    big_a, big_b, full_grad, loss = _problem(4)
    a, b = big_a.T, big_b.T
    params = {"s": {"lora_a": jnp.asarray(a), "lora_b": jnp.asarray(b)}}
    grads = jax.grad(lambda p: loss(p, s))(params)
    u, _ = scale_by_lora_pro(s, 0.0).update(grads, optax.EmptyState(), params)
    u_a, u_b = np.asarray(u["s"]["lora_a"]), np.asarray(u["s"]["lora_b"])
    g = full_grad(s * big_b @ big_a).T  # library orientation m×n
    p_col = a @ np.linalg.solve(a.T @ a, a.T)
    p_row = b.T @ np.linalg.solve(b @ b.T, b)
    tangent = p_col @ g + g @ p_row - p_col @ g @ p_row
    np.testing.assert_allclose(s * (u_a @ b + a @ u_b), tangent, rtol=1e-10, atol=1e-12)
    errors = []
    for lr in (1e-4, 1e-5):
        new_w = s * (a - lr * u_a) @ (b - lr * u_b)
        errors.append(np.linalg.norm((new_w - s * a @ b) / lr + tangent))
    np.testing.assert_allclose(errors[0] / errors[1], 10.0, rtol=1e-3)  # error is O(lr)


@settings(max_examples=6, deadline=None)
@given(st.integers(0, 2**31 - 1))
def test_exactly_invariant_for_orthogonal_r(seed):
    q = random_gl(seed, 3, 1.0)
    np.testing.assert_allclose(q @ q.T, np.eye(3), atol=1e-12)
    for make in (lambda: lora_pro_sgd(0.05, delta=0.0), lambda: lora_pro_adamw(0.02, delta=0.0)):
        assert invariance_residual(make, q, steps=4) < 1e-11


# The paper's map: aR of cond(R) = 10 has a Gram eigenvalue below the default eigenvalue floor
# (1e-2 of the mean), which would move the step by O(1e-2), not O(lr²).
PAPER_MAP = {
    "lora_pro_sgd": lambda lr: lora_pro_sgd(lr, delta=0.0),
    "lora_pro_adamw": lambda lr: lora_pro_adamw(lr, delta=0.0, eigenvalue_floor=0.0),
}


@pytest.mark.parametrize("name", list(PAPER_MAP))
def test_invariant_only_to_first_order_for_general_r(name):
    """X does not transform consistently under a non-orthogonal R: the product differs by
    O(lr²) per step, i.e. the residual relative to the step is ∝ lr."""
    r_matrix = random_gl(5, 3, 10.0)
    residuals = [invariance_residual(lambda lr=lr: PAPER_MAP[name](lr), r_matrix, steps=3)
                 for lr in (4e-3, 1e-3)]
    assert residuals[1] > 1e-12  # not exact
    assert residuals[0] / residuals[1] > 10.0  # shrinks like lr², faster than the step (∝ lr)
    assert residuals[0] < 1e-2


@pytest.mark.parametrize(
    "make", [lambda: lora_pro_sgd(0.1), lambda: lora_pro_adamw(0.03),
             lambda: lora_pro_adamw(0.03, full_state=False), lambda: lora_pro_sgd(0.1, scale=2.0)],
    ids=["sgd", "adamw", "adamw_factor", "sgd_scale2"])
def test_zero_init_200_steps_finite_and_descending(make):
    with jax.enable_x64(False):
        loss = factorization_loss(factorization_target())
        params, history = jax.jit(lambda p: train(make(), p, loss, 200))(lora_params(zero_b=True))
        assert np.all(np.isfinite(history))
        chex.assert_tree_all_finite(params)
        assert history[-1] < 0.1 * history[0]


def test_zero_b_first_step_moves_only_b_and_is_finite():
    with jax.enable_x64(False):
        params = lora_params(zero_b=True)
        loss = factorization_loss(factorization_target())
        u, _ = scale_by_lora_pro().update(jax.grad(loss)(params), optax.EmptyState(), params)
        chex.assert_tree_all_finite(u)
        assert np.all(np.asarray(u["layer"]["lora_a"]) == 0)
        assert np.linalg.norm(np.asarray(u["layer"]["lora_b"])) > 0


def test_published_adamw_keeps_m_by_n_moments():
    params = lora_params()
    state = lora_pro_adamw(0.01).init(params)
    shapes = {leaf.shape for leaf in jax.tree.leaves(state[0]) if leaf.ndim == 2}
    assert shapes == {(16, 12)}
    small = lora_pro_adamw(0.01, full_state=False).init(params)
    assert {leaf.shape for leaf in jax.tree.leaves(small) if leaf.ndim == 2} == {(16, 4), (4, 12)}
