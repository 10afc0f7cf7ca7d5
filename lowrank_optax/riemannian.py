"""Riemannian-preconditioned LoRA: scaled GD and scaled AdamW (Zhang & Pilanci, 2024).

Under the metric ``g((ηa, ηb), (ξa, ξb)) = ⟨ηa, ξa b bᵀ⟩ + ⟨ηb, aᵀa ξb⟩`` (Mishra & Sepulchre,
2016) the Riemannian gradient of a LoRA pair is the Euclidean one with an r×r preconditioner on
each side. In library orientation (``delta_W = scale·a @ b``):

    ∇̃a = ∇a (b bᵀ + δI)⁻¹          ∇̃b = (aᵀa + δI)⁻¹ ∇b

Paper notation (``W = W0 + B A``, ``B: out×r``, ``A: r×in``): ``a = Aᵀ``, ``b = Bᵀ``, so
``b bᵀ = BᵀB`` and ``aᵀa = A Aᵀ``; the paper's ``(BᵀB + δI)⁻¹ ∇A`` is our ``∇a (b bᵀ + δI)⁻¹``
transposed. Both preconditioners use the pre-step factors (a simultaneous update, not
Gauss–Seidel).

Scaled AdamW normalises the two Grams by default (``normalize_grams=True``): each is divided by
its mean eigenvalue before inverting, ``∇a ((b bᵀ + δI)/s_b)⁻¹`` with ``s_b = tr(b bᵀ)/r + δ``.
The paper's rule (``normalize_grams=False``) feeds Adam ``∇a (b bᵀ + δI)⁻¹``, whose size is
``∝ ‖G‖/‖b‖``: from the zero-initialised ``b``, while a warm-up keeps ``b`` small, it is
hundreds of times larger than later on, and Adam's second moment remembers it for
``~1/(1 − b2)`` steps, freezing ``a`` (on the issue-12 toy: ``‖ĝa‖`` falls from 1.8e3 to 3 and
the loss stalls at 0.41 of its start where AdamW reaches 7e-8). Adam removes any constant
factor of its input, so the normalisation changes nothing while the Gram scale is steady; it
only takes the transient out of ``v``. Scaled GD keeps the paper's rule: there the Gram scale
is the step size.

Reference: F. Zhang and M. Pilanci, "Riemannian Preconditioned LoRA for Fine-Tuning Foundation
Models", ICML 2024, Algorithms 1 (scaled AdamW) and 2 (scaled GD); T. Tong, C. Ma and Y. Chi,
"Accelerating ill-conditioned low-rank matrix estimation via scaled gradient descent", JMLR 2021.
"""

from __future__ import annotations

from typing import Any

import jax
import jax.numpy as jnp
import optax

from lowrank_optax import linalg
from lowrank_optax.cross_term import maybe_clip_cross_term
from lowrank_optax.pairs import (
    DEFAULT_KEYS,
    LoRAPair,
    PairKeys,
    keep_update_dtypes,
    pair_map_transformation,
)
from lowrank_optax.validation import check_hyperparams, with_state_check

__all__ = [
    "ROBUST_RELATIVE_DELTA",
    "gram_scale",
    "relative_gram_delta",
    "precondition_pair",
    "scale_by_riemannian_precond",
    "scale_by_scaled_adam",
    "scaled_adamw",
    "scaled_sgd",
]


def gram_scale(gram: jax.Array, delta: float | jax.Array) -> jax.Array:
    """Mean eigenvalue of ``gram + δI``, ``tr(gram)/r + δ``, shaped ``(..., 1, 1)`` (``δ`` a
    scalar or shaped ``(..., 1, 1)``).

    Dividing a Gram by it keeps the Gram's shape (its conditioning, its eigenvectors) and removes
    its size; ``δ > 0`` keeps it positive at a zero factor.
    """
    return linalg.mean_eigenvalue(gram) + delta


ROBUST_RELATIVE_DELTA = 1e-2
"""Default ``relative_delta`` of the robust (normalised-Gram) modes: Gram eigenvalues below 1 %
of the mean are regularised, not inverted (see :func:`relative_gram_delta`)."""


