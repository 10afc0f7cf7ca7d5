"""SoLoRA: float64 transcriptions of Algorithms 1-2, Theorems 3.1-3.2, zero init, invariance,
and a battery-style check of the exact-statistics mode (pairs carrying a statistics probe)."""

from __future__ import annotations

import chex
import hypothesis.strategies as st
import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest
from hypothesis import given, settings
from invariance import gl_matrices, invariance_residual

from lowrank_optax import LoRAPair
from lowrank_optax.grad_stats import lora_matmul_with_stats, stats_probe
from lowrank_optax.solora import (
    FactorMoments,
    metric_sqrt,
    solora_adamw,
    solora_direction,
    solora_sgd,
    transport,
)

M, N, R = 7, 6, 2


@pytest.fixture
def x64():
    with jax.enable_x64(True):
        yield


# ----------------------------------------------------------------------------------------------
# A LoRA layer problem whose full gradient G is available explicitly (for the transcriptions)
# and through the statistics channel (for the implementation).


def _data(seed=0, steps=6, tokens=5):
    rng = np.random.default_rng(seed)
    return dict(
        xs=rng.normal(size=(steps, tokens, M)),
        ys=rng.normal(size=(steps, tokens, N)),
        w0=rng.normal(size=(M, N)) / np.sqrt(M),
        a=rng.normal(size=(M, R)) / np.sqrt(M),
        b=rng.normal(size=(R, N)) / np.sqrt(R),
    )


def _loss_of_output(y, target):
    return jnp.sum(jnp.tanh(y) * target) + 0.5 * jnp.sum(y**2)


def _explicit_g(w, x, target):
    """``G = ∂L/∂W`` of the layer loss at the merged weight ``w``."""
    return np.asarray(jax.grad(lambda w: _loss_of_output(jnp.asarray(x) @ w, target))(w))


def _channel_grads(params, w0, x, target, scale=1.0):
    """Factor gradients and probe statistics through :func:`lora_matmul_with_stats`."""

    def loss(p):
        probe = p.get("lora_stats", stats_probe(M, N))
        y = lora_matmul_with_stats(jnp.asarray(x), jnp.asarray(w0), p["lora_a"], p["lora_b"],
                                   scale, probe)
        return _loss_of_output(y, target)

    return jax.grad(loss)(params)


def _run_implementation(tx, data, steps, *, probe=True, full_gradient=False, scale=1.0):
    params = {"lora_a": jnp.asarray(data["a"]), "lora_b": jnp.asarray(data["b"])}
    if probe:
        params["lora_stats"] = jax.tree.map(lambda v: v.astype(jnp.float64),
                                            stats_probe(M, N, full_gradient=full_gradient))
    state = tx.init(params)
    for t in range(steps):
        grads = _channel_grads(params, data["w0"], data["xs"][t], data["ys"][t], scale)
        updates, state = tx.update(grads, state, params)
        params = optax.apply_updates(params, updates)
    return np.asarray(params["lora_a"]), np.asarray(params["lora_b"])


# ----------------------------------------------------------------------------------------------
# Independent transcriptions, written in the paper's orientation (W_p = B A = Wᵀ, B = bᵀ,
# A = aᵀ, G_p = Gᵀ) directly from Algorithms 1 and 2.


def _paper_metric(v, eps):
    return np.diag(v / np.sqrt(np.abs(v).sum()) + eps)


def _sqrt_diag(d):
    return np.diag(np.sqrt(np.diag(d)))


