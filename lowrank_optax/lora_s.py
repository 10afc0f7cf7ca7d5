"""LoRA-S: transformation-invariant LoRA optimizers by horizontal lift (Zheng & Wu).

Every method of the family works on the *descent vector* ``X``, an ``m×n`` matrix on the tangent
space of the rank-r manifold at ``W = a b``, and turns it into a pair update ``(u_a, u_b)`` whose
first-order effect on the product is exactly ``P_T(X)``:

    u_a b + a u_b = P_T(X)

The pair update is the *horizontal lift* of ``X`` under the quotient metric (LoRA-S eq. (7))

    ḡ((ȧ, ḃ), (ǎ, b̌)) = tr((aᵀa)⁻¹ ȧᵀ ǎ) + tr((b bᵀ)⁻¹ ḃ b̌ᵀ)

i.e. the unique pre-image of ``P_T(X)`` orthogonal to the vertical directions ``(a Ω, −Ω b)``
(``Ω ∈ R^{r×r}``) along which ``a b`` does not change. In library orientation (``M = a``,
``N = bᵀ``; ``S = (aᵀa)(b bᵀ)``):

    S K + K S = aᵀ X bᵀ                                   (Sylvester eq. (9))
    u_a = (X bᵀ − a (b bᵀ) K) (b bᵀ)⁻¹                    (Alg. 1 line 4)
    u_b = (aᵀa)⁻¹ (aᵀ X − K (aᵀa) b)                      (Alg. 1 line 5, transposed)

Because ``X ↦ (u_a, u_b)`` is linear and commutes with ``(a, b) → (a R, R⁻¹ b)``
(``u_a → u_a R``, ``u_b → R⁻¹ u_b``), any rule that computes ``X`` from the product alone gives an
optimizer that is exactly GL(r) transformation invariant.

The descent vector is ``P_T(G)`` recovered from the factor gradients (eq. (12)); it is the
tangent projection of the gradient with respect to the product ``a b`` (for
``W = W0 + s·a b`` that is ``s·∂L/∂W``, as in the paper, which has no ``s``).

Signs: the paper adds the lift of the preconditioned vector in Algorithm 2 (``M + lift``) and
subtracts ``λη·lift`` in Algorithm 3. Here every ``scale_by_*`` returns the lift of the
preconditioned vector with a positive sign (a descent direction, like ``optax.scale_by_adam``)
and the aliases multiply it by ``−learning_rate``: ``a ← a − lr·u_a``, ``b ← b − lr·u_b``.

Zero-initialised ``b``: ``b bᵀ = 0`` makes the quotient geometry singular. Every Gram here is
regularised, ``aᵀa + δI`` and ``b bᵀ + δI``, in the projection, the Sylvester equation and the
lift alike, which keeps the identity ``u_a b + a u_b = P_T^δ(X)`` exact. At ``b = 0`` this gives
``u_a = 0`` and ``u_b = (aᵀa + δI)⁻¹ aᵀ X``, the least-squares pre-image; nothing divides by zero.
``δ > 0`` breaks invariance by ``O(δ/σ_min²)``; ``δ = 0`` is exactly invariant but needs
full-rank factors.

Reference: J. Zheng and T. Wu, "LoRA-S: an efficient low rank adaptation scheme via Sylvester
equation", Algorithms 1–4, Sections 3–4, Appendix A.8–A.17.
"""

from __future__ import annotations

import functools
from collections.abc import Callable
from typing import Any, NamedTuple

import jax
import jax.numpy as jnp
import optax

from lowrank_optax import linalg
from lowrank_optax.cross_term import maybe_clip_cross_term
from lowrank_optax.linalg import mT
from lowrank_optax.pairs import (
    DEFAULT_KEYS,
    LoRAPair,
    PairKeys,
    abstract_safe_init,
    init_pairs,
    map_pairs,
)
from lowrank_optax.validation import check_hyperparams, with_state_check

__all__ = [
    "adams",
    "descent_vector",
    "horizontal_lift",
    "lracs",
    "quotient_metric",
    "racs_scales",
    "scale_by_adams",
    "scale_by_lracs",
    "sylvester_lift",
]


# ----------------------------------------------------------------------------- per-pair kernels


def descent_vector(g: LoRAPair, p: LoRAPair, delta: float | jax.Array) -> jax.Array:
    """``P_T(G)`` (``m×n``) from the factor gradients ``g`` at the factors ``p`` (eq. (12))."""
    return linalg.tangent_from_factor_grads(p.a, p.b, g.a, g.b, 1.0, delta)


def horizontal_lift(x: jax.Array, p: LoRAPair, delta: float | jax.Array,
                    eigenvalue_floor: float | jax.Array = 0.0) -> LoRAPair:
    """Horizontal lift of ``x: (m, n)`` at ``p`` under metric (7) (LoRA-S Algorithm 1).

    Solves ``S K + K S = aᵀ x bᵀ`` with ``S = (aᵀa + δI)(b bᵀ + δI)`` and returns
    ``u_a = (x bᵀ − a (b bᵀ + δI) K)(b bᵀ + δI)⁻¹``, ``u_b = (aᵀa + δI)⁻¹ (aᵀ x − K (aᵀa + δI) b)``,
    so that ``u_a b + a u_b = P_T^δ(x)`` exactly. Components of ``x`` off the tangent space are
    ignored (App. A.8), so ``x`` need not be projected first. With ``eigenvalue_floor > 0``
    each regularised Gram's eigenvalues are first raised to at least that fraction of its mean
    (:func:`~lowrank_optax.linalg.floor_eigenvalues`; the lift then solves with those Grams).
    """
    return _lift_of_products(mT(p.a) @ x, x @ mT(p.b), p, _lift_grams(p, delta, eigenvalue_floor))