def relative_gram_delta(gram: jax.Array, delta: float | jax.Array,
                        relative_delta: float | jax.Array) -> jax.Array:
    """``max(δ, relative_delta·tr(gram)/r)``, shaped ``(..., 1, 1)``: the regulariser of the
    robust modes, the larger of the absolute ``δ`` and a fraction of the mean eigenvalue.

    When the adapter has more rank than the fit needs, the Gram of a converging factor has
    eigenvalues far below its mean. An absolute ``δ = 1e-6`` inverts them: the preconditioned
    gradient along those directions is up to ``1/(2√δ) = 500`` times larger than along the used
    ones, and an elementwise Adam normaliser that follows spreads that noise over every
    coordinate (rank-1 and rank-2 targets with ``r = 4 … 16``: scaled AdamW stalled at 1e-2
    of the start loss where AdamW reaches 1e-7; AltLoRA+ rose from 5e-4 to 2e-2). Relative
    to the mean, the amplification is at most ``1/(2√relative_delta)`` = 5 times the used
    directions' at the default ``1e-2``, whatever the factors' scale.
    """
    relative = relative_delta * linalg.mean_eigenvalue(gram)
    return jnp.maximum(jnp.asarray(delta, gram.dtype), relative)


def precondition_pair(
    g: LoRAPair, p: LoRAPair, delta: float | jax.Array, normalize_grams: bool = False,
    relative_delta: float | jax.Array = 0.0,
) -> LoRAPair:
    """``(∇a (b bᵀ + δI)⁻¹, (aᵀa + δI)⁻¹ ∇b)`` for one 2-D pair (or a batch of pairs).

    With ``normalize_grams`` each Gram is regularised by :func:`relative_gram_delta`
    (``δ_b = max(δ, relative_delta·tr(b bᵀ)/r)``, likewise ``δ_a``) and divided by its mean
    eigenvalue (:func:`gram_scale`): ``(∇a ((b bᵀ + δ_b I)/s_b)⁻¹, ((aᵀa + δ_a I)/s_a)⁻¹ ∇b)``.
    """
    gram_a, gram_b = linalg.gram_a(p.a), linalg.gram_b(p.b)
    delta_a = delta_b = delta
    if normalize_grams:
        delta_a = relative_gram_delta(gram_a, delta, relative_delta)
        delta_b = relative_gram_delta(gram_b, delta, relative_delta)
    pre_a = linalg.solve_spd_right(g.a, gram_b, delta_b)
    pre_b = linalg.solve_spd(gram_a, g.b, delta_a)
    if normalize_grams:
        pre_a, pre_b = pre_a * gram_scale(gram_b, delta_b), pre_b * gram_scale(gram_a, delta_a)
    return LoRAPair(pre_a, pre_b)


def scale_by_riemannian_precond(
    delta: float = 1e-6,
    *,
    normalize_grams: bool = False,
    relative_delta: float = ROBUST_RELATIVE_DELTA,
    keys: PairKeys = DEFAULT_KEYS,
) -> optax.GradientTransformation:
    """Preconditions each factor gradient with the r×r Gram of the other factor.

    Update rule (library notation, per pair, pre-step ``a``, ``b``)::

        u_a = ∇a (b bᵀ + δI)⁻¹        u_b = (aᵀa + δI)⁻¹ ∇b

    Under this map the first-order change of ``a @ b`` is ``P_b G + P_a G`` with the
    (regularised) projectors onto the row space of ``b`` and the column space of ``a``: its size
    does not depend on how the product is split between the factors. With ``δ = 0`` the update of
    ``W`` is exactly invariant under ``(a, b) → (a R, R⁻¹ b)``.

    Args:
      delta: ``δ ≥ 0`` regulariser of both r×r Grams. Default ``1e-6`` as in the paper's GPT-2
        experiments: it keeps the zero-initialised ``b`` finite (the first ``a`` step is
        ``0·δ⁻¹ = 0``) while leaving well-conditioned Grams essentially unchanged.
      normalize_grams: divide each Gram by its mean eigenvalue before inverting (see
        :func:`precondition_pair`); the direction is then ``s_b·u_a``, ``s_a·u_b``. Default
        False (the paper's rule); meant for an Adam that follows (:func:`scale_by_scaled_adam`).
      relative_delta: with ``normalize_grams`` only, each Gram is regularised by
        ``max(δ, relative_delta·tr(G)/r)`` (:func:`relative_gram_delta`). Default 1e-2: Gram
        directions below 1 % of the mean eigenvalue (the rank the fit does not use) are damped,
        not inverted. ``0`` leaves ``δ`` alone.
      keys: mapping keys of the factors in the tree.

    Returns:
      An ``optax.GradientTransformation`` (stateless; needs ``params`` in ``update``).
    """
    check_hyperparams("scale_by_riemannian_precond", delta=delta, normalize_grams=normalize_grams,
                      relative_delta=relative_delta)

    return with_state_check("scale_by_riemannian_precond", pair_map_transformation(
        "scale_by_riemannian_precond",
        lambda g, p: precondition_pair(g, p, delta, normalize_grams, relative_delta), keys), keys)