def _paper_delta(bp, ap, gb_term, ga_term, lmat, rmat, delta):
    """Lines 5-6 of Algorithm 1 (lines 6-7 of Algorithm 2 with ``M`` in place of ``G``)."""
    lh, rh = _sqrt_diag(lmat), _sqrt_diag(rmat)
    kb = bp.T @ lh @ bp + delta * np.eye(R)
    ka = ap @ rh @ ap.T + delta * np.eye(R)
    eye_m, eye_n = np.eye(bp.shape[0]), np.eye(ap.shape[1])
    d_b = (eye_m - 0.5 * bp @ np.linalg.inv(kb) @ bp.T @ lh) @ np.linalg.inv(lh) @ gb_term \
        @ np.linalg.inv(ka)
    d_a = np.linalg.inv(kb) @ ga_term @ np.linalg.inv(rh) \
        @ (eye_n - 0.5 * rh @ ap.T @ np.linalg.inv(ka) @ ap)
    return d_b, d_a


def _paper_tangent_projection(bp, ap, z):
    """Proposition D.2: ``P_T(Z)`` under the standard metric."""
    pb = bp @ np.linalg.inv(bp.T @ bp) @ bp.T
    qa = ap.T @ np.linalg.inv(ap @ ap.T) @ ap
    return pb @ z + z @ qa - pb @ z @ qa


def _paper_run(data, steps, lr, *, beta, eps=0.0, delta=0.0, beta3=None, weight_decay=0.0,
               stats_of_tangent=False, factor_moment=False):
    bp, ap = data["b"].T.copy(), data["a"].T.copy()
    l_vec, r_vec = np.zeros(N), np.zeros(M)
    m_full = np.zeros((N, M))
    m_b, m_a = np.zeros((N, R)), np.zeros((R, M))
    bp_prev, ap_prev = np.zeros_like(bp), np.zeros_like(ap)
    for t in range(1, steps + 1):
        w = data["w0"] + (bp @ ap).T
        g = _explicit_g(w, data["xs"][t - 1], data["ys"][t - 1]).T  # paper orientation, N×M
        s = _paper_tangent_projection(bp, ap, g) if stats_of_tangent else g
        l_vec = beta * l_vec + (1 - beta) * (s * s).sum(axis=1)
        r_vec = beta * r_vec + (1 - beta) * (s * s).sum(axis=0)
        lmat, rmat = _paper_metric(l_vec, eps), _paper_metric(r_vec, eps)
        if beta3 is None:
            d_b, d_a = _paper_delta(bp, ap, g @ ap.T, bp.T @ g, lmat, rmat, delta)
            bp, ap = bp - lr * d_b, ap - lr * d_a
            continue
        if factor_moment:
            # The moments were taken at the previous factors: keep their parts in the previous
            # column space of B / row space of A and re-express them at the current factors.
            m_b = m_b @ np.linalg.pinv(ap_prev @ ap_prev.T) @ ap_prev @ ap.T
            m_a = bp.T @ bp_prev @ np.linalg.pinv(bp_prev.T @ bp_prev) @ m_a
            m_b = beta3 * m_b + (1 - beta3) * g @ ap.T
            m_a = beta3 * m_a + (1 - beta3) * bp.T @ g
            bp_prev, ap_prev = bp, ap
            d_b, d_a = _paper_delta(bp, ap, m_b, m_a, lmat, rmat, delta)
        else:
            m_full = beta3 * m_full + (1 - beta3) * g
            d_b, d_a = _paper_delta(bp, ap, m_full @ ap.T, bp.T @ m_full, lmat, rmat, delta)
        bias = np.sqrt(1 - beta**t) / (1 - beta3**t)
        bp = (1 - weight_decay * lr) * bp - lr * bias * d_b
        ap = (1 - weight_decay * lr) * ap - lr * bias * d_a
    return ap.T, bp.T


def test_algorithm1_with_statistics_channel_matches_transcription(x64):
    data = _data(0)
    want = _paper_run(data, 5, 0.05, beta=0.9)
    got = _run_implementation(solora_sgd(0.05, b2=0.9, eps=0.0, delta=0.0), data, 5)
    np.testing.assert_allclose(got[0], want[0], rtol=1e-9, atol=1e-11)
    np.testing.assert_allclose(got[1], want[1], rtol=1e-9, atol=1e-11)


