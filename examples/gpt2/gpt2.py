"""GPT-2 in Flax NNX, with a key-value cache and Hugging Face checkpoint I/O.

Module names follow Hugging Face's ``GPT2Model`` (``h.0.attn.c_attn``, ``h.0.mlp.c_fc``, ...)
so that LoRA injection patterns written for the PyTorch model (``attn.c_attn``) apply here
unchanged. Every projection is an ``nnx.Linear`` with kernel ``(in, out)``, which is also how
Hugging Face's ``Conv1D`` stores its ``weight``: checkpoints load without transposition.
"""

from __future__ import annotations

import dataclasses
import json
import math
from pathlib import Path
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np
from flax import nnx

Array = jax.Array

_CONFIG_KEYS = (
    "vocab_size",
    "n_positions",
    "n_embd",
    "n_layer",
    "n_head",
    "layer_norm_epsilon",
    "embd_pdrop",
    "attn_pdrop",
    "resid_pdrop",
)


@dataclasses.dataclass(frozen=True)
class GPT2Config:
    """Architecture hyperparameters, named as in Hugging Face's ``config.json``."""

    vocab_size: int = 50257
    n_positions: int = 1024
    n_embd: int = 768
    n_layer: int = 12
    n_head: int = 12
    layer_norm_epsilon: float = 1e-5
    embd_pdrop: float = 0.1
    attn_pdrop: float = 0.1
    resid_pdrop: float = 0.1

    @classmethod
    def preset(cls, name: str, **overrides: Any) -> GPT2Config:
        """Return a named preset (``tiny``, ``mini``, ``small``, ``medium``, ``large``, ``xl``)."""
        presets = {
            "tiny": dict(vocab_size=97, n_positions=32, n_embd=32, n_layer=2, n_head=4),
            "mini": dict(n_positions=256, n_embd=128, n_layer=4, n_head=4),
            "small": dict(),
            "medium": dict(n_embd=1024, n_layer=24, n_head=16),
            "large": dict(n_embd=1280, n_layer=36, n_head=20),
            "xl": dict(n_embd=1600, n_layer=48, n_head=25),
        }
        if name not in presets:
            raise ValueError(f"unknown GPT-2 preset {name!r}; choose from {sorted(presets)}")
        return cls(**{**presets[name], **overrides})

    @classmethod
    def from_dict(cls, data: dict[str, Any]) -> GPT2Config:
        """Build a config from a Hugging Face ``config.json`` mapping (extra keys ignored)."""
        return cls(**{k: data[k] for k in _CONFIG_KEYS if k in data})

    def to_hf_dict(self) -> dict[str, Any]:
        """Return a ``config.json`` mapping that Hugging Face ``GPT2LMHeadModel`` accepts."""
        return {
            "architectures": ["GPT2LMHeadModel"],
            "model_type": "gpt2",
            "activation_function": "gelu_new",
            "n_ctx": self.n_positions,
            "bos_token_id": self.vocab_size - 1,
            "eos_token_id": self.vocab_size - 1,
            **dataclasses.asdict(self),
        }


@jax.tree_util.register_dataclass
@dataclasses.dataclass
class KVCache:
    """Keys/values of shape ``(batch, layers, heads, max_len, head_dim)``.

    ``key_mask`` marks the filled, non-padding slots ``(batch, max_len)``; ``index`` is the
    next slot to write (a scalar shared by the batch). Every non-scalar array is batch-first,
    so beam search can reorder a cache with :meth:`take`.
    """

    k: Array
    v: Array
    key_mask: Array
    index: Array

    @classmethod
    def init(cls, config: GPT2Config, batch: int, max_len: int, dtype: Any) -> KVCache:
        """An empty cache for ``batch`` sequences of at most ``max_len`` tokens."""
        head_dim = config.n_embd // config.n_head
        shape = (batch, config.n_layer, config.n_head, max_len, head_dim)
        return cls(
            k=jnp.zeros(shape, dtype),
            v=jnp.zeros(shape, dtype),
            key_mask=jnp.zeros((batch, max_len), bool),
            index=jnp.zeros((), jnp.int32),
        )

    def take(self, rows: Array) -> KVCache:
        """Select (and repeat) batch rows, e.g. to follow surviving beams."""
        return KVCache(self.k[rows], self.v[rows], self.key_mask[rows], self.index)


