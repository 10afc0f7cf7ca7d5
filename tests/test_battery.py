"""The battery every registered method runs through (registry: ``methods.py``)."""

from __future__ import annotations

import functools

import chex
import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest
from flax import nnx
from methods import BY_NAME, METHODS, Method
from problems import factorization_loss, factorization_target, lora_params, train

every_method = pytest.mark.parametrize("method", METHODS, ids=str)

TARGET = factorization_target()
LOSS = factorization_loss(TARGET)


def _grads(params):
    return jax.grad(LOSS)(params)


# Compiling each method's update dominates the battery's time: the tests share one
# transformation per method and one compiled update per transformation (and per input dtypes).
@functools.cache
def _tx(name: str) -> optax.GradientTransformation:
    return BY_NAME[name].make()


@functools.cache
def _jitted_update(tx: optax.GradientTransformation):
    return jax.jit(tx.update)


@functools.cache
def _jitted_train(name: str, steps: int):
    return jax.jit(lambda p: train(_tx(name), p, LOSS, steps))


def _run_steps(tx, params, steps):
    state = tx.init(params)
    update = _jitted_update(tx)
    for _ in range(steps):
        updates, state = update(_grads(params), state, params)
        params = optax.apply_updates(params, updates)
    return params, state


ZERO_B_STEPS = 200


def _training_steps(method: Method) -> int:
    """One scan length serves the convergence and the zero-``b`` tests (one compilation); its
    history holds the loss after ``k`` steps at index ``k``."""
    return max(method.steps, ZERO_B_STEPS) + 1


@every_method
def test_converges_in_scan(method: Method):
    _, history = _jitted_train(method.name, _training_steps(method))(lora_params())
    assert np.all(np.isfinite(history[: method.steps + 1]))
    assert history[method.steps] < 1e-2 * history[0], (history[0], history[method.steps])


@every_method
def test_zero_init_b_stays_finite_for_200_steps(method: Method):
    params = lora_params(zero_b=True)
    final, history = _jitted_train(method.name, _training_steps(method))(params)
    assert np.all(np.isfinite(history[: ZERO_B_STEPS + 1]))  # the factors after 200 steps
    chex.assert_tree_all_finite(final)  # and after the shared scan's last step


@every_method
def test_accepts_unknown_extra_args(method: Method):
    """An unknown keyword argument is accepted and ignored: the traced update is the same
    program (identical jaxprs; tracing only, no compilation)."""
    tx = _tx(method.name)
    params = lora_params(zero_b=False)
    args = (_grads(params), tx.init(params), params)
    plain = jax.make_jaxpr(tx.update)(*args)
    extra = jax.make_jaxpr(lambda g, s, p: tx.update(g, s, p, unknown_argument=3.0))(*args)
    assert str(extra) == str(plain)


def _avals(tree) -> list:
    """What ``jit`` keys its cache on, leaf by leaf: shape, dtype, weak type, sharding."""
    return [jax.typeof(x) for x in jax.tree.leaves(tree)]


@every_method
def test_no_recompile_on_second_call(method: Method):
    """A jitted step's outputs have the tree structure and the abstract values of its inputs
    (``init``'s state included), so the second call hits the first call's compilation."""
    tx = _tx(method.name)
    params = lora_params(zero_b=False)

    def step(p, s):
        updates, s = tx.update(_grads(p), s, p)
        return optax.apply_updates(p, updates), s

    inputs = (params, tx.init(params))
    outputs = jax.eval_shape(step, *inputs)
    assert jax.tree.structure(outputs) == jax.tree.structure(inputs)
    assert _avals(outputs) == _avals(inputs)


@every_method
def test_tree_map_params_keeps_state(method: Method):
    tx = _tx(method.name)
    params = lora_params(zero_b=False)
    state = tx.init(params)
    mapped = optax.tree.map_params(tx, lambda x: x + 0, state, transform_non_params=lambda x: x)
    chex.assert_trees_all_equal_structs(mapped, state)
    chex.assert_trees_all_close(mapped, state)


