"""``results.md`` and the PNG plots from the raw numbers of ``results.json``."""

from __future__ import annotations

import datetime
import os
import pathlib
import platform

import numpy as np

UPDATE_TARGET, TRAIN_TARGET = 1.3, 1.05

METHOD_NOTE = """\
All timings are wall-clock on this machine's CPU, which other jobs may share. To keep the numbers
meaningful under load, every ratio is measured **interleaved in one process**: each round calls
optax.adamw and the method back to back (order alternating between rounds); the ratio is the
**median over ≥ 20 rounds of the per-round ratio**, after 2 warm-up rounds. Absolute
milliseconds are medians too, and are noisy; trust the ratios.

* *Update cost*: one jitted call of `tx.update` + `optax.apply_updates` with donated params and
  state (fed back, as in a training loop) and fixed random gradients, on pair trees with
  GPT-2-medium layer shapes (d = 1024), **{layers} layers**. *q,v*: the q and v slices of
  `attn.c_attn`, stacked as `lowrank_optax.flax` stores them, `lora_a (2, 1024, r)`,
  `lora_b (2, r, 1024)` per layer. *all four*: `c_attn` q,k,v `(3, 1024, r)/(3, r, 1024)`,
  `attn.c_proj` 1024→1024, `mlp.c_fc` 1024→4096, `mlp.c_proj` 4096→1024. Methods that keep an
  m×n array in their state are also timed against optax.adamw on the dense weights
  `W (2, 1024, 1024)` per layer of the q,v tree, in the same loop; on the all-four tree they are
  not run.{depth_note}
* *Hangs*: before issue 12, jitted updates over many stacked pairs could deadlock XLA:CPU
  (jaxlib 0.10) in the batched LAPACK kernels `jnp.linalg` lowered to; the library's r×r
  kernels are plain JAX since then. `run.py` still runs each section in a child process that
  saves update rows one by one and, if a child stops making progress, restarts it after the
  last finished method and skips the one that hung (listed below the tables as *hung*).
* *Compile time*: wall seconds of `jax.jit(step).lower(...).compile()`.
* *State bytes*: `tx.init` from shapes (`jax.eval_shape`), against optax.adamw on the same tree.
"""

SHALLOW_NOTE = """ At 2 layers (the CPU configuration, to keep the full run within
  ~30 minutes on 2 cores; `benchmarks/cpu24.py` times the 24-layer trees) adamw's update takes
  well under a millisecond, so fixed per-call costs (dispatch, the many small r×r kernels)
  weigh more than at 24 layers."""


def method_note(raw: dict) -> str:
    layers = max((r["layers"] for r in raw.get("update") or []), default=0)
    return METHOD_NOTE.format(layers=layers or "–", depth_note=SHALLOW_NOTE if layers < 24 else "")


def environment(quick: bool) -> dict:
    import flax
    import jax
    import optax

    cpu = platform.processor()
    cpuinfo = pathlib.Path("/proc/cpuinfo")
    if cpuinfo.exists():
        names = [ln.split(":", 1)[1].strip() for ln in cpuinfo.read_text().splitlines()
                 if ln.startswith("model name")]
        cpu = names[0] if names else cpu
    return {
        "date": datetime.datetime.now(datetime.timezone.utc).strftime("%Y-%m-%d %H:%M UTC"),
        "cpu": cpu, "cores": os.cpu_count(), "platform": platform.platform(),
        "python": platform.python_version(), "jax": jax.__version__, "optax": optax.__version__,
        "flax": flax.__version__, "backend": jax.default_backend(),
        "device": jax.devices()[0].device_kind,
        "load_average": os.getloadavg()[0], "quick": quick,
    }


def _x(value: float | None) -> str:
    return "–" if value is None else f"{value:.2f}×"


def _table(header: list[str], rows: list[list[str]]) -> str:
    lines = ["| " + " | ".join(header) + " |", "|" + "---|" * len(header)]
    return "\n".join(lines + ["| " + " | ".join(r) + " |" for r in rows])


def _methods(rows: list[dict]) -> list[str]:
    return list(dict.fromkeys(r["method"] for r in rows))


