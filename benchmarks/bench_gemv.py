"""Decode-GEMV benchmark of the qdec kernels at Llama-3-8B shapes, on CPU or CUDA.

Times, per layer shape (N x K) and batch size, in ONE run so that every number
shares the machine state:

- ``quantized_matmul``: packed base weight, bits 2/3/4, group 128;
- ``compensated_linear``: the same plus dynamic compensation of the top
  k = 1% / 5% of K input channels from a 4-bit residual store (pinned host
  memory read zero-copy on CUDA, as deployed);
- ``residual_gather`` (batch 1): the fetch alone, k scattered rows of the
  store, so its GB/s can be set against the zero-copy read roof;
- ``lowrank_linear``: the static low-rank term alone, r = 16/32/64/128;
- baselines: the dense matmul (cuBLAS fp16 on CUDA, fp32 BLAS on CPU) and, on
  CUDA, torch's int4 tinygemm (``aten._weight_int4pack_mm``, bf16 activations);
  if tinygemm is unavailable the reason is recorded instead.

Activations and scales are fp16 on CUDA, fp32 on CPU. Weights are random: the
kernels' cost does not depend on the code values. CUDA times are the median of
per-iteration CUDA-event intervals after a warm-up, so they include each op's
launch overhead, as a decode step pays it; CPU times are medians of
``time.perf_counter`` intervals. ``bytes`` counts what an op must read and
write (weights, scales, factors, selected residual rows, x and y), so
``gb_per_s`` is the effective bandwidth; ``host_bytes`` is the part read over
PCIe from pinned memory on CUDA. ``ratio_vs_dense`` = median / dense median at
the same shape and batch (< 1 is faster than dense). On CUDA the same run
measures the roofs (``roofs``: device-to-device copy, pinned DMA and zero-copy
reads) and each GEMV row gets ``pct_of_copy_bandwidth``, each fetch row
``pct_of_zero_copy_read`` (the targets: >= 75 % and >= 80 %).

On CPU (``--device cpu``) the run is the CPU decode suite instead: at the
Llama-3-8B and SmolLM2-135M shapes, for each thread count (``--threads``),
qdec W4/W3/W2 g128, W4 g32 (W4 also with ``x:int16``, the one-term
activations of ``QDEC_CPU_ACTIVATIONS=int16``, set untimed before each call)
and W3 + compensation at 2 % of channels, side by
side with torch fp32 and bf16 ``F.linear``, torch's CPU int4 GEMM and its int8
weight-only GEMM, all timed in interleaved rounds (every contender once per
round; medians of wall and CPU time), plus the memory read roof measured in
the same run at that thread count. ``targets`` summarises issue 15's checks.

Writes ``benchmarks/results/bench_gemv_<device>.json`` (atomically) and prints
a table. Examples::

    python benchmarks/bench_gemv.py --device cuda --batches 1,2,4,8,16
    python benchmarks/bench_gemv.py --device cpu --iters 5      # shared machine
    python benchmarks/bench_gemv.py --quick                      # smoke run
    python benchmarks/bench_gemv.py --device cpu --threads 1,2 --batches 1,4
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

import torch

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

import qdec  # noqa: E402  (registers the ops)
from qdec.benchmarking import (  # noqa: E402
    SHAPE_PRESETS,
    copy_bandwidth,
    cpu_read_bandwidth,
    interleaved_medians,
    packed_layer,
    pinned_read_bandwidths,
    residual_store,
    run_metadata,
    time_op,
    tinygemm_setup,
    torch_int4_cpu_setup,
    torch_int8_cpu_setup,
)
from qdec.eval.sweep import write_json  # noqa: E402

# Llama-3-8B linear layers, (N, K): out_features x in_features.
SHAPES = [
    (4096, 4096, "q_proj/o_proj"),
    (1024, 4096, "k_proj/v_proj"),
    (14336, 4096, "gate_proj/up_proj"),
    (4096, 14336, "down_proj"),
]
QUICK_SHAPES = [(1024, 4096, "k_proj/v_proj")]
GROUP = 128
RESIDUAL_BITS = 4


# ------------------------------------------------------------------ the run
def run(args) -> dict:
    device = args.device
    dtype = torch.float16 if device == "cuda" else torch.float32
    elt = torch.finfo(dtype).bits // 8
    quick = args.quick
    shapes = QUICK_SHAPES if quick else SHAPES
    bits_list = [4] if quick else [2, 3, 4]
    k_fracs = [0.01] if quick else [0.01, 0.05]
    ranks = [16] if quick else [16, 32, 64, 128]
    batches = [int(b) for b in args.batches.split(",")]
    comp_bits = args.comp_bits if args.comp_bits in bits_list else bits_list[-1]
    iters = args.iters or ((20 if quick else 200) if device == "cuda" else (3 if quick else 10))
    warmup = args.warmup if args.warmup is not None else (
        (5 if quick else 20) if device == "cuda" else 1)
    gen = torch.Generator().manual_seed(0)
    results = []
    tinygemm_status: dict = {"available": None, "reason": None}

    def record(shape, B, op, config, seconds, nbytes, host_bytes=0, **extra):
        row = dict(shape=f"{shape[0]}x{shape[1]}", layer=shape[2], N=shape[0], K=shape[1],
                   batch=B, op=op, config=config, median_us=seconds * 1e6, bytes=nbytes,
                   host_bytes=host_bytes, gb_per_s=nbytes / seconds / 1e9, **extra)
        results.append(row)
        print(f"{row['shape']:>11} B={B:<2} {op:<20} {config:<22} {row['median_us']:10.1f} us "
              f"{row['gb_per_s']:8.1f} GB/s", flush=True)
        return row

    for N, K, layer in shapes:
        shape = (N, K, layer)
        dense_w = (torch.randn(N, K, generator=gen) * 0.02).to(device, dtype)
        layers = {b: packed_layer(N, K, b, GROUP, dtype, device, gen) for b in bits_list}
        rwords = -(-N // 32) * RESIDUAL_BITS
        residual, rscales = residual_store(N, K, RESIDUAL_BITS, device, gen)
        factors = {r: ((torch.randn(N, r, generator=gen) / r ** 0.5).to(device, dtype),
                       (torch.randn(r, K, generator=gen) / K ** 0.5).to(device, dtype))
                   for r in ranks}
        try:
            tg_fn, tg_bytes = tinygemm_setup(N, K, GROUP, device, gen)
            tinygemm_status["available"] = True
        except Exception as e:  # noqa: BLE001  (record why, keep benchmarking)
            tg_fn = None
            tinygemm_status = {"available": False, "reason": f"{type(e).__name__}: {e}"}

        for B in batches:
            x = torch.randn(B, K, generator=gen).to(device, dtype)
            io = B * (K + N) * elt
            dense = record(shape, B, "dense", "cuBLAS fp16" if device == "cuda" else "BLAS fp32",
                           time_op(lambda: torch.nn.functional.linear(x, dense_w), device, iters,
                                   warmup), N * K * elt + io)
            t_dense = dense["median_us"]
            if tg_fn is not None:
                xb = x.to(torch.bfloat16)
                record(shape, B, "tinygemm_int4", "g128 bf16",
                       time_op(lambda: tg_fn(xb), device, iters, warmup),
                       tg_bytes + B * (K + N) * 2)
            qmm_us = {}
            for bits, (wargs, wbytes) in layers.items():
                row = record(shape, B, "quantized_matmul", f"{bits}-bit g{GROUP}",
                             time_op(lambda: qdec.quantized_matmul(x, *wargs), device, iters,
                                     warmup), wbytes + io)
                qmm_us[bits] = row["median_us"]
            wargs, wbytes = layers[comp_bits]
            for frac in k_fracs:
                k = max(1, round(frac * K))
                # Rows of the store actually read: k per batch row (upper bound:
                # rows shared between batch rows are read once per row here).
                rbytes = B * k * rwords * 4
                row = record(
                    shape, B, "compensated_linear",
                    f"{comp_bits}-bit k={k} ({frac:.0%}) r{RESIDUAL_BITS}",
                    time_op(lambda: qdec.compensated_linear(x, *wargs, residual, rscales,
                                                            RESIDUAL_BITS, k),
                            device, iters, warmup),
                    wbytes + io + rbytes + N * 4,
                    host_bytes=rbytes if device == "cuda" else 0, k=k)
                row["overhead_vs_quantized_matmul"] = row["median_us"] / qmm_us[comp_bits]
                if B == 1:
                    # The fetch alone: k scattered rows of the store (distinct
                    # random channels, as outliers are), read zero-copy on CUDA.
                    channels = torch.randperm(K, generator=gen)[:k].to(device)
                    hb = k * rwords * 4
                    record(shape, B, "residual_gather", f"k={k} ({frac:.0%}) r{RESIDUAL_BITS}",
                           time_op(lambda: qdec.residual_gather(residual, rscales, channels,
                                                                RESIDUAL_BITS),
                                   device, iters, warmup),
                           hb + k * N * 4, host_bytes=hb if device == "cuda" else 0, k=k)
            for r, (la, lb) in factors.items():
                row = record(shape, B, "lowrank_linear", f"r={r}",
                             time_op(lambda: qdec.ops.lowrank_linear(x, la, lb), device, iters,
                                     warmup), r * (N + K) * elt + io, rank=r)
            for row in results:
                if row["shape"] == f"{N}x{K}" and row["batch"] == B:
                    row["ratio_vs_dense"] = row["median_us"] / t_dense
        del dense_w, layers, factors, residual
        if device == "cuda":
            torch.cuda.empty_cache()

    # Roofs measured in the same run: a GEMV is judged against the device's
    # copy bandwidth, the residual fetch against the pinned zero-copy read.
    roofs: dict = {}
    if device == "cuda":
        roofs = {"d2d_copy_bytes_per_s": copy_bandwidth("cuda"),
                 "pinned_read": pinned_read_bandwidths()}
        for row in results:
            if row["op"] in ("quantized_matmul", "tinygemm_int4", "dense"):
                row["pct_of_copy_bandwidth"] = 100 * row["gb_per_s"] * 1e9 / roofs[
                    "d2d_copy_bytes_per_s"]
            if row["op"] == "residual_gather" and roofs["pinned_read"]:
                fetch = row["host_bytes"] / (row["median_us"] * 1e-6)
                row["pct_of_zero_copy_read"] = 100 * fetch / roofs["pinned_read"][
                    "zero_copy_sequential"]
    return {
        **run_metadata(device),
        "dtype": str(dtype),
        "quick": quick,
        "roofs": roofs,
        "iters": iters,
        "warmup": warmup,
        "group_size": GROUP,
        "residual_bits": RESIDUAL_BITS,
        "compensated_base_bits": comp_bits,
        "timing": "median of per-call CUDA event intervals" if device == "cuda"
                  else "median of per-call time.perf_counter intervals",
        "tinygemm": tinygemm_status,
        "results": results,
    }


# ------------------------------------------------------------ the CPU suite
def cpu_contenders(N: int, K: int, B: int, gen: torch.Generator) -> dict[str, tuple]:
    """name -> (callable, bytes it must read) for one shape and batch."""
    x = torch.randn(B, K, generator=gen)
    xb = x.to(torch.bfloat16)
    io = B * (K + N) * 4
    w32 = torch.randn(N, K, generator=gen) * 0.02
    wb = w32.to(torch.bfloat16)
    int8, int8_bytes = torch_int8_cpu_setup(N, K, gen)
    c = {
        "torch fp32 F.linear": (lambda: torch.nn.functional.linear(x, w32), N * K * 4 + io),
        "torch bf16 F.linear": (lambda: torch.nn.functional.linear(xb, wb), N * K * 2 + io // 2),
        "torch int8 (bf16 x)": (lambda: int8(xb), int8_bytes + io // 2),
    }
    # torch's CPU int4 GEMM needs K to be a multiple of the group size
    # (SmolLM2's K = 576 is 4.5 groups of 128): left out where it cannot run.
    if K % GROUP == 0:
        int4, int4_bytes = torch_int4_cpu_setup(N, K, GROUP, gen)
        c["torch int4 g128 (bf16 x)"] = (lambda: int4(xb), int4_bytes + io // 2)
    for bits, group in ((4, GROUP), (3, GROUP), (2, GROUP), (4, 32)):
        wargs, wbytes = packed_layer(N, K, bits, group, torch.float32, "cpu", gen)
        c[f"qdec W{bits} g{group}"] = (lambda a=wargs: qdec.quantized_matmul(x, *a), wbytes + io)
        if bits == 4:  # the same weights with x as one int16 term (ONE_TERM)
            c[f"qdec W{bits} g{group}{ONE_TERM}"] = c[f"qdec W{bits} g{group}"]
    residual, rscales = residual_store(N, K, RESIDUAL_BITS, "cpu", gen)
    wargs, wbytes = packed_layer(N, K, 3, GROUP, torch.float32, "cpu", gen)
    k = max(1, round(0.02 * K))
    rbytes = B * k * (-(-N // 32) * RESIDUAL_BITS * 4) + N * 4
    c[f"qdec W3 g{GROUP} (again)"] = (lambda: qdec.quantized_matmul(x, *wargs), wbytes + io)
    c[f"qdec W3 g{GROUP} + comp 2%"] = (
        lambda: qdec.compensated_linear(x, *wargs, residual, rscales, RESIDUAL_BITS, k),
        wbytes + io + rbytes)
    return c


# Contenders whose name ends so run with QDEC_CPU_ACTIVATIONS=int16 (x as one
# int16 term: csrc/include/qdec/cpu_decode.h); the others with the default.
ONE_TERM = " x:int16"


def activation_setters(names) -> dict[str, object]:
    """For interleaved_medians(before=...): each contender's activation
    precision, set untimed before its call."""
    return {n: (lambda p="int16" if n.endswith(ONE_TERM) else "int16x2":
                qdec.set_cpu_activations(p)) for n in names}


def run_cpu(args) -> dict:
    # Each distinct (N, K) once, named by the projections that have it.
    named: dict[tuple[int, int], list[str]] = {}
    for preset in ("llama3-8b", "smollm2-135m"):
        for name, nk in SHAPE_PRESETS[preset].items():
            named.setdefault(nk, []).append(f"{preset}:{name}")
    shapes = [(n, k, "/".join(names)) for (n, k), names in named.items()]
    if args.quick:
        shapes = shapes[1:2]
    threads_list = [int(t) for t in args.threads.split(",")]
    batches = [int(b) for b in args.batches.split(",")]
    rounds = args.iters or (3 if args.quick else 15)
    gen = torch.Generator().manual_seed(0)
    results, roofs = [], {}
    for threads in threads_list:
        torch.set_num_threads(threads)
        roofs[threads] = cpu_read_bandwidth()
        print(f"threads {threads}: read roof {roofs[threads] / 1e9:.1f} GB/s", flush=True)
        for N, K, layer in shapes:
            for B in batches:
                contenders = cpu_contenders(N, K, B, gen)
                times = interleaved_medians({n: f for n, (f, _) in contenders.items()}, rounds,
                                            before=activation_setters(contenders))
                base = times["torch fp32 F.linear"]["wall"]
                int4 = times.get("torch int4 g128 (bf16 x)", {}).get("wall", float("nan"))
                for name, (_, nbytes) in contenders.items():
                    t = times[name]
                    row = dict(threads=threads, shape=f"{N}x{K}", layer=layer, N=N, K=K, batch=B,
                               op=name, median_us=t["wall"] * 1e6, cpu_us=t["cpu"] * 1e6,
                               bytes=nbytes, gb_per_s=nbytes / t["wall"] / 1e9,
                               pct_of_read_roof=100 * nbytes / t["wall"] / roofs[threads],
                               speedup_vs_fp32=base / t["wall"],
                               speedup_vs_torch_int4=int4 / t["wall"])
                    results.append(row)
                    print(f"t={threads} {row['shape']:>11} B={B:<2} {name:<28} "
                          f"{row['median_us']:10.1f} us {row['gb_per_s']:6.1f} GB/s "
                          f"{row['pct_of_read_roof']:5.0f}% roof  x{row['speedup_vs_fp32']:.2f} "
                          f"vs fp32  x{row['speedup_vs_torch_int4']:.2f} vs int4", flush=True)
    return {
        **run_metadata("cpu"),
        "cpu_isa": qdec.cpu_isa(),
        "quick": args.quick,
        "rounds": rounds,
        "timing": "interleaved rounds (each contender once per round); medians of "
                  "time.perf_counter (median_us) and time.process_time (cpu_us)",
        "read_roof_bytes_per_s": {str(t): v for t, v in roofs.items()},
        "group_size": GROUP,
        "residual_bits": RESIDUAL_BITS,
        "results": results,
        "targets": cpu_targets(results),
    }


def cpu_targets(results: list[dict]) -> list[dict]:
    """Issue 15's GEMV targets, checked on every (threads, Llama shape) at batch 1."""
    checks = []
    by = {}
    for r in results:
        by.setdefault((r["threads"], r["shape"], r["batch"]), {})[r["op"]] = r
    for (threads, shape, batch), ops in sorted(by.items()):
        if batch != 1 or not ops["torch fp32 F.linear"]["layer"].startswith("llama3-8b"):
            continue
        us = {name: r["median_us"] for name, r in ops.items()}
        w4, w3, w2 = us["qdec W4 g128"], us["qdec W3 g128"], us["qdec W2 g128"]
        comp = us["qdec W3 g128 + comp 2%"] / min(us["qdec W3 g128"], us["qdec W3 g128 (again)"])
        for name, value, goal, ok in (
            ("W4 vs torch int4 (speedup)", us["torch int4 g128 (bf16 x)"] / w4, ">= 1.0", None),
            ("W4 vs fp32 F.linear (speedup)", us["torch fp32 F.linear"] / w4, ">= 3.0", None),
            ("W3 time / W4 time", w3 / w4, "<= 1.0", None),
            ("W2 time / W3 time", w2 / w3, "<= 1.0", None),
            ("W4 % of read roof", ops["qdec W4 g128"]["pct_of_read_roof"], ">= 60", None),
            ("comp 2% time / W3 time", comp, "<= 1.10", None),
            # The opt-in one-term activations (QDEC_CPU_ACTIVATIONS=int16).
            (f"W4{ONE_TERM} vs torch int4 (speedup)",
             us["torch int4 g128 (bf16 x)"] / us[f"qdec W4 g128{ONE_TERM}"], ">= 1.0", None),
            (f"W4{ONE_TERM} % of read roof", ops[f"qdec W4 g128{ONE_TERM}"]["pct_of_read_roof"],
             ">= 60", None),
        ):
            op, bound = goal.split()
            ok = value >= float(bound) if op == ">=" else value <= float(bound)
            checks.append(dict(threads=threads, shape=shape, check=name, value=round(value, 3),
                               goal=goal, met=ok))
    return checks


