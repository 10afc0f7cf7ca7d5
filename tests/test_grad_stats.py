"""The full-gradient statistics channel: exact statistics of G = ∂L/∂W from the backward pass."""

from __future__ import annotations

import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest
from flax import nnx

from lowrank_optax.grad_stats import (
    gradient_statistics,
    lora_matmul_with_stats,
    probe_fields,
    stats_probe,
)
from lowrank_optax.solora import solora_sgd


@pytest.fixture
def x64():
    with jax.enable_x64(True):
        yield


def _layer_problem(seed=0, tokens=(3, 5), m=7, n=6, r=2):
    rng = np.random.default_rng(seed)
    return dict(
        x=jnp.asarray(rng.normal(size=(*tokens, m))),
        w0=jnp.asarray(rng.normal(size=(m, n)) / np.sqrt(m)),
        a=jnp.asarray(rng.normal(size=(m, r))),
        b=jnp.asarray(rng.normal(size=(r, n))),
        target=jnp.asarray(rng.normal(size=(*tokens, n))),
    )


def _reference_loss(w, x, target):
    return jnp.sum(jnp.sin(x @ w) * target)


def _explicit_g(prob, scale):
    w = prob["w0"] + scale * prob["a"] @ prob["b"]
    return np.asarray(jax.grad(_reference_loss)(w, prob["x"], prob["target"]))


@pytest.mark.parametrize("method", ["dense", "gram", "auto"])
def test_gradient_statistics_match_explicit_g(x64, method):
    rng = np.random.default_rng(1)
    x, d = rng.normal(size=(4, 3, 9)), rng.normal(size=(4, 3, 5))
    g = np.einsum("btm,btn->mn", x, d)
    stats = gradient_statistics(jnp.asarray(x), jnp.asarray(d), method=method)
    np.testing.assert_allclose(stats["row"], (g * g).sum(1), rtol=1e-12)
    np.testing.assert_allclose(stats["col"], (g * g).sum(0), rtol=1e-12)
    full = gradient_statistics(jnp.asarray(x), jnp.asarray(d), full_gradient=True, method=method)
    np.testing.assert_allclose(full["grad"], g, rtol=1e-12)


@pytest.mark.parametrize("method", ["dense", "gram"])
@pytest.mark.parametrize("full_gradient", [False, True])
def test_custom_vjp_gives_exact_stats_and_ordinary_gradients(x64, method, full_gradient):
    prob, scale = _layer_problem(), 0.7
    probe = jax.tree.map(lambda p: p.astype(jnp.float64),
                         stats_probe(7, 6, full_gradient=full_gradient))

    def loss(w0, a, b, scale, probe):
        y = lora_matmul_with_stats(prob["x"], w0, a, b, scale, probe, method=method)
        return jnp.sum(jnp.sin(y) * prob["target"])

    def reference(w0, a, b, scale):
        return _reference_loss(w0 + scale * a @ b, prob["x"], prob["target"])

    args = (prob["w0"], prob["a"], prob["b"], jnp.asarray(scale))
    got = jax.grad(loss, argnums=(0, 1, 2, 3, 4))(*args, probe)
    want = jax.grad(reference, argnums=(0, 1, 2, 3))(*args)
    for g, w in zip(got[:4], want):
        np.testing.assert_allclose(g, w, rtol=1e-11, atol=1e-12)
    big_g = _explicit_g(prob, scale)
    row, col, full = probe_fields(got[4])
    np.testing.assert_allclose(row, (big_g**2).sum(1), rtol=1e-11)
    np.testing.assert_allclose(col, (big_g**2).sum(0), rtol=1e-11)
    if full_gradient:
        np.testing.assert_allclose(full, big_g, rtol=1e-11)
    else:
        assert full is None
    assert float(loss(*args, probe)) == pytest.approx(float(reference(*args)), rel=1e-12)


def test_lora_input_for_dropout_uses_undropped_input_for_g(x64):
    prob = _layer_problem(2)
    dropped = prob["x"] * (np.random.default_rng(3).uniform(size=prob["x"].shape) > 0.5) * 2.0
    probe = jax.tree.map(lambda p: p.astype(jnp.float64), stats_probe(7, 6))

    def loss(w0, a, b, probe):
        y = lora_matmul_with_stats(prob["x"], w0, a, b, 1.0, probe, lora_input=dropped)
        return jnp.sum(y * prob["target"])

    grads = jax.grad(loss, argnums=(0, 1, 3))(prob["w0"], prob["a"], prob["b"], probe)
    big_g = np.einsum("stm,stn->mn", prob["x"], prob["target"])
    np.testing.assert_allclose(grads[0], big_g, rtol=1e-12)
    np.testing.assert_allclose(grads[1], np.einsum("stm,stn->mn", dropped, prob["target"])
                               @ np.asarray(prob["b"]).T, rtol=1e-12)
    np.testing.assert_allclose(grads[2]["row"], (big_g**2).sum(1), rtol=1e-12)


