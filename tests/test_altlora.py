"""AltLoRA / AltLoRA+ against a float64 NumPy transcription of Algorithm 1 (Theorem 2 transport)
and of the official AltLoRA+ rule, the projection geometry of eq. (9), GL(r) invariance, the
active-factor helper and zero-initialised starts."""

from __future__ import annotations

import chex
import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest
from hypothesis import given, settings
from invariance import gl_matrices, invariance_residual, random_gl
from problems import factorization_loss, factorization_target, lora_params, train

from lowrank_optax.altlora import altlora, altlora_active, altlora_plus, scale_by_altlora

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


def _transcribe(big_a, big_b, full_grad, steps, lr, *, b1=0.9, wd=0.0, s=1.0, delta=0.0,
                order="b_first", plus=False, b2=0.999, eps=1e-8, joint=False, normalize=True):
    """Algorithm 1 in paper notation (Theorem 2 transport); AltLoRA+ as the official code with
    both moments Adam-bias-corrected by the factor's own update count and, with ``normalize``
    (the library default), each preconditioned gradient times the mean eigenvalue of the Gram
    it inverts and the transported moment times the ratio of that to the anchor's; there each
    Gram is regularised by max(δ, 10⁻²·tr(Gram)/r)."""
    eye = np.eye(R)
    relative = 1e-2 if plus and normalize else 0.0

    def damped(gram):
        return gram + max(delta, relative * np.trace(gram) / R) * eye

    def scales(gram, anchor_gram):
        if not (plus and normalize):
            return 1.0, 1.0
        s_now, s_anchor = np.trace(damped(gram)) / R, np.trace(damped(anchor_gram)) / R
        return s_now, (s_now / s_anchor if s_anchor > 0 else 0.0)

    m_a, m_b = np.zeros_like(big_a), np.zeros_like(big_b)
    v_a, v_b = np.zeros_like(big_a), np.zeros_like(big_b)
    b_prev, a_prev = np.zeros_like(big_b), np.zeros_like(big_a)
    count_a = count_b = 0
    for t in range(steps):
        g = full_grad(s * big_b @ big_a)
        grad_a, grad_b = s * big_b.T @ g, s * g @ big_a.T
        a_turn = (t % 2 == 0) == (order == "a_first")
        new_a = big_a
        if joint or a_turn:
            count_a += 1
            p_a = np.linalg.inv(damped(big_b.T @ big_b))
            pre, moment = scales(big_b.T @ big_b, b_prev.T @ b_prev)
            g_t = pre * p_a @ grad_a / s**2
            transported = moment * p_a @ big_b.T @ b_prev @ m_a
            aligned = b1 * transported + (1 - b1) * g_t
            if plus:
                v_a = b2 * v_a + (1 - b2) * g_t**2
                direction = (aligned / (1 - b1**count_a)) / (
                    np.sqrt(v_a / (1 - b2**count_a)) + eps)
                m_a = b1 * m_a + (1 - b1) * g_t
            else:
                direction = m_a = aligned
            new_a = big_a - lr * (direction + wd * big_a)
            b_prev = big_b
        if joint or not a_turn:
            count_b += 1
            p_b = np.linalg.inv(damped(new_a @ new_a.T))
            pre, moment = scales(new_a @ new_a.T, a_prev @ a_prev.T)
            g_t = pre * grad_b @ p_b / s**2
            transported = moment * m_b @ a_prev @ new_a.T @ p_b
            aligned = b1 * transported + (1 - b1) * g_t
            if plus:
                v_b = b2 * v_b + (1 - b2) * g_t**2
                direction = (aligned / (1 - b1**count_b)) / (
                    np.sqrt(v_b / (1 - b2**count_b)) + eps)
                m_b = b1 * m_b + (1 - b1) * g_t
            else:
                direction = m_b = aligned
            big_b = big_b - lr * (direction + wd * big_b)
            a_prev = new_a
        big_a = new_a
    return big_a, big_b


def _run_library(tx, big_a, big_b, loss, steps):
    params = {"s": {"lora_a": jnp.asarray(big_a.T), "lora_b": jnp.asarray(big_b.T)}}
    state = tx.init(params)
    for _ in range(steps):
        updates, state = tx.update(jax.grad(loss)(params), state, params)
        params = optax.apply_updates(params, updates)
    return np.asarray(params["s"]["lora_a"]).T, np.asarray(params["s"]["lora_b"]).T


