"""SoLoRA: second-order low-rank adaptation with an adaptive row/column metric.

SoLoRA looks for the LoRA update whose induced change of ``W`` best approximates the
Newton-like step ``H⁻¹G`` under the metric ``⟨Y, Z⟩_H = ⟨Lr^{½} Y Lc^{½}, Z⟩`` built from
exponential moving averages of the row and column sums of ``G⊙G`` (``G = ∂L/∂W``):

    l ← β l + (1 − β)·rowsum(G⊙G),   Lr = diag(l / √‖l‖₁ + eps)        (m×m)
    c ← β c + (1 − β)·colsum(G⊙G),   Lc = diag(c / √‖c‖₁ + eps)        (n×n)

In library orientation (``delta_W = scale·a b``, ``a: m×r``, ``b: r×n``), with
``P = Lr^{½}``, ``Q = Lc^{½}``, ``Ka = aᵀ P a + δI``, ``Kb = b Q bᵀ + δI``, ``Ga = G bᵀ`` and
``Gb = aᵀ G`` (the factor gradients divided by ``scale``), Theorems 3.1–3.2 give

    Δa = P⁻¹ Ga Kb⁻¹ − ½ a Ka⁻¹ aᵀ Ga Kb⁻¹
    Δb = Ka⁻¹ Gb Q⁻¹ − ½ Ka⁻¹ Gb bᵀ Kb⁻¹ b

so that ``Δa b + a Δb`` is the ``H``-orthogonal projection of ``H⁻¹G`` onto the tangent space
at ``a b`` (Theorem 3.1) and the balancing matrix ``X = −½ Ka⁻¹ aᵀ G bᵀ Kb⁻¹`` minimises
``‖Δa b − a Δb‖_H`` (Theorem 3.2). The returned direction is ``(Δa, Δb) / scale`` so that the
induced update of ``scale·a b`` does not depend on ``scale``.

Mapping to the paper (``W_p = B A`` with ``B: out×r`` zero-initialised, ``A: r×in``):
``B = bᵀ``, ``A = aᵀ``, ``G_p = Gᵀ``; the paper's ``L`` (over output features) is our ``Lc``,
its ``R`` is our ``Lr``; the formulas are symmetric under this transposition, the paper's
``(Δ_B, Δ_A)`` are our ``(Δbᵀ, Δaᵀ)``.

Where ``rowsum(G⊙G)`` and ``colsum(G⊙G)`` come from:

* **exact** (reproduces the paper): the pair carries a statistics probe (``lora_stats``, see
  :mod:`lowrank_optax.grad_stats`) whose gradient holds the statistics of the true ``G``,
  reduced in the layer's backward pass. Used whenever the gradient pair has ``stats``.
* **factor-only** fallback: without a probe the factor gradients determine only the tangent
  projection ``P_T(G)``; the statistics of ``P_T(G)`` are used instead. ``P_T(G)`` has the
  low-rank form ``[a, D] [C; b]`` (``C = (aᵀa+δI)⁻¹ Gb``,
  ``D = (Ga − a C bᵀ)(b bᵀ+δI)⁻¹``), so its row/column sums of squares cost
  ``O((m + n) r²)`` and no ``m×n`` array is formed. It is *not* the paper's metric: ``G``'s
  energy outside the tangent space is missing from ``l`` and ``c``.

Reference: "LoRA meets second-order optimization: towards optimal low-rank updates" (SoLoRA,
ICLR 2026 submission), Section 3, Theorems 3.1–3.2, Algorithms 1–2.
"""

from __future__ import annotations

from typing import Any, NamedTuple

import jax
import jax.numpy as jnp
import optax

from lowrank_optax import linalg
from lowrank_optax.cross_term import maybe_clip_cross_term
from lowrank_optax.grad_stats import probe_fields
from lowrank_optax.pairs import (
    DEFAULT_KEYS,
    LoRAPair,
    PairKeys,
    abstract_safe_init,
    init_pairs,
    map_pairs,
)
from lowrank_optax.validation import check_choice, check_hyperparams, with_state_check

__all__ = [
    "FactorMoments",
    "SoLoRAPairState",
    "SoLoRAState",
    "metric_sqrt",
    "scale_by_solora",
    "solora_adamw",
    "solora_direction",
    "solora_sgd",
    "transport",
]

_MOMENTS = ("full", "factor")


