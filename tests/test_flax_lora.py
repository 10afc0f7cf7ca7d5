"""Tests of lowrank_optax.flax: LoRALinear, init strategies, merge, injection, grad_stats."""

import math

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from flax import nnx

import lowrank_optax
from lowrank_optax.flax import (
    LoRALinear,
    inject_lora,
    lora_modules,
    merge_lora,
    unmerge_lora,
)

IN, OUT, R = 6, 9, 2
SLICES = [(0, 3), (6, 9)]


def _linear(n_in=IN, n_out=OUT, seed=0, dtype=jnp.float32):
    linear = nnx.Linear(n_in, n_out, param_dtype=dtype, rngs=nnx.Rngs(seed))
    linear.bias[...] = jax.random.normal(jax.random.key(seed + 100), (n_out,), dtype)
    return linear


def _inputs(shape=(2, 5, IN), seed=1):
    return jax.random.normal(jax.random.key(seed), shape)


def _randomize_factors(layer, seed=2):
    """Non-zero factors so the LoRA branch contributes."""
    ka, kb = jax.random.split(jax.random.key(seed))
    layer.lora_a[...] = jax.random.normal(ka, layer.lora_a.shape)
    layer.lora_b[...] = jax.random.normal(kb, layer.lora_b.shape)


def _reference(x, w0, bias, a, b, scale, slices=None):
    """``x W0 + bias + scale · x a b`` in float64 NumPy; per column slice with ``slices``."""
    x, w0, a, b = (np.asarray(t, np.float64) for t in (x, w0, a, b))
    y = x @ w0 + np.asarray(bias, np.float64)
    if slices is None:
        return y + scale * x @ a @ b
    for p, (start, stop) in enumerate(slices):
        y[..., start:stop] += scale * x @ a[p] @ b[p]
    return y


def _top_r(matrix, r, top=True):
    u, s, vt = np.linalg.svd(np.asarray(matrix, np.float64), full_matrices=False)
    part = slice(0, r) if top else slice(len(s) - r, len(s))
    return u[:, part] * s[part] @ vt[part]


@pytest.mark.parametrize("rslora", [False, True])
def test_output_matches_numpy(rslora):
    base = _linear()
    w0, bias = np.asarray(base.kernel[...]), np.asarray(base.bias[...])
    layer = LoRALinear(base, R, alpha=5.0, rslora=rslora, rngs=nnx.Rngs(0))
    scale = 5.0 / math.sqrt(R) if rslora else 5.0 / R
    assert layer.scale == pytest.approx(scale)
    _randomize_factors(layer)
    x = _inputs()
    want = _reference(x, w0, bias, layer.lora_a[...], layer.lora_b[...], scale)
    np.testing.assert_allclose(layer(x), want, rtol=1e-5, atol=1e-5)


def test_out_slices_output_matches_numpy():
    base = _linear()
    w0, bias = np.asarray(base.kernel[...]), np.asarray(base.bias[...])
    layer = LoRALinear(base, R, alpha=3.0, out_slices=SLICES, rngs=nnx.Rngs(0))
    assert layer.lora_a.shape == (2, IN, R) and layer.lora_b.shape == (2, R, 3)
    _randomize_factors(layer)
    x = _inputs()
    want = _reference(x, w0, bias, layer.lora_a[...], layer.lora_b[...], 1.5, SLICES)
    np.testing.assert_allclose(layer(x), want, rtol=1e-5, atol=1e-5)
    np.testing.assert_allclose(layer(x)[..., 3:6], np.asarray(base(x))[..., 3:6], rtol=1e-6)


@pytest.mark.parametrize("slices", [[(0, 3), (3, 7)], [(0, 4), (2, 6)], [(5, 10)], []])
def test_bad_out_slices_are_errors(slices):
    with pytest.raises(ValueError, match="out_slices|out slice"):
        LoRALinear(_linear(), R, alpha=1.0, out_slices=slices, rngs=nnx.Rngs(0))


