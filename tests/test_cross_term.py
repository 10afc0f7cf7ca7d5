"""``clip_cross_term``: against a dense float64 transcription, its invariances, and the hard
start it exists for (lora_rite and lracs from ``a`` of rank r − 2 and ``b`` of rank 1, in
float64, where the float32 suite of ``test_numerics.py`` does not reach).
"""

from __future__ import annotations

import chex
import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st
from problems import factorization_target

import lowrank_optax as lro
from lowrank_optax.cross_term import cross_term_scale


def _dense_scale(a, b, da, db, ratio):
    """``min(1, ρ‖a Δb + Δa b‖ / ‖Δa Δb‖)`` from the ``m×n`` products, in float64."""
    a, b, da, db = (np.asarray(x, np.float64) for x in (a, b, da, db))
    first = np.linalg.norm(a @ db + da @ b)
    cross = np.linalg.norm(da @ db)
    return 1.0 if cross <= ratio * first else ratio * first / cross


def _pair(seed, m, n, r, step_size):
    rng = np.random.default_rng(seed)
    a, b = rng.normal(size=(m, r)) / np.sqrt(m), rng.normal(size=(r, n))
    da, db = step_size * rng.normal(size=(m, r)), step_size * rng.normal(size=(r, n))
    return [x.astype(np.float32) for x in (a, b, da, db)]


def _clip(a, b, da, db, ratio=1.0):
    params = {"lora_a": jnp.asarray(a), "lora_b": jnp.asarray(b)}
    updates = {"lora_a": jnp.asarray(da), "lora_b": jnp.asarray(db)}
    tx = lro.clip_cross_term(ratio)
    return tx.update(updates, tx.init(params), params)[0]


@settings(max_examples=40, deadline=None)
@given(seed=st.integers(0, 2**31 - 1), shape=st.sampled_from([(8, 6, 2), (16, 12, 4), (5, 9, 5)]),
       step_size=st.sampled_from([1e-3, 0.3, 3.0, 100.0]), ratio=st.sampled_from([0.25, 1.0, 4.0]))
def test_matches_dense_float64_transcription(seed, shape, step_size, ratio):
    a, b, da, db = _pair(seed, *shape, step_size)
    out = _clip(a, b, da, db, ratio)
    t = _dense_scale(a, b, da, db, ratio)
    np.testing.assert_allclose(out["lora_a"], t * da, rtol=2e-5, atol=1e-30)
    np.testing.assert_allclose(out["lora_b"], t * db, rtol=2e-5, atol=1e-30)


def test_clipped_step_has_cross_term_exactly_ratio_times_first_order():
    a, b, da, db = _pair(1, 16, 12, 4, 30.0)
    out = _clip(a, b, da, db, 0.5)
    da, db = (np.asarray(out[k], np.float64) for k in ("lora_a", "lora_b"))
    first, cross = np.linalg.norm(a @ db + da @ b), np.linalg.norm(da @ db)
    assert _dense_scale(*_pair(1, 16, 12, 4, 30.0), 0.5) < 0.1  # the case clips hard
    np.testing.assert_allclose(cross, 0.5 * first, rtol=1e-5)


def test_gl_r_and_scale_invariant_and_finite_at_extreme_scales():
    a, b, da, db = _pair(2, 16, 12, 4, 10.0)
    t = float(cross_term_scale(lro.LoRAPair(da, db), lro.LoRAPair(a, b), 1.0))
    assert 0.0 < t < 1.0
    r = (np.random.default_rng(3).normal(size=(4, 4)) + 2 * np.eye(4)).astype(np.float32)
    r_inv = np.linalg.inv(r).astype(np.float32)
    moved = cross_term_scale(lro.LoRAPair(da @ r, r_inv @ db), lro.LoRAPair(a @ r, r_inv @ b), 1.0)
    np.testing.assert_allclose(moved, t, rtol=1e-4)
    for c in (1e-30, 1e-15, 1e15, 1e30):
        scaled = cross_term_scale(lro.LoRAPair(np.float32(c) * da, db / np.float32(c)),
                                  lro.LoRAPair(np.float32(c) * a, b / np.float32(c)), 1.0)
        np.testing.assert_allclose(scaled, t, rtol=1e-5, err_msg=f"scale {c}")


def test_zero_and_one_sided_steps_pass_unchanged():
    a, b, da, db = _pair(4, 8, 6, 2, 100.0)
    for step in ((da, np.zeros_like(db)), (np.zeros_like(da), db)):
        out = _clip(a, b, *step)
        np.testing.assert_array_equal(out["lora_a"], step[0])
        np.testing.assert_array_equal(out["lora_b"], step[1])
    zero = _clip(np.zeros_like(a), np.zeros_like(b), np.zeros_like(da), np.zeros_like(db))
    chex.assert_tree_all_finite(zero)


