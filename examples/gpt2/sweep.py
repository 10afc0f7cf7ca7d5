"""Learning-rate sweep behind the ``OPTIMIZERS`` table of ``finetune.py``.

    python examples/gpt2/sweep.py                      # every optimizer, ~15 min on 2 cores
    python examples/gpt2/sweep.py --optimizers adamw   # one (re)sweep

Every optimizer runs the default recipe of ``finetune.py`` (same steps, batch, warm-up +
cosine schedule, LoRA rank and alpha) with one seed that the reported runs do not use (seed
10: the sweep does not pick the seeds it is scored on), at its current table value and half a
decade above; the grid is extended by half-decades while the best rate is at its edge (at most
``--max-points`` rates). The criterion is the dev loss after the last step
(the held-out loss the table reports). Results accumulate in ``sweep.json`` (a rate already
measured with the same recipe is not run again) and are written as the table ``sweep.md``,
best rate in bold; both are committed, and ``OPTIMIZERS`` takes the bold values.
"""

from __future__ import annotations

import argparse
import json
import math
from pathlib import Path

import e2e
import finetune
from tokenizer import GPT2Tokenizer

HERE = Path(__file__).resolve().parent
HALF_DECADE = math.sqrt(10.0)


def recipe(args: argparse.Namespace) -> dict:
    """What a measured rate depends on besides the optimizer (a change invalidates it)."""
    keys = ("steps", "batch_size", "rank", "alpha", "max_len", "dev_size", "seed")
    return {k: getattr(args, k) for k in keys} | {"warmup_fraction": finetune.WARMUP_FRACTION}


def grid_key(lr: float) -> str:
    """The JSON key of a rate (3 significant digits)."""
    return f"{lr:.3g}"


def next_rate(losses: dict[float, float], max_points: int) -> float | None:
    """The next rate to try: one half-decade beyond the best rate when it is at an edge of
    the measured grid (and the grid has fewer than ``max_points`` rates), else ``None``.

    Diverged runs (``inf``) count as measured; a best rate next to one is interior."""
    if len(losses) >= max_points:
        return None
    rates = sorted(losses)
    best = min(rates, key=lambda lr: losses[lr])
    if not math.isfinite(losses[best]):
        return None
    if best == rates[0]:
        return best / HALF_DECADE
    if best == rates[-1]:
        return best * HALF_DECADE
    return None


def markdown(results: dict, meta: dict) -> str:
    """The sweep as a table: per optimizer every rate with its dev loss, the best in bold."""
    lines = [
        f"Learning-rate sweep of `finetune.py`'s recipe ({meta['steps']} steps of batch "
        f"{meta['batch_size']}, warm-up {meta['warmup_fraction']:.0%} + cosine, LoRA "
        f"r={meta['rank']}, alpha={meta['alpha']:g}, seed {meta['seed']}): dev loss after the "
        f"last step on {meta['dev_size']} dev MRs (`inf`: diverged). Written by `sweep.py`.",
        "",
        "| optimizer | learning rate: dev loss |",
        "| --- | --- |",
    ]
    for name, losses in results.items():
        rates = sorted(losses, key=float)
        best = min(rates, key=lambda lr: losses[lr])
        cells = [
            f"**{lr}: {losses[lr]:.3f}**" if lr == best else f"{lr}: {losses[lr]:.3f}"
            for lr in rates
        ]
        lines.append(f"| `{name}` | {', '.join(cells)} |")
    return "\n".join(lines) + "\n"


def main(argv: list[str] | None = None) -> dict:
    """Sweep; returns ``{optimizer: {rate: dev loss}}``."""
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--optimizers", default="all", help="comma list; default: every one")
    p.add_argument("--steps", type=finetune.POSITIVE_INT, default=finetune.STEPS)
    p.add_argument("--seed", type=int, default=10)
    p.add_argument("--max-points", type=finetune.POSITIVE_INT, default=5)
    p.add_argument("--results", type=Path, default=HERE / "sweep.json")
    p.add_argument("--out", type=Path, default=Path("runs/gpt2_sweep"))
    p.add_argument("--jax-cache", default="runs/jax_cache")
    own = p.parse_args(argv)
    args = finetune.parse_args(
        ["--steps", str(own.steps), "--seed", str(own.seed), "--seeds", "1", "--eval-size", "0",
         "--dev-every", str(own.steps), "--out", str(own.out), "--jax-cache", own.jax_cache]
    )  # fmt: skip
    with finetune.compilation_cache(args.jax_cache):
        return _sweep(own, args)


def _sweep(own: argparse.Namespace, args: argparse.Namespace) -> dict:
    names = list(finetune.parse_optimizers(own.optimizers, 1.0))
    meta = recipe(args)
    saved = json.loads(own.results.read_text()) if own.results.exists() else {}
    results = saved.get("results", {}) if saved.get("recipe") == meta else {}

    tokenizer = GPT2Tokenizer.load(args.checkpoint)
    data = e2e.pack(e2e.encode_pairs(tokenizer, e2e.read_split(args.data, "train")), args.max_len)
    dev = finetune.dev_set(tokenizer, args)
    timer = finetune.PhaseTimer()
    for name in names:
        losses = {float(k): v for k, v in results.get(name, {}).items()}
        centre = finetune.OPTIMIZERS[name].learning_rate
        todo = [centre, centre * HALF_DECADE]  # a cosine decay wants a higher peak than
        # the constant rate the table's values were first tuned for
        todo = [lr for lr in todo if float(grid_key(lr)) not in losses]
        setup = finetune.lora_model(
            args, grad_stats=finetune.OPTIMIZERS[name].grad_stats, seed=args.seed
        )
        while todo or (extra := next_rate(losses, own.max_points)) is not None:
            lr = float(grid_key(todo.pop(0) if todo else extra))
            run = finetune.train(name, lr, setup, args, data, timer, dev, args.seed)
            loss = run.dev[-1][1]
            losses[lr] = loss if math.isfinite(loss) else math.inf
            results[name] = {grid_key(k): v for k, v in sorted(losses.items())}
            own.results.write_text(json.dumps({"recipe": meta, "results": results}, indent=1))
    table = markdown(results, meta)
    own.results.with_suffix(".md").write_text(table)
    print(table)
    return results


if __name__ == "__main__":
    main()
