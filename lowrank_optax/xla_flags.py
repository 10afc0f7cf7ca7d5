"""A mitigation for an XLA:CPU deadlock that jitted LoRA-optimizer updates trigger (jaxlib 0.10).

With jaxlib 0.10.2 on CPU, the jitted update of several methods of this library over a realistic
number of stacked pairs (e.g. ``altlora``, ``lora_rite`` or ``adams(low_memory=True)`` on the q
and v pairs of 24 GPT-2-medium layers) can never finish: ``block_until_ready`` waits forever and
every thread of the process sleeps on a futex. Native stacks (gdb) show the cause: jaxlib's
batched LAPACK kernels (``geqrf``/``orgqr`` here) split their batch over XLA's intra-op thread
pool (``jax::ParallelBatchMap``) and block *inside* a worker of that pool; once the pool's
workers all wait in such calls, the tasks they fanned out can never run.

Measured on a 2-core machine with nothing else running (``altlora``: hung on its first call in
3 of 3 runs; ``lora_rite``: 1 of 1): turning off XLA's concurrency-optimised scheduler, which
runs independent kernels at the same time, let ``altlora`` (twice), ``altlora_plus``,
``scaled_adamw``, ``lora_rite``, ``lora_pro_sgd``, ``solora_sgd`` and ``lracs`` each run 100 to
200 calls without a hang (``altlora``'s update also took 22 ms instead of 42 ms). It is a
mitigation, not a fix: ``adams(low_memory=True)`` (two batched QRs per pair) still hung with it,
also together with ``--xla_cpu_multi_thread_eigen=false``. ``OPENBLAS_NUM_THREADS=1``,
``--xla_cpu_use_xnnpack=false`` and ``--xla_cpu_use_thunk_runtime=false`` did not help, nor did
mapping the LAPACK calls sequentially over the batch. GPUs are not affected.

The flag must be in ``XLA_FLAGS`` before JAX starts its CPU backend (its first computation).
:func:`disable_cpu_concurrency_scheduler` adds it; the examples, the benchmarks and the test
suite call it first thing. Set it yourself with::

    XLA_FLAGS=--xla_cpu_enable_concurrency_optimized_scheduler=false python train.py
"""


from __future__ import annotations

import importlib.metadata
import os
import sys
import warnings

__all__ = ["CPU_SCHEDULER_FLAG", "disable_cpu_concurrency_scheduler"]

CPU_SCHEDULER_FLAG = "--xla_cpu_enable_concurrency_optimized_scheduler=false"
_FLAG_NAME = "xla_cpu_enable_concurrency_optimized_scheduler"
# jaxlib releases where the deadlock was seen and the flag verified; XLA aborts on unknown flags,
# so other releases are left alone.
_AFFECTED_JAXLIB = ("0.10.",)


def _backend_started() -> bool:
    if "jax" not in sys.modules:
        return False
    from jax._src import xla_bridge

    return xla_bridge.backends_are_initialized()


def disable_cpu_concurrency_scheduler() -> bool:
    """Adds :data:`CPU_SCHEDULER_FLAG` to ``XLA_FLAGS`` where the deadlock above is known.

    Call it before the first JAX computation. It leaves ``XLA_FLAGS`` unchanged when the user
    already set the scheduler flag (either way), when the installed jaxlib is not one of the
    affected releases (0.10.x), and when JAX's backends have already started (then it warns:
    the flag would have no effect).

    Returns:
      Whether ``XLA_FLAGS`` now turns the scheduler off.
    """
    flags = os.environ.get("XLA_FLAGS", "")
    if _FLAG_NAME in flags:
        return CPU_SCHEDULER_FLAG in flags.split()
    if not importlib.metadata.version("jaxlib").startswith(_AFFECTED_JAXLIB):
        return False
    if _backend_started():
        warnings.warn(
            "disable_cpu_concurrency_scheduler() was called after JAX started its backends; "
            f"set XLA_FLAGS={CPU_SCHEDULER_FLAG} before the first JAX computation instead",
            stacklevel=2,
        )
        return False
    os.environ["XLA_FLAGS"] = f"{flags} {CPU_SCHEDULER_FLAG}".strip()
    return True
