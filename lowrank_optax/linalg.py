"""Small dense kernels shared by every method: Gram matrices, the regulariser rule, batched
Cholesky solves, symmetric eigendecomposition, thin QR, pseudo-inverse, Sylvester equations with
SPD(-similar) coefficients, and tangent-space projections.

All functions accept leading batch axes (``...``) and are written for the library's orientation
``delta_W = a @ b`` with ``a: (..., m, r)`` and ``b: (..., r, n)``. r×r systems are symmetric and
solved by Cholesky or in an eigenbasis.

Every factorisation here is plain batched JAX (loops over the r columns or over Jacobi rotation
rounds, each step vectorised over the batch and the wide right-hand side), not ``jnp.linalg``: on
XLA:CPU the LAPACK custom calls that ``jnp.linalg`` lowers to deadlock intermittently when
several of them run inside one jitted function (two batched ``eigh`` at r = 64 suffice). No
kernel here lowers to a custom call. The price on CPU: as fast as LAPACK at r = 4, 2–4 times
slower at r = 16 and up to 14 times (``eigh``) at r = 64, measured kernel by kernel with
``benchmarks/kernels.py`` (docs: "The r × r kernels against jnp.linalg"); not measured on GPU.

Regularisers follow one rule, :func:`damping`: the user's ``δ``, floored relative to the Gram it
regularises and by an absolute floor, so that a rank-deficient Gram never gives a non-finite
solve in float32. A pivot or eigenvalue below ``SINGULAR_LEVEL·eps·tr(S)/r`` counts as singular
(raised to that level, or a zero component), so rounding noise in a singular direction is
damped instead of amplified (docs: "Regularisers and singular systems" in conventions).

Contractions over ``m`` or ``n`` are plain ``einsum``s: when a factor is sharded along that axis
the contraction becomes a local product followed by a reduction, which XLA inserts.
"""

from __future__ import annotations

import functools

import jax
import jax.numpy as jnp

__all__ = [
    "adam_eps",
    "cholesky",
    "damping",
    "eigh",
    "eigvalsh",
    "floor_eigenvalues",
    "floored_eigenpairs",
    "gram_a",
    "gram_b",
    "mT",
    "mean_eigenvalue",
    "pinv",
    "project_tangent",
    "qr",
    "regularize",
    "solve_floored",
    "solve_floored_right",
    "solve_spd",
    "solve_spd_right",
    "solve_sylvester_gram_product",
    "solve_sylvester_spd",
    "square_column_sums",
    "square_row_sums",
    "tangent_factors",
    "tangent_from_factor_grads",
]

#: Relative floor of :func:`damping`, in units of the compute dtype's machine epsilon times the
#: Gram's mean eigenvalue ``tr(S)/r`` (between ``λ_max / r`` and ``λ_max``; orthogonally
#: invariant): the size of the rounding errors of a Gram computed in that dtype, so a shift float
#: arithmetic resolves; small enough to cost a well-conditioned solve no more accuracy than the
#: rounding itself.
RELATIVE_FLOOR = 4.0
#: Relative level, in the same units, below which a pivot or eigenvalue of a Gram is treated as
#: singular: raised to this level by :func:`cholesky`, a zero component in the eigenbasis
#: solves. 512·eps is 6.1e-5 in float32 (a Gram of condition up to 1.6e4 is left exact) and 1.1e-13
#: in float64. Rounding noise (~eps) in a singular direction then gets a factor of at most
#: ~1/512; with the ``4·eps`` floor alone it was divided by a pivot of its own size and
#: rank-deficient factors diverged after a few steps in ``adams``, ``lracs`` and
#: ``sylvester_lift``.
SINGULAR_LEVEL = 512.0
#: Maximum number of Jacobi sweeps (quadratic convergence: float32 needs ~5–7 for r ≤ 64).
_MAX_SWEEPS = 20

def _compiled_once(fn=None, **jit_kwargs):
    """``fn`` jitted, so that eager calls compile its loops once per shape.

    ``fn`` takes a batch of r×r (or r-vector) operands whose batch axes lead, and returns arrays
    with the same batch axes. On a mesh with ``Explicit`` axes its loops run with the mesh axes
    made ``Auto`` (a loop carry must keep one sharding type, and a fresh identity or zero carry
    has none), and every output comes back sharded over the batch axes as the first operand."""
    if fn is None:
        return functools.partial(_compiled_once, **jit_kwargs)
    jitted = jax.jit(fn, **jit_kwargs)

    @functools.wraps(fn)
    def call(x, *args, **kwargs):
        if not jax.sharding.get_abstract_mesh().explicit_axes:
            return jitted(x, *args, **kwargs)
        batch_spec = jax.sharding.PartitionSpec(*tuple(jax.typeof(x).sharding.spec)[: x.ndim - 2])
        bound = functools.partial(jitted, **kwargs)
        return jax.sharding.auto_axes(bound, out_sharding=batch_spec)(x, *args)

    return call