def update_tables(rows: list[dict], hung: list[dict]) -> str:
    out = []
    for tree in dict.fromkeys(r["tree"] for r in rows):
        sub = [r for r in rows if r["tree"] == tree]
        ranks = sorted({r["rank"] for r in sub})
        adamw_ms = {k: np.median([r["adamw_ms"] for r in sub if r["rank"] == k
                                  and not r["matrix_state"]]) for k in ranks}
        body = []
        for method in _methods(sub):
            cells = []
            for k in ranks:
                hit = [r for r in sub if r["method"] == method and r["rank"] == k]
                if not hit:
                    stuck = any(h["tree"] == tree and h["rank"] == k and h["method"] == method
                                for h in hung)
                    cells.append("hung" if stuck else "–")
                    continue
                r = hit[0]
                dense = f" (dense {_x(r['dense_ratio'])})" if r["matrix_state"] else ""
                cells.append(_x(r["ratio"]) + dense)
            matrix = [r for r in sub if r["method"] == method and r["matrix_state"]]
            kind = f"m×n ({matrix[0]['layers']} layers)" if matrix else "(m+n)r"
            body.append([method, kind, *cells])
        header = ["method", "state", *(f"r = {k} (adamw {adamw_ms[k]:.1f} ms)" for k in ranks)]
        out.append(f"**{tree} tree** — update time ÷ optax.adamw update time on the same pairs "
                   "(m×n-state methods also ÷ adamw on the dense W):\n\n" + _table(header, body))
    return "\n\n".join(out)


def compile_state_table(rows: list[dict]) -> str:
    body = []
    tree = rows[0]["tree"]
    sub = [r for r in rows if r["tree"] == tree]
    ranks = sorted({r["rank"] for r in sub})
    for method in _methods(sub):
        by_rank = {r["rank"]: r for r in sub if r["method"] == method}
        cells = [f"{np.median([r['compile_s'] for r in by_rank.values()]):.1f}"]
        cells += [_x(by_rank[k]["state_bytes"] / by_rank[k]["adamw_state_bytes"])
                  if k in by_rank else "–" for k in ranks]
        mib = by_rank[ranks[-1]]["state_bytes"] / 2**20 if ranks[-1] in by_rank else None
        cells.append("–" if mib is None else f"{mib:.1f}")
        body.append([method, *cells])
    adamw_compile = np.median([r["adamw_compile_s"] for r in sub])
    header = ["method", "compile s (median over r)",
              *(f"state ÷ adamw, r = {k}" for k in ranks), f"state MiB, r = {ranks[-1]}"]
    return (f"{tree} tree; optax.adamw compiles in {adamw_compile:.1f} s.\n\n"
            + _table(header, body))


def train_table(train: dict) -> str:
    body = [[r["method"], f"{r['method_ms']:.0f}", _x(r["ratio"]),
             "yes" if r["ratio"] <= TRAIN_TARGET else "no", f"{r['compile_s']:.1f}"]
            for r in train["steps"]]
    return _table(["method", "step ms (median)", "step ÷ adamw", f"≤ {TRAIN_TARGET}×",
                   "compile s"], body)


def sweep_table(train: dict) -> str:
    rates = train["sweep"][0]["learning_rates"]
    body = []
    for r in train["sweep"]:
        window = train["window"][r["method"]]
        span = f"{min(window):g} … {max(window):g} ({len(window)})" if window else "none"
        body.append([r["method"], *(f"{f:.3f}" for f in r["final_losses"]), span])
    return _table(["method", *(f"lr {x:g}" for x in rates), "window (rates that train)"], body)


def convergence_table(conv: dict) -> str:
    out = []
    for problem in dict.fromkeys(r["problem"] for r in conv["rows"]):
        body = []
        for r in (r for r in conv["rows"] if r["problem"] == problem):
            cells = []
            for k, steps in r["steps"].items():
                lr = r["learning_rates"][k]
                cells.append(f"{steps} (lr {lr:.3g})" if steps else f">{conv['cap']}")
            body.append([r["method"], *cells])
        kappas = list(conv["rows"][0]["steps"])
        out.append(f"**{problem}**\n\n" + _table(["method", *(f"κ = {k}" for k in kappas)],
                                                   body))
    return "\n\n".join(out)


def peers_table(peers: dict) -> str:
    if not peers.get("rows"):
        return ("Not run: `torch`, `peft` and `pytorch_optimizer` did not import (install the "
                "`bench-peers` extra).")
    versions = ", ".join(f"{k} {v}" for k, v in peers["versions"].items())
    body = [[str(r["rank"]), r["peer"], r["ours"], f"{r['peer_ms']:.1f}", f"{r['ours_ms']:.1f}",
             _x(r["ratio"])] for r in peers["rows"]]
    where = ("CUDA torch on the same GPU" if peers.get("device") == "cuda"
             else "CPU torch, one thread")
    return (f"Packages: {versions} ({where}).\n\n"
            + _table(["r", "PyTorch reference", "ours", "peer ms", "ours ms", "ours ÷ peer"],
                     body))


