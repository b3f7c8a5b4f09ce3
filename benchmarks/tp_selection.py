"""Local (per-rank) against global top-k channel selection under tensor
parallelism, on the embedded SmolLM2-135M (RTN W3 g128, 4 x 512 tokens of
WikiText-2), in the project's own CPU evaluation with a simulated split
(:func:`qdec.eval.ablations.tp_selection`).

    OMP_NUM_THREADS=1 python benchmarks/tp_selection.py [--out PATH]

Writes ``benchmarks/results/ablations/tp_selection.json`` and prints a table.
"""

from __future__ import annotations

import argparse
from pathlib import Path

from qdec.eval.ablations import (
    RESULTS_DIR,
    AblationConfig,
    load_setup,
    tp_selection,
    tp_selection_table,
)
from qdec.eval.sweep import write_json


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--fractions", default="0.02,0.05")
    parser.add_argument("--degrees", default="1,2,4")
    parser.add_argument("--out", type=Path, default=RESULTS_DIR / "tp_selection.json")
    args = parser.parse_args(argv)
    setup = load_setup(AblationConfig())
    results = tp_selection(setup, [float(f) for f in args.fractions.split(",")],
                           [int(d) for d in args.degrees.split(",")])
    write_json(results, args.out)
    print(setup.summary())
    print(tp_selection_table(results))
    print(f"wrote {args.out}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