def mT(x: jax.Array) -> jax.Array:
    """Swaps the last two axes."""
    return jnp.swapaxes(x, -1, -2)


def gram_a(a: jax.Array) -> jax.Array:
    """``aᵀ a``, shape ``(..., r, r)``, for ``a: (..., m, r)`` (the paper's ``A Aᵀ``)."""
    return jnp.einsum("...mr,...ms->...rs", a, a)


def gram_b(b: jax.Array) -> jax.Array:
    """``b bᵀ``, shape ``(..., r, r)``, for ``b: (..., r, n)`` (the paper's ``Bᵀ B``)."""
    return jnp.einsum("...rn,...sn->...rs", b, b)


def mean_eigenvalue(s: jax.Array) -> jax.Array:
    """``|tr(s)|/r`` of square ``s`` (batch axes allowed), shaped ``(..., 1, 1)``: the scale of a
    Gram, unchanged by an orthogonal change of basis."""
    return jnp.abs(jnp.trace(s, axis1=-2, axis2=-1))[..., None, None] / s.shape[-1]


def max_abs_scale(*arrays: jax.Array) -> jax.Array:
    """``max|x|`` over all entries of the arrays, or 1 if they are all zero: a scalar to divide
    them by before forming squares that would under- or overflow (call it per pair)."""
    largest = functools.reduce(jnp.maximum, [jnp.max(jnp.abs(x)) for x in arrays])
    return jnp.where(largest > 0, largest, 1.0).astype(arrays[0].dtype)


def _eps(dtype) -> jax.Array:
    return jnp.asarray(jnp.finfo(dtype).eps, dtype)


def adam_eps(eps: float | jax.Array, dtype: jnp.dtype) -> float | jax.Array:
    """Adam's ``eps`` (added to ``√v̂``) raised to ``√tiny``, the square root of the smallest
    normal number of ``dtype`` (1.1e-19 in float32 and bfloat16).

    So ``m̂ / (√v̂ + eps)`` is ``0``, not ``0/0``, for an entry whose gradient has been zero at
    every step (every ``a`` entry from the LoRA start ``b = 0``), and at most about 1 for one
    whose gradient's square underflowed (``|g| < √tiny``). That matters for ``eps = 0`` (an
    allowed value) and for ``eps = 1e-8`` that ``optax.inject_hyperparams`` rounded to 0 by
    casting it to float16 params' dtype. ``tiny`` itself is too close to the edge: under ``jit``,
    XLA:CPU divided 0 by ``1e-38`` into NaN. A larger ``eps`` is returned unchanged (a Python
    number stays one: no dtype promotion).

    Args:
      eps: the user's ``eps`` (a number, or an array under ``optax.inject_hyperparams``).
      dtype: the dtype the division runs in.
    """
    floor = float(jnp.finfo(dtype).tiny) ** 0.5
    if isinstance(eps, jax.Array):
        return jnp.maximum(eps.astype(dtype), floor)
    return max(float(eps), floor)


def _floor(s: jax.Array, relative: float = RELATIVE_FLOOR) -> jax.Array:
    """``max(relative·eps·tr(s)/r, eps²)``, shape ``(..., 1, 1)``: by default the Gram-relative
    and absolute floors of :func:`damping`; with ``SINGULAR_LEVEL``, the singular level."""
    eps = _eps(s.dtype)
    return jnp.maximum(relative * eps * mean_eigenvalue(s), eps * eps)


def damping(gram: jax.Array, delta: float | jax.Array = 0.0) -> jax.Array:
    """The regulariser actually added to ``gram``: ``max(δ, 4·eps·tr(gram)/r, eps²)``.

    ``δ`` is the user's (the papers') absolute regulariser and keeps its meaning whenever it is
    above the floors. ``4·eps·tr(gram)/r`` (``eps`` of ``gram``'s dtype: 1.2e-7 in float32)
    is the size of the rounding errors of the Gram itself: a smaller ``δ`` is lost in them
    (LoRA-Pro's ``δ = 1e-8`` on a unit-scale Gram in float32) and a rank-deficient Gram could
    factor into non-finite numbers. ``eps²`` (1.4e-14 in float32) keeps a zero Gram invertible.
    In float64 both floors are ~1e-15 relative, far below every documented ``δ``.

    Returns:
      Shape ``(..., 1, 1)``, broadcastable against ``gram``.
    """
    return jnp.maximum(jnp.asarray(delta, gram.dtype), _floor(gram))


