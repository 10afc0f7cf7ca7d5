"""Cross-term clipping: a step's second-order change of ``a b`` kept below its first-order change.

A LoRA step ``(Δa, Δb)`` changes the product by

    (a + Δa)(b + Δb) − a b = (a Δb + Δa b) + Δa Δb,

a first-order term, which is what every method's direction is designed for (a projection of a
preconditioned gradient onto the tangent space at ``a b``), and the cross term ``Δa Δb``, which
no method controls. Methods that divide by the factors' Grams (scaled GD, SoLoRA, LoRA-RITE,
LRACS, …) bound the first-order term by the gradient, but not the cross term: when both factors
have small singular values, ``Δa ∝ ∇a (b bᵀ)⁻¹`` and ``Δb ∝ (aᵀa)⁻¹ ∇b`` are both large along
them, and ``Δa Δb`` grows like ``lr²‖G‖²/(σ_a σ_b)``. From ``a`` of rank r − 2 and ``b`` of
rank 1 (``tests/test_numerics.py``) the first steps leave genuine eigenvalues of ~1e-4 next to
~3 in the Grams, and the next step's cross term takes the loss from 14.6 to 1e3 (scaled GD,
lr 0.3), 250 (SoLoRA), 1e6 (LoRA-RITE, float64) or 2e4 (LRACS, float64).

:func:`clip_cross_term` scales each pair's step by

    t = min(1, ρ·‖a Δb + Δa b‖_F / ‖Δa Δb‖_F),

so that the cross term is at most ``ρ`` times the first-order term (``t`` multiplies the first
by ``t`` and the cross term by ``t²``). Near a solution or at a small learning rate the cross
term is second order in the step and ``t = 1``: the method's own step, unchanged. Both norms
are GL(r) invariant (``(a R, R⁻¹ b)`` with ``(Δa R, R⁻¹ Δb)`` leaves ``a Δb``, ``Δa b`` and
``Δa Δb`` unchanged), so an invariant method stays invariant. Cost per pair: the blocks of
two ``2r×2r`` Grams, ``[a, Δa]ᵀ[a, Δa]`` and ``[b; Δb][b; Δb]ᵀ`` (``3(m + n)r²``
multiply-adds); no ``m×n`` array.
"""

from __future__ import annotations

import jax
import jax.numpy as jnp
import optax

from lowrank_optax import linalg
from lowrank_optax.pairs import (
    DEFAULT_KEYS,
    LoRAPair,
    PairKeys,
    pair_map_transformation,
)
from lowrank_optax.validation import check_hyperparams, with_state_check

__all__ = ["clip_cross_term", "cross_term_scale", "maybe_clip_cross_term"]


def _trace_of_product(x: jax.Array, y: jax.Array) -> jax.Array:
    """``tr(x y)`` without forming ``x y``."""
    return jnp.sum(x * linalg.mT(y), axis=(-2, -1))


def cross_term_scale(step: LoRAPair, p: LoRAPair, max_ratio: float | jax.Array) -> jax.Array:
    """``t = min(1, ρ‖a Δb + Δa b‖_F / ‖Δa Δb‖_F)`` for one 2-D pair (a scalar).

    Each side is first divided by its largest entry (of ``a`` and ``Δa``, of ``b`` and ``Δb``):
    the ratio is unchanged, and the squared norms can neither overflow nor underflow. The three
    distinct ``r×r`` blocks of each side's ``2r×2r`` Gram are formed separately (``aᵀa``,
    ``aᵀΔa``, ``ΔaᵀΔa``): no concatenated copy, and 3/4 of the full Gram's products.
    ``t = 1`` for a zero cross term.
    """
    scale_a, scale_b = linalg.max_abs_scale(p.a, step.a), linalg.max_abs_scale(p.b, step.b)
    a, a_step = p.a / scale_a, step.a / scale_a
    b, b_step = p.b / scale_b, step.b / scale_b
    gram_a, step_gram_a = linalg.gram_a(a), linalg.gram_a(a_step)
    gram_b, step_gram_b = linalg.gram_b(b), linalg.gram_b(b_step)
    a_cross = jnp.einsum("...mr,...ms->...rs", a, a_step)
    b_cross = jnp.einsum("...rn,...sn->...rs", b, b_step)
    first = (_trace_of_product(gram_a, step_gram_b) + _trace_of_product(step_gram_a, gram_b)
             + 2 * _trace_of_product(a_cross, b_cross))
    cross = _trace_of_product(step_gram_a, step_gram_b)
    bound = max_ratio * jnp.sqrt(jnp.maximum(first, 0.0))
    clipped = cross > bound * bound
    cross_norm = jnp.sqrt(jnp.where(clipped, cross, 1.0))
    return jnp.where(clipped, bound / cross_norm, 1.0)


def clip_cross_term(
    max_ratio: float | jax.Array = 1.0, *, keys: PairKeys = DEFAULT_KEYS
) -> optax.GradientTransformation:
    """Scales each pair's update so that its cross term is at most ``max_ratio`` times its
    first-order change of ``a b`` (see the module docstring).

    Put it last in a chain, after the learning rate: it acts on the step itself.
    ``(Δa, Δb) ← t·(Δa, Δb)`` with ``t = min(1, ρ‖a Δb + Δa b‖_F / ‖Δa Δb‖_F)`` per pair (per
    layer of stacked pairs). Like every method, it refuses leaves that are not part of a pair.

    Args:
      max_ratio: ``ρ > 0``. Default 1.0: the cross term may be as large as the first-order
        change, no larger; on the test problems this leaves every step of a converging run
        unchanged and stops every divergence the cross term caused.
      keys: mapping keys of the factors in the tree.

    Returns:
      A stateless ``optax.GradientTransformation``; needs ``params`` in ``update``.
    """
    check_hyperparams("clip_cross_term", max_ratio=max_ratio)

    def clip(step: LoRAPair, p: LoRAPair) -> LoRAPair:
        t = cross_term_scale(step, p, max_ratio)[..., None, None]
        return LoRAPair(step.a * t, step.b * t)

    return with_state_check("clip_cross_term",
                            pair_map_transformation("clip_cross_term", clip, keys), keys)


def maybe_clip_cross_term(
    max_ratio: float | jax.Array | None, keys: PairKeys
) -> optax.GradientTransformation:
    """:func:`clip_cross_term`, or the identity for ``max_ratio=None`` (an alias's
    ``cross_term_ratio`` option)."""
    if max_ratio is None:
        return optax.identity()
    return clip_cross_term(max_ratio, keys=keys)
