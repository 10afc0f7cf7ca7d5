"""Trees of LoRA factor pairs: discovery, validation and batched per-pair mapping.

Every optimizer in this library acts on *pairs* ``(a, b)`` of LoRA factors, with the library
convention ``delta_W = scale * a @ b``, ``a: (..., m, r)``, ``b: (..., r, n)``. A pair appears in a
parameter tree either as a :class:`LoRAPair` node or as a mapping (``dict``, ``FrozenDict``,
``nnx.State``) that holds exactly the two factors under the keys of :class:`PairKeys` (by default
``lora_a`` / ``lora_b``, the names of ``flax.nnx.LoRA``), optionally with a third entry holding a
full-gradient statistics probe (see ``lowrank_optax.flax``).

:func:`map_pairs` is the single traversal every transformation uses. It

* finds the pairs, validates shapes, dtypes and ranks and reports errors with the tree path;
* lifts each factor to at least float32 and casts results back to the dtype of the incoming
  update (new state keeps the dtype of the old state), so bf16 models get bf16 updates and the
  state dtype never drifts;
* groups pairs whose arrays have identical types, stacks each group and ``vmap``s the per-pair
  function over the group and over every leading batch axis, so the r×r work of all same-shaped
  pairs runs as one batched computation and per-pair code is written for plain 2-D factors;
* keeps shardings stable on a device mesh: updates are sharded like the gradients, new state
  like the old state, and state made by :func:`init_pairs` like the factors (axis by axis), on
  ``Auto`` meshes (eager calls; under ``jit`` pin ``out_shardings``) and ``Explicit`` ones;
* passes holes (``optax.MaskedNode``, placeholders of ``optax.tree.map_params``) through;
* traces the per-pair function under :data:`MATMUL_PRECISION` (full float32 products), so that
  accelerators whose default float32 matmul is reduced-precision (TF32 on NVIDIA GPUs, bf16
  passes on TPUs) still solve the r×r systems in float32.
"""

from __future__ import annotations

import dataclasses
from collections.abc import Callable, Mapping, Sequence
from typing import Any, NamedTuple

import jax
import jax.numpy as jnp
import optax

__all__ = [
    "DEFAULT_KEYS",
    "MATMUL_PRECISION",
    "LoRAPair",
    "PairKeys",
    "PairTree",
    "abstract_safe_init",
    "init_pairs",
    "is_pair_node",
    "keep_update_dtypes",
    "map_pairs",
    "require_params",
]


class LoRAPair(NamedTuple):
    """One LoRA factor pair, ``delta_W = scale * a @ b``.

    Attributes:
      a: input-side factor, shape ``(..., m, r)``.
      b: output-side factor, shape ``(..., r, n)``.
      stats: optional full-gradient statistics probe (a pytree, or ``None``). Its gradient
        carries statistics of ``G = dL/dW`` computed inside the backward pass; transformations
        that do not use it return zero updates for it.
    """

    a: Any
    b: Any
    stats: Any = None


@dataclasses.dataclass(frozen=True)
class PairKeys:
    """Mapping keys under which a pair's factors are found.

    Attributes:
      a: key of the ``(..., m, r)`` factor (``flax.nnx.LoRA`` names it ``lora_a``).
      b: key of the ``(..., r, n)`` factor (``lora_b``).
      stats: key of the optional full-gradient statistics probe.
    """

    a: str = "lora_a"
    b: str = "lora_b"
    stats: str = "lora_stats"


DEFAULT_KEYS = PairKeys()


def is_pair_node(x: Any, keys: PairKeys) -> bool:
    if isinstance(x, LoRAPair):
        return True
    if isinstance(x, Mapping) and not isinstance(x, jax.ShapeDtypeStruct):
        names = set(x.keys())
        return names in ({keys.a, keys.b}, {keys.a, keys.b, keys.stats})
    return False


def _members(node: Any, keys: PairKeys) -> tuple[Any, Any, Any]:
    if isinstance(node, LoRAPair):
        return node.a, node.b, node.stats
    return node[keys.a], node[keys.b], node.get(keys.stats)


