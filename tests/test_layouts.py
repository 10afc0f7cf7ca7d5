"""Real-world pair layouts: prefixed factors beside other entries, multi-dimensional factors.

Every method sees these through the shared traversal (``lowrank_optax.pairs``); the checks here
compare each layout against the same pairs given in the library's 2-D / stacked layout, in
float64, so a misplaced axis shows as a mismatch, not as a crash.
"""

from __future__ import annotations

import re

import chex
import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest
from flax import nnx
from methods import BY_NAME, METHODS

import lowrank_optax as lro
from lowrank_optax.pairs import PairTree, init_pairs, map_pairs

D, N, H, L, R = 6, 2, 3, 3, 2


def _random(rng, shape):
    return jnp.asarray(rng.normal(size=shape) / np.sqrt(shape[0]))


def _layout_problem(rng):
    """One tree holding each pair four ways: einsum layouts, their flattened 2-D copies, a
    MaxText-style scanned pair (layer axis 1 in both factors) and its per-layer 2-D copies."""
    q_a, q_b = _random(rng, (D, R)), _random(rng, (R, N, H))           # 'BTD,DNH' (q_proj)
    o_a, o_b = _random(rng, (N, H, R)), _random(rng, (R, D))           # 'BTNH,NHD' (o_proj)
    s_a, s_b = _random(rng, (D, L, R)), _random(rng, (R, L, N, H))     # scanned q_proj
    return {
        "q": {"w": jnp.zeros((D, N, H)), "w_lora_a": q_a, "w_lora_b": q_b},
        "o": {"w_lora_a": o_a, "w_lora_b": o_b},
        "flat_q": {"lora_a": q_a, "lora_b": q_b.reshape(R, N * H)},
        "flat_o": {"lora_a": o_a.reshape(N * H, R), "lora_b": o_b},
        "scanned": {"kernel_lora_a": s_a, "kernel_lora_b": s_b},
        "layers": [{"lora_a": s_a[:, l], "lora_b": s_b[:, l].reshape(R, N * H)}
                   for l in range(L)],
    }


def _as_layouts(flat_grads, params):
    """Gradients of the einsum / scanned pairs derived from those of their 2-D copies."""
    g = dict(flat_grads)
    g["q"] = {"w_lora_a": g["flat_q"]["lora_a"],
              "w_lora_b": g["flat_q"]["lora_b"].reshape(R, N, H)}
    g["o"] = {"w_lora_a": g["flat_o"]["lora_a"].reshape(N, H, R), "w_lora_b": g["flat_o"]["lora_b"]}
    g["scanned"] = {
        "kernel_lora_a": jnp.stack([x["lora_a"] for x in g["layers"]], axis=1),
        "kernel_lora_b": jnp.stack([x["lora_b"].reshape(R, N, H) for x in g["layers"]], axis=1)}
    g["q"]["w"] = jnp.zeros_like(params["q"]["w"])
    return g


def _check_same(tree):
    np.testing.assert_allclose(tree["q"]["w_lora_a"], tree["flat_q"]["lora_a"], rtol=1e-9)
    np.testing.assert_allclose(tree["q"]["w_lora_b"].reshape(R, -1), tree["flat_q"]["lora_b"],
                               rtol=1e-9, atol=1e-12)
    np.testing.assert_allclose(tree["o"]["w_lora_a"].reshape(-1, R), tree["flat_o"]["lora_a"],
                               rtol=1e-9, atol=1e-12)
    np.testing.assert_allclose(tree["o"]["w_lora_b"], tree["flat_o"]["lora_b"], rtol=1e-9,
                               atol=1e-12)
    for l, layer in enumerate(tree["layers"]):
        np.testing.assert_allclose(tree["scanned"]["kernel_lora_a"][:, l], layer["lora_a"],
                                   rtol=1e-9, atol=1e-12)
        np.testing.assert_allclose(tree["scanned"]["kernel_lora_b"][:, l].reshape(R, -1),
                                   layer["lora_b"], rtol=1e-9, atol=1e-12)


