"""Measurement primitives: interleaved timing, compile time, state bytes, benchmark pair trees,
and the child-process rows that keep a hang from costing more than its row.

Every timing in these benchmarks is a *ratio* against a baseline measured in the same process and
the same loop: each round runs every timed function once, back to back, in an order that
alternates between rounds, so load from other processes on a shared machine hits the baseline
and the method alike. The reported ratio is the median over rounds of the per-round ratio.
"""

from __future__ import annotations

import dataclasses
import json
import subprocess
import time
from collections.abc import Callable, Mapping
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np
import optax

Timed = Callable[[], Any]


def block(x: Any) -> Any:
    """Wait for every array in ``x``."""
    return jax.block_until_ready(x)


def seconds(fn: Timed) -> float:
    """Wall seconds of one call of ``fn`` (which must block until its result is ready)."""
    start = time.perf_counter()
    fn()
    return time.perf_counter() - start


def interleaved_times(
    fns: Mapping[str, Timed], rounds: int, warmup: int = 2
) -> dict[str, np.ndarray]:
    """Wall times of ``rounds`` calls of every function, interleaved round by round.

    ``warmup`` untimed rounds run first. Round ``i`` calls the functions in insertion order for
    even ``i`` and in reverse order for odd ``i``, so neither side of a comparison always runs
    first (caches, turbo, a neighbour's burst).
    """
    names = list(fns)
    for _ in range(warmup):
        for name in names:
            fns[name]()
    times = {name: np.empty(rounds) for name in names}
    for i in range(rounds):
        for name in names if i % 2 == 0 else names[::-1]:
            times[name][i] = seconds(fns[name])
    return times


def median_ratio(times: Mapping[str, np.ndarray], name: str, baseline: str) -> float:
    """Median over rounds of ``time[name] / time[baseline]`` (rounds are paired)."""
    return float(np.median(times[name] / times[baseline]))


def tree_bytes(tree: Any) -> int:
    """Bytes of every array (or ``ShapeDtypeStruct``) in ``tree``."""
    return sum(int(np.prod(x.shape)) * jnp.dtype(x.dtype).itemsize for x in jax.tree.leaves(tree))


def state_bytes(tx: optax.GradientTransformation, params: Any) -> int:
    """Bytes of ``tx.init(params)``, from shapes only (nothing is allocated)."""
    return tree_bytes(jax.eval_shape(tx.init, params))


def has_matrix_state(tx: optax.GradientTransformation, params: Any) -> bool:
    """Whether ``tx`` keeps an ``m×n`` array for a pair ``a: (..., m, r)``, ``b: (..., r, n)``."""
    sizes = {
        (a.shape[-2], b.shape[-1])
        for a, b in zip(_leaves_named(params, "lora_a"), _leaves_named(params, "lora_b"))
    }
    state = jax.eval_shape(tx.init, params)
    return any(len(x.shape) >= 2 and tuple(x.shape[-2:]) in sizes for x in jax.tree.leaves(state))


def _leaves_named(tree: Any, key: str) -> list[Any]:
    flat = jax.tree_util.tree_flatten_with_path(tree)[0]
    return [x for path, x in flat if getattr(path[-1], "key", None) == key]


# ------------------------------------------------------------------------------ child rows


def print_stage(stage: str) -> None:
    """In a child: report that it reached ``stage`` (a hung row names the last one)."""
    print("STAGE " + stage, flush=True)


def print_row(row: dict) -> None:
    """In a child: report its result row."""
    print("ROW " + json.dumps(row), flush=True)


def run_child(cmd: list[str], timeout: float, row_id: dict, **popen: Any) -> dict:
    """Run ``cmd`` (a child that reports with :func:`print_row`) and return its row.

    A child that does not finish within ``timeout`` seconds gives ``{**row_id, "hung": stage}``
    with the last stage it reported (``"compiling"`` if none); one that exits without a row
    gives ``{**row_id, "error": <the end of its stderr>}``. ``popen`` goes to
    :func:`subprocess.run` (``env``, ``cwd``).
    """
    try:
        done = subprocess.run(cmd, capture_output=True, text=True, timeout=timeout, **popen)
        output, error = done.stdout, done.stderr[-500:]
    except subprocess.TimeoutExpired as expired:
        output, error = expired.stdout or "", None
        if isinstance(output, bytes):
            output = output.decode()
    lines = output.splitlines()
    rows = [json.loads(line[4:]) for line in lines if line.startswith("ROW ")]
    if rows:
        return rows[0]
    if error is None:
        stages = [line[6:] for line in lines if line.startswith("STAGE ")]
        return {**row_id, "hung": stages[-1] if stages else "compiling"}
    return {**row_id, "error": error}


