"""Test-wide settings.

The tests' own reference computations (gradients of the test losses, transcriptions of the papers'
formulas) run at full float32 matmul precision on every backend: on GPUs XLA's default float32
matmul is TF32, whose ~1e-3 relative error would fail comparisons at 1e-5 for reasons that have
nothing to do with the library. The library pins its own precision
(``lowrank_optax.pairs.MATMUL_PRECISION``); ``test_every_matmul_runs_at_full_float32_precision``
checks that under a reduced default. The GPT-2 example's modules (``examples/gpt2/``: model,
tokenizer, decoding, E2E data, metrics) are importable by their names, as the example's scripts
import them.

Compiling (each method's update, at small shapes) dominates the suite's time, so the tests
compile with ``FAST_COMPILE_FLAGS`` appended to the caller's ``XLA_FLAGS``: XLA:CPU's backend
optimisation level 0 and its classic elemental emitters instead of the MLIR fusion emitters
(together they halve the compile time of an update; they change code generation, not the
computation). The subprocesses the tests start inherit them; ``test_no_hang`` and the GPT-2
example's end-to-end run use the caller's flags only (fixture ``user_xla_flags``), as a user
runs them.
"""

import os
import sys
from pathlib import Path

import pytest

FAST_COMPILE_FLAGS = ("--xla_backend_optimization_level=0", "--xla_cpu_use_fusion_emitters=false")
USER_XLA_FLAGS = os.environ.get("XLA_FLAGS", "")
os.environ["XLA_FLAGS"] = " ".join(filter(None, [USER_XLA_FLAGS, *FAST_COMPILE_FLAGS]))

import jax  # noqa: E402  (after XLA_FLAGS: the backend reads them when it starts)

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "examples" / "gpt2"))

jax.config.update("jax_default_matmul_precision", "highest")

# The longest files first, longest first (measured CPU seconds on 2 cores: 400-550, 250-400,
# 215, 200, then about 70 each). pytest-xdist (``--dist loadfile --no-loadscope-reorder``)
# hands the files to its workers in collection order, so no long file is left to run alone
# at the end.
LONGEST_FIRST = ("test_battery.py", "test_tunix.py", "test_multidevice.py", "test_no_hang.py",
                 "test_gpt2_finetune.py", "test_docs.py", "test_gpt2.py", "test_layouts.py")


@pytest.fixture(scope="session")
def user_xla_flags() -> str:
    """The ``XLA_FLAGS`` the suite was started with, without ``FAST_COMPILE_FLAGS``."""
    return USER_XLA_FLAGS


def pytest_collection_modifyitems(items: list) -> None:
    def rank(item) -> int:
        name = item.path.name
        return LONGEST_FIRST.index(name) if name in LONGEST_FIRST else len(LONGEST_FIRST)

    items.sort(key=rank)
