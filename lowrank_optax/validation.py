"""Validation: hyperparameters at construction, optimizer states at ``update``.

Every alias and ``scale_by_*`` of the library calls :func:`check_hyperparams` (and
:func:`check_choice` for string options) before building anything, and wraps the
transformation it returns with :func:`with_state_check`, so that

* an out-of-range hyperparameter raises ``ValueError("<function>: <name>=<value> is outside
  <range>")`` when the optimizer is constructed, not a NaN many steps later. Only static
  values are checked (Python and NumPy scalars, and concrete scalar ``jax.Array`` values,
  which ``optax.inject_hyperparams`` passes in an eager ``init``): a tracer and a schedule
  are left alone, except that an integer hyperparameter must have an integer dtype;
* a state that does not belong to the params (built by ``init`` for other shapes, ranks or batch
  axes, or by another optimizer) raises a ``ValueError`` at the first ``update`` that lists
  every offending state entry with its tree path, its shape and the expected shape. The
  expected state is ``jax.eval_shape`` of the transformation's own ``init`` on the params, so the
  check is exact for every method and costs nothing at run time: it runs once per trace under
  ``jit`` (and is cached per parameter shapes for eager calls).
"""

from __future__ import annotations

import dataclasses
import math
import warnings
from collections.abc import Iterable
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np
import optax

from lowrank_optax.pairs import DEFAULT_KEYS, PairKeys, PairTree, require_params

__all__ = [
    "Interval",
    "check_choice",
    "check_hyperparams",
    "check_keys",
    "with_state_check",
]


@dataclasses.dataclass(frozen=True)
class Interval:
    """An allowed range ``[low, high)`` (ends open or closed; ``integer`` for counts)."""

    low: float
    high: float = math.inf
    low_open: bool = False
    high_open: bool = True
    integer: bool = False

    def __contains__(self, value: Any) -> bool:
        above = value > self.low if self.low_open else value >= self.low
        below = value < self.high if self.high_open else value <= self.high
        return bool(above and below)

    def __str__(self) -> str:
        text = (f"{'(' if self.low_open else '['}{self.low:g}, "
                f"{self.high:g}{')' if self.high_open else ']'}")
        return f"integers in {text}" if self.integer else text


NONNEGATIVE = Interval(0.0)
POSITIVE = Interval(0.0, low_open=True)
DECAY = Interval(0.0, 1.0)
AT_LEAST_ONE = Interval(1.0)
COUNT = Interval(0.0, integer=True)
POSITIVE_COUNT = Interval(1.0, integer=True)

# The range of every numeric hyperparameter of the library, by argument name (the names mean
# the same thing in every method).
RANGES: dict[str, Interval] = {
    "learning_rate": NONNEGATIVE,
    "b1": DECAY,
    "b2": DECAY,
    "eps": NONNEGATIVE,
    "delta": NONNEGATIVE,
    "relative_delta": NONNEGATIVE,
    "eigenvalue_floor": Interval(0.0, 1.0, high_open=False),
    "weight_decay": NONNEGATIVE,
    "scale": POSITIVE,
    "ratio": POSITIVE,
    "gamma": AT_LEAST_ONE,
    "power_iterations": POSITIVE_COUNT,
    "robust_steps": COUNT,
    "clip_unmagnified_grad": NONNEGATIVE,
    "update_capping": NONNEGATIVE,
    "update_skipping": NONNEGATIVE,
    "max_ratio": POSITIVE,
    "cross_term_ratio": POSITIVE,
}


# The boolean options (static: they choose the computation). A string such as "False" is
# truthy, so anything but a bool is refused rather than read as True.
FLAGS = frozenset({"apply_escape", "balance", "bias_correction", "full_state", "joint",
                   "low_memory", "normalize_grams", "reference_code",
                   "riemannian_second_moment", "second_moment", "transport_moment"})


def _static_number(value: Any) -> bool:
    """Whether ``value`` is a concrete Python / NumPy number (not an array, tracer or schedule)."""
    if isinstance(value, np.ndarray):
        return value.ndim == 0 and np.issubdtype(value.dtype, np.number)
    return isinstance(value, (int, float, np.integer, np.floating))


