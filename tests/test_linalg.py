"""Batched kernels against NumPy / SciPy in float64."""

from __future__ import annotations

import jax
import jax.numpy as jnp
import numpy as np
import pytest
import scipy.linalg

from lowrank_optax import linalg

RNG = np.random.default_rng(0)


@pytest.fixture(autouse=True)
def float64():
    with jax.enable_x64(True):
        yield


def _spd(r, batch=(), floor=0.1):
    x = RNG.normal(size=(*batch, r, r))
    return x @ np.swapaxes(x, -1, -2) + floor * np.eye(r)


def test_grams():
    a, b = RNG.normal(size=(3, 7, 2)), RNG.normal(size=(3, 2, 5))
    np.testing.assert_allclose(linalg.gram_a(a), np.swapaxes(a, -1, -2) @ a, rtol=1e-12)
    np.testing.assert_allclose(linalg.gram_b(b), b @ np.swapaxes(b, -1, -2), rtol=1e-12)


@pytest.mark.parametrize("delta", [0.0, 0.3])
def test_regularised_spd_solves(delta):
    s, rhs = _spd(4, (2,)), RNG.normal(size=(2, 4, 6))
    expected = np.stack([scipy.linalg.solve(s[i] + delta * np.eye(4), rhs[i]) for i in range(2)])
    np.testing.assert_allclose(linalg.solve_spd(s, rhs, delta), expected, rtol=1e-9)
    lhs = RNG.normal(size=(2, 6, 4))
    expected_right = np.stack(
        [lhs[i] @ np.linalg.inv(s[i] + delta * np.eye(4)) for i in range(2)])
    np.testing.assert_allclose(linalg.solve_spd_right(lhs, s, delta), expected_right, rtol=1e-9)


def test_sylvester_spd_matches_scipy():
    p, q, c = _spd(3, (2,)), _spd(5, (2,)), RNG.normal(size=(2, 3, 5))
    expected = np.stack([scipy.linalg.solve_sylvester(p[i], q[i], c[i]) for i in range(2)])
    np.testing.assert_allclose(linalg.solve_sylvester_spd(p, q, c), expected, rtol=1e-9)


def test_sylvester_with_singular_coefficients_is_finite_minimum_norm():
    p = np.diag([1.0, 0.0])
    q = np.diag([0.0, 2.0])
    c = np.array([[1.0, 2.0], [0.0, 4.0]])
    x = np.asarray(linalg.solve_sylvester_spd(p, q, c))
    np.testing.assert_allclose(x, [[1.0, 2.0 / 3.0], [0.0, 2.0]], rtol=1e-12)


def test_sylvester_gram_product_matches_scipy():
    ga, gb, c = _spd(4, (3,)), _spd(4, (3,)), RNG.normal(size=(3, 4, 4))
    s = ga @ gb
    expected = np.stack([scipy.linalg.solve_sylvester(s[i], s[i], c[i]) for i in range(3)])
    np.testing.assert_allclose(linalg.solve_sylvester_gram_product(ga, gb, c), expected,
                               rtol=1e-8, atol=1e-10)


def _projector(x):
    return x @ np.linalg.pinv(x)


def test_tangent_projection_and_its_recovery_from_factor_gradients():
    m, n, r, scale = 9, 7, 3, 2.5
    a, b = RNG.normal(size=(m, r)), RNG.normal(size=(r, n))
    g = RNG.normal(size=(m, n))
    pu, pv = _projector(a), _projector(b.T)
    expected = pu @ g + g @ pv - pu @ g @ pv
    np.testing.assert_allclose(linalg.project_tangent(a, b, g), expected, rtol=1e-9, atol=1e-12)
    grad_a, grad_b = scale * g @ b.T, scale * a.T @ g
    recovered = linalg.tangent_from_factor_grads(a, b, grad_a, grad_b, scale)
    np.testing.assert_allclose(recovered, expected, rtol=1e-9, atol=1e-12)
    # P_T is a projection: idempotent, and orthogonal to (I − P_u) X (I − P_v).
    np.testing.assert_allclose(linalg.project_tangent(a, b, expected), expected, atol=1e-10)
    normal = (np.eye(m) - pu) @ g @ (np.eye(n) - pv)
    np.testing.assert_allclose(np.sum(normal * expected), 0.0, atol=1e-10)


