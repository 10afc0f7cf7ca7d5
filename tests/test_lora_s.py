"""LoRA-S family: AdamS, LRACS, the Sylvester lift of any optax transformation, Quotient GD.

The reference implementations below are written from the paper's pseudo-code in its own
notation (``X = M Nᵀ``, ``M = a``, ``N = bᵀ``), in float64 NumPy: eq. (12) by QR and
pseudo-inverses, eq. (9) by ``scipy.linalg.solve_sylvester`` (Bartels–Stewart), eq. (14) with
explicit diagonal matrices. They share no code with the library.
"""

from __future__ import annotations

import chex
import hypothesis.strategies as st
import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest
import scipy.linalg
from hypothesis import given, settings
from invariance import gl_matrices, invariance_residual
from problems import factorization_loss, factorization_target, lora_params, train

from lowrank_optax import LoRAPair
from lowrank_optax.lora_s import (
    adams,
    horizontal_lift,
    lracs,
    quotient_metric,
    racs_scales,
    scale_by_adams,
    scale_by_lracs,
    sylvester_lift,
)
from lowrank_optax.quotient import quotient_sgd, scale_by_quotient

M_DIM, N_DIM, RANK = 9, 7, 3


# ----------------------------------------------------------------------------- paper transcription


def _problem(seed: int = 0):
    rng = np.random.default_rng(seed)
    a = rng.normal(size=(M_DIM, RANK)) / np.sqrt(M_DIM)
    b = rng.normal(size=(RANK, N_DIM))
    y = rng.normal(size=(M_DIM, N_DIM))
    c = rng.uniform(0.5, 2.0, size=(M_DIM, N_DIM))
    return a, b, y, c


def _np_full_grad(w, y, c):
    """``∂/∂W ½‖C ⊙ (W − Y)‖²``."""
    return c**2 * (w - y)


def _canonical_qr(f):
    q, r = np.linalg.qr(f)
    signs = np.where(np.diag(r) < 0, -1.0, 1.0)
    return q * signs, r * signs[:, None]


def _paper_descent_vector(m, n, grad_m, grad_n):
    """Eq. (12): ``U (R_M†)ᵀ ∇Nᵀ + ∇M R_N† Vᵀ − U (R_M†)ᵀ ∇Nᵀ V Vᵀ``."""
    u, r_m = _canonical_qr(m)
    v, r_n = _canonical_qr(n)
    left = u @ np.linalg.pinv(r_m).T @ grad_n.T
    return left + grad_m @ np.linalg.pinv(r_n) @ v.T - left @ v @ v.T


def _paper_lift(m, n, x, k_shift=0.0):
    """Algorithm 1 lines 3–5 (``K ← K + k_shift·I`` is App. A.11's regularisation)."""
    mtm, ntn = m.T @ m, n.T @ n
    s = mtm @ ntn
    k = scipy.linalg.solve_sylvester(s, s, m.T @ x @ n) + k_shift * np.eye(m.shape[1])
    lift_m = (x @ n - m @ ntn @ k) @ np.linalg.inv(ntn)
    lift_n = (x.T @ m - n @ mtm @ k.T) @ np.linalg.inv(mtm)
    return lift_m, lift_n


def _paper_g_norm(m, n, lift_m, lift_n):
    """``√ḡ(lift, lift)`` with metric (7)."""
    value = np.trace(np.linalg.inv(m.T @ m) @ lift_m.T @ lift_m)
    value += np.trace(np.linalg.inv(n.T @ n) @ lift_n.T @ lift_n)
    return np.sqrt(value)


