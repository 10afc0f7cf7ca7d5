"""AltLoRA and AltLoRA+: alternating projections with momentum aligned to the low-rank subspaces.

Yu, Wang, Chen and Xue, "AltLoRA: Towards Better Gradient Approximation in Low-Rank Adaptation
with Alternating Projections", 2025: Section 4, Theorems 1–2, Algorithm 1; AltLoRA+ follows the
official code (``LucasXinYu/AltLoRA``, ``optimizer_new.py``), the paper's Algorithm 2 being
unavailable.

Library orientation (``delta_W = scale·a @ b``; paper ``W = W0 + s·B A`` with ``a = Aᵀ``,
``b = Bᵀ``, so ``BᵀB = b bᵀ`` and ``A Aᵀ = aᵀa``). One ``update`` call moves ONE factor; the
other factor's update is exactly zero (times the incoming gradient, so that a non-finite gradient
still reaches ``optax.apply_if_finite``). With ``δ`` the Gram regulariser:

    a-step:  ĝa = ∇a (b bᵀ + δI)⁻¹ / s²                          (Theorem 1, eq. 8)
             m̃a = ma (b_prev bᵀ)(b bᵀ + δI)⁻¹                    (Theorem 2 for A; b_prev = b at
                                                                 the previous a-step)
             ma ← β1 m̃a + (1 − β1) ĝa,   ua = ma + γ a            (Alg. 1 lines 5–8)
    b-step:  ĝb = (aᵀa + δI)⁻¹ ∇b / s²
             m̃b = (aᵀa + δI)⁻¹ (aᵀ a_prev) mb                    (Theorem 2; a_prev = a at the
                                                                 previous b-step)
             mb ← β1 m̃b + (1 − β1) ĝb,   ub = mb + γ b

``u`` is the descent direction (optax sign convention; the alias multiplies by ``−lr``), so
``a ← a − lr (ma + γ a)`` is the paper's coupled weight decay ``A ← A − η(M + γA)`` on the
active factor only. Paper notation: ``ĝa = (∇̃_A L)ᵀ``, ``ma = (Mᴬ)ᵀ``; the paper's
``M̃ᴮ = Mᴮ A_old A_newᵀ (A_new A_newᵀ)⁻¹`` transposes to ``m̃b`` above.
"""

from __future__ import annotations

from typing import Any, Literal, NamedTuple

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
    map_pairs,
)
from lowrank_optax.riemannian import ROBUST_RELATIVE_DELTA, gram_scale, relative_gram_delta
from lowrank_optax.validation import check_choice, check_hyperparams, with_state_check

__all__ = [
    "ScaleByAltLoRAState",
    "altlora",
    "altlora_active",
    "altlora_plus",
    "scale_by_altlora",
]

Order = Literal["b_first", "a_first"]
_ORDERS = ("b_first", "a_first")
_A_FIRST, _B_FIRST, _JOINT = 0, 1, 2


class ScaleByAltLoRAState(NamedTuple):
    """State of :func:`scale_by_altlora`.

    Attributes:
      count: number of ``update`` calls so far (int32).
      schedule: which factor each call moves: 0 = a on even calls, 1 = b on even calls,
        2 = both every call (``joint``). Read it through :func:`altlora_active`.
      mu: per pair ``LoRAPair(ma, mb)``, the first moments (factor-shaped).
      nu: per pair ``LoRAPair(va, vb)``, AltLoRA+'s elementwise second moments, or ``None``.
      anchor: per pair ``LoRAPair(a_prev, b_prev)``: ``a`` at the last b-step and ``b`` at the
        last a-step, the subspaces the stored moments are aligned with (Theorem 2).
    """

    count: jax.Array
    schedule: jax.Array
    mu: Any
    nu: Any
    anchor: Any


def _active(count: jax.Array, schedule: jax.Array) -> tuple[jax.Array, jax.Array]:
    even = count % 2 == 0
    joint = schedule == _JOINT
    a_active = joint | jnp.where(schedule == _A_FIRST, even, ~even)
    b_active = joint | jnp.where(schedule == _A_FIRST, ~even, even)
    return a_active, b_active