CASES = {
    "b_first": dict(),
    "a_first_wd_scale": dict(order="a_first", wd=0.1, s=2.0),
    "delta": dict(delta=1e-2),
    "plus": dict(plus=True),
    "plus_a_first_scale": dict(plus=True, order="a_first", s=2.0, wd=0.05),
    "joint": dict(joint=True),
    "plus_joint": dict(plus=True, joint=True, s=0.5),
    "plus_paper": dict(plus=True, normalize=False),
    "plus_joint_paper_delta": dict(plus=True, joint=True, normalize=False, delta=1e-2),
    "plus_joint_delta": dict(plus=True, joint=True, delta=1e-2),
}


@pytest.mark.parametrize("case", CASES, ids=str)
def test_matches_algorithm_1_transcription(case):
    kw = CASES[case]
    lr, steps = 0.02, 9
    big_a, big_b, full_grad, loss = _problem()
    expected = _transcribe(big_a, big_b, full_grad, steps, lr, **kw)
    s = kw.get("s", 1.0)
    factory = altlora_plus if kw.get("plus") else altlora
    extra = {"normalize_grams": kw.get("normalize", True)} if kw.get("plus") else {}
    tx = factory(lr, weight_decay=kw.get("wd", 0.0), order=kw.get("order", "b_first"), scale=s,
                 delta=kw.get("delta", 0.0), joint=kw.get("joint", False), **extra)
    got = _run_library(tx, big_a, big_b, lambda p: loss(p, s), steps)
    np.testing.assert_allclose(got[0], expected[0], rtol=1e-9, atol=1e-11)
    np.testing.assert_allclose(got[1], expected[1], rtol=1e-9, atol=1e-11)
    assert not np.allclose(expected[0], big_a) and not np.allclose(expected[1], big_b)


def _official_code(big_a, big_b, full_grad, steps, lr, *, b1=0.9, wd=0.0, reg=1e-5, s=1.0,
                   plus=False, b2=0.999, eps=1e-8):
    """The official AltLoRA code's default step (``alt=False``), as REFERENCE_CODE_NOTES §4a/4b
    describe ``optimizer_new.py``: both factors from one backward pass, A first, B with the
    updated A; ``inverse(Gram + reg I)``, no 1/s², momentum divided by 1 − β1ᵗ (global step),
    AltLoRA+'s v uncorrected, weight decay after the step on the updated factor."""
    eye = np.eye(R)
    m_a, m_b = np.zeros_like(big_a), np.zeros_like(big_b)
    v_a, v_b = np.zeros_like(big_a), np.zeros_like(big_b)
    b_old, a_old = np.zeros_like(big_b), np.zeros_like(big_a)
    for t in range(1, steps + 1):
        g = full_grad(s * big_b @ big_a)
        grad_a, grad_b = s * big_b.T @ g, s * g @ big_a.T
        p_a = np.linalg.inv(big_b.T @ big_b + reg * eye)
        t_a, g_a = p_a @ big_b.T @ b_old, p_a @ grad_a
        if plus:
            v_a = b2 * v_a + (1 - b2) * g_a**2
            num = b1 * t_a @ m_a + (1 - b1) * g_a
            big_a = big_a - lr / (1 - b1**t) * num / (np.sqrt(v_a) + eps)
            m_a = b1 * m_a + (1 - b1) * g_a
        else:
            m_a = b1 * t_a @ m_a + (1 - b1) * g_a
            big_a = big_a - lr / (1 - b1**t) * m_a
        big_a = big_a - lr * wd * big_a
        b_old = big_b
        p_b = np.linalg.inv(big_a @ big_a.T + reg * eye)
        t_b, g_b = a_old @ big_a.T @ p_b, grad_b @ p_b
        if plus:
            v_b = b2 * v_b + (1 - b2) * g_b**2
            num = b1 * m_b @ t_b + (1 - b1) * g_b
            big_b = big_b - lr / (1 - b1**t) * num / (np.sqrt(v_b) + eps)
            m_b = b1 * m_b + (1 - b1) * g_b
        else:
            m_b = b1 * m_b @ t_b + (1 - b1) * g_b
            big_b = big_b - lr / (1 - b1**t) * m_b
        big_b = big_b - lr * wd * big_b
        a_old = big_a
    return big_a, big_b


@pytest.mark.parametrize("plus", [False, True], ids=["altlora", "altlora_plus"])
def test_reference_code_mode_matches_the_official_code(plus):
    lr, steps, s = 0.01, 7, 2.0
    big_a, big_b, full_grad, loss = _problem(2)
    kw = dict(b1=0.9, wd=0.1, s=s, plus=plus, eps=1e-4)
    expected = _official_code(big_a, big_b, full_grad, steps, lr, **kw)
    factory = altlora_plus if plus else altlora
    extra = {"eps": 1e-4} if plus else {}
    tx = factory(lr, weight_decay=0.1, delta=1e-5, scale=1.0, joint=True, reference_code=True,
                 **extra)
    got = _run_library(tx, big_a, big_b, lambda p: loss(p, s), steps)
    np.testing.assert_allclose(got[0], expected[0], rtol=1e-9, atol=1e-11)
    np.testing.assert_allclose(got[1], expected[1], rtol=1e-9, atol=1e-11)
    plain = _run_library(factory(lr, weight_decay=0.1, delta=1e-5, joint=True, **extra),
                         big_a, big_b, lambda p: loss(p, s), steps)
    assert np.abs(plain[1] - expected[1]).max() > 1e-6  # the mode is not a no-op