def regularize(s: jax.Array, delta: float | jax.Array = 0.0) -> jax.Array:
    """``s + damping(s, δ) I`` for square symmetric ``s`` (batch axes allowed)."""
    return s + damping(s, delta) * jnp.eye(s.shape[-1], dtype=s.dtype)


def floor_eigenvalues(s: jax.Array, relative: float | jax.Array) -> tuple[jax.Array, jax.Array]:
    """Eigenpairs ``(w, V)`` of symmetric ``s`` (:func:`eigh`) with every eigenvalue raised to
    at least ``relative·tr(s)/r`` (and to the singular level, as :func:`cholesky`'s pivots, so
    that ``w > 0`` even for ``relative = 0``); ``V diag(w) Vᵀ`` is the floored matrix.

    Eigenvalues above the floor are kept, so ``s`` comes back unchanged (to rounding) when its
    smallest eigenvalue is above it; only the directions below it are lifted. Unlike a shift
    ``s + c I``, which moves every eigenvalue, the result differs from ``s`` only in its
    near-null directions. The pairs are returned so that solves with the floored matrix need no
    second factorisation (:func:`solve_sylvester_gram_product` takes them).
    """
    w, e = eigh(s)
    floor = jnp.maximum(relative * mean_eigenvalue(s), _floor(s, SINGULAR_LEVEL))
    return jnp.maximum(w, floor[..., 0]), e


Eigenpairs = tuple[jax.Array, jax.Array]


def floored_eigenpairs(s: jax.Array, relative: float | jax.Array) -> Eigenpairs | None:
    """:func:`floor_eigenvalues` of ``s``, or ``None`` for the literal ``relative = 0`` (no
    eigendecomposition: :func:`solve_floored` then solves with ``s`` by Cholesky)."""
    if isinstance(relative, (int, float)) and relative == 0:
        return None
    return floor_eigenvalues(s, relative)


def solve_floored(s: jax.Array, eig: Eigenpairs | None, rhs: jax.Array,
                  delta: float | jax.Array = 0.0) -> jax.Array:
    """``s⁻¹ rhs`` through ``s``'s floored eigenpairs ``eig = (w, V)`` (``V diag(w)⁻¹ Vᵀ rhs``,
    :func:`floored_eigenpairs`), or by :func:`solve_spd` with ``δ`` when ``eig`` is ``None``."""
    if eig is None:
        return solve_spd(s, rhs, delta)
    w, e = eig
    return e @ ((mT(e) @ rhs) / w[..., :, None])


def solve_floored_right(lhs: jax.Array, s: jax.Array, eig: Eigenpairs | None,
                        delta: float | jax.Array = 0.0) -> jax.Array:
    """``lhs s⁻¹`` (:func:`solve_floored` from the right)."""
    if eig is None:
        return solve_spd_right(lhs, s, delta)
    w, e = eig
    return ((lhs @ e) / w[..., None, :]) @ mT(e)


def _put_column(x: jax.Array, j: jax.Array, column: jax.Array) -> jax.Array:
    mask = jnp.arange(x.shape[-1]) == j
    return jnp.where(mask, column[..., :, None], x)


@_compiled_once
def _cholesky_and_inverse(s: jax.Array) -> tuple[jax.Array, jax.Array]:
    """``(L, L⁻¹)`` of symmetric ``s = L Lᵀ`` in one loop over the columns: step ``j`` computes
    column ``j`` of ``L`` (left-looking, a batched matvec) and then row ``j`` of ``L⁻¹`` (forward
    substitution; row ``j`` of ``L`` is complete). Pivots below the singular level of ``s``
    (``SINGULAR_LEVEL·eps·tr(s)/r``) are raised to it, so a semidefinite or slightly indefinite
    ``s`` gives finite factors and rounding noise in its null space is not amplified."""
    n = s.shape[-1]
    rows = jnp.arange(n)
    eye = jnp.eye(n, dtype=s.dtype)
    pivot_floor = _floor(s, SINGULAR_LEVEL)[..., 0, 0]

    def step(j, carry):
        factor, inv = carry
        row_j = jax.lax.dynamic_index_in_dim(factor, j, axis=-2, keepdims=False)
        v = jax.lax.dynamic_index_in_dim(s, j, axis=-1, keepdims=False)
        v = v - jnp.einsum("...ik,...k->...i", factor, row_j)
        pivot = jnp.sqrt(jnp.maximum(jax.lax.dynamic_index_in_dim(v, j, axis=-1, keepdims=False),
                                     pivot_floor))
        col = jnp.where(rows >= j, v / pivot[..., None], 0.0)
        factor = _put_column(factor, j, col)
        row_j = jnp.where(rows < j, jax.lax.dynamic_index_in_dim(factor, j, axis=-2,
                                                                 keepdims=False), 0.0)
        e_j = jax.lax.dynamic_index_in_dim(eye, j, axis=-2, keepdims=False)
        new = (e_j - jnp.einsum("...k,...kj->...j", row_j, inv)) / pivot[..., None]
        inv = jnp.where((rows == j)[:, None], new[..., None, :], inv)
        return factor, inv

    return jax.lax.fori_loop(0, n, step, (jnp.zeros_like(s), jnp.zeros_like(s)))


