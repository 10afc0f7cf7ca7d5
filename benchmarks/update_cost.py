"""Update cost, compile time and state bytes of every method against ``optax.adamw``."""

from __future__ import annotations

import dataclasses
import gc
from collections.abc import Callable, Sequence

import numpy as np
import optax

from benchmarks import harness
from benchmarks.registry import Method

TIMING_LR = 1e-5  # the update's cost does not depend on it; small keeps repeated steps finite


@dataclasses.dataclass
class UpdateRow:
    tree: str
    layers: int
    rank: int
    method: str
    ratio: float  # median per-round time / adamw time on the same pair tree
    dense_ratio: float | None  # m×n-state methods: against adamw on the dense W tree
    method_ms: float
    adamw_ms: float
    compile_s: float
    adamw_compile_s: float
    state_bytes: int
    adamw_state_bytes: int
    matrix_state: bool


@dataclasses.dataclass(frozen=True)
class TreeSpec:
    name: str
    all_four: bool
    layers: int
    d: int
    matrix_layers: int  # layers for m×n-state methods, timed also against dense adamw; 0: skip
    ranks: tuple[int, ...] = ()  # overrides the run's ranks for this tree


def baseline() -> optax.GradientTransformation:
    return optax.adamw(TIMING_LR, weight_decay=0.0)


class Setting:
    """Pair tree, fixed gradients and compiled adamw baselines for ``layers`` layers."""

    def __init__(self, spec: TreeSpec, rank: int, layers: int, dense: bool):
        self.layers = layers
        self.params = harness.pair_tree(rank, all_four=spec.all_four, layers=layers, d=spec.d)
        self.grads = harness.gradients_like(self.params)
        self.adamw = harness.update_step(baseline(), self.params, self.grads)
        self.adamw_state = harness.state_bytes(baseline(), self.params)
        self.dense = None
        if dense:
            w = harness.dense_tree(all_four=spec.all_four, layers=layers, d=spec.d)
            self.dense = harness.update_step(baseline(), w, harness.gradients_like(w))


def measure_tree(
    spec: TreeSpec, rank: int, methods: Sequence[Method], rounds: int, log=print,
    on_row: Callable[[UpdateRow], None] = lambda row: None,
) -> list[UpdateRow]:
    """Rows for every method on one tree at one rank; adamw runs interleaved with each.

    ``on_row`` sees each row as soon as it is measured (the runner saves it, so that a run
    that has to be restarted resumes after the last finished method).
    """
    low_rank = Setting(spec, rank, spec.layers, dense=False)
    matrix_setting = None
    rows = []
    for method in methods:
        tx = method.make(TIMING_LR)
        matrix = harness.has_matrix_state(tx, low_rank.params)
        if matrix and not spec.matrix_layers:
            log(f"  {spec.name} r={rank} {method.name}: m×n state, skipped on this tree")
            continue
        if matrix and matrix_setting is None:
            matrix_setting = Setting(spec, rank, spec.matrix_layers, dense=True)
        setting = matrix_setting if matrix else low_rank
        step = harness.update_step(tx, setting.params, setting.grads)
        fns = {"adamw": setting.adamw, method.name: step}
        if matrix:
            fns["adamw_dense"] = setting.dense
        times = harness.interleaved_times(fns, rounds)
        adamw = setting.adamw
        row = UpdateRow(
            tree=spec.name,
            layers=setting.layers,
            rank=rank,
            method=method.name,
            ratio=harness.median_ratio(times, method.name, "adamw"),
            dense_ratio=harness.median_ratio(times, method.name, "adamw_dense") if matrix else None,
            method_ms=1e3 * float(np.median(times[method.name])),
            adamw_ms=1e3 * float(np.median(times["adamw"])),
            compile_s=step.compile_seconds,
            adamw_compile_s=adamw.compile_seconds,
            state_bytes=harness.state_bytes(tx, setting.params),
            adamw_state_bytes=setting.adamw_state,
            matrix_state=matrix,
        )
        dense_note = "" if row.dense_ratio is None else f", {row.dense_ratio:.2f}× dense"
        log(f"  {spec.name} r={rank} {method.name}: {row.ratio:.2f}× adamw{dense_note} "
            f"({row.method_ms:.1f} ms), compile {row.compile_s:.1f} s")
        rows.append(row)
        on_row(row)
        del step, fns
        gc.collect()
    return rows