def _paper_adams(a, b, y, c, lr, steps, b1=0.9, b2=0.999, eps=1e-8, low_memory=False,
                 riemannian=False, k_decay=0.0, transported=False):
    """Algorithms 2 and 4, with optax.adam's bias correction and eps (DESIGN §3);
    ``transported``: the library's default low-memory moment, ``m ← P_T(b1 m + (1 − b1) X)``
    with ``P_T`` the orthogonal projection onto the tangent space at ``(M, N)``."""
    m, n = a.copy(), b.T.copy()
    mom = np.zeros((M_DIM, N_DIM))
    mom_s, mom_mp, mom_np = np.zeros((RANK, RANK)), np.zeros((M_DIM, RANK)), np.zeros((RANK, N_DIM))
    vel = np.zeros((M_DIM, N_DIM))
    for t in range(1, steps + 1):
        g = _np_full_grad(m @ n.T, y, c)
        grad_m, grad_n = g @ n, g.T @ m
        x = _paper_descent_vector(m, n, grad_m, grad_n)
        if low_memory:  # eqs. (23)–(25)
            u, r_m = _canonical_qr(m)
            v, r_n = _canonical_qr(n)
            m_p = grad_m @ np.linalg.pinv(r_n) - u @ u.T @ grad_m @ np.linalg.pinv(r_n)
            n_pt = np.linalg.pinv(r_m).T @ grad_n.T - np.linalg.pinv(r_m).T @ grad_n.T @ v @ v.T
            core = u.T @ x @ v
            mom_mp = b1 * mom_mp + (1 - b1) * m_p
            mom_np = b1 * mom_np + (1 - b1) * n_pt
            mom_s = b1 * mom_s + (1 - b1) * core
            mom = u @ mom_s @ v.T + mom_mp @ v.T + u @ mom_np
        elif transported:
            p_col, p_row = m @ np.linalg.pinv(m), n @ np.linalg.pinv(n)
            z = b1 * mom + (1 - b1) * x
            mom = p_col @ z + z @ p_row - p_col @ z @ p_row
        else:
            mom = b1 * mom + (1 - b1) * x
        sq = x**2
        if riemannian:
            sq = _paper_g_norm(m, n, *_paper_lift(m, n, x)) / np.linalg.norm(x) * sq
        vel = b2 * vel + (1 - b2) * sq
        x_tilde = (mom / (1 - b1**t)) / (np.sqrt(vel / (1 - b2**t)) + eps)
        # Line 10 adds the lift; the descent vector lifted is −λ·X̃ (λ: learning rate), and
        # App. A.11 regularises its Sylvester matrix by K ← K + λ·k_decay·I.
        lift_m, lift_n = _paper_lift(m, n, -lr * x_tilde, lr * k_decay)
        m, n = m + lift_m, n + lift_n
    return m, n.T


def _paper_racs_scales(g, iterations=5):
    """Eq. (14) by power iteration from ``q = 1``, with explicit diagonal ``S``, ``Q``."""
    q = np.ones(g.shape[0])
    for _ in range(iterations):
        big_q = np.diag(q)
        s = np.diag(g.T @ big_q @ g) / np.linalg.norm(big_q) ** 2
        big_s = np.diag(s)
        q = np.diag(g @ big_s @ g.T) / np.linalg.norm(big_s) ** 2
    return s, q


def _paper_lracs(a, b, y, c, lr, steps, b1=0.9, gamma=1.01):
    """Algorithm 3; returns the factors and the limiter values ``η_t``."""
    m, n = a.copy(), b.T.copy()
    m_s, m_q, phi, etas = np.zeros(N_DIM), np.zeros(M_DIM), 0.0, []
    for t in range(1, steps + 1):
        g_full = _np_full_grad(m @ n.T, y, c)
        g = _paper_descent_vector(m, n, g_full @ n, g_full.T @ m)
        s, q = _paper_racs_scales(g)
        m_s, m_q = b1 * m_s + (1 - b1) * s, b1 * m_q + (1 - b1) * q
        x_tilde = np.diag(m_q ** -0.5) @ g @ np.diag(m_s ** -0.5)
        lift_m, lift_n = _paper_lift(m, n, x_tilde)
        norm = _paper_g_norm(m, n, lift_m, lift_n)
        eta = gamma / max(norm / phi, gamma) if t > 1 else 1.0
        phi = eta * norm
        etas.append(eta)
        m, n = m - lr * eta * lift_m, n - lr * eta * lift_n
    return m, n.T, etas


def _run_library(tx, a, b, y, c, steps):
    params = {"lora_a": jnp.asarray(a), "lora_b": jnp.asarray(b)}

    def loss(p):
        return 0.5 * jnp.sum((c * (p["lora_a"] @ p["lora_b"] - y)) ** 2)

    @jax.jit
    def step(params, state):
        updates, state = tx.update(jax.grad(loss)(params), state, params)
        return optax.apply_updates(params, updates), state

    state = tx.init(params)
    for _ in range(steps):
        params, state = step(params, state)
    return np.asarray(params["lora_a"]), np.asarray(params["lora_b"])


