"""The GPT-2 LoRA fine-tuning example (examples/gpt2/finetune.py) on the bundled model.

A short fine-tune must learn and beat the base model on the held-out loss and the metrics, an
Orbax checkpoint must resume to exactly the losses of an uninterrupted run (and a run without
evaluation must leave a scored table alone), the recipe's schedule and the mean ± sd cells
must match hand computations, and a run on a simulated 8-device mesh (in a subprocess) must
reproduce the single-device losses.
"""

from __future__ import annotations

import importlib.util
import json
import math
import os
import shutil
import subprocess
import sys
from pathlib import Path

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from flax import nnx

EXAMPLE = Path(__file__).resolve().parents[1] / "examples" / "gpt2"


def _load_script():
    spec = importlib.util.spec_from_file_location("gpt2_finetune", EXAMPLE / "finetune.py")
    module = importlib.util.module_from_spec(spec)
    sys.modules[spec.name] = module
    spec.loader.exec_module(module)
    return module


@pytest.fixture(scope="module")
def finetune():
    return _load_script()


def test_short_finetune_learns_and_beats_the_base_model(tmp_path, user_xla_flags):
    """The script as a user runs it (a subprocess with the caller's XLA flags, without the
    suite's fast-compile ones: this run is compute-bound), read back from its ``metrics.json``."""
    args = ["--out", str(tmp_path), "--steps", "20", "--optimizers", "adamw=0.01,lora_rite=0.005",
            "--eval-size", "20", "--max-new-tokens", "40", "--no-meteor", "--seeds", "1",
            "--dev-size", "16", "--jax-cache", ""]  # fmt: skip
    proc = subprocess.run([sys.executable, str(EXAMPLE / "finetune.py"), *args],
                          env={**os.environ, "XLA_FLAGS": user_xla_flags}, capture_output=True,
                          text=True, timeout=900)  # fmt: skip
    assert proc.returncode == 0, proc.stderr[-3000:]
    base, *runs = json.loads((tmp_path / "metrics.json").read_text())["rows"]
    assert [r["name"] for r in runs] == ["adamw", "lora_rite"]
    assert base["losses"] == [] and base["metrics"][0]["BLEU"] >= 0
    ((_, base_dev),) = base["dev"][0]
    for r in runs:
        (losses,), (metrics,), (dev,) = r["losses"], r["metrics"], r["dev"]
        assert len(losses) == 20
        assert np.mean(losses[-5:]) < np.mean(losses[:5]) - 0.5, r["name"]
        assert [s for s, _ in dev] == [0, 10, 20] and dev[0][1] == base_dev
        assert dev[-1][1] < base_dev - 0.5, (r["name"], dev, base_dev)
        scores = [v for k, v in metrics.items() if k != "METEOR"]
        assert all(math.isfinite(v) for v in scores), metrics
        # the base model writes reviews, not verbalisations of the MR: 20 steps already do
        # better (the full default run reaches BLEU 30+)
        assert metrics["BLEU"] > base["metrics"][0]["BLEU"] + 2, (metrics, base["metrics"])
        assert metrics["ROUGE-L"] > base["metrics"][0]["ROUGE-L"], (metrics, base["metrics"])
    table = (tmp_path / "metrics.md").read_text()
    assert f"| base model (no fine-tuning) | - | {base_dev:.3f} |" in table
    assert "| adamw | 0.01 |" in table and "| lora_rite |" in table and "Wall time" in table
    assert (tmp_path / "loss.png").read_bytes()[:4] == b"\x89PNG"
    assert (tmp_path / "samples_lora_rite.txt").read_text().count("->") == 20