def scaled_sgd(
    learning_rate: optax.ScalarOrSchedule,
    delta: float = 1e-6,
    weight_decay: float = 0.0,
    *,
    cross_term_ratio: float | None = 1.0,
    keys: PairKeys = DEFAULT_KEYS,
) -> optax.GradientTransformation:
    """Scaled GD (Riemannian-preconditioned SGD) for LoRA pairs.

    ``a ← a − lr·∇a (b bᵀ + δI)⁻¹ − lr·wd·a``, ``b ← b − lr·(aᵀa + δI)⁻¹ ∇b − lr·wd·b``,
    both preconditioners from the pre-step factors.

    Args:
      learning_rate: a float ``≥ 0`` or an ``optax.Schedule``.
      delta: regulariser ``≥ 0`` of the r×r Grams (see :func:`scale_by_riemannian_precond`).
      weight_decay: decoupled weight decay ``≥ 0``, applied to the parameters (not
        preconditioned).
        Default 0, the paper's choice for scaled GD.
      cross_term_ratio: ``ρ > 0`` of :func:`~lowrank_optax.clip_cross_term`, applied to the
        step after the learning rate, or ``None`` for the method's own step. Default 1.0:
        from ``a`` of rank r − 2 and ``b`` of rank 1 the step's cross term ``Δa Δb`` took
        the loss from 14.6 to 1e3 (scaled GD, lr 0.3); with it the run converges.
      keys: mapping keys of the factors in the tree.

    Example::

      >>> import jax.numpy as jnp, optax, lowrank_optax as lro
      >>> params = {"lora_a": jnp.ones((4, 2)), "lora_b": jnp.zeros((2, 3))}
      >>> tx = lro.scaled_sgd(0.1)
      >>> state = tx.init(params)
      >>> grads = {"lora_a": jnp.zeros((4, 2)), "lora_b": jnp.ones((2, 3))}
      >>> updates, state = tx.update(grads, state, params)
      >>> params = optax.apply_updates(params, updates)
    """
    check_hyperparams("scaled_sgd", learning_rate=learning_rate, delta=delta,
                      weight_decay=weight_decay, cross_term_ratio=cross_term_ratio)
    return with_state_check("scaled_sgd", optax.chain(
        scale_by_riemannian_precond(delta, keys=keys),
        optax.add_decayed_weights(weight_decay),
        optax.scale_by_learning_rate(learning_rate),
        maybe_clip_cross_term(cross_term_ratio, keys),
    ), keys)


def scale_by_scaled_adam(
    b1: float = 0.9,
    b2: float = 0.999,
    eps: float = 1e-8,
    delta: float = 1e-6,
    *,
    normalize_grams: bool = True,
    relative_delta: float = ROBUST_RELATIVE_DELTA,
    mu_dtype: Any = None,
    keys: PairKeys = DEFAULT_KEYS,
) -> optax.GradientTransformation:
    """Scaled Adam direction: precondition each raw gradient, then Adam as ``optax.adam``.

    Per step (Zhang & Pilanci, Algorithm 1, with ``normalize_grams=False``)::

        ĝa = ∇a (b bᵀ + δI)⁻¹,  ĝb = (aᵀa + δI)⁻¹ ∇b      (pre-step factors)
        m ← b1 m + (1 − b1) ĝ,   v ← b2 v + (1 − b2) ĝ²
        u = m̂ / (√v̂ + eps),      m̂ = m / (1 − b1ᵗ),  v̂ = v / (1 − b2ᵗ)

    Updates keep the gradients' dtype (``optax.scale_by_adam`` alone promotes bf16 to float32).

    The paper finds preconditioning every gradient better than preconditioning Adam's output
    (its Theorem 4.1 analyses the latter); this is the former, its practical method.

    By default (``normalize_grams=True``) ``ĝa`` and ``ĝb`` are multiplied by the mean
    eigenvalues ``s_b = tr(b bᵀ)/r + δ`` and ``s_a = tr(aᵀa)/r + δ`` of the Grams they invert:
    the same direction with the ``1/‖b‖²`` size of the preconditioner removed, so that the
    start from ``b = 0`` under a warm-up does not fill ``v`` (see the module docstring).

    Args:
      b1: first-moment decay in ``[0, 1)``, default 0.9 (the paper's and ``optax.adam``'s).
      b2: second-moment decay in ``[0, 1)``, default 0.999.
      eps: ``≥ 0``, added to ``√v̂`` (outside the root, as ``optax.adam``), default 1e-8.
      delta: Gram regulariser ``≥ 0``, default 1e-6 (paper's GPT-2 setting).
      normalize_grams: normalise each Gram by its mean eigenvalue (default True, the robust
        start); False is the paper's exact rule.
      relative_delta: with ``normalize_grams``, the Gram regulariser relative to its mean
        eigenvalue, default 1e-2 (see :func:`relative_gram_delta`); ignored by the paper's rule.
      mu_dtype: dtype of the first moment (``optax.scale_by_adam``'s).
      keys: mapping keys of the factors in the tree.
    """
    check_hyperparams("scale_by_scaled_adam", b1=b1, b2=b2, eps=eps, delta=delta,
                      normalize_grams=normalize_grams, relative_delta=relative_delta)
    return with_state_check("scale_by_scaled_adam", keep_update_dtypes(
        optax.chain(
            scale_by_riemannian_precond(delta, normalize_grams=normalize_grams,
                                        relative_delta=relative_delta, keys=keys),
            optax.scale_by_adam(b1=b1, b2=b2, eps=linalg.adam_eps(eps, jnp.float32),
                                mu_dtype=mu_dtype),
        )
    ), keys)