def test_weighted_square_sums_of_a_low_rank_product_match_the_dense_ones():
    u, v = RNG.normal(size=(2, 30, 5)), RNG.normal(size=(2, 5, 20))
    w_rows, w_cols = RNG.uniform(size=(2, 20)), RNG.uniform(size=(2, 30))
    y2 = (u @ v) ** 2
    np.testing.assert_allclose(linalg.square_row_sums(u, v, w_rows),
                               np.einsum("...ij,...j->...i", y2, w_rows), rtol=1e-12)
    np.testing.assert_allclose(linalg.square_column_sums(u, v, w_cols),
                               np.einsum("...ij,...i->...j", y2, w_cols), rtol=1e-12)
    np.testing.assert_allclose(linalg.square_row_sums(u, v), y2.sum(-1), rtol=1e-12)
    np.testing.assert_allclose(linalg.square_column_sums(u, v), y2.sum(-2), rtol=1e-12)


def test_tangent_recovery_with_zero_b_is_the_column_space_projection():
    a, g = RNG.normal(size=(6, 2)), RNG.normal(size=(6, 5))
    b = np.zeros((2, 5))
    recovered = linalg.tangent_from_factor_grads(a, b, g @ b.T, a.T @ g, 1.0, delta=1e-8)
    np.testing.assert_allclose(recovered, _projector(a) @ g, rtol=1e-6, atol=1e-9)


# --- The batched kernels in float32 against NumPy / SciPy float64 --------------------------------
#
# Each float32 kernel is compared with the float64 answer for the same (float32-representable)
# input. Its error must be at most 1e-5 relative, or, where float32 itself cannot reach that
# (solves and pseudo-inverses at condition 1e4 lose ~cond·eps), at most 4× the error of the
# float32 LAPACK routine on the same input.

CONDS = [1.0, 1e2, 1e4]


def _conditioned(r, cond, batch=(), rng=None):
    rng = RNG if rng is None else rng
    u = np.linalg.qr(rng.normal(size=(*batch, r, r)))[0]
    v = np.linalg.qr(rng.normal(size=(*batch, r, r)))[0]
    return ((u * np.logspace(0, -np.log10(cond), r)) @ np.swapaxes(v, -1, -2)).astype(np.float32)


def _rel(x, ref):
    return float(np.max(np.abs(np.asarray(x, np.float64) - ref)) / np.max(np.abs(ref)))


def _assert_accurate(ours, ref64, lapack32=None, tol=1e-5):
    err = _rel(ours, ref64)
    bound = tol if lapack32 is None else max(tol, 4.0 * _rel(lapack32, ref64))
    assert err <= bound, (err, bound)


def _f32(fn):
    """``fn`` jitted with x64 off (the library's float32 path), returning NumPy arrays."""
    def run(*args):
        with jax.enable_x64(False):
            out = jax.jit(fn)(*args)
        return tuple(map(np.asarray, out)) if isinstance(out, tuple) else np.asarray(out)
    return run


@pytest.mark.parametrize("r", [3, 16, 64])
@pytest.mark.parametrize("cond", CONDS)
def test_cholesky_and_solves_float32(r, cond):
    x = _conditioned(r, np.sqrt(cond), (2,))
    s = (x @ np.swapaxes(x, -1, -2)).astype(np.float32)  # condition ~cond
    s64 = s.astype(np.float64)
    rhs = RNG.normal(size=(2, r, 40)).astype(np.float32)
    lapack = _f32(lambda s: jnp.linalg.cholesky(s))(s)
    _assert_accurate(_f32(linalg.cholesky)(s), np.linalg.cholesky(s64), lapack)
    delta = float(np.asarray(linalg.damping(jnp.asarray(s), 0.0)).max())
    shifted = s64 + delta * np.eye(r)
    lapack_solve = _f32(lambda s, b: jax.scipy.linalg.cho_solve(
        jax.scipy.linalg.cho_factor(s, lower=True), b))(s, rhs)
    _assert_accurate(_f32(linalg.solve_spd)(s, rhs), np.linalg.solve(shifted, rhs), lapack_solve)
    lhs = np.swapaxes(rhs, -1, -2)
    _assert_accurate(_f32(linalg.solve_spd_right)(lhs, s),
                     np.swapaxes(np.linalg.solve(shifted, rhs), -1, -2),
                     np.swapaxes(lapack_solve, -1, -2))


