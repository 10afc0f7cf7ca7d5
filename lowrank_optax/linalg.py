"""Small dense kernels shared by every method: Gram matrices, regularised SPD solves, Sylvester
equations with SPD(-similar) coefficients, and tangent-space projections.

All functions accept leading batch axes (``...``) and are written for the library's orientation
``delta_W = a @ b`` with ``a: (..., m, r)`` and ``b: (..., r, n)``. r×r systems are symmetric and
solved by Cholesky or in an eigenbasis, never by forming an inverse and multiplying.

Contractions over ``m`` or ``n`` are plain ``einsum``s: when a factor is sharded along that axis
the contraction becomes a local product followed by a reduction, which XLA inserts.
"""

from __future__ import annotations

import jax
import jax.numpy as jnp
from jax.scipy.linalg import cho_factor, cho_solve

__all__ = [
    "gram_a",
    "gram_b",
    "mT",
    "project_tangent",
    "qr",
    "regularize",
    "solve_spd",
    "solve_spd_right",
    "solve_sylvester_gram_product",
    "solve_sylvester_spd",
    "tangent_from_factor_grads",
]


def mT(x: jax.Array) -> jax.Array:
    """Swaps the last two axes."""
    return jnp.swapaxes(x, -1, -2)


def gram_a(a: jax.Array) -> jax.Array:
    """``aᵀ a``, shape ``(..., r, r)``, for ``a: (..., m, r)`` (the paper's ``A Aᵀ``)."""
    return jnp.einsum("...mr,...ms->...rs", a, a)


def gram_b(b: jax.Array) -> jax.Array:
    """``b bᵀ``, shape ``(..., r, r)``, for ``b: (..., r, n)`` (the paper's ``Bᵀ B``)."""
    return jnp.einsum("...rn,...sn->...rs", b, b)


def qr(x: jax.Array) -> tuple[jax.Array, jax.Array]:
    """Thin QR factorisation ``x = q @ r`` (``jnp.linalg.qr``), also on ``Explicit`` meshes.

    In jax 0.10 ``jnp.linalg.qr`` rejects a batch axis sharded on a mesh with ``Explicit`` axes
    (an internal ``select`` gets an unsharded mask). There the factorisation runs with the mesh
    axes made ``Auto``; ``q`` keeps the sharding of ``x`` and ``r`` its batch axes' sharding.
    """
    if not jax.sharding.get_abstract_mesh().explicit_axes:
        return tuple(jnp.linalg.qr(x))
    spec = jax.typeof(x).sharding.spec
    spec = (*spec, *(None,) * (x.ndim - len(spec)))
    r_spec = jax.sharding.PartitionSpec(*spec[:-2], None, None)
    factor = jax.sharding.auto_axes(lambda y: tuple(jnp.linalg.qr(y)),
                                    out_sharding=(jax.sharding.PartitionSpec(*spec), r_spec))
    return factor(x)


def regularize(s: jax.Array, delta: float | jax.Array) -> jax.Array:
    """``s + delta * I`` for square ``s`` (batch axes allowed)."""
    return s + delta * jnp.eye(s.shape[-1], dtype=s.dtype)


def solve_spd(s: jax.Array, rhs: jax.Array, delta: float | jax.Array = 0.0) -> jax.Array:
    """``(s + delta I)⁻¹ rhs`` by Cholesky, for symmetric positive (semi)definite ``s``.

    ``rhs`` has shape ``(..., r, k)``. With ``delta = 0`` a singular ``s`` gives non-finite
    results: pass ``delta > 0`` where ``s`` can be rank deficient.
    """
    factor = cho_factor(regularize(s, delta), lower=True)
    return cho_solve(factor, rhs)


def solve_spd_right(lhs: jax.Array, s: jax.Array, delta: float | jax.Array = 0.0) -> jax.Array:
    """``lhs (s + delta I)⁻¹`` for symmetric ``s``; ``lhs`` has shape ``(..., k, r)``."""
    return mT(solve_spd(s, mT(lhs), delta))


def solve_sylvester_spd(p: jax.Array, q: jax.Array, c: jax.Array) -> jax.Array:
    """Solves ``p X + X q = c`` for symmetric positive definite ``p`` (r×r) and ``q`` (k×k).

    Closed form in the eigenbases ``p = U diag(λ) Uᵀ``, ``q = V diag(μ) Vᵀ``:
    ``X = U [(Uᵀ c V)_ij / (λ_i + μ_j)] Vᵀ``. Unique whenever every ``λ_i + μ_j ≠ 0``. Pairs of
    eigenvalues whose sum vanishes (both matrices singular, e.g. zero factors) get a zero
    component, the minimum-norm solution.
    """
    lam, u = jnp.linalg.eigh(p)
    mu, v = jnp.linalg.eigh(q)
    denom = lam[..., :, None] + mu[..., None, :]
    coeffs = mT(u) @ c @ v
    safe = jnp.where(denom > 0, denom, 1.0)
    return u @ jnp.where(denom > 0, coeffs / safe, 0.0) @ mT(v)