SCANNED = lro.PairKeys(dims={"scanned": lro.PairDimensionNumbers(a_batch_axes=(1,),
                                                                 b_batch_axes=(1,))})


# The layout is handled once, in the shared traversal; these methods cover every kind of state
# it carries (optax moments in the params' shapes, m×n, (m+n)r, r×r, m+n vectors, global norms,
# alternation). tests/test_tunix.py trains every method on einsum layouts.
LAYOUT_METHODS = [BY_NAME[name] for name in (
    "scaled_adamw", "loraplus_adamw", "adams_low_memory", "lora_pro_adamw", "solora_adamw",
    "lora_rite_global_escape_cap", "altlora_plus", "lracs")]


@pytest.mark.parametrize("method", LAYOUT_METHODS, ids=str)
def test_einsum_and_scanned_pairs_update_like_their_2d_copies(method):
    """float64, three steps: einsum pairs equal their flattened 2-D copies, the scanned pair
    (explicit spec, layer axis 1) equals its per-layer pairs; the frozen ``w`` is masked."""
    with jax.enable_x64(True):
        rng = np.random.default_rng(0)
        params = _layout_problem(rng)
        labels = jax.tree_util.tree_map_with_path(
            lambda path, _: "frozen" if path[-1] == jax.tree_util.DictKey("w") else "pair",
            params)
        inner = method.factory(method.learning_rate, **method.kwargs, keys=SCANNED)
        tx = optax.partition({"pair": inner, "frozen": optax.set_to_zero()}, labels)
        flat_grads = jax.tree.map(lambda x: jnp.asarray(rng.normal(size=(3, *x.shape))), params)

        @jax.jit
        def run(params, flat_grads):
            def step(carry, flat):
                params, state = carry
                updates, state = tx.update(_as_layouts(flat, params), state, params)
                return (optax.apply_updates(params, updates), state), updates

            (params, _), updates = jax.lax.scan(step, (params, tx.init(params)), flat_grads)
            return params, updates

        params, updates = run(params, flat_grads)
        for k in range(3):
            _check_same(jax.tree.map(lambda x, k=k: x[k], updates))
        _check_same(params)
        assert float(optax.tree.norm(updates["flat_q"])) > 0   # not vacuous


def test_scanned_without_spec_and_ambiguous_layouts_are_clear_errors():
    scanned = {"s": {"kernel_lora_a": jnp.ones((D, L, R)), "kernel_lora_b": jnp.ones((R, L, N, H))}}
    with pytest.raises(ValueError, match=re.escape(
            "LoRA pair at ['s'] (kernel_lora_a/kernel_lora_b): a (6, 3, 2), b (2, 3, 2, 3): the "
            "layout is ambiguous")) as err:
        lro.scaled_adamw(1e-3).init(scanned)
    assert "a_batch_axes=(1,)" in str(err.value)
    # stacked (batch 2) and einsum (M = (2, 5), N = (2, 5)) readings both fit: the library's
    # stacked convention wins (fused slices stacked with as many slices as the rank)
    both = {"x": {"lora_a": jnp.ones((2, 5, 2)), "lora_b": jnp.ones((2, 2, 5))}}
    assert PairTree(both).pairs[0].a.shape == (2, 5, 2)
    einsum = lro.PairKeys(dims=lambda params: lro.PairDimensionNumbers())
    assert PairTree(both, einsum).pairs[0].a.shape == (10, 2)
    with pytest.raises(ValueError, match="no layout fits"):
        PairTree({"x": {"lora_a": jnp.ones((4, 2)), "lora_b": jnp.ones((3, 2, 5))}})
    with pytest.raises(ValueError, match=re.escape("ranks differ (a has r=2, b has r=3)")):
        PairTree({"x": {"lora_a": jnp.ones((D, L, 2)), "lora_b": jnp.ones((3, L, 4))}},
                 lro.PairKeys(dims=lro.PairDimensionNumbers(a_batch_axes=(1,),
                                                            b_batch_axes=(1,))))


