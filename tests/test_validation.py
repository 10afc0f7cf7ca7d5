"""Validation: out-of-range hyperparameters fail at construction; foreign states fail at update.

Hyperparameters: every public alias and ``scale_by_*`` (found by introspection, so a new
hyperparameter without a range fails ``test_every_numeric_hyperparameter_has_a_range``) rejects
each out-of-range static value with a message naming the function, the argument and the value,
accepts the boundary values of each range, and leaves arrays / tracers / schedules alone.

States: for every registered method (``tests/methods.py``), a state made by ``init`` for other
shapes is rejected iff its shapes differ from those ``init`` gives for the params, and the
message lists every differing entry with both shapes; a state made by another method is
rejected with the state types named.
"""

from __future__ import annotations

import inspect
import math
import re
import warnings

import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest
from methods import METHODS, Method

import lowrank_optax as lro
from lowrank_optax import validation

NAN, INF = math.nan, math.inf

FUNCTIONS = [
    getattr(lro, name) for name in lro.__all__
    if inspect.isfunction(getattr(lro, name)) and name != "altlora_active"
]

# Values for required positional arguments.
REQUIRED = {
    "learning_rate": 0.1,
    "base": optax.sgd(0.1),
    "inner": optax.sgd(0.1),
    "ratio": 4.0,
}

# Out-of-range values per argument name (the ranges of ``validation.RANGES``).
BAD = {
    "learning_rate": [-0.1, NAN],
    "b1": [-0.1, 1.0, 1.5],
    "b2": [-0.1, 1.0, 1.5],
    "eps": [-1e-8, INF],
    "delta": [-1e-6, NAN],
    "relative_delta": [-1e-2, INF],
    "eigenvalue_floor": [-1e-2, 1.5, NAN],
    "weight_decay": [-0.01],
    "scale": [0.0, -1.0],
    "ratio": [0.0, -2.0],
    "gamma": [0.99, 0.0],
    "power_iterations": [0, 2.5],
    "robust_steps": [-1, 1.5],
    "clip_unmagnified_grad": [-1.0],
    "update_capping": [-1.0],
    "update_skipping": [-0.5],
    "max_ratio": [0.0, -1.0, NAN],
    "cross_term_ratio": [0.0, -1.0],
}

# The legal end of each range (must be accepted).
BOUNDARY = {
    "learning_rate": 0.0,
    "b1": 0.0,
    "b2": 0.0,
    "eps": 0.0,
    "delta": 0.0,
    "relative_delta": 0.0,
    "eigenvalue_floor": 1.0,
    "weight_decay": 0.0,
    "scale": 1e-30,
    "ratio": 1e-30,
    "gamma": 1.0,
    "power_iterations": 1,
    "robust_steps": 0,
    "clip_unmagnified_grad": 0.0,
    "update_capping": 0.0,
    "update_skipping": 0.0,
    "max_ratio": 1e-30,
    "cross_term_ratio": 1e-30,
}

CHOICES = {"order": "c_first", "clip_scope": "layer", "moment": "half", "non_pair": "drop"}


def _build(fn, **overrides):
    kwargs = {name: REQUIRED[name] for name, p in inspect.signature(fn).parameters.items()
              if p.default is inspect.Parameter.empty
              and p.kind not in (p.VAR_KEYWORD, p.VAR_POSITIONAL)}
    args = ()
    if fn is lro.loraplus:   # loraplus(base, ratio=..., ...): the base is positional
        args = (optax.adamw,)
        kwargs["learning_rate"] = 0.1
    kwargs.update(overrides)
    return fn(*args, **kwargs)


def _params_of(fn):
    return inspect.signature(fn).parameters


def _cases(table):
    return [
        pytest.param(fn, name, value, id=f"{fn.__name__}-{name}={value}")
        for fn in FUNCTIONS for name in _params_of(fn) if name in table
        for value in (table[name] if isinstance(table[name], list) else [table[name]])
    ]


def test_every_numeric_hyperparameter_has_a_range():
    numeric = {
        (fn.__name__, name)
        for fn in FUNCTIONS for name, p in _params_of(fn).items()
        if isinstance(p.default, (int, float)) and not isinstance(p.default, bool)
    }
    assert numeric, "no numeric hyperparameters found: the introspection is broken"
    missing = sorted((f, n) for f, n in numeric if n not in BAD or n not in validation.RANGES)
    assert not missing, missing