def cholesky(s: jax.Array) -> jax.Array:
    """Lower Cholesky factor ``L`` of symmetric ``s`` (``s = L Lᵀ``), column by column.

    Pivots below ``SINGULAR_LEVEL·eps·tr(s)/r`` (6.1e-5 of the mean eigenvalue in float32; a
    Gram of condition ≤ 1.6e4 never has one) are raised to it, so a semidefinite or slightly
    indefinite ``s`` (rounding) gives a finite factor; regularise ``s`` first
    (:func:`regularize`) for a factor of a well-posed system.
    """
    return _cholesky_and_inverse(s)[0]


def solve_spd(s: jax.Array, rhs: jax.Array, delta: float | jax.Array = 0.0) -> jax.Array:
    """``(s + δ' I)⁻¹ rhs`` by Cholesky, for symmetric positive (semi)definite ``s``.

    ``δ' = damping(s, δ)`` (:func:`damping`), so a singular ``s`` gives a finite, damped answer:
    pivots below the singular level (:func:`cholesky`) are raised to it, so ``rhs`` in the null
    space of ``s`` is scaled by at most ``1/(SINGULAR_LEVEL·eps·tr(s)/r)``, and a ``rhs`` in its
    range, as ``aᵀ G`` against ``aᵀ a``, gives an exact solution in which each dependent column
    is resolved against the earlier ones (a basic solution, not always the minimum-norm one).
    ``rhs`` has shape ``(..., r, k)``. The factor's inverse (r×r, forward substitution in the
    same loop) is applied to the wide ``rhs`` as two matrix products. One product with the
    explicit ``L⁻ᵀL⁻¹`` would halve that work (``scaled_sgd`` 2.7× → 2.0× ``optax.adamw`` at 24
    layers, r = 16, on CPU), but against a rank-deficient Gram its ``1/(singular level)``
    entries cancel only to rounding, and ``s x`` no longer reproduces a ``rhs`` in the range
    (``tests/test_linalg.py`` fails).
    """
    inv = _cholesky_and_inverse(regularize(s, delta))[1]
    return mT(inv) @ (inv @ rhs)


def solve_spd_right(lhs: jax.Array, s: jax.Array, delta: float | jax.Array = 0.0) -> jax.Array:
    """``lhs (s + δ' I)⁻¹`` for symmetric ``s`` (:func:`solve_spd`); ``lhs``: ``(..., k, r)``."""
    inv = _cholesky_and_inverse(regularize(s, delta))[1]
    return (lhs @ mT(inv)) @ inv


def _rotation(app: jax.Array, aqq: jax.Array, apq: jax.Array) -> tuple[jax.Array, jax.Array]:
    """``(c, s)`` of the Jacobi rotation that diagonalises ``[[app, apq], [apq, aqq]]``."""
    d = aqq - app
    sign = jnp.where(d >= 0, 1.0, -1.0).astype(d.dtype)
    denom = jnp.abs(d) + jnp.sqrt(d * d + 4.0 * apq * apq)
    t = jnp.where(denom > 0, 2.0 * apq * sign / jnp.where(denom > 0, denom, 1.0), 0.0)
    c = jax.lax.rsqrt(1.0 + t * t)
    return c, t * c


def _rotate(x: jax.Array, c: jax.Array, s: jax.Array, axis: int) -> jax.Array:
    """Rotates the first half of the indices of ``x`` along ``axis`` (-2: rows, -1: columns)
    against the second half, pair ``i`` with ``h + i``: ``x_i ← c x_i − s x_{h+i}``,
    ``x_{h+i} ← s x_i + c x_{h+i}``; ``c``, ``s`` have shape ``(..., h)``."""
    top, bottom = jnp.split(x, 2, axis=axis)
    c, s = (c[..., :, None], s[..., :, None]) if axis == -2 else (c[..., None, :], s[..., None, :])
    return jnp.concatenate([c * top - s * bottom, s * top + c * bottom], axis=axis)


