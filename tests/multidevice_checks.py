"""Multi-device checks of every registered method, on 8 simulated CPU devices.

Run by ``test_multidevice.py`` in a subprocess, because the device count is fixed when jax is
imported::

    XLA_FLAGS=--xla_force_host_platform_device_count=8 python tests/multidevice_checks.py \
        --out results.json [--methods NAME ...] [--checks CHECK ...] [--extra JSON]

For each method it runs a few training steps of a small LoRA problem whose four pairs are
sharded along ``m``, along ``n``, along both, and along a stacked-layer axis, and compares
params, optimizer state and updates with the single-device run, in float64 (see ``DTYPE``), to
``TOLERANCE`` relative to each array's scale (see ``assert_close``). The checks:

* ``jit_auto`` / ``eager_auto``: ``NamedSharding`` inputs on an ``Auto`` mesh, with and without
  ``jit``; every state array keeps the sharding ``init`` gave it;
* ``jit_explicit`` / ``eager_explicit``: the same on an ``Explicit`` mesh under
  ``jax.set_mesh``, where ``jax.typeof`` carries the sharding and must not change;
* ``pmap`` / ``shard_map``: data-parallel steps, per-device gradients averaged by
  ``lax.pmean``, equal to the single-device full-batch step.

It writes ``{method: {check: {"ok": bool, "detail": str, "seconds": float}}}`` as JSON after
each method, and skips the methods already in ``--out`` (a rerun resumes). A passing check's
detail says how much of the tolerance its largest error used.
"""

from __future__ import annotations

import argparse
import json
import os
import pathlib
import sys
import time
import traceback
from collections.abc import Callable
from typing import Any

if "xla_force_host_platform_device_count" not in os.environ.get("XLA_FLAGS", ""):
    sys.exit("set XLA_FLAGS=--xla_force_host_platform_device_count=8 before running")

import jax  # noqa: E402

jax.config.update("jax_enable_x64", True)  # see DTYPE

import jax.numpy as jnp  # noqa: E402
import numpy as np  # noqa: E402
import optax  # noqa: E402
from jax.sharding import AxisType, NamedSharding  # noqa: E402
from jax.sharding import PartitionSpec as P  # noqa: E402
from methods import METHODS, Method  # noqa: E402

DEVICES = 8
M, N, RANK, LAYERS, BATCH = 16, 24, 4, 8, 32
STEPS = 3
# Runs are compared in float64: in float32 the single-device result itself is only accurate to
# ~1e-5 of the update for adaptive methods (adams: 7e-6 against float64) and to 5e-2 for
# adams_low_memory, so a float32 comparison would measure rounding noise, not sharding.
DTYPE = jnp.float64
# Errors are measured per leaf relative to its scale (see ``assert_close``).
TOLERANCE = 1e-5
# Leaves whose reference is exactly zero: float64 rounding of reordered sums.
ABSOLUTE_FLOOR = 1e-12

# Partition specs of (a, b) for each pair of the test tree, on a 1-D mesh with axis "x".
PAIR_SPECS = {
    "rows": (P("x", None), P()),
    "cols": (P(), P(None, "x")),
    "both": (P("x", None), P(None, "x")),
    "layers": (P("x", None, None), P("x", None, None)),
}


def make_problem(seed: int = 0) -> tuple[dict, dict]:
    """Params (nonzero ``b``, well-conditioned factors) and a regression batch ``(x, y)``."""
    rng = np.random.default_rng(seed)
    params, targets = {}, {}
    for name in PAIR_SPECS:
        lead = (LAYERS,) if name == "layers" else ()
        a = rng.normal(size=(*lead, M, RANK)) / np.sqrt(M)
        b = 0.5 * rng.normal(size=(*lead, RANK, N))
        params[name] = {"lora_a": jnp.asarray(a, DTYPE), "lora_b": jnp.asarray(b, DTYPE)}
        targets[name] = rng.normal(size=(*lead, BATCH, N)) / np.sqrt(M)
    x = rng.normal(size=(BATCH, M))
    batch = {"x": jnp.asarray(x, DTYPE),
             "y": {k: jnp.asarray(v, DTYPE) for k, v in targets.items()}}
    return params, batch