class SoLoRAPairState(NamedTuple):
    """Per-pair state: EMAs of ``rowsum(G⊙G)`` (m,), ``colsum(G⊙G)`` (n,) and the momentum.

    ``mu`` is ``None`` (Algorithm 1), an ``m×n`` moment of ``G`` (``moment="full"``) or a
    :class:`FactorMoments` (``moment="factor"``).
    """

    row: jax.Array
    col: jax.Array
    mu: Any


class SoLoRAState(NamedTuple):
    """State of :func:`scale_by_solora`: step count and a :class:`SoLoRAPairState` per pair."""

    count: jax.Array
    pairs: Any


class FactorMoments(NamedTuple):
    """``moment="factor"``: moments ``ga ≈ M bᵀ`` (m×r), ``gb ≈ aᵀM`` (r×n) of ``M``, the
    moment of ``G``, and the factors ``(a, b)`` they were taken at, for :func:`transport`."""

    ga: jax.Array
    gb: jax.Array
    a: jax.Array
    b: jax.Array


def transport(moments: FactorMoments, p: LoRAPair, delta: float | jax.Array) -> tuple[
        jax.Array, jax.Array]:
    """The factor moments re-expressed at the current factors ``p``.

    ``ga = M b₀ᵀ`` determines the part of ``M`` in the row space of ``b₀`` (the factor it was
    taken at), ``M P_{b₀} = ga (b₀ b₀ᵀ)⁻¹ b₀``, and ``gb = a₀ᵀM`` the part in the column space
    of ``a₀``; at the current ``(a, b)`` these give

        ga ← ga (b₀ b₀ᵀ + δI)⁻¹ b₀ bᵀ,     gb ← aᵀ a₀ (a₀ᵀa₀ + δI)⁻¹ gb

    (the idea of AltLoRA's Theorem 2, moving a moment to the current factors, applied to the
    unpreconditioned factor moments with the Grams of the factors they were taken at). Exact
    when the factors have not moved, GL(r)-equivariant, and zero from zero factors.
    """
    to_b = linalg.solve_spd(linalg.gram_b(moments.b), moments.b @ p.b.T, delta)
    to_a = linalg.solve_spd_right(p.a.T @ moments.a, linalg.gram_a(moments.a), delta)
    return moments.ga @ to_b, to_a @ moments.gb


def metric_sqrt(ema: jax.Array, eps: float | jax.Array) -> jax.Array:
    """Diagonal of ``L^{½}`` with ``L = diag(ema / √‖ema‖₁ + eps)``.

    ``‖ema‖₁`` is guarded by the smallest normal number so that an all-zero EMA gives
    ``L = eps·I`` instead of ``0/0``; non-finite values still propagate.
    """
    norm = jnp.sum(jnp.abs(ema))
    return jnp.sqrt(ema / jnp.sqrt(norm + jnp.finfo(ema.dtype).tiny) + eps)


def solora_direction(
    ga: jax.Array,
    gb: jax.Array,
    p: LoRAPair,
    row_sqrt: jax.Array,
    col_sqrt: jax.Array,
    delta: float | jax.Array,
) -> LoRAPair:
    """SoLoRA's ``(Δa, Δb)`` for one pair (Algorithm 1 lines 5–6 in library orientation).

    Args:
      ga: ``G bᵀ`` (``m×r``), or a moment of it.
      gb: ``aᵀ G`` (``r×n``), or a moment of it.
      p: the parameter pair ``(a, b)``.
      row_sqrt: diagonal of ``P = Lr^{½}`` (``m``).
      col_sqrt: diagonal of ``Q = Lc^{½}`` (``n``).
      delta: ``δ`` added to both r×r weighted Grams.
    """
    a, b = p.a, p.b
    ka = jnp.einsum("mr,m,ms->rs", a, row_sqrt, a)
    kb = jnp.einsum("rn,n,sn->rs", b, col_sqrt, b)
    u = linalg.solve_spd_right(ga, kb, delta)  # Ga Kb⁻¹
    v = linalg.solve_spd(ka, gb, delta)  # Ka⁻¹ Gb
    delta_a = u / row_sqrt[:, None] - 0.5 * a @ linalg.solve_spd(ka, a.T @ u, delta)
    delta_b = v / col_sqrt[None, :] - 0.5 * linalg.solve_spd_right(v @ b.T, kb, delta) @ b
    return LoRAPair(delta_a, delta_b)


def _pair_init(p: LoRAPair, momentum: bool, moment: str) -> SoLoRAPairState:
    (m, _), (_, n) = p.a.shape, p.b.shape
    dtype = p.a.dtype
    mu = None
    if momentum and moment == "full":
        mu = jnp.zeros((m, n), dtype)
    elif momentum:
        mu = FactorMoments(jnp.zeros_like(p.a), jnp.zeros_like(p.b), jnp.zeros_like(p.a),
                           jnp.zeros_like(p.b))
    return SoLoRAPairState(jnp.zeros((m,), dtype), jnp.zeros((n,), dtype), mu)


