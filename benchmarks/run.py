"""Benchmarks of every lowrank_optax method against optax.adamw; writes results.md and PNG plots.

    python benchmarks/run.py                 # full CPU run (2 layers; 30–40 min on 2 cores)
    python benchmarks/run.py --quick         # smoke run: small trees, few methods and repeats
    python benchmarks/run.py --config gpu --out benchmarks/gpu   # GPU: 24-layer GPT-2-medium

Sections (``--sections``, default all): ``update`` (update cost, compile time, state bytes),
``train`` (GPT-2 train-step overhead and learning-rate sweep), ``convergence`` (ill-conditioned
factorisation and sensing), ``peers`` (PyTorch references, when the ``bench-peers`` packages
import). Raw numbers go to ``results.json``; ``results.md`` and the plots are rebuilt from it, so
sections can be rerun one at a time.
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import os
import pathlib
import subprocess
import sys
import time

# NumPy's OpenBLAS (the convergence problems' QR) busy-waits in idle worker
# threads, which on a shared CPU steals the cores the timed updates run on.
os.environ.setdefault("OPENBLAS_NUM_THREADS", "1")
ROOT = pathlib.Path(__file__).resolve().parents[1]
if str(ROOT) not in sys.path:
    sys.path.insert(0, str(ROOT))

import optax  # noqa: E402

from benchmarks import convergence, gpt2_bench, peers, report  # noqa: E402
from benchmarks.registry import BY_NAME, METHODS  # noqa: E402
from benchmarks.update_cost import TreeSpec, measure_tree  # noqa: E402

SECTIONS = ("update", "train", "convergence", "peers")
# One method per family (plus LoRA-Pro's factor-state variant) for the GPT-2 runs, whose step is
# dominated by the model and costs ~1 s on the shared CPU.
GPT2_METHODS = ("scaled_sgd", "scaled_adamw", "loraplus_adamw", "adams", "lracs", "altlora",
                "lora_pro_adamw", "lora_pro_adamw_factor", "lora_rite", "solora_adamw_factor")
QUICK_METHODS = ("scaled_adamw", "lora_pro_adamw", "lora_rite")
# GPT-2 medium compiles in tens of seconds per method: one per (m+n)r-state family on the GPU.
GPU_GPT2_METHODS = ("scaled_adamw", "lora_rite")
SWEEP_RATES = (1e-4, 4.2e-4, 1.7e-3, 7.4e-3, 3e-2)  # geomspace(1e-4, 3e-2, 5), rounded
LR_TOLERANCE = 0.5  # nats: a rate "trains" when its final loss is within this of the best run


@dataclasses.dataclass(frozen=True)
class Config:
    trees: tuple[TreeSpec, ...]
    ranks: tuple[int, ...]
    rounds: int
    methods: tuple[str, ...]
    gpt2_methods: tuple[str, ...]
    train_rounds: int
    sweep_rates: tuple[float, ...]
    sweep_steps: int
    convergence_steps: int
    peer_ranks: tuple[int, ...]
    peer_layers: int
    gpt2_preset: str | None = None  # train step on a random GPT-2 of this preset (None: bundled)


# CPU: 2 layers of GPT-2-medium shapes (the 24-layer CPU update-cost rows: benchmarks/cpu24.py);
# --config gpu has the 24-layer trees.
FULL = Config(
    trees=(TreeSpec("q,v", all_four=False, layers=2, d=1024, matrix_layers=2),
           TreeSpec("all four", all_four=True, layers=2, d=1024, matrix_layers=0, ranks=(16,))),
    ranks=(4, 16, 64), rounds=20, methods=tuple(m.name for m in METHODS),
    gpt2_methods=GPT2_METHODS, train_rounds=20, sweep_rates=SWEEP_RATES, sweep_steps=8,
    convergence_steps=2000, peer_ranks=(4, 16, 64), peer_layers=2,
)
GPU = Config(  # the GPT-2-medium shapes: 24 layers; no sweep or convergence (not timings)
    trees=(TreeSpec("q,v", all_four=False, layers=24, d=1024, matrix_layers=24),
           TreeSpec("all four", all_four=True, layers=24, d=1024, matrix_layers=24, ranks=(16,))),
    ranks=(16, 4, 64), rounds=30, methods=tuple(m.name for m in METHODS),
    gpt2_methods=GPU_GPT2_METHODS, train_rounds=20, sweep_rates=(), sweep_steps=0,
    convergence_steps=2000, peer_ranks=(16, 4, 64), peer_layers=24, gpt2_preset="medium",
)
CONFIGS = {"full": FULL, "gpu": GPU}
QUICK = Config(
    trees=(TreeSpec("q,v", all_four=False, layers=2, d=1024, matrix_layers=2),),
    ranks=(4,), rounds=5, methods=QUICK_METHODS, gpt2_methods=QUICK_METHODS[:1],
    train_rounds=3, sweep_rates=(1e-3, 1e-2), sweep_steps=4, convergence_steps=300,
    peer_ranks=(4,), peer_layers=2,
)


def log(message: str) -> None:
    print(message, flush=True)


def past(stop_at: float | None) -> bool:
    """Whether the run's deadline (``--minutes``) has passed."""
    return stop_at is not None and time.time() > stop_at


