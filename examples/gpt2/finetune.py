"""LoRA fine-tuning of GPT-2 on E2E-style data-to-text with several lowrank_optax optimizers.

    python examples/gpt2/finetune.py                  # bundled model + data, all optimizers

The script injects LoRA factors (q and v slices of every fused ``attn.c_attn``; rank 4, alpha
32 by default, as in the LoRA papers) into the base model; every optimizer trains with the same
recipe (linear warm-up over the first 10 % of the steps, then cosine decay to 0, at the
learning rate of :data:`OPTIMIZERS`, chosen by ``sweep.py``) from the same initial factors on
the same batches, once per seed (``--seeds``: LoRA initialisation, data order and dropout).
The held-out (dev) loss is tracked during training; after training each model decodes the
evaluation MRs (greedy by default) and BLEU, NIST, METEOR, ROUGE-L and CIDEr score the
outputs. It prints a table of mean ± sd over the seeds and writes ``metrics.md``,
``loss.png``, ``samples_<optimizer>.txt`` and an Orbax checkpoint per optimizer and seed
(LoRA factors + optimizer state, ``checkpoints/<optimizer>/seed<k>/``) under ``--out``;
``--resume`` continues from those checkpoints exactly where they stopped. Compiled functions
are cached in ``runs/jax_cache`` (``--jax-cache``), so a second run starts training at once.

Point ``--checkpoint`` at a Hugging Face GPT-2 directory (e.g. GPT-2 medium) and ``--data`` at
the E2E files to run the papers' setting; ``--mesh DATAxMODEL`` shards the batch over a
``data`` mesh axis and the LoRA factors' feature axes over ``model``. See
docs/gpt2_example.md.
"""

from __future__ import annotations

import argparse
import contextlib
import dataclasses
import functools
import inspect
import json
import os
import shutil
import sys
import time
from collections import defaultdict
from collections.abc import Callable
from pathlib import Path
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np
import optax
import orbax.checkpoint as ocp
from flax import nnx
from jax.sharding import AxisType, NamedSharding
from jax.sharding import PartitionSpec as P
from tqdm import tqdm

import lowrank_optax
from lowrank_optax.flax import inject_lora

import e2e
from decoding import generate
from gpt2 import GPT2, load_gpt2
from metrics import e2e_metrics
from tokenizer import GPT2Tokenizer

HERE = Path(__file__).resolve().parent
STEPS = 60  # per optimizer and seed: the default run (5 optimizers × 3 seeds) fits 10 minutes
DEV_SIZE = 32
WARMUP_FRACTION = 0.1  # linear warm-up over the first 10 % of the steps, then cosine decay


@dataclasses.dataclass(frozen=True)
class OptimizerSpec:
    """A learning rate, extra keyword arguments, (if not ``lowrank_optax.<name>``) a factory
    ``factory(learning_rate, **kwargs)`` and whether the optimizer reads the exact full-gradient
    statistics of :mod:`lowrank_optax.grad_stats` (its model's LoRA layers then carry a probe)."""

    learning_rate: float
    kwargs: dict = dataclasses.field(default_factory=dict)
    factory: Callable[..., optax.GradientTransformation] | None = None
    grad_stats: bool = False


def _adamw(learning_rate: optax.ScalarOrSchedule) -> optax.GradientTransformation:
    """The baseline: ``optax.adamw`` without weight decay."""
    return optax.adamw(learning_rate, weight_decay=0.0)


def _loraplus_adamw(
    learning_rate: optax.ScalarOrSchedule, ratio: float = 16.0
) -> optax.GradientTransformation:
    """LoRA+: AdamW with ``ratio`` times the learning rate on ``b``."""
    return lowrank_optax.loraplus(optax.adamw, ratio, learning_rate=learning_rate, weight_decay=0.0)


# Learning rates for the bundled model and the default recipe (rank 4, alpha 32, batch 8,
# --steps, warm-up + cosine): per method, the lowest final dev loss of sweep.py's half-decade
# grid (its results: sweep.json / sweep.md, seed 10, which the reported runs do not use).
# AltLoRA divides its step by scale² = 64 (its eq. (8)), hence the large value; AdamS and LRACS
# normalise their step in the space of ΔW before lifting it to the factors and want about 10×
# less than Adam.
OPTIMIZERS: dict[str, OptimizerSpec] = {
    "adamw": OptimizerSpec(1.58e-2, factory=_adamw),
    "scaled_sgd": OptimizerSpec(3e-2),
    "scaled_adamw": OptimizerSpec(1e-2),
    "loraplus_adamw": OptimizerSpec(3.16e-3, factory=_loraplus_adamw),
    "adams": OptimizerSpec(1e-3),
    "lracs": OptimizerSpec(9.49e-4),
    "altlora": OptimizerSpec(3.0),
    "lora_rite": OptimizerSpec(3e-3),
    "lora_pro_adamw": OptimizerSpec(1e-2),
    "solora_adamw": OptimizerSpec(3.16e-2, {"moment": "factor"}, grad_stats=True),
}