def _single_array(x: Any) -> Any:
    """The one array inside a factor entry (unwraps ``nnx.Variable``); ``None`` for a hole."""
    leaves = jax.tree.leaves(x)
    if not leaves:
        return None
    if len(leaves) != 1:
        raise ValueError(f"a LoRA factor entry must hold one array, got {len(leaves)}")
    return leaves[0]


def _replace_single_array(entry: Any, value: Any) -> Any:
    return jax.tree.unflatten(jax.tree.structure(entry), [value])


def _rebuild(node: Any, keys: PairKeys, a: Any, b: Any, stats: Any) -> Any:
    """``node`` with its factor arrays replaced, keeping node and entry types."""
    old_a, old_b, old_stats = _members(node, keys)
    new_a = _replace_single_array(old_a, a)
    new_b = _replace_single_array(old_b, b)
    new_stats = None if old_stats is None else jax.tree.map(lambda _, s: s, old_stats, stats)
    if isinstance(node, LoRAPair):
        return LoRAPair(new_a, new_b, new_stats)
    children, treedef = jax.tree_util.tree_flatten_with_path(node, is_leaf=lambda x: x is not node)
    replacement = {keys.a: new_a, keys.b: new_b, keys.stats: new_stats}
    return jax.tree.unflatten(treedef, [replacement[path[0].key] for path, _ in children])


def _shape(x: Any) -> tuple[int, ...]:
    return tuple(getattr(x, "shape", ()))


class PairTree:
    """The pair-level structure of a tree: its pairs are the leaves of :attr:`treedef`.

    Args:
      tree: a tree of pairs (params, updates, or anything mirroring them).
      keys: mapping keys of the factors.
      what: name of the tree, for error messages.

    Raises:
      ValueError: for a leaf outside any pair, a pair split by a mask, or factors whose
        shapes, ranks, batch axes or dtypes are inconsistent; the message names the tree path.
    """

    def __init__(self, tree: Any, keys: PairKeys = DEFAULT_KEYS, what: str = "params"):
        self.keys = keys
        is_leaf = lambda x: is_pair_node(x, keys)  # noqa: E731
        flat, self.treedef = jax.tree_util.tree_flatten_with_path(tree, is_leaf=is_leaf)
        self.paths = [jax.tree_util.keystr(path) for path, _ in flat]
        self.nodes = [node for _, node in flat]
        self.pairs: list[LoRAPair | None] = []
        for path, node in zip(self.paths, self.nodes):
            if not is_leaf(node):
                raise ValueError(
                    f"{what} leaf at {path or '<root>'} (shape {_shape(node)}) is not part of a "
                    f"LoRA pair ({keys.a!r}/{keys.b!r} mapping or LoRAPair). Route such leaves "
                    "to another transformation with optax.partition or optax.multi_transform."
                )
            self.pairs.append(self._checked_pair(path, node, what))

    def _checked_pair(self, path: str, node: Any, what: str) -> LoRAPair | None:
        entry_a, entry_b, stats = _members(node, self.keys)
        a, b = _single_array(entry_a), _single_array(entry_b)
        if a is None and b is None:
            return None
        if a is None or b is None:
            raise ValueError(
                f"LoRA pair at {path} in {what} is split: one factor is masked or missing "
                f"(a: {_shape(a)}, b: {_shape(b)}); mask or route both factors together."
            )
        _validate_pair(path, a, b)
        return LoRAPair(a, b, stats)

    @property
    def num_pairs(self) -> int:
        return sum(p is not None for p in self.pairs)

    def items(self, tree: Any, what: str) -> list[Any]:
        """The per-pair entries of ``tree``, a tree with this pair-level structure."""
        try:
            return self.treedef.flatten_up_to(tree)
        except (ValueError, TypeError) as err:
            raise ValueError(
                f"{what} does not have the pair structure of params (pairs at {self.paths}): {err}"
            ) from err

    def pairs_of(self, tree: Any, what: str) -> list[LoRAPair | None]:
        """The factor arrays of ``tree`` pair by pair, checked against the params' shapes."""
        result = []
        for path, ref, node in zip(self.paths, self.pairs, self.items(tree, what)):
            if ref is None:
                result.append(None)
                continue
            if not is_pair_node(node, self.keys):
                raise ValueError(f"{what} at {path}: expected a LoRA pair, got {type(node)}")
            entry_a, entry_b, stats = _members(node, self.keys)
            a, b = _single_array(entry_a), _single_array(entry_b)
            for name, x, r in (("a", a, ref.a), ("b", b, ref.b)):
                if _shape(x) != _shape(r):
                    raise ValueError(
                        f"{what} at {path}: factor {name} has shape {_shape(x)} but params have "
                        f"{_shape(r)}"
                    )
            result.append(LoRAPair(a, b, stats))
        return result

    def unflatten(self, items: Sequence[Any]) -> Any:
        return self.treedef.unflatten(list(items))

    def rebuild(self, like: Any, new_pairs: Sequence[LoRAPair | None]) -> Any:
        """``like`` (a tree of pairs) with its factor arrays replaced by ``new_pairs``."""
        nodes = self.items(like, "updates")
        out = [
            node if new is None else _rebuild(node, self.keys, new.a, new.b, new.stats)
            for node, new in zip(nodes, new_pairs)
        ]
        return self.unflatten(out)