def test_algorithm1_with_eps_and_delta_matches_transcription(x64):
    data = _data(1)
    want = _paper_run(data, 4, 0.05, beta=0.98, eps=1e-3, delta=1e-2)
    got = _run_implementation(solora_sgd(0.05, eps=1e-3, delta=1e-2), data, 4)
    np.testing.assert_allclose(got[0], want[0], rtol=1e-9, atol=1e-11)
    np.testing.assert_allclose(got[1], want[1], rtol=1e-9, atol=1e-11)


def test_algorithm2_full_gradient_probe_matches_transcription(x64):
    data = _data(2)
    want = _paper_run(data, 5, 0.03, beta=0.9, beta3=0.8, weight_decay=0.1)
    tx = solora_adamw(0.03, b1=0.8, b2=0.9, eps=0.0, weight_decay=0.1, delta=0.0)
    got = _run_implementation(tx, data, 5, full_gradient=True)
    np.testing.assert_allclose(got[0], want[0], rtol=1e-9, atol=1e-11)
    np.testing.assert_allclose(got[1], want[1], rtol=1e-9, atol=1e-11)


def test_algorithm2_factor_moment_matches_its_transcription(x64):
    data = _data(3)
    want = _paper_run(data, 5, 0.03, beta=0.9, beta3=0.8, factor_moment=True)
    tx = solora_adamw(0.03, b1=0.8, b2=0.9, eps=0.0, delta=0.0, moment="factor")
    got = _run_implementation(tx, data, 5)
    np.testing.assert_allclose(got[0], want[0], rtol=1e-9, atol=1e-11)
    np.testing.assert_allclose(got[1], want[1], rtol=1e-9, atol=1e-11)


def test_transport_keeps_moments_at_unmoved_factors_and_moves_them_with_gl_r(x64):
    rng = np.random.default_rng(7)
    a, b = rng.normal(size=(M, R)), rng.normal(size=(R, N))
    ga, gb = rng.normal(size=(M, R)), rng.normal(size=(R, N))
    here = LoRAPair(jnp.asarray(a), jnp.asarray(b))
    kept = transport(FactorMoments(ga, gb, a, b), here, 0.0)
    np.testing.assert_allclose(kept[0], ga, rtol=1e-9)
    np.testing.assert_allclose(kept[1], gb, rtol=1e-9)
    # Moments of M = ga-part at (a, b), read at (a R, R⁻¹ b): M bᵀ R⁻ᵀ and Rᵀ aᵀ M.
    rot = rng.normal(size=(R, R)) + 3 * np.eye(R)
    there = LoRAPair(jnp.asarray(a @ rot), jnp.asarray(np.linalg.solve(rot, b)))
    moved = transport(FactorMoments(ga, gb, a, b), there, 0.0)
    np.testing.assert_allclose(moved[0], ga @ np.linalg.inv(rot).T, rtol=1e-8, atol=1e-10)
    np.testing.assert_allclose(moved[1], rot.T @ gb, rtol=1e-8, atol=1e-10)


def test_factor_moment_agrees_with_full_moment_to_first_order(x64):
    data = _data(4)

    def gap(lr):
        full = _paper_run(data, 4, lr, beta=0.9, beta3=0.8)
        factor = _run_implementation(solora_adamw(lr, b1=0.8, b2=0.9, eps=0.0, delta=0.0,
                                                  moment="factor"), data, 4)
        return np.linalg.norm(full[0] @ full[1] - factor[0] @ factor[1])

    # The moments differ by O(lr) (factors moving inside the window), so the trajectories
    # differ by O(lr²): halving lr divides the gap by about four.
    ratio = gap(1e-3) / gap(5e-4)
    assert 3.0 < ratio < 5.0, ratio


