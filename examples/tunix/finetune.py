"""Fine-tune a Tunix model carrying Qwix LoRA with a lowrank_optax optimizer, through PeftTrainer.

The user's side is what it is with any optax optimizer: build the model, apply Qwix LoRA, hand
the optimizer to ``PeftTrainer``. Qwix's factors (``w_lora_a`` / ``w_lora_b`` beside the frozen
``w`` of einsum layers, ``kernel_lora_a`` / ``kernel_lora_b`` of ``nnx.Linear``) are found and
laid out by the library; no keys, no adapter. Gradient accumulation (``optax.MultiSteps``) and
orbax checkpointing of the optimizer state are Tunix's own.

The tiny random-init configurations run on a CPU in seconds (they are what the tests train);
``--family`` picks the model, ``--optimizer`` the method. Run::

    python examples/tunix/finetune.py --family gemma --optimizer adams --steps 20

Needs the ``tunix`` extra (``pip install lowrank_optax[tunix]``).
"""

from __future__ import annotations

import argparse
import json
import tempfile
from collections.abc import Callable, Iterator
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np
import optax
import qwix
from flax import nnx
from tunix.models.gemma import model as gemma_lib
from tunix.models.llama3 import model as llama3_lib
from tunix.models.qwen3 import model as qwen3_lib
from tunix.sft import peft_trainer
from tunix.sft import utils as sft_utils

import lowrank_optax as lro

VOCAB, SEQ, RANK, ALPHA = 64, 16, 4, 8.0

# Attention (einsum layers: q/k/v/o; Gemma's q_einsum, kv_einsum, fused qkv_einsum,
# attn_vec_einsum) and MLP (nnx.Linear: gate/up/down).
LORA_MODULES = (
    ".*q_proj|.*k_proj|.*v_proj|.*o_proj|.*q_einsum|.*kv_einsum|.*qkv_einsum"
    "|.*attn_vec_einsum|.*gate_proj|.*up_proj|.*down_proj"
)

FAMILIES = ("llama3", "qwen3", "gemma", "gemma_qkv")


def tiny_config(family: str, num_layers: int = 1) -> tuple[type, Any]:
    """A tiny random-init configuration of a Tunix model family (runs on a laptop CPU)."""
    common = dict(num_layers=num_layers, embed_dim=32, hidden_dim=32, num_heads=4, head_dim=8)
    if family == "llama3":
        return llama3_lib.Llama3, llama3_lib.ModelConfig(
            vocab_size=VOCAB, num_kv_heads=2, rope_theta=10_000, norm_eps=1e-5, **common
        )
    if family == "qwen3":
        return qwen3_lib.Qwen3, qwen3_lib.ModelConfig(
            vocab_size=VOCAB, num_kv_heads=2, rope_theta=10_000, norm_eps=1e-6, **common
        )
    if family in ("gemma", "gemma_qkv"):  # num_kv_heads == num_heads: one fused qkv_einsum
        return gemma_lib.Gemma, gemma_lib.ModelConfig(
            num_embed=VOCAB,
            num_kv_heads=1 if family == "gemma" else 4,
            final_logit_softcap=None,
            use_post_attn_norm=False,
            use_post_ffw_norm=False,
            attention_types=(gemma_lib.AttentionType.GLOBAL,) * num_layers,
            **common,
        )
    raise ValueError(f"unknown family {family!r}; choose from {FAMILIES}")


def model_inputs(tokens: jax.Array) -> dict[str, jax.Array]:
    """The keyword arguments of Tunix's default loss for a batch of tokens (no padding)."""
    mask = jnp.ones(tokens.shape, bool)
    return {
        "input_tokens": tokens,
        "input_mask": mask,
        "positions": sft_utils.build_positions_from_mask(mask),
        "attention_mask": sft_utils.make_causal_attn_mask(mask),
    }


def abstract_lora_model(family: str, num_layers: int = 1, seed: int = 0) -> nnx.Module:
    """A Tunix model with Qwix LoRA (rank 4, alpha 8) on attention and the MLP, abstract
    (``nnx.eval_shape``: Qwix creates the factors during one traced forward call)."""
    cls, config = tiny_config(family, num_layers)
    provider = qwix.LoraProvider(module_path=LORA_MODULES, rank=RANK, alpha=ALPHA)
    inputs = model_inputs(jnp.zeros((1, SEQ), jnp.int32))

    def build():
        model = cls(config, rngs=nnx.Rngs(params=seed))
        return qwix.apply_lora_to_model(
            model,
            provider,
            inputs["input_tokens"],
            inputs["positions"],
            None,
            inputs["attention_mask"],
            rngs=nnx.Rngs(seed + 1),
        )

    return nnx.eval_shape(build)


