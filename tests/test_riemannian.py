"""Scaled GD / scaled AdamW against a float64 transcription of Zhang & Pilanci's Algorithms 1–2,
their first-order geometry, GL(r) invariance, and LoRA+."""

from __future__ import annotations

import re

import chex
import hypothesis.strategies as st
import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest
from hypothesis import given, settings
from invariance import gl_matrices, invariance_residual, random_gl

import lowrank_optax as lro

M, N, R = 8, 6, 3


@pytest.fixture(autouse=True)
def float64():
    with jax.enable_x64(True):
        yield


def _problem(seed=0):
    """Paper orientation: W = W0 + B A with B (out×r), A (r×in); loss ½‖C⊙(BA − Y)‖²."""
    rng = np.random.default_rng(seed)
    big_a = rng.normal(size=(R, M))  # A: r × in   (library a = Aᵀ: in × r)
    big_b = rng.normal(size=(N, R)) * 0.3  # B: out × r (library b = Bᵀ: r × out)
    y, c = rng.normal(size=(N, M)), rng.uniform(0.5, 2.0, size=(N, M))

    def paper_grads(big_a, big_b):
        g = c**2 * (big_b @ big_a - y)  # dL/dW, out × in
        return big_b.T @ g, g @ big_a.T  # dA, dB

    def library_loss(params):
        w = (params["s"]["lora_a"] @ params["s"]["lora_b"]).T
        return 0.5 * jnp.sum((c * (w - y)) ** 2)

    params = {"s": {"lora_a": jnp.asarray(big_a.T), "lora_b": jnp.asarray(big_b.T)}}
    return big_a, big_b, paper_grads, library_loss, params


def _run_library(tx, params, loss, steps):
    state = tx.init(params)
    for _ in range(steps):
        updates, state = tx.update(jax.grad(loss)(params), state, params)
        params = optax.apply_updates(params, updates)
    return np.asarray(params["s"]["lora_a"]).T, np.asarray(params["s"]["lora_b"]).T


def test_scaled_gd_matches_algorithm_2_transcription():
    lr, delta = 0.05, 1e-3
    big_a, big_b, paper_grads, loss, params = _problem()
    for _ in range(5):  # Algorithm 2, simultaneous update from the pre-step factors
        d_a, d_b = paper_grads(big_a, big_b)
        d_a_scaled = np.linalg.inv(big_b.T @ big_b + delta * np.eye(R)) @ d_a
        d_b_scaled = d_b @ np.linalg.inv(big_a @ big_a.T + delta * np.eye(R))
        big_a, big_b = big_a - lr * d_a_scaled, big_b - lr * d_b_scaled
    lib_a, lib_b = _run_library(lro.scaled_sgd(lr, delta=delta), params, loss, 5)
    np.testing.assert_allclose(lib_a, big_a, rtol=1e-10)
    np.testing.assert_allclose(lib_b, big_b, rtol=1e-10)