@pytest.mark.parametrize("r", [2, 5, 16, 64])
@pytest.mark.parametrize("cond", CONDS)
def test_eigh_float32(r, cond):
    x = _conditioned(r, cond, (3,))
    s = (0.5 * (x + np.swapaxes(x, -1, -2))).astype(np.float32)
    s64 = s.astype(np.float64)
    w, v = _f32(linalg.eigh)(s)
    w64 = np.linalg.eigvalsh(s64)
    _assert_accurate(w, w64)
    _assert_accurate(_f32(linalg.eigvalsh)(s), w64)
    _assert_accurate((v * w[..., None, :]) @ np.swapaxes(v, -1, -2), s64)
    np.testing.assert_allclose(np.swapaxes(v, -1, -2) @ v, np.broadcast_to(np.eye(r), s.shape),
                               atol=1e-5)


def test_eigh_vectors_of_a_separated_spectrum_match_numpy():
    r = 8
    u = np.linalg.qr(RNG.normal(size=(2, r, r)))[0]
    s = ((u * np.arange(1.0, r + 1)) @ np.swapaxes(u, -1, -2)).astype(np.float32)
    w, v = _f32(linalg.eigh)(s)
    w64, v64 = np.linalg.eigh(s.astype(np.float64))
    np.testing.assert_allclose(w, w64, rtol=1e-5)
    np.testing.assert_allclose(np.abs(np.sum(v * v64, axis=-2)), 1.0, atol=1e-5)


@pytest.mark.parametrize("r", [3, 16, 64])
@pytest.mark.parametrize("cond", CONDS)
def test_pinv_float32(r, cond):
    x = _conditioned(r, cond, (2,))
    ours, ref64 = _f32(linalg.pinv)(x), np.linalg.pinv(x.astype(np.float64))
    # Any backward-stable float32 pseudo-inverse is accurate to O(cond·eps), not better; LAPACK's
    # own error varies 2–5× with the compiled code's rounding (seen: ours 4.9e-4, LAPACK 9.5e-5
    # at cond 1e4, r = 16, XLA optimisation level 0)
    bound = max(1e-5, 4.0 * _rel(_f32(jnp.linalg.pinv)(x), ref64), cond * np.finfo(np.float32).eps)
    assert _rel(ours, ref64) <= bound, (_rel(ours, ref64), bound)


@pytest.mark.parametrize("m,r", [(7, 3), (100, 16), (200, 64)])
@pytest.mark.parametrize("cond", CONDS)
def test_qr_float32(m, r, cond):
    x = (RNG.normal(size=(2, m, r)) @ _conditioned(r, cond, (2,))).astype(np.float32)
    q, rr = _f32(linalg.qr)(x)
    q64, r64 = np.linalg.qr(x.astype(np.float64))
    _assert_accurate(rr, r64)
    _assert_accurate(q @ rr, x.astype(np.float64))
    np.testing.assert_allclose(np.swapaxes(q, -1, -2) @ q, np.broadcast_to(np.eye(r), (2, r, r)),
                               atol=1e-5)
    np.testing.assert_array_equal(np.tril(rr, -1), 0.0)
    _assert_accurate(q, q64, _f32(jnp.linalg.qr)(x)[0])  # Q is determined to ~cond·eps


def _rank_deficient(m, r, rank, batch=()):
    """An (m, r) float32 matrix of exactly the given rank (duplicated columns)."""
    base = RNG.normal(size=(*batch, m, rank)).astype(np.float32)
    return np.concatenate([base, base[..., : r - rank]], axis=-1)


def test_pinv_relative_cutoff_matches_numpy_rcond():
    u, _ = np.linalg.qr(RNG.normal(size=(5, 5)))
    v, _ = np.linalg.qr(RNG.normal(size=(5, 5)))
    x = (u * [3.0, 1.0, 0.3, 0.05, 0.01]) @ v.T
    for rtol in (None, 0.02, 0.12):
        expected = np.linalg.pinv(x, rcond=10 * 5 * np.finfo(float).eps if rtol is None else rtol)
        np.testing.assert_allclose(linalg.pinv(x, rtol), expected, rtol=1e-9, atol=1e-12)
    assert np.linalg.matrix_rank(np.asarray(linalg.pinv(x, 0.02))) == 3