@pytest.fixture
def x64():
    with jax.enable_x64(True):
        yield


STEPS = 6
# The methods' exact rule: no Gram regulariser and no eigenvalue floor (both default on).
EXACT = {"delta": 0.0, "eigenvalue_floor": 0.0}


@pytest.mark.parametrize(
    ("options", "paper_options"),
    [
        ({}, {}),
        ({"low_memory": True, "transport_moment": False}, {"low_memory": True}),
        ({"low_memory": True}, {"transported": True}),
        ({"riemannian_second_moment": True}, {"riemannian": True}),
        ({"weight_decay": 0.3}, {"k_decay": 0.3}),
    ],
    ids=["alg2", "alg4_low_memory", "alg4_transported", "riemannian_second_moment", "k_decay"],
)
def test_adams_matches_paper_transcription(x64, options, paper_options):
    a, b, y, c = _problem()
    lr = 0.02
    expected = _paper_adams(a, b, y, c, lr, STEPS, **paper_options)
    got = _run_library(adams(lr, **EXACT, **options), a, b, y, c, STEPS)
    for e, g in zip(expected, got):
        np.testing.assert_allclose(g, e, rtol=1e-9, atol=1e-11)
    assert np.linalg.norm(got[1] - b) > 1e-2  # the run moved


def test_low_memory_differs_from_full_moment_after_basis_moves(x64):
    a, b, y, c = _problem()
    full = _run_library(adams(0.05, **EXACT), a, b, y, c, STEPS)
    low = _run_library(adams(0.05, **EXACT, low_memory=True), a, b, y, c, STEPS)
    assert np.linalg.norm(full[0] @ full[1] - low[0] @ low[1]) > 1e-6


@pytest.mark.parametrize("b1", [0.9, 0.0], ids=["paper_b1", "limiter_active"])
def test_lracs_matches_paper_transcription(x64, b1):
    a, b, y, c = _problem(1)
    lr, gamma = 0.02, 1.001
    m, n, etas = _paper_lracs(a, b, y, c, lr, STEPS, b1=b1, gamma=gamma)
    if b1 == 0.0:
        assert min(etas) < 0.9  # the norm-growth limiter acted
    # The paper's step: the default cross-term clip scales this run's first step by 0.915.
    paper = lracs(lr, b1, gamma, eps=0.0, bias_correction=False, cross_term_ratio=None, **EXACT)
    got = _run_library(paper, a, b, y, c, STEPS)
    np.testing.assert_allclose(got[0], m, rtol=1e-9, atol=1e-11)
    np.testing.assert_allclose(got[1], n, rtol=1e-9, atol=1e-11)


def test_scale_by_adams_equals_lifted_optax_adam():
    params = lora_params(zero_b=False)
    loss = factorization_loss(factorization_target())
    ours, lifted = scale_by_adams(), sylvester_lift(optax.scale_by_adam())
    s1, s2 = ours.init(params), lifted.init(params)
    update1, update2 = jax.jit(ours.update), jax.jit(lifted.update)
    for _ in range(3):
        grads = jax.grad(loss)(params)
        u1, s1 = update1(grads, s1, params)
        u2, s2 = update2(grads, s2, params)
        chex.assert_trees_all_close(u1, u2, rtol=1e-4, atol=1e-5)
        params = optax.apply_updates(params, jax.tree.map(lambda u: -0.01 * u, u1))


def test_learning_rate_inside_or_after_the_lift_is_the_same():
    params = lora_params(zero_b=False)
    grads = jax.grad(factorization_loss(factorization_target()))(params)
    inside = sylvester_lift(optax.adam(0.01))
    after = optax.chain(sylvester_lift(optax.scale_by_adam()), optax.scale_by_learning_rate(0.01))
    u1, _ = inside.update(grads, inside.init(params), params)
    u2, _ = after.update(grads, after.init(params), params)
    chex.assert_trees_all_close(u1, u2, rtol=1e-5, atol=1e-7)


def test_inner_state_lives_in_product_space():
    params = lora_params(zero_b=False)
    state = sylvester_lift(optax.scale_by_adam()).init(params)
    mu = state.inner_state.mu
    assert mu["layer"].shape == (16, 12) and mu["pair"].shape == (16, 12)


