"""Trees of LoRA factor pairs: discovery, validation and batched per-pair mapping.

Every optimizer in this library acts on *pairs* ``(a, b)`` of LoRA factors, with the library
convention ``delta_W = scale * a @ b``, ``a: (..., m, r)``, ``b: (..., r, n)``. A pair appears in a
parameter tree either as a :class:`LoRAPair` node or as two entries ``<prefix>lora_a`` /
``<prefix>lora_b`` of one mapping (``dict``, ``FrozenDict``, ``nnx.State``), whatever else the
mapping holds (suffixes configurable with :class:`PairKeys`; ``flax.nnx.LoRA`` uses ``lora_a``,
Qwix ``kernel_lora_a`` / ``w_lora_a``, MaxText several prefixes in one module), optionally with a
``<prefix>lora_stats`` entry holding a full-gradient statistics probe (see
``lowrank_optax.flax``). Multi-dimensional factors (einsum layers, scanned layers) are viewed as
batched 2-D pairs through :class:`PairDimensionNumbers`, inferred when unambiguous.

:func:`map_pairs` is the single traversal every transformation uses. It

* finds the pairs, validates shapes, dtypes and ranks and reports errors with the tree path
  (every offending leaf at once);
* views each pair as a batched 2-D pair (batch axes first) and returns updates in the params'
  own layout, so per-pair state lives in that 2-D view;
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

import contextlib
import dataclasses
import math
from collections.abc import Callable, Mapping, Sequence
from typing import Any, NamedTuple

import jax
import jax.numpy as jnp
import optax

__all__ = [
    "DEFAULT_KEYS",
    "MATMUL_PRECISION",
    "LoRAPair",
    "PairDimensionNumbers",
    "PairKeys",
    "PairTree",
    "abstract_safe_init",
    "init_pairs",
    "is_pair_node",
    "keep_update_dtypes",
    "map_pairs",
    "pair_map_transformation",
    "require_params",
]


class LoRAPair(NamedTuple):
    """One LoRA factor pair, ``delta_W = scale * a @ b``.

    Attributes:
      a: input-side factor, shape ``(..., m, r)`` (or another layout, see
        :class:`PairDimensionNumbers`).
      b: output-side factor, shape ``(..., r, n)``.
      stats: optional full-gradient statistics probe (a pytree, or ``None``). Its gradient
        carries statistics of ``G = dL/dW`` computed inside the backward pass; transformations
        that do not use it return zero updates for it.
    """

    a: Any
    b: Any
    stats: Any = None


class PairDimensionNumbers(NamedTuple):
    """Which axes of a pair's factors are the rank and which are batch axes.

    In the style of ``optax.contrib.MuonDimensionNumbers``: the axes of ``a`` that are neither
    its rank axis nor a batch axis are flattened (in order) into ``m``, those of ``b`` into
    ``n``, and the pair is treated as the batched 2-D pair ``(*batch, m, r)`` / ``(*batch, r,
    n)``, i.e. ``delta_W`` in the (inputs × outputs) matrix view of the weight. Batch axes are
    matched in the order given and must have equal sizes in both factors. Axes may be negative.

    The defaults describe a 2-D pair and Qwix/Keras einsum factors, ``a (*M, r)``, ``b (r, *N)``.
    MaxText's scanned layers (layer axis at ``param_scan_axis=1`` in both factors) are
    ``PairDimensionNumbers(a_batch_axes=(1,), b_batch_axes=(1,))``; the library's stacked layout
    ``a (L, m, r)``, ``b (L, r, n)`` is ``PairDimensionNumbers(-1, 1, (0,), (0,))``.

    Attributes:
      a_rank_axis: the rank axis of ``a`` (default ``-1``).
      b_rank_axis: the rank axis of ``b`` (default ``0``).
      a_batch_axes: batch axes of ``a`` (default none).
      b_batch_axes: batch axes of ``b``, in the same order (default none).
    """

    a_rank_axis: int = -1
    b_rank_axis: int = 0
    a_batch_axes: tuple[int, ...] = ()
    b_batch_axes: tuple[int, ...] = ()


@dataclasses.dataclass(frozen=True)
class PairKeys:
    """How a pair's factors are found in a tree and laid out.

    A pair is any two entries ``<prefix><a>`` / ``<prefix><b>`` of one mapping (``dict``,
    ``FrozenDict``, ``nnx.State``), whatever else that mapping holds: ``lora_a``/``lora_b``
    (``flax.nnx.LoRA``), ``kernel_lora_a``/``kernel_lora_b`` and ``w_lora_a``/``w_lora_b``
    (Qwix), several prefixes in one mapping (MaxText's MoE layers) are several pairs.

    Attributes:
      a: key suffix of the input-side factor (``lora_a``).
      b: key suffix of the output-side factor (``lora_b``).
      stats: key suffix of the optional full-gradient statistics probe.
      dims: the factors' layout. ``None`` (default) infers it pair by pair: the stacked layout
        ``a (..., m, r)``, ``b (..., r, n)`` (same leading batch axes; the library's own
        convention, which wins when a pair also reads as einsum, e.g. stacked slices whose
        count equals the rank) or else the einsum layout ``a (*M, r)``, ``b (r, *N)``; a pair
        whose einsum reading leaves an axis of one size at the same position in both factors
        (a scanned layer axis) is an error asking for a spec. Otherwise one
        :class:`PairDimensionNumbers` for every pair, a tree of them (a pair takes the spec
        found at its factor's path or the nearest enclosing path; ``None`` or no entry:
        inferred), or a callable of the params returning either.
    """

    a: str = "lora_a"
    b: str = "lora_b"
    stats: str = "lora_stats"
    dims: Any = None

    def __post_init__(self) -> None:
        suffixes = {"a": self.a, "b": self.b, "stats": self.stats}
        for name, suffix in suffixes.items():
            if not isinstance(suffix, str) or not suffix:
                raise TypeError(f"PairKeys: {name}={suffix!r} is not a non-empty string")
        names = list(suffixes)
        for i, first in enumerate(names):
            for second in names[i + 1:]:
                x, y = suffixes[first], suffixes[second]
                if x.endswith(y) or y.endswith(x):
                    raise ValueError(f"PairKeys: {first}={x!r} and {second}={y!r} overlap (one "
                                     "ends with the other), so one key could name both")


DEFAULT_KEYS = PairKeys()


def _suffix_prefix(key: Any, suffix: str) -> str | None:
    if isinstance(key, str) and key.endswith(suffix):
        return key[: len(key) - len(suffix)]
    return None


def is_pair_node(x: Any, keys: PairKeys) -> bool:
    """Whether ``x`` is a :class:`LoRAPair` or a mapping holding at least one factor entry."""
    if isinstance(x, LoRAPair):
        return True
    if isinstance(x, Mapping) and not isinstance(x, jax.ShapeDtypeStruct):
        return any(_suffix_prefix(k, s) is not None for k in x.keys() for s in (keys.a, keys.b))
    return False


def _is_hole(x: Any) -> bool:
    return not jax.tree.leaves(x)


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


def _shape(x: Any) -> tuple[int, ...]:
    return tuple(getattr(x, "shape", ()))


def _described(x: Any) -> str:
    """``"is None"`` or ``"has shape (…)"``: how an error names a factor entry."""
    return "is None" if x is None else f"has shape {_shape(x)}"


def _clean_path(path: tuple) -> tuple:
    """``path`` without the ``.value`` tail an ``nnx.Variable`` adds."""
    if path and isinstance(path[-1], jax.tree_util.GetAttrKey) and path[-1].name in (
            "value", "raw_value"):
        return path[:-1]
    return path


def _key_strs(path: tuple) -> tuple[str, ...]:
    return tuple(jax.tree_util.keystr((k,)) for k in _clean_path(path))


def _path_str(path: tuple) -> str:
    return jax.tree_util.keystr(_clean_path(path)) or "<root>"


@dataclasses.dataclass(frozen=True)
class _Layout:
    """A pair's dimension numbers resolved against its shapes: the view as a batched 2-D pair."""

    a_perm: tuple[int, ...]
    b_perm: tuple[int, ...]
    a_shape: tuple[int, ...]
    b_shape: tuple[int, ...]
    batch: tuple[int, ...]
    m: int
    n: int
    r: int

    @property
    def identity(self) -> bool:
        return (self.a_shape == (*self.batch, self.m, self.r)
                and self.b_shape == (*self.batch, self.r, self.n)
                and self.a_perm == tuple(range(len(self.a_perm)))
                and self.b_perm == tuple(range(len(self.b_perm))))

    def to_2d(self, a: Any, b: Any) -> tuple[Any, Any]:
        if self.identity:
            return a, b
        a = _batch_sharded(a, self.a_perm[: len(self.batch)])
        b = _batch_sharded(b, self.b_perm[: len(self.batch)])
        return (jnp.transpose(a, self.a_perm).reshape(*self.batch, self.m, self.r),
                jnp.transpose(b, self.b_perm).reshape(*self.batch, self.r, self.n))

    def from_2d(self, a: Any, b: Any) -> tuple[Any, Any]:
        if self.identity:
            return a, b
        shape_a = tuple(self.a_shape[i] for i in self.a_perm)
        shape_b = tuple(self.b_shape[i] for i in self.b_perm)
        return (jnp.transpose(a.reshape(shape_a), _inverse(self.a_perm)),
                jnp.transpose(b.reshape(shape_b), _inverse(self.b_perm)))


def _inverse(perm: tuple[int, ...]) -> tuple[int, ...]:
    out = [0] * len(perm)
    for i, p in enumerate(perm):
        out[p] = i
    return tuple(out)


def _batch_sharded(x: Any, batch_axes: tuple[int, ...]) -> Any:
    """On an ``Explicit`` mesh, ``x`` resharded to keep only its batch axes sharded, so that the
    reshape to the 2-D view is well defined (the per-pair math gathers m and n anyway)."""
    if not _explicit_mesh():
        return x
    spec = _spec(x)
    return jax.sharding.reshard(x, jax.sharding.PartitionSpec(
        *(spec[i] if i in batch_axes else None for i in range(jnp.ndim(x)))))


def _layout(a_shape: tuple, b_shape: tuple, dims: PairDimensionNumbers) -> _Layout:
    """``dims`` resolved against the shapes; raises ``ValueError`` (without the path)."""
    na, nb = len(a_shape), len(b_shape)
    try:
        ra, rb = range(na)[dims.a_rank_axis], range(nb)[dims.b_rank_axis]
        ba = tuple(range(na)[i] for i in dims.a_batch_axes)
        bb = tuple(range(nb)[i] for i in dims.b_batch_axes)
    except (IndexError, TypeError) as err:
        raise ValueError(f"{dims} does not fit factors of {na} and {nb} dimensions") from err
    if len({ra, *ba}) != 1 + len(ba) or len({rb, *bb}) != 1 + len(bb):
        raise ValueError(f"{dims} repeats an axis")
    if len(ba) != len(bb) or any(a_shape[i] != b_shape[j] for i, j in zip(ba, bb)):
        raise ValueError(f"{dims}: batch axes differ ({[a_shape[i] for i in ba]} vs "
                         f"{[b_shape[j] for j in bb]})")
    if a_shape[ra] != b_shape[rb]:
        raise ValueError(f"{dims}: ranks differ (a has r={a_shape[ra]}, b has r={b_shape[rb]})")
    m_axes = [i for i in range(na) if i != ra and i not in ba]
    n_axes = [j for j in range(nb) if j != rb and j not in bb]
    if not m_axes or not n_axes:
        raise ValueError(f"{dims} leaves no m or n axis")
    return _Layout(
        a_perm=(*ba, *m_axes, ra), b_perm=(*bb, rb, *n_axes), a_shape=a_shape, b_shape=b_shape,
        batch=tuple(a_shape[i] for i in ba), m=math.prod(a_shape[i] for i in m_axes),
        n=math.prod(b_shape[j] for j in n_axes), r=a_shape[ra])


def _stacked_dims(ndim: int) -> PairDimensionNumbers:
    lead = tuple(range(ndim - 2))
    return PairDimensionNumbers(-1, ndim - 2, lead, lead)


def _infer_layout(a_shape: tuple, b_shape: tuple) -> _Layout:
    """The layout of a pair given without a spec (see :attr:`PairKeys.dims`)."""
    stacked = einsum = None
    if len(a_shape) == len(b_shape):
        with contextlib.suppress(ValueError):
            stacked = _layout(a_shape, b_shape, _stacked_dims(len(a_shape)))
    with contextlib.suppress(ValueError):
        einsum = _layout(a_shape, b_shape, PairDimensionNumbers())
    if einsum is not None and stacked is None:
        same = [k for k in range(1, min(len(a_shape) - 1, len(b_shape)))
                if a_shape[k] == b_shape[k]]
        if same:
            raise ValueError(
                f"the layout is ambiguous: read as einsum (a (*M, r), b (r, *N)) axis {same[0]} "
                f"has size {a_shape[same[0]]} in both factors, like a scanned layer axis; pass "
                f"PairKeys(dims=PairDimensionNumbers(a_batch_axes=({same[0]},), "
                f"b_batch_axes=({same[0]},))) if it is one, PairDimensionNumbers() if not")
    if stacked is not None:
        return stacked
    if einsum is not None:
        return einsum
    if len(a_shape) == len(b_shape) and a_shape[:-2] != b_shape[:-2]:
        raise ValueError(f"leading batch axes differ ({a_shape[:-2]} vs {b_shape[:-2]})")
    if len(a_shape) == len(b_shape):
        raise ValueError(f"ranks differ (a has r={a_shape[-1]}, b has r={b_shape[-2]})")
    raise ValueError("no layout fits: neither stacked (a (..., m, r), b (..., r, n)) nor einsum "
                     "(a (*M, r), b (r, *N)); pass PairKeys(dims=PairDimensionNumbers(...))")


def _dims_lookup(dims: Any, tree: Any) -> Callable[[tuple], PairDimensionNumbers | None]:
    """A function from a factor's tree path to the spec that applies to it."""
    if callable(dims) and not isinstance(dims, PairDimensionNumbers):
        dims = dims(tree)
    if dims is None or isinstance(dims, PairDimensionNumbers):
        return lambda path: dims
    is_spec = lambda x: x is None or isinstance(x, PairDimensionNumbers)  # noqa: E731
    flat = jax.tree_util.tree_flatten_with_path(dims, is_leaf=is_spec)[0]
    table = {_key_strs(tuple(p)): spec for p, spec in flat}

    def lookup(path: tuple) -> PairDimensionNumbers | None:
        path = _key_strs(path)
        for k in range(len(path), -1, -1):
            spec = table.get(path[:k])
            if spec is not None:
                return spec
        return None

    return lookup


@dataclasses.dataclass(frozen=True)
class _Site:
    """Where a pair sits: its mapping node, the node's index and the pair's key prefix."""

    node: int
    prefix: str | None  # None for a LoRAPair node
    path: str


#: The words of :class:`PairTree`'s error for a leaf outside every pair.
STRAY_LEAF = "is not part of a LoRA pair"


def _factor_entries(node: Any, keys: PairKeys, prefix: str | None) -> tuple[Any, Any, Any]:
    if prefix is None:
        return node.a, node.b, node.stats
    return node[prefix + keys.a], node[prefix + keys.b], node.get(prefix + keys.stats)


def _nnx_hint(paths: Sequence[tuple]) -> str:
    variables = any(p and isinstance(p[-1], jax.tree_util.GetAttrKey) for p in paths)
    if not variables:
        return ""
    return (" These look like an nnx model's other parameters: pass wrt=nnx.LoRAParam to "
            "nnx.Optimizer (and nnx.DiffState(0, nnx.LoRAParam) to nnx.grad), or partition them.")


def _keys_hint(paths: Sequence[tuple], keys: PairKeys) -> str:
    """A hint for stray leaves whose names contain "lora": other factor names (PEFT's
    ``lora_A``/``lora_B``) need their own :class:`PairKeys`."""
    names = sorted({str(getattr(p[-1], "key", getattr(p[-1], "name", ""))) for p in
                    (_clean_path(path) for path in paths) if p})
    names = [name for name in names if "lora" in name.lower()]
    if not names:
        return ""
    a_like = [name for name in names if name[-1:] in "aA"]
    b_like = [name for name in names if name[-1:] in "bB"]
    example = (f" (here perhaps PairKeys(a={a_like[0]!r}, b={b_like[0]!r}))"
               if len(a_like) == 1 and len(b_like) == 1 else "")
    return (f" Leaves named {', '.join(map(repr, names))} look like LoRA factors that the keys "
            f"(a={keys.a!r}, b={keys.b!r}) do not match: pass keys=lowrank_optax.PairKeys(a=..., "
            f"b=...) with their names' suffixes{example}.")


class PairTree:
    """The pair-level structure of a tree: its pairs are the leaves of :attr:`treedef`.

    A mapping holding one pair is replaced by that pair's leaf; one holding several (by key
    prefix) by a dict from prefix to leaf. Per-pair state trees (:func:`init_pairs`) have this
    structure. Factors are viewed as batched 2-D pairs (see :class:`PairDimensionNumbers`):
    :attr:`pairs` and :meth:`pairs_of` give that view, :meth:`rebuild` restores the layout.

    Args:
      tree: a tree of pairs (params, updates, or anything mirroring them).
      keys: mapping keys and layout of the factors.
      what: name of the tree, for error messages.
      strays: ``"error"`` (default): a leaf outside any pair is an error; ``"keep"``: such
        leaves are left out of the pair structure (for transformations that pass them on).

    Raises:
      ValueError: listing every leaf outside a pair (holes such as ``optax.MaskedNode`` are
        fine), unpaired or split factors, and factors whose shapes, ranks, batch axes or
        dtypes are inconsistent, each with its tree path.
    """

    def __init__(self, tree: Any, keys: PairKeys = DEFAULT_KEYS, what: str = "params",
                 strays: str = "error"):
        self.keys = keys
        is_leaf = lambda x: is_pair_node(x, keys)  # noqa: E731
        flat, self.node_treedef = jax.tree_util.tree_flatten_with_path(tree, is_leaf=is_leaf)
        lookup = _dims_lookup(keys.dims, tree) if keys.dims is not None else lambda p: None
        self.sites: list[_Site] = []
        self.pairs: list[LoRAPair | None] = []
        self.layouts: list[_Layout | None] = []
        stray: list[tuple[tuple, Any]] = []
        problems: list[str] = []
        skeleton: list[Any] = []
        for index, (path, node) in enumerate(flat):
            if not is_leaf(node):
                if not _is_hole(node):
                    stray.append((tuple(path), node))
                skeleton.append(None)
                continue
            prefixes = self._prefixes(path, node, stray, problems)
            slots = {}
            for prefix in prefixes:
                where = jax.tree_util.keystr(tuple(path))
                label = where if not prefix else f"{where} ({prefix}{keys.a}/{prefix}{keys.b})"
                factor_path = tuple(path) if prefix is None else (
                    *path, jax.tree_util.DictKey(prefix + keys.a))
                try:
                    pair, layout = self._checked_pair(
                        label or "<root>", node, prefix, what, lookup(factor_path))
                except ValueError as err:
                    problems.append(str(err))
                    pair = layout = None
                slots[prefix] = len(self.sites)
                self.sites.append(_Site(index, prefix, label or "<root>"))
                self.pairs.append(pair)
                self.layouts.append(layout)
            skeleton.append(next(iter(slots.values())) if len(slots) == 1 else slots)
        if stray and strays == "error":
            problems[:0] = [
                f"{what} leaf at {_path_str(p)} (shape {_shape(_single_leaf(x))}) {STRAY_LEAF}"
                for p, x in stray]
            hint = (" Route such leaves to another transformation with optax.partition or "
                    "optax.multi_transform." + _nnx_hint([p for p, _ in stray])
                    + _keys_hint([p for p, _ in stray], self.keys))
            problems.append(hint.strip())
        if problems:
            raise ValueError("\n".join(problems) if len(problems) > 1 else problems[0])
        self.paths = [site.path for site in self.sites]
        self.treedef = jax.tree.structure(
            self.node_treedef.unflatten(skeleton), is_leaf=lambda x: isinstance(x, int))

    def _prefixes(self, path: Any, node: Any, stray: list, problems: list) -> list[str | None]:
        """The key prefixes of the pairs in ``node``; other non-hole entries go to ``stray``."""
        if isinstance(node, LoRAPair):
            return [None]
        keys = self.keys
        found: dict[str, set[str]] = {}
        for key in node.keys():
            for role, suffix in (("a", keys.a), ("b", keys.b), ("stats", keys.stats)):
                prefix = _suffix_prefix(key, suffix)
                if prefix is not None:
                    found.setdefault(prefix, set()).add(role)
                    break
        prefixes = []
        for prefix, roles in found.items():
            if {"a", "b"} <= roles:
                prefixes.append(prefix)
                continue
            present = [prefix + getattr(keys, r) for r in sorted(roles)]
            live = [k for k in present if not _is_hole(node[k])]
            if live:
                missing = prefix + (keys.b if "a" in roles else keys.a)
                problems.append(
                    f"unpaired LoRA factor at {_path_str((*path, jax.tree_util.DictKey(live[0])))}"
                    f" (shape {_shape(_single_leaf(node[live[0]]))}): no {missing!r} beside it")
        factor_keys = {prefix + getattr(keys, r) for prefix, roles in found.items() for r in roles}
        for key in node.keys():
            if key not in factor_keys and not _is_hole(node[key]):
                for sub, leaf in jax.tree_util.tree_flatten_with_path(node[key])[0]:
                    stray.append(((*path, jax.tree_util.DictKey(key), *sub), leaf))
        return prefixes

    def _checked_pair(self, path: str, node: Any, prefix: str | None, what: str,
                      dims: PairDimensionNumbers | None) -> tuple[Any, Any]:
        entry_a, entry_b, stats = _factor_entries(node, self.keys, prefix)
        a, b = _single_array(entry_a), _single_array(entry_b)
        if a is None and b is None:
            return None, None
        if a is None or b is None:
            raise ValueError(
                f"LoRA pair at {path} in {what} is split: one factor is masked or missing "
                f"(a: {_shape(a)}, b: {_shape(b)}); mask or route both factors together."
            )
        layout = _validate_pair(path, a, b, dims)
        return LoRAPair(*layout.to_2d(a, b), stats), layout

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

    def _nodes(self, tree: Any, what: str) -> list[Any]:
        try:
            return self.node_treedef.flatten_up_to(tree)
        except (ValueError, TypeError) as err:
            raise ValueError(
                f"{what} does not have the pair structure of params (pairs at {self.paths}): {err}"
            ) from err

    def pairs_of(self, tree: Any, what: str) -> list[LoRAPair | None]:
        """The factor arrays of ``tree`` pair by pair in the 2-D view, checked against the
        params' shapes; a mismatch raises one ``ValueError`` that lists every offending pair."""
        nodes = self._nodes(tree, what)
        result: list[LoRAPair | None] = []
        problems: list[str] = []
        for site, ref, layout in zip(self.sites, self.pairs, self.layouts):
            if ref is None:
                result.append(None)
                continue
            node = nodes[site.node]
            if not is_pair_node(node, self.keys):
                problems.append(f"at {site.path}: expected a LoRA pair, got {type(node)}")
                continue
            try:
                entry_a, entry_b, stats = _factor_entries(node, self.keys, site.prefix)
            except KeyError as err:
                problems.append(f"at {site.path}: factor {err} is missing")
                continue
            a, b = _single_array(entry_a), _single_array(entry_b)
            wrong = [f"at {site.path}: factor {name} {_described(x)} but params have {shape}"
                     for name, x, shape in (("a", a, layout.a_shape), ("b", b, layout.b_shape))
                     if x is None or _shape(x) != shape]
            problems.extend(wrong)
            if not wrong:
                result.append(LoRAPair(*layout.to_2d(a, b), stats))
        if len(problems) == 1:
            raise ValueError(f"{what} {problems[0]}")
        if problems:
            raise ValueError(f"{what} do not match the params:\n  " + "\n  ".join(problems))
        return result

    def unflatten(self, items: Sequence[Any]) -> Any:
        return self.treedef.unflatten(list(items))

    def rebuild(self, like: Any, new_pairs: Sequence[LoRAPair | None]) -> Any:
        """``like`` (a tree of pairs) with its factor arrays replaced by ``new_pairs`` (2-D view,
        restored to the params' layout and, for concrete arrays, to ``like``'s placements)."""
        nodes = self._nodes(like, "updates")
        replaced: dict[int, dict] = {}
        for site, layout, new in zip(self.sites, self.layouts, new_pairs):
            if new is None:
                continue
            entry_a, entry_b, old_stats = _factor_entries(nodes[site.node], self.keys, site.prefix)
            a, b = layout.from_2d(new.a, new.b)
            if not layout.identity:
                a = _placed_like(a, _single_array(entry_a))
                b = _placed_like(b, _single_array(entry_b))
            stats = None if old_stats is None else new.stats  # restructured by _replace
            replaced.setdefault(site.node, {})[site.prefix] = (
                _replace_single_array(entry_a, a), _replace_single_array(entry_b, b), stats)
        out = [node if i not in replaced else self._replace(node, replaced[i])
               for i, node in enumerate(nodes)]
        return self.node_treedef.unflatten(out)

    def _replace(self, node: Any, new: dict) -> Any:
        if isinstance(node, LoRAPair):
            return LoRAPair(*new[None])
        keys = self.keys
        table = {}
        for prefix, (a, b, stats) in new.items():
            table.update({prefix + keys.a: a, prefix + keys.b: b})
            if stats is not None:
                table[prefix + keys.stats] = stats
        children, treedef = jax.tree_util.tree_flatten_with_path(
            node, is_leaf=lambda x: x is not node)
        return jax.tree.unflatten(treedef, [
            _restructured(table[path[0].key], child) if path[0].key in table else child
            for path, child in children])


def _restructured(value: Any, like: Any) -> Any:
    """``value``'s leaves in ``like``'s containers. A mapping node read by key can come back in
    another container type than the one the tree holds (``nnx.State`` wraps a nested ``dict`` it
    returns), and the output must keep the tree's own structure."""
    return jax.tree.unflatten(jax.tree.structure(like), jax.tree.leaves(value))


def _single_leaf(x: Any) -> Any:
    leaves = jax.tree.leaves(x)
    return leaves[0] if len(leaves) == 1 else x


def _placed_like(x: Any, ref: Any) -> Any:
    """``x`` with ``ref``'s sharding: placed if both are concrete, resharded on ``Explicit``
    meshes."""
    if _explicit_mesh():
        return jax.sharding.reshard(x, jax.sharding.PartitionSpec(*_spec(ref)))
    sharding = _placement(ref)
    if isinstance(sharding, jax.sharding.NamedSharding) and _placement(x) is not None:
        return jax.device_put(x, sharding)
    return x


def _transposed_hint(sa: tuple[int, ...], sb: tuple[int, ...]) -> str:
    """A hint when ``a (…, r, m)``, ``b (…, n, r)`` fits: PyTorch / PEFT's orientation."""
    if len(sa) != len(sb) or sa[:-2] != sb[:-2] or sa[-2] != sb[-1] or sa[-2] > min(sa[-1],
                                                                                  sb[-2]):
        return ""
    return (f". The factors look transposed (PyTorch / PEFT's A (r, in), B (out, r) with "
            f"r={sa[-2]}): this library's pair is a (..., m, r), b (..., r, n) with "
            "delta_W = a @ b, so pass a.T and b.T (swap the last two axes)")


def _validate_pair(path: str, a: Any, b: Any, dims: PairDimensionNumbers | None) -> _Layout:
    sa, sb = _shape(a), _shape(b)
    where = f"LoRA pair at {path}: a {sa}, b {sb}"
    if len(sa) < 2 or len(sb) < 2:
        raise ValueError(f"{where}: factors need at least 2 dimensions (..., m, r) / (..., r, n)")
    try:
        layout = _infer_layout(sa, sb) if dims is None else _layout(sa, sb, dims)
    except ValueError as err:
        raise ValueError(f"{where}: {err}{_transposed_hint(sa, sb)}") from None
    if layout.r > min(layout.m, layout.n):
        transposed = _transposed_hint(sa, sb)
        hint = (f"{transposed}. If they are not transposed, a" if transposed else ". A") + (
            " rank above min(m, n) adds nothing a rank of min(m, n) cannot express; use a smaller "
            "rank for this layer, or route it to another optimizer with optax.partition")
        raise ValueError(f"{where}: rank r={layout.r} exceeds min(m, n)="
                         f"{min(layout.m, layout.n)}{hint}")
    for name, x in (("a", a), ("b", b)):
        if not jnp.issubdtype(x.dtype, jnp.floating):
            raise ValueError(f"{where}: factor {name} has non-float dtype {x.dtype}")
    return layout


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
    ``fn`` returns that do not depend on ``p`` are broadcast over the pair's batch axes. No two
    leaves of the result share a buffer, nor with ``params`` (so the state can be donated).
    """
    structure = PairTree(params, keys, "params")
    live = [i for i, p in enumerate(structure.pairs) if p is not None]
    args = [(_lift(LoRAPair(structure.pairs[i].a, structure.pairs[i].b)),) for i in live]
    outputs = _run_grouped(fn, args, [structure.pairs[i].a.ndim - 2 for i in live],
                           _init_specs)
    items: list[Any] = [None] * len(structure.pairs)
    for i, out in zip(live, outputs):
        items[i] = out
    return _unaliased(structure.unflatten(items), params)


def _unaliased(state: Any, params: Any) -> Any:
    """``state`` with every concrete array that also appears elsewhere in it, or in ``params``,
    copied: trainers donate the optimizer state (Tunix's ``PeftTrainer``), and a buffer donated
    twice, or shared with the model, is an error (an init returning ``(zeros, zeros)``, or a
    factor itself, would otherwise alias)."""
    seen = {id(x) for x in jax.tree.leaves(params)}

    def fresh(x: Any) -> Any:
        if isinstance(x, jax.Array) and not isinstance(x, jax.core.Tracer):
            if id(x) in seen:
                x = jnp.copy(x)
            seen.add(id(x))
        return x

    return jax.tree.map(fresh, state)


def pair_map_transformation(
    name: str, fn: Callable[[LoRAPair, LoRAPair], LoRAPair], keys: PairKeys = DEFAULT_KEYS
) -> optax.GradientTransformation:
    """A stateless transformation that maps every update pair with its parameter pair.

    ``update`` returns ``map_pairs(fn, updates, params)`` (``fn(u, p)`` gets 2-D float32-or-wider
    pairs and returns the new update pair) and needs ``params``, which
    :func:`~lowrank_optax.validation.with_state_check` (around every transformation of the
    library) checks are given; ``init`` checks the params' pairs and returns
    ``optax.EmptyState()``. ``name`` is used in the errors.
    """

    def init_fn(params: Any) -> optax.EmptyState:
        PairTree(params, keys)
        return optax.EmptyState()

    def update_fn(updates: Any, state: optax.EmptyState, params: Any = None) -> tuple[Any, Any]:
        return map_pairs(fn, updates, params, keys=keys), state

    return optax.GradientTransformation(abstract_safe_init(init_fn), update_fn)


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
