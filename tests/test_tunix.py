"""Tunix models with Qwix LoRA, trained by every method with no adapter code and no ``keys=``.

Tiny random-init Llama3, Qwen3, Gemma (``num_kv_heads=1``: ``q_einsum`` + ``kv_einsum``) and
Gemma with the fused ``qkv_einsum`` (``num_kv_heads=4``) carry Qwix LoRA on q/k/v/o and the MLP:
factors of shapes ``(32, 4)·(4, 4, 8)``, ``(4, 8, 4)·(4, 32)``, ``(32, 4)·(4, 2, 1, 8)``,
``(32, 4)·(4, 3, 4, 8)`` beside the frozen weights. To keep the suite fast, the four models live
in one module, so one compiled gradient serves every method (each method compiles only its
update), and every method trains the four models through ``nnx.Optimizer``. Through
``PeftTrainer`` (which compiles its whole step, model included, per optimizer) every method
trains one family's model, the families taken in turn; three methods (of different state
structures) train one model each with gradient accumulation and a checkpoint round trip.
"""

from __future__ import annotations

import importlib.util
import itertools
from pathlib import Path

import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest
from flax import nnx

pytest.importorskip("tunix")
pytest.importorskip("qwix")

from methods import BY_NAME, METHODS  # noqa: E402
from tunix.sft import peft_trainer  # noqa: E402

EXAMPLE = Path(__file__).resolve().parents[1] / "examples" / "tunix" / "finetune.py"
_spec = importlib.util.spec_from_file_location("tunix_finetune", EXAMPLE)
ft = importlib.util.module_from_spec(_spec)
_spec.loader.exec_module(ft)

STEPS = 5
# learning rates for these models (the registry's are tuned for the matrix-factorisation battery)
LEARNING_RATE = {"scaled_sgd": 0.3, "lora_pro_sgd": 0.3, "solora_sgd": 0.3, "quotient_sgd": 0.3}
# Every method through PeftTrainer on one family, the families taken in turn (every method
# meets all four layouts in the nnx.Optimizer test, and PeftTrainer's own optimizer is an
# nnx.Optimizer over the LoRA params).
PEFT_RUNS = [pytest.param(method, ft.FAMILIES[k % len(ft.FAMILIES)],
                          id=f"{method.name}-{ft.FAMILIES[k % len(ft.FAMILIES)]}")
             for k, method in enumerate(METHODS)]
# Checkpoint round trips: three methods with different state structures (optax chain;
# NamedTuple with None entries; four per-pair trees and global norms), on three families.
PEFT_CHECKPOINT_RUNS = [("loraplus_adamw", "gemma_qkv"), ("adams", "qwen3"),
                        ("lora_rite_global_escape_cap", "gemma")]


class Zoo(nnx.Module):
    """The four LoRA models side by side (one optimizer, one compiled gradient)."""

    def __init__(self):
        for family in ft.FAMILIES:
            setattr(self, family, ft.abstract_lora_model(family))


def zoo_losses(zoo, input_tokens, input_mask, positions, attention_mask):
    """Tunix's default loss of each family, stacked (the arguments are named: PeftTrainer's
    ``nnx.value_and_grad`` resolves keyword inputs by name)."""
    return jnp.stack([peft_trainer._default_loss_fn(getattr(zoo, f), input_tokens, input_mask,
                                                    positions, attention_mask)
                      for f in ft.FAMILIES])


def assert_frozen_unchanged(model, frozen) -> None:
    jax.tree.map(np.testing.assert_array_equal,
                 nnx.to_pure_dict(nnx.state(model, nnx.Not(nnx.LoRAParam))), frozen)


@nnx.jit
def losses_and_grads(zoo, tokens):
    inputs = ft.model_inputs(tokens)
    loss_fn = lambda zoo: (lambda l: (l.sum(), l))(zoo_losses(zoo, **inputs))  # noqa: E731
    (_, losses), grads = nnx.value_and_grad(
        loss_fn, argnums=nnx.DiffState(0, nnx.LoRAParam), has_aux=True)(zoo)
    return losses, grads


@nnx.jit
def apply(optimizer, zoo, grads):
    optimizer.update(zoo, grads)


@pytest.fixture(scope="module")
def zoo():
    zoo = ft.random_init(nnx.eval_shape(Zoo))
    return zoo, nnx.to_pure_dict(nnx.state(zoo, nnx.LoRAParam))


def _tokens():
    return jnp.asarray(next(ft.batches()).input_tokens)


def test_qwix_layouts_are_the_issue_s(zoo):
    shapes = jax.tree.map(jnp.shape, zoo[1])
    attn = {f: shapes[f]["layers"][0]["attn"] for f in ft.FAMILIES}
    pair = lambda site: (site["w_lora_a"], site["w_lora_b"])  # noqa: E731
    assert pair(attn["llama3"]["q_proj"]) == ((32, 4), (4, 4, 8))
    assert pair(attn["qwen3"]["o_proj"]) == ((4, 8, 4), (4, 32))
    assert pair(attn["gemma"]["kv_einsum"]) == ((32, 4), (4, 2, 1, 8))
    assert pair(attn["gemma_qkv"]["qkv_einsum"]) == ((32, 4), (4, 3, 4, 8))
    mlp = shapes["gemma"]["layers"][0]["mlp"]["down_proj"]
    assert (mlp["kernel_lora_a"], mlp["kernel_lora_b"]) == ((32, 4), (4, 32))


