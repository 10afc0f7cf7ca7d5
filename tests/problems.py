"""Small problems shared by the tests: LoRA matrix factorisation and GL(r) reparametrisation."""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np
import optax

from lowrank_optax import LoRAPair

M, N, RANK = 16, 12, 4


def factorization_target(seed: int = 0, cond: float = 10.0, m: int = M, n: int = N,
                         rank: int = RANK) -> np.ndarray:
    """A rank-``rank`` ``m×n`` matrix with singular values spread over ``[1/cond, 1]``·3."""
    rng = np.random.default_rng(seed)
    u, _ = np.linalg.qr(rng.normal(size=(m, rank)))
    v, _ = np.linalg.qr(rng.normal(size=(n, rank)))
    sigma = 3.0 * np.geomspace(1.0, 1.0 / cond, rank)
    return (u * sigma) @ v.T


def lora_params(seed: int = 1, m: int = M, n: int = N, rank: int = RANK, zero_b: bool = True,
                dtype: Any = jnp.float32) -> dict:
    """Two LoRA sites as the battery uses them: a ``{lora_a, lora_b}`` dict and a LoRAPair."""
    key_a, key_b, key_c = jax.random.split(jax.random.key(seed), 3)
    a = jax.random.normal(key_a, (m, rank), dtype) / np.sqrt(m)
    b = jnp.zeros((rank, n), dtype) if zero_b else jax.random.normal(key_b, (rank, n), dtype)
    a2 = jax.random.normal(key_c, (m, rank), dtype) / np.sqrt(m)
    return {"layer": {"lora_a": a, "lora_b": b}, "pair": LoRAPair(a2, b)}


def factorization_loss(target: np.ndarray) -> Callable[[dict], jax.Array]:
    """``Σ_sites ½‖a b − Y‖²`` over both sites of :func:`lora_params`."""
    y = jnp.asarray(target)

    def loss(params: dict) -> jax.Array:
        site, pair = params["layer"], params["pair"]
        w1 = site["lora_a"].astype(jnp.float32) @ site["lora_b"].astype(jnp.float32)
        w2 = pair.a.astype(jnp.float32) @ pair.b.astype(jnp.float32)
        return 0.5 * (jnp.sum((w1 - y) ** 2) + jnp.sum((w2 - y) ** 2))

    return loss


def train(tx: optax.GradientTransformation, params: Any, loss: Callable, steps: int):
    """Runs ``steps`` steps inside ``lax.scan``; returns final params and the loss history."""
    state = tx.init(params)

    def step(carry, _):
        p, s = carry
        value, grads = jax.value_and_grad(loss)(p)
        updates, s = tx.update(grads, s, p)
        return (optax.apply_updates(p, updates), s), value

    (params, _), history = jax.lax.scan(step, (params, state), None, length=steps)
    return params, history