@pytest.mark.parametrize(("fn", "name", "value"), _cases(BAD))
def test_out_of_range_hyperparameter_is_rejected(fn, name, value):
    pattern = rf"^{fn.__name__}: {name}={re.escape(str(value))} is (outside|not an integer)"
    with pytest.raises(ValueError, match=pattern) as info:
        _build(fn, **{name: value})
    assert str(validation.RANGES[name]).split(" in ")[-1] in str(info.value)


@pytest.mark.parametrize(("fn", "name", "value"), _cases(BOUNDARY))
def test_boundary_value_is_accepted(fn, name, value):
    assert isinstance(_build(fn, **{name: value}), optax.GradientTransformation)


@pytest.mark.parametrize(("fn", "name", "value"), _cases(CHOICES))
def test_unknown_option_is_rejected(fn, name, value):
    with pytest.raises(ValueError, match=rf"^{fn.__name__}: {name}='{value}' is not one of"):
        _build(fn, **{name: value})


def test_message_example_and_numpy_scalars():
    with pytest.raises(ValueError, match=re.escape("scaled_adamw: b1=1.5 is outside [0, 1)")):
        lro.scaled_adamw(1e-3, b1=1.5)
    with pytest.raises(ValueError, match=re.escape("lracs: gamma=0.5 is outside [1, inf)")):
        lro.lracs(1e-3, gamma=np.float32(0.5))
    with pytest.raises(ValueError, match="power_iterations=0 is outside integers in"):
        lro.lracs(1e-3, power_iterations=np.int64(0))
    with pytest.raises(TypeError, match="scaled_sgd: delta must be a number"):
        lro.scaled_sgd(0.1, delta="1e-6")
    with pytest.raises(TypeError, match="sylvester_lift: inner must be"):
        lro.sylvester_lift(optax.adam)


def test_concrete_arrays_are_checked():
    # What optax.inject_hyperparams passes to the factory in an eager init.
    with pytest.raises(ValueError, match=re.escape("scaled_adamw: learning_rate=-1.0 is outside")):
        lro.scaled_adamw(jnp.asarray(-1.0))
    with pytest.raises(ValueError, match=r"^lracs: b1=1\.5 is outside \[0, 1\)$"):
        lro.lracs(0.1, b1=jnp.asarray(1.5, jnp.float32))
    with pytest.raises(ValueError, match=r"b2=1\.0 is outside \[0, 1\) \(a float16 array"):
        lro.lora_rite(0.1, b2=jnp.asarray(1.0, jnp.float16))
    lro.scaled_adamw(jnp.asarray(0.1), b2=jnp.asarray(0.999, jnp.float16))


def test_tracers_and_schedules_are_not_checked():
    # Not inspected: a schedule, and traced values (unknown until the update runs).
    lro.scaled_adamw(optax.linear_schedule(0.0, -1.0, 10))
    params = {"lora_a": jnp.ones((6, 2)), "lora_b": jnp.ones((2, 5))}

    def step(b1, gamma, iterations):
        tx = lro.lracs(0.1, b1=b1, gamma=gamma, power_iterations=iterations)
        return tx.update(params, tx.init(params), params)[0]

    out = jax.eval_shape(step, 0.9, 1.01, 5)
    assert jax.tree.map(lambda x: x.shape, out) == jax.tree.map(lambda x: x.shape, params)


@pytest.mark.parametrize("method", METHODS, ids=str)
def test_inject_hyperparams_traces(method: Method):
    # optax.inject_hyperparams passes every numeric hyperparameter as an array (traced in
    # update under jit); construction must accept them and the state check must pass.
    params = {"q": {"lora_a": jnp.ones((6, 2)), "lora_b": jnp.ones((2, 5))}}
    tx = method.injected()

    def step(p):
        return tx.update(p, tx.init(p), p)

    updates, _ = jax.eval_shape(step, params)
    assert updates["q"]["lora_a"].shape == (6, 2)


# The transformation each registry entry builds, as its errors name it.
BUILT = {"sylvester_lift_adam": "sylvester_lift"}