def _next_round(x: jax.Array, axis: int) -> jax.Array:
    """Brent–Luk round-robin step on the index order along ``axis``: pairs are (``i``,
    ``h + i``); index 0 stays, the other ``2h − 1`` move one place round the cycle
    ``1 → … → h−1 → 2h−1 → … → h → 1``. After ``2h − 1`` rounds every index pair has met
    once and the order is back to the start."""
    h = x.shape[axis] // 2

    def part(start, stop):
        return jax.lax.slice_in_dim(x, start, stop, axis=axis)

    if h == 1:
        return x
    return jnp.concatenate(
        [part(0, 1), part(h, h + 1), part(1, h - 1), part(h + 1, 2 * h), part(h - 1, h)],
        axis=axis)


def _sweeps(round_, carry, n: int, tol):
    """Jacobi sweeps of ``n − 1`` rounds each. ``round_(carry)`` rotates every current index
    pair once and returns the new carry and, per batch member, how far the rotated pairs were
    from converged; sweeps stop when a whole sweep's maximum is at most ``tol`` for every batch
    member, or after ``_MAX_SWEEPS``."""

    def one(_, state):
        carry, worst = state
        carry, off = round_(carry)
        return carry, jnp.maximum(worst, off)

    def sweep(state):
        k, carry, worst = state
        carry, worst = jax.lax.fori_loop(0, n - 1, one, (carry, jnp.zeros_like(worst)))
        return k + 1, carry, worst

    def keep_going(state):
        k, _, worst = state
        return (k < _MAX_SWEEPS) & ~jnp.all(worst <= tol)

    worst = jnp.zeros(carry[0].shape[:-2], carry[0].dtype)
    first = sweep((jnp.zeros([], jnp.int32), carry, worst))
    return jax.lax.while_loop(keep_going, sweep, first)[1]


def _pad_even(x: jax.Array) -> jax.Array:
    """Pads ``x`` with a zero row and column when its last axis has odd length (a decoupled
    zero eigenvalue / singular value, which Jacobi never rotates)."""
    if x.shape[-1] % 2 == 0:
        return x
    widths = [(0, 0)] * (x.ndim - 2) + [(0, int(x.shape[-2] == x.shape[-1])), (0, 1)]
    return jnp.pad(x, widths)


def _block_diagonals(x: jax.Array) -> tuple[jax.Array, jax.Array, jax.Array]:
    h = x.shape[-1] // 2
    diag = jnp.diagonal(x, axis1=-2, axis2=-1)
    return diag[..., :h], diag[..., h:], jnp.diagonal(x[..., :h, h:], axis1=-2, axis2=-1)


@_compiled_once(static_argnames="vectors")
def _jacobi_eigh(s: jax.Array, vectors: bool) -> tuple[jax.Array, jax.Array | None]:
    n = s.shape[-1]
    x = _pad_even(0.5 * (s + mT(s)))
    size = x.shape[-1]
    frobenius = jnp.sum(jnp.square(x), axis=(-2, -1))
    scale = jnp.where(frobenius > 0, frobenius, 1.0)

    def round_(carry):
        x, v = carry
        app, aqq, apq = _block_diagonals(x)
        c, sn = _rotation(app, aqq, apq)
        x = _next_round(_next_round(_rotate(_rotate(x, c, sn, -2), c, sn, -1), -2), -1)
        if vectors:
            v = _next_round(_rotate(v, c, sn, -1), -1)
        return (x, v), jnp.max(jnp.square(apq), axis=-1) / scale

    eye = jnp.broadcast_to(jnp.eye(size, dtype=s.dtype), x.shape) if vectors else x[..., :0, :0]
    if size > 1:
        x, v = _sweeps(round_, (x, eye), size, (size * _eps(s.dtype)) ** 2)
    else:
        v = eye
    w = jnp.diagonal(x, axis1=-2, axis2=-1)[..., :n]
    order = jnp.argsort(w, axis=-1)
    w = jnp.take_along_axis(w, order, axis=-1)
    if not vectors:
        return w, None
    return w, jnp.take_along_axis(v[..., :n, :n], order[..., None, :], axis=-1)


