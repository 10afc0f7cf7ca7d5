"""The library's r×r kernels against ``jnp.linalg`` (LAPACK on CPU, cuSOLVER on GPU).

Issue 12 asks that the kernels in :mod:`lowrank_optax.linalg` be at least as fast as
``jnp.linalg`` on GPU for r ≤ 64, with a platform switch if cuSOLVER wins. This script measures
that on whatever backend JAX runs on: for each kernel and rank, one jitted call of the library's
kernel and one of its ``jnp.linalg`` counterpart on the same batched float32 input (48 stacked
systems, the 24-layer q,v tree of the other benchmarks), interleaved
(``harness.interleaved_times``); the ratio is the median per-round ratio library / ``jnp.linalg``
(< 1: the library is faster). Each row also gives the largest difference between the two
results relative to the counterpart's largest entry, so a row cannot be fast by being wrong.

    python benchmarks/kernels.py --ranks 4 16 64 --out kernels.md

Each (kernel, rank) row runs in a child process: a row whose child does not finish within
``--timeout`` seconds is *hung*, with the last stage the child reached (``compiled``, then
``ours ran`` and ``jnp.linalg ran`` after one call of each, then the timed rounds). On XLA:CPU
the ``jnp.linalg`` counterpart of ``solve_sylvester_spd`` (two batched ``eigh`` custom calls in
one jitted function) deadlocks at r = 64, the hang that made the library write its own kernels
(2-core machine, jax 0.10: 9 of 9 processes that ran only that function hung in its first call;
1 of 3 children of this script hung in the timed rounds).
"""

from __future__ import annotations

import argparse
import os
import pathlib
import sys
from collections.abc import Callable
from typing import NamedTuple

import jax
import jax.numpy as jnp
import jax.scipy.linalg as jsl
import numpy as np

ROOT = pathlib.Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

from benchmarks import harness  # noqa: E402
from lowrank_optax import linalg  # noqa: E402

BATCH = 48
WIDE = 1024


class Kernel(NamedTuple):
    """A library kernel, its ``jnp.linalg`` counterpart, and the inputs of both at rank ``r``."""

    ours: Callable
    theirs: Callable
    inputs: Callable[[np.random.Generator, int], tuple[np.ndarray, ...]]


def _spd(rng: np.random.Generator, r: int) -> np.ndarray:
    """Gram matrices of ``WIDE × r`` Gaussian factors, as the methods invert."""
    x = rng.normal(size=(BATCH, WIDE, r)) / np.sqrt(WIDE)
    return np.einsum("bmr,bms->brs", x, x)


def _cho_solve(s: jax.Array, rhs: jax.Array) -> jax.Array:
    return jsl.cho_solve(jsl.cho_factor(s, lower=True), rhs)


def _eigh_sylvester(p: jax.Array, q: jax.Array, c: jax.Array) -> jax.Array:
    """``p X + X q = c`` in the eigenbases from ``jnp.linalg.eigh`` (the library's formula)."""
    lam, u = jnp.linalg.eigh(p)
    mu, v = jnp.linalg.eigh(q)
    coeffs = jnp.swapaxes(u, -1, -2) @ c @ v
    return u @ (coeffs / (lam[..., :, None] + mu[..., None, :])) @ jnp.swapaxes(v, -1, -2)


KERNELS: dict[str, Kernel] = {
    "cholesky": Kernel(linalg.cholesky, jnp.linalg.cholesky, lambda g, r: (_spd(g, r),)),
    "solve_spd (r × 1024 rhs)": Kernel(
        linalg.solve_spd, _cho_solve,
        lambda g, r: (_spd(g, r), g.normal(size=(BATCH, r, WIDE)))),
    "eigh": Kernel(linalg.eigh, jnp.linalg.eigh, lambda g, r: (_spd(g, r),)),
    "qr (1024 × r)": Kernel(linalg.qr, jnp.linalg.qr,
                            lambda g, r: (g.normal(size=(BATCH, WIDE, r)),)),
    "pinv": Kernel(linalg.pinv, jnp.linalg.pinv, lambda g, r: (g.normal(size=(BATCH, r, r)),)),
    "solve_sylvester_spd": Kernel(
        linalg.solve_sylvester_spd, _eigh_sylvester,
        lambda g, r: (_spd(g, r), _spd(g, r), g.normal(size=(BATCH, r, r)))),
}