def test_zero_b_init_is_peft_kaiming_and_leaves_function_unchanged():
    base = _linear(64, 32)
    x = _inputs((3, 64))
    before = np.asarray(base(x))
    layer = LoRALinear(base, 8, alpha=16.0, rngs=nnx.Rngs(0))
    a = np.asarray(layer.lora_a[...])
    bound = 1 / math.sqrt(64)
    assert np.abs(a).max() <= bound and np.abs(a).max() > 0.9 * bound
    assert abs(a.std() - bound / math.sqrt(3)) < 0.1 * bound
    np.testing.assert_array_equal(layer.lora_b[...], 0.0)
    np.testing.assert_array_equal(layer(x), before)


@pytest.mark.parametrize("slices", [None, SLICES])
def test_merge_and_unmerge(slices):
    base = _linear()
    w0 = np.asarray(base.kernel[...])
    layer = LoRALinear(base, R, alpha=2.0, out_slices=slices, rngs=nnx.Rngs(0))
    _randomize_factors(layer)
    x = _inputs()
    adapted = np.asarray(layer(x))
    assert merge_lora(layer) == [""]
    assert layer.merged
    delta = _reference(np.eye(IN), w0, np.zeros(OUT), layer.lora_a[...], layer.lora_b[...],
                       1.0, slices) - w0
    np.testing.assert_allclose(base.kernel[...], w0 + delta, rtol=1e-6, atol=1e-6)
    np.testing.assert_allclose(layer(x), adapted, rtol=1e-5, atol=1e-5)
    layer.lora_b[...] = 10 * layer.lora_b[...]  # the branch is off while merged
    np.testing.assert_allclose(layer(x), adapted, rtol=1e-5, atol=1e-5)
    layer.lora_b[...] = layer.lora_b[...] / 10
    merge_lora(layer)  # idempotent
    unmerge_lora(layer)
    assert not layer.merged
    np.testing.assert_allclose(base.kernel[...], w0, rtol=1e-6, atol=1e-6)
    np.testing.assert_allclose(layer(x), adapted, rtol=1e-5, atol=1e-5)


@pytest.mark.parametrize("init", ["pissa", "milora"])
@pytest.mark.parametrize("slices", [None, SLICES])
def test_svd_inits_keep_function_and_take_the_right_part(init, slices):
    base = _linear()
    w0, bias = np.asarray(base.kernel[...]), np.asarray(base.bias[...])
    x = _inputs()
    before = np.asarray(base(x))
    layer = LoRALinear(base, R, alpha=3.0, init=init, out_slices=slices, rngs=nnx.Rngs(0))
    np.testing.assert_allclose(layer(x), before, rtol=1e-5, atol=1e-5)
    blocks = [(0, OUT)] if slices is None else slices
    a = np.asarray(layer.lora_a[...]).reshape(len(blocks), IN, R)
    b = np.asarray(layer.lora_b[...]).reshape(len(blocks), R, -1)
    for p, (start, stop) in enumerate(blocks):
        part = _top_r(w0[:, start:stop], R, top=init == "pissa")
        np.testing.assert_allclose(1.5 * a[p] @ b[p], part, rtol=1e-4, atol=1e-5)
        np.testing.assert_allclose(base.kernel[:, start:stop], w0[:, start:stop] - part,
                                   rtol=1e-4, atol=1e-5)
        # √σ split evenly: aᵀa = b bᵀ = diag(σ_r) / scale.
        np.testing.assert_allclose(a[p].T @ a[p], b[p] @ b[p].T, rtol=1e-4, atol=1e-5)
    np.testing.assert_allclose(layer(x), _reference(x, base.kernel[...], bias, layer.lora_a[...],
                                                    layer.lora_b[...], 1.5, slices),
                               rtol=1e-5, atol=1e-5)