def altlora_active(opt_state: Any) -> LoRAPair:
    """Which factors the next ``update`` call of an AltLoRA optimizer moves.

    Finds the :class:`ScaleByAltLoRAState` inside ``opt_state`` (an ``altlora`` /
    ``altlora_plus`` state, possibly nested in ``optax.chain``, ``MultiSteps``,
    ``inject_hyperparams`` or ``apply_if_finite``) and returns ``LoRAPair(a, b)`` of boolean
    scalars. A training loop can skip the backward pass through the inactive factor, e.g.
    ``a = jnp.where(active.a, a, jax.lax.stop_gradient(a))`` (the paper's "only backpropagate
    w.r.t. A_t"). The inactive gradient is ignored either way.
    """
    states = [
        s
        for s in jax.tree.leaves(opt_state, is_leaf=lambda x: isinstance(x, ScaleByAltLoRAState))
        if isinstance(s, ScaleByAltLoRAState)
    ]
    if len(states) != 1:
        raise ValueError(f"expected one ScaleByAltLoRAState in opt_state, found {len(states)}")
    a_active, b_active = _active(states[0].count, states[0].schedule)
    return LoRAPair(a_active, b_active)


class _Hyper(NamedTuple):
    b1: Any
    b2: Any
    eps: Any
    weight_decay: Any
    scale: Any
    delta: Any
    relative_delta: Any
    second_moment: bool
    reference_code: bool
    normalize: bool  # AltLoRA+ with normalised Grams (robust start)
    learning_rate: Any  # this call's learning rate (joint mode), else None


def _moment_step(pre, mu, nu, transported, k, hp: _Hyper):
    """Direction and new moments of the active factor from its preconditioned gradient."""
    # Decays in the compute dtype, so (1 − β) and the bias correction (1 − βᵏ) agree exactly.
    b1, b2 = (jnp.asarray(x, pre.dtype) for x in (hp.b1, hp.b2))
    aligned = b1 * transported + (1 - b1) * pre
    k = k.astype(pre.dtype)
    if not hp.second_moment:
        direction = aligned / (1 - b1**k) if hp.reference_code else aligned
        return direction, aligned, None
    nu = b2 * nu + (1 - b2) * jnp.square(pre)
    stored = b1 * mu + (1 - b1) * pre
    m_hat = aligned / (1 - b1**k)
    v_hat = nu if hp.reference_code else nu / (1 - b2**k)
    return m_hat / (jnp.sqrt(v_hat) + linalg.adam_eps(hp.eps, v_hat.dtype)), stored, nu


def _with_decay(direction, param, hp: _Hyper):
    """Weight decay γ: in the step, ``u + γ·param`` (Algorithm 1), or (``reference_code``) as the
    official code applies it after the step to the updated factor:
    ``param − lr·u − lr·γ·(param − lr·u) = param − lr·(u + γ·(param − lr·u))``."""
    if hp.reference_code:
        return direction + hp.weight_decay * (param - hp.learning_rate * direction)
    return direction + hp.weight_decay * param


def _gram_delta(gram, hp: _Hyper):
    """The regulariser of ``gram``: ``δ``, or with normalised Grams ``max(δ, relative_delta·
    tr(gram)/r)`` (:func:`~lowrank_optax.riemannian.relative_gram_delta`)."""
    return relative_gram_delta(gram, hp.delta, hp.relative_delta) if hp.normalize else hp.delta


def _normalization(gram, delta, anchor_gram, hp: _Hyper):
    """Factors of the preconditioned gradient and of the transported moment: ``(1, 1)``, or with
    normalised Grams ``(s, s / s_anchor)`` (a moment of ``s·ĝ`` is moved to the current ``s``)."""
    if not hp.normalize:
        return 1.0, 1.0
    s, s_anchor = gram_scale(gram, delta), gram_scale(anchor_gram, _gram_delta(anchor_gram, hp))
    # A zero anchor (no step of this factor yet) transports nothing: its cross-Gram is zero.
    return s, jnp.where(s_anchor > 0, s / jnp.where(s_anchor > 0, s_anchor, 1.0), 0.0)


