"""Models for the examples: GPT-2 in Flax NNX, its tokenizer and decoding."""

from lowrank_optax.models.decoding import beam_search, generate, gpt2_decoder, greedy_search
from lowrank_optax.models.gpt2 import GPT2, GPT2Config, KVCache, load_gpt2, save_gpt2
from lowrank_optax.models.tokenizer import GPT2Tokenizer

__all__ = [
    "GPT2",
    "GPT2Config",
    "GPT2Tokenizer",
    "KVCache",
    "beam_search",
    "generate",
    "gpt2_decoder",
    "greedy_search",
    "load_gpt2",
    "save_gpt2",
]
