"""GL(r) transformation invariance as a reusable property (DESIGN §5).

An optimizer is transformation invariant when starting from ``(a R, R⁻¹ b)`` instead of
``(a, b)`` (the same product ``a b``) gives the same product after every step. The residual
reported here is ``‖W₁ − W₂‖ / ‖W₁‖`` after ``steps`` steps, computed in float64, on a weighted
least-squares loss of the product with a non-trivial (non-isotropic) Hessian.
"""

from __future__ import annotations

from collections.abc import Callable

import hypothesis.strategies as st
import jax
import jax.numpy as jnp
import numpy as np
import optax


def random_gl(seed: int, rank: int, cond: float) -> np.ndarray:
    """A random ``rank×rank`` matrix with condition number ``cond`` (random orthogonal factors)."""
    rng = np.random.default_rng(seed)
    q1, _ = np.linalg.qr(rng.normal(size=(rank, rank)))
    q2, _ = np.linalg.qr(rng.normal(size=(rank, rank)))
    return (q1 * np.geomspace(np.sqrt(cond), 1.0 / np.sqrt(cond), rank)) @ q2


def gl_matrices(rank: int, max_cond: float = 10.0) -> st.SearchStrategy[np.ndarray]:
    """Hypothesis strategy of GL(rank) matrices with condition numbers in ``[1, max_cond]``."""
    return st.builds(
        lambda seed, cond: random_gl(seed, rank, cond),
        st.integers(0, 2**31 - 1),
        st.floats(1.0, max_cond),
    )


def weighted_problem(seed: int = 0, m: int = 10, n: int = 8, rank: int = 3):
    """Factors ``(a, b)`` with ``b ≠ 0`` and a loss ``½‖C ⊙ (a b − Y)‖²`` of the product only."""
    rng = np.random.default_rng(seed)
    a = rng.normal(size=(m, rank)) / np.sqrt(m)
    b = rng.normal(size=(rank, n)) / np.sqrt(rank)
    y = rng.normal(size=(m, n))
    weights = rng.uniform(0.5, 2.0, size=(m, n))

    def loss_of_product(w: jax.Array) -> jax.Array:
        return 0.5 * jnp.sum((weights * (w - y)) ** 2)

    return a, b, loss_of_product


def _run(tx: optax.GradientTransformation, a, b, loss_of_product, steps: int) -> np.ndarray:
    params = {"site": {"lora_a": jnp.asarray(a), "lora_b": jnp.asarray(b)}}
    loss = lambda p: loss_of_product(p["site"]["lora_a"] @ p["site"]["lora_b"])  # noqa: E731
    state = tx.init(params)
    for _ in range(steps):
        grads = jax.grad(loss)(params)
        updates, state = tx.update(grads, state, params)
        params = optax.apply_updates(params, updates)
    return np.asarray(params["site"]["lora_a"] @ params["site"]["lora_b"])


def invariance_residual(
    make_tx: Callable[[], optax.GradientTransformation],
    r_matrix: np.ndarray,
    steps: int = 3,
    seed: int = 0,
) -> float:
    """``‖W(a,b) − W(aR, R⁻¹b)‖ / ‖W(a,b)‖`` after ``steps`` steps of ``make_tx()``, in float64."""
    with jax.enable_x64(True):
        rank = r_matrix.shape[0]
        a, b, loss_of_product = weighted_problem(seed, rank=rank)
        w1 = _run(make_tx(), a, b, loss_of_product, steps)
        w2 = _run(make_tx(), a @ r_matrix, np.linalg.solve(r_matrix, b), loss_of_product, steps)
    return float(np.linalg.norm(w1 - w2) / np.linalg.norm(w1))