# The default run: the baseline, the guide's "start here", and one method of each family that
# the sweep ranks near the top (3 seeds each keep the run inside ten minutes on 2 cores;
# ``--optimizers all`` runs the whole table, about 17 minutes).
DEFAULT_OPTIMIZERS = ("adamw", "scaled_adamw", "lora_rite", "lora_pro_adamw", "solora_adamw")


def _bounded(kind: type, low: float, strict: bool = False) -> Callable[[str], Any]:
    """An argparse type: ``kind(text)``, refused unless ``> low`` (``strict``) or ``≥ low``."""

    def parse(text: str) -> Any:
        try:
            value = kind(text)
        except ValueError:
            noun = "an integer" if kind is int else "a number"
            raise argparse.ArgumentTypeError(f"must be {noun}, got {text!r}") from None
        if value < low or (strict and value == low):
            raise argparse.ArgumentTypeError(f"must be {'>' if strict else '≥'} {low}, got {text}")
        return value

    return parse


POSITIVE_INT, NONNEGATIVE_INT = _bounded(int, 1), _bounded(int, 0)
POSITIVE_FLOAT = _bounded(float, 0.0, strict=True)


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    """Command-line flags (``--help`` lists them); out-of-range values are usage errors."""
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--checkpoint", type=Path, default=HERE / "checkpoint", help="HF GPT-2 dir")
    p.add_argument("--data", type=Path, default=HERE / "data", help="E2E csv or txt files")
    p.add_argument("--out", type=Path, default=Path("runs/gpt2_e2e"))
    p.add_argument(
        "--optimizers",
        default="",
        help="comma list of NAME or NAME=LR (overrides the table lr), or 'all'; "
        "default: " + ",".join(DEFAULT_OPTIMIZERS),
    )
    p.add_argument("--rank", type=POSITIVE_INT, default=4)
    p.add_argument("--alpha", type=POSITIVE_FLOAT, default=32.0)
    p.add_argument("--steps", type=POSITIVE_INT, default=STEPS)
    p.add_argument("--batch-size", type=POSITIVE_INT, default=8)
    p.add_argument("--max-len", type=POSITIVE_INT, default=128, help="tokens per training sequence")
    p.add_argument("--lr-scale", type=POSITIVE_FLOAT, default=1.0, help="multiplies every table lr")
    p.add_argument("--seed", type=int, default=0, help="first seed")
    p.add_argument(
        "--seeds", type=POSITIVE_INT, default=3, help="seeds seed, seed+1, ... per optimizer"
    )
    p.add_argument("--mesh", default="", help="DATAxMODEL device mesh, e.g. 4x2")
    p.add_argument("--eval-split", choices=["dev", "test"], default="test")
    p.add_argument(
        "--eval-size",
        type=_bounded(int, -1),
        default=50,
        help="first N MRs; -1 = all; 0 = no evaluation",
    )
    p.add_argument(
        "--dev-size",
        type=POSITIVE_INT,
        default=DEV_SIZE,
        help="dev MRs (first reference) for dev loss",
    )
    p.add_argument("--dev-every", type=POSITIVE_INT, default=10, help="dev loss every N steps")
    p.add_argument("--beams", type=POSITIVE_INT, default=1, help="1 = greedy; the papers use 10")
    p.add_argument("--max-new-tokens", type=POSITIVE_INT, default=64)
    p.add_argument("--no-meteor", action="store_true", help="skip METEOR (needs java)")
    p.add_argument("--resume", action="store_true", help="continue from --out checkpoints")
    p.add_argument(
        "--jax-cache", default="runs/jax_cache", help="persistent compilation cache ('' = off)"
    )
    p.add_argument(
        "--save-every", type=NONNEGATIVE_INT, default=0, help="also checkpoint every N steps"
    )
    return p.parse_args(argv)


# ------------------------------------------------------------------------------ optimizers


def available_optimizers() -> list[str]:
    """Names of the table whose optimizer exists at run time."""
    return [n for n, spec in OPTIMIZERS.items() if spec.factory or hasattr(lowrank_optax, n)]


def parse_optimizers(spec: str, lr_scale: float) -> dict[str, float]:
    """``"adamw,lora_rite=0.01"`` -> ``{name: learning rate}`` (table lr × ``lr_scale``);
    ``""``: :data:`DEFAULT_OPTIMIZERS`; ``"all"``: every available one."""
    if spec == "all":
        names = available_optimizers()
    elif spec:
        names = spec.split(",")
    else:
        names = [n for n in DEFAULT_OPTIMIZERS if n in available_optimizers()]
    chosen = {}
    for item in names:
        name, _, lr = item.partition("=")
        if name not in available_optimizers():
            raise SystemExit(
                f"unknown or unavailable optimizer {name!r}; have {available_optimizers()}"
            )
        try:
            chosen[name] = POSITIVE_FLOAT(lr) if lr else OPTIMIZERS[name].learning_rate * lr_scale
        except argparse.ArgumentTypeError as err:
            raise SystemExit(f"--optimizers {item}: the learning rate {err}") from None
    return chosen