def check_hyperparams(owner: str, **values: Any) -> None:
    """Raises ``ValueError`` for a static hyperparameter outside its range in :data:`RANGES`,
    ``TypeError`` for a non-number or for a boolean option (:data:`FLAGS`) that is not a bool.

    ``None``, schedules (callables) and tracers are not range-checked (their values are
    unknown); a concrete scalar ``jax.Array`` is (``optax.inject_hyperparams`` passes one in an
    eager ``init``). An integer hyperparameter given as a floating-point array
    (``optax.inject_hyperparams`` turns ``2.5`` into one) raises ``TypeError``.
    """
    for name, value in values.items():
        if name in FLAGS:
            if not isinstance(value, (bool, np.bool_)):
                raise TypeError(f"{owner}: {name} must be True or False, got {value!r}")
            continue
        interval = RANGES[name]
        if isinstance(value, jax.Array):
            if interval.integer and not np.issubdtype(value.dtype, np.integer):
                raise TypeError(
                    f"{owner}: {name} must be an integer, got an array of dtype {value.dtype} "
                    f"(under optax.inject_hyperparams pass an int, or static_args=('{name}',))")
            if not _concrete_scalar(value):
                continue
            number = value.reshape(()).item()
        elif value is None or callable(value):
            continue
        elif not _static_number(value):
            raise TypeError(f"{owner}: {name} must be a number, got {value!r}")
        else:
            number = value.item() if isinstance(value, np.ndarray) else value
            if interval.integer and not isinstance(number, (int, np.integer)):
                raise ValueError(
                    f"{owner}: {name}={number} is not an integer (allowed: {interval})")
        if number not in interval:
            raise ValueError(f"{owner}: {name}={number} is outside {interval}{_cast_hint(value)}")


def _concrete_scalar(value: jax.Array) -> bool:
    """Whether ``value`` is a scalar whose number this process can read: what
    ``optax.inject_hyperparams`` passes to the factory in an eager ``init`` (not a tracer, and
    not an array with shards on other processes, which would need every process to read)."""
    return (not isinstance(value, jax.core.Tracer) and value.size == 1
            and value.is_fully_addressable)


def _cast_hint(value: Any) -> str:
    """For a float16 / bfloat16 array: ``optax.inject_hyperparams`` cast it to the params' dtype,
    which is where a bfloat16 model loses ``b2 = 0.999`` (it rounds to 1, and Adam's bias
    correction to 0/0). Names the cast and its remedy; empty for anything else."""
    if getattr(value, "dtype", None) not in (jnp.bfloat16, jnp.float16):
        return ""
    return (f" (a {value.dtype} array: optax.inject_hyperparams casts float hyperparameters to "
            f"the params' dtype; pass hyperparam_dtype=jnp.float32 to keep them exact)")


def check_choice(owner: str, name: str, value: Any, choices: Iterable[Any]) -> None:
    """Raises ``ValueError`` unless ``value`` is one of ``choices``."""
    choices = tuple(choices)
    if value not in choices:
        raise ValueError(f"{owner}: {name}={value!r} is not one of {choices}")


def check_keys(owner: str, keys: Any) -> None:
    """Raises ``TypeError`` unless ``keys`` is a :class:`~lowrank_optax.PairKeys`."""
    if not isinstance(keys, PairKeys):
        raise TypeError(f"{owner}: keys must be a lowrank_optax.PairKeys, got {keys!r}")


# ----------------------------------------------------------------------------- state check

EMPTY_PARAMS_WARNING = (
    "lowrank_optax: init got params with no array (no LoRA pair): this optimizer will update "
    "nothing. With nnx.Optimizer(model, tx, wrt=nnx.LoRAParam), check that the model has LoRA "
    "layers; with optax.partition, that some parameter carries this optimizer's label.")

Path = tuple[Any, ...]