# ------------------------------------------------------------------------------ update steps


@dataclasses.dataclass
class UpdateStep:
    """A compiled ``(params, state) ← apply_updates(tx.update(grads, state, params))`` step.

    Params and state are donated and fed back, as in a training loop; ``grads`` stay fixed.
    """

    compiled: Any
    params: Any
    state: Any
    grads: Any
    compile_seconds: float

    def __call__(self) -> None:
        self.params, self.state = block(self.compiled(self.params, self.state, self.grads))


def update_step(tx: optax.GradientTransformation, params: Any, grads: Any) -> UpdateStep:
    """Build, lower and compile the jitted update of ``tx``; time lowering + compilation."""

    def step(p, s, g):
        updates, s = tx.update(g, s, p)
        return optax.apply_updates(p, updates), s

    params = jax.tree.map(jnp.copy, params)
    state = block(jax.jit(tx.init)(params))
    jitted = jax.jit(step, donate_argnums=(0, 1))
    start = time.perf_counter()
    compiled = jitted.lower(params, state, grads).compile()
    elapsed = time.perf_counter() - start
    return UpdateStep(compiled, params, state, grads, elapsed)


# ------------------------------------------------------------------------------ trees

D_MODEL = 1024  # GPT-2 medium
N_LAYERS = 24


def _projections(all_four: bool, d: int) -> dict[str, tuple[int, int, int]]:
    """``name: (P, in, out)``: ``P`` stacked slices of one fused projection.

    ``lowrank_optax.flax`` puts the slices of ``c_attn`` on a leading axis: ``lora_a (P, in, r)``,
    ``lora_b (P, r, w)``.
    """
    if not all_four:
        return {"attn.c_attn": (2, d, d)}  # q and v slices
    return {
        "attn.c_attn": (3, d, d),  # q, k and v slices
        "attn.c_proj": (1, d, d),
        "mlp.c_fc": (1, d, 4 * d),
        "mlp.c_proj": (1, 4 * d, d),
    }


def _tree(leaf: Callable[[str, int, int, int], Any], all_four: bool, layers: int, d: int) -> dict:
    tree: dict = {}
    for i in range(layers):
        for name, (slices, m, n) in _projections(all_four, d).items():
            block_name, proj = name.split(".")
            layer = tree.setdefault(f"h_{i}", {}).setdefault(block_name, {})
            layer[proj] = leaf(name, slices, m, n)
    return tree


def pair_tree(
    rank: int, *, all_four: bool, layers: int = N_LAYERS, d: int = D_MODEL, seed: int = 0
) -> dict:
    """GPT-2-shaped LoRA factors ``{"lora_a": (P, m, r), "lora_b": (P, r, n)}`` per projection."""
    key = iter(jax.random.split(jax.random.key(seed), 4 * layers * 2))

    def pair(_, slices, m, n):
        return {
            "lora_a": jax.random.normal(next(key), (slices, m, rank)) / np.sqrt(m),
            "lora_b": jax.random.normal(next(key), (slices, rank, n)) / np.sqrt(rank),
        }

    return _tree(pair, all_four, layers, d)


def dense_tree(*, all_four: bool, layers: int = N_LAYERS, d: int = D_MODEL, seed: int = 0) -> dict:
    """The full weights ``W: (P, m, n)`` the pairs of :func:`pair_tree` adapt."""
    key = iter(jax.random.split(jax.random.key(seed), 4 * layers))

    def weight(_, slices, m, n):
        return {"kernel": jax.random.normal(next(key), (slices, m, n)) / np.sqrt(m)}

    return _tree(weight, all_four, layers, d)


def gradients_like(tree: Any, seed: int = 1, scale: float = 1e-3) -> Any:
    """Fixed random gradients with the structure of ``tree``."""
    leaves, treedef = jax.tree.flatten(tree)
    keys = jax.random.split(jax.random.key(seed), len(leaves))
    return jax.tree.unflatten(
        treedef, [scale * jax.random.normal(k, x.shape, x.dtype) for k, x in zip(keys, leaves)]
    )