def test_singular_and_zero_inputs_give_finite_minimum_norm_answers():
    a = _rank_deficient(30, 6, 4, (2,))
    # QR: orthonormal Q and x = QR also at rank deficiency and for zero columns / matrices.
    for x in (a, np.zeros_like(a), np.concatenate([a[..., :3], 0 * a[..., 3:]], -1)):
        q, rr = _f32(linalg.qr)(x)
        np.testing.assert_allclose(q @ rr, x, atol=1e-5)
        np.testing.assert_allclose(np.swapaxes(q, -1, -2) @ q,
                                   np.broadcast_to(np.eye(6), (2, 6, 6)), atol=1e-5)
    # pinv of an exactly singular square matrix and of zero: NumPy's minimum-norm answer.
    sq = _rank_deficient(6, 6, 3, (2,))
    np.testing.assert_allclose(_f32(linalg.pinv)(sq), np.linalg.pinv(sq.astype(np.float64)),
                               rtol=1e-4, atol=1e-5)
    np.testing.assert_array_equal(_f32(linalg.pinv)(np.zeros((2, 5, 5), np.float32)), 0.0)
    # Solves against a rank-deficient Gram, right-hand side in its range, tiny delta: finite, and
    # the minimum-norm solution's image (the Gram times the answer reproduces the rhs).
    g = np.swapaxes(a, -1, -2) @ a
    rhs = np.swapaxes(a, -1, -2) @ RNG.normal(size=(2, 30, 9)).astype(np.float32)
    x = _f32(lambda g, b: linalg.solve_spd(g, b, 1e-8))(g, rhs)
    assert np.all(np.isfinite(x))
    np.testing.assert_allclose(g.astype(np.float64) @ x, rhs, rtol=0, atol=2e-3 * np.abs(rhs).max())
    zero = np.zeros((2, 6, 6), np.float32)
    np.testing.assert_array_equal(_f32(linalg.solve_spd)(zero, np.zeros((2, 6, 3), np.float32)),
                                  0.0)
    assert np.all(np.isfinite(_f32(linalg.cholesky)(zero)))
    # eigh of a zero and of a rank-1 matrix.
    w, v = _f32(linalg.eigh)(zero)
    np.testing.assert_array_equal(w, 0.0)
    one = np.outer(np.arange(1.0, 7.0), np.arange(1.0, 7.0)).astype(np.float32)
    np.testing.assert_allclose(_f32(linalg.eigvalsh)(one), [0, 0, 0, 0, 0, 91], atol=2e-5 * 91)
    # Sylvester solves with singular (rank-deficient float32 Gram) coefficients: finite.
    ga = np.swapaxes(a, -1, -2) @ a
    c = RNG.normal(size=(2, 6, 6)).astype(np.float32)
    assert np.all(np.isfinite(_f32(linalg.solve_sylvester_spd)(ga, ga, c)))
    assert np.all(np.isfinite(_f32(lambda g, c: linalg.solve_sylvester_gram_product(
        linalg.regularize(g, 1e-8), linalg.regularize(g, 1e-8), c))(ga, c)))


def test_solves_against_a_rank_deficient_float32_gram():
    # aᵀa of a float32 factor with duplicated columns (rank r − 2) and aᵀy computed in float32,
    # whose rounding puts ~eps of the right-hand side into the null space. The Cholesky solve
    # raises the dependent columns' pivots to the singular level: it must reproduce the
    # right-hand side, with an answer at most twice as long as the minimum-norm one (it is a
    # basic solution, each dependent column resolved against the earlier ones: 1.06–1.2× here).
    a = RNG.normal(size=(3, 40, 6)).astype(np.float32)
    a[..., 4], a[..., 5] = a[..., 0], a[..., 1]
    y = RNG.normal(size=(3, 40, 5)).astype(np.float32)
    gram, rhs = np.swapaxes(a, -1, -2) @ a, np.swapaxes(a, -1, -2) @ y
    gram64 = gram.astype(np.float64)
    shortest = np.linalg.pinv(gram64) @ rhs

    def check(x):
        np.testing.assert_allclose(gram64 @ x, rhs, atol=1e-3 * np.abs(rhs).max())
        assert np.linalg.norm(x) <= 2 * np.linalg.norm(shortest), (
            np.linalg.norm(x) / np.linalg.norm(shortest))

    check(_f32(lambda g, b: linalg.solve_spd(g, b, 1e-8))(gram, rhs))
    # The eigenbasis Sylvester solve (LoRA-Pro's X-equation with b = 0): the minimum norm itself.
    c = rhs @ np.swapaxes(rhs, -1, -2)
    x = _f32(lambda g, c: linalg.solve_sylvester_spd(g, 0 * g, c))(gram, c)
    np.testing.assert_allclose(x, np.linalg.pinv(gram64) @ c, atol=1e-3 * np.abs(x).max())