def _a_step(g, p, mu, nu, anchor, k, hp: _Hyper):
    gram = linalg.gram_b(p.b)
    delta = _gram_delta(gram, hp)
    pre_factor, moment_factor = _normalization(gram, delta, linalg.gram_b(anchor.b), hp)
    pre = pre_factor * linalg.solve_spd_right(g.a, gram, delta) / hp.scale**2
    transported = moment_factor * linalg.solve_spd_right(mu.a @ (anchor.b @ p.b.T), gram, delta)
    nu_a = None if nu is None else nu.a
    direction, new_mu, new_nu = _moment_step(pre, mu.a, nu_a, transported, k, hp)
    return _with_decay(direction, p.a, hp), new_mu, new_nu


def _b_step(g, a, b, mu, nu, anchor, k, hp: _Hyper):
    gram = linalg.gram_a(a)
    delta = _gram_delta(gram, hp)
    pre_factor, moment_factor = _normalization(gram, delta, linalg.gram_a(anchor.a), hp)
    pre = pre_factor * linalg.solve_spd(gram, g.b, delta) / hp.scale**2
    transported = moment_factor * linalg.solve_spd(gram, (a.T @ anchor.a) @ mu.b, delta)
    nu_b = None if nu is None else nu.b
    direction, new_mu, new_nu = _moment_step(pre, mu.b, nu_b, transported, k, hp)
    return _with_decay(direction, b, hp), new_mu, new_nu


def _like(new, old):
    return None if new is None else new.astype(old.dtype)


def _joint_update(g, p, mu, nu, anchor, k, hp: _Hyper):
    """Both factors from one gradient: a first, then b preconditioned with the updated a."""
    u_a, mu_a, nu_a = _a_step(g, p, mu, nu, anchor, k, hp)
    a_next = p.a - hp.learning_rate * u_a
    u_b, mu_b, nu_b = _b_step(g, a_next, p.b, mu, nu, anchor, k, hp)
    new_nu = None if nu is None else LoRAPair(nu_a, nu_b)
    return LoRAPair(u_a, u_b), LoRAPair(mu_a, mu_b), new_nu, LoRAPair(a_next, p.b)


def _a_half_step(g, p, mu, nu, anchor, k, hp: _Hyper):
    """The a-step; b's update is ``0·∇b`` and its moments stay; the anchor records ``b``."""
    u_a, mu_a, nu_a = _a_step(g, p, mu, nu, anchor, k, hp)
    new_nu = None if nu is None else LoRAPair(_like(nu_a, nu.a), nu.b)
    return (LoRAPair(_like(u_a, g.a), 0.0 * g.b), LoRAPair(_like(mu_a, mu.a), mu.b), new_nu,
            LoRAPair(anchor.a, p.b.astype(anchor.b.dtype)))


def _b_half_step(g, p, mu, nu, anchor, k, hp: _Hyper):
    """The b-step; a's update is ``0·∇a`` and its moments stay; the anchor records ``a``."""
    u_b, mu_b, nu_b = _b_step(g, p.a, p.b, mu, nu, anchor, k, hp)
    new_nu = None if nu is None else LoRAPair(nu.a, _like(nu_b, nu.b))
    return (LoRAPair(0.0 * g.a, _like(u_b, g.b)), LoRAPair(mu.a, _like(mu_b, mu.b)), new_nu,
            LoRAPair(p.a.astype(anchor.a.dtype), anchor.b))


def _pair_update(g, p, mu, nu, anchor, *, a_active, k, hp: _Hyper):
    """``(updates, mu, nu, anchor)`` of one pair: both factors (joint mode), else the half-step
    of the active factor (``a_active`` is concrete here, see ``update_fn``)."""
    if hp.learning_rate is not None:
        return _joint_update(g, p, mu, nu, anchor, k, hp)
    return (_a_half_step if a_active else _b_half_step)(g, p, mu, nu, anchor, k, hp)


def _zeros_pair(p: LoRAPair) -> LoRAPair:
    return LoRAPair(jnp.zeros_like(p.a), jnp.zeros_like(p.b))


