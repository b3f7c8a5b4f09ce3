"""Peak memory of quantization: streaming from disk vs the in-memory pipeline.

Writes a random bf16 checkpoint with Llama-3-8B's layer shapes (hidden 4096,
intermediate 14336, 32 heads, 8 KV heads) but a 1024-token vocabulary (the
embeddings are not quantized; a real 128k vocabulary would only add a constant)
to a temporary directory, one decoder layer per shard, generated and saved one
layer at a time. Checkpoints with fewer layers are the same shards hard-linked
under another index. Then, in a fresh Python process per measurement, it
quantizes each one

* with :func:`qdec.quant.streaming.quantize_checkpoint_streaming` (the model is
  never loaded whole), and
* for contrast with the old path: ``from_pretrained`` then
  :func:`qdec.quant.pipeline.quantize_model` then ``save_quantization_result``,

and records the process's peak RSS (``ru_maxrss``), its RSS after the imports,
seconds and checkpoint bytes. The streaming peak should be flat in the number of
layers; the in-memory one grows by about one bf16 layer per layer.

    python benchmarks/quant_memory.py                 # writes benchmarks/results/quant_memory.json
    python benchmarks/quant_memory.py --layers 2,4 --no-in-memory
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import resource
import shutil
import subprocess
import sys
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

HIDDEN, INTERMEDIATE, HEADS, KV_HEADS, VOCAB = 4096, 14336, 32, 8, 1024
GIB = float(2 ** 30)


def _config(num_layers: int) -> dict:
    from transformers import LlamaConfig

    cfg = LlamaConfig(hidden_size=HIDDEN, intermediate_size=INTERMEDIATE,
                      num_hidden_layers=num_layers, num_attention_heads=HEADS,
                      num_key_value_heads=KV_HEADS, vocab_size=VOCAB,
                      max_position_embeddings=8192, rope_theta=500000.0,
                      tie_word_embeddings=False, dtype="bfloat16")
    return cfg.to_dict()


def layer_shapes() -> dict[str, tuple[int, ...]]:
    """Tensor names (relative to ``model.layers.<i>``) and shapes of one decoder layer."""
    kv = HIDDEN // HEADS * KV_HEADS
    return {"input_layernorm.weight": (HIDDEN,), "post_attention_layernorm.weight": (HIDDEN,),
            "self_attn.q_proj.weight": (HIDDEN, HIDDEN), "self_attn.k_proj.weight": (kv, HIDDEN),
            "self_attn.v_proj.weight": (kv, HIDDEN), "self_attn.o_proj.weight": (HIDDEN, HIDDEN),
            "mlp.gate_proj.weight": (INTERMEDIATE, HIDDEN),
            "mlp.up_proj.weight": (INTERMEDIATE, HIDDEN),
            "mlp.down_proj.weight": (HIDDEN, INTERMEDIATE)}


def layer_bytes_bf16() -> int:
    n = 0
    for shape in layer_shapes().values():
        p = 1
        for d in shape:
            p *= d
        n += p
    return 2 * n


def generate(root: Path, max_layers: int, sizes: list[int]) -> dict[int, Path]:
    """Write the shards of a ``max_layers`` random bf16 checkpoint under
    ``root/shards`` one layer at a time (only one layer's tensors exist at once),
    then one HF directory per size with hard links to the shards it needs."""
    import torch

    from qdec.formats.safetensors_io import save_safetensors

    shards = root / "shards"
    shards.mkdir(parents=True)
    g = torch.Generator().manual_seed(0)
    std = 0.02  # the usual init scale; random weights are all a memory test needs

    def rand(shape):
        return (torch.randn(shape, generator=g) * std).to(torch.bfloat16)

    save_safetensors({"model.embed_tokens.weight": rand((VOCAB, HIDDEN)),
                      "lm_head.weight": rand((VOCAB, HIDDEN)),
                      "model.norm.weight": torch.ones(HIDDEN, dtype=torch.bfloat16)},
                     shards / "model-rest.safetensors", {"format": "pt"})
    for i in range(max_layers):
        tensors = {}
        for name, shape in layer_shapes().items():
            full = f"model.layers.{i}.{name}"
            if "layernorm" in name:  # non-trivial norms, as in a trained model
                tensors[full] = (1 + 0.5 * (torch.rand(shape, generator=g) - 0.5)).to(
                    torch.bfloat16)
            else:
                tensors[full] = rand(shape)
        save_safetensors(tensors, shards / f"model-layer{i:03d}.safetensors", {"format": "pt"})
        del tensors
    dirs = {}
    for n in sizes:
        d = root / f"llama3-8b-shaped-{n}L"
        d.mkdir()
        weight_map = {}
        for shard in ["model-rest.safetensors"] + [f"model-layer{i:03d}.safetensors"
                                                   for i in range(n)]:
            os.link(shards / shard, d / shard)
            from qdec.formats.safetensors_io import read_header
            weight_map.update({t: shard for t in read_header(d / shard).tensors})
        (d / "model.safetensors.index.json").write_text(
            json.dumps({"metadata": {}, "weight_map": weight_map}, indent=1))
        (d / "config.json").write_text(json.dumps(_config(n), indent=1))
        dirs[n] = d
    return dirs


# ---------------------------------------------------------------------------------
# One measurement, in a fresh process
# ---------------------------------------------------------------------------------


def child(spec: dict) -> dict:
    """Quantize ``spec["model"]`` as asked, report memory and time (run by a fresh
    interpreter: ``ru_maxrss`` is then this measurement's own peak)."""
    import torch

    import qdec  # noqa: F401  (the extension, as the CLI would load it)
    from qdec.quant.pipeline import current_rss_bytes, peak_rss_bytes

    rss_import = current_rss_bytes()
    ids = torch.randint(0, VOCAB, (spec["n_samples"], spec["seqlen"]),
                        generator=torch.Generator().manual_seed(0))
    kw = dict(residual_bits=spec["residual_bits"], progress=False,
              residual_grid_points=spec["residual_grid_points"], **spec.get("extra", {}))
    t0 = time.perf_counter()
    out: dict = {"rss_after_import_bytes": rss_import}
    if spec["path"] == "streaming":
        from qdec.quant.streaming import quantize_checkpoint_streaming

        res = quantize_checkpoint_streaming(spec["model"], spec["out"], spec["method"],
                                            spec["bits"], spec["group_size"], calib_ids=ids, **kw)
        out.update(layer_fp_bytes=res.layer_fp_bytes, calib_bytes=res.calib_bytes,
                   checkpoint_bytes=res.checkpoint_bytes,
                   rss_after_each_layer_bytes=list(res.layer_rss_bytes.values()),
                   median_rel_error=float(torch.tensor(list(res.rel_errors().values()))
                                          .median()))
    else:
        from transformers import AutoModelForCausalLM

        from qdec.formats.qdec_checkpoint import save_quantization_result
        from qdec.quant.pipeline import quantize_model

        model = AutoModelForCausalLM.from_pretrained(spec["model"], local_files_only=True,
                                                     dtype=torch.bfloat16).eval()
        out["rss_after_load_bytes"] = current_rss_bytes()
        res = quantize_model(model, spec["method"], spec["bits"], spec["group_size"],
                             calib_ids=ids, **kw)
        save_quantization_result(spec["out"], res, model)
        out.update(checkpoint_bytes=sum(f.stat().st_size for f in Path(spec["out"]).iterdir()),
                   median_rel_error=float(torch.tensor(list(res.rel_errors().values()))
                                          .median()))
    out["seconds"] = time.perf_counter() - t0
    out["peak_rss_bytes"] = peak_rss_bytes()
    out["ru_maxrss_kib"] = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
    return out


def measure(spec: dict) -> dict:
    proc = subprocess.run([sys.executable, __file__, "--child", json.dumps(spec)],
                          capture_output=True, text=True, cwd=ROOT)
    if proc.returncode != 0:
        raise RuntimeError(f"measurement {spec['path']} {spec['method']} "
                           f"{spec['num_layers']}L failed:\n{proc.stderr[-4000:]}")
    shutil.rmtree(spec["out"], ignore_errors=True)
    return {**{k: v for k, v in spec.items() if k not in ("model", "out")},
            **json.loads(proc.stdout.strip().splitlines()[-1])}


def _machine() -> dict:
    import torch

    mem = None
    with open("/proc/meminfo") as f:
        for line in f:
            if line.startswith("MemTotal:"):
                mem = int(line.split()[1]) * 1024
    cpu = platform.processor()
    try:
        with open("/proc/cpuinfo") as f:
            cpu = next(line.split(":", 1)[1].strip() for line in f if "model name" in line)
    except (OSError, StopIteration):
        pass
    return {"cpu": cpu, "cpu_count": os.cpu_count(), "mem_total_bytes": mem,
            "load_average_at_start": os.getloadavg(), "platform": platform.platform(),
            "python": platform.python_version(), "torch": torch.__version__,
            "torch_threads": torch.get_num_threads()}


def _commit() -> str:
    try:
        return subprocess.run(["git", "rev-parse", "--short", "HEAD"], cwd=ROOT,
                              capture_output=True, text=True, check=True).stdout.strip()
    except (OSError, subprocess.CalledProcessError):
        return "unknown"


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--child", help=argparse.SUPPRESS)
    ap.add_argument("--layers", default="2,4,8", help="checkpoint sizes (decoder layers)")
    ap.add_argument("--in-memory-layers", default=None,
                    help="sizes for the in-memory contrast (default: --layers)")
    ap.add_argument("--no-in-memory", action="store_true")
    ap.add_argument("--methods-2l", default="",
                    help="extra streaming methods measured at the smallest size (e.g. gptq,awq)")
    ap.add_argument("--n-samples", type=int, default=1)
    ap.add_argument("--seqlen", type=int, default=128)
    ap.add_argument("--residual-grid-points", type=int, default=2,
                    help="residual scale candidates (time only: the search is chunked, so "
                         "its memory does not depend on this)")
    ap.add_argument("--tmp", default=tempfile.gettempdir())
    ap.add_argument("--out", default=str(ROOT / "benchmarks/results/quant_memory.json"))
    args = ap.parse_args(argv)
    if args.child:
        print(json.dumps(child(json.loads(args.child))))
        return 0

    sizes = sorted(int(s) for s in args.layers.split(",") if s)
    mem_sizes = [] if args.no_in_memory else sorted(
        int(s) for s in (args.in_memory_layers or args.layers).split(",") if s)
    need = (max(sizes + mem_sizes) * layer_bytes_bf16() * 1.6)  # shards + outputs, margin
    free = shutil.disk_usage(args.tmp).free
    while free < need and len(sizes) > 1 and max(sizes) > 2:
        dropped = max(sizes)
        sizes = sorted(set(sizes[:-1]) | {dropped - 2})
        mem_sizes = [s for s in mem_sizes if s < dropped] or mem_sizes
        need = max(sizes + mem_sizes) * layer_bytes_bf16() * 1.6
        print(f"only {free / GIB:.1f} GiB free in {args.tmp}: dropping {dropped} layers")
    print(f"{args.tmp}: {free / GIB:.1f} GiB free, need about {need / GIB:.1f} GiB")

    import torch

    root = Path(tempfile.mkdtemp(prefix="qdec-quant-memory-", dir=args.tmp))
    runs = []
    t_start = time.time()
    try:
        t0 = time.perf_counter()
        dirs = generate(root, max(sizes + mem_sizes), sorted(set(sizes + mem_sizes)))
        gen_seconds = time.perf_counter() - t0
        base = dict(method="rtn", bits=3, group_size=128, residual_bits=4,
                    n_samples=args.n_samples, seqlen=args.seqlen,
                    residual_grid_points=args.residual_grid_points)
        plan = [dict(base, path="streaming", num_layers=n) for n in sizes]
        plan += [dict(base, path="in_memory", num_layers=n) for n in mem_sizes]
        extra = {"awq": dict(awq_n_grid=5, awq_clip_tokens=256), "gptq": {}}
        for m in [m for m in args.methods_2l.split(",") if m]:
            plan.append(dict(base, path="streaming", num_layers=min(sizes), method=m,
                             extra=extra[m]))
        for spec in plan:
            spec = dict(spec, model=str(dirs[spec["num_layers"]]),
                        out=str(root / f"out-{spec['path']}-{spec['method']}-"
                                       f"{spec['num_layers']}"))
            print(f"measuring {spec['path']} {spec['method']} {spec['num_layers']} layers ...",
                  flush=True)
            r = measure(spec)
            runs.append(r)
            print(f"  peak RSS {r['peak_rss_bytes'] / GIB:.2f} GiB, {r['seconds']:.0f} s",
                  flush=True)
            # Saved after every run: a long benchmark on a shared machine keeps what it has.
            _save(args, runs, gen_seconds, t_start, complete=False)
    finally:
        shutil.rmtree(root, ignore_errors=True)
    result = _save(args, runs, gen_seconds, t_start, complete=True)
    print(table(result))
    print(f"wrote {args.out}")
    return 0


def _save(args: argparse.Namespace, runs: list[dict], gen_seconds: float, t_start: float,
          complete: bool) -> dict:
    from qdec.formats.safetensors_io import write_json_atomic

    result = {
        "what": "peak RSS of quantizing a random Llama-3-8B-shaped bf16 checkpoint slice "
                "(hidden 4096, intermediate 14336, 32 heads, 8 KV heads) with a 1024-token "
                "vocabulary to keep the (unquantized) embeddings small; one fresh process "
                "per measurement",
        "layer_bf16_bytes": layer_bytes_bf16(),
        "calibration": f"{args.n_samples} x {args.seqlen} random tokens",
        "calib_activation_bytes_bf16": args.n_samples * args.seqlen * HIDDEN * 2,
        "residual_grid_points": args.residual_grid_points,
        "notes": [
            "RTN needs calibration only to measure output errors; it is kept small here "
            "because the 2 shared CPU cores make every calibration forward slow; the "
            "streaming working set is one layer plus these activations either way",
            "residual_grid_points only changes time: the residual scale search is chunked "
            "over rows, so its memory does not depend on the number of candidates",
            "in_memory: AutoModelForCausalLM.from_pretrained (bf16) then quantize_model then "
            "save_quantization_result; transformers memory-maps the safetensors, so a "
            "layer's pages join the RSS when it is first used and stay there "
            "(rss_after_load_bytes is therefore small)",
            "streaming: rss_after_each_layer_bytes is the RSS after each layer was written "
            "and freed",
        ],
        "generate_seconds": gen_seconds,
        "total_seconds": time.time() - t_start,
        "commit": _commit(),
        "machine": _machine(),
        "complete": complete,
        "runs": runs,
    }
    os.makedirs(os.path.dirname(args.out), exist_ok=True)
    write_json_atomic(result, args.out, overwrite=True)
    return result


def table(result: dict) -> str:
    """The runs as a small text table (GiB)."""
    lines = [f"one layer bf16: {result['layer_bf16_bytes'] / GIB:.3f} GiB; calibration "
             f"{result['calibration']} ({result['calib_activation_bytes_bf16'] / 2**20:.0f} "
             f"MiB of bf16 hidden states); vocab {VOCAB} (small on purpose)",
             f"{'path':10s} {'method':6s} {'layers':>6s} {'import':>7s} {'loaded':>7s} "
             f"{'peak':>7s} {'peak-imp':>8s} {'ckpt':>7s} {'seconds':>8s}"]
    for r in result["runs"]:
        loaded = r.get("rss_after_load_bytes")
        lines.append(
            f"{r['path']:10s} {r['method']:6s} {r['num_layers']:6d} "
            f"{r['rss_after_import_bytes'] / GIB:7.2f} "
            f"{'-' if loaded is None else f'{loaded / GIB:.2f}':>7s} "
            f"{r['peak_rss_bytes'] / GIB:7.2f} "
            f"{(r['peak_rss_bytes'] - r['rss_after_import_bytes']) / GIB:8.2f} "
            f"{r['checkpoint_bytes'] / GIB:7.2f} {r['seconds']:8.0f}")
    return "\n".join(lines)


if __name__ == "__main__":
    sys.exit(main())