def run_update(cfg: Config, out: pathlib.Path, stop_at: float | None = None) -> list[dict]:
    """All (tree, rank, method) rows, saved one by one in ``update_partial``.

    A restarted child keeps the saved rows, and skips (records in ``update_hung``) the method
    that was being measured when its predecessor was stopped. Past ``stop_at`` no new row is
    started; the rows left are listed in ``update_unmeasured``.
    """
    raw = _merge(out, {})
    rows, hung = raw.get("update_partial", []), raw.get("update_hung", [])
    if raw.get("update_current"):
        hung.append(raw["update_current"])
        log(f"  skipping after a hang: {raw['update_current']}")
    _merge(out, {"update_hung": hung, "update_current": None})
    for spec in cfg.trees:
        for rank in spec.ranks or cfg.ranks:
            skip = {r["method"] for r in rows + hung if r["tree"] == spec.name
                    and r["rank"] == rank}
            for method in (BY_NAME[name] for name in cfg.methods if name not in skip):
                if past(stop_at):
                    unmeasured = raw.get("update_unmeasured", [])
                    unmeasured.append({"tree": spec.name, "rank": rank, "method": method.name})
                    raw = _merge(out, {"update_unmeasured": unmeasured})
                    continue
                _merge(out, {"update_current": {"tree": spec.name, "rank": rank,
                                                "method": method.name}})
                for row in measure_tree(spec, rank, [method], cfg.rounds, log=log):
                    rows.append(dataclasses.asdict(row))
                _merge(out, {"update_partial": rows, "update_current": None})
    return rows


def run_train(cfg: Config) -> dict:
    data = gpt2_bench.load_data()
    methods = [(n, BY_NAME[n].factory, BY_NAME[n].kwargs) for n in cfg.gpt2_methods]
    steps, trainers = gpt2_bench.measure_steps(methods, cfg.train_rounds, data, log=log,
                                               preset=cfg.gpt2_preset)
    if not cfg.sweep_rates:
        return {"steps": [dataclasses.asdict(r) for r in steps], "preset": cfg.gpt2_preset}
    sweep = gpt2_bench.sweep(trainers, cfg.sweep_rates, cfg.sweep_steps, log=log)
    return {"steps": [dataclasses.asdict(r) for r in steps], "preset": cfg.gpt2_preset,
            "sweep": [dataclasses.asdict(r) for r in sweep], "sweep_steps": cfg.sweep_steps,
            "window": gpt2_bench.lr_window(sweep, LR_TOLERANCE), "tolerance": LR_TOLERANCE}