class _LiftGrams(NamedTuple):
    """The Grams the lift and its metric solve with: ``a = aᵀa + δ'I``, ``b = b bᵀ + δ'I``
    (``δ'`` of :func:`~lowrank_optax.linalg.damping`) and, when floored, their floored
    eigenpairs ``(w, V)`` (``a``, ``b`` are then ``V diag(w) Vᵀ``), through which they are
    inverted (:func:`~lowrank_optax.linalg.solve_floored`); without a floor, Cholesky solves."""

    a: jax.Array
    b: jax.Array
    eig_a: linalg.Eigenpairs | None = None
    eig_b: linalg.Eigenpairs | None = None


def _lift_grams(p: LoRAPair, delta: float | jax.Array,
                eigenvalue_floor: float | jax.Array = 0.0) -> _LiftGrams:
    """The lift's Grams, each with its eigenvalues floored at ``eigenvalue_floor·tr/r``
    (:func:`~lowrank_optax.linalg.floored_eigenpairs`) unless the floor is the literal ``0``
    (no eigendecomposition then)."""
    ga = linalg.regularize(linalg.gram_a(p.a), delta)
    gb = linalg.regularize(linalg.gram_b(p.b), delta)
    eig_a = linalg.floored_eigenpairs(ga, eigenvalue_floor)
    eig_b = linalg.floored_eigenpairs(gb, eigenvalue_floor)
    if eig_a is None:
        return _LiftGrams(ga, gb)

    def rebuilt(eig):
        w, e = eig
        return (e * w[..., None, :]) @ mT(e)

    return _LiftGrams(rebuilt(eig_a), rebuilt(eig_b), eig_a, eig_b)


def _lift_of_products(at_x: jax.Array, x_bt: jax.Array, p: LoRAPair,
                      grams: _LiftGrams) -> LoRAPair:
    """:func:`horizontal_lift` from the products ``aᵀx`` (r×n) and ``x bᵀ`` (m×r), which are
    all of ``x`` it uses, with the Grams of :func:`_lift_grams`."""
    a, b = p.a, p.b
    ga, gb = grams.a, grams.b
    k = linalg.solve_sylvester_gram_product(ga, gb, at_x @ mT(b), grams.eig_a)
    u_a = linalg.solve_floored_right(x_bt - a @ (gb @ k), gb, grams.eig_b)
    u_b = linalg.solve_floored(ga, grams.eig_a, at_x - (k @ ga) @ b)
    return LoRAPair(u_a, u_b)


def quotient_metric(
    p: LoRAPair, u: LoRAPair, v: LoRAPair, delta: float | jax.Array = 0.0
) -> jax.Array:
    """Metric (7) at ``p``: ``tr((aᵀa + δI)⁻¹ u_aᵀ v_a) + tr((b bᵀ + δI)⁻¹ u_b v_bᵀ)``."""
    return _metric(u, v, _lift_grams(p, delta))


def _metric(u: LoRAPair, v: LoRAPair, grams: _LiftGrams) -> jax.Array:
    left = jnp.sum(v.a * linalg.solve_floored_right(u.a, grams.a, grams.eig_a), axis=(-2, -1))
    right = jnp.sum(v.b * linalg.solve_floored(grams.b, grams.eig_b, u.b), axis=(-2, -1))
    return left + right


def _lift_norm(lift: LoRAPair, grams: _LiftGrams) -> jax.Array:
    """``‖x‖_g``, the norm under the induced metric (8), from the horizontal lift of ``x``."""
    return jnp.sqrt(_metric(lift, lift, grams))


def _ema(decay: Any, old: Any, new: Any) -> Any:
    return jax.tree.map(lambda o, n: decay * o + (1.0 - decay) * n, old, new)


def _bias_corrected(moment: jax.Array, decay: Any, count: jax.Array) -> jax.Array:
    return moment / (1.0 - decay ** count.astype(moment.dtype))


def _pair_zeros_like_product(p: LoRAPair) -> jax.Array:
    return jnp.zeros((p.a.shape[-2], p.b.shape[-1]), p.a.dtype)


def _descent_tree(updates: Any, params: Any, delta: Any, keys: PairKeys) -> Any:
    """The tree of descent vectors ``P_T(G)``, one ``(..., m, n)`` leaf per pair."""
    template = init_pairs(_pair_zeros_like_product, params, keys)
    _, vectors = map_pairs(
        lambda g, p, _: (g, descent_vector(g, p, delta)), updates, params, template, keys=keys
    )
    return vectors


# ----------------------------------------------------------------------------- sylvester_lift


class SylvesterLiftState(NamedTuple):
    """State of :func:`sylvester_lift`: the inner transformation's state (``m×n`` per pair)."""

    inner_state: optax.OptState


