"""Numerics of every registered method (issue 12): a warm-up from ``b = 0`` against AdamW,
rank-deficient factors, the one-example regression from ``b = 0`` and float16 and bfloat16
parameters.

Each method is compiled twice: once for the warm-up toy, once for a tree of independent pairs
holding the hard starts side by side (the methods act pair by pair; only LoRA-RITE's global
clipping couples them), so each hard start's loss is read off its own pair.
"""

from __future__ import annotations

import functools
import inspect

import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest
from methods import BY_NAME, METHODS, Method
from problems import factorization_loss, factorization_target, lora_params, train

# Methods without an adaptive (second-moment or metric) normalisation: their step size is the
# learning rate times the gradient's own scale, so the warm-up comparison with AdamW does not
# apply (they still run every hard start below).
NON_ADAPTIVE = {"scaled_sgd", "altlora", "lora_pro_sgd", "quotient_sgd"}
ADAPTIVE = [m for m in METHODS if m.name not in NON_ADAPTIVE]

# ----------------------------------------------------------------------------- warm-up toy

_K_T1, _K_T2, _K_A = jax.random.split(jax.random.key(0), 3)
TOY_TARGET = jax.random.normal(_K_T1, (32, 4)) @ jax.random.normal(_K_T2, (4, 16)) / 4
TOY_INIT = {"lora_a": jax.random.normal(_K_A, (32, 4)) / 4, "lora_b": jnp.zeros((4, 16))}
WARMUP = optax.warmup_cosine_decay_schedule(0.0, 3e-2, 20, 200, 1e-3)


def _toy_loss(p):
    return 0.5 * jnp.sum((p["lora_a"] @ p["lora_b"] - TOY_TARGET) ** 2)


def _toy_relative_loss(tx: optax.GradientTransformation, steps: int = 200) -> float:
    def step(carry, _):
        p, s = carry
        updates, s = tx.update(jax.grad(_toy_loss)(p), s, p)
        return (optax.apply_updates(p, updates), s), None

    @jax.jit
    def run(p):
        (p, _), _ = jax.lax.scan(step, (p, tx.init(p)), None, length=steps)
        return _toy_loss(p) / _toy_loss(TOY_INIT)

    return float(run(TOY_INIT))


@functools.cache
def _adamw_toy() -> float:
    return _toy_relative_loss(optax.adamw(WARMUP, weight_decay=0.0))


@pytest.mark.parametrize("method", ADAPTIVE, ids=str)
def test_warmup_from_zero_b_within_100x_of_adamw(method: Method):
    reference = _adamw_toy()
    assert reference < 1e-6  # AdamW solves the toy: the comparison is meaningful
    relative = _toy_relative_loss(method.make(WARMUP))
    assert np.isfinite(relative) and relative < 100 * reference, (relative, reference)


# ----------------------------------------------------------------------------- hard starts

M, N, R = 16, 12, 4
STEPS = 100
HARD_STARTS = ("rank_a", "rank_b", "rank_both", "one_example", "float16", "bfloat16")
LOW_PRECISION = ("float16", "bfloat16")


def _hard_params() -> dict:
    """Independent pairs: ``a`` of rank r−2 (duplicated columns), ``b`` of rank 1, both; the
    one-example regression, a float16 and a bfloat16 pair, the last three from ``b = 0``."""
    k_a, k_b, k_x, k_y = jax.random.split(jax.random.key(3), 4)
    a = jax.random.normal(k_a, (M, R)) / np.sqrt(M)
    b = jax.random.normal(k_b, (R, N))
    a_def = a.at[:, 2].set(a[:, 0]).at[:, 3].set(a[:, 1])
    b_def = jnp.outer(b[:, 0], b[0]) / np.sqrt(N)
    zero_b = jnp.zeros((R, N))
    return {
        "rank_a": {"lora_a": a_def, "lora_b": b},
        "rank_b": {"lora_a": a, "lora_b": b_def},
        "rank_both": {"lora_a": a_def, "lora_b": b_def},
        "one_example": {"lora_a": a, "lora_b": zero_b},
        **{dtype: {"lora_a": a.astype(dtype), "lora_b": zero_b.astype(dtype)}
           for dtype in LOW_PRECISION},
    }


_TARGET = jnp.asarray(factorization_target(m=M, n=N, rank=R), jnp.float32)
_X = jax.random.normal(jax.random.key(4), (1, M))
_X = _X / jnp.linalg.norm(_X)  # unit curvature in W, as the battery's factorisation problem
_Y = jax.random.normal(jax.random.key(5), (1, N))