@pytest.mark.parametrize("method", METHODS, ids=str)
def test_every_method_trains_four_tunix_models_through_nnx_optimizer(zoo, method):
    model, initial = zoo
    nnx.update(model, initial)
    frozen = nnx.to_pure_dict(nnx.state(model, nnx.Not(nnx.LoRAParam)))
    optimizer = nnx.Optimizer(
        model, method.make(LEARNING_RATE.get(method.name, method.learning_rate)),
        wrt=nnx.LoRAParam)
    tokens = _tokens()
    before, grads = losses_and_grads(model, tokens)
    for _ in range(STEPS):
        apply(optimizer, model, grads)
        after, grads = losses_and_grads(model, tokens)
    before, after = np.asarray(before), np.asarray(after)
    assert np.isfinite(after).all(), dict(zip(ft.FAMILIES, after))
    assert (after < before).all(), dict(zip(ft.FAMILIES, zip(before, after)))
    assert_frozen_unchanged(model, frozen)  # the base weights are untouched


@nnx.jit
def model_loss(model, tokens):
    return peft_trainer._default_loss_fn(model, **ft.model_inputs(tokens))


def training_set_losses(zoo) -> np.ndarray:
    """Each family's loss summed over the two batches of ``ft.batches`` (through the already
    compiled ``losses_and_grads``: a forward-only function would be one more compilation)."""
    data = itertools.islice(ft.batches(), 2)
    return sum(np.asarray(losses_and_grads(zoo, jnp.asarray(x.input_tokens))[0]) for x in data)


@pytest.mark.parametrize(("method", "family"), PEFT_RUNS, ids=str)
def test_every_method_trains_a_tunix_model_through_peft_trainer(zoo, method, family):
    """Four optimizer steps of Tunix's own training loop (the two batches of ``ft.batches`` in
    turn) on one family's model with Tunix's default loss: the loss on the two batches falls
    and the base weights are untouched."""
    nnx.update(zoo[0], zoo[1])
    model = getattr(zoo[0], family)
    frozen = nnx.to_pure_dict(nnx.state(model, nnx.Not(nnx.LoRAParam)))
    index = ft.FAMILIES.index(family)
    before = training_set_losses(zoo[0])[index]
    tx = method.make(LEARNING_RATE.get(method.name, method.learning_rate))
    trainer = ft.make_trainer(model, tx, steps=4, accumulation=None)
    trainer.train(ft.batches())
    after = training_set_losses(zoo[0])[index]
    assert trainer._train_steps == 4
    assert np.isfinite(after) and after < before, (before, after)
    assert_frozen_unchanged(model, frozen)


@pytest.mark.parametrize(("name", "family"), PEFT_CHECKPOINT_RUNS)
def test_peft_trainer_accumulates_and_restores_its_checkpoint(zoo, tmp_path, name, family):
    """Two optimizer steps of two accumulated micro-batches (``optax.MultiSteps``), saved by
    Tunix's checkpoint manager; a new trainer on the reset model restores the factors and the
    optimizer state. The learning rate is injected (PeftTrainer logs it)."""
    nnx.update(zoo[0], zoo[1])
    model = getattr(zoo[0], family)
    initial = nnx.to_pure_dict(nnx.state(model, nnx.LoRAParam))
    method = BY_NAME[name]
    tx = optax.inject_hyperparams(method.factory)(method.learning_rate, **method.kwargs)
    tokens = _tokens()
    before = float(model_loss(model, tokens))
    trainer = ft.make_trainer(model, tx, steps=2, checkpoint_dir=str(tmp_path), accumulation=2)
    trainer.train(ft.batches())
    after = float(model_loss(model, tokens))
    assert np.isfinite(after) and after < before, (before, after)
    assert trainer._train_steps == 2 and trainer._try_get_learning_rate() is not None
    trained = nnx.to_pure_dict(nnx.state(model, nnx.LoRAParam))
    opt_state = nnx.to_pure_dict(nnx.state(trainer.optimizer, nnx.optimizer.OptState))

    nnx.update(model, initial)
    restored = ft.make_trainer(model, tx, steps=2, checkpoint_dir=str(tmp_path), accumulation=2)
    assert restored._train_steps == 2
    jax.tree.map(np.testing.assert_array_equal,
                 nnx.to_pure_dict(nnx.state(model, nnx.LoRAParam)), trained)
    jax.tree.map(np.testing.assert_array_equal,
                 nnx.to_pure_dict(nnx.state(restored.optimizer, nnx.optimizer.OptState)),
                 opt_state)