def scale_by_altlora(
    b1: float = 0.9,
    weight_decay: float = 0.0,
    *,
    order: Order = "b_first",
    scale: float = 1.0,
    delta: float = 1e-6,
    second_moment: bool = False,
    b2: float = 0.999,
    eps: float = 1e-8,
    joint: bool = False,
    reference_code: bool = False,
    normalize_grams: bool = True,
    relative_delta: float = ROBUST_RELATIVE_DELTA,
    learning_rate: optax.ScalarOrSchedule | None = None,
    keys: PairKeys = DEFAULT_KEYS,
) -> optax.GradientTransformation:
    """AltLoRA direction: alternating scaled gradients with subspace-aligned momentum.

    See the module docstring for the update rule. Every call uses the fresh gradient it is
    given for the active factor (Algorithm 1: one backward pass per half-step); momentum is
    never bias-corrected (Algorithm 1), except in AltLoRA+ (below).

    **AltLoRA+** (``second_moment=True``), as the official code defines it (the paper's
    Algorithm 2 is not available), per active factor with ``ĝ`` and ``m̃`` as above::

        v ← β2 v + (1 − β2) ĝ ⊙ ĝ            (elementwise, not transported)
        n = β1 m̃ + (1 − β1) ĝ                 (transported momentum, numerator only)
        u = (n / (1 − β1ᵏ)) / (√(v / (1 − β2ᵏ)) + eps) + γ·param
        m ← β1 m + (1 − β1) ĝ                 (the STORED momentum is the untransported EMA)

    Decision: both moments are bias-corrected as in ``optax.adam``, with ``k`` the number of
    updates the factor has received (``⌈t/2⌉``; ``t`` in joint mode). The official code corrects
    only the numerator (with the global step) and leaves ``v`` uncorrected, which makes the first
    steps ``1/√(1−β2) ≈ 32×`` larger than Adam's; we keep Adam's calibrated step size. AltLoRA+
    is not transformation invariant (paper §5.2): ``v`` lives in fixed coordinates.

    **Robust start** (AltLoRA+, ``normalize_grams=True``, the default): ``ĝ`` is multiplied by
    the mean eigenvalue ``s = tr(Gram)/r + δ`` of the Gram it inverts (``s_b`` on a-steps,
    ``s_a`` on b-steps), and ``m̃`` by ``s / s_anchor`` (the stored moment is one of ``s·ĝ`` at
    the anchor). As in :func:`lowrank_optax.scaled_adamw` this removes the ``1/‖b‖²`` size of
    the preconditioner, which from ``b = 0`` under a warm-up fills ``v`` with a transient
    hundreds of times larger than the later ``ĝa`` (issue-12 toy: relative loss 0.44 without,
    see ``docs/methods/altlora.md``); the elementwise Adam ratio removes constant factors. Each
    Gram is also regularised relative to its size, by ``max(δ, relative_delta·tr(Gram)/r)``
    (:func:`~lowrank_optax.riemannian.relative_gram_delta`): with more adapter rank than the fit
    needs, an absolute ``δ`` inverts the Gram's near-null directions and the run stalls or
    rises (rank-1 target, r = 4: relative loss 5.5e-4 at step 100, 1.8e-2 at step 800).
    ``normalize_grams=False`` is the official rule. AltLoRA (no second
    moment) never normalises: there the Gram's scale is the step size.

    **Joint mode** (``joint=True``) reproduces the official code's default (``alt=False``):
    both factors move on every call from ONE gradient; a first, then b preconditioned with the
    updated ``a₊ = a − lr·u_a`` (the b-gradient stays the one at ``W_t``). It needs
    ``learning_rate`` to form ``a₊``. By default the moments, bias correction and weight decay
    are Algorithm 1's (and AltLoRA+'s as decided above).

    **Reference-code mode** (``reference_code=True``, with ``joint=True``) reproduces the
    official code's step exactly, to reproduce published numbers: momentum divided by
    ``1 − β1ᵗ`` (global step ``t``; AltLoRA too), AltLoRA+'s ``v`` not bias-corrected, and weight
    decay applied after the step to the updated factor (``a₊`` includes it). Also pass
    ``scale=1`` (the code has no ``1/s²``) and ``delta=1e-5`` (its ``reg``); the AltLoRA runs
    used ``eps=1e-4`` for AltLoRA+. The code's block alternation (``alt=True``) is not provided.

    Args:
      b1: momentum coefficient β1 in ``[0, 1)``, default 0.9 (paper). ``b1=0`` gives
        momentum-free AltLoRA.
      weight_decay: γ ``≥ 0``, applied to the active factor only (so the inactive update stays
        exactly zero); default 0 (paper's experiments).
      order: ``"b_first"`` (default; paper Table 5: better, and from ``b = 0`` an a-step cannot
        descend) or ``"a_first"`` (Algorithm 1 as written, ``t mod 2 = 0`` updates A).
      scale: the LoRA scale ``s > 0`` of ``delta_W = s·a @ b``; the ``1/s²`` of eq. (8) makes the
        update of ``W`` independent of ``alpha``. Default 1.0.
      delta: ``δ ≥ 0`` regularising both r×r Grams (the paper's Corollary 1 replaces the full-rank
        assumption by a Frobenius penalty; the official code uses ``reg = 1e-5``). Default
        ``1e-6`` like ``scaled_sgd``: it keeps ``b = 0`` finite (the a-step there is
        ``0·δ⁻¹ = 0``). ``δ = 0`` makes AltLoRA exactly GL(r)-invariant for full-rank factors.
      second_moment: AltLoRA+ (see above).
      b2: AltLoRA+'s second-moment decay in ``[0, 1)``, default 0.999 (paper's setting).
      eps: AltLoRA+'s denominator constant ``≥ 0``, default 1e-8 (Adam's; the official runs
        use 1e-4).
      joint: both factors per call (official code default), see above.
      reference_code: the official code's bias correction and weight decay (needs ``joint``);
        it implies the official, un-normalised Grams.
      normalize_grams: AltLoRA+'s robust start (above); default True. Ignored without
        ``second_moment``.
      relative_delta: the robust start's Gram regulariser relative to the mean eigenvalue
        (``≥ 0``), default 1e-2; used only with ``normalize_grams``.
      learning_rate: float or schedule; required by ``joint=True`` only.
      keys: mapping keys of the factors in the tree.

    Returns:
      An ``optax.GradientTransformation`` whose ``update`` needs ``params``.
    """
    check_hyperparams("scale_by_altlora", b1=b1, weight_decay=weight_decay, scale=scale,
                      delta=delta, b2=b2, eps=eps, learning_rate=learning_rate,
                      second_moment=second_moment, joint=joint, reference_code=reference_code,
                      normalize_grams=normalize_grams, relative_delta=relative_delta)
    check_choice("scale_by_altlora", "order", order, _ORDERS)
    if joint and learning_rate is None:
        raise ValueError("scale_by_altlora(joint=True) needs learning_rate to form the new a")
    if reference_code and not joint:
        raise ValueError("reference_code=True reproduces the official code's default step, "
                         "which moves both factors per call: pass joint=True")
    schedule = _JOINT if joint else (_B_FIRST if order == "b_first" else _A_FIRST)

    def init_fn(params):
        mu = init_pairs(_zeros_pair, params, keys)
        return ScaleByAltLoRAState(
            count=jnp.zeros([], jnp.int32),
            schedule=jnp.asarray(schedule, jnp.int32),
            mu=mu,
            nu=init_pairs(_zeros_pair, params, keys) if second_moment else None,
            anchor=init_pairs(_zeros_pair, params, keys),
        )

    def update_fn(updates, state, params=None):
        a_active, _ = _active(state.count, state.schedule)
        k = state.count + 1 if joint else state.count // 2 + 1
        joint_lr = None
        if joint:
            joint_lr = learning_rate(state.count) if callable(learning_rate) else learning_rate
        normalize = normalize_grams and second_moment and not reference_code
        hp = _Hyper(b1, b2, eps, weight_decay, scale, delta, relative_delta, second_moment,
                    reference_code, normalize, joint_lr)

        moment_trees = (state.mu, state.nu) if second_moment else (state.mu,)

        def over_pairs(active):
            def fn(g, p, mu, *rest):
                nu, anchor = rest if second_moment else (None, rest[0])
                updates, new_mu, new_nu, new_anchor = _pair_update(g, p, mu, nu, anchor,
                                                                   a_active=active, k=k, hp=hp)
                return (updates, new_mu, new_anchor) if nu is None else (
                    updates, new_mu, new_nu, new_anchor)
            return map_pairs(fn, updates, params, *moment_trees, state.anchor, keys=keys)

        # One conditional around the whole tree, not one per pair: each branch then stacks only
        # the inputs its half-step reads and passes the other factor's leaves through unstacked.
        # The per-pair conditional needed every input and output stacked, and XLA:CPU's
        # per-call temporary buffer grew past glibc's mmap threshold (32 MiB), which costs a
        # page fault per 4 KiB on every call (47 ms against 23 ms at 24 layers q,v, r = 16).
        # A concrete parity (eager calls) takes a Python branch: an eager ``cond`` would
        # compile its fresh branches on every call.
        if joint or not isinstance(a_active, jax.core.Tracer):
            new_updates, *new_trees = over_pairs(a_active)
        else:
            new_updates, *new_trees = jax.lax.cond(a_active, lambda: over_pairs(True),
                                                   lambda: over_pairs(False))
        new_nu = new_trees[1] if second_moment else None
        return new_updates, ScaleByAltLoRAState(
            count=optax.safe_increment(state.count),
            schedule=state.schedule,
            mu=new_trees[0],
            nu=new_nu,
            anchor=new_trees[-1],
        )

    return with_state_check("scale_by_altlora",
                            optax.GradientTransformation(abstract_safe_init(init_fn), update_fn),
                            keys)


