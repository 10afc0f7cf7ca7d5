"""The methods benchmarked: the test battery's registry ``tests/methods.py`` (one entry per
method and notable variant), loaded by path so the benchmarks need no package ``tests``."""

from __future__ import annotations

import importlib.util
import pathlib
import sys

_PATH = pathlib.Path(__file__).resolve().parents[1] / "tests" / "methods.py"


def _load():
    spec = importlib.util.spec_from_file_location("lowrank_optax_test_methods", _PATH)
    module = importlib.util.module_from_spec(spec)
    sys.modules[spec.name] = module  # dataclasses resolve the module by name
    spec.loader.exec_module(module)
    return module


_methods = _load()
Method = _methods.Method
METHODS: list = list(_methods.METHODS)
BY_NAME: dict = dict(_methods.BY_NAME)
