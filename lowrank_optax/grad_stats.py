"""Exact full-gradient statistics of a LoRA layer, reduced inside the backward pass.

Some optimizers need information about ``G = ∂L/∂W`` (the gradient of the adapted weight,
``W = W0 + scale·a b``) that the factor gradients ``scale·G bᵀ`` and ``scale·aᵀG`` do not carry.
SoLoRA's metric needs ``rowsum(G⊙G)`` and ``colsum(G⊙G)``. Differentiating ``W0`` would deliver
``G`` but keeps a parameter-sized gradient of every adapted layer alive until the optimizer
runs. This module delivers the reductions instead, through a *statistics probe*:

* the probe is a small zero-valued parameter, a dict ``{"row": (..., m), "col": (..., n)}``
  (float32), stored beside ``lora_a`` / ``lora_b`` under the key ``lora_stats``;
* :func:`lora_matmul_with_stats` computes ``x @ W0 + scale·(x a) b``; its output does not depend
  on the probe's value, but its custom VJP returns as the probe's cotangent the statistics of
  ``G = xᵀδ`` (``δ`` the output cotangent), computed and reduced in the layer's backward pass;
* ``jax.grad`` / ``nnx.grad`` then hand the statistics to the optimizer as the probe's
  "gradient" (``LoRAPair.stats``); optimizers of this library give the probe a zero update, so
  it stays zero (its value is never read).

``G`` exists only transiently, one layer at a time, inside that layer's backward. With
``method="gram"`` it is not formed at all: ``rowsum(G⊙G) = colsum((δδᵀ x) ⊙ x)`` and
``colsum(G⊙G) = colsum((x xᵀ δ) ⊙ δ)`` use the ``T×T`` Gram matrices of the ``T`` tokens, which
is smaller than ``m×n`` when ``T² < m·n`` (``"auto"``, the default, picks the smaller one).

An optional ``"grad": (..., m, n)`` entry (``full_gradient=True``) makes the probe's cotangent
``G`` itself, for methods that keep an ``m×n`` moment of ``G`` (SoLoRA Algorithm 2 as
published); it costs what differentiating ``W0`` costs plus the zero ``m×n`` probe.

Semantics to know:

* ``G`` is the gradient of the whole loss with respect to this layer's weight *for one call* of
  the layer: the statistics are exact when the layer is applied once per loss evaluation (any
  number of leading batch/sequence axes). A layer applied several times per loss (weight tying,
  a Python loop) gets the sum of the per-call statistics, not the statistics of the summed
  gradient.
* Under ``jax.jit`` with a sharded batch the contraction over tokens is a global operation, so
  the statistics are those of the global-batch gradient. Gradient accumulation
  (``optax.MultiSteps``) averages the per-micro-batch statistics, i.e. it gives the mean of
  ``rowsum(G_k⊙G_k)`` over micro-batches, not ``rowsum(Ḡ⊙Ḡ)`` of the averaged gradient.
* With LoRA dropout pass the dropped input as ``lora_input``: ``G = xᵀδ`` is taken with the
  undropped input ``x``, the gradient full fine-tuning of ``W`` would see.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from functools import partial
from typing import Any

import jax
import jax.numpy as jnp

__all__ = [
    "GRAD",
    "ROW",
    "COL",
    "gradient_statistics",
    "lora_matmul_with_stats",
    "probe_fields",
    "stats_probe",
]

ROW = "row"
COL = "col"
GRAD = "grad"
_METHODS = ("auto", "dense", "gram")


def stats_probe(
    m: int, n: int, batch_shape: Sequence[int] = (), *, full_gradient: bool = False
) -> dict[str, jax.Array]:
    """A zero statistics probe for an ``m×n`` weight (float32).

    Args:
      m: input features of the layer (rows of ``W``, of ``a``).
      n: output features (columns of ``W``, of ``b``).
      batch_shape: leading axes of stacked layers (same as the factors' leading axes).
      full_gradient: also carry ``G`` itself (an ``m×n`` entry, see the module docstring).
    """
    shape = tuple(batch_shape)
    probe = {ROW: jnp.zeros((*shape, m), jnp.float32), COL: jnp.zeros((*shape, n), jnp.float32)}
    if full_gradient:
        probe[GRAD] = jnp.zeros((*shape, m, n), jnp.float32)
    return probe


def _flat_tokens(x: jax.Array) -> jax.Array:
    return x.reshape(-1, x.shape[-1])


def _choose(method: str, tokens: int, m: int, n: int, full_gradient: bool) -> str:
    if method not in _METHODS:
        raise ValueError(f"method must be one of {_METHODS}, got {method!r}")
    if full_gradient:
        return "dense"
    if method == "auto":
        return "gram" if tokens * tokens < m * n else "dense"
    return method


def gradient_statistics(
    x: jax.Array,
    cotangent: jax.Array,
    *,
    full_gradient: bool = False,
    method: str = "auto",
) -> dict[str, jax.Array]:
    """Statistics of ``G = xᵀ δ`` for ``y = x @ W``: row and column sums of ``G⊙G`` (float32).

    Args:
      x: layer input, ``(..., m)``; leading axes are summed over (tokens).
      cotangent: ``δ = ∂L/∂y``, ``(..., n)`` with the same leading axes.
      full_gradient: also return ``G`` (``"grad"``, ``m×n``).
      method: ``"dense"`` forms ``G`` transiently; ``"gram"`` uses the ``T×T`` token Gram
        matrices and never forms ``G``; ``"auto"`` picks the one with the smaller intermediate.

    Returns:
      ``{"row": (m,), "col": (n,)}`` (plus ``"grad": (m, n)``), float32 or wider.
    """
    xt = _flat_tokens(x)
    dt = _flat_tokens(cotangent)
    f32 = jnp.promote_types(jnp.result_type(x, cotangent), jnp.float32)
    route = _choose(method, xt.shape[0], xt.shape[1], dt.shape[1], full_gradient)
    if route == "dense":
        g = jnp.einsum("tm,tn->mn", xt, dt, preferred_element_type=f32)
        squared = g * g
        stats = {ROW: jnp.sum(squared, axis=1), COL: jnp.sum(squared, axis=0)}
        if full_gradient:
            stats[GRAD] = g
        return stats
    xt, dt = xt.astype(f32), dt.astype(f32)
    gram_x = xt @ xt.T
    gram_d = dt @ dt.T
    return {ROW: jnp.sum((gram_d @ xt) * xt, axis=0), COL: jnp.sum((gram_x @ dt) * dt, axis=0)}


def probe_fields(stats: Any) -> tuple[jax.Array, jax.Array, jax.Array | None]:
    """``(row, col, grad_or_None)`` from a probe gradient (a dict, or an ``nnx`` variable)."""
    found: dict[str, jax.Array] = {}
    for path, leaf in jax.tree_util.tree_flatten_with_path(stats)[0]:
        key = path[-1]
        name = getattr(key, "key", getattr(key, "name", None))
        found[name] = leaf
    if ROW not in found or COL not in found:
        raise ValueError(
            f"a statistics probe needs entries {ROW!r} and {COL!r}, got {sorted(map(str, found))}"
        )
    return found[ROW], found[COL], found.get(GRAD)


def _forward(x, lora_input, w0, a, b, scale):
    base = x @ w0
    lora = ((lora_input @ a) @ b) * scale
    return base + lora.astype(base.dtype)


@partial(jax.custom_vjp, nondiff_argnums=(0,))
def _lora_matmul(method, x, lora_input, w0, a, b, scale, probe):
    del probe
    return _forward(x, lora_input, w0, a, b, scale)


def _lora_matmul_fwd(method, x, lora_input, w0, a, b, scale, probe):
    values = [v.value for v in (x, lora_input, w0, a, b, scale)]
    needs = {
        name: None
        for name, primal in (("w0", w0), ("scale", scale))
        if primal.perturbed
    }
    if any(leaf.perturbed for leaf in jax.tree.leaves(probe)):
        needs["probe"] = None
    # Empty arrays carry the probe's keys and dtypes to the backward pass at no memory cost.
    probe_dtypes = {k: jnp.zeros((0,), p.value.dtype) for k, p in probe.items()}
    return _forward(*values), (*values, probe_dtypes, needs)


def _lora_matmul_bwd(method, residuals, cotangent):
    x, lora_input, w0, a, b, scale, probe_dtypes, needs = residuals
    if isinstance(cotangent, jax.custom_derivatives.SymbolicZero):
        cotangent = jnp.zeros(cotangent.shape, cotangent.dtype)
    delta_b = (cotangent @ b.T.astype(cotangent.dtype)) * scale  # δ (s b)ᵀ, (..., r)
    x_a = lora_input @ a  # (..., r)
    ct_x = (cotangent @ w0.T).astype(x.dtype)
    ct_lora_input = (delta_b @ a.T).astype(lora_input.dtype)
    ct_a = jnp.einsum("...m,...r->mr", lora_input, delta_b).astype(a.dtype)
    ct_b = (jnp.einsum("...r,...n->rn", x_a, cotangent) * scale).astype(b.dtype)
    ct_w0 = jnp.einsum("...m,...n->mn", x, cotangent).astype(w0.dtype) if "w0" in needs else None
    ct_scale = None
    if "scale" in needs:
        ct_scale = jnp.sum(x_a * (cotangent @ b.T)).astype(scale.dtype).reshape(scale.shape)
    ct_probe = None
    if "probe" in needs:
        stats = gradient_statistics(x, cotangent, full_gradient=GRAD in probe_dtypes,
                                    method=method)
        ct_probe = {k: stats[k].astype(v.dtype) for k, v in probe_dtypes.items()}
    return ct_x, ct_lora_input, ct_w0, ct_a, ct_b, ct_scale, ct_probe


_lora_matmul.defvjp(_lora_matmul_fwd, _lora_matmul_bwd, symbolic_zeros=True)


def lora_matmul_with_stats(
    x: jax.Array,
    w0: jax.Array,
    a: jax.Array,
    b: jax.Array,
    scale: float | jax.Array,
    probe: Mapping[str, jax.Array],
    *,
    lora_input: jax.Array | None = None,
    method: str = "auto",
) -> jax.Array:
    """``x @ w0 + scale·(lora_input @ a) @ b`` whose VJP also returns statistics of ``G``.

    The forward value does not depend on ``probe``. In the backward pass, with ``δ`` the output
    cotangent and ``G = xᵀδ`` (``m×n``, the gradient of ``W = w0 + scale·a b``), the cotangent
    of ``probe`` is ``{"row": rowsum(G⊙G), "col": colsum(G⊙G)}`` (and ``"grad": G`` when the
    probe has that entry); the other cotangents are the ordinary ones. The cotangent of ``w0``
    (which is ``G``) is computed only when ``w0`` is differentiated.

    Args:
      x: input ``(..., m)``; all leading axes are token axes of one layer call.
      w0: frozen weight ``(m, n)``.
      a: LoRA factor ``(m, r)``.
      b: LoRA factor ``(r, n)``.
      scale: LoRA scale (``alpha / r``), a Python float or a scalar array.
      probe: a probe from :func:`stats_probe` for one layer (no leading axes; stacked layers go
        through ``jax.vmap`` / ``nnx.vmap`` / ``nnx.scan``).
      lora_input: input of the LoRA branch when it differs from ``x`` (LoRA dropout); default
        ``x``.
      method: how ``rowsum(G⊙G)`` / ``colsum(G⊙G)`` are computed, see
        :func:`gradient_statistics`.

    Returns:
      ``(..., n)`` output, in the dtype of ``x @ w0``.
    """
    _choose(method, 1, 1, 1, False)
    lora_input = x if lora_input is None else lora_input
    scale = jnp.asarray(scale)
    return _lora_matmul(method, x, lora_input, w0, a, b, scale, dict(probe))
