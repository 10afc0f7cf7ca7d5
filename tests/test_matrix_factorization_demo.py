"""The demo's claim: ScaledGD's steps to 1e-3 do not depend on κ; plain GD's grow with κ."""

from __future__ import annotations

import importlib.util
import pathlib

import pytest

DEMO = pathlib.Path(__file__).parents[1] / "examples" / "matrix_factorization.py"


@pytest.fixture(scope="module")
def demo():
    spec = importlib.util.spec_from_file_location("matrix_factorization", DEMO)
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def _steps(demo, name, cond, steps):
    errors = demo.relative_errors(demo.OPTIMIZERS[name](), demo.target(cond), steps)
    return demo.steps_to_threshold(errors)


def test_scaled_sgd_rate_is_independent_of_condition_number(demo):
    easy, hard = _steps(demo, "scaled_sgd", 10, 200), _steps(demo, "scaled_sgd", 1000, 200)
    assert easy is not None and hard is not None
    assert hard <= 2 * easy


def test_plain_sgd_slows_down_more_than_tenfold(demo):
    cap = 20000
    easy, hard = _steps(demo, "sgd", 10, cap), _steps(demo, "sgd", 1000, cap)
    assert easy is not None
    assert (hard or cap + 1) > 10 * easy