def test_sylvester_lift_handles_stacked_pairs_like_single_pairs():
    key_a, key_b, key_g = jax.random.split(jax.random.key(0), 3)
    a = jax.random.normal(key_a, (3, 8, 2))
    b = jax.random.normal(key_b, (3, 2, 6))
    ga, gb = jax.random.normal(key_g, (2, 3, 8, 2))[0], jax.random.normal(key_g, (3, 2, 6))
    tx = sylvester_lift(optax.scale_by_adam())
    update = jax.jit(tx.update)
    stacked = {"lora_a": a, "lora_b": b}
    updates, _ = update({"lora_a": ga, "lora_b": gb}, tx.init(stacked), stacked)
    for i in range(3):
        single = {"lora_a": a[i], "lora_b": b[i]}
        expected, _ = update({"lora_a": ga[i], "lora_b": gb[i]}, tx.init(single), single)
        chex.assert_trees_all_close(jax.tree.map(lambda u, i=i: u[i], updates), expected,
                                    rtol=1e-4, atol=1e-5)


# ----------------------------------------------------------------------------- lift geometry


def _tangent_projector_np(a, b, x):
    u = np.linalg.svd(a, full_matrices=False)[0]
    v = np.linalg.svd(b.T, full_matrices=False)[0]
    return u @ u.T @ x + x @ v @ v.T - u @ u.T @ x @ v @ v.T


def _floored_np(gram, floor):
    w, e = np.linalg.eigh(gram)
    return (e * np.maximum(w, floor * w.mean())) @ e.T


def _lift_np(a, b, x, ga, gb):
    """Algorithm 1 with the Grams given: ``S K + K S = aᵀ x bᵀ`` (``S = ga gb``), then
    ``u_a = (x bᵀ − a gb K) gb⁻¹`` and ``u_b = ga⁻¹ (aᵀ x − K ga b)``."""
    s = ga @ gb
    k = scipy.linalg.solve_sylvester(s, s, a.T @ x @ b.T)
    return (x @ b.T - a @ gb @ k) @ np.linalg.inv(gb), np.linalg.solve(ga, a.T @ x - k @ ga @ b)


def test_eigenvalue_floor_bounds_the_lift_along_near_null_directions_only(x64):
    rng = np.random.default_rng(5)
    a, x = rng.normal(size=(M_DIM, RANK)), rng.normal(size=(M_DIM, N_DIM))
    b = rng.normal(size=(RANK, N_DIM))
    near_null = b * np.array([[1.0], [1.0], [1e-5]])  # b bᵀ: one eigenvalue ~1e-10 of the mean

    def lift(b, floor):
        got = horizontal_lift(jnp.asarray(x), LoRAPair(jnp.asarray(a), jnp.asarray(b)), 0.0, floor)
        return np.asarray(got.a), np.asarray(got.b)

    expected = _lift_np(a, near_null, x, _floored_np(a.T @ a, 1e-2),
                        _floored_np(near_null @ near_null.T, 1e-2))
    for got, want in zip(lift(near_null, 1e-2), expected):
        np.testing.assert_allclose(got, want, rtol=1e-9, atol=1e-9 * np.abs(want).max())
    # Without the floor u_a along the near-null direction is ~1/σ = 1e5 times larger.
    assert np.abs(lift(near_null, 0.0)[0]).max() > 1e3 * np.abs(expected[0]).max()
    # Every eigenvalue of a well-conditioned pair's Grams is above the floor: the exact lift.
    assert min(np.linalg.eigvalsh(g).min() / np.trace(g) * RANK
               for g in (a.T @ a, b @ b.T)) > 1e-2
    for got, want in zip(lift(b, 1e-2), lift(b, 0.0)):
        np.testing.assert_allclose(got, want, rtol=1e-10, atol=1e-12)