def test_factor_only_mode_uses_statistics_of_tangent_projection(x64):
    data = _data(5)
    want = _paper_run(data, 4, 0.05, beta=0.9, stats_of_tangent=True)
    got = _run_implementation(solora_sgd(0.05, b2=0.9, eps=0.0, delta=0.0), data, 4, probe=False)
    np.testing.assert_allclose(got[0], want[0], rtol=1e-9, atol=1e-11)
    np.testing.assert_allclose(got[1], want[1], rtol=1e-9, atol=1e-11)
    exact = _paper_run(data, 4, 0.05, beta=0.9)
    assert np.linalg.norm(got[1] - exact[1]) > 1e-6  # the two modes really differ


def test_scale_hyperparameter_makes_the_induced_update_scale_free(x64):
    data, s = _data(6), 4.0
    scaled = _run_implementation(solora_sgd(0.05, delta=0.0, scale=s), data, 3, scale=s)
    rescaled = dict(data, a=data["a"] * np.sqrt(s), b=data["b"] * np.sqrt(s))
    plain = _run_implementation(solora_sgd(0.05, delta=0.0), rescaled, 3)
    np.testing.assert_allclose(s * scaled[0] @ scaled[1], plain[0] @ plain[1], rtol=1e-10)


# ----------------------------------------------------------------------------------------------
# Theorems 3.1 and 3.2, in the paper's orientation.


def _theorem_setup(seed):
    rng = np.random.default_rng(seed)
    a, b = rng.normal(size=(M, R)), rng.normal(size=(R, N))
    g = rng.normal(size=(M, N))
    row_sqrt = np.sqrt(rng.uniform(0.2, 3.0, size=M))
    col_sqrt = np.sqrt(rng.uniform(0.2, 3.0, size=N))
    d = solora_direction(jnp.asarray(g @ b.T), jnp.asarray(a.T @ g), LoRAPair(a, b),
                         jnp.asarray(row_sqrt), jnp.asarray(col_sqrt), 0.0)
    # paper orientation: B = bᵀ, A = aᵀ, G_p = Gᵀ, L^{½} over the paper's rows = our columns
    return dict(bp=b.T, ap=a.T, g=g.T, lh=np.diag(col_sqrt), rh=np.diag(row_sqrt),
                d_b=np.asarray(d.b).T, d_a=np.asarray(d.a).T, rng=rng)


def _h_norm_sq(y, lh, rh):
    return float(np.sum((lh @ y @ rh) * y))


def _gamma(s, d_b, d_a):
    """Objective (11): ½‖Δ_B A + B Δ_A − P̃_T(L^{-½} G R^{-½})‖²_H."""
    bp, ap, lh, rh = s["bp"], s["ap"], s["lh"], s["rh"]
    kb, ka = bp.T @ lh @ bp, ap @ rh @ ap.T
    pb = bp @ np.linalg.inv(kb) @ bp.T @ lh
    qa = rh @ ap.T @ np.linalg.inv(ka) @ ap
    z = np.linalg.inv(lh) @ s["g"] @ np.linalg.inv(rh)
    target = pb @ z + z @ qa - pb @ z @ qa
    return 0.5 * _h_norm_sq(d_b @ ap + bp @ d_a - target, lh, rh)


def _psi(s, d_b, d_a):
    """Objective (12): ½‖Δ_B A − B Δ_A‖²_H."""
    return 0.5 * _h_norm_sq(d_b @ s["ap"] - s["bp"] @ d_a, s["lh"], s["rh"])


@pytest.mark.parametrize("seed", [0, 1, 2])
def test_theorem_3_1_update_solves_weighted_least_squares(x64, seed):
    s = _theorem_setup(seed)
    best = _gamma(s, s["d_b"], s["d_a"])
    assert best < 1e-20  # the tangent target is reached exactly
    for _ in range(20):
        e_b, e_a = s["rng"].normal(size=s["d_b"].shape), s["rng"].normal(size=s["d_a"].shape)
        assert _gamma(s, s["d_b"] + 1e-3 * e_b, s["d_a"] + 1e-3 * e_a) > best
        x = s["rng"].normal(size=(R, R))  # the solution family of Theorem 3.1
        assert _gamma(s, s["d_b"] - s["bp"] @ x, s["d_a"] + x @ s["ap"]) < 1e-18