def test_reference_code_mode_needs_joint():
    with pytest.raises(ValueError, match="joint=True"):
        altlora(0.1, reference_code=True)


def test_momentum_transport_is_theorem_2_not_the_identity():
    """Algorithm 1 read literally (identity transport of M^B) gives different iterates."""
    lr, steps = 0.05, 8
    big_a, big_b, full_grad, loss = _problem(1)
    got = _run_library(altlora(lr, delta=0.0), big_a, big_b, lambda p: loss(p, 1.0), steps)
    b, m_b = big_b, None
    a = big_a
    m_a = np.zeros_like(a)
    m_b = np.zeros_like(b)
    b_prev = np.zeros_like(b)
    for t in range(steps):  # literal Alg. 1: M̃^B = M^B (A_{t+1} = A_t on B-steps)
        g = full_grad(b @ a)
        if t % 2 == 1:
            p_a = np.linalg.inv(b.T @ b)
            m_a = 0.9 * p_a @ b.T @ b_prev @ m_a + 0.1 * p_a @ b.T @ g
            a, b_prev = a - lr * m_a, b
        else:
            m_b = 0.9 * m_b + 0.1 * g @ a.T @ np.linalg.inv(a @ a.T)
            b = b - lr * m_b
    assert np.linalg.norm(got[0] - a) > 1e-6


@pytest.mark.parametrize("order", ["a_first", "b_first"])
def test_single_step_changes_w_by_minus_lr_projection_eq_9(order):
    """b1 = 0: an a-step moves s·a b by −lr·G P_row(b) (Proj_c(B) G in paper notation), a
    b-step by −lr·P_col(a) G; the inactive factor does not move."""
    lr, s = 0.1, 2.0
    big_a, big_b, full_grad, loss = _problem(2)
    a, b = big_a.T, big_b.T
    params = {"s": {"lora_a": jnp.asarray(a), "lora_b": jnp.asarray(b)}}
    tx = altlora(lr, b1=0.0, order=order, scale=s, delta=0.0)
    grads = jax.grad(lambda p: loss(p, s))(params)
    updates, _ = tx.update(grads, tx.init(params), params)
    new = optax.apply_updates(params, updates)
    delta_w = s * (np.asarray(new["s"]["lora_a"]) @ np.asarray(new["s"]["lora_b"]) - a @ b)
    g = full_grad(s * big_b @ big_a).T  # library orientation, m×n
    if order == "a_first":
        expected = -lr * g @ b.T @ np.linalg.solve(b @ b.T, b)
        assert np.all(np.asarray(updates["s"]["lora_b"]) == 0)
    else:
        expected = -lr * a @ np.linalg.solve(a.T @ a, a.T) @ g
        assert np.all(np.asarray(updates["s"]["lora_a"]) == 0)
    np.testing.assert_allclose(delta_w, expected, rtol=1e-10, atol=1e-12)


@settings(max_examples=8, deadline=None)
@given(gl_matrices(3, max_cond=20.0))
def test_altlora_with_momentum_is_gl_invariant(r_matrix):
    residual = invariance_residual(lambda: altlora(0.02, weight_decay=0.05, delta=0.0), r_matrix,
                                   steps=6)
    assert residual < 1e-9 * np.linalg.cond(r_matrix)


def test_joint_mode_is_gl_invariant():
    residual = invariance_residual(lambda: altlora(0.02, joint=True, delta=0.0),
                                   random_gl(2, 3, 10.0), steps=6)
    assert residual < 1e-9


@pytest.mark.parametrize("seed", [0, 1])
def test_altlora_plus_is_not_gl_invariant(seed):
    r_matrix = random_gl(seed, 3, 10.0)
    residual = invariance_residual(lambda: altlora_plus(0.02, delta=0.0), r_matrix, steps=6)
    assert 1e-4 < residual < 1.0