def scale_by_solora(
    b1: float | jax.Array | None = None,
    b2: float | jax.Array = 0.98,
    eps: float | jax.Array = 1e-8,
    delta: float | jax.Array = 1e-6,
    *,
    scale: float | jax.Array = 1.0,
    moment: str = "full",
    keys: PairKeys = DEFAULT_KEYS,
) -> optax.GradientTransformation:
    """SoLoRA direction: Algorithm 1 (``b1=None``) or Algorithm 2's direction (``b1`` given).

    Per step ``t`` and pair (library notation, pre-step ``a``, ``b``)::

        l ← b2 l + (1−b2) rowsum(G⊙G),   c ← b2 c + (1−b2) colsum(G⊙G)
        Algorithm 1:  u = solora_direction(G bᵀ, aᵀG; l, c) / scale
        Algorithm 2:  M ← b1 M + (1−b1) G
                      u = √(1−b2ᵗ)/(1−b1ᵗ) · solora_direction(M bᵀ, aᵀM; l, c) / scale

    ``G bᵀ = ∇a / scale`` and ``aᵀG = ∇b / scale`` come from the factor gradients. The source
    of ``rowsum``/``colsum`` (and of ``G`` in ``M``) is the pair's statistics probe when the
    gradient pair carries one (exact, the paper's) and ``P_T(G)`` otherwise (factor-only); see
    the module docstring. Algorithm 1 has no bias correction (as published); in Algorithm 2
    ``√(1−b2ᵗ)`` undoes the start-up bias of the normalised metric and ``1/(1−b1ᵗ)`` that of
    the momentum.

    Moments (Algorithm 2):

    * ``moment="full"`` keeps the paper's ``m×n`` moment ``M`` of ``G``. With a probe created
      with ``full_gradient=True`` the moment is of the true ``G``: this reproduces Algorithm 2
      exactly. Without the ``"grad"`` entry it is a moment of ``P_T(G)``, which agrees with the
      paper's at the current step (``P_T(G) bᵀ = G bᵀ``, ``aᵀ P_T(G) = aᵀG``) but not for past
      gradients whose energy lay outside the current tangent space.
    * ``moment="factor"`` keeps moments of ``G bᵀ`` and ``aᵀG`` and the factors they were
      taken at (``2(m+n) r`` memory). Before each EMA step the moments are re-expressed at the
      current factors (:func:`transport`). They equal the paper's ``M bᵀ``, ``aᵀM`` when the
      factors do not move within the averaging window, i.e. to first order in the learning
      rate. Without the transport (the moments of earlier steps used as they are, in earlier
      factors' bases) the current ``Ka⁻¹``, ``Kb⁻¹`` amplified the mismatch: from rank-deficient
      factors or a rank-1 gradient the loss diverged (e.g. 11.6 → 1e6 from ``b`` of rank 1, in
      ``tests/test_numerics.py``), where ``moment="full"`` converges; with it all four hard
      starts converge.

    Zero-initialised ``b``: ``Kb = b Q bᵀ`` vanishes, and ``δI`` keeps ``Kb + δI`` invertible.
    Every term that multiplies ``Kb⁻¹`` carries a factor ``b`` (``G bᵀ`` and ``b`` itself), so
    the first step is exactly ``Δa = 0`` and ``Δb = Ka⁻¹ aᵀG Q⁻¹`` (the ``δ``-free value); while
    ``b`` is tiny ``‖Kb⁻¹‖ ≤ 1/δ`` bounds the ``a`` step. The metric's ``eps`` keeps ``P⁻¹``,
    ``Q⁻¹`` finite for rows/columns without gradient energy.

    GL(r): for ``δ = 0`` every quantity is covariant under ``(a, b) → (a R, R⁻¹ b)``
    (``Ka → RᵀKaR``, ``Kb → R⁻¹KbR⁻ᵀ``, ``G bᵀ → G bᵀR⁻ᵀ``; the metric depends on ``G`` or
    ``P_T(G)`` only, both invariant), giving ``Δa → Δa R``, ``Δb → R⁻¹Δb``. Hence the product
    after any number of steps is *exactly* invariant, in both statistics modes and for both
    moments (the factor moments transform like the gradients, ``R`` being fixed), also with
    decoupled weight decay. ``δ > 0`` breaks it by ``O(δ / σ_min(K))``.

    Args:
      b1: momentum decay (the paper's ``β3``) in ``[0, 1)``; ``None`` gives Algorithm 1 (no
        momentum, no bias correction). Default ``None``; the paper's Algorithm 2 uses 0.9.
      b2: decay of the metric EMAs (the paper's ``β1 = β2``) in ``[0, 1)``. Default 0.98, the
        paper's GPT-2 value for both algorithms (Table 4).
      eps: ``≥ 0``, added to the normalised diagonals of ``Lr``, ``Lc`` (units of ``|G|``, like
        Adam's ``eps``); the paper has none. Default 1e-8.
      delta: ``δ ≥ 0`` added to the weighted r×r Grams ``Ka``, ``Kb``; the paper inverts them
        unregularised, which fails at its own ``B = 0`` initialisation. Default 1e-6, as the
        library's scaled GD.
      scale: the LoRA scale (``alpha / r > 0``) so that the induced update of ``scale·a b`` is
        independent of it. Default 1.0 (the paper's convention).
      moment: ``"full"`` (paper, ``m×n``) or ``"factor"`` (``2(m+n) r``, transported); only
        used with ``b1``.
      keys: mapping keys of the factors in the tree.

    Returns:
      An ``optax.GradientTransformation`` with :class:`SoLoRAState`; needs ``params``.
    """
    check_hyperparams("scale_by_solora", b1=b1, b2=b2, eps=eps, delta=delta, scale=scale)
    check_choice("scale_by_solora", "moment", moment, _MOMENTS)
    momentum = b1 is not None

    def init_fn(params: optax.Params) -> SoLoRAState:
        pairs = init_pairs(lambda p: _pair_init(p, momentum, moment), params, keys)
        return SoLoRAState(jnp.zeros([], jnp.int32), pairs)

    def pair_update(g: LoRAPair, p: LoRAPair, s: SoLoRAPairState, count: jax.Array):
        ga, gb = g.a / scale, g.b / scale
        u, v = linalg.tangent_factors(p.a, p.b, ga, gb, delta)
        if g.stats is None:
            row_stat, col_stat = linalg.square_row_sums(u, v), linalg.square_column_sums(u, v)
            full_g = None
        else:
            row_stat, col_stat, full_g = probe_fields(g.stats)
        row = b2 * s.row + (1 - b2) * row_stat
        col = b2 * s.col + (1 - b2) * col_stat
        row_sqrt, col_sqrt = metric_sqrt(row, eps), metric_sqrt(col, eps)
        if not momentum:
            d = solora_direction(ga, gb, p, row_sqrt, col_sqrt, delta)
            return LoRAPair(d.a / scale, d.b / scale), SoLoRAPairState(row, col, None)
        if moment == "full":
            g_full = u @ v if full_g is None else full_g
            mu = b1 * s.mu + (1 - b1) * g_full
            mu_a, mu_b = mu @ p.b.T, p.a.T @ mu
        else:
            old_a, old_b = transport(s.mu, p, delta)
            mu = FactorMoments(b1 * old_a + (1 - b1) * ga, b1 * old_b + (1 - b1) * gb, p.a, p.b)
            mu_a, mu_b = mu.ga, mu.gb
        t = count.astype(row.dtype)
        bias = jnp.sqrt(1 - b2**t) / (1 - b1**t)
        d = solora_direction(mu_a, mu_b, p, row_sqrt, col_sqrt, delta)
        factor = bias / scale
        return LoRAPair(factor * d.a, factor * d.b), SoLoRAPairState(row, col, mu)

    def update_fn(updates, state, params=None):
        count = optax.safe_increment(state.count)
        new_updates, pairs = map_pairs(
            lambda g, p, s: pair_update(g, p, s, count), updates, params, state.pairs, keys=keys
        )
        return new_updates, SoLoRAState(count, pairs)

    return with_state_check("scale_by_solora",
                            optax.GradientTransformation(abstract_safe_init(init_fn), update_fn),
                            keys)