def test_damping_rule():
    unit = np.eye(4) * np.array([1.0, 1.0, 1.0, 0.0])
    # float64: delta keeps its meaning (the floor is ~1e-15).
    np.testing.assert_allclose(np.asarray(linalg.damping(jnp.asarray(unit), 1e-8)), 1e-8)
    with jax.enable_x64(False):
        s32 = jnp.asarray(unit, jnp.float32)
        eps = np.finfo(np.float32).eps
        # float32: 1e-8 is below the rounding of a unit Gram; the relative floor takes over.
        np.testing.assert_allclose(np.asarray(linalg.damping(s32, 1e-8)), 3 * eps, rtol=1e-6)
        np.testing.assert_allclose(np.asarray(linalg.damping(s32, 1e-3)), 1e-3, rtol=1e-6)
        np.testing.assert_allclose(np.asarray(linalg.damping(0 * s32, 0.0)), eps * eps, rtol=1e-6)
        # Batched: one value per matrix.
        both = jnp.stack([s32, 100 * s32])
        np.testing.assert_allclose(np.asarray(linalg.damping(both, 0.0))[:, 0, 0],
                                   [3 * eps, 300 * eps], rtol=1e-6)


def test_floor_eigenvalues_raises_only_the_eigenvalues_below_the_floor():
    rng = np.random.default_rng(3)
    q, _ = np.linalg.qr(rng.normal(size=(6, 6)))
    w = np.array([1e-9, 1e-4, 0.02, 0.5, 1.0, 3.0])  # mean 0.75: floor 7.5e-3 at 1e-2
    well = np.array([0.02, 0.1, 0.3, 0.5, 1.0, 3.0])  # mean 0.82: every eigenvalue above it
    with jax.enable_x64(False):
        both = jnp.asarray(np.stack([(q * w) @ q.T, (q * well) @ q.T]), jnp.float32)
        w32, e32 = linalg.floor_eigenvalues(both, 1e-2)
        got = np.asarray((e32 * w32[..., None, :]) @ jnp.swapaxes(e32, -1, -2))
    np.testing.assert_allclose(got[0], (q * np.maximum(w, 1e-2 * w.mean())) @ q.T, atol=3e-6)
    np.testing.assert_allclose(got[1], (q * well) @ q.T, atol=3e-6)


def test_solve_floored_inverts_the_floored_matrix_and_falls_back_to_cholesky():
    rng = np.random.default_rng(4)
    q, _ = np.linalg.qr(rng.normal(size=(5, 5)))
    w = np.array([1e-7, 1e-3, 0.5, 1.0, 2.0])  # mean 0.7: the two smallest below 1e-2 of it
    s, rhs = (q * w) @ q.T, rng.normal(size=(5, 3))
    floored_inverse = (q / np.maximum(w, 1e-2 * w.mean())) @ q.T
    with jax.enable_x64(False):
        s32, rhs32 = jnp.asarray(s, jnp.float32), jnp.asarray(rhs, jnp.float32)
        eig = linalg.floored_eigenpairs(s32, 1e-2)
        left = np.asarray(linalg.solve_floored(s32, eig, rhs32))
        right = np.asarray(linalg.solve_floored_right(rhs32.T, s32, eig))
        assert linalg.floored_eigenpairs(s32, 0.0) is None  # the literal 0: no eigh
        cholesky = np.asarray(linalg.solve_floored(s32, None, rhs32, 1e-2))
    want = floored_inverse @ rhs
    np.testing.assert_allclose(left, want, rtol=1e-5, atol=1e-5 * np.abs(want).max())
    np.testing.assert_allclose(right, want.T, rtol=1e-5, atol=1e-5 * np.abs(want).max())
    np.testing.assert_allclose(cholesky, np.linalg.solve(s + 1e-2 * np.eye(5), rhs), rtol=1e-4)