def _losses(params: dict, dtype=jnp.float32) -> dict:
    """Each start's loss, computed in ``dtype``: ``½‖a b − T‖²``, the one example's
    ``½‖x a b − y‖²``."""
    target, x, y = (v.astype(dtype) for v in (_TARGET, _X, _Y))

    def product(name):
        p = params[name]
        return p["lora_a"].astype(dtype) @ p["lora_b"].astype(dtype)

    return {name: 0.5 * jnp.sum(((x @ product(name) - y) if name == "one_example"
                                 else (product(name) - target)) ** 2)
            for name in params}


def _histories(tx: optax.GradientTransformation, params: dict, dtype) -> dict:
    """Per start, the loss history (``STEPS + 1`` values) of ``tx`` on the sum of the losses."""
    losses = functools.partial(_losses, dtype=dtype)
    total = lambda p: sum(losses(p).values())  # noqa: E731

    def step(carry, _):
        p, s = carry
        updates, s = tx.update(jax.grad(total)(p), s, p)
        p = optax.apply_updates(p, updates)
        return (p, s), losses(p)

    @jax.jit
    def run(p):
        _, history = jax.lax.scan(step, (p, tx.init(p)), None, length=STEPS)
        return jax.tree.map(lambda first, h: jnp.concatenate([first[None], h]), losses(p),
                            history)

    return jax.tree.map(np.asarray, run(params))


@functools.cache
def _hard_run(name: str) -> tuple[dict, dict]:
    """Per hard start: the loss history; and per low-precision start, its updates' dtypes."""
    tx, params = BY_NAME[name].make(), _hard_params()
    grads = jax.tree.map(jnp.zeros_like, params)
    updates = jax.eval_shape(tx.update, grads, tx.init(params), params)[0]
    dtypes = {start: {leaf.dtype for leaf in jax.tree.leaves(updates[start])}
              for start in LOW_PRECISION}
    return _histories(tx, params, jnp.float32), dtypes


# Every method at its registry rate. The rank-deficient starts of scaled_sgd and solora_sgd
# failed through the step's cross term until the aliases clipped it (tests/test_cross_term.py);
# quotient_sgd's one-example regression oscillated away at its former rate 0.1, past quotient
# GD's stability limit at the fitted factors' scale (tests/methods.py; with optax's line search
# it fits: tests/test_lora_s.py).
HARD_CASES = [pytest.param(method, start, id=f"{start}-{method.name}")
              for start in HARD_STARTS for method in METHODS]


@pytest.mark.parametrize(("method", "start"), HARD_CASES)
def test_hard_start_finite_and_loss_down(method: Method, start: str):
    history = _hard_run(method.name)[0][start]
    assert np.all(np.isfinite(history)), f"non-finite from step {np.argmin(np.isfinite(history))}"
    assert history[-1] < 0.9 * history[0], (history[0], history[-1])


@pytest.mark.parametrize("method", METHODS, ids=str)
def test_hard_starts_in_float64_finite_and_loss_down(method: Method):
    """The same starts (not the float16 and bfloat16 ones) in float64, where no float32 rounding
    floor damps a near-singular Gram: lora_pro_adamw, whose map inverts the Grams against Adam's
    unit-scale output, went to 1.3e3 times the start loss from the rank_both start before its
    eigenvalue floor."""
    with jax.enable_x64(True):
        params = {name: jax.tree.map(lambda x: x.astype(jnp.float64), pair)
                  for name, pair in _hard_params().items() if name not in LOW_PRECISION}
        histories = _histories(method.make(), params, jnp.float64)
    for start, history in histories.items():
        assert np.all(np.isfinite(history)), start
        assert history[-1] < 0.9 * history[0], (start, history[0], history[-1])


@pytest.mark.parametrize("method", METHODS, ids=str)
def test_low_precision_params_give_updates_of_their_dtype(method: Method):
    _, dtypes = _hard_run(method.name)
    assert dtypes == {start: {jnp.dtype(start)} for start in LOW_PRECISION}


# ---------------------------------------------- optax.inject_hyperparams and low precision


@pytest.mark.parametrize("method", METHODS, ids=str)
def test_inject_hyperparams_with_float16_params_finite_and_loss_down(method: Method):
    """``optax.inject_hyperparams`` casts float hyperparameters to the params' dtype: in float16
    ``eps = 1e-8`` becomes 0, and from ``b = 0`` (every ``a`` entry's gradient zero, so
    ``m̂ = v̂ = 0``) Adam's ``m̂ / (√v̂ + eps)`` was ``0/0``: NaN at step 0 in ``scaled_adamw``,
    ``altlora_plus``, ``lora_pro_adamw(full_state=False)`` and ``adams`` with its robust
    start, before ``linalg.adam_eps``. The same holds for ``eps=0`` passed by the user."""
    tx = optax.inject_hyperparams(method.factory)(method.learning_rate, **method.kwargs)
    params = {"float16": _hard_params()["float16"]}
    history = _histories(tx, params, jnp.float32)["float16"]
    assert np.all(np.isfinite(history)), f"non-finite from step {np.argmin(np.isfinite(history))}"
    assert history[-1] < 0.9 * history[0], (history[0], history[-1])