@pytest.mark.parametrize("normalize_grams", [False, True], ids=["paper", "normalized"])
def test_scaled_adamw_matches_algorithm_1_transcription(normalize_grams):
    # normalize_grams=False is Algorithm 1 as printed; True (the default) regularises each Gram
    # by max(δ, 10⁻²·tr(Gram)/r) and multiplies each preconditioned gradient by the mean
    # eigenvalue of the regularised Gram it inverts.
    lr, b1, b2, eps, delta, wd = 0.01, 0.9, 0.999, 1e-8, 1e-6, 0.01
    relative = 1e-2 if normalize_grams else 0.0
    big_a, big_b, paper_grads, loss, params = _problem(1)
    m_a, v_a, m_b, v_b = 0.0, 0.0, 0.0, 0.0

    def damped(gram):
        return gram + max(delta, relative * np.trace(gram) / R) * np.eye(R)

    for t in range(1, 6):
        d_a, d_b = paper_grads(big_a, big_b)
        gram_b, gram_a = damped(big_b.T @ big_b), damped(big_a @ big_a.T)
        d_a_scaled = np.linalg.inv(gram_b) @ d_a
        d_b_scaled = d_b @ np.linalg.inv(gram_a)
        if normalize_grams:
            d_a_scaled *= np.trace(gram_b) / R
            d_b_scaled *= np.trace(gram_a) / R
        m_a = b1 * m_a + (1 - b1) * d_a_scaled
        v_a = b2 * v_a + (1 - b2) * d_a_scaled**2
        m_b = b1 * m_b + (1 - b1) * d_b_scaled
        v_b = b2 * v_b + (1 - b2) * d_b_scaled**2
        step_a = (m_a / (1 - b1**t)) / (np.sqrt(v_a / (1 - b2**t)) + eps) + wd * big_a
        step_b = (m_b / (1 - b1**t)) / (np.sqrt(v_b / (1 - b2**t)) + eps) + wd * big_b
        big_a, big_b = big_a - lr * step_a, big_b - lr * step_b
    tx = lro.scaled_adamw(lr, b1, b2, eps, weight_decay=wd, delta=delta,
                          normalize_grams=normalize_grams)
    lib_a, lib_b = _run_library(tx, params, loss, 5)
    np.testing.assert_allclose(lib_a, big_a, rtol=1e-9)
    np.testing.assert_allclose(lib_b, big_b, rtol=1e-9)


def test_first_order_change_of_product_is_sum_of_projections():
    _, _, _, loss, params = _problem(2)
    a, b = params["s"]["lora_a"], params["s"]["lora_b"]
    grads = jax.grad(loss)(params)
    g_w = np.asarray(jax.grad(lambda w: loss({"s": {"lora_a": jnp.eye(M), "lora_b": w}}))(a @ b))
    p_a = np.asarray(a @ jnp.linalg.pinv(a))
    p_b = np.asarray(jnp.linalg.pinv(b) @ b)
    tx = lro.scale_by_riemannian_precond(delta=0.0)
    for lr in (1e-3, 1e-4):
        u, _ = tx.update(grads, tx.init(params), params)
        new_w = (a - lr * u["s"]["lora_a"]) @ (b - lr * u["s"]["lora_b"])
        change = np.asarray(new_w - a @ b)
        first_order = -lr * (p_a @ g_w + g_w @ p_b)
        assert np.linalg.norm(change - first_order) < 10 * lr**2 * np.linalg.norm(g_w) ** 2


@settings(max_examples=8, deadline=None)
@given(r_matrix=gl_matrices(3, max_cond=20.0))
def test_scaled_gd_without_delta_is_exactly_invariant(r_matrix):
    cond = np.linalg.cond(r_matrix)
    residual = invariance_residual(lambda: lro.scaled_sgd(0.01, delta=0.0), r_matrix, steps=4)
    assert residual < 1e-12 * cond**2


@given(seed=st.integers(0, 1000))
@settings(max_examples=4, deadline=None)
def test_plain_adamw_fails_the_invariance_property(seed):
    residual = invariance_residual(lambda: optax.adamw(0.01), random_gl(seed, 3, 10.0), steps=4)
    assert residual > 1e-3


def test_scaled_adamw_is_not_invariant_but_close_to_it():
    r_matrix = random_gl(0, 3, 10.0)
    scaled = invariance_residual(lambda: lro.scaled_adamw(0.01, delta=0.0), r_matrix, steps=4)
    plain = invariance_residual(lambda: optax.adamw(0.01), r_matrix, steps=4)
    assert 0.0 < scaled < plain


@pytest.mark.parametrize("make", [
    lambda lr: optax.sgd(lr),
    lambda lr: optax.adamw(lr, weight_decay=0.1),
])
def test_loraplus_equals_two_learning_rates(make):
    ratio, lr = 8.0, 0.01
    _, _, _, loss, params = _problem(3)
    reference = optax.multi_transform(
        {"a": make(lr), "b": make(ratio * lr)}, {"s": {"lora_a": "a", "lora_b": "b"}})
    ours = lro.loraplus(make(lr), ratio)
    s_ref, s_ours, p_ref, p_ours = reference.init(params), ours.init(params), params, params
    for _ in range(3):
        u_ref, s_ref = reference.update(jax.grad(loss)(p_ref), s_ref, p_ref)
        u_ours, s_ours = ours.update(jax.grad(loss)(p_ours), s_ours, p_ours)
        p_ref, p_ours = optax.apply_updates(p_ref, u_ref), optax.apply_updates(p_ours, u_ours)
    chex.assert_trees_all_close(p_ours, p_ref, rtol=1e-10)