def loss(params: dict, batch: dict) -> jax.Array:
    """Mean over the batch of ``½ Σ_pairs ‖x a b − y‖²`` (layers summed)."""
    total = 0.0
    for name, pair in params.items():
        pred = jnp.einsum("im,...mr,...rn->...in", batch["x"], pair["lora_a"], pair["lora_b"])
        total = total + 0.5 * jnp.sum((pred - batch["y"][name]) ** 2) / batch["x"].shape[0]
    return total


def param_shardings(mesh: jax.sharding.Mesh) -> dict:
    return {name: {"lora_a": NamedSharding(mesh, sa), "lora_b": NamedSharding(mesh, sb)}
            for name, (sa, sb) in PAIR_SPECS.items()}


def run(tx: optax.GradientTransformation, params: dict, batch: dict, grad_fn: Callable,
        use_jit: bool, pin: Callable[[Any], Any] | None = None) -> tuple[tuple, list[Any]]:
    """``STEPS`` steps; returns the last ``(params, state, updates)`` and the states after each.

    ``pin(tree)`` gives the shardings that a jitted step's outputs are pinned to.
    """
    state = tx.init(params)
    states = [state]

    def step(p, s):
        updates, s = tx.update(grad_fn(p, batch), s, p)
        return optax.apply_updates(p, updates), s, updates

    if use_jit:
        pinned = None if pin is None else (pin(params), pin(state), pin(params))
        step = jax.jit(step, out_shardings=pinned)
    updates = None
    for _ in range(STEPS):
        params, state, updates = step(params, state)
        states.append(state)
    return (params, state, updates), states


def shardings_of(mesh: jax.sharding.Mesh) -> Callable[[Any], Any]:
    """Each array's sharding, arrays not yet placed on the mesh (counters) replicated on it."""
    replicated = NamedSharding(mesh, P())
    return lambda tree: jax.tree.map(
        lambda x: x.sharding if isinstance(x.sharding, NamedSharding) else replicated, tree)


def assert_close(got: Any, want: Any, what: str, origin: Any = None) -> float:
    """Per leaf, ``max|got − want| ≤ TOLERANCE · scale + ABSOLUTE_FLOOR``.

    ``scale`` is ``max|want − origin|`` when ``origin`` is given (params: how far the reference
    run moved them, i.e. the size of the updates summed over the steps), else ``max|want|``
    (updates, optimizer state). Returns the largest fraction of its bound that an error used.
    """
    used = 0.0
    got_leaves, want_leaves = jax.tree.leaves_with_path(got), jax.tree.leaves(want)
    origins = jax.tree.leaves(origin) if origin is not None else [0.0] * len(want_leaves)
    assert len(got_leaves) == len(want_leaves), f"{what}: {len(got_leaves)} vs {len(want_leaves)}"
    for (path, g), w, o in zip(got_leaves, want_leaves, origins):
        g, w, o = (np.asarray(v, np.float64) for v in (g, w, o))
        err = float(np.max(np.abs(g - w), initial=0.0))
        scale = float(np.max(np.abs(w - o), initial=0.0))
        bound = TOLERANCE * scale + ABSOLUTE_FLOOR
        assert err <= bound, (
            f"{what}{jax.tree_util.keystr(path)}: max error {err:.2e} (scale {scale:.1e})")
        used = max(used, err / bound)
    return used


def assert_same_shardings(states: list[Any]) -> None:
    """Every array of every later state has the sharding (and type) of the initial state's."""
    first = jax.tree.leaves_with_path(states[0])
    for k, later in enumerate(states[1:], 1):
        for (path, x), y in zip(first, jax.tree.leaves(later)):
            where = f"state{jax.tree_util.keystr(path)} after step {k}"
            assert jax.typeof(x) == jax.typeof(y), f"{where}: {jax.typeof(x)} -> {jax.typeof(y)}"
            assert x.sharding.is_equivalent_to(y.sharding, x.ndim), (
                f"{where}: {x.sharding} -> {y.sharding}")


