"""Benchmarks of every lowrank_optax method against optax.adamw; writes results.md and PNG plots.

    python benchmarks/run.py            # full run (≈ 25–35 min on a shared 2-core CPU)
    python benchmarks/run.py --quick    # smoke run: small trees, few methods and repeats

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
import sys
import time

# The r×r kernels call LAPACK through scipy's OpenBLAS; its worker threads busy-wait, which on a
# shared CPU turns a 0.3 ms update into hundreds of ms. Tiny matrices want one thread anyway.
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
SWEEP_RATES = (1e-4, 4.2e-4, 1.7e-3, 7.4e-3, 3e-2)  # geomspace(1e-4, 3e-2, 5), rounded
LR_TOLERANCE = 0.1  # nats: a rate "trains" when its final loss is within this of the best run


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


FULL = Config(
    trees=(TreeSpec("q,v", all_four=False, layers=24, d=1024, matrix_layers=8),
           TreeSpec("all four", all_four=True, layers=24, d=1024, matrix_layers=0)),
    ranks=(4, 16, 64), rounds=20, methods=tuple(m.name for m in METHODS),
    gpt2_methods=GPT2_METHODS, train_rounds=20, sweep_rates=SWEEP_RATES, sweep_steps=10,
    convergence_steps=3000, peer_ranks=(4, 16, 64), peer_layers=24,
)
QUICK = Config(
    trees=(TreeSpec("q,v", all_four=False, layers=2, d=1024, matrix_layers=2),),
    ranks=(4,), rounds=5, methods=QUICK_METHODS, gpt2_methods=QUICK_METHODS[:1],
    train_rounds=3, sweep_rates=(1e-3, 1e-2), sweep_steps=4, convergence_steps=300,
    peer_ranks=(4,), peer_layers=2,
)


def log(message: str) -> None:
    print(message, flush=True)


def run_update(cfg: Config) -> list[dict]:
    rows = []
    for spec in cfg.trees:
        for rank in cfg.ranks:
            methods = [BY_NAME[name] for name in cfg.methods]
            rows += measure_tree(spec, rank, methods, cfg.rounds, log=log)
    return [dataclasses.asdict(r) for r in rows]


def run_train(cfg: Config) -> dict:
    data = gpt2_bench.load_data()
    methods = [(n, BY_NAME[n].factory, BY_NAME[n].kwargs) for n in cfg.gpt2_methods]
    steps, trainers = gpt2_bench.measure_steps(methods, cfg.train_rounds, data, log=log)
    sweep = gpt2_bench.sweep(trainers, cfg.sweep_rates, cfg.sweep_steps, log=log)
    return {"steps": [dataclasses.asdict(r) for r in steps],
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


def run_peers(cfg: Config) -> dict:
    found = peers.versions()
    if found is None:
        log("  peers: torch / peft / pytorch_optimizer not importable, skipped")
        return {"versions": None, "rows": []}
    rows = peers.measure(cfg.peer_ranks, cfg.rounds, layers=cfg.peer_layers, log=log)
    return {"versions": found, "rows": [dataclasses.asdict(r) for r in rows]}


RUNNERS = {"update": run_update, "train": run_train, "convergence": run_convergence,
           "peers": run_peers}


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--quick", action="store_true", help="small smoke run")
    parser.add_argument("--sections", default=",".join(SECTIONS))
    parser.add_argument("--out", type=pathlib.Path, default=ROOT / "benchmarks")
    args = parser.parse_args(argv)
    cfg = QUICK if args.quick else FULL
    args.out.mkdir(parents=True, exist_ok=True)
    raw_path = args.out / "results.json"
    raw = json.loads(raw_path.read_text()) if raw_path.exists() else {}
    raw["environment"] = report.environment(quick=args.quick)
    for section in args.sections.split(","):
        log(f"[{section}]")
        start = time.perf_counter()
        raw[section] = RUNNERS[section](cfg)
        raw[section + "_seconds"] = time.perf_counter() - start
        raw_path.write_text(json.dumps(raw, indent=1) + "\n")
        log(f"[{section}] {raw[section + '_seconds']:.0f} s")
    report.write(raw, args.out)
    log(f"wrote {args.out / 'results.md'}")


if __name__ == "__main__":
    main()