@pytest.mark.parametrize("method", [m for m in METHODS if m.name != "loraplus_adamw"], ids=str)
def test_update_without_params_names_the_transformation_the_user_built(method: Method):
    """Not an inner ``scale_by_*``: ``scaled_adamw(...).update(g, s)`` names ``scaled_adamw``.
    (LoRA+ needs no params unless its base does.)"""
    params = {"q": {"lora_a": jnp.ones((6, 2)), "lora_b": jnp.ones((2, 5))}}
    tx = method.make()
    owner = BUILT.get(method.name, method.factory.__name__)
    with pytest.raises(ValueError, match=rf"^{owner}\.update needs the current parameters"):
        tx.update(params, tx.init(params))


def test_loraplus_over_sgd_updates_without_params():
    params = {"q": {"lora_a": jnp.ones((6, 2)), "lora_b": jnp.ones((2, 5))}}
    tx = lro.loraplus(optax.sgd, 4.0, learning_rate=0.1)
    updates, _ = tx.update(params, tx.init(params))
    np.testing.assert_allclose(updates["q"]["lora_b"], -0.4 * params["q"]["lora_b"])


# ----------------------------------------------------------------------------- states


def _pair(m, r, n, batch=()):
    rng = np.random.default_rng(m * 100 + r * 10 + n + len(batch))
    return {"lora_a": jnp.asarray(rng.normal(size=(*batch, m, r)), jnp.float32),
            "lora_b": jnp.asarray(rng.normal(size=(*batch, r, n)), jnp.float32)}


PARAMS = {"q": _pair(6, 2, 5), "v": _pair(6, 2, 5)}
VARIANTS = {
    "other_rank": {"q": _pair(6, 3, 5), "v": _pair(6, 3, 5)},
    "other_m": {"q": _pair(7, 2, 5), "v": _pair(6, 2, 5)},
    "extra_batch_axis": {"q": _pair(6, 2, 5), "v": _pair(6, 2, 5, (3,))},
}


def _shapes(tree):
    flat, _ = jax.tree_util.tree_flatten_with_path(tree)
    return {jax.tree_util.keystr(path): tuple(x.shape) for path, x in flat}


def _init(tx, params):
    """``tx.init(params)`` traced only (the battery checks it equals the concrete state)."""
    return jax.eval_shape(tx.init, params)


def _update_error(tx, state, params=PARAMS):
    """The ValueError of ``update`` (traced only), or ``None`` when it is accepted."""
    try:
        jax.eval_shape(tx.update, params, state, params)
    except ValueError as err:
        return str(err)
    return None


@pytest.mark.parametrize("variant", sorted(VARIANTS))
@pytest.mark.parametrize("method", METHODS, ids=str)
def test_state_for_other_shapes(method: Method, variant: str):
    tx = method.make()
    good, other = _shapes(_init(tx, PARAMS)), _shapes(_init(tx, VARIANTS[variant]))
    assert good.keys() == other.keys()
    differing = {path: (other[path], good[path]) for path in good if other[path] != good[path]}
    error = _update_error(tx, _init(tx, VARIANTS[variant]))
    if not differing:  # the state does not depend on what changed: it is valid for PARAMS
        assert error is None, error
        return
    assert error is not None, f"{method}: state for {variant} accepted"
    assert "does not match the params" in error
    for path, (got, expected) in differing.items():
        assert f"state{path} has shape {got}, expected {expected}" in error, (path, error)
    assert error.count(" has shape ") == len(differing), error


def _witness(method: Method) -> Method:
    """A registered method whose state has another structure than ``method``'s."""
    own = jax.tree.structure(_init(method.make(), PARAMS))
    for other in METHODS:
        if jax.tree.structure(_init(other.make(), PARAMS)) != own:
            return other
    raise AssertionError("every method has the same state structure")


@pytest.mark.parametrize("method", METHODS, ids=str)
def test_state_from_another_method(method: Method):
    other = _witness(method)
    error = _update_error(method.make(), _init(other.make(), PARAMS))
    assert error is not None, f"{method} accepted the state of {other}"
    assert "does not match the params" in error
    assert re.search(r"state\S* (is a \w+, expected a \w+|is missing|has shape|\(shape)", error)