def sylvester_lift(
    inner: optax.GradientTransformation,
    *,
    delta: float = 1e-6,
    eigenvalue_floor: float = 1e-2,
    keys: PairKeys = DEFAULT_KEYS,
) -> optax.GradientTransformation:
    """Lifts any optax transformation acting on ``m×n`` matrices to LoRA pairs (LoRA-S Alg. 1).

    Per step: recover the descent vectors ``X = P_T(G)`` (``m×n``, one per pair) from the
    factor gradients; run ``inner`` on the tree of all descent vectors (which mirrors the
    pair-level structure of ``params``, one ``(..., m, n)`` leaf per pair); lift each output
    ``X̃`` horizontally (see :func:`horizontal_lift`) and return the lift as the pair update.
    The update moves the product by ``P_T(X̃)`` to first order, and the optimizer is GL(r)
    transformation invariant whatever ``inner`` is (exactly for ``delta = 0``).

    ``inner``'s state lives in ``m×n`` space per pair (e.g. ``optax.adam`` keeps two ``m×n``
    moments per pair): the full-matrix memory cost of the optimizer being lifted. ``inner``
    never sees the LoRA factors: it is called with ``params=None`` (extra keyword arguments of
    ``update`` are passed on), so transformations that need params (``optax.add_decayed_weights``,
    hence ``optax.adamw`` and ``optax.lion``, which contain it) do not belong inside; chain them
    after the lift, or use their ``scale_by_*`` form.

    Learning-rate convention: the lift is linear in ``X̃``, so it carries over whatever sign
    and scale ``inner`` applies. ``sylvester_lift(optax.adam(lr))`` is a complete optimizer
    (apply its updates with ``optax.apply_updates``), and equals
    ``optax.chain(sylvester_lift(optax.scale_by_adam()), optax.scale_by_learning_rate(lr))``.

    Decision (not in the paper): the eigenvalue floor. Each Gram the lift solves with
    (``aᵀa + δI``, ``b bᵀ + δI``) has its eigenvalues raised to at least
    ``eigenvalue_floor·tr/r`` (:func:`~lowrank_optax.linalg.floor_eigenvalues`). When the
    adapter has more rank than the fit needs, a factor's Gram has eigenvalues ``σ²`` far below
    the others, and the lift of a normalised ``X̃`` (Adam's, RACS's: of unit size whatever the
    residual) moves the other factor along them by ``~|X̃|/σ``. Floored, that is at most
    ``1/(2√eigenvalue_floor) = 5`` times the unit-scale step. Eigenvalues above the floor are
    left alone, so a pair whose Grams are all above it gets the paper's lift exactly (and GL(r)
    invariance with it); ``0`` is the paper's lift everywhere. Rank-2 targets at 12×12 with
    ``r = 12`` (lr 0.03, 300 steps): the lifted Adam 2.1e-2 of the start loss without the
    floor, 3e-14 with it; ``adams`` 2.3e-3 → 4.5e-14; ``lracs`` (lr 0.01) rose to 1.5 times
    the start loss, 3.9e-4 with it (``docs/methods/lora_s.md``). Cost: the eigendecompositions
    of both Grams, through which the lift then solves (in place of two Cholesky factorisations
    and the Sylvester solve's own eigendecomposition of ``aᵀa``).

    Args:
      inner: any ``optax.GradientTransformation`` on a tree of ``m×n`` matrices.
      delta: ``δ ≥ 0`` regularising both r×r Grams in the projection, the Sylvester equation
        and the lift; default ``1e-6`` keeps zero-initialised ``b`` finite (the first step then
        moves ``b`` only, by the least-squares pre-image of ``X̃``).
      eigenvalue_floor: relative floor of the lift's Grams' eigenvalues, in ``[0, 1]``;
        default 1e-2 (see above); ``0`` for the paper's lift.
      keys: mapping keys of the factors in the tree.
    """
    check_hyperparams("sylvester_lift", delta=delta, eigenvalue_floor=eigenvalue_floor)
    if not isinstance(inner, optax.GradientTransformation):
        raise TypeError(f"sylvester_lift: inner must be an optax.GradientTransformation (e.g. "
                        f"optax.adam(1e-3), not optax.adam), got {inner!r}")
    inner = optax.with_extra_args_support(inner)

    def init_fn(params: optax.Params) -> SylvesterLiftState:
        return SylvesterLiftState(inner.init(init_pairs(_pair_zeros_like_product, params, keys)))

    def update_fn(updates, state, params=None, **extra_args):
        vectors = _descent_tree(updates, params, delta, keys)
        preconditioned, inner_state = inner.update(vectors, state.inner_state, None, **extra_args)
        new_updates, _ = map_pairs(
            lambda g, p, x: (horizontal_lift(x, p, delta, eigenvalue_floor), x),
            updates, params, preconditioned, keys=keys,
        )
        return new_updates, SylvesterLiftState(inner_state)

    return with_state_check(
        "sylvester_lift",
        optax.GradientTransformationExtraArgs(abstract_safe_init(init_fn), update_fn),
        keys,
    )


# ----------------------------------------------------------------------------- AdamS


class TangentMoment(NamedTuple):
    """First moment in tangent coordinates (Alg. 4): ``m = U·core·Vᵀ + left·Vᵀ + U·right``.

    ``U``, ``V`` are orthonormal bases of the column spaces of ``a`` and ``bᵀ`` (``M``, ``N``),
    recomputed each step; ``left`` (``m×r``) and ``right`` (``r×n``) are orthogonal to them.
    With the moment's transport, ``basis_u`` and ``basis_v`` are the ``U`` and ``V`` the
    coordinates were taken in (``None`` for the paper's rule, which reads them in the current
    bases).
    """

    core: jax.Array
    left: jax.Array
    right: jax.Array
    basis_u: jax.Array | None = None
    basis_v: jax.Array | None = None


class FactorAdamMoments(NamedTuple):
    """Adam moments of the raw factor gradients, used during the robust start."""

    mu: LoRAPair
    nu: LoRAPair


class ScaleByAdamSState(NamedTuple):
    """State of :func:`scale_by_adams`.

    Attributes:
      count: steps taken (int32).
      mu: per pair, the first moment of ``X`` (``m×n``) or a :class:`TangentMoment`.
      nu: per pair, the second moment of ``X`` (``m×n``).
      robust: per pair :class:`FactorAdamMoments` for the robust start, or ``None`` when
        ``robust_steps`` is the literal ``0``.
    """

    count: jax.Array
    mu: Any
    nu: Any
    robust: Any


def _orthonormal_basis(f: jax.Array) -> jax.Array:
    """``Q`` of the QR factorisation ``f = Q R`` with ``diag(R) ≥ 0`` (a function of ``f``)."""
    q, r = linalg.qr(f)
    signs = jnp.where(jnp.diagonal(r, axis1=-2, axis2=-1) < 0, -1.0, 1.0).astype(q.dtype)
    return q * signs[..., None, :]


def _tangent_coords(x: jax.Array, u: jax.Array, v: jax.Array) -> TangentMoment:
    core = mT(u) @ x @ v
    return TangentMoment(core, x @ v - u @ core, mT(u) @ x - core @ mT(v))


def _from_tangent_coords(c: TangentMoment, u: jax.Array, v: jax.Array) -> jax.Array:
    return (u @ c.core + c.left) @ mT(v) + u @ c.right


