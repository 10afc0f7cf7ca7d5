"""LoRA for Flax ``nnx``: a wrapper around ``nnx.Linear``-like layers, injection, merge.

Convention (the library's, see ``DESIGN.md`` §1): the wrapped layer computes ``y = x @ W0 (+
bias)`` with ``W0`` of shape ``(in, out)``; :class:`LoRALinear` adds ``scale · x a b`` with

    lora_a : (in, r)   or (P, in, r)  with ``out_slices`` (P slices of a fused projection)
    lora_b : (r, out)  or (P, r, w)   w = stop - start, the width of every slice
    scale  = alpha / r,  or alpha / sqrt(r) with rsLoRA

``lora_a`` / ``lora_b`` (and the optional statistics probe ``lora_stats``) are ``nnx.LoRAParam``
variables, so ``nnx.Optimizer(model, tx, wrt=nnx.LoRAParam)`` hands every optimizer of this
library exactly one ``{lora_a, lora_b[, lora_stats]}`` mapping per adapted layer; the leading
``P`` axis is a batch axis of pairs. The base weights stay ``nnx.Param``.
"""

from __future__ import annotations

import math
import re
from collections.abc import Iterator, Mapping, Sequence
from typing import Any

import jax
import jax.numpy as jnp
from flax import nnx

from lowrank_optax.grad_stats import lora_matmul_with_stats, stats_probe

__all__ = ["INITS", "LoRALinear", "inject_lora", "lora_modules", "merge_lora", "unmerge_lora"]

INITS = ("zero_b", "pissa", "milora", "gradient")
_GRAD_STATS = (False, True, "full")

Slices = tuple[tuple[int, int], ...]


def _check_slices(out_slices: Sequence[Sequence[int]] | None, out_features: int) -> Slices | None:
    """Validated ``((start, stop), ...)``: in range, non-overlapping, all of one width."""
    if out_slices is None:
        return None
    slices = tuple((int(start), int(stop)) for start, stop in out_slices)
    if not slices:
        raise ValueError("out_slices must hold at least one (start, stop) pair, or be None")
    for start, stop in slices:
        if not 0 <= start < stop <= out_features:
            raise ValueError(
                f"out slice ({start}, {stop}) is not inside the {out_features} output features"
            )
    widths = {stop - start for start, stop in slices}
    if len(widths) != 1:
        raise ValueError(f"all out_slices must have the same width, got {slices}")
    ordered = sorted(slices)
    for (_, stop), (start, _) in zip(ordered, ordered[1:]):
        if start < stop:
            raise ValueError(f"out_slices overlap: {slices}")
    return slices


def _sharding(names: Sequence[str | None] | None) -> dict[str, Any]:
    """Variable metadata for mesh axis names (``out_sharding`` is flax 0.12's key)."""
    return {} if names is None else {"out_sharding": tuple(names)}


def _kaiming_uniform_a(key: jax.Array, shape: tuple[int, ...]) -> jax.Array:
    """PEFT's ``kaiming_uniform_(a=√5)`` for ``lora_A``: ``U(-1/√in, 1/√in)``, float32."""
    bound = 1.0 / math.sqrt(shape[-2])
    return jax.random.uniform(key, shape, jnp.float32, -bound, bound)


def _rank_r_factors(
    matrix: jax.Array, rank: int, *, top: bool, factor: float
) -> tuple[jax.Array, jax.Array]:
    """``a = √factor · U_r √S_r``, ``b = √factor · √S_r V_rᵀ`` of ``matrix = U S Vᵀ`` (batched).

    ``top`` picks the ``r`` largest singular triplets, otherwise the ``r`` smallest of the
    ``min(m, n)``; then ``a b = factor · U_r S_r V_rᵀ``.
    """
    k = min(matrix.shape[-2:])
    if rank > k:
        raise ValueError(f"an SVD init needs rank <= min(in, out) = {k}, got rank={rank}")
    u, s, vt = jnp.linalg.svd(matrix, full_matrices=False)
    part = slice(0, rank) if top else slice(k - rank, k)
    root = jnp.sqrt(s[..., part] * factor)
    return u[..., :, part] * root[..., None, :], root[..., :, None] * vt[..., part, :]