def test_several_prefixed_pairs_in_one_mapping_and_their_state():
    """MaxText MoE style: ``wi_0_``, ``wi_1_``, ``wo_`` pairs beside frozen (masked) weights."""
    rng = np.random.default_rng(1)
    node = {"wi_0": optax.MaskedNode(), "wi_0_lora_a": _random(rng, (6, 2)),
            "wi_0_lora_b": _random(rng, (2, 5)), "wi_1_lora_a": _random(rng, (6, 2)),
            "wi_1_lora_b": _random(rng, (2, 5)), "wo_lora_a": _random(rng, (5, 2)),
            "wo_lora_b": _random(rng, (2, 6))}
    params = {"moe": node, "attn": {"lora_a": _random(rng, (6, 2)), "lora_b": _random(rng, (2, 6))}}
    state = init_pairs(lambda p: p.a.T @ p.a, params)
    assert set(state["moe"]) == {"wi_0_", "wi_1_", "wo_"} and state["attn"].shape == (2, 2)
    updates, new_state = map_pairs(lambda g, p, s: (g._replace(b=s @ g.b), s + 1.0),
                                   params, params, state)
    for prefix in ("wi_0_", "wi_1_", "wo_"):
        a, b = node[prefix + "lora_a"], node[prefix + "lora_b"]
        np.testing.assert_allclose(updates["moe"][prefix + "lora_b"], a.T @ a @ b, rtol=1e-5)
        np.testing.assert_allclose(new_state["moe"][prefix], a.T @ a + 1.0, rtol=1e-5)
    assert isinstance(updates["moe"]["wi_0"], optax.MaskedNode)


class _Hand(nnx.Module):
    """A hand-written LoRA layer: frozen kernel, trained bias, one pair."""

    def __init__(self, rngs):
        self.kernel = nnx.Param(jax.random.normal(rngs.params(), (8, 8)) / 3)
        self.bias = nnx.Param(jnp.zeros(8))
        self.lora_a = nnx.LoRAParam(jax.random.normal(rngs.params(), (8, 2)) / 3)
        self.lora_b = nnx.LoRAParam(jnp.zeros((2, 8)))

    def __call__(self, x):
        return x @ (self.kernel[...] + self.lora_a[...] @ self.lora_b[...]) + self.bias[...]


class _Net(nnx.Module):
    def __init__(self, rngs):
        self.hand = _Hand(rngs)
        self.flax_lora = nnx.LoRA(8, 2, 8, base_module=nnx.Linear(8, 8, rngs=rngs), rngs=rngs)
        self.head = nnx.Linear(8, 3, rngs=rngs)

    def __call__(self, x):
        return self.head(jax.nn.relu(self.flax_lora(jax.nn.relu(self.hand(x)))))


def lora_labels(params):
    """The docs' recipe (docs/tunix.md): factors by key suffix, everything else "rest"."""
    def label(path, _):
        names = [str(getattr(k, "key", "")) for k in path]
        return "lora" if any(n.endswith(("lora_a", "lora_b")) for n in names) else "rest"
    return jax.tree_util.tree_map_with_path(label, params)


