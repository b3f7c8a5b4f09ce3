"""CPU time of the README main job (``qdec eval``), by phase, at one or more
checkouts, interleaved.

The main job is::

    qdec eval --variants rtn:3:128 --fractions 0.02,0.05 --policies dynamic,static \\
        --max-windows 1 --calib-samples 4

run here with ``--text``/``--calib`` given explicitly (default: the full
WikiText-2 files under ../shared/data, the inputs of the README's 116 s
measurement at d62864f), so checkouts whose defaults differ run the same job.

Each run is a fresh process with one thread (``OMP_NUM_THREADS=1``,
``torch.set_num_threads(1)``); the machine is shared, so what is compared is
the process's CPU time (user + system, from ``wait4``), not wall time.
Checkouts alternate run by run (A B A B ...), so a change in the machine's
load falls on both.

Inside the process the main functions of the job are wrapped with a CPU-time
clock (``time.process_time``), exclusive of nested phases: imports (Python,
torch, transformers, qdec), model load (GGUF read, Q4_1 dequantization,
tokenizer), tokenizing, calibration windows, deep copy, quantization, patching,
dense weight decode, the static policy's calibration pass, each perplexity
pass, plotting and JSON. What no wrapper covers is ``other``. Only functions
that exist at both ends of the comparison are wrapped (from d62864f on).

A checkout is ``LABEL=PATH`` (a worktree with the extension built in place)::

    python benchmarks/bench_main_job.py --tree d62864f=/work/wt-old --tree head=. --runs 2

Writes ``benchmarks/results/main_job_cpu.json`` and prints a table.
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import subprocess
import sys
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
DEFAULT_OUT = ROOT / "benchmarks" / "results" / "main_job_cpu.json"
DEFAULT_TEXT = ROOT.parent / "shared" / "data" / "wikitext-2-raw" / "wiki.test.raw"
DEFAULT_CALIB = ROOT.parent / "shared" / "data" / "wikitext-2" / "valid.txt"
MAIN_JOB = ["--variants", "rtn:3:128", "--fractions", "0.02,0.05", "--policies",
            "dynamic,static", "--max-windows", "1", "--calib-samples", "4"]


# ------------------------------------------------------------------ child side
class PhaseClock:
    """Process CPU seconds per phase; a phase entered inside another is
    charged to itself only (exclusive times sum to the wrapped total)."""

    def __init__(self) -> None:
        self.seconds: dict[str, float] = {}
        self._stack: list[list] = []  # [name, CPU time it last (re)started]

    def _charge(self, now: float) -> None:
        if self._stack:
            name, since = self._stack[-1]
            self.seconds[name] = self.seconds.get(name, 0.0) + now - since

    def enter(self, name: str) -> None:
        now = time.process_time()
        self._charge(now)
        self._stack.append([name, now])

    def leave(self) -> None:
        now = time.process_time()
        self._charge(now)
        self._stack.pop()
        if self._stack:
            self._stack[-1][1] = now

    def wrap(self, owner, attr: str, name) -> None:
        """Replace ``owner.attr`` by a timed call; ``name`` is a string or
        ``callable(args, kwargs) -> str``."""
        fn = getattr(owner, attr, None)
        if fn is None:  # not in this checkout
            return

        def timed(*args, **kwargs):
            phase = name(args, kwargs) if callable(name) else name
            if self._stack and self._stack[-1][0] == phase:  # recursion (deepcopy)
                return fn(*args, **kwargs)
            self.enter(phase)
            try:
                return fn(*args, **kwargs)
            finally:
                self.leave()
        setattr(owner, attr, timed)


def child(tree: str, report: str, cli_args: list[str]) -> None:
    sys.path.insert(0, tree)
    import torch

    torch.set_num_threads(1)
    import transformers.models.llama.modeling_llama  # noqa: F401  (charged to imports)

    import qdec.cli
    import qdec.eval.perplexity as perplexity
    import qdec.eval.sweep as sweep
    import qdec.models.llama as llama
    import qdec.nn
    import qdec.patch
    import qdec.quant.pipeline as pipeline
    from transformers import PreTrainedTokenizerBase

    clock = PhaseClock()
    clock.seconds["imports"] = time.process_time()
    clock.wrap(llama, "load_gguf_llama", "model load")
    clock.wrap(PreTrainedTokenizerBase, "__call__", "tokenize")
    clock.wrap(sweep, "calibration_ids", "calibration windows")
    clock.wrap(sweep.copy, "deepcopy", "deepcopy")
    clock.wrap(pipeline, "quantize_model", "quantize")
    clock.wrap(sweep, "patch", "patch")
    clock.wrap(qdec.nn.QDECLinear, "dense_weights", "dense weight decode")
    clock.wrap(sweep, "static_channels_from_calibration", "static calibration pass")
    clock.wrap(perplexity, "perplexity", lambda a, kw: f"pass: {kw.get('desc', '?')}")
    clock.wrap(sweep, "plot_results", "plot")
    clock.wrap(sweep, "write_json", "write json")
    clock.enter("other")
    rc = qdec.cli.main(["eval", *cli_args])
    clock.leave()
    Path(report).write_text(json.dumps({"rc": rc, "phases": clock.seconds,
                                        "process_cpu_s": time.process_time()}))


# ----------------------------------------------------------------- parent side
def tree_commit(tree: Path) -> dict:
    def git(*args: str) -> str:
        return subprocess.run(["git", "-C", str(tree), *args], capture_output=True,
                              text=True).stdout.strip()
    return {"commit": git("rev-parse", "--short", "HEAD"),
            "dirty": bool(git("status", "--porcelain", "--untracked-files=no"))}


def perplexities(eval_json: Path) -> dict:
    r = json.loads(eval_json.read_text())
    out = {"reference": r["reference"]["ppl"]}
    for v in r["variants"]:
        out[v["label"]] = v["quantized"]["ppl"]
        for c in v["compensated"]:
            out[f"{v['label']} {c['policy']} {c['fraction']:g}"] = c["ppl"]
    return out


def run_once(tree: Path, text: Path, calib: Path) -> dict:
    with tempfile.TemporaryDirectory() as tmp:
        report, out = Path(tmp) / "phases.json", Path(tmp) / "eval.json"
        env = {**os.environ, "OMP_NUM_THREADS": "1", "MKL_NUM_THREADS": "1",
               "PYTHONPATH": str(tree)}
        cmd = [sys.executable, str(Path(__file__).resolve()), "--child", str(tree), str(report),
               "--", *MAIN_JOB, "--text", str(text), "--calib", str(calib), "--no-progress",
               "--out", str(out)]
        t0 = time.time()
        proc = subprocess.Popen(cmd, env=env, cwd=tree, stdout=subprocess.DEVNULL,
                                stderr=subprocess.PIPE, text=True)
        stderr = proc.stderr.read()
        _, status, usage = os.wait4(proc.pid, 0)
        wall = time.time() - t0
        proc.returncode = os.waitstatus_to_exitcode(status)
        if proc.returncode != 0:
            raise RuntimeError(f"{tree}: main job failed ({proc.returncode}):\n{stderr[-3000:]}")
        phases = json.loads(report.read_text())
        cpu = usage.ru_utime + usage.ru_stime
        phases["phases"] = {k: round(v, 2) for k, v in phases["phases"].items()}
        return {"cpu_s": round(cpu, 2), "user_s": round(usage.ru_utime, 2),
                "sys_s": round(usage.ru_stime, 2), "wall_s": round(wall, 1),
                "max_rss_mib": round(usage.ru_maxrss / 1024), "phases_cpu_s": phases["phases"],
                "ppl": perplexities(out)}


def lscpu_model() -> str:
    try:
        for line in subprocess.run(["lscpu"], capture_output=True, text=True).stdout.splitlines():
            if line.startswith("Model name:"):
                return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return platform.processor() or platform.machine()


def main(argv: list[str] | None = None) -> int:
    argv = sys.argv[1:] if argv is None else argv
    if argv and argv[0] == "--child":
        child(argv[1], argv[2], argv[4:])
        return 0
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--tree", action="append", required=True,
                   help="LABEL=PATH of a checkout with the extension built in place (repeat)")
    p.add_argument("--runs", type=int, default=2, help="runs per checkout, interleaved")
    p.add_argument("--text", type=Path, default=DEFAULT_TEXT)
    p.add_argument("--calib", type=Path, default=DEFAULT_CALIB)
    p.add_argument("--out", type=Path, default=DEFAULT_OUT)
    p.add_argument("--note", default="", help="free text stored in the JSON (machine load...)")
    p.add_argument("--append", action="store_true",
                   help="add these checkouts to the existing --out file (run at another time: "
                        "each keeps its own load averages and note)")
    args = p.parse_args(argv)
    trees = dict(t.split("=", 1) for t in args.tree)

    import torch
    sys.path.insert(0, str(ROOT))
    from qdec.eval.sweep import write_json

    new_trees = {label: {**tree_commit(Path(path)), "runs": []} for label, path in trees.items()}
    if args.append:
        result = json.loads(args.out.read_text())
        for entry in new_trees.values():
            entry.update(note=args.note, load_average_start=os.getloadavg())
        result["trees"].update(new_trees)
    else:
        result = {"what": "README main job, qdec eval " + " ".join(MAIN_JOB) +
                          f" --text {args.text} --calib {args.calib}; one thread; process CPU "
                          "seconds (user + sys) per run, checkouts interleaved",
                  "cpu": lscpu_model(), "torch": torch.__version__,
                  "python": platform.python_version(), "note": args.note,
                  "load_average_start": os.getloadavg(), "trees": new_trees}
    for run in range(args.runs):
        for label, path in trees.items():
            r = run_once(Path(path).resolve(), args.text.resolve(), args.calib.resolve())
            result["trees"][label]["runs"].append(r)
            print(f"run {run + 1} {label}: {r['cpu_s']:.1f} CPU-s (user {r['user_s']:.1f}, "
                  f"sys {r['sys_s']:.1f}), wall {r['wall_s']:.0f} s", flush=True)
    if args.append:
        for entry in new_trees.values():
            entry["load_average_end"] = os.getloadavg()
    else:
        result["load_average_end"] = os.getloadavg()
    labels = list(result["trees"])
    for label in trees:
        runs = result["trees"][label]["runs"]
        result["trees"][label]["min_cpu_s"] = min(r["cpu_s"] for r in runs)
    # Every checkout against the first (the baseline), by their fastest runs.
    base = result["trees"][labels[0]]["min_cpu_s"]
    result["speedup_vs_" + labels[0]] = {
        x: round(base / result["trees"][x]["min_cpu_s"], 2) for x in labels[1:]}
    for x in labels[1:]:
        b = result["trees"][x]["min_cpu_s"]
        print(f"min CPU-s {labels[0]} {base:.1f}, {x} {b:.1f}: {base / b:.2f}x")
    names = sorted({n for t in result["trees"].values() for r in t["runs"]
                    for n in r["phases_cpu_s"]})
    print(f"{'phase (CPU-s, first run)':40s}" + "".join(f"{x:>12s}" for x in labels))
    for n in names:
        first = [result["trees"][x]["runs"][0]["phases_cpu_s"].get(n, 0) for x in labels]
        print(f"{n:40s}" + "".join(f"{v:12.2f}" for v in first))
    write_json(result, args.out)
    print(f"written {args.out}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