def random_init(abstract: nnx.Module, seed: int = 0, scale: float = 0.02) -> nnx.Module:
    """Random weights for an abstract module, as ``tunix.models.dummy_model_creator`` makes
    them (``scale`` · normal), in one compiled call; norms start at one, LoRA ``b`` at zero and
    LoRA ``a`` at ``normal / sqrt(fan_in)``."""
    graphdef, state = nnx.split(abstract)
    flat = jax.tree_util.tree_flatten_with_path(state)

    @jax.jit
    def values(key):
        keys = jax.random.split(key, len(flat[0]))
        out = []
        for k, (path, leaf) in zip(keys, flat[0]):
            name = jax.tree_util.keystr(path)
            if name.endswith("lora_b']") or name.endswith("lora_b'].value"):
                out.append(jnp.zeros(leaf.shape, leaf.dtype))
            elif "lora_a" in name:
                fan_in = max(1, int(np.prod(leaf.shape[:-1])))
                out.append(jax.random.normal(k, leaf.shape, leaf.dtype) / np.sqrt(fan_in))
            elif "norm" in name:
                out.append(jnp.ones(leaf.shape, leaf.dtype))
            else:
                out.append(scale * jax.random.normal(k, leaf.shape, leaf.dtype))
        return out

    return nnx.merge(graphdef, jax.tree.unflatten(flat[1], values(jax.random.key(seed))))


def build_lora_model(family: str, num_layers: int = 1, seed: int = 0) -> nnx.Module:
    """A random-init Tunix model with Qwix LoRA on attention and the MLP."""
    return random_init(abstract_lora_model(family, num_layers, seed), seed)


def batches(batch_size: int = 4, seed: int = 0) -> Iterator[peft_trainer.TrainingInput]:
    """A fixed small set of random sequences (the loss falls as the model memorises them)."""
    rng = np.random.default_rng(seed)
    data = rng.integers(1, VOCAB, size=(2, batch_size, SEQ))
    step = 0
    while True:
        tokens = data[step % len(data)]
        yield peft_trainer.TrainingInput(input_tokens=tokens, input_mask=np.ones_like(tokens))
        step += 1


def gen_model_input_fn(x: peft_trainer.TrainingInput) -> dict[str, jax.Array]:
    return model_inputs(jnp.asarray(x.input_tokens))


OPTIMIZERS: dict[str, Callable[[float], optax.GradientTransformation]] = {
    "scaled_adamw": lro.scaled_adamw,
    "adams": lro.adams,
    "lora_rite": lro.lora_rite,
    "altlora_plus": lro.altlora_plus,
    "solora_adamw": lro.solora_adamw,
    "lora_pro_adamw": lambda lr: lro.lora_pro_adamw(lr, scale=ALPHA / RANK),
    "loraplus_adamw": lambda lr: lro.loraplus(optax.adamw, 16.0, learning_rate=lr),
}


def make_trainer(
    model: nnx.Module,
    tx: optax.GradientTransformation,
    steps: int,
    checkpoint_dir: str | None = None,
    accumulation: int | None = 2,
) -> peft_trainer.PeftTrainer:
    """Tunix's PeftTrainer with gradient accumulation and checkpointing of the optimizer."""
    config = peft_trainer.TrainingConfig(
        eval_every_n_steps=10**9,
        max_steps=steps,
        gradient_accumulation_steps=accumulation,
        checkpoint_root_directory=checkpoint_dir,
        pbar_description=None,
    )
    trainer = peft_trainer.PeftTrainer(model, tx, config)
    return trainer.with_gen_model_input_fn(gen_model_input_fn)


def main(argv: list[str] | None = None) -> dict[str, Any]:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--family", choices=FAMILIES, default="llama3")
    parser.add_argument("--optimizer", choices=sorted(OPTIMIZERS), default="scaled_adamw")
    parser.add_argument("--learning-rate", type=float, default=3e-3)
    parser.add_argument("--steps", type=int, default=10)
    parser.add_argument("--layers", type=int, default=1)
    parser.add_argument("--checkpoint-dir", default=None)
    args = parser.parse_args(argv)

    model = build_lora_model(args.family, args.layers)
    # inject_hyperparams: PeftTrainer logs the learning rate it finds in the optimizer state.
    # float32 hyperparameters: by default they take the params' dtype, and in a bfloat16 model
    # b2 = 0.999 would round to 1.
    tx = optax.inject_hyperparams(OPTIMIZERS[args.optimizer], hyperparam_dtype=jnp.float32)(
        args.learning_rate)
    loss = nnx.jit(lambda m, x: peft_trainer._default_loss_fn(m, **model_inputs(x)))
    probe = jnp.asarray(next(batches()).input_tokens)
    before = float(loss(model, probe))
    with tempfile.TemporaryDirectory() as tmp:
        trainer = make_trainer(model, tx, args.steps, args.checkpoint_dir or tmp)
        trainer.train(batches())
    result = {**vars(args), "loss_before": before, "loss_after": float(loss(model, probe))}
    print(json.dumps(result))
    return result


if __name__ == "__main__":
    main()