def eigh(s: jax.Array) -> tuple[jax.Array, jax.Array]:
    """Eigendecomposition ``s = V diag(w) Vᵀ`` of symmetric ``s`` (``jnp.linalg.eigh``'s
    contract: ``w`` ascending, ``V`` orthogonal; the symmetric part of ``s`` is used).

    Cyclic Jacobi in Brent–Luk parallel order: each of the ``r − 1`` rounds of a sweep applies
    ``r/2`` disjoint rotations at once (index ``i`` against ``r/2 + i``, then a fixed reordering
    by slices), vectorised over the batch; sweeps stop once no rotated off-diagonal entry
    exceeds ``r·eps·‖s‖_F`` (quadratic convergence, ~5–8 sweeps). Eigenvalues are accurate to
    ``O(eps·‖s‖)``, eigenvectors to ``O(eps·‖s‖ / gap)``, as LAPACK's.
    """
    w, v = _jacobi_eigh(s, vectors=True)
    return w, v


def eigvalsh(s: jax.Array) -> jax.Array:
    """Ascending eigenvalues of symmetric ``s`` (:func:`eigh` without accumulating vectors)."""
    return _jacobi_eigh(s, vectors=False)[0]


@_compiled_once
def pinv(x: jax.Array, rtol: float | jax.Array | None = None) -> jax.Array:
    """Moore–Penrose pseudo-inverse of a square ``x`` (``jnp.linalg.pinv``'s contract and
    cutoff: singular values at most ``rtol·σ_max`` count as zero, by default
    ``rtol = 10·r·eps``; a zero matrix gives zero).

    One-sided (Hestenes) Jacobi SVD in Brent–Luk parallel order (as :func:`eigh`): column pairs
    of ``U = x V`` are rotated until orthogonal, which gives the singular values to high relative
    accuracy without forming ``xᵀx``; then ``x⁺ = Σ_j v_j u_jᵀ / σ_j²`` with ``σ_j = ‖u_j‖``.
    """
    n = x.shape[-1]
    u = _pad_even(x)
    size = u.shape[-1]
    tiny = jnp.finfo(x.dtype).tiny

    def round_(carry):
        u, v = carry
        top, bottom = jnp.split(u, 2, axis=-1)
        alpha, beta = jnp.sum(top * top, axis=-2), jnp.sum(bottom * bottom, axis=-2)
        gamma = jnp.sum(top * bottom, axis=-2)
        c, s = _rotation(alpha, beta, gamma)
        off = jnp.abs(gamma) / jnp.sqrt(jnp.maximum(alpha * beta, tiny))
        u = _next_round(_rotate(u, c, s, -1), -1)
        v = _next_round(_rotate(v, c, s, -1), -1)
        return (u, v), jnp.max(off, axis=-1)

    v = jnp.broadcast_to(jnp.eye(size, dtype=x.dtype), u.shape)
    if size > 1:
        u, v = _sweeps(round_, (u, v), size, size * _eps(x.dtype))
    u, v = u[..., :n, :n], v[..., :n, :n]
    sigma2 = jnp.sum(u * u, axis=-2)
    rtol = 10.0 * n * _eps(x.dtype) if rtol is None else rtol
    cutoff = rtol**2 * jnp.max(sigma2, axis=-1, keepdims=True)
    keep = sigma2 > jnp.maximum(cutoff, tiny)
    inv_sigma2 = jnp.where(keep, 1.0 / jnp.where(keep, sigma2, 1.0), 0.0)
    return (v * inv_sigma2[..., None, :]) @ mT(u)