def targets(raw: dict) -> str:
    lines = []
    if raw.get("update"):
        rows = raw["update"]
        lowrank = [r for r in rows if not r["matrix_state"]]
        over = sorted({f"{r['method']} ({r['tree']}, r={r['rank']}: {r['ratio']:.2f}×)"
                       for r in lowrank if r["ratio"] > UPDATE_TARGET})
        lines.append(f"* (m+n)r-state methods ≤ {UPDATE_TARGET}× adamw update time: "
                     + ("reached everywhere" if not over else
                        f"not reached in {len(over)} of {len(lowrank)} measured cases: "
                        + "; ".join(over)))
        dense = [r for r in rows if r["matrix_state"]]
        over = sorted({f"{r['method']} (r={r['rank']}: {r['dense_ratio']:.2f}×)"
                       for r in dense if r["dense_ratio"] > UPDATE_TARGET})
        lines.append(f"* m×n-state methods ≤ {UPDATE_TARGET}× dense adamw: "
                     + ("reached everywhere" if not over else
                        f"not reached in {len(over)} of {len(dense)} measured cases: "
                        + "; ".join(over)))
    if "train" in raw:
        steps = [r for r in raw["train"]["steps"] if r["method"] != "adamw"]
        over = [f"{r['method']} ({r['ratio']:.3f}×)" for r in steps if r["ratio"] > TRAIN_TARGET]
        lines.append(f"* train step ≤ {TRAIN_TARGET}× adamw: "
                     + ("reached for every method timed" if not over else
                        "reached except " + "; ".join(over)))
    if raw.get("peers", {}).get("rows"):
        slower = [f"{r['peer']} r={r['rank']} ({r['ratio']:.2f}×)" for r in raw["peers"]["rows"]
                  if r["ratio"] >= 1.0]
        lines.append("* faster than every PyTorch peer: "
                     + ("reached" if not slower else "not reached for " + "; ".join(slower)))
    return "\n".join(lines)


def on_gpu(env: dict) -> bool:
    return env.get("backend") == "gpu"


def environment_text(env: dict) -> str:
    run = "quick smoke run (`--quick`): small trees, few methods and repeats" if env["quick"] \
        else "full run"
    versions = (f"Python {env['python']}, jax {env['jax']} ({env['backend']}), optax "
                f"{env['optax']}, flax {env['flax']}.")
    if on_gpu(env):
        return (f"{env['date']}; {run} (`--config gpu`). GPU: {env['device']} (one device); "
                f"host CPU {env['cpu']} ({env['cores']} cores), {env['platform']}. {versions}")
    return (f"{env['date']}; {run}. CPU: {env['cpu']} ({env['cores']} cores, shared; load "
            f"average {env['load_average']:.1f} at start), {env['platform']}. {versions} "
            "No GPU was available to this run: GPU numbers are in `benchmarks/gpu/` when a run "
            "there recorded them.")


def write(raw: dict, out: pathlib.Path) -> None:
    parts = ["# Benchmarks: lowrank_optax against optax.adamw", "",
             "Generated by `python benchmarks/run.py`; raw numbers in `results.json`.", "",
             "## Environment", "", environment_text(raw["environment"]), "",
             *([raw["provenance"], ""] if raw.get("provenance") else []),
             "## How it is measured", "",
             GPU_METHOD_NOTE if on_gpu(raw["environment"]) else method_note(raw)]
    if raw.get("update"):
        hung = raw.get("update_hung") or []
        hung_note = ("*hung*: stopped by the XLA:CPU deadlock above (no progress for 50 s; 120 s "
                     "for the all-four tree's rows of 2026-11-30) "
                     "while measuring, and its restart skipped: " + "; ".join(
            f"{h['method']} ({h['tree']}, r = {h['rank']})" for h in hung)) if hung else ""
        parts += ["## Update cost", "", update_tables(raw["update"], hung), "", hung_note, "",
                  "![update cost](update_cost.png)", "",
                  "## Compile time and optimizer state", "", compile_state_table(raw["update"]),
                  ""]
    unmeasured = raw.get("update_unmeasured") or []
    if unmeasured:
        parts += ["*Not measured* (the run's `--minutes` budget ran out first): " + "; ".join(
            f"{u['method']} ({u['tree']}, r = {u['rank']})" for u in unmeasured), ""]
    if "train" in raw:
        note = (TRAIN_NOTE_PRESET.format(preset=raw["train"]["preset"])
                if raw["train"].get("preset") else TRAIN_NOTE)
        parts += ["## GPT-2 train step (forward + backward + update)", "",
                  note, "", train_table(raw["train"]), ""]
    if raw.get("train", {}).get("sweep"):
        parts += ["## Learning-rate sweep on the GPT-2 example", "",
                  SWEEP_NOTE.format(steps=raw["train"]["sweep_steps"],
                                    tol=raw["train"]["tolerance"]), "",
                  sweep_table(raw["train"]), "", "![lr sweep](lr_sweep.png)", ""]
    if "convergence" in raw:
        parts += ["## Convergence: steps to relative error ≤ 1e-3", "",
                  CONVERGENCE_NOTE.format(cap=raw["convergence"]["cap"],
                                          factors=raw["convergence"]["lr_factors"]), "",
                  convergence_table(raw["convergence"]), "",
                  "![convergence](convergence.png)", ""]
    if "peers" in raw:
        note = PEERS_NOTE.format(layers=raw["peers"].get("layers", 2))
        parts += ["## PyTorch peers", "", note, "", peers_table(raw["peers"]), ""]
    parts += ["## Targets of issue 7", "", targets(raw), ""]
    (out / "results.md").write_text("\n".join(parts))
    plot(raw, out)