def solve_sylvester_gram_product(ga: jax.Array, gb: jax.Array, c: jax.Array) -> jax.Array:
    """Solves ``S K + K S = c`` for ``S = ga @ gb``, the product of two SPD r×r matrices.

    This is the Sylvester equation (9) of LoRA-S (``ga = MᵀM``, ``gb = NᵀN``). ``S`` is not
    symmetric but similar to the SPD matrix ``H = ga^{1/2} gb ga^{1/2} = U diag(λ) Uᵀ`` via
    ``S = T diag(λ) T⁻¹`` with ``T = ga^{1/2} U``, ``T⁻¹ = Uᵀ ga^{-1/2}``. In that basis the
    equation is diagonal: ``K = T [(T⁻¹ c T)_ij / (λ_i + λ_j)] T⁻¹``. ``ga`` must be
    positive definite (regularise it for rank-deficient factors).
    """
    w, e = jnp.linalg.eigh(ga)
    w = jnp.maximum(w, jnp.finfo(w.dtype).tiny)
    sqrt_ga = (e * jnp.sqrt(w)[..., None, :]) @ mT(e)
    inv_sqrt_ga = (e / jnp.sqrt(w)[..., None, :]) @ mT(e)
    lam, u = jnp.linalg.eigh(sqrt_ga @ gb @ sqrt_ga)
    t = sqrt_ga @ u
    t_inv = mT(u) @ inv_sqrt_ga
    denom = lam[..., :, None] + lam[..., None, :]
    coeffs = t_inv @ c @ t
    safe = jnp.where(denom > 0, denom, 1.0)
    return t @ jnp.where(denom > 0, coeffs / safe, 0.0) @ t_inv


def project_tangent(
    a: jax.Array, b: jax.Array, x: jax.Array, delta: float | jax.Array = 0.0
) -> jax.Array:
    """Orthogonal projection of ``x: (..., m, n)`` onto the tangent space at ``a @ b``.

    ``P_T(X) = P_a X + X P_b − P_a X P_b`` with the column-space projector
    ``P_a = a (aᵀa + δI)⁻¹ aᵀ`` and the row-space projector ``P_b = bᵀ (b bᵀ + δI)⁻¹ b``
    (LoRA-S App. A.8: ``UUᵀX + XVVᵀ − UUᵀXVVᵀ``). ``δ > 0`` keeps rank-deficient factors finite;
    a zero ``b`` then projects onto the column space of ``a`` only.
    """
    ax = solve_spd(gram_a(a), mT(a) @ x, delta)  # (aᵀa)⁻¹ aᵀ X
    pa_x = a @ ax
    xb = solve_spd_right(x @ mT(b), gram_b(b), delta)  # X bᵀ (b bᵀ)⁻¹
    x_pb = xb @ b
    pa_x_pb = a @ solve_spd_right(ax @ mT(b), gram_b(b), delta) @ b
    return pa_x + x_pb - pa_x_pb


def tangent_from_factor_grads(
    a: jax.Array,
    b: jax.Array,
    grad_a: jax.Array,
    grad_b: jax.Array,
    scale: float | jax.Array = 1.0,
    delta: float | jax.Array = 0.0,
) -> jax.Array:
    """Recovers ``P_T(G)``, the tangent projection of ``G = ∂L/∂W``, from the factor gradients.

    With ``W = W0 + scale·a b`` the factor gradients are ``grad_a = scale·G bᵀ`` and
    ``grad_b = scale·aᵀ G``, which determine exactly the products ``G bᵀ`` and ``aᵀ G``; these
    fix ``P_T(G)`` (LoRA-S eq. (12), App. A.8):

        P_T(G) = [a (aᵀa)⁻¹ grad_b + grad_a (b bᵀ)⁻¹ b − a (aᵀa)⁻¹ grad_b bᵀ (b bᵀ)⁻¹ b] / scale

    Inverses are ``(· + δI)⁻¹`` Cholesky solves; the result is ``(..., m, n)``.
    """
    ga_inv_gb = solve_spd(gram_a(a), grad_b, delta)  # (aᵀa)⁻¹ aᵀG·s
    pa_g = a @ ga_inv_gb
    g_pb = solve_spd_right(grad_a, gram_b(b), delta) @ b
    pa_g_pb = a @ solve_spd_right(ga_inv_gb @ mT(b), gram_b(b), delta) @ b
    return (pa_g + g_pb - pa_g_pb) / scale