@pytest.mark.parametrize("seed", [0, 1, 2])
def test_theorem_3_2_balancing_matrix_minimises_imbalance(x64, seed):
    s = _theorem_setup(seed)
    best = _psi(s, s["d_b"], s["d_a"])
    for _ in range(20):
        x = 1e-2 * s["rng"].normal(size=(R, R))
        assert _psi(s, s["d_b"] - s["bp"] @ x, s["d_a"] + x @ s["ap"]) > best
    # first-order optimality: the gradient of Ψ(X) at X = 0 vanishes
    grad = jax.grad(lambda x: 0.5 * jnp.sum(
        (s["lh"] @ ((s["d_b"] - s["bp"] @ x) @ s["ap"] - s["bp"] @ (s["d_a"] + x @ s["ap"]))
         @ s["rh"]) * ((s["d_b"] - s["bp"] @ x) @ s["ap"] - s["bp"] @ (s["d_a"] + x @ s["ap"]))
    ))(jnp.zeros((R, R)))
    np.testing.assert_allclose(grad, 0.0, atol=1e-10)


# ----------------------------------------------------------------------------------------------
# Zero-initialised b: the paper's B = 0 start.


def test_first_step_from_zero_b_is_the_delta_free_value(x64):
    data = dict(_data(7), b=np.zeros((R, N)))
    params = {"lora_a": jnp.asarray(data["a"]), "lora_b": jnp.zeros((R, N)),
              "lora_stats": jax.tree.map(lambda v: v.astype(jnp.float64), stats_probe(M, N))}
    grads = _channel_grads(params, data["w0"], data["xs"][0], data["ys"][0])
    tx = solora_sgd(1.0, b2=0.9)
    updates, _ = tx.update(grads, tx.init(params), params)
    np.testing.assert_array_equal(np.asarray(updates["lora_a"]), 0.0)
    g = _explicit_g(data["w0"], data["xs"][0], data["ys"][0])
    a = data["a"]
    row = np.asarray(metric_sqrt(0.1 * (g * g).sum(1), 1e-8))
    col = np.asarray(metric_sqrt(0.1 * (g * g).sum(0), 1e-8))
    want = -np.linalg.solve(a.T @ (row[:, None] * a), a.T @ g) / col[None, :]
    np.testing.assert_allclose(np.asarray(updates["lora_b"]), want, rtol=1e-5)


def test_zero_b_is_finite_with_the_paper_delta_and_without_it():
    # With delta = 0 the paper's K_b = b bᵀ is singular at b = 0; the library's damping floor
    # (linalg.damping: the r×r solves never see an exactly singular system) keeps it finite.
    params = {"lora_a": jnp.ones((M, R)) / M, "lora_b": jnp.zeros((R, N)),
              "lora_stats": stats_probe(M, N)}
    data = _data(8)
    grads = _channel_grads(params, data["w0"], data["xs"][0], data["ys"][0])
    for tx in (solora_sgd(0.1, delta=0.0), solora_sgd(0.1)):
        updates, _ = tx.update(grads, tx.init(params), params)
        chex.assert_tree_all_finite(updates)


@pytest.mark.parametrize("tiny", [1e-12, 1e-20])
def test_tiny_b_gives_bounded_a_step(tiny):
    data = _data(9)
    params = {"lora_a": jnp.asarray(data["a"], jnp.float32),
              "lora_b": tiny * jnp.asarray(data["b"], jnp.float32),
              "lora_stats": stats_probe(M, N)}
    grads = _channel_grads(params, data["w0"], data["xs"][0], data["ys"][0])
    tx = solora_sgd(1.0)
    updates, _ = tx.update(grads, tx.init(params), params)
    chex.assert_tree_all_finite(updates)
    assert float(jnp.max(jnp.abs(updates["lora_a"]))) < 10.0


