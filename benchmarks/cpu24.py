"""CPU update cost at the issue-7 shapes: every method against optax.adamw, 24 GPT-2-medium layers.

One process per (method, tree, rank) row, so that a hang (the old XLA:CPU deadlock) costs only
its row: the child compiles optax.adamw's and the method's jitted update on the same pair tree
(q,v: 48 pairs 1024×r / r×1024; all four: q,k,v, attn.c_proj, mlp.c_fc, mlp.c_proj) and times
them interleaved (``harness.interleaved_times``); the row is the median per-round ratio.

    python benchmarks/cpu24.py --ranks 4 16 64 --out rows.jsonl [--methods ...] [--all-four]

Rows whose child does not finish within ``--timeout`` seconds are written as ``hung``
(``harness.run_child``). Run from another checkout's root (``--root``) it measures that
checkout's library, which is how the before/after table was made.
"""

from __future__ import annotations

import argparse
import json
import os
import pathlib
import sys
import time

ROOT = pathlib.Path(__file__).resolve().parents[1]


def _child(method: str, rank: int, all_four: bool, rounds: int) -> dict:
    import numpy as np

    from benchmarks import harness
    from benchmarks.registry import BY_NAME
    from benchmarks.update_cost import baseline

    params = harness.pair_tree(rank, all_four=all_four)
    grads = harness.gradients_like(params)
    adamw = harness.update_step(baseline(), params, grads)
    step = harness.update_step(BY_NAME[method].make(), params, grads)
    times = harness.interleaved_times({"adamw": adamw, "method": step}, rounds)
    return {"method": method, "rank": rank, "tree": "all four" if all_four else "q,v",
            "ratio": harness.median_ratio(times, "method", "adamw"),
            "adamw_ms": float(np.median(times["adamw"]) * 1e3),
            "method_ms": float(np.median(times["method"]) * 1e3),
            "compile_s": step.compile_seconds}


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--child", action="store_true")
    parser.add_argument("--root", default=str(ROOT))
    parser.add_argument("--ranks", type=int, nargs="+", default=[4, 16, 64])
    parser.add_argument("--methods", nargs="*")
    parser.add_argument("--all-four", action="store_true")
    parser.add_argument("--rounds", type=int, default=10)
    parser.add_argument("--timeout", type=float, default=600)
    parser.add_argument("--label", default="after")
    parser.add_argument("--out", default="-")
    args = parser.parse_args()
    if args.child:
        sys.path.insert(0, args.root)
        row = _child(args.methods[0], args.ranks[0], args.all_four, args.rounds)
        # harness.run_child's protocol, written out: --root's harness may predate print_row.
        print("ROW " + json.dumps(row), flush=True)
        return
    sys.path.insert(0, str(ROOT))
    from benchmarks import harness  # this checkout's, whatever --root is

    sys.path.insert(0, args.root)
    from benchmarks.registry import METHODS

    names = args.methods or [m.name for m in METHODS]
    out = sys.stdout if args.out == "-" else open(args.out, "a")  # noqa: SIM115
    env = {**os.environ, "JAX_PLATFORMS": "cpu", "PYTHONPATH": args.root}
    tree = "all four" if args.all_four else "q,v"
    for rank in args.ranks:
        for name in names:
            cmd = [sys.executable, __file__, "--child", "--root", args.root, "--ranks", str(rank),
                   "--rounds", str(args.rounds), "--methods", name]
            if args.all_four:
                cmd.append("--all-four")
            begin = time.perf_counter()
            row = harness.run_child(cmd, args.timeout, {"method": name, "rank": rank},
                                    cwd=args.root, env=env)
            row.update(label=args.label, tree=tree, wall_s=round(time.perf_counter() - begin, 1))
            print(json.dumps(row), file=out, flush=True)

if __name__ == "__main__":
    main()