class LoRALinear(nnx.Module):
    """``y = base(x) + scale · dropout(x) a b`` around an ``nnx.Linear``-like ``base``.

    ``base`` is any module with a ``kernel`` parameter of shape ``(in, out)`` (and an optional
    ``bias``) whose call computes ``x @ kernel (+ bias)``; it is kept as ``self.base`` and called
    unchanged, so its ``dtype`` / ``precision`` settings apply to the frozen path.

    Init strategies (``init``); ``W0`` is ``base.kernel``, SVDs run in float32:

    * ``"zero_b"`` (default, LoRA/PEFT): ``a ~ U(-1/√in, 1/√in)`` (PEFT's
      ``kaiming_uniform_(a=√5)``), ``b = 0``; ``W0`` untouched.
    * ``"pissa"``: ``W0 = U S Vᵀ``; ``a = U_r √S_r / √scale``, ``b = √S_r V_rᵀ / √scale`` with the
      ``r`` largest singular triplets, so ``scale · a b = U_r S_r V_rᵀ`` (the principal rank-``r``
      part, split evenly between the factors), and ``W0 ← W0 − U_r S_r V_rᵀ``.
    * ``"milora"``: as ``"pissa"`` with the ``r`` smallest of the ``min(in, out)`` singular
      triplets.
    * ``"gradient"`` (one-step-gradient spectral init, LoRA-One / LoRA-GA style): with ``G`` the
      caller's gradient ``∂L/∂W0`` (``gradient``, shape ``(in, out)``) and ``−G = U S Vᵀ``,
      ``a = √(γ/scale) U_r √S_r``, ``b = √(γ/scale) √S_r V_rᵀ`` (``γ = gradient_step``), so
      ``scale · a b = γ [−G]_r``: the best rank-``r`` approximation of one full-fine-tuning
      gradient step of size ``γ``. Its factor gradients at step 0 are ``scale·G bᵀ`` and
      ``scale·aᵀG``, aligned with the top singular subspaces of ``G`` (the LoRA-GA/LoRA-One
      property). ``W0 ← W0 − γ [−G]_r``.

    The SVD inits change ``W0`` so that the layer computes the same function at step 0 (up to
    rounding of the subtraction in ``W0``'s dtype). With ``out_slices`` each slice is
    initialised from its own column block ``W0[:, start:stop]`` (or ``G[:, start:stop]``).

    Args:
      base: the layer to adapt; its kernel is modified in place by the SVD inits.
      rank: ``r``.
      alpha: LoRA alpha ``> 0``; ``scale = alpha / r`` (``alpha / √r`` with ``rslora``).
      rslora: rank-stabilised scale (Kalajdzievski 2023).
      dropout: dropout rate in ``[0, 1)`` on the LoRA branch input (``nnx.Dropout``;
        ``deterministic`` follows nnx: the module attribute, set by ``model.eval()`` /
        ``model.train()``, or the call argument). The frozen path sees the undropped input.
      init: one of :data:`INITS`.
      gradient: ``G``, the ``(in, out)`` gradient of the loss w.r.t. ``W0``, for
        ``init="gradient"``.
      gradient_step: ``γ > 0`` of ``init="gradient"`` (default 1.0: the gradient is taken at face
        value; choose it like a full-fine-tuning learning rate).
      out_slices: ``[(start, stop), ...]`` column slices of a fused projection that get their
        own pair (e.g. q and v of GPT-2's ``c_attn``: ``[(0, d), (2d, 3d)]``); all of one
        width, non-overlapping. ``lora_a`` is then ``(P, in, r)`` and ``lora_b`` ``(P, r, w)``.
      grad_stats: ``True`` adds a statistics probe ``lora_stats`` (an ``nnx.Dict``
        ``{"row", "col"}`` of ``nnx.LoRAParam``, see :mod:`lowrank_optax.grad_stats`) whose
        gradient is ``rowsum(G⊙G)`` / ``colsum(G⊙G)`` of this layer's (per-slice) weight
        gradient ``G``; ``"full"`` adds ``G`` itself (``"grad"``). The projection then runs through
        :func:`~lowrank_optax.grad_stats.lora_matmul_with_stats` with the kernel and bias read
        from ``base`` (computed in ``base.dtype`` when set).
      param_dtype: dtype of ``lora_a`` / ``lora_b``.
      a_sharding: mesh axis names of ``lora_a`` (one per axis), stored as the variable's
        ``out_sharding`` metadata (flax 0.12; with eager sharding, create under a mesh).
      b_sharding: the same for ``lora_b``.
      rngs: ``params`` stream for ``a``; ``dropout`` stream when ``dropout > 0``.
    """

    def __init__(
        self,
        base: nnx.Module,
        rank: int,
        *,
        alpha: float,
        rslora: bool = False,
        dropout: float = 0.0,
        init: str = "zero_b",
        gradient: jax.Array | None = None,
        gradient_step: float = 1.0,
        out_slices: Sequence[Sequence[int]] | None = None,
        grad_stats: bool | str = False,
        param_dtype: Any = jnp.float32,
        a_sharding: Sequence[str | None] | None = None,
        b_sharding: Sequence[str | None] | None = None,
        rngs: nnx.Rngs,
    ):
        if init not in INITS:
            raise ValueError(f"init must be one of {INITS}, got {init!r}")
        if grad_stats not in _GRAD_STATS:
            raise ValueError(f"grad_stats must be one of {_GRAD_STATS}, got {grad_stats!r}")
        if (init == "gradient") != (gradient is not None):
            raise ValueError('pass gradient=G exactly when init="gradient"')
        if rank < 1:
            raise ValueError(f"rank must be >= 1, got {rank}")
        if not alpha > 0 or not math.isfinite(alpha):
            raise ValueError(f"alpha must be a finite number > 0, got {alpha}")
        if not 0.0 <= dropout < 1.0:
            raise ValueError(f"dropout must be in [0, 1), got {dropout}")
        if not gradient_step > 0 or not math.isfinite(gradient_step):
            raise ValueError(f"gradient_step must be a finite number > 0, got {gradient_step}")
        kernel = base.kernel[...]
        if kernel.ndim != 2:
            raise ValueError(f"base.kernel must be (in, out), got shape {kernel.shape}")
        in_features, out_features = kernel.shape
        self.base = base
        self.rank = rank
        self.alpha = alpha
        self.scale = alpha / math.sqrt(rank) if rslora else alpha / rank
        self.out_slices = _check_slices(out_slices, out_features)
        self.grad_stats = grad_stats
        self.merged = False
        self.dropout = nnx.Dropout(dropout, rngs=rngs) if dropout > 0 else None

        batch = () if self.out_slices is None else (len(self.out_slices),)
        width = out_features if self.out_slices is None else self._width
        if init == "zero_b":
            a = _kaiming_uniform_a(rngs.params(), (*batch, in_features, rank))
            b = jnp.zeros((*batch, rank, width), jnp.float32)
        else:
            if init == "gradient":
                source = -jnp.asarray(gradient, jnp.float32)
                if source.shape != kernel.shape:
                    raise ValueError(f"gradient shape {source.shape} != kernel {kernel.shape}")
                factor = gradient_step / self.scale
            else:
                source, factor = kernel.astype(jnp.float32), 1.0 / self.scale
            a, b = _rank_r_factors(self._blocks(source), rank, top=init != "milora",
                                   factor=factor)
            base.kernel[...] = (kernel.astype(jnp.float32) - self._delta(a, b)).astype(
                kernel.dtype)
        self.lora_a = nnx.LoRAParam(a.astype(param_dtype), **_sharding(a_sharding))
        self.lora_b = nnx.LoRAParam(b.astype(param_dtype), **_sharding(b_sharding))
        if grad_stats:
            probe = stats_probe(in_features, width, batch, full_gradient=grad_stats == "full")
            # one Variable per array, so the pure-state round trip (nnx.split, nnx.as_pure,
            # nnx.merge) keeps one leaf per Variable
            self.lora_stats = nnx.Dict({k: nnx.LoRAParam(v) for k, v in probe.items()})

    @property
    def _width(self) -> int:
        start, stop = self.out_slices[0]
        return stop - start

    def _blocks(self, matrix: jax.Array) -> jax.Array:
        """``matrix`` ``(in, out)``, or its slice blocks stacked ``(P, in, w)``."""
        if self.out_slices is None:
            return matrix
        return jnp.stack([matrix[:, start:stop] for start, stop in self.out_slices])

    def _scatter(self, parts: jax.Array, out_features: int) -> jax.Array:
        """``(..., P, w)`` slice values placed in a zero ``(..., out)`` array."""
        full = jnp.zeros((*parts.shape[:-2], out_features), parts.dtype)
        for p, (start, stop) in enumerate(self.out_slices):
            full = full.at[..., start:stop].add(parts[..., p, :])
        return full

    def _delta(self, a: jax.Array, b: jax.Array) -> jax.Array:
        """``scale · a b`` as an ``(in, out)`` float32 matrix (zero outside the slices)."""
        a, b = a.astype(jnp.float32), b.astype(jnp.float32)
        if self.out_slices is None:
            return self.scale * (a @ b)
        parts = self.scale * jnp.einsum("pir,prw->ipw", a, b)
        return self._scatter(parts, self.base.kernel.shape[-1])

    def delta(self) -> jax.Array:
        """The current ``ΔW = scale · a b`` as an ``(in, out)`` float32 matrix."""
        return self._delta(self.lora_a[...], self.lora_b[...])

    def _lora_branch(self, z: jax.Array, out_features: int) -> jax.Array:
        a, b = self.lora_a[...], self.lora_b[...]
        if self.out_slices is None:
            return (z @ a) @ b * self.scale
        parts = jnp.einsum("...pr,prw->...pw", jnp.einsum("...i,pir->...pr", z, a), b)
        return self._scatter(parts * self.scale, out_features)

    def _with_stats(self, x: jax.Array, z: jax.Array) -> jax.Array:
        """The projection through :func:`lora_matmul_with_stats` (per slice with out_slices)."""
        kernel = self.base.kernel[...]
        dtype = getattr(self.base, "dtype", None)
        if dtype is not None:
            x, z, kernel = x.astype(dtype), z.astype(dtype), kernel.astype(dtype)
        a, b = self.lora_a[...], self.lora_b[...]
        probe = {k: v[...] for k, v in self.lora_stats.items()}
        if self.out_slices is None:
            y = lora_matmul_with_stats(x, kernel, a, b, self.scale, probe, lora_input=z)
        else:
            y = self._sliced_with_stats(x, z, kernel, a, b, probe)
        bias = getattr(self.base, "bias", None)
        return y if bias is None else y + bias[...].astype(y.dtype)

    def _sliced_with_stats(self, x, z, kernel, a, b, probe) -> jax.Array:
        """Slices via a vmapped stats matmul; the other columns as plain ``x @ W0[:, gap]``."""
        per_slice = jax.vmap(
            lambda w, a, b, p: lora_matmul_with_stats(x, w, a, b, self.scale, p, lora_input=z),
            out_axes=-2,
        )(self._blocks(kernel), a, b, probe)
        pieces, column = [], 0
        for p, (start, stop) in sorted(enumerate(self.out_slices), key=lambda item: item[1]):
            if column < start:
                pieces.append(x @ kernel[:, column:start])
            pieces.append(per_slice[..., p, :])
            column = stop
        if column < kernel.shape[-1]:
            pieces.append(x @ kernel[:, column:])
        return jnp.concatenate(pieces, axis=-1)

    def __call__(
        self,
        x: jax.Array,
        *,
        deterministic: bool | None = None,
        rngs: nnx.Rngs | None = None,
    ) -> jax.Array:
        """``base(x) + scale · dropout(x) a b`` (``base(x)`` alone while merged)."""
        if self.merged:
            return self.base(x)
        z = x if self.dropout is None else self.dropout(x, deterministic=deterministic, rngs=rngs)
        if self.grad_stats:
            return self._with_stats(x, z)
        y = self.base(x)
        return y + self._lora_branch(z, y.shape[-1]).astype(y.dtype)

    def merge(self) -> None:
        """``W0 ← W0 + scale · a b`` (float32 math, cast to the kernel dtype); disables the branch.

        A merged layer computes ``base(x)`` only: the same function (up to rounding in the
        kernel dtype, and without LoRA dropout), at the cost of one matmul. While merged the
        factors get zero gradients, but an optimizer with momentum still moves them, and
        :meth:`unmerge` then subtracts a product the kernel never received: merge to evaluate
        or export, unmerge before training on. No-op when already merged.
        """
        if not self.merged:
            self._add_to_kernel(1.0)
            self.merged = True

    def unmerge(self) -> None:
        """``W0 ← W0 − scale · a b`` and re-enable the branch; no-op when not merged."""
        if self.merged:
            self._add_to_kernel(-1.0)
            self.merged = False

    def _add_to_kernel(self, sign: float) -> None:
        kernel = self.base.kernel[...]
        self.base.kernel[...] = (kernel.astype(jnp.float32) + sign * self.delta()).astype(
            kernel.dtype)