@given(st.integers(0, 2**31 - 1))
@settings(max_examples=10, deadline=None)
def test_lift_is_exact_on_tangent_space_and_horizontal(seed):
    rng = np.random.default_rng(seed)
    with jax.enable_x64(True):
        a = rng.normal(size=(M_DIM, RANK))
        b = rng.normal(size=(RANK, N_DIM))
        x = rng.normal(size=(M_DIM, N_DIM))
        pair = LoRAPair(jnp.asarray(a), jnp.asarray(b))
        lift = horizontal_lift(jnp.asarray(x), pair, 0.0)
        u_a, u_b = np.asarray(lift.a), np.asarray(lift.b)
        np.testing.assert_allclose(u_a @ b + a @ u_b, _tangent_projector_np(a, b, x),
                                   rtol=1e-8, atol=1e-9)
        # Horizontal under metric (7): orthogonal to every vertical (M Ω, −N Ωᵀ) = (a Ω, −Ω b).
        m, n, lift_n = a, b.T, u_b.T
        for i in range(RANK):
            for j in range(RANK):
                omega = np.zeros((RANK, RANK))
                omega[i, j] = 1.0
                inner = np.trace(np.linalg.inv(m.T @ m) @ u_a.T @ (m @ omega))
                inner += np.trace(np.linalg.inv(n.T @ n) @ lift_n.T @ (-n @ omega.T))
                assert abs(inner) < 1e-9 * (1 + np.abs(x).max())
                vertical = LoRAPair(jnp.asarray(a @ omega), jnp.asarray(-omega @ b))
                assert abs(float(quotient_metric(pair, lift, vertical))) < 1e-9


def test_adams_first_step_moves_product_by_projected_sign_of_gradient(x64):
    a, b, y, c = _problem(2)
    g = _np_full_grad(a @ b, y, c)
    x = _tangent_projector_np(a, b, g)
    x_tilde = x / (np.abs(x) + 1e-8)  # Adam's first step: m̂ = X, v̂ = X²
    params = {"lora_a": jnp.asarray(a), "lora_b": jnp.asarray(b)}
    grads = {"lora_a": jnp.asarray(g @ b.T), "lora_b": jnp.asarray(a.T @ g)}
    tx = scale_by_adams(**EXACT)
    direction, _ = tx.update(grads, tx.init(params), params)
    u_a, u_b = np.asarray(direction["lora_a"]), np.asarray(direction["lora_b"])
    np.testing.assert_allclose(u_a @ b + a @ u_b, _tangent_projector_np(a, b, x_tilde),
                               rtol=1e-8, atol=1e-10)
    # First order in lr: the product moves by −lr·P_T(X̃) + O(lr²).
    for lr in (1e-3, 1e-4):
        step = (a - lr * u_a) @ (b - lr * u_b) - a @ b
        residual = np.linalg.norm(step + lr * _tangent_projector_np(a, b, x_tilde))
        assert residual <= 2.0 * lr**2 * np.linalg.norm(u_a) * np.linalg.norm(u_b)


# ----------------------------------------------------------------------------- invariance


def _adamw():
    return optax.adamw(0.02, weight_decay=0.0)


INVARIANT = {
    "adams": lambda: adams(0.02, **EXACT),
    "adams_riemannian": lambda: adams(0.02, **EXACT, riemannian_second_moment=True),
    "lracs": lambda: lracs(0.01, **EXACT),
    "lift_sgd": lambda: sylvester_lift(optax.sgd(0.01), **EXACT),
    "lift_adam": lambda: sylvester_lift(optax.adam(0.02), **EXACT),
    "lift_lion": lambda: optax.chain(sylvester_lift(optax.scale_by_lion(), **EXACT),
                                     optax.scale_by_learning_rate(0.01)),
    "quotient_sgd": lambda: quotient_sgd(0.01),
}


@pytest.mark.parametrize("name", list(INVARIANT))
@given(r_matrix=gl_matrices(3, max_cond=10.0))
@settings(max_examples=2, deadline=None)
def test_gl_invariance(name, r_matrix):
    cond = np.linalg.cond(r_matrix)
    assert invariance_residual(INVARIANT[name], r_matrix, steps=3) < 1e-9 * cond**2


def test_adamw_is_not_invariant():
    from invariance import random_gl

    assert invariance_residual(_adamw, random_gl(0, 3, 5.0), steps=4) > 1e-3


def test_low_memory_paper_rule_is_invariant_under_positive_diagonal_rescaling_only():
    from invariance import random_gl

    make = lambda: adams(0.02, **EXACT, low_memory=True, transport_moment=False)  # noqa: E731
    assert invariance_residual(make, np.diag([3.0, 0.5, 1.7]), steps=4) < 1e-9
    assert invariance_residual(make, random_gl(1, 3, 5.0), steps=4) > 1e-7