def _transported(c: TangentMoment, u: jax.Array, v: jax.Array) -> TangentMoment:
    """Coordinates in the bases ``u``, ``v`` of the moment that ``c`` holds in its own bases
    (``basis_u``, ``basis_v``): ``_tangent_coords`` of ``m = P Qᵀ``, ``P = [U c + left, U]``,
    ``Q = [V, rightᵀ]``, in ``O((m + n) r²)`` without forming ``m``."""
    p = jnp.concatenate([c.basis_u @ c.core + c.left, c.basis_u], axis=-1)
    q = jnp.concatenate([c.basis_v, mT(c.right)], axis=-1)
    u_p, q_v = mT(u) @ p, mT(q) @ v
    core = u_p @ q_v
    return TangentMoment(core, p @ q_v - u @ core, u_p @ mT(q) - core @ mT(v))


def _tangent_moment_zeros(p: LoRAPair, transport: bool) -> TangentMoment:
    (m, r), n = p.a.shape, p.b.shape[-1]
    shapes = ((r, r), (m, r), (r, n)) + (((m, r), (n, r)) if transport else ())
    return TangentMoment(*(jnp.zeros(s, p.a.dtype) for s in shapes))


def _factor_adam_zeros(p: LoRAPair) -> FactorAdamMoments:
    zeros = LoRAPair(jnp.zeros_like(p.a), jnp.zeros_like(p.b))
    return FactorAdamMoments(zeros, zeros)


def _has_robust_start(robust_steps: Any) -> bool:
    """Whether the state holds robust-start moments: always, unless ``robust_steps`` is ``0``.

    Under ``optax.inject_hyperparams`` the value arrives as an array (traced in ``update``), so
    the state structure depends only on whether the literal Python ``0`` was passed.
    """
    return not (isinstance(robust_steps, int) and robust_steps == 0)