def _validate_pair(path: str, a: Any, b: Any) -> None:
    sa, sb = _shape(a), _shape(b)
    where = f"LoRA pair at {path}: a {sa}, b {sb}"
    if len(sa) < 2 or len(sb) < 2:
        raise ValueError(f"{where}: factors need at least 2 dimensions (..., m, r) / (..., r, n)")
    if sa[:-2] != sb[:-2]:
        raise ValueError(f"{where}: leading batch axes differ ({sa[:-2]} vs {sb[:-2]})")
    if sa[-1] != sb[-2]:
        raise ValueError(f"{where}: ranks differ (a has r={sa[-1]}, b has r={sb[-2]})")
    if sa[-1] > min(sa[-2], sb[-1]):
        raise ValueError(f"{where}: rank r={sa[-1]} exceeds min(m, n)={min(sa[-2], sb[-1])}")
    for name, x in (("a", a), ("b", b)):
        if not jnp.issubdtype(x.dtype, jnp.floating):
            raise ValueError(f"{where}: factor {name} has non-float dtype {x.dtype}")


def require_params(params: Any, name: str) -> None:
    """Raises the library's error for ``update`` called without ``params``."""
    if params is None:
        raise ValueError(
            f"{name}.update needs the current parameters: call update(updates, state, params)."
        )


# XLA's default float32 matmul on NVIDIA GPUs is TF32 (10-bit mantissa), on TPUs bf16 passes:
# Gram matrices and projections of ill-conditioned factors lose the digits the r×r solves need
# (measured on an H200: updates off by ~1e-3 relative where CPU agrees to 1e-6).
MATMUL_PRECISION = "highest"


def compute_dtype(dtype: Any) -> Any:
    """The dtype used for internal math: at least float32."""
    return jnp.promote_types(dtype, jnp.float32)


def _lift(tree: Any) -> Any:
    return jax.tree.map(lambda x: x.astype(compute_dtype(x.dtype)), tree)


def _placement(x: Any) -> Any:
    """The sharding of a concrete array (eager calls); under ``jit`` only the type is known."""
    return None if isinstance(x, jax.core.Tracer) else getattr(x, "sharding", None)


def _signature(tree: Any) -> tuple[Any, ...]:
    """Arrays with equal signatures are stacked together: same types, and same placements."""
    leaves, treedef = jax.tree.flatten(tree)
    return (treedef, *((jax.typeof(x), _placement(x)) for x in leaves))


def _batched(fn: Callable, ndims: int) -> Callable:
    for _ in range(ndims):
        fn = jax.vmap(fn)
    return fn


OutSpecs = Callable[[tuple, Any], Any]


def _explicit_mesh() -> bool:
    """Whether the mesh set by ``jax.set_mesh`` has ``Explicit`` axes (shardings live in types)."""
    return bool(jax.sharding.get_abstract_mesh().explicit_axes)