def gelu_new(x: Array) -> Array:
    """GPT-2's tanh approximation of GELU."""
    return 0.5 * x * (1.0 + jnp.tanh(math.sqrt(2.0 / math.pi) * (x + 0.044715 * x**3)))


def _linear(n_in: int, n_out: int, rngs: nnx.Rngs) -> nnx.Linear:
    return nnx.Linear(n_in, n_out, kernel_init=nnx.initializers.normal(0.02), rngs=rngs)


class Attention(nnx.Module):
    """Multi-head self-attention with a fused ``c_attn`` (q, k, v) projection."""

    def __init__(self, config: GPT2Config, rngs: nnx.Rngs):
        self.n_head = config.n_head
        self.c_attn = _linear(config.n_embd, 3 * config.n_embd, rngs)
        self.c_proj = _linear(config.n_embd, config.n_embd, rngs)
        self.attn_dropout = nnx.Dropout(config.attn_pdrop, rngs=rngs)
        self.resid_dropout = nnx.Dropout(config.resid_pdrop, rngs=rngs)

    def _heads(self, x: Array) -> Array:
        b, t, d = x.shape
        return x.reshape(b, t, self.n_head, d // self.n_head).transpose(0, 2, 1, 3)

    def __call__(
        self, x: Array, mask: Array, kv: tuple[Array, Array, Array] | None = None
    ) -> tuple[Array, tuple[Array, Array] | None]:
        """Attend; ``mask`` is ``(batch, 1, queries, keys)``; ``kv`` = (k_cache, v_cache, index)."""
        q, k, v = (self._heads(y) for y in jnp.split(self.c_attn(x), 3, axis=-1))
        new_kv = None
        if kv is not None:
            k_cache, v_cache, index = kv
            k = jax.lax.dynamic_update_slice(k_cache, k.astype(k_cache.dtype), (0, 0, index, 0))
            v = jax.lax.dynamic_update_slice(v_cache, v.astype(v_cache.dtype), (0, 0, index, 0))
            new_kv = (k, v)
        scores = jnp.einsum("bhqd,bhkd->bhqk", q, k).astype(jnp.float32) / math.sqrt(q.shape[-1])
        scores = jnp.where(mask, scores, jnp.finfo(jnp.float32).min)
        probs = self.attn_dropout(jax.nn.softmax(scores, axis=-1).astype(v.dtype))
        out = jnp.einsum("bhqk,bhkd->bhqd", probs, v)
        out = out.transpose(0, 2, 1, 3).reshape(x.shape)
        return self.resid_dropout(self.c_proj(out)), new_kv


class MLP(nnx.Module):
    """Position-wise feed-forward network ``c_fc -> gelu_new -> c_proj``."""

    def __init__(self, config: GPT2Config, rngs: nnx.Rngs):
        self.c_fc = _linear(config.n_embd, 4 * config.n_embd, rngs)
        self.c_proj = _linear(4 * config.n_embd, config.n_embd, rngs)
        self.dropout = nnx.Dropout(config.resid_pdrop, rngs=rngs)

    def __call__(self, x: Array) -> Array:
        return self.dropout(self.c_proj(gelu_new(self.c_fc(x))))


class Block(nnx.Module):
    """Pre-LayerNorm transformer block."""

    def __init__(self, config: GPT2Config, rngs: nnx.Rngs):
        eps = config.layer_norm_epsilon
        self.ln_1 = nnx.LayerNorm(config.n_embd, epsilon=eps, rngs=rngs)
        self.attn = Attention(config, rngs)
        self.ln_2 = nnx.LayerNorm(config.n_embd, epsilon=eps, rngs=rngs)
        self.mlp = MLP(config, rngs)

    def __call__(
        self, x: Array, mask: Array, kv: tuple[Array, Array, Array] | None = None
    ) -> tuple[Array, tuple[Array, Array] | None]:
        h, new_kv = self.attn(self.ln_1(x), mask, kv)
        x = x + h
        return x + self.mlp(self.ln_2(x)), new_kv


class GPT2(nnx.Module):
    """GPT-2 language model with the LM head tied to the token embedding ``wte``."""

    def __init__(self, config: GPT2Config, *, rngs: nnx.Rngs):
        self.config = config
        init = nnx.initializers.normal(0.02)
        self.wte = nnx.Embed(config.vocab_size, config.n_embd, embedding_init=init, rngs=rngs)
        self.wpe = nnx.Embed(config.n_positions, config.n_embd, embedding_init=init, rngs=rngs)
        self.drop = nnx.Dropout(config.embd_pdrop, rngs=rngs)
        self.h = nnx.List([Block(config, rngs) for _ in range(config.n_layer)])
        self.ln_f = nnx.LayerNorm(config.n_embd, epsilon=config.layer_norm_epsilon, rngs=rngs)

    def _embed(self, input_ids: Array, positions: Array) -> Array:
        return self.drop(self.wte(input_ids) + self.wpe(positions))

    def _head(self, x: Array) -> Array:
        return self.lm_head(self.ln_f(x))

    def lm_head(self, hidden: Array) -> Array:
        """Logits from final hidden states (tied to ``wte``)."""
        return self.wte.attend(hidden)

    def __call__(self, input_ids: Array, attention_mask: Array | None = None) -> Array:
        """Logits ``(batch, seq, vocab)`` for right-padded ``input_ids`` ``(batch, seq)``.

        ``attention_mask`` (1 = token, 0 = padding) hides padded keys; positions count from 0.
        """
        return self.lm_head(self.hidden(input_ids, attention_mask))

    def hidden(self, input_ids: Array, attention_mask: Array | None = None) -> Array:
        """Final (layer-normalised) hidden states ``(batch, seq, n_embd)``; see ``__call__``."""
        t = input_ids.shape[1]
        positions = jnp.broadcast_to(jnp.arange(t), input_ids.shape)
        mask = jnp.tril(jnp.ones((t, t), bool))[None, None]
        if attention_mask is not None:
            mask = mask & attention_mask.astype(bool)[:, None, None, :]
        x = self._embed(input_ids, positions)
        for block in self.h:
            x, _ = block(x, mask)
        return self.ln_f(x)

    def decode(
        self, input_ids: Array, positions: Array, token_mask: Array, cache: KVCache
    ) -> tuple[Array, KVCache]:
        """Run ``input_ids`` ``(batch, t)`` through the model, appending to ``cache``.

        ``positions`` are the position ids of the new tokens and ``token_mask`` marks which of
        them are real (left padding is masked out of every later query). Returns the logits
        of the new tokens and the updated cache.
        """
        t = input_ids.shape[1]
        key_mask = jax.lax.dynamic_update_slice(
            cache.key_mask, token_mask.astype(bool), (0, cache.index)
        )
        slots = jnp.arange(key_mask.shape[1])
        causal = slots[None, :] <= cache.index + jnp.arange(t)[:, None]
        mask = (causal[None] & key_mask[:, None, :])[:, None]
        x = self._embed(input_ids, positions)
        ks, vs = [], []
        for i, block in enumerate(self.h):
            x, (k, v) = block(x, mask, (cache.k[:, i], cache.v[:, i], cache.index))
            ks.append(k)
            vs.append(v)
        new_cache = KVCache(jnp.stack(ks, 1), jnp.stack(vs, 1), key_mask, cache.index + t)
        return self._head(x), new_cache


# --------------------------------------------------------------------------- checkpoints


def _param_table(model: GPT2) -> dict[str, nnx.Variable]:
    """Hugging Face parameter names mapped to the model's variables (``wte`` tied head)."""
    table: dict[str, nnx.Variable] = {
        "wte.weight": model.wte.embedding,
        "wpe.weight": model.wpe.embedding,
        "ln_f.weight": model.ln_f.scale,
        "ln_f.bias": model.ln_f.bias,
    }
    for i, block in enumerate(model.h):
        modules = {
            "ln_1": block.ln_1,
            "ln_2": block.ln_2,
            "attn.c_attn": block.attn.c_attn,
            "attn.c_proj": block.attn.c_proj,
            "mlp.c_fc": block.mlp.c_fc,
            "mlp.c_proj": block.mlp.c_proj,
        }
        for name, module in modules.items():
            weight = module.scale if isinstance(module, nnx.LayerNorm) else module.kernel
            table[f"h.{i}.{name}.weight"] = weight
            table[f"h.{i}.{name}.bias"] = module.bias
    return table


def _read_hf_tensors(directory: Path) -> dict[str, np.ndarray]:
    """Read ``model.safetensors`` (or ``pytorch_model.bin`` when torch is importable)."""
    st_file = directory / "model.safetensors"
    if st_file.exists():
        from safetensors.numpy import load_file

        return load_file(str(st_file))
    bin_file = directory / "pytorch_model.bin"
    if bin_file.exists():
        try:
            import torch
        except ImportError as err:
            raise ImportError(f"{bin_file} needs torch; convert it to safetensors") from err
        state = torch.load(str(bin_file), map_location="cpu", weights_only=True)
        return {k: v.float().numpy() for k, v in state.items()}
    raise FileNotFoundError(f"no model.safetensors or pytorch_model.bin in {directory}")


def _normalise_keys(tensors: dict[str, np.ndarray]) -> dict[str, np.ndarray]:
    """Strip ``transformer.`` prefixes; drop attention-mask buffers and the tied ``lm_head``."""
    out = {}
    for key, value in tensors.items():
        name = key.removeprefix("transformer.")
        if name.endswith((".attn.bias", ".attn.masked_bias")) or name == "lm_head.weight":
            continue
        out[name] = value
    return out


def load_gpt2(
    directory: str | Path, *, param_dtype: Any = jnp.float32, rngs: nnx.Rngs | None = None
) -> GPT2:
    """Load a Hugging Face GPT-2 (``config.json`` + weights) from a local directory."""
    directory = Path(directory)
    config = GPT2Config.from_dict(json.loads((directory / "config.json").read_text()))
    model = GPT2(config, rngs=rngs or nnx.Rngs(0))
    tensors = _normalise_keys(_read_hf_tensors(directory))
    table = _param_table(model)
    missing, unexpected = set(table) - set(tensors), set(tensors) - set(table)
    if missing or unexpected:
        raise ValueError(
            f"checkpoint mismatch: missing {sorted(missing)}, unexpected {sorted(unexpected)}"
        )
    for name, variable in table.items():
        value = tensors[name]
        if value.shape != variable[...].shape:
            raise ValueError(f"{name}: checkpoint {value.shape} vs model {variable[...].shape}")
        variable.set_value(jnp.asarray(value, dtype=param_dtype))
    return model


def save_gpt2(model: GPT2, directory: str | Path, *, dtype: Any = np.float16) -> None:
    """Write ``config.json`` and ``model.safetensors`` in Hugging Face's GPT-2 layout."""
    from safetensors.numpy import save_file

    directory = Path(directory)
    directory.mkdir(parents=True, exist_ok=True)
    (directory / "config.json").write_text(json.dumps(model.config.to_hf_dict(), indent=2) + "\n")
    tensors = {k: np.asarray(v[...], dtype=dtype) for k, v in _param_table(model).items()}
    save_file(tensors, str(directory / "model.safetensors"), metadata={"format": "pt"})