def sharded_check(method: Method, axis_type: AxisType, use_jit: bool,
                  reference: tuple) -> float:
    mesh = jax.make_mesh((DEVICES,), ("x",), axis_types=(axis_type,))
    params, batch = make_problem()
    grad_fn = jax.grad(loss)
    with jax.set_mesh(mesh):
        params = jax.device_put(params, param_shardings(mesh))
        batch = jax.device_put(batch, NamedSharding(mesh, P()))
        if axis_type == AxisType.Explicit:
            # The model is not under test: let the compiler shard its contractions.
            grad_fn = jax.sharding.auto_axes(jax.grad(loss), out_sharding=param_shardings(mesh))
        # On an Auto mesh a jitted step's output shardings are the compiler's choice unless
        # pinned: pin them to the params' and the initial state's (the documented recipe).
        pin = shardings_of(mesh) if axis_type == AxisType.Auto else None
        result, states = run(method.make(), params, batch, grad_fn, use_jit, pin)
        for name, (sa, sb) in PAIR_SPECS.items():
            for key, spec in (("lora_a", sa), ("lora_b", sb)):
                got = result[0][name][key].sharding
                assert got.is_equivalent_to(NamedSharding(mesh, spec), len(spec) or 2), (
                    f"params[{name}][{key}] lost its sharding {spec}: {got}")
    assert_same_shardings(states)
    return max(assert_close(result[0], reference[0], "params", origin=make_problem()[0]),
               assert_close(result[1], reference[1], "state"),
               assert_close(result[2], reference[2], "updates"))


def data_parallel_check(method: Method, mode: str, reference: tuple) -> float:
    """Per-device gradients of a batch shard, ``pmean``-ed, give the full-batch steps."""
    tx = method.make()
    params, batch = make_problem()
    state = tx.init(params)

    def step(p, s, data):
        grads = jax.lax.pmean(jax.grad(loss)(p, data), "data")
        updates, s = tx.update(grads, s, p)
        return optax.apply_updates(p, updates), s

    # The batch axis of x is 0; of y it is the one before the last (layers lead).
    batch_specs = jax.tree.map(lambda v: P(*([None] * (v.ndim - 2)), "data"), batch)
    if mode == "pmap":
        # Inputs are placed as pmap places its outputs (device k holds row k, on an Auto mesh),
        # so the step compiles once.
        mesh = jax.make_mesh((DEVICES,), ("data",), axis_types=(AxisType.Auto,))
        split = lambda v: np.moveaxis(  # noqa: E731
            np.reshape(v, (*v.shape[:-2], DEVICES, -1, v.shape[-1])), -3, 0)
        stacked = jax.tree.map(lambda v: np.stack([np.asarray(v)] * DEVICES), (params, state))
        data = jax.tree.map(lambda v: split(np.asarray(v)), batch)
        p, s, data = jax.device_put((*stacked, data), NamedSharding(mesh, P("data")))
        parallel = jax.pmap(step, axis_name="data")
        for _ in range(STEPS):
            p, s = parallel(p, s, data)
        replicas = [jax.tree.map(lambda v, k=k: np.asarray(v)[k], (p, s)) for k in range(DEVICES)]
    else:
        mesh = jax.make_mesh((DEVICES,), ("data",), axis_types=(AxisType.Explicit,))
        # check_vma=False keeps pmap's semantics: jax.grad gives the local gradient, which the
        # step averages. (With check_vma=True, the gradient of replicated params is already
        # psum-ed over devices, and the loss must be pmean-ed instead.)
        parallel = jax.jit(jax.shard_map(step, mesh=mesh, in_specs=(P(), P(), batch_specs),
                                         out_specs=(P(), P()), check_vma=False))
        p, s = jax.device_put((params, state), NamedSharding(mesh, P()))
        data = jax.device_put(batch, jax.tree.map(lambda sp: NamedSharding(mesh, sp), batch_specs))
        for _ in range(STEPS):
            p, s = parallel(p, s, data)
        replicas = [(p, s)]
    origin = make_problem()[0]
    return max(max(assert_close(p, reference[0], f"device {k}: params", origin=origin),
                   assert_close(s, reference[1], f"device {k}: state"))
               for k, (p, s) in enumerate(replicas))