@pytest.mark.parametrize("wrt", ["param", "lora_and_bias"])
def test_nnx_lora_and_hand_written_layer_train_with_the_partition_recipe(wrt):
    model = _Net(nnx.Rngs(0))
    if wrt == "param":
        trainable, rest = nnx.Param, optax.set_to_zero()
    else:
        trainable, rest = nnx.Any(nnx.LoRAParam, nnx.PathContains("bias")), optax.adam(1e-2)
    tx = optax.partition({"lora": lro.scaled_adamw(1e-2), "rest": rest}, lora_labels)
    optimizer = nnx.Optimizer(model, tx, wrt=trainable)
    x = jax.random.normal(jax.random.key(1), (32, 8))
    y = jax.random.randint(jax.random.key(2), (32,), 0, 3)
    reference = lro.scaled_adamw(1e-2)
    lora = lambda: nnx.to_pure_dict(nnx.state(model, nnx.LoRAParam))  # noqa: E731

    @nnx.jit
    def train_step(model, optimizer):
        def loss_fn(model):
            return optax.softmax_cross_entropy_with_integer_labels(model(x), y).mean()
        loss, grads = nnx.value_and_grad(loss_fn, argnums=nnx.DiffState(0, trainable))(model)
        optimizer.update(model, grads)
        return loss, grads

    kernel = model.hand.kernel[...]
    losses = []
    for step in range(20):
        before = lora()
        loss, grads = train_step(model, optimizer)
        losses.append(float(loss))
        if step == 0:   # the partitioned LoRA step is the pair optimizer's step on the pairs
            lora_grads = nnx.to_pure_dict(nnx.filter_state(grads, nnx.LoRAParam))
            expected, _ = reference.update(lora_grads, reference.init(before), before)
            moved = jax.tree.map(lambda n, o: n - o, lora(), before)
            chex.assert_trees_all_close(moved, expected, atol=1e-6)
    assert losses[-1] < losses[0] and np.isfinite(losses).all()
    assert (model.hand.kernel[...] == kernel).all()               # frozen either way
    biases_moved = bool((model.hand.bias[...] != 0).any())
    assert biases_moved == (wrt == "lora_and_bias")


def test_errors_name_every_stray_leaf_without_value_and_suggest_lora_param():
    model = _Hand(nnx.Rngs(0))
    params = nnx.state(model, nnx.Param)                 # kernel, bias and the pair
    params["extra"] = nnx.Param(jnp.ones((4,)))
    with pytest.raises(ValueError) as err:
        lro.scaled_adamw(1e-3).init(params)
    message = str(err.value)
    for path, shape in (("['bias']", "(8,)"), ("['kernel']", "(8, 8)"), ("['extra']", "(4,)")):
        assert f"params leaf at {path} (shape {shape}) is not part of a LoRA pair" in message
    assert ".value" not in message
    assert "wrt=nnx.LoRAParam" in message and "optax.partition" in message
    plain = {"x": {"lora_a": jnp.ones((4, 2)), "lora_b": jnp.ones((2, 3)), "w": jnp.ones(3)}}
    with pytest.raises(ValueError, match=re.escape("leaf at ['x']['w'] (shape (3,))")) as err:
        lro.adams(1e-3).init(plain)
    assert "nnx" not in str(err.value)


def test_unpaired_factor_is_an_error_naming_it():
    params = {"x": {"kernel_lora_a": jnp.ones((4, 2)), "kernel_lora_b": jnp.ones((2, 3)),
                    "w_lora_a": jnp.ones((4, 2))}}
    with pytest.raises(ValueError, match=re.escape(
            "unpaired LoRA factor at ['x']['w_lora_a'] (shape (4, 2)): no 'w_lora_b' beside it")):
        PairTree(params)


@pytest.mark.parametrize("method", METHODS, ids=str)
def test_state_shares_no_buffer_so_trainers_can_donate_it(method):
    """PeftTrainer donates the optimizer state: no two state leaves may share a buffer, nor a
    state leaf with the params (adams' robust start once returned ``(zeros, zeros)``)."""
    params = {"q": {"w_lora_a": jnp.ones((6, 2)), "w_lora_b": jnp.zeros((2, 2, 3))},
              "o": {"lora_a": jnp.ones((6, 2)), "lora_b": jnp.zeros((2, 6))}}
    state = optax.inject_hyperparams(method.factory)(method.learning_rate, **method.kwargs) \
        .init(params)
    buffers = [x.unsafe_buffer_pointer() for x in jax.tree.leaves((state, params))
               if isinstance(x, jax.Array)]
    assert len(buffers) == len(set(buffers))