@pytest.mark.parametrize("method", METHODS, ids=str)
def test_inject_hyperparams_with_bfloat16_params_names_the_cast(method: Method):
    """In bfloat16 ``b2 = 0.999`` rounds to 1 (Adam's bias correction becomes 0/0; optax.adamw
    itself returns NaN there; SoLoRA's 0.98 survives the cast). An eager ``init`` sees the cast
    value and names the remedy; ``hyperparam_dtype=jnp.float32`` keeps the hyperparameters
    exact."""
    params = {"bfloat16": _hard_params()["bfloat16"]}
    injected = optax.inject_hyperparams(method.factory)(method.learning_rate, **method.kwargs)
    b2 = inspect.signature(method.factory).parameters.get("b2")
    if b2 is not None and float(jnp.asarray(b2.default, jnp.bfloat16)) == 1.0:
        with pytest.raises(ValueError, match=r"b2=1\.0 is outside \[0, 1\) \(a bfloat16 array: "
                           r".*hyperparam_dtype=jnp\.float32"):
            injected.init(params)
    else:
        injected.init(params)
    exact = optax.inject_hyperparams(method.factory, hyperparam_dtype=jnp.float32)
    state = exact(method.learning_rate, **method.kwargs).init(params)
    assert all(v.dtype == jnp.float32 for v in state.hyperparams.values()
               if jnp.issubdtype(v.dtype, jnp.floating))


# ------------------------------------------------ more adapter rank than the fit needs

# (m, n, r, rank of the target): a rank-1 fit at r = 4 and a rank-2 fit at r = 8, from b = 0;
# for the lifts (and AdamW) also r = min(m, n), where they stalled without the eigenvalue floor
# (the other methods fitted it when surveyed, issue 12 stop 24).
OVER_PARAMETERISED = [(16, 12, 4, 1), (64, 48, 8, 2)]
FULL_RANK_ADAPTER = (12, 12, 12, 2)
LIFTS = {"adamw", "adams", "adams_low_memory", "adams_riemannian_robust", "lracs",
         "sylvester_lift_adam"}
ADAMW = Method("adamw", lambda lr: optax.adamw(lr, weight_decay=0.0), 0.03)
# Methods whose fit must reach AdamW's order (below 1e-3 of the start loss). Near the solution
# the factors' Grams have near-null directions (the rank the fit does not use), and a factor's
# QR basis is arbitrary there. Before: with an absolute δ = 1e-6 the normalised-Gram modes
# inverted those directions (scaled_adamw stalled at 9e-3 / 6e-3 of the start loss,
# altlora_plus at 3e-2 / 4e-2); adams(low_memory=True) read its moment in bases that had
# changed (1e-2 / 8e-2); without the lift's eigenvalue floor adams and the lifted Adam stalled
# at 2e-3 and 2e-2 at r = min(m, n), adams(low_memory=True) at 4e-2. AdamW: 3e-7 / 2e-4 /
# 1e-7. Every other method must get below 1e-1 (lracs without the floor rose again after ~100
# steps: 4.1 and 1.5 times the start loss at 64×48 r8 and 12×12 r12, lr 0.01).
FIT_TO_ADAMW = {"adamw", "scaled_adamw", "altlora_plus", "lora_pro_adamw_factor", "adams",
                "adams_low_memory", "sylvester_lift_adam"}


def _over_parameterised_cases():
    for method in [ADAMW, *METHODS]:
        extra = [FULL_RANK_ADAPTER] if method.name in LIFTS else []
        for shape in OVER_PARAMETERISED + extra:
            yield pytest.param(method, shape, id="{}-{}x{}-r{}-rank{}".format(method.name, *shape))


@pytest.mark.parametrize(("method", "shape"), list(_over_parameterised_cases()))
def test_fits_a_target_of_lower_rank_than_the_adapter(method: Method, shape: tuple):
    m, n, r, rank = shape
    tx = method.make()

    @jax.jit
    def relative_loss(params, target):
        history = train(tx, params, factorization_loss(target), 300)[1]
        return history[-1] / history[0]

    bar = 1e-3 if method.name in FIT_TO_ADAMW else 1e-1
    for seed in (0, 1):
        target = jnp.asarray(factorization_target(seed=seed, m=m, n=n, rank=rank), jnp.float32)
        relative = float(relative_loss(lora_params(seed=seed + 1, m=m, n=n, rank=r), target))
        assert np.isfinite(relative) and relative < bar, (seed, relative)