def _resharding_sgd(learning_rate: float) -> optax.GradientTransformation:
    """Canary: SGD with a gradient-sum state that its update reshards to replicated."""

    def update(updates, state, params=None):
        del params
        state = jax.tree.map(lambda s, u: s + u, state, updates)
        if jax.sharding.get_abstract_mesh().explicit_axes:
            state = jax.tree.map(lambda s: jax.sharding.reshard(s, P()), state)
        return jax.tree.map(lambda u: -learning_rate * u, updates), state

    return optax.GradientTransformation(lambda p: jax.tree.map(jnp.zeros_like, p), update)


def _drifting_sgd(learning_rate: float) -> optax.GradientTransformation:
    """Canary: each optimizer built gets a learning rate 1e-4 larger (relative) than the last."""
    _drifting_sgd.calls = getattr(_drifting_sgd, "calls", 0) + 1
    return optax.sgd(learning_rate * (1.0 + 1e-4 * _drifting_sgd.calls))


# Broken on purpose: their checks must fail (the harness can see what it is meant to see).
CANARIES = [Method("canary_resharding", _resharding_sgd, 0.1),
            Method("canary_drifting", _drifting_sgd, 0.1)]


def reference_run(method: Method) -> tuple:
    params, batch = make_problem()
    result, _ = run(method.make(), params, batch, jax.grad(loss), use_jit=True)
    return result


CHECKS: dict[str, Callable[[Method, tuple], float]] = {
    "jit_auto": lambda m, ref: sharded_check(m, AxisType.Auto, True, ref),
    "eager_auto": lambda m, ref: sharded_check(m, AxisType.Auto, False, ref),
    "jit_explicit": lambda m, ref: sharded_check(m, AxisType.Explicit, True, ref),
    "eager_explicit": lambda m, ref: sharded_check(m, AxisType.Explicit, False, ref),
    "pmap": lambda m, ref: data_parallel_check(m, "pmap", ref),
    "shard_map": lambda m, ref: data_parallel_check(m, "shard_map", ref),
}


def describe(err: Exception) -> str:
    """The error's type, first line, and the innermost library frame it came from."""
    frames = traceback.extract_tb(err.__traceback__)
    where = next((f"{f.filename.split('/')[-1]}:{f.lineno}" for f in reversed(frames)
                  if "lowrank_optax" in f.filename), "")
    first_line = (str(err).strip().splitlines() or [""])[0]
    return f"{type(err).__name__}: {first_line} [{where}]"


def check_method(method: Method, checks: list[str]) -> dict[str, dict[str, Any]]:
    try:
        reference, failed = reference_run(method), ""
    except Exception as err:  # noqa: BLE001 -- every failure is reported, none is fatal
        reference, failed = None, f"single-device reference run failed: {describe(err)}"
    results = {}
    for name in checks:
        start = time.perf_counter()
        try:
            assert not failed, failed
            used = CHECKS[name](method, reference)
            results[name] = {"ok": True, "detail": f"{used:.1e} of the tolerance used"}
        except Exception as err:  # noqa: BLE001
            results[name] = {"ok": False, "detail": describe(err)}
        results[name]["seconds"] = round(time.perf_counter() - start, 2)
    return results


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--out", required=True)
    parser.add_argument("--methods", nargs="*", default=None, help="default: every method")
    parser.add_argument("--checks", nargs="*", default=list(CHECKS), choices=list(CHECKS))
    parser.add_argument("--extra", default="{}",
                        help="JSON {method: [check, ...]}: checks run beside --checks")
    parser.add_argument("--canaries", action="store_true", help="also run the canaries")
    args = parser.parse_args()
    assert jax.device_count() == DEVICES, jax.devices()
    chosen = [m for m in METHODS if args.methods is None or m.name in args.methods]
    chosen += CANARIES if args.canaries else []
    out = pathlib.Path(args.out)
    # Resumable: a rerun after an XLA abort (see ``test_multidevice.py``) skips finished methods.
    report = json.loads(out.read_text()) if out.exists() else {}
    extra_checks = json.loads(args.extra)
    for method in chosen:
        if method.name in report:
            continue
        extra = extra_checks.get(method.name, [])
        checks = list(CHECKS) if method in CANARIES else [
            c for c in CHECKS if c in args.checks or c in extra]
        report[method.name] = check_method(method, checks)
        partial = out.with_suffix(".partial")
        partial.write_text(json.dumps(report, indent=1))
        partial.replace(out)


if __name__ == "__main__":
    main()