@pytest.mark.parametrize("base", [optax.adamw, lro.scaled_adamw], ids=["optax", "library"])
def test_loraplus_factory_under_inject_hyperparams(base):
    """The README's form: the learning rate lives in the injected state and drives both groups."""
    _, _, _, loss, params = _problem(3)
    injected = optax.inject_hyperparams(lro.loraplus)(base, 16.0, learning_rate=1e-3)
    direct = lro.loraplus(base(1e-3), 16.0)
    s_inj, s_dir, grads = injected.init(params), direct.init(params), jax.grad(loss)(params)
    u_inj, _ = injected.update(grads, s_inj, params)
    u_dir, _ = direct.update(grads, s_dir, params)
    chex.assert_trees_all_close(u_inj, u_dir, rtol=1e-10)
    s_inj.hyperparams["learning_rate"] = jnp.asarray(2e-3)
    doubled, _ = injected.update(grads, s_inj, params)
    chex.assert_trees_all_close(doubled, jax.tree.map(lambda u: 2 * u, u_dir), rtol=1e-6)


def test_loraplus_refuses_or_keeps_leaves_outside_pairs():
    params = {"s": {"lora_a": jnp.ones((4, 2)), "lora_b": jnp.ones((2, 3))}, "bias": jnp.ones(3)}
    with pytest.raises(ValueError, match=r"leaf at \[.bias.\] \(shape \(3,\)\) is not part of"):
        tx = lro.loraplus(optax.sgd(1.0), 4.0)
        tx.update(params, tx.init(params))
    tx = lro.loraplus(optax.sgd(1.0), 4.0, non_pair="keep")
    updates, _ = tx.update(params, tx.init(params))
    np.testing.assert_allclose(updates["bias"], -np.ones(3))
    np.testing.assert_allclose(updates["s"]["lora_b"], -4.0 * np.ones((2, 3)))
    np.testing.assert_allclose(updates["s"]["lora_a"], -np.ones((4, 2)))
    with pytest.raises(TypeError, match="factory"):
        lro.loraplus(optax.sgd(1.0), 4.0, learning_rate=1.0)


def test_loraplus_checks_the_pairs_at_init():
    """Bad factors are refused by ``init`` (``nnx.Optimizer`` construction), as by every pair
    method, not at the first step; the ``non_pair='keep'`` hint only where it would help."""
    tx = lro.loraplus(optax.adam(1e-3), 4.0)
    pair = {"lora_a": jnp.ones((4, 2)), "lora_b": jnp.ones((2, 3))}
    with pytest.raises(ValueError, match=r"(?s)\['bias'\] \(shape \(3,\)\) is not part of.*"
                       r"non_pair='keep'"):
        tx.init({"s": pair, "bias": jnp.ones(3)})
    bad = {"half": {"lora_a": jnp.ones((4, 2))},
           "rank": {"lora_a": jnp.ones((4, 5)), "lora_b": jnp.ones((5, 3))},
           "ints": {"lora_a": jnp.ones((4, 2), int), "lora_b": jnp.ones((2, 3), int)}}
    with pytest.raises(ValueError) as err:
        tx.init(bad)
    message = str(err.value)
    for expected in (r"unpaired LoRA factor at \['half'\]\['lora_a'\] \(shape \(4, 2\)\)",
                     r"\['rank'\]: a \(4, 5\), b \(5, 3\): rank r=5 exceeds",
                     r"\['ints'\].*non-float dtype"):
        assert re.search(expected, message), (expected, message)
    assert "non_pair" not in message