def test_inactive_factor_gets_exactly_zero_and_helper_agrees():
    params = lora_params(zero_b=False)
    loss = factorization_loss(factorization_target())
    for order, pattern in (("b_first", "ba" * 3), ("a_first", "ab" * 3)):
        tx = optax.MultiSteps(altlora(0.1, order=order), every_k_schedule=1)
        state = tx.init(params)
        p = params
        for expected in pattern:
            active = altlora_active(state)
            assert (bool(active.a), bool(active.b)) == (expected == "a", expected == "b")
            updates, state = tx.update(jax.grad(loss)(p), state, p)
            frozen = "lora_b" if expected == "a" else "lora_a"
            assert np.all(np.asarray(updates["layer"][frozen]) == 0)
            p = optax.apply_updates(p, updates)
    joint = altlora(0.1, joint=True)
    active = altlora_active(joint.init(params))
    assert bool(active.a) and bool(active.b)


@pytest.mark.parametrize("second_moment", [False, True])
def test_alternating_update_works_only_on_the_active_factor(second_moment):
    """Under ``jit`` the step parity is traced. The update must still not stack the leaves its
    half-step does not read nor materialise the inactive factor's step: its temporary memory
    equals that of the same update compiled with the parity a constant (XLA then drops the
    conditional). A conditional per pair needed every leaf stacked: 2.5× this memory, which on
    XLA:CPU crossed glibc's mmap threshold at 24 GPT-2 layers (see docs/benchmarks.md)."""
    layers, m, n, r = 6, 256, 256, 8
    keys = jax.random.split(jax.random.key(0), 2 * layers)
    params = {f"h{i}": {"lora_a": 0.1 * jax.random.normal(keys[2 * i], (2, m, r)),
                        "lora_b": 0.1 * jax.random.normal(keys[2 * i + 1], (2, r, n))}
              for i in range(layers)}
    grads = jax.tree.map(lambda x: 0.01 * x, params)
    tx = scale_by_altlora(second_moment=second_moment)
    state = tx.init(params)
    schedule = np.asarray(state.schedule)

    def with_parity(count):
        return lambda g, s, p: tx.update(g, s._replace(count=count, schedule=schedule), p)

    def temp_bytes(update):
        compiled = jax.jit(update).lower(grads, state, params).compile()
        return compiled.memory_analysis().temp_size_in_bytes

    assert "cond[" in str(jax.make_jaxpr(tx.update)(grads, state, params))
    constant_parity = max(temp_bytes(with_parity(np.int32(c))) for c in (0, 1))
    assert temp_bytes(tx.update) <= 1.25 * constant_parity


def test_stop_gradient_on_inactive_factor_changes_nothing():
    loss = factorization_loss(factorization_target())
    tx = altlora(0.1)

    def masked_loss(p, active):
        site = p["layer"]
        a = jnp.where(active.a, site["lora_a"], jax.lax.stop_gradient(site["lora_a"]))
        b = jnp.where(active.b, site["lora_b"], jax.lax.stop_gradient(site["lora_b"]))
        return loss({"layer": {"lora_a": a, "lora_b": b}, "pair": p["pair"]})

    results = []
    for use_mask in (False, True):
        p = lora_params()
        state = tx.init(p)
        for _ in range(6):
            grads = (jax.grad(masked_loss)(p, altlora_active(state)) if use_mask
                     else jax.grad(loss)(p))
            updates, state = tx.update(grads, state, p)
            p = optax.apply_updates(p, updates)
        results.append(p)
    chex.assert_trees_all_close(results[0], results[1], rtol=1e-12, atol=1e-14)


@pytest.mark.parametrize("kwargs", [dict(order="a_first"), dict(joint=True), dict(delta=1e-5)],
                         ids=str)
@pytest.mark.parametrize("factory", [altlora, altlora_plus], ids=lambda f: f.__name__)
def test_zero_init_200_steps_finite_and_descending(factory, kwargs):
    with jax.enable_x64(False):
        loss = factorization_loss(factorization_target())
        params, history = jax.jit(
            lambda p: train(factory(0.05, **kwargs), p, loss, 200))(lora_params(zero_b=True))
        assert np.all(np.isfinite(history))
        chex.assert_tree_all_finite(params)
        assert history[-1] < 0.1 * history[0]


def test_a_first_from_zero_b_cannot_move_on_its_first_step():
    """Paper Table 5's explanation: at b = 0 the a-step is 0·δ⁻¹ = 0."""
    params = lora_params(zero_b=True)
    loss = factorization_loss(factorization_target())
    tx = altlora(0.1, order="a_first")
    updates, _ = tx.update(jax.grad(loss)(params), tx.init(params), params)
    for leaf in jax.tree.leaves(updates):
        assert np.all(np.asarray(leaf) == 0)


def test_argument_errors():
    with pytest.raises(ValueError, match="order"):
        altlora(0.1, order="both")
    with pytest.raises(ValueError, match="learning_rate"):
        scale_by_altlora(joint=True)
    with pytest.raises(ValueError, match="ScaleByAltLoRAState"):
        altlora_active(optax.sgd(0.1).init({"x": jnp.zeros(2)}))
