"""Greedy and beam-search decoding, jit-compiled end to end.

Decoding runs against a small protocol, :class:`DecoderLM`: ``prefill`` consumes left-padded
prompts and returns the next-token logits plus a batch-first cache; ``step`` feeds one token per
row. :class:`GPT2Decoder` implements it with the model's key-value cache; tests implement it
with toy models whose best sequence can be enumerated.

Beam search follows the setting of the LoRA papers' E2E experiments (beam 10, length penalty
0.8, no repeated 4-grams). A finished hypothesis scores ``sum(log p) / L ** length_penalty``
where ``L`` counts the generated tokens including the final EOS (as in the GPT-2 LoRA code);
hypotheses still alive after ``max_new_tokens`` are scored the same way with ``L =
max_new_tokens``. The search stops early only when no alive beam can beat the best finished
hypothesis any more (an exact bound, since log-probabilities are non-positive).
"""

from __future__ import annotations

import dataclasses
import functools
from collections.abc import Sequence
from typing import Any, Protocol

import jax
import jax.numpy as jnp
import numpy as np
from flax import nnx

from gpt2 import GPT2, KVCache

Array = jax.Array


class DecoderLM(Protocol):
    """A hashable language model seen as pure functions of its ``params``."""

    def prefill(self, params: Any, ids: Array, mask: Array, max_new: int) -> tuple[Array, Any]:
        """Next-token logits ``(batch, vocab)`` after left-padded prompts, and the cache."""

    def step(self, params: Any, tokens: Array, cache: Any) -> tuple[Array, Any]:
        """Next-token logits after appending ``tokens`` ``(batch,)``, and the new cache."""


@dataclasses.dataclass(frozen=True)
class GPT2Decoder:
    """:class:`DecoderLM` for :class:`GPT2`; the cache is ``(KVCache, next_positions)``."""

    graphdef: Any

    def prefill(self, params: Any, ids: Array, mask: Array, max_new: int) -> tuple[Array, Any]:
        model = nnx.merge(self.graphdef, params)
        dtype = model.wte.embedding[...].dtype
        cache = KVCache.init(model.config, ids.shape[0], ids.shape[1] + max_new, dtype)
        positions = jnp.maximum(jnp.cumsum(mask, axis=1) - 1, 0)
        logits, cache = model.decode(ids, positions, mask, cache)
        return logits[:, -1], (cache, positions[:, -1] + 1)

    def step(self, params: Any, tokens: Array, cache: Any) -> tuple[Array, Any]:
        model = nnx.merge(self.graphdef, params)
        kv, positions = cache
        ones = jnp.ones((tokens.shape[0], 1), bool)
        logits, kv = model.decode(tokens[:, None], positions[:, None], ones, kv)
        return logits[:, 0], (kv, positions + 1)


def gpt2_decoder(model: GPT2) -> tuple[GPT2Decoder, Any]:
    """The decoder and params of an eval-mode copy of ``model`` (``model`` is left as is)."""
    copy = nnx.merge(*nnx.split(model))
    copy.eval()
    graphdef, params = nnx.split(copy)
    return GPT2Decoder(graphdef), params