def altlora(
    learning_rate: optax.ScalarOrSchedule,
    b1: float = 0.9,
    weight_decay: float = 0.0,
    *,
    order: Order = "b_first",
    scale: float = 1.0,
    delta: float = 1e-6,
    joint: bool = False,
    reference_code: bool = False,
    cross_term_ratio: float | None = None,
    keys: PairKeys = DEFAULT_KEYS,
) -> optax.GradientTransformation:
    """AltLoRA (Algorithm 1): one factor per ``update`` call, aligned momentum, no bias correction.

    ``a ← a − lr·(ma + γ a)`` on a-steps, ``b ← b − lr·(mb + γ b)`` on b-steps (see
    :func:`scale_by_altlora`; weight decay is part of the direction because it must not touch
    the inactive factor). Feed a fresh gradient to every call; :func:`altlora_active` tells the
    training loop which factor the call moves.

    Args:
      learning_rate: a float ``≥ 0`` or an ``optax.Schedule`` (η).
      b1: momentum coefficient in ``[0, 1)``, default 0.9.
      weight_decay: γ ``≥ 0``, default 0.
      order: ``"b_first"`` (default) or ``"a_first"``.
      scale: LoRA scale ``s > 0`` (default 1.0), see :func:`scale_by_altlora`.
      delta: Gram regulariser ``≥ 0``, default 1e-6.
      joint: both factors per call as in the official code (see :func:`scale_by_altlora`).
      reference_code: with ``joint``, the official code's exact step (bias correction, weight
        decay after the step; see :func:`scale_by_altlora`).
      cross_term_ratio: ``ρ > 0`` of :func:`~lowrank_optax.clip_cross_term`, applied to the
        step after the learning rate, or ``None`` (default, the method's own step): alternating
        steps move one factor and have no cross term; with ``joint`` no hard start of the test
        suite needs it, and it costs two 2r×2r Grams per pair.
      keys: mapping keys of the factors in the tree.

    Example::

      >>> import jax.numpy as jnp, optax, lowrank_optax as lro
      >>> params = {"lora_a": jnp.ones((4, 2)), "lora_b": jnp.zeros((2, 3))}
      >>> tx = lro.altlora(0.1)
      >>> state = tx.init(params)
      >>> grads = {"lora_a": jnp.zeros((4, 2)), "lora_b": jnp.ones((2, 3))}
      >>> updates, state = tx.update(grads, state, params)   # a b-step: updates["lora_a"] == 0
      >>> params = optax.apply_updates(params, updates)
    """
    check_hyperparams("altlora", learning_rate=learning_rate, b1=b1, weight_decay=weight_decay,
                      scale=scale, delta=delta, joint=joint, reference_code=reference_code,
                      cross_term_ratio=cross_term_ratio)
    check_choice("altlora", "order", order, _ORDERS)
    return with_state_check("altlora", optax.chain(
        scale_by_altlora(b1, weight_decay, order=order, scale=scale, delta=delta, joint=joint,
                         reference_code=reference_code, learning_rate=learning_rate, keys=keys),
        optax.scale_by_learning_rate(learning_rate),
        maybe_clip_cross_term(cross_term_ratio, keys),
    ), keys)