def solora_sgd(
    learning_rate: optax.ScalarOrSchedule,
    b2: float = 0.98,
    eps: float = 1e-8,
    weight_decay: float = 0.0,
    delta: float = 1e-6,
    *,
    scale: float = 1.0,
    cross_term_ratio: float | None = 1.0,
    keys: PairKeys = DEFAULT_KEYS,
) -> optax.GradientTransformation:
    """SoLoRA with SGD (Algorithm 1): ``a ← a − lr·(Δa + wd·a)``, ``b ← b − lr·(Δb + wd·b)``.

    See :func:`scale_by_solora` (``b1=None``) for the direction and the statistics modes.

    Args:
      learning_rate: a float ``≥ 0`` or an ``optax.Schedule``.
      b2: metric EMA decay (paper's ``β1 = β2``) in ``[0, 1)``, default 0.98 (paper, Table 4).
      eps: metric floor ``≥ 0``, default 1e-8.
      weight_decay: decoupled weight decay ``≥ 0``, default 0.0 (Algorithm 1 has none).
      delta: r×r Gram regulariser ``≥ 0``, default 1e-6.
      scale: LoRA scale ``alpha / r > 0``, default 1.0.
      cross_term_ratio: ``ρ > 0`` of :func:`~lowrank_optax.clip_cross_term`, applied to the
        step after the learning rate, or ``None`` for the method's own step. Default 1.0:
        from ``a`` of rank r − 2 and ``b`` of rank 1 the step's cross term ``Δa Δb`` took
        the loss from 14.6 to 250 (lr 0.01); with it the run converges.
      keys: mapping keys of the factors in the tree.
    """
    check_hyperparams("solora_sgd", learning_rate=learning_rate, b2=b2, eps=eps,
                      weight_decay=weight_decay, delta=delta, scale=scale,
                      cross_term_ratio=cross_term_ratio)
    return with_state_check("solora_sgd", optax.chain(
        scale_by_solora(None, b2, eps, delta, scale=scale, keys=keys),
        optax.add_decayed_weights(weight_decay),
        optax.scale_by_learning_rate(learning_rate),
        maybe_clip_cross_term(cross_term_ratio, keys),
    ), keys)