# ----------------------------------------------------------------------------------------------
# GL(r) invariance: exact for δ = 0 in every mode (derivation in scale_by_solora's docstring).

_INVARIANT = {
    "sgd": lambda delta: solora_sgd(0.01, delta=delta),
    "adamw_full": lambda delta: solora_adamw(0.01, delta=delta, weight_decay=0.1),
    "adamw_factor": lambda delta: solora_adamw(0.01, delta=delta, moment="factor"),
}


@pytest.mark.parametrize("name", list(_INVARIANT))
@settings(max_examples=3, deadline=None)
@given(r_matrix=gl_matrices(3, max_cond=10.0))
def test_gl_r_invariance_is_exact_without_delta(name, r_matrix):
    residual = invariance_residual(lambda: _INVARIANT[name](0.0), r_matrix, steps=3)
    assert residual < 1e-9 * np.linalg.cond(r_matrix), residual


@pytest.mark.parametrize("make_tx", [lambda: _INVARIANT["sgd"](1.0),
                                     lambda: optax.adamw(0.01)], ids=["large_delta", "adamw"])
def test_invariance_check_can_fail(make_tx):
    r_matrix = np.diag([4.0, 1.0, 0.25])
    assert invariance_residual(make_tx, r_matrix, steps=3) > 1e-4


def test_gl_r_invariance_with_statistics_probe(x64):
    data, r_matrix = _data(10), np.array([[2.0, 1.0], [0.3, 0.5]])
    tx = lambda: solora_adamw(0.05, delta=0.0)  # noqa: E731
    first = _run_implementation(tx(), data, 4, full_gradient=True)
    moved = dict(data, a=data["a"] @ r_matrix, b=np.linalg.solve(r_matrix, data["b"]))
    second = _run_implementation(tx(), moved, 4, full_gradient=True)
    np.testing.assert_allclose(first[0] @ first[1], second[0] @ second[1], rtol=1e-10)


# ----------------------------------------------------------------------------------------------
# Battery-style checks for the exact-statistics mode (the battery's params carry no probe).

_TOKENS = jnp.eye(M)  # x = I: the layer output is the merged weight itself
_TARGET = jnp.asarray(np.random.default_rng(11).normal(size=(M, N)))

_STATS_METHODS = {
    "solora_sgd": (lambda lr: solora_sgd(lr), 0.01, False),
    "solora_adamw": (lambda lr: solora_adamw(lr), 0.03, True),
    "solora_adamw_factor": (lambda lr: solora_adamw(lr, moment="factor"), 0.03, False),
}
stats_methods = pytest.mark.parametrize("name", list(_STATS_METHODS))


def _probe_params(zero_b=True, dtype=jnp.float32, full_gradient=False):
    key_a, key_b = jax.random.split(jax.random.key(0))
    a = (jax.random.normal(key_a, (M, R)) / np.sqrt(M)).astype(dtype)
    b = jnp.zeros((R, N), dtype) if zero_b else jax.random.normal(key_b, (R, N), dtype)
    return {"layer": {"lora_a": a, "lora_b": b,
                      "lora_stats": stats_probe(M, N, full_gradient=full_gradient)}}


def _probe_loss(params):
    p = params["layer"]
    y = lora_matmul_with_stats(_TOKENS.astype(p["lora_a"].dtype),
                               jnp.zeros((M, N), p["lora_a"].dtype), p["lora_a"], p["lora_b"],
                               1.0, p["lora_stats"])
    return 0.5 * jnp.sum((y.astype(jnp.float32) - _TARGET) ** 2)