def scaled_adamw(
    learning_rate: optax.ScalarOrSchedule,
    b1: float = 0.9,
    b2: float = 0.999,
    eps: float = 1e-8,
    weight_decay: float = 0.0,
    delta: float = 1e-6,
    *,
    normalize_grams: bool = True,
    relative_delta: float = ROBUST_RELATIVE_DELTA,
    mu_dtype: Any = None,
    cross_term_ratio: float | None = None,
    keys: PairKeys = DEFAULT_KEYS,
) -> optax.GradientTransformation:
    """Scaled AdamW for LoRA pairs (Zhang & Pilanci, 2024, Algorithm 1).

    :func:`scale_by_scaled_adam`, then decoupled weight decay on the parameters, then
    ``−learning_rate``. With ``normalize_grams=False`` it is the paper's Algorithm 1 with
    ``scale = 1``; the default normalises the Grams (robust start, see the module docstring).
    The paper's GPT-2 runs use
    ``weight_decay=0.01`` (the default here is 0.0 as fixed by the library's design, so that the
    zero-``b`` start is not pulled towards zero before it has moved).

    Args:
      learning_rate: a float ``≥ 0`` or an ``optax.Schedule``.
      b1, b2, eps: Adam hyperparameters, as ``optax.adamw`` (``b1, b2 ∈ [0, 1)``, ``eps ≥ 0``).
      weight_decay: decoupled weight decay coefficient ``≥ 0``.
      delta: Gram regulariser ``≥ 0`` (see :func:`scale_by_riemannian_precond`).
      normalize_grams: default True (robust start); False gives the paper's exact rule.
      relative_delta: with ``normalize_grams``, the Gram regulariser relative to its mean
        eigenvalue, default 1e-2 (see :func:`relative_gram_delta`).
      mu_dtype: dtype of the first moment.
      cross_term_ratio: ``ρ > 0`` of :func:`~lowrank_optax.clip_cross_term`, applied to the
        step after the learning rate, or ``None`` (default, the method's own step): no hard
        start of the test suite needs it here, and it costs two 2r×2r Grams per pair.
      keys: mapping keys of the factors in the tree.
    """
    check_hyperparams("scaled_adamw", learning_rate=learning_rate, b1=b1, b2=b2, eps=eps,
                      weight_decay=weight_decay, delta=delta, normalize_grams=normalize_grams,
                      relative_delta=relative_delta, cross_term_ratio=cross_term_ratio)
    return with_state_check("scaled_adamw", optax.chain(
        scale_by_scaled_adam(b1, b2, eps, delta, normalize_grams=normalize_grams,
                             relative_delta=relative_delta, mu_dtype=mu_dtype, keys=keys),
        optax.add_decayed_weights(weight_decay),
        optax.scale_by_learning_rate(learning_rate),
        maybe_clip_cross_term(cross_term_ratio, keys),
    ), keys)
