"""Pair discovery, validation errors and batched mapping."""

from __future__ import annotations

import re

import chex
import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest
from flax import nnx

from lowrank_optax import LoRAPair, PairKeys, scaled_sgd
from lowrank_optax.pairs import PairTree, init_pairs, map_pairs

A = jnp.ones((5, 2))
B = jnp.ones((2, 3))


def test_finds_pairs_in_dicts_pairs_and_custom_keys():
    tree = {"x": {"lora_a": A, "lora_b": B}, "y": LoRAPair(A, B), "z": [{"lora_a": A, "lora_b": B}]}
    assert PairTree(tree).paths == ["['x']", "['y']", "['z'][0]"]
    custom = {"q": {"down": A, "up": B}}
    assert PairTree(custom, PairKeys(a="down", b="up")).num_pairs == 1


@pytest.mark.parametrize(
    ("tree", "message"),
    [
        ({"x": {"lora_a": A, "lora_b": B}, "bias": jnp.ones(3)},
         "leaf at ['bias'] (shape (3,)) is not part of a LoRA pair"),
        ({"x": {"lora_a": A, "lora_b": jnp.ones((3, 3))}}, "ranks differ (a has r=2, b has r=3)"),
        ({"x": {"lora_a": jnp.ones((4, 5, 2)), "lora_b": jnp.ones((3, 2, 3))}},
         "leading batch axes differ ((4,) vs (3,))"),
        ({"x": {"lora_a": jnp.ones((2, 4)), "lora_b": jnp.ones((4, 3))}},
         "rank r=4 exceeds min(m, n)=2"),
        # square and above the rank: PyTorch's orientation, or an adapter of too high a rank
        ({"x": {"lora_a": jnp.ones((2, 8)), "lora_b": jnp.ones((8, 2))}},
         "pass a.T and b.T (swap the last two axes). If they are not transposed, a rank above "
         "min(m, n) adds nothing"),
        ({"x": {"lora_a": jnp.ones((16, 4)), "lora_b": jnp.ones((4, 1))}},
         "exceeds min(m, n)=1. A rank above min(m, n) adds nothing a rank of min(m, n) cannot "
         "express; use a smaller rank for this layer, or route it to another optimizer with "
         "optax.partition"),
        ({"x": {"lora_a": jnp.ones((5, 2), jnp.int32), "lora_b": B}}, "non-float dtype int32"),
        ({"x": {"lora_a": jnp.ones(5), "lora_b": B}}, "at least 2 dimensions"),
        ({"x": {"lora_a": A, "lora_b": optax.MaskedNode()}}, "is split"),
    ],
)
def test_errors_name_path_and_shapes(tree, message):
    with pytest.raises(ValueError, match=re.escape(message)) as err:
        PairTree(tree)
    path = "['bias']" if "bias" in tree else "['x']"
    assert path in str(err.value), str(err.value)
    pair = tree["x"]
    if all(hasattr(pair[k], "shape") for k in ("lora_a", "lora_b")) and "bias" not in tree:
        shapes = f"a {pair['lora_a'].shape}, b {pair['lora_b'].shape}"
        assert shapes in str(err.value), str(err.value)


@pytest.mark.parametrize(("a_shape", "b_shape"), [((2, 8), (6, 2)), ((2, 8), (8, 2)),
                                              ((3, 2, 8), (3, 6, 2))])
def test_factors_in_pytorch_orientation_get_a_transpose_hint(a_shape, b_shape):
    tree = {"x": {"lora_a": jnp.ones(a_shape), "lora_b": jnp.ones(b_shape)}}
    with pytest.raises(ValueError, match=r"look transposed .* with r=2\).* pass a\.T and b\.T"):
        PairTree(tree)
    fixed = {"x": {"lora_a": jnp.swapaxes(tree["x"]["lora_a"], -1, -2),
                   "lora_b": jnp.swapaxes(tree["x"]["lora_b"], -1, -2)}}
    assert PairTree(fixed).pairs[0].a.shape[-2:] == (8, 2)


def test_other_wrong_pairs_get_no_transpose_hint():
    for a_shape, b_shape in [((5, 2), (3, 3)), ((2, 4), (4, 3))]:
        with pytest.raises(ValueError) as err:
            PairTree({"x": {"lora_a": jnp.ones(a_shape), "lora_b": jnp.ones(b_shape)}})
        assert "transposed" not in str(err.value)


def test_stray_leaves_named_like_factors_get_a_keys_hint():
    tree = {"q": {"lora_A": A, "lora_B": B}, "bias": jnp.ones(3)}
    with pytest.raises(ValueError) as err:
        PairTree(tree)
    message = str(err.value)
    assert "Leaves named 'lora_A', 'lora_B' look like LoRA factors" in message
    assert "(here perhaps PairKeys(a='lora_A', b='lora_B'))" in message
    assert "'bias'" not in message.split("Leaves named")[1]
    with pytest.raises(ValueError) as err:
        PairTree({"q": {"lora_a": A, "lora_b": B}, "bias": jnp.ones(3)})
    assert "look like LoRA factors" not in str(err.value)
    assert PairTree({"q": tree["q"]}, PairKeys(a="lora_A", b="lora_B")).num_pairs == 1