def lr_schedule(learning_rate: float, steps: int) -> optax.Schedule:
    """The recipe of every optimizer: linear warm-up from 0 over the first
    :data:`WARMUP_FRACTION` of ``steps`` to ``learning_rate``, then cosine decay to 0."""
    warmup = max(1, round(WARMUP_FRACTION * steps))
    return optax.warmup_cosine_decay_schedule(0.0, learning_rate, warmup, max(steps, warmup + 1))


def make_optimizer(
    name: str, learning_rate: float, lora_scale: float, steps: int
) -> optax.GradientTransformation:
    """Build ``name`` from the table with :func:`lr_schedule`; methods with a ``scale``
    argument get ``alpha / rank``."""
    spec = OPTIMIZERS[name]
    factory = spec.factory or getattr(lowrank_optax, name)
    kwargs = dict(spec.kwargs)
    if "scale" in inspect.signature(factory).parameters:
        kwargs["scale"] = lora_scale
    return factory(lr_schedule(learning_rate, steps), **kwargs)


# ------------------------------------------------------------------------------ model & loss


def make_mesh(spec: str) -> jax.sharding.Mesh | None:
    """``"4x2"`` -> a ``('data', 'model')`` mesh over the first 8 devices; ``""`` -> None.

    The axes are ``Auto``: XLA propagates the shardings of the inputs (batch, factors) through
    the model, which therefore needs no sharding annotations of its own.
    """
    if not spec:
        return None
    data, model = (int(n) for n in spec.lower().split("x"))
    if data * model > jax.device_count():
        raise SystemExit(f"--mesh {spec} needs {data * model} devices, have {jax.device_count()}")
    return jax.make_mesh(
        (data, model),
        ("data", "model"),
        axis_types=(AxisType.Auto, AxisType.Auto),
        devices=jax.devices()[: data * model],
    )


@dataclasses.dataclass
class LoRAModel:
    """The base model with LoRA factors, split for pure functions.

    ``graphdef`` and ``frozen`` (base weights, dropout RNG state) are shared by every
    optimizer; ``lora`` holds the initial factors (``b = 0``: the base model's function).
    """

    graphdef: Any
    lora: Any
    frozen: Any
    mesh: jax.sharding.Mesh | None
    compiled: set[int] = dataclasses.field(default_factory=set)

    def module(self, lora: Any) -> GPT2:
        """An eval-mode ``GPT2`` with factors ``lora``."""
        model = nnx.merge(self.graphdef, lora, self.frozen)
        model.eval()
        return model

    def replicate_loose(self, tree: Any) -> Any:
        """Leaves that are not laid out on the mesh (e.g. an optimizer's step count, created
        on the default device) replicated over it; the others (factor-shaped optimizer
        state, sharded like the factors by ``init``) unchanged. Identity without a mesh."""
        if self.mesh is None:
            return tree
        replicated = NamedSharding(self.mesh, P())
        return jax.tree.map(
            lambda x: x if isinstance(x.sharding, NamedSharding) else jax.device_put(x, replicated),
            tree,
        )

    def shard_batch(self, batch: tuple[np.ndarray, ...]) -> tuple[jax.Array, ...]:
        """Rows along the mesh's ``data`` axis (plain device arrays without a mesh)."""
        if self.mesh is None:
            return tuple(map(jnp.asarray, batch))
        return jax.device_put(batch, NamedSharding(self.mesh, P("data")))


def lora_model(
    args: argparse.Namespace, grad_stats: bool = False, seed: int | None = None
) -> LoRAModel:
    """Load the base model and add factors on the q and v slices of every ``c_attn``.

    With a mesh the factors carry sharding metadata — ``lora_a`` ``(2, in, r)`` split along
    ``in`` and ``lora_b`` ``(2, r, out)`` along ``out`` over the ``model`` axis — and are
    created sharded; the frozen weights are replicated. With ``grad_stats`` every pair also
    gets a statistics probe (``lora_stats``, replicated): its gradient is the row and column
    sums of ``G⊙G`` of the slice's full weight gradient ``G``, reduced inside the backward pass
    (SoLoRA's exact metric). The factors are the same as without it (same seeds). ``seed``
    (default ``--seed``) draws the initial factors.
    """
    seed = args.seed if seed is None else seed
    mesh = make_mesh(args.mesh)
    model = load_gpt2(args.checkpoint, rngs=nnx.Rngs(seed))
    d = model.config.n_embd
    if args.rank > d:
        raise SystemExit(
            f"--rank {args.rank} is above the model width {d} (the q and v slices are {d} × {d})"
        )
    targets = {r"h\.\d+\.attn\.c_attn": {"out_slices": [(0, d), (2 * d, 3 * d)]}}
    sharding = {}
    if mesh is not None:
        sharding = {"a_sharding": (None, "model", None), "b_sharding": (None, None, "model")}
    with jax.set_mesh(mesh) if mesh is not None else contextlib.nullcontext():
        inject_lora(
            model,
            targets,
            rank=args.rank,
            alpha=args.alpha,
            rngs=nnx.Rngs(seed + 1),
            grad_stats=grad_stats,
            **sharding,
        )
    model.train()
    graphdef, lora, frozen = nnx.split(model, nnx.LoRAParam, ...)
    lora = nnx.as_pure(lora)
    if mesh is not None:
        frozen = jax.device_put(frozen, NamedSharding(mesh, P()))
    setup = LoRAModel(graphdef, lora, frozen, mesh)
    setup.lora = setup.replicate_loose(lora)  # the probes carry no sharding metadata
    return setup