def test_resume_continues_exactly(finetune, tmp_path):
    """8 steps with a checkpoint at step 5; the step-8 checkpoint removed (a run interrupted
    after step 5); --resume then reproduces steps 6-8 and the dev losses exactly (adams keeps
    moments and a step count: a resume that lost them would diverge at step 6). A run without
    evaluation leaves a scored metrics.md alone."""
    out = tmp_path / "run"
    common = ["--out", str(out), "--optimizers", "adams", "--eval-size", "0", "--seeds", "1",
              "--dev-size", "8", "--dev-every", "3", "--steps", "8"]  # fmt: skip
    _, full = finetune.main([*common, "--save-every", "5"])
    checkpoints = out / "checkpoints" / "adams" / "seed0"
    assert sorted(p.name for p in checkpoints.iterdir()) == ["5", "8"]
    shutil.rmtree(checkpoints / "8")
    scored = "| optimizer | lr | dev loss | BLEU |\n"
    (out / "metrics.md").write_text(scored)
    _, resumed = finetune.main([*common, "--resume"])
    assert resumed.losses == full.losses and resumed.dev == full.dev
    assert [s for s, _ in full.dev[0]] == [0, 3, 6, 8]
    assert (out / "metrics.md").read_text() == scored  # no evaluation: untouched
    assert "| adams | 0.001 |" in (out / "losses.md").read_text()


def test_recipe_schedule_and_table_cells(finetune):
    """Warm-up over the first 10 % of the steps to the peak, then half a cosine to 0."""
    schedule = finetune.lr_schedule(2.0, 100)
    for step in (0, 5, 10, 32, 55, 77, 100):
        expected = 2.0 * step / 10 if step <= 10 else 1.0 + math.cos(math.pi * (step - 10) / 90)
        np.testing.assert_allclose(float(schedule(step)), expected, rtol=1e-6, atol=1e-7)
    assert finetune.mean_sd([0.9, 1.0, 1.1], 3) == "1.000 ± 0.100"  # sample sd
    assert finetune.mean_sd([1.23456], 2) == "1.23" and finetune.mean_sd([], 2) == "n/a"


@pytest.mark.parametrize(
    ("flags", "message"),
    [
        (["--steps", "0"], "argument --steps: must be ≥ 1, got 0"),
        (["--batch-size", "0"], "argument --batch-size: must be ≥ 1, got 0"),
        (["--rank", "0"], "argument --rank: must be ≥ 1, got 0"),
        (["--seeds", "0"], "argument --seeds: must be ≥ 1, got 0"),
        (["--lr-scale", "-1"], "argument --lr-scale: must be > 0.0, got -1"),
        (["--alpha", "0"], "argument --alpha: must be > 0.0, got 0"),
        (["--eval-size", "-2"], "argument --eval-size: must be ≥ -1, got -2"),
        (["--max-len", "x"], "argument --max-len: must be an integer, got 'x'"),
    ],
)
def test_out_of_range_flags_are_usage_errors(finetune, capsys, flags, message):
    """Before: --batch-size 0 and --seeds 0 ended in a ZeroDivisionError / IndexError
    traceback, --lr-scale -1 trained every optimizer with negative rates."""
    with pytest.raises(SystemExit) as exit_info:
        finetune.parse_args(flags)
    assert exit_info.value.code == 2
    assert message in capsys.readouterr().err


def test_learning_rates_in_optimizers_must_be_positive_numbers(finetune):
    assert finetune.parse_optimizers("adamw=0.5,lora_rite", 2.0) == {
        "adamw": 0.5, "lora_rite": 2.0 * finetune.OPTIMIZERS["lora_rite"].learning_rate}
    for spec, message in (("adamw=-1", "must be > 0.0, got -1"),
                          ("adamw=abc", "must be a number, got 'abc'")):
        with pytest.raises(SystemExit, match=f"--optimizers {spec}: the learning rate {message}"):
            finetune.parse_optimizers(spec, 1.0)


def test_rank_above_the_model_width_is_refused(finetune):
    args = finetune.parse_args(["--rank", "129"])
    with pytest.raises(SystemExit, match="--rank 129 is above the model width 128"):
        finetune.lora_model(args)