def test_state_type_names_both_types():
    error = _update_error(lro.adams(0.1), _init(lro.lracs(0.1), PARAMS))
    assert "state[0] is a ScaleByLRACSState, expected a ScaleByAdamSState" in error
    error = _update_error(lro.scale_by_lora_rite(), _init(lro.scale_by_adams(), PARAMS))
    assert error.startswith("scale_by_lora_rite: ")
    assert "state is a ScaleByAdamSState, expected a ScaleByLoRARiteState" in error


def test_every_wrong_pair_is_named_with_its_factor_shapes():
    params = {"q": _pair(6, 2, 5), "v": _pair(6, 2, 5), "o": _pair(6, 2, 5)}
    wrong = {"q": _pair(8, 2, 5), "v": _pair(6, 2, 5), "o": _pair(6, 2, 5, (3,))}
    tx = lro.altlora(0.1)
    error = _update_error(tx, _init(tx, wrong), params)
    assert "state[0].mu['q'].a has shape (8, 2), expected (6, 2) (pair at ['q']: " \
           "a (6, 2), b (2, 5))" in error
    assert "state[0].anchor['o'].b has shape (3, 2, 5), expected (2, 5) (pair at " \
           "['o']" in error
    assert "['v']" not in error


def test_state_of_another_tree_names_missing_and_extra_entries():
    tx = lro.scale_by_lora_pro_adam()
    error = _update_error(tx, _init(tx, {"q": _pair(6, 2, 5), "k": _pair(6, 2, 5)}))
    assert "state.mu['v'] is missing, expected shape (6, 5)" in error
    assert "state.mu['k'] (shape (6, 5)) is not part of this optimizer's state" in error


def test_check_raises_under_jit_and_adds_nothing_to_the_computation():
    tx = lro.lora_rite(0.1)
    with pytest.raises(ValueError, match=r"state\[0\]\.nu\['v'\]\.a has shape \(3, 3\)"):
        jax.jit(tx.update).lower(PARAMS, _init(tx, VARIANTS["other_rank"]), PARAMS)
    raw = optax.adam(0.1)
    checked = validation.with_state_check("adam", raw)
    state = raw.init(PARAMS)
    assert str(jax.make_jaxpr(checked.update)(PARAMS, state, PARAMS)) == str(
        jax.make_jaxpr(raw.update)(PARAMS, state, PARAMS))


def test_loraplus_checks_against_updates_without_params():
    tx = lro.loraplus(optax.adam(0.1), 4.0)
    error = None
    try:
        tx.update(PARAMS, tx.init(VARIANTS["other_m"]))
    except ValueError as err:
        error = str(err)
    assert error is not None and "loraplus: " in error
    assert "['q']['lora_a'] has shape (7, 2), expected (6, 2)" in error


def _error_of_updates(tx, updates) -> str:
    """The ValueError message of ``update`` with these updates for ``PARAMS``."""
    with pytest.raises(ValueError) as info:
        tx.update(updates, tx.init(PARAMS), PARAMS)
    return str(info.value)


@pytest.mark.parametrize("method", METHODS, ids=str)
def test_updates_that_do_not_match_the_params_name_every_pair(method: Method):
    # A gradient of the wrong shape and a missing (None) factor, in two different pairs: both
    # are named with their tree paths and shapes, before any base optimizer sees them.
    tx = method.make()
    updates = {"q": {"lora_a": jnp.ones((7, 2)), "lora_b": jnp.ones((2, 5))},
               "v": {"lora_a": jnp.ones((6, 2)), "lora_b": None}}
    error = _error_of_updates(tx, updates)
    assert "the updates do not have the leaves of the params" in error
    assert "updates['q']['lora_a'] has shape (7, 2), params have (6, 2)" in error
    assert "params['v']['lora_b'] (shape (2, 5)) has no update (missing or None)" in error
    # Same structure, wrong shapes in two pairs: the pair map names both.
    updates["v"]["lora_b"] = jnp.ones((2, 4))
    error = _error_of_updates(tx, updates)
    assert "updates do not match the params" in error
    assert "at ['q']: factor a has shape (7, 2) but params have (6, 2)" in error
    assert "at ['v']: factor b has shape (2, 4) but params have (2, 5)" in error