def target_loss(model: GPT2, batch: tuple[jax.Array, ...], capacity: int) -> jax.Array:
    """Mean cross-entropy over reference tokens.

    The LM head (the dominant cost with a 50k vocabulary) runs only on the batch's target
    positions, gathered into one flat buffer of ``capacity`` rows (see :func:`head_capacity`).
    """
    inputs, targets, weights = batch
    hidden = model.hidden(inputs)
    flat_w = weights.reshape(-1)
    (idx,) = jnp.nonzero(flat_w, size=capacity, fill_value=0)
    w = flat_w[idx] * (jnp.arange(capacity) < jnp.count_nonzero(flat_w))
    logits = model.lm_head(hidden.reshape(-1, hidden.shape[-1])[idx])
    labels = targets.reshape(-1)[idx]
    ce = optax.softmax_cross_entropy_with_integer_labels(logits.astype(jnp.float32), labels)
    return (ce * w).sum() / w.sum()


def head_capacity(weights: np.ndarray, multiple: int = 128) -> int:
    """The batch's target-token count rounded up to ``multiple``: few distinct shapes (one
    compile each, shared by every optimizer) and little wasted LM-head work."""
    return int(-(-int(weights.sum()) // multiple) * multiple)


@functools.partial(jax.jit, static_argnames=("graphdef", "capacity"))
def loss_and_grad(
    graphdef: Any,
    lora: Any,
    frozen: Any,
    batch: tuple,
    key: jax.Array,
    step: int | jax.Array,
    capacity: int,
) -> tuple[jax.Array, Any]:
    """Training loss of step ``step`` (dropout keyed by ``fold_in(key, step)``) and its
    gradient w.r.t. the LoRA factors."""
    model = nnx.merge(graphdef, lora, frozen)
    nnx.reseed(model, dropout=jax.random.fold_in(key, step))
    grad_fn = nnx.value_and_grad(target_loss, argnums=nnx.DiffState(0, nnx.LoRAParam))
    loss, grads = grad_fn(model, batch, capacity)
    return loss, nnx.as_pure(grads)


@functools.partial(jax.jit, static_argnames=("graphdef", "capacity"))
def eval_loss(graphdef: Any, lora: Any, frozen: Any, batch: tuple, capacity: int) -> jax.Array:
    """Loss of the model in eval mode (no dropout) on ``batch``: the held-out (dev) loss."""
    model = nnx.merge(graphdef, lora, frozen)
    model.eval()
    return target_loss(model, batch, capacity)


def make_update(tx: optax.GradientTransformation) -> Callable:
    """A jitted ``(grads, opt_state, lora) -> (lora, opt_state)`` step of ``tx``."""

    @functools.partial(jax.jit, donate_argnums=(1, 2))
    def update(grads: Any, opt_state: Any, lora: Any) -> tuple[Any, Any]:
        updates, opt_state = tx.update(grads, opt_state, lora)
        return optax.apply_updates(lora, updates), opt_state

    return update


# ------------------------------------------------------------------------------ checkpoints


def checkpoint_manager(directory: Path) -> ocp.CheckpointManager:
    """Orbax manager of one optimizer's run (the two latest steps are kept)."""
    options = ocp.CheckpointManagerOptions(max_to_keep=2)
    return ocp.CheckpointManager(directory.resolve(), options=options)


def save_checkpoint(
    manager: ocp.CheckpointManager,
    lora: Any,
    opt_state: Any,
    losses: list[float],
    dev: list[tuple[int, float]],
    seconds: float,
) -> None:
    """LoRA factors and optimizer state (Orbax ``StandardSave``) plus the train losses, the
    ``(step, dev loss)`` history and the training seconds so far (JSON)."""
    state = {"lora": lora, "opt_state": opt_state}
    meta = {"losses": losses, "dev": [list(d) for d in dev], "seconds": seconds}
    manager.save(
        len(losses),
        args=ocp.args.Composite(state=ocp.args.StandardSave(state), meta=ocp.args.JsonSave(meta)),
    )


def restore_checkpoint(
    manager: ocp.CheckpointManager, lora: Any, opt_state: Any
) -> tuple[Any, Any, list[float], list[tuple[int, float]], float]:
    """The latest checkpoint, restored with the shapes, dtypes and shardings of the arguments."""
    target = jax.tree.map(ocp.utils.to_shape_dtype_struct, {"lora": lora, "opt_state": opt_state})
    restored = manager.restore(
        manager.latest_step(),
        args=ocp.args.Composite(
            state=ocp.args.StandardRestore(target), meta=ocp.args.JsonRestore()
        ),
    )
    dev = [(int(step), float(loss)) for step, loss in restored.meta["dev"]]
    meta = restored.meta
    return restored.state["lora"], restored.state["opt_state"], meta["losses"], dev, meta["seconds"]


# ------------------------------------------------------------------------------ run


class PhaseTimer:
    """Wall-clock seconds per phase (setup, compile, train, decode, metrics, ...)."""

    def __init__(self) -> None:
        self.seconds: dict[str, float] = defaultdict(float)

    @staticmethod
    def cpu() -> float:
        """CPU seconds of this process (all threads; child processes such as java excluded)."""
        t = os.times()
        return t.user + t.system

    def phase(self, name: str) -> _Phase:
        """A context manager adding its duration to phase ``name``."""
        return _Phase(self, name)

    def summary(self) -> str:
        parts = ", ".join(f"{k} {v:.0f} s" for k, v in self.seconds.items())
        return f"{parts}; total {sum(self.seconds.values()):.0f} s"


class _Phase:
    def __init__(self, timer: PhaseTimer, name: str) -> None:
        self.timer, self.name = timer, name

    def __enter__(self) -> None:
        self.start = time.perf_counter()

    def __exit__(self, *exc: object) -> None:
        self.timer.seconds[self.name] += time.perf_counter() - self.start


@dataclasses.dataclass
class Trained:
    """One seed's run: factors and optimizer state after training, the train loss of every
    step, the ``(step, dev loss)`` history and the wall seconds of training (those of the
    interrupted runs included when resumed)."""

    lora: Any
    opt_state: Any
    losses: list[float]
    dev: list[tuple[int, float]]
    seconds: float


@dataclasses.dataclass
class Result:
    """One row of the table: per seed the train losses, the dev-loss history (``(0, base
    model's dev loss)`` first) and the metrics (empty without evaluation)."""

    name: str
    learning_rate: float | None
    losses: list[list[float]]
    dev: list[list[tuple[int, float]]]
    metrics: list[dict]
    train_seconds: float  # mean over the seeds

    @property
    def final_dev(self) -> list[float]:
        """The last dev loss of every seed."""
        return [d[-1][1] for d in self.dev]


@dataclasses.dataclass
class DevSet:
    """The held-out batch (first reference of each of the first ``--dev-size`` dev MRs)."""

    batch: tuple[np.ndarray, ...]
    capacity: int

    def loss(self, setup: LoRAModel, lora: Any) -> float:
        """Mean cross-entropy of the references, in eval mode."""
        batch = setup.shard_batch(self.batch)
        return float(eval_loss(setup.graphdef, lora, setup.frozen, batch, self.capacity))


def dev_set(tokenizer: GPT2Tokenizer, args: argparse.Namespace) -> DevSet:
    """:class:`DevSet` of ``--dev-size`` MRs (the batch is padded to a multiple of the mesh's
    data axis with weightless rows)."""
    groups = e2e.group_references(e2e.read_split(args.data, "dev"))[: args.dev_size]
    rows = [(src, refs[0]) for src, refs in groups]
    data = e2e.pack(e2e.encode_pairs(tokenizer, rows), args.max_len)
    multiple = 8
    pad = -len(rows) % multiple
    data = tuple(np.concatenate([a, np.zeros((pad, *a.shape[1:]), a.dtype)]) for a in data)
    return DevSet(data, head_capacity(data[2]))


def train(
    name: str,
    learning_rate: float,
    setup: LoRAModel,
    args: argparse.Namespace,
    data: tuple[np.ndarray, ...],
    timer: PhaseTimer,
    dev: DevSet | None = None,
    seed: int | None = None,
) -> Trained:
    """Fine-tune the initial factors of ``setup`` with optimizer ``name`` (seed ``seed``,
    default ``--seed``: data order and dropout; ``setup`` holds the seed's initial factors).

    Step ``t`` uses batch ``t`` of :func:`e2e.batches` and dropout key ``fold_in(key, t)``, so
    a run resumed from a checkpoint continues exactly as an uninterrupted one. With ``dev`` the
    dev loss is measured every ``--dev-every`` steps and after the last. The first call of
    each compiled function (the gradient per head capacity, shared by all optimizers, and this
    optimizer's update) is timed as ``compile``, the other steps as ``train``.
    """
    seed = args.seed if seed is None else seed
    tx = make_optimizer(name, learning_rate, args.alpha / args.rank, args.steps)
    update = make_update(tx)
    lora = jax.tree.map(jnp.copy, setup.lora)
    opt_state = setup.replicate_loose(tx.init(lora))
    directory = args.out / "checkpoints" / name / f"seed{seed}"
    if not args.resume:
        shutil.rmtree(directory, ignore_errors=True)
    manager = checkpoint_manager(directory)
    losses: list[float] = []
    history: list[tuple[int, float]] = []
    seconds = 0.0  # training time of earlier runs of a resumed run
    if args.resume and manager.latest_step() is not None:
        lora, opt_state, losses, history, seconds = restore_checkpoint(manager, lora, opt_state)
    key = jax.random.key(seed + 2)
    stream = e2e.batches(data, args.batch_size, seed, start_step=len(losses))
    start, first_update = time.perf_counter(), True
    elapsed = lambda: time.perf_counter() - start  # noqa: E731
    desc = f"{name} seed {seed}"
    for step in (bar := tqdm(range(len(losses), args.steps), desc=desc, file=sys.stderr)):
        batch = next(stream)
        capacity = head_capacity(batch[2])
        with timer.phase("compile" if capacity not in setup.compiled else "train"):
            loss, grads = loss_and_grad(
                setup.graphdef,
                lora,
                setup.frozen,
                setup.shard_batch(batch),
                key,
                np.int32(step),
                capacity,
            )
            jax.block_until_ready(loss)
        setup.compiled.add(capacity)
        with timer.phase("compile" if first_update else "train"):
            lora, opt_state = update(grads, opt_state, lora)
            losses.append(float(loss))
        first_update = False
        if dev is not None and ((step + 1) % args.dev_every == 0 or step + 1 == args.steps):
            with timer.phase("dev loss"):
                history.append((step + 1, dev.loss(setup, lora)))
        bar.set_postfix(loss=f"{losses[-1]:.3f}", dev=f"{history[-1][1]:.3f}" if history else "-")
        if args.save_every and (step + 1) % args.save_every == 0:
            save_checkpoint(manager, lora, opt_state, losses, history, seconds + elapsed())
    seconds += elapsed()
    with timer.phase("checkpoint"):
        if manager.latest_step() != len(losses):
            save_checkpoint(manager, lora, opt_state, losses, history, seconds)
        manager.wait_until_finished()
        manager.close()
    return Trained(lora, opt_state, losses, history, seconds)


def decode(
    model: GPT2,
    tokenizer: GPT2Tokenizer,
    groups: list[tuple[str, list[str]]],
    args: argparse.Namespace,
) -> list[str]:
    """Decode the source of every group (greedy or ``--beams`` beam search)."""
    prompts = [e2e.encode_prompt(tokenizer, src) for src, _ in groups]
    outputs = generate(
        model,
        prompts,
        max_new_tokens=args.max_new_tokens,
        eos_id=tokenizer.eos_token_id,
        num_beams=args.beams,
        batch_size=50 if args.beams == 1 else 8,
    )
    return [tokenizer.decode(o).strip() for o in outputs]


def mean_sd(values: list[float], digits: int) -> str:
    """``"mean ± sd"`` (sample standard deviation) of ``values``; just the mean for one value,
    ``n/a`` for none."""
    if not values:
        return "n/a"
    if len(values) == 1:
        return f"{values[0]:.{digits}f}"
    return f"{np.mean(values):.{digits}f} ± {np.std(values, ddof=1):.{digits}f}"


METRIC_DIGITS = {"BLEU": 2, "NIST": 3, "METEOR": 2, "ROUGE-L": 2, "CIDEr": 3}


def metrics_table(results: list[Result], args: argparse.Namespace, n_eval: int) -> str:
    """Markdown table: dev loss and every metric as mean ± sd over the seeds (METEOR ``n/a``
    when java is unavailable; no metric columns without evaluation)."""
    decoding = "greedy" if args.beams == 1 else f"beam {args.beams}"
    head = (
        f"LoRA r={args.rank}, alpha={args.alpha:g} on q,v of c_attn; {args.steps} steps of batch "
        f"{args.batch_size}, warm-up {WARMUP_FRACTION:.0%} + cosine; mean ± sd over "
        f"{args.seeds} seed(s); dev loss = held-out loss on {args.dev_size} dev MRs after the "
        f"last step"
    )
    head += f"; metrics on {n_eval} {args.eval_split} MRs, {decoding} decoding." if n_eval else "."
    columns = ["optimizer", "lr", "dev loss"]
    columns += list(METRIC_DIGITS) if n_eval else []
    columns += ["train s / seed"]
    lines = [head, "", "| " + " | ".join(columns) + " |", "|" + " --- |" * len(columns)]
    for r in results:
        cells = [r.name, "-" if r.learning_rate is None else f"{r.learning_rate:g}"]
        cells.append(mean_sd(r.final_dev, 3))
        if n_eval:
            for metric, digits in METRIC_DIGITS.items():
                values = [m[metric] for m in r.metrics if m[metric] is not None]
                cells.append(mean_sd(values, digits))
        cells.append("-" if r.learning_rate is None else f"{r.train_seconds:.0f}")
        lines.append("| " + " | ".join(cells) + " |")
    return "\n".join(lines) + "\n"


LINE_STYLES = ["-", "--", "-.", ":"]


def plot_losses(results: list[Result], path: Path) -> None:
    """Dev loss vs step of every optimizer: mean over the seeds with a ±sd band, the base
    model's dev loss as a reference line; the right panel zooms into the second half."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    base = next((r for r in results if r.learning_rate is None), None)
    runs = [r for r in results if r.learning_rate is not None and r.dev and r.dev[0]]
    fig, axes = plt.subplots(1, 2, figsize=(12, 4.8), width_ratios=[1, 1.25])
    colours = plt.get_cmap("tab10").colors
    last = max((d[-1][0] for r in runs for d in r.dev), default=1)
    for i, r in enumerate(runs):
        steps = np.array([s for s, _ in r.dev[0]])
        values = np.array([[v for _, v in d] for d in r.dev if len(d) == len(steps)])
        mean = values.mean(axis=0)
        sd = values.std(axis=0, ddof=1) if len(values) > 1 else np.zeros_like(mean)
        style = {"color": colours[i % len(colours)], "linestyle": LINE_STYLES[i % 4]}
        for ax in axes:
            ax.plot(steps, mean, lw=1.8, label=r.name, **style)
            ax.fill_between(steps, mean - sd, mean + sd, color=style["color"], alpha=0.18, lw=0)
    if base is not None and base.dev:
        axes[0].axhline(base.final_dev[0], color="black", lw=1.2, ls=(0, (1, 3)),
                        label=f"base model ({base.final_dev[0]:.2f})")  # fmt: skip
    finals = [np.mean(r.final_dev) for r in runs]
    if finals:
        half = [v for r in runs for d in r.dev for s, v in d if s >= last / 2]
        pad = 0.05 * (max(half) - min(half) + 1e-3)
        axes[1].set_ylim(min(half) - pad, max(half) + pad)
        axes[1].set_xlim(last / 2, last)
    axes[0].set(xlabel="step", ylabel="dev loss (nats / token)", title="held-out loss")
    axes[1].set(xlabel="step", title="second half (zoom)")
    for ax in axes:
        ax.grid(alpha=0.3)
    handles, labels = axes[1].get_legend_handles_labels()
    if base is not None and base.dev:
        handles += axes[0].get_legend_handles_labels()[0][-1:]
        labels += axes[0].get_legend_handles_labels()[1][-1:]
    axes[1].legend(handles, labels, loc="center left", bbox_to_anchor=(1.02, 0.5), frameon=False)
    fig.suptitle("LoRA fine-tuning of the bundled GPT-2: mean ± sd over seeds")
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    plt.close(fig)


def eval_groups(args: argparse.Namespace) -> list[tuple[str, list[str]]]:
    """The first ``--eval-size`` MRs of the evaluation split with their references."""
    if args.eval_size == 0:
        return []
    groups = e2e.group_references(e2e.read_split(args.data, args.eval_split))
    return groups if args.eval_size < 0 else groups[: args.eval_size]


def evaluate_all(
    base: Result,
    base_setup: LoRAModel,
    trained: dict[str, list[tuple[LoRAModel, Trained]]],
    seeds: list[int],
    tokenizer: GPT2Tokenizer,
    groups: list[tuple[str, list[str]]],
    args: argparse.Namespace,
    timer: PhaseTimer,
) -> tuple[dict[str, list[list[str]]], dict[str, list[dict]]]:
    """Decode and score the base model and every trained model: ``{name: [per seed]}`` of
    outputs and of metrics.

    Each run's outputs and scores are kept next to its checkpoint (``eval.json``, with the
    evaluation settings and the step); ``--resume`` reuses them when those match, so a resumed
    run re-evaluates only what changed.
    """
    models = [(base.name, base_setup, base_setup.lora, None)]
    for name, runs in trained.items():
        for seed, (setup, run) in zip(seeds, runs, strict=True):
            cache = args.out / "checkpoints" / name / f"seed{seed}" / "eval.json"
            models.append((name, setup, run.lora, (cache, len(run.losses))))
    settings = {k: getattr(args, k) for k in ("eval_split", "eval_size", "beams", "max_new_tokens")}
    settings["meteor"] = not args.no_meteor
    done: dict[int, dict] = {}
    for i, (_, _, _, cache) in enumerate(models):
        if cache is not None and args.resume and cache[0].exists():
            saved = json.loads(cache[0].read_text())
            if saved["settings"] == settings and saved["step"] == cache[1]:
                done[i] = saved
    todo = [i for i in range(len(models)) if i not in done]
    with timer.phase("decode"):
        for i in tqdm(todo, desc="decode", file=sys.stderr):
            _, setup, lora, _ = models[i]
            done[i] = {"hyps": decode(setup.module(lora), tokenizer, groups, args)}
    with timer.phase("metrics"):
        refs = [r for _, r in groups]
        for i in tqdm(todo, desc="score", file=sys.stderr):
            done[i]["scores"] = e2e_metrics(done[i]["hyps"], refs, use_meteor=not args.no_meteor)
            if (cache := models[i][3]) is not None:
                saved = {"settings": settings, "step": cache[1], **done[i]}
                cache[0].write_text(json.dumps(saved))
    hyps: dict[str, list[list[str]]] = {}
    scores: dict[str, list[dict]] = {}
    for i, (name, *_) in enumerate(models):
        hyps.setdefault(name, []).append(done[i]["hyps"])
        scores.setdefault(name, []).append(done[i]["scores"])
    return hyps, scores


_CACHE_OPTIONS = {
    "jax_compilation_cache_dir": None,  # set from the directory
    "jax_persistent_cache_min_compile_time_secs": 0.0,
    "jax_persistent_cache_min_entry_size_bytes": 0,
}


@contextlib.contextmanager
def compilation_cache(directory: str):
    """Persist compiled XLA executables in ``directory`` (``""``: off) while the block runs, so
    that a second run skips the compilation of the gradient, the updates and decoding.

    JAX's cache is process-global: the previous settings are restored on exit, so a caller that
    runs :func:`main` in-process (a test, a notebook) does not go on writing every later
    compilation into this directory."""
    if not directory:
        yield
        return
    from jax.experimental.compilation_cache import compilation_cache as jax_cache

    saved = {name: getattr(jax.config, name) for name in _CACHE_OPTIONS}
    wanted = {**_CACHE_OPTIONS, "jax_compilation_cache_dir": str(Path(directory).resolve())}
    jax_cache.reset_cache()
    for name, value in wanted.items():
        jax.config.update(name, value)
    try:
        yield
    finally:
        for name, value in saved.items():
            jax.config.update(name, value)
        jax_cache.reset_cache()


def main(argv: list[str] | None = None) -> list[Result]:
    """Run the job; returns the base-model row and one result per optimizer.

    Writes ``metrics.md`` (and the per-seed numbers, ``metrics.json``) only when it evaluates
    (``--eval-size`` ≠ 0): a run without evaluation writes its table of dev losses to
    ``losses.md`` (``losses.json``) and leaves a scored table alone.
    """
    args = parse_args(argv)
    with compilation_cache(args.jax_cache):
        return _run(args)


def _run(args: argparse.Namespace) -> list[Result]:
    timer = PhaseTimer()
    start, cpu_start = time.perf_counter(), PhaseTimer.cpu()
    chosen = parse_optimizers(args.optimizers, args.lr_scale)
    seeds = list(range(args.seed, args.seed + args.seeds))
    args.out.mkdir(parents=True, exist_ok=True)
    with timer.phase("setup"):
        tokenizer = GPT2Tokenizer.load(args.checkpoint)
        pairs = e2e.encode_pairs(tokenizer, e2e.read_split(args.data, "train"))
        data = e2e.pack(pairs, args.max_len)
        groups = eval_groups(args)
        dev = dev_set(tokenizer, args)
        setups = {(False, seeds[0]): lora_model(args, seed=seeds[0])}
    base_setup = setups[(False, seeds[0])]
    if base_setup.mesh is not None and args.batch_size % base_setup.mesh.shape["data"]:
        raise SystemExit(f"--batch-size {args.batch_size} must divide by the data axis")

    with timer.phase("dev loss"):  # b = 0: the factors leave the base model's function unchanged
        base_dev = dev.loss(base_setup, base_setup.lora)
    base = Result("base model (no fine-tuning)", None, [], [[(0, base_dev)]], [], 0.0)
    trained: dict[str, list[tuple[LoRAModel, Trained]]] = {}
    for name in chosen:
        stats = OPTIMIZERS[name].grad_stats
        for seed in seeds:
            if (stats, seed) not in setups:
                with timer.phase("setup"):
                    setups[(stats, seed)] = lora_model(args, grad_stats=stats, seed=seed)
            setup = setups[(stats, seed)]
            run = train(name, chosen[name], setup, args, data, timer, dev, seed)
            run.dev.insert(0, (0, base_dev))
            trained.setdefault(name, []).append((setup, run))

    scores: dict[str, list[dict]] = {}
    if groups:
        hyps, scores = evaluate_all(
            base, base_setup, trained, seeds, tokenizer, groups, args, timer
        )
        base.metrics = scores[base.name]
        for name in trained:
            samples = [f"{s}\n  -> {h}\n" for (s, _), h in zip(groups, hyps[name][0], strict=True)]
            (args.out / f"samples_{name}.txt").write_text("\n".join(samples))
    results = [base]
    for name, runs in trained.items():
        results.append(
            Result(
                name,
                chosen[name],
                [run.losses for _, run in runs],
                [run.dev for _, run in runs],
                scores.get(name, []),
                float(np.mean([run.seconds for _, run in runs])),
            )
        )

    with timer.phase("report"):
        table = metrics_table(results, args, len(groups))
        plot_losses(results, args.out / "loss.png")
    wall, cpu = time.perf_counter() - start, PhaseTimer.cpu() - cpu_start
    timing = f"Wall time: {timer.summary()} (measured {wall:.0f} s; process CPU {cpu:.0f} s)."
    report = "metrics" if groups else "losses"
    (args.out / f"{report}.md").write_text(f"{table}\n{timing}\n")
    rows = [{"name": r.name, "learning_rate": r.learning_rate, "losses": r.losses, "dev": r.dev,
             "metrics": r.metrics, "train_seconds": r.train_seconds} for r in results]  # fmt: skip
    (args.out / f"{report}.json").write_text(json.dumps({"rows": rows, "wall_s": wall}, indent=1))
    print(table)
    print(timing)
    return results


if __name__ == "__main__":
    main()