def scale_by_adams(
    b1: float = 0.9,
    b2: float = 0.999,
    eps: float = 1e-8,
    *,
    delta: float = 1e-6,
    eigenvalue_floor: float = 1e-2,
    robust_steps: int = 0,
    low_memory: bool = False,
    transport_moment: bool = True,
    riemannian_second_moment: bool = False,
    keys: PairKeys = DEFAULT_KEYS,
) -> optax.GradientTransformation:
    """AdamS direction: Adam on the descent vector, then the horizontal lift (LoRA-S Alg. 2).

    Per step ``t`` and pair (library notation, pre-step ``a``, ``b``)::

        X = P_T(G)                                      (from ∇a, ∇b; eq. (12))
        m ← b1 m + (1 − b1) X,   v ← b2 v + (1 − b2) X⊙X
        X̃ = m̂ / (√v̂ + eps),     m̂ = m / (1 − b1ᵗ),  v̂ = v / (1 − b2ᵗ)
        (u_a, u_b) = horizontal_lift(X̃)                 (Sylvester eq. (9), Alg. 2 lines 7–9)

    Algorithm 2 prints ``m_t/√v_t`` (no bias correction, no ``eps``); the bias correction and
    ``eps`` outside the root are those of ``optax.adam``, as the library's design fixes.
    ``scale_by_adams()`` equals ``sylvester_lift(optax.scale_by_adam(b1, b2, eps))``.

    Options:

    * ``low_memory`` (Alg. 4, App. A.17): the first moment is kept in tangent coordinates
      ``(core, left, right)`` (``r² + mr + rn`` numbers) w.r.t. orthonormal bases ``U``, ``V``
      of ``a`` and ``bᵀ`` from QR with a non-negative diagonal of ``R``; each step the new
      coordinates of ``X`` are averaged in and ``m`` is rebuilt with the current bases. The
      second moment stays ``m×n``.

      Decision (``transport_moment=True``, the default): the stored coordinates are first read
      in the bases they were taken in (kept in the state, ``(m + n) r`` more numbers) and
      projected onto the current tangent space, ``m ← P_T(β1 m + (1 − β1) X)``: the usual
      vector transport by projection. The paper (eq. (25)) reads them in the *current* bases.
      That is the same while the bases move continuously, but the QR basis of a factor of
      rank < r is arbitrary beyond its rank and changes from step to step (from ``b = 0``, or
      when the fit needs less rank than ``r``), and the moment is then misread: rank-1 and
      rank-2 targets with ``r = 4, 8, 12`` (lr 0.03, 300 steps) ended at 1.5e-3 … 270 times the
      start loss, or rose; with the transport 1e-13 … 9e-3, as the ``m×n`` moment of Algorithm
      2. The transported moment does not depend on the bases, so the variant is GL(r)
      invariant like Algorithm 2; the paper's rule (``transport_moment=False``) is invariant
      only under positive diagonal ``R``.
    * ``riemannian_second_moment`` (Section 4.2): ``v`` accumulates
      ``(‖X‖_g / ‖X‖_F)·X⊙X`` with ``‖X‖_g`` the norm under the induced metric (8) (one more
      Sylvester solve, to lift ``X``) and ``‖·‖_F`` the Frobenius norm; the ratio is taken as
      printed (not squared); ``0`` when ``X = 0``. Still invariant (``‖·‖_g`` is a metric on
      the quotient).
    * ``robust_steps`` (App. A.16): for the first ``robust_steps`` steps the direction is plain
      Adam on the raw factor gradients (AdamW without decay; its own moments, bias-corrected),
      then AdamS starts with fresh moments and its own bias-correction count (so the near-zero
      factors of the first steps do not pollute ``v``). Chosen with ``lax.cond`` on the step
      count, so it works with a traced ``robust_steps`` under ``optax.inject_hyperparams``.

    Args:
      b1: first-moment decay in ``[0, 1)``, default 0.9 (paper, Table 4/5).
      b2: second-moment decay in ``[0, 1)``, default 0.999 (paper).
      eps: added to ``√v̂`` (``≥ 0``), default 1e-8 (``optax.adam``).
      delta: ``δ ≥ 0`` regularising the r×r Grams (see module docstring); default 1e-6 keeps the
        zero-initialised ``b`` finite. ``0`` gives exact invariance for full-rank factors.
      eigenvalue_floor: relative floor of the lift's Grams' eigenvalues (in ``[0, 1]``,
        default 1e-2; see :func:`sylvester_lift`). With ``0`` and ``delta = 0``, Algorithm 2.
      robust_steps: number of initial plain-Adam steps (an integer ``≥ 0``); default 0 (the
        paper uses 100).
      low_memory: store the first moment in tangent coordinates (Alg. 4).
      transport_moment: with ``low_memory``, transport the stored moment to the current
        tangent space (default True, see above); False is eq. (25) as printed.
      riemannian_second_moment: accumulate the second moment under metric (8).
      keys: mapping keys of the factors in the tree.
    """
    check_hyperparams("scale_by_adams", b1=b1, b2=b2, eps=eps, delta=delta,
                      eigenvalue_floor=eigenvalue_floor,
                      robust_steps=robust_steps, low_memory=low_memory,
                      transport_moment=transport_moment,
                      riemannian_second_moment=riemannian_second_moment)
    robust = _has_robust_start(robust_steps)

    def init_fn(params: optax.Params) -> ScaleByAdamSState:
        mu_init = (functools.partial(_tangent_moment_zeros, transport=transport_moment)
                   if low_memory else _pair_zeros_like_product)
        return ScaleByAdamSState(
            jnp.zeros([], jnp.int32),
            init_pairs(mu_init, params, keys),
            init_pairs(_pair_zeros_like_product, params, keys),
            init_pairs(_factor_adam_zeros, params, keys) if robust else None,
        )

    def first_moment(mu: Any, x: jax.Array, p: LoRAPair) -> tuple[Any, jax.Array]:
        if not low_memory:
            mu = _ema(b1, mu, x)
            return mu, mu
        u, v = _orthonormal_basis(p.a), _orthonormal_basis(mT(p.b))
        if transport_moment:
            mu = _transported(mu, u, v)
        mu = _ema(b1, mu, _tangent_coords(x, u, v))
        return (mu._replace(basis_u=u, basis_v=v) if transport_moment else mu,
                _from_tangent_coords(mu, u, v))

    def second_moment_input(x: jax.Array, p: LoRAPair) -> jax.Array:
        if not riemannian_second_moment:
            return x * x
        grams = _lift_grams(p, delta)
        norm_g = _lift_norm(_lift_of_products(mT(p.a) @ x, x @ mT(p.b), p, grams), grams)
        norm_f = jnp.sqrt(jnp.sum(x * x))
        ratio = jnp.where(norm_f > 0, norm_g / jnp.where(norm_f > 0, norm_f, 1.0), 0.0)
        return ratio * x * x

    def adams_step(g, p, mu, nu, count):
        x = descent_vector(g, p, delta)
        mu, m = first_moment(mu, x, p)
        nu = _ema(b2, nu, second_moment_input(x, p))
        x_tilde = _bias_corrected(m, b1, count) / (
            jnp.sqrt(_bias_corrected(nu, b2, count)) + linalg.adam_eps(eps, nu.dtype)
        )
        return horizontal_lift(x_tilde, p, delta, eigenvalue_floor), mu, nu

    def robust_step(g: LoRAPair, moments: FactorAdamMoments, count):
        mu = _ema(b1, moments.mu, g)
        nu = _ema(b2, moments.nu, jax.tree.map(jnp.square, g))
        direction = jax.tree.map(
            lambda m, v: _bias_corrected(m, b1, count)
            / (jnp.sqrt(_bias_corrected(v, b2, count)) + linalg.adam_eps(eps, v.dtype)),
            mu, nu,
        )
        return direction, FactorAdamMoments(mu, nu)

    def update_fn(updates, state, params=None):
        count = optax.safe_increment(state.count)
        if not robust:
            new_updates, mu, nu = map_pairs(
                lambda g, p, mu, nu: adams_step(g, p, mu, nu, count),
                updates, params, state.mu, state.nu, keys=keys,
            )
            return new_updates, ScaleByAdamSState(count, mu, nu, None)

        in_robust_phase = state.count < robust_steps
        adams_count = count - robust_steps

        def robust_phase():
            new_updates, moments = map_pairs(
                lambda g, p, m: robust_step(LoRAPair(g.a, g.b), m, count),
                updates, params, state.robust, keys=keys,
            )
            return new_updates, state.mu, state.nu, moments

        def adams_phase():
            new_updates, mu, nu = map_pairs(
                lambda g, p, mu, nu: adams_step(g, p, mu, nu, adams_count),
                updates, params, state.mu, state.nu, keys=keys,
            )
            return new_updates, mu, nu, state.robust

        # One conditional around the tree (as in AltLoRA): each phase stacks only what it reads,
        # so the robust phase never touches the m×n moments. A concrete phase (eager calls)
        # takes a Python branch; an eager ``cond`` would compile its branches on every call.
        if isinstance(in_robust_phase, jax.core.Tracer):
            new_updates, mu, nu, robust_moments = jax.lax.cond(in_robust_phase, robust_phase,
                                                               adams_phase)
        else:
            new_updates, mu, nu, robust_moments = (robust_phase if in_robust_phase
                                                   else adams_phase)()
        return new_updates, ScaleByAdamSState(count, mu, nu, robust_moments)

    return with_state_check("scale_by_adams",
                            optax.GradientTransformation(abstract_safe_init(init_fn), update_fn),
                            keys)


