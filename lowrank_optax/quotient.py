"""Quotient-geometry gradient descent for LoRA pairs (Mishra et al. 2014; LoRA-S baseline).

"GHᵀ gradient descent" on the quotient ``R_*^{m×r} × R_*^{n×r} / GL(r)`` under the metric of
LoRA-S eq. (7). In library orientation (``M = a``, ``N = bᵀ``)

    ḡ((ȧ, ḃ), (ǎ, b̌)) = tr((aᵀa)⁻¹ ȧᵀ ǎ) + tr((b bᵀ)⁻¹ ḃ b̌ᵀ),

and the Riemannian gradient ``ξ`` solves ``ḡ(ξ, η) = ⟨∇a, η_a⟩ + ⟨∇b, η_b⟩`` for all ``η``:

    ξ_a = ∇a (aᵀa)        ξ_b = (b bᵀ) ∇b

Each factor's gradient is multiplied by its *own* Gram (Manopt's ``fixedrankfactory_2factors``:
``egrad_L·(LᵀL)``), the opposite of scaled GD, which divides by the other factor's Gram. No
inverse appears. ``ξ`` is horizontal automatically (the loss is constant along the fibres), and
the step is exactly GL(r) invariant: ``(a R, R⁻¹ b)`` gives ``(ξ_a R, R⁻¹ ξ_b)``.

Manopt follows the step by a balancing ``a /= √(‖a‖/‖b‖)``, ``b *= √(‖a‖/‖b‖)``, which does not
change ``a b`` (it is a retraction detail, not part of the gradient) and divides by ``‖b‖ = 0``
at the LoRA zero init; it is not done here.

Zero-initialised ``b``: ``∇a = G bᵀ = 0`` and ``ξ_b = (b bᵀ) ∇b = 0``, so the plain method never
moves (without any NaN). Two remedies, both opt-in:

* ``robust_steps`` (LoRA-S App. A.16's robust start): the first ``robust_steps`` steps use the
  raw Euclidean gradient (plain GD), which moves ``b`` off zero; then quotient GD. Under a
  warm-up schedule let them run past the warm-up: steps taken at a near-zero rate leave ``b``
  near zero, and quotient GD multiplies by its Gram (the toy of ``tests/test_numerics.py``,
  300 steps, 50 of warm-up to 0.01: relative loss 0.9986 with ``robust_steps=5``, 0.12 with
  50, 5.9e-10 with 60).
* ``delta``: ``ξ_a = ∇a (aᵀa + δI)``, ``ξ_b = (b bᵀ + δI) ∇b`` — a leak of ``δ`` times the
  Euclidean gradient that escapes the zero start slowly (at rate ``~δ``) and breaks invariance
  by ``O(δ/σ²)``.

Step size: the Grams multiply the gradient, so the step in ``a b`` grows like the factors'
scale to the fourth power (``‖a‖²`` and ``‖b‖²`` times the curvature). A learning rate that is
stable at the start can be past the stability limit once the factors have grown: on the
one-example regression of ``tests/test_numerics.py`` ``lr = 0.1`` fits the example during the
robust start and then oscillates away (to NaN in float32), ``lr = 0.03`` converges. Manopt
uses a line search for this reason, and optax has one: chain
``optax.scale_by_backtracking_linesearch`` after ``quotient_sgd(1.0, ...)`` (its rate is then
the search's initial guess) and pass ``value``, ``grad`` and ``value_fn`` to ``update``.
Otherwise pick the learning rate at the factors' working scale or decay it.

References: B. Mishra, G. Meyer, S. Bonnabel and R. Sepulchre, "Fixed-rank matrix factorizations
and Riemannian low-rank optimization", Comput. Stat. 29, 2014; LoRA-S App. A.18.6.
"""

from __future__ import annotations

from typing import Any, NamedTuple

import jax
import jax.numpy as jnp
import optax

from lowrank_optax import linalg
from lowrank_optax.cross_term import maybe_clip_cross_term
from lowrank_optax.pairs import (
    DEFAULT_KEYS,
    LoRAPair,
    PairKeys,
    PairTree,
    abstract_safe_init,
    map_pairs,
)
from lowrank_optax.validation import check_hyperparams, with_state_check

__all__ = ["quotient_gradient", "quotient_sgd", "scale_by_quotient"]


