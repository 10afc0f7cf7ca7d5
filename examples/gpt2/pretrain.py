"""Pretrain the small GPT-2 base model bundled in ``examples/gpt2/checkpoint/``.

    python examples/gpt2/pretrain.py                 # about 6 min on a 2-core CPU

The corpus is generated on the fly by ``restaurants.make_pretraining_text``
(first-person restaurant reviews, local-guide paragraphs and town descriptions: no MRs, so the
data-to-text mapping is left to fine-tuning). The model has GPT-2's BPE vocabulary and the
``mini`` shape (4 layers, 4 heads, n_embd 128, 256 positions) and is written in Hugging Face's
file layout (float16), loadable by ``load_gpt2`` and by ``transformers.GPT2LMHeadModel``.
Everything is seeded.
"""

from __future__ import annotations

import argparse
import json
import time
from pathlib import Path

import jax
import jax.numpy as jnp
import numpy as np
import optax
from flax import nnx
from tqdm import tqdm

from gpt2 import GPT2, GPT2Config, save_gpt2
from restaurants import make_pretraining_text
from tokenizer import GPT2Tokenizer


def token_windows(docs: list[str], tokenizer: GPT2Tokenizer, length: int) -> np.ndarray:
    """Concatenate documents (EOS-separated) and cut the stream into ``length``-token rows."""
    stream: list[int] = []
    for doc in docs:
        stream += tokenizer.encode(doc) + [tokenizer.eos_token_id]
    rows = len(stream) // length
    return np.asarray(stream[: rows * length], np.int32).reshape(rows, length)


def lm_loss(model: GPT2, tokens: jax.Array) -> jax.Array:
    """Mean next-token cross-entropy of a batch of windows."""
    logits = model(tokens[:, :-1])
    return optax.softmax_cross_entropy_with_integer_labels(logits, tokens[:, 1:]).mean()


@nnx.jit
def train_step(model: GPT2, optimizer: nnx.Optimizer, tokens: jax.Array) -> jax.Array:
    loss, grads = nnx.value_and_grad(lm_loss)(model, tokens)
    optimizer.update(model, grads)
    return loss


@nnx.jit
def eval_loss(model: GPT2, tokens: jax.Array) -> jax.Array:
    return lm_loss(model, tokens)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--out", type=Path, default=Path(__file__).parent / "checkpoint")
    parser.add_argument("--steps", type=int, default=400)
    parser.add_argument("--batch-size", type=int, default=8)
    parser.add_argument("--seq-len", type=int, default=128)
    parser.add_argument("--lr", type=float, default=2e-3)
    parser.add_argument("--docs", type=int, default=12000)
    parser.add_argument("--seed", type=int, default=0)
    args = parser.parse_args()
    start = time.time()

    tokenizer = GPT2Tokenizer.from_package()
    train = token_windows(make_pretraining_text(args.docs, args.seed), tokenizer, args.seq_len + 1)
    held_out = token_windows(make_pretraining_text(200, args.seed + 1), tokenizer, args.seq_len + 1)
    model = GPT2(GPT2Config.preset("mini", embd_pdrop=0.0), rngs=nnx.Rngs(args.seed))
    warmup = min(50, args.steps // 2)
    schedule = optax.warmup_cosine_decay_schedule(0.0, args.lr, warmup, args.steps, args.lr / 10)
    tx = optax.chain(optax.clip_by_global_norm(1.0), optax.adamw(schedule, weight_decay=0.01))
    optimizer = nnx.Optimizer(model, tx, wrt=nnx.Param)
    rng = np.random.default_rng(args.seed)

    log = []
    for step in (bar := tqdm(range(1, args.steps + 1), desc="pretrain")):
        rows = rng.integers(0, len(train), args.batch_size)
        loss = float(train_step(model, optimizer, jnp.asarray(train[rows])))
        bar.set_postfix(loss=f"{loss:.3f}")
        if step % 50 == 0 or step == args.steps:
            log.append({"step": step, "train_loss": round(loss, 4)})
    model.eval()
    held = float(eval_loss(model, jnp.asarray(held_out[:64])))
    save_gpt2(model, args.out, dtype=np.float16)
    info = {
        "command": "python examples/gpt2/pretrain.py",
        "args": {k: str(v) for k, v in vars(args).items() if k != "out"},
        "train_windows": len(train),
        "held_out_loss": round(held, 4),
        "wall_time_s": round(time.time() - start, 1),
        "log": log,
    }
    (args.out / "pretrain_log.json").write_text(json.dumps(info, indent=2) + "\n")
    print(f"held-out loss {held:.3f}; wrote {args.out} in {info['wall_time_s']} s")


if __name__ == "__main__":
    main()