def _spec(x: Any) -> tuple:
    """The partition spec of ``x`` (its placement, else its type), one entry per dimension."""
    sharding = _placement(x)
    if not isinstance(sharding, jax.sharding.NamedSharding):
        sharding = getattr(jax.typeof(x), "sharding", None)
    spec = tuple(sharding.spec) if sharding is not None else ()
    return spec + (None,) * (jnp.ndim(x) - len(spec))


def _axis_names(entry: Any) -> tuple:
    if entry is None:
        return ()
    return tuple(entry) if isinstance(entry, tuple) else (entry,)


def _spec_by_dims(pair: LoRAPair, shape: tuple[int, ...]) -> jax.sharding.PartitionSpec:
    """A spec for a per-pair array of ``shape``, from the factors' specs dimension by dimension.

    Leading batch axes follow ``a``'s batch axes; a trailing axis of size ``m`` follows ``a``'s
    ``m`` axis and one of size ``n`` follows ``b``'s ``n`` axis (each mesh axis used once), so an
    ``(m, n)`` or ``(m,)`` state is sharded like the factors and ``r``-sized axes are replicated.
    """
    a_spec, b_spec = _spec(pair.a), _spec(pair.b)
    batch = pair.a.shape[:-2]
    lead = len(batch) if tuple(shape[: len(batch)]) == batch else 0
    by_size = {pair.b.shape[-1]: b_spec[-1], pair.a.shape[-2]: a_spec[-2]}
    entries = list(a_spec[:lead]) + [by_size.get(d) for d in shape[lead:]]
    used: set = set()
    for k, entry in enumerate(entries):
        names = _axis_names(entry)
        entries[k] = None if used & set(names) else entry
        used |= set(names)
    return jax.sharding.PartitionSpec(*entries)


def _eager_mesh(args: tuple) -> jax.sharding.Mesh | None:
    """The mesh of arguments that are all concrete, some placed by a ``NamedSharding``."""
    leaves = jax.tree.leaves(args)
    if any(isinstance(x, jax.core.Tracer) for x in leaves):
        return None
    meshes = [p.mesh for p in map(_placement, leaves) if isinstance(p, jax.sharding.NamedSharding)]
    return meshes[0] if meshes else None


def _call(fn: Callable, args: tuple, batch_ndim: int, out_specs: OutSpecs) -> Any:
    """``fn(*args)``, its results sharded by ``out_specs`` wherever shardings are known.

    ``out_specs`` keeps updates sharded like the gradients and state like the old state (new
    state like the factors), so shardings are stable across steps. On concrete arrays placed on
    a mesh (eager calls) the results are placed by ``out_specs``; under ``jit`` on an ``Auto``
    mesh the compiler chooses (pin with ``out_shardings``). On a mesh with ``Explicit`` axes see
    :func:`_call_explicit`.
    """
    if _explicit_mesh():
        return _call_explicit(fn, args, batch_ndim, out_specs)
    mesh = _eager_mesh(args)
    out = fn(*args)
    if mesh is None:
        return out
    specs = out_specs(args, out)
    return jax.device_put(out, jax.tree.map(lambda s: jax.sharding.NamedSharding(mesh, s), specs))


def _call_explicit(fn: Callable, args: tuple, batch_ndim: int, out_specs: OutSpecs) -> Any:
    """``fn(*args)`` on a mesh with ``Explicit`` axes (shardings in types).

    Per-pair math contracts over ``m`` and ``n`` (Gram matrices, projections), which explicit
    sharding rejects as ambiguous when those axes are sharded. So the arguments are resharded to
    keep only their batch axes sharded (an all-gather of the m×r / r×n arrays, and of any m×n
    state, over the ``m``/``n`` mesh axes; the per-pair work then runs replicated over those
    axes), and the results are resharded to ``out_specs``.
    """
    batch_only = lambda x: jax.sharding.PartitionSpec(  # noqa: E731
        *_spec(x)[:batch_ndim], *(None,) * (jnp.ndim(x) - batch_ndim))
    out = fn(*jax.tree.map(lambda x: jax.sharding.reshard(x, batch_only(x)), args))
    return jax.sharding.reshard(out, out_specs(args, out))


