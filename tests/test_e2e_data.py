"""E2E readers, batching, and the synthetic data generators."""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest

import e2e
import restaurants

EXAMPLE = Path(__file__).resolve().parents[1] / "examples" / "gpt2"


def test_mr_to_source():
    mr = "name[The Eagle], eatType[coffee shop], customer rating[5 out of 5], near[X]"
    assert e2e.mr_to_source(mr) == (
        "name : The Eagle | eatType : coffee shop | customer rating : 5 out of 5 | near : X"
    )
    assert e2e.mr_to_source(" name : X | area : riverside ") == "name : X | area : riverside"


def test_reads_csv_and_line_formats(tmp_path):
    e2e.write_csv(tmp_path / "trainset.csv", [("name[A], area[riverside]", "A is by the river.")])
    (tmp_path / "valid.txt").write_text("name : B || B is nice.\n\nname : B || B is good.\n")
    (tmp_path / "testset_w_refs.csv").write_text('MR,human_reference\n"name[C]",C.\n')
    assert e2e.read_split(tmp_path, "train") == [
        ("name : A | area : riverside", "A is by the river.")
    ]
    dev = e2e.read_split(tmp_path, "dev")
    assert e2e.group_references(dev) == [("name : B", ["B is nice.", "B is good."])]
    assert e2e.read_split(tmp_path, "test") == [("name : C", "C.")]
    with pytest.raises(FileNotFoundError):
        e2e.read_split(tmp_path / "missing", "train")


def test_pack_weights_cover_exactly_the_target():
    inputs, targets, weights = e2e.pack([([1, 2, 3], [4, 5]), ([7], [8, 9, 10, 11])], max_len=4)
    # row 0: sequence 1 2 3 4 5 -> predict 2 3 4 5; the target is 4 5 (positions 2, 3)
    np.testing.assert_array_equal(inputs[0], [1, 2, 3, 4])
    np.testing.assert_array_equal(targets[0], [2, 3, 4, 5])
    np.testing.assert_array_equal(weights[0], [0, 0, 1, 1])
    # row 1 is truncated to max_len + 1 tokens: 7 8 9 10 11
    np.testing.assert_array_equal(targets[1], [8, 9, 10, 11])
    np.testing.assert_array_equal(weights[1], [1, 1, 1, 1])


def test_batches_are_deterministic_and_resumable():
    data = (np.arange(10), np.arange(10) * 2)
    first = [b[0].tolist() for _, b in zip(range(7), e2e.batches(data, 3, seed=5), strict=False)]
    resumed = [b[0].tolist() for _, b in zip(range(3), e2e.batches(data, 3, 5, 4), strict=False)]
    assert resumed == first[4:]
    epoch = sorted(sum(first[:3], []))
    assert len(set(epoch)) == 9


def test_generator_is_deterministic_and_covers_slots():
    rows = restaurants.make_data_to_text(50, 3, seed=11)
    assert rows == restaurants.make_data_to_text(50, 3, seed=11)
    groups = e2e.group_references(rows)
    assert len(groups) == 50
    slots = {key for mr, _ in groups for key, _ in e2e._SLOT.findall(mr)}
    assert slots == set(restaurants.SLOTS)
    for mr, refs in groups:
        assert len(set(refs)) == len(refs) >= 2
        name = e2e._SLOT.findall(mr)[0][1]
        assert all(name in ref for ref in refs)


def test_pretraining_text_has_no_meaning_representations():
    docs = restaurants.make_pretraining_text(200, seed=0)
    assert docs == restaurants.make_pretraining_text(200, seed=0)
    assert not any("[" in d or "|" in d for d in docs)


def test_bundled_data_matches_generator(tmp_path):
    subprocess.run(
        [sys.executable, str(EXAMPLE / "make_data.py"), "--out", str(tmp_path)],
        check=True,
        capture_output=True,
    )
    for name in ("trainset.csv", "devset.csv", "testset_w_refs.csv"):
        assert (tmp_path / name).read_bytes() == (EXAMPLE / "data" / name).read_bytes(), name
    train = {mr for mr, _ in e2e.read_split(tmp_path, "train")}
    test = {mr for mr, _ in e2e.read_split(tmp_path, "test")}
    assert not train & test