def test_each_layer_of_stacked_pairs_gets_its_own_scale_and_float16_stays_float16():
    pairs = [_pair(s, 8, 6, 2, size) for s, size in ((5, 1e-3), (6, 100.0), (7, 3.0))]
    stacked = [np.stack(x) for x in zip(*pairs)]
    out = _clip(*stacked)
    for i, (a, b, da, db) in enumerate(pairs):
        np.testing.assert_allclose(out["lora_a"][i], _dense_scale(a, b, da, db, 1.0) * da,
                                   rtol=2e-5)
    half = _clip(*(x.astype(np.float16) for x in pairs[1]))
    assert {x.dtype for x in jax.tree.leaves(half)} == {jnp.dtype(jnp.float16)}
    chex.assert_tree_all_finite(half)


def test_stray_leaves_are_refused_and_ratio_is_validated():
    a, b, da, db = _pair(8, 8, 6, 2, 100.0)
    params = {"layer": {"lora_a": a, "lora_b": b}, "bias": np.ones(3, np.float32)}
    with pytest.raises(ValueError, match=r"\['bias'\] \(shape \(3,\)\) is not part of a LoRA pair"):
        lro.clip_cross_term().init(params)
    for bad in (0.0, -1.0):
        with pytest.raises(ValueError, match="max_ratio"):
            lro.clip_cross_term(bad)
        with pytest.raises(ValueError, match="cross_term_ratio"):
            lro.scaled_sgd(0.1, cross_term_ratio=bad)


@pytest.mark.parametrize(("factory", "lr"), [(lro.scaled_sgd, 0.3), (lro.solora_sgd, 0.01),
                                             (lro.lora_rite, 0.03), (lro.lracs, 0.03)],
                         ids=lambda x: getattr(x, "__name__", str(x)))
def test_default_never_acts_on_a_converging_run(factory, lr):
    """On the battery's factorisation from ``b = 0`` (``problems.py``), every step of the
    paper's rule (``cross_term_ratio=None``) has a cross term below its first-order change, so
    the default clip leaves the run as it is."""
    start = {"lora_a": jax.random.normal(jax.random.key(2), (16, 4)) / 4,
             "lora_b": jnp.zeros((4, 12))}
    target = jnp.asarray(factorization_target(m=16, n=12, rank=4), jnp.float32)
    loss = lambda p: 0.5 * jnp.sum((p["lora_a"] @ p["lora_b"] - target) ** 2)  # noqa: E731
    tx = factory(lr, cross_term_ratio=None)

    def step(carry, _):
        p, s = carry
        u, s = tx.update(jax.grad(loss)(p), s, p)
        t = cross_term_scale(lro.LoRAPair(u["lora_a"], u["lora_b"]),
                             lro.LoRAPair(p["lora_a"], p["lora_b"]), 1.0)
        return (optax.apply_updates(p, u), s), t

    (final, _), scales = jax.jit(lambda p: jax.lax.scan(step, (p, tx.init(p)), None, 200))(start)
    assert float(loss(final)) < 1e-2 * float(loss(start))
    np.testing.assert_array_equal(scales, 1.0)


@pytest.mark.parametrize("factory", [lro.lora_rite, lro.lracs], ids=lambda f: f.__name__)
def test_float64_rank_deficient_start_converges(factory, cross_term_ratio=1.0):
    """``a`` of rank r − 2, ``b`` of rank 1 (``test_numerics.py``'s ``rank_both``), float64 from
    float32 draws: without the clip the loss went 14.6 → 1.0e6 (lora_rite) and 2.3e4 (lracs)."""
    k_a, k_b = jax.random.split(jax.random.key(3), 4)[:2]
    a = np.asarray(jax.random.normal(k_a, (16, 4))) / 4
    b = np.asarray(jax.random.normal(k_b, (4, 12)))
    a = a.copy()
    a[:, 2], a[:, 3] = a[:, 0], a[:, 1]
    b = np.outer(b[:, 0], b[0]) / np.sqrt(12)
    target = factorization_target(m=16, n=12, rank=4)
    with jax.enable_x64(True):
        start = {"lora_a": jnp.asarray(a, jnp.float64), "lora_b": jnp.asarray(b, jnp.float64)}
        loss = lambda p: 0.5 * jnp.sum((p["lora_a"] @ p["lora_b"] - target) ** 2)  # noqa: E731
        tx = factory(0.03, cross_term_ratio=cross_term_ratio)

        def step(carry, _):
            p, s = carry
            u, s = tx.update(jax.grad(loss)(p), s, p)
            p = optax.apply_updates(p, u)
            return (p, s), loss(p)

        history = np.asarray(jax.jit(
            lambda p: jax.lax.scan(step, (p, tx.init(p)), None, 100)[1])(start))
        initial = float(loss(start))
    assert np.all(np.isfinite(history))
    assert history.max() < 2 * initial and history[-1] < 0.1 * initial, (initial, history.max(),
                                                                         history[-1])