def adams(
    learning_rate: optax.ScalarOrSchedule,
    b1: float = 0.9,
    b2: float = 0.999,
    eps: float = 1e-8,
    *,
    robust_steps: int = 0,
    low_memory: bool = False,
    transport_moment: bool = True,
    riemannian_second_moment: bool = False,
    delta: float = 1e-6,
    eigenvalue_floor: float = 1e-2,
    weight_decay: float = 0.0,
    cross_term_ratio: float | None = None,
    keys: PairKeys = DEFAULT_KEYS,
) -> optax.GradientTransformation:
    """AdamS (Adam-Sylvester) for LoRA pairs (LoRA-S Algorithms 2 and 4).

    :func:`scale_by_adams`, then decoupled weight decay, then ``−learning_rate``:
    ``a ← a − lr·(u_a + wd·a)``, ``b ← b − lr·(u_b + wd·b)``.

    ``weight_decay`` is the Sylvester-matrix regularisation of App. A.11,
    ``K ← K + λη I``: substituting it into the lift adds exactly ``−λη·(a, b)`` (the terms
    ``a (b bᵀ) λI (b bᵀ)⁻¹ = λ a`` and ``(aᵀa)⁻¹ λI (aᵀa) b = λ b``, also with ``δ``), so it
    is decoupled weight decay with coefficient ``λ``. Default 0: the paper's methods are
    weight-decay free (its ablation finds ``λ = 0`` best).

    Args:
      learning_rate: a float ``≥ 0`` or an ``optax.Schedule``; the paper uses 5e-5 (GPT-2) to 3e-4.
      b1, b2, eps: Adam hyperparameters (``b1, b2 ∈ [0, 1)``, ``eps ≥ 0``; see
        :func:`scale_by_adams`).
      robust_steps: initial plain-Adam steps, an integer ``≥ 0`` (App. A.16; the paper uses
        100). Default 0.
      low_memory: Algorithm 4 (first moment in tangent coordinates).
      transport_moment: with ``low_memory``, transport the stored moment (default True; False
        is the paper's eq. (25), see :func:`scale_by_adams`).
      riemannian_second_moment: second moment under metric (8) (Section 4.2).
      delta: Gram regulariser ``≥ 0``, default 1e-6.
      eigenvalue_floor: relative floor of the lift's Grams' eigenvalues, default 1e-2 (see
        :func:`sylvester_lift`); ``0`` for the paper's lift.
      weight_decay: ``λ ≥ 0`` of App. A.11 (equivalently, decoupled weight decay).
      cross_term_ratio: ``ρ > 0`` of :func:`~lowrank_optax.clip_cross_term`, applied to the
        step after the learning rate, or ``None`` (default, the method's own step): no hard
        start of the test suite needs it here, and it costs two 2r×2r Grams per pair.
      keys: mapping keys of the factors in the tree.

    Example::

      >>> import jax.numpy as jnp, optax, lowrank_optax as lro
      >>> params = {"lora_a": jnp.ones((4, 2)), "lora_b": jnp.zeros((2, 3))}
      >>> tx = lro.adams(1e-3)
      >>> state = tx.init(params)
      >>> grads = {"lora_a": jnp.zeros((4, 2)), "lora_b": jnp.ones((2, 3))}
      >>> updates, state = tx.update(grads, state, params)
      >>> params = optax.apply_updates(params, updates)
    """
    check_hyperparams("adams", learning_rate=learning_rate, b1=b1, b2=b2, eps=eps,
                      robust_steps=robust_steps, delta=delta, eigenvalue_floor=eigenvalue_floor,
                      weight_decay=weight_decay,
                      low_memory=low_memory, transport_moment=transport_moment,
                      riemannian_second_moment=riemannian_second_moment,
                      cross_term_ratio=cross_term_ratio)
    return with_state_check("adams", optax.chain(
        scale_by_adams(
            b1, b2, eps, delta=delta, eigenvalue_floor=eigenvalue_floor,
            robust_steps=robust_steps, low_memory=low_memory,
            transport_moment=transport_moment,
            riemannian_second_moment=riemannian_second_moment, keys=keys,
        ),
        optax.add_decayed_weights(weight_decay),
        optax.scale_by_learning_rate(learning_rate),
        maybe_clip_cross_term(cross_term_ratio, keys),
    ), keys)


# ----------------------------------------------------------------------------- LRACS


class ScaleByLRACSState(NamedTuple):
    """State of :func:`scale_by_lracs`.

    Attributes:
      count: steps taken (int32).
      mu_s: per pair, first moment of the column scales ``s`` (``n``).
      mu_q: per pair, first moment of the row scales ``q`` (``m``).
      phi: per pair, the limited norm ``φ`` of the previous step (scalar; 0 before step 1).
    """

    count: jax.Array
    mu_s: Any
    mu_q: Any
    phi: Any


def racs_scales(x: jax.Array, iterations: int | jax.Array = 5) -> tuple[jax.Array, jax.Array]:
    """Column and row scales ``(s, q)`` of RACS (LoRA-S eq. (14)) by power iteration from ``q = 1``.

    Fixed point of ``s = (x⊙x)ᵀ q / ‖q‖²`` and ``q = (x⊙x) s / ‖s‖²`` (the diagonal Kronecker
    factors ``S``, ``Q`` of ``F ≈ S ⊗ Q`` from a one-sample estimate); ``s`` is updated first.
    Zero norms are replaced by the smallest positive float, so ``x = 0`` gives ``s = q = 0``.
    From ``q = 1`` every iterate ``q`` is independent of ``x``'s scale and ``s`` scales like
    ``x²``, so the iteration runs on ``x / max|x|`` and multiplies ``s`` back: the norms
    ``‖s‖²`` (``x⁴``) would underflow in float32 for entries below ~1e-9 and overflow above ~1e9.
    """
    c = linalg.max_abs_scale(x)
    x2 = (x / c) ** 2
    s, q = _racs_iteration(lambda s: x2 @ s, lambda q: q @ x2, x.shape, iterations, x.dtype)
    return s * c * c, q


def _racs_scales_lowrank(u: jax.Array, v: jax.Array,
                         iterations: int | jax.Array) -> tuple[jax.Array, jax.Array]:
    """:func:`racs_scales` of ``x = u @ v`` in ``O((m + n) k²)`` per iteration, without ``x``.

    ``x`` is normalised through its factors: each column of ``u`` and row of ``v`` first get
    the same largest entry (``u D⁻¹``, ``D v``), so that ``max|u|·max|v|`` follows ``x``'s
    scale even when ``u``'s columns differ in scale (``P_T(G) = [a, D] [C; b]``: ``a`` and
    ``b`` are the factors, ``C`` and ``D`` scale like ``G``)."""
    u, v = _balanced(u, v)
    cu, cv = linalg.max_abs_scale(u), linalg.max_abs_scale(v)
    u, v = u / cu, v / cv
    s, q = _racs_iteration(lambda s: linalg.square_row_sums(u, v, s),
                           lambda q: linalg.square_column_sums(u, v, q),
                           (u.shape[-2], v.shape[-1]), iterations, u.dtype)
    return s * (cu * cv) ** 2, q