def _is_named_tuple(x: Any) -> bool:
    return isinstance(x, tuple) and hasattr(x, "_fields")


def _children(x: Any) -> list[tuple[Any, Any]]:
    """``(key, child)`` one level below ``x``; empty for a leaf or ``None``."""
    flat, _ = jax.tree_util.tree_flatten_with_path(x, is_leaf=lambda y: y is not x)
    return [(path[0], child) for path, child in flat if path]


def _leaves(tree: Any) -> dict[Path, Any]:
    flat, _ = jax.tree_util.tree_flatten_with_path(tree)
    return {tuple(path): leaf for path, leaf in flat}


def _shape(x: Any) -> tuple[int, ...]:
    return tuple(getattr(x, "shape", np.shape(x)))


def _type_mismatches(path: Path, expected: Any, got: Any, found: dict[Path, str]) -> None:
    """Paths where ``got`` has another state type (NamedTuple) than ``expected``."""
    if _is_named_tuple(expected) or _is_named_tuple(got):
        if type(expected) is not type(got):
            found[path] = (f"a {type(got).__name__}, expected a {type(expected).__name__} "
                           "(a state made by another optimizer?)")
            return
    got_children = dict(_children(got))
    for key, child in _children(expected):
        if key in got_children:
            _type_mismatches((*path, key), child, got_children[key], found)


def _pair_owners(expected: Any, structure: PairTree | None) -> dict[Path, int]:
    """For each leaf of the expected state, the index of the pair it belongs to (if any)."""
    owners: dict[Path, int] = {}
    if structure is None:
        return owners
    placeholders = structure.treedef.unflatten(range(structure.treedef.num_leaves))
    pair_paths = [tuple(path) for path, _ in
                  jax.tree_util.tree_flatten_with_path(placeholders)[0]]

    def visit(path: Path, node: Any) -> None:
        if not _is_named_tuple(node):
            try:
                items = structure.treedef.flatten_up_to(node)
            except (ValueError, TypeError):
                items = None
            if items is not None:
                for i, (pair_path, item) in enumerate(zip(pair_paths, items)):
                    for leaf_path in _leaves(item):
                        owners[(*path, *pair_path, *leaf_path)] = i
                return
        for key, child in _children(node):
            visit((*path, key), child)

    visit((), expected)
    return owners


def _under(path: Path, prefixes: Iterable[Path]) -> bool:
    return any(path[: len(p)] == p for p in prefixes)


def state_mismatches(expected: Any, state: Any, reference: Any, keys: PairKeys) -> list[str]:
    """One line per state entry that does not match the abstract ``expected`` state."""
    types: dict[Path, str] = {}
    _type_mismatches((), expected, state, types)
    try:
        structure: PairTree | None = PairTree(reference, keys)
    except ValueError:
        structure = None
    owners = _pair_owners(expected, structure)
    name = lambda path: "state" + jax.tree_util.keystr(path)  # noqa: E731

    def pair_note(path: Path) -> str:
        i = owners.get(path)
        pair = None if i is None or structure is None else structure.pairs[i]
        if pair is None:
            return ""
        return (f" (pair at {structure.paths[i] or '<root>'}: a {_shape(pair.a)}, "
                f"b {_shape(pair.b)})")

    lines = [f"{name(path)} is {text}" for path, text in types.items()]
    want, have = _leaves(expected), _leaves(state)
    for path, leaf in want.items():
        if _under(path, types):
            continue
        if path not in have:
            lines.append(f"{name(path)} is missing, expected shape {_shape(leaf)}"
                         f"{pair_note(path)}")
        elif _shape(have[path]) != _shape(leaf):
            lines.append(f"{name(path)} has shape {_shape(have[path])}, expected "
                         f"{_shape(leaf)}{pair_note(path)}")
    lines += [f"{name(path)} (shape {_shape(leaf)}) is not part of this optimizer's state"
              for path, leaf in have.items() if path not in want and not _under(path, types)]
    return lines