def test_gradient_init_keeps_function_and_aligns_with_minus_gradient():
    base = _linear()
    w0 = np.asarray(base.kernel[...])
    x, target = _inputs(), _inputs((2, 5, OUT), seed=7)

    def loss_of_kernel(kernel):
        return jnp.mean((x @ kernel + base.bias[...] - target) ** 2)

    g = np.asarray(jax.grad(loss_of_kernel)(jnp.asarray(w0)))
    before = np.asarray(base(x))
    layer = LoRALinear(base, R, alpha=4.0, init="gradient", gradient=g, gradient_step=0.3,
                       rngs=nnx.Rngs(0))
    np.testing.assert_allclose(layer(x), before, rtol=1e-5, atol=1e-5)
    delta = 2.0 * np.asarray(layer.lora_a[...]) @ np.asarray(layer.lora_b[...])
    np.testing.assert_allclose(delta, 0.3 * _top_r(-g, R), rtol=1e-4, atol=1e-6)
    np.testing.assert_allclose(base.kernel[...], w0 - delta, rtol=1e-5, atol=1e-6)
    # Direction: <ΔW, -G> = γ Σ_{i≤r} σ_i², and the factor gradients are non-zero at step 0.
    sigma = np.linalg.svd(g, compute_uv=False)
    assert np.sum(delta * -g) == pytest.approx(0.3 * np.sum(sigma[:R] ** 2), rel=1e-4)
    grads = nnx.grad(lambda m: jnp.mean((m(x) - target) ** 2),
                     argnums=nnx.DiffState(0, nnx.LoRAParam))(layer)
    assert np.linalg.norm(grads["lora_a"][...]) > 1e-3
    assert np.linalg.norm(grads["lora_b"][...]) > 1e-3


def test_inject_gradient_init_looks_gradients_up_by_path():
    model = _Net(nnx.Rngs(0))
    g = {f"blocks.{i}.mlp.fc": jax.random.normal(jax.random.key(i), (4, 4)) for i in range(3)}
    inject_lora(model, [r"blocks\.\d+\.mlp\.fc"], rank=1, alpha=1.0, rngs=nnx.Rngs(1),
                init="gradient", gradient=g)
    for i in range(3):
        layer = model.blocks[i].mlp["fc"]
        np.testing.assert_allclose(layer.delta(), _top_r(-g[f"blocks.{i}.mlp.fc"], 1),
                                   rtol=1e-4, atol=1e-6)


def test_init_argument_errors():
    with pytest.raises(ValueError, match="init must be"):
        LoRALinear(_linear(), R, alpha=1.0, init="olora", rngs=nnx.Rngs(0))
    with pytest.raises(ValueError, match="gradient"):
        LoRALinear(_linear(), R, alpha=1.0, init="gradient", rngs=nnx.Rngs(0))
    with pytest.raises(ValueError, match="rank"):
        LoRALinear(_linear(), 7, alpha=1.0, init="pissa", rngs=nnx.Rngs(0))
    # alpha = 0 divided by zero in the SVD inits (factor 1/scale); dropout 1 drops everything
    with pytest.raises(ValueError, match="alpha must be a finite number > 0, got 0"):
        LoRALinear(_linear(), R, alpha=0.0, init="pissa", rngs=nnx.Rngs(0))
    with pytest.raises(ValueError, match="alpha must be a finite number > 0, got nan"):
        LoRALinear(_linear(), R, alpha=float("nan"), rngs=nnx.Rngs(0))
    with pytest.raises(ValueError, match=r"dropout must be in \[0, 1\), got 1.0"):
        LoRALinear(_linear(), R, alpha=1.0, dropout=1.0, rngs=nnx.Rngs(0))
    with pytest.raises(ValueError, match="gradient_step must be a finite number > 0, got -1"):
        LoRALinear(_linear(), R, alpha=1.0, init="gradient", gradient=jnp.ones((IN, OUT)),
                   gradient_step=-1.0, rngs=nnx.Rngs(0))


@pytest.mark.parametrize(("slices", "mode"), [(None, True), (SLICES, "full"),
                                              (SLICES[::-1], True)])
