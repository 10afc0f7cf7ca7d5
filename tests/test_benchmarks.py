"""The benchmark harness measures what it says: call order, paired ratios, state bytes, trees,
the timed update step, the convergence runs and the report's target checks. No timings."""

from __future__ import annotations

import dataclasses
import importlib.util
import json
import pathlib
import sys

import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest

from benchmarks import convergence, gpt2_bench, harness, kernels, report
from benchmarks.registry import BY_NAME

ROOT = pathlib.Path(__file__).resolve().parents[1]


def _example():
    path = ROOT / "examples" / "matrix_factorization.py"
    spec = importlib.util.spec_from_file_location("matrix_factorization_example", path)
    module = importlib.util.module_from_spec(spec)
    sys.modules[spec.name] = module
    spec.loader.exec_module(module)
    return module


def test_interleaved_times_warms_up_and_alternates_order():
    calls = []
    fns = {"base": lambda: calls.append("base"), "method": lambda: calls.append("method")}
    times = harness.interleaved_times(fns, rounds=3, warmup=1)
    assert calls == ["base", "method",  # warm-up
                     "base", "method", "method", "base", "base", "method"]
    assert {k: v.shape for k, v in times.items()} == {"base": (3,), "method": (3,)}


def test_median_ratio_pairs_rounds():
    # Ratio of medians would be 3/2 = 1.5; the paired per-round ratios are 1, 1, 10.
    times = {"adamw": np.array([1.0, 2.0, 0.3]), "m": np.array([1.0, 2.0, 3.0])}
    assert harness.median_ratio(times, "m", "adamw") == pytest.approx(1.0)


@pytest.mark.parametrize("all_four", [False, True])
def test_pair_and_dense_trees_have_gpt2_layouts(all_four):
    pairs = harness.pair_tree(3, all_four=all_four, layers=2, d=8)
    dense = harness.dense_tree(all_four=all_four, layers=2, d=8)
    expected = ({"attn": {"c_attn": (2, 8, 8)}} if not all_four else
                {"attn": {"c_attn": (3, 8, 8), "c_proj": (1, 8, 8)},
                 "mlp": {"c_fc": (1, 8, 32), "c_proj": (1, 32, 8)}})
    assert sorted(pairs) == sorted(dense) == ["h_0", "h_1"]
    for layer in ("h_0", "h_1"):
        for block, projections in expected.items():
            for name, (p, m, n) in projections.items():
                assert pairs[layer][block][name]["lora_a"].shape == (p, m, 3)
                assert pairs[layer][block][name]["lora_b"].shape == (p, 3, n)
                assert dense[layer][block][name]["kernel"].shape == (p, m, n)


def test_state_bytes_match_a_hand_count():
    params = harness.pair_tree(3, all_four=False, layers=2, d=8)  # 2 layers × (2, 8, 3) + (2, 3, 8)
    factor_floats = 2 * (2 * 8 * 3 + 2 * 3 * 8)
    count = 4  # one int32 step counter
    assert harness.state_bytes(optax.adamw(1e-3), params) == 2 * 4 * factor_floats + count
    assert harness.state_bytes(BY_NAME["scaled_sgd"].make(), params) == 0
    lora_pro = BY_NAME["lora_pro_adamw"].make()
    assert harness.state_bytes(lora_pro, params) == 2 * 4 * (2 * 2 * 8 * 8) + count
    assert harness.has_matrix_state(lora_pro, params)
    assert not harness.has_matrix_state(BY_NAME["lora_pro_adamw_factor"].make(), params)
    assert not harness.has_matrix_state(optax.adamw(1e-3), params)


def test_update_step_applies_the_update_and_feeds_state_back():
    params = harness.pair_tree(2, all_four=False, layers=1, d=8)
    grads = harness.gradients_like(params, scale=1.0)
    tx = BY_NAME["scaled_adamw"].make(1e-2)
    step = harness.update_step(tx, params, grads)
    step()
    step()
    expected, state = params, tx.init(params)
    for _ in range(2):
        updates, state = tx.update(grads, state, expected)
        expected = optax.apply_updates(expected, updates)
    for got, want in zip(jax.tree.leaves(step.params), jax.tree.leaves(expected)):
        np.testing.assert_allclose(got, want, rtol=1e-5, atol=1e-7)
    assert step.compile_seconds > 0


@pytest.mark.parametrize(
    "script, timeout, expected",
    [("import json; print('ROW ' + json.dumps({'x': 1}))", 30, {"x": 1}),
     ("import time; print('STAGE a'); print('STAGE b', flush=True); time.sleep(30)", 2,
      {"id": 0, "hung": "b"}),
     ("import time; time.sleep(30)", 2, {"id": 0, "hung": "compiling"})],
    ids=["row", "hung-after-stage", "hung-silent"],
)
def test_run_child_returns_the_row_or_the_last_stage_of_a_hung_child(script, timeout, expected):
    assert harness.run_child([sys.executable, "-c", script], timeout, {"id": 0}) == expected


