"""Steps to a relative error of 1e-3 on ill-conditioned matrix factorisation and matrix sensing.

Factorisation mirrors ``examples/matrix_factorization.py``: fit ``a b ≈ Y`` for a rank-5 60×40
target with singular values ``geomspace(1, 1/κ)`` from the LoRA initialisation (random ``a``,
zero ``b``). Sensing fits the same kind of rank-3 20×15 target seen through ``N = 300`` Gaussian
measurements ``y_i = ⟨A_i, Y⟩``, with loss ``1/(2N) Σ (⟨A_i, a b⟩ − y_i)²`` (the expected Hessian
in ``ab`` is the identity, as for factorisation). Every method runs on a small learning-rate grid
(its registry rate × :data:`LR_FACTORS`); all κ and rates of one method run batched in one
compiled ``scan``, and the best rate per κ is reported.
"""

from __future__ import annotations

import dataclasses
from collections.abc import Callable, Sequence

import jax
import jax.numpy as jnp
import numpy as np
import optax

CONDITION_NUMBERS = (10, 100, 1000)
THRESHOLD = 1e-3
LR_FACTORS = (0.1, 0.3, 1.0, 3.0)

Factory = Callable[[jax.Array], optax.GradientTransformation]


@dataclasses.dataclass
class ConvergenceRow:
    problem: str
    method: str
    steps: dict[int, int | None]  # κ -> first step with error ≤ THRESHOLD (None: not within cap)
    learning_rates: dict[int, float]  # κ -> the grid rate that got there first (or lowest error)
    curves: dict[int, np.ndarray]  # κ -> relative error per step at that rate


def low_rank_target(cond: float, m: int, n: int, rank: int, seed: int = 0) -> np.ndarray:
    rng = np.random.default_rng(seed)
    u, _ = np.linalg.qr(rng.normal(size=(m, rank)))
    v, _ = np.linalg.qr(rng.normal(size=(n, rank)))
    return (u * np.geomspace(1.0, 1.0 / cond, rank)) @ v.T


@dataclasses.dataclass(frozen=True)
class Problem:
    name: str
    m: int
    n: int
    rank: int
    measurements: int  # 0: the plain factorisation loss ½‖ab − Y‖²

    def operator(self) -> jax.Array | None:
        if not self.measurements:
            return None
        rng = np.random.default_rng(7)
        return jnp.asarray(rng.normal(size=(self.measurements, self.m * self.n)), jnp.float32)

    def loss(self, ops: jax.Array | None, y: jax.Array) -> Callable:
        if ops is None:
            return lambda p: 0.5 * jnp.sum((p["lora_a"] @ p["lora_b"] - y) ** 2)
        observed = ops @ y.reshape(-1)

        def sensing(p):
            residual = ops @ (p["lora_a"] @ p["lora_b"]).reshape(-1) - observed
            return 0.5 * jnp.mean(residual**2)

        return sensing


FACTORISATION = Problem("factorisation", 60, 40, 5, 0)
SENSING = Problem("sensing", 20, 15, 3, 300)


def error_curves(
    factory: Factory, problem: Problem, rates: np.ndarray, targets: np.ndarray, steps: int
) -> np.ndarray:
    """Relative errors ``(len(targets), len(rates), steps)``: every (κ, rate) run batched."""
    ops = problem.operator()
    a0 = jax.random.normal(jax.random.key(1), (problem.m, problem.rank)) / np.sqrt(problem.m)
    params = {"lora_a": a0, "lora_b": jnp.zeros((problem.rank, problem.n))}

    def run(y, lr):
        tx = factory(lr)
        loss = problem.loss(ops, y)

        def step(carry, _):
            p, s = carry
            updates, s = tx.update(jax.grad(loss)(p), s, p)
            p = optax.apply_updates(p, updates)
            err = jnp.linalg.norm(p["lora_a"] @ p["lora_b"] - y) / jnp.linalg.norm(y)
            return (p, s), err

        return jax.lax.scan(step, (params, tx.init(params)), None, length=steps)[1]

    batched = jax.vmap(jax.vmap(run, in_axes=(None, 0)), in_axes=(0, None))
    return np.asarray(jax.jit(batched)(jnp.asarray(targets, jnp.float32), jnp.asarray(rates)))


def first_below(errors: np.ndarray) -> int | None:
    """1-based step of the first error ≤ :data:`THRESHOLD` that is not followed by a NaN."""
    errors = np.where(np.isfinite(errors), errors, np.inf)
    below = np.flatnonzero(errors <= THRESHOLD)
    return int(below[0]) + 1 if below.size else None


def converge(
    name: str, factory: Factory, base_lr: float, problem: Problem, steps: int
) -> ConvergenceRow:
    rates = np.asarray([base_lr * f for f in LR_FACTORS], np.float32)
    targets = np.stack([low_rank_target(k, problem.m, problem.n, problem.rank)
                        for k in CONDITION_NUMBERS])
    curves = error_curves(factory, problem, rates, targets, steps)
    row = ConvergenceRow(problem.name, name, {}, {}, {})
    for k, per_rate in zip(CONDITION_NUMBERS, curves):
        hits = [first_below(c) for c in per_rate]
        reached = [i for i, hit in enumerate(hits) if hit is not None]
        if reached:
            best = min(reached, key=lambda i: hits[i])
        else:
            lowest = [np.nanmin(c) if np.isfinite(c).any() else np.inf for c in per_rate]
            best = int(np.argmin(lowest))
        row.steps[k] = hits[best]
        row.learning_rates[k] = float(rates[best])
        row.curves[k] = per_rate[best]
    return row


def run_all(
    methods: Sequence[tuple[str, Factory, float]], steps: int, log=print
) -> list[ConvergenceRow]:
    rows = []
    for problem in (FACTORISATION, SENSING):
        for name, factory, lr in methods:
            try:
                row = converge(name, factory, lr, problem, steps)
            except Exception as err:  # one failing method must not lose the whole section
                log(f"  {problem.name} {name}: failed: {type(err).__name__}: {err}")
                continue
            cells = ", ".join(f"κ={k}: {row.steps[k] or f'>{steps}'}" for k in CONDITION_NUMBERS)
            log(f"  {problem.name} {name}: {cells}")
            rows.append(row)
    return rows