def test_grad_stats_probe_gradient_is_row_and_col_sums(slices, mode):
    base = _linear()
    layer = LoRALinear(base, R, alpha=2.0, out_slices=slices, grad_stats=mode, rngs=nnx.Rngs(0))
    _randomize_factors(layer)
    x, target = _inputs(), _inputs((2, 5, OUT), seed=7)
    a, b, bias = layer.lora_a[...], layer.lora_b[...], base.bias[...]
    want = _reference(x, base.kernel[...], bias, a, b, 1.0, slices)
    np.testing.assert_allclose(layer(x), want, rtol=1e-5, atol=1e-5)

    # Independent reference: the gradient of the loss w.r.t. the adapted weight W0 + ΔW.
    w_eff = base.kernel[...] + layer.delta()
    g = np.asarray(jax.grad(lambda w: jnp.sum(jnp.sin(x @ w + bias - target)))(w_eff))
    grads = nnx.grad(lambda m: jnp.sum(jnp.sin(m(x) - target)),
                     argnums=nnx.DiffState(0, nnx.LoRAParam))(layer)
    stats = {k: v.get_value() for k, v in grads["lora_stats"].items()}
    blocks = [(0, OUT)] if slices is None else slices
    for p, (start, stop) in enumerate(blocks):
        gp = g[:, start:stop]
        pick = (lambda t: t) if slices is None else (lambda t, p=p: t[p])  # noqa: E731
        np.testing.assert_allclose(pick(stats["row"]), (gp * gp).sum(1), rtol=1e-4, atol=1e-6)
        np.testing.assert_allclose(pick(stats["col"]), (gp * gp).sum(0), rtol=1e-4, atol=1e-6)
        if mode == "full":
            np.testing.assert_allclose(pick(stats["grad"]), gp, rtol=1e-4, atol=1e-6)
    # Factor gradients agree with the plain path.
    plain = LoRALinear(_linear(), R, alpha=2.0, out_slices=slices, rngs=nnx.Rngs(0))
    plain.lora_a[...], plain.lora_b[...] = a, b
    plain_grads = nnx.grad(lambda m: jnp.sum(jnp.sin(m(x) - target)),
                           argnums=nnx.DiffState(0, nnx.LoRAParam))(plain)
    for key in ("lora_a", "lora_b"):
        np.testing.assert_allclose(grads[key][...], plain_grads[key][...], rtol=1e-4, atol=1e-6)


class _Block(nnx.Module):
    def __init__(self, rngs):
        self.attn = nnx.Linear(4, 12, rngs=rngs)
        self.mlp = nnx.Dict({"fc": nnx.Linear(4, 4, rngs=rngs)})
        self.norm = nnx.LayerNorm(4, rngs=rngs)

    def __call__(self, x):
        return self.mlp["fc"](x) + self.attn(self.norm(x))[..., :4]


class _Net(nnx.Module):
    def __init__(self, rngs, blocks=3):
        self.blocks = nnx.List([_Block(rngs) for _ in range(blocks)])
        self.head = nnx.Linear(4, 1, rngs=rngs)

    def __call__(self, x):
        for block in self.blocks:
            x = jnp.tanh(block(x))
        return self.head(x)


def test_inject_by_pattern_in_nested_lists_and_dicts():
    model = _Net(nnx.Rngs(0))
    x = _inputs((5, 4))
    before = np.asarray(model(x))
    targets = {r"blocks\.\d+\.attn": {"out_slices": [(0, 4), (8, 12)], "rank": 3},
               r"blocks\.[02]\.mlp\.fc": {}}
    paths = inject_lora(model, targets, rank=2, alpha=4.0, rngs=nnx.Rngs(1))
    assert paths == ["blocks.0.attn", "blocks.0.mlp.fc", "blocks.1.attn", "blocks.2.attn",
                     "blocks.2.mlp.fc"]
    assert [p for p, _ in lora_modules(model)] == paths
    assert isinstance(model.blocks[1].attn, LoRALinear)
    assert model.blocks[1].attn.lora_a.shape == (2, 4, 3)
    assert isinstance(model.blocks[0].mlp["fc"], LoRALinear)
    assert not isinstance(model.blocks[1].mlp["fc"], LoRALinear)
    assert type(model.blocks[0].attn.base.kernel) is nnx.Param
    np.testing.assert_allclose(model(x), before, rtol=1e-6)
    lora_state = nnx.state(model, nnx.LoRAParam)
    assert sorted(lora_state["blocks"][0]["attn"].keys()) == ["lora_a", "lora_b"]
    # Re-injecting does not wrap the base of a LoRA layer; a list pattern form works too.
    assert inject_lora(model, [r"head"], rank=1, alpha=1.0, rngs=nnx.Rngs(2)) == ["head"]
    with pytest.raises(ValueError, match="match no Linear-like"):
        inject_lora(model, [r"blocks\.\d+\.attn\.base"], rank=1, alpha=1.0, rngs=nnx.Rngs(2))