def run_convergence(cfg: Config) -> dict:
    methods = [("adamw", lambda lr: optax.adamw(lr, weight_decay=0.0), 0.03)]
    methods += [(m, lambda lr, m=m: BY_NAME[m].make(lr), BY_NAME[m].learning_rate)
                for m in cfg.methods]
    rows = convergence.run_all(methods, cfg.convergence_steps, log=log)
    return {"cap": cfg.convergence_steps, "lr_factors": list(convergence.LR_FACTORS),
            "rows": [{"problem": r.problem, "method": r.method,
                      "steps": {str(k): v for k, v in r.steps.items()},
                      "learning_rates": {str(k): v for k, v in r.learning_rates.items()},
                      "curves": {str(k): [float(x) for x in c[:: max(1, c.size // 300)]]
                                 for k, c in r.curves.items()}} for r in rows]}


def run_peers(cfg: Config, out: pathlib.Path, stop_at: float | None = None) -> dict:
    """Peer rows rank by rank, saved in ``peers_partial`` (a restarted child resumes); past
    ``stop_at`` no new rank is started."""
    found = peers.versions()
    if found is None:
        log("  peers: torch / peft / pytorch_optimizer not importable, skipped")
        return {"versions": None, "rows": []}
    rows = _merge(out, {}).get("peers_partial", [])
    for rank in cfg.peer_ranks:
        if any(r["rank"] == rank for r in rows) or past(stop_at):
            continue
        measured = peers.measure([rank], cfg.rounds, layers=cfg.peer_layers, log=log)
        rows += [dataclasses.asdict(r) for r in measured]
        _merge(out, {"peers_partial": rows})
    return {"versions": found, "device": peers.torch_device(), "layers": cfg.peer_layers,
            "rows": rows}


RUNNERS = {"train": run_train, "convergence": run_convergence}


def _merge(out: pathlib.Path, updates: dict) -> dict:
    raw_path = out / "results.json"
    raw = json.loads(raw_path.read_text()) if raw_path.exists() else {}
    raw.update(updates)
    raw_path.write_text(json.dumps(raw, indent=1) + "\n")
    return raw


def run_section(section: str, cfg: Config, out: pathlib.Path, quick: bool,
                stop_at: float | None = None) -> None:
    """Run one section in this process and merge its numbers into ``results.json``."""
    log(f"[{section}]")
    start = time.perf_counter()
    if section == "update":  # long: saved row by row, resumed after a restart
        result = run_update(cfg, out, stop_at)
    elif section == "peers":
        result = run_peers(cfg, out, stop_at)
    else:
        result = RUNNERS[section](cfg)
    raw = _merge(out, {section: result, "environment": report.environment(quick=quick)})
    raw[section + "_seconds"] = time.perf_counter() - start
    _merge(out, {section + "_seconds": raw[section + "_seconds"]})
    log(f"[{section}] {raw[section + '_seconds']:.0f} s")


def run_child(section: str, args: argparse.Namespace) -> bool:
    """``section`` in a child process, retried once: a wedged XLA:CPU runtime (seen on this
    machine: every thread asleep, see results.md) cannot recover inside its process."""
    command = [sys.executable, "-u", __file__, "--child", "--sections", section,
               "--out", str(args.out), "--config", args.config] + (
        ["--quick"] if args.quick else []) + (
        ["--stop-at", str(args.stop_at)] if args.stop_at else [])
    for attempt in range(1, args.attempts + 1):
        try:
            subprocess.run(command, check=True, timeout=args.section_timeout)
            return True
        except (subprocess.TimeoutExpired, subprocess.CalledProcessError) as err:
            log(f"[{section}] attempt {attempt} failed: {type(err).__name__}")
    return False


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--quick", action="store_true", help="small smoke run")
    parser.add_argument("--config", choices=sorted(CONFIGS), default="full",
                        help="full: CPU-sized trees (2 layers); gpu: 24-layer GPT-2-medium trees")
    parser.add_argument("--minutes", type=float, default=None,
                        help="time budget: past it the update and peers sections start no new "
                        "row (the rows left are listed as unmeasured)")
    parser.add_argument("--stop-at", type=float, default=None, help=argparse.SUPPRESS)
    parser.add_argument("--sections", default=",".join(SECTIONS))
    parser.add_argument("--out", type=pathlib.Path, default=ROOT / "benchmarks")
    parser.add_argument("--section-timeout", type=float, default=1800.0, help="seconds")
    parser.add_argument("--attempts", type=int, default=2, help="tries per section")
    parser.add_argument("--child", action="store_true", help=argparse.SUPPRESS)
    args = parser.parse_args(argv)
    cfg = QUICK if args.quick else CONFIGS[args.config]
    if args.minutes is not None and args.stop_at is None:
        args.stop_at = time.time() + 60.0 * args.minutes
    args.out.mkdir(parents=True, exist_ok=True)
    sections = args.sections.split(",")
    if args.child:
        for section in sections:
            run_section(section, cfg, args.out, args.quick, args.stop_at)
        return
    if "update" in sections and (args.out / "results.json").exists():
        # a new run measures every row again
        _merge(args.out, {"update_partial": [], "update_hung": [], "update_current": None,
                          "update_unmeasured": []})
    if "peers" in sections and (args.out / "results.json").exists():
        _merge(args.out, {"peers_partial": []})
    failed = [section for section in sections if not run_child(section, args)]
    raw_path = args.out / "results.json"
    raw = json.loads(raw_path.read_text()) if raw_path.exists() else {}
    raw.setdefault("environment", report.environment(quick=args.quick))
    if "update" not in raw and raw.get("update_partial"):
        raw["update"] = raw["update_partial"]
    for key in ("update_partial", "update_current", "peers_partial"):
        raw.pop(key, None)
    raw["failed_sections"] = failed
    (args.out / "results.json").write_text(json.dumps(raw, indent=1) + "\n")
    report.write(raw, args.out)
    log(f"wrote {args.out / 'results.md'}" + (f"; failed: {failed}" if failed else ""))


if __name__ == "__main__":
    main()