def solora_adamw(
    learning_rate: optax.ScalarOrSchedule,
    b1: float = 0.9,
    b2: float = 0.98,
    eps: float = 1e-8,
    weight_decay: float = 0.0,
    delta: float = 1e-6,
    *,
    scale: float = 1.0,
    moment: str = "full",
    cross_term_ratio: float | None = None,
    keys: PairKeys = DEFAULT_KEYS,
) -> optax.GradientTransformation:
    """SoLoRA with momentum / AdamW (Algorithm 2).

    ``a ← a − lr·(√(1−b2ᵗ)/(1−b1ᵗ)·Δa(M) + wd·a)`` and likewise for ``b``. The listing's line 8
    writes ``B_{t+1} = (1 − λη B_t) − …``; it is read as decoupled weight decay
    ``(1 − λη) B_t − …`` (``optax.add_decayed_weights`` before the learning rate), the only
    reading that is dimensionally consistent and matches "AdamW".

    Args:
      learning_rate: a float ``≥ 0`` or an ``optax.Schedule``.
      b1: momentum decay (paper's ``β3``) in ``[0, 1)``, default 0.9 (paper, Table 4).
      b2: metric EMA decay (paper's ``β1 = β2``) in ``[0, 1)``, default 0.98 (paper, Table 4).
      eps: metric floor ``≥ 0``, default 1e-8.
      weight_decay: decoupled weight decay ``λ ≥ 0``; default 0.0 (the paper's GPT-2 runs use 0.01).
      delta: r×r Gram regulariser ``≥ 0``, default 1e-6.
      scale: LoRA scale ``alpha / r > 0``, default 1.0.
      moment: ``"full"`` (the paper's ``m×n`` moment; exact with a ``full_gradient`` probe) or
        ``"factor"`` (memory-light, first-order agreement); see :func:`scale_by_solora`.
      cross_term_ratio: ``ρ > 0`` of :func:`~lowrank_optax.clip_cross_term`, applied to the
        step after the learning rate, or ``None`` (default, the method's own step): no hard
        start of the test suite needs it here, and it costs two 2r×2r Grams per pair.
      keys: mapping keys of the factors in the tree.
    """
    check_hyperparams("solora_adamw", learning_rate=learning_rate, b1=b1, b2=b2, eps=eps,
                      weight_decay=weight_decay, delta=delta, scale=scale,
                      cross_term_ratio=cross_term_ratio)
    check_choice("solora_adamw", "moment", moment, _MOMENTS)
    return with_state_check("solora_adamw", optax.chain(
        scale_by_solora(b1, b2, eps, delta, scale=scale, moment=moment, keys=keys),
        optax.add_decayed_weights(weight_decay),
        optax.scale_by_learning_rate(learning_rate),
        maybe_clip_cross_term(cross_term_ratio, keys),
    ), keys)