def lora_modules(model: nnx.Module) -> Iterator[tuple[str, LoRALinear]]:
    """``(dotted path, module)`` of every :class:`LoRALinear` in ``model`` (itself included)."""
    for path, node in nnx.iter_graph(model):
        if isinstance(node, LoRALinear):
            yield _dotted(path), node


def merge_lora(model: nnx.Module) -> list[str]:
    """Merge every :class:`LoRALinear` of ``model`` in place (see :meth:`LoRALinear.merge`).

    Returns the paths of the merged layers.
    """
    paths = []
    for path, module in lora_modules(model):
        module.merge()
        paths.append(path)
    return paths


def unmerge_lora(model: nnx.Module) -> list[str]:
    """Undo :func:`merge_lora` (see :meth:`LoRALinear.unmerge`); returns the layers' paths."""
    paths = []
    for path, module in lora_modules(model):
        module.unmerge()
        paths.append(path)
    return paths


def _dotted(path: tuple[Any, ...]) -> str:
    return ".".join(str(key) for key in path)


def _is_linear_like(node: Any) -> bool:
    kernel = getattr(node, "kernel", None)
    return (
        isinstance(node, nnx.Module)
        and not isinstance(node, LoRALinear)
        and isinstance(kernel, nnx.Param)
        and kernel.ndim == 2
    )