@every_method
def test_inject_hyperparams_matches(method: Method):
    """Injected hyperparameters give the direct run; a learning rate halved in the injected
    state (the same compiled update) halves the update of methods linear in it."""
    params = lora_params(zero_b=False)
    direct, _ = _run_steps(_tx(method.name), params, 5)
    tx = optax.inject_hyperparams(method.factory)(method.learning_rate, **method.kwargs)
    injected, _ = _run_steps(tx, params, 5)
    # Two differently compiled float32 programs: adams_low_memory divides its rebuilt moment by
    # √v, which amplifies their rounding differences (1.5e-6 seen); a hyperparameter that does
    # not reach the update changes it by ~lr·|u| ≥ 1e-3.
    chex.assert_trees_all_close(direct, injected, rtol=1e-5, atol=1e-5)
    if not method.linear_in_lr:
        return
    state = tx.init(params)
    halved = state._replace(hyperparams={**state.hyperparams,
                                         "learning_rate": 0.5 * method.learning_rate})
    full, _ = _jitted_update(tx)(_grads(params), state, params)
    half, _ = _jitted_update(tx)(_grads(params), halved, params)
    chex.assert_trees_all_close(half, jax.tree.map(lambda u: 0.5 * u, full), rtol=1e-4,
                                atol=1e-7)


@every_method
def test_schedule_accepted(method: Method):
    params = lora_params(zero_b=False)
    constant, _ = _run_steps(method.make(optax.constant_schedule(method.learning_rate)), params, 3)
    direct, _ = _run_steps(_tx(method.name), params, 3)
    chex.assert_trees_all_close(constant, direct, rtol=1e-5, atol=1e-6)


@every_method
def test_bf16_params_give_bf16_updates(method: Method):
    params = lora_params(zero_b=False, dtype=jnp.bfloat16)
    tx = _tx(method.name)
    state = tx.init(params)
    grads = jax.tree.map(lambda g: g.astype(jnp.bfloat16), _grads(params))
    updates, new_state = _jitted_update(tx)(grads, state, params)
    for leaf in jax.tree.leaves(updates):
        assert leaf.dtype == jnp.bfloat16
    chex.assert_tree_all_finite(updates)
    chex.assert_trees_all_equal_dtypes(state, new_state)


@every_method
def test_state_dtype_stable_under_cond(method: Method):
    tx = _tx(method.name)
    params = lora_params(zero_b=False)
    state = tx.init(params)
    grads = _grads(params)
    pred = jnp.array(True)
    # lax.cond rejects branches of different types when it is traced: no compilation needed
    new_state = jax.eval_shape(
        lambda s: jax.lax.cond(pred, lambda s: tx.update(grads, s, params)[1], lambda s: s, s),
        state)
    chex.assert_trees_all_equal_dtypes(state, new_state)


@every_method
def test_multisteps_equals_averaged_gradient(method: Method):
    params = lora_params(zero_b=False)
    g1 = _grads(params)
    g2 = jax.tree.map(lambda g: -0.5 * g + 0.1, g1)
    tx = _tx(method.name)
    multi = optax.MultiSteps(tx, every_k_schedule=2)
    multi_update = jax.jit(multi.update)
    state = multi.init(params)
    first, state = multi_update(g1, state, params)
    chex.assert_trees_all_close(first, jax.tree.map(jnp.zeros_like, first))
    second, _ = multi_update(g2, state, params)
    mean = jax.tree.map(lambda x, y: 0.5 * (x + y), g1, g2)
    expected, _ = _jitted_update(tx)(mean, tx.init(params), params)
    # MultiSteps averages as a running mean, not 0.5·(x + y): rounding-level input differences,
    # which Adam-type normalisation of near-zero components turns into ~1e-4·lr (seen with
    # adams_low_memory's Householder bases); a missing or wrong average differs by ~lr.
    chex.assert_trees_all_close(second, expected, rtol=1e-5, atol=1e-5)


@every_method
def test_nonfinite_gradients_pass_through_and_are_skipped(method: Method):
    params = lora_params(zero_b=False)
    grads = _grads(params)
    bad = jax.tree.map(lambda g: g.at[0, 0].set(jnp.nan), grads)
    tx = _tx(method.name)
    update = _jitted_update(tx)
    raw, _ = update(bad, tx.init(params), params)
    assert not all(bool(jnp.all(jnp.isfinite(u))) for u in jax.tree.leaves(raw))

    guarded = optax.apply_if_finite(tx, max_consecutive_errors=3)
    guarded_update = jax.jit(guarded.update)
    state = guarded.init(params)
    skipped, state_after = guarded_update(bad, state, params)
    chex.assert_trees_all_close(skipped, jax.tree.map(jnp.zeros_like, skipped))
    chex.assert_trees_all_close(state_after.inner_state, state.inner_state)
    good, _ = guarded_update(grads, state_after, params)
    expected, _ = update(grads, tx.init(params), params)
    chex.assert_trees_all_close(good, expected, rtol=1e-5, atol=1e-6)