@_compiled_once
def _householder_qr(x: jax.Array) -> tuple[jax.Array, jax.Array]:
    """Thin Householder QR of ``x: (..., m, k)``, ``m ≥ k``, LAPACK's conventions (``geqrf`` /
    ``orgqr``: ``R_jj = −sign(x_jj)·‖x_j:‖``, a column already zero below the diagonal is left
    alone), one reflector per column, each vectorised over the batch and the ``m`` rows.

    The loops work on ``xᵀ (k, m)``: a column of ``x`` is then a contiguous row, and storing a
    reflector writes one row. With ``k = 16`` float32 one row of ``x`` is one cache line, so a
    column access on ``x`` itself touched the whole matrix; each reflector now reads ``x`` twice
    (``w = xᵀv`` and the rank-1 update), which made the QR 2.5× faster at 1024 × 16."""
    m, k = x.shape[-2:]
    cols = jnp.arange(m)

    def reflect(j, carry):
        xt, vs, taus = carry
        row = jax.lax.dynamic_index_in_dim(xt, j, axis=-2, keepdims=False)
        alpha = jax.lax.dynamic_index_in_dim(row, j, axis=-1, keepdims=False)
        below = jnp.where(cols > j, row, 0.0)
        sigma2 = jnp.sum(below * below, axis=-1)
        norm = jnp.sqrt(alpha * alpha + sigma2)
        beta = jnp.where(alpha >= 0, -norm, norm)
        active = sigma2 > 0
        denom = jnp.where(active, alpha - beta, 1.0)
        tau = jnp.where(active, (beta - alpha) / jnp.where(active, beta, 1.0), 0.0)
        v = jnp.where(cols == j, 1.0, below / denom[..., None])
        return (_reflect_rows(xt, v, tau), jax.lax.dynamic_update_index_in_dim(vs, v, j, -2),
                jax.lax.dynamic_update_index_in_dim(taus, tau, j, -1))

    xt = mT(x)
    taus = jnp.zeros(x.shape[:-2] + (k,), x.dtype)
    xt, vs, taus = jax.lax.fori_loop(0, k, reflect, (xt, jnp.zeros_like(xt), taus))
    r = jnp.triu(mT(xt[..., :k]))

    def apply(i, qt):
        j = k - 1 - i
        v = jax.lax.dynamic_index_in_dim(vs, j, axis=-2, keepdims=False)
        tau = jax.lax.dynamic_index_in_dim(taus, j, axis=-1, keepdims=False)
        return _reflect_rows(qt, v, tau)

    qt = jnp.broadcast_to(jnp.eye(k, m, dtype=x.dtype), xt.shape)
    return mT(jax.lax.fori_loop(0, k, apply, qt)), r


def _reflect_rows(xt: jax.Array, v: jax.Array, tau: jax.Array) -> jax.Array:
    """``(I − τ v vᵀ)`` applied to the columns of ``xt (..., k, m)``: ``xt − τ (xt v) vᵀ``."""
    w = jnp.einsum("...km,...m->...k", xt, v)
    return xt - (tau[..., None] * w)[..., :, None] * v[..., None, :]


def qr(x: jax.Array) -> tuple[jax.Array, jax.Array]:
    """Thin QR factorisation ``x = q @ r`` (``jnp.linalg.qr``'s contract and sign convention,
    ``m ≥ k``), by Householder reflections in batched JAX; also on ``Explicit`` meshes.

    Accurate (``q`` orthonormal to ``O(eps)``, ``r`` backward stable) at any condition number,
    including rank-deficient and zero ``x``. On a mesh with ``Explicit`` axes the factorisation
    runs with the mesh axes made ``Auto``; ``q`` keeps the sharding of ``x`` and ``r`` its batch
    axes' sharding.
    """
    if not jax.sharding.get_abstract_mesh().explicit_axes:
        return _householder_qr(x)
    spec = jax.typeof(x).sharding.spec
    spec = (*spec, *(None,) * (x.ndim - len(spec)))
    r_spec = jax.sharding.PartitionSpec(*spec[:-2], None, None)
    factor = jax.sharding.auto_axes(_householder_qr,
                                    out_sharding=(jax.sharding.PartitionSpec(*spec), r_spec))
    return factor(x)


def solve_sylvester_spd(p: jax.Array, q: jax.Array, c: jax.Array,
                        eig_p: Eigenpairs | None = None,
                        eig_q: Eigenpairs | None = None) -> jax.Array:
    """Solves ``p X + X q = c`` for symmetric positive (semi)definite ``p`` (r×r), ``q`` (k×k).

    Closed form in the eigenbases ``p = U diag(λ) Uᵀ``, ``q = V diag(μ) Vᵀ`` (:func:`eigh`):
    ``X = U [(Uᵀ c V)_ij / (λ_i + μ_j)] Vᵀ``. Unique whenever every ``λ_i + μ_j ≠ 0``. Pairs
    whose sum is at most the singular level of ``p`` plus that of ``q``
    (``SINGULAR_LEVEL·eps·tr/r`` each: both matrices singular, e.g. zero factors, where the sum
    is rounding noise) get a zero component, the minimum-norm solution. ``eig_p``, ``eig_q``:
    eigenpairs ``(λ, U)``, ``(μ, V)`` to solve with instead of new :func:`eigh` of ``p`` and
    ``q`` (e.g. :func:`floor_eigenvalues` of them).
    """
    lam, u = eigh(p) if eig_p is None else eig_p
    mu, v = eigh(q) if eig_q is None else eig_q
    denom = lam[..., :, None] + mu[..., None, :]
    coeffs = mT(u) @ c @ v
    live = denom > _floor(p, SINGULAR_LEVEL) + _floor(q, SINGULAR_LEVEL)
    return u @ jnp.where(live, coeffs / jnp.where(live, denom, 1.0), 0.0) @ mT(v)


