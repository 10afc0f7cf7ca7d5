"""Train-step overhead and learning-rate sweep on the bundled GPT-2 fine-tuning example.

The setting mirrors ``examples/gpt2/finetune.py`` (not imported: it is a script): the bundled
small GPT-2 (``examples/gpt2/checkpoint``), LoRA rank 4, alpha 32 on the q and v slices of every
``attn.c_attn`` (``lowrank_optax.flax.inject_lora``), batch 8 of 128-token E2E sequences, dropout
on, mean cross-entropy over reference tokens with the LM head evaluated on target positions only.
Methods with a ``scale`` argument get ``alpha / rank``, as in the example.

The step is one jitted function of the LoRA factors, the dropout RNG state and the optimizer
state (all donated): forward, backward, ``tx.update`` and ``apply_updates``. The learning rate is
an injected hyperparameter (``optax.inject_hyperparams``) passed in per step, so the timing run
and every rate of the sweep share one compiled step per method.
"""

from __future__ import annotations

import dataclasses
import functools
import inspect
import pathlib
import sys
import time
from collections.abc import Callable, Sequence

import jax
import jax.numpy as jnp
import numpy as np
import optax
from flax import nnx

from benchmarks import harness
from lowrank_optax.flax import inject_lora

EXAMPLE = pathlib.Path(__file__).resolve().parents[1] / "examples" / "gpt2"
sys.path.insert(0, str(EXAMPLE))  # the example's modules: model, tokenizer, E2E data

import e2e  # noqa: E402
from gpt2 import GPT2, GPT2Config, load_gpt2  # noqa: E402
from tokenizer import GPT2Tokenizer  # noqa: E402

RANK, ALPHA, BATCH, MAX_LEN, SEED = 4, 32.0, 8, 128, 0


@dataclasses.dataclass
class TrainStepRow:
    method: str
    ratio: float  # median per-round step time / adamw step time
    method_ms: float
    adamw_ms: float
    compile_s: float


@dataclasses.dataclass
class SweepRow:
    method: str
    learning_rates: list[float]
    final_losses: list[float]  # mean train loss of the last 5 steps, per rate (nan: diverged)


def optimizer(factory: Callable, kwargs: dict) -> optax.GradientTransformation:
    """``factory`` with its learning rate injected; ``scale = alpha / rank`` where accepted."""
    kwargs = dict(kwargs)
    if "scale" in inspect.signature(factory).parameters:
        kwargs["scale"] = ALPHA / RANK
    return optax.inject_hyperparams(functools.partial(factory, **kwargs))(learning_rate=0.0)


def adamw_factory(learning_rate):
    return optax.adamw(learning_rate, weight_decay=0.0)


def load_data() -> tuple[np.ndarray, ...]:
    tokenizer = GPT2Tokenizer.load(EXAMPLE / "checkpoint")
    pairs = e2e.encode_pairs(tokenizer, e2e.read_split(EXAMPLE / "data", "train"))
    return e2e.pack(pairs, MAX_LEN)