@every_method
def test_abstract_init(method: Method):
    tx = method.make()
    params = lora_params()
    concrete = tx.init(params)
    abstract = jax.eval_shape(tx.init, params)
    chex.assert_trees_all_equal_shapes_and_dtypes(concrete, abstract)
    structs = jax.tree.map(lambda x: jax.ShapeDtypeStruct(x.shape, x.dtype), params)
    from_structs = tx.init(structs)
    chex.assert_trees_all_equal_shapes_and_dtypes(concrete, from_structs)


def _dot_precisions(jaxpr: jax.extend.core.Jaxpr) -> list:
    """``precision`` of every ``dot_general`` in ``jaxpr`` and in the jaxprs nested in it."""
    found = []
    for eqn in jaxpr.eqns:
        if eqn.primitive.name == "dot_general":
            found.append(eqn.params["precision"])
        for value in eqn.params.values():
            for inner in value if isinstance(value, (tuple, list)) else (value,):
                if isinstance(inner, jax.extend.core.ClosedJaxpr):
                    found += _dot_precisions(inner.jaxpr)
                elif isinstance(inner, jax.extend.core.Jaxpr):
                    found += _dot_precisions(inner)
    return found


@every_method
def test_every_matmul_runs_at_full_float32_precision(method: Method):
    # On GPUs (TF32) and TPUs (bf16 passes) the default float32 matmul drops digits the r×r
    # solves need; the methods must pin HIGHEST whatever the user's default is.
    tx = method.make()
    params = lora_params(zero_b=False)
    state = tx.init(params)
    with jax.default_matmul_precision("bfloat16"):
        jaxpr = jax.make_jaxpr(tx.update)(_grads(params), state, params).jaxpr
    highest = (jax.lax.Precision.HIGHEST, jax.lax.Precision.HIGHEST)
    precisions = _dot_precisions(jaxpr)
    # LoRA+ only rescales its base optimizer's update: the one method without a matmul.
    assert precisions or method.name.startswith("loraplus"), "no matmul: the check is vacuous"
    assert all(p == highest for p in precisions), precisions


class _TinyLoRAModel(nnx.Module):
    def __init__(self, rngs: nnx.Rngs):
        self.first = nnx.LoRA(6, 2, 5, base_module=nnx.Linear(6, 5, rngs=rngs), rngs=rngs)
        self.second = nnx.LoRA(5, 2, 3, base_module=nnx.Linear(5, 3, rngs=rngs), rngs=rngs)

    def __call__(self, x):
        return self.second(jnp.tanh(self.first(x)))


@every_method
def test_nnx_optimizer_trains_only_lora_params(method: Method):
    model = _TinyLoRAModel(nnx.Rngs(0))
    x = jax.random.normal(jax.random.key(1), (32, 6))
    y = jax.random.normal(jax.random.key(2), (32, 3))
    optimizer = nnx.Optimizer(model, method.make(0.1 * method.learning_rate), wrt=nnx.LoRAParam)
    base_before = np.asarray(model.first.base_module.kernel[...])
    loss_fn = lambda m: jnp.mean((m(x) - y) ** 2)  # noqa: E731

    @nnx.jit
    def step(model, optimizer):
        loss, grads = nnx.value_and_grad(loss_fn, argnums=nnx.DiffState(0, nnx.LoRAParam))(model)
        optimizer.update(model, grads)
        return loss

    losses = [float(step(model, optimizer)) for _ in range(30)]
    assert losses[-1] < losses[0]
    np.testing.assert_array_equal(np.asarray(model.first.base_module.kernel[...]), base_before)



class JitEagerAgree(chex.TestCase):
    """Each method's eager update agrees with its jitted one (pmap: ``test_multidevice.py``)."""

    @chex.variants(without_jit=True)
    def test_update_matches_reference(self):
        params = lora_params(zero_b=False)
        grads = _grads(params)
        for method in METHODS:
            tx = _tx(method.name)
            state = tx.init(params)
            expected, _ = _jitted_update(tx)(grads, state, params)
            update = self.variant(lambda g, s, p, tx=tx: tx.update(g, s, p)[0])
            got = update(grads, state, params)
            chex.assert_trees_all_close(got, expected, rtol=1e-5, atol=1e-6,
                                        custom_message=method.name)