def _run_grouped(fn: Callable, args: list[tuple], batch_ndims: list[int],
                 out_specs: OutSpecs) -> list[Any]:
    """``fn(*args[i])`` for every i, batched over groups of identically typed arguments, traced
    with float32 matmuls at :data:`MATMUL_PRECISION`."""
    with jax.default_matmul_precision(MATMUL_PRECISION):
        return _run_groups(fn, args, batch_ndims, out_specs)


def _run_groups(fn: Callable, args: list[tuple], batch_ndims: list[int],
                out_specs: OutSpecs) -> list[Any]:
    groups: dict[Any, list[int]] = {}
    for i, (arg, nb) in enumerate(zip(args, batch_ndims)):
        groups.setdefault((nb, _signature(arg)), []).append(i)
    results: list[Any] = [None] * len(args)
    for (nb, _), members in groups.items():
        if len(members) == 1:
            results[members[0]] = _call(_batched(fn, nb), args[members[0]], nb, out_specs)
            continue
        stacked = jax.tree.map(lambda *xs: jnp.stack(xs), *(args[i] for i in members))
        out = _call(_batched(fn, nb + 1), stacked, nb + 1, out_specs)
        for j, i in enumerate(members):
            results[i] = jax.tree.map(lambda x, j=j: x[j], out)
    return results


def _init_specs(args: tuple, out: Any) -> Any:
    """New per-pair state is sharded like the factors (see :func:`_spec_by_dims`)."""
    return jax.tree.map(lambda o: _spec_by_dims(args[0], o.shape), out)


def _partition(x: Any) -> jax.sharding.PartitionSpec:
    return jax.sharding.PartitionSpec(*_spec(x))


def _update_specs(args: tuple, out: Any) -> Any:
    """Updates keep the gradients' shardings; new state keeps the old state's shardings."""
    grads, params, *states = args
    with_state = isinstance(out, (tuple, list)) and not isinstance(out, LoRAPair)
    pair, *news = out if with_state else (out,)
    by_dims = lambda tree: jax.tree.map(lambda o: _spec_by_dims(params, o.shape), tree)  # noqa: E731
    pair_specs = LoRAPair(_partition(grads.a), _partition(grads.b), by_dims(pair.stats))
    if not with_state:
        return pair_specs
    state_specs = [
        jax.tree.map(lambda n, o: _partition(o), new, old)
        if jax.tree.structure(new) == jax.tree.structure(old) else by_dims(new)
        for new, old in zip(news, states)
    ]
    return type(out)([pair_specs, *state_specs])


def _cast_like(new: Any, old: Any) -> Any:
    return jax.tree.map(lambda n, o: jnp.asarray(n).astype(o.dtype), new, old)


def map_pairs(
    fn: Callable[..., Any],
    updates: Any,
    params: Any,
    *states: Any,
    keys: PairKeys = DEFAULT_KEYS,
) -> Any:
    """Applies ``fn`` to every pair of ``updates``, batched over same-shaped pairs.

    ``fn(g, p, *s)`` receives the update (gradient) pair ``g``, the parameter pair ``p`` (both
    :class:`LoRAPair` of 2-D float32-or-wider arrays; ``g.stats`` holds the statistics probe's
    gradient when present) and the per-pair entries of each tree in ``states`` (as made by
    :func:`init_pairs`, also sliced to one 2-D pair). It returns the new update pair, or a tuple
    ``(new_update_pair, *new_states)``.

    Returns:
      The new updates tree (same structure and dtypes as ``updates``; statistics probes get zero
      updates) if ``fn`` returns a pair, else ``(updates, *state_trees)``.
    """
    structure = PairTree(params, keys, "params")
    grads = structure.pairs_of(updates, "updates")
    state_items = [structure.items(s, "state") for s in states]
    live = [i for i, p in enumerate(structure.pairs) if p is not None]
    args = [
        (_lift(grads[i]), _lift(LoRAPair(structure.pairs[i].a, structure.pairs[i].b)))
        + tuple(items[i] for items in state_items)
        for i in live
    ]
    outputs = _run_grouped(fn, args, [structure.pairs[i].a.ndim - 2 for i in live],
                           _update_specs)
    with_state = bool(states) or (outputs and not isinstance(outputs[0], LoRAPair))
    new_pairs: list[LoRAPair | None] = [None] * len(structure.pairs)
    new_states = [list(items) for items in state_items]
    for i, out in zip(live, outputs):
        pair, *news = out if with_state else (out,)
        g = grads[i]
        zero_stats = None if g.stats is None else jax.tree.map(jnp.zeros_like, g.stats)
        new_pairs[i] = LoRAPair(pair.a.astype(g.a.dtype), pair.b.astype(g.b.dtype), zero_stats)
        for k, new in enumerate(news):
            new_states[k][i] = _cast_like(new, state_items[k][i])
    new_updates = structure.rebuild(updates, new_pairs)
    if not with_state:
        return new_updates
    return (new_updates, *(structure.unflatten(items) for items in new_states))