MESH_SCRIPT = """
import json, sys
import jax
sys.path.insert(0, {example!r})
import finetune as ft

def spec(x):
    if x.sharding.is_fully_replicated:
        return "replicated"
    parts = list(x.sharding.spec)
    while parts and parts[-1] is None:
        parts.pop()
    return str(tuple(parts))

def specs(tree):
    return [spec(x) for x in jax.tree.leaves(tree)]

out = {{}}
for mesh in ["", "4x2"]:
    # seed 2: the first 3 batches share one LM-head buffer size (one compilation per mesh)
    args = ft.parse_args(["--steps", "3", "--seed", "2", "--eval-size", "0", "--mesh", mesh,
                          "--out", {out!r} + "/" + (mesh or "single")])
    setup = ft.lora_model(args)
    data = ft.e2e.pack(ft.e2e.encode_pairs(ft.GPT2Tokenizer.load(args.checkpoint),
                       ft.e2e.read_split(args.data, "train")), args.max_len)
    init_specs = None
    for name in {names!r}:
        tx = ft.make_optimizer(name, ft.OPTIMIZERS[name].learning_rate, 8.0, args.steps)
        init_specs = specs(tx.init(setup.lora))
        run = ft.train(name, ft.OPTIMIZERS[name].learning_rate, setup, args, data, ft.PhaseTimer())
        out[f"{{name}}/{{mesh}}"] = {{
            "losses": run.losses,
            "lora_specs": specs(run.lora),
            "state_specs": specs(run.opt_state),
            "init_state_specs": init_specs,
        }}
print("RESULT" + json.dumps(out))
"""


def test_mesh_4x2_matches_single_device(tmp_path):
    names = ["lora_rite", "lora_pro_adamw"]  # r x r solves; an (m, n) state
    script = MESH_SCRIPT.format(example=str(EXAMPLE), out=str(tmp_path), names=names)
    env = {**os.environ, "JAX_PLATFORMS": "cpu",  # the suite's flags (compiling dominates)
           "XLA_FLAGS": os.environ["XLA_FLAGS"] + " --xla_force_host_platform_device_count=8"}
    proc = subprocess.run([sys.executable, "-c", script], env=env, capture_output=True,
                          text=True, timeout=600)  # fmt: skip
    assert proc.returncode == 0, proc.stderr[-3000:]
    out = json.loads(proc.stdout.split("RESULT", 1)[1])
    for name in names:
        single, mesh = out[f"{name}/"], out[f"{name}/4x2"]
        np.testing.assert_allclose(mesh["losses"], single["losses"], rtol=1e-4)
        # lora_a (2, in, r) split along in, lora_b (2, r, out) along out
        assert set(mesh["lora_specs"]) == {"(None, 'model')", "(None, None, 'model')"}
        assert mesh["state_specs"] == mesh["init_state_specs"]


def test_lora_targets_are_q_and_v_of_c_attn(finetune, tmp_path):
    args = finetune.parse_args(["--out", str(tmp_path)])
    setup = finetune.lora_model(args)
    config = setup.module(setup.lora).config
    d, r, layers = config.n_embd, args.rank, config.n_layer
    shapes = sorted(tuple(x.shape) for x in jax.tree.leaves(setup.lora))
    assert shapes == sorted([(2, d, r)] * layers + [(2, r, d)] * layers)
    model = setup.module(jax.tree.map(lambda x: x + 1.0, setup.lora))
    tokens = np.arange(12, dtype=np.int32)[None]
    # only the q and v column blocks of c_attn change when the factors do
    base = setup.module(setup.lora)
    x = base.ln_f(base.wte(tokens))
    diff = np.abs(model.h[0].attn.c_attn(x) - base.h[0].attn.c_attn(x)).max(axis=(0, 1))
    assert diff[:d].min() > 0 and diff[d : 2 * d].max() == 0 and diff[2 * d :].min() > 0