def test_batched_shapes_match_unbatched():
    s = _spd(5, (2, 3)).astype(np.float32)
    rhs = RNG.normal(size=(2, 3, 5, 4)).astype(np.float32)
    batched = _f32(linalg.solve_spd)(s, rhs)
    single = np.stack([[_f32(linalg.solve_spd)(s[i, j], rhs[i, j]) for j in range(3)]
                       for i in range(2)])
    np.testing.assert_allclose(batched, single, rtol=1e-6)
    w = _f32(linalg.eigvalsh)(s)
    np.testing.assert_allclose(w, np.linalg.eigvalsh(s.astype(np.float64)), rtol=1e-5)


KERNELS = {
    "cholesky": (linalg.cholesky, [(48, 16, 16)]),
    "solve_spd": (linalg.solve_spd, [(48, 16, 16), (48, 16, 1024)]),
    "solve_spd_right": (linalg.solve_spd_right, [(48, 1024, 16), (48, 16, 16)]),
    "eigh": (linalg.eigh, [(48, 16, 16)]),
    "eigvalsh": (linalg.eigvalsh, [(48, 16, 16)]),
    "pinv": (linalg.pinv, [(48, 16, 16)]),
    "qr": (linalg.qr, [(48, 1024, 16)]),
    "sylvester_spd": (linalg.solve_sylvester_spd, [(48, 16, 16)] * 3),
    "sylvester_gram_product": (linalg.solve_sylvester_gram_product, [(48, 16, 16)] * 3),
    "tangent": (linalg.tangent_from_factor_grads,
                [(48, 64, 16), (48, 16, 64), (48, 64, 16), (48, 16, 64)]),
}


@pytest.mark.parametrize("name", sorted(KERNELS))
def test_no_kernel_lowers_to_a_custom_call(name):
    """No LAPACK (or any other) custom call: those deadlocked XLA:CPU over stacked pairs."""
    fn, shapes = KERNELS[name]
    with jax.enable_x64(False):
        args = [jax.ShapeDtypeStruct(s, np.float32) for s in shapes]
        text = jax.jit(fn).lower(*args).as_text()
    assert "custom_call" not in text and "lapack" not in text.lower()
    # The check can fail: jnp.linalg does lower to one.
    if name == "eigh":
        with jax.enable_x64(False):
            assert "custom_call" in jax.jit(jnp.linalg.eigh).lower(*args).as_text()


def test_no_method_update_lowers_to_a_custom_call():
    """Every registered method's jitted update over stacked pairs is custom-call free."""
    from benchmarks.registry import METHODS

    with jax.enable_x64(False):
        params = {"q": {"lora_a": jnp.ones((3, 32, 4)), "lora_b": jnp.ones((3, 4, 24))}}
        found = []
        for method in METHODS:
            tx = method.make()
            state = jax.eval_shape(tx.init, params)
            text = jax.jit(tx.update).lower(params, state, params).as_text()
            if "custom_call" in text:
                found.append(method.name)
        assert not found, found


@pytest.mark.parametrize("dtype", [jnp.float32, jnp.bfloat16, jnp.float64])
def test_adam_eps_makes_a_zero_moment_a_zero_step_under_jit(dtype):
    floor = float(jnp.finfo(dtype).tiny) ** 0.5
    assert linalg.adam_eps(1e-8, dtype) == 1e-8 and isinstance(linalg.adam_eps(1e-8, dtype), float)
    assert linalg.adam_eps(0.0, dtype) == floor
    assert float(linalg.adam_eps(jnp.zeros((), jnp.float16), dtype)) == pytest.approx(floor)
    with jax.enable_x64(dtype == jnp.float64):
        zeros = jnp.zeros(3, dtype)
        for eps in (0.0, jnp.zeros((), jnp.float16)):
            step = jax.jit(lambda m, v, e: m / (jnp.sqrt(v) + linalg.adam_eps(e, dtype)))
            np.testing.assert_array_equal(np.asarray(step(zeros, zeros, eps), np.float64), 0.0)
        # a gradient whose square underflows: the step stays of Adam's unit size
        g = jnp.full(3, floor / 4, dtype)
        assert np.all(np.abs(np.asarray(step(g, g * g, 0.0), np.float64)) <= 1.0)