def head_capacity(weights: np.ndarray, batch_size: int) -> int:
    """Target tokens of the ``batch_size`` longest references, rounded up to 64."""
    per_row = np.sort(weights.sum(axis=1))[::-1]
    return int(-(-per_row[:batch_size].sum() // 64) * 64)


def target_loss(model, batch: tuple[jax.Array, ...], capacity: int) -> jax.Array:
    """Mean cross-entropy over reference tokens, LM head on target positions only."""
    inputs, targets, weights = batch
    hidden = model.hidden(inputs)
    flat_w = weights.reshape(-1)
    (idx,) = jnp.nonzero(flat_w, size=capacity, fill_value=0)
    w = flat_w[idx] * (jnp.arange(capacity) < jnp.count_nonzero(flat_w))
    logits = model.lm_head(hidden.reshape(-1, hidden.shape[-1])[idx])
    labels = targets.reshape(-1)[idx]
    ce = optax.softmax_cross_entropy_with_integer_labels(logits.astype(jnp.float32), labels)
    return (ce * w).sum() / w.sum()


def base_model(preset: str | None) -> GPT2:
    """The bundled example model, or a randomly initialised GPT-2 of a named ``preset``
    (``"medium"``: the papers' shapes; the step's cost does not depend on the weights)."""
    if preset is None:
        return load_gpt2(EXAMPLE / "checkpoint", rngs=nnx.Rngs(SEED))
    return GPT2(GPT2Config.preset(preset), rngs=nnx.Rngs(SEED))


class Trainer:
    """Fresh LoRA factors on the base model and one compiled train step for ``tx``."""

    def __init__(self, tx: optax.GradientTransformation, data: tuple[np.ndarray, ...],
                 preset: str | None = None):
        model = base_model(preset)
        d = model.config.n_embd
        targets = {r"h\.\d+\.attn\.c_attn": {"out_slices": [(0, d), (2 * d, 3 * d)]}}
        inject_lora(model, targets, rank=RANK, alpha=ALPHA, rngs=nnx.Rngs(SEED + 1))
        model.train()
        graphdef, lora, rngs, frozen = nnx.split(model, nnx.LoRAParam, nnx.RngState, ...)
        self.data = data
        self.initial = (lora, rngs)
        self.tx = tx
        capacity = head_capacity(data[2], BATCH)

        def step(lora, rngs, opt_state, frozen, batch, learning_rate):
            model = nnx.merge(graphdef, lora, rngs, frozen)
            diff = nnx.DiffState(0, nnx.LoRAParam)
            loss, grads = nnx.value_and_grad(target_loss, argnums=diff)(model, batch, capacity)
            opt_state.hyperparams["learning_rate"] = learning_rate
            updates, opt_state = tx.update(grads, opt_state, lora)
            new_rngs = nnx.state(model, nnx.RngState)
            return optax.apply_updates(lora, updates), new_rngs, opt_state, loss

        self.frozen = frozen
        self.reset()
        batch = tuple(map(jnp.asarray, next(e2e.batches(data, BATCH, SEED))))
        start = time.perf_counter()
        self.compiled = jax.jit(step, donate_argnums=(0, 1, 2)).lower(
            *self.carry, frozen, batch, jnp.float32(0.0)).compile()
        self.compile_seconds = time.perf_counter() - start

    def reset(self) -> None:
        lora, rngs = jax.tree.map(jnp.copy, self.initial)
        self.carry = (lora, rngs, self.tx.init(lora))
        self.stream = e2e.batches(self.data, BATCH, SEED)

    def step(self, learning_rate: float) -> float:
        batch = tuple(map(jnp.asarray, next(self.stream)))
        *carry, loss = self.compiled(*self.carry, self.frozen, batch,
                                     jnp.float32(learning_rate))
        self.carry = tuple(carry)
        return float(loss)

    def timed_step(self) -> None:
        """One step at a tiny rate (the cost does not depend on it), blocking on the loss."""
        self.step(1e-6)


def measure_steps(
    methods: Sequence[tuple[str, Callable, dict]], rounds: int, data, log=print,
    preset: str | None = None,
) -> tuple[list[TrainStepRow], dict[str, Trainer]]:
    """Step time of every method against adamw, all interleaved in one loop (adamw once per
    round); returns the trainers, reused by the sweep."""
    trainers = {"adamw": Trainer(optimizer(adamw_factory, {}), data, preset)}
    for name, factory, kwargs in methods:
        trainers[name] = Trainer(optimizer(factory, kwargs), data, preset)
        log(f"  compiled train step {name} in {trainers[name].compile_seconds:.1f} s")
    times = harness.interleaved_times({n: t.timed_step for n, t in trainers.items()}, rounds)
    rows = []
    for name, trainer in trainers.items():
        row = TrainStepRow(name, harness.median_ratio(times, name, "adamw"),
                           1e3 * float(np.median(times[name])),
                           1e3 * float(np.median(times["adamw"])), trainer.compile_seconds)
        log(f"  train step {name}: {row.ratio:.3f}× adamw ({row.method_ms:.1f} ms)")
        rows.append(row)
    return rows, trainers


def sweep(
    trainers: dict[str, Trainer], learning_rates: Sequence[float], steps: int, log=print
) -> list[SweepRow]:
    """Final train loss after ``steps`` steps (linear warm-up over ``steps // 4``) per rate."""
    warmup = max(1, steps // 4)
    rows = []
    for name, trainer in trainers.items():
        finals = []
        for lr in learning_rates:
            trainer.reset()
            losses = [trainer.step(lr * min(1.0, (t + 1) / warmup)) for t in range(steps)]
            final = float(np.mean(losses[-5:]))
            finals.append(final if np.isfinite(final) else float("nan"))
        log(f"  sweep {name}: " + ", ".join(f"{lr:g}→{f:.3f}" for lr, f in
                                             zip(learning_rates, finals)))
        rows.append(SweepRow(name, list(learning_rates), finals))
    return rows


def lr_window(rows: Sequence[SweepRow], tolerance: float) -> dict[str, list[float]]:
    """Rates whose final loss is within ``tolerance`` (nats) of the best final loss of all runs."""
    best = np.nanmin([f for r in rows for f in r.final_losses])
    return {r.method: [lr for lr, f in zip(r.learning_rates, r.final_losses)
                       if np.isfinite(f) and f <= best + tolerance] for r in rows}
