"""Execute the ablation notebooks in place, one after another, with nbclient.

    OMP_NUM_THREADS=1 python notebooks/run_all.py            # every notebook here
    OMP_NUM_THREADS=1 python notebooks/run_all.py 03_residual_bits

Each notebook runs in a fresh ``python3`` kernel started with this
interpreter (jupyter_client substitutes ``sys.executable`` for the kernel
spec's ``python``, so run this with the environment that has ``qdec``), from
the ``notebooks/`` directory, and is written back with its outputs only if
every cell succeeded. The notebooks hold no logic of their own: 01-04 call
:mod:`qdec.eval.ablations`, which also writes ``benchmarks/results/ablations/``;
05 reads the matched-cost JSON that ``qdec eval --ranks`` wrote and renders it
with :mod:`qdec.eval.costs`.
"""

from __future__ import annotations

import argparse
import os
import re
import sys
import time
from pathlib import Path

import nbformat
from nbclient import NotebookClient
from nbclient.exceptions import CellExecutionError

HERE = Path(__file__).resolve().parent


def notebooks(names: list[str]) -> list[Path]:
    """The notebooks to run: all ``*.ipynb`` here, or those named (stem or file name)."""
    every = sorted(HERE.glob("*.ipynb"))
    if not names:
        return every
    chosen = []
    for name in names:
        match = [p for p in every if name in (p.stem, p.name)]
        if not match:
            raise SystemExit(f"no notebook {name!r} in {HERE}; have {[p.stem for p in every]}")
        chosen += match
    return chosen


def _render(text: str) -> str:
    """Stream text as a terminal shows it: on each line only what follows the
    last carriage return (a progress bar's final state)."""
    return "\n".join(re.sub(r"^.*\r(?=.)", "", line).rstrip("\r") for line in text.split("\n"))


def coalesce_streams(nb: nbformat.NotebookNode) -> None:
    """Merge consecutive stdout/stderr outputs of each cell and keep only the
    final state of ``\r``-redrawn lines (tqdm bars), so a saved notebook holds
    one line per bar instead of one output per redraw."""
    for cell in nb.cells:
        if cell.cell_type != "code":
            continue
        merged: list = []
        for out in cell.outputs:
            if (out.output_type == "stream" and merged and merged[-1].output_type == "stream"
                    and merged[-1].name == out.name):
                merged[-1].text += out.text
            else:
                merged.append(out)
        for out in merged:
            if out.output_type == "stream":
                out.text = _render(out.text)
        cell.outputs = merged


def execute(path: Path, timeout: int, kernel_name: str) -> float:
    """Run every cell of ``path`` and save it in place (atomically); returns seconds."""
    nb = nbformat.read(path, as_version=4)
    start = time.perf_counter()
    client = NotebookClient(nb, timeout=timeout, kernel_name=kernel_name,
                            resources={"metadata": {"path": str(path.parent)}})
    client.execute()
    coalesce_streams(nb)
    nb.metadata.setdefault("kernelspec", {}).update(
        {"name": kernel_name, "display_name": "Python 3 (ipykernel)", "language": "python"})
    tmp = path.with_name(f".{path.name}.tmp")
    nbformat.write(nb, tmp)
    os.replace(tmp, path)
    return time.perf_counter() - start


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("names", nargs="*", help="notebooks to run (default: all)")
    parser.add_argument("--timeout", type=int, default=3600, help="seconds per cell")
    parser.add_argument("--kernel", default="python3", help="kernel spec name")
    args = parser.parse_args(argv)
    if os.environ.get("OMP_NUM_THREADS") is None:
        print("note: OMP_NUM_THREADS is not set; the kernels use every core", file=sys.stderr)
    failed = []
    for path in notebooks(args.names):
        print(f"{path.name} ...", flush=True)
        try:
            seconds = execute(path, args.timeout, args.kernel)
        except CellExecutionError as e:
            print(f"{path.name} FAILED (left unchanged):\n{e}", file=sys.stderr)
            failed.append(path.name)
            continue
        print(f"{path.name}: done in {seconds:.0f} s", flush=True)
    if failed:
        print(f"failed: {', '.join(failed)}", file=sys.stderr)
    return 1 if failed else 0


if __name__ == "__main__":
    sys.exit(main())
