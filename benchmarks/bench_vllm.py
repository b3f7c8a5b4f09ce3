"""vLLM serving throughput: QDEC (k = 0 and k = 2 %) against the dense model.

Decode tokens/s of vLLM's offline engine at batch 1, 8 and 32 (that many
prompts submitted at once, each generating ``--tokens`` tokens greedily, EOS
ignored) on the embedded SmolLM2-135M: dense (float32 weights, vLLM's own
linear) and a QDEC checkpoint of it (RTN W3 g128, 4-bit residual; ``qdec
quantize``) served through the plugin, at k = 0 and at k = 2 % of input
channels (``QDEC_K``). Each engine is started once, in this process, and its
start-up time (``LLM(...)`` construction) is recorded; runs are eager.

    OMP_NUM_THREADS=1 python benchmarks/bench_vllm.py                # CPU
    python benchmarks/bench_vllm.py --device cuda                     # a GPU

Needs the vLLM environment (.ci/run makes one, .venv-vllm). Writes
``benchmarks/results/bench_vllm_<device>.json`` (atomically): CPU/GPU model,
torch and vLLM versions, commit, and per engine and batch the tokens/s.
"""

from __future__ import annotations

import argparse
import os
import tempfile
import time
from pathlib import Path

if __name__ == "__main__":  # before vllm/torch start threads or read the environment
    _TMP = tempfile.mkdtemp(prefix="qdec-bench-vllm-")
    os.environ.setdefault("VLLM_CACHE_ROOT", f"{_TMP}/vllm")
    os.environ.setdefault("TORCHINDUCTOR_CACHE_DIR", f"{_TMP}/inductor")
    os.environ.setdefault("VLLM_ENABLE_V1_MULTIPROCESSING", "0")
    os.environ.setdefault("VLLM_CPU_KVCACHE_SPACE", "2")
    # vLLM's CPU auto-binding pins worker threads; on a shared 2-core machine the
    # thread count is left to OMP_NUM_THREADS instead.
    os.environ.setdefault("VLLM_CPU_OMP_THREADS_BIND", "nobind")

ROOT = Path(__file__).resolve().parents[1]
PROMPTS = ["The capital of France is", "Once upon a time, there was a",
           "The three primary colors are", "In computer science, a hash table",
           "The best way to learn a language is", "Water boils at a temperature of",
           "The largest planet in the solar system", "A good breakfast includes"]


def dense_checkpoint(out: Path) -> Path:
    """The embedded SmolLM2-135M as a float32 Hugging Face directory."""
    from qdec.cli import load_model

    model, tok = load_model(None)
    model.save_pretrained(out)
    tok.save_pretrained(out)
    return out


def qdec_checkpoint(out: Path) -> Path:
    from qdec.cli import main

    if main(["quantize", "--method", "rtn", "--bits", "3", "--group-size", "128",
             "--calib-samples", "1", "--out", str(out)]) != 0:
        raise RuntimeError("qdec quantize failed")
    return out


def run_engine(path: Path, k: float | None, batches: list[int], tokens: int) -> dict:
    """Start one engine on ``path`` (QDEC with ``QDEC_K=k``, or dense when k is
    None) and time greedy generation at each batch size."""
    import vllm

    if k is not None:
        os.environ["QDEC_K"] = repr(float(k))
    t0 = time.perf_counter()
    llm = vllm.LLM(model=str(path), dtype="float32", enforce_eager=True, max_model_len=512,
                   max_num_seqs=max(batches), enable_prefix_caching=False, seed=0)
    startup = time.perf_counter() - t0
    params = vllm.SamplingParams(temperature=0.0, max_tokens=tokens, ignore_eos=True)
    rows = []
    llm.generate(PROMPTS[:1], vllm.SamplingParams(temperature=0.0, max_tokens=4),
                 use_tqdm=False)  # warm-up
    for b in batches:
        prompts = [PROMPTS[i % len(PROMPTS)] for i in range(b)]
        t0 = time.perf_counter()
        outs = llm.generate(prompts, params, use_tqdm=False)
        dt = time.perf_counter() - t0
        n = sum(len(o.outputs[0].token_ids) for o in outs)
        rows.append({"batch": b, "generated_tokens": n, "seconds": round(dt, 3),
                     "tokens_per_s": round(n / dt, 2)})
        print(f"  batch {b:3d}: {n} tokens in {dt:.2f} s = {n / dt:.1f} tokens/s", flush=True)
    del llm
    os.environ.pop("QDEC_K", None)
    return {"startup_seconds": round(startup, 1), "rows": rows}


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--device", default="cpu", choices=["cpu", "cuda"])
    parser.add_argument("--batches", default="1,8,32")
    parser.add_argument("--tokens", type=int, default=32, help="generated per sequence")
    parser.add_argument("--fraction", type=float, default=0.02, help="k of the QDEC k>0 run")
    parser.add_argument("--out", type=Path, default=None)
    args = parser.parse_args(argv)
    import vllm

    from qdec.benchmarking import run_metadata
    from qdec.eval.sweep import write_json

    batches = [int(b) for b in args.batches.split(",")]
    out = args.out or ROOT / "benchmarks" / "results" / f"bench_vllm_{args.device}.json"
    work = Path(tempfile.mkdtemp(prefix="qdec-bench-ckpt-"))
    engines = {}
    print("dense SmolLM2-135M", flush=True)
    engines["dense"] = run_engine(dense_checkpoint(work / "dense"), None, batches, args.tokens)
    ckpt = qdec_checkpoint(work / "qdec")
    for label, k in (("qdec_k0", 0.0), (f"qdec_k{args.fraction:g}", args.fraction)):
        print(f"QDEC RTN W3 g128, k = {k:.1%}", flush=True)
        engines[label] = run_engine(ckpt, k, batches, args.tokens)
    for e in engines.values():
        per_batch = {r["batch"]: r["tokens_per_s"] for r in e["rows"]}
        if 1 in per_batch and max(batches) != 1:
            e["speedup_max_batch_vs_1"] = round(per_batch[max(batches)] / per_batch[1], 2)
    data = {"benchmark": "bench_vllm", "model": "SmolLM2-135M-Instruct (embedded)",
            "quantization": "RTN W3 g128, residual 4-bit", "tokens_per_sequence": args.tokens,
            "batches": batches, "dtype": "float32", "eager": True,
            "omp_num_threads": os.environ.get("OMP_NUM_THREADS"),
            **run_metadata(args.device), "vllm": vllm.__version__, "engines": engines}
    write_json(data, out)
    print(f"wrote {out}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
