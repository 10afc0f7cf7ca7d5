"""LoRA-Pro: equivalent factor gradients whose product update is the tangent projection of G.

Wang et al., "LoRA-Pro: Are Low-Rank Adapters Properly Optimized?", ICLR 2025; eq. (3) of the
AltLoRA paper and §2.2 of the SoLoRA paper restate it. Paper notation (``W = W0 + s·B A``):

    gᴬ = (1/s²)(BᵀB)⁻¹ ∇A + X A
    gᴮ = (1/s²)[I − B(BᵀB)⁻¹Bᵀ] ∇B (AAᵀ)⁻¹ − B X
    BᵀB X + X AAᵀ = −(1/s²)(BᵀB)⁻¹ ∇A Aᵀ          (X minimising ‖gᴬ − ∇A‖² + ‖gᴮ − ∇B‖²)

so that ``s(B gᴬ + gᴮ A) = P_T(G) = P_B G + G P_A − P_B G P_A`` whatever ``X`` is; ``X`` only
decides how the step is split between the factors. Library orientation (``a = Aᵀ``,
``b = Bᵀ``, ``Y = Xᵀ``, ``P_b = bᵀ(b bᵀ)⁻¹ b``)::

    u_a = ∇a (b bᵀ)⁻¹ / s² + a Y
    u_b = (aᵀa)⁻¹ ∇b (I − P_b) / s² − Y b
    aᵀa Y + Y b bᵀ = −aᵀ ∇a (b bᵀ)⁻¹ / s²

Inverses are ``(Gram + δI)⁻¹`` Cholesky solves (the official code uses ``pinv(Gram + 1e-8 I)``);
the Sylvester equation is solved in the eigenbases of the two Grams
(:func:`lowrank_optax.linalg.solve_sylvester_spd`), which is finite at ``b = 0`` (there the
right-hand side and hence ``Y`` vanish).
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
    abstract_safe_init,
    init_pairs,
    keep_update_dtypes,
    map_pairs,
    pair_map_transformation,
)
from lowrank_optax.riemannian import gram_scale
from lowrank_optax.validation import check_hyperparams, with_state_check

__all__ = [
    "ScaleByLoRAProAdamState",
    "equivalent_factor_grads",
    "lora_pro_adamw",
    "lora_pro_sgd",
    "scale_by_lora_pro",
    "scale_by_lora_pro_adam",
]


def equivalent_factor_grads(
    a: jax.Array,
    b: jax.Array,
    grad_a: jax.Array,
    grad_b: jax.Array,
    scale: float | jax.Array = 1.0,
    delta: float | jax.Array = 1e-8,
    eigenvalue_floor: float | jax.Array = 0.0,
) -> LoRAPair:
    """LoRA-Pro's equivalent gradients ``(u_a, u_b)`` of one pair (library orientation).

    ``grad_a = s·G bᵀ`` and ``grad_b = s·aᵀ G`` are the factor gradients of a loss whose full
    gradient is ``G``; then ``s(u_a b + a u_b) = P_T(G)`` and ``Y = Xᵀ`` solves LoRA-Pro's
    Sylvester equation (see the module docstring).

    ``eigenvalue_floor > 0``: every Gram (``+ δ'I``) is inverted, and enters the Sylvester
    equation, with its eigenvalues raised to at least ``eigenvalue_floor·tr/r``
    (:func:`~lowrank_optax.linalg.floor_eigenvalues`); the identity above then holds for pairs
    whose Grams are above the floor. The literal ``0`` (default) is the paper's map, by
    Cholesky solves.
    """
    gram_a, gram_b = linalg.gram_a(a), linalg.gram_b(b)
    eig_a, eig_b = (linalg.floored_eigenpairs(linalg.regularize(gram, delta), eigenvalue_floor)
                    for gram in (gram_a, gram_b))
    pre_a = linalg.solve_floored_right(grad_a, gram_b, eig_b, delta) / scale**2
    pre_b = linalg.solve_floored(gram_a, eig_a, grad_b, delta) / scale**2
    y = linalg.solve_sylvester_spd(gram_a, gram_b, -(a.T @ pre_a), eig_a, eig_b)
    pre_b_off_rows = pre_b - linalg.solve_floored_right(pre_b @ b.T, gram_b, eig_b, delta) @ b
    return LoRAPair(pre_a + a @ y, pre_b_off_rows - y @ b)


def scale_by_lora_pro(
    scale: float = 1.0,
    delta: float = 1e-8,
    *,
    normalize_grams: bool = False,
    keys: PairKeys = DEFAULT_KEYS,
) -> optax.GradientTransformation:
    """LoRA-Pro equivalent gradients, ``X`` from the Sylvester equation (the SGD direction).

    Replaces each pair's gradient by :func:`equivalent_factor_grads`. The first-order change of
    ``W = s·a b`` under ``−lr·u`` is ``−lr·P_T(G)``, the orthogonal projection of the full
    gradient onto the tangent space of rank-r matrices at ``W``, independent of ``s``.

    Args:
      scale: the LoRA scale ``s > 0`` (``delta_W = s·a @ b``); default 1.0. The official code
        hard-codes ``s = 2`` for its ``alpha=16, r=8`` runs; pass the model's ``alpha / r``.
      delta: ``δ ≥ 0`` regularising both r×r Grams; default 1e-8 (the official code's value). It
        keeps ``b = 0`` finite: there ``∇a = 0`` and the Sylvester right-hand side vanish.
      normalize_grams: multiply ``u_a`` by ``s_b = tr(b bᵀ)/r + δ`` and ``u_b`` by
        ``s_a = tr(aᵀa)/r + δ``, the mean eigenvalues of the Grams they invert. Default False
        (the paper's rule); meant for an Adam that follows (``lora_pro_adamw(full_state=False)``).
      keys: mapping keys of the factors in the tree.

    Returns:
      A stateless ``optax.GradientTransformation`` whose ``update`` needs ``params``.
    """
    check_hyperparams("scale_by_lora_pro", scale=scale, delta=delta,
                      normalize_grams=normalize_grams)

    def fn(g, p):
        u = equivalent_factor_grads(p.a, p.b, g.a, g.b, scale, delta)
        if not normalize_grams:
            return u
        return LoRAPair(u.a * gram_scale(linalg.gram_b(p.b), delta),
                        u.b * gram_scale(linalg.gram_a(p.a), delta))

    return with_state_check("scale_by_lora_pro",
                            pair_map_transformation("scale_by_lora_pro", fn, keys), keys)


class ScaleByLoRAProAdamState(NamedTuple):
    """State of :func:`scale_by_lora_pro_adam`: Adam moments of the m×n equivalent gradient.

    Attributes:
      count: number of updates (int32).
      mu: per pair, the first moment of ``P_T(G)``, shape ``(m, n)``.
      nu: per pair, the second moment of ``P_T(G)``, shape ``(m, n)``.
    """

    count: jax.Array
    mu: Any
    nu: Any


def scale_by_lora_pro_adam(
    b1: float = 0.9,
    b2: float = 0.999,
    eps: float = 1e-8,
    *,
    scale: float = 1.0,
    delta: float = 1e-8,
    eigenvalue_floor: float = 1e-2,
    keys: PairKeys = DEFAULT_KEYS,
) -> optax.GradientTransformation:
    """LoRA-Pro with Adam on the full m×n equivalent gradient (the published method).

    Per pair and step (official DeepSpeed code, ``lorapro_full_adjustment``)::

        Ĝ = P_T(G)                      recovered exactly from the factor gradients
        m ← b1 m + (1 − b1) Ĝ,  v ← b2 v + (1 − b2) Ĝ⊙Ĝ
        g = m̂ / (√v̂ + eps)              bias-corrected as optax.adam
        u = equivalent_factor_grads(a, b, s·g bᵀ, s·aᵀg)   (g treated as the full gradient)

    so ``W`` moves by ``−lr·P_T(g)`` at first order (where no Gram is below the eigenvalue
    floor). **Memory: two m×n arrays per pair**, as
    much as full fine-tuning with Adam (the cost AltLoRA criticises); :func:`lora_pro_adamw`
    with ``full_state=False`` is the factor-space alternative.

    Decision: standard bias correction with the step index starting at 1; the official code
    increments its step before the first use and so corrects the first step with index 2.

    Args:
      b1, b2, eps: Adam hyperparameters (``b1, b2 ∈ [0, 1)``, ``eps ≥ 0``; official values
        0.9, 0.999, 1e-8).
      scale: LoRA scale ``s > 0``, default 1.0.
      delta: Gram regulariser ``≥ 0``, default 1e-8.
      eigenvalue_floor: the Grams the map back to factors inverts have their eigenvalues
        raised to at least ``eigenvalue_floor·tr/r`` (``∈ [0, 1]``), default 1e-2 (not in the
        paper). ``g`` is Adam's normalised output, of unit size whatever the residual; the map
        divides its part along a near-null direction of a Gram (singular value ``σ`` of a
        factor of rank < r, or of a fit that needs less rank) by ``σ``, and the other factor
        jumps (from ``a`` of rank r − 2 and ``b`` of rank 1 in float64: 1.3e3 times the start
        loss after 100 steps, float32 survives by its rounding floor). The floor bounds that
        to ``1/√floor`` times the unit-scale step and leaves Grams above it exact. ``0`` is the
        paper's map (Cholesky solves).
      keys: mapping keys of the factors in the tree.
    """
    check_hyperparams("scale_by_lora_pro_adam", b1=b1, b2=b2, eps=eps, scale=scale, delta=delta,
                      eigenvalue_floor=eigenvalue_floor)

    def full_zeros(p: LoRAPair) -> jax.Array:
        return jnp.zeros((p.a.shape[0], p.b.shape[1]), p.a.dtype)

    def init_fn(params):
        return ScaleByLoRAProAdamState(
            count=jnp.zeros([], jnp.int32),
            mu=init_pairs(full_zeros, params, keys),
            nu=init_pairs(full_zeros, params, keys),
        )

    def update_fn(updates, state, params=None):
        count = optax.safe_increment(state.count)

        def fn(g, p, mu, nu):
            tangent = linalg.tangent_from_factor_grads(p.a, p.b, g.a, g.b, scale, delta)
            beta1, beta2 = (jnp.asarray(x, tangent.dtype) for x in (b1, b2))
            t = count.astype(tangent.dtype)
            mu = beta1 * mu + (1 - beta1) * tangent
            nu = beta2 * nu + (1 - beta2) * jnp.square(tangent)
            direction = (mu / (1 - beta1**t)) / (
                jnp.sqrt(nu / (1 - beta2**t)) + linalg.adam_eps(eps, nu.dtype))
            pseudo_grad_a = scale * direction @ p.b.T
            pseudo_grad_b = scale * p.a.T @ direction
            u = equivalent_factor_grads(p.a, p.b, pseudo_grad_a, pseudo_grad_b, scale, delta,
                                        eigenvalue_floor)
            return u, mu, nu

        new_updates, mu, nu = map_pairs(fn, updates, params, state.mu, state.nu, keys=keys)
        return new_updates, ScaleByLoRAProAdamState(count=count, mu=mu, nu=nu)

    return with_state_check("scale_by_lora_pro_adam",
                            optax.GradientTransformation(abstract_safe_init(init_fn), update_fn),
                            keys)


def lora_pro_sgd(
    learning_rate: optax.ScalarOrSchedule,
    weight_decay: float = 0.0,
    *,
    scale: float = 1.0,
    delta: float = 1e-8,
    cross_term_ratio: float | None = None,
    keys: PairKeys = DEFAULT_KEYS,
) -> optax.GradientTransformation:
    """LoRA-Pro with SGD: ``a ← a − lr·u_a``, ``b ← b − lr·u_b`` (equivalent gradients).

    The paper's "LoRA-Pro SGD" (not in the released code, whose SGD always follows Adam on the
    full gradient). See :func:`scale_by_lora_pro`.

    Args:
      learning_rate: a float ``≥ 0`` or an ``optax.Schedule``.
      weight_decay: decoupled weight decay ``≥ 0`` on both factors, default 0 (the official
        scripts').
      scale: LoRA scale ``s > 0``, default 1.0.
      delta: Gram regulariser ``≥ 0``, default 1e-8.
      cross_term_ratio: ``ρ > 0`` of :func:`~lowrank_optax.clip_cross_term`, applied to the
        step after the learning rate, or ``None`` (default, the method's own step): no hard
        start of the test suite needs it here, and it costs two 2r×2r Grams per pair.
      keys: mapping keys of the factors in the tree.
    """
    check_hyperparams("lora_pro_sgd", learning_rate=learning_rate, weight_decay=weight_decay,
                      scale=scale, delta=delta, cross_term_ratio=cross_term_ratio)
    return with_state_check("lora_pro_sgd", optax.chain(
        scale_by_lora_pro(scale, delta, keys=keys),
        optax.add_decayed_weights(weight_decay),
        optax.scale_by_learning_rate(learning_rate),
        maybe_clip_cross_term(cross_term_ratio, keys),
    ), keys)


def lora_pro_adamw(
    learning_rate: optax.ScalarOrSchedule,
    b1: float = 0.9,
    b2: float = 0.999,
    eps: float = 1e-8,
    weight_decay: float = 0.0,
    *,
    scale: float = 1.0,
    delta: float = 1e-8,
    full_state: bool = True,
    eigenvalue_floor: float = 1e-2,
    normalize_grams: bool = True,
    cross_term_ratio: float | None = None,
    keys: PairKeys = DEFAULT_KEYS,
) -> optax.GradientTransformation:
    """LoRA-Pro AdamW.

    ``full_state=True`` (default) is the published method: Adam moments of the m×n equivalent
    gradient ``P_T(G)``, the Adam output turned back into factor updates by the equivalent-
    gradient map (:func:`scale_by_lora_pro_adam`); memory ``2·m·n`` per pair.

    ``full_state=False`` is the earlier public ``LoRAProAdamW`` (``peta/optim.py``): Adam on the
    factor-shaped equivalent gradients ``(u_a, u_b)``, memory ``2·(m + n)·r`` per pair. It is a
    different algorithm: elementwise Adam on factors is not transformation invariant. Its
    robust start (``normalize_grams=True``, the default) multiplies ``u_a`` by the mean eigenvalue
    ``s_b = tr(b bᵀ)/r + δ`` of ``b bᵀ`` and ``u_b`` by ``s_a`` before Adam: ``u_a`` carries the
    ``1/‖b‖²`` size of ``(b bᵀ)⁻¹``, which from ``b = 0`` under a warm-up fills Adam's ``v`` with
    a transient and freezes ``a`` (issue-12 toy: relative loss 0.39, see
    ``docs/methods/lora_pro.md``); Adam removes constant factors, so nothing else changes.
    ``normalize_grams=False`` is ``LoRAProAdamW``'s rule.

    Weight decay is decoupled (``optax.add_decayed_weights`` on both factors).

    Args:
      learning_rate: a float ``≥ 0`` or an ``optax.Schedule``.
      b1, b2, eps: Adam hyperparameters (``b1, b2 ∈ [0, 1)``, ``eps ≥ 0``; defaults as
        ``optax.adamw`` and the official code).
      weight_decay: decoupled weight decay ``≥ 0``, default 0 (the official scripts').
      scale: LoRA scale ``s > 0``, default 1.0.
      delta: Gram regulariser ``≥ 0``, default 1e-8.
      full_state: m×n moments (published method) or factor-space moments (see above).
      eigenvalue_floor: with ``full_state=True``, the floor of the Grams' eigenvalues in the
        map from Adam's output back to factors (``∈ [0, 1]``, default 1e-2;
        :func:`scale_by_lora_pro_adam`); 0 is the paper's map. Not used with
        ``full_state=False``, whose moments are taken after the map.
      normalize_grams: the factor-space robust start (above), default True; not used with
        ``full_state=True`` (its moments live in ``m×n`` space, where the factors' scale does
        not enter).
      cross_term_ratio: ``ρ > 0`` of :func:`~lowrank_optax.clip_cross_term`, applied to the
        step after the learning rate, or ``None`` (default, the method's own step): no hard
        start of the test suite needs it here, and it costs two 2r×2r Grams per pair.
      keys: mapping keys of the factors in the tree.
    """
    check_hyperparams("lora_pro_adamw", learning_rate=learning_rate, b1=b1, b2=b2, eps=eps,
                      weight_decay=weight_decay, scale=scale, delta=delta, full_state=full_state,
                      eigenvalue_floor=eigenvalue_floor, normalize_grams=normalize_grams,
                      cross_term_ratio=cross_term_ratio)
    if full_state:
        direction = scale_by_lora_pro_adam(b1, b2, eps, scale=scale, delta=delta,
                                           eigenvalue_floor=eigenvalue_floor, keys=keys)
    else:
        direction = keep_update_dtypes(
            optax.chain(
                scale_by_lora_pro(scale, delta, normalize_grams=normalize_grams, keys=keys),
                optax.scale_by_adam(b1=b1, b2=b2, eps=linalg.adam_eps(eps, jnp.float32)),
            )
        )
    return with_state_check("lora_pro_adamw", optax.chain(
        direction,
        optax.add_decayed_weights(weight_decay),
        optax.scale_by_learning_rate(learning_rate),
        maybe_clip_cross_term(cross_term_ratio, keys),
    ), keys)