TRAIN_NOTE = """\
The bundled GPT-2 example (`examples/gpt2/checkpoint`: 4 layers, d = 128, 50 257-token head),
LoRA r = 4, alpha = 32 on the q and v slices of every `c_attn`, batch 8 × 128 tokens, dropout on,
as in `examples/gpt2/finetune.py`. One jitted step (forward, backward, update, apply; donated
state) per call, all methods and adamw interleaved in one loop, ≥ 20 rounds. The step is
dominated by the model (chiefly the LM head), so these ratios bound the update's share of a small
model's step; one method per family is timed (the step costs ~0.4 s on the shared CPU)."""

TRAIN_NOTE_PRESET = """\
A randomly initialised GPT-2 `{preset}` (`GPT2Config.preset`; the step's cost does not depend on
the weights) with the example's setting: LoRA r = 4, alpha = 32 on the q and v slices of every
`c_attn`, batch 8 × 128 tokens of the bundled E2E data, dropout on. One jitted step (forward,
backward, update, apply; donated state) per call, all methods and adamw interleaved in one loop."""

GPU_METHOD_NOTE = """\
Every ratio is measured **interleaved in one process**: each round calls optax.adamw and the
method back to back (order alternating between rounds), each call blocking until its results are
ready; the ratio is the **median over the rounds of the per-round ratio**, after 2 warm-up rounds.

* *Update cost*: one jitted call of `tx.update` + `optax.apply_updates` with donated params and
  state (fed back, as in a training loop) and fixed random gradients, on pair trees of
  GPT-2 medium: **24 layers**, d = 1024. *q,v*: the q and v slices of `attn.c_attn`, stacked as
  `lowrank_optax.flax` stores them, `lora_a (2, 1024, r)`, `lora_b (2, r, 1024)` per layer.
  *all four*: `c_attn` q,k,v `(3, 1024, r)/(3, r, 1024)`, `attn.c_proj` 1024→1024, `mlp.c_fc`
  1024→4096, `mlp.c_proj` 4096→1024. Methods that keep an m×n array in their state are also
  timed against optax.adamw on the dense weights the pairs adapt, in the same loop.
* *Compile time*: wall seconds of `jax.jit(step).lower(...).compile()`.
* *State bytes*: `tx.init` from shapes (`jax.eval_shape`), against optax.adamw on the same tree.
"""

SWEEP_NOTE = """\
From the same fresh LoRA factors and the same batches, each method trains {steps} steps per rate
(linear warm-up over the first quarter) and reports the mean train loss of its last 5 steps.
This is a short-horizon sweep, kept small so it runs on the shared CPU in minutes (~0.4 s a
step): it shows which rates are stable and make early progress, not final quality. A rate
*trains* when its final loss is within {tol} nats of the best final loss of all methods and
rates (the initial loss is ≈ 4.73; {tol} nats is about a third of what the best run gains in
these steps); the window lists those rates (count in brackets)."""

