"""E2E NLG data: readers for the official CSVs and the GPT-2 LoRA line format, batching.

A directory given to :func:`read_split` may hold either format:

* the E2E challenge files ``trainset.csv``, ``devset.csv``, ``testset_w_refs.csv`` (columns
  ``mr`` and ``ref``; header case is ignored, ``human_reference`` is accepted for ``ref``);
* the GPT-2 LoRA repository's ``train.txt``, ``valid.txt``, ``test.txt`` with one
  ``source || target`` pair per line.

Sources are rendered as ``name : The Eagle | eatType : pub | ...``; a model is trained on
``source <|endoftext|> target <|endoftext|>`` with the loss on the target only.
"""

from __future__ import annotations

import csv
import re
from collections.abc import Iterator, Sequence
from pathlib import Path

import numpy as np

from tokenizer import GPT2Tokenizer

SPLIT_FILES = {
    "train": ("trainset.csv", "train.txt"),
    "dev": ("devset.csv", "valid.txt"),
    "test": ("testset_w_refs.csv", "test.txt"),
}
_SLOT = re.compile(r"\s*([^,\[]+?)\s*\[(.*?)\]")


def mr_to_source(mr: str) -> str:
    """``name[The Eagle], eatType[pub]`` -> ``name : The Eagle | eatType : pub``.

    Text without the bracket syntax (already a source line) is returned stripped.
    """
    slots = _SLOT.findall(mr)
    if not slots:
        return mr.strip()
    return " | ".join(f"{key} : {value}" for key, value in slots)


def _read_csv(path: Path) -> list[tuple[str, str]]:
    with path.open(newline="", encoding="utf-8") as f:
        reader = csv.DictReader(f)
        fields = {name.lower(): name for name in reader.fieldnames or []}
        ref_key = fields.get("ref") or fields.get("human_reference")
        if "mr" not in fields or ref_key is None:
            raise ValueError(f"{path}: expected columns mr, ref; got {reader.fieldnames}")
        return [(row[fields["mr"]], row[ref_key]) for row in reader]


def _read_lines(path: Path) -> list[tuple[str, str]]:
    rows = []
    for number, line in enumerate(path.read_text(encoding="utf-8").splitlines(), 1):
        if not line.strip():
            continue
        if "||" not in line:
            raise ValueError(f"{path}:{number}: expected 'source || target'")
        src, tgt = line.split("||", 1)
        rows.append((src.strip(), tgt.strip()))
    return rows


def read_split(directory: str | Path, split: str) -> list[tuple[str, str]]:
    """``(source, reference)`` rows of ``split`` (``train``, ``dev`` or ``test``)."""
    directory = Path(directory)
    csv_name, txt_name = SPLIT_FILES[split]
    if (directory / csv_name).exists():
        rows = _read_csv(directory / csv_name)
    elif (directory / txt_name).exists():
        rows = _read_lines(directory / txt_name)
    else:
        raise FileNotFoundError(f"neither {csv_name} nor {txt_name} in {directory}")
    return [(mr_to_source(mr), ref.strip()) for mr, ref in rows]


def write_csv(path: str | Path, rows: Sequence[tuple[str, str]]) -> None:
    """Write ``(mr, ref)`` rows in the E2E CSV layout."""
    with Path(path).open("w", newline="", encoding="utf-8") as f:
        writer = csv.writer(f)
        writer.writerow(["mr", "ref"])
        writer.writerows(rows)


def group_references(rows: Sequence[tuple[str, str]]) -> list[tuple[str, list[str]]]:
    """Collect the references of each source, in order of first appearance."""
    groups: dict[str, list[str]] = {}
    for src, ref in rows:
        groups.setdefault(src, []).append(ref)
    return list(groups.items())


def encode_prompt(tokenizer: GPT2Tokenizer, source: str) -> list[int]:
    """Token ids that condition generation: the source, then ``<|endoftext|>``."""
    return tokenizer.encode(source) + [tokenizer.eos_token_id]


def encode_pairs(
    tokenizer: GPT2Tokenizer, rows: Sequence[tuple[str, str]]
) -> list[tuple[list[int], list[int]]]:
    """``(prompt ids, target ids)`` per row; targets start with a space and end with EOS."""
    eos = tokenizer.eos_token_id
    return [(encode_prompt(tokenizer, s), tokenizer.encode(" " + t) + [eos]) for s, t in rows]


def pack(
    pairs: Sequence[tuple[list[int], list[int]]], max_len: int
) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """Right-padded ``inputs``, ``targets`` and target ``weights`` of shape ``(n, max_len)``.

    ``targets`` are the inputs shifted by one; ``weights`` are 1 exactly where the next token
    belongs to the reference. Sequences longer than ``max_len + 1`` are truncated.
    """
    n = len(pairs)
    inputs = np.zeros((n, max_len), np.int32)
    targets = np.zeros((n, max_len), np.int32)
    weights = np.zeros((n, max_len), np.float32)
    for row, (prompt, target) in enumerate(pairs):
        seq = (prompt + target)[: max_len + 1]
        length = len(seq) - 1
        inputs[row, :length] = seq[:-1]
        targets[row, :length] = seq[1:]
        weights[row, len(prompt) - 1 : length] = 1.0
    return inputs, targets, weights


def batches(
    arrays: tuple[np.ndarray, ...], batch_size: int, seed: int, start_step: int = 0
) -> Iterator[tuple[np.ndarray, ...]]:
    """Endless shuffled minibatches; epoch ``e`` uses permutation ``seed + e``.

    ``start_step`` skips that many batches, so a resumed run sees the same data order.
    """
    n = len(arrays[0])
    per_epoch = n // batch_size
    step = start_step
    while True:
        epoch, offset = divmod(step, per_epoch)
        order = np.random.default_rng(seed + epoch).permutation(n)
        rows = order[offset * batch_size : (offset + 1) * batch_size]
        yield tuple(a[rows] for a in arrays)
        step += 1