def _bound_shapes(jaxpr_text: str) -> list[str]:
    """The types of every variable bound by an equation (left of `` = ``) in a printed jaxpr."""
    return [part for line in jaxpr_text.splitlines() if " = " in line
            for part in line.split(" = ", 1)[0].split()]


def test_gram_route_never_forms_g_and_w0_cotangent_is_skipped():
    m, n = 40, 30
    prob = _layer_problem(tokens=(2, 3), m=m, n=n)
    prob = jax.tree.map(lambda v: v.astype(jnp.float32), prob)
    probe = stats_probe(m, n)

    def loss(a, b, probe, method):
        y = lora_matmul_with_stats(prob["x"], prob["w0"], a, b, 1.0, probe, method=method)
        return jnp.sum(y * prob["target"])

    grad_fn = jax.grad(loss, argnums=(0, 1, 2))
    bound = {
        method: " ".join(_bound_shapes(str(jax.make_jaxpr(grad_fn, static_argnums=3)(
            prob["a"], prob["b"], probe, method))))
        for method in ("gram", "dense")
    }
    assert f"f32[{m},{n}]" not in bound["gram"]
    assert f"f32[{m},{n}]" in bound["dense"]  # the check can fail: the dense route forms G


def test_probe_memory_is_small_compared_with_differentiating_w0():
    layers, d, r, tokens = 4, 256, 4, 32
    keys = jax.random.split(jax.random.key(0), 3 * layers + 1)
    w0 = [jax.random.normal(keys[i], (d, d)) / d**0.5 for i in range(layers)]
    a = [jax.random.normal(keys[layers + i], (d, r)) / d**0.5 for i in range(layers)]
    b = [jax.random.normal(keys[2 * layers + i], (r, d)) for i in range(layers)]
    x = jax.random.normal(keys[-1], (tokens, d))
    probe = [stats_probe(d, d) for _ in range(layers)]

    def plain(w0, a, b):
        h = x
        for i in range(layers):
            h = jnp.tanh(h @ w0[i] + (h @ a[i]) @ b[i])
        return jnp.sum(h**2)

    def probed(w0, a, b, probe):
        h = x
        for i in range(layers):
            h = jnp.tanh(lora_matmul_with_stats(h, w0[i], a[i], b[i], 1.0, probe[i]))
        return jnp.sum(h**2)

    def footprint(f, *args):
        mem = jax.jit(f).lower(*args).compile().memory_analysis()
        if mem is None:
            pytest.skip("no compiled memory analysis on this backend")
        return mem.output_size_in_bytes + mem.temp_size_in_bytes

    with_w0 = footprint(jax.grad(plain, argnums=(0, 1, 2)), w0, a, b)
    with_probe = footprint(jax.grad(probed, argnums=(1, 2, 3)), w0, a, b, probe)
    parameter_bytes = layers * d * d * 4
    assert with_w0 - with_probe > 0.75 * parameter_bytes, (with_w0, with_probe)


class _StatsLoRALinear(nnx.Module):
    """A minimal LoRA layer with a statistics probe, the hook the library's LoRA module needs."""

    def __init__(self, m: int, n: int, r: int, *, rngs: nnx.Rngs, scale: float = 2.0):
        self.kernel = nnx.Param(jax.random.normal(rngs.params(), (m, n)) / np.sqrt(m))
        self.lora_a = nnx.LoRAParam(jax.random.normal(rngs.params(), (m, r)) / np.sqrt(m))
        self.lora_b = nnx.LoRAParam(jnp.zeros((r, n)))
        self.lora_stats = nnx.LoRAParam(stats_probe(m, n))
        self.scale = scale

    def __call__(self, x):
        return lora_matmul_with_stats(x, self.kernel[...], self.lora_a[...], self.lora_b[...],
                                      self.scale, self.lora_stats.get_value())


class _TwoLayers(nnx.Module):
    def __init__(self, rngs: nnx.Rngs):
        self.first = _StatsLoRALinear(6, 5, 2, rngs=rngs)
        self.second = _StatsLoRALinear(5, 3, 2, rngs=rngs)

    def __call__(self, x):
        return self.second(jnp.tanh(self.first(x)))