def test_low_memory_transported_moment_is_gl_invariant():
    # The transported moment is a projection of m×n matrices, whichever bases hold it.
    from invariance import random_gl

    make = lambda: adams(0.02, **EXACT, low_memory=True)  # noqa: E731
    assert invariance_residual(make, random_gl(1, 3, 5.0), steps=4) < 1e-9


# ----------------------------------------------------------------------------- zero init


TARGET = factorization_target()
LOSS = factorization_loss(TARGET)

ZERO_INIT = {
    "adams": adams(0.03),
    "adams_low_memory": adams(0.03, low_memory=True),
    "adams_riemannian": adams(0.03, riemannian_second_moment=True),
    "adams_robust": adams(0.03, robust_steps=20),
    "lracs": lracs(0.03),
    "lift_sgd": sylvester_lift(optax.sgd(0.3)),
    "lift_lion": optax.chain(sylvester_lift(optax.scale_by_lion()),
                             optax.scale_by_learning_rate(0.01)),
    "quotient_sgd_robust": quotient_sgd(0.1, robust_steps=10),
}


@pytest.mark.parametrize("name", list(ZERO_INIT))
def test_zero_init_200_steps_finite_and_decreasing(name):
    params, history = jax.jit(lambda p: train(ZERO_INIT[name], p, LOSS, 200))(lora_params())
    assert np.all(np.isfinite(history))
    chex.assert_tree_all_finite(params)
    assert float(LOSS(params)) < 0.1 * float(history[0])


def test_first_step_from_zero_b_moves_b_by_least_squares_preimage():
    params = lora_params()
    grads = jax.grad(LOSS)(params)
    tx = sylvester_lift(optax.identity(), delta=1e-6)
    direction, _ = tx.update(grads, tx.init(params), params)
    a = np.asarray(params["layer"]["lora_a"], np.float64)
    g = np.asarray(jax.grad(lambda w: 0.5 * jnp.sum((w - TARGET) ** 2))(jnp.zeros((16, 12))))
    x = a @ np.linalg.solve(a.T @ a, a.T @ g)  # P_T(G) at b = 0: the column-space part
    np.testing.assert_array_equal(np.asarray(direction["layer"]["lora_a"]), 0.0)
    np.testing.assert_allclose(np.asarray(direction["layer"]["lora_b"]),
                               np.linalg.solve(a.T @ a, a.T @ x), rtol=1e-3, atol=1e-5)


def test_plain_quotient_gd_never_leaves_zero_init_and_remedies_do():
    params = lora_params()
    plain, _ = jax.jit(lambda p: train(quotient_sgd(0.1), p, LOSS, 20))(params)
    chex.assert_trees_all_equal(plain, params)
    leaky, _ = jax.jit(lambda p: train(quotient_sgd(0.1, delta=0.1), p, LOSS, 20))(params)
    assert float(jnp.linalg.norm(leaky["layer"]["lora_b"])) > 1e-3
    robust, _ = jax.jit(lambda p: train(quotient_sgd(0.1, robust_steps=5), p, LOSS, 300))(params)
    assert float(LOSS(robust)) < 1e-2 * float(LOSS(params))


def test_quotient_direction_is_gradient_times_own_gram():
    params = lora_params(zero_b=False)
    grads = jax.grad(LOSS)(params)
    tx = scale_by_quotient()
    direction, _ = tx.update(grads, tx.init(params), params)
    a, b = params["layer"]["lora_a"], params["layer"]["lora_b"]
    chex.assert_trees_all_close(direction["layer"]["lora_a"], grads["layer"]["lora_a"] @ (a.T @ a),
                                rtol=1e-5)
    chex.assert_trees_all_close(direction["layer"]["lora_b"], (b @ b.T) @ grads["layer"]["lora_b"],
                                rtol=1e-5)


