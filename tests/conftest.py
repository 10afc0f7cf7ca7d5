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
compile at XLA:CPU's backend optimisation level 0 (appended to the caller's ``XLA_FLAGS``; it
changes code generation, not the computation); ``test_no_hang`` runs its children without any
flag, as a user does.
"""

import os
import sys
from pathlib import Path

os.environ["XLA_FLAGS"] = " ".join(
    filter(None, [os.environ.get("XLA_FLAGS", ""), "--xla_backend_optimization_level=0"])
)

import jax  # noqa: E402  (after XLA_FLAGS: the backend reads them when it starts)

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "examples" / "gpt2"))

jax.config.update("jax_default_matmul_precision", "highest")