def print_table(data: dict) -> None:
    print(f"\n{data['device']} | torch {data['torch']} | commit {data['commit']} | "
          f"{data['dtype']} | median of {data['iters']}")
    print(f"{'shape':>11} {'B':>2} {'op':<20} {'config':<24} {'us':>10} {'GB/s':>8} {'x dense':>8}")
    for r in data["results"]:
        print(f"{r['shape']:>11} {r['batch']:>2} {r['op']:<20} {r['config']:<24} "
              f"{r['median_us']:10.1f} {r['gb_per_s']:8.1f} {r.get('ratio_vs_dense', 0):8.3f}")
    if data["tinygemm"]["available"] is False:
        print(f"tinygemm unavailable: {data['tinygemm']['reason']}")


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--device", choices=["cpu", "cuda"],
                   default="cuda" if torch.cuda.is_available() else "cpu")
    p.add_argument("--batches", default="1", help="comma-separated batch sizes (e.g. 1,2,4,8,16)")
    p.add_argument("--iters", type=int, default=0, help="timed iterations (0: device default)")
    p.add_argument("--warmup", type=int, default=None)
    p.add_argument("--comp-bits", type=int, default=3,
                   help="base bits of the compensated_linear configs")
    p.add_argument("--quick", action="store_true", help="one shape, few configs and iterations")
    p.add_argument("--threads", default="1,2",
                   help="CPU: comma-separated torch thread counts (default 1,2)")
    p.add_argument("--isa", choices=["scalar", "avx2", "avx512", "auto"], default=None,
                   help="CPU: force the decode kernels' level (default: QDEC_CPU_ISA or the best)")
    p.add_argument("--out", type=Path, default=None,
                   help="output JSON (default benchmarks/results/bench_gemv_<device>.json)")
    args = p.parse_args(argv)
    if args.device == "cuda" and not torch.cuda.is_available():
        p.error("--device cuda but torch.cuda.is_available() is False")
    if args.isa:
        qdec.set_cpu_isa(args.isa)
    if args.device == "cpu":
        with torch.inference_mode():
            data = run_cpu(args)
        out = args.out or ROOT / "benchmarks" / "results" / "bench_gemv_cpu.json"
        write_json(data, out)
        print("\ntargets (batch 1, Llama-3-8B shapes):")
        for c in data["targets"]:
            print(f"  t={c['threads']} {c['shape']:>11} {c['check']:<32} {c['value']:>8} "
                  f"(goal {c['goal']}) {'met' if c['met'] else 'MISSED'}")
        print(f"\nwrote {out}")
        return 0
    with torch.inference_mode():
        data = run(args)
    out = args.out or ROOT / "benchmarks" / "results" / f"bench_gemv_{args.device}.json"
    write_json(data, out)
    print_table(data)
    print(f"\nwrote {out}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