def solve_sylvester_gram_product(ga: jax.Array, gb: jax.Array, c: jax.Array,
                                 eig_a: Eigenpairs | None = None) -> jax.Array:
    """Solves ``S K + K S = c`` for ``S = ga @ gb``, the product of two SPD r×r matrices.

    This is the Sylvester equation (9) of LoRA-S (``ga = MᵀM``, ``gb = NᵀN``). ``S`` is not
    symmetric but similar to the SPD matrix ``H = ga^{1/2} gb ga^{1/2} = U diag(λ) Uᵀ`` via
    ``S = T diag(λ) T⁻¹`` with ``T = ga^{1/2} U``, ``T⁻¹ = Uᵀ ga^{-1/2}``. In that basis the
    equation is diagonal: ``K = T [(T⁻¹ c T)_ij / (λ_i + λ_j)] T⁻¹``. ``ga`` must be
    positive definite (:func:`regularize` it for rank-deficient factors); its eigenvalues are
    floored at its singular level, and sums ``λ_i + λ_j`` at most twice ``H``'s singular level
    give zero components, as in :func:`solve_sylvester_spd`. ``eig_a``: ``ga``'s eigenpairs
    ``(w, V)`` when the caller has them (:func:`floor_eigenvalues`), instead of a new
    :func:`eigh`.
    """
    w, e = eigh(ga) if eig_a is None else eig_a
    w = jnp.maximum(w, _floor(ga, SINGULAR_LEVEL)[..., 0])
    sqrt_ga = (e * jnp.sqrt(w)[..., None, :]) @ mT(e)
    inv_sqrt_ga = (e / jnp.sqrt(w)[..., None, :]) @ mT(e)
    h = sqrt_ga @ gb @ sqrt_ga
    lam, u = eigh(h)
    t = sqrt_ga @ u
    t_inv = mT(u) @ inv_sqrt_ga
    denom = lam[..., :, None] + lam[..., None, :]
    coeffs = t_inv @ c @ t
    live = denom > 2.0 * _floor(h, SINGULAR_LEVEL)
    return t @ jnp.where(live, coeffs / jnp.where(live, denom, 1.0), 0.0) @ t_inv


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


def tangent_factors(
    a: jax.Array,
    b: jax.Array,
    grad_a: jax.Array,
    grad_b: jax.Array,
    delta: float | jax.Array = 0.0,
) -> tuple[jax.Array, jax.Array]:
    """``(u, v)`` with ``u @ v = P_T(X)`` for the products ``grad_a = X bᵀ``, ``grad_b = aᵀ X``.

    ``P_T(X) = a C + D b`` with ``C = (aᵀa + δI)⁻¹ grad_b`` and
    ``D = (grad_a − a C bᵀ)(b bᵀ + δI)⁻¹`` (LoRA-S eq. (12), App. A.8), so
    ``u = [a, D]: (..., m, 2r)`` and ``v = [C; b]: (..., 2r, n)``: the tangent projection in
    ``O((m + n) r²)`` without an ``m×n`` array. Two Cholesky solves.
    """
    c = solve_spd(gram_a(a), grad_b, delta)
    d = solve_spd_right(grad_a - a @ (c @ mT(b)), gram_b(b), delta)
    return jnp.concatenate([a, d], axis=-1), jnp.concatenate([c, b], axis=-2)


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

    Inverses are ``(· + δI)⁻¹`` Cholesky solves; the result is ``(..., m, n)``, the product of
    :func:`tangent_factors`.
    """
    u, v = tangent_factors(a, b, grad_a, grad_b, delta)
    return (u @ v) / scale


def square_row_sums(u: jax.Array, v: jax.Array, weights: jax.Array | None = None) -> jax.Array:
    """``(Y⊙Y) w`` for ``Y = u @ v`` (``u: (..., m, k)``, ``v: (..., k, n)``), without ``Y``.

    Row ``i`` is ``Σ_j w_j (u_i·v_j)² = u_iᵀ (v diag(w) vᵀ) u_i``: ``O((m + n) k²)``. ``w``
    defaults to ones (the row sums of ``Y⊙Y``).
    """
    weighted = v if weights is None else v * weights[..., None, :]
    return jnp.sum((u @ (weighted @ mT(v))) * u, axis=-1)


def square_column_sums(u: jax.Array, v: jax.Array, weights: jax.Array | None = None) -> jax.Array:
    """``(Y⊙Y)ᵀ w`` for ``Y = u @ v`` without ``Y`` (see :func:`square_row_sums`)."""
    weighted = u if weights is None else u * weights[..., :, None]
    return jnp.sum(v * ((mT(weighted) @ u) @ v), axis=-2)