def test_inject_errors():
    model = _Net(nnx.Rngs(0))
    with pytest.raises(ValueError, match=r"\['attn'\] match no Linear-like.*blocks.0.attn"):
        inject_lora(model, ["attn"], rank=1, alpha=1.0, rngs=nnx.Rngs(0))
    with pytest.raises(TypeError, match="out_slices"):
        inject_lora(model, {r".*attn": [(0, 4)]}, rank=1, alpha=1.0, rngs=nnx.Rngs(0))
    assert not any(True for _ in lora_modules(model))


def _train(model, tx, x, y, steps=20):
    optimizer = nnx.Optimizer(model, tx, wrt=nnx.LoRAParam)
    loss_fn = lambda m: jnp.mean((m(x) - y) ** 2)  # noqa: E731

    @nnx.jit
    def step(model, optimizer):
        loss, grads = nnx.value_and_grad(loss_fn, argnums=nnx.DiffState(0, nnx.LoRAParam))(model)
        optimizer.update(model, grads)
        return loss

    return [float(step(model, optimizer)) for _ in range(steps)]


@pytest.mark.parametrize("optimizer", ["scaled_adamw", "solora_sgd"])
def test_nnx_optimizer_trains_only_lora_params(optimizer):
    model = _Net(nnx.Rngs(0), blocks=2)
    grad_stats = optimizer == "solora_sgd"
    inject_lora(model, {r"blocks\.\d+\.attn": {"out_slices": [(0, 4), (8, 12)]},
                        r"blocks\.\d+\.mlp\.fc": {}},
                rank=2, alpha=2.0, rngs=nnx.Rngs(1), grad_stats=grad_stats)
    frozen = jax.tree.map(np.asarray, nnx.state(model, nnx.Not(nnx.LoRAParam)))
    x, y = _inputs((16, 4)), jnp.sin(_inputs((16, 1), seed=3))
    tx = (lowrank_optax.solora_sgd(1e-2, scale=1.0) if grad_stats
          else lowrank_optax.scaled_adamw(1e-2))
    losses = _train(model, tx, x, y)
    assert losses[-1] < 0.8 * losses[0], losses
    jax.tree.map(np.testing.assert_array_equal, nnx.state(model, nnx.Not(nnx.LoRAParam)), frozen)
    if grad_stats:
        for leaf in jax.tree.leaves(nnx.state(model.blocks[0].attn.lora_stats)):
            np.testing.assert_array_equal(leaf, 0.0)


@pytest.mark.parametrize("optimizer", ["scaled_adamw", "solora_sgd"])
def test_nnx_optimizer_on_a_layer_with_grad_stats_as_the_whole_model(optimizer):
    # The layer is the model: its pair node is the top-level nnx.State, which returns its nested
    # lora_stats dict as another State when read by key; the updates must still have the
    # params' structure (optax.apply_updates inside nnx.Optimizer.update compares them).
    model = LoRALinear(_linear(), R, alpha=2.0, grad_stats=True, rngs=nnx.Rngs(1))
    x = _inputs((16, IN))
    y = jnp.sin(_inputs((16, OUT), seed=3))
    tx = (lowrank_optax.solora_sgd(1e-2, scale=model.scale) if optimizer == "solora_sgd"
          else lowrank_optax.scaled_adamw(0.1))
    losses = _train(model, tx, x, y)
    assert losses[-1] < 0.8 * losses[0], losses
    for leaf in jax.tree.leaves(nnx.state(model.lora_stats)):
        np.testing.assert_array_equal(leaf, 0.0)


def test_dropout_on_lora_branch_only():
    base = _linear()
    layer = LoRALinear(base, R, alpha=2.0, dropout=0.5, rngs=nnx.Rngs(0, dropout=1))
    x = _inputs()
    np.testing.assert_allclose(layer(x), base(x), rtol=1e-6)  # b = 0: frozen path undropped
    _randomize_factors(layer)
    clean = _reference(x, base.kernel[...], base.bias[...], layer.lora_a[...],
                       layer.lora_b[...], 1.0)
    np.testing.assert_allclose(layer(x, deterministic=True), clean, rtol=1e-5, atol=1e-5)
    first, second = np.asarray(layer(x)), np.asarray(layer(x))
    assert not np.allclose(first, clean) and not np.allclose(first, second)
    layer.eval()
    np.testing.assert_allclose(layer(x), clean, rtol=1e-5, atol=1e-5)
    layer.train()
    assert not np.allclose(layer(x), clean)