def _make(name, lr=None):
    factory, default_lr, full = _STATS_METHODS[name]
    return factory(default_lr if lr is None else lr), full


def _train(tx, params, steps):
    def step(carry, _):
        p, s = carry
        value, grads = jax.value_and_grad(_probe_loss)(p)
        updates, s = tx.update(grads, s, p)
        return (optax.apply_updates(p, updates), s), value

    (params, _), history = jax.lax.scan(step, (params, tx.init(params)), None, length=steps)
    return params, history


@stats_methods
def test_stats_mode_converges_from_zero_b_and_keeps_probe_zero(name):
    tx, full = _make(name)
    params, history = jax.jit(lambda p: _train(tx, p, 300))(_probe_params(full_gradient=full))
    assert np.all(np.isfinite(history))
    # the target is full rank: the optimum is its best rank-R approximation
    sv = np.linalg.svd(np.asarray(_TARGET), compute_uv=False)
    optimum = 0.5 * float(np.sum(sv[R:] ** 2))
    assert float(_probe_loss(params)) - optimum < 1e-2 * (float(history[0]) - optimum)
    for leaf in jax.tree.leaves(params["layer"]["lora_stats"]):
        np.testing.assert_array_equal(np.asarray(leaf), 0.0)


@stats_methods
def test_stats_mode_zero_b_200_steps_finite(name):
    tx, full = _make(name, lr=0.1)
    params, history = jax.jit(lambda p: _train(tx, p, 200))(_probe_params(full_gradient=full))
    assert np.all(np.isfinite(history))
    chex.assert_tree_all_finite(params)


@stats_methods
def test_stats_mode_jit_inject_hyperparams_and_abstract_init(name):
    factory, lr, full = _STATS_METHODS[name]
    params = _probe_params(zero_b=False, full_gradient=full)
    grads = jax.grad(_probe_loss)(params)
    tx = factory(lr)
    injected = optax.inject_hyperparams(factory)(lr)
    step = jax.jit(tx.update)
    state = tx.init(params)
    first, state = step(grads, state, params)
    second, state = step(grads, state, params)
    assert step._cache_size() == 1
    inj_state = injected.init(params)
    inj_first, inj_state = injected.update(grads, inj_state, params)
    inj_second, _ = injected.update(grads, inj_state, params)
    chex.assert_trees_all_close((first, second), (inj_first, inj_second), rtol=1e-5, atol=1e-7)
    structs = jax.tree.map(lambda x: jax.ShapeDtypeStruct(x.shape, x.dtype), params)
    chex.assert_trees_all_equal_shapes_and_dtypes(tx.init(params), tx.init(structs))


@stats_methods
def test_stats_mode_nonfinite_statistics_propagate_and_are_skipped(name):
    factory, lr, full = _STATS_METHODS[name]
    params = _probe_params(zero_b=False, full_gradient=full)
    grads = jax.grad(_probe_loss)(params)
    bad = jax.tree.map(lambda g: g, grads)
    bad["layer"]["lora_stats"]["row"] = grads["layer"]["lora_stats"]["row"].at[0].set(jnp.nan)
    tx = factory(lr)
    raw, _ = tx.update(bad, tx.init(params), params)
    assert not bool(jnp.all(jnp.isfinite(raw["layer"]["lora_a"])))
    guarded = optax.apply_if_finite(factory(lr), max_consecutive_errors=3)
    state = guarded.init(params)
    skipped, after = guarded.update(bad, state, params)
    chex.assert_trees_all_close(skipped, jax.tree.map(jnp.zeros_like, skipped))
    chex.assert_trees_all_close(after.inner_state, state.inner_state)


