"""LoRA fine-tuning of GPT-2 on E2E-style data-to-text with several lowrank_optax optimizers.

    python examples/gpt2/finetune.py                  # bundled model + data, all optimizers

The script injects LoRA factors (q and v slices of every fused ``attn.c_attn``; rank 4, alpha
32 by default, as in the LoRA papers) into the base model once; every optimizer then trains
the same initial factors, the trained model decodes the evaluation MRs (greedy by default)
and BLEU, NIST, METEOR, ROUGE-L and CIDEr score the outputs. It prints the metrics table and
writes ``metrics.md``, ``loss.png``, ``samples_<optimizer>.txt`` and an Orbax checkpoint per
optimizer (LoRA factors + optimizer state, ``checkpoints/<optimizer>/``) under ``--out``;
``--resume`` continues from those checkpoints exactly where they stopped.

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
from lowrank_optax.models import GPT2, GPT2Tokenizer, e2e, generate, load_gpt2
from lowrank_optax.models.metrics import e2e_metrics

HERE = Path(__file__).resolve().parent
WARMUP_STEPS = 10


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


# Learning rates for the bundled model (rank 4, alpha 32, batch 8, 100 steps, linear warm-up
# over 10 steps, then constant): per method, the lowest mean train loss of the last 10 steps in
# a sweep over half-decades (docs/gpt2_example.md lists it). AltLoRA divides its step by
# scale² = 64 (its eq. (8)), hence the large value; AdamS and LRACS normalise their step in
# the space of ΔW before lifting it to the factors and want about 10× less than Adam.
OPTIMIZERS: dict[str, OptimizerSpec] = {
    "adamw": OptimizerSpec(5e-3, factory=_adamw),
    "scaled_sgd": OptimizerSpec(3e-2),
    "scaled_adamw": OptimizerSpec(1e-2),
    "loraplus_adamw": OptimizerSpec(1e-3, factory=_loraplus_adamw),
    "adams": OptimizerSpec(1e-3),
    "lracs": OptimizerSpec(3e-4),
    "altlora": OptimizerSpec(3.0),
    "lora_rite": OptimizerSpec(3e-3),
    "lora_pro_adamw": OptimizerSpec(1e-2),
    "solora_adamw": OptimizerSpec(1e-2, {"moment": "factor"}, grad_stats=True),
}


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    """Command-line flags (``--help`` lists them)."""
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--checkpoint", type=Path, default=HERE / "checkpoint", help="HF GPT-2 dir")
    p.add_argument("--data", type=Path, default=HERE / "data", help="E2E csv or txt files")
    p.add_argument("--out", type=Path, default=Path("runs/gpt2_e2e"))
    p.add_argument(
        "--optimizers",
        default="",
        help="comma list of NAME or NAME=LR (overrides the table lr); default: every one",
    )
    p.add_argument("--rank", type=int, default=4)
    p.add_argument("--alpha", type=float, default=32.0)
    p.add_argument("--steps", type=int, default=100)
    p.add_argument("--batch-size", type=int, default=8)
    p.add_argument("--max-len", type=int, default=128, help="tokens per training sequence")
    p.add_argument("--lr-scale", type=float, default=1.0, help="multiplies every table lr")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--mesh", default="", help="DATAxMODEL device mesh, e.g. 4x2")
    p.add_argument("--eval-split", choices=["dev", "test"], default="test")
    p.add_argument(
        "--eval-size", type=int, default=100, help="first N MRs; -1 = all; 0 = no evaluation"
    )
    p.add_argument("--beams", type=int, default=1, help="1 = greedy; the papers use 10")
    p.add_argument("--max-new-tokens", type=int, default=64)
    p.add_argument("--no-meteor", action="store_true", help="skip METEOR (needs java)")
    p.add_argument("--resume", action="store_true", help="continue from --out checkpoints")
    p.add_argument("--save-every", type=int, default=0, help="also checkpoint every N steps")
    return p.parse_args(argv)


# ------------------------------------------------------------------------------ optimizers


def available_optimizers() -> list[str]:
    """Names of the table whose optimizer exists at run time."""
    return [n for n, spec in OPTIMIZERS.items() if spec.factory or hasattr(lowrank_optax, n)]


def parse_optimizers(spec: str, lr_scale: float) -> dict[str, float]:
    """``"adamw,lora_rite=0.01"`` -> ``{name: learning rate}`` (table lr × ``lr_scale``)."""
    names = spec.split(",") if spec else available_optimizers()
    chosen = {}
    for item in names:
        name, _, lr = item.partition("=")
        if name not in available_optimizers():
            raise SystemExit(
                f"unknown or unavailable optimizer {name!r}; have {available_optimizers()}"
            )
        chosen[name] = float(lr) if lr else OPTIMIZERS[name].learning_rate * lr_scale
    return chosen


def make_optimizer(
    name: str, learning_rate: float, lora_scale: float
) -> optax.GradientTransformation:
    """Build ``name`` from the table; methods with a ``scale`` argument get ``alpha / rank``."""
    spec = OPTIMIZERS[name]
    factory = spec.factory or getattr(lowrank_optax, name)
    kwargs = dict(spec.kwargs)
    if "scale" in inspect.signature(factory).parameters:
        kwargs["scale"] = lora_scale
    schedule = optax.linear_schedule(0.0, learning_rate, WARMUP_STEPS)
    return factory(schedule, **kwargs)


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


def lora_model(args: argparse.Namespace, grad_stats: bool = False) -> LoRAModel:
    """Load the base model and add factors on the q and v slices of every ``c_attn``.

    With a mesh the factors carry sharding metadata — ``lora_a`` ``(2, in, r)`` split along
    ``in`` and ``lora_b`` ``(2, r, out)`` along ``out`` over the ``model`` axis — and are
    created sharded; the frozen weights are replicated. With ``grad_stats`` every pair also
    gets a statistics probe (``lora_stats``, replicated): its gradient is the row and column
    sums of ``G⊙G`` of the slice's full weight gradient ``G``, reduced inside the backward pass
    (SoLoRA's exact metric). The factors are the same as without it (same seeds).
    """
    mesh = make_mesh(args.mesh)
    model = load_gpt2(args.checkpoint, rngs=nnx.Rngs(args.seed))
    d = model.config.n_embd
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
            rngs=nnx.Rngs(args.seed + 1),
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
    manager: ocp.CheckpointManager, lora: Any, opt_state: Any, losses: list[float]
) -> None:
    """LoRA factors and optimizer state (Orbax ``StandardSave``) plus the losses (JSON)."""
    state = {"lora": lora, "opt_state": opt_state}
    manager.save(
        len(losses),
        args=ocp.args.Composite(
            state=ocp.args.StandardSave(state), meta=ocp.args.JsonSave({"losses": losses})
        ),
    )


def restore_checkpoint(
    manager: ocp.CheckpointManager, lora: Any, opt_state: Any
) -> tuple[Any, Any, list[float]]:
    """The latest checkpoint, restored with the shapes, dtypes and shardings of the arguments."""
    target = jax.tree.map(ocp.utils.to_shape_dtype_struct, {"lora": lora, "opt_state": opt_state})
    restored = manager.restore(
        manager.latest_step(),
        args=ocp.args.Composite(
            state=ocp.args.StandardRestore(target), meta=ocp.args.JsonRestore()
        ),
    )
    return restored.state["lora"], restored.state["opt_state"], restored.meta["losses"]


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
    """Factors and optimizer state after training, the losses of every step, wall seconds."""

    lora: Any
    opt_state: Any
    losses: list[float]
    seconds: float


@dataclasses.dataclass
class Result:
    """One row of the metrics table (``metrics`` is None without evaluation)."""

    name: str
    learning_rate: float | None
    losses: list[float]
    metrics: dict | None
    train_seconds: float


def train(
    name: str,
    learning_rate: float,
    setup: LoRAModel,
    args: argparse.Namespace,
    data: tuple[np.ndarray, ...],
    timer: PhaseTimer,
) -> Trained:
    """Fine-tune the initial factors with optimizer ``name``.

    Step ``t`` uses batch ``t`` of :func:`e2e.batches` and dropout key ``fold_in(key, t)``, so
    a run resumed from a checkpoint continues exactly as an uninterrupted one. The first call
    of each compiled function (the gradient per head capacity, shared by all optimizers, and
    this optimizer's update) is timed as ``compile``, the other steps as ``train``.
    """
    tx = make_optimizer(name, learning_rate, args.alpha / args.rank)
    update = make_update(tx)
    lora = jax.tree.map(jnp.copy, setup.lora)
    opt_state = setup.replicate_loose(tx.init(lora))
    directory = args.out / "checkpoints" / name
    if not args.resume:
        shutil.rmtree(directory, ignore_errors=True)
    manager = checkpoint_manager(directory)
    losses: list[float] = []
    if args.resume and manager.latest_step() is not None:
        lora, opt_state, losses = restore_checkpoint(manager, lora, opt_state)
    key = jax.random.key(args.seed + 2)
    stream = e2e.batches(data, args.batch_size, args.seed, start_step=len(losses))
    start, first_update = time.perf_counter(), True
    for step in (bar := tqdm(range(len(losses), args.steps), desc=name, file=sys.stderr)):
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
        bar.set_postfix(loss=f"{losses[-1]:.3f}")
        if args.save_every and (step + 1) % args.save_every == 0:
            save_checkpoint(manager, lora, opt_state, losses)
    with timer.phase("checkpoint"):
        if manager.latest_step() != len(losses):
            save_checkpoint(manager, lora, opt_state, losses)
        manager.wait_until_finished()
        manager.close()
    return Trained(lora, opt_state, losses, time.perf_counter() - start)


def evaluate(
    model: GPT2,
    tokenizer: GPT2Tokenizer,
    groups: list[tuple[str, list[str]]],
    args: argparse.Namespace,
    timer: PhaseTimer,
) -> tuple[list[str], dict]:
    """Decode every source and score against its references."""
    prompts = [e2e.encode_prompt(tokenizer, src) for src, _ in groups]
    with timer.phase("decode"):
        outputs = generate(
            model,
            prompts,
            max_new_tokens=args.max_new_tokens,
            eos_id=tokenizer.eos_token_id,
            num_beams=args.beams,
            batch_size=50 if args.beams == 1 else 8,
        )
    hyps = [tokenizer.decode(o).strip() for o in outputs]
    with timer.phase("metrics"):
        scores = e2e_metrics(hyps, [refs for _, refs in groups], use_meteor=not args.no_meteor)
    return hyps, scores


def metrics_table(results: list[Result], args: argparse.Namespace, n_eval: int) -> str:
    """Markdown table of the scores (METEOR ``n/a`` when java is unavailable)."""
    decoding = "greedy" if args.beams == 1 else f"beam {args.beams}"
    lines = [
        f"E2E-style {args.eval_split} set, {n_eval} MRs, {decoding} decoding; "
        f"LoRA r={args.rank}, alpha={args.alpha:g} on q,v of c_attn; {args.steps} steps, "
        f"batch {args.batch_size}; final loss = mean train loss of the last 10 steps.",
        "",
        "| optimizer | lr | final loss | BLEU | NIST | METEOR | ROUGE-L | CIDEr | train s |",
        "| --- | --- | --- | --- | --- | --- | --- | --- | --- |",
    ]
    for r in results:
        lr = "-" if r.learning_rate is None else f"{r.learning_rate:g}"
        loss = f"{np.mean(r.losses[-10:]):.3f}" if r.losses else "-"
        if r.metrics is None:
            scores = ["-"] * 5
        else:
            m = r.metrics
            scores = [
                f"{m['BLEU']:.2f}",
                f"{m['NIST']:.3f}",
                "n/a" if m["METEOR"] is None else f"{m['METEOR']:.2f}",
                f"{m['ROUGE-L']:.2f}",
                f"{m['CIDEr']:.3f}",
            ]
        cells = [r.name, lr, loss, *scores, f"{r.train_seconds:.0f}"]
        lines.append("| " + " | ".join(cells) + " |")
    return "\n".join(lines) + "\n"


def plot_losses(results: list[Result], path: Path) -> None:
    """Training loss of every optimizer (EMA-smoothed) on one plot."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(7, 4.5))
    for r in results:
        if not r.losses:
            continue
        smooth, ema = [], r.losses[0]
        for x in r.losses:
            ema = 0.8 * ema + 0.2 * x
            smooth.append(ema)
        ax.plot(np.arange(1, len(smooth) + 1), smooth, label=r.name)
    ax.set(xlabel="step", ylabel="train loss (EMA 0.8)", yscale="log", title="LoRA fine-tuning")
    ax.legend()
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    plt.close(fig)


def eval_groups(args: argparse.Namespace) -> list[tuple[str, list[str]]]:
    """The first ``--eval-size`` MRs of the evaluation split with their references."""
    if args.eval_size == 0:
        return []
    groups = e2e.group_references(e2e.read_split(args.data, args.eval_split))
    return groups if args.eval_size < 0 else groups[: args.eval_size]


def main(argv: list[str] | None = None) -> list[Result]:
    """Run the job; returns the base-model row (when evaluating) and one result per optimizer."""
    args = parse_args(argv)
    timer = PhaseTimer()
    start, cpu_start = time.perf_counter(), PhaseTimer.cpu()
    chosen = parse_optimizers(args.optimizers, args.lr_scale)
    args.out.mkdir(parents=True, exist_ok=True)
    with timer.phase("setup"):
        tokenizer = GPT2Tokenizer.load(args.checkpoint)
        pairs = e2e.encode_pairs(tokenizer, e2e.read_split(args.data, "train"))
        data = e2e.pack(pairs, args.max_len)
        groups = eval_groups(args)
        setup = lora_model(args)
    if setup.mesh is not None and args.batch_size % setup.mesh.shape["data"]:
        raise SystemExit(f"--batch-size {args.batch_size} must divide by the data axis")

    results = []
    if groups:  # b = 0: the factors leave the base model's function unchanged
        _, scores = evaluate(setup.module(setup.lora), tokenizer, groups, args, timer)
        results.append(Result("base model (no fine-tuning)", None, [], scores, 0.0))
    setups = {False: setup}
    for name, lr in chosen.items():
        stats = OPTIMIZERS[name].grad_stats
        if stats not in setups:
            with timer.phase("setup"):
                setups[stats] = lora_model(args, grad_stats=stats)
        run = train(name, lr, setups[stats], args, data, timer)
        scores = None
        if groups:
            model = setups[stats].module(run.lora)
            hyps, scores = evaluate(model, tokenizer, groups, args, timer)
            samples = [f"{src}\n  -> {hyp}\n" for (src, _), hyp in zip(groups, hyps, strict=True)]
            (args.out / f"samples_{name}.txt").write_text("\n".join(samples))
        results.append(Result(name, lr, run.losses, scores, run.seconds))

    with timer.phase("report"):
        table = metrics_table(results, args, len(groups))
        plot_losses(results, args.out / "loss.png")
    wall, cpu = time.perf_counter() - start, PhaseTimer.cpu() - cpu_start
    timing = f"Wall time: {timer.summary()} (measured {wall:.0f} s; process CPU {cpu:.0f} s)."
    (args.out / "metrics.md").write_text(f"{table}\n{timing}\n")
    print(table)
    print(timing)
    return results


if __name__ == "__main__":
    main()