def init_pairs(fn: Callable[[LoRAPair], Any], params: Any, keys: PairKeys = DEFAULT_KEYS) -> Any:
    """A per-pair state tree: ``fn(p)`` for each pair ``p`` (2-D float32 factors), batched.

    The result mirrors the pair-level structure of ``params``; holes get ``None``. Arrays
    ``fn`` returns that do not depend on ``p`` are broadcast over the pair's batch axes.
    """
    structure = PairTree(params, keys, "params")
    live = [i for i, p in enumerate(structure.pairs) if p is not None]
    args = [(_lift(LoRAPair(structure.pairs[i].a, structure.pairs[i].b)),) for i in live]
    outputs = _run_grouped(fn, args, [structure.pairs[i].a.ndim - 2 for i in live],
                           _init_specs)
    items: list[Any] = [None] * len(structure.pairs)
    for i, out in zip(live, outputs):
        items[i] = out
    return structure.unflatten(items)


def abstract_safe_init(init_fn: Callable[[Any], Any]) -> Callable[[Any], Any]:
    """Wraps ``init_fn`` so that params given as ``jax.ShapeDtypeStruct`` give an abstract state."""

    def wrapped(params: Any) -> Any:
        leaves = jax.tree.leaves(params)
        if any(isinstance(x, jax.ShapeDtypeStruct) for x in leaves):
            return jax.eval_shape(init_fn, params)
        return init_fn(params)

    return wrapped


def _float16_to_float32(tree: Any) -> Any:
    """float16 leaves (arrays or ``jax.ShapeDtypeStruct``) as float32; other leaves unchanged."""

    def lift(x: Any) -> Any:
        if getattr(x, "dtype", None) != jnp.float16:
            return x
        if isinstance(x, jax.ShapeDtypeStruct):
            return jax.ShapeDtypeStruct(x.shape, jnp.float32, sharding=x.sharding)
        return x.astype(jnp.float32)

    return jax.tree.map(lift, tree)


def keep_update_dtypes(inner: Any) -> Any:
    """Wraps an ``optax.GradientTransformation``: float32 state for float16 params, and updates
    in the incoming dtypes.

    float16 params and updates are lifted to float32 before ``inner`` sees them, so its state
    (Adam's moments) is float32: float16 cannot hold Adam's ``eps = 1e-8`` (it rounds to 0, and
    ``0/0`` at a zero gradient is NaN) nor the squares of gradients below ~2e-4. bf16, which has
    float32's exponent range, is passed through (moments follow ``optax.scale_by_adam``). Optax's
    Adam promotes bf16 updates to float32 through its float32 bias corrections; the updates are
    cast back, so bf16 and float16 models get updates in their own dtype.
    """

    def init_fn(params):
        return inner.init(_float16_to_float32(params))

    def update_fn(updates, state, params=None, **extra_args):
        new_updates, state = inner.update(_float16_to_float32(updates), state,
                                          _float16_to_float32(params), **extra_args)
        return jax.tree.map(lambda n, o: n.astype(o.dtype), new_updates, updates), state

    return optax.GradientTransformationExtraArgs(init_fn, update_fn)