def _balanced(u: jax.Array, v: jax.Array) -> tuple[jax.Array, jax.Array]:
    """``(u D⁻¹, D v)`` with ``D`` diagonal, column ``j`` of ``u D⁻¹`` and row ``j`` of ``D v``
    having the same largest entry (``D = 1`` where either is zero); ``u v`` is unchanged."""
    cu, cv = jnp.max(jnp.abs(u), axis=-2), jnp.max(jnp.abs(v), axis=-1)
    live = (cu > 0) & (cv > 0)
    d = jnp.where(live, jnp.sqrt(cu) / jnp.sqrt(jnp.where(live, cv, 1.0)), 1.0)
    return u / d[..., None, :], v * d[..., :, None]


def _racs_iteration(rows: Callable, columns: Callable, shape: tuple[int, int],
                    iterations: int | jax.Array, dtype) -> tuple[jax.Array, jax.Array]:
    """Eq. (14)'s alternation given ``rows(s) = (x⊙x) s`` and ``columns(q) = (x⊙x)ᵀ q``."""
    tiny = jnp.finfo(dtype).tiny

    def body(_, sq):
        _, q = sq
        s = columns(q) / jnp.maximum(jnp.sum(q * q), tiny)
        return s, rows(s) / jnp.maximum(jnp.sum(s * s), tiny)

    m, n = shape
    return jax.lax.fori_loop(0, iterations, body, (jnp.zeros(n, dtype), jnp.ones(m, dtype)))


def _inverse_sqrt_floored(scales: jax.Array, eps: float | jax.Array) -> jax.Array:
    """``1/√max(scales, eps·max(scales), tiny)``: LRACS's diagonal scaling, guarded."""
    floor = jnp.maximum(eps * jnp.max(scales), jnp.finfo(scales.dtype).tiny)
    return jax.lax.rsqrt(jnp.maximum(scales, floor))


def scale_by_lracs(
    b1: float = 0.9,
    gamma: float = 1.1,
    eps: float = 1e-8,
    *,
    power_iterations: int = 5,
    bias_correction: bool = True,
    delta: float = 1e-6,
    eigenvalue_floor: float = 1e-2,
    keys: PairKeys = DEFAULT_KEYS,
) -> optax.GradientTransformation:
    """LRACS direction: RACS row/column scaling of ``X``, lifted horizontally (LoRA-S Alg. 3).

    Per step and pair::

        X = P_T(G)                                        (eq. (12))
        (s, q) = RACS scales of X                         (eq. (14), power iteration from q = 1)
        m_s ← b1 m_s + (1 − b1) s,  m_q ← b1 m_q + (1 − b1) q
        X̃ = Diag(m̂_q)^{-1/2} X Diag(m̂_s)^{-1/2}          (m̂ = max(m/(1 − b1ᵗ), eps·max))
        (u_a, u_b) = horizontal_lift(X̃)                   (Grams' eigenvalues floored)
        η = γ / max(‖X̃‖_g / φ, γ)   (η = 1 while φ = 0, i.e. on the first step)
        φ ← η ‖X̃‖_g
        direction = η (u_a, u_b)

    ``‖X̃‖_g`` is the norm of ``X̃`` under the induced metric (8), i.e. metric (7) applied to
    its horizontal lift. The norm-growth limiter allows the (metric) update norm to grow by at
    most ``γ`` per step. State beyond the factors: ``m + n + 1`` numbers per pair.

    No ``m×n`` array is formed: ``X = u v`` is kept as its rank-``2r`` factors
    (:func:`~lowrank_optax.linalg.tangent_factors`), eq. (14)'s products ``(X⊙X) s`` and
    ``(X⊙X)ᵀ q`` are ``O((m + n) r²)`` (:func:`~lowrank_optax.linalg.square_row_sums`), the
    diagonal scalings act on ``u`` and ``v``, and the lift needs only ``aᵀX̃`` and ``X̃ bᵀ``.

    Decisions where the paper is silent: the scale moments are bias-corrected
    (``bias_correction=True``, divided by ``1 − b1ᵗ``; Algorithm 3 has no correction, and as
    ``X̃`` scales like ``(m_q m_s)^{-1/2}`` its first step is then ``1/(1 − b1) = 10`` times
    larger, with no limiter on the first step: ~10·lr per entry of the product whatever its
    size); the lift's Grams have their eigenvalues floored at ``eigenvalue_floor`` times their
    mean (:func:`sylvester_lift`); ``eps`` (not in the paper) floors each scale relative to its
    largest entry, which guards zero rows/columns and keeps the scaling diagonal (so ``X̃``
    stays rank ``2r``); the limiter acts per pair (RACS limits each weight matrix); ``φ = 0``
    (first step, or a zero update) means "no limit", not ``η = 0`` forever. The power iteration
    runs on ``X`` divided by its scale and ``s`` is multiplied back (:func:`racs_scales`): the
    direction does not depend on the gradient's scale (tested from 1e-15 to 1e15 in float32),
    where the plain iteration's norms ``‖s‖²`` (``~G⁴``) under- or overflowed outside about 1e-8
    to 1e9 (a first step 5e26 times too large for gradients of 3.5e-10, NaN for 1e10).

    Args:
      b1: decay of the scale moments in ``[0, 1)``, default 0.9 (paper).
      gamma: limiter threshold ``γ ≥ 1``; the paper gives no value. Default 1.1; RACS's (and
        Fira's) 1.01 is the original choice. The limiter compares with the previous step's
        norm, so after any dip of the step norm it takes ``ln(k)/ln(γ)`` steps to allow a
        ``k``-times larger step again: 231 steps for ``k = 10`` at ``γ = 1.01``, 24 at 1.1.
        Under a warm-up from ``b = 0`` the metric norm falls by orders of magnitude while
        ``b`` grows (2e5 to 0.5 in 40 steps on the issue-12 toy), and at 1.01 the limiter then
        held every one of the last 155 of 200 steps (relative loss 3e-3 where AdamW reaches
        7e-8; 6e-7 at 1.1). See ``docs/methods/lora_s.md``.
      eps: relative floor of the scales ``m_q``, ``m_s`` (``≥ 0``), default 1e-8: an entry below
        ``eps`` times the largest is raised to that, so a zero row of ``X`` is scaled by at most
        ``1/√(eps·max m_q)``; above the floor the scaling is the paper's. (Before, ``eps`` was
        added to ``√m_q √m_sᵀ`` entrywise, which is not a diagonal scaling and needed ``X`` as
        an ``m×n`` array.)
      power_iterations: iterations for eq. (14) (an integer ``≥ 1``), default 5 (paper).
      bias_correction: divide the scale moments by ``1 − b1ᵗ`` (not in the paper); default
        True: the first step is ``1 − b1`` times the paper's. A rank-2 target at 64×48,
        r = 8, lr 0.01 (float32, XLA -O0): 0.20 of the start loss after 300 steps without it,
        2.3e-3 with it. False is Algorithm 3.
      delta: Gram regulariser ``≥ 0`` (see module docstring), default 1e-6.
      eigenvalue_floor: each Gram the lift solves with, ``aᵀa + δI`` and ``b bᵀ + δI``, has its
        eigenvalues raised to at least ``eigenvalue_floor·tr/r`` (in ``[0, 1]``), default 1e-2;
        ``0`` is the paper's lift (see :func:`sylvester_lift`).
      keys: mapping keys of the factors in the tree.
    """
    check_hyperparams("scale_by_lracs", b1=b1, gamma=gamma, eps=eps,
                      power_iterations=power_iterations, delta=delta,
                      eigenvalue_floor=eigenvalue_floor, bias_correction=bias_correction)

    def init_fn(params: optax.Params) -> ScaleByLRACSState:
        def zeros(shape_of):
            return init_pairs(lambda p: jnp.zeros(shape_of(p), p.a.dtype), params, keys)

        return ScaleByLRACSState(
            jnp.zeros([], jnp.int32),
            zeros(lambda p: p.b.shape[-1:]),
            zeros(lambda p: p.a.shape[-2:-1]),
            zeros(lambda p: ()),
        )

    def pair_fn(g, p, mu_s, mu_q, phi, count):
        u, v = linalg.tangent_factors(p.a, p.b, g.a, g.b, delta)
        s, q = _racs_scales_lowrank(u, v, power_iterations)
        mu_s, mu_q = _ema(b1, mu_s, s), _ema(b1, mu_q, q)
        scale_s, scale_q = mu_s, mu_q
        if bias_correction:
            scale_s, scale_q = _bias_corrected(mu_s, b1, count), _bias_corrected(mu_q, b1, count)
        u = u * _inverse_sqrt_floored(scale_q, eps)[:, None]
        v = v * _inverse_sqrt_floored(scale_s, eps)[None, :]
        grams = _lift_grams(p, delta, eigenvalue_floor)
        lift = _lift_of_products((mT(p.a) @ u) @ v, u @ (v @ mT(p.b)), p, grams)
        norm = _lift_norm(lift, grams)
        safe_phi = jnp.where(phi > 0, phi, 1.0)
        eta = jnp.where(phi > 0, gamma / jnp.maximum(norm / safe_phi, gamma), 1.0)
        direction = jax.tree.map(lambda u: eta * u, lift)
        return direction, mu_s, mu_q, eta * norm

    def update_fn(updates, state, params=None):
        count = optax.safe_increment(state.count)
        new_updates, mu_s, mu_q, phi = map_pairs(
            lambda g, p, *s: pair_fn(g, p, *s, count),
            updates, params, state.mu_s, state.mu_q, state.phi, keys=keys,
        )
        return new_updates, ScaleByLRACSState(count, mu_s, mu_q, phi)

    return with_state_check("scale_by_lracs",
                            optax.GradientTransformation(abstract_safe_init(init_fn), update_fn),
                            keys)


