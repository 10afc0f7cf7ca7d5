"""Regenerate the bundled synthetic E2E-style data set in ``examples/gpt2/data/``.

    python examples/gpt2/make_data.py   # trainset.csv, devset.csv, testset_w_refs.csv

The MRs of the three splits are disjoint; every file uses the E2E CSV layout (mr, ref).
"""

from __future__ import annotations

import argparse
from pathlib import Path

from e2e import write_csv
from restaurants import make_data_to_text

SPLITS = (  # file, number of MRs, references per MR, seed
    ("trainset.csv", 1200, 3, 0),
    ("devset.csv", 100, 5, 1),
    ("testset_w_refs.csv", 200, 5, 2),
)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--out", type=Path, default=Path(__file__).parent / "data")
    args = parser.parse_args()
    args.out.mkdir(parents=True, exist_ok=True)
    seen: set[str] = set()
    for name, n_mrs, refs, seed in SPLITS:
        rows = make_data_to_text(n_mrs, refs, seed, exclude=seen)
        seen |= {mr for mr, _ in rows}
        write_csv(args.out / name, rows)
        print(f"{name}: {n_mrs} MRs, {len(rows)} rows")


if __name__ == "__main__":
    main()