def test_nnx_layer_end_to_end_with_optimizer():
    model = _TwoLayers(nnx.Rngs(0))
    x = jax.random.normal(jax.random.key(1), (4, 8, 6))
    y = jax.random.normal(jax.random.key(2), (4, 8, 3))
    loss_fn = lambda m: jnp.mean((m(x) - y) ** 2)  # noqa: E731

    # The probe's gradient is rowsum/colsum of G⊙G, G the gradient of the merged kernel.
    grads = nnx.grad(loss_fn, argnums=nnx.DiffState(0, nnx.LoRAParam))(model)
    kernel_grads = nnx.grad(loss_fn, argnums=nnx.DiffState(0, nnx.Param))(model)
    for name in ("first", "second"):
        g = np.asarray(kernel_grads[name]["kernel"][...])
        row, col, _ = probe_fields(grads[name]["lora_stats"])
        np.testing.assert_allclose(row, (g * g).sum(1), rtol=1e-4, atol=1e-9)
        np.testing.assert_allclose(col, (g * g).sum(0), rtol=1e-4, atol=1e-9)

    optimizer = nnx.Optimizer(model, solora_sgd(0.01, scale=2.0), wrt=nnx.LoRAParam)
    kernel_before = np.asarray(model.first.kernel[...])

    @nnx.jit
    def step(model, optimizer):
        loss, grads = nnx.value_and_grad(loss_fn, argnums=nnx.DiffState(0, nnx.LoRAParam))(model)
        optimizer.update(model, grads)
        return loss

    losses = [float(step(model, optimizer)) for _ in range(40)]
    assert losses[-1] < 0.9 * losses[0], losses
    np.testing.assert_array_equal(np.asarray(model.first.kernel[...]), kernel_before)
    for leaf in jax.tree.leaves(model.first.lora_stats.get_value()):
        np.testing.assert_array_equal(np.asarray(leaf), 0.0)


def test_stacked_layers_through_vmap_get_per_layer_stats(x64):
    layers, m, n, r = 3, 5, 4, 2
    rng = np.random.default_rng(4)
    x = jnp.asarray(rng.normal(size=(layers, 6, m)))
    w0, a, b = (jnp.asarray(rng.normal(size=s)) for s in
                ((layers, m, n), (layers, m, r), (layers, r, n)))
    probe = jax.tree.map(lambda p: p.astype(jnp.float64), stats_probe(m, n, (layers,)))

    def loss(probe):
        y = jax.vmap(lambda *args: lora_matmul_with_stats(*args[:4], 1.0, args[4]))(
            x, w0, a, b, probe)
        return jnp.sum(y**3)

    stats = jax.grad(loss)(probe)
    for i in range(layers):
        w = w0[i] + a[i] @ b[i]
        g = np.asarray(jax.grad(lambda w, i=i: jnp.sum((x[i] @ w) ** 3))(w))
        np.testing.assert_allclose(stats["row"][i], (g * g).sum(1), rtol=1e-11)
        np.testing.assert_allclose(stats["col"][i], (g * g).sum(0), rtol=1e-11)


def test_bf16_layer_gives_float32_stats_close_to_reference():
    prob = jax.tree.map(lambda v: v.astype(jnp.float32), _layer_problem(5))
    low = jax.tree.map(lambda v: v.astype(jnp.bfloat16), prob)
    probe = stats_probe(7, 6)

    def loss(probe, p):
        y = lora_matmul_with_stats(p["x"], p["w0"], p["a"], p["b"], 1.0, probe)
        return jnp.sum(y.astype(jnp.float32) * p["target"].astype(jnp.float32))

    stats16 = jax.grad(loss)(probe, low)
    stats32 = jax.grad(loss)(probe, prob)
    assert stats16["row"].dtype == jnp.float32
    np.testing.assert_allclose(stats16["row"], stats32["row"], rtol=5e-2)


def test_probe_fields_rejects_malformed_probe():
    with pytest.raises(ValueError, match="row"):
        probe_fields({"rows": jnp.zeros(3), "col": jnp.zeros(2)})
    with pytest.raises(ValueError, match="method"):
        lora_matmul_with_stats(jnp.ones((2, 3)), jnp.ones((3, 2)), jnp.ones((3, 1)),
                               jnp.ones((1, 2)), 1.0, stats_probe(3, 2), method="fast")


def test_optax_update_gives_the_probe_a_zero_update():
    params = {"lora_a": jnp.ones((3, 1)), "lora_b": jnp.ones((1, 2)),
              "lora_stats": stats_probe(3, 2)}
    grads = {"lora_a": jnp.ones((3, 1)), "lora_b": jnp.ones((1, 2)),
             "lora_stats": {"row": jnp.ones(3), "col": jnp.ones(2)}}
    tx = solora_sgd(0.1, weight_decay=0.1)
    updates, _ = tx.update(grads, tx.init(params), params)
    for leaf in jax.tree.leaves(updates["lora_stats"]):
        np.testing.assert_array_equal(np.asarray(leaf), 0.0)
    assert optax.tree.norm(updates["lora_b"]) > 0