def pad_left(
    prompts: Sequence[Sequence[int]], pad_id: int = 0, multiple: int = 1
) -> tuple[np.ndarray, np.ndarray]:
    """Left-pad token lists into ``ids`` and ``mask`` arrays ``(batch, width)``.

    ``width`` is the longest prompt rounded up to ``multiple`` (fewer shapes to compile).
    """
    width = -(-max(len(p) for p in prompts) // multiple) * multiple
    ids = np.full((len(prompts), width), pad_id, np.int32)
    mask = np.zeros((len(prompts), width), np.int32)
    for row, prompt in enumerate(prompts):
        ids[row, width - len(prompt) :] = prompt
        mask[row, width - len(prompt) :] = 1
    return ids, mask


def _reorder(cache: Any, rows: Array) -> Any:
    """Select batch rows of every non-scalar cache leaf."""
    if isinstance(cache, KVCache):
        return cache.take(rows)
    return jax.tree.map(lambda x: x[rows] if x.ndim else x, cache)


def _trim(tokens: np.ndarray, eos_id: int) -> list[int]:
    """Tokens up to (excluding) the first EOS."""
    tokens = [int(t) for t in tokens]
    return tokens[: tokens.index(eos_id)] if eos_id in tokens else tokens


@functools.partial(jax.jit, static_argnames=("lm", "max_new", "eos_id"))
def _greedy(lm: DecoderLM, params: Any, ids: Array, mask: Array, max_new: int, eos_id: int):
    logits, cache = lm.prefill(params, ids, mask, max_new)
    out = jnp.full((ids.shape[0], max_new), eos_id, jnp.int32)
    done = jnp.zeros(ids.shape[0], bool)

    def cond(carry):
        i, _, _, _, done = carry
        return (i < max_new) & ~jnp.all(done)

    def body(carry):
        i, logits, cache, out, done = carry
        token = jnp.where(done, eos_id, jnp.argmax(logits, axis=-1).astype(jnp.int32))
        out = out.at[:, i].set(token)
        logits, cache = lm.step(params, token, cache)
        return i + 1, logits, cache, out, done | (token == eos_id)

    return jax.lax.while_loop(cond, body, (0, logits, cache, out, done))[3]


def greedy_search(
    lm: DecoderLM,
    params: Any,
    prompts: Sequence[Sequence[int]],
    *,
    max_new_tokens: int,
    eos_id: int,
) -> list[list[int]]:
    """Greedy continuation of each prompt, cut at the first EOS."""
    ids, mask = pad_left(prompts, multiple=16)
    out = np.asarray(_greedy(lm, params, ids, mask, max_new_tokens, eos_id))
    return [_trim(row, eos_id) for row in out]


def banned_ngram_mask(history: Array, length: Array, n: int, vocab: int) -> Array:
    """``(rows, vocab)`` mask of tokens that would repeat an ``n``-gram of ``history``.

    ``history`` ``(rows, T)`` holds token ids, ``-1`` for padding and unfilled slots; the
    current sequence ends at column ``length - 1``.
    """
    rows, width = history.shape
    last = jax.lax.dynamic_slice_in_dim(history, length - (n - 1), n - 1, axis=1)
    windows = jnp.stack([history[:, k : width - (n - 1) + k] for k in range(n - 1)], axis=-1)
    nxt = history[:, n - 1 :]
    match = jnp.all(windows == last[:, None, :], axis=-1) & jnp.all(windows >= 0, axis=-1)
    match &= (nxt >= 0) & jnp.all(last >= 0, axis=-1, keepdims=True)
    banned = jnp.zeros((rows, vocab), bool)
    row_ids = jnp.broadcast_to(jnp.arange(rows)[:, None], nxt.shape)
    return banned.at[row_ids, jnp.maximum(nxt, 0)].max(match)


def _length_score(logp: Array, length: Array | int, penalty: float) -> Array:
    return logp / jnp.asarray(length, jnp.float32) ** penalty


@functools.partial(
    jax.jit,
    static_argnames=("lm", "beams", "max_new", "eos_id", "length_penalty", "no_repeat"),
)
def _beam(
    lm: DecoderLM,
    params: Any,
    ids: Array,
    mask: Array,
    beams: int,
    max_new: int,
    eos_id: int,
    length_penalty: float,
    no_repeat: int,
):
    batch, prompt_len = ids.shape
    logits, cache = lm.prefill(params, ids, mask, max_new)
    rows = jnp.repeat(jnp.arange(batch), beams)
    logits, cache = logits[rows], _reorder(cache, rows)
    vocab = logits.shape[-1]
    history = jnp.concatenate(
        [jnp.where(mask > 0, ids, -1), jnp.full((batch, max_new), -1, ids.dtype)], axis=1
    )[rows]
    alive_logp = jnp.tile(jnp.where(jnp.arange(beams) == 0, 0.0, -jnp.inf), (batch, 1))
    best_score = jnp.full((batch,), -jnp.inf)
    best_seq = jnp.full((batch, max_new), eos_id, ids.dtype)

    def cond(carry):
        i, _, _, _, alive_logp, best_score, _ = carry
        top = jnp.max(alive_logp, axis=1)
        bound = jnp.maximum(
            _length_score(top, i + 1, length_penalty), _length_score(top, max_new, length_penalty)
        )
        return (i < max_new) & jnp.any(bound > best_score)

    def body(carry):
        i, logits, cache, history, alive_logp, best_score, best_seq = carry
        logp = jax.nn.log_softmax(logits.astype(jnp.float32), axis=-1)
        if no_repeat > 0:
            banned = banned_ngram_mask(history, prompt_len + i, no_repeat, vocab)
            logp = jnp.where(banned, -jnp.inf, logp)
        cand = (alive_logp[..., None] + logp.reshape(batch, beams, vocab)).reshape(batch, -1)
        cand_logp, cand_idx = jax.lax.top_k(cand, 2 * beams)
        parent, token = cand_idx // vocab, (cand_idx % vocab).astype(ids.dtype)
        # finished candidates among the top `beams` ranks may replace the best hypothesis
        finished = (token == eos_id) & (jnp.arange(2 * beams) < beams)
        fin_score = jnp.where(finished, _length_score(cand_logp, i + 1, length_penalty), -jnp.inf)
        pick = jnp.argmax(fin_score, axis=1)
        pick_score = jnp.take_along_axis(fin_score, pick[:, None], 1)[:, 0]
        pick_parent = jnp.take_along_axis(parent, pick[:, None], 1)[:, 0]
        gen = history.reshape(batch, beams, -1)[jnp.arange(batch), pick_parent, prompt_len:]
        gen = gen.at[:, i].set(eos_id)
        gen = jnp.where(gen < 0, eos_id, gen)
        better = pick_score > best_score
        best_seq = jnp.where(better[:, None], gen, best_seq)
        best_score = jnp.maximum(best_score, pick_score)
        # the best `beams` unfinished candidates stay alive
        live_logp = jnp.where(token == eos_id, -jnp.inf, cand_logp)
        live_logp, keep = jax.lax.top_k(live_logp, beams)
        parent = jnp.take_along_axis(parent, keep, 1)
        token = jnp.take_along_axis(token, keep, 1).reshape(-1)
        src = (jnp.arange(batch)[:, None] * beams + parent).reshape(-1)
        history = history[src].at[:, prompt_len + i].set(token)
        logits, cache = lm.step(params, token, _reorder(cache, src))
        return i + 1, logits, cache, history, live_logp, best_score, best_seq

    init = (0, logits, cache, history, alive_logp, best_score, best_seq)
    i, _, _, history, alive_logp, best_score, best_seq = jax.lax.while_loop(cond, body, init)
    # beams that reached max_new without EOS compete with their full length
    alive_score = _length_score(alive_logp, max_new, length_penalty)
    top = jnp.argmax(alive_score, axis=1)
    top_score = jnp.take_along_axis(alive_score, top[:, None], 1)[:, 0]
    top_seq = history.reshape(batch, beams, -1)[jnp.arange(batch), top, prompt_len:]
    use_alive = (i == max_new) & (top_score > best_score)
    return jnp.where(use_alive[:, None], top_seq, best_seq)


def beam_search(
    lm: DecoderLM,
    params: Any,
    prompts: Sequence[Sequence[int]],
    *,
    max_new_tokens: int,
    eos_id: int,
    num_beams: int = 10,
    length_penalty: float = 0.8,
    no_repeat_ngram_size: int = 4,
) -> list[list[int]]:
    """Best beam-search continuation of each prompt (EOS removed)."""
    ids, mask = pad_left(prompts, multiple=16)
    out = _beam(
        lm,
        params,
        ids,
        mask,
        num_beams,
        max_new_tokens,
        eos_id,
        float(length_penalty),
        no_repeat_ngram_size,
    )
    return [_trim(row, eos_id) for row in np.asarray(out)]


def generate(
    model: GPT2,
    prompts: Sequence[Sequence[int]],
    *,
    max_new_tokens: int,
    eos_id: int,
    num_beams: int = 1,
    batch_size: int = 32,
    **beam_kwargs: Any,
) -> list[list[int]]:
    """Decode ``prompts`` with ``model`` in batches: greedy if ``num_beams == 1``, else beam.

    The last batch is padded with copies of a prompt so that every batch has one shape.
    """
    lm, params = gpt2_decoder(model)
    outputs: list[list[int]] = []
    for start in range(0, len(prompts), batch_size):
        chunk = list(prompts[start : start + batch_size])
        chunk += [chunk[0]] * (min(batch_size, len(prompts)) - len(chunk))
        if num_beams == 1:
            outputs += greedy_search(
                lm, params, chunk, max_new_tokens=max_new_tokens, eos_id=eos_id
            )
        else:
            outputs += beam_search(
                lm,
                params,
                chunk,
                max_new_tokens=max_new_tokens,
                eos_id=eos_id,
                num_beams=num_beams,
                **beam_kwargs,
            )
    return outputs[: len(prompts)]