def lracs(
    learning_rate: optax.ScalarOrSchedule,
    b1: float = 0.9,
    gamma: float = 1.1,
    eps: float = 1e-8,
    *,
    power_iterations: int = 5,
    bias_correction: bool = True,
    delta: float = 1e-6,
    eigenvalue_floor: float = 1e-2,
    cross_term_ratio: float | None = 1.0,
    keys: PairKeys = DEFAULT_KEYS,
) -> optax.GradientTransformation:
    """LRACS (lifted RACS) for LoRA pairs (LoRA-S Algorithm 3).

    ``(a, b) ← (a, b) − lr·η·lift(X̃)`` with :func:`scale_by_lracs`'s direction. Weight-decay
    free as in the paper.

    Args:
      learning_rate: a float ``≥ 0`` or an ``optax.Schedule``; the paper uses 1e-3 to 5e-3.
      b1, gamma, eps, power_iterations, bias_correction, delta, eigenvalue_floor: see
        :func:`scale_by_lracs`.
      cross_term_ratio: ``ρ > 0`` of :func:`~lowrank_optax.clip_cross_term`, applied to the
        step after the learning rate, or ``None`` for the method's own step. Default 1.0:
        from ``a`` of rank r − 2 and ``b`` of rank 1 the step's cross term ``Δa Δb`` took
        the loss from 14.6 to 2e4 (float64, lr 0.03); with it the run converges.
      keys: mapping keys of the factors in the tree.
    """
    check_hyperparams("lracs", learning_rate=learning_rate, b1=b1, gamma=gamma, eps=eps,
                      power_iterations=power_iterations, delta=delta,
                      eigenvalue_floor=eigenvalue_floor, bias_correction=bias_correction,
                      cross_term_ratio=cross_term_ratio)
    return with_state_check("lracs", optax.chain(
        scale_by_lracs(
            b1, gamma, eps, power_iterations=power_iterations, bias_correction=bias_correction,
            delta=delta, eigenvalue_floor=eigenvalue_floor, keys=keys,
        ),
        optax.scale_by_learning_rate(learning_rate),
        maybe_clip_cross_term(cross_term_ratio, keys),
    ), keys)