def update_mismatches(updates: Any, params: Any) -> list[str]:
    """When the trees differ: one line per leaf that ``updates`` has and ``params`` lacks (a
    gradient of the whole model for an optimizer of its LoRA factors), the reverse (a ``None``
    factor) and each common leaf of another shape. Same structure: nothing (the pair maps
    check the factors' shapes)."""
    if jax.tree.structure(updates) == jax.tree.structure(params):
        return []
    have, want = _leaves(updates), _leaves(params)
    name = jax.tree_util.keystr
    lines = []
    for path, leaf in have.items():
        if path not in want:
            lines.append(f"updates{name(path)} (shape {_shape(leaf)}) is not in the params")
        elif _shape(leaf) != _shape(want[path]):
            lines.append(f"updates{name(path)} has shape {_shape(leaf)}, params have "
                         f"{_shape(want[path])}")
    return lines + [f"params{name(path)} (shape {_shape(leaf)}) has no update (missing or None)"
                    for path, leaf in want.items() if path not in have]


def _signature(tree: Any) -> Any:
    """A hashable key of a tree's structure and shapes (``None`` when not hashable)."""
    leaves, treedef = jax.tree.flatten(tree)
    key = (treedef, tuple(_shape(x) for x in leaves))
    try:
        hash(key)
    except TypeError:
        return None
    return key


def with_state_check(
    owner: str,
    tx: optax.GradientTransformation,
    keys: PairKeys = DEFAULT_KEYS,
    needs_params: bool = True,
) -> optax.GradientTransformationExtraArgs:
    """``tx`` whose ``update`` first checks that ``params`` are given (when ``needs_params``:
    the error then names ``owner``, the transformation the user built, not an inner one),
    that ``updates`` have the leaves of the params
    (:func:`update_mismatches`) and that ``state`` is ``tx.init``'s state for the params,
    and whose ``init`` warns (:data:`EMPTY_PARAMS_WARNING`, once per process) when the params
    hold no array at all: legal for optax, but for a LoRA optimizer a model without LoRA layers
    or a filter that selected nothing, which would otherwise train nothing silently.

    The expected state is ``jax.eval_shape(tx.init, params)`` (``updates`` when ``params`` is
    ``None``): state types and every entry's shape must agree (dtypes may differ). A mismatch
    raises ``ValueError`` listing every offending entry with its path, both shapes and, for
    per-pair entries, the pair's path and factor shapes. Trace-time only; the expected state is
    cached per parameter shapes, and a state with exactly the expected structure and shapes is
    accepted without further work. ``keys`` that are not a :class:`PairKeys` raise
    ``TypeError`` here, at construction.
    """
    check_keys(owner, keys)
    inner = optax.with_extra_args_support(tx)
    cache: dict[Any, tuple[Any, Any]] = {}

    def expected_state(reference: Any) -> tuple[Any, Any]:
        key = _signature(reference)
        if key is not None and key in cache:
            return cache[key]
        expected = jax.eval_shape(inner.init, reference)
        entry = (expected, _signature(expected))
        if key is not None:
            if len(cache) >= 8:
                cache.clear()
            cache[key] = entry
        return entry

    def update_fn(updates, state, params=None, **extra_args):
        if needs_params:
            require_params(params, owner)
        if params is not None:
            lines = update_mismatches(updates, params)
            if lines:
                raise ValueError(f"{owner}: the updates do not have the leaves of the params:\n  "
                                 + "\n  ".join(lines))
        reference = updates if params is None else params
        expected, signature = expected_state(reference)
        if signature is None or _signature(state) != signature:
            lines = state_mismatches(expected, state, reference, keys)
            if lines:
                raise ValueError(
                    f"{owner}: the optimizer state does not match the params (it was made by "
                    "init for other params, or by another optimizer):\n  " + "\n  ".join(lines)
                )
        return inner.update(updates, state, params, **extra_args)

    def init_fn(params):
        if not jax.tree.leaves(params):
            warnings.warn(EMPTY_PARAMS_WARNING, stacklevel=1)
        return inner.init(params)

    return optax.GradientTransformationExtraArgs(init_fn, update_fn)