def _linear_candidates(
    nodes: Mapping[tuple[Any, ...], Any],
) -> dict[tuple[Any, ...], nnx.Module]:
    """Linear-like submodules by graph path, excluding the bases of existing LoRA layers."""
    wrapped = [path for path, node in nodes.items() if isinstance(node, LoRALinear)]
    return {
        path: node
        for path, node in nodes.items()
        if _is_linear_like(node) and not any(path[: len(w)] == w for w in wrapped)
    }


def _target_table(
    targets: Sequence[str] | Mapping[str, Mapping[str, Any]],
) -> list[tuple[str, re.Pattern[str], dict[str, Any]]]:
    if isinstance(targets, str):
        raise TypeError("targets must be a sequence of patterns or a dict, not a single string")
    if not isinstance(targets, Mapping):
        return [(pattern, re.compile(pattern), {}) for pattern in targets]
    table = []
    for pattern, kwargs in targets.items():
        if not isinstance(kwargs, Mapping):
            raise TypeError(
                f"targets[{pattern!r}] must be a dict of LoRALinear keyword arguments, e.g. "
                f"{{'out_slices': [(0, d), (2 * d, 3 * d)]}}; got {type(kwargs).__name__}"
            )
        table.append((pattern, re.compile(pattern), dict(kwargs)))
    return table