@stats_methods
def test_stats_mode_bf16_params_give_bf16_updates(name):
    factory, lr, full = _STATS_METHODS[name]
    params = _probe_params(zero_b=False, dtype=jnp.bfloat16, full_gradient=full)
    grads = jax.grad(_probe_loss)(params)
    tx = factory(lr)
    state = tx.init(params)
    updates, new_state = tx.update(grads, state, params)
    assert updates["layer"]["lora_a"].dtype == jnp.bfloat16
    assert updates["layer"]["lora_b"].dtype == jnp.bfloat16
    chex.assert_tree_all_finite(updates)
    chex.assert_trees_all_equal_dtypes(state, new_state)


def test_stats_mode_multisteps_averages_statistics():
    factory, lr, full = _STATS_METHODS["solora_adamw"]
    params = _probe_params(zero_b=False, full_gradient=full)
    g1 = jax.grad(_probe_loss)(params)
    g2 = jax.tree.map(lambda g: 0.5 * g + 0.1, g1)
    multi = optax.MultiSteps(factory(lr), every_k_schedule=2)
    state = multi.init(params)
    _, state = multi.update(g1, state, params)
    second, _ = multi.update(g2, state, params)
    tx = factory(lr)
    mean = jax.tree.map(lambda x, y: 0.5 * (x + y), g1, g2)
    expected, _ = tx.update(mean, tx.init(params), params)
    chex.assert_trees_all_close(second, expected, rtol=1e-5, atol=1e-6)


def test_unknown_moment_is_rejected():
    with pytest.raises(ValueError, match="moment"):
        solora_adamw(0.1, moment="diagonal")


@settings(max_examples=5, deadline=None)
@given(st.integers(0, 10_000))
def test_direction_is_covariant_under_gl_r(seed):
    with jax.enable_x64(True):
        rng = np.random.default_rng(seed)
        a, b, g = rng.normal(size=(M, R)), rng.normal(size=(R, N)), rng.normal(size=(M, N))
        rm = rng.normal(size=(R, R)) + 3 * np.eye(R)
        rs, cs = np.sqrt(rng.uniform(0.5, 2, M)), np.sqrt(rng.uniform(0.5, 2, N))
        d1 = solora_direction(g @ b.T, a.T @ g, LoRAPair(a, b), rs, cs, 0.0)
        a2, b2 = a @ rm, np.linalg.solve(rm, b)
        d2 = solora_direction(g @ b2.T, a2.T @ g, LoRAPair(a2, b2), rs, cs, 0.0)
        np.testing.assert_allclose(np.asarray(d2.a), np.asarray(d1.a) @ rm, rtol=1e-8, atol=1e-10)
        np.testing.assert_allclose(np.asarray(d2.b), np.linalg.solve(rm, np.asarray(d1.b)),
                                   rtol=1e-8, atol=1e-10)


def test_stacked_pairs_with_probes_match_separate_pairs():
    layers = 2
    rng = np.random.default_rng(12)
    a = jnp.asarray(rng.normal(size=(layers, M, R)), jnp.float32)
    b = jnp.asarray(rng.normal(size=(layers, R, N)), jnp.float32)
    grads = {"lora_a": jnp.asarray(rng.normal(size=a.shape), jnp.float32),
             "lora_b": jnp.asarray(rng.normal(size=b.shape), jnp.float32),
             "lora_stats": {"row": jnp.asarray(rng.uniform(size=(layers, M)), jnp.float32),
                            "col": jnp.asarray(rng.uniform(size=(layers, N)), jnp.float32)}}
    stacked = {"lora_a": a, "lora_b": b, "lora_stats": stats_probe(M, N, (layers,))}
    tx = solora_adamw(0.1)
    updates, _ = tx.update(grads, tx.init(stacked), stacked)
    for i in range(layers):
        one = jax.tree.map(lambda x, i=i: x[i], stacked)
        g_one = jax.tree.map(lambda x, i=i: x[i], grads)
        want, _ = tx.update(g_one, tx.init(one), one)
        chex.assert_trees_all_close(jax.tree.map(lambda x, i=i: x[i], updates), want,
                                    rtol=1e-5, atol=1e-6)