def test_solora_reads_exact_statistics_of_the_full_gradient(finetune):
    """SoLoRA's layers carry probes whose gradient is rowsum/colsum(G⊙G) of the q and v slices
    of each c_attn's full weight gradient G (checked against G from differentiating the kernel);
    the factors and the loss are those of the probe-free model (also at --rank/--alpha)."""
    assert finetune.OPTIMIZERS["solora_adamw"].grad_stats
    args = finetune.parse_args(["--rank", "2", "--alpha", "8"])
    plain, probed = finetune.lora_model(args), finetune.lora_model(args, grad_stats=True)
    layer = probed.lora["h"][0]["attn"]["c_attn"]
    assert layer["lora_a"].shape == (2, 128, 2) and set(layer["lora_stats"]) == {"row", "col"}
    np.testing.assert_array_equal(layer["lora_a"], plain.lora["h"][0]["attn"]["c_attn"]["lora_a"])

    tokenizer = finetune.GPT2Tokenizer.load(args.checkpoint)
    pairs = finetune.e2e.encode_pairs(tokenizer, finetune.e2e.read_split(args.data, "train")[:16])
    batch = next(finetune.e2e.batches(finetune.e2e.pack(pairs, 64), 4, 0))
    capacity, key = finetune.head_capacity(batch[2]), jax.random.key(0)
    batch = tuple(map(jnp.asarray, batch))
    loss, grads = finetune.loss_and_grad(probed.graphdef, probed.lora, probed.frozen, batch, key,
                                         0, capacity)
    plain_loss, plain_grads = finetune.loss_and_grad(plain.graphdef, plain.lora, plain.frozen,
                                                     batch, key, 0, capacity)
    np.testing.assert_allclose(loss, plain_loss, rtol=1e-6)
    for name in ("lora_a", "lora_b"):
        np.testing.assert_allclose(grads["h"][0]["attn"]["c_attn"][name],
                                   plain_grads["h"][0]["attn"]["c_attn"][name],
                                   rtol=1e-4, atol=1e-7)

    model = nnx.merge(plain.graphdef, plain.lora, plain.frozen)
    nnx.reseed(model, dropout=jax.random.fold_in(key, 0))
    kernel_grads = nnx.grad(finetune.target_loss, argnums=nnx.DiffState(0, nnx.Param))(
        model, batch, capacity)
    g = np.asarray(kernel_grads["h"][0]["attn"]["c_attn"]["base"]["kernel"][...], np.float64)
    d = g.shape[0]
    stats = grads["h"][0]["attn"]["c_attn"]["lora_stats"]
    for p, cols in enumerate((slice(0, d), slice(2 * d, 3 * d))):  # the q and v slices
        np.testing.assert_allclose(stats["row"][p], (g[:, cols] ** 2).sum(axis=1), rtol=1e-4,
                                   atol=1e-12)
        np.testing.assert_allclose(stats["col"][p], (g[:, cols] ** 2).sum(axis=0), rtol=1e-4,
                                   atol=1e-12)


def test_sweep_extends_the_grid_while_the_best_rate_is_at_an_edge():
    import sweep

    h = sweep.HALF_DECADE
    assert sweep.next_rate({1.0: 2.0, h: 1.5}, 5) == pytest.approx(h * h)  # best at the top
    assert sweep.next_rate({1.0: 1.0, h: 1.5}, 5) == pytest.approx(1 / h)  # best at the bottom
    assert sweep.next_rate({1.0: 1.5, h: math.inf}, 5) == pytest.approx(1 / h)  # h diverged
    assert sweep.next_rate({1.0: 2.0, h: 1.5, h * h: 1.8}, 5) is None  # interior best
    assert sweep.next_rate({1.0: 2.0, h: 1.5}, 2) is None  # --max-points reached
    assert sweep.next_rate({1.0: math.inf, h: math.inf}, 5) is None  # nothing converged