def quotient_gradient(g: LoRAPair, p: LoRAPair, delta: float | jax.Array = 0.0) -> LoRAPair:
    """Riemannian gradient under metric (7): ``(∇a (aᵀa + δI), (b bᵀ + δI) ∇b)``.

    The Grams multiply, nothing is inverted, so ``δ`` is exactly the user's (no
    :func:`~lowrank_optax.linalg.damping` floor): with ``δ = 0`` a factor pair from ``b = 0``
    stays at ``b = 0``, as the paper says of plain Quotient GD."""

    def shifted(gram: jax.Array) -> jax.Array:
        return gram + jnp.asarray(delta, gram.dtype) * jnp.eye(gram.shape[-1], dtype=gram.dtype)

    return LoRAPair(g.a @ shifted(linalg.gram_a(p.a)), shifted(linalg.gram_b(p.b)) @ g.b)


class ScaleByQuotientState(NamedTuple):
    """State of :func:`scale_by_quotient`: the step count (int32), for the robust start."""

    count: jax.Array


def scale_by_quotient(
    delta: float = 0.0,
    *,
    robust_steps: int = 0,
    keys: PairKeys = DEFAULT_KEYS,
) -> optax.GradientTransformation:
    """Quotient GD direction: each factor gradient times its own Gram (metric (7)).

    Per step and pair (pre-step ``a``, ``b``)::

        step ≤ robust_steps:  (u_a, u_b) = (∇a, ∇b)
        otherwise:            (u_a, u_b) = (∇a (aᵀa + δI), (b bᵀ + δI) ∇b)

    Args:
      delta: ``δ ≥ 0`` added to both Grams; default 0 (the method as published, exactly
        invariant). See the module docstring for its use at zero init.
      robust_steps: initial plain-gradient steps (an integer ``≥ 0``) that move a
        zero-initialised ``b``; default 0. Under a warm-up, more than the warm-up's steps.
        Works when traced (``optax.inject_hyperparams``): the switch is a ``jnp.where``.
      keys: mapping keys of the factors in the tree.
    """
    check_hyperparams("scale_by_quotient", delta=delta, robust_steps=robust_steps)

    def init_fn(params: optax.Params) -> ScaleByQuotientState:
        PairTree(params, keys)
        return ScaleByQuotientState(jnp.zeros([], jnp.int32))

    def update_fn(updates: Any, state: ScaleByQuotientState, params: Any = None):
        in_robust_phase = state.count < robust_steps

        def pair_fn(g: LoRAPair, p: LoRAPair) -> LoRAPair:
            riemannian = quotient_gradient(g, p, delta)
            return LoRAPair(
                jnp.where(in_robust_phase, g.a, riemannian.a),
                jnp.where(in_robust_phase, g.b, riemannian.b),
            )

        new_updates = map_pairs(pair_fn, updates, params, keys=keys)
        return new_updates, ScaleByQuotientState(optax.safe_increment(state.count))

    return with_state_check("scale_by_quotient",
                            optax.GradientTransformation(abstract_safe_init(init_fn), update_fn),
                            keys)


def quotient_sgd(
    learning_rate: optax.ScalarOrSchedule,
    delta: float = 0.0,
    *,
    robust_steps: int = 0,
    cross_term_ratio: float | None = None,
    keys: PairKeys = DEFAULT_KEYS,
) -> optax.GradientTransformation:
    """Quotient GD for LoRA pairs: ``a ← a − lr·∇a (aᵀa)``, ``b ← b − lr·(b bᵀ) ∇b``.

    The LoRA-S paper's "Quotient GD" baseline (Mishra et al.'s GHᵀ gradient descent, metric
    (7)). From the LoRA zero init pass ``robust_steps > 0`` (or ``delta > 0``), otherwise the
    factors never move.

    Args:
      learning_rate: a float ``≥ 0`` or an ``optax.Schedule``. The step scales like the cube of the
        factors' size (gradient times a Gram), so it needs its own tuning.
      delta: Gram shift ``≥ 0`` (see :func:`scale_by_quotient`), default 0.
      robust_steps: initial plain-GD steps, an integer ``≥ 0`` (see :func:`scale_by_quotient`),
        default 0.
      cross_term_ratio: ``ρ > 0`` of :func:`~lowrank_optax.clip_cross_term`, applied to the
        step after the learning rate, or ``None`` (default, the method's own step). It does not
        fix a learning rate past the stability limit (see "Step size" above): on the
        one-example regression at ``lr = 0.1`` it keeps the run finite (float32: NaN by step
        35 without it) but not converging. It costs two 2r×2r Grams per pair.
      keys: mapping keys of the factors in the tree.
    """
    check_hyperparams("quotient_sgd", learning_rate=learning_rate, delta=delta,
                      robust_steps=robust_steps, cross_term_ratio=cross_term_ratio)
    return with_state_check("quotient_sgd", optax.chain(
        scale_by_quotient(delta, robust_steps=robust_steps, keys=keys),
        optax.scale_by_learning_rate(learning_rate),
        maybe_clip_cross_term(cross_term_ratio, keys),
    ), keys)
