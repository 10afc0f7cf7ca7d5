"""Test-wide settings.

The tests' own reference computations (gradients of the test losses, transcriptions of the papers'
formulas) run at full float32 matmul precision on every backend: on GPUs XLA's default float32
matmul is TF32, whose ~1e-3 relative error would fail comparisons at 1e-5 for reasons that have
nothing to do with the library. The library pins its own precision
(``lowrank_optax.pairs.MATMUL_PRECISION``); ``test_every_matmul_runs_at_full_float32_precision``
checks that under a reduced default.
"""

import jax

jax.config.update("jax_default_matmul_precision", "highest")