@pytest.mark.parametrize("method", METHODS, ids=str)
def test_gradient_of_the_whole_model_is_named(method: Method):
    # The gradient of every parameter, given to an optimizer of the LoRA factors only.
    tx = method.make()
    updates = {**PARAMS, "q": {**PARAMS["q"], "kernel": jnp.ones((6, 5))},
               "head": jnp.ones((3,))}
    error = _error_of_updates(tx, updates)
    assert "updates['q']['kernel'] (shape (6, 5)) is not in the params" in error
    assert "updates['head'] (shape (3,)) is not in the params" in error


@pytest.mark.parametrize(("factory", "name"), [(lro.lracs, "power_iterations"),
                                               (lro.quotient_sgd, "robust_steps"),
                                               (lro.adams, "robust_steps")])
def test_integer_hyperparameter_injected_as_float_is_refused(factory, name):
    # inject_hyperparams turns 2.5 into a float32 array, which has no range check (its value may
    # be traced) but must not reach a loop bound or a step comparison.
    with pytest.raises(TypeError, match=f"{name} must be an integer, got an array of dtype "
                                        "float32"):
        optax.inject_hyperparams(factory)(0.1, **{name: 2.5}).init(PARAMS)
    tx = optax.inject_hyperparams(factory)(0.1, **{name: 3})
    updates, _ = tx.update(PARAMS, tx.init(PARAMS), PARAMS)
    assert all(bool(jnp.all(jnp.isfinite(u))) for u in jax.tree.leaves(updates))


@pytest.mark.parametrize("method", METHODS, ids=str)
def test_init_on_a_tree_without_pairs_warns(method: Method):
    # A model with no LoRA layer under nnx.Optimizer(wrt=nnx.LoRAParam) gives an empty tree:
    # legal for optax, but the optimizer would train nothing, silently.
    with pytest.warns(UserWarning, match="no LoRA pair.*will update nothing"):
        method.make().init({})
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        method.make().init(PARAMS)


def test_nnx_model_without_lora_layers_warns():
    from flax import nnx

    class Plain(nnx.Module):
        def __init__(self, rngs):
            self.dense = nnx.Linear(3, 2, rngs=rngs)

    with pytest.warns(UserWarning, match="check that the model has LoRA layers"):
        nnx.Optimizer(Plain(nnx.Rngs(0)), lro.scaled_adamw(1e-3), wrt=nnx.LoRAParam)


def _flag_cases():
    return [pytest.param(fn, name, id=f"{fn.__name__}-{name}")
            for fn in FUNCTIONS for name, p in _params_of(fn).items()
            if isinstance(p.default, bool)]


def test_every_boolean_option_is_checked_as_a_flag():
    flags = {name for fn in FUNCTIONS for name, p in _params_of(fn).items()
             if isinstance(p.default, bool)}
    assert flags, "no boolean options found: the introspection is broken"
    assert flags <= validation.FLAGS, sorted(flags - validation.FLAGS)


@pytest.mark.parametrize(("fn", "name"), _flag_cases())
def test_boolean_option_refuses_anything_but_a_bool(fn, name):
    # "False" is truthy: read as True it would silently build the other variant.
    for value in ("False", 0):
        with pytest.raises(TypeError,
                           match=rf"^{fn.__name__}: {name} must be True or False, got {value!r}"):
            _build(fn, **{name: value})
    assert isinstance(_build(fn, **{name: np.bool_(False)}), optax.GradientTransformation)


@pytest.mark.parametrize("fn", [fn for fn in FUNCTIONS if "keys" in _params_of(fn)],
                         ids=lambda fn: fn.__name__)
def test_keys_must_be_pair_keys(fn):
    with pytest.raises(TypeError, match=r"keys must be a lowrank_optax.PairKeys, got 'lora'"):
        _build(fn, keys="lora")


def test_pair_keys_refuse_overlapping_or_empty_suffixes():
    with pytest.raises(ValueError, match=r"a='x' and b='x' overlap"):
        lro.PairKeys(a="x", b="x")
    with pytest.raises(ValueError, match=r"a='w_lora_a' and b='lora_a' overlap"):
        lro.PairKeys(a="w_lora_a", b="lora_a")
    with pytest.raises(TypeError, match=r"stats=None is not a non-empty string"):
        lro.PairKeys(stats=None)
    assert lro.PairKeys(a="down", b="up").a == "down"