def _one_example_regression():
    """``½‖x a b − y‖²`` for one unit-norm example from ``b = 0``: the robust steps fit it and
    grow ``‖b‖²`` to ~4, where quotient GD at a fixed rate 0.1 is past its stability limit."""
    k_a, k_x, k_y = jax.random.split(jax.random.key(7), 3)
    x = jax.random.normal(k_x, (1, 16))
    x, y = x / jnp.linalg.norm(x), jax.random.normal(k_y, (1, 12))
    params = {"lora_a": jax.random.normal(k_a, (16, 4)) / 4, "lora_b": jnp.zeros((4, 12))}
    return params, lambda p: 0.5 * jnp.sum((x @ p["lora_a"] @ p["lora_b"] - y) ** 2)


def _train_with_value_fn(tx, params, loss, steps):
    """Like ``problems.train``, passing ``value``, ``grad`` and ``value_fn`` to the update, as
    optax's line searches need."""

    def step(carry, _):
        p, s = carry
        value, grad = jax.value_and_grad(loss)(p)
        updates, s = tx.update(grad, s, p, value=value, grad=grad, value_fn=loss)
        return (optax.apply_updates(p, updates), s), value

    (params, _), history = jax.lax.scan(step, (params, tx.init(params)), None, length=steps)
    return params, history


def test_quotient_gd_with_optax_line_search_fits_where_a_fixed_rate_is_unstable():
    """Manopt runs quotient GD with a line search; the optax chain does the same. At a fixed rate
    0.1 the one-example regression is fitted during the robust start and then oscillates away;
    with ``optax.scale_by_backtracking_linesearch`` (initial rate 1) it is fitted to rounding."""
    params, loss = _one_example_regression()
    fixed = quotient_sgd(0.1, robust_steps=10)
    searched = optax.chain(quotient_sgd(1.0, robust_steps=10),
                           optax.scale_by_backtracking_linesearch(max_backtracking_steps=30))
    start = float(loss(params))
    fixed_history = jax.jit(lambda p: _train_with_value_fn(fixed, p, loss, 100))(params)[1]
    searched_end = jax.jit(lambda p: _train_with_value_fn(searched, p, loss, 100))(params)[0]
    fitted, after = float(fixed_history[10]), np.asarray(fixed_history[11:])
    assert fitted < 1e-3 * start  # the robust steps fit the example (~1e-4 of the start loss)
    assert np.any(~np.isfinite(after) | (after > 100 * fitted))  # then quotient GD loses it
    chex.assert_tree_all_finite(searched_end)
    assert float(loss(searched_end)) < 1e-10 * start


def test_robust_start_is_adam_then_fresh_adams(x64):
    robust_steps, params = 3, lora_params(dtype=jnp.float64)
    tx = adams(0.03, robust_steps=robust_steps)
    reference = optax.adam(0.03)
    ref_state, state = reference.init(params), tx.init(params)
    update, ref_update = jax.jit(tx.update), jax.jit(reference.update)
    for _ in range(robust_steps):
        grads = jax.grad(LOSS)(params)
        updates, state = update(grads, state, params)
        expected, ref_state = ref_update(grads, ref_state, params)
        chex.assert_trees_all_close(updates, expected, rtol=1e-5, atol=1e-7)
        params = optax.apply_updates(params, updates)
    fresh = adams(0.03)
    grads = jax.grad(LOSS)(params)
    updates, _ = update(grads, state, params)
    expected, _ = jax.jit(fresh.update)(grads, fresh.init(params), params)
    chex.assert_trees_all_close(updates, expected, rtol=1e-5, atol=1e-7)


def test_robust_steps_can_be_injected(x64):
    params = lora_params(dtype=jnp.float64)
    direct = adams(0.03, robust_steps=2)
    injected = optax.inject_hyperparams(adams)(0.03, robust_steps=2)
    s1, s2 = direct.init(params), injected.init(params)
    step = jax.jit(lambda p, s, tx=injected: tx.update(jax.grad(LOSS)(p), s, p))
    direct_step = jax.jit(lambda p, s: direct.update(jax.grad(LOSS)(p), s, p))
    for _ in range(4):
        u1, s1 = direct_step(params, s1)
        u2, s2 = step(params, s2)
        chex.assert_trees_all_close(u1, u2, rtol=1e-5, atol=1e-7)
        params = optax.apply_updates(params, u1)