CONVERGENCE_NOTE = """\
Factorisation: `a b ≈ Y`, rank-5 60×40 target with singular values `geomspace(1, 1/κ)`, from the
LoRA init (random a, zero b), as `examples/matrix_factorization.py`. Sensing: a rank-3 20×15
target seen through 300 Gaussian measurements, loss `1/(2N) Σ (⟨A_i, ab⟩ − y_i)²`. Every
method runs at its registry learning rate (tests/methods.py) times {factors}; the table gives
the fewest steps over those rates (and the rate), `>{cap}` when none reaches 1e-3 within the
cap. adamw's base rate is 0.03."""

PEERS_NOTE = """\
Same shapes as the q,v tree ({layers} layers × 2 pairs, 1024 × r and r × 1024): PEFT LoRA on a torch
module with separate `q`, `v` `nn.Linear(1024, 1024)` per block, fixed random gradients; one
peer call is `optimizer.step()` (`torch.set_num_threads(1)`: the tensors are small and idle
OpenMP workers spin on a shared CPU), one of ours the jitted update + apply. Interleaved as above;
*ours ÷ peer* below 1 means ours is faster. Installed with the `bench-peers` extra:
`pip install torch==2.13.0` (the CPU wheel) then `pip install peft pytorch_optimizer`
(PEFT also needs `transformers` and `accelerate`)."""


def plot(raw: dict, out: pathlib.Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    if raw.get("update"):
        trees = list(dict.fromkeys(r["tree"] for r in raw["update"]))
        fig, axes = plt.subplots(len(trees), 1, figsize=(12, 4.5 * len(trees)), squeeze=False)
        for ax, tree in zip(axes[:, 0], trees):
            sub = [r for r in raw["update"] if r["tree"] == tree]
            methods, ranks = _methods(sub), sorted({r["rank"] for r in sub})
            width = 0.8 / len(ranks)
            for i, k in enumerate(ranks):
                values = [next((r["ratio"] for r in sub if r["method"] == m and r["rank"] == k),
                               np.nan) for m in methods]
                ax.bar(np.arange(len(methods)) + i * width, values, width, label=f"r = {k}")
            ax.axhline(UPDATE_TARGET, color="red", linestyle=":", label=f"{UPDATE_TARGET}× target")
            ax.axhline(1.0, color="gray", linewidth=0.8)
            ax.set_xticks(np.arange(len(methods)) + 0.4 - width / 2, methods, rotation=45,
                          ha="right")
            ax.set(yscale="log", ylabel="update time ÷ optax.adamw", title=f"{tree} tree")
            ax.legend()
        fig.tight_layout()
        fig.savefig(out / "update_cost.png", dpi=100)
        plt.close(fig)
    if "convergence" in raw:
        rows = raw["convergence"]["rows"]
        problems = list(dict.fromkeys(r["problem"] for r in rows))
        kappas = list(rows[0]["steps"])
        fig, axes = plt.subplots(len(problems), len(kappas), figsize=(5 * len(kappas),
                                 4 * len(problems)), squeeze=False, sharey=True)
        for i, problem in enumerate(problems):
            for j, k in enumerate(kappas):
                ax = axes[i, j]
                for r in (r for r in rows if r["problem"] == problem):
                    curve = np.asarray(r["curves"][k])
                    stride = max(1, raw["convergence"]["cap"] // 300)
                    ax.semilogy(1 + stride * np.arange(curve.size), curve, label=r["method"],
                                linewidth=1)
                ax.axhline(1e-3, color="gray", linestyle=":")
                ax.set(title=f"{problem}, κ = {k}", xlabel="step", xscale="log", ylim=(1e-4, 3))
        axes[0, 0].set_ylabel("relative error (best lr)")
        axes[0, -1].legend(fontsize=6, ncol=2)
        fig.tight_layout()
        fig.savefig(out / "convergence.png", dpi=100)
        plt.close(fig)
    if raw.get("train", {}).get("sweep"):
        fig, ax = plt.subplots(figsize=(7, 4.5))
        for r in raw["train"]["sweep"]:
            ax.plot(r["learning_rates"], r["final_losses"], marker="o", label=r["method"])
        best = np.nanmin([f for r in raw["train"]["sweep"] for f in r["final_losses"]])
        ax.axhline(best + raw["train"]["tolerance"], color="gray", linestyle=":",
                   label="best + tolerance")
        ax.set(xscale="log", xlabel="learning rate", ylabel="final train loss",
               title=f"GPT-2 example, {raw['train']['sweep_steps']} steps")
        ax.legend(fontsize=7)
        fig.tight_layout()
        fig.savefig(out / "lr_sweep.png", dpi=100)
        plt.close(fig)