def _replace(parent: Any, key: Any, new: nnx.Module) -> None:
    """Set ``parent``'s child ``key``: a list index or dict key, else an attribute."""
    if isinstance(parent, (list, dict, nnx.List, nnx.Dict)):
        parent[key] = new
    else:
        setattr(parent, key, new)


def inject_lora(
    model: nnx.Module,
    targets: Sequence[str] | Mapping[str, Mapping[str, Any]],
    *,
    rank: int,
    alpha: float,
    rngs: nnx.Rngs,
    **lora_kwargs: Any,
) -> list[str]:
    """Wrap the ``nnx.Linear``-like submodules of ``model`` selected by ``targets`` in place.

    A candidate is a submodule with a 2-D ``kernel`` ``nnx.Param`` (not already inside a
    :class:`LoRALinear`); its path is the dotted ``nnx`` graph path, list indices included,
    e.g. ``"h.3.attn.c_attn"``. Each pattern is a regular expression that must
    ``re.fullmatch`` that path (``r"h\\.\\d+\\.attn\\.c_attn"``, ``r".*\\.c_fc"``).

    Args:
      model: modified in place (the matched child is replaced on its parent: attribute,
        ``nnx.List`` index or ``nnx.Dict`` key).
      targets: a sequence of patterns, or a dict ``pattern -> dict of keyword arguments`` of
        :class:`LoRALinear` for the layers it matches (they override ``rank``, ``alpha`` and
        ``lora_kwargs``), e.g. ``{r"h\\.\\d+\\.attn\\.c_attn": {"out_slices": [(0, d),
        (2 * d, 3 * d)]}, r"h\\.\\d+\\.mlp\\.c_fc": {}}``. A path matched by several patterns
        uses the first. A ``gradient`` keyword given as a mapping is looked up by path
        (``{path: G}``) for ``init="gradient"``.
      rank: default ``r``.
      alpha: default LoRA alpha.
      rngs: random streams for the factors (and dropout).
      **lora_kwargs: further :class:`LoRALinear` keyword arguments for every target.

    Returns:
      The dotted paths of the wrapped layers, in graph order.

    Raises:
      ValueError: a pattern matches no candidate (the message lists the candidates).
    """
    table = _target_table(targets)
    nodes = dict(nnx.iter_graph(model))
    candidates = _linear_candidates(nodes)
    names = {path: _dotted(path) for path in candidates}
    unmatched = [p for p, regex, _ in table if not any(regex.fullmatch(n) for n in names.values())]
    if unmatched:
        shown = ", ".join(list(names.values())[:12]) + (", ..." if len(names) > 12 else "")
        raise ValueError(
            f"LoRA target pattern(s) {unmatched} match no Linear-like module path "
            f"(patterns must fullmatch the dotted path); candidates: {shown}"
        )
    injected = []
    for path, node in candidates.items():
        name = names[path]
        chosen = next((kw for _, regex, kw in table if regex.fullmatch(name)), None)
        if chosen is None:
            continue
        kwargs = {"rank": rank, "alpha": alpha, **lora_kwargs, **chosen}
        if isinstance(kwargs.get("gradient"), Mapping):
            kwargs["gradient"] = kwargs["gradient"][name]
        layer_rank = kwargs.pop("rank")
        _replace(nodes[path[:-1]], path[-1], LoRALinear(node, layer_rank, rngs=rngs, **kwargs))
        injected.append(name)
    return injected