def altlora_plus(
    learning_rate: optax.ScalarOrSchedule,
    b1: float = 0.9,
    b2: float = 0.999,
    eps: float = 1e-8,
    weight_decay: float = 0.0,
    *,
    order: Order = "b_first",
    scale: float = 1.0,
    delta: float = 1e-6,
    joint: bool = True,
    reference_code: bool = False,
    normalize_grams: bool = True,
    relative_delta: float = ROBUST_RELATIVE_DELTA,
    cross_term_ratio: float | None = None,
    keys: PairKeys = DEFAULT_KEYS,
) -> optax.GradientTransformation:
    """AltLoRA+: AltLoRA with an elementwise second moment (official code's rule).

    See :func:`scale_by_altlora` (``second_moment=True``) for the rule, the bias-correction
    decision and the robust start (``normalize_grams``, default True; False is the official
    rule). Not transformation invariant.

    Decision: both factors move on every call by default (``joint=True``, the official code's
    default ``alt=False``), so ``altlora_plus`` is a drop-in optimizer: one gradient per call,
    each factor updated every step. ``joint=False`` is the paper's alternation (one factor per
    call, a fresh gradient each): at equal calls each factor gets half the updates (issue-12
    toy under warm-up, 200 calls: relative loss 2.9e-4 alternating, 3.4e-8 joint, AdamW
    6.7e-8).

    Args:
      learning_rate: a float ``≥ 0`` or an ``optax.Schedule``.
      b1, b2, eps: moment decays in ``[0, 1)`` and denominator constant ``≥ 0`` (defaults as
        ``optax.adam``).
      weight_decay: γ ``≥ 0`` on the active factor, default 0.
      joint: both factors per call (default True, see above); False alternates.
      cross_term_ratio: ``ρ > 0`` of :func:`~lowrank_optax.clip_cross_term`, applied to the
        step after the learning rate, or ``None`` (default, the method's own step): no hard
        start of the test suite needs it here, and it costs two 2r×2r Grams per pair.
      order, scale, delta, reference_code, keys: as :func:`altlora` (``order`` only matters
        with ``joint=False``).
      normalize_grams: the robust start (see :func:`scale_by_altlora`); default True.
      relative_delta: the robust start's relative Gram regulariser (see
        :func:`scale_by_altlora`), default 1e-2.
    """
    check_hyperparams("altlora_plus", learning_rate=learning_rate, b1=b1, b2=b2, eps=eps,
                      weight_decay=weight_decay, scale=scale, delta=delta, joint=joint,
                      reference_code=reference_code, normalize_grams=normalize_grams,
                      relative_delta=relative_delta, cross_term_ratio=cross_term_ratio)
    check_choice("altlora_plus", "order", order, _ORDERS)
    return with_state_check("altlora_plus", optax.chain(
        scale_by_altlora(b1, weight_decay, order=order, scale=scale, delta=delta,
                         second_moment=True, b2=b2, eps=eps, joint=joint,
                         reference_code=reference_code, normalize_grams=normalize_grams,
                         relative_delta=relative_delta, learning_rate=learning_rate, keys=keys),
        optax.scale_by_learning_rate(learning_rate),
        maybe_clip_cross_term(cross_term_ratio, keys),
    ), keys)