def test_sharding_metadata():
    with nnx.use_eager_sharding(False):
        layer = LoRALinear(_linear(), R, alpha=1.0, a_sharding=("data", None),
                           b_sharding=(None, "model"), rngs=nnx.Rngs(0))
    assert layer.lora_a.get_metadata("out_sharding") == ("data", None)
    assert layer.lora_b.get_metadata("out_sharding") == (None, "model")
    specs = nnx.get_partition_spec(nnx.state(layer, nnx.LoRAParam))
    assert tuple(specs["lora_a"].get_value()) == ("data", None)
    mesh = jax.make_mesh((1,), ("data",), axis_types=(jax.sharding.AxisType.Explicit,))
    # explicit: importing Tunix's models turns flax's eager sharding off process-wide
    with jax.set_mesh(mesh), nnx.use_eager_sharding(True):
        layer = LoRALinear(_linear(), R, alpha=1.0, a_sharding=("data", None), rngs=nnx.Rngs(0))
    assert layer.lora_a[...].sharding.spec == jax.sharding.PartitionSpec("data", None)


@pytest.mark.parametrize("slices", [None, SLICES])
def test_grad_stats_path_drops_the_lora_input_like_the_plain_path(slices):
    x = _inputs()
    layers = [LoRALinear(_linear(), R, alpha=2.0, dropout=0.5, out_slices=slices,
                         grad_stats=stats, rngs=nnx.Rngs(0, dropout=5)) for stats in (False, True)]
    for layer in layers:
        _randomize_factors(layer)
    plain, with_stats = (np.asarray(layer(x)) for layer in layers)
    np.testing.assert_allclose(with_stats, plain, rtol=1e-5, atol=1e-5)
    assert not np.allclose(plain, np.asarray(layers[0](x, deterministic=True)))


def test_bfloat16_kernel_keeps_its_dtype_through_init_and_merge():
    base = _linear(dtype=jnp.bfloat16)
    x = _inputs().astype(jnp.bfloat16)
    before = np.asarray(base(x), np.float32)
    layer = LoRALinear(base, R, alpha=2.0, init="pissa", rngs=nnx.Rngs(0))
    assert base.kernel.dtype == jnp.bfloat16 and layer.lora_a.dtype == jnp.float32
    adapted = np.asarray(layer(x), np.float32)
    assert layer(x).dtype == jnp.bfloat16
    np.testing.assert_allclose(adapted, before, atol=0.1)
    merge_lora(layer)
    assert base.kernel.dtype == jnp.bfloat16
    np.testing.assert_allclose(np.asarray(layer(x), np.float32), adapted, atol=0.1)


def test_gpt2_q_and_v_slices_of_c_attn():
    from gpt2 import GPT2, GPT2Config

    config = GPT2Config(vocab_size=32, n_positions=8, n_embd=8, n_layer=1, n_head=2,
                        layer_norm_epsilon=1e-5, embd_pdrop=0.0, attn_pdrop=0.0,
                        resid_pdrop=0.0)
    model = GPT2(config, rngs=nnx.Rngs(0))
    ids = jnp.arange(6)[None] % 32
    before = np.asarray(model(ids))
    d = config.n_embd
    paths = inject_lora(model, {r"h\.\d+\.attn\.c_attn": {"out_slices": [(0, d), (2 * d, 3 * d)]}},
                        rank=2, alpha=4.0, rngs=nnx.Rngs(1))
    assert paths == ["h.0.attn.c_attn"]
    np.testing.assert_allclose(model(ids), before, rtol=1e-6, atol=1e-6)
    for _, layer in lora_modules(model):
        _randomize_factors(layer)
    adapted = np.asarray(model(ids))
    assert not np.allclose(adapted, before, atol=1e-3)
    merge_lora(model)
    np.testing.assert_allclose(model(ids), adapted, rtol=1e-4, atol=1e-4)