def test_run_child_reports_the_error_of_a_child_without_a_row():
    row = harness.run_child([sys.executable, "-c", "raise SystemExit('broken: 7')"], 30, {"id": 0})
    assert row == {"id": 0, "error": "broken: 7\n"}


def test_factorisation_curves_match_the_example():
    example = _example()
    y = example.target(100)
    want = example.relative_errors(optax.sgd(0.5), y, 40)
    got = convergence.error_curves(optax.sgd, convergence.FACTORISATION, np.array([0.5]),
                                   y[None], 40)
    np.testing.assert_allclose(got[0, 0], want, rtol=2e-4)


def test_sensing_loss_is_the_mean_squared_measurement_residual():
    problem = convergence.Problem("sensing", 4, 3, 1, 5)
    ops = problem.operator()
    y = jnp.asarray(convergence.low_rank_target(10, 4, 3, 1))
    p = {"lora_a": jnp.ones((4, 1)), "lora_b": jnp.full((1, 3), 0.5)}
    residual = np.asarray(ops) @ (0.5 * np.ones(12)) - np.asarray(ops) @ np.asarray(y).ravel()
    assert float(problem.loss(ops, y)(p)) == pytest.approx(0.5 * np.mean(residual**2), rel=1e-5)


def test_first_below_counts_steps_from_one_and_ignores_nan():
    assert convergence.first_below(np.array([1.0, 1e-2, 5e-4, 1e-5])) == 3
    assert convergence.first_below(np.array([1.0, np.nan, 1e-2])) is None


def test_lr_window_is_relative_to_the_best_run():
    rows = [gpt2_bench.SweepRow("a", [1e-3, 1e-2, 1e-1], [2.0, 1.5, float("nan")]),
            gpt2_bench.SweepRow("b", [1e-3, 1e-2, 1e-1], [1.58, 1.65, 1.55])]
    assert gpt2_bench.lr_window(rows, 0.1) == {"a": [1e-2], "b": [1e-3, 1e-1]}


def test_report_checks_targets(tmp_path):
    def row(method, ratio, dense=None):
        return {"tree": "q,v", "layers": 2, "rank": 4, "method": method, "ratio": ratio,
                "dense_ratio": dense, "method_ms": 1.0, "adamw_ms": 1.0, "compile_s": 1.0,
                "adamw_compile_s": 1.0, "state_bytes": 8, "adamw_state_bytes": 8,
                "matrix_state": dense is not None}

    raw = {"environment": report.environment(quick=True),
           "update": [row("fast", 1.2), row("slow", 1.4), row("dense", 9.0, dense=1.1)]}
    report.write(raw, tmp_path)
    text = (tmp_path / "results.md").read_text()
    assert "not reached in 1 of 2 measured cases: slow (q,v, r=4: 1.40×)" in text
    assert "m×n-state methods ≤ 1.3× dense adamw: reached everywhere" in text
    assert (tmp_path / "update_cost.png").stat().st_size > 0


def test_update_section_past_its_deadline_measures_nothing_and_lists_every_row(tmp_path):
    from benchmarks import run
    from benchmarks.update_cost import TreeSpec

    cfg = dataclasses.replace(run.QUICK, trees=(TreeSpec("q,v", False, layers=1, d=16,
                                                         matrix_layers=1),),
                              ranks=(2, 4), methods=("scaled_sgd", "lora_rite"))
    assert not run.past(None) and run.past(0.0)
    rows = run.run_update(cfg, tmp_path, stop_at=0.0)
    assert rows == []
    raw = json.loads((tmp_path / "results.json").read_text())
    assert [(u["rank"], u["method"]) for u in raw["update_unmeasured"]] == [
        (2, "scaled_sgd"), (2, "lora_rite"), (4, "scaled_sgd"), (4, "lora_rite")]
    raw.update(update=rows, environment=report.environment(quick=True))
    report.write(raw, tmp_path)
    assert "*Not measured*" in (tmp_path / "results.md").read_text()


def test_gpu_config_has_the_issue_shapes():
    from benchmarks import run

    assert {t.layers for t in run.GPU.trees} == {24} and set(run.GPU.ranks) == {4, 16, 64}
    assert run.GPU.gpt2_preset == "medium" and run.GPU.peer_layers == 24


def test_kernel_rows_agree_with_jnp_linalg_and_a_child_past_its_timeout_is_hung(tmp_path):
    out = tmp_path / "kernels.md"
    rows = kernels.main(["--ranks", "4", "--rounds", "2", "--kernels", "cholesky", "eigh",
                         "--out", str(out)])
    assert [(r["kernel"], r["rank"]) for r in rows] == [("cholesky", 4), ("eigh", 4)]
    for row in rows:
        assert row["difference"] < 1e-5 and row["ratio"] > 0, row
    assert "| eigh | 4 |" in out.read_text()
    hung = kernels.run_child("cholesky", 4, rounds=2, timeout=0.2)
    assert hung == {"kernel": "cholesky", "rank": 4, "hung": "compiling"}
    assert "hung (after: compiling)" in kernels.table([hung], 0.2)