def test_lracs_limiter_caps_metric_norm_growth():
    params = lora_params(zero_b=False)
    tx, gamma = scale_by_lracs(gamma=1.05), 1.05
    state, update = tx.init(params), jax.jit(tx.update)
    for _ in range(6):
        previous_phi = state.phi
        direction, state = update(jax.grad(LOSS)(params), state, params)
        for site in ("layer",):
            if float(previous_phi[site]) > 0:
                assert float(state.phi[site]) <= gamma * float(previous_phi[site]) * (1 + 1e-5)
        params = optax.apply_updates(params, jax.tree.map(lambda u: -0.05 * u, direction))


def test_lracs_bias_correction_makes_the_first_step_one_tenth_of_algorithm_3s(x64):
    # X̃ ∝ (m_q m_s)^{-1/2}, the moments start at (1 − b1) of the scales, the lift is linear and
    # the limiter does not act on step 1: Algorithm 3's first step is 1/(1 − b1) = 10 times.
    params = lora_params(zero_b=False, dtype=jnp.float64)
    grads = jax.grad(LOSS)(params)
    corrected, paper = scale_by_lracs(), scale_by_lracs(bias_correction=False)
    first = corrected.update(grads, corrected.init(params), params)[0]
    expected = jax.tree.map(lambda u: 0.1 * u, paper.update(grads, paper.init(params), params)[0])
    chex.assert_trees_all_close(first, expected, rtol=1e-9)


@pytest.mark.parametrize("scale", [1e-15, 1e-6, 1e6, 1e15])
def test_lracs_direction_does_not_depend_on_the_gradient_scale(scale):
    """RACS's ``X̃ = Q^{-1/2} X S^{-1/2}`` is invariant under ``X → cX`` (``q`` is, ``s`` scales
    like ``c²``), so the whole LRACS direction is; in float32 the power iteration's norms
    (``c⁴``) under- and overflow unless the iteration runs on a normalised ``X``."""
    a, b, y, c = _problem(4)
    params = {"lora_a": jnp.asarray(a, jnp.float32), "lora_b": jnp.asarray(b, jnp.float32)}
    grads = jax.grad(lambda p: 0.5 * jnp.sum((c * (p["lora_a"] @ p["lora_b"] - y)) ** 2))(params)
    tx = scale_by_lracs()
    update = jax.jit(tx.update)
    reference_state, scaled_state = tx.init(params), tx.init(params)
    for _ in range(3):  # the moments and the limiter see the same scale every step
        reference, reference_state = update(grads, reference_state, params)
        scaled, scaled_state = update(jax.tree.map(lambda g: scale * g, grads), scaled_state,
                                      params)
        chex.assert_trees_all_close(scaled, reference, rtol=1e-4, atol=1e-6)
    x = jnp.asarray(y, jnp.float32)
    s, q = racs_scales(x)
    s_scaled, q_scaled = racs_scales(scale * x)
    np.testing.assert_allclose(q_scaled, q, rtol=1e-5)
    if scale > 1e-15:  # s of x·1e-20 is ~1e-40, below float32's normal range
        np.testing.assert_allclose(s_scaled / np.float32(scale) ** 2, s, rtol=1e-5)


@pytest.mark.parametrize("scale", [1e-30, 1e-20, 1e20, 1e30])
def test_lracs_direction_stays_bounded_past_float32_range_of_the_scales(scale):
    """Past ~1e±19 the scale ``s`` (``~x²``) leaves float32's normal range: the direction is no
    longer the invariant one but stays finite and no larger than it (as Adam's at such scales)."""
    a, b, y, c = _problem(4)
    params = {"lora_a": jnp.asarray(a, jnp.float32), "lora_b": jnp.asarray(b, jnp.float32)}
    grads = jax.grad(lambda p: 0.5 * jnp.sum((c * (p["lora_a"] @ p["lora_b"] - y)) ** 2))(params)
    tx = scale_by_lracs()
    reference, scaled = tx.init(params), tx.init(params)
    for _ in range(3):
        unscaled, reference = tx.update(grads, reference, params)
        direction, scaled = tx.update(jax.tree.map(lambda g: scale * g, grads), scaled, params)
        for leaf, bound in zip(jax.tree.leaves(direction), jax.tree.leaves(unscaled)):
            assert np.all(np.isfinite(leaf))
            assert np.abs(leaf).max() <= 1.01 * np.abs(bound).max()
