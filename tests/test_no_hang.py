"""No method hangs: every registered method, jitted on the 24-layer GPT-2-medium q,v tree.

Each method runs a few jitted updates over 24 layers of stacked ``c_attn`` q,v pairs
(``lora_a (2, 1024, r)``, ``lora_b (2, r, 1024)``: 48 pairs, batched by ``map_pairs``) in a child
process with no ``XLA_FLAGS``, as a user runs it. XLA:CPU's batched LAPACK custom calls used to
deadlock there intermittently (more than half of the trials for ``altlora``, ``lora_rite``,
``lracs``, ``adams(low_memory=True)``); the library's kernels now avoid them
(``lowrank_optax.linalg``). A child that does not finish within its timeout is a failure naming
the method it was running: this is the one timed guard in the suite, because a hang is a
correctness failure.

Run directly (``python tests/test_no_hang.py --rank 64 --trials 3``) it repeats the check, which
is how the benchmark run checks r = 4, 16 and 64.
"""

from __future__ import annotations

import argparse
import os
import pathlib
import subprocess
import sys
import time

ROOT = pathlib.Path(__file__).resolve().parents[1]
CALLS = 3
# Seconds per child: its ~7 methods take ~60–90 s of CPU (mostly compiling) on 2 idle cores,
# several times that on a loaded machine; a hang
# never returns.
TIMEOUT = 420


def _variants():
    import lowrank_optax as lro
    from benchmarks.registry import METHODS, Method

    extra = [
        Method("altlora_joint", lro.altlora, 0.1, {"joint": True}),
        Method("altlora_plus_joint", lro.altlora_plus, 0.1, {"joint": True}),
    ]
    return {m.name: m for m in [*METHODS, *extra]}


def _groups(names: list[str], count: int) -> list[list[str]]:
    return [names[i::count] for i in range(count)]


def _child(names: list[str], rank: int) -> None:
    """Runs ``CALLS`` jitted updates of each method, printing ``start``/``done`` lines."""
    import jax
    import optax

    from benchmarks import harness

    variants = _variants()
    params = harness.pair_tree(rank, all_four=False)
    grads = harness.gradients_like(params)
    for name in names:
        print(f"start {name}", flush=True)
        begin = time.perf_counter()
        tx = variants[name].make()
        state = jax.jit(tx.init)(params)
        step = jax.jit(tx.update)
        p = params
        for _ in range(CALLS):
            updates, state = step(grads, state, p)
            p = optax.apply_updates(p, updates)
        finite = all(bool(jax.numpy.isfinite(x).all()) for x in jax.tree.leaves(p))
        print(f"done {name} {time.perf_counter() - begin:.1f}s finite={finite}", flush=True)


def _env() -> dict[str, str]:
    env = {k: v for k, v in os.environ.items() if k != "XLA_FLAGS"}
    env["JAX_PLATFORMS"] = "cpu"
    env["PYTHONPATH"] = os.pathsep.join([str(ROOT), env.get("PYTHONPATH", "")])
    return env


def run_groups(rank: int, processes: int = 3, timeout: float = TIMEOUT) -> dict[str, str]:
    """Runs every variant in ``processes`` parallel children; returns ``{name: outcome}`` with
    outcome ``"ok"``, ``"non-finite"``, ``"hung"`` (still running at the timeout) or
    ``"not run"`` / ``"crashed"``."""
    names = sorted(_variants())
    children = []
    for group in _groups(names, processes):
        cmd = [sys.executable, __file__, "--child", "--rank", str(rank), *group]
        children.append((group, subprocess.Popen(cmd, cwd=ROOT, env=_env(), text=True,
                                                 stdout=subprocess.PIPE,
                                                 stderr=subprocess.STDOUT)))
    deadline = time.monotonic() + timeout
    outcome: dict[str, str] = {}
    for group, child in children:
        try:
            out, _ = child.communicate(timeout=max(deadline - time.monotonic(), 1.0))
            timed_out = False
        except subprocess.TimeoutExpired:
            child.kill()
            out, _ = child.communicate()
            timed_out = True
        started = [line.split()[1] for line in out.splitlines() if line.startswith("start ")]
        for line in out.splitlines():
            if line.startswith("done "):
                _, name, _, finite = line.split()
                outcome[name] = "ok" if finite == "finite=True" else "non-finite"
        for name in group:
            if name in outcome:
                continue
            if name in started:
                outcome[name] = "hung" if timed_out else "crashed: " + out[-2000:]
            else:
                outcome[name] = "not run"
    return outcome


def test_no_method_hangs_on_gpt2_medium_qv_at_rank_16():
    outcome = run_groups(16)
    bad = {name: result for name, result in outcome.items() if result != "ok"}
    assert not bad, f"methods that hung, crashed or were not reached: {bad}"


def test_the_groups_cover_every_method():
    names = sorted(_variants())
    assert sorted(n for g in _groups(names, 3) for n in g) == names
    assert {"altlora_joint", "altlora_plus_joint", "adams_low_memory",
            "lora_rite_global_escape_cap"} <= set(names)


def _main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--child", action="store_true")
    parser.add_argument("--rank", type=int, default=16)
    parser.add_argument("--trials", type=int, default=1)
    parser.add_argument("--processes", type=int, default=3)
    parser.add_argument("names", nargs="*")
    args = parser.parse_args()
    if args.child:
        _child(args.names, args.rank)
        return
    for trial in range(args.trials):
        begin = time.perf_counter()
        outcome = run_groups(args.rank, args.processes)
        bad = {n: r for n, r in outcome.items() if r != "ok"}
        print(f"rank {args.rank} trial {trial}: {time.perf_counter() - begin:.0f}s, "
              f"{len(outcome) - len(bad)}/{len(outcome)} ok, bad: {bad}", flush=True)


if __name__ == "__main__":
    sys.path.insert(0, str(ROOT))
    _main()