def _difference(ours, theirs, name: str) -> float:
    """Largest difference of the results relative to the counterpart's largest entry; for
    ``eigh`` and ``qr`` (defined up to signs and, for ``eigh``, the order within clusters) of
    the invariants ``V diag(w) Vᵀ`` and ``Q R``."""
    if name == "eigh":
        ours, theirs = ((v * w[..., None, :]) @ jnp.swapaxes(v, -1, -2) for w, v in (ours, theirs))
    elif name.startswith("qr"):
        ours, theirs = (q @ r for q, r in (ours, theirs))
    ours, theirs = np.asarray(ours, np.float64), np.asarray(theirs, np.float64)
    return float(np.max(np.abs(ours - theirs)) / np.max(np.abs(theirs)))


def measure(name: str, rank: int, rounds: int) -> dict:
    """One row, in this process; prints its stages (see the module docstring)."""
    kernel = KERNELS[name]
    rng = np.random.default_rng(rank)
    args = [jnp.asarray(x, jnp.float32) for x in kernel.inputs(rng, rank)]
    ours = jax.jit(kernel.ours).lower(*args).compile()
    theirs = jax.jit(kernel.theirs).lower(*args).compile()
    harness.print_stage("compiled")
    ours_result = harness.block(ours(*args))
    harness.print_stage("ours ran")
    theirs_result = harness.block(theirs(*args))
    harness.print_stage("jnp.linalg ran")
    times = harness.interleaved_times(
        {"ours": lambda: harness.block(ours(*args)),
         "jnp.linalg": lambda: harness.block(theirs(*args))}, rounds)
    return {"kernel": name, "rank": rank,
            "ratio": harness.median_ratio(times, "ours", "jnp.linalg"),
            "ours_ms": 1e3 * float(np.median(times["ours"])),
            "theirs_ms": 1e3 * float(np.median(times["jnp.linalg"])),
            "difference": _difference(ours_result, theirs_result, name)}


def run_child(name: str, rank: int, rounds: int, timeout: float) -> dict:
    """:func:`measure` in a child process (:func:`harness.run_child`: hung past ``timeout``)."""
    cmd = [sys.executable, __file__, "--child", name, str(rank), "--rounds", str(rounds)]
    return harness.run_child(cmd, timeout, {"kernel": name, "rank": rank},
                             env={**os.environ, "PYTHONPATH": str(ROOT)})


def _cells(row: dict) -> str:
    if "hung" in row:
        return f"hung (after: {row['hung']}) | | | |"
    if "error" in row:
        return "error | | | |"
    return (f"{row['ratio']:.2f}× | {row['ours_ms']:.3f} | {row['theirs_ms']:.3f} | "
            f"{row['difference']:.1e} |")


def table(rows: list[dict], timeout: float) -> str:
    lines = [f"Backend: {jax.default_backend()} ({jax.devices()[0].device_kind}); {BATCH} "
             "stacked float32 systems; ratio = library ÷ jnp.linalg (median of interleaved "
             "rounds); difference = max |library − jnp.linalg| ÷ max |jnp.linalg|; hung: no "
             f"result within {timeout:.0f} s.", "",
             "| kernel | r | ratio | library ms | jnp.linalg ms | difference |",
             "| --- | --- | --- | --- | --- | --- |"]
    lines += [f"| {r['kernel']} | {r['rank']} | {_cells(r)}" for r in rows]
    return "\n".join(lines) + "\n"


def main(argv: list[str] | None = None) -> list[dict]:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--ranks", type=int, nargs="+", default=[4, 16, 64])
    parser.add_argument("--kernels", nargs="+", default=list(KERNELS), choices=list(KERNELS))
    parser.add_argument("--rounds", type=int, default=20)
    parser.add_argument("--timeout", type=float, default=180.0)
    parser.add_argument("--out", type=pathlib.Path, help="also write the table here (Markdown)")
    parser.add_argument("--child", nargs=2, metavar=("KERNEL", "RANK"), help=argparse.SUPPRESS)
    args = parser.parse_args(argv)
    if args.child:
        row = measure(args.child[0], int(args.child[1]), args.rounds)
        harness.print_row(row)
        return [row]
    rows = []
    for name in args.kernels:
        for rank in args.ranks:
            rows.append(run_child(name, rank, args.rounds, args.timeout))
            print(table(rows[-1:], args.timeout).splitlines()[-1], flush=True)
    text = table(rows, args.timeout)
    print(text)
    if args.out:
        args.out.write_text(text)
    return rows


if __name__ == "__main__":
    main()