def test_update_without_params_is_a_clear_error():
    tx = scaled_sgd(0.1)
    params = {"x": {"lora_a": A, "lora_b": B}}
    with pytest.raises(ValueError, match="needs the current parameters"):
        tx.update(params, tx.init(params))


def test_updates_with_other_shapes_than_params_are_an_error():
    params = {"x": {"lora_a": A, "lora_b": B}}
    grads = {"x": {"lora_a": jnp.ones((6, 2)), "lora_b": B}}
    with pytest.raises(ValueError, match=re.escape("updates at ['x']: factor a has shape (6, 2)")):
        map_pairs(lambda g, p: g, grads, params)


def test_map_pairs_batches_same_shaped_pairs_and_leading_axes():
    calls = []

    def fn(g, p):
        calls.append(g.a.shape)
        return LoRAPair(g.a @ p.b @ p.b.T, p.a.T @ p.a @ g.b)

    rng = np.random.default_rng(0)
    tree = {f"l{i}": {"lora_a": jnp.asarray(rng.normal(size=(3, 5, 2))),
                      "lora_b": jnp.asarray(rng.normal(size=(3, 2, 4)))} for i in range(4)}
    out = map_pairs(fn, tree, tree)
    assert len(calls) == 1  # one traced call for all four stacked, vmapped pairs
    for name, site in tree.items():
        a, b = np.asarray(site["lora_a"]), np.asarray(site["lora_b"])
        np.testing.assert_allclose(out[name]["lora_a"], a @ b @ np.swapaxes(b, -1, -2), rtol=1e-5)
        np.testing.assert_allclose(out[name]["lora_b"], np.swapaxes(a, -1, -2) @ a @ b, rtol=1e-5)


def test_map_pairs_casts_back_and_keeps_state_dtype():
    params = {"x": {"lora_a": A.astype(jnp.bfloat16), "lora_b": B.astype(jnp.bfloat16)}}
    state = init_pairs(lambda p: jnp.zeros((2, 2), jnp.float32), params)

    def fn(g, p, s):
        assert g.a.dtype == jnp.float32
        return g, s + gram(p.a)

    gram = lambda x: x.T @ x  # noqa: E731
    updates, new_state = map_pairs(fn, params, params, state)
    assert updates["x"]["lora_a"].dtype == jnp.bfloat16
    assert new_state["x"].dtype == jnp.float32
    np.testing.assert_allclose(new_state["x"], 5.0 * np.ones((2, 2)))


def test_masked_holes_pass_through_optax_partition():
    a = jnp.asarray(np.random.default_rng(0).normal(size=(5, 2)), jnp.float32)
    params = {"lora": {"lora_a": a, "lora_b": jnp.zeros((2, 3))}, "bias": jnp.ones(3)}
    tx = optax.partition(
        # The all-ones gradient is no gradient of a loss at b = 0 (∇a ≠ G bᵀ = 0): its ∇a δ⁻¹
        # step is 1e5, whose cross term the default clip would scale away. The paper's step:
        {"pair": scaled_sgd(0.1, cross_term_ratio=None), "other": optax.sgd(0.1)},
        {"lora": {"lora_a": "pair", "lora_b": "pair"}, "bias": "other"},
    )
    grads = jax.tree.map(jnp.ones_like, params)
    updates, _ = tx.update(grads, tx.init(params), params)
    np.testing.assert_allclose(updates["bias"], -0.1 * np.ones(3))
    np.testing.assert_allclose(updates["lora"]["lora_b"], -0.1 * np.linalg.solve(
        np.asarray(a.T @ a) + 1e-6 * np.eye(2), np.ones((2, 3))), rtol=1e-5)


def test_nnx_state_with_variables_at_init_and_stats_probe_gets_zero_update():
    layer = nnx.LoRA(4, 2, 3, rngs=nnx.Rngs(0))
    state = nnx.state(layer, nnx.LoRAParam)
    tree = PairTree(state)
    assert tree.num_pairs == 1 and tree.pairs[0].a.shape == (4, 2)

    probe = {"lora_a": A, "lora_b": B, "lora_stats": {"row": jnp.zeros(5), "col": jnp.zeros(3)}}
    grads = jax.tree.map(jnp.ones_like, probe)
    seen = []

    def fn(g, p):
        seen.append(jax.tree.map(jnp.shape, g.stats))
        return LoRAPair(g.a, g.b)

    out = map_pairs(fn, grads, probe)
    assert seen == [{"row": (5,), "col": (3,)}]
    zeros = jax.tree.map(jnp.zeros_like, probe["lora_stats"])
    chex.assert_trees_all_close(out["lora_stats"], zeros)
